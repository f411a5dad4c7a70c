//! The engine's configuration: pools, listeners, limits, difficulty, routing,
//! extranonce layout.
//!
//! Every key has a default except the pool list; unknown keys are refused so a
//! typo does not silently fall back to a default. The application embeds these
//! tables in its own file (with `[api]` and `[site]`) and names file and line
//! in errors; here an error names the key.

use crate::accounts::{slot_name, AccountConfig, Accounts};
use crate::endpoint::{PoolAddress, Scheme};
use gridproxy_protocol::sv2::AuthorityPublicKey;
use serde::Deserialize;
use std::net::SocketAddr;
use std::time::Duration;

/// What the proxy engine needs: the tables the engine reads.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyConfig {
    /// Upstream pools, by priority (lowest `priority` first).
    pub pools: Vec<PoolConfig>,
    /// Downstream listeners.
    #[serde(default)]
    pub listen: ListenConfig,
    /// Per-connection and global limits.
    #[serde(default)]
    pub limits: Limits,
    /// Miner difficulty.
    #[serde(default)]
    pub difficulty: DifficultyConfig,
    /// Failover and split.
    #[serde(default)]
    pub routing: RoutingConfig,
    /// Extranonce layout.
    #[serde(default)]
    pub extranonce: ExtranonceConfig,
    /// Accounts: which pool user each group of miners' shares go out under
    /// (none: every share under the pools' own `user`).
    #[serde(default)]
    pub accounts: Vec<AccountConfig>,
}

/// Upstream protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PoolProtocol {
    /// Stratum V2 over Noise.
    Sv2,
    /// Stratum V1 (JSON lines).
    Sv1,
}

impl PoolProtocol {
    /// `sv1` or `sv2`, as written in the config.
    pub fn as_str(self) -> &'static str {
        match self {
            PoolProtocol::Sv1 => "sv1",
            PoolProtocol::Sv2 => "sv2",
        }
    }
}

impl From<Scheme> for PoolProtocol {
    fn from(s: Scheme) -> PoolProtocol {
        match s {
            Scheme::Sv1 => PoolProtocol::Sv1,
            Scheme::Sv2 => PoolProtocol::Sv2,
        }
    }
}

/// One upstream pool. Its `Debug` leaves the password out.
#[derive(Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    /// A short name for logs and stats.
    pub name: String,
    /// `host:port` (a name, IPv4, or `[IPv6]`), `stratum+tcp://host:port`
    /// (SV1) or `stratum2+tcp://host:port/<authority key>` (SV2, key
    /// pinned). Parsed here; a name is resolved at every connect.
    pub address: PoolAddress,
    /// `sv2` or `sv1`; may be left out when the address is a URL (its
    /// scheme says). Read it with [`PoolConfig::protocol`].
    #[serde(default)]
    pub protocol: Option<PoolProtocol>,
    /// SV2: the pool's authority public key (base58), pinned; may be left
    /// out when the address URL carries it. Read it with
    /// [`PoolConfig::authority_key`].
    #[serde(default)]
    pub authority_pubkey: Option<String>,
    /// Account / user identity sent upstream.
    pub user: String,
    /// SV1 password.
    #[serde(default = "default_password")]
    pub password: String,
    /// Lower is preferred; equal priorities share by `weight`.
    #[serde(default)]
    pub priority: u32,
    /// Share of hashrate among pools of the same priority (any positive scale).
    #[serde(default = "one")]
    pub weight: f64,
    /// SV2: nominal hashrate announced when opening the channel (H/s).
    #[serde(default = "default_nominal")]
    pub nominal_hashrate: f32,
    /// SV1: longest line accepted from the pool, bytes. A `mining.notify`
    /// carries the coinbase in hex, and pools that pay many outputs in it
    /// send lines far over the miners' 16 KiB.
    #[serde(default = "default_pool_max_line")]
    pub max_line: usize,
    /// SV2: ask the pool for extension 0x0002 (worker-specific hashrate
    /// tracking) and, when it grants it, send each share's worker name with
    /// it. `false` negotiates no extension (a pool that requires 0x0002 then
    /// refuses the connection). Changing it reconnects the pool.
    #[serde(default = "yes")]
    pub worker_identity: bool,
    /// The account this upstream slot serves (`None`: the default account);
    /// set by [`ProxyConfig::slots`], never read from the file.
    #[serde(skip)]
    pub account: Option<String>,
    /// The `[[pools]]` entry this slot was made from (empty: `name`); read
    /// it with [`PoolConfig::pool_name`].
    #[serde(skip)]
    pub base: String,
}

/// Default [`PoolConfig::max_line`]: 1 MiB, a coinbase of ~15,000 outputs.
pub const DEFAULT_POOL_MAX_LINE: usize = 1 << 20;
/// Largest [`PoolConfig::max_line`] accepted (a block is at most 4 MB).
pub const MAX_POOL_MAX_LINE: usize = 16 << 20;

fn default_pool_max_line() -> usize {
    DEFAULT_POOL_MAX_LINE
}

impl PoolConfig {
    /// The `[[pools]]` name (a slot of an account is named `pool@account`).
    pub fn pool_name(&self) -> &str {
        if self.base.is_empty() {
            &self.name
        } else {
            &self.base
        }
    }

    /// The protocol: `protocol` if given, else the address URL's scheme.
    /// [`ProxyConfig::validate`] refuses a pool with neither (or with the
    /// two disagreeing); unvalidated, such a pool is taken as SV2, which
    /// then refuses to connect without a pinned key.
    pub fn protocol(&self) -> PoolProtocol {
        self.protocol
            .or(self.address.scheme.map(PoolProtocol::from))
            .unwrap_or(PoolProtocol::Sv2)
    }

    /// The pinned SV2 authority key: `authority_pubkey` if given, else the
    /// one in the `stratum2+tcp://` URL (validation makes them agree).
    pub fn authority_key(&self) -> Option<String> {
        self.authority_pubkey
            .clone()
            .or(self.address.authority_pubkey.map(|k| k.to_string()))
    }
}

fn default_password() -> String {
    "x".into()
}
fn one() -> f64 {
    1.0
}
fn yes() -> bool {
    true
}
fn default_nominal() -> f32 {
    1.0e6
}

/// Listener addresses. Loopback unless configured otherwise. Its `Debug`
/// leaves the authority secret out.
#[derive(Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenConfig {
    /// SV1 (JSON lines) listener.
    #[serde(default = "default_sv1")]
    pub sv1: Option<SocketAddr>,
    /// SV2 (Noise) listener.
    #[serde(default)]
    pub sv2: Option<SocketAddr>,
    /// SV2 listener authority public key (base58).
    #[serde(default)]
    pub sv2_authority_pubkey: Option<String>,
    /// SV2 listener authority secret key (base58).
    #[serde(default)]
    pub sv2_authority_secret: Option<String>,
    /// A file holding the secret key instead (kept out of the config file,
    /// e.g. readable by the service user only).
    #[serde(default)]
    pub sv2_authority_secret_file: Option<std::path::PathBuf>,
}

impl ListenConfig {
    /// The SV2 authority secret, from `sv2_authority_secret` or read from
    /// `sv2_authority_secret_file`; None when neither is given.
    pub fn authority_secret(&self) -> Result<Option<String>, Invalid> {
        match (&self.sv2_authority_secret, &self.sv2_authority_secret_file) {
            (Some(_), Some(_)) => Err(bad(
                "listen.sv2_authority_secret_file".into(),
                "give sv2_authority_secret or sv2_authority_secret_file, not both".into(),
            )),
            (Some(s), None) => Ok(Some(s.clone())),
            (None, Some(path)) => std::fs::read_to_string(path)
                .map(|s| Some(s.trim().to_string()))
                .map_err(|e| {
                    bad(
                        "listen.sv2_authority_secret_file".into(),
                        format!("{}: {e}", path.display()),
                    )
                }),
            (None, None) => Ok(None),
        }
    }
}

fn bad(key: String, message: String) -> Invalid {
    Invalid { key, message }
}

/// What a `Debug` print shows of a secret.
fn redacted(s: &Option<String>) -> Option<&'static str> {
    s.as_ref().map(|_| "<redacted>")
}

impl std::fmt::Debug for PoolConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PoolConfig")
            .field("name", &self.name)
            .field("address", &format_args!("{}", self.address))
            .field("protocol", &self.protocol)
            .field("authority_pubkey", &self.authority_pubkey)
            .field("user", &self.user)
            .field("password", &"<redacted>")
            .field("priority", &self.priority)
            .field("weight", &self.weight)
            .field("nominal_hashrate", &self.nominal_hashrate)
            .field("max_line", &self.max_line)
            .field("worker_identity", &self.worker_identity)
            .field("account", &self.account)
            .finish()
    }
}

impl std::fmt::Debug for ListenConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ListenConfig")
            .field("sv1", &self.sv1)
            .field("sv2", &self.sv2)
            .field("sv2_authority_pubkey", &self.sv2_authority_pubkey)
            .field(
                "sv2_authority_secret",
                &redacted(&self.sv2_authority_secret),
            )
            .field("sv2_authority_secret_file", &self.sv2_authority_secret_file)
            .finish()
    }
}

fn default_sv1() -> Option<SocketAddr> {
    Some("127.0.0.1:3333".parse().expect("literal"))
}

impl Default for ListenConfig {
    fn default() -> Self {
        Self {
            sv1: default_sv1(),
            sv2: None,
            sv2_authority_pubkey: None,
            sv2_authority_secret: None,
            sv2_authority_secret_file: None,
        }
    }
}

/// Limits that keep one bad peer from hurting the rest.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Longest SV1 line (bytes).
    pub max_line: usize,
    /// Largest SV2 frame payload (bytes).
    pub max_frame: usize,
    /// Concurrent downstream connections.
    pub max_connections: usize,
    /// Concurrent downstream connections from one IP address (one host
    /// cannot take every slot). Raise it for a NAT or farm proxy in front.
    pub max_connections_per_ip: usize,
    /// Submits per second per connection before it is dropped (sustained).
    pub submits_per_second: u32,
    /// SV1 requests other than submits per second per connection before it
    /// is dropped (sustained; bursts to twice that, at least 10).
    pub requests_per_second: u32,
    /// A connection whose shares were rejected more than this fraction of
    /// the time, over any `reject_window` shares in a row, is dropped
    /// (1.0: never). Rejected shares cost the proxy a full check each.
    pub max_reject_ratio: f64,
    /// Shares per reject-ratio window.
    pub reject_window: u32,
    /// SV2 channels one connection may hold (at most 4096).
    pub max_channels_per_connection: usize,
    /// SV2 channel opens per second per connection (sustained; bursts to
    /// twice that); more are refused with `capacity-exhausted`.
    pub channel_opens_per_second: u32,
    /// Time to finish subscribe/authorize (or the Noise handshake), seconds.
    pub handshake_timeout_secs: u64,
    /// Drop a connection silent for this long, seconds.
    pub idle_timeout_secs: u64,
    /// Longest worker name kept (longer names are truncated).
    pub max_worker_name: usize,
    /// Worker names the registry keeps (per-worker counters). When full,
    /// names with no connection are evicted, longest idle first; a new name
    /// beyond that is served but not tracked.
    pub max_workers: usize,
    /// A worker name with no connection and no share for this long is
    /// forgotten, seconds.
    pub worker_idle_secs: u64,
    /// SV1 sessions writing a new job's notify at once (0: half the cores).
    /// A new template wakes every miner together; a bound keeps cores free
    /// for shares meanwhile. Read at start.
    pub notify_writers: usize,
    /// Longest drain on SIGTERM, seconds: miners told to reconnect, then
    /// the pools' answers to every forwarded share awaited (0: stop at once).
    /// Keep it below the service manager's stop timeout.
    pub drain_secs: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_line: gridproxy_protocol::sv1::DEFAULT_MAX_LINE,
            max_frame: 64 * 1024,
            max_connections: 19_000,
            max_connections_per_ip: 2_000,
            submits_per_second: 200,
            requests_per_second: 5,
            max_reject_ratio: 0.9,
            reject_window: 100,
            max_channels_per_connection: 4096,
            channel_opens_per_second: 100,
            handshake_timeout_secs: 10,
            idle_timeout_secs: 600,
            max_worker_name: 128,
            max_workers: 100_000,
            worker_idle_secs: 3600,
            notify_writers: 0,
            drain_secs: 30,
        }
    }
}

/// Longest handshake timeout accepted, seconds (an hour).
pub const MAX_HANDSHAKE_SECS: u64 = 3600;
/// Longest idle timeout accepted, seconds (a week).
pub const MAX_IDLE_SECS: u64 = 7 * 24 * 3600;
/// Longest drain accepted, seconds (an hour).
pub const MAX_DRAIN_SECS: u64 = 3600;

impl Limits {
    /// Handshake timeout as a Duration.
    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_secs(self.handshake_timeout_secs)
    }
    /// Drain bound as a Duration.
    pub fn drain(&self) -> Duration {
        Duration::from_secs(self.drain_secs)
    }
    /// Idle timeout as a Duration.
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_secs(self.idle_timeout_secs)
    }
}

/// Miner difficulty settings (vardiff).
///
/// `initial`, `min` and `max` are share difficulties, or hashrates as
/// operators and SRI's configs think of them (`"110 TH/s"`): the difficulty
/// at which a miner of that hashrate sends `shares_per_minute` shares.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(try_from = "RawDifficulty")]
pub struct DifficultyConfig {
    /// First difficulty given to a miner.
    pub initial: f64,
    /// Floor (rounded up to a power of two).
    pub min: f64,
    /// Ceiling.
    pub max: f64,
    /// Shares per minute per miner to aim for.
    pub shares_per_minute: f64,
    /// Retarget interval, seconds.
    pub retarget_secs: u64,
    /// Honour `mining.suggest_difficulty` (within min/max).
    pub accept_suggestions: bool,
}

/// A difficulty as written: a number, or a hashrate string.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
enum DifficultyOrRate {
    Difficulty(f64),
    Rate(String),
}

impl DifficultyOrRate {
    fn resolve(&self, key: &str, shares_per_minute: f64) -> Result<f64, String> {
        match self {
            Self::Difficulty(d) => Ok(*d),
            Self::Rate(text) => {
                let hs = parse_hashrate(text).map_err(|e| format!("difficulty.{key}: {e}"))?;
                Ok(difficulty_for_hashrate(hs, shares_per_minute))
            }
        }
    }
}

/// `[difficulty]` as written, before hashrates become difficulties.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDifficulty {
    initial: Option<DifficultyOrRate>,
    min: Option<DifficultyOrRate>,
    max: Option<DifficultyOrRate>,
    shares_per_minute: Option<f64>,
    retarget_secs: Option<u64>,
    accept_suggestions: Option<bool>,
}

impl TryFrom<RawDifficulty> for DifficultyConfig {
    type Error = String;
    fn try_from(r: RawDifficulty) -> Result<Self, String> {
        let d = DifficultyConfig::default();
        let spm = r.shares_per_minute.unwrap_or(d.shares_per_minute);
        if !(spm.is_finite() && spm > 0.0) {
            // Validation names it; a hashrate cannot be converted without it.
            if [&r.initial, &r.min, &r.max]
                .iter()
                .any(|v| matches!(v, Some(DifficultyOrRate::Rate(_))))
            {
                return Err(
                    "difficulty: a hashrate needs shares_per_minute > 0 to become a difficulty"
                        .into(),
                );
            }
        }
        let get = |v: &Option<DifficultyOrRate>, key: &str, default: f64| {
            v.as_ref().map_or(Ok(default), |v| v.resolve(key, spm))
        };
        Ok(DifficultyConfig {
            initial: get(&r.initial, "initial", d.initial)?,
            min: get(&r.min, "min", d.min)?,
            max: get(&r.max, "max", d.max)?,
            shares_per_minute: spm,
            retarget_secs: r.retarget_secs.unwrap_or(d.retarget_secs),
            accept_suggestions: r.accept_suggestions.unwrap_or(d.accept_suggestions),
        })
    }
}

/// Parse a hashrate such as `"110 TH/s"`, `"1.5 PH/s"`, `"500 kH/s"` or
/// `"42 H/s"` into hashes per second (SI prefixes k, M, G, T, P, E).
pub fn parse_hashrate(text: &str) -> Result<f64, String> {
    let t = text.trim();
    let unit_at = t
        .find(|c: char| c.is_ascii_alphabetic())
        .ok_or_else(|| format!("{text:?}: no unit (write e.g. \"110 TH/s\")"))?;
    let (num, unit) = t.split_at(unit_at);
    let n: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("{text:?}: {:?} is not a number", num.trim()))?;
    let scale = match unit.trim() {
        "H/s" | "h/s" => 1.0,
        "kH/s" | "KH/s" => 1e3,
        "MH/s" => 1e6,
        "GH/s" => 1e9,
        "TH/s" => 1e12,
        "PH/s" => 1e15,
        "EH/s" => 1e18,
        u => {
            return Err(format!(
                "{text:?}: unknown unit {u:?} (H/s, kH/s, MH/s, GH/s, TH/s, PH/s or EH/s)"
            ))
        }
    };
    let hs = n * scale;
    if !(hs.is_finite() && hs > 0.0) {
        return Err(format!("{text:?}: must be a positive hashrate"));
    }
    Ok(hs)
}

/// The share difficulty at which a miner of `hashrate` (H/s) sends
/// `shares_per_minute` shares: a difficulty-1 share takes 2^32 hashes.
pub fn difficulty_for_hashrate(hashrate: f64, shares_per_minute: f64) -> f64 {
    hashrate * 60.0 / (shares_per_minute * 4_294_967_296.0)
}

impl Default for DifficultyConfig {
    fn default() -> Self {
        Self {
            initial: 4096.0,
            min: 1.0,
            max: 1e15,
            shares_per_minute: 12.0,
            retarget_secs: 60,
            accept_suggestions: true,
        }
    }
}

/// Failover and split settings.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoutingConfig {
    /// Fail over when a connected pool sends no job for this long, seconds.
    pub no_job_timeout_secs: u64,
    /// A recovered higher-priority pool must stay up this long before miners move back, seconds.
    pub failback_cooldown_secs: u64,
    /// Rebalance the weighted split this often, seconds.
    pub rebalance_secs: u64,
    /// Upstream reconnect delay (first; doubles up to 5 s, or stays when set above), milliseconds.
    pub reconnect_ms: u64,
    /// Shares sent to a pool and not yet answered, per pool; past it the
    /// oldest is given up (counted), so a pool that never answers cannot
    /// grow the queue.
    pub max_pending_shares: usize,
    /// SV2 future jobs (not yet activated by a prev hash) kept per pool;
    /// past it the oldest is dropped (counted).
    pub max_future_jobs: usize,
    /// An SV2 channel's nominal hashrate follows the measured hashrate of
    /// its miners: `UpdateChannel` is sent when they differ by more than
    /// this fraction (0: never; the pool's view stays `nominal_hashrate`).
    pub channel_update_fraction: f64,
    /// At most one `UpdateChannel` per channel this often, seconds.
    pub channel_update_secs: u64,
}

impl Default for RoutingConfig {
    fn default() -> Self {
        Self {
            no_job_timeout_secs: 120,
            failback_cooldown_secs: 60,
            rebalance_secs: 10,
            reconnect_ms: 200,
            max_pending_shares: 65_536,
            max_future_jobs: 64,
            channel_update_fraction: 0.1,
            channel_update_secs: 60,
        }
    }
}

/// How the upstream extranonce space is split.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ExtranonceConfig {
    /// Bytes that tell miners apart (3 = 16.7 M miners).
    pub miner_bytes: usize,
    /// Bytes each miner rolls (extranonce2 size, 4–8).
    pub extranonce2_size: usize,
}

impl Default for ExtranonceConfig {
    fn default() -> Self {
        Self {
            miner_bytes: 3,
            extranonce2_size: 4,
        }
    }
}

/// A value that parses but does not make sense; names the key.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{key}: {message}")]
pub struct Invalid {
    /// The offending key, as a path (`pools[1].weight`).
    pub key: String,
    /// What is wrong.
    pub message: String,
}

/// A configuration that did not parse or validate.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// TOML or type errors (the message carries line and column).
    #[error("{0}")]
    Parse(#[from] toml::de::Error),
    /// The values parse but do not make sense together.
    #[error(transparent)]
    Invalid(#[from] Invalid),
}

impl ProxyConfig {
    /// Parse and validate the engine's tables from TOML text (embedders and
    /// tests; the application has its own loader for the whole file).
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let cfg: ProxyConfig = toml::from_str(text)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Check the values make sense together; the error names the key.
    pub fn validate(&self) -> Result<(), Invalid> {
        if self.pools.is_empty() {
            return Err(bad(
                "pools".into(),
                "at least one [[pools]] entry is needed".into(),
            ));
        }
        for (i, p) in self.pools.iter().enumerate() {
            let key_in_url = p.address.authority_pubkey;
            match (p.protocol, p.address.scheme) {
                (None, None) => {
                    return Err(bad(
                        format!("pools[{i}].protocol"),
                        "missing: give protocol = \"sv1\" or \"sv2\", or write the address as stratum+tcp://host:port (sv1) or stratum2+tcp://host:port/<authority key> (sv2)".into(),
                    ))
                }
                (Some(proto), Some(scheme)) if proto != PoolProtocol::from(scheme) => {
                    return Err(bad(
                        format!("pools[{i}].address"),
                        format!(
                            "{}:// is an {} address but protocol = \"{}\"",
                            scheme.as_str(),
                            PoolProtocol::from(scheme).as_str(),
                            proto.as_str()
                        ),
                    ))
                }
                _ => {}
            }
            if let (PoolProtocol::Sv2, Some(k)) = (p.protocol(), &p.authority_pubkey) {
                let key = k
                    .parse::<AuthorityPublicKey>()
                    .map_err(|e| bad(format!("pools[{i}].authority_pubkey"), e.to_string()))?;
                if key_in_url.is_some_and(|u| u != key) {
                    return Err(bad(
                        format!("pools[{i}].authority_pubkey"),
                        "differs from the key in the address URL: give one, or the same".into(),
                    ));
                }
            }
            if p.protocol() == PoolProtocol::Sv2 && p.authority_key().is_none() {
                return Err(bad(
                    format!("pools[{i}].authority_pubkey"),
                    "required for an sv2 pool (pin the pool's key): authority_pubkey = \"...\" or stratum2+tcp://host:port/<key>".into(),
                ));
            }
            if !(256..=MAX_POOL_MAX_LINE).contains(&p.max_line) {
                return Err(bad(
                    format!("pools[{i}].max_line"),
                    format!("must be 256..={MAX_POOL_MAX_LINE} bytes"),
                ));
            }
            if !(p.weight.is_finite() && p.weight > 0.0) {
                return Err(bad(
                    format!("pools[{i}].weight"),
                    "must be a positive number".into(),
                ));
            }
        }
        Accounts::new(&self.accounts).map_err(|(key, message)| bad(key, message))?;
        for (i, a) in self.accounts.iter().enumerate() {
            if let Some(p) = a
                .pools
                .keys()
                .find(|p| !self.pools.iter().any(|q| &q.name == *p))
            {
                return Err(bad(
                    format!("accounts[{i}].pools"),
                    format!("{p:?} is not a [[pools]] name"),
                ));
            }
        }
        if !self.accounts.is_empty() {
            if let Some(i) = self.pools.iter().position(|p| p.name.contains('@')) {
                return Err(bad(
                    format!("pools[{i}].name"),
                    "with [[accounts]], a pool name may not hold '@' (an account's upstream is named pool@account)".into(),
                ));
            }
        }
        let en = &self.extranonce;
        if !(4..=8).contains(&en.extranonce2_size) {
            return Err(bad(
                "extranonce.extranonce2_size".into(),
                "must be 4..=8 (longer breaks some firmware)".into(),
            ));
        }
        if !(1..=4).contains(&en.miner_bytes) {
            return Err(bad("extranonce.miner_bytes".into(), "must be 1..=4".into()));
        }
        let d = &self.difficulty;
        if !(d.min > 0.0 && d.max >= d.min && d.initial > 0.0 && d.shares_per_minute > 0.0) {
            return Err(bad(
                "difficulty".into(),
                "need 0 < min <= max, initial > 0, shares_per_minute > 0".into(),
            ));
        }
        let secret = self.listen.authority_secret()?;
        if self.listen.sv2.is_some()
            && (self.listen.sv2_authority_pubkey.is_none() || secret.is_none())
        {
            return Err(bad(
                "listen.sv2_authority_secret".into(),
                "an sv2 listener needs sv2_authority_pubkey and sv2_authority_secret (or sv2_authority_secret_file)".into(),
            ));
        }
        // Timeouts become deadlines (`Instant + Duration`): an absurd value
        // would overflow and panic every session, so bound them here.
        let l = &self.limits;
        if !(1..=MAX_HANDSHAKE_SECS).contains(&l.handshake_timeout_secs) {
            return Err(bad(
                "limits.handshake_timeout_secs".into(),
                format!("must be 1..={MAX_HANDSHAKE_SECS}"),
            ));
        }
        if !(1..=MAX_IDLE_SECS).contains(&l.idle_timeout_secs) {
            return Err(bad(
                "limits.idle_timeout_secs".into(),
                format!("must be 1..={MAX_IDLE_SECS} (a week)"),
            ));
        }
        if l.drain_secs > MAX_DRAIN_SECS {
            return Err(bad(
                "limits.drain_secs".into(),
                format!("must be 0..={MAX_DRAIN_SECS}"),
            ));
        }
        if !(1..=4096).contains(&l.max_channels_per_connection) {
            return Err(bad(
                "limits.max_channels_per_connection".into(),
                "must be 1..=4096".into(),
            ));
        }
        if l.channel_opens_per_second == 0 {
            return Err(bad(
                "limits.channel_opens_per_second".into(),
                "must be > 0".into(),
            ));
        }
        if l.requests_per_second == 0 {
            return Err(bad(
                "limits.requests_per_second".into(),
                "must be > 0".into(),
            ));
        }
        let r = &self.routing;
        if !(16..=10_000_000).contains(&r.max_pending_shares) {
            return Err(bad(
                "routing.max_pending_shares".into(),
                "must be 16..=10000000".into(),
            ));
        }
        if !(0.0..=10.0).contains(&r.channel_update_fraction) {
            return Err(bad(
                "routing.channel_update_fraction".into(),
                "must be 0..=10 (0: never update)".into(),
            ));
        }
        if !(1..=86_400).contains(&r.channel_update_secs) {
            return Err(bad(
                "routing.channel_update_secs".into(),
                "must be 1..=86400".into(),
            ));
        }
        if !(1..=4096).contains(&r.max_future_jobs) {
            return Err(bad(
                "routing.max_future_jobs".into(),
                "must be 1..=4096".into(),
            ));
        }
        if !(l.max_reject_ratio > 0.0 && l.max_reject_ratio <= 1.0) {
            return Err(bad(
                "limits.max_reject_ratio".into(),
                "must be in (0, 1] (1.0: never drop for rejects)".into(),
            ));
        }
        if !(10..=1_000_000).contains(&l.reject_window) {
            return Err(bad(
                "limits.reject_window".into(),
                "must be 10..=1000000 shares".into(),
            ));
        }
        if l.max_connections_per_ip == 0 {
            return Err(bad(
                "limits.max_connections_per_ip".into(),
                "must be > 0".into(),
            ));
        }
        if !(1..=10_000_000).contains(&l.max_workers) {
            return Err(bad(
                "limits.max_workers".into(),
                "must be 1..=10000000".into(),
            ));
        }
        if !(1..=MAX_IDLE_SECS).contains(&l.worker_idle_secs) {
            return Err(bad(
                "limits.worker_idle_secs".into(),
                format!("must be 1..={MAX_IDLE_SECS} (a week)"),
            ));
        }
        if self.limits.max_connections == 0 || self.limits.max_line < 256 {
            return Err(bad(
                "limits".into(),
                "max_connections must be > 0 and max_line >= 256".into(),
            ));
        }
        Ok(())
    }

    /// The upstream sessions to run: one per (pool, account). The default
    /// account's slots come first, one per pool in file order, so without
    /// accounts the slots are the pools; then each account's, in the order
    /// of its entry and of the pools.
    pub fn slots(&self) -> Vec<PoolConfig> {
        let mut slots: Vec<PoolConfig> = self.pools.clone();
        for a in &self.accounts {
            for p in &self.pools {
                if let Some(login) = a.pools.get(&p.name) {
                    let mut s = p.clone();
                    s.name = slot_name(&p.name, Some(&a.name));
                    s.base = p.name.clone();
                    s.account = Some(a.name.clone());
                    s.user = login.user.clone();
                    s.password = login.password.clone();
                    slots.push(s);
                }
            }
        }
        slots
    }

    /// The accounts, compiled for matching (empty when they do not validate).
    pub fn compiled_accounts(&self) -> Accounts {
        Accounts::new(&self.accounts).unwrap_or_default()
    }

    /// Pools sorted by priority, keeping file order within a priority.
    pub fn pool_order(&self) -> Vec<usize> {
        let mut idx: Vec<usize> = (0..self.pools.len()).collect();
        idx.sort_by_key(|&i| self.pools[i].priority);
        idx
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "9auqWEzQDVyd2oe1JVGFLMLHZtCo2FFqZwtKA5gd9xbuEu7PH72";

    fn ok(extra: &str) -> String {
        format!("[[pools]]\nname='a'\naddress='127.0.0.1:1'\nprotocol='sv2'\nauthority_pubkey='{KEY}'\nuser='u'\n{extra}")
    }

    #[test]
    fn minimal_config_parses_with_loopback_defaults() {
        let c = ProxyConfig::from_toml(&ok("")).unwrap();
        assert_eq!(c.listen.sv1.unwrap().ip().to_string(), "127.0.0.1");
        assert_eq!(c.extranonce.extranonce2_size, 4);
    }

    #[test]
    fn errors_name_the_key() {
        let e = ProxyConfig::from_toml(&ok("[limits]\nmax_lien = 5\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("max_lien") && e.contains("line 8"), "{e}");
        let e = ProxyConfig::from_toml(&ok("[extranonce]\nextranonce2_size = 12\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("extranonce.extranonce2_size"), "{e}");
        let e = ProxyConfig::from_toml(
            "[[pools]]\nname='a'\naddress='127.0.0.1:1'\nprotocol='sv2'\nuser='u'\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("pools[0].authority_pubkey"), "{e}");
        let e = ProxyConfig::from_toml(&ok("").replace(KEY, "notakey"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("pools[0].authority_pubkey"), "{e}");
    }

    fn pool(lines: &str) -> Result<ProxyConfig, String> {
        ProxyConfig::from_toml(&format!("[[pools]]\nname='a'\nuser='u'\n{lines}\n"))
            .map_err(|e| e.to_string())
    }

    #[test]
    fn pool_addresses_as_people_write_them() {
        for (lines, host, port, proto) in [
            ("address='stratum.example.com:3333'\nprotocol='sv1'", "stratum.example.com", 3333, PoolProtocol::Sv1),
            ("address='[::1]:3333'\nprotocol='sv1'", "::1", 3333, PoolProtocol::Sv1),
            ("address='stratum+tcp://stratum.example.com:3333'", "stratum.example.com", 3333, PoolProtocol::Sv1),
            ("address='stratum+tcp://h:3333'\nprotocol='sv1'", "h", 3333, PoolProtocol::Sv1),
            (&format!("address='stratum2+tcp://pool.example.com:3336/{KEY}'"), "pool.example.com", 3336, PoolProtocol::Sv2),
            (&format!("address='stratum2+tcp://localhost:3336/{KEY}'\nprotocol='sv2'\nauthority_pubkey='{KEY}'"), "localhost", 3336, PoolProtocol::Sv2),
            (&format!("address='stratum2+tcp://localhost:3336'\nauthority_pubkey='{KEY}'"), "localhost", 3336, PoolProtocol::Sv2),
            (&format!("address='localhost:3336'\nprotocol='sv2'\nauthority_pubkey='{KEY}'"), "localhost", 3336, PoolProtocol::Sv2),
        ] {
            let c = pool(lines).unwrap_or_else(|e| panic!("{lines}: {e}"));
            let p = &c.pools[0];
            assert_eq!((p.address.endpoint.host.as_str(), p.address.endpoint.port), (host, port), "{lines}");
            assert_eq!(p.protocol(), proto, "{lines}");
            if proto == PoolProtocol::Sv2 {
                assert_eq!(p.authority_key().as_deref(), Some(KEY), "{lines}");
            }
        }
    }

    #[test]
    fn pool_address_mistakes_name_the_key() {
        let other = other_key();
        for (lines, key, says) in [
            ("address='h:1'", "pools[0].protocol", "missing"),
            ("address='h'\nprotocol='sv1'", "line 4", "needs a port"),
            ("address='stratum+ssl://h:1'", "line 4", "TLS"),
            (
                "address='stratum+tcp://h:1'\nprotocol='sv2'",
                "pools[0].address",
                "stratum+tcp:// is an sv1 address but protocol = \"sv2\"",
            ),
            (
                &format!("address='stratum2+tcp://h:1/{KEY}'\nprotocol='sv1'"),
                "pools[0].address",
                "stratum2+tcp:// is an sv2 address",
            ),
            (
                "address='stratum2+tcp://h:1'",
                "pools[0].authority_pubkey",
                "required for an sv2 pool",
            ),
            (
                &format!("address='stratum2+tcp://h:1/{KEY}'\nauthority_pubkey='{other}'"),
                "pools[0].authority_pubkey",
                "differs from the key in the address",
            ),
            (
                &format!("address='stratum2+tcp://h:1/{KEY}'\nauthority_pubkey='bad'"),
                "pools[0].authority_pubkey",
                "base58",
            ),
            (
                "address='stratum2+tcp://h:1/bad'",
                "line 4",
                "the key in the URL",
            ),
        ] {
            let e = pool(lines).expect_err(lines);
            assert!(e.contains(key) && e.contains(says), "{lines}: {e}");
        }
    }

    /// A second valid key, different from `KEY`.
    fn other_key() -> String {
        gridproxy_protocol::sv2::AuthorityKeypair::from_secret_bytes([9; 32])
            .unwrap()
            .public()
            .to_string()
    }

    #[test]
    fn secrets_stay_out_of_debug() {
        // Parsed only: the key pair is checked when the proxy starts.
        let text = ok("password = 'pool-pass-123'\n[listen]\nsv2 = '127.0.0.1:0'\nsv2_authority_pubkey = 'k'\nsv2_authority_secret = 'the-secret-456'\n");
        let c: ProxyConfig = toml::from_str(&text).unwrap();
        let d = format!("{c:?}");
        assert!(
            !d.contains("pool-pass-123") && !d.contains("the-secret-456"),
            "{d}"
        );
        assert!(d.contains("<redacted>") && d.contains("127.0.0.1:1"), "{d}");
    }

    #[test]
    fn timeouts_that_would_overflow_a_deadline_are_refused() {
        for (key, v) in [
            ("idle_timeout_secs", i64::MAX as u64),
            ("idle_timeout_secs", 0),
            ("handshake_timeout_secs", 1 << 40),
            ("drain_secs", 1 << 40),
        ] {
            let e = ProxyConfig::from_toml(&ok(&format!("[limits]\n{key} = {v}\n")))
                .unwrap_err()
                .to_string();
            assert!(e.contains(&format!("limits.{key}")), "{e}");
        }
        let c = ProxyConfig::from_toml(&ok("[limits]\nidle_timeout_secs = 604800\n")).unwrap();
        // The largest accepted value still makes a deadline.
        let _ = tokio::time::Instant::now() + c.limits.idle_timeout();
    }

    #[test]
    fn authority_secret_can_come_from_a_file() {
        let dir = std::env::temp_dir().join(format!("gp-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("authority.key");
        std::fs::write(&file, "the-secret-789\n").unwrap();
        let listen = |extra: &str| {
            ok(&format!(
                "[listen]\nsv2 = '127.0.0.1:0'\nsv2_authority_pubkey = 'k'\n{extra}"
            ))
        };
        let c = ProxyConfig::from_toml(&listen(&format!("sv2_authority_secret_file = {file:?}\n")))
            .unwrap();
        assert_eq!(
            c.listen.authority_secret().unwrap().as_deref(),
            Some("the-secret-789")
        );
        assert!(!format!("{c:?}").contains("the-secret-789"));
        let both = format!("sv2_authority_secret = 'x'\nsv2_authority_secret_file = {file:?}\n");
        let e = ProxyConfig::from_toml(&listen(&both))
            .unwrap_err()
            .to_string();
        assert!(e.contains("not both"), "{e}");
        let missing = "sv2_authority_secret_file = '/nonexistent/gp.key'\n";
        let e = ProxyConfig::from_toml(&listen(missing))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("listen.sv2_authority_secret_file") && e.contains("/nonexistent/gp.key"),
            "{e}"
        );
        let _ = std::fs::remove_dir_all(dir);
    }
}
