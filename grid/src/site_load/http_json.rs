//! Any HTTP JSON meter: `GET <url>`, the load at a JSON pointer
//! (RFC 6901, e.g. `/power/kw`), times a unit factor.

use serde_json::Value;

use super::{json_number, MeterError};

/// Where the figure is.
#[derive(Clone, Debug, PartialEq)]
pub struct HttpJsonMeter {
    /// Meter URL.
    pub url: String,
    /// JSON pointer to the figure (a number or a numeric string).
    pub pointer: String,
    /// Multiplies the figure to give kW (1.0 if it is already kW).
    pub factor: f64,
}

impl HttpJsonMeter {
    /// The parsed URL.
    pub fn parsed_url(&self) -> Result<reqwest::Url, MeterError> {
        reqwest::Url::parse(&self.url)
            .map_err(|e| MeterError::Config(format!("meter url {:?}: {e}", self.url)))
    }

    /// The load, kW, in a response body (not range-checked).
    pub fn decode(&self, body: &[u8]) -> Result<f64, MeterError> {
        if !(self.pointer.is_empty() || self.pointer.starts_with('/')) {
            return Err(MeterError::Config(format!(
                "json pointer {:?} must start with '/'",
                self.pointer
            )));
        }
        let v: Value = serde_json::from_slice(body)
            .map_err(|e| MeterError::Format(format!("bad json: {e}")))?;
        let at = v
            .pointer(&self.pointer)
            .ok_or_else(|| MeterError::Format(format!("nothing at {}", self.pointer)))?;
        Ok(json_number(at)? * self.factor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meter(pointer: &str, factor: f64) -> HttpJsonMeter {
        HttpJsonMeter {
            url: "http://127.0.0.1:1/load".into(),
            pointer: pointer.into(),
            factor,
        }
    }

    #[test]
    fn reads_the_pointer() {
        let body = br#"{"power":{"kw":412.5,"w":"412500"},"meters":[{"kw":1}]}"#;
        assert_eq!(meter("/power/kw", 1.0).decode(body), Ok(412.5));
        assert_eq!(meter("/power/w", 0.001).decode(body), Ok(412.5));
        assert_eq!(meter("/meters/0/kw", 1.0).decode(body), Ok(1.0));
        assert!(meter("/power/kw", 1.0).parsed_url().is_ok());
    }

    #[test]
    fn bad_bodies_and_pointers_are_errors() {
        let m = meter("/power/kw", 1.0);
        assert!(matches!(m.decode(b"{"), Err(MeterError::Format(_))));
        assert!(matches!(m.decode(b"{}"), Err(MeterError::Format(_))));
        assert!(matches!(
            m.decode(br#"{"power":{"kw":true}}"#),
            Err(MeterError::Format(_))
        ));
        assert!(matches!(
            meter("power", 1.0).decode(b"{}"),
            Err(MeterError::Config(_))
        ));
        assert!(matches!(
            HttpJsonMeter {
                url: "::".into(),
                ..m
            }
            .parsed_url(),
            Err(MeterError::Config(_))
        ));
    }
}
