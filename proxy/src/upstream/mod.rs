//! Upstream sessions. Each pool gets one task that owns its connection,
//! reconnects with backoff, and publishes a [`PoolView`] (current job, share
//! target, extranonce space) on a `watch` channel. Miner sessions read the
//! view and send [`UpShare`]s back on a bounded mpsc; the task accounts the
//! pool's answers to each share's worker.
//!
//! Jobs are normalised so SV1 and SV2 upstreams look alike downstream:
//! `coinbase_prefix` already includes whatever extranonce the pool fixed
//! (SV2 channel prefix, SV1 extranonce1); the proxy rolls the next
//! `rollable` bytes.

pub mod extensions;
pub mod sv1;
pub mod sv2;

use crate::config::{PoolConfig, RoutingConfig};
pub use crate::endpoint::Redirect;
use crate::endpoint::{redirect_target, Endpoint};
use crate::error::UpstreamError;
use crate::stats::{PoolStats, WorkerStats};
use gridproxy_protocol::difficulty::Target;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};

/// A job id as the pool knows it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum UpJobId {
    /// SV2 job id.
    Sv2(u32),
    /// SV1 job id string.
    Sv1(String),
}

/// A job normalised across upstream protocols.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpJob {
    /// The pool's id for the job.
    pub id: UpJobId,
    /// Block version before rolling.
    pub version: u32,
    /// Version bits miners may roll (0 = none).
    pub version_mask: u32,
    /// Previous block hash, internal byte order.
    pub prev_hash: [u8; 32],
    /// Compact network target.
    pub nbits: u32,
    /// Job time.
    pub ntime: u32,
    /// Coinbase bytes before the proxy's rollable extranonce bytes.
    pub coinbase_prefix: Vec<u8>,
    /// Coinbase bytes after them.
    pub coinbase_suffix: Vec<u8>,
    /// Merkle branch, internal byte order.
    pub merkle_branch: Vec<[u8; 32]>,
    /// Earlier jobs are void (new block).
    pub clean: bool,
    /// The pool's target for this job's shares, when the pool fixes it per
    /// job (SV2: the channel target when the job arrived); `None`: the
    /// pool's current target applies (SV1 `set_difficulty`).
    pub target: Option<gridproxy_protocol::difficulty::Target>,
    /// The SV1 `mining.notify` part every miner on this job gets alike
    /// (`encode::notify_shared`), built by the first session that sends the
    /// job and shared by the rest: with thousands of miners a new block
    /// would otherwise hex-encode the same coinbase thousands of times. Kept
    /// with the coinbase padding it was built for.
    pub sv1_notify: std::sync::OnceLock<(usize, Arc<str>)>,
}

/// A share worth sending to the pool.
#[derive(Debug)]
pub struct UpShare {
    /// The pool's job id.
    pub job_id: UpJobId,
    /// Exactly `rollable` bytes: miner part ‖ extranonce2 ‖ padding.
    pub extranonce: Vec<u8>,
    /// Header time.
    pub ntime: u32,
    /// Header nonce.
    pub nonce: u32,
    /// Full block version (after rolling).
    pub version: u32,
    /// Difficulty the share was judged at upstream (for accounting).
    pub difficulty: f64,
    /// The worker to credit with the pool's answer.
    pub worker: Arc<WorkerStats>,
    /// The connection epoch of the view the share was built from; shares
    /// from an earlier connection are not sent.
    pub epoch: u64,
}

/// What miners need to know about a pool right now.
#[derive(Debug, Clone)]
pub struct PoolView {
    /// Connected, set up and has a job.
    pub live: bool,
    /// Increments on every (re)connect.
    pub epoch: u64,
    /// The latest job.
    pub job: Option<Arc<UpJob>>,
    /// The pool's share target for this channel.
    pub target: Target,
    /// Extranonce bytes the proxy may roll.
    pub rollable: usize,
    /// Where to send shares.
    pub submit: mpsc::Sender<UpShare>,
    /// When the latest job arrived from the pool (the start of its fan-out).
    pub published: std::time::Instant,
}

/// The handles to one running upstream.
#[derive(Clone)]
pub struct PoolHandle {
    /// Index in the config's pool list.
    pub index: usize,
    /// Counters.
    pub stats: Arc<PoolStats>,
    /// The live view.
    pub view: watch::Receiver<PoolView>,
}

/// Every upstream task of an engine, and the signal that drains them.
#[derive(Clone, Default)]
pub struct Upstreams {
    /// The upstream tasks (a drain waits for them to end).
    pub tracker: tokio_util::task::TaskTracker,
    /// Fires when no share can arrive any more: each upstream then sends
    /// what is queued, waits for the pool's answer to every share it sent,
    /// and ends (see [`crate::drain`]).
    pub drain: tokio_util::sync::CancellationToken,
}

/// Start the upstream task for `pool` (config index `index`), counting into
/// `stats`; it runs on `tasks` (and is tracked by `ups`) until `stop` fires
/// or it has drained.
#[allow(clippy::too_many_arguments)]
pub fn spawn(
    index: usize,
    pool: &PoolConfig,
    routing: &RoutingConfig,
    extranonce: &crate::config::ExtranonceConfig,
    stats: Arc<PoolStats>,
    stop: tokio_util::sync::CancellationToken,
    tasks: &tokio_util::task::TaskTracker,
    ups: &Upstreams,
) -> PoolHandle {
    let (vtx, vrx, srx) = channels();
    match pool.protocol() {
        crate::config::PoolProtocol::Sv2 => {
            let up = sv2::Sv2Upstream {
                pool: pool.clone(),
                routing: routing.clone(),
                extranonce: extranonce.clone(),
                stats: stats.clone(),
            };
            tasks.spawn(
                ups.tracker
                    .track_future(up.run(vtx, srx, stop, ups.drain.clone())),
            );
        }
        crate::config::PoolProtocol::Sv1 => {
            let up = sv1::Sv1Upstream {
                pool: pool.clone(),
                routing: routing.clone(),
                extranonce: extranonce.clone(),
                stats: stats.clone(),
            };
            tasks.spawn(
                ups.tracker
                    .track_future(up.run(vtx, srx, stop, ups.drain.clone())),
            );
        }
    }
    PoolHandle {
        index,
        stats,
        view: vrx,
    }
}

/// Bound on shares queued for one pool (back-pressure, not buffering).
pub const SUBMIT_QUEUE: usize = 65_536;

/// Create the view channel and share queue for a pool.
pub fn channels() -> (
    watch::Sender<PoolView>,
    watch::Receiver<PoolView>,
    mpsc::Receiver<UpShare>,
) {
    let (tx, rx) = mpsc::channel(SUBMIT_QUEUE);
    let (vtx, vrx) = watch::channel(PoolView {
        live: false,
        epoch: 0,
        job: None,
        target: Target::MAX,
        rollable: 0,
        submit: tx,
        published: std::time::Instant::now(),
    });
    (vtx, vrx, rx)
}

/// Backoff for reconnects: doubles from `first` up to 5 s.
pub fn next_backoff(cur: std::time::Duration) -> std::time::Duration {
    (cur * 2).min(std::time::Duration::from_secs(5))
}

/// Bound on one name lookup.
pub const RESOLVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// Bound on one TCP connect (per resolved address).
pub const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Resolve `ep` now (a pool's name is looked up at every connect, so a
/// moved pool is followed on reconnect) and connect to the first of its
/// addresses that accepts, trying each in turn.
pub async fn connect(ep: &Endpoint) -> Result<TcpStream, UpstreamError> {
    let resolve_error = |reason: String| UpstreamError::Resolve {
        endpoint: ep.to_string(),
        reason,
    };
    let addrs = match tokio::time::timeout(RESOLVE_TIMEOUT, ep.resolve()).await {
        Err(_) => {
            return Err(resolve_error(format!(
                "no answer within {RESOLVE_TIMEOUT:?}"
            )))
        }
        Ok(Err(e)) => return Err(resolve_error(e.to_string())),
        Ok(Ok(a)) if a.is_empty() => return Err(resolve_error("no addresses".into())),
        Ok(Ok(a)) => a,
    };
    if ep.ip().is_none() {
        tracing::debug!(endpoint = %ep, ?addrs, "resolved");
    }
    connect_any(ep, &addrs, CONNECT_TIMEOUT).await
}

/// Connect to the first of `addrs` that accepts within `timeout` each.
pub async fn connect_any(
    ep: &Endpoint,
    addrs: &[SocketAddr],
    timeout: std::time::Duration,
) -> Result<TcpStream, UpstreamError> {
    let mut last = std::io::Error::other("no address to connect to");
    for &a in addrs {
        match tokio::time::timeout(timeout, TcpStream::connect(a)).await {
            Ok(Ok(s)) => {
                let _ = s.set_nodelay(true);
                return Ok(s);
            }
            Ok(Err(e)) => last = e,
            Err(_) => {
                last = std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no answer within {timeout:?}"),
                )
            }
        }
        tracing::debug!(endpoint = %ep, addr = %a, error = %last, "connect failed; next address");
    }
    Err(UpstreamError::Connect {
        endpoint: ep.to_string(),
        tried: addrs.to_vec(),
        source: last,
    })
}

/// One upstream protocol's connection: what [`reconnect_loop`] drives.
pub(crate) trait Session {
    /// Pool settings.
    fn pool(&self) -> &PoolConfig;
    /// Routing timeouts.
    fn routing(&self) -> &RoutingConfig;
    /// Counters.
    fn stats(&self) -> &PoolStats;
    /// Connect to `target` (the pool's address, or where it redirected
    /// us), set up and serve until the connection ends, or (once `drain`
    /// fires) until nothing is queued and every share sent has its answer.
    async fn session(
        &self,
        target: &Endpoint,
        view: &watch::Sender<PoolView>,
        shares: &mut mpsc::Receiver<UpShare>,
        drain: &tokio_util::sync::CancellationToken,
    ) -> Result<(), UpstreamError>;
}

/// Longest `client.reconnect` wait honoured.
pub const MAX_RECONNECT_WAIT: std::time::Duration = std::time::Duration::from_secs(600);

/// Run sessions until shutdown: after each one the pool is marked down and
/// the reason recorded, then the task backs off (reset after a long
/// session). A pool's `client.reconnect` is followed (see
/// [`redirect_target`]) after its wait, without backoff; a redirect lasts
/// until a connect to it fails, then the configured address is used again.
pub(crate) async fn reconnect_loop(
    up: &impl Session,
    view: watch::Sender<PoolView>,
    mut shares: mpsc::Receiver<UpShare>,
    shutdown: tokio_util::sync::CancellationToken,
    drain: tokio_util::sync::CancellationToken,
) {
    let first = std::time::Duration::from_millis(up.routing().reconnect_ms.max(10));
    let mut backoff = first;
    let configured = up.pool().address.endpoint.clone();
    let mut target = configured.clone();
    loop {
        if drain.is_cancelled() {
            // Down while draining: what it had sent is lost with the
            // connection, and nothing new can arrive. Nothing to reconnect for.
            if shares.is_empty() {
                tracing::info!(pool = %up.pool().name, "upstream drained: pool down, nothing in flight");
            } else {
                tracing::warn!(pool = %up.pool().name, queued = shares.len(), "pool down during the drain: queued shares not sent");
            }
            return;
        }
        let started = tokio::time::Instant::now();
        let r = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = up.session(&target, &view, &mut shares, &drain) => r,
        };
        view.send_modify(|v| v.live = false);
        if drain.is_cancelled() && r.is_ok() {
            tracing::info!(pool = %up.pool().name, "upstream drained: every share sent has its answer");
            return;
        }
        if started.elapsed() > std::time::Duration::from_secs(30) {
            backoff = first;
        }
        let pool = up.pool();
        let mut delay = backoff;
        let mut grow = true;
        match r {
            Ok(()) => {}
            Err(UpstreamError::Reconnect(r)) => {
                delay = r.wait.min(MAX_RECONNECT_WAIT);
                backoff = first;
                grow = false;
                match redirect_target(&configured, &target, &r) {
                    Ok(to) => {
                        if let Some(to) = to {
                            target = to;
                        }
                        tracing::info!(pool = %pool.name, redirect = %r, next = %target, "pool asked to reconnect");
                        up.stats()
                            .set_error(Some(format!("pool sent client.reconnect {r}")));
                    }
                    Err(why) => {
                        tracing::warn!(pool = %pool.name, redirect = %r, %why, next = %target, "pool asked to reconnect elsewhere: refused, reconnecting here");
                        up.stats().set_error(Some(format!(
                            "pool sent client.reconnect {r}: refused ({why})"
                        )));
                    }
                }
            }
            Err(e) => {
                tracing::warn!(pool = %pool.name, addr = %pool.address, at = %target, error = %e, retry_in = ?backoff, "upstream down");
                up.stats().set_error(Some(e.to_string()));
                let unreachable = matches!(
                    e,
                    UpstreamError::Resolve { .. } | UpstreamError::Connect { .. }
                );
                if unreachable && target != configured {
                    tracing::warn!(pool = %pool.name, from = %target, to = %configured, "redirect target unreachable: back to the configured address");
                    target = configured.clone();
                }
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            // A pool that is down owes no answers: the drain need not wait
            // out the backoff (the top of the loop ends the task).
            _ = drain.cancelled() => {}
            _ = tokio::time::sleep(delay) => {}
        }
        if grow {
            backoff = next_backoff(backoff);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A loopback port nothing listens on.
    fn closed_port() -> SocketAddr {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    }

    /// A pool that refuses every connection, counting the attempts.
    struct Refusing {
        pool: PoolConfig,
        routing: RoutingConfig,
        stats: PoolStats,
        tries: std::sync::atomic::AtomicUsize,
    }

    impl Session for Refusing {
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
            _: &watch::Sender<PoolView>,
            _: &mut mpsc::Receiver<UpShare>,
            _: &tokio_util::sync::CancellationToken,
        ) -> Result<(), UpstreamError> {
            self.tries.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Err(UpstreamError::Connect {
                endpoint: target.to_string(),
                tried: vec![],
                source: std::io::ErrorKind::ConnectionRefused.into(),
            })
        }
    }

    /// A pool that is down when the drain starts owes nothing: its upstream
    /// ends at once instead of sleeping out its reconnect backoff. The clock
    /// is paused, so the task can only end before the backoff by the drain.
    #[tokio::test(start_paused = true)]
    async fn a_drain_ends_the_reconnect_backoff_of_a_pool_that_is_down() {
        let up = Arc::new(Refusing {
            pool: toml::from_str("name = 'down'\naddress = '127.0.0.1:1'\nuser = 'u'").unwrap(),
            routing: RoutingConfig {
                reconnect_ms: 60_000,
                ..Default::default()
            },
            stats: PoolStats::new("down"),
            tries: Default::default(),
        });
        let (vtx, _vrx, srx) = channels();
        let (shutdown, drain) = (
            tokio_util::sync::CancellationToken::new(),
            tokio_util::sync::CancellationToken::new(),
        );
        let task = tokio::spawn({
            let (up, shutdown, drain) = (up.clone(), shutdown.clone(), drain.clone());
            async move { reconnect_loop(&*up, vtx, srx, shutdown, drain).await }
        });
        // Well into the first backoff (60 s) after the refused connect.
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(up.tries.load(std::sync::atomic::Ordering::SeqCst), 1);
        let t0 = tokio::time::Instant::now();
        drain.cancel();
        tokio::time::timeout(Duration::from_secs(1), task)
            .await
            .expect("the drain ends the backoff: the upstream is done without waiting it out")
            .unwrap();
        assert_eq!(
            t0.elapsed(),
            Duration::ZERO,
            "no time passes: the drain alone ended it"
        );
        assert_eq!(
            up.tries.load(std::sync::atomic::Ordering::SeqCst),
            1,
            "no reconnect once draining"
        );
        assert!(!shutdown.is_cancelled());
    }

    #[tokio::test]
    async fn every_resolved_address_is_tried_in_turn() {
        let open = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let good = open.local_addr().unwrap();
        let (dead1, dead2) = (closed_port(), closed_port());
        let ep = Endpoint {
            host: "pool.test".into(),
            port: good.port(),
        };
        let s = connect_any(&ep, &[dead1, dead2, good], Duration::from_secs(5))
            .await
            .expect("the third address accepts");
        assert_eq!(s.peer_addr().unwrap(), good);
        let e = connect_any(&ep, &[dead1, dead2], Duration::from_secs(5))
            .await
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with(&format!("connect pool.test:{}", good.port()))
                && e.contains(&format!("tried {dead1}, {dead2}")),
            "{e}"
        );
    }

    #[tokio::test]
    async fn an_ip_endpoint_connects_without_a_lookup_and_errors_plainly() {
        let dead = closed_port();
        let e = connect(&Endpoint::from(dead))
            .await
            .unwrap_err()
            .to_string();
        assert!(e.starts_with(&format!("connect {dead}: ")), "{e}");
        assert!(!e.contains("tried"), "{e}");
    }

    #[tokio::test]
    async fn a_name_that_does_not_resolve_is_an_upstream_error() {
        // `.invalid` never resolves (RFC 6761).
        let ep = Endpoint {
            host: "pool.gridproxy-test.invalid".into(),
            port: 3333,
        };
        let e = connect(&ep).await.unwrap_err();
        assert!(matches!(e, UpstreamError::Resolve { .. }), "{e:?}");
        assert!(
            e.to_string()
                .starts_with("resolve pool.gridproxy-test.invalid:3333: "),
            "{e}"
        );
    }

    #[tokio::test]
    async fn localhost_resolves_at_connect() {
        let open = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = open.local_addr().unwrap().port();
        let ep = Endpoint::parse(&format!("localhost:{port}")).unwrap();
        let s = connect(&ep).await.expect("localhost reaches 127.0.0.1");
        assert!(s.peer_addr().unwrap().ip().is_loopback());
    }
}
