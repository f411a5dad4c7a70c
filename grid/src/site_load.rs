//! Site-load meters: read the site's uninterruptible (non-mining) load, kW,
//! and send it to the engine as
//! [`Signal::SiteLoad`](gridproxy_curtail::signal::Signal::SiteLoad), which
//! drives balance mode (`contract_kw − other load` is the fleet's cap).
//!
//! - [`prometheus`]: a Prometheus instant query (`/api/v1/query`), vector
//!   or scalar result, times a unit factor (W → kW: 0.001).
//! - [`modbus`]: a Modbus TCP power meter (holding or input registers,
//!   u16/i16/u32/i32/f32 with word order, scale factor, unit id).
//! - [`http_json`]: any HTTP JSON meter, the figure found by a JSON pointer.
//! - [`poll`]: the I/O edge: read a [`Meter`] every interval (1 s by
//!   default) on the site clock and send each good reading.
//!
//! Decoding is sans-IO. Every figure passes [`check_kw`]: NaN, infinite,
//! negative or above the configured maximum is an error and the reading is
//! skipped, as are timeouts, bad JSON and Modbus exceptions: the engine never
//! sees a bogus load. A meter that stays broken sends nothing, so the
//! engine's staleness rule for site load (`Staleness::site_load`: max age
//! and safe state) takes over.

pub mod http_json;
pub mod modbus;
pub mod poll;
pub mod prometheus;

use thiserror::Error;

pub use poll::{spawn, Meter, MeterStatus, PollConfig, Poller};

/// Why a meter reading was rejected.
#[derive(Debug, Error, Clone, PartialEq)]
#[non_exhaustive]
pub enum MeterError {
    /// No answer within the configured timeout.
    #[error("meter read timed out after {0:?}")]
    Timeout(std::time::Duration),
    /// Connection or HTTP transport failure.
    #[error("meter transport: {0}")]
    Transport(String),
    /// A non-success HTTP status.
    #[error("meter http status {0}")]
    Status(u16),
    /// The body is not what the meter type expects.
    #[error("meter response: {0}")]
    Format(String),
    /// The meter answered with a Modbus exception.
    #[error("modbus exception: {0}")]
    ModbusException(String),
    /// The figure is NaN, infinite, negative or absurdly large.
    #[error("load {value} kW out of range (finite, 0..={max_kw})")]
    OutOfRange {
        /// The figure, kW.
        value: f64,
        /// Largest accepted, kW.
        max_kw: f64,
    },
    /// The meter's configuration cannot work.
    #[error("meter config: {0}")]
    Config(String),
}

/// Accept a load figure: finite and in `0..=max_kw`.
pub fn check_kw(value: f64, max_kw: f64) -> Result<f64, MeterError> {
    if value.is_finite() && (0.0..=max_kw).contains(&value) {
        Ok(value)
    } else {
        Err(MeterError::OutOfRange { value, max_kw })
    }
}

/// Parse a JSON number, or a string holding one (Prometheus sends sample
/// values as strings, `"NaN"` and `"+Inf"` included).
pub(crate) fn json_number(v: &serde_json::Value) -> Result<f64, MeterError> {
    match v {
        serde_json::Value::Number(n) => n
            .as_f64()
            .ok_or_else(|| MeterError::Format(format!("number {n} not representable"))),
        serde_json::Value::String(s) => s
            .trim()
            .parse::<f64>()
            .map_err(|_| MeterError::Format(format!("value {s:?} is not a number"))),
        other => Err(MeterError::Format(format!("value {other} is not a number"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_kw_rejects_nan_negative_and_absurd() {
        assert_eq!(check_kw(12.5, 1000.0), Ok(12.5));
        assert_eq!(check_kw(0.0, 1000.0), Ok(0.0));
        for bad in [f64::NAN, f64::INFINITY, -0.1, 1000.1] {
            assert!(
                matches!(check_kw(bad, 1000.0), Err(MeterError::OutOfRange { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn json_numbers_and_numeric_strings() {
        use serde_json::json;
        assert_eq!(json_number(&json!(3.5)), Ok(3.5));
        assert_eq!(json_number(&json!("42")), Ok(42.0));
        assert!(json_number(&json!("NaN")).unwrap().is_nan());
        assert!(json_number(&json!("abc")).is_err());
        assert!(json_number(&json!(null)).is_err());
        assert!(json_number(&json!([1])).is_err());
    }
}
