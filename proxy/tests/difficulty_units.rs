//! `[difficulty]` written as hashrates behaves as the same config written as
//! raw difficulties: the same difficulty reaches the miner, and the same
//! vardiff bounds apply.

use gridproxy_fixtures::sv1_pool::{self, Sv1PoolConfig};
use gridproxy_proxy::config::difficulty_for_hashrate;
use gridproxy_proxy::{Proxy, ProxyConfig};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

fn config(pool: std::net::SocketAddr, difficulty: &str) -> ProxyConfig {
    ProxyConfig::from_toml(&format!(
        "[[pools]]\nname='p'\naddress='{pool}'\nprotocol='sv1'\nuser='u'\n\
         [listen]\nsv1='127.0.0.1:0'\n[difficulty]\n{difficulty}"
    ))
    .unwrap()
}

/// The difficulty the proxy gives a new SV1 miner.
async fn first_difficulty(proxy: &Proxy) -> f64 {
    let s = TcpStream::connect(proxy.sv1_addr.unwrap()).await.unwrap();
    let (r, mut w) = s.into_split();
    w.write_all(
        b"{\"id\":1,\"method\":\"mining.subscribe\",\"params\":[\"t/1\"]}\n\
          {\"id\":2,\"method\":\"mining.authorize\",\"params\":[\"acct.rig\",\"x\"]}\n",
    )
    .await
    .unwrap();
    let mut lines = BufReader::new(r).lines();
    let find = async {
        while let Some(l) = lines.next_line().await.unwrap() {
            let v: serde_json::Value = serde_json::from_str(&l).unwrap();
            if v["method"] == "mining.set_difficulty" {
                return v["params"][0].as_f64().unwrap();
            }
        }
        panic!("connection closed before mining.set_difficulty");
    };
    tokio::time::timeout(Duration::from_secs(10), find)
        .await
        .expect("mining.set_difficulty within 10 s")
}

#[tokio::test]
async fn hashrate_units_give_the_same_difficulty_as_raw_numbers() {
    let stop = CancellationToken::new();
    let pool = sv1_pool::spawn(
        "127.0.0.1:0".parse().unwrap(),
        Sv1PoolConfig {
            job_interval: Duration::from_millis(200),
            ..Default::default()
        },
        stop.clone(),
    )
    .await
    .unwrap();
    // 110 TH/s at 20 shares a minute; a floor of 1 GH/s and a ceiling of 1 EH/s.
    let spm = 20.0;
    let want = difficulty_for_hashrate(110e12, spm);
    // By hand: 110e12 × 60 / (20 × 2^32) = 76 834.1…
    assert!((want - 76_834.1).abs() < 0.1, "{want}");
    let rates = config(
        pool.addr(),
        "initial = \"110 TH/s\"\nmin = \"1 GH/s\"\nmax = \"1 EH/s\"\nshares_per_minute = 20.0\n",
    );
    let raw = config(
        pool.addr(),
        &format!(
            "initial = {want:?}\nmin = {:?}\nmax = {:?}\nshares_per_minute = 20.0\n",
            difficulty_for_hashrate(1e9, spm),
            difficulty_for_hashrate(1e18, spm)
        ),
    );
    assert_eq!(rates.difficulty, raw.difficulty);

    let mut seen = Vec::new();
    for cfg in [rates, raw] {
        let proxy = Proxy::start(cfg, stop.child_token()).await.unwrap();
        seen.push(first_difficulty(&proxy).await);
        assert!(proxy.shutdown(Duration::from_secs(5)).await);
    }
    assert_eq!(
        seen[0], seen[1],
        "hashrate and raw configs differ: {seen:?}"
    );
    // The miner gets the configured start, rounded to a power of two at most.
    assert!(
        seen[0] <= want && seen[0] > want / 2.0,
        "miner got {} for {want}",
        seen[0]
    );
    stop.cancel();
}

#[test]
fn bad_hashrates_are_refused_with_the_key() {
    let pool: std::net::SocketAddr = "127.0.0.1:1".parse().unwrap();
    for (text, needle) in [
        ("initial = \"110 TB/s\"", "unknown unit"),
        ("min = \"fast TH/s\"", "not a number"),
        ("max = \"-1 TH/s\"", "positive"),
        ("initial = \"110\"", "no unit"),
        (
            "initial = \"1 TH/s\"\nshares_per_minute = 0.0",
            "shares_per_minute",
        ),
    ] {
        let e = ProxyConfig::from_toml(&format!(
            "[[pools]]\nname='p'\naddress='{pool}'\nprotocol='sv1'\nuser='u'\n[difficulty]\n{text}\n"
        ))
        .map(|_| ())
        .unwrap_err()
        .to_string();
        assert!(
            e.contains(needle) && e.contains("difficulty"),
            "{text}: {e}"
        );
    }
}
