//! The parks and pins the site has put on this instance's router, kept by
//! worker name: set one by one by this instance's engine (its
//! [`ProxyActuator`](super::park::ProxyActuator)), or replaced as a whole by
//! the engine of another instance (`POST /api/v1/site/parks`, sent by
//! [`super::peers`]). A miner is parked wherever it connects: at the active
//! instance, and at every peer the active one reaches.
//!
//! One map serves both roles because the role moves with the site lease: a
//! standby's map is what the active instance last pushed; when it takes
//! over, its engine's state recovered from the ledger replaces the map
//! (releasing what the ledger no longer has parked); when it loses the
//! lease, the next push from the new holder replaces its engine's parks.
//! Parks an operator made by hand (`POST /api/v1/curtail`) are not in the
//! map and are left alone.
//!
//! Fencing: a push carries the sender's lease token; this instance refuses
//! one older than the newest it has seen (its own included), so a holder
//! paused past its lease cannot undo its successor's parks.

use std::collections::BTreeMap;
use std::sync::Mutex;

use gridproxy_proxy::router::Router;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

/// Most entries in one push (a site's inventory; a push is bounded).
pub const MAX_ENTRIES: usize = 100_000;
/// Longest worker or pool name in a push.
pub const MAX_NAME: usize = 256;
/// Largest body of `POST /api/v1/site/parks`.
pub const MAX_BODY: usize = 8 * 1024 * 1024;

/// What the site wants of one worker at every instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParkEntry {
    /// Worker name, as miners authorize.
    pub worker: String,
    /// No job for it.
    #[serde(default)]
    pub parked: bool,
    /// Pinned to this pool (by name: indices differ between configs).
    #[serde(default)]
    pub pool: Option<String>,
}

/// Body of `POST /api/v1/site/parks`: the whole set (what is not in it is
/// released).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParkSync {
    /// The sending instance.
    pub from: String,
    /// Its site lease token (`[site.lease]`), if any.
    #[serde(default)]
    pub fence: Option<u64>,
    /// Every park and pin in force.
    pub parks: Vec<ParkEntry>,
}

/// The answer: what was applied, and which workers this instance holds
/// (connected now), so the active instance knows where each miner is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncReply {
    /// Entries in force here now.
    pub applied: usize,
    /// Pins to a pool this instance does not have (the park part applies).
    pub unknown_pools: usize,
    /// Workers connected here.
    pub workers: Vec<String>,
}

/// Why a push was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SyncError {
    /// Older than a lease token seen already.
    #[error("fenced: token {got} is older than token {seen} seen here")]
    Fenced {
        /// The push's token.
        got: u64,
        /// The newest seen here.
        seen: u64,
    },
    /// Over a bound, or a name empty or too long.
    #[error("{0}")]
    Invalid(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct Ctl {
    parked: bool,
    pool: Option<usize>,
}

#[derive(Debug, Default)]
struct Inner {
    /// Worker -> (what is in force, the pool's name for pushes).
    owned: BTreeMap<String, (Ctl, Option<String>)>,
    max_fence: u64,
}

/// The site's parks and pins on this router (see the module docs).
#[derive(Debug)]
pub struct SiteParks {
    inner: Mutex<Inner>,
    changed: watch::Sender<u64>,
}

impl Default for SiteParks {
    fn default() -> Self {
        SiteParks {
            inner: Mutex::new(Inner::default()),
            changed: watch::channel(0).0,
        }
    }
}

fn pool_index(router: &Router, name: &str) -> Option<usize> {
    router
        .pools()
        .iter()
        .position(|p| p.stats.name == name && !router.is_retired(p.index))
}

impl SiteParks {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // Every mutation leaves the map whole: a poisoned one is still valid.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Ticks on every change (what a peer push waits on).
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Park or unpark `worker` (this instance's engine).
    pub fn park(&self, router: &Router, worker: &str, parked: bool) {
        self.update(router, worker, |c, _| c.parked = parked);
    }

    /// Pin `worker` to pool `index` (this instance's engine).
    pub fn pin(&self, router: &Router, worker: &str, index: usize) {
        let name = router.pools().get(index).map(|p| p.stats.name.clone());
        self.update(router, worker, |c, n| {
            c.pool = Some(index);
            *n = name.clone();
        });
    }

    fn update(&self, router: &Router, worker: &str, f: impl Fn(&mut Ctl, &mut Option<String>)) {
        {
            let mut g = self.lock();
            let (mut c, mut name) = g.owned.get(worker).cloned().unwrap_or_default();
            let was = c;
            f(&mut c, &mut name);
            apply(router, worker, was, c);
            if c == Ctl::default() {
                g.owned.remove(worker);
            } else {
                g.owned.insert(worker.to_owned(), (c, name));
            }
        }
        self.changed.send_modify(|n| *n += 1);
    }

    /// Whether the site has `worker` parked here.
    pub fn is_parked(&self, worker: &str) -> bool {
        self.lock().owned.get(worker).is_some_and(|(c, _)| c.parked)
    }

    /// Everything in force, for a push.
    pub fn snapshot(&self) -> Vec<ParkEntry> {
        self.lock()
            .owned
            .iter()
            .map(|(w, (c, name))| ParkEntry {
                worker: w.clone(),
                parked: c.parked,
                pool: c.pool.and(name.clone()),
            })
            .collect()
    }

    /// Entries in force.
    pub fn len(&self) -> usize {
        self.lock().owned.len()
    }

    /// Whether none is in force.
    pub fn is_empty(&self) -> bool {
        self.lock().owned.is_empty()
    }

    /// A lease token this instance holds or saw: older pushes are refused.
    pub fn observe_fence(&self, token: u64) {
        let mut g = self.lock();
        g.max_fence = g.max_fence.max(token);
    }

    /// Replace the whole set with a peer's push: what it does not list is
    /// released here. Returns how many are in force and how many pins name
    /// a pool this instance does not have.
    pub fn receive(&self, router: &Router, sync: &ParkSync) -> Result<(usize, usize), SyncError> {
        if sync.parks.len() > MAX_ENTRIES {
            return Err(SyncError::Invalid(format!(
                "parks: at most {MAX_ENTRIES} entries"
            )));
        }
        let bad = |s: &str| s.is_empty() || s.len() > MAX_NAME;
        if let Some(e) = sync
            .parks
            .iter()
            .find(|e| bad(&e.worker) || e.pool.as_deref().is_some_and(bad))
        {
            return Err(SyncError::Invalid(format!(
                "parks: worker and pool names are 1..={MAX_NAME} bytes ({:?})",
                e.worker.chars().take(40).collect::<String>()
            )));
        }
        {
            let g = self.lock();
            // Once a lease token is known here, a push without one (an
            // instance with no [site.lease]) is as stale as an older one.
            let t = sync.fence.unwrap_or(0);
            if t < g.max_fence {
                return Err(SyncError::Fenced {
                    got: t,
                    seen: g.max_fence,
                });
            }
        }
        let mut unknown = 0;
        let entries: Vec<(String, Ctl, Option<String>)> = sync
            .parks
            .iter()
            .map(|e| {
                let pool = e.pool.as_deref().and_then(|n| pool_index(router, n));
                if e.pool.is_some() && pool.is_none() {
                    unknown += 1;
                }
                let ctl = Ctl {
                    parked: e.parked,
                    pool,
                };
                (e.worker.clone(), ctl, e.pool.clone())
            })
            .collect();
        if let Some(t) = sync.fence {
            self.observe_fence(t);
        }
        Ok((self.replace(router, entries), unknown))
    }

    /// Replace the whole set with what this instance's engine recovered
    /// from the ledger (`parked` workers), when it starts: parks a previous
    /// holder pushed that the ledger no longer has are released.
    pub fn adopt(&self, router: &Router, parked: impl IntoIterator<Item = String>) -> usize {
        let entries = parked
            .into_iter()
            .map(|w| {
                (
                    w,
                    Ctl {
                        parked: true,
                        pool: None,
                    },
                    None,
                )
            })
            .collect();
        self.replace(router, entries)
    }

    fn replace(&self, router: &Router, entries: Vec<(String, Ctl, Option<String>)>) -> usize {
        {
            let mut g = self.lock();
            let mut next = BTreeMap::new();
            for (w, c, name) in entries {
                if c != Ctl::default() {
                    next.insert(w, (c, name));
                }
            }
            // Only what differs, in one router call (one walk of its
            // miners for the whole set, not one per worker).
            let released = g
                .owned
                .iter()
                .filter(|(w, _)| !next.contains_key(*w))
                .map(|(w, _)| (w.clone(), Ctl::default()));
            let changed = next
                .iter()
                .filter(|(w, (c, _))| g.owned.get(*w).map(|(was, _)| was) != Some(c))
                .map(|(w, (c, _))| (w.clone(), *c));
            let batch: Vec<(String, bool, Option<usize>)> = released
                .chain(changed)
                .map(|(w, c)| (w, c.parked, c.pool))
                .collect();
            router.set_controls(batch);
            g.owned = next;
        }
        self.changed.send_modify(|n| *n += 1);
        self.len()
    }
}

/// Put `now` in force for `worker`, touching the router only where it
/// differs from `was` (each router call re-walks its miners).
fn apply(router: &Router, worker: &str, was: Ctl, now: Ctl) {
    if was.parked != now.parked {
        router.park_worker(worker, now.parked);
    }
    if was.pool != now.pool {
        router.pin_worker(worker, now.pool);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::site::park::tests::test_router;

    fn entry(w: &str, parked: bool, pool: Option<&str>) -> ParkEntry {
        ParkEntry {
            worker: w.into(),
            parked,
            pool: pool.map(str::to_owned),
        }
    }

    fn push(fence: Option<u64>, parks: Vec<ParkEntry>) -> ParkSync {
        ParkSync {
            from: "a".into(),
            fence,
            parks,
        }
    }

    /// A push replaces the whole set: what it no longer lists is released,
    /// pins go by pool name, parks made by hand are left alone.
    #[test]
    fn a_push_replaces_the_set_and_pins_by_pool_name() {
        let router = test_router();
        let parks = SiteParks::default();
        router.park_worker("by.hand", true);
        let (n, unknown) = parks
            .receive(
                &router,
                &push(
                    Some(1),
                    vec![
                        entry("w.1", true, None),
                        entry("w.2", false, Some("b")),
                        entry("w.3", true, Some("nope")),
                    ],
                ),
            )
            .unwrap();
        assert_eq!((n, unknown), (3, 1));
        assert!(router.is_parked("w.1") && router.is_parked("w.3"));
        assert_eq!(router.pin_of("w.2"), Some(1));
        assert_eq!(router.pin_of("w.3"), None);
        // The next push has w.1 unparked and w.2 unpinned (both left out).
        let (n, _) = parks
            .receive(&router, &push(Some(1), vec![entry("w.3", true, None)]))
            .unwrap();
        assert_eq!(n, 1);
        assert!(!router.is_parked("w.1") && router.pin_of("w.2").is_none());
        assert!(router.is_parked("w.3") && router.is_parked("by.hand"));
        assert_eq!(parks.snapshot(), vec![entry("w.3", true, None)]);
    }

    /// A push older than a lease token seen here (pushed, or held by this
    /// instance) is refused and changes nothing.
    #[test]
    fn an_older_token_is_fenced_off() {
        let router = test_router();
        let parks = SiteParks::default();
        parks
            .receive(&router, &push(Some(5), vec![entry("w.1", true, None)]))
            .unwrap();
        let e = parks.receive(&router, &push(Some(4), vec![])).unwrap_err();
        assert_eq!(e, SyncError::Fenced { got: 4, seen: 5 });
        assert!(router.is_parked("w.1"));
        parks.observe_fence(9);
        assert!(parks.receive(&router, &push(Some(8), vec![])).is_err());
        assert!(parks.receive(&router, &push(None, vec![])).is_err());
        assert!(parks.receive(&router, &push(Some(9), vec![])).is_ok());
        assert!(!router.is_parked("w.1"));
    }

    #[test]
    fn a_push_is_bounded() {
        let router = test_router();
        let parks = SiteParks::default();
        let many = (0..=MAX_ENTRIES)
            .map(|i| entry(&format!("w.{i}"), true, None))
            .collect();
        assert!(matches!(
            parks.receive(&router, &push(None, many)),
            Err(SyncError::Invalid(_))
        ));
        let long = "x".repeat(MAX_NAME + 1);
        for e in [
            entry(&long, true, None),
            entry("", true, None),
            entry("w", true, Some(&long)),
        ] {
            assert!(matches!(
                parks.receive(&router, &push(None, vec![e])),
                Err(SyncError::Invalid(_))
            ));
        }
        assert_eq!(router.controlled_workers(), 0, "nothing applied");
    }

    /// Taking over: the engine's state from the ledger replaces what the
    /// previous holder pushed; its own commands are pushed on.
    #[test]
    fn the_new_holder_adopts_the_ledger_and_pushes_its_commands() {
        let router = test_router();
        let parks = SiteParks::default();
        let changes = parks.subscribe();
        parks
            .receive(
                &router,
                &push(
                    Some(1),
                    vec![entry("w.1", true, None), entry("w.2", true, Some("b"))],
                ),
            )
            .unwrap();
        // The ledger has w.1 and w.4 parked (w.2's unpark went unpushed).
        assert_eq!(
            parks.adopt(&router, ["w.1".to_owned(), "w.4".to_owned()]),
            2
        );
        assert!(router.is_parked("w.1") && router.is_parked("w.4"));
        assert!(!router.is_parked("w.2") && router.pin_of("w.2").is_none());
        parks.pin(&router, "w.5", 1);
        parks.park(&router, "w.1", false);
        assert!(changes.has_changed().unwrap());
        assert_eq!(
            parks.snapshot(),
            vec![entry("w.4", true, None), entry("w.5", false, Some("b"))]
        );
        assert_eq!(router.pin_of("w.5"), Some(1));
        assert!(!router.is_parked("w.1"));
    }
}
