//! gridproxy's SV2 listener: SRI's `mining_device` and the fixture SV2 miners
//! (standard and extended channels) mine through gridproxy into the real SRI
//! `pool_sv2` (fed by the fixture TP), next to 100 SV1 miners; the proxy's
//! per-worker upstream counts agree with what the pool acknowledged. A raw
//! client checks the protocol edges: several channels on one connection,
//! share answers and their error codes, UpdateChannel/CloseChannel, long
//! user identities, refused setups, malformed and oversized frames; stale
//! old-tip shares after a new block, blocks found through gridproxy reaching
//! the TP valid, and version rolling inside the allowed mask only.
//! Needs `scripts/peers.sh install`.

use gridproxy::config::Config;
use gridproxy_fixtures::stats::MinerStats;
use gridproxy_fixtures::sv1_miner::{self, Sv1MinerConfig};
use gridproxy_fixtures::sv2_miner::{ChannelKind, Sv2MinerConfig, Sv2Miners};
use gridproxy_protocol::difficulty::Target;
use gridproxy_protocol::share;
use gridproxy_protocol::sv2::{
    common_messages_sv2::{Protocol, SetupConnectionOwned},
    mining_sv2::{
        CloseChannelOwned, OpenExtendedMiningChannelOwned, OpenStandardMiningChannelOwned,
        SubmitSharesExtendedOwned, SubmitSharesStandard, UpdateChannelOwned,
    },
    AuthorityKeypair, AuthorityPublicKey, CommonMessagesOwned, Message, MiningOwned, NoiseCodec,
};
use gridproxy_proxy::stats::WorkerSnapshot;
use gridproxy_proxy::sv2_io::{connect_noise, next_msg};
use gridproxy_proxy::Proxy;
use gridproxy_tests::*;
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::bytes::BytesMut;
use tokio_util::codec::{Encoder, Framed};
use tokio_util::sync::CancellationToken;

/// gridproxy's own SV2 authority (not the pool's: miners pin the proxy).
fn proxy_authority() -> AuthorityKeypair {
    AuthorityKeypair::from_secret_bytes([0x5a; 32]).expect("valid secret")
}

/// Proxy config: `upstreams` SV2 pool entries (all pointing at `pool`, equal priority and
/// weight, so miners are split between them and can be moved), SV1 and SV2 listeners on free
/// ports, CPU-scale difficulty (`difficulty` adds keys to that section, `extra` whole sections).
fn proxy_config(pool: &Pool, upstreams: usize, difficulty: &str, extra: &str) -> Config {
    let kp = proxy_authority();
    let mut s = String::new();
    for i in 0..upstreams {
        s.push_str(&format!(
            "[[pools]]\nname = \"sri{i}\"\naddress = \"{}\"\nprotocol = \"sv2\"\nauthority_pubkey = \"{}\"\nuser = \"gridproxy-test\"\nnominal_hashrate = 250000.0\n\n",
            pool.addr, pool.authority_pubkey
        ));
    }
    s.push_str(&format!(
        r#"[listen]
sv1 = "127.0.0.1:0"
sv2 = "127.0.0.1:0"
sv2_authority_pubkey = "{pubkey}"
sv2_authority_secret = "{secret}"

[difficulty]
initial = 0.000003814697265625
min = 0.000000001
shares_per_minute = 20.0
{difficulty}

[routing]
reconnect_ms = 100

{extra}"#,
        pubkey = kp.public(),
        secret = kp.secret_string(),
    ));
    Config::parse(&s, "test").expect("valid test config")
}

async fn start_proxy(pool: &Pool, upstreams: usize, difficulty: &str, extra: &str) -> Proxy {
    let proxy = gridproxy_tests::start_proxy(proxy_config(pool, upstreams, difficulty, extra))
        .await
        .unwrap();
    let live = wait_until(Duration::from_secs(30), || {
        proxy
            .ctx
            .router
            .pools()
            .iter()
            .all(|p| p.view.borrow().live)
    })
    .await;
    assert!(
        live,
        "upstream never went live; pool log:\n{}",
        pool.process.log_tail(3000)
    );
    proxy
}

/// Poll an async condition.
async fn wait_until_async<F, Fut>(timeout: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if f().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn sum(workers: &[WorkerSnapshot], f: fn(&WorkerSnapshot) -> u64) -> u64 {
    workers.iter().map(f).sum()
}

/// The proxy's per-worker acks add up to its pool counters, and pool_sv2's own metric agrees
/// (every upstream entry is a channel to the same pool_sv2). Returns the acks.
async fn assert_upstream_accounting(proxy: &Proxy, pool: &Pool) -> u64 {
    let pools = proxy.ctx.router.pools();
    let total = |f: fn(&gridproxy_proxy::stats::PoolStats) -> u64| -> u64 {
        pools.iter().map(|p| f(&p.stats)).sum()
    };
    // Let in-flight acknowledgements land.
    let settled = wait_until(Duration::from_secs(10), || {
        total(|s| s.submitted.get()) == total(|s| s.accepted.get()) + total(|s| s.rejected.get())
    })
    .await;
    assert!(
        settled,
        "pool left shares unanswered: sent {} acked {} rejected {}",
        total(|s| s.submitted.get()),
        total(|s| s.accepted.get()),
        total(|s| s.rejected.get())
    );
    let workers = proxy.ctx.registry.snapshot();
    let acked = total(|s| s.accepted.get());
    assert_eq!(
        sum(&workers, |w| w.upstream_accepted),
        acked,
        "per-worker upstream_accepted vs pool stats"
    );
    assert_eq!(
        sum(&workers, |w| w.upstream_rejected),
        total(|s| s.rejected.get())
    );
    let ok = wait_until_async(Duration::from_secs(10), || async {
        pool.shares_accepted().await >= acked as f64
    })
    .await;
    let theirs = pool.shares_accepted().await;
    assert!(
        ok && theirs == acked as f64,
        "pool_sv2 reports {theirs} accepted, gridproxy counted {acked}"
    );
    acked
}

fn device_opts(user: &str) -> MiningDeviceOptions {
    MiningDeviceOptions {
        // A fraction of a core; it announces 1/20 of its measured rate, so its
        // first target is easy and vardiff has to raise it (SetTarget).
        handicap_us: 1,
        nominal_hashrate_multiplier: Some(0.05),
        user: user.into(),
        ..MiningDeviceOptions::default()
    }
}

// ---------------------------------------------------------------------------------------------
// (a) SRI mining_device → gridproxy → pool_sv2

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mining_device_through_gridproxy_into_pool_sv2() {
    let _gate = gridproxy_tests::module_gate(module_path!());
    let _serial = SERIAL.lock().await;
    init_tracing();
    let tp = start_quiet_tp().await;
    let pool = start_pool(tp.addr()).await;
    let proxy = start_proxy(&pool, 2, "retarget_secs = 3", "").await;
    let key = proxy_authority().public();
    let mut dev = spawn_mining_device(proxy.sv2_addr.unwrap(), Some(&key), device_opts("sv2.dev"));

    let pools = proxy.ctx.router.pools();
    let acked_by = |p: usize| pools[p].stats.accepted.get();
    let flowing = wait_until(Duration::from_secs(90), || acked_by(0) + acked_by(1) >= 10).await;
    assert!(
        flowing,
        "pools acknowledged {} + {} shares from gridproxy; proxy workers {:?}\ndevice log:\n{}\npool log:\n{}",
        acked_by(0),
        acked_by(1),
        proxy.ctx.registry.snapshot(),
        dev.log_tail(3000),
        pool.process.log_tail(3000)
    );
    assert!(
        dev.wait_for_log_count(MINING_DEVICE_ACCEPTED, 10, Duration::from_secs(30))
            .await,
        "device saw too few SubmitShares.Success; log:\n{}",
        dev.log_tail(3000)
    );
    // Move the device to the other upstream channel: a future job + SetNewPrevHash on the
    // same SV2 channel, no reconnect.
    let home = proxy
        .ctx
        .router
        .shares()
        .iter()
        .find(|s| s.miners == 1)
        .map(|s| s.pool)
        .expect("device assigned");
    let other = 1 - home;
    let before = acked_by(other);
    assert_eq!(proxy.ctx.router.move_to(|w| w == "sv2.dev", Some(other)), 1);
    let moved = wait_until(Duration::from_secs(60), || acked_by(other) >= before + 5).await;
    assert!(
        moved,
        "no shares through upstream {other} after the move; device log:\n{}",
        dev.log_tail(3000)
    );
    assert!(
        dev.is_running(),
        "mining_device exited:\n{}",
        dev.log_tail(3000)
    );
    assert!(dev.count_in_log("Received SetNewPrevHash") >= 2);
    dev.kill();
    let acked = assert_upstream_accounting(&proxy, &pool).await;

    let w = proxy
        .ctx
        .registry
        .get("sv2.dev")
        .expect("worker by user_identity");
    let w = w.snapshot();
    let device_acked = dev.count_in_log(MINING_DEVICE_ACCEPTED) as u64;
    let device_rejected = dev.count_in_log("Received SubmitSharesError") as u64;
    eprintln!(
        "mining_device: told accepted {device_acked}, rejected {device_rejected}; proxy worker {w:?}; pool acked {acked}"
    );
    // Every Success the device read is one the proxy counted (it may have died before
    // reading the last few).
    assert!(device_acked <= w.accepted && device_acked >= 10, "{w:?}");
    assert_eq!(w.upstream_accepted, acked, "the only worker");
    assert!(w.forwarded >= acked);
    assert_eq!(w.upstream_rejected, 0);
    assert_eq!(pool.shares_rejected().await, 0.0);
    assert_eq!(
        w.rejected.iter().map(|(_, n)| n).sum::<u64>(),
        device_rejected,
        "proxy rejections vs device log: {:?}",
        w.rejected
    );
    // Vardiff moved the device's target at least once without breaking it.
    assert!(
        dev.count_in_log("Received SetTarget") >= 1,
        "{}",
        dev.log_tail(2000)
    );
    proxy.stop.cancel();
}

// ---------------------------------------------------------------------------------------------
// (b) fixture SV2 miners, standard and extended channels

fn fixture_miners(
    addr: SocketAddr,
    key: AuthorityPublicKey,
    kind: ChannelKind,
    user: &str,
) -> Sv2Miners {
    Sv2Miners::start(Sv2MinerConfig {
        channel: kind,
        count: 3,
        user_identity: user.into(),
        ..Sv2MinerConfig::new(addr, key, 20_000.0)
    })
}

async fn wait_fixture(miners: &Sv2Miners, n: u64, what: &str, pool: &Pool) {
    if let Err(s) = miners.wait_accepted(n, Duration::from_secs(60)).await {
        panic!(
            "{what}: only {} of {n} shares accepted: {s:?}, last error {:?}, rejects {:?}; pool log:\n{}",
            s.accepted,
            miners.last_error(),
            miners.reject_reasons(),
            pool.process.log_tail(2000)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fixture_sv2_miners_standard_and_extended_through_gridproxy() {
    let _gate = gridproxy_tests::module_gate(module_path!());
    let _serial = SERIAL.lock().await;
    init_tracing();
    let tp = start_quiet_tp().await;
    let pool = start_pool(tp.addr()).await;
    let proxy = start_proxy(&pool, 2, "", "").await;
    let addr = proxy.sv2_addr.unwrap();
    let key = proxy_authority().public();
    let std = fixture_miners(addr, key, ChannelKind::Standard, "std");
    let ext = fixture_miners(
        addr,
        key,
        ChannelKind::Extended { extranonce_size: 4 },
        "ext",
    );
    // Asks for more extranonce than the proxy hands out: refused, never opened.
    let greedy = Sv2Miners::start(Sv2MinerConfig {
        channel: ChannelKind::Extended { extranonce_size: 9 },
        user_identity: "greedy".into(),
        ..Sv2MinerConfig::new(addr, key, 1_000.0)
    });

    wait_fixture(&std, 10, "standard", &pool).await;
    wait_fixture(&ext, 10, "extended", &pool).await;

    // A new block: every channel gets a future job + SetNewPrevHash and keeps mining.
    let (s0, e0) = (std.stats(), ext.stats());
    tp.new_block();
    wait_fixture(&std, s0.accepted + 10, "standard after a new block", &pool).await;
    wait_fixture(&ext, e0.accepted + 10, "extended after a new block", &pool).await;

    // Everyone onto upstream 1: each channel switches pools without reconnecting.
    let pools = proxy.ctx.router.pools();
    let (s1, e1, before) = (std.stats(), ext.stats(), pools[1].stats.accepted.get());
    assert_eq!(proxy.ctx.router.move_to(|_| true, Some(1)), 6);
    wait_fixture(&std, s1.accepted + 10, "standard after a pool move", &pool).await;
    wait_fixture(&ext, e1.accepted + 10, "extended after a pool move", &pool).await;
    // The pool's answers to the forwarded shares come after the miners'
    // (answered by gridproxy at once): wait for them.
    assert!(
        wait_until(Duration::from_secs(20), || pools[1].stats.accepted.get()
            > before)
        .await,
        "upstream 1 acknowledged no share after the move ({} before)",
        before
    );
    let shares = proxy.ctx.router.shares();
    assert_eq!((shares[0].miners, shares[1].miners), (0, 6), "{shares:?}");
    std.stop();
    ext.stop();

    let (s, e, g) = (std.stats(), ext.stats(), greedy.stats());
    greedy.stop();
    eprintln!("standard {s:?}\nextended {e:?}\ngreedy {g:?}");
    // Three channels each, never reopened (new block and pool move included).
    assert_eq!((s.channels_opened, s.disconnects), (3, 0), "{s:?}");
    assert_eq!((e.channels_opened, e.disconnects), (3, 0), "{e:?}");
    assert_eq!(g.channels_opened, 0, "{g:?}");
    assert!(g.connect_failures >= 1, "{g:?}");
    assert!(s.jobs > 3 && e.jobs > 3);
    // Shares in flight when the block or the pool changed are stale; nothing else is refused.
    for r in std
        .reject_reasons()
        .iter()
        .chain(ext.reject_reasons().iter())
    {
        assert_eq!(r, "stale-share", "unexpected rejection");
    }

    tokio::time::sleep(Duration::from_millis(500)).await;
    let workers = proxy.ctx.registry.snapshot();
    let by = |prefix: &str| -> Vec<WorkerSnapshot> {
        workers
            .iter()
            .filter(|w| w.name.starts_with(prefix))
            .cloned()
            .collect()
    };
    let (sw, ew) = (by("std."), by("ext."));
    assert_eq!((sw.len(), ew.len()), (3, 3), "{workers:?}");
    // What the miners were told equals what the proxy counted.
    assert_eq!(sum(&sw, |w| w.accepted), s.accepted);
    assert_eq!(sum(&ew, |w| w.accepted), e.accepted);
    let acked = assert_upstream_accounting(&proxy, &pool).await;
    assert!(acked > 0);
    assert!(sum(&sw, |w| w.upstream_accepted) > 0 && sum(&ew, |w| w.upstream_accepted) > 0);
    proxy.stop.cancel();
}

// ---------------------------------------------------------------------------------------------
// (c) mining_device + 100 SV1 miners at once

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mining_device_and_hundred_sv1_miners_through_gridproxy() {
    let _gate = gridproxy_tests::module_gate(module_path!());
    let _serial = SERIAL.lock().await;
    init_tracing();
    let tp = start_quiet_tp().await;
    let pool = start_pool(tp.addr()).await;
    let proxy = start_proxy(&pool, 1, "", "").await;
    let key = proxy_authority().public();
    let mut dev = spawn_mining_device(
        proxy.sv2_addr.unwrap(),
        Some(&key),
        device_opts("site.sv2dev"),
    );
    let miners = Arc::new(MinerStats::default());
    let stop = CancellationToken::new();
    for i in 0..100 {
        let mut cfg = Sv1MinerConfig::new(proxy.sv1_addr.unwrap(), format!("site.rig.{i}"));
        cfg.hashrate = 5_000.0;
        cfg.version_rolling = i % 2 == 0;
        tokio::spawn(sv1_miner::run(cfg, miners.clone(), stop.clone()));
    }

    let up = proxy.ctx.router.pools()[0].stats.clone();
    let dev_worker = || {
        proxy
            .ctx
            .registry
            .get("site.sv2dev")
            .map(|w| w.upstream_accepted.get())
            .unwrap_or(0)
    };
    let flowing = wait_until(Duration::from_secs(120), || {
        up.accepted.get() >= 50 && dev_worker() >= 5
    })
    .await;
    assert!(
        flowing,
        "pool acked {} (sent {}), device's share of it {}; sv1 miners accepted {} rejected {}\ndevice log:\n{}\npool log:\n{}",
        up.accepted.get(),
        up.submitted.get(),
        dev_worker(),
        miners.accepted.get(),
        miners.rejected.get(),
        dev.log_tail(2000),
        pool.process.log_tail(2000)
    );
    stop.cancel();
    assert!(
        dev.is_running(),
        "mining_device exited:\n{}",
        dev.log_tail(3000)
    );
    dev.kill();
    let acked = assert_upstream_accounting(&proxy, &pool).await;

    let workers = proxy.ctx.registry.snapshot();
    assert_eq!(workers.len(), 101, "100 SV1 workers and the SV2 device");
    let sv1: Vec<WorkerSnapshot> = workers
        .iter()
        .filter(|w| w.name.starts_with("site.rig."))
        .cloned()
        .collect();
    assert_eq!(
        miners.rejected.get(),
        0,
        "sv1 rejects: {:?}",
        miners.reject_reasons()
    );
    assert_eq!(sum(&sv1, |w| w.accepted), miners.accepted.get());
    assert!(sv1.iter().filter(|w| w.upstream_accepted > 0).count() > 10);
    assert_eq!(pool.shares_rejected().await, 0.0);
    eprintln!(
        "pool acked {acked}: sv1 {} + mining_device {}",
        sum(&sv1, |w| w.upstream_accepted),
        dev_worker()
    );
    proxy.stop.cancel();
}

// ---------------------------------------------------------------------------------------------
// Protocol edges with a raw client

/// A raw SV2 client. Messages not yet asked for wait in `inbox`, so expectations
/// need not guess the order in which channels' messages interleave.
struct Client {
    framed: Framed<TcpStream, NoiseCodec>,
    inbox: VecDeque<Message>,
}

impl Client {
    async fn connect(addr: SocketAddr) -> Client {
        let stream = TcpStream::connect(addr).await.unwrap();
        let framed = connect_noise(stream, &proxy_authority().public())
            .await
            .expect("handshake with gridproxy's key");
        Client {
            framed,
            inbox: VecDeque::new(),
        }
    }

    /// Encode with the session's codec and write straight to the socket (the
    /// `Framed` write buffer is never used, so nothing can be reordered).
    async fn write(&mut self, m: Message) {
        let mut buf = BytesMut::new();
        self.framed.codec_mut().encode(m, &mut buf).unwrap();
        self.framed.get_mut().write_all(&buf).await.unwrap();
    }

    async fn send(&mut self, m: MiningOwned) {
        self.write(Message::Mining(m)).await;
    }

    async fn setup(&mut self, protocol: Protocol, flags: u32) -> Message {
        let s = SetupConnectionOwned {
            protocol,
            min_version: 2,
            max_version: 2,
            flags,
            endpoint_host: "127.0.0.1".to_string().try_into().unwrap(),
            endpoint_port: 0,
            vendor: "test".to_string().try_into().unwrap(),
            hardware_version: "".to_string().try_into().unwrap(),
            firmware: "".to_string().try_into().unwrap(),
            device_id: "raw".to_string().try_into().unwrap(),
        };
        self.write(Message::Common(CommonMessagesOwned::SetupConnection(s)))
            .await;
        self.recv().await.expect("setup answer")
    }

    async fn recv(&mut self) -> Option<Message> {
        match tokio::time::timeout(Duration::from_secs(20), next_msg(&mut self.framed)).await {
            Ok(Ok(m)) => Some(m),
            _ => None,
        }
    }

    /// Take the first message (waiting or new) that `f` maps to Some.
    async fn expect<T>(&mut self, what: &str, f: impl Fn(&MiningOwned) -> Option<T>) -> T {
        let hit = self.inbox.iter().position(|m| match m {
            Message::Mining(m) => f(m).is_some(),
            _ => false,
        });
        if let Some(i) = hit {
            if let Some(Message::Mining(m)) = self.inbox.remove(i) {
                return f(&m).expect("matched above");
            }
        }
        loop {
            match self.recv().await {
                Some(Message::Mining(m)) => match f(&m) {
                    Some(t) => return t,
                    None => self.inbox.push_back(Message::Mining(m)),
                },
                Some(other) => self.inbox.push_back(other),
                None => panic!(
                    "connection ended or timed out waiting for {what}; unread: {:?}",
                    self.inbox
                ),
            }
        }
    }

    /// Whether the proxy closed the connection (within a few seconds).
    async fn closed(&mut self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            match tokio::time::timeout(Duration::from_secs(10), next_msg(&mut self.framed)).await {
                Ok(Ok(_)) => continue,
                Ok(Err(_)) => return true,
                Err(_) => return false,
            }
        }
        false
    }
}

/// A standard job as the miner sees it.
#[derive(Debug, Clone)]
struct StdWork {
    job_id: u32,
    version: u32,
    merkle_root: [u8; 32],
    prev_hash: [u8; 32],
    nbits: u32,
    ntime: u32,
}

/// An extended job as the miner sees it.
#[derive(Debug, Clone)]
struct ExtWork {
    job_id: u32,
    version: u32,
    prefix: Vec<u8>,
    suffix: Vec<u8>,
    path: Vec<[u8; 32]>,
    prev_hash: [u8; 32],
    nbits: u32,
    ntime: u32,
}

fn error_code(m: &MiningOwned) -> Option<(u32, String)> {
    match m {
        MiningOwned::SubmitSharesError(e) => Some((
            e.sequence_number,
            String::from_utf8_lossy(e.error_code.as_bytes()).into_owned(),
        )),
        _ => None,
    }
}

/// Find a nonce whose header hash meets (or, with `meet == false`, misses) `target`.
fn find_nonce(hash: impl Fn(u32) -> [u8; 32], target: &Target, meet: bool) -> u32 {
    (0..u32::MAX)
        .find(|n| target.is_met_by(&hash(*n)) == meet)
        .expect("some nonce")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sv2_protocol_edges_with_a_raw_client() {
    let _gate = gridproxy_tests::module_gate(module_path!());
    let _serial = SERIAL.lock().await;
    init_tracing();
    let tp = start_quiet_tp().await;
    let pool = start_pool(tp.addr()).await;
    let proxy = start_proxy(
        &pool,
        1,
        "",
        "[limits]\nmax_frame = 280\nhandshake_timeout_secs = 2\nmax_worker_name = 128\n\
         max_channels_per_connection = 2\n",
    )
    .await;
    let addr = proxy.sv2_addr.unwrap();

    // Not the mining protocol: SetupConnection.Error, then the proxy hangs up.
    let mut c = Client::connect(addr).await;
    match c.setup(Protocol::TemplateDistributionProtocol, 0).await {
        Message::Common(CommonMessagesOwned::SetupConnectionError(e)) => {
            assert_eq!(e.error_code.as_bytes(), b"unsupported-protocol")
        }
        other => panic!("expected SetupConnection.Error, got {other:?}"),
    }
    assert!(c.closed().await);
    // Work selection is not offered.
    let mut c = Client::connect(addr).await;
    match c.setup(Protocol::MiningProtocol, 0b10).await {
        Message::Common(CommonMessagesOwned::SetupConnectionError(e)) => {
            assert_eq!(e.error_code.as_bytes(), b"unsupported-feature-flags");
            assert_eq!(e.flags, 0b10);
        }
        other => panic!("expected SetupConnection.Error, got {other:?}"),
    }

    // TCP only, no handshake: dropped after the handshake timeout.
    let mut idle = TcpStream::connect(addr).await.unwrap();
    let mut buf = [0u8; 16];
    let r = tokio::time::timeout(Duration::from_secs(8), idle.read(&mut buf)).await;
    assert!(
        matches!(r, Ok(Ok(0)) | Ok(Err(_))),
        "handshake timeout: {r:?}"
    );

    // A proper connection with several channels.
    let mut c = Client::connect(addr).await;
    match c.setup(Protocol::MiningProtocol, 0).await {
        Message::Common(CommonMessagesOwned::SetupConnectionSuccess(s)) => {
            assert_eq!(s.used_version, 2)
        }
        other => panic!("expected SetupConnection.Success, got {other:?}"),
    }
    // A 200-byte user identity: kept, cut to max_worker_name for stats.
    let long_user = format!("farm.{}", "x".repeat(195));
    c.send(MiningOwned::OpenStandardMiningChannel(
        OpenStandardMiningChannelOwned {
            request_id: 1,
            user_identity: long_user.clone().try_into().unwrap(),
            nominal_hash_rate: 1.0,
            max_target: [0xff; 32].into(),
        },
    ))
    .await;
    let (std_id, std_target, std_prefix, std_group) = c
        .expect("OpenStandardMiningChannel.Success", |m| match m {
            MiningOwned::OpenStandardMiningChannelSuccess(s) if s.request_id == 1 => Some((
                s.channel_id,
                Target::from_le_bytes(s.target.to_array()),
                s.extranonce_prefix.as_bytes().to_vec(),
                s.group_channel_id,
            )),
            _ => None,
        })
        .await;
    assert_eq!(std_prefix.len(), 3, "miner part");
    // No REQUIRES_STANDARD_JOBS: the standard channel is in a group of its own id.
    assert!(std_group != 0 && std_group != std_id, "group {std_group}");
    // nominal 1 H/s: the configured floor, rounded up to a power of two (2^-29).
    assert_eq!(std_target, Target::from_difficulty(2f64.powi(-29)));
    c.send(MiningOwned::OpenExtendedMiningChannel(
        OpenExtendedMiningChannelOwned {
            request_id: 2,
            user_identity: "farm.ext".to_string().try_into().unwrap(),
            nominal_hash_rate: 1.0,
            max_target: [0xff; 32].into(),
            min_extranonce_size: 4,
        },
    ))
    .await;
    let (ext_id, ext_size, ext_prefix) = c
        .expect("OpenExtendedMiningChannel.Success", |m| match m {
            MiningOwned::OpenExtendedMiningChannelSuccess(s) if s.request_id == 2 => Some((
                s.channel_id,
                s.extranonce_size,
                s.extranonce_prefix.as_bytes().to_vec(),
            )),
            _ => None,
        })
        .await;
    assert_ne!(std_id, ext_id);
    assert_ne!(std_group, ext_id, "one id space for channels and groups");
    assert_eq!(ext_size, 4);
    assert_ne!(ext_prefix, std_prefix, "miner parts are unique");
    // More extranonce than configured: refused, the connection stays.
    c.send(MiningOwned::OpenExtendedMiningChannel(
        OpenExtendedMiningChannelOwned {
            request_id: 3,
            user_identity: "farm.greedy".to_string().try_into().unwrap(),
            nominal_hash_rate: 1.0,
            max_target: [0xff; 32].into(),
            min_extranonce_size: 9,
        },
    ))
    .await;
    let code = c
        .expect("OpenMiningChannel.Error", |m| match m {
            MiningOwned::OpenMiningChannelError(e) if e.request_id == 3 => {
                Some(String::from_utf8_lossy(e.error_code.as_bytes()).into_owned())
            }
            _ => None,
        })
        .await;
    assert_eq!(code, "min-extranonce-size-too-large");
    // A third channel on this connection: over max_channels_per_connection.
    c.send(MiningOwned::OpenStandardMiningChannel(
        OpenStandardMiningChannelOwned {
            request_id: 4,
            user_identity: "farm.third".to_string().try_into().unwrap(),
            nominal_hash_rate: 1.0,
            max_target: [0xff; 32].into(),
        },
    ))
    .await;
    let code = c
        .expect(
            "OpenMiningChannel.Error for the third channel",
            |m| match m {
                MiningOwned::OpenMiningChannelError(e) if e.request_id == 4 => {
                    Some(String::from_utf8_lossy(e.error_code.as_bytes()).into_owned())
                }
                _ => None,
            },
        )
        .await;
    assert_eq!(code, "channel-capacity-exhausted");
    assert_eq!(proxy.ctx.trips.channels.get(), 1);

    // Each channel got a future job activated by SetNewPrevHash: the
    // standard channel through its group (it was the group's only member
    // when the job went out), as an extended job whose coinbase takes the
    // channel's prefix.
    let j = c
        .expect("standard channel's group future job", |m| match m {
            MiningOwned::NewExtendedMiningJob(j) if j.channel_id == std_group => Some(j.clone()),
            _ => None,
        })
        .await;
    assert!(
        j.min_ntime.clone().into_inner().is_none(),
        "first job is a future job"
    );
    let p = c
        .expect("group SetNewPrevHash", |m| match m {
            MiningOwned::SetNewPrevHash(p) if p.channel_id == std_group => Some(p.clone()),
            _ => None,
        })
        .await;
    assert_eq!(j.job_id, p.job_id);
    let sw = StdWork {
        job_id: j.job_id,
        version: j.version,
        merkle_root: share::merkle_root(
            &[
                j.coinbase_tx_prefix.as_bytes(),
                &std_prefix,
                j.coinbase_tx_suffix.as_bytes(),
            ],
            &j.merkle_path
                .iter()
                .map(|h| h.to_array())
                .collect::<Vec<_>>(),
        ),
        prev_hash: p.prev_hash.to_array(),
        nbits: p.nbits,
        ntime: p.min_ntime,
    };
    let j = c
        .expect("extended future job", |m| match m {
            MiningOwned::NewExtendedMiningJob(j) if j.channel_id == ext_id => Some(j.clone()),
            _ => None,
        })
        .await;
    assert!(
        j.min_ntime.clone().into_inner().is_none(),
        "first job is a future job"
    );
    let p = c
        .expect("extended SetNewPrevHash", |m| match m {
            MiningOwned::SetNewPrevHash(p) if p.channel_id == ext_id => Some(p.clone()),
            _ => None,
        })
        .await;
    assert_eq!(j.job_id, p.job_id);
    let ew = ExtWork {
        job_id: j.job_id,
        version: j.version,
        prefix: j.coinbase_tx_prefix.as_bytes().to_vec(),
        suffix: j.coinbase_tx_suffix.as_bytes().to_vec(),
        path: j.merkle_path.iter().map(|h| h.to_array()).collect(),
        prev_hash: p.prev_hash.to_array(),
        nbits: p.nbits,
        ntime: p.min_ntime,
    };
    assert_eq!(sw.prev_hash, ew.prev_hash);

    // Standard channel: a share meeting the channel target → Success; again → duplicate;
    // unknown job → stale; a hash above the target → difficulty-too-low.
    let std_hash = |n: u32| {
        share::sha256d(&share::header(
            sw.version,
            &sw.prev_hash,
            &sw.merkle_root,
            sw.ntime,
            sw.nbits,
            n,
        ))
    };
    let good = find_nonce(std_hash, &std_target, true);
    let bad = find_nonce(std_hash, &std_target, false);
    let submit = |seq: u32, job_id: u32, nonce: u32| {
        MiningOwned::SubmitSharesStandard(SubmitSharesStandard {
            channel_id: std_id,
            sequence_number: seq,
            job_id,
            nonce,
            ntime: sw.ntime,
            version: sw.version,
        })
    };
    c.send(submit(10, sw.job_id, good)).await;
    let ok = c
        .expect("SubmitShares.Success", |m| match m {
            MiningOwned::SubmitSharesSuccess(s) if s.channel_id == std_id => Some(s.clone()),
            MiningOwned::SubmitSharesError(e) if e.channel_id == std_id => {
                panic!("share refused: {e:?}")
            }
            _ => None,
        })
        .await;
    assert_eq!(
        (ok.last_sequence_number, ok.new_submits_accepted_count),
        (10, 1)
    );
    c.send(submit(11, sw.job_id, good)).await;
    c.send(submit(12, sw.job_id.wrapping_add(1000), good)).await;
    c.send(submit(13, sw.job_id, bad)).await;
    let mut codes = Vec::new();
    while codes.len() < 3 {
        codes.push(c.expect("SubmitShares.Error", error_code).await);
    }
    assert_eq!(
        codes,
        vec![
            (11, "duplicate-share".to_string()),
            (12, "stale-share".to_string()),
            (13, "difficulty-too-low".to_string())
        ]
    );

    // The standard channel's merkle root (from its group's job) is the extended coinbase
    // with this channel's miner part and zeros in place of extranonce2 (both channels
    // derive from the same pool job).
    let std_root = share::merkle_root(&[&ew.prefix, &std_prefix, &[0u8; 4], &ew.suffix], &ew.path);
    if ew.ntime == sw.ntime {
        assert_eq!(std_root, sw.merkle_root);
    }

    // Extended channel: the miner rolls 4 bytes after its prefix.
    let en2 = [1u8, 2, 3, 4];
    let root = share::merkle_root(&[&ew.prefix, &ext_prefix, &en2, &ew.suffix], &ew.path);
    let ext_hash = |n: u32| {
        share::sha256d(&share::header(
            ew.version,
            &ew.prev_hash,
            &root,
            ew.ntime,
            ew.nbits,
            n,
        ))
    };
    let ext_target = Target::from_difficulty(2f64.powi(-29));
    let good = find_nonce(ext_hash, &ext_target, true);
    let ext_submit = |seq: u32, extranonce: Vec<u8>| {
        MiningOwned::SubmitSharesExtended(SubmitSharesExtendedOwned {
            channel_id: ext_id,
            sequence_number: seq,
            job_id: ew.job_id,
            nonce: good,
            ntime: ew.ntime,
            version: ew.version,
            extranonce: extranonce.try_into().unwrap(),
        })
    };
    c.send(ext_submit(20, en2.to_vec())).await;
    c.expect("extended SubmitShares.Success", |m| match m {
        MiningOwned::SubmitSharesSuccess(s) if s.channel_id == ext_id => {
            assert_eq!(s.last_sequence_number, 20);
            Some(())
        }
        MiningOwned::SubmitSharesError(e) if e.channel_id == ext_id => {
            panic!("extended share refused: {e:?}")
        }
        _ => None,
    })
    .await;
    c.send(ext_submit(21, vec![1, 2, 3])).await;
    assert_eq!(
        c.expect("SubmitShares.Error", error_code).await,
        (21, "invalid-job-id".to_string()),
        "wrong extranonce size"
    );
    // Unknown channel.
    c.send(MiningOwned::SubmitSharesStandard(SubmitSharesStandard {
        channel_id: 999,
        sequence_number: 30,
        job_id: 1,
        nonce: 0,
        ntime: 0,
        version: 0,
    }))
    .await;
    assert_eq!(
        c.expect("SubmitShares.Error", error_code).await,
        (30, "invalid-channel-id".to_string())
    );

    // UpdateChannel: the proxy answers with the new target.
    c.send(MiningOwned::UpdateChannel(UpdateChannelOwned {
        channel_id: std_id,
        nominal_hash_rate: 1.0e6,
        maximum_target: [0xff; 32].into(),
    }))
    .await;
    let t = c
        .expect("SetTarget", |m| match m {
            MiningOwned::SetTarget(t) if t.channel_id == std_id => {
                Some(Target::from_le_bytes(t.maximum_target.to_array()))
            }
            _ => None,
        })
        .await;
    // 1 MH/s at 20 shares/min: 1e6·60/(20·2^32) ≈ 0.0007 → 2^-11.
    assert_eq!(t, Target::from_difficulty(2f64.powi(-11)));
    c.send(MiningOwned::UpdateChannel(UpdateChannelOwned {
        channel_id: 777,
        nominal_hash_rate: 1.0,
        maximum_target: [0xff; 32].into(),
    }))
    .await;
    c.expect("UpdateChannel.Error", |m| match m {
        MiningOwned::UpdateChannelError(e) if e.channel_id == 777 => {
            assert_eq!(e.error_code.as_bytes(), b"invalid-channel-id");
            Some(())
        }
        _ => None,
    })
    .await;

    // Worker stats: the long name cut to 128 bytes, one live connection each.
    let long = proxy
        .ctx
        .registry
        .get(&long_user[..128])
        .expect("worker under the truncated name");
    assert_eq!(long.accepted.get(), 1);
    assert_eq!(
        long.connections.load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    let slots_before = proxy.ctx.slots_in_use();

    // CloseChannel: the channel is gone (its miner part and router entry too).
    c.send(MiningOwned::CloseChannel(CloseChannelOwned {
        channel_id: std_id,
        reason_code: "bye".to_string().try_into().unwrap(),
    }))
    .await;
    assert!(
        wait_until(Duration::from_secs(5), || proxy.ctx.slots_in_use()
            == slots_before - 1)
        .await
    );
    assert_eq!(
        long.connections.load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    c.send(submit(40, sw.job_id, good)).await;
    assert_eq!(
        c.expect("SubmitShares.Error", error_code).await,
        (40, "invalid-channel-id".to_string())
    );

    // A frame above max_frame (a 255-byte user identity): dropped, and only this client.
    let mut big = Client::connect(addr).await;
    assert!(matches!(
        big.setup(Protocol::MiningProtocol, 1).await,
        Message::Common(CommonMessagesOwned::SetupConnectionSuccess(_))
    ));
    big.send(MiningOwned::OpenStandardMiningChannel(
        OpenStandardMiningChannelOwned {
            request_id: 1,
            user_identity: "y".repeat(255).try_into().unwrap(),
            nominal_hash_rate: 1.0,
            max_target: [0xff; 32].into(),
        },
    ))
    .await;
    assert!(
        big.closed().await,
        "oversized frame must close the connection"
    );

    // Garbage after the handshake: decryption fails, the connection is dropped.
    let mut junk = Client::connect(addr).await;
    junk.framed.get_mut().write_all(&[0x55; 64]).await.unwrap();
    assert!(
        junk.closed().await,
        "undecryptable bytes must close the connection"
    );

    // The well-behaved client is unaffected: its extended channel still answers.
    c.send(ext_submit(50, en2.to_vec())).await;
    assert_eq!(
        c.expect("SubmitShares.Error", error_code).await,
        (50, "duplicate-share".to_string())
    );
    drop(c);
    assert!(
        wait_until(Duration::from_secs(5), || proxy.ctx.slots_in_use() == 0).await,
        "slots leaked: {}",
        proxy.ctx.slots_in_use()
    );
    proxy.stop.cancel();
}

// ---------------------------------------------------------------------------------------------
// (d) a new block, a block found, version rolling

/// Opens a standard channel on a set-up connection and waits for its first
/// job (a future job activated by SetNewPrevHash): its id and target, and
/// the work.
async fn open_standard(c: &mut Client, request_id: u32, user: &str) -> (u32, Target, StdWork) {
    c.send(MiningOwned::OpenStandardMiningChannel(
        OpenStandardMiningChannelOwned {
            request_id,
            user_identity: user.to_string().try_into().unwrap(),
            nominal_hash_rate: 1.0,
            max_target: [0xff; 32].into(),
        },
    ))
    .await;
    let (id, target) = c
        .expect("OpenStandardMiningChannel.Success", |m| match m {
            MiningOwned::OpenStandardMiningChannelSuccess(s) if s.request_id == request_id => {
                Some((s.channel_id, Target::from_le_bytes(s.target.to_array())))
            }
            _ => None,
        })
        .await;
    let work = next_tip(c, id, None).await;
    (id, target, work)
}

/// The first job on channel `id` of a tip other than `old` (any tip if
/// None): its SetNewPrevHash and the job it activates.
async fn next_tip(c: &mut Client, id: u32, old: Option<[u8; 32]>) -> StdWork {
    let p = c
        .expect("SetNewPrevHash", |m| match m {
            MiningOwned::SetNewPrevHash(p)
                if p.channel_id == id && Some(p.prev_hash.to_array()) != old =>
            {
                Some(p.clone())
            }
            _ => None,
        })
        .await;
    let j = c
        .expect("the job SetNewPrevHash activates", |m| match m {
            MiningOwned::NewMiningJob(j) if j.channel_id == id && j.job_id == p.job_id => {
                Some(j.clone())
            }
            _ => None,
        })
        .await;
    assert!(
        j.min_ntime.clone().into_inner().is_none(),
        "the first job of a tip is a future job"
    );
    StdWork {
        job_id: j.job_id,
        version: j.version,
        merkle_root: j.merkle_root.to_array(),
        prev_hash: p.prev_hash.to_array(),
        nbits: p.nbits,
        ntime: p.min_ntime,
    }
}

/// Nonces from `from` on whose header (with `version`) meets `target`.
fn nonce_from(w: &StdWork, version: u32, target: &Target, from: u32) -> u32 {
    (from..u32::MAX)
        .find(|n| {
            target.is_met_by(&share::sha256d(&share::header(
                version,
                &w.prev_hash,
                &w.merkle_root,
                w.ntime,
                w.nbits,
                *n,
            )))
        })
        .expect("some nonce")
}

fn standard_share(channel_id: u32, seq: u32, w: &StdWork, version: u32, nonce: u32) -> MiningOwned {
    MiningOwned::SubmitSharesStandard(SubmitSharesStandard {
        channel_id,
        sequence_number: seq,
        job_id: w.job_id,
        nonce,
        ntime: w.ntime,
        version,
    })
}

/// The answer to the share with sequence number `seq`: Ok, or the error code.
async fn answer(c: &mut Client, id: u32, seq: u32) -> Result<(), String> {
    c.expect("SubmitShares answer", |m| match m {
        MiningOwned::SubmitSharesSuccess(s)
            if s.channel_id == id && s.last_sequence_number == seq =>
        {
            Some(Ok(()))
        }
        MiningOwned::SubmitSharesError(e) if e.channel_id == id && e.sequence_number == seq => {
            Some(Err(
                String::from_utf8_lossy(e.error_code.as_bytes()).into_owned()
            ))
        }
        _ => None,
    })
    .await
}

/// After a new block, a standard channel's share on the old tip's job is
/// refused as `stale-share` (never forwarded), while everything gridproxy
/// forwards (shares meeting the pool's target, before and after the block)
/// is accepted by pool_sv2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_block_makes_old_tip_shares_stale_on_a_standard_channel() {
    let _gate = gridproxy_tests::module_gate(module_path!());
    let _serial = SERIAL.lock().await;
    init_tracing();
    let tp = start_tp_with(gridproxy_fixtures::tp::TpConfig {
        nbits: gridproxy_fixtures::tp::QUIET_NBITS,
        new_tip_on_solution: false,
        template_interval: Duration::from_secs(3600),
        ..Default::default()
    })
    .await;
    let pool = start_pool(tp.addr()).await;
    let proxy = start_proxy(&pool, 1, "", "").await;
    let up = proxy.ctx.router.pools()[0].clone();
    let mut c = Client::connect(proxy.sv2_addr.unwrap()).await;
    assert!(matches!(
        c.setup(Protocol::MiningProtocol, 0b1).await,
        Message::Common(CommonMessagesOwned::SetupConnectionSuccess(_))
    ));
    let n = 3u32;
    let mut chans = Vec::new();
    for i in 0..n {
        chans.push(open_standard(&mut c, i + 1, &format!("stale2.{i}")).await);
    }
    // As the pool judges it: the job's own target (pool_sv2 keeps one per job).
    let up_target = {
        let v = up.view.borrow();
        v.job.as_ref().and_then(|j| j.target).unwrap_or(v.target)
    };
    // Before the block: one share each that gridproxy forwards; another of
    // the same job kept for after the block.
    let mut kept = Vec::new();
    for (id, target, w) in &chans {
        let t = (*target).min(up_target);
        let first = nonce_from(w, w.version, &t, 0);
        c.send(standard_share(*id, 1, w, w.version, first)).await;
        assert_eq!(answer(&mut c, *id, 1).await, Ok(()), "channel {id}");
        kept.push(nonce_from(w, w.version, &t, first + 1));
    }
    assert!(
        pool.wait_shares_accepted(n as f64, Duration::from_secs(20))
            .await,
        "pool accepted {} of {n}",
        pool.shares_accepted().await
    );

    tp.new_block();
    for ((id, target, w), old_nonce) in chans.iter().zip(&kept) {
        let new = next_tip(&mut c, *id, Some(w.prev_hash)).await;
        assert_ne!(new.job_id, w.job_id);
        // The old tip's work, meeting the pool's target: stale.
        c.send(standard_share(*id, 2, w, w.version, *old_nonce))
            .await;
        assert_eq!(
            answer(&mut c, *id, 2).await,
            Err("stale-share".to_string()),
            "channel {id}: a share of the old tip"
        );
        let t = (*target).min(up_target);
        let nonce = nonce_from(&new, new.version, &t, 0);
        c.send(standard_share(*id, 3, &new, new.version, nonce))
            .await;
        assert_eq!(
            answer(&mut c, *id, 3).await,
            Ok(()),
            "channel {id}: new tip"
        );
    }
    let s = &up.stats;
    assert!(
        wait_until(Duration::from_secs(10), || s.accepted.get() == 2 * n as u64).await,
        "gridproxy: forwarded {} acked {} rejected {}",
        s.submitted.get(),
        s.accepted.get(),
        s.rejected.get()
    );
    assert_eq!(
        s.submitted.get(),
        2 * n as u64,
        "stale work never forwarded"
    );
    assert_eq!(s.rejected.get(), 0);
    assert!(
        pool.wait_shares_accepted(2.0 * n as f64, Duration::from_secs(10))
            .await
    );
    assert_eq!(pool.shares_accepted().await, 2.0 * n as f64);
    assert_eq!(pool.shares_rejected().await, 0.0);
    for i in 0..n {
        let w = proxy.ctx.registry.get(&format!("stale2.{i}")).unwrap();
        assert_eq!(
            w.rejected(gridproxy_proxy::stats::RejectReason::StaleJob),
            1
        );
        assert_eq!(w.accepted.get(), 2);
    }
    proxy.stop.cancel();
}

/// SV1 fixture miners and an SV2 fixture miner find blocks through
/// gridproxy, at the TP's default easy `nbits` (one hash in ~16.7M is a
/// block) with a new tip after each solution. So that each kind's blocks
/// are told apart, gridproxy has two upstreams, each its own pool_sv2 and
/// TP, and the SV1 miners are pinned to one, the SV2 miner to the other:
/// each TP gets valid solutions and no invalid one, and neither pool
/// rejects a share.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocks_found_through_gridproxy_reach_the_tp_valid() {
    let _gate = gridproxy_tests::module_gate(module_path!());
    let _serial = SERIAL.lock().await;
    init_tracing();
    let (tp1, tp2) = (start_tp().await, start_tp().await);
    let (pool1, pool2) = (start_pool(tp1.addr()).await, start_pool(tp2.addr()).await);
    let kp = proxy_authority();
    // The pools' share targets sized for what the miners hash (~2 MH/s each side).
    let mut text = String::new();
    for (i, p) in [&pool1, &pool2].iter().enumerate() {
        text.push_str(&format!(
            "[[pools]]\nname = \"sri{i}\"\naddress = \"{}\"\nprotocol = \"sv2\"\nauthority_pubkey = \"{}\"\nuser = \"gridproxy-test\"\nnominal_hashrate = 2000000.0\n\n",
            p.addr, p.authority_pubkey
        ));
    }
    text.push_str(&format!(
        "[listen]\nsv1 = \"127.0.0.1:0\"\nsv2 = \"127.0.0.1:0\"\nsv2_authority_pubkey = \"{}\"\nsv2_authority_secret = \"{}\"\n\n\
         [difficulty]\ninitial = 0.0001\nmin = 0.000000001\nshares_per_minute = 20.0\n\n\
         [routing]\nreconnect_ms = 100\n",
        kp.public(),
        kp.secret_string()
    ));
    let proxy = gridproxy_tests::start_proxy(Config::parse(&text, "test").expect("valid config"))
        .await
        .unwrap();
    let pools = proxy.ctx.router.pools().to_vec();
    assert!(
        wait_until(Duration::from_secs(30), || pools
            .iter()
            .all(|p| p.view.borrow().live))
        .await
    );

    let sv1 = Arc::new(MinerStats::default());
    let stop = CancellationToken::new();
    for i in 0..2 {
        let mut cfg = Sv1MinerConfig::new(proxy.sv1_addr.unwrap(), format!("blk.rig.{i}"));
        cfg.hashrate = 1_000_000.0;
        cfg.version_rolling = i == 0;
        cfg.suggest_difficulty = Some(0.001);
        tokio::spawn(sv1_miner::run(cfg, sv1.clone(), stop.clone()));
    }
    let sv2 = Sv2Miners::start(Sv2MinerConfig {
        user_identity: "blk.sv2".into(),
        ..Sv2MinerConfig::new(proxy.sv2_addr.unwrap(), kp.public(), 2_000_000.0)
    });
    let registered = wait_until(Duration::from_secs(20), || {
        ["blk.rig.0", "blk.rig.1", "blk.sv2.0"]
            .iter()
            .all(|w| proxy.ctx.registry.get(w).is_some())
    })
    .await;
    assert!(registered, "{:?}", proxy.ctx.registry.snapshot());
    assert_eq!(
        proxy
            .ctx
            .router
            .move_to(|w| w.starts_with("blk.rig."), Some(0)),
        2
    );
    assert_eq!(proxy.ctx.router.move_to(|w| w == "blk.sv2.0", Some(1)), 1);
    let (v1, v2) = (tp1.stats().valid_solutions, tp2.stats().valid_solutions);

    let found = wait_until(Duration::from_secs(60), || {
        tp1.stats().valid_solutions > v1 && tp2.stats().valid_solutions > v2
    })
    .await;
    stop.cancel();
    sv2.stop();
    let (s1, s2) = (tp1.stats(), tp2.stats());
    println!(
        "blocks: via SV1 miners {} valid, via the SV2 miner {} valid; sv1 {sv1:?}; sv2 {:?}",
        s1.valid_solutions,
        s2.valid_solutions,
        sv2.stats()
    );
    assert!(
        found,
        "TP of the SV1 miners {s1:?} {:?}\nTP of the SV2 miner {s2:?} {:?}\nsv1 {sv1:?}\nsv2 {:?}",
        tp1.solutions(),
        tp2.solutions(),
        sv2.stats()
    );
    assert_eq!(s1.invalid_solutions, 0, "{:?}", tp1.solutions());
    assert_eq!(s2.invalid_solutions, 0, "{:?}", tp2.solutions());
    assert!(tp1
        .solutions()
        .iter()
        .all(|s| s.valid && s.block_hash.is_some()));
    assert!(tp2
        .solutions()
        .iter()
        .all(|s| s.valid && s.block_hash.is_some()));
    // Each block moved that TP's tip (new_tip_on_solution).
    assert!(s1.tips > 1 && s2.tips > 1, "{s1:?} {s2:?}");
    for p in [&pool1, &pool2] {
        assert!(p.shares_accepted().await > 0.0);
        assert_eq!(p.shares_rejected().await, 0.0);
    }
    for p in &pools {
        assert_eq!(p.stats.rejected.get(), 0, "{}", p.stats.name);
    }
    proxy.stop.cancel();
}

/// An SV2 miner rolling the BIP320 version bits through gridproxy (the
/// fixture miners on standard and extended channels): its shares are
/// accepted by gridproxy and, where forwarded, by pool_sv2. A share whose
/// version differs from the job's outside the allowed mask is refused by
/// gridproxy (and never forwarded), while one rolled inside it is accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sv2_version_rolling_inside_the_mask_only() {
    let _gate = gridproxy_tests::module_gate(module_path!());
    let _serial = SERIAL.lock().await;
    init_tracing();
    let tp = start_quiet_tp().await;
    let pool = start_pool(tp.addr()).await;
    let proxy = start_proxy(&pool, 1, "", "").await;
    let addr = proxy.sv2_addr.unwrap();
    let key = proxy_authority().public();
    let up = proxy.ctx.router.pools()[0].clone();
    let mask = up.view.borrow().job.as_ref().map(|j| j.version_mask);
    assert_eq!(mask, Some(0x1fff_e000), "pool_sv2 allows BIP320 rolling");

    let rolling = |kind, user: &str| {
        Sv2Miners::start(Sv2MinerConfig {
            channel: kind,
            count: 2,
            user_identity: user.into(),
            version_rolling: true,
            ..Sv2MinerConfig::new(addr, key, 20_000.0)
        })
    };
    let std = rolling(ChannelKind::Standard, "roll.std");
    let ext = rolling(ChannelKind::Extended { extranonce_size: 4 }, "roll.ext");
    wait_fixture(&std, 10, "standard, rolling", &pool).await;
    wait_fixture(&ext, 10, "extended, rolling", &pool).await;
    // Forwarded rolled shares too.
    let forwarded = wait_until(Duration::from_secs(60), || {
        ["roll.std.", "roll.ext."].iter().all(|p| {
            proxy
                .ctx
                .registry
                .snapshot()
                .iter()
                .filter(|w| w.name.starts_with(p))
                .map(|w| w.upstream_accepted)
                .sum::<u64>()
                >= 2
        })
    })
    .await;
    std.stop();
    ext.stop();
    let (s, e) = (std.stats(), ext.stats());
    assert!(forwarded, "{:?}", proxy.ctx.registry.snapshot());
    assert_eq!(
        (s.rejected, e.rejected),
        (0, 0),
        "{:?} {:?}",
        std.reject_reasons(),
        ext.reject_reasons()
    );
    // Every share the miners sent was rolled.
    assert_eq!(s.rolled, s.submitted, "{s:?}");
    assert_eq!(e.rolled, e.submitted, "{e:?}");
    let acked = assert_upstream_accounting(&proxy, &pool).await;
    assert_eq!(pool.shares_rejected().await, 0.0);

    // A raw standard channel: bits outside the mask (below it, above it) are
    // refused; bits inside it are accepted and forwarded.
    let mut c = Client::connect(addr).await;
    assert!(matches!(
        c.setup(Protocol::MiningProtocol, 0b1).await,
        Message::Common(CommonMessagesOwned::SetupConnectionSuccess(_))
    ));
    let (id, target, w) = open_standard(&mut c, 1, "roll.raw").await;
    // The pool judges a share by its job's target (pool_sv2 keeps one per
    // job), which a later SetTarget (its vardiff) does not move.
    let pool_target = {
        let v = up.view.borrow();
        v.job.as_ref().and_then(|j| j.target).unwrap_or(v.target)
    };
    let t = target.min(pool_target);
    let mut seq = 0;
    for outside in [0x0000_0001u32, 0x0000_1000, 0x4000_0000] {
        let v = w.version ^ outside;
        seq += 1;
        c.send(standard_share(id, seq, &w, v, nonce_from(&w, v, &t, 0)))
            .await;
        assert_eq!(
            answer(&mut c, id, seq).await,
            Err("invalid-job-id".to_string()),
            "version {v:08x}: bits outside the mask"
        );
    }
    let inside = w.version ^ 0x0aaa_a000;
    seq += 1;
    c.send(standard_share(
        id,
        seq,
        &w,
        inside,
        nonce_from(&w, inside, &t, 0),
    ))
    .await;
    assert_eq!(
        answer(&mut c, id, seq).await,
        Ok(()),
        "rolled inside the mask"
    );
    let raw = proxy.ctx.registry.get("roll.raw").unwrap();
    assert_eq!(
        raw.rejected(gridproxy_proxy::stats::RejectReason::Invalid),
        3
    );
    assert!(
        wait_until(Duration::from_secs(10), || raw.upstream_accepted.get() == 1).await,
        "the rolled share was not accepted upstream"
    );
    assert!(
        pool.wait_shares_accepted(acked as f64 + 1.0, Duration::from_secs(10))
            .await
    );
    assert_eq!(pool.shares_rejected().await, 0.0);
    assert_eq!(up.stats.rejected.get(), 0);
    proxy.stop.cancel();
}

/// A restart's drain, SV2 side (issue 18): every channel gets `CloseChannel`
/// (`proxy-restarting`), the listener is gone (the port is a new process's),
/// the pool's answer to every share the proxy forwarded is awaited, and the
/// drain reports itself complete with nobody cut off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_closes_sv2_channels_and_waits_for_every_pool_answer() {
    let _gate = gridproxy_tests::module_gate(module_path!());
    let _serial = SERIAL.lock().await;
    let tp = start_quiet_tp().await;
    let pool = start_pool(tp.addr()).await;
    let proxy = start_proxy(&pool, 1, "", "").await;
    let addr = proxy.sv2_addr.unwrap();
    let key = proxy_authority().public();
    let std = fixture_miners(addr, key, ChannelKind::Standard, "drain-std");
    let ext = fixture_miners(
        addr,
        key,
        ChannelKind::Extended { extranonce_size: 4 },
        "drain-ext",
    );
    wait_fixture(&std, 10, "standard", &pool).await;
    wait_fixture(&ext, 10, "extended", &pool).await;
    // Shares reach the pool before the restart (so the drain has answers to wait for).
    let up = proxy.ctx.router.pools()[0].stats.clone();
    assert!(
        wait_until(Duration::from_secs(60), || up.accepted.get() >= 1).await,
        "no share forwarded and acknowledged before the drain"
    );

    let report = proxy.drain(Duration::from_secs(20)).await;
    assert!(report.complete, "{report:?}");
    assert_eq!((report.miners_cut, report.unanswered), (0, 0), "{report:?}");
    for (what, m) in [("standard", &std), ("extended", &ext)] {
        // The channel was closed for the restart; by now the miner may
        // already have tried to come back to the closed port, which is
        // then its last error.
        let e = m.last_error().unwrap_or_default();
        assert!(
            e.contains("proxy-restarting") || e.contains("connect"),
            "{what}: last error {e:?}"
        );
        assert!(m.stats().disconnects >= 3, "{what}: {:?}", m.stats());
    }
    // The port is closed: nothing of this process answers there any more.
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "the SV2 listener still accepts after the drain"
    );
    std.stop();
    ext.stop();
    assert!(up.submitted.get() > 0);
    assert_eq!(
        up.submitted.get(),
        up.accepted.get() + up.rejected.get(),
        "every forwarded share answered by the pool"
    );
    assert_eq!(up.unanswered.get(), 0);
}

/// A proxy whose only SV2 pool is at `addr`, reconnecting after `reconnect_ms`.
async fn start_proxy_alone(addr: SocketAddr, reconnect_ms: u64) -> Proxy {
    let s = format!(
        "[[pools]]\nname = \"alone\"\naddress = \"{addr}\"\nprotocol = \"sv2\"\nauthority_pubkey = \"{}\"\nuser = \"gridproxy-test\"\n\n[listen]\nsv1 = \"127.0.0.1:0\"\n\n[routing]\nreconnect_ms = {reconnect_ms}\n",
        proxy_authority().public()
    );
    gridproxy_tests::start_proxy(Config::parse(&s, "test").expect("valid test config"))
        .await
        .unwrap()
}

/// A restart while the only pool is down (it refuses connections) does not
/// wait out the reconnect backoff: a pool that is down owes no answers, so
/// its upstream ends as soon as the drain tells it to. With a 60 s backoff
/// and a 5 s grace the drain is complete only if the drain ended the backoff.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_does_not_wait_out_the_backoff_of_a_pool_that_is_down() {
    let _gate = gridproxy_tests::module_gate(module_path!());
    let _serial = SERIAL.lock().await;
    // Bound, then closed: connections there are refused.
    let refused = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let proxy = start_proxy_alone(refused, 60_000).await;
    let up = proxy.ctx.router.pools()[0].stats.clone();
    assert!(
        wait_until(Duration::from_secs(10), || up.last_error().is_some()).await,
        "the proxy never tried the pool"
    );
    // Now in the first backoff (60 s).
    let report = proxy.drain(Duration::from_secs(5)).await;
    assert!(report.complete, "{report:?}; pool: {:?}", up.last_error());
    assert_eq!(report.upstreams_left, 0, "{report:?}");
    assert_eq!(up.connects.get(), 0);
}

/// The same while the pool is being connected to: it accepts the TCP
/// connection and never answers, so the SV2 setup would wait its whole 10 s
/// timeout. Nothing was sent on it, so the drain ends it at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_does_not_wait_for_a_pool_still_setting_up() {
    let _gate = gridproxy_tests::module_gate(module_path!());
    let _serial = SERIAL.lock().await;
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy = start_proxy_alone(silent.local_addr().unwrap(), 60_000).await;
    // Held open, never written to.
    let (_conn, _) = tokio::time::timeout(Duration::from_secs(10), silent.accept())
        .await
        .expect("the proxy never connected")
        .unwrap();
    let up = proxy.ctx.router.pools()[0].stats.clone();
    let report = proxy.drain(Duration::from_secs(5)).await;
    assert!(report.complete, "{report:?}; pool: {:?}", up.last_error());
    assert_eq!(report.upstreams_left, 0, "{report:?}");
    assert_eq!(up.connects.get(), 0, "never set up");
}
