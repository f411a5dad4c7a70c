//! The control API, `/metrics` and the dashboard, served by axum on one
//! listener (127.0.0.1 unless configured otherwise).
//!
//! - [`config`]: the `[api]` config section (listen address, bearer tokens
//!   with `read` / `operate` roles, metric cardinality).
//! - [`site`]: what a curtailment driver publishes (site kW, target, price,
//!   DR events, per-miner state) and the commands it accepts.
//! - [`live`]: sampled rates and the history behind the dashboard's plots.
//! - [`client`] (from [`crate::http`]): a minimal HTTP/1.1 client for `gridproxy status`, peer pushes and tests.
//!
//! Routes (see `GET /api/v1/openapi.json`):
//!
//! | route | auth |
//! |---|---|
//! | `GET /`, `/app.js` (dashboard), `/healthz` (503 with reasons when the site's driver stopped or its ledger fails), `/api/v1/openapi.json` | none |
//! | `GET /metrics` | none when `metrics_public` (default: on a loopback listener only), else `read` |
//! | `GET /api/v1/{whoami,fleet,workers,pools,accounts,events,history,ledger}` | `read` |
//! | `POST /api/v1/curtail`, `POST /api/v1/reload`, `POST /api/v1/site/parks` (pushed by the active instance, `[[site.peers]]`) | `operate` |
//!
//! A missing or unknown token gets 401, a `read` token on an `operate`
//! route 403.

pub mod live;

/// The HTTP client and TLS setup live in [`crate::http`] (the site's peer
/// pushes use them too); here under their old paths.
pub use crate::http::{client, tls};

use crate::config::api::{ApiConfig, Role, Token};
use crate::metrics::Metrics;
use crate::reload::{ReloadError, Reloader};
use crate::site::handle::{DrEventView, LogEntry, SiteCommand, SiteHandle, SiteState};
use axum::extract::{DefaultBodyLimit, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use gridproxy_proxy::downstream::Ctx;
use live::Live;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

const INDEX_HTML: &str = include_str!("../../assets/index.html");
const APP_JS: &str = include_str!("../../assets/app.js");
const OPENAPI_JSON: &str = include_str!("../../assets/openapi.json");

/// Largest accepted request body.
pub const MAX_BODY: usize = 16 * 1024;

/// Everything a handler needs.
pub struct ApiState {
    /// The proxy.
    pub ctx: Arc<Ctx>,
    /// The site side (may have no driver attached).
    pub site: Arc<SiteHandle>,
    /// Hot reload from the configuration file.
    pub reloader: Option<Arc<Reloader>>,
    /// Rates and history.
    pub live: Arc<Live>,
    /// Prometheus metrics.
    pub metrics: Arc<Metrics>,
    tokens: Vec<Token>,
    metrics_public: bool,
}

/// A running API server.
#[derive(Debug, Clone)]
pub struct ApiServer {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Metrics (to record command latencies into).
    pub metrics: Arc<Metrics>,
    /// Sampled rates and history.
    pub live: Arc<Live>,
}

/// Bind `cfg.listen` (or `listen` when given) and serve until `shutdown`.
/// `reloader` serves `POST /api/v1/reload` (refused without one).
pub async fn start(
    ctx: Arc<Ctx>,
    site: Arc<SiteHandle>,
    reloader: Option<Arc<Reloader>>,
    cfg: &ApiConfig,
    listen: Option<SocketAddr>,
    shutdown: CancellationToken,
) -> anyhow::Result<ApiServer> {
    let addr = listen
        .or(cfg.listen)
        .ok_or_else(|| anyhow::anyhow!("api.listen is not set"))?;
    let tokens = cfg.resolve_tokens().map_err(|e| anyhow::anyhow!(e))?;
    if tokens.is_empty() {
        warn!("control API has no tokens: every /api/v1 call will get 401");
    }
    // SO_REUSEPORT as the miner ports: a restarted gridproxy binds while
    // this one drains (and this one closes the port when its drain starts).
    let listener =
        gridproxy_proxy::proxy::bind("control API", addr).map_err(anyhow::Error::from)?;
    let addr = listener.local_addr()?;
    let live = Live::new(1800);
    let every = Duration::from_secs(cfg.sample_secs.max(1));
    live.sample(&ctx, &site);
    live.spawn(ctx.clone(), site.clone(), every, shutdown.clone());
    let metrics = Arc::new(Metrics::new(cfg.metrics_max_workers));
    let state_draining = ctx.closing.clone();
    let state = Arc::new(ApiState {
        ctx,
        site,
        reloader,
        live: live.clone(),
        metrics: metrics.clone(),
        tokens,
        metrics_public: cfg.metrics_public_on(addr),
    });
    let app = router(state);
    let acceptor = match (&cfg.tls_cert, &cfg.tls_key) {
        (Some(cert), Some(key)) => {
            let a = tls::acceptor(cert, key).map_err(|e| anyhow::anyhow!("api TLS: {e}"))?;
            info!(%addr, "control API and dashboard up (HTTPS)");
            Some(a)
        }
        _ => {
            if !addr.ip().is_loopback() {
                warn!(%addr, "control API on a non-loopback address without TLS: tokens travel in clear");
            }
            info!(%addr, "control API and dashboard up");
            None
        }
    };
    let limits = ConnLimits {
        max: cfg.max_connections,
        header_timeout: Duration::from_secs(cfg.header_timeout_secs),
    };
    let closing = state_draining.clone();
    tokio::spawn(serve(listener, acceptor, app, limits, shutdown, closing));
    Ok(ApiServer {
        addr,
        metrics,
        live,
    })
}

/// Bounds on the control API's connections.
#[derive(Clone, Copy)]
struct ConnLimits {
    /// Connections served at once; more are closed on accept.
    max: usize,
    /// Time a client has to send a request's headers (TLS handshake too).
    header_timeout: Duration,
}

/// One task per connection, at most `limits.max` at once: a TLS handshake
/// when `acceptor` is set, then HTTP/1.1 through hyper into the router, with
/// a header-read timeout so a slow client cannot hold a slot.
async fn serve(
    listener: TcpListener,
    acceptor: Option<tokio_rustls::TlsAcceptor>,
    app: Router,
    limits: ConnLimits,
    shutdown: CancellationToken,
    draining: CancellationToken,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max.max(1)));
    let mut refused: u64 = 0;
    loop {
        let (tcp, peer) = tokio::select! {
            _ = shutdown.cancelled() => return,
            // A drain hands the port to the new process; requests already
            // accepted are still served.
            _ = draining.cancelled() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    warn!(error = %e, "control API accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            refused += 1;
            if refused.is_power_of_two() {
                warn!(%peer, refused, max = limits.max, "control API connection cap reached: connection closed");
            }
            drop(tcp);
            continue;
        };
        let (acceptor, app, stop) = (acceptor.clone(), app.clone(), shutdown.clone());
        tokio::spawn(async move {
            let _permit = permit;
            match acceptor {
                Some(acceptor) => {
                    let tls =
                        match tokio::time::timeout(limits.header_timeout, acceptor.accept(tcp))
                            .await
                        {
                            Ok(Ok(s)) => s,
                            Ok(Err(e)) => {
                                return debug!(%peer, error = %e, "control API TLS handshake failed")
                            }
                            Err(_) => return debug!(%peer, "control API TLS handshake timed out"),
                        };
                    serve_conn(tls, app, limits, peer, stop).await
                }
                None => serve_conn(tcp, app, limits, peer, stop).await,
            }
        });
    }
}

async fn serve_conn<S>(
    io: S,
    app: Router,
    limits: ConnLimits,
    peer: SocketAddr,
    stop: CancellationToken,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    use hyper_util::rt::{TokioIo, TokioTimer};
    use hyper_util::service::TowerToHyperService;
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .serve_connection(TokioIo::new(io), TowerToHyperService::new(app));
    tokio::pin!(conn);
    tokio::select! {
        _ = stop.cancelled() => conn.as_mut().graceful_shutdown(),
        r = conn.as_mut() => {
            if let Err(e) = r {
                debug!(%peer, error = %e, "control API connection ended");
            }
            return;
        }
    }
    // Let a request in progress finish, briefly.
    let _ = tokio::time::timeout(Duration::from_secs(5), conn).await;
}

/// The axum router (exposed for in-process tests).
pub fn router(state: Arc<ApiState>) -> Router {
    let read = Router::new()
        .route("/api/v1/whoami", get(whoami))
        .route("/api/v1/fleet", get(fleet))
        .route("/api/v1/workers", get(workers))
        .route("/api/v1/pools", get(pools))
        .route("/api/v1/accounts", get(accounts))
        .route("/api/v1/events", get(events))
        .route("/api/v1/history", get(history))
        .route("/api/v1/ledger", get(ledger_export))
        .route("/api/v1/curtail", post(curtail))
        .route("/api/v1/reload", post(reload))
        .route(
            "/api/v1/site/parks",
            post(site_parks).layer(DefaultBodyLimit::max(crate::site::parks::MAX_BODY)),
        )
        .route_layer(middleware::from_fn_with_state(state.clone(), auth));
    Router::new()
        .route("/", get(index))
        .route("/index.html", get(index))
        .route("/app.js", get(app_js))
        .route("/healthz", get(healthz))
        .route("/api/v1/openapi.json", get(openapi))
        .route("/metrics", get(metrics_handler))
        .merge(read)
        .fallback(|| async { err(StatusCode::NOT_FOUND, "no such route") })
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(state)
}

/// `GET /healthz`: 200 `ok` when nothing is known wrong; 503 with the
/// reasons, one per line, when the curtailment driver has stopped or its
/// ledger cannot be written (a deaf or unrecorded engine is not healthy).
async fn healthz(State(st): State<Arc<ApiState>>) -> Response {
    let problems = health_problems(&st.site.state());
    if problems.is_empty() {
        (StatusCode::OK, "ok\n").into_response()
    } else {
        let mut body = problems.join("\n");
        body.push('\n');
        (StatusCode::SERVICE_UNAVAILABLE, body).into_response()
    }
}

/// What is wrong with the site, for `/healthz` (empty: healthy).
pub fn health_problems(site: &SiteState) -> Vec<String> {
    let mut v = Vec::new();
    if !site.attached {
        return v;
    }
    if !site.driver_running {
        v.push("curtailment driver stopped: the site no longer follows the grid".to_string());
    }
    if let Some(e) = &site.ledger.error {
        v.push(format!(
            "ledger writes failing for {} s{}: {e}",
            site.ledger.failing_secs.unwrap_or(0),
            if site.ledger.fault_engaged {
                " (site in its ledger-fault safe state, commands unrecorded)"
            } else {
                " (retrying; commands wait)"
            }
        ));
    }
    v
}

fn err(code: StatusCode, msg: impl Into<String>) -> Response {
    (code, Json(json!({ "error": msg.into() }))).into_response()
}

/// An error answer: status and message (401s carry a Bearer challenge).
#[derive(Debug)]
pub struct ApiError {
    code: StatusCode,
    msg: String,
}

impl ApiError {
    fn new(code: StatusCode, msg: impl Into<String>) -> Self {
        Self {
            code,
            msg: msg.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = err(self.code, self.msg);
        if self.code == StatusCode::UNAUTHORIZED {
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"gridproxy\""),
            );
        }
        r
    }
}

/// The caller, once authenticated.
#[derive(Debug, Clone)]
pub struct Caller {
    /// Token holder.
    pub name: String,
    /// Role.
    pub role: Role,
}

/// Constant-time comparison (length leaks, content does not).
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

fn authenticate(st: &ApiState, headers: &HeaderMap) -> Result<Caller, ApiError> {
    let unauthorized = |m: &str| ApiError::new(StatusCode::UNAUTHORIZED, m);
    let Some(presented) = bearer(headers) else {
        return Err(unauthorized(
            "missing bearer token (Authorization: Bearer <token>)",
        ));
    };
    let mut found = None;
    for t in &st.tokens {
        if same(t.secret.as_bytes(), presented.as_bytes()) {
            found = Some(t);
        }
    }
    found
        .map(|t| Caller {
            name: t.name.clone(),
            role: t.role,
        })
        .ok_or_else(|| unauthorized("unknown token"))
}

async fn auth(State(st): State<Arc<ApiState>>, mut req: Request, next: Next) -> Response {
    let need = if req.method() == Method::GET || req.method() == Method::HEAD {
        Role::Read
    } else {
        Role::Operate
    };
    let caller = match authenticate(&st, req.headers()) {
        Ok(c) => c,
        Err(e) => return e.into_response(),
    };
    if caller.role < need {
        return err(
            StatusCode::FORBIDDEN,
            format!(
                "token {:?} has role {}; {} {} needs {}",
                caller.name,
                caller.role.as_str(),
                req.method(),
                req.uri().path(),
                need.as_str()
            ),
        );
    }
    req.extensions_mut().insert(caller);
    next.run(req).await
}

/// The dashboard's Content-Security-Policy: its own script and API only,
/// inline styles (the page has a `<style>` block), no framing (clickjacking
/// of the operate controls), no plugins, no base or form redirection.
const DASHBOARD_CSP: &str = "default-src 'none'; script-src 'self'; connect-src 'self'; \
     img-src 'self' data:; style-src 'self' 'unsafe-inline'; frame-ancestors 'none'; \
     base-uri 'none'; form-action 'none'";

async fn index() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
            (header::CONTENT_SECURITY_POLICY, DASHBOARD_CSP),
            (header::X_FRAME_OPTIONS, "DENY"),
            (header::REFERRER_POLICY, "no-referrer"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        INDEX_HTML,
    )
        .into_response()
}

async fn app_js() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        APP_JS,
    )
        .into_response()
}

/// Hot reload from the configuration file (same as SIGHUP).
async fn reload(State(st): State<Arc<ApiState>>) -> Response {
    let r = match &st.reloader {
        Some(r) => r.reload_file(),
        None => Err(ReloadError::NoFile),
    };
    match r {
        Ok(r) => {
            info!(%r, "configuration reloaded through the API");
            Json(json!({
                "reloaded": r.to_string(),
                "sections": r.sections,
                "pools": r.pools,
            }))
            .into_response()
        }
        Err(e) => err(StatusCode::CONFLICT, format!("reload refused: {e}")),
    }
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI_JSON).into_response()
}

async fn metrics_handler(State(st): State<Arc<ApiState>>, headers: HeaderMap) -> Response {
    if !st.metrics_public {
        if let Err(e) = authenticate(&st, &headers) {
            return e.into_response();
        }
    }
    let site = st.site.state();
    let rates = st.live.worker_rates();
    let fleet_hs = st.live.last().map(|p| p.hashrate_hs).unwrap_or(0.0);
    let body = st.metrics.render(&st.ctx, &site, &rates, fleet_hs);
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

async fn whoami(Extension(c): Extension<Caller>) -> Json<Value> {
    Json(json!({ "name": c.name, "role": c.role }))
}

/// One pool as the API shows it.
#[derive(Debug, Serialize)]
pub struct PoolView {
    /// Config index.
    pub index: usize,
    /// Name: the `[[pools]]` name, or `pool@account` for an account's upstream.
    pub name: String,
    /// The `[[pools]]` entry it connects to.
    pub pool: String,
    /// The account whose user it logs in as (`default`: the pool's own).
    pub account: String,
    /// Address.
    pub address: String,
    /// `sv1` / `sv2`.
    pub protocol: String,
    /// Priority.
    pub priority: u32,
    /// Split weight.
    pub weight: f64,
    /// Connected with a job.
    pub live: bool,
    /// Miners assigned now.
    pub miners: usize,
    /// Hashrate of the shares the pool acknowledged (60 s average), H/s.
    pub acked_hashrate_hs: f64,
    /// Shares sent.
    pub submitted: u64,
    /// Shares acknowledged.
    pub accepted: u64,
    /// Shares rejected.
    pub rejected: u64,
    /// Reject reasons the pool gave.
    pub reject_reasons: BTreeMap<String, u64>,
    /// Sessions set up.
    pub connects: u64,
    /// Jobs received.
    pub jobs: u64,
    /// Why the upstream last failed.
    pub last_error: Option<String>,
}

fn pool_views(st: &ApiState) -> Vec<PoolView> {
    let shares = st.ctx.router.shares();
    let last = st.live.last();
    st.ctx
        .router
        .pools()
        .iter()
        .enumerate()
        // Pools a reload removed keep their index but are not shown.
        .filter(|(i, _)| !shares.get(*i).is_some_and(|s| s.retired))
        .map(|(i, h)| {
            let pc = st.ctx.router.pool_config(i);
            let pc = pc.as_ref();
            let s = shares.get(i);
            PoolView {
                index: i,
                name: h.stats.name.clone(),
                pool: pc
                    .map(|p| p.pool_name().to_string())
                    .unwrap_or_else(|| h.stats.name.clone()),
                account: s.map(|s| s.account.clone()).unwrap_or_default(),
                address: pc.map(|p| p.address.to_string()).unwrap_or_default(),
                protocol: pc
                    .map(|p| p.protocol().as_str().to_string())
                    .unwrap_or_default(),
                priority: pc.map(|p| p.priority).unwrap_or(0),
                weight: pc.map(|p| p.weight).unwrap_or(0.0),
                live: s.is_some_and(|s| s.live),
                miners: s.map(|s| s.miners).unwrap_or(0),
                acked_hashrate_hs: last
                    .as_ref()
                    .and_then(|p| p.pools_hs.get(i).copied())
                    .unwrap_or(0.0),
                submitted: h.stats.submitted.get(),
                accepted: h.stats.accepted.get(),
                rejected: h.stats.rejected.get(),
                reject_reasons: h.stats.reasons().into_iter().collect(),
                connects: h.stats.connects.get(),
                jobs: h.stats.jobs.get(),
                last_error: h.stats.last_error(),
            }
        })
        .collect()
}

async fn pools(State(st): State<Arc<ApiState>>) -> Json<Vec<PoolView>> {
    Json(pool_views(&st))
}

/// `GET /api/v1/accounts`: each account's upstreams, miners, hashrate and
/// the pools' answers to its shares.
async fn accounts(
    State(st): State<Arc<ApiState>>,
) -> Json<Vec<gridproxy_proxy::router::AccountTotals>> {
    Json(st.ctx.router.account_totals())
}

async fn fleet(State(st): State<Arc<ApiState>>) -> Json<Value> {
    let workers = st.ctx.registry.snapshot();
    let mut accepted = 0u64;
    let mut rejected: BTreeMap<String, u64> = BTreeMap::new();
    let mut upstream_accepted = 0u64;
    let mut upstream_rejected = 0u64;
    for w in &workers {
        accepted += w.accepted;
        upstream_accepted += w.upstream_accepted;
        upstream_rejected += w.upstream_rejected;
        for (r, n) in &w.rejected {
            let k = serde_json::to_value(r)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default();
            *rejected.entry(k).or_default() += n;
        }
    }
    let last = st.live.last();
    let site: Arc<SiteState> = st.site.state();
    Json(json!({
        "miners_connected": st.ctx.slots_in_use(),
        "workers_known": workers.len(),
        "workers_online": workers.iter().filter(|w| w.connections > 0).count(),
        "hashrate_hs": last.as_ref().map(|p| p.hashrate_hs).unwrap_or(0.0),
        "shares": {
            "accepted": accepted,
            "rejected": rejected,
            "upstream_accepted": upstream_accepted,
            "upstream_rejected": upstream_rejected,
        },
        "pools": pool_views(&st),
        "site": &*site,
    }))
}

/// Query of `GET /api/v1/workers`.
#[derive(Debug, Deserialize)]
pub struct WorkersQuery {
    /// Case-insensitive substring of the worker name, model, firmware or state.
    #[serde(default)]
    pub q: Option<String>,
    /// Page size (default 100, at most 1000).
    #[serde(default)]
    pub limit: Option<usize>,
    /// Page offset.
    #[serde(default)]
    pub offset: Option<usize>,
    /// `hashrate` (default) or `name`.
    #[serde(default)]
    pub sort: Option<String>,
}

async fn workers(
    State(st): State<Arc<ApiState>>,
    Query(q): Query<WorkersQuery>,
) -> Result<Json<Value>, Response> {
    if q.q.as_ref().is_some_and(|s| s.len() > 256) {
        return Err(err(StatusCode::BAD_REQUEST, "q: at most 256 characters"));
    }
    let limit = q.limit.unwrap_or(100).min(1000);
    let offset = q.offset.unwrap_or(0);
    let needle = q.q.unwrap_or_default().to_lowercase();
    let rates = st.live.worker_rates();
    let miners = st.site.miners();
    let accounts = st.ctx.router.worker_accounts();
    let all = st.ctx.registry.snapshot();
    let total = all.len();
    let mut rows: Vec<Value> = all
        .into_iter()
        .filter_map(|w| {
            let m = miners.get(&w.name);
            let hay = format!(
                "{} {} {} {}",
                w.name,
                m.map(|m| m.model.as_str()).unwrap_or(""),
                m.map(|m| m.firmware.as_str()).unwrap_or(""),
                m.map(|m| m.state.as_str()).unwrap_or("")
            )
            .to_lowercase();
            if !needle.is_empty() && !hay.contains(&needle) {
                return None;
            }
            let rejected: u64 = w.rejected.iter().map(|(_, n)| n).sum();
            Some(json!({
                "name": w.name,
                "connections": w.connections,
                "hashrate_hs": rates.get(&w.name).copied().unwrap_or(0.0),
                "accepted": w.accepted,
                "rejected": rejected,
                "rejected_by_reason": w.rejected.iter().map(|(r, n)| (serde_json::to_value(r).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default(), *n)).collect::<BTreeMap<_, _>>(),
                "upstream_accepted": w.upstream_accepted,
                "upstream_rejected": w.upstream_rejected,
                "last_share_ms": w.last_share_ms,
                "model": m.map(|m| m.model.clone()),
                "firmware": m.map(|m| m.firmware.clone()),
                "state": m.map(|m| m.state.clone()),
                "power_w": m.map(|m| m.power_w),
                "ths": m.map(|m| m.ths),
                "parked": st.ctx.router.is_parked(&w.name),
                "site_parked": st.site.parks.is_parked(&w.name),
                "account": accounts.get(&w.name),
            }))
        })
        .collect();
    let matched = rows.len();
    if q.sort.as_deref() != Some("name") {
        rows.sort_by(|a, b| {
            b["hashrate_hs"]
                .as_f64()
                .unwrap_or(0.0)
                .total_cmp(&a["hashrate_hs"].as_f64().unwrap_or(0.0))
                .then_with(|| a["name"].as_str().cmp(&b["name"].as_str()))
        });
    }
    let page: Vec<Value> = rows.into_iter().skip(offset).take(limit).collect();
    Ok(Json(json!({
        "total": total,
        "matched": matched,
        "offset": offset,
        "workers": page,
    })))
}

/// Query of `GET /api/v1/events`.
#[derive(Debug, Deserialize)]
pub struct EventsQuery {
    /// Only log entries with a larger sequence number.
    #[serde(default)]
    pub after: Option<u64>,
    /// At most this many log entries (default 100, at most 1000).
    #[serde(default)]
    pub limit: Option<usize>,
}

async fn events(State(st): State<Arc<ApiState>>, Query(q): Query<EventsQuery>) -> Json<Value> {
    let s = st.site.state();
    let active: Vec<&DrEventView> = s.events.iter().collect();
    let log: Vec<LogEntry> = st
        .site
        .log
        .since(q.after.unwrap_or(0), q.limit.unwrap_or(100).min(1000));
    Json(json!({
        "events": active,
        "mode": s.mode,
        "override": s.override_note,
        "log": log,
    }))
}

/// Query of `GET /api/v1/history`.
#[derive(Debug, Deserialize)]
pub struct HistoryQuery {
    /// Only points after this unix ms.
    #[serde(default)]
    pub since: Option<u64>,
}

async fn history(State(st): State<Arc<ApiState>>, Query(q): Query<HistoryQuery>) -> Json<Value> {
    let pools: Vec<String> = st
        .ctx
        .router
        .pools()
        .iter()
        .map(|p| p.stats.name.clone())
        .collect();
    Json(json!({
        "pools": pools,
        "points": st.live.history(q.since.unwrap_or(0)),
    }))
}

/// `GET /api/v1/ledger`: the curtailment ledger as JSON (commands,
/// acknowledgements and verifications, DR event states, measured intervals).
async fn ledger_export(State(st): State<Arc<ApiState>>) -> Response {
    use gridproxy_curtail::driver::Audit;
    let Some(path) = st.site.ledger() else {
        return err(StatusCode::NOT_FOUND, "no curtailment ledger on this proxy");
    };
    let r = tokio::task::spawn_blocking(move || Audit::read(&path)).await;
    let a = match r {
        Ok(Ok(a)) => a,
        Ok(Err(e)) => return err(StatusCode::INTERNAL_SERVER_ERROR, format!("ledger: {e}")),
        Err(e) => {
            return err(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("ledger reader: {e}"),
            )
        }
    };
    Json(json!({
        "signals": a.signals,
        "commands": a.commands.iter().map(|c| json!({
            "id": c.id.0, "at_ms": c.at.as_millis(), "miner": c.miner.0,
            "action": c.action.as_str(), "value": c.action.value(), "curtail": c.curtail,
        })).collect::<Vec<_>>(),
        "outcomes": a.acks.iter().map(|k| json!({
            "at_ms": k.at.as_millis(), "command": k.command.0, "outcome": k.outcome, "detail": k.detail,
        })).collect::<Vec<_>>(),
        "events": a.events.iter().map(|e| json!({
            "at_ms": e.at.as_millis(), "id": e.event_id, "state": e.state,
        })).collect::<Vec<_>>(),
        "notes": a.notes.iter().map(|n| json!({
            "at_ms": n.at.as_millis(), "kind": n.kind, "miner": n.miner.map(|m| m.0),
        })).collect::<Vec<_>>(),
        "intervals": a.intervals.iter().map(|i| json!({
            "start_ms": i.start.as_millis(), "end_ms": i.end.as_millis(), "fleet_kw": i.fleet_kw,
            "site_kw": i.site_kw, "miners": i.miners,
        })).collect::<Vec<_>>(),
    }))
    .into_response()
}

/// Body of `POST /api/v1/curtail`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CurtailRequest {
    /// `park`, `unpark`, `move`, `unpin`, `cap_kw`, `shed_kw`,
    /// `curtail_all`, `run_all`, `clear`.
    pub action: String,
    /// Worker group: an exact name or a glob with `*` (`site.s9-*`, `*`).
    #[serde(default)]
    pub workers: Option<String>,
    /// Or every connected worker of this account (`park`, `unpark`,
    /// `move`, `unpin`).
    #[serde(default)]
    pub account: Option<String>,
    /// Target pool of `move`: its name or index.
    #[serde(default)]
    pub pool: Option<Value>,
    /// kW of `cap_kw` / `shed_kw`.
    #[serde(default)]
    pub kw: Option<f64>,
}

/// `POST /api/v1/site/parks`: the active instance's whole set of parks and
/// pins (`[[site.peers]]`), put in force here; the answer lists the
/// workers connected here. 409 for a push older than a lease token seen.
async fn site_parks(
    State(st): State<Arc<ApiState>>,
    Extension(c): Extension<Caller>,
    body: Result<Json<crate::site::parks::ParkSync>, axum::extract::rejection::JsonRejection>,
) -> Response {
    use crate::site::parks::{SyncError, SyncReply};
    let Json(sync) = match body {
        Ok(b) => b,
        Err(e) => return err(StatusCode::BAD_REQUEST, e.body_text()),
    };
    let before = st.site.parks.len();
    let (parks, router) = (st.site.parks.clone(), st.ctx.router.clone());
    let from = sync.from.chars().take(64).collect::<String>();
    let fence = sync.fence;
    // Each router change re-walks the miners: off the async threads.
    let r = tokio::task::spawn_blocking(move || parks.receive(&router, &sync)).await;
    match r {
        Ok(Ok((applied, unknown_pools))) => {
            if applied != before {
                info!(from = %from, token = ?fence, by = %c.name, applied, "site parks pushed by the active instance");
            }
            let workers = st
                .ctx
                .registry
                .snapshot()
                .into_iter()
                .filter(|w| w.connections > 0)
                .map(|w| w.name)
                .collect();
            Json(SyncReply {
                applied,
                unknown_pools,
                workers,
            })
            .into_response()
        }
        Ok(Err(e @ SyncError::Fenced { .. })) => {
            warn!(from = %from, error = %e, "site parks push refused");
            err(StatusCode::CONFLICT, e.to_string())
        }
        Ok(Err(e)) => err(StatusCode::UNPROCESSABLE_ENTITY, e.to_string()),
        Err(e) => err(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// Worker-name globs, as accounts match them.
pub use gridproxy_proxy::accounts::glob;

async fn curtail(
    State(st): State<Arc<ApiState>>,
    Extension(c): Extension<Caller>,
    body: Result<Json<CurtailRequest>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let Json(r) = match body {
        Ok(b) => b,
        Err(e) => return err(StatusCode::BAD_REQUEST, e.body_text()),
    };
    let router = &st.ctx.router;
    // `account`: the account's connected workers, by name.
    let members: Option<std::collections::HashSet<String>> = match &r.account {
        Some(a) if router.account_names().contains(a) => {
            Some(router.workers_of_account(a).into_iter().collect())
        }
        Some(a) => {
            return err(
                StatusCode::BAD_REQUEST,
                format!(
                    "account: unknown {a:?}; one of {}",
                    router.account_names().join(", ")
                ),
            )
        }
        None => None,
    };
    let selects = |g: &str, w: &str| match &members {
        Some(m) => m.contains(w),
        None => glob(g, w),
    };
    let group = || -> Result<String, ApiError> {
        if let Some(a) = &r.account {
            if r.workers.is_some() {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "give workers or account, not both",
                ));
            }
            return Ok(format!("account {a}"));
        }
        let g = r.workers.clone().unwrap_or_default();
        if g.is_empty() || g.len() > 256 {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "workers: give a worker name or a glob (1..=256 characters, e.g. \"site.s9-*\")",
            ));
        }
        Ok(g)
    };
    let kw = || -> Result<f64, ApiError> {
        match r.kw {
            Some(k) if k.is_finite() && (0.0..=1e8).contains(&k) => Ok(k),
            _ => Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "kw: a number in 0..=1e8",
            )),
        }
    };
    let by = c.name.clone();
    let result: Result<(usize, String), ApiError> = (|| {
        match r.action.as_str() {
        "park" | "unpark" | "unpin" => {
            let g = group()?;
            let n = match r.action.as_str() {
                "park" => router.park(|w| selects(&g, w)),
                "unpark" => router.unpark(|w| selects(&g, w)),
                _ => router.move_to(|w| selects(&g, w), None),
            };
            Ok((n, format!("{} {g:?}: {n} miners", r.action)))
        }
        "move" => {
            let g = group()?;
            let pools = router.pools();
            let idx = match &r.pool {
                Some(Value::Number(n)) => n.as_u64().map(|n| n as usize).filter(|&n| n < pools.len()),
                Some(Value::String(s)) => pools.iter().position(|p| &p.stats.name == s),
                _ => None,
            };
            let Some(idx) = idx else {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    format!(
                        "pool: give a pool name or index ({})",
                        pools.iter().map(|p| p.stats.name.as_str()).collect::<Vec<_>>().join(", ")
                    ),
                ));
            };
            let n = router.move_to(|w| selects(&g, w), Some(idx));
            Ok((n, format!("move {g:?} to {}: {n} miners", pools[idx].stats.name)))
        }
        "cap_kw" | "shed_kw" | "curtail_all" | "run_all" | "clear" => {
            let cmd = match r.action.as_str() {
                "cap_kw" => SiteCommand::CapKw { kw: kw()?, by: by.clone() },
                "shed_kw" => SiteCommand::ShedKw { kw: kw()?, by: by.clone() },
                "curtail_all" => SiteCommand::CurtailAll { by: by.clone() },
                "run_all" => SiteCommand::RunAll { by: by.clone() },
                _ => SiteCommand::Clear { by: by.clone() },
            };
            let what = match &cmd {
                SiteCommand::CapKw { kw, .. } => format!("cap site at {kw:.0} kW"),
                SiteCommand::ShedKw { kw, .. } => format!("shed {kw:.0} kW"),
                SiteCommand::CurtailAll { .. } => "curtail all".into(),
                SiteCommand::RunAll { .. } => "run all".into(),
                SiteCommand::Clear { .. } => "clear override".into(),
            };
            st.site
                .command(cmd)
                .map_err(|e| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e))?;
            Ok((0, what))
        }
        other => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("action: unknown {other:?}; one of park, unpark, move, unpin, cap_kw, shed_kw, curtail_all, run_all, clear"),
        )),
    }
    })();
    match result {
        Ok((n, what)) => {
            info!(by = %c.name, %what, "operator command");
            st.site.log.push("operator", format!("{}: {what}", c.name));
            Json(json!({ "ok": true, "affected": n, "message": what })).into_response()
        }
        Err(e) => e.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_tells_a_stopped_driver_and_a_failing_ledger() {
        use crate::site::handle::LedgerView;
        // No site: nothing to tell.
        assert!(health_problems(&SiteState::default()).is_empty());
        let ok = SiteState {
            attached: true,
            driver_running: true,
            ..SiteState::default()
        };
        assert!(health_problems(&ok).is_empty());
        let failing = SiteState {
            ledger: LedgerView {
                error: Some("database or disk is full".into()),
                failing_secs: Some(75),
                fault_engaged: true,
                ..LedgerView::default()
            },
            ..ok.clone()
        };
        let p = health_problems(&failing);
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(
            p[0].contains("ledger writes failing for 75 s")
                && p[0].contains("disk is full")
                && p[0].contains("safe state"),
            "{p:?}"
        );
        let stopped = SiteState {
            driver_running: false,
            ..failing
        };
        assert_eq!(health_problems(&stopped).len(), 2);
    }

    #[test]
    fn constant_time_compare() {
        assert!(same(b"abc", b"abc"));
        assert!(!same(b"abc", b"abd"));
        assert!(!same(b"abc", b"ab"));
    }
}
