//! gridproxy, the application: one configuration file, the proxy engine
//! (`gridproxy-proxy`), the control API and dashboard, metrics, hot reload,
//! and the site: the curtailment engine (`gridproxy-curtail`) fed by grid
//! signal sources (`gridproxy-grid`).
//!
//! - [`config`]: the whole file, with the one loader (file, key and line in every error).
//! - [`app`]: [`App::start`]: what `gridproxy run` and the end-to-end tests start.
//! - [`api`]: control API, dashboard, `/metrics` (with [`metrics`]); [`http`]: its client and TLS.
//! - [`reload`]: hot reload (SIGHUP, `POST /api/v1/reload`) without dropping miners.
//! - [`site`]: `[site]`: the curtailment engine, miners and grid signal sources.
//! - [`demo`], [`backtest`], [`mix`]: simulated sites (feature `sim`, on by default).
#![warn(missing_docs)]

pub mod api;
pub mod app;
#[cfg(feature = "sim")]
pub mod backtest;
pub mod cli;
pub mod config;
#[cfg(feature = "sim")]
pub mod demo;
pub mod discover;
pub mod http;
pub mod metrics;
#[cfg(feature = "sim")]
pub mod mix;
pub mod reload;
pub mod service;
pub mod site;

pub use app::{App, AppOptions};
pub use config::Config;
