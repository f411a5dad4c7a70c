//! SV1 through the real SRI translator: fixture SV1 miners straight into
//! `translator_sv2` → `pool_sv2`, and gridproxy's SV1 upstream pointed at the
//! translator (an SV1 server) with 100 miners behind it.

use gridproxy::config::Config;
use gridproxy_tests::*;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fixture_sv1_miners_through_translator_into_pool() {
    let _gate = gridproxy_tests::module_gate(module_path!());
    let tp = start_quiet_tp().await;
    let pool = start_pool(tp.addr()).await;
    let tproxy = start_translator_with(
        &pool,
        TranslatorOptions {
            min_individual_miner_hashrate: 20_000.0,
            shares_per_minute: 60.0,
            ..Default::default()
        },
    )
    .await;
    let (stats, stop) = start_sv1_miners(tproxy.sv1_addr, 5, "direct", 20_000.0);
    let ok = pool
        .wait_shares_accepted(10.0, Duration::from_secs(90))
        .await;
    stop.cancel();
    assert!(
        ok,
        "pool accepted {} shares; miners accepted {} rejected {} ({:?}); translator log:\n{}",
        pool.shares_accepted().await,
        stats.accepted.get(),
        stats.rejected.get(),
        stats.reject_reasons(),
        tproxy.process.log_tail(2000)
    );
    assert!(stats.accepted.get() >= 10);
    assert_eq!(stats.rejected.get(), 0, "{:?}", stats.reject_reasons());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gridproxy_sv1_upstream_through_translator_into_pool() {
    let _gate = gridproxy_tests::module_gate(module_path!());
    let tp = start_quiet_tp().await;
    let pool = start_pool(tp.addr()).await;
    // One SV1 "miner" (gridproxy) carrying 100 miners' work: 8-byte extranonce2 to split.
    let tproxy = start_translator_with(
        &pool,
        TranslatorOptions {
            min_individual_miner_hashrate: 500_000.0,
            shares_per_minute: 60.0,
            extranonce2_size: 8,
            ..Default::default()
        },
    )
    .await;
    // SV2 miners (SRI's mining_device) connect to gridproxy with gridproxy's own authority key.
    let kp = gridproxy_protocol::sv2::AuthorityKeypair::from_secret_bytes([0x3c; 32]).unwrap();
    let cfg = format!(
        "[[pools]]\nname = \"tproxy\"\naddress = \"{}\"\nprotocol = \"sv1\"\nuser = \"site.proxy\"\n\n\
         [listen]\nsv1 = \"127.0.0.1:0\"\nsv2 = \"127.0.0.1:0\"\nsv2_authority_pubkey = \"{}\"\nsv2_authority_secret = \"{}\"\n\n\
         [difficulty]\ninitial = 0.000003814697265625\nmin = 0.000000001\n\n[routing]\nreconnect_ms = 100\n",
        tproxy.sv1_addr,
        kp.public(),
        kp.secret_string()
    );
    let proxy = gridproxy_tests::start_proxy(Config::parse(&cfg, "test").unwrap())
        .await
        .unwrap();
    let (stats, stop) = start_sv1_miners(proxy.sv1_addr.unwrap(), 100, "site.rig", 5_000.0);
    let device = spawn_mining_device(
        proxy.sv2_addr.unwrap(),
        Some(&kp.public()),
        MiningDeviceOptions {
            handicap_us: 1,
            nominal_hashrate_multiplier: Some(0.05),
            user: "site.dev".into(),
            ..Default::default()
        },
    );
    let up = proxy.ctx.router.pools()[0].stats.clone();
    let dev_acked = || {
        proxy
            .ctx
            .registry
            .snapshot()
            .iter()
            .filter(|w| w.name.starts_with("site.dev"))
            .map(|w| w.upstream_accepted)
            .sum::<u64>()
    };
    let ok = wait_until(Duration::from_secs(90), || {
        up.accepted.get() >= 30 && dev_acked() >= 1
    })
    .await;
    stop.cancel();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        ok,
        "translator acked {} of {} shares; miners accepted {}; translator log:\n{}",
        up.accepted.get(),
        up.submitted.get(),
        stats.accepted.get(),
        tproxy.process.log_tail(2000)
    );
    assert_eq!(stats.rejected.get(), 0, "{:?}", stats.reject_reasons());
    assert_eq!(
        up.rejected.get(),
        0,
        "translator rejected: {:?}",
        up.reasons()
    );
    let workers = proxy.ctx.registry.snapshot();
    assert_eq!(
        workers.len(),
        101,
        "100 SV1 workers and the SV2 mining_device"
    );
    assert!(
        dev_acked() >= 1,
        "mining_device's shares reached the translator"
    );
    drop(device);
    // What the SV1 miners were told equals what the proxy counted for them.
    let sv1_accepted: u64 = workers
        .iter()
        .filter(|w| w.name.starts_with("site.rig"))
        .map(|w| w.accepted)
        .sum();
    assert_eq!(sv1_accepted, stats.accepted.get());
    assert_eq!(
        workers.iter().map(|w| w.upstream_accepted).sum::<u64>(),
        up.accepted.get()
    );
    // The translator forwarded our shares to the real pool, which accepted them.
    assert!(
        pool.wait_shares_accepted(1.0, Duration::from_secs(10))
            .await
    );
    let pool_acc = pool.shares_accepted().await;
    assert!(
        pool_acc <= up.accepted.get() as f64,
        "pool {pool_acc} > translator acks {}",
        up.accepted.get()
    );
    proxy.stop.cancel();
}
