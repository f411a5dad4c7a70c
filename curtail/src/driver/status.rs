//! What the driver publishes: the [`DriverStatus`] snapshot sent on its
//! `watch` after each loop turn (counters, plan, and the site view: each
//! miner's commanded state and last reading, open DR events, last price),
//! and the report of a stopped driver.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use crate::command::Action;
use crate::fleet::{MinerId, Telemetry};
use crate::policy::{DrEventState, Mode};
use crate::signal::{DrEvent, DrTarget};
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

/// The ledger as the driver sees it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LedgerHealth {
    /// The last write error, while writes keep failing (retried).
    pub error: Option<String>,
    /// When the driver first saw the current failure (driver clock).
    pub failing_since: Option<Timestamp>,
    /// The failure outlasted the timeout: the site is in its ledger-fault
    /// safe state and commands go out unrecorded.
    pub fault_engaged: bool,
    /// Failed write attempts, in all.
    pub write_errors: u64,
    /// Records dropped because the queue was full while writes failed.
    pub dropped: u64,
    /// Commands sent without being recorded first (fault engaged).
    pub unrecorded_commands: u64,
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
    /// Signals the engine refused (validation, future timestamps); not
    /// recorded.
    pub rejected_signals: u64,
    /// Signals identical to the last of their kind; dropped, not recorded.
    pub duplicate_signals: u64,
    /// Signals over their kind's rate; dropped, not recorded.
    pub rate_limited_signals: u64,
    /// Ledger health.
    pub ledger: LedgerHealth,
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
    /// Each miner's commanded state and last telemetry, in fleet order.
    /// Shared, copy-on-write: cloning the status does not copy it.
    pub miners: Miners,
    /// DR events not ended, in the order they were last updated.
    pub dr_events: Vec<DrEventStatus>,
    /// Last energy price received, $/MWh (`None` before the first, or
    /// when the last one was not a finite number).
    pub price_usd_per_mwh: Option<f64>,
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

/// What the driver last commanded a miner to be (from the commands it
/// committed; a miner never commanded is [`Hashing`](Self::Hashing)).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum CommandedState {
    /// Hashing at nominal (never commanded, woken or unparked).
    #[default]
    Hashing,
    /// Asleep.
    Sleeping,
    /// Running under a power target, W.
    Limited(u32),
    /// Parked at the proxy.
    Parked,
}

impl CommandedState {
    /// The state `action` leaves a miner in; `None` for an action that
    /// does not change it ([`Action::Reroute`]).
    pub fn after(action: Action) -> Option<CommandedState> {
        Some(match action {
            Action::Sleep => CommandedState::Sleeping,
            Action::Wake | Action::Unpark => CommandedState::Hashing,
            Action::SetPowerTarget(w) => CommandedState::Limited(w),
            Action::Park => CommandedState::Parked,
            Action::Reroute(_) => return None,
        })
    }

    /// Whether the miner is meant to run below nominal.
    pub fn is_curtailed(self) -> bool {
        self != CommandedState::Hashing
    }
}

impl fmt::Display for CommandedState {
    /// `hashing`, `sleeping`, `limited 2500 W`, `parked`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CommandedState::Hashing => f.write_str("hashing"),
            CommandedState::Sleeping => f.write_str("sleeping"),
            CommandedState::Limited(w) => write!(f, "limited {w} W"),
            CommandedState::Parked => f.write_str("parked"),
        }
    }
}

/// One miner in [`DriverStatus::miners`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MinerStatus {
    /// The miner.
    pub id: MinerId,
    /// What it was last commanded to be.
    pub commanded: CommandedState,
    /// Its last successful telemetry reading (power W, hashrate TH/s, and
    /// `at`, the driver clock when the read started); `None` before one.
    pub telemetry: Option<Telemetry>,
}

/// Miners per shared chunk of [`Miners`]: a change copies at most one
/// chunk per publish, not the whole fleet.
const CHUNK: usize = 1024;

/// Every miner's [`MinerStatus`], in fleet order. Cheap to clone (shared
/// chunks); the driver copies only the chunks that changed since the last
/// status it published.
#[derive(Clone, Default)]
pub struct Miners {
    index: Arc<HashMap<MinerId, u32>>,
    pub(super) chunks: Arc<Vec<Arc<Vec<MinerStatus>>>>,
}

impl Miners {
    /// Number of miners.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// The status of `id`, if it is in the fleet.
    pub fn get(&self, id: MinerId) -> Option<&MinerStatus> {
        let i = *self.index.get(&id)? as usize;
        self.chunks.get(i / CHUNK)?.get(i % CHUNK)
    }

    /// All miners, in fleet order.
    pub fn iter(&self) -> impl Iterator<Item = &MinerStatus> + '_ {
        self.chunks.iter().flat_map(|c| c.iter())
    }

    /// Miners commanded below nominal.
    pub fn curtailed(&self) -> usize {
        self.iter().filter(|m| m.commanded.is_curtailed()).count()
    }
}

impl PartialEq for Miners {
    fn eq(&self, other: &Miners) -> bool {
        Arc::ptr_eq(&self.chunks, &other.chunks)
            || (self.len() == other.len() && self.iter().eq(other.iter()))
    }
}

impl fmt::Debug for Miners {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Miners")
            .field("len", &self.len())
            .field("curtailed", &self.curtailed())
            .finish()
    }
}

/// The driver's side of [`Miners`]: updated in place, published as a
/// snapshot only when something changed.
pub(super) struct MinersBuilder {
    index: Arc<HashMap<MinerId, u32>>,
    chunks: Vec<Arc<Vec<MinerStatus>>>,
    published: Miners,
    dirty: bool,
}

impl MinersBuilder {
    /// Every miner of `ids` hashing, no telemetry yet.
    pub(super) fn new(ids: impl IntoIterator<Item = MinerId>) -> MinersBuilder {
        let all: Vec<MinerStatus> = ids
            .into_iter()
            .map(|id| MinerStatus {
                id,
                commanded: CommandedState::Hashing,
                telemetry: None,
            })
            .collect();
        let index = all
            .iter()
            .enumerate()
            .map(|(i, m)| (m.id, i as u32))
            .collect();
        let chunks = all.chunks(CHUNK).map(|c| Arc::new(c.to_vec())).collect();
        let mut b = MinersBuilder {
            index: Arc::new(index),
            chunks,
            published: Miners::default(),
            dirty: true,
        };
        b.snapshot();
        b
    }

    fn entry(&mut self, id: MinerId) -> Option<&mut MinerStatus> {
        let i = *self.index.get(&id)? as usize;
        let chunk = self.chunks.get_mut(i / CHUNK)?;
        self.dirty = true;
        // Copies the chunk only while a published snapshot still shares it.
        Arc::make_mut(chunk).get_mut(i % CHUNK)
    }

    /// `action` was committed for `id`.
    pub(super) fn commanded(&mut self, id: MinerId, action: Action) {
        if let Some(state) = CommandedState::after(action) {
            if let Some(m) = self.entry(id) {
                m.commanded = state;
            }
        }
    }

    /// A reading of `id` came in.
    pub(super) fn telemetry(&mut self, id: MinerId, t: Telemetry) {
        if let Some(m) = self.entry(id) {
            m.telemetry = Some(t);
        }
    }

    /// The current view; rebuilt (shallowly) only if something changed.
    pub(super) fn snapshot(&mut self) -> Miners {
        if self.dirty {
            self.published = Miners {
                index: self.index.clone(),
                chunks: Arc::new(self.chunks.clone()),
            };
            self.dirty = false;
        }
        self.published.clone()
    }
}

/// An open DR event in [`DriverStatus::dr_events`].
#[derive(Clone, Debug, PartialEq)]
pub struct DrEventStatus {
    /// Issuer's id.
    pub id: String,
    /// Engine state (never [`DrEventState::Ended`]: ended events are
    /// dropped from the list).
    pub state: DrEventState,
    /// What is asked.
    pub target: DrTarget,
    /// Site kW when the event was received (what a shed is taken from).
    pub baseline_kw: f64,
    /// The kW limit it sets: the limit itself, or `baseline − shed`
    /// (at least 0) for a shed.
    pub limit_kw: f64,
    /// Window start.
    pub start: Timestamp,
    /// Window end (`None`: until ended by signal).
    pub end: Option<Timestamp>,
}

impl DrEventStatus {
    /// The status of `event` in `state`, received at `baseline_kw`.
    pub fn new(event: &DrEvent, state: DrEventState, baseline_kw: f64) -> DrEventStatus {
        let limit_kw = match event.target {
            DrTarget::LimitKw(k) => k,
            DrTarget::ShedKw(k) => (baseline_kw - k).max(0.0),
        };
        DrEventStatus {
            id: event.id.clone(),
            state,
            target: event.target,
            baseline_kw,
            limit_kw,
            start: event.start,
            end: event.end,
        }
    }

    /// The target as operators read it: `limit 15 kW` or `shed 5 kW`.
    pub fn target_text(&self) -> String {
        match self.target {
            DrTarget::LimitKw(k) => format!("limit {k:.0} kW"),
            DrTarget::ShedKw(k) => format!("shed {k:.0} kW"),
        }
    }
}

/// Apply a DR event state change to the open list: the event is replaced
/// (moved to the end), or dropped once ended.
pub(super) fn update_dr_events(list: &mut Vec<DrEventStatus>, ev: DrEventStatus) {
    list.retain(|e| e.id != ev.id);
    if ev.state != DrEventState::Ended {
        list.push(ev);
    }
}
