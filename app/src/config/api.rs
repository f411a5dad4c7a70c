//! `[api]` section of the config file: where the control API listens, who
//! may call it, and how much the metrics expose.
//!
//! ```toml
//! [api]
//! listen = "127.0.0.1:8080"       # control API, /metrics and the dashboard (off when absent)
//! metrics_public = true           # /metrics without a token (default: only on a loopback listen)
//! max_connections = 256           # served at once; more are closed
//! header_timeout_secs = 10        # a client slower to send its headers is disconnected
//! metrics_max_workers = 50        # per-worker series: the top N by hashrate, the rest as "_other"
//! sample_secs = 2                 # history / hashrate sampling period
//!
//! [[api.tokens]]
//! name = "grafana"                # shown in logs and the event log
//! role = "read"                   # "read": GET endpoints; "operate": also POST /api/v1/curtail
//! token_env = "GRIDPROXY_READ_TOKEN"   # or: token = "…" (at least 16 characters), or token_file = "/path"
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
    /// Or: a file holding it (one line; e.g. a systemd credential).
    #[serde(default)]
    pub token_file: Option<std::path::PathBuf>,
}

impl std::fmt::Debug for TokenConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenConfig")
            .field("name", &self.name)
            .field("role", &self.role)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("token_env", &self.token_env)
            .field("token_file", &self.token_file)
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
    /// Serve `/metrics` without a token. Default: yes on a loopback
    /// listener, no otherwise (the metrics name accounts, pools, site kW
    /// and price).
    #[serde(default)]
    pub metrics_public: Option<bool>,
    /// Connections served at once; more are closed on accept.
    #[serde(default = "conn_cap")]
    pub max_connections: usize,
    /// Seconds a client has to send a request's headers (and finish a TLS
    /// handshake); a slow client is disconnected.
    #[serde(default = "ten")]
    pub header_timeout_secs: u64,
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

fn conn_cap() -> usize {
    256
}
fn ten() -> u64 {
    10
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
            metrics_public: None,
            max_connections: 256,
            header_timeout_secs: 10,
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
        if !(1..=65_536).contains(&self.max_connections) {
            return Err(bad(
                "api.max_connections".into(),
                "must be 1..=65536".into(),
            ));
        }
        if !(1..=3600).contains(&self.header_timeout_secs) {
            return Err(bad(
                "api.header_timeout_secs".into(),
                "must be 1..=3600".into(),
            ));
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
            let given = usize::from(t.token.is_some())
                + usize::from(t.token_env.is_some())
                + usize::from(t.token_file.is_some());
            if given != 1 {
                return Err(bad(
                    key("token"),
                    "give exactly one of token, token_env or token_file".into(),
                ));
            }
            match &t.token {
                Some(s) if s.len() < MIN_TOKEN_LEN => {
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

    /// Whether `/metrics` answers without a token on a listener bound to
    /// `addr`: as configured, else only on loopback (the metrics name
    /// accounts, pools, site kW and price).
    pub fn metrics_public_on(&self, addr: SocketAddr) -> bool {
        self.metrics_public.unwrap_or(addr.ip().is_loopback())
    }

    /// `check-config`'s look at the token files: each readable and long
    /// enough (what `run` would refuse). Environment variables are not
    /// checked: a service's environment is not the shell's.
    pub fn check_token_files(&self) -> Result<(), String> {
        let files = ApiConfig {
            tokens: self
                .tokens
                .iter()
                .filter(|t| t.token_file.is_some())
                .cloned()
                .collect(),
            ..self.clone()
        };
        files.resolve_tokens().map(|_| ())
    }

    /// The tokens with their secrets (reading `token_env` variables).
    pub fn resolve_tokens(&self) -> Result<Vec<Token>, String> {
        let mut out = vec![];
        for (i, t) in self.tokens.iter().enumerate() {
            let secret = match (&t.token, &t.token_env, &t.token_file) {
                (Some(s), _, _) => s.clone(),
                (None, Some(var), _) => std::env::var(var).map_err(|_| {
                    format!("api.tokens[{i}].token_env: environment variable {var} is not set")
                })?,
                (None, None, Some(path)) => std::fs::read_to_string(path)
                    .map_err(|e| format!("api.tokens[{i}].token_file: {}: {e}", path.display()))?
                    .trim_end_matches(['\r', '\n'])
                    .to_string(),
                (None, None, None) => return Err(format!("api.tokens[{i}]: no token")),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> ApiConfig {
        toml::from_str(text).expect("api section")
    }

    #[test]
    fn metrics_are_public_by_default_only_on_loopback() {
        let cfg = ApiConfig::default();
        assert!(cfg.metrics_public_on("127.0.0.1:9000".parse().unwrap()));
        assert!(cfg.metrics_public_on("[::1]:9000".parse().unwrap()));
        assert!(!cfg.metrics_public_on("0.0.0.0:9000".parse().unwrap()));
        assert!(!cfg.metrics_public_on("192.0.2.7:9000".parse().unwrap()));
        let explicit = parse("metrics_public = true");
        assert!(explicit.metrics_public_on("0.0.0.0:9000".parse().unwrap()));
    }

    #[test]
    fn a_token_may_come_from_a_file_and_only_one_source_is_allowed() {
        let dir = std::env::temp_dir().join(format!("gridproxy-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("ops.token");
        std::fs::write(&file, "file-token-0123456789abcdef\n").unwrap();
        let cfg = parse(&format!(
            "[[tokens]]\nname = \"ops\"\nrole = \"operate\"\ntoken_file = {:?}\n",
            file.display().to_string()
        ));
        cfg.validate().expect("valid");
        let t = cfg.resolve_tokens().expect("resolved");
        assert_eq!(
            t[0].secret, "file-token-0123456789abcdef",
            "newline trimmed"
        );
        // The secret stays out of Debug.
        assert!(!format!("{cfg:?}").contains("file-token"));
        let both = parse(&format!(
            "[[tokens]]\nname = \"ops\"\nrole = \"operate\"\ntoken = \"0123456789abcdef0\"\ntoken_file = {:?}\n",
            file.display().to_string()
        ));
        let e = both.validate().unwrap_err();
        assert!(e.message.contains("exactly one"), "{}", e.message);
        let missing = parse(
            "[[tokens]]\nname = \"ops\"\nrole = \"operate\"\ntoken_file = \"/nonexistent/ops.token\"\n",
        );
        let e = missing.resolve_tokens().unwrap_err();
        assert!(
            e.contains("token_file") && e.contains("/nonexistent/ops.token"),
            "{e}"
        );
    }

    #[test]
    fn connection_bounds_are_validated() {
        assert!(parse("max_connections = 0").validate().is_err());
        assert!(parse("header_timeout_secs = 0").validate().is_err());
        assert!(parse("header_timeout_secs = 100000").validate().is_err());
        assert!(parse("max_connections = 8\nheader_timeout_secs = 2")
            .validate()
            .is_ok());
    }
}
