//! Fast path for `mining.submit`, the one message a busy proxy sees per share.
//!
//! [`crate::sv1::parse_client`] builds a `serde_json::Value` tree and a
//! `String` per parameter; here the line is deserialized with borrowed
//! `&str`s into a fixed-size array, so a well-formed submit costs no heap
//! allocation (a numeric or null id needs none either). Anything unusual —
//! another method, escaped strings, wrong types, bad hex — gives `None`, and
//! the caller falls back to the full parser, which also names the error. So
//! the fast path never accepts what the full parser would refuse.

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::Value;
use std::fmt;

/// Longest extranonce2 the fast path decodes (longer ones take the full parser).
pub const MAX_EXTRANONCE2: usize = 32;

/// A `mining.submit` borrowed from its line.
#[derive(Debug, Clone, PartialEq)]
pub struct SubmitRef<'a> {
    /// Request id, echoed in the answer.
    pub id: Value,
    /// Worker name as sent.
    pub worker: &'a str,
    /// Job id as sent.
    pub job_id: &'a str,
    extranonce2: [u8; MAX_EXTRANONCE2],
    extranonce2_len: u8,
    /// Header time.
    pub ntime: u32,
    /// Header nonce.
    pub nonce: u32,
    /// Rolled version bits (BIP310), when sent.
    pub version_bits: Option<u32>,
}

impl SubmitRef<'_> {
    /// The miner's extranonce2 bytes.
    pub fn extranonce2(&self) -> &[u8] {
        &self.extranonce2[..self.extranonce2_len as usize]
    }
}

#[derive(Deserialize)]
struct Raw<'a> {
    id: Value,
    #[serde(borrow)]
    method: &'a str,
    #[serde(borrow)]
    params: Params<'a>,
}

/// Up to six borrowed string parameters.
struct Params<'a> {
    n: usize,
    p: [&'a str; 6],
}

impl<'de: 'a, 'a> Deserialize<'de> for Params<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Params<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an array of at most six strings")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Params<'de>, A::Error> {
                let mut out = Params { n: 0, p: [""; 6] };
                while let Some(s) = seq.next_element::<&'de str>()? {
                    if out.n == out.p.len() {
                        return Err(de::Error::invalid_length(7, &self));
                    }
                    out.p[out.n] = s;
                    out.n += 1;
                }
                Ok(out)
            }
        }
        d.deserialize_seq(V)
    }
}

/// Same rule as the full parser: 1–8 hex digits.
fn hex_u32(s: &str) -> Option<u32> {
    if s.is_empty() || s.len() > 8 {
        return None;
    }
    u32::from_str_radix(s, 16).ok()
}

/// Parse `line` if it is a plain, well-formed `mining.submit`; `None` otherwise
/// (then use [`crate::sv1::parse_client`]).
pub fn parse_submit(line: &[u8]) -> Option<SubmitRef<'_>> {
    // Cheap pre-check: most other messages are refused without a JSON pass.
    if !line.windows(13).any(|w| w == b"mining.submit") {
        return None;
    }
    let raw: Raw<'_> = serde_json::from_slice(line).ok()?;
    if raw.method != "mining.submit" || raw.params.n < 5 {
        return None;
    }
    let p = &raw.params.p;
    let en2_hex = p[2].as_bytes();
    if !en2_hex.len().is_multiple_of(2) || en2_hex.len() / 2 > MAX_EXTRANONCE2 {
        return None;
    }
    let mut extranonce2 = [0u8; MAX_EXTRANONCE2];
    let len = en2_hex.len() / 2;
    hex::decode_to_slice(en2_hex, &mut extranonce2[..len]).ok()?;
    let version_bits = match raw.params.n {
        6 => Some(hex_u32(p[5])?),
        _ => None,
    };
    Some(SubmitRef {
        id: raw.id,
        worker: p[0],
        job_id: p[1],
        extranonce2,
        extranonce2_len: len as u8,
        ntime: hex_u32(p[3])?,
        nonce: hex_u32(p[4])?,
        version_bits,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sv1::{parse_client, ClientMethod};

    /// The fast path agrees with the full parser wherever it answers.
    fn same_as_full(line: &str) -> Option<SubmitRef<'_>> {
        let fast = parse_submit(line.as_bytes());
        if let Some(f) = &fast {
            let full = parse_client(line.as_bytes()).expect("full parser accepts it too");
            let ClientMethod::Submit(s) = full.method else {
                panic!("full parser: not a submit")
            };
            assert_eq!(full.id, f.id);
            assert_eq!(
                (s.worker.as_str(), s.job_id.as_str(), &s.extranonce2[..]),
                (f.worker, f.job_id, f.extranonce2())
            );
            assert_eq!(
                (s.ntime, s.nonce, s.version_bits),
                (f.ntime, f.nonce, f.version_bits)
            );
        }
        fast
    }

    #[test]
    fn plain_submits_take_the_fast_path() {
        let s = same_as_full(r#"{"id":4,"method":"mining.submit","params":["w.1","1a","0000cafe","6553f100","deadbeef"]}"#).unwrap();
        assert_eq!(s.id, Value::from(4));
        assert_eq!(s.extranonce2(), [0, 0, 0xca, 0xfe]);
        assert_eq!(
            (s.ntime, s.nonce, s.version_bits),
            (0x6553f100, 0xdeadbeef, None)
        );
        let s = same_as_full(r#"{"params":["w","2","00","6553f100","00000001","1fffe000"],"id":"x","method":"mining.submit","jsonrpc":"2.0"}"#).unwrap();
        assert_eq!(s.version_bits, Some(0x1fffe000));
        assert_eq!(s.id, Value::from("x"));
    }

    #[test]
    fn anything_unusual_falls_back() {
        for line in [
            // other methods
            r#"{"id":1,"method":"mining.subscribe","params":[]}"#,
            r#"{"id":1,"method":"mining.submitx","params":["w","1","00","1","2"]}"#,
            // too few / too many params, wrong types
            r#"{"id":1,"method":"mining.submit","params":["w","1","00","1"]}"#,
            r#"{"id":1,"method":"mining.submit","params":["w","1","00","1","2","3","4"]}"#,
            r#"{"id":1,"method":"mining.submit","params":["w",1,"00","1","2"]}"#,
            // bad hex, odd length, overlong fields
            r#"{"id":1,"method":"mining.submit","params":["w","1","0g","1","2"]}"#,
            r#"{"id":1,"method":"mining.submit","params":["w","1","000","1","2"]}"#,
            r#"{"id":1,"method":"mining.submit","params":["w","1","00","123456789","2"]}"#,
            r#"{"id":1,"method":"mining.submit","params":["w","1","00","1",""]}"#,
            // escaped strings cannot be borrowed
            r#"{"id":1,"method":"mining.submit","params":["w\u0041","1","00","1","2"]}"#,
            // not JSON / truncated / duplicate keys
            "mining.submit",
            r#"{"id":1,"method":"mining.submit","params":["w","1","00","1","2"]"#,
            r#"{"id":1,"method":"mining.submit","method":"mining.submit","params":["w","1","00","1","2"]}"#,
        ] {
            assert_eq!(same_as_full(line), None, "{line}");
        }
        let long = format!(
            r#"{{"id":1,"method":"mining.submit","params":["w","1","{}","1","2"]}}"#,
            "00".repeat(MAX_EXTRANONCE2 + 1)
        );
        assert_eq!(parse_submit(long.as_bytes()), None);
    }
}
