//! Driver tests: a stub fleet that obeys at once, a real ledger on disk.

use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use super::status::MinersBuilder;
use super::*;
use crate::actuator::ActuatorError;
use crate::command::{Action, Command};
use crate::fleet::{ControlSurface, MinerSpec, Telemetry};
use crate::signal::{DrEvent, DrTarget};
use crate::time::{Clock, ScaledClock};

/// A fleet whose firmware obeys at once and reports it.
#[derive(Clone, Default)]
struct Stub {
    state: Arc<Mutex<std::collections::HashMap<MinerId, (f64, f64)>>>,
    calls: Arc<AtomicU64>,
}

impl Actuator for Stub {
    fn handles(&self, _s: ControlSurface) -> bool {
        true
    }
    fn execute(&self, c: &Command) -> impl Future<Output = Result<(), ActuatorError>> + Send {
        self.calls.fetch_add(1, Ordering::Relaxed);
        let mut st = self.state.lock().unwrap();
        let e = st.entry(c.miner).or_insert((3000.0, 100.0));
        match c.action {
            Action::Sleep => *e = (20.0, 0.0),
            Action::Wake => *e = (3000.0, 100.0),
            Action::SetPowerTarget(w) => *e = (f64::from(w), 100.0 * f64::from(w) / 3000.0),
            _ => {}
        }
        async { Ok(()) }
    }
}

impl TelemetrySource for Stub {
    fn read(
        &self,
        miner: MinerId,
    ) -> impl Future<Output = Result<Telemetry, ActuatorError>> + Send {
        let (w, th) = *self
            .state
            .lock()
            .unwrap()
            .get(&miner)
            .unwrap_or(&(3000.0, 100.0));
        async move {
            Ok(Telemetry {
                at: Timestamp::ZERO,
                power_w: w,
                hashrate_ths: th,
            })
        }
    }
}

fn fleet(n: u64) -> Fleet {
    Fleet::from_specs((0..n).map(|i| {
        let mut s = MinerSpec::new(
            MinerId(i),
            "S19",
            100.0 + i as f64,
            3000.0,
            ControlSurface::BraiinsOs,
        );
        s.ramp.sleep_latency = Duration::from_secs(1);
        s.ramp.sleep_w = 20.0;
        s
    }))
    .unwrap()
}

fn policy() -> PolicyConfig {
    PolicyConfig {
        max_commands_per_sec: 1000,
        ..PolicyConfig::default()
    }
}

fn edge(stub: &Stub) -> Edge<Stub, Stub, ScaledClock> {
    Edge {
        actuator: stub.clone(),
        telemetry: stub.clone(),
        clock: ScaledClock::new(20.0),
    }
}

fn dir() -> PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    let d = std::env::temp_dir().join(format!(
        "curtail-driver-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dr_event_is_carried_out_recorded_and_survives_a_restart() {
    let d = dir();
    let path = d.join("ledger.db");
    let stub = Stub::default();
    let cfg = DriverConfig {
        poll_interval: Duration::from_secs(1),
        interval: Duration::from_secs(5),
        ..DriverConfig::default()
    };
    let h = spawn(&path, policy(), fleet(10), edge(&stub), cfg.clone())
        .await
        .unwrap();
    let now = ScaledClock::new(20.0).now();
    // 10 × 3 kW; limit 15 kW: about half sleep.
    h.send(Signal::DrEvent(DrEvent {
        id: "ev1".into(),
        target: DrTarget::LimitKw(15.0),
        start: now,
        end: None,
        issued_at: now,
    }))
    .await
    .unwrap();
    let st = h
        .wait_for(Duration::from_secs(10), |s| {
            s.issued > 0 && s.verified == s.issued && s.in_flight == 0
        })
        .await
        .expect("commands verified");
    assert!(st.issued >= 5, "{st:?}");
    let report = h.shutdown().await.unwrap();
    assert_eq!(report.unanswered, 0);
    let audit = Audit::read(&path).unwrap();
    assert_eq!(audit.commands.len() as u64, report.status.issued);
    for c in &audit.commands {
        let outcomes: Vec<_> = audit.acks_of(c.id).map(|a| a.outcome.as_str()).collect();
        assert!(outcomes.contains(&"ack_ok") && outcomes.contains(&"verified"));
    }
    assert!(audit.events.iter().any(|e| e.state == "active"));
    // Restart: the event and the curtailed miners come back; nothing is re-sent.
    let before = stub.calls.load(Ordering::Relaxed);
    let h = spawn(&path, policy(), fleet(10), edge(&stub), cfg)
        .await
        .unwrap();
    let st = h.status();
    assert_eq!(st.resumed.events, 1);
    assert_eq!(st.resumed.curtailed, audit.commands.len());
    assert_eq!(
        st.resumed.next_command_id,
        audit.commands.last().unwrap().id.0 + 1
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(stub.calls.load(Ordering::Relaxed), before);
    h.shutdown().await.unwrap();
    let _ = std::fs::remove_dir_all(d);
}

/// What the application used to rebuild beside the driver from the commit
/// hook: the last commanded state of each miner.
fn commanded_by_hook() -> (
    CommitHook,
    Arc<Mutex<std::collections::HashMap<MinerId, String>>>,
) {
    let seen = Arc::new(Mutex::new(std::collections::HashMap::new()));
    let s = seen.clone();
    let hook: CommitHook = Arc::new(move |r: &Record| {
        if let Record::Commands(cs) = r {
            let mut m = s.lock().unwrap();
            for c in cs {
                let state = match c.action {
                    Action::Sleep => "sleeping".to_string(),
                    Action::Wake | Action::Unpark => "hashing".into(),
                    Action::SetPowerTarget(w) => format!("limited {w} W"),
                    Action::Park => "parked".into(),
                    Action::Reroute(_) => continue,
                };
                m.insert(c.miner, state);
            }
        }
    });
    (hook, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_carries_the_site_view() {
    let d = dir();
    let path = d.join("ledger.db");
    let stub = Stub::default();
    let (hook, by_hook) = commanded_by_hook();
    let cfg = DriverConfig {
        poll_interval: Duration::from_secs(1),
        commit_hook: Some(hook),
        ..DriverConfig::default()
    };
    let h = spawn(&path, policy(), fleet(10), edge(&stub), cfg)
        .await
        .unwrap();
    let st = h.status();
    assert_eq!(st.miners.len(), 10);
    assert_eq!(st.price_usd_per_mwh, None);
    assert!(st.dr_events.is_empty());
    // Nothing commanded yet (telemetry may already have come in: the first
    // round starts with the driver).
    assert!(st
        .miners
        .iter()
        .all(|m| m.commanded == CommandedState::Hashing));

    let now = ScaledClock::new(20.0).now();
    h.send(Signal::Price(crate::signal::PriceSignal {
        at: now,
        usd_per_mwh: 42.5,
        forecast: Vec::new(),
    }))
    .await
    .unwrap();
    h.send(Signal::DrEvent(DrEvent {
        id: "limit".into(),
        target: DrTarget::LimitKw(15.0),
        start: now,
        end: None,
        issued_at: now,
    }))
    .await
    .unwrap();
    h.send(Signal::DrEvent(DrEvent {
        id: "later".into(),
        target: DrTarget::ShedKw(6.0),
        start: now + Duration::from_secs(3600),
        end: Some(now + Duration::from_secs(7200)),
        issued_at: now,
    }))
    .await
    .unwrap();
    let st = h
        .wait_for(Duration::from_secs(10), |s| {
            s.issued > 0
                && s.verified == s.issued
                && s.in_flight == 0
                && s.miners.iter().all(|m| m.telemetry.is_some())
        })
        .await
        .expect("commands verified and every miner read");
    assert_eq!(st.price_usd_per_mwh, Some(42.5));

    // Open DR events, as the hook listed them.
    let ids: Vec<&str> = st.dr_events.iter().map(|e| e.id.as_str()).collect();
    assert!(ids.contains(&"limit") && ids.contains(&"later"), "{ids:?}");
    let limit = st.dr_events.iter().find(|e| e.id == "limit").unwrap();
    assert_eq!(limit.state, DrEventState::Active);
    assert_eq!(limit.limit_kw, 15.0);
    assert_eq!(limit.target_text(), "limit 15 kW");
    assert_eq!(limit.end, None);
    let later = st.dr_events.iter().find(|e| e.id == "later").unwrap();
    assert_eq!(later.state, DrEventState::Scheduled);
    assert!(later.baseline_kw > 6.0, "{later:?}");
    assert_eq!(later.limit_kw, later.baseline_kw - 6.0);
    assert_eq!(later.target_text(), "shed 6 kW");
    assert_eq!(later.start, now + Duration::from_secs(3600));

    // Per miner: the commanded state the hook derived, the last reading.
    let curtailed = st.miners.curtailed();
    assert!(curtailed >= 5, "{:?}", st.miners);
    let hooked = by_hook.lock().unwrap().clone();
    for m in st.miners.iter() {
        let want = hooked
            .get(&m.id)
            .cloned()
            .unwrap_or_else(|| "hashing".into());
        assert_eq!(m.commanded.to_string(), want, "{:?}", m.id);
        let t = m.telemetry.unwrap();
        match m.commanded {
            CommandedState::Sleeping => assert_eq!(t.power_w, 20.0),
            CommandedState::Hashing => assert_eq!(t.power_w, 3000.0),
            _ => {}
        }
        assert!(t.at >= now.saturating_sub(Duration::from_secs(60)));
    }

    // Ending an event drops it from the list.
    h.send(Signal::DrEnd {
        id: "limit".into(),
        at: ScaledClock::new(20.0).now(),
    })
    .await
    .unwrap();
    let st = h
        .wait_for(Duration::from_secs(10), |s| {
            s.dr_events.iter().all(|e| e.id != "limit")
        })
        .await
        .expect("ended event dropped");
    assert_eq!(st.dr_events.len(), 1);

    // Restart: miners left curtailed show their last commanded state.
    let report = h.shutdown().await.unwrap();
    let before: Vec<_> = report
        .status
        .miners
        .iter()
        .map(|m| (m.id, m.commanded))
        .collect();
    let h = spawn(
        &path,
        policy(),
        fleet(10),
        edge(&stub),
        DriverConfig::default(),
    )
    .await
    .unwrap();
    let st = h.status();
    for (id, c) in before {
        // A power target at nominal (3000 W here) lifts a limit: the ledger
        // does not count it as curtailed, so it is not recovered.
        if c.is_curtailed() && c != CommandedState::Limited(3000) {
            assert_eq!(st.miners.get(id).unwrap().commanded, c);
        }
    }
    assert_eq!(st.dr_events.len(), 1);
    h.shutdown().await.unwrap();
    let _ = std::fs::remove_dir_all(d);
}

/// A flood of dispatch messages (distinct and repeated) and a signal
/// stamped a day ahead: the ledger records only what the intake admitted
/// (a bounded number), every drop is counted, and the engine still acts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signal_flood_is_bounded_before_the_ledger() {
    let d = dir();
    let path = d.join("ledger.db");
    let stub = Stub::default();
    let edge = Edge {
        actuator: stub.clone(),
        telemetry: stub.clone(),
        clock: ScaledClock::new(1.0),
    };
    let cfg = DriverConfig {
        poll_interval: Duration::from_millis(200),
        ..DriverConfig::default()
    };
    let h = spawn(&path, policy(), fleet(10), edge, cfg).await.unwrap();
    let now = ScaledClock::new(1.0).now();
    let dispatch = |ms: u64, kw: f64| {
        Signal::Dispatch(crate::signal::DispatchSignal {
            at: now + Duration::from_millis(ms),
            target_kw: Some(kw),
        })
    };
    const FLOOD: u64 = 5_000;
    // The same message 101 times (a retrying sender), then a flood of
    // distinct ones.
    for _ in 0..101 {
        h.send(dispatch(0, 15.0)).await.unwrap();
    }
    for n in 0..FLOOD {
        h.send(dispatch(1 + n % 1000, 15.0 + (n % 7) as f64))
            .await
            .unwrap();
    }
    h.send(Signal::Dispatch(crate::signal::DispatchSignal {
        at: now + Duration::from_secs(86_400),
        target_kw: Some(0.0),
    }))
    .await
    .unwrap();
    let total = FLOOD + 102;
    let st = h
        .wait_for(Duration::from_secs(30), |s| s.signals == total)
        .await
        .expect("every signal seen");
    assert!(st.rejected_signals >= 1, "future-dated refused: {st:?}");
    assert_eq!(st.duplicate_signals, 100, "{st:?}");
    assert!(st.rate_limited_signals > 0, "{st:?}");
    // The engine acted on what it admitted (a cap near 15-21 kW of 30).
    h.wait_for(Duration::from_secs(30), |s| {
        s.issued > 0 && s.in_flight == 0
    })
    .await
    .expect("the admitted dispatch was acted on");
    let report = h.shutdown().await.unwrap();
    let audit = Audit::read(&path).unwrap();
    let s = &report.status;
    let admitted = total - s.rejected_signals - s.duplicate_signals - s.rate_limited_signals;
    assert_eq!(audit.signals as u64, admitted, "{s:?}");
    assert!(admitted < 1_000, "{admitted} of {total} reached the ledger");
    println!(
        "flood of {total}: {admitted} recorded, {} duplicates, {} over the rate, {} refused",
        s.duplicate_signals, s.rate_limited_signals, s.rejected_signals
    );
}

/// The ledger stops taking writes (its size guard, which fails exactly as a
/// full disk does): the failure is published at once, writes are retried,
/// and after the fault timeout the site goes to its configured safe state
/// (here: curtail all), with the commands that needed sending counted as
/// unrecorded instead of the fleet being left deaf.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_ledger_is_reported_and_the_site_goes_to_its_safe_state() {
    let d = dir();
    let path = d.join("ledger.db");
    let stub = Stub::default();
    let cfg = DriverConfig {
        poll_interval: Duration::from_secs(1),
        ledger_fault_timeout: Duration::from_secs(10),
        on_ledger_fault: crate::policy::SafeState::CurtailAll,
        // No room beyond what the new file holds.
        ledger_max_bytes: Some(1),
        ..DriverConfig::default()
    };
    let policy = PolicyConfig {
        min_on: Duration::ZERO,
        ..policy()
    };
    let h = spawn(&path, policy, fleet(10), edge(&stub), cfg)
        .await
        .unwrap();
    assert_eq!(h.status().ledger, LedgerHealth::default());
    // Signals fill the last free page; then writes fail.
    let clock = ScaledClock::new(20.0);
    let mut sent = 0;
    while h.status().ledger.error.is_none() && sent < 20_000 {
        let at = clock.now();
        h.send(Signal::Dispatch(crate::signal::DispatchSignal {
            at,
            target_kw: None,
        }))
        .await
        .unwrap();
        sent += 1;
        if sent % 50 == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let st = h
        .wait_for(Duration::from_secs(10), |s| s.ledger.error.is_some())
        .await
        .expect("the failing ledger is reported");
    let err = st.ledger.error.clone().unwrap();
    assert!(err.contains("full"), "{err}");
    assert!(!st.ledger.fault_engaged, "not before the timeout");
    // After the timeout (10 s of a 20x clock): safe state, fleet asleep.
    let st = h
        .wait_for(Duration::from_secs(20), |s| {
            s.ledger.fault_engaged && s.miners.curtailed() == 10 && s.acks_ok >= 10
        })
        .await
        .unwrap_or_else(|| panic!("safe state not reached: {:?}", h.status()));
    assert_eq!(st.mode, crate::policy::Mode::SafeState, "{st:?}");
    assert!(st.ledger.unrecorded_commands >= 10, "{:?}", st.ledger);
    assert!(st.ledger.write_errors > 0);
    // The writer gives up only once the driver has stopped.
    let r = h.shutdown().await;
    assert!(
        matches!(r, Err(DriverError::LedgerWrite(_))),
        "a ledger that never recovered is an error at shutdown: {r:?}"
    );
}

#[test]
fn miners_are_shared_until_changed() {
    let mut b = MinersBuilder::new((0..3000).map(MinerId));
    let first = b.snapshot();
    assert_eq!(first.len(), 3000);
    // Nothing changed: the same shared view.
    let again = b.snapshot();
    assert!(Arc::ptr_eq(&first.chunks, &again.chunks));
    b.commanded(MinerId(5), Action::Sleep);
    b.commanded(MinerId(6), Action::Reroute(crate::command::PoolId(1)));
    b.commanded(MinerId(7), Action::SetPowerTarget(2500));
    let second = b.snapshot();
    // The published view did not move; only the changed chunk was copied.
    assert_eq!(
        first.get(MinerId(5)).unwrap().commanded,
        CommandedState::Hashing
    );
    assert_eq!(
        second.get(MinerId(5)).unwrap().commanded,
        CommandedState::Sleeping
    );
    assert_eq!(
        second.get(MinerId(6)).unwrap().commanded,
        CommandedState::Hashing
    );
    assert_eq!(
        second.get(MinerId(7)).unwrap().commanded,
        CommandedState::Limited(2500)
    );
    assert!(!Arc::ptr_eq(&first.chunks[0], &second.chunks[0]));
    assert!(Arc::ptr_eq(&first.chunks[1], &second.chunks[1]));
    assert!(Arc::ptr_eq(&first.chunks[2], &second.chunks[2]));
    assert_eq!(second.curtailed(), 2);
    assert_ne!(first, second);
    assert_eq!(second.iter().count(), 3000);
    assert!(second.get(MinerId(3000)).is_none());
}

/// A lease deadline that passed between a command's commit and its send
/// (the holder was paused, or could not renew): the recorded commands are
/// not sent, each gets a failed acknowledgement saying why, and the driver
/// stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_are_not_sent_past_the_lease_deadline() {
    let d = dir();
    let path = d.join("ledger.db");
    let stub = Stub::default();
    let lease = crate::ledger::Lease {
        site: "s1".into(),
        holder: "a".into(),
        token: 7,
        valid_until: std::time::Instant::now() + Duration::from_secs(3600),
    };
    let deadline = crate::ledger::Deadline::new(&lease);
    let cfg = DriverConfig {
        poll_interval: Duration::from_secs(1),
        send_deadline: Some(deadline.clone()),
        ..DriverConfig::default()
    };
    let h = spawn(&path, policy(), fleet(4), edge(&stub), cfg)
        .await
        .unwrap();
    let now = ScaledClock::new(20.0).now();
    let event = |id: &str, kw: f64| {
        Signal::DrEvent(DrEvent {
            id: id.into(),
            target: DrTarget::LimitKw(kw),
            start: now,
            end: None,
            issued_at: now,
        })
    };
    // Within the deadline: sent.
    h.send(event("ev1", 9.0)).await.unwrap();
    h.wait_for(Duration::from_secs(10), |s| {
        s.issued > 0 && s.in_flight == 0
    })
    .await
    .expect("sent within the lease");
    let sent = stub.calls.load(Ordering::Relaxed);
    assert!(sent > 0);
    // The deadline passes (as if this process had been paused).
    deadline.extend(&crate::ledger::Lease {
        valid_until: std::time::Instant::now(),
        ..lease
    });
    assert!(deadline.passed());
    h.send(event("ev2", 0.0)).await.unwrap();
    let err = h.join().await.expect_err("the driver stops");
    assert!(matches!(err, DriverError::LeaseLapsed(n) if n > 0), "{err}");
    assert_eq!(stub.calls.load(Ordering::Relaxed), sent, "nothing sent");
    let audit = Audit::read(&path).unwrap();
    let unsent: Vec<_> = audit
        .commands
        .iter()
        .filter(|c| {
            audit.acks_of(c.id).any(|a| {
                a.detail
                    .as_deref()
                    .is_some_and(|d| d.contains("lease lapsed"))
            })
        })
        .collect();
    assert!(
        !unsent.is_empty(),
        "the unsent commands are recorded as such"
    );
    assert_eq!(audit.commands.len() as u64, sent + unsent.len() as u64);
    let _ = std::fs::remove_dir_all(d);
}
