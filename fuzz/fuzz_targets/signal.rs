//! Signals: JSON (one per line, as the control API and the grid sources
//! produce them) -> `Signal` -> `validate`, then into a policy engine over a
//! small mixed fleet. A signal that validates must hold every documented
//! bound and survive a JSON round trip; the engine must accept exactly the
//! signals that validate and keep a sane plan whatever their timestamps.
#![no_main]

use std::time::Duration;

use gridproxy_curtail::fleet::{ControlSurface, Fleet, MinerId, MinerSpec};
use gridproxy_curtail::policy::{Economics, Engine, PolicyConfig};
use gridproxy_curtail::signal::{
    DrTarget, OverrideMode, Signal, MAX_ABS_PRICE, MAX_EVENT_ID_LEN, MAX_FORECAST_POINTS, MAX_KW,
};
use gridproxy_curtail::time::Timestamp;
use gridproxy_fuzz::json_close;
use libfuzzer_sys::fuzz_target;

fn in_range(x: f64, lo: f64, hi: f64) -> bool {
    x.is_finite() && x >= lo && x <= hi
}

/// The documented bounds, checked independently of `validate`.
fn assert_bounds(s: &Signal) {
    let price = |x: f64| assert!(in_range(x, -MAX_ABS_PRICE, MAX_ABS_PRICE), "{x}");
    let kw = |x: f64| assert!(in_range(x, 0.0, MAX_KW), "{x}");
    let id = |i: &str| assert!(!i.is_empty() && i.len() <= MAX_EVENT_ID_LEN);
    match s {
        Signal::Price(p) => {
            price(p.usd_per_mwh);
            assert!(p.forecast.len() <= MAX_FORECAST_POINTS);
            p.forecast.iter().for_each(|f| price(f.usd_per_mwh));
        }
        Signal::Hashprice(h) => assert!(in_range(h.usd_per_ph_day, 0.0, MAX_ABS_PRICE)),
        Signal::DrEvent(e) => {
            id(&e.id);
            match e.target {
                DrTarget::LimitKw(x) | DrTarget::ShedKw(x) => kw(x),
            }
            assert!(e.end.is_none_or(|end| end > e.start));
        }
        Signal::DrEnd { id: i, .. } => id(i),
        Signal::Dispatch(d) => d.target_kw.into_iter().for_each(kw),
        Signal::SiteLoad(l) => kw(l.external_kw),
        Signal::Override(o) => {
            if let OverrideMode::CapKw(x) = o.mode {
                kw(x)
            }
        }
        Signal::Route(_) => {}
    }
}

fn engine(now: Timestamp) -> Engine {
    let surfaces = [
        ControlSurface::LuxOs,
        ControlSurface::BraiinsOs,
        ControlSurface::Whatsminer,
        ControlSurface::Vnish,
        ControlSurface::AntminerStock,
        ControlSurface::None,
    ];
    let specs = surfaces.iter().enumerate().map(|(i, s)| {
        MinerSpec::new(MinerId(i as u64), "S19", 95.0 + i as f64, 3000.0 + 50.0 * i as f64, *s)
    });
    let cfg = PolicyConfig {
        economics: Some(Economics {
            hashprice_usd_per_ph_day: 45.0,
            pool_fee: 0.02,
            pue: 1.05,
            hysteresis_usd_per_mwh: 2.0,
        }),
        contract_kw: Some(15.0),
        ..PolicyConfig::default()
    };
    Engine::new(cfg, Fleet::from_specs(specs).expect("fleet"), now).expect("engine")
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // The edge driver's clock, not the signals' own timestamps, is `now`.
    let mut now = Timestamp::from_secs(1_700_000_000);
    let mut e = engine(now);
    for line in text.lines().take(64) {
        let Ok(sig) = serde_json::from_str::<Signal>(line) else {
            continue;
        };
        let valid = sig.validate();
        if valid.is_ok() {
            assert_bounds(&sig);
            let a = serde_json::to_value(&sig).expect("serialize");
            let back: Signal = serde_json::from_str(&a.to_string()).expect("round trip parses");
            let b = serde_json::to_value(&back).expect("serialize");
            assert!(json_close(&a, &b), "{a} -> {b}");
        }
        let handled = e.handle_signal(now, sig);
        assert_eq!(handled.is_ok(), valid.is_ok(), "{handled:?} vs {valid:?}");
        for _ in 0..3 {
            now = now.saturating_add(Duration::from_secs(5));
            e.handle_timeout(now);
            let cmds = e.poll_actions(now);
            assert!(cmds.len() <= 6 * 4, "{} commands", cmds.len());
            while e.poll_event().is_some() {}
        }
        let plan = e.plan();
        assert!(plan.expected_kw.is_finite() && plan.expected_kw >= 0.0, "{plan:?}");
        assert!(plan.cap_kw.is_none_or(|c| !c.is_nan()), "{plan:?}");
        assert!(plan.actions.iter().all(|a| a.miner.0 < 6), "{plan:?}");
    }
});
