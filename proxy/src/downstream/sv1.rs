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
use super::{Ctx, FanoutTurn};
use crate::accounts::{Listener, Origin};
use crate::error::DownstreamError;
use crate::router::Lease;
use crate::stats::{RejectReason, WorkerStats};
use bytes::BytesMut;
use gridproxy_protocol::share::prevhash_to_sv1;
use gridproxy_protocol::sv1::{self, encode, ClientMethod, Sv1Error};
use gridproxy_protocol::sv1_submit::parse_submit;
use serde_json::Value;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::sync::AcquireError;
use tokio::time::Instant;
use tracing::{debug, info};

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
    /// Since when written answers wait for the socket (None: nothing waits).
    stalled: Option<Instant>,
    bucket: SubmitBucket,
    /// Requests other than submits.
    requests: SubmitBucket,
}

/// A channel wake-up kept across loop turns.
type WakeFut = std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<channel::Wake, DownstreamError>> + Send>,
>;
/// What one read turn got.
enum Read {
    /// Nothing (a spurious readiness).
    Nothing,
    /// Bytes, and the socket is drained.
    Some,
    /// [`READ_BUDGET`] bytes, and maybe more waiting: yield, then read on.
    Cut,
}

/// A wait for a turn at the fan-out gate (see [`Ctx::fanout`]); allocated
/// only while a new job waits, so idle miners do not carry it.
type TurnFut =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<FanoutTurn, AcquireError>> + Send>>;

/// Bytes asked of the socket per read (a submit line is ~150).
const READ_CHUNK: usize = 1024;
/// Bytes read from one connection per turn before the task yields: a sender
/// that keeps its socket full must not hold a worker thread from the other
/// sessions on it (the loop reads without awaiting).
const READ_BUDGET: usize = 64 * 1024;
/// A miner that has not taken its answers for this long is dropped.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Answers queued for a miner that does not read, before it is dropped.
const MAX_PENDING_OUT: usize = 256 * 1024;

/// Serve one SV1 connection until it closes.
pub async fn serve(ctx: Arc<Ctx>, stream: TcpStream, peer: SocketAddr) {
    let _ = stream.set_nodelay(true);
    let mut s = Session {
        en2_size: ctx.cfg().extranonce.extranonce2_size,
        initial_difficulty: ctx.cfg().difficulty.initial,
        bucket: SubmitBucket::new(ctx.cfg().limits.submits_per_second),
        requests: SubmitBucket::new(ctx.cfg().limits.requests_per_second),
        ctx,
        peer,
        slot: None,
        worker: None,
        core: None,
        granted_mask: None,
        sent_mask: None,
        difficulty_sent: None,
        out: String::new(),
        stalled: None,
    };
    let end = s.run(stream).await;
    match &end {
        DownstreamError::Eof | DownstreamError::Shutdown => {
            debug!(peer = %s.peer, worker = s.worker_name(), other = ?end, "miner disconnected")
        }
        r => info!(peer = %s.peer, worker = s.worker_name(), reason = %r, "miner disconnected"),
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

    // The loop is built for many mostly idle connections and one share at a
    // time on each: no split halves, no read buffer while idle (allocated
    // when the socket is readable, freed once drained), timers and wake-up
    // registrations kept across turns instead of re-armed per share, and each
    // turn's answers written with one non-blocking write.
    async fn run(&mut self, stream: TcpStream) -> DownstreamError {
        let limits = self.ctx.cfg().limits.clone();
        let idle_for = limits.idle_timeout();
        // One timer for both deadlines (a tokio Sleep is 112 bytes per miner).
        let handshake_at = Instant::now() + limits.handshake_timeout();
        let timer = tokio::time::sleep_until(handshake_at.min(Instant::now() + idle_for));
        let shutdown = self.ctx.session_stop.clone();
        let cancelled = shutdown.cancelled();
        let draining = self.ctx.draining.clone();
        let drain_starts = draining.cancelled();
        tokio::pin!(timer, cancelled, drain_starts);
        let mut told_to_leave = false;
        let mut last_read = Instant::now();
        let mut buf = BytesMut::new();
        let mut wake: Option<WakeFut> = None;
        let mut turn_wait: Option<TurnFut> = None;
        let mut cut = false;
        loop {
            if std::mem::take(&mut cut) {
                self.ctx.trips.read_budget.inc();
                tokio::task::yield_now().await;
            }
            let ready = self.core.is_some();
            // While a new job waits for its turn the view stays unread, so
            // a new wake-up would fire at once: none is built until then.
            if wake.is_none() && turn_wait.is_none() {
                wake = self
                    .core
                    .as_ref()
                    .map(|c| Box::pin(c.wake_owned()) as WakeFut);
            }
            // Held from a new job's turn until its notify is written.
            let mut _turn = None;
            tokio::select! {
                _ = &mut cancelled => return DownstreamError::Shutdown,
                _ = &mut drain_starts, if !told_to_leave => {
                    // The proxy is restarting: back to the same address (a
                    // new process holds the port). Shares the miner sent
                    // before it reads this are still answered; the session
                    // ends when the miner closes.
                    told_to_leave = true;
                    self.out.push_str(&encode::reconnect(None, None, None));
                }
                r = std::future::poll_fn(|cx| stream.poll_read_ready(cx)) => {
                    if let Err(e) = r {
                        return DownstreamError::Read(e);
                    }
                    match self.read_lines(&stream, &mut buf, limits.max_line) {
                        Ok(Read::Some) => last_read = Instant::now(),
                        Ok(Read::Cut) => {
                            last_read = Instant::now();
                            cut = true;
                        }
                        Ok(Read::Nothing) => {}
                        Err(end) => {
                            self.flush_now(&stream);
                            return end;
                        }
                    }
                }
                w = poll_kept(&mut wake) => {
                    wake = None;
                    match w {
                        Err(why) => return why,
                        Ok(channel::Wake::View) => {
                            turn_wait = Some(Box::pin(self.ctx.fanout.clone().acquire_owned()));
                        }
                        Ok(w) => {
                            let out = self.core.as_mut().and_then(|c| c.on_wake(w));
                            self.emit(out);
                        }
                    }
                }
                t = poll_kept(&mut turn_wait) => {
                    turn_wait = None;
                    _turn = t.ok();
                    let out = self.core.as_mut().and_then(|c| c.on_wake(channel::Wake::View));
                    self.emit(out);
                }
                _ = &mut timer => {
                    let now = Instant::now();
                    if !ready && now >= handshake_at {
                        return DownstreamError::HandshakeTimeout(limits.handshake_timeout());
                    }
                    // Re-armed lazily: a share does not touch the timer wheel.
                    let due = last_read + idle_for;
                    if due <= now {
                        return DownstreamError::Idle(idle_for);
                    }
                    timer.as_mut().reset(if ready { due } else { due.min(handshake_at) });
                }
                r = std::future::poll_fn(|cx| stream.poll_write_ready(cx)), if self.stalled.is_some() => {
                    if let Err(e) = r {
                        return DownstreamError::Write(e);
                    }
                }
            }
            if !ready && self.core.is_some() {
                wake = None;
            }
            if let Err(e) = self.flush(&stream) {
                return e;
            }
        }
    }

    /// Read what is there, up to [`READ_BUDGET`], and handle every complete
    /// line; Err ends the session.
    fn read_lines(
        &mut self,
        stream: &TcpStream,
        buf: &mut BytesMut,
        max_line: usize,
    ) -> Result<Read, DownstreamError> {
        let mut got = 0;
        let read = loop {
            if got >= READ_BUDGET {
                break Read::Cut;
            }
            // Zeroed rather than read into uninitialised memory: no unsafe.
            let start = buf.len();
            buf.resize(start + READ_CHUNK, 0);
            let drained = match stream.try_read(&mut buf[start..]) {
                Ok(0) => {
                    buf.truncate(start);
                    return Err(DownstreamError::Eof);
                }
                Ok(k) => {
                    buf.truncate(start + k);
                    got += k;
                    k < READ_CHUNK
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    buf.truncate(start);
                    break if got > 0 { Read::Some } else { Read::Nothing };
                }
                Err(e) => return Err(DownstreamError::Read(e)),
            };
            // Lines in place: no per-line allocation.
            let mut from = 0;
            while let Some(off) = buf[from..].iter().position(|&b| b == b'\n') {
                let end = from + off;
                if end + 1 - from > max_line {
                    return Err(DownstreamError::LineTooLong { limit: max_line });
                }
                let mut line = &buf[from..end];
                if line.last() == Some(&b'\r') {
                    line = &line[..line.len() - 1];
                }
                from = end + 1;
                if line.iter().all(|b| b.is_ascii_whitespace()) {
                    continue;
                }
                self.on_line(line)?;
            }
            let _ = buf.split_to(from);
            if buf.len() > max_line {
                return Err(DownstreamError::LineTooLong { limit: max_line });
            }
            if self.out.len() > MAX_PENDING_OUT {
                return Err(DownstreamError::AnswersPilingUp);
            }
            if drained {
                // A short read emptied the socket: drop the readiness without
                // the second read that would only say WouldBlock (one syscall
                // per share fewer; tokio's own poll_read does the same). Data
                // arriving later raises a new readiness event, and a peer's
                // close stays visible (tokio keeps the closed bits).
                let _ = stream.try_io(Interest::READABLE, || {
                    Err::<(), _>(std::io::ErrorKind::WouldBlock.into())
                });
                break Read::Some;
            }
        };
        if buf.is_empty() {
            // Idle connections hold no read buffer.
            *buf = BytesMut::new();
        }
        Ok(read)
    }

    /// Write what is pending without waiting; what the socket does not take
    /// stays queued (the loop waits for writability). A miner that takes
    /// nothing for [`WRITE_TIMEOUT`] is dropped.
    fn flush(&mut self, stream: &TcpStream) -> Result<(), DownstreamError> {
        if self.out.is_empty() {
            return Ok(());
        }
        let mut done = 0;
        while done < self.out.len() {
            match stream.try_write(&self.out.as_bytes()[done..]) {
                Ok(0) => {
                    let closed =
                        std::io::Error::new(std::io::ErrorKind::WriteZero, "connection closed");
                    return Err(DownstreamError::Write(closed));
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(DownstreamError::Write(e)),
            }
        }
        if done == self.out.len() {
            // Free the buffer: notifies make it large and it is idle most of the time.
            self.out = String::new();
            self.stalled = None;
            return Ok(());
        }
        self.out.drain(..done);
        let since = *self.stalled.get_or_insert_with(Instant::now);
        if since.elapsed() > WRITE_TIMEOUT {
            return Err(DownstreamError::WriteTimedOut);
        }
        Ok(())
    }

    /// Best effort before closing (an error answer explains the close).
    fn flush_now(&mut self, stream: &TcpStream) {
        let _ = self.flush(stream);
    }

    /// Handle one line; Err closes the connection with that reason.
    fn on_line(&mut self, line: &[u8]) -> Result<(), DownstreamError> {
        if let Some(sub) = parse_submit(line) {
            return self.on_submit(
                &sub.id,
                sub.job_id,
                sub.extranonce2(),
                sub.ntime,
                sub.nonce,
                sub.version_bits,
            );
        }
        if !self.requests.try_take() {
            self.ctx.trips.request_flood.inc();
            return Err(DownstreamError::RequestFlood {
                per_second: self.requests.rate(),
            });
        }
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
                    _ => Err(DownstreamError::Malformed(e)),
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
                // A miner part on the first subscribe; a repeat gets the same one.
                let slot = match (&self.core, &mut self.slot) {
                    (Some(c), _) => c.slot(),
                    (None, Some(s)) => &*s,
                    (None, none) => match SlotGuard::allocate(&self.ctx) {
                        Ok(s) => &*none.insert(s),
                        Err(e) => {
                            self.out.push_str(&encode::error(&id, 20, "proxy full"));
                            return Err(DownstreamError::NoSlot(e));
                        }
                    },
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
                    let lease = self.ctx.router.register_from(
                        &name,
                        Origin {
                            listener: Some(Listener::Sv1),
                            source: Some(self.peer.ip()),
                        },
                    );
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
                return self.on_submit(
                    &id,
                    &sub.job_id,
                    &sub.extranonce2,
                    sub.ntime,
                    sub.nonce,
                    sub.version_bits,
                );
            }
        }
        Ok(())
    }

    /// Check a share and answer it.
    fn on_submit(
        &mut self,
        id: &Value,
        job_id: &str,
        extranonce2: &[u8],
        ntime: u32,
        nonce: u32,
        version_bits: Option<u32>,
    ) -> Result<(), DownstreamError> {
        if let Err(e) = self.bucket.take() {
            self.ctx.trips.submit_flood.inc();
            return Err(e);
        }
        let work = u32::from_str_radix(job_id, 16).map(|job_id| Work {
            job_id,
            extranonce2: Some(extranonce2),
            ntime,
            nonce,
            version_bits,
        });
        let r = match (self.core.as_mut(), work) {
            (None, _) => Err(RejectReason::Unauthorized),
            (_, Err(_)) => Err(RejectReason::StaleJob),
            (Some(core), Ok(w)) => core.check(&w).map(|_| ()),
        };
        match r {
            Ok(()) => {
                // The accepted answer, without building a JSON value.
                let _ = writeln!(self.out, r#"{{"id":{id},"result":true,"error":null}}"#);
            }
            Err(why) => {
                if let Some(w) = self.worker_stats() {
                    w.reject(why);
                }
                let (code, msg) = why.sv1_error();
                self.out.push_str(&encode::error(id, code, msg));
            }
        }
        match self.core.as_mut() {
            Some(core) => core.count_answer(r.is_ok()),
            None => Ok(()),
        }
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
        // Written to the socket by the flush that follows this call.
        if let Some(t) = job.fanout_from {
            self.ctx.fanout_seconds.observe(t.elapsed());
        }
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
        let pad = job.coinbase_suffix.len() - up.coinbase_suffix.len();
        let build = || {
            encode::notify_shared(
                &prevhash_to_sv1(&up.prev_hash),
                &up.coinbase_prefix,
                &job.coinbase_suffix,
                &up.merkle_branch,
                up.version,
                up.nbits,
                up.ntime,
            )
        };
        let cached = up.sv1_notify.get_or_init(|| (pad, build().into()));
        let own;
        let shared: &str = if cached.0 == pad {
            &cached.1
        } else {
            own = build();
            &own
        };
        encode::notify_into(&mut self.out, &format!("{:x}", job.id), shared, job.clean);
    }
}

/// The kept future's output, or never when there is none.
async fn poll_kept<T>(
    f: &mut Option<std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>>>,
) -> T {
    match f {
        Some(f) => f.await,
        None => std::future::pending().await,
    }
}

/// Cut a worker name to `max` bytes at a char boundary.
pub fn truncate(s: &str, max: usize) -> String {
    channel::truncate(s, max)
}
