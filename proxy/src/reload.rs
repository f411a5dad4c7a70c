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
use crate::downstream::Ctx;
use crate::router::Reconfigured;
use crate::upstream;
use std::sync::Arc;

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

/// Sections that cannot change while running, and which of them did.
fn needs_restart(old: &Config, new: &Config) -> Vec<&'static str> {
    let mut v = Vec::new();
    if old.listen != new.listen {
        v.push("listen");
    }
    if old.extranonce != new.extranonce {
        v.push("extranonce");
    }
    if old.api != new.api {
        v.push("api");
    }
    if old.site != new.site {
        v.push("site");
    }
    v
}

/// Apply `new` to a running proxy.
pub fn apply(ctx: &Ctx, new: Config) -> Result<Reloaded, String> {
    let old = ctx.cfg();
    let fixed = needs_restart(&old, &new);
    if !fixed.is_empty() {
        return Err(format!(
            "[{}] changed: these need a restart; nothing was applied",
            fixed.join("], [")
        ));
    }
    let mut sections = Vec::new();
    if old.pools != new.pools {
        sections.push("pools");
    }
    if old.routing != new.routing {
        sections.push("routing");
    }
    if old.limits != new.limits {
        sections.push("limits");
    }
    if old.difficulty != new.difficulty {
        sections.push("difficulty");
    }
    let pools = if sections.contains(&"pools") || sections.contains(&"routing") {
        let (routing, extranonce) = (new.routing.clone(), new.extranonce.clone());
        ctx.router.reconfigure(&new, |index, pool, stats| {
            let stop = ctx.shutdown.child_token();
            let h = upstream::spawn(index, pool, &routing, &extranonce, stats, stop.clone());
            (h, stop)
        })
    } else {
        Reconfigured::default()
    };
    ctx.set_cfg(Arc::new(new));
    Ok(Reloaded { pools, sections })
}

/// Re-read the configuration file the proxy was started from and apply it.
/// A file that does not parse or validate is refused with its error (key
/// and line), and the running configuration stays.
pub fn reload_file(ctx: &Ctx) -> Result<Reloaded, String> {
    let path = ctx
        .config_path()
        .ok_or("this proxy was not started from a configuration file")?;
    let new = crate::api::config::load(&path).map_err(|e| e.to_string())?;
    apply(ctx, new)
}

/// On every SIGHUP, reload the configuration file (see [`reload_file`]);
/// the outcome is logged. Runs until the proxy shuts down.
pub fn spawn_sighup(ctx: Arc<Ctx>) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup =
        signal(SignalKind::hangup()).map_err(|e| anyhow::anyhow!("SIGHUP handler: {e}"))?;
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = ctx.shutdown.cancelled() => return,
                s = hup.recv() => if s.is_none() { return },
            }
            let path = ctx.config_path().unwrap_or_default();
            match reload_file(&ctx) {
                Ok(r) => tracing::info!(path = %path.display(), "SIGHUP: reloaded: {r}"),
                Err(e) => tracing::error!(path = %path.display(), "SIGHUP: reload refused: {e}"),
            }
        }
    });
    Ok(())
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
        assert!(needs_restart(&a, &a).is_empty());
        assert_eq!(needs_restart(&a, &b), vec!["site"]);
        assert_eq!(needs_restart(&none, &a), vec!["site"]);
    }
}
