//! What the engine reports ([`PolicyEvent`]s drained by
//! `poll_event`): decisions, verifications, failures, DR event states.

use serde::{Deserialize, Serialize};

use crate::command::{Action, CommandId};
use crate::fleet::MinerId;
use crate::signal::DrEvent;
use crate::time::Timestamp;

use super::Mode;

/// A record of one replan, for the ledger.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    /// When.
    pub at: Timestamp,
    /// Binding constraint.
    pub mode: Mode,
    /// Fleet cap, kW.
    pub cap_kw: Option<f64>,
    /// Expected fleet draw, kW.
    pub expected_kw: f64,
    /// Miners whose target changed.
    pub changes: usize,
    /// Human-readable reason.
    pub reason: String,
}

/// Life cycle of a DR event inside the engine.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DrEventState {
    /// Known, not yet acting.
    Scheduled,
    /// Its cap applies (from its start minus the ramp lead).
    Active,
    /// Over (window end or ended by signal).
    Ended,
}

impl DrEventState {
    /// Stable lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            DrEventState::Scheduled => "scheduled",
            DrEventState::Active => "active",
            DrEventState::Ended => "ended",
        }
    }
}

/// Why a command failed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FailReason {
    /// The actuator refused it.
    Rejected(String),
    /// No acknowledgement within [`PolicyConfig::ack_timeout`].
    AckTimeout,
    /// Acknowledged, but telemetry did not confirm it in time.
    NotVerified,
}

/// Things the caller should record or surface (drained by
/// [`Engine::poll_event`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum PolicyEvent {
    /// A replan changed targets, mode or cap.
    Decision(Decision),
    /// Telemetry (or, for proxy actions, the ack) confirmed a command.
    Verified {
        /// Command.
        command: CommandId,
        /// Miner.
        miner: MinerId,
        /// When.
        at: Timestamp,
    },
    /// A command failed.
    CommandFailed {
        /// Command.
        command: CommandId,
        /// Miner.
        miner: MinerId,
        /// When.
        at: Timestamp,
        /// Why.
        reason: FailReason,
    },
    /// A curtailment moved to its next method.
    Escalated {
        /// Miner.
        miner: MinerId,
        /// Failed action.
        from: Action,
        /// Next action.
        to: Action,
        /// When.
        at: Timestamp,
    },
    /// Every method failed, or restores kept failing.
    Unresponsive {
        /// Miner.
        miner: MinerId,
        /// When.
        at: Timestamp,
    },
    /// Telemetry contradicts an applied curtailment; it is re-sent.
    Drift {
        /// Miner.
        miner: MinerId,
        /// When.
        at: Timestamp,
    },
    /// Safe state entered (`Some(reason)`) or left (`None`).
    SafeState {
        /// When.
        at: Timestamp,
        /// Which signal is stale.
        stale: Option<String>,
    },
    /// A DR event changed state.
    DrEvent {
        /// When.
        at: Timestamp,
        /// The event.
        event: DrEvent,
        /// New state.
        state: DrEventState,
        /// Site kW when it was received (what a shed is measured from).
        baseline_kw: f64,
    },
}
