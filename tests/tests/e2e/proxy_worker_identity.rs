//! SV2 extension 0x0002 (worker-specific hashrate tracking) upstream (issue
//! 16, part 3): gridproxy negotiates it after SetupConnection and, when
//! granted, every share on its aggregated channel carries the worker's
//! `user_identity` TLV.
//!
//! Against the real `pool_sv2` 0.7.0 (`supported_extensions` /
//! `required_extensions`): granted and accepted when the pool requires it;
//! refused by that pool, with its reason shown, when gridproxy has it off;
//! accepted without it by a pool that only supports it. Against the fixture
//! SV2 pool (which decodes the TLVs): per-identity share counts equal
//! gridproxy's per-worker forwarded counts for 100 SV1 miners. Accounts do
//! not exist yet, so all 100 are one account on one channel.

use gridproxy::config::Config;
use gridproxy_fixtures::stats::MinerStats;
use gridproxy_fixtures::sv1_miner::{self, Sv1MinerConfig};
use gridproxy_fixtures::sv2_pool::{Sv2Pool, Sv2PoolConfig};
use gridproxy_protocol::sv2_ext::tlv_identity;
use gridproxy_proxy::stats::IdentityNegotiation;
use gridproxy_tests::*;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// One SV2 pool; `pool_extra` goes into its `[[pools]]` table.
fn config(addr: SocketAddr, key: &str, pool_extra: &str, api: bool) -> Config {
    let mut s = format!(
        "[[pools]]\nname = \"p\"\naddress = \"{addr}\"\nprotocol = \"sv2\"\nauthority_pubkey = \"{key}\"\nuser = \"gridproxy-test\"\nnominal_hashrate = 250000.0\n{pool_extra}\n\n\
         [listen]\nsv1 = \"127.0.0.1:0\"\n\n[difficulty]\ninitial = 0.000003814697265625\nmin = 0.000000001\nshares_per_minute = 20.0\n\n\
         [routing]\nreconnect_ms = 200\n"
    );
    if api {
        s.push_str("\n[api]\nlisten = \"127.0.0.1:0\"\n");
    }
    Config::parse(&s, "test").expect("valid test config")
}

/// After the miners stop: wait until every share gridproxy sent has its
/// answer and no more are sent (the miners' last shares may still be on
/// their way when they are told to stop).
async fn settle(up: &gridproxy_proxy::stats::PoolStats) -> bool {
    let mut last = u64::MAX;
    wait_until(Duration::from_secs(10), || {
        let sent = up.submitted.get();
        let done = up.accepted.get() + up.rejected.get() >= sent && sent == last;
        last = sent;
        done
    })
    .await
}

/// 50 SV1 miners through `proxy` until the pool has acknowledged 20 of
/// their shares; then they stop and every share sent has its answer.
async fn twenty_shares(
    proxy: &gridproxy_proxy::Proxy,
    pool: &Pool,
) -> (Arc<gridproxy_proxy::stats::PoolStats>, Arc<MinerStats>) {
    let (miners, stop) = start_sv1_miners(proxy.sv1_addr.unwrap(), 50, "acct.rig", 5_000.0);
    let up = proxy.ctx.router.pools()[0].stats.clone();
    assert!(
        wait_until(Duration::from_secs(60), || up.accepted.get() >= 20).await,
        "pool acknowledged {} of {} shares; last error {:?}; pool log:\n{}",
        up.accepted.get(),
        up.submitted.get(),
        up.last_error(),
        pool.process.log_tail(3000)
    );
    stop.cancel();
    assert!(settle(&up).await, "shares still unanswered: {up:?}");
    (up, miners)
}

fn pool_env(supported: &str, required: &str) -> PoolOptions {
    let mut env = vec![];
    if !supported.is_empty() {
        env.push(("POOL__SUPPORTED_EXTENSIONS".into(), supported.into()));
    }
    if !required.is_empty() {
        env.push(("POOL__REQUIRED_EXTENSIONS".into(), required.into()));
    }
    PoolOptions {
        env,
        ..Default::default()
    }
}

/// pool_sv2 with `required_extensions = [0x0002]`: the channel opens with
/// the extension granted and the pool accepts the shares (which carry the
/// TLV); gridproxy with the extension off is refused by the same pool, and
/// says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_sv2_that_requires_0x0002_accepts_it_and_refuses_it_off() {
    let _gate = gridproxy_tests::module_gate(module_path!());
    gridproxy_tests::init_tracing();
    let tp = start_quiet_tp().await;
    let pool = start_pool_with(tp.addr(), pool_env("2", "2")).await;
    let key = pool.authority_pubkey.to_string();

    // On (the default): granted, channel open, shares accepted.
    let proxy = start_proxy(config(pool.addr, &key, "", false))
        .await
        .unwrap();
    let (up, miners) = twenty_shares(&proxy, &pool).await;
    assert!(up.identity_granted());
    assert_eq!(up.identity_negotiations(IdentityNegotiation::Granted), 1);
    assert_eq!(up.rejected.get(), 0, "pool rejects: {:?}", up.reasons());
    assert_eq!(miners.rejected.get(), 0);
    assert!(
        pool.process
            .count_in_log("Extension negotiation success: requested=[2], negotiated=[2]")
            >= 1,
        "pool log:\n{}",
        pool.process.log_tail(3000)
    );
    let acked = up.accepted.get() as f64;
    assert!(
        pool.wait_shares_accepted(acked, Duration::from_secs(10))
            .await,
        "pool_sv2 counts fewer accepted shares than the {acked} gridproxy was acknowledged"
    );
    eprintln!(
        "required 0x0002, on: {} shares sent, {} accepted by pool_sv2 ({} by its metrics), 0 rejected",
        up.submitted.get(),
        up.accepted.get(),
        pool.shares_accepted().await
    );
    proxy.stop.cancel();
    proxy.shutdown(Duration::from_secs(5)).await;

    // Off: the pool answers RequestExtensions.Error (required 0x0002) and
    // disconnects; gridproxy shows the reason and never opens a channel.
    let proxy = start_proxy(config(pool.addr, &key, "worker_identity = false", false))
        .await
        .unwrap();
    let up = proxy.ctx.router.pools()[0].stats.clone();
    assert!(
        wait_until(Duration::from_secs(20), || up
            .last_error()
            .is_some_and(|e| e.contains("requires SV2 extension 0x0002")))
        .await,
        "last error {:?}",
        up.last_error()
    );
    let err = up.last_error().unwrap();
    assert!(err.contains("set worker_identity = true"), "{err}");
    assert_eq!(up.connects.get(), 0, "no channel opened");
    // Off in the config: counted as disabled, whatever the pool said.
    assert!(up.identity_negotiations(IdentityNegotiation::Disabled) >= 1);
    assert!(!up.identity_granted());
    assert!(
        pool.process
            .count_in_log("Client does not support required extensions [2]")
            >= 1,
        "pool log:\n{}",
        pool.process.log_tail(3000)
    );
    eprintln!("required 0x0002, off: gridproxy's pool error: {err}");
    proxy.stop.cancel();
    proxy.shutdown(Duration::from_secs(5)).await;
}

/// pool_sv2 that only supports 0x0002 accepts gridproxy with it off
/// (shares without the TLV), and grants it when on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_sv2_that_supports_0x0002_accepts_gridproxy_with_it_off() {
    let _gate = gridproxy_tests::module_gate(module_path!());
    gridproxy_tests::init_tracing();
    let tp = start_quiet_tp().await;
    let pool = start_pool_with(tp.addr(), pool_env("2", "")).await;
    let key = pool.authority_pubkey.to_string();
    let proxy = start_proxy(config(pool.addr, &key, "worker_identity = false", false))
        .await
        .unwrap();
    let (up, miners) = twenty_shares(&proxy, &pool).await;
    assert!(!up.identity_granted());
    assert_eq!(up.identity_negotiations(IdentityNegotiation::Disabled), 1);
    assert_eq!(up.connects.get(), 1);
    assert_eq!(up.rejected.get(), 0, "pool rejects: {:?}", up.reasons());
    assert_eq!(miners.rejected.get(), 0);
    eprintln!(
        "supported 0x0002, off: {} shares sent, {} accepted",
        up.submitted.get(),
        up.accepted.get()
    );
    proxy.stop.cancel();
    proxy.shutdown(Duration::from_secs(5)).await;
}

/// 100 SV1 miners (ten with names over 32 bytes, cut by the documented
/// rule) through one aggregated channel into the fixture SV2 pool: the
/// identities it decodes are exactly the workers' (cut) names, and its count
/// per identity equals gridproxy's per-worker forwarded (and acknowledged)
/// count. `/metrics` says the extension is on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_identity_counts_at_the_pool_equal_per_worker_forwarded_counts() {
    let _gate = gridproxy_tests::module_gate(module_path!());
    gridproxy_tests::init_tracing();
    let pool = Sv2Pool::start("127.0.0.1:0".parse().unwrap(), Sv2PoolConfig::default())
        .await
        .unwrap();
    let key = pool.authority_public_key().to_string();
    let app = start_app(config(pool.addr(), &key, "", true), None).await;
    let proxy = app.proxy.clone();
    let api = app.api.clone().expect("[api] listen is set").addr;
    let names: Vec<String> = (0..100)
        .map(|i| {
            if i < 90 {
                format!("acct.rig{i:02}")
            } else {
                format!("customer-with-a-long-account-name.rig-{i}")
            }
        })
        .collect();
    let stats = Arc::new(MinerStats::default());
    let stop = tokio_util::sync::CancellationToken::new();
    for (i, n) in names.iter().enumerate() {
        let mut m = Sv1MinerConfig::new(proxy.sv1_addr.unwrap(), n.clone());
        m.hashrate = 5_000.0;
        m.version_rolling = i % 2 == 0;
        tokio::spawn(sv1_miner::run(m, stats.clone(), stop.clone()));
    }
    let up = proxy.ctx.router.pools()[0].stats.clone();
    assert!(
        wait_until(Duration::from_secs(60), || up.accepted.get() >= 500).await,
        "pool acknowledged {} of {} shares; last error {:?}",
        up.accepted.get(),
        up.submitted.get(),
        up.last_error()
    );
    stop.cancel();
    // Every share sent is answered (the fixture answers each one).
    assert!(
        wait_until(Duration::from_secs(10), || {
            up.accepted.get() == up.submitted.get() && pool.stats().shares == up.submitted.get()
        })
        .await
    );
    assert!(settle(&up).await, "shares still unanswered: {up:?}");

    let seen = pool.stats();
    assert_eq!(seen.negotiations, vec![(vec![2], Some(vec![2]))]);
    assert_eq!(seen.without_identity, 0, "every share carries an identity");
    let workers = proxy.ctx.registry.snapshot();
    assert_eq!(workers.len(), 100);
    let ours: BTreeMap<String, u64> = workers
        .iter()
        .filter(|w| w.forwarded > 0)
        .map(|w| (tlv_identity(&w.name), w.forwarded))
        .collect();
    let acked: BTreeMap<String, u64> = workers
        .iter()
        .filter(|w| w.upstream_accepted > 0)
        .map(|w| (tlv_identity(&w.name), w.upstream_accepted))
        .collect();
    assert_eq!(seen.by_identity, ours, "pool-side counts per identity");
    assert_eq!(seen.by_identity, acked);
    // The cut names stayed distinct and within 32 bytes.
    let long: Vec<&String> = seen
        .by_identity
        .keys()
        .filter(|k| k.contains('~'))
        .collect();
    assert!(long.iter().all(|k| k.len() <= 32));
    assert!(seen.by_identity.keys().all(|k| k.len() <= 32));
    assert!(
        seen.by_identity.len() >= 90,
        "most workers had shares forwarded: {}",
        seen.by_identity.len()
    );
    let body = http_get(api, "/metrics").await.unwrap();
    assert!(
        body.contains("gridproxy_pool_worker_identity{pool=\"p\"} 1"),
        "{body}"
    );
    assert!(body.contains(
        "gridproxy_pool_worker_identity_negotiations_total{pool=\"p\",result=\"granted\"} 1"
    ));
    eprintln!(
        "fixture pool: {} shares from {} identities ({} cut), min {} max {} per identity; gridproxy forwarded {} from {} workers",
        seen.shares,
        seen.by_identity.len(),
        long.len(),
        seen.by_identity.values().min().unwrap(),
        seen.by_identity.values().max().unwrap(),
        workers.iter().map(|w| w.forwarded).sum::<u64>(),
        ours.len()
    );
    proxy.stop.cancel();
}

/// The fixture pool refusing 0x0002 (it supports nothing): shares go without
/// the TLV, and the metric says refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_that_refuses_0x0002_gets_shares_without_it() {
    let _gate = gridproxy_tests::module_gate(module_path!());
    gridproxy_tests::init_tracing();
    let pool = Sv2Pool::start(
        "127.0.0.1:0".parse().unwrap(),
        Sv2PoolConfig {
            supported_extensions: vec![],
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let key = pool.authority_public_key().to_string();
    let proxy = start_proxy(config(pool.addr(), &key, "", false))
        .await
        .unwrap();
    let (_miners, stop) = start_sv1_miners(proxy.sv1_addr.unwrap(), 5, "acct.rig", 5_000.0);
    let up = proxy.ctx.router.pools()[0].stats.clone();
    assert!(wait_until(Duration::from_secs(60), || up.accepted.get() >= 20).await);
    stop.cancel();
    let seen = pool.stats();
    assert_eq!(seen.negotiations, vec![(vec![2], None)]);
    assert!(seen.by_identity.is_empty());
    assert!(seen.without_identity >= 20);
    assert_eq!(up.identity_negotiations(IdentityNegotiation::Refused), 1);
    assert!(!up.identity_granted());
    proxy.stop.cancel();
}
