//! The configuration file: the engine's tables (`[[pools]]`, `[listen]`,
//! `[limits]`, `[difficulty]`, `[routing]`, `[extranonce]`, `[[accounts]]`), the control
//! API (`[api]`) and the site (`[site]`), with the one loader that reads,
//! parses and validates all of them.
//!
//! Every key has a default except the pool list; unknown keys are refused so
//! a typo does not silently fall back to a default. Every error names the
//! file, the key and, from the parser's spans ([`locate`]), the line, in
//! whatever form TOML allows the key to be written.

pub mod api;
pub mod locate;

use crate::site::config::SiteConfig;
use api::ApiConfig;
use gridproxy_proxy::accounts::AccountConfig;
use gridproxy_proxy::config::{
    DifficultyConfig, ExtranonceConfig, Invalid, Limits, ListenConfig, PoolConfig, RoutingConfig,
};
use gridproxy_proxy::ProxyConfig;
use serde::Deserialize;
use std::path::Path;

/// The whole configuration file. The engine's tables are listed here again
/// (not `#[serde(flatten)]` of a `ProxyConfig`): serde cannot refuse unknown
/// keys through a flattened struct, and a typo must not pass silently.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
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
    /// Accounts: which pool user each group of miners' shares go out under.
    #[serde(default)]
    pub accounts: Vec<AccountConfig>,
    /// Control API, metrics and dashboard.
    #[serde(default)]
    pub api: ApiConfig,
    /// Curtailment engine, miners and grid signal sources; off when absent.
    #[serde(default)]
    pub site: Option<SiteConfig>,
}

/// A config error naming the file, key and line.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Read {
        /// file
        path: String,
        /// io error
        source: std::io::Error,
    },
    /// TOML or type errors (the message carries line and column).
    #[error("{path}: {message}")]
    Parse {
        /// file
        path: String,
        /// parser message
        message: String,
    },
    /// The values parse but do not make sense together.
    #[error("{path}: {key}: {message}{}", line.map(|l| format!(" (line {l})")).unwrap_or_default())]
    Invalid {
        /// file
        path: String,
        /// offending key, as a path (`pools[1].weight`)
        key: String,
        /// where the key (or its nearest written parent) is, 1-based
        line: Option<usize>,
        /// what is wrong
        message: String,
    },
}

impl Config {
    /// Read, parse and validate a config file; relative paths in it (TLS
    /// files, the ledger, secret files) are taken from the file's folder.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let origin = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
            path: origin.clone(),
            source: e,
        })?;
        Self::parse_in(&text, &origin, path.parent())
    }

    /// Parse and validate config text; `origin` names it in errors.
    /// Relative paths stay as written.
    pub fn parse(text: &str, origin: &str) -> Result<Self, ConfigError> {
        Self::parse_in(text, origin, None)
    }

    fn parse_in(text: &str, origin: &str, dir: Option<&Path>) -> Result<Self, ConfigError> {
        let mut cfg: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.to_string(),
            message: e.to_string().trim_end().to_string(),
        })?;
        if let Some(dir) = dir {
            cfg.resolve_paths(dir);
        }
        cfg.validate().map_err(|Invalid { key, message }| {
            let line = locate::line_of_nearest(text, &locate::parse_path(&key));
            ConfigError::Invalid {
                path: origin.to_string(),
                key,
                line,
                message,
            }
        })?;
        Ok(cfg)
    }

    /// Every table's checks; the error names the key.
    pub fn validate(&self) -> Result<(), Invalid> {
        self.proxy().validate()?;
        self.api.validate()?;
        if let Some(site) = &self.site {
            site.validate()?;
        }
        Ok(())
    }

    fn resolve_paths(&mut self, dir: &Path) {
        for p in [
            &mut self.api.tls_cert,
            &mut self.api.tls_key,
            &mut self.listen.sv2_authority_secret_file,
        ]
        .into_iter()
        .flatten()
        {
            if p.is_relative() {
                *p = dir.join(&*p);
            }
        }
        for t in &mut self.api.tokens {
            if let Some(p) = t.token_file.as_mut().filter(|p| p.is_relative()) {
                *p = dir.join(&*p);
            }
        }
        if let Some(site) = &mut self.site {
            site.resolve_paths(dir);
        }
    }

    /// The engine's part.
    pub fn proxy(&self) -> ProxyConfig {
        ProxyConfig {
            pools: self.pools.clone(),
            listen: self.listen.clone(),
            limits: self.limits.clone(),
            difficulty: self.difficulty.clone(),
            routing: self.routing.clone(),
            extranonce: self.extranonce.clone(),
            accounts: self.accounts.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "9auqWEzQDVyd2oe1JVGFLMLHZtCo2FFqZwtKA5gd9xbuEu7PH72";

    fn ok(extra: &str) -> String {
        format!("[[pools]]\nname='a'\naddress='127.0.0.1:1'\nprotocol='sv2'\nauthority_pubkey='{KEY}'\nuser='u'\n{extra}")
    }

    fn err(text: &str) -> String {
        Config::parse(text, "t.toml").unwrap_err().to_string()
    }

    #[test]
    fn minimal_config_parses_with_loopback_defaults() {
        let c = Config::parse(&ok(""), "t.toml").unwrap();
        assert_eq!(c.listen.sv1.unwrap().ip().to_string(), "127.0.0.1");
        assert_eq!(c.extranonce.extranonce2_size, 4);
        assert!(c.site.is_none() && c.api.listen.is_none());
    }

    #[test]
    fn errors_name_the_file_key_and_line() {
        let e = err(&ok("[limits]\nmax_lien = 5\n"));
        assert!(
            e.starts_with("t.toml: ") && e.contains("max_lien") && e.contains("line 8"),
            "{e}"
        );
        let e = err(&ok("\n[extranonce]\nextranonce2_size = 12\n"));
        assert!(
            e.contains("extranonce.extranonce2_size") && e.contains("(line 9)"),
            "{e}"
        );
        let e = err("[[pools]]\nname='a'\naddress='127.0.0.1:1'\nprotocol='sv2'\nuser='u'\n");
        assert!(
            e.contains("pools[0].authority_pubkey") && e.contains("(line 1)"),
            "{e}"
        );
        let e = err(&ok("").replace(KEY, "notakey"));
        assert!(
            e.contains("pools[0].authority_pubkey") && e.contains("(line 5)"),
            "{e}"
        );
        let e = err(&ok("").replace("127.0.0.1:1", "nowhere"));
        assert!(e.contains("address") && e.contains("line 3"), "{e}");
    }

    /// Pool addresses as people write them, and their mistakes with key and line.
    #[test]
    fn pool_addresses_name_key_and_line() {
        let sv1 =
            "[[pools]]\nname='a'\naddress='stratum+tcp://stratum.example.com:3333'\nuser='u'\n";
        let c = Config::parse(sv1, "t.toml").unwrap();
        assert_eq!(c.pools[0].protocol().as_str(), "sv1");
        assert_eq!(c.pools[0].address.endpoint.host, "stratum.example.com");
        let sv2 =
            format!("[[pools]]\nname='a'\naddress='stratum2+tcp://[::1]:3336/{KEY}'\nuser='u'\n");
        let c = Config::parse(&sv2, "t.toml").unwrap();
        assert_eq!(c.pools[0].authority_key().as_deref(), Some(KEY));
        let e = err(&format!("{sv1}protocol = 'sv2'\n"));
        assert!(
            e.contains("pools[0].address")
                && e.contains("(line 3)")
                && e.contains("stratum+tcp://"),
            "{e}"
        );
        let e = err("\n[[pools]]\nname='a'\naddress='pool.example.com:3333'\nuser='u'\n");
        assert!(
            e.contains("pools[0].protocol") && e.contains("(line 2)"),
            "{e}"
        );
        let e = err(&sv1.replace(":3333", ""));
        assert!(e.contains("line 3") && e.contains("needs a port"), "{e}");
    }

    /// The forms a line scan missed: an inline table and dotted keys.
    #[test]
    fn inline_tables_and_dotted_keys_name_the_right_line() {
        let inline = String::from(
            "# pools as an inline array\npools = [\n  { name = 'a', address = '127.0.0.1:1', protocol = 'sv1', user = 'u' },\n  { name = 'b', address = '127.0.0.1:2', protocol = 'sv1', user = 'u', weight = -1.0 },\n]\n",
        );
        let e = err(&inline);
        assert!(
            e.contains("pools[1].weight") && e.contains("(line 4)"),
            "{e}"
        );
        // An inline table: the missing key points at the table's line.
        let e = err(&format!(
            "\nlisten = {{ sv2 = '127.0.0.1:3336' }}\n{}",
            ok("")
        ));
        assert!(
            e.contains("listen.sv2_authority_secret") && e.contains("(line 2)"),
            "{e}"
        );
        // Top-level dotted keys (before the first table header).
        let dotted = format!(
            "extranonce.miner_bytes = 3\nextranonce.extranonce2_size = 12\n{}",
            ok("")
        );
        let e = err(&dotted);
        assert!(
            e.contains("extranonce.extranonce2_size") && e.contains("(line 2)"),
            "{e}"
        );
        let e = err(&ok("[api]\nsample_secs = 0\n"));
        assert!(
            e.contains("api.sample_secs") && e.contains("(line 8)"),
            "{e}"
        );
        let e = err(&ok(
            "[api]\ntokens = [{ name = 'x', role = 'read', token = 'short' }]\n",
        ));
        assert!(
            e.contains("api.tokens[0].token") && e.contains("(line 8)"),
            "{e}"
        );
    }
}
