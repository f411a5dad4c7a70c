//! `gridproxy discover`: find the miners on given address ranges and write
//! `[[site.miners]]` entries for them.
//!
//! - [`scan`]: the ranges (CIDR or bare addresses, size-capped), the
//!   concurrency-limited sweep with a per-host deadline, the progress line.
//! - [`probe`]: bounded reads on the firmwares' standard ports (cgminer API
//!   4028, web 80, Braiins OS gRPC 50051): every reply capped at
//!   [`probe::MAX_REPLY`] bytes, every probe under a timeout.
//! - [`identify`]: which firmware answered (asic-rs's fingerprints applied to
//!   those replies, plus the Braiins OS gRPC service), then model, nominal
//!   TH/s and power where that firmware reports them.
//! - [`write`]: the TOML entries, unknown values marked for the operator.
//!
//! Traffic goes only to the addresses of the given ranges, on the fixed
//! standard ports; nothing is written to a miner and no password is guessed.

pub mod identify;
pub mod probe;
pub mod scan;
pub mod write;

pub use identify::Found;
pub use scan::{run, Options, Outcome, Ranges};
