//! The curtailment engine's hand on the proxy: an
//! [`Actuator`](curtail::actuator::Actuator) for proxy-side actions
//! (park, unpark, reroute) over the [`Router`], keyed by worker name.
//!
//! Withholding work does not cut an ASIC's power (it fails over to a backup
//! pool and keeps hashing), so the engine parks only miners whose firmware
//! could not be commanded, and reroutes for pool moves; see ARCHITECTURE.md.
//!
//! The router forgets a miner's park/pin when it disconnects (and all of
//! them when the proxy restarts), so [`ProxyActuator`] keeps the desired
//! state per worker and [`reconcile`](ProxyActuator::reconcile) re-applies
//! it; [`spawn_reconciler`](ProxyActuator::spawn_reconciler) does so
//! periodically, which covers miners that reconnect.
//!
//! The `gridproxy-curtail` crate is re-exported as [`curtail`], so users of
//! the daemon crate reach the engine, driver and firmware clients through
//! it.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use gridproxy_curtail as curtail;

use curtail::actuator::{Actuator, ActuatorError};
use curtail::command::{Action, Command};
use curtail::fleet::{ControlSurface, MinerId};
use gridproxy_proxy::router::Router;

/// What the engine last asked of one worker.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Desired {
    parked: bool,
    pool: Option<usize>,
}

#[derive(Debug, Default)]
struct Inner {
    workers: HashMap<MinerId, String>,
    desired: HashMap<String, Desired>,
}

/// Park, unpark and reroute through the proxy's router.
///
/// Cheap to clone (shared state). Its std mutex is never held across an
/// `.await` nor while calling the router.
#[derive(Clone)]
pub struct ProxyActuator {
    router: Arc<Router>,
    inner: Arc<Mutex<Inner>>,
}

impl std::fmt::Debug for ProxyActuator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let inner = self.lock();
        f.debug_struct("ProxyActuator")
            .field("workers", &inner.workers.len())
            .field("desired", &inner.desired.len())
            .finish()
    }
}

impl ProxyActuator {
    /// An actuator over `router` with no miners mapped yet.
    pub fn new(router: Arc<Router>) -> ProxyActuator {
        ProxyActuator {
            router,
            inner: Arc::new(Mutex::new(Inner::default())),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Every mutation is a plain insert: a poisoned map is still valid.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Map `miner` to the worker name it authorizes with (the full SV1
    /// `user`, e.g. `account.rig7`, as the router sees it).
    pub fn insert(&self, miner: MinerId, worker: impl Into<String>) {
        self.lock().workers.insert(miner, worker.into());
    }

    /// Number of mapped miners.
    pub fn len(&self) -> usize {
        self.lock().workers.len()
    }

    /// Whether no miner is mapped.
    pub fn is_empty(&self) -> bool {
        self.lock().workers.is_empty()
    }

    /// The worker name of `miner`.
    pub fn worker(&self, miner: MinerId) -> Option<String> {
        self.lock().workers.get(&miner).cloned()
    }

    /// Whether the engine last asked to park `worker`.
    pub fn is_parked(&self, worker: &str) -> bool {
        self.lock().desired.get(worker).is_some_and(|d| d.parked)
    }

    /// Re-apply every desired park and pin to the router (miners that
    /// reconnected come back unparked and unpinned). Returns the number of
    /// router entries touched.
    pub fn reconcile(&self) -> usize {
        // Sets, not lists: the router asks about every miner it holds.
        let (parked, pins) = {
            let inner = self.lock();
            let parked: HashSet<String> = inner
                .desired
                .iter()
                .filter(|(_, d)| d.parked)
                .map(|(w, _)| w.clone())
                .collect();
            let mut pins: HashMap<usize, HashSet<String>> = HashMap::new();
            for (w, d) in &inner.desired {
                if let Some(p) = d.pool {
                    pins.entry(p).or_default().insert(w.clone());
                }
            }
            (parked, pins)
        };
        let mut n = 0;
        if !parked.is_empty() {
            n += self.router.park(|w| parked.contains(w));
        }
        for (pool, workers) in pins {
            n += self.router.move_to(|w| workers.contains(w), Some(pool));
        }
        n
    }

    /// Run [`reconcile`](Self::reconcile) every `every` until `shutdown`.
    pub fn spawn_reconciler(&self, every: Duration, shutdown: CancellationToken) {
        let me = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tick.tick() => {}
                }
                let has_work = me
                    .lock()
                    .desired
                    .values()
                    .any(|d| d.parked || d.pool.is_some());
                if has_work {
                    me.reconcile();
                }
            }
        });
    }

    fn apply(&self, command: &Command) -> Result<(), ActuatorError> {
        let miner = command.miner;
        let worker = self
            .worker(miner)
            .ok_or(ActuatorError::UnknownMiner(miner))?;
        let is = |w: &str| w == worker;
        match command.action {
            Action::Park => {
                self.lock()
                    .desired
                    .entry(worker.clone())
                    .or_default()
                    .parked = true;
                self.router.park(is);
            }
            Action::Unpark => {
                self.lock()
                    .desired
                    .entry(worker.clone())
                    .or_default()
                    .parked = false;
                self.router.unpark(is);
            }
            Action::Reroute(pool) => {
                let p = pool.0 as usize;
                if p >= self.router.pools().len() {
                    return Err(ActuatorError::Rejected {
                        miner,
                        detail: format!(
                            "no pool {p} (the proxy has {})",
                            self.router.pools().len()
                        ),
                    });
                }
                self.lock().desired.entry(worker.clone()).or_default().pool = Some(p);
                self.router.move_to(is, Some(p));
            }
            Action::Sleep | Action::Wake | Action::SetPowerTarget(_) => {
                return Err(ActuatorError::Unsupported {
                    miner,
                    surface: command.surface,
                    action: command.action.as_str(),
                })
            }
        }
        Ok(())
    }
}

impl Actuator for ProxyActuator {
    /// Firmware surfaces: none (this actuator only parks and reroutes).
    fn handles(&self, _surface: ControlSurface) -> bool {
        false
    }

    /// Park/unpark/reroute the miner's worker. A miner not connected right
    /// now is accepted too: the desired state applies when it connects
    /// (with the reconciler running).
    fn execute(&self, command: &Command) -> impl Future<Output = Result<(), ActuatorError>> + Send {
        let r = self.apply(command);
        async move { r }
    }
}
