//! Signal → last command issued, through the driver, for 10k miners; and
//! the engine's plan time for 100k miners.
//!
//! `cargo bench -p gridproxy-curtail --bench dispatch`
//!
//! The 10k miners are in-process stubs (an actuator that answers at once, a
//! telemetry source that reports what was commanded), so the figure is the
//! driver's own path: the signal through the driver's channel, the engine's
//! replan, `poll_action` for every command, the write-ahead commit of the
//! batch to the SQLite ledger (WAL, `synchronous=FULL`), and the hand-off of
//! each command to an actuator task. The engine's rate limit is set above
//! the fleet size (at the default 50 commands/s, 10k commands take 200 s by
//! design). Runs with the ledger on the temp dir's file system (real fsync)
//! and, when present, on /dev/shm (fsync free, the CPU cost alone); with
//! `DISPATCH_BENCH_DIR` set, only there.
//!
//! Plan time: `Engine::new` for 100k miners and one DR replan (the
//! `dr_shed_60pct_replan` case of the `plan` criterion bench, timed here
//! without criterion).

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gridproxy_curtail::actuator::{Actuator, ActuatorError, TelemetrySource};
use gridproxy_curtail::command::{Action, Command};
use gridproxy_curtail::driver::{self, DriverConfig, Edge};
use gridproxy_curtail::fleet::{ControlSurface, Fleet, MinerId, MinerSpec, Telemetry};
use gridproxy_curtail::policy::{Engine, PolicyConfig, Staleness};
use gridproxy_curtail::signal::{DrEvent, DrTarget, Signal};
use gridproxy_curtail::time::{Clock, SystemClock, Timestamp};

const MODELS: [(&str, f64, f64, ControlSurface); 5] = [
    ("S21", 200.0, 3500.0, ControlSurface::BraiinsOs),
    ("S19 XP", 140.0, 3010.0, ControlSurface::LuxOs),
    ("M50S", 126.0, 3276.0, ControlSurface::Whatsminer),
    ("S19j Pro", 104.0, 3068.0, ControlSurface::Vnish),
    ("S19", 95.0, 3250.0, ControlSurface::LuxOs),
];

fn specs(n: u64) -> impl Iterator<Item = MinerSpec> {
    (0..n).map(|i| {
        let (model, ths, w, s) = MODELS[(i % MODELS.len() as u64) as usize];
        let w = w * (1.0 + ((i * 7919) % 101) as f64 / 2000.0);
        MinerSpec::new(MinerId(i), model, ths, w, s)
    })
}

/// Miners that obey at once and report it.
#[derive(Clone, Default)]
struct Stubs {
    state: Arc<Mutex<HashMap<MinerId, (f64, f64)>>>,
}

impl Actuator for Stubs {
    fn handles(&self, _s: ControlSurface) -> bool {
        true
    }

    fn execute(&self, c: &Command) -> impl Future<Output = Result<(), ActuatorError>> + Send {
        let v = match c.action {
            Action::Sleep => Some((20.0, 0.0)),
            Action::Wake => Some((3000.0, 100.0)),
            Action::SetPowerTarget(w) => Some((f64::from(w), 90.0)),
            _ => None,
        };
        if let Some(v) = v {
            self.state
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(c.miner, v);
        }
        async { Ok(()) }
    }
}

impl TelemetrySource for Stubs {
    fn read(
        &self,
        miner: MinerId,
    ) -> impl Future<Output = Result<Telemetry, ActuatorError>> + Send {
        let (w, th) = self
            .state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&miner)
            .copied()
            .unwrap_or((3000.0, 100.0));
        async move {
            Ok(Telemetry {
                at: Timestamp::ZERO,
                power_w: w,
                hashrate_ths: th,
            })
        }
    }
}

struct Run {
    issued: u64,
    to_last: Duration,
    to_first_ms: u64,
    drain: Duration,
}

async fn once(dir: &Path, n: u64) -> Run {
    let ledger = dir.join(format!(
        "dispatch-bench-{}-{}.db",
        std::process::id(),
        SystemClock.now().as_millis()
    ));
    let policy = PolicyConfig {
        max_commands_per_sec: 1_000_000,
        staleness: Staleness::NONE,
        ..PolicyConfig::default()
    };
    let stubs = Stubs::default();
    let h = driver::spawn(
        &ledger,
        policy,
        Fleet::from_specs(specs(n)).expect("fleet"),
        Edge {
            actuator: stubs.clone(),
            telemetry: stubs,
            clock: SystemClock,
        },
        DriverConfig {
            poll_interval: Duration::from_secs(3600),
            ..DriverConfig::default()
        },
    )
    .await
    .expect("driver");
    h.wait_for(Duration::from_secs(60), |s| s.measured_kw.is_some())
        .await
        .expect("first telemetry round");
    let now = SystemClock.now();
    let started = Instant::now();
    // Full shed: every miner sleeps.
    h.send(Signal::DrEvent(DrEvent {
        id: "bench".into(),
        target: DrTarget::LimitKw(0.0),
        start: now,
        end: None,
        issued_at: now,
    }))
    .await
    .expect("send");
    let st = h
        .wait_for(Duration::from_secs(120), |s| s.issued >= n)
        .await
        .expect("every command issued");
    let to_last = started.elapsed();
    let to_first_ms = st
        .first_issue_at
        .map_or(0, |t| t.as_millis().saturating_sub(now.as_millis()));
    let drained = Instant::now();
    let report = h.shutdown().await.expect("shutdown");
    let drain = drained.elapsed();
    for suffix in ["", "-wal", "-shm"] {
        let mut p = ledger.clone().into_os_string();
        p.push(suffix);
        let _ = std::fs::remove_file(PathBuf::from(p));
    }
    Run {
        issued: report.status.issued,
        to_last,
        to_first_ms,
        drain,
    }
}

fn dispatch(rt: &tokio::runtime::Runtime, dir: &Path, runs: usize) {
    const N: u64 = 10_000;
    let mut lasts = Vec::new();
    for i in 0..runs {
        let r = rt.block_on(once(dir, N));
        println!(
            "dispatch_10k [{}] run {i}: {} commands; signal -> first issued {} ms, -> last issued \
             {:.1} ms; ledger drain at shutdown (10k acks) {:.2} s; 10k commands and their \
             acknowledgements recorded in {:.2} s (goal < 1 s, group commit)",
            dir.display(),
            r.issued,
            r.to_first_ms,
            r.to_last.as_secs_f64() * 1e3,
            r.drain.as_secs_f64(),
            (r.to_last + r.drain).as_secs_f64()
        );
        lasts.push(r.to_last);
    }
    lasts.sort();
    println!(
        "dispatch_10k [{}]: signal -> last command issued: min {:.1} ms, median {:.1} ms, max \
         {:.1} ms over {runs} runs (goal < 1000 ms)",
        dir.display(),
        lasts[0].as_secs_f64() * 1e3,
        lasts[lasts.len() / 2].as_secs_f64() * 1e3,
        lasts[lasts.len() - 1].as_secs_f64() * 1e3,
    );
}

fn plan_100k() {
    let t0 = Timestamp::from_secs(1_700_000_000);
    let built = Instant::now();
    let engine = Engine::new(
        PolicyConfig::default(),
        Fleet::from_specs(specs(100_000)).expect("fleet"),
        t0,
    )
    .expect("engine");
    let build = built.elapsed();
    let site_kw = engine.fleet().nominal_kw();
    let mut times = Vec::new();
    for _ in 0..10 {
        let mut e = engine.clone();
        let t = Instant::now();
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
        times.push(t.elapsed());
        std::hint::black_box(e.plan().expected_kw);
    }
    times.sort();
    println!(
        "plan_100k: Engine::new {:.1} ms; DR shed-60% replan: min {:.1} ms, median {:.1} ms \
         (10 runs)",
        build.as_secs_f64() * 1e3,
        times[0].as_secs_f64() * 1e3,
        times[times.len() / 2].as_secs_f64() * 1e3,
    );
}

fn main() {
    // `cargo bench` passes `--bench`; ignore arguments.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    plan_100k();
    match std::env::var_os("DISPATCH_BENCH_DIR") {
        Some(d) => dispatch(&rt, Path::new(&d), 5),
        None => {
            dispatch(&rt, &std::env::temp_dir(), 1);
            let shm = Path::new("/dev/shm");
            if shm.is_dir() {
                dispatch(&rt, shm, 5);
            }
        }
    }
}
