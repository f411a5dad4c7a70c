//! Downstream listeners: accept miners, cap connections, one task each.

pub mod sv1;

use crate::config::Config;
use crate::router::Router;
use crate::stats::Registry;
use gridproxy_protocol::extranonce::{ExtranonceAllocator, ExtranonceError, Slot};
use std::sync::{Arc, Mutex};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// What every miner session shares.
pub struct Ctx {
    /// Configuration.
    pub cfg: Arc<Config>,
    /// Worker stats.
    pub registry: Arc<Registry>,
    /// Pool assignment.
    pub router: Arc<Router>,
    /// Proxy-wide miner extranonce parts (locked on subscribe/disconnect only).
    slots: Mutex<ExtranonceAllocator>,
    /// Fires on shutdown.
    pub shutdown: CancellationToken,
}

impl Ctx {
    /// Build the shared context.
    pub fn new(
        cfg: Arc<Config>,
        registry: Arc<Registry>,
        router: Arc<Router>,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        let en = &cfg.extranonce;
        let alloc = ExtranonceAllocator::new(
            vec![],
            en.miner_bytes + en.extranonce2_size,
            en.miner_bytes,
            en.extranonce2_size,
        )
        .expect("config validation keeps the split consistent");
        Arc::new(Self {
            cfg,
            registry,
            router,
            slots: Mutex::new(alloc),
            shutdown,
        })
    }

    /// A unique miner part.
    pub fn allocate_slot(&self) -> Result<Slot, ExtranonceError> {
        self.slots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .allocate()
    }

    /// Give a miner part back.
    pub fn release_slot(&self, slot: &Slot) {
        self.slots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .release(slot)
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
    let limit = Arc::new(Semaphore::new(ctx.cfg.limits.max_connections));
    info!(addr = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(), "sv1 listener up");
    loop {
        let (stream, peer) = tokio::select! {
            _ = ctx.shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            warn!(%peer, max = ctx.cfg.limits.max_connections, "connection limit reached; closing");
            drop(stream);
            continue;
        };
        let ctx = ctx.clone();
        tokio::spawn(async move {
            sv1::serve(ctx, stream, peer).await;
            drop(permit);
        });
    }
}
