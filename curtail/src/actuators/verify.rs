//! Confirm a command by telemetry.
//!
//! Firmware acknowledgements are not proof: some firmware acks and acts
//! later, some acks and never acts, some reports the requested state while
//! still drawing power. [`confirm`] polls a [`TelemetrySource`] until the
//! measured power enters the [`PowerBand`] the action implies, or a deadline
//! (the miner's ramp time plus slack) passes.

use std::time::Duration;

use thiserror::Error;

use crate::actuator::{ActuatorError, TelemetrySource};
use crate::command::Action;
use crate::fleet::{MinerId, MinerSpec, Telemetry};

/// Acceptable power after an action, W (inclusive).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PowerBand {
    /// Lowest acceptable power.
    pub min_w: f64,
    /// Highest acceptable power.
    pub max_w: f64,
}

impl PowerBand {
    /// Whether `w` is inside.
    pub fn contains(&self, w: f64) -> bool {
        w >= self.min_w && w <= self.max_w
    }
}

/// The band `action` should bring `spec`'s power into, or `None` for
/// proxy-side actions (verified by their ack alone). `limit_w` is the power
/// target in force when waking (`None`: nominal).
pub fn expected_band(action: Action, spec: &MinerSpec, limit_w: Option<u32>) -> Option<PowerBand> {
    // Slack for meter noise and profile/preset granularity.
    let slack = spec.nominal_w * 0.05;
    match action {
        Action::Sleep => Some(PowerBand {
            min_w: 0.0,
            max_w: spec.ramp.sleep_w + slack,
        }),
        Action::Wake => {
            let to = limit_w
                .map_or(spec.nominal_w, f64::from)
                .min(spec.nominal_w);
            Some(PowerBand {
                min_w: to - slack,
                max_w: f64::INFINITY,
            })
        }
        Action::SetPowerTarget(w) => Some(PowerBand {
            min_w: 0.0,
            max_w: f64::from(w) + slack,
        }),
        Action::Park | Action::Unpark | Action::Reroute(_) => None,
    }
}

/// Telemetry did not confirm the command.
#[derive(Debug, Error, Clone, PartialEq)]
#[non_exhaustive]
pub enum VerifyError {
    /// Readings arrived but power stayed outside the band.
    #[error("{miner}: power {last_w:.0} W not within {band:?} after {waited:?}")]
    NotConfirmed {
        /// Miner.
        miner: MinerId,
        /// The band expected.
        band: PowerBand,
        /// Last measured power, W.
        last_w: f64,
        /// How long it was watched.
        waited: Duration,
    },
    /// No reading could be taken before the deadline.
    #[error("no telemetry: {0}")]
    Telemetry(ActuatorError),
}

/// Poll `source` every `poll` until `miner`'s power is in `band` (returns
/// that reading) or `within` has passed.
pub async fn confirm<T: TelemetrySource>(
    source: &T,
    miner: MinerId,
    band: PowerBand,
    within: Duration,
    poll: Duration,
) -> Result<Telemetry, VerifyError> {
    let start = tokio::time::Instant::now();
    let deadline = start + within;
    let mut last: Result<Telemetry, ActuatorError> = Err(ActuatorError::Timeout { miner });
    loop {
        // Each read is bounded by its client's own timeout.
        last = match source.read(miner).await {
            Ok(t) if band.contains(t.power_w) => return Ok(t),
            Ok(t) => Ok(t),
            // Keep the last reading if there was one; else the error.
            Err(e) => last.or(Err(e)),
        };
        if tokio::time::Instant::now() + poll > deadline {
            break;
        }
        tokio::time::sleep(poll).await;
    }
    match last {
        Ok(t) => Err(VerifyError::NotConfirmed {
            miner,
            band,
            last_w: t.power_w,
            waited: start.elapsed(),
        }),
        Err(e) => Err(VerifyError::Telemetry(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::ControlSurface;

    #[test]
    fn bands_follow_the_action() {
        let spec = MinerSpec::new(MinerId(1), "S19j Pro", 104.0, 3068.0, ControlSurface::LuxOs);
        let sleep = expected_band(Action::Sleep, &spec, None).unwrap();
        assert!(sleep.contains(20.0) && !sleep.contains(3000.0));
        let wake = expected_band(Action::Wake, &spec, Some(2500)).unwrap();
        assert!(wake.contains(2500.0) && !wake.contains(1000.0));
        let pt = expected_band(Action::SetPowerTarget(2500), &spec, None).unwrap();
        assert!(pt.contains(2400.0) && !pt.contains(3068.0));
        assert!(expected_band(Action::Park, &spec, None).is_none());
    }
}
