//! What an SV1 pool may do to gridproxy's SV1 upstream, against the fixture
//! SV1 pool (in process, loopback): notify lines far longer than a miner's
//! (coinbases with thousands of outputs) within the pool's `max_line`;
//! `mining.set_extranonce` (after `mining.extranonce.subscribe`) and
//! `mining.set_version_mask` mid-connection, with no share sent on void
//! work; `client.reconnect` to another port of the same host, after its
//! wait, refused elsewhere; a job sent before the subscribe result; failover
//! to a backup SV1 pool and fail-back, miners kept on their connections.

use gridproxy::config::Config;
use gridproxy_fixtures::stats::MinerStats;
use gridproxy_fixtures::sv1_miner::{self, Sv1MinerConfig};
use gridproxy_fixtures::sv1_pool::{self, PoolReject, Sv1Pool, Sv1PoolConfig};
use gridproxy_proxy::Proxy;
use gridproxy_tests::*;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Pool share difficulty 2^-20: every share of the proxy's miners (2^-18)
/// goes upstream.
fn pool_cfg(job_interval: Duration) -> Sv1PoolConfig {
    Sv1PoolConfig {
        difficulty: 1.0 / (1u64 << 20) as f64,
        job_interval,
        block_interval: Duration::from_secs(3600),
        ..Default::default()
    }
}

async fn start_pool(cfg: Sv1PoolConfig, stop: &CancellationToken) -> Sv1Pool {
    sv1_pool::spawn("127.0.0.1:0".parse().unwrap(), cfg, stop.clone())
        .await
        .expect("fixture pool binds")
}

/// One SV1 pool at `address` (any form), `extra` more keys of it.
async fn start_proxy(address: &str, extra: &str) -> Proxy {
    let text = format!(
        "[[pools]]\nname = \"p\"\naddress = \"{address}\"\nprotocol = \"sv1\"\nuser = \"acct\"\n{extra}\n\n\
         [listen]\nsv1 = \"127.0.0.1:0\"\n\n\
         [difficulty]\ninitial = 0.000003814697265625\nmin = 0.000000001\n\n\
         [routing]\nreconnect_ms = 100\n"
    );
    gridproxy_tests::start_proxy(Config::parse(&text, "test").expect("valid config"))
        .await
        .expect("proxy starts")
}

fn upstream(proxy: &Proxy) -> Arc<gridproxy_proxy::stats::PoolStats> {
    proxy.ctx.router.pools()[0].stats.clone()
}

fn live(proxy: &Proxy) -> bool {
    proxy.ctx.router.pools()[0].view.borrow().live
}

/// `n` fixture miners at 5 kH/s (half roll version bits) reading lines up to `max_line`.
fn miners(
    addr: SocketAddr,
    n: usize,
    prefix: &str,
    max_line: usize,
) -> (Arc<MinerStats>, CancellationToken) {
    let stats = Arc::new(MinerStats::default());
    let stop = CancellationToken::new();
    for i in 0..n {
        let mut cfg = Sv1MinerConfig::new(addr, format!("{prefix}.{i}"));
        cfg.hashrate = 5_000.0;
        cfg.version_rolling = i % 2 == 0;
        cfg.max_line = max_line;
        tokio::spawn(sv1_miner::run(cfg, stats.clone(), stop.clone()));
    }
    (stats, stop)
}

/// Waits until the pool has accepted `more` shares over `from`.
async fn accepted_more(pool: &Sv1Pool, from: u64, more: u64, timeout: Duration) -> bool {
    wait_until(timeout, || pool.stats().accepted.get() >= from + more).await
}

fn pool_counts(pool: &Sv1Pool) -> String {
    let s = pool.stats();
    format!(
        "accepted {} stale {} low-difficulty {} invalid {} old-extranonce {} connects {}",
        s.accepted.get(),
        s.rejected(PoolReject::Stale),
        s.rejected(PoolReject::LowDifficulty),
        s.rejected(PoolReject::Invalid),
        s.old_extranonce.get(),
        s.connects.get()
    )
}

/// A coinbase with 3,000 outputs makes a notify line of ~190 KB: the
/// default per-pool `max_line` (1 MiB) takes it; `max_line = 16384` refuses
/// it with the reason as the pool's error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_notify_lines_fit_the_pool_line_limit() {
    let _gate = gridproxy_tests::module_gate(module_path!());
    let _serial = SERIAL.lock().await;
    init_tracing();
    let stop = CancellationToken::new();
    let pool = start_pool(
        Sv1PoolConfig {
            coinbase_outputs: 3000,
            ..pool_cfg(Duration::from_secs(30))
        },
        &stop,
    )
    .await;
    let roomy = start_proxy(&pool.addr().to_string(), "").await;
    let tight = start_proxy(&pool.addr().to_string(), "max_line = 16384").await;
    assert!(
        wait_until(Duration::from_secs(10), || live(&roomy)).await,
        "not live: {:?}",
        upstream(&roomy).last_error()
    );
    let (stats, miners_stop) = miners(roomy.sv1_addr.unwrap(), 4, "long.rig", 1 << 20);
    let ok = accepted_more(&pool, 0, 5, Duration::from_secs(30)).await;
    miners_stop.cancel();
    assert!(
        ok,
        "{}; miners {stats:?}; upstream error {:?}",
        pool_counts(&pool),
        upstream(&roomy).last_error()
    );
    assert_eq!(pool.stats().rejected_total(), 0, "{}", pool_counts(&pool));
    let refused = wait_until(Duration::from_secs(10), || {
        upstream(&tight)
            .last_error()
            .is_some_and(|e| e.contains("line longer than 16384 bytes"))
    })
    .await;
    assert!(
        refused && !live(&tight),
        "tight: live {} error {:?}",
        live(&tight),
        upstream(&tight).last_error()
    );
    roomy.stop.cancel();
    tight.stop.cancel();
    stop.cancel();
}

/// The pool changes every connection's extranonce1: gridproxy asked for it
/// (`mining.extranonce.subscribe`), drops the work on the old one (no share
/// of it is sent, miners start clean on the pool's next job) and goes on
/// with shares the pool accepts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_extranonce_is_honoured() {
    let _gate = gridproxy_tests::module_gate(module_path!());
    let _serial = SERIAL.lock().await;
    init_tracing();
    let stop = CancellationToken::new();
    // A new job every 8 s: from the change until the next one, the miners'
    // work is on the old extranonce1.
    let pool = start_pool(pool_cfg(Duration::from_secs(8)), &stop).await;
    let proxy = start_proxy(&pool.addr().to_string(), "").await;
    let (stats, miners_stop) = miners(proxy.sv1_addr.unwrap(), 10, "en.rig", 1 << 16);
    assert!(
        accepted_more(&pool, 0, 10, Duration::from_secs(30)).await,
        "{}",
        pool_counts(&pool)
    );
    // Right after a job reached the proxy: the longest stretch of work
    // before the next one.
    let up = upstream(&proxy);
    let jobs = up.jobs.get();
    assert!(wait_until(Duration::from_secs(10), || up.jobs.get() > jobs).await);
    assert_eq!(pool.set_extranonce(8), 1, "one connection: the proxy's");
    let sent = wait_until(Duration::from_secs(5), || {
        pool.stats().extranonce_changes_sent.get() == 1
    })
    .await;
    assert!(
        sent,
        "the pool did not send mining.set_extranonce: gridproxy did not subscribe to it"
    );
    let before = pool.stats().accepted.get();
    // Across at least two more jobs.
    let ok = accepted_more(&pool, before, 30, Duration::from_secs(60)).await;
    miners_stop.cancel();
    assert!(ok, "{}; miners {stats:?}", pool_counts(&pool));
    // At most what was in flight when the pool switched.
    assert!(
        pool.stats().old_extranonce.get() <= 2,
        "shares on the old extranonce1 sent: {}",
        pool_counts(&pool)
    );
    assert_eq!(pool.stats().connects.get(), 1, "no reconnect needed");
    assert_eq!(
        pool.stats().rejected_total(),
        pool.stats().old_extranonce.get(),
        "{}",
        pool_counts(&pool)
    );
    proxy.stop.cancel();
    stop.cancel();
}

/// The pool narrows the version mask (`1fffe000` to `1fff0000`): the
/// miners are told (the job is re-issued with the new mask), no share
/// rolled on a bit taken away is sent, and the pool keeps accepting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_version_mask_is_honoured() {
    let _gate = gridproxy_tests::module_gate(module_path!());
    let _serial = SERIAL.lock().await;
    init_tracing();
    let stop = CancellationToken::new();
    let pool = start_pool(pool_cfg(Duration::from_secs(30)), &stop).await;
    let proxy = start_proxy(&pool.addr().to_string(), "").await;
    let (stats, miners_stop) = miners(proxy.sv1_addr.unwrap(), 10, "vm.rig", 1 << 16);
    assert!(
        accepted_more(&pool, 0, 10, Duration::from_secs(30)).await,
        "{}",
        pool_counts(&pool)
    );
    assert_eq!(pool.stats().rejected_total(), 0, "{}", pool_counts(&pool));
    let view = proxy.ctx.router.pools()[0].view.clone();
    assert_eq!(
        view.borrow().job.as_ref().map(|j| j.version_mask),
        Some(0x1fff_e000)
    );
    assert_eq!(pool.set_version_mask(0x1fff_0000), 1);
    let told = wait_until(Duration::from_secs(5), || {
        view.borrow().job.as_ref().map(|j| j.version_mask) == Some(0x1fff_0000)
    })
    .await;
    assert!(told, "the job was not re-issued with the new mask");
    let before = pool.stats().accepted.get();
    // No new job from the pool meanwhile (one every 30 s): these shares are
    // on the re-issued job.
    let ok = accepted_more(&pool, before, 20, Duration::from_secs(25)).await;
    miners_stop.cancel();
    assert!(ok, "{}; miners {stats:?}", pool_counts(&pool));
    // A share in flight at the switch at most.
    assert!(
        pool.stats().rejected_total() <= 1,
        "shares rolled outside the new mask were sent: {}",
        pool_counts(&pool)
    );
    proxy.stop.cancel();
    stop.cancel();
}

/// `client.reconnect ["localhost", port of pool B, 1]` from pool A: after
/// about a second gridproxy hashes on B (same host, other port). A redirect
/// to another host is refused (gridproxy reconnects where it was); one to a
/// port where nothing listens falls back to the configured pool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_reconnect_is_followed_within_the_pool_host() {
    let _gate = gridproxy_tests::module_gate(module_path!());
    let _serial = SERIAL.lock().await;
    init_tracing();
    let stop = CancellationToken::new();
    let a = start_pool(pool_cfg(Duration::from_secs(5)), &stop).await;
    let b = start_pool(
        Sv1PoolConfig {
            name: "pool-b".into(),
            ..pool_cfg(Duration::from_secs(5))
        },
        &stop,
    )
    .await;
    let proxy = start_proxy(&format!("stratum+tcp://localhost:{}", a.addr().port()), "").await;
    let (stats, miners_stop) = miners(proxy.sv1_addr.unwrap(), 6, "rc.rig", 1 << 16);
    assert!(
        accepted_more(&a, 0, 3, Duration::from_secs(30)).await,
        "A: {}",
        pool_counts(&a)
    );

    // 1. To B, same host, after 1 s.
    let asked = tokio::time::Instant::now();
    assert_eq!(
        a.reconnect(Some("localhost"), Some(b.addr().port()), Some(1)),
        1
    );
    let moved = wait_until(Duration::from_secs(10), || b.stats().connects.get() == 1).await;
    let took = asked.elapsed();
    assert!(
        moved,
        "gridproxy did not go to B; upstream error {:?}",
        upstream(&proxy).last_error()
    );
    assert!(
        took >= Duration::from_millis(900),
        "the pool's wait of 1 s was not kept: {took:?}"
    );
    assert!(
        accepted_more(&b, 0, 3, Duration::from_secs(30)).await,
        "B: {}; miners {stats:?}",
        pool_counts(&b)
    );
    assert_eq!(a.stats().connects.get(), 1, "went back to A");

    // 2. To another host: refused, back to B (where it is).
    assert_eq!(
        b.reconnect(
            Some("elsewhere.gridproxy-test.invalid"),
            Some(a.addr().port()),
            None
        ),
        1
    );
    let stayed = wait_until(Duration::from_secs(10), || b.stats().connects.get() == 2).await;
    assert!(stayed, "B: {}", pool_counts(&b));
    assert_eq!(a.stats().connects.get(), 1);

    // 3. To a port where nothing listens: back to the configured pool, A.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    assert_eq!(b.reconnect(Some("localhost"), Some(closed), None), 1);
    let back = wait_until(Duration::from_secs(15), || a.stats().connects.get() == 2).await;
    assert!(
        back,
        "A: {}; upstream error {:?}",
        pool_counts(&a),
        upstream(&proxy).last_error()
    );
    let before = a.stats().accepted.get();
    assert!(
        accepted_more(&a, before, 3, Duration::from_secs(30)).await,
        "A: {}",
        pool_counts(&a)
    );
    miners_stop.cancel();
    proxy.stop.cancel();
    stop.cancel();
}

/// A pool that sends the difficulty and a job before answering subscribe
/// (and before authorize): gridproxy keeps the job and is live as soon as
/// it is authorized, not at the pool's next job (here a minute later).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_before_the_subscribe_result_is_kept() {
    let _gate = gridproxy_tests::module_gate(module_path!());
    let _serial = SERIAL.lock().await;
    init_tracing();
    let stop = CancellationToken::new();
    let pool = start_pool(
        Sv1PoolConfig {
            notify_before_subscribe_result: true,
            ..pool_cfg(Duration::from_secs(60))
        },
        &stop,
    )
    .await;
    let proxy = start_proxy(&pool.addr().to_string(), "").await;
    assert!(
        wait_until(Duration::from_secs(5), || live(&proxy)).await,
        "not live before the pool's next job; error {:?}",
        upstream(&proxy).last_error()
    );
    let (stats, miners_stop) = miners(proxy.sv1_addr.unwrap(), 6, "early.rig", 1 << 16);
    let ok = accepted_more(&pool, 0, 5, Duration::from_secs(30)).await;
    miners_stop.cancel();
    assert!(ok, "{}; miners {stats:?}", pool_counts(&pool));
    assert_eq!(pool.stats().rejected_total(), 0, "{}", pool_counts(&pool));
    assert_eq!(
        pool.stats().jobs.get(),
        1,
        "all on the job sent before subscribe"
    );
    proxy.stop.cancel();
    stop.cancel();
}

/// Primary and backup SV1 pools (priority 0 and 1), a fail-back cooldown of
/// 3 s, `miners` fixture miners with counters of their own (to see a
/// backup job reach every one of them).
fn failover_setup(
    primary: SocketAddr,
    backup: SocketAddr,
    miners: usize,
) -> (String, Vec<Arc<MinerStats>>) {
    let mut text = String::new();
    for (name, addr, prio) in [("primary", primary, 0), ("backup", backup, 1)] {
        text.push_str(&format!(
            "[[pools]]\nname = \"{name}\"\naddress = \"{addr}\"\nprotocol = \"sv1\"\nuser = \"acct\"\npriority = {prio}\n\n"
        ));
    }
    text.push_str(
        "[listen]\nsv1 = \"127.0.0.1:0\"\n\n\
         [difficulty]\ninitial = 0.000003814697265625\nmin = 0.000000001\n\n\
         [routing]\nreconnect_ms = 100\nfailback_cooldown_secs = 3\n",
    );
    let each = (0..miners)
        .map(|_| Arc::new(MinerStats::default()))
        .collect();
    (text, each)
}

/// Sum of one counter over per-miner stats.
fn total(each: &[Arc<MinerStats>], f: impl Fn(&MinerStats) -> u64) -> u64 {
    each.iter().map(|m| f(m)).sum()
}

/// The SV1-upstream twin of `proxy_routing`'s SV2 failover test: the
/// primary SV1 pool stops (its listener and every connection closed);
/// every miner gets a backup job on the connection it has, shares flow to
/// the backup, nobody reconnects; the primary comes back on the same port
/// and after the cooldown the miners return to it, still on their
/// connections. Both pools' own counts match what gridproxy credited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sv1_upstream_failover_to_backup_and_failback_without_reconnecting_miners() {
    let _gate = gridproxy_tests::module_gate(module_path!());
    let _serial = SERIAL.lock().await;
    init_tracing();
    let (stop_a, stop_b) = (CancellationToken::new(), CancellationToken::new());
    let primary = start_pool(pool_cfg(Duration::from_secs(30)), &stop_a).await;
    let backup = start_pool(
        Sv1PoolConfig {
            name: "backup".into(),
            ..pool_cfg(Duration::from_secs(30))
        },
        &stop_b,
    )
    .await;
    let primary_addr = primary.addr();
    let n = 20;
    let (text, each) = failover_setup(primary_addr, backup.addr(), n);
    let proxy = gridproxy_tests::start_proxy(Config::parse(&text, "test").expect("valid config"))
        .await
        .expect("proxy starts");
    let miners_stop = CancellationToken::new();
    for (i, st) in each.iter().enumerate() {
        let mut cfg = Sv1MinerConfig::new(proxy.sv1_addr.unwrap(), format!("fo1.{i}"));
        cfg.hashrate = 5_000.0;
        cfg.version_rolling = i % 2 == 0;
        tokio::spawn(sv1_miner::run(cfg, st.clone(), miners_stop.clone()));
    }
    let pools = proxy.ctx.router.pools().to_vec();
    let (a, b) = (pools[0].stats.clone(), pools[1].stats.clone());
    assert!(
        accepted_more(&primary, 0, 5, Duration::from_secs(60)).await,
        "primary: {}",
        pool_counts(&primary)
    );
    assert_eq!(b.submitted.get(), 0, "backup idle while the primary is up");
    assert_eq!(backup.stats().accepted.get(), 0);
    assert!(
        wait_until(Duration::from_secs(10), || total(&each, |m| m
            .connects
            .get())
            == n as u64)
        .await
    );

    // Stop the primary: every miner must get a backup job on its connection.
    let jobs_before: Vec<u64> = each.iter().map(|m| m.jobs.get()).collect();
    let t0 = tokio::time::Instant::now();
    stop_a.cancel();
    let stale_miners = || {
        each.iter()
            .zip(&jobs_before)
            .enumerate()
            .filter(|(_, (m, before))| m.jobs.get() <= **before)
            .map(|(i, _)| i)
            .collect::<Vec<_>>()
    };
    assert!(
        wait_until(Duration::from_secs(5), || stale_miners().is_empty()).await,
        "miners without a new job after the failover: {:?}; upstream error {:?}",
        stale_miners(),
        a.last_error()
    );
    let switch = t0.elapsed();
    println!("sv1 failover: all {n} miners had a backup job {switch:?} after the primary stopped");
    assert!(switch < Duration::from_secs(2), "failover took {switch:?}");
    assert!(
        accepted_more(&backup, 0, 5, Duration::from_secs(60)).await,
        "backup: {}",
        pool_counts(&backup)
    );
    assert_eq!(
        total(&each, |m| m.connects.get()),
        n as u64,
        "no miner reconnected"
    );
    assert_eq!(total(&each, |m| m.disconnects.get()), 0);
    let first_primary = primary.stats().clone();
    primary.join().await;

    // The primary comes back on its port: after the 3 s cooldown the miners
    // return, still without reconnecting.
    let stop_a2 = CancellationToken::new();
    let restarted = sv1_pool::spawn(
        primary_addr,
        pool_cfg(Duration::from_secs(30)),
        stop_a2.clone(),
    )
    .await
    .expect("the primary binds its port again");
    let t1 = tokio::time::Instant::now();
    assert!(
        accepted_more(&restarted, 0, 5, Duration::from_secs(60)).await,
        "no fail-back: {}; upstream error {:?}",
        pool_counts(&restarted),
        a.last_error()
    );
    let back = t1.elapsed();
    println!("sv1 fail-back: shares reached the restarted primary {back:?} after it came up (cooldown 3 s)");
    assert!(
        back >= Duration::from_secs(2),
        "fail-back ignored the cooldown ({back:?})"
    );
    let b_sent = b.submitted.get();
    let quiet_from = restarted.stats().accepted.get();
    // Until the primary has taken 10 more shares, the backup gets at most
    // what was in flight at the switch.
    assert!(accepted_more(&restarted, quiet_from, 10, Duration::from_secs(30)).await);
    assert!(
        b.submitted.get() <= b_sent + 2,
        "backup still receiving shares after fail-back"
    );
    assert_eq!(
        total(&each, |m| m.connects.get()),
        n as u64,
        "no miner reconnected"
    );
    assert_eq!(total(&each, |m| m.disconnects.get()), 0);

    miners_stop.cancel();
    // Once the last acknowledgements land: every pool ack is credited to
    // exactly one worker, and each pool's own count is what gridproxy
    // counted for it (shares lost with the stopped primary count nowhere).
    let credited = || {
        proxy
            .ctx
            .registry
            .snapshot()
            .iter()
            .map(|w| w.upstream_accepted)
            .sum::<u64>()
    };
    let agree = || {
        credited() == a.accepted.get() + b.accepted.get()
            && backup.stats().accepted.get() == b.accepted.get()
            && first_primary.accepted.get() + restarted.stats().accepted.get() == a.accepted.get()
    };
    assert!(
        wait_until(Duration::from_secs(10), agree).await,
        "credited {} = primary {} + backup {}? primary's own {} + {}, backup's own {}",
        credited(),
        a.accepted.get(),
        b.accepted.get(),
        first_primary.accepted.get(),
        restarted.stats().accepted.get(),
        backup.stats().accepted.get()
    );
    assert_eq!(
        proxy
            .ctx
            .registry
            .snapshot()
            .iter()
            .map(|w| w.accepted)
            .sum::<u64>(),
        total(&each, |m| m.accepted.get())
    );
    assert_eq!(
        backup.stats().rejected_total(),
        0,
        "{}",
        pool_counts(&backup)
    );
    assert_eq!(
        first_primary.rejected_total(),
        0,
        "the stopped primary rejected shares"
    );
    assert_eq!(
        restarted.stats().rejected_total(),
        0,
        "{}",
        pool_counts(&restarted)
    );
    proxy.stop.cancel();
    stop_a2.cancel();
    stop_b.cancel();
}
