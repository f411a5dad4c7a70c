//! The PostgreSQL side of [`Db`](super::db::Db): one connection (sqlx)
//! driven by its own single-threaded runtime, because the ledger is
//! synchronous and lives on one writer thread. A connection that breaks is
//! dropped and opened again on the next call, so a database restart is a
//! ledger fault that heals, as a full disk that empties is.

use std::fmt;
use std::str::FromStr;

use sqlx::postgres::{PgConnectOptions, PgConnection, PgRow};
use sqlx::{ConnectOptions, Connection, Executor, Row as _, TypeInfo, ValueRef};

use super::db::{Cell, Row, Val};
use super::location::PgLocation;
use super::LedgerError;

/// An open PostgreSQL ledger connection.
pub(crate) struct Pg {
    /// Always Some until dropped (see Drop).
    rt: Option<tokio::runtime::Runtime>,
    opts: PgConnectOptions,
    conn: Option<PgConnection>,
    in_tx: bool,
    shown: String,
}

impl fmt::Debug for Pg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The URL as configured carries no password (see PgLocation).
        write!(f, "Pg({})", self.shown)
    }
}

/// Dropping a runtime blocks, which tokio forbids on an async thread (a
/// ledger opened by `spawn_blocking` may be dropped on one): let it go in
/// the background instead.
impl Drop for Pg {
    fn drop(&mut self) {
        drop(self.conn.take());
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// Run `fut` to completion on `rt`. Blocking on a runtime from a thread
/// that drives async tasks panics in tokio, so a ledger used from one (a
/// test, a reader called from an async handler) runs the call on a scoped
/// thread instead (so do `spawn_blocking` callers, which cannot be told
/// apart); the writer thread, outside any runtime, blocks directly.
fn block<F>(rt: &tokio::runtime::Runtime, fut: F) -> F::Output
where
    F: std::future::Future + Send,
    F::Output: Send,
{
    if tokio::runtime::Handle::try_current().is_ok() {
        std::thread::scope(|s| {
            s.spawn(|| rt.block_on(fut))
                .join()
                .unwrap_or_else(|p| std::panic::resume_unwind(p))
        })
    } else {
        rt.block_on(fut)
    }
}

fn pg_err(e: sqlx::Error) -> LedgerError {
    LedgerError::Postgres(e.to_string())
}

/// `?N` placeholders as PostgreSQL's `$N`.
fn dollars(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut it = sql.chars().peekable();
    while let Some(c) = it.next() {
        if c == '?' && it.peek().is_some_and(char::is_ascii_digit) {
            out.push('$');
        } else {
            out.push(c);
        }
    }
    out
}

impl Pg {
    /// Connect (once, now: a wrong URL or password fails at start-up).
    pub(crate) fn connect(loc: &PgLocation) -> Result<Pg, LedgerError> {
        let mut opts = PgConnectOptions::from_str(loc.url()).map_err(pg_err)?;
        if let Some(pw) = loc.password() {
            opts = opts.password(pw);
        }
        // Statements carry settlement data, not secrets, but one log line
        // per record is noise at info level.
        // NOTICEs ("relation already exists, skipping") are not news.
        opts = opts
            .application_name("gridproxy-ledger")
            .options([("client_min_messages", "warning")])
            .disable_statement_logging();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| LedgerError::Postgres(format!("runtime: {e}")))?;
        let mut pg = Pg {
            rt: Some(rt),
            opts,
            conn: None,
            in_tx: false,
            shown: loc.url().to_owned(),
        };
        pg.ensure()?;
        Ok(pg)
    }

    fn ensure(&mut self) -> Result<(), LedgerError> {
        if self.conn.is_none() {
            let c = block(self.rt(), PgConnection::connect_with(&self.opts)).map_err(pg_err)?;
            self.conn = Some(c);
            self.in_tx = false;
        }
        Ok(())
    }

    /// After an error: drop a connection that no longer works (the next
    /// call reconnects); a statement error on a sound connection keeps it.
    fn fail(&mut self, e: sqlx::Error) -> LedgerError {
        let broken = matches!(
            e,
            sqlx::Error::Io(_)
                | sqlx::Error::Tls(_)
                | sqlx::Error::Protocol(_)
                | sqlx::Error::PoolClosed
                | sqlx::Error::WorkerCrashed
        );
        if broken {
            self.conn = None;
            self.in_tx = false;
        }
        pg_err(e)
    }

    fn rt(&self) -> &tokio::runtime::Runtime {
        self.rt.as_ref().expect("runtime lives until drop")
    }

    pub(crate) fn in_transaction(&self) -> bool {
        self.in_tx
    }

    /// Statements without parameters; tracks BEGIN / COMMIT / ROLLBACK.
    pub(crate) fn batch(&mut self, sql: &str) -> Result<(), LedgerError> {
        self.ensure()?;
        let conn = self.conn.as_mut().expect("connected");
        let r = block(
            self.rt.as_ref().expect("runtime lives until drop"),
            conn.execute(sql),
        );
        match sql.trim().to_ascii_uppercase().as_str() {
            "BEGIN" => self.in_tx = r.is_ok(),
            // A failed COMMIT ends the transaction in PostgreSQL too.
            "COMMIT" | "ROLLBACK" => self.in_tx = false,
            _ => {}
        }
        r.map(|_| ()).map_err(|e| self.fail(e))
    }

    pub(crate) fn exec(&mut self, sql: &str, p: &[Val<'_>]) -> Result<u64, LedgerError> {
        self.ensure()?;
        let sql = dollars(sql);
        let conn = self.conn.as_mut().expect("connected");
        let r = block(
            self.rt.as_ref().expect("runtime lives until drop"),
            bind(sqlx::query(&sql), p).execute(conn),
        );
        r.map(|d| d.rows_affected()).map_err(|e| self.fail(e))
    }

    pub(crate) fn query(&mut self, sql: &str, p: &[Val<'_>]) -> Result<Vec<Row>, LedgerError> {
        self.ensure()?;
        let sql = dollars(sql);
        let conn = self.conn.as_mut().expect("connected");
        let r = block(
            self.rt.as_ref().expect("runtime lives until drop"),
            bind(sqlx::query(&sql), p).fetch_all(conn),
        );
        r.map_err(|e| self.fail(e))?.iter().map(row).collect()
    }
}

type Query<'q> = sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>;

fn bind<'q>(mut q: Query<'q>, p: &[Val<'q>]) -> Query<'q> {
    for v in p {
        q = match *v {
            Val::Int(x) => q.bind(x),
            Val::Real(x) => q.bind(x),
            Val::Text(x) => q.bind(x),
        };
    }
    q
}

/// A row as [`Cell`]s, by the column's PostgreSQL type.
fn row(r: &PgRow) -> Result<Row, LedgerError> {
    let mut out = Vec::with_capacity(r.len());
    for i in 0..r.len() {
        let raw = r.try_get_raw(i).map_err(pg_err)?;
        if raw.is_null() {
            out.push(Cell::Null);
            continue;
        }
        let ty = raw.type_info().name().to_owned();
        out.push(match ty.as_str() {
            "INT8" => Cell::Int(r.try_get::<i64, _>(i).map_err(pg_err)?),
            "INT4" => Cell::Int(r.try_get::<i32, _>(i).map_err(pg_err)?.into()),
            "INT2" => Cell::Int(r.try_get::<i16, _>(i).map_err(pg_err)?.into()),
            "BOOL" => Cell::Int(r.try_get::<bool, _>(i).map_err(pg_err)?.into()),
            "FLOAT8" => Cell::Real(r.try_get::<f64, _>(i).map_err(pg_err)?),
            "FLOAT4" => Cell::Real(r.try_get::<f32, _>(i).map_err(pg_err)?.into()),
            "TEXT" | "VARCHAR" | "NAME" => Cell::Text(r.try_get::<String, _>(i).map_err(pg_err)?),
            other => {
                return Err(LedgerError::Corrupt(format!(
                    "column {i}: unexpected PostgreSQL type {other}"
                )))
            }
        });
    }
    Ok(Row(out))
}

#[cfg(test)]
mod tests {
    use super::dollars;

    #[test]
    fn placeholders_become_dollars() {
        assert_eq!(
            dollars("INSERT INTO t (a, b) VALUES (?1, ?12) -- why?"),
            "INSERT INTO t (a, b) VALUES ($1, $12) -- why?"
        );
    }
}
