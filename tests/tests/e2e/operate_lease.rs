//! Two instances, one site (issue 19): two `gridproxy run` processes share
//! a PostgreSQL ledger and a `[site.lease]`; only the lease holder runs the
//! curtailment engine (and its MQTT client). An MQTT dispatch to 0 % is met
//! by the first; it is killed with SIGKILL; the second takes the lease
//! within its term, wakes nobody, and acts on the next dispatch. A new
//! first instance then takes the lease from the second while that one is
//! paused (SIGSTOP); resumed, the second gives up. The ledger's command ids
//! are gapless across both handovers, each command carries the token of
//! the lease it was issued under, and `gridproxy report` reads it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::mqtt_support::{Mosquitto, Recorder, PASSWORD};
use crate::operate_site::{config_text, gridproxy_bin, site_pool, DISPATCH, TOKEN};
use gridproxy::api::client;
use gridproxy_curtail::driver::Audit;
use gridproxy_curtail::ledger::Location;
use gridproxy_fixtures::site::{Firmware, Site, SiteConfig};
use gridproxy_fixtures::sv1_pool;
use gridproxy_tests::bench::{asleep, site_kw, temp_dir};
use gridproxy_tests::postgres::PgCluster;
use gridproxy_tests::{free_addr, http_get, metric_sum, wait_until, PeerProcess};
use serde_json::json;
use tokio_util::sync::CancellationToken;

const ACK: &str = "site/op1/ack";
const LEASE_SECS: u64 = 3;

fn now_secs() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_share_a_site_through_the_lease() {
    let _gate = gridproxy_tests::module_gate(module_path!());
    with_ledger("lease-site", 180, run).await;
}

/// A private PostgreSQL cluster (`name`) for the site ledger, then `body`
/// with the gridproxy binary and it, failed after `limit_secs`.
async fn with_ledger<F: std::future::Future<Output = ()>>(
    name: &'static str,
    limit_secs: u64,
    body: impl FnOnce(PathBuf, Arc<PgCluster>) -> F,
) {
    let bin = gridproxy_bin();
    let pg = tokio::task::spawn_blocking(move || PgCluster::start(name, "site_ledger"))
        .await
        .expect("postgres");
    tokio::time::timeout(Duration::from_secs(limit_secs), body(bin, Arc::new(pg)))
        .await
        .expect("test finished in time");
}

fn signal(pid: u32, sig: &str) {
    assert!(Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()
        .unwrap()
        .success());
}

/// `gridproxy_site_lease_held` from an instance's `/metrics` (absent: a
/// failure, not a zero).
async fn lease_held(api: SocketAddr) -> f64 {
    let text = http_get(api, "/metrics").await.expect("/metrics answers");
    assert!(
        text.contains("gridproxy_site_lease_held "),
        "no lease gauge in /metrics"
    );
    metric_sum(&text, "gridproxy_site_lease_held")
}

struct Instance {
    cfg: PathBuf,
}

impl Instance {
    /// `peer`: the other instance's name and API, to push parks to.
    fn write(
        dir: &std::path::Path,
        name: &str,
        text: String,
        pg: &PgCluster,
        peer: Option<(&str, SocketAddr)>,
    ) -> Instance {
        let peers = peer
            .map(|(n, api)| {
                format!(
                    "[[site.peers]]\nname = \"{n}\"\naddress = \"{api}\"\ntoken = \"{TOKEN}\"\n"
                )
            })
            .unwrap_or_default();
        let sync = if peer.is_some() {
            "\nmin_on_secs = 1\npeer_sync_secs = 1\n"
        } else {
            "\nmin_on_secs = 1\n"
        };
        let text = text
            .replace("\nmin_on_secs = 1\n", sync)
            .replace(
                "ledger = \"ledger.sqlite\"",
                &format!("ledger = \"{}\"", pg.url()),
            )
            .replace(
                "\n[site.signals.mqtt]",
                &format!(
                    "\n[site.lease]\nsite_id = \"op1\"\ninstance = \"{name}\"\nsecs = {LEASE_SECS}\n\n{peers}\n[site.signals.mqtt]"
                ),
            );
        assert!(text.contains("[site.lease]") && text.contains("postgres://"));
        let cfg = dir.join(format!("{name}.toml"));
        std::fs::write(&cfg, text).unwrap();
        Instance { cfg }
    }

    /// Add `text` (whole tables) at the end of the config.
    fn append(&self, text: &str) {
        let mut t = std::fs::read_to_string(&self.cfg).unwrap();
        t.push_str(text);
        std::fs::write(&self.cfg, t).unwrap();
    }

    fn start(&self, bin: &PathBuf, name: &str, pg: &PgCluster) -> PeerProcess {
        let mut cmd = Command::new(bin);
        cmd.args(["run", "--status-every", "0", "--config"])
            .arg(&self.cfg)
            .env("OPERATE_SITE_MQTT_PASSWORD", PASSWORD)
            .env("GRIDPROXY_LEDGER_PASSWORD", &pg.password)
            .env("RUST_LOG", "info");
        PeerProcess::spawn(name, PeerProcess::make_dir(name), cmd)
    }
}

/// `n` each of LuxOS, Braiins OS, Whatsminer and VNish.
fn four(n: usize) -> Vec<(Firmware, usize)> {
    [
        Firmware::LuxOs,
        Firmware::BraiinsOs,
        Firmware::Whatsminer,
        Firmware::Vnish,
    ]
    .map(|f| (f, n))
    .to_vec()
}

/// What the tests start: mosquitto and a recorder of acks, the fixture
/// pool, an emulated site of `counts` miners whose SV1 firmware mines
/// through instance a, and the configs of instances a and b (same site,
/// same ledger, same lease).
/// Bind every field (`_stop`, `_pool` too): fields a destructuring leaves
/// out are dropped at once, which would stop the pool.
struct Stage {
    broker: Mosquitto,
    rec: Recorder,
    _stop: tokio_util::sync::DropGuard,
    _pool: sv1_pool::Sv1Pool,
    site: Site,
    dir: PathBuf,
    a: Instance,
    b: Instance,
    api_a: SocketAddr,
    api_b: SocketAddr,
}

impl Stage {
    /// `failover_hashrate`: the SV1 miners list b as their backup pool and
    /// hash at this rate (H/s); `None`: a only, at 200 H/s. `split`: odd
    /// miners list b first, and each instance pushes parks to the other
    /// (`[[site.peers]]`).
    async fn start(
        pg: &PgCluster,
        name: &str,
        counts: Vec<(Firmware, usize)>,
        subnet: (u8, u8),
        failover_hashrate: Option<f64>,
        split: bool,
    ) -> Stage {
        let broker = Mosquitto::start(&format!("{name}-site")).await;
        let rec = Recorder::start(broker.port, &format!("{name}-site-recorder"), &[ACK]);
        let stop = CancellationToken::new();
        let pool = site_pool(&stop).await;
        let (sv1_a, api_a, sv1_b, api_b): (SocketAddr, _, SocketAddr, _) =
            (free_addr(), free_addr(), free_addr(), free_addr());
        let mut cfg = SiteConfig {
            counts,
            time_scale: 0.1,
            subnet,
            password: "site-secret-pw".into(),
            worker_prefix: name.into(),
            pool: Some(sv1_a),
            sv1_hashrate: 200.0,
            follow_every: Duration::from_millis(100),
            ..SiteConfig::default()
        };
        if let Some(h) = failover_hashrate {
            cfg.backup_pools = vec![sv1_b];
            cfg.sv1_hashrate = h;
            cfg.sv1_backoff_max = Duration::from_millis(500);
            cfg.alternate_pools = split;
        }
        let site = Site::start(cfg).await.expect("emulators start");
        let dir = temp_dir(&format!("operate-{name}"));
        let a = Instance::write(
            &dir,
            "a",
            config_text(pool.addr(), sv1_a, api_a, &site, broker.port),
            pg,
            split.then_some(("b", api_b)),
        );
        let b = Instance::write(
            &dir,
            "b",
            config_text(pool.addr(), sv1_b, api_b, &site, broker.port),
            pg,
            split.then_some(("a", api_a)),
        );
        Stage {
            broker,
            rec,
            _stop: stop.drop_guard(),
            _pool: pool,
            site,
            dir,
            a,
            b,
            api_a,
            api_b,
        }
    }
}

/// Start a, wait until it runs the engine, then b, in standby; then wait
/// until every SV1 miner of `site` hashes.
async fn start_pair(
    a: &Instance,
    b: &Instance,
    bin: &PathBuf,
    pg: &PgCluster,
    prefix: &str,
    site: &Site,
) -> (PeerProcess, PeerProcess) {
    // a first, so that it takes the lease.
    let pa = a.start(bin, &format!("{prefix}-a"), pg);
    assert!(
        wait_until(Duration::from_secs(30), || pa
            .count_in_log("MQTT dispatch: broker")
            == 1)
        .await,
        "a active:\n{}",
        pa.log_tail(2000)
    );
    let pb = b.start(bin, &format!("{prefix}-b"), pg);
    assert!(
        wait_until(Duration::from_secs(30), || {
            pa.count_in_log("MQTT dispatch: broker") == 1 && pb.count_in_log("standby") == 1
        })
        .await,
        "a active and b standby:\n{}\n{}",
        pa.log_tail(2000),
        pb.log_tail(2000)
    );
    let n = site.len();
    assert!(
        wait_until(Duration::from_secs(60), || site.sv1_running() == n).await,
        "{} of {n} SV1 miners hashing",
        site.sv1_running()
    );
    (pa, pb)
}

async fn run(bin: PathBuf, pg: Arc<PgCluster>) {
    let pg = &*pg;
    // Firmware-controlled miners only: they sleep whichever instance
    // commands them (parking acts on the proxy a miner is connected to).
    let Stage {
        broker,
        rec,
        site,
        dir,
        a,
        b,
        api_a,
        api_b,
        _stop: _keep_stop,
        _pool: _keep_pool,
    } = Stage::start(pg, "lease", four(2), (77, 0), None, false).await;
    let n = site.len();
    // A takes the lease; B waits.
    let mut pa = a.start(&bin, "lease-a", pg);
    assert!(
        pa.wait_for_log("site lease acquired", Duration::from_secs(20))
            .await,
        "a did not take the lease:\n{}",
        pa.log()
    );
    assert!(
        pa.wait_for_log("MQTT dispatch: broker", Duration::from_secs(20))
            .await,
        "a did not start its sources:\n{}",
        pa.log()
    );
    let mut pb = b.start(&bin, "lease-b", pg);
    assert!(
        pb.wait_for_log("standby", Duration::from_secs(20)).await,
        "b not in standby:\n{}",
        pb.log()
    );
    assert_eq!(
        pb.count_in_log("MQTT dispatch: broker"),
        0,
        "a standby must not subscribe (signals once)"
    );
    assert_eq!(lease_held(api_a).await, 1.0, "a's /metrics");
    assert_eq!(lease_held(api_b).await, 0.0, "b's /metrics");

    // Dispatch to 0 % (retained, with its time, as a setpoint topic is):
    // A puts the fleet to sleep.
    broker.publish_retained(
        DISPATCH,
        &json!({"id": "d-zero", "target_pct": 0, "ts": now_secs()}).to_string(),
    );
    assert!(
        wait_until(Duration::from_secs(10), || rec.ack(ACK, "d-zero").is_some()).await,
        "no ack for d-zero"
    );
    assert!(
        wait_until(Duration::from_secs(30), || site.miners().iter().all(asleep)).await,
        "{} of {n} asleep under a 0 % dispatch",
        site.miners().iter().filter(|m| asleep(m)).count()
    );

    // SIGKILL A mid-event: B takes the lease within its term and wakes nobody.
    let killed = Instant::now();
    signal(pa.pid(), "KILL");
    let mut woken = 0;
    let took_over = loop {
        if pb.count_in_log("site lease acquired") > 0 {
            break killed.elapsed();
        }
        woken = woken.max(site.miners().iter().filter(|m| !asleep(m)).count());
        assert!(
            killed.elapsed() < Duration::from_secs(LEASE_SECS * 4),
            "b did not take over:\n{}",
            pb.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        pb.wait_for_log("MQTT dispatch: broker", Duration::from_secs(10))
            .await,
        "b did not start its sources after taking over:\n{}",
        pb.log()
    );
    // Watch a few seconds more: B's engine recovered who is asleep and the
    // retained dispatch still says 0 %.
    let watch = Instant::now();
    while watch.elapsed() < Duration::from_secs(4) {
        woken = woken.max(site.miners().iter().filter(|m| !asleep(m)).count());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(woken, 0, "the handover woke miners");
    assert_eq!(
        lease_held(api_b).await,
        1.0,
        "b's /metrics after taking over"
    );

    // B acts: a dispatch to 100 % wakes the fleet.
    broker.publish_retained(
        DISPATCH,
        &json!({"id": "d-full", "target_pct": 100, "ts": now_secs()}).to_string(),
    );
    assert!(
        wait_until(Duration::from_secs(10), || rec.ack(ACK, "d-full").is_some()).await,
        "b did not answer d-full:\n{}",
        pb.log_tail(3000)
    );
    assert!(
        wait_until(Duration::from_secs(30), || !site
            .miners()
            .iter()
            .any(asleep))
        .await,
        "b did not wake the fleet:\n{}",
        pb.log_tail(3000)
    );

    // B paused past its lease: a new A takes the lease and acts; B, resumed,
    // gives up without acting.
    signal(pb.pid(), "STOP");
    let mut pa2 = a.start(&bin, "lease-a2", pg);
    assert!(
        pa2.wait_for_log("site lease acquired", Duration::from_secs(LEASE_SECS * 5))
            .await,
        "a2 did not take the lease from a paused b:\n{}",
        pa2.log()
    );
    assert!(
        pa2.wait_for_log("MQTT dispatch: broker", Duration::from_secs(10))
            .await,
        "{}",
        pa2.log()
    );
    broker.publish_retained(
        DISPATCH,
        &json!({"id": "d-zero-2", "target_pct": 0, "ts": now_secs()}).to_string(),
    );
    assert!(
        wait_until(Duration::from_secs(30), || site.miners().iter().all(asleep)).await,
        "a2 did not put the fleet to sleep:\n{}",
        pa2.log_tail(3000)
    );
    signal(pb.pid(), "CONT");
    assert!(
        pb.wait_for_log("site lease lost", Duration::from_secs(LEASE_SECS * 3))
            .await,
        "b resumed without noticing:\n{}",
        pb.log_tail(3000)
    );
    // Let a2 settle, then stop both cleanly.
    for p in [&mut pa2, &mut pb] {
        signal(p.pid(), "INT");
    }
    assert!(
        wait_until(Duration::from_secs(20), || !pa2.is_running()
            && !pb.is_running())
        .await
    );

    // The ledger: gapless ids, tokens in order, one per holder.
    let loc = Location::parse(&pg.url())
        .unwrap()
        .with_password(Some(pg.password.clone()));
    let audit = Audit::read(&loc).expect("ledger");
    let ids: Vec<u64> = audit.commands.iter().map(|c| c.id.0).collect();
    assert_eq!(
        ids,
        (1..=ids.len() as u64).collect::<Vec<_>>(),
        "gapless ids"
    );
    let tokens: Vec<u64> = audit
        .commands
        .iter()
        .map(|c| c.fence.expect("every command carries its lease token"))
        .collect();
    assert!(
        tokens.windows(2).all(|w| w[0] <= w[1]),
        "tokens in order: {tokens:?}"
    );
    let mut holders = tokens.clone();
    holders.dedup();
    assert_eq!(holders.len(), 3, "a, b, a2 each commanded: {tokens:?}");
    for c in &audit.commands {
        assert!(
            audit.acks_of(c.id).any(|a| a.outcome.starts_with("ack_")),
            "command {} has no acknowledgement",
            c.id.0
        );
    }
    let hand = pg
        .psql(&pg.db, "SELECT count(*) FROM commands")
        .unwrap()
        .parse::<usize>()
        .unwrap();
    assert_eq!(hand, audit.commands.len());
    let out = Command::new(&bin)
        .args(["report", "--ledger", &pg.url()])
        .env("GRIDPROXY_LEDGER_PASSWORD", &pg.password)
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && report.contains(&format!("commands: {hand}")),
        "report: {report} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    println!(
        "operate_lease: {n} miners; SIGKILL -> b active in {:.2} s (lease {LEASE_SECS} s), 0 woken; \
         {} commands under tokens {holders:?}, ids 1..={}, all acknowledged",
        took_over.as_secs_f64(),
        audit.commands.len(),
        audit.commands.len()
    );
    drop(site);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The field case: 100 emulated miners whose SV1 firmware lists
/// both instances as pools; an MQTT dispatch to 40 % is met by the holder;
/// it is SIGKILLed mid-event; the standby takes the lease within the term,
/// wakes none of the miners asleep at the kill, keeps the site within ±2 %
/// of the target from the takeover on, and the miners that hashed through
/// the dead instance fail over to the survivor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dispatch_is_held_through_a_sigkill_of_the_active_instance() {
    let _gate = gridproxy_tests::module_gate(module_path!());
    with_ledger("lease-100", 240, held_through_kill).await;
}

async fn held_through_kill(bin: PathBuf, pg: Arc<PgCluster>) {
    let pg = &*pg;
    let Stage {
        broker,
        rec,
        site,
        dir,
        a,
        b,
        api_b,
        _stop: _keep_stop,
        _pool: _keep_pool,
        ..
    } = Stage::start(pg, "field", four(25), (78, 0), Some(50.0), false).await;
    let n = site.len();
    let nominal_kw = site.nominal_w() / 1000.0;
    let (pa, mut pb) = start_pair(&a, &b, &bin, pg, "lease100", &site).await;

    // 40 %: met by a.
    let target = 0.4 * nominal_kw;
    let within = |kw: f64| (kw - target).abs() <= 0.02 * target;
    broker.publish_retained(
        DISPATCH,
        &json!({"id": "d-40", "target_pct": 40, "ts": now_secs()}).to_string(),
    );
    assert!(
        wait_until(Duration::from_secs(10), || rec.ack(ACK, "d-40").is_some()).await,
        "no ack for d-40"
    );
    let t0 = Instant::now();
    assert!(
        wait_until(Duration::from_secs(90), || within(site_kw(&site))).await,
        "40 % ({target:.1} kW) not met: {:.1} kW",
        site_kw(&site)
    );
    let met = t0.elapsed();
    // Settled: a few seconds inside the band.
    let settle = Instant::now();
    while settle.elapsed() < Duration::from_secs(3) {
        assert!(
            within(site_kw(&site)),
            "left the band: {:.1} kW",
            site_kw(&site)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let asleep_at_kill: Vec<usize> = site
        .miners()
        .iter()
        .filter(|m| asleep(m))
        .map(|m| m.index)
        .collect();
    assert!(!asleep_at_kill.is_empty());

    // SIGKILL a mid-event.
    let killed = Instant::now();
    signal(pa.pid(), "KILL");
    let (mut lo, mut hi) = (f64::MAX, f64::MIN);
    let mut woken = std::collections::BTreeSet::new();
    let mut sample = |lo: &mut f64, hi: &mut f64| {
        let kw = site_kw(&site);
        *lo = lo.min(kw);
        *hi = hi.max(kw);
        for m in site.miners() {
            if asleep_at_kill.contains(&m.index) && !asleep(m) {
                woken.insert(m.index);
            }
        }
    };
    let took_over = loop {
        sample(&mut lo, &mut hi);
        if pb.count_in_log("site lease acquired") > 0 {
            break killed.elapsed();
        }
        assert!(
            killed.elapsed() < Duration::from_secs(LEASE_SECS * 4),
            "b did not take over:\n{}",
            pb.log_tail(3000)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // From the takeover on: 10 s inside the band, nobody woken.
    let (mut tlo, mut thi) = (f64::MAX, f64::MIN);
    let watch = Instant::now();
    while watch.elapsed() < Duration::from_secs(10) {
        sample(&mut tlo, &mut thi);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(woken.is_empty(), "the handover woke miners {woken:?}");
    assert!(
        within(tlo) && within(thi),
        "site left ±2 % of {target:.1} kW after the takeover: {tlo:.1}..{thi:.1} kW"
    );
    // The miners that hashed through a now hash through b.
    let awake = n - site.miners().iter().filter(|m| asleep(m)).count();
    let on_b = || async {
        let text = http_get(api_b, "/metrics").await.unwrap_or_default();
        metric_sum(&text, "gridproxy_pool_miners") as usize
    };
    let t_fail = Instant::now();
    let mut seen = 0;
    while t_fail.elapsed() < Duration::from_secs(30) {
        seen = on_b().await;
        if seen == awake {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(seen, awake, "miners hashing through b");

    signal(pb.pid(), "INT");
    assert!(wait_until(Duration::from_secs(20), || !pb.is_running()).await);
    let loc = Location::parse(&pg.url())
        .unwrap()
        .with_password(Some(pg.password.clone()));
    let audit = Audit::read(&loc).expect("ledger");
    let ids: Vec<u64> = audit.commands.iter().map(|c| c.id.0).collect();
    assert_eq!(
        ids,
        (1..=ids.len() as u64).collect::<Vec<_>>(),
        "gapless ids"
    );
    let mut tokens: Vec<u64> = audit.commands.iter().filter_map(|c| c.fence).collect();
    assert_eq!(tokens.len(), ids.len(), "every command carries its token");
    tokens.dedup();
    assert_eq!(tokens[0], 1, "a's token");
    println!(
        "operate_lease (100 miners, {nominal_kw:.0} kW): 40 % = {target:.1} kW met in {:.1} s; \
         SIGKILL -> b active in {:.2} s (lease {LEASE_SECS} s); during takeover {lo:.1}..{hi:.1} kW, \
         after it {tlo:.1}..{thi:.1} kW (band ±2 %), 0 of {} sleeping miners woken; \
         {awake} hashing miners on b; {} commands, tokens {tokens:?}",
        met.as_secs_f64(),
        took_over.as_secs_f64(),
        asleep_at_kill.len(),
        audit.commands.len()
    );
    drop(site);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Whether `cond` comes true within `timeout` (checked every 200 ms).
async fn wait_until_async<F: std::future::Future<Output = bool>>(
    timeout: Duration,
    mut cond: impl FnMut() -> F,
) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `GET path` on an instance's API with the operate token.
async fn api_json(api: SocketAddr, path: &str) -> serde_json::Value {
    let r = client::request(api, "GET", path, Some(TOKEN), None, Duration::from_secs(5))
        .await
        .unwrap_or_else(|e| panic!("GET {path}: {e}"));
    assert_eq!(r.status, 200, "GET {path}: {}", r.text());
    r.json().expect("JSON")
}

/// A metric from an instance's `/metrics` (absent: a failure, not a zero).
async fn metric(api: SocketAddr, name: &str) -> f64 {
    let text = http_get(api, "/metrics").await.expect("/metrics answers");
    assert!(
        text.lines().any(|l| l.starts_with(name)),
        "no {name} in /metrics"
    );
    metric_sum(&text, name)
}

/// Per worker at an instance: (connected, parked there, accepted there).
async fn workers_at(api: SocketAddr) -> std::collections::HashMap<String, (bool, bool, u64)> {
    let v = api_json(api, "/api/v1/workers?limit=1000&sort=name").await;
    v["workers"]
        .as_array()
        .expect("workers")
        .iter()
        .map(|w| {
            (
                w["name"].as_str().unwrap_or_default().to_owned(),
                (
                    w["connections"].as_u64().unwrap_or(0) > 0,
                    w["parked"].as_bool().expect("workers say parked"),
                    w["accepted"].as_u64().unwrap_or(0),
                ),
            )
        })
        .collect()
}

/// Parking across instances (`[[site.peers]]`): a site split between two
/// instances (odd miners mine through b first). Stock miners, which the
/// policy parks, are parked at b too by a's pushes; the a-side stock miners
/// fail over to b when a is SIGKILLed and find themselves parked there
/// (no share accepted) before and after b takes the lease; b, now active,
/// unparks them on a dispatch to 100 %. A push under a's old token is
/// refused by b (fenced), and one without a token is unauthorised.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parks_follow_the_miner_across_instances() {
    let _gate = gridproxy_tests::module_gate(module_path!());
    with_ledger("lease-peers", 240, parks_across).await;
}

async fn parks_across(bin: PathBuf, pg: Arc<PgCluster>) {
    let pg = &*pg;
    let Stage {
        broker,
        rec,
        site,
        dir,
        a,
        b,
        api_a,
        api_b,
        _stop: _keep_stop,
        _pool: _keep_pool,
    } = Stage::start(
        pg,
        "peers",
        vec![(Firmware::LuxOs, 4), (Firmware::Stock, 4)],
        (79, 0),
        Some(50.0),
        true,
    )
    .await;
    let n = site.len();
    let stock: Vec<String> = site
        .miners()
        .iter()
        .filter(|m| m.firmware == Firmware::Stock)
        .map(|m| m.worker.clone())
        .collect();
    let (pa, mut pb) = start_pair(&a, &b, &bin, pg, "peers", &site).await;
    // Half the site mines through each instance, and a knows which
    // workers b holds (b's answer to its pushes).
    let at_b = |w: &std::collections::HashMap<String, (bool, bool, u64)>| {
        w.values().filter(|(c, _, _)| *c).count()
    };
    let t = Instant::now();
    let mut held_b = 0;
    while t.elapsed() < Duration::from_secs(30) {
        held_b = at_b(&workers_at(api_b).await);
        let fleet = api_json(api_a, "/api/v1/fleet").await;
        let peer = &fleet["site"]["peers"][0];
        if held_b == n / 2 && peer["up"] == true && peer["workers"] == held_b {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(held_b, n / 2, "odd miners on b");
    let fleet = api_json(api_a, "/api/v1/fleet").await;
    assert_eq!(fleet["site"]["peers"][0]["name"], "b", "{fleet}");
    assert_eq!(fleet["site"]["peers"][0]["workers"], n / 2, "{fleet}");
    assert_eq!(metric(api_a, "gridproxy_site_peer_up").await, 1.0);
    // `gridproxy status` says the same, for an operator.
    let status = |api: SocketAddr| {
        let out = Command::new(&bin)
            .args(["status", "--api", &api.to_string(), "--token", TOKEN])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let sa = status(api_a);
    assert!(
        sa.contains("site lease: held, token 1") && sa.contains("peer b") && sa.contains(" up "),
        "status of a:\n{sa}"
    );
    let sb = status(api_b);
    assert!(sb.contains("site: standby"), "status of b:\n{sb}");

    let before_zero = workers_at(api_b).await;
    // 0 %: LuxOS miners sleep; stock miners are parked, at a by its engine
    // and at b by a's push, wherever they are connected.
    broker.publish_retained(
        DISPATCH,
        &json!({"id": "p-zero", "target_pct": 0, "ts": now_secs()}).to_string(),
    );
    assert!(
        wait_until(Duration::from_secs(10), || rec.ack(ACK, "p-zero").is_some()).await,
        "no ack for p-zero"
    );
    // b lists the workers it has seen; the others' parks wait for them.
    let stock_at_b: Vec<String> = stock
        .iter()
        .filter(|s| before_zero.get(*s).is_some_and(|(c, _, _)| *c))
        .cloned()
        .collect();
    assert_eq!(stock_at_b.len(), stock.len() / 2, "odd stock miners on b");
    let t = Instant::now();
    let (mut parked_b, mut kept_b) = (0, 0.0);
    while t.elapsed() < Duration::from_secs(30) {
        let w = workers_at(api_b).await;
        parked_b = stock_at_b
            .iter()
            .filter(|s| w.get(*s).is_some_and(|(_, p, _)| *p))
            .count();
        kept_b = metric(api_b, "gridproxy_site_parks").await;
        if parked_b == stock_at_b.len() && kept_b == stock.len() as f64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        (parked_b, kept_b),
        (stock_at_b.len(), stock.len() as f64),
        "stock miners parked at b by a's push:\n{}",
        pb.log_tail(2000)
    );
    // The stock miners connected at b get no work there: none is on a pool.
    assert!(
        wait_until_async(Duration::from_secs(20), || async {
            metric(api_b, "gridproxy_pool_miners").await == 0.0
        })
        .await,
        "b still gives work to a parked miner"
    );
    // Pushes are fenced and authenticated.
    let stale = json!({"from": "old", "fence": 0, "parks": []});
    let r = client::request(
        api_b,
        "POST",
        "/api/v1/site/parks",
        Some(TOKEN),
        Some(&stale),
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 409, "an older token is refused: {}", r.text());
    let r = client::request(
        api_b,
        "POST",
        "/api/v1/site/parks",
        None,
        Some(&stale),
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 401, "{}", r.text());
    let before = workers_at(api_b).await;

    // SIGKILL a: its stock miners fail over to b, where they are parked.
    signal(pa.pid(), "KILL");
    let t = Instant::now();
    let mut worked = std::collections::BTreeSet::new();
    let mut took_over = None;
    let mut all_at_b = false;
    while t.elapsed() < Duration::from_secs(30) {
        let w = workers_at(api_b).await;
        for s in &stock {
            let accepted_before = before.get(s).map_or(0, |(_, _, a)| *a);
            if w.get(s).is_some_and(|(_, _, a)| *a > accepted_before) {
                worked.insert(s.clone());
            }
        }
        if took_over.is_none() && pb.count_in_log("site lease acquired") > 0 {
            took_over = Some(t.elapsed());
        }
        all_at_b = stock.iter().all(|s| w.get(s).is_some_and(|(c, _, _)| *c));
        if all_at_b && took_over.is_some_and(|d| t.elapsed() > d + Duration::from_secs(3)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(all_at_b, "stock miners did not all fail over to b");
    let took_over = took_over.expect("b took the lease");
    assert!(worked.is_empty(), "parked miners got work at b: {worked:?}");
    assert_eq!(metric(api_b, "gridproxy_pool_miners").await, 0.0);
    assert_eq!(
        metric(api_b, "gridproxy_site_parks").await,
        stock.len() as f64
    );

    // b, active, unparks on 100 %; a is down for its pushes.
    broker.publish_retained(
        DISPATCH,
        &json!({"id": "p-full", "target_pct": 100, "ts": now_secs()}).to_string(),
    );
    assert!(
        wait_until(Duration::from_secs(10), || rec.ack(ACK, "p-full").is_some()).await,
        "b did not answer p-full:\n{}",
        pb.log_tail(3000)
    );
    assert!(
        wait_until_async(Duration::from_secs(60), || async {
            metric(api_b, "gridproxy_pool_miners").await == n as f64
        })
        .await,
        "b did not put the site back to work:\n{}",
        pb.log_tail(3000)
    );
    assert_eq!(metric(api_b, "gridproxy_site_parks").await, 0.0);
    assert_eq!(
        metric(api_b, "gridproxy_site_peer_up").await,
        0.0,
        "a is down"
    );
    let fleet = api_json(api_b, "/api/v1/fleet").await;
    let peer = &fleet["site"]["peers"][0];
    assert!(
        peer["name"] == "a" && peer["up"] == false && peer["error"].is_string(),
        "{fleet}"
    );
    signal(pb.pid(), "INT");
    assert!(wait_until(Duration::from_secs(20), || !pb.is_running()).await);
    println!(
        "operate_lease (parks across instances): {n} miners split over a and b; 0 % -> {} stock miners \
         parked at b by a's push; SIGKILL a -> its stock miners on b, parked (0 shares accepted), \
         b active in {:.2} s; 100 % from b -> all {n} back at work; stale push 409, no token 401",
        stock.len(),
        took_over.as_secs_f64()
    );
    drop(site);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A loopback TCP relay to `to` that counts the connections it carried:
/// which instance talks to the VTN, seen from outside both.
struct Relay {
    addr: SocketAddr,
    connections: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    _stop: tokio_util::sync::DropGuard,
}

impl Relay {
    async fn start(to: SocketAddr) -> Relay {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let connections = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let stop = CancellationToken::new();
        let (n, s) = (connections.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let (mut c, _) = tokio::select! {
                    _ = s.cancelled() => return,
                    r = l.accept() => match r { Ok(c) => c, Err(_) => continue },
                };
                n.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let s = s.clone();
                tokio::spawn(async move {
                    let Ok(mut up) = tokio::net::TcpStream::connect(to).await else {
                        return;
                    };
                    tokio::select! {
                        _ = s.cancelled() => {}
                        _ = tokio::io::copy_bidirectional(&mut c, &mut up) => {}
                    }
                });
            }
        });
        Relay {
            addr,
            connections,
            _stop: stop.drop_guard(),
        }
    }

    fn connections(&self) -> usize {
        self.connections.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// Signals once, for OpenADR: both instances are configured with the same
/// VEN of a real openleadr-rs VTN, each through its own counting relay.
/// Only the holder talks to the VTN and follows its capacity-limit event;
/// the standby makes no connection at all until it takes the lease, then
/// connects and follows the same event (ending it puts the site back to
/// work). The VTN has one report per holder for the event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_holder_talks_to_the_vtn() {
    let _gate = gridproxy_tests::module_gate(module_path!());
    with_ledger("lease-vtn", 240, vtn_once).await;
}

async fn vtn_once(bin: PathBuf, pg: Arc<PgCluster>) {
    let pg = &*pg;
    let Stage {
        site,
        dir,
        a,
        b,
        _stop: _keep_stop,
        _pool: _keep_pool,
        ..
    } = Stage::start(pg, "vtn", four(2), (80, 0), None, false).await;
    let vtn = crate::vtn_support::Vtn::up(&dir.join("vtn"));
    let vtn_addr: SocketAddr = vtn
        .var("VTN_URL")
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .parse()
        .expect("VTN on a loopback address");
    let utility = vtn.utility("lease-dr", "PT10M").await;
    let (relay_a, relay_b) = (Relay::start(vtn_addr).await, Relay::start(vtn_addr).await);
    for (inst, relay) in [(&a, &relay_a), (&b, &relay_b)] {
        inst.append(&format!(
            "\n[site.signals.openadr]\nvtn_url = \"http://{}\"\nclient_id = \"{}\"\n\
             client_secret = \"{}\"\nven_name = \"{}\"\npoll_secs = 1\nwebsocket = false\n\
             report_secs = 1\n",
            relay.addr,
            vtn.var("VEN_CLIENT_ID"),
            vtn.var("VEN_CLIENT_SECRET"),
            vtn.var("VEN_NAME"),
        ));
    }
    let (pa, mut pb) = start_pair(&a, &b, &bin, pg, "vtn", &site).await;
    assert_eq!(pa.count_in_log("OpenADR 3 VEN"), 1, "a runs the VEN");
    assert!(
        wait_until(Duration::from_secs(20), || relay_a.connections() > 0).await,
        "a never reached the VTN:\n{}",
        pa.log_tail(3000)
    );
    // A limit at half the site's draw: a follows it.
    let nominal_kw = site.nominal_w() / 1000.0;
    let limit = (nominal_kw * 0.5 * 10.0).round() / 10.0;
    let mut ev = utility
        .create_limit("lease-half", limit, "KW")
        .await
        .expect("event created");
    assert!(
        wait_until(Duration::from_secs(60), || site_kw(&site) <= limit * 1.005).await,
        "a did not follow the VTN's limit of {limit:.1} kW: {:.1} kW\n{}",
        site_kw(&site),
        pa.log_tail(3000)
    );
    assert_eq!(
        (relay_b.connections(), pb.count_in_log("OpenADR 3 VEN")),
        (0, 0),
        "the standby talked to the VTN"
    );
    let a_conns = relay_a.connections();

    // The holder dies; the standby takes the lease, connects and follows.
    signal(pa.pid(), "KILL");
    assert!(
        pb.wait_for_log("site lease acquired", Duration::from_secs(LEASE_SECS * 4))
            .await,
        "b did not take over:\n{}",
        pb.log_tail(3000)
    );
    assert!(
        wait_until(Duration::from_secs(20), || relay_b.connections() > 0).await,
        "b never reached the VTN after taking over:\n{}",
        pb.log_tail(3000)
    );
    // b holds the event's limit (nobody woken by the handover) ...
    let watch = Instant::now();
    while watch.elapsed() < Duration::from_secs(3) {
        assert!(
            site_kw(&site) <= limit * 1.005,
            "b let the site past the VTN's limit: {:.1} kW",
            site_kw(&site)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // ... and follows its end.
    crate::vtn_support::cut_short(&mut ev).await;
    assert!(
        wait_until(Duration::from_secs(90), || site_kw(&site) > limit * 1.5).await,
        "b did not end the VTN's event: {:.1} kW\n{}",
        site_kw(&site),
        pb.log_tail(3000)
    );
    // One report per holder that ran the VEN during the event (a's until
    // the kill, b's after it: a takeover starts a new one), all under the
    // site's one VEN name; a standby reporting too would make a third.
    let reports = ev.get_report_list(None).await.expect("list reports");
    assert_eq!(reports.len(), 2, "one report per holder");
    assert!(
        reports
            .iter()
            .all(|r| r.content().client_name == vtn.var("VEN_NAME")),
        "reports from one VEN"
    );
    signal(pb.pid(), "INT");
    assert!(wait_until(Duration::from_secs(20), || !pb.is_running()).await);
    println!(
        "operate_lease (OpenADR once): a's VEN followed a {limit:.1} kW limit through {a_conns} \
         connections while b made 0; after a's SIGKILL b connected ({} connections) and ended the \
         event; {} report(s) on the VTN, all from one VEN",
        relay_b.connections(),
        reports.len()
    );
    drop(site);
    drop(vtn);
    let _ = std::fs::remove_dir_all(&dir);
}
