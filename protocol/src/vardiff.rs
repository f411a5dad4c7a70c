//! Per-miner variable difficulty as a pure state machine.
//!
//! Feed it accepted shares with [`Vardiff::on_share`] and ask
//! [`Vardiff::poll`] whether the difficulty should change; the caller passes
//! the time in, so tests run on a virtual clock. New difficulties are powers
//! of two with a configurable floor (see [`crate::difficulty::round_pow2`]).

use crate::difficulty::round_pow2;
use std::time::{Duration, Instant};

/// Vardiff settings.
#[derive(Debug, Clone, PartialEq)]
pub struct VardiffConfig {
    /// Shares per minute to aim for.
    pub shares_per_minute: f64,
    /// Lowest difficulty ever assigned (rounded up to a power of two).
    pub min_difficulty: f64,
    /// Highest difficulty ever assigned.
    pub max_difficulty: f64,
    /// Retarget after this long (or sooner, see `fast_retarget_shares`).
    pub retarget_interval: Duration,
    /// Retarget early once this many shares arrived in a window.
    pub fast_retarget_shares: u32,
    /// Do nothing while the observed rate is within this factor of the goal.
    pub tolerance: f64,
    /// Largest change per retarget (factor up or down).
    pub max_step: f64,
}

impl Default for VardiffConfig {
    fn default() -> Self {
        Self {
            shares_per_minute: 12.0,
            min_difficulty: 1.0,
            max_difficulty: 1e15,
            retarget_interval: Duration::from_secs(60),
            fast_retarget_shares: 64,
            tolerance: 1.5,
            max_step: 16.0,
        }
    }
}

/// One miner's vardiff state.
#[derive(Debug, Clone)]
pub struct Vardiff {
    cfg: VardiffConfig,
    difficulty: f64,
    window_start: Instant,
    shares: u32,
}

impl Vardiff {
    /// Start at `initial` (rounded to a power of two within the limits).
    pub fn new(cfg: VardiffConfig, initial: f64, now: Instant) -> Self {
        let d = round_pow2(initial, cfg.min_difficulty).min(cfg.max_difficulty);
        Self {
            cfg,
            difficulty: d,
            window_start: now,
            shares: 0,
        }
    }

    /// Current difficulty.
    pub fn difficulty(&self) -> f64 {
        self.difficulty
    }

    /// Force a difficulty (e.g. `mining.suggest_difficulty`), within limits.
    pub fn set(&mut self, difficulty: f64, now: Instant) -> f64 {
        self.difficulty =
            round_pow2(difficulty, self.cfg.min_difficulty).min(self.cfg.max_difficulty);
        self.window_start = now;
        self.shares = 0;
        self.difficulty
    }

    /// Count a share that met the current difficulty.
    pub fn on_share(&mut self) {
        self.shares = self.shares.saturating_add(1);
    }

    /// When the next retarget check is due.
    pub fn poll_timeout(&self) -> Instant {
        self.window_start + self.cfg.retarget_interval
    }

    /// Returns a new difficulty when it should change; restarts the window.
    #[must_use]
    pub fn poll(&mut self, now: Instant) -> Option<f64> {
        let elapsed = now.saturating_duration_since(self.window_start);
        let fast = self.shares >= self.cfg.fast_retarget_shares;
        if elapsed < self.cfg.retarget_interval && !(fast && elapsed >= Duration::from_secs(1)) {
            return None;
        }
        let minutes = elapsed.as_secs_f64() / 60.0;
        let rate = self.shares as f64 / minutes.max(1e-9);
        let goal = self.cfg.shares_per_minute;
        self.window_start = now;
        self.shares = 0;
        let ratio = if rate == 0.0 {
            // Silence: step down hard, the miner may be far slower than assumed.
            1.0 / self.cfg.max_step.min(4.0)
        } else {
            (rate / goal).clamp(1.0 / self.cfg.max_step, self.cfg.max_step)
        };
        if ratio < self.cfg.tolerance && ratio > 1.0 / self.cfg.tolerance {
            return None;
        }
        let next = round_pow2(self.difficulty * ratio, self.cfg.min_difficulty)
            .min(self.cfg.max_difficulty);
        if next == self.difficulty {
            return None;
        }
        self.difficulty = next;
        Some(next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Simulate a miner of `hashrate` H/s for `minutes`, returning the final difficulty.
    fn converge(hashrate: f64, start: f64, minutes: u32) -> f64 {
        let t0 = Instant::now();
        let cfg = VardiffConfig::default();
        let mut v = Vardiff::new(cfg, start, t0);
        let mut carry = 0.0;
        for s in 0..minutes * 60 {
            let now = t0 + Duration::from_secs(s as u64);
            // Expected shares this second at the current difficulty.
            carry += hashrate / (v.difficulty() * 4_294_967_296.0);
            while carry >= 1.0 {
                v.on_share();
                carry -= 1.0;
            }
            let _ = v.poll(now);
        }
        v.difficulty()
    }

    #[test]
    fn converges_to_goal_rate_from_both_sides() {
        // 100 TH/s at 12 shares/min wants ~116k difficulty: 65536 or 131072.
        for start in [1.0, 1e9] {
            let d = converge(100e12, start, 30);
            assert!(d == 65536.0 || d == 131072.0, "start {start}: {d}");
        }
    }

    #[test]
    fn floor_and_powers_of_two() {
        let t0 = Instant::now();
        let cfg = VardiffConfig {
            min_difficulty: 256.0,
            ..Default::default()
        };
        let mut v = Vardiff::new(cfg, 1.0, t0);
        assert_eq!(v.difficulty(), 256.0);
        // Silence keeps stepping down but never below the floor.
        for m in 1..10 {
            let _ = v.poll(t0 + Duration::from_secs(60 * m));
        }
        assert_eq!(v.difficulty(), 256.0);
        assert_eq!(v.set(1000.0, t0), 512.0);
    }

    #[test]
    fn no_change_inside_tolerance_and_fast_retarget() {
        let t0 = Instant::now();
        let mut v = Vardiff::new(VardiffConfig::default(), 1024.0, t0);
        for _ in 0..12 {
            v.on_share();
        }
        assert_eq!(
            v.poll(t0 + Duration::from_secs(30)),
            None,
            "window not over"
        );
        assert_eq!(
            v.poll(t0 + Duration::from_secs(60)),
            None,
            "12/min is the goal"
        );
        // A flood retargets early, capped at max_step per step.
        for _ in 0..1000 {
            v.on_share();
        }
        assert_eq!(v.poll(t0 + Duration::from_secs(62)), Some(16384.0));
    }
}
