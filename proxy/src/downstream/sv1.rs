//! One SV1 miner connection: subscribe/authorize/configure, then a
//! [`ChannelCore`] does the rest (jobs derived from the assigned pool's
//! current job, local share validation with an honest answer, forwarding of
//! shares that meet the pool's target, vardiff); this file speaks JSON lines.
//!
//! The miner's extranonce1 is its proxy-wide miner part only; the pool's own
//! extranonce (SV2 channel prefix / SV1 extranonce1) lives in coinb1 and any
//! padding in coinb2. That is what lets a miner change pools — failover,
//! split, reroute — without reconnecting: its extranonce1 never changes.

use super::channel::{
    self, ChannelCore, ChannelSetup, ExtranonceMode, Out, SlotGuard, SubmitBucket, TargetScope,
    Work, WorkerGuard,
};
use super::Ctx;
use crate::router::Lease;
use crate::stats::{RejectReason, WorkerStats};
use bytes::BytesMut;
use gridproxy_protocol::share::prevhash_to_sv1;
use gridproxy_protocol::sv1::{self, encode, ClientMethod, LineCodec, Notify, Submit, Sv1Error};
use serde_json::Value;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tracing::{debug, info};

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
    /// Miner part, from subscribe until the channel starts.
    slot: Option<SlotGuard>,
    /// Worker and router registration, from authorize until the channel starts.
    worker: Option<(WorkerGuard, Lease)>,
    /// The channel, once subscribed and authorized.
    core: Option<ChannelCore>,
    /// Difficulty the channel starts at (`mining.suggest_difficulty` before start).
    initial_difficulty: f64,
    en2_size: usize,
    granted_mask: Option<u32>,
    sent_mask: Option<u32>,
    difficulty_sent: Option<f64>,
    out: String,
    bucket: SubmitBucket,
}

/// Serve one SV1 connection until it closes.
pub async fn serve(ctx: Arc<Ctx>, stream: TcpStream, peer: SocketAddr) {
    let _ = stream.set_nodelay(true);
    let mut s = Session {
        en2_size: ctx.cfg().extranonce.extranonce2_size,
        initial_difficulty: ctx.cfg().difficulty.initial,
        bucket: SubmitBucket::new(ctx.cfg().limits.submits_per_second),
        ctx,
        peer,
        slot: None,
        worker: None,
        core: None,
        granted_mask: None,
        sent_mask: None,
        difficulty_sent: None,
        out: String::new(),
    };
    let end = s.run(stream).await;
    match &end {
        Close::Reason(r) => {
            info!(peer = %s.peer, worker = s.worker_name(), reason = %r, "miner disconnected")
        }
        other => debug!(peer = %s.peer, worker = s.worker_name(), ?other, "miner disconnected"),
    }
}

impl Session {
    fn worker_stats(&self) -> Option<&Arc<WorkerStats>> {
        match (&self.core, &self.worker) {
            (Some(c), _) => Some(c.worker()),
            (None, Some((w, _))) => Some(w.stats()),
            (None, None) => None,
        }
    }

    fn worker_name(&self) -> &str {
        self.worker_stats().map(|w| w.name.as_str()).unwrap_or("-")
    }

    async fn run(&mut self, stream: TcpStream) -> Close {
        let (mut rd, mut wr) = stream.into_split();
        let limits = self.ctx.cfg().limits.clone();
        let mut codec = LineCodec::new(limits.max_line);
        let mut buf = BytesMut::with_capacity(1024);
        let handshake_deadline = Instant::now() + limits.handshake_timeout();
        let mut idle_deadline = Instant::now() + limits.idle_timeout();
        let shutdown = self.ctx.shutdown.clone();
        loop {
            let ready = self.core.is_some();
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
                w = wake(&mut self.core) => {
                    match w {
                        Err(why) => return Close::Reason(why),
                        Ok(w) => {
                            let out = self.core.as_mut().and_then(|c| c.on_wake(w));
                            self.emit(out);
                        }
                    }
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
                if let Some(core) = self.core.as_mut() {
                    core.set_version_allowed(mask.unwrap_or(0));
                }
                self.out.push_str(&encode::configure_result(&id, &c, mask));
            }
            ClientMethod::Subscribe { .. } => {
                if self.slot.is_none() && self.core.is_none() {
                    match SlotGuard::allocate(&self.ctx) {
                        Ok(s) => self.slot = Some(s),
                        Err(e) => {
                            self.out.push_str(&encode::error(&id, 20, "proxy full"));
                            return Err(format!("no extranonce slot: {e}"));
                        }
                    }
                }
                let slot = match (&self.core, &self.slot) {
                    (Some(c), _) => c.slot(),
                    (None, Some(s)) => s,
                    (None, None) => return Err("no extranonce slot".into()),
                };
                let sub_id = format!("{:08x}", slot.index());
                self.out.push_str(&encode::subscribe_result(
                    &id,
                    &sub_id,
                    slot.prefix(),
                    self.en2_size,
                ));
                self.maybe_start();
            }
            ClientMethod::Authorize { user, .. } => {
                let name = channel::truncate(&user, self.ctx.cfg().limits.max_worker_name);
                if self.worker.is_none() && self.core.is_none() {
                    let w = WorkerGuard::new(&self.ctx, &name);
                    let lease = self.ctx.router.register(&name);
                    self.worker = Some((w, lease));
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
                if self.ctx.cfg().difficulty.accept_suggestions {
                    match self.core.as_mut() {
                        Some(core) => {
                            let out = core.set_difficulty(d);
                            self.emit(out);
                        }
                        None => self.initial_difficulty = d,
                    }
                }
            }
            ClientMethod::Submit(sub) => {
                self.bucket.take()?;
                match self.check_submit(&sub) {
                    Ok(()) => self.out.push_str(&encode::result(&id, Value::Bool(true))),
                    Err(why) => {
                        if let Some(w) = self.worker_stats() {
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

    /// Once subscribed and authorized, start the channel and send work.
    fn maybe_start(&mut self) {
        if self.core.is_some() || self.slot.is_none() || self.worker.is_none() {
            return;
        }
        let (Some(slot), Some((worker, lease))) = (self.slot.take(), self.worker.take()) else {
            return;
        };
        let setup = ChannelSetup {
            extranonce: ExtranonceMode::Rolled,
            scope: TargetScope::PerJob,
            initial_difficulty: self.initial_difficulty,
            min_difficulty: self.ctx.cfg().difficulty.min,
            version_allowed: self.granted_mask.unwrap_or(0),
        };
        let mut core = ChannelCore::new(self.ctx.clone(), slot, worker, lease, setup);
        let out = core.start();
        self.core = Some(core);
        self.emit(out);
    }

    /// Encode what the channel produced.
    fn emit(&mut self, out: Option<Out>) {
        let job = match out {
            None => return,
            Some(Out::Target { difficulty, .. }) => {
                // Not produced by per-job channels; announce it anyway.
                self.out.push_str(&encode::set_difficulty(difficulty));
                self.difficulty_sent = Some(difficulty);
                return;
            }
            Some(Out::Job(j)) => j,
        };
        if self.difficulty_sent != Some(job.difficulty) {
            self.out.push_str(&encode::set_difficulty(job.difficulty));
            self.difficulty_sent = Some(job.difficulty);
        }
        if self.granted_mask.is_some() && self.sent_mask != Some(job.version_mask) {
            self.out
                .push_str(&encode::set_version_mask(job.version_mask));
            self.sent_mask = Some(job.version_mask);
        }
        let up = &job.up;
        self.out.push_str(&encode::notify(&Notify {
            job_id: format!("{:x}", job.id),
            prev_hash: prevhash_to_sv1(&up.prev_hash),
            coinb1: up.coinbase_prefix.clone(),
            coinb2: job.coinbase_suffix,
            merkle_branch: up.merkle_branch.clone(),
            version: up.version,
            nbits: up.nbits,
            ntime: up.ntime,
            clean_jobs: job.clean,
        }));
    }

    /// Validate a share; Ok means the miner is told "accepted".
    fn check_submit(&mut self, s: &Submit) -> Result<(), RejectReason> {
        let core = self.core.as_mut().ok_or(RejectReason::Unauthorized)?;
        let job_id = u32::from_str_radix(&s.job_id, 16).map_err(|_| RejectReason::StaleJob)?;
        core.check(&Work {
            job_id,
            extranonce2: Some(&s.extranonce2),
            ntime: s.ntime,
            nonce: s.nonce,
            version_bits: s.version_bits,
        })
        .map(|_| ())
    }
}

async fn wake(core: &mut Option<ChannelCore>) -> Result<channel::Wake, String> {
    match core {
        Some(c) => c.wake().await,
        None => std::future::pending().await,
    }
}

/// Cut a worker name to `max` bytes at a char boundary.
pub fn truncate(s: &str, max: usize) -> String {
    channel::truncate(s, max)
}
