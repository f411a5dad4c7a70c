//! Connection limits at accept: one source address cannot take every slot,
//! and each refusal is counted.

use gridproxy_proxy::{Proxy, ProxyConfig};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpSocket, TcpStream};
use tokio_util::sync::CancellationToken;

/// Connect from `from` (a loopback address) and subscribe; the first line
/// back, or None when the proxy closed the connection.
async fn subscribe_from(from: &str, to: SocketAddr) -> (TcpStream, Option<String>) {
    let sock = TcpSocket::new_v4().unwrap();
    sock.bind(format!("{from}:0").parse().unwrap()).unwrap();
    let mut s = sock.connect(to).await.unwrap();
    let _ = s
        .write_all(b"{\"id\":1,\"method\":\"mining.subscribe\",\"params\":[]}\n")
        .await;
    let mut line = String::new();
    let got = tokio::time::timeout(
        Duration::from_secs(5),
        BufReader::new(&mut s).read_line(&mut line),
    )
    .await
    .expect("an answer or a close within 5 s");
    let answer = matches!(got, Ok(n) if n > 0).then_some(line);
    (s, answer)
}

/// A proxy with an SV1 listener on a free port, a pool nobody answers on,
/// and `limits` as its `[limits]` table.
async fn start(limits: &str) -> Proxy {
    let cfg = ProxyConfig::from_toml(&format!(
        "[[pools]]\nname='gone'\naddress='127.0.0.1:1'\nprotocol='sv1'\nuser='u'\n\
         [listen]\nsv1='127.0.0.1:0'\n[limits]\n{limits}"
    ))
    .unwrap();
    Proxy::start(cfg, CancellationToken::new()).await.unwrap()
}

#[tokio::test]
async fn one_address_cannot_take_every_slot() {
    let proxy = start("max_connections = 10\nmax_connections_per_ip = 3\n").await;
    let addr = proxy.sv1_addr.unwrap();
    let mut held = Vec::new();
    for _ in 0..3 {
        let (s, a) = subscribe_from("127.0.0.1", addr).await;
        assert!(a.is_some(), "one of the first three was refused");
        held.push(s);
    }
    let (_s, a) = subscribe_from("127.0.0.1", addr).await;
    assert!(
        a.is_none(),
        "a fourth connection from one address was served"
    );
    assert_eq!(proxy.ctx.trips.connections_per_ip.get(), 1);
    // Another address still gets in.
    let (_other, a) = subscribe_from("127.0.0.2", addr).await;
    assert!(a.is_some(), "another address was refused");
    // A slot freed by a disconnect is usable again.
    drop(held.pop());
    let mut served = false;
    for _ in 0..50 {
        let (s, a) = subscribe_from("127.0.0.1", addr).await;
        if a.is_some() {
            held.push(s);
            served = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(served, "the freed slot was never given back");
    assert!(proxy.shutdown(Duration::from_secs(5)).await);
}

/// Requests other than submits are rate-limited too: a
/// `mining.suggest_difficulty` flood (each rebuilds and resends a job) closes
/// the connection; an honest start-up sequence does not come near the limit.
#[tokio::test]
async fn a_request_flood_is_cut_and_an_honest_start_is_not() {
    let proxy = start("").await;
    let addr = proxy.sv1_addr.unwrap();
    let honest = [
        r#"{"id":1,"method":"mining.configure","params":[["version-rolling"],{"version-rolling.mask":"1fffe000"}]}"#,
        r#"{"id":2,"method":"mining.subscribe","params":["cgminer/4.11"]}"#,
        r#"{"id":3,"method":"mining.authorize","params":["acct.rig1","x"]}"#,
        r#"{"id":4,"method":"mining.extranonce.subscribe","params":[]}"#,
        r#"{"id":5,"method":"mining.suggest_difficulty","params":[1024]}"#,
    ];
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all((honest.join("\n") + "\n").as_bytes())
        .await
        .unwrap();
    let mut r = BufReader::new(s);
    for want in 1..=5 {
        let mut line = String::new();
        let n = tokio::time::timeout(Duration::from_secs(5), r.read_line(&mut line))
            .await
            .expect("answered")
            .unwrap();
        assert!(n > 0, "the honest start was cut at request {want}");
    }
    assert_eq!(proxy.ctx.trips.request_flood.get(), 0);

    // The flood: 200 suggestions at once.
    let mut f = TcpStream::connect(addr).await.unwrap();
    let flood: String = (0..200)
        .map(|i| {
            format!("{{\"id\":{i},\"method\":\"mining.suggest_difficulty\",\"params\":[{i}]}}\n")
        })
        .collect();
    let _ = f.write_all(flood.as_bytes()).await;
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        let mut buf = Vec::new();
        let _ = tokio::io::AsyncReadExt::read_to_end(&mut f, &mut buf).await;
    })
    .await;
    assert!(closed.is_ok(), "the flooding connection was kept");
    assert_eq!(proxy.ctx.trips.request_flood.get(), 1);
    assert!(proxy.shutdown(Duration::from_secs(5)).await);
}

/// Subscribe and authorize on `addr`, read both answers.
async fn start_miner(addr: SocketAddr) -> BufReader<TcpStream> {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(
        b"{\"id\":1,\"method\":\"mining.subscribe\",\"params\":[]}\n\
          {\"id\":2,\"method\":\"mining.authorize\",\"params\":[\"acct.rig1\",\"x\"]}\n",
    )
    .await
    .unwrap();
    let mut r = BufReader::new(s);
    let mut answered = 0;
    while answered < 2 {
        let mut line = String::new();
        let n = tokio::time::timeout(Duration::from_secs(5), r.read_line(&mut line))
            .await
            .expect("answered")
            .unwrap();
        assert!(n > 0, "closed during start");
        answered += usize::from(line.contains("\"id\":1") || line.contains("\"id\":2"));
    }
    r
}

/// Send `n` submits for a job that does not exist (each is rejected);
/// whether the proxy closed the connection afterwards.
async fn junk_shares(r: &mut BufReader<TcpStream>, n: u32) -> bool {
    let junk: String = (0..n)
        .map(|i| {
            format!(
                "{{\"id\":{},\"method\":\"mining.submit\",\"params\":[\"acct.rig1\",\"ffff\",\"00000000\",\"5f5e1000\",\"{i:08x}\"]}}\n",
                i + 10
            )
        })
        .collect();
    let _ = r.get_mut().write_all(junk.as_bytes()).await;
    let mut answers = 0;
    loop {
        let mut line = String::new();
        match tokio::time::timeout(Duration::from_millis(500), r.read_line(&mut line)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => answers += 1,
            // Quiet: every answer came and the connection stays.
            Err(_) => {
                assert_eq!(answers, n, "not every junk share was answered");
                return false;
            }
        }
    }
}

/// Rejected shares cost the sender: a connection whose shares are almost all
/// rejected is dropped at the end of a `reject_window`, and counted; with
/// `max_reject_ratio = 1.0` the same connection stays.
#[tokio::test]
async fn a_connection_of_rejected_shares_is_dropped() {
    let proxy = start("reject_window = 50\nmax_reject_ratio = 0.5\n").await;
    let mut m = start_miner(proxy.sv1_addr.unwrap()).await;
    assert!(
        !junk_shares(&mut m, 49).await,
        "dropped before the window closed"
    );
    assert_eq!(proxy.ctx.trips.reject_ratio.get(), 0);
    assert!(junk_shares(&mut m, 1).await, "kept after 50 of 50 rejected");
    assert_eq!(proxy.ctx.trips.reject_ratio.get(), 1);
    assert!(proxy.shutdown(Duration::from_secs(5)).await);

    let proxy = start("reject_window = 50\nmax_reject_ratio = 1.0\n").await;
    let mut m = start_miner(proxy.sv1_addr.unwrap()).await;
    assert!(
        !junk_shares(&mut m, 120).await,
        "dropped with the limit off"
    );
    assert_eq!(proxy.ctx.trips.reject_ratio.get(), 0);
    assert!(proxy.shutdown(Duration::from_secs(5)).await);
}

/// One sender that keeps its socket full cannot hold the thread its session
/// runs on: on a single-threaded runtime, another miner is still served while
/// the flood goes on, and the cut turns are counted.
#[tokio::test(flavor = "current_thread")]
async fn a_fast_sender_does_not_starve_the_others() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let proxy = start("").await;
    let addr = proxy.sv1_addr.unwrap();
    // Blank lines: free to send, never an error, so only the budget stops
    // the session's read loop. Bounded: 10 s at most.
    let flooding = Arc::new(AtomicBool::new(true));
    let mut flood = std::net::TcpStream::connect(addr).unwrap();
    let stopper = flood.try_clone().unwrap();
    let flag = flooding.clone();
    let writer = std::thread::spawn(move || {
        use std::io::Write;
        let chunk = vec![b'\n'; 64 * 1024];
        let until = std::time::Instant::now() + Duration::from_secs(10);
        while std::time::Instant::now() < until && flag.load(Ordering::Relaxed) {
            if flood.write_all(&chunk).is_err() {
                break;
            }
        }
        flag.store(false, Ordering::Relaxed);
    });
    // Let the flood fill the socket before the honest miner starts.
    while proxy.ctx.trips.read_budget.get() == 0 && flooding.load(Ordering::Relaxed) {
        tokio::task::yield_now().await;
    }
    let _m = start_miner(addr).await;
    let served_during_flood = flooding.swap(false, Ordering::Relaxed);
    // A writer blocked on a full socket is woken by the shutdown (joining it
    // blocks this runtime's only thread, so the proxy cannot drain it).
    let _ = stopper.shutdown(std::net::Shutdown::Both);
    writer.join().unwrap();
    assert!(
        served_during_flood,
        "the honest miner was answered only after the flood ended"
    );
    assert!(
        proxy.ctx.trips.read_budget.get() > 0,
        "no read turn was cut"
    );
    assert!(proxy.shutdown(Duration::from_secs(5)).await);
}
