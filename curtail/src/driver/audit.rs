//! [`Audit`]: a read-only view of a ledger (commands, acks, notes, DR
//! event states, intervals) for reports and tests.

use crate::command::CommandId;
use crate::fleet::MinerId;
use crate::ledger::{command_record, interval, CommandRecord, Db, Interval, LedgerError, Location};
use crate::time::Timestamp;

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
    /// Read the ledger at `loc` (read-only; safe while a driver writes it).
    pub fn read(loc: impl Into<Location>) -> Result<Audit, LedgerError> {
        let mut db = Db::open_read_only(&loc.into())?;
        let ts = |v: i64| Timestamp::from_millis(u64::try_from(v).unwrap_or(0));
        let commands = db
            .query(
                "SELECT id, at_ms, miner, action, value, curtail, fence FROM commands ORDER BY id",
                &[],
            )?
            .iter()
            .map(command_record)
            .collect::<Result<Vec<_>, _>>()?;
        let acks = db
            .query(
                "SELECT at_ms, command_id, outcome, detail FROM acks ORDER BY seq",
                &[],
            )?
            .iter()
            .map(|r| {
                Ok(AckRecord {
                    at: ts(r.int(0)?),
                    command: CommandId(r.int(1)? as u64),
                    outcome: r.text(2)?,
                    detail: r.opt_text(3)?,
                })
            })
            .collect::<Result<Vec<_>, LedgerError>>()?;
        let notes = db
            .query("SELECT at_ms, kind, miner FROM notes ORDER BY seq", &[])?
            .iter()
            .map(|r| {
                Ok(NoteRecord {
                    at: ts(r.int(0)?),
                    kind: r.text(1)?,
                    miner: r.opt_int(2)?.map(|m| MinerId(m as u64)),
                })
            })
            .collect::<Result<Vec<_>, LedgerError>>()?;
        let events = db
            .query(
                "SELECT at_ms, event_id, state FROM events ORDER BY seq",
                &[],
            )?
            .iter()
            .map(|r| {
                Ok(EventRecord {
                    at: ts(r.int(0)?),
                    event_id: r.text(1)?,
                    state: r.text(2)?,
                })
            })
            .collect::<Result<Vec<_>, LedgerError>>()?;
        let intervals = db
            .query(
                "SELECT start_ms, end_ms, fleet_kw, site_kw, miners FROM intervals ORDER BY seq",
                &[],
            )?
            .iter()
            .map(interval)
            .collect::<Result<Vec<_>, _>>()?;
        let signals = db
            .query_one("SELECT COUNT(*) FROM signals", &[])?
            .map_or(Ok(0), |r| r.int(0))?;
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
