//! gridproxy-firmware-api: miner firmware wire APIs, generated once and
//! shared by the clients in `gridproxy-curtail` and the emulators in
//! `gridproxy-fixtures`.
//!
//! Modules:
//! - [`braiins`]: Braiins OS gRPC (`braiins.bos.v1`): messages, tonic
//!   clients and tonic servers.
#![warn(missing_docs)]

pub mod braiins;
