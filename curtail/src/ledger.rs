//! The append-only event ledger (SQLite).
//!
//! One file records every signal received, every decision, every command
//! issued and its acknowledgement and verification, measured kW per interval,
//! and the life cycle of DR events: the settlement-grade record utilities and
//! aggregators ask for.
//!
//! - **Insert-only.** The API has no update or delete, and triggers abort any
//!   `UPDATE` or `DELETE` on the tables (an event's end is a new row).
//! - **Durability.** WAL journal with `synchronous=FULL`: every committed
//!   transaction is fsynced before the call returns, so a record reported as
//!   committed survives a power cut, not only a process crash (`NORMAL` in
//!   WAL mode survives `kill -9` but may lose the last commits on power
//!   loss). Writes are few (commands are rate-limited, telemetry is summed
//!   into intervals), so the fsync per commit is affordable; bursts go in one
//!   transaction with [`Ledger::record_commands`].
//! - **Recovery.** [`Ledger::recover`] rebuilds what a restarted engine needs
//!   ([`Resume`]): the next command id, DR events not ended, and the miners
//!   whose last command curtailed them, so a restart does not wake them.
//!
//! The ledger is synchronous (rusqlite). The async edge owns it on one
//! blocking thread (`spawn_blocking` or a dedicated thread fed by a bounded
//! channel); `Connection` is `Send` but not `Sync`.

use std::path::Path;

use rusqlite::{params, Connection, OptionalExtension};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::command::{Ack, Action, Command, CommandId};
use crate::fleet::MinerId;
use crate::policy::{Decision, DrEventState, FailReason, PolicyEvent, Resume};
use crate::signal::{DrEvent, DrTarget, Signal};
use crate::time::Timestamp;

/// Schema version stored in `PRAGMA user_version`.
pub const SCHEMA_VERSION: i64 = 1;

const TABLES: [&str; 7] = [
    "signals",
    "decisions",
    "commands",
    "acks",
    "intervals",
    "events",
    "notes",
];

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS signals (
    seq INTEGER PRIMARY KEY,
    recorded_ms INTEGER NOT NULL,
    at_ms INTEGER NOT NULL,
    kind TEXT NOT NULL,
    value REAL,
    body TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS decisions (
    seq INTEGER PRIMARY KEY,
    at_ms INTEGER NOT NULL,
    mode TEXT NOT NULL,
    cap_kw REAL,
    expected_kw REAL NOT NULL,
    changes INTEGER NOT NULL,
    reason TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS commands (
    id INTEGER PRIMARY KEY,
    at_ms INTEGER NOT NULL,
    miner INTEGER NOT NULL,
    surface TEXT NOT NULL,
    action TEXT NOT NULL,
    value INTEGER,
    curtail INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS commands_by_miner ON commands(miner, id);
CREATE TABLE IF NOT EXISTS acks (
    seq INTEGER PRIMARY KEY,
    at_ms INTEGER NOT NULL,
    command_id INTEGER NOT NULL,
    outcome TEXT NOT NULL,
    detail TEXT
);
CREATE INDEX IF NOT EXISTS acks_by_command ON acks(command_id);
CREATE TABLE IF NOT EXISTS intervals (
    seq INTEGER PRIMARY KEY,
    start_ms INTEGER NOT NULL,
    end_ms INTEGER NOT NULL,
    fleet_kw REAL NOT NULL,
    site_kw REAL,
    miners INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY,
    at_ms INTEGER NOT NULL,
    event_id TEXT NOT NULL,
    state TEXT NOT NULL,
    target_kind TEXT NOT NULL,
    target_kw REAL NOT NULL,
    start_ms INTEGER NOT NULL,
    end_ms INTEGER,
    baseline_kw REAL NOT NULL,
    body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_by_id ON events(event_id, seq);
CREATE TABLE IF NOT EXISTS notes (
    seq INTEGER PRIMARY KEY,
    at_ms INTEGER NOT NULL,
    kind TEXT NOT NULL,
    miner INTEGER,
    body TEXT NOT NULL
);
";

/// Ledger errors.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum LedgerError {
    /// SQLite failed (I/O, full disk, constraint such as a duplicate command
    /// id, or an attempted update/delete).
    #[error("ledger sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// A JSON body could not be written or read.
    #[error("ledger json: {0}")]
    Json(#[from] serde_json::Error),
    /// The file was written by a newer schema.
    #[error("ledger schema version {found} is newer than {SCHEMA_VERSION}")]
    SchemaVersion {
        /// Version found in the file.
        found: i64,
    },
    /// A stored row does not parse.
    #[error("ledger row corrupt: {0}")]
    Corrupt(String),
}

/// Measured draw over one interval (for M&V).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Interval {
    /// Interval start.
    pub start: Timestamp,
    /// Interval end.
    pub end: Timestamp,
    /// Mean fleet draw, kW.
    pub fleet_kw: f64,
    /// Mean site draw (fleet + other load), kW, if metered.
    pub site_kw: Option<f64>,
    /// Miners that reported telemetry in the interval.
    pub miners: u32,
}

/// A command as stored.
#[derive(Clone, Debug, PartialEq)]
pub struct CommandRecord {
    /// Id.
    pub id: CommandId,
    /// Issue time.
    pub at: Timestamp,
    /// Miner.
    pub miner: MinerId,
    /// Action.
    pub action: Action,
    /// Whether it left the miner curtailed.
    pub curtail: bool,
}

/// The append-only ledger.
#[derive(Debug)]
pub struct Ledger {
    conn: Connection,
}

fn ms(t: Timestamp) -> i64 {
    i64::try_from(t.as_millis()).unwrap_or(i64::MAX)
}

fn ts(v: i64) -> Timestamp {
    Timestamp::from_millis(u64::try_from(v).unwrap_or(0))
}

fn miner_i64(m: MinerId) -> i64 {
    // Stored as the same 64 bits; SQLite integers are signed.
    m.0 as i64
}

impl Ledger {
    /// Open (creating if needed) the ledger at `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<Ledger, LedgerError> {
        Ledger::init(Connection::open(path)?)
    }

    /// Open the ledger at `path` and recover the engine's [`Resume`] from it
    /// in one step (what a daemon does at start-up, before
    /// [`Engine::resume`](crate::policy::Engine::resume)).
    pub fn open_and_recover(path: impl AsRef<Path>) -> Result<(Ledger, Resume), LedgerError> {
        let l = Ledger::open(path)?;
        let r = l.recover()?;
        Ok((l, r))
    }

    /// Size guard: writes that would grow the file past `bytes` fail
    /// ("database or disk is full", as on a full disk) instead of filling
    /// the disk. Never below what the file already holds.
    pub fn set_max_bytes(&self, bytes: u64) -> Result<(), LedgerError> {
        let page: i64 = self.conn.query_row("PRAGMA page_size", [], |r| r.get(0))?;
        let pages = i64::try_from(bytes).unwrap_or(i64::MAX) / page.max(1);
        // SQLite keeps the larger of this and the current page count.
        let _set: i64 = self.conn.query_row(
            &format!("PRAGMA max_page_count={}", pages.max(1)),
            [],
            |r| r.get(0),
        )?;
        Ok(())
    }

    /// An in-memory ledger (tests, backtests).
    pub fn open_in_memory() -> Result<Ledger, LedgerError> {
        Ledger::init(Connection::open_in_memory()?)
    }

    fn init(conn: Connection) -> Result<Ledger, LedgerError> {
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        // journal_mode returns a row; an in-memory db answers "memory".
        let _mode: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))?;
        conn.execute_batch("PRAGMA synchronous=FULL;")?;
        let found: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        if found > SCHEMA_VERSION {
            return Err(LedgerError::SchemaVersion { found });
        }
        let mut sql = String::from("BEGIN;");
        sql.push_str(SCHEMA);
        for t in TABLES {
            for op in ["UPDATE", "DELETE"] {
                sql.push_str(&format!(
                    "CREATE TRIGGER IF NOT EXISTS {t}_no_{op} BEFORE {op} ON {t} \
                     BEGIN SELECT RAISE(ABORT, 'ledger is append-only'); END;\n",
                    op = op.to_lowercase(),
                    t = t
                ));
            }
        }
        sql.push_str(&format!("PRAGMA user_version={SCHEMA_VERSION}; COMMIT;"));
        conn.execute_batch(&sql)?;
        Ok(Ledger { conn })
    }

    /// Record a signal as received at `recorded`.
    pub fn record_signal(&self, recorded: Timestamp, signal: &Signal) -> Result<(), LedgerError> {
        let value = match signal {
            Signal::Price(p) => Some(p.usd_per_mwh),
            Signal::Hashprice(h) => Some(h.usd_per_ph_day),
            Signal::Dispatch(d) => d.target_kw,
            Signal::SiteLoad(s) => Some(s.external_kw),
            Signal::DrEvent(e) => Some(match e.target {
                DrTarget::LimitKw(k) | DrTarget::ShedKw(k) => k,
            }),
            _ => None,
        };
        self.conn.execute(
            "INSERT INTO signals (recorded_ms, at_ms, kind, value, body) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![
                ms(recorded),
                ms(signal.at()),
                signal.kind().as_str(),
                value,
                serde_json::to_string(signal)?
            ],
        )?;
        Ok(())
    }

    /// Record a decision.
    pub fn record_decision(&self, d: &Decision) -> Result<(), LedgerError> {
        self.conn.execute(
            "INSERT INTO decisions (at_ms, mode, cap_kw, expected_kw, changes, reason) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                ms(d.at),
                d.mode.as_str(),
                d.cap_kw,
                d.expected_kw,
                i64::try_from(d.changes).unwrap_or(i64::MAX),
                d.reason
            ],
        )?;
        Ok(())
    }

    fn insert_command(conn: &Connection, c: &Command) -> Result<(), LedgerError> {
        conn.prepare_cached(
            "INSERT INTO commands (id, at_ms, miner, surface, action, value, curtail) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        )?
        .execute(params![
            i64::try_from(c.id.0).map_err(|_| LedgerError::Corrupt("command id".into()))?,
            ms(c.issued_at),
            miner_i64(c.miner),
            c.surface.as_str(),
            c.action.as_str(),
            c.action.value(),
            c.curtail
        ])?;
        Ok(())
    }

    /// Record one issued command (before sending it).
    pub fn record_command(&self, c: &Command) -> Result<(), LedgerError> {
        Ledger::insert_command(&self.conn, c)
    }

    /// Record a burst of commands in one transaction: all or none.
    pub fn record_commands(&mut self, cs: &[Command]) -> Result<(), LedgerError> {
        let tx = self.conn.transaction()?;
        for c in cs {
            Ledger::insert_command(&tx, c)?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Record an actuator's acknowledgement.
    pub fn record_ack(&self, at: Timestamp, id: CommandId, ack: &Ack) -> Result<(), LedgerError> {
        let (outcome, detail) = match ack {
            Ack::Ok => ("ack_ok", None),
            Ack::Failed(d) => ("ack_failed", Some(d.as_str())),
        };
        self.insert_ack(at, id, outcome, detail)
    }

    fn insert_ack(
        &self,
        at: Timestamp,
        id: CommandId,
        outcome: &str,
        detail: Option<&str>,
    ) -> Result<(), LedgerError> {
        self.conn
            .prepare_cached(
                "INSERT INTO acks (at_ms, command_id, outcome, detail) VALUES (?1, ?2, ?3, ?4)",
            )?
            .execute(params![ms(at), id.0 as i64, outcome, detail])?;
        Ok(())
    }

    /// Record measured draw over an interval.
    pub fn record_interval(&self, i: &Interval) -> Result<(), LedgerError> {
        self.conn.execute(
            "INSERT INTO intervals (start_ms, end_ms, fleet_kw, site_kw, miners) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![ms(i.start), ms(i.end), i.fleet_kw, i.site_kw, i.miners],
        )?;
        Ok(())
    }

    /// Record a DR event state change.
    pub fn record_event(
        &self,
        at: Timestamp,
        ev: &DrEvent,
        state: DrEventState,
        baseline_kw: f64,
    ) -> Result<(), LedgerError> {
        let (kind, kw) = match ev.target {
            DrTarget::LimitKw(k) => ("limit", k),
            DrTarget::ShedKw(k) => ("shed", k),
        };
        self.conn.execute(
            "INSERT INTO events (at_ms, event_id, state, target_kind, target_kw, start_ms, end_ms, baseline_kw, body) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            params![
                ms(at),
                ev.id,
                state.as_str(),
                kind,
                kw,
                ms(ev.start),
                ev.end.map(ms),
                baseline_kw,
                serde_json::to_string(ev)?
            ],
        )?;
        Ok(())
    }

    /// Record anything [`Engine::poll_event`](crate::policy::Engine::poll_event)
    /// returned, each in the table it belongs to.
    pub fn record_policy_event(&self, e: &PolicyEvent) -> Result<(), LedgerError> {
        match e {
            PolicyEvent::Decision(d) => self.record_decision(d),
            PolicyEvent::Verified { command, at, .. } => {
                self.insert_ack(*at, *command, "verified", None)
            }
            PolicyEvent::CommandFailed {
                command,
                at,
                reason,
                ..
            } => {
                let (outcome, detail) = match reason {
                    FailReason::Rejected(d) => ("failed", Some(d.as_str())),
                    FailReason::AckTimeout => ("ack_timeout", None),
                    FailReason::NotVerified => ("not_verified", None),
                };
                self.insert_ack(*at, *command, outcome, detail)
            }
            PolicyEvent::DrEvent {
                at,
                event,
                state,
                baseline_kw,
            } => self.record_event(*at, event, *state, *baseline_kw),
            PolicyEvent::Escalated { miner, at, .. } => {
                self.note(*at, "escalated", Some(*miner), e)
            }
            PolicyEvent::Unresponsive { miner, at } => {
                self.note(*at, "unresponsive", Some(*miner), e)
            }
            PolicyEvent::Drift { miner, at } => self.note(*at, "drift", Some(*miner), e),
            PolicyEvent::SafeState { at, .. } => self.note(*at, "safe_state", None, e),
        }
    }

    fn note(
        &self,
        at: Timestamp,
        kind: &str,
        miner: Option<MinerId>,
        e: &PolicyEvent,
    ) -> Result<(), LedgerError> {
        self.conn.execute(
            "INSERT INTO notes (at_ms, kind, miner, body) VALUES (?1, ?2, ?3, ?4)",
            params![
                ms(at),
                kind,
                miner.map(miner_i64),
                serde_json::to_string(e)?
            ],
        )?;
        Ok(())
    }

    /// Rebuild what a restarted engine needs. Pass the result to
    /// [`Engine::resume`](crate::policy::Engine::resume).
    pub fn recover(&self) -> Result<Resume, LedgerError> {
        let max_id: Option<i64> = self
            .conn
            .query_row("SELECT MAX(id) FROM commands", [], |r| r.get(0))?;
        let next_command_id = max_id.map_or(1, |m| m as u64 + 1);

        let mut curtailed = Vec::new();
        let mut stmt = self.conn.prepare(
            "SELECT c.miner, c.action, c.value, c.at_ms FROM commands c \
             JOIN (SELECT miner, MAX(id) AS id FROM commands GROUP BY miner) last ON c.id = last.id \
             WHERE c.curtail = 1 AND c.action IN ('sleep', 'park', 'set_power_target') \
             ORDER BY c.miner",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, Option<i64>>(2)?,
                r.get::<_, i64>(3)?,
            ))
        })?;
        for row in rows {
            let (miner, action, value, at) = row?;
            let value = value.map(|v| u32::try_from(v).unwrap_or(u32::MAX));
            let action = Action::from_parts(&action, value)
                .ok_or_else(|| LedgerError::Corrupt(format!("action {action:?}")))?;
            curtailed.push((MinerId(miner as u64), action, ts(at)));
        }

        let mut events = Vec::new();
        let mut stmt = self.conn.prepare(
            "SELECT e.body, e.baseline_kw, e.state FROM events e \
             JOIN (SELECT event_id, MAX(seq) AS seq FROM events GROUP BY event_id) last ON e.seq = last.seq \
             ORDER BY e.seq",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, f64>(1)?,
                r.get::<_, String>(2)?,
            ))
        })?;
        for row in rows {
            let (body, baseline, state) = row?;
            if state == DrEventState::Ended.as_str() {
                continue;
            }
            events.push((serde_json::from_str::<DrEvent>(&body)?, baseline));
        }
        Ok(Resume {
            next_command_id,
            curtailed,
            events,
        })
    }

    /// A stored command.
    pub fn command(&self, id: CommandId) -> Result<Option<CommandRecord>, LedgerError> {
        let row = self
            .conn
            .query_row(
                "SELECT id, at_ms, miner, action, value, curtail FROM commands WHERE id = ?1",
                [id.0 as i64],
                |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        r.get::<_, i64>(1)?,
                        r.get::<_, i64>(2)?,
                        r.get::<_, String>(3)?,
                        r.get::<_, Option<i64>>(4)?,
                        r.get::<_, bool>(5)?,
                    ))
                },
            )
            .optional()?;
        row.map(|(id, at, miner, action, value, curtail)| {
            let value = value.map(|v| u32::try_from(v).unwrap_or(u32::MAX));
            Ok(CommandRecord {
                id: CommandId(id as u64),
                at: ts(at),
                miner: MinerId(miner as u64),
                action: Action::from_parts(&action, value)
                    .ok_or_else(|| LedgerError::Corrupt(format!("action {action:?}")))?,
                curtail,
            })
        })
        .transpose()
    }

    /// Intervals overlapping `[from, to)`, in order.
    pub fn intervals(&self, from: Timestamp, to: Timestamp) -> Result<Vec<Interval>, LedgerError> {
        let mut stmt = self.conn.prepare(
            "SELECT start_ms, end_ms, fleet_kw, site_kw, miners FROM intervals \
             WHERE end_ms > ?1 AND start_ms < ?2 ORDER BY start_ms, seq",
        )?;
        let rows = stmt.query_map([ms(from), ms(to)], |r| {
            Ok(Interval {
                start: ts(r.get(0)?),
                end: ts(r.get(1)?),
                fleet_kw: r.get(2)?,
                site_kw: r.get(3)?,
                miners: r.get(4)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Rows in each table, by name (for reports and tests).
    pub fn counts(&self) -> Result<Vec<(&'static str, u64)>, LedgerError> {
        TABLES
            .iter()
            .map(|t| {
                let n: i64 =
                    self.conn
                        .query_row(&format!("SELECT COUNT(*) FROM {t}"), [], |r| r.get(0))?;
                Ok((*t, n as u64))
            })
            .collect()
    }

    /// Run SQLite's integrity check; `Ok(())` if the file is sound.
    pub fn integrity_check(&self) -> Result<(), LedgerError> {
        let res: String = self
            .conn
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))?;
        if res == "ok" {
            Ok(())
        } else {
            Err(LedgerError::Corrupt(res))
        }
    }
}

mod query;
pub use query::read_mv_input;

#[cfg(test)]
mod tests;
