//! Replanning: signals and fleet state in, one target per miner out.
//!
//! Cost is O(n) per replan over a fleet kept sorted least efficient first
//! (the sort happens only when the fleet changes), plus O(k log k) to order
//! the k pending actions of the plan.

use std::fmt::Write as _;

use super::dispatch::Class;
use super::*;
use std::time::Duration;

use crate::command::Action;
use crate::signal::{DrTarget, ManualOverride, OverrideMode};
use crate::time::Timestamp;

/// Power below which a remainder counts as met, W.
pub(super) const EPS_W: f64 = 0.5;

/// Which required signals are stale, with the safe state each asks for.
#[derive(Clone, Copy, Debug, Default)]
struct Stale {
    price: Option<SafeState>,
    site: Option<SafeState>,
    dispatch: Option<SafeState>,
    /// Not a signal: the ledger cannot be written (set by the driver).
    ledger: Option<SafeState>,
}

impl Stale {
    fn any(&self, s: SafeState) -> bool {
        [self.price, self.site, self.dispatch, self.ledger].contains(&Some(s))
    }
    fn describe(&self) -> Option<String> {
        let mut v = Vec::new();
        if self.price.is_some() {
            v.push("price");
        }
        if self.site.is_some() {
            v.push("site_load");
        }
        if self.dispatch.is_some() {
            v.push("dispatch");
        }
        if self.ledger.is_some() {
            v.push("ledger");
        }
        (!v.is_empty()).then(|| v.join(","))
    }
}

/// The tightest fleet cap and where it comes from.
#[derive(Clone, Debug)]
struct Cap {
    watts: f64,
    mode: Mode,
    reason: String,
}

fn tighten(cap: &mut Option<Cap>, watts: f64, mode: Mode, reason: impl FnOnce() -> String) {
    let watts = watts.max(0.0);
    if cap.as_ref().is_none_or(|c| watts < c.watts) {
        *cap = Some(Cap {
            watts,
            mode,
            reason: reason(),
        });
    }
}

impl Engine {
    /// Recompute every miner's target and the plan.
    pub(super) fn replan(&mut self, now: Timestamp) {
        let mut next: Option<Timestamp> = None;
        let mut wake_at = |t: Timestamp| {
            if t > now {
                next = Some(next.map_or(t, |n: Timestamp| n.min(t)));
            }
        };

        // Time-bounded inputs.
        match self.override_.as_ref().and_then(|o| o.until) {
            Some(u) if u <= now => self.override_ = None,
            Some(u) => wake_at(u),
            None => {}
        }
        match self.hold_until {
            Some(h) if h <= now => self.release_held(),
            Some(h) => wake_at(h),
            None => {}
        }
        let mut i = 0;
        while i < self.events.len() {
            let s = &self.events[i];
            if s.ev.end.is_some_and(|e| e <= now) {
                let s = self.events.remove(i);
                self.out.push_back(PolicyEvent::DrEvent {
                    at: now,
                    event: s.ev,
                    state: DrEventState::Ended,
                    baseline_kw: s.baseline_kw,
                });
            } else {
                if let Some(e) = s.ev.end {
                    wake_at(e);
                }
                i += 1;
            }
        }

        // Staleness.
        let stale = self.stale(now, &mut wake_at);
        let reason = stale.describe();
        if reason != self.stale {
            self.out.push_back(PolicyEvent::SafeState {
                at: now,
                stale: reason.clone(),
            });
            self.stale = reason;
        }

        let ov = self.override_.as_ref().map(|o| o.mode);
        let run_all = ov == Some(OverrideMode::RunAll);
        let curtail_all_override = ov == Some(OverrideMode::CurtailAll);
        let curtail_all_safe = !run_all && stale.any(SafeState::CurtailAll);

        // Economics.
        let econ_binding = !run_all && self.update_econ(now, stale.price);

        // Caps from everything already active.
        let mut cap = if run_all { None } else { self.cap(&stale) };

        // Targets.
        let mut out = std::mem::take(&mut self.scratch);
        self.base_targets(&mut out, run_all, curtail_all_override || curtail_all_safe);
        let mut fill = self.fill(now, &mut out, cap.as_ref());

        // Scheduled DR events: activate at start minus the ramp lead.
        if !run_all {
            let mut activated = false;
            for i in 0..self.events.len() {
                if self.events[i].state != DrEventState::Scheduled {
                    continue;
                }
                let start = self.events[i].ev.start;
                let activation = if start <= now {
                    start
                } else {
                    let ev_cap = self.event_cap_w(&self.events[i]);
                    let lead = self.lead_for(now, &out, ev_cap);
                    start - lead
                };
                self.events[i].activation = activation;
                if activation <= now {
                    self.events[i].state = DrEventState::Active;
                    activated = true;
                    let s = &self.events[i];
                    self.out.push_back(PolicyEvent::DrEvent {
                        at: now,
                        event: s.ev.clone(),
                        state: DrEventState::Active,
                        baseline_kw: s.baseline_kw,
                    });
                } else {
                    wake_at(activation);
                }
            }
            if activated {
                cap = self.cap(&stale);
                self.base_targets(&mut out, run_all, curtail_all_override || curtail_all_safe);
                fill = self.fill(now, &mut out, cap.as_ref());
            }
        }
        self.next_replan_at = next;

        // Apply the diff.
        let mut changes = 0usize;
        for idx in 0..out.len() as u32 {
            let new = out[idx as usize];
            let c = &mut self.ctl[idx as usize];
            if new == c.target {
                continue;
            }
            let material = match (new, c.target) {
                (Target::Curtail { .. }, Target::Curtail { .. }) => false,
                (a, b) => a != b,
            };
            c.target = new;
            c.gen = c.gen.wrapping_add(1);
            if material {
                changes += 1;
                c.unresponsive = false;
                c.retries = 0;
                if !matches!(new, Target::Run) {
                    c.restoring = false;
                }
            }
            self.enqueue(idx, now);
        }
        self.scratch = out;

        // Mode and decision.
        let (mode, cap_kw, why) = if run_all || curtail_all_override {
            let by = self.override_.as_ref().map_or("", |o| o.by.as_str());
            (Mode::Override, None, format!("override {ov:?} by {by}"))
        } else if curtail_all_safe {
            (
                Mode::SafeState,
                None,
                format!("safe state: stale {}", self.stale.as_deref().unwrap_or("")),
            )
        } else if let (Some(c), true) = (&cap, fill.binding) {
            (c.mode, Some(c.watts / 1000.0), c.reason.clone())
        } else if econ_binding {
            let p = self.price.as_ref().map_or(f64::NAN, |p| p.usd_per_mwh);
            (
                Mode::Price,
                cap.as_ref().map(|c| c.watts / 1000.0),
                format!("price {p:.2} $/MWh"),
            )
        } else {
            (
                Mode::Normal,
                cap.as_ref().map(|c| c.watts / 1000.0),
                "no binding constraint".into(),
            )
        };
        let mut reason = why;
        if let Some(s) = &self.stale {
            if mode != Mode::SafeState {
                let _ = write!(reason, "; stale {s}");
            }
        }
        self.build_plan(now, mode, cap_kw, fill.expected_w);
        let key = (mode, cap_kw.map(|k| (k * 1000.0).round()));
        let last = self
            .last_decision
            .map(|(m, c)| (m, c.map(|k| (k * 1000.0).round())));
        if changes > 0 || last != Some(key) {
            self.last_decision = Some((mode, cap_kw));
            self.out.push_back(PolicyEvent::Decision(Decision {
                at: now,
                mode,
                cap_kw,
                expected_kw: fill.expected_w / 1000.0,
                changes,
                reason,
            }));
        }
        self.dirty = false;
    }

    /// Which required signals are stale; registers when fresh ones go stale.
    fn stale(&self, now: Timestamp, wake_at: &mut impl FnMut(Timestamp)) -> Stale {
        let mut check = |rule: Option<Freshness>, last: Option<Timestamp>| {
            let f = rule?;
            // Never received: stale `max_age` after start (a start-up grace).
            let last = last.unwrap_or(self.started);
            let deadline = last + f.max_age;
            if now > deadline {
                Some(f.on_stale)
            } else {
                wake_at(deadline + Duration::from_millis(1));
                None
            }
        };
        let st = &self.cfg.staleness;
        Stale {
            price: if self.cfg.economics.is_some() {
                check(st.price, self.price.as_ref().map(|p| p.at))
            } else {
                None
            },
            site: if self.cfg.contract_kw.is_some() || self.site_load.is_some() {
                check(st.site_load, self.site_load.map(|s| s.at))
            } else {
                None
            },
            dispatch: if self.dispatch_sig.is_some() || st.dispatch_from_start {
                check(st.dispatch, self.dispatch_sig.map(|d| d.at))
            } else {
                None
            },
            ledger: self.ledger_fault,
        }
    }

    /// Update each miner's economic on/off with hysteresis. Returns whether
    /// any miner is economically off.
    fn update_econ(&mut self, now: Timestamp, price_stale: Option<SafeState>) -> bool {
        let Some(econ) = self.cfg.economics else {
            for c in &mut self.ctl {
                c.econ_on = true;
            }
            return false;
        };
        let price = match (price_stale, &self.price) {
            (Some(SafeState::KeepRunning), _) => {
                for c in &mut self.ctl {
                    c.econ_on = true;
                }
                return false;
            }
            (Some(SafeState::CurtailAll), _) | (_, None) => {
                return self.ctl.iter().any(|c| !c.econ_on);
            }
            (_, Some(p)) => p,
        };
        let p = price.usd_per_mwh;
        let horizon = now + self.cfg.min_on;
        let max_fc = price
            .forecast
            .iter()
            .filter(|f| f.start >= now && f.start < horizon)
            .map(|f| f.usd_per_mwh)
            .fold(f64::NEG_INFINITY, f64::max);
        let h = econ.hysteresis_usd_per_mwh;
        let mut any_off = false;
        for (idx, c) in self.ctl.iter_mut().enumerate() {
            let be = econ.breakeven_usd_per_mwh(self.fleet.by_index(idx as u32).spec.j_per_th());
            if c.econ_on {
                if p > be + h {
                    c.econ_on = false;
                }
            } else if p < be - h && max_fc <= be + h {
                c.econ_on = true;
            }
            any_off |= !c.econ_on;
        }
        any_off
    }

    /// Fleet cap from active events, dispatch, balance and override.
    fn cap(&self, stale: &Stale) -> Option<Cap> {
        let mut cap = None;
        for s in &self.events {
            if s.state == DrEventState::Active {
                tighten(&mut cap, self.event_cap_w(s), Mode::DrEvent, || {
                    format!("dr event {}: {:?}", s.ev.id, s.ev.target)
                });
            }
        }
        if let Some(d) = self.dispatch_sig {
            let usable = matches!(stale.dispatch, None | Some(SafeState::HoldLast));
            if let (true, Some(kw)) = (usable, d.target_kw) {
                tighten(&mut cap, kw * 1000.0, Mode::Dispatch, || {
                    format!("dispatch {kw:.1} kW")
                });
            }
        }
        if let (Some(contract), Some(s)) = (self.cfg.contract_kw, self.site_load) {
            if matches!(stale.site, None | Some(SafeState::HoldLast)) {
                let kw = contract - s.external_kw - self.cfg.balance_margin_kw;
                tighten(&mut cap, kw * 1000.0, Mode::Balance, || {
                    format!(
                        "balance: contract {contract:.1} kW, other load {:.1} kW",
                        s.external_kw
                    )
                });
            }
        }
        if let Some(ManualOverride {
            mode: OverrideMode::CapKw(kw),
            by,
            ..
        }) = &self.override_
        {
            tighten(&mut cap, kw * 1000.0, Mode::Override, || {
                format!("override cap {kw:.1} kW by {by}")
            });
        }
        cap
    }

    /// Fleet watts allowed by an event: its site target less other load.
    pub(super) fn event_cap_w(&self, s: &EventSlot) -> f64 {
        let site_kw = match s.ev.target {
            DrTarget::LimitKw(kw) => kw,
            DrTarget::ShedKw(kw) => s.baseline_kw - kw,
        };
        ((site_kw - self.external_kw().unwrap_or(0.0)) * 1000.0).max(0.0)
    }

    /// Time needed before an event's start: issue the extra curtailments it
    /// needs at the command rate, let the slowest of them ramp, plus margin.
    fn lead_for(&self, now: Timestamp, current: &[Target], ev_cap_w: f64) -> Duration {
        let mut trial = current.to_vec();
        let fill = self.apply_cap(now, &mut trial, Some(ev_cap_w));
        if !fill.binding {
            return self.cfg.dr_lead_margin;
        }
        let mut n = 0u64;
        let mut slowest = Duration::ZERO;
        for (idx, (t, cur)) in trial.iter().zip(current).enumerate() {
            if t != cur && !matches!(t, Target::Run) {
                n += 1;
                let ramp = self.fleet.by_index(idx as u32).spec.ramp;
                let lat = match t {
                    Target::Limit(_) => ramp.limit_latency,
                    _ => ramp.sleep_latency,
                };
                slowest = slowest.max(lat);
            }
        }
        let issue = Duration::from_millis(n * 1000 / u64::from(self.cfg.max_commands_per_sec));
        issue + slowest + self.cfg.dr_lead_margin
    }

    fn base_targets(&self, out: &mut Vec<Target>, run_all: bool, curtail_all: bool) {
        out.clear();
        out.extend(self.ctl.iter().map(|c| {
            if run_all {
                Target::Run
            } else if curtail_all {
                Target::Curtail { forced: true }
            } else if let Some(Held::Limit(w)) = c.held {
                Target::Limit(w)
            } else if c.held.is_some() || !c.econ_on {
                Target::Curtail { forced: false }
            } else {
                Target::Run
            }
        }));
    }

    /// Meet the binding cap: balance mode's incremental split when the
    /// balance cap is the tightest, the from-scratch fill otherwise.
    fn fill(&self, now: Timestamp, out: &mut [Target], cap: Option<&Cap>) -> Fill {
        match cap {
            Some(c) if c.mode == Mode::Balance => self.apply_balance(now, out, c.watts),
            _ => self.apply_cap(now, out, cap.map(|c| c.watts)),
        }
    }

    /// Draw of miner `idx` once curtailed by its current escalation step, W.
    pub(super) fn curtail_w(&self, idx: u32) -> f64 {
        let spec = &self.fleet.by_index(idx).spec;
        match self.curtail_step_at(idx, self.ctl[idx as usize].esc) {
            Some(CurtailStep::Sleep) => spec.ramp.sleep_w,
            Some(CurtailStep::Limit(w)) => f64::from(w),
            Some(CurtailStep::Park) => spec.ramp.parked_w,
            None => spec.nominal_w,
        }
    }

    pub(super) fn expected_w(&self, idx: u32, t: Target) -> f64 {
        match t {
            Target::Run => self.fleet.by_index(idx).spec.nominal_w,
            Target::Limit(w) => f64::from(w),
            Target::Curtail { .. } => self.curtail_w(idx),
        }
    }

    /// Cut `out` down to `cap_w`: curtail least efficient first while a whole
    /// miner fits in the excess, then lower power targets on the next ones to
    /// land just under the cap, and only then curtail more.
    fn apply_cap(&self, now: Timestamp, out: &mut [Target], cap_w: Option<f64>) -> Fill {
        let mut total: f64 = (0..out.len() as u32)
            .map(|i| self.expected_w(i, out[i as usize]))
            .sum();
        let Some(cap_w) = cap_w else {
            return Fill {
                expected_w: total,
                binding: false,
            };
        };
        if total <= cap_w {
            return Fill {
                expected_w: total,
                binding: false,
            };
        }
        for t in out.iter_mut() {
            if let Target::Curtail { forced } = t {
                *forced = true;
            }
        }
        let aim = cap_w * (1.0 - self.cfg.target_margin);
        let mut r = total - aim;
        let locked = |idx: u32| {
            let c = &self.ctl[idx as usize];
            !self.cfg.obligations_override_min_on && c.on && now < c.since + self.cfg.min_on
        };
        let saving = |idx: u32| self.fleet.by_index(idx).spec.nominal_w - self.curtail_w(idx);

        // 0. Miners already curtailing by escalation stay curtailed while the
        //    cap binds (counted at what they really draw): flipping them back
        //    would undo a half-finished escalation.
        for idx in 0..out.len() as u32 {
            let c = &self.ctl[idx as usize];
            if out[idx as usize] == Target::Run
                && c.esc > 0
                && matches!(c.target, Target::Curtail { .. })
            {
                out[idx as usize] = Target::Curtail { forced: true };
                let s = saving(idx);
                r -= s;
                total -= s;
            }
        }
        // 1. Whole miners, least efficient first, while they fit.
        let mut boundary = self.order.len();
        for (pos, &idx) in self.order.iter().enumerate() {
            if out[idx as usize] != Target::Run || locked(idx) {
                continue;
            }
            let s = saving(idx);
            if s < 1.0 {
                continue;
            }
            if s <= r + EPS_W {
                out[idx as usize] = Target::Curtail { forced: true };
                r -= s;
                total -= s;
            } else {
                boundary = pos;
                break;
            }
        }
        // 2. Fine-tune the remainder with power targets on the next miners.
        for &idx in &self.order[boundary..] {
            if r <= EPS_W {
                break;
            }
            let c = &self.ctl[idx as usize];
            let spec = &self.fleet.by_index(idx).spec;
            if out[idx as usize] != Target::Run
                || !spec.capabilities().power_target
                || c.limit_broken
                || c.unresponsive
            {
                continue;
            }
            let range = spec.nominal_w - spec.ramp.min_power_w;
            if range < 1.0 {
                continue;
            }
            let w = (spec.nominal_w - r.min(range))
                .floor()
                .max(spec.ramp.min_power_w);
            let cut = spec.nominal_w - w;
            out[idx as usize] = Target::Limit(w as u32);
            r -= cut;
            total -= cut;
        }
        // 3. Still over: curtail more (lands under the cap by less than a miner).
        for &idx in &self.order[boundary..] {
            if r <= EPS_W {
                break;
            }
            let now_w = match out[idx as usize] {
                Target::Run => self.fleet.by_index(idx).spec.nominal_w,
                Target::Limit(w) => f64::from(w),
                Target::Curtail { .. } => continue,
            };
            if locked(idx) {
                continue;
            }
            let s = now_w - self.curtail_w(idx);
            if s < 1.0 {
                continue;
            }
            out[idx as usize] = Target::Curtail { forced: true };
            r -= s;
            total -= s;
        }
        Fill {
            expected_w: total,
            binding: true,
        }
    }

    /// Rebuild [`Plan`] with estimated issue times for every pending step.
    fn build_plan(&mut self, now: Timestamp, mode: Mode, cap_kw: Option<f64>, expected_w: f64) {
        let rate = u64::from(self.cfg.max_commands_per_sec);
        let mut actions = std::mem::take(&mut self.plan.actions);
        actions.clear();
        let mut k = 0u64;
        let mut reach = now;
        let slot = |k: u64| now + Duration::from_millis(k * 1000 / rate);
        for pass in [Class::Curtail, Class::Adjust] {
            for &idx in &self.order {
                let Some(step) = self.next_step(idx) else {
                    continue;
                };
                if self.class_of(idx, step) != pass || self.ctl[idx as usize].unresponsive {
                    continue;
                }
                let at = slot(k).max(self.dwell_until(idx, step));
                k += 1;
                if pass == Class::Curtail {
                    let ramp = self.fleet.by_index(idx).spec.ramp;
                    let lat = if step == Action::Sleep {
                        ramp.sleep_latency
                    } else if step.is_proxy_side() {
                        Duration::ZERO
                    } else {
                        ramp.limit_latency
                    };
                    reach = reach.max(at + lat);
                }
                actions.push(PlannedAction {
                    at,
                    miner: self.fleet.by_index(idx).spec.id,
                    action: step,
                });
            }
        }
        let (ws, wc) = self.restore_window;
        let interval = self.cfg.restore_interval;
        let (mut batch_start, mut used) = if now < ws + interval {
            (ws, wc)
        } else {
            (now, 0)
        };
        for &idx in self.order.iter().rev() {
            let Some(step) = self.next_step(idx) else {
                continue;
            };
            let c = &self.ctl[idx as usize];
            if self.class_of(idx, step) != Class::Restore || c.unresponsive {
                continue;
            }
            let mut at = slot(k).max(self.dwell_until(idx, step));
            if !c.restoring {
                if used >= self.cfg.restore_batch || at >= batch_start + interval {
                    batch_start = at.max(batch_start + interval);
                    used = 0;
                }
                at = at.max(batch_start);
                used += 1;
            }
            k += 1;
            actions.push(PlannedAction {
                at,
                miner: self.fleet.by_index(idx).spec.id,
                action: step,
            });
        }
        actions.sort_by_key(|a| a.at);
        self.plan = Plan {
            at: now,
            mode,
            safe_state: self.stale.is_some(),
            cap_kw,
            expected_kw: expected_w / 1000.0,
            feasible: cap_kw.is_none_or(|c| expected_w <= c * 1000.0 + EPS_W),
            reach_at: reach,
            actions,
        };
    }
}

/// Result of [`Engine::apply_cap`].
#[derive(Clone, Copy, Debug)]
pub(super) struct Fill {
    pub(super) expected_w: f64,
    pub(super) binding: bool,
}
