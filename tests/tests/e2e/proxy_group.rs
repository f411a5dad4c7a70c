//! SV2 group channels through gridproxy (issue 16, part 5): one SV2
//! connection with 20 standard channels, without `REQUIRES_STANDARD_JOBS`,
//! behind gridproxy in front of the fixture SV1 pool (which checks every
//! share against its own coinbase). Per new block the connection receives
//! one `NewExtendedMiningJob` and one `SetNewPrevHash`, both addressed to
//! the group channel, instead of 20 `NewMiningJob`s; every channel builds
//! its merkle root from the group job and its own extranonce prefix, and its
//! shares are accepted by gridproxy and by the pool. With two upstreams the
//! connection has a group per pool: channels the router moves get
//! `SetGroupChannel` first, and a block comes as one group job per pool. A
//! connection that sets `REQUIRES_STANDARD_JOBS` keeps one `NewMiningJob`
//! per channel, and so does SRI's `mining_device`, which sets it (needs
//! `scripts/peers.sh install`).

use gridproxy::config::Config;
use gridproxy_fixtures::sv1_pool::{self, PoolReject, Sv1Pool, Sv1PoolConfig};
use gridproxy_fixtures::sv2_miner::{Sv2MinerConfig, Sv2MinerStats, Sv2Miners};
use gridproxy_protocol::sv2::AuthorityKeypair;
use gridproxy_proxy::Proxy;
use gridproxy_tests::*;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Standard channels on the one connection.
const CHANNELS: usize = 20;
/// Blocks the pool announces during the count.
const BLOCKS: u64 = 3;
/// Difficulty of the pool and of every channel (a channel announcing 1000
/// H/s at 20 shares a minute gets 2^-21): every share goes to the pool.
const DIFFICULTY: f64 = 1.0 / 2_097_152.0;

fn proxy_authority() -> AuthorityKeypair {
    AuthorityKeypair::from_secret_bytes([0x5a; 32]).expect("valid secret")
}

/// gridproxy on the fixture SV1 pool; vardiff held still, so the only
/// messages after the first jobs are the pool's.
async fn start_proxy(pool: &Sv1Pool) -> Proxy {
    start_proxy_on(pool, 1).await
}

/// The same with `upstreams` pool entries, all on `pool` (equal priority
/// and weight: the router splits the miners between them).
async fn start_proxy_on(pool: &Sv1Pool, upstreams: usize) -> Proxy {
    let kp = proxy_authority();
    let pools: String = (0..upstreams)
        .map(|i| {
            format!(
                "[[pools]]\nname = \"p{i}\"\naddress = \"{}\"\nprotocol = \"sv1\"\nuser = \"acct\"\n\n",
                pool.addr()
            )
        })
        .collect();
    let text = format!(
        r#"{pools}
[listen]
sv2 = "127.0.0.1:0"
sv2_authority_pubkey = "{pubkey}"
sv2_authority_secret = "{secret}"

[difficulty]
initial = {DIFFICULTY}
min = 0.000000001
shares_per_minute = 20.0
retarget_secs = 3600

[routing]
reconnect_ms = 100
"#,
        pubkey = kp.public(),
        secret = kp.secret_string(),
    );
    let proxy = gridproxy_tests::start_proxy(Config::parse(&text, "test").expect("valid config"))
        .await
        .expect("proxy starts");
    let live = wait_until(Duration::from_secs(10), || {
        proxy
            .ctx
            .router
            .pools()
            .iter()
            .all(|p| p.view.borrow().live)
    })
    .await;
    assert!(live, "upstream never went live");
    proxy
}

async fn start_pool(stop: &CancellationToken) -> Sv1Pool {
    // Timers an hour away: the test alone moves the pool.
    sv1_pool::spawn(
        "127.0.0.1:0".parse().unwrap(),
        Sv1PoolConfig {
            difficulty: DIFFICULTY,
            job_interval: Duration::from_secs(3600),
            block_interval: Duration::from_secs(3600),
            ..Default::default()
        },
        stop.clone(),
    )
    .await
    .expect("fixture pool binds")
}

/// One connection of `CHANNELS` standard channels, users `grp.0.k`.
fn miners(proxy: &Proxy, user: &str, standard_jobs_only: bool) -> Sv2Miners {
    Sv2Miners::start(Sv2MinerConfig {
        count: 1,
        channels_per_connection: CHANNELS,
        standard_jobs_only,
        user_identity: user.into(),
        nominal_hashrate: Some(1000.0),
        ..Sv2MinerConfig::new(
            proxy.sv2_addr.unwrap(),
            proxy_authority().public(),
            20_000.0,
        )
    })
}

/// Waits until every channel has more than `floor[user]` shares acknowledged.
async fn every_channel_accepted(
    miners: &Sv2Miners,
    user: &str,
    floor: &std::collections::BTreeMap<String, u64>,
    what: &str,
) {
    let users: Vec<String> = (0..CHANNELS).map(|k| format!("{user}.0.{k}")).collect();
    let ok = wait_until(Duration::from_secs(60), || {
        let by = miners.accepted_by_user();
        users
            .iter()
            .all(|u| by.get(u).copied().unwrap_or(0) > floor.get(u).copied().unwrap_or(0))
    })
    .await;
    assert!(
        ok,
        "{what}: not every channel had a share accepted: {:?}; stats {:?}; last error {:?}; \
         rejects {:?}",
        miners.accepted_by_user(),
        miners.stats(),
        miners.last_error(),
        miners.reject_reasons()
    );
}

/// What one announcement by the pool brought the connection.
#[derive(Debug, PartialEq, Eq)]
struct Delta {
    standard_jobs: u64,
    group_jobs: u64,
    extended_jobs: u64,
    prev_hashes: u64,
    group_prev_hashes: u64,
}

fn delta(a: &Sv2MinerStats, b: &Sv2MinerStats) -> Delta {
    Delta {
        standard_jobs: b.standard_jobs - a.standard_jobs,
        group_jobs: b.group_jobs - a.group_jobs,
        extended_jobs: b.extended_jobs - a.extended_jobs,
        prev_hashes: b.prev_hashes - a.prev_hashes,
        group_prev_hashes: b.group_prev_hashes - a.group_prev_hashes,
    }
}

/// Announce a block (or a same-tip job) and return what the connection
/// received for it: waits until `done` holds, then a little more, so a
/// message that should not come has the time to.
async fn announce(
    pool: &Sv1Pool,
    miners: &Sv2Miners,
    new_block: bool,
    done: impl Fn(&Delta) -> bool,
) -> Delta {
    let before = miners.stats();
    if new_block {
        pool.new_block();
    } else {
        pool.new_job();
    }
    let arrived = wait_until(Duration::from_secs(20), || {
        done(&delta(&before, &miners.stats()))
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let d = delta(&before, &miners.stats());
    assert!(arrived, "the announcement did not arrive: {d:?}");
    d
}

/// The pool refused nothing and acknowledged what gridproxy forwarded;
/// gridproxy credited every channel's worker. The miners stop first: while
/// they hash, shares are forwarded faster than a loaded machine sees them
/// answered, and the two counts never meet.
async fn assert_accounting(proxy: &Proxy, pool: &Sv1Pool, miners: &Sv2Miners, user: &str) {
    miners.stop();
    let workers: Vec<_> = (0..CHANNELS)
        .map(|k| {
            proxy
                .ctx
                .registry
                .get(&format!("{user}.0.{k}"))
                .expect("a worker per channel")
        })
        .collect();
    let forwarded = || workers.iter().map(|w| w.forwarded.get()).sum::<u64>();
    let up_accepted = || {
        workers
            .iter()
            .map(|w| w.upstream_accepted.get())
            .sum::<u64>()
    };
    let settled = wait_until(Duration::from_secs(20), || up_accepted() >= forwarded()).await;
    let stats = pool.stats();
    assert!(
        settled,
        "pool acknowledged {} of the {} shares gridproxy forwarded",
        up_accepted(),
        forwarded()
    );
    for w in &workers {
        assert!(
            w.accepted.get() > 0 && w.upstream_accepted.get() > 0,
            "{}: accepted {} upstream accepted {}",
            w.name,
            w.accepted.get(),
            w.upstream_accepted.get()
        );
    }
    assert_eq!(
        stats.rejected_total(),
        0,
        "pool refused shares: stale {} duplicate {} low {} invalid {}",
        stats.rejected(PoolReject::Stale),
        stats.rejected(PoolReject::Duplicate),
        stats.rejected(PoolReject::LowDifficulty),
        stats.rejected(PoolReject::Invalid)
    );
    assert!(stats.accepted.get() >= up_accepted());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_standard_channels_get_one_group_job_per_block() {
    let _gate = gridproxy_tests::module_gate(module_path!());
    let _serial = SERIAL.lock().await;
    init_tracing();
    let stop = CancellationToken::new();
    let pool = start_pool(&stop).await;
    let proxy = start_proxy(&pool).await;
    let miners = miners(&proxy, "grp", false);
    every_channel_accepted(&miners, "grp", &Default::default(), "first job").await;
    let opened = miners.stats();
    assert_eq!(opened.channels_opened, CHANNELS as u64);
    // The first job: the first channel's went to the group (it was alone
    // in it), the others', opened after it went out, to each alone.
    assert_eq!(
        (opened.group_jobs, opened.standard_jobs, opened.set_groups),
        (1, CHANNELS as u64 - 1, 0),
        "{opened:?}"
    );

    let mut per_block = vec![];
    for _ in 0..BLOCKS {
        let d = announce(&pool, &miners, true, |d| d.group_prev_hashes >= 1).await;
        per_block.push(d);
    }
    let want = Delta {
        standard_jobs: 0,
        group_jobs: 1,
        extended_jobs: 1,
        prev_hashes: 1,
        group_prev_hashes: 1,
    };
    for (b, d) in per_block.iter().enumerate() {
        assert_eq!(d, &want, "block {}: what the connection received", b + 1);
    }
    // A job on the same tip: one group job, not a future one (no prev hash).
    let same_tip = announce(&pool, &miners, false, |d| d.group_jobs >= 1).await;
    assert_eq!(
        same_tip,
        Delta {
            prev_hashes: 0,
            group_prev_hashes: 0,
            ..want
        }
    );
    // Every channel mines the group's latest job: a share of each is
    // accepted after it, by gridproxy and by the pool.
    let floor = miners.accepted_by_user();
    every_channel_accepted(&miners, "grp", &floor, "after the blocks").await;
    assert_accounting(&proxy, &pool, &miners, "grp").await;
    let s = miners.stats();
    assert_eq!(s.rejected, 0, "rejects: {:?}", miners.reject_reasons());
    println!(
        "group channels: {CHANNELS} standard channels on one connection; per block {:?}; \
         same-tip job {:?}; in all {} group jobs, {} NewMiningJob (first jobs), {} shares \
         accepted, {} rejected",
        per_block[0], same_tip, s.group_jobs, s.standard_jobs, s.accepted, s.rejected
    );
    miners.stop();
    proxy.stop.cancel();
    stop.cancel();
}

/// Two upstreams (one group each on the connection): channels the router
/// moves to the other pool are moved to its group with SetGroupChannel
/// first; a block then reaches the connection as one group job per pool,
/// and every channel's shares are accepted on its new pool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grouped_channels_follow_their_pool() {
    let _gate = gridproxy_tests::module_gate(module_path!());
    let _serial = SERIAL.lock().await;
    init_tracing();
    let stop = CancellationToken::new();
    let pool = start_pool(&stop).await;
    let proxy = start_proxy_on(&pool, 2).await;
    let miners = miners(&proxy, "mv", false);
    every_channel_accepted(&miners, "mv", &Default::default(), "first job").await;
    let router = &proxy.ctx.router;
    // Everyone on pool 0, then the even channels to pool 1.
    router.move_to(|w| w.starts_with("mv."), Some(0));
    let floor = miners.accepted_by_user();
    every_channel_accepted(&miners, "mv", &floor, "all on pool 0").await;
    let on_zero = miners.stats();
    let even = |w: &str| {
        w.strip_prefix("mv.0.")
            .and_then(|k| k.parse::<usize>().ok())
            .is_some_and(|k| k % 2 == 0)
    };
    assert_eq!(router.move_to(even, Some(1)), CHANNELS / 2);
    let half = CHANNELS as u64 / 2;
    let moved = wait_until(Duration::from_secs(20), || {
        let s = miners.stats();
        s.set_groups >= on_zero.set_groups + half
            && s.standard_jobs + s.group_jobs >= on_zero.standard_jobs + on_zero.group_jobs + half
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let s = miners.stats();
    assert!(moved, "{s:?}");
    assert_eq!(
        (
            s.set_groups - on_zero.set_groups,
            s.standard_jobs - on_zero.standard_jobs,
            s.group_jobs - on_zero.group_jobs
        ),
        (half, half - 1, 1),
        "a SetGroupChannel for each moved channel; the first into pool 1's (new) group gets \
         the job as the group's, the others each alone"
    );
    let floor = miners.accepted_by_user();
    every_channel_accepted(&miners, "mv", &floor, "after the move").await;
    // Pool 0 and pool 1 each send the new block: one group job each.
    let d = announce(&pool, &miners, true, |d| d.group_prev_hashes >= 2).await;
    assert_eq!(
        d,
        Delta {
            standard_jobs: 0,
            group_jobs: 2,
            extended_jobs: 2,
            prev_hashes: 2,
            group_prev_hashes: 2,
        }
    );
    let floor = miners.accepted_by_user();
    every_channel_accepted(&miners, "mv", &floor, "after the block").await;
    assert_accounting(&proxy, &pool, &miners, "mv").await;
    let pools = router.pools();
    assert!(pools[0].stats.accepted.get() > 0 && pools[1].stats.accepted.get() > 0);
    let s = miners.stats();
    println!(
        "group channels on two pools: {} SetGroupChannel in all ({} for the move of {half}); \
         per block {d:?}; {} rejected",
        s.set_groups,
        s.set_groups - on_zero.set_groups,
        s.rejected
    );
    assert_eq!(s.rejected, 0, "rejects: {:?}", miners.reject_reasons());
    miners.stop();
    proxy.stop.cancel();
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requires_standard_jobs_keeps_a_job_per_channel() {
    let _gate = gridproxy_tests::module_gate(module_path!());
    let _serial = SERIAL.lock().await;
    init_tracing();
    let stop = CancellationToken::new();
    let pool = start_pool(&stop).await;
    let proxy = start_proxy(&pool).await;
    let miners = miners(&proxy, "std", true);
    every_channel_accepted(&miners, "std", &Default::default(), "first job").await;
    let n = CHANNELS as u64;
    let d = announce(&pool, &miners, true, |d| d.prev_hashes >= n).await;
    assert_eq!(
        d,
        Delta {
            standard_jobs: n,
            group_jobs: 0,
            extended_jobs: 0,
            prev_hashes: n,
            group_prev_hashes: 0,
        },
        "REQUIRES_STANDARD_JOBS: a NewMiningJob and a SetNewPrevHash per channel"
    );
    let floor = miners.accepted_by_user();
    every_channel_accepted(&miners, "std", &floor, "after the block").await;
    assert_accounting(&proxy, &pool, &miners, "std").await;
    let s = miners.stats();
    assert_eq!((s.group_jobs, s.extended_jobs, s.set_groups), (0, 0, 0));
    miners.stop();
    proxy.stop.cancel();
    stop.cancel();
}

/// SRI's `mining_device` sets `REQUIRES_STANDARD_JOBS` and fails on any
/// `NewExtendedMiningJob`: through gridproxy it keeps getting a
/// `NewMiningJob` on its channel for every block, and its shares go on
/// being accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mining_device_keeps_standard_jobs() {
    let _gate = gridproxy_tests::module_gate(module_path!());
    let _serial = SERIAL.lock().await;
    init_tracing();
    let stop = CancellationToken::new();
    let pool = start_pool(&stop).await;
    let proxy = start_proxy(&pool).await;
    let key = proxy_authority().public();
    let mut dev = spawn_mining_device(
        proxy.sv2_addr.unwrap(),
        Some(&key),
        MiningDeviceOptions {
            handicap_us: 1,
            nominal_hashrate_multiplier: Some(0.05),
            user: "grp.dev".into(),
            ..MiningDeviceOptions::default()
        },
    );
    const JOB: &str = "Received new mining job for channel id";
    assert!(
        dev.wait_for_log(MINING_DEVICE_ACCEPTED, Duration::from_secs(60))
            .await,
        "no share accepted; device log:\n{}",
        dev.log_tail(3000)
    );
    for b in 1..=2 {
        let jobs = dev.count_in_log(JOB);
        let accepted = dev.count_in_log(MINING_DEVICE_ACCEPTED);
        pool.new_block();
        assert!(
            dev.wait_for_log_count(JOB, jobs + 1, Duration::from_secs(20))
                .await,
            "block {b}: no NewMiningJob; device log:\n{}",
            dev.log_tail(3000)
        );
        assert!(
            dev.wait_for_log_count(
                MINING_DEVICE_ACCEPTED,
                accepted + 1,
                Duration::from_secs(60)
            )
            .await,
            "block {b}: no share accepted after it; device log:\n{}",
            dev.log_tail(3000)
        );
    }
    assert!(dev.is_running(), "device log:\n{}", dev.log_tail(3000));
    assert_eq!(pool.stats().rejected_total(), 0);
    dev.kill();
    proxy.stop.cancel();
    stop.cancel();
}
