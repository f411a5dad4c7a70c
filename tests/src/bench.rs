//! Shared pieces of the site-sized end-to-end tests (`curtail_*`, `grid_*`,
//! `chaos`, `operate_site`): a simulated site
//! ([`gridproxy_fixtures::site`]) turned into the curtailment engine's fleet,
//! its firmware actuator and the proxy bridge, a proxy config, and checks on
//! the ledger.
//!
//! Time: every test runs site time [`SPEED`] times faster than real time
//! (the driver's [`ScaledClock`], the emulators' `time_scale = 1/SPEED`), so
//! "60 s" of site time is 6 s of wall time. Durations below are site time
//! unless named `*_real`.
//!
//! The harness: [`PoolBench`] is the quiet fixture TP and a real `pool_sv2`
//! on it; [`SiteBench`] builds an emulated site, optionally mining through an
//! in-process gridproxy on such a pool, and the resulting [`Bench`] starts
//! the curtailment driver on it:
//! ```no_run
//! # async fn demo() {
//! use gridproxy_tests::bench::*;
//! let bench = SiteBench::new("dr", (62, 0)).behind_proxy().start().await;
//! let proxy = bench.proxy();
//! let h = bench
//!     .start_driver(
//!         Default::default(),
//!         bridge(&bench.site, proxy.ctx.router.clone()),
//!         ScaledClock::new(SPEED),
//!         Default::default(),
//!     )
//!     .await;
//! # }
//! ```
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use gridproxy::config::Config;
use gridproxy::site::park::ProxyActuator;
use gridproxy_curtail as curtail;
use gridproxy_fixtures::site::{Firmware, Site, SiteConfig, SiteMiner};
use gridproxy_fixtures::tp::MockTp;
use gridproxy_proxy::router::Router;
use gridproxy_proxy::Proxy;

use crate::{start_pool, start_quiet_tp, Pool};

use curtail::actuator::Actuator;
use curtail::actuators::{FleetActuator, MinerEndpoint, WhatsminerApi};
use curtail::command::Action;
use curtail::driver::{self, Audit, DriverConfig, DriverHandle, Edge, Route};
use curtail::fleet::{ControlSurface, Fleet, MinerId, MinerSpec, Ramp};
use curtail::policy::PolicyConfig;
use curtail::time::Timestamp;

pub use curtail::time::ScaledClock;

/// Site seconds per wall second.
pub const SPEED: f64 = 10.0;

/// Firmware client timeout per operation (real time).
pub const CLIENT_TIMEOUT_REAL: Duration = Duration::from_millis(1000);

/// Site time `d` in real time.
pub fn real(d: Duration) -> Duration {
    d.div_f64(SPEED)
}

/// The engine's control surface for a site firmware.
pub fn surface(f: Firmware) -> ControlSurface {
    match f {
        Firmware::LuxOs => ControlSurface::LuxOs,
        Firmware::BraiinsOs => ControlSurface::BraiinsOs,
        Firmware::Whatsminer => ControlSurface::Whatsminer,
        Firmware::Vnish => ControlSurface::Vnish,
        Firmware::Antminer => ControlSurface::AntminerStock,
        Firmware::Stock => ControlSurface::None,
    }
}

/// The miner's inventory id: its site index.
pub fn id(m: &SiteMiner) -> MinerId {
    MinerId(m.index as u64)
}

/// The inventory entry the engine gets for a site miner: nameplate figures,
/// the firmware's ramp times, standby and minimum power as the site has
/// them. Parking saves nothing (`parked_w = nominal`): an ASIC with a backup
/// pool keeps hashing.
pub fn spec(m: &SiteMiner) -> MinerSpec {
    let c = &m.config;
    let ramps = m.firmware.ramps();
    let mut s = MinerSpec::new(
        id(m),
        m.model,
        c.nominal_ths,
        c.nominal_w,
        surface(m.firmware),
    );
    s.ramp = Ramp {
        sleep_latency: ramps.sleep,
        wake_latency: ramps.wake,
        limit_latency: ramps.limit,
        min_power_w: c.min_power_w,
        sleep_w: c.sleep_w,
        parked_w: c.nominal_w,
    };
    s
}

/// The engine's fleet for the site.
pub fn fleet(site: &Site) -> Fleet {
    Fleet::from_specs(site.miners().iter().map(spec)).expect("valid fleet")
}

/// Endpoint of a site miner's firmware API.
///
/// Whatsminers are reached with `api = "auto"` (the configuration's
/// default) on their one port: v3-only emulators must be found on v3,
/// v2-only ones on v2.
pub fn endpoint(m: &SiteMiner) -> MinerEndpoint {
    let mut ep =
        MinerEndpoint::new(surface(m.firmware), m.addr()).with_credentials("root", &m.password);
    if m.firmware == Firmware::Whatsminer {
        ep = ep.with_whatsminer_api(WhatsminerApi::Auto {
            v2_port: m.addr().port(),
        });
    }
    match &m.web {
        Some(w) => ep.with_web(w.addr().into()),
        None => ep,
    }
}

/// Firmware actuator and telemetry source for every site miner.
pub fn firmware(site: &Site) -> FleetActuator {
    let mut a = FleetActuator::new(CLIENT_TIMEOUT_REAL);
    for m in site.miners() {
        a.insert(id(m), &endpoint(m));
    }
    a
}

/// The proxy bridge with every site miner's worker name.
pub fn bridge(site: &Site, router: Arc<Router>) -> ProxyActuator {
    let b = ProxyActuator::new(router, std::sync::Arc::default());
    for m in site.miners() {
        b.insert(id(m), m.worker.clone());
    }
    b
}

/// A proxy config with one SV2 pool, SV1 listener on `sv1`.
pub fn proxy_config(pool: SocketAddr, key: &str, sv1: SocketAddr) -> Config {
    let s = format!(
        "[[pools]]\nname = \"sri\"\naddress = \"{pool}\"\nprotocol = \"sv2\"\nauthority_pubkey = \"{key}\"\n\
         user = \"gridproxy-curtail-test\"\npriority = 0\nweight = 1.0\nnominal_hashrate = 50000.0\n\n\
         [listen]\nsv1 = \"{sv1}\"\n\n\
         [difficulty]\ninitial = 0.000003814697265625\nmin = 0.000000001\nshares_per_minute = 6.0\n\n\
         [routing]\nreconnect_ms = 100\n"
    );
    Config::parse(&s, "curtail test").expect("valid test config")
}

/// A fresh temp directory.
pub fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join("gridproxy-tests").join(format!(
        "{name}-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos()
    ));
    std::fs::create_dir_all(&d).expect("temp dir");
    d
}

/// Site draw now, kW.
pub fn site_kw(site: &Site) -> f64 {
    site.power_w() / 1000.0
}

/// Whether the emulator is asleep (standby power, no hashrate).
pub fn asleep(m: &SiteMiner) -> bool {
    let s = m.emulator.state();
    s.hashrate_ths <= 0.0 && s.power_w <= m.config.sleep_w + 1.0
}

/// Whether the emulator hashes at (about) nominal power.
pub fn at_nominal(m: &SiteMiner) -> bool {
    (m.power_w() - m.config.nominal_w).abs() < 1.0
}

/// Every command has the actuator's answer (`ack_ok`/`ack_failed`) in the
/// ledger; returns how many were answered OK.
pub fn every_command_answered(audit: &Audit) -> usize {
    let mut ok = 0;
    for c in &audit.commands {
        let answers: Vec<&str> = audit
            .acks_of(c.id)
            .map(|a| a.outcome.as_str())
            .filter(|o| *o == "ack_ok" || *o == "ack_failed")
            .collect();
        assert_eq!(
            answers.len(),
            1,
            "command {:?} ({:?} to {}) has answers {answers:?}",
            c.id,
            c.action,
            c.miner
        );
        if answers[0] == "ack_ok" {
            ok += 1;
        }
    }
    ok
}

/// Wake commands issued at or after `from`, as (time, miner).
pub fn wakes_after(audit: &Audit, from: Timestamp) -> Vec<(Timestamp, MinerId)> {
    audit
        .commands
        .iter()
        .filter(|c| c.action == Action::Wake && c.at >= from)
        .map(|c| (c.at, c.miner))
        .collect()
}

/// Assert that wakes (sorted by time) come in batches: clusters separated
/// by gaps of at least a quarter `interval`, each of at most `batch`
/// miners, starting at least `interval` apart. Returns the batch sizes.
pub fn assert_staggered(
    wakes: &[(Timestamp, MinerId)],
    batch: usize,
    interval: Duration,
) -> Vec<usize> {
    assert!(!wakes.is_empty(), "no wake commands");
    let mut batches: Vec<(Timestamp, usize)> = vec![(wakes[0].0, 1)];
    for w in wakes.windows(2) {
        if w[1].0.saturating_since(w[0].0) >= interval / 4 {
            batches.push((w[1].0, 1));
        } else if let Some(b) = batches.last_mut() {
            b.1 += 1;
        }
    }
    for (start, n) in &batches {
        assert!(*n <= batch, "batch at {start} has {n} wakes (max {batch})");
    }
    for b in batches.windows(2) {
        let gap = b[1].0.saturating_since(b[0].0);
        // 1 % slack for the scaled clock's rounding.
        assert!(
            gap >= interval.mul_f64(0.99),
            "batches at {} and {} only {gap:?} apart",
            b[0].0,
            b[1].0
        );
    }
    batches.into_iter().map(|(_, n)| n).collect()
}

/// The driver on `site`'s firmware APIs, `proxy` for proxy-side actions,
/// ledger at `ledger`; returns after its first telemetry round.
pub async fn start_driver<P: Actuator + 'static>(
    site: &Site,
    ledger: &Path,
    policy: PolicyConfig,
    proxy: P,
    clock: ScaledClock,
    cfg: DriverConfig,
) -> DriverHandle {
    let h = spawn_driver(site, ledger, policy, proxy, clock, cfg).await;
    assert!(
        h.wait_for(Duration::from_secs(20), |s| s.measured_kw.is_some())
            .await
            .is_some(),
        "first telemetry round"
    );
    h
}

/// The driver as [`start_driver`] starts it, without waiting for its first
/// telemetry round.
pub async fn spawn_driver<P: Actuator + 'static>(
    site: &Site,
    ledger: &Path,
    policy: PolicyConfig,
    proxy: P,
    clock: ScaledClock,
    cfg: DriverConfig,
) -> DriverHandle {
    let fw = Arc::new(firmware(site));
    driver::spawn(
        ledger,
        policy,
        fleet(site),
        Edge {
            actuator: Route {
                firmware: fw.clone(),
                proxy,
            },
            telemetry: fw,
            clock,
        },
        cfg,
    )
    .await
    .expect("driver starts")
}

// ---------------------------------------------------------------------------
// The harness: TP → pool_sv2 → gridproxy → site → driver.

/// The fixture TP with a tip that stays put on blocks found (no share goes
/// stale by a race), and a real `pool_sv2` fed by it. Panics if `pool_sv2`
/// is not installed (the tests that need it fail, never skip).
pub struct PoolBench {
    pub tp: MockTp,
    pub pool: Pool,
}

impl PoolBench {
    /// Starts the TP, then the pool; returns when the pool accepts miners.
    pub async fn start() -> PoolBench {
        let tp = start_quiet_tp().await;
        let pool = start_pool(tp.addr()).await;
        PoolBench { tp, pool }
    }

    /// The pool's authority key, as a config file spells it.
    pub fn key(&self) -> String {
        self.pool.authority_pubkey.to_string()
    }

    /// gridproxy in this process on [`proxy_config`] for this pool, SV1 on
    /// `sv1` (`127.0.0.1:0` for any free port).
    pub async fn start_proxy(&self, sv1: SocketAddr) -> Proxy {
        crate::start_proxy(proxy_config(self.pool.addr, &self.key(), sv1))
            .await
            .expect("proxy starts")
    }
}

/// Builder of a [`Bench`]: an emulated site (by default
/// [`SiteConfig::default`]'s fleet) named `name` on loopback subnet
/// `subnet`, its time [`SPEED`] times real time, optionally mining through
/// gridproxy ([`SiteBench::behind_proxy`]).
pub struct SiteBench {
    name: String,
    site: SiteConfig,
    proxy: bool,
}

impl SiteBench {
    /// A site whose workers are named `name.…`, emulators on `subnet`.
    pub fn new(name: &str, subnet: (u8, u8)) -> SiteBench {
        SiteBench {
            name: name.into(),
            site: SiteConfig {
                time_scale: 1.0 / SPEED,
                subnet,
                worker_prefix: name.into(),
                ..SiteConfig::default()
            },
            proxy: false,
        }
    }

    /// `n` miners of each firmware the engine manages (LuxOS, Braiins OS,
    /// Whatsminer, Vnish).
    pub fn mixed(mut self, n: usize) -> SiteBench {
        self.site.counts = vec![
            (Firmware::LuxOs, n),
            (Firmware::BraiinsOs, n),
            (Firmware::Whatsminer, n),
            (Firmware::Vnish, n),
        ];
        self
    }

    /// Any other site setting.
    pub fn with(mut self, f: impl FnOnce(&mut SiteConfig)) -> SiteBench {
        f(&mut self.site);
        self
    }

    /// Start a [`PoolBench`] and gridproxy on it (any free SV1 port) before
    /// the site, and point the site's miners at the proxy.
    pub fn behind_proxy(mut self) -> SiteBench {
        self.proxy = true;
        self
    }

    /// The site's config as built so far (the pool comes with
    /// [`SiteBench::start`]).
    pub fn config(self) -> SiteConfig {
        self.site
    }

    /// Starts what was asked for: pool and proxy first, then the site.
    pub async fn start(self) -> Bench {
        let SiteBench {
            name,
            mut site,
            proxy,
        } = self;
        let upstream = if proxy {
            let pool = PoolBench::start().await;
            let proxy = pool.start_proxy("127.0.0.1:0".parse().unwrap()).await;
            site.pool = proxy.sv1_addr;
            Some((pool, proxy))
        } else {
            None
        };
        let site = Site::start(site).await.map(Arc::new).expect("site starts");
        let (pool, proxy) = upstream.unzip();
        Bench {
            site,
            proxy,
            pool,
            dir: temp_dir(&name),
        }
    }
}

/// A started [`SiteBench`]. Keep it alive for the whole test: dropping it
/// stops the pool, the proxy and the emulators.
pub struct Bench {
    // Dropped in this order: the site, the proxy, then the pool.
    pub site: Arc<Site>,
    /// gridproxy, with [`SiteBench::behind_proxy`].
    pub proxy: Option<Proxy>,
    /// TP and `pool_sv2`, with [`SiteBench::behind_proxy`].
    pub pool: Option<PoolBench>,
    /// A fresh temp directory for the test (ledger, configs).
    pub dir: PathBuf,
}

impl Bench {
    /// The driver's ledger: `ledger.db` in [`Bench::dir`].
    pub fn ledger(&self) -> PathBuf {
        self.dir.join("ledger.db")
    }

    /// The pool (panics without [`SiteBench::behind_proxy`]).
    pub fn pool(&self) -> &Pool {
        &self.pool.as_ref().expect("bench has a pool").pool
    }

    /// The proxy (panics without [`SiteBench::behind_proxy`]).
    pub fn proxy(&self) -> &Proxy {
        self.proxy.as_ref().expect("bench has a proxy")
    }

    /// [`start_driver`] on this site and [`Bench::ledger`]: returns after
    /// the first telemetry round.
    pub async fn start_driver<P: Actuator + 'static>(
        &self,
        policy: PolicyConfig,
        proxy: P,
        clock: ScaledClock,
        cfg: DriverConfig,
    ) -> DriverHandle {
        start_driver(&self.site, &self.ledger(), policy, proxy, clock, cfg).await
    }

    /// [`spawn_driver`] on this site and [`Bench::ledger`]: does not wait.
    pub async fn spawn_driver<P: Actuator + 'static>(
        &self,
        policy: PolicyConfig,
        proxy: P,
        clock: ScaledClock,
        cfg: DriverConfig,
    ) -> DriverHandle {
        spawn_driver(&self.site, &self.ledger(), policy, proxy, clock, cfg).await
    }
}
