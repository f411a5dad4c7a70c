//! The curtailment engine's hand on the proxy: an
//! [`Actuator`](curtail::actuator::Actuator) for proxy-side actions
//! (park, unpark, reroute) over the [`Router`], keyed by worker name.
//!
//! Withholding work does not cut an ASIC's power (it fails over to a backup
//! pool and keeps hashing), so the engine parks only miners whose firmware
//! could not be commanded, and reroutes for pool moves; see ARCHITECTURE.md.
//!
//! The router keeps park and pin per worker name, connected or not, so a
//! miner parked while away, or one that reconnects, gets no job until it is
//! unparked: nothing here re-applies them. After a restart the engine
//! resumes parked miners from the ledger without re-sending the park;
//! [`restore`](ProxyActuator::restore) parks them again in the new router.
//! Parks and pins go through the instance's [`SiteParks`], from where
//! [`super::peers`] pushes them to the other instances (`[[site.peers]]`).
//!
//! The `gridproxy-curtail` crate is re-exported as [`curtail`], so users of
//! the daemon crate reach the engine, driver and firmware clients through
//! it.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};

use gridproxy_curtail as curtail;

use curtail::actuator::{Actuator, ActuatorError};
use curtail::command::{Action, Command};
use curtail::fleet::{ControlSurface, MinerId};
use curtail::policy::Resume;
use gridproxy_proxy::router::Router;

use super::parks::SiteParks;

#[derive(Debug, Default)]
struct Inner {
    workers: HashMap<MinerId, String>,
}

/// Park, unpark and reroute through the proxy's router.
///
/// Cheap to clone (shared state). Its std mutex is never held across an
/// `.await` nor while calling the router.
#[derive(Clone)]
pub struct ProxyActuator {
    router: Arc<Router>,
    parks: Arc<SiteParks>,
    inner: Arc<Mutex<Inner>>,
}

impl std::fmt::Debug for ProxyActuator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let inner = self.lock();
        f.debug_struct("ProxyActuator")
            .field("workers", &inner.workers.len())
            .finish()
    }
}

impl ProxyActuator {
    /// An actuator over `router` with no miners mapped yet, keeping what
    /// it parks and pins in `parks`.
    pub fn new(router: Arc<Router>, parks: Arc<SiteParks>) -> ProxyActuator {
        ProxyActuator {
            router,
            parks,
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

    /// Whether `worker` is parked at the router.
    pub fn is_parked(&self, worker: &str) -> bool {
        self.router.is_parked(worker)
    }

    /// Park again the miners whose last command in the ledger parked them
    /// (what the engine resumes as parked without re-sending the park,
    /// while a new router starts with none), and release what another
    /// instance's engine had parked here that the ledger no longer has.
    /// Call before the driver starts. Returns how many are parked.
    pub fn restore(&self, resume: &Resume) -> usize {
        let parked = resume
            .curtailed
            .iter()
            .filter(|(_, action, _)| *action == Action::Park)
            .filter_map(|(id, _, _)| self.worker(*id));
        self.parks.adopt(&self.router, parked)
    }

    fn apply(&self, command: &Command) -> Result<(), ActuatorError> {
        let miner = command.miner;
        let worker = self
            .worker(miner)
            .ok_or(ActuatorError::UnknownMiner(miner))?;
        match command.action {
            Action::Park => self.parks.park(&self.router, &worker, true),
            Action::Unpark => self.parks.park(&self.router, &worker, false),
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
                self.parks.pin(&self.router, &worker, p);
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
    /// now is accepted too: the router applies it when it connects.
    fn execute(&self, command: &Command) -> impl Future<Output = Result<(), ActuatorError>> + Send {
        let r = self.apply(command);
        async move { r }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use curtail::command::{CommandId, PoolId};
    use curtail::time::Timestamp;
    use gridproxy_proxy::ProxyConfig;

    /// A router over pools `a` and `b` that never come up (park and pin
    /// need no live pool).
    pub(crate) fn test_router() -> Arc<Router> {
        let cfg = ProxyConfig::from_toml(
            "[[pools]]\nname='a'\naddress='127.0.0.1:1'\nprotocol='sv1'\nuser='u'\n\
             [[pools]]\nname='b'\naddress='127.0.0.1:2'\nprotocol='sv1'\nuser='u'\n",
        )
        .unwrap();
        let pools = (0..2)
            .map(|index| gridproxy_proxy::upstream::PoolHandle {
                index,
                stats: Arc::new(gridproxy_proxy::stats::PoolStats::new(["a", "b"][index])),
                view: tokio::sync::watch::channel(gridproxy_proxy::upstream::PoolView {
                    live: false,
                    epoch: 0,
                    job: None,
                    target: gridproxy_protocol::difficulty::Target::MAX,
                    rollable: 4,
                    submit: tokio::sync::mpsc::channel(1).0,
                    published: std::time::Instant::now(),
                })
                .1,
            })
            .collect();
        Router::new(&cfg, pools)
    }

    fn command(miner: u64, action: Action) -> Command {
        Command {
            id: CommandId(1),
            miner: MinerId(miner),
            surface: ControlSurface::None,
            action,
            issued_at: Timestamp::ZERO,
            curtail: true,
        }
    }

    /// Parks and pins go to the router by worker name, for miners that are
    /// not connected too; a restart parks again the miners the ledger left
    /// parked.
    #[tokio::test]
    async fn parks_by_worker_name_and_restores_after_a_restart() {
        let router = test_router();
        let p = ProxyActuator::new(router.clone(), Arc::default());
        p.insert(MinerId(1), "acct.s9-1");
        p.insert(MinerId(2), "acct.s9-2");
        p.execute(&command(1, Action::Park)).await.unwrap();
        p.execute(&command(2, Action::Reroute(PoolId(1))))
            .await
            .unwrap();
        assert!(p.is_parked("acct.s9-1") && !p.is_parked("acct.s9-2"));
        assert_eq!(router.pin_of("acct.s9-2"), Some(1));
        assert!(router.register("acct.s9-1").cell.assignment().parked);
        assert!(p
            .execute(&command(2, Action::Reroute(PoolId(7))))
            .await
            .is_err());
        assert!(p.execute(&command(9, Action::Park)).await.is_err());

        // A new process: a new router, the ledger's last commands.
        let router = test_router();
        let p = ProxyActuator::new(router.clone(), Arc::default());
        p.insert(MinerId(1), "acct.s9-1");
        p.insert(MinerId(2), "acct.s9-2");
        let resume = Resume {
            next_command_id: 3,
            curtailed: vec![
                (MinerId(1), Action::Park, Timestamp::ZERO),
                (MinerId(2), Action::Sleep, Timestamp::ZERO),
            ],
            events: vec![],
        };
        assert_eq!(p.restore(&resume), 1);
        assert!(router.register("acct.s9-1").cell.assignment().parked);
        assert!(!p.is_parked("acct.s9-2"));
        p.execute(&command(1, Action::Unpark)).await.unwrap();
        assert!(!p.is_parked("acct.s9-1"));
        assert_eq!(router.controlled_workers(), 0);
    }
}
