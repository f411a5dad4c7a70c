//! gridproxy's proxy engine: miners in, pools out.
//!
//! - [`accounts`]: which pool user each miner's shares go out under (`[[accounts]]`, matched by worker name, listener, source network).
//! - [`config`]: [`ProxyConfig`]: pools, listeners, limits, difficulty, routing, extranonce.
//! - [`endpoint`]: pool and host addresses as people write them (`host:port`, `stratum+tcp://`, `stratum2+tcp://…/<key>`), resolved at connect.
//! - [`proxy`]: [`Proxy::start`], live [`Proxy::reconfigure`], an awaited [`Proxy::shutdown`], a restart's [`Proxy::drain`].
//! - [`drain`]: the drain's plan (sans-IO): miners told to leave, then every forwarded share's answer, bounded.
//! - [`upstream`]: one task per pool (SV2 extended channel or SV1), publishing jobs on a `watch`.
//! - [`downstream`]: SV1 and SV2 listeners and one task per miner channel, on a shared channel core.
//! - [`router`]: which pool each miner hashes for: priority failover, fail-back, weighted split, park, move.
//! - [`stats`]: per-worker and per-pool counters.
//! - [`error`]: the errors an embedder sees.
//!
//! It depends on `gridproxy-protocol` (sans-IO) and tokio, and on nothing
//! above it: the application (`gridproxy`) embeds it.
#![warn(missing_docs)]

pub mod accounts;
pub mod config;
pub mod downstream;
pub mod drain;
pub mod endpoint;
pub mod error;
pub mod proxy;
pub mod router;
pub mod stats;
pub mod sv2_io;
pub mod upstream;

pub use config::ProxyConfig;
pub use proxy::Proxy;
