//! gridproxy between fixture SV1 miners and the real SRI `pool_sv2` (fed by the
//! fixture TP): shares flow, and the proxy's per-worker counts agree with what
//! the pool acknowledged.

use gridproxy::config::Config;
use gridproxy_tests::*;
use std::net::SocketAddr;
use std::time::Duration;

/// Proxy config with SV2 upstream pools (priority order as given).
pub fn proxy_config(pools: &[(&str, SocketAddr, &str, u32, f64)], extra: &str) -> Config {
    let mut s = String::new();
    for (name, addr, key, prio, weight) in pools {
        s.push_str(&format!(
            "[[pools]]\nname = \"{name}\"\naddress = \"{addr}\"\nprotocol = \"sv2\"\nauthority_pubkey = \"{key}\"\nuser = \"gridproxy-test\"\npriority = {prio}\nweight = {weight}\nnominal_hashrate = 250000.0\n\n"
        ));
    }
    s.push_str("[listen]\nsv1 = \"127.0.0.1:0\"\n\n[difficulty]\ninitial = 0.000003814697265625\nmin = 0.000000001\nshares_per_minute = 20.0\n\n");
    s.push_str("[routing]\nreconnect_ms = 100\n");
    s.push_str(extra);
    Config::parse(&s, "test").expect("valid test config")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_sv1_miners_through_gridproxy_into_pool_sv2() {
    let _gate = gridproxy_tests::module_gate(module_path!());
    gridproxy_tests::init_tracing();
    // The tip stays put on blocks found, so no share is stale by a race: counts must match exactly.
    let tp = start_quiet_tp().await;
    let pool = start_pool(tp.addr()).await;
    let key = pool.authority_pubkey.to_string();
    let proxy = gridproxy_tests::start_proxy(proxy_config(&[("sri", pool.addr, &key, 0, 1.0)], ""))
        .await
        .unwrap();
    let addr = proxy.sv1_addr.unwrap();
    let (miners, stop) = start_sv1_miners(addr, 100, "site.rig", 5_000.0);

    let up = proxy.ctx.router.pools()[0].stats.clone();
    assert!(
        wait_until(Duration::from_secs(60), || up.accepted.get() >= 30).await,
        "pool acknowledged {} shares (sent {}), miners accepted {} rejected {}; pool log:\n{}",
        up.accepted.get(),
        up.submitted.get(),
        miners.accepted.get(),
        miners.rejected.get(),
        pool.process.log_tail(3000)
    );
    stop.cancel();
    // Let in-flight acknowledgements land.
    tokio::time::sleep(Duration::from_secs(2)).await;

    assert_eq!(
        miners.rejected.get(),
        0,
        "reasons: {:?}",
        miners.reject_reasons()
    );
    assert!(miners.accepted.get() >= 30);
    let workers = proxy.ctx.registry.snapshot();
    assert_eq!(
        workers.len(),
        100,
        "every miner authorized under its own name"
    );
    let sum =
        |f: fn(&gridproxy_proxy::stats::WorkerSnapshot) -> u64| workers.iter().map(f).sum::<u64>();
    // What the miners were told equals what the proxy counted per worker.
    assert_eq!(sum(|w| w.accepted), miners.accepted.get());
    // Per-worker pool acknowledgements add up to the pool's own count of acks to us...
    assert_eq!(sum(|w| w.upstream_accepted), up.accepted.get());
    assert_eq!(
        sum(|w| w.upstream_rejected),
        0,
        "pool rejects: {:?}",
        up.reasons()
    );
    // ...and to what pool_sv2 itself reports as accepted (its metrics lag ≤ 1 s).
    let acked = up.accepted.get() as f64;
    let ok = wait_until_async(Duration::from_secs(10), || async {
        pool.shares_accepted().await >= acked
    })
    .await;
    let theirs = pool.shares_accepted().await;
    assert!(
        ok && theirs == acked,
        "pool_sv2 reports {theirs} accepted, gridproxy counted {acked}"
    );
    assert_eq!(pool.shares_rejected().await, 0.0);
    // More than one worker's shares reached the pool.
    assert!(workers.iter().filter(|w| w.upstream_accepted > 0).count() > 10);
    proxy.stop.cancel();
}

/// Poll an async condition.
async fn wait_until_async<F, Fut>(timeout: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if f().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
