//! gridproxy-curtail: the grid side of gridproxy.
//!
//! Grid signals come in, a pure policy engine decides which miners sleep,
//! run under a power target, or are parked, and a ledger keeps a
//! settlement-grade, append-only record of what was asked and done.
//!
//! Modules:
//! - [`time`]: [`Timestamp`](time::Timestamp) (ms since the Unix epoch,
//!   injected by the caller) and the [`Clock`](time::Clock) seam.
//! - [`fleet`]: the fleet model: each miner's model, nominal TH/s and W,
//!   [`ControlSurface`](fleet::ControlSurface), ramp characteristics, state
//!   and telemetry.
//! - [`signal`]: typed inputs: price (with forecast), hashprice, DR events,
//!   dispatch heartbeats, site load, manual overrides, pool routing.
//! - [`policy`]: the sans-IO [`Engine`](policy::Engine): `handle_signal`,
//!   `handle_telemetry`, `handle_ack`, `handle_timeout` in;
//!   `poll_action`, `poll_event`, `poll_timeout` out. Price, kW-target and
//!   balance modes, dwell, rate limit, staggered restore, stale-signal safe
//!   state and escalation (sleep → power target → park).
//! - [`ledger`]: SQLite (WAL, `synchronous=FULL`) insert-only ledger of
//!   signals, decisions, commands, acks, measured kW and DR event states,
//!   with crash recovery into a [`Resume`](policy::Resume).
//! - [`actuator`]: traits the I/O edge implements: firmware/proxy
//!   [`Actuator`](actuator::Actuator)s, [`TelemetrySource`](actuator::TelemetrySource),
//!   [`SignalSource`](actuator::SignalSource).
//! - [`actuators`]: firmware clients behind those traits (LuxOS, Braiins OS
//!   gRPC, Whatsminer, VNish, stock telemetry), the dispatching
//!   [`FleetActuator`](actuators::FleetActuator), and telemetry
//!   verification of commands.
//! - [`driver`]: the edge task running the engine: signals in, rate-limited
//!   commands out to actuators, telemetry polling, write-ahead ledger on its
//!   own thread, restore from the ledger on restart, injected clock.
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
