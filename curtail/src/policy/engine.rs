//! The engine itself: per-miner control state, the inputs (`handle_*`) and
//! outputs (`poll_*`), resume after a restart and the engine's errors.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};

use thiserror::Error;

use crate::command::{Ack, Action, Command, CommandId, PoolId};
use crate::fleet::{Fleet, FleetError, MinerId, MinerSpec, MinerState, Telemetry};
use crate::signal::{
    DispatchSignal, DrEvent, ManualOverride, OverrideMode, PriceSignal, Signal, SignalError,
    SiteLoadSignal,
};
use crate::time::Timestamp;

use super::dispatch::{Class, QEntry, RateLimiter};
use super::{DrEventState, FailReason, Mode, Plan, PolicyConfig, PolicyEvent, SafeState};

/// Engine errors.
#[derive(Debug, Error, PartialEq)]
#[non_exhaustive]
pub enum PolicyError {
    /// Bad configuration.
    #[error("invalid policy config: {0}")]
    InvalidConfig(&'static str),
    /// A signal failed validation.
    #[error(transparent)]
    Signal(#[from] SignalError),
    /// Fleet error.
    #[error(transparent)]
    Fleet(#[from] FleetError),
    /// No such miner.
    #[error("unknown miner {0}")]
    UnknownMiner(MinerId),
    /// No such command in flight (late, duplicate or foreign ack).
    #[error("unknown or completed command {0}")]
    UnknownCommand(CommandId),
}

/// Per-miner target computed by the planner.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) enum Target {
    Run,
    Limit(u32),
    /// `forced`: an obligation, may skip the min-on dwell.
    Curtail {
        forced: bool,
    },
}

/// What the engine believes has been applied to a miner.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(super) struct Applied {
    pub(super) sleep: bool,
    pub(super) limit: Option<u32>,
    pub(super) parked: bool,
    pub(super) pool: Option<PoolId>,
}

/// What a resumed miner is held at (see [`Engine::resume`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) enum Held {
    /// Curtailed by a step of its chain.
    Curtail,
    /// Running under a fine-tune power target, W.
    Limit(u32),
}

/// One step of the curtail escalation chain.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) enum CurtailStep {
    Sleep,
    Limit(u32),
    Park,
}

#[derive(Clone, Debug)]
pub(super) struct Ctl {
    pub(super) target: Target,
    pub(super) applied: Applied,
    pub(super) inflight: Option<CommandId>,
    pub(super) gen: u32,
    /// Hashing (not asleep, not parked), for dwell.
    pub(super) on: bool,
    /// Last on/off transition.
    pub(super) since: Timestamp,
    pub(super) econ_on: bool,
    pub(super) esc: u8,
    pub(super) limit_broken: bool,
    pub(super) retries: u8,
    pub(super) restoring: bool,
    /// Set by [`Engine::resume`] until a fresh signal or the resume hold.
    pub(super) held: Option<Held>,
    pub(super) unresponsive: bool,
    /// The last telemetry read failed (rebooting, unplugged, network).
    pub(super) out_of_contact: bool,
    /// A curtail step failed while out of contact and the chain moved on:
    /// the step to go back to once a reading comes (a reboot, not a
    /// refusal; a miner that never answers again stays escalated).
    pub(super) back_to: Option<u8>,
}

impl Ctl {
    pub(super) fn new() -> Ctl {
        Ctl {
            target: Target::Run,
            applied: Applied::default(),
            inflight: None,
            gen: 0,
            on: true,
            since: Timestamp::ZERO,
            econ_on: true,
            esc: 0,
            limit_broken: false,
            retries: 0,
            restoring: false,
            held: None,
            unresponsive: false,
            out_of_contact: false,
            back_to: None,
        }
    }
}

#[derive(Clone, Debug)]
pub(super) struct Inflight {
    pub(super) idx: u32,
    pub(super) action: Action,
    pub(super) issued_at: Timestamp,
    pub(super) deadline: Timestamp,
    pub(super) acked: bool,
    /// A telemetry read failed while it was in flight: its failure may be
    /// the firmware going away (a reboot), not refusing.
    pub(super) lost_contact: bool,
}

#[derive(Clone, Debug)]
pub(super) struct EventSlot {
    pub(super) ev: DrEvent,
    pub(super) baseline_kw: f64,
    pub(super) state: DrEventState,
    pub(super) activation: Timestamp,
}

/// The policy engine. See the [module documentation](super) for the call
/// order. `Clone` gives an independent copy (what-if planning, backtests).
#[derive(Clone, Debug)]
pub struct Engine {
    pub(super) cfg: PolicyConfig,
    pub(super) fleet: Fleet,
    pub(super) ctl: Vec<Ctl>,
    /// Miner indices, least efficient first.
    pub(super) order: Vec<u32>,
    /// `rank[idx]`: position of `idx` in `order`.
    pub(super) rank: Vec<u32>,
    pub(super) started: Timestamp,

    pub(super) price: Option<PriceSignal>,
    pub(super) site_load: Option<SiteLoadSignal>,
    pub(super) dispatch_sig: Option<DispatchSignal>,
    pub(super) events: Vec<EventSlot>,
    pub(super) override_: Option<ManualOverride>,
    pub(super) route: Option<PoolId>,

    pub(super) stale: Option<String>,
    /// The ledger cannot be written and the driver asked for this safe
    /// state (see [`Engine::set_ledger_fault`]).
    pub(super) ledger_fault: Option<SafeState>,
    pub(super) plan: Plan,
    pub(super) last_decision: Option<(Mode, Option<f64>)>,
    pub(super) dirty: bool,
    pub(super) next_replan_at: Option<Timestamp>,
    pub(super) hold_until: Option<Timestamp>,
    pub(super) resumed_at: Option<Timestamp>,

    pub(super) queues: [BinaryHeap<Reverse<QEntry>>; 3],
    pub(super) inflight: HashMap<CommandId, Inflight>,
    pub(super) deadlines: BinaryHeap<Reverse<(Timestamp, u64)>>,
    pub(super) rate: RateLimiter,
    pub(super) restore_window: (Timestamp, u32),
    pub(super) next_command: u64,
    pub(super) out: VecDeque<PolicyEvent>,
    pub(super) scratch: Vec<Target>,
}

impl Engine {
    /// An engine for `fleet`, every miner assumed hashing with no command
    /// history. Call [`resume`](Self::resume) next if a ledger has history.
    pub fn new(cfg: PolicyConfig, fleet: Fleet, now: Timestamp) -> Result<Engine, PolicyError> {
        cfg.validate()?;
        let n = fleet.len();
        let mut e = Engine {
            rate: RateLimiter::new(cfg.max_commands_per_sec),
            cfg,
            fleet,
            ctl: vec![Ctl::new(); n],
            order: Vec::new(),
            rank: Vec::new(),
            started: now,
            price: None,
            site_load: None,
            dispatch_sig: None,
            events: Vec::new(),
            override_: None,
            route: None,
            stale: None,
            ledger_fault: None,
            plan: Plan {
                at: now,
                mode: Mode::Normal,
                safe_state: false,
                cap_kw: None,
                expected_kw: 0.0,
                feasible: true,
                reach_at: now,
                actions: Vec::new(),
            },
            last_decision: None,
            dirty: true,
            next_replan_at: None,
            hold_until: None,
            resumed_at: None,
            queues: [BinaryHeap::new(), BinaryHeap::new(), BinaryHeap::new()],
            inflight: HashMap::new(),
            deadlines: BinaryHeap::new(),
            restore_window: (Timestamp::ZERO, 0),
            next_command: 1,
            out: VecDeque::new(),
            scratch: Vec::new(),
        };
        e.rebuild_order();
        e.replan(now);
        Ok(e)
    }

    /// Add a miner to the fleet at runtime (assumed hashing).
    pub fn add_miner(&mut self, spec: MinerSpec) -> Result<(), PolicyError> {
        self.fleet.insert(spec)?;
        self.ctl.push(Ctl::new());
        self.rebuild_order();
        self.dirty = true;
        Ok(())
    }

    pub(super) fn rebuild_order(&mut self) {
        let n = self.fleet.len() as u32;
        let mut order: Vec<u32> = (0..n).collect();
        let fleet = &self.fleet;
        order.sort_by(|&a, &b| {
            let (sa, sb) = (&fleet.by_index(a).spec, &fleet.by_index(b).spec);
            sb.j_per_th()
                .total_cmp(&sa.j_per_th())
                .then(sa.id.cmp(&sb.id))
        });
        let mut rank = vec![0u32; n as usize];
        for (r, &idx) in order.iter().enumerate() {
            rank[idx as usize] = r as u32;
        }
        self.order = order;
        self.rank = rank;
    }

    // ----- getters -----

    /// The configuration.
    pub fn config(&self) -> &PolicyConfig {
        &self.cfg
    }

    /// The fleet with believed states and last telemetry.
    pub fn fleet(&self) -> &Fleet {
        &self.fleet
    }

    /// The plan made at the last replan (`plan().at`): targets, expected
    /// draw, and the pending steps with their estimated issue times as of
    /// then. It is not updated as commands go out; the next input that
    /// changes targets replaces it.
    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// Which signal is stale, if the safe state applies.
    pub fn stale_signal(&self) -> Option<&str> {
        self.stale.as_deref()
    }

    /// Commands issued and not yet verified or failed.
    pub fn in_flight(&self) -> usize {
        self.inflight.len()
    }

    /// Whether the miner is currently meant to be curtailed (not hashing at
    /// nominal), as of the last plan.
    pub fn is_curtail_target(&self, miner: MinerId) -> Option<bool> {
        let idx = self.fleet.index_of(miner)?;
        Some(!matches!(self.ctl[idx as usize].target, Target::Run))
    }

    /// The power target the plan gives the miner, if it is a fine-tune limit.
    pub fn limit_target(&self, miner: MinerId) -> Option<u32> {
        let idx = self.fleet.index_of(miner)?;
        match self.ctl[idx as usize].target {
            Target::Limit(w) => Some(w),
            _ => None,
        }
    }

    /// DR events known to the engine with their state.
    pub fn dr_events(&self) -> impl Iterator<Item = (&DrEvent, DrEventState)> {
        self.events.iter().map(|s| (&s.ev, s.state))
    }

    // ----- inputs -----

    /// The ledger has failed for longer than the driver tolerates (`Some`:
    /// the safe state to hold, shown as stale `ledger`), or works again
    /// (`None`). Re-plans at the next poll.
    pub fn set_ledger_fault(&mut self, fault: Option<SafeState>) {
        if self.ledger_fault != fault {
            self.ledger_fault = fault;
            self.dirty = true;
        }
    }

    /// Whether [`Engine::handle_signal`] would take `signal` at `now`:
    /// ranges and sizes, and a timestamp no further ahead of `now` than
    /// [`PolicyConfig::max_clock_skew`].
    pub fn admit(&self, now: Timestamp, signal: &Signal) -> Result<(), PolicyError> {
        signal.validate()?;
        signal.check_not_future(now, self.cfg.max_clock_skew)?;
        Ok(())
    }

    /// Feed a signal. Replans immediately; the new plan is in
    /// [`plan`](Self::plan) and its commands come out of
    /// [`poll_action`](Self::poll_action).
    pub fn handle_signal(&mut self, now: Timestamp, signal: Signal) -> Result<(), PolicyError> {
        self.admit(now, &signal)?;
        if self.dirty {
            self.replan(now);
        }
        if self
            .resumed_at
            .is_some_and(|r| signal.at() >= r && !matches!(signal, Signal::Route(_)))
        {
            self.release_held();
        }
        match signal {
            Signal::Price(p) => {
                if self.price.as_ref().is_none_or(|old| p.at >= old.at) {
                    self.price = Some(p);
                }
            }
            Signal::Hashprice(h) => {
                if let Some(e) = self.cfg.economics.as_mut() {
                    e.hashprice_usd_per_ph_day = h.usd_per_ph_day;
                }
            }
            Signal::DrEvent(ev) => {
                let baseline_kw = match self.events.iter().find(|s| s.ev.id == ev.id) {
                    Some(s) => s.baseline_kw,
                    None => self.plan.expected_kw + self.external_kw().unwrap_or(0.0),
                };
                self.events.retain(|s| s.ev.id != ev.id);
                self.out.push_back(PolicyEvent::DrEvent {
                    at: now,
                    event: ev.clone(),
                    state: DrEventState::Scheduled,
                    baseline_kw,
                });
                self.events.push(EventSlot {
                    activation: ev.start,
                    ev,
                    baseline_kw,
                    state: DrEventState::Scheduled,
                });
            }
            Signal::DrEnd { id, .. } => {
                if let Some(pos) = self.events.iter().position(|s| s.ev.id == id) {
                    let s = self.events.remove(pos);
                    self.out.push_back(PolicyEvent::DrEvent {
                        at: now,
                        event: s.ev,
                        state: DrEventState::Ended,
                        baseline_kw: s.baseline_kw,
                    });
                }
            }
            Signal::Dispatch(d) => {
                if self.dispatch_sig.is_none_or(|old| d.at >= old.at) {
                    self.dispatch_sig = Some(d);
                }
            }
            Signal::SiteLoad(s) => {
                if self.site_load.is_none_or(|old| s.at >= old.at) {
                    self.site_load = Some(s);
                }
            }
            Signal::Override(o) => {
                if matches!(o.mode, OverrideMode::RunAll) {
                    self.release_held();
                }
                self.override_ = match o.mode {
                    OverrideMode::Clear => None,
                    _ => Some(o),
                };
            }
            Signal::Route(r) => {
                self.route = r.pool;
                for idx in 0..self.ctl.len() as u32 {
                    self.enqueue(idx, now);
                }
            }
        }
        self.replan(now);
        Ok(())
    }

    /// Feed a telemetry reading. Confirms the miner's in-flight command if
    /// the reading shows its effect, and detects drift (a curtailed miner
    /// hashing again), which re-sends the curtailment.
    pub fn handle_telemetry(
        &mut self,
        now: Timestamp,
        miner: MinerId,
        t: Telemetry,
    ) -> Result<(), PolicyError> {
        let idx = self
            .fleet
            .index_of(miner)
            .ok_or(PolicyError::UnknownMiner(miner))?;
        if !(t.power_w.is_finite() && t.hashrate_ths.is_finite()) {
            return Err(PolicyError::Signal(SignalError::OutOfRange {
                kind: "telemetry",
                field: "power_w/hashrate_ths",
                value: t.power_w,
            }));
        }
        {
            let m = self.fleet.by_index_mut(idx);
            if m.telemetry.is_some_and(|old| old.at > t.at) {
                return Ok(()); // out of order
            }
            m.telemetry = Some(t);
        }
        let c = &mut self.ctl[idx as usize];
        c.out_of_contact = false;
        if c.inflight.is_none() {
            if let Some(step) = c.back_to.take() {
                self.step_back(idx, step, now);
            }
        }
        let c = &self.ctl[idx as usize];
        if let Some(id) = c.inflight {
            let inf = &self.inflight[&id];
            if !inf.action.is_proxy_side()
                && t.at > inf.issued_at
                && self.verifies(idx, inf.action, &t)
            {
                self.complete_ok(id, now);
            } else if inf.lost_contact
                && inf.acked
                && inf.action == Action::Sleep
                && t.at > inf.issued_at
                && self.hashing(idx, &t)
            {
                // Back from a reboot hashing: the sleep it acked is lost.
                self.complete_fail(id, now, FailReason::NotVerified);
            }
        } else if let Some(step) = self.drift(idx, &t) {
            let c = &mut self.ctl[idx as usize];
            match step {
                Action::Sleep => c.applied.sleep = false,
                _ => c.applied.limit = None,
            }
            c.on = !c.applied.sleep && !c.applied.parked;
            self.out.push_back(PolicyEvent::Drift { miner, at: now });
            self.enqueue(idx, now);
        }
        let state = self.derive_state(idx);
        self.fleet.by_index_mut(idx).state = state;
        Ok(())
    }

    /// A telemetry read of `miner` failed: the firmware may be rebooting.
    /// A curtail step that fails while the miner cannot be read is not taken
    /// for a refusal: if the miner answers again by the failure, the step is
    /// sent again; if not, the chain escalates (the miner may be gone for
    /// good) and goes back to that step at the next reading. Either at most
    /// [`PolicyConfig::max_retries`] times.
    pub fn handle_telemetry_error(
        &mut self,
        _now: Timestamp,
        miner: MinerId,
    ) -> Result<(), PolicyError> {
        let idx = self
            .fleet
            .index_of(miner)
            .ok_or(PolicyError::UnknownMiner(miner))?;
        let c = &mut self.ctl[idx as usize];
        c.out_of_contact = true;
        if let Some(inf) = c.inflight.and_then(|id| self.inflight.get_mut(&id)) {
            inf.lost_contact = true;
        }
        Ok(())
    }

    /// Feed an actuator's answer to a command.
    ///
    /// `Err(UnknownCommand)` for an ack that arrives after its command was
    /// already confirmed by telemetry or failed on a deadline: benign, log it.
    pub fn handle_ack(
        &mut self,
        now: Timestamp,
        id: CommandId,
        ack: Ack,
    ) -> Result<(), PolicyError> {
        let inf = self
            .inflight
            .get_mut(&id)
            .ok_or(PolicyError::UnknownCommand(id))?;
        match ack {
            Ack::Failed(reason) => self.complete_fail(id, now, FailReason::Rejected(reason)),
            Ack::Ok if inf.action.is_proxy_side() => self.complete_ok(id, now),
            Ack::Ok => {
                inf.acked = true;
                let idx = inf.idx;
                let action = inf.action;
                let ramp = self.fleet.by_index(idx).spec.ramp;
                let latency = match action {
                    Action::Sleep => ramp.sleep_latency,
                    Action::Wake => ramp.wake_latency,
                    _ => ramp.limit_latency,
                };
                let deadline = inf.issued_at + latency + self.cfg.verify_grace;
                inf.deadline = deadline;
                let issued_at = inf.issued_at;
                self.deadlines.push(Reverse((deadline, id.0)));
                if let Some(t) = self.fleet.by_index(idx).telemetry {
                    if t.at > issued_at && self.verifies(idx, action, &t) {
                        self.complete_ok(id, now);
                    }
                }
            }
        }
        Ok(())
    }

    /// Advance time: fail commands past their deadline (escalating
    /// curtailments), and replan when a signal went stale, an event window
    /// opened or closed, or an override lapsed.
    pub fn handle_timeout(&mut self, now: Timestamp) {
        while let Some(&Reverse((dl, id))) = self.deadlines.peek() {
            if dl > now {
                break;
            }
            self.deadlines.pop();
            let id = CommandId(id);
            if let Some(inf) = self.inflight.get(&id) {
                if inf.deadline == dl {
                    let reason = if inf.acked {
                        FailReason::NotVerified
                    } else {
                        FailReason::AckTimeout
                    };
                    self.complete_fail(id, now, reason);
                }
            }
        }
        if self.next_replan_at.is_some_and(|t| t <= now) {
            self.dirty = true;
        }
        if self.dirty {
            self.replan(now);
        }
    }

    // ----- outputs -----

    /// The next command to send, if one is due and the rate limit allows.
    /// Call until it returns `None`.
    #[must_use]
    pub fn poll_action(&mut self, now: Timestamp) -> Option<Command> {
        if self.dirty {
            self.replan(now);
        }
        for class in 0..3 {
            while let Some(&Reverse(e)) = self.queues[class].peek() {
                let c = &self.ctl[e.idx as usize];
                if e.gen != c.gen || c.inflight.is_some() || c.unresponsive {
                    self.queues[class].pop();
                    continue;
                }
                if e.not_before > now {
                    break;
                }
                let Some(step) = self.next_step(e.idx) else {
                    self.queues[class].pop();
                    continue;
                };
                let dwell = self.dwell_until(e.idx, step);
                if dwell > now {
                    self.queues[class].pop();
                    self.queues[class].push(Reverse(QEntry {
                        not_before: dwell,
                        ..e
                    }));
                    continue;
                }
                let restore_start = self.class_of(e.idx, step) == Class::Restore
                    && !self.ctl[e.idx as usize].restoring;
                if restore_start {
                    let (start, count) = self.restore_window;
                    let end = start + self.cfg.restore_interval;
                    if now >= end {
                        self.restore_window = (now, 0);
                    } else if count >= self.cfg.restore_batch {
                        self.queues[class].pop();
                        self.queues[class].push(Reverse(QEntry {
                            not_before: end,
                            ..e
                        }));
                        continue;
                    }
                }
                if !self.rate.allows(now) {
                    return None;
                }
                self.queues[class].pop();
                if restore_start {
                    self.restore_window.1 += 1;
                    self.ctl[e.idx as usize].restoring = true;
                }
                return Some(self.issue(e.idx, step, now));
            }
        }
        None
    }

    /// Every command due now, in order (convenience over
    /// [`poll_action`](Self::poll_action)).
    #[must_use]
    pub fn poll_actions(&mut self, now: Timestamp) -> Vec<Command> {
        std::iter::from_fn(|| self.poll_action(now)).collect()
    }

    /// The next event to record or surface.
    #[must_use]
    pub fn poll_event(&mut self) -> Option<PolicyEvent> {
        self.out.pop_front()
    }

    /// When the engine next needs [`handle_timeout`](Self::handle_timeout)
    /// or [`poll_action`](Self::poll_action), if ever. Call after draining
    /// `poll_action`.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Timestamp> {
        let mut t: Option<Timestamp> = self.next_replan_at;
        let mut consider = |x: Timestamp| t = Some(t.map_or(x, |t| t.min(x)));
        if let Some(&Reverse((dl, _))) = self.deadlines.peek() {
            consider(dl);
        }
        for q in &self.queues {
            if let Some(&Reverse(e)) = q.peek() {
                consider(e.not_before.max(self.rate.next_slot(e.not_before)));
            }
        }
        t
    }

    // ----- command life cycle -----

    pub(super) fn issue(&mut self, idx: u32, action: Action, now: Timestamp) -> Command {
        let id = CommandId(self.next_command);
        self.next_command += 1;
        let deadline = now + self.cfg.ack_timeout;
        self.inflight.insert(
            id,
            Inflight {
                idx,
                action,
                issued_at: now,
                deadline,
                acked: false,
                lost_contact: false,
            },
        );
        self.deadlines.push(Reverse((deadline, id.0)));
        self.rate.record(now);
        let c = &mut self.ctl[idx as usize];
        c.inflight = Some(id);
        let spec = &self.fleet.by_index(idx).spec;
        Command {
            id,
            miner: spec.id,
            surface: spec.surface,
            action,
            issued_at: now,
            curtail: !matches!(c.target, Target::Run),
        }
    }

    pub(super) fn apply(&mut self, idx: u32, action: Action, now: Timestamp) {
        let nominal = self.fleet.by_index(idx).spec.nominal_w;
        let c = &mut self.ctl[idx as usize];
        match action {
            Action::Sleep => c.applied.sleep = true,
            Action::Wake => c.applied.sleep = false,
            Action::SetPowerTarget(w) => {
                c.applied.limit = if f64::from(w) >= nominal.floor() {
                    None
                } else {
                    Some(w)
                }
            }
            Action::Park => c.applied.parked = true,
            Action::Unpark => c.applied.parked = false,
            Action::Reroute(p) => c.applied.pool = Some(p),
        }
        let on = !c.applied.sleep && !c.applied.parked;
        if on != c.on {
            c.on = on;
            c.since = now;
        }
    }

    pub(super) fn complete_ok(&mut self, id: CommandId, now: Timestamp) {
        let Some(inf) = self.inflight.remove(&id) else {
            return;
        };
        let idx = inf.idx;
        self.ctl[idx as usize].inflight = None;
        self.apply(idx, inf.action, now);
        let c = &mut self.ctl[idx as usize];
        if !matches!(inf.action, Action::Reroute(_)) {
            c.retries = 0;
        }
        let done = self.next_step(idx).is_none();
        let c = &mut self.ctl[idx as usize];
        if matches!(c.target, Target::Run) && done {
            c.esc = 0;
            c.limit_broken = false;
            c.restoring = false;
            c.unresponsive = false;
        }
        let state = self.derive_state(idx);
        self.fleet.by_index_mut(idx).state = state;
        self.out.push_back(PolicyEvent::Verified {
            command: id,
            miner: self.fleet.by_index(idx).spec.id,
            at: now,
        });
        self.enqueue(idx, now);
    }

    pub(super) fn complete_fail(&mut self, id: CommandId, now: Timestamp, reason: FailReason) {
        let Some(inf) = self.inflight.remove(&id) else {
            return;
        };
        let idx = inf.idx;
        let miner = self.fleet.by_index(idx).spec.id;
        {
            let c = &mut self.ctl[idx as usize];
            c.inflight = None;
            // Told but unconfirmed: remember, so a restore undoes it.
            if inf.acked {
                match inf.action {
                    Action::Sleep => c.applied.sleep = true,
                    Action::SetPowerTarget(w) => c.applied.limit = Some(w),
                    _ => {}
                }
            }
        }
        self.out.push_back(PolicyEvent::CommandFailed {
            command: id,
            miner,
            at: now,
            reason,
        });
        let target = self.ctl[idx as usize].target;
        let esc = self.ctl[idx as usize].esc;
        let step_action = self.curtail_step_at(idx, esc).map(step_to_action);
        let c = &self.ctl[idx as usize];
        let cut_short = !inf.action.is_proxy_side()
            && (inf.lost_contact || c.out_of_contact)
            && c.retries < self.cfg.max_retries;
        match target {
            Target::Curtail { .. }
                if step_action == Some(inf.action) && cut_short && !c.out_of_contact =>
            {
                // The firmware went away (a reboot) and is back: the same
                // step again, not the next one.
                self.ctl[idx as usize].retries += 1;
                self.forget_step(idx, inf.action);
                self.enqueue(idx, now);
            }
            Target::Curtail { .. } if step_action == Some(inf.action) => {
                if cut_short {
                    let c = &mut self.ctl[idx as usize];
                    c.back_to = Some(c.back_to.map_or(esc, |b| b.min(esc)));
                }
                let c = &mut self.ctl[idx as usize];
                c.esc = c.esc.saturating_add(1);
                let next = self.curtail_step_at(idx, esc + 1);
                match next {
                    Some(step) => self.out.push_back(PolicyEvent::Escalated {
                        miner,
                        from: inf.action,
                        to: step_to_action(step),
                        at: now,
                    }),
                    None => {
                        self.ctl[idx as usize].unresponsive = true;
                        self.out
                            .push_back(PolicyEvent::Unresponsive { miner, at: now });
                    }
                }
                self.dirty = true;
                self.enqueue(idx, now);
            }
            Target::Limit(_) if matches!(inf.action, Action::SetPowerTarget(_)) => {
                self.ctl[idx as usize].limit_broken = true;
                self.dirty = true;
            }
            _ => {
                let c = &mut self.ctl[idx as usize];
                c.retries = c.retries.saturating_add(1);
                if c.retries > self.cfg.max_retries {
                    c.unresponsive = true;
                    self.out
                        .push_back(PolicyEvent::Unresponsive { miner, at: now });
                } else {
                    self.enqueue_at(idx, now + self.cfg.retry_backoff);
                }
            }
        }
        let state = self.derive_state(idx);
        self.fleet.by_index_mut(idx).state = state;
    }

    /// Whether telemetry `t` shows `action` took effect.
    pub(super) fn verifies(&self, idx: u32, action: Action, t: &Telemetry) -> bool {
        let spec = &self.fleet.by_index(idx).spec;
        let tol = self.cfg.verify_tolerance * spec.nominal_w;
        match action {
            Action::Sleep => {
                t.power_w <= spec.ramp.sleep_w + tol
                    && t.hashrate_ths <= self.cfg.idle_hashrate_frac * spec.nominal_ths
            }
            Action::Wake => t.hashrate_ths >= self.cfg.hashing_frac * spec.nominal_ths,
            Action::SetPowerTarget(w) => t.power_w <= f64::from(w) + tol && t.hashrate_ths > 0.0,
            _ => false,
        }
    }

    /// Forget that a firmware step was applied, so it is sent again.
    fn forget_step(&mut self, idx: u32, action: Action) {
        let c = &mut self.ctl[idx as usize];
        match action {
            Action::Sleep => c.applied.sleep = false,
            Action::SetPowerTarget(_) => c.applied.limit = None,
            _ => {}
        }
    }

    /// The miner answers again after a curtail step failed out of contact:
    /// back to that step of the chain (see [`Engine::handle_telemetry_error`]).
    fn step_back(&mut self, idx: u32, step: u8, now: Timestamp) {
        let c = &self.ctl[idx as usize];
        if !matches!(c.target, Target::Curtail { .. }) || step >= c.esc {
            return;
        }
        let Some(action) = self.curtail_step_at(idx, step).map(step_to_action) else {
            return;
        };
        self.forget_step(idx, action);
        let c = &mut self.ctl[idx as usize];
        c.esc = step;
        c.retries += 1;
        c.unresponsive = false;
        c.gen = c.gen.wrapping_add(1);
        self.dirty = true;
        self.enqueue(idx, now);
    }

    /// Whether telemetry `t` shows the miner hashing.
    pub(super) fn hashing(&self, idx: u32, t: &Telemetry) -> bool {
        t.hashrate_ths >= self.cfg.hashing_frac * self.fleet.by_index(idx).spec.nominal_ths
    }

    /// The applied curtailment that telemetry `t` contradicts, if any.
    pub(super) fn drift(&self, idx: u32, t: &Telemetry) -> Option<Action> {
        let c = &self.ctl[idx as usize];
        if matches!(c.target, Target::Run) {
            return None;
        }
        let spec = &self.fleet.by_index(idx).spec;
        if c.applied.sleep
            && !c.applied.parked
            && t.hashrate_ths >= self.cfg.hashing_frac * spec.nominal_ths
        {
            return Some(Action::Sleep);
        }
        if let Some(w) = c.applied.limit {
            let tol = self.cfg.verify_tolerance * spec.nominal_w;
            if !c.applied.sleep && t.power_w > f64::from(w) + tol {
                return Some(Action::SetPowerTarget(w));
            }
        }
        None
    }

    pub(super) fn derive_state(&self, idx: u32) -> MinerState {
        let c = &self.ctl[idx as usize];
        let m = self.fleet.by_index(idx);
        if c.applied.parked {
            MinerState::Parked
        } else if c.applied.sleep {
            MinerState::Sleeping
        } else if let Some(w) = c.applied.limit {
            MinerState::PowerLimited(w)
        } else if m
            .telemetry
            .is_some_and(|t| t.hashrate_ths >= self.cfg.hashing_frac * m.spec.nominal_ths)
        {
            MinerState::Hashing
        } else {
            MinerState::Unknown
        }
    }

    // ----- per-miner reconcile -----

    /// Step `esc` of the miner's curtail chain: sleep (if the firmware can),
    /// power target at its minimum (if it can), park.
    pub(super) fn curtail_step_at(&self, idx: u32, esc: u8) -> Option<CurtailStep> {
        let spec = &self.fleet.by_index(idx).spec;
        let caps = spec.capabilities();
        let mut k = esc;
        if caps.sleep {
            if k == 0 {
                return Some(CurtailStep::Sleep);
            }
            k -= 1;
        }
        if caps.power_target && !self.ctl[idx as usize].limit_broken {
            if k == 0 {
                return Some(CurtailStep::Limit(spec.ramp.min_power_w as u32));
            }
            k -= 1;
        }
        (k == 0).then_some(CurtailStep::Park)
    }

    /// Next command to move the miner toward its target, if any.
    pub(super) fn next_step(&self, idx: u32) -> Option<Action> {
        let c = &self.ctl[idx as usize];
        if c.inflight.is_some() {
            return None;
        }
        let spec = &self.fleet.by_index(idx).spec;
        let a = c.applied;
        let power = match c.target {
            Target::Curtail { .. } => match self.curtail_step_at(idx, c.esc) {
                Some(CurtailStep::Sleep) if !a.sleep => Some(Action::Sleep),
                Some(CurtailStep::Limit(w)) if a.limit != Some(w) => {
                    Some(Action::SetPowerTarget(w))
                }
                Some(CurtailStep::Park) if !a.parked => Some(Action::Park),
                _ => None,
            },
            Target::Limit(w) => {
                if a.parked {
                    Some(Action::Unpark)
                } else if a.sleep {
                    Some(Action::Wake)
                } else {
                    let current = a.limit.map_or(spec.nominal_w, f64::from);
                    ((current - f64::from(w)).abs() > self.cfg.limit_deadband_w)
                        .then_some(Action::SetPowerTarget(w))
                }
            }
            Target::Run => {
                if a.parked {
                    Some(Action::Unpark)
                } else if a.sleep {
                    Some(Action::Wake)
                } else {
                    a.limit
                        .is_some()
                        .then_some(Action::SetPowerTarget(spec.nominal_w.floor() as u32))
                }
            }
        };
        power.or_else(|| match (self.route, a.pool) {
            (Some(p), cur) if cur != Some(p) && !a.parked => Some(Action::Reroute(p)),
            _ => None,
        })
    }

    pub(super) fn class_of(&self, idx: u32, step: Action) -> Class {
        let c = &self.ctl[idx as usize];
        match step {
            Action::Sleep | Action::Park => Class::Curtail,
            Action::Wake | Action::Unpark => Class::Restore,
            Action::SetPowerTarget(w) => {
                let nominal = self.fleet.by_index(idx).spec.nominal_w;
                let current = c.applied.limit.map_or(nominal, f64::from);
                if f64::from(w) < current {
                    Class::Curtail
                } else {
                    Class::Adjust
                }
            }
            Action::Reroute(_) => Class::Adjust,
        }
    }

    /// Earliest time dwell rules allow `step`.
    pub(super) fn dwell_until(&self, idx: u32, step: Action) -> Timestamp {
        let c = &self.ctl[idx as usize];
        match step {
            Action::Sleep | Action::Park if c.on => {
                let forced = matches!(c.target, Target::Curtail { forced: true });
                if forced && self.cfg.obligations_override_min_on {
                    Timestamp::ZERO
                } else {
                    c.since + self.cfg.min_on
                }
            }
            Action::Wake | Action::Unpark if !c.on => c.since + self.cfg.min_off,
            _ => Timestamp::ZERO,
        }
    }

    pub(super) fn enqueue(&mut self, idx: u32, now: Timestamp) {
        self.enqueue_at(idx, now);
    }

    pub(super) fn enqueue_at(&mut self, idx: u32, not_before: Timestamp) {
        let c = &self.ctl[idx as usize];
        if c.inflight.is_some() || c.unresponsive {
            return;
        }
        let Some(step) = self.next_step(idx) else {
            return;
        };
        let class = self.class_of(idx, step);
        let rank = match class {
            Class::Restore => self.order.len() as u32 - self.rank[idx as usize],
            _ => self.rank[idx as usize],
        };
        let not_before = not_before.max(self.dwell_until(idx, step));
        self.queues[class as usize].push(Reverse(QEntry {
            not_before,
            rank,
            idx,
            gen: c.gen,
        }));
    }

    pub(super) fn release_held(&mut self) {
        if self.hold_until.take().is_some() {
            for c in &mut self.ctl {
                c.held = None;
            }
            self.dirty = true;
        }
    }

    pub(super) fn external_kw(&self) -> Option<f64> {
        self.site_load.map(|s| s.external_kw)
    }
}

pub(super) fn step_to_action(s: CurtailStep) -> Action {
    match s {
        CurtailStep::Sleep => Action::Sleep,
        CurtailStep::Limit(w) => Action::SetPowerTarget(w),
        CurtailStep::Park => Action::Park,
    }
}
