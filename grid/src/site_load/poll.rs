//! The meter I/O edge: read every interval on the site clock, send good
//! readings to the driver, count and log bad ones.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use gridproxy_curtail::signal::{Signal, SiteLoadSignal};
use gridproxy_curtail::time::{EdgeClock, Timestamp};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::http_json::HttpJsonMeter;
use super::modbus::{self, ModbusMeter};
use super::prometheus::PrometheusMeter;
use super::{check_kw, MeterError};

/// Largest HTTP body read, bytes (a meter answer is tiny).
const MAX_BODY: usize = 1 << 20;

/// A configured meter.
#[derive(Clone, Debug, PartialEq)]
pub enum Meter {
    /// Prometheus instant query.
    Prometheus(PrometheusMeter),
    /// Modbus TCP power meter.
    Modbus(ModbusMeter),
    /// HTTP JSON meter.
    HttpJson(HttpJsonMeter),
}

/// How to poll. Durations are site-clock time.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PollConfig {
    /// Time between reads.
    pub interval: Duration,
    /// Longest a read may take; a late read is skipped.
    pub timeout: Duration,
    /// Readings above this are absurd and skipped, kW.
    pub max_kw: f64,
}

impl Default for PollConfig {
    fn default() -> Self {
        PollConfig {
            interval: Duration::from_secs(1),
            timeout: Duration::from_millis(800),
            max_kw: 1_000_000.0,
        }
    }
}

/// Counters of a running poller.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MeterStatus {
    /// Readings sent to the engine.
    pub ok: u64,
    /// Readings skipped.
    pub errors: u64,
    /// Last good reading: when, kW.
    pub last: Option<(Timestamp, f64)>,
    /// Last error.
    pub last_error: Option<String>,
}

/// One meter with its open connection (HTTP client or Modbus context).
pub struct Poller {
    meter: Meter,
    cfg: PollConfig,
    http: reqwest::Client,
    modbus: Option<tokio_modbus::client::Context>,
}

impl std::fmt::Debug for Poller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Poller")
            .field("meter", &self.meter)
            .field("cfg", &self.cfg)
            .field("connected", &self.modbus.is_some())
            .finish()
    }
}

impl Poller {
    /// A poller for `meter`. Fails on a configuration that cannot work
    /// (bad URL, non-positive interval or factor, NaN limits).
    pub fn new(meter: Meter, cfg: PollConfig) -> Result<Poller, MeterError> {
        if cfg.interval.is_zero() || cfg.timeout.is_zero() {
            return Err(MeterError::Config(
                "interval and timeout must be > 0".into(),
            ));
        }
        if !(cfg.max_kw.is_finite() && cfg.max_kw > 0.0) {
            return Err(MeterError::Config("max_kw must be > 0".into()));
        }
        let factor = match &meter {
            Meter::Prometheus(p) => {
                p.url()?;
                p.factor
            }
            Meter::HttpJson(h) => {
                h.parsed_url()?;
                h.factor
            }
            Meter::Modbus(m) => m.scale,
        };
        if !(factor.is_finite() && factor > 0.0) {
            return Err(MeterError::Config(format!("factor {factor} must be > 0")));
        }
        let http = reqwest::Client::builder()
            .build()
            .map_err(|e| MeterError::Config(format!("http client: {e}")))?;
        Ok(Poller {
            meter,
            cfg,
            http,
            modbus: None,
        })
    }

    /// One reading, kW, range-checked (no timeout: see [`spawn`]).
    pub async fn read(&mut self) -> Result<f64, MeterError> {
        let kw = match &self.meter {
            Meter::Prometheus(p) => {
                let body = get(&self.http, p.url()?).await?;
                p.decode(&body)?
            }
            Meter::HttpJson(h) => {
                let body = get(&self.http, h.parsed_url()?).await?;
                h.decode(&body)?
            }
            Meter::Modbus(m) => {
                if self.modbus.is_none() {
                    self.modbus = Some(modbus::connect(m).await?);
                }
                let ctx = self.modbus.as_mut().expect("connected above");
                match modbus::read(ctx, m).await {
                    Ok(v) => v,
                    Err(e) => {
                        // Reconnect next time unless the meter itself answered.
                        if !matches!(e, MeterError::ModbusException(_)) {
                            self.modbus = None;
                        }
                        return Err(e);
                    }
                }
            }
        };
        check_kw(kw, self.cfg.max_kw)
    }
}

/// GET `url`, the body if the status is a success (bounded size).
async fn get(http: &reqwest::Client, url: reqwest::Url) -> Result<Vec<u8>, MeterError> {
    let mut resp = http
        .get(url)
        .send()
        .await
        .map_err(|e| MeterError::Transport(e.to_string()))?;
    if !resp.status().is_success() {
        return Err(MeterError::Status(resp.status().as_u16()));
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp
        .chunk()
        .await
        .map_err(|e| MeterError::Transport(e.to_string()))?
    {
        body.extend_from_slice(&chunk);
        if body.len() > MAX_BODY {
            return Err(MeterError::Format(format!("body over {MAX_BODY} bytes")));
        }
    }
    Ok(body)
}

/// Poll `poller` every interval until `stop` (or the driver's channel
/// closes), sending each good reading as a [`Signal::SiteLoad`] stamped with
/// `clock` at the start of the read. Bad readings are logged, counted in the
/// returned status and skipped.
pub fn spawn<C: EdgeClock + Clone>(
    mut poller: Poller,
    clock: C,
    tx: mpsc::Sender<Signal>,
    stop: CancellationToken,
) -> (Arc<Mutex<MeterStatus>>, JoinHandle<()>) {
    let status = Arc::new(Mutex::new(MeterStatus::default()));
    let st = status.clone();
    let cfg = poller.cfg;
    let task = tokio::spawn(async move {
        let mut tick = tokio::time::interval(clock.real(cfg.interval));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tick.tick() => {}
            }
            let at = clock.now();
            let res = tokio::select! {
                _ = stop.cancelled() => break,
                r = tokio::time::timeout(clock.real(cfg.timeout), poller.read()) => {
                    r.unwrap_or(Err(MeterError::Timeout(cfg.timeout)))
                }
            };
            if matches!(res, Err(MeterError::Timeout(_))) {
                // The half-done Modbus transaction may answer later: start over.
                poller.modbus = None;
            }
            match res {
                Ok(kw) => {
                    let sig = Signal::SiteLoad(SiteLoadSignal {
                        at,
                        external_kw: kw,
                    });
                    if tx.send(sig).await.is_err() {
                        break;
                    }
                    let mut s = st.lock().unwrap_or_else(|p| p.into_inner());
                    s.ok += 1;
                    s.last = Some((at, kw));
                }
                Err(e) => {
                    tracing::warn!(meter = ?poller.meter, error = %e, "site-load reading skipped");
                    let mut s = st.lock().unwrap_or_else(|p| p.into_inner());
                    s.errors += 1;
                    s.last_error = Some(e.to_string());
                }
            }
        }
    });
    (status, task)
}

#[cfg(test)]
mod tests {
    use super::*;
    use gridproxy_curtail::time::ScaledClock;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A one-route HTTP server on loopback answering `bodies` in turn (the
    /// last one forever).
    async fn serve(bodies: Vec<(u16, &'static str)>) -> std::net::SocketAddr {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            let mut i = 0usize;
            while let Ok((mut s, _)) = l.accept().await {
                let (code, body) = bodies[i.min(bodies.len() - 1)];
                i += 1;
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let resp = format!(
                    "HTTP/1.1 {code} X\r\ncontent-type: application/json\r\n\
                     content-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
            }
        });
        addr
    }

    #[tokio::test]
    async fn good_readings_become_signals_bad_ones_are_skipped() {
        let addr = serve(vec![
            (200, r#"{"power":{"kw":120.5}}"#),
            (200, r#"{"power":{"kw":"NaN"}}"#),
            (200, r#"{"power":{"kw":-3}}"#),
            (200, r#"{"power":{"kw":5000000}}"#),
            (200, r#"{"power":"#),
            (500, r#"{}"#),
            (200, r#"{"power":{"kw":130}}"#),
        ])
        .await;
        let poller = Poller::new(
            Meter::HttpJson(HttpJsonMeter {
                url: format!("http://{addr}/meter"),
                pointer: "/power/kw".into(),
                factor: 1.0,
            }),
            PollConfig {
                interval: Duration::from_millis(200),
                ..PollConfig::default()
            },
        )
        .unwrap();
        let (tx, mut rx) = mpsc::channel(16);
        let stop = CancellationToken::new();
        let (status, task) = spawn(poller, ScaledClock::new(10.0), tx, stop.clone());
        let mut got = vec![];
        while got.len() < 2 {
            let s = tokio::time::timeout(Duration::from_secs(5), rx.recv())
                .await
                .expect("signals keep coming")
                .expect("channel open");
            let Signal::SiteLoad(s) = s else {
                panic!("site load signal")
            };
            assert!(Signal::SiteLoad(s).validate().is_ok());
            got.push(s.external_kw);
        }
        stop.cancel();
        task.await.unwrap();
        assert_eq!(got, [120.5, 130.0]);
        let s = status.lock().unwrap().clone();
        assert_eq!(s.errors, 5, "{s:?}");
        assert!(s.ok >= 2);
    }

    #[tokio::test]
    async fn a_dead_meter_sends_nothing() {
        // A port with nothing listening.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        drop(l);
        let meter = Meter::Modbus(ModbusMeter {
            addr: addr.to_string(),
            unit: 1,
            kind: modbus::RegisterKind::Holding,
            address: 0,
            data_type: modbus::DataType::F32,
            word_order: modbus::WordOrder::HighFirst,
            scale: 1.0,
        });
        let poller = Poller::new(
            meter,
            PollConfig {
                interval: Duration::from_millis(500),
                ..PollConfig::default()
            },
        )
        .unwrap();
        let (tx, mut rx) = mpsc::channel(16);
        let stop = CancellationToken::new();
        let (status, task) = spawn(poller, ScaledClock::new(10.0), tx, stop.clone());
        let r = tokio::time::timeout(Duration::from_millis(600), rx.recv()).await;
        assert!(r.is_err(), "no signal from a dead meter: {r:?}");
        stop.cancel();
        task.await.unwrap();
        let s = status.lock().unwrap().clone();
        assert!(s.errors >= 3 && s.ok == 0, "{s:?}");
        assert!(s.last_error.unwrap().contains("modbus connect"));
    }

    #[test]
    fn bad_configs_are_refused() {
        let h = HttpJsonMeter {
            url: "http://127.0.0.1:1/".into(),
            pointer: "/kw".into(),
            factor: 1.0,
        };
        assert!(Poller::new(Meter::HttpJson(h.clone()), PollConfig::default()).is_ok());
        let zero = PollConfig {
            interval: Duration::ZERO,
            ..PollConfig::default()
        };
        assert!(Poller::new(Meter::HttpJson(h.clone()), zero).is_err());
        let nan = HttpJsonMeter {
            factor: f64::NAN,
            ..h
        };
        assert!(Poller::new(Meter::HttpJson(nan), PollConfig::default()).is_err());
    }
}
