//! Engine tests on a virtual clock against simulated miners.

use std::collections::HashMap;
use std::time::Duration;

use super::*;
use crate::command::{Ack, Action, Command, CommandId};
use crate::fleet::{ControlSurface, Fleet, MinerId, MinerSpec, MinerState, Telemetry};
use crate::signal::{
    DispatchSignal, DrEvent, DrTarget, ManualOverride, OverrideMode, PricePoint, PriceSignal,
    Signal, SiteLoadSignal,
};
use crate::time::Timestamp;

const T0: u64 = 1_700_000_000;

fn t(secs: u64) -> Timestamp {
    Timestamp::from_secs(T0 + secs)
}

fn base_cfg() -> PolicyConfig {
    PolicyConfig {
        staleness: Staleness::NONE,
        ..PolicyConfig::default()
    }
}

/// How a simulated miner answers.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Behavior {
    Normal,
    /// Acks a sleep but keeps hashing (Whatsminer v2 fire-and-forget).
    IgnoreSleep,
    /// Acks sleep and power targets, applies neither.
    IgnoreSleepAndLimit,
    /// Refuses sleep outright.
    RejectSleep,
    /// Acks a sleep (Whatsminer `power_off` with `respbefore`), then
    /// reboots before acting on it: out of reach for this many seconds,
    /// then back hashing at its persisted power target. Once.
    RebootOnSleep(u64),
}

#[derive(Clone, Debug)]
struct SimMiner {
    spec: MinerSpec,
    power: f64,
    hash: f64,
    asleep: bool,
    limit: Option<f64>,
    behavior: Behavior,
    /// Rebooting: unreachable until then.
    down_until: Option<Timestamp>,
}

impl SimMiner {
    fn settle(&mut self) {
        if self.asleep {
            self.power = self.spec.ramp.sleep_w;
            self.hash = 0.0;
        } else {
            self.power = self.limit.unwrap_or(self.spec.nominal_w);
            self.hash = self.spec.nominal_ths * self.power / self.spec.nominal_w;
        }
    }
}

/// The engine plus a simulated fleet on a 1 s virtual clock.
struct Sim {
    e: Engine,
    now: Timestamp,
    miners: Vec<SimMiner>,
    by_id: HashMap<MinerId, usize>,
    effects: Vec<(Timestamp, usize, Action)>,
    log: Vec<Command>,
    events: Vec<PolicyEvent>,
}

impl Sim {
    fn new(cfg: PolicyConfig, specs: Vec<MinerSpec>) -> Sim {
        let fleet = Fleet::from_specs(specs.clone()).unwrap();
        let e = Engine::new(cfg, fleet, t(0)).unwrap();
        let miners: Vec<SimMiner> = specs
            .into_iter()
            .map(|spec| {
                let mut m = SimMiner {
                    power: 0.0,
                    hash: 0.0,
                    asleep: false,
                    limit: None,
                    behavior: Behavior::Normal,
                    down_until: None,
                    spec,
                };
                m.settle();
                m
            })
            .collect();
        let by_id = miners
            .iter()
            .enumerate()
            .map(|(i, m)| (m.spec.id, i))
            .collect();
        let mut s = Sim {
            e,
            now: t(0),
            miners,
            by_id,
            effects: vec![],
            log: vec![],
            events: vec![],
        };
        s.drain();
        s
    }

    fn behave(&mut self, id: MinerId, b: Behavior) {
        let i = self.by_id[&id];
        self.miners[i].behavior = b;
    }

    fn signal(&mut self, s: Signal) {
        self.e.handle_signal(self.now, s).unwrap();
        self.drain();
    }

    fn price(&mut self, usd: f64) {
        self.signal(Signal::Price(PriceSignal {
            at: self.now,
            usd_per_mwh: usd,
            forecast: vec![],
        }));
    }

    /// Advance `secs` seconds, one tick per second.
    fn run(&mut self, secs: u64) {
        for _ in 0..secs {
            self.now = self.now + Duration::from_secs(1);
            self.tick();
        }
    }

    /// Advance to `until` jumping straight to the next thing that can
    /// happen (the engine's `poll_timeout` or a simulated effect landing),
    /// sending telemetry only for miners whose state changed. Checks that
    /// `poll_timeout` never leaves work undone.
    fn run_event_driven(&mut self, until: Timestamp) -> usize {
        let mut steps = 0;
        loop {
            let next_effect = self.effects.iter().map(|e| e.0).min();
            let next = [self.e.poll_timeout(), next_effect]
                .into_iter()
                .flatten()
                .min()
                .map_or(until, |n| n.min(until));
            if next <= self.now && steps > 0 && next == until {
                break;
            }
            self.now = next.max(self.now);
            steps += 1;
            let now = self.now;
            let due: Vec<_> = self
                .effects
                .iter()
                .filter(|e| e.0 <= now)
                .copied()
                .collect();
            self.effects.retain(|e| e.0 > now);
            for (_, i, a) in due {
                let m = &mut self.miners[i];
                match a {
                    Action::Sleep => m.asleep = true,
                    Action::Wake => m.asleep = false,
                    Action::SetPowerTarget(w) => {
                        m.limit = (f64::from(w) < m.spec.nominal_w.floor()).then_some(f64::from(w))
                    }
                    _ => {}
                }
                m.settle();
                let m = &self.miners[i];
                self.e
                    .handle_telemetry(
                        now,
                        m.spec.id,
                        Telemetry {
                            at: now,
                            power_w: m.power,
                            hashrate_ths: m.hash,
                        },
                    )
                    .unwrap();
            }
            self.e.handle_timeout(now);
            self.dispatch();
            if self.now >= until {
                break;
            }
            assert!(steps < 1_000_000, "poll_timeout loops");
        }
        steps
    }

    fn run_until(&mut self, at: Timestamp) {
        while self.now < at {
            self.now = self.now + Duration::from_secs(1);
            self.tick();
        }
    }

    fn tick(&mut self) {
        let now = self.now;
        let due: Vec<_> = self
            .effects
            .iter()
            .filter(|e| e.0 <= now)
            .copied()
            .collect();
        self.effects.retain(|e| e.0 > now);
        for (_, i, a) in due {
            let m = &mut self.miners[i];
            match a {
                Action::Sleep => m.asleep = true,
                Action::Wake => m.asleep = false,
                Action::SetPowerTarget(w) => {
                    m.limit = (f64::from(w) < m.spec.nominal_w.floor()).then_some(f64::from(w))
                }
                _ => {}
            }
            m.settle();
        }
        for m in &mut self.miners {
            if m.down_until.is_some_and(|t| t <= now) {
                // Back from the reboot: the sleep was never carried out.
                m.down_until = None;
                m.asleep = false;
                m.settle();
            }
        }
        for m in &self.miners {
            if m.down_until.is_some() {
                // No answer: what the driver's poll reports.
                self.e.handle_telemetry_error(now, m.spec.id).unwrap();
                continue;
            }
            self.e
                .handle_telemetry(
                    now,
                    m.spec.id,
                    Telemetry {
                        at: now,
                        power_w: m.power,
                        hashrate_ths: m.hash,
                    },
                )
                .unwrap();
        }
        self.e.handle_timeout(now);
        self.dispatch();
    }

    fn dispatch(&mut self) {
        let now = self.now;
        while let Some(c) = self.e.poll_action(now) {
            let i = self.by_id[&c.miner];
            let m = self.miners[i].clone();
            let ramp = m.spec.ramp;
            let ack = match (m.behavior, c.action) {
                // Firmware out of reach; the proxy still parks.
                (_, a) if m.down_until.is_some() && !a.is_proxy_side() => {
                    Ack::Failed("unreachable".into())
                }
                (Behavior::RebootOnSleep(secs), Action::Sleep) => {
                    let m = &mut self.miners[i];
                    m.behavior = Behavior::Normal;
                    m.down_until = Some(now + Duration::from_secs(secs));
                    Ack::Ok
                }
                (Behavior::RejectSleep, Action::Sleep) => Ack::Failed("refused".into()),
                (Behavior::IgnoreSleep, Action::Sleep)
                | (Behavior::IgnoreSleepAndLimit, Action::Sleep | Action::SetPowerTarget(_)) => {
                    Ack::Ok
                }
                (_, a) => {
                    let lat = match a {
                        Action::Sleep => ramp.sleep_latency,
                        Action::Wake => ramp.wake_latency,
                        Action::SetPowerTarget(_) => ramp.limit_latency,
                        _ => Duration::ZERO,
                    };
                    self.effects.push((now + lat, i, a));
                    Ack::Ok
                }
            };
            self.e.handle_ack(now, c.id, ack).unwrap();
            self.log.push(c);
        }
        self.drain();
    }

    fn drain(&mut self) {
        while let Some(ev) = self.e.poll_event() {
            self.events.push(ev);
        }
    }

    fn fleet_kw(&self) -> f64 {
        self.miners.iter().map(|m| m.power).sum::<f64>() / 1000.0
    }

    fn sim_miner(&self, id: MinerId) -> &SimMiner {
        &self.miners[self.by_id[&id]]
    }

    fn commands_for(&self, id: MinerId) -> Vec<&Command> {
        self.log.iter().filter(|c| c.miner == id).collect()
    }

    fn max_in_any_second(&self) -> usize {
        let times: Vec<u64> = self.log.iter().map(|c| c.issued_at.as_millis()).collect();
        (0..times.len())
            .map(|i| {
                times[i..]
                    .iter()
                    .take_while(|&&u| u < times[i] + 1000)
                    .count()
            })
            .max()
            .unwrap_or(0)
    }
}

/// (model, TH/s, W, surface): 17.5, 21.5, 26, 30.5 and 34.2 J/TH.
const MODELS: [(&str, f64, f64, ControlSurface); 5] = [
    ("S21", 200.0, 3500.0, ControlSurface::BraiinsOs),
    ("S19 XP", 140.0, 3010.0, ControlSurface::LuxOs),
    ("M50S", 126.0, 3276.0, ControlSurface::Whatsminer),
    ("S19j Pro", 100.0, 3050.0, ControlSurface::Vnish),
    ("S19", 95.0, 3250.0, ControlSurface::AntminerStock),
];

fn mixed_fleet(n: u64) -> Vec<MinerSpec> {
    (0..n)
        .map(|i| {
            let (model, ths, w, s) = MODELS[(i % MODELS.len() as u64) as usize];
            MinerSpec::new(MinerId(i), model, ths, w, s)
        })
        .collect()
}

#[test]
fn breakeven_matches_design_figures() {
    let e = Economics {
        hashprice_usd_per_ph_day: 39.5,
        pool_fee: 0.0,
        pue: 1.0,
        hysteresis_usd_per_mwh: 0.0,
    };
    assert!((e.breakeven_usd_per_mwh(15.0) - 109.7).abs() < 0.1);
    assert!((e.breakeven_usd_per_mwh(29.5) - 55.8).abs() < 0.1);
    let with_fee = Economics {
        pool_fee: 0.02,
        pue: 1.1,
        ..e
    };
    assert!((with_fee.breakeven_usd_per_mwh(15.0) - 109.72 * 0.98 / 1.1).abs() < 0.1);
}

/// Price mode: three models with breakevens ~$110, ~$77, ~$56 (15, 21.5 and
/// 29.5 J/TH at $39.5/PH/day). A price series crossing them turns the least
/// efficient off first and back on last, never inside the dwell times, and
/// not inside the hysteresis band.
#[test]
fn price_series_turns_models_off_and_on_in_efficiency_order() {
    let models = [
        ("A-15", 200.0, 3000.0),
        ("B-21.5", 140.0, 3010.0),
        ("C-29.5", 95.0, 2802.5),
    ];
    let specs: Vec<_> = (0..6u64)
        .map(|i| {
            let (m, ths, w) = models[(i / 2) as usize];
            MinerSpec::new(MinerId(i), m, ths, w, ControlSurface::LuxOs)
        })
        .collect();
    let cfg = PolicyConfig {
        economics: Some(Economics {
            hashprice_usd_per_ph_day: 39.5,
            pool_fee: 0.0,
            pue: 1.0,
            hysteresis_usd_per_mwh: 2.0,
        }),
        min_on: Duration::from_secs(120),
        min_off: Duration::from_secs(300),
        ..base_cfg()
    };
    let mut s = Sim::new(cfg, specs);
    let model_of = |id: MinerId| models[(id.0 / 2) as usize].0;
    let first = |s: &Sim, a: Action, model: &str, after: Timestamp| {
        s.log
            .iter()
            .filter(|c| c.action == a && model_of(c.miner) == model && c.issued_at >= after)
            .map(|c| c.issued_at)
            .min()
    };

    s.price(40.0);
    s.run(300);
    assert!(s.log.is_empty(), "all profitable at $40");

    s.price(60.0); // above C's 55.8 + 2
    s.run(300);
    assert_eq!(s.log.len(), 2);
    assert!(s
        .log
        .iter()
        .all(|c| c.action == Action::Sleep && model_of(c.miner) == "C-29.5"));

    s.price(80.0); // above B's 76.6 + 2
    s.run(300);
    s.price(120.0); // above A's 109.7 + 2
    let a_slept_from = s.now;
    s.run(30);
    let c_off = first(&s, Action::Sleep, "C-29.5", t(0)).unwrap();
    let b_off = first(&s, Action::Sleep, "B-21.5", t(0)).unwrap();
    let a_off = first(&s, Action::Sleep, "A-15", t(0)).unwrap();
    assert!(c_off < b_off && b_off < a_off, "least efficient first");
    assert!(s.e.fleet().iter().all(|m| m.state == MinerState::Sleeping));

    // $100 is under A's breakeven, but A has been off only 30 s: min-off holds it.
    s.price(100.0);
    s.run(10);
    assert!(
        first(&s, Action::Wake, "A-15", t(0)).is_none(),
        "min-off dwell"
    );
    s.run(300);
    let a_on = first(&s, Action::Wake, "A-15", t(0)).unwrap();
    assert!(
        a_on >= a_slept_from + Duration::from_secs(300),
        "woke at {a_on}, slept at {a_slept_from}"
    );
    assert!(first(&s, Action::Wake, "B-21.5", t(0)).is_none());

    s.price(70.0); // under B's 76.6 - 2
    s.run(300);
    s.price(50.0); // under C's 55.8 - 2
    s.run(60);
    let b_on = first(&s, Action::Wake, "B-21.5", t(0)).unwrap();
    let c_on = first(&s, Action::Wake, "C-29.5", t(0)).unwrap();
    assert!(a_on < b_on && b_on < c_on, "most efficient back first");
    assert!(s.e.fleet().iter().all(|m| m.state == MinerState::Hashing));

    // Inside C's hysteresis band (55.8 ± 2): no change.
    let n = s.log.len();
    s.price(57.0);
    s.run(10);
    assert_eq!(s.log.len(), n, "hysteresis band");

    // Above the band, but C woke under 120 s ago: the sleep waits for min-on.
    s.price(58.5);
    s.run(5);
    assert_eq!(s.log.len(), n, "min-on dwell");
    s.run(120);
    let c_off2 = first(&s, Action::Sleep, "C-29.5", c_on + Duration::from_secs(1)).unwrap();
    assert!(c_off2 >= c_on + Duration::from_secs(120));
}

/// A forecast spike inside the min-on window keeps an off miner off.
#[test]
fn forecast_spike_defers_wake() {
    let specs = vec![MinerSpec::new(
        MinerId(1),
        "C",
        95.0,
        2802.5,
        ControlSurface::LuxOs,
    )];
    let cfg = PolicyConfig {
        economics: Some(Economics {
            hashprice_usd_per_ph_day: 39.5,
            pool_fee: 0.0,
            pue: 1.0,
            hysteresis_usd_per_mwh: 2.0,
        }),
        min_off: Duration::from_secs(0),
        min_on: Duration::from_secs(600),
        ..base_cfg()
    };
    let mut s = Sim::new(cfg, specs);
    s.price(100.0);
    s.run(20);
    assert_eq!(s.log.len(), 1);
    let spike = |s: &Sim, dt: u64| PriceSignal {
        at: s.now,
        usd_per_mwh: 30.0,
        forecast: vec![PricePoint {
            start: s.now + Duration::from_secs(dt),
            usd_per_mwh: 300.0,
        }],
    };
    let sig = spike(&s, 300);
    s.signal(Signal::Price(sig));
    s.run(20);
    assert_eq!(s.log.len(), 1, "spike within min-on: stay off");
    let sig = spike(&s, 3600);
    s.signal(Signal::Price(sig));
    s.run(20);
    assert_eq!(
        s.log.last().unwrap().action,
        Action::Wake,
        "spike beyond min-on: wake"
    );
}

/// DR "shed to 40 % of site kW within 60 s": the fleet lands within ±2 % of
/// the target (fleet model and simulated meter), just under it, by the
/// deadline, using power targets to fine-tune, least efficient first, with
/// most miners still hashing.
#[test]
fn dr_shed_to_40_percent_within_60s() {
    let specs = mixed_fleet(300);
    let site_kw: f64 = specs.iter().map(|s| s.nominal_w).sum::<f64>() / 1000.0;
    let target_kw = 0.4 * site_kw;
    let mut s = Sim::new(base_cfg(), specs.clone());
    s.run(5);
    let received = s.now;
    let deadline = received + Duration::from_secs(60);
    s.signal(Signal::DrEvent(DrEvent {
        id: "shed-60".into(),
        target: DrTarget::ShedKw(0.6 * site_kw),
        start: deadline,
        end: Some(deadline + Duration::from_secs(3600)),
        issued_at: received,
    }));
    // Pre-armed: the event activates before its start, early enough.
    s.run_until(deadline);
    let plan = s.e.plan().clone();
    assert_eq!(plan.mode, Mode::DrEvent);
    assert!(plan.feasible);
    assert!(
        plan.reach_at <= deadline,
        "reach {} > deadline {deadline}",
        plan.reach_at
    );
    let err = (plan.expected_kw - target_kw) / target_kw;
    assert!(
        (-0.02..=0.0).contains(&err),
        "plan {:.1} kW vs target {target_kw:.1} kW",
        plan.expected_kw
    );
    let measured = s.fleet_kw();
    let err = (measured - target_kw) / target_kw;
    assert!(
        (-0.02..=0.0).contains(&err),
        "measured {measured:.1} kW vs target {target_kw:.1} kW at the deadline"
    );

    // Not everything asleep; fine-tuned with power targets.
    let hashing = s.miners.iter().filter(|m| m.hash > 0.0).count();
    let asleep = s.miners.iter().filter(|m| m.asleep).count();
    let limited = s.miners.iter().filter(|m| m.limit.is_some()).count();
    assert!(hashing > 0 && asleep < s.miners.len());
    assert!(limited >= 1, "power targets used to fine-tune");
    assert!(asleep > 0);
    // Least efficient first: every sleeper is at least as inefficient as any
    // miner still at full power.
    let jth = |m: &SimMiner| m.spec.j_per_th();
    let min_asleep = s
        .miners
        .iter()
        .filter(|m| m.asleep)
        .map(jth)
        .fold(f64::MAX, f64::min);
    let max_full = s
        .miners
        .iter()
        .filter(|m| !m.asleep && m.limit.is_none())
        .map(jth)
        .fold(0.0, f64::max);
    assert!(min_asleep >= max_full, "{min_asleep} < {max_full}");
    assert!(s.max_in_any_second() <= 50);

    // Event states went to the ledger stream.
    let states: Vec<_> = s
        .events
        .iter()
        .filter_map(|e| match e {
            PolicyEvent::DrEvent { state, .. } => Some(*state),
            _ => None,
        })
        .collect();
    assert_eq!(states, vec![DrEventState::Scheduled, DrEventState::Active]);

    // Window end: everyone comes back.
    s.run(3600 + 600 + 400);
    assert!(s.miners.iter().all(|m| !m.asleep && m.limit.is_none()));
}

/// A kW limit lands just below the target even when the remainder is
/// smaller than one miner, and a tighter override cap wins.
#[test]
fn kw_limit_and_override_cap() {
    let specs = mixed_fleet(50);
    let mut s = Sim::new(base_cfg(), specs);
    s.signal(Signal::DrEvent(DrEvent {
        id: "lim".into(),
        target: DrTarget::LimitKw(101.0),
        start: s.now,
        end: None,
        issued_at: s.now,
    }));
    s.run(120);
    let kw = s.fleet_kw();
    assert!((101.0 * 0.98..=101.0).contains(&kw), "{kw}");
    s.signal(Signal::Override(ManualOverride {
        at: s.now,
        mode: OverrideMode::CapKw(60.0),
        until: Some(s.now + Duration::from_secs(600)),
        by: "ops".into(),
    }));
    s.run(120);
    assert_eq!(s.e.plan().mode, Mode::Override);
    let kw = s.fleet_kw();
    assert!((60.0 * 0.98..=60.0).contains(&kw), "{kw}");
}

/// Balance: site total held at the contract while the other load swings.
#[test]
fn balance_holds_site_at_contract() {
    let specs = mixed_fleet(100); // ~321 kW of miners
    let cfg = PolicyConfig {
        contract_kw: Some(500.0),
        min_off: Duration::from_secs(0),
        restore_batch: 100,
        ..base_cfg()
    };
    let mut s = Sim::new(cfg, specs);
    for external in [250.0, 400.0, 220.0, 330.0] {
        s.signal(Signal::SiteLoad(SiteLoadSignal {
            at: s.now,
            external_kw: external,
        }));
        s.run(150);
        let site = s.fleet_kw() + external;
        assert!(
            site <= 500.0,
            "site {site} over contract with other load {external}"
        );
        assert!(
            site >= 500.0 * 0.98,
            "site {site} well under contract with other load {external}"
        );
        assert_eq!(s.e.plan().mode, Mode::Balance);
    }
}

/// Balance with a swinging other load (a "mullet" site): power targets do
/// the fine work, sleeps only the coarse part, with hysteresis (few sleeps
/// and wakes, no flapping), and the site stays at or just under the contract.
#[test]
fn balance_follows_a_swinging_load_mostly_by_power_targets() {
    // ~321 kW of miners, 60 of them with power targets (~193 kW, ~77 kW of
    // power-target range); firmware-like ramps.
    let specs: Vec<MinerSpec> = mixed_fleet(100)
        .into_iter()
        .map(|mut m| {
            m.ramp.limit_latency = Duration::from_secs(2);
            m.ramp.sleep_latency = Duration::from_secs(4);
            m.ramp.wake_latency = Duration::from_secs(10);
            m
        })
        .collect();
    let cfg = PolicyConfig {
        contract_kw: Some(500.0),
        min_off: Duration::from_secs(0),
        restore_batch: 100,
        max_commands_per_sec: 200,
        ..base_cfg()
    };
    let mut s = Sim::new(cfg, specs);
    // Other load 180 -> 250 -> 190 -> 250 kW in 10 kW steps every 5 s: the
    // power-target band (~243-322 kW of fleet) covers the swing but for
    // its ends.
    let mut path: Vec<f64> = (18..=25)
        .chain((19..25).rev())
        .chain(20..=25)
        .map(|k| k as f64 * 10.0)
        .collect();
    path.extend(std::iter::repeat_n(250.0, 4));
    let mut worst: f64 = 0.0;
    for &external in &path {
        s.signal(Signal::SiteLoad(SiteLoadSignal {
            at: s.now,
            external_kw: external,
        }));
        s.run(5);
        let site = s.fleet_kw() + external;
        assert!(
            site <= 500.0 + 1e-6,
            "site {site} over contract at {external}"
        );
        worst = worst.max(500.0 - site);
        assert_eq!(s.e.plan().mode, Mode::Balance);
    }
    assert!(worst < 10.0, "site fell {worst:.1} kW under the contract");
    let count = |a: fn(&Action) -> bool| s.log.iter().filter(|c| a(&c.action)).count();
    let sleeps = count(|a| *a == Action::Sleep);
    let wakes = count(|a| *a == Action::Wake);
    let limits = count(|a| matches!(a, Action::SetPowerTarget(_)));
    // 140 kW of swing: ~100 miners x 1.3 kW of power-target range covers
    // most of it; a handful of sleeps for the rest, not one per step.
    assert!(
        limits > 10 * (sleeps + wakes),
        "{limits} limits, {sleeps} sleeps, {wakes} wakes"
    );
    assert!(
        sleeps <= 40 && wakes <= sleeps,
        "{sleeps} sleeps, {wakes} wakes"
    );
}

/// Economics on a price that must be no older than 600 s, curtailing all
/// when it is.
fn stale_price_cfg() -> PolicyConfig {
    PolicyConfig {
        economics: Some(Economics {
            hashprice_usd_per_ph_day: 39.5,
            pool_fee: 0.0,
            pue: 1.0,
            hysteresis_usd_per_mwh: 2.0,
        }),
        staleness: Staleness {
            price: Some(Freshness {
                max_age: Duration::from_secs(600),
                on_stale: SafeState::CurtailAll,
            }),
            ..Staleness::NONE
        },
        min_off: Duration::from_secs(0),
        ..base_cfg()
    }
}

/// A price feed older than its max age drives the fleet to the configured
/// safe state; a fresh price brings it back.
#[test]
fn stale_price_goes_to_safe_state() {
    let specs = mixed_fleet(20);
    let cfg = stale_price_cfg();
    let mut s = Sim::new(cfg, specs);
    s.price(30.0);
    s.run(590);
    assert!(s.log.is_empty());
    assert_eq!(s.e.stale_signal(), None);
    s.run(20);
    assert_eq!(s.e.stale_signal(), Some("price"));
    assert_eq!(s.e.plan().mode, Mode::SafeState);
    assert!(s
        .events
        .iter()
        .any(|e| matches!(e, PolicyEvent::SafeState { stale: Some(_), .. })));
    s.run(60);
    assert!(
        s.miners.iter().all(|m| m.asleep),
        "all asleep in safe state"
    );
    s.price(30.0);
    s.run(200);
    assert_eq!(s.e.stale_signal(), None);
    assert!(
        s.miners.iter().all(|m| !m.asleep),
        "restored after fresh price"
    );
}

/// A price stamped a day ahead (a feed with a broken clock) is refused: it
/// neither pins the price against the good samples that follow nor keeps
/// the stale fail-safe from firing when the good samples stop.
#[test]
fn future_dated_price_is_refused_and_staleness_still_fires() {
    let cfg = stale_price_cfg();
    let skew = cfg.max_clock_skew;
    let mut s = Sim::new(cfg, mixed_fleet(10));
    s.price(30.0);
    let future = Signal::Price(PriceSignal {
        at: s.now + Duration::from_secs(86_400),
        usd_per_mwh: 9_000.0,
        forecast: vec![],
    });
    let err = s.e.handle_signal(s.now, future).unwrap_err();
    assert!(
        matches!(
            err,
            PolicyError::Signal(crate::signal::SignalError::FutureDated { .. })
        ),
        "{err}"
    );
    assert!(
        err.to_string().contains("ahead of the local clock"),
        "{err}"
    );
    // Within the allowed skew is fine (clocks drift).
    let near = Signal::Price(PriceSignal {
        at: s.now + skew,
        usd_per_mwh: 31.0,
        forecast: vec![],
    });
    s.e.handle_signal(s.now, near).unwrap();
    // A later good sample is taken, and when samples stop the price goes stale.
    s.run(300);
    s.price(32.0);
    s.run(590);
    assert_eq!(s.e.stale_signal(), None);
    s.run(20);
    assert_eq!(s.e.stale_signal(), Some("price"));
    assert_eq!(s.e.plan().mode, Mode::SafeState);
}

/// Keep-running safe state: a stale high price stops curtailing.
#[test]
fn stale_price_keep_running() {
    let specs = mixed_fleet(10);
    let cfg = PolicyConfig {
        economics: Some(Economics {
            hashprice_usd_per_ph_day: 39.5,
            pool_fee: 0.0,
            pue: 1.0,
            hysteresis_usd_per_mwh: 2.0,
        }),
        staleness: Staleness {
            price: Some(Freshness {
                max_age: Duration::from_secs(300),
                on_stale: SafeState::KeepRunning,
            }),
            ..Staleness::NONE
        },
        min_off: Duration::from_secs(0),
        ..base_cfg()
    };
    let mut s = Sim::new(cfg, specs);
    s.price(1000.0);
    s.run(60);
    assert!(s.miners.iter().all(|m| m.asleep));
    s.run(300 + 120);
    assert_eq!(s.e.stale_signal(), Some("price"));
    assert!(s.miners.iter().all(|m| !m.asleep));
}

/// Soluna-style dispatch: without a heartbeat for 4 min, auto-curtail.
#[test]
fn stale_dispatch_auto_curtails() {
    let specs = mixed_fleet(10);
    let cfg = PolicyConfig {
        staleness: Staleness {
            dispatch: Some(Freshness {
                max_age: Duration::from_secs(240),
                on_stale: SafeState::CurtailAll,
            }),
            ..Staleness::NONE
        },
        ..base_cfg()
    };
    let mut s = Sim::new(cfg, specs);
    for _ in 0..10 {
        s.signal(Signal::Dispatch(DispatchSignal {
            at: s.now,
            target_kw: None,
        }));
        s.run(30);
    }
    assert!(s.log.is_empty());
    s.run(240 + 60);
    assert_eq!(s.e.stale_signal(), Some("dispatch"));
    assert!(s.miners.iter().all(|m| m.asleep));
}

/// A configured dispatcher that never speaks: without `dispatch_from_start`
/// the site mines on; with it, the site reaches the safe state `max_age`
/// after start, as after a lost heartbeat.
#[test]
fn silent_dispatcher_fails_safe_from_start() {
    let cfg = |from_start| PolicyConfig {
        staleness: Staleness {
            dispatch: Some(Freshness {
                max_age: Duration::from_secs(240),
                on_stale: SafeState::CurtailAll,
            }),
            dispatch_from_start: from_start,
            ..Staleness::NONE
        },
        ..base_cfg()
    };
    let mut off = Sim::new(cfg(false), mixed_fleet(10));
    off.run(240 + 60);
    assert_eq!(off.e.stale_signal(), None);
    assert!(off.miners.iter().all(|m| !m.asleep));

    let mut on = Sim::new(cfg(true), mixed_fleet(10));
    on.run(200);
    assert_eq!(
        on.e.stale_signal(),
        None,
        "not stale inside the start-up grace"
    );
    assert!(on.miners.iter().all(|m| !m.asleep));
    on.run(100);
    assert_eq!(on.e.stale_signal(), Some("dispatch"));
    assert!(on.miners.iter().all(|m| m.asleep));
}

/// No one-second window ever carries more than the configured command rate.
#[test]
fn max_commands_per_second_respected() {
    let specs = mixed_fleet(1000);
    let cfg = PolicyConfig {
        max_commands_per_sec: 20,
        ..base_cfg()
    };
    let mut s = Sim::new(cfg, specs);
    s.signal(Signal::Override(ManualOverride {
        at: s.now,
        mode: OverrideMode::CurtailAll,
        until: None,
        by: "test".into(),
    }));
    let plan = s.e.plan();
    assert_eq!(plan.actions.len(), 1000);
    let spread = plan.actions[999].at - plan.actions[0].at;
    assert!(
        spread >= Duration::from_millis(49_000),
        "plan spreads by rate: {spread:?}"
    );
    // Poll at sub-second granularity too: the limit is a sliding window.
    for _ in 0..120 {
        for _ in 0..4 {
            s.now = s.now + Duration::from_millis(250);
            s.dispatch();
        }
    }
    assert_eq!(s.log.len(), 1000);
    assert_eq!(s.max_in_any_second(), 20);
    let span = s.log.last().unwrap().issued_at - s.log[0].issued_at;
    assert!(span >= Duration::from_millis(49_000), "{span:?}");
}

/// Restore comes back in batches of N every interval, most efficient first.
#[test]
fn staggered_restore_in_batches() {
    let specs = mixed_fleet(100);
    let cfg = PolicyConfig {
        restore_batch: 10,
        restore_interval: Duration::from_secs(30),
        min_off: Duration::from_secs(60),
        ..base_cfg()
    };
    let mut s = Sim::new(cfg, specs);
    s.signal(Signal::Override(ManualOverride {
        at: s.now,
        mode: OverrideMode::CurtailAll,
        until: None,
        by: "test".into(),
    }));
    s.run(90);
    assert!(s.miners.iter().all(|m| m.asleep));
    s.signal(Signal::Override(ManualOverride {
        at: s.now,
        mode: OverrideMode::Clear,
        until: None,
        by: "test".into(),
    }));
    // The plan already shows the batches.
    let planned: Vec<_> = s.e.plan().actions.iter().map(|a| a.at).collect();
    assert_eq!(planned.len(), 100);
    assert!(planned[9] - planned[0] < Duration::from_secs(1));
    assert!(planned[10] - planned[0] >= Duration::from_secs(30));
    s.run(400);
    let wakes: Vec<&Command> = s.log.iter().filter(|c| c.action == Action::Wake).collect();
    assert_eq!(wakes.len(), 100);
    let mut batches: Vec<(Timestamp, usize)> = vec![];
    for w in &wakes {
        match batches.last_mut() {
            Some((start, n)) if w.issued_at < *start + Duration::from_secs(30) => *n += 1,
            _ => batches.push((w.issued_at, 1)),
        }
    }
    assert_eq!(batches.len(), 10, "{batches:?}");
    assert!(batches.iter().all(|&(_, n)| n == 10));
    for pair in batches.windows(2) {
        assert!(pair[1].0 - pair[0].0 >= Duration::from_secs(30));
    }
    // Most efficient first: the first batch is all S21s (17.5 J/TH).
    let first_models: Vec<_> = wakes[..10]
        .iter()
        .map(|c| s.e.fleet().get(c.miner).unwrap().spec.model.to_string())
        .collect();
    assert!(first_models.iter().all(|m| m == "S21"), "{first_models:?}");
}

/// Escalation: a sleep that is acked but has no effect is not verified, so
/// the engine moves to a power target; if that fails too, it parks; a
/// refused sleep escalates at once. Other miners cover the shortfall.
#[test]
fn escalation_sleep_then_power_target_then_park() {
    // Ten Whatsminers (sleep + power target).
    let specs: Vec<_> = (0..10)
        .map(|i| {
            MinerSpec::new(
                MinerId(i),
                "M50S",
                126.0,
                3276.0,
                ControlSurface::Whatsminer,
            )
        })
        .collect();
    let mut s = Sim::new(base_cfg(), specs);
    // Needs 3 miners asleep: ids ordered by id within the same model.
    s.behave(MinerId(0), Behavior::IgnoreSleepAndLimit);
    s.behave(MinerId(1), Behavior::IgnoreSleep);
    s.behave(MinerId(2), Behavior::RejectSleep);
    let cap = 3276.0 * 7.0 / 1000.0 + 0.1;
    s.signal(Signal::Override(ManualOverride {
        at: s.now,
        mode: OverrideMode::CapKw(cap),
        until: None,
        by: "test".into(),
    }));
    s.run(300);

    let actions = |s: &Sim, id: u64| -> Vec<Action> {
        s.commands_for(MinerId(id))
            .iter()
            .map(|c| c.action)
            .collect()
    };
    let min_w = (3276.0f64 * 0.6).floor() as u32;
    assert_eq!(
        actions(&s, 0),
        vec![Action::Sleep, Action::SetPowerTarget(min_w), Action::Park]
    );
    assert_eq!(
        s.e.fleet().get(MinerId(0)).unwrap().state,
        MinerState::Parked
    );
    assert_eq!(
        actions(&s, 1),
        vec![Action::Sleep, Action::SetPowerTarget(min_w)]
    );
    assert_eq!(
        s.e.fleet().get(MinerId(1)).unwrap().state,
        MinerState::PowerLimited(min_w)
    );
    assert_eq!(
        actions(&s, 2),
        vec![Action::Sleep, Action::SetPowerTarget(min_w)]
    );
    let escalations: Vec<_> = s
        .events
        .iter()
        .filter_map(|e| match e {
            PolicyEvent::Escalated {
                miner, from, to, ..
            } => Some((miner.0, *from, *to)),
            _ => None,
        })
        .collect();
    assert!(escalations.contains(&(0, Action::Sleep, Action::SetPowerTarget(min_w))));
    assert!(escalations.contains(&(0, Action::SetPowerTarget(min_w), Action::Park)));
    assert!(escalations.contains(&(2, Action::Sleep, Action::SetPowerTarget(min_w))));
    assert!(s.events.iter().any(|e| matches!(
        e,
        PolicyEvent::CommandFailed {
            reason: FailReason::NotVerified,
            ..
        }
    )));
    // Miner 0 still draws full power (parking does not cut it), miners 1 and 2
    // only dropped to min power: others were curtailed to keep under the cap.
    let kw = s.fleet_kw();
    assert!(kw <= cap, "fleet {kw} kW over cap {cap} kW");
    assert!(s.sim_miner(MinerId(3)).asleep);
}

/// Telemetry showing a curtailed miner hashing again re-sends the sleep.
#[test]
fn drift_resends_curtailment() {
    let specs = mixed_fleet(5);
    let mut s = Sim::new(base_cfg(), specs);
    s.signal(Signal::Override(ManualOverride {
        at: s.now,
        mode: OverrideMode::CurtailAll,
        until: None,
        by: "test".into(),
    }));
    s.run(60);
    assert!(s.miners.iter().all(|m| m.asleep));
    let n = s.log.len();
    // Someone wakes miner 0 behind our back.
    s.miners[0].asleep = false;
    s.miners[0].settle();
    s.run(60);
    assert!(s
        .events
        .iter()
        .any(|e| matches!(e, PolicyEvent::Drift { .. })));
    assert_eq!(s.log.len(), n + 1);
    assert!(s.miners[0].asleep);
}

#[test]
fn acks_for_unknown_commands_are_errors() {
    let mut s = Sim::new(base_cfg(), mixed_fleet(2));
    assert_eq!(
        s.e.handle_ack(s.now, CommandId(999), Ack::Ok),
        Err(PolicyError::UnknownCommand(CommandId(999)))
    );
    assert_eq!(
        s.e.handle_telemetry(
            s.now,
            MinerId(77),
            Telemetry {
                at: s.now,
                power_w: 1.0,
                hashrate_ths: 0.0
            }
        ),
        Err(PolicyError::UnknownMiner(MinerId(77)))
    );
    let bad = Signal::SiteLoad(SiteLoadSignal {
        at: s.now,
        external_kw: f64::INFINITY,
    });
    assert!(matches!(
        s.e.handle_signal(s.now, bad),
        Err(PolicyError::Signal(_))
    ));
}

/// Same inputs, same outputs: the engine is deterministic.
#[test]
fn deterministic() {
    let run = || {
        let mut s = Sim::new(base_cfg(), mixed_fleet(60));
        s.signal(Signal::DrEvent(DrEvent {
            id: "d".into(),
            target: DrTarget::ShedKw(80.0),
            start: s.now + Duration::from_secs(30),
            end: Some(s.now + Duration::from_secs(900)),
            issued_at: s.now,
        }));
        s.run(1600);
        s.log
    };
    assert_eq!(run(), run());
}

/// Driven only by `poll_timeout` (no fixed tick): a DR event is met, the
/// restore after it comes back in batches, nothing is left pending, and the
/// driver wakes up a bounded number of times.
#[test]
fn event_driven_by_poll_timeout() {
    let specs = mixed_fleet(60);
    let site_kw: f64 = specs.iter().map(|s| s.nominal_w).sum::<f64>() / 1000.0;
    let cfg = PolicyConfig {
        restore_batch: 10,
        min_off: Duration::from_secs(120),
        ..base_cfg()
    };
    let mut s = Sim::new(cfg, specs);
    let start = s.now + Duration::from_secs(60);
    let end = start + Duration::from_secs(600);
    s.signal(Signal::DrEvent(DrEvent {
        id: "ev".into(),
        target: DrTarget::LimitKw(0.5 * site_kw),
        start,
        end: Some(end),
        issued_at: s.now,
    }));
    let steps = s.run_event_driven(start);
    let kw = s.fleet_kw();
    assert!(
        (0.49 * site_kw..=0.5 * site_kw).contains(&kw),
        "{kw} at start"
    );
    let steps2 = s.run_event_driven(end + Duration::from_secs(900));
    assert!(s.miners.iter().all(|m| !m.asleep && m.limit.is_none()));
    assert_eq!(s.e.in_flight(), 0);
    let far = s.now + Duration::from_secs(86_400);
    s.e.handle_timeout(far);
    assert!(s.e.poll_actions(far).is_empty(), "nothing left behind");
    assert!(steps + steps2 < 2000, "{steps} + {steps2} wake-ups");
    let wakes: Vec<_> = s.log.iter().filter(|c| c.action == Action::Wake).collect();
    assert!(!wakes.is_empty());
    assert!(wakes.iter().all(|w| w.issued_at >= end));
}

/// A 0 kW dispatch has every miner asleep; a miner that reboots comes back
/// hashing at its persisted power target. The engine puts it back to sleep,
/// not to a power target: the reboot was not its on-switch.
#[test]
fn rebooted_miner_under_zero_kw_dispatch_sleeps_again() {
    let specs = mixed_fleet(8);
    let mut s = Sim::new(base_cfg(), specs);
    s.signal(Signal::Dispatch(DispatchSignal {
        at: s.now,
        target_kw: Some(0.0),
    }));
    s.run(60);
    assert!(s.miners.iter().all(|m| m.asleep), "all asleep at 0 kW");
    let n = s.log.len();
    // Every capable miner reboots at a power target 60 % of nominal.
    for m in &mut s.miners {
        if m.spec.capabilities().power_target {
            m.asleep = false;
            m.limit = Some(0.6 * m.spec.nominal_w);
            m.settle();
        }
    }
    s.run(60);
    let after: Vec<_> = s.log[n..].iter().map(|c| (c.miner, c.action)).collect();
    assert!(
        s.miners.iter().all(|m| m.asleep),
        "every rebooted miner asleep again; commands after the reboot: {after:?}"
    );
}

mod reboot;
mod resume;
