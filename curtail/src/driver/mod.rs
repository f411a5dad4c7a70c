//! The edge task that runs the policy [`Engine`]: signals in, commands out,
//! telemetry back, everything into the ledger.
//!
//! [`spawn`] opens the ledger and recovers it ([`Ledger::open_and_recover`]),
//! builds the engine, resumes it from what the ledger held
//! ([`Engine::resume`]: command ids continue, open DR events come back,
//! miners that were curtailed stay curtailed), and starts three pieces:
//!
//! - the **driver loop** (one tokio task, owns the engine): feeds it signals
//!   from the [`DriverHandle`]'s channel, actuator acknowledgements and
//!   telemetry; drains `poll_action` (the engine rate-limits),
//!   `poll_event` (into the ledger) and sleeps until `poll_timeout`;
//! - the **telemetry poller** (one task): reads every miner through a
//!   [`TelemetrySource`] each [`DriverConfig::poll_interval`], at most
//!   [`DriverConfig::poll_concurrency`] at a time, and hands readings to the
//!   loop over a bounded channel;
//! - the **ledger writer** (one OS thread, owns the [`Ledger`]): takes
//!   records from a bounded channel in order and writes each before taking
//!   the next. A full channel makes the loop wait (back-pressure); nothing is
//!   dropped.
//!
//! Each command is executed by a short task (at most
//! [`DriverConfig::actuator_concurrency`] talk to actuators at once) whose
//! answer comes back to the loop as an [`Ack`](crate::command::Ack).
//!
//! # Durability
//!
//! Commands are **write-ahead**: a batch from `poll_action` is committed
//! (one transaction, fsynced) before any actuator sees it, so after a crash
//! the ledger holds every command that may have reached a miner, and
//! [`Ledger::recover`] knows which miners were left curtailed. Signals,
//! acknowledgements, verifications, decisions, DR event states and measured
//! intervals go through the same ordered queue, so a commit of commands
//! also means everything queued before them is on disk (in particular the
//! DR event that caused them). What a `kill -9` can lose is only what was
//! still queued: acknowledgements of commands sent in the last moments,
//! which then show in the ledger as sent and unanswered, the truth as far as
//! the ledger could know it. A failed write is retried in order; commands
//! wait for it (none is sent unrecorded) until
//! [`DriverConfig::ledger_fault_timeout`], after which the site holds
//! [`DriverConfig::on_ledger_fault`] and commands go out unrecorded, counted
//! in [`LedgerHealth`].
//!
//! # Time
//!
//! The driver reads time from an injected [`EdgeClock`]:
//! [`SystemClock`](crate::time::SystemClock) in production,
//! [`ScaledClock`](crate::time::ScaledClock) in tests and simulations that run site time
//! faster than real time (every duration in [`PolicyConfig`] and
//! [`DriverConfig`] is in clock time; the driver converts to real time only
//! to sleep). Telemetry readings are stamped with this clock when the read
//! starts, whatever the source puts in them.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;
use tokio::sync::{mpsc, watch, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::actuator::{Actuator, TelemetrySource};
use crate::fleet::{Fleet, MinerId};
use crate::ledger::{Ledger, LedgerError, Location};
use crate::policy::{DrEventState, Engine, PolicyConfig, PolicyError, Resume};
use crate::signal::Signal;
use crate::time::{EdgeClock, Timestamp};

mod audit;
mod edge;
mod intake;
mod ledger_writer;
mod poll;
mod run;
mod status;
#[cfg(test)]
mod tests;

pub use audit::{AckRecord, Audit, EventRecord, NoteRecord};
pub use edge::{Edge, Nothing, Route};
pub use ledger_writer::{CommitHook, Record};
pub use status::{
    CommandedState, DrEventStatus, DriverReport, DriverStatus, LedgerHealth, MinerStatus, Miners,
    Resumed,
};

use ledger_writer::{write_loop, Write};
use poll::{poll_loop, Meter};
use run::Run;
use status::{update_dr_events, MinersBuilder};

// ---------------------------------------------------------------------------
// Configuration, errors

/// Driver knobs. Durations are in the driver clock's time.
#[derive(Clone)]
pub struct DriverConfig {
    /// Time between the starts of two telemetry rounds over the fleet.
    pub poll_interval: Duration,
    /// Telemetry reads in flight at once.
    pub poll_concurrency: usize,
    /// Commands talking to actuators at once.
    pub actuator_concurrency: usize,
    /// Length of a measured-kW interval written to the ledger.
    pub interval: Duration,
    /// Records the ledger queue holds before the loop waits.
    pub ledger_queue: usize,
    /// At shutdown, how long to wait (real time) for acknowledgements of
    /// commands already sent.
    pub drain_timeout: Duration,
    /// Called after each committed record.
    pub commit_hook: Option<CommitHook>,
    /// How long ledger writes may keep failing (retried meanwhile; commands
    /// wait, since each is recorded before it is sent) before the site goes
    /// to [`DriverConfig::on_ledger_fault`] and commands go out unrecorded.
    pub ledger_fault_timeout: Duration,
    /// The safe state held while the ledger fails past the timeout:
    /// `CurtailAll` sleeps the fleet; `HoldLast`/`KeepRunning` keep
    /// following signals (unrecorded, counted and logged).
    pub on_ledger_fault: crate::policy::SafeState,
    /// Size guard: the ledger file may not grow past this many bytes (a
    /// write that would is a ledger fault, as a full disk is).
    pub ledger_max_bytes: Option<u64>,
    /// Record commands only under this site lease's token (instances
    /// sharing a PostgreSQL ledger): once another instance holds the lease,
    /// the next command is refused and the driver stops.
    pub fence: Option<crate::ledger::Lease>,
    /// With `fence`: the holder's own deadline, checked between a
    /// command's commit and its send. Past it the commands are not sent
    /// (each gets a failed acknowledgement saying so) and the driver stops:
    /// a pause between the two that outlasted the lease must not act.
    pub send_deadline: Option<crate::ledger::Deadline>,
}

impl Default for DriverConfig {
    fn default() -> Self {
        DriverConfig {
            poll_interval: Duration::from_secs(10),
            poll_concurrency: 64,
            actuator_concurrency: 256,
            interval: Duration::from_secs(60),
            ledger_queue: 4096,
            drain_timeout: Duration::from_secs(10),
            commit_hook: None,
            ledger_fault_timeout: Duration::from_secs(60),
            on_ledger_fault: crate::policy::SafeState::HoldLast,
            ledger_max_bytes: None,
            fence: None,
            send_deadline: None,
        }
    }
}

impl fmt::Debug for DriverConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DriverConfig")
            .field("poll_interval", &self.poll_interval)
            .field("poll_concurrency", &self.poll_concurrency)
            .field("actuator_concurrency", &self.actuator_concurrency)
            .field("interval", &self.interval)
            .field("ledger_queue", &self.ledger_queue)
            .field("drain_timeout", &self.drain_timeout)
            .field("commit_hook", &self.commit_hook.is_some())
            .finish()
    }
}

/// Driver errors.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum DriverError {
    /// Opening or recovering the ledger failed.
    #[error("ledger: {0}")]
    Ledger(#[from] LedgerError),
    /// The engine refused its configuration, fleet or resume data.
    #[error("policy: {0}")]
    Policy(#[from] PolicyError),
    /// A ledger write failed; the driver stopped so that nothing goes
    /// unrecorded.
    #[error("ledger write failed: {0}")]
    LedgerWrite(String),
    /// The ledger writer is gone (it failed earlier, or panicked).
    #[error("ledger writer stopped")]
    LedgerClosed,
    /// The driver is no longer running.
    #[error("driver stopped")]
    Stopped,
    /// The driver task panicked or was cancelled.
    #[error("driver task: {0}")]
    Task(String),
    /// The site lease's deadline passed between a commit and its send: the
    /// commands were not sent and the driver stopped.
    #[error("site lease lapsed before {0} recorded command(s) could be sent; not sent")]
    LeaseLapsed(usize),
}

// ---------------------------------------------------------------------------
// Handle

/// Control of a running driver. Dropping it stops the driver as
/// [`shutdown`](Self::shutdown) does, in the background.
#[derive(Debug)]
pub struct DriverHandle {
    signals: mpsc::Sender<Signal>,
    status: watch::Receiver<DriverStatus>,
    shutdown: CancellationToken,
    task: Option<tokio::task::JoinHandle<Result<DriverReport, DriverError>>>,
}

impl Drop for DriverHandle {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

impl DriverHandle {
    /// A sender for signals (clone it for each source).
    pub fn signals(&self) -> mpsc::Sender<Signal> {
        self.signals.clone()
    }

    /// Send one signal.
    pub async fn send(&self, signal: Signal) -> Result<(), DriverError> {
        self.signals
            .send(signal)
            .await
            .map_err(|_| DriverError::Stopped)
    }

    /// The latest status.
    pub fn status(&self) -> DriverStatus {
        self.status.borrow().clone()
    }

    /// A receiver of status snapshots.
    pub fn watch(&self) -> watch::Receiver<DriverStatus> {
        self.status.clone()
    }

    /// Wait until `f` holds for the status, or `timeout` (real time)
    /// passes; returns the status that satisfied it.
    pub async fn wait_for(
        &self,
        timeout: Duration,
        mut f: impl FnMut(&DriverStatus) -> bool,
    ) -> Option<DriverStatus> {
        let mut rx = self.status.clone();
        let r = tokio::time::timeout(timeout, rx.wait_for(|s| f(s))).await;
        match r {
            Ok(Ok(s)) => Some(s.clone()),
            _ => None,
        }
    }

    /// Whether the driver task has ended (error or shutdown).
    pub fn is_finished(&self) -> bool {
        self.task.as_ref().is_none_or(|t| t.is_finished())
    }

    /// Stop: no new commands; wait for acknowledgements of sent ones (up to
    /// [`DriverConfig::drain_timeout`]), record them, flush the ledger.
    pub async fn shutdown(self) -> Result<DriverReport, DriverError> {
        self.shutdown.cancel();
        self.join().await
    }

    /// Wait for the driver to end by itself (it does only on an error).
    pub async fn join(mut self) -> Result<DriverReport, DriverError> {
        let Some(task) = self.task.take() else {
            return Err(DriverError::Stopped);
        };
        match task.await {
            Ok(r) => r,
            Err(e) => Err(DriverError::Task(e.to_string())),
        }
    }
}

// ---------------------------------------------------------------------------
// Start

/// Open (or create) the ledger at `ledger`, recover it, and start the
/// driver for `fleet` under `policy`. Must be called inside a tokio runtime.
pub async fn spawn<A, T, C>(
    ledger: impl Into<Location>,
    policy: PolicyConfig,
    fleet: Fleet,
    edge: Edge<A, T, C>,
    cfg: DriverConfig,
) -> Result<DriverHandle, DriverError>
where
    A: Actuator + 'static,
    T: TelemetrySource + 'static,
    C: EdgeClock,
{
    let loc: Location = ledger.into();
    let (mut ledger, resume) = tokio::task::spawn_blocking(move || Ledger::open_and_recover(loc))
        .await
        .map_err(|e| DriverError::Task(e.to_string()))??;
    let clock = Arc::new(edge.clock);
    let now = clock.now();
    let miners: Vec<MinerId> = fleet.iter().map(|m| m.spec.id).collect();
    let mut engine = Engine::new(policy, fleet, now)?;
    let resumed = Resumed {
        next_command_id: resume.next_command_id,
        curtailed: resume.curtailed.len(),
        events: resume.events.len(),
    };
    // The site view starts from what the ledger held: miners left curtailed
    // keep their last command's state, open events show as scheduled until
    // the engine says otherwise.
    let mut view = MinersBuilder::new(miners.iter().copied());
    for (id, action, _) in &resume.curtailed {
        view.commanded(*id, *action);
    }
    let mut dr_events = Vec::new();
    for (ev, baseline_kw) in &resume.events {
        if ev.end.is_none_or(|end| end > now) {
            update_dr_events(
                &mut dr_events,
                DrEventStatus::new(ev, DrEventState::Scheduled, *baseline_kw),
            );
        }
    }
    if resume != Resume::default() {
        engine.resume(now, resume)?;
    }

    if let Some(max) = cfg.ledger_max_bytes {
        ledger.set_max_bytes(max)?;
    }
    if let Some(lease) = &cfg.fence {
        ledger.fence(lease)?;
    }
    let (ledger_tx, ledger_rx) = mpsc::channel::<Write>(cfg.ledger_queue.max(1));
    let hook = cfg.commit_hook.clone();
    let fault = Arc::new(ledger_writer::LedgerFault::default());
    let writer_fault = fault.clone();
    let writer = std::thread::Builder::new()
        .name("curtail-ledger".into())
        .spawn(move || write_loop(ledger, ledger_rx, hook, writer_fault))
        .map_err(|e| DriverError::Task(format!("spawn ledger writer: {e}")))?;

    let shutdown = CancellationToken::new();
    let (signals_tx, signals_rx) = mpsc::channel(64);
    let (acks_tx, acks_rx) = mpsc::channel(1024);
    let (poll_tx, poll_rx) = mpsc::channel(1024);
    let mut status = snapshot(&engine, now, resumed);
    status.miners = view.snapshot();
    status.dr_events = dr_events;
    let (status_tx, status_rx) = watch::channel(status.clone());

    let poll_stop = shutdown.child_token();
    tokio::spawn(poll_loop(
        miners,
        Arc::new(edge.telemetry),
        clock.clone(),
        poll_tx,
        cfg.poll_interval,
        cfg.poll_concurrency.max(1),
        poll_stop.clone(),
    ));

    let run = Run {
        engine,
        clock,
        actuator: Arc::new(edge.actuator),
        permits: Arc::new(Semaphore::new(cfg.actuator_concurrency.max(1))),
        ledger: ledger_tx,
        acks_tx,
        status,
        status_tx,
        outstanding: 0,
        meter: Meter::new(now),
        view,
        intake: intake::Intake::default(),
        fault,
        fault_seen: None,
        cfg,
    };
    let stop = shutdown.clone();
    let task = tokio::spawn(async move {
        let r = run
            .run(signals_rx, acks_rx, poll_rx, stop, poll_stop, writer)
            .await;
        if let Err(e) = &r {
            tracing::error!(error = %e, "curtailment driver stopped");
        }
        r
    });
    Ok(DriverHandle {
        signals: signals_tx,
        status: status_rx,
        shutdown,
        task: Some(task),
    })
}

fn snapshot(engine: &Engine, now: Timestamp, resumed: Resumed) -> DriverStatus {
    let plan = engine.plan();
    DriverStatus {
        now,
        resumed,
        signals: 0,
        rejected_signals: 0,
        duplicate_signals: 0,
        rate_limited_signals: 0,
        ledger: LedgerHealth::default(),
        issued: 0,
        acks_ok: 0,
        acks_failed: 0,
        verified: 0,
        failed: 0,
        escalated: 0,
        unresponsive: 0,
        drift: 0,
        in_flight: engine.in_flight(),
        mode: plan.mode,
        cap_kw: plan.cap_kw,
        expected_kw: plan.expected_kw,
        measured_kw: None,
        telemetry_ok: 0,
        telemetry_errors: 0,
        first_issue_at: None,
        last_issue_at: None,
        miners: Miners::default(),
        dr_events: Vec::new(),
        price_usd_per_mwh: None,
    }
}
