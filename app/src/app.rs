//! The application: the proxy engine, the control API and the site, started
//! from one [`Config`] and stopped together. `gridproxy run` and the
//! end-to-end tests start it the same way.

use crate::api::{self, ApiServer};
use crate::config::Config;
use crate::reload::Reloader;
use crate::site::handle::SiteHandle;
use crate::site::{self, SiteRun};
use gridproxy_proxy::Proxy;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// How to start an [`App`] beyond its configuration.
#[derive(Debug, Clone, Default)]
pub struct AppOptions {
    /// The file the configuration came from (what a reload re-reads).
    pub config_path: Option<PathBuf>,
    /// Reload the file on SIGHUP.
    pub sighup: bool,
}

/// A running gridproxy.
pub struct App {
    /// The proxy engine.
    pub proxy: Proxy,
    /// The control API, when `[api] listen` is set.
    pub api: Option<ApiServer>,
    /// The curtailment engine and its sources, when `[site]` is set.
    pub site: Option<SiteRun>,
    /// The site view the API serves.
    pub site_handle: Arc<SiteHandle>,
    /// Hot reload.
    pub reloader: Arc<Reloader>,
    /// One line per part started (for the operator).
    pub started: Vec<String>,
}

impl App {
    /// Start the engine, then the API, then the site. A part that fails to
    /// start stops what was started before it.
    pub async fn start(cfg: Config, opts: AppOptions) -> anyhow::Result<App> {
        let stop = CancellationToken::new();
        let proxy = Proxy::start(cfg.proxy(), stop.clone()).await?;
        let mut started = Vec::new();
        if let Some(a) = proxy.sv1_addr {
            started.push(format!("SV1 miners -> {a}"));
        }
        if let Some(a) = proxy.sv2_addr {
            started.push(format!("SV2 miners -> {a}"));
        }
        let (api_cfg, site_cfg) = (cfg.api.clone(), cfg.site.clone());
        let reloader = Reloader::new(proxy.clone(), cfg, opts.config_path);
        let site_handle = SiteHandle::new();
        let fail = |proxy: Proxy, e: anyhow::Error| async move {
            proxy.shutdown(Duration::from_secs(5)).await;
            Err(e)
        };
        let mut api = None;
        if api_cfg.listen.is_some() {
            let r = api::start(
                proxy.ctx.clone(),
                site_handle.clone(),
                Some(reloader.clone()),
                &api_cfg,
                None,
                stop.clone(),
            )
            .await;
            match r {
                Ok(s) => {
                    started.push(format!(
                        "dashboard and control API -> http://{}/ (metrics: /metrics)",
                        s.addr
                    ));
                    api = Some(s);
                }
                Err(e) => return fail(proxy, e.context("[api]")).await,
            }
        }
        let mut running = None;
        if let Some(s) = &site_cfg {
            let latency = api.as_ref().map(|a| a.metrics.latency_sink());
            let router = proxy.ctx.router.clone();
            let r = match &s.lease {
                Some(l) => {
                    site::lease::supervise(s, l, router, site_handle.clone(), latency, stop.clone())
                        .await
                        .map(|(r, line)| (SiteRun::Leased(r), vec![line]))
                }
                None => site::start(s, router, site_handle.clone(), latency, stop.clone(), None)
                    .await
                    .map(|r| {
                        let lines = r.started.clone();
                        (SiteRun::Direct(r), lines)
                    }),
            };
            match r {
                Ok((r, lines)) => {
                    started.extend(lines);
                    running = Some(r);
                }
                Err(e) => return fail(proxy, e.context("[site]")).await,
            }
        }
        if opts.sighup {
            reloader.spawn_sighup()?;
        }
        Ok(App {
            proxy,
            api,
            site: running,
            site_handle,
            reloader,
            started,
        })
    }

    /// The control API's address, when it runs.
    pub fn api_addr(&self) -> Option<SocketAddr> {
        self.api.as_ref().map(|a| a.addr)
    }

    /// Drain for a restart (SIGTERM in `gridproxy run`): the engine closes
    /// its listeners, tells miners to reconnect and waits for the pool's
    /// answer to every forwarded share, up to `grace` (fire
    /// `proxy.stop` to cut it short); then the site stops, answers to
    /// commands in flight awaited, so the ledger is complete. The site keeps
    /// running while the miners move.
    pub async fn drain(self, grace: Duration) -> gridproxy_proxy::proxy::DrainReport {
        let report = self.proxy.drain(grace).await;
        if let Some(s) = self.site {
            s.stop().await;
        }
        report
    }

    /// Stop the site first (answers to commands in flight are awaited, so
    /// the ledger is complete), then the engine, waiting for its tasks.
    pub async fn stop(self) {
        if let Some(s) = self.site {
            s.stop().await;
        }
        if !self.proxy.shutdown(Duration::from_secs(5)).await {
            tracing::warn!("proxy tasks still running 5 s after shutdown");
        }
    }
}
