//! `gridproxy demo`: a whole mining site in one process, on loopback.
//!
//! - two embedded validating SV1 pools ([`gridproxy_fixtures::sv1_pool`]),
//!   split 3:1 by weight;
//! - the proxy itself (SV1 listener, SV1 upstreams to those pools);
//! - a simulated site ([`gridproxy_fixtures::site`]): firmware emulators of
//!   mixed models (S19 … S21, M30S++ … M60) and firmwares (LuxOS, Braiins
//!   OS, Whatsminer, VNish, stock cgminer), each with a power model and a
//!   fixture SV1 miner hashing real sha256d at a tiny CPU rate while its
//!   emulator hashes;
//! - the curtailment driver ([`gridproxy_curtail::driver`]) with the real
//!   firmware clients and the proxy's park actuator, writing its SQLite
//!   ledger;
//! - a replayed price trace (5-minute intervals, one every `step`) with a
//!   rise, a spike to $2,400/MWh and a recovery, then a demand-response
//!   event limiting the site to 55 % of nameplate;
//! - the control API, `/metrics` and the dashboard.
//!
//! Stock cgminer cannot be commanded: the engine parks those miners at the
//! proxy. This demo site blocks backup pools, so a parked ASIC without work
//! idles (its emulator is put to sleep when it is parked).

use crate::api;
use crate::config::api::random_token;
use crate::config::Config;
use crate::mix::{counts, surface, trace};
use crate::site::handle::{CommandCounts, SiteCommand, SiteHandle, SiteState};
use crate::site::park::ProxyActuator;
use crate::site::start::{hook, operator_commands, CommandLog};
use crate::site::view::{self, MinerInfo};
use curtail::actuator::{Actuator, ActuatorError};
use curtail::actuators::{FleetActuator, MinerEndpoint};
use curtail::command::{Action, Command};
use curtail::driver::{self, DriverConfig, Edge, Route};
use curtail::fleet::{ControlSurface, Fleet, MinerId, MinerSpec, Ramp};
use curtail::policy::{Economics, Freshness, PolicyConfig, SafeState, Staleness};
use curtail::signal::{DrEvent, DrTarget, PriceSignal, Signal};
use curtail::time::{Clock, SystemClock, Timestamp};
use gridproxy_curtail as curtail;
use gridproxy_fixtures::firmware::model::SimMiner;
use gridproxy_fixtures::site::{Firmware, Site, SiteConfig};
use gridproxy_fixtures::sv1_pool::{self, PoolReject, Sv1Pool, Sv1PoolConfig};
use gridproxy_proxy::Proxy;
use std::collections::HashMap;
use std::future::Future;
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use tracing::warn;

/// How to run the demo.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Simulated miners.
    pub miners: usize,
    /// Stop after this long (None: until the stop token fires).
    pub duration: Option<Duration>,
    /// Dashboard / control API address (port 0 or a busy port: any free port).
    pub api_listen: SocketAddr,
    /// SV1 listener.
    pub sv1_listen: SocketAddr,
    /// Real time per 5-minute trace interval.
    pub step: Duration,
    /// SV1 hashrate per TH/s of nameplate (real sha256d, H/s).
    pub hs_per_ths: f64,
    /// Ledger file (None: a fresh file in the temp directory).
    pub ledger: Option<PathBuf>,
    /// Status line period (zero: never).
    pub status_every: Duration,
    /// Print the banner, status lines and log to stdout.
    pub print: bool,
    /// Multiplies every firmware ramp time (0.25: four times faster than real).
    pub time_scale: f64,
    /// Operate token (None: random).
    pub operate_token: Option<String>,
    /// Read token (None: random).
    pub read_token: Option<String>,
    /// Emulator addresses: `127.<a>.<b>.x` (distinct per concurrent demo).
    pub subnet: (u8, u8),
}

impl Default for DemoOptions {
    fn default() -> Self {
        Self {
            miners: 500,
            duration: None,
            api_listen: "127.0.0.1:8080".parse().expect("literal"),
            sv1_listen: "127.0.0.1:0".parse().expect("literal"),
            step: Duration::from_secs(5),
            hs_per_ths: 2.0,
            ledger: None,
            status_every: Duration::from_secs(2),
            print: false,
            time_scale: 0.25,
            operate_token: None,
            read_token: None,
            subnet: (61, 0),
        }
    }
}

/// What happened, for the summary line and tests.
#[derive(Debug, Clone, Default)]
pub struct DemoReport {
    /// Wall seconds run.
    pub seconds: f64,
    /// Miners simulated.
    pub miners: usize,
    /// Shares the pools accepted (validated) / rejected.
    pub pool_accepted: u64,
    /// Shares the pools rejected.
    pub pool_rejected: u64,
    /// Of those, rejected as invalid or low difficulty (work the proxy
    /// should never have forwarded).
    pub pool_invalid: u64,
    /// Pool rejections by reason.
    pub pool_rejects: std::collections::BTreeMap<&'static str, u64>,
    /// Shares the proxy accepted from miners.
    pub proxy_accepted: u64,
    /// Shares the proxy rejected.
    pub proxy_rejected: u64,
    /// Curtailment commands issued / verified / failed.
    pub commands: CommandCounts,
    /// Lowest and highest site draw seen, kW.
    pub site_kw_range: (f64, f64),
    /// Nameplate, kW.
    pub nominal_kw: f64,
    /// Price intervals replayed.
    pub intervals: u64,
    /// DR events issued.
    pub dr_events: u64,
    /// The ledger file.
    pub ledger: PathBuf,
}

impl DemoReport {
    /// One line.
    pub fn summary(&self) -> String {
        format!(
            "gridproxy demo: {:.0} s, {} miners; pools accepted {} rejected {} ({} invalid; by reason {:?}); proxy accepted {} rejected {}; \
             site {:.0}..{:.0} kW of {:.0} kW nameplate; {} price intervals, {} DR events; \
             curtailment commands issued {} verified {} failed {}; ledger {}",
            self.seconds,
            self.miners,
            self.pool_accepted,
            self.pool_rejected,
            self.pool_invalid,
            self.pool_rejects,
            self.proxy_accepted,
            self.proxy_rejected,
            self.site_kw_range.0,
            self.site_kw_range.1,
            self.nominal_kw,
            self.intervals,
            self.dr_events,
            self.commands.issued,
            self.commands.verified,
            self.commands.failed,
            self.ledger.display()
        )
    }
}

/// The proxy's park actuator, plus this site's physics: without work (backup
/// pools blocked) a parked ASIC idles.
struct SiteProxyActuator {
    proxy: ProxyActuator,
    idle_on_park: HashMap<MinerId, SimMiner>,
}

impl Actuator for SiteProxyActuator {
    fn handles(&self, _surface: ControlSurface) -> bool {
        false
    }

    fn execute(&self, command: &Command) -> impl Future<Output = Result<(), ActuatorError>> + Send {
        let (id, action) = (command.miner, command.action);
        let inner = self.proxy.execute(command);
        async move {
            inner.await?;
            if let Some(m) = self.idle_on_park.get(&id) {
                match action {
                    Action::Park => m.sleep(),
                    Action::Unpark => m.wake(),
                    _ => {}
                }
            }
            Ok(())
        }
    }
}

/// A running demo (for tests and the CLI).
pub struct Demo {
    /// Dashboard / control API address.
    pub api_addr: SocketAddr,
    /// SV1 listener address.
    pub sv1_addr: SocketAddr,
    /// Token with the operate role.
    pub operate_token: String,
    /// Token with the read role.
    pub read_token: String,
    /// The proxy.
    pub proxy: Proxy,
    /// The site handle the API reads.
    pub site_handle: Arc<SiteHandle>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<DemoReport>>,
}

impl Demo {
    /// Ask it to stop.
    pub fn stop(&self) {
        self.stop.cancel();
    }
    /// Wait for it to finish (after [`stop`](Self::stop) or its duration).
    pub async fn join(self) -> anyhow::Result<DemoReport> {
        self.task
            .await
            .map_err(|e| anyhow::anyhow!("demo task: {e}"))?
    }
}

/// Run until `stop` fires or the duration passes.
pub async fn run(opts: DemoOptions, stop: CancellationToken) -> anyhow::Result<DemoReport> {
    let demo = start(opts, stop).await?;
    demo.join().await
}

/// Raise the soft open-files limit towards `want` (up to the hard limit).
/// Returns the soft limit in force afterwards (0 when it cannot be read).
pub fn raise_fd_limit(want: u64) -> u64 {
    rlimit::increase_nofile_limit(want).unwrap_or(0)
}

/// Start everything and return at once; the demo runs in a task.
pub async fn start(opts: DemoOptions, stop: CancellationToken) -> anyhow::Result<Demo> {
    anyhow::ensure!(
        opts.miners > 0 && opts.miners <= 20_000,
        "miners must be 1..=20000"
    );
    // Each miner holds about four sockets (its SV1 connection on both ends,
    // its firmware emulator's listener, telemetry/control connections).
    let want = opts.miners as u64 * 5 + 256;
    let have = raise_fd_limit(want);
    if have < want {
        warn!(
            have,
            want,
            "open-files limit is low for this many miners; raise it with `ulimit -n {want}` or use --miners"
        );
    }
    let t0 = Instant::now();
    // Not a child of `stop`: the pools outlive the proxy at shutdown.
    let pools_stop = CancellationToken::new();
    // Stops the pools if start-up fails half way; disarmed on success.
    let pools_guard = pools_stop.clone().drop_guard();
    // Pool share difficulty: about one share per 5 s for a 200 H/s miner.
    let diff = 1.0 / (1u64 << 22) as f64;
    let mut pools: Vec<Sv1Pool> = Vec::new();
    for name in ["pool-a", "pool-b"] {
        let cfg = Sv1PoolConfig {
            name: name.into(),
            difficulty: diff,
            job_interval: Duration::from_secs(15),
            block_interval: Duration::from_secs(120),
            ..Default::default()
        };
        pools.push(sv1_pool::spawn("127.0.0.1:0".parse()?, cfg, pools_stop.clone()).await?);
    }
    let operate_token = opts.operate_token.clone().unwrap_or_else(random_token);
    let read_token = opts.read_token.clone().unwrap_or_else(random_token);
    let cfg_text = format!(
        r#"
[[pools]]
name = "pool-a"
address = "{a}"
protocol = "sv1"
user = "demo.site"
weight = 3.0

[[pools]]
name = "pool-b"
address = "{b}"
protocol = "sv1"
user = "demo.site"
weight = 1.0

[listen]
sv1 = "{sv1}"

[limits]
max_connections = {maxc}
max_connections_per_ip = {maxc}

[difficulty]
initial = {diff:e}
min = 9.313225746154785e-10
max = 1.0
shares_per_minute = 12.0
retarget_secs = 30

[routing]
rebalance_secs = 5

[api]
listen = "{api}"
metrics_max_workers = 50

[[api.tokens]]
name = "demo-operator"
role = "operate"
token = "{operate_token}"

[[api.tokens]]
name = "demo-viewer"
role = "read"
token = "{read_token}"
"#,
        a = pools[0].addr(),
        b = pools[1].addr(),
        sv1 = opts.sv1_listen,
        maxc = opts.miners * 2 + 100,
        api = opts.api_listen,
    );
    let cfg = Config::parse(&cfg_text, "demo config").map_err(|e| anyhow::anyhow!("{e}"))?;
    let api_cfg = cfg.api.clone();
    let proxy = Proxy::start(cfg.proxy(), CancellationToken::new()).await?;
    let sv1_addr = proxy
        .sv1_addr
        .ok_or_else(|| anyhow::anyhow!("no SV1 listener"))?;
    let site_handle = SiteHandle::new();
    let server = match api::start(
        proxy.ctx.clone(),
        site_handle.clone(),
        None,
        &api_cfg,
        None,
        proxy.stop.clone(),
    )
    .await
    {
        Ok(s) => s,
        Err(e) => {
            warn!(error = %e, "dashboard port busy; using a free port");
            api::start(
                proxy.ctx.clone(),
                site_handle.clone(),
                None,
                &api_cfg,
                Some(SocketAddr::new(opts.api_listen.ip(), 0)),
                proxy.stop.clone(),
            )
            .await?
        }
    };

    // The site.
    let site_cfg = SiteConfig {
        counts: counts(opts.miners),
        time_scale: opts.time_scale,
        subnet: opts.subnet,
        password: random_token(),
        worker_prefix: "site".into(),
        pool: Some(sv1_addr),
        sv1_hashrate: (opts.hs_per_ths * 110.0).max(1.0),
        follow_every: Duration::from_millis(500),
        ..SiteConfig::default()
    };
    let site = Site::start(site_cfg)
        .await
        .map_err(|e| anyhow::anyhow!("start site emulators: {e}"))?;

    // The curtailment driver: firmware clients + the proxy's park actuator.
    let mut firmware = FleetActuator::new(Duration::from_secs(3));
    let mut telemetry = FleetActuator::new(Duration::from_secs(3));
    let proxy_act = ProxyActuator::new(proxy.ctx.router.clone(), site_handle.parks.clone());
    let mut idle_on_park = HashMap::new();
    let mut specs = Vec::new();
    for m in site.miners() {
        let id = MinerId(m.index as u64);
        let s = surface(m.firmware);
        let ep = MinerEndpoint::new(s, m.addr()).with_credentials("root", m.password.clone());
        firmware.insert(id, &ep);
        telemetry.insert(id, &ep);
        proxy_act.insert(id, m.worker.clone());
        let c = m.config;
        let mut spec = MinerSpec::new(id, m.model, c.nominal_ths, c.nominal_w, s);
        spec.ramp = Ramp {
            sleep_latency: c.scaled(c.sleep_time),
            wake_latency: c.scaled(c.wake_time),
            limit_latency: c.scaled(c.limit_time),
            min_power_w: c.min_power_w,
            sleep_w: c.sleep_w,
            parked_w: c.nominal_w,
        };
        if m.firmware == Firmware::Stock {
            spec.ramp.parked_w = c.sleep_w;
            idle_on_park.insert(id, m.emulator.miner().clone());
        }
        specs.push(spec);
    }
    let fleet = Fleet::from_specs(specs).map_err(|e| anyhow::anyhow!("fleet: {e}"))?;
    let nominal_kw = fleet.nominal_kw();
    let policy = PolicyConfig {
        economics: Some(Economics {
            hashprice_usd_per_ph_day: 55.0,
            pool_fee: 0.02,
            pue: 1.0,
            hysteresis_usd_per_mwh: 4.0,
        }),
        min_on: Duration::from_secs(8),
        min_off: Duration::from_secs(8),
        max_commands_per_sec: 200,
        restore_batch: (opts.miners as u32 / 8).max(10),
        restore_interval: Duration::from_secs(2),
        staleness: Staleness {
            price: Some(Freshness {
                max_age: Duration::from_secs(600),
                on_stale: SafeState::KeepRunning,
            }),
            ..Staleness::NONE
        },
        ack_timeout: Duration::from_secs(6),
        verify_grace: Duration::from_secs(10),
        retry_backoff: Duration::from_secs(5),
        dr_lead_margin: Duration::from_secs(2),
        resume_hold: Duration::from_secs(5),
        ..PolicyConfig::default()
    };
    let ledger = match &opts.ledger {
        Some(p) => p.clone(),
        None => std::env::temp_dir().join(format!(
            "gridproxy-demo-{}-{}.sqlite",
            std::process::id(),
            crate::site::handle::now_ms()
        )),
    };
    site_handle.set_ledger(ledger.clone().into());
    let tracker = Arc::new(CommandLog::default());
    let dcfg = DriverConfig {
        poll_interval: Duration::from_secs(2),
        poll_concurrency: 64,
        actuator_concurrency: 128,
        interval: Duration::from_secs(10),
        drain_timeout: Duration::from_secs(3),
        commit_hook: Some(hook(
            tracker.clone(),
            site_handle.clone(),
            Some(server.metrics.latency_sink()),
            Arc::default(),
            false,
        )),
        ..DriverConfig::default()
    };
    let drv = driver::spawn(
        &ledger,
        policy,
        fleet,
        Edge {
            actuator: Route {
                firmware,
                proxy: SiteProxyActuator {
                    proxy: proxy_act.clone(),
                    idle_on_park,
                },
            },
            telemetry,
            clock: SystemClock,
        },
        dcfg,
    )
    .await
    .map_err(|e| anyhow::anyhow!("curtailment driver: {e}"))?;

    site_handle.log.push(
        "demo",
        format!(
            "site up: {} miners ({}), {:.0} kW nameplate; pools pool-a/pool-b split 3:1",
            site.len(),
            counts(opts.miners)
                .iter()
                .map(|(f, n)| format!("{n} {}", f.as_str()))
                .collect::<Vec<_>>()
                .join(", "),
            nominal_kw
        ),
    );

    if opts.print {
        println!(
            "gridproxy demo: {} simulated miners of mixed models and firmwares on loopback",
            site.len()
        );
        println!(
            "  dashboard:      http://{}/  (token: {operate_token}; paste it into the page)",
            server.addr
        );
        println!(
            "  control API:    http://{}/api/v1/  (OpenAPI: /api/v1/openapi.json)",
            server.addr
        );
        println!("  metrics:        http://{}/metrics", server.addr);
        println!("  operate token:  {operate_token}");
        println!("  read token:     {read_token}");
        println!(
            "  SV1 miners ->   {sv1_addr}   (pools: pool-a {} weight 3, pool-b {} weight 1)",
            pools[0].addr(),
            pools[1].addr()
        );
        println!("  ledger:         {}", ledger.display());
        let st = opts.step.as_secs_f64();
        println!(
            "  price trace:    one 5-minute interval every {st:.1} s; {}-interval cycle:",
            trace().len()
        );
        println!(
            "                  quiet 0-{:.0} s, price rise to {:.0} s, spike to $2,400/MWh to {:.0} s, recovery to {:.0} s, DR event (limit 55% of nameplate) {:.0}-{:.0} s",
            6.0 * st, 10.0 * st, 14.0 * st, 20.0 * st, 21.0 * st, 29.0 * st
        );
        println!(
            "  status:         gridproxy status --api {} --token {read_token}",
            server.addr
        );
        match opts.duration {
            Some(d) => println!("  stopping after {} s (or Ctrl-C)", d.as_secs()),
            None => println!("  Ctrl-C to stop"),
        }
    }

    let _ = pools_guard.disarm();
    let demo_stop = stop.clone();
    let api_addr = server.addr;
    let task_site_handle = site_handle.clone();
    let ctx = proxy.ctx.clone();
    let proxy_handle = proxy.clone();
    let live = server.live.clone();
    let task = tokio::spawn(async move {
        let ops = tokio::spawn(operator_commands(
            site_handle_commands(&task_site_handle),
            drv.signals(),
            task_site_handle.clone(),
            {
                let power = site_power(&site);
                move || power.kw()
            },
            demo_stop.clone(),
        ));
        let replay = tokio::spawn(replay(
            drv.signals(),
            task_site_handle.clone(),
            nominal_kw,
            opts.step,
            demo_stop.clone(),
        ));
        // The site view comes from the driver's status, as in `gridproxy run`.
        let inventory: Vec<MinerInfo> = site
            .miners()
            .iter()
            .map(|m| MinerInfo {
                id: MinerId(m.index as u64),
                key: m.worker.clone(),
                model: m.model.to_string(),
                firmware: m.firmware.as_str().to_string(),
            })
            .collect();
        let publisher = view::spawn_publisher(
            task_site_handle.clone(),
            drv.watch(),
            Arc::new(inventory),
            nominal_kw,
            view::Feeds::default(),
            Duration::from_secs(1),
            demo_stop.clone(),
        );
        let deadline = opts.duration.map(|d| tokio::time::Instant::now() + d);
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_status = Instant::now();
        let tty = std::io::stdout().is_terminal();
        let mut kw_range = (f64::INFINITY, 0.0f64);
        let mut report = DemoReport {
            miners: site.len(),
            nominal_kw,
            ledger: ledger.clone(),
            ..Default::default()
        };
        loop {
            tokio::select! {
                _ = demo_stop.cancelled() => break,
                _ = async { match deadline { Some(d) => tokio::time::sleep_until(d).await, None => std::future::pending().await } } => break,
                _ = tick.tick() => {}
            }
            tracker.flush_commands(&task_site_handle);
            // The report's range is the emulators' own draw (ground truth).
            let site_kw = site.power_w() / 1000.0;
            if t0.elapsed() > Duration::from_secs(3) {
                kw_range = (kw_range.0.min(site_kw), kw_range.1.max(site_kw));
            }
            if opts.print
                && !opts.status_every.is_zero()
                && last_status.elapsed() >= opts.status_every
            {
                last_status = Instant::now();
                let line = status_line(
                    t0.elapsed(),
                    &ctx,
                    &task_site_handle.state(),
                    live.last().map(|p| p.hashrate_hs).unwrap_or(0.0),
                );
                if tty {
                    print!("\r\x1b[2K{line}");
                    let _ = std::io::Write::flush(&mut std::io::stdout());
                } else if last_status.duration_since(t0).as_secs() % 10
                    < opts.status_every.as_secs().max(1)
                {
                    println!("{line}");
                }
            }
        }
        if opts.print && tty {
            println!();
        }
        demo_stop.cancel();
        site.stop();
        let _ = ops.await;
        let _ = publisher.await;
        if let Ok(n) = replay.await {
            report.intervals = n.0;
            report.dr_events = n.1;
        }
        match drv.shutdown().await {
            Ok(r) => {
                report.commands = CommandCounts {
                    issued: r.status.issued,
                    verified: r.status.verified,
                    failed: r.status.failed,
                }
            }
            Err(e) => warn!(error = %e, "curtailment driver stopped with an error"),
        }
        for w in ctx.registry.snapshot() {
            report.proxy_accepted += w.accepted;
            report.proxy_rejected += w.rejected.iter().map(|(_, n)| n).sum::<u64>();
        }
        for p in &pools {
            report.pool_accepted += p.stats().accepted.get();
            report.pool_rejected += p.stats().rejected_total();
            for r in PoolReject::ALL {
                let n = p.stats().rejected(r);
                if n > 0 {
                    *report.pool_rejects.entry(r.as_str()).or_default() += n;
                }
            }
            report.pool_invalid += [PoolReject::Invalid, PoolReject::LowDifficulty]
                .iter()
                .map(|r| p.stats().rejected(*r))
                .sum::<u64>();
        }
        proxy_handle.shutdown(Duration::from_secs(5)).await;
        pools_stop.cancel();
        drop(site);
        tokio::time::sleep(Duration::from_millis(200)).await;
        report.site_kw_range = if kw_range.0.is_finite() {
            kw_range
        } else {
            (0.0, 0.0)
        };
        report.seconds = t0.elapsed().as_secs_f64();
        Ok(report)
    });
    Ok(Demo {
        api_addr,
        sv1_addr,
        operate_token,
        read_token,
        proxy,
        site_handle,
        stop,
        task,
    })
}

fn site_handle_commands(h: &SiteHandle) -> tokio::sync::mpsc::Receiver<SiteCommand> {
    h.attach(64)
}

/// Live site power, readable from another task.
struct SitePower(Vec<SimMiner>);

impl SitePower {
    fn kw(&self) -> f64 {
        self.0.iter().map(|m| m.sample().power_w).sum::<f64>() / 1000.0
    }
}

fn site_power(site: &Site) -> SitePower {
    SitePower(
        site.miners()
            .iter()
            .map(|m| m.emulator.miner().clone())
            .collect(),
    )
}

/// Replay the trace; returns (intervals, DR events).
async fn replay(
    signals: tokio::sync::mpsc::Sender<Signal>,
    site: Arc<SiteHandle>,
    nominal_kw: f64,
    step: Duration,
    stop: CancellationToken,
) -> (u64, u64) {
    let steps = trace();
    if steps.is_empty() {
        return (0, 0);
    }
    let mut tick = tokio::time::interval(step);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (mut n, mut events) = (0u64, 0u64);
    let mut last_price = f64::NAN;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return (n, events),
            _ = tick.tick() => {}
        }
        let k = (n as usize) % steps.len();
        let s = &steps[k];
        let now = SystemClock.now();
        if (s.price - last_price).abs() > 0.5 || k == 0 {
            site.log
                .push("price", format!("interval {}: ${:.0}/MWh", n + 1, s.price));
        }
        last_price = s.price;
        let sig = Signal::Price(PriceSignal {
            at: now,
            usd_per_mwh: s.price,
            forecast: vec![],
        });
        if signals.send(sig).await.is_err() {
            return (n, events);
        }
        if let Some((frac, start_after, len)) = s.dr {
            events += 1;
            let start = now + step * start_after;
            let end = start + step * len;
            let limit = (nominal_kw * frac).round();
            let ev = DrEvent {
                id: format!("dr-{events}"),
                target: DrTarget::LimitKw(limit),
                start,
                end: Some(end),
                issued_at: now,
            };
            site.log.push(
                "dr_event",
                format!(
                    "utility issued {}: limit site to {limit:.0} kW from {} for {:.0} s",
                    ev.id,
                    fmt_ts(start),
                    (end - start).as_secs_f64()
                ),
            );
            if signals.send(Signal::DrEvent(ev)).await.is_err() {
                return (n, events);
            }
        }
        n += 1;
    }
}

fn fmt_ts(t: Timestamp) -> String {
    let s = t.as_millis() / 1000;
    format!(
        "{:02}:{:02}:{:02} UTC",
        (s / 3600) % 24,
        (s / 60) % 60,
        s % 60
    )
}

fn status_line(
    elapsed: Duration,
    ctx: &gridproxy_proxy::downstream::Ctx,
    s: &SiteState,
    hs: f64,
) -> String {
    let shares = ctx.router.shares();
    let total: usize = shares.iter().map(|p| p.miners).sum::<usize>().max(1);
    let split: Vec<String> = ctx
        .router
        .pools()
        .iter()
        .zip(&shares)
        .map(|(p, s)| {
            format!(
                "{} {:.0}%",
                p.stats.name,
                100.0 * s.miners as f64 / total as f64
            )
        })
        .collect();
    let (mut acc, mut rej) = (0u64, 0u64);
    for w in ctx.registry.snapshot() {
        acc += w.accepted;
        rej += w.rejected.iter().map(|(_, n)| n).sum::<u64>();
    }
    format!(
        "[{:>4}s] miners {:>4} | {} | site {:>5.0} kW cap {} | ${:.0}/MWh {} | curtailed {}/{} | {} | shares {} ok {} rej | cmds {}",
        elapsed.as_secs(),
        ctx.slots_in_use(),
        crate::api::client::si(hs, "H/s"),
        s.site_kw,
        s.target_kw.map(|k| format!("{k:.0}")).unwrap_or_else(|| "–".into()),
        s.price_usd_per_mwh.unwrap_or(0.0),
        s.mode,
        s.miners_curtailed,
        s.miners_total,
        split.join(" "),
        acc,
        rej,
        s.commands.issued
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trace_has_a_spike_and_a_dr_event() {
        let t = trace();
        assert!(t.len() >= 20, "{}", t.len());
        assert!(t.iter().any(|s| s.price >= 1000.0));
        assert_eq!(t.iter().filter(|s| s.dr.is_some()).count(), 1);
    }

    #[test]
    fn fleet_mix_adds_up() {
        for n in [1, 7, 60, 500, 1001] {
            let c = counts(n);
            assert_eq!(c.iter().map(|(_, k)| k).sum::<usize>(), n);
        }
        assert_eq!(counts(500).len(), 5);
    }
}
