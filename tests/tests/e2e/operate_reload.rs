//! Hot reload with miners hashing: a second pool and a 1:1 split arrive by
//! SIGHUP, the first pool leaves and the connection cap drops through
//! `POST /api/v1/reload`, and no miner reconnects. Bad files and changes
//! that need a restart are refused whole, with the reason. Upstreams are
//! real `pool_sv2` instances fed by the fixture template provider.

use gridproxy::api::client;
use gridproxy_proxy::router::PoolShare;
use gridproxy_proxy::Proxy;
use gridproxy_tests::*;
use serde_json::Value;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

const OPERATE: &str = "operate-token-0123456789";
const READ: &str = "read-only-token-0123456789";
const MINERS: usize = 20;

fn pool_block(name: &str, addr: SocketAddr, key: &str, weight: f64) -> String {
    format!(
        "[[pools]]\nname = \"{name}\"\naddress = \"{addr}\"\nprotocol = \"sv2\"\n\
         authority_pubkey = \"{key}\"\nuser = \"gridproxy-test\"\npriority = 0\n\
         weight = {weight}\nnominal_hashrate = 250000.0\n\n"
    )
}

/// The whole file: `pools` blocks, then fixed sections; `limits` is the body
/// of `[limits]`, `listen` the SV1 listen address.
fn config_text(pools: &[String], limits: &str, listen: &str) -> String {
    let mut s = pools.concat();
    s.push_str(&format!(
        "[listen]\nsv1 = \"{listen}\"\n\n[limits]\n{limits}\n\n\
         [difficulty]\ninitial = 0.000003814697265625\nmin = 0.000000001\nshares_per_minute = 20.0\n\n\
         [routing]\nreconnect_ms = 100\nrebalance_secs = 1\n\n\
         [api]\nlisten = \"127.0.0.1:0\"\n\n\
         [[api.tokens]]\nname = \"ops\"\nrole = \"operate\"\ntoken = \"{OPERATE}\"\n\n\
         [[api.tokens]]\nname = \"viewer\"\nrole = \"read\"\ntoken = \"{READ}\"\n"
    ));
    s
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).expect("write config file");
}

async fn reload(api: SocketAddr, token: Option<&str>) -> client::HttpResponse {
    client::request(
        api,
        "POST",
        "/api/v1/reload",
        token,
        None,
        Duration::from_secs(10),
    )
    .await
    .expect("API answers")
}

fn by_name(proxy: &Proxy, name: &str) -> Option<(usize, PoolShare)> {
    let shares = proxy.ctx.router.shares();
    proxy
        .ctx
        .router
        .pools()
        .iter()
        .enumerate()
        .find(|(i, h)| h.stats.name == name && !shares[*i].retired)
        .map(|(i, _)| (i, shares[i].clone()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_changes_pools_split_and_limits_without_dropping_a_miner() {
    let _gate = gridproxy_tests::module_gate(module_path!());
    tokio::time::timeout(Duration::from_secs(240), run())
        .await
        .expect("test finished in time");
}

async fn run() {
    let (tp_a, tp_b) = (start_quiet_tp().await, start_quiet_tp().await);
    let pool_a = start_pool(tp_a.addr()).await;
    let pool_b = start_pool(tp_b.addr()).await;
    let key = pool_a.authority_pubkey.to_string();
    let dir = std::env::temp_dir().join(format!("gridproxy-reload-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("gridproxy.toml");

    // Start on pool a alone. The listener port is fixed in the file: a
    // reload compares it with what is bound.
    let listen = free_addr().to_string();
    let a_only = vec![pool_block("a", pool_a.addr, &key, 1.0)];
    write(
        &path,
        &config_text(&a_only, "max_connections = 100", &listen),
    );
    let cfg = gridproxy::Config::load(&path).expect("valid config");
    let app = gridproxy_tests::start_app(cfg, Some(path.clone())).await;
    let proxy = app.proxy.clone();
    let server = app.api.clone().expect("[api] listen is set");

    let (stats, stop) = start_sv1_miners(proxy.sv1_addr.unwrap(), MINERS, "rl", 5_000.0);
    let a = proxy.ctx.router.pools()[0].stats.clone();
    assert!(
        wait_until(Duration::from_secs(60), || a.accepted.get() >= 5).await,
        "pool a got no shares"
    );
    assert!(
        wait_until(Duration::from_secs(10), || stats.connects.get()
            == MINERS as u64)
        .await
    );

    // 1. SIGHUP: pool b joins, split 1:1.
    let both = vec![
        pool_block("a", pool_a.addr, &key, 1.0),
        pool_block("b", pool_b.addr, &key, 1.0),
    ];
    write(&path, &config_text(&both, "max_connections = 100", &listen));
    let status = std::process::Command::new("kill")
        .args(["-HUP", &std::process::id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    assert!(
        wait_until(Duration::from_secs(10), || by_name(&proxy, "b").is_some()).await,
        "SIGHUP did not add pool b"
    );
    let (b_index, _) = by_name(&proxy, "b").unwrap();
    let b = proxy.ctx.router.pools()[b_index].stats.clone();
    // Fixture miners hash at equal rates: a 1:1 split is 10/10, give or
    // take the one or two that the hashrate estimates shuffle. The split
    // comes first: pool b's shares follow from it.
    assert!(
        wait_until(Duration::from_secs(30), || {
            let (_, sa) = by_name(&proxy, "a").unwrap();
            let (_, sb) = by_name(&proxy, "b").unwrap();
            sa.miners + sb.miners == MINERS && sa.miners.abs_diff(sb.miners) <= 4
        })
        .await,
        "split did not follow the new weights: {:?}",
        proxy.ctx.router.shares()
    );
    // Ten 5 kH/s miners on a channel the pool targets at 60 shares a
    // minute for 250 kH/s: about 12 pool shares a minute, so 5 take ~25 s
    // on average; 90 s leaves room for a loaded machine.
    assert!(
        wait_until(Duration::from_secs(90), || b.accepted.get() >= 5).await,
        "pool b got {} accepted shares in 90 s after the reload (pool a {}); split {:?}; miners: {} shares accepted, {} rejected",
        b.accepted.get(),
        a.accepted.get(),
        proxy.ctx.router.shares(),
        stats.accepted.get(),
        stats.rejected.get(),
    );
    let (_, sa) = by_name(&proxy, "a").unwrap();
    let (_, sb) = by_name(&proxy, "b").unwrap();
    println!(
        "SIGHUP: pool b added; split a={} b={} miners; b accepted {} shares",
        sa.miners,
        sb.miners,
        b.accepted.get()
    );
    assert_eq!(stats.connects.get(), MINERS as u64, "a miner reconnected");
    assert_eq!(stats.disconnects.get(), 0);

    // 2. Control API: only operate tokens may reload.
    assert_eq!(reload(server.addr, None).await.status, 401);
    assert_eq!(reload(server.addr, Some(READ)).await.status, 403);

    // 3. A broken file is refused with key and line; nothing changes.
    write(
        &path,
        &config_text(&both, "max_connections = \"many\"", &listen),
    );
    let r = reload(server.addr, Some(OPERATE)).await;
    assert_eq!(r.status, 409, "{}", r.text());
    let msg = r.text();
    assert!(
        msg.contains("max_connections") && msg.contains("line"),
        "error names key and line: {msg}"
    );
    // A change that needs a restart is refused whole.
    let other = free_addr().to_string();
    write(
        &path,
        &config_text(&a_only, "max_connections = 100", &other),
    );
    let r = reload(server.addr, Some(OPERATE)).await;
    assert_eq!(r.status, 409, "{}", r.text());
    assert!(r.text().contains("[listen]"), "{}", r.text());
    assert!(
        by_name(&proxy, "b").is_some(),
        "refused reload changed pools"
    );

    // 4. API reload: pool a leaves, the cap drops to the miners connected.
    let b_only = vec![pool_block("b", pool_b.addr, &key, 1.0)];
    write(
        &path,
        &config_text(&b_only, "max_connections = 20", &listen),
    );
    let r = reload(server.addr, Some(OPERATE)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v: Value = r.json().unwrap();
    println!("API reload: {}", v["reloaded"]);
    assert_eq!(v["pools"]["removed"], serde_json::json!(["a"]));
    assert!(v["sections"]
        .as_array()
        .unwrap()
        .iter()
        .any(|s| s == "limits"));
    assert!(
        wait_until(Duration::from_secs(10), || by_name(&proxy, "b")
            .is_some_and(|(_, s)| s.miners == MINERS))
        .await,
        "miners did not all move to b: {:?}",
        proxy.ctx.router.shares()
    );
    let a_sent = a.submitted.get();
    let b_before = b.accepted.get();
    assert!(
        wait_until(Duration::from_secs(60), || b.accepted.get()
            >= b_before + 10)
        .await,
        "b stopped accepting"
    );
    assert!(
        a.submitted.get() <= a_sent + 2,
        "removed pool a still receives shares"
    );
    // The lowered cap holds at once: the 21st connection is closed.
    {
        use tokio::io::AsyncReadExt;
        let mut s = tokio::net::TcpStream::connect(proxy.sv1_addr.unwrap())
            .await
            .unwrap();
        let mut buf = [0u8; 64];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("closed at once")
            .unwrap_or(0);
        assert_eq!(n, 0, "connection over the reloaded cap was served");
    }
    assert_eq!(stats.connects.get(), MINERS as u64, "a miner reconnected");
    assert_eq!(stats.disconnects.get(), 0);

    // Accounting stays whole across the reloads.
    stop.cancel();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let workers = proxy.ctx.registry.snapshot();
    let credited: u64 = workers.iter().map(|w| w.upstream_accepted).sum();
    assert_eq!(credited, a.accepted.get() + b.accepted.get());
    assert!(
        pool_b
            .wait_shares_accepted(b.accepted.get() as f64, Duration::from_secs(5))
            .await
    );
    assert_eq!(pool_b.shares_accepted().await, b.accepted.get() as f64);
    println!(
        "accounting: a {} + b {} acks, all credited to workers; {} miners, {} connects, 0 disconnects",
        a.accepted.get(),
        b.accepted.get(),
        MINERS,
        stats.connects.get()
    );
    proxy.stop.cancel();
    let _ = std::fs::remove_dir_all(&dir);
}
