//! gridproxy-protocol: the sans-IO core of gridproxy. No tokio, no sockets, no clock reads.
//!
//! - [`sv1`]: Stratum V1 JSON-RPC messages and a bounded line codec.
//! - [`sv1_submit`]: allocation-free fast path for `mining.submit`.
//! - [`sv2`]: Stratum V2 Noise handshake helpers and an encrypted frame codec over `stratum-core`.
//! - [`sv2_ext`]: SV2 extensions: negotiation (0x0001) messages, the `user_identity` TLV (0x0002).
//! - [`share`]: block header assembly, sha256d, target checks.
//! - [`difficulty`]: difficulty ↔ target conversion and power-of-two rounding.
//! - [`extranonce`]: per-miner extranonce prefix allocation inside an upstream channel.
//! - [`vardiff`]: per-miner variable difficulty as a pure state machine.
#![warn(missing_docs)]

pub mod difficulty;
pub mod extranonce;
pub mod share;
pub mod sv1;
pub mod sv1_submit;
pub mod sv2;
pub mod sv2_ext;
pub mod vardiff;
