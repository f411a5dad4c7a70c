//! MQTT dispatch client (Soluna-style): a dispatcher publishes a fleet
//! target on `site/<id>/dispatch` and re-sends it as a heartbeat; each
//! message becomes a [`Signal::Dispatch`] for the curtailment driver.
//!
//! - Payloads: see [`payload`] (`{"target_pct": 40}`, `{"target_kw": 812.5}`,
//!   or a bare number meaning percent; optional `"id"` and `"ts"`).
//! - Every dispatch message is answered on the ack topic with
//!   `{"id", "accepted", "target_kw", "reason", "received_ms"}`; malformed or
//!   out-of-range messages are refused there, logged and otherwise ignored.
//! - A status (`online`, site kW, target kW, mode, miners running/asleep,
//!   age of the last dispatch) is published retained on the status topic
//!   every [`MqttConfig::status_interval`]; the broker publishes
//!   `{"online": false}` there as our last will if we vanish.
//! - Broker loss: the client reconnects with exponential backoff and
//!   re-subscribes. Silence (no dispatch for the silence timeout, whatever
//!   the cause) is the engine's business: put [`MqttConfig::freshness`] in
//!   `PolicyConfig::staleness.dispatch` and the engine curtails the fleet
//!   (its safe state) once the last dispatch is older than that.
//!
//! - TLS ([`MqttConfig::tls`]): rustls with a private CA or the built-in
//!   public roots ([`crate::tls`]); a handshake failure (untrusted
//!   certificate, wrong host name) is logged as an error, shown in
//!   [`ClientState::last_error`] and retried with the backoff like any other
//!   connection error.
//!
//! Timestamps (`at` of signals, `received_ms`, `ts_ms`) come from the
//! caller's [`Clock`], the same one the driver uses, so the engine measures
//! the dispatch's age in its own time.

pub mod payload;

use std::sync::Arc;
use std::time::Duration;

use gridproxy_curtail::policy::{Freshness, SafeState};
use gridproxy_curtail::signal::Signal;
use gridproxy_curtail::time::{Clock, Timestamp};
use rumqttc::{
    AsyncClient, ConnectReturnCode, ConnectionError, Event, EventLoop, LastWill, MqttOptions,
    Packet, QoS, TlsConfiguration, Transport,
};
use thiserror::Error;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::tls::{self, TlsOptions};

/// The MQTT client library, for callers and tests that talk to the same
/// broker (one version for all).
pub use rumqttc;

pub use payload::{Ack, DispatchMessage, DispatchTarget, RejectReason, SiteStatus, StatusMessage};

/// Dispatch client configuration (`Debug` leaves the password out).
#[derive(Clone, PartialEq)]
pub struct MqttConfig {
    /// Broker host.
    pub host: String,
    /// Broker port.
    pub port: u16,
    /// MQTT client id (unique per broker).
    pub client_id: String,
    /// Login, if the broker wants one.
    pub username: Option<String>,
    /// Password for `username`.
    pub password: Option<String>,
    /// Connect over TLS (`mqtts`), verifying the broker as these say;
    /// `None`: plain TCP.
    pub tls: Option<TlsOptions>,
    /// Topic (or filter) the dispatcher publishes targets on.
    pub dispatch_topic: String,
    /// Topic of our status (published retained).
    pub status_topic: String,
    /// Topic of our acknowledgements.
    pub ack_topic: String,
    /// QoS of the subscription and of what we publish (0, 1 or 2).
    pub qos: u8,
    /// No dispatch for this long (driver clock) puts the fleet in its safe
    /// state; 240 s per Soluna-style practice.
    pub silence_timeout: Duration,
    /// MQTT keepalive (whole seconds, ≥ 1 s).
    pub keepalive: Duration,
    /// Time between status publishes (real time).
    pub status_interval: Duration,
    /// First reconnect delay (real time); doubles per failure.
    pub backoff_min: Duration,
    /// Longest reconnect delay (real time).
    pub backoff_max: Duration,
}

impl std::fmt::Debug for MqttConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MqttConfig")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("client_id", &self.client_id)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("tls", &self.tls)
            .field("dispatch_topic", &self.dispatch_topic)
            .field("status_topic", &self.status_topic)
            .field("ack_topic", &self.ack_topic)
            .field("qos", &self.qos)
            .field("silence_timeout", &self.silence_timeout)
            .field("keepalive", &self.keepalive)
            .field("status_interval", &self.status_interval)
            .field("backoff_min", &self.backoff_min)
            .field("backoff_max", &self.backoff_max)
            .finish()
    }
}

impl MqttConfig {
    /// Defaults for site `site_id`: broker 127.0.0.1:1883, topics
    /// `site/<id>/dispatch`, `site/<id>/status`, `site/<id>/ack`, QoS 1.
    pub fn for_site(site_id: &str) -> MqttConfig {
        MqttConfig {
            host: "127.0.0.1".into(),
            port: 1883,
            client_id: format!("gridproxy-{site_id}"),
            username: None,
            password: None,
            tls: None,
            dispatch_topic: format!("site/{site_id}/dispatch"),
            status_topic: format!("site/{site_id}/status"),
            ack_topic: format!("site/{site_id}/ack"),
            qos: 1,
            silence_timeout: Duration::from_secs(240),
            keepalive: Duration::from_secs(30),
            status_interval: Duration::from_secs(10),
            backoff_min: Duration::from_millis(500),
            backoff_max: Duration::from_secs(30),
        }
    }

    /// The engine's dispatch staleness rule for this client: stale after
    /// the silence timeout, then curtail everything.
    pub fn freshness(&self) -> Freshness {
        Freshness {
            max_age: self.silence_timeout,
            on_stale: SafeState::CurtailAll,
        }
    }

    /// Check values rumqttc would otherwise panic on or misuse.
    pub fn validate(&self) -> Result<(), MqttError> {
        let bad = |m: String| Err(MqttError::Config(m));
        if self.host.is_empty() {
            return bad("empty broker host".into());
        }
        if self.client_id.is_empty() {
            return bad("empty client id".into());
        }
        if !rumqttc::valid_filter(&self.dispatch_topic) {
            return bad(format!("bad dispatch topic {:?}", self.dispatch_topic));
        }
        for (name, t) in [("status", &self.status_topic), ("ack", &self.ack_topic)] {
            if t.is_empty() || !rumqttc::valid_topic(t) {
                return bad(format!("bad {name} topic {t:?} (no wildcards)"));
            }
        }
        if self.qos > 2 {
            return bad(format!("qos {} not in 0..=2", self.qos));
        }
        if self.password.is_some() && self.username.is_none() {
            return bad("password without a user name".into());
        }
        if let Some(t) = &self.tls {
            if t.client_cert.is_some() != t.client_key.is_some() {
                return bad("client_cert and client_key go together".into());
            }
        }
        if self.keepalive < Duration::from_secs(1) {
            return bad("keepalive under 1 s".into());
        }
        if self.silence_timeout.is_zero() || self.status_interval.is_zero() {
            return bad("zero silence timeout or status interval".into());
        }
        if self.backoff_min.is_zero() || self.backoff_max < self.backoff_min {
            return bad("backoff_min must be > 0 and <= backoff_max".into());
        }
        Ok(())
    }

    fn qos(&self) -> QoS {
        match self.qos {
            0 => QoS::AtMostOnce,
            1 => QoS::AtLeastOnce,
            _ => QoS::ExactlyOnce,
        }
    }
}

/// Client errors.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum MqttError {
    /// The configuration is unusable.
    #[error("mqtt config: {0}")]
    Config(String),
}

/// What the client has seen so far (a `watch` snapshot).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ClientState {
    /// Connected to the broker now.
    pub connected: bool,
    /// Successful connections (the first plus reconnects).
    pub connects: u64,
    /// Failed connection attempts and dropped connections.
    pub connection_errors: u64,
    /// The last connection error, in words.
    pub last_error: Option<String>,
    /// Dispatch messages handed to the engine.
    pub accepted: u64,
    /// Dispatch messages refused.
    pub rejected: u64,
    /// The last refusal, in words.
    pub last_reject: Option<String>,
    /// When the last accepted dispatch was received (client clock).
    pub last_dispatch: Option<Timestamp>,
    /// Acks and statuses dropped because the outgoing queue was full.
    pub dropped_publishes: u64,
}

/// A running client. Dropping it stops the client.
#[derive(Debug)]
pub struct MqttHandle {
    state: watch::Receiver<ClientState>,
    cancel: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for MqttHandle {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

impl MqttHandle {
    /// The latest state.
    pub fn state(&self) -> ClientState {
        self.state.borrow().clone()
    }

    /// A receiver of state snapshots.
    pub fn watch(&self) -> watch::Receiver<ClientState> {
        self.state.clone()
    }

    /// Wait until `f` holds (or `timeout`, real time); the state that did.
    pub async fn wait_for(
        &self,
        timeout: Duration,
        mut f: impl FnMut(&ClientState) -> bool,
    ) -> Option<ClientState> {
        let mut rx = self.state.clone();
        let r = tokio::time::timeout(timeout, rx.wait_for(|s| f(s))).await;
        match r {
            Ok(Ok(s)) => Some(s.clone()),
            _ => None,
        }
    }

    /// Publish `online: false`, disconnect, and wait for the task (at most
    /// about two seconds).
    pub async fn shutdown(mut self) {
        self.cancel.cancel();
        if let Some(t) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(3), t).await;
        }
    }
}

/// Outgoing requests queued in rumqttc while the broker is away; beyond
/// this, acks and statuses are dropped (counted) rather than piling up.
const REQUEST_QUEUE: usize = 64;
/// Dispatch payloads waiting for the worker.
const INBOX: usize = 256;

/// Start the client. `nominal_kw` is the fleet's nominal draw (for
/// percentages), `signals` the driver's channel, `status` what the caller
/// reports about the site, `clock` the driver's clock.
pub fn spawn<C>(
    cfg: MqttConfig,
    nominal_kw: f64,
    signals: mpsc::Sender<Signal>,
    status: watch::Receiver<SiteStatus>,
    clock: C,
) -> Result<MqttHandle, MqttError>
where
    C: Clock + Send + Sync + 'static,
{
    cfg.validate()?;
    let mut opts = MqttOptions::new(cfg.client_id.clone(), cfg.host.clone(), cfg.port);
    opts.set_keep_alive(Duration::from_secs(cfg.keepalive.as_secs().max(1)));
    opts.set_clean_session(true);
    opts.set_request_channel_capacity(REQUEST_QUEUE);
    // Room for oversize payloads to reach our own check (a refusal ack)
    // instead of tearing the connection down.
    opts.set_max_packet_size(64 * 1024, 64 * 1024);
    if let Some(t) = &cfg.tls {
        let c = t
            .client_config()
            .map_err(|e| MqttError::Config(format!("tls: {e}")))?;
        opts.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
            Arc::new(c),
        )));
    }
    if let Some(u) = &cfg.username {
        opts.set_credentials(u.clone(), cfg.password.clone().unwrap_or_default());
    }
    let will = serde_json::json!({ "online": false }).to_string();
    opts.set_last_will(LastWill::new(&cfg.status_topic, will, cfg.qos(), true));
    let (client, eventloop) = AsyncClient::new(opts, REQUEST_QUEUE);

    let (state_tx, state_rx) = watch::channel(ClientState::default());
    let cancel = CancellationToken::new();
    let shared = Arc::new(Shared {
        cfg,
        client,
        state: state_tx,
        nominal_kw,
    });
    let (inbox_tx, inbox_rx) = mpsc::channel(INBOX);
    let net = network(shared.clone(), eventloop, inbox_tx, cancel.clone());
    let work = worker(
        shared.clone(),
        inbox_rx,
        signals,
        status,
        clock,
        cancel.clone(),
    );
    let task = tokio::spawn(async move {
        tokio::join!(net, work);
    });
    Ok(MqttHandle {
        state: state_rx,
        cancel,
        task: Some(task),
    })
}

struct Shared {
    cfg: MqttConfig,
    client: AsyncClient,
    state: watch::Sender<ClientState>,
    nominal_kw: f64,
}

impl Shared {
    /// Queue a publish without waiting: a full queue (broker away) drops it.
    fn publish(&self, topic: &str, retain: bool, body: String) {
        if let Err(e) = self.client.try_publish(topic, self.cfg.qos(), retain, body) {
            tracing::debug!("mqtt: publish on {topic} dropped: {e}");
            self.state.send_modify(|s| s.dropped_publishes += 1);
        }
    }
}

/// An error in words an operator can act on.
fn describe(e: &ConnectionError, broker: &str) -> String {
    if let Some(why) = tls::tls_failure(e) {
        return format!("TLS handshake with broker {broker} failed: {why}");
    }
    match e {
        ConnectionError::ConnectionRefused(ConnectReturnCode::BadUserNamePassword) => {
            format!("broker {broker} refused the login: bad user name or password")
        }
        ConnectionError::ConnectionRefused(ConnectReturnCode::NotAuthorized) => format!(
            "broker {broker} refused the login: not authorized (check user name and password)"
        ),
        ConnectionError::ConnectionRefused(code) => {
            format!("broker {broker} refused the connection: {code:?}")
        }
        ConnectionError::Io(io) => format!("broker {broker} unreachable: {io}"),
        ConnectionError::Tls(t) => format!("TLS with broker {broker} failed: {t}"),
        other => format!("broker {broker}: {other}"),
    }
}

/// Drive the rumqttc event loop: connect, (re)subscribe, pass dispatch
/// payloads to the worker, back off on errors.
async fn network(
    sh: Arc<Shared>,
    mut el: EventLoop,
    inbox: mpsc::Sender<(bool, Vec<u8>)>,
    cancel: CancellationToken,
) {
    let broker = format!("{}:{}", sh.cfg.host, sh.cfg.port);
    let mut backoff = sh.cfg.backoff_min;
    loop {
        let ev = tokio::select! {
            _ = cancel.cancelled() => break,
            ev = el.poll() => ev,
        };
        match ev {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                backoff = sh.cfg.backoff_min;
                // Clean session: the subscription goes with the connection.
                if let Err(e) = sh
                    .client
                    .try_subscribe(sh.cfg.dispatch_topic.clone(), sh.cfg.qos())
                {
                    tracing::warn!("mqtt: subscribe to {} failed: {e}", sh.cfg.dispatch_topic);
                }
                tracing::info!(
                    "mqtt: connected to {broker}, subscribing to {}",
                    sh.cfg.dispatch_topic
                );
                sh.state.send_modify(|s| {
                    s.connected = true;
                    s.connects += 1;
                });
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                if !rumqttc::matches(&p.topic, &sh.cfg.dispatch_topic) {
                    continue;
                }
                if inbox.try_send((p.retain, p.payload.to_vec())).is_err() {
                    tracing::warn!("mqtt: dispatch inbox full, message dropped");
                }
            }
            Ok(_) => {}
            Err(e) => {
                let msg = describe(&e, &broker);
                // Refused logins and TLS failures need the operator, not patience.
                let fatal = matches!(
                    e,
                    ConnectionError::ConnectionRefused(_) | ConnectionError::Tls(_)
                );
                if fatal {
                    tracing::error!("mqtt: {msg}; retrying in {backoff:?}");
                } else {
                    tracing::warn!("mqtt: {msg}; reconnecting in {backoff:?}");
                }
                sh.state.send_modify(|s| {
                    s.connected = false;
                    s.connection_errors += 1;
                    s.last_error = Some(msg);
                });
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(sh.cfg.backoff_max);
            }
        }
    }
    // Say goodbye if we can (bounded: the broker may be gone).
    if sh.state.borrow().connected {
        let bye = serde_json::json!({ "online": false }).to_string();
        let _ = sh
            .client
            .try_publish(&sh.cfg.status_topic, sh.cfg.qos(), true, bye);
        let _ = sh.client.try_disconnect();
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            while let Ok(ev) = el.poll().await {
                if matches!(ev, Event::Outgoing(rumqttc::Outgoing::Disconnect)) {
                    break;
                }
            }
        })
        .await;
    }
    sh.state.send_modify(|s| s.connected = false);
}

/// Turn dispatch payloads into signals and acks; publish the status.
async fn worker<C: Clock>(
    sh: Arc<Shared>,
    mut inbox: mpsc::Receiver<(bool, Vec<u8>)>,
    signals: mpsc::Sender<Signal>,
    status: watch::Receiver<SiteStatus>,
    clock: C,
    cancel: CancellationToken,
) {
    let mut tick = tokio::time::interval(sh.cfg.status_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut connects = 0;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            m = inbox.recv() => {
                let Some((retained, body)) = m else { break };
                handle_dispatch(&sh, &signals, &clock, retained, &body).await;
            }
            _ = tick.tick() => publish_status(&sh, &status, &clock),
        }
        // A fresh connection gets a status at once (retained for late readers).
        let c = sh.state.borrow().connects;
        if c != connects {
            connects = c;
            publish_status(&sh, &status, &clock);
        }
    }
}

async fn handle_dispatch<C: Clock>(
    sh: &Shared,
    signals: &mpsc::Sender<Signal>,
    clock: &C,
    retained: bool,
    body: &[u8],
) {
    let now = clock.now();
    let parsed = payload::parse(body);
    let id = match &parsed {
        Ok(m) => m.id.clone(),
        Err(_) => payload::salvage_id(body),
    };
    let result = parsed.and_then(|m| {
        // A retained message may be arbitrarily old: without ts its age is
        // unknown, so it must not count as a heartbeat.
        if retained && m.ts.is_none() {
            return Err(RejectReason::Shape(
                "retained message without ts (age unknown)".into(),
            ));
        }
        m.to_signal(now, sh.nominal_kw, sh.cfg.silence_timeout)
    });
    let result = match result {
        Ok(sig) => match signals.send(Signal::Dispatch(sig)).await {
            Ok(()) => Ok(sig),
            Err(_) => Err("curtailment driver stopped".to_string()),
        },
        Err(e) => Err(e.to_string()),
    };
    let ack = match &result {
        Ok(sig) => {
            tracing::info!("mqtt: dispatch {id:?}: target {:?} kW", sig.target_kw);
            sh.state.send_modify(|s| {
                s.accepted += 1;
                s.last_dispatch = Some(now);
            });
            Ack {
                id,
                accepted: true,
                target_kw: sig.target_kw,
                reason: None,
                received_ms: now.as_millis(),
            }
        }
        Err(reason) => {
            tracing::warn!("mqtt: dispatch {id:?} refused: {reason}");
            sh.state.send_modify(|s| {
                s.rejected += 1;
                s.last_reject = Some(reason.clone());
            });
            Ack {
                id,
                accepted: false,
                target_kw: None,
                reason: Some(reason.clone()),
                received_ms: now.as_millis(),
            }
        }
    };
    match serde_json::to_string(&ack) {
        Ok(body) => sh.publish(&sh.cfg.ack_topic, false, body),
        Err(e) => tracing::error!("mqtt: ack not serialisable: {e}"),
    }
}

fn publish_status<C: Clock>(sh: &Shared, status: &watch::Receiver<SiteStatus>, clock: &C) {
    if !sh.state.borrow().connected {
        return;
    }
    let now = clock.now();
    let last = sh.state.borrow().last_dispatch;
    let msg = StatusMessage {
        online: true,
        ts_ms: now.as_millis(),
        dispatch_age_s: last.map(|t| (now - t).as_secs_f64()),
        site: status.borrow().clone(),
    };
    match serde_json::to_string(&msg) {
        Ok(body) => sh.publish(&sh.cfg.status_topic, true, body),
        Err(e) => tracing::error!("mqtt: status not serialisable: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Grid-link secrets never reach a log through `Debug`.
    #[test]
    fn secrets_stay_out_of_debug() {
        let mut m = MqttConfig::for_site("s1");
        m.username = Some("ops".into());
        m.password = Some("mqtt-pass-123".into());
        let d = format!("{m:?}");
        assert!(
            !d.contains("mqtt-pass-123") && d.contains("<redacted>") && d.contains("ops"),
            "{d}"
        );
        let v = crate::openadr::VenConfig::new(
            "https://vtn.example",
            "ven-1",
            "oauth-secret-456",
            "ven",
        );
        let d = format!("{v:?}");
        assert!(
            !d.contains("oauth-secret-456") && d.contains("ven-1"),
            "{d}"
        );
    }

    #[test]
    fn config_checks() {
        let ok = MqttConfig::for_site("s1");
        assert_eq!(ok.validate().ok(), Some(()));
        assert_eq!(ok.dispatch_topic, "site/s1/dispatch");
        assert_eq!(ok.freshness().max_age, Duration::from_secs(240));
        assert_eq!(ok.freshness().on_stale, SafeState::CurtailAll);
        let bad = |f: fn(&mut MqttConfig)| {
            let mut c = MqttConfig::for_site("s1");
            f(&mut c);
            c.validate().is_err()
        };
        assert!(bad(|c| c.status_topic = "site/+/status".into()));
        assert!(bad(|c| c.ack_topic = String::new()));
        assert!(bad(|c| c.dispatch_topic = "a/#/b".into()));
        assert!(bad(|c| c.qos = 3));
        assert!(bad(|c| c.keepalive = Duration::from_millis(500)));
        assert!(bad(|c| c.password = Some("x".into())));
        assert!(bad(|c| c.backoff_max = Duration::from_millis(1)));
        assert!(bad(|c| {
            c.tls = Some(TlsOptions {
                client_key: Some("k.pem".into()),
                ..TlsOptions::default()
            })
        }));
        // A wildcard dispatch filter is fine.
        let mut c = MqttConfig::for_site("s1");
        c.dispatch_topic = "site/+/dispatch".into();
        assert!(c.validate().is_ok());
    }

    #[test]
    fn errors_read_well() {
        let e = ConnectionError::ConnectionRefused(ConnectReturnCode::NotAuthorized);
        assert!(describe(&e, "127.0.0.1:1").contains("refused the login"));
        let e = ConnectionError::Io(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert!(describe(&e, "127.0.0.1:1").contains("unreachable"));
        let bad_ca = rumqttc::TlsError::TLS(tls::rustls::Error::InvalidCertificate(
            tls::rustls::CertificateError::UnknownIssuer,
        ));
        let m = describe(&ConnectionError::Tls(bad_ca), "127.0.0.1:1");
        assert!(m.contains("TLS handshake") && m.contains("ca_file"), "{m}");
    }
}
