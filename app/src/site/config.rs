//! `[site]`: the schema of the section and its validation.

use curtail::actuators::WhatsminerApi;
use curtail::fleet::{ControlSurface, Fleet, MinerId, MinerSpec};
use curtail::ledger::Location;
use curtail::policy::{Economics, Freshness, PolicyConfig, SafeState, Staleness};
use gridproxy_curtail as curtail;
use gridproxy_grid::mqtt;
use gridproxy_grid::tls::TlsOptions;
use gridproxy_proxy::config::Invalid;
use gridproxy_proxy::endpoint::Endpoint;
use serde::Deserialize;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A secret given inline in the file (kept out of `Debug` output).
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// What a stale signal does to the fleet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnStale {
    /// Curtail every miner.
    CurtailAll,
    /// Drop the constraint the signal drove; keep mining.
    KeepRunning,
    /// Keep using the signal's last value.
    HoldLast,
}

impl OnStale {
    pub(crate) fn safe_state(self) -> SafeState {
        match self {
            OnStale::CurtailAll => SafeState::CurtailAll,
            OnStale::KeepRunning => SafeState::KeepRunning,
            OnStale::HoldLast => SafeState::HoldLast,
        }
    }
}

/// A miner's firmware (its control API).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FirmwareKind {
    /// LuxOS: TCP JSON API (port 4028).
    Luxos,
    /// Braiins OS: gRPC API (port 50051), user and password.
    #[serde(alias = "braiinsos")]
    Braiins,
    /// Whatsminer: API v3 (port 4433) or v2 (port 4028), chosen by `api`
    /// (default `auto`); the API password.
    Whatsminer,
    /// VNish REST API (port 80), web password.
    Vnish,
    /// Stock cgminer: telemetry only; curtailed by parking it at the proxy.
    Stock,
    /// Stock Antminer firmware with its web interface: sleep and wake by
    /// `miner-mode` (digest auth, `username` default root, `password`
    /// required), telemetry from the cgminer API (port 4028). Not confirmed
    /// from Bitmain: see the README.
    Antminer,
}

impl FirmwareKind {
    pub(crate) fn surface(self) -> ControlSurface {
        match self {
            FirmwareKind::Luxos => ControlSurface::LuxOs,
            FirmwareKind::Braiins => ControlSurface::BraiinsOs,
            FirmwareKind::Whatsminer => ControlSurface::Whatsminer,
            FirmwareKind::Vnish => ControlSurface::Vnish,
            FirmwareKind::Stock => ControlSurface::None,
            FirmwareKind::Antminer => ControlSurface::AntminerStock,
        }
    }

    fn default_port(self) -> u16 {
        match self {
            FirmwareKind::Braiins => 50051,
            FirmwareKind::Vnish => 80,
            _ => 4028,
        }
    }

    fn needs_password(self) -> bool {
        matches!(
            self,
            FirmwareKind::Braiins
                | FirmwareKind::Whatsminer
                | FirmwareKind::Vnish
                | FirmwareKind::Antminer
        )
    }

    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            FirmwareKind::Luxos => "luxos",
            FirmwareKind::Braiins => "braiins",
            FirmwareKind::Whatsminer => "whatsminer",
            FirmwareKind::Vnish => "vnish",
            FirmwareKind::Stock => "stock",
            FirmwareKind::Antminer => "antminer",
        }
    }
}

/// `api` of a `firmware = "whatsminer"` miner.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WhatsminerApiKey {
    /// API v2 only (default port 4028).
    V2,
    /// API v3 only (default port 4433).
    V3,
    /// Try v3, then v2; remember which answered. Without a port in
    /// `address`, v3 on 4433 and v2 on 4028; with one, both on it.
    #[default]
    Auto,
}

/// The accounts API v3 writes as (MicroBT's API v3 document, "Overview").
const WHATSMINER_V3_ACCOUNTS: [&str; 4] = ["super", "user1", "user2", "user3"];

/// One `[[site.miners]]` entry.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MinerConfig {
    /// Unique name (logs, dashboard; the ledger knows the miner by it).
    pub name: String,
    /// Firmware / control API.
    pub firmware: FirmwareKind,
    /// Firmware API address: `host:port`, `host`, `ip:port`, `ip` or
    /// `[ipv6]:port` (no port: the firmware's default). A host name is
    /// resolved when the firmware is contacted, never at load.
    pub address: String,
    /// SV1 worker name it authorizes with through this proxy (for parking).
    #[serde(default)]
    pub worker: Option<String>,
    /// `antminer`: the web interface, `host:port` or `host` (default: the
    /// API address's host, port 80).
    #[serde(default)]
    pub web: Option<String>,
    /// `whatsminer`: `"v2"`, `"v3"` or `"auto"` (default).
    #[serde(default)]
    pub api: Option<WhatsminerApiKey>,
    /// Model label, e.g. `S19j Pro`.
    #[serde(default)]
    pub model: Option<String>,
    /// Nominal hashrate, TH/s.
    pub ths: f64,
    /// Nominal power, W (or give `j_per_th`).
    #[serde(default)]
    pub watts: Option<f64>,
    /// Efficiency, J/TH (power = ths × j_per_th).
    #[serde(default)]
    pub j_per_th: Option<f64>,
    /// API user (Braiins OS, stock Antminer; default `root`). Whatsminer
    /// API v3: the write account, `super` (default) or `user1`..`user3`.
    #[serde(default)]
    pub username: Option<String>,
    /// API password.
    #[serde(default)]
    pub password: Option<Secret>,
    /// Or: the environment variable holding it.
    #[serde(default)]
    pub password_env: Option<String>,
    /// Or: a file holding it (relative to the config file).
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// Draw while asleep, W (default: min(20, nominal)).
    #[serde(default)]
    pub sleep_w: Option<f64>,
    /// Lowest power target the firmware accepts, W (default: 60 % of nominal).
    #[serde(default)]
    pub min_power_w: Option<f64>,
    /// Draw while parked at the proxy, W (default: nominal, i.e. no saving,
    /// as an ASIC with a backup pool keeps hashing; lower it where backup
    /// pools are blocked).
    #[serde(default)]
    pub parked_w: Option<f64>,
}

impl MinerConfig {
    /// Nominal power, W.
    pub fn nominal_w(&self) -> f64 {
        self.watts
            .or(self.j_per_th.map(|j| j * self.ths))
            .unwrap_or(0.0)
    }

    /// The firmware API's host and port (the firmware's default port when
    /// none is written). A name is not resolved here: the firmware client
    /// looks it up at every connect.
    pub(crate) fn endpoint(&self) -> Result<Endpoint, String> {
        let port = match (self.firmware, self.api.unwrap_or_default()) {
            (FirmwareKind::Whatsminer, WhatsminerApiKey::V2) => 4028,
            (FirmwareKind::Whatsminer, _) => 4433,
            (f, _) => f.default_port(),
        };
        Endpoint::parse_with_default_port(&self.address, port)
            .map_err(|e| format!("{e} (expected host, host:port, ip, ip:port or [ipv6]:port)"))
    }

    /// `whatsminer`: the API to drive it through; for auto, v2 is tried on
    /// the port written in `address`, else on 4028.
    pub(crate) fn whatsminer_api(&self) -> Result<WhatsminerApi, String> {
        Ok(match self.api.unwrap_or_default() {
            WhatsminerApiKey::V2 => WhatsminerApi::V2,
            WhatsminerApiKey::V3 => WhatsminerApi::V3,
            WhatsminerApiKey::Auto => {
                // Port 0 is refused when written, so 0 here means none.
                let written = Endpoint::parse_with_default_port(&self.address, 0)
                    .map_err(|e| e.to_string())?
                    .port;
                WhatsminerApi::Auto {
                    v2_port: if written == 0 { 4028 } else { written },
                }
            }
        })
    }

    /// `antminer`: the web interface's address (`web`, else the API host on
    /// port 80).
    pub(crate) fn web_endpoint(&self) -> Result<Endpoint, String> {
        match &self.web {
            Some(w) => Endpoint::parse_with_default_port(w, 80)
                .map_err(|e| format!("{e} (expected host, host:port, ip, ip:port or [ipv6]:port)")),
            None => self.endpoint().map(|mut e| {
                e.port = 80;
                e
            }),
        }
    }
}

/// `[site.signals.mqtt]`: dispatch targets from an MQTT broker.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttSource {
    /// Broker: `host:port` or `host` (port 1883), `mqtt://host[:port]`, or
    /// `mqtts://host[:port]` for TLS (port 8883).
    pub broker: String,
    /// TLS to a broker written without a scheme (as `mqtts://`).
    #[serde(default)]
    pub tls: bool,
    /// TLS: PEM file of the CA that signed the broker's certificate (a
    /// private CA); without it, the public roots built into gridproxy.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// TLS: PEM client certificate chain, for a broker that asks for one.
    #[serde(default)]
    pub client_cert: Option<PathBuf>,
    /// TLS: PEM private key of `client_cert`.
    #[serde(default)]
    pub client_key: Option<PathBuf>,
    /// Site id: topics `site/<id>/dispatch`, `site/<id>/status`, `site/<id>/ack`.
    pub site_id: String,
    /// MQTT client id (default `gridproxy-<site_id>`).
    #[serde(default)]
    pub client_id: Option<String>,
    /// Broker login.
    #[serde(default)]
    pub username: Option<String>,
    /// Broker password.
    #[serde(default)]
    pub password: Option<Secret>,
    /// Or: the environment variable holding it.
    #[serde(default)]
    pub password_env: Option<String>,
    /// Or: a file holding it.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// Override the dispatch topic (a filter is allowed).
    #[serde(default)]
    pub dispatch_topic: Option<String>,
    /// Override the status topic.
    #[serde(default)]
    pub status_topic: Option<String>,
    /// Override the ack topic.
    #[serde(default)]
    pub ack_topic: Option<String>,
    /// QoS 0..=2.
    #[serde(default = "d_qos")]
    pub qos: u8,
    /// No dispatch for this long puts the fleet in `on_silence`, seconds.
    #[serde(default = "d_240")]
    pub silence_timeout_secs: u64,
    /// What silence does.
    #[serde(default = "d_curtail_all")]
    pub on_silence: OnStale,
    /// MQTT keepalive, seconds.
    #[serde(default = "d_30")]
    pub keepalive_secs: u64,
    /// Status publish period, seconds.
    #[serde(default = "d_10")]
    pub status_secs: u64,
}

/// `[site.signals.openadr]`: an OpenADR 3 VEN.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpenAdrSource {
    /// VTN base URL.
    pub vtn_url: String,
    /// OAuth2 token endpoint (default `<vtn_url>/auth/token`).
    #[serde(default)]
    pub token_url: Option<String>,
    /// PEM file of the CA that signed the VTN's certificate (a private CA)
    /// for `https://` and `wss://`; without it, the built-in public roots.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// OAuth2 client id.
    pub client_id: String,
    /// OAuth2 client secret.
    #[serde(default)]
    pub client_secret: Option<Secret>,
    /// Or: the environment variable holding it.
    #[serde(default)]
    pub client_secret_env: Option<String>,
    /// Or: a file holding it.
    #[serde(default)]
    pub client_secret_file: Option<PathBuf>,
    /// This VEN's name.
    pub ven_name: String,
    /// Only events of these programs (empty: all).
    #[serde(default)]
    pub programs: Vec<String>,
    /// Event poll period without the websocket, seconds.
    #[serde(default = "d_5")]
    pub poll_secs: u64,
    /// Use the VTN's websocket notifier when offered.
    #[serde(default = "d_true")]
    pub websocket: bool,
    /// Report period per event, seconds.
    #[serde(default = "d_60")]
    pub report_secs: u64,
    /// Per-request timeout, seconds.
    #[serde(default = "d_10")]
    pub request_timeout_secs: u64,
    /// Fraction of draw shed per SIMPLE level 0..=3.
    #[serde(default)]
    pub simple_shed: Option<[f64; 4]>,
}

/// `[site.signals.price]`: a polled energy price.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PriceSource {
    /// URL of an ERCOT RTM settlement-point price report (CSV).
    #[serde(default)]
    pub ercot_csv_url: Option<String>,
    /// Settlement point for `ercot_csv_url`, e.g. `HB_HOUSTON`.
    #[serde(default)]
    pub settlement_point: Option<String>,
    /// Or: URL of a JSON document with the price.
    #[serde(default)]
    pub json_url: Option<String>,
    /// JSON pointer to the price, $/MWh.
    #[serde(default = "d_lmp")]
    pub json_price: String,
    /// JSON pointer to its timestamp (`""`: the time it was received).
    #[serde(default = "d_timestamp")]
    pub json_time: String,
    /// Poll period, seconds.
    #[serde(default = "d_60")]
    pub poll_secs: u64,
    /// Per-request timeout, seconds.
    #[serde(default = "d_10")]
    pub timeout_secs: u64,
    /// A price older than this is stale, seconds.
    #[serde(default = "d_900")]
    pub max_age_secs: u64,
    /// What a stale price does.
    #[serde(default = "d_keep_running")]
    pub on_stale: OnStale,
}

/// Modbus register table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModbusTable {
    /// Holding registers (function 3).
    Holding,
    /// Input registers (function 4).
    Input,
}

/// Modbus value encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModbusType {
    /// One register, unsigned.
    U16,
    /// One register, signed.
    I16,
    /// Two registers, unsigned.
    U32,
    /// Two registers, signed.
    I32,
    /// Two registers, IEEE 754.
    F32,
}

/// Word order of 32-bit Modbus values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModbusWordOrder {
    /// High word first.
    HighFirst,
    /// Low word first.
    LowFirst,
}

/// `[site.signals.site_load]`: a meter of the site's other (non-mining) load.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiteLoadSource {
    /// Prometheus base URL (instant query).
    #[serde(default)]
    pub prometheus_url: Option<String>,
    /// PromQL for `prometheus_url`.
    #[serde(default)]
    pub prometheus_query: Option<String>,
    /// Or: a Modbus TCP meter, `host:port`, `host`, `ip:port` or
    /// `[ipv6]:port` (no port: 502); a name is looked up at connect.
    #[serde(default)]
    pub modbus: Option<String>,
    /// Modbus unit id.
    #[serde(default = "d_unit")]
    pub modbus_unit: u8,
    /// First register (0-based wire address).
    #[serde(default)]
    pub modbus_register: u16,
    /// Register table.
    #[serde(default = "d_holding")]
    pub modbus_table: ModbusTable,
    /// Encoding.
    #[serde(default = "d_f32")]
    pub modbus_type: ModbusType,
    /// Word order of 32-bit values.
    #[serde(default = "d_high_first")]
    pub modbus_word_order: ModbusWordOrder,
    /// Or: an HTTP JSON meter URL.
    #[serde(default)]
    pub http_json_url: Option<String>,
    /// JSON pointer to the figure.
    #[serde(default)]
    pub http_json_pointer: Option<String>,
    /// Multiplies the figure to give kW (W: 0.001).
    #[serde(default = "d_one")]
    pub factor: f64,
    /// Read period, milliseconds.
    #[serde(default = "d_1000")]
    pub poll_ms: u64,
    /// Read timeout, milliseconds.
    #[serde(default = "d_800")]
    pub timeout_ms: u64,
    /// Readings above this are absurd, kW.
    #[serde(default = "d_max_kw")]
    pub max_kw: f64,
    /// A reading older than this is stale, seconds.
    #[serde(default = "d_10")]
    pub max_age_secs: u64,
    /// What a stale reading does.
    #[serde(default = "d_hold_last")]
    pub on_stale: OnStale,
}

/// `[site.signals]`.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignalsConfig {
    /// MQTT dispatch.
    #[serde(default)]
    pub mqtt: Option<MqttSource>,
    /// OpenADR 3 VEN.
    #[serde(default)]
    pub openadr: Option<OpenAdrSource>,
    /// Energy price feed.
    #[serde(default)]
    pub price: Option<PriceSource>,
    /// Site-load meter.
    #[serde(default)]
    pub site_load: Option<SiteLoadSource>,
}

/// The `[site]` section.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiteConfig {
    /// The curtailment ledger: a SQLite file, relative to the config file,
    /// or a PostgreSQL database (`postgres://user@host:port/db`, no
    /// password in it: see `ledger_password_file`).
    pub ledger: PathBuf,
    /// The PostgreSQL ledger's password, in a file (else the environment
    /// variable `GRIDPROXY_LEDGER_PASSWORD`, else none).
    #[serde(default)]
    pub ledger_password_file: Option<PathBuf>,
    /// Hashprice, $/PH/s/day: enables price mode.
    #[serde(default)]
    pub hashprice_usd_per_ph_day: Option<f64>,
    /// Pool fee, 0..1.
    #[serde(default = "d_pool_fee")]
    pub pool_fee: f64,
    /// Power usage effectiveness (>= 1).
    #[serde(default = "d_one")]
    pub pue: f64,
    /// Half-width of the price hysteresis band, $/MWh.
    #[serde(default = "d_hysteresis")]
    pub hysteresis_usd_per_mwh: f64,
    /// Balance mode: contracted site kW (needs a site-load meter).
    #[serde(default)]
    pub contract_kw: Option<f64>,
    /// Headroom under the contract, kW.
    #[serde(default)]
    pub balance_margin_kw: f64,
    /// Aim this fraction under a kW cap.
    #[serde(default = "d_target_margin")]
    pub target_margin: f64,
    /// A woken miner stays on at least this long before price curtails it, seconds.
    #[serde(default = "d_300")]
    pub min_on_secs: u64,
    /// A curtailed miner stays off at least this long, seconds.
    #[serde(default = "d_600")]
    pub min_off_secs: u64,
    /// Commands per second, at most.
    #[serde(default = "d_50")]
    pub max_commands_per_sec: u32,
    /// Miners restored per batch.
    #[serde(default = "d_50")]
    pub restore_batch: u32,
    /// Time between restore batches, seconds.
    #[serde(default = "d_30")]
    pub restore_interval_secs: u64,
    /// Time for a firmware to acknowledge a command, seconds.
    #[serde(default = "d_10")]
    pub ack_timeout_secs: u64,
    /// Slack over a miner's ramp before a command counts as unverified, seconds.
    #[serde(default = "d_30")]
    pub verify_grace_secs: u64,
    /// Retries before a miner is reported unresponsive.
    #[serde(default = "d_retries")]
    pub max_retries: u8,
    /// Wait between retries, seconds.
    #[serde(default = "d_30")]
    pub retry_backoff_secs: u64,
    /// Extra lead before a DR event's start, seconds.
    #[serde(default = "d_10")]
    pub dr_lead_margin_secs: u64,
    /// After a restart, miners found curtailed stay so this long or until a
    /// fresh signal, seconds.
    #[serde(default = "d_300")]
    pub resume_hold_secs: u64,
    /// How far ahead of this machine's clock a signal's timestamp may be,
    /// seconds; further is refused (a future-dated sample would pin its
    /// value and keep the staleness fail-safe from firing).
    #[serde(default = "d_120")]
    pub max_clock_skew_secs: u64,
    /// Telemetry round period over the fleet, seconds.
    #[serde(default = "d_10")]
    pub telemetry_secs: u64,
    /// Measured-kW interval written to the ledger, seconds.
    #[serde(default = "d_60")]
    pub ledger_interval_secs: u64,
    /// How long ledger writes may keep failing (disk full, size guard,
    /// locked file; retried meanwhile, commands wait) before the site goes
    /// to `on_ledger_fault` and commands go out unrecorded, seconds.
    #[serde(default = "d_60")]
    pub ledger_fault_secs: u64,
    /// The safe state while the ledger fails past `ledger_fault_secs`:
    /// `hold_last` keeps following signals (unrecorded, logged),
    /// `curtail_all` sleeps the fleet.
    #[serde(default = "d_hold_last")]
    pub on_ledger_fault: OnStale,
    /// Size guard: the ledger file may not grow past this many MiB (a
    /// write that would is a ledger fault, as a full disk is).
    #[serde(default)]
    pub ledger_max_mib: Option<u64>,
    /// Active/standby with the other instances sharing this (PostgreSQL)
    /// ledger: only the holder of the site lease runs the engine.
    #[serde(default)]
    pub lease: Option<LeaseConfig>,
    /// The other instances miners may connect to: the active engine pushes
    /// its parks and pins to each through its control API.
    #[serde(default)]
    pub peers: Vec<PeerConfig>,
    /// Push the whole set to every peer at least this often (and at once on
    /// a change), seconds: a peer that restarted or missed one catches up.
    #[serde(default = "d_5")]
    pub peer_sync_secs: u64,
    /// Bound on each firmware API operation, milliseconds.
    #[serde(default = "d_5000")]
    pub client_timeout_ms: u64,
    /// The miners.
    #[serde(default)]
    pub miners: Vec<MinerConfig>,
    /// Signal sources.
    #[serde(default)]
    pub signals: SignalsConfig,
}

impl SiteConfig {
    fn validate_peers(&self) -> Result<(), Invalid> {
        let mut names = std::collections::HashSet::new();
        for (i, p) in self.peers.iter().enumerate() {
            let bad = |k: &str, m: String| Invalid {
                key: format!("site.peers[{i}].{k}"),
                message: m,
            };
            if p.name.trim().is_empty() || !names.insert(p.name.as_str()) {
                return Err(bad("name", "give each peer its own name".into()));
            }
            let at = p.endpoint().map_err(|e| bad("address", e))?;
            if p.ca_file.is_none() && !is_loopback(&at.host) {
                return Err(bad(
                    "address",
                    format!(
                        "plain HTTP to {} would send the token in clear: serve that \
                         instance's API over HTTPS and give ca_file (plain HTTP is accepted only \
                         to a loopback address)",
                        at.host
                    ),
                ));
            }
            match secret_count(
                p.token.is_some(),
                p.token_env.is_some(),
                p.token_file.is_some(),
            ) {
                1 => {}
                _ => {
                    return Err(bad(
                        "token",
                        "give one of token, token_env, token_file (an operate token of that \
                         instance)"
                            .into(),
                    ))
                }
            }
        }
        if !self.peers.is_empty() && !(1..=3600).contains(&self.peer_sync_secs) {
            return Err(Invalid {
                key: "site.peer_sync_secs".into(),
                message: "must be 1..=3600".into(),
            });
        }
        Ok(())
    }
}

/// `[[site.peers]]`: another instance, reached through its control API.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerConfig {
    /// Its name (logs, `/metrics`, `/api/v1/fleet`).
    pub name: String,
    /// Its `[api] listen`, `host:port` (a name is looked up at each push).
    pub address: String,
    /// An `operate` token of that instance.
    #[serde(default)]
    pub token: Option<Secret>,
    /// Or: the environment variable holding it.
    #[serde(default)]
    pub token_env: Option<String>,
    /// Or: a file holding it.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// Reach it over HTTPS, trusting this CA (PEM); its certificate must
    /// name the address's IP. Without it, plain HTTP, accepted only to a
    /// loopback address (the token would travel in clear).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

impl PeerConfig {
    /// `address` split into host and port.
    pub(crate) fn endpoint(&self) -> Result<Endpoint, String> {
        Endpoint::parse_with_default_port(&self.address, 0)
            .map_err(|e| e.to_string())
            .and_then(|e| {
                if e.port == 0 {
                    Err("give host:port (the peer's [api] listen)".into())
                } else {
                    Ok(e)
                }
            })
    }
}

/// The serde defaults above: `name: type = value` gives `fn name() -> type`.
/// `[site.lease]`: several instances, one acting.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeaseConfig {
    /// The site all instances share (one lease per site).
    pub site_id: String,
    /// This instance's name (unique among them); default: host name and pid.
    #[serde(default)]
    pub instance: Option<String>,
    /// How long a lease lasts unrenewed, seconds: a standby takes over
    /// within this of the active instance dying. Renewed every third.
    #[serde(default = "d_10")]
    pub secs: u64,
}

impl LeaseConfig {
    /// This instance's name.
    pub fn instance_name(&self) -> String {
        self.instance.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_owned())
                .unwrap_or_else(|_| "gridproxy".into());
            format!("{host}-{}", std::process::id())
        })
    }
}

macro_rules! defaults {
    ($($name:ident: $t:ty = $v:expr;)*) => {
        $(fn $name() -> $t {
            $v
        })*
    };
}

defaults! {
    d_qos: u8 = 1;
    d_5: u64 = 5;
    d_10: u64 = 10;
    d_30: u64 = 30;
    d_50: u32 = 50;
    d_60: u64 = 60;
    d_120: u64 = 120;
    d_240: u64 = 240;
    d_300: u64 = 300;
    d_600: u64 = 600;
    d_900: u64 = 900;
    d_800: u64 = 800;
    d_1000: u64 = 1000;
    d_5000: u64 = 5000;
    d_true: bool = true;
    d_unit: u8 = 1;
    d_retries: u8 = 3;
    d_one: f64 = 1.0;
    d_pool_fee: f64 = 0.02;
    d_hysteresis: f64 = 2.0;
    d_target_margin: f64 = 0.005;
    d_max_kw: f64 = 1_000_000.0;
    d_lmp: String = "/lmp".into();
    d_timestamp: String = "/timestamp".into();
    d_curtail_all: OnStale = OnStale::CurtailAll;
    d_keep_running: OnStale = OnStale::KeepRunning;
    d_hold_last: OnStale = OnStale::HoldLast;
    d_holding: ModbusTable = ModbusTable::Holding;
    d_f32: ModbusType = ModbusType::F32;
    d_high_first: ModbusWordOrder = ModbusWordOrder::HighFirst;
}

/// The ledger id of a miner: a stable hash of its name (48 bits), so
/// reordering `[[site.miners]]` does not mix miners up across restarts.
pub fn miner_id(name: &str) -> MinerId {
    // FNV-1a 64.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    MinerId(h & 0xffff_ffff_ffff)
}

fn secret_count(inline: bool, env: bool, file: bool) -> usize {
    usize::from(inline) + usize::from(env) + usize::from(file)
}

/// Where a PostgreSQL ledger's password may come from besides a file.
pub const LEDGER_PASSWORD_ENV: &str = "GRIDPROXY_LEDGER_PASSWORD";

impl SiteConfig {
    /// Whether `ledger` names a PostgreSQL database.
    pub fn ledger_is_postgres(&self) -> bool {
        self.ledger
            .to_str()
            .and_then(|s| Location::parse(s).ok())
            .is_some_and(|l| l.is_postgres())
    }

    /// The ledger's location, with the PostgreSQL password read from
    /// `ledger_password_file` or `GRIDPROXY_LEDGER_PASSWORD`.
    pub fn ledger_location(&self) -> anyhow::Result<Location> {
        let s = self
            .ledger
            .to_str()
            .ok_or_else(|| anyhow::anyhow!("site.ledger: not UTF-8"))?;
        let loc = Location::parse(s).map_err(|e| anyhow::anyhow!("site.ledger: {e}"))?;
        if !loc.is_postgres() {
            return Ok(loc);
        }
        let pw = match &self.ledger_password_file {
            Some(f) => Some(
                std::fs::read_to_string(f)
                    .map_err(|e| anyhow::anyhow!("site.ledger_password_file {}: {e}", f.display()))?
                    .trim_end_matches(['\r', '\n'])
                    .to_owned(),
            ),
            None => std::env::var(LEDGER_PASSWORD_ENV).ok(),
        };
        Ok(loc.with_password(pw))
    }

    /// Resolve paths relative to `dir` (the config file's folder).
    pub fn resolve_paths(&mut self, dir: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() && !p.as_os_str().is_empty() {
                *p = dir.join(&*p);
            }
        };
        if !self.ledger_is_postgres() {
            fix(&mut self.ledger);
        }
        if let Some(p) = &mut self.ledger_password_file {
            fix(p);
        }
        for m in &mut self.miners {
            if let Some(p) = &mut m.password_file {
                fix(p);
            }
        }
        if let Some(m) = &mut self.signals.mqtt {
            for p in [
                &mut m.password_file,
                &mut m.ca_file,
                &mut m.client_cert,
                &mut m.client_key,
            ]
            .into_iter()
            .flatten()
            {
                fix(p);
            }
        }
        for peer in &mut self.peers {
            for p in [&mut peer.token_file, &mut peer.ca_file]
                .into_iter()
                .flatten()
            {
                fix(p);
            }
        }
        if let Some(o) = &mut self.signals.openadr {
            for p in [&mut o.client_secret_file, &mut o.ca_file]
                .into_iter()
                .flatten()
            {
                fix(p);
            }
        }
    }

    /// Check the section; the error names the key (the loader adds the line).
    pub fn validate(&self) -> Result<(), Invalid> {
        let err = |key: String, message: String| Invalid { key, message };
        let bad_site = |k: &str, m: &str| err(format!("site.{k}"), m.to_string());
        if self.ledger.as_os_str().is_empty() {
            return Err(bad_site(
                "ledger",
                "give the curtailment ledger's file (SQLite), e.g. \"curtail-ledger.sqlite\", \
                 or a PostgreSQL URL",
            ));
        }
        if let Some(s) = self.ledger.to_str() {
            if let Err(e) = Location::parse(s) {
                return Err(bad_site("ledger", &e.to_string()));
            }
        }
        if self.ledger_is_postgres() {
            if self.ledger_max_mib.is_some() {
                return Err(bad_site(
                    "ledger_max_mib",
                    "the size guard applies to a SQLite ledger only; a PostgreSQL server \
                     bounds its own disk",
                ));
            }
            if let Some(l) = &self.lease {
                if l.site_id.trim().is_empty() {
                    return Err(bad_site("lease.site_id", "give the site's name"));
                }
                if !(3..=3600).contains(&l.secs) {
                    return Err(bad_site("lease.secs", "must be 3..=3600"));
                }
            }
        } else if self.lease.is_some() {
            return Err(bad_site(
                "lease",
                "instances share a site through a PostgreSQL ledger (ledger = \"postgres://…\")",
            ));
        } else if self.ledger_password_file.is_some() {
            return Err(bad_site(
                "ledger_password_file",
                "only a PostgreSQL ledger (ledger = \"postgres://…\") takes a password",
            ));
        }
        self.validate_peers()?;
        let nonneg = |v: f64| v.is_finite() && v >= 0.0;
        if let Some(h) = self.hashprice_usd_per_ph_day {
            if !nonneg(h) {
                return Err(bad_site("hashprice_usd_per_ph_day", "must be >= 0"));
            }
        }
        if !(0.0..1.0).contains(&self.pool_fee) {
            return Err(bad_site("pool_fee", "must be in 0..1 (0.02 = 2 %)"));
        }
        if !(self.pue.is_finite() && self.pue >= 1.0) {
            return Err(bad_site("pue", "must be >= 1"));
        }
        if !nonneg(self.hysteresis_usd_per_mwh) {
            return Err(bad_site("hysteresis_usd_per_mwh", "must be >= 0"));
        }
        if let Some(c) = self.contract_kw {
            if !nonneg(c) {
                return Err(bad_site("contract_kw", "must be >= 0"));
            }
            if self.signals.site_load.is_none() {
                return Err(bad_site(
                    "contract_kw",
                    "balance mode needs a site-load meter: add [site.signals.site_load]",
                ));
            }
        }
        if !nonneg(self.balance_margin_kw) {
            return Err(bad_site("balance_margin_kw", "must be >= 0"));
        }
        if !(0.0..0.5).contains(&self.target_margin) {
            return Err(bad_site("target_margin", "must be in 0..0.5"));
        }
        for (k, v) in [
            ("max_commands_per_sec", u64::from(self.max_commands_per_sec)),
            ("restore_batch", u64::from(self.restore_batch)),
            ("restore_interval_secs", self.restore_interval_secs),
            ("ack_timeout_secs", self.ack_timeout_secs),
            ("telemetry_secs", self.telemetry_secs),
            ("ledger_interval_secs", self.ledger_interval_secs),
            ("ledger_fault_secs", self.ledger_fault_secs),
            ("ledger_max_mib", self.ledger_max_mib.unwrap_or(1)),
            ("client_timeout_ms", self.client_timeout_ms),
        ] {
            if v == 0 {
                return Err(bad_site(k, "must be > 0"));
            }
        }
        if !(1..=86_400).contains(&self.max_clock_skew_secs) {
            return Err(bad_site("max_clock_skew_secs", "must be 1 to 86400"));
        }
        if self.miners.is_empty() {
            return Err(bad_site(
                "miners",
                "at least one [[site.miners]] entry is needed",
            ));
        }
        let mut names = HashSet::new();
        let mut ids = HashMap::new();
        let mut workers = HashSet::new();
        for (i, m) in self.miners.iter().enumerate() {
            let bad = |k: &str, msg: String| err(format!("site.miners[{i}].{k}"), msg);
            if m.name.trim().is_empty() {
                return Err(bad("name", "must not be empty".into()));
            }
            if !names.insert(m.name.as_str()) {
                return Err(bad("name", format!("duplicate miner name {:?}", m.name)));
            }
            if let Some(other) = ids.insert(miner_id(&m.name), m.name.as_str()) {
                return Err(bad(
                    "name",
                    format!(
                        "{:?} and {other:?} hash to the same ledger id; rename one",
                        m.name
                    ),
                ));
            }
            if let Err(e) = m.endpoint() {
                return Err(bad("address", e));
            }
            match (&m.web, m.firmware) {
                (_, FirmwareKind::Antminer) => {
                    if let Err(e) = m.web_endpoint() {
                        return Err(bad("web", e));
                    }
                }
                (Some(_), f) => {
                    return Err(bad(
                        "web",
                        format!("only for firmware = \"antminer\" (this is {})", f.as_str()),
                    ))
                }
                (None, _) => {}
            }
            match (m.api, m.firmware) {
                (Some(_), f) if f != FirmwareKind::Whatsminer => {
                    return Err(bad(
                        "api",
                        format!(
                            "only for firmware = \"whatsminer\" (this is {})",
                            f.as_str()
                        ),
                    ))
                }
                (api, FirmwareKind::Whatsminer) if api != Some(WhatsminerApiKey::V2) => {
                    if let Some(u) = &m.username {
                        if !WHATSMINER_V3_ACCOUNTS.contains(&u.as_str()) {
                            return Err(bad(
                                "username",
                                format!(
                                    "Whatsminer API v3 writes as super, user1, user2 or user3, \
                                     not {u:?}"
                                ),
                            ));
                        }
                    }
                }
                _ => {}
            }
            if !(m.ths.is_finite() && m.ths > 0.0) {
                return Err(bad("ths", "must be > 0 (nominal TH/s)".into()));
            }
            match (m.watts, m.j_per_th) {
                (None, None) => {
                    return Err(bad(
                        "watts",
                        "give the nominal power: watts, or j_per_th (efficiency)".into(),
                    ))
                }
                (Some(_), Some(_)) => {
                    return Err(bad("j_per_th", "give watts or j_per_th, not both".into()))
                }
                (Some(w), None) if !(w.is_finite() && w > 0.0) => {
                    return Err(bad("watts", "must be > 0".into()))
                }
                (None, Some(j)) if !(j.is_finite() && j > 0.0) => {
                    return Err(bad("j_per_th", "must be > 0".into()))
                }
                _ => {}
            }
            let w = m.nominal_w();
            for (k, v) in [
                ("sleep_w", m.sleep_w),
                ("min_power_w", m.min_power_w),
                ("parked_w", m.parked_w),
            ] {
                if let Some(v) = v {
                    if !(nonneg(v) && v <= w) {
                        return Err(bad(k, format!("must be in 0..={w:.0} (nominal W)")));
                    }
                }
            }
            let n = secret_count(
                m.password.is_some(),
                m.password_env.is_some(),
                m.password_file.is_some(),
            );
            if n > 1 {
                return Err(bad(
                    "password",
                    "give one of password, password_env, password_file".into(),
                ));
            }
            if n == 0 && m.firmware.needs_password() {
                return Err(bad(
                    "password",
                    format!(
                        "{} firmware needs its API password: password, password_env or password_file",
                        m.firmware.as_str()
                    ),
                ));
            }
            match &m.worker {
                Some(wk) if wk.trim().is_empty() => {
                    return Err(bad("worker", "must not be empty".into()))
                }
                Some(wk) if !workers.insert(wk.as_str()) => {
                    return Err(bad("worker", format!("duplicate worker {wk:?}")));
                }
                Some(_) => {}
                None if m.firmware == FirmwareKind::Stock => {
                    return Err(bad(
                        "worker",
                        "stock firmware cannot be commanded: give the SV1 worker name it hashes as through this proxy, so it can be parked".into(),
                    ))
                }
                None => {}
            }
        }
        let s = &self.signals;
        // Errors in `[site.signals.<sec>]`, naming `site.signals.<sec>.<key>`.
        let err_ref = &err;
        let in_signal = |sec: &'static str| {
            move |k: &str, msg: String| err_ref(format!("site.signals.{sec}.{k}"), msg)
        };
        if let Some(q) = &s.mqtt {
            let bad = in_signal("mqtt");
            let (host, port, tls) = mqtt_broker(q).map_err(|e| bad("broker", e))?;
            if !tls {
                for (k, set) in [
                    ("ca_file", q.ca_file.is_some()),
                    ("client_cert", q.client_cert.is_some()),
                    ("client_key", q.client_key.is_some()),
                ] {
                    if set {
                        return Err(bad(
                            k,
                            "is for TLS: write the broker as mqtts://host:port (or set tls = true)"
                                .into(),
                        ));
                    }
                }
            }
            if q.client_cert.is_some() != q.client_key.is_some() {
                return Err(bad(
                    "client_cert",
                    "client_cert and client_key go together: give both or neither".into(),
                ));
            }
            let has_password =
                q.password.is_some() || q.password_env.is_some() || q.password_file.is_some();
            if has_password && !tls && !is_loopback(&host) {
                return Err(bad(
                    "broker",
                    format!(
                        "plain MQTT to {host} would send the password in clear: use \
                         mqtts://{host}:8883 (TLS) or tls = true (plain MQTT with a password is \
                         accepted only to a loopback address)"
                    ),
                ));
            }
            if q.site_id.trim().is_empty() || q.site_id.contains(['/', '+', '#']) {
                return Err(bad(
                    "site_id",
                    "must be a non-empty topic level (no '/', '+', '#')".into(),
                ));
            }
            if secret_count(
                q.password.is_some(),
                q.password_env.is_some(),
                q.password_file.is_some(),
            ) > 1
            {
                return Err(bad(
                    "password",
                    "give one of password, password_env, password_file".into(),
                ));
            }
            if q.silence_timeout_secs == 0 {
                return Err(bad("silence_timeout_secs", "must be > 0".into()));
            }
            if q.status_secs == 0 || q.keepalive_secs == 0 {
                return Err(bad(
                    if q.status_secs == 0 {
                        "status_secs"
                    } else {
                        "keepalive_secs"
                    },
                    "must be > 0".into(),
                ));
            }
            // Everything else (topics, qos, login) as the client checks it.
            let mut c = mqtt_config(q, host, port, tls, None);
            if has_password {
                c.password = Some(String::new());
            }
            if let Err(e) = c.validate() {
                let k = match e.to_string() {
                    m if m.contains("topic") => "dispatch_topic",
                    m if m.contains("qos") => "qos",
                    m if m.contains("password") => "username",
                    _ => "broker",
                };
                return Err(bad(k, e.to_string()));
            }
        }
        if let Some(o) = &s.openadr {
            let bad = in_signal("openadr");
            check_http_url(&o.vtn_url).map_err(|e| bad("vtn_url", e))?;
            check_secret_transport(&o.vtn_url).map_err(|e| bad("vtn_url", e))?;
            if let Some(u) = &o.token_url {
                check_http_url(u).map_err(|e| bad("token_url", e))?;
                check_secret_transport(u).map_err(|e| bad("token_url", e))?;
            }
            if o.client_id.is_empty() {
                return Err(bad("client_id", "must not be empty".into()));
            }
            if o.ven_name.is_empty() {
                return Err(bad("ven_name", "must not be empty".into()));
            }
            if secret_count(
                o.client_secret.is_some(),
                o.client_secret_env.is_some(),
                o.client_secret_file.is_some(),
            ) != 1
            {
                return Err(bad(
                    "client_secret",
                    "give exactly one of client_secret, client_secret_env, client_secret_file"
                        .into(),
                ));
            }
            if o.poll_secs == 0 || o.report_secs == 0 || o.request_timeout_secs == 0 {
                return Err(bad(
                    "poll_secs",
                    "poll_secs, report_secs and request_timeout_secs must be > 0".into(),
                ));
            }
            if let Some(sh) = o.simple_shed {
                if sh.iter().any(|f| !nonneg(*f)) {
                    return Err(bad("simple_shed", "fractions must be >= 0".into()));
                }
            }
        }
        if let Some(p) = &s.price {
            let bad = in_signal("price");
            match (&p.ercot_csv_url, &p.json_url) {
                (None, None) | (Some(_), Some(_)) => {
                    return Err(bad(
                        "ercot_csv_url",
                        "give exactly one of ercot_csv_url or json_url".into(),
                    ))
                }
                (Some(u), None) => {
                    check_http_url(u).map_err(|e| bad("ercot_csv_url", e))?;
                    if p.settlement_point.as_deref().unwrap_or("").is_empty() {
                        return Err(bad(
                            "settlement_point",
                            "ercot_csv_url needs settlement_point, e.g. \"HB_HOUSTON\"".into(),
                        ));
                    }
                }
                (None, Some(u)) => {
                    check_http_url(u).map_err(|e| bad("json_url", e))?;
                    if !p.json_price.starts_with('/') {
                        return Err(bad(
                            "json_price",
                            "must be a JSON pointer, e.g. \"/lmp\"".into(),
                        ));
                    }
                }
            }
            if p.poll_secs == 0 || p.timeout_secs == 0 || p.max_age_secs == 0 {
                return Err(bad(
                    "poll_secs",
                    "poll_secs, timeout_secs and max_age_secs must be > 0".into(),
                ));
            }
            if self.hashprice_usd_per_ph_day.is_none() {
                return Err(err(
                    "site.hashprice_usd_per_ph_day".into(),
                    "a price feed needs the hashprice ($/PH/s/day) to compare prices with".into(),
                ));
            }
        }
        if let Some(m) = &s.site_load {
            let bad = in_signal("site_load");
            let n = usize::from(m.prometheus_url.is_some())
                + usize::from(m.modbus.is_some())
                + usize::from(m.http_json_url.is_some());
            if n != 1 {
                return Err(bad(
                    "prometheus_url",
                    "give exactly one meter: prometheus_url, modbus or http_json_url".into(),
                ));
            }
            if let Some(u) = &m.prometheus_url {
                check_http_url(u).map_err(|e| bad("prometheus_url", e))?;
            }
            if let Some(u) = &m.http_json_url {
                check_http_url(u).map_err(|e| bad("http_json_url", e))?;
            }
            if let Some(a) = &m.modbus {
                modbus_endpoint(a).map_err(|e| bad("modbus", e))?;
            }
            if m.prometheus_url.is_some() && m.prometheus_query.is_none() {
                return Err(bad(
                    "prometheus_query",
                    "prometheus_url needs a query".into(),
                ));
            }
            if m.http_json_url.is_some() && m.http_json_pointer.is_none() {
                return Err(bad(
                    "http_json_pointer",
                    "http_json_url needs a JSON pointer to the figure".into(),
                ));
            }
            if !(m.factor.is_finite() && m.factor != 0.0) {
                return Err(bad("factor", "must be a non-zero number".into()));
            }
            if m.poll_ms == 0 || m.timeout_ms == 0 || m.max_age_secs == 0 {
                return Err(bad(
                    "poll_ms",
                    "poll_ms, timeout_ms and max_age_secs must be > 0".into(),
                ));
            }
            if !(m.max_kw.is_finite() && m.max_kw > 0.0) {
                return Err(bad("max_kw", "must be > 0".into()));
            }
        }
        // What the engine checks itself.
        if let Err(e) = self.policy().validate() {
            return Err(err("site.policy".into(), e.to_string()));
        }
        Ok(())
    }

    /// The engine's configuration.
    pub fn policy(&self) -> PolicyConfig {
        let s = Duration::from_secs;
        let sig = &self.signals;
        PolicyConfig {
            economics: self.hashprice_usd_per_ph_day.map(|h| Economics {
                hashprice_usd_per_ph_day: h,
                pool_fee: self.pool_fee,
                pue: self.pue,
                hysteresis_usd_per_mwh: self.hysteresis_usd_per_mwh,
            }),
            contract_kw: self.contract_kw,
            balance_margin_kw: self.balance_margin_kw,
            target_margin: self.target_margin,
            min_on: s(self.min_on_secs),
            min_off: s(self.min_off_secs),
            max_commands_per_sec: self.max_commands_per_sec,
            restore_batch: self.restore_batch,
            restore_interval: s(self.restore_interval_secs),
            staleness: Staleness {
                price: sig.price.as_ref().map(|p| Freshness {
                    max_age: s(p.max_age_secs),
                    on_stale: p.on_stale.safe_state(),
                }),
                site_load: sig.site_load.as_ref().map(|m| Freshness {
                    max_age: s(m.max_age_secs),
                    on_stale: m.on_stale.safe_state(),
                }),
                dispatch: sig.mqtt.as_ref().map(|q| Freshness {
                    max_age: s(q.silence_timeout_secs),
                    on_stale: q.on_silence.safe_state(),
                }),
                // A configured dispatcher that never speaks fails safe too.
                dispatch_from_start: sig.mqtt.is_some(),
            },
            ack_timeout: s(self.ack_timeout_secs),
            verify_grace: s(self.verify_grace_secs),
            max_retries: self.max_retries,
            retry_backoff: s(self.retry_backoff_secs),
            dr_lead_margin: s(self.dr_lead_margin_secs),
            resume_hold: s(self.resume_hold_secs),
            max_clock_skew: s(self.max_clock_skew_secs),
            ..PolicyConfig::default()
        }
    }

    /// The engine's fleet (inventory).
    pub fn fleet(&self) -> Result<Fleet, String> {
        let specs = self.miners.iter().map(|m| {
            let s = m.firmware.surface();
            let w = m.nominal_w();
            let mut spec = MinerSpec::new(
                miner_id(&m.name),
                m.model.clone().unwrap_or_else(|| "miner".into()),
                m.ths,
                w,
                s,
            );
            if let Some(v) = m.sleep_w {
                spec.ramp.sleep_w = v;
            }
            if let Some(v) = m.min_power_w {
                spec.ramp.min_power_w = v;
            }
            if let Some(v) = m.parked_w {
                spec.ramp.parked_w = v;
            }
            spec
        });
        Fleet::from_specs(specs).map_err(|e| e.to_string())
    }
}

/// A Modbus TCP meter's address (port 502 when none is written).
pub(crate) fn modbus_endpoint(a: &str) -> Result<Endpoint, String> {
    Endpoint::parse_with_default_port(a, 502).map_err(|e| e.to_string())
}

/// An `http://` or `https://` URL with a host: a name (looked up when the
/// source connects, never here), an IPv4 address or a bracketed IPv6 one.
fn check_http_url(u: &str) -> Result<(), String> {
    let must = "must be an http:// or https:// URL with a host";
    let uri: hyper::Uri = u
        .parse()
        .map_err(|e| format!("{must}; {u:?} does not parse: {e}"))?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) {
        return Err(format!("{must}, not {u:?}"));
    }
    match uri.host() {
        None | Some("") => Err(format!("{must}; {u:?} has no host")),
        Some(h) => Endpoint::parse_with_default_port(h, 80)
            .map(drop)
            .map_err(|e| format!("{must}; host {e}")),
    }
}

/// A URL the OAuth client secret is sent to: `https://`, or `http://` to
/// this machine only (a loopback address or `localhost`), so the secret
/// never crosses a network in clear.
fn check_secret_transport(u: &str) -> Result<(), String> {
    let uri: hyper::Uri = u.parse().map_err(|e| format!("{u:?}: {e}"))?;
    if uri.scheme_str() != Some("http") {
        return Ok(());
    }
    let host = uri.host().unwrap_or("").trim_matches(['[', ']']);
    if is_loopback(host) {
        Ok(())
    } else {
        Err(format!(
            "plain http:// to {host} would send the OAuth client secret in clear: use https:// (http:// is accepted only to a loopback address)"
        ))
    }
}

/// This machine: `localhost` or a loopback address (no brackets).
fn is_loopback(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// The MQTT broker's host, port and whether to use TLS: `mqtts://` (port
/// 8883 by default) or `tls = true`; `mqtt://` or no scheme is plain (1883).
pub(crate) fn mqtt_broker(q: &MqttSource) -> Result<(String, u16, bool), String> {
    let b = q.broker.trim();
    let (rest, tls) = if let Some(r) = b.strip_prefix("mqtts://") {
        (r, true)
    } else if let Some(r) = b.strip_prefix("mqtt://") {
        if q.tls {
            return Err("mqtt:// is plain MQTT but tls = true: write mqtts://".into());
        }
        (r, false)
    } else if b.contains("://") {
        return Err(format!(
            "{b:?}: the scheme must be mqtt:// or mqtts:// (or none: host:port)"
        ));
    } else {
        (b, q.tls)
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    let (host, port) = split_host_port(rest, if tls { 8883 } else { 1883 })?;
    Ok((host, port, tls))
}

/// `host:port` or `host` (then `default_port`); IPv6 as `[::1]:1883`. The
/// host comes back without brackets.
pub(crate) fn split_host_port(s: &str, default_port: u16) -> Result<(String, u16), String> {
    Endpoint::parse_with_default_port(s, default_port)
        .map(|e| (e.host, e.port))
        .map_err(|e| e.to_string())
}

pub(crate) fn mqtt_config(
    q: &MqttSource,
    host: String,
    port: u16,
    tls: bool,
    password: Option<String>,
) -> mqtt::MqttConfig {
    let d = mqtt::MqttConfig::for_site(&q.site_id);
    mqtt::MqttConfig {
        host,
        port,
        client_id: q.client_id.clone().unwrap_or(d.client_id),
        username: q.username.clone(),
        password,
        tls: tls.then(|| TlsOptions {
            ca_file: q.ca_file.clone(),
            client_cert: q.client_cert.clone(),
            client_key: q.client_key.clone(),
        }),
        dispatch_topic: q.dispatch_topic.clone().unwrap_or(d.dispatch_topic),
        status_topic: q.status_topic.clone().unwrap_or(d.status_topic),
        ack_topic: q.ack_topic.clone().unwrap_or(d.ack_topic),
        qos: q.qos,
        silence_timeout: Duration::from_secs(q.silence_timeout_secs),
        keepalive: Duration::from_secs(q.keepalive_secs),
        status_interval: Duration::from_secs(q.status_secs),
        ..d
    }
}

/// Read a secret given inline, by environment variable or by file.
pub(crate) fn resolve_secret(
    key: &str,
    inline: &Option<Secret>,
    env: &Option<String>,
    file: &Option<PathBuf>,
) -> anyhow::Result<Option<String>> {
    if let Some(s) = inline {
        return Ok(Some(s.0.clone()));
    }
    if let Some(var) = env {
        return std::env::var(var)
            .map(Some)
            .map_err(|_| anyhow::anyhow!("{key}_env: environment variable {var} is not set"));
    }
    if let Some(p) = file {
        let s = std::fs::read_to_string(p)
            .map_err(|e| anyhow::anyhow!("{key}_file: {}: {e}", p.display()))?;
        return Ok(Some(s.trim_end_matches(['\r', '\n']).to_string()));
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = "[[pools]]\nname='a'\naddress='127.0.0.1:1'\nprotocol='sv1'\nuser='u'\n\n";

    fn parse(extra: &str) -> Result<crate::config::Config, String> {
        let t = format!("{BASE}{extra}");
        crate::config::Config::parse(&t, "t.toml").map_err(|e| e.to_string())
    }

    const MINER: &str = "[[site.miners]]\nname = \"m1\"\nfirmware = \"luxos\"\naddress = \"127.0.0.1:4028\"\nths = 100.0\nwatts = 3000.0\n";

    #[test]
    fn a_minimal_site_parses_with_defaults() {
        let c = parse(&format!("[site]\nledger = \"l.sqlite\"\n\n{MINER}")).unwrap();
        let s = c.site.unwrap();
        assert_eq!(s.miners.len(), 1);
        let p = s.policy();
        assert!(p.economics.is_none());
        assert!(p.staleness.dispatch.is_none());
        assert_eq!(s.fleet().unwrap().nominal_kw(), 3.0);
    }

    #[test]
    fn a_postgres_ledger_and_its_lease() {
        let pg = "[site]\nledger = \"postgres://gridproxy@127.0.0.1:5432/site\"\n";
        let lease = "[site.lease]\nsite_id = \"s1\"\ninstance = \"a\"\n";
        let c = parse(&format!("{pg}{lease}\n{MINER}")).unwrap();
        let s = c.site.unwrap();
        assert!(s.ledger_is_postgres());
        assert_eq!(s.lease.as_ref().map(|l| l.secs), Some(10));
        assert_eq!(s.lease.unwrap().instance_name(), "a");
        // The URL is not a path: not joined to the config's folder.
        let mut s2 = parse(&format!("{pg}\n{MINER}")).unwrap().site.unwrap();
        s2.resolve_paths(std::path::Path::new("/etc/gridproxy"));
        assert!(s2.ledger.to_str().unwrap().starts_with("postgres://"));
        // A lease needs a shared (PostgreSQL) ledger; a size guard does not
        // apply to one; a password in the URL is refused.
        let e = parse(&format!("[site]\nledger = \"l.sqlite\"\n{lease}\n{MINER}")).unwrap_err();
        assert!(e.contains("lease") && e.contains("PostgreSQL"), "{e}");
        let e = parse(&format!("{pg}ledger_max_mib = 5\n\n{MINER}")).unwrap_err();
        assert!(e.contains("ledger_max_mib"), "{e}");
        let e = parse(&format!(
            "[site]\nledger = \"postgres://u:hunter2@db/site\"\n\n{MINER}"
        ))
        .unwrap_err();
        assert!(e.contains("password") && !e.contains("hunter2"), "{e}");
        let e = parse(&format!(
            "{pg}[site.lease]\nsite_id = \"s1\"\nsecs = 1\n\n{MINER}"
        ))
        .unwrap_err();
        assert!(e.contains("lease.secs"), "{e}");
    }

    #[test]
    fn peers_to_push_parks_to() {
        let site = "[site]\nledger = \"l.sqlite\"\n";
        let peer = |body: &str| format!("{site}\n[[site.peers]]\nname = \"b\"\n{body}\n{MINER}");
        let c = parse(&peer(
            "address = \"127.0.0.1:8081\"\ntoken = \"0123456789abcdef0123\"",
        ))
        .unwrap();
        let s = c.site.unwrap();
        assert_eq!(s.peers.len(), 1);
        assert_eq!(s.peer_sync_secs, 5);
        assert!(
            !format!("{s:?}").contains("0123456789abcdef0123"),
            "token in Debug"
        );
        let mut s = parse(&peer(
            "address = \"peer-b.site.example:8443\"\ntoken_file = \"b.token\"\nca_file = \"b-ca.pem\"",
        ))
        .unwrap()
        .site
        .unwrap();
        s.resolve_paths(std::path::Path::new("/etc/gridproxy"));
        assert_eq!(
            s.peers[0].ca_file.as_deref(),
            Some(std::path::Path::new("/etc/gridproxy/b-ca.pem"))
        );
        for (body, key) in [
            // The token would go in clear off loopback.
            ("address = \"10.0.0.12:8080\"\ntoken_env = \"T\"", "address"),
            ("address = \"127.0.0.1\"\ntoken_env = \"T\"", "address"),
            ("address = \"127.0.0.1:8081\"", "token"),
            (
                "address = \"127.0.0.1:8081\"\ntoken_env = \"T\"\ntoken_file = \"f\"",
                "token",
            ),
        ] {
            let e = parse(&peer(body)).unwrap_err();
            assert!(e.contains(&format!("site.peers[0].{key}")), "{body}: {e}");
        }
        let e = parse(&format!(
            "{site}peer_sync_secs = 0\n[[site.peers]]\nname = \"b\"\naddress = \"127.0.0.1:1\"\n\
             token_env = \"T\"\n[[site.peers]]\nname = \"c\"\naddress = \"127.0.0.1:2\"\ntoken_env = \"T\"\n\n{MINER}"
        ))
        .unwrap_err();
        assert!(e.contains("peer_sync_secs"), "{e}");
        let e = parse(&format!(
            "{site}[[site.peers]]\nname = \"b\"\naddress = \"127.0.0.1:1\"\ntoken_env = \"T\"\n\
             [[site.peers]]\nname = \"b\"\naddress = \"127.0.0.1:2\"\ntoken_env = \"T\"\n\n{MINER}"
        ))
        .unwrap_err();
        assert!(e.contains("site.peers[1].name"), "{e}");
    }

    #[test]
    fn errors_name_key_and_line() {
        let e = parse(&format!(
            "[site]\nledger = \"l.sqlite\"\nmin_onn_secs = 3\n\n{MINER}"
        ))
        .unwrap_err();
        assert!(e.contains("min_onn_secs") && e.contains("line 9"), "{e}");
        let e = parse(&format!(
            "[site]\nledger = \"l.sqlite\"\n\n{MINER}\n[[site.miners]]\nname = \"m2\"\nfirmware = \"braiins\"\naddress = \"127.0.0.1\"\nths = 100.0\nwatts = 3000.0\n"
        ))
        .unwrap_err();
        assert!(
            e.contains("site.miners[1].password") && e.contains("line 17"),
            "{e}"
        );
        let e = parse(&format!(
            "[site]\nledger = \"l.sqlite\"\n\n{}",
            MINER.replace("127.0.0.1:4028", "miner local:4028")
        ))
        .unwrap_err();
        assert!(
            e.contains("site.miners[0].address")
                && e.contains("line 13")
                && e.contains("not a host name"),
            "{e}"
        );
        let e = parse(&format!(
            "[site]\nledger = \"l.sqlite\"\n\n{}",
            MINER.replace("127.0.0.1:4028", "miner.local:x")
        ))
        .unwrap_err();
        assert!(
            e.contains("site.miners[0].address") && e.contains("is not a number"),
            "{e}"
        );
        let e = parse(&format!(
            "[site]\nledger = \"l.sqlite\"\n\n{MINER}\n[site.signals.mqtt]\nbroker = \"127.0.0.1:1883\"\nsite_id = \"a/b\"\n"
        ))
        .unwrap_err();
        assert!(
            e.contains("site.signals.mqtt.site_id") && e.contains("line 19"),
            "{e}"
        );
        let e = parse(&format!(
            "[site]\nledger = \"l.sqlite\"\n\n{MINER}\n[site.signals]\nprice = {{ json_url = \"http://127.0.0.1:1/p\" }}\n"
        ))
        .unwrap_err();
        assert!(e.contains("site.hashprice_usd_per_ph_day"), "{e}");
        let e = parse("[site]\nledger = \"l.sqlite\"\n").unwrap_err();
        assert!(e.contains("site.miners") && e.contains("line 7"), "{e}");
    }

    /// `api` for Whatsminer: default auto (v3 on 4433, v2 on 4028), the
    /// default port follows the API, a written port is used for both, the
    /// key is refused on other firmware and a bad value or v3 account is a
    /// clear error.
    #[test]
    fn whatsminer_api_key() {
        let wm = |extra: &str, addr: &str| {
            format!(
                "[site]\nledger = \"l.sqlite\"\n\n[[site.miners]]\nname = \"w1\"\nfirmware = \"whatsminer\"\naddress = \"{addr}\"\nths = 100.0\nwatts = 3000.0\npassword = \"pw\"\n{extra}"
            )
        };
        let miner = |text: String| parse(&text).unwrap().site.unwrap().miners.remove(0);
        let m = miner(wm("", "miner-9.local"));
        assert_eq!(m.api, None);
        let ep = m.endpoint().unwrap();
        assert_eq!((ep.host.as_str(), ep.port), ("miner-9.local", 4433));
        assert_eq!(
            m.whatsminer_api().unwrap(),
            WhatsminerApi::Auto { v2_port: 4028 }
        );
        let m = miner(wm("api = \"auto\"\n", "10.0.0.9:14433"));
        assert_eq!(m.endpoint().unwrap().port, 14433);
        assert_eq!(
            m.whatsminer_api().unwrap(),
            WhatsminerApi::Auto { v2_port: 14433 }
        );
        let m = miner(wm("api = \"v2\"\n", "10.0.0.9"));
        assert_eq!(m.endpoint().unwrap().port, 4028);
        assert_eq!(m.whatsminer_api().unwrap(), WhatsminerApi::V2);
        let m = miner(wm("api = \"v3\"\nusername = \"user2\"\n", "[::1]"));
        assert_eq!(m.endpoint().unwrap().port, 4433);
        assert_eq!(m.whatsminer_api().unwrap(), WhatsminerApi::V3);

        let e = parse(&wm("api = \"v4\"\n", "10.0.0.9")).unwrap_err();
        assert!(e.contains("api") && e.contains("v3"), "{e}");
        let e = parse(&wm("username = \"admin\"\n", "10.0.0.9")).unwrap_err();
        assert!(
            e.contains("site.miners[0].username") && e.contains("user1"),
            "{e}"
        );
        // v2 has no accounts: any user name is ignored there.
        parse(&wm("api = \"v2\"\nusername = \"admin\"\n", "10.0.0.9")).unwrap();
        let e = parse(&format!(
            "[site]\nledger = \"l.sqlite\"\n\n{MINER}api = \"v3\"\n"
        ))
        .unwrap_err();
        assert!(
            e.contains("site.miners[0].api") && e.contains("whatsminer") && e.contains("luxos"),
            "{e}"
        );
    }

    /// A stock Antminer with its web interface: a password is required, the
    /// web address defaults to the API host on port 80, and `web` is refused
    /// on other firmware.
    #[test]
    fn antminer_web_interface() {
        let am = "[[site.miners]]\nname = \"s1\"\nfirmware = \"antminer\"\naddress = \"miner-7.local\"\nths = 100.0\nwatts = 3000.0\n";
        let e = parse(&format!("[site]\nledger = \"l.sqlite\"\n\n{am}")).unwrap_err();
        assert!(e.contains("site.miners[0].password"), "{e}");
        let c = parse(&format!(
            "[site]\nledger = \"l.sqlite\"\n\n{am}password = \"pw\"\n"
        ))
        .unwrap();
        let m = &c.site.unwrap().miners[0];
        assert_eq!(m.firmware.surface(), ControlSurface::AntminerStock);
        let (api, web) = (m.endpoint().unwrap(), m.web_endpoint().unwrap());
        assert_eq!((api.host.as_str(), api.port), ("miner-7.local", 4028));
        assert_eq!((web.host.as_str(), web.port), ("miner-7.local", 80));
        let c = parse(&format!(
            "[site]\nledger = \"l.sqlite\"\n\n{am}password = \"pw\"\nweb = \"10.0.0.7:8080\"\n"
        ))
        .unwrap();
        let web = c.site.unwrap().miners[0].web_endpoint().unwrap();
        assert_eq!((web.host.as_str(), web.port), ("10.0.0.7", 8080));
        let e = parse(&format!(
            "[site]\nledger = \"l.sqlite\"\n\n{MINER}web = \"10.0.0.7\"\n"
        ))
        .unwrap_err();
        assert!(
            e.contains("site.miners[0].web") && e.contains("antminer"),
            "{e}"
        );
    }

    #[test]
    fn ids_are_stable_and_fit_sqlite() {
        assert_eq!(miner_id("r1-01"), miner_id("r1-01"));
        assert_ne!(miner_id("r1-01"), miner_id("r1-02"));
        assert!(miner_id("x").0 < (1 << 48));
    }

    /// Firmware addresses as people write them; a name is kept as written
    /// (resolved by the firmware client at connect, not here).
    #[test]
    fn firmware_addresses_take_host_names() {
        for (written, firmware, host, port) in [
            (
                "miner-01.rack2.example:4029",
                "luxos",
                "miner-01.rack2.example",
                4029,
            ),
            (
                "miner-01.rack2.example",
                "luxos",
                "miner-01.rack2.example",
                4028,
            ),
            ("localhost", "braiins", "localhost", 50051),
            ("10.0.1.12", "vnish", "10.0.1.12", 80),
            ("[::1]:4028", "whatsminer", "::1", 4028),
            ("[fd00::12]", "luxos", "fd00::12", 4028),
            ("fd00::12", "luxos", "fd00::12", 4028),
        ] {
            let m = MINER
                .replace("127.0.0.1:4028", written)
                .replace("\"luxos\"", &format!("\"{firmware}\""));
            let c = parse(&format!(
                "[site]\nledger = \"l.sqlite\"\n\n{m}password = \"p\"\n"
            ))
            .unwrap_or_else(|e| panic!("{written}: {e}"));
            let ep = c.site.unwrap().miners[0].endpoint().unwrap();
            assert_eq!((ep.host.as_str(), ep.port), (host, port), "{written}");
        }
    }

    /// Signal sources take URLs with host names (and MQTT a host name).
    #[test]
    fn signal_sources_take_host_names() {
        let c = parse(&format!(
            "[site]\nledger = \"l.sqlite\"\nhashprice_usd_per_ph_day = 50.0\ncontract_kw = 100.0\n\n{MINER}\n\
             [site.signals.mqtt]\nbroker = \"broker.site.example:8883\"\nsite_id = \"s1\"\n\n\
             [site.signals.openadr]\nvtn_url = \"https://vtn.utility.example:8443/openadr3\"\nclient_id = \"c\"\nclient_secret = \"s\"\nven_name = \"v\"\n\n\
             [site.signals.price]\njson_url = \"http://prices.example/lmp.json\"\n\n\
             [site.signals.site_load]\nprometheus_url = \"http://prometheus.site.example:9090\"\nprometheus_query = \"site_kw\"\n"
        ))
        .unwrap();
        let sig = c.site.unwrap().signals;
        assert_eq!(
            split_host_port(&sig.mqtt.unwrap().broker, 1883).unwrap(),
            ("broker.site.example".into(), 8883)
        );
        // A Modbus meter by name; no port: 502.
        let meter = |m: &str| {
            parse(&format!(
                "[site]\nledger = \"l.sqlite\"\ncontract_kw = 100.0\n\n{MINER}\n\
                 [site.signals.site_load]\nmodbus = \"{m}\"\n"
            ))
        };
        let c = meter("meter.site.example").unwrap();
        let a = c.site.unwrap().signals.site_load.unwrap().modbus.unwrap();
        assert_eq!(
            modbus_endpoint(&a).unwrap().to_string(),
            "meter.site.example:502"
        );
        assert_eq!(
            modbus_endpoint("[::1]:5020").unwrap().to_string(),
            "[::1]:5020"
        );
        let e = meter("meter:x").unwrap_err();
        assert!(e.contains("site.signals.site_load.modbus"), "{e}");
        for (key, url) in [
            ("vtn_url", "vtn.example"),
            ("vtn_url", "ftp://vtn.example"),
            ("vtn_url", "http://"),
            ("vtn_url", "http://bad host/"),
            ("vtn_url", "http://vtn.utility.example/openadr3"),
            ("vtn_url", "http://192.0.2.10:8080/"),
        ] {
            let e = parse(&format!(
                "[site]\nledger = \"l.sqlite\"\n\n{MINER}\n\
                 [site.signals.openadr]\n{key} = \"{url}\"\nclient_id = \"c\"\nclient_secret = \"s\"\nven_name = \"v\"\n"
            ))
            .unwrap_err();
            assert!(
                e.contains(&format!("site.signals.openadr.{key}")),
                "{url}: {e}"
            );
        }
    }

    #[test]
    fn the_oauth_secret_goes_in_clear_only_to_this_machine() {
        assert!(check_secret_transport("https://vtn.utility.example/openadr3").is_ok());
        for ok in [
            "http://127.0.0.1:8080/",
            "http://localhost:8080/",
            "http://[::1]:8080/",
            "http://127.0.0.2/",
        ] {
            assert!(check_secret_transport(ok).is_ok(), "{ok}");
        }
        for bad in [
            "http://vtn.utility.example/",
            "http://192.0.2.10:8080/",
            "http://[2001:db8::1]/",
        ] {
            let e = check_secret_transport(bad).unwrap_err();
            assert!(
                e.contains("in clear") && e.contains("https://"),
                "{bad}: {e}"
            );
        }
        let e = parse(&format!(
            "[site]\nledger = \"l.sqlite\"\n\n{MINER}\n\
             [site.signals.openadr]\nvtn_url = \"https://vtn.utility.example/\"\n\
             token_url = \"http://auth.utility.example/token\"\nclient_id = \"c\"\nclient_secret = \"s\"\nven_name = \"v\"\n"
        ))
        .unwrap_err();
        assert!(e.contains("site.signals.openadr.token_url"), "{e}");
    }

    /// `mqtts://` or `tls = true` for TLS; a password goes over plain MQTT
    /// only to this machine; TLS files only with TLS.
    #[test]
    fn mqtt_over_tls_and_the_password_in_clear() {
        let mqtt = |keys: &str| {
            parse(&format!(
                "[site]\nledger = \"l.sqlite\"\n\n{MINER}\n[site.signals.mqtt]\nsite_id = \"s1\"\n{keys}"
            ))
        };
        let broker = |keys: &str| {
            let c = mqtt(keys).unwrap();
            let q = c.site.unwrap().signals.mqtt.unwrap();
            let (host, port, tls) = mqtt_broker(&q).unwrap();
            let cfg = mqtt_config(&q, host.clone(), port, tls, None);
            (host, port, tls, cfg.tls.and_then(|t| t.ca_file))
        };
        assert_eq!(
            broker("broker = \"mqtts://broker.site.example\"\nca_file = \"ca.pem\"\n"),
            (
                "broker.site.example".into(),
                8883,
                true,
                Some(PathBuf::from("ca.pem"))
            )
        );
        assert_eq!(
            broker("broker = \"10.0.0.2:9883\"\ntls = true\n"),
            ("10.0.0.2".into(), 9883, true, None)
        );
        assert_eq!(
            broker("broker = \"mqtt://10.0.0.2\"\n"),
            ("10.0.0.2".into(), 1883, false, None)
        );
        // A password over TLS anywhere; over plain MQTT only to loopback.
        let login = "username = \"u\"\npassword_env = \"P\"\n";
        assert!(mqtt(&format!("broker = \"mqtts://10.0.0.2\"\n{login}")).is_ok());
        assert!(mqtt(&format!("broker = \"127.0.0.1:1883\"\n{login}")).is_ok());
        assert!(mqtt(&format!("broker = \"localhost\"\n{login}")).is_ok());
        assert!(mqtt("broker = \"10.0.0.2:1883\"\nusername = \"u\"\n").is_ok());
        for plain in ["10.0.0.2:1883", "mqtt://broker.site.example"] {
            let e = mqtt(&format!("broker = \"{plain}\"\n{login}")).unwrap_err();
            assert!(
                e.contains("site.signals.mqtt.broker") && e.contains("in clear"),
                "{plain}: {e}"
            );
        }
        for (keys, key) in [
            ("broker = \"10.0.0.2\"\nca_file = \"ca.pem\"\n", "ca_file"),
            (
                "broker = \"mqtts://10.0.0.2\"\nclient_cert = \"c.pem\"\n",
                "client_cert",
            ),
            ("broker = \"mqtt://10.0.0.2\"\ntls = true\n", "broker"),
            ("broker = \"ssl://10.0.0.2\"\n", "broker"),
        ] {
            let e = mqtt(keys).unwrap_err();
            assert!(
                e.contains(&format!("site.signals.mqtt.{key}")),
                "{keys}: {e}"
            );
        }
    }

    #[test]
    fn host_port_forms() {
        assert_eq!(
            split_host_port("10.0.0.1", 1883).unwrap(),
            ("10.0.0.1".into(), 1883)
        );
        assert_eq!(
            split_host_port("broker:8883", 1883).unwrap(),
            ("broker".into(), 8883)
        );
        assert!(split_host_port("broker:x", 1883).is_err());
        assert_eq!(
            split_host_port("[::1]:1884", 1883).unwrap(),
            ("::1".into(), 1884)
        );
    }
}
