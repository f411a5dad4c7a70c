//! Dispatch helpers: the command rate limiter and queue entries.

use std::collections::VecDeque;

use crate::time::Timestamp;

/// Sliding one-second window: at most `max` commands in any 1000 ms span.
///
/// A token bucket would allow `2 × max` across a window boundary; a log of the
/// last `max` issue times does not.
#[derive(Debug, Clone)]
pub(super) struct RateLimiter {
    max: usize,
    issued: VecDeque<Timestamp>,
}

pub(super) const WINDOW_MS: u64 = 1000;

impl RateLimiter {
    pub(super) fn new(max_per_sec: u32) -> Self {
        let max = max_per_sec.max(1) as usize;
        RateLimiter {
            max,
            issued: VecDeque::with_capacity(max),
        }
    }

    /// Whether one more command may go out at `now`.
    pub(super) fn allows(&mut self, now: Timestamp) -> bool {
        while let Some(&t) = self.issued.front() {
            if now.as_millis() >= t.as_millis() + WINDOW_MS {
                self.issued.pop_front();
            } else {
                break;
            }
        }
        self.issued.len() < self.max
    }

    /// Record a command issued at `now` (after [`allows`](Self::allows)).
    pub(super) fn record(&mut self, now: Timestamp) {
        self.issued.push_back(now);
    }

    /// When the next command may go out, if the window is full at `now`.
    pub(super) fn next_slot(&self, now: Timestamp) -> Timestamp {
        if self.issued.len() < self.max {
            return now;
        }
        self.issued
            .front()
            .map_or(now, |t| Timestamp::from_millis(t.as_millis() + WINDOW_MS))
            .max(now)
    }
}

/// A miner waiting for its next command, ordered by `not_before` then rank.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct QEntry {
    pub(super) not_before: Timestamp,
    pub(super) rank: u32,
    pub(super) idx: u32,
    pub(super) gen: u32,
}

/// Priority class of a queued step. Lower goes first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Class {
    /// Reduces draw (sleep, park, lower a power target).
    Curtail = 0,
    /// Fine-tune raise, reroute.
    Adjust = 1,
    /// Brings a curtailed miner back (wake, unpark): batched.
    Restore = 2,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sliding_window_never_exceeds_max() {
        let mut r = RateLimiter::new(3);
        let mut sent = vec![];
        for ms in (0..5000).step_by(50) {
            let now = Timestamp::from_millis(ms);
            while r.allows(now) {
                r.record(now);
                sent.push(ms);
            }
        }
        for (i, &t) in sent.iter().enumerate() {
            let in_window = sent[i..].iter().take_while(|&&u| u < t + 1000).count();
            assert!(in_window <= 3, "window at {t} has {in_window}");
        }
        assert_eq!(sent.len(), 15);
    }
}
