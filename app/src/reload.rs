//! Hot reload: put a new configuration in force without dropping a miner.
//!
//! What changes live: pools (added, removed, re-addressed), priorities and
//! split weights, routing timings, difficulty settings (at each channel's
//! next retarget), limits (the connection cap at once, per-connection limits
//! for connections made after the reload). What needs a restart: listener
//! addresses and keys, the extranonce layout (miners hold slots cut from it)
//! and the `[api]` and `[site]` sections (the curtailment engine, its
//! miners, ledger and signal sources); a reload that changes them is refused whole, so
//! the running state never half-matches the file.

use crate::config::Config;
use gridproxy_proxy::error::ReconfigureError;
use gridproxy_proxy::router::Reconfigured;
use gridproxy_proxy::Proxy;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

/// What a reload did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Reloaded {
    /// Pool changes.
    pub pools: Reconfigured,
    /// Top-level sections whose values changed (`routing`, `limits`, ...).
    pub sections: Vec<&'static str>,
}

impl std::fmt::Display for Reloaded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.sections.is_empty() {
            return write!(f, "configuration unchanged");
        }
        write!(f, "changed: {}", self.sections.join(", "))?;
        let p = &self.pools;
        for (what, names) in [
            ("added", &p.added),
            ("removed", &p.removed),
            ("replaced", &p.replaced),
            ("updated", &p.updated),
        ] {
            if !names.is_empty() {
                write!(f, "; pools {what}: {}", names.join(", "))?;
            }
        }
        if p.rehomed > 0 {
            write!(f, "; {} miners given a new home pool", p.rehomed)?;
        }
        Ok(())
    }
}

/// Why a reload was refused (nothing was applied).
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The proxy was started from text, not a file.
    #[error("this proxy was not started from a configuration file")]
    NoFile,
    /// The file does not parse or validate.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// Sections of the application that need a restart.
    #[error("[{}] changed: these need a restart; nothing was applied", .0.join("], ["))]
    NeedsRestart(Vec<&'static str>),
    /// The engine refused the new values.
    #[error(transparent)]
    Proxy(#[from] ReconfigureError),
}

/// The configuration in force, where it came from, and the engine it is
/// applied to: what SIGHUP and `POST /api/v1/reload` go through.
pub struct Reloader {
    proxy: Proxy,
    config: Mutex<Arc<Config>>,
    path: Option<PathBuf>,
}

/// Sections of the application (not the engine) that cannot change while
/// running, and which of them did.
fn app_needs_restart(old: &Config, new: &Config) -> Vec<&'static str> {
    let mut v = Vec::new();
    if old.api != new.api {
        v.push("api");
    }
    if old.site != new.site {
        v.push("site");
    }
    v
}

impl Reloader {
    /// Over a running `proxy` started from `config` (read from `path`, if any).
    pub fn new(proxy: Proxy, config: Config, path: Option<PathBuf>) -> Arc<Reloader> {
        Arc::new(Reloader {
            proxy,
            config: Mutex::new(Arc::new(config)),
            path,
        })
    }

    /// The configuration in force now.
    pub fn config(&self) -> Arc<Config> {
        self.lock().clone()
    }

    /// The file the configuration came from.
    pub fn path(&self) -> Option<&std::path::Path> {
        self.path.as_deref()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Arc<Config>> {
        self.config.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Put `new` in force. What changes live and what needs a restart: see
    /// [`Proxy::reconfigure`]; `[api]` and `[site]` need a restart too (the
    /// curtailment engine, its miners, ledger and sources), and a reload
    /// that changes them is refused whole, so the running state never
    /// half-matches the file.
    pub fn apply(&self, new: Config) -> Result<Reloaded, ReloadError> {
        let mut cur = self.lock();
        let proxy_cfg = new.proxy();
        // The engine's fixed tables first, then the application's: one
        // refusal names every section that needs a restart.
        let mut fixed = self.proxy.needs_restart(&proxy_cfg);
        fixed.extend(app_needs_restart(&cur, &new));
        if !fixed.is_empty() {
            return Err(ReloadError::NeedsRestart(fixed));
        }
        let changes = self.proxy.reconfigure(proxy_cfg)?;
        *cur = Arc::new(new);
        Ok(Reloaded {
            pools: changes.pools,
            sections: changes.sections,
        })
    }

    /// Re-read the file the proxy was started from and apply it. A file
    /// that does not parse or validate is refused with its error (key and
    /// line), and the running configuration stays.
    pub fn reload_file(&self) -> Result<Reloaded, ReloadError> {
        let path = self.path.as_deref().ok_or(ReloadError::NoFile)?;
        self.apply(Config::load(path)?)
    }

    /// On every SIGHUP, reload the file (see [`Reloader::reload_file`]);
    /// the outcome is logged. Runs until the proxy stops.
    pub fn spawn_sighup(self: &Arc<Self>) -> anyhow::Result<()> {
        use tokio::signal::unix::{signal, SignalKind};
        let mut hup =
            signal(SignalKind::hangup()).map_err(|e| anyhow::anyhow!("SIGHUP handler: {e}"))?;
        let me = self.clone();
        let stop = self.proxy.stop.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    s = hup.recv() => if s.is_none() { return },
                }
                let path = me.path.clone().unwrap_or_default();
                crate::service::reloading();
                match me.reload_file() {
                    Ok(r) => {
                        tracing::info!(path = %path.display(), "SIGHUP: reloaded: {r}");
                        crate::service::ready(&format!("reloaded: {r}"));
                    }
                    Err(e) => {
                        tracing::error!(path = %path.display(), "SIGHUP: reload refused: {e}");
                        // The running config stays: still ready, and say why.
                        crate::service::ready(&format!("reload refused, running config kept: {e}"));
                    }
                }
            }
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_changed_site_section_needs_a_restart() {
        let base = "[[pools]]\nname='a'\naddress='127.0.0.1:1'\nprotocol='sv1'\nuser='u'\n";
        let site = |kw: &str| {
            format!(
                "{base}\n[site]\nledger = \"l.sqlite\"\nmin_on_secs = {kw}\n\n[[site.miners]]\nname = \"m\"\nfirmware = \"luxos\"\naddress = \"127.0.0.1:4028\"\nths = 100.0\nwatts = 3000.0\n"
            )
        };
        let parse = |t: &str| Config::parse(t, "t.toml").unwrap();
        let (none, a, b) = (parse(base), parse(&site("60")), parse(&site("90")));
        assert!(app_needs_restart(&a, &a).is_empty());
        assert_eq!(app_needs_restart(&a, &b), vec!["site"]);
        assert_eq!(app_needs_restart(&none, &a), vec!["site"]);
    }
}
