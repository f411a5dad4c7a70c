//! Braiins OS client: gRPC (port 50051 on real miners), package
//! `braiins.bos.v1`, over tonic, with the vendor's own messages (see
//! [`gridproxy_firmware_api::braiins`] for the files and the commit).
//!
//! - Login: `AuthenticationService.Login` (authentication.proto). The token
//!   is read from the reply's `authorization` metadata, where every firmware
//!   version puts it (the vendor's README: the "legacy way", which "still
//!   works"); the `LoginResponse.token` body field (API 1.1.0 and later,
//!   vendor CHANGELOG) is the fallback. It is sent as `authorization`
//!   metadata on every other call, cached, and renewed once on
//!   `UNAUTHENTICATED`.
//! - Sleep/wake: `ActionsService.PauseMining` / `ResumeMining`
//!   (actions.proto).
//! - Power target: `PerformanceService.SetPowerTarget` with
//!   `SAVE_ACTION_SAVE_AND_APPLY` (performance.proto, common.proto).
//! - Telemetry: `MinerService.GetMinerStats` (miner.proto):
//!   `power_stats.approximated_consumption` and
//!   `miner_stats.real_hashrate`, a `RealHashrate` of GH/s windows (work.proto);
//!   status: `MinerService.GetMinerDetails`' `status`.
//!
//! Not in the vendor files, so chosen here: which real-hashrate window to
//! read (the shortest present: `last_5s`, then `last_15s`, `last_30s`,
//! `last_1m`, so a sleep shows within seconds), and how a wrong password is
//! answered (any `UNAUTHENTICATED` or `PERMISSION_DENIED` is an auth error).
//!
//! The messages and the tonic clients come from
//! [`gridproxy_firmware_api::braiins`] (generated once, shared with the
//! fixtures' emulator); re-exported here as [`pb`].

use std::future::Future;

use tokio::sync::{Mutex, OnceCell};
use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Status};

use super::{bounded, ClientConfig, ClientError, Reading};

pub use gridproxy_firmware_api::braiins as pb;

use pb::actions_service_client::ActionsServiceClient;
use pb::authentication_service_client::AuthenticationServiceClient;
use pb::miner_service_client::MinerServiceClient;
use pb::performance_service_client::PerformanceServiceClient;

type Token = MetadataValue<tonic::metadata::Ascii>;

/// A Braiins OS gRPC client.
#[derive(Debug)]
pub struct BraiinsClient {
    cfg: ClientConfig,
    username: String,
    password: String,
    channel: OnceCell<Channel>,
    token: Mutex<Option<Token>>,
}

impl BraiinsClient {
    /// A client for the miner at `cfg.addr`, logging in as `username`.
    pub fn new(
        cfg: ClientConfig,
        username: impl Into<String>,
        password: impl Into<String>,
    ) -> BraiinsClient {
        BraiinsClient {
            cfg,
            username: username.into(),
            password: password.into(),
            channel: OnceCell::new(),
            token: Mutex::new(None),
        }
    }

    /// `ActionsService.PauseMining`; `Ok(true)` if it was already paused.
    pub async fn pause_mining(&self) -> Result<bool, ClientError> {
        self.call(|ch, req| async move {
            ActionsServiceClient::new(ch)
                .pause_mining(req.map(|()| pb::PauseMiningRequest {}))
                .await
                .map(|r| r.into_inner().already_paused)
        })
        .await
    }

    /// `ActionsService.ResumeMining`; `Ok(true)` if it was already mining.
    pub async fn resume_mining(&self) -> Result<bool, ClientError> {
        self.call(|ch, req| async move {
            ActionsServiceClient::new(ch)
                .resume_mining(req.map(|()| pb::ResumeMiningRequest {}))
                .await
                .map(|r| r.into_inner().already_mining)
        })
        .await
    }

    /// `PerformanceService.SetPowerTarget` (save and apply); returns the
    /// target the miner reports.
    pub async fn set_power_target(&self, watts: u32) -> Result<u64, ClientError> {
        self.call(|ch, req| async move {
            let msg = pb::SetPowerTargetRequest {
                save_action: pb::SaveAction::SaveAndApply as i32,
                power_target: Some(pb::Power {
                    watt: u64::from(watts),
                }),
            };
            PerformanceServiceClient::new(ch)
                .set_power_target(req.map(|()| msg))
                .await
                .map(|r| r.into_inner().power_target.map_or(0, |p| p.watt))
        })
        .await
    }

    /// Power and hashrate from `MinerService.GetMinerStats`.
    pub async fn telemetry(&self) -> Result<Reading, ClientError> {
        let stats = self
            .call(|ch, req| async move {
                MinerServiceClient::new(ch)
                    .get_miner_stats(req.map(|()| pb::GetMinerStatsRequest {}))
                    .await
                    .map(tonic::Response::into_inner)
            })
            .await?;
        reading_of(stats)
    }

    /// The miner's status from `MinerService.GetMinerDetails` (what the
    /// firmware claims: `Paused` after a pause, `Normal` when mining). An
    /// enum value this build does not know is `Unspecified`.
    pub async fn miner_status(&self) -> Result<pb::MinerStatus, ClientError> {
        let details = self
            .call(|ch, req| async move {
                MinerServiceClient::new(ch)
                    .get_miner_details(req.map(|()| pb::GetMinerDetailsRequest {}))
                    .await
                    .map(tonic::Response::into_inner)
            })
            .await?;
        Ok(pb::MinerStatus::try_from(details.status).unwrap_or(pb::MinerStatus::Unspecified))
    }

    async fn channel(&self) -> Result<Channel, ClientError> {
        let t = self.cfg.timeout;
        self.channel
            .get_or_try_init(|| async {
                Endpoint::from_shared(format!("http://{}", self.cfg.addr))
                    .map_err(|e| ClientError::Connect(e.to_string()))
                    .map(|e| e.connect_timeout(t).timeout(t).connect_lazy())
            })
            .await
            .cloned()
    }

    /// Run one authorised call, logging in first if needed and once more
    /// if the token is refused; bounded by the timeout as a whole.
    async fn call<T, F, Fut>(&self, f: F) -> Result<T, ClientError>
    where
        F: Fn(Channel, Request<()>) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        bounded(self.cfg.timeout, async {
            let ch = self.channel().await?;
            let mut token = self.token.lock().await;
            for attempt in 0..2 {
                let t = match token.as_ref() {
                    Some(t) => t.clone(),
                    None => token.insert(self.login(ch.clone()).await?).clone(),
                };
                let mut req = Request::new(());
                req.metadata_mut().insert("authorization", t);
                match f(ch.clone(), req).await {
                    Err(s) if s.code() == Code::Unauthenticated && attempt == 0 => *token = None,
                    r => return r.map_err(|s| self.map_status(s)),
                }
            }
            Err(ClientError::Auth("token refused".into()))
        })
        .await
    }

    async fn login(&self, ch: Channel) -> Result<Token, ClientError> {
        let resp = AuthenticationServiceClient::new(ch)
            .login(pb::LoginRequest {
                username: self.username.clone(),
                password: self.password.clone(),
            })
            .await
            .map_err(|s| self.map_status(s))?;
        token_of(resp)
    }

    fn map_status(&self, s: Status) -> ClientError {
        let msg = s.message().to_owned();
        match s.code() {
            Code::Unauthenticated | Code::PermissionDenied => ClientError::Auth(msg),
            Code::FailedPrecondition
            | Code::InvalidArgument
            | Code::OutOfRange
            | Code::Aborted
            | Code::AlreadyExists => ClientError::Rejected(format!("{:?}: {msg}", s.code())),
            Code::DeadlineExceeded | Code::Cancelled => ClientError::Timeout(self.cfg.timeout),
            Code::Unavailable => ClientError::Connect(msg),
            Code::Unimplemented => ClientError::Unsupported("gRPC method"),
            c => ClientError::Protocol(format!("{c:?}: {msg}")),
        }
    }
}

/// The session token of a `Login` reply: its `authorization` metadata (every
/// firmware version), else the `token` body field (API 1.1.0 and later).
fn token_of(resp: tonic::Response<pb::LoginResponse>) -> Result<Token, ClientError> {
    if let Some(t) = resp.metadata().get("authorization") {
        if !t.is_empty() {
            return Ok(t.clone());
        }
    }
    let body = resp.into_inner().token;
    if body.is_empty() {
        return Err(ClientError::Protocol(
            "login reply carries no token (no `authorization` metadata, empty `token`)".into(),
        ));
    }
    body.parse()
        .map_err(|_| ClientError::Protocol("login token is not printable ASCII".into()))
}

/// Power and hashrate from a `GetMinerStats` reply (sans-IO): the
/// approximated consumption, and the shortest real-hashrate window present
/// (GH/s, converted to TH/s). A hashrate that is not a finite, non-negative
/// number is refused, as the JSON clients do.
pub fn reading_of(stats: pb::GetMinerStatsResponse) -> Result<Reading, ClientError> {
    let power = stats
        .power_stats
        .and_then(|p| p.approximated_consumption)
        .ok_or(ClientError::Protocol("no power in miner stats".into()))?;
    let real = stats
        .miner_stats
        .and_then(|m| m.real_hashrate)
        .ok_or(ClientError::Protocol(
            "no real hashrate in miner stats".into(),
        ))?;
    let hashrate = [real.last_5s, real.last_15s, real.last_30s, real.last_1m]
        .into_iter()
        .flatten()
        .next()
        .map(|h| h.gigahash_per_second / 1000.0)
        .filter(|h| h.is_finite() && *h >= 0.0)
        .ok_or(ClientError::Protocol(
            "no valid short-window real hashrate in miner stats".into(),
        ))?;
    Ok(Reading {
        power_w: power.watt as f64,
        hashrate_ths: hashrate,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn giga(v: f64) -> Option<pb::GigaHashrate> {
        Some(pb::GigaHashrate {
            gigahash_per_second: v,
        })
    }

    fn stats(real: pb::RealHashrate, watt: u64) -> pb::GetMinerStatsResponse {
        pb::GetMinerStatsResponse {
            miner_stats: Some(pb::WorkSolverStats {
                real_hashrate: Some(real),
                ..Default::default()
            }),
            power_stats: Some(pb::MinerPowerStats {
                approximated_consumption: Some(pb::Power { watt }),
                efficiency: None,
            }),
            pool_stats: None,
        }
    }

    #[test]
    fn reading_takes_the_shortest_window_in_terahash() {
        let real = pb::RealHashrate {
            last_5s: giga(95_500.0),
            last_1m: giga(104_000.0),
            since_restart: giga(1.0),
            ..Default::default()
        };
        let r = reading_of(stats(real, 3250)).unwrap();
        assert_eq!(r.power_w, 3250.0);
        assert!((r.hashrate_ths - 95.5).abs() < 1e-9, "{r:?}");
        // No 5 s window: the next one.
        let real = pb::RealHashrate {
            last_30s: giga(50_000.0),
            last_1m: giga(104_000.0),
            ..Default::default()
        };
        let r = reading_of(stats(real, 1800)).unwrap();
        assert!((r.hashrate_ths - 50.0).abs() < 1e-9, "{r:?}");
    }

    #[test]
    fn reading_refuses_missing_or_invalid_values() {
        let only_long = pb::RealHashrate {
            last_1h: giga(100_000.0),
            ..Default::default()
        };
        assert!(matches!(
            reading_of(stats(only_long, 3000)),
            Err(ClientError::Protocol(_))
        ));
        for bad in [f64::NAN, f64::INFINITY, -1.0] {
            let real = pb::RealHashrate {
                last_5s: giga(bad),
                ..Default::default()
            };
            assert!(reading_of(stats(real, 3000)).is_err(), "{bad}");
        }
        let mut no_power = stats(pb::RealHashrate::default(), 0);
        no_power.power_stats = None;
        assert!(reading_of(no_power).is_err());
        assert!(reading_of(pb::GetMinerStatsResponse::default()).is_err());
    }

    fn login_reply(header: Option<&str>, body: &str) -> tonic::Response<pb::LoginResponse> {
        let mut r = tonic::Response::new(pb::LoginResponse {
            token: body.into(),
            timeout_s: 3600,
        });
        if let Some(h) = header {
            r.metadata_mut().insert("authorization", h.parse().unwrap());
        }
        r
    }

    #[test]
    fn token_from_metadata_then_body() {
        // Header and body (current firmware): the header.
        let t = token_of(login_reply(Some("hdr"), "body")).unwrap();
        assert_eq!(t, "hdr");
        // Header only (API before 1.1.0).
        assert_eq!(token_of(login_reply(Some("hdr"), "")).unwrap(), "hdr");
        // Body only.
        assert_eq!(token_of(login_reply(None, "body")).unwrap(), "body");
        // Neither, or a body token that cannot be metadata: a clear error.
        assert!(matches!(
            token_of(login_reply(None, "")),
            Err(ClientError::Protocol(_))
        ));
        assert!(matches!(
            token_of(login_reply(None, "bad\ntoken")),
            Err(ClientError::Protocol(_))
        ));
    }
}
