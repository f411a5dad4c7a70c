//! Routing: which pool each miner hashes for.
//!
//! Every miner has a *home* pool (chosen by weighted split among the pools of
//! the best priority), an optional pin (runtime "move to pool"), and a parked
//! flag (runtime "hold the connection, give no work"). Pins and parks belong
//! to the worker name, not the connection: the router keeps them per name
//! while they are set, so a miner that reconnects is parked (or pinned) from
//! its first job on. Only the control plane sets them, and a name with neither
//! is not kept, so a peer connecting under many names grows nothing here.
//! Its *assignment* is the
//! home/pin when that pool is usable, else the best live pool by priority
//! (failover). A pool that failed is usable as a home again only after it has
//! stayed up for the fail-back cooldown. Assignments reach sessions through a
//! small cell per miner (an atomic word and a `Notify`), so a change is a store
//! and a wake-up, not a reconnect. A `watch` per miner did the same in 344
//! bytes; at 19k miners per process every byte per miner counts.
//!
//! The router's map is locked on connect, disconnect and re-evaluation only,
//! never on the share path.

use crate::config::{PoolConfig, ProxyConfig, RoutingConfig};
use crate::stats::PoolStats;
use crate::upstream::PoolHandle;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::info;

/// Where a miner should hash now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Assignment {
    /// Pool index, or None (parked, or no pool is up).
    pub pool: Option<usize>,
    /// Parked by control (not merely without a pool).
    pub parked: bool,
}

impl Assignment {
    const NONE: u64 = u64::MAX >> 1;
    const PARKED: u64 = 1 << 63;

    fn pack(self) -> u64 {
        let pool = self.pool.map_or(Self::NONE, |p| p as u64);
        pool | if self.parked { Self::PARKED } else { 0 }
    }

    fn unpack(w: u64) -> Self {
        let pool = w & !Self::PARKED;
        Self {
            pool: (pool != Self::NONE).then_some(pool as usize),
            parked: w & Self::PARKED != 0,
        }
    }
}

/// What the router and one session share: the assignment (packed), a
/// wake-up for the session when it changes, and the measured hashrate.
pub struct MinerCell {
    assignment: AtomicU64,
    changed: Notify,
    /// Measured hashrate (f64 bits), written by the session.
    pub hashrate: AtomicU64,
}

impl MinerCell {
    fn new(a: Assignment) -> Self {
        Self {
            assignment: AtomicU64::new(a.pack()),
            changed: Notify::new(),
            hashrate: AtomicU64::new(0f64.to_bits()),
        }
    }

    /// The assignment now.
    pub fn assignment(&self) -> Assignment {
        Assignment::unpack(self.assignment.load(Relaxed))
    }

    /// Store `a` and wake the session if it differs; true if it did.
    fn set(&self, a: Assignment) -> bool {
        if self.assignment.swap(a.pack(), Relaxed) == a.pack() {
            return false;
        }
        // notify_one keeps a permit when the session is not waiting: no change is missed.
        self.changed.notify_one();
        true
    }

    /// Resolves once the assignment may have changed since the last call
    /// (compare [`Self::assignment`] with what you acted on). Cancel-safe.
    pub async fn changed(&self) {
        self.changed.notified().await
    }
}

/// A miner's registration; dropping it unregisters the miner.
pub struct Lease {
    router: Arc<Router>,
    /// Router-local miner id.
    pub id: u64,
    /// Assignment and hashrate, shared with the router.
    pub cell: Arc<MinerCell>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.router.unregister(self.id);
    }
}

struct Entry {
    cell: Arc<MinerCell>,
    worker: String,
    home: usize,
    /// Copies of the worker's [`Control`], kept in step by the router.
    pinned: Option<usize>,
    parked: bool,
}

/// What the control plane set for one worker name.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Control {
    parked: bool,
    pinned: Option<usize>,
}

impl Control {
    fn is_set(self) -> bool {
        self != Control::default()
    }
}

#[derive(Clone, Copy)]
struct Health {
    live: bool,
    live_since: Option<Instant>,
    has_failed: bool,
}

/// One pool slot. Slots are never reused: a pool removed by a reload is
/// retired (its task stopped, never live again) so indices stay stable.
struct Slot {
    config: PoolConfig,
    retired: bool,
    stop: Option<CancellationToken>,
}

struct State {
    miners: HashMap<u64, Entry>,
    /// Park and pin by worker name, connected or not; only names with one set.
    controls: HashMap<String, Control>,
    next_id: u64,
    health: Vec<Health>,
    slots: Vec<Slot>,
    /// Active slots by priority (then config order).
    order: Vec<usize>,
    cfg: RoutingConfig,
    /// When the miners were last walked (see [`Router::tick`]).
    walked_at: Instant,
}

/// See [`Router::standing`].
struct Standing {
    now: Instant,
    best: Option<usize>,
}

impl State {
    fn priority(&self, p: usize) -> u32 {
        self.slots[p].config.priority
    }

    fn weight(&self, p: usize) -> f64 {
        self.slots[p].config.weight
    }

    fn reorder(&mut self) {
        let mut order: Vec<usize> = (0..self.slots.len())
            .filter(|&i| !self.slots[i].retired)
            .collect();
        order.sort_by_key(|&i| self.slots[i].config.priority);
        self.order = order;
    }

    /// The pools of the best priority: the weighted split shares miners among them.
    fn split_group(&self) -> Vec<usize> {
        let best = self.order.first().map(|&i| self.priority(i)).unwrap_or(0);
        self.order
            .iter()
            .copied()
            .filter(|&i| self.priority(i) == best)
            .collect()
    }

    /// Pool totals of measured hashrate by home, within the split group.
    fn home_totals(&self, group: &[usize]) -> (HashMap<usize, f64>, f64) {
        let known: Vec<f64> = self
            .miners
            .values()
            .map(|e| hr(&e.cell.hashrate))
            .filter(|h| *h > 0.0)
            .collect();
        let avg = if known.is_empty() {
            1.0
        } else {
            known.iter().sum::<f64>() / known.len() as f64
        };
        let mut totals: HashMap<usize, f64> = group.iter().map(|&p| (p, 0.0)).collect();
        for e in self.miners.values() {
            if let Some(t) = totals.get_mut(&e.home) {
                let h = hr(&e.cell.hashrate);
                *t += if h > 0.0 { h } else { avg };
            }
        }
        (totals, avg)
    }

    /// The split-group pool furthest below its weighted share: a new home.
    fn pick_home(&self) -> usize {
        let group = self.split_group();
        let (totals, avg) = self.home_totals(&group);
        let sum: f64 = totals.values().sum::<f64>() + avg;
        let wsum: f64 = group.iter().map(|&p| self.weight(p)).sum();
        group
            .iter()
            .copied()
            .max_by(|&a, &b| {
                let da = self.weight(a) / wsum * sum - totals[&a];
                let db = self.weight(b) / wsum * sum - totals[&b];
                da.partial_cmp(&db).unwrap_or(std::cmp::Ordering::Equal)
            })
            .unwrap_or(0)
    }
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
    /// Removed by a reload (kept so indices stay stable).
    pub retired: bool,
}

/// What a [`Router::reconfigure`] changed, by pool name.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Reconfigured {
    /// New pools (upstream started).
    pub added: Vec<String>,
    /// Pools gone from the config (upstream stopped).
    pub removed: Vec<String>,
    /// Pools whose address, protocol, key, credentials or line limit changed (new upstream).
    pub replaced: Vec<String>,
    /// Pools whose priority, weight or nominal hashrate changed in place.
    pub updated: Vec<String>,
    /// Miners given a new home pool.
    pub rehomed: usize,
}

impl Reconfigured {
    /// Nothing changed.
    pub fn is_empty(&self) -> bool {
        self.added.is_empty()
            && self.removed.is_empty()
            && self.replaced.is_empty()
            && self.updated.is_empty()
            && self.rehomed == 0
    }
}

/// Same upstream connection: nothing that the pool session was set up with differs.
fn same_connection(a: &PoolConfig, b: &PoolConfig) -> bool {
    a.address == b.address
        && a.protocol == b.protocol
        && a.authority_pubkey == b.authority_pubkey
        && a.user == b.user
        && a.password == b.password
        && a.max_line == b.max_line
        && a.worker_identity == b.worker_identity
}

/// The routing table.
pub struct Router {
    pools: RwLock<Arc<Vec<PoolHandle>>>,
    state: Mutex<State>,
    /// Set by [`Router::spawn_monitor`]: pools added later get watched too.
    monitor: Mutex<Option<(CancellationToken, TaskTracker)>>,
}

fn hr(a: &AtomicU64) -> f64 {
    f64::from_bits(a.load(Relaxed))
}

impl Router {
    /// A router over running pools.
    pub fn new(cfg: &ProxyConfig, pools: Vec<PoolHandle>) -> Arc<Self> {
        Self::with_stops(cfg, pools, Vec::new())
    }

    /// A router over running pools, with the tokens that stop each pool's
    /// task (so a reload can stop pools it removes).
    pub fn with_stops(
        cfg: &ProxyConfig,
        pools: Vec<PoolHandle>,
        stops: Vec<CancellationToken>,
    ) -> Arc<Self> {
        let n = cfg.pools.len();
        let mut stops = stops.into_iter();
        let mut st = State {
            miners: HashMap::new(),
            controls: HashMap::new(),
            next_id: 1,
            health: vec![
                Health {
                    live: false,
                    live_since: None,
                    has_failed: false
                };
                n
            ],
            slots: cfg
                .pools
                .iter()
                .map(|p| Slot {
                    config: p.clone(),
                    retired: false,
                    stop: stops.next(),
                })
                .collect(),
            order: Vec::new(),
            cfg: cfg.routing.clone(),
            walked_at: Instant::now(),
        };
        st.reorder();
        Arc::new(Self {
            pools: RwLock::new(Arc::new(pools)),
            state: Mutex::new(st),
            monitor: Mutex::new(None),
        })
    }

    /// The pool handles, by config index (retired slots included).
    pub fn pools(&self) -> Arc<Vec<PoolHandle>> {
        self.pools.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The settings pool `index` runs with now.
    pub fn pool_config(&self, index: usize) -> Option<PoolConfig> {
        self.lock().slots.get(index).map(|s| s.config.clone())
    }

    /// Pool `index` was removed by a reload.
    pub fn is_retired(&self, index: usize) -> bool {
        self.lock().slots.get(index).is_some_and(|s| s.retired)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Register a miner of `worker` name; picks its home pool by weighted deficit.
    pub fn register(self: &Arc<Self>, worker: &str) -> Lease {
        let mut st = self.lock();
        let home = st.pick_home();
        let id = st.next_id;
        st.next_id += 1;
        let none = Assignment {
            pool: None,
            parked: false,
        };
        // A parked worker's cell says so before the session sees it.
        let control = st.controls.get(worker).copied().unwrap_or_default();
        let entry = Entry {
            cell: Arc::new(MinerCell::new(none)),
            worker: worker.to_string(),
            home,
            pinned: control.pinned,
            parked: control.parked,
        };
        entry.cell.set(Self::effective(
            &st,
            &Self::standing(&st, Instant::now()),
            &entry,
        ));
        let cell = entry.cell.clone();
        st.miners.insert(id, entry);
        Lease {
            router: self.clone(),
            id,
            cell,
        }
    }

    fn unregister(&self, id: u64) {
        self.lock().miners.remove(&id);
    }

    /// When pool `p`'s fail-back cooldown ends, counted from its return.
    fn cooldown_end(st: &State, p: usize) -> Option<Instant> {
        let cooldown = Duration::from_secs(st.cfg.failback_cooldown_secs);
        st.health[p].live_since.map(|t| t + cooldown)
    }

    /// Live, and past the fail-back cooldown if it ever failed.
    fn usable(st: &State, p: usize, now: Instant) -> bool {
        let h = &st.health[p];
        h.live && (!h.has_failed || Self::cooldown_end(st, p).is_some_and(|end| now >= end))
    }

    /// Pool `i` as its task reports it: a retired pool's task is gone, and
    /// its last view may still say live.
    fn reported_live(st: &State, i: usize, p: &PoolHandle) -> bool {
        !st.slots[i].retired && p.view.borrow().live
    }

    /// What every miner is judged against, worked out once per walk: the
    /// best failover pool is the first by priority that is usable (a pool
    /// back from a failure is not, until its cooldown ends), else the first
    /// live one.
    fn standing(st: &State, now: Instant) -> Standing {
        let best = st
            .order
            .iter()
            .copied()
            .find(|&p| Self::usable(st, p, now))
            .or_else(|| st.order.iter().copied().find(|&p| st.health[p].live));
        Standing { now, best }
    }

    fn effective(st: &State, at: &Standing, e: &Entry) -> Assignment {
        if e.parked {
            return Assignment {
                pool: None,
                parked: true,
            };
        }
        let want = e.pinned.unwrap_or(e.home);
        if Self::usable(st, want, at.now) {
            return Assignment {
                pool: Some(want),
                parked: false,
            };
        }
        // Failover to the best pool; a miner already on a live pool of its
        // standing stays.
        if let (Some(c), Some(b)) = (e.cell.assignment().pool, at.best) {
            if st.health[c].live && c != want && st.priority(c) <= st.priority(b) {
                return Assignment {
                    pool: Some(c),
                    parked: false,
                };
            }
        }
        Assignment {
            pool: at.best,
            parked: false,
        }
    }

    /// Recompute every miner's assignment; send the ones that changed.
    pub fn reevaluate(&self) -> usize {
        let pools = self.pools();
        let mut st = self.lock();
        let now = Instant::now();
        for (i, p) in pools.iter().enumerate() {
            let live = Self::reported_live(&st, i, p);
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
        st.walked_at = now;
        let at = Self::standing(&st, now);
        let mut changed = 0;
        for e in st.miners.values() {
            if e.cell.set(Self::effective(&st, &at, e)) {
                changed += 1;
            }
        }
        changed
    }

    /// The monitor's tick. With time alone an assignment changes only when a
    /// pool's fail-back cooldown runs out, so the miners are walked only then,
    /// or when a liveness change has not been seen yet (a walk every 250 ms
    /// was 3 % of the CPU at 19k miners).
    /// Returns how many assignments changed, or None when it did not walk.
    fn tick(&self) -> Option<usize> {
        let pools = self.pools();
        let due = {
            let st = self.lock();
            let now = Instant::now();
            pools.iter().enumerate().any(|(i, p)| {
                let h = &st.health[i];
                Self::reported_live(&st, i, p) != h.live
                    || (h.has_failed
                        && h.live
                        && Self::cooldown_end(&st, i)
                            .is_some_and(|end| end > st.walked_at && end <= now))
            })
        };
        due.then(|| self.reevaluate())
    }

    /// Move miners between homes so measured hashrate follows the weights.
    pub fn rebalance(&self) -> usize {
        let mut st = self.lock();
        let group = st.split_group();
        if group.len() < 2 {
            return 0;
        }
        let mut moved = 0;
        let wsum: f64 = group.iter().map(|&p| st.weight(p)).sum();
        for _ in 0..st.miners.len() {
            let (totals, avg) = st.home_totals(&group);
            let sum: f64 = totals.values().sum();
            let dev = |p: usize| totals[&p] - st.weight(p) / wsum * sum;
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
                        let h = hr(&e.cell.hashrate);
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

    /// Apply a new configuration's pools, priorities, weights and routing
    /// timings without touching miner connections. Pools are matched by
    /// name: same connection settings -> updated in place; changed address,
    /// protocol, key or credentials -> a new upstream (counters carried
    /// over) and the old one stopped; gone -> stopped and retired. Miners
    /// whose home left the split group get a new home by weighted deficit;
    /// sessions follow their assignment watch, so they switch jobs, not
    /// sockets. `start` launches an upstream for (index, pool, counters).
    pub fn reconfigure(
        self: &Arc<Self>,
        cfg: &ProxyConfig,
        start: impl Fn(usize, &PoolConfig, Arc<PoolStats>) -> (PoolHandle, CancellationToken),
    ) -> Reconfigured {
        let mut out = Reconfigured::default();
        let mut pools: Vec<PoolHandle> = self.pools().as_ref().clone();
        let mut added = Vec::new();
        {
            let mut st = self.lock();
            let mut seen = vec![false; st.slots.len()];
            for pc in &cfg.pools {
                let found = (0..st.slots.len())
                    .find(|&i| !st.slots[i].retired && st.slots[i].config.name == pc.name);
                match found {
                    Some(i) if same_connection(&st.slots[i].config, pc) => {
                        seen[i] = true;
                        if st.slots[i].config != *pc {
                            st.slots[i].config = pc.clone();
                            out.updated.push(pc.name.clone());
                        }
                    }
                    other => {
                        let stats = match other {
                            Some(i) => {
                                // seen stays false: retired below.
                                out.replaced.push(pc.name.clone());
                                pools[i].stats.clone()
                            }
                            None => {
                                out.added.push(pc.name.clone());
                                Arc::new(PoolStats::new(&pc.name))
                            }
                        };
                        let index = st.slots.len();
                        let (handle, stop) = start(index, pc, stats);
                        added.push((index, handle.view.clone()));
                        pools.push(handle);
                        st.slots.push(Slot {
                            config: pc.clone(),
                            retired: false,
                            stop: Some(stop),
                        });
                        st.health.push(Health {
                            live: false,
                            live_since: None,
                            has_failed: false,
                        });
                    }
                }
            }
            for (i, seen) in seen.into_iter().enumerate() {
                let slot = &mut st.slots[i];
                if !seen && !slot.retired {
                    slot.retired = true;
                    if let Some(stop) = slot.stop.take() {
                        stop.cancel();
                    }
                    if !out.replaced.contains(&slot.config.name) {
                        out.removed.push(slot.config.name.clone());
                    }
                }
            }
            st.cfg = cfg.routing.clone();
            st.reorder();
            *self.pools.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(pools);
            // Pins to pools that are gone are void; homes outside the new
            // split group are reassigned one by one, so each pick sees the last.
            let group = st.split_group();
            let retired: Vec<bool> = st.slots.iter().map(|s| s.retired).collect();
            let mut stray = Vec::new();
            for c in st.controls.values_mut() {
                if c.pinned.is_some_and(|p| retired[p]) {
                    c.pinned = None;
                }
            }
            st.controls.retain(|_, c| c.is_set());
            for (id, e) in st.miners.iter_mut() {
                if e.pinned.is_some_and(|p| retired[p]) {
                    e.pinned = None;
                }
                if !group.contains(&e.home) {
                    stray.push(*id);
                    e.home = usize::MAX;
                }
            }
            for id in stray {
                let home = st.pick_home();
                if let Some(e) = st.miners.get_mut(&id) {
                    e.home = home;
                    out.rehomed += 1;
                }
            }
        }
        if let Some((stop, tasks)) = self
            .monitor
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
        {
            for (index, rx) in added {
                self.watch_pool(index, rx, stop.clone(), &tasks);
            }
        }
        self.reevaluate();
        self.rebalance();
        out
    }

    /// Park the workers whose name matches: the connected ones (counted in
    /// the return) and any kept for a pin. Kept until unparked, across
    /// reconnections.
    pub fn park(&self, matches: impl Fn(&str) -> bool) -> usize {
        self.update(matches, |c| c.parked = true)
    }

    /// Unpark the workers whose name matches, connected or not.
    pub fn unpark(&self, matches: impl Fn(&str) -> bool) -> usize {
        self.update(matches, |c| c.parked = false)
    }

    /// Pin the workers whose name matches to `pool` (None: back to their
    /// home), as [`park`](Self::park) does.
    pub fn move_to(&self, matches: impl Fn(&str) -> bool, pool: Option<usize>) -> usize {
        self.update(matches, |c| c.pinned = pool)
    }

    /// Park or unpark one worker by name, connected or not (a worker parked
    /// while away gets no job when it connects). Returns its connections.
    pub fn park_worker(&self, worker: &str, parked: bool) -> usize {
        self.update_worker(worker, |c| c.parked = parked)
    }

    /// Pin one worker by name to `pool` (None: unpin), connected or not.
    pub fn pin_worker(&self, worker: &str, pool: Option<usize>) -> usize {
        self.update_worker(worker, |c| c.pinned = pool)
    }

    /// Set park and pin of many workers by name at once, connected or not
    /// (`(worker, parked, pinned)`): one walk of the miners for the whole
    /// batch, where [`park_worker`](Self::park_worker) walks once per
    /// worker. Returns the connections touched.
    pub fn set_controls(
        &self,
        controls: impl IntoIterator<Item = (String, bool, Option<usize>)>,
    ) -> usize {
        let n = {
            let mut guard = self.lock();
            let st = &mut *guard;
            let mut names = std::collections::HashSet::new();
            for (w, parked, pinned) in controls {
                let c = Control { parked, pinned };
                if c.is_set() {
                    st.controls.insert(w.clone(), c);
                } else {
                    st.controls.remove(&w);
                }
                names.insert(w);
            }
            if names.is_empty() {
                return 0;
            }
            Self::sync(st, |w| names.contains(w))
        };
        self.reevaluate();
        n
    }

    /// Whether `worker` is parked (connected or not).
    pub fn is_parked(&self, worker: &str) -> bool {
        self.lock().controls.get(worker).is_some_and(|c| c.parked)
    }

    /// The pool `worker` is pinned to, if any.
    pub fn pin_of(&self, worker: &str) -> Option<usize> {
        self.lock().controls.get(worker).and_then(|c| c.pinned)
    }

    /// Worker names with a park or pin kept.
    pub fn controlled_workers(&self) -> usize {
        self.lock().controls.len()
    }

    fn update(&self, matches: impl Fn(&str) -> bool, f: impl Fn(&mut Control)) -> usize {
        let mut n = 0;
        {
            let mut guard = self.lock();
            let st = &mut *guard;
            for (w, c) in st.controls.iter_mut() {
                if matches(w) {
                    f(c);
                }
            }
            for e in st.miners.values() {
                if !matches(&e.worker) {
                    continue;
                }
                n += 1;
                if !st.controls.contains_key(&e.worker) {
                    let mut c = Control::default();
                    f(&mut c);
                    if c.is_set() {
                        st.controls.insert(e.worker.clone(), c);
                    }
                }
            }
            st.controls.retain(|_, c| c.is_set());
            Self::sync(st, |w| matches(w));
        }
        self.reevaluate();
        n
    }

    fn update_worker(&self, worker: &str, f: impl Fn(&mut Control)) -> usize {
        let n = {
            let mut guard = self.lock();
            let st = &mut *guard;
            let mut c = st.controls.get(worker).copied().unwrap_or_default();
            f(&mut c);
            if c.is_set() {
                st.controls.insert(worker.to_string(), c);
            } else {
                st.controls.remove(worker);
            }
            Self::sync(st, |w| w == worker)
        };
        self.reevaluate();
        n
    }

    /// Copy the kept controls into the entries of the workers `matches`
    /// selects; returns how many entries it looked at.
    fn sync(st: &mut State, matches: impl Fn(&str) -> bool) -> usize {
        let mut n = 0;
        for e in st.miners.values_mut() {
            if matches(&e.worker) {
                let c = st.controls.get(&e.worker).copied().unwrap_or_default();
                e.parked = c.parked;
                e.pinned = c.pinned;
                n += 1;
            }
        }
        n
    }

    /// Miners and hashrate per pool (by current assignment).
    pub fn shares(&self) -> Vec<PoolShare> {
        let st = self.lock();
        let mut v: Vec<PoolShare> = (0..st.slots.len())
            .map(|p| PoolShare {
                pool: p,
                miners: 0,
                hashrate: 0.0,
                live: st.health[p].live,
                retired: st.slots[p].retired,
            })
            .collect();
        for e in st.miners.values() {
            if let Some(p) = e.cell.assignment().pool {
                v[p].miners += 1;
                v[p].hashrate += hr(&e.cell.hashrate);
            }
        }
        v
    }

    /// Tell each pool's upstream the measured hashrate of the miners on it
    /// (an SV2 channel's nominal hashrate follows it, see `UpdateChannel`).
    pub fn publish_hashrates(&self) {
        let shares = self.shares();
        for (share, h) in shares.iter().zip(self.pools().iter()) {
            h.stats.set_measured_hashrate(share.hashrate);
        }
    }

    /// Re-evaluate whenever pool `index` goes up or down.
    fn watch_pool(
        self: &Arc<Self>,
        index: usize,
        mut rx: watch::Receiver<crate::upstream::PoolView>,
        stop: CancellationToken,
        tasks: &TaskTracker,
    ) {
        let router = self.clone();
        tasks.spawn(async move {
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

    /// Watch pool views and re-evaluate on every change; tick for cooldowns
    /// and rebalancing.
    /// The tasks go on `tasks`, so a shutdown can wait for them.
    pub fn spawn_monitor(self: &Arc<Self>, shutdown: CancellationToken, tasks: &TaskTracker) {
        *self.monitor.lock().unwrap_or_else(|e| e.into_inner()) =
            Some((shutdown.clone(), tasks.clone()));
        for (index, p) in self.pools().iter().enumerate() {
            self.watch_pool(index, p.view.clone(), shutdown.clone(), tasks);
        }
        let router = self.clone();
        tasks.spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(250));
            let mut last = Instant::now();
            let mut measured_at = Instant::now();
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tick.tick() => {}
                }
                router.tick();
                if measured_at.elapsed() >= Duration::from_secs(1) {
                    measured_at = Instant::now();
                    router.publish_hashrates();
                }
                let every = Duration::from_secs(router.lock().cfg.rebalance_secs.max(1));
                if last.elapsed() >= every {
                    last = Instant::now();
                    router.rebalance();
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::PoolView;
    use gridproxy_protocol::difficulty::Target;
    use tokio::sync::mpsc;

    fn view(live: bool) -> PoolView {
        PoolView {
            live,
            epoch: 0,
            job: None,
            target: Target::MAX,
            rollable: 4,
            submit: mpsc::channel(1).0,
            published: std::time::Instant::now(),
        }
    }

    #[test]
    fn tick_walks_miners_only_when_liveness_or_a_cooldown_changes() {
        let text = "[[pools]]\nname='a'\naddress='127.0.0.1:1'\nprotocol='sv1'\nuser='u'\npriority=0\n\
                    [[pools]]\nname='b'\naddress='127.0.0.1:2'\nprotocol='sv1'\nuser='u'\npriority=1\n\
                    [routing]\nfailback_cooldown_secs=1\n";
        let cfg = ProxyConfig::from_toml(text).expect("config");
        let (tx_a, rx_a) = watch::channel(view(true));
        let (_tx_b, rx_b) = watch::channel(view(true));
        let handle = |index, view| PoolHandle {
            index,
            stats: Arc::new(PoolStats::default()),
            view,
        };
        let router = Router::new(&cfg, vec![handle(0, rx_a), handle(1, rx_b)]);
        router.reevaluate();
        let lease = router.register("w1");
        assert_eq!(lease.cell.assignment().pool, Some(0));
        assert_eq!(router.tick(), None, "nothing changed: no walk");

        // The primary drops: the next tick sees it before any watch task does.
        tx_a.send_replace(view(false));
        assert_eq!(router.tick(), Some(1));
        assert_eq!(lease.cell.assignment().pool, Some(1));
        assert_eq!(router.tick(), None);

        // Back up: the miner stays on the backup through the cooldown ...
        tx_a.send_replace(view(true));
        assert_eq!(router.tick(), Some(0));
        assert_eq!(lease.cell.assignment().pool, Some(1));
        assert_eq!(router.tick(), None, "cooldown running: no walk");
        // ... and the first tick after it ends moves the miner home.
        std::thread::sleep(Duration::from_millis(1100));
        assert_eq!(router.tick(), Some(1));
        assert_eq!(lease.cell.assignment().pool, Some(0));
        assert_eq!(router.tick(), None);
    }

    /// Park and pin are kept per worker name across reconnections, set only
    /// by the control plane, and dropped once neither is set: names that
    /// come and go leave nothing behind.
    #[test]
    fn park_and_pin_are_kept_by_worker_name_and_bounded() {
        let text = "[[pools]]\nname='a'\naddress='127.0.0.1:1'\nprotocol='sv1'\nuser='u'\npriority=0\n\
                    [[pools]]\nname='b'\naddress='127.0.0.1:2'\nprotocol='sv1'\nuser='u'\npriority=1\n";
        let cfg = ProxyConfig::from_toml(text).expect("config");
        let (_tx_a, rx_a) = watch::channel(view(true));
        let (_tx_b, rx_b) = watch::channel(view(true));
        let handle = |index, view| PoolHandle {
            index,
            stats: Arc::new(PoolStats::default()),
            view,
        };
        let router = Router::new(&cfg, vec![handle(0, rx_a), handle(1, rx_b)]);
        router.reevaluate();

        // A peer under many names: nothing kept.
        let leases: Vec<Lease> = (0..1000)
            .map(|i| router.register(&format!("x.{i}")))
            .collect();
        drop(leases);
        assert_eq!(router.controlled_workers(), 0);

        // Parked by glob while connected, then away and back: still parked.
        let l1 = router.register("site.a1");
        let _l2 = router.register("site.a2");
        assert_eq!(router.park(|w| w.starts_with("site.")), 2);
        drop(l1);
        let l1 = router.register("site.a1");
        assert!(l1.cell.assignment().parked, "parked from registration on");
        assert_eq!(router.controlled_workers(), 2);

        // Parked by name while away: parked on arrival.
        assert_eq!(router.park_worker("site.b1", true), 0);
        assert!(router.register("site.b1").cell.assignment().parked);

        // A pin outlives the connection; unpark and unpin of workers that
        // are away clear what was kept.
        assert_eq!(router.pin_worker("site.a2", Some(1)), 1);
        assert_eq!(router.unpark(|w| w.starts_with("site.")), 2);
        assert_eq!(l1.cell.assignment().pool, Some(0));
        assert_eq!(router.controlled_workers(), 1);
        assert_eq!(router.pin_of("site.a2"), Some(1));
        let back = router.register("site.a2");
        assert_eq!(back.cell.assignment().pool, Some(1));
        assert_eq!(router.move_to(|w| w == "site.a2", None), 2);
        assert_eq!(router.controlled_workers(), 0);
        assert_eq!(back.cell.assignment().pool, Some(0));

        // A batch: connected and away at once, cleared entries removed.
        let batch = vec![
            ("site.a1".to_string(), true, None),
            ("site.c9".to_string(), false, Some(1)),
            ("site.a2".to_string(), false, None),
        ];
        assert_eq!(
            router.set_controls(batch),
            3,
            "connections: a1 once, a2 twice"
        );
        assert!(l1.cell.assignment().parked);
        assert_eq!(router.pin_of("site.c9"), Some(1));
        assert_eq!(router.controlled_workers(), 2);
        assert!(router.register("site.c9").cell.assignment().pool == Some(1));
    }
}
