//! Energy price feeds: turn published prices into
//! [`Signal::Price`](gridproxy_curtail::signal::Signal::Price).
//!
//! - [`ercot`]: ERCOT real-time settlement-point price reports (CSV, one row
//!   per settlement point and interval, Central Prevailing Time) and
//!   day-ahead hourly prices (the forecast).
//! - [`json`]: any HTTP JSON endpoint, price and timestamp found by JSON
//!   pointers, optional forecast array.
//! - [`feed`]: the I/O edge: replay a file on the site clock, or poll a URL,
//!   and send the prices to the driver.
//!
//! Parsing is sans-IO. Every sample passes a [`Guard`] before it becomes a
//! signal: NaN, |price| over [`MAX_ABS_PRICE`] and time going backwards are
//! errors, and the sample is dropped. A feed that goes silent or bad sends
//! nothing, so the engine's staleness rule (its price max age and safe
//! state) takes over.

pub mod ercot;
pub mod feed;
pub mod json;

use gridproxy_curtail::signal::{
    PricePoint, PriceSignal, Signal, MAX_ABS_PRICE, MAX_FORECAST_POINTS,
};
use gridproxy_curtail::time::Timestamp;
use std::time::Duration;
use thiserror::Error;

/// Why a price (or a whole feed response) was rejected.
#[derive(Debug, Error, Clone, PartialEq)]
#[non_exhaustive]
pub enum PriceError {
    /// A CSV row or header is unusable.
    #[error("csv line {line}: {msg}")]
    Csv {
        /// 1-based line in the file (0: the file as a whole).
        line: u64,
        /// What is wrong.
        msg: String,
    },
    /// The JSON body is unusable.
    #[error("json: {0}")]
    Json(String),
    /// NaN, infinite or beyond ±[`MAX_ABS_PRICE`].
    #[error("price {0} $/MWh out of range (finite, |p| <= {MAX_ABS_PRICE})")]
    OutOfRange(f64),
    /// A timestamp earlier than one already accepted.
    #[error("time went backwards: {got} after {last}")]
    Backwards {
        /// Last accepted.
        last: Timestamp,
        /// Offered.
        got: Timestamp,
    },
    /// A timestamp further ahead of the local clock than the allowed skew.
    #[error(
        "sample stamped {got}, ahead of the local clock ({now}) by more than the allowed skew"
    )]
    Future {
        /// Offered.
        got: Timestamp,
        /// The local clock.
        now: Timestamp,
    },
    /// A date or time that does not parse or does not exist.
    #[error("time: {0}")]
    Time(String),
    /// Transport or HTTP status failure.
    #[error("http: {0}")]
    Http(String),
}

/// One published price.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PriceSample {
    /// Start of the interval the price is for (or publication time).
    pub at: Timestamp,
    /// $/MWh.
    pub usd_per_mwh: f64,
}

/// Check one price figure.
pub fn check_price(p: f64) -> Result<f64, PriceError> {
    if p.is_finite() && p.abs() <= MAX_ABS_PRICE {
        Ok(p)
    } else {
        Err(PriceError::OutOfRange(p))
    }
}

/// What a feed has accepted so far: drops repeats and rejects samples going
/// back in time, so a stale or replayed response never rolls the engine's
/// price back.
#[derive(Clone, Debug, Default)]
pub struct Guard {
    last: Option<Timestamp>,
}

impl Guard {
    /// A guard that has accepted nothing yet.
    pub fn new() -> Guard {
        Guard::default()
    }

    /// Last accepted time.
    pub fn last(&self) -> Option<Timestamp> {
        self.last
    }

    /// `Ok(Some)`: new, send it. `Ok(None)`: the sample already sent
    /// (same time, e.g. polled twice within an interval). `Err`: bad,
    /// including a sample stamped more than `max_skew` after `now`: taken,
    /// it would pin the price (every later, correct sample would look
    /// older) and keep it from ever going stale.
    pub fn admit(
        &mut self,
        s: PriceSample,
        now: Timestamp,
        max_skew: Duration,
    ) -> Result<Option<PriceSample>, PriceError> {
        check_price(s.usd_per_mwh)?;
        if s.at > now.saturating_add(max_skew) {
            return Err(PriceError::Future { got: s.at, now });
        }
        match self.last {
            Some(last) if s.at < last => Err(PriceError::Backwards { last, got: s.at }),
            Some(last) if s.at == last => Ok(None),
            _ => {
                self.last = Some(s.at);
                Ok(Some(s))
            }
        }
    }
}

/// The engine signal for a sample and the forecast points after it.
pub fn signal(s: PriceSample, forecast: &[PricePoint]) -> Signal {
    Signal::Price(PriceSignal {
        at: s.at,
        usd_per_mwh: s.usd_per_mwh,
        forecast: forecast
            .iter()
            .filter(|f| f.start > s.at)
            // The engine refuses a longer forecast, and the price with it:
            // keep the nearest points (callers pass them sorted).
            .take(MAX_FORECAST_POINTS)
            .copied()
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(at: u64, p: f64) -> PriceSample {
        PriceSample {
            at: Timestamp::from_secs(at),
            usd_per_mwh: p,
        }
    }

    #[test]
    fn guard_rejects_bad_prices_and_time_going_back() {
        let mut g = Guard::new();
        let now = Timestamp::from_secs(1_000);
        let skew = Duration::from_secs(120);
        let mut admit = |x| g.admit(x, now, skew);
        assert_eq!(admit(s(100, 30.0)), Ok(Some(s(100, 30.0))));
        assert_eq!(admit(s(100, 30.0)), Ok(None), "repeat is dropped quietly");
        assert!(matches!(
            admit(s(50, 31.0)),
            Err(PriceError::Backwards { .. })
        ));
        assert!(matches!(
            admit(s(200, f64::NAN)),
            Err(PriceError::OutOfRange(_))
        ));
        assert!(matches!(
            admit(s(200, 1.0e6 + 1.0)),
            Err(PriceError::OutOfRange(_))
        ));
        assert_eq!(admit(s(200, -1.0e6)), Ok(Some(s(200, -1.0e6))));
        // Rejections left the guard where it was.
        assert_eq!(admit(s(300, 9000.0)), Ok(Some(s(300, 9000.0))));
        assert_eq!(g.last(), Some(Timestamp::from_secs(300)));
    }

    /// A sample stamped a day ahead is refused and does not move the guard:
    /// the good samples after it still pass (before, it pinned the price
    /// and every later sample was refused as going backwards).
    #[test]
    fn guard_refuses_a_future_dated_sample_without_pinning() {
        let mut g = Guard::new();
        let skew = Duration::from_secs(120);
        let now = Timestamp::from_secs(10_000);
        assert_eq!(
            g.admit(s(10_000, 30.0), now, skew),
            Ok(Some(s(10_000, 30.0)))
        );
        assert!(matches!(
            g.admit(s(10_000 + 86_400, 9_000.0), now, skew),
            Err(PriceError::Future { .. })
        ));
        // Within the skew is fine: clocks drift.
        let later = Timestamp::from_secs(10_300);
        assert_eq!(
            g.admit(s(10_400, 31.0), later, skew),
            Ok(Some(s(10_400, 31.0)))
        );
        assert_eq!(g.last(), Some(Timestamp::from_secs(10_400)));
    }

    #[test]
    fn signal_keeps_only_future_forecast_points() {
        let fc = [
            PricePoint {
                start: Timestamp::from_secs(0),
                usd_per_mwh: 1.0,
            },
            PricePoint {
                start: Timestamp::from_secs(3600),
                usd_per_mwh: 2.0,
            },
        ];
        let Signal::Price(p) = signal(s(60, 5.0), &fc) else {
            panic!("price signal");
        };
        assert_eq!(p.forecast.len(), 1);
        assert_eq!(p.forecast[0].usd_per_mwh, 2.0);
        assert!(Signal::Price(p).validate().is_ok());
    }
}
