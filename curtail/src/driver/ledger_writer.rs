//! The ledger writer: one OS thread owning the [`Ledger`], writing records
//! in order and telling the commit hook after each.

use std::sync::Arc;

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

/// The writer thread: one record at a time, in order; stops at the first
/// error (the driver then stops too).
pub(super) fn write_loop(
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
