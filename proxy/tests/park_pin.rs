//! Park and pin are kept per worker name by the router: a parked miner that
//! reconnects is given no job until it is unparked, and a pin survives a
//! reconnection. Two fixture SV1 pools behind a real proxy, one raw SV1
//! client.

use gridproxy_fixtures::sv1_pool::{self, Sv1Pool, Sv1PoolConfig};
use gridproxy_proxy::{Proxy, ProxyConfig};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::tcp::OwnedReadHalf;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

const WORKER: &str = "acct.rig1";
/// The pools send a new job this often: a miner given work sees one soon.
const JOB_EVERY: Duration = Duration::from_millis(200);

async fn pool(name: &str, stop: &CancellationToken) -> Sv1Pool {
    let cfg = Sv1PoolConfig {
        name: name.into(),
        job_interval: JOB_EVERY,
        ..Default::default()
    };
    sv1_pool::spawn("127.0.0.1:0".parse().unwrap(), cfg, stop.clone())
        .await
        .unwrap()
}

/// A subscribed and authorized SV1 connection.
struct Miner {
    lines: tokio::io::Lines<BufReader<OwnedReadHalf>>,
    _write: tokio::net::tcp::OwnedWriteHalf,
}

impl Miner {
    async fn connect(addr: SocketAddr) -> Miner {
        let s = TcpStream::connect(addr).await.unwrap();
        let (r, mut w) = s.into_split();
        w.write_all(
            format!(
                "{{\"id\":1,\"method\":\"mining.subscribe\",\"params\":[\"test/1\"]}}\n\
                 {{\"id\":2,\"method\":\"mining.authorize\",\"params\":[\"{WORKER}\",\"x\"]}}\n"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
        let mut m = Miner {
            lines: BufReader::new(r).lines(),
            _write: w,
        };
        m.next_until(Duration::from_secs(5), |l| l.contains("\"id\":2"))
            .await
            .expect("authorize answered");
        m
    }

    /// Read lines until one satisfies `want` (returned) or `within` passes
    /// (None). Panics if the proxy closes the connection.
    async fn next_until(
        &mut self,
        within: Duration,
        want: impl Fn(&str) -> bool,
    ) -> Option<String> {
        let end = Instant::now() + within;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.lines.next_line()).await {
                Err(_) => return None,
                Ok(Ok(Some(l))) if want(&l) => return Some(l),
                Ok(Ok(Some(_))) => {}
                Ok(r) => panic!("connection closed by the proxy: {r:?}"),
            }
        }
    }

    async fn notify_within(&mut self, within: Duration) -> Option<String> {
        self.next_until(within, |l| l.contains("mining.notify"))
            .await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parked_worker_reconnects_parked_and_a_pin_survives_reconnection() {
    let stop = CancellationToken::new();
    let (a, b) = (pool("a", &stop).await, pool("b", &stop).await);
    let cfg = ProxyConfig::from_toml(&format!(
        "[[pools]]\nname='a'\naddress='{}'\nprotocol='sv1'\nuser='u'\npriority=0\n\
         [[pools]]\nname='b'\naddress='{}'\nprotocol='sv1'\nuser='u'\npriority=1\n\
         [listen]\nsv1='127.0.0.1:0'\n",
        a.addr(),
        b.addr()
    ))
    .unwrap();
    let proxy = Proxy::start(cfg, CancellationToken::new()).await.unwrap();
    let addr = proxy.sv1_addr.unwrap();
    let router = proxy.ctx.router.clone();
    let miners_on = |pool: usize| router.shares()[pool].miners;
    let end = Instant::now() + Duration::from_secs(10);
    while !router.shares().iter().all(|p| p.live) {
        assert!(
            Instant::now() < end,
            "pools never up: {:?}",
            router.shares()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Connected and given work from its home pool.
    let mut m = Miner::connect(addr).await;
    assert!(m.notify_within(Duration::from_secs(10)).await.is_some());
    assert_eq!(miners_on(0), 1);

    // Parked, then the miner reconnects: no job at all on the new connection.
    assert_eq!(router.park(|w| w == WORKER), 1);
    drop(m);
    let mut m = Miner::connect(addr).await;
    let leaked = m.notify_within(JOB_EVERY * 8).await;
    assert!(
        leaked.is_none(),
        "a parked miner got a job after reconnecting: {leaked:?}"
    );
    assert_eq!(miners_on(0) + miners_on(1), 0, "parked: no pool");

    // Unparked: work resumes on the same connection.
    assert_eq!(router.unpark(|w| w == WORKER), 1);
    assert!(
        m.notify_within(Duration::from_secs(5)).await.is_some(),
        "no job after unpark"
    );

    // Pinned to the backup, then the miner reconnects: still on the backup.
    assert_eq!(router.move_to(|w| w == WORKER, Some(1)), 1);
    assert_eq!(miners_on(1), 1);
    drop(m);
    let mut m = Miner::connect(addr).await;
    assert!(m.notify_within(Duration::from_secs(5)).await.is_some());
    // The old session leaves the router when the proxy sees its socket
    // close, which may come after the new one is placed: wait for that.
    let t0 = Instant::now();
    while miners_on(0) + miners_on(1) > 1 && t0.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        (miners_on(0), miners_on(1)),
        (0, 1),
        "the pin was lost on reconnection"
    );

    // Unpinned: back home; nothing is kept for a worker with no park or pin.
    assert_eq!(router.move_to(|w| w == WORKER, None), 1);
    assert_eq!((miners_on(0), miners_on(1)), (1, 0));
    assert_eq!(router.controlled_workers(), 0);
    drop(m);
    assert!(proxy.shutdown(Duration::from_secs(5)).await);
    stop.cancel();
}
