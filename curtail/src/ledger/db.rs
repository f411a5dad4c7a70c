//! The two stores a ledger lives in, behind one small interface: SQLite (a
//! file, the default) and PostgreSQL (one database several instances of a
//! site share). Statements are written once, with `?N` placeholders;
//! PostgreSQL gets them as `$N`. Every integer is 64-bit on both.

use std::fmt;

use rusqlite::types::{ToSqlOutput, ValueRef};
use rusqlite::Connection;

use super::location::Location;
use super::postgres::Pg;
use super::LedgerError;

/// A statement parameter.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Val<'a> {
    Int(Option<i64>),
    Real(Option<f64>),
    Text(Option<&'a str>),
}

impl rusqlite::ToSql for Val<'_> {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(match *self {
            Val::Int(v) => v.map_or(ToSqlOutput::from(rusqlite::types::Null), ToSqlOutput::from),
            Val::Real(v) => v.map_or(ToSqlOutput::from(rusqlite::types::Null), ToSqlOutput::from),
            Val::Text(v) => v.map_or(ToSqlOutput::from(rusqlite::types::Null), |s| {
                ToSqlOutput::Borrowed(ValueRef::Text(s.as_bytes()))
            }),
        })
    }
}

/// One value of a result row.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Cell {
    Null,
    Int(i64),
    Real(f64),
    Text(String),
}

/// A result row, read by column index with the type the caller expects.
#[derive(Debug)]
pub(crate) struct Row(pub(crate) Vec<Cell>);

impl Row {
    fn cell(&self, i: usize) -> Result<&Cell, LedgerError> {
        self.0
            .get(i)
            .ok_or_else(|| LedgerError::Corrupt(format!("row has no column {i}")))
    }

    fn wrong(&self, i: usize, want: &str) -> LedgerError {
        LedgerError::Corrupt(format!(
            "column {i}: {want} expected, found {:?}",
            self.0.get(i)
        ))
    }

    pub(crate) fn opt_int(&self, i: usize) -> Result<Option<i64>, LedgerError> {
        match self.cell(i)? {
            Cell::Null => Ok(None),
            Cell::Int(v) => Ok(Some(*v)),
            _ => Err(self.wrong(i, "integer")),
        }
    }

    pub(crate) fn int(&self, i: usize) -> Result<i64, LedgerError> {
        self.opt_int(i)?.ok_or_else(|| self.wrong(i, "integer"))
    }

    pub(crate) fn opt_real(&self, i: usize) -> Result<Option<f64>, LedgerError> {
        match self.cell(i)? {
            Cell::Null => Ok(None),
            Cell::Real(v) => Ok(Some(*v)),
            // SQLite stores a REAL column's whole numbers as given.
            Cell::Int(v) => Ok(Some(*v as f64)),
            _ => Err(self.wrong(i, "number")),
        }
    }

    pub(crate) fn real(&self, i: usize) -> Result<f64, LedgerError> {
        self.opt_real(i)?.ok_or_else(|| self.wrong(i, "number"))
    }

    pub(crate) fn opt_text(&self, i: usize) -> Result<Option<String>, LedgerError> {
        match self.cell(i)? {
            Cell::Null => Ok(None),
            Cell::Text(v) => Ok(Some(v.clone())),
            _ => Err(self.wrong(i, "text")),
        }
    }

    pub(crate) fn text(&self, i: usize) -> Result<String, LedgerError> {
        self.opt_text(i)?.ok_or_else(|| self.wrong(i, "text"))
    }
}

/// Which SQL dialect a statement goes to (DDL differs; DML is shared).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Dialect {
    Sqlite,
    Postgres,
}

/// An open store.
pub(crate) enum Db {
    Sqlite(Connection),
    Postgres(Box<Pg>),
}

impl fmt::Debug for Db {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Db::Sqlite(_) => f.write_str("Db::Sqlite"),
            Db::Postgres(p) => write!(f, "Db::Postgres({p:?})"),
        }
    }
}

impl Db {
    /// Open `loc` for reading and writing.
    pub(crate) fn open(loc: &Location) -> Result<Db, LedgerError> {
        match loc {
            Location::Sqlite(p) => Ok(Db::Sqlite(Connection::open(p)?)),
            Location::Postgres(pg) => Ok(Db::Postgres(Box::new(Pg::connect(pg)?))),
        }
    }

    /// Open `loc` for reading only (safe while a driver writes it).
    pub(crate) fn open_read_only(loc: &Location) -> Result<Db, LedgerError> {
        match loc {
            Location::Sqlite(p) => {
                let c = Connection::open_with_flags(
                    p,
                    rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY
                        | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
                )?;
                c.busy_timeout(std::time::Duration::from_secs(5))?;
                Ok(Db::Sqlite(c))
            }
            Location::Postgres(pg) => {
                let mut p = Pg::connect(pg)?;
                p.batch("SET default_transaction_read_only = on")?;
                Ok(Db::Postgres(Box::new(p)))
            }
        }
    }

    pub(crate) fn dialect(&self) -> Dialect {
        match self {
            Db::Sqlite(_) => Dialect::Sqlite,
            Db::Postgres(_) => Dialect::Postgres,
        }
    }

    /// Run one statement.
    pub(crate) fn exec(&mut self, sql: &str, p: &[Val<'_>]) -> Result<(), LedgerError> {
        self.exec_count(sql, p).map(|_| ())
    }

    /// Run one statement; the number of rows it changed.
    pub(crate) fn exec_count(&mut self, sql: &str, p: &[Val<'_>]) -> Result<u64, LedgerError> {
        match self {
            Db::Sqlite(c) => {
                Ok(c.prepare_cached(sql)?
                    .execute(rusqlite::params_from_iter(p.iter()))? as u64)
            }
            Db::Postgres(pg) => pg.exec(sql, p),
        }
    }

    /// Run a query and collect its rows.
    pub(crate) fn query(&mut self, sql: &str, p: &[Val<'_>]) -> Result<Vec<Row>, LedgerError> {
        match self {
            Db::Sqlite(c) => {
                let mut stmt = c.prepare_cached(sql)?;
                let n = stmt.column_count();
                let mut rows = stmt.query(rusqlite::params_from_iter(p.iter()))?;
                let mut out = Vec::new();
                while let Some(r) = rows.next()? {
                    let mut row = Vec::with_capacity(n);
                    for i in 0..n {
                        row.push(match r.get_ref(i)? {
                            ValueRef::Null => Cell::Null,
                            ValueRef::Integer(v) => Cell::Int(v),
                            ValueRef::Real(v) => Cell::Real(v),
                            ValueRef::Text(t) => Cell::Text(
                                std::str::from_utf8(t)
                                    .map_err(|e| LedgerError::Corrupt(e.to_string()))?
                                    .to_owned(),
                            ),
                            ValueRef::Blob(_) => {
                                return Err(LedgerError::Corrupt(format!("column {i} is a blob")))
                            }
                        });
                    }
                    out.push(Row(row));
                }
                Ok(out)
            }
            Db::Postgres(pg) => pg.query(sql, p),
        }
    }

    /// The first row of a query, if any.
    pub(crate) fn query_one(
        &mut self,
        sql: &str,
        p: &[Val<'_>],
    ) -> Result<Option<Row>, LedgerError> {
        Ok(self.query(sql, p)?.into_iter().next())
    }

    /// Run statements without parameters (DDL, transaction control).
    pub(crate) fn batch(&mut self, sql: &str) -> Result<(), LedgerError> {
        match self {
            Db::Sqlite(c) => Ok(c.execute_batch(sql)?),
            Db::Postgres(pg) => pg.batch(sql),
        }
    }

    /// Start a write transaction.
    pub(crate) fn begin(&mut self) -> Result<(), LedgerError> {
        match self {
            // IMMEDIATE: take the write lock now, not at the first insert.
            Db::Sqlite(c) => Ok(c.execute_batch("BEGIN IMMEDIATE")?),
            Db::Postgres(pg) => pg.batch("BEGIN"),
        }
    }

    /// Whether a transaction is open (a failed statement may have ended
    /// it: SQLite rolls back on some I/O errors).
    pub(crate) fn in_transaction(&self) -> bool {
        match self {
            Db::Sqlite(c) => !c.is_autocommit(),
            Db::Postgres(pg) => pg.in_transaction(),
        }
    }
}
