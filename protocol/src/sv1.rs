//! Stratum V1: typed JSON-RPC messages and a bounded line codec.
//!
//! Parsing is split the mini-redis way: [`LineCodec::next_line`] finds a whole
//! line (or says `Ok(None)`: not yet), then [`parse_client`] / [`parse_server`]
//! turn it into typed values. Every failure is an [`Sv1Error`] naming what was
//! wrong; nothing here panics on input.
//!
//! Real clients reuse request ids (cpuminer sends id 4 for every submit), so
//! ids are carried as opaque JSON values and never assumed unique.

use bytes::{Buf, BytesMut};
use serde_json::{json, Value};
use std::fmt::Write as _;

/// Default maximum line length (16 KiB), including the newline.
pub const DEFAULT_MAX_LINE: usize = 16 * 1024;

/// A JSON-RPC request id as the peer sent it (number, string or null).
pub type Id = Value;

/// Errors turning bytes into SV1 messages.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum Sv1Error {
    /// A line exceeded the configured maximum without a newline.
    #[error("line longer than {max} bytes")]
    LineTooLong {
        /// configured limit
        max: usize,
    },
    /// The line is not UTF-8.
    #[error("line is not valid UTF-8")]
    InvalidUtf8,
    /// The line is not JSON.
    #[error("malformed JSON: {0}")]
    Json(String),
    /// JSON, but not an object.
    #[error("message is not a JSON object")]
    NotAnObject,
    /// A request names a method this side does not handle.
    #[error("unknown method {method:?}")]
    UnknownMethod {
        /// request id, to answer with an error
        id: Id,
        /// the method named
        method: String,
    },
    /// A field or positional parameter is missing or of the wrong type.
    #[error("{method}: {what}")]
    BadParams {
        /// request id, to answer with an error
        id: Id,
        /// the method
        method: &'static str,
        /// what was wrong
        what: String,
    },
    /// Neither a request, a notification nor a response.
    #[error("message has neither method nor result/error")]
    NotAMessage,
}

impl Sv1Error {
    /// The request id to answer, when the error belongs to a request.
    pub fn request_id(&self) -> Option<&Id> {
        match self {
            Sv1Error::UnknownMethod { id, .. } | Sv1Error::BadParams { id, .. } => Some(id),
            _ => None,
        }
    }
}

/// Splits a byte stream into lines with a length limit.
#[derive(Debug, Clone)]
pub struct LineCodec {
    max_line: usize,
    /// Bytes already scanned for a newline, so a slow sender costs O(n) total.
    scanned: usize,
    /// Discarding the rest of an oversize line until its newline.
    discarding: bool,
}

impl Default for LineCodec {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_LINE)
    }
}

impl LineCodec {
    /// A codec refusing lines longer than `max_line` bytes.
    pub fn new(max_line: usize) -> Self {
        Self {
            max_line,
            scanned: 0,
            discarding: false,
        }
    }

    /// Take the next complete line (without `\n` / `\r\n`) from `buf`.
    /// `Ok(None)` means more bytes are needed. Empty lines are skipped.
    /// An oversize line gives [`Sv1Error::LineTooLong`] once; the codec then
    /// skips to the next newline, so a caller may choose to carry on.
    pub fn next_line(&mut self, buf: &mut BytesMut) -> Result<Option<BytesMut>, Sv1Error> {
        loop {
            let nl = buf[self.scanned..].iter().position(|&b| b == b'\n');
            match nl {
                None => {
                    if self.discarding {
                        buf.clear();
                        self.scanned = 0;
                        return Ok(None);
                    }
                    self.scanned = buf.len();
                    if buf.len() > self.max_line {
                        self.discarding = true;
                        buf.clear();
                        self.scanned = 0;
                        return Err(Sv1Error::LineTooLong { max: self.max_line });
                    }
                    return Ok(None);
                }
                Some(off) => {
                    let end = self.scanned + off;
                    self.scanned = 0;
                    if self.discarding {
                        self.discarding = false;
                        buf.advance(end + 1);
                        continue;
                    }
                    if end + 1 > self.max_line {
                        buf.advance(end + 1);
                        return Err(Sv1Error::LineTooLong { max: self.max_line });
                    }
                    let mut line = buf.split_to(end + 1);
                    line.truncate(end);
                    if line.last() == Some(&b'\r') {
                        line.truncate(end - 1);
                    }
                    if line.iter().all(|b| b.is_ascii_whitespace()) {
                        continue;
                    }
                    return Ok(Some(line));
                }
            }
        }
    }
}

impl tokio_util::codec::Decoder for LineCodec {
    type Item = BytesMut;
    type Error = CodecError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<BytesMut>, CodecError> {
        Ok(self.next_line(src)?)
    }
}

impl<T: AsRef<[u8]>> tokio_util::codec::Encoder<T> for LineCodec {
    type Error = CodecError;

    fn encode(&mut self, item: T, dst: &mut BytesMut) -> Result<(), CodecError> {
        let b = item.as_ref();
        dst.reserve(b.len() + 1);
        dst.extend_from_slice(b);
        if b.last() != Some(&b'\n') {
            dst.extend_from_slice(b"\n");
        }
        Ok(())
    }
}

/// Error type for the tokio codec: protocol or I/O.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// A protocol error.
    #[error(transparent)]
    Sv1(#[from] Sv1Error),
    /// An I/O error from the transport.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// `mining.submit` parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Submit {
    /// Worker name as sent (`account.worker`).
    pub worker: String,
    /// Job id.
    pub job_id: String,
    /// The miner's extranonce2 bytes.
    pub extranonce2: Vec<u8>,
    /// Header time.
    pub ntime: u32,
    /// Header nonce.
    pub nonce: u32,
    /// Rolled version bits (BIP310), when sent.
    pub version_bits: Option<u32>,
}

/// `mining.configure` parameters (BIP310). Only version rolling is acted on;
/// the other extensions are listed so they can be answered `false`.
#[derive(Debug, Clone, PartialEq)]
pub struct Configure {
    /// Extension names requested.
    pub extensions: Vec<String>,
    /// `version-rolling.mask` requested (default all bits).
    pub version_rolling_mask: Option<u32>,
    /// `version-rolling.min-bit-count` requested.
    pub version_rolling_min_bits: Option<u32>,
    /// `minimum-difficulty.value` requested.
    pub minimum_difficulty: Option<f64>,
}

/// A method a miner calls on the server.
#[derive(Debug, Clone, PartialEq)]
pub enum ClientMethod {
    /// `mining.subscribe [user_agent, session_id?]`
    Subscribe {
        /// firmware user agent
        user_agent: Option<String>,
        /// session to resume
        session_id: Option<String>,
    },
    /// `mining.authorize [user, password]`
    Authorize {
        /// `account.worker`
        user: String,
        /// password (often `x`)
        password: Option<String>,
    },
    /// `mining.submit`
    Submit(Submit),
    /// `mining.extranonce.subscribe []`
    ExtranonceSubscribe,
    /// `mining.configure [extensions, params]`
    Configure(Configure),
    /// `mining.suggest_difficulty [difficulty]`
    SuggestDifficulty(f64),
}

/// A request from a miner with its id.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientRequest {
    /// The id to answer with (may repeat across requests).
    pub id: Id,
    /// The typed method.
    pub method: ClientMethod,
}

/// `mining.notify` parameters, kept in wire form (hex strings decoded to bytes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notify {
    /// Job id.
    pub job_id: String,
    /// Prev hash in SV1 word-swapped form.
    pub prev_hash: [u8; 32],
    /// Coinbase part before extranonce1 ‖ extranonce2.
    pub coinb1: Vec<u8>,
    /// Coinbase part after the extranonces.
    pub coinb2: Vec<u8>,
    /// Merkle branch, internal byte order.
    pub merkle_branch: Vec<[u8; 32]>,
    /// Block version.
    pub version: u32,
    /// Compact network target.
    pub nbits: u32,
    /// Job time.
    pub ntime: u32,
    /// Drop earlier jobs.
    pub clean_jobs: bool,
}

impl Notify {
    /// The job as the share math needs it (prev hash back in internal order).
    pub fn to_job(&self) -> crate::share::Job {
        crate::share::Job {
            version: self.version,
            prev_hash: crate::share::prevhash_from_sv1(&self.prev_hash),
            coinbase_prefix: self.coinb1.clone(),
            coinbase_suffix: self.coinb2.clone(),
            merkle_branch: self.merkle_branch.clone(),
            nbits: self.nbits,
            ntime: self.ntime,
        }
    }
}

/// A JSON-RPC error object.
#[derive(Debug, Clone, PartialEq)]
pub struct RpcError {
    /// Numeric code (pool conventions: 20 other, 21 stale, 22 duplicate, 23 low difficulty, 24 unauthorized, 25 not subscribed).
    pub code: i64,
    /// Human-readable message.
    pub message: String,
}

/// A message a pool sends to a miner.
#[derive(Debug, Clone, PartialEq)]
pub enum ServerMessage {
    /// A response to a request.
    Response {
        /// the id of the request answered
        id: Id,
        /// the result (null on error)
        result: Value,
        /// the error, if any
        error: Option<RpcError>,
    },
    /// `mining.notify`
    Notify(Notify),
    /// `mining.set_difficulty`
    SetDifficulty(f64),
    /// `mining.set_extranonce [extranonce1, extranonce2_size]`
    SetExtranonce {
        /// new extranonce1
        extranonce1: Vec<u8>,
        /// new extranonce2 size
        extranonce2_size: usize,
    },
    /// `mining.set_version_mask [mask]`
    SetVersionMask(u32),
    /// `client.reconnect [host?, port?, wait?]`: reconnect, to `host:port`
    /// if given, after `wait_secs`. Parameters that are absent or not of
    /// their type (a port may be a number or a numeric string) are `None`.
    Reconnect {
        /// Where to: a host name or IP address.
        host: Option<String>,
        /// Its port.
        port: Option<u16>,
        /// Seconds to wait before reconnecting.
        wait_secs: Option<u64>,
    },
    /// A notification this side ignores (e.g. `client.show_message`).
    Other(String),
}

#[derive(serde::Deserialize)]
struct Envelope {
    #[serde(default)]
    id: Value,
    #[serde(default)]
    method: Option<String>,
    #[serde(default)]
    params: Value,
    #[serde(default)]
    result: Option<Value>,
    #[serde(default)]
    error: Option<Value>,
}

fn envelope(line: &[u8]) -> Result<Envelope, Sv1Error> {
    let text = std::str::from_utf8(line).map_err(|_| Sv1Error::InvalidUtf8)?;
    let v: Value = serde_json::from_str(text).map_err(|e| Sv1Error::Json(e.to_string()))?;
    if !v.is_object() {
        return Err(Sv1Error::NotAnObject);
    }
    serde_json::from_value(v).map_err(|e| Sv1Error::Json(e.to_string()))
}

/// Positional params with typed accessors that produce [`Sv1Error::BadParams`].
struct Params<'a> {
    id: &'a Id,
    method: &'static str,
    items: &'a [Value],
}

impl<'a> Params<'a> {
    fn new(id: &'a Id, method: &'static str, params: &'a Value) -> Result<Self, Sv1Error> {
        static EMPTY: [Value; 0] = [];
        let items = match params {
            Value::Array(a) => a.as_slice(),
            Value::Null => &EMPTY,
            _ => {
                return Err(Sv1Error::BadParams {
                    id: id.clone(),
                    method,
                    what: "params is not an array".into(),
                })
            }
        };
        Ok(Self { id, method, items })
    }

    fn bad(&self, what: String) -> Sv1Error {
        Sv1Error::BadParams {
            id: self.id.clone(),
            method: self.method,
            what,
        }
    }

    fn get(&self, i: usize, name: &str) -> Result<&'a Value, Sv1Error> {
        self.items
            .get(i)
            .ok_or_else(|| self.bad(format!("missing param {i} ({name})")))
    }

    fn opt(&self, i: usize) -> Option<&'a Value> {
        self.items.get(i).filter(|v| !v.is_null())
    }

    fn str(&self, i: usize, name: &str) -> Result<&'a str, Sv1Error> {
        self.get(i, name)?
            .as_str()
            .ok_or_else(|| self.bad(format!("param {i} ({name}) is not a string")))
    }

    fn opt_str(&self, i: usize, name: &str) -> Result<Option<String>, Sv1Error> {
        match self.opt(i) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(self.bad(format!("param {i} ({name}) is not a string"))),
        }
    }

    fn hex(&self, i: usize, name: &str) -> Result<Vec<u8>, Sv1Error> {
        let s = self.str(i, name)?;
        hex::decode(s).map_err(|_| self.bad(format!("param {i} ({name}) is not hex: {s:?}")))
    }

    fn hex32(&self, i: usize, name: &str) -> Result<[u8; 32], Sv1Error> {
        self.hex(i, name)?
            .try_into()
            .map_err(|_| self.bad(format!("param {i} ({name}) is not 32 bytes")))
    }

    /// A big-endian u32 as 8 hex digits (ntime, nonce, nbits, version).
    fn hex_u32(&self, i: usize, name: &str) -> Result<u32, Sv1Error> {
        let s = self.str(i, name)?;
        parse_hex_u32(s)
            .ok_or_else(|| self.bad(format!("param {i} ({name}) is not a hex u32: {s:?}")))
    }

    fn f64(&self, i: usize, name: &str) -> Result<f64, Sv1Error> {
        let v = self.get(i, name)?;
        let d = match v {
            Value::Number(n) => n.as_f64(),
            // Some firmware sends difficulties as strings.
            Value::String(s) => s.parse::<f64>().ok(),
            _ => None,
        };
        match d {
            Some(d) if d.is_finite() && d > 0.0 => Ok(d),
            _ => Err(self.bad(format!("param {i} ({name}) is not a positive number"))),
        }
    }
}

fn parse_hex_u32(s: &str) -> Option<u32> {
    if s.is_empty() || s.len() > 8 {
        return None;
    }
    u32::from_str_radix(s, 16).ok()
}

/// Parse one line a miner sent.
pub fn parse_client(line: &[u8]) -> Result<ClientRequest, Sv1Error> {
    let env = envelope(line)?;
    let Some(method) = env.method else {
        return Err(Sv1Error::NotAMessage);
    };
    let id = env.id;
    let m = match method.as_str() {
        "mining.subscribe" => {
            let p = Params::new(&id, "mining.subscribe", &env.params)?;
            ClientMethod::Subscribe {
                user_agent: p.opt_str(0, "user_agent")?,
                session_id: p.opt_str(1, "session_id")?,
            }
        }
        "mining.authorize" => {
            let p = Params::new(&id, "mining.authorize", &env.params)?;
            ClientMethod::Authorize {
                user: p.str(0, "user")?.to_string(),
                password: p.opt_str(1, "password")?,
            }
        }
        "mining.submit" => {
            let p = Params::new(&id, "mining.submit", &env.params)?;
            let version_bits = match p.opt(5) {
                None => None,
                Some(_) => Some(p.hex_u32(5, "version_bits")?),
            };
            ClientMethod::Submit(Submit {
                worker: p.str(0, "worker")?.to_string(),
                job_id: p.str(1, "job_id")?.to_string(),
                extranonce2: p.hex(2, "extranonce2")?,
                ntime: p.hex_u32(3, "ntime")?,
                nonce: p.hex_u32(4, "nonce")?,
                version_bits,
            })
        }
        "mining.extranonce.subscribe" => ClientMethod::ExtranonceSubscribe,
        "mining.configure" => {
            let p = Params::new(&id, "mining.configure", &env.params)?;
            let exts = p
                .get(0, "extensions")?
                .as_array()
                .ok_or_else(|| p.bad("param 0 (extensions) is not an array".into()))?;
            let extensions = exts
                .iter()
                .map(|e| e.as_str().map(str::to_string))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| p.bad("an extension name is not a string".into()))?;
            let opts = p.opt(1).and_then(Value::as_object);
            let get = |k: &str| opts.and_then(|o| o.get(k));
            let version_rolling_mask = match get("version-rolling.mask") {
                None => None,
                Some(Value::String(s)) => Some(
                    parse_hex_u32(s)
                        .ok_or_else(|| p.bad(format!("version-rolling.mask is not hex: {s:?}")))?,
                ),
                Some(_) => return Err(p.bad("version-rolling.mask is not a string".into())),
            };
            ClientMethod::Configure(Configure {
                extensions,
                version_rolling_mask,
                version_rolling_min_bits: get("version-rolling.min-bit-count")
                    .and_then(Value::as_u64)
                    .map(|v| v.min(32) as u32),
                minimum_difficulty: get("minimum-difficulty.value").and_then(Value::as_f64),
            })
        }
        "mining.suggest_difficulty" => {
            let p = Params::new(&id, "mining.suggest_difficulty", &env.params)?;
            ClientMethod::SuggestDifficulty(p.f64(0, "difficulty")?)
        }
        _ => return Err(Sv1Error::UnknownMethod { id, method }),
    };
    Ok(ClientRequest { id, method: m })
}

/// Parse one line a pool sent.
pub fn parse_server(line: &[u8]) -> Result<ServerMessage, Sv1Error> {
    let env = envelope(line)?;
    let id = env.id;
    let Some(method) = env.method else {
        if env.result.is_none() && env.error.is_none() {
            return Err(Sv1Error::NotAMessage);
        }
        let error = match env.error {
            None | Some(Value::Null) => None,
            Some(e) => Some(parse_rpc_error(&e)),
        };
        return Ok(ServerMessage::Response {
            id,
            result: env.result.unwrap_or(Value::Null),
            error,
        });
    };
    Ok(match method.as_str() {
        "mining.notify" => {
            let p = Params::new(&id, "mining.notify", &env.params)?;
            let branch = p
                .get(4, "merkle_branch")?
                .as_array()
                .ok_or_else(|| p.bad("param 4 (merkle_branch) is not an array".into()))?
                .iter()
                .map(|v| {
                    v.as_str()
                        .and_then(|s| hex::decode(s).ok())
                        .and_then(|b| <[u8; 32]>::try_from(b).ok())
                })
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| p.bad("merkle_branch entry is not 32 bytes of hex".into()))?;
            ServerMessage::Notify(Notify {
                job_id: p.str(0, "job_id")?.to_string(),
                prev_hash: p.hex32(1, "prev_hash")?,
                coinb1: p.hex(2, "coinb1")?,
                coinb2: p.hex(3, "coinb2")?,
                merkle_branch: branch,
                version: p.hex_u32(5, "version")?,
                nbits: p.hex_u32(6, "nbits")?,
                ntime: p.hex_u32(7, "ntime")?,
                clean_jobs: p.opt(8).and_then(Value::as_bool).unwrap_or(false),
            })
        }
        "mining.set_difficulty" => {
            let p = Params::new(&id, "mining.set_difficulty", &env.params)?;
            ServerMessage::SetDifficulty(p.f64(0, "difficulty")?)
        }
        "mining.set_extranonce" => {
            let p = Params::new(&id, "mining.set_extranonce", &env.params)?;
            let size = p
                .get(1, "extranonce2_size")?
                .as_u64()
                .filter(|s| *s <= 32)
                .ok_or_else(|| p.bad("param 1 (extranonce2_size) is not a size".into()))?;
            ServerMessage::SetExtranonce {
                extranonce1: p.hex(0, "extranonce1")?,
                extranonce2_size: size as usize,
            }
        }
        "mining.set_version_mask" => {
            let p = Params::new(&id, "mining.set_version_mask", &env.params)?;
            ServerMessage::SetVersionMask(p.hex_u32(0, "mask")?)
        }
        "client.reconnect" => {
            let p = env.params.as_array();
            let at = |i: usize| p.and_then(|a| a.get(i));
            let number = |v: Option<&Value>| match v {
                Some(Value::Number(n)) => n.as_u64(),
                Some(Value::String(s)) => s.trim().parse().ok(),
                _ => None,
            };
            ServerMessage::Reconnect {
                host: at(0)
                    .and_then(Value::as_str)
                    .map(str::trim)
                    .filter(|h| !h.is_empty())
                    .map(str::to_string),
                port: number(at(1))
                    .and_then(|p| u16::try_from(p).ok())
                    .filter(|p| *p != 0),
                wait_secs: number(at(2)),
            }
        }
        _ => ServerMessage::Other(method),
    })
}

fn parse_rpc_error(e: &Value) -> RpcError {
    // Pools send [code, "message", traceback] or {"code":..,"message":..}.
    match e {
        Value::Array(a) => RpcError {
            code: a.first().and_then(Value::as_i64).unwrap_or(20),
            message: a.get(1).and_then(Value::as_str).unwrap_or("").to_string(),
        },
        Value::Object(o) => RpcError {
            code: o.get("code").and_then(Value::as_i64).unwrap_or(20),
            message: o
                .get("message")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string(),
        },
        Value::String(s) => RpcError {
            code: 20,
            message: s.clone(),
        },
        _ => RpcError {
            code: 20,
            message: e.to_string(),
        },
    }
}

/// Encoders for the messages each side sends. Each returns one line with `\n`.
pub mod encode {
    use super::*;

    fn line(v: Value) -> String {
        let mut s = v.to_string();
        s.push('\n');
        s
    }

    /// A successful response.
    pub fn result(id: &Id, result: Value) -> String {
        line(json!({"id": id, "result": result, "error": null}))
    }

    /// An error response in the common `[code, message, null]` form.
    pub fn error(id: &Id, code: i64, message: &str) -> String {
        line(json!({"id": id, "result": null, "error": [code, message, null]}))
    }

    /// The `mining.subscribe` result.
    pub fn subscribe_result(
        id: &Id,
        subscription_id: &str,
        extranonce1: &[u8],
        extranonce2_size: usize,
    ) -> String {
        result(
            id,
            json!([
                [
                    ["mining.set_difficulty", subscription_id],
                    ["mining.notify", subscription_id]
                ],
                hex::encode(extranonce1),
                extranonce2_size
            ]),
        )
    }

    /// The `mining.configure` result granting (or refusing) version rolling.
    pub fn configure_result(id: &Id, cfg: &Configure, granted_mask: Option<u32>) -> String {
        let mut o = serde_json::Map::new();
        for ext in &cfg.extensions {
            match (ext.as_str(), granted_mask) {
                ("version-rolling", Some(mask)) => {
                    o.insert("version-rolling".into(), Value::Bool(true));
                    o.insert(
                        "version-rolling.mask".into(),
                        Value::String(format!("{mask:08x}")),
                    );
                }
                (name, _) => {
                    o.insert(name.to_string(), Value::Bool(false));
                }
            }
        }
        result(id, Value::Object(o))
    }

    /// `mining.notify`.
    pub fn notify(n: &Notify) -> String {
        let shared = notify_shared(
            &n.prev_hash,
            &n.coinb1,
            &n.coinb2,
            &n.merkle_branch,
            n.version,
            n.nbits,
            n.ntime,
        );
        let mut s = String::new();
        notify_into(&mut s, &n.job_id, &shared, n.clean_jobs);
        s
    }

    /// The part of a `mining.notify` that every miner on one pool job gets
    /// alike, from the previous-block hash (`prev_hash` in SV1 order) to
    /// ntime, separators included: build it once per job and hand it to
    /// [`notify_into`] for each miner (hex-encoding the coinbase and the
    /// branch is most of a notify's cost).
    pub fn notify_shared(
        prev_hash: &[u8; 32],
        coinb1: &[u8],
        coinb2: &[u8],
        merkle_branch: &[[u8; 32]],
        version: u32,
        nbits: u32,
        ntime: u32,
    ) -> String {
        let mut s = String::with_capacity(
            128 + 2 * (coinb1.len() + coinb2.len()) + merkle_branch.len() * 67,
        );
        let _ = write!(
            s,
            ",\"{}\",\"{}\",\"{}\",[",
            hex::encode(prev_hash),
            hex::encode(coinb1),
            hex::encode(coinb2)
        );
        for (i, b) in merkle_branch.iter().enumerate() {
            if i > 0 {
                s.push(',');
            }
            s.push('"');
            s.push_str(&hex::encode(b));
            s.push('"');
        }
        let _ = write!(s, "],\"{version:08x}\",\"{nbits:08x}\",\"{ntime:08x}\",");
        s
    }

    /// Append one miner's `mining.notify` line to `out`: its job id, the
    /// job's [`notify_shared`] part and the clean flag.
    pub fn notify_into(out: &mut String, job_id: &str, shared: &str, clean_jobs: bool) {
        out.reserve(64 + job_id.len() + shared.len());
        // Hand-built: this goes to every miner on every job.
        out.push_str("{\"id\":null,\"method\":\"mining.notify\",\"params\":[");
        if job_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            out.push('"');
            out.push_str(job_id);
            out.push('"');
        } else {
            out.push_str(&Value::String(job_id.to_string()).to_string());
        }
        out.push_str(shared);
        out.push_str(if clean_jobs { "true]}\n" } else { "false]}\n" });
    }

    /// `mining.set_difficulty`.
    pub fn set_difficulty(d: f64) -> String {
        line(json!({"id": null, "method": "mining.set_difficulty", "params": [d]}))
    }

    /// `mining.set_extranonce`.
    pub fn set_extranonce(extranonce1: &[u8], extranonce2_size: usize) -> String {
        line(json!({"id": null, "method": "mining.set_extranonce",
            "params": [hex::encode(extranonce1), extranonce2_size]}))
    }

    /// `mining.set_version_mask`.
    pub fn set_version_mask(mask: u32) -> String {
        line(
            json!({"id": null, "method": "mining.set_version_mask", "params": [format!("{mask:08x}")]}),
        )
    }

    /// `client.reconnect [host, port, wait]` (each part only when given;
    /// a later part needs the earlier ones).
    pub fn reconnect(host: Option<&str>, port: Option<u16>, wait_secs: Option<u64>) -> String {
        let mut params = Vec::new();
        if let Some(h) = host {
            params.push(json!(h));
            if let Some(p) = port {
                params.push(json!(p));
                if let Some(w) = wait_secs {
                    params.push(json!(w));
                }
            }
        }
        line(json!({"id": null, "method": "client.reconnect", "params": params}))
    }

    /// A client request.
    pub fn request(id: &Id, method: &str, params: Value) -> String {
        line(json!({"id": id, "method": method, "params": params}))
    }

    /// `mining.submit` from a miner.
    pub fn submit(id: &Id, s: &Submit) -> String {
        let mut p = vec![
            Value::String(s.worker.clone()),
            Value::String(s.job_id.clone()),
            Value::String(hex::encode(&s.extranonce2)),
            Value::String(format!("{:08x}", s.ntime)),
            Value::String(format!("{:08x}", s.nonce)),
        ];
        if let Some(v) = s.version_bits {
            p.push(Value::String(format!("{v:08x}")));
        }
        request(id, "mining.submit", Value::Array(p))
    }
}

/// Parse the result of `mining.subscribe`: (extranonce1, extranonce2_size).
pub fn parse_subscribe_result(result: &Value) -> Option<(Vec<u8>, usize)> {
    let a = result.as_array()?;
    let en1 = hex::decode(a.get(1)?.as_str()?).ok()?;
    let size = a.get(2)?.as_u64()? as usize;
    (size <= 32).then_some((en1, size))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(codec: &mut LineCodec, buf: &mut BytesMut) -> Vec<Result<String, Sv1Error>> {
        let mut out = vec![];
        loop {
            match codec.next_line(buf) {
                Ok(Some(l)) => out.push(Ok(String::from_utf8(l.to_vec()).unwrap())),
                Ok(None) => return out,
                Err(e) => out.push(Err(e)),
            }
        }
    }

    #[test]
    fn codec_splits_partial_and_crlf() {
        let mut c = LineCodec::new(64);
        let mut b = BytesMut::from(&b"{\"a\":1}\r\n\n{\"b\""[..]);
        assert_eq!(lines(&mut c, &mut b), vec![Ok("{\"a\":1}".to_string())]);
        b.extend_from_slice(b":2}\n");
        assert_eq!(lines(&mut c, &mut b), vec![Ok("{\"b\":2}".to_string())]);
        assert!(b.is_empty());
    }

    #[test]
    fn codec_refuses_oversize_then_recovers() {
        let mut c = LineCodec::new(16);
        let mut b = BytesMut::from(&[b'x'; 40][..]);
        assert_eq!(c.next_line(&mut b), Err(Sv1Error::LineTooLong { max: 16 }));
        b.extend_from_slice(b"yyyy\nok\n");
        assert_eq!(lines(&mut c, &mut b), vec![Ok("ok".to_string())]);
        // Oversize but terminated in one read.
        let mut b = BytesMut::from(&b"0123456789abcdefghij\nfine\n"[..]);
        let got = lines(&mut c, &mut b);
        assert_eq!(got[0], Err(Sv1Error::LineTooLong { max: 16 }));
        assert_eq!(got[1], Ok("fine".to_string()));
    }

    /// A conversation in the shape real firmware (cgminer/bmminer-style) sends.
    #[test]
    fn client_reconnect_carries_where_and_when() {
        let r = |line: &str| parse_server(line.as_bytes()).unwrap();
        assert_eq!(
            r(r#"{"id":null,"method":"client.reconnect","params":["eu.pool.example",3333,5]}"#),
            ServerMessage::Reconnect {
                host: Some("eu.pool.example".into()),
                port: Some(3333),
                wait_secs: Some(5)
            }
        );
        assert_eq!(
            r(r#"{"id":null,"method":"client.reconnect","params":["h","4444"]}"#),
            ServerMessage::Reconnect {
                host: Some("h".into()),
                port: Some(4444),
                wait_secs: None
            }
        );
        let none = ServerMessage::Reconnect {
            host: None,
            port: None,
            wait_secs: None,
        };
        assert_eq!(
            r(r#"{"id":null,"method":"client.reconnect","params":[]}"#),
            none
        );
        assert_eq!(r(r#"{"id":null,"method":"client.reconnect"}"#), none);
        assert_eq!(
            r(r#"{"id":null,"method":"client.reconnect","params":["",70000,"x"]}"#),
            none
        );
        assert_eq!(
            r(&encode::reconnect(Some("h"), Some(1), Some(2))),
            ServerMessage::Reconnect {
                host: Some("h".into()),
                port: Some(1),
                wait_secs: Some(2)
            }
        );
    }

    #[test]
    fn firmware_conversation() {
        let configure = br#"{"id": 1, "method": "mining.configure", "params": [["version-rolling"], {"version-rolling.mask": "1fffe000", "version-rolling.min-bit-count": 2}]}"#;
        let r = parse_client(configure).unwrap();
        assert_eq!(r.id, json!(1));
        let ClientMethod::Configure(cfg) = r.method else {
            panic!()
        };
        assert_eq!(cfg.version_rolling_mask, Some(0x1fffe000));
        assert_eq!(cfg.version_rolling_min_bits, Some(2));
        let answer = encode::configure_result(&r.id, &cfg, Some(0x1fffe000));
        let answer: Value = serde_json::from_str(&answer).unwrap();
        assert_eq!(
            answer,
            json!({"id": 1, "error": null, "result": {"version-rolling": true, "version-rolling.mask": "1fffe000"}})
        );

        let sub = br#"{"id": 2, "method": "mining.subscribe", "params": ["bmminer/2.0.0"]}"#;
        assert_eq!(
            parse_client(sub).unwrap().method,
            ClientMethod::Subscribe {
                user_agent: Some("bmminer/2.0.0".into()),
                session_id: None
            }
        );
        let auth = br#"{"params": ["acct.worker1", "x"], "id": 3, "method": "mining.authorize"}"#;
        assert_eq!(
            parse_client(auth).unwrap().method,
            ClientMethod::Authorize {
                user: "acct.worker1".into(),
                password: Some("x".into())
            }
        );
        let sugg = br#"{"id": 4, "method": "mining.suggest_difficulty", "params": [1024]}"#;
        assert_eq!(
            parse_client(sugg).unwrap().method,
            ClientMethod::SuggestDifficulty(1024.0)
        );
        // cpuminer reuses id 4 for every submit.
        for nonce in ["1b2c3d4e", "00000001"] {
            let s = format!(
                r#"{{"params": ["acct.worker1", "6a1f", "00000000", "6155a491", "{nonce}", "1fffe000"], "id": 4, "method": "mining.submit"}}"#
            );
            let r = parse_client(s.as_bytes()).unwrap();
            assert_eq!(r.id, json!(4));
            let ClientMethod::Submit(sub) = r.method else {
                panic!()
            };
            assert_eq!(sub.ntime, 0x6155a491);
            assert_eq!(sub.version_bits, Some(0x1fffe000));
            assert_eq!(sub.extranonce2, vec![0, 0, 0, 0]);
        }

        // Server side, in the shape pools send.
        let sub_res = br#"{"id":2,"result":[[["mining.set_difficulty","deadbeef"],["mining.notify","deadbeef"]],"08000002",4],"error":null}"#;
        let ServerMessage::Response { result, error, .. } = parse_server(sub_res).unwrap() else {
            panic!()
        };
        assert!(error.is_none());
        assert_eq!(parse_subscribe_result(&result), Some((vec![8, 0, 0, 2], 4)));
        let notify = br#"{"params":["6a1f","19213b5f01c49d5227f4f03fd7be57a4b8b5e7060009c3de0000000000000000","02000000010000000000000000000000000000000000000000000000000000000000000000ffffffff58038db90a","ffffffff","f0a4506db7e1d2deb5bfc216b67dbb04b389997172322ffbea33909b6817f77b","20000004","170ed0eb","6155a491",true],"id":null,"method":"mining.notify"}"#;
        // Branch must be an array: this one is not, and must be refused.
        assert!(matches!(
            parse_server(notify),
            Err(Sv1Error::BadParams { .. })
        ));
        let notify = br#"{"params":["6a1f","19213b5f01c49d5227f4f03fd7be57a4b8b5e7060009c3de0000000000000000","0200","ffffffff",["f0a4506db7e1d2deb5bfc216b67dbb04b389997172322ffbea33909b6817f77b"],"20000004","170ed0eb","6155a491",true],"id":null,"method":"mining.notify"}"#;
        let ServerMessage::Notify(n) = parse_server(notify).unwrap() else {
            panic!()
        };
        assert_eq!(
            (n.version, n.nbits, n.ntime, n.clean_jobs),
            (0x20000004, 0x170ed0eb, 0x6155a491, true)
        );
        // Our encoder round-trips.
        assert_eq!(
            parse_server(encode::notify(&n).trim_end().as_bytes()).unwrap(),
            ServerMessage::Notify(n)
        );
        // The exact line, as pools write it (ours puts id and method first).
        let mut n2 = match parse_server(notify).unwrap() {
            ServerMessage::Notify(n) => n,
            _ => unreachable!(),
        };
        assert_eq!(
            encode::notify(&n2),
            "{\"id\":null,\"method\":\"mining.notify\",\"params\":[\"6a1f\",\"19213b5f01c49d5227f4f03fd7be57a4b8b5e7060009c3de0000000000000000\",\"0200\",\"ffffffff\",[\"f0a4506db7e1d2deb5bfc216b67dbb04b389997172322ffbea33909b6817f77b\"],\"20000004\",\"170ed0eb\",\"6155a491\",true]}\n"
        );
        // A job id that needs JSON escaping is escaped.
        n2.job_id = "a\"b".into();
        n2.clean_jobs = false;
        let line = encode::notify(&n2);
        assert!(
            line.contains(r#"["a\"b","#) && line.ends_with("false]}\n"),
            "{line}"
        );
        let ServerMessage::Notify(back) = parse_server(line.trim_end().as_bytes()).unwrap() else {
            panic!()
        };
        assert_eq!(back.job_id, "a\"b");
        let rej = br#"{"id":4,"result":null,"error":[23,"Low difficulty share",null]}"#;
        let ServerMessage::Response { error: Some(e), .. } = parse_server(rej).unwrap() else {
            panic!()
        };
        assert_eq!((e.code, e.message.as_str()), (23, "Low difficulty share"));
        assert_eq!(
            parse_server(br#"{"id":null,"method":"mining.set_difficulty","params":[0.5]}"#)
                .unwrap(),
            ServerMessage::SetDifficulty(0.5)
        );
    }

    #[test]
    fn malformed_lines_give_typed_errors() {
        assert!(matches!(parse_client(b"{not json"), Err(Sv1Error::Json(_))));
        assert_eq!(parse_client(b"[1,2,3]"), Err(Sv1Error::NotAnObject));
        assert_eq!(parse_client(&[0xff, 0xfe]), Err(Sv1Error::InvalidUtf8));
        assert_eq!(parse_client(br#"{"id":1}"#), Err(Sv1Error::NotAMessage));
        let e = parse_client(br#"{"id":7,"method":"mining.hack","params":[]}"#).unwrap_err();
        assert_eq!(
            e,
            Sv1Error::UnknownMethod {
                id: json!(7),
                method: "mining.hack".into()
            }
        );
        assert_eq!(e.request_id(), Some(&json!(7)));
        for bad in [
            r#"{"id":1,"method":"mining.submit","params":["w","j","zz","6155a491","00000001"]}"#,
            r#"{"id":1,"method":"mining.submit","params":["w","j","00",12345,"00000001"]}"#,
            r#"{"id":1,"method":"mining.submit","params":["w","j","00","6155a491"]}"#,
            r#"{"id":1,"method":"mining.submit","params":["w","j","00","6155a491","1234567890"]}"#,
            r#"{"id":1,"method":"mining.submit","params":"w"}"#,
            r#"{"id":1,"method":"mining.authorize","params":[42]}"#,
            r#"{"id":1,"method":"mining.suggest_difficulty","params":[-1]}"#,
            r#"{"id":1,"method":"mining.suggest_difficulty","params":["NaN"]}"#,
            r#"{"id":1,"method":"mining.configure","params":[["version-rolling"],{"version-rolling.mask":"xyz"}]}"#,
            r#"{"id":1,"method":"mining.subscribe","params":[{"ua":1}]}"#,
        ] {
            match parse_client(bad.as_bytes()) {
                Err(Sv1Error::BadParams { id, .. }) => assert_eq!(id, json!(1), "{bad}"),
                other => panic!("{bad}: {other:?}"),
            }
        }
        // Errors render a message a log line can carry.
        let e = parse_client(
            br#"{"id":1,"method":"mining.submit","params":["w","j","zz","6155a491","00000001"]}"#,
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "mining.submit: param 2 (extranonce2) is not hex: \"zz\""
        );
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        // A cheap deterministic sweep; the fuzz targets go further.
        let mut x: u64 = 0x9e3779b97f4a7c15;
        let seeds: [&[u8]; 3] = [
            br#"{"id":1,"method":"mining.submit","params":["w","j","00","6155a491","00000001","1fffe000"]}"#,
            br#"{"params":["6a1f","00","0200","ff",[],"20000004","170ed0eb","6155a491",true],"id":null,"method":"mining.notify"}"#,
            br#"{"id":1,"method":"mining.configure","params":[["version-rolling"],{"version-rolling.mask":"1fffe000"}]}"#,
        ];
        for seed in seeds {
            for _ in 0..2000 {
                let mut v = seed.to_vec();
                for _ in 0..3 {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let i = (x as usize) % v.len();
                    v[i] = (x >> 32) as u8;
                }
                let _ = parse_client(&v);
                let _ = parse_server(&v);
            }
        }
    }
}
