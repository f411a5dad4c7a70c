//! `gridproxy` command line.

use clap::{Args, Parser, Subcommand};
use gridproxy::api::client;
#[cfg(feature = "sim")]
use gridproxy::backtest;
use gridproxy::cli::{self, exit, LogFormat};
use gridproxy::config::Config;
#[cfg(feature = "sim")]
use gridproxy::demo::{self, DemoOptions};
use gridproxy::{App, AppOptions};
use gridproxy_curtail::mv::{Baseline, MvConfig};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "gridproxy",
    version,
    about = "Stratum V1/V2 mining proxy that turns a mining site into a grid asset",
    after_help = cli::AFTER_HELP
)]
struct Cli {
    /// Log level or filter: error, warn, info, debug, trace, or a tracing
    /// filter such as `gridproxy=debug,info` [default: $RUST_LOG, else info;
    /// warn for demo and status].
    #[arg(long, global = true, value_name = "FILTER")]
    log_level: Option<String>,
    /// Log format on standard error.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Same as --log-format json (older spelling).
    #[arg(long, global = true, hide = true)]
    log_json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

/// The config file option every command that reads one shares.
#[derive(Args)]
struct ConfigArg {
    /// Config file [default: $GRIDPROXY_CONFIG, else /etc/gridproxy/gridproxy.toml].
    #[arg(long, short)]
    config: Option<PathBuf>,
}

impl ConfigArg {
    /// The config path, or `None` when none is given and the default is absent.
    fn resolve(self) -> Option<PathBuf> {
        cli::config_path(
            self.config,
            std::env::var_os(cli::CONFIG_ENV),
            std::path::Path::new(cli::DEFAULT_CONFIG),
        )
        .map(|(p, _)| p)
    }

    /// The config path, or the exit-2 error naming every place looked at.
    fn required(self) -> Result<PathBuf, ExitCode> {
        self.resolve().ok_or_else(|| {
            eprintln!("error: {}", cli::no_config_error());
            ExitCode::from(exit::USAGE)
        })
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the proxy with a TOML config.
    Run {
        #[command(flatten)]
        config: ConfigArg,
        /// Print a status line on standard output every N seconds (0 = never)
        /// [default: 10 on a terminal, else never].
        #[arg(long)]
        status_every: Option<u64>,
    },
    /// Find miners on address ranges (the firmware ports 4028, 80, 50051 of
    /// each address) and write `[[site.miners]]` entries for them.
    Discover {
        /// Ranges: CIDR (`192.168.1.0/24`, `fd00::/120`) or single addresses.
        #[arg(required = true)]
        ranges: Vec<String>,
        /// Write the entries to this file (default: standard output).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Hosts probed at once (1..=1024).
        #[arg(long, default_value_t = gridproxy::discover::scan::DEFAULT_CONCURRENCY)]
        concurrency: usize,
        /// Per-host deadline, milliseconds.
        #[arg(long, default_value_t = 3000)]
        timeout_ms: u64,
        /// Sweep more than 65536 addresses (up to a /8).
        #[arg(long)]
        force: bool,
        /// Environment variable holding the Braiins OS `root` password, to
        /// read model and sticker hashrate (never written out).
        #[arg(long)]
        braiins_password_env: Option<String>,
    },
    /// Validate a config file and exit (0 = valid, 2 = invalid).
    CheckConfig {
        /// Config file (same as --config).
        #[arg(conflicts_with = "config")]
        path: Option<PathBuf>,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Run a whole simulated site on loopback: two validating pools, the
    /// proxy, ~500 simulated miners of mixed models and firmwares, a replayed
    /// price trace with a spike and a DR event driving curtailment, and the
    /// dashboard.
    #[cfg(feature = "sim")]
    Demo {
        /// Simulated miners.
        #[arg(long, default_value_t = 500)]
        miners: usize,
        /// Stop after this many seconds (default: run until Ctrl-C).
        #[arg(long)]
        duration: Option<u64>,
        /// Dashboard / control API address (another free port is used if busy).
        #[arg(long, default_value = "127.0.0.1:8080")]
        api: SocketAddr,
        /// SV1 listener for miners (port 0: any free port).
        #[arg(long, default_value = "127.0.0.1:0")]
        sv1: SocketAddr,
        /// Real seconds per 5-minute price interval of the trace.
        #[arg(long, default_value_t = 5.0)]
        step_secs: f64,
        /// Simulated SV1 hashrate per TH/s of modelled hashrate (real sha256d, H/s).
        #[arg(long, default_value_t = 2.0)]
        hs_per_ths: f64,
        /// Curtailment ledger (SQLite); default: a fresh file in the temp directory.
        #[arg(long)]
        ledger: Option<PathBuf>,
        /// Print the status line every N seconds (0 = never).
        #[arg(long, default_value_t = 2)]
        status_every: u64,
    },
    /// Print a running gridproxy's fleet summary through its control API.
    Status {
        /// Control API address (default: api.listen of the config, else 127.0.0.1:8080).
        #[arg(long)]
        api: Option<SocketAddr>,
        /// The config to take the API address (and TLS certificate) from.
        #[command(flatten)]
        config: ConfigArg,
        /// Bearer token (read role is enough); default: $GRIDPROXY_TOKEN.
        #[arg(long)]
        token: Option<String>,
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
    },
    /// Replay a price trace (and its DR events) through the curtailment
    /// engine on a virtual clock with ideal actuators; compare profit with
    /// running always-on and with a perfect-foresight oracle.
    #[cfg(feature = "sim")]
    Backtest {
        /// ERCOT RTM settlement-point price CSV (e.g. fixtures/traces/*.csv).
        #[arg(long)]
        prices: Option<PathBuf>,
        /// Settlement point to take from --prices.
        #[arg(long, default_value = "HB_HOUSTON")]
        point: String,
        /// Fleet file (TOML: economics and [[miners]] model, count, ths, watts).
        #[arg(long)]
        fleet: Option<PathBuf>,
        /// Demo-format trace: one line per interval, `price_usd_per_mwh[,dr:FRACTION:START:LEN]`
        /// (default when no --prices: the demo's trace).
        #[arg(long, conflicts_with = "prices")]
        trace: Option<PathBuf>,
        /// Seconds per demo-format trace line.
        #[arg(long, default_value_t = 300)]
        interval_secs: u64,
        /// Miners of the demo site's mix (without --fleet).
        #[arg(long, default_value_t = 500)]
        miners: usize,
        /// Hashprice, $/PH/s/day (default: the fleet file's, else 55).
        #[arg(long)]
        hashprice: Option<f64>,
        /// Pool fee, 0..1 (default: the fleet file's, else 0.02).
        #[arg(long)]
        pool_fee: Option<f64>,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Summarise a curtailment ledger (SQLite or PostgreSQL, as written by
    /// the driver):
    /// commands and acknowledgements, DR events and the measured draw
    /// during them, energy; and M&V of the curtailment (baseline vs
    /// measured kW, curtailed MWh, avoided cost, revenue forgone).
    Report {
        /// Ledger: a SQLite file (the demo prints its path) or a PostgreSQL
        /// URL without password (the password from
        /// GRIDPROXY_LEDGER_PASSWORD).
        #[arg(long)]
        ledger: String,
        /// Output: text (summary + M&V totals), csv or json (M&V per interval).
        #[arg(long, default_value = "text", value_parser = ["text", "csv", "json"])]
        format: String,
        /// M&V baseline: prior-hour, 10-of-10 or fixed:KW.
        #[arg(long, default_value = "prior-hour")]
        baseline: String,
        /// M&V reporting interval, seconds.
        #[arg(long, default_value_t = 300)]
        interval_secs: u64,
        /// Efficiency of the curtailed fleet, J/TH (hashrate lost per kW).
        #[arg(long, default_value_t = 25.0)]
        j_per_th: f64,
        /// Hashprice, $/PH/s/day, until the ledger has a hashprice signal.
        #[arg(long, default_value_t = 55.0)]
        hashprice: f64,
        /// Pool fee, 0..1.
        #[arg(long, default_value_t = 0.02)]
        pool_fee: f64,
        /// Write to this file instead of standard output.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

fn load(path: &std::path::Path) -> Result<Config, String> {
    Config::load(path).map_err(|e| e.to_string())
}

/// `gridproxy discover`: sweep, print what was found, write the entries.
fn discover(
    ranges: &[String],
    out: Option<PathBuf>,
    concurrency: usize,
    timeout_ms: u64,
    force: bool,
    braiins_password_env: Option<String>,
) -> ExitCode {
    use gridproxy::discover::{self, write};
    let r = match discover::Ranges::parse(ranges, force) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    if !(1..=discover::scan::MAX_CONCURRENCY).contains(&concurrency) {
        eprintln!(
            "error: --concurrency must be 1..={}",
            discover::scan::MAX_CONCURRENCY
        );
        return ExitCode::from(2);
    }
    if !(100..=60_000).contains(&timeout_ms) {
        eprintln!("error: --timeout-ms must be 100..=60000");
        return ExitCode::from(2);
    }
    let braiins_password = match braiins_password_env {
        None => None,
        Some(var) => match std::env::var(&var) {
            Ok(p) => Some(p),
            Err(_) => {
                eprintln!("error: --braiins-password-env: {var} is not set");
                return ExitCode::from(2);
            }
        },
    };
    let opts = discover::Options {
        concurrency,
        timeout: Duration::from_millis(timeout_ms),
        braiins_password,
        progress: true,
    };
    let outcome = runtime().block_on(discover::run(&r, &opts));
    let header = format!(
        "gridproxy discover {}: {} miners on {} addresses, {:.1} s",
        ranges.join(" "),
        outcome.found.len(),
        outcome.probed,
        outcome.elapsed.as_secs_f64()
    );
    let text = write::entries(&outcome.found, &header);
    let mut todo = 0;
    for f in &outcome.found {
        todo += write::todos(f);
        eprintln!(
            "  {:<39} {:<10} {:<22} {:>9} {:>8}",
            f.ip.to_string(),
            f.firmware.as_str(),
            f.model.as_deref().unwrap_or("?"),
            f.ths.map_or("? TH/s".into(), |t| format!("{t:.1} TH/s")),
            f.watts.map_or("? W".into(), |w| format!("{w:.0} W")),
        );
    }
    match out {
        Some(path) => {
            if let Err(e) = std::fs::write(&path, &text) {
                eprintln!("error: cannot write {}: {e}", path.display());
                return ExitCode::FAILURE;
            }
            eprintln!(
                "wrote {} entries to {} ({todo} values marked TODO)",
                outcome.found.len(),
                path.display()
            );
        }
        None => print!("{text}"),
    }
    ExitCode::SUCCESS
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let quiet_default = match cli.cmd {
        #[cfg(feature = "sim")]
        Cmd::Demo { .. } => true,
        Cmd::Status { .. } | Cmd::Discover { .. } => true,
        _ => false,
    };
    let filter = cli::log_filter(
        cli.log_level.as_deref(),
        std::env::var("RUST_LOG").ok().as_deref(),
        if quiet_default { "warn" } else { "info" },
    );
    match filter {
        Ok(f) => cli::init_logs(
            f,
            if cli.log_json {
                LogFormat::Json
            } else {
                cli.log_format
            },
        ),
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(exit::USAGE);
        }
    }
    match cli.cmd {
        Cmd::Discover {
            ranges,
            out,
            concurrency,
            timeout_ms,
            force,
            braiins_password_env,
        } => discover(
            &ranges,
            out,
            concurrency,
            timeout_ms,
            force,
            braiins_password_env,
        ),
        Cmd::CheckConfig { path, config } => {
            let config = match path.or_else(|| config.resolve()) {
                Some(p) => p,
                None => {
                    eprintln!("error: {}", cli::no_config_error());
                    return ExitCode::from(exit::USAGE);
                }
            };
            match load(&config).and_then(|c| c.api.check_token_files().map(|()| c)) {
                Ok(c) => {
                    println!(
                        "{}: ok ({} pools{}{})",
                        config.display(),
                        c.pools.len(),
                        match c.api.listen {
                            Some(a) => format!(", control API on {a}"),
                            None => String::new(),
                        },
                        match &c.site {
                            Some(s) => format!(", site with {} miners", s.miners.len()),
                            None => String::new(),
                        }
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(exit::USAGE)
                }
            }
        }
        Cmd::Run {
            config,
            status_every,
        } => {
            let config = match config.required() {
                Ok(p) => p,
                Err(code) => return code,
            };
            let status_every = {
                use std::io::IsTerminal;
                cli::status_interval(status_every, std::io::stdout().is_terminal())
            };
            let cfg = match load(&config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(exit::USAGE);
                }
            };
            match runtime().block_on(run(cfg, config, status_every)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        #[cfg(feature = "sim")]
        Cmd::Demo {
            miners,
            duration,
            api,
            sv1,
            step_secs,
            hs_per_ths,
            ledger,
            status_every,
        } => {
            let opts = DemoOptions {
                miners,
                duration: duration.map(Duration::from_secs),
                api_listen: api,
                sv1_listen: sv1,
                step: Duration::from_secs_f64(step_secs.clamp(0.2, 3600.0)),
                hs_per_ths,
                ledger,
                status_every: Duration::from_secs(status_every),
                print: true,
                ..DemoOptions::default()
            };
            let rt = runtime();
            let r = rt.block_on(async move {
                let stop = tokio_util::sync::CancellationToken::new();
                let s = stop.clone();
                tokio::spawn(async move {
                    if tokio::signal::ctrl_c().await.is_ok() {
                        eprintln!("\ngridproxy demo: Ctrl-C, stopping…");
                        s.cancel();
                    }
                });
                demo::run(opts, stop).await
            });
            rt.shutdown_timeout(Duration::from_secs(2));
            match r {
                Ok(report) => {
                    println!("{}", report.summary());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Cmd::Status {
            api,
            config,
            token,
            json,
        } => {
            let token = token.or_else(|| std::env::var("GRIDPROXY_TOKEN").ok());
            // Only needed without --api; a missing default file is fine.
            let config = if api.is_none() {
                config.resolve()
            } else {
                None
            };
            runtime().block_on(status(api, config, token, json))
        }
        #[cfg(feature = "sim")]
        Cmd::Backtest {
            prices,
            point,
            fleet,
            trace,
            interval_secs,
            miners,
            hashprice,
            pool_fee,
            json,
        } => match backtest_cmd(
            prices,
            point,
            fleet,
            trace,
            interval_secs,
            miners,
            hashprice,
            pool_fee,
        ) {
            Ok(r) => {
                if json {
                    println!("{}", serde_json::to_string_pretty(&r).unwrap_or_default());
                } else {
                    print!("{}", r.text());
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::from(exit::USAGE)
            }
        },
        Cmd::Report {
            ledger,
            format,
            baseline,
            interval_secs,
            j_per_th,
            hashprice,
            pool_fee,
            out,
        } => {
            let mv = match Baseline::parse(&baseline) {
                Ok(b) => MvConfig {
                    baseline: b,
                    interval: Duration::from_secs(interval_secs.max(1)),
                    hashprice_usd_per_ph_day: hashprice,
                    pool_fee,
                    j_per_th,
                    ..MvConfig::default()
                },
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(exit::USAGE);
                }
            };
            let loc = match gridproxy_curtail::ledger::Location::parse(&ledger) {
                Ok(l) => l.with_password(
                    std::env::var(gridproxy::site::config::LEDGER_PASSWORD_ENV).ok(),
                ),
                Err(e) => {
                    eprintln!("error: --ledger: {e}");
                    return ExitCode::from(exit::USAGE);
                }
            };
            let text = report(&loc).and_then(|summary| {
                let input =
                    gridproxy_curtail::ledger::read_mv_input(&loc).map_err(|e| e.to_string())?;
                let r = gridproxy_curtail::mv::compute(&input, &mv);
                Ok(match format.as_str() {
                    "csv" => r.to_csv(),
                    "json" => r.to_json() + "\n",
                    _ => summary + &r.text(),
                })
            });
            let written = text.and_then(|t| match &out {
                Some(p) => std::fs::write(p, t).map_err(|e| format!("{}: {e}", p.display())),
                None => {
                    print!("{t}");
                    Ok(())
                }
            });
            match written {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {loc}: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

async fn run(cfg: Config, path: PathBuf, status_every: u64) -> anyhow::Result<()> {
    let opts = AppOptions {
        config_path: Some(path),
        sighup: true,
    };
    let app = App::start(cfg, opts).await?;
    for line in &app.started {
        println!("gridproxy: {line}");
    }
    gridproxy::service::ready(&format!("running: {}", app.started.join("; ")));
    gridproxy::service::spawn_watchdog(app.proxy.stop.clone());
    // Without status lines the tick still runs (rarely) so the loop is one shape.
    let mut tick = tokio::time::interval(Duration::from_secs(if status_every == 0 {
        3600
    } else {
        status_every
    }));
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| anyhow::anyhow!("SIGTERM handler: {e}"))?;
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
            _ = tick.tick() => {
                if status_every > 0 {
                    println!("{}", gridproxy_proxy::proxy::status_line(&app.proxy));
                }
            }
        }
    }
    gridproxy::service::stopping();
    // Drain: listeners closed (a new process may hold the ports), miners
    // told to reconnect, the pools' answers awaited; a second SIGTERM or
    // Ctrl-C stops at once.
    let grace = app.proxy.ctx.cfg().limits.drain();
    let stop = app.proxy.stop.clone();
    let hurry = tokio::spawn(async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        eprintln!("gridproxy: second stop signal: stopping now");
        stop.cancel();
    });
    println!(
        "gridproxy: draining (up to {} s): miners told to reconnect",
        grace.as_secs()
    );
    if let Some(s) = &app.site {
        println!(
            "gridproxy: stopping the curtailment engine after the drain (ledger {})",
            s.ledger()
        );
    }
    let proxy = app.proxy.clone();
    let report = app.drain(grace).await;
    hurry.abort();
    // The final counts per pool, for whoever adds up a restart (the API is
    // closed by now). Not a status line: those are for terminals only.
    let pools: Vec<String> = proxy
        .ctx
        .router
        .pools()
        .iter()
        .map(|h| {
            format!(
                "{}: sent={} acked={} rejected={}",
                h.stats.name,
                h.stats.submitted.get(),
                h.stats.accepted.get(),
                h.stats.rejected.get()
            )
        })
        .collect();
    println!(
        "gridproxy: drained ({}): {}",
        if report.complete {
            "complete"
        } else {
            "incomplete"
        },
        pools.join(" | ")
    );
    if !report.complete {
        tracing::warn!(
            miners_cut = report.miners_cut,
            sessions_left = report.sessions_left,
            upstreams_left = report.upstreams_left,
            unanswered = report.unanswered,
            "drain cut short: shares forwarded to a pool may be unanswered"
        );
    }
    Ok(())
}

async fn status(
    api: Option<SocketAddr>,
    config: Option<PathBuf>,
    token: Option<String>,
    json: bool,
) -> ExitCode {
    let mut tls = None;
    let addr = match (api, &config) {
        (Some(a), _) => a,
        (None, Some(p)) => match load(p) {
            Ok(c) => {
                // An HTTPS API: trust its own certificate (self-signed set-ups).
                if let Some(cert) = &c.api.tls_cert {
                    match gridproxy::api::tls::connector(cert) {
                        Ok(t) => tls = Some(t),
                        Err(e) => {
                            eprintln!("error: api.tls_cert: {e}");
                            return ExitCode::from(exit::USAGE);
                        }
                    }
                }
                match c.api.listen {
                    Some(a) => a,
                    None => {
                        eprintln!("error: {}: api.listen is not set", p.display());
                        return ExitCode::from(exit::USAGE);
                    }
                }
            }
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(exit::USAGE);
            }
        },
        (None, None) => "127.0.0.1:8080".parse().expect("literal"),
    };
    let (path, timeout) = ("/api/v1/fleet", Duration::from_secs(5));
    let r = client::request_via(
        addr,
        tls.as_ref(),
        "GET",
        path,
        token.as_deref(),
        None,
        timeout,
    )
    .await;
    let r = match r {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    if r.status != 200 {
        eprintln!(
            "error: {} from {}://{addr}/api/v1/fleet: {}",
            r.status,
            if tls.is_some() { "https" } else { "http" },
            r.text().trim()
        );
        if r.status == 401 {
            eprintln!("hint: pass --token or set GRIDPROXY_TOKEN");
        }
        return ExitCode::FAILURE;
    }
    let v = match r.json() {
        Ok(v) => v,
        Err(e) => {
            eprintln!("error: bad JSON: {e}");
            return ExitCode::FAILURE;
        }
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
    } else {
        print!("{}", client::format_fleet(&v));
    }
    ExitCode::SUCCESS
}

#[cfg(feature = "sim")]
#[allow(clippy::too_many_arguments)]
fn backtest_cmd(
    prices: Option<PathBuf>,
    point: String,
    fleet: Option<PathBuf>,
    trace: Option<PathBuf>,
    interval_secs: u64,
    miners: usize,
    hashprice: Option<f64>,
    pool_fee: Option<f64>,
) -> anyhow::Result<backtest::BacktestReport> {
    let read = |p: &PathBuf| {
        std::fs::read_to_string(p).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))
    };
    let fleet = match &fleet {
        Some(p) => Some(
            backtest::FleetFile::parse(&read(p)?)
                .map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?,
        ),
        None => None,
    };
    let opts = backtest::BacktestOptions {
        prices: prices.as_ref().map(read).transpose()?,
        trace: trace.as_ref().map(read).transpose()?,
        point,
        interval: Duration::from_secs(interval_secs.max(1)),
        miners,
        fleet,
        hashprice,
        pool_fee,
        ..Default::default()
    };
    backtest::backtest(&opts)
}

fn report(loc: &gridproxy_curtail::ledger::Location) -> Result<String, String> {
    use gridproxy_curtail::driver::Audit;
    use std::collections::BTreeMap;
    if loc.path().is_some_and(|p| !p.exists()) {
        return Err("no such file".into());
    }
    let a = Audit::read(loc).map_err(|e| e.to_string())?;
    let mut out = String::new();
    let secs = |t: gridproxy_curtail::time::Timestamp| t.as_millis() as f64 / 1000.0;
    let first = a
        .intervals
        .first()
        .map(|i| i.start)
        .or(a.commands.first().map(|c| c.at));
    let last = a
        .intervals
        .last()
        .map(|i| i.end)
        .or(a.commands.last().map(|c| c.at));
    out.push_str(&format!("ledger {loc}\n"));
    let at = gridproxy_curtail::time::Timestamp::to_rfc3339;
    if let (Some(f), Some(l)) = (first, last) {
        out.push_str(&format!(
            "period: {} .. {} ({:.0} s); {} signals recorded\n",
            at(f),
            at(l),
            secs(l) - secs(f),
            a.signals
        ));
    }
    let mut by: BTreeMap<&str, usize> = BTreeMap::new();
    for c in &a.commands {
        *by.entry(c.action.as_str()).or_default() += 1;
    }
    out.push_str(&format!(
        "commands: {} ({})\n",
        a.commands.len(),
        by.iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    let issued: std::collections::HashMap<u64, f64> =
        a.commands.iter().map(|c| (c.id.0, secs(c.at))).collect();
    let mut lat: Vec<f64> = a
        .acks
        .iter()
        .filter(|k| k.outcome.starts_with("ack_"))
        .filter_map(|k| issued.get(&k.command.0).map(|t| secs(k.at) - t))
        .collect();
    lat.sort_by(f64::total_cmp);
    let mut outcomes: BTreeMap<&str, usize> = BTreeMap::new();
    for k in &a.acks {
        *outcomes.entry(k.outcome.as_str()).or_default() += 1;
    }
    let q = |p: f64| {
        lat.get(((lat.len() as f64 - 1.0) * p).round() as usize)
            .copied()
            .unwrap_or(0.0)
    };
    out.push_str(&format!(
        "outcomes: {}\n",
        outcomes
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    out.push_str(&format!(
        "acknowledgement latency: p50 {:.3} s, p95 {:.3} s, max {:.3} s\n",
        q(0.5),
        q(0.95),
        lat.last().copied().unwrap_or(0.0)
    ));
    let mut notes: BTreeMap<&str, usize> = BTreeMap::new();
    for n in &a.notes {
        *notes.entry(n.kind.as_str()).or_default() += 1;
    }
    if !notes.is_empty() {
        out.push_str(&format!(
            "engine notes: {}\n",
            notes
                .iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    let mwh: f64 = a
        .intervals
        .iter()
        .map(|i| i.fleet_kw * (secs(i.end) - secs(i.start)) / 3600.0 / 1000.0)
        .sum();
    let (lo, hi) = a
        .intervals
        .iter()
        .fold((f64::INFINITY, 0.0f64), |(lo, hi), i| {
            (lo.min(i.fleet_kw), hi.max(i.fleet_kw))
        });
    out.push_str(&format!(
        "measured: {} intervals, {:.3} MWh, fleet {:.0}..{:.0} kW\n",
        a.intervals.len(),
        mwh,
        if lo.is_finite() { lo } else { 0.0 },
        hi
    ));
    // DR events: state changes and the draw while active.
    let mut ids: Vec<&str> = a.events.iter().map(|e| e.event_id.as_str()).collect();
    ids.dedup();
    let mut seen = std::collections::HashSet::new();
    for id in ids {
        if !seen.insert(id) {
            continue;
        }
        let states: Vec<_> = a.events.iter().filter(|e| e.event_id == id).collect();
        let active = states.iter().find(|e| e.state == "active").map(|e| e.at);
        let ended = states.iter().find(|e| e.state == "ended").map(|e| e.at);
        let mut line = format!(
            "event {id}: {}",
            states
                .iter()
                .map(|e| format!("{} at {}", e.state, at(e.at)))
                .collect::<Vec<_>>()
                .join(", ")
        );
        if let Some(from) = active {
            let to = ended.unwrap_or(gridproxy_curtail::time::Timestamp::from_millis(u64::MAX));
            let during: Vec<f64> = a
                .intervals
                .iter()
                .filter(|i| i.start >= from && i.end <= to)
                .map(|i| i.fleet_kw)
                .collect();
            if !during.is_empty() {
                let mean = during.iter().sum::<f64>() / during.len() as f64;
                let max = during.iter().copied().fold(0.0, f64::max);
                line.push_str(&format!(
                    "; while active: mean {mean:.0} kW, max {max:.0} kW over {} intervals",
                    during.len()
                ));
            }
        }
        out.push_str(&line);
        out.push('\n');
    }
    Ok(out)
}
