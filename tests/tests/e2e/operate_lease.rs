//! Two instances, one site (issue 19): two `gridproxy run` processes share
//! a PostgreSQL ledger and a `[site.lease]`; only the lease holder runs the
//! curtailment engine (and its MQTT client). An MQTT dispatch to 0 % is met
//! by the first; it is killed with SIGKILL; the second takes the lease
//! within its term, wakes nobody, and acts on the next dispatch. A new
//! first instance then takes the lease from the second while that one is
//! paused (SIGSTOP); resumed, the second gives up. The ledger's command ids
//! are gapless across both handovers, each command carries the token of
//! the lease it was issued under, and `gridproxy report` reads it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::mqtt_support::{Mosquitto, Recorder, PASSWORD};
use crate::operate_site::{config_text, gridproxy_bin, DISPATCH};
use gridproxy_curtail::driver::Audit;
use gridproxy_curtail::ledger::Location;
use gridproxy_fixtures::site::{Firmware, Site, SiteConfig};
use gridproxy_fixtures::sv1_pool::{self, Sv1PoolConfig};
use gridproxy_tests::bench::{asleep, temp_dir};
use gridproxy_tests::postgres::PgCluster;
use gridproxy_tests::{free_addr, http_get, metric_sum, wait_until, PeerProcess};
use serde_json::json;
use tokio_util::sync::CancellationToken;

const ACK: &str = "site/op1/ack";
const LEASE_SECS: u64 = 3;

fn now_secs() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_share_a_site_through_the_lease() {
    let _gate = gridproxy_tests::module_gate(module_path!());
    let bin = gridproxy_bin();
    let pg = tokio::task::spawn_blocking(|| PgCluster::start("lease-site", "site_ledger"))
        .await
        .expect("postgres");
    tokio::time::timeout(Duration::from_secs(180), run(bin, &pg))
        .await
        .expect("test finished in time");
}

fn signal(pid: u32, sig: &str) {
    assert!(Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()
        .unwrap()
        .success());
}

/// `gridproxy_site_lease_held` from an instance's `/metrics` (absent: a
/// failure, not a zero).
async fn lease_held(api: SocketAddr) -> f64 {
    let text = http_get(api, "/metrics").await.expect("/metrics answers");
    assert!(
        text.contains("gridproxy_site_lease_held "),
        "no lease gauge in /metrics"
    );
    metric_sum(&text, "gridproxy_site_lease_held")
}

struct Instance {
    cfg: PathBuf,
}

impl Instance {
    fn write(dir: &std::path::Path, name: &str, text: String, pg: &PgCluster) -> Instance {
        let text = text
            .replace(
                "ledger = \"ledger.sqlite\"",
                &format!("ledger = \"{}\"", pg.url()),
            )
            .replace(
                "\n[site.signals.mqtt]",
                &format!(
                    "\n[site.lease]\nsite_id = \"op1\"\ninstance = \"{name}\"\nsecs = {LEASE_SECS}\n\n[site.signals.mqtt]"
                ),
            );
        assert!(text.contains("[site.lease]") && text.contains("postgres://"));
        let cfg = dir.join(format!("{name}.toml"));
        std::fs::write(&cfg, text).unwrap();
        Instance { cfg }
    }

    fn start(&self, bin: &PathBuf, name: &str, pg: &PgCluster) -> PeerProcess {
        let mut cmd = Command::new(bin);
        cmd.args(["run", "--status-every", "0", "--config"])
            .arg(&self.cfg)
            .env("OPERATE_SITE_MQTT_PASSWORD", PASSWORD)
            .env("GRIDPROXY_LEDGER_PASSWORD", &pg.password)
            .env("RUST_LOG", "info");
        PeerProcess::spawn(name, PeerProcess::make_dir(name), cmd)
    }
}

async fn run(bin: PathBuf, pg: &PgCluster) {
    let broker = Mosquitto::start("lease-site").await;
    let rec = Recorder::start(broker.port, "lease-site-recorder", &[ACK]);
    let stop = CancellationToken::new();
    let _stop_guard = stop.clone().drop_guard();
    let pool = sv1_pool::spawn(
        "127.0.0.1:0".parse().unwrap(),
        Sv1PoolConfig {
            name: "pool".into(),
            difficulty: 1.0 / (1u64 << 22) as f64,
            job_interval: Duration::from_secs(10),
            block_interval: Duration::from_secs(60),
            ..Default::default()
        },
        stop.clone(),
    )
    .await
    .expect("fixture pool");
    let (sv1_a, api_a, sv1_b, api_b): (SocketAddr, _, SocketAddr, _) =
        (free_addr(), free_addr(), free_addr(), free_addr());
    // Firmware-controlled miners only: they sleep whichever instance
    // commands them (parking acts on the proxy a miner is connected to).
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
        worker_prefix: "lease".into(),
        pool: Some(sv1_a),
        sv1_hashrate: 200.0,
        follow_every: Duration::from_millis(100),
        ..SiteConfig::default()
    })
    .await
    .expect("emulators start");
    let n = site.len();
    let dir = temp_dir("operate-lease");
    let a = Instance::write(
        &dir,
        "a",
        config_text(pool.addr(), sv1_a, api_a, &site, broker.port),
        pg,
    );
    let b = Instance::write(
        &dir,
        "b",
        config_text(pool.addr(), sv1_b, api_b, &site, broker.port),
        pg,
    );

    // A takes the lease; B waits.
    let mut pa = a.start(&bin, "lease-a", pg);
    assert!(
        pa.wait_for_log("site lease acquired", Duration::from_secs(20))
            .await,
        "a did not take the lease:\n{}",
        pa.log()
    );
    assert!(
        pa.wait_for_log("MQTT dispatch: broker", Duration::from_secs(20))
            .await,
        "a did not start its sources:\n{}",
        pa.log()
    );
    let mut pb = b.start(&bin, "lease-b", pg);
    assert!(
        pb.wait_for_log("standby", Duration::from_secs(20)).await,
        "b not in standby:\n{}",
        pb.log()
    );
    assert_eq!(
        pb.count_in_log("MQTT dispatch: broker"),
        0,
        "a standby must not subscribe (signals once)"
    );
    assert_eq!(lease_held(api_a).await, 1.0, "a's /metrics");
    assert_eq!(lease_held(api_b).await, 0.0, "b's /metrics");

    // Dispatch to 0 % (retained, with its time, as a setpoint topic is):
    // A puts the fleet to sleep.
    broker.publish_retained(
        DISPATCH,
        &json!({"id": "d-zero", "target_pct": 0, "ts": now_secs()}).to_string(),
    );
    assert!(
        wait_until(Duration::from_secs(10), || rec.ack(ACK, "d-zero").is_some()).await,
        "no ack for d-zero"
    );
    assert!(
        wait_until(Duration::from_secs(30), || site.miners().iter().all(asleep)).await,
        "{} of {n} asleep under a 0 % dispatch",
        site.miners().iter().filter(|m| asleep(m)).count()
    );

    // SIGKILL A mid-event: B takes the lease within its term and wakes nobody.
    let killed = Instant::now();
    signal(pa.pid(), "KILL");
    let mut woken = 0;
    let took_over = loop {
        if pb.count_in_log("site lease acquired") > 0 {
            break killed.elapsed();
        }
        woken = woken.max(site.miners().iter().filter(|m| !asleep(m)).count());
        assert!(
            killed.elapsed() < Duration::from_secs(LEASE_SECS * 4),
            "b did not take over:\n{}",
            pb.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        pb.wait_for_log("MQTT dispatch: broker", Duration::from_secs(10))
            .await,
        "b did not start its sources after taking over:\n{}",
        pb.log()
    );
    // Watch a few seconds more: B's engine recovered who is asleep and the
    // retained dispatch still says 0 %.
    let watch = Instant::now();
    while watch.elapsed() < Duration::from_secs(4) {
        woken = woken.max(site.miners().iter().filter(|m| !asleep(m)).count());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(woken, 0, "the handover woke miners");
    assert_eq!(
        lease_held(api_b).await,
        1.0,
        "b's /metrics after taking over"
    );

    // B acts: a dispatch to 100 % wakes the fleet.
    broker.publish_retained(
        DISPATCH,
        &json!({"id": "d-full", "target_pct": 100, "ts": now_secs()}).to_string(),
    );
    assert!(
        wait_until(Duration::from_secs(10), || rec.ack(ACK, "d-full").is_some()).await,
        "b did not answer d-full:\n{}",
        pb.log_tail(3000)
    );
    assert!(
        wait_until(Duration::from_secs(30), || !site
            .miners()
            .iter()
            .any(asleep))
        .await,
        "b did not wake the fleet:\n{}",
        pb.log_tail(3000)
    );

    // B paused past its lease: a new A takes the lease and acts; B, resumed,
    // gives up without acting.
    signal(pb.pid(), "STOP");
    let mut pa2 = a.start(&bin, "lease-a2", pg);
    assert!(
        pa2.wait_for_log("site lease acquired", Duration::from_secs(LEASE_SECS * 5))
            .await,
        "a2 did not take the lease from a paused b:\n{}",
        pa2.log()
    );
    assert!(
        pa2.wait_for_log("MQTT dispatch: broker", Duration::from_secs(10))
            .await,
        "{}",
        pa2.log()
    );
    broker.publish_retained(
        DISPATCH,
        &json!({"id": "d-zero-2", "target_pct": 0, "ts": now_secs()}).to_string(),
    );
    assert!(
        wait_until(Duration::from_secs(30), || site.miners().iter().all(asleep)).await,
        "a2 did not put the fleet to sleep:\n{}",
        pa2.log_tail(3000)
    );
    signal(pb.pid(), "CONT");
    assert!(
        pb.wait_for_log("site lease lost", Duration::from_secs(LEASE_SECS * 3))
            .await,
        "b resumed without noticing:\n{}",
        pb.log_tail(3000)
    );
    // Let a2 settle, then stop both cleanly.
    for p in [&mut pa2, &mut pb] {
        signal(p.pid(), "INT");
    }
    assert!(
        wait_until(Duration::from_secs(20), || !pa2.is_running()
            && !pb.is_running())
        .await
    );

    // The ledger: gapless ids, tokens in order, one per holder.
    let loc = Location::parse(&pg.url())
        .unwrap()
        .with_password(Some(pg.password.clone()));
    let audit = Audit::read(&loc).expect("ledger");
    let ids: Vec<u64> = audit.commands.iter().map(|c| c.id.0).collect();
    assert_eq!(
        ids,
        (1..=ids.len() as u64).collect::<Vec<_>>(),
        "gapless ids"
    );
    let tokens: Vec<u64> = audit
        .commands
        .iter()
        .map(|c| c.fence.expect("every command carries its lease token"))
        .collect();
    assert!(
        tokens.windows(2).all(|w| w[0] <= w[1]),
        "tokens in order: {tokens:?}"
    );
    let mut holders = tokens.clone();
    holders.dedup();
    assert_eq!(holders.len(), 3, "a, b, a2 each commanded: {tokens:?}");
    for c in &audit.commands {
        assert!(
            audit.acks_of(c.id).any(|a| a.outcome.starts_with("ack_")),
            "command {} has no acknowledgement",
            c.id.0
        );
    }
    let hand = pg
        .psql(&pg.db, "SELECT count(*) FROM commands")
        .unwrap()
        .parse::<usize>()
        .unwrap();
    assert_eq!(hand, audit.commands.len());
    let out = Command::new(&bin)
        .args(["report", "--ledger", &pg.url()])
        .env("GRIDPROXY_LEDGER_PASSWORD", &pg.password)
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && report.contains(&format!("commands: {hand}")),
        "report: {report} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    println!(
        "operate_lease: {n} miners; SIGKILL -> b active in {:.2} s (lease {LEASE_SECS} s), 0 woken; \
         {} commands under tokens {holders:?}, ids 1..={}, all acknowledged",
        took_over.as_secs_f64(),
        audit.commands.len(),
        audit.commands.len()
    );
    drop(site);
    let _ = std::fs::remove_dir_all(&dir);
}
