//! The end-to-end tests of gridproxy, as one test binary (one link of the
//! workspace instead of one per file). Each module was a binary of its own;
//! a test is named `MODULE::test`, so `cargo test -p gridproxy-tests --test e2e
//! -- curtail_dr` still selects a file's tests by substring.
//!
//! Modules run one at a time, as the separate binaries did: every test opens
//! with [`gridproxy_tests::module_gate`], so tests of one module may run in
//! parallel with each other (as before, within their binary) but never
//! beside another module's tests on the two shared cores. Tests that must
//! run alone within their module also take [`gridproxy_tests::SERIAL`].
//!
//! Shared code lives in the `gridproxy_tests` library (peers, ports, the
//! [`gridproxy_tests::bench`] site harness); `mqtt_support` and `vtn_support`
//! start the Mosquitto broker and the openleadr-rs VTN for the tests that
//! need them.

mod mqtt_support;
mod vtn_support;

mod chaos;
mod chaos_vtn;
mod curtail_dr;
mod curtail_kill9;
mod curtail_price;
mod discover;
mod grid_balance;
mod grid_mqtt;
mod grid_openadr;
mod grid_price;
mod grid_tls;
mod ledger_postgres;
mod mv_backtest;
mod operate_api;
mod operate_cli;
mod operate_config;
mod operate_dashboard;
mod operate_demo;
mod operate_full_disk;
mod operate_lease;
mod operate_metrics;
mod operate_reload;
mod operate_restart;
mod operate_site;
mod operate_tls;
mod proxy_accounts;
mod proxy_control;
mod proxy_endpoints;
mod proxy_fanout;
mod proxy_group;
mod proxy_hung_pool;
mod proxy_pool;
mod proxy_routing;
mod proxy_sv1_upstream;
mod proxy_sv2;
mod proxy_worker_identity;
mod sri_pool;
mod translator;
