//! `/metrics`: passes `promtool check metrics` (Debian `prometheus`, installed
//! by `scripts/browser.sh install`), carries the series operators need, and
//! keeps per-worker cardinality bounded.

use gridproxy::api::client;
use gridproxy::site::handle::*;
use gridproxy_fixtures::stats::MinerStats;
use gridproxy_fixtures::sv1_miner::{self, Sv1MinerConfig};
use gridproxy_fixtures::sv1_pool::{self, Sv1PoolConfig};
use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

fn promtool() -> String {
    let p = std::env::var("PROMTOOL").unwrap_or_else(|_| "/usr/bin/promtool".into());
    assert!(
        std::path::Path::new(&p).exists(),
        "{p} not found: run `bash scripts/browser.sh install` (Debian package prometheus)"
    );
    p
}

fn promtool_check(text: &str) -> (bool, String) {
    let mut child = Command::new(promtool())
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let msg = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), msg)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_pass_promtool_and_bound_worker_series() {
    let _gate = gridproxy_tests::module_gate(module_path!());
    let stop = CancellationToken::new();
    let pool = sv1_pool::spawn(
        "127.0.0.1:0".parse().unwrap(),
        Sv1PoolConfig {
            difficulty: 1.0 / (1u64 << 22) as f64,
            ..Default::default()
        },
        stop.clone(),
    )
    .await
    .unwrap();
    let text = format!(
        "[[pools]]\nname = \"local\"\naddress = \"{}\"\nprotocol = \"sv1\"\nuser = \"acct\"\n\n[listen]\nsv1 = \"127.0.0.1:0\"\n\n[difficulty]\ninitial = 2.384185791015625e-7\nmin = 1e-9\n\n[api]\nlisten = \"127.0.0.1:0\"\nmetrics_max_workers = 3\nsample_secs = 1\n",
        pool.addr()
    );
    let cfg = gridproxy::Config::parse(&text, "t.toml").unwrap();
    let app = gridproxy_tests::start_app(cfg, None).await;
    let proxy = app.proxy.clone();
    let site = app.site_handle.clone();
    let server = app.api.clone().expect("[api] listen is set");
    let stats = Arc::new(MinerStats::default());
    for i in 0..6 {
        let mut m = Sv1MinerConfig::new(proxy.sv1_addr.unwrap(), format!("acct.rig-{i}"));
        m.hashrate = 1000.0 * (i + 1) as f64;
        tokio::spawn(sv1_miner::run(m, stats.clone(), stop.clone()));
    }
    // A curtailment driver's view of the site, and command latencies.
    site.publish(SiteState {
        site_kw: 812.5,
        target_kw: Some(900.0),
        expected_kw: 800.0,
        nominal_kw: 1600.0,
        price_usd_per_mwh: Some(2400.0),
        mode: "dr_event".into(),
        fleet_ths: 50_000.0,
        miners_total: 6,
        miners_curtailed: 2,
        events: vec![DrEventView {
            id: "ev-1".into(),
            state: "active".into(),
            target: "limit 900 kW".into(),
            limit_kw: Some(900.0),
            start_ms: 1,
            end_ms: None,
        }],
        commands: CommandCounts {
            issued: 10,
            verified: 9,
            failed: 1,
        },
        ..Default::default()
    });
    for (a, s) in [
        ("sleep", 0.004),
        ("sleep", 0.3),
        ("set_power_target", 1.2),
        ("park", 0.0001),
    ] {
        server.metrics.command_latency(a, "ok", s);
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let body = loop {
        let r = client::request(
            server.addr,
            "GET",
            "/metrics",
            None,
            None,
            Duration::from_secs(5),
        )
        .await
        .unwrap();
        assert_eq!(r.status, 200);
        assert!(r
            .header("content-type")
            .is_some_and(|c| c.starts_with("text/plain")));
        let body = r.text();
        let workers_with_rate = body
            .lines()
            .filter(|l| {
                l.starts_with("gridproxy_worker_hashrate_hashes_per_second{") && !l.ends_with(" 0")
            })
            .count();
        if workers_with_rate >= 4 || tokio::time::Instant::now() > deadline {
            break body;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let (ok, msg) = promtool_check(&body);
    assert!(
        ok,
        "promtool check metrics failed:\n{msg}\n--- metrics ---\n{body}"
    );

    for series in [
        "gridproxy_hashrate_hashes_per_second ",
        "gridproxy_shares_total{result=\"accepted\"}",
        "gridproxy_shares_total{result=\"stale_job\"}",
        "gridproxy_pool_shares_total{pool=\"local\",result=\"accepted\"}",
        "gridproxy_pool_shares_submitted_total{pool=\"local\"}",
        "gridproxy_pool_work_total{pool=\"local\"}",
        "gridproxy_work_total ",
        "gridproxy_worker_work_total{worker=",
        "gridproxy_build_info{version=",
        "process_open_fds ",
        "process_max_fds ",
        "process_resident_memory_bytes ",
        "# TYPE gridproxy_job_fanout_seconds histogram",
        "gridproxy_job_fanout_seconds_bucket{le=\"+Inf\"} ",
        "gridproxy_pool_up{pool=\"local\"} 1",
        "gridproxy_site_power_watts 812500",
        "gridproxy_site_target_power_watts 900000",
        "gridproxy_energy_price_usd_per_megawatt_hour 2400",
        "gridproxy_dr_events_active 1",
        "gridproxy_curtail_command_latency_seconds_bucket{action=\"sleep\",outcome=\"ok\",le=\"0.005\"} 1",
        "# HELP gridproxy_site_power_watts",
        "# TYPE gridproxy_shares_total counter",
    ] {
        assert!(body.contains(series), "missing {series:?} in\n{body}");
    }
    // `submitted` has a family of its own: summing a result label never
    // double-counts.
    assert!(!body.contains("result=\"submitted\""), "{body}");
    // Work is counted: accepted shares' difficulty.
    let work: f64 = body
        .lines()
        .find_map(|l| l.strip_prefix("gridproxy_work_total "))
        .and_then(|v| v.trim().parse().ok())
        .expect("gridproxy_work_total");
    assert!(work > 0.0, "no work counted: {work}");
    // Bounded cardinality: 3 named workers + "_other".
    let named: std::collections::BTreeSet<&str> = body
        .lines()
        .filter(|l| l.starts_with("gridproxy_worker_hashrate_hashes_per_second{"))
        .filter_map(|l| l.split('"').nth(1))
        .collect();
    assert!(named.contains("_other"), "{named:?}");
    assert!(named.len() <= 4, "{named:?}");
    assert!(
        named
            .iter()
            .all(|n| *n == "_other" || n.starts_with("acct.rig-")),
        "{named:?}"
    );

    // Every series the Grafana dashboard queries exists.
    let grafana = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../grafana/gridproxy.json"
    ))
    .unwrap();
    let dash: serde_json::Value = serde_json::from_str(&grafana).unwrap();
    let mut names = std::collections::BTreeSet::new();
    for p in dash["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().unwrap() {
            let e = t["expr"].as_str().unwrap();
            for (i, _) in e.match_indices("gridproxy_") {
                let n: String = e[i..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                names.insert(n);
            }
        }
    }
    assert!(names.len() >= 15, "{names:?}");
    for n in &names {
        assert!(
            body.lines()
                .any(|l| l.starts_with(n.as_str()) && l[n.len()..].starts_with(['{', ' '])),
            "grafana/gridproxy.json queries {n}, which /metrics lacks"
        );
    }

    // A broken exposition is caught by the same check (the checker works).
    let (ok, _) = promtool_check("# TYPE x counter\nx_total{a=\"1\" 2\n");
    assert!(!ok);
    stop.cancel();
    proxy.stop.cancel();
}

#[test]
fn alert_rules_pass_promtool_check_and_their_tests() {
    let _gate = gridproxy_tests::module_gate(module_path!());
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../grafana");
    for args in [
        vec!["check", "rules", "alerts.yml"],
        vec!["test", "rules", "alerts_test.yml"],
    ] {
        let out = Command::new(promtool())
            .args(&args)
            .current_dir(dir)
            .output()
            .expect("run promtool");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "promtool {args:?}:\n{text}");
        assert!(text.contains("SUCCESS"), "promtool {args:?}:\n{text}");
    }
}
