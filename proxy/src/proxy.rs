//! Wiring: start upstream tasks, the router and the listeners; reconfigure
//! them live; shut them down and wait for every task.

use crate::config::ProxyConfig;
use crate::downstream::{self, Ctx};
use crate::drain::{Drain, Phase, Step};
use crate::error::{ReconfigureError, StartError};
use crate::router::{Reconfigured, Router};
use crate::stats::{PoolStats, Registry};
use crate::upstream;
use futures::FutureExt;
use gridproxy_protocol::sv2::AuthorityKeypair;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::time::{timeout_at, Instant};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// A running proxy engine (a cheap handle: clones share the engine).
#[derive(Clone)]
pub struct Proxy {
    /// Shared context (config, registry, router).
    pub ctx: Arc<Ctx>,
    /// Where the SV1 listener is bound.
    pub sv1_addr: Option<SocketAddr>,
    /// Where the SV2 listener is bound.
    pub sv2_addr: Option<SocketAddr>,
    /// Fires when the proxy stops (cancel it, or call [`Proxy::shutdown`]).
    pub stop: CancellationToken,
}

/// What a reconfiguration changed.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Changes {
    /// Pool changes.
    pub pools: Reconfigured,
    /// Tables whose values changed (`pools`, `routing`, `limits`, `difficulty`).
    pub sections: Vec<&'static str>,
}

impl Proxy {
    /// Start upstreams, router and listeners; everything stops when
    /// `shutdown` fires. Binds before returning, so the addresses are usable
    /// at once (port 0 picks a free port).
    pub async fn start(cfg: ProxyConfig, shutdown: CancellationToken) -> Result<Proxy, StartError> {
        let cfg = Arc::new(cfg);
        let tasks = TaskTracker::new();
        // Check the keys before any task starts: a refused start leaves nothing running.
        let authority = match cfg.listen.sv2 {
            Some(_) => Some(sv2_authority(&cfg)?),
            None => None,
        };
        let upstreams = upstream::Upstreams::default();
        let mut handles = Vec::new();
        let mut stops = Vec::new();
        for (index, pool) in cfg.slots().iter().enumerate() {
            let stop = shutdown.child_token();
            let stats = Arc::new(PoolStats::new(&pool.name));
            handles.push(upstream::spawn(
                index,
                pool,
                &cfg.routing,
                &cfg.extranonce,
                stats,
                stop.clone(),
                &tasks,
                &upstreams,
            ));
            stops.push(stop);
        }
        let router = Router::with_stops(&cfg, handles, stops);
        router.spawn_monitor(shutdown.clone(), &tasks);
        let registry = Arc::new(Registry::new(
            cfg.limits.max_workers,
            Duration::from_secs(cfg.limits.worker_idle_secs),
        ));
        let ctx = Ctx::with_upstreams(
            cfg.clone(),
            registry,
            router,
            shutdown.clone(),
            tasks,
            upstreams,
        );
        let started = async {
            let mut sv1_addr = None;
            if let Some(addr) = cfg.listen.sv1 {
                let l = bind("sv1", addr)?;
                sv1_addr = Some(l.local_addr().map_err(|e| bind_error("sv1", addr, e))?);
                ctx.tasks.spawn(
                    ctx.listeners
                        .track_future(downstream::serve_sv1(ctx.clone(), l)),
                );
            }
            let mut sv2_addr = None;
            if let (Some(addr), Some(authority)) = (cfg.listen.sv2, authority) {
                let l = bind("sv2", addr)?;
                sv2_addr = Some(l.local_addr().map_err(|e| bind_error("sv2", addr, e))?);
                ctx.tasks
                    .spawn(ctx.listeners.track_future(downstream::serve_sv2(
                        ctx.clone(),
                        l,
                        authority,
                    )));
            }
            Ok((sv1_addr, sv2_addr))
        };
        match started.await {
            Ok((sv1_addr, sv2_addr)) => Ok(Proxy {
                ctx,
                sv1_addr,
                sv2_addr,
                stop: shutdown,
            }),
            Err(e) => {
                // A listener failed: stop the upstreams already started.
                shutdown.cancel();
                ctx.tasks.close();
                ctx.tasks.wait().await;
                Err(e)
            }
        }
    }

    /// The tables of `new` that differ from the running configuration and
    /// cannot change live (listeners are bound, miners hold extranonce slots
    /// cut from the layout): [`Proxy::reconfigure`] refuses them whole.
    pub fn needs_restart(&self, new: &ProxyConfig) -> Vec<&'static str> {
        let old = self.ctx.cfg();
        let mut fixed = Vec::new();
        if old.listen != new.listen {
            fixed.push("listen");
        }
        if old.extranonce != new.extranonce {
            fixed.push("extranonce");
        }
        fixed
    }

    /// Put a new configuration in force without dropping a miner: pools
    /// (added, removed, re-addressed), accounts (a miner whose account
    /// changed moves to the new account's upstream on its next job),
    /// priorities and split weights, routing
    /// timings, difficulty (at each channel's next retarget) and limits (the
    /// connection cap at once, per-connection limits for new connections).
    /// Listener addresses and keys and the extranonce layout need a restart
    /// (miners hold slots cut from it): a change to them is refused whole.
    pub fn reconfigure(&self, new: ProxyConfig) -> Result<Changes, ReconfigureError> {
        let ctx = &self.ctx;
        let old = ctx.cfg();
        let fixed = self.needs_restart(&new);
        if !fixed.is_empty() {
            return Err(ReconfigureError::NeedsRestart(fixed));
        }
        new.validate()?;
        let mut sections = Vec::new();
        for (name, changed) in [
            ("pools", old.pools != new.pools),
            ("accounts", old.accounts != new.accounts),
            ("routing", old.routing != new.routing),
            ("limits", old.limits != new.limits),
            ("difficulty", old.difficulty != new.difficulty),
        ] {
            if changed {
                sections.push(name);
            }
        }
        let pools = if ["pools", "accounts", "routing"]
            .iter()
            .any(|s| sections.contains(s))
        {
            let (routing, extranonce) = (new.routing.clone(), new.extranonce.clone());
            ctx.router.reconfigure(&new, |index, pool, stats| {
                let stop = ctx.shutdown.child_token();
                let h = upstream::spawn(
                    index,
                    pool,
                    &routing,
                    &extranonce,
                    stats,
                    stop.clone(),
                    &ctx.tasks,
                    &ctx.upstreams,
                );
                (h, stop)
            })
        } else {
            Reconfigured::default()
        };
        ctx.set_cfg(Arc::new(new));
        Ok(Changes { pools, sections })
    }

    /// Stop accepting, stop every session and upstream, and wait (up to
    /// `grace`) for their tasks to end. Returns whether they all did.
    pub async fn shutdown(&self, grace: Duration) -> bool {
        self.stop.cancel();
        self.ctx.tasks.close();
        tokio::time::timeout(grace, self.ctx.tasks.wait())
            .await
            .is_ok()
    }
}

impl Proxy {
    /// Drain for a restart (see [`crate::drain`]): close the listeners, tell
    /// every miner to reconnect (SV1 `client.reconnect` to the same address,
    /// SV2 `CloseChannel`), answer what they still send, wait for the pool's
    /// answer to every share forwarded, then stop. Bounded by `grace`; fire
    /// [`Proxy::stop`] to stop at once (a second SIGTERM). Returns what was
    /// left undone.
    pub async fn drain(&self, grace: Duration) -> DrainReport {
        let ctx = &self.ctx;
        let mut plan = Drain::new(Instant::now(), grace);
        let unanswered = || -> u64 {
            ctx.router
                .pools()
                .iter()
                .map(|h| h.stats.unanswered.get())
                .sum()
        };
        let unanswered_before = unanswered();
        let miners = ctx.sessions.len();
        ctx.listeners.close();
        ctx.sessions.close();
        ctx.upstreams.tracker.close();
        // The ports first: from here on a new process gets every connection,
        // so a miner told to leave cannot come back here.
        ctx.closing.cancel();
        let _ = timeout_at(plan.deadline(), ctx.listeners.wait()).await;
        ctx.draining.cancel();
        tracing::info!(
            miners,
            ?grace,
            "draining: listeners closed, miners told to reconnect"
        );
        let mut cut = 0;
        let outcome = loop {
            let step = plan.next(
                Instant::now(),
                ctx.sessions.len(),
                ctx.upstreams.tracker.len(),
            );
            let wait = match step {
                Step::WaitMiners(until) => timeout_at(until, ctx.sessions.wait()).map(drop).boxed(),
                Step::CutMiners => {
                    cut = ctx.sessions.len();
                    ctx.session_stop.cancel();
                    ctx.sessions.wait().boxed()
                }
                Step::WaitPools(until) => {
                    // No session is left, so no share can arrive any more.
                    ctx.upstreams.drain.cancel();
                    timeout_at(until, ctx.upstreams.tracker.wait())
                        .map(drop)
                        .boxed()
                }
                Step::Finish => break Phase::Done,
                Step::GiveUp => break Phase::OutOfTime,
            };
            tokio::select! {
                _ = self.stop.cancelled() => break plan.phase(),
                _ = wait => {}
            }
        };
        let lost = unanswered() - unanswered_before;
        let report = DrainReport {
            complete: outcome == Phase::Done && !self.stop.is_cancelled() && lost == 0,
            unanswered: lost,
            miners_cut: cut,
            sessions_left: ctx.sessions.len(),
            upstreams_left: ctx.upstreams.tracker.len(),
        };
        // Whatever is left (and the router's monitor, the fan-out tasks) stops now.
        self.stop.cancel();
        ctx.tasks.close();
        let _ = tokio::time::timeout(Duration::from_secs(1), ctx.tasks.wait()).await;
        report
    }
}

/// What a drain left undone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DrainReport {
    /// Every miner left and every forwarded share had its answer in time.
    pub complete: bool,
    /// Sessions cut off because their miners did not leave in time.
    pub miners_cut: usize,
    /// Sessions still open when the drain stopped.
    pub sessions_left: usize,
    /// Upstreams still owed answers (or unsent shares) when it stopped.
    pub upstreams_left: usize,
    /// Shares forwarded whose answer never came (the pool went away or
    /// silent during the drain).
    pub unanswered: u64,
}

fn sv2_authority(cfg: &ProxyConfig) -> Result<AuthorityKeypair, StartError> {
    let secret = cfg
        .listen
        .authority_secret()
        .map_err(|e| StartError::SecretFile(e.message))?;
    let (Some(public), Some(secret)) = (cfg.listen.sv2_authority_pubkey.as_deref(), secret) else {
        return Err(StartError::NoAuthority);
    };
    AuthorityKeypair::from_strs(public, &secret).map_err(StartError::Authority)
}

fn bind_error(what: &'static str, addr: SocketAddr, source: std::io::Error) -> StartError {
    StartError::Bind { what, addr, source }
}

/// Listen on `addr` with a deep accept queue: a site's miners reconnect all
/// at once after a power event, and the default backlog (1024) drops SYNs.
/// `SO_REUSEPORT` lets a restarted gridproxy take the port over while the
/// old one drains.
pub fn bind(what: &'static str, addr: SocketAddr) -> Result<TcpListener, StartError> {
    let listen = || {
        let socket = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        // A new process binds the same port while this one drains (its
        // listeners close first thing). Two live instances on one port
        // split new connections between them.
        #[cfg(unix)]
        socket.set_reuseport(true)?;
        socket.bind(addr)?;
        socket.listen(LISTEN_BACKLOG)
    };
    listen().map_err(|e| bind_error(what, addr, e))
}

/// Accept queue length asked of the kernel (capped by net.core.somaxconn).
const LISTEN_BACKLOG: u32 = 4096;

/// One line: miners, per-pool state and share counts.
pub fn status_line(p: &Proxy) -> String {
    let mut s = format!("miners={}", p.ctx.slots_in_use());
    let pools = p.ctx.router.pools();
    for (share, h) in p.ctx.router.shares().iter().zip(pools.iter()) {
        if share.retired {
            continue;
        }
        s.push_str(&format!(
            " | {}: {} miners={} sent={} acked={} rejected={}",
            h.stats.name,
            if share.live { "up" } else { "down" },
            share.miners,
            h.stats.submitted.get(),
            h.stats.accepted.get(),
            h.stats.rejected.get()
        ));
    }
    s
}
