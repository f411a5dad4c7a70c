//! [`FleetActuator`]: one [`Actuator`] and [`TelemetrySource`] for a whole
//! site, dispatching by each miner's [`ControlSurface`] to its client.
//!
//! | surface | commands | telemetry |
//! |---|---|---|
//! | LuxOS | [`LuxOsClient`] | `power` + `summary` |
//! | Braiins OS | [`BraiinsClient`] | `GetMinerStats` |
//! | Whatsminer | [`AutoClient`]: API v3 [`WhatsminerV3Client`], v2 [`WhatsminerClient`], or auto | v3 `get.miner.status`, v2 `summary` |
//! | VNish | [`VnishClient`] | `/api/v1/summary` |
//! | Antminer stock | [`AntminerClient`] (web interface, digest auth) | [`StockClient`] |
//! | none | unsupported (proxy park only) | [`StockClient`] |
//!
//! Proxy-side actions (park, unpark, reroute) belong to the proxy's
//! actuator and are answered with [`ActuatorError::Unsupported`] here.

use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

use crate::actuator::{Actuator, ActuatorError, TelemetrySource};
use crate::command::{Action, Command};
use crate::fleet::{ControlSurface, MinerId, Telemetry};
use crate::time::{Clock, SystemClock};

use super::antminer::AntminerClient;
use super::braiins::BraiinsClient;
use super::luxos::LuxOsClient;
use super::stock::StockClient;
use super::vnish::VnishClient;
#[cfg(doc)]
use super::whatsminer::WhatsminerClient;
#[cfg(doc)]
use super::whatsminer_v3::WhatsminerV3Client;
use super::whatsminer_v3::{ApiVersion, AutoClient, WhatsminerApi};
use super::{ClientConfig, ClientError, HostPort, Reading};

/// How to reach one miner's firmware API.
#[derive(Clone, PartialEq, Eq)]
pub struct MinerEndpoint {
    /// Its firmware.
    pub surface: ControlSurface,
    /// API address: a host name or IP address, any port.
    pub addr: HostPort,
    /// User name where the API has one (Braiins OS: `root`).
    pub username: String,
    /// Password (LuxOS and cgminer-only stock need none).
    pub password: String,
    /// Stock Antminer: its web interface (default: the API host, port 80).
    pub web: Option<HostPort>,
    /// Whatsminer: which API (`addr` is the v3 address for `V3` and `Auto`,
    /// the v2 address for `V2`; default `V2`). The user name, when not
    /// `root`, is the v3 write account (default `super`).
    pub whatsminer_api: WhatsminerApi,
}

impl std::fmt::Debug for MinerEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MinerEndpoint")
            .field("surface", &self.surface)
            .field("addr", &self.addr)
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .field("web", &self.web)
            .field("whatsminer_api", &self.whatsminer_api)
            .finish()
    }
}

impl MinerEndpoint {
    /// `surface` at `addr`, user `root`, empty password.
    pub fn new(surface: ControlSurface, addr: impl Into<HostPort>) -> MinerEndpoint {
        MinerEndpoint {
            surface,
            addr: addr.into(),
            username: "root".into(),
            password: String::new(),
            web: None,
            whatsminer_api: WhatsminerApi::V2,
        }
    }

    /// The same speaking Whatsminer `api`.
    pub fn with_whatsminer_api(mut self, api: WhatsminerApi) -> MinerEndpoint {
        self.whatsminer_api = api;
        self
    }

    /// The same with the web interface at `web` (stock Antminer).
    pub fn with_web(mut self, web: HostPort) -> MinerEndpoint {
        self.web = Some(web);
        self
    }

    /// The same with credentials.
    pub fn with_credentials(
        mut self,
        username: impl Into<String>,
        password: impl Into<String>,
    ) -> MinerEndpoint {
        self.username = username.into();
        self.password = password.into();
        self
    }
}

#[derive(Debug)]
enum Client {
    LuxOs(LuxOsClient),
    Braiins(BraiinsClient),
    Whatsminer(AutoClient),
    Vnish(VnishClient),
    Antminer(AntminerClient),
    Stock(StockClient),
}

impl Client {
    fn for_endpoint(ep: &MinerEndpoint, timeout: Duration) -> Client {
        let cfg = ClientConfig::new(ep.addr.clone()).with_timeout(timeout);
        match ep.surface {
            ControlSurface::LuxOs => Client::LuxOs(LuxOsClient::new(cfg)),
            ControlSurface::BraiinsOs => Client::Braiins(BraiinsClient::new(
                cfg,
                ep.username.clone(),
                ep.password.clone(),
            )),
            ControlSurface::Whatsminer => {
                // `root` is every endpoint's default user; v3 has no such
                // account, so it means the v3 default.
                let account = if ep.username == "root" {
                    ""
                } else {
                    &ep.username
                };
                Client::Whatsminer(AutoClient::new(
                    ep.whatsminer_api,
                    cfg,
                    account,
                    &ep.password,
                ))
            }
            ControlSurface::Vnish => Client::Vnish(VnishClient::new(cfg, ep.password.clone())),
            ControlSurface::AntminerStock => {
                let web = ep
                    .web
                    .clone()
                    .unwrap_or_else(|| HostPort::new(ep.addr.host.clone(), 80));
                Client::Antminer(AntminerClient::new(
                    cfg,
                    web,
                    ep.username.clone(),
                    ep.password.clone(),
                ))
            }
            ControlSurface::None => Client::Stock(StockClient::new(cfg)),
        }
    }

    async fn apply(&self, action: Action) -> Result<(), ClientError> {
        match (self, action) {
            (_, Action::Park | Action::Unpark | Action::Reroute(_)) => {
                Err(ClientError::Unsupported(action.as_str()))
            }
            (Client::LuxOs(c), Action::Sleep) => c.sleep().await,
            (Client::LuxOs(c), Action::Wake) => c.wakeup().await,
            (Client::LuxOs(c), Action::SetPowerTarget(w)) => c.set_power_target(w).await.map(drop),
            (Client::Braiins(c), Action::Sleep) => c.pause_mining().await.map(drop),
            (Client::Braiins(c), Action::Wake) => c.resume_mining().await.map(drop),
            (Client::Braiins(c), Action::SetPowerTarget(w)) => {
                c.set_power_target(w).await.map(drop)
            }
            (Client::Whatsminer(c), Action::Sleep) => c.sleep().await,
            (Client::Whatsminer(c), Action::Wake) => c.wake().await,
            (Client::Whatsminer(c), Action::SetPowerTarget(w)) => c.set_power_target(w).await,
            (Client::Vnish(c), Action::Sleep) => c.pause().await,
            (Client::Vnish(c), Action::Wake) => c.resume().await,
            (Client::Vnish(c), Action::SetPowerTarget(w)) => c.set_power_target(w).await.map(drop),
            (Client::Antminer(c), Action::Sleep) => c.sleep().await,
            (Client::Antminer(c), Action::Wake) => c.wake().await,
            (Client::Antminer(_), a) | (Client::Stock(_), a) => {
                Err(ClientError::Unsupported(a.as_str()))
            }
        }
    }

    async fn telemetry(&self) -> Result<Reading, ClientError> {
        match self {
            Client::LuxOs(c) => c.telemetry().await,
            Client::Braiins(c) => c.telemetry().await,
            Client::Whatsminer(c) => c.telemetry().await,
            Client::Vnish(c) => c.telemetry().await,
            Client::Antminer(c) => c.telemetry().await,
            Client::Stock(c) => c.telemetry().await,
        }
    }
}

/// Firmware actuator and telemetry poller for a set of miners.
#[derive(Debug)]
pub struct FleetActuator {
    timeout: Duration,
    miners: HashMap<MinerId, (ControlSurface, Client)>,
}

impl FleetActuator {
    /// An empty inventory whose clients time out after `timeout`.
    pub fn new(timeout: Duration) -> FleetActuator {
        FleetActuator {
            timeout,
            miners: HashMap::new(),
        }
    }

    /// Register (or replace) `miner`'s endpoint.
    pub fn insert(&mut self, miner: MinerId, endpoint: &MinerEndpoint) {
        let client = Client::for_endpoint(endpoint, self.timeout);
        self.miners.insert(miner, (endpoint.surface, client));
    }

    /// Number of registered miners.
    pub fn len(&self) -> usize {
        self.miners.len()
    }

    /// Whether no miner is registered.
    pub fn is_empty(&self) -> bool {
        self.miners.is_empty()
    }

    fn get(&self, miner: MinerId) -> Result<&(ControlSurface, Client), ActuatorError> {
        self.miners
            .get(&miner)
            .ok_or(ActuatorError::UnknownMiner(miner))
    }

    /// Carry out `action` on `miner` through its firmware.
    pub async fn apply(&self, miner: MinerId, action: Action) -> Result<(), ActuatorError> {
        let (surface, client) = self.get(miner)?;
        client
            .apply(action)
            .await
            .map_err(|e| e.for_miner(miner, *surface))
    }

    /// The Whatsminer API `miner` is driven through: fixed, or what auto
    /// found (`None`: not a Whatsminer, or auto has not reached it yet).
    pub fn whatsminer_api(&self, miner: MinerId) -> Option<ApiVersion> {
        match self.miners.get(&miner) {
            Some((_, Client::Whatsminer(c))) => c.api(),
            _ => None,
        }
    }

    /// One raw reading of `miner`.
    pub async fn reading(&self, miner: MinerId) -> Result<Reading, ActuatorError> {
        let (surface, client) = self.get(miner)?;
        client
            .telemetry()
            .await
            .map_err(|e| e.for_miner(miner, *surface))
    }
}

impl Actuator for FleetActuator {
    fn handles(&self, surface: ControlSurface) -> bool {
        matches!(
            surface,
            ControlSurface::LuxOs
                | ControlSurface::BraiinsOs
                | ControlSurface::Whatsminer
                | ControlSurface::Vnish
                | ControlSurface::AntminerStock
        )
    }

    fn execute(&self, command: &Command) -> impl Future<Output = Result<(), ActuatorError>> + Send {
        let (miner, action, surface) = (command.miner, command.action, command.surface);
        async move {
            let (registered, _) = self.get(miner)?;
            if *registered != surface {
                return Err(ActuatorError::Rejected {
                    miner,
                    detail: format!(
                        "command for {} but the miner is registered as {}",
                        surface.as_str(),
                        registered.as_str()
                    ),
                });
            }
            self.apply(miner, action).await
        }
    }
}

impl TelemetrySource for FleetActuator {
    async fn read(&self, miner: MinerId) -> Result<Telemetry, ActuatorError> {
        let r = self.reading(miner).await?;
        Ok(Telemetry {
            at: SystemClock.now(),
            power_w: r.power_w,
            hashrate_ths: r.hashrate_ths,
        })
    }
}
