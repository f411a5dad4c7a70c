//! Where a ledger lives: a SQLite file (the default) or a PostgreSQL
//! database (`postgres://user@host:port/db`), whose password comes from
//! elsewhere (a file or the environment) so that the URL, which is logged,
//! never carries it.

use std::fmt;
use std::path::{Path, PathBuf};

use super::LedgerError;

/// A ledger's store.
#[derive(Clone, PartialEq, Eq)]
pub enum Location {
    /// A SQLite file.
    Sqlite(PathBuf),
    /// A PostgreSQL database.
    Postgres(PgLocation),
}

/// A PostgreSQL database and the password to reach it.
#[derive(Clone, PartialEq, Eq)]
pub struct PgLocation {
    url: String,
    password: Option<String>,
}

impl PgLocation {
    /// The URL (no password in it).
    pub fn url(&self) -> &str {
        &self.url
    }

    pub(crate) fn password(&self) -> Option<&str> {
        self.password.as_deref()
    }
}

impl fmt::Debug for PgLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgLocation")
            .field("url", &self.url)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl Location {
    /// `postgres://…` / `postgresql://…` is a PostgreSQL database; anything
    /// else is a SQLite file's path. A password inside the URL is refused:
    /// give it with [`Location::with_password`].
    pub fn parse(s: &str) -> Result<Location, LedgerError> {
        let lower = s.to_ascii_lowercase();
        if !(lower.starts_with("postgres://") || lower.starts_with("postgresql://")) {
            return Ok(Location::Sqlite(PathBuf::from(s)));
        }
        let url = url::Url::parse(s)
            .map_err(|e| LedgerError::Config(format!("ledger URL {s:?}: {e}")))?;
        if url.password().is_some() {
            return Err(LedgerError::Config(
                "the ledger URL carries a password, which would reach logs: remove it and set \
                 ledger_password_file or GRIDPROXY_LEDGER_PASSWORD instead"
                    .into(),
            ));
        }
        if url.host_str().is_none_or(str::is_empty) {
            return Err(LedgerError::Config(format!("ledger URL {s:?} has no host")));
        }
        Ok(Location::Postgres(PgLocation {
            url: s.to_owned(),
            password: None,
        }))
    }

    /// The PostgreSQL password (ignored for SQLite).
    pub fn with_password(mut self, pw: Option<String>) -> Location {
        if let Location::Postgres(p) = &mut self {
            p.password = pw;
        }
        self
    }

    /// The SQLite file, if this is one.
    pub fn path(&self) -> Option<&Path> {
        match self {
            Location::Sqlite(p) => Some(p),
            Location::Postgres(_) => None,
        }
    }

    /// Whether this is a PostgreSQL database.
    pub fn is_postgres(&self) -> bool {
        matches!(self, Location::Postgres(_))
    }
}

/// The path, or the URL (which carries no password).
impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Location::Sqlite(p) => write!(f, "{}", p.display()),
            Location::Postgres(p) => f.write_str(&p.url),
        }
    }
}

impl fmt::Debug for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Location::Sqlite(p) => f.debug_tuple("Sqlite").field(p).finish(),
            Location::Postgres(p) => f.debug_tuple("Postgres").field(p).finish(),
        }
    }
}

impl From<PathBuf> for Location {
    fn from(p: PathBuf) -> Location {
        Location::Sqlite(p)
    }
}

impl From<&PathBuf> for Location {
    fn from(p: &PathBuf) -> Location {
        Location::Sqlite(p.clone())
    }
}

impl From<&Path> for Location {
    fn from(p: &Path) -> Location {
        Location::Sqlite(p.to_owned())
    }
}

impl From<&Location> for Location {
    fn from(l: &Location) -> Location {
        l.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_paths() {
        assert_eq!(
            Location::parse("curtail-ledger.sqlite").unwrap(),
            Location::Sqlite("curtail-ledger.sqlite".into())
        );
        let l = Location::parse("postgres://gridproxy@127.0.0.1:5432/site")
            .unwrap()
            .with_password(Some("hunter2".into()));
        assert!(l.is_postgres());
        assert_eq!(l.to_string(), "postgres://gridproxy@127.0.0.1:5432/site");
        let dbg = format!("{l:?}");
        assert!(
            !dbg.contains("hunter2") && dbg.contains("redacted"),
            "{dbg}"
        );
        let e = Location::parse("postgresql://gridproxy:hunter2@db/site").unwrap_err();
        assert!(!e.to_string().contains("hunter2"), "{e}");
        assert!(e.to_string().contains("GRIDPROXY_LEDGER_PASSWORD"), "{e}");
        assert!(Location::parse("postgres:///site").is_err());
    }
}
