//! One SV1 miner connection: subscribe/authorize/configure, jobs derived from
//! the assigned pool's current job, local share validation with an honest
//! answer, forwarding of shares that meet the pool's target, vardiff.
//!
//! The miner's extranonce1 is its proxy-wide miner part only; the pool's own
//! extranonce (SV2 channel prefix / SV1 extranonce1) lives in coinb1 and any
//! padding in coinb2. That is what lets a miner change pools — failover,
//! split, reroute — without reconnecting: its extranonce1 never changes.

use super::Ctx;
use crate::router::{Assignment, Lease};
use crate::stats::{RejectReason, WorkerStats};
use crate::upstream::{PoolView, UpJob, UpShare};
use bytes::BytesMut;
use gridproxy_protocol::difficulty::{hash_difficulty, Target};
use gridproxy_protocol::extranonce::Slot;
use gridproxy_protocol::share::{self, prevhash_to_sv1, rolled_version};
use gridproxy_protocol::sv1::{self, encode, ClientMethod, LineCodec, Notify, Submit, Sv1Error};
use gridproxy_protocol::vardiff::{Vardiff, VardiffConfig};
use serde_json::Value;
use std::collections::{HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tracing::{debug, info};

/// Jobs kept per miner (older ones answer "stale").
const MAX_JOBS: usize = 8;
/// Duplicate-detection entries kept per miner before the oldest jobs are forgotten.
const MAX_SEEN: usize = 1 << 16;
/// Seconds a share's ntime may run ahead of the job's.
const NTIME_AHEAD: u32 = 7200;

struct LocalJob {
    id: u32,
    up: Arc<UpJob>,
    epoch: u64,
    target: Target,
    difficulty: f64,
    up_target: Target,
    rollable: usize,
    mask: u32,
    submit: mpsc::Sender<UpShare>,
}

/// Why a session ended (logged).
#[derive(Debug)]
enum Close {
    Eof,
    Shutdown,
    Reason(String),
}

struct Session {
    ctx: Arc<Ctx>,
    peer: SocketAddr,
    slot: Option<Slot>,
    en2_size: usize,
    miner_bytes: usize,
    granted_mask: Option<u32>,
    sent_mask: Option<u32>,
    worker: Option<Arc<WorkerStats>>,
    lease: Option<Lease>,
    view: Option<(usize, watch::Receiver<PoolView>)>,
    jobs: VecDeque<LocalJob>,
    next_job: u32,
    vardiff: Vardiff,
    difficulty_sent: Option<f64>,
    seen: HashSet<(u32, u64, u32, u32, u32)>,
    out: String,
    tokens: f64,
    tokens_at: Instant,
    window: (f64, Instant),
}

impl Drop for Session {
    fn drop(&mut self) {
        if let Some(slot) = self.slot.take() {
            self.ctx.release_slot(&slot);
        }
        if let Some(w) = &self.worker {
            w.connections.fetch_sub(1, Relaxed);
        }
    }
}

/// Serve one SV1 connection until it closes.
pub async fn serve(ctx: Arc<Ctx>, stream: TcpStream, peer: SocketAddr) {
    let _ = stream.set_nodelay(true);
    let d = &ctx.cfg.difficulty;
    let vcfg = VardiffConfig {
        shares_per_minute: d.shares_per_minute,
        min_difficulty: d.min,
        max_difficulty: d.max,
        retarget_interval: Duration::from_secs(d.retarget_secs.max(1)),
        ..VardiffConfig::default()
    };
    let now = Instant::now();
    let mut s = Session {
        en2_size: ctx.cfg.extranonce.extranonce2_size,
        miner_bytes: ctx.cfg.extranonce.miner_bytes,
        vardiff: Vardiff::new(vcfg, d.initial, now.into_std()),
        ctx,
        peer,
        slot: None,
        granted_mask: None,
        sent_mask: None,
        worker: None,
        lease: None,
        view: None,
        jobs: VecDeque::new(),
        next_job: 1,
        difficulty_sent: None,
        seen: HashSet::new(),
        out: String::new(),
        tokens: 0.0,
        tokens_at: now,
        window: (0.0, now),
    };
    s.tokens = s.bucket_size();
    let end = s.run(stream).await;
    match &end {
        Close::Reason(r) => {
            info!(peer = %s.peer, worker = s.worker_name(), reason = %r, "miner disconnected")
        }
        other => debug!(peer = %s.peer, worker = s.worker_name(), ?other, "miner disconnected"),
    }
}

impl Session {
    fn worker_name(&self) -> &str {
        self.worker.as_ref().map(|w| w.name.as_str()).unwrap_or("-")
    }

    fn bucket_size(&self) -> f64 {
        (self.ctx.cfg.limits.submits_per_second as f64 * 2.0).max(10.0)
    }

    async fn run(&mut self, stream: TcpStream) -> Close {
        let (mut rd, mut wr) = stream.into_split();
        let limits = self.ctx.cfg.limits.clone();
        let mut codec = LineCodec::new(limits.max_line);
        let mut buf = BytesMut::with_capacity(1024);
        let handshake_deadline = Instant::now() + limits.handshake_timeout();
        let mut idle_deadline = Instant::now() + limits.idle_timeout();
        let shutdown = self.ctx.shutdown.clone();
        loop {
            let ready = self.lease.is_some() && self.slot.is_some();
            let vardiff_at = Instant::from_std(self.vardiff.poll_timeout());
            tokio::select! {
                _ = shutdown.cancelled() => return Close::Shutdown,
                r = rd.read_buf(&mut buf) => {
                    match r {
                        Ok(0) => return Close::Eof,
                        Err(e) => return Close::Reason(format!("read: {e}")),
                        Ok(_) => {}
                    }
                    idle_deadline = Instant::now() + limits.idle_timeout();
                    loop {
                        match codec.next_line(&mut buf) {
                            Ok(Some(line)) => {
                                if let Err(why) = self.on_line(&line) {
                                    let _ = self.flush(&mut wr).await;
                                    return Close::Reason(why);
                                }
                            }
                            Ok(None) => break,
                            Err(e) => {
                                let _ = self.flush(&mut wr).await;
                                return Close::Reason(format!("{e}"));
                            }
                        }
                    }
                }
                r = changed(&mut self.view), if ready => {
                    if r.is_err() { return Close::Reason("upstream task ended".into()); }
                    self.on_view_change();
                }
                r = assignment_changed(&mut self.lease), if ready => {
                    if r.is_err() { return Close::Reason("router dropped the miner".into()); }
                    self.on_assignment();
                }
                _ = tokio::time::sleep_until(vardiff_at), if ready => {
                    self.on_vardiff_tick();
                }
                _ = tokio::time::sleep_until(handshake_deadline), if !ready => {
                    return Close::Reason(format!("not subscribed and authorized within {:?}", limits.handshake_timeout()));
                }
                _ = tokio::time::sleep_until(idle_deadline) => {
                    return Close::Reason(format!("idle for {:?}", limits.idle_timeout()));
                }
            }
            if let Err(e) = self.flush(&mut wr).await {
                return Close::Reason(e);
            }
        }
    }

    async fn flush(&mut self, wr: &mut tokio::net::tcp::OwnedWriteHalf) -> Result<(), String> {
        if self.out.is_empty() {
            return Ok(());
        }
        let r =
            tokio::time::timeout(Duration::from_secs(10), wr.write_all(self.out.as_bytes())).await;
        self.out.clear();
        match r {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(format!("write: {e}")),
            Err(_) => Err("miner does not read (write timed out)".into()),
        }
    }

    /// Handle one line; Err closes the connection with that reason.
    fn on_line(&mut self, line: &[u8]) -> Result<(), String> {
        let req = match sv1::parse_client(line) {
            Ok(r) => r,
            Err(e) => {
                return match (&e, e.request_id()) {
                    // A well-formed request we cannot serve: answer and carry on.
                    (Sv1Error::UnknownMethod { .. } | Sv1Error::BadParams { .. }, Some(id)) => {
                        self.out.push_str(&encode::error(id, 20, &e.to_string()));
                        debug!(peer = %self.peer, error = %e, "bad request answered");
                        Ok(())
                    }
                    _ => Err(format!("malformed input: {e}")),
                };
            }
        };
        let id = req.id;
        match req.method {
            ClientMethod::Configure(c) => {
                let wants = c.extensions.iter().any(|e| e == "version-rolling");
                let mask = wants.then(|| {
                    c.version_rolling_mask.unwrap_or(u32::MAX) & crate::upstream::sv2::BIP320_MASK
                });
                self.granted_mask = mask;
                self.sent_mask = mask;
                self.out.push_str(&encode::configure_result(&id, &c, mask));
            }
            ClientMethod::Subscribe { .. } => {
                if self.slot.is_none() {
                    match self.ctx.allocate_slot() {
                        Ok(s) => self.slot = Some(s),
                        Err(e) => {
                            self.out.push_str(&encode::error(&id, 20, "proxy full"));
                            return Err(format!("no extranonce slot: {e}"));
                        }
                    }
                }
                let slot = self.slot.as_ref().expect("just set");
                let sub_id = format!("{:08x}", slot.index());
                self.out.push_str(&encode::subscribe_result(
                    &id,
                    &sub_id,
                    &slot.prefix,
                    self.en2_size,
                ));
                self.maybe_start();
            }
            ClientMethod::Authorize { user, .. } => {
                let name = truncate(&user, self.ctx.cfg.limits.max_worker_name);
                if self.worker.is_none() {
                    let w = self.ctx.registry.worker(&name);
                    w.connections.fetch_add(1, Relaxed);
                    self.worker = Some(w);
                    self.lease = Some(self.ctx.router.register(&name));
                }
                self.out.push_str(&encode::result(&id, Value::Bool(true)));
                self.maybe_start();
            }
            ClientMethod::ExtranonceSubscribe => {
                // Our extranonce1 never changes, so there is nothing to push later.
                self.out.push_str(&encode::result(&id, Value::Bool(true)));
            }
            ClientMethod::SuggestDifficulty(d) => {
                self.out.push_str(&encode::result(&id, Value::Bool(true)));
                if self.ctx.cfg.difficulty.accept_suggestions {
                    self.vardiff.set(d, Instant::now().into_std());
                    if self.difficulty_sent.is_some() {
                        self.resend_job();
                    }
                }
            }
            ClientMethod::Submit(sub) => {
                self.take_token()?;
                match self.check_submit(&sub) {
                    Ok(()) => self.out.push_str(&encode::result(&id, Value::Bool(true))),
                    Err(why) => {
                        if let Some(w) = &self.worker {
                            w.reject(why);
                        }
                        let (code, msg) = why.sv1_error();
                        self.out.push_str(&encode::error(&id, code, msg));
                    }
                }
            }
        }
        Ok(())
    }

    fn take_token(&mut self) -> Result<(), String> {
        let now = Instant::now();
        let rate = self.ctx.cfg.limits.submits_per_second as f64;
        self.tokens = (self.tokens + now.duration_since(self.tokens_at).as_secs_f64() * rate)
            .min(self.bucket_size());
        self.tokens_at = now;
        if self.tokens < 1.0 {
            return Err(format!("submit flood: more than {rate}/s sustained"));
        }
        self.tokens -= 1.0;
        Ok(())
    }

    /// Once subscribed and authorized, start sending work.
    fn maybe_start(&mut self) {
        if self.slot.is_some() && self.lease.is_some() && self.difficulty_sent.is_none() {
            self.on_assignment();
        }
    }

    fn on_assignment(&mut self) {
        let Some(lease) = self.lease.as_mut() else {
            return;
        };
        let a: Assignment = *lease.assignment.borrow_and_update();
        let current = self.view.as_ref().map(|(p, _)| *p);
        if a.pool != current {
            self.jobs.clear();
            self.seen.clear();
            self.view = a.pool.map(|p| (p, self.ctx.router.pools()[p].view.clone()));
            if let Some(p) = a.pool {
                debug!(peer = %self.peer, pool = p, "miner assigned");
            }
        }
        if a.pool.is_some() {
            self.send_current_job(true);
        }
    }

    fn on_view_change(&mut self) {
        let Some((_, rx)) = self.view.as_mut() else {
            return;
        };
        let v = rx.borrow_and_update();
        let epoch_changed = self.jobs.back().is_some_and(|j| j.epoch != v.epoch);
        let same_job = match (&v.job, self.jobs.back()) {
            (Some(j), Some(l)) => Arc::ptr_eq(j, &l.up) && l.up_target == v.target,
            _ => false,
        };
        drop(v);
        if epoch_changed {
            self.jobs.clear();
            self.seen.clear();
        }
        if !same_job {
            self.send_current_job(false);
        }
    }

    /// Send the assigned pool's current job (if live) as a new local job.
    fn send_current_job(&mut self, force_clean: bool) {
        let Some((_, rx)) = self.view.as_ref() else {
            return;
        };
        let v = rx.borrow().clone();
        let Some(up) = v.job.clone() else { return };
        if !v.live || v.rollable < self.miner_bytes + self.en2_size {
            return;
        }
        let clean = force_clean || up.clean || self.jobs.is_empty();
        if clean {
            self.jobs.clear();
            self.seen.clear();
        }
        let difficulty = self.vardiff.difficulty();
        if self.difficulty_sent != Some(difficulty) {
            self.out.push_str(&encode::set_difficulty(difficulty));
            self.difficulty_sent = Some(difficulty);
        }
        let mask = self.granted_mask.unwrap_or(0) & up.version_mask;
        if self.granted_mask.is_some() && self.sent_mask != Some(mask) {
            self.out.push_str(&encode::set_version_mask(mask));
            self.sent_mask = Some(mask);
        }
        let id = self.next_job;
        self.next_job = self.next_job.wrapping_add(1);
        let pad = v.rollable - self.miner_bytes - self.en2_size;
        let mut coinb2 = vec![0u8; pad];
        coinb2.extend_from_slice(&up.coinbase_suffix);
        self.out.push_str(&encode::notify(&Notify {
            job_id: format!("{id:x}"),
            prev_hash: prevhash_to_sv1(&up.prev_hash),
            coinb1: up.coinbase_prefix.clone(),
            coinb2,
            merkle_branch: up.merkle_branch.clone(),
            version: up.version,
            nbits: up.nbits,
            ntime: up.ntime,
            clean_jobs: clean,
        }));
        if self.jobs.len() == MAX_JOBS {
            self.jobs.pop_front();
        }
        self.jobs.push_back(LocalJob {
            id,
            up,
            epoch: v.epoch,
            target: Target::from_difficulty(difficulty),
            difficulty,
            up_target: v.target,
            rollable: v.rollable,
            mask,
            submit: v.submit.clone(),
        });
    }

    /// Re-issue the current job after a difficulty change (not clean).
    fn resend_job(&mut self) {
        if !self.jobs.is_empty() {
            self.send_current_job(false);
        }
    }

    fn on_vardiff_tick(&mut self) {
        let now = Instant::now();
        // Measured hashrate for the router's split.
        let secs = now.duration_since(self.window.1).as_secs_f64();
        if secs >= 5.0 {
            let h = gridproxy_protocol::difficulty::hashrate_from_shares(self.window.0, secs);
            if let Some(l) = &self.lease {
                let old = f64::from_bits(l.hashrate.load(Relaxed));
                let new = if old > 0.0 { 0.5 * old + 0.5 * h } else { h };
                l.hashrate.store(new.to_bits(), Relaxed);
            }
            self.window = (0.0, now);
        }
        if self.vardiff.poll(now.into_std()).is_some() {
            self.resend_job();
        }
    }

    /// Validate a share; Ok means the miner is told "accepted".
    fn check_submit(&mut self, s: &Submit) -> Result<(), RejectReason> {
        let worker = self.worker.clone().ok_or(RejectReason::Unauthorized)?;
        let slot = self.slot.as_ref().ok_or(RejectReason::Unauthorized)?;
        let id = u32::from_str_radix(&s.job_id, 16).map_err(|_| RejectReason::StaleJob)?;
        let job = self
            .jobs
            .iter()
            .find(|j| j.id == id)
            .ok_or(RejectReason::StaleJob)?;
        if s.extranonce2.len() != self.en2_size {
            return Err(RejectReason::Invalid);
        }
        if s.ntime.wrapping_sub(job.up.ntime) > NTIME_AHEAD
            && job.up.ntime.wrapping_sub(s.ntime) > 600
        {
            return Err(RejectReason::Invalid);
        }
        let version = rolled_version(job.up.version, s.version_bits, job.mask)
            .map_err(|_| RejectReason::Invalid)?;
        let mut en2 = [0u8; 8];
        en2[8 - s.extranonce2.len()..].copy_from_slice(&s.extranonce2);
        let key = (job.id, u64::from_be_bytes(en2), s.ntime, s.nonce, version);
        if self.seen.contains(&key) {
            return Err(RejectReason::Duplicate);
        }
        // Full upstream extranonce: miner part ‖ extranonce2 ‖ zero padding.
        let mut extranonce = Vec::with_capacity(job.rollable);
        extranonce.extend_from_slice(&slot.prefix);
        extranonce.extend_from_slice(&s.extranonce2);
        extranonce.resize(job.rollable, 0);
        let root = share::merkle_root(
            &[
                &job.up.coinbase_prefix,
                &extranonce,
                &job.up.coinbase_suffix,
            ],
            &job.up.merkle_branch,
        );
        let hash = share::sha256d(&share::header(
            version,
            &job.up.prev_hash,
            &root,
            s.ntime,
            job.up.nbits,
            s.nonce,
        ));
        let check = share::check(&hash, &job.target, &job.up_target, job.up.nbits);
        if !check.meets_miner {
            // Honest miners miss only by racing a difficulty change: the share then
            // meets an easier target this miner still has a job for.
            let easiest = self
                .jobs
                .iter()
                .map(|j| j.target)
                .max()
                .unwrap_or(job.target);
            return Err(if easiest.is_met_by(&hash) {
                RejectReason::LowDifficulty
            } else {
                RejectReason::BadNonce
            });
        }
        if self.seen.len() >= MAX_SEEN {
            self.seen.clear();
        }
        self.seen.insert(key);
        worker.accept(job.difficulty);
        self.window.0 += job.difficulty;
        self.vardiff.on_share();
        if check.meets_upstream {
            let share = UpShare {
                job_id: job.up.id.clone(),
                extranonce,
                ntime: s.ntime,
                nonce: s.nonce,
                version,
                difficulty: job.up_target.to_difficulty().min(hash_difficulty(&hash)),
                worker: worker.clone(),
                epoch: job.epoch,
            };
            match job.submit.try_send(share) {
                Ok(()) => worker.forwarded.inc(),
                Err(_) => debug!(peer = %self.peer, "upstream queue full; share not forwarded"),
            }
        }
        if check.meets_network {
            info!(worker = %worker.name, hash = %share::display_hex(&hash), "block found");
        }
        Ok(())
    }
}

async fn changed(
    view: &mut Option<(usize, watch::Receiver<PoolView>)>,
) -> Result<(), watch::error::RecvError> {
    match view {
        Some((_, rx)) => rx.changed().await,
        None => std::future::pending().await,
    }
}

async fn assignment_changed(lease: &mut Option<Lease>) -> Result<(), watch::error::RecvError> {
    match lease {
        Some(l) => l.assignment.changed().await,
        None => std::future::pending().await,
    }
}

/// Cut a worker name to `max` bytes at a char boundary.
pub fn truncate(s: &str, max: usize) -> String {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}
