//! A minimal HTTP/1.1 JSON client over hyper: one connection per request,
//! no pooling, no TLS (firmware web APIs are plain HTTP on the LAN). The
//! caller bounds it in time.

use super::{ClientError, HostPort};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{HeaderMap, Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::Value;

/// Largest response body accepted.
const MAX_BODY: usize = 256 * 1024;

/// Send one request; returns the status and the body parsed as JSON
/// (`Value::Null` for an empty body).
pub(crate) async fn json_request(
    addr: &HostPort,
    method: Method,
    path: &str,
    bearer: Option<&str>,
    body: Option<&Value>,
) -> Result<(StatusCode, Value), ClientError> {
    let auth = bearer.map(|t| format!("Bearer {t}"));
    let (status, _, bytes) = request(addr, method, path, auth.as_deref(), body).await?;
    let value = if bytes.iter().all(u8::is_ascii_whitespace) {
        Value::Null
    } else {
        serde_json::from_slice(&bytes)
            .map_err(|e| ClientError::Protocol(format!("invalid JSON body: {e}")))?
    };
    Ok((status, value))
}

/// Send one request with an optional `Authorization` value and JSON body;
/// returns the status, the headers and the raw body (at most 256 KiB).
pub(crate) async fn request(
    addr: &HostPort,
    method: Method,
    path: &str,
    authorization: Option<&str>,
    body: Option<&Value>,
) -> Result<(StatusCode, HeaderMap, Bytes), ClientError> {
    let stream = addr.connect().await?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| ClientError::Transport(e.to_string()))?;
    // The connection task ends when the response is read and `send` drops.
    let driver = tokio::spawn(conn);
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, addr.to_string())
        .header(hyper::header::ACCEPT, "application/json");
    if let Some(a) = authorization {
        req = req.header(hyper::header::AUTHORIZATION, a);
    }
    let payload = match body {
        Some(v) => {
            req = req.header(hyper::header::CONTENT_TYPE, "application/json");
            Bytes::from(v.to_string())
        }
        None => Bytes::new(),
    };
    let req = req
        .body(Full::new(payload))
        .map_err(|e| ClientError::Protocol(e.to_string()))?;
    let result = async {
        let resp = send
            .send_request(req)
            .await
            .map_err(|e| ClientError::Transport(e.to_string()))?;
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = Limited::new(resp.into_body(), MAX_BODY)
            .collect()
            .await
            .map_err(|e| ClientError::Transport(e.to_string()))?
            .to_bytes();
        Ok((status, headers, bytes))
    }
    .await;
    driver.abort();
    result
}
