//! The cgminer-style transport LuxOS, Whatsminer and stock firmware share:
//! connect, send one JSON request, read the reply until the peer closes.
//!
//! [`parse_reply`] and [`check_status`] are sans-IO and tested without a
//! socket; [`request`] is the thin I/O edge (the caller bounds it in time).

use super::{ClientError, HostPort};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Largest reply accepted (a full `stats` is a few KiB).
pub(crate) const MAX_REPLY: usize = 256 * 1024;

/// Send `req` to `addr` and read one reply.
pub(crate) async fn request(addr: &HostPort, req: &Value) -> Result<Value, ClientError> {
    let mut stream = addr.connect().await?;
    stream
        .write_all(req.to_string().as_bytes())
        .await
        .map_err(|e| ClientError::Transport(e.to_string()))?;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    loop {
        let n = stream
            .read(&mut chunk)
            .await
            .map_err(|e| ClientError::Transport(e.to_string()))?;
        if n == 0 {
            break;
        }
        if buf.len() + n > MAX_REPLY {
            return Err(ClientError::Protocol(format!(
                "reply larger than {MAX_REPLY} bytes"
            )));
        }
        buf.extend_from_slice(&chunk[..n]);
        // cgminer ends with a NUL and closes; stop early on the NUL.
        if buf.last() == Some(&0) {
            break;
        }
    }
    parse_reply(&buf)
}

/// Parse a reply: JSON, possibly followed by NUL bytes or whitespace.
pub fn parse_reply(bytes: &[u8]) -> Result<Value, ClientError> {
    let end = bytes
        .iter()
        .rposition(|&b| b != 0 && !b.is_ascii_whitespace())
        .map_or(0, |i| i + 1);
    if end == 0 {
        return Err(ClientError::Protocol("empty reply".into()));
    }
    serde_json::from_slice(&bytes[..end])
        .map_err(|e| ClientError::Protocol(format!("invalid JSON reply: {e}")))
}

/// The `(status, code, msg)` of a reply whose `STATUS` is either cgminer's
/// array (`[{"STATUS":"S","Code":..,"Msg":..}]`) or Whatsminer's flat form
/// (`{"STATUS":"S","Code":..,"Msg":..}`).
pub fn status_of(v: &Value) -> Option<(&str, u64, String)> {
    let (obj, status) = match v.get("STATUS")? {
        Value::Array(a) => {
            let o = a.first()?;
            (o, o.get("STATUS")?.as_str()?)
        }
        Value::String(s) => (v, s.as_str()),
        _ => return None,
    };
    let code = obj.get("Code").and_then(Value::as_u64).unwrap_or(0);
    let msg = match obj.get("Msg") {
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
        None => String::new(),
    };
    Some((status, code, msg))
}

/// `Ok` for a success (`S`) or info (`I`) status, else the firmware's words.
pub fn check_status(v: &Value) -> Result<(), ClientError> {
    match status_of(v) {
        Some(("S" | "I", _, _)) => Ok(()),
        Some((_, code, msg)) => Err(ClientError::Rejected(format!("code {code}: {msg}"))),
        None => Err(ClientError::Protocol("reply has no STATUS".into())),
    }
}

/// A number at `pointer`, accepting numbers and numeric strings.
pub fn number(v: &Value, pointer: &str) -> Result<f64, ClientError> {
    match v.pointer(pointer) {
        Some(Value::Number(n)) => n.as_f64(),
        Some(Value::String(s)) => s.trim().parse().ok(),
        _ => None,
    }
    .filter(|x: &f64| x.is_finite())
    .ok_or_else(|| ClientError::Protocol(format!("reply lacks a number at {pointer}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_nul_terminated_and_both_status_shapes() {
        let v = parse_reply(b"{\"STATUS\":[{\"STATUS\":\"S\",\"Code\":335,\"Msg\":\"ok\"}]}\0")
            .unwrap();
        assert!(check_status(&v).is_ok());
        let v = parse_reply(br#"{"STATUS":"E","Code":135,"Msg":"check token err"}"#).unwrap();
        assert_eq!(status_of(&v), Some(("E", 135, "check token err".into())));
        assert!(matches!(check_status(&v), Err(ClientError::Rejected(_))));
        assert!(parse_reply(b"\0\0").is_err());
        assert!(parse_reply(b"{\"STATUS\":").is_err());
        let v = serde_json::json!({"A": [{"W": "12.5", "X": 3}]});
        assert_eq!(number(&v, "/A/0/W").unwrap(), 12.5);
        assert_eq!(number(&v, "/A/0/X").unwrap(), 3.0);
        assert!(number(&v, "/A/0/Y").is_err());
    }
}
