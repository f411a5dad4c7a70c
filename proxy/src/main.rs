//! `gridproxy` command line.

use clap::{Parser, Subcommand};
use gridproxy::config::Config;
use gridproxy::proxy::Proxy;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "gridproxy",
    version,
    about = "Stratum V1/V2 mining proxy that turns a mining site into a grid asset"
)]
struct Cli {
    /// Log as JSON lines instead of readable text.
    #[arg(long, global = true)]
    log_json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the proxy with a TOML config.
    Run {
        /// Config file.
        #[arg(long, short)]
        config: PathBuf,
        /// Print a status line every N seconds (0 = never).
        #[arg(long, default_value_t = 10)]
        status_every: u64,
    },
    /// Validate a config file and exit (0 = valid).
    CheckConfig {
        /// Config file.
        config: PathBuf,
    },
}

fn init_logs(json: bool) {
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        b.json().init();
    } else {
        b.init();
    }
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    init_logs(cli.log_json);
    match cli.cmd {
        Cmd::CheckConfig { config } => match Config::load(&config) {
            Ok(c) => {
                println!("{}: ok ({} pools)", config.display(), c.pools.len());
                std::process::ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                std::process::ExitCode::from(2)
            }
        },
        Cmd::Run {
            config,
            status_every,
        } => {
            let cfg = match Config::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("error: {e}");
                    return std::process::ExitCode::from(2);
                }
            };
            let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
            match rt.block_on(run(cfg, status_every)) {
                Ok(()) => std::process::ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    std::process::ExitCode::FAILURE
                }
            }
        }
    }
}

async fn run(cfg: Config, status_every: u64) -> anyhow::Result<()> {
    let proxy = Proxy::start(cfg).await?;
    if let Some(a) = proxy.sv1_addr {
        println!("gridproxy: SV1 miners -> {a}");
    }
    if let Some(a) = proxy.sv2_addr {
        println!("gridproxy: SV2 miners -> {a}");
    }
    let mut tick = tokio::time::interval(Duration::from_secs(status_every.max(1)));
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = tick.tick() => {
                if status_every > 0 {
                    println!("{}", gridproxy::proxy::status_line(&proxy));
                }
            }
        }
    }
    proxy.shutdown.cancel();
    tokio::time::sleep(Duration::from_millis(200)).await;
    Ok(())
}
