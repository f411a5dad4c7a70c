//! The fan-out of new work (issue 17, "the stale-work window"), as a
//! correctness test, not a timing test: every miner receives every clean
//! job exactly once, in the pool's order, with its own session's fields.
//!
//! A fixture pool (in process, loopback; the SV1 one, then the SV2 one)
//! announces blocks when the test says so (`new_block`), each followed by a
//! job on the same tip (`new_job`, not clean). The next announcement waits until
//! every miner has the last one and its share on it was answered, so the
//! proxy never has a reason to skip a job (it sends only the latest one).
//! Behind gridproxy, raw clients written here record every message:
//!
//! - SV1 miners, each with its own `mining.suggest_difficulty` and, for two
//!   thirds of them, a `mining.configure` version mask (two disjoint masks);
//! - SV2 connections, each with standard and extended channels of their own
//!   nominal hashrates (so their own targets). They do not set
//!   `REQUIRES_STANDARD_JOBS`, so their standard channels are grouped: a job
//!   or `SetNewPrevHash` addressed to a group counts as each member's.
//!
//! Each miner submits one share on every job it gets, built from what its
//! session was told (extranonce1 or extranonce prefix, difficulty or target,
//! version mask): a job built with another session's fields is refused by
//! gridproxy (which checks every share) or by the SV1 pool (which gets
//! every share, its difficulty being the easiest miner's, and checks it
//! against its own coinbase). Every job's shared fields are compared with
//! what the pool sent.

use gridproxy::config::Config;
use gridproxy_fixtures::sv1_pool::{self, PoolReject, Sv1Pool, Sv1PoolConfig};
use gridproxy_fixtures::sv2_pool::{Sv2Pool, Sv2PoolConfig, Sv2PoolJob};
use gridproxy_protocol::difficulty::Target;
use gridproxy_protocol::share::{self, prevhash_from_sv1, rolled_version};
use gridproxy_protocol::sv1::{self, encode, Notify, ServerMessage};
use gridproxy_protocol::sv2::{
    common_messages_sv2::{Protocol, SetupConnectionOwned},
    mining_sv2::{
        OpenExtendedMiningChannelOwned, OpenStandardMiningChannelOwned, SubmitSharesExtendedOwned,
        SubmitSharesStandard,
    },
    AuthorityKeypair, CommonMessagesOwned, Message, MiningOwned, NoiseCodec,
};
use gridproxy_proxy::sv2_io::{connect_noise, next_msg};
use gridproxy_proxy::Proxy;
use gridproxy_tests::*;
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio_util::bytes::BytesMut;
use tokio_util::codec::{Encoder, Framed};
use tokio_util::sync::CancellationToken;

/// SV1 miners on the proxy.
const SV1_MINERS: usize = 200;
/// SV2 connections, each with [`PER_KIND`] standard and as many extended channels.
const SV2_CONNECTIONS: usize = 4;
const PER_KIND: usize = 3;
/// Blocks the pool announces (each followed by a same-tip job).
const BLOCKS: usize = 10;
/// How long one announcement may take to reach every miner and be answered.
const STEP: Duration = Duration::from_secs(30);
/// Version bits the SV1 miners ask for: none, or one of two disjoint masks,
/// so a session given another session's mask rolls bits outside it.
const ASK_MASKS: [Option<u32>; 3] = [None, Some(0x1fe0_0000), Some(0x001f_e000)];
/// Bits a miner rolls: some of each mask's.
const ROLL: u32 = 0x1555_4000;
/// BIP320: what gridproxy grants at most.
const BIP320: u32 = 0x1fff_e000;
/// Miner parts are this long (gridproxy's default `extranonce.miner_bytes`),
/// and miners roll this many bytes (`extranonce2_size`).
const MINER_BYTES: usize = 3;
const EN2_SIZE: usize = 4;

/// The easiest miner difficulty, and the pool's: every share a miner finds
/// goes to the pool, which checks it against the real coinbase.
fn easiest() -> f64 {
    2f64.powi(-25)
}

/// Miner `i`'s difficulty: 2^-22 .. 2^-25, neighbours differ.
fn difficulty_of(i: usize) -> f64 {
    2f64.powi(-22 - (i % 4) as i32)
}

/// gridproxy's own SV2 authority (miners pin it).
fn proxy_authority() -> AuthorityKeypair {
    AuthorityKeypair::from_secret_bytes([0x5a; 32]).expect("valid secret")
}

/// gridproxy on the pool of `pools` (its `[[pools]]` table).
async fn start_proxy(pools: &str) -> Proxy {
    let kp = proxy_authority();
    // retarget_secs: vardiff stays put, so every session keeps the
    // difficulty it was given and the only jobs are the pool's.
    let text = format!(
        r#"{pools}

[listen]
sv1 = "127.0.0.1:0"
sv2 = "127.0.0.1:0"
sv2_authority_pubkey = "{pubkey}"
sv2_authority_secret = "{secret}"

[difficulty]
initial = 0.0000152587890625
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
        proxy.ctx.router.pools()[0].view.borrow().live
    })
    .await;
    assert!(live, "upstream never went live");
    proxy
}

/// A job as the pool sent it, whichever protocol it speaks.
#[derive(Clone, Debug)]
struct PoolJob {
    id: String,
    new_tip: bool,
    /// Internal byte order.
    prev_hash: [u8; 32],
    /// The coinbase before and after the extranonce space the pool gives the
    /// proxy (SV1: extranonce1 ‖ extranonce2; SV2: the channel's prefix ‖
    /// extranonce).
    coinb1: Vec<u8>,
    coinb2: Vec<u8>,
    branch: Vec<[u8; 32]>,
    version: u32,
    nbits: u32,
    /// The job's time where gridproxy passes it on as it is (an SV2 pool's
    /// goes out no earlier than gridproxy's clock: not compared).
    ntime: Option<u32>,
}

impl From<Notify> for PoolJob {
    fn from(n: Notify) -> Self {
        PoolJob {
            id: n.job_id,
            new_tip: n.clean_jobs,
            prev_hash: prevhash_from_sv1(&n.prev_hash),
            coinb1: n.coinb1,
            coinb2: n.coinb2,
            branch: n.merkle_branch,
            version: n.version,
            nbits: n.nbits,
            ntime: Some(n.ntime),
        }
    }
}

impl From<Sv2PoolJob> for PoolJob {
    fn from(j: Sv2PoolJob) -> Self {
        PoolJob {
            id: j.job_id.to_string(),
            new_tip: j.new_tip,
            prev_hash: j.prev_hash,
            coinb1: j.coinbase_prefix,
            coinb2: j.coinbase_suffix,
            branch: j.merkle_path,
            version: j.version,
            nbits: j.nbits,
            ntime: None,
        }
    }
}

/// The pool behind gridproxy.
enum Upstream {
    Sv1(Sv1Pool),
    Sv2(Sv2Pool),
}

impl Upstream {
    /// Its `[[pools]]` table.
    fn pools_table(&self) -> String {
        match self {
            Upstream::Sv1(p) => format!(
                "[[pools]]\nname = \"p\"\naddress = \"{}\"\nprotocol = \"sv1\"\nuser = \"acct\"\n",
                p.addr()
            ),
            Upstream::Sv2(p) => format!(
                "[[pools]]\nname = \"p\"\naddress = \"{}\"\nprotocol = \"sv2\"\n\
                 authority_pubkey = \"{}\"\nuser = \"acct\"\nnominal_hashrate = 250000.0\n",
                p.addr(),
                p.authority_public_key()
            ),
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Upstream::Sv1(_) => "SV1 pool",
            Upstream::Sv2(_) => "SV2 pool",
        }
    }

    fn current_job(&self) -> PoolJob {
        match self {
            Upstream::Sv1(p) => p.current_job().expect("the pool has a job").into(),
            Upstream::Sv2(p) => p.current_job().into(),
        }
    }

    /// Announce a new block (`new_tip`) or a job on the same tip.
    fn announce(&self, new_tip: bool) -> PoolJob {
        match (self, new_tip) {
            (Upstream::Sv1(p), true) => p.new_block().into(),
            (Upstream::Sv1(p), false) => p.new_job().into(),
            (Upstream::Sv2(p), true) => p.new_block().into(),
            (Upstream::Sv2(p), false) => p.new_job().into(),
        }
    }

    /// Shares the pool answered, and how many it refused (the SV2 fixture
    /// acknowledges every share without checking it).
    fn answered(&self) -> (u64, u64) {
        match self {
            Upstream::Sv1(p) => {
                let s = p.stats();
                (s.accepted.get() + s.rejected_total(), s.rejected_total())
            }
            Upstream::Sv2(p) => (p.stats().shares, 0),
        }
    }

    fn counts(&self) -> String {
        match self {
            Upstream::Sv1(p) => {
                let s = p.stats();
                format!(
                    "accepted {} stale {} duplicate {} low-difficulty {} invalid {}",
                    s.accepted.get(),
                    s.rejected(PoolReject::Stale),
                    s.rejected(PoolReject::Duplicate),
                    s.rejected(PoolReject::LowDifficulty),
                    s.rejected(PoolReject::Invalid),
                )
            }
            Upstream::Sv2(p) => format!("{:?}", p.stats()),
        }
    }
}

/// A nonce whose hash meets difficulty `d` but not `2d`: a share that only
/// the session's own difficulty accepts (a harder one refuses it).
fn nonce_for(d: f64, hash: impl Fn(u32) -> [u8; 32]) -> u32 {
    let (own, harder) = (Target::from_difficulty(d), Target::from_difficulty(2.0 * d));
    (0..u32::MAX)
        .find(|n| {
            let h = hash(*n);
            own.is_met_by(&h) && !harder.is_met_by(&h)
        })
        .expect("some nonce")
}

/// Each miner's en2 for its `k`-th job: distinct per job.
fn en2_for(k: usize) -> Vec<u8> {
    (k as u32).to_be_bytes()[4 - EN2_SIZE.min(4)..].to_vec()
}

// ---------------------------------------------------------------------------------------------
// SV1 miners

/// What one SV1 miner was told, in arrival order.
#[derive(Default)]
struct Sv1Log {
    /// From the subscribe answer.
    en1: Option<(Vec<u8>, usize)>,
    /// The `mining.configure` answer's mask (None: not asked, or refused).
    granted: Option<u32>,
    difficulties: Vec<f64>,
    masks: Vec<u32>,
    jobs: Vec<Notify>,
    /// The answer to the share on each job, by the job's index.
    answers: BTreeMap<usize, Result<(), String>>,
    /// Anything a well-behaved proxy never does (an error answer to setup,
    /// a job before the subscribe answer, a line that does not parse).
    trouble: Vec<String>,
}

/// Setup request ids; a share on job `k` goes as id `SHARE_ID + k`.
const CONFIGURE_ID: u64 = 1;
const SUBSCRIBE_ID: u64 = 2;
const SUGGEST_ID: u64 = 3;
const AUTHORIZE_ID: u64 = 4;
const SHARE_ID: u64 = 100;

async fn sv1_miner(addr: SocketAddr, i: usize, log: Arc<Mutex<Sv1Log>>, stop: CancellationToken) {
    let r = tokio::select! {
        _ = stop.cancelled() => Ok(()),
        r = sv1_session(addr, i, &log) => r,
    };
    if let Err(e) = r {
        log.lock().unwrap().trouble.push(e);
    }
}

async fn sv1_session(addr: SocketAddr, i: usize, log: &Mutex<Sv1Log>) -> Result<(), String> {
    let user = format!("fan.sv1.{i}");
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let (rd, mut wr) = stream.into_split();
    let mut setup = String::new();
    if let Some(mask) = ASK_MASKS[i % ASK_MASKS.len()] {
        setup.push_str(&encode::request(
            &json!(CONFIGURE_ID),
            "mining.configure",
            json!([["version-rolling"], {"version-rolling.mask": format!("{mask:08x}"), "version-rolling.min-bit-count": 2}]),
        ));
    }
    setup.push_str(&encode::request(
        &json!(SUBSCRIBE_ID),
        "mining.subscribe",
        json!(["fanout-test/1"]),
    ));
    // Before authorize: the session starts at this difficulty.
    setup.push_str(&encode::request(
        &json!(SUGGEST_ID),
        "mining.suggest_difficulty",
        json!([difficulty_of(i)]),
    ));
    setup.push_str(&encode::request(
        &json!(AUTHORIZE_ID),
        "mining.authorize",
        json!([user, "x"]),
    ));
    wr.write_all(setup.as_bytes())
        .await
        .map_err(|e| format!("write: {e}"))?;
    let mut lines = BufReader::new(rd).lines();
    while let Some(line) = lines.next_line().await.map_err(|e| format!("read: {e}"))? {
        let msg = sv1::parse_server(line.as_bytes()).map_err(|e| format!("{e}: {line}"))?;
        let submit = on_sv1_message(log, msg, &user)?;
        if let Some(submit) = submit {
            wr.write_all(submit.as_bytes())
                .await
                .map_err(|e| format!("write: {e}"))?;
        }
    }
    Err("the proxy closed the connection".into())
}

/// Record one message; for a job, the share to submit on it.
fn on_sv1_message(
    log: &Mutex<Sv1Log>,
    msg: ServerMessage,
    user: &str,
) -> Result<Option<String>, String> {
    let mut log = log.lock().unwrap();
    match msg {
        ServerMessage::Response { id, result, error } => {
            let id = id.as_u64().ok_or(format!("response id {id}"))?;
            match id {
                CONFIGURE_ID => {
                    if result["version-rolling"] == json!(true) {
                        log.granted = result["version-rolling.mask"]
                            .as_str()
                            .and_then(|m| u32::from_str_radix(m, 16).ok());
                    }
                }
                SUBSCRIBE_ID => {
                    log.en1 = Some(
                        sv1::parse_subscribe_result(&result)
                            .ok_or(format!("subscribe answer {result} {error:?}"))?,
                    );
                }
                SUGGEST_ID | AUTHORIZE_ID if result == Value::Bool(true) => {}
                k if k >= SHARE_ID => {
                    let answer = match (result, error) {
                        (Value::Bool(true), None) => Ok(()),
                        (r, e) => Err(format!("{r} {e:?}")),
                    };
                    log.answers.insert((k - SHARE_ID) as usize, answer);
                }
                _ => log
                    .trouble
                    .push(format!("answer to {id}: {result} {error:?}")),
            }
            Ok(None)
        }
        ServerMessage::SetDifficulty(d) => {
            log.difficulties.push(d);
            Ok(None)
        }
        ServerMessage::SetVersionMask(m) => {
            log.masks.push(m);
            Ok(None)
        }
        ServerMessage::Notify(n) => {
            let k = log.jobs.len();
            let (Some((en1, en2_size)), Some(&d)) = (log.en1.clone(), log.difficulties.last())
            else {
                return Err(format!(
                    "job {k} before the subscribe answer or a difficulty"
                ));
            };
            // A share on this job, built from what this session was told.
            let mask = log.masks.last().copied().or(log.granted).unwrap_or(0);
            let bits = (mask != 0).then_some(mask & ROLL);
            let version = rolled_version(n.version, bits, mask).expect("bits inside the mask");
            let mut en2 = en2_for(k);
            en2.resize(en2_size, 0);
            let job = n.to_job();
            let root = share::merkle_root(
                &[&job.coinbase_prefix, &en1, &en2, &job.coinbase_suffix],
                &job.merkle_branch,
            );
            let nonce = nonce_for(d, |nonce| {
                share::sha256d(&share::header(
                    version,
                    &job.prev_hash,
                    &root,
                    n.ntime,
                    n.nbits,
                    nonce,
                ))
            });
            let submit = encode::submit(
                &json!(SHARE_ID + k as u64),
                &sv1::Submit {
                    worker: user.to_string(),
                    job_id: n.job_id.clone(),
                    extranonce2: en2,
                    ntime: n.ntime,
                    nonce,
                    version_bits: bits,
                },
            );
            log.jobs.push(n);
            Ok(Some(submit))
        }
        other => {
            log.trouble.push(format!("unexpected {other:?}"));
            Ok(None)
        }
    }
}

// ---------------------------------------------------------------------------------------------
// SV2 channels

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Standard,
    Extended,
}

/// A job as an SV2 channel got it.
#[derive(Debug, Clone)]
enum Sv2Body {
    Standard {
        merkle_root: [u8; 32],
    },
    Extended {
        prefix: Vec<u8>,
        suffix: Vec<u8>,
        path: Vec<[u8; 32]>,
        rolling: bool,
    },
}

/// What a channel was sent, in arrival order.
#[derive(Debug, Clone)]
enum Sv2Event {
    Job {
        job_id: u32,
        min_ntime: Option<u32>,
        version: u32,
        body: Sv2Body,
    },
    PrevHash {
        job_id: u32,
        prev_hash: [u8; 32],
        min_ntime: u32,
        nbits: u32,
    },
    Target(Target),
}

/// One channel: what it asked for, what it was assigned, what it got.
struct ChannelLog {
    kind: Kind,
    /// The difficulty its nominal hashrate asks for.
    difficulty: f64,
    /// From OpenChannel.Success.
    target: Target,
    prefix: Vec<u8>,
    en2_size: usize,
    events: Vec<Sv2Event>,
    /// The current tip: prev hash and nbits of the last SetNewPrevHash.
    tip: Option<([u8; 32], u32)>,
    /// Shares sent (their sequence numbers are 1..=sent) and their answers.
    sent: u32,
    answers: BTreeMap<u32, Result<(), String>>,
}

impl ChannelLog {
    /// Jobs this channel can mine: a non-future job, or a SetNewPrevHash.
    fn deliveries(&self) -> usize {
        self.events
            .iter()
            .filter(|e| match e {
                Sv2Event::Job { min_ntime, .. } => min_ntime.is_some(),
                Sv2Event::PrevHash { .. } => true,
                Sv2Event::Target(_) => false,
            })
            .count()
    }
}

#[derive(Default)]
struct Sv2Log {
    channels: BTreeMap<u32, ChannelLog>,
    /// Each channel's group channel (its Success, then SetGroupChannel): a
    /// job or SetNewPrevHash addressed to a group is every member's.
    groups: BTreeMap<u32, u32>,
    trouble: Vec<String>,
}

/// Channel `j` of a connection: its kind, user and nominal hashrate, and
/// the difficulty that hashrate asks for (hashrate × 60 / (20 × 2^32),
/// rounded down to a power of two: 512 H/s -> 2^-22).
fn channel_spec(conn: usize, j: usize) -> (Kind, String, f32, f64) {
    let kind = if j < PER_KIND {
        Kind::Standard
    } else {
        Kind::Extended
    };
    let step = (conn + j) % 4;
    (
        kind,
        format!("fan.sv2.{conn}.{j}"),
        512.0 / (1u32 << step) as f32,
        2f64.powi(-22 - step as i32),
    )
}

async fn sv2_connection(
    addr: SocketAddr,
    conn: usize,
    log: Arc<Mutex<Sv2Log>>,
    stop: CancellationToken,
) {
    let r = tokio::select! {
        _ = stop.cancelled() => Ok(()),
        r = sv2_session(addr, conn, &log) => r,
    };
    if let Err(e) = r {
        log.lock().unwrap().trouble.push(e);
    }
}

/// Encode with the session's codec and write straight to the socket.
async fn sv2_write(framed: &mut Framed<TcpStream, NoiseCodec>, m: Message) -> Result<(), String> {
    let mut buf = BytesMut::new();
    framed
        .codec_mut()
        .encode(m, &mut buf)
        .map_err(|e| format!("encode: {e:?}"))?;
    framed
        .get_mut()
        .write_all(&buf)
        .await
        .map_err(|e| format!("write: {e}"))
}

async fn sv2_session(addr: SocketAddr, conn: usize, log: &Mutex<Sv2Log>) -> Result<(), String> {
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let mut framed = connect_noise(stream, &proxy_authority().public())
        .await
        .map_err(|e| format!("handshake: {e:?}"))?;
    let setup = SetupConnectionOwned {
        protocol: Protocol::MiningProtocol,
        min_version: 2,
        max_version: 2,
        flags: 0,
        endpoint_host: "127.0.0.1".to_string().try_into().unwrap(),
        endpoint_port: 0,
        vendor: "fanout-test".to_string().try_into().unwrap(),
        hardware_version: "".to_string().try_into().unwrap(),
        firmware: "".to_string().try_into().unwrap(),
        device_id: format!("conn{conn}").try_into().unwrap(),
    };
    sv2_write(
        &mut framed,
        Message::Common(CommonMessagesOwned::SetupConnection(setup)),
    )
    .await?;
    match next_msg(&mut framed).await {
        Ok(Message::Common(CommonMessagesOwned::SetupConnectionSuccess(_))) => {}
        other => return Err(format!("setup answered {other:?}")),
    }
    // Pending opens by request id (= channel index + 1).
    let mut opening: BTreeMap<u32, (Kind, f64)> = BTreeMap::new();
    for j in 0..2 * PER_KIND {
        let (kind, user, nominal, difficulty) = channel_spec(conn, j);
        let request_id = j as u32 + 1;
        let open = match kind {
            Kind::Standard => {
                MiningOwned::OpenStandardMiningChannel(OpenStandardMiningChannelOwned {
                    request_id,
                    user_identity: user.try_into().unwrap(),
                    nominal_hash_rate: nominal,
                    max_target: [0xff; 32].into(),
                })
            }
            Kind::Extended => {
                MiningOwned::OpenExtendedMiningChannel(OpenExtendedMiningChannelOwned {
                    request_id,
                    user_identity: user.try_into().unwrap(),
                    nominal_hash_rate: nominal,
                    max_target: [0xff; 32].into(),
                    min_extranonce_size: EN2_SIZE as u16,
                })
            }
        };
        opening.insert(request_id, (kind, difficulty));
        sv2_write(&mut framed, Message::Mining(open)).await?;
    }
    loop {
        let m = next_msg(&mut framed)
            .await
            .map_err(|e| format!("read: {e:?}"))?;
        let Message::Mining(m) = m else {
            log.lock().unwrap().trouble.push(format!("{m:?}"));
            continue;
        };
        let shares = on_sv2_message(&mut log.lock().unwrap(), &mut opening, m)?;
        for share in shares {
            sv2_write(&mut framed, Message::Mining(share)).await?;
        }
    }
}

/// Record a channel the proxy opened for request `ids.0` as `ids.1`.
fn open_channel(
    log: &mut Sv2Log,
    opening: &mut BTreeMap<u32, (Kind, f64)>,
    (request_id, channel_id, group): (u32, u32, u32),
    target: Target,
    prefix: Vec<u8>,
    en2_size: usize,
) -> Result<Vec<MiningOwned>, String> {
    let (kind, difficulty) = opening
        .remove(&request_id)
        .ok_or(format!("success for request {request_id}"))?;
    let ch = ChannelLog {
        kind,
        difficulty,
        target,
        prefix,
        en2_size,
        events: vec![],
        tip: None,
        sent: 0,
        answers: BTreeMap::new(),
    };
    if log.channels.insert(channel_id, ch).is_some() {
        return Err(format!("channel id {channel_id} given twice"));
    }
    if log.channels.contains_key(&group) {
        return Err(format!("group id {group} is a channel's"));
    }
    log.groups.insert(channel_id, group);
    Ok(vec![])
}

/// Record one message; when it gives channels new work, the shares on it.
fn on_sv2_message(
    log: &mut Sv2Log,
    opening: &mut BTreeMap<u32, (Kind, f64)>,
    m: MiningOwned,
) -> Result<Vec<MiningOwned>, String> {
    let (channel_id, event) = match m {
        MiningOwned::OpenStandardMiningChannelSuccess(s) => {
            return open_channel(
                log,
                opening,
                (s.request_id, s.channel_id, s.group_channel_id),
                Target::from_le_bytes(s.target.to_array()),
                s.extranonce_prefix.as_bytes().to_vec(),
                0,
            );
        }
        MiningOwned::OpenExtendedMiningChannelSuccess(s) => {
            return open_channel(
                log,
                opening,
                (s.request_id, s.channel_id, s.group_channel_id),
                Target::from_le_bytes(s.target.to_array()),
                s.extranonce_prefix.as_bytes().to_vec(),
                s.extranonce_size as usize,
            );
        }
        MiningOwned::NewMiningJob(j) => (
            j.channel_id,
            Sv2Event::Job {
                job_id: j.job_id,
                min_ntime: j.min_ntime.into_inner(),
                version: j.version,
                body: Sv2Body::Standard {
                    merkle_root: j.merkle_root.to_array(),
                },
            },
        ),
        MiningOwned::NewExtendedMiningJob(j) => (
            j.channel_id,
            Sv2Event::Job {
                job_id: j.job_id,
                min_ntime: j.min_ntime.into_inner(),
                version: j.version,
                body: Sv2Body::Extended {
                    prefix: j.coinbase_tx_prefix.as_bytes().to_vec(),
                    suffix: j.coinbase_tx_suffix.as_bytes().to_vec(),
                    path: j.merkle_path.iter().map(|h| h.to_array()).collect(),
                    rolling: j.version_rolling_allowed,
                },
            },
        ),
        MiningOwned::SetNewPrevHash(p) => (
            p.channel_id,
            Sv2Event::PrevHash {
                job_id: p.job_id,
                prev_hash: p.prev_hash.to_array(),
                min_ntime: p.min_ntime,
                nbits: p.nbits,
            },
        ),
        MiningOwned::SetTarget(t) => (
            t.channel_id,
            Sv2Event::Target(Target::from_le_bytes(t.maximum_target.to_array())),
        ),
        MiningOwned::SubmitSharesSuccess(s) => {
            let ch = log
                .channels
                .get_mut(&s.channel_id)
                .ok_or(format!("answer on unknown channel {}", s.channel_id))?;
            ch.answers.insert(s.last_sequence_number, Ok(()));
            return Ok(vec![]);
        }
        MiningOwned::SubmitSharesError(e) => {
            let ch = log
                .channels
                .get_mut(&e.channel_id)
                .ok_or(format!("answer on unknown channel {}", e.channel_id))?;
            let code = String::from_utf8_lossy(e.error_code.as_bytes()).into_owned();
            ch.answers.insert(e.sequence_number, Err(code));
            return Ok(vec![]);
        }
        MiningOwned::SetGroupChannel(g) => {
            for id in g.channel_ids.into_inner() {
                if !log.channels.contains_key(&id) {
                    return Err(format!("SetGroupChannel for unknown channel {id}"));
                }
                log.groups.insert(id, g.group_channel_id);
            }
            return Ok(vec![]);
        }
        other => return Err(format!("unexpected {other:?}")),
    };
    // A channel's own message, or its group's.
    let to: Vec<u32> = if log.channels.contains_key(&channel_id) {
        vec![channel_id]
    } else {
        (log.groups.iter())
            .filter(|(_, g)| **g == channel_id)
            .map(|(c, _)| *c)
            .collect()
    };
    if to.is_empty() {
        return Err(format!("{event:?} on unknown channel {channel_id}"));
    }
    let mut shares = vec![];
    for c in to {
        shares.extend(on_channel_event(log, c, event.clone())?);
    }
    Ok(shares)
}

/// Record `event` on channel `channel_id`; when it gives new work, the share on it.
fn on_channel_event(
    log: &mut Sv2Log,
    channel_id: u32,
    event: Sv2Event,
) -> Result<Option<MiningOwned>, String> {
    let ch = log.channels.get_mut(&channel_id).expect("a known channel");
    ch.events.push(event.clone());
    // The job to mine now, on the current tip, if this message made one.
    let job = match &event {
        Sv2Event::Target(t) => {
            ch.target = *t;
            return Ok(None);
        }
        Sv2Event::PrevHash {
            job_id,
            prev_hash,
            min_ntime,
            nbits,
        } => {
            ch.tip = Some((*prev_hash, *nbits));
            let job = ch.events.iter().rev().find_map(|e| match e {
                Sv2Event::Job {
                    job_id: id,
                    version,
                    body,
                    ..
                } if id == job_id => Some((*job_id, *version, body.clone())),
                _ => None,
            });
            let Some((id, version, body)) = job else {
                return Err(format!(
                    "channel {channel_id}: SetNewPrevHash for unknown job {job_id}"
                ));
            };
            (id, version, *min_ntime, body)
        }
        Sv2Event::Job {
            min_ntime: None, ..
        } => return Ok(None), // a future job: mined once its SetNewPrevHash comes
        Sv2Event::Job {
            job_id,
            min_ntime: Some(t),
            version,
            body,
        } => (*job_id, *version, *t, body.clone()),
    };
    let (job_id, version, ntime, body) = job;
    let (prev_hash, nbits) = ch
        .tip
        .ok_or(format!("channel {channel_id}: a job before any tip"))?;
    let target_d = ch.target.to_difficulty();
    ch.sent += 1;
    let seq = ch.sent;
    let hash_with = |root: [u8; 32]| {
        move |nonce| {
            share::sha256d(&share::header(
                version, &prev_hash, &root, ntime, nbits, nonce,
            ))
        }
    };
    // A standard channel's work from its group's extended job: the coinbase
    // with its own prefix (and no extranonce of its own).
    let body = match (ch.kind, body) {
        (
            Kind::Standard,
            Sv2Body::Extended {
                prefix,
                suffix,
                path,
                ..
            },
        ) => Sv2Body::Standard {
            merkle_root: share::merkle_root(&[&prefix, &ch.prefix, &suffix], &path),
        },
        (_, b) => b,
    };
    Ok(Some(match body {
        Sv2Body::Standard { merkle_root } => {
            let nonce = nonce_for(target_d, hash_with(merkle_root));
            MiningOwned::SubmitSharesStandard(SubmitSharesStandard {
                channel_id,
                sequence_number: seq,
                job_id,
                nonce,
                ntime,
                version,
            })
        }
        Sv2Body::Extended {
            prefix,
            suffix,
            path,
            ..
        } => {
            let mut en2 = en2_for(seq as usize);
            en2.resize(ch.en2_size, 0);
            let root = share::merkle_root(&[&prefix, &ch.prefix, &en2, &suffix], &path);
            let nonce = nonce_for(target_d, hash_with(root));
            MiningOwned::SubmitSharesExtended(SubmitSharesExtendedOwned {
                channel_id,
                sequence_number: seq,
                job_id,
                nonce,
                ntime,
                version,
                extranonce: en2.try_into().unwrap(),
            })
        }
    }))
}

// ---------------------------------------------------------------------------------------------
// Checks

/// How every copy of a pool job must look: the pool's coinbase parts around
/// the proxy's own extranonce space (`upstream`: the extranonce1 or prefix
/// the pool gave the proxy; then the miner's part, its extranonce2 and `pad`
/// zero bytes).
struct Layout {
    upstream: Vec<u8>,
    pad: usize,
}

impl Layout {
    fn coinb1(&self, pool: &PoolJob) -> Vec<u8> {
        [&pool.coinb1[..], &self.upstream].concat()
    }
    fn coinb2(&self, pool: &PoolJob) -> Vec<u8> {
        [&vec![0; self.pad][..], &pool.coinb2].concat()
    }
}

/// Why SV1 miner `i`'s record differs from what the pool sent (`pool`, in order).
fn sv1_faults(i: usize, log: &Sv1Log, pool: &[PoolJob], layout: &Layout) -> Vec<String> {
    let mut f: Vec<String> = log
        .trouble
        .iter()
        .map(|t| format!("sv1 {i}: {t}"))
        .collect();
    let want_mask = ASK_MASKS[i % ASK_MASKS.len()].map(|m| m & BIP320);
    if log.granted != want_mask {
        f.push(format!(
            "sv1 {i}: mask granted {:?}, asked {:?}",
            log.granted,
            ASK_MASKS[i % ASK_MASKS.len()]
        ));
    }
    if log.masks.iter().any(|m| Some(*m) != want_mask) {
        f.push(format!("sv1 {i}: mining.set_version_mask {:x?}", log.masks));
    }
    // Within float parsing (serde_json's default parser may be one ULP off:
    // 2^-24 comes back as 5.960464477539064e-8).
    let near = |d: &f64| (d / difficulty_of(i) - 1.0).abs() < 1e-12;
    if log.difficulties.len() != 1 || !log.difficulties.iter().all(near) {
        f.push(format!(
            "sv1 {i}: difficulties {:?}, suggested {}",
            log.difficulties,
            difficulty_of(i)
        ));
    }
    match &log.en1 {
        Some((en1, size)) if en1.len() == MINER_BYTES && *size == EN2_SIZE => {}
        other => f.push(format!("sv1 {i}: subscribe answer {other:?}")),
    }
    if log.jobs.len() != pool.len() {
        f.push(format!(
            "sv1 {i}: {} jobs, the pool sent {}",
            log.jobs.len(),
            pool.len()
        ));
    }
    let mut ids = HashSet::new();
    for (k, (got, want)) in log.jobs.iter().zip(pool).enumerate() {
        // The first job of a session is clean whatever the pool's was.
        let clean = k == 0 || want.new_tip;
        let differs: Vec<&str> = [
            (
                "prev_hash",
                prevhash_from_sv1(&got.prev_hash) == want.prev_hash,
            ),
            ("merkle_branch", got.merkle_branch == want.branch),
            ("coinb1", got.coinb1 == layout.coinb1(want)),
            ("coinb2", got.coinb2 == layout.coinb2(want)),
            ("version", got.version == want.version),
            ("nbits", got.nbits == want.nbits),
            ("ntime", want.ntime.is_none_or(|t| got.ntime == t)),
            ("clean_jobs", got.clean_jobs == clean),
        ]
        .into_iter()
        .filter(|(_, same)| !same)
        .map(|(field, _)| field)
        .collect();
        if !differs.is_empty() {
            // Once out of step every later job differs: the first one says it.
            f.push(format!(
                "sv1 {i}: job {k} (id {}, clean {}) is not the pool's job {} (new tip {clean}): \
                 {differs:?} differ",
                got.job_id, got.clean_jobs, want.id
            ));
            break;
        }
        if !ids.insert(got.job_id.clone()) {
            f.push(format!("sv1 {i}: job id {} sent twice", got.job_id));
        }
    }
    let refused: Vec<_> = (0..log.jobs.len())
        .filter_map(|k| match log.answers.get(&k) {
            Some(Ok(())) => None,
            other => Some((k, other)),
        })
        .collect();
    if let Some((k, answer)) = refused.first() {
        f.push(format!(
            "sv1 {i}: {} of {} shares not accepted, the first on job {k}: {answer:?}",
            refused.len(),
            log.jobs.len()
        ));
    }
    f
}

/// Why an SV2 channel's record differs from what the pool sent.
fn sv2_faults(name: &str, ch: &ChannelLog, pool: &[PoolJob], layout: &Layout) -> Vec<String> {
    let mut f = vec![];
    if ch.target != Target::from_difficulty(ch.difficulty) {
        f.push(format!(
            "{name}: opened at difficulty {}, its hashrate asks {}",
            ch.target.to_difficulty(),
            ch.difficulty
        ));
    }
    let en2_size = match ch.kind {
        Kind::Standard => 0,
        Kind::Extended => EN2_SIZE,
    };
    if ch.prefix.len() != MINER_BYTES || ch.en2_size != en2_size {
        f.push(format!(
            "{name}: extranonce prefix {:x?}, size {}",
            ch.prefix, ch.en2_size
        ));
    }
    // Expected: per pool job, a future job and its SetNewPrevHash for a new
    // tip (and for the channel's first job), else a job with min_ntime.
    let mut want = vec![];
    for (k, p) in pool.iter().enumerate() {
        let tip = k == 0 || p.new_tip;
        want.push((k, tip, false));
        if tip {
            want.push((k, tip, true));
        }
    }
    if ch.events.len() != want.len() {
        f.push(format!(
            "{name}: {} messages, expected {} for the pool's {} jobs: {:?}",
            ch.events.len(),
            want.len(),
            pool.len(),
            ch.events.iter().map(brief).collect::<Vec<_>>()
        ));
    }
    let mut last_job = None;
    let mut ids = HashSet::new();
    for (e, &(k, tip, is_prev)) in ch.events.iter().zip(&want) {
        let p = &pool[k];
        let ok = match (e, is_prev) {
            (
                Sv2Event::Job {
                    job_id,
                    min_ntime,
                    version,
                    body,
                },
                false,
            ) => {
                last_job = Some(*job_id);
                let body_ok = match body {
                    Sv2Body::Standard { merkle_root } => {
                        let zeros = vec![0u8; EN2_SIZE];
                        let root = share::merkle_root(
                            &[&layout.coinb1(p), &ch.prefix, &zeros, &layout.coinb2(p)],
                            &p.branch,
                        );
                        *merkle_root == root
                    }
                    Sv2Body::Extended {
                        prefix,
                        suffix,
                        path,
                        rolling,
                    } => {
                        // A standard channel's group job: the zeros after
                        // its prefix open the suffix.
                        let zeros = vec![0u8; EN2_SIZE - ch.en2_size];
                        *prefix == layout.coinb1(p)
                            && *suffix == [&zeros[..], &layout.coinb2(p)].concat()
                            && *path == p.branch
                            && *rolling
                    }
                };
                let ntime_ok = match (tip, p.ntime) {
                    (true, _) => min_ntime.is_none(),
                    (false, Some(t)) => *min_ntime == Some(t),
                    (false, None) => min_ntime.is_some(),
                };
                ids.insert(*job_id) && body_ok && ntime_ok && *version == p.version
            }
            (
                Sv2Event::PrevHash {
                    job_id,
                    prev_hash,
                    min_ntime,
                    nbits,
                },
                true,
            ) => {
                Some(*job_id) == last_job
                    && *prev_hash == p.prev_hash
                    && p.ntime.is_none_or(|t| t == *min_ntime)
                    && *nbits == p.nbits
            }
            _ => false,
        };
        if !ok {
            // Once out of step every later message differs: the first one says it.
            f.push(format!(
                "{name}: {} is not what the pool's job {} (new tip {tip}) makes",
                brief(e),
                p.id
            ));
            break;
        }
    }
    let refused: Vec<_> = (1..=ch.sent)
        .filter_map(|s| match ch.answers.get(&s) {
            Some(Ok(())) => None,
            other => Some((s, other)),
        })
        .collect();
    if ch.sent as usize != pool.len() || !refused.is_empty() {
        f.push(format!(
            "{name}: {} shares for {} jobs, {} not accepted, the first: {:?}",
            ch.sent,
            pool.len(),
            refused.len(),
            refused.first()
        ));
    }
    f
}

/// A channel's message in a few words (for failure messages).
fn brief(e: &Sv2Event) -> String {
    match e {
        Sv2Event::Job {
            job_id, min_ntime, ..
        } => match min_ntime {
            None => format!("future job {job_id}"),
            Some(t) => format!("job {job_id} at {t}"),
        },
        Sv2Event::PrevHash {
            job_id, prev_hash, ..
        } => format!(
            "SetNewPrevHash(job {job_id}, {})",
            hex::encode(&prev_hash[..4])
        ),
        Sv2Event::Target(t) => format!("SetTarget(difficulty {})", t.to_difficulty()),
    }
}

// ---------------------------------------------------------------------------------------------
// The test

/// 200 SV1 miners and 24 SV2 channels (standard and extended, 6 per
/// connection) behind gridproxy; the fixture SV1 pool announces 10 blocks,
/// each followed by a job on the same tip. Every miner gets all 21 jobs in
/// the pool's order, each once, clean exactly at the pool's new tips (and
/// its first job), with its own extranonce, difficulty / target and version
/// mask; its share on each job is accepted by gridproxy and by the pool,
/// which checks it against its own coinbase.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sv1_pool_every_miner_gets_every_clean_job_once_in_order() {
    let _gate = gridproxy_tests::module_gate(module_path!());
    let _serial = SERIAL.lock().await;
    init_tracing();
    let stop = CancellationToken::new();
    // Timers an hour away: the test alone moves the pool.
    let pool = sv1_pool::spawn(
        "127.0.0.1:0".parse().unwrap(),
        Sv1PoolConfig {
            difficulty: easiest(),
            job_interval: Duration::from_secs(3600),
            block_interval: Duration::from_secs(3600),
            ..Default::default()
        },
        stop.clone(),
    )
    .await
    .expect("fixture pool binds");
    fan_out(Upstream::Sv1(pool)).await;
    stop.cancel();
}

/// The same behind gridproxy's SV2 upstream: the fixture SV2 pool announces
/// each block as a future job and its SetNewPrevHash, each same-tip job with
/// `min_ntime`, on gridproxy's one extended channel (it acknowledges every
/// share without checking it: gridproxy's answers are the check here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sv2_pool_every_miner_gets_every_clean_job_once_in_order() {
    let _gate = gridproxy_tests::module_gate(module_path!());
    let _serial = SERIAL.lock().await;
    init_tracing();
    let pool = Sv2Pool::start("127.0.0.1:0".parse().unwrap(), Sv2PoolConfig::default())
        .await
        .expect("fixture pool binds");
    fan_out(Upstream::Sv2(pool)).await;
}

/// Miners on gridproxy on `pool`; `BLOCKS` blocks, each followed by a
/// same-tip job; every miner's record checked against what the pool sent.
async fn fan_out(pool: Upstream) {
    let started = Instant::now();
    let stop = CancellationToken::new();
    let proxy = start_proxy(&pool.pools_table()).await;

    let sv1_logs: Vec<Arc<Mutex<Sv1Log>>> = (0..SV1_MINERS).map(|_| Arc::default()).collect();
    for (i, log) in sv1_logs.iter().enumerate() {
        let addr = proxy.sv1_addr.unwrap();
        tokio::spawn(sv1_miner(addr, i, log.clone(), stop.clone()));
    }
    let sv2_logs: Vec<Arc<Mutex<Sv2Log>>> = (0..SV2_CONNECTIONS).map(|_| Arc::default()).collect();
    for (c, log) in sv2_logs.iter().enumerate() {
        let addr = proxy.sv2_addr.unwrap();
        tokio::spawn(sv2_connection(addr, c, log.clone(), stop.clone()));
    }
    let channels = SV2_CONNECTIONS * 2 * PER_KIND;

    // Miners that do not have the first `jobs` jobs, or an answer to their
    // share on each (SV1 by index, SV2 channels by connection and id).
    let behind = |jobs: usize| {
        let sv1: Vec<String> = sv1_logs
            .iter()
            .enumerate()
            .filter(|(_, l)| {
                let l = l.lock().unwrap();
                l.jobs.len() < jobs || l.answers.len() < jobs
            })
            .map(|(i, _)| format!("sv1 {i}"))
            .collect();
        let sv2 = sv2_logs.iter().enumerate().flat_map(|(c, l)| {
            let l = l.lock().unwrap();
            let missing = (l.channels.len() < 2 * PER_KIND).then(|| format!("sv2 conn {c} opens"));
            let late: Vec<String> = l
                .channels
                .iter()
                .filter(|(_, ch)| ch.deliveries() < jobs || ch.answers.len() < jobs)
                .map(|(id, _)| format!("sv2 conn {c} channel {id}"))
                .collect();
            missing.into_iter().chain(late).collect::<Vec<_>>()
        });
        sv1.into_iter().chain(sv2).collect::<Vec<_>>()
    };
    // The pool answered every share gridproxy accepted (it forwards them all).
    let pool_answered = || {
        let accepted: usize = sv1_logs
            .iter()
            .map(|l| {
                l.lock()
                    .unwrap()
                    .answers
                    .values()
                    .filter(|a| a.is_ok())
                    .count()
            })
            .chain(sv2_logs.iter().flat_map(|l| {
                let l = l.lock().unwrap();
                l.channels
                    .values()
                    .map(|ch| ch.answers.values().filter(|a| a.is_ok()).count())
                    .collect::<Vec<_>>()
            }))
            .sum();
        pool.answered().0 >= accepted as u64
    };
    let caught_up = |jobs: usize| behind(jobs).is_empty() && pool_answered();
    let lagging = |jobs: usize| {
        let trouble: Vec<String> = sv2_logs
            .iter()
            .flat_map(|l| l.lock().unwrap().trouble.clone())
            .chain(
                sv1_logs
                    .iter()
                    .flat_map(|l| l.lock().unwrap().trouble.clone()),
            )
            .take(10)
            .collect();
        let behind = behind(jobs);
        format!(
            "{} miners behind (the first 10: {:?}); trouble: {trouble:?}; pool answered all: {}; \
             pool: {}",
            behind.len(),
            &behind[..behind.len().min(10)],
            pool_answered(),
            pool.counts()
        )
    };

    let mut sent = vec![pool.current_job()];
    assert!(
        wait_until(STEP, || caught_up(1)).await,
        "first job: {}",
        lagging(1)
    );
    let mut fanouts = vec![];
    for block in 1..=BLOCKS {
        for clean in [true, false] {
            let at = Instant::now();
            sent.push(pool.announce(clean));
            let n = sent.len();
            assert!(
                wait_until(STEP, || caught_up(n)).await,
                "block {block} (clean {clean}): {}",
                lagging(n)
            );
            if clean {
                fanouts.push(at.elapsed());
            }
        }
    }

    // The upstream's extranonce1 (or prefix) and the padding, as the first
    // miner saw them; every other copy must agree.
    let layout = {
        let l = sv1_logs[0].lock().unwrap();
        let got = &l.jobs[0];
        let want = &sent[0];
        assert!(
            got.coinb1.starts_with(&want.coinb1) && got.coinb2.ends_with(&want.coinb2),
            "the pool's coinbase is not around the miner's extranonce: {got:?} vs {want:?}"
        );
        Layout {
            upstream: got.coinb1[want.coinb1.len()..].to_vec(),
            pad: got.coinb2.len() - want.coinb2.len(),
        }
    };
    let mut faults = vec![];
    let mut prefixes = HashSet::new();
    let mut clean_jobs = 0;
    for (i, l) in sv1_logs.iter().enumerate() {
        let l = l.lock().unwrap();
        faults.extend(sv1_faults(i, &l, &sent, &layout));
        if let Some((en1, _)) = &l.en1 {
            if !prefixes.insert(en1.clone()) {
                faults.push(format!("sv1 {i}: extranonce1 {en1:x?} given twice"));
            }
        }
        clean_jobs += l.jobs.iter().filter(|j| j.clean_jobs).count();
    }
    let mut prev_hashes = 0;
    for (c, l) in sv2_logs.iter().enumerate() {
        let l = l.lock().unwrap();
        faults.extend(l.trouble.iter().map(|t| format!("sv2 conn {c}: {t}")));
        for (id, ch) in &l.channels {
            let name = format!("sv2 conn {c} channel {id} ({:?})", ch.kind);
            faults.extend(sv2_faults(&name, ch, &sent, &layout));
            if !prefixes.insert(ch.prefix.clone()) {
                faults.push(format!(
                    "{name}: extranonce prefix {:x?} given twice",
                    ch.prefix
                ));
            }
            prev_hashes += ch
                .events
                .iter()
                .filter(|e| matches!(e, Sv2Event::PrevHash { .. }))
                .count();
        }
    }
    assert!(
        faults.is_empty(),
        "{} faults, the first 20:\n{}",
        faults.len(),
        faults
            .iter()
            .take(20)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
    // gridproxy forwarded every share (none is under the pool's target) and
    // the pool answered each; the SV1 pool refused none of them.
    let shares = (sent.len() * (SV1_MINERS + channels)) as u64;
    assert_eq!(pool.answered(), (shares, 0), "{}", pool.counts());
    let slowest = fanouts.iter().max().unwrap();
    println!(
        "fan-out from the {}: {SV1_MINERS} SV1 miners x {BLOCKS} blocks: {} clean jobs of new \
         blocks (and {SV1_MINERS} first jobs), each exactly once in order; {channels} SV2 \
         channels: {prev_hashes} SetNewPrevHash (first jobs included); {} jobs in all ({} per \
         miner), {shares} shares accepted by gridproxy and answered by the pool; slowest block \
         to the last miner and its answered share {slowest:?} (polled every 100 ms); {:?} in all",
        pool.name(),
        clean_jobs - SV1_MINERS,
        sent.len() * (SV1_MINERS + channels),
        sent.len(),
        started.elapsed()
    );
    stop.cancel();
    proxy.stop.cancel();
}
