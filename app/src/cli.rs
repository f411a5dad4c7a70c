//! Conventions every `gridproxy` command shares: where the config comes from,
//! how logs are written, and what the exit code means. Kept out of `main.rs`
//! so they can be tested without running the binary.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// Environment variable naming the config file when `--config` is not given.
pub const CONFIG_ENV: &str = "GRIDPROXY_CONFIG";
/// Config file used when neither `--config` nor [`CONFIG_ENV`] is given
/// (where the Debian package installs it).
pub const DEFAULT_CONFIG: &str = "/etc/gridproxy/gridproxy.toml";

/// Exit codes, the same for every command.
pub mod exit {
    /// Done.
    pub const OK: u8 = 0;
    /// The command was valid but failed while running: a listener or pool
    /// could not be set up, the control API did not answer, a file could not
    /// be read or written.
    pub const FAILURE: u8 = 1;
    /// Bad usage or an invalid config (nothing was started or written).
    pub const USAGE: u8 = 2;
}

/// Text for `--help`: the exit codes and where the config is looked for.
pub const AFTER_HELP: &str = "\
Config: --config PATH, else $GRIDPROXY_CONFIG, else /etc/gridproxy/gridproxy.toml.
Exit codes: 0 done; 1 failed while running (listener, pool, API, file I/O);
2 bad usage or invalid config (nothing started).";

/// Where a config path came from, for messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConfigSource {
    /// `--config` (or `check-config`'s positional path).
    Flag,
    /// [`CONFIG_ENV`].
    Env,
    /// [`DEFAULT_CONFIG`], which exists.
    Default,
}

/// The config file a command reads: `--config`, else `$GRIDPROXY_CONFIG`
/// (when set and not empty), else the default path when that file exists.
/// `None` when none applies.
pub fn config_path(
    flag: Option<PathBuf>,
    env: Option<OsString>,
    default: &Path,
) -> Option<(PathBuf, ConfigSource)> {
    if let Some(p) = flag {
        return Some((p, ConfigSource::Flag));
    }
    if let Some(e) = env.filter(|e| !e.is_empty()) {
        return Some((PathBuf::from(e), ConfigSource::Env));
    }
    default
        .exists()
        .then(|| (default.to_path_buf(), ConfigSource::Default))
}

/// The error when a command needs a config and none was found.
pub fn no_config_error() -> String {
    format!("no config: pass --config PATH, set {CONFIG_ENV}, or create {DEFAULT_CONFIG}")
}

/// Log output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Readable lines (colour only on a terminal).
    Text,
    /// One JSON object per line.
    Json,
}

/// The log filter: `--log-level` wins, then `RUST_LOG`, then the command's
/// default. A filter that does not parse is a usage error, not a silent
/// fallback.
pub fn log_filter(
    flag: Option<&str>,
    env: Option<&str>,
    default: &str,
) -> Result<tracing_subscriber::EnvFilter, String> {
    let (text, from) = match (flag, env) {
        (Some(f), _) => (f, "--log-level"),
        (None, Some(e)) if !e.trim().is_empty() => (e, "RUST_LOG"),
        _ => (default, "default"),
    };
    tracing_subscriber::EnvFilter::try_new(text).map_err(|e| format!("{from} {text:?}: {e}"))
}

/// Install the global log subscriber, writing to standard error. Colour
/// escapes only when standard error is a terminal: a log file or journald
/// must not get them. A log line that cannot be written is lost quietly:
/// by default the subscriber reports that with `eprintln!`, which panics
/// when standard error is the file that cannot grow (a full disk), and
/// took down whichever task was logging (the curtailment driver).
pub fn init_logs(filter: tracing_subscriber::EnvFilter, format: LogFormat) {
    use std::io::IsTerminal;
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .log_internal_errors(false)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Json => b.json().init(),
        LogFormat::Text => b.init(),
    }
}

/// Seconds between `run`'s status lines: as asked, else every 10 s on a
/// terminal and never otherwise (a service's stdout is its log).
pub fn status_interval(flag: Option<u64>, stdout_is_terminal: bool) -> u64 {
    flag.unwrap_or(if stdout_is_terminal { 10 } else { 0 })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_flag_beats_env_beats_default() {
        let dir = std::env::temp_dir().join(format!("gp-cli-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let default = dir.join("gridproxy.toml");
        let missing = dir.join("missing.toml");
        let f = Some(PathBuf::from("a.toml"));
        let e = Some(OsString::from("b.toml"));
        assert_eq!(
            config_path(f.clone(), e.clone(), &missing),
            Some((PathBuf::from("a.toml"), ConfigSource::Flag))
        );
        assert_eq!(
            config_path(None, e, &missing),
            Some((PathBuf::from("b.toml"), ConfigSource::Env))
        );
        // An empty variable counts as unset.
        assert_eq!(config_path(None, Some(OsString::new()), &missing), None);
        assert_eq!(config_path(None, None, &missing), None);
        std::fs::write(&default, "").unwrap();
        assert_eq!(
            config_path(None, None, &default),
            Some((default.clone(), ConfigSource::Default))
        );
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(
            no_config_error().contains(CONFIG_ENV) && no_config_error().contains(DEFAULT_CONFIG)
        );
    }

    #[test]
    fn log_level_flag_beats_rust_log_and_bad_filters_are_errors() {
        assert_eq!(
            log_filter(Some("debug"), Some("warn"), "info")
                .unwrap()
                .to_string(),
            "debug"
        );
        assert_eq!(
            log_filter(None, Some("warn"), "info").unwrap().to_string(),
            "warn"
        );
        assert_eq!(
            log_filter(None, Some(" "), "info").unwrap().to_string(),
            "info"
        );
        let e = log_filter(Some("gridproxy=loud"), None, "info").unwrap_err();
        assert!(e.contains("--log-level") && e.contains("loud"), "{e}");
    }

    #[test]
    fn status_line_only_on_a_terminal_unless_asked() {
        assert_eq!(status_interval(None, true), 10);
        assert_eq!(status_interval(None, false), 0);
        assert_eq!(status_interval(Some(3), false), 3);
        assert_eq!(status_interval(Some(0), true), 0);
    }
}
