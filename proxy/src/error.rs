//! The engine's errors, typed so an embedder can tell them apart.

use gridproxy_protocol::extranonce::ExtranonceError;
use gridproxy_protocol::sv1::{RpcError, Sv1Error};
use gridproxy_protocol::sv2::common_messages_sv2::Protocol;
use gridproxy_protocol::sv2::{binary_sv2, AuthorityPublicKey, KeyError, Sv2Error};
use std::net::SocketAddr;
use std::time::Duration;

/// Why the proxy did not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A listener could not be bound.
    #[error("bind {what} listener {addr}: {source}")]
    Bind {
        /// `sv1`, `sv2` or `control API`.
        what: &'static str,
        /// The address asked for.
        addr: SocketAddr,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The SV2 listener has no authority key pair configured.
    #[error("listen.sv2 needs sv2_authority_pubkey and sv2_authority_secret")]
    NoAuthority,
    /// The SV2 listener's authority keys do not parse or do not match.
    #[error("listen.sv2_authority_pubkey / sv2_authority_secret: {0}")]
    Authority(#[source] KeyError),
    /// `sv2_authority_secret_file` could not be read.
    #[error("listen.sv2_authority_secret_file: {0}")]
    SecretFile(String),
}

/// Why a new configuration was not put in force (nothing was applied).
#[derive(Debug, thiserror::Error)]
pub enum ReconfigureError {
    /// Tables that can only change with a restart.
    #[error("[{}] changed: these need a restart; nothing was applied", .0.join("], ["))]
    NeedsRestart(Vec<&'static str>),
    /// The new values do not make sense.
    #[error(transparent)]
    Invalid(#[from] crate::config::Invalid),
}

/// Why a miner connection, or one SV2 channel on it, was closed. `Eof` and
/// `Shutdown` are ordinary ends; every other variant is logged as the reason.
#[derive(Debug, thiserror::Error)]
pub enum DownstreamError {
    /// The miner closed the connection.
    #[error("closed by the miner")]
    Eof,
    /// The proxy is shutting down.
    #[error("proxy shutting down")]
    Shutdown,
    /// Reading the socket failed.
    #[error("read: {0}")]
    Read(#[source] std::io::Error),
    /// Writing the socket failed.
    #[error("write: {0}")]
    Write(#[source] std::io::Error),
    /// Writing the SV2 transport failed.
    #[error("write: {0}")]
    Sv2Write(#[source] Sv2Error),
    /// A line without a newline within the limit.
    #[error("line longer than {limit} bytes")]
    LineTooLong {
        /// `limits.max_line`.
        limit: usize,
    },
    /// An SV1 line that is not a request we can answer.
    #[error("malformed input: {0}")]
    Malformed(#[source] Sv1Error),
    /// SV1: no subscribe and authorize within the handshake timeout.
    #[error("not subscribed and authorized within {0:?}")]
    HandshakeTimeout(Duration),
    /// SV2: no `SetupConnection` within the handshake timeout.
    #[error("no SetupConnection before the handshake timeout")]
    SetupTimeout,
    /// Nothing read for the idle timeout.
    #[error("idle for {0:?}")]
    Idle(Duration),
    /// Every miner part is taken.
    #[error("no extranonce slot: {0}")]
    NoSlot(#[source] ExtranonceError),
    /// The miner does not read: answers reached the queue limit.
    #[error("miner does not read (answers piling up)")]
    AnswersPilingUp,
    /// The miner does not read: a write waited too long.
    #[error("miner does not read (write timed out)")]
    WriteTimedOut,
    /// More submits than the configured rate allows.
    #[error("submit flood: more than {per_second}/s sustained")]
    SubmitFlood {
        /// `limits.submits_per_second`.
        per_second: f64,
    },
    /// More requests other than submits than the configured rate allows
    /// (each `mining.suggest_difficulty`, say, rebuilds and resends a job).
    #[error("request flood: more than {per_second}/s sustained (requests other than submits)")]
    RequestFlood {
        /// `limits.requests_per_second`.
        per_second: f64,
    },
    /// Too many of the connection's shares were rejected.
    #[error("{rejected} of the last {window} shares rejected (limit {max_ratio})")]
    RejectFlood {
        /// Rejected shares in the window.
        rejected: u32,
        /// `limits.reject_window`.
        window: u32,
        /// `limits.max_reject_ratio`.
        max_ratio: f64,
    },
    /// The pool's upstream task is gone (shutdown).
    #[error("upstream task ended")]
    UpstreamEnded,
    /// An SV2 frame that does not decrypt or parse.
    #[error("bad frame: {0}")]
    BadFrame(#[source] Sv2Error),
    /// The first SV2 message was not `SetupConnection` (the message, shortened).
    #[error("expected SetupConnection, got {0}")]
    ExpectedSetup(String),
    /// `SetupConnection` for another subprotocol.
    #[error("SetupConnection for {0:?}: only the mining protocol is served")]
    UnsupportedProtocol(Protocol),
    /// `SetupConnection` versions without ours.
    #[error("SetupConnection versions {min}..={max} do not include {ours}")]
    VersionMismatch {
        /// The miner's minimum.
        min: u16,
        /// The miner's maximum.
        max: u16,
        /// The one version the proxy speaks.
        ours: u16,
    },
    /// `SetupConnection` asks for work selection.
    #[error("SetupConnection requires work selection (not supported)")]
    WorkSelection,
    /// A second `SetupConnection`.
    #[error("SetupConnection sent twice")]
    SetupTwice,
    /// A message a miner must not send (the message, shortened).
    #[error("unexpected message {0}")]
    UnexpectedMessage(String),
    /// Something went wrong on one SV2 channel.
    #[error("channel {id}: {source}")]
    Channel {
        /// The channel.
        id: u32,
        /// What went wrong.
        source: Box<DownstreamError>,
    },
    /// A channel's share queue is full.
    #[error("share backlog full (miner does not read its answers)")]
    ShareBacklogFull,
    /// A share came for a channel whose task has ended.
    #[error("channel {0} ended")]
    ChannelEnded(u32),
    /// An `UpdateChannel` could not be queued.
    #[error("backlog full or ended")]
    UpdateNotQueued,
    /// A channel task panicked.
    #[error("channel task panicked")]
    ChannelPanicked,
    /// A job field does not fit its SV2 type.
    #[error("{what} does not fit a job: {error:?}")]
    JobTooLarge {
        /// `merkle path`, `coinbase prefix` or `coinbase suffix`.
        what: &'static str,
        /// The encoder's complaint.
        error: binary_sv2::Error,
    },
}

impl DownstreamError {
    /// This error, as it happened on SV2 channel `id`.
    pub fn on_channel(self, id: u32) -> Self {
        Self::Channel {
            id,
            source: Box::new(self),
        }
    }
}

/// Why an upstream (pool) connection ended; recorded as the pool's last error.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// Transport / Noise / framing problems.
    #[error(transparent)]
    Sv2(#[from] Sv2Error),
    /// The pool's host name did not resolve (retried like any upstream error).
    #[error("resolve {endpoint}: {reason}")]
    Resolve {
        /// The pool's `host:port`.
        endpoint: String,
        /// What the resolver said (or that it timed out or gave nothing).
        reason: String,
    },
    /// The TCP connect failed, to every address the host resolved to.
    #[error("connect {endpoint}{}: {source}", tried_list(.tried, .endpoint))]
    Connect {
        /// The pool's `host:port`.
        endpoint: String,
        /// The addresses tried, in order.
        tried: Vec<SocketAddr>,
        /// What the OS said for the last one (a timeout as `TimedOut`).
        source: std::io::Error,
    },
    /// Reading the socket failed.
    #[error("read: {0}")]
    Read(#[source] std::io::Error),
    /// Writing the socket failed.
    #[error("write: {0}")]
    Write(#[source] std::io::Error),
    /// The pool closed the connection.
    #[error("pool closed the connection")]
    Closed,
    /// An SV1 line from the pool that does not parse.
    #[error("pool sent: {0}")]
    PoolSent(#[source] Sv1Error),
    /// No job for the configured time.
    #[error("no job from the pool for {0:?}")]
    NoJob(Duration),
    /// An SV2 pool without a pinned key (config validation normally refuses it).
    #[error("no authority_pubkey for an sv2 pool")]
    NoAuthorityKey,
    /// The pinned key does not parse.
    #[error("authority_pubkey: {0}")]
    BadAuthorityKey(#[source] KeyError),
    /// The pool's certificate is not signed by the pinned key.
    #[error(
        "pool {pool} at {addr} is not signed by the pinned authority_pubkey {key}: refusing it"
    )]
    NotSigned {
        /// The pool's name.
        pool: String,
        /// Its address.
        addr: SocketAddr,
        /// The key pinned in the config.
        key: AuthorityPublicKey,
    },
    /// One of our own setup fields is too long for SV2.
    #[error("{0} does not fit its SV2 field")]
    FieldTooLong(&'static str),
    /// No channel open within the setup timeout.
    #[error("setup timed out")]
    SetupTimeout,
    /// `SetupConnection.Error` with the pool's code.
    #[error("SetupConnection refused: {0}")]
    SetupRefused(String),
    /// Something else than the setup answer (the message, shortened).
    #[error("expected SetupConnection.Success, got {0}")]
    UnexpectedSetupReply(String),
    /// `OpenMiningChannel.Error` with the pool's code.
    #[error("OpenExtendedMiningChannel refused: {0}")]
    OpenRefused(String),
    /// The SV2 channel has fewer extranonce bytes than the proxy needs.
    #[error("pool gave {got} extranonce bytes, need {need}")]
    ExtranonceTooSmall {
        /// What the pool gave.
        got: usize,
        /// `extranonce.miner_bytes + extranonce2_size`.
        need: usize,
    },
    /// `RequestExtensions.Error` naming extensions the pool requires that
    /// we did not request (the pool then disconnects, 0x0001 §4.6).
    #[error("{}", extensions_required(.required, *.identity_off))]
    ExtensionsRequired {
        /// The extensions the pool requires.
        required: Vec<u16>,
        /// 0x0002 is among them and `worker_identity = false` here.
        identity_off: bool,
    },
    /// The pool closed our SV2 channel, with its reason code.
    #[error("pool closed the channel: {0}")]
    ChannelClosed(String),
    /// The SV1 subscribe answer does not parse (the pool's result and error).
    #[error("bad subscribe result: {result} {error:?}")]
    BadSubscribe {
        /// The pool's result.
        result: serde_json::Value,
        /// The pool's error.
        error: Option<RpcError>,
    },
    /// The SV1 subscribe gives fewer extranonce2 bytes than the proxy needs.
    #[error("pool gives {got} extranonce2 bytes; need {need} (extranonce.miner_bytes + extranonce2_size)")]
    Extranonce2TooSmall {
        /// What the pool gave.
        got: usize,
        /// What the proxy needs.
        need: usize,
    },
    /// `mining.set_extranonce` to fewer extranonce2 bytes than the proxy needs.
    #[error("pool set extranonce2 size {got}; need {need}")]
    SetExtranonceTooSmall {
        /// What the pool set.
        got: usize,
        /// What the proxy needs.
        need: usize,
    },
    /// The pool refused `mining.authorize` for this user.
    #[error("pool refused authorize for {user}: {error:?}")]
    AuthorizeRefused {
        /// The configured user.
        user: String,
        /// The pool's error.
        error: Option<RpcError>,
    },
    /// The pool asked us to reconnect (`client.reconnect`), maybe elsewhere.
    #[error("pool sent client.reconnect {0}")]
    Reconnect(crate::endpoint::Redirect),
}

/// ` (tried a, b)` unless the one address tried is the endpoint itself.
fn tried_list(tried: &[SocketAddr], endpoint: &str) -> String {
    match tried {
        [one] if one.to_string() == endpoint => String::new(),
        _ => format!(
            " (tried {})",
            tried
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// What [`UpstreamError::ExtensionsRequired`] says.
fn extensions_required(required: &[u16], identity_off: bool) -> String {
    let list = required
        .iter()
        .map(|e| format!("{e:#06x}"))
        .collect::<Vec<_>>()
        .join(", ");
    let s = if required.len() == 1 { "" } else { "s" };
    if identity_off {
        format!("the pool requires SV2 extension{s} {list} and closes the connection without: 0x0002 (worker-specific hashrate tracking) is off for this pool, set worker_identity = true")
    } else {
        format!("the pool requires SV2 extension{s} {list}, which gridproxy does not support, and closes the connection without")
    }
}
