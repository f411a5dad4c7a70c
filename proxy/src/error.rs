//! The engine's errors, typed so an embedder can tell them apart.

use std::net::SocketAddr;

/// Why the proxy did not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A listener could not be bound.
    #[error("bind {what} listener {addr}: {source}")]
    Bind {
        /// `sv1` or `sv2`.
        what: &'static str,
        /// The address asked for.
        addr: SocketAddr,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The SV2 listener's authority keys are missing or do not parse.
    #[error("{0}")]
    Authority(String),
}

/// Why a new configuration was not put in force (nothing was applied).
#[derive(Debug, thiserror::Error)]
pub enum ReconfigureError {
    /// Tables that can only change with a restart.
    #[error("[{}] changed: these need a restart; nothing was applied", .0.join("], ["))]
    NeedsRestart(Vec<&'static str>),
    /// The new values do not make sense.
    #[error(transparent)]
    Invalid(#[from] crate::config::Invalid),
}
