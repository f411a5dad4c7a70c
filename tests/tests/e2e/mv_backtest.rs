//! Backtests on the shipped ERCOT traces (`fixtures/traces/`) against
//! always-on and a perfect-foresight oracle, and M&V from a ledger written
//! here, checked by hand calculation.

use std::path::PathBuf;
use std::time::Duration;

use gridproxy::backtest::{backtest, BacktestOptions, BacktestReport, FleetFile};
use gridproxy_curtail as curtail;

use curtail::ledger::{read_mv_input, Interval, Ledger};
use curtail::mv::{compute, Baseline, MvConfig};
use curtail::policy::{Decision, DrEventState, Mode};
use curtail::signal::{DrEvent, DrTarget, HashpriceSignal, PriceSignal, Signal};
use curtail::time::Timestamp;

fn traces() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures/traces")
}

fn run(file: &str, hashprice: Option<f64>) -> BacktestReport {
    let dir = traces();
    let text = std::fs::read_to_string(dir.join(file)).expect("shipped trace");
    let fleet = FleetFile::parse(&std::fs::read_to_string(dir.join("fleet.toml")).unwrap())
        .expect("shipped fleet file");
    let r = backtest(&BacktestOptions {
        prices: Some(text),
        fleet: Some(fleet),
        hashprice,
        ..Default::default()
    })
    .expect("backtest runs");
    println!("== {file}\n{}", r.text());
    assert!(
        r.text().contains("engine/oracle profit ratio: "),
        "{}",
        r.text()
    );
    assert_eq!(r.failed, 0);
    // The oracle cannot lose to the engine, in total or for any model.
    assert!(
        r.oracle.profit() >= r.policy.profit() - 1e-6,
        "oracle {} < engine {}",
        r.oracle.profit(),
        r.policy.profit()
    );
    for m in &r.models {
        assert!(
            m.oracle.profit() >= m.engine.profit() - 1e-6,
            "{}: oracle {} < engine {}",
            m.model,
            m.oracle.profit(),
            m.engine.profit()
        );
        assert!(
            m.oracle.profit() >= m.always_on.profit() - 1e-6,
            "{}",
            m.model
        );
    }
    r
}

#[test]
fn uri_week_engine_between_always_on_and_oracle() {
    let _gate = gridproxy_tests::module_gate(module_path!());
    let r = run("ercot_rtm_uri_2021-02-13_20.csv", None);
    assert_eq!(r.intervals, 2304);
    // Four days at $9,000: always-on loses heavily, the engine does not
    // lose more than the oracle does.
    assert!(r.flat_out.profit() < 0.0, "{}", r.text());
    assert!(r.policy.profit() > r.flat_out.profit(), "{}", r.text());
    // At 2023's hashprice ($55/PH/day) standby draw at the cap outweighs
    // the revenue of the cheap days: every strategy loses money, the profit
    // ratio is undefined, and the share of the oracle's gain is measured.
    let capture = r.capture().expect("oracle beats always-on");
    assert!(capture >= 0.97, "captured {capture:.4}\n{}", r.text());
    // At an early-2021-like hashprice the profits are positive.
    let r = run("ercot_rtm_uri_2021-02-13_20.csv", Some(300.0));
    let ratio = r.ratio().expect("oracle profits");
    assert!(ratio >= 0.97, "engine/oracle {ratio:.4}\n{}", r.text());
}

#[test]
fn august_2023_engine_between_always_on_and_oracle() {
    let _gate = gridproxy_tests::module_gate(module_path!());
    let r = run("ercot_rtm_heat_2023-08-15_25.csv", None);
    assert_eq!(r.intervals, 3168);
    assert!(r.policy.profit() > r.flat_out.profit(), "{}", r.text());
    let ratio = r.ratio().expect("oracle profits");
    assert!(ratio >= 0.97, "engine/oracle {ratio:.4}\n{}", r.text());
}

#[test]
fn ordinary_week_little_to_gain() {
    let _gate = gridproxy_tests::module_gate(module_path!());
    let r = run("ercot_rtm_ordinary_2023-07-17_23.csv", None);
    assert_eq!(r.intervals, 2016);
    // Prices below every breakeven nearly all week: the three agree to 1 %.
    let o = r.oracle.profit();
    assert!(r.flat_out.profit() >= 0.99 * o, "{}", r.text());
    assert!(r.policy.profit() >= 0.99 * o, "{}", r.text());
}

fn t(min: u64) -> Timestamp {
    // 2024-01-01T00:00Z + min minutes.
    Timestamp::from_secs(1_704_067_200 + min * 60)
}

#[test]
fn mv_from_a_ledger_by_hand() {
    let _gate = gridproxy_tests::module_gate(module_path!());
    let dir = std::env::temp_dir().join(format!("gridproxy-mv-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("ledger.db");
    let _ = std::fs::remove_file(&path);
    {
        let mut l = Ledger::open(&path).unwrap();
        // 08:00-09:00 at 800 kW, 5-minute intervals.
        for k in 0..12 {
            l.record_interval(&Interval {
                start: t(480 + k * 5),
                end: t(485 + k * 5),
                fleet_kw: 800.0,
                site_kw: None,
                miners: 10,
            })
            .unwrap();
        }
        // DR event 09:00-09:30: 200 kW for 15 min, then 350 kW.
        for k in 0..6 {
            l.record_interval(&Interval {
                start: t(540 + k * 5),
                end: t(545 + k * 5),
                fleet_kw: if k < 3 { 200.0 } else { 350.0 },
                site_kw: None,
                miners: 10,
            })
            .unwrap();
        }
        // Back to 800 kW after.
        l.record_interval(&Interval {
            start: t(570),
            end: t(600),
            fleet_kw: 800.0,
            site_kw: None,
            miners: 10,
        })
        .unwrap();
        let price = |min: u64, p: f64| {
            Signal::Price(PriceSignal {
                at: t(min),
                usd_per_mwh: p,
                forecast: vec![],
            })
        };
        l.record_signal(t(480), &price(480, 40.0)).unwrap();
        l.record_signal(t(540), &price(540, 1000.0)).unwrap();
        l.record_signal(t(555), &price(555, 2000.0)).unwrap();
        l.record_signal(t(570), &price(570, 40.0)).unwrap();
        l.record_signal(
            t(480),
            &Signal::Hashprice(HashpriceSignal {
                at: t(480),
                usd_per_ph_day: 48.0,
            }),
        )
        .unwrap();
        let ev = DrEvent {
            id: "ercot-ers-1".into(),
            target: DrTarget::LimitKw(300.0),
            start: t(540),
            end: Some(t(570)),
            issued_at: t(500),
        };
        l.record_event(t(500), &ev, DrEventState::Scheduled, 800.0)
            .unwrap();
        l.record_event(t(539), &ev, DrEventState::Active, 800.0)
            .unwrap();
        l.record_event(t(570), &ev, DrEventState::Ended, 800.0)
            .unwrap();
        for (min, mode) in [
            (480, Mode::Normal),
            (539, Mode::DrEvent),
            (570, Mode::Normal),
        ] {
            l.record_decision(&Decision {
                at: t(min),
                mode,
                cap_kw: None,
                expected_kw: 0.0,
                changes: 1,
                reason: "test".into(),
            })
            .unwrap();
        }
    }
    let input = read_mv_input(&path).expect("ledger reads");
    assert_eq!(input.intervals.len(), 19);
    assert_eq!(input.prices.len(), 4);
    assert_eq!(input.hashprices, vec![(t(480), 48.0)]);
    // The decision opened at 08:59 with the event's activation; the event
    // window is 09:00-09:30; together one episode 08:59-09:30.
    assert_eq!(input.episodes.len(), 1, "{:?}", input.episodes);
    assert_eq!(input.episodes[0].start, t(539));
    assert_eq!(input.episodes[0].end, t(570));

    let cfg = MvConfig {
        baseline: Baseline::PriorHour,
        interval: Duration::from_secs(900),
        hashprice_usd_per_ph_day: 99.0, // the ledger's 48 must win
        pool_fee: 0.0,
        j_per_th: 20.0,
        ..MvConfig::default()
    };
    let r = compute(&input, &cfg);
    print!("{}\n{}", r.text(), r.to_csv());
    // Buckets: 08:59-09:00 (1 min at 800 kW: nothing curtailed),
    // 09:00-09:15 and 09:15-09:30.
    assert_eq!(r.rows.len(), 3, "{:#?}", r.rows);
    // Prior hour 07:59-08:59: 800 kW measured from 08:00 (59 min).
    assert!(r.rows.iter().all(|row| row.baseline_kw == Some(800.0)));
    assert_eq!(r.rows[0].curtailed_mwh, 0.0);
    // 09:00-09:15: 600 kW × 0.25 h = 0.15 MWh at $1000 = $150.
    // 600 kW at 20 J/TH = 30 PH/s × $48/day × 0.25/24 = $15.
    let a = &r.rows[1];
    assert!((a.curtailed_mwh - 0.15).abs() < 1e-9, "{a:?}");
    assert!((a.avoided_cost_usd - 150.0).abs() < 1e-9, "{a:?}");
    assert!((a.revenue_forgone_usd - 15.0).abs() < 1e-9, "{a:?}");
    // 09:15-09:30: 450 kW × 0.25 h = 0.1125 MWh at $2000 = $225.
    // 22.5 PH/s × $48 × 0.25/24 = $11.25.
    let b = &r.rows[2];
    assert!((b.curtailed_mwh - 0.1125).abs() < 1e-9, "{b:?}");
    assert!((b.avoided_cost_usd - 225.0).abs() < 1e-9, "{b:?}");
    assert!((b.revenue_forgone_usd - 11.25).abs() < 1e-9, "{b:?}");
    assert!((r.totals.curtailed_mwh - 0.2625).abs() < 1e-9);
    assert!((r.totals.net_usd - (375.0 - 26.25)).abs() < 1e-9);
    assert_eq!(r.totals.episodes, 1);
    let csv = r.to_csv();
    assert_eq!(csv.lines().count(), 4, "{csv}");
    assert!(
        csv.lines().nth(2).unwrap().contains(
            ",800.000,200.000,600.000,0.150000,1000.0000,150.0000,48.0000,15.0000,135.0000"
        ),
        "{csv}"
    );
    let j: serde_json::Value = serde_json::from_str(&r.to_json()).unwrap();
    assert_eq!(j["rows"].as_array().map(Vec::len), Some(3));
    assert_eq!(j["baseline"], "prior-hour");

    // Fixed 1000 kW baseline: 800 + 750 kW curtailed over the event plus the
    // minute before (200 kW for 1/60 h).
    let r = compute(
        &input,
        &MvConfig {
            baseline: Baseline::FixedKw(1000.0),
            ..cfg.clone()
        },
    );
    let want = 200.0 / 60.0 / 1000.0 + 0.2 + 0.1625;
    assert!((r.totals.curtailed_mwh - want).abs() < 1e-9, "{}", r.text());
    // 10-of-10: no prior days in this ledger; reported, not guessed.
    let r = compute(
        &input,
        &MvConfig {
            baseline: Baseline::TenOfTen,
            ..cfg
        },
    );
    assert_eq!(r.totals.intervals_without_baseline, 3);
    assert_eq!(r.totals.curtailed_mwh, 0.0);
    assert!(
        r.warnings.iter().any(|w| w.contains("eligible")),
        "{:?}",
        r.warnings
    );
    let _ = std::fs::remove_dir_all(dir);
}
