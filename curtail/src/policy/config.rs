//! What the engine is told: policy knobs, mining economics, and how old
//! each signal may get before the fleet goes to its safe state.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::PolicyError;

/// Where the fleet goes when a required signal is stale.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SafeState {
    /// Curtail every miner (Soluna-style auto-curtail without dispatch).
    CurtailAll,
    /// Drop the constraint that signal drove; keep mining.
    KeepRunning,
    /// Keep using the last value of the signal.
    HoldLast,
}

/// Max age of one kind of signal and what its staleness means.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Freshness {
    /// Older than this (by its own `at`) is stale. A signal never received
    /// is stale this long after the engine started.
    pub max_age: Duration,
    /// What to do while stale.
    pub on_stale: SafeState,
}

/// Staleness rules per signal kind (`None`: not required).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Staleness {
    /// Energy price (only checked when [`PolicyConfig::economics`] is set).
    pub price: Option<Freshness>,
    /// Site load (only checked when [`PolicyConfig::contract_kw`] is set or
    /// a site load was ever received).
    pub site_load: Option<Freshness>,
    /// Dispatch heartbeat (checked once a dispatch was received, or from
    /// start when [`Self::dispatch_from_start`] is set).
    pub dispatch: Option<Freshness>,
    /// A dispatcher is configured: a site that never hears from it goes to
    /// the dispatch safe state `max_age` after start, as after a lost one.
    #[serde(default)]
    pub dispatch_from_start: bool,
}

impl Staleness {
    /// No signal is required to be fresh (tests, backtests, benches).
    pub const NONE: Staleness = Staleness {
        price: None,
        site_load: None,
        dispatch: None,
        dispatch_from_start: false,
    };
}

impl Default for Staleness {
    fn default() -> Self {
        Staleness {
            price: Some(Freshness {
                max_age: Duration::from_secs(15 * 60),
                on_stale: SafeState::KeepRunning,
            }),
            site_load: Some(Freshness {
                max_age: Duration::from_secs(10),
                on_stale: SafeState::HoldLast,
            }),
            dispatch: Some(Freshness {
                max_age: Duration::from_secs(4 * 60),
                on_stale: SafeState::CurtailAll,
            }),
            dispatch_from_start: false,
        }
    }
}

/// Mining economics for price mode.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Economics {
    /// Hashprice, $ per PH/s per day (updated by [`Signal::Hashprice`]).
    pub hashprice_usd_per_ph_day: f64,
    /// Pool fee as a fraction (0.02 = 2 %).
    pub pool_fee: f64,
    /// Power usage effectiveness of the site (≥ 1).
    pub pue: f64,
    /// Half-width of the hysteresis band around each breakeven, $/MWh.
    pub hysteresis_usd_per_mwh: f64,
}

impl Economics {
    /// Breakeven energy price, $/MWh, for a miner of `j_per_th`.
    pub fn breakeven_usd_per_mwh(&self, j_per_th: f64) -> f64 {
        1000.0 * self.hashprice_usd_per_ph_day / (24.0 * j_per_th) * (1.0 - self.pool_fee)
            / self.pue
    }
}

/// Engine configuration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PolicyConfig {
    /// Price mode; `None` disables it (mine at any price).
    pub economics: Option<Economics>,
    /// Balance mode: contracted site kW to hold while another load swings.
    pub contract_kw: Option<f64>,
    /// Headroom kept under the contract, kW.
    pub balance_margin_kw: f64,
    /// Fraction below a kW cap to aim for (0.005 = land 0.5 % under).
    pub target_margin: f64,
    /// Min time a miner stays on after waking before a price decision may
    /// curtail it.
    pub min_on: Duration,
    /// Min time a miner stays off before it may wake.
    pub min_off: Duration,
    /// Obligations (DR, dispatch, balance, override, safe state) may curtail
    /// a miner inside its min-on dwell.
    pub obligations_override_min_on: bool,
    /// Max commands issued in any one-second window.
    pub max_commands_per_sec: u32,
    /// Miners restored per batch.
    pub restore_batch: u32,
    /// Time between restore batches.
    pub restore_interval: Duration,
    /// Signal max ages and safe states.
    pub staleness: Staleness,
    /// Time for an actuator to acknowledge a command.
    pub ack_timeout: Duration,
    /// Slack over a miner's ramp latency before a command counts as
    /// unverified.
    pub verify_grace: Duration,
    /// Power tolerance in verification, fraction of nominal W.
    pub verify_tolerance: f64,
    /// Hashrate above this fraction of nominal counts as hashing.
    pub hashing_frac: f64,
    /// Hashrate at or below this fraction of nominal counts as asleep.
    pub idle_hashrate_frac: f64,
    /// Power-target changes smaller than this are not sent, W.
    pub limit_deadband_w: f64,
    /// Restore/adjust attempts before a miner is reported unresponsive.
    pub max_retries: u8,
    /// Wait between restore retries.
    pub retry_backoff: Duration,
    /// Extra time allowed before a future DR event's start, on top of the
    /// estimated time to issue its commands and the miners' ramp.
    pub dr_lead_margin: Duration,
    /// After [`Engine::resume`], recovered curtailed miners are held
    /// curtailed until a fresh signal arrives or this much time passes.
    pub resume_hold: Duration,
    /// How far ahead of the local clock a signal's own timestamp may be;
    /// further is refused (a future-dated sample would pin the value and
    /// defeat the staleness fail-safe).
    pub max_clock_skew: Duration,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig {
            economics: None,
            contract_kw: None,
            balance_margin_kw: 0.0,
            target_margin: 0.005,
            min_on: Duration::from_secs(300),
            min_off: Duration::from_secs(600),
            obligations_override_min_on: true,
            max_commands_per_sec: 50,
            restore_batch: 50,
            restore_interval: Duration::from_secs(30),
            staleness: Staleness::default(),
            ack_timeout: Duration::from_secs(10),
            verify_grace: Duration::from_secs(30),
            verify_tolerance: 0.05,
            hashing_frac: 0.3,
            idle_hashrate_frac: 0.05,
            limit_deadband_w: 25.0,
            max_retries: 3,
            retry_backoff: Duration::from_secs(30),
            dr_lead_margin: Duration::from_secs(10),
            resume_hold: Duration::from_secs(300),
            max_clock_skew: Duration::from_secs(120),
        }
    }
}

impl PolicyConfig {
    /// Check ranges.
    pub fn validate(&self) -> Result<(), PolicyError> {
        let bad = |m: &'static str| Err(PolicyError::InvalidConfig(m));
        if let Some(e) = &self.economics {
            if !(e.hashprice_usd_per_ph_day.is_finite() && e.hashprice_usd_per_ph_day >= 0.0) {
                return bad("hashprice must be >= 0");
            }
            if !(0.0..1.0).contains(&e.pool_fee) {
                return bad("pool_fee must be in [0, 1)");
            }
            if !(e.pue.is_finite() && e.pue >= 1.0) {
                return bad("pue must be >= 1");
            }
            if !(e.hysteresis_usd_per_mwh.is_finite() && e.hysteresis_usd_per_mwh >= 0.0) {
                return bad("hysteresis must be >= 0");
            }
        }
        if self
            .contract_kw
            .is_some_and(|c| !(c.is_finite() && c >= 0.0))
        {
            return bad("contract_kw must be >= 0");
        }
        if !(self.balance_margin_kw.is_finite() && self.balance_margin_kw >= 0.0) {
            return bad("balance_margin_kw must be >= 0");
        }
        if !(0.0..0.5).contains(&self.target_margin) {
            return bad("target_margin must be in [0, 0.5)");
        }
        if self.max_commands_per_sec == 0 {
            return bad("max_commands_per_sec must be >= 1");
        }
        if self.restore_batch == 0 {
            return bad("restore_batch must be >= 1");
        }
        if !(0.0..1.0).contains(&self.verify_tolerance)
            || !(0.0..=1.0).contains(&self.hashing_frac)
            || !(0.0..1.0).contains(&self.idle_hashrate_frac)
        {
            return bad("verification fractions out of range");
        }
        if !(self.limit_deadband_w.is_finite() && self.limit_deadband_w >= 0.0) {
            return bad("limit_deadband_w must be >= 0");
        }
        Ok(())
    }
}
