//! Fleet model: what each miner is, how it can be controlled, what it is doing.
//!
//! A [`Fleet`] is an inventory of [`Miner`]s. Each miner has a static
//! [`MinerSpec`] (model, nominal hashrate and power, the firmware
//! [`ControlSurface`] that can command it, and its [`Ramp`] characteristics),
//! plus the last [`Telemetry`] reading and the [`MinerState`] the policy
//! engine believes it is in. Planning uses the nominal figures ("the fleet
//! model"); telemetry is used to verify that commands took effect.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::time::Timestamp;

/// Stable identifier of one miner, assigned by the site inventory.
///
/// Actuators map it to an address and credentials; the policy engine only
/// needs it to be unique and stable across restarts (it is written to the
/// ledger).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct MinerId(pub u64);

impl std::fmt::Display for MinerId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "miner#{}", self.0)
    }
}

/// The firmware control API through which a miner can be commanded.
///
/// See ARCHITECTURE.md "Firmware control surfaces". Proxy-side
/// park/unpark/reroute works for every miner, whatever its surface.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ControlSurface {
    /// LuxOS TCP 4028 JSON: `curtail sleep|wakeup`, `profileset` (stepped
    /// power profiles; the actuator picks the profile at or below the target).
    LuxOs,
    /// Braiins OS gRPC: PauseMining / ResumeMining / SetPowerTarget.
    BraiinsOs,
    /// Whatsminer API: power_off / power_on / adjust_power_limit.
    Whatsminer,
    /// VNish REST: `/api/v1/mining/pause|resume`.
    Vnish,
    /// Antminer stock firmware: miner-mode sleep/normal via `set_miner_conf.cgi`.
    AntminerStock,
    /// No controllable firmware (e.g. stock cgminer): proxy-side park only.
    None,
}

/// What a [`ControlSurface`] can do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capabilities {
    /// The firmware can stop hashing and drop to standby power.
    pub sleep: bool,
    /// The firmware accepts a power target in watts.
    pub power_target: bool,
}

impl ControlSurface {
    /// Capabilities of this surface.
    pub const fn capabilities(self) -> Capabilities {
        match self {
            ControlSurface::LuxOs | ControlSurface::BraiinsOs | ControlSurface::Whatsminer => {
                Capabilities {
                    sleep: true,
                    power_target: true,
                }
            }
            ControlSurface::Vnish | ControlSurface::AntminerStock => Capabilities {
                sleep: true,
                power_target: false,
            },
            ControlSurface::None => Capabilities {
                sleep: false,
                power_target: false,
            },
        }
    }

    /// Stable lower-case name (used in the ledger).
    pub const fn as_str(self) -> &'static str {
        match self {
            ControlSurface::LuxOs => "luxos",
            ControlSurface::BraiinsOs => "braiinsos",
            ControlSurface::Whatsminer => "whatsminer",
            ControlSurface::Vnish => "vnish",
            ControlSurface::AntminerStock => "antminer_stock",
            ControlSurface::None => "none",
        }
    }
}

/// How a miner moves between power levels.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Ramp {
    /// Time from a sleep command to standby power.
    pub sleep_latency: Duration,
    /// Time from a wake command to full hashrate.
    pub wake_latency: Duration,
    /// Time for a new power target to settle.
    pub limit_latency: Duration,
    /// Lowest power target the firmware accepts, W.
    pub min_power_w: f64,
    /// Draw while asleep (control board, fans), W.
    pub sleep_w: f64,
    /// Expected draw while parked by the proxy, W. Parking only withholds
    /// work: an ASIC with a backup pool keeps hashing, so the default assumes
    /// no saving; set it lower where the site blocks backup pools.
    pub parked_w: f64,
}

impl Ramp {
    /// Conservative defaults for a miner of `nominal_w` on `surface`, from
    /// published figures (LuxOS sleeps in < 5 s, restores in < 10 s; others
    /// are slower).
    pub fn default_for(surface: ControlSurface, nominal_w: f64) -> Ramp {
        let (sleep_s, wake_s, limit_s) = match surface {
            ControlSurface::LuxOs => (5, 10, 30),
            ControlSurface::BraiinsOs => (10, 30, 60),
            ControlSurface::Whatsminer => (10, 60, 60),
            ControlSurface::Vnish => (10, 30, 60),
            ControlSurface::AntminerStock => (30, 90, 90),
            ControlSurface::None => (5, 5, 5),
        };
        Ramp {
            sleep_latency: Duration::from_secs(sleep_s),
            wake_latency: Duration::from_secs(wake_s),
            limit_latency: Duration::from_secs(limit_s),
            min_power_w: (nominal_w * 0.6).floor(),
            sleep_w: 20.0_f64.min(nominal_w),
            parked_w: nominal_w,
        }
    }
}

/// Static description of one miner.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MinerSpec {
    /// Inventory id.
    pub id: MinerId,
    /// Model name, e.g. "S19j Pro".
    pub model: Arc<str>,
    /// Nominal hashrate, TH/s.
    pub nominal_ths: f64,
    /// Nominal power at that hashrate, W.
    pub nominal_w: f64,
    /// How it can be commanded.
    pub surface: ControlSurface,
    /// Ramp characteristics.
    pub ramp: Ramp,
}

impl MinerSpec {
    /// A spec with [`Ramp::default_for`] ramp characteristics.
    pub fn new(
        id: MinerId,
        model: impl Into<Arc<str>>,
        nominal_ths: f64,
        nominal_w: f64,
        surface: ControlSurface,
    ) -> MinerSpec {
        MinerSpec {
            id,
            model: model.into(),
            nominal_ths,
            nominal_w,
            surface,
            ramp: Ramp::default_for(surface, nominal_w),
        }
    }

    /// Efficiency, J/TH (= W per TH/s).
    pub fn j_per_th(&self) -> f64 {
        self.nominal_w / self.nominal_ths
    }

    /// Capabilities of its control surface.
    pub fn capabilities(&self) -> Capabilities {
        self.surface.capabilities()
    }

    fn validate(&self) -> Result<(), FleetError> {
        let ok = |v: f64| v.is_finite() && v >= 0.0;
        if !(self.nominal_ths.is_finite() && self.nominal_ths > 0.0) {
            return Err(FleetError::InvalidSpec(self.id, "nominal_ths must be > 0"));
        }
        if !(self.nominal_w.is_finite() && self.nominal_w > 0.0) {
            return Err(FleetError::InvalidSpec(self.id, "nominal_w must be > 0"));
        }
        let r = &self.ramp;
        if !ok(r.min_power_w) || r.min_power_w > self.nominal_w {
            return Err(FleetError::InvalidSpec(
                self.id,
                "min_power_w must be in 0..=nominal_w",
            ));
        }
        if !ok(r.sleep_w) || r.sleep_w > self.nominal_w {
            return Err(FleetError::InvalidSpec(
                self.id,
                "sleep_w must be in 0..=nominal_w",
            ));
        }
        if !ok(r.parked_w) || r.parked_w > self.nominal_w {
            return Err(FleetError::InvalidSpec(
                self.id,
                "parked_w must be in 0..=nominal_w",
            ));
        }
        Ok(())
    }
}

/// What the engine believes a miner is doing.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum MinerState {
    /// Hashing at (about) nominal power.
    Hashing,
    /// Asleep at standby power.
    Sleeping,
    /// Hashing under a power target, W.
    PowerLimited(u32),
    /// Withheld from work by the proxy.
    Parked,
    /// Not known (no telemetry yet, or a command outcome is unconfirmed).
    Unknown,
}

impl MinerState {
    /// Whether this state draws less than nominal because of a command.
    pub fn is_curtailed(self) -> bool {
        matches!(
            self,
            MinerState::Sleeping | MinerState::PowerLimited(_) | MinerState::Parked
        )
    }
}

/// One telemetry reading.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Telemetry {
    /// When it was measured.
    pub at: Timestamp,
    /// Power draw, W.
    pub power_w: f64,
    /// Hashrate, TH/s.
    pub hashrate_ths: f64,
}

/// A miner: spec, believed state and last telemetry.
#[derive(Clone, Debug, PartialEq)]
pub struct Miner {
    /// Static description.
    pub spec: MinerSpec,
    /// Believed state.
    pub state: MinerState,
    /// Last reading, if any.
    pub telemetry: Option<Telemetry>,
}

/// Errors building a fleet.
#[derive(Debug, Error, PartialEq)]
#[non_exhaustive]
pub enum FleetError {
    /// Two miners share an id.
    #[error("duplicate miner id {0}")]
    DuplicateId(MinerId),
    /// A spec has an impossible value.
    #[error("invalid spec for {0}: {1}")]
    InvalidSpec(MinerId, &'static str),
    /// The fleet would exceed `u32::MAX` miners.
    #[error("fleet too large")]
    TooLarge,
}

/// The inventory of miners, addressable by id or by dense index.
#[derive(Clone, Debug, Default)]
pub struct Fleet {
    miners: Vec<Miner>,
    index: HashMap<MinerId, u32>,
}

impl Fleet {
    /// An empty fleet.
    pub fn new() -> Fleet {
        Fleet::default()
    }

    /// A fleet of the given specs, every miner in [`MinerState::Unknown`].
    pub fn from_specs(specs: impl IntoIterator<Item = MinerSpec>) -> Result<Fleet, FleetError> {
        let mut f = Fleet::new();
        for s in specs {
            f.insert(s)?;
        }
        Ok(f)
    }

    /// Add a miner; returns its dense index.
    pub fn insert(&mut self, spec: MinerSpec) -> Result<u32, FleetError> {
        spec.validate()?;
        if self.index.contains_key(&spec.id) {
            return Err(FleetError::DuplicateId(spec.id));
        }
        let idx = u32::try_from(self.miners.len()).map_err(|_| FleetError::TooLarge)?;
        self.index.insert(spec.id, idx);
        self.miners.push(Miner {
            spec,
            state: MinerState::Unknown,
            telemetry: None,
        });
        Ok(idx)
    }

    /// Number of miners.
    pub fn len(&self) -> usize {
        self.miners.len()
    }

    /// Whether the fleet is empty.
    pub fn is_empty(&self) -> bool {
        self.miners.is_empty()
    }

    /// Dense index of `id`.
    pub fn index_of(&self, id: MinerId) -> Option<u32> {
        self.index.get(&id).copied()
    }

    /// Miner by id.
    pub fn get(&self, id: MinerId) -> Option<&Miner> {
        self.index_of(id).map(|i| &self.miners[i as usize])
    }

    /// Miner by dense index.
    pub fn by_index(&self, idx: u32) -> &Miner {
        &self.miners[idx as usize]
    }

    pub(crate) fn by_index_mut(&mut self, idx: u32) -> &mut Miner {
        &mut self.miners[idx as usize]
    }

    /// All miners in insertion order.
    pub fn iter(&self) -> impl Iterator<Item = &Miner> {
        self.miners.iter()
    }

    /// Sum of nominal power, kW.
    pub fn nominal_kw(&self) -> f64 {
        self.miners.iter().map(|m| m.spec.nominal_w).sum::<f64>() / 1000.0
    }

    /// Sum of the latest telemetry power, kW, counting miners without
    /// telemetry at nominal (the fleet model).
    pub fn measured_kw(&self) -> f64 {
        self.miners
            .iter()
            .map(|m| m.telemetry.map_or(m.spec.nominal_w, |t| t.power_w))
            .sum::<f64>()
            / 1000.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_validates_and_indexes() {
        let mut f = Fleet::new();
        let s = MinerSpec::new(MinerId(7), "S21", 200.0, 3500.0, ControlSurface::BraiinsOs);
        assert_eq!(f.insert(s.clone()), Ok(0));
        assert_eq!(f.insert(s), Err(FleetError::DuplicateId(MinerId(7))));
        let bad = MinerSpec::new(MinerId(8), "x", 0.0, 3000.0, ControlSurface::None);
        assert!(matches!(f.insert(bad), Err(FleetError::InvalidSpec(..))));
        assert_eq!(f.index_of(MinerId(7)), Some(0));
        assert!((f.get(MinerId(7)).unwrap().spec.j_per_th() - 17.5).abs() < 1e-9);
        assert!((f.nominal_kw() - 3.5).abs() < 1e-9);
    }

    #[test]
    fn capabilities_per_surface() {
        assert!(ControlSurface::BraiinsOs.capabilities().power_target);
        assert!(!ControlSurface::Vnish.capabilities().power_target);
        assert!(!ControlSurface::None.capabilities().sleep);
    }
}
