//! Pool and listener addresses as people write them, against the real peers
//! on loopback:
//! - gridproxy reaches SRI `pool_sv2` and `translator_sv2` through
//!   `localhost:PORT` and through each URL form (`stratum2+tcp://host:port/<key>`,
//!   `stratum2+tcp://host:port` with `authority_pubkey`, `stratum+tcp://host:port`),
//!   the scheme standing in for `protocol`;
//! - a pool whose name does not resolve (`.invalid`, RFC 6761) does not stop
//!   the real binary from starting: it is logged and retried while the backup
//!   pool serves the miners;
//! - IPv6 loopback: a `[::1]` listener, `pool_sv2` on `[::1]` and the fixture
//!   SV1 pool on `[::1]`.

use gridproxy::config::Config;
use gridproxy_fixtures::sv1_pool::{self, Sv1PoolConfig};
use gridproxy_tests::*;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::process::Command;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Never resolves: `.invalid` is reserved (RFC 6761).
const NOWHERE: &str = "pool.gridproxy-test.invalid";

/// CPU-scale difficulty, quick reconnects; `pools` are whole `[[pools]]` tables.
fn config_text(pools: &[String], listen: &str) -> String {
    let mut s = pools.join("\n");
    s.push_str(&format!(
        "\n[listen]\nsv1 = \"{listen}\"\n\n\
         [difficulty]\ninitial = 0.000003814697265625\nmin = 0.000000001\nshares_per_minute = 20.0\n\n\
         [routing]\nreconnect_ms = 100\n"
    ));
    s
}

/// A `[[pools]]` table: `lines` (address, protocol, key...) plus the common keys.
fn pool_table(name: &str, lines: &str) -> String {
    format!(
        "[[pools]]\nname = \"{name}\"\n{lines}\nuser = \"gridproxy-test\"\nnominal_hashrate = 250000.0\n"
    )
}

async fn wait_all_live(proxy: &gridproxy_proxy::Proxy, what: impl Fn() -> String) {
    let pools = proxy.ctx.router.pools();
    let live = wait_until(Duration::from_secs(30), || {
        pools.iter().all(|p| p.view.borrow().live)
    })
    .await;
    let state: Vec<String> = pools
        .iter()
        .map(|p| {
            format!(
                "{}: live {} error {:?}",
                p.stats.name,
                p.view.borrow().live,
                p.stats.last_error()
            )
        })
        .collect();
    assert!(live, "not every upstream went live: {state:?}\n{}", what());
}

/// Waits until every upstream has had shares accepted.
async fn wait_all_accepting(
    proxy: &gridproxy_proxy::Proxy,
    timeout: Duration,
    what: impl Fn() -> String,
) {
    let pools = proxy.ctx.router.pools();
    let ok = wait_until(timeout, || {
        pools.iter().all(|p| p.stats.accepted.get() >= 1)
    })
    .await;
    let counts: Vec<String> = pools
        .iter()
        .map(|p| {
            format!(
                "{}: sent {} accepted {} rejected {} ({:?}) error {:?}",
                p.stats.name,
                p.stats.submitted.get(),
                p.stats.accepted.get(),
                p.stats.rejected.get(),
                p.stats.reasons(),
                p.stats.last_error()
            )
        })
        .collect();
    assert!(
        ok,
        "not every upstream had a share accepted: {counts:#?}\n{}",
        what()
    );
}

/// One proxy, five upstreams of equal priority (miners split between them):
/// `pool_sv2` by name, by URL with its key, by URL with `authority_pubkey`;
/// `translator_sv2` by name and by URL. Each one carries accepted shares.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_address_form_reaches_pool_sv2_and_translator() {
    let _gate = gridproxy_tests::module_gate(module_path!());
    let _serial = SERIAL.lock().await;
    init_tracing();
    let tp = start_quiet_tp().await;
    let pool = start_pool(tp.addr()).await;
    // gridproxy as one SV1 miner of the translator: 8 extranonce2 bytes to split.
    let tproxy = start_translator_with(
        &pool,
        TranslatorOptions {
            min_individual_miner_hashrate: 50_000.0,
            shares_per_minute: 60.0,
            extranonce2_size: 8,
            ..Default::default()
        },
    )
    .await;
    let key = pool.authority_pubkey.to_string();
    let (p, t) = (pool.addr.port(), tproxy.sv1_addr.port());
    let pools = [
        pool_table(
            "sv2-name",
            &format!(
                "address = \"localhost:{p}\"\nprotocol = \"sv2\"\nauthority_pubkey = \"{key}\""
            ),
        ),
        pool_table(
            "sv2-url-key",
            &format!("address = \"stratum2+tcp://localhost:{p}/{key}\""),
        ),
        pool_table(
            "sv2-url",
            &format!("address = \"stratum2+tcp://127.0.0.1:{p}\"\nauthority_pubkey = \"{key}\""),
        ),
        pool_table(
            "sv1-name",
            &format!("address = \"localhost:{t}\"\nprotocol = \"sv1\""),
        ),
        pool_table(
            "sv1-url",
            &format!("address = \"stratum+tcp://localhost:{t}\""),
        ),
    ];
    let cfg = Config::parse(&config_text(&pools, "127.0.0.1:0"), "test").expect("valid config");
    let protocols: Vec<&str> = cfg.pools.iter().map(|p| p.protocol().as_str()).collect();
    assert_eq!(protocols, ["sv2", "sv2", "sv2", "sv1", "sv1"]);
    let proxy = gridproxy_tests::start_proxy(cfg).await.unwrap();
    let logs = || {
        format!(
            "pool log:\n{}\ntranslator log:\n{}",
            pool.process.log_tail(2000),
            tproxy.process.log_tail(2000)
        )
    };
    wait_all_live(&proxy, logs).await;
    let (miners, stop) = start_sv1_miners(proxy.sv1_addr.unwrap(), 50, "forms.rig", 5_000.0);
    wait_all_accepting(&proxy, Duration::from_secs(90), logs).await;
    stop.cancel();
    assert_eq!(miners.rejected.get(), 0, "{:?}", miners.reject_reasons());
    // The SV2 channels' shares reached pool_sv2 itself.
    assert!(
        pool.wait_shares_accepted(3.0, Duration::from_secs(10))
            .await,
        "pool_sv2 accepted {}",
        pool.shares_accepted().await
    );
    proxy.stop.cancel();
}

/// The real binary, with a primary pool whose name never resolves: it starts
/// anyway, logs the lookup failure as the pool's error and keeps retrying it,
/// while the miners hash for the backup (`pool_sv2` by name).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unresolvable_pool_is_retried_while_the_backup_serves() {
    let _gate = gridproxy_tests::module_gate(module_path!());
    let _serial = SERIAL.lock().await;
    init_tracing();
    // The name fails, and fails fast, here (the resolver answers for `.invalid`).
    let t0 = std::time::Instant::now();
    let looked_up = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::net::lookup_host((NOWHERE, 3333)),
    )
    .await
    .map(|r| r.map(|addrs| addrs.collect::<Vec<_>>()));
    assert!(
        matches!(looked_up, Ok(Err(_))),
        "{NOWHERE} must fail to resolve at once here: {looked_up:?}"
    );
    println!("{NOWHERE}: lookup failed in {:?}", t0.elapsed());

    let tp = start_quiet_tp().await;
    let pool = start_pool(tp.addr()).await;
    let key = pool.authority_pubkey.to_string();
    let port = pool.addr.port();
    let listen = free_addr();
    let pools = [
        pool_table(
            "primary",
            &format!("address = \"stratum2+tcp://{NOWHERE}:{port}/{key}\"\npriority = 0"),
        ),
        pool_table(
            "backup",
            &format!("address = \"localhost:{port}\"\nprotocol = \"sv2\"\nauthority_pubkey = \"{key}\"\npriority = 1"),
        ),
    ];
    let dir = PeerProcess::make_dir("endpoints-config");
    let path = dir.join("gridproxy.toml");
    std::fs::write(&path, config_text(&pools, &listen.to_string())).unwrap();

    let bin = crate::operate_site::gridproxy_bin();
    let out = Command::new(&bin)
        .arg("check-config")
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "check-config refused it: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut cmd = Command::new(&bin);
    cmd.args(["run", "--status-every", "0", "--config"])
        .arg(&path)
        .env("RUST_LOG", "info");
    let mut proxy = PeerProcess::spawn("gridproxy", PeerProcess::make_dir("endpoints"), cmd);
    assert!(
        wait_for_port(listen, Duration::from_secs(60)).await,
        "gridproxy did not listen on {listen}; log:\n{}",
        proxy.log_tail(3000)
    );
    let needle = format!("resolve {NOWHERE}:{port}");
    // Logged, and retried (the backoff starts at 100 ms).
    assert!(
        proxy
            .wait_for_log_count(&needle, 3, Duration::from_secs(30))
            .await,
        "no repeated resolve error in the log:\n{}",
        proxy.log_tail(3000)
    );
    let line = proxy
        .log()
        .lines()
        .find(|l| l.contains(&needle))
        .unwrap_or_default()
        .to_string();
    assert!(
        line.contains("upstream down") && line.contains("WARN"),
        "{line}"
    );
    println!("log line: {line}");

    let (miners, stop) = start_sv1_miners(listen, 10, "nowhere.rig", 5_000.0);
    let ok = pool
        .wait_shares_accepted(3.0, Duration::from_secs(90))
        .await;
    stop.cancel();
    assert!(
        ok,
        "the backup accepted {} shares (miners accepted {}); gridproxy log:\n{}\npool log:\n{}",
        pool.shares_accepted().await,
        miners.accepted.get(),
        proxy.log_tail(3000),
        pool.process.log_tail(2000)
    );
    // Still retrying the primary, and still running.
    let before = proxy.count_in_log(&needle);
    assert!(
        proxy
            .wait_for_log_count(&needle, before + 1, Duration::from_secs(20))
            .await,
        "the primary is no longer retried"
    );
    assert!(
        proxy.is_running(),
        "gridproxy exited:\n{}",
        proxy.log_tail(3000)
    );
    assert!(
        !proxy.log().contains("panicked"),
        "{}",
        proxy.log_tail(3000)
    );
}

/// IPv6 loopback end to end: miners on a `[::1]` listener, split between
/// `pool_sv2` on `[::1]` (`stratum2+tcp://[::1]:port/<key>`) and the fixture
/// SV1 pool on `[::1]` (`[::1]:port`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv6_loopback_listener_and_pools() {
    let _gate = gridproxy_tests::module_gate(module_path!());
    let _serial = SERIAL.lock().await;
    init_tracing();
    let v6 = IpAddr::V6(Ipv6Addr::LOCALHOST);
    let tp = start_quiet_tp().await;
    let pool = start_pool_with(
        tp.addr(),
        PoolOptions {
            listen_ip: Some(v6),
            ..Default::default()
        },
    )
    .await;
    assert!(pool.addr.is_ipv6());
    let stop = CancellationToken::new();
    let sv1 = sv1_pool::spawn(
        SocketAddr::new(v6, 0),
        Sv1PoolConfig::default(),
        stop.clone(),
    )
    .await
    .expect("the fixture SV1 pool binds [::1]");
    let key = pool.authority_pubkey.to_string();
    let pools = [
        pool_table(
            "sv2-v6",
            &format!("address = \"stratum2+tcp://{}/{key}\"", pool.addr),
        ),
        pool_table(
            "sv1-v6",
            &format!("address = \"{}\"\nprotocol = \"sv1\"", sv1.addr()),
        ),
    ];
    let text = config_text(&pools, "[::1]:0");
    assert!(text.contains("stratum2+tcp://[::1]:"), "{text}");
    let proxy = gridproxy_tests::start_proxy(Config::parse(&text, "test").expect("valid config"))
        .await
        .unwrap();
    let listener = proxy.sv1_addr.unwrap();
    assert_eq!(listener.ip(), v6, "the SV1 listener is on [::1]");
    let logs = || format!("pool log:\n{}", pool.process.log_tail(2000));
    wait_all_live(&proxy, logs).await;
    let (miners, miners_stop) = start_sv1_miners(listener, 20, "v6.rig", 5_000.0);
    wait_all_accepting(&proxy, Duration::from_secs(90), logs).await;
    miners_stop.cancel();
    assert_eq!(miners.rejected.get(), 0, "{:?}", miners.reject_reasons());
    assert!(sv1.stats().accepted.get() >= 1);
    assert!(
        pool.wait_shares_accepted(1.0, Duration::from_secs(10))
            .await
    );
    proxy.stop.cancel();
    stop.cancel();
}
