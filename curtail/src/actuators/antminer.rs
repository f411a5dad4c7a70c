//! Stock Antminer firmware: sleep and wake through its web interface,
//! telemetry from its cgminer API (port 4028, [`StockClient`]).
//!
//! Sleeping reads the miner configuration (`GET
//! /cgi-bin/get_miner_conf.cgi`), changes only `miner-mode` (1 = sleep,
//! 0 = normal) and writes the whole configuration back (`POST
//! /cgi-bin/set_miner_conf.cgi`, JSON), so pools, fans and frequencies stay
//! as the operator set them. Both requests use HTTP digest authentication
//! (RFC 7616; credentials per miner, `root`/`root` out of the box).
//!
//! **Not confirmed from the vendor.** Bitmain publishes no API document for
//! the web interface of its current firmware. Its public firmware sources
//! (github.com/bitmaintech/Antminer_firmware, S5/S7 era) show the same two
//! CGI paths behind the web server's digest auth, but with a form body and
//! no `miner-mode`. The JSON body, the `miner-mode` values, the digest
//! realm ("antMiner Configuration") and the `{"stats":"success"}` answer
//! come from third-party tools that drive current firmware, not from
//! Bitmain. The client therefore keeps whatever type the firmware used for
//! `miner-mode` (a number or a string) and accepts either answer shape; a
//! refusal is an actuator error and the engine parks the miner instead.

use hyper::{Method, StatusCode};
use serde_json::Value;

use super::http;
use super::stock::StockClient;
use super::{bounded, ClientConfig, ClientError, HostPort, Reading};

/// Miner configuration, read.
pub const GET_CONF: &str = "/cgi-bin/get_miner_conf.cgi";
/// Miner configuration, written.
pub const SET_CONF: &str = "/cgi-bin/set_miner_conf.cgi";
/// The configuration key that sleeps the miner.
pub const MODE_KEY: &str = "miner-mode";
/// `miner-mode` values.
pub const MODE_NORMAL: u8 = 0;
/// See [`MODE_NORMAL`].
pub const MODE_SLEEP: u8 = 1;

/// A stock Antminer: web interface for commands, cgminer API for telemetry.
#[derive(Clone)]
pub struct AntminerClient {
    web: HostPort,
    username: String,
    password: String,
    telemetry: StockClient,
    cfg: ClientConfig,
}

impl std::fmt::Debug for AntminerClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AntminerClient")
            .field("web", &self.web)
            .field("api", &self.cfg.addr)
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

impl AntminerClient {
    /// Commands to the web interface at `web`, telemetry from the cgminer
    /// API at `cfg.addr`.
    pub fn new(
        cfg: ClientConfig,
        web: HostPort,
        username: impl Into<String>,
        password: impl Into<String>,
    ) -> AntminerClient {
        AntminerClient {
            web,
            username: username.into(),
            password: password.into(),
            telemetry: StockClient::new(cfg.clone()),
            cfg,
        }
    }

    /// Stop hashing (`miner-mode` 1).
    pub async fn sleep(&self) -> Result<(), ClientError> {
        self.set_mode(MODE_SLEEP).await
    }

    /// Hash again (`miner-mode` 0).
    pub async fn wake(&self) -> Result<(), ClientError> {
        self.set_mode(MODE_NORMAL).await
    }

    /// Power and hashrate, from the cgminer API.
    pub async fn telemetry(&self) -> Result<Reading, ClientError> {
        self.telemetry.telemetry().await
    }

    /// The current miner configuration.
    pub async fn config(&self) -> Result<Value, ClientError> {
        bounded(self.cfg.timeout, async {
            let (status, body) = self.digest(Method::GET, GET_CONF, None).await?;
            if status != StatusCode::OK {
                return Err(ClientError::Protocol(format!("{GET_CONF}: HTTP {status}")));
            }
            let conf: Value = serde_json::from_slice(&body)
                .map_err(|e| ClientError::Protocol(format!("{GET_CONF}: {e}")))?;
            if !conf.is_object() {
                return Err(ClientError::Protocol(format!("{GET_CONF}: not an object")));
            }
            Ok(conf)
        })
        .await
    }

    async fn set_mode(&self, mode: u8) -> Result<(), ClientError> {
        let mut conf = self.config().await?;
        // Keep the firmware's own type for the value.
        conf[MODE_KEY] = match conf.get(MODE_KEY) {
            Some(Value::String(_)) => Value::String(mode.to_string()),
            _ => Value::from(mode),
        };
        bounded(self.cfg.timeout, async {
            let (status, body) = self.digest(Method::POST, SET_CONF, Some(&conf)).await?;
            if status != StatusCode::OK {
                return Err(ClientError::Rejected(format!("{SET_CONF}: HTTP {status}")));
            }
            set_answer_ok(&body)
        })
        .await
    }

    /// One request with digest auth: the first attempt is answered 401 with
    /// the server's challenge, the second carries the response to it.
    async fn digest(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<(StatusCode, bytes::Bytes), ClientError> {
        let (status, headers, bytes) =
            http::request(&self.web, method.clone(), path, None, body).await?;
        if status != StatusCode::UNAUTHORIZED {
            return Ok((status, bytes));
        }
        let challenge = headers
            .get(hyper::header::WWW_AUTHENTICATE)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| ClientError::Protocol("401 without a digest challenge".into()))?;
        let mut prompt = digest_auth::parse(challenge)
            .map_err(|e| ClientError::Protocol(format!("digest challenge: {e}")))?;
        let payload = body.map(|v| v.to_string().into_bytes());
        let ctx = digest_auth::AuthContext::new_with_method(
            self.username.as_str(),
            self.password.as_str(),
            path,
            payload.as_deref(),
            digest_auth::HttpMethod(method.as_str().to_string().into()),
        );
        let answer = prompt
            .respond(&ctx)
            .map_err(|e| ClientError::Protocol(format!("digest response: {e}")))?
            .to_header_string();
        let (status, _, bytes) =
            http::request(&self.web, method, path, Some(&answer), body).await?;
        if status == StatusCode::UNAUTHORIZED {
            return Err(ClientError::Auth(format!(
                "{} refused user {:?} (digest auth)",
                self.web, self.username
            )));
        }
        Ok((status, bytes))
    }
}

/// `set_miner_conf.cgi`'s answer: `{"stats":"success",...}` as seen from
/// current firmware, or anything without an error (older firmware answers
/// with text).
fn set_answer_ok(body: &[u8]) -> Result<(), ClientError> {
    match serde_json::from_slice::<Value>(body) {
        Ok(v) => match v.get("stats").and_then(Value::as_str) {
            Some("success") | None => Ok(()),
            Some(other) => Err(ClientError::Rejected(format!(
                "{SET_CONF}: {other}: {}",
                v.get("msg").and_then(Value::as_str).unwrap_or("")
            ))),
        },
        Err(_) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_answers() {
        assert!(set_answer_ok(br#"{"stats":"success","code":"M000","msg":"OK!"}"#).is_ok());
        assert!(set_answer_ok(b"ok").is_ok());
        let e = set_answer_ok(br#"{"stats":"error","msg":"busy"}"#).unwrap_err();
        assert!(e.to_string().contains("busy"), "{e}");
    }
}
