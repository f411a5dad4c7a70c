//! SV2 upstream: Noise with the pool's authority key pinned, one extended
//! channel, jobs normalised into [`UpJob`]s, shares sent as
//! `SubmitSharesExtended` and the pool's answers credited per worker.

use super::extensions::{Negotiated, Negotiation};
use super::{PoolView, UpJob, UpJobId, UpShare};
use crate::config::{ExtranonceConfig, PoolConfig, RoutingConfig};
use crate::endpoint::Endpoint;
use crate::error::UpstreamError;
use crate::stats::{PoolStats, WorkerStats};
use crate::sv2_io::{connect_noise, next_msg, unix_now};
use futures::SinkExt;
use gridproxy_protocol::difficulty::Target;
use gridproxy_protocol::sv2::{
    common_messages_sv2::{Protocol, SetupConnectionOwned},
    mining_sv2::{OpenExtendedMiningChannelOwned, SubmitSharesExtendedOwned, UpdateChannelOwned},
    AuthorityPublicKey, CommonMessagesOwned, Frame, Message, MiningOwned, NoiseCodec, Sv2Error,
};
use gridproxy_protocol::sv2_ext;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// BIP320 general-purpose version bits, granted when the pool allows rolling.
pub const BIP320_MASK: u32 = 0x1fff_e000;

/// Everything one SV2 upstream task needs.
pub struct Sv2Upstream {
    /// Pool settings.
    pub pool: PoolConfig,
    /// Routing timeouts.
    pub routing: RoutingConfig,
    /// Extranonce layout (how many bytes to ask for).
    pub extranonce: ExtranonceConfig,
    /// Counters.
    pub stats: Arc<PoolStats>,
}

struct Pending {
    worker: Arc<WorkerStats>,
    difficulty: f64,
}

/// Per-connection state.
struct Conn {
    channel_id: u32,
    /// SRI pools send jobs and prev hashes to the group channel.
    group_id: u32,
    extranonce_prefix: Vec<u8>,
    rollable: usize,
    target: Target,
    future_jobs: HashMap<u32, Job>,
    last_job: Option<Job>,
    tip: Option<([u8; 32], u32, u32)>,
    seq: u32,
    pending: BTreeMap<u32, Pending>,
    last_job_at: Instant,
    /// 0x0002 granted: shares carry the worker's `user_identity` TLV.
    worker_identity: bool,
}

impl Conn {
    fn is_mine(&self, channel_id: u32) -> bool {
        channel_id == self.channel_id || channel_id == self.group_id
    }
}

#[derive(Clone)]
struct Job {
    id: u32,
    version: u32,
    rolling: bool,
    prefix: Vec<u8>,
    suffix: Vec<u8>,
    path: Vec<[u8; 32]>,
    /// The channel's target when the job arrived: the pool judges the
    /// job's shares by it, whatever SetTarget says later (as SRI's pool keeps
    /// a target per job).
    target: Target,
}

impl Sv2Upstream {
    /// Run until shutdown: connect, serve, reconnect with backoff.
    pub async fn run(
        self,
        view: watch::Sender<PoolView>,
        shares: mpsc::Receiver<UpShare>,
        shutdown: CancellationToken,
        drain: CancellationToken,
    ) {
        super::reconnect_loop(&self, view, shares, shutdown, drain).await
    }

    async fn open(
        &self,
        endpoint: &Endpoint,
        key: &AuthorityPublicKey,
    ) -> Result<(Framed<TcpStream, NoiseCodec>, Conn), UpstreamError> {
        let stream = super::connect(endpoint).await?;
        let addr = stream
            .peer_addr()
            .map_err(|source| UpstreamError::Connect {
                endpoint: endpoint.to_string(),
                tried: vec![],
                source,
            })?;
        let mut framed = connect_noise(stream, key).await.map_err(|e| match e {
            gridproxy_protocol::sv2::Sv2Error::BadCertificate => UpstreamError::NotSigned {
                pool: self.pool.name.clone(),
                addr,
                key: *key,
            },
            other => other.into(),
        })?;
        let setup = SetupConnectionOwned {
            protocol: Protocol::MiningProtocol,
            min_version: 2,
            max_version: 2,
            flags: 0,
            // The name as configured, as an HTTP client sends Host.
            endpoint_host: endpoint
                .host
                .clone()
                .try_into()
                .map_err(|_| UpstreamError::FieldTooLong("endpoint host"))?,
            endpoint_port: endpoint.port,
            vendor: "gridproxy"
                .to_string()
                .try_into()
                .map_err(|_| UpstreamError::FieldTooLong("vendor"))?,
            hardware_version: "proxy"
                .to_string()
                .try_into()
                .map_err(|_| UpstreamError::FieldTooLong("hw"))?,
            firmware: env!("CARGO_PKG_VERSION")
                .to_string()
                .try_into()
                .map_err(|_| UpstreamError::FieldTooLong("fw"))?,
            device_id: "gridproxy"
                .to_string()
                .try_into()
                .map_err(|_| UpstreamError::FieldTooLong("device"))?,
        };
        let setup_at = Instant::now();
        framed
            .send(Message::Common(CommonMessagesOwned::SetupConnection(setup)))
            .await?;
        match next_msg(&mut framed).await? {
            Message::Common(CommonMessagesOwned::SetupConnectionSuccess(_)) => {}
            Message::Common(CommonMessagesOwned::SetupConnectionError(e)) => {
                return Err(UpstreamError::SetupRefused(
                    String::from_utf8_lossy(e.error_code.as_bytes()).into_owned(),
                ))
            }
            other => return Err(UpstreamError::UnexpectedSetupReply(name(&other))),
        }
        let negotiated = self.negotiate(&mut framed, setup_at.elapsed()).await?;
        let need = (self.extranonce.miner_bytes + self.extranonce.extranonce2_size) as u16;
        let open = OpenExtendedMiningChannelOwned {
            request_id: 1,
            user_identity: truncate_identity(&self.pool.user)
                .try_into()
                .map_err(|_| UpstreamError::FieldTooLong("user identity"))?,
            nominal_hash_rate: self.pool.nominal_hashrate,
            max_target: [0xff; 32].into(),
            min_extranonce_size: need,
        };
        framed
            .send(Message::Mining(MiningOwned::OpenExtendedMiningChannel(
                open,
            )))
            .await?;
        // Jobs may come right after the success; they are handled in the main loop.
        loop {
            match next_msg(&mut framed).await? {
                Message::Mining(MiningOwned::OpenExtendedMiningChannelSuccess(s)) => {
                    let rollable = s.extranonce_size as usize;
                    if rollable < need as usize {
                        return Err(UpstreamError::ExtranonceTooSmall {
                            got: rollable,
                            need: need as usize,
                        });
                    }
                    let conn = Conn {
                        channel_id: s.channel_id,
                        group_id: s.group_channel_id,
                        extranonce_prefix: s.extranonce_prefix.as_bytes().to_vec(),
                        rollable,
                        target: Target::from_le_bytes(s.target.to_array()),
                        future_jobs: HashMap::new(),
                        last_job: None,
                        tip: None,
                        seq: 0,
                        pending: BTreeMap::new(),
                        last_job_at: Instant::now(),
                        worker_identity: negotiated.worker_identity,
                    };
                    self.stats.identity_negotiated(negotiated.result);
                    return Ok((framed, conn));
                }
                Message::Mining(MiningOwned::OpenMiningChannelError(e)) => {
                    return Err(UpstreamError::OpenRefused(
                        String::from_utf8_lossy(e.error_code.as_bytes()).into_owned(),
                    ))
                }
                other => {
                    debug!(pool = %self.pool.name, msg = name(&other), "ignored before channel open")
                }
            }
        }
    }

    /// Extension negotiation right after `SetupConnection.Success` (see
    /// [`super::extensions`]): 0x0002 when `worker_identity` is on.
    async fn negotiate(
        &self,
        framed: &mut Framed<TcpStream, NoiseCodec>,
        setup_rtt: Duration,
    ) -> Result<Negotiated, UpstreamError> {
        let neg = Negotiation::new(self.pool.worker_identity);
        framed.send(neg.request()).await?;
        let deadline = Instant::now() + super::extensions::answer_wait(setup_rtt);
        let negotiated = loop {
            match tokio::time::timeout_at(deadline, next_msg(framed)).await {
                Err(_) => {
                    warn!(pool = %self.pool.name, "no answer to RequestExtensions: going on without extensions (a pool without extension negotiation ignores it)");
                    break neg.no_answer();
                }
                Ok(msg) => {
                    let msg = msg?;
                    match neg.on_message(&msg) {
                        Some(Ok(answer)) => break answer,
                        Some(Err(e)) => {
                            self.stats.identity_negotiated(neg.refused().result);
                            return Err(e);
                        }
                        None => {
                            debug!(pool = %self.pool.name, msg = name(&msg), "ignored while negotiating extensions")
                        }
                    }
                }
            }
        };
        info!(pool = %self.pool.name, worker_identity = negotiated.worker_identity, result = negotiated.result.as_str(), "sv2 extensions negotiated (0x0002 worker-specific hashrate tracking)");
        Ok(negotiated)
    }

    async fn serve(
        &self,
        endpoint: &Endpoint,
        key: &AuthorityPublicKey,
        view: &watch::Sender<PoolView>,
        shares: &mut mpsc::Receiver<UpShare>,
        drain: &CancellationToken,
    ) -> Result<(), UpstreamError> {
        // Still setting up when the drain starts: no share was sent on this
        // connection, so nothing is owed (queued shares are an earlier epoch's).
        let Some(open) = drain
            .run_until_cancelled(tokio::time::timeout(
                Duration::from_secs(10),
                self.open(endpoint, key),
            ))
            .await
        else {
            return Ok(());
        };
        let (mut framed, mut conn) = open.map_err(|_| UpstreamError::SetupTimeout)??;
        self.stats.connects.inc();
        self.stats.set_error(None);
        let epoch = view.borrow().epoch + 1;
        view.send_modify(|v| {
            v.epoch = epoch;
            v.live = false;
            v.job = None;
            v.target = conn.target;
            v.rollable = conn.rollable;
        });
        info!(pool = %self.pool.name, channel = conn.channel_id, rollable = conn.rollable, "sv2 upstream channel open");
        let no_job = Duration::from_secs(self.routing.no_job_timeout_secs.max(1));
        let mut heard = tokio::time::Instant::now();
        // The channel's nominal hashrate, as the pool knows it.
        let mut nominal = self.pool.nominal_hashrate as f64;
        self.stats.set_channel_nominal(nominal);
        let update_every = Duration::from_secs(self.routing.channel_update_secs.max(1));
        let fraction = self.routing.channel_update_fraction;
        let mut update_at = Instant::now() + update_every;
        let result = loop {
            if crate::drain::upstream_done(drain.is_cancelled(), shares.len(), conn.pending.len()) {
                break Ok(());
            }
            let deadline = conn.last_job_at + no_job;
            tokio::select! {
                // Wakes the loop once to check the condition above.
                _ = drain.cancelled(), if !drain.is_cancelled() => {}
                _ = tokio::time::sleep_until(heard + crate::drain::POOL_QUIET), if drain.is_cancelled() => {
                    warn!(pool = %self.pool.name, unanswered = conn.pending.len(), "pool silent during the drain: not waiting for the rest of its answers");
                    break Ok(());
                }
                f = next_msg(&mut framed) => {
                    let msg = match f {
                        Ok(m) => m,
                        Err(e) => break Err(e.into()),
                    };
                    heard = tokio::time::Instant::now();
                    if let Err(e) = self.handle(&mut conn, msg, view, epoch) {
                        break Err(e);
                    }
                }
                s = shares.recv() => {
                    let Some(s) = s else { break Ok(()) };
                    // Send this share and whatever else is queued in one flush.
                    let mut batch = vec![s];
                    while batch.len() < 256 {
                        match shares.try_recv() {
                            Ok(s) => batch.push(s),
                            Err(_) => break,
                        }
                    }
                    let mut err = None;
                    for s in batch {
                        if s.epoch != epoch {
                            continue; // built for an earlier connection: the pool no longer knows its job
                        }
                        let UpJobId::Sv2(job_id) = s.job_id else { continue };
                        conn.seq = conn.seq.wrapping_add(1);
                        let submit = SubmitSharesExtendedOwned {
                            channel_id: conn.channel_id,
                            sequence_number: conn.seq,
                            job_id,
                            nonce: s.nonce,
                            ntime: s.ntime,
                            version: s.version,
                            extranonce: match s.extranonce.try_into() {
                                Ok(e) => e,
                                Err(_) => continue,
                            },
                        };
                        let frame = match share_frame(submit, conn.worker_identity.then_some(s.worker.name.as_str())) {
                            Ok(f) => f,
                            Err(e) => {
                                warn!(pool = %self.pool.name, worker = %s.worker.name, error = %e, "share not encodable: dropped");
                                continue;
                            }
                        };
                        self.remember(&mut conn, Pending { worker: s.worker, difficulty: s.difficulty });
                        self.stats.submitted.inc();
                        if let Err(e) = framed.feed(frame).await {
                            err = Some(e);
                            break;
                        }
                    }
                    if let Some(e) = err { break Err(e.into()); }
                    if let Err(e) = SinkExt::<Message>::flush(&mut framed).await { break Err(e.into()); }
                }
                _ = tokio::time::sleep_until(update_at), if fraction > 0.0 => {
                    update_at = Instant::now() + update_every;
                    let measured = self.stats.measured_hashrate();
                    if needs_update(nominal, measured, fraction) {
                        // The pool sets the channel's target from it (it answers SetTarget).
                        let update = UpdateChannelOwned {
                            channel_id: conn.channel_id,
                            nominal_hash_rate: measured as f32,
                            maximum_target: [0xff; 32].into(),
                        };
                        if let Err(e) = framed.send(Message::Mining(MiningOwned::UpdateChannel(update))).await {
                            break Err(e.into());
                        }
                        info!(pool = %self.pool.name, channel = conn.channel_id, from = nominal, to = measured, "channel nominal hashrate updated to the measured one");
                        nominal = measured;
                        self.stats.set_channel_nominal(nominal);
                        self.stats.channel_updates.inc();
                    }
                }
                _ = tokio::time::sleep_until(deadline) => break Err(UpstreamError::NoJob(no_job)),
            }
        };
        self.stats.identity_lost();
        if !conn.pending.is_empty() {
            self.stats.unanswered.add(conn.pending.len() as u64);
            warn!(pool = %self.pool.name, unanswered = conn.pending.len(), "connection ended with shares unanswered");
        }
        result
    }

    /// Keep a sent share (sequence `c.seq`) until the pool answers; past
    /// `routing.max_pending_shares` the oldest is given up.
    fn remember(&self, c: &mut Conn, p: Pending) {
        if c.pending.len() >= self.routing.max_pending_shares {
            c.pending.pop_first();
            self.stats.pending_dropped.inc();
        }
        c.pending.insert(c.seq, p);
    }

    /// Keep a future job until a prev hash activates it; past
    /// `routing.max_future_jobs` the oldest (smallest id) is dropped.
    fn keep_future(&self, c: &mut Conn, job: Job) {
        if c.future_jobs.len() >= self.routing.max_future_jobs {
            if let Some(&old) = c.future_jobs.keys().min() {
                c.future_jobs.remove(&old);
                self.stats.future_jobs_dropped.inc();
            }
        }
        c.future_jobs.insert(job.id, job);
    }

    fn handle(
        &self,
        c: &mut Conn,
        msg: Message,
        view: &watch::Sender<PoolView>,
        epoch: u64,
    ) -> Result<(), UpstreamError> {
        let Message::Mining(m) = msg else {
            debug!(pool = %self.pool.name, msg = name(&msg), "ignored");
            return Ok(());
        };
        match m {
            MiningOwned::NewExtendedMiningJob(j) if c.is_mine(j.channel_id) => {
                self.stats.jobs.inc();
                let job = Job {
                    id: j.job_id,
                    version: j.version,
                    rolling: j.version_rolling_allowed,
                    prefix: j.coinbase_tx_prefix.as_bytes().to_vec(),
                    suffix: j.coinbase_tx_suffix.as_bytes().to_vec(),
                    path: j.merkle_path.iter().map(|h| h.to_array()).collect(),
                    target: c.target,
                };
                match j.min_ntime.into_inner() {
                    None => self.keep_future(c, job),
                    Some(t) => {
                        if let Some(tip) = c.tip.as_mut() {
                            tip.2 = tip.2.max(t);
                        }
                        c.last_job = Some(job);
                        self.publish(c, view, false, epoch);
                    }
                }
            }
            MiningOwned::SetNewPrevHash(p) if c.is_mine(p.channel_id) => {
                c.tip = Some((p.prev_hash.to_array(), p.nbits, p.min_ntime));
                if let Some(job) = c.future_jobs.remove(&p.job_id) {
                    c.last_job = Some(job);
                }
                c.future_jobs.clear();
                self.publish(c, view, true, epoch);
            }
            MiningOwned::SetTarget(t) if c.is_mine(t.channel_id) => {
                c.target = Target::from_le_bytes(t.maximum_target.to_array());
                let target = c.target;
                view.send_modify(|v| v.target = target);
            }
            MiningOwned::SetExtranoncePrefix(p) if c.is_mine(p.channel_id) => {
                c.extranonce_prefix = p.extranonce_prefix.as_bytes().to_vec();
                self.publish(c, view, true, epoch);
            }
            MiningOwned::SubmitSharesSuccess(s) if s.channel_id == c.channel_id => {
                let acked: Vec<u32> = c
                    .pending
                    .range(..=s.last_sequence_number)
                    .map(|(k, _)| *k)
                    .collect();
                if acked.len() as u32 != s.new_submits_accepted_count {
                    debug!(pool = %self.pool.name, ours = acked.len(), theirs = s.new_submits_accepted_count, "ack count differs");
                }
                for k in acked {
                    if let Some(p) = c.pending.remove(&k) {
                        p.worker.upstream_accepted.inc();
                        self.stats.accept(p.difficulty);
                    }
                }
            }
            MiningOwned::SubmitSharesError(e) if e.channel_id == c.channel_id => {
                let reason = String::from_utf8_lossy(e.error_code.as_bytes()).into_owned();
                if let Some(p) = c.pending.remove(&e.sequence_number) {
                    p.worker.upstream_rejected.inc();
                }
                self.stats.reject(&reason);
                debug!(pool = %self.pool.name, seq = e.sequence_number, %reason, "pool rejected share");
            }
            MiningOwned::UpdateChannelError(e) if e.channel_id == c.channel_id => {
                warn!(pool = %self.pool.name, reason = %String::from_utf8_lossy(e.error_code.as_bytes()), "pool refused the channel's new nominal hashrate");
            }
            MiningOwned::CloseChannel(cc) if cc.channel_id == c.channel_id => {
                return Err(UpstreamError::ChannelClosed(
                    String::from_utf8_lossy(cc.reason_code.as_bytes()).into_owned(),
                ));
            }
            other => {
                debug!(pool = %self.pool.name, msg = ?std::mem::discriminant(&other), "ignored mining message")
            }
        }
        Ok(())
    }

    fn publish(&self, c: &mut Conn, view: &watch::Sender<PoolView>, clean: bool, epoch: u64) {
        let (Some(job), Some((prev_hash, nbits, min_ntime))) = (&c.last_job, c.tip) else {
            return;
        };
        c.last_job_at = Instant::now();
        let mut prefix = Vec::with_capacity(job.prefix.len() + c.extranonce_prefix.len());
        prefix.extend_from_slice(&job.prefix);
        prefix.extend_from_slice(&c.extranonce_prefix);
        let up = Arc::new(UpJob {
            sv1_notify: Default::default(),
            id: UpJobId::Sv2(job.id),
            version: job.version,
            version_mask: if job.rolling { BIP320_MASK } else { 0 },
            prev_hash,
            nbits,
            ntime: min_ntime.max(unix_now()),
            coinbase_prefix: prefix,
            coinbase_suffix: job.suffix.clone(),
            merkle_branch: job.path.clone(),
            clean,
            target: Some(job.target),
        });
        let (target, rollable) = (c.target, c.rollable);
        if clean {
            // One line per block: operators see new blocks; bench/fanout.sh
            // takes the start of each fan-out from it.
            info!(
                pool = %self.pool.name,
                prev_hash = %hex::encode(gridproxy_protocol::share::prevhash_to_sv1(&prev_hash)),
                "new block from the pool"
            );
        }
        view.send_modify(|v| {
            v.epoch = epoch;
            v.live = true;
            v.job = Some(up);
            v.published = std::time::Instant::now();
            v.target = target;
            v.rollable = rollable;
        });
    }
}

/// A share's frame: `SubmitSharesExtended`, followed by the worker's
/// `user_identity` TLV when 0x0002 was granted (0x0002 §1.1 and §2: every
/// share then carries it; the name is cut to 32 bytes by
/// [`sv2_ext::tlv_identity`]).
fn share_frame(
    submit: SubmitSharesExtendedOwned,
    identity: Option<&str>,
) -> Result<Frame, Sv2Error> {
    let msg = Message::Mining(MiningOwned::SubmitSharesExtended(submit));
    match identity {
        None => Frame::from_message(msg),
        Some(name) => sv2_ext::frame_with_tlvs(msg, &sv2_ext::user_identity_tlv(name)?),
    }
}

/// SV2 `user_identity` is at most 255 bytes; cut at a char boundary.
pub fn truncate_identity(s: &str) -> String {
    let mut end = s.len().min(255);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

fn name(m: &Message) -> String {
    let s = format!("{m:?}");
    s.chars().take(60).collect()
}

impl super::Session for Sv2Upstream {
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
        // Config validation refuses a bad key; report it here too rather than spin.
        let key: AuthorityPublicKey = self
            .pool
            .authority_key()
            .ok_or(UpstreamError::NoAuthorityKey)?
            .parse()
            .map_err(UpstreamError::BadAuthorityKey)?;
        self.serve(target, &key, view, shares, drain).await
    }
}

/// Whether a channel's nominal hashrate should follow the measured one:
/// both known, and apart by more than `fraction` of the nominal.
fn needs_update(nominal: f64, measured: f64, fraction: f64) -> bool {
    fraction > 0.0
        && nominal > 0.0
        && measured.is_finite()
        && measured > 0.0
        && (measured - nominal).abs() > fraction * nominal
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ProxyConfig;

    fn upstream(extra: &str) -> Sv2Upstream {
        let cfg = ProxyConfig::from_toml(&format!(
            "[[pools]]\nname='p'\naddress='127.0.0.1:1'\nprotocol='sv2'\n\
             authority_pubkey='9auqWEzQDVyd2oe1JVGFLMLHZtCo2FFqZwtKA5gd9xbuEu7PH72'\nuser='u'\n\
             [routing]\n{extra}"
        ))
        .unwrap();
        Sv2Upstream {
            pool: cfg.pools[0].clone(),
            routing: cfg.routing,
            extranonce: cfg.extranonce,
            stats: Arc::new(PoolStats::new("p")),
        }
    }

    fn conn() -> Conn {
        Conn {
            channel_id: 1,
            group_id: 0,
            extranonce_prefix: vec![],
            rollable: 8,
            target: Target::from_difficulty(1.0),
            future_jobs: HashMap::new(),
            last_job: None,
            tip: None,
            seq: 0,
            pending: BTreeMap::new(),
            last_job_at: Instant::now(),
            worker_identity: false,
        }
    }

    /// A pool that never answers cannot grow the pending queue: past the
    /// cap the oldest share is given up, and counted.
    #[test]
    fn unanswered_shares_are_bounded_oldest_first() {
        let up = upstream("max_pending_shares = 16\n");
        let mut c = conn();
        let worker = Arc::new(WorkerStats::default());
        for _ in 0..20 {
            c.seq += 1;
            up.remember(
                &mut c,
                Pending {
                    worker: worker.clone(),
                    difficulty: 1.0,
                },
            );
        }
        assert_eq!(c.pending.len(), 16);
        assert_eq!(c.pending.keys().next(), Some(&5), "the oldest went first");
        assert_eq!(up.stats.pending_dropped.get(), 4);
    }

    #[test]
    fn the_nominal_hashrate_follows_a_measured_one_that_moved_past_the_fraction() {
        assert!(!needs_update(1e12, 1.05e12, 0.1), "inside the band");
        assert!(!needs_update(1e12, 0.95e12, 0.1), "inside the band");
        assert!(needs_update(1e12, 2e12, 0.1), "doubled");
        assert!(needs_update(1e12, 0.5e12, 0.1), "halved");
        assert!(
            needs_update(1e6, 3e14, 0.1),
            "the default nominal against a real fleet"
        );
        assert!(!needs_update(1e12, 0.0, 0.1), "nothing measured yet");
        assert!(!needs_update(1e12, f64::NAN, 0.1));
        assert!(!needs_update(1e12, 5e12, 0.0), "updates disabled");
    }

    /// Golden bytes: a share as gridproxy frames it once 0x0002 is granted,
    /// against `SubmitSharesExtended` in `05-Mining-Protocol.md` §5.3.11-12
    /// (type 0x1b, `08-Message-Types.md`), the frame header of
    /// `03-Protocol-Overview.md` §3.2 and the TLV of 0x0002 §1.1 / §3.4.3,
    /// written out by hand.
    #[test]
    fn share_frame_with_user_identity_golden_bytes() {
        let submit = || SubmitSharesExtendedOwned {
            channel_id: 1,
            sequence_number: 2,
            job_id: 3,
            nonce: 0x0403_0201,
            ntime: 0x6553_f100,
            version: 0x2000_0000,
            extranonce: vec![0xaa, 0xbb, 0xcc, 0xdd].try_into().unwrap(),
        };
        let ours = share_frame(submit(), Some("Worker_001"))
            .unwrap()
            .to_plain()
            .unwrap();
        #[rustfmt::skip]
        let mut spec: Vec<u8> = vec![
            // header: extension_type U16 = 0x0000 with the channel_msg bit (0x8000),
            // msg_type U8 = 0x1b, msg_length U24 = 29 + 15
            0x00, 0x80, 0x1b, 44, 0x00, 0x00,
            0x01, 0x00, 0x00, 0x00, // channel_id U32
            0x02, 0x00, 0x00, 0x00, // sequence_number U32
            0x03, 0x00, 0x00, 0x00, // job_id U32
            0x01, 0x02, 0x03, 0x04, // nonce U32
            0x00, 0xf1, 0x53, 0x65, // ntime U32
            0x00, 0x00, 0x00, 0x20, // version U32
            0x04, 0xaa, 0xbb, 0xcc, 0xdd, // extranonce B0_32
            // TLV: extension_type U16 = 0x0002, field_type U8 = 0x01, length U16 = 10
            0x02, 0x00, 0x01, 0x0a, 0x00,
        ];
        spec.extend_from_slice(b"Worker_001");
        assert_eq!(ours, spec);
        // Without the extension: the same share, no TLV.
        let plain = share_frame(submit(), None).unwrap().to_plain().unwrap();
        let mut without = spec[..35].to_vec();
        without[3] = 29;
        assert_eq!(plain, without);
        // A name over 32 bytes goes cut by the documented rule.
        let long = "customer-with-a-long-account-name.rig-0001";
        let f = share_frame(submit(), Some(long))
            .unwrap()
            .to_plain()
            .unwrap();
        assert_eq!(f[3], 29 + 5 + 32);
        assert_eq!(&f[35..40], &[0x02, 0x00, 0x01, 32, 0x00]);
        assert_eq!(&f[40..], sv2_ext::tlv_identity(long).as_bytes());
    }

    /// Future jobs a pool never activates are bounded too.
    #[test]
    fn future_jobs_are_bounded_oldest_first() {
        let up = upstream("max_future_jobs = 4\n");
        let mut c = conn();
        for id in 1..=10 {
            up.keep_future(
                &mut c,
                Job {
                    id,
                    version: 0,
                    rolling: false,
                    prefix: vec![],
                    suffix: vec![],
                    path: vec![],
                    target: Target::MAX,
                },
            );
        }
        let mut ids: Vec<u32> = c.future_jobs.keys().copied().collect();
        ids.sort();
        assert_eq!(ids, [7, 8, 9, 10]);
        assert_eq!(up.stats.future_jobs_dropped.get(), 6);
    }
}
