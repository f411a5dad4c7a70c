//! gridproxy-curtail: the grid side of gridproxy.
//!
//! Grid signals come in, a pure policy engine decides which miners sleep,
//! run under a power target, or are parked, and a ledger keeps a
//! settlement-grade, append-only record of what was asked and done.
//!
//! Modules:
//! - [`time`]: timestamps and the clocks edge tasks read (system, scaled).
//! - [`fleet`]: the fleet model: miners, nominal figures, state, telemetry.
//! - [`signal`]: typed inputs: price, hashprice, DR events, dispatch, load.
//! - [`command`]: commands to actuators and their acknowledgements.
//! - [`policy`]: the sans-IO engine that turns signals into commands.
//! - [`ledger`]: the append-only SQLite record and crash recovery.
//! - [`actuator`]: the traits the I/O edge implements.
//! - [`actuators`]: firmware clients behind those traits.
//! - [`driver`]: the edge task running the engine and publishing status.
//! - [`mv`]: measurement and verification of curtailments over the ledger.
#![warn(missing_docs)]

pub mod actuator;
pub mod actuators;
pub mod command;
pub mod driver;
pub mod fleet;
pub mod ledger;
pub mod mv;
pub mod policy;
pub mod signal;
pub mod time;
