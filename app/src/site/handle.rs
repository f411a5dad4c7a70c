//! The site (grid) side as the API sees it: a snapshot published by whoever
//! drives curtailment (the demo's driver, or the curtail bridge), a command
//! channel back to it, and a bounded event log.
//!
//! The API does not depend on the curtail crate: a driver converts its
//! engine's state into [`SiteState`] and [`MinerView`]s and reads
//! [`SiteCommand`]s. Locks are std locks held only to swap an `Arc`.

use serde::Serialize;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc;

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A demand-response event as shown to operators.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct DrEventView {
    /// Issuer's id.
    pub id: String,
    /// `scheduled`, `active` or `ended`.
    pub state: String,
    /// What is asked, e.g. `limit 900 kW` or `shed 300 kW`.
    pub target: String,
    /// The kW limit it implies, when known.
    pub limit_kw: Option<f64>,
    /// Window start, unix ms.
    pub start_ms: u64,
    /// Window end, unix ms (None: until ended).
    pub end_ms: Option<u64>,
}

/// Command counters of the curtailment driver.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct CommandCounts {
    /// Commands sent to actuators.
    pub issued: u64,
    /// Confirmed by telemetry or acknowledgement.
    pub verified: u64,
    /// Refused, timed out or not confirmed.
    pub failed: u64,
}

/// What became of the signals the sources sent.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct SignalCounts {
    /// Every signal received.
    pub received: u64,
    /// Refused (out of range, stamped too far ahead); not recorded.
    pub refused: u64,
    /// Repeats of the last signal of their kind; not recorded.
    pub duplicate: u64,
    /// Over their kind's rate; not recorded.
    pub rate_limited: u64,
}

/// The ledger's health as operators see it.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct LedgerView {
    /// The last write error while writes keep failing (`None`: healthy).
    pub error: Option<String>,
    /// Seconds the current failure has lasted.
    pub failing_secs: Option<u64>,
    /// The failure outlasted `ledger_fault_secs`: the site holds its
    /// ledger-fault safe state and commands go out unrecorded.
    pub fault_engaged: bool,
    /// Failed write attempts, in all.
    pub write_errors: u64,
    /// Records dropped while the ledger failed and its queue was full.
    pub dropped: u64,
    /// Commands sent without being recorded first.
    pub unrecorded_commands: u64,
}

/// This instance and the site lease (`[site.lease]`).
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct LeaseView {
    /// Whether this instance holds it (and runs the engine).
    pub held: bool,
    /// The fencing token held (0 in standby).
    pub token: u64,
}

/// Another instance as the active one sees it (`[[site.peers]]`).
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct PeerView {
    /// Its name in the config.
    pub name: String,
    /// Its control API, `host:port`.
    pub address: String,
    /// Whether the last push of parks reached it and was applied.
    pub up: bool,
    /// When a push last succeeded, unix ms.
    pub last_ok_ms: Option<u64>,
    /// Parks and pins in force there after the last push.
    pub applied: usize,
    /// Workers connected there (what it reported with the last push).
    pub workers: usize,
    /// Pushes applied there, in all.
    pub pushes_ok: u64,
    /// Pushes that failed (unreachable, refused, fenced), in all.
    pub pushes_failed: u64,
    /// Why the last push failed, while it fails.
    pub error: Option<String>,
}

/// The site now.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct SiteState {
    /// Whether a curtailment driver publishes this state.
    pub attached: bool,
    /// With `[site.lease]`: whether this instance holds the site lease.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lease: Option<LeaseView>,
    /// With `[[site.peers]]`: the other instances, as the active one last
    /// reached them (empty on a standby).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub peers: Vec<PeerView>,
    /// Parks and pins the site has in force on this instance's router (its
    /// engine's, or those the active instance pushed).
    pub parks: usize,
    /// When it was published, unix ms.
    pub updated_ms: u64,
    /// Measured mining draw, kW.
    pub site_kw: f64,
    /// The kW cap in force (DR event, dispatch, override), if any.
    pub target_kw: Option<f64>,
    /// Draw once every planned action has taken effect, kW.
    pub expected_kw: f64,
    /// Nameplate draw of the whole fleet, kW.
    pub nominal_kw: f64,
    /// Energy price now, $/MWh.
    pub price_usd_per_mwh: Option<f64>,
    /// The constraint that shapes the plan (`normal`, `price`, `dr_event`, …).
    pub mode: String,
    /// Modelled fleet hashrate (firmware telemetry), TH/s.
    pub fleet_ths: f64,
    /// Miners in the inventory.
    pub miners_total: usize,
    /// Miners curtailed now (sleeping, power-limited or parked).
    pub miners_curtailed: usize,
    /// DR events not yet ended.
    pub events: Vec<DrEventView>,
    /// Command counters.
    pub commands: CommandCounts,
    /// Signal counters.
    pub signals: SignalCounts,
    /// The curtailment driver is running (false once it has stopped, e.g.
    /// on an error: then nothing follows the grid).
    pub driver_running: bool,
    /// Ledger health.
    pub ledger: LedgerView,
    /// Manual override in force, if any (e.g. `cap 800 kW`).
    pub override_note: Option<String>,
}

/// One miner of the inventory as operators see it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct MinerView {
    /// Stratum worker name.
    pub worker: String,
    /// Model, e.g. `S19j Pro`.
    pub model: String,
    /// Firmware / control surface, e.g. `luxos`.
    pub firmware: String,
    /// `hashing`, `sleeping`, `limited 2400 W`, `parked`, `unknown`.
    pub state: String,
    /// Power draw now, W.
    pub power_w: f64,
    /// Hashrate reported by the firmware, TH/s.
    pub ths: f64,
}

/// What an operator asks of the curtailment driver.
#[derive(Debug, Clone, PartialEq)]
pub enum SiteCommand {
    /// Keep the fleet at or below this many kW.
    CapKw {
        /// kW
        kw: f64,
        /// who
        by: String,
    },
    /// Shed this many kW from the draw now (a cap at draw − kW).
    ShedKw {
        /// kW
        kw: f64,
        /// who
        by: String,
    },
    /// Curtail every miner.
    CurtailAll {
        /// who
        by: String,
    },
    /// Run every miner regardless of price and events.
    RunAll {
        /// who
        by: String,
    },
    /// Remove the manual override.
    Clear {
        /// who
        by: String,
    },
}

/// One line of the event log.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct LogEntry {
    /// Sequence number (increasing).
    pub seq: u64,
    /// When, unix ms.
    pub at_ms: u64,
    /// `operator`, `curtail`, `dr_event`, `price`, `pool`, `demo`.
    pub kind: String,
    /// What happened.
    pub message: String,
}

/// A bounded log of what happened, newest last.
#[derive(Debug)]
pub struct EventLog {
    cap: usize,
    inner: Mutex<(u64, VecDeque<LogEntry>)>,
}

impl Default for EventLog {
    fn default() -> Self {
        Self::new(1000)
    }
}

impl EventLog {
    /// A log keeping the last `cap` entries.
    pub fn new(cap: usize) -> Self {
        Self {
            cap: cap.max(1),
            inner: Mutex::new((0, VecDeque::new())),
        }
    }

    /// Append an entry.
    pub fn push(&self, kind: &str, message: impl Into<String>) {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        g.0 += 1;
        let e = LogEntry {
            seq: g.0,
            at_ms: now_ms(),
            kind: kind.to_string(),
            message: message.into(),
        };
        g.1.push_back(e);
        while g.1.len() > self.cap {
            g.1.pop_front();
        }
    }

    /// Entries after `after_seq`, at most `limit`, newest last.
    pub fn since(&self, after_seq: u64, limit: usize) -> Vec<LogEntry> {
        let g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let v: Vec<_> = g.1.iter().filter(|e| e.seq > after_seq).cloned().collect();
        let skip = v.len().saturating_sub(limit);
        v.into_iter().skip(skip).collect()
    }
}

/// The shared handle between a curtailment driver and the API.
#[derive(Debug, Default)]
pub struct SiteHandle {
    state: RwLock<Arc<SiteState>>,
    miners: RwLock<Arc<HashMap<String, MinerView>>>,
    control: Mutex<Option<mpsc::Sender<SiteCommand>>>,
    ledger: Mutex<Option<gridproxy_curtail::ledger::Location>>,
    lease: Mutex<Option<LeaseView>>,
    peers: Mutex<Vec<PeerView>>,
    /// The site's parks and pins on this instance's router.
    pub parks: Arc<super::parks::SiteParks>,
    override_note: Mutex<Option<String>>,
    /// What happened (operator actions, curtailment decisions, events).
    pub log: EventLog,
}

impl SiteHandle {
    /// A handle with nothing attached yet.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Attach a driver: it reads operator commands from the returned receiver.
    pub fn attach(&self, capacity: usize) -> mpsc::Receiver<SiteCommand> {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        *self.control.lock().unwrap_or_else(|e| e.into_inner()) = Some(tx);
        rx
    }

    /// The curtailment ledger the driver writes, for export.
    pub fn set_ledger(&self, path: gridproxy_curtail::ledger::Location) {
        *self.ledger.lock().unwrap_or_else(|e| e.into_inner()) = Some(path);
    }

    /// The ledger, if a driver registered one.
    pub fn ledger(&self) -> Option<gridproxy_curtail::ledger::Location> {
        self.ledger
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Note the manual override an operator put in force (None: cleared).
    pub fn set_override_note(&self, note: Option<String>) {
        *self.override_note.lock().unwrap_or_else(|e| e.into_inner()) = note;
    }

    /// The manual override in force, as the operator asked it.
    pub fn override_note(&self) -> Option<String> {
        self.override_note
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Publish the site state.
    pub fn publish(&self, mut s: SiteState) {
        s.attached = true;
        *self.state.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(s);
    }

    /// Publish the per-miner view (keyed by worker name).
    pub fn publish_miners(&self, m: HashMap<String, MinerView>) {
        *self.miners.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(m);
    }

    /// The latest state.
    pub fn state(&self) -> Arc<SiteState> {
        let s = self.state.read().unwrap_or_else(|e| e.into_inner()).clone();
        let lease = *self.lease.lock().unwrap_or_else(|e| e.into_inner());
        let peers = self.peers.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let parks = self.parks.len();
        if lease.is_none() && peers.is_empty() && parks == s.parks {
            return s;
        }
        let mut s = (*s).clone();
        s.lease = lease;
        s.peers = peers;
        s.parks = parks;
        Arc::new(s)
    }

    /// Say whether this instance holds the site lease (`[site.lease]`);
    /// a token held fences older pushes of parks.
    pub fn set_lease(&self, lease: LeaseView) {
        if lease.held {
            self.parks.observe_fence(lease.token);
        }
        *self.lease.lock().unwrap_or_else(|e| e.into_inner()) = Some(lease);
    }

    /// Update the view of peer `name` (added when new); `None` clears the
    /// list (the engine stopped here: a standby reaches no peer).
    pub fn set_peer(&self, view: Option<PeerView>) {
        let mut g = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        match view {
            None => g.clear(),
            Some(v) => match g.iter_mut().find(|p| p.name == v.name) {
                Some(p) => *p = v,
                None => g.push(v),
            },
        }
    }

    /// The latest per-miner view.
    pub fn miners(&self) -> Arc<HashMap<String, MinerView>> {
        self.miners
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Send an operator command to the driver. Errors when none is attached
    /// or its queue is full.
    pub fn command(&self, c: SiteCommand) -> Result<(), &'static str> {
        let tx = self
            .control
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        match tx {
            None => Err("no curtailment driver is attached to this proxy"),
            Some(tx) => tx.try_send(c).map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => "curtailment driver is busy; retry",
                mpsc::error::TrySendError::Closed(_) => "curtailment driver has stopped",
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_is_bounded_and_paged() {
        let l = EventLog::new(3);
        for i in 0..5 {
            l.push("demo", format!("e{i}"));
        }
        let all = l.since(0, 10);
        assert_eq!(all.len(), 3);
        assert_eq!(all[0].message, "e2");
        assert_eq!(l.since(4, 10).len(), 1);
        assert_eq!(l.since(0, 1)[0].message, "e4");
    }

    #[test]
    fn commands_need_a_driver() {
        let s = SiteHandle::new();
        assert!(s.command(SiteCommand::Clear { by: "t".into() }).is_err());
        let mut rx = s.attach(1);
        s.command(SiteCommand::Clear { by: "t".into() }).unwrap();
        assert!(rx.try_recv().is_ok());
    }
}
