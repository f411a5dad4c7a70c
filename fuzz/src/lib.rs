//! Helpers shared by the fuzz targets.

use serde_json::Value;

/// Equal, or within a few ULPs: serde_json (without `float_roundtrip`)
/// parses some shortest-form floats back one ULP off.
pub fn f64_close(a: f64, b: f64) -> bool {
    a == b || (a - b).abs() <= 4.0 * f64::EPSILON * a.abs().max(b.abs())
}

/// Structural JSON equality with [`f64_close`] for floats.
pub fn json_close(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => {
            if x.is_f64() || y.is_f64() {
                match (x.as_f64(), y.as_f64()) {
                    (Some(p), Some(q)) => f64_close(p, q),
                    _ => false,
                }
            } else {
                x == y
            }
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(p, q)| json_close(p, q))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x
                    .iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| json_close(v, w)))
        }
        _ => a == b,
    }
}

/// Cuts fuzz input into the pieces a target needs, without panicking when
/// it runs out.
pub struct Input<'a>(pub &'a [u8]);

impl<'a> Input<'a> {
    /// One byte, 0 when exhausted.
    pub fn byte(&mut self) -> u8 {
        match self.0.split_first() {
            Some((b, rest)) => {
                self.0 = rest;
                *b
            }
            None => 0,
        }
    }

    /// A little-endian u16.
    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.byte(), self.byte()])
    }

    /// The rest.
    pub fn rest(self) -> &'a [u8] {
        self.0
    }
}
