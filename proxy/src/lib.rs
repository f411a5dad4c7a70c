//! gridproxy: the daemon.
//!
//! - [`config`]: the TOML file, validated.
//! - [`upstream`]: one task per pool (SV2 extended channel or SV1), publishing jobs on a `watch`.
//! - [`downstream`]: SV1 and SV2 listeners and one task per miner channel, on a shared channel core.
//! - [`router`]: which pool each miner hashes for: priority failover, fail-back, weighted split, park, move.
//! - [`stats`]: per-worker and per-pool counters.
//! - [`proxy`]: wiring it all together (`Proxy::start`).
//! - [`reload`]: hot reload (SIGHUP, `POST /api/v1/reload`) without dropping miners.
//! - [`backtest`]: replay a price trace through the engine; compare with always-on and a perfect-foresight oracle.
//! - [`site`]: `[site]`: the curtailment engine, miners and grid signal sources run next to the proxy.
//! - [`curtail_bridge`]: park/unpark/reroute actuator for the curtailment engine (re-exports `gridproxy-curtail`).
#![warn(missing_docs)]

pub mod api;
pub mod backtest;
pub mod config;
pub mod curtail_bridge;
pub mod demo;
pub mod downstream;
pub mod metrics;
pub mod proxy;
pub mod reload;
pub mod router;
pub mod site;
pub mod stats;
pub mod sv2_io;
pub mod upstream;
