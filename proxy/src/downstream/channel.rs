//! The protocol-neutral core of one miner channel, shared by SV1 sessions and
//! SV2 channels: local jobs derived from the assigned pool's [`PoolView`],
//! per-job targets, share validation with an honest [`RejectReason`], a
//! duplicate set, forwarding of shares that meet the pool's target as
//! [`UpShare`]s, vardiff and the measured-hashrate window, and the switch to
//! another pool when the router's assignment changes.
//!
//! The protocol layer owns the socket and the encoding: it feeds the core
//! wake-ups ([`ChannelCore::wake`] then [`ChannelCore::on_wake`]) and shares
//! ([`ChannelCore::check`]) and turns the returned [`Out`]s into
//! `mining.notify` / `mining.set_difficulty` or `NewMiningJob` /
//! `SetNewPrevHash` / `SetTarget`.
//!
//! A channel's extranonce is its proxy-wide miner part ([`SlotGuard`]); the
//! pool's own extranonce lives in the coinbase prefix and any padding in the
//! suffix, so a channel can change pools without the miner noticing more
//! than a clean job.

use super::Ctx;
use crate::error::DownstreamError;
use crate::router::{Assignment, Lease, MinerCell};
use crate::stats::{RejectReason, WorkerStats};
use crate::upstream::{PoolView, UpJob, UpShare};
use gridproxy_protocol::difficulty::{hash_difficulty, hashrate_from_shares, Target};
use gridproxy_protocol::extranonce::{ExtranonceError, Slot};
use gridproxy_protocol::share::{self, rolled_version};
use gridproxy_protocol::vardiff::{Vardiff, VardiffConfig};
use std::collections::{HashSet, VecDeque};
use std::hash::BuildHasherDefault;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tracing::{debug, info};

/// How often a channel reports its measured hashrate to the router.
const HASHRATE_WINDOW: Duration = Duration::from_secs(5);
/// Jobs kept per channel (older ones answer "stale").
pub const MAX_JOBS: usize = 8;
/// Duplicate-detection entries kept per job before its set is forgotten
/// (at most [`MAX_JOBS`] × this per channel).
const MAX_SEEN_PER_JOB: usize = 1 << 13;
/// Seconds a share's ntime may run ahead of the job's.
const NTIME_AHEAD: u32 = 7200;
/// Seconds a share's ntime may lag the job's.
const NTIME_BEHIND: u32 = 600;
/// After a channel-wide target got harder, shares meeting the previous target
/// are still accepted this long (they were in flight when the miner learned).
pub const RETARGET_GRACE: Duration = Duration::from_secs(5);

/// A miner part held by one channel; given back to the proxy on drop.
pub struct SlotGuard {
    ctx: Arc<Ctx>,
    slot: Slot,
}

impl SlotGuard {
    /// Take a free miner part.
    pub fn allocate(ctx: &Arc<Ctx>) -> Result<Self, ExtranonceError> {
        Ok(Self {
            slot: ctx.allocate_slot()?,
            ctx: ctx.clone(),
        })
    }

    /// The miner part (SV1 extranonce1, SV2 extranonce_prefix).
    pub fn prefix(&self) -> &[u8] {
        &self.slot.prefix
    }

    /// The slot's index (unique among live channels).
    pub fn index(&self) -> u64 {
        self.slot.index()
    }
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        self.ctx.release_slot(&self.slot);
    }
}

/// A worker's counters with this channel counted in `connections`; uncounted on drop.
pub struct WorkerGuard(Arc<WorkerStats>);

impl WorkerGuard {
    /// The stats for `name` (created on first use), counting one more connection.
    pub fn new(ctx: &Ctx, name: &str) -> Self {
        Self(ctx.registry.attach(name))
    }

    /// The counters.
    pub fn stats(&self) -> &Arc<WorkerStats> {
        &self.0
    }
}

impl Drop for WorkerGuard {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Relaxed);
    }
}

/// Submits-per-second guard (token bucket): a flood closes the connection.
#[derive(Debug, Clone)]
pub struct SubmitBucket {
    rate: f64,
    size: f64,
    tokens: f64,
    at: Instant,
}

impl SubmitBucket {
    /// Sustained `per_second`, bursts up to twice that (at least 10).
    pub fn new(per_second: u32) -> Self {
        let rate = per_second as f64;
        let size = (rate * 2.0).max(10.0);
        Self {
            rate,
            size,
            tokens: size,
            at: Instant::now(),
        }
    }

    /// Take one token; Err when the miner floods.
    pub fn take(&mut self) -> Result<(), DownstreamError> {
        if self.try_take() {
            Ok(())
        } else {
            Err(DownstreamError::SubmitFlood {
                per_second: self.rate,
            })
        }
    }

    /// Take one token if there is one.
    pub fn try_take(&mut self) -> bool {
        let now = Instant::now();
        self.tokens =
            (self.tokens + now.duration_since(self.at).as_secs_f64() * self.rate).min(self.size);
        self.at = now;
        if self.tokens < 1.0 {
            return false;
        }
        self.tokens -= 1.0;
        true
    }

    /// The sustained rate, per second.
    pub fn rate(&self) -> f64 {
        self.rate
    }
}

/// Reject-ratio guard: counts shares in windows of `limits.reject_window`
/// and ends the connection when a window's rejects exceed
/// `limits.max_reject_ratio` (a sender of junk shares costs a full check
/// each; an honest miner's stale shares after a block are a few per window).
#[derive(Debug, Clone)]
pub struct RejectGuard {
    window: u32,
    max_ratio: f64,
    seen: u32,
    rejected: u32,
}

impl RejectGuard {
    /// From the connection's limits.
    pub fn new(limits: &crate::config::Limits) -> Self {
        Self {
            window: limits.reject_window,
            max_ratio: limits.max_reject_ratio,
            seen: 0,
            rejected: 0,
        }
    }

    /// Count one answered share; Err when its window went over the ratio.
    pub fn record(&mut self, accepted: bool) -> Result<(), DownstreamError> {
        self.seen += 1;
        self.rejected += u32::from(!accepted);
        if self.seen < self.window {
            return Ok(());
        }
        let (seen, rejected) = (self.seen, self.rejected);
        self.seen = 0;
        self.rejected = 0;
        if self.max_ratio < 1.0 && rejected as f64 > self.max_ratio * seen as f64 {
            return Err(DownstreamError::RejectFlood {
                rejected,
                window: seen,
                max_ratio: self.max_ratio,
            });
        }
        Ok(())
    }
}

/// How the miner's extranonce is formed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExtranonceMode {
    /// The miner rolls `extranonce2_size` bytes after its miner part (SV1, SV2 extended).
    Rolled,
    /// The extranonce is the miner part followed by zeros; the proxy computes
    /// each job's merkle root (SV2 standard channels).
    Fixed,
}

/// What a difficulty change applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetScope {
    /// Each job keeps the target it was issued with; a change issues a new job
    /// (SV1: `mining.set_difficulty` then `mining.notify`).
    PerJob,
    /// A change applies to every live job at once (SV2 `SetTarget`); the
    /// previous, easier target stays valid for [`RETARGET_GRACE`].
    Channel,
}

/// How a channel is set up.
#[derive(Debug, Clone, Copy)]
pub struct ChannelSetup {
    /// Extranonce handling.
    pub extranonce: ExtranonceMode,
    /// Difficulty semantics.
    pub scope: TargetScope,
    /// First difficulty (rounded to a power of two within the floor and ceiling).
    pub initial_difficulty: f64,
    /// Floor for this channel, at least the configured one (a miner's
    /// `max_target` can only raise it).
    pub min_difficulty: f64,
    /// Version bits the miner may roll, before intersecting with what the pool allows.
    pub version_allowed: u32,
}

/// A job to announce to the miner.
#[derive(Debug, Clone)]
pub struct JobOut {
    /// Channel-local job id.
    pub id: u32,
    /// The pool's job it is derived from.
    pub up: Arc<UpJob>,
    /// Earlier jobs are void (new block, pool switch, first job).
    pub clean: bool,
    /// The job's difficulty.
    pub difficulty: f64,
    /// The job's target.
    pub target: Target,
    /// The pool's target its shares are forwarded at (the job's own, else
    /// the pool's current one when it was issued).
    pub up_target: Target,
    /// Version bits the miner may roll on it.
    pub version_mask: u32,
    /// Coinbase bytes after the miner's extranonce: zero padding ‖ the pool's suffix.
    pub coinbase_suffix: Vec<u8>,
    /// For [`ExtranonceMode::Fixed`] channels: the header's merkle root.
    pub merkle_root: Option<[u8; 32]>,
    /// When the pool's job arrived, if this is the channel's first sight of
    /// a new block's job: the session records the fan-out time when it
    /// writes it (`Ctx::fanout_seconds`).
    pub fanout_from: Option<std::time::Instant>,
}

/// What the protocol layer must tell the miner.
#[derive(Debug, Clone)]
pub enum Out {
    /// A new job.
    Job(JobOut),
    /// A new channel target ([`TargetScope::Channel`] only).
    Target {
        /// The difficulty.
        difficulty: f64,
        /// Its target.
        target: Target,
    },
}

/// What woke a channel (see [`ChannelCore::wake`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// The assigned pool's view changed.
    View,
    /// The router changed the assignment.
    Assignment,
    /// Vardiff / hashrate window is due.
    Tick,
}

/// One submitted share, protocol-neutral.
#[derive(Debug, Clone, Copy)]
pub struct Work<'a> {
    /// Channel-local job id.
    pub job_id: u32,
    /// The rolled extranonce bytes; None on [`ExtranonceMode::Fixed`] channels.
    pub extranonce2: Option<&'a [u8]>,
    /// Header time.
    pub ntime: u32,
    /// Header nonce.
    pub nonce: u32,
    /// Rolled version (bits or the whole version), if any.
    pub version_bits: Option<u32>,
}

/// A share the channel accepted.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Accepted {
    /// The difficulty it was credited at.
    pub difficulty: f64,
    /// It was forwarded to the pool.
    pub forwarded: bool,
}

struct LocalJob {
    id: u32,
    up: Arc<UpJob>,
    epoch: u64,
    target: Target,
    difficulty: f64,
    up_target: Target,
    rollable: u32,
    mask: u32,
    /// Boxed: only fixed-extranonce (SV2 standard) channels have one, and
    /// every miner keeps up to MAX_JOBS of these.
    merkle_root: Option<Box<[u8; 32]>>,
    submit: mpsc::Sender<UpShare>,
    /// Fingerprints of the shares accepted on this job: only live jobs can be
    /// submitted against, so the set goes with the job (memory stays bounded by
    /// the jobs kept, not by the channel's age).
    seen: HashSet<u64, BuildHasherDefault<Prehashed>>,
    /// The same fingerprints in arrival order: a full set forgets its
    /// oldest, never the whole set (which would let old shares be replayed).
    seen_order: VecDeque<u64>,
}

/// The fingerprints are already hashes: use them as they are.
#[derive(Default)]
struct Prehashed(u64);

impl std::hash::Hasher for Prehashed {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // Only u64 keys go in; fold anything else rather than panic.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// Duplicate fingerprint of (extranonce2, ntime, nonce, version) within a job.
/// Equal shares always collide (a duplicate is never missed); distinct shares
/// collide with probability 2^-64, and then only the sender's share is refused.
fn fingerprint(en2: &[u8], ntime: u32, nonce: u32, version: u32) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::hash::DefaultHasher::new();
    (en2, ntime, nonce, version).hash(&mut h);
    h.finish()
}

/// One miner channel's state (see the module docs).
pub struct ChannelCore {
    ctx: Arc<Ctx>,
    slot: SlotGuard,
    worker: WorkerGuard,
    lease: Lease,
    /// The router's assignment this channel last acted on.
    assigned: Assignment,
    setup: ChannelSetup,
    en2_size: usize,
    zero_en2: Vec<u8>,
    view: Option<(usize, watch::Receiver<PoolView>)>,
    jobs: VecDeque<LocalJob>,
    next_job: u32,
    vardiff: Vardiff,
    /// Previous (easier) channel target and its difficulty, valid until the instant.
    grace: Option<(Target, f64, Instant)>,
    /// Full upstream extranonce of the share being checked (reused, no per-share allocation).
    scratch: Vec<u8>,
    window: (f64, Instant),
    rejects: RejectGuard,
    /// When the last job was issued: a pool job newer than it is news this
    /// channel is being fanned out (an old job after a pool switch is not).
    last_issue: Option<std::time::Instant>,
}

impl ChannelCore {
    /// A channel for `worker` on miner part `slot`, registered with the router as `lease`.
    pub fn new(
        ctx: Arc<Ctx>,
        slot: SlotGuard,
        worker: WorkerGuard,
        lease: Lease,
        setup: ChannelSetup,
    ) -> Self {
        let cfg = ctx.cfg();
        let d = &cfg.difficulty;
        let vcfg = VardiffConfig {
            shares_per_minute: d.shares_per_minute,
            min_difficulty: setup.min_difficulty.max(d.min),
            max_difficulty: d.max,
            retarget_interval: Duration::from_secs(d.retarget_secs.max(1)),
            ..VardiffConfig::default()
        };
        let now = Instant::now();
        let en2_size = ctx.cfg().extranonce.extranonce2_size;
        Self {
            vardiff: Vardiff::new(vcfg, setup.initial_difficulty, now.into_std()),
            en2_size,
            zero_en2: vec![0; en2_size],
            slot,
            worker,
            lease,
            assigned: Assignment {
                pool: None,
                parked: false,
            },
            setup,
            view: None,
            jobs: VecDeque::new(),
            next_job: 1,
            grace: None,
            scratch: Vec::new(),
            window: (0.0, now),
            rejects: RejectGuard::new(&cfg.limits),
            last_issue: None,
            ctx,
        }
    }

    /// Count an answered share against the reject-ratio limit; Err (the
    /// connection ends) when too many were rejected.
    pub fn count_answer(&mut self, accepted: bool) -> Result<(), DownstreamError> {
        self.rejects.record(accepted).inspect_err(|_| {
            self.ctx.trips.reject_ratio.inc();
        })
    }

    /// The worker's counters.
    pub fn worker(&self) -> &Arc<WorkerStats> {
        self.worker.stats()
    }

    /// The channel's miner part.
    pub fn slot(&self) -> &SlotGuard {
        &self.slot
    }

    /// Current difficulty.
    pub fn difficulty(&self) -> f64 {
        self.vardiff.difficulty()
    }

    /// Current channel target.
    pub fn target(&self) -> Target {
        Target::from_difficulty(self.vardiff.difficulty())
    }

    /// Extranonce bytes the miner rolls (or that are fixed to zero).
    pub fn extranonce2_size(&self) -> usize {
        self.en2_size
    }

    /// Change which version bits the miner may roll (SV1 `mining.configure`);
    /// takes effect with the next job.
    pub fn set_version_allowed(&mut self, mask: u32) {
        self.setup.version_allowed = mask;
    }

    /// The pool this channel's jobs come from (None: no pool assigned).
    pub fn pool(&self) -> Option<usize> {
        self.view.as_ref().map(|(p, _)| *p)
    }

    /// Whether a job with this id is live on the channel.
    pub fn has_job(&self, id: u32) -> bool {
        self.jobs.iter().any(|j| j.id == id)
    }

    /// Give the newest job the id `id` (an SV2 group channel's jobs carry
    /// the group's ids, see `group.rs`); an older job with that id is
    /// dropped, so ids stay unique on the channel.
    pub fn relabel_last_job(&mut self, id: u32) {
        let Some(last) = self.jobs.len().checked_sub(1) else {
            return;
        };
        if self.jobs[last].id == id {
            return;
        }
        self.jobs.retain(|j| j.id != id);
        if let Some(j) = self.jobs.back_mut() {
            j.id = id;
        }
    }

    /// Start: the current job of the assigned pool, if one is live.
    pub fn start(&mut self) -> Option<Out> {
        self.on_assignment()
    }

    /// Wait for something that changes the channel. Cancel-safe. Err means the
    /// channel cannot go on (the proxy is shutting down its pool or router).
    pub async fn wake(&mut self) -> Result<Wake, DownstreamError> {
        self.wake_owned().await
    }

    /// [`Self::wake`] as a future owning clones of what it waits on, so a
    /// session can keep one such future across many shares instead of
    /// re-registering two watch waiters and a timer per loop turn. Build a new
    /// one after it fires and after anything that may move the deadline or
    /// change the pool (an early `Tick` is harmless: nothing is due yet).
    pub fn wake_owned(
        &self,
    ) -> impl std::future::Future<Output = Result<Wake, DownstreamError>> + Send {
        let at =
            Instant::from_std(self.vardiff.poll_timeout()).min(self.window.1 + HASHRATE_WINDOW);
        let mut view = self.view.clone();
        let cell = self.lease.cell.clone();
        let assigned = self.assigned;
        async move {
            tokio::select! {
                r = view_changed(&mut view) => match r {
                    Ok(()) => Ok(Wake::View),
                    Err(_) => Err(DownstreamError::UpstreamEnded),
                },
                _ = assignment_changed(&cell, assigned) => Ok(Wake::Assignment),
                _ = tokio::time::sleep_until(at) => Ok(Wake::Tick),
            }
        }
    }

    /// Act on a wake-up; returns what to tell the miner.
    pub fn on_wake(&mut self, w: Wake) -> Option<Out> {
        match w {
            Wake::View => self.on_view_change(),
            Wake::Assignment => self.on_assignment(),
            Wake::Tick => self.on_tick(),
        }
    }

    /// Force a difficulty (SV1 `mining.suggest_difficulty`, SV2 `UpdateChannel`).
    pub fn set_difficulty(&mut self, difficulty: f64) -> Option<Out> {
        let old = (self.target(), self.difficulty());
        self.vardiff.set(difficulty, Instant::now().into_std());
        self.difficulty_changed(old)
    }

    /// Replace the channel's floor and difficulty (SV2 `UpdateChannel` with a
    /// new `max_target`). A channel-scope channel always answers with its target.
    pub fn reconfigure(&mut self, difficulty: f64, min_difficulty: f64) -> Option<Out> {
        let cfg = self.ctx.cfg();
        let d = &cfg.difficulty;
        let old = (self.target(), self.difficulty());
        self.setup.min_difficulty = min_difficulty;
        let vcfg = VardiffConfig {
            shares_per_minute: d.shares_per_minute,
            min_difficulty: min_difficulty.max(d.min),
            max_difficulty: d.max,
            retarget_interval: Duration::from_secs(d.retarget_secs.max(1)),
            ..VardiffConfig::default()
        };
        self.vardiff = Vardiff::new(vcfg, difficulty, Instant::now().into_std());
        self.difficulty_changed(old)
    }

    fn difficulty_changed(&mut self, old: (Target, f64)) -> Option<Out> {
        match self.setup.scope {
            TargetScope::PerJob => {
                if self.jobs.is_empty() {
                    None
                } else {
                    self.issue_job(false).map(Out::Job)
                }
            }
            TargetScope::Channel => {
                let (target, difficulty) = (self.target(), self.difficulty());
                for j in self.jobs.iter_mut() {
                    j.target = target;
                    j.difficulty = difficulty;
                }
                if target < old.0 {
                    // Harder: shares found at the old target may already be on the wire.
                    let keep = match self.grace {
                        Some((t, _, until)) if until > Instant::now() && t > old.0 => self.grace,
                        _ => Some((old.0, old.1, Instant::now() + RETARGET_GRACE)),
                    };
                    self.grace = keep;
                } else if self.grace.is_some_and(|(t, _, _)| t <= target) {
                    self.grace = None;
                }
                Some(Out::Target { difficulty, target })
            }
        }
    }

    fn on_assignment(&mut self) -> Option<Out> {
        let a: Assignment = self.lease.cell.assignment();
        self.assigned = a;
        let current = self.view.as_ref().map(|(p, _)| *p);
        if a.pool != current {
            self.jobs.clear();
            self.view = a
                .pool
                .and_then(|p| Some((p, self.ctx.router.pools().get(p)?.view.clone())));
            if let Some(p) = a.pool {
                debug!(worker = %self.worker().name, pool = p, "miner assigned");
            }
        }
        if self.view.is_some() {
            self.issue_job(true).map(Out::Job)
        } else {
            None
        }
    }

    fn on_view_change(&mut self) -> Option<Out> {
        let (_, rx) = self.view.as_mut()?;
        let v = rx.borrow_and_update();
        let epoch_changed = self.jobs.back().is_some_and(|j| j.epoch != v.epoch);
        let same_job = match (&v.job, self.jobs.back()) {
            // A new pool target re-issues the job only where it applies to
            // it (a job with its own target keeps that).
            (Some(j), Some(l)) => {
                Arc::ptr_eq(j, &l.up) && l.up_target == j.target.unwrap_or(v.target)
            }
            _ => false,
        };
        drop(v);
        if epoch_changed {
            self.jobs.clear();
        }
        if same_job {
            None
        } else {
            self.issue_job(false).map(Out::Job)
        }
    }

    fn on_tick(&mut self) -> Option<Out> {
        let now = Instant::now();
        // Measured hashrate for the router's split.
        let secs = now.duration_since(self.window.1).as_secs_f64();
        if secs >= HASHRATE_WINDOW.as_secs_f64() {
            let h = hashrate_from_shares(self.window.0, secs);
            let old = f64::from_bits(self.lease.cell.hashrate.load(Relaxed));
            let new = if old > 0.0 { 0.5 * old + 0.5 * h } else { h };
            self.lease.cell.hashrate.store(new.to_bits(), Relaxed);
            self.window = (0.0, now);
        }
        let old = (self.target(), self.difficulty());
        self.vardiff.poll(now.into_std())?;
        self.difficulty_changed(old)
    }

    /// Record a new block's fan-out to this channel (call as its job is
    /// handed to the connection's writer).
    pub fn observe_fanout(&self, j: &JobOut) {
        if let Some(t) = j.fanout_from {
            self.ctx.fanout_seconds.observe(t.elapsed());
        }
    }

    /// Derive a local job from the assigned pool's current job (if live).
    fn issue_job(&mut self, force_clean: bool) -> Option<JobOut> {
        let (_, rx) = self.view.as_ref()?;
        let v = rx.borrow().clone();
        let up = v.job.clone()?;
        let miner_bytes = self.slot.prefix().len();
        if !v.live || v.rollable < miner_bytes + self.en2_size {
            return None;
        }
        let last = self.jobs.back();
        let new_tip =
            last.is_some_and(|l| l.up.prev_hash != up.prev_hash || l.up.nbits != up.nbits);
        // A clean upstream job voids earlier work once; re-issuing it (new difficulty,
        // new upstream target) keeps the miner's other jobs valid.
        let fresh = last.is_none_or(|l| !Arc::ptr_eq(&l.up, &up));
        let clean = force_clean || (up.clean && fresh) || self.jobs.is_empty() || new_tip;
        if clean {
            self.jobs.clear();
        }
        let difficulty = self.vardiff.difficulty();
        let mask = self.setup.version_allowed & up.version_mask;
        let id = self.next_job;
        self.next_job = self.next_job.wrapping_add(1).max(1);
        let pad = v.rollable - miner_bytes - self.en2_size;
        let mut coinbase_suffix = vec![0u8; pad];
        coinbase_suffix.extend_from_slice(&up.coinbase_suffix);
        let merkle_root = (self.setup.extranonce == ExtranonceMode::Fixed).then(|| {
            let mut extranonce = Vec::with_capacity(v.rollable);
            extranonce.extend_from_slice(self.slot.prefix());
            extranonce.resize(v.rollable, 0);
            share::merkle_root(
                &[&up.coinbase_prefix, &extranonce, &up.coinbase_suffix],
                &up.merkle_branch,
            )
        });
        if self.jobs.len() == MAX_JOBS {
            self.jobs.pop_front();
        }
        let target = Target::from_difficulty(difficulty);
        // Judged as the pool judges this job's shares.
        let up_target = up.target.unwrap_or(v.target);
        self.jobs.push_back(LocalJob {
            id,
            up: up.clone(),
            epoch: v.epoch,
            target,
            difficulty,
            up_target,
            rollable: v.rollable as u32,
            mask,
            merkle_root: merkle_root.map(Box::new),
            submit: v.submit.clone(),
            seen: HashSet::default(),
            seen_order: VecDeque::new(),
        });
        let news = self.last_issue.is_some_and(|t| v.published > t);
        let fanout_from = (news && fresh && (up.clean || new_tip)).then_some(v.published);
        self.last_issue = Some(std::time::Instant::now());
        Some(JobOut {
            id,
            up,
            clean,
            difficulty,
            target,
            up_target,
            version_mask: mask,
            coinbase_suffix,
            merkle_root,
            fanout_from,
        })
    }

    /// Validate a share; Ok means the miner is told "accepted". Counts the
    /// worker's accepted shares (rejections are counted by the caller, which
    /// also rejects shares that never reach a channel).
    pub fn check(&mut self, s: &Work<'_>) -> Result<Accepted, RejectReason> {
        let ji = self
            .jobs
            .iter()
            .position(|j| j.id == s.job_id)
            .ok_or(RejectReason::StaleJob)?;
        let job = &self.jobs[ji];
        let en2 = match (self.setup.extranonce, s.extranonce2) {
            (ExtranonceMode::Fixed, _) => &self.zero_en2[..],
            (ExtranonceMode::Rolled, Some(e)) => e,
            (ExtranonceMode::Rolled, None) => return Err(RejectReason::Invalid),
        };
        if en2.len() != self.en2_size {
            return Err(RejectReason::Invalid);
        }
        if s.ntime.wrapping_sub(job.up.ntime) > NTIME_AHEAD
            && job.up.ntime.wrapping_sub(s.ntime) > NTIME_BEHIND
        {
            return Err(RejectReason::Invalid);
        }
        let version = rolled_version(job.up.version, s.version_bits, job.mask)
            .map_err(|_| RejectReason::Invalid)?;
        let key = fingerprint(en2, s.ntime, s.nonce, version);
        if job.seen.contains(&key) {
            return Err(RejectReason::Duplicate);
        }
        // Full upstream extranonce: miner part ‖ extranonce2 ‖ zero padding.
        let extranonce = &mut self.scratch;
        extranonce.clear();
        extranonce.extend_from_slice(self.slot.prefix());
        extranonce.extend_from_slice(en2);
        extranonce.resize(job.rollable as usize, 0);
        let root = match &job.merkle_root {
            Some(r) => **r,
            None => share::merkle_root(
                &[&job.up.coinbase_prefix, extranonce, &job.up.coinbase_suffix],
                &job.up.merkle_branch,
            ),
        };
        let hash = share::sha256d(&share::header(
            version,
            &job.up.prev_hash,
            &root,
            s.ntime,
            job.up.nbits,
            s.nonce,
        ));
        let check = share::check(&hash, &job.target, &job.up_target, job.up.nbits);
        let now = Instant::now();
        let grace = self.grace.filter(|(_, _, until)| *until > now);
        let credited = if check.meets_miner {
            job.difficulty
        } else {
            match grace {
                Some((t, d, _)) if t.is_met_by(&hash) => d,
                _ => {
                    // Honest miners miss only by racing a difficulty change: the share then
                    // meets an easier target this miner still has a job for.
                    let easiest = self
                        .jobs
                        .iter()
                        .map(|j| j.target)
                        .chain(self.grace.map(|g| g.0))
                        .max()
                        .unwrap_or(job.target);
                    return Err(if easiest.is_met_by(&hash) {
                        RejectReason::LowDifficulty
                    } else {
                        RejectReason::BadNonce
                    });
                }
            }
        };
        let j = &mut self.jobs[ji];
        if j.seen.len() >= MAX_SEEN_PER_JOB {
            if let Some(old) = j.seen_order.pop_front() {
                j.seen.remove(&old);
            }
        }
        if j.seen.insert(key) {
            j.seen_order.push_back(key);
        }
        let job = &self.jobs[ji];
        let worker = self.worker.stats().clone();
        worker.accept(credited);
        self.window.0 += credited;
        if check.meets_miner {
            self.vardiff.on_share();
        }
        let mut forwarded = false;
        if check.meets_upstream {
            let share = UpShare {
                job_id: job.up.id.clone(),
                extranonce: self.scratch.clone(),
                ntime: s.ntime,
                nonce: s.nonce,
                version,
                difficulty: job.up_target.to_difficulty().min(hash_difficulty(&hash)),
                worker: worker.clone(),
                epoch: job.epoch,
            };
            match job.submit.try_send(share) {
                Ok(()) => {
                    worker.forwarded.inc();
                    forwarded = true;
                }
                Err(_) => debug!(worker = %worker.name, "upstream queue full; share not forwarded"),
            }
        }
        if check.meets_network {
            info!(worker = %worker.name, hash = %share::display_hex(&hash), "block found");
        }
        Ok(Accepted {
            difficulty: credited,
            forwarded,
        })
    }
}

/// Resolves once the router's assignment differs from `acted_on`.
async fn assignment_changed(cell: &MinerCell, acted_on: Assignment) {
    while cell.assignment() == acted_on {
        cell.changed().await;
    }
}

async fn view_changed(
    view: &mut Option<(usize, watch::Receiver<PoolView>)>,
) -> Result<(), watch::error::RecvError> {
    match view {
        // A pool whose task ended (removed by a reload) sends nothing more:
        // the router's new assignment is what moves the miner on.
        Some((_, rx)) => match rx.changed().await {
            Ok(()) => Ok(()),
            Err(_) => std::future::pending().await,
        },
        None => std::future::pending().await,
    }
}

/// The difficulty at which a miner of `hashrate` H/s finds `shares_per_minute`
/// shares, rounded down to a power of two, never below `floor` (itself rounded
/// up to a power of two).
pub fn difficulty_for_hashrate(hashrate: f64, shares_per_minute: f64, floor: f64) -> f64 {
    let raw = hashrate * 60.0 / (shares_per_minute * 4_294_967_296.0);
    gridproxy_protocol::difficulty::round_pow2(raw, floor)
}

/// The smallest power-of-two difficulty whose target is at or below `max_target`.
pub fn difficulty_floor_for_target(max_target: Target) -> f64 {
    let d = max_target.to_difficulty();
    if !(d.is_finite() && d > 0.0) {
        return f64::MAX;
    }
    let mut p = 2f64.powi(d.log2().ceil() as i32);
    // Float error in to_difficulty: step up until the target really fits.
    while Target::from_difficulty(p) > max_target && p < f64::MAX / 2.0 {
        p *= 2.0;
    }
    p
}

/// Cut a worker name to `max` bytes at a char boundary.
pub fn truncate(s: &str, max: usize) -> String {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashrate_difficulty_is_a_power_of_two_with_floor() {
        // 2^32 H/s at 60 shares/min = difficulty 1.
        assert_eq!(difficulty_for_hashrate(4_294_967_296.0, 60.0, 1e-9), 1.0);
        assert_eq!(
            difficulty_for_hashrate(3.0 * 4_294_967_296.0, 60.0, 1e-9),
            2.0
        );
        assert_eq!(difficulty_for_hashrate(1.0, 60.0, 0.5), 0.5);
        assert_eq!(difficulty_for_hashrate(f64::NAN, 60.0, 0.25), 0.25);
    }

    #[test]
    fn max_target_floor_fits() {
        assert_eq!(difficulty_floor_for_target(Target::MAX), 2f64.powi(-32));
        let t = Target::from_difficulty(3.0);
        let d = difficulty_floor_for_target(t);
        assert_eq!(d, 4.0);
        assert!(Target::from_difficulty(d) <= t);
        let t = Target::from_difficulty(4.0);
        assert_eq!(difficulty_floor_for_target(t), 4.0);
    }

    #[test]
    fn truncate_keeps_char_boundaries() {
        assert_eq!(truncate("héllo", 2), "h");
        assert_eq!(truncate("abc", 10), "abc");
    }

    use crate::config::ProxyConfig;
    use crate::router::Router;
    use crate::stats::{PoolStats, Registry};
    use crate::upstream::{self, PoolHandle, UpJobId};
    use tokio_util::sync::CancellationToken;

    const BIP320: u32 = 0x1fff_e000;

    struct Fixture {
        ctx: Arc<Ctx>,
        _view: watch::Sender<PoolView>,
        shares: mpsc::Receiver<UpShare>,
    }

    fn up_job() -> UpJob {
        UpJob {
            sv1_notify: Default::default(),
            id: UpJobId::Sv1("j1".into()),
            version: 0x2000_0000,
            version_mask: BIP320,
            prev_hash: [1; 32],
            nbits: 0x1d00_ffff,
            ntime: 1_700_000_000,
            coinbase_prefix: vec![0xaa; 40],
            coinbase_suffix: vec![0xbb; 30],
            merkle_branch: vec![[3; 32], [4; 32]],
            clean: true,
            target: None,
        }
    }

    /// A proxy context with one live pool (8 rollable bytes, upstream target MAX).
    fn fixture() -> Fixture {
        let cfg = ProxyConfig::from_toml(
            "[[pools]]\nname='a'\naddress='127.0.0.1:1'\nprotocol='sv1'\nuser='u'\n\
             [difficulty]\ninitial=0.000000001\nmin=0.000000001\n",
        )
        .unwrap();
        let (vtx, vrx, shares) = upstream::channels();
        vtx.send_modify(|v| {
            v.live = true;
            v.epoch = 1;
            v.job = Some(Arc::new(up_job()));
            v.rollable = 8;
        });
        let handle = PoolHandle {
            index: 0,
            stats: Arc::new(PoolStats::new("a")),
            view: vrx,
        };
        let router = Router::new(&cfg, vec![handle]);
        router.reevaluate();
        let ctx = Ctx::new(
            Arc::new(cfg),
            Arc::new(Registry::default()),
            router,
            CancellationToken::new(),
            tokio_util::task::TaskTracker::new(),
        );
        Fixture {
            ctx,
            _view: vtx,
            shares,
        }
    }

    fn core(f: &Fixture, extranonce: ExtranonceMode, scope: TargetScope) -> ChannelCore {
        let slot = SlotGuard::allocate(&f.ctx).unwrap();
        let worker = WorkerGuard::new(&f.ctx, "w");
        let lease = f.ctx.router.register("w");
        let setup = ChannelSetup {
            extranonce,
            scope,
            initial_difficulty: 1e-9,
            min_difficulty: 1e-9,
            version_allowed: u32::MAX,
        };
        ChannelCore::new(f.ctx.clone(), slot, worker, lease, setup)
    }

    fn job(o: Option<Out>) -> JobOut {
        match o {
            Some(Out::Job(j)) => j,
            other => panic!("expected a job, got {other:?}"),
        }
    }

    /// Header hash for `nonce` on `j` with merkle root `root`.
    fn hash(j: &JobOut, root: &[u8; 32], nonce: u32) -> [u8; 32] {
        share::sha256d(&share::header(
            j.up.version,
            &j.up.prev_hash,
            root,
            j.up.ntime,
            j.up.nbits,
            nonce,
        ))
    }

    /// A nonce whose hash meets `t` but not `harder` (if given).
    fn nonce_between(j: &JobOut, root: &[u8; 32], t: Target, harder: Option<Target>) -> u32 {
        (0..u32::MAX)
            .find(|n| {
                let h = hash(j, root, *n);
                t.is_met_by(&h) && !harder.is_some_and(|x| x.is_met_by(&h))
            })
            .unwrap()
    }

    fn work<'a>(j: &JobOut, nonce: u32, en2: Option<&'a [u8]>) -> Work<'a> {
        Work {
            job_id: j.id,
            extranonce2: en2,
            ntime: j.up.ntime,
            nonce,
            version_bits: Some(j.up.version),
        }
    }

    #[tokio::test]
    async fn a_new_block_is_timed_from_its_arrival_once_per_channel() {
        let f = fixture();
        let mut c = core(&f, ExtranonceMode::Rolled, TargetScope::PerJob);
        // The first job of a channel is not a fan-out (the pool's job is old news).
        let first = job(c.start());
        assert!(first.fanout_from.is_none());
        assert_eq!(f.ctx.fanout_seconds.snapshot().1, 0);
        // A new block arrives from the pool.
        let arrived = std::time::Instant::now();
        f._view.send_modify(|v| {
            let mut j = up_job();
            j.prev_hash = [2; 32];
            v.job = Some(Arc::new(j));
            v.published = std::time::Instant::now();
        });
        let next = job(c.on_wake(Wake::View));
        let from = next.fanout_from.expect("a new block is timed");
        assert!(next.clean && from >= arrived);
        c.observe_fanout(&next);
        let (buckets, count, _) = f.ctx.fanout_seconds.snapshot();
        assert_eq!(count, 1);
        assert_eq!(buckets.last().unwrap().1, 1, "well under 10 s");
        // The same job again (a view change with nothing new) is not timed again.
        if let Some(Out::Job(again)) = c.on_wake(Wake::View) {
            assert!(again.fanout_from.is_none());
        }
    }

    #[tokio::test]
    async fn fixed_extranonce_jobs_validate_and_forward() {
        let mut f = fixture();
        let mut c = core(&f, ExtranonceMode::Fixed, TargetScope::Channel);
        let j = job(c.start());
        assert!(j.clean);
        // Coinbase suffix: 8 rollable − 3 miner bytes − 4 extranonce2 = 1 byte of padding.
        assert_eq!(j.coinbase_suffix.len(), 1 + 30);
        let mut en = c.slot().prefix().to_vec();
        en.resize(8, 0);
        let root = share::merkle_root(
            &[&j.up.coinbase_prefix, &en, &j.up.coinbase_suffix],
            &j.up.merkle_branch,
        );
        assert_eq!(j.merkle_root, Some(root));
        let t = j.target;
        let good = nonce_between(&j, &root, t, None);
        let a = c.check(&work(&j, good, None)).unwrap();
        assert!(a.forwarded);
        let up = f.shares.try_recv().unwrap();
        assert_eq!(up.extranonce, en);
        assert_eq!(c.check(&work(&j, good, None)), Err(RejectReason::Duplicate));
        let bad = (0..u32::MAX)
            .find(|n| !t.is_met_by(&hash(&j, &root, *n)))
            .unwrap();
        assert_eq!(c.check(&work(&j, bad, None)), Err(RejectReason::BadNonce));
        let mut stale = work(&j, good, None);
        stale.job_id += 100;
        assert_eq!(c.check(&stale), Err(RejectReason::StaleJob));
        let mut rolled_too_far = work(&j, good, None);
        rolled_too_far.version_bits = Some(j.up.version | 0x4);
        assert_eq!(c.check(&rolled_too_far), Err(RejectReason::Invalid));
        assert_eq!(c.worker().accepted.get(), 1);
    }

    /// A pool that fixes a target per job (SV2, as pool_sv2 does) judges the
    /// job's shares by it even after its SetTarget moved the channel's
    /// target: forwarding follows the job's target, and a new pool target
    /// alone does not re-issue the job.
    #[tokio::test]
    async fn shares_are_forwarded_by_their_jobs_own_pool_target() {
        let mut f = fixture();
        let job_target = Target::from_difficulty(1.0 / 65536.0);
        f._view.send_modify(|v| {
            v.job = Some(Arc::new(UpJob {
                target: Some(job_target),
                ..up_job()
            }));
            // The channel's target now: easier than the job's.
            v.target = Target::MAX;
        });
        let mut c = core(&f, ExtranonceMode::Fixed, TargetScope::Channel);
        let j = job(c.start());
        let root = j.merkle_root.unwrap();
        // Meets the miner's target, not the job's: credited, not forwarded.
        let easy = nonce_between(&j, &root, j.target, Some(job_target));
        let a = c.check(&work(&j, easy, None)).unwrap();
        assert!(
            !a.forwarded,
            "judged by the pool's current target, not the job's"
        );
        // The pool's target moves again: the same job is not re-issued.
        f._view
            .send_modify(|v| v.target = Target::from_difficulty(1e-12));
        assert!(
            c.on_wake(Wake::View).is_none(),
            "re-issued for a target that does not apply"
        );
        let hard = nonce_between(&j, &root, job_target, None);
        assert!(c.check(&work(&j, hard, None)).unwrap().forwarded);
        let up = f.shares.try_recv().unwrap();
        assert!(job_target.is_met_by(&hash(&j, &root, up.nonce)));
        assert!(
            f.shares.try_recv().is_err(),
            "only the share that meets the job's target"
        );
    }

    /// A job's duplicate set, once full, forgets its oldest share only: a
    /// recent share stays a duplicate (it used to be cleared wholesale, so
    /// any share could be replayed and credited again).
    #[tokio::test]
    async fn the_duplicate_set_forgets_oldest_first() {
        let mut f = fixture();
        let mut c = core(&f, ExtranonceMode::Fixed, TargetScope::Channel);
        let j = job(c.start());
        let mut en = c.slot().prefix().to_vec();
        en.resize(8, 0);
        let root = share::merkle_root(
            &[&j.up.coinbase_prefix, &en, &j.up.coinbase_suffix],
            &j.up.merkle_branch,
        );
        let t = j.target;
        let nonces: Vec<u32> = (0..u32::MAX)
            .filter(|n| t.is_met_by(&hash(&j, &root, *n)))
            .take(MAX_SEEN_PER_JOB + 1)
            .collect();
        for &n in &nonces {
            assert!(c.check(&work(&j, n, None)).is_ok());
            while f.shares.try_recv().is_ok() {}
        }
        // The first share was the oldest: forgotten when the set filled.
        // The second and the last are still known.
        assert_eq!(
            c.check(&work(&j, nonces[1], None)),
            Err(RejectReason::Duplicate)
        );
        assert_eq!(
            c.check(&work(&j, nonces[MAX_SEEN_PER_JOB], None)),
            Err(RejectReason::Duplicate)
        );
        assert!(c.check(&work(&j, nonces[0], None)).is_ok());
    }

    /// A grouped SV2 channel's job carries the group's id: after the
    /// relabel, shares name that id and the core's own is unknown.
    #[tokio::test]
    async fn a_relabelled_job_answers_to_its_new_id_only() {
        let mut f = fixture();
        let mut c = core(&f, ExtranonceMode::Fixed, TargetScope::Channel);
        let j = job(c.start());
        assert_eq!(c.pool(), Some(0));
        assert!(c.has_job(j.id));
        c.relabel_last_job(500);
        assert!(c.has_job(500) && !c.has_job(j.id));
        let root = j.merkle_root.unwrap();
        let n = nonce_between(&j, &root, j.target, None);
        assert_eq!(c.check(&work(&j, n, None)), Err(RejectReason::StaleJob));
        let mut w = work(&j, n, None);
        w.job_id = 500;
        assert!(c.check(&w).unwrap().forwarded);
        assert!(f.shares.try_recv().is_ok());
    }

    #[tokio::test]
    async fn rolled_extranonce_needs_the_right_size() {
        let f = fixture();
        let mut c = core(&f, ExtranonceMode::Rolled, TargetScope::PerJob);
        let j = job(c.start());
        assert_eq!(j.merkle_root, None);
        let en2 = [9u8, 8, 7, 6];
        let mut en = c.slot().prefix().to_vec();
        en.extend_from_slice(&en2);
        let root = share::merkle_root(
            &[&j.up.coinbase_prefix, &en, &j.coinbase_suffix],
            &j.up.merkle_branch,
        );
        let good = nonce_between(&j, &root, j.target, None);
        assert_eq!(
            c.check(&work(&j, good, Some(&en2[..3]))),
            Err(RejectReason::Invalid)
        );
        assert_eq!(c.check(&work(&j, good, None)), Err(RejectReason::Invalid));
        assert!(c.check(&work(&j, good, Some(&en2))).is_ok());
    }

    #[tokio::test]
    async fn channel_retarget_keeps_the_old_target_for_a_grace_period() {
        let f = fixture();
        let mut c = core(&f, ExtranonceMode::Fixed, TargetScope::Channel);
        let j = job(c.start());
        let root = j.merkle_root.unwrap();
        let easy = j.target;
        match c.set_difficulty(2f64.powi(-26)) {
            Some(Out::Target { target, difficulty }) => {
                assert_eq!(difficulty, 2f64.powi(-26));
                assert_eq!(target, Target::from_difficulty(difficulty));
            }
            other => panic!("expected a target, got {other:?}"),
        }
        let hard = c.target();
        let in_flight = nonce_between(&j, &root, easy, Some(hard));
        let a = c.check(&work(&j, in_flight, None)).unwrap();
        assert_eq!(
            a.difficulty,
            2f64.powi(-29),
            "credited at the target it met"
        );
        // The grace period ends.
        c.grace = c.grace.map(|(t, d, _)| (t, d, Instant::now()));
        let late = (in_flight + 1..u32::MAX)
            .find(|n| {
                let h = hash(&j, &root, *n);
                easy.is_met_by(&h) && !hard.is_met_by(&h)
            })
            .unwrap();
        assert_eq!(
            c.check(&work(&j, late, None)),
            Err(RejectReason::LowDifficulty)
        );
        let ok = (late + 1..u32::MAX)
            .find(|n| hard.is_met_by(&hash(&j, &root, *n)))
            .unwrap();
        assert_eq!(
            c.check(&work(&j, ok, None)).unwrap().difficulty,
            2f64.powi(-26)
        );
    }

    #[tokio::test]
    async fn per_job_retarget_issues_a_job_and_old_jobs_keep_their_target() {
        let f = fixture();
        let mut c = core(&f, ExtranonceMode::Fixed, TargetScope::PerJob);
        let j1 = job(c.start());
        let j2 = job(c.set_difficulty(2f64.powi(-26)));
        assert!(!j2.clean);
        assert_eq!(j2.difficulty, 2f64.powi(-26));
        let root = j1.merkle_root.unwrap();
        let n = nonce_between(&j1, &root, j1.target, Some(j2.target));
        assert_eq!(
            c.check(&work(&j1, n, None)).unwrap().difficulty,
            2f64.powi(-29)
        );
        // The same work on the new job misses its target, but meets an easier one it had.
        assert_eq!(
            c.check(&work(&j2, n, None)),
            Err(RejectReason::LowDifficulty)
        );
    }

    #[tokio::test]
    async fn slots_and_worker_connections_are_released_on_drop() {
        let f = fixture();
        let c = core(&f, ExtranonceMode::Rolled, TargetScope::PerJob);
        let w = c.worker().clone();
        assert_eq!((f.ctx.slots_in_use(), w.connections.load(Relaxed)), (1, 1));
        drop(c);
        assert_eq!((f.ctx.slots_in_use(), w.connections.load(Relaxed)), (0, 0));
    }

    #[tokio::test]
    async fn bucket_refuses_a_flood() {
        let mut b = SubmitBucket::new(5);
        for _ in 0..10 {
            b.take().unwrap();
        }
        assert!(b.take().is_err());
    }
}
