//! A polled HTTP JSON price feed driving the curtailment engine, end to
//! end: an HTTP server on 127.0.0.1 (axum, in this test) serves
//! `{"timestamp": <ms>, "lmp": <$/MWh>}`; gridproxy's price feed polls it
//! and sends price signals to the driver, which commands the firmware
//! emulators of a simulated site.
//!
//! 24 miners (6 each on LuxOS, Braiins OS, VNish, Whatsminer), no per-unit
//! spread; hashprice $39.5/PH/day, no fee: breakevens S19 $48.1, M30S++
//! $53.1, S19j Pro $55.8, M50S $63.3, S19 XP $76.5, M60 $84.7, S21 $94.0
//! per MWh (hysteresis ±$1).
//!
//! Site time runs 10× real time. Phases (site seconds):
//! - 0–40: $40, everything runs;
//! - 40–100: $70, above the breakevens of S19, M30S++, S19j Pro and M50S:
//!   they sleep, least efficient first; the others keep running;
//! - 100–: the feed goes bad, cycling through HTTP 500, malformed JSON,
//!   NaN, a price of $2,000,000 and a timestamp an hour old. Each poll is
//!   rejected with a clear error and nothing is sent; 60 s after the last
//!   good price (its max age) the engine's safe state curtails the rest.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use gridproxy_curtail as curtail;
use gridproxy_grid::price::feed::{Format, PollConfig, PriceFeed};
use gridproxy_grid::price::json::JsonFormat;
use gridproxy_tests::bench::*;

use curtail::command::Action;
use curtail::driver::{Audit, DriverConfig, Nothing};
use curtail::policy::{Economics, Freshness, PolicyConfig, SafeState, Staleness};
use curtail::time::{Clock, Timestamp};
use tokio_util::sync::CancellationToken;

const TEST_LIMIT: Duration = Duration::from_secs(120);
const PRICE_MAX_AGE: Duration = Duration::from_secs(60);
const JUMP_S: u64 = 40;
const BAD_S: u64 = 100;
const END_S: u64 = 190;

#[derive(Clone, Copy, Debug)]
enum Serve {
    Price(f64),
    Bad,
}

#[derive(Clone)]
struct Server {
    serve: Arc<Mutex<Serve>>,
    polls: Arc<Mutex<u64>>,
    clock: ScaledClock,
}

async fn price(State(s): State<Server>) -> (StatusCode, String) {
    let now = s.clock.now().as_millis();
    let n = {
        let mut p = s.polls.lock().unwrap();
        *p += 1;
        *p
    };
    let serve = *s.serve.lock().unwrap();
    match serve {
        Serve::Price(p) => (
            StatusCode::OK,
            format!(r#"{{"timestamp":{now},"lmp":{p}}}"#),
        ),
        Serve::Bad => match n % 5 {
            0 => (StatusCode::INTERNAL_SERVER_ERROR, "upstream down".into()),
            1 => (StatusCode::OK, r#"{"timestamp":17,"lmp":"#.into()),
            2 => (
                StatusCode::OK,
                format!(r#"{{"timestamp":{now},"lmp":"NaN"}}"#),
            ),
            3 => (
                StatusCode::OK,
                format!(r#"{{"timestamp":{now},"lmp":2000000}}"#),
            ),
            _ => (
                StatusCode::OK,
                format!(r#"{{"timestamp":{},"lmp":30}}"#, now - 3_600_000),
            ),
        },
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_price_feed_curtails_least_efficient_first_and_fails_safe_when_bad() {
    let _gate = gridproxy_tests::module_gate(module_path!());
    gridproxy_tests::serially(TEST_LIMIT, run()).await;
}

async fn run() {
    gridproxy_tests::init_tracing();
    let bench = SiteBench::new("gridprice", (65, 0))
        .mixed(6)
        .with(|c| c.unit_spread = 0.0)
        .start()
        .await;
    let site = bench.site.clone();
    let clock = ScaledClock::new(SPEED);

    // The price server.
    let server = Server {
        serve: Arc::new(Mutex::new(Serve::Price(40.0))),
        polls: Arc::default(),
        clock,
    };
    let app = axum::Router::new()
        .route("/price", get(price))
        .with_state(server.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    let http = {
        let stop = stop.clone();
        tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(stop.cancelled_owned())
                .await
        })
    };

    let policy = PolicyConfig {
        economics: Some(Economics {
            hashprice_usd_per_ph_day: 39.5,
            pool_fee: 0.0,
            pue: 1.0,
            hysteresis_usd_per_mwh: 1.0,
        }),
        min_on: Duration::from_secs(40),
        min_off: Duration::from_secs(60),
        max_commands_per_sec: 20,
        restore_batch: 50,
        restore_interval: Duration::from_secs(5),
        ack_timeout: Duration::from_secs(20),
        verify_grace: Duration::from_secs(20),
        staleness: Staleness {
            price: Some(Freshness {
                max_age: PRICE_MAX_AGE,
                on_stale: SafeState::CurtailAll,
            }),
            ..Staleness::NONE
        },
        ..PolicyConfig::default()
    };
    let ledger = bench.ledger();
    let h = bench
        .spawn_driver(
            policy,
            Nothing,
            clock,
            DriverConfig {
                poll_interval: Duration::from_secs(3),
                interval: Duration::from_secs(30),
                ..DriverConfig::default()
            },
        )
        .await;

    // The feed: poll every 0.5 s real (5 s site).
    let feed = PriceFeed::new(PollConfig::new(
        &format!("http://{addr}/price"),
        Format::Json(JsonFormat::default()),
        Duration::from_millis(500),
    ))
    .expect("feed");
    let status = feed.status();
    let feed_task = tokio::spawn(feed.run(h.signals(), clock, stop.clone()));

    let t0 = clock.now();
    let at = |s: u64| t0 + Duration::from_secs(s);
    let wait_until = |s: u64| async move {
        while clock.now() < at(s) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    wait_until(JUMP_S).await;
    let before_jump: Vec<bool> = site.miners().iter().map(asleep).collect();
    *server.serve.lock().unwrap() = Serve::Price(70.0);
    wait_until(BAD_S).await;
    let sent_before_bad = status.lock().unwrap().sent;
    let errors_before_bad = status.lock().unwrap().errors;
    let before_bad: Vec<bool> = site.miners().iter().map(asleep).collect();
    *server.serve.lock().unwrap() = Serve::Bad;
    let bad_from = clock.now();
    // Just before the staleness deadline: still only the four models off.
    wait_until(BAD_S + PRICE_MAX_AGE.as_secs() - 10).await;
    let before_stale: Vec<bool> = site.miners().iter().map(asleep).collect();
    wait_until(END_S).await;
    let at_end: Vec<bool> = site.miners().iter().map(asleep).collect();
    stop.cancel();
    let _ = feed_task.await;
    let report = h.shutdown().await.expect("driver stops");
    let _ = http.await;
    assert_eq!(report.status.failed, 0, "{:?}", report.status);

    let st = status.lock().unwrap().clone();
    println!("feed status: {st:?}");
    assert!(sent_before_bad >= 15, "good prices sent: {sent_before_bad}");
    assert_eq!(errors_before_bad, 0, "{st:?}");
    assert_eq!(
        st.sent, sent_before_bad,
        "nothing sent once the feed went bad"
    );
    assert!(st.errors >= 10, "{st:?}");
    for kind in ["http", "json", "range", "backwards"] {
        assert!(st.error_kinds.contains(kind), "no {kind} error: {st:?}");
    }
    assert!(st.last_error.as_deref().is_some_and(|e| !e.is_empty()));

    let cheap = |model: &str| matches!(model, "S19 XP" | "M60" | "S21");
    for m in site.miners() {
        assert!(
            !before_jump[m.index],
            "{} {} asleep at $40",
            m.index, m.model
        );
        assert_eq!(
            before_bad[m.index],
            !cheap(m.model),
            "{} {} at $70",
            m.index,
            m.model
        );
        assert_eq!(
            before_stale[m.index],
            !cheap(m.model),
            "{} {}: the last good price holds until it is {PRICE_MAX_AGE:?} old",
            m.index,
            m.model
        );
        assert!(
            at_end[m.index],
            "{} {} runs after the safe state",
            m.index, m.model
        );
    }

    let audit = Audit::read(&ledger).expect("ledger");
    every_command_answered(&audit);
    let eff = |id: curtail::fleet::MinerId| site.miners()[id.0 as usize].j_per_th();
    let rel = |t: Timestamp| t.saturating_since(t0).as_secs_f64();
    for c in &audit.commands {
        println!(
            "t0+{:6.1} s  {:?} {:>3} {:9} {:.1} J/TH",
            rel(c.at),
            c.action,
            c.miner.0,
            site.miners()[c.miner.0 as usize].model,
            eff(c.miner)
        );
    }
    // Price jump: sleeps least efficient first, all within 15 s.
    let jump: Vec<_> = audit
        .commands
        .iter()
        .filter(|c| c.at >= at(JUMP_S) && c.at < bad_from)
        .collect();
    let n_cheap = site.miners().iter().filter(|m| cheap(m.model)).count();
    assert!(n_cheap > 0 && n_cheap < site.miners().len());
    assert_eq!(
        jump.len(),
        site.miners().len() - n_cheap,
        "one sleep per dear miner"
    );
    assert!(jump.iter().all(|c| c.action == Action::Sleep));
    assert!(jump.iter().all(|c| c.at <= at(JUMP_S + 15)));
    let order: Vec<f64> = jump.iter().map(|c| eff(c.miner)).collect();
    assert!(
        order.windows(2).all(|w| w[0] >= w[1]),
        "least efficient first: {order:?}"
    );
    // Safe state: the rest sleep no earlier than the last good price + max age.
    let last_good = read_last_price(&ledger);
    assert!(last_good <= bad_from, "a price after the feed went bad");
    let stale_sleeps: Vec<_> = audit
        .commands
        .iter()
        .filter(|c| c.at >= bad_from && c.action == Action::Sleep)
        .collect();
    assert_eq!(
        stale_sleeps.len(),
        n_cheap,
        "S19 XP, M60, S21 slept in safe state"
    );
    for c in &stale_sleeps {
        assert!(cheap(site.miners()[c.miner.0 as usize].model));
        assert!(
            c.at >= last_good + PRICE_MAX_AGE,
            "slept at t0+{:.1} s, last good price at t0+{:.1} s",
            rel(c.at),
            rel(last_good)
        );
    }
    assert!(
        audit.notes.iter().any(|n| n.kind == "safe_state"),
        "safe state recorded"
    );
    site.stop();
    let _ = std::fs::remove_dir_all(&bench.dir);
}

/// Time of the last price signal recorded in the ledger.
fn read_last_price(ledger: &std::path::Path) -> Timestamp {
    let input = curtail::ledger::read_mv_input(ledger).expect("ledger reads");
    input.prices.last().expect("prices recorded").0
}
