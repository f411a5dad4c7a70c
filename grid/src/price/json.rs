//! Price from an HTTP JSON endpoint (sans-IO): the price and its timestamp
//! are found by JSON pointers (RFC 6901), e.g. `/lmp` and `/timestamp` in
//! `{"timestamp":"2023-08-17T19:45:00-05:00","lmp":5078.4}`. An optional
//! array of forecast points (day-ahead prices) becomes the signal's
//! forecast.
//!
//! Timestamps: an RFC 3339 string with offset, or a number of seconds since
//! the Unix epoch (milliseconds if above 10^11).

use gridproxy_curtail::signal::PricePoint;
use gridproxy_curtail::time::Timestamp;
use serde_json::Value;

use super::{check_price, PriceError, PriceSample};

/// Where the figures are in the JSON body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JsonFormat {
    /// Pointer to the price, $/MWh (number or numeric string).
    pub price: String,
    /// Pointer to the price's timestamp; `None`: the time it was received.
    pub time: Option<String>,
    /// Pointer to an array of forecast points, if the body carries them.
    pub forecast: Option<String>,
    /// Inside each forecast point: pointer to its start time.
    pub forecast_time: String,
    /// Inside each forecast point: pointer to its price.
    pub forecast_price: String,
}

impl Default for JsonFormat {
    fn default() -> Self {
        JsonFormat {
            price: "/lmp".into(),
            time: Some("/timestamp".into()),
            forecast: None,
            forecast_time: "/start".into(),
            forecast_price: "/price".into(),
        }
    }
}

/// One response, parsed.
#[derive(Clone, Debug, PartialEq)]
pub struct Reading {
    /// The current price.
    pub sample: PriceSample,
    /// Forecast points (empty if none or if they were bad).
    pub forecast: Vec<PricePoint>,
    /// Why the forecast was dropped, if it was.
    pub forecast_error: Option<PriceError>,
}

fn at<'a>(v: &'a Value, pointer: &str) -> Result<&'a Value, PriceError> {
    v.pointer(pointer)
        .ok_or_else(|| PriceError::Json(format!("nothing at {pointer:?}")))
}

fn price_of(v: &Value, pointer: &str) -> Result<f64, PriceError> {
    let x = at(v, pointer)?;
    let p = match x {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse::<f64>().ok(),
        _ => None,
    }
    .ok_or_else(|| PriceError::Json(format!("{pointer:?} is not a number: {x}")))?;
    check_price(p)
}

/// A JSON timestamp value.
pub fn time_of(v: &Value) -> Result<Timestamp, PriceError> {
    match v {
        Value::String(s) => {
            let t: jiff::Timestamp = s
                .trim()
                .parse()
                .map_err(|e| PriceError::Time(format!("{s:?}: {e}")))?;
            u64::try_from(t.as_millisecond())
                .map(Timestamp::from_millis)
                .map_err(|_| PriceError::Time(format!("{s:?} before 1970")))
        }
        Value::Number(n) => {
            let x = n
                .as_f64()
                .filter(|x| x.is_finite() && *x >= 0.0 && *x < 1.0e15)
                .ok_or_else(|| PriceError::Time(format!("epoch {n} out of range")))?;
            let ms = if x > 1.0e11 { x } else { x * 1000.0 };
            Ok(Timestamp::from_millis(ms as u64))
        }
        other => Err(PriceError::Time(format!("not a timestamp: {other}"))),
    }
}

/// Forecast points from an array value.
pub fn forecast_of(
    v: &Value,
    time_ptr: &str,
    price_ptr: &str,
) -> Result<Vec<PricePoint>, PriceError> {
    let arr = v
        .as_array()
        .ok_or_else(|| PriceError::Json("forecast is not an array".into()))?;
    let mut out = arr
        .iter()
        .map(|p| {
            Ok(PricePoint {
                start: time_of(at(p, time_ptr)?)?,
                usd_per_mwh: price_of(p, price_ptr)?,
            })
        })
        .collect::<Result<Vec<_>, PriceError>>()?;
    out.sort_by_key(|p| p.start);
    Ok(out)
}

/// Parse a response body. `received`: when it arrived (used as the time if
/// the format has no timestamp).
pub fn parse(body: &str, fmt: &JsonFormat, received: Timestamp) -> Result<Reading, PriceError> {
    let v: Value = serde_json::from_str(body).map_err(|e| PriceError::Json(e.to_string()))?;
    let usd_per_mwh = price_of(&v, &fmt.price)?;
    let at_ = match &fmt.time {
        Some(p) => time_of(at(&v, p)?)?,
        None => received,
    };
    let (forecast, forecast_error) = match &fmt.forecast {
        None => (Vec::new(), None),
        Some(p) => {
            match at(&v, p).and_then(|a| forecast_of(a, &fmt.forecast_time, &fmt.forecast_price)) {
                Ok(f) => (f, None),
                Err(e) => (Vec::new(), Some(e)),
            }
        }
    };
    Ok(Reading {
        sample: PriceSample {
            at: at_,
            usd_per_mwh,
        },
        forecast,
        forecast_error,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn price_and_time_by_pointer() {
        let fmt = JsonFormat::default();
        let r = parse(
            r#"{"timestamp":"2023-08-17T19:45:00-05:00","lmp":5078.4}"#,
            &fmt,
            Timestamp::ZERO,
        )
        .unwrap();
        assert_eq!(r.sample.usd_per_mwh, 5078.4);
        assert_eq!(r.sample.at, Timestamp::from_secs(1_692_319_500));
        let r = parse(
            r#"{"timestamp":1692319500,"lmp":"-12.5"}"#,
            &fmt,
            Timestamp::ZERO,
        )
        .unwrap();
        assert_eq!(r.sample.usd_per_mwh, -12.5);
        assert_eq!(r.sample.at, Timestamp::from_secs(1_692_319_500));
        let r = parse(
            r#"{"timestamp":1692319500123,"lmp":1}"#,
            &fmt,
            Timestamp::ZERO,
        )
        .unwrap();
        assert_eq!(r.sample.at, Timestamp::from_millis(1_692_319_500_123));
    }

    #[test]
    fn nested_pointers_and_receive_time() {
        let fmt = JsonFormat {
            price: "/data/0/price".into(),
            time: None,
            ..JsonFormat::default()
        };
        let r = parse(
            r#"{"data":[{"price":42.0}]}"#,
            &fmt,
            Timestamp::from_secs(7),
        )
        .unwrap();
        assert_eq!(r.sample.at, Timestamp::from_secs(7));
        assert_eq!(r.sample.usd_per_mwh, 42.0);
    }

    #[test]
    fn broken_bodies_are_errors() {
        let fmt = JsonFormat::default();
        for body in [
            "not json",
            r#"{"timestamp":1,"lmp":null}"#,
            r#"{"timestamp":1}"#,
            r#"{"timestamp":1,"lmp":"NaN"}"#,
            r#"{"timestamp":1,"lmp":1e7}"#,
            r#"{"timestamp":"yesterday","lmp":1}"#,
            r#"{"timestamp":-5,"lmp":1}"#,
            "[]",
        ] {
            assert!(parse(body, &fmt, Timestamp::ZERO).is_err(), "{body}");
        }
    }

    #[test]
    fn forecast_array_or_its_error() {
        let fmt = JsonFormat {
            forecast: Some("/dam".into()),
            ..JsonFormat::default()
        };
        let r = parse(
            r#"{"timestamp":100,"lmp":30,"dam":[{"start":7300,"price":80},{"start":3700,"price":60}]}"#,
            &fmt,
            Timestamp::ZERO,
        )
        .unwrap();
        assert_eq!(r.forecast.len(), 2);
        assert_eq!(r.forecast[0].start, Timestamp::from_secs(3700));
        assert!(r.forecast_error.is_none());
        let r = parse(
            r#"{"timestamp":100,"lmp":30,"dam":[{"start":7300,"price":"x"}]}"#,
            &fmt,
            Timestamp::ZERO,
        )
        .unwrap();
        assert!(r.forecast.is_empty());
        assert!(r.forecast_error.is_some());
        assert_eq!(r.sample.usd_per_mwh, 30.0);
    }
}
