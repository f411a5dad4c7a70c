//! The real SRI pool (`pool_sv2` 0.7.0), fed by the fixture Template Provider, accepts shares
//! from SRI's `mining_device` and from the fixture SV2 miners on standard and extended
//! channels; blocks found reach the TP and are valid. Needs `scripts/peers.sh install`.

use std::time::Duration;

use gridproxy_fixtures::{
    sv2_miner::{ChannelKind, Sv2MinerConfig, Sv2Miners},
    tp::{TpConfig, QUIET_NBITS, REGTEST_NBITS},
};
use gridproxy_protocol::sv2::AuthorityKeypair;
use gridproxy_tests::*;

/// A TP whose tips never move during a test, so no share can go stale.
fn quiet_tp() -> TpConfig {
    TpConfig {
        nbits: QUIET_NBITS,
        template_interval: Duration::from_secs(5),
        ..TpConfig::default()
    }
}

fn miner_cfg(pool: &Pool, channel: ChannelKind, count: usize) -> Sv2MinerConfig {
    Sv2MinerConfig {
        channel,
        count,
        ..Sv2MinerConfig::new(pool.addr, pool.authority_pubkey, 20_000.0)
    }
}

/// Both sides agree: the miners counted Success messages, the pool counted accepted shares.
async fn assert_fixture_miners_accepted(pool: &Pool, miners: &Sv2Miners, n: u64) {
    let stats = miners
        .wait_accepted(n, Duration::from_secs(60))
        .await
        .unwrap_or_else(|s| {
            panic!(
                "only {} of {n} shares accepted: {s:?}, last error {:?}, pool log:\n{}",
                s.accepted,
                miners.last_error(),
                pool.process.log_tail(3000)
            )
        });
    assert_eq!(
        stats.rejected,
        0,
        "pool rejected shares: {:?}",
        miners.reject_reasons()
    );
    assert!(stats.submitted >= stats.accepted, "{stats:?}");
    assert!(stats.hashes > 0 && stats.jobs > 0, "{stats:?}");
    assert!(
        pool.wait_shares_accepted(n as f64, Duration::from_secs(10))
            .await,
        "pool metrics do not show {n} accepted shares: {}",
        pool.metrics().await.unwrap_or_default()
    );
    assert_eq!(pool.shares_rejected().await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_accepts_shares_from_sri_mining_device() {
    let _gate = gridproxy_tests::module_gate(module_path!());
    let tp = start_tp_with(quiet_tp()).await;
    let pool = start_pool(tp.addr()).await;
    let opts = MiningDeviceOptions {
        // Sleep between hashes: keeps it to a fraction of a core. Its own measurement
        // overstates the slowed rate (and the 2 cores are shared), so announce 1/20 of it:
        // the pool's target gets 20x easier and shares come every second or so.
        handicap_us: 1,
        nominal_hashrate_multiplier: Some(0.05),
        ..MiningDeviceOptions::default()
    };
    let mut dev = spawn_mining_device(pool.addr, Some(&pool.authority_pubkey), opts);

    // Device side: it logs every SubmitShares.Success it receives.
    let acked = dev
        .wait_for_log_count(MINING_DEVICE_ACCEPTED, 3, Duration::from_secs(60))
        .await;
    assert!(
        acked,
        "mining_device got fewer than 3 SubmitShares.Success; its log:\n{}\npool log:\n{}",
        dev.log_tail(3000),
        pool.process.log_tail(3000)
    );
    // Pool side: its own accounting agrees.
    assert!(
        pool.wait_shares_accepted(3.0, Duration::from_secs(10))
            .await,
        "pool metrics: {}",
        pool.metrics().await.unwrap_or_default()
    );
    assert_eq!(pool.shares_rejected().await, 0.0);
    assert!(
        dev.is_running(),
        "mining_device exited:\n{}",
        dev.log_tail(3000)
    );
    assert!(tp.stats().setups >= 1 && tp.stats().templates_sent >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_accepts_fixture_miner_shares_on_standard_channels() {
    let _gate = gridproxy_tests::module_gate(module_path!());
    let tp = start_tp_with(quiet_tp()).await;
    let pool = start_pool(tp.addr()).await;
    let miners = Sv2Miners::start(miner_cfg(&pool, ChannelKind::Standard, 2));
    assert_fixture_miners_accepted(&pool, &miners, 6).await;
    assert_eq!(miners.stats().channels_opened, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_accepts_fixture_miner_shares_on_extended_channels() {
    let _gate = gridproxy_tests::module_gate(module_path!());
    let tp = start_tp_with(quiet_tp()).await;
    let pool = start_pool(tp.addr()).await;
    let kind = ChannelKind::Extended { extranonce_size: 4 };
    let miners = Sv2Miners::start(miner_cfg(&pool, kind, 2));
    assert_fixture_miners_accepted(&pool, &miners, 6).await;
    assert_eq!(miners.stats().channels_opened, 2);
}

/// With regtest difficulty every share is a block: the pool assembles each one and sends it
/// to the TP, which rebuilds the header and checks the proof of work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocks_found_on_both_channel_types_reach_the_tp_valid() {
    let _gate = gridproxy_tests::module_gate(module_path!());
    let tp = start_tp_with(TpConfig {
        nbits: REGTEST_NBITS,
        // Keep one tip so block shares never go stale.
        new_tip_on_solution: false,
        ..TpConfig::default()
    })
    .await;
    let pool = start_pool(tp.addr()).await;
    let std_miners = Sv2Miners::start(miner_cfg(&pool, ChannelKind::Standard, 1));
    let ext_miners = Sv2Miners::start(miner_cfg(
        &pool,
        ChannelKind::Extended { extranonce_size: 4 },
        1,
    ));
    for m in [&std_miners, &ext_miners] {
        let s = m
            .wait_accepted(2, Duration::from_secs(60))
            .await
            .unwrap_or_else(|s| panic!("{s:?} {:?}", m.last_error()));
        assert_eq!(s.rejected, 0, "{:?}", m.reject_reasons());
    }
    let ok = wait_until(Duration::from_secs(10), || tp.stats().valid_solutions >= 4).await;
    let s = tp.stats();
    assert!(ok, "TP saw {s:?}; solutions {:?}", tp.solutions());
    assert_eq!(s.invalid_solutions, 0, "{:?}", tp.solutions());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fixture_miner_fails_over_to_backup_upstream() {
    let _gate = gridproxy_tests::module_gate(module_path!());
    let tp = start_tp_with(quiet_tp()).await;
    let pool = start_pool(tp.addr()).await;
    let dead = free_addr(); // nothing listens here
    let cfg = Sv2MinerConfig {
        upstreams: vec![dead, pool.addr],
        ..miner_cfg(&pool, ChannelKind::Standard, 1)
    };
    let miners = Sv2Miners::start(cfg);
    let s = miners
        .wait_accepted(1, Duration::from_secs(60))
        .await
        .unwrap_or_else(|s| panic!("{s:?} {:?}", miners.last_error()));
    assert!(s.connect_failures >= 1, "{s:?}");
    assert_eq!(miners.opened_by_upstream()[0], 0);
    assert!(miners.opened_by_upstream()[1] >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fixture_miner_refuses_a_pool_with_another_authority_key() {
    let _gate = gridproxy_tests::module_gate(module_path!());
    let tp = start_tp_with(quiet_tp()).await;
    let pool = start_pool(tp.addr()).await;
    let wrong = AuthorityKeypair::from_secret_bytes([42; 32])
        .unwrap()
        .public();
    let cfg = Sv2MinerConfig {
        authority: wrong,
        ..miner_cfg(&pool, ChannelKind::Standard, 1)
    };
    let miners = Sv2Miners::start(cfg);
    let failed = wait_until(Duration::from_secs(10), || {
        miners.stats().connect_failures >= 2
    })
    .await;
    assert!(failed, "{:?}", miners.stats());
    assert_eq!(miners.stats().channels_opened, 0);
    let err = miners.last_error().unwrap_or_default();
    assert!(err.contains("certificate"), "unexpected error: {err}");
}

/// Harness check for `start_translator`: an SV1 fixture miner behind SRI's translator gets
/// shares accepted by the pool (counted by the pool itself, not by the translator's SV1 acks).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_accepts_sv1_shares_through_the_sri_translator() {
    let _gate = gridproxy_tests::module_gate(module_path!());
    use gridproxy_fixtures::{
        stats::MinerStats,
        sv1_miner::{self, Sv1MinerConfig},
    };
    use std::sync::Arc;
    use tokio_util::sync::CancellationToken;

    let tp = start_tp_with(quiet_tp()).await;
    let pool = start_pool(tp.addr()).await;
    let tproxy = start_translator(&pool).await;
    let stats = Arc::new(MinerStats::default());
    let stop = CancellationToken::new();
    let cfg = Sv1MinerConfig {
        hashrate: 100_000.0,
        ..Sv1MinerConfig::new(tproxy.sv1_addr, "sv1-behind-tproxy")
    };
    let miner = tokio::spawn(sv1_miner::run(cfg, stats.clone(), stop.clone()));
    let accepted = pool
        .wait_shares_accepted(2.0, Duration::from_secs(60))
        .await;
    stop.cancel();
    let _ = miner.await;
    assert!(
        accepted,
        "pool accepted < 2 shares via the translator; miner {stats:?}\ntranslator log:\n{}",
        tproxy.process.log_tail(3000)
    );
    assert_eq!(pool.shares_rejected().await, 0.0);
    assert!(stats.accepted.get() >= 1, "{stats:?}");
}
