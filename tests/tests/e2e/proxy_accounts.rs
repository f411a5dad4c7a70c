//! Accounts upstream (issue 16, part 1): `[[accounts]]` send each group of
//! miners' shares under its own pool user, on its own upstream channel.
//!
//! Against the fixture SV2 pool (which records each channel's user and
//! decodes each share's `user_identity`): three accounts, matched by worker
//! prefix and by source network, each get their own channel carrying
//! exactly their miners' shares; the pool's counts per channel equal
//! gridproxy's per-account counts and its per-identity counts gridproxy's
//! per-worker ones. A hot reload moves a worker prefix to another account
//! with no miner reconnecting, and an operator parks a whole account.
//! Against the real `pool_sv2`: three accounts' channels open and their
//! shares are accepted.

use gridproxy::api::client;
use gridproxy_fixtures::sv2_pool::{Sv2Pool, Sv2PoolConfig};
use gridproxy_protocol::sv2_ext::tlv_identity;
use gridproxy_proxy::router::AccountTotals;
use gridproxy_proxy::Proxy;
use gridproxy_tests::*;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

const OPERATE: &str = "operate-token-accounts-0123";

/// One SV2 pool `p` (its own user `site`) and `accounts` (TOML) after it.
fn config_text(addr: SocketAddr, key: &str, listen: &str, accounts: &str) -> String {
    format!(
        "[[pools]]\nname = \"p\"\naddress = \"{addr}\"\nprotocol = \"sv2\"\nauthority_pubkey = \"{key}\"\n\
         user = \"site\"\nnominal_hashrate = 250000.0\n\n\
         {accounts}\n\
         [listen]\nsv1 = \"{listen}\"\n\n\
         [difficulty]\ninitial = 0.000003814697265625\nmin = 0.000000001\nshares_per_minute = 20.0\n\n\
         [routing]\nreconnect_ms = 200\n\n\
         [api]\nlisten = \"127.0.0.1:0\"\n\n\
         [[api.tokens]]\nname = \"ops\"\nrole = \"operate\"\ntoken = \"{OPERATE}\"\n"
    )
}

/// acme by prefix (and, with `beta_to_acme`, beta's `beta.1*` too), beta by
/// prefix, rack by source network and listener: every other SV1 miner here.
fn accounts(beta_to_acme: bool) -> String {
    let acme = if beta_to_acme {
        "[\"acme.*\", \"beta.1*\"]"
    } else {
        "[\"acme.*\"]"
    };
    format!(
        "[[accounts]]\nname = \"acme\"\nworkers = {acme}\n[accounts.pools.p]\nuser = \"acme.site\"\n\n\
         [[accounts]]\nname = \"beta\"\nworkers = [\"beta.*\"]\n[accounts.pools.p]\nuser = \"beta.site\"\n\n\
         [[accounts]]\nname = \"rack\"\nsources = [\"127.0.0.0/8\"]\nlisteners = [\"sv1\"]\n\
         [accounts.pools.p]\nuser = \"rack.site\"\n"
    )
}

async fn post(api: SocketAddr, path: &str, body: Option<Value>) -> client::HttpResponse {
    client::request(
        api,
        "POST",
        path,
        Some(OPERATE),
        body.as_ref(),
        Duration::from_secs(10),
    )
    .await
    .expect("API answers")
}

fn totals(proxy: &Proxy) -> BTreeMap<String, AccountTotals> {
    proxy
        .ctx
        .router
        .account_totals()
        .into_iter()
        .map(|t| (t.name.clone(), t))
        .collect()
}

/// Shares the pool saw on the channel of `user`, from identities that
/// `keep` selects.
fn pool_count(pool: &Sv2Pool, user: &str, keep: impl Fn(&str) -> bool) -> u64 {
    pool.stats()
        .by_user
        .get(user)
        .map(|m| m.iter().filter(|(id, _)| keep(id)).map(|(_, n)| n).sum())
        .unwrap_or(0)
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).expect("write config file");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_accounts_three_channels_each_with_its_miners_shares() {
    let _gate = gridproxy_tests::module_gate(module_path!());
    gridproxy_tests::init_tracing();
    tokio::time::timeout(Duration::from_secs(240), three_accounts())
        .await
        .expect("test finished in time");
}

async fn three_accounts() {
    let pool = Sv2Pool::start("127.0.0.1:0".parse().unwrap(), Sv2PoolConfig::default())
        .await
        .unwrap();
    let key = pool.authority_public_key().to_string();
    let dir = std::env::temp_dir().join(format!("gridproxy-accounts-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("gridproxy.toml");
    let listen = free_addr().to_string();
    write(
        &path,
        &config_text(pool.addr(), &key, &listen, &accounts(false)),
    );
    let cfg = gridproxy::Config::load(&path).expect("valid config");
    let app = start_app(cfg, Some(path.clone())).await;
    let proxy = app.proxy.clone();
    let api = app.api.clone().expect("[api] listen is set").addr;

    // 100 SV1 miners: 40 acme, 30 beta, 30 of nobody's prefix (rack).
    let sv1 = proxy.sv1_addr.unwrap();
    let (acme, stop_a) = start_sv1_miners(sv1, 40, "acme", 5_000.0);
    let (beta, stop_b) = start_sv1_miners(sv1, 30, "beta", 5_000.0);
    let (rack, stop_r) = start_sv1_miners(sv1, 30, "other", 5_000.0);
    let fleets = [&acme, &beta, &rack];
    let connects = || fleets.iter().map(|s| s.connects.get()).sum::<u64>();
    let disconnects = || fleets.iter().map(|s| s.disconnects.get()).sum::<u64>();
    assert!(
        wait_until(Duration::from_secs(60), || {
            let t = totals(&proxy);
            ["acme", "beta", "rack"]
                .iter()
                .all(|a| t[*a].accepted >= 20)
        })
        .await,
        "every account's channel got shares accepted: {:?}",
        totals(&proxy)
    );
    assert_eq!(connects(), 100);

    // Four channels: the three accounts' and the pool's own (the default
    // account, no miner in it here). Each account's channel carries its
    // own miners' shares only.
    let seen = pool.stats();
    assert_eq!(seen.channels, 4, "{seen:?}");
    let users: Vec<&String> = seen.by_user.keys().collect();
    assert_eq!(
        users,
        ["acme.site", "beta.site", "rack.site"],
        "shares by channel user"
    );
    for (user, prefix) in [
        ("acme.site", "acme."),
        ("beta.site", "beta."),
        ("rack.site", "other."),
    ] {
        let ids = &seen.by_user[user];
        assert!(
            ids.keys().all(|id| id.starts_with(prefix)),
            "{user}'s channel carried another account's shares: {ids:?}"
        );
    }
    let t = totals(&proxy);
    assert_eq!(
        (
            t["default"].miners,
            t["acme"].miners,
            t["beta"].miners,
            t["rack"].miners
        ),
        (0, 40, 30, 30)
    );

    // The API and /metrics show the accounts.
    let r = client::request(
        api,
        "GET",
        "/api/v1/accounts",
        Some(OPERATE),
        None,
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200);
    let v: Value = r.json().unwrap();
    let names: Vec<&str> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["default", "acme", "beta", "rack"]);
    assert_eq!(v[1]["slots"], json!(["p@acme"]));
    let metrics = http_get(api, "/metrics").await.unwrap();
    assert!(
        metrics.contains("gridproxy_account_miners{account=\"acme\"} 40"),
        "{metrics}"
    );

    // Hot reload: beta.1* moves to acme. No miner reconnects; their
    // shares go out on acme's channel from then on.
    write(
        &path,
        &config_text(pool.addr(), &key, &listen, &accounts(true)),
    );
    let r = post(api, "/api/v1/reload", None).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v: Value = r.json().unwrap();
    // beta.1 and beta.10 ..= beta.19.
    assert_eq!(v["pools"]["remapped"], 11, "{v}");
    let moved = |id: &str| id == "beta.1" || id.starts_with("beta.1");
    assert!(
        wait_until(Duration::from_secs(60), || pool_count(
            &pool,
            "acme.site",
            moved
        ) >= 10)
        .await,
        "beta.1* shares did not reach acme's channel: {:?}",
        pool.stats().by_user
    );
    // Once they do, beta's channel gets no more of them.
    let on_beta = pool_count(&pool, "beta.site", moved);
    let on_acme = pool_count(&pool, "acme.site", |_| true);
    assert!(
        wait_until(Duration::from_secs(60), || pool_count(
            &pool,
            "acme.site",
            |_| true
        ) >= on_acme + 40)
        .await
    );
    assert_eq!(
        pool_count(&pool, "beta.site", moved),
        on_beta,
        "beta.1* still on beta's channel"
    );
    assert_eq!(connects(), 100, "a miner reconnected");
    assert_eq!(disconnects(), 0);
    let t = totals(&proxy);
    assert_eq!((t["acme"].miners, t["beta"].miners), (51, 19));

    // An operator parks the whole rack account, and lets it go again.
    let r = post(
        api,
        "/api/v1/curtail",
        Some(json!({"action": "park", "account": "rack"})),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json().unwrap()["affected"], 30);
    let slot = |name: &str| {
        let pools = proxy.ctx.router.pools();
        let i = pools.iter().position(|p| p.stats.name == name).unwrap();
        proxy.ctx.router.shares()[i].clone()
    };
    assert_eq!(slot("p@rack").miners, 0, "parked miners hold no pool");
    assert_eq!(slot("p@acme").miners, 51);
    let r = post(
        api,
        "/api/v1/curtail",
        Some(json!({"action": "park", "account": "nobody"})),
    )
    .await;
    assert_eq!(r.status, 400);
    let r = post(
        api,
        "/api/v1/curtail",
        Some(json!({"action": "unpark", "account": "rack"})),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(slot("p@rack").miners, 30);

    // Stop, let every share sent be answered, and compare both sides.
    for s in [stop_a, stop_b, stop_r] {
        s.cancel();
    }
    let mut last = u64::MAX;
    assert!(
        wait_until(Duration::from_secs(20), || {
            let t = totals(&proxy);
            let sent: u64 = t.values().map(|a| a.submitted).sum();
            let done = t.values().all(|a| a.accepted + a.rejected == a.submitted)
                && pool.stats().shares == sent
                && sent == last;
            last = sent;
            done
        })
        .await,
        "shares still unanswered: {:?}",
        totals(&proxy)
    );
    let seen = pool.stats();
    let t = totals(&proxy);
    for (account, user) in [
        ("acme", "acme.site"),
        ("beta", "beta.site"),
        ("rack", "rack.site"),
    ] {
        let pool_side: u64 = seen.by_user[user].values().sum();
        assert_eq!(
            pool_side, t[account].accepted,
            "{account}: pool-side vs gridproxy"
        );
        assert_eq!(t[account].rejected, 0);
    }
    let workers = proxy.ctx.registry.snapshot();
    assert_eq!(workers.len(), 100);
    let ours: BTreeMap<String, u64> = workers
        .iter()
        .filter(|w| w.forwarded > 0)
        .map(|w| (tlv_identity(&w.name), w.forwarded))
        .collect();
    assert_eq!(seen.by_identity, ours, "pool-side counts per identity");
    eprintln!(
        "fixture pool: {} shares on 3 accounts' channels (acme {}, beta {}, rack {}); {} identities; reload moved 11 workers with 0 reconnects",
        seen.shares,
        t["acme"].accepted,
        t["beta"].accepted,
        t["rack"].accepted,
        seen.by_identity.len()
    );
    proxy.stop.cancel();
}

/// The real `pool_sv2`: three accounts' channels (and the pool's own) open
/// on one pool, and each account's shares are accepted there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_accounts_on_pool_sv2() {
    let _gate = gridproxy_tests::module_gate(module_path!());
    gridproxy_tests::init_tracing();
    let tp = start_quiet_tp().await;
    let pool = start_pool(tp.addr()).await;
    let key = pool.authority_pubkey.to_string();
    let text = config_text(pool.addr, &key, "127.0.0.1:0", &accounts(false));
    let cfg = gridproxy::Config::parse(&text, "test").expect("valid config");
    let app = start_app(cfg, None).await;
    let proxy = app.proxy.clone();
    let sv1 = proxy.sv1_addr.unwrap();
    let mut stops = Vec::new();
    for prefix in ["acme", "beta", "other"] {
        stops.push(start_sv1_miners(sv1, 10, prefix, 5_000.0).1);
    }
    assert!(
        wait_until(Duration::from_secs(120), || {
            let t = totals(&proxy);
            ["acme", "beta", "rack"].iter().all(|a| t[*a].accepted >= 3)
        })
        .await,
        "each account's shares accepted by pool_sv2: {:?}; pool log:\n{}",
        totals(&proxy),
        pool.process.log_tail(3000)
    );
    for s in stops {
        s.cancel();
    }
    let pools = proxy.ctx.router.pools();
    let names: Vec<&str> = pools.iter().map(|p| p.stats.name.as_str()).collect();
    assert_eq!(names, ["p", "p@acme", "p@beta", "p@rack"]);
    assert!(
        pools.iter().all(|p| p.stats.connects.get() >= 1),
        "every slot set up its channel"
    );
    let t = totals(&proxy);
    assert!(t.values().all(|a| a.rejected == 0), "{t:?}");
    eprintln!(
        "pool_sv2: accepted acme {} beta {} rack {} (default {})",
        t["acme"].accepted, t["beta"].accepted, t["rack"].accepted, t["default"].accepted
    );
    proxy.stop.cancel();
}
