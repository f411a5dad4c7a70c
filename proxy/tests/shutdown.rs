//! `Proxy::shutdown` waits for every task the engine started: listeners,
//! miner sessions, upstream sessions and the router's monitor.

use gridproxy_proxy::{Proxy, ProxyConfig};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

#[tokio::test]
async fn shutdown_waits_for_sessions_and_upstreams() {
    // A pool that is never there: its upstream task keeps reconnecting.
    let cfg = ProxyConfig::from_toml(
        "[[pools]]\nname='gone'\naddress='127.0.0.1:1'\nprotocol='sv1'\nuser='u'\n\
         [listen]\nsv1='127.0.0.1:0'\n",
    )
    .unwrap();
    let proxy = Proxy::start(cfg, CancellationToken::new()).await.unwrap();
    let addr = proxy.sv1_addr.unwrap();

    // A miner that subscribed: its session task is running.
    let mut miner = TcpStream::connect(addr).await.unwrap();
    miner
        .write_all(b"{\"id\":1,\"method\":\"mining.subscribe\",\"params\":[]}\n")
        .await
        .unwrap();
    let (rd, _wr) = miner.split();
    let mut lines = BufReader::new(rd).lines();
    let first = tokio::time::timeout(Duration::from_secs(5), lines.next_line())
        .await
        .expect("subscribe answered")
        .unwrap()
        .expect("a line");
    assert!(first.contains("\"id\":1"), "{first}");
    assert!(
        !proxy.ctx.tasks.is_empty(),
        "listener, session and upstream tasks are tracked"
    );

    assert!(
        proxy.shutdown(Duration::from_secs(5)).await,
        "every engine task ended within 5 s"
    );
    assert!(proxy.ctx.tasks.is_empty() && proxy.ctx.tasks.is_closed());
    // The miner's connection was closed by its ended session.
    let end = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match lines.next_line().await {
                Ok(Some(_)) => continue,
                other => return other,
            }
        }
    })
    .await
    .expect("the session closed the socket");
    assert!(matches!(end, Ok(None) | Err(_)), "{end:?}");
    // And nothing listens any more.
    assert!(TcpStream::connect(addr).await.is_err());
}
