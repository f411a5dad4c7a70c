//! Per-worker and per-pool counters. Atomics only: sessions and upstream
//! tasks update them without locks; the registry map is touched at
//! authorize time, never on the share path.

use serde::Serialize;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
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

/// A relaxed counter.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);
impl Counter {
    /// Add one.
    pub fn inc(&self) {
        self.0.fetch_add(1, Relaxed);
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
    /// Reject reasons the pool gave.
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
    /// Count an acknowledged share.
    pub fn accept(&self, difficulty: f64) {
        self.accepted.inc();
        self.diff_sum.add(difficulty);
    }
    /// Count a rejection with the pool's reason.
    pub fn reject(&self, reason: &str) {
        self.rejected.inc();
        *self
            .reasons
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(reason.to_string())
            .or_default() += 1;
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

/// Registry of worker stats by name.
#[derive(Debug, Default)]
pub struct Registry {
    workers: Mutex<HashMap<String, Arc<WorkerStats>>>,
}

impl Registry {
    /// The stats for a worker name, created on first use.
    pub fn worker(&self, name: &str) -> Arc<WorkerStats> {
        let mut m = self.workers.lock().unwrap_or_else(|e| e.into_inner());
        m.entry(name.to_string())
            .or_insert_with(|| {
                Arc::new(WorkerStats {
                    name: name.to_string(),
                    ..Default::default()
                })
            })
            .clone()
    }
    /// Snapshots of every worker, sorted by name.
    pub fn snapshot(&self) -> Vec<WorkerSnapshot> {
        let m = self.workers.lock().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<_> = m.values().map(|w| w.snapshot()).collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }
    /// Look up a worker without creating it.
    pub fn get(&self, name: &str) -> Option<Arc<WorkerStats>> {
        self.workers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
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
