//! Bounded reads on a host's standard miner ports. Each probe connects once,
//! sends one read-only request, reads at most [`MAX_REPLY`] bytes and gives
//! up after its timeout; a host that does not answer is simply `None`.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

use gridproxy_curtail::actuators::braiins::pb;
use gridproxy_curtail::actuators::cgminer::parse_reply;

/// The cgminer-style API (LuxOS, Whatsminer, stock cgminer/bmminer).
pub const CGMINER_PORT: u16 = 4028;
/// The web interface (VNish REST, stock Antminer web UI).
pub const WEB_PORT: u16 = 80;
/// Braiins OS public gRPC API.
pub const BRAIINS_GRPC_PORT: u16 = 50051;
/// Most bytes read from any one reply (a `version` or `summary` is < 2 KiB,
/// a web UI's root page a few KiB); a longer reply is cut here.
pub const MAX_REPLY: usize = 64 * 1024;

async fn connect(ip: IpAddr, port: u16, t: Duration) -> Option<TcpStream> {
    timeout(t, TcpStream::connect(SocketAddr::new(ip, port)))
        .await
        .ok()?
        .ok()
}

/// Send `{"command": command}` to the cgminer API and parse the reply
/// (JSON, NUL-terminated or closed). `None`: no connection, no reply within
/// `t`, more than [`MAX_REPLY`] bytes, or not JSON.
pub async fn cgminer(ip: IpAddr, command: &str, t: Duration) -> Option<Value> {
    timeout(t, async {
        let mut s = connect(ip, CGMINER_PORT, t).await?;
        let req = serde_json::json!({ "command": command }).to_string();
        s.write_all(req.as_bytes()).await.ok()?;
        let mut buf = Vec::with_capacity(2048);
        let mut chunk = [0u8; 4096];
        loop {
            let n = s.read(&mut chunk).await.ok()?;
            if n == 0 {
                break;
            }
            if buf.len() + n > MAX_REPLY {
                return None;
            }
            buf.extend_from_slice(&chunk[..n]);
            if buf.contains(&0) {
                break;
            }
        }
        parse_reply(&buf).ok()
    })
    .await
    .ok()
    .flatten()
}

/// What a web server answered to one `GET`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WebReply {
    /// HTTP status.
    pub status: u16,
    /// `WWW-Authenticate`, if any.
    pub www_authenticate: String,
    /// `Location`, if any.
    pub location: String,
    /// The body, cut at [`MAX_REPLY`] bytes (lossy UTF-8).
    pub body: String,
}

/// `GET path` on the web port (HTTP/1.1, one request, no redirects
/// followed). `None`: no connection or no answer within `t`.
pub async fn http_get(ip: IpAddr, path: &str, t: Duration) -> Option<WebReply> {
    timeout(t, async {
        let s = connect(ip, WEB_PORT, t).await?;
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
            .await
            .ok()?;
        let driver = tokio::spawn(conn);
        let host = SocketAddr::new(ip, WEB_PORT).to_string();
        let req = hyper::Request::get(path)
            .header(hyper::header::HOST, host)
            .body(Empty::<Bytes>::new())
            .ok()?;
        let out = async {
            let resp = send.send_request(req).await.ok()?;
            let header = |h| {
                resp.headers()
                    .get(h)
                    .and_then(|v: &hyper::header::HeaderValue| v.to_str().ok())
                    .unwrap_or("")
                    .to_owned()
            };
            let mut reply = WebReply {
                status: resp.status().as_u16(),
                www_authenticate: header(hyper::header::WWW_AUTHENTICATE),
                location: header(hyper::header::LOCATION),
                body: String::new(),
            };
            let mut body = resp.into_body();
            let mut bytes = Vec::new();
            while bytes.len() < MAX_REPLY {
                match body.frame().await {
                    Some(Ok(f)) => {
                        if let Some(d) = f.data_ref() {
                            let room = MAX_REPLY - bytes.len();
                            bytes.extend_from_slice(&d[..d.len().min(room)]);
                        }
                    }
                    _ => break,
                }
            }
            reply.body = String::from_utf8_lossy(&bytes).into_owned();
            Some(reply)
        }
        .await;
        driver.abort();
        out
    })
    .await
    .ok()
    .flatten()
}

/// What the Braiins OS gRPC API told us.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BraiinsDetails {
    /// `GetMinerDetails` was read (a login worked, or none was needed).
    pub read: bool,
    /// `miner_identity.miner_model` (or `name`).
    pub model: Option<String>,
    /// `sticker_hashrate`, TH/s.
    pub sticker_ths: Option<f64>,
    /// `hostname`.
    pub hostname: Option<String>,
}

/// Ask `braiins.bos.v1.MinerService/GetMinerDetails`. A Braiins OS answers
/// it, or refuses it as `UNAUTHENTICATED` until logged in; another gRPC
/// server answers `UNIMPLEMENTED` and anything else does not speak gRPC.
/// With `password`, logs in as `root` first to read the details.
/// `None`: not a Braiins OS.
pub async fn braiins(ip: IpAddr, password: Option<&str>, t: Duration) -> Option<BraiinsDetails> {
    use pb::authentication_service_client::AuthenticationServiceClient;
    use pb::miner_service_client::MinerServiceClient;
    use tonic::Code;
    timeout(t, async {
        // Refuse early when the port is closed, without tonic's retries.
        drop(connect(ip, BRAIINS_GRPC_PORT, t).await?);
        let uri = format!("http://{}", SocketAddr::new(ip, BRAIINS_GRPC_PORT));
        let ch = tonic::transport::Endpoint::from_shared(uri)
            .ok()?
            .connect_timeout(t)
            .timeout(t)
            .connect()
            .await
            .ok()?;
        let mut miner = MinerServiceClient::new(ch.clone()).max_decoding_message_size(MAX_REPLY);
        let details = match miner.get_miner_details(pb::GetMinerDetailsRequest {}).await {
            Ok(r) => Some(r.into_inner()),
            Err(s) if s.code() == Code::Unauthenticated => match password {
                None => None,
                Some(pw) => {
                    let login = AuthenticationServiceClient::new(ch)
                        .max_decoding_message_size(MAX_REPLY)
                        .login(pb::LoginRequest {
                            username: "root".into(),
                            password: pw.to_owned(),
                        })
                        .await
                        .ok();
                    let token = login.and_then(|r| {
                        let meta = r.metadata().get("authorization").cloned();
                        meta.filter(|m| !m.is_empty())
                            .or_else(|| r.into_inner().token.parse().ok())
                    });
                    match token {
                        Some(tok) => {
                            let mut req = tonic::Request::new(pb::GetMinerDetailsRequest {});
                            req.metadata_mut().insert("authorization", tok);
                            miner
                                .get_miner_details(req)
                                .await
                                .ok()
                                .map(|r| r.into_inner())
                        }
                        None => None,
                    }
                }
            },
            Err(_) => return None,
        };
        let nonempty = |s: String| (!s.trim().is_empty()).then_some(s);
        Some(match details {
            None => BraiinsDetails::default(),
            Some(d) => BraiinsDetails {
                read: true,
                model: d
                    .miner_identity
                    .and_then(|m| nonempty(m.miner_model).or(nonempty(m.name))),
                sticker_ths: d
                    .sticker_hashrate
                    .map(|h| h.gigahash_per_second / 1000.0)
                    .filter(|t| t.is_finite() && *t > 0.0),
                hostname: nonempty(d.hostname),
            },
        })
    })
    .await
    .ok()
    .flatten()
}
