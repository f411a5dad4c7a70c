//! Per-worker and per-pool counters. Atomics only: sessions and upstream
//! tasks update them without locks; the registry map is touched at
//! authorize time, never on the share path.

use serde::Serialize;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

/// Why the proxy rejected a miner's share.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RejectReason {
    /// Job unknown or no longer valid (new block, pool switch, parked).
    StaleJob,
    /// The same work was already submitted.
    Duplicate,
    /// Above the miner's current target, but meets an easier target it was
    /// given recently (a difficulty change raced the share).
    LowDifficulty,
    /// Above every target the miner was given: a bad nonce or corrupted work.
    BadNonce,
    /// Malformed work (bad extranonce2 size, version bits outside the mask, ntime out of range).
    Invalid,
    /// Not authorized / not subscribed.
    Unauthorized,
}

impl RejectReason {
    /// All reasons, for reporting.
    pub const ALL: [RejectReason; 6] = [
        Self::StaleJob,
        Self::Duplicate,
        Self::LowDifficulty,
        Self::BadNonce,
        Self::Invalid,
        Self::Unauthorized,
    ];
    /// The SV1 error code and message sent to the miner.
    pub fn sv1_error(self) -> (i64, &'static str) {
        match self {
            Self::StaleJob => (21, "Stale job"),
            Self::Duplicate => (22, "Duplicate share"),
            Self::LowDifficulty => (23, "Low difficulty share"),
            Self::BadNonce => (20, "Invalid share: bad nonce"),
            Self::Invalid => (20, "Invalid share"),
            Self::Unauthorized => (24, "Unauthorized worker"),
        }
    }
    /// The SV2 SubmitShares.Error code.
    pub fn sv2_code(self) -> &'static str {
        match self {
            Self::StaleJob => "stale-share",
            Self::Duplicate => "duplicate-share",
            Self::LowDifficulty | Self::BadNonce => "difficulty-too-low",
            Self::Invalid => "invalid-job-id",
            Self::Unauthorized => "invalid-channel-id",
        }
    }
    fn idx(self) -> usize {
        self as usize
    }
}

/// How the last SV2 extension negotiation for worker-specific hashrate
/// tracking (0x0002) ended; see `upstream::extensions`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum IdentityNegotiation {
    /// The pool granted 0x0002: shares carry the worker's `user_identity`.
    Granted,
    /// The pool answered without it (`RequestExtensions.Error`, or a
    /// success that leaves it out): shares go without.
    Refused,
    /// `worker_identity = false`: not requested.
    Disabled,
    /// The pool did not answer `RequestExtensions` in time (a pool without
    /// extension negotiation ignores it): shares go without.
    NoAnswer,
}

impl IdentityNegotiation {
    /// All results, for reporting.
    pub const ALL: [IdentityNegotiation; 4] =
        [Self::Granted, Self::Refused, Self::Disabled, Self::NoAnswer];
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Granted => "granted",
            Self::Refused => "refused",
            Self::Disabled => "disabled",
            Self::NoAnswer => "no_answer",
        }
    }
}

/// A relaxed counter.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);
impl Counter {
    /// Add one.
    pub fn inc(&self) {
        self.0.fetch_add(1, Relaxed);
    }
    /// Add `n`.
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Relaxed);
    }
    /// Value.
    pub fn get(&self) -> u64 {
        self.0.load(Relaxed)
    }
}

/// One worker name's counters (several connections may share a name).
#[derive(Debug, Default)]
pub struct WorkerStats {
    /// Worker name as authorized (truncated to the configured maximum).
    pub name: String,
    /// Shares answered "accepted" to the miner.
    pub accepted: Counter,
    rejected: [Counter; 6],
    /// Shares forwarded upstream.
    pub forwarded: Counter,
    /// Forwarded shares the pool acknowledged.
    pub upstream_accepted: Counter,
    /// Forwarded shares the pool rejected.
    pub upstream_rejected: Counter,
    /// Sum of accepted share difficulties, for hashrate.
    diff_sum: F64Sum,
    /// Unix ms of the last accepted share.
    last_share_ms: AtomicU64,
    /// Unix ms of the first accepted share (start of the hashrate window).
    first_share_ms: AtomicU64,
    /// Connections currently using this name.
    pub connections: AtomicU64,
    /// Unix ms this name last connected.
    last_seen_ms: AtomicU64,
}

impl WorkerStats {
    /// Count an accepted share of `difficulty`.
    pub fn accept(&self, difficulty: f64) {
        self.accepted.inc();
        self.diff_sum.add(difficulty);
        let now = now_ms();
        let _ = self
            .first_share_ms
            .compare_exchange(0, now, Relaxed, Relaxed);
        self.last_share_ms.store(now, Relaxed);
    }
    /// Estimated hashrate (H/s) from accepted difficulty since the first share.
    pub fn hashrate(&self) -> f64 {
        let first = self.first_share_ms.load(Relaxed);
        if first == 0 {
            return 0.0;
        }
        let secs = (now_ms().saturating_sub(first)) as f64 / 1000.0;
        gridproxy_protocol::difficulty::hashrate_from_shares(self.difficulty_sum(), secs.max(1.0))
    }
    /// Unix ms of the last connect or accepted share.
    fn last_active_ms(&self) -> u64 {
        self.last_seen_ms
            .load(Relaxed)
            .max(self.last_share_ms.load(Relaxed))
    }
    /// Count a rejected share.
    pub fn reject(&self, why: RejectReason) {
        self.rejected[why.idx()].inc();
    }
    /// Rejections for one reason.
    pub fn rejected(&self, why: RejectReason) -> u64 {
        self.rejected[why.idx()].get()
    }
    /// Sum of accepted difficulty.
    pub fn difficulty_sum(&self) -> f64 {
        self.diff_sum.get()
    }
    /// A serializable snapshot.
    pub fn snapshot(&self) -> WorkerSnapshot {
        WorkerSnapshot {
            name: self.name.clone(),
            accepted: self.accepted.get(),
            rejected: RejectReason::ALL
                .iter()
                .map(|r| (*r, self.rejected(*r)))
                .filter(|(_, n)| *n > 0)
                .collect(),
            forwarded: self.forwarded.get(),
            upstream_accepted: self.upstream_accepted.get(),
            upstream_rejected: self.upstream_rejected.get(),
            difficulty_sum: self.difficulty_sum(),
            hashrate: self.hashrate(),
            last_share_ms: self.last_share_ms.load(Relaxed),
            connections: self.connections.load(Relaxed),
        }
    }
}

/// Snapshot of a worker's counters.
#[derive(Debug, Clone, Serialize)]
pub struct WorkerSnapshot {
    /// name
    pub name: String,
    /// accepted by the proxy
    pub accepted: u64,
    /// rejected by reason
    pub rejected: Vec<(RejectReason, u64)>,
    /// forwarded upstream
    pub forwarded: u64,
    /// acknowledged by the pool
    pub upstream_accepted: u64,
    /// rejected by the pool
    pub upstream_rejected: u64,
    /// sum of accepted difficulty
    pub difficulty_sum: f64,
    /// estimated hashrate, H/s
    pub hashrate: f64,
    /// last accepted share, unix ms
    pub last_share_ms: u64,
    /// live connections
    pub connections: u64,
}

/// Distinct pool reject reasons kept per pool (the last is "other").
pub const MAX_REJECT_REASONS: usize = 32;
/// Longest pool reject reason kept, bytes.
pub const MAX_REASON_LEN: usize = 64;
/// Where reasons past [`MAX_REJECT_REASONS`] are counted.
pub const OTHER_REASON: &str = "other";

/// One pool's counters.
#[derive(Debug, Default)]
pub struct PoolStats {
    /// Pool name.
    pub name: String,
    /// Shares sent.
    pub submitted: Counter,
    /// Shares acknowledged.
    pub accepted: Counter,
    /// Shares rejected.
    pub rejected: Counter,
    /// Connects that completed setup.
    pub connects: Counter,
    /// Jobs received.
    pub jobs: Counter,
    /// Sum of accepted difficulty (as the proxy computed it).
    diff_sum: F64Sum,
    /// Shares given up unanswered: the pending queue was full.
    pub pending_dropped: Counter,
    /// Future jobs dropped: more arrived than `routing.max_future_jobs`.
    pub future_jobs_dropped: Counter,
    /// Shares sent that had no answer when their connection ended (the
    /// pool went away, or went silent during a drain).
    pub unanswered: Counter,
    /// `UpdateChannel`s sent: the channel's nominal hashrate followed the
    /// miners' measured one.
    pub channel_updates: Counter,
    /// SV2 connections by how the 0x0002 negotiation ended (indexed as
    /// [`IdentityNegotiation::ALL`]).
    identity_negotiations: [Counter; 4],
    /// 1 while the current SV2 connection sends `user_identity` with shares.
    identity_granted: AtomicU64,
    /// Measured hashrate of the miners on this pool now (f64 bits, H/s),
    /// written by the router's monitor.
    measured: AtomicU64,
    /// The SV2 channel's nominal hashrate as last told to the pool (f64 bits, H/s).
    nominal: AtomicU64,
    /// Reject reasons the pool gave (at most [`MAX_REJECT_REASONS`]).
    reasons: Mutex<HashMap<String, u64>>,
    /// Why the last connection attempt or session failed.
    last_error: Mutex<Option<String>>,
}

impl PoolStats {
    /// New counters for `name`.
    pub fn new(name: &str) -> Self {
        Self {
            name: name.to_string(),
            ..Default::default()
        }
    }
    /// Record the measured hashrate of the miners on this pool (H/s).
    pub fn set_measured_hashrate(&self, hs: f64) {
        self.measured.store(hs.to_bits(), Relaxed);
    }
    /// The measured hashrate of the miners on this pool (H/s; 0 until measured).
    pub fn measured_hashrate(&self) -> f64 {
        f64::from_bits(self.measured.load(Relaxed))
    }
    /// Record the nominal hashrate the pool was told (open or `UpdateChannel`).
    pub fn set_channel_nominal(&self, hs: f64) {
        self.nominal.store(hs.to_bits(), Relaxed);
    }
    /// The SV2 channel's nominal hashrate as last told to the pool (0 before any).
    pub fn channel_nominal(&self) -> f64 {
        f64::from_bits(self.nominal.load(Relaxed))
    }
    /// Record how a connection's 0x0002 negotiation ended.
    pub fn identity_negotiated(&self, r: IdentityNegotiation) {
        self.identity_negotiations[r as usize].inc();
        self.identity_granted
            .store(u64::from(r == IdentityNegotiation::Granted), Relaxed);
    }
    /// Connections whose 0x0002 negotiation ended as `r`.
    pub fn identity_negotiations(&self, r: IdentityNegotiation) -> u64 {
        self.identity_negotiations[r as usize].get()
    }
    /// Whether the current connection sends `user_identity` with shares.
    pub fn identity_granted(&self) -> bool {
        self.identity_granted.load(Relaxed) == 1
    }
    /// The connection ended: no identity is sent until the next negotiation.
    pub fn identity_lost(&self) {
        self.identity_granted.store(0, Relaxed);
    }
    /// Count an acknowledged share.
    pub fn accept(&self, difficulty: f64) {
        self.accepted.inc();
        self.diff_sum.add(difficulty);
    }
    /// Count a rejection with the pool's reason.
    /// The map is bounded: a reason is cut to [`MAX_REASON_LEN`] bytes, and
    /// past [`MAX_REJECT_REASONS`] distinct ones the rest count as "other"
    /// (a pool's text could otherwise grow it without end).
    pub fn reject(&self, reason: &str) {
        self.rejected.inc();
        let mut cut = MAX_REASON_LEN.min(reason.len());
        while !reason.is_char_boundary(cut) {
            cut -= 1;
        }
        let reason = &reason[..cut];
        let mut m = self.reasons.lock().unwrap_or_else(|e| e.into_inner());
        let key = if m.contains_key(reason) || m.len() < MAX_REJECT_REASONS - 1 {
            reason
        } else {
            OTHER_REASON
        };
        *m.entry(key.to_string()).or_default() += 1;
    }
    /// Reject reasons.
    pub fn reasons(&self) -> HashMap<String, u64> {
        self.reasons
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
    /// Record why the upstream is down.
    pub fn set_error(&self, e: Option<String>) {
        *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = e;
    }
    /// Why the upstream last failed, if it did.
    pub fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
    /// Accepted difficulty sum.
    pub fn difficulty_sum(&self) -> f64 {
        self.diff_sum.get()
    }
}

/// Upper bounds of [`FanoutHistogram`]'s buckets, seconds.
pub const FANOUT_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Time from a new block's job arriving from the pool to its write to each
/// miner: one observation per miner per block, so the slowest is the last
/// miner to switch. Atomics only (19,000 observations a block).
#[derive(Debug, Default)]
pub struct FanoutHistogram {
    /// Observations at or under each bound (not cumulative), then over all.
    buckets: [AtomicU64; FANOUT_BUCKETS.len() + 1],
    /// Sum of observations, microseconds.
    sum_us: AtomicU64,
}

impl FanoutHistogram {
    /// Record one miner's fan-out time.
    pub fn observe(&self, d: std::time::Duration) {
        let s = d.as_secs_f64();
        let i = FANOUT_BUCKETS
            .iter()
            .position(|b| s <= *b)
            .unwrap_or(FANOUT_BUCKETS.len());
        self.buckets[i].fetch_add(1, Relaxed);
        self.sum_us
            .fetch_add(d.as_micros().min(u64::MAX as u128) as u64, Relaxed);
    }

    /// Cumulative counts per bound (Prometheus `le`), the total count and
    /// the sum in seconds.
    pub fn snapshot(&self) -> (Vec<(f64, u64)>, u64, f64) {
        let mut acc = 0;
        let mut out = Vec::with_capacity(FANOUT_BUCKETS.len());
        for (i, b) in FANOUT_BUCKETS.iter().enumerate() {
            acc += self.buckets[i].load(Relaxed);
            out.push((*b, acc));
        }
        acc += self.buckets[FANOUT_BUCKETS.len()].load(Relaxed);
        (out, acc, self.sum_us.load(Relaxed) as f64 / 1e6)
    }
}

/// A float sum updated without a lock (f64 bits in an atomic). A fixed-point
/// sum lost CPU-miner difficulties (below 1e-6) entirely.
#[derive(Debug, Default)]
pub struct F64Sum(AtomicU64);

impl F64Sum {
    /// Add `v` (non-finite or negative values are ignored).
    pub fn add(&self, v: f64) {
        if !(v.is_finite() && v > 0.0) {
            return;
        }
        let _ = self.0.fetch_update(Relaxed, Relaxed, |b| {
            Some((f64::from_bits(b) + v).to_bits())
        });
    }
    /// The sum so far.
    pub fn get(&self) -> f64 {
        f64::from_bits(self.0.load(Relaxed))
    }
}

/// Registry of worker stats by name, bounded: a peer that connects with
/// fresh names cannot grow it without limit. Names with no connection are
/// forgotten after an idle time, and when the registry is full the longest
/// idle of them make room; a new name beyond that is served but not kept.
#[derive(Debug)]
pub struct Registry {
    workers: Mutex<HashMap<String, Arc<WorkerStats>>>,
    max: AtomicUsize,
    idle_ms: AtomicU64,
    /// Names forgotten (idle or evicted to make room).
    pub evicted: Counter,
    /// New names served untracked because the registry was full of
    /// connected workers.
    pub untracked: Counter,
    /// When idle names were last swept (unix ms).
    swept_ms: AtomicU64,
}

impl Default for Registry {
    fn default() -> Self {
        Registry::new(100_000, std::time::Duration::from_secs(3600))
    }
}

impl Registry {
    /// At most `max` names; a name with no connection forgotten after `idle`.
    pub fn new(max: usize, idle: std::time::Duration) -> Self {
        Registry {
            workers: Mutex::new(HashMap::new()),
            max: AtomicUsize::new(max.max(1)),
            idle_ms: AtomicU64::new(idle.as_millis().try_into().unwrap_or(u64::MAX)),
            evicted: Counter::default(),
            untracked: Counter::default(),
            swept_ms: AtomicU64::new(now_ms()),
        }
    }

    /// New bounds (a reload); they take effect at the next insert or sweep.
    pub fn set_limits(&self, max: usize, idle: std::time::Duration) {
        self.max.store(max.max(1), Relaxed);
        self.idle_ms
            .store(idle.as_millis().try_into().unwrap_or(u64::MAX), Relaxed);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<WorkerStats>>> {
        self.workers.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The stats for a worker name, created on first use, with one more
    /// connection counted (under the lock, so a sweep never forgets a name
    /// that is being attached). Undo with `connections.fetch_sub`.
    pub fn attach(&self, name: &str) -> Arc<WorkerStats> {
        let now = now_ms();
        let mut m = self.lock();
        if let Some(w) = m.get(name) {
            w.connections.fetch_add(1, Relaxed);
            w.last_seen_ms.store(now, Relaxed);
            return w.clone();
        }
        let max = self.max.load(Relaxed);
        if m.len() >= max {
            self.make_room(&mut m, now, max);
        }
        let w = Arc::new(WorkerStats {
            name: name.to_string(),
            ..Default::default()
        });
        w.connections.fetch_add(1, Relaxed);
        w.last_seen_ms.store(now, Relaxed);
        if m.len() < max {
            m.insert(name.to_string(), w.clone());
        } else {
            self.untracked.inc();
        }
        w
    }

    /// Full: forget idle names first, then the longest-idle unconnected
    /// ones down to 90 % of `max`, so the next sweep is 10 % of inserts away.
    fn make_room(&self, m: &mut HashMap<String, Arc<WorkerStats>>, now: u64, max: usize) {
        self.forget_idle(m, now);
        if m.len() < max {
            return;
        }
        let mut idle: Vec<(u64, String)> = m
            .iter()
            .filter(|(_, w)| w.connections.load(Relaxed) == 0)
            .map(|(k, w)| (w.last_active_ms(), k.clone()))
            .collect();
        let excess = m.len() + 1 - max * 9 / 10;
        if idle.len() > excess {
            idle.select_nth_unstable(excess);
            idle.truncate(excess);
        }
        for (_, k) in idle {
            m.remove(&k);
            self.evicted.inc();
        }
    }

    fn forget_idle(&self, m: &mut HashMap<String, Arc<WorkerStats>>, now: u64) {
        let idle = self.idle_ms.load(Relaxed);
        let before = m.len();
        m.retain(|_, w| {
            w.connections.load(Relaxed) > 0 || now.saturating_sub(w.last_active_ms()) < idle
        });
        for _ in m.len()..before {
            self.evicted.inc();
        }
        self.swept_ms.store(now, Relaxed);
    }

    /// Forget names idle past the idle time (at most once a minute; called
    /// by readers, so no task is needed).
    fn sweep(&self) {
        let now = now_ms();
        if now.saturating_sub(self.swept_ms.load(Relaxed)) < 60_000 {
            return;
        }
        self.forget_idle(&mut self.lock(), now);
    }

    /// Names kept now.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether no name is kept.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Snapshots of every worker, sorted by name. The lock is held only to
    /// copy the handles; snapshots and the sort happen outside it.
    pub fn snapshot(&self) -> Vec<WorkerSnapshot> {
        self.sweep();
        let handles: Vec<Arc<WorkerStats>> = self.lock().values().cloned().collect();
        let mut v: Vec<_> = handles.iter().map(|w| w.snapshot()).collect();
        v.sort_unstable_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// Look up a worker without creating it.
    pub fn get(&self, name: &str) -> Option<Arc<WorkerStats>> {
        self.lock().get(name).cloned()
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pool's reject reasons cannot grow the map: long reasons are cut,
    /// and past the cap the rest count as "other".
    #[test]
    fn pool_reject_reasons_are_bounded() {
        let p = PoolStats::new("p");
        for i in 0..1000 {
            p.reject(&format!("{i}-{}", "x".repeat(10_000)));
        }
        p.reject("stale-share");
        let r = p.reasons();
        assert_eq!(r.len(), MAX_REJECT_REASONS);
        assert!(r.keys().all(|k| k.len() <= MAX_REASON_LEN), "{r:?}");
        assert_eq!(r[OTHER_REASON], 1001 - (MAX_REJECT_REASONS as u64 - 1));
        assert_eq!(p.rejected.get(), 1001);
    }

    /// 100,000 fresh names that connect and leave (the churn attack) leave
    /// the registry at its bound; connected names are never evicted.
    #[test]
    fn the_registry_is_bounded_and_keeps_connected_workers() {
        let r = Registry::new(1_000, std::time::Duration::from_secs(3600));
        let keep: Vec<_> = (0..10).map(|i| r.attach(&format!("honest.{i}"))).collect();
        for i in 0..100_000 {
            let w = r.attach(&format!("churn-{i}"));
            w.connections.fetch_sub(1, Relaxed);
        }
        assert!(r.len() <= 1_000, "{} names kept", r.len());
        assert!(r.evicted.get() >= 99_000, "{}", r.evicted.get());
        for (i, w) in keep.iter().enumerate() {
            let name = format!("honest.{i}");
            assert!(
                r.get(&name).is_some_and(|g| Arc::ptr_eq(&g, w)),
                "a connected worker was evicted"
            );
        }
        // Full of connected workers: a new name is served, not kept.
        let full = Registry::new(3, std::time::Duration::from_secs(3600));
        let _held: Vec<_> = (0..3).map(|i| full.attach(&format!("w{i}"))).collect();
        let extra = full.attach("w3");
        assert_eq!(full.len(), 3);
        assert_eq!(full.untracked.get(), 1);
        extra.accept(1.0);
        assert_eq!(extra.accepted.get(), 1);
    }

    #[test]
    fn idle_names_are_forgotten() {
        let r = Registry::new(1_000, std::time::Duration::ZERO);
        let w = r.attach("gone");
        w.connections.fetch_sub(1, Relaxed);
        let _live = r.attach("live");
        // Force the sweep (it runs at most once a minute).
        r.swept_ms.store(0, Relaxed);
        let names: Vec<_> = r.snapshot().into_iter().map(|s| s.name).collect();
        assert_eq!(names, vec!["live".to_string()]);
        assert_eq!(r.evicted.get(), 1);
    }

    #[test]
    fn tiny_difficulties_add_up() {
        let w = WorkerStats::default();
        for _ in 0..1000 {
            w.accept(2.384185791015625e-7); // 2^-22, a CPU miner's share
        }
        let want = 1000.0 * 2.384185791015625e-7;
        assert!(
            (w.difficulty_sum() - want).abs() < 1e-12,
            "{}",
            w.difficulty_sum()
        );
        let p = PoolStats::new("p");
        p.accept(1e-9);
        p.accept(f64::NAN);
        p.accept(-1.0);
        assert_eq!(p.difficulty_sum(), 1e-9);
    }
}
