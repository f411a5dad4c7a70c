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
//! With `[[accounts]]`, every miner belongs to one account (matched on
//! register by worker name, listener and source) and is routed among that
//! account's slots only (one upstream per pool and account, see
//! [`crate::accounts`]): failover, the weighted split and rebalancing run
//! per account over the same priorities and weights. A pin names a pool;
//! it takes the miner to its own account's slot of that pool.
//!
//! The router's map is locked on connect, disconnect and re-evaluation only,
//! never on the share path.

use crate::accounts::{Accounts, Origin, DEFAULT_ACCOUNT};
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
    /// The account the miner was matched to when it registered.
    pub account: usize,
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.router.unregister(self.id);
    }
}

struct Entry {
    cell: Arc<MinerCell>,
    worker: String,
    /// Where it connected from, to match it again when the accounts change.
    origin: Origin,
    account: usize,
    /// A slot of `account`.
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
    /// The account it serves (`usize::MAX` once retired).
    account: usize,
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
    accounts: Accounts,
    /// When the miners were last walked (see [`Router::tick`]).
    walked_at: Instant,
}

/// See [`Router::standing`].
struct Standing {
    now: Instant,
    /// By account.
    best: Vec<Option<usize>>,
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

    /// Account `a`'s active slots by priority.
    fn account_order(&self, a: usize) -> impl Iterator<Item = usize> + '_ {
        self.order
            .iter()
            .copied()
            .filter(move |&i| self.slots[i].account == a)
    }

    /// Account `a`'s slots of the best priority: the weighted split shares
    /// its miners among them.
    fn split_group(&self, a: usize) -> Vec<usize> {
        let best = self.account_order(a).next().map(|i| self.priority(i));
        self.account_order(a)
            .filter(|&i| Some(self.priority(i)) == best)
            .collect()
    }

    /// The slot of account `a` for the pool that slot `p` is of.
    fn slot_of(&self, a: usize, p: usize) -> Option<usize> {
        let name = self.slots.get(p)?.config.pool_name();
        self.account_order(a)
            .find(|&i| self.slots[i].config.pool_name() == name)
    }

    /// The account index of a slot's config (`usize::MAX`: no such account).
    fn account_index(&self, c: &PoolConfig) -> usize {
        match &c.account {
            None => DEFAULT_ACCOUNT,
            Some(n) => self.accounts.index_of(n).unwrap_or(usize::MAX),
        }
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

    /// The split-group slot of account `a` furthest below its weighted
    /// share: a new home (`usize::MAX` when the account has no slot).
    fn pick_home(&self, a: usize) -> usize {
        let group = self.split_group(a);
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
            .unwrap_or(usize::MAX)
    }
}

/// Per-pool summary for status output.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PoolShare {
    /// Pool (slot) index.
    pub pool: usize,
    /// The account the slot serves (`default`: the pool's own user).
    pub account: String,
    /// Miners assigned now.
    pub miners: usize,
    /// Their measured hashrate (H/s).
    pub hashrate: f64,
    /// Pool is live.
    pub live: bool,
    /// Removed by a reload (kept so indices stay stable).
    pub retired: bool,
}

/// One account's totals over its upstream slots.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct AccountTotals {
    /// Account name (`default`: the pools' own user).
    pub name: String,
    /// Its upstream slots, by name (`pool` or `pool@account`).
    pub slots: Vec<String>,
    /// Miners connected in it now.
    pub miners: usize,
    /// Their measured hashrate (H/s).
    pub hashrate: f64,
    /// Shares forwarded to its pools.
    pub submitted: u64,
    /// Shares its pools accepted.
    pub accepted: u64,
    /// Shares its pools rejected.
    pub rejected: u64,
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
    /// Connected miners whose account changed (they move to the new
    /// account's upstream without reconnecting).
    pub remapped: usize,
}

impl Reconfigured {
    /// Nothing changed.
    pub fn is_empty(&self) -> bool {
        self.added.is_empty()
            && self.removed.is_empty()
            && self.replaced.is_empty()
            && self.updated.is_empty()
            && self.rehomed == 0
            && self.remapped == 0
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
        let configs = cfg.slots();
        let n = configs.len();
        let accounts = cfg.compiled_accounts();
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
            slots: configs
                .iter()
                .map(|p| Slot {
                    config: p.clone(),
                    account: match &p.account {
                        None => DEFAULT_ACCOUNT,
                        Some(a) => accounts.index_of(a).unwrap_or(usize::MAX),
                    },
                    retired: false,
                    stop: stops.next(),
                })
                .collect(),
            order: Vec::new(),
            cfg: cfg.routing.clone(),
            accounts,
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

    /// Register a miner of `worker` name whose origin is not known (it
    /// matches only accounts that ask for a name alone).
    pub fn register(self: &Arc<Self>, worker: &str) -> Lease {
        self.register_from(worker, Origin::default())
    }

    /// Register a miner of `worker` name from `origin`: matches its account
    /// and picks its home among the account's pools by weighted deficit.
    pub fn register_from(self: &Arc<Self>, worker: &str, origin: Origin) -> Lease {
        let mut st = self.lock();
        let account = st.accounts.account_of(worker, origin);
        let home = st.pick_home(account);
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
            origin,
            account,
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
            account,
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
        let best = (0..st.accounts.names().len())
            .map(|a| {
                st.account_order(a)
                    .find(|&p| Self::usable(st, p, now))
                    .or_else(|| st.account_order(a).find(|&p| st.health[p].live))
            })
            .collect();
        Standing { now, best }
    }

    fn effective(st: &State, at: &Standing, e: &Entry) -> Assignment {
        if e.parked {
            return Assignment {
                pool: None,
                parked: true,
            };
        }
        let best = at.best.get(e.account).copied().flatten();
        let want = e
            .pinned
            .and_then(|p| st.slot_of(e.account, p))
            .unwrap_or(e.home);
        let mine = |p: usize| st.slots.get(p).is_some_and(|s| s.account == e.account);
        if mine(want) && Self::usable(st, want, at.now) {
            return Assignment {
                pool: Some(want),
                parked: false,
            };
        }
        // Failover to the account's best pool; a miner already on a live
        // pool of its standing stays.
        if let (Some(c), Some(b)) = (e.cell.assignment().pool, best) {
            if mine(c) && st.health[c].live && c != want && st.priority(c) <= st.priority(b) {
                return Assignment {
                    pool: Some(c),
                    parked: false,
                };
            }
        }
        Assignment {
            pool: best,
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

    /// Move miners between homes so measured hashrate follows the weights,
    /// within each account.
    pub fn rebalance(&self) -> usize {
        let mut st = self.lock();
        let mut moved = 0;
        for a in 0..st.accounts.names().len() {
            moved += Self::rebalance_account(&mut st, a);
        }
        drop(st);
        if moved > 0 {
            self.reevaluate();
        }
        moved
    }

    fn rebalance_account(st: &mut State, account: usize) -> usize {
        let group = st.split_group(account);
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
            let old_accounts = std::mem::replace(&mut st.accounts, cfg.compiled_accounts());
            let mut seen = vec![false; st.slots.len()];
            for pc in &cfg.slots() {
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
                            account: usize::MAX,
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
            // Account indices may have moved with the accounts' order.
            for i in 0..st.slots.len() {
                st.slots[i].account = if st.slots[i].retired {
                    usize::MAX
                } else {
                    st.account_index(&st.slots[i].config)
                };
            }
            st.cfg = cfg.routing.clone();
            st.reorder();
            *self.pools.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(pools);
            // Miners are matched to the new accounts; pins to pools that are
            // gone are void; homes outside their account's split group are
            // reassigned one by one, so each pick sees the last.
            let groups: Vec<Vec<usize>> = (0..st.accounts.names().len())
                .map(|a| st.split_group(a))
                .collect();
            let State {
                miners, accounts, ..
            } = &mut *st;
            for e in miners.values_mut() {
                // By name: indices shift when accounts come and go.
                let a = accounts.account_of(&e.worker, e.origin);
                if old_accounts.names().get(e.account) != accounts.names().get(a) {
                    out.remapped += 1;
                }
                e.account = a;
            }
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
                if !groups.get(e.account).is_some_and(|g| g.contains(&e.home)) {
                    stray.push((*id, e.account));
                    e.home = usize::MAX;
                }
            }
            for (id, account) in stray {
                let home = st.pick_home(account);
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
                account: st.slots[p]
                    .config
                    .account
                    .clone()
                    .unwrap_or_else(|| crate::accounts::DEFAULT_NAME.into()),
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

    /// Account names by index (`default`, the pools' own user, first).
    pub fn account_names(&self) -> Vec<String> {
        self.lock().accounts.names().to_vec()
    }

    /// Each account's miners, hashrate and pool share counts (summed over
    /// its slots, a replaced slot's counters carried over; a removed
    /// account is not listed).
    pub fn account_totals(&self) -> Vec<AccountTotals> {
        let pools = self.pools();
        let st = self.lock();
        let mut out: Vec<AccountTotals> = st
            .accounts
            .names()
            .iter()
            .map(|n| AccountTotals {
                name: n.clone(),
                ..AccountTotals::default()
            })
            .collect();
        for (i, slot) in st.slots.iter().enumerate() {
            let (Some(t), Some(h)) = (out.get_mut(slot.account), pools.get(i)) else {
                continue;
            };
            t.slots.push(slot.config.name.clone());
            t.submitted += h.stats.submitted.get();
            t.accepted += h.stats.accepted.get();
            t.rejected += h.stats.rejected.get();
        }
        for e in st.miners.values() {
            if let Some(t) = out.get_mut(e.account) {
                t.miners += 1;
                t.hashrate += hr(&e.cell.hashrate);
            }
        }
        out
    }

    /// The connected workers of the account named `account`.
    pub fn workers_of_account(&self, account: &str) -> Vec<String> {
        let st = self.lock();
        let Some(a) = st.accounts.index_of(account) else {
            return Vec::new();
        };
        st.miners
            .values()
            .filter(|e| e.account == a)
            .map(|e| e.worker.clone())
            .collect()
    }

    /// The account of each connected worker name (a name connected under
    /// two accounts shows the last one walked).
    pub fn worker_accounts(&self) -> HashMap<String, String> {
        let st = self.lock();
        let names = st.accounts.names();
        st.miners
            .values()
            .filter_map(|e| Some((e.worker.clone(), names.get(e.account)?.clone())))
            .collect()
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
    use crate::accounts::Listener;
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

    /// Each account's miners go to its own slots only, fail over within
    /// them, follow a pin by pool name to their own slot of that pool, and
    /// move to a new account's slots on a reload without reconnecting.
    #[test]
    fn accounts_route_among_their_own_slots() {
        let pools = "[[pools]]\nname='a'\naddress='127.0.0.1:1'\nprotocol='sv1'\nuser='site'\npriority=0\n\
                     [[pools]]\nname='b'\naddress='127.0.0.1:2'\nprotocol='sv1'\nuser='site'\npriority=1\n";
        let accounts = "[[accounts]]\nname='acme'\nworkers=['acme.*']\n\
                        [accounts.pools.a]\nuser='acme.a'\n[accounts.pools.b]\nuser='acme.b'\n\
                        [[accounts]]\nname='rack'\nsources=['10.7.0.0/16']\nlisteners=['sv1']\n\
                        [accounts.pools.b]\nuser='rack.b'\npassword='p'\n";
        let cfg = ProxyConfig::from_toml(&format!("{pools}{accounts}")).expect("config");
        let slots = cfg.slots();
        let names: Vec<&str> = slots.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["a", "b", "a@acme", "b@acme", "b@rack"]);
        assert_eq!(slots[2].user, "acme.a");
        assert_eq!(slots[4].password, "p");
        assert_eq!(slots[4].pool_name(), "b");
        let mut txs = Vec::new();
        let handles = (0..slots.len())
            .map(|index| {
                let (tx, rx) = watch::channel(view(true));
                txs.push(tx);
                PoolHandle {
                    index,
                    stats: Arc::new(PoolStats::default()),
                    view: rx,
                }
            })
            .collect();
        let router = Router::new(&cfg, handles);
        router.reevaluate();
        let rack = Origin {
            listener: Some(Listener::Sv1),
            source: Some("10.7.1.1".parse().unwrap()),
        };
        let plain = router.register("bob.1");
        let acme = router.register("acme.1");
        let racked = router.register_from("bob.2", rack);
        assert_eq!((plain.account, acme.account, racked.account), (0, 1, 2));
        assert_eq!(plain.cell.assignment().pool, Some(0));
        assert_eq!(acme.cell.assignment().pool, Some(2));
        assert_eq!(racked.cell.assignment().pool, Some(4));

        // acme's primary slot drops: acme fails over to its own backup, the
        // default account stays.
        txs[2].send_replace(view(false));
        router.reevaluate();
        assert_eq!(acme.cell.assignment().pool, Some(3));
        assert_eq!(plain.cell.assignment().pool, Some(0));
        txs[2].send_replace(view(true));
        router.reevaluate();

        // A pin to pool "b" (given as the default slot) takes each miner to
        // its own account's slot of b.
        router.move_to(|_| true, Some(1));
        assert_eq!(plain.cell.assignment().pool, Some(1));
        assert_eq!(acme.cell.assignment().pool, Some(3));
        assert_eq!(racked.cell.assignment().pool, Some(4));
        router.move_to(|_| true, None);
        assert_eq!(router.workers_of_account("acme"), ["acme.1"]);
        assert_eq!(router.worker_accounts()["bob.2"], "rack");

        // Reload: acme's prefix moves to a new account "beta" on pool a; the
        // rack account is gone. Miners are re-matched in place.
        let accounts2 =
            "[[accounts]]\nname='beta'\nworkers=['acme.*']\n[accounts.pools.a]\nuser='beta.a'\n";
        let cfg2 = ProxyConfig::from_toml(&format!("{pools}{accounts2}")).expect("config");
        let out = router.reconfigure(&cfg2, |index, _pc, stats| {
            // A dropped sender leaves the last view readable: live.
            let (_tx, rx) = watch::channel(view(true));
            (
                PoolHandle {
                    index,
                    stats,
                    view: rx,
                },
                CancellationToken::new(),
            )
        });
        assert_eq!(out.added, ["a@beta"]);
        assert_eq!(out.removed.len(), 3, "{:?}", out.removed);
        assert_eq!(out.remapped, 2, "acme.1 to beta, bob.2 to default");
        assert_eq!(router.account_names(), ["default", "beta"]);
        assert_eq!(acme.cell.assignment().pool, Some(5), "beta's slot of a");
        assert_eq!(racked.cell.assignment().pool, Some(0));
        assert_eq!(plain.cell.assignment().pool, Some(0));
    }
}
