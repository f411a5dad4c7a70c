//! One SV2 miner connection: Noise responder with gridproxy's own authority
//! key, `SetupConnection` (mining protocol only), then any number of standard
//! and extended channels, each a [`ChannelCore`] running in its own task.
//!
//! ```text
//! socket ── connection task ── SubmitShares / UpdateChannel ──▶ channel task (ChannelCore)
//!              ▲   (Noise, framing, Setup, Open/Close, flood guard)       │
//!              └──────────── jobs, SetTarget, SubmitShares.Success/Error ─┘ (bounded mpsc)
//! ```
//!
//! - Standard channel: the extranonce is fixed to the channel's miner part
//!   followed by zeros. On a connection that set `REQUIRES_STANDARD_JOBS`
//!   every job is a `NewMiningJob` whose merkle root the proxy computes;
//!   otherwise the standard channels are grouped per pool and a new pool job
//!   goes out once per group as a `NewExtendedMiningJob` (and
//!   `SetNewPrevHash`) addressed to the group channel (rules in
//!   [`super::group`]).
//! - Extended channel: `extranonce_prefix` = miner part, `extranonce_size` =
//!   the configured extranonce2 size; jobs are `NewExtendedMiningJob`s.
//! - New block (or pool switch): a future job then `SetNewPrevHash`; same-block
//!   update: a job with `min_ntime`; vardiff: `SetTarget` (valid for every live job).
//!
//! The proxy never sends `SetExtranoncePrefix` (a miner part never changes)
//! and closes a channel on its own only when it drains for a restart
//! (`CloseChannel`, reason `proxy-restarting`): SRI's `mining_device` panics
//! on `CloseChannel`, `SetExtranoncePrefix` and `OpenMiningChannel.Error`.
//! Errors that end the connection are logged with the peer and the reason.

use super::channel::{
    self, ChannelCore, ChannelSetup, ExtranonceMode, JobOut, Out, SlotGuard, SubmitBucket,
    TargetScope, Work, WorkerGuard,
};
use super::group::{Groups, Send};
use super::Ctx;
use crate::accounts::{Listener, Origin};
use crate::error::DownstreamError;
use crate::stats::RejectReason;
use crate::sv2_io::accept_noise;
use futures::{FutureExt, SinkExt, StreamExt};
use gridproxy_protocol::difficulty::Target;
use gridproxy_protocol::sv2::{
    binary_sv2::{Seq0255Owned, Sv2OptionOwned, U256Owned},
    common_messages_sv2::{
        Protocol, SetupConnectionErrorOwned, SetupConnectionOwned, SetupConnectionSuccessOwned,
        ERROR_CODE_SETUP_CONNECTION_PROTOCOL_VERSION_MISMATCH,
        ERROR_CODE_SETUP_CONNECTION_UNSUPPORTED_FEATURE_FLAGS,
        ERROR_CODE_SETUP_CONNECTION_UNSUPPORTED_PROTOCOL,
    },
    mining_sv2::{
        CloseChannelOwned, NewExtendedMiningJobOwned, NewMiningJobOwned,
        OpenExtendedMiningChannelSuccessOwned, OpenMiningChannelErrorOwned,
        OpenStandardMiningChannelSuccessOwned, SetGroupChannelOwned, SetNewPrevHashOwned,
        SetTargetOwned, SubmitSharesErrorOwned, SubmitSharesExtendedOwned, SubmitSharesStandard,
        SubmitSharesSuccessOwned, UpdateChannelErrorOwned, UpdateChannelOwned,
        ERROR_CODE_OPEN_MINING_CHANNEL_CHANNEL_CAPACITY_EXHAUSTED,
        ERROR_CODE_OPEN_MINING_CHANNEL_EXTENDED_CHANNELS_NOT_SUPPORTED_FOR_STANDARD_JOBS,
        ERROR_CODE_OPEN_MINING_CHANNEL_INVALID_NOMINAL_HASHRATE,
        ERROR_CODE_OPEN_MINING_CHANNEL_MAX_TARGET_OUT_OF_RANGE,
        ERROR_CODE_OPEN_MINING_CHANNEL_MIN_EXTRANONCE_SIZE_TOO_LARGE,
        ERROR_CODE_UPDATE_CHANNEL_INVALID_CHANNEL_ID,
        ERROR_CODE_UPDATE_CHANNEL_INVALID_NOMINAL_HASHRATE,
        ERROR_CODE_UPDATE_CHANNEL_MAX_TARGET_OUT_OF_RANGE,
    },
    AuthorityKeypair, CommonMessagesOwned, Message, MiningOwned, NoiseCodec,
};
use gridproxy_protocol::sv2_ext::{
    ExtensionsNegotiationOwned, ExtensionsOwned, RequestExtensionsErrorOwned,
};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::codec::Framed;
use tracing::{debug, info};

/// The only SV2 protocol version.
const VERSION: u16 = 2;
/// `SetupConnection` flag (mining protocol): the device understands standard
/// jobs only. SRI's `mining_device` sets it (crate `integration_tests_sv2`
/// 0.6.0, the one `scripts/peers.sh` installs, `lib/mining_device/mod.rs`,
/// `SetupConnectionHandler::get_setup_connection_message`: `flags: 0b…0001`;
/// the same in sv2-apps' main branch) and its message handler fails on any
/// `NewExtendedMiningJob`, so it keeps getting a `NewMiningJob` per channel
/// (e2e `proxy_group::mining_device_keeps_standard_jobs`).
pub const REQUIRES_STANDARD_JOBS: u32 = 1;
/// `SetupConnection` flag (mining protocol): the device wants to choose its own work.
pub const REQUIRES_WORK_SELECTION: u32 = 1 << 1;
/// How long the certificate handed out in the handshake is valid.
const CERT_VALIDITY: Duration = Duration::from_secs(3600);
/// A write that takes longer means the miner does not read.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Messages queued from all channel tasks to the connection's writer.
const OUT_QUEUE: usize = 1024;
/// How long a connection stays after its channels were closed for a drain.
const CLOSE_LINGER: Duration = Duration::from_secs(1);
/// Channels one connection may hold (each one holds a miner part and a router entry).
pub const MAX_CHANNELS_PER_CONNECTION: usize = 4096;
/// Most messages one grouped channel writes for one job: its `Success`,
/// `SetTarget`, `SetGroupChannel`, a job and its `SetNewPrevHash`.
const GROUP_SENDS_MAX: usize = 5;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Standard,
    Extended,
}

/// From the connection task to one channel task.
enum Cmd {
    Standard(SubmitSharesStandard),
    Extended(SubmitSharesExtendedOwned),
    /// `UpdateChannel`: a new difficulty (None: keep) and floor.
    Update {
        difficulty: Option<f64>,
        floor: f64,
    },
}

/// The connection's handle on one channel task.
struct ChannelEntry {
    tx: mpsc::Sender<Cmd>,
    bucket: SubmitBucket,
}

struct Conn {
    ctx: Arc<Ctx>,
    peer: SocketAddr,
    requires_standard: bool,
    channels: HashMap<u32, ChannelEntry>,
    /// Channel and group ids, group membership and group job ids (shared
    /// with the channel tasks, which write under its lock).
    groups: Arc<Mutex<Groups>>,
    tasks: JoinSet<(u32, Option<DownstreamError>)>,
    out_tx: mpsc::Sender<Message>,
    out_rx: mpsc::Receiver<Message>,
    /// Messages to write at the end of this turn.
    out: Vec<Message>,
    /// Flood guard for submits on unknown channels.
    stray: SubmitBucket,
    /// Channel opens (open/close churn takes a slot, a task and a router
    /// entry each time).
    opens: SubmitBucket,
    inbox_size: usize,
}

/// Serve one SV2 connection until it closes.
pub async fn serve(
    ctx: Arc<Ctx>,
    stream: TcpStream,
    peer: SocketAddr,
    authority: Arc<AuthorityKeypair>,
) {
    let _ = stream.set_nodelay(true);
    let limits = ctx.cfg().limits.clone();
    let deadline = Instant::now() + limits.handshake_timeout();
    let hs = accept_noise(stream, &authority, CERT_VALIDITY, limits.max_frame);
    let framed = match tokio::time::timeout_at(deadline, hs).await {
        Ok(Ok(f)) => f,
        Ok(Err(e)) => {
            info!(%peer, reason = %e, "sv2 miner disconnected during the noise handshake");
            return;
        }
        Err(_) => {
            info!(%peer, timeout = ?limits.handshake_timeout(), "sv2 miner disconnected: noise handshake timed out");
            return;
        }
    };
    let (out_tx, out_rx) = mpsc::channel(OUT_QUEUE);
    let sps = limits.submits_per_second;
    let mut conn = Conn {
        peer,
        requires_standard: false,
        channels: HashMap::new(),
        groups: Arc::new(Mutex::new(Groups::new())),
        tasks: JoinSet::new(),
        out_tx,
        out_rx,
        out: Vec::new(),
        stray: SubmitBucket::new(sps),
        opens: SubmitBucket::new(limits.channel_opens_per_second),
        // More than a full flood-guard bucket: a full inbox means the channel is stuck.
        inbox_size: (sps as usize * 2).max(10) + 64,
        ctx,
    };
    let end = conn.run(framed, deadline).await;
    let channels = conn.channels.len();
    match end {
        DownstreamError::Eof | DownstreamError::Shutdown => {
            debug!(%peer, channels, other = ?end, "sv2 miner disconnected")
        }
        r => info!(%peer, channels, reason = %r, "sv2 miner disconnected"),
    }
}

type Transport = Framed<TcpStream, NoiseCodec>;

impl Conn {
    async fn run(&mut self, mut framed: Transport, deadline: Instant) -> DownstreamError {
        let first = match tokio::time::timeout_at(deadline, framed.next()).await {
            Err(_) => return DownstreamError::SetupTimeout,
            Ok(None) => return DownstreamError::Eof,
            Ok(Some(Err(e))) => return DownstreamError::BadFrame(e),
            Ok(Some(Ok(f))) => f,
        };
        let setup = match first.to_message() {
            Ok(Message::Common(CommonMessagesOwned::SetupConnection(s))) => s,
            Ok(other) => return DownstreamError::ExpectedSetup(name(&other)),
            Err(e) => return DownstreamError::BadFrame(e),
        };
        let refused = self.on_setup(&setup);
        if let Err(e) = self.flush(&mut framed).await {
            return e;
        }
        if let Some(why) = refused {
            return why;
        }
        let limits = self.ctx.cfg().limits.clone();
        let mut idle_deadline = Instant::now() + limits.idle_timeout();
        let shutdown = self.ctx.session_stop.clone();
        let draining = self.ctx.draining.clone();
        // Set once the channels were closed for a drain: when the connection closes.
        let mut close_at: Option<Instant> = None;
        loop {
            if close_at.is_some_and(|t| Instant::now() >= t) {
                return self.close_for_drain(&mut framed).await;
            }
            tokio::select! {
                _ = shutdown.cancelled() => return DownstreamError::Shutdown,
                _ = draining.cancelled(), if close_at.is_none() => {
                    // The proxy is restarting: close every channel cleanly.
                    // Shares that cross the CloseChannel on the wire are still
                    // answered until the miner hangs up or CLOSE_LINGER passes.
                    let mut ids: Vec<u32> = self.channels.keys().copied().collect();
                    ids.sort_unstable();
                    for channel_id in ids {
                        self.out.push(Message::Mining(MiningOwned::CloseChannel(CloseChannelOwned {
                            channel_id,
                            reason_code: "proxy-restarting".to_string().try_into().expect("short reason code"),
                        })));
                    }
                    close_at = Some(Instant::now() + CLOSE_LINGER);
                }
                _ = tokio::time::sleep_until(close_at.unwrap_or_else(Instant::now)), if close_at.is_some() => {}
                f = framed.next() => {
                    let frame = match f {
                        None => return DownstreamError::Eof,
                        Some(Err(e)) => return DownstreamError::BadFrame(e),
                        Some(Ok(f)) => f,
                    };
                    idle_deadline = Instant::now() + limits.idle_timeout();
                    let r = match frame.to_message() {
                        Ok(m) => self.on_msg(m),
                        Err(e) => Err(DownstreamError::BadFrame(e)),
                    };
                    if let Err(why) = r {
                        let _ = self.flush(&mut framed).await;
                        return why;
                    }
                }
                Some(m) = self.out_rx.recv() => {
                    self.out.push(m);
                    while self.out.len() < 256 {
                        match self.out_rx.try_recv() {
                            Ok(m) => self.out.push(m),
                            Err(_) => break,
                        }
                    }
                }
                Some(r) = self.tasks.join_next(), if !self.tasks.is_empty() => {
                    match r {
                        Ok((id, None)) => debug!(peer = %self.peer, channel = id, "channel closed"),
                        Ok((id, Some(why))) => return why.on_channel(id),
                        Err(e) if e.is_panic() => return DownstreamError::ChannelPanicked,
                        Err(_) => {}
                    }
                }
                _ = tokio::time::sleep_until(idle_deadline) => {
                    return DownstreamError::Idle(limits.idle_timeout());
                }
            }
            if let Err(e) = self.flush(&mut framed).await {
                return e;
            }
        }
    }

    /// End a connection whose channels were closed for a drain: each channel
    /// task answers what it was given, those answers are written, then the
    /// connection closes.
    async fn close_for_drain(&mut self, framed: &mut Transport) -> DownstreamError {
        self.channels.clear();
        let answered = async {
            while let Some(r) = self.tasks.join_next().await {
                if let Ok((id, Some(why))) = r {
                    debug!(peer = %self.peer, channel = id, reason = %why, "channel ended during the drain");
                }
            }
        };
        let _ = tokio::time::timeout(CLOSE_LINGER, answered).await;
        while let Ok(m) = self.out_rx.try_recv() {
            self.out.push(m);
        }
        match self.flush(framed).await {
            Ok(()) => DownstreamError::Shutdown,
            Err(e) => e,
        }
    }

    async fn flush(&mut self, framed: &mut Transport) -> Result<(), DownstreamError> {
        if self.out.is_empty() {
            return Ok(());
        }
        let msgs = std::mem::take(&mut self.out);
        let write = async {
            for m in msgs {
                framed.feed(m).await?;
            }
            SinkExt::<Message>::flush(framed).await
        };
        match tokio::time::timeout(WRITE_TIMEOUT, write).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(DownstreamError::Sv2Write(e)),
            Err(_) => Err(DownstreamError::WriteTimedOut),
        }
    }

    /// Answer `SetupConnection`; Some(reason) when refused (the connection then closes).
    fn on_setup(&mut self, s: &SetupConnectionOwned) -> Option<DownstreamError> {
        debug!(
            peer = %self.peer,
            vendor = %String::from_utf8_lossy(s.vendor.as_bytes()),
            hardware = %String::from_utf8_lossy(s.hardware_version.as_bytes()),
            firmware = %String::from_utf8_lossy(s.firmware.as_bytes()),
            device = %String::from_utf8_lossy(s.device_id.as_bytes()),
            flags = s.flags,
            "sv2 SetupConnection"
        );
        let refuse = |flags: u32, code: &str| {
            Message::Common(CommonMessagesOwned::SetupConnectionError(
                SetupConnectionErrorOwned {
                    flags,
                    error_code: code.to_string().try_into().expect("short error code"),
                },
            ))
        };
        if s.protocol != Protocol::MiningProtocol {
            self.out
                .push(refuse(0, ERROR_CODE_SETUP_CONNECTION_UNSUPPORTED_PROTOCOL));
            return Some(DownstreamError::UnsupportedProtocol(s.protocol));
        }
        if !(s.min_version <= VERSION && VERSION <= s.max_version) {
            self.out.push(refuse(
                0,
                ERROR_CODE_SETUP_CONNECTION_PROTOCOL_VERSION_MISMATCH,
            ));
            return Some(DownstreamError::VersionMismatch {
                min: s.min_version,
                max: s.max_version,
                ours: VERSION,
            });
        }
        let unsupported = s.flags & REQUIRES_WORK_SELECTION;
        if unsupported != 0 {
            self.out.push(refuse(
                unsupported,
                ERROR_CODE_SETUP_CONNECTION_UNSUPPORTED_FEATURE_FLAGS,
            ));
            return Some(DownstreamError::WorkSelection);
        }
        self.requires_standard = s.flags & REQUIRES_STANDARD_JOBS != 0;
        self.out.push(Message::Common(
            CommonMessagesOwned::SetupConnectionSuccess(SetupConnectionSuccessOwned {
                used_version: VERSION,
                flags: 0,
            }),
        ));
        None
    }

    /// Handle one message; Err closes the connection with that reason.
    fn on_msg(&mut self, msg: Message) -> Result<(), DownstreamError> {
        let m = match msg {
            Message::Mining(m) => m,
            Message::Common(CommonMessagesOwned::SetupConnection(_)) => {
                return Err(DownstreamError::SetupTwice)
            }
            Message::Extensions(ExtensionsOwned::ExtensionsNegotiation(
                ExtensionsNegotiationOwned::RequestExtensions(r),
            )) => {
                // We offer no extension downstream: sv2-spec 0x0001 §4.1, a
                // server that supports none of those requested answers
                // RequestExtensions.Error (and requires none).
                self.out
                    .push(Message::Extensions(ExtensionsOwned::ExtensionsNegotiation(
                        ExtensionsNegotiationOwned::RequestExtensionsError(
                            RequestExtensionsErrorOwned {
                                request_id: r.request_id,
                                unsupported_extensions: r.requested_extensions,
                                required_extensions: Vec::new().try_into().expect("an empty list"),
                            },
                        ),
                    )));
                return Ok(());
            }
            other => return Err(DownstreamError::UnexpectedMessage(name(&other))),
        };
        match m {
            MiningOwned::OpenStandardMiningChannel(o) => {
                self.open(OpenRequest {
                    request_id: o.request_id,
                    user: String::from_utf8_lossy(o.user_identity.as_bytes()).into_owned(),
                    nominal: o.nominal_hash_rate,
                    max_target: Target::from_le_bytes(o.max_target.to_array()),
                    kind: Kind::Standard,
                    min_extranonce_size: 0,
                });
            }
            MiningOwned::OpenExtendedMiningChannel(o) => {
                self.open(OpenRequest {
                    request_id: o.request_id,
                    user: String::from_utf8_lossy(o.user_identity.as_bytes()).into_owned(),
                    nominal: o.nominal_hash_rate,
                    max_target: Target::from_le_bytes(o.max_target.to_array()),
                    kind: Kind::Extended,
                    min_extranonce_size: o.min_extranonce_size,
                });
            }
            MiningOwned::SubmitSharesStandard(s) => {
                self.submit(s.channel_id, s.sequence_number, Cmd::Standard(s))?
            }
            MiningOwned::SubmitSharesExtended(s) => {
                self.submit(s.channel_id, s.sequence_number, Cmd::Extended(s))?
            }
            MiningOwned::UpdateChannel(u) => self.update(u)?,
            MiningOwned::CloseChannel(c) => {
                // Dropping the sender ends the channel task once it has answered
                // what was already queued; its miner part and router entry go with it.
                // A group channel id closes every channel of the group.
                let members = lock(&self.groups).members_of(c.channel_id);
                for id in members {
                    if self.channels.remove(&id).is_some() {
                        debug!(peer = %self.peer, channel = id, group = c.channel_id, "miner closed a group");
                    }
                }
                if self.channels.remove(&c.channel_id).is_some() {
                    debug!(
                        peer = %self.peer,
                        channel = c.channel_id,
                        reason = %String::from_utf8_lossy(c.reason_code.as_bytes()),
                        "miner closed a channel"
                    );
                }
            }
            other => {
                return Err(DownstreamError::UnexpectedMessage(name(&Message::Mining(
                    other,
                ))))
            }
        }
        Ok(())
    }

    fn open_error(&mut self, request_id: u32, code: &str) {
        debug!(peer = %self.peer, request_id, code, "channel refused");
        self.out
            .push(Message::Mining(MiningOwned::OpenMiningChannelError(
                OpenMiningChannelErrorOwned {
                    request_id,
                    error_code: code.to_string().try_into().expect("short error code"),
                },
            )));
    }

    fn open(&mut self, r: OpenRequest) {
        let cfg = self.ctx.cfg();
        let en2_size = cfg.extranonce.extranonce2_size;
        if r.kind == Kind::Extended && self.requires_standard {
            return self.open_error(
                r.request_id,
                ERROR_CODE_OPEN_MINING_CHANNEL_EXTENDED_CHANNELS_NOT_SUPPORTED_FOR_STANDARD_JOBS,
            );
        }
        if r.kind == Kind::Extended && r.min_extranonce_size as usize > en2_size {
            return self.open_error(
                r.request_id,
                ERROR_CODE_OPEN_MINING_CHANNEL_MIN_EXTRANONCE_SIZE_TOO_LARGE,
            );
        }
        if !(r.nominal.is_finite() && r.nominal >= 0.0) {
            return self.open_error(
                r.request_id,
                ERROR_CODE_OPEN_MINING_CHANNEL_INVALID_NOMINAL_HASHRATE,
            );
        }
        let floor = channel::difficulty_floor_for_target(r.max_target).max(cfg.difficulty.min);
        if floor > cfg.difficulty.max {
            return self.open_error(
                r.request_id,
                ERROR_CODE_OPEN_MINING_CHANNEL_MAX_TARGET_OUT_OF_RANGE,
            );
        }
        if self.channels.len()
            >= MAX_CHANNELS_PER_CONNECTION.min(cfg.limits.max_channels_per_connection)
        {
            self.ctx.trips.channels.inc();
            return self.open_error(
                r.request_id,
                ERROR_CODE_OPEN_MINING_CHANNEL_CHANNEL_CAPACITY_EXHAUSTED,
            );
        }
        if !self.opens.try_take() {
            self.ctx.trips.channel_opens.inc();
            return self.open_error(
                r.request_id,
                ERROR_CODE_OPEN_MINING_CHANNEL_CHANNEL_CAPACITY_EXHAUSTED,
            );
        }
        let slot = match SlotGuard::allocate(&self.ctx) {
            Ok(s) => s,
            Err(e) => {
                info!(peer = %self.peer, error = %e, "no extranonce slot for a new channel");
                return self.open_error(
                    r.request_id,
                    ERROR_CODE_OPEN_MINING_CHANNEL_CHANNEL_CAPACITY_EXHAUSTED,
                );
            }
        };
        let name = channel::truncate(&r.user, cfg.limits.max_worker_name);
        let worker = WorkerGuard::new(&self.ctx, &name);
        let lease = self.ctx.router.register_from(
            &name,
            Origin {
                listener: Some(Listener::Sv2),
                source: Some(self.peer.ip()),
            },
        );
        let initial = initial_difficulty(&self.ctx, r.nominal).max(floor);
        let setup = ChannelSetup {
            extranonce: match r.kind {
                Kind::Standard => ExtranonceMode::Fixed,
                Kind::Extended => ExtranonceMode::Rolled,
            },
            scope: TargetScope::Channel,
            initial_difficulty: initial,
            min_difficulty: floor,
            // Whatever the pool allows (BIP320 bits when it allows rolling).
            version_allowed: u32::MAX,
        };
        let core = ChannelCore::new(self.ctx.clone(), slot, worker, lease, setup);
        let channel_id = lock(&self.groups).next_id();
        let grouped = r.kind == Kind::Standard && !self.requires_standard;
        let target = core.target();
        let prefix = core.slot().prefix().to_vec();
        let success = match r.kind {
            Kind::Standard => MiningOwned::OpenStandardMiningChannelSuccess(
                OpenStandardMiningChannelSuccessOwned {
                    request_id: r.request_id,
                    channel_id,
                    target: U256Owned::from(target.to_le_bytes()),
                    extranonce_prefix: prefix.try_into().expect("miner part <= 4 bytes"),
                    group_channel_id: 0,
                },
            ),
            Kind::Extended => MiningOwned::OpenExtendedMiningChannelSuccess(
                OpenExtendedMiningChannelSuccessOwned {
                    request_id: r.request_id,
                    channel_id,
                    target: U256Owned::from(target.to_le_bytes()),
                    extranonce_size: en2_size as u16,
                    extranonce_prefix: prefix.try_into().expect("miner part <= 4 bytes"),
                    group_channel_id: 0,
                },
            ),
        };
        info!(
            peer = %self.peer,
            channel = channel_id,
            kind = ?r.kind,
            worker = %name,
            nominal_hashrate = r.nominal,
            difficulty = core.difficulty(),
            "sv2 channel open"
        );
        // The success is written before the task can produce the channel's
        // first job: here, or for a grouped channel by its task, with its
        // group id and under the groups' lock.
        let success = if grouped {
            Some(success)
        } else {
            self.out.push(Message::Mining(success));
            None
        };
        let (tx, rx) = mpsc::channel(self.inbox_size);
        let ch = Sv2Channel {
            id: channel_id,
            kind: r.kind,
            core,
            target_sent: target,
            group: grouped.then(|| self.groups.clone()),
            member_of: None,
        };
        self.tasks.spawn(ch.run(rx, self.out_tx.clone(), success));
        self.channels.insert(
            channel_id,
            ChannelEntry {
                tx,
                bucket: SubmitBucket::new(self.ctx.cfg().limits.submits_per_second),
            },
        );
    }

    fn submit(&mut self, channel_id: u32, seq: u32, cmd: Cmd) -> Result<(), DownstreamError> {
        let Some(e) = self.channels.get_mut(&channel_id) else {
            self.stray.take()?;
            self.out.push(submit_error(
                channel_id,
                seq,
                RejectReason::Unauthorized.sv2_code(),
            ));
            return Ok(());
        };
        if let Err(why) = e.bucket.take() {
            self.ctx.trips.submit_flood.inc();
            return Err(why.on_channel(channel_id));
        }
        e.tx.try_send(cmd).map_err(|err| match err {
            mpsc::error::TrySendError::Full(_) => {
                DownstreamError::ShareBacklogFull.on_channel(channel_id)
            }
            mpsc::error::TrySendError::Closed(_) => DownstreamError::ChannelEnded(channel_id),
        })
    }

    fn update(&mut self, u: UpdateChannelOwned) -> Result<(), DownstreamError> {
        let cfg = self.ctx.cfg();
        let error = |code: &str| {
            Message::Mining(MiningOwned::UpdateChannelError(UpdateChannelErrorOwned {
                channel_id: u.channel_id,
                error_code: code.to_string().try_into().expect("short error code"),
            }))
        };
        let Some(e) = self.channels.get_mut(&u.channel_id) else {
            self.out
                .push(error(ERROR_CODE_UPDATE_CHANNEL_INVALID_CHANNEL_ID));
            return Ok(());
        };
        if !(u.nominal_hash_rate.is_finite() && u.nominal_hash_rate >= 0.0) {
            self.out
                .push(error(ERROR_CODE_UPDATE_CHANNEL_INVALID_NOMINAL_HASHRATE));
            return Ok(());
        }
        let max_target = Target::from_le_bytes(u.maximum_target.to_array());
        let floor = channel::difficulty_floor_for_target(max_target).max(cfg.difficulty.min);
        if floor > cfg.difficulty.max {
            self.out
                .push(error(ERROR_CODE_UPDATE_CHANNEL_MAX_TARGET_OUT_OF_RANGE));
            return Ok(());
        }
        let difficulty =
            (u.nominal_hash_rate > 0.0).then(|| initial_difficulty(&self.ctx, u.nominal_hash_rate));
        e.tx.try_send(Cmd::Update { difficulty, floor })
            .map_err(|_| DownstreamError::UpdateNotQueued.on_channel(u.channel_id))
    }
}

struct OpenRequest {
    request_id: u32,
    user: String,
    nominal: f32,
    max_target: Target,
    kind: Kind,
    min_extranonce_size: u16,
}

/// A channel's starting difficulty from the hashrate the miner announced.
fn initial_difficulty(ctx: &Ctx, nominal: f32) -> f64 {
    let cfg = ctx.cfg();
    let d = &cfg.difficulty;
    if nominal > 0.0 {
        channel::difficulty_for_hashrate(nominal as f64, d.shares_per_minute, d.min).min(d.max)
    } else {
        d.initial
    }
}

fn submit_error(channel_id: u32, seq: u32, code: &str) -> Message {
    Message::Mining(MiningOwned::SubmitSharesError(SubmitSharesErrorOwned {
        channel_id,
        sequence_number: seq,
        error_code: code.to_string().try_into().expect("short error code"),
    }))
}

/// Why a channel task stopped writing.
enum End {
    /// The connection is gone (its writer dropped the queue).
    Gone,
    /// The channel failed; the connection ends with this reason.
    Failed(DownstreamError),
}

impl From<DownstreamError> for End {
    fn from(e: DownstreamError) -> Self {
        End::Failed(e)
    }
}

fn lock(groups: &Mutex<Groups>) -> std::sync::MutexGuard<'_, Groups> {
    groups.lock().unwrap_or_else(|e| e.into_inner())
}

/// A channel task: owns the channel's core, answers its shares, sends its work.
struct Sv2Channel {
    id: u32,
    kind: Kind,
    core: ChannelCore,
    target_sent: Target,
    /// The connection's groups, for a grouped standard channel.
    group: Option<Arc<Mutex<Groups>>>,
    /// The pool whose group this grouped channel is in (Some once it joined).
    member_of: Option<Option<usize>>,
}

impl Sv2Channel {
    async fn run(
        mut self,
        mut inbox: mpsc::Receiver<Cmd>,
        out: mpsc::Sender<Message>,
        success: Option<MiningOwned>,
    ) -> (u32, Option<DownstreamError>) {
        let id = self.id;
        let r: Result<(), End> = async {
            let first = self.core.start();
            if success.is_some() {
                self.grouped(success, first, &out).await?;
            } else {
                self.deliver(first, &out).await?;
            }
            loop {
                tokio::select! {
                    cmd = inbox.recv() => match cmd {
                        None => return Ok(()),
                        Some(c) => self.on_cmd(c, &out).await?,
                    },
                    w = self.core.wake() => {
                        let o = self.core.on_wake(w?);
                        self.deliver(o, &out).await?;
                    }
                }
            }
        }
        .await;
        if let Some(g) = &self.group {
            lock(g).leave(id);
        }
        match r {
            Ok(()) | Err(End::Gone) => (id, None),
            Err(End::Failed(e)) => (id, Some(e)),
        }
    }

    async fn send(out: &mpsc::Sender<Message>, m: Message) -> Result<(), End> {
        out.send(m).await.map_err(|_| End::Gone)
    }

    async fn on_cmd(&mut self, c: Cmd, out: &mpsc::Sender<Message>) -> Result<(), End> {
        if let (Cmd::Standard(s), Some(_)) = (&c, &self.group) {
            if !self.core.has_job(s.job_id) {
                // The group's job may have reached the miner (sent by another
                // member's task) before this channel's core woke up for it.
                if let Some(w) = self.core.wake().now_or_never() {
                    let o = self.core.on_wake(w?);
                    self.deliver(o, out).await?;
                }
            }
        }
        let (seq, r) = match &c {
            Cmd::Standard(s) => (
                s.sequence_number,
                self.core.check(&Work {
                    job_id: s.job_id,
                    extranonce2: None,
                    ntime: s.ntime,
                    nonce: s.nonce,
                    version_bits: Some(s.version),
                }),
            ),
            Cmd::Extended(s) => (
                s.sequence_number,
                self.core.check(&Work {
                    job_id: s.job_id,
                    extranonce2: Some(s.extranonce.as_bytes()),
                    ntime: s.ntime,
                    nonce: s.nonce,
                    version_bits: Some(s.version),
                }),
            ),
            Cmd::Update { difficulty, floor } => {
                let d = difficulty.unwrap_or(self.core.difficulty()).max(*floor);
                let o = self.core.reconfigure(d, *floor);
                return self.deliver(o, out).await;
            }
        };
        let accepted = r.is_ok();
        let answer = match r {
            Ok(a) => Message::Mining(MiningOwned::SubmitSharesSuccess(SubmitSharesSuccessOwned {
                channel_id: self.id,
                last_sequence_number: seq,
                new_submits_accepted_count: 1,
                new_shares_sum: a.difficulty.round().max(0.0) as u64,
            })),
            Err(why) => {
                self.core.worker().reject(why);
                submit_error(self.id, seq, why.sv2_code())
            }
        };
        Self::send(out, answer).await?;
        Ok(self.core.count_answer(accepted)?)
    }

    /// Tell the miner what the core decided.
    async fn deliver(&mut self, o: Option<Out>, out: &mpsc::Sender<Message>) -> Result<(), End> {
        if self.group.is_some() {
            return match o {
                Some(Out::Target { target, .. }) => Self::send(out, self.set_target(target)).await,
                // Nothing new, but the channel may have left its pool (parked).
                None if self.member_of == Some(self.core.pool()) => Ok(()),
                o => self.grouped(None, o, out).await,
            };
        }
        let mut buf = Vec::new();
        match o {
            None => {}
            Some(Out::Target { target, .. }) => buf.push(self.set_target(target)),
            Some(Out::Job(j)) => self.job(j, &mut buf)?,
        }
        for m in buf {
            Self::send(out, m).await?;
        }
        Ok(())
    }

    /// A grouped channel's writes: its `Success` (with its group id) when
    /// it opens, then whatever [`Groups::update`] decides for its job. They
    /// are queued under the groups' lock, so the miner sees membership and
    /// group jobs in the order they were decided.
    async fn grouped(
        &mut self,
        success: Option<MiningOwned>,
        o: Option<Out>,
        out: &mpsc::Sender<Message>,
    ) -> Result<(), End> {
        let permits = out
            .reserve_many(GROUP_SENDS_MAX)
            .await
            .map_err(|_| End::Gone)?;
        let groups = self.group.clone().expect("a grouped channel");
        let mut g = lock(&groups);
        let pool = self.core.pool();
        let mut msgs = Vec::with_capacity(GROUP_SENDS_MAX);
        if let Some(mut s) = success {
            if let MiningOwned::OpenStandardMiningChannelSuccess(s) = &mut s {
                s.group_channel_id = g.join(self.id, pool);
            }
            msgs.push(Message::Mining(s));
        }
        self.member_of = Some(pool);
        let job = match o {
            Some(Out::Job(j)) => Some(j),
            Some(Out::Target { target, .. }) => {
                msgs.push(self.set_target(target));
                None
            }
            None => None,
        };
        if let Some(j) = &job {
            self.core.observe_fanout(j);
            if j.target != self.target_sent {
                msgs.push(self.set_target(j.target));
            }
        }
        let (job_id, sends) = g.update(self.id, pool, job.as_ref());
        if let Some(id) = job_id {
            self.core.relabel_last_job(id);
        }
        for s in sends {
            match s {
                Send::SetGroup { group, channel } => {
                    debug!(channel, group, "sv2 channel moved to another group");
                    msgs.push(Message::Mining(MiningOwned::SetGroupChannel(
                        SetGroupChannelOwned {
                            group_channel_id: group,
                            channel_ids: vec![channel].try_into().expect("one id"),
                        },
                    )))
                }
                Send::GroupJob {
                    group,
                    job_id,
                    clean,
                } => {
                    let j = job.as_ref().expect("a group job comes from a job");
                    // The members' extranonce is their prefix and zeros: the
                    // zeros go at the head of the group's coinbase suffix.
                    let mut suffix = vec![0u8; self.core.extranonce2_size()];
                    suffix.extend_from_slice(&j.coinbase_suffix);
                    msgs.push(extended_job(group, job_id, j, clean, suffix)?);
                    if clean {
                        msgs.push(prev_hash(group, job_id, &j.up));
                    }
                }
                Send::ChannelJob { channel, job_id } => {
                    let j = job.as_ref().expect("a channel job comes from a job");
                    msgs.push(standard_job(channel, job_id, j, true));
                    msgs.push(prev_hash(channel, job_id, &j.up));
                }
            }
        }
        debug_assert!(msgs.len() <= GROUP_SENDS_MAX, "{msgs:?}");
        for (permit, m) in permits.zip(msgs) {
            permit.send(m);
        }
        drop(g);
        Ok(())
    }

    fn set_target(&mut self, target: Target) -> Message {
        self.target_sent = target;
        Message::Mining(MiningOwned::SetTarget(SetTargetOwned {
            channel_id: self.id,
            maximum_target: U256Owned::from(target.to_le_bytes()),
        }))
    }

    fn job(&mut self, j: JobOut, buf: &mut Vec<Message>) -> Result<(), DownstreamError> {
        self.core.observe_fanout(&j);
        if j.target != self.target_sent {
            buf.push(self.set_target(j.target));
        }
        // A clean job is a future job activated by SetNewPrevHash: that is what
        // voids the miner's earlier jobs.
        let msg = match self.kind {
            Kind::Standard => standard_job(self.id, j.id, &j, j.clean),
            Kind::Extended => extended_job(self.id, j.id, &j, j.clean, j.coinbase_suffix.clone())?,
        };
        buf.push(msg);
        if j.clean {
            buf.push(prev_hash(self.id, j.id, &j.up));
        }
        Ok(())
    }
}

/// `NewMiningJob` for a standard channel (a future job when `future`).
fn standard_job(channel_id: u32, job_id: u32, j: &JobOut, future: bool) -> Message {
    Message::Mining(MiningOwned::NewMiningJob(NewMiningJobOwned {
        channel_id,
        job_id,
        min_ntime: Sv2OptionOwned::new((!future).then_some(j.up.ntime)),
        version: j.up.version,
        merkle_root: U256Owned::from(j.merkle_root.unwrap_or_default()),
    }))
}

/// `NewExtendedMiningJob` to an extended channel or a group (a future job when `future`).
fn extended_job(
    channel_id: u32,
    job_id: u32,
    j: &JobOut,
    future: bool,
    coinbase_suffix: Vec<u8>,
) -> Result<Message, DownstreamError> {
    let up = &j.up;
    Ok(Message::Mining(MiningOwned::NewExtendedMiningJob(
        NewExtendedMiningJobOwned {
            channel_id,
            job_id,
            min_ntime: Sv2OptionOwned::new((!future).then_some(up.ntime)),
            version: up.version,
            version_rolling_allowed: j.version_mask != 0,
            merkle_path: Seq0255Owned::new(
                up.merkle_branch
                    .iter()
                    .map(|h| U256Owned::from(*h))
                    .collect(),
            )
            .map_err(|error| DownstreamError::JobTooLarge {
                what: "merkle path",
                error,
            })?,
            coinbase_tx_prefix: up.coinbase_prefix.clone().try_into().map_err(|error| {
                DownstreamError::JobTooLarge {
                    what: "coinbase prefix",
                    error,
                }
            })?,
            coinbase_tx_suffix: coinbase_suffix.try_into().map_err(|error| {
                DownstreamError::JobTooLarge {
                    what: "coinbase suffix",
                    error,
                }
            })?,
        },
    )))
}

fn prev_hash(channel_id: u32, job_id: u32, up: &crate::upstream::UpJob) -> Message {
    Message::Mining(MiningOwned::SetNewPrevHash(SetNewPrevHashOwned {
        channel_id,
        job_id,
        prev_hash: U256Owned::from(up.prev_hash),
        min_ntime: up.ntime,
        nbits: up.nbits,
    }))
}

/// A short name for a message in logs.
fn name(m: &Message) -> String {
    let s = format!("{m:?}");
    s.chars().take(60).collect()
}
