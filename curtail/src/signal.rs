//! Typed grid and operator signals: the inputs of the policy engine.
//!
//! Sources (price feeds, OpenADR, MQTT dispatch, site meters, the control
//! API) live at the edge; they parse their wire formats into these values and
//! call [`Signal::validate`] before handing them to
//! [`Engine::handle_signal`](crate::policy::Engine::handle_signal), which
//! validates again.

use serde::{Deserialize, Serialize};
use std::time::Duration;
use thiserror::Error;

use crate::command::PoolId;
use crate::time::Timestamp;

/// Largest accepted |price|, $/MWh (ERCOT's cap is 5,000; Uri held 9,000).
pub const MAX_ABS_PRICE: f64 = 1_000_000.0;
/// Largest accepted power figure, kW.
pub const MAX_KW: f64 = 100_000_000.0;
/// Most forecast points accepted in one price signal.
pub const MAX_FORECAST_POINTS: usize = 10_000;
/// Longest accepted event id, bytes.
pub const MAX_EVENT_ID_LEN: usize = 256;

/// One forecast interval: price from `start` until the next point.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct PricePoint {
    /// Interval start.
    pub start: Timestamp,
    /// Price, $/MWh (may be negative).
    pub usd_per_mwh: f64,
}

/// Real-time energy price, optionally with a forecast.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PriceSignal {
    /// When the price was published.
    pub at: Timestamp,
    /// Current price, $/MWh (may be negative).
    pub usd_per_mwh: f64,
    /// Future prices, in any order.
    #[serde(default)]
    pub forecast: Vec<PricePoint>,
}

/// Network hashprice update.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct HashpriceSignal {
    /// When it was published.
    pub at: Timestamp,
    /// Hashprice, $ per PH/s per day.
    pub usd_per_ph_day: f64,
}

/// What a demand-response event asks of the site.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum DrTarget {
    /// Keep site draw at or below this many kW.
    LimitKw(f64),
    /// Reduce site draw by this many kW from its level when the event was
    /// received.
    ShedKw(f64),
}

/// A demand-response event (OpenADR event, ERCOT deployment, …). Sending an
/// event with a known id replaces it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DrEvent {
    /// Issuer's id for the event.
    pub id: String,
    /// What is asked.
    pub target: DrTarget,
    /// Start of the window: the site must be at target by then.
    pub start: Timestamp,
    /// End of the window (`None`: until ended by [`Signal::DrEnd`]).
    pub end: Option<Timestamp>,
    /// When the issuer sent it.
    pub issued_at: Timestamp,
}

/// A continuously re-sent fleet kW target (Soluna-style dispatch). It must be
/// repeated within its configured max age or the fleet goes to the safe
/// state.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct DispatchSignal {
    /// When it was sent.
    pub at: Timestamp,
    /// Fleet draw allowed, kW (`None`: no limit, i.e. "100 %").
    pub target_kw: Option<f64>,
}

/// Measured draw of the site's other (non-mining) load.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct SiteLoadSignal {
    /// When it was measured.
    pub at: Timestamp,
    /// Non-mining load, kW.
    pub external_kw: f64,
}

/// What an operator forces.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum OverrideMode {
    /// Run every miner, ignoring prices, events and caps.
    RunAll,
    /// Curtail every miner.
    CurtailAll,
    /// Keep the fleet at or below this many kW (on top of other limits).
    CapKw(f64),
    /// Remove the override.
    Clear,
}

/// A manual override from the control API.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ManualOverride {
    /// When it was given.
    pub at: Timestamp,
    /// What it forces.
    pub mode: OverrideMode,
    /// When it lapses (`None`: until cleared).
    pub until: Option<Timestamp>,
    /// Who gave it (for the ledger).
    pub by: String,
}

/// Route the fleet's hashrate to a pool (proxy-side reroute).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct RouteSignal {
    /// When it was given.
    pub at: Timestamp,
    /// Target pool (`None`: the proxy's own default routing).
    pub pool: Option<PoolId>,
}

/// Any input signal.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Signal {
    /// Energy price.
    Price(PriceSignal),
    /// Hashprice.
    Hashprice(HashpriceSignal),
    /// New or updated DR event.
    DrEvent(DrEvent),
    /// A DR event ended or was cancelled.
    DrEnd {
        /// The event's id.
        id: String,
        /// When it ended.
        at: Timestamp,
    },
    /// Fleet kW dispatch heartbeat.
    Dispatch(DispatchSignal),
    /// Other site load.
    SiteLoad(SiteLoadSignal),
    /// Operator override.
    Override(ManualOverride),
    /// Pool routing.
    Route(RouteSignal),
}

/// The kind of a [`Signal`], as a stable string for the ledger.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SignalKind {
    /// [`Signal::Price`]
    Price,
    /// [`Signal::Hashprice`]
    Hashprice,
    /// [`Signal::DrEvent`]
    DrEvent,
    /// [`Signal::DrEnd`]
    DrEnd,
    /// [`Signal::Dispatch`]
    Dispatch,
    /// [`Signal::SiteLoad`]
    SiteLoad,
    /// [`Signal::Override`]
    Override,
    /// [`Signal::Route`]
    Route,
}

impl SignalKind {
    /// Stable lower-case name.
    pub const fn as_str(self) -> &'static str {
        match self {
            SignalKind::Price => "price",
            SignalKind::Hashprice => "hashprice",
            SignalKind::DrEvent => "dr_event",
            SignalKind::DrEnd => "dr_end",
            SignalKind::Dispatch => "dispatch",
            SignalKind::SiteLoad => "site_load",
            SignalKind::Override => "override",
            SignalKind::Route => "route",
        }
    }
}

/// Why a signal was rejected.
#[derive(Debug, Error, Clone, PartialEq)]
#[non_exhaustive]
pub enum SignalError {
    /// A number is NaN, infinite, negative where it cannot be, or too large.
    #[error("{kind} signal: {field} out of range ({value})")]
    OutOfRange {
        /// Signal kind.
        kind: &'static str,
        /// Offending field.
        field: &'static str,
        /// Its value.
        value: f64,
    },
    /// Too many forecast points.
    #[error("price signal: {0} forecast points (max {MAX_FORECAST_POINTS})")]
    ForecastTooLong(usize),
    /// Event id empty or too long.
    #[error("dr event: id length {0} not in 1..={MAX_EVENT_ID_LEN}")]
    BadEventId(usize),
    /// Event ends before it starts.
    #[error("dr event {0}: end before start")]
    EmptyWindow(String),
    /// Stamped further ahead of the local clock than the allowed skew: a
    /// feed with a broken clock would otherwise pin its value (later,
    /// correct samples look older) and never go stale.
    #[error("{kind} signal stamped {ahead_secs:.0} s ahead of the local clock (allowed skew {max_secs} s)")]
    FutureDated {
        /// Signal kind.
        kind: &'static str,
        /// How far ahead, seconds.
        ahead_secs: f64,
        /// The allowed skew, seconds.
        max_secs: u64,
    },
}

fn check(
    kind: &'static str,
    field: &'static str,
    value: f64,
    min: f64,
    max: f64,
) -> Result<(), SignalError> {
    if value.is_finite() && value >= min && value <= max {
        Ok(())
    } else {
        Err(SignalError::OutOfRange { kind, field, value })
    }
}

impl Signal {
    /// When the signal was issued or measured.
    pub fn at(&self) -> Timestamp {
        match self {
            Signal::Price(p) => p.at,
            Signal::Hashprice(h) => h.at,
            Signal::DrEvent(e) => e.issued_at,
            Signal::DrEnd { at, .. } => *at,
            Signal::Dispatch(d) => d.at,
            Signal::SiteLoad(s) => s.at,
            Signal::Override(o) => o.at,
            Signal::Route(r) => r.at,
        }
    }

    /// Its kind.
    pub fn kind(&self) -> SignalKind {
        match self {
            Signal::Price(_) => SignalKind::Price,
            Signal::Hashprice(_) => SignalKind::Hashprice,
            Signal::DrEvent(_) => SignalKind::DrEvent,
            Signal::DrEnd { .. } => SignalKind::DrEnd,
            Signal::Dispatch(_) => SignalKind::Dispatch,
            Signal::SiteLoad(_) => SignalKind::SiteLoad,
            Signal::Override(_) => SignalKind::Override,
            Signal::Route(_) => SignalKind::Route,
        }
    }

    /// Refuse a signal stamped more than `max_skew` after `now`.
    pub fn check_not_future(&self, now: Timestamp, max_skew: Duration) -> Result<(), SignalError> {
        let ahead = self.at().saturating_since(now);
        if ahead > max_skew {
            return Err(SignalError::FutureDated {
                kind: self.kind().as_str(),
                ahead_secs: ahead.as_secs_f64(),
                max_secs: max_skew.as_secs(),
            });
        }
        Ok(())
    }

    /// Check ranges and sizes.
    pub fn validate(&self) -> Result<(), SignalError> {
        match self {
            Signal::Price(p) => {
                check(
                    "price",
                    "usd_per_mwh",
                    p.usd_per_mwh,
                    -MAX_ABS_PRICE,
                    MAX_ABS_PRICE,
                )?;
                if p.forecast.len() > MAX_FORECAST_POINTS {
                    return Err(SignalError::ForecastTooLong(p.forecast.len()));
                }
                for f in &p.forecast {
                    check(
                        "price",
                        "forecast",
                        f.usd_per_mwh,
                        -MAX_ABS_PRICE,
                        MAX_ABS_PRICE,
                    )?;
                }
            }
            Signal::Hashprice(h) => check(
                "hashprice",
                "usd_per_ph_day",
                h.usd_per_ph_day,
                0.0,
                MAX_ABS_PRICE,
            )?,
            Signal::DrEvent(e) => {
                if e.id.is_empty() || e.id.len() > MAX_EVENT_ID_LEN {
                    return Err(SignalError::BadEventId(e.id.len()));
                }
                match e.target {
                    DrTarget::LimitKw(kw) => check("dr_event", "limit_kw", kw, 0.0, MAX_KW)?,
                    DrTarget::ShedKw(kw) => check("dr_event", "shed_kw", kw, 0.0, MAX_KW)?,
                }
                if e.end.is_some_and(|end| end <= e.start) {
                    return Err(SignalError::EmptyWindow(e.id.clone()));
                }
            }
            Signal::DrEnd { id, .. } => {
                if id.is_empty() || id.len() > MAX_EVENT_ID_LEN {
                    return Err(SignalError::BadEventId(id.len()));
                }
            }
            Signal::Dispatch(d) => {
                if let Some(kw) = d.target_kw {
                    check("dispatch", "target_kw", kw, 0.0, MAX_KW)?;
                }
            }
            Signal::SiteLoad(s) => check("site_load", "external_kw", s.external_kw, 0.0, MAX_KW)?,
            Signal::Override(o) => {
                if let OverrideMode::CapKw(kw) = o.mode {
                    check("override", "cap_kw", kw, 0.0, MAX_KW)?;
                }
            }
            Signal::Route(_) => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_rejects_bad_values() {
        let p = Signal::Price(PriceSignal {
            at: Timestamp::ZERO,
            usd_per_mwh: f64::NAN,
            forecast: vec![],
        });
        assert!(matches!(p.validate(), Err(SignalError::OutOfRange { .. })));
        let neg = Signal::Price(PriceSignal {
            at: Timestamp::ZERO,
            usd_per_mwh: -20.0,
            forecast: vec![],
        });
        assert_eq!(neg.validate(), Ok(()));
        let e = Signal::DrEvent(DrEvent {
            id: "e".into(),
            target: DrTarget::ShedKw(10.0),
            start: Timestamp::from_secs(10),
            end: Some(Timestamp::from_secs(5)),
            issued_at: Timestamp::ZERO,
        });
        assert!(matches!(e.validate(), Err(SignalError::EmptyWindow(_))));
        let s = Signal::SiteLoad(SiteLoadSignal {
            at: Timestamp::ZERO,
            external_kw: -1.0,
        });
        assert!(s.validate().is_err());
    }
}
