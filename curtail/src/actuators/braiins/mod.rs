//! Braiins OS client: gRPC (port 50051 on real miners), package
//! `braiins.bos.v1`, over tonic.
//!
//! `AuthenticationService.Login` returns a token sent as `authorization`
//! metadata on every other call; it is cached and renewed once on
//! `UNAUTHENTICATED`. Sleep/wake are `ActionsService.PauseMining` /
//! `ResumeMining`, the power target `PerformanceService.SetPowerTarget`
//! (`SAVE_ACTION_SAVE_AND_APPLY`), telemetry `MinerService.GetMinerStats`.
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

    /// `ActionsService.ResumeMining`; `Ok(true)` if it was already running.
    pub async fn resume_mining(&self) -> Result<bool, ClientError> {
        self.call(|ch, req| async move {
            ActionsServiceClient::new(ch)
                .resume_mining(req.map(|()| pb::ResumeMiningRequest {}))
                .await
                .map(|r| r.into_inner().already_running)
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
        resp.into_inner()
            .token
            .parse()
            .map_err(|_| ClientError::Protocol("login token is not ASCII".into()))
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

/// Power and hashrate from a `GetMinerStats` reply (sans-IO). A hashrate that
/// is not a finite, non-negative number is refused, as the JSON clients do.
pub fn reading_of(stats: pb::GetMinerStatsResponse) -> Result<Reading, ClientError> {
    let power = stats
        .power_stats
        .and_then(|p| p.approximated_consumption)
        .ok_or(ClientError::Protocol("no power in miner stats".into()))?;
    let hashrate = stats
        .miner_stats
        .and_then(|m| m.real_hashrate)
        .map(|h| h.terahash_per_second)
        .filter(|h| h.is_finite() && *h >= 0.0)
        .ok_or(ClientError::Protocol(
            "no valid hashrate in miner stats".into(),
        ))?;
    Ok(Reading {
        power_w: power.watt as f64,
        hashrate_ths: hashrate,
    })
}
