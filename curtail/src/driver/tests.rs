//! Driver tests: a stub fleet that obeys at once, a real ledger on disk.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

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
