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

/// The pool's view of our extended channel (`pool_sv2` monitoring API):
/// nominal hashrate and target (big-endian hex), if it has exactly one.
async fn pool_channel(pool: &Pool) -> Option<(f64, String)> {
    let clients: serde_json::Value = serde_json::from_str(
        &http_get(pool.monitoring_addr, "/api/v1/clients")
            .await
            .ok()?,
    )
    .ok()?;
    let id = clients["items"].as_array()?.first()?["client_id"].as_u64()?;
    let path = format!("/api/v1/clients/{id}/channels");
    let ch: serde_json::Value =
        serde_json::from_str(&http_get(pool.monitoring_addr, &path).await.ok()?).ok()?;
    let ext = ch["extended_channels"].as_array()?;
    if ext.len() != 1 {
        return None;
    }
    Some((
        ext[0]["nominal_hashrate"].as_f64()?,
        ext[0]["target_hex"].as_str()?.to_string(),
    ))
}

/// Our view of the pool's target, as `pool_sv2` writes it (big-endian hex).
fn view_target_hex(proxy: &gridproxy_proxy::Proxy) -> String {
    let mut b = proxy.ctx.router.pools()[0]
        .view
        .borrow()
        .target
        .to_le_bytes();
    b.reverse();
    hex::encode(b)
}

/// Wait until the pool shows our channel at `nominal` with the target our
/// view holds; the last pool view seen.
async fn pool_agrees(
    pool: &Pool,
    proxy: &gridproxy_proxy::Proxy,
    nominal: f64,
) -> (bool, Option<(f64, String)>) {
    let t = std::time::Instant::now();
    let mut last = None;
    while t.elapsed() < Duration::from_secs(10) {
        last = pool_channel(pool).await;
        if let Some((n, target)) = &last {
            // The pool keeps the f32 it was sent.
            if *n as f32 == nominal as f32 && *target == view_target_hex(proxy) {
                return (true, last);
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    (false, last)
}

/// Issue 16, honest channel hashrate: the upstream channel opens at the
/// configured nominal hashrate, then follows the fleet's measured one with
/// `UpdateChannel`; pool_sv2 takes the new value (its monitoring shows it)
/// and answers with a target the proxy applies to what it forwards (no
/// share the pool rejects). Doubling the fleet doubles the channel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_nominal_hashrate_follows_the_fleet_and_the_pools_target_is_honoured() {
    let _gate = gridproxy_tests::module_gate(module_path!());
    const PER_MINER: f64 = 5_000.0;
    const FRACTION: f64 = 0.25;
    let tp = start_quiet_tp().await;
    let pool = start_pool(tp.addr()).await;
    let key = pool.authority_pubkey.to_string();
    let extra = format!(
        "rebalance_secs = 1\nchannel_update_secs = 2\nchannel_update_fraction = {FRACTION}\n"
    );
    let proxy =
        gridproxy_tests::start_proxy(proxy_config(&[("sri", pool.addr, &key, 0, 1.0)], &extra))
            .await
            .unwrap();
    let addr = proxy.sv1_addr.unwrap();
    let up = proxy.ctx.router.pools()[0].stats.clone();
    // Opened at the configured 250 kH/s.
    let (ok, seen) = pool_agrees(&pool, &proxy, 250_000.0).await;
    assert!(ok, "pool's channel at open: {seen:?}");

    // 20 miners: 100 kH/s, far from 250 kH/s: an update follows.
    let (miners_a, stop_a) = start_sv1_miners(addr, 20, "hr.a", PER_MINER);
    let near = |v: f64, want: f64| (v - want).abs() <= 0.35 * want;
    assert!(
        wait_until(Duration::from_secs(60), || up.channel_updates.get() >= 1
            && near(up.channel_nominal(), 20.0 * PER_MINER))
        .await,
        "channel nominal {} after {} updates (measured {}) for 20 x {PER_MINER} H/s",
        up.channel_nominal(),
        up.channel_updates.get(),
        up.measured_hashrate()
    );
    let first = up.channel_nominal();
    let (ok, seen) = pool_agrees(&pool, &proxy, first).await;
    assert!(
        ok,
        "pool's channel after UpdateChannel({first}): {seen:?}, our target {}",
        view_target_hex(&proxy)
    );
    assert!(
        pool.process.log().contains("UpdateChannel(channel_id="),
        "pool never logged an UpdateChannel"
    );

    // Double the fleet: the channel follows.
    let (miners_b, stop_b) = start_sv1_miners(addr, 20, "hr.b", PER_MINER);
    assert!(
        wait_until(Duration::from_secs(60), || near(
            up.channel_nominal(),
            40.0 * PER_MINER
        ) && up.channel_nominal()
            > first * (1.0 + FRACTION))
        .await,
        "channel nominal {} (first {first}, measured {}) for 40 x {PER_MINER} H/s",
        up.channel_nominal(),
        up.measured_hashrate()
    );
    let second = up.channel_nominal();
    let (ok, seen) = pool_agrees(&pool, &proxy, second).await;
    assert!(ok, "pool's channel after UpdateChannel({second}): {seen:?}");
    // Shares keep flowing to the pool on its new target, none refused.
    let acked = up.accepted.get();
    assert!(
        wait_until(Duration::from_secs(30), || up.accepted.get() >= acked + 10).await,
        "no shares acknowledged after the update: {} sent, {} acked",
        up.submitted.get(),
        up.accepted.get()
    );
    stop_a.cancel();
    stop_b.cancel();
    assert_eq!(up.rejected.get(), 0, "pool rejects: {:?}", up.reasons());
    assert_eq!(pool.shares_rejected().await, 0.0);
    assert_eq!(miners_a.rejected.get() + miners_b.rejected.get(), 0);
    println!(
        "channel hashrate: opened 250000, 20 miners -> {first:.0} H/s, 40 miners -> {second:.0} H/s \
         ({} UpdateChannel), pool agreed on nominal and target each time",
        up.channel_updates.get()
    );
    proxy.stop.cancel();
}
