//! Wiring: start upstream tasks, the router, and the listeners.

use crate::config::Config;
use crate::downstream::{self, Ctx};
use crate::router::Router;
use crate::stats::{PoolStats, Registry};
use crate::upstream;
use gridproxy_protocol::sv2::AuthorityKeypair;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// A running proxy.
pub struct Proxy {
    /// Shared context (config, registry, router).
    pub ctx: Arc<Ctx>,
    /// Where the SV1 listener is bound.
    pub sv1_addr: Option<SocketAddr>,
    /// Where the SV2 listener is bound.
    pub sv2_addr: Option<SocketAddr>,
    /// Cancel to stop everything.
    pub shutdown: CancellationToken,
}

impl Proxy {
    /// Start upstreams, router and listeners. Binds before returning, so the
    /// addresses are usable at once (port 0 picks a free port).
    pub async fn start(cfg: Config) -> anyhow::Result<Proxy> {
        let cfg = Arc::new(cfg);
        let shutdown = CancellationToken::new();
        let mut handles = Vec::new();
        let mut stops = Vec::new();
        for (index, pool) in cfg.pools.iter().enumerate() {
            let stop = shutdown.child_token();
            let stats = Arc::new(PoolStats::new(&pool.name));
            handles.push(upstream::spawn(
                index,
                pool,
                &cfg.routing,
                &cfg.extranonce,
                stats,
                stop.clone(),
            ));
            stops.push(stop);
        }
        let router = Router::with_stops(&cfg, handles, stops);
        router.spawn_monitor(shutdown.clone());
        let registry = Arc::new(Registry::default());
        let ctx = Ctx::new(cfg.clone(), registry, router, shutdown.clone());
        let mut sv1_addr = None;
        if let Some(addr) = cfg.listen.sv1 {
            let l = bind(addr).map_err(|e| anyhow::anyhow!("bind sv1 listener {addr}: {e}"))?;
            sv1_addr = Some(l.local_addr()?);
            tokio::spawn(downstream::serve_sv1(ctx.clone(), l));
        }
        let mut sv2_addr = None;
        if let Some(addr) = cfg.listen.sv2 {
            let (Some(public), Some(secret)) = (
                cfg.listen.sv2_authority_pubkey.as_deref(),
                cfg.listen.sv2_authority_secret.as_deref(),
            ) else {
                anyhow::bail!("listen.sv2 needs sv2_authority_pubkey and sv2_authority_secret");
            };
            let authority = AuthorityKeypair::from_strs(public, secret).map_err(|e| {
                anyhow::anyhow!("listen.sv2_authority_pubkey / sv2_authority_secret: {e}")
            })?;
            let l = bind(addr).map_err(|e| anyhow::anyhow!("bind sv2 listener {addr}: {e}"))?;
            sv2_addr = Some(l.local_addr()?);
            tokio::spawn(downstream::serve_sv2(ctx.clone(), l, authority));
        }
        Ok(Proxy {
            ctx,
            sv1_addr,
            sv2_addr,
            shutdown,
        })
    }
}

/// Listen on `addr` with a deep accept queue: a site's miners reconnect all
/// at once after a power event, and the default backlog (1024) drops SYNs.
fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
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
