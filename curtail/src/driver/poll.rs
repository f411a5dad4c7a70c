//! The telemetry poller: every miner read each poll interval, a bounded
//! number at a time, readings handed to the loop; and the measured-kW meter.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::actuator::{ActuatorError, TelemetrySource};
use crate::fleet::{MinerId, Telemetry};
use crate::time::{EdgeClock, Timestamp};

pub(super) enum PollMsg {
    Reading(MinerId, Telemetry),
    Error(MinerId, ActuatorError),
    RoundDone(Timestamp),
}

pub(super) async fn poll_loop<T: TelemetrySource + 'static, C: EdgeClock>(
    miners: Vec<MinerId>,
    source: Arc<T>,
    clock: Arc<C>,
    tx: mpsc::Sender<PollMsg>,
    every: Duration,
    concurrency: usize,
    stop: CancellationToken,
) {
    loop {
        let started = clock.now();
        let mut reads = futures::stream::iter(miners.iter().copied())
            .map(|m| {
                let (source, clock) = (source.clone(), clock.clone());
                async move {
                    let at = clock.now();
                    (m, at, source.read(m).await)
                }
            })
            .buffer_unordered(concurrency);
        loop {
            let next = tokio::select! {
                _ = stop.cancelled() => return,
                n = reads.next() => n,
            };
            let Some((m, at, r)) = next else { break };
            let msg = match r {
                Ok(mut t) => {
                    t.at = at;
                    PollMsg::Reading(m, t)
                }
                Err(e) => PollMsg::Error(m, e),
            };
            if tx.send(msg).await.is_err() {
                return;
            }
        }
        if tx.send(PollMsg::RoundDone(clock.now())).await.is_err() {
            return;
        }
        let next = started + every;
        let wait = clock.real(next.saturating_since(clock.now()));
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// Measured-kW interval accumulator.
pub(super) struct Meter {
    pub(super) start: Timestamp,
    pub(super) sum_kw: f64,
    pub(super) rounds: u32,
    pub(super) seen: HashSet<MinerId>,
}

impl Meter {
    pub(super) fn new(start: Timestamp) -> Meter {
        Meter {
            start,
            sum_kw: 0.0,
            rounds: 0,
            seen: HashSet::new(),
        }
    }
}
