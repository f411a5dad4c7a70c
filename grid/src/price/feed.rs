//! The I/O edge of the price feeds: poll a URL (ERCOT CSV report or JSON
//! endpoint) or replay a file on the site clock, and send
//! [`Signal::Price`]s to the driver.
//!
//! A failed poll (transport error, HTTP status, unparsable body, bad price,
//! time going backwards) is logged, counted in [`FeedStatus`] and skipped;
//! nothing is sent, so the engine's price max age runs out and its safe
//! state applies if the feed stays bad.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use gridproxy_curtail::signal::{PricePoint, Signal};
use gridproxy_curtail::time::{Clock, Timestamp};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::ercot::{self, RtmOptions};
use super::json::{self, JsonFormat};
use super::{signal, Guard, PriceError, PriceSample};

/// What the polled URL serves.
#[derive(Clone, Debug, PartialEq)]
pub enum Format {
    /// An ERCOT RTM settlement-point price report (CSV).
    ErcotRtm(RtmOptions),
    /// A JSON document with the current price.
    Json(JsonFormat),
}

/// Where a day-ahead forecast comes from.
#[derive(Clone, Debug, PartialEq)]
pub enum Forecast {
    /// An ERCOT DAM settlement-point price report (CSV) at this URL.
    ErcotDam {
        /// URL.
        url: String,
        /// Settlement point.
        point: String,
    },
    /// A JSON array of points at this URL (pointer to the array, then the
    /// time and price inside each point).
    Json {
        /// URL.
        url: String,
        /// Pointer to the array ("" for the whole body).
        array: String,
        /// Pointer to a point's start time.
        time: String,
        /// Pointer to a point's price.
        price: String,
    },
}

/// A polled price feed.
#[derive(Clone, Debug, PartialEq)]
pub struct PollConfig {
    /// URL of the current price.
    pub url: String,
    /// Its format.
    pub format: Format,
    /// Time between polls (wall time).
    pub every: Duration,
    /// Per-request timeout.
    pub timeout: Duration,
    /// Day-ahead forecast, refreshed every `forecast_every`.
    pub forecast: Option<Forecast>,
    /// Time between forecast fetches (wall time).
    pub forecast_every: Duration,
    /// How far ahead of the local clock a sample may be stamped; further is
    /// skipped as an error (it would pin the price, see [`Guard`]).
    pub max_skew: Duration,
}

impl PollConfig {
    /// Poll `url` of `format` every `every`, 10 s timeout, no forecast.
    pub fn new(url: &str, format: Format, every: Duration) -> PollConfig {
        PollConfig {
            url: url.to_string(),
            format,
            every,
            timeout: Duration::from_secs(10),
            forecast: None,
            forecast_every: Duration::from_secs(900),
            max_skew: Duration::from_secs(120),
        }
    }
}

/// Counters of a running feed (shared with whoever watches it).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FeedStatus {
    /// Polls made.
    pub polls: u64,
    /// Price signals sent.
    pub sent: u64,
    /// Polls or samples rejected.
    pub errors: u64,
    /// The latest rejection.
    pub last_error: Option<String>,
    /// Every distinct kind of rejection seen, e.g. `http`, `json`, `range`.
    pub error_kinds: std::collections::BTreeSet<&'static str>,
    /// Time of the last price sent.
    pub last_at: Option<Timestamp>,
}

fn kind(e: &PriceError) -> &'static str {
    match e {
        PriceError::Csv { .. } => "csv",
        PriceError::Json(_) => "json",
        PriceError::OutOfRange(_) => "range",
        PriceError::Backwards { .. } => "backwards",
        PriceError::Future { .. } => "future",
        PriceError::Time(_) => "time",
        PriceError::Http(_) => "http",
    }
}

/// A feed that polls a URL.
pub struct PriceFeed {
    cfg: PollConfig,
    client: reqwest::Client,
    guard: Guard,
    forecast: Vec<PricePoint>,
    forecast_fetched: Option<tokio::time::Instant>,
    status: Arc<Mutex<FeedStatus>>,
}

fn is_loopback(url: &str) -> bool {
    let Some(host) = reqwest::Url::parse(url)
        .ok()
        .and_then(|u| u.host_str().map(str::to_string))
    else {
        return false;
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|a| a.is_loopback())
}

impl PriceFeed {
    /// A feed for `cfg`. Loopback URLs bypass any configured HTTP proxy.
    pub fn new(cfg: PollConfig) -> Result<PriceFeed, PriceError> {
        let mut b = reqwest::Client::builder().timeout(cfg.timeout);
        if is_loopback(&cfg.url) {
            b = b.no_proxy();
        }
        let client = b.build().map_err(|e| PriceError::Http(e.to_string()))?;
        Ok(PriceFeed {
            cfg,
            client,
            guard: Guard::new(),
            forecast: Vec::new(),
            forecast_fetched: None,
            status: Arc::default(),
        })
    }

    /// Shared counters.
    pub fn status(&self) -> Arc<Mutex<FeedStatus>> {
        self.status.clone()
    }

    async fn get(&self, url: &str) -> Result<String, PriceError> {
        let r = self
            .client
            .get(url)
            .send()
            .await
            .map_err(|e| PriceError::Http(e.to_string()))?;
        let code = r.status();
        if !code.is_success() {
            return Err(PriceError::Http(format!("{url}: status {code}")));
        }
        r.text().await.map_err(|e| PriceError::Http(e.to_string()))
    }

    async fn refresh_forecast(&mut self) -> Result<(), PriceError> {
        let Some(f) = self.cfg.forecast.clone() else {
            return Ok(());
        };
        if self
            .forecast_fetched
            .is_some_and(|t| t.elapsed() < self.cfg.forecast_every)
        {
            return Ok(());
        }
        self.forecast_fetched = Some(tokio::time::Instant::now());
        self.forecast = match f {
            Forecast::ErcotDam { url, point } => {
                let p = ercot::parse_dam(&self.get(&url).await?, &point)?;
                for e in &p.errors {
                    debug!("dam forecast row skipped: {e}");
                }
                p.rows
            }
            Forecast::Json {
                url,
                array,
                time,
                price,
            } => {
                let v: serde_json::Value = serde_json::from_str(&self.get(&url).await?)
                    .map_err(|e| PriceError::Json(e.to_string()))?;
                let a = v
                    .pointer(&array)
                    .ok_or_else(|| PriceError::Json(format!("nothing at {array:?}")))?;
                json::forecast_of(a, &time, &price)?
            }
        };
        Ok(())
    }

    /// Fetch and parse once: the new samples (oldest first) with the
    /// forecast, or why the poll was rejected.
    pub async fn poll_once(&mut self, now: Timestamp) -> Result<Vec<Signal>, PriceError> {
        if let Err(e) = self.refresh_forecast().await {
            // A bad forecast does not stop the price: keep the last one.
            self.note_error(&e);
        }
        let body = self.get(&self.cfg.url.clone()).await?;
        let (samples, forecast) = match &self.cfg.format {
            Format::Json(fmt) => {
                let r = json::parse(&body, fmt, now)?;
                if let Some(e) = &r.forecast_error {
                    self.note_error(e);
                }
                let fc = if r.forecast.is_empty() {
                    self.forecast.clone()
                } else {
                    r.forecast
                };
                (vec![r.sample], fc)
            }
            Format::ErcotRtm(opts) => {
                let mut p = ercot::parse_rtm(&body, opts)?;
                for e in &p.errors {
                    self.note_error(e);
                }
                // Rows stamped in the future are errors of the feed; the
                // rows before them are still good.
                let limit = now.saturating_add(self.cfg.max_skew);
                if let Some(bad) = p.rows.iter().find(|s| s.at > limit) {
                    self.note_error(&PriceError::Future { got: bad.at, now });
                    p.rows.retain(|s| s.at <= limit);
                }
                let newest = p.rows.last().copied().ok_or_else(|| PriceError::Csv {
                    line: 0,
                    msg: format!("no rows for {}", opts.point),
                })?;
                // A report carries history: only rows after the last sent.
                let fresh: Vec<PriceSample> = match self.guard.last() {
                    Some(last) if newest.at < last => {
                        return Err(PriceError::Backwards {
                            last,
                            got: newest.at,
                        })
                    }
                    Some(last) => p.rows.into_iter().filter(|s| s.at > last).collect(),
                    None => vec![newest],
                };
                (fresh, self.forecast.clone())
            }
        };
        let mut out = Vec::new();
        for s in samples {
            if let Some(s) = self.guard.admit(s, now, self.cfg.max_skew)? {
                out.push(signal(s, &forecast));
            }
        }
        Ok(out)
    }

    fn note_error(&self, e: &PriceError) {
        warn!(url = %self.cfg.url, "price feed: {e}; skipped");
        let mut st = self.status.lock().unwrap_or_else(|p| p.into_inner());
        st.errors += 1;
        st.error_kinds.insert(kind(e));
        st.last_error = Some(e.to_string());
    }

    /// Poll until `cancel`, sending every new price to `tx`.
    pub async fn run(
        mut self,
        tx: mpsc::Sender<Signal>,
        clock: impl Clock,
        cancel: CancellationToken,
    ) {
        let mut tick = tokio::time::interval(self.cfg.every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tick.tick() => {}
            }
            let polled = self.poll_once(clock.now()).await;
            self.status.lock().unwrap_or_else(|p| p.into_inner()).polls += 1;
            match polled {
                Ok(sigs) => {
                    for s in sigs {
                        let at = s.at();
                        if tx.send(s).await.is_err() {
                            return; // driver gone
                        }
                        let mut st = self.status.lock().unwrap_or_else(|p| p.into_inner());
                        st.sent += 1;
                        st.last_at = Some(at);
                    }
                }
                Err(e) => self.note_error(&e),
            }
        }
    }
}

/// Replays recorded samples on a live clock: the first sample is due at
/// `start`, the others keep their spacing (`at` shifted by the same amount).
#[derive(Clone, Debug)]
pub struct Replay {
    samples: Vec<PriceSample>,
    forecast: Vec<PricePoint>,
    next: usize,
    first: Timestamp,
    start: Timestamp,
}

impl Replay {
    /// Replay `samples` (sorted by time) from `start`; `forecast` points are
    /// shifted the same way.
    pub fn new(
        mut samples: Vec<PriceSample>,
        forecast: Vec<PricePoint>,
        start: Timestamp,
    ) -> Replay {
        samples.sort_by_key(|s| s.at);
        let first = samples.first().map_or(start, |s| s.at);
        Replay {
            samples,
            forecast,
            next: 0,
            first,
            start,
        }
    }

    fn shift(&self, t: Timestamp) -> Timestamp {
        self.start + (t - self.first)
    }

    /// Signals due by `now` (sample times shifted to the replay clock).
    pub fn due(&mut self, now: Timestamp) -> Vec<Signal> {
        let mut out = Vec::new();
        while let Some(s) = self.samples.get(self.next).copied() {
            let at = self.shift(s.at);
            if at > now {
                break;
            }
            let fc: Vec<PricePoint> = self
                .forecast
                .iter()
                .filter(|f| f.start >= self.first)
                .map(|f| PricePoint {
                    start: self.shift(f.start),
                    usd_per_mwh: f.usd_per_mwh,
                })
                .collect();
            out.push(signal(
                PriceSample {
                    at,
                    usd_per_mwh: s.usd_per_mwh,
                },
                &fc,
            ));
            self.next += 1;
        }
        out
    }

    /// When the next sample is due, if any is left.
    pub fn next_at(&self) -> Option<Timestamp> {
        self.samples.get(self.next).map(|s| self.shift(s.at))
    }

    /// Send every sample when due until done or `cancel`, checking `clock`
    /// every `tick` (wall time).
    pub async fn run(
        mut self,
        tx: mpsc::Sender<Signal>,
        clock: impl Clock,
        tick: Duration,
        cancel: CancellationToken,
    ) {
        while self.next_at().is_some() {
            for s in self.due(clock.now()) {
                if tx.send(s).await.is_err() {
                    return;
                }
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(tick) => {}
            }
        }
    }
}

/// Read an ERCOT RTM file for replay; rejected rows are logged.
pub fn read_rtm_file(
    path: &std::path::Path,
    opts: &RtmOptions,
) -> anyhow::Result<Vec<PriceSample>> {
    let text =
        std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let p =
        ercot::parse_rtm(&text, opts).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    for e in &p.errors {
        warn!("{}: {e}; row skipped", path.display());
    }
    anyhow::ensure!(
        !p.rows.is_empty(),
        "{}: no rows for settlement point {} (points in file: {:?})",
        path.display(),
        opts.point,
        p.points
    );
    Ok(p.rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replay_keeps_spacing_from_start() {
        let s = |t: u64, p: f64| PriceSample {
            at: Timestamp::from_secs(t),
            usd_per_mwh: p,
        };
        let mut r = Replay::new(
            vec![s(1000, 1.0), s(1300, 2.0), s(1600, 3.0)],
            vec![PricePoint {
                start: Timestamp::from_secs(1900),
                usd_per_mwh: 9.0,
            }],
            Timestamp::from_secs(50),
        );
        let d = r.due(Timestamp::from_secs(50));
        assert_eq!(d.len(), 1);
        let Signal::Price(p) = &d[0] else { panic!() };
        assert_eq!(p.at, Timestamp::from_secs(50));
        assert_eq!(p.forecast[0].start, Timestamp::from_secs(950));
        assert_eq!(r.next_at(), Some(Timestamp::from_secs(350)));
        assert_eq!(r.due(Timestamp::from_secs(700)).len(), 2);
        assert!(r.next_at().is_none());
    }

    #[test]
    fn loopback_detection() {
        assert!(is_loopback("http://127.0.0.1:8080/p"));
        assert!(is_loopback("http://localhost/p"));
        assert!(is_loopback("http://[::1]:1/"));
        assert!(!is_loopback("http://10.0.0.1/"));
    }
}
