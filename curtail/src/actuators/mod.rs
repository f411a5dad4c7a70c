//! Firmware clients: the I/O edge behind [`Actuator`](crate::actuator::Actuator)
//! and [`TelemetrySource`](crate::actuator::TelemetrySource).
//!
//! - [`luxos`]: LuxOS TCP JSON (`logon`, `curtail sleep|wakeup`,
//!   `profiles`/`profileset`, `summary`/`power`).
//! - [`braiins`]: Braiins OS gRPC (`braiins.bos.v1`: Login, PauseMining,
//!   ResumeMining, SetPowerTarget, GetMinerStats) over tonic.
//! - [`whatsminer`]: Whatsminer API v2 (`get_token`, md5-crypt token,
//!   AES-256-ECB `power_off`/`power_on`/`adjust_power_limit`, `summary`).
//! - [`whatsminer_v3`]: Whatsminer API v3 (port 4433, length-prefixed JSON,
//!   salted SHA-256 token; `set.miner.service stop|start`,
//!   `set.miner.power_limit`, `get.miner.status summary`), and the per-miner
//!   choice of v2, v3 or auto.
//! - [`vnish`]: VNish REST (`unlock`, `mining/pause|resume`, autotune
//!   presets, `summary`) over a small hyper HTTP/1.1 client.
//! - [`stock`]: stock cgminer telemetry (no control).
//! - [`fleet`]: [`FleetActuator`], dispatching each
//!   command by the miner's [`ControlSurface`] to its client.
//! - [`verify`]: confirm a command by telemetry (firmware may ack and do
//!   nothing).
//!
//! Every client takes a [`HostPort`] (a host name or IP address, any port;
//! a name is resolved at every connect and each of its addresses tried in
//! turn, never at configuration) and a timeout that bounds each whole
//! operation, logins and lookups included: nothing waits longer, whatever
//! the peer does. Errors are [`ClientError`]s; [`FleetActuator`]
//! maps them to [`ActuatorError`] with the miner's id.
//!
//! # Why not `asic-rs` (0.8.6, evaluated)
//!
//! The design planned to wrap `asic-rs`. Against these APIs it falls short:
//! - ports are fixed (`4028`, `80`; the `new_with_port` constructors are
//!   `#[cfg(test)]` or inside private modules), so it cannot reach an
//!   emulator on `127.0.0.x:<port 0>` nor a miner behind a port forward;
//! - its Braiins OS backends speak the REST/GraphQL web API, not the gRPC
//!   API on 50051 that this crate and its emulator use;
//! - LuxOS support is pause/resume only (no `profileset`, so no power
//!   target), and its I/O timeout is a fixed 5 s constant;
//! - it pulls reqwest + rustls + aws-lc-sys into the curtail crate.
//!
//! Tried against the emulators (a throwaway probe, not in the tree): with
//! the LuxOS emulator on `127.0.0.91:4028`, `asic-rs`'s LuxOS entry
//! identified the miner, and `get_data` (watts, TH/s), `pause` and `resume`
//! worked and moved the simulated power; `supports_set_power_limit()` was
//! false. It works only on the standard port, though, and gives no power
//! target, so a LuxOS client of our own is needed anyway.
//!
//! So all four clients are our own, written from the public API docs; none
//! copies `asic-rs` code. `asic-rs` remains a candidate for discovery and
//! read-only data on real sites (where the standard ports hold).

use std::net::SocketAddr;
use std::time::Duration;

use thiserror::Error;

use crate::actuator::ActuatorError;
use crate::fleet::{ControlSurface, MinerId};

pub mod antminer;
pub mod braiins;
pub mod cgminer;
pub mod fleet;
mod http;
pub mod luxos;
pub mod stock;
pub mod verify;
pub mod vnish;
pub mod whatsminer;
pub mod whatsminer_v3;

pub use fleet::{FleetActuator, MinerEndpoint};
pub use whatsminer_v3::{ApiVersion, WhatsminerApi};

/// Why a firmware client call failed.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ClientError {
    /// The whole operation did not finish within the client's timeout.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// The TCP connection could not be made.
    #[error("connect failed: {0}")]
    Connect(String),
    /// The connection broke mid-request.
    #[error("transport: {0}")]
    Transport(String),
    /// The reply could not be understood.
    #[error("unexpected reply: {0}")]
    Protocol(String),
    /// The firmware refused the command (its own words).
    #[error("refused by firmware: {0}")]
    Rejected(String),
    /// Credentials or session/token were refused.
    #[error("authentication failed: {0}")]
    Auth(String),
    /// This firmware cannot do that.
    #[error("not supported by this firmware: {0}")]
    Unsupported(&'static str),
}

impl ClientError {
    /// The same failure as an [`ActuatorError`] about `miner`.
    pub fn for_miner(self, miner: MinerId, surface: ControlSurface) -> ActuatorError {
        match self {
            ClientError::Timeout(_) => ActuatorError::Timeout { miner },
            ClientError::Connect(detail) | ClientError::Transport(detail) => {
                ActuatorError::Unreachable { miner, detail }
            }
            ClientError::Protocol(d) => ActuatorError::Unreachable {
                miner,
                detail: format!("bad reply: {d}"),
            },
            ClientError::Rejected(detail) => ActuatorError::Rejected { miner, detail },
            ClientError::Auth(_) => ActuatorError::Auth { miner },
            ClientError::Unsupported(action) => ActuatorError::Unsupported {
                miner,
                surface,
                action,
            },
        }
    }
}

/// One telemetry reading from a firmware.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Reading {
    /// Power draw, W.
    pub power_w: f64,
    /// Hashrate, TH/s.
    pub hashrate_ths: f64,
}

/// Where a firmware API listens: a host (a name, or an IP address) and a
/// port. A name is looked up at each connect, so a miner that changes
/// address (DHCP, DNS) is followed.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct HostPort {
    /// A DNS name, an IPv4 address or an IPv6 address (no brackets).
    pub host: String,
    /// TCP port.
    pub port: u16,
}

impl HostPort {
    /// `host` (a name or an IP address, IPv6 without brackets) at `port`.
    pub fn new(host: impl Into<String>, port: u16) -> HostPort {
        HostPort {
            host: host.into(),
            port,
        }
    }

    /// Resolve now and connect to the first address that accepts, trying
    /// each in turn (the caller bounds it in time).
    pub(crate) async fn connect(&self) -> Result<tokio::net::TcpStream, ClientError> {
        tokio::net::TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|e| ClientError::Connect(format!("{self}: {e}")))
    }
}

impl From<SocketAddr> for HostPort {
    fn from(a: SocketAddr) -> HostPort {
        HostPort::new(a.ip().to_string(), a.port())
    }
}

impl std::fmt::Display for HostPort {
    /// `host:port`, an IPv6 address in brackets (as in a URL).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// Where a client talks and how long it waits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientConfig {
    /// Firmware API address.
    pub addr: HostPort,
    /// Bound on each whole operation (lookup, connect, login, request, reply).
    pub timeout: Duration,
}

impl ClientConfig {
    /// `addr` with a 5 s timeout.
    pub fn new(addr: impl Into<HostPort>) -> ClientConfig {
        ClientConfig {
            addr: addr.into(),
            timeout: Duration::from_secs(5),
        }
    }

    /// The same with `timeout`.
    pub fn with_timeout(mut self, timeout: Duration) -> ClientConfig {
        self.timeout = timeout;
        self
    }
}

/// Run `fut` under `timeout`.
pub(crate) async fn bounded<T>(
    timeout: Duration,
    fut: impl std::future::Future<Output = Result<T, ClientError>>,
) -> Result<T, ClientError> {
    tokio::time::timeout(timeout, fut)
        .await
        .unwrap_or(Err(ClientError::Timeout(timeout)))
}
