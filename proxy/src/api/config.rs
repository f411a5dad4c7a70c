//! `[api]` section of the config file: where the control API listens, who
//! may call it, and how much the metrics expose.
//!
//! ```toml
//! [api]
//! listen = "127.0.0.1:8080"       # control API, /metrics and the dashboard (off when absent)
//! metrics_public = true           # /metrics without a token (Prometheus on loopback)
//! metrics_max_workers = 50        # per-worker series: the top N by hashrate, the rest as "_other"
//! sample_secs = 2                 # history / hashrate sampling period
//!
//! [[api.tokens]]
//! name = "grafana"                # shown in logs and the event log
//! role = "read"                   # "read": GET endpoints; "operate": also POST /api/v1/curtail
//! token_env = "GRIDPROXY_READ_TOKEN"   # or: token = "…" (at least 16 characters)
//! ```

use crate::config::{Config, ConfigError};
use serde::Deserialize;
use std::net::SocketAddr;

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Read fleet, workers, pools, events, history.
    Read,
    /// Read, and steer: park/unpark/move workers, caps, overrides.
    Operate,
}

impl Role {
    /// Stable lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Read => "read",
            Role::Operate => "operate",
        }
    }
}

/// One bearer token.
#[derive(Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    /// Who holds it (for logs).
    pub name: String,
    /// What it may do.
    pub role: Role,
    /// The secret itself.
    #[serde(default)]
    pub token: Option<String>,
    /// Or: the environment variable holding it.
    #[serde(default)]
    pub token_env: Option<String>,
}

impl std::fmt::Debug for TokenConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenConfig")
            .field("name", &self.name)
            .field("role", &self.role)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("token_env", &self.token_env)
            .finish()
    }
}

/// The `[api]` section.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    /// Listen address of the control API, `/metrics` and the dashboard;
    /// the API is off when absent.
    #[serde(default)]
    pub listen: Option<SocketAddr>,
    /// Bearer tokens.
    #[serde(default)]
    pub tokens: Vec<TokenConfig>,
    /// Serve `/metrics` without a token.
    #[serde(default = "yes")]
    pub metrics_public: bool,
    /// Per-worker metric series: the top N workers by hashrate.
    #[serde(default = "fifty")]
    pub metrics_max_workers: usize,
    /// History and hashrate sampling period, seconds.
    #[serde(default = "two")]
    pub sample_secs: u64,
    /// Serve HTTPS: PEM certificate chain (leaf first). Needs `tls_key`.
    #[serde(default)]
    pub tls_cert: Option<std::path::PathBuf>,
    /// PEM private key for `tls_cert`.
    #[serde(default)]
    pub tls_key: Option<std::path::PathBuf>,
}

fn yes() -> bool {
    true
}
fn fifty() -> usize {
    50
}
fn two() -> u64 {
    2
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            listen: None,
            tokens: vec![],
            metrics_public: true,
            metrics_max_workers: 50,
            sample_secs: 2,
            tls_cert: None,
            tls_key: None,
        }
    }
}

/// Shortest accepted token.
pub const MIN_TOKEN_LEN: usize = 16;

/// A token ready for comparison.
#[derive(Clone)]
pub struct Token {
    /// Holder.
    pub name: String,
    /// Role.
    pub role: Role,
    /// Secret.
    pub secret: String,
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Token({}, {})", self.name, self.role.as_str())
    }
}

/// Line (1-based) of `key = ` inside the `n`-th occurrence of `header`
/// (`[api]` or `[[api.tokens]]`), or of the header itself when the key is
/// absent. Used to point at the line of a semantic error.
pub fn find_line(text: &str, header: &str, n: usize, key: Option<&str>) -> Option<usize> {
    let mut seen = 0usize;
    let mut inside = false;
    let mut header_line = None;
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.starts_with('[') {
            if inside {
                break;
            }
            if line.split('#').next().unwrap_or("").trim() == header {
                if seen == n {
                    inside = true;
                    header_line = Some(i + 1);
                }
                seen += 1;
            }
            continue;
        }
        if inside {
            if let Some(k) = key {
                let lhs = line.split('=').next().unwrap_or("").trim();
                if line.contains('=') && lhs == k {
                    return Some(i + 1);
                }
            }
        }
    }
    header_line
}

impl ApiConfig {
    /// Check the section; `text` (the file's contents) lets errors name the line.
    pub fn validate(&self, origin: &str, text: Option<&str>) -> Result<(), ConfigError> {
        let bad = |key: String, line: Option<usize>, message: String| ConfigError::Invalid {
            path: origin.to_string(),
            key,
            message: match line {
                Some(l) => format!("{message} (line {l})"),
                None => message,
            },
        };
        let line = |header: &str, n: usize, key: &str| {
            text.and_then(|t| find_line(t, header, n, Some(key)))
        };
        if let Some(a) = self.listen {
            if !a.ip().is_loopback() && self.tokens.is_empty() {
                return Err(bad(
                    "api.listen".into(),
                    line("[api]", 0, "listen"),
                    format!(
                        "{a} is not loopback: configure [[api.tokens]] before exposing the API"
                    ),
                ));
            }
        }
        match (&self.tls_cert, &self.tls_key) {
            (Some(_), None) | (None, Some(_)) => {
                let k = if self.tls_cert.is_some() {
                    "tls_cert"
                } else {
                    "tls_key"
                };
                return Err(bad(
                    format!("api.{k}"),
                    line("[api]", 0, k),
                    "give both tls_cert and tls_key (PEM files), or neither".into(),
                ));
            }
            (Some(c), Some(k)) => {
                for (key, p) in [("tls_cert", c), ("tls_key", k)] {
                    if !p.is_file() {
                        return Err(bad(
                            format!("api.{key}"),
                            line("[api]", 0, key),
                            format!("{} is not a readable file", p.display()),
                        ));
                    }
                }
            }
            (None, None) => {}
        }
        if self.sample_secs == 0 || self.sample_secs > 3600 {
            return Err(bad(
                "api.sample_secs".into(),
                line("[api]", 0, "sample_secs"),
                "must be 1..=3600".into(),
            ));
        }
        if self.metrics_max_workers > 10_000 {
            return Err(bad(
                "api.metrics_max_workers".into(),
                line("[api]", 0, "metrics_max_workers"),
                "at most 10000 (keep metric cardinality bounded)".into(),
            ));
        }
        let mut names = std::collections::HashSet::new();
        for (i, t) in self.tokens.iter().enumerate() {
            let key = |k: &str| format!("api.tokens[{i}].{k}");
            let at = |k: &str| line("[[api.tokens]]", i, k);
            if t.name.trim().is_empty() {
                return Err(bad(key("name"), at("name"), "must not be empty".into()));
            }
            if !names.insert(t.name.clone()) {
                return Err(bad(
                    key("name"),
                    at("name"),
                    format!("duplicate token name {:?}", t.name),
                ));
            }
            match (&t.token, &t.token_env) {
                (Some(_), Some(_)) | (None, None) => {
                    return Err(bad(
                        key("token"),
                        at("token").or(at("token_env")).or(at("name")),
                        "give exactly one of token or token_env".into(),
                    ))
                }
                (Some(s), None) if s.len() < MIN_TOKEN_LEN => {
                    return Err(bad(
                        key("token"),
                        at("token"),
                        format!("too short: at least {MIN_TOKEN_LEN} characters"),
                    ))
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// The tokens with their secrets (reading `token_env` variables).
    pub fn resolve_tokens(&self) -> Result<Vec<Token>, String> {
        let mut out = vec![];
        for (i, t) in self.tokens.iter().enumerate() {
            let secret = match (&t.token, &t.token_env) {
                (Some(s), _) => s.clone(),
                (None, Some(var)) => std::env::var(var).map_err(|_| {
                    format!("api.tokens[{i}].token_env: environment variable {var} is not set")
                })?,
                (None, None) => return Err(format!("api.tokens[{i}]: no token")),
            };
            if secret.len() < MIN_TOKEN_LEN {
                return Err(format!(
                    "api.tokens[{i}]: token shorter than {MIN_TOKEN_LEN} characters"
                ));
            }
            out.push(Token {
                name: t.name.clone(),
                role: t.role,
                secret,
            });
        }
        Ok(out)
    }
}

/// Parse and validate a whole config file's text (the proxy sections and
/// `[api]`), naming the key and, where it can be found, the line of every
/// error. `origin` names the file in messages.
pub fn check(text: &str, origin: &str) -> Result<Config, ConfigError> {
    check_in(text, origin, None)
}

/// [`check`], resolving relative file paths (TLS certificate and key)
/// against `dir`, the config file's folder.
fn check_in(
    text: &str,
    origin: &str,
    dir: Option<&std::path::Path>,
) -> Result<Config, ConfigError> {
    let mut cfg = Config::parse(text, origin).map_err(|e| with_line(e, text))?;
    if let Some(dir) = dir {
        for p in [&mut cfg.api.tls_cert, &mut cfg.api.tls_key]
            .into_iter()
            .flatten()
        {
            if p.is_relative() {
                *p = dir.join(&*p);
            }
        }
        if let Some(site) = &mut cfg.site {
            site.resolve_paths(dir);
        }
    }
    cfg.api.validate(origin, Some(text))?;
    Ok(cfg)
}

/// Read and [`check`] a config file.
pub fn load(path: &std::path::Path) -> Result<Config, ConfigError> {
    let origin = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
        path: origin.clone(),
        source: e,
    })?;
    check_in(&text, &origin, path.parent())
}

/// Add `(line N)` to a semantic error whose key can be found in `text`.
fn with_line(e: ConfigError, text: &str) -> ConfigError {
    match e {
        ConfigError::Invalid { path, key, message } if !message.contains("(line ") => {
            let line = line_of_key(text, &key);
            ConfigError::Invalid {
                message: match line {
                    Some(l) => format!("{message} (line {l})"),
                    None => message,
                },
                path,
                key,
            }
        }
        e => e,
    }
}

/// Line of a dotted key path such as `pools[1].weight`,
/// `extranonce.extranonce2_size` or `limits` (a section).
pub fn line_of_key(text: &str, key: &str) -> Option<usize> {
    let parts: Vec<&str> = key.split('.').collect();
    let (first, rest) = parts.split_first()?;
    let (table, index) = match first.split_once('[') {
        Some((t, i)) => (t, i.trim_end_matches(']').parse::<usize>().ok()),
        None => (*first, None),
    };
    let leaf = rest.last().copied();
    match index {
        Some(n) => find_line(text, &format!("[[{table}]]"), n, leaf),
        None => match leaf {
            Some(k) => find_line(text, &format!("[{table}]"), 0, Some(k)),
            // A top-level key or a whole section.
            None => find_line(text, &format!("[{table}]"), 0, None).or_else(|| {
                text.lines()
                    .position(|l| {
                        let l = l.trim();
                        l.starts_with(table) && l[table.len()..].trim_start().starts_with('=')
                    })
                    .map(|i| i + 1)
            }),
        },
    }
}

/// A random token (32 hex characters) for demos and first runs.
pub fn random_token() -> String {
    use rand::RngCore;
    let mut b = [0u8; 16];
    rand::thread_rng().fill_bytes(&mut b);
    hex::encode(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_of_keys_in_sections() {
        let t = "[api]\nlisten = \"127.0.0.1:1\"\n\n[[api.tokens]]\nname = \"a\"\n\n[[api.tokens]]\nname = \"b\"\ntoken = \"x\"\n";
        assert_eq!(find_line(t, "[api]", 0, Some("listen")), Some(2));
        assert_eq!(find_line(t, "[[api.tokens]]", 1, Some("token")), Some(9));
        assert_eq!(find_line(t, "[[api.tokens]]", 0, Some("token")), Some(4));
        let c = "[[pools]]\nname='a'\n\n[[pools]]\nname='b'\nweight = -1\n\n[extranonce]\nextranonce2_size = 12\n";
        assert_eq!(line_of_key(c, "pools[1].weight"), Some(6));
        assert_eq!(line_of_key(c, "extranonce.extranonce2_size"), Some(9));
        assert_eq!(line_of_key(c, "extranonce"), Some(8));
        assert_eq!(line_of_key(c, "pools[0].authority_pubkey"), Some(1));
    }
}
