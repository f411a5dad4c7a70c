//! VNish client: REST over HTTP (port 80 on real miners).
//!
//! `POST /api/v1/unlock {"pw": …}` gives a bearer token, cached and renewed
//! once on a 401. Sleep and wake are `POST /api/v1/mining/pause|resume`.
//! VNish sets power through autotune presets named by watts: the client
//! reads `GET /api/v1/autotune/presets` and posts the highest preset at or
//! below the target to `/api/v1/settings` (`miner.overclock.preset`).
//! Telemetry is `GET /api/v1/summary` (`miner.power_consumption`, W;
//! `miner.instant_hashrate`, TH/s).

use hyper::{Method, StatusCode};
use serde_json::{json, Value};
use tokio::sync::Mutex;

use super::cgminer::number;
use super::http::json_request;
use super::{bounded, ClientConfig, ClientError, Reading};

/// A VNish web API client.
#[derive(Debug)]
pub struct VnishClient {
    cfg: ClientConfig,
    password: String,
    token: Mutex<Option<String>>,
}

impl VnishClient {
    /// A client for the miner at `cfg.addr` with its web `password`.
    pub fn new(cfg: ClientConfig, password: impl Into<String>) -> VnishClient {
        VnishClient {
            cfg,
            password: password.into(),
            token: Mutex::new(None),
        }
    }

    /// `POST /api/v1/mining/pause`.
    pub async fn pause(&self) -> Result<(), ClientError> {
        bounded(self.cfg.timeout, async {
            self.authed(Method::POST, "/api/v1/mining/pause", None)
                .await
                .map(drop)
        })
        .await
    }

    /// `POST /api/v1/mining/resume`.
    pub async fn resume(&self) -> Result<(), ClientError> {
        bounded(self.cfg.timeout, async {
            self.authed(Method::POST, "/api/v1/mining/resume", None)
                .await
                .map(drop)
        })
        .await
    }

    /// Apply the highest preset at or below `watts` (the lowest if none
    /// is); returns the preset's watts.
    pub async fn set_power_target(&self, watts: u32) -> Result<u32, ClientError> {
        bounded(self.cfg.timeout, async {
            let list = self
                .authed(Method::GET, "/api/v1/autotune/presets", None)
                .await?;
            let presets = parse_presets(&list)?;
            let pick = presets
                .iter()
                .copied()
                .filter(|&w| w <= watts)
                .max()
                .or_else(|| presets.iter().copied().min())
                .ok_or(ClientError::Protocol("miner lists no presets".into()))?;
            let body = json!({ "miner": { "overclock": { "preset": pick.to_string() } } });
            self.authed(Method::POST, "/api/v1/settings", Some(&body))
                .await?;
            Ok(pick)
        })
        .await
    }

    /// Power and hashrate from `/api/v1/summary`.
    pub async fn telemetry(&self) -> Result<Reading, ClientError> {
        bounded(self.cfg.timeout, async {
            let (status, v) =
                json_request(&self.cfg.addr, Method::GET, "/api/v1/summary", None, None).await?;
            check(status, &v)?;
            Ok(Reading {
                power_w: number(&v, "/miner/power_consumption")?,
                hashrate_ths: number(&v, "/miner/instant_hashrate")?,
            })
        })
        .await
    }

    async fn unlock(&self) -> Result<String, ClientError> {
        let body = json!({ "pw": self.password });
        let (status, v) = json_request(
            &self.cfg.addr,
            Method::POST,
            "/api/v1/unlock",
            None,
            Some(&body),
        )
        .await?;
        check(status, &v)?;
        v.get("token")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .ok_or(ClientError::Protocol("unlock reply has no token".into()))
    }

    async fn authed(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, ClientError> {
        let mut token = self.token.lock().await;
        for attempt in 0..2 {
            let t = match token.as_ref() {
                Some(t) => t.clone(),
                None => token.insert(self.unlock().await?).clone(),
            };
            let (status, v) =
                json_request(&self.cfg.addr, method.clone(), path, Some(&t), body).await?;
            if status == StatusCode::UNAUTHORIZED && attempt == 0 {
                *token = None;
                continue;
            }
            check(status, &v)?;
            return Ok(v);
        }
        Err(ClientError::Auth("token refused".into()))
    }
}

/// Map an HTTP status and `{"err": …}` body to a result.
pub fn check(status: StatusCode, body: &Value) -> Result<(), ClientError> {
    if status.is_success() {
        return Ok(());
    }
    let msg = body
        .get("err")
        .and_then(Value::as_str)
        .map_or_else(|| status.to_string(), str::to_owned);
    Err(match status {
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => ClientError::Auth(msg),
        s if s.is_server_error() || s.is_client_error() => {
            ClientError::Rejected(format!("HTTP {}: {msg}", s.as_u16()))
        }
        s => ClientError::Protocol(format!("HTTP {}", s.as_u16())),
    })
}

/// The preset watts an autotune `presets` reply lists (sans-IO; public for the fuzz targets).
pub fn parse_presets(v: &Value) -> Result<Vec<u32>, ClientError> {
    let list = v
        .as_array()
        .ok_or(ClientError::Protocol("presets is not a list".into()))?;
    Ok(list
        .iter()
        .filter_map(|p| p.get("name").and_then(Value::as_str))
        .filter_map(|n| n.trim().parse::<u32>().ok())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_http_errors() {
        let e = check(
            StatusCode::UNAUTHORIZED,
            &json!({ "err": "Wrong password" }),
        );
        assert_eq!(e, Err(ClientError::Auth("Wrong password".into())));
        let e = check(StatusCode::INTERNAL_SERVER_ERROR, &Value::Null);
        assert!(matches!(e, Err(ClientError::Rejected(_))));
        assert!(check(StatusCode::OK, &Value::Null).is_ok());
        let p = parse_presets(&json!([{ "name": "3000" }, { "name": "x" }, { "name": "2800" }]))
            .unwrap();
        assert_eq!(p, vec![3000, 2800]);
    }
}
