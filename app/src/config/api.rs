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

use gridproxy_proxy::config::Invalid;
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

impl ApiConfig {
    /// Check the section; the error names the key (the loader adds the line).
    pub fn validate(&self) -> Result<(), Invalid> {
        let bad = |key: String, message: String| Invalid { key, message };
        if let Some(a) = self.listen {
            if !a.ip().is_loopback() && self.tokens.is_empty() {
                return Err(bad(
                    "api.listen".into(),
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
                    "give both tls_cert and tls_key (PEM files), or neither".into(),
                ));
            }
            (Some(c), Some(k)) => {
                for (key, p) in [("tls_cert", c), ("tls_key", k)] {
                    if !p.is_file() {
                        return Err(bad(
                            format!("api.{key}"),
                            format!("{} is not a readable file", p.display()),
                        ));
                    }
                }
            }
            (None, None) => {}
        }
        if self.sample_secs == 0 || self.sample_secs > 3600 {
            return Err(bad("api.sample_secs".into(), "must be 1..=3600".into()));
        }
        if self.metrics_max_workers > 10_000 {
            return Err(bad(
                "api.metrics_max_workers".into(),
                "at most 10000 (keep metric cardinality bounded)".into(),
            ));
        }
        let mut names = std::collections::HashSet::new();
        for (i, t) in self.tokens.iter().enumerate() {
            let key = |k: &str| format!("api.tokens[{i}].{k}");
            if t.name.trim().is_empty() {
                return Err(bad(key("name"), "must not be empty".into()));
            }
            if !names.insert(t.name.clone()) {
                return Err(bad(
                    key("name"),
                    format!("duplicate token name {:?}", t.name),
                ));
            }
            match (&t.token, &t.token_env) {
                (Some(_), Some(_)) | (None, None) => {
                    return Err(bad(
                        key("token"),
                        "give exactly one of token or token_env".into(),
                    ))
                }
                (Some(s), None) if s.len() < MIN_TOKEN_LEN => {
                    return Err(bad(
                        key("token"),
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

/// A random token (32 hex characters) for demos and first runs.
pub fn random_token() -> String {
    use rand::RngCore;
    let mut b = [0u8; 16];
    rand::thread_rng().fill_bytes(&mut b);
    hex::encode(b)
}
