//! What the engine intends: the binding constraint ([`Mode`]) and the
//! timed [`Plan`] it is working through.

use serde::{Deserialize, Serialize};

use crate::command::Action;
use crate::fleet::MinerId;
use crate::time::Timestamp;

/// The constraint that shaped a plan.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Mode {
    /// Nothing binding: every miner runs.
    Normal,
    /// Prices curtail the miners whose breakeven they exceed.
    Price,
    /// A DR event's kW limit binds.
    DrEvent,
    /// A dispatch kW target binds.
    Dispatch,
    /// The balance cap (contract − other load) binds.
    Balance,
    /// A manual override decides.
    Override,
    /// A stale signal put the fleet in its safe state (curtail all).
    SafeState,
}

impl Mode {
    /// Stable lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Normal => "normal",
            Mode::Price => "price",
            Mode::DrEvent => "dr_event",
            Mode::Dispatch => "dispatch",
            Mode::Balance => "balance",
            Mode::Override => "override",
            Mode::SafeState => "safe_state",
        }
    }
}

/// One timed step of a [`Plan`].
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct PlannedAction {
    /// Estimated issue time (after dwell, rate limit and restore batching).
    pub at: Timestamp,
    /// Miner.
    pub miner: MinerId,
    /// Next action for it.
    pub action: Action,
}

/// The engine's current plan.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    /// When it was made.
    pub at: Timestamp,
    /// Binding constraint.
    pub mode: Mode,
    /// Whether a stale signal applies its safe state.
    pub safe_state: bool,
    /// Fleet cap in force, kW.
    pub cap_kw: Option<f64>,
    /// Fleet draw once every target is reached, kW (fleet model).
    pub expected_kw: f64,
    /// Whether `expected_kw` is at or under `cap_kw`.
    pub feasible: bool,
    /// Estimated time the last curtailing action has taken effect.
    pub reach_at: Timestamp,
    /// Miners with a pending step, each with its next action, by time.
    pub actions: Vec<PlannedAction>,
}
