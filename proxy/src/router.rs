//! Routing: which pool each miner hashes for.
//!
//! Every miner has a *home* pool (chosen by weighted split among the pools of
//! the best priority), an optional pin (runtime "move to pool"), and a parked
//! flag (runtime "hold the connection, give no work"). Its *assignment* is the
//! home/pin when that pool is usable, else the best live pool by priority
//! (failover). A pool that failed is usable as a home again only after it has
//! stayed up for the fail-back cooldown. Assignments reach sessions through a
//! `watch` per miner, so a change is a pointer swap, not a reconnect.
//!
//! The router's map is locked on connect, disconnect and re-evaluation only,
//! never on the share path.

use crate::config::{Config, RoutingConfig};
use crate::upstream::PoolHandle;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::info;

/// Where a miner should hash now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Assignment {
    /// Pool index, or None (parked, or no pool is up).
    pub pool: Option<usize>,
    /// Parked by control (not merely without a pool).
    pub parked: bool,
}

/// A miner's registration; dropping it unregisters the miner.
pub struct Lease {
    router: Arc<Router>,
    /// Router-local miner id.
    pub id: u64,
    /// Assignment updates.
    pub assignment: watch::Receiver<Assignment>,
    /// Measured hashrate (f64 bits), written by the session.
    pub hashrate: Arc<AtomicU64>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.router.unregister(self.id);
    }
}

struct Entry {
    tx: watch::Sender<Assignment>,
    worker: String,
    home: usize,
    pinned: Option<usize>,
    parked: bool,
    hashrate: Arc<AtomicU64>,
}

#[derive(Clone, Copy)]
struct Health {
    live: bool,
    live_since: Option<Instant>,
    has_failed: bool,
}

struct State {
    miners: HashMap<u64, Entry>,
    next_id: u64,
    health: Vec<Health>,
}

/// Per-pool summary for status output.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PoolShare {
    /// Pool index.
    pub pool: usize,
    /// Miners assigned now.
    pub miners: usize,
    /// Their measured hashrate (H/s).
    pub hashrate: f64,
    /// Pool is live.
    pub live: bool,
}

/// The routing table.
pub struct Router {
    order: Vec<usize>,
    priority: Vec<u32>,
    weight: Vec<f64>,
    cfg: RoutingConfig,
    pools: Vec<PoolHandle>,
    state: Mutex<State>,
}

fn hr(a: &AtomicU64) -> f64 {
    f64::from_bits(a.load(Relaxed))
}

impl Router {
    /// A router over running pools.
    pub fn new(cfg: &Config, pools: Vec<PoolHandle>) -> Arc<Self> {
        let n = cfg.pools.len();
        Arc::new(Self {
            order: cfg.pool_order(),
            priority: cfg.pools.iter().map(|p| p.priority).collect(),
            weight: cfg.pools.iter().map(|p| p.weight).collect(),
            cfg: cfg.routing.clone(),
            pools,
            state: Mutex::new(State {
                miners: HashMap::new(),
                next_id: 1,
                health: vec![
                    Health {
                        live: false,
                        live_since: None,
                        has_failed: false
                    };
                    n
                ],
            }),
        })
    }

    /// The pool handles, by config index.
    pub fn pools(&self) -> &[PoolHandle] {
        &self.pools
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn split_group(&self) -> Vec<usize> {
        let best = self.order.first().map(|&i| self.priority[i]).unwrap_or(0);
        self.order
            .iter()
            .copied()
            .filter(|&i| self.priority[i] == best)
            .collect()
    }

    /// Pool totals of measured hashrate by home, within the split group.
    fn home_totals(&self, st: &State, group: &[usize]) -> (HashMap<usize, f64>, f64) {
        let known: Vec<f64> = st
            .miners
            .values()
            .map(|e| hr(&e.hashrate))
            .filter(|h| *h > 0.0)
            .collect();
        let avg = if known.is_empty() {
            1.0
        } else {
            known.iter().sum::<f64>() / known.len() as f64
        };
        let mut totals: HashMap<usize, f64> = group.iter().map(|&p| (p, 0.0)).collect();
        for e in st.miners.values() {
            if let Some(t) = totals.get_mut(&e.home) {
                let h = hr(&e.hashrate);
                *t += if h > 0.0 { h } else { avg };
            }
        }
        (totals, avg)
    }

    /// Register a miner of `worker` name; picks its home pool by weighted deficit.
    pub fn register(self: &Arc<Self>, worker: &str) -> Lease {
        let group = self.split_group();
        let mut st = self.lock();
        let (totals, avg) = self.home_totals(&st, &group);
        let sum: f64 = totals.values().sum::<f64>() + avg;
        let wsum: f64 = group.iter().map(|&p| self.weight[p]).sum();
        let home = group
            .iter()
            .copied()
            .max_by(|&a, &b| {
                let da = self.weight[a] / wsum * sum - totals[&a];
                let db = self.weight[b] / wsum * sum - totals[&b];
                da.partial_cmp(&db).unwrap_or(std::cmp::Ordering::Equal)
            })
            .unwrap_or(0);
        let id = st.next_id;
        st.next_id += 1;
        let hashrate = Arc::new(AtomicU64::new(0f64.to_bits()));
        let mut entry = Entry {
            tx: watch::channel(Assignment {
                pool: None,
                parked: false,
            })
            .0,
            worker: worker.to_string(),
            home,
            pinned: None,
            parked: false,
            hashrate: hashrate.clone(),
        };
        let a = self.effective(&st, &entry);
        let (tx, rx) = watch::channel(a);
        entry.tx = tx;
        st.miners.insert(id, entry);
        Lease {
            router: self.clone(),
            id,
            assignment: rx,
            hashrate,
        }
    }

    fn unregister(&self, id: u64) {
        self.lock().miners.remove(&id);
    }

    fn usable_home(&self, h: &Health, now: Instant) -> bool {
        h.live
            && (!h.has_failed
                || h.live_since.is_some_and(|t| {
                    now.duration_since(t) >= Duration::from_secs(self.cfg.failback_cooldown_secs)
                }))
    }

    fn effective(&self, st: &State, e: &Entry) -> Assignment {
        if e.parked {
            return Assignment {
                pool: None,
                parked: true,
            };
        }
        let now = Instant::now();
        let want = e.pinned.unwrap_or(e.home);
        if self.usable_home(&st.health[want], now) {
            return Assignment {
                pool: Some(want),
                parked: false,
            };
        }
        // Failover: stay on a live pool of the same standing if the miner is already there,
        // else the best live pool by priority.
        let current = e.tx.borrow().pool;
        if let Some(c) = current {
            if st.health[c].live
                && c != want
                && self.priority[c] <= self.best_live_priority(st).unwrap_or(u32::MAX)
            {
                return Assignment {
                    pool: Some(c),
                    parked: false,
                };
            }
        }
        let pool = self.order.iter().copied().find(|&p| st.health[p].live);
        Assignment {
            pool,
            parked: false,
        }
    }

    fn best_live_priority(&self, st: &State) -> Option<u32> {
        self.order
            .iter()
            .find(|&&p| st.health[p].live)
            .map(|&p| self.priority[p])
    }

    /// Recompute every miner's assignment; send the ones that changed.
    pub fn reevaluate(&self) -> usize {
        let mut st = self.lock();
        let now = Instant::now();
        for (i, p) in self.pools.iter().enumerate() {
            let live = p.view.borrow().live;
            let h = &mut st.health[i];
            if live && !h.live {
                h.live_since = Some(now);
            }
            if !live && h.live {
                h.has_failed = true;
                h.live_since = None;
            }
            h.live = live;
        }
        let mut changed = 0;
        for e in st.miners.values() {
            let a = self.effective(&st, e);
            if *e.tx.borrow() != a {
                e.tx.send_replace(a);
                changed += 1;
            }
        }
        changed
    }

    /// Move miners between homes so measured hashrate follows the weights.
    pub fn rebalance(&self) -> usize {
        let group = self.split_group();
        if group.len() < 2 {
            return 0;
        }
        let mut moved = 0;
        let mut st = self.lock();
        let wsum: f64 = group.iter().map(|&p| self.weight[p]).sum();
        for _ in 0..st.miners.len() {
            let (totals, avg) = self.home_totals(&st, &group);
            let sum: f64 = totals.values().sum();
            let dev = |p: usize| totals[&p] - self.weight[p] / wsum * sum;
            let over = group
                .iter()
                .copied()
                .max_by(|&a, &b| dev(a).total_cmp(&dev(b)))
                .unwrap_or(group[0]);
            let under = group
                .iter()
                .copied()
                .min_by(|&a, &b| dev(a).total_cmp(&dev(b)))
                .unwrap_or(group[0]);
            let gap = dev(over).min(-dev(under));
            // Move the unpinned miner from `over` whose hashrate best fits the gap.
            let pick = st
                .miners
                .iter()
                .filter(|(_, e)| e.home == over && e.pinned.is_none())
                .map(|(id, e)| {
                    (*id, {
                        let h = hr(&e.hashrate);
                        if h > 0.0 {
                            h
                        } else {
                            avg
                        }
                    })
                })
                .filter(|(_, h)| *h <= 2.0 * gap)
                .min_by(|a, b| (a.1 - gap).abs().total_cmp(&(b.1 - gap).abs()));
            match pick {
                Some((id, _)) => {
                    if let Some(e) = st.miners.get_mut(&id) {
                        e.home = under;
                    }
                    moved += 1;
                }
                None => break,
            }
        }
        drop(st);
        if moved > 0 {
            self.reevaluate();
        }
        moved
    }

    /// Park the miners whose worker name matches; returns how many.
    pub fn park(&self, matches: impl Fn(&str) -> bool) -> usize {
        self.update(matches, |e| e.parked = true)
    }

    /// Unpark the miners whose worker name matches.
    pub fn unpark(&self, matches: impl Fn(&str) -> bool) -> usize {
        self.update(matches, |e| e.parked = false)
    }

    /// Pin matching miners to `pool` (None: back to their home).
    pub fn move_to(&self, matches: impl Fn(&str) -> bool, pool: Option<usize>) -> usize {
        self.update(matches, |e| e.pinned = pool)
    }

    fn update(&self, matches: impl Fn(&str) -> bool, f: impl Fn(&mut Entry)) -> usize {
        let mut n = 0;
        {
            let mut st = self.lock();
            for e in st.miners.values_mut() {
                if matches(&e.worker) {
                    f(e);
                    n += 1;
                }
            }
        }
        self.reevaluate();
        n
    }

    /// Miners and hashrate per pool (by current assignment).
    pub fn shares(&self) -> Vec<PoolShare> {
        let st = self.lock();
        let mut v: Vec<PoolShare> = (0..self.pools.len())
            .map(|p| PoolShare {
                pool: p,
                miners: 0,
                hashrate: 0.0,
                live: st.health[p].live,
            })
            .collect();
        for e in st.miners.values() {
            if let Some(p) = e.tx.borrow().pool {
                v[p].miners += 1;
                v[p].hashrate += hr(&e.hashrate);
            }
        }
        v
    }

    /// Watch pool views and re-evaluate on every change; tick for cooldowns
    /// and rebalancing.
    pub fn spawn_monitor(self: &Arc<Self>, shutdown: CancellationToken) {
        for (index, p) in self.pools.iter().enumerate() {
            let (router, mut rx, stop) = (self.clone(), p.view.clone(), shutdown.clone());
            tokio::spawn(async move {
                let mut was_live = rx.borrow().live;
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        r = rx.changed() => if r.is_err() { return },
                    }
                    let live = rx.borrow_and_update().live;
                    if live != was_live {
                        was_live = live;
                        let n = router.reevaluate();
                        info!(pool = index, live, moved = n, "pool state changed");
                    }
                }
            });
        }
        let router = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(250));
            let every = Duration::from_secs(router.cfg.rebalance_secs.max(1));
            let mut last = Instant::now();
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tick.tick() => {}
                }
                router.reevaluate();
                if last.elapsed() >= every {
                    last = Instant::now();
                    router.rebalance();
                }
            }
        });
    }
}
