//! MQTT dispatch end to end against a real Eclipse Mosquitto broker.
//!
//! A 40-miner site (10 each of LuxOS, Braiins OS, Whatsminer, VNish
//! emulators; site time 10x) runs under the curtailment driver with a real
//! SQLite ledger; gridproxy-grid's MQTT client subscribes to
//! `site/t1/dispatch` on a private mosquitto (Debian package, loopback,
//! login required) and feeds the driver. The dispatcher is the package's
//! `mosquitto_pub`; acks and statuses are read with rumqttc.
//!
//! Checked, in order: a wrong password is refused with a clear error (our
//! client and mosquitto_pub); 100 % then 0 % puts every miner to sleep (site
//! kW at standby); malformed payloads get a rejection ack and change
//! nothing; 100 % restores the fleet; silence for the timeout (120 s site
//! time here, 240 s by default) drives the fleet to the safe state and not
//! before; mosquitto SIGKILLed and restarted: the client reconnects and
//! dispatch works again (a kW target is met); acks and statuses arrived on
//! their topics; the last will says `online: false` after shutdown.

use std::time::{Duration, Instant};

use crate::mqtt_support::*;
use gridproxy_curtail as curtail;
use gridproxy_fixtures::site::Site;
use gridproxy_grid::mqtt::{self, MqttConfig, SiteStatus};
use gridproxy_tests::bench::*;
use gridproxy_tests::wait_until;

use curtail::driver::{Audit, DriverConfig, DriverHandle, Nothing};
use curtail::policy::{Mode, PolicyConfig, Staleness};
use curtail::time::Clock;

/// Upper bound on the test, wall time.
const TEST_LIMIT: Duration = Duration::from_secs(180);
/// Dispatch silence timeout, site time (12 s of wall time).
const SILENCE: Duration = Duration::from_secs(120);

const DISPATCH: &str = "site/t1/dispatch";
const ACK: &str = "site/t1/ack";
const STATUS: &str = "site/t1/status";

fn mqtt_config(port: u16, password: &str, client_id: &str) -> MqttConfig {
    MqttConfig {
        port,
        client_id: client_id.into(),
        username: Some(USER.into()),
        password: Some(password.into()),
        silence_timeout: SILENCE,
        keepalive: Duration::from_secs(5),
        status_interval: Duration::from_millis(500),
        backoff_min: Duration::from_millis(100),
        backoff_max: Duration::from_secs(1),
        ..MqttConfig::for_site("t1")
    }
}

fn policy(cfg: &MqttConfig) -> PolicyConfig {
    PolicyConfig {
        max_commands_per_sec: 50,
        restore_batch: 20,
        restore_interval: Duration::from_secs(10),
        min_on: Duration::from_secs(30),
        min_off: Duration::from_secs(30),
        ack_timeout: Duration::from_secs(20),
        verify_grace: Duration::from_secs(20),
        retry_backoff: Duration::from_secs(10),
        staleness: Staleness {
            dispatch: Some(cfg.freshness()),
            ..Staleness::NONE
        },
        ..PolicyConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_dispatch_against_mosquitto() {
    let _gate = gridproxy_tests::module_gate(module_path!());
    gridproxy_tests::serially(TEST_LIMIT, run()).await;
}

fn all_asleep(site: &Site) -> bool {
    site.miners().iter().all(asleep)
}

fn all_nominal(site: &Site) -> bool {
    site.miners().iter().all(at_nominal)
}

/// Publish, wait for the ack of `id`; returns it.
async fn dispatch(
    broker: &Mosquitto,
    rec: &Recorder,
    id: &str,
    payload: &str,
) -> serde_json::Value {
    broker.publish(DISPATCH, payload);
    assert!(
        wait_until(Duration::from_secs(5), || rec.ack(ACK, id).is_some()).await,
        "no ack for {id} on {ACK}; acks: {:?}",
        rec.on(ACK).iter().map(|s| &s.json).collect::<Vec<_>>()
    );
    rec.ack(ACK, id).unwrap()
}

/// Wall and site seconds until `cond` holds (panics after `limit`).
async fn time_until(
    what: &str,
    clock: &ScaledClock,
    limit: Duration,
    mut cond: impl FnMut() -> bool,
) -> (f64, f64) {
    let (t0, s0) = (Instant::now(), clock.now());
    assert!(
        wait_until(limit, &mut cond).await,
        "{what} not within {limit:?}"
    );
    (t0.elapsed().as_secs_f64(), (clock.now() - s0).as_secs_f64())
}

async fn run() {
    gridproxy_tests::init_tracing();
    let mut broker = Mosquitto::start("grid-mqtt").await;
    let rec = Recorder::start(broker.port, "test-recorder", &[ACK, STATUS]);

    // --- the site and its driver ---
    let bench = SiteBench::new("mqtt", (71, 0)).mixed(10).start().await;
    let site = bench.site.clone();
    let n = site.len();
    let nominal_kw = site.nominal_w() / 1000.0;
    let standby_kw: f64 = site.miners().iter().map(|m| m.config.sleep_w).sum::<f64>() / 1000.0;
    let ledger = bench.ledger();
    let clock = ScaledClock::new(SPEED);
    let cfg = mqtt_config(broker.port, PASSWORD, "gridproxy-t1");
    let h = bench
        .start_driver(
            policy(&cfg),
            Nothing,
            clock,
            DriverConfig {
                poll_interval: Duration::from_secs(5),
                interval: Duration::from_secs(10),
                ..DriverConfig::default()
            },
        )
        .await;

    // Site status for the status topic: engine figures plus miner counts.
    let (status_tx, status_rx) = tokio::sync::watch::channel(SiteStatus::default());
    let status_task = {
        let watch = h.watch();
        let states: Vec<_> = site
            .miners()
            .iter()
            .map(|m| m.emulator.miner().clone())
            .collect();
        tokio::spawn(async move {
            loop {
                let s = watch.borrow().clone();
                let asleep = states
                    .iter()
                    .filter(|m| m.sample().hashrate_ths <= 0.0)
                    .count();
                let _ = status_tx.send(
                    SiteStatus {
                        miners_running: states.len() - asleep,
                        miners_asleep: asleep,
                        ..SiteStatus::default()
                    }
                    .with_engine(s.mode, s.cap_kw, s.measured_kw),
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };

    // --- a wrong password is refused, clearly ---
    let bad = mqtt::spawn(
        mqtt_config(broker.port, "not-the-password", "gridproxy-bad"),
        nominal_kw,
        h.signals(),
        status_rx.clone(),
        clock,
    )
    .expect("config valid");
    let refused = bad
        .wait_for(Duration::from_secs(10), |s| s.last_error.is_some())
        .await
        .expect("wrong password reported");
    let err = refused.last_error.clone().unwrap();
    println!("wrong password: {err}");
    assert!(err.contains("refused the login"), "{err}");
    assert_eq!(refused.connects, 0);
    assert!(!bad.state().connected);
    bad.shutdown().await;
    let (ok, stderr) = broker.publish_as("not-the-password", DISPATCH, "0");
    assert!(!ok && stderr.contains("not authorised"), "{stderr}");

    // --- the real client ---
    let client =
        mqtt::spawn(cfg.clone(), nominal_kw, h.signals(), status_rx, clock).expect("config valid");
    assert!(
        client
            .wait_for(Duration::from_secs(10), |s| s.connected)
            .await
            .is_some(),
        "client connects: {:?}\n{}",
        client.state(),
        broker.log()
    );
    // The subscription is in place once the broker logs it; give it a beat.
    tokio::time::sleep(Duration::from_millis(300)).await;

    let a = dispatch(&broker, &rec, "d1", r#"{"id":"d1","target_pct":100}"#).await;
    assert_eq!(a["accepted"], true, "{a}");
    assert!(a["target_kw"].is_null());
    assert!(all_nominal(&site));
    let base_kw = site_kw(&site);

    // 0 %: everything sleeps.
    let ts = clock.now().as_millis() as f64 / 1000.0;
    let a = dispatch(
        &broker,
        &rec,
        "d2",
        &format!(r#"{{"id":"d2","target_pct":0,"ts":{ts}}}"#),
    )
    .await;
    assert_eq!(a["accepted"], true, "{a}");
    assert_eq!(a["target_kw"], 0.0);
    let (wall, site_s) = time_until("all asleep at 0 %", &clock, Duration::from_secs(20), || {
        all_asleep(&site)
    })
    .await;
    let asleep_kw = site_kw(&site);
    println!(
        "0 %: {n} miners asleep {wall:.2} s after the ack ({site_s:.1} s site time); \
         site {base_kw:.1} kW -> {asleep_kw:.2} kW (standby {standby_kw:.2} kW)"
    );
    assert!(asleep_kw <= standby_kw + 0.01);
    assert_eq!(h.status().mode, Mode::Dispatch);

    // Malformed payloads: refused, nothing changes.
    let issued = h.status().issued;
    let before = client.state().rejected;
    for (id, payload) in [
        ("bad1", r#"{"id":"bad1","target_pct":"lots"}"#),
        ("bad2", r#"{"id":"bad2","target_pct":250}"#),
        ("bad3", r#"{"id":"bad3","target_pct":50,"target_kw":3}"#),
    ] {
        let a = dispatch(&broker, &rec, id, payload).await;
        assert_eq!(a["accepted"], false, "{a}");
        println!("{id}: refused: {}", a["reason"]);
        assert!(a["reason"].as_str().is_some_and(|r| !r.is_empty()));
    }
    broker.publish(DISPATCH, "{{{ not json");
    assert!(
        client
            .wait_for(Duration::from_secs(5), |s| s.rejected == before + 4)
            .await
            .is_some(),
        "4 refusals counted: {:?}",
        client.state()
    );
    let anon = || {
        rec.on(ACK)
            .iter()
            .any(|s| s.json["id"].is_null() && s.json["accepted"] == false)
    };
    assert!(
        wait_until(Duration::from_secs(5), anon).await,
        "rejection ack for the non-JSON payload"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(all_asleep(&site), "a malformed payload woke a miner");
    assert_eq!(
        h.status().issued,
        issued,
        "a malformed payload caused commands"
    );

    // 100 %: the fleet comes back.
    let a = dispatch(&broker, &rec, "d3", r#"{"id":"d3","target_pct":100}"#).await;
    assert_eq!(a["accepted"], true, "{a}");
    let (wall, site_s) = time_until("restore at 100 %", &clock, Duration::from_secs(30), || {
        all_nominal(&site)
    })
    .await;
    println!(
        "100 %: all {n} miners back at nominal {wall:.2} s after the ack ({site_s:.1} s site \
         time, min_off 30 s, batches of 20 every 10 s)"
    );

    // --- silence: the safe state after the timeout, not before ---
    let last = curtail::time::Timestamp::from_millis(a["received_ms"].as_u64().unwrap());
    let mut first_curtail = None;
    let limit = Instant::now() + real(SILENCE + Duration::from_secs(60));
    while Instant::now() < limit {
        if first_curtail.is_none() && !all_nominal(&site) {
            first_curtail = Some(clock.now());
        }
        if all_asleep(&site) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let asleep_at = clock.now();
    assert!(
        all_asleep(&site),
        "silence did not drive the fleet to sleep"
    );
    let first = first_curtail.expect("curtailment seen");
    let (to_first, to_all) = (
        (first - last).as_secs_f64(),
        (asleep_at - last).as_secs_f64(),
    );
    println!(
        "silence: first miner curtailed {to_first:.1} s (site) after the last dispatch, all \
         asleep after {to_all:.1} s (timeout {} s); mode {:?}",
        SILENCE.as_secs(),
        h.status().mode
    );
    assert!(to_first >= SILENCE.as_secs_f64() - 1.0, "curtailed early");
    assert!(
        to_all <= SILENCE.as_secs_f64() + 40.0,
        "safe state too slow"
    );
    assert_eq!(h.status().mode, Mode::SafeState);
    assert!(
        wait_until(Duration::from_secs(3), || rec
            .on(STATUS)
            .iter()
            .any(
                |s| s.json["mode"] == "safe_state" && s.json["miners_asleep"] == n
            ))
        .await,
        "status shows the safe state"
    );

    // --- broker crash and restart ---
    let connects = client.state().connects;
    broker.kill();
    let down = Instant::now();
    assert!(
        client
            .wait_for(Duration::from_secs(10), |s| !s.connected)
            .await
            .is_some(),
        "client notices the broker is gone"
    );
    println!(
        "broker killed: client noticed in {:.2} s: {:?}",
        down.elapsed().as_secs_f64(),
        client.state().last_error
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    broker.restart().await;
    let up = Instant::now();
    assert!(
        client
            .wait_for(Duration::from_secs(10), |s| s.connects > connects)
            .await
            .is_some(),
        "client reconnects: {:?}",
        client.state()
    );
    println!(
        "broker restarted: client reconnected {:.2} s later ({} connection errors so far)",
        up.elapsed().as_secs_f64(),
        client.state().connection_errors
    );
    assert!(
        wait_until(Duration::from_secs(5), || rec
            .on(STATUS)
            .iter()
            .any(|s| s.at > up))
        .await,
        "status again after the restart"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    // A kW target (half the fleet) after the restart.
    let target = 0.5 * nominal_kw;
    let a = dispatch(
        &broker,
        &rec,
        "d4",
        &format!(r#"{{"id":"d4","target_kw":{target}}}"#),
    )
    .await;
    assert_eq!(a["accepted"], true, "{a}");
    let band = 0.03 * target;
    let (wall, _) = time_until(
        "kW target after the broker restart",
        &clock,
        Duration::from_secs(30),
        || (site_kw(&site) - target).abs() <= band && !site.miners().iter().all(asleep),
    )
    .await;
    println!(
        "after restart: target {target:.1} kW met ({:.1} kW) {wall:.2} s after the ack, mode {}",
        site_kw(&site),
        h.status().mode.as_str()
    );
    assert_eq!(h.status().mode, Mode::Dispatch);

    // --- acks and statuses ---
    let acks = rec.on(ACK);
    let statuses = rec.on(STATUS);
    println!(
        "{} acks, {} status messages; client {:?}",
        acks.len(),
        statuses.len(),
        client.state()
    );
    assert!(statuses
        .iter()
        .any(|s| s.json["mode"] == "dispatch" && s.json["miners_asleep"] == n));
    assert!(statuses.iter().all(|s| s.json["online"] == true));
    assert!(statuses
        .iter()
        .any(|s| s.json["dispatch_age_s"].as_f64().is_some()));
    let st = client.state();
    assert_eq!(st.accepted, 4);
    assert_eq!(st.rejected, 4);
    assert!(st.last_reject.is_some());

    // --- shutdown: online false stays on the status topic ---
    client.shutdown().await;
    let late = Recorder::start(broker.port, "test-late", &[STATUS]);
    assert!(
        wait_until(Duration::from_secs(5), || late
            .on(STATUS)
            .iter()
            .any(|s| s.json["online"] == false))
        .await,
        "retained offline status after shutdown: {:?}",
        late.on(STATUS).iter().map(|s| &s.json).collect::<Vec<_>>()
    );
    status_task.abort();
    finish(h, &ledger, 4).await;
    site.stop();
    let _ = std::fs::remove_dir_all(&bench.dir);
}

/// Stop the driver; the ledger holds every command answered, the accepted
/// dispatches as signals, and the safe state.
async fn finish(h: DriverHandle, ledger: &std::path::Path, dispatches: usize) {
    let _ = h
        .wait_for(Duration::from_secs(20), |s| s.in_flight == 0)
        .await;
    let report = h.shutdown().await.expect("driver stops cleanly");
    assert_eq!(report.unanswered, 0);
    let audit = Audit::read(ledger).expect("ledger readable");
    assert_eq!(audit.commands.len() as u64, report.status.issued);
    let ok = every_command_answered(&audit);
    assert!(
        audit.signals >= dispatches,
        "signals in ledger: {}",
        audit.signals
    );
    let safe = audit
        .notes
        .iter()
        .filter(|n| n.kind == "safe_state")
        .count();
    println!(
        "ledger: {} commands ({ok} OK), {} signals, {safe} safe-state notes",
        audit.commands.len(),
        audit.signals
    );
    assert!(safe >= 1, "safe state not in the ledger");
}
