//! Balance mode's split of the fleet cap (`contract − other load − margin`)
//! into sleeps (coarse) and power targets (fine).
//!
//! The other load of a "mullet" site (AI/HPC) swings within seconds, so the
//! cap moves on every meter reading. Recomputing targets from scratch (as
//! [`apply_cap`](super::Engine) does for DR events) would sleep and wake
//! miners on every swing, and a wake takes 8-30 s. Instead the split is
//! incremental, starting from the targets already given:
//!
//! 1. **Coarse, with hysteresis.** The power-target miners that run form a
//!    band from the sum of their minimums to the sum of their nominals.
//!    Sleep the least efficient of them while the cap would sit in the
//!    bottom [`SLEEP_RESERVE`] of the band; wake the most efficient sleeper
//!    (at its minimum power) while it would sit in the top [`WAKE_RESERVE`]
//!    and the band with it keeps twice the sleep reserve below. Between the
//!    two, no miner sleeps or wakes.
//! 2. **Fine.** The rest of the gap to the aim is moved by power targets in
//!    chunks of at most [`CHUNK`] of a miner's range, spread over many
//!    miners: a small step ramps in the firmware's shortest time, so the fleet
//!    follows fastest when many miners take a small step each. Miners with no
//!    command in flight go first (one in flight would delay the new target
//!    until the old one is verified). Cuts take the least efficient first,
//!    raises the most efficient first.
//!
//! Changes smaller than the power-target deadband are not made; a cut is
//! always made when the fleet would be over the cap.

use super::planner::{Fill, EPS_W};
use super::*;
use crate::time::Timestamp;

/// Fraction of the running band kept free at its bottom: below it a miner
/// is slept (sleeping is quick, so little is kept).
const SLEEP_RESERVE: f64 = 0.05;
/// Fraction of the band kept free at its top: above it a sleeper is woken
/// (waking takes 8-30 s, so start early).
const WAKE_RESERVE: f64 = 0.25;
/// Largest power-target move per miner in one replan (first pass), fraction
/// of the miner's range; a later pass uses the whole range if needed.
const CHUNK: f64 = 0.25;

impl Engine {
    /// Whether the miner can take power targets now.
    fn flex(&self, idx: u32) -> bool {
        let c = &self.ctl[idx as usize];
        let spec = &self.fleet.by_index(idx).spec;
        spec.capabilities().power_target
            && !c.limit_broken
            && !c.unresponsive
            && spec.nominal_w - spec.ramp.min_power_w >= 1.0
    }

    /// Split `cap_w` over the miners `out` lets run (see the module docs).
    pub(super) fn apply_balance(&self, now: Timestamp, out: &mut [Target], cap_w: f64) -> Fill {
        let nominal_total: f64 = (0..out.len() as u32)
            .map(|i| self.expected_w(i, out[i as usize]))
            .sum();
        if nominal_total <= cap_w {
            return Fill {
                expected_w: nominal_total,
                binding: false,
            };
        }
        // Start from the targets already given where the base plan lets the
        // miner run; remember which miners balance may wake again.
        let mut may_wake = vec![false; out.len()];
        for idx in 0..out.len() as u32 {
            let i = idx as usize;
            if out[i] != Target::Run {
                if let Target::Curtail { forced } = &mut out[i] {
                    *forced = true;
                }
                continue;
            }
            let c = &self.ctl[i];
            out[i] = match c.target {
                Target::Limit(w) if self.flex(idx) => Target::Limit(w),
                Target::Curtail { .. } if c.esc == 0 => {
                    may_wake[i] = true;
                    Target::Curtail { forced: true }
                }
                Target::Curtail { .. } => Target::Curtail { forced: true },
                _ => Target::Run,
            };
        }
        let spec = |idx: u32| &self.fleet.by_index(idx).spec;
        let locked = |idx: u32| {
            let c = &self.ctl[idx as usize];
            !self.cfg.obligations_override_min_on && c.on && now < c.since + self.cfg.min_on
        };
        let cur = |t: Target, idx: u32| self.expected_w(idx, t);
        let aim = cap_w * (1.0 - self.cfg.target_margin);
        let tol = self.cfg.limit_deadband_w;

        // 1. Coarse.
        let band = |out: &[Target]| {
            let (mut fixed, mut lo, mut hi) = (0.0, 0.0, 0.0);
            for idx in 0..out.len() as u32 {
                let t = out[idx as usize];
                match t {
                    Target::Run | Target::Limit(_) if self.flex(idx) => {
                        lo += spec(idx).ramp.min_power_w;
                        hi += spec(idx).nominal_w;
                    }
                    _ => fixed += cur(t, idx),
                }
            }
            (fixed, lo, hi)
        };
        loop {
            let (fixed, lo, hi) = band(out);
            let room = aim - fixed;
            let span = (hi - lo).max(1.0);
            if room < lo + SLEEP_RESERVE * span {
                // Sleep the least efficient running flex miner.
                let Some(&idx) = self.order.iter().find(|&&i| {
                    matches!(out[i as usize], Target::Run | Target::Limit(_))
                        && self.flex(i)
                        && !locked(i)
                }) else {
                    break;
                };
                out[idx as usize] = Target::Curtail { forced: true };
                continue;
            }
            if room > hi - WAKE_RESERVE * span {
                // Wake the most efficient sleeper if the band keeps room below.
                let Some(&idx) = self.order.iter().rev().find(|&&i| may_wake[i as usize]) else {
                    break;
                };
                let s = spec(idx);
                // Woken at its minimum power (flex) or at nominal (sleep-only).
                let (woken_lo, woken_span, target) = if self.flex(idx) {
                    (
                        lo + s.ramp.min_power_w,
                        span + s.nominal_w - s.ramp.min_power_w,
                        Target::Limit(s.ramp.min_power_w.ceil() as u32),
                    )
                } else {
                    (lo + s.nominal_w, span, Target::Run)
                };
                // Hysteresis: the woken band keeps twice the sleep reserve.
                if room + s.ramp.sleep_w < woken_lo + 2.0 * SLEEP_RESERVE * woken_span {
                    break;
                }
                out[idx as usize] = target;
                may_wake[idx as usize] = false;
                continue;
            }
            break;
        }

        // 2. Fine: move power targets toward the aim.
        let mut total: f64 = (0..out.len() as u32).map(|i| cur(out[i as usize], i)).sum();
        // A miner with a command in flight, or whose last telemetry is still
        // far from its target (ramping), is busy: new steps go to others
        // first, so the fleet's ramps run side by side, not one after another.
        let busy = |idx: u32| {
            let c = &self.ctl[idx as usize];
            let m = self.fleet.by_index(idx);
            let tol = self.cfg.verify_tolerance * m.spec.nominal_w;
            c.inflight.is_some()
                || m.telemetry.is_some_and(|t| {
                    !c.applied.sleep && (t.power_w - self.expected_w(idx, c.target)).abs() > tol
                })
        };
        let cap_over = (total - cap_w).max(0.0);
        let mut r = aim - total;
        if r < -tol || cap_over > 0.0 {
            // Cut: least efficient first, idle miners first, chunked first.
            for (whole, want_busy) in [(false, false), (false, true), (true, false), (true, true)] {
                for &idx in &self.order {
                    if r >= -EPS_W {
                        break;
                    }
                    let t = out[idx as usize];
                    if !matches!(t, Target::Run | Target::Limit(_))
                        || !self.flex(idx)
                        || busy(idx) != want_busy
                    {
                        continue;
                    }
                    let s = spec(idx);
                    let now_w = cur(t, idx);
                    let mut cut = (now_w - s.ramp.min_power_w).min(-r);
                    if !whole {
                        cut = cut.min(CHUNK * (s.nominal_w - s.ramp.min_power_w));
                    }
                    if cut < 1.0 {
                        continue;
                    }
                    let w = (now_w - cut).floor().max(s.ramp.min_power_w);
                    out[idx as usize] = Target::Limit(w as u32);
                    r += now_w - w;
                    total -= now_w - w;
                }
            }
        } else if r > tol {
            // Raise: most efficient first, idle miners first, chunked first.
            for (whole, want_busy) in [(false, false), (false, true), (true, false), (true, true)] {
                for &idx in self.order.iter().rev() {
                    if r <= tol {
                        break;
                    }
                    let Target::Limit(w) = out[idx as usize] else {
                        continue;
                    };
                    if busy(idx) != want_busy {
                        continue;
                    }
                    let s = spec(idx);
                    let mut add = (s.nominal_w - f64::from(w)).min(r);
                    if !whole {
                        add = add.min(CHUNK * (s.nominal_w - s.ramp.min_power_w));
                    }
                    if add < tol.min(r) {
                        continue;
                    }
                    let nw = (f64::from(w) + add).floor();
                    out[idx as usize] = if nw >= s.nominal_w.floor() {
                        Target::Run
                    } else {
                        Target::Limit(nw as u32)
                    };
                    let added = cur(out[idx as usize], idx) - f64::from(w);
                    r -= added;
                    total += added;
                }
            }
        }
        // Still over (every flex miner at its minimum): sleep more.
        for &idx in &self.order {
            if total <= cap_w + EPS_W {
                break;
            }
            let t = out[idx as usize];
            if !matches!(t, Target::Run | Target::Limit(_)) || locked(idx) {
                continue;
            }
            let s = cur(t, idx) - self.curtail_w(idx);
            if s < 1.0 {
                continue;
            }
            out[idx as usize] = Target::Curtail { forced: true };
            total -= s;
        }
        Fill {
            expected_w: total,
            binding: true,
        }
    }
}
