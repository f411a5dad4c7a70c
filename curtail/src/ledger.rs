//! The append-only event ledger (SQLite, or PostgreSQL for a site of
//! several instances: [`Location`]).
//!
//! One store records every signal received, every decision, every command
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
//! - **Group commit.** [`Ledger::batch`] writes many records as one
//!   transaction: one fsync for all, and none of them durable before it
//!   returns (the driver's writer commits what is queued this way).
//! - **PostgreSQL.** The same tables, statements and guarantees (a commit
//!   returns once the server has made it durable, with the server's default
//!   `synchronous_commit = on`); triggers refuse `UPDATE`, `DELETE` and
//!   `TRUNCATE`. One database per site. The size guard is SQLite's only.
//!
//! The ledger is synchronous (rusqlite; sqlx on its own small runtime for
//! PostgreSQL). The async edge owns it on one blocking thread
//! (`spawn_blocking` or a dedicated thread fed by a bounded channel).

use std::path::Path;

use rusqlite::Connection;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::command::{Ack, Action, Command, CommandId};
use crate::fleet::MinerId;
use crate::policy::{Decision, DrEventState, FailReason, PolicyEvent, Resume};
use crate::signal::{DrEvent, DrTarget, Signal};
use crate::time::Timestamp;

/// Schema version stored in `PRAGMA user_version`.
/// 2: `commands.fence`, the lease token a command was issued under.
pub const SCHEMA_VERSION: i64 = 2;

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
    curtail INTEGER NOT NULL,
    fence INTEGER
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
    /// PostgreSQL failed (connection, constraint, an attempted
    /// update/delete).
    #[error("ledger postgres: {0}")]
    Postgres(String),
    /// The ledger's location is not usable as given.
    #[error("ledger: {0}")]
    Config(String),
    /// A command was refused because its lease token is no longer the
    /// site's (another instance took over): not a fault to retry.
    #[error("ledger: fenced: {0}")]
    Fenced(String),
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
    /// The lease token it was issued under (a site of several instances).
    pub fence: Option<u64>,
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
    db: Db,
    /// Commands are recorded only while this lease token is the site's.
    fence: Option<lease::Fence>,
    /// Where it was opened (to reopen a connection left in a broken state).
    loc: Option<Location>,
    max_bytes: Option<u64>,
}

fn ms(t: Timestamp) -> i64 {
    i64::try_from(t.as_millis()).unwrap_or(i64::MAX)
}

fn ts(v: i64) -> Timestamp {
    Timestamp::from_millis(u64::try_from(v).unwrap_or(0))
}

fn miner_i64(m: MinerId) -> i64 {
    // Stored as the same 64 bits; both stores' integers are signed.
    m.0 as i64
}

fn int(v: i64) -> Val<'static> {
    Val::Int(Some(v))
}

fn text(v: &str) -> Val<'_> {
    Val::Text(Some(v))
}

/// The schema for PostgreSQL: the same tables, 64-bit integers, doubles,
/// identity sequence numbers.
fn pg_schema() -> String {
    SCHEMA
        .replace(
            "seq INTEGER PRIMARY KEY",
            "seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY",
        )
        .replace("INTEGER", "BIGINT")
        .replace("REAL", "DOUBLE PRECISION")
}

/// Any constant: two instances opening one database at once take turns.
const PG_INIT_LOCK: i64 = 0x6772_6964_6c65_6467;

impl Ledger {
    /// Open (creating if needed) the SQLite ledger at `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<Ledger, LedgerError> {
        Ledger::connect(&Location::Sqlite(path.as_ref().to_owned()))
    }

    /// Open (creating the tables if needed) the ledger at `loc`.
    pub fn connect(loc: &Location) -> Result<Ledger, LedgerError> {
        let db = Db::open(loc)?;
        let mut l = Ledger {
            db,
            fence: None,
            loc: Some(loc.clone()),
            max_bytes: None,
        };
        l.init()?;
        Ok(l)
    }

    /// Open the ledger at `loc` and recover the engine's [`Resume`] from it
    /// in one step (what a daemon does at start-up, before
    /// [`Engine::resume`](crate::policy::Engine::resume)).
    pub fn open_and_recover(loc: impl Into<Location>) -> Result<(Ledger, Resume), LedgerError> {
        let mut l = Ledger::connect(&loc.into())?;
        let r = l.recover()?;
        Ok((l, r))
    }

    /// Size guard: writes that would grow the file past `bytes` fail
    /// ("database or disk is full", as on a full disk) instead of filling
    /// the disk. Never below what the file already holds. SQLite only: a
    /// PostgreSQL ledger refuses it.
    pub fn set_max_bytes(&mut self, bytes: u64) -> Result<(), LedgerError> {
        let Db::Sqlite(conn) = &self.db else {
            return Err(LedgerError::Config(
                "the size guard (ledger_max_mib) applies to SQLite ledgers only".into(),
            ));
        };
        let page: i64 = conn.query_row("PRAGMA page_size", [], |r| r.get(0))?;
        let pages = i64::try_from(bytes).unwrap_or(i64::MAX) / page.max(1);
        // SQLite keeps the larger of this and the current page count.
        let _set: i64 = conn.query_row(
            &format!("PRAGMA max_page_count={}", pages.max(1)),
            [],
            |r| r.get(0),
        )?;
        self.max_bytes = Some(bytes);
        Ok(())
    }

    /// An in-memory ledger (tests, backtests).
    pub fn open_in_memory() -> Result<Ledger, LedgerError> {
        let mut l = Ledger {
            fence: None,
            db: Db::Sqlite(Connection::open_in_memory()?),
            loc: None,
            max_bytes: None,
        };
        l.init()?;
        Ok(l)
    }

    fn init(&mut self) -> Result<(), LedgerError> {
        match &mut self.db {
            Db::Sqlite(conn) => Ledger::init_sqlite(conn),
            Db::Postgres(_) => {
                self.db.begin()?;
                let r = Ledger::init_pg(&mut self.db).and_then(|()| self.db.batch("COMMIT"));
                if r.is_err() {
                    self.abort();
                }
                r
            }
        }
    }

    fn init_sqlite(conn: &mut Connection) -> Result<(), LedgerError> {
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
        if found == 1 {
            sql.push_str("ALTER TABLE commands ADD COLUMN fence INTEGER;\n");
        }
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
        Ok(())
    }

    /// Inside a transaction: create what is missing, once per database.
    fn init_pg(db: &mut Db) -> Result<(), LedgerError> {
        db.batch(&format!("SELECT pg_advisory_xact_lock({PG_INIT_LOCK})"))?;
        db.batch(
            "CREATE TABLE IF NOT EXISTS ledger_meta (key TEXT PRIMARY KEY, value BIGINT NOT NULL)",
        )?;
        let found = db.query_one(
            "SELECT value FROM ledger_meta WHERE key = ?1",
            &[text("schema_version")],
        )?;
        // The lease is not part of the record: it changes in place.
        db.batch(lease::LEASES_TABLE)?;
        if let Some(r) = found {
            let found = r.int(0)?;
            if found > SCHEMA_VERSION {
                return Err(LedgerError::SchemaVersion { found });
            }
            if found < SCHEMA_VERSION {
                // PostgreSQL ledgers began at version 2; nothing to migrate.
                return Err(LedgerError::Config(format!(
                    "PostgreSQL ledger schema {found} predates fencing: use a fresh database"
                )));
            }
            return Ok(());
        }
        let mut sql = pg_schema();
        sql.push_str(
            "CREATE OR REPLACE FUNCTION ledger_append_only() RETURNS trigger LANGUAGE plpgsql AS \
             $f$ BEGIN RAISE EXCEPTION 'ledger is append-only'; END $f$;\n",
        );
        for t in TABLES.iter().chain(&["ledger_meta"]) {
            sql.push_str(&format!(
                "CREATE TRIGGER {t}_append_only BEFORE UPDATE OR DELETE OR TRUNCATE ON {t} \
                 FOR EACH STATEMENT EXECUTE FUNCTION ledger_append_only();\n"
            ));
        }
        db.batch(&sql)?;
        db.exec(
            "INSERT INTO ledger_meta (key, value) VALUES (?1, ?2)",
            &[text("schema_version"), int(SCHEMA_VERSION)],
        )
    }

    /// Run `f`'s writes as one transaction: all or none, and one fsync for
    /// all of them (group commit). Nothing is durable before this returns
    /// Ok. Inside another batch, part of that one.
    pub fn batch<T>(
        &mut self,
        f: impl FnOnce(&mut Ledger) -> Result<T, LedgerError>,
    ) -> Result<T, LedgerError> {
        if self.db.in_transaction() {
            return f(self);
        }
        self.db.begin()?;
        let r = f(self).and_then(|v| {
            self.db.batch("COMMIT")?;
            Ok(v)
        });
        if r.is_err() {
            self.abort();
        }
        r
    }

    /// After a failed transaction: roll back what is left of it. A
    /// connection that cannot leave its transaction (SQLite after some I/O
    /// errors) is closed, which rolls back, and opened again, so the next
    /// write does not land in a transaction nobody commits.
    fn abort(&mut self) {
        if self.db.in_transaction() {
            let _ = self.db.batch("ROLLBACK");
        }
        if !self.db.in_transaction() {
            return;
        }
        let Some(loc) = self.loc.clone() else { return };
        tracing::warn!(ledger = %loc, "ledger connection stuck in a failed transaction: reopening it");
        match Db::open(&loc) {
            Ok(db) => {
                self.db = db;
                let reopened = match &mut self.db {
                    Db::Sqlite(c) => Ledger::init_sqlite(c),
                    Db::Postgres(_) => Ok(()),
                };
                if let (Ok(()), Some(b)) = (reopened, self.max_bytes) {
                    let _ = self.set_max_bytes(b);
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "ledger reopen failed; retried at the next write")
            }
        }
    }

    /// Record a signal as received at `recorded`.
    pub fn record_signal(
        &mut self,
        recorded: Timestamp,
        signal: &Signal,
    ) -> Result<(), LedgerError> {
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
        let body = serde_json::to_string(signal)?;
        self.db.exec(
            "INSERT INTO signals (recorded_ms, at_ms, kind, value, body) VALUES (?1, ?2, ?3, ?4, ?5)",
            &[
                int(ms(recorded)),
                int(ms(signal.at())),
                text(signal.kind().as_str()),
                Val::Real(value),
                text(&body),
            ],
        )
    }

    /// Record a decision.
    pub fn record_decision(&mut self, d: &Decision) -> Result<(), LedgerError> {
        self.db.exec(
            "INSERT INTO decisions (at_ms, mode, cap_kw, expected_kw, changes, reason) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            &[
                int(ms(d.at)),
                text(d.mode.as_str()),
                Val::Real(d.cap_kw),
                Val::Real(Some(d.expected_kw)),
                int(i64::try_from(d.changes).unwrap_or(i64::MAX)),
                text(&d.reason),
            ],
        )
    }

    fn insert_command(&mut self, c: &Command) -> Result<(), LedgerError> {
        let id = i64::try_from(c.id.0).map_err(|_| LedgerError::Corrupt("command id".into()))?;
        if let Some(f) = &self.fence {
            return lease::insert_fenced(&mut self.db, f, c, id);
        }
        self.db.exec(
            "INSERT INTO commands (id, at_ms, miner, surface, action, value, curtail) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            &[
                int(id),
                int(ms(c.issued_at)),
                int(miner_i64(c.miner)),
                text(c.surface.as_str()),
                text(c.action.as_str()),
                Val::Int(c.action.value().map(i64::from)),
                int(i64::from(c.curtail)),
            ],
        )
    }

    /// Record one issued command (before sending it).
    pub fn record_command(&mut self, c: &Command) -> Result<(), LedgerError> {
        self.insert_command(c)
    }

    /// Record a burst of commands in one transaction: all or none (inside a
    /// [`Ledger::batch`], part of that one).
    pub fn record_commands(&mut self, cs: &[Command]) -> Result<(), LedgerError> {
        self.batch(|l| cs.iter().try_for_each(|c| l.insert_command(c)))
    }

    /// Record an actuator's acknowledgement.
    pub fn record_ack(
        &mut self,
        at: Timestamp,
        id: CommandId,
        ack: &Ack,
    ) -> Result<(), LedgerError> {
        let (outcome, detail) = match ack {
            Ack::Ok => ("ack_ok", None),
            Ack::Failed(d) => ("ack_failed", Some(d.as_str())),
        };
        self.insert_ack(at, id, outcome, detail)
    }

    fn insert_ack(
        &mut self,
        at: Timestamp,
        id: CommandId,
        outcome: &str,
        detail: Option<&str>,
    ) -> Result<(), LedgerError> {
        self.db.exec(
            "INSERT INTO acks (at_ms, command_id, outcome, detail) VALUES (?1, ?2, ?3, ?4)",
            &[
                int(ms(at)),
                int(id.0 as i64),
                text(outcome),
                Val::Text(detail),
            ],
        )
    }

    /// Record measured draw over an interval.
    pub fn record_interval(&mut self, i: &Interval) -> Result<(), LedgerError> {
        self.db.exec(
            "INSERT INTO intervals (start_ms, end_ms, fleet_kw, site_kw, miners) VALUES (?1, ?2, ?3, ?4, ?5)",
            &[
                int(ms(i.start)),
                int(ms(i.end)),
                Val::Real(Some(i.fleet_kw)),
                Val::Real(i.site_kw),
                int(i64::from(i.miners)),
            ],
        )
    }

    /// Record a DR event state change.
    pub fn record_event(
        &mut self,
        at: Timestamp,
        ev: &DrEvent,
        state: DrEventState,
        baseline_kw: f64,
    ) -> Result<(), LedgerError> {
        let (kind, kw) = match ev.target {
            DrTarget::LimitKw(k) => ("limit", k),
            DrTarget::ShedKw(k) => ("shed", k),
        };
        let body = serde_json::to_string(ev)?;
        self.db.exec(
            "INSERT INTO events (at_ms, event_id, state, target_kind, target_kw, start_ms, end_ms, baseline_kw, body) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            &[
                int(ms(at)),
                text(&ev.id),
                text(state.as_str()),
                text(kind),
                Val::Real(Some(kw)),
                int(ms(ev.start)),
                Val::Int(ev.end.map(ms)),
                Val::Real(Some(baseline_kw)),
                text(&body),
            ],
        )
    }

    /// Record anything [`Engine::poll_event`](crate::policy::Engine::poll_event)
    /// returned, each in the table it belongs to.
    pub fn record_policy_event(&mut self, e: &PolicyEvent) -> Result<(), LedgerError> {
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
        &mut self,
        at: Timestamp,
        kind: &str,
        miner: Option<MinerId>,
        e: &PolicyEvent,
    ) -> Result<(), LedgerError> {
        let body = serde_json::to_string(e)?;
        self.db.exec(
            "INSERT INTO notes (at_ms, kind, miner, body) VALUES (?1, ?2, ?3, ?4)",
            &[
                int(ms(at)),
                text(kind),
                Val::Int(miner.map(miner_i64)),
                text(&body),
            ],
        )
    }

    /// Rebuild what a restarted engine needs. Pass the result to
    /// [`Engine::resume`](crate::policy::Engine::resume).
    pub fn recover(&mut self) -> Result<Resume, LedgerError> {
        let max_id = match self.db.query_one("SELECT MAX(id) FROM commands", &[])? {
            Some(r) => r.opt_int(0)?,
            None => None,
        };
        let next_command_id = max_id.map_or(1, |m| m as u64 + 1);

        let mut curtailed = Vec::new();
        for r in self.db.query(
            "SELECT c.miner, c.action, c.value, c.at_ms FROM commands c \
             JOIN (SELECT miner, MAX(id) AS id FROM commands GROUP BY miner) last ON c.id = last.id \
             WHERE c.curtail = 1 AND c.action IN ('sleep', 'park', 'set_power_target') \
             ORDER BY c.miner",
            &[],
        )? {
            let action = r.text(1)?;
            let value = r.opt_int(2)?.map(|v| u32::try_from(v).unwrap_or(u32::MAX));
            let action = Action::from_parts(&action, value)
                .ok_or_else(|| LedgerError::Corrupt(format!("action {action:?}")))?;
            curtailed.push((MinerId(r.int(0)? as u64), action, ts(r.int(3)?)));
        }

        let mut events = Vec::new();
        for r in self.db.query(
            "SELECT e.body, e.baseline_kw, e.state FROM events e \
             JOIN (SELECT event_id, MAX(seq) AS seq FROM events GROUP BY event_id) last ON e.seq = last.seq \
             ORDER BY e.seq",
            &[],
        )? {
            if r.text(2)? == DrEventState::Ended.as_str() {
                continue;
            }
            events.push((serde_json::from_str::<DrEvent>(&r.text(0)?)?, r.real(1)?));
        }
        Ok(Resume {
            next_command_id,
            curtailed,
            events,
        })
    }

    /// A stored command.
    pub fn command(&mut self, id: CommandId) -> Result<Option<CommandRecord>, LedgerError> {
        self.db
            .query_one(
                "SELECT id, at_ms, miner, action, value, curtail, fence FROM commands WHERE id = ?1",
                &[int(id.0 as i64)],
            )?
            .map(|r| command_record(&r))
            .transpose()
    }

    /// Intervals overlapping `[from, to)`, in order.
    pub fn intervals(
        &mut self,
        from: Timestamp,
        to: Timestamp,
    ) -> Result<Vec<Interval>, LedgerError> {
        self.db
            .query(
                "SELECT start_ms, end_ms, fleet_kw, site_kw, miners FROM intervals \
                 WHERE end_ms > ?1 AND start_ms < ?2 ORDER BY start_ms, seq",
                &[int(ms(from)), int(ms(to))],
            )?
            .iter()
            .map(interval)
            .collect()
    }

    /// Rows in each table, by name (for reports and tests).
    pub fn counts(&mut self) -> Result<Vec<(&'static str, u64)>, LedgerError> {
        let mut out = Vec::new();
        for t in TABLES {
            let n = self
                .db
                .query_one(&format!("SELECT COUNT(*) FROM {t}"), &[])?
                .map_or(Ok(0), |r| r.int(0))?;
            out.push((t, n as u64));
        }
        Ok(out)
    }

    /// Run SQLite's integrity check; `Ok(())` if the file is sound. (A
    /// PostgreSQL server checks its own pages; there it is a round trip.)
    pub fn integrity_check(&mut self) -> Result<(), LedgerError> {
        if self.db.dialect() == Dialect::Postgres {
            self.db.query("SELECT 1", &[])?;
            return Ok(());
        }
        let res = self
            .db
            .query_one("PRAGMA integrity_check", &[])?
            .map_or(Ok(String::new()), |r| r.text(0))?;
        if res == "ok" {
            Ok(())
        } else {
            Err(LedgerError::Corrupt(res))
        }
    }

    /// The SQLite connection (tests of the file's own settings).
    #[cfg(test)]
    pub(crate) fn sqlite(&self) -> &Connection {
        match &self.db {
            Db::Sqlite(c) => c,
            Db::Postgres(_) => panic!("not a SQLite ledger"),
        }
    }
}

/// A `commands` row (id, at_ms, miner, action, value, curtail, fence).
pub(crate) fn command_record(r: &Row) -> Result<CommandRecord, LedgerError> {
    let action = r.text(3)?;
    let value = r.opt_int(4)?.map(|v| u32::try_from(v).unwrap_or(u32::MAX));
    Ok(CommandRecord {
        fence: r.opt_int(6)?.map(|f| f as u64),
        id: CommandId(r.int(0)? as u64),
        at: ts(r.int(1)?),
        miner: MinerId(r.int(2)? as u64),
        action: Action::from_parts(&action, value)
            .ok_or_else(|| LedgerError::Corrupt(format!("action {action:?}")))?,
        curtail: r.int(5)? != 0,
    })
}

/// An `intervals` row (start_ms, end_ms, fleet_kw, site_kw, miners).
pub(crate) fn interval(r: &Row) -> Result<Interval, LedgerError> {
    Ok(Interval {
        start: ts(r.int(0)?),
        end: ts(r.int(1)?),
        fleet_kw: r.real(2)?,
        site_kw: r.opt_real(3)?,
        miners: u32::try_from(r.int(4)?).unwrap_or(u32::MAX),
    })
}

mod db;
mod lease;
mod location;
mod postgres;
mod query;
pub(crate) use db::{Db, Dialect, Row, Val};
pub use lease::{Deadline, Lease};
pub use location::{Location, PgLocation};
pub use query::read_mv_input;

#[cfg(test)]
mod tests;
