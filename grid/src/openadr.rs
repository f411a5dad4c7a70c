//! OpenADR 3 VEN: logs in to a VTN (OAuth2 client credentials), follows the
//! events it may see, turns them into engine [`Signal`]s ([`map`], pure) and
//! reports the site's measured draw back per event ([`report`], pure).
//!
//! I/O is one task ([`spawn_ven`]). Events are listed with `GET /events`
//! every [`VenConfig::poll_interval`]; when the VTN offers the websocket
//! notifier (`POST /subscriptions` + `GET /notifiers/ws`), each notification
//! triggers an immediate re-list and polling slows to
//! [`VenConfig::poll_interval_ws`]. The list is the source of truth either
//! way, so a missed notification costs latency, never correctness.
//!
//! Events are parsed one by one ([`openleadr_wire`] types): a malformed one
//! is logged, listed in [`VenStatus::skipped`] and ignored; the rest apply.
//! An event that disappears (deleted or cancelled) ends its DR obligations.
//!
//! The VEN talks HTTP itself (reqwest) rather than through
//! `openleadr_client`: that client parses a whole page of events at once
//! (one bad event fails them all) and keeps its token private, which the
//! websocket needs.
//!
//! TLS: `https://` (and the `wss://` notifier derived from it) through
//! rustls, trusting [`VenConfig::tls`]'s CA file or the built-in public
//! roots ([`crate::tls`]). A handshake failure is [`VenError::Tls`].

pub mod map;
pub mod report;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use gridproxy_curtail::signal::Signal;
use gridproxy_curtail::time::Timestamp;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use thiserror::Error;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::tls::{self, TlsOptions};

pub use map::{MapConfig, Mapped, SkipReason};
use report::EventReport;

/// Where and how to reach the VTN (`Debug` leaves the client secret out).
#[derive(Clone)]
pub struct VenConfig {
    /// VTN base URL, e.g. `http://127.0.0.1:3000`.
    pub vtn_url: String,
    /// OAuth2 token endpoint (`None`: `<vtn_url>/auth/token`).
    pub token_url: Option<String>,
    /// OAuth2 client id.
    pub client_id: String,
    /// OAuth2 client secret.
    pub client_secret: String,
    /// This VEN's name: `clientName` of its reports and subscription.
    pub ven_name: String,
    /// Only events of programs with these names (empty: every program).
    pub programs: Vec<String>,
    /// Event poll interval without a websocket.
    pub poll_interval: Duration,
    /// Event poll interval while the websocket is up.
    pub poll_interval_ws: Duration,
    /// Use the websocket notifier when the VTN offers it.
    pub websocket: bool,
    /// How often reports are sent for each event with a DR obligation.
    pub report_interval: Duration,
    /// Timeout of each HTTP request.
    pub request_timeout: Duration,
    /// Longest wait between reconnect attempts (doubles from 1 s).
    pub backoff_max: Duration,
    /// How `https://` and `wss://` verify the VTN (a private CA).
    pub tls: TlsOptions,
    /// Event -> signal mapping knobs.
    pub mapping: MapConfig,
}

impl std::fmt::Debug for VenConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VenConfig")
            .field("vtn_url", &self.vtn_url)
            .field("token_url", &self.token_url)
            .field("client_id", &self.client_id)
            .field("client_secret", &"<redacted>")
            .field("ven_name", &self.ven_name)
            .field("programs", &self.programs)
            .field("poll_interval", &self.poll_interval)
            .field("poll_interval_ws", &self.poll_interval_ws)
            .field("websocket", &self.websocket)
            .field("report_interval", &self.report_interval)
            .field("request_timeout", &self.request_timeout)
            .field("backoff_max", &self.backoff_max)
            .field("tls", &self.tls)
            .field("mapping", &self.mapping)
            .finish()
    }
}

impl VenConfig {
    /// Defaults for a VTN at `vtn_url` with these credentials.
    pub fn new(vtn_url: &str, client_id: &str, client_secret: &str, ven_name: &str) -> Self {
        VenConfig {
            vtn_url: vtn_url.trim_end_matches('/').to_string(),
            token_url: None,
            client_id: client_id.into(),
            client_secret: client_secret.into(),
            ven_name: ven_name.into(),
            programs: Vec::new(),
            poll_interval: Duration::from_secs(5),
            poll_interval_ws: Duration::from_secs(30),
            websocket: true,
            report_interval: Duration::from_secs(60),
            request_timeout: Duration::from_secs(10),
            backoff_max: Duration::from_secs(60),
            tls: TlsOptions::default(),
            mapping: MapConfig::default(),
        }
    }
}

/// What went wrong talking to the VTN.
/// An error and its causes, `a: b: c` (reqwest's top level alone says
/// "error sending request", not "connection refused").
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cause = c.source();
    }
    out
}

/// Why talking to the VTN failed.
#[derive(Debug, Error)]
pub enum VenError {
    /// The VEN cannot be set up (its TLS files).
    #[error("VEN config: {0}")]
    Config(String),
    /// The TLS handshake with the VTN failed (untrusted certificate, a name
    /// that does not match, ...).
    #[error("TLS handshake with the VTN at {url} failed: {why}")]
    Tls {
        /// The URL tried.
        url: String,
        /// Why, in words.
        why: String,
    },
    /// The VTN could not be reached.
    #[error("VTN unreachable at {url}: {}", chain(source))]
    Unreachable {
        /// The URL tried.
        url: String,
        /// Why.
        source: reqwest::Error,
    },
    /// The token endpoint refused the credentials.
    #[error("VTN refused client {client_id}: HTTP {status}: {body}")]
    Auth {
        /// Client id used.
        client_id: String,
        /// HTTP status.
        status: u16,
        /// Response body.
        body: String,
    },
    /// A request got an error status.
    #[error("{method} {path}: HTTP {status}: {body}")]
    Http {
        /// Method.
        method: String,
        /// Path.
        path: String,
        /// Status.
        status: u16,
        /// Body.
        body: String,
    },
    /// A response that is not the JSON expected.
    #[error("{0}: unexpected response: {1}")]
    Protocol(String, String),
    /// The engine's signal channel is closed (the driver stopped).
    #[error("signal channel closed")]
    Closed,
}

/// The VEN's state, published after each change.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct VenStatus {
    /// Logged in and the last request succeeded.
    pub connected: bool,
    /// The websocket notifier is up.
    pub websocket: bool,
    /// Event lists fetched.
    pub syncs: u64,
    /// Websocket notifications received.
    pub notifications: u64,
    /// Events applied (VTN id -> the signals' DR ids).
    pub applied: HashMap<String, Vec<String>>,
    /// Events skipped (VTN id -> why).
    pub skipped: HashMap<String, String>,
    /// Reports created or updated.
    pub reports_sent: u64,
    /// Signals sent to the engine.
    pub signals_sent: u64,
    /// The last error, if any.
    pub last_error: Option<String>,
}

/// The running VEN.
pub struct VenHandle {
    status: watch::Receiver<VenStatus>,
    cancel: CancellationToken,
    task: JoinHandle<()>,
}

impl VenHandle {
    /// The latest status.
    pub fn status(&self) -> VenStatus {
        self.status.borrow().clone()
    }

    /// A receiver of status updates.
    pub fn watch(&self) -> watch::Receiver<VenStatus> {
        self.status.clone()
    }

    /// Wait (at most `timeout`) until `f` holds for the status.
    pub async fn wait_for(
        &self,
        timeout: Duration,
        f: impl FnMut(&VenStatus) -> bool,
    ) -> Option<VenStatus> {
        let mut rx = self.status.clone();
        let wait = async move { rx.wait_for(f).await.map(|s| s.clone()).ok() };
        tokio::time::timeout(timeout, wait).await.ok().flatten()
    }

    /// Stop the VEN and wait for its task.
    pub async fn stop(self) {
        self.cancel.cancel();
        let _ = self.task.await;
    }
}

/// Start the VEN: it sends signals on `signals` and reads the site's
/// measured draw (kW) from `site_kw` for SIMPLE sheds and reports. Fails
/// only on a TLS set-up that cannot be built (a CA file missing or empty).
pub fn spawn_ven(
    cfg: VenConfig,
    signals: mpsc::Sender<Signal>,
    site_kw: watch::Receiver<f64>,
) -> Result<VenHandle, VenError> {
    let tls = Arc::new(
        cfg.tls
            .client_config()
            .map_err(|e| VenError::Config(format!("tls: {e}")))?,
    );
    // Our rustls config, never reqwest's own default (which would ignore
    // the CA file).
    let http = reqwest::Client::builder()
        .timeout(cfg.request_timeout)
        .tls_backend_preconfigured((*tls).clone())
        .build()
        .map_err(|e| VenError::Config(format!("HTTP client: {}", chain(&e))))?;
    let (tx, rx) = watch::channel(VenStatus::default());
    let cancel = CancellationToken::new();
    let ven = Ven {
        http,
        tls,
        cfg,
        signals,
        site_kw,
        status: tx,
        token: None,
        known: HashMap::new(),
        reports: HashMap::new(),
        programs: None,
    };
    let task = tokio::spawn(ven.run(cancel.clone()));
    Ok(VenHandle {
        status: rx,
        cancel,
        task,
    })
}

/// A failed request: a TLS failure when that is what it was.
fn unreachable(url: &str, source: reqwest::Error) -> VenError {
    match tls::tls_failure(&source) {
        Some(why) => VenError::Tls {
            url: url.to_string(),
            why,
        },
        None => VenError::Unreachable {
            url: url.to_string(),
            source,
        },
    }
}

/// Wall-clock now (OpenADR times are wall times).
fn wall_now() -> Timestamp {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    Timestamp::from_millis(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

struct Ven {
    cfg: VenConfig,
    http: reqwest::Client,
    /// The websocket's TLS (the same as `http`'s).
    tls: Arc<tls::rustls::ClientConfig>,
    signals: mpsc::Sender<Signal>,
    site_kw: watch::Receiver<f64>,
    status: watch::Sender<VenStatus>,
    token: Option<String>,
    /// Applied events by VTN id.
    known: HashMap<String, Mapped>,
    /// Report state of events with DR obligations.
    reports: HashMap<String, EventReport>,
    /// Ids of the programs to follow (`None`: all).
    programs: Option<HashSet<String>>,
}

type WsStream =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

impl Ven {
    async fn run(mut self, cancel: CancellationToken) {
        let mut backoff = Duration::from_secs(1);
        loop {
            let r = tokio::select! {
                _ = cancel.cancelled() => return,
                r = self.session() => r,
            };
            // A session that got as far as a sync starts the next retry
            // schedule from the beginning, not where the last outage left it.
            if self.status.borrow().connected {
                backoff = Duration::from_secs(1);
            }
            match r {
                Err(VenError::Closed) => {
                    info!("openadr: engine signal channel closed, VEN stops");
                    return;
                }
                // The operator must act (CA file, host name): say so loudly.
                Err(e @ VenError::Tls { .. }) => {
                    error!("openadr: {e}; retrying in {backoff:?}");
                    self.token = None;
                    self.status.send_modify(|s| {
                        s.connected = false;
                        s.websocket = false;
                        s.last_error = Some(e.to_string());
                    });
                }
                Err(e) => {
                    warn!("openadr: {e}; retrying in {backoff:?}");
                    self.token = None;
                    self.status.send_modify(|s| {
                        s.connected = false;
                        s.websocket = false;
                        s.last_error = Some(e.to_string());
                    });
                }
                Ok(()) => {}
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(self.cfg.backoff_max.max(Duration::from_secs(1)));
        }
    }

    /// One login: sync, then poll/notify/report until an error.
    async fn session(&mut self) -> Result<(), VenError> {
        self.login().await?;
        self.resolve_programs().await?;
        self.status.send_modify(|s| {
            s.connected = true;
            s.last_error = None;
        });
        info!(
            "openadr: logged in to {} as {}",
            self.cfg.vtn_url, self.cfg.client_id
        );
        let mut ws: Option<WsStream> = None;
        let mut ws_retry = Instant::now();
        let mut next_poll = Instant::now();
        let mut next_report = Instant::now() + self.cfg.report_interval;
        loop {
            if ws.is_none() && self.cfg.websocket && Instant::now() >= ws_retry {
                match self.open_websocket().await {
                    Ok(s) => {
                        info!("openadr: websocket notifier up");
                        ws = Some(s);
                        self.status.send_modify(|s| s.websocket = true);
                    }
                    Err(e) => {
                        debug!(
                            "openadr: no websocket ({e}); polling every {:?}",
                            self.cfg.poll_interval
                        );
                        ws_retry = Instant::now() + Duration::from_secs(30);
                    }
                }
            }
            if Instant::now() >= next_poll {
                self.sync().await?;
                let every = if ws.is_some() {
                    self.cfg.poll_interval_ws
                } else {
                    self.cfg.poll_interval
                };
                next_poll = Instant::now() + every;
            }
            if Instant::now() >= next_report {
                self.send_reports().await?;
                next_report = Instant::now() + self.cfg.report_interval;
            }
            let wake = next_poll.min(next_report);
            let notified = match ws.as_mut() {
                Some(s) => tokio::select! {
                    m = s.next() => Some(m),
                    _ = tokio::time::sleep_until(wake) => None,
                },
                None => {
                    tokio::time::sleep_until(
                        wake.min(ws_retry.max(Instant::now() + Duration::from_millis(50))),
                    )
                    .await;
                    None
                }
            };
            match notified {
                Some(Some(Ok(msg))) if msg.is_text() => {
                    debug!(
                        "openadr: notification {}",
                        msg.to_text().unwrap_or_default()
                    );
                    self.status.send_modify(|s| s.notifications += 1);
                    next_poll = Instant::now();
                }
                // Pings and the like: nothing to do.
                None | Some(Some(Ok(_))) => {}
                Some(Some(Err(e))) => {
                    warn!("openadr: websocket error: {e}; polling");
                    ws = None;
                    ws_retry = Instant::now() + Duration::from_secs(5);
                    self.status.send_modify(|s| s.websocket = false);
                }
                Some(None) => {
                    warn!("openadr: websocket closed by the VTN; polling");
                    ws = None;
                    ws_retry = Instant::now() + Duration::from_secs(5);
                    self.status.send_modify(|s| s.websocket = false);
                }
            }
        }
    }

    async fn login(&mut self) -> Result<(), VenError> {
        let url = self
            .cfg
            .token_url
            .clone()
            .unwrap_or_else(|| format!("{}/auth/token", self.cfg.vtn_url));
        let res = self
            .http
            .post(&url)
            .basic_auth(&self.cfg.client_id, Some(&self.cfg.client_secret))
            .header("Content-Type", "application/x-www-form-urlencoded")
            .header("Accept", "application/json")
            .body("grant_type=client_credentials")
            .send()
            .await
            .map_err(|source| unreachable(&url, source))?;
        let status = res.status();
        let body = res.text().await.unwrap_or_default();
        if !status.is_success() {
            return Err(VenError::Auth {
                client_id: self.cfg.client_id.clone(),
                status: status.as_u16(),
                body: truncate(&body),
            });
        }
        let v: Value = serde_json::from_str(&body)
            .map_err(|e| VenError::Protocol(url.clone(), e.to_string()))?;
        let token = v
            .get("access_token")
            .and_then(Value::as_str)
            .ok_or_else(|| VenError::Protocol(url, "no access_token".into()))?;
        self.token = Some(token.to_string());
        Ok(())
    }

    async fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, VenError> {
        let url = format!("{}{path}", self.cfg.vtn_url);
        let mut req = self
            .http
            .request(method.clone(), &url)
            .header("Accept", "application/json");
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(b);
        }
        let res = req
            .send()
            .await
            .map_err(|source| unreachable(&url, source))?;
        let status = res.status();
        let text = res.text().await.unwrap_or_default();
        if !status.is_success() {
            return Err(VenError::Http {
                method: method.to_string(),
                path: path.to_string(),
                status: status.as_u16(),
                body: truncate(&text),
            });
        }
        if text.is_empty() || status == StatusCode::NO_CONTENT {
            return Ok(Value::Null);
        }
        serde_json::from_str(&text)
            .map_err(|e| VenError::Protocol(format!("{method} {path}"), e.to_string()))
    }

    /// GET a paged list (skip/limit) in full.
    async fn list(&self, path: &str, query: &str) -> Result<Vec<Value>, VenError> {
        const PAGE: usize = 50;
        let mut out = Vec::new();
        for page in 0..1000 {
            let sep = if query.is_empty() { "" } else { "&" };
            let p = format!("{path}?skip={}&limit={PAGE}{sep}{query}", page * PAGE);
            let v = self.request(Method::GET, &p, None).await?;
            let Value::Array(items) = v else {
                return Err(VenError::Protocol(p, "not a JSON array".into()));
            };
            let n = items.len();
            out.extend(items);
            if n < PAGE {
                break;
            }
        }
        Ok(out)
    }

    async fn resolve_programs(&mut self) -> Result<(), VenError> {
        if self.cfg.programs.is_empty() {
            self.programs = None;
            return Ok(());
        }
        let all = self.list("/programs", "").await?;
        let ids: HashSet<String> = all
            .iter()
            .filter(|p| {
                p.get("programName")
                    .and_then(Value::as_str)
                    .is_some_and(|n| self.cfg.programs.iter().any(|w| w == n))
            })
            .filter_map(|p| p.get("id").and_then(Value::as_str).map(String::from))
            .collect();
        if ids.is_empty() {
            warn!(
                "openadr: none of the programs {:?} on the VTN (yet)",
                self.cfg.programs
            );
        }
        self.programs = Some(ids);
        Ok(())
    }

    async fn open_websocket(&self) -> Result<WsStream, String> {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let notifiers = self
            .request(Method::GET, "/notifiers", None)
            .await
            .map_err(|e| e.to_string())?;
        if notifiers.get("WEBSOCKET") != Some(&Value::Bool(true)) {
            return Err(format!("VTN offers no websocket notifier ({notifiers})"));
        }
        let subs = self
            .list("/subscriptions", "")
            .await
            .map_err(|e| e.to_string())?;
        let have = subs.iter().any(|s| {
            s.get("clientName").and_then(Value::as_str) == Some(self.cfg.ven_name.as_str())
                && s.to_string().contains("WEBSOCKET")
        });
        if !have {
            let body = json!({
                "clientName": self.cfg.ven_name,
                "objectOperations": [{
                    "objects": ["EVENT"],
                    "operations": ["CREATE", "UPDATE", "DELETE"],
                    "mechanism": "WEBSOCKET",
                }],
            });
            self.request(Method::POST, "/subscriptions", Some(&body))
                .await
                .map_err(|e| e.to_string())?;
        }
        let ws_url = format!(
            "{}/notifiers/ws",
            self.cfg
                .vtn_url
                .replacen("https://", "wss://", 1)
                .replacen("http://", "ws://", 1)
        );
        let mut req = ws_url.into_client_request().map_err(|e| e.to_string())?;
        let auth = format!("Bearer {}", self.token.as_deref().unwrap_or_default());
        req.headers_mut().insert(
            "Authorization",
            auth.parse().map_err(|e| format!("token header: {e}"))?,
        );
        // wss:// through our rustls config (ws:// ignores it).
        let connector = tokio_tungstenite::Connector::Rustls(self.tls.clone());
        let (stream, _) = tokio::time::timeout(
            self.cfg.request_timeout,
            tokio_tungstenite::connect_async_tls_with_config(req, None, false, Some(connector)),
        )
        .await
        .map_err(|_| "websocket connect timed out".to_string())?
        .map_err(|e| match tls::tls_failure(&e) {
            Some(why) => format!("websocket TLS handshake failed: {why}"),
            None => e.to_string(),
        })?;
        Ok(stream)
    }

    fn site_kw(&self) -> f64 {
        let kw = *self.site_kw.borrow();
        if kw.is_finite() && kw >= 0.0 {
            kw
        } else {
            0.0
        }
    }

    async fn send(&self, s: Signal) -> Result<(), VenError> {
        if let Err(e) = s.validate() {
            warn!("openadr: dropping invalid signal {s:?}: {e}");
            return Ok(());
        }
        self.signals.send(s).await.map_err(|_| VenError::Closed)?;
        self.status.send_modify(|st| st.signals_sent += 1);
        Ok(())
    }

    /// List the events, apply new and changed ones, end vanished ones.
    async fn sync(&mut self) -> Result<(), VenError> {
        let events = match &self.programs {
            None => self.list("/events", "").await?,
            Some(ids) => {
                let mut all = Vec::new();
                for id in ids {
                    all.extend(self.list("/events", &format!("programID={id}")).await?);
                }
                all
            }
        };
        let now = wall_now();
        let site_kw = self.site_kw();
        let mut seen = HashSet::new();
        let mut skipped = HashMap::new();
        for raw in &events {
            let Some((id, modified)) = map::event_key(raw) else {
                warn!(
                    "openadr: event without an id skipped: {}",
                    truncate(&raw.to_string())
                );
                continue;
            };
            seen.insert(id.clone());
            if self.known.get(&id).is_some_and(|m| m.modified == modified) {
                continue;
            }
            match map::map_event(raw, now, site_kw, &self.cfg.mapping) {
                Ok(m) => {
                    for s in &m.ignored {
                        debug!("openadr: event {id}: payload {s} not acted on");
                    }
                    let old_ids: Vec<String> = self
                        .known
                        .get(&id)
                        .map(|o| o.dr.iter().map(|e| e.id.clone()).collect())
                        .unwrap_or_default();
                    for s in m.signals(now) {
                        self.send(s).await?;
                    }
                    for gone in old_ids.iter().filter(|g| !m.dr.iter().any(|e| &e.id == *g)) {
                        self.send(Signal::DrEnd {
                            id: gone.clone(),
                            at: now,
                        })
                        .await?;
                    }
                    info!(
                        "openadr: event {id} applied: {} DR obligation(s){}",
                        m.dr.len(),
                        if m.price.is_some() { ", prices" } else { "" }
                    );
                    if !m.dr.is_empty() && !self.reports.contains_key(&id) {
                        self.reports
                            .insert(id.clone(), EventReport::new(site_kw, now));
                    }
                    self.known.insert(id, m);
                }
                Err(why) => {
                    warn!("openadr: event {id} skipped: {why}");
                    // A once-good event updated into a bad one: stop obeying it.
                    if let Some(old) = self.known.remove(&id) {
                        for e in &old.dr {
                            self.send(Signal::DrEnd {
                                id: e.id.clone(),
                                at: now,
                            })
                            .await?;
                        }
                    }
                    skipped.insert(id, why.to_string());
                }
            }
        }
        let vanished: Vec<String> = self
            .known
            .keys()
            .filter(|k| !seen.contains(*k))
            .cloned()
            .collect();
        for id in vanished {
            if let Some(old) = self.known.remove(&id) {
                info!("openadr: event {id} gone from the VTN: ending it");
                for e in &old.dr {
                    self.send(Signal::DrEnd {
                        id: e.id.clone(),
                        at: now,
                    })
                    .await?;
                }
            }
            self.reports.remove(&id);
        }
        // Prices move from interval to interval: re-send the current one.
        for m in self.known.values() {
            if let Some(p) = m.price.as_ref().and_then(|p| p.at(now)) {
                self.send(Signal::Price(p)).await?;
            }
        }
        let applied: HashMap<String, Vec<String>> = self
            .known
            .iter()
            .map(|(k, m)| (k.clone(), m.dr.iter().map(|e| e.id.clone()).collect()))
            .collect();
        self.status.send_modify(|s| {
            s.syncs += 1;
            s.connected = true;
            s.applied = applied;
            s.skipped = skipped;
        });
        Ok(())
    }

    /// Sample the site and create or update one report per DR event.
    async fn send_reports(&mut self) -> Result<(), VenError> {
        let now = wall_now();
        let kw = self.site_kw();
        let ids: Vec<String> = self.reports.keys().cloned().collect();
        for id in ids {
            let Some(r) = self.reports.get_mut(&id) else {
                continue;
            };
            r.sample(now, kw);
            if r.samples.is_empty() {
                continue;
            }
            let body = r.body(&id, &self.cfg.ven_name);
            let existing = r.report_id.clone();
            let res = match &existing {
                Some(rid) => {
                    self.request(Method::PUT, &format!("/reports/{rid}"), Some(&body))
                        .await
                }
                None => self.request(Method::POST, "/reports", Some(&body)).await,
            };
            match res {
                Ok(v) => {
                    if existing.is_none() {
                        let rid = v.get("id").and_then(Value::as_str).map(String::from);
                        if let Some(r) = self.reports.get_mut(&id) {
                            r.report_id = rid;
                        }
                    }
                    self.status.send_modify(|s| s.reports_sent += 1);
                }
                // The report (or its event) is gone: start over next time.
                Err(VenError::Http { status: 404, .. }) => {
                    if let Some(r) = self.reports.get_mut(&id) {
                        r.report_id = None;
                    }
                }
                Err(e @ VenError::Http { status: 401, .. }) => return Err(e),
                Err(e @ (VenError::Unreachable { .. } | VenError::Tls { .. })) => return Err(e),
                Err(e) => warn!("openadr: report for event {id} refused: {e}"),
            }
        }
        Ok(())
    }
}

fn truncate(s: &str) -> String {
    const MAX: usize = 400;
    if s.len() <= MAX {
        s.to_string()
    } else {
        let mut end = MAX;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}…", &s[..end])
    }
}
