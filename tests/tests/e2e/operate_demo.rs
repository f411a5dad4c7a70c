//! `gridproxy demo` end to end, sped up: the embedded pools validate shares
//! from the simulated fleet through the proxy, the price spike curtails the
//! site (firmware sleeps and proxy parks), the DR event becomes active and
//! is recorded in the ledger, and the demo stops cleanly.

use gridproxy::api::client;
use gridproxy::demo::{self, DemoOptions};
use gridproxy_curtail::command::Action;
use gridproxy_curtail::driver::Audit;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_site_follows_the_price_spike_and_the_dr_event() {
    let _gate = gridproxy_tests::module_gate(module_path!());
    let dir = std::env::temp_dir().join(format!("gridproxy-operate-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ledger = dir.join("ledger.sqlite");
    let stop = CancellationToken::new();
    let steps = gridproxy::mix::trace().len() as u64;
    let step = Duration::from_millis(700);
    let d = demo::start(
        DemoOptions {
            miners: 60,
            api_listen: "127.0.0.1:0".parse().unwrap(),
            step,
            status_every: Duration::ZERO,
            time_scale: 0.05,
            subnet: (63, 0),
            ledger: Some(ledger.clone()),
            duration: Some(step * (steps as u32) + Duration::from_secs(3)),
            ..DemoOptions::default()
        },
        stop.clone(),
    )
    .await
    .unwrap();
    let api = d.api_addr;
    let token = d.read_token.clone();

    // Watch the site through the API while the trace plays.
    let mut min_kw = f64::INFINITY;
    let mut nominal = 0.0;
    let mut saw_dr_active = false;
    let mut saw_parked = false;
    let deadline = tokio::time::Instant::now() + step * (steps as u32) + Duration::from_secs(2);
    while tokio::time::Instant::now() < deadline {
        if let Ok(r) = client::request(
            api,
            "GET",
            "/api/v1/fleet",
            Some(&token),
            None,
            Duration::from_secs(5),
        )
        .await
        {
            if let Ok(f) = r.json() {
                let s = &f["site"];
                if s["attached"] == true {
                    nominal = s["nominal_kw"].as_f64().unwrap_or(0.0);
                    min_kw = min_kw.min(s["site_kw"].as_f64().unwrap_or(f64::INFINITY));
                    saw_dr_active |= s["events"]
                        .as_array()
                        .is_some_and(|e| e.iter().any(|e| e["state"] == "active"));
                }
            }
        }
        if let Ok(r) = client::request(
            api,
            "GET",
            "/api/v1/workers?q=parked&limit=5",
            Some(&token),
            None,
            Duration::from_secs(5),
        )
        .await
        {
            saw_parked |= r
                .json()
                .is_ok_and(|w| w["matched"].as_u64().unwrap_or(0) > 0);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // Ledger export through the API.
    let r = client::request(
        api,
        "GET",
        "/api/v1/ledger",
        Some(&token),
        None,
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let l = r.json().unwrap();
    assert!(
        l["commands"].as_array().is_some_and(|c| !c.is_empty()),
        "empty ledger export"
    );
    assert!(l["events"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["state"] == "active"));
    let r = client::request(
        api,
        "GET",
        "/api/v1/ledger",
        None,
        None,
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 401);
    let report = d.join().await.unwrap();
    println!("{}", report.summary());

    assert!(report.pool_accepted > 50, "{}", report.summary());
    // Stale shares across a tip change are fine; invalid ones are not, and
    // neither are duplicates: a reconnecting miner gets a fresh extranonce
    // prefix (released ones rest past a job's life), so no work repeats.
    assert_eq!(
        report.pool_rejects.get("duplicate").copied().unwrap_or(0),
        0,
        "the pools saw duplicate shares: {}",
        report.summary()
    );
    assert_eq!(
        report.pool_invalid,
        0,
        "the pools found invalid shares: {}",
        report.summary()
    );
    assert!(report.intervals >= steps, "{}", report.summary());
    assert_eq!(report.dr_events, 1);
    assert!(nominal > 0.0);
    assert!(
        min_kw < 0.1 * nominal,
        "the spike did not curtail the site: min {min_kw} of {nominal} kW"
    );
    assert!(saw_dr_active, "the DR event never showed as active");
    assert!(saw_parked, "no stock miner was parked at the proxy");
    assert!(
        report.commands.issued > 60 && report.commands.verified > 30,
        "{}",
        report.summary()
    );

    // The ledger holds firmware and proxy commands and the DR event's life cycle.
    let audit = Audit::read(&ledger).unwrap();
    let has = |a: fn(&Action) -> bool| audit.commands.iter().any(|c| a(&c.action));
    assert!(has(|a| matches!(a, Action::Sleep)));
    assert!(has(|a| matches!(a, Action::Wake)));
    assert!(has(|a| matches!(a, Action::Park)));
    let states: Vec<&str> = audit.events.iter().map(|e| e.state.as_str()).collect();
    assert!(
        states.contains(&"active") && states.contains(&"ended"),
        "{states:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
