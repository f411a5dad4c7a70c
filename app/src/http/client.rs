//! A minimal HTTP/1.1 client for the control API on loopback (`gridproxy
//! status`, tests). One request per connection (`Connection: close`),
//! bounded response size, a timeout on the whole exchange; TLS through
//! [`request_tls`] when the API serves HTTPS.

use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Largest response read.
pub const MAX_RESPONSE: usize = 16 * 1024 * 1024;

/// A response.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    /// Status code.
    pub status: u16,
    /// Headers (names lower-cased).
    pub headers: Vec<(String, String)>,
    /// Body.
    pub body: Vec<u8>,
}

impl HttpResponse {
    /// The body as text (lossy).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    /// The body as JSON.
    pub fn json(&self) -> Result<serde_json::Value, String> {
        serde_json::from_slice(&self.body).map_err(|e| format!("{e}: {}", self.text()))
    }
    /// A header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Send one request. `token` adds `Authorization: Bearer`.
pub async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&serde_json::Value>,
    timeout: Duration,
) -> Result<HttpResponse, String> {
    tokio::time::timeout(timeout, exchange(addr, method, path, token, body))
        .await
        .map_err(|_| format!("{method} http://{addr}{path}: no answer within {timeout:?}"))?
}

/// [`request_tls`] when `tls` is given, else [`request`].
pub async fn request_via(
    addr: SocketAddr,
    tls: Option<&tokio_rustls::TlsConnector>,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&serde_json::Value>,
    timeout: Duration,
) -> Result<HttpResponse, String> {
    match tls {
        Some(t) => request_tls(addr, t, method, path, token, body, timeout).await,
        None => request(addr, method, path, token, body, timeout).await,
    }
}

/// [`request`] over TLS, trusting only what `tls` trusts; the server
/// certificate must name `addr`'s IP address.
pub async fn request_tls(
    addr: SocketAddr,
    tls: &tokio_rustls::TlsConnector,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&serde_json::Value>,
    timeout: Duration,
) -> Result<HttpResponse, String> {
    let go = async {
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect {addr}: {e}"))?;
        let s = tls
            .connect(super::tls::server_name(addr), tcp)
            .await
            .map_err(|e| format!("TLS with {addr}: {e}"))?;
        exchange_on(s, addr, method, path, token, body).await
    };
    tokio::time::timeout(timeout, go)
        .await
        .map_err(|_| format!("{method} https://{addr}{path}: no answer within {timeout:?}"))?
}

async fn exchange(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&serde_json::Value>,
) -> Result<HttpResponse, String> {
    let s = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect {addr}: {e}"))?;
    exchange_on(s, addr, method, path, token, body).await
}

async fn exchange_on(
    mut s: impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&serde_json::Value>,
) -> Result<HttpResponse, String> {
    let payload = body.map(|b| b.to_string()).unwrap_or_default();
    let mut req =
        format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nAccept: */*\r\n");
    if let Some(t) = token {
        req.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    if body.is_some() {
        req.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            payload.len()
        ));
    }
    req.push_str("\r\n");
    req.push_str(&payload);
    s.write_all(req.as_bytes())
        .await
        .map_err(|e| format!("write: {e}"))?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        let n = match s.read(&mut chunk).await {
            Ok(n) => n,
            // A TLS peer closing without close_notify: the body is complete
            // if its length says so, checked below.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => 0,
            Err(e) => return Err(format!("read: {e}")),
        };
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() > MAX_RESPONSE {
            return Err(format!("response larger than {MAX_RESPONSE} bytes"));
        }
        // Some servers keep the connection open despite `Connection: close`:
        // stop once a Content-Length body is complete.
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            if let Some(len) = content_length(&buf[..end]) {
                if buf.len() >= end + 4 + len {
                    buf.truncate(end + 4 + len);
                    break;
                }
            }
        }
    }
    parse(&buf)
}

fn content_length(head: &[u8]) -> Option<usize> {
    let head = std::str::from_utf8(head).ok()?;
    head.split("\r\n").skip(1).find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim()
            .eq_ignore_ascii_case("content-length")
            .then(|| v.trim().parse().ok())?
    })
}

fn parse(buf: &[u8]) -> Result<HttpResponse, String> {
    let end = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("response without a header end")?;
    let head = std::str::from_utf8(&buf[..end]).map_err(|_| "non-UTF-8 response header")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line {status_line:?}"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let raw = &buf[end + 4..];
    let chunked = headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"));
    let body = if chunked { dechunk(raw)? } else { raw.to_vec() };
    Ok(HttpResponse {
        status,
        headers,
        body,
    })
}

fn dechunk(mut raw: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    loop {
        let nl = raw
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or("truncated chunk size")?;
        let size_s = std::str::from_utf8(&raw[..nl]).map_err(|_| "bad chunk size")?;
        let size = usize::from_str_radix(size_s.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| format!("bad chunk size {size_s:?}"))?;
        raw = &raw[nl + 2..];
        if size == 0 {
            return Ok(out);
        }
        if raw.len() < size + 2 {
            return Err("truncated chunk".into());
        }
        out.extend_from_slice(&raw[..size]);
        raw = &raw[size + 2..];
    }
}

/// `up` for a JSON `true`, else `down`.
fn up_down(v: &serde_json::Value) -> &'static str {
    if v.as_bool() == Some(true) {
        "up"
    } else {
        "down"
    }
}

/// `  last error: …` for a JSON string, else nothing.
fn last_error(v: &serde_json::Value) -> String {
    v.as_str()
        .map(|e| format!("  last error: {e}"))
        .unwrap_or_default()
}

/// A readable fleet summary from `GET /api/v1/fleet` (for `gridproxy status`).
pub fn format_fleet(v: &serde_json::Value) -> String {
    let mut out = String::new();
    let f = |x: &serde_json::Value| x.as_f64().unwrap_or(0.0);
    out.push_str(&format!(
        "miners {} connected, {} workers known; hashrate {}\n",
        v["miners_connected"],
        v["workers_known"],
        si(f(&v["hashrate_hs"]), "H/s")
    ));
    let rej: u64 = v["shares"]["rejected"]
        .as_object()
        .map(|o| o.values().filter_map(serde_json::Value::as_u64).sum())
        .unwrap_or(0);
    out.push_str(&format!(
        "shares: {} accepted, {} rejected; upstream {} acked, {} rejected\n",
        v["shares"]["accepted"],
        rej,
        v["shares"]["upstream_accepted"],
        v["shares"]["upstream_rejected"]
    ));
    if let Some(pools) = v["pools"].as_array() {
        for p in pools {
            out.push_str(&format!(
                "pool {:<10} {:<4} {:>5} miners  sent {} acked {} rejected {}{}\n",
                p["name"].as_str().unwrap_or("?"),
                up_down(&p["live"]),
                p["miners"],
                p["submitted"],
                p["accepted"],
                p["rejected"],
                last_error(&p["last_error"])
            ));
        }
    }
    let s = &v["site"];
    if s["attached"].as_bool() == Some(true) {
        out.push_str(&format!(
            "site {:.0} kW of {:.0} kW nameplate; target {}; price {}; mode {}; curtailed {}/{}\n",
            f(&s["site_kw"]),
            f(&s["nominal_kw"]),
            s["target_kw"]
                .as_f64()
                .map(|k| format!("{k:.0} kW"))
                .unwrap_or_else(|| "none".into()),
            s["price_usd_per_mwh"]
                .as_f64()
                .map(|p| format!("${p:.0}/MWh"))
                .unwrap_or_else(|| "?".into()),
            s["mode"].as_str().unwrap_or("?"),
            s["miners_curtailed"],
            s["miners_total"]
        ));
        if let Some(evs) = s["events"].as_array() {
            for e in evs {
                out.push_str(&format!(
                    "event {} {} {}\n",
                    e["id"].as_str().unwrap_or("?"),
                    e["state"].as_str().unwrap_or("?"),
                    e["target"].as_str().unwrap_or("?")
                ));
            }
        }
    } else if s["lease"].is_object() {
        out.push_str("site: standby (another instance holds the site lease and runs the engine)\n");
    } else {
        out.push_str("site: no curtailment driver attached\n");
    }
    if s["lease"]["held"].as_bool() == Some(true) {
        out.push_str(&format!(
            "site lease: held, token {}\n",
            s["lease"]["token"]
        ));
    }
    if let Some(n) = s["parks"].as_u64().filter(|&n| n > 0) {
        out.push_str(&format!("site parks and pins in force here: {n}\n"));
    }
    for p in s["peers"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "peer {:<10} {:<4} {} workers, {} parks{}\n",
            p["name"].as_str().unwrap_or("?"),
            up_down(&p["up"]),
            p["workers"],
            p["applied"],
            last_error(&p["error"])
        ));
    }
    out
}

/// `v` with an SI prefix: `1.2 TH/s`.
pub fn si(v: f64, unit: &str) -> String {
    let a = v.abs();
    for (m, p) in [(1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")] {
        if a >= m {
            return format!("{:.1} {p}{unit}", v / m);
        }
    }
    format!("{v:.0} {unit}")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `gridproxy status` says which instance runs the site and how its
    /// peers are doing.
    #[test]
    fn status_shows_the_lease_and_the_peers() {
        let holder = serde_json::json!({
            "site": {"attached": true, "site_kw": 10.0, "nominal_kw": 20.0, "mode": "dispatch",
                     "miners_curtailed": 2, "miners_total": 4, "parks": 2,
                     "lease": {"held": true, "token": 7},
                     "peers": [{"name": "b", "up": false, "workers": 3, "applied": 2,
                                "error": "connect 127.0.0.1:9: refused"}]}
        });
        let t = format_fleet(&holder);
        assert!(t.contains("site lease: held, token 7"), "{t}");
        assert!(t.contains("site parks and pins in force here: 2"), "{t}");
        assert!(
            t.contains("peer b") && t.contains("down") && t.contains("refused"),
            "{t}"
        );
        let standby =
            serde_json::json!({"site": {"attached": false, "lease": {"held": false, "token": 0}}});
        let t = format_fleet(&standby);
        assert!(
            t.contains("site: standby") && !t.contains("site lease: held"),
            "{t}"
        );
        let alone = format_fleet(&serde_json::json!({"site": {"attached": false}}));
        assert!(alone.contains("no curtailment driver attached"), "{alone}");
    }

    #[test]
    fn parses_plain_and_chunked() {
        let r = parse(
            b"HTTP/1.1 401 Unauthorized\r\ncontent-length: 2\r\nWWW-Authenticate: Bearer\r\n\r\n{}",
        )
        .unwrap();
        assert_eq!(r.status, 401);
        assert_eq!(r.header("www-authenticate"), Some("Bearer"));
        assert_eq!(r.body, b"{}");
        let r = parse(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n").unwrap();
        assert_eq!(r.body, b"abcde");
    }
}
