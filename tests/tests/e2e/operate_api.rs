//! The control API: authentication (401 without or with an unknown token,
//! 403 for a read-only token on operate endpoints), the read endpoints, the
//! OpenAPI document, and operate commands (park / unpark / move a worker
//! group) acting on live miners behind a local validating pool.

use gridproxy::api::client;
use gridproxy::config::Config;
use gridproxy_fixtures::stats::MinerStats;
use gridproxy_fixtures::sv1_miner::{self, Sv1MinerConfig};
use gridproxy_fixtures::sv1_pool::{self, Sv1PoolConfig};
use gridproxy_proxy::Proxy;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

const OPERATE: &str = "operate-token-0123456789";
const READ: &str = "read-only-token-0123456789";
const T: Duration = Duration::from_secs(5);

struct Rig {
    api: SocketAddr,
    proxy: Proxy,
    stop: CancellationToken,
}

/// Two local pools, a proxy splitting 1:1, `miners` fixture miners, the API.
async fn rig(miners: usize) -> Rig {
    rig_with(miners, "").await
}

/// As [`rig`], with `api_extra` lines added to `[api]`.
async fn rig_with(miners: usize, api_extra: &str) -> Rig {
    let stop = CancellationToken::new();
    let mut pools = vec![];
    for name in ["pa", "pb"] {
        let cfg = Sv1PoolConfig {
            name: name.into(),
            difficulty: 1.0 / (1u64 << 22) as f64,
            ..Default::default()
        };
        pools.push(
            sv1_pool::spawn("127.0.0.1:0".parse().unwrap(), cfg, stop.clone())
                .await
                .unwrap(),
        );
    }
    let text = format!(
        r#"[[pools]]
name = "pa"
address = "{}"
protocol = "sv1"
user = "acct"

[[pools]]
name = "pb"
address = "{}"
protocol = "sv1"
user = "acct"

[listen]
sv1 = "127.0.0.1:0"

[difficulty]
initial = 2.384185791015625e-7
min = 1e-9

[api]
listen = "127.0.0.1:0"
{api_extra}

[[api.tokens]]
name = "ops"
role = "operate"
token = "{OPERATE}"

[[api.tokens]]
name = "viewer"
role = "read"
token = "{READ}"
"#,
        pools[0].addr(),
        pools[1].addr(),
    );
    let cfg = gridproxy::Config::parse(&text, "test.toml").unwrap();
    let app = gridproxy_tests::start_app(cfg, None).await;
    let proxy = app.proxy.clone();
    let server = app.api.clone().expect("[api] listen is set");
    let stats = Arc::new(MinerStats::default());
    for i in 0..miners {
        let group = if i % 2 == 0 { "even" } else { "odd" };
        let mut m = Sv1MinerConfig::new(proxy.sv1_addr.unwrap(), format!("acct.{group}-{i}"));
        m.hashrate = 2000.0;
        tokio::spawn(sv1_miner::run(m, stats.clone(), stop.clone()));
    }
    // Keep the pools alive as long as the stop token.
    tokio::spawn({
        let stop = stop.clone();
        async move {
            stop.cancelled().await;
            drop(pools);
        }
    });
    Rig {
        api: server.addr,
        proxy,
        stop,
    }
}

async fn call(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> client::HttpResponse {
    client::request(addr, method, path, token, body.as_ref(), T)
        .await
        .unwrap()
}

async fn raw(addr: SocketAddr, req: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

async fn wait_for(what: &str, secs: u64, mut f: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    while tokio::time::Instant::now() < deadline {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_endpoints_need_tokens_and_roles() {
    let _gate = gridproxy_tests::module_gate(module_path!());
    let r = rig(0).await;
    let a = r.api;
    let park = json!({"action": "park", "workers": "*"});

    // No token or an unknown one: 401 with a Bearer challenge.
    for tok in [None, Some("not-a-valid-token-at-all")] {
        for (m, p, b) in [
            ("GET", "/api/v1/fleet", None),
            ("GET", "/api/v1/workers", None),
            ("GET", "/api/v1/pools", None),
            ("GET", "/api/v1/events", None),
            ("GET", "/api/v1/history", None),
            ("POST", "/api/v1/curtail", Some(park.clone())),
        ] {
            let resp = call(a, m, p, tok, b).await;
            assert_eq!(resp.status, 401, "{m} {p} with {tok:?}: {}", resp.text());
            assert!(resp
                .header("www-authenticate")
                .is_some_and(|h| h.starts_with("Bearer")));
            assert!(resp.json().unwrap()["error"].is_string());
        }
    }
    // Another scheme than Bearer: 401.
    let resp = raw(a, "GET /api/v1/fleet HTTP/1.1\r\nHost: x\r\nAuthorization: Basic b3BzOng=\r\nConnection: close\r\n\r\n").await;
    assert!(resp.starts_with("HTTP/1.1 401"), "{resp}");

    // Read token: reads fine, operate endpoints 403.
    let resp = call(a, "GET", "/api/v1/whoami", Some(READ), None).await;
    assert_eq!(resp.status, 200);
    assert_eq!(resp.json().unwrap()["role"], "read");
    for body in [
        park.clone(),
        json!({"action": "unpark", "workers": "*"}),
        json!({"action": "move", "workers": "*", "pool": "pb"}),
        json!({"action": "cap_kw", "kw": 100}),
    ] {
        let resp = call(a, "POST", "/api/v1/curtail", Some(READ), Some(body)).await;
        assert_eq!(resp.status, 403, "{}", resp.text());
        assert!(resp.text().contains("needs operate"), "{}", resp.text());
    }

    // Operate token: accepted; bad bodies are 400 with a reason.
    let resp = call(a, "POST", "/api/v1/curtail", Some(OPERATE), Some(park)).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    let resp = call(
        a,
        "POST",
        "/api/v1/curtail",
        Some(OPERATE),
        Some(json!({"action": "explode"})),
    )
    .await;
    assert_eq!(resp.status, 400);
    assert!(
        resp.text().contains("unknown \\\"explode\\\""),
        "{}",
        resp.text()
    );
    let resp = call(
        a,
        "POST",
        "/api/v1/curtail",
        Some(OPERATE),
        Some(json!({"action": "park"})),
    )
    .await;
    assert_eq!(resp.status, 400);
    assert!(resp.text().contains("workers"), "{}", resp.text());
    let resp = call(
        a,
        "POST",
        "/api/v1/curtail",
        Some(OPERATE),
        Some(json!({"action": "park", "workers": "x", "surprise": 1})),
    )
    .await;
    assert_eq!(
        resp.status,
        400,
        "unknown fields are refused: {}",
        resp.text()
    );
    // Site commands need a curtailment driver: none here.
    let resp = call(
        a,
        "POST",
        "/api/v1/curtail",
        Some(OPERATE),
        Some(json!({"action": "cap_kw", "kw": 500})),
    )
    .await;
    assert_eq!(resp.status, 503, "{}", resp.text());

    // Public: dashboard, OpenAPI, health, metrics.
    let resp = call(a, "GET", "/", None, None).await;
    assert_eq!(resp.status, 200);
    assert!(resp.text().contains("plot-power"));
    let resp = call(a, "GET", "/api/v1/openapi.json", None, None).await;
    assert_eq!(resp.status, 200);
    let doc = resp.json().unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    for p in [
        "/api/v1/fleet",
        "/api/v1/workers",
        "/api/v1/pools",
        "/api/v1/events",
        "/api/v1/history",
        "/api/v1/curtail",
        "/metrics",
    ] {
        assert!(doc["paths"][p].is_object(), "openapi lacks {p}");
    }
    assert_eq!(call(a, "GET", "/metrics", None, None).await.status, 200);
    assert_eq!(call(a, "GET", "/nope", Some(READ), None).await.status, 404);
    r.stop.cancel();
    r.proxy.stop.cancel();
}

async fn pool_miners(a: SocketAddr) -> Vec<u64> {
    let v = call(a, "GET", "/api/v1/pools", Some(READ), None)
        .await
        .json()
        .unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|p| p["miners"].as_u64().unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operate_parks_unparks_and_moves_groups_of_live_miners() {
    let _gate = gridproxy_tests::module_gate(module_path!());
    let r = rig(8).await;
    let a = r.api;
    wait_for("8 miners on live pools", 20, async || {
        pool_miners(a).await.iter().sum::<u64>() == 8
    })
    .await;
    wait_for("shares accepted", 30, async || {
        let f = call(a, "GET", "/api/v1/fleet", Some(READ), None)
            .await
            .json()
            .unwrap();
        f["shares"]["accepted"].as_u64().unwrap_or(0) > 8
    })
    .await;

    let resp = call(
        a,
        "POST",
        "/api/v1/curtail",
        Some(OPERATE),
        Some(json!({"action": "park", "workers": "acct.even-*"})),
    )
    .await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.json().unwrap()["affected"], 4);
    assert_eq!(
        pool_miners(a).await.iter().sum::<u64>(),
        4,
        "parked miners have no pool"
    );

    let resp = call(
        a,
        "POST",
        "/api/v1/curtail",
        Some(OPERATE),
        Some(json!({"action": "move", "workers": "acct.odd-*", "pool": "pb"})),
    )
    .await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(pool_miners(a).await, vec![0, 4]);

    let resp = call(
        a,
        "POST",
        "/api/v1/curtail",
        Some(OPERATE),
        Some(json!({"action": "unpark", "workers": "*"})),
    )
    .await;
    assert_eq!(resp.json().unwrap()["affected"], 8);
    assert_eq!(pool_miners(a).await.iter().sum::<u64>(), 8);
    let resp = call(
        a,
        "POST",
        "/api/v1/curtail",
        Some(OPERATE),
        Some(json!({"action": "move", "workers": "*", "pool": 0})),
    )
    .await;
    assert_eq!(resp.status, 200);
    assert_eq!(pool_miners(a).await, vec![8, 0]);
    let resp = call(
        a,
        "POST",
        "/api/v1/curtail",
        Some(OPERATE),
        Some(json!({"action": "move", "workers": "*", "pool": "nowhere"})),
    )
    .await;
    assert_eq!(resp.status, 400);
    assert!(resp.text().contains("pa, pb"), "{}", resp.text());

    // Workers: search and per-worker counters; events log the operator.
    let w = call(
        a,
        "GET",
        "/api/v1/workers?q=odd&sort=name",
        Some(READ),
        None,
    )
    .await
    .json()
    .unwrap();
    assert_eq!(w["matched"], 4);
    assert_eq!(w["total"], 8);
    assert!(w["workers"][0]["name"]
        .as_str()
        .unwrap()
        .starts_with("acct.odd-"));
    let e = call(a, "GET", "/api/v1/events", Some(READ), None)
        .await
        .json()
        .unwrap();
    let log: Vec<String> = e["log"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["message"].as_str().unwrap().to_string())
        .collect();
    assert!(
        log.iter()
            .any(|m| m.starts_with("ops: park \"acct.even-*\": 4 miners")),
        "{log:?}"
    );
    // History has points with the pool list.
    let h = call(a, "GET", "/api/v1/history", Some(READ), None)
        .await
        .json()
        .unwrap();
    assert_eq!(h["pools"], json!(["pa", "pb"]));
    assert!(!h["points"].as_array().unwrap().is_empty());
    r.stop.cancel();
    r.proxy.stop.cancel();
}

#[test]
fn config_parse_of_the_api_section() {
    let _gate = gridproxy_tests::module_gate(module_path!());
    let ok = "[[pools]]\nname='a'\naddress='127.0.0.1:1'\nprotocol='sv1'\nuser='u'\n";
    let c = Config::parse(ok, "t").unwrap();
    assert!(c.api.listen.is_none(), "the API is off unless configured");
}

/// A client that never finishes its headers is cut after
/// `header_timeout_secs`; connections over `max_connections` are closed at
/// once, and a slot freed by the timeout serves again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_surplus_api_clients_are_cut() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let _gate = gridproxy_tests::module_gate(module_path!());
    let r = rig_with(0, "max_connections = 4\nheader_timeout_secs = 1").await;
    // Four slowloris clients: half a request each, then silence.
    let mut slow = Vec::new();
    for _ in 0..4 {
        let mut s = tokio::net::TcpStream::connect(r.api).await.unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        slow.push(s);
    }
    // Give the server a moment to take them (each holds a slot): wait until
    // a fifth connection is refused, which is what is being tested.
    let mut refused = false;
    for _ in 0..50 {
        let mut extra = tokio::net::TcpStream::connect(r.api).await.unwrap();
        let _ = extra
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await;
        let mut buf = Vec::new();
        match tokio::time::timeout(Duration::from_millis(500), extra.read_to_end(&mut buf)).await {
            Ok(_) if buf.is_empty() => {
                refused = true;
                break;
            }
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    assert!(
        refused,
        "a fifth connection was served over max_connections = 4"
    );
    // The slow ones are cut by the header timeout (1 s), not left hanging.
    let started = std::time::Instant::now();
    for mut s in slow {
        let mut buf = Vec::new();
        let r = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
        assert!(
            r.is_ok(),
            "a client that never finished its headers was kept"
        );
    }
    println!("slowloris clients cut after {:?}", started.elapsed());
    // Slots are free again: a normal request is served.
    wait_for("a freed slot serves /healthz", 10, async || {
        call(r.api, "GET", "/healthz", None, None).await.status == 200
    })
    .await;
    r.stop.cancel();
    r.proxy.stop.cancel();
}
