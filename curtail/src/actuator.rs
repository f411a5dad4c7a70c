//! Edge traits: what actuators, telemetry pollers and signal sources implement.
//!
//! The policy engine is pure; these traits are the seams where I/O plugs in.
//! Implementations (firmware clients over `asic-rs` or our own, the proxy's
//! park/reroute handle, OpenADR/MQTT/price sources, emulators in `fixtures`)
//! live elsewhere. The traits use `async fn`-compatible signatures returning
//! `Send` futures so a tokio driver can run them concurrently without this
//! crate depending on tokio.
//!
//! A driver's loop, in outline:
//!
//! ```text
//! let cmd = engine.poll_action(clock.now())?;
//! let actuator = actuators.for_command(&cmd);   // firmware by cmd.surface, or the proxy
//! spawn(async move { let ack = Ack::from(actuator.execute(&cmd).await); tx.send((cmd.id, ack)) });
//! // … later, on the engine's task:
//! engine.handle_ack(clock.now(), id, ack)?;
//! engine.handle_telemetry(clock.now(), miner, telemetry.read(miner).await?)?;
//! ```

use std::future::Future;

use thiserror::Error;

use crate::command::{Ack, Command};
use crate::fleet::{ControlSurface, MinerId, Telemetry};
use crate::signal::Signal;

/// Why an actuator or poller call failed.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ActuatorError {
    /// The miner did not answer in time.
    #[error("{miner}: timed out")]
    Timeout {
        /// Miner.
        miner: MinerId,
    },
    /// The miner could not be reached.
    #[error("{miner}: unreachable: {detail}")]
    Unreachable {
        /// Miner.
        miner: MinerId,
        /// Transport detail.
        detail: String,
    },
    /// The firmware refused the command.
    #[error("{miner}: rejected: {detail}")]
    Rejected {
        /// Miner.
        miner: MinerId,
        /// Firmware's message.
        detail: String,
    },
    /// The surface cannot do this action.
    #[error("{miner}: {surface:?} does not support {action}")]
    Unsupported {
        /// Miner.
        miner: MinerId,
        /// Its surface.
        surface: ControlSurface,
        /// The action's name.
        action: &'static str,
    },
    /// Credentials were refused.
    #[error("{miner}: authentication failed")]
    Auth {
        /// Miner.
        miner: MinerId,
    },
    /// The miner is not in this actuator's inventory.
    #[error("{0}: unknown to this actuator")]
    UnknownMiner(MinerId),
}

impl From<Result<(), ActuatorError>> for Ack {
    fn from(r: Result<(), ActuatorError>) -> Ack {
        match r {
            Ok(()) => Ack::Ok,
            Err(e) => Ack::Failed(e.to_string()),
        }
    }
}

/// Carries out [`Command`]s. One implementation per firmware family, plus
/// one for the proxy (park, unpark, reroute; see
/// [`Action::is_proxy_side`](crate::command::Action::is_proxy_side)).
///
/// `execute` returns once the target accepted or refused the command; it does
/// not wait for the effect (the engine verifies by telemetry). It maps the
/// miner id to an address and credentials itself.
pub trait Actuator: Send + Sync {
    /// Whether this actuator handles `surface` (firmware actions).
    fn handles(&self, surface: ControlSurface) -> bool;

    /// Send one command.
    fn execute(&self, command: &Command) -> impl Future<Output = Result<(), ActuatorError>> + Send;
}

/// Reads miner telemetry (power, hashrate) for verification and M&V.
pub trait TelemetrySource: Send + Sync {
    /// One reading of `miner`.
    fn read(&self, miner: MinerId)
        -> impl Future<Output = Result<Telemetry, ActuatorError>> + Send;
}

/// Why a signal source failed.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum SourceError {
    /// The source has closed for good.
    #[error("signal source closed")]
    Closed,
    /// Transport failure (the driver may retry).
    #[error("signal source transport: {0}")]
    Transport(String),
    /// The peer sent something unparseable or out of range.
    #[error("signal source sent bad data: {0}")]
    BadData(String),
}

/// Produces typed [`Signal`]s (price feed, OpenADR VEN, MQTT dispatch, site
/// meter, control API).
pub trait SignalSource: Send {
    /// Stable name for logs and the ledger.
    fn name(&self) -> &str;

    /// Wait for the next signal.
    fn next_signal(&mut self) -> impl Future<Output = Result<Signal, SourceError>> + Send;
}
