//! SV1 upstream: one JSON-lines connection to a pool that speaks only SV1,
//! multiplexing every miner by splitting the pool's extranonce2 space.
//! Responses are matched by order (pools and proxies reuse ids).

use super::{PoolView, UpJob, UpJobId, UpShare};
use crate::config::{ExtranonceConfig, PoolConfig, RoutingConfig};
use crate::error::UpstreamError;
use crate::stats::{PoolStats, WorkerStats};
use bytes::BytesMut;
use gridproxy_protocol::difficulty::Target;
use gridproxy_protocol::share::prevhash_from_sv1;
use gridproxy_protocol::sv1::{self, encode, LineCodec, ServerMessage};
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

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
    Authorize,
    Submit {
        worker: Arc<WorkerStats>,
        difficulty: f64,
    },
}

struct Conn {
    en1: Vec<u8>,
    en2_size: usize,
    mask: u32,
    target: Target,
    next_target: Option<Target>,
    authorized: bool,
    pending: VecDeque<Pending>,
    next_id: u64,
    last_job_at: Instant,
}

impl Sv1Upstream {
    /// Run until shutdown.
    pub async fn run(
        self,
        view: watch::Sender<PoolView>,
        shares: mpsc::Receiver<UpShare>,
        shutdown: CancellationToken,
    ) {
        super::reconnect_loop(&self, view, shares, shutdown).await
    }

    fn request(&self, c: &mut Conn, out: &mut String, method: &str, params: Value, p: Pending) {
        out.push_str(&encode::request(&json!(c.next_id), method, params));
        c.next_id += 1;
        c.pending.push_back(p);
    }

    async fn serve(
        &self,
        view: &watch::Sender<PoolView>,
        shares: &mut mpsc::Receiver<UpShare>,
    ) -> Result<(), UpstreamError> {
        let stream = super::connect(&self.pool.address.endpoint).await?;
        let (mut rd, mut wr) = stream.into_split();
        let mut c = Conn {
            en1: vec![],
            en2_size: 0,
            mask: 0,
            target: Target::from_difficulty(1.0),
            next_target: None,
            authorized: false,
            pending: VecDeque::new(),
            next_id: 1,
            last_job_at: Instant::now(),
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
        let epoch = view.borrow().epoch + 1;
        view.send_modify(|v| {
            v.epoch = epoch;
            v.live = false;
            v.job = None;
        });
        let mut codec = LineCodec::default();
        let mut buf = BytesMut::with_capacity(16 * 1024);
        let no_job = Duration::from_secs(self.routing.no_job_timeout_secs.max(1));
        let need = self.extranonce.miner_bytes + self.extranonce.extranonce2_size;
        loop {
            tokio::select! {
                r = rd.read_buf(&mut buf) => {
                    match r {
                        Ok(0) => return Err(UpstreamError::Closed),
                        Err(e) => return Err(UpstreamError::Read(e)),
                        Ok(_) => {}
                    }
                    while let Some(line) = codec.next_line(&mut buf).map_err(UpstreamError::PoolSent)? {
                        let m = sv1::parse_server(&line).map_err(UpstreamError::PoolSent)?;
                        self.handle(&mut c, m, view, epoch, need)?;
                    }
                }
                s = shares.recv() => {
                    let Some(s) = s else { return Ok(()) };
                    let mut out = String::new();
                    let mut next = Some(s);
                    while let Some(s) = next.take() {
                        if s.epoch == epoch {
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
        }
    }

    fn handle(
        &self,
        c: &mut Conn,
        m: ServerMessage,
        view: &watch::Sender<PoolView>,
        epoch: u64,
        need: usize,
    ) -> Result<(), UpstreamError> {
        match m {
            ServerMessage::Response { result, error, .. } => match c.pending.pop_front() {
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
                    let rollable = size;
                    view.send_modify(|v| v.rollable = rollable);
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
                    info!(pool = %self.pool.name, en2 = c.en2_size, mask = format!("{:08x}", c.mask), "sv1 upstream ready");
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
                let mut prefix = n.coinb1;
                prefix.extend_from_slice(&c.en1);
                let job = Arc::new(UpJob {
                    id: UpJobId::Sv1(n.job_id),
                    version: n.version,
                    version_mask: c.mask,
                    prev_hash: prevhash_from_sv1(&n.prev_hash),
                    nbits: n.nbits,
                    ntime: n.ntime,
                    coinbase_prefix: prefix,
                    coinbase_suffix: n.coinb2,
                    merkle_branch: n.merkle_branch,
                    clean: n.clean_jobs,
                });
                let (target, rollable, live) =
                    (c.target, c.en2_size, c.authorized && c.en2_size >= need);
                view.send_modify(|v| {
                    v.epoch = epoch;
                    v.live = live;
                    v.job = Some(job);
                    v.target = target;
                    v.rollable = rollable;
                });
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
                c.en1 = extranonce1;
                c.en2_size = extranonce2_size;
                // Jobs built on the old extranonce1 are void; wait for the next notify.
                view.send_modify(|v| {
                    v.live = false;
                    v.job = None;
                });
            }
            ServerMessage::SetVersionMask(m) => c.mask = m & ASK_MASK,
            ServerMessage::Reconnect => return Err(UpstreamError::Reconnect),
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
        view: &watch::Sender<PoolView>,
        shares: &mut mpsc::Receiver<UpShare>,
    ) -> Result<(), UpstreamError> {
        self.serve(view, shares).await
    }
}
