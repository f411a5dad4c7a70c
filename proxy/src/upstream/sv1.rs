//! SV1 upstream: one JSON-lines connection to a pool that speaks only SV1,
//! multiplexing every miner by splitting the pool's extranonce2 space.
//!
//! Responses are matched to requests by our id when the pool echoes it, else
//! by order (some pools and proxies answer with ids of their own); a request
//! a pool never answers (`mining.configure`, `mining.extranonce.subscribe`)
//! is dropped once a later one is answered.
//!
//! What a pool may change mid-connection is honoured:
//! - `mining.set_extranonce` (asked for with `mining.extranonce.subscribe`):
//!   the new extranonce1 and size apply from the pool's next job; earlier
//!   work is void, so a new epoch starts (miners get a clean job, shares
//!   of earlier jobs are not sent);
//! - `mining.set_version_mask`: the current job is re-issued with the new
//!   mask (miners are told); a mask that loses bits starts a new epoch;
//! - `client.reconnect [host, port, wait]`: the session ends and the
//!   reconnect loop goes where the pool says (same host or domain only),
//!   after its wait;
//! - a `mining.notify` before the subscribe result (or before authorize)
//!   is kept and published once the extranonce is known and the user
//!   authorized.

use super::{PoolView, Redirect, UpJob, UpJobId, UpShare};
use crate::config::{ExtranonceConfig, PoolConfig, RoutingConfig};
use crate::endpoint::Endpoint;
use crate::error::UpstreamError;
use crate::stats::{PoolStats, WorkerStats};
use bytes::BytesMut;
use gridproxy_protocol::difficulty::Target;
use gridproxy_protocol::share::prevhash_from_sv1;
use gridproxy_protocol::sv1::{self, encode, LineCodec, Notify, ServerMessage};
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// Version bits we ask an SV1 pool for (BIP320).
const ASK_MASK: u32 = 0x1fff_e000;

/// Everything one SV1 upstream task needs.
pub struct Sv1Upstream {
    /// Pool settings.
    pub pool: PoolConfig,
    /// Routing timeouts.
    pub routing: RoutingConfig,
    /// Extranonce layout.
    pub extranonce: ExtranonceConfig,
    /// Counters.
    pub stats: Arc<PoolStats>,
}

enum Pending {
    Configure,
    Subscribe,
    ExtranonceSubscribe,
    Authorize,
    Submit {
        worker: Arc<WorkerStats>,
        difficulty: f64,
    },
}

impl Pending {
    /// Pools may leave these unanswered.
    fn optional(&self) -> bool {
        matches!(self, Pending::Configure | Pending::ExtranonceSubscribe)
    }
}

struct Conn {
    en1: Vec<u8>,
    en2_size: usize,
    subscribed: bool,
    mask: u32,
    target: Target,
    next_target: Option<Target>,
    authorized: bool,
    /// Requests in flight, with the id we sent.
    pending: VecDeque<(u64, Pending)>,
    next_id: u64,
    last_job_at: Instant,
    /// Shares of another epoch are not sent (their work is void).
    epoch: u64,
    /// The pool's latest job, kept to publish once the connection is ready
    /// and to re-issue when the mask changes.
    notify: Option<Notify>,
    /// The next published job voids earlier work (extranonce changed).
    clean_next: bool,
}

impl Sv1Upstream {
    /// Run until shutdown.
    pub async fn run(
        self,
        view: watch::Sender<PoolView>,
        shares: mpsc::Receiver<UpShare>,
        shutdown: CancellationToken,
        drain: CancellationToken,
    ) {
        super::reconnect_loop(&self, view, shares, shutdown, drain).await
    }

    fn request(&self, c: &mut Conn, out: &mut String, method: &str, params: Value, p: Pending) {
        out.push_str(&encode::request(&json!(c.next_id), method, params));
        if c.pending.len() >= self.routing.max_pending_shares {
            // The pool leaves requests unanswered: give up the oldest.
            c.pending.pop_front();
            self.stats.pending_dropped.inc();
        }
        c.pending.push_back((c.next_id, p));
        c.next_id += 1;
    }

    async fn serve(
        &self,
        target: &Endpoint,
        view: &watch::Sender<PoolView>,
        shares: &mut mpsc::Receiver<UpShare>,
        drain: &CancellationToken,
    ) -> Result<(), UpstreamError> {
        // Still connecting when the drain starts: nothing was sent on this
        // connection, so nothing is owed (queued shares are an earlier epoch's).
        let Some(stream) = drain.run_until_cancelled(super::connect(target)).await else {
            return Ok(());
        };
        let (mut rd, mut wr) = stream?.into_split();
        let epoch = view.borrow().epoch + 1;
        let mut c = Conn {
            en1: vec![],
            en2_size: 0,
            subscribed: false,
            mask: 0,
            target: Target::from_difficulty(1.0),
            next_target: None,
            authorized: false,
            pending: VecDeque::new(),
            next_id: 1,
            last_job_at: Instant::now(),
            epoch,
            notify: None,
            clean_next: true,
        };
        let mut out = String::new();
        self.request(&mut c, &mut out, "mining.configure",
            json!([["version-rolling"], {"version-rolling.mask": format!("{ASK_MASK:08x}"), "version-rolling.min-bit-count": 2}]),
            Pending::Configure);
        self.request(
            &mut c,
            &mut out,
            "mining.subscribe",
            json!(["gridproxy/0.1"]),
            Pending::Subscribe,
        );
        // Without it many pools never send mining.set_extranonce.
        self.request(
            &mut c,
            &mut out,
            "mining.extranonce.subscribe",
            json!([]),
            Pending::ExtranonceSubscribe,
        );
        self.request(
            &mut c,
            &mut out,
            "mining.authorize",
            json!([self.pool.user, self.pool.password]),
            Pending::Authorize,
        );
        wr.write_all(out.as_bytes())
            .await
            .map_err(UpstreamError::Write)?;
        view.send_modify(|v| {
            v.epoch = epoch;
            v.live = false;
            v.job = None;
        });
        let mut codec = LineCodec::new(self.pool.max_line);
        let mut buf = BytesMut::with_capacity(16 * 1024);
        let no_job = Duration::from_secs(self.routing.no_job_timeout_secs.max(1));
        let need = self.extranonce.miner_bytes + self.extranonce.extranonce2_size;
        let mut heard = tokio::time::Instant::now();
        let r: Result<(), UpstreamError> = async { loop {
            let unanswered = c
                .pending
                .iter()
                .filter(|(_, p)| matches!(p, Pending::Submit { .. }))
                .count();
            if crate::drain::upstream_done(drain.is_cancelled(), shares.len(), unanswered) {
                break Ok(());
            }
            tokio::select! {
                // Wakes the loop once to check the condition above.
                _ = drain.cancelled(), if !drain.is_cancelled() => {}
                _ = tokio::time::sleep_until(heard + crate::drain::POOL_QUIET), if drain.is_cancelled() => {
                    warn!(pool = %self.pool.name, unanswered, "pool silent during the drain: not waiting for the rest of its answers");
                    break Ok(());
                }
                r = rd.read_buf(&mut buf) => {
                    match r {
                        Ok(0) => break Err(UpstreamError::Closed),
                        Err(e) => break Err(UpstreamError::Read(e)),
                        Ok(_) => {}
                    }
                    heard = tokio::time::Instant::now();
                    while let Some(line) = codec.next_line(&mut buf).map_err(UpstreamError::PoolSent)? {
                        let m = sv1::parse_server(&line).map_err(UpstreamError::PoolSent)?;
                        self.handle(&mut c, m, view, need, target)?;
                    }
                }
                s = shares.recv() => {
                    let Some(s) = s else { return Ok(()) };
                    let mut out = String::new();
                    let mut next = Some(s);
                    while let Some(s) = next.take() {
                        if s.epoch == c.epoch {
                            if let UpJobId::Sv1(job_id) = &s.job_id {
                                let mut p = vec![
                                    json!(self.pool.user), json!(job_id), json!(hex::encode(&s.extranonce)),
                                    json!(format!("{:08x}", s.ntime)), json!(format!("{:08x}", s.nonce)),
                                ];
                                if c.mask != 0 {
                                    p.push(json!(format!("{:08x}", s.version & c.mask)));
                                }
                                self.stats.submitted.inc();
                                self.request(&mut c, &mut out, "mining.submit", Value::Array(p),
                                    Pending::Submit { worker: s.worker, difficulty: s.difficulty });
                            }
                        }
                        if out.len() < 64 * 1024 {
                            next = shares.try_recv().ok();
                        }
                    }
                    if !out.is_empty() {
                        wr.write_all(out.as_bytes()).await.map_err(UpstreamError::Write)?;
                    }
                }
                _ = tokio::time::sleep_until(c.last_job_at + no_job) => {
                    return Err(UpstreamError::NoJob(no_job));
                }
            }
        } }
        .await;
        let unanswered = c
            .pending
            .iter()
            .filter(|(_, p)| matches!(p, Pending::Submit { .. }))
            .count();
        if unanswered > 0 {
            self.stats.unanswered.add(unanswered as u64);
            warn!(pool = %self.pool.name, unanswered, "connection ended with shares unanswered");
        }
        r
    }

    /// The request a response answers: ours by id when the pool echoes it
    /// (earlier requests a pool may leave unanswered are dropped then),
    /// else the oldest.
    fn answered(c: &mut Conn, id: &Value) -> Option<Pending> {
        let pos = id
            .as_u64()
            .and_then(|id| c.pending.iter().position(|(sent, _)| *sent == id));
        let Some(i) = pos else {
            return c.pending.pop_front().map(|(_, p)| p);
        };
        let (_, p) = c.pending.remove(i)?;
        let mut k = 0;
        c.pending.retain(|(_, p)| {
            k += 1;
            k > i || !p.optional()
        });
        Some(p)
    }

    /// Publish the kept job if the connection is ready for it.
    fn publish(&self, c: &mut Conn, view: &watch::Sender<PoolView>, need: usize) {
        let Some(n) = &c.notify else { return };
        if !c.subscribed {
            return;
        }
        let mut prefix = n.coinb1.clone();
        prefix.extend_from_slice(&c.en1);
        let clean = n.clean_jobs || c.clean_next;
        c.clean_next = false;
        let job = Arc::new(UpJob {
            sv1_notify: Default::default(),
            id: UpJobId::Sv1(n.job_id.clone()),
            version: n.version,
            version_mask: c.mask,
            prev_hash: prevhash_from_sv1(&n.prev_hash),
            nbits: n.nbits,
            ntime: n.ntime,
            coinbase_prefix: prefix,
            coinbase_suffix: n.coinb2.clone(),
            merkle_branch: n.merkle_branch.clone(),
            clean,
            target: None,
        });
        let (target, rollable, live, epoch) = (
            c.target,
            c.en2_size,
            c.authorized && c.en2_size >= need,
            c.epoch,
        );
        if clean {
            // One line per block (see the SV2 upstream).
            info!(
                pool = %self.pool.name,
                prev_hash = %hex::encode(n.prev_hash),
                "new block from the pool"
            );
        }
        view.send_modify(|v| {
            v.epoch = epoch;
            v.published = std::time::Instant::now();
            v.live = live;
            v.job = Some(job);
            v.target = target;
            v.rollable = rollable;
        });
    }

    fn handle(
        &self,
        c: &mut Conn,
        m: ServerMessage,
        view: &watch::Sender<PoolView>,
        need: usize,
        at: &Endpoint,
    ) -> Result<(), UpstreamError> {
        match m {
            ServerMessage::Response { id, result, error } => match Self::answered(c, &id) {
                None => debug!(pool = %self.pool.name, "response to nothing pending"),
                Some(Pending::Configure) => {
                    if result.get("version-rolling").and_then(Value::as_bool) == Some(true) {
                        c.mask = result
                            .get("version-rolling.mask")
                            .and_then(Value::as_str)
                            .and_then(|s| u32::from_str_radix(s, 16).ok())
                            .unwrap_or(0)
                            & ASK_MASK;
                    }
                }
                Some(Pending::Subscribe) => {
                    let Some((en1, size)) = sv1::parse_subscribe_result(&result) else {
                        return Err(UpstreamError::BadSubscribe { result, error });
                    };
                    if size < need {
                        return Err(UpstreamError::Extranonce2TooSmall { got: size, need });
                    }
                    c.en1 = en1;
                    c.en2_size = size;
                    c.subscribed = true;
                    view.send_modify(|v| v.rollable = size);
                    // A job that came before this answer.
                    self.publish(c, view, need);
                }
                Some(Pending::ExtranonceSubscribe) => {
                    debug!(pool = %self.pool.name, %result, ?error, "mining.extranonce.subscribe answered")
                }
                Some(Pending::Authorize) => {
                    if result != Value::Bool(true) {
                        return Err(UpstreamError::AuthorizeRefused {
                            user: self.pool.user.clone(),
                            error,
                        });
                    }
                    c.authorized = true;
                    self.stats.connects.inc();
                    self.stats.set_error(None);
                    info!(pool = %self.pool.name, %at, en2 = c.en2_size, mask = format!("{:08x}", c.mask), "sv1 upstream ready");
                    self.publish(c, view, need);
                }
                Some(Pending::Submit { worker, difficulty }) => match error {
                    None if result == Value::Bool(true) => {
                        worker.upstream_accepted.inc();
                        self.stats.accept(difficulty);
                    }
                    e => {
                        worker.upstream_rejected.inc();
                        let reason = e.map(|e| e.message).unwrap_or_else(|| result.to_string());
                        self.stats.reject(&reason);
                    }
                },
            },
            ServerMessage::Notify(n) => {
                self.stats.jobs.inc();
                c.last_job_at = Instant::now();
                if let Some(t) = c.next_target.take() {
                    c.target = t;
                }
                c.notify = Some(n);
                self.publish(c, view, need);
            }
            ServerMessage::SetDifficulty(d) => {
                // Applies from the next job on (SV1 semantics); at once if there is none yet.
                let t = Target::from_difficulty(d);
                if view.borrow().job.is_none() {
                    c.target = t;
                } else {
                    c.next_target = Some(t);
                }
            }
            ServerMessage::SetExtranonce {
                extranonce1,
                extranonce2_size,
            } => {
                if extranonce2_size < need {
                    return Err(UpstreamError::SetExtranonceTooSmall {
                        got: extranonce2_size,
                        need,
                    });
                }
                info!(pool = %self.pool.name, extranonce1 = hex::encode(&extranonce1), extranonce2_size, "pool set a new extranonce");
                c.en1 = extranonce1;
                c.en2_size = extranonce2_size;
                c.subscribed = true;
                // Work on the old extranonce1 is void: a new epoch (shares of
                // it are not sent, miners start clean) from the next job on.
                c.epoch += 1;
                c.notify = None;
                c.clean_next = true;
                let epoch = c.epoch;
                view.send_modify(|v| {
                    v.epoch = epoch;
                    v.live = false;
                    v.job = None;
                    v.rollable = extranonce2_size;
                });
            }
            ServerMessage::SetVersionMask(m) => {
                let mask = m & ASK_MASK;
                if mask != c.mask {
                    info!(pool = %self.pool.name, mask = format!("{mask:08x}"), was = format!("{:08x}", c.mask), "pool set a new version mask");
                    // Shares rolled on bits the pool no longer grants would
                    // be invalid: a new epoch when bits are taken away.
                    if c.mask & !mask != 0 {
                        c.epoch += 1;
                        c.clean_next = true;
                    }
                    c.mask = mask;
                    self.publish(c, view, need);
                }
            }
            ServerMessage::Reconnect {
                host,
                port,
                wait_secs,
            } => {
                return Err(UpstreamError::Reconnect(Redirect {
                    host,
                    port,
                    wait: Duration::from_secs(wait_secs.unwrap_or(0)),
                }))
            }
            ServerMessage::Other(method) => {
                debug!(pool = %self.pool.name, %method, "ignored notification")
            }
        }
        Ok(())
    }
}

impl super::Session for Sv1Upstream {
    fn pool(&self) -> &PoolConfig {
        &self.pool
    }
    fn routing(&self) -> &RoutingConfig {
        &self.routing
    }
    fn stats(&self) -> &PoolStats {
        &self.stats
    }
    async fn session(
        &self,
        target: &Endpoint,
        view: &watch::Sender<PoolView>,
        shares: &mut mpsc::Receiver<UpShare>,
        drain: &CancellationToken,
    ) -> Result<(), UpstreamError> {
        self.serve(target, view, shares, drain).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ProxyConfig;

    /// A pool that never answers cannot grow the request queue.
    #[test]
    fn unanswered_requests_are_bounded_oldest_first() {
        let cfg = ProxyConfig::from_toml(
            "[[pools]]\nname='p'\naddress='127.0.0.1:1'\nprotocol='sv1'\nuser='u'\n\
             [routing]\nmax_pending_shares = 16\n",
        )
        .unwrap();
        let up = Sv1Upstream {
            pool: cfg.pools[0].clone(),
            routing: cfg.routing,
            extranonce: cfg.extranonce,
            stats: Arc::new(PoolStats::new("p")),
        };
        let mut c = Conn {
            en1: vec![],
            en2_size: 4,
            subscribed: true,
            mask: 0,
            target: Target::from_difficulty(1.0),
            next_target: None,
            authorized: true,
            pending: VecDeque::new(),
            next_id: 1,
            last_job_at: Instant::now(),
            epoch: 1,
            notify: None,
            clean_next: false,
        };
        let mut out = String::new();
        let worker = Arc::new(WorkerStats::default());
        for _ in 0..20 {
            let p = Pending::Submit {
                worker: worker.clone(),
                difficulty: 1.0,
            };
            up.request(&mut c, &mut out, "mining.submit", json!([]), p);
        }
        assert_eq!(c.pending.len(), 16);
        assert_eq!(c.pending.front().map(|(id, _)| *id), Some(5));
        assert_eq!(up.stats.pending_dropped.get(), 4);
        assert_eq!(out.lines().count(), 20, "every request was still sent");
    }
}
