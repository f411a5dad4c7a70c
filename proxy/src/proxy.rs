//! Wiring: start upstream tasks, the router, and the listeners.

use crate::config::{Config, PoolProtocol};
use crate::downstream::{self, Ctx};
use crate::router::Router;
use crate::stats::{PoolStats, Registry};
use crate::upstream::{self, sv1::Sv1Upstream, sv2::Sv2Upstream, PoolHandle};
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
        for (index, pool) in cfg.pools.iter().enumerate() {
            let stats = Arc::new(PoolStats::new(&pool.name));
            let (vtx, vrx, srx) = upstream::channels();
            let stop = shutdown.clone();
            match pool.protocol {
                PoolProtocol::Sv2 => {
                    let up = Sv2Upstream {
                        pool: pool.clone(),
                        routing: cfg.routing.clone(),
                        extranonce: cfg.extranonce.clone(),
                        stats: stats.clone(),
                    };
                    tokio::spawn(up.run(vtx, srx, stop));
                }
                PoolProtocol::Sv1 => {
                    let up = Sv1Upstream {
                        pool: pool.clone(),
                        routing: cfg.routing.clone(),
                        extranonce: cfg.extranonce.clone(),
                        stats: stats.clone(),
                    };
                    tokio::spawn(up.run(vtx, srx, stop));
                }
            }
            handles.push(PoolHandle {
                index,
                stats,
                view: vrx,
            });
        }
        let router = Router::new(&cfg, handles);
        router.spawn_monitor(shutdown.clone());
        let registry = Arc::new(Registry::default());
        let ctx = Ctx::new(cfg.clone(), registry, router, shutdown.clone());
        let mut sv1_addr = None;
        if let Some(addr) = cfg.listen.sv1 {
            let l = TcpListener::bind(addr)
                .await
                .map_err(|e| anyhow::anyhow!("bind sv1 listener {addr}: {e}"))?;
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
            let l = TcpListener::bind(addr)
                .await
                .map_err(|e| anyhow::anyhow!("bind sv2 listener {addr}: {e}"))?;
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

/// One line: miners, per-pool state and share counts.
pub fn status_line(p: &Proxy) -> String {
    let mut s = format!("miners={}", p.ctx.slots_in_use());
    for (share, h) in p.ctx.router.shares().iter().zip(p.ctx.router.pools()) {
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
