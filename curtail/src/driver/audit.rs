//! [`Audit`]: a read-only view of a ledger file (commands, acks, notes, DR
//! event states, intervals) for reports and tests.

use std::path::Path;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags};

use crate::command::{Action, CommandId};
use crate::fleet::MinerId;
use crate::ledger::{CommandRecord, Interval, LedgerError};
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
