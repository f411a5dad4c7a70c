//! Commands the engine issues to actuators and the answers that come back:
//! the vocabulary shared by the policy engine, the driver, the ledger and
//! the actuators (and by signals, which name pools).

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::fleet::{ControlSurface, MinerId};
use crate::time::Timestamp;

/// Identifier of a command, unique for the life of a ledger (it continues
/// across restarts via
/// [`Resume::next_command_id`](crate::policy::Resume::next_command_id)).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct CommandId(pub u64);

impl fmt::Display for CommandId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "cmd#{}", self.0)
    }
}

/// An upstream pool as numbered by the proxy's configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct PoolId(pub u32);

/// What to do to one miner.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Action {
    /// Firmware: stop hashing, standby power.
    Sleep,
    /// Firmware: resume hashing.
    Wake,
    /// Firmware: set a power target, W (the nominal power clears a limit).
    SetPowerTarget(u32),
    /// Proxy: withhold work from the miner.
    Park,
    /// Proxy: give work again.
    Unpark,
    /// Proxy: route the miner's work to a pool.
    Reroute(PoolId),
}

impl Action {
    /// Whether the proxy (not the firmware) carries it out. Such actions are
    /// verified by their acknowledgement alone.
    pub fn is_proxy_side(self) -> bool {
        matches!(self, Action::Park | Action::Unpark | Action::Reroute(_))
    }

    /// Stable lower-case name (used in the ledger).
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Sleep => "sleep",
            Action::Wake => "wake",
            Action::SetPowerTarget(_) => "set_power_target",
            Action::Park => "park",
            Action::Unpark => "unpark",
            Action::Reroute(_) => "reroute",
        }
    }

    /// Numeric argument (watts or pool id), if any.
    pub fn value(self) -> Option<u32> {
        match self {
            Action::SetPowerTarget(w) => Some(w),
            Action::Reroute(p) => Some(p.0),
            _ => None,
        }
    }

    /// Rebuild from [`as_str`](Self::as_str) and [`value`](Self::value).
    pub fn from_parts(name: &str, value: Option<u32>) -> Option<Action> {
        Some(match (name, value) {
            ("sleep", _) => Action::Sleep,
            ("wake", _) => Action::Wake,
            ("set_power_target", Some(w)) => Action::SetPowerTarget(w),
            ("park", _) => Action::Park,
            ("unpark", _) => Action::Unpark,
            ("reroute", Some(p)) => Action::Reroute(PoolId(p)),
            _ => return None,
        })
    }
}

/// A command for an actuator, emitted by
/// [`Engine::poll_action`](crate::policy::Engine::poll_action).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Command {
    /// Its id; answer with
    /// [`Engine::handle_ack`](crate::policy::Engine::handle_ack).
    pub id: CommandId,
    /// Target miner.
    pub miner: MinerId,
    /// The miner's control surface (selects the actuator).
    pub surface: ControlSurface,
    /// What to do.
    pub action: Action,
    /// When the engine issued it.
    pub issued_at: Timestamp,
    /// Whether the miner is meant to stay below nominal after it (what the
    /// ledger uses to rebuild the curtailed set after a crash).
    pub curtail: bool,
}

/// An actuator's answer to a command.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Ack {
    /// Accepted by the firmware or proxy. Firmware actions still await
    /// telemetry; some firmware reports success without effect.
    Ok,
    /// Refused or not deliverable.
    Failed(String),
}
