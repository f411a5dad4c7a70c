//! The driver loop: one task owning the engine, feeding it signals, acks and
//! telemetry, committing commands before handing them to actuators.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::actuator::Actuator;
use crate::command::{Ack, Command, CommandId};
use crate::ledger::{Interval, LedgerError};
use crate::policy::{Engine, PolicyError, PolicyEvent};
use crate::signal::Signal;
use crate::time::{EdgeClock, Timestamp};

use super::ledger_writer::Write;
use super::poll::{Meter, PollMsg};
use super::status::{update_dr_events, DrEventStatus, MinersBuilder};
use super::{DriverConfig, DriverError, DriverReport, DriverStatus, Record};

pub(super) struct Run<A, C> {
    pub(super) engine: Engine,
    pub(super) clock: Arc<C>,
    pub(super) actuator: Arc<A>,
    pub(super) permits: Arc<Semaphore>,
    pub(super) ledger: mpsc::Sender<Write>,
    pub(super) acks_tx: mpsc::Sender<(CommandId, Ack)>,
    pub(super) status: DriverStatus,
    pub(super) status_tx: watch::Sender<DriverStatus>,
    /// Commands handed to actuator tasks whose answer has not come back.
    pub(super) outstanding: usize,
    pub(super) meter: Meter,
    /// Per-miner side of the published status.
    pub(super) view: MinersBuilder,
    /// Checks, de-duplicates and rate-limits signals before the ledger.
    pub(super) intake: super::intake::Intake,
    /// Set by the ledger writer while writes fail.
    pub(super) fault: Arc<super::ledger_writer::LedgerFault>,
    /// When the loop first saw the current ledger failure (its clock).
    pub(super) fault_seen: Option<Timestamp>,
    pub(super) cfg: DriverConfig,
}

/// Most messages handled per channel before the engine is polled again.
const BATCH: usize = 256;

impl<A: Actuator + 'static, C: EdgeClock> Run<A, C> {
    pub(super) async fn run(
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
            self.check_ledger(now);
            self.engine.handle_timeout(now);
            self.issue(now).await?;
            self.events().await?;
            self.publish(now);

            let mut sleep = self
                .engine
                .poll_timeout()
                .map(|t| self.clock.real(t.saturating_since(self.clock.now())));
            if self.status.ledger.error.is_some() {
                // Watch the fault's clock (and its recovery) every second.
                let tick = self.clock.real(Duration::from_secs(1));
                sleep = Some(sleep.map_or(tick, |s| s.min(tick)));
            }
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

    /// Follow the ledger writer's health: publish it, and once writes have
    /// failed for [`DriverConfig::ledger_fault_timeout`] put the engine in
    /// its ledger-fault safe state (lifted when a write succeeds again).
    fn check_ledger(&mut self, now: Timestamp) {
        let l = &mut self.status.ledger;
        l.write_errors = self.fault.errors();
        match self.fault.get() {
            Some((_, error)) => {
                let since = *self.fault_seen.get_or_insert(now);
                l.error = Some(error);
                l.failing_since = Some(since);
                if !l.fault_engaged && now.saturating_since(since) >= self.cfg.ledger_fault_timeout
                {
                    l.fault_engaged = true;
                    tracing::error!(
                        safe_state = ?self.cfg.on_ledger_fault,
                        "ledger failing for {:?}: site in its ledger-fault safe state, commands go out unrecorded",
                        self.cfg.ledger_fault_timeout
                    );
                    self.engine.set_ledger_fault(Some(self.cfg.on_ledger_fault));
                }
            }
            None => {
                if l.fault_engaged {
                    tracing::warn!("ledger writes again: ledger-fault safe state lifted");
                    self.engine.set_ledger_fault(None);
                }
                self.fault_seen = None;
                l.error = None;
                l.failing_since = None;
                l.fault_engaged = false;
            }
        }
    }

    /// Queue a record. While the ledger fails, a full queue drops the
    /// record (counted) instead of stalling the loop: the engine must keep
    /// hearing signals and answering DR events.
    async fn write(&mut self, record: Record) -> Result<(), DriverError> {
        let w = Write { record, done: None };
        if self.fault.get().is_none() {
            return self
                .ledger
                .send(w)
                .await
                .map_err(|_| DriverError::LedgerClosed);
        }
        match self.ledger.try_send(w) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.status.ledger.dropped += 1;
                if self.status.ledger.dropped.is_power_of_two() {
                    tracing::error!(
                        dropped = self.status.ledger.dropped,
                        "ledger failing and its queue full: record dropped"
                    );
                }
                Ok(())
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Err(DriverError::LedgerClosed),
        }
    }

    /// Count and log `cmds` as going out before they were recorded.
    fn sent_unrecorded(&mut self, cmds: &[Command]) {
        self.status.ledger.unrecorded_commands += cmds.len() as u64;
        tracing::error!(
            commands = cmds.len(),
            first = ?cmds.first().map(|c| c.id),
            "ledger failing: commands sent before they were recorded"
        );
    }

    /// Record `cmds` and wait until they are durable. While the ledger
    /// fails the wait goes on (the writer retries) until the fault timeout;
    /// then the commands go out anyway, counted as unrecorded.
    async fn commit(&mut self, cmds: &[Command]) -> Result<(), DriverError> {
        let (done, mut committed) = oneshot::channel();
        self.ledger
            .send(Write {
                record: Record::Commands(cmds.to_vec()),
                done: Some(done),
            })
            .await
            .map_err(|_| DriverError::LedgerClosed)?;
        loop {
            let tick = self.clock.real(Duration::from_secs(1));
            tokio::select! {
                r = &mut committed => {
                    return r
                        .map_err(|_| DriverError::LedgerClosed)?
                        .map_err(DriverError::LedgerWrite);
                }
                _ = tokio::time::sleep(tick) => {
                    let now = self.clock.now();
                    self.check_ledger(now);
                    self.publish(now);
                    if self.status.ledger.fault_engaged {
                        self.sent_unrecorded(cmds);
                        return Ok(());
                    }
                }
            }
        }
    }

    /// Drain due commands, commit them, then hand them to actuators.
    async fn issue(&mut self, now: Timestamp) -> Result<(), DriverError> {
        let cmds = self.engine.poll_actions(now);
        if cmds.is_empty() {
            return Ok(());
        }
        let n = cmds.len();
        if self.status.ledger.fault_engaged {
            // The ledger has failed past its timeout: queue the record if
            // there is room, and act without waiting for it.
            self.write(Record::Commands(cmds.clone())).await?;
            self.sent_unrecorded(&cmds);
        } else {
            self.commit(&cmds).await?;
        }
        if self.cfg.send_deadline.as_ref().is_some_and(|d| d.passed()) {
            // Recorded under a lease that may be another instance's by now
            // (this process was paused, or renewals failed): send nothing,
            // and say so in the ledger.
            let at = self.clock.now();
            for c in &cmds {
                self.write(Record::Ack {
                    at,
                    id: c.id,
                    ack: Ack::Failed(
                        "not sent: the site lease lapsed between record and send".into(),
                    ),
                })
                .await?;
            }
            return Err(DriverError::LeaseLapsed(n));
        }
        for c in &cmds {
            self.view.commanded(c.miner, c.action);
        }
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
                PolicyEvent::DrEvent {
                    event,
                    state,
                    baseline_kw,
                    ..
                } => update_dr_events(
                    &mut s.dr_events,
                    DrEventStatus::new(event, *state, *baseline_kw),
                ),
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
        s.miners = self.view.snapshot();
        self.status_tx.send_replace(self.status.clone());
    }

    async fn on_signal(&mut self, signal: Signal) -> Result<(), DriverError> {
        use super::intake::Verdict;
        let now = self.clock.now();
        self.status.signals += 1;
        // Refused, repeated or flooding signals never reach the ledger:
        // each record is an fsync, and a flood would fill the disk.
        if let Err(e) = self.engine.admit(now, &signal) {
            self.status.rejected_signals += 1;
            // One line per power of two: a flood does not flood the log.
            if self.status.rejected_signals.is_power_of_two() {
                tracing::warn!(error = %e, refused = self.status.rejected_signals, "signal refused");
            }
            return Ok(());
        }
        match self.intake.admit(now, &signal) {
            Verdict::Accept => {}
            Verdict::Duplicate => {
                self.status.duplicate_signals += 1;
                return Ok(());
            }
            Verdict::RateLimited => {
                self.status.rate_limited_signals += 1;
                if self.status.rate_limited_signals.is_power_of_two() {
                    tracing::warn!(
                        kind = signal.kind().as_str(),
                        dropped = self.status.rate_limited_signals,
                        "signals over the rate limit dropped"
                    );
                }
                return Ok(());
            }
        }
        if let Signal::Price(p) = &signal {
            let usd = p.usd_per_mwh;
            self.status.price_usd_per_mwh = usd.is_finite().then_some(usd);
        }
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
                self.view.telemetry(m, t);
                if let Err(e) = self.engine.handle_telemetry(now, m, t) {
                    tracing::warn!(miner = %m, error = %e, "telemetry refused");
                }
            }
            PollMsg::Error(m, e) => {
                self.status.telemetry_errors += 1;
                tracing::debug!(miner = %m, error = %e, "telemetry read failed");
                if let Err(e) = self.engine.handle_telemetry_error(now, m) {
                    tracing::warn!(miner = %m, error = %e, "telemetry error refused");
                }
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
