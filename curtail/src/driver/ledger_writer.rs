//! The ledger writer: one OS thread owning the [`Ledger`], writing records
//! in order and telling the commit hook after each. What is queued when it
//! wakes is written as one transaction (group commit: one fsync for up to
//! [`MAX_BATCH`] records), and nobody hears of a record before that commit
//! returns, so a command is still durable before it is sent and an
//! acknowledgement before it is reported.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use crate::command::{Ack, Command, CommandId};
use crate::ledger::{Interval, Ledger, LedgerError};
use crate::policy::PolicyEvent;
use crate::signal::Signal;
use crate::time::Timestamp;

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

pub(super) struct Write {
    pub(super) record: Record,
    pub(super) done: Option<oneshot::Sender<Result<(), String>>>,
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

/// What the writer tells the driver about its health: set while a write
/// keeps failing (disk full, file locked, size guard reached), cleared when
/// a write succeeds with nothing queued behind it (caught up).
#[derive(Default)]
pub(super) struct LedgerFault {
    state: std::sync::Mutex<Option<(std::time::Instant, String)>>,
    errors: std::sync::atomic::AtomicU64,
}

impl LedgerFault {
    /// Since when writes fail (real time) and the last error.
    pub(super) fn get(&self) -> Option<(std::time::Instant, String)> {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Failed write attempts so far.
    pub(super) fn errors(&self) -> u64 {
        self.errors.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn failed(&self, e: &LedgerError) {
        let n = self
            .errors
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let since = st.as_ref().map_or_else(std::time::Instant::now, |s| s.0);
        *st = Some((since, e.to_string()));
        // The first failure and then one line per power of two.
        if n.is_power_of_two() {
            tracing::error!(error = %e, attempts = n, "ledger write failed; retrying");
        }
    }

    fn ok(&self) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if st.take().is_some() {
            tracing::warn!("ledger writes succeed again");
        }
    }
}

/// Most records committed together.
pub(super) const MAX_BATCH: usize = 1024;

/// Write `batch` in order as one transaction (a lone record as itself).
fn write_batch(ledger: &mut Ledger, batch: &[Write]) -> Result<(), LedgerError> {
    if let [one] = batch {
        return write_one(ledger, &one.record);
    }
    ledger.batch(|l| batch.iter().try_for_each(|w| write_one(l, &w.record)))
}

/// Tell the hook and the waiting sender that `w` is committed.
fn committed(w: Write, hook: &Option<CommitHook>) {
    if let Some(h) = hook {
        h(&w.record);
    }
    if let Some(done) = w.done {
        let _ = done.send(Ok(()));
    }
}

/// Tell the waiting sender that `w` was refused for good (fenced: another
/// instance holds the site's lease); nothing retries it.
fn refused(w: Write, e: &LedgerError) {
    tracing::error!(error = %e, "ledger refused a record");
    if let Some(done) = w.done {
        let _ = done.send(Err(e.to_string()));
    }
}

/// Write what can be written of `batch`: whole if the store takes it;
/// otherwise (a full disk or the size guard may refuse the whole batch
/// where its first records still fit, a fenced command fails only itself)
/// one record at a time until one fails. Returns the first error to retry;
/// `batch` keeps what was not written.
fn write_some(
    ledger: &mut Ledger,
    batch: &mut std::collections::VecDeque<Write>,
    hook: &Option<CommitHook>,
) -> Result<(), LedgerError> {
    let whole = write_batch(ledger, batch.make_contiguous());
    if whole.is_ok() {
        for w in batch.drain(..) {
            committed(w, hook);
        }
        return Ok(());
    }
    if let (Err(e), 1) = (whole, batch.len()) {
        // A lone record that just failed is not written twice in a row.
        if matches!(e, LedgerError::Fenced(_)) {
            if let Some(w) = batch.pop_front() {
                refused(w, &e);
            }
            return Ok(());
        }
        return Err(e);
    }
    while let Some(w) = batch.front() {
        match write_one(ledger, &w.record) {
            Ok(()) => {
                if let Some(w) = batch.pop_front() {
                    committed(w, hook);
                }
            }
            Err(e @ LedgerError::Fenced(_)) => {
                if let Some(w) = batch.pop_front() {
                    refused(w, &e);
                }
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// First and longest wait between attempts at a failing write.
const RETRY_FIRST: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(2);
/// Once the driver has gone (its queue is closed), how long a failing
/// write is still retried before the writer gives up.
const GIVE_UP_AFTER_CLOSE: Duration = Duration::from_secs(5);

/// The writer thread: what is queued, in order, one transaction at a time.
/// A failed write is retried (with backoff) until it succeeds, so no record
/// is skipped or reordered; `fault` tells the driver meanwhile. It gives up
/// only when the driver has stopped and the write still fails.
pub(super) fn write_loop(
    mut ledger: Ledger,
    mut rx: mpsc::Receiver<Write>,
    hook: Option<CommitHook>,
    fault: Arc<LedgerFault>,
) -> Result<(), LedgerError> {
    let mut batch = std::collections::VecDeque::with_capacity(64);
    while let Some(first) = rx.blocking_recv() {
        batch.push_back(first);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(w) => batch.push_back(w),
                Err(_) => break,
            }
        }
        let mut wait = RETRY_FIRST;
        let mut closed_at: Option<std::time::Instant> = None;
        loop {
            match write_some(&mut ledger, &mut batch, &hook) {
                Ok(()) => {
                    // Healthy again once caught up: on a nearly full disk
                    // one record may fit where the next does not, and the
                    // safe state must not flap with each.
                    if rx.is_empty() {
                        fault.ok();
                    }
                    break;
                }
                Err(e) => {
                    fault.failed(&e);
                    if rx.is_closed() {
                        let t = *closed_at.get_or_insert_with(std::time::Instant::now);
                        if t.elapsed() >= GIVE_UP_AFTER_CLOSE {
                            for w in batch.drain(..) {
                                if let Some(done) = w.done {
                                    let _ = done.send(Err(e.to_string()));
                                }
                            }
                            return Err(e);
                        }
                    }
                    std::thread::sleep(wait);
                    wait = (wait * 2).min(RETRY_MAX);
                }
            }
        }
    }
    Ok(())
}
