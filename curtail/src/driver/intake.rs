//! The gate between signal sources and the ledger: a signal is checked,
//! de-duplicated and rate-limited before it costs a ledger write (an fsync).
//!
//! A flood (an MQTT topic spammed, a feed stuck in a retry loop) would
//! otherwise fill the disk and stall the driver behind the ledger queue.
//! Refused signals are counted, never recorded; duplicates (the same signal,
//! timestamp and all, as the last one of its kind) are dropped; each kind
//! may burst to [`BURST`] and then passes at [`PER_SEC`] a second. Time is
//! the driver's clock, so tests run it virtually.

use std::collections::HashMap;

use crate::signal::{Signal, SignalKind};
use crate::time::Timestamp;

/// Signals of one kind a source may send at once.
pub const BURST: f64 = 50.0;
/// Sustained signals a second per kind (a meter read every 100 ms is 10).
pub const PER_SEC: f64 = 20.0;

/// What the intake decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Record it and hand it to the engine.
    Accept,
    /// Identical to the last accepted signal of its kind.
    Duplicate,
    /// Over its kind's rate.
    RateLimited,
}

struct Bucket {
    tokens: f64,
    at: Timestamp,
}

/// Per-kind duplicate filter and token bucket.
#[derive(Default)]
pub struct Intake {
    last: HashMap<SignalKind, Signal>,
    buckets: HashMap<SignalKind, Bucket>,
}

impl Intake {
    /// Decide on `signal`, received at `now`.
    pub fn admit(&mut self, now: Timestamp, signal: &Signal) -> Verdict {
        let kind = signal.kind();
        if self.last.get(&kind) == Some(signal) {
            return Verdict::Duplicate;
        }
        let b = self.buckets.entry(kind).or_insert(Bucket {
            tokens: BURST,
            at: now,
        });
        let refill = now.saturating_since(b.at).as_secs_f64() * PER_SEC;
        b.tokens = (b.tokens + refill).min(BURST);
        b.at = b.at.max(now);
        if b.tokens < 1.0 {
            return Verdict::RateLimited;
        }
        b.tokens -= 1.0;
        self.last.insert(kind, signal.clone());
        Verdict::Accept
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::signal::{DispatchSignal, PriceSignal};
    use std::time::Duration;

    fn price(at: Timestamp, usd: f64) -> Signal {
        Signal::Price(PriceSignal {
            at,
            usd_per_mwh: usd,
            forecast: vec![],
        })
    }

    #[test]
    fn duplicates_are_dropped_and_new_values_pass() {
        let mut i = Intake::default();
        let t = Timestamp::from_secs(1_000);
        assert_eq!(i.admit(t, &price(t, 30.0)), Verdict::Accept);
        assert_eq!(i.admit(t, &price(t, 30.0)), Verdict::Duplicate);
        assert_eq!(i.admit(t, &price(t, 31.0)), Verdict::Accept);
        // The same value later is a new sample (it refreshes staleness).
        let t2 = t + Duration::from_secs(1);
        assert_eq!(i.admit(t2, &price(t2, 31.0)), Verdict::Accept);
    }

    #[test]
    fn a_flood_is_cut_to_the_rate_and_other_kinds_pass() {
        let mut i = Intake::default();
        let t0 = Timestamp::from_secs(1_000);
        // 10,000 distinct samples within one second of the clock.
        let mut accepted = 0;
        for n in 0..10_000u64 {
            let t = t0 + Duration::from_micros(n * 100);
            if i.admit(t, &price(t, n as f64)) == Verdict::Accept {
                accepted += 1;
            }
        }
        assert!(
            (BURST as usize..=(BURST + PER_SEC) as usize + 1).contains(&accepted),
            "{accepted} of a flood accepted"
        );
        // Another kind has its own bucket.
        let d = Signal::Dispatch(DispatchSignal {
            at: t0,
            target_kw: Some(100.0),
        });
        assert_eq!(i.admit(t0, &d), Verdict::Accept);
        // After a quiet second the price kind passes again.
        let later = t0 + Duration::from_secs(3);
        assert_eq!(i.admit(later, &price(later, -1.0)), Verdict::Accept);
    }
}
