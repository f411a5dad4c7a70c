//! `kill -9` of the process running gridproxy and the curtailment driver,
//! in the middle of a DR event.
//!
//! The child process is this test binary re-run as the ignored test
//! [`kill9_child`]: it starts gridproxy (the site's SV1 miners hash through
//! it into `pool_sv2`) and the driver (firmware actuators, proxy bridge,
//! SQLite ledger), takes signals as JSON lines on stdin and prints a line for
//! every ledger record once it is durably committed. The site (100
//! emulators: 24 each of LuxOS, Braiins OS, Whatsminer, VNish, 4 stock) and
//! `pool_sv2` live in this (parent) process and survive the kills. Site time
//! runs 10× faster than real time; both processes share the clock anchor.
//!
//! 1. Event "site ≤ 40 % of its kW", the engine rate-limited to 5 commands
//!    per second so the first wave takes a while; SIGKILL once 25 commands
//!    are committed. Every record the child reported committed is in the
//!    ledger; command ids have no gap; SQLite's integrity check passes.
//! 2. Restart: the ledger gives back the open event and the curtailed
//!    miners; the rest of the wave goes out, the site reaches the target.
//!    SIGKILL again, with the fleet curtailed; restart; hold past the
//!    engine's resume hold.
//! 3. Across the kills and restarts, until the engine's resume hold ends:
//!    no miner that went to sleep hashes again, no wake command is issued,
//!    and once reached the site stays within ±2 % of the target. After the
//!    hold the engine replans from the recovered event alone and the site
//!    must stay at or under the limit.
//!
//!    `Engine::resume` restores a recovered fine-tune `SetPowerTarget(w)`
//!    as that limit (it used to take it for the chain's minimum power
//!    target, and the replan at the end of the hold traded a sleeping miner
//!    for power targets on others; see `policy/resume.rs`).
//! 4. End the event: restore in batches; shut the child down cleanly. Every
//!    command in the ledger has its acknowledgement except those in flight
//!    at a kill.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use gridproxy::site::park::ProxyActuator;
use gridproxy_curtail as curtail;
use gridproxy_fixtures::site::{Firmware, Site};
use gridproxy_tests::bench::*;
use gridproxy_tests::*;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio_util::sync::CancellationToken;

use curtail::actuators::{FleetActuator, MinerEndpoint};
use curtail::command::{Ack, Action};
use curtail::driver::{self, Audit, DriverConfig, Edge, Record, Route};
use curtail::fleet::{ControlSurface, Fleet, MinerId, MinerSpec};
use curtail::ledger::Ledger;
use curtail::policy::{PolicyConfig, PolicyEvent, Staleness};
use curtail::signal::{DrEvent, DrTarget, Signal};
use curtail::time::{Clock, Timestamp};

const TEST_LIMIT: Duration = Duration::from_secs(300);
const CHILD_ENV: &str = "GRIDPROXY_CURTAIL_KILL9_CHILD";

/// The child's test name in this binary (`curtail_kill9::kill9_child`: libtest
/// names a test by its module path without the crate).
fn child_test_name() -> String {
    let module = module_path!();
    let module = module.split_once("::").map_or(module, |(_, m)| m);
    format!("{module}::kill9_child")
}
const RESUME_HOLD: Duration = Duration::from_secs(30);

fn policy() -> PolicyConfig {
    PolicyConfig {
        max_commands_per_sec: 5,
        restore_batch: 10,
        restore_interval: Duration::from_secs(10),
        min_on: Duration::from_secs(30),
        min_off: Duration::from_secs(30),
        ack_timeout: Duration::from_secs(20),
        verify_grace: Duration::from_secs(20),
        dr_lead_margin: Duration::from_secs(55),
        resume_hold: RESUME_HOLD,
        staleness: Staleness::NONE,
        ..PolicyConfig::default()
    }
}

// ---------------------------------------------------------------------------
// The child: gridproxy + driver.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "child process of kill9_during_dr_event_*, started by it"]
async fn kill9_child() {
    let _gate = gridproxy_tests::module_gate(module_path!());
    let Ok(path) = std::env::var(CHILD_ENV) else {
        return;
    };
    let _ = tracing_subscriber::fmt()
        .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .try_init();
    let cfg: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let addr = |k: &str| -> SocketAddr { cfg[k].as_str().unwrap().parse().unwrap() };
    let proxy = gridproxy_tests::start_proxy(proxy_config(
        addr("pool"),
        cfg["key"].as_str().unwrap(),
        addr("sv1"),
    ))
    .await
    .expect("proxy starts");
    let specs: Vec<MinerSpec> = serde_json::from_value(cfg["specs"].clone()).unwrap();
    let mut fw = FleetActuator::new(CLIENT_TIMEOUT_REAL);
    let bridge = ProxyActuator::new(proxy.ctx.router.clone(), std::sync::Arc::default());
    for m in cfg["miners"].as_array().unwrap() {
        let id = MinerId(m["id"].as_u64().unwrap());
        let surface: ControlSurface = serde_json::from_value(m["surface"].clone()).unwrap();
        let ep = MinerEndpoint::new(
            surface,
            m["addr"].as_str().unwrap().parse::<SocketAddr>().unwrap(),
        )
        .with_credentials("root", m["password"].as_str().unwrap());
        fw.insert(id, &ep);
        bridge.insert(id, m["worker"].as_str().unwrap());
    }
    // What the application does at start: miners the ledger left parked are
    // parked again in this (new) router.
    let (_, resume) =
        Ledger::open_and_recover(std::path::Path::new(cfg["ledger"].as_str().unwrap()))
            .expect("ledger");
    bridge.restore(&resume);
    let fw = Arc::new(fw);
    let ms = |k: &str| Timestamp::from_millis(cfg["clock"][k].as_u64().unwrap());
    let clock = ScaledClock::anchored(
        ms("origin"),
        ms("wall_origin"),
        cfg["clock"]["speed"].as_f64().unwrap(),
    );
    let hook: driver::CommitHook = Arc::new(|r: &Record| match r {
        Record::Commands(cs) => {
            for c in cs {
                println!("LEDGER cmd {} {} {}", c.id.0, c.miner.0, c.action.as_str());
            }
        }
        Record::Ack { id, ack, .. } => {
            let outcome = match ack {
                Ack::Ok => "ack_ok",
                Ack::Failed(_) => "ack_failed",
            };
            println!("LEDGER ack {} {outcome}", id.0);
        }
        Record::Event(PolicyEvent::DrEvent { event, state, .. }) => {
            println!("LEDGER event {} {}", event.id, state.as_str());
        }
        _ => {}
    });
    let policy: PolicyConfig = serde_json::from_value(cfg["policy"].clone()).unwrap();
    let h = driver::spawn(
        std::path::Path::new(cfg["ledger"].as_str().unwrap()),
        policy,
        Fleet::from_specs(specs).unwrap(),
        Edge {
            actuator: Route {
                firmware: fw.clone(),
                proxy: bridge,
            },
            telemetry: fw,
            clock,
        },
        DriverConfig {
            poll_interval: Duration::from_secs(5),
            interval: Duration::from_secs(10),
            commit_hook: Some(hook),
            ..DriverConfig::default()
        },
    )
    .await
    .expect("driver starts");
    h.wait_for(Duration::from_secs(30), |s| s.measured_kw.is_some())
        .await
        .expect("first telemetry round");
    let r = h.status().resumed;
    println!("READY {} {} {}", r.curtailed, r.events, r.next_command_id);
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        if line.trim().is_empty() {
            continue;
        }
        let s: Signal = serde_json::from_str(&line).expect("signal JSON");
        h.send(s).await.expect("driver running");
    }
    let report = h.shutdown().await.expect("driver stops");
    println!("STOPPED {}", report.unanswered);
    proxy.stop.cancel();
}

// ---------------------------------------------------------------------------
// The parent.

/// A running child process, its stdout collected line by line.
struct Child {
    process: tokio::process::Child,
    stdin: Option<tokio::process::ChildStdin>,
    lines: Arc<Mutex<Vec<String>>>,
    reader: tokio::task::JoinHandle<()>,
}

impl Child {
    fn spawn(config: &std::path::Path, log: &std::path::Path) -> Child {
        let exe = std::env::current_exe().expect("test binary path");
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("child log");
        let mut process = tokio::process::Command::new(exe)
            .arg(child_test_name())
            .args(["--exact", "--ignored", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, config)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .kill_on_drop(true)
            .spawn()
            .expect("spawn child");
        let stdout = process.stdout.take().expect("child stdout");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        let reader = tokio::spawn(async move {
            let mut r = BufReader::new(stdout).lines();
            while let Ok(Some(l)) = r.next_line().await {
                sink.lock().unwrap().push(l);
            }
        });
        Child {
            stdin: process.stdin.take(),
            process,
            lines,
            reader,
        }
    }

    fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    async fn wait_line(&self, prefix: &str, timeout: Duration) -> Option<String> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            // libtest's "test kill9_child ... " may precede the first line.
            if let Some(l) = self
                .lines()
                .into_iter()
                .find_map(|l| l.find(prefix).map(|i| l[i..].to_string()))
            {
                return Some(l);
            }
            if tokio::time::Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn send(&mut self, s: &Signal) {
        let mut line = serde_json::to_string(s).unwrap();
        line.push('\n');
        let stdin = self.stdin.as_mut().expect("child stdin open");
        stdin
            .write_all(line.as_bytes())
            .await
            .expect("write signal");
        stdin.flush().await.unwrap();
    }

    /// SIGKILL; returns everything it printed.
    async fn kill9(mut self) -> Vec<String> {
        self.process.start_kill().expect("SIGKILL");
        let status = self.process.wait().await.expect("reap child");
        assert!(!status.success(), "child was killed");
        let _ = (&mut self.reader).await;
        self.lines()
    }

    /// Close stdin (the child shuts down cleanly); returns its output.
    async fn stop(mut self) -> Vec<String> {
        drop(self.stdin.take());
        let status = tokio::time::timeout(Duration::from_secs(60), self.process.wait())
            .await
            .expect("child exits")
            .expect("reap child");
        let _ = (&mut self.reader).await;
        assert!(status.success(), "child failed: {status}");
        self.lines()
    }
}

/// What a child reported committed.
#[derive(Debug, Default)]
struct Committed {
    cmds: Vec<(u64, u64, String)>,
    acks: Vec<(u64, String)>,
    events: Vec<(String, String)>,
}

fn committed(lines: &[String]) -> Committed {
    let mut c = Committed::default();
    for l in lines {
        let Some(i) = l.find("LEDGER ") else {
            continue;
        };
        let f: Vec<&str> = l[i..].split_whitespace().collect();
        match f.as_slice() {
            ["LEDGER", "cmd", id, miner, action] => c.cmds.push((
                id.parse().unwrap(),
                miner.parse().unwrap(),
                action.to_string(),
            )),
            ["LEDGER", "ack", id, outcome] => {
                c.acks.push((id.parse().unwrap(), outcome.to_string()))
            }
            ["LEDGER", "event", id, state] => c.events.push((id.to_string(), state.to_string())),
            _ => {}
        }
    }
    c
}

fn ready(line: &str) -> (usize, usize, u64) {
    let f: Vec<&str> = line.split_whitespace().collect();
    (
        f[1].parse().unwrap(),
        f[2].parse().unwrap(),
        f[3].parse().unwrap(),
    )
}

/// Everything the child reported committed is in the ledger; ids have no
/// gap; the file is sound. Returns the audit.
fn check_ledger(path: &std::path::Path, c: &Committed) -> Audit {
    Ledger::open(path)
        .expect("ledger opens")
        .integrity_check()
        .expect("integrity");
    let audit = Audit::read(path).expect("ledger readable");
    let by_id: HashMap<u64, &curtail::ledger::CommandRecord> =
        audit.commands.iter().map(|c| (c.id.0, c)).collect();
    for (id, miner, action) in &c.cmds {
        let r = by_id
            .get(id)
            .unwrap_or_else(|| panic!("reported command {id} missing from the ledger"));
        assert_eq!((r.miner.0, r.action.as_str()), (*miner, action.as_str()));
    }
    for (id, outcome) in &c.acks {
        assert!(
            audit
                .acks
                .iter()
                .any(|a| a.command.0 == *id && a.outcome == *outcome),
            "reported ack {id} {outcome} missing from the ledger"
        );
    }
    for (id, state) in &c.events {
        assert!(
            audit
                .events
                .iter()
                .any(|e| e.event_id == *id && e.state == *state),
            "reported event {id} {state} missing"
        );
    }
    let ids: Vec<u64> = audit.commands.iter().map(|c| c.id.0).collect();
    assert!(
        ids.iter().enumerate().all(|(i, id)| *id == i as u64 + 1),
        "command ids with gaps: {ids:?}"
    );
    audit
}

/// Miners whose last command in `audit` left them curtailed.
fn curtailed(audit: &Audit) -> BTreeSet<u64> {
    let mut last: HashMap<u64, bool> = HashMap::new();
    for c in &audit.commands {
        last.insert(c.miner.0, c.curtail);
    }
    last.into_iter()
        .filter(|(_, c)| *c)
        .map(|(m, _)| m)
        .collect()
}

/// Watches the site: samples of kW, and miners that woke after sleeping
/// (with when).
struct Watch {
    samples: Vec<(Timestamp, f64)>,
    woke: HashMap<usize, Timestamp>,
}

fn watch(
    site: Arc<Site>,
    clock: ScaledClock,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<Watch> {
    tokio::spawn(async move {
        let mut w = Watch {
            samples: Vec::new(),
            woke: HashMap::new(),
        };
        let mut slept = vec![false; site.len()];
        while !stop.is_cancelled() {
            for m in site.miners() {
                if asleep(m) {
                    slept[m.index] = true;
                } else if slept[m.index] && m.hashrate_ths() > 0.0 {
                    w.woke.entry(m.index).or_insert_with(|| clock.now());
                }
            }
            w.samples.push((clock.now(), site_kw(&site)));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        w
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_during_dr_event_keeps_fleet_curtailed_and_ledger_whole() {
    let _gate = gridproxy_tests::module_gate(module_path!());
    gridproxy_tests::serially(TEST_LIMIT, run()).await;
}

async fn run() {
    // gridproxy runs in the child: the site mines to its SV1 port.
    let PoolBench { tp: _tp, pool } = PoolBench::start().await;
    let sv1 = free_addr();
    let bench = SiteBench::new("k9", (65, 0))
        .mixed(24)
        .with(|c| {
            c.counts.push((Firmware::Stock, 4));
            c.pool = Some(sv1);
        })
        .start()
        .await;
    let site = bench.site.clone();
    let dir = &bench.dir;
    let ledger = dir.join("ledger.db");
    let clock = ScaledClock::new(SPEED);
    let config = dir.join("child.json");
    let miners: Vec<Value> = site
        .miners()
        .iter()
        .map(|m| {
            json!({
                "id": m.index,
                "surface": surface(m.firmware),
                "addr": m.addr().to_string(),
                "password": m.password,
                "worker": m.worker,
            })
        })
        .collect();
    let specs: Vec<MinerSpec> = site.miners().iter().map(spec).collect();
    std::fs::write(
        &config,
        serde_json::to_string_pretty(&json!({
            "ledger": ledger,
            "pool": pool.addr.to_string(),
            "key": pool.authority_pubkey.to_string(),
            "sv1": sv1.to_string(),
            "clock": {
                "origin": clock.origin().as_millis(),
                "wall_origin": clock.wall_origin().as_millis(),
                "speed": clock.speed(),
            },
            "specs": specs,
            "miners": miners,
            "policy": policy(),
        }))
        .unwrap(),
    )
    .unwrap();
    let log = dir.join("child.log");
    let tail = || std::fs::read_to_string(dir.join("child.log")).unwrap_or_default();

    // --- run 1: start the event, kill mid-wave ---
    let mut child = Child::spawn(&config, &log);
    let r = child
        .wait_line("READY", Duration::from_secs(60))
        .await
        .unwrap_or_else(|| panic!("child 1 not ready; log:\n{}", tail()));
    assert_eq!(ready(&r), (0, 0, 1));
    let stats = site.sv1_stats().clone();
    assert!(
        wait_until(Duration::from_secs(60), || stats.accepted.get() >= 20).await,
        "SV1 miners got {} shares accepted through the child's gridproxy",
        stats.accepted.get()
    );
    let base_kw = site_kw(&site);
    let target_kw = 0.4 * base_kw;
    let band_kw = 0.02 * target_kw;
    let inside = |kw: f64| (kw - target_kw).abs() <= band_kw;
    let t0 = clock.now();
    let event_id = "kill9-1".to_string();
    child
        .send(&Signal::DrEvent(DrEvent {
            id: event_id.clone(),
            target: DrTarget::LimitKw(target_kw),
            start: t0 + Duration::from_secs(60),
            end: None,
            issued_at: t0,
        }))
        .await;
    let stop_watch = CancellationToken::new();
    let watcher = watch(site.clone(), clock, stop_watch.clone());
    let n_cmds = |c: &Child| committed(&c.lines()).cmds.len();
    assert!(
        wait_until(Duration::from_secs(30), || n_cmds(&child) >= 25).await,
        "child 1 committed {} commands; log:\n{}",
        n_cmds(&child),
        tail()
    );
    let killed1 = clock.now();
    let lines1 = child.kill9().await;
    let c1 = committed(&lines1);
    let audit1 = check_ledger(&ledger, &c1);
    let unanswered1: Vec<u64> = audit1
        .commands
        .iter()
        .filter(|c| audit1.acks_of(c.id).next().is_none())
        .map(|c| c.id.0)
        .collect();
    let curtailed1 = curtailed(&audit1);
    println!(
        "kill 1 at t0+{:.1} s: child reported {} commands, {} acks committed; ledger holds {} \
         commands ({} unanswered: {unanswered1:?}), {} miners curtailed",
        killed1.saturating_since(t0).as_secs_f64(),
        c1.cmds.len(),
        c1.acks.len(),
        audit1.commands.len(),
        unanswered1.len(),
        curtailed1.len()
    );
    assert!(c1.cmds.len() >= 25);
    assert_eq!(c1.events.last().map(|e| e.1.as_str()), Some("active"));

    // --- run 2: resume, finish the wave, kill with the fleet curtailed ---
    let child = Child::spawn(&config, &log);
    let r = child
        .wait_line("READY", Duration::from_secs(60))
        .await
        .unwrap_or_else(|| panic!("child 2 not ready; log:\n{}", tail()));
    assert_eq!(
        ready(&r),
        (curtailed1.len(), 1, audit1.commands.len() as u64 + 1),
        "resumed (curtailed, events, next id)"
    );
    let restarted2 = clock.now();
    let reached = wait_until(Duration::from_secs(60), || inside(site_kw(&site))).await;
    let reached_at = clock.now();
    assert!(
        reached,
        "site at {:.1} kW, target {target_kw:.1}; child log:\n{}",
        site_kw(&site),
        tail()
    );
    println!(
        "restart 1 at t0+{:.1} s; target reached at t0+{:.1} s (deadline t0+60 s)",
        restarted2.saturating_since(t0).as_secs_f64(),
        reached_at.saturating_since(t0).as_secs_f64()
    );
    // Let the wave settle (commands acknowledged and verified).
    tokio::time::sleep(real(Duration::from_secs(30))).await;
    let killed2 = clock.now();
    let lines2 = child.kill9().await;
    let c2 = committed(&lines2);
    let audit2 = check_ledger(&ledger, &c2);
    let curtailed2 = curtailed(&audit2);
    assert!(curtailed1.is_subset(&curtailed2));
    println!(
        "kill 2 at t0+{:.1} s: ledger holds {} commands, {} miners curtailed",
        killed2.saturating_since(t0).as_secs_f64(),
        audit2.commands.len(),
        curtailed2.len()
    );
    // Dead driver for 20 s of site time: nothing moves.
    tokio::time::sleep(real(Duration::from_secs(20))).await;

    // --- run 3: resume, hold past the resume hold ---
    let mut child = Child::spawn(&config, &log);
    let r = child
        .wait_line("READY", Duration::from_secs(60))
        .await
        .unwrap_or_else(|| panic!("child 3 not ready; log:\n{}", tail()));
    assert_eq!(
        ready(&r),
        (curtailed2.len(), 1, audit2.commands.len() as u64 + 1)
    );
    // The engine holds recovered curtailments until a fresh signal or its
    // resume hold has passed (from its start, before READY).
    let hold_end = clock.now() + RESUME_HOLD - Duration::from_secs(2);
    tokio::time::sleep(real(RESUME_HOLD + Duration::from_secs(30))).await;
    let ended = clock.now();
    child
        .send(&Signal::DrEnd {
            id: event_id.clone(),
            at: ended,
        })
        .await;
    stop_watch.cancel();
    let w = watcher.await.unwrap();
    let woke_early: Vec<_> = w.woke.iter().filter(|(_, t)| **t < hold_end).collect();
    assert!(
        woke_early.is_empty(),
        "miners woke across the kills and restarts: {woke_early:?}"
    );
    // After the hold the engine replans from the (recovered) event alone.
    let mut swapped: Vec<(usize, f64)> = w
        .woke
        .iter()
        .map(|(m, t)| (*m, t.saturating_since(t0).as_secs_f64()))
        .collect();
    swapped.sort_by_key(|x| x.0);
    println!(
        "replan after the resume hold (t0+{:.1} s) woke {} miners: {swapped:?}",
        hold_end.saturating_since(t0).as_secs_f64(),
        swapped.len()
    );
    // The same plan as before the kills: no sleeper traded for power targets.
    assert!(swapped.is_empty(), "woken after the hold: {swapped:?}");
    let span = |from: Timestamp, to: Timestamp| {
        let kw: Vec<f64> = w
            .samples
            .iter()
            .filter(|(t, _)| *t >= from && *t < to)
            .map(|(_, kw)| *kw)
            .collect();
        let (lo, hi) = kw
            .iter()
            .fold((f64::MAX, f64::MIN), |(a, b), &k| (a.min(k), b.max(k)));
        (kw, lo, hi)
    };
    let (held, lo, hi) = span(reached_at, hold_end);
    println!(
        "target {target_kw:.1} kW ±{band_kw:.1}: {lo:.1}..{hi:.1} kW from reaching it, across \
         kill 2 and restart 2, to the end of the resume hold ({} samples)",
        held.len()
    );
    assert!(held.iter().all(|kw| inside(*kw)));
    // After the hold, never above the event's limit.
    let (after, lo, hi) = span(hold_end, ended);
    println!(
        "after the resume hold to the end of the event: {lo:.1}..{hi:.1} kW ({} samples)",
        after.len()
    );
    assert!(hi <= target_kw + band_kw);

    // --- restore, clean stop ---
    let all_back = || site.miners().iter().all(at_nominal);
    assert!(
        wait_until(Duration::from_secs(60), all_back).await,
        "restore incomplete; log:\n{}",
        tail()
    );
    tokio::time::sleep(real(Duration::from_secs(40))).await; // verifications land
    let lines3 = child.stop().await;
    assert!(lines3.iter().any(|l| l.contains("STOPPED 0")), "{lines3:?}");
    let c3 = committed(&lines3);
    let audit = check_ledger(&ledger, &c3);

    // No wake before the resume hold ended; restore in batches after the
    // event.
    let early_wakes: Vec<_> = audit
        .commands
        .iter()
        .filter(|c| c.at < hold_end && matches!(c.action, Action::Wake | Action::Unpark))
        .collect();
    assert!(
        early_wakes.is_empty(),
        "woken across the restarts: {early_wakes:?}"
    );
    let batches = assert_staggered(&wakes_after(&audit, ended), 10, Duration::from_secs(10));
    println!("restore batches {batches:?}");
    // Every command has its acknowledgement, except those in flight at a kill.
    let in_flight_at_kill: HashSet<u64> = audit
        .commands
        .iter()
        .filter(|c| c.at <= killed2 && audit.acks_of(c.id).next().is_none())
        .map(|c| c.id.0)
        .collect();
    for c in &audit.commands {
        if !in_flight_at_kill.contains(&c.id.0) {
            assert!(
                audit
                    .acks_of(c.id)
                    .any(|a| a.outcome == "ack_ok" || a.outcome == "ack_failed"),
                "{:?} {:?} to {} unanswered",
                c.id,
                c.action,
                c.miner
            );
        }
    }
    let states: Vec<&str> = audit.events.iter().map(|e| e.state.as_str()).collect();
    println!(
        "ledger: {} commands, {} ack rows, {} unanswered (in flight at a kill), event states {states:?}",
        audit.commands.len(),
        audit.acks.len(),
        in_flight_at_kill.len()
    );
    assert_eq!(states.last(), Some(&"ended"));
    site.stop();
    let _ = std::fs::remove_dir_all(dir);
}
