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
//! answer comes back to the loop as an [`Ack`].
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
//! the ledger could know it. A ledger write error stops the driver (no
//! command is sent unrecorded); the fleet stays as it is.
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

use std::collections::HashSet;
use std::fmt;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use rusqlite::{Connection, OpenFlags};
use thiserror::Error;
use tokio::sync::{mpsc, oneshot, watch, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::actuator::{Actuator, ActuatorError, TelemetrySource};
use crate::command::{Ack, Action, Command, CommandId};
use crate::fleet::{ControlSurface, Fleet, MinerId, Telemetry};
use crate::ledger::{CommandRecord, Interval, Ledger, LedgerError};
use crate::policy::{Engine, Mode, PolicyConfig, PolicyError, PolicyEvent, Resume};
use crate::signal::Signal;
use crate::time::{EdgeClock, Timestamp};

// ---------------------------------------------------------------------------
// Actuator routing

/// One [`Actuator`] out of two: proxy-side actions (park, unpark, reroute)
/// go to `proxy`, firmware actions to `firmware` when it handles the
/// miner's surface; anything else is [`ActuatorError::Unsupported`].
#[derive(Clone, Debug)]
pub struct Route<F, P> {
    /// Firmware actuator (e.g. [`FleetActuator`](crate::actuators::FleetActuator)).
    pub firmware: F,
    /// Proxy actuator (park/unpark/reroute through the proxy's router).
    pub proxy: P,
}

impl<F: Actuator, P: Actuator> Actuator for Route<F, P> {
    fn handles(&self, surface: ControlSurface) -> bool {
        self.firmware.handles(surface)
    }

    async fn execute(&self, command: &Command) -> Result<(), ActuatorError> {
        if command.action.is_proxy_side() {
            self.proxy.execute(command).await
        } else if self.firmware.handles(command.surface) {
            self.firmware.execute(command).await
        } else {
            Err(unsupported(command))
        }
    }
}

/// An [`Actuator`] that can do nothing: every command is
/// [`ActuatorError::Unsupported`]. Stands in for a missing proxy (the engine
/// then reports miners it could only park as unresponsive).
#[derive(Clone, Copy, Debug, Default)]
pub struct Nothing;

impl Actuator for Nothing {
    fn handles(&self, _surface: ControlSurface) -> bool {
        false
    }

    fn execute(&self, command: &Command) -> impl Future<Output = Result<(), ActuatorError>> + Send {
        let e = unsupported(command);
        async move { Err(e) }
    }
}

fn unsupported(c: &Command) -> ActuatorError {
    ActuatorError::Unsupported {
        miner: c.miner,
        surface: c.surface,
        action: c.action.as_str(),
    }
}

/// A shared actuator (one client set serving commands and telemetry).
impl<A: Actuator> Actuator for Arc<A> {
    fn handles(&self, surface: ControlSurface) -> bool {
        (**self).handles(surface)
    }

    fn execute(&self, command: &Command) -> impl Future<Output = Result<(), ActuatorError>> + Send {
        (**self).execute(command)
    }
}

/// A shared telemetry source.
impl<T: TelemetrySource> TelemetrySource for Arc<T> {
    fn read(
        &self,
        miner: MinerId,
    ) -> impl Future<Output = Result<Telemetry, ActuatorError>> + Send {
        (**self).read(miner)
    }
}

// ---------------------------------------------------------------------------
// Configuration, status, errors

/// What the ledger writer committed; passed to a [`CommitHook`].
#[derive(Clone, Debug, PartialEq)]
pub enum Record {
    /// A signal, as received at `recorded`.
    Signal {
        /// Receive time.
        recorded: Timestamp,
        /// The signal.
        signal: Signal,
    },
    /// A batch of commands, committed before any was sent.
    Commands(Vec<Command>),
    /// An actuator's answer, received at `at`.
    Ack {
        /// Receive time.
        at: Timestamp,
        /// Command.
        id: CommandId,
        /// Answer.
        ack: Ack,
    },
    /// An engine event (decision, verification, failure, escalation, DR
    /// event state, …).
    Event(PolicyEvent),
    /// Measured fleet draw over an interval.
    Interval(Interval),
}

/// Called on the writer thread after each record is durably committed (for
/// audit trails, tests and metrics). Keep it quick: the writer waits for it.
pub type CommitHook = Arc<dyn Fn(&Record) + Send + Sync>;

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

/// What the driver talks to.
#[derive(Debug)]
pub struct Edge<A, T, C> {
    /// Carries out commands (firmware and proxy; see [`Route`]).
    pub actuator: A,
    /// Reads miners' power and hashrate.
    pub telemetry: T,
    /// The clock.
    pub clock: C,
}

/// Open (or create) the ledger at `ledger`, recover it, and start the
/// driver for `fleet` under `policy`. Must be called inside a tokio runtime.
pub async fn spawn<A, T, C>(
    ledger: impl AsRef<Path>,
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
    let path: PathBuf = ledger.as_ref().to_owned();
    let (ledger, resume) = tokio::task::spawn_blocking(move || Ledger::open_and_recover(&path))
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
    if resume != Resume::default() {
        engine.resume(now, resume)?;
    }

    let (ledger_tx, ledger_rx) = mpsc::channel::<Write>(cfg.ledger_queue.max(1));
    let hook = cfg.commit_hook.clone();
    let writer = std::thread::Builder::new()
        .name("curtail-ledger".into())
        .spawn(move || write_loop(ledger, ledger_rx, hook))
        .map_err(|e| DriverError::Task(format!("spawn ledger writer: {e}")))?;

    let shutdown = CancellationToken::new();
    let (signals_tx, signals_rx) = mpsc::channel(64);
    let (acks_tx, acks_rx) = mpsc::channel(1024);
    let (poll_tx, poll_rx) = mpsc::channel(1024);
    let status = snapshot(&engine, now, resumed);
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
    }
}

// ---------------------------------------------------------------------------
// Ledger writer

struct Write {
    record: Record,
    done: Option<oneshot::Sender<Result<(), String>>>,
}

fn write_one(ledger: &mut Ledger, r: &Record) -> Result<(), LedgerError> {
    match r {
        Record::Signal { recorded, signal } => ledger.record_signal(*recorded, signal),
        Record::Commands(cs) => ledger.record_commands(cs),
        Record::Ack { at, id, ack } => ledger.record_ack(*at, *id, ack),
        Record::Event(e) => ledger.record_policy_event(e),
        Record::Interval(i) => ledger.record_interval(i),
    }
}

/// The writer thread: one record at a time, in order; stops at the first
/// error (the driver then stops too).
fn write_loop(
    mut ledger: Ledger,
    mut rx: mpsc::Receiver<Write>,
    hook: Option<CommitHook>,
) -> Result<(), LedgerError> {
    while let Some(w) = rx.blocking_recv() {
        match write_one(&mut ledger, &w.record) {
            Ok(()) => {
                if let Some(h) = &hook {
                    h(&w.record);
                }
                if let Some(done) = w.done {
                    let _ = done.send(Ok(()));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "ledger write failed");
                if let Some(done) = w.done {
                    let _ = done.send(Err(e.to_string()));
                }
                return Err(e);
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Telemetry poller

enum PollMsg {
    Reading(MinerId, Telemetry),
    Error(MinerId, ActuatorError),
    RoundDone(Timestamp),
}

async fn poll_loop<T: TelemetrySource + 'static, C: EdgeClock>(
    miners: Vec<MinerId>,
    source: Arc<T>,
    clock: Arc<C>,
    tx: mpsc::Sender<PollMsg>,
    every: Duration,
    concurrency: usize,
    stop: CancellationToken,
) {
    loop {
        let started = clock.now();
        let mut reads = futures::stream::iter(miners.iter().copied())
            .map(|m| {
                let (source, clock) = (source.clone(), clock.clone());
                async move {
                    let at = clock.now();
                    (m, at, source.read(m).await)
                }
            })
            .buffer_unordered(concurrency);
        loop {
            let next = tokio::select! {
                _ = stop.cancelled() => return,
                n = reads.next() => n,
            };
            let Some((m, at, r)) = next else { break };
            let msg = match r {
                Ok(mut t) => {
                    t.at = at;
                    PollMsg::Reading(m, t)
                }
                Err(e) => PollMsg::Error(m, e),
            };
            if tx.send(msg).await.is_err() {
                return;
            }
        }
        if tx.send(PollMsg::RoundDone(clock.now())).await.is_err() {
            return;
        }
        let next = started + every;
        let wait = clock.real(next.saturating_since(clock.now()));
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// Measured-kW interval accumulator.
struct Meter {
    start: Timestamp,
    sum_kw: f64,
    rounds: u32,
    seen: HashSet<MinerId>,
}

impl Meter {
    fn new(start: Timestamp) -> Meter {
        Meter {
            start,
            sum_kw: 0.0,
            rounds: 0,
            seen: HashSet::new(),
        }
    }
}

// ---------------------------------------------------------------------------
// The loop

struct Run<A, C> {
    engine: Engine,
    clock: Arc<C>,
    actuator: Arc<A>,
    permits: Arc<Semaphore>,
    ledger: mpsc::Sender<Write>,
    acks_tx: mpsc::Sender<(CommandId, Ack)>,
    status: DriverStatus,
    status_tx: watch::Sender<DriverStatus>,
    /// Commands handed to actuator tasks whose answer has not come back.
    outstanding: usize,
    meter: Meter,
    cfg: DriverConfig,
}

/// Most messages handled per channel before the engine is polled again.
const BATCH: usize = 256;

impl<A: Actuator + 'static, C: EdgeClock> Run<A, C> {
    async fn run(
        mut self,
        mut signals: mpsc::Receiver<Signal>,
        mut acks: mpsc::Receiver<(CommandId, Ack)>,
        mut polls: mpsc::Receiver<PollMsg>,
        stop: CancellationToken,
        poll_stop: CancellationToken,
        writer: std::thread::JoinHandle<Result<(), LedgerError>>,
    ) -> Result<DriverReport, DriverError> {
        let r = self.main(&mut signals, &mut acks, &mut polls, &stop).await;
        poll_stop.cancel();
        let drained = match r {
            Ok(()) => self.drain(&mut acks).await,
            Err(e) => Err(e),
        };
        let status = self.status.clone();
        let unanswered = self.outstanding;
        // Closing the queue lets the writer finish what is queued and stop.
        drop(self);
        let written = tokio::task::spawn_blocking(move || writer.join())
            .await
            .map_err(|e| DriverError::Task(e.to_string()))?
            .map_err(|_| DriverError::Task("ledger writer panicked".into()))?;
        drained?;
        written.map_err(|e| DriverError::LedgerWrite(e.to_string()))?;
        Ok(DriverReport { status, unanswered })
    }

    async fn main(
        &mut self,
        signals: &mut mpsc::Receiver<Signal>,
        acks: &mut mpsc::Receiver<(CommandId, Ack)>,
        polls: &mut mpsc::Receiver<PollMsg>,
        stop: &CancellationToken,
    ) -> Result<(), DriverError> {
        let mut signals_open = true;
        loop {
            let now = self.clock.now();
            self.engine.handle_timeout(now);
            self.issue(now).await?;
            self.events().await?;
            self.publish(now);

            let sleep = self
                .engine
                .poll_timeout()
                .map(|t| self.clock.real(t.saturating_since(self.clock.now())));
            tokio::select! {
                _ = stop.cancelled() => return Ok(()),
                s = signals.recv(), if signals_open => match s {
                    Some(s) => {
                        self.on_signal(s).await?;
                        for _ in 1..BATCH {
                            match signals.try_recv() {
                                Ok(s) => self.on_signal(s).await?,
                                Err(_) => break,
                            }
                        }
                    }
                    None => signals_open = false,
                },
                Some(a) = acks.recv() => {
                    self.on_ack(a).await?;
                    for _ in 1..BATCH {
                        match acks.try_recv() {
                            Ok(a) => self.on_ack(a).await?,
                            Err(_) => break,
                        }
                    }
                }
                Some(p) = polls.recv() => {
                    self.on_poll(p).await?;
                    for _ in 1..BATCH {
                        match polls.try_recv() {
                            Ok(p) => self.on_poll(p).await?,
                            Err(_) => break,
                        }
                    }
                }
                _ = sleep_for(sleep) => {}
            }
        }
    }

    /// After shutdown: collect the answers to commands already sent.
    async fn drain(
        &mut self,
        acks: &mut mpsc::Receiver<(CommandId, Ack)>,
    ) -> Result<(), DriverError> {
        let deadline = tokio::time::Instant::now() + self.cfg.drain_timeout;
        while self.outstanding > 0 {
            match tokio::time::timeout_at(deadline, acks.recv()).await {
                Ok(Some(a)) => self.on_ack(a).await?,
                _ => break,
            }
        }
        self.events().await?;
        let now = self.clock.now();
        self.publish(now);
        Ok(())
    }

    async fn write(&self, record: Record) -> Result<(), DriverError> {
        self.ledger
            .send(Write { record, done: None })
            .await
            .map_err(|_| DriverError::LedgerClosed)
    }

    /// Drain due commands, commit them, then hand them to actuators.
    async fn issue(&mut self, now: Timestamp) -> Result<(), DriverError> {
        let cmds = self.engine.poll_actions(now);
        if cmds.is_empty() {
            return Ok(());
        }
        let (done, committed) = oneshot::channel();
        self.ledger
            .send(Write {
                record: Record::Commands(cmds.clone()),
                done: Some(done),
            })
            .await
            .map_err(|_| DriverError::LedgerClosed)?;
        committed
            .await
            .map_err(|_| DriverError::LedgerClosed)?
            .map_err(DriverError::LedgerWrite)?;
        let n = cmds.len();
        for c in cmds {
            let (actuator, permits, tx) = (
                self.actuator.clone(),
                self.permits.clone(),
                self.acks_tx.clone(),
            );
            tokio::spawn(async move {
                let ack = match permits.acquire_owned().await {
                    Ok(_permit) => Ack::from(actuator.execute(&c).await),
                    Err(_) => Ack::Failed("driver stopping".into()),
                };
                let _ = tx.send((c.id, ack)).await;
            });
        }
        self.outstanding += n;
        let at = self.clock.now();
        self.status.issued += n as u64;
        self.status.first_issue_at.get_or_insert(at);
        self.status.last_issue_at = Some(at);
        Ok(())
    }

    /// Record and count the engine's events.
    async fn events(&mut self) -> Result<(), DriverError> {
        while let Some(e) = self.engine.poll_event() {
            let s = &mut self.status;
            match &e {
                PolicyEvent::Verified { .. } => s.verified += 1,
                PolicyEvent::CommandFailed { .. } => s.failed += 1,
                PolicyEvent::Escalated {
                    miner, from, to, ..
                } => {
                    s.escalated += 1;
                    tracing::warn!(%miner, ?from, ?to, "curtailment escalated");
                }
                PolicyEvent::Unresponsive { miner, .. } => {
                    s.unresponsive += 1;
                    tracing::warn!(%miner, "miner unresponsive");
                }
                PolicyEvent::Drift { .. } => s.drift += 1,
                _ => {}
            }
            self.write(Record::Event(e)).await?;
        }
        Ok(())
    }

    fn publish(&mut self, now: Timestamp) {
        let plan = self.engine.plan();
        let s = &mut self.status;
        s.now = now;
        s.in_flight = self.engine.in_flight();
        s.mode = plan.mode;
        s.cap_kw = plan.cap_kw;
        s.expected_kw = plan.expected_kw;
        self.status_tx.send_replace(self.status.clone());
    }

    async fn on_signal(&mut self, signal: Signal) -> Result<(), DriverError> {
        let now = self.clock.now();
        self.status.signals += 1;
        self.write(Record::Signal {
            recorded: now,
            signal: signal.clone(),
        })
        .await?;
        if let Err(e) = self.engine.handle_signal(now, signal) {
            self.status.rejected_signals += 1;
            tracing::warn!(error = %e, "signal refused");
        }
        Ok(())
    }

    async fn on_ack(&mut self, (id, ack): (CommandId, Ack)) -> Result<(), DriverError> {
        let now = self.clock.now();
        self.outstanding = self.outstanding.saturating_sub(1);
        match &ack {
            Ack::Ok => self.status.acks_ok += 1,
            Ack::Failed(_) => self.status.acks_failed += 1,
        }
        self.write(Record::Ack {
            at: now,
            id,
            ack: ack.clone(),
        })
        .await?;
        match self.engine.handle_ack(now, id, ack) {
            Ok(()) | Err(PolicyError::UnknownCommand(_)) => {} // late: already timed out
            Err(e) => tracing::warn!(error = %e, "ack refused"),
        }
        Ok(())
    }

    async fn on_poll(&mut self, p: PollMsg) -> Result<(), DriverError> {
        let now = self.clock.now();
        match p {
            PollMsg::Reading(m, t) => {
                self.status.telemetry_ok += 1;
                self.meter.seen.insert(m);
                if let Err(e) = self.engine.handle_telemetry(now, m, t) {
                    tracing::warn!(miner = %m, error = %e, "telemetry refused");
                }
            }
            PollMsg::Error(m, e) => {
                self.status.telemetry_errors += 1;
                tracing::debug!(miner = %m, error = %e, "telemetry read failed");
            }
            PollMsg::RoundDone(at) => {
                let kw = self.engine.fleet().measured_kw();
                self.status.measured_kw = Some(kw);
                self.meter.sum_kw += kw;
                self.meter.rounds += 1;
                if at.saturating_since(self.meter.start) >= self.cfg.interval {
                    let m = std::mem::replace(&mut self.meter, Meter::new(at));
                    self.write(Record::Interval(Interval {
                        start: m.start,
                        end: at,
                        fleet_kw: m.sum_kw / f64::from(m.rounds.max(1)),
                        site_kw: None,
                        miners: m.seen.len() as u32,
                    }))
                    .await?;
                }
            }
        }
        Ok(())
    }
}

async fn sleep_for(d: Option<Duration>) {
    match d {
        Some(d) => tokio::time::sleep(d).await,
        None => std::future::pending().await,
    }
}

// ---------------------------------------------------------------------------
// Audit

/// One acknowledgement row of the ledger.
#[derive(Clone, Debug, PartialEq)]
pub struct AckRecord {
    /// When it was recorded.
    pub at: Timestamp,
    /// Command.
    pub command: CommandId,
    /// `ack_ok`, `ack_failed`, `verified`, `failed`, `ack_timeout`,
    /// `not_verified`.
    pub outcome: String,
    /// Detail (failure text).
    pub detail: Option<String>,
}

/// One note row (escalated, unresponsive, drift, safe_state).
#[derive(Clone, Debug, PartialEq)]
pub struct NoteRecord {
    /// When.
    pub at: Timestamp,
    /// Kind.
    pub kind: String,
    /// Miner, if any.
    pub miner: Option<MinerId>,
}

/// One DR event state row.
#[derive(Clone, Debug, PartialEq)]
pub struct EventRecord {
    /// When.
    pub at: Timestamp,
    /// Issuer's id.
    pub event_id: String,
    /// `scheduled`, `active`, `ended`.
    pub state: String,
}

/// A read-only view of a ledger file, for reports and tests: every command,
/// acknowledgement, note and DR event state, in insertion order.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Audit {
    /// Commands by id.
    pub commands: Vec<CommandRecord>,
    /// Acknowledgements and verifications.
    pub acks: Vec<AckRecord>,
    /// Notes.
    pub notes: Vec<NoteRecord>,
    /// DR event states.
    pub events: Vec<EventRecord>,
    /// Measured intervals.
    pub intervals: Vec<Interval>,
    /// Signals recorded.
    pub signals: usize,
}

impl Audit {
    /// Read the ledger at `path` (read-only; safe while a driver writes it).
    pub fn read(path: impl AsRef<Path>) -> Result<Audit, LedgerError> {
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.busy_timeout(Duration::from_secs(5))?;
        let ts = |v: i64| Timestamp::from_millis(u64::try_from(v).unwrap_or(0));
        let mut commands = Vec::new();
        let mut stmt = conn
            .prepare("SELECT id, at_ms, miner, action, value, curtail FROM commands ORDER BY id")?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, Option<i64>>(4)?,
                r.get::<_, bool>(5)?,
            ))
        })?;
        for row in rows {
            let (id, at, miner, action, value, curtail) = row?;
            let value = value.map(|v| u32::try_from(v).unwrap_or(u32::MAX));
            commands.push(CommandRecord {
                id: CommandId(id as u64),
                at: ts(at),
                miner: MinerId(miner as u64),
                action: Action::from_parts(&action, value)
                    .ok_or_else(|| LedgerError::Corrupt(format!("action {action:?}")))?,
                curtail,
            });
        }
        let mut stmt =
            conn.prepare("SELECT at_ms, command_id, outcome, detail FROM acks ORDER BY seq")?;
        let acks = stmt
            .query_map([], |r| {
                Ok(AckRecord {
                    at: ts(r.get(0)?),
                    command: CommandId(r.get::<_, i64>(1)? as u64),
                    outcome: r.get(2)?,
                    detail: r.get(3)?,
                })
            })?
            .collect::<Result<Vec<_>, _>>()?;
        let mut stmt = conn.prepare("SELECT at_ms, kind, miner FROM notes ORDER BY seq")?;
        let notes = stmt
            .query_map([], |r| {
                Ok(NoteRecord {
                    at: ts(r.get(0)?),
                    kind: r.get(1)?,
                    miner: r.get::<_, Option<i64>>(2)?.map(|m| MinerId(m as u64)),
                })
            })?
            .collect::<Result<Vec<_>, _>>()?;
        let mut stmt = conn.prepare("SELECT at_ms, event_id, state FROM events ORDER BY seq")?;
        let events = stmt
            .query_map([], |r| {
                Ok(EventRecord {
                    at: ts(r.get(0)?),
                    event_id: r.get(1)?,
                    state: r.get(2)?,
                })
            })?
            .collect::<Result<Vec<_>, _>>()?;
        let mut stmt = conn.prepare(
            "SELECT start_ms, end_ms, fleet_kw, site_kw, miners FROM intervals ORDER BY seq",
        )?;
        let intervals = stmt
            .query_map([], |r| {
                Ok(Interval {
                    start: ts(r.get(0)?),
                    end: ts(r.get(1)?),
                    fleet_kw: r.get(2)?,
                    site_kw: r.get(3)?,
                    miners: r.get(4)?,
                })
            })?
            .collect::<Result<Vec<_>, _>>()?;
        let signals: i64 = conn.query_row("SELECT COUNT(*) FROM signals", [], |r| r.get(0))?;
        Ok(Audit {
            commands,
            acks,
            notes,
            events,
            intervals,
            signals: signals as usize,
        })
    }

    /// Acknowledgement rows of `id`.
    pub fn acks_of(&self, id: CommandId) -> impl Iterator<Item = &AckRecord> {
        self.acks.iter().filter(move |a| a.command == id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::MinerSpec;
    use crate::signal::{DrEvent, DrTarget};
    use crate::time::{Clock, ScaledClock};
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Mutex;

    /// A fleet whose firmware obeys at once and reports it.
    #[derive(Clone, Default)]
    struct Stub {
        state: Arc<Mutex<std::collections::HashMap<MinerId, (f64, f64)>>>,
        calls: Arc<AtomicU64>,
    }

    impl Actuator for Stub {
        fn handles(&self, _s: ControlSurface) -> bool {
            true
        }
        fn execute(&self, c: &Command) -> impl Future<Output = Result<(), ActuatorError>> + Send {
            self.calls.fetch_add(1, Ordering::Relaxed);
            let mut st = self.state.lock().unwrap();
            let e = st.entry(c.miner).or_insert((3000.0, 100.0));
            match c.action {
                Action::Sleep => *e = (20.0, 0.0),
                Action::Wake => *e = (3000.0, 100.0),
                Action::SetPowerTarget(w) => *e = (f64::from(w), 100.0 * f64::from(w) / 3000.0),
                _ => {}
            }
            async { Ok(()) }
        }
    }

    impl TelemetrySource for Stub {
        fn read(
            &self,
            miner: MinerId,
        ) -> impl Future<Output = Result<Telemetry, ActuatorError>> + Send {
            let (w, th) = *self
                .state
                .lock()
                .unwrap()
                .get(&miner)
                .unwrap_or(&(3000.0, 100.0));
            async move {
                Ok(Telemetry {
                    at: Timestamp::ZERO,
                    power_w: w,
                    hashrate_ths: th,
                })
            }
        }
    }

    fn fleet(n: u64) -> Fleet {
        Fleet::from_specs((0..n).map(|i| {
            let mut s = MinerSpec::new(
                MinerId(i),
                "S19",
                100.0 + i as f64,
                3000.0,
                ControlSurface::BraiinsOs,
            );
            s.ramp.sleep_latency = Duration::from_secs(1);
            s.ramp.sleep_w = 20.0;
            s
        }))
        .unwrap()
    }

    fn policy() -> PolicyConfig {
        PolicyConfig {
            max_commands_per_sec: 1000,
            ..PolicyConfig::default()
        }
    }

    fn edge(stub: &Stub) -> Edge<Stub, Stub, ScaledClock> {
        Edge {
            actuator: stub.clone(),
            telemetry: stub.clone(),
            clock: ScaledClock::new(20.0),
        }
    }

    fn dir() -> PathBuf {
        static N: AtomicU64 = AtomicU64::new(0);
        let d = std::env::temp_dir().join(format!(
            "curtail-driver-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn dr_event_is_carried_out_recorded_and_survives_a_restart() {
        let d = dir();
        let path = d.join("ledger.db");
        let stub = Stub::default();
        let cfg = DriverConfig {
            poll_interval: Duration::from_secs(1),
            interval: Duration::from_secs(5),
            ..DriverConfig::default()
        };
        let h = spawn(&path, policy(), fleet(10), edge(&stub), cfg.clone())
            .await
            .unwrap();
        let now = ScaledClock::new(20.0).now();
        // 10 × 3 kW; limit 15 kW: about half sleep.
        h.send(Signal::DrEvent(DrEvent {
            id: "ev1".into(),
            target: DrTarget::LimitKw(15.0),
            start: now,
            end: None,
            issued_at: now,
        }))
        .await
        .unwrap();
        let st = h
            .wait_for(Duration::from_secs(10), |s| {
                s.issued > 0 && s.verified == s.issued && s.in_flight == 0
            })
            .await
            .expect("commands verified");
        assert!(st.issued >= 5, "{st:?}");
        let report = h.shutdown().await.unwrap();
        assert_eq!(report.unanswered, 0);
        let audit = Audit::read(&path).unwrap();
        assert_eq!(audit.commands.len() as u64, report.status.issued);
        for c in &audit.commands {
            let outcomes: Vec<_> = audit.acks_of(c.id).map(|a| a.outcome.as_str()).collect();
            assert!(outcomes.contains(&"ack_ok") && outcomes.contains(&"verified"));
        }
        assert!(audit.events.iter().any(|e| e.state == "active"));
        // Restart: the event and the curtailed miners come back; nothing is re-sent.
        let before = stub.calls.load(Ordering::Relaxed);
        let h = spawn(&path, policy(), fleet(10), edge(&stub), cfg)
            .await
            .unwrap();
        let st = h.status();
        assert_eq!(st.resumed.events, 1);
        assert_eq!(st.resumed.curtailed, audit.commands.len());
        assert_eq!(
            st.resumed.next_command_id,
            audit.commands.last().unwrap().id.0 + 1
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(stub.calls.load(Ordering::Relaxed), before);
        h.shutdown().await.unwrap();
        let _ = std::fs::remove_dir_all(d);
    }
}
