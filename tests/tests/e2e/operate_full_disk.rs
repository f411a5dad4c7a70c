//! The ledger on a full disk, with the real binary and a real broker.
//!
//! gridproxy runs with SIGXFSZ ignored and, once its ledger exists, a
//! file-size limit (RLIMIT_FSIZE, set with prlimit) just above the ledger's
//! size: a write past it fails with EFBIG, as a write to a full disk fails
//! with ENOSPC. An MQTT flood of distinct dispatches is cut by the signal
//! intake (counted); what passes fills the ledger to the limit. Then
//! `/healthz` answers 503 naming the ledger, `/metrics` counts the write
//! errors, and after `ledger_fault_secs` the site goes to its configured safe
//! state (`curtail_all`): every miner asleep, not left deaf.

use std::process::Command;
use std::time::{Duration, Instant};

use crate::mqtt_support::Mosquitto;
use crate::operate_site::{config_text, gridproxy_bin, DISPATCH};
use gridproxy_fixtures::site::{Firmware, Site, SiteConfig};
use gridproxy_fixtures::sv1_pool::{self, Sv1PoolConfig};
use gridproxy_tests::bench::{asleep, temp_dir};
use gridproxy_tests::{free_addr, http_get, metric_sum, wait_until, PeerProcess};
use tokio_util::sync::CancellationToken;

/// `/healthz`: (status code, body), or None when it does not answer.
async fn healthz(api: std::net::SocketAddr) -> Option<(u16, String)> {
    let r =
        gridproxy::api::client::request(api, "GET", "/healthz", None, None, Duration::from_secs(3))
            .await
            .ok()?;
    Some((r.status, r.text()))
}

fn file_len(p: &std::path::Path) -> u64 {
    std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_under_an_mqtt_flood_reaches_the_safe_state_and_healthz_says_so() {
    let _gate = gridproxy_tests::module_gate(module_path!());
    let bin = gridproxy_bin();
    tokio::time::timeout(Duration::from_secs(150), run(bin))
        .await
        .expect("test finished in time");
}

async fn run(bin: std::path::PathBuf) {
    let broker = Mosquitto::start("full-disk").await;
    let stop = CancellationToken::new();
    let _stop = stop.clone().drop_guard();
    let pool = sv1_pool::spawn(
        "127.0.0.1:0".parse().unwrap(),
        Sv1PoolConfig {
            difficulty: 1.0 / (1u64 << 22) as f64,
            ..Default::default()
        },
        stop.clone(),
    )
    .await
    .expect("fixture pool");
    let (sv1, api) = (free_addr(), free_addr());
    let site = Site::start(SiteConfig {
        counts: vec![
            (Firmware::LuxOs, 2),
            (Firmware::BraiinsOs, 2),
            (Firmware::Whatsminer, 2),
            (Firmware::Vnish, 2),
        ],
        time_scale: 0.1,
        subnet: (77, 0),
        password: "site-secret-pw".into(),
        worker_prefix: "fulldisk".into(),
        pool: Some(sv1),
        sv1_hashrate: 200.0,
        follow_every: Duration::from_millis(100),
        ..SiteConfig::default()
    })
    .await
    .expect("emulators start");
    let n = site.len();
    let dir = temp_dir("full-disk");
    let cfg_path = dir.join("gridproxy.toml");
    let text = config_text(pool.addr(), sv1, api, &site, broker.port).replacen(
        "[site]\nledger = \"ledger.sqlite\"\n",
        "[site]\nledger = \"ledger.sqlite\"\nledger_fault_secs = 3\non_ledger_fault = \"curtail_all\"\n",
        1,
    );
    assert!(text.contains("on_ledger_fault"), "the [site] table moved");
    std::fs::write(&cfg_path, text).unwrap();
    let ledger = dir.join("ledger.sqlite");

    // SIG_IGN survives exec: past the limit a write fails instead of the
    // signal killing the process.
    let mut cmd = Command::new("sh");
    cmd.args(["-c", "trap '' XFSZ; exec \"$0\" \"$@\""])
        .arg(&bin)
        .args(["run", "--status-every", "0", "--config"])
        .arg(&cfg_path)
        .env("OPERATE_SITE_MQTT_PASSWORD", crate::mqtt_support::PASSWORD)
        .env("RUST_LOG", "warn");
    let mut proxy = PeerProcess::spawn("gridproxy", PeerProcess::make_dir("full-disk"), cmd);
    let up = Instant::now();
    loop {
        if let Some((200, _)) = healthz(api).await {
            if file_len(&ledger) > 0 {
                break;
            }
        }
        assert!(
            up.elapsed() < Duration::from_secs(20) && proxy.is_running(),
            "gridproxy did not come up:\n{}",
            proxy.log_tail(3000)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        wait_until(Duration::from_secs(20), || site.sv1_running() == n).await,
        "SV1 miners running: {}/{n}",
        site.sv1_running()
    );

    // The disk fills: no file may grow past a little more than the ledger is.
    let wal = dir.join("ledger.sqlite-wal");
    let limit = file_len(&ledger).max(file_len(&wal)) + 48 * 1024;
    let set = Command::new("prlimit")
        .arg(format!("--pid={}", proxy.pid()))
        .arg(format!("--fsize={limit}"))
        .status()
        .expect("run prlimit");
    assert!(set.success(), "prlimit --fsize failed");

    // The flood: distinct dispatches (none a duplicate) well above the
    // site's power, so they change nothing the fleet does.
    let mut k = 0;
    let flooded = Instant::now();
    let failing = loop {
        let batch: Vec<String> = (k..k + 500)
            .map(|i| format!("{{\"id\":\"flood-{i}\",\"target_kw\":{}}}", 100_000 + i))
            .collect();
        k += 500;
        broker.publish_lines(DISPATCH, &batch);
        match healthz(api).await {
            Some((503, body)) => break body,
            Some(_) => {}
            None => panic!("/healthz did not answer:\n{}", proxy.log_tail(3000)),
        }
        assert!(
            flooded.elapsed() < Duration::from_secs(60),
            "the ledger never failed after {k} flood messages (limit {limit} bytes, ledger {} bytes)",
            file_len(&ledger)
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    println!(
        "full disk: /healthz 503 after {k} flood messages in {:.1} s: {failing}",
        flooded.elapsed().as_secs_f64()
    );
    assert!(failing.contains("ledger writes failing"), "{failing}");
    assert!(
        proxy.is_running(),
        "gridproxy exited:\n{}",
        proxy.log_tail(3000)
    );

    // After ledger_fault_secs: the safe state, every miner asleep. The
    // flood has stopped; the fleet's own records keep the disk full.
    let engaged = Instant::now();
    let body = loop {
        let (code, body) = healthz(api).await.expect("/healthz answers");
        if code == 503 && body.contains("safe state") {
            break body;
        }
        assert!(
            engaged.elapsed() < Duration::from_secs(30),
            "no ledger-fault safe state 30 s after the first 503; /healthz {code} {body}\n{}",
            proxy.log_tail(3000)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    println!("full disk: {body}");
    let all_asleep = wait_until(Duration::from_secs(30), || site.miners().iter().all(asleep)).await;
    assert!(
        all_asleep,
        "{} of {n} miners asleep in the ledger-fault safe state\n{}",
        site.miners().iter().filter(|m| asleep(m)).count(),
        proxy.log_tail(3000)
    );
    let metrics = http_get(api, "/metrics").await.expect("/metrics answers");
    for (name, what) in [
        ("gridproxy_ledger_failing", "the ledger reported failing"),
        (
            "gridproxy_ledger_write_errors_total",
            "write errors counted",
        ),
        (
            "gridproxy_ledger_unrecorded_commands_total",
            "unrecorded commands counted",
        ),
    ] {
        assert!(
            metrics.lines().any(|l| l.starts_with(name)) && metric_sum(&metrics, name) >= 1.0,
            "{what}: {name} missing or zero"
        );
    }
    let limited: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("gridproxy_site_signals_total") && l.contains("rate_limited"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    println!("full disk: {limited} flood signals cut by the intake's rate limit before the ledger");
    assert!(
        limited > 0.0,
        "the flood was not rate-limited before the ledger"
    );
    proxy.kill();
}
