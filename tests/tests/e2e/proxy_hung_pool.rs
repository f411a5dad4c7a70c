//! A pool that hangs (stopped with SIGSTOP: its sockets stay open, nothing
//! comes back) is failed over within `no_job_timeout_secs`, every miner gets
//! a backup job on its existing connection, and none disconnects.

use crate::proxy_pool::proxy_config;
use gridproxy_fixtures::stats::MinerStats;
use gridproxy_fixtures::sv1_miner::{self, Sv1MinerConfig};
use gridproxy_fixtures::tp::TpConfig;
use gridproxy_tests::*;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Sends `sig` to `pid` with kill(1).
fn signal(pid: u32, sig: &str) {
    let ok = std::process::Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "kill {sig} {pid}");
}

/// Resumes the stopped pool even when the test fails, so it can be killed.
struct Resume(u32);
impl Drop for Resume {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-CONT", &self.0.to_string()])
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_pool_is_failed_over_within_no_job_timeout() {
    let _gate = module_gate(module_path!());
    // Templates every 2 s: a live pool sends a job well inside the timeout.
    let tp_cfg = || TpConfig {
        template_interval: Duration::from_secs(2),
        new_tip_on_solution: false,
        ..Default::default()
    };
    let (tp_a, tp_b) = (start_tp_with(tp_cfg()).await, start_tp_with(tp_cfg()).await);
    let primary = start_pool(tp_a.addr()).await;
    let backup = start_pool(tp_b.addr()).await;
    let key = primary.authority_pubkey.to_string();
    let no_job = 8;
    let proxy = start_proxy(proxy_config(
        &[
            ("primary", primary.addr, &key, 0, 1.0),
            ("backup", backup.addr, &key, 1, 1.0),
        ],
        &format!("no_job_timeout_secs = {no_job}\nfailback_cooldown_secs = 600\n"),
    ))
    .await
    .unwrap();
    let n = 10;
    let stop = tokio_util::sync::CancellationToken::new();
    let each: Vec<Arc<MinerStats>> = (0..n).map(|_| Arc::default()).collect();
    for (i, st) in each.iter().enumerate() {
        let mut cfg = Sv1MinerConfig::new(proxy.sv1_addr.unwrap(), format!("hung.{i}"));
        cfg.hashrate = 20_000.0;
        tokio::spawn(sv1_miner::run(cfg, st.clone(), stop.clone()));
    }
    let pools = proxy.ctx.router.pools().to_vec();
    let (a, b) = (pools[0].stats.clone(), pools[1].stats.clone());
    assert!(
        wait_until(Duration::from_secs(60), || a.accepted.get() >= 5).await,
        "the primary got no shares"
    );
    // Live for longer than the timeout: a pool that keeps sending jobs is
    // not failed over.
    let jobs_a = a.jobs.get();
    assert!(
        wait_until(Duration::from_secs(30), || a.jobs.get() >= jobs_a + 5).await,
        "the primary sent no jobs"
    );
    assert_eq!(
        b.submitted.get(),
        0,
        "failed over while the primary was live"
    );

    let jobs_before: Vec<u64> = each.iter().map(|m| m.jobs.get()).collect();
    let _resume = Resume(primary.process.pid());
    signal(primary.process.pid(), "-STOP");
    let t0 = Instant::now();
    let all_moved = wait_until(Duration::from_secs(no_job + 10), || {
        each.iter()
            .zip(&jobs_before)
            .all(|(m, before)| m.jobs.get() > *before)
    })
    .await;
    let took = t0.elapsed();
    println!(
        "hung pool: every miner on the backup {took:?} after SIGSTOP (no_job_timeout {no_job} s)"
    );
    assert!(
        all_moved,
        "not every miner got a backup job within {} s: jobs before {jobs_before:?}, now {:?}; backup submitted {}; primary error {:?}",
        no_job + 10,
        each.iter().map(|m| m.jobs.get()).collect::<Vec<_>>(),
        b.submitted.get(),
        a.last_error()
    );
    assert!(
        took <= Duration::from_secs(no_job + 3),
        "failover took {took:?}, more than no_job_timeout + 3 s"
    );
    let why = a.last_error().unwrap_or_default();
    assert!(why.contains("no job"), "primary's recorded error: {why:?}");
    assert!(
        wait_until(Duration::from_secs(60), || b.accepted.get() >= 5).await,
        "the backup accepted {} of {} shares forwarded to it; its last error {:?}",
        b.accepted.get(),
        b.submitted.get(),
        b.last_error()
    );
    let connects: u64 = each.iter().map(|m| m.connects.get()).sum();
    let disconnects: u64 = each.iter().map(|m| m.disconnects.get()).sum();
    assert_eq!((connects, disconnects), (n as u64, 0), "miners reconnected");
    stop.cancel();
    proxy.stop.cancel();
}
