//! gridproxy's OpenADR 3 VEN against the real openleadr-rs VTN
//! (`scripts/vtn.sh`: openleadr-vtn 0.2.8 on a private PostgreSQL, loopback).
//!
//! The test is the utility: with the business-logic client of openleadr-rs
//! (`openleadr_client`) it creates a program and events on the VTN. The VEN
//! (`gridproxy_grid::openadr`) turns them into engine signals for the
//! curtailment driver, which acts on a site of 36 emulated miners through
//! their firmware APIs (no proxy). Site time runs 10x real time.
//!
//! Needs `scripts/vtn.sh install` (fails, with that instruction, without it).

mod curtail_support;

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use curtail_support::*;
use gridproxy::curtail_bridge::curtail;
use gridproxy_fixtures::site::{Firmware, Site, SiteConfig};
use gridproxy_grid::openadr::{spawn_ven, VenConfig, VenHandle};
use gridproxy_tests::free_port;
use openleadr_client::{BusinessLogic, Client, ClientCredentials, ProgramClient};
use openleadr_wire::event::EventRequest;
use openleadr_wire::program::ProgramRequest;
use openleadr_wire::values_map::Value as WireValue;
use serde_json::json;
use tokio::sync::watch;

use curtail::driver::{self, DriverConfig, DriverHandle, Edge, Nothing, Route};
use curtail::policy::{PolicyConfig, Staleness};

const TEST_LIMIT: Duration = Duration::from_secs(240);
/// Wall time from creating an event on the VTN to the site within its limit.
const DEADLINE_REAL: Duration = Duration::from_secs(5);

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repo root")
        .to_path_buf()
}

fn vtn_bin() -> PathBuf {
    let cache = std::env::var_os("GRIDPROXY_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| ".".into()))
                .join(".cache/gridproxy")
        });
    cache.join("openleadr-vtn/bin/openleadr-vtn")
}

/// A VTN started by `scripts/vtn.sh up` on free loopback ports; `down` on drop.
struct Vtn {
    env: Vec<(String, String)>,
    vars: std::collections::HashMap<String, String>,
}

impl Vtn {
    fn up(run_dir: &std::path::Path) -> Vtn {
        let bin = vtn_bin();
        assert!(
            bin.is_file(),
            "openleadr-vtn not found at {}: run `scripts/vtn.sh install` first (builds the real \
             openleadr-rs VTN once, ~15 min cold; set GRIDPROXY_CACHE for another cache folder)",
            bin.display()
        );
        let env = vec![
            ("VTN_PORT".to_string(), free_port().to_string()),
            ("VTN_PG_PORT".to_string(), free_port().to_string()),
            ("VTN_RUN_DIR".to_string(), run_dir.display().to_string()),
            ("VEN_NAME".to_string(), "site-1".to_string()),
        ];
        let out = Command::new("bash")
            .arg(repo().join("scripts/vtn.sh"))
            .arg("up")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .output()
            .expect("run scripts/vtn.sh up");
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        let vtn = Vtn {
            env,
            vars: stdout
                .lines()
                .filter_map(|l| l.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        assert!(
            out.status.success(),
            "scripts/vtn.sh up failed:\n{}{}",
            stdout,
            String::from_utf8_lossy(&out.stderr)
        );
        vtn
    }

    fn var(&self, k: &str) -> &str {
        self.vars
            .get(k)
            .unwrap_or_else(|| panic!("{k} missing from scripts/vtn.sh up output"))
    }
}

impl Drop for Vtn {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(repo().join("scripts/vtn.sh"))
            .arg("down")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .status();
    }
}

fn policy() -> PolicyConfig {
    PolicyConfig {
        max_commands_per_sec: 50,
        restore_batch: 50,
        restore_interval: Duration::from_secs(5),
        // Short dwell (site time) so the restore fits the test.
        min_on: Duration::from_secs(20),
        min_off: Duration::from_secs(20),
        ack_timeout: Duration::from_secs(20),
        verify_grace: Duration::from_secs(20),
        staleness: Staleness {
            price: None,
            site_load: None,
            dispatch: None,
            dispatch_from_start: false,
        },
        ..PolicyConfig::default()
    }
}

async fn start_driver(site: &Site, dir: &std::path::Path) -> DriverHandle {
    let fw = std::sync::Arc::new(firmware(site));
    driver::spawn(
        &dir.join("ledger.db"),
        policy(),
        fleet(site),
        Edge {
            actuator: Route {
                firmware: fw.clone(),
                proxy: Nothing,
            },
            telemetry: fw,
            clock: ScaledClock::new(SPEED),
        },
        DriverConfig {
            poll_interval: Duration::from_secs(3),
            interval: Duration::from_secs(30),
            ..DriverConfig::default()
        },
    )
    .await
    .expect("driver starts")
}

/// An IMPORT_CAPACITY_LIMIT event (kW, or `units`) for `target`, from now, one hour.
fn limit_event(
    program: &ProgramClient<BusinessLogic>,
    name: &str,
    target: &str,
    kw: f64,
    units: &str,
) -> EventRequest {
    let start = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    serde_json::from_value(json!({
        "objectType": "EVENT",
        "programID": program.id().as_str(),
        "eventName": name,
        "priority": 0,
        "targets": [target],
        "intervalPeriod": {"start": start, "duration": "PT1H"},
        "payloadDescriptors": [{"objectType": "EVENT_PAYLOAD_DESCRIPTOR", "payloadType": "IMPORT_CAPACITY_LIMIT", "units": units}],
        "intervals": [{"id": 0, "payloads": [{"type": "IMPORT_CAPACITY_LIMIT", "values": [kw]}]}],
    }))
    .expect("event request")
}

/// Wall time until the site draws at most `kw` (+0.5 %), polled every 50 ms.
async fn time_to_limit(site: &Site, kw: f64, since: Instant, limit: Duration) -> Option<Duration> {
    while since.elapsed() < limit {
        if site_kw(site) <= kw * 1.005 {
            return Some(since.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

fn number(v: &WireValue) -> f64 {
    match v {
        WireValue::Number(n) => *n,
        WireValue::Integer(i) => *i as f64,
        other => panic!("not a number: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ven_follows_real_vtn_events_reports_and_skips_malformed_ones() {
    let _serial = SERIAL.lock().await;
    tokio::time::timeout(TEST_LIMIT, run())
        .await
        .expect("test finished in time");
}

async fn run() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(std::env::var("RUST_LOG").unwrap_or_default())
        .with_test_writer()
        .try_init();
    let dir = temp_dir("openadr");
    let vtn = Vtn::up(&dir.join("vtn"));
    let url = vtn.var("VTN_URL").to_string();
    let ven_name = vtn.var("VEN_NAME").to_string();

    // --- the site, the driver, the site meter ---
    let site = Site::start(SiteConfig {
        counts: vec![
            (Firmware::LuxOs, 9),
            (Firmware::BraiinsOs, 9),
            (Firmware::Whatsminer, 9),
            (Firmware::Vnish, 9),
        ],
        time_scale: 1.0 / SPEED,
        subnet: (71, 0),
        worker_prefix: "oadr".into(),
        ..SiteConfig::default()
    })
    .await
    .map(std::sync::Arc::new)
    .expect("site starts");
    let h = start_driver(&site, &dir).await;
    assert!(
        h.wait_for(Duration::from_secs(20), |s| s.measured_kw.is_some())
            .await
            .is_some(),
        "first telemetry round"
    );
    let base_kw = site_kw(&site);
    let (kw_tx, kw_rx) = watch::channel(base_kw);
    let meter = {
        let site = site.clone();
        tokio::spawn(async move {
            loop {
                let kw = site_kw(&site);
                if kw_tx.send(kw).is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };

    // --- bad credentials: a clear error, no signal ---
    let (bad_tx, mut bad_rx) = tokio::sync::mpsc::channel(8);
    let bad = spawn_ven(
        VenConfig::new(&url, vtn.var("VEN_CLIENT_ID"), "wrong-secret", &ven_name),
        bad_tx,
        kw_rx.clone(),
    );
    let s = bad
        .wait_for(Duration::from_secs(10), |s| s.last_error.is_some())
        .await
        .expect("an error for bad credentials");
    println!("openadr: bad credentials -> {:?}", s.last_error);
    assert!(s.last_error.unwrap().contains("refused client"));
    assert!(!s.connected);
    bad.stop().await;
    assert!(bad_rx.try_recv().is_err());

    // --- the VEN ---
    let mut cfg = VenConfig::new(
        &url,
        vtn.var("VEN_CLIENT_ID"),
        vtn.var("VEN_CLIENT_SECRET"),
        &ven_name,
    );
    cfg.report_interval = Duration::from_secs(1);
    let ven: VenHandle = spawn_ven(cfg, h.signals(), kw_rx.clone());
    let s = ven
        .wait_for(Duration::from_secs(15), |s| s.connected && s.websocket)
        .await
        .unwrap_or_else(|| panic!("VEN connected with websocket: {:?}", ven.status()));
    println!("openadr: VEN up, websocket {}", s.websocket);

    // --- the utility ---
    let bl = Client::<BusinessLogic>::with_url(
        url.parse().expect("VTN url"),
        Some(ClientCredentials::new(
            vtn.var("BL_CLIENT_ID").into(),
            vtn.var("BL_CLIENT_SECRET").into(),
        )),
    );
    let program = bl
        .create_program(ProgramRequest::new("gridproxy-dr"))
        .await
        .expect("create program");

    // 1. A capacity limit at 60 % of the site's draw, starting now.
    let target1 = (0.6 * base_kw * 10.0).round() / 10.0;
    let t0 = Instant::now();
    let ev1 = program
        .create_event(limit_event(&program, "cap-60", &ven_name, target1, "KW"))
        .await
        .expect("create event 1");
    let id1 = ev1.id().to_string();
    let applied = ven
        .wait_for(DEADLINE_REAL, |s| s.applied.contains_key(&id1))
        .await
        .map(|_| t0.elapsed());
    let within1 = time_to_limit(&site, target1, t0, DEADLINE_REAL).await;
    println!(
        "openadr: site {base_kw:.1} kW, limit {target1:.1} kW: VEN applied after {:?}, site \
         within the limit after {:?} (wall; deadline {DEADLINE_REAL:?}), now {:.1} kW; {} \
         notifications, {} syncs",
        applied,
        within1,
        site_kw(&site),
        ven.status().notifications,
        ven.status().syncs
    );
    assert!(
        applied.is_some(),
        "VEN never applied event {id1}: {:?}",
        ven.status()
    );
    assert!(
        within1.is_some(),
        "site at {:.1} kW {DEADLINE_REAL:?} after the event (limit {target1:.1})",
        site_kw(&site)
    );
    assert!(
        ven.status().notifications >= 1,
        "the event came by websocket"
    );

    // 2. Reports, read back as the utility.
    assert!(
        ven.wait_for(Duration::from_secs(10), |s| s.reports_sent >= 3)
            .await
            .is_some(),
        "reports sent: {:?}",
        ven.status()
    );
    let reports = ev1.get_report_list(None).await.expect("list reports");
    assert_eq!(reports.len(), 1, "one report per event, updated in place");
    let r = reports[0].content();
    assert_eq!(r.client_name, ven_name);
    let intervals = &r.resources[0].intervals;
    let series = |ty: &str| -> Vec<f64> {
        intervals
            .iter()
            .map(|iv| {
                let p = iv
                    .payloads
                    .iter()
                    .find(|p| p.value_type.0 == ty)
                    .unwrap_or_else(|| panic!("{ty} payload"));
                number(&p.values[0])
            })
            .collect()
    };
    let demand = series("DEMAND");
    let usage = series("USAGE");
    let baseline = series("BASELINE");
    println!(
        "openadr: report {} via the VTN: {} intervals, DEMAND {:?} kW, USAGE last {:.4} kWh, \
         BASELINE {:.1} kW",
        reports[0].id(),
        intervals.len(),
        demand,
        usage.last().copied().unwrap_or_default(),
        baseline[0]
    );
    assert!(intervals.len() >= 2);
    assert!(
        (baseline[0] - base_kw).abs() <= 0.1 * base_kw,
        "baseline {} vs site {base_kw}",
        baseline[0]
    );
    assert!(demand.iter().all(|&d| d > 0.0 && d <= base_kw * 1.05));
    assert!(
        *demand.last().unwrap() <= target1 * 1.01,
        "last DEMAND above the limit"
    );
    assert!(usage
        .iter()
        .zip(&demand)
        .all(|(u, d)| *u > 0.0 && *u < d / 3600.0 * 10.0));

    // 3. A malformed event next to a valid one: the valid one applies.
    let target2 = (0.4 * base_kw * 10.0).round() / 10.0;
    let t2 = Instant::now();
    let bad_ev = program
        .create_event(limit_event(
            &program,
            "cap-kwh",
            &ven_name,
            0.1 * base_kw,
            "KWH",
        ))
        .await
        .expect("VTN accepts the malformed event");
    let ev2 = program
        .create_event(limit_event(&program, "cap-40", &ven_name, target2, "KW"))
        .await
        .expect("create event 2");
    let (bad_id, id2) = (bad_ev.id().to_string(), ev2.id().to_string());
    let within2 = time_to_limit(&site, target2, t2, DEADLINE_REAL).await;
    let s = ven
        .wait_for(Duration::from_secs(5), |s| {
            s.applied.contains_key(&id2) && s.skipped.contains_key(&bad_id)
        })
        .await
        .unwrap_or_else(|| panic!("VEN status: {:?}", ven.status()));
    println!(
        "openadr: malformed event {bad_id} skipped: {}; limit {target2:.1} kW reached after {:?} \
         (wall), site {:.1} kW",
        s.skipped[&bad_id],
        within2,
        site_kw(&site)
    );
    assert!(s.skipped[&bad_id].contains("units KWH"));
    assert!(!s.applied.contains_key(&bad_id));
    assert!(
        within2.is_some(),
        "site at {:.1} kW, limit {target2:.1}",
        site_kw(&site)
    );
    // The malformed 10 % limit was not obeyed.
    assert!(site_kw(&site) > 0.2 * base_kw);

    // 4. The utility cancels event 1 by cutting its window short (it ends
    // now) and deletes event 2 (after its reports: the VTN refuses to delete
    // an event with reports) and the malformed one: the fleet comes back.
    let t3 = Instant::now();
    let mut ev1 = ev1;
    let period = ev1
        .content_mut()
        .interval_period
        .as_mut()
        .expect("event 1 has an intervalPeriod");
    let ran = (chrono::Utc::now() - period.start).num_seconds().max(0) + 1;
    period.duration = Some(format!("PT{ran}S").parse().expect("ISO 8601 duration"));
    ev1.update().await.expect("cancel event 1 (end it now)");
    for r in ev2.get_report_list(None).await.expect("reports of event 2") {
        r.delete().await.expect("delete a report of event 2");
    }
    ev2.delete().await.expect("delete event 2");
    bad_ev.delete().await.expect("delete the malformed event");
    let ended = ven
        .wait_for(Duration::from_secs(5), |s| {
            !s.applied.contains_key(&id2) && s.skipped.is_empty()
        })
        .await
        .map(|_| t3.elapsed());
    let restored = {
        let mut at = None;
        while t3.elapsed() < Duration::from_secs(30) {
            if site_kw(&site) >= 0.98 * base_kw {
                at = Some(t3.elapsed());
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        at
    };
    println!(
        "openadr: event 1 cut short, event 2 deleted: VEN saw it after {ended:?}, site back to \
         {:.1} kW after {restored:?} (wall)",
        site_kw(&site)
    );
    assert!(ended.is_some(), "VEN status: {:?}", ven.status());
    assert!(
        restored.is_some(),
        "site at {:.1} of {base_kw:.1} kW",
        site_kw(&site)
    );

    let st = ven.status();
    println!(
        "openadr: VEN: {} syncs, {} notifications, {} signals, {} reports",
        st.syncs, st.notifications, st.signals_sent, st.reports_sent
    );
    ven.stop().await;
    meter.abort();
    let report = h.shutdown().await.expect("driver stops");
    assert_eq!(report.status.failed, 0, "{:?}", report.status);
    site.stop();
    drop(vtn);
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ven_reports_an_unreachable_vtn_and_keeps_retrying() {
    // A loopback port nobody listens on.
    let port = free_port();
    let (tx, _rx) = tokio::sync::mpsc::channel(8);
    let (_kw_tx, kw_rx) = watch::channel(0.0);
    let mut cfg = VenConfig::new(
        &format!("http://127.0.0.1:{port}"),
        "ven",
        "secret",
        "ven-1",
    );
    cfg.backoff_max = Duration::from_secs(1);
    let ven = spawn_ven(cfg, tx, kw_rx);
    let mut errors = 0;
    let mut rx = ven.watch();
    let t = Instant::now();
    while errors < 2 && t.elapsed() < Duration::from_secs(10) {
        if tokio::time::timeout(Duration::from_secs(5), rx.changed())
            .await
            .is_err()
        {
            break;
        }
        if rx.borrow().last_error.is_some() {
            errors += 1;
        }
    }
    let s = ven.status();
    println!("openadr: unreachable VTN -> {:?}", s.last_error);
    assert!(errors >= 2, "retried: {errors} errors seen");
    assert!(s.last_error.unwrap().contains("VTN unreachable"));
    assert!(!s.connected);
    ven.stop().await;
}
