//! A price series crossing the breakevens of seven models, through the
//! curtailment driver and the firmware emulators.
//!
//! 24 miners: 6 each on LuxOS, Braiins OS, VNish (S19, S19j Pro, S19 XP,
//! S21) and Whatsminer (M30S++, M50S, M60), no per-unit spread, so each
//! model has one breakeven (hashprice $39.5/PH/day, no fee, PUE 1:
//! S19 $48.1, M30S++ $53.1, S19j Pro $55.8, M50S $63.3, S19 XP $76.5,
//! M60 $84.7, S21 $94.0 per MWh; hysteresis ±$1). Dwell: 40 s on, 60 s off.
//! Site time runs 10× faster than real time.
//!
//! The price climbs 40 → 51 → 60 → 70 → 80 → 90 (every 20 s), so models
//! go to sleep least efficient first, then falls 80 (at 120 s: M60 may
//! run again but slept at ~100 s, so its min-off dwell holds it until
//! ~160 s) → 72 → 58 → 52 → 45, so they wake most efficient first, and
//! rises to 52 again at 250 s, just after S19s woke: their min-on dwell holds
//! them on until ~40 s after waking.

use std::collections::HashMap;
use std::time::Duration;

use gridproxy_curtail as curtail;
use gridproxy_tests::bench::*;

use curtail::command::Action;
use curtail::driver::{Audit, DriverConfig, Nothing};
use curtail::fleet::MinerId;
use curtail::policy::{Economics, PolicyConfig, Staleness};
use curtail::signal::{PriceSignal, Signal};
use curtail::time::{Clock, Timestamp};

const TEST_LIMIT: Duration = Duration::from_secs(120);
const MIN_ON: Duration = Duration::from_secs(40);
const MIN_OFF: Duration = Duration::from_secs(60);

/// (site seconds after t0, $/MWh)
const SERIES: [(u64, f64); 12] = [
    (0, 40.0),
    (20, 51.0),
    (40, 60.0),
    (60, 70.0),
    (80, 80.0),
    (100, 90.0),
    (120, 80.0),
    (190, 72.0),
    (210, 58.0),
    (230, 52.0),
    (245, 45.0),
    (265, 52.0),
];
const END_S: u64 = 330;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn price_series_turns_models_off_and_on_in_efficiency_order_with_dwell() {
    let _gate = gridproxy_tests::module_gate(module_path!());
    gridproxy_tests::serially(TEST_LIMIT, run()).await;
}

async fn run() {
    gridproxy_tests::init_tracing();
    let bench = SiteBench::new("price", (64, 0))
        .mixed(6)
        .with(|c| c.unit_spread = 0.0)
        .start()
        .await;
    let site = bench.site.clone();
    let economics = Economics {
        hashprice_usd_per_ph_day: 39.5,
        pool_fee: 0.0,
        pue: 1.0,
        hysteresis_usd_per_mwh: 1.0,
    };
    let policy = PolicyConfig {
        economics: Some(economics),
        min_on: MIN_ON,
        min_off: MIN_OFF,
        max_commands_per_sec: 20,
        restore_batch: 50,
        restore_interval: Duration::from_secs(5),
        ack_timeout: Duration::from_secs(20),
        verify_grace: Duration::from_secs(20),
        staleness: Staleness {
            site_load: None,
            dispatch: None,
            ..Staleness::default()
        },
        ..PolicyConfig::default()
    };
    let ledger = bench.ledger();
    let clock = ScaledClock::new(SPEED);
    let h = bench
        .spawn_driver(
            policy,
            Nothing,
            clock,
            DriverConfig {
                poll_interval: Duration::from_secs(3),
                interval: Duration::from_secs(30),
                ..DriverConfig::default()
            },
        )
        .await;

    let t0 = clock.now();
    let at = |s: u64| t0 + Duration::from_secs(s);
    let mut before_fall: Option<Vec<bool>> = None; // asleep, just before 120 s
    for (s, price) in SERIES {
        while clock.now() < at(s) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if s == 120 {
            before_fall = Some(site.miners().iter().map(asleep).collect());
        }
        h.send(Signal::Price(PriceSignal {
            at: clock.now(),
            usd_per_mwh: price,
            forecast: vec![],
        }))
        .await
        .unwrap();
    }
    while clock.now() < at(END_S) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let report = h.shutdown().await.expect("driver stops");
    assert_eq!(report.status.failed, 0, "{:?}", report.status);

    // Just before the fall, only S21s (breakeven $94) ran.
    let before_fall = before_fall.unwrap();
    for m in site.miners() {
        assert_eq!(
            before_fall[m.index],
            m.model != "S21",
            "{} ({}) asleep={} at 120 s",
            m.index,
            m.model,
            before_fall[m.index]
        );
    }

    let audit = Audit::read(&ledger).expect("ledger");
    every_command_answered(&audit);
    let model = |m: MinerId| site.miners()[m.0 as usize].model;
    let eff = |m: MinerId| site.miners()[m.0 as usize].j_per_th();
    let rel = |t: Timestamp| t.saturating_since(t0).as_secs_f64();
    for c in &audit.commands {
        println!(
            "t0+{:6.1} s  {:?} {:>3} {:9} {:.1} J/TH",
            rel(c.at),
            c.action,
            c.miner.0,
            model(c.miner),
            eff(c.miner)
        );
    }
    assert!(audit.commands.iter().all(|c| model(c.miner) != "S21"));
    let firmware_cmds: Vec<_> = audit
        .commands
        .iter()
        .filter(|c| matches!(c.action, Action::Sleep | Action::Wake))
        .collect();
    assert_eq!(firmware_cmds.len(), audit.commands.len());

    // Off in efficiency order while the price climbs; on in reverse order
    // while it falls.
    let climb: Vec<f64> = firmware_cmds
        .iter()
        .filter(|c| c.at < at(120))
        .map(|c| {
            assert_eq!(c.action, Action::Sleep);
            eff(c.miner)
        })
        .collect();
    let non_s21 = site.miners().iter().filter(|m| m.model != "S21").count();
    assert_eq!(climb.len(), non_s21, "every non-S21 slept once");
    assert!(climb.windows(2).all(|w| w[0] >= w[1]), "{climb:?}");
    let fall: Vec<f64> = firmware_cmds
        .iter()
        .filter(|c| c.at >= at(120) && c.at < at(265))
        .map(|c| {
            assert_eq!(c.action, Action::Wake);
            eff(c.miner)
        })
        .collect();
    assert_eq!(fall.len(), non_s21, "every sleeper woke once");
    assert!(fall.windows(2).all(|w| w[0] <= w[1]), "{fall:?}");

    // Each model slept in the step whose price crossed its breakeven, and
    // woke at the step crossing back (or when its min-off dwell ended).
    let by_model = |action: Action, from: u64, to: u64| {
        let mut m: HashMap<&str, Vec<f64>> = HashMap::new();
        for c in firmware_cmds
            .iter()
            .filter(|c| c.action == action && c.at >= at(from) && c.at < at(to))
        {
            m.entry(model(c.miner)).or_default().push(rel(c.at));
        }
        m
    };
    let sleeps = by_model(Action::Sleep, 0, 265);
    let within = |ts: &[f64], lo: f64, hi: f64| ts.iter().all(|t| *t >= lo && *t < hi);
    for (name, step) in [
        ("S19", 20.0),
        ("M30S++", 40.0),
        ("S19j Pro", 40.0),
        ("M50S", 60.0),
        ("S19 XP", 80.0),
        ("M60", 100.0),
    ] {
        assert!(
            within(&sleeps[name], step, step + 10.0),
            "{name} slept at {:?}, price crossed at {step}",
            sleeps[name]
        );
    }
    let wakes = by_model(Action::Wake, 120, 265);
    // M60: price back under its breakeven at 120 s, but it slept at ~100 s.
    let m60_sleep = sleeps["M60"].iter().cloned().fold(f64::MAX, f64::min);
    assert!(
        wakes["M60"]
            .iter()
            .all(|t| *t >= m60_sleep + MIN_OFF.as_secs_f64() && *t > 150.0),
        "M60 woke at {:?} (slept at {m60_sleep}); min-off {MIN_OFF:?}",
        wakes["M60"]
    );
    for (name, step) in [
        ("S19 XP", 190.0),
        ("M50S", 210.0),
        ("S19j Pro", 230.0),
        ("M30S++", 230.0),
        ("S19", 245.0),
    ] {
        assert!(
            within(&wakes[name], step, step + 10.0),
            "{name} woke at {:?}, price crossed back at {step}",
            wakes[name]
        );
    }
    // S19s: price above their breakeven again at 265 s, but they woke at
    // ~245 s: min-on dwell keeps them on until ~285 s.
    let resleep = by_model(Action::Sleep, 265, END_S);
    let s19_wake = wakes["S19"].iter().cloned().fold(f64::MIN, f64::max);
    assert_eq!(resleep.len(), 1, "only S19s curtail again: {resleep:?}");
    assert!(
        resleep["S19"]
            .iter()
            .all(|t| *t >= s19_wake + MIN_ON.as_secs_f64()),
        "S19 re-slept at {:?}, woke at {s19_wake}; min-on {MIN_ON:?}",
        resleep["S19"]
    );
    // Per miner, no on/off flip inside its dwell.
    let mut last: HashMap<MinerId, (Action, Timestamp)> = HashMap::new();
    for c in &firmware_cmds {
        if let Some((prev, t)) = last.get(&c.miner) {
            let gap = c.at.saturating_since(*t);
            let dwell = if *prev == Action::Sleep {
                MIN_OFF
            } else {
                MIN_ON
            };
            assert!(
                gap >= dwell,
                "{}: {prev:?} then {:?} after {gap:?}",
                c.miner,
                c.action
            );
        }
        last.insert(c.miner, (c.action, c.at));
    }
    // The emulators agree with the last commands.
    for m in site.miners() {
        let slept_last = last.get(&id(m)).is_some_and(|(a, _)| *a == Action::Sleep);
        assert_eq!(asleep(m), slept_last, "{} {}", m.index, m.model);
    }
    site.stop();
    let _ = std::fs::remove_dir_all(&bench.dir);
}
