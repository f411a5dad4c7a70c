//! Downstream listeners: accept miners, cap connections, one task each.
//!
//! - [`channel`]: the protocol-neutral per-channel core (jobs, validation, vardiff, pool switch).
//! - [`sv1`]: one SV1 connection = one channel.
//! - [`sv2`]: one SV2 connection (Noise) with any number of standard / extended channels.
//! - [`group`]: the group channels of one SV2 connection (sans-IO).

pub mod channel;
pub mod group;
pub mod sv1;
pub mod sv2;

use crate::config::ProxyConfig;
use crate::router::Router;
use crate::stats::{Counter, Registry};
use arc_swap::ArcSwap;
use futures::FutureExt;
use gridproxy_protocol::extranonce::{ExtranonceAllocator, ExtranonceError, Slot};
use gridproxy_protocol::sv2::AuthorityKeypair;
use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

/// What every miner session shares.
pub struct Ctx {
    /// Configuration; swapped whole by a reload (sessions read it when they
    /// need a setting, so new values reach them without a reconnect).
    cfg: ArcSwap<ProxyConfig>,
    /// Worker stats.
    pub registry: Arc<Registry>,
    /// Pool assignment.
    pub router: Arc<Router>,
    /// Proxy-wide miner extranonce parts (locked on subscribe/disconnect only).
    slots: Mutex<ExtranonceAllocator>,
    /// Downstream connections (SV1 and SV2 together) up to `limits.max_connections`.
    connections: Arc<Semaphore>,
    /// Permits the semaphore was sized for (a reload adds or forgets the difference).
    max_connections: AtomicUsize,
    /// Fires on shutdown.
    pub shutdown: CancellationToken,
    /// Every task the engine spawns (listeners, sessions, upstreams), so a
    /// shutdown can wait for them to finish.
    pub tasks: TaskTracker,
    /// The fan-out gate: SV1 sessions write a new job's notify one gate turn
    /// at a time. A new template wakes every session at once; with 19k of
    /// them the sends took both cores for ~0.9 s and shares queued behind
    /// them (p99 0.66 s). Through the gate the fan-out uses at most half the
    /// cores and shares keep flowing on the rest.
    pub fanout: Arc<Semaphore>,
    /// Connections per source address (entries removed at zero, so the map
    /// holds at most one entry per connection).
    per_ip: Arc<Mutex<HashMap<IpAddr, usize>>>,
    /// How often each limit refused or cut something.
    pub trips: Arc<LimitTrips>,
    /// New block → each miner's write of its job (`/metrics`:
    /// `gridproxy_job_fanout_seconds`).
    pub fanout_seconds: Arc<crate::stats::FanoutHistogram>,
    /// Fires when a drain starts: the listeners close and every session
    /// tells its miner to leave (see [`crate::drain`]).
    pub draining: CancellationToken,
    /// Fires first in a drain: the listeners (and the control API) close,
    /// so no miner told to leave can land on this process again.
    pub closing: CancellationToken,
    /// Ends the miner sessions (a child of `shutdown`; a drain fires it
    /// alone when miners overstay, so the upstreams keep running).
    pub session_stop: CancellationToken,
    /// The listener tasks (a drain waits for them: the ports are closed
    /// once they end).
    pub listeners: TaskTracker,
    /// The miner sessions (a drain waits for them to end).
    pub sessions: TaskTracker,
    /// The upstream tasks and their drain signal.
    pub upstreams: crate::upstream::Upstreams,
}

/// Counters of the limits that tripped, for `/metrics`.
#[derive(Debug, Default)]
pub struct LimitTrips {
    /// Connections closed at accept: `limits.max_connections` reached.
    pub connections: Counter,
    /// Connections closed at accept: `limits.max_connections_per_ip` reached.
    pub connections_per_ip: Counter,
    /// SV1 connections closed for `limits.requests_per_second`.
    pub request_flood: Counter,
    /// Connections closed for `limits.submits_per_second`.
    pub submit_flood: Counter,
    /// SV2 channel opens refused: `limits.max_channels_per_connection`.
    pub channels: Counter,
    /// SV2 channel opens refused: `limits.channel_opens_per_second`.
    pub channel_opens: Counter,
    /// Connections closed for `limits.max_reject_ratio`.
    pub reject_ratio: Counter,
    /// Read turns cut at the per-turn read budget (a fast sender yields to
    /// the other sessions on its thread).
    pub read_budget: Counter,
}

/// One connection counted against its source address; uncounted on drop.
pub struct IpSlot {
    map: Arc<Mutex<HashMap<IpAddr, usize>>>,
    ip: IpAddr,
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut m = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = m.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.ip);
            }
        }
    }
}

/// A session's turn at [`Ctx::fanout`].
pub type FanoutTurn = tokio::sync::OwnedSemaphorePermit;

/// Sessions writing a new job at once: as configured, else half the cores.
fn fanout_turns(configured: usize) -> usize {
    if configured > 0 {
        return configured.min(Semaphore::MAX_PERMITS);
    }
    std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).max(1))
}

impl Ctx {
    /// Build the shared context.
    pub fn new(
        cfg: Arc<ProxyConfig>,
        registry: Arc<Registry>,
        router: Arc<Router>,
        shutdown: CancellationToken,
        tasks: TaskTracker,
    ) -> Arc<Self> {
        let upstreams = crate::upstream::Upstreams::default();
        Self::with_upstreams(cfg, registry, router, shutdown, tasks, upstreams)
    }

    /// Build the shared context around upstreams already spawned into `upstreams`.
    pub fn with_upstreams(
        cfg: Arc<ProxyConfig>,
        registry: Arc<Registry>,
        router: Arc<Router>,
        shutdown: CancellationToken,
        tasks: TaskTracker,
        upstreams: crate::upstream::Upstreams,
    ) -> Arc<Self> {
        let max_connections = cfg.limits.max_connections;
        let notify_writers = cfg.limits.notify_writers;
        let en = &cfg.extranonce;
        let alloc = ExtranonceAllocator::new(
            vec![],
            en.miner_bytes + en.extranonce2_size,
            en.miner_bytes,
            en.extranonce2_size,
        )
        .expect("config validation keeps the split consistent");
        Arc::new(Self {
            cfg: ArcSwap::new(cfg),
            registry,
            router,
            slots: Mutex::new(alloc),
            connections: Arc::new(Semaphore::new(max_connections)),
            max_connections: AtomicUsize::new(max_connections),
            fanout: Arc::new(Semaphore::new(fanout_turns(notify_writers))),
            per_ip: Arc::new(Mutex::new(HashMap::new())),
            trips: Arc::new(LimitTrips::default()),
            fanout_seconds: Arc::default(),
            draining: CancellationToken::new(),
            closing: CancellationToken::new(),
            session_stop: shutdown.child_token(),
            shutdown,
            tasks,
            listeners: TaskTracker::new(),
            sessions: TaskTracker::new(),
            upstreams,
        })
    }

    /// The configuration in force now.
    pub fn cfg(&self) -> Arc<ProxyConfig> {
        self.cfg.load_full()
    }

    /// Put `cfg` in force for every session (see [`crate::proxy::ProxyHandle::reconfigure`]), and
    /// resize the connection cap. Lowering the cap never drops a miner: it
    /// only stops new ones until enough have left.
    pub fn set_cfg(&self, cfg: Arc<ProxyConfig>) {
        self.registry.set_limits(
            cfg.limits.max_workers,
            std::time::Duration::from_secs(cfg.limits.worker_idle_secs),
        );
        let want = cfg.limits.max_connections;
        let had = self.max_connections.swap(want, Relaxed);
        if want > had {
            self.connections.add_permits(want - had);
        } else if want < had {
            let forgotten = self.connections.forget_permits(had - want);
            if forgotten < had - want {
                // The rest are held by connected miners: forget them as they return.
                let debt = had - want - forgotten;
                let sem = self.connections.clone();
                let stop = self.shutdown.clone();
                self.tasks.spawn(async move {
                    for _ in 0..debt {
                        tokio::select! {
                            _ = stop.cancelled() => return,
                            p = sem.acquire() => match p {
                                Ok(p) => p.forget(),
                                Err(_) => return,
                            },
                        }
                    }
                });
            }
        }
        self.cfg.store(cfg);
    }

    /// A unique miner part.
    pub fn allocate_slot(&self) -> Result<Slot, ExtranonceError> {
        self.slots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .allocate(std::time::Instant::now())
    }

    /// Give a miner part back.
    pub fn release_slot(&self, slot: &Slot) {
        self.slots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .release(slot, std::time::Instant::now())
    }

    /// Count a connection from `ip`, unless it already has `max`.
    pub fn admit_ip(&self, ip: IpAddr, max: usize) -> Option<IpSlot> {
        let mut m = self.per_ip.lock().unwrap_or_else(|e| e.into_inner());
        let n = m.entry(ip).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(IpSlot {
            map: self.per_ip.clone(),
            ip,
        })
    }

    /// Miners holding a slot now.
    pub fn slots_in_use(&self) -> u64 {
        self.slots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .in_use()
    }
}

/// Accept SV1 miners until shutdown. Connections past the limit are closed at once.
pub async fn serve_sv1(ctx: Arc<Ctx>, listener: TcpListener) {
    accept_loop(ctx, listener, "sv1", sv1::serve).await
}

/// Accept SV2 miners (Noise, certified by `authority`) until shutdown.
/// Connections past the limit are closed at once.
pub async fn serve_sv2(ctx: Arc<Ctx>, listener: TcpListener, authority: AuthorityKeypair) {
    let authority = Arc::new(authority);
    accept_loop(ctx, listener, "sv2", move |ctx, stream, peer| {
        sv2::serve(ctx, stream, peer, authority.clone())
    })
    .await
}

async fn accept_loop<F, Fut>(ctx: Arc<Ctx>, listener: TcpListener, kind: &'static str, serve: F)
where
    F: Fn(Arc<Ctx>, TcpStream, SocketAddr) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let addr = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    info!(%addr, "{kind} listener up");
    loop {
        let (stream, peer) = tokio::select! {
            _ = ctx.shutdown.cancelled() => return,
            _ = ctx.closing.cancelled() => {
                // Connections the kernel already completed would be reset
                // with the socket: take them (their sessions tell the miner
                // to reconnect at once), then drop the listener, so the
                // port is the new process's alone.
                let mut taken = 0usize;
                while let Some(Ok((stream, peer))) = listener.accept().now_or_never() {
                    admit(&ctx, stream, peer, &serve);
                    taken += 1;
                }
                info!(%addr, queued = taken, "{kind} listener closed for the drain");
                return;
            }
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    warn!(error = %e, "{kind} accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        admit(&ctx, stream, peer, &serve);
    }
}

/// Start a session for an accepted connection, or close it past a limit.
fn admit<F, Fut>(ctx: &Arc<Ctx>, stream: TcpStream, peer: SocketAddr, serve: &F)
where
    F: Fn(Arc<Ctx>, TcpStream, SocketAddr) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let per_ip = ctx.cfg().limits.max_connections_per_ip;
    let Some(ip_slot) = ctx.admit_ip(peer.ip(), per_ip) else {
        ctx.trips.connections_per_ip.inc();
        let n = ctx.trips.connections_per_ip.get();
        // One line per power of two: a flood does not flood the log.
        if n.is_power_of_two() {
            warn!(%peer, max = per_ip, refused = n, "per-address connection limit reached; closing");
        }
        drop(stream);
        return;
    };
    let Ok(permit) = ctx.connections.clone().try_acquire_owned() else {
        ctx.trips.connections.inc();
        let n = ctx.trips.connections.get();
        if n.is_power_of_two() {
            warn!(%peer, max = ctx.cfg().limits.max_connections, refused = n, "connection limit reached; closing");
        }
        drop(stream);
        return;
    };
    // `map`, not an async block around the future: a block would hold the
    // session future twice (as a capture and as the awaited value), doubling
    // the largest per-miner allocation.
    let session = serve(ctx.clone(), stream, peer).map(move |()| drop((permit, ip_slot)));
    ctx.tasks.spawn(ctx.sessions.track_future(session));
}
