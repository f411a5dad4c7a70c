//! Plan time for a 100k-miner fleet.
//!
//! `cargo bench -p gridproxy-curtail --bench plan`

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use gridproxy_curtail::fleet::{ControlSurface, Fleet, MinerId, MinerSpec, Telemetry};
use gridproxy_curtail::policy::{Economics, Engine, PolicyConfig, Staleness};
use gridproxy_curtail::signal::{DrEvent, DrTarget, PriceSignal, Signal};
use gridproxy_curtail::time::Timestamp;

const N: u64 = 100_000;

const MODELS: [(&str, f64, f64, ControlSurface); 6] = [
    ("S21", 200.0, 3500.0, ControlSurface::BraiinsOs),
    ("S19 XP", 140.0, 3010.0, ControlSurface::LuxOs),
    ("M50S", 126.0, 3276.0, ControlSurface::Whatsminer),
    ("S19j Pro", 100.0, 3050.0, ControlSurface::Vnish),
    ("S19", 95.0, 3250.0, ControlSurface::AntminerStock),
    ("S19k Pro", 120.0, 2760.0, ControlSurface::BraiinsOs),
];

fn fleet() -> Fleet {
    Fleet::from_specs((0..N).map(|i| {
        let (model, ths, w, s) = MODELS[(i % MODELS.len() as u64) as usize];
        // Spread efficiencies a little so the order is not just six blocks.
        let w = w * (1.0 + ((i * 7919) % 101) as f64 / 2000.0);
        MinerSpec::new(MinerId(i), model, ths, w, s)
    }))
    .expect("valid fleet")
}

fn engine(t0: Timestamp) -> Engine {
    let cfg = PolicyConfig {
        economics: Some(Economics {
            hashprice_usd_per_ph_day: 39.5,
            pool_fee: 0.02,
            pue: 1.05,
            hysteresis_usd_per_mwh: 2.0,
        }),
        staleness: Staleness::NONE,
        ..PolicyConfig::default()
    };
    Engine::new(cfg, fleet(), t0).expect("engine")
}

fn bench(c: &mut Criterion) {
    let t0 = Timestamp::from_secs(1_700_000_000);
    let base = engine(t0);
    let site_kw = base.fleet().nominal_kw();
    let mut g = c.benchmark_group("plan_100k");
    g.sample_size(20);
    g.measurement_time(Duration::from_secs(20));

    // Price crossing the middle breakevens: about half the fleet flips.
    g.bench_function("price_replan", |b| {
        b.iter_batched(
            || base.clone(),
            |mut e| {
                e.handle_signal(
                    t0,
                    Signal::Price(PriceSignal {
                        at: t0,
                        usd_per_mwh: 60.0,
                        forecast: vec![],
                    }),
                )
                .expect("signal");
                black_box(e.plan().actions.len())
            },
            BatchSize::LargeInput,
        )
    });

    // DR: shed 60 % of site kW within 60 s (lead estimate + plan).
    g.bench_function("dr_shed_60pct_replan", |b| {
        b.iter_batched(
            || base.clone(),
            |mut e| {
                e.handle_signal(
                    t0,
                    Signal::DrEvent(DrEvent {
                        id: "bench".into(),
                        target: DrTarget::ShedKw(0.6 * site_kw),
                        start: t0 + Duration::from_secs(60),
                        end: None,
                        issued_at: t0,
                    }),
                )
                .expect("signal");
                black_box(e.plan().expected_kw)
            },
            BatchSize::LargeInput,
        )
    });

    // One telemetry reading per miner (the verification ingest path).
    g.bench_function("telemetry_sweep", |b| {
        b.iter_batched(
            || base.clone(),
            |mut e| {
                let at = t0 + Duration::from_secs(5);
                for i in 0..N {
                    e.handle_telemetry(
                        at,
                        MinerId(i),
                        Telemetry {
                            at,
                            power_w: 3000.0,
                            hashrate_ths: 100.0,
                        },
                    )
                    .expect("telemetry");
                }
                black_box(e.in_flight())
            },
            BatchSize::LargeInput,
        )
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
