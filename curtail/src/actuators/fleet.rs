//! [`FleetActuator`]: one [`Actuator`] and [`TelemetrySource`] for a whole
//! site, dispatching by each miner's [`ControlSurface`] to its client.
//!
//! | surface | commands | telemetry |
//! |---|---|---|
//! | LuxOS | [`LuxOsClient`] | `power` + `summary` |
//! | Braiins OS | [`BraiinsClient`] | `GetMinerStats` |
//! | Whatsminer | [`WhatsminerClient`] | `summary` |
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
use super::whatsminer::WhatsminerClient;
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
}

impl std::fmt::Debug for MinerEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MinerEndpoint")
            .field("surface", &self.surface)
            .field("addr", &self.addr)
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .field("web", &self.web)
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
        }
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
    Whatsminer(WhatsminerClient),
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
                Client::Whatsminer(WhatsminerClient::new(cfg, ep.password.clone()))
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
            (Client::Whatsminer(c), Action::Sleep) => c.power_off().await,
            (Client::Whatsminer(c), Action::Wake) => c.power_on().await,
            (Client::Whatsminer(c), Action::SetPowerTarget(w)) => c.adjust_power_limit(w).await,
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
