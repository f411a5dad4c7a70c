//! The pure, deterministic curtailment policy engine.
//!
//! [`Engine`] is a sans-IO state machine in the style of `quinn-proto`: it
//! never reads a clock or touches the network. Its caller passes `now` into
//! every call, feeds it inputs through `handle_*` methods and drains its
//! outputs through `poll_*` methods.
//!
//! # Driving the engine
//!
//! ```text
//! loop {
//!     // inputs, in any order, as they arrive:
//!     engine.handle_signal(now, signal)?;          // price, DR event, site load, override …
//!     engine.handle_ack(now, command_id, ack)?;    // actuator answered
//!     engine.handle_telemetry(now, miner, reading)?; // verification
//!     engine.handle_timeout(now);                  // when poll_timeout() has passed
//!     // outputs:
//!     while let Some(cmd) = engine.poll_action(now) { actuators.send(cmd) }
//!     while let Some(ev) = engine.poll_event() { ledger.record(ev) }
//!     sleep_until(engine.poll_timeout());
//! }
//! ```
//!
//! # What it decides
//!
//! Every replan computes a target for each miner (run,
//! power-limit to W, or curtail) from, in order of precedence:
//!
//! 1. a manual override (`RunAll`, `CurtailAll`, `CapKw`);
//! 2. the safe state, when a required signal is older than its max age;
//! 3. economics: a miner runs while the price is below its breakeven
//!    (`1000 × hashprice ÷ (24 × J/TH) × (1 − fee) ÷ PUE`), with a hysteresis
//!    band and an optional forecast check before waking;
//! 4. a fleet kW cap: the tightest of active DR events, a dispatch target,
//!    the balance cap (`contract − other site load`) and an override cap. The
//!    cap is met by curtailing least efficient miners first, then lowering
//!    power targets on the next ones to land just below it. When the balance
//!    cap is the tightest, the split is incremental instead (see
//!    `policy/balance.rs`): power targets follow the swinging load in small
//!    steps over many miners, sleeps and wakes only when the running miners'
//!    power-target band runs out of room (with hysteresis).
//!
//! Targets become commands through a dispatcher that honours min on/off
//! dwell, a max command rate (sliding one-second window), and staggered
//! restore (at most N wakes per interval). Each command is verified by
//! telemetry; a curtailment that fails escalates sleep → power target → park.

mod balance;
mod config;
mod dispatch;
mod engine;
mod events;
mod plan;
mod planner;
mod resume;
#[cfg(test)]
mod tests;

pub use config::{Economics, Freshness, PolicyConfig, SafeState, Staleness};
pub use engine::{Engine, PolicyError};
pub use events::{Decision, DrEventState, FailReason, PolicyEvent};
pub use plan::{Mode, Plan, PlannedAction};
pub use resume::Resume;

// The engine's internals its other parts (planner, balance, tests) work on.
use engine::{CurtailStep, EventSlot, Held, Target};
