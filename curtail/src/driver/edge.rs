//! What the driver talks to ([`Edge`]) and the actuator combinators that
//! build it: [`Route`] (firmware or proxy), [`Nothing`], shared `Arc`s.

use std::future::Future;
use std::sync::Arc;

use crate::actuator::{Actuator, ActuatorError, TelemetrySource};
use crate::command::Command;
use crate::fleet::{ControlSurface, MinerId, Telemetry};

/// One [`Actuator`] out of two: proxy-side actions (park, unpark, reroute)
/// go to `proxy`, firmware actions to `firmware` when it handles the
/// miner's surface; anything else is [`ActuatorError::Unsupported`].
#[derive(Clone, Debug)]
pub struct Route<F, P> {
    /// Firmware actuator (e.g. [`FleetActuator`](crate::actuators::FleetActuator)).
    pub firmware: F,
    /// Proxy actuator (park/unpark/reroute through the proxy's router).
    pub proxy: P,
}

impl<F: Actuator, P: Actuator> Actuator for Route<F, P> {
    fn handles(&self, surface: ControlSurface) -> bool {
        self.firmware.handles(surface)
    }

    async fn execute(&self, command: &Command) -> Result<(), ActuatorError> {
        if command.action.is_proxy_side() {
            self.proxy.execute(command).await
        } else if self.firmware.handles(command.surface) {
            self.firmware.execute(command).await
        } else {
            Err(unsupported(command))
        }
    }
}

/// An [`Actuator`] that can do nothing: every command is
/// [`ActuatorError::Unsupported`]. Stands in for a missing proxy (the engine
/// then reports miners it could only park as unresponsive).
#[derive(Clone, Copy, Debug, Default)]
pub struct Nothing;

impl Actuator for Nothing {
    fn handles(&self, _surface: ControlSurface) -> bool {
        false
    }

    fn execute(&self, command: &Command) -> impl Future<Output = Result<(), ActuatorError>> + Send {
        let e = unsupported(command);
        async move { Err(e) }
    }
}

fn unsupported(c: &Command) -> ActuatorError {
    ActuatorError::Unsupported {
        miner: c.miner,
        surface: c.surface,
        action: c.action.as_str(),
    }
}

/// A shared actuator (one client set serving commands and telemetry).
impl<A: Actuator> Actuator for Arc<A> {
    fn handles(&self, surface: ControlSurface) -> bool {
        (**self).handles(surface)
    }

    fn execute(&self, command: &Command) -> impl Future<Output = Result<(), ActuatorError>> + Send {
        (**self).execute(command)
    }
}

/// A shared telemetry source.
impl<T: TelemetrySource> TelemetrySource for Arc<T> {
    fn read(
        &self,
        miner: MinerId,
    ) -> impl Future<Output = Result<Telemetry, ActuatorError>> + Send {
        (**self).read(miner)
    }
}

/// What the driver talks to.
#[derive(Debug)]
pub struct Edge<A, T, C> {
    /// Carries out commands (firmware and proxy; see [`Route`]).
    pub actuator: A,
    /// Reads miners' power and hashrate.
    pub telemetry: T,
    /// The clock.
    pub clock: C,
}
