//! The site lease (PostgreSQL only): of the instances sharing one site's
//! ledger, the one holding the lease acts; the others wait. The database's
//! clock decides expiry (`clock_timestamp()`), so the instances' clocks do
//! not need to agree. Each grant carries a new fencing token, and a command
//! is recorded only while its token is still the site's and unexpired
//! (checked in the same statement, the lease row share-locked so a takeover
//! waits for the commit): a leader that was paused past its lease and wakes
//! up has its next command refused ([`LedgerError::Fenced`]), and since a
//! command is recorded before it is sent, it sends nothing.
//!
//! What this cannot stop, and the caller must: a leader paused between the
//! commit and the send. The holder keeps its own deadline
//! ([`Lease::valid_until`], measured from before it asked, on the monotonic
//! clock, which keeps running through SIGSTOP), shares it as a [`Deadline`]
//! and the driver checks it before sending.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::db::{Db, Val};
use super::{Ledger, LedgerError};
use crate::command::Command;

/// Created by every instance at start-up (not append-only: renewed in
/// place). `token` only grows.
pub(super) const LEASES_TABLE: &str = "CREATE TABLE IF NOT EXISTS leases (
    site_id TEXT PRIMARY KEY,
    holder TEXT NOT NULL,
    token BIGINT NOT NULL,
    expires_at TIMESTAMPTZ NOT NULL
)";

/// The token commands are recorded under.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Fence {
    pub(super) site: String,
    pub(super) token: i64,
}

/// A lease this instance holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    /// The site.
    pub site: String,
    /// This instance's name.
    pub holder: String,
    /// The fencing token of this grant.
    pub token: u64,
    /// Local monotonic deadline: past it, act no more without renewing.
    pub valid_until: Instant,
}

/// The holder's own deadline, shared: the lease supervisor extends it at
/// each renewal, the driver checks it between a command's commit and its
/// send (a pause there outlasting the lease must not send).
#[derive(Clone, Debug)]
pub struct Deadline(Arc<Mutex<Instant>>);

impl Deadline {
    /// A deadline at `lease.valid_until`.
    pub fn new(lease: &Lease) -> Deadline {
        Deadline(Arc::new(Mutex::new(lease.valid_until)))
    }

    /// Move it to `lease.valid_until` (after a renewal).
    pub fn extend(&self, lease: &Lease) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = lease.valid_until;
    }

    /// Whether the lease may have lapsed: act no more.
    pub fn passed(&self) -> bool {
        Instant::now() >= *self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn ms(d: Duration) -> Val<'static> {
    Val::Int(Some(i64::try_from(d.as_millis()).unwrap_or(i64::MAX)))
}

pub(super) fn insert_fenced(
    db: &mut Db,
    f: &Fence,
    c: &Command,
    id: i64,
) -> Result<(), LedgerError> {
    let n = db.exec_count(
        "INSERT INTO commands (id, at_ms, miner, surface, action, value, curtail, fence) \
         SELECT ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8 WHERE EXISTS (SELECT 1 FROM leases \
         WHERE site_id = ?9 AND token = ?8 AND expires_at > clock_timestamp() FOR SHARE)",
        &[
            Val::Int(Some(id)),
            Val::Int(Some(super::ms(c.issued_at))),
            Val::Int(Some(super::miner_i64(c.miner))),
            Val::Text(Some(c.surface.as_str())),
            Val::Text(Some(c.action.as_str())),
            Val::Int(c.action.value().map(i64::from)),
            Val::Int(Some(i64::from(c.curtail))),
            Val::Int(Some(f.token)),
            Val::Text(Some(&f.site)),
        ],
    )?;
    if n == 1 {
        Ok(())
    } else {
        Err(LedgerError::Fenced(format!(
            "command {} not recorded: lease token {} is no longer site {:?}'s",
            c.id, f.token, f.site
        )))
    }
}

impl Ledger {
    fn postgres_only(&self, what: &str) -> Result<(), LedgerError> {
        match self.db.dialect() {
            super::Dialect::Postgres => Ok(()),
            super::Dialect::Sqlite => Err(LedgerError::Config(format!(
                "{what} needs a PostgreSQL ledger (instances share it)"
            ))),
        }
    }

    /// Take the site's lease for `ttl` if nobody holds it unexpired (a new
    /// token each time); `None` while another holder's lease runs.
    pub fn acquire_lease(
        &mut self,
        site: &str,
        holder: &str,
        ttl: Duration,
    ) -> Result<Option<Lease>, LedgerError> {
        self.postgres_only("a lease")?;
        let asked = Instant::now();
        let row = self.db.query_one(
            "INSERT INTO leases (site_id, holder, token, expires_at) \
             VALUES (?1, ?2, 1, clock_timestamp() + ?3 * interval '1 millisecond') \
             ON CONFLICT (site_id) DO UPDATE SET holder = EXCLUDED.holder, \
             token = leases.token + 1, expires_at = EXCLUDED.expires_at \
             WHERE leases.expires_at <= clock_timestamp() RETURNING token",
            &[Val::Text(Some(site)), Val::Text(Some(holder)), ms(ttl)],
        )?;
        row.map(|r| {
            Ok(Lease {
                site: site.to_owned(),
                holder: holder.to_owned(),
                token: r.int(0)? as u64,
                valid_until: asked + ttl,
            })
        })
        .transpose()
    }

    /// Extend `lease` by `ttl` if it is still the site's and unexpired;
    /// false if it lapsed (then acquire again, for a new token).
    pub fn renew_lease(&mut self, lease: &mut Lease, ttl: Duration) -> Result<bool, LedgerError> {
        self.postgres_only("a lease")?;
        let asked = Instant::now();
        let n = self.db.exec_count(
            "UPDATE leases SET expires_at = clock_timestamp() + ?4 * interval '1 millisecond' \
             WHERE site_id = ?1 AND holder = ?2 AND token = ?3 AND expires_at > clock_timestamp()",
            &[
                Val::Text(Some(&lease.site)),
                Val::Text(Some(&lease.holder)),
                Val::Int(Some(lease.token as i64)),
                ms(ttl),
            ],
        )?;
        if n == 1 {
            lease.valid_until = asked + ttl;
        }
        Ok(n == 1)
    }

    /// Give the lease up now (a clean stop), so a standby need not wait
    /// for it to expire.
    pub fn release_lease(&mut self, lease: &Lease) -> Result<(), LedgerError> {
        self.postgres_only("a lease")?;
        self.db.exec(
            "UPDATE leases SET expires_at = clock_timestamp() \
             WHERE site_id = ?1 AND holder = ?2 AND token = ?3",
            &[
                Val::Text(Some(&lease.site)),
                Val::Text(Some(&lease.holder)),
                Val::Int(Some(lease.token as i64)),
            ],
        )
    }

    /// Record commands only under `lease`'s token from now on.
    pub fn fence(&mut self, lease: &Lease) -> Result<(), LedgerError> {
        self.postgres_only("fencing")?;
        self.fence = Some(Fence {
            site: lease.site.clone(),
            token: lease.token as i64,
        });
        Ok(())
    }
}
