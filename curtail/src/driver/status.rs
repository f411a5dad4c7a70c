//! What the driver publishes: the [`DriverStatus`] snapshot sent on its
//! `watch` after each loop turn, and the report of a stopped driver.

use crate::policy::Mode;
use crate::time::Timestamp;

/// What the engine got back from the ledger at start.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Resumed {
    /// First command id of this run.
    pub next_command_id: u64,
    /// Miners recovered as curtailed (kept so, nothing re-sent).
    pub curtailed: usize,
    /// Open DR events recovered.
    pub events: usize,
}

/// A snapshot of the driver, published after each loop turn.
#[derive(Clone, Debug, PartialEq)]
pub struct DriverStatus {
    /// Driver clock at the snapshot.
    pub now: Timestamp,
    /// What was recovered at start.
    pub resumed: Resumed,
    /// Signals received / refused by the engine.
    pub signals: u64,
    /// Signals the engine refused (validation).
    pub rejected_signals: u64,
    /// Commands committed to the ledger and handed to actuators.
    pub issued: u64,
    /// Acknowledged OK / failed by actuators.
    pub acks_ok: u64,
    /// Refused or failed by actuators.
    pub acks_failed: u64,
    /// Commands the engine confirmed (telemetry, or the ack for proxy ones).
    pub verified: u64,
    /// Commands the engine declared failed (refused, ack timeout, not
    /// verified).
    pub failed: u64,
    /// Escalations (sleep → power target → park).
    pub escalated: u64,
    /// Miners reported unresponsive.
    pub unresponsive: u64,
    /// Curtailments telemetry contradicted (re-sent).
    pub drift: u64,
    /// Commands in flight in the engine.
    pub in_flight: usize,
    /// Binding constraint of the current plan.
    pub mode: Mode,
    /// Fleet cap in force, kW.
    pub cap_kw: Option<f64>,
    /// Fleet draw the plan expects, kW.
    pub expected_kw: f64,
    /// Fleet draw from the last telemetry round, kW (miners never read
    /// count at nominal).
    pub measured_kw: Option<f64>,
    /// Telemetry reads that succeeded / failed.
    pub telemetry_ok: u64,
    /// Telemetry reads that failed.
    pub telemetry_errors: u64,
    /// When the first and the last command of this run were issued.
    pub first_issue_at: Option<Timestamp>,
    /// When the last command was issued.
    pub last_issue_at: Option<Timestamp>,
}

/// What a driver that stopped returns.
#[derive(Clone, Debug, PartialEq)]
pub struct DriverReport {
    /// Status at the end.
    pub status: DriverStatus,
    /// Commands sent whose acknowledgement did not come back before the
    /// drain timeout.
    pub unanswered: usize,
}
