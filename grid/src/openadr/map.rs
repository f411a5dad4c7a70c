//! OpenADR 3 events -> engine signals. Pure: no clock, no I/O; the VEN task
//! passes `now` and the site's measured kW in.
//!
//! Mapping (per interval of an event):
//! - `IMPORT_CAPACITY_LIMIT` (kW) -> [`DrTarget::LimitKw`].
//! - `DISPATCH_SETPOINT` (kW) -> [`DrTarget::LimitKw`] as well: an OpenADR
//!   event has a window and is not re-sent, which is what a DR event is;
//!   the engine's `Dispatch` signal is a heartbeat that goes to the safe
//!   state when it stops, which an event does not do.
//! - `SIMPLE` level 0..=3 -> shed the configured fraction of the site's draw
//!   (when the event is received); a fraction >= 1 is `LimitKw(0)` (sleep
//!   every controllable miner); level 0 asks for nothing.
//! - `PRICE` -> a price schedule; the interval covering `now` is the price,
//!   later ones the forecast.
//!
//! Units: kW types accept `KW` (or none: kW is assumed), `MW` and `W`;
//! `PRICE` accepts per `KWH` (or none) and per `MWH`, currency USD (or none).
//! Anything else the VEN cannot honour faithfully is a [`SkipReason`]: the
//! event is skipped whole, never half-applied.

use chrono::{DateTime, Utc};
use gridproxy_curtail::signal::{DrEvent, DrTarget, PricePoint, PriceSignal, Signal};
use gridproxy_curtail::time::Timestamp;
use openleadr_wire::event::{Event, EventPayloadDescriptor, EventType};
use openleadr_wire::interval::IntervalPeriod;
use openleadr_wire::values_map::Value;
use openleadr_wire::Unit;
use thiserror::Error;

/// Mapping knobs.
#[derive(Clone, Debug, PartialEq)]
pub struct MapConfig {
    /// Fraction of site draw to shed per `SIMPLE` level 0, 1, 2, 3
    /// (0.0 = nothing, >= 1.0 = sleep everything controllable).
    pub simple_shed: [f64; 4],
}

impl Default for MapConfig {
    fn default() -> Self {
        MapConfig {
            simple_shed: [0.0, 0.5, 1.0, 1.0],
        }
    }
}

/// Why an event was skipped.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum SkipReason {
    /// Not an OpenADR 3 event object at all.
    #[error("not an OpenADR 3 event: {0}")]
    Parse(String),
    /// No intervals.
    #[error("event has no intervals")]
    NoIntervals,
    /// No payload of a type this VEN acts on.
    #[error("no payload type this VEN acts on (got {0})")]
    Unsupported(String),
    /// Units the VEN cannot convert.
    #[error("{kind}: units {units} not accepted")]
    Units {
        /// Payload type.
        kind: String,
        /// Units given.
        units: String,
    },
    /// A price in another currency.
    #[error("PRICE: currency {0} not accepted (USD only)")]
    Currency(String),
    /// A value missing, of the wrong type or out of range.
    #[error("{kind} in interval {interval}: {why}")]
    Value {
        /// Payload type.
        kind: String,
        /// Interval id.
        interval: i32,
        /// What is wrong.
        why: String,
    },
    /// Interval timing that cannot be worked out.
    #[error("interval {interval}: {why}")]
    Timing {
        /// Interval id.
        interval: i32,
        /// What is wrong.
        why: String,
    },
    /// The resulting signal failed the engine's own validation.
    #[error("rejected by the engine's validation: {0}")]
    Invalid(String),
}

/// A price schedule: (start, end, $/MWh), in interval order.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PriceSchedule {
    /// The intervals.
    pub points: Vec<(Timestamp, Option<Timestamp>, f64)>,
}

impl PriceSchedule {
    /// The price signal at `now`: the interval covering `now` and every later
    /// one as the forecast; `None` when no interval covers `now`.
    pub fn at(&self, now: Timestamp) -> Option<PriceSignal> {
        let current = self
            .points
            .iter()
            .rev()
            .find(|(s, e, _)| *s <= now && e.is_none_or(|e| now < e))?;
        Some(PriceSignal {
            at: now,
            usd_per_mwh: current.2,
            forecast: self
                .points
                .iter()
                .filter(|(s, _, _)| *s > now)
                .map(|&(start, _, usd_per_mwh)| PricePoint { start, usd_per_mwh })
                .collect(),
        })
    }
}

/// What one event asks of the site.
#[derive(Clone, Debug, PartialEq)]
pub struct Mapped {
    /// The VTN's event id.
    pub id: String,
    /// `modificationDateTime` as sent (a change means: map again).
    pub modified: String,
    /// kW obligations, one per interval that asks for one.
    pub dr: Vec<DrEvent>,
    /// Price schedule, if the event carries prices.
    pub price: Option<PriceSchedule>,
    /// Payload types present but not acted on (logged, not an error).
    pub ignored: Vec<String>,
}

impl Mapped {
    /// The signals to send now.
    pub fn signals(&self, now: Timestamp) -> Vec<Signal> {
        let mut out: Vec<Signal> = self.dr.iter().cloned().map(Signal::DrEvent).collect();
        if let Some(p) = self.price.as_ref().and_then(|p| p.at(now)) {
            out.push(Signal::Price(p));
        }
        out
    }
}

/// The event id and modification time of a raw event, for bookkeeping even
/// when the rest does not parse.
pub fn event_key(raw: &serde_json::Value) -> Option<(String, String)> {
    let id = raw.get("id")?.as_str()?.to_string();
    let modified = raw
        .get("modificationDateTime")
        .and_then(|m| m.as_str())
        .unwrap_or_default()
        .to_string();
    Some((id, modified))
}

/// Map one raw event (as the VTN sent it) at wall time `now`, with the site
/// drawing `site_kw`.
pub fn map_event(
    raw: &serde_json::Value,
    now: Timestamp,
    site_kw: f64,
    cfg: &MapConfig,
) -> Result<Mapped, SkipReason> {
    let ev: Event =
        serde_json::from_value(raw.clone()).map_err(|e| SkipReason::Parse(e.to_string()))?;
    let mut m = map_wire_event(&ev, now, site_kw, cfg)?;
    // Keep the VTN's own spelling: the VEN compares it with the next list.
    if let Some((_, modified)) = event_key(raw) {
        m.modified = modified;
    }
    Ok(m)
}

/// Like [`map_event`], for an already parsed event.
pub fn map_wire_event(
    ev: &Event,
    now: Timestamp,
    site_kw: f64,
    cfg: &MapConfig,
) -> Result<Mapped, SkipReason> {
    let c = &ev.content;
    let intervals = c.intervals.as_deref().unwrap_or_default();
    if intervals.is_empty() {
        return Err(SkipReason::NoIntervals);
    }
    let descriptors = c.payload_descriptors.as_deref().unwrap_or_default();
    let id = ev.id.as_str().to_string();
    let issued_at = millis(&ev.modification_date_time, now);
    let mut dr = Vec::new();
    let mut prices = Vec::new();
    let mut ignored = Vec::new();
    let mut acted = false;
    let mut default_start: Option<Timestamp> = None;
    for (k, iv) in intervals.iter().enumerate() {
        let (start, end) = window(
            iv.interval_period.as_ref(),
            c.interval_period.as_ref(),
            k,
            &mut default_start,
            now,
        )
        .map_err(|why| SkipReason::Timing {
            interval: iv.id,
            why,
        })?;
        let mut limit: Option<f64> = None;
        let mut shed: Option<f64> = None;
        for p in &iv.payloads {
            let kind = type_name(&p.value_type);
            let value = || first_number(&p.values, &kind, iv.id);
            match &p.value_type {
                EventType::ImportCapacityLimit | EventType::DispatchSetpoint => {
                    let scale = kw_scale(descriptor(descriptors, &p.value_type), &kind)?;
                    let kw = value()? * scale;
                    if !(kw.is_finite() && kw >= 0.0) {
                        return Err(bad(&kind, iv.id, format!("{kw} kW is not a limit")));
                    }
                    limit = Some(limit.map_or(kw, |l: f64| l.min(kw)));
                    acted = true;
                }
                EventType::Simple => {
                    let level = first_integer(&p.values, &kind, iv.id)?;
                    let frac = usize::try_from(level)
                        .ok()
                        .and_then(|l| cfg.simple_shed.get(l))
                        .ok_or_else(|| bad(&kind, iv.id, format!("level {level} not in 0..=3")))?;
                    if *frac >= 1.0 {
                        limit = Some(0.0);
                    } else if *frac > 0.0 {
                        shed = Some(frac * site_kw.max(0.0));
                    }
                    acted = true;
                }
                EventType::Price => {
                    let scale = price_scale(descriptor(descriptors, &p.value_type))?;
                    let v = value()? * scale;
                    prices.push((start, end, v));
                    acted = true;
                }
                _ => ignored.push(kind),
            }
        }
        let target = match (limit, shed) {
            (Some(kw), _) => Some(DrTarget::LimitKw(kw)),
            (None, Some(kw)) => Some(DrTarget::ShedKw(kw)),
            (None, None) => None,
        };
        if let Some(target) = target {
            dr.push((iv.id, target, start, end));
        }
    }
    if !acted {
        return Err(SkipReason::Unsupported(if ignored.is_empty() {
            "no payloads".into()
        } else {
            ignored.join(", ")
        }));
    }
    let single = dr.len() == 1;
    let dr: Vec<DrEvent> = dr
        .into_iter()
        .map(|(iv, target, start, end)| DrEvent {
            // One obligation per interval; the engine replaces by id.
            id: if single {
                id.clone()
            } else {
                format!("{id}/{iv}")
            },
            target,
            start,
            end,
            issued_at,
        })
        .collect();
    let price = (!prices.is_empty()).then_some(PriceSchedule { points: prices });
    let mapped = Mapped {
        id,
        modified: ev.modification_date_time.to_rfc3339(),
        dr,
        price,
        ignored,
    };
    for s in mapped.signals(now) {
        s.validate()
            .map_err(|e| SkipReason::Invalid(e.to_string()))?;
    }
    if let Some(p) = &mapped.price {
        for &(_, _, v) in &p.points {
            Signal::Price(PriceSignal {
                at: now,
                usd_per_mwh: v,
                forecast: vec![],
            })
            .validate()
            .map_err(|e| SkipReason::Invalid(e.to_string()))?;
        }
    }
    Ok(mapped)
}

fn bad(kind: &str, interval: i32, why: String) -> SkipReason {
    SkipReason::Value {
        kind: kind.to_string(),
        interval,
        why,
    }
}

/// The wire name of a payload type (`IMPORT_CAPACITY_LIMIT`, `x-custom`).
fn type_name(t: &EventType) -> String {
    match serde_json::to_value(t) {
        Ok(serde_json::Value::String(s)) => s,
        _ => format!("{t:?}"),
    }
}

fn descriptor<'a>(
    ds: &'a [EventPayloadDescriptor],
    t: &EventType,
) -> Option<&'a EventPayloadDescriptor> {
    ds.iter().find(|d| &d.payload_type == t)
}

fn unit_name(u: &Unit) -> String {
    match serde_json::to_value(u) {
        Ok(serde_json::Value::String(s)) => s,
        _ => format!("{u:?}"),
    }
}

/// kW per unit of a power payload.
fn kw_scale(d: Option<&EventPayloadDescriptor>, kind: &str) -> Result<f64, SkipReason> {
    let Some(units) = d.and_then(|d| d.units.as_ref()) else {
        return Ok(1.0);
    };
    match units {
        Unit::KW => Ok(1.0),
        Unit::Private(p) if p.eq_ignore_ascii_case("MW") => Ok(1000.0),
        Unit::Private(p) if p.eq_ignore_ascii_case("W") => Ok(0.001),
        other => Err(SkipReason::Units {
            kind: kind.to_string(),
            units: unit_name(other),
        }),
    }
}

/// $/MWh per unit of a price payload.
fn price_scale(d: Option<&EventPayloadDescriptor>) -> Result<f64, SkipReason> {
    if let Some(c) = d.and_then(|d| d.currency.as_ref()) {
        if c.code() != "USD" {
            return Err(SkipReason::Currency(c.code().to_string()));
        }
    }
    match d.and_then(|d| d.units.as_ref()) {
        None | Some(Unit::KWH) => Ok(1000.0),
        Some(Unit::Private(p)) if p.eq_ignore_ascii_case("MWH") => Ok(1.0),
        Some(other) => Err(SkipReason::Units {
            kind: "PRICE".into(),
            units: unit_name(other),
        }),
    }
}

fn first_number(values: &[Value], kind: &str, interval: i32) -> Result<f64, SkipReason> {
    match values.first() {
        Some(Value::Number(n)) => Ok(*n),
        Some(Value::Integer(i)) => Ok(*i as f64),
        Some(other) => Err(bad(kind, interval, format!("{other:?} is not a number"))),
        None => Err(bad(kind, interval, "no values".into())),
    }
}

fn first_integer(values: &[Value], kind: &str, interval: i32) -> Result<i64, SkipReason> {
    match values.first() {
        Some(Value::Integer(i)) => Ok(*i),
        Some(Value::Number(n)) if n.fract() == 0.0 && n.is_finite() => Ok(*n as i64),
        Some(other) => Err(bad(kind, interval, format!("{other:?} is not a level"))),
        None => Err(bad(kind, interval, "no values".into())),
    }
}

/// Wall millis of a timestamp; the spec's "0001-01-01" (anything before the
/// Unix epoch) means "now".
fn millis(t: &DateTime<Utc>, now: Timestamp) -> Timestamp {
    u64::try_from(t.timestamp_millis()).map_or(now, Timestamp::from_millis)
}

/// Start and end of interval `k`. Per the OpenADR 3 user guide: an
/// interval's own `intervalPeriod` wins; otherwise intervals follow each
/// other from the event's `intervalPeriod.start`, each its `duration` long.
/// No duration, or `P9999Y`, is open-ended (until cancelled).
fn window(
    own: Option<&IntervalPeriod>,
    event: Option<&IntervalPeriod>,
    k: usize,
    next_start: &mut Option<Timestamp>,
    now: Timestamp,
) -> Result<(Timestamp, Option<Timestamp>), String> {
    let duration = own
        .and_then(|p| p.duration.as_ref())
        .or_else(|| event.and_then(|p| p.duration.as_ref()));
    let start = match (own, event) {
        (Some(p), _) => millis(&p.start, now),
        (None, Some(p)) if k == 0 => millis(&p.start, now),
        (None, Some(_)) => next_start.ok_or_else(|| {
            "follows an open-ended interval (no duration to place it by)".to_string()
        })?,
        (None, None) => return Err("no intervalPeriod on the interval or the event".into()),
    };
    // iso8601-duration panics when a span leaves chrono's range: keep the
    // start before 10000 and the span under 10000 years (longer is
    // open-ended anyway, see P9999Y below).
    if start.as_millis() > 253_402_300_799_999 {
        return Err("start after the year 9999".into());
    }
    let start_dt = DateTime::<Utc>::from_timestamp_millis(start.as_millis() as i64)
        .ok_or_else(|| "start out of range".to_string())?;
    let end = match duration {
        None => None,
        Some(d) if nominal_days(d)? > 10_000.0 * 366.0 => None,
        Some(d) => {
            let ms = d.to_chrono_at_datetime(start_dt).num_milliseconds();
            if ms <= 0 {
                return Err(format!("duration {d:?} is not positive"));
            }
            // P9999Y: "until further notice".
            if ms >= 9_000 * 365 * 86_400_000 {
                None
            } else {
                Some(start + std::time::Duration::from_millis(ms as u64))
            }
        }
    };
    *next_start = end;
    Ok((start, end))
}

/// An upper bound of a duration in days, from the wire's fixed
/// `PnYnMnDTnHnMnS` form (the type keeps its fields private).
fn nominal_days(d: &openleadr_wire::Duration) -> Result<f64, String> {
    let text = d.to_string();
    let mut c = [0.0f64; 6];
    let mut parts = text
        .strip_prefix('P')
        .unwrap_or_default()
        .split(['Y', 'M', 'D', 'T', 'H', 'S'])
        .filter(|p| !p.is_empty());
    for x in &mut c {
        *x = parts
            .next()
            .and_then(|p| p.parse().ok())
            .filter(|x: &f64| x.is_finite() && *x >= 0.0)
            .ok_or_else(|| format!("duration {text} is not a span of time"))?;
    }
    Ok(c[0] * 366.0 + c[1] * 31.0 + c[2] + (c[3] + c[4] / 60.0 + c[5] / 3600.0) / 24.0)
}

#[cfg(test)]
mod tests;
