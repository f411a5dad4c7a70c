//! Sans-IO wire formats of MQTT dispatch: dispatch messages in,
//! acknowledgements and status out.
//!
//! A dispatch message (topic `site/<id>/dispatch`) is UTF-8 JSON, one of:
//!
//! - `{"target_pct": 0..=100}`: fleet draw as a percentage of the fleet's
//!   nominal kW; 100 means "no limit";
//! - `{"target_kw": 1234.5}`: fleet draw in kW;
//! - a bare number, e.g. `40` or `12.5`: a percentage, as `target_pct`.
//!
//! Objects may also carry `"id"` (string or number, echoed in the ack) and
//! `"ts"` (the dispatcher's send time, Unix seconds, may be fractional).
//! With `ts` the signal's age is the dispatcher's: a message older than the
//! silence timeout is refused as stale, one more than [`MAX_FUTURE_SKEW`]
//! ahead is refused (wrong unit or clock), and a slightly future `ts` is
//! clamped to now, so a skewed clock cannot stretch the heartbeat. Other
//! fields are ignored (forward compatible); exactly one of `target_pct` and
//! `target_kw` is required.

use std::time::Duration;

use gridproxy_curtail::policy::Mode;
use gridproxy_curtail::signal::{DispatchSignal, Signal, MAX_EVENT_ID_LEN, MAX_KW};
use gridproxy_curtail::time::Timestamp;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use thiserror::Error;

/// Largest dispatch payload accepted, bytes.
pub const MAX_PAYLOAD: usize = 4096;
/// How far ahead of our clock a `ts` may be before it is refused.
pub const MAX_FUTURE_SKEW: Duration = Duration::from_secs(300);

/// What a dispatch message asks for.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum DispatchTarget {
    /// Percentage of the fleet's nominal kW (0..=100).
    Percent(f64),
    /// Fleet kW.
    Kw(f64),
}

/// A parsed dispatch message.
#[derive(Clone, Debug, PartialEq)]
pub struct DispatchMessage {
    /// The dispatcher's id for the message.
    pub id: Option<String>,
    /// The dispatcher's send time.
    pub ts: Option<Timestamp>,
    /// The target.
    pub target: DispatchTarget,
}

/// Why a dispatch message was refused (sent back in the ack's `reason`).
#[derive(Debug, Error, Clone, PartialEq)]
pub enum RejectReason {
    /// Payload larger than [`MAX_PAYLOAD`].
    #[error("payload of {0} bytes exceeds {MAX_PAYLOAD}")]
    TooLarge(usize),
    /// Not UTF-8 or not JSON.
    #[error("not a JSON dispatch message: {0}")]
    Syntax(String),
    /// JSON, but not a number or an object with one target.
    #[error("bad dispatch message: {0}")]
    Shape(String),
    /// A number outside its range.
    #[error("{field} out of range: {value}")]
    OutOfRange {
        /// The field.
        field: &'static str,
        /// Its value.
        value: f64,
    },
    /// `ts` older than the silence timeout.
    #[error("stale: sent {age_s:.1} s ago (silence timeout {max_s:.0} s)")]
    Stale {
        /// Age of the message, s.
        age_s: f64,
        /// The silence timeout, s.
        max_s: f64,
    },
    /// `ts` too far ahead of our clock.
    #[error("ts {ahead_s:.1} s in the future (expected Unix seconds)")]
    Future {
        /// How far ahead, s.
        ahead_s: f64,
    },
    /// The fleet's nominal kW is unknown, so a percentage has no meaning.
    #[error("target_pct needs the fleet's nominal kW, which is {0}")]
    NoNominal(f64),
}

/// The JSON object form.
#[derive(Deserialize)]
struct Wire {
    #[serde(default)]
    id: Option<Value>,
    #[serde(default)]
    ts: Option<f64>,
    #[serde(default)]
    target_pct: Option<f64>,
    #[serde(default)]
    target_kw: Option<f64>,
}

fn id_of(v: &Value) -> Result<Option<String>, RejectReason> {
    let s = match v {
        Value::Null => return Ok(None),
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        _ => {
            return Err(RejectReason::Shape(
                "id must be a string or a number".into(),
            ))
        }
    };
    if s.is_empty() || s.len() > MAX_EVENT_ID_LEN {
        return Err(RejectReason::Shape(format!(
            "id length {} not in 1..={MAX_EVENT_ID_LEN}",
            s.len()
        )));
    }
    Ok(Some(s))
}

fn in_range(field: &'static str, value: f64, max: f64) -> Result<f64, RejectReason> {
    if value.is_finite() && (0.0..=max).contains(&value) {
        Ok(value)
    } else {
        Err(RejectReason::OutOfRange { field, value })
    }
}

/// Best-effort id of a payload that failed to parse, for its rejection ack.
pub fn salvage_id(payload: &[u8]) -> Option<String> {
    if payload.len() > MAX_PAYLOAD {
        return None;
    }
    let v: Value = serde_json::from_slice(payload).ok()?;
    id_of(v.get("id")?).ok().flatten()
}

/// Parse a dispatch payload (format in the module docs).
pub fn parse(payload: &[u8]) -> Result<DispatchMessage, RejectReason> {
    if payload.len() > MAX_PAYLOAD {
        return Err(RejectReason::TooLarge(payload.len()));
    }
    let text = std::str::from_utf8(payload)
        .map_err(|e| RejectReason::Syntax(format!("not UTF-8: {e}")))?;
    let v: Value =
        serde_json::from_str(text.trim()).map_err(|e| RejectReason::Syntax(e.to_string()))?;
    match v {
        Value::Number(n) => {
            let pct = n
                .as_f64()
                .ok_or_else(|| RejectReason::Shape("number not representable".into()))?;
            Ok(DispatchMessage {
                id: None,
                ts: None,
                target: DispatchTarget::Percent(in_range("target_pct", pct, 100.0)?),
            })
        }
        Value::Object(_) => {
            let w: Wire =
                serde_json::from_value(v).map_err(|e| RejectReason::Shape(e.to_string()))?;
            let id = match &w.id {
                Some(v) => id_of(v)?,
                None => None,
            };
            let ts = match w.ts {
                None => None,
                Some(s) => {
                    // Up to year ~5000 in seconds; catches milliseconds.
                    let s = in_range("ts", s, 1e11)?;
                    Some(Timestamp::from_millis((s * 1000.0).round() as u64))
                }
            };
            let target = match (w.target_pct, w.target_kw) {
                (Some(p), None) => DispatchTarget::Percent(in_range("target_pct", p, 100.0)?),
                (None, Some(k)) => DispatchTarget::Kw(in_range("target_kw", k, MAX_KW)?),
                (Some(_), Some(_)) => {
                    return Err(RejectReason::Shape(
                        "give one of target_pct and target_kw, not both".into(),
                    ))
                }
                (None, None) => {
                    return Err(RejectReason::Shape(
                        "missing target_pct or target_kw".into(),
                    ))
                }
            };
            Ok(DispatchMessage { id, ts, target })
        }
        _ => Err(RejectReason::Shape(
            "expected a number (percent) or an object".into(),
        )),
    }
}

impl DispatchMessage {
    /// The engine signal for this message received at `now`.
    ///
    /// `nominal_kw` converts percentages (100 % is "no limit", as the engine
    /// reads `target_kw: None`); `silence` is the dispatch max age.
    pub fn to_signal(
        &self,
        now: Timestamp,
        nominal_kw: f64,
        silence: Duration,
    ) -> Result<DispatchSignal, RejectReason> {
        let at = match self.ts {
            None => now,
            Some(ts) if ts > now + MAX_FUTURE_SKEW => {
                return Err(RejectReason::Future {
                    ahead_s: (ts - now).as_secs_f64(),
                })
            }
            Some(ts) if ts + silence < now => {
                return Err(RejectReason::Stale {
                    age_s: (now - ts).as_secs_f64(),
                    max_s: silence.as_secs_f64(),
                })
            }
            Some(ts) => ts.min(now),
        };
        let target_kw = match self.target {
            DispatchTarget::Kw(kw) => Some(kw),
            DispatchTarget::Percent(p) if p >= 100.0 => None,
            DispatchTarget::Percent(p) => {
                if !(nominal_kw.is_finite() && nominal_kw > 0.0) {
                    return Err(RejectReason::NoNominal(nominal_kw));
                }
                Some(nominal_kw * p / 100.0)
            }
        };
        let sig = DispatchSignal { at, target_kw };
        // The engine validates again; refuse here so the ack tells the truth.
        Signal::Dispatch(sig)
            .validate()
            .map_err(|e| RejectReason::Shape(e.to_string()))?;
        Ok(sig)
    }
}

/// Acknowledgement of one dispatch message (published on the ack topic).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Ack {
    /// The message's `id`, if it had one.
    pub id: Option<String>,
    /// Whether it was handed to the engine.
    pub accepted: bool,
    /// Fleet kW asked for (`None` with `accepted`: no limit).
    pub target_kw: Option<f64>,
    /// Why it was refused.
    pub reason: Option<String>,
    /// When it was received, Unix ms (site clock).
    pub received_ms: u64,
}

/// What the caller reports about the site, for the status topic.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SiteStatus {
    /// Measured site (fleet) draw, kW.
    pub site_kw: Option<f64>,
    /// Fleet cap in force, kW (`None`: no limit).
    pub target_kw: Option<f64>,
    /// Binding constraint (`normal`, `dispatch`, `safe_state`, …).
    pub mode: String,
    /// Miners hashing.
    pub miners_running: usize,
    /// Miners asleep or otherwise curtailed.
    pub miners_asleep: usize,
}

impl SiteStatus {
    /// Fill the engine-side fields from a mode and figures.
    pub fn with_engine(mut self, mode: Mode, cap_kw: Option<f64>, kw: Option<f64>) -> Self {
        self.mode = mode.as_str().into();
        self.target_kw = cap_kw;
        self.site_kw = kw;
        self
    }
}

/// A status message (published retained on the status topic).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StatusMessage {
    /// `false` only in the last-will message the broker sends when the
    /// client vanishes.
    pub online: bool,
    /// When it was sent, Unix ms (site clock).
    pub ts_ms: u64,
    /// Seconds since the last accepted dispatch (`None`: none yet).
    pub dispatch_age_s: Option<f64>,
    /// The site's figures.
    #[serde(flatten)]
    pub site: SiteStatus,
}

#[cfg(test)]
mod tests {
    use super::*;

    const SILENCE: Duration = Duration::from_secs(240);

    fn now() -> Timestamp {
        Timestamp::from_secs(1_700_000_000)
    }

    #[test]
    fn percent_kw_and_bare_numbers() {
        let m = parse(br#"{"target_pct": 40, "id": "d-1"}"#).unwrap();
        assert_eq!(m.id.as_deref(), Some("d-1"));
        let s = m.to_signal(now(), 200.0, SILENCE).unwrap();
        assert_eq!(s.target_kw, Some(80.0));
        assert_eq!(s.at, now());

        let m = parse(br#"{"target_kw": 1234.5, "id": 7}"#).unwrap();
        assert_eq!(m.id.as_deref(), Some("7"));
        assert_eq!(m.target, DispatchTarget::Kw(1234.5));

        let m = parse(b" 12.5\n").unwrap();
        assert_eq!(m.target, DispatchTarget::Percent(12.5));
        let s = m.to_signal(now(), 1000.0, SILENCE).unwrap();
        assert_eq!(s.target_kw, Some(125.0));

        // 100 % is "no limit"; 0 % is zero.
        let full = parse(b"100").unwrap().to_signal(now(), 10.0, SILENCE);
        assert_eq!(full.unwrap().target_kw, None);
        let zero = parse(br#"{"target_pct":0}"#).unwrap();
        assert_eq!(
            zero.to_signal(now(), 10.0, SILENCE).unwrap().target_kw,
            Some(0.0)
        );
    }

    #[test]
    fn malformed_payloads_are_refused() {
        for (p, want) in [
            (&b"{"[..], "not a JSON"),
            (&b"\xff\xfe"[..], "not UTF-8"),
            (&b"\"forty\""[..], "expected a number"),
            (&b"[40]"[..], "expected a number"),
            (&b"{}"[..], "missing target"),
            (&b"{\"target_pct\":1,\"target_kw\":1}"[..], "not both"),
            (&b"{\"target_pct\":101}"[..], "target_pct out of range"),
            (&b"-1"[..], "target_pct out of range"),
            (&b"{\"target_kw\":-5}"[..], "target_kw out of range"),
            (&b"{\"target_kw\":\"5\"}"[..], "bad dispatch"),
            (&b"{\"target_kw\":5,\"id\":{}}"[..], "id must be"),
            (&b"{\"target_kw\":5,\"id\":\"\"}"[..], "id length"),
            (&b"{\"target_kw\":5,\"ts\":1e15}"[..], "ts out of range"),
            (&b"1e999"[..], "not a JSON"),
        ] {
            let e = parse(p).expect_err(std::str::from_utf8(p).unwrap_or("bytes"));
            assert!(e.to_string().contains(want), "{p:?}: {e}");
        }
        let big = vec![b' '; MAX_PAYLOAD + 1];
        assert_eq!(parse(&big), Err(RejectReason::TooLarge(MAX_PAYLOAD + 1)));
    }

    #[test]
    fn salvages_the_id_of_a_bad_message() {
        assert_eq!(
            salvage_id(br#"{"id":"x9","target_pct":"high"}"#).as_deref(),
            Some("x9")
        );
        assert_eq!(salvage_id(b"garbage"), None);
    }

    #[test]
    fn ts_sets_the_age_and_is_bounded() {
        let n = now();
        let at = |ts: f64| {
            let p = format!(r#"{{"target_pct":50,"ts":{ts}}}"#);
            parse(p.as_bytes())
                .unwrap()
                .to_signal(n, 100.0, SILENCE)
                .map(|s| s.at)
        };
        let secs = n.as_millis() as f64 / 1000.0;
        assert_eq!(at(secs - 10.5), Ok(n - Duration::from_millis(10_500)));
        // Slightly ahead: clamped, cannot extend the heartbeat.
        assert_eq!(at(secs + 30.0), Ok(n));
        assert!(matches!(at(secs - 241.0), Err(RejectReason::Stale { .. })));
        assert!(matches!(at(secs + 301.0), Err(RejectReason::Future { .. })));
    }

    #[test]
    fn percent_needs_a_nominal() {
        let m = parse(b"50").unwrap();
        assert!(matches!(
            m.to_signal(now(), 0.0, SILENCE),
            Err(RejectReason::NoNominal(_))
        ));
        // kW targets do not.
        let m = parse(br#"{"target_kw":5}"#).unwrap();
        assert!(m.to_signal(now(), f64::NAN, SILENCE).is_ok());
    }

    #[test]
    fn status_serialises_flat() {
        let s = StatusMessage {
            online: true,
            ts_ms: 5,
            dispatch_age_s: Some(1.5),
            site: SiteStatus::default().with_engine(Mode::Dispatch, Some(3.0), Some(2.9)),
        };
        let v: Value = serde_json::to_value(&s).unwrap();
        assert_eq!(v["mode"], "dispatch");
        assert_eq!(v["target_kw"], 3.0);
        assert_eq!(v["online"], true);
        let back: StatusMessage = serde_json::from_value(v).unwrap();
        assert_eq!(back, s);
    }
}
