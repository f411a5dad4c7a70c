//! `gridproxy run` with a `[site]` section, end to end: the real binary,
//! a real Eclipse Mosquitto broker, ten firmware emulators (two each of
//! LuxOS, Braiins OS, Whatsminer, VNish and stock cgminer) whose SV1 miners
//! hash through the proxy to a fixture pool.
//!
//! Checked: the binary prints what it started; an MQTT dispatch of 0 % puts
//! every commandable miner to sleep and parks the stock ones at the proxy
//! (the control API shows them parked); a kW target is then met from
//! below; the control API's site view is attached to the same engine and
//! an operator cap through `POST /api/v1/curtail` lands in the engine;
//! after SIGINT the ledger holds the commands, their acknowledgements,
//! both dispatch signals and measured intervals, and `gridproxy report
//! --ledger` summarises it. A config with a misspelt `[site]` key is
//! refused with the key and its line, and nothing starts.

#[allow(unused_imports)] // only part of the shared helpers is used here
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::mqtt_support::{Mosquitto, Recorder, PASSWORD, USER};
use gridproxy::api::client;
use gridproxy::site::miner_id;
use gridproxy_curtail as curtail;
use gridproxy_fixtures::site::{Firmware, Site, SiteConfig};
use gridproxy_fixtures::sv1_pool::{self, Sv1PoolConfig};
use gridproxy_tests::bench::{asleep, temp_dir};
use gridproxy_tests::{free_addr, remove_env, wait_until, PeerProcess};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use curtail::command::Action;
use curtail::driver::Audit;
use curtail::ledger::Location;
use gridproxy_tests::postgres::PgCluster;

pub(crate) const TOKEN: &str = "operate-site-token-0123456789";
pub(crate) const DISPATCH: &str = "site/op1/dispatch";
const ACK: &str = "site/op1/ack";
const STATUS: &str = "site/op1/status";
/// Emulator ramps run this much faster than real firmware.
const TIME_SCALE: f64 = 0.1;

/// The `gridproxy` binary of this build, (re)built with the workspace's
/// cargo into the same target directory (quick when it is up to date).
pub(crate) fn gridproxy_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    // <target>/<profile>/deps/e2e-<hash>
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("profile dir")
        .to_path_buf();
    let target_dir = profile_dir.parent().expect("target dir");
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| env!("CARGO").to_string());
    let mut cmd = Command::new(cargo);
    // Drop what cargo set for this test process: build scripts watch some of
    // it (ring reruns on CARGO_MANIFEST_DIR), and a changed value rebuilt
    // ring, rustls, sqlx and reqwest here (~220 s in CI) instead of nothing.
    remove_env(
        &mut cmd,
        &[
            "CARGO_PKG_",
            "CARGO_MANIFEST_",
            "CARGO_CRATE_",
            "CARGO_BIN_",
            "CARGO_PRIMARY_PACKAGE",
            "CARGO_TARGET_TMPDIR",
            "OUT_DIR",
        ],
    );
    cmd.args(["build", "--quiet", "-p", "gridproxy", "--bin", "gridproxy"])
        .arg("--manifest-path")
        .arg(&manifest)
        .arg("--target-dir")
        .arg(target_dir);
    if profile_dir.file_name().is_some_and(|n| n == "release") {
        cmd.arg("--release");
    }
    let out = cmd.output().expect("run cargo build");
    assert!(
        out.status.success(),
        "cargo build of the gridproxy binary failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bin = profile_dir.join("gridproxy");
    assert!(bin.is_file(), "{} not built", bin.display());
    bin
}

fn firmware_name(f: Firmware) -> &'static str {
    match f {
        Firmware::LuxOs => "luxos",
        Firmware::BraiinsOs => "braiins",
        Firmware::Whatsminer => "whatsminer",
        Firmware::Vnish => "vnish",
        Firmware::Antminer => "antminer",
        Firmware::Stock => "stock",
    }
}

/// The config file: one SV1 pool, the SV1 listener, the API, and `[site]`
/// with every emulator and MQTT dispatch from `broker_port`.
pub(crate) fn config_text(
    pool: SocketAddr,
    sv1: SocketAddr,
    api: SocketAddr,
    site: &Site,
    broker_port: u16,
) -> String {
    let mut s = format!(
        r#"# operate_site test
[[pools]]
name = "pool"
address = "{pool}"
protocol = "sv1"
user = "site-test"

[listen]
sv1 = "{sv1}"

[difficulty]
initial = 0.0001
min = 9.313225746154785e-10
max = 1.0
shares_per_minute = 12.0

[routing]
reconnect_ms = 100

[api]
listen = "{api}"

[[api.tokens]]
name = "ops"
role = "operate"
token = "{TOKEN}"

[site]
ledger = "ledger.sqlite"
min_on_secs = 1
min_off_secs = 1
restore_batch = 10
restore_interval_secs = 1
ack_timeout_secs = 5
verify_grace_secs = 5
retry_backoff_secs = 2
telemetry_secs = 1
ledger_interval_secs = 2
client_timeout_ms = 1500

[site.signals.mqtt]
broker = "127.0.0.1:{broker_port}"
site_id = "op1"
username = "{USER}"
password_env = "OPERATE_SITE_MQTT_PASSWORD"
silence_timeout_secs = 300
status_secs = 1
keepalive_secs = 5
"#
    );
    s.push_str(&site_miners_toml(site));
    s
}

/// The fixture SV1 pool the site tests mine on: easy shares, a job every
/// 10 s, a block a minute; stopped with `stop`.
pub(crate) async fn site_pool(stop: &CancellationToken) -> sv1_pool::Sv1Pool {
    sv1_pool::spawn(
        "127.0.0.1:0".parse().unwrap(),
        Sv1PoolConfig {
            name: "pool".into(),
            difficulty: 1.0 / (1u64 << 22) as f64,
            job_interval: Duration::from_secs(10),
            block_interval: Duration::from_secs(60),
            ..Default::default()
        },
        stop.clone(),
    )
    .await
    .expect("fixture pool")
}

/// One `[[site.miners]]` table per emulator of `site` (named `m<index>`).
pub(crate) fn site_miners_toml(site: &Site) -> String {
    let mut s = String::new();
    for m in site.miners() {
        let c = &m.config;
        s.push_str(&format!(
            "\n[[site.miners]]\nname = \"m{}\"\nfirmware = \"{}\"\naddress = \"{}\"\nmodel = \"{}\"\n\
             ths = {:.1}\nwatts = {:.1}\nsleep_w = {:.1}\nmin_power_w = {:.1}\nworker = \"{}\"\n",
            m.index,
            firmware_name(m.firmware),
            m.addr(),
            m.model,
            c.nominal_ths,
            c.nominal_w,
            c.sleep_w,
            c.min_power_w,
            m.worker
        ));
        if m.firmware != Firmware::LuxOs && m.firmware != Firmware::Stock {
            s.push_str(&format!("password = \"{}\"\n", m.password));
        }
        if m.firmware == Firmware::Stock {
            // This site blocks backup pools: a parked ASIC idles.
            s.push_str(&format!("parked_w = {:.1}\n", c.sleep_w));
        }
        if let Some(web) = &m.web {
            s.push_str(&format!("web = \"{}\"\n", web.addr()));
        }
    }
    s
}

async fn api_get(api: SocketAddr, path: &str) -> Value {
    let r = client::request(api, "GET", path, Some(TOKEN), None, Duration::from_secs(5))
        .await
        .expect("API answers");
    assert_eq!(r.status, 200, "GET {path}: {}", r.text());
    r.json().expect("JSON")
}

/// Mirror this site's physics: a stock miner the proxy parks gets no work
/// and idles (its emulator sleeps), as in a site without backup pools.
/// The parked state is read from the control API's worker list.
fn mirror_parking(api: SocketAddr, site: &Site, stop: CancellationToken) {
    let stock: Vec<(String, gridproxy_fixtures::firmware::model::SimMiner)> = site
        .miners()
        .iter()
        .filter(|m| m.firmware == Firmware::Stock)
        .map(|m| (m.worker.clone(), m.emulator.miner().clone()))
        .collect();
    tokio::spawn(async move {
        while !stop.is_cancelled() {
            for (w, m) in &stock {
                let path = format!("/api/v1/workers?q={w}");
                let Ok(r) =
                    client::request(api, "GET", &path, Some(TOKEN), None, Duration::from_secs(2))
                        .await
                else {
                    continue;
                };
                let Ok(v) = r.json() else { continue };
                let parked = v["workers"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|x| x["name"] == w.as_str() && x["state"] == "parked");
                let idle = m.sample().hashrate_ths <= 0.0;
                if parked && !idle {
                    m.sleep();
                } else if !parked && idle {
                    m.wake();
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
}

/// Publish a dispatch and wait for its ack; returns it.
async fn dispatch(broker: &Mosquitto, rec: &Recorder, id: &str, payload: Value) -> Value {
    let mut p = payload;
    p["id"] = json!(id);
    broker.publish(DISPATCH, &p.to_string());
    assert!(
        wait_until(Duration::from_secs(5), || rec.ack(ACK, id).is_some()).await,
        "no ack for {id}; acks so far: {:?}",
        rec.on(ACK).iter().map(|s| &s.json).collect::<Vec<_>>()
    );
    rec.ack(ACK, id).expect("ack")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_with_site_follows_mqtt_dispatch_and_keeps_a_ledger() {
    let _gate = gridproxy_tests::module_gate(module_path!());
    let bin = gridproxy_bin();
    tokio::time::timeout(Duration::from_secs(120), run(bin, None))
        .await
        .expect("test finished in time");
}

/// The same run with the ledger in PostgreSQL (issue 19): `ledger =
/// "postgres://…"`, the password from `GRIDPROXY_LEDGER_PASSWORD`, and
/// `gridproxy report` reading it back; counts checked with psql.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_with_site_keeps_its_ledger_in_postgres() {
    let _gate = gridproxy_tests::module_gate(module_path!());
    let bin = gridproxy_bin();
    let pg = tokio::task::spawn_blocking(|| PgCluster::start("operate-site", "site_ledger"))
        .await
        .expect("postgres");
    tokio::time::timeout(Duration::from_secs(120), run(bin, Some(&pg)))
        .await
        .expect("test finished in time");
}

async fn run(bin: PathBuf, pg: Option<&PgCluster>) {
    let t0 = Instant::now();
    let broker = Mosquitto::start("operate-site").await;
    let rec = Recorder::start(broker.port, "operate-site-recorder", &[ACK, STATUS]);
    let pools_stop = CancellationToken::new();
    let _pools_guard = pools_stop.clone().drop_guard();
    let pool = site_pool(&pools_stop).await;
    let sv1 = free_addr();
    let api = free_addr();
    let site = Site::start(SiteConfig {
        counts: vec![
            (Firmware::LuxOs, 2),
            (Firmware::BraiinsOs, 2),
            (Firmware::Whatsminer, 2),
            (Firmware::Vnish, 2),
            (Firmware::Stock, 2),
        ],
        time_scale: TIME_SCALE,
        subnet: (76, 0),
        password: "site-secret-pw".into(),
        worker_prefix: "opsite".into(),
        pool: Some(sv1),
        sv1_hashrate: 200.0,
        follow_every: Duration::from_millis(100),
        ..SiteConfig::default()
    })
    .await
    .expect("emulators start");
    let n = site.len();
    let nominal_kw = site.nominal_w() / 1000.0;

    let dir = temp_dir("operate-site");
    let cfg_path = dir.join("gridproxy.toml");
    let mut text = config_text(pool.addr(), sv1, api, &site, broker.port);
    let (ledger, password) = match pg {
        Some(pg) => {
            text = text.replace(
                "ledger = \"ledger.sqlite\"",
                &format!("ledger = \"{}\"", pg.url()),
            );
            let loc = Location::parse(&pg.url())
                .unwrap()
                .with_password(Some(pg.password.clone()));
            (loc, pg.password.clone())
        }
        None => (Location::Sqlite(dir.join("ledger.sqlite")), String::new()),
    };
    assert!(
        pg.is_none() || text.contains("ledger = \"postgres://"),
        "the config's ledger line moved"
    );
    std::fs::write(&cfg_path, text).unwrap();

    // `check-config` accepts it and counts the miners.
    let out = Command::new(&bin)
        .arg("check-config")
        .arg(&cfg_path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("site with 10 miners"),
        "check-config: {text} {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let mut cmd = Command::new(&bin);
    cmd.args(["run", "--status-every", "0", "--config"])
        .arg(&cfg_path)
        .env("OPERATE_SITE_MQTT_PASSWORD", PASSWORD)
        .env("GRIDPROXY_LEDGER_PASSWORD", &password)
        .env("RUST_LOG", "info");
    let mut proxy = PeerProcess::spawn("gridproxy", PeerProcess::make_dir("operate-site"), cmd);
    assert!(
        proxy
            .wait_for_log("MQTT dispatch: broker 127.0.0.1", Duration::from_secs(20))
            .await,
        "gridproxy did not start the site:\n{}",
        proxy.log()
    );
    let log = proxy.log();
    assert!(
        log.contains("curtailment engine: 10 miners")
            && log.contains(&ledger.to_string())
            && (password.is_empty() || !log.contains(&password)),
        "start-up lines: {log}"
    );
    mirror_parking(api, &site, pools_stop.clone());

    // Online: the client publishes its status, and every miner hashes
    // through the proxy.
    assert!(
        wait_until(Duration::from_secs(15), || rec
            .on(STATUS)
            .iter()
            .any(|s| s.json["online"] == true))
        .await,
        "no online status on {STATUS}:\n{}",
        proxy.log_tail(3000)
    );
    assert!(
        wait_until(Duration::from_secs(15), || site.sv1_running() == n).await,
        "SV1 miners running: {}/{n}",
        site.sv1_running()
    );
    let fleet = api_get(api, "/api/v1/fleet").await;
    assert_eq!(fleet["site"]["attached"], true, "{fleet}");
    assert_eq!(fleet["site"]["miners_total"], n, "{fleet}");
    // Wait for the workers to be known (parking is by worker name).
    let known = Instant::now();
    loop {
        let v = api_get(api, "/api/v1/fleet").await;
        if v["workers_known"].as_u64().unwrap_or(0) >= n as u64 {
            break;
        }
        assert!(
            known.elapsed() < Duration::from_secs(15),
            "workers not all known to the proxy: {v}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // --- 0 %: every commandable miner sleeps, stock ones are parked ---
    let t_zero = Instant::now();
    let ack = dispatch(&broker, &rec, "d-zero", json!({"target_pct": 0})).await;
    assert_eq!(ack["accepted"], true, "{ack}");
    assert_eq!(ack["target_kw"], 0.0, "{ack}");
    let commandable: Vec<_> = site
        .miners()
        .iter()
        .filter(|m| m.firmware != Firmware::Stock)
        .collect();
    assert!(
        wait_until(Duration::from_secs(15), || commandable
            .iter()
            .all(|m| asleep(m)))
        .await,
        "not every commandable miner asleep: {:?}\n{}",
        commandable
            .iter()
            .map(|m| (m.index, m.power_w()))
            .collect::<Vec<_>>(),
        proxy.log_tail(3000)
    );
    let zero_secs = t_zero.elapsed().as_secs_f64();
    let stock: Vec<_> = site
        .miners()
        .iter()
        .filter(|m| m.firmware == Firmware::Stock)
        .collect();
    assert!(
        wait_until(Duration::from_secs(10), || stock
            .iter()
            .all(|m| m.power_w() <= m.config.sleep_w + 1.0))
        .await,
        "stock miners not parked (their emulators idle once parked)"
    );
    let standby_kw: f64 = site.miners().iter().map(|m| m.config.sleep_w).sum::<f64>() / 1000.0;
    let kw_zero = site.power_w() / 1000.0;
    assert!(
        kw_zero <= standby_kw + 0.01,
        "site {kw_zero:.2} kW at 0 %, standby {standby_kw:.2} kW"
    );

    // --- a kW target: met from below, some miners running ---
    let target = (nominal_kw * 0.45).round();
    let t_target = Instant::now();
    let ack = dispatch(&broker, &rec, "d-kw", json!({"target_kw": target})).await;
    assert_eq!(ack["accepted"], true, "{ack}");
    let running = || {
        site.miners()
            .iter()
            .filter(|m| (m.power_w() - m.config.nominal_w).abs() < 1.0)
            .count()
    };
    assert!(
        wait_until(Duration::from_secs(20), || {
            let kw = site.power_w() / 1000.0;
            running() >= 2 && kw <= target && kw >= target * 0.6
        })
        .await,
        "target {target} kW not reached: site {:.2} kW, {} miners at nominal\n{}",
        site.power_w() / 1000.0,
        running(),
        proxy.log_tail(3000)
    );
    let target_secs = t_target.elapsed().as_secs_f64();
    // It holds: no overshoot over the next second and a half.
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let kw = site.power_w() / 1000.0;
        assert!(
            kw <= target + 0.01,
            "site {kw:.2} kW over the {target} kW target"
        );
    }
    let kw_target = site.power_w() / 1000.0;
    let fleet = api_get(api, "/api/v1/fleet").await;
    assert_eq!(fleet["site"]["mode"], "dispatch", "{fleet}");
    let cap_kw = fleet["site"]["target_kw"].as_f64().unwrap_or(-1.0);
    assert!((cap_kw - target).abs() <= target * 0.01, "{fleet}");

    // --- the REST control surface drives the same engine ---
    let cap = (target * 0.5).round();
    let body = json!({"action": "cap_kw", "kw": cap});
    let r = client::request(
        api,
        "POST",
        "/api/v1/curtail",
        Some(TOKEN),
        Some(&body),
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        wait_until(Duration::from_secs(15), || site.power_w() / 1000.0 <= cap).await,
        "operator cap {cap} kW not met: {:.2} kW",
        site.power_w() / 1000.0
    );

    // --- a reload that changes [site] is refused whole, with the reason ---
    let text = std::fs::read_to_string(&cfg_path).unwrap();
    std::fs::write(
        &cfg_path,
        text.replace("min_on_secs = 1\n", "min_on_secs = 2\n"),
    )
    .unwrap();
    let r = client::request(
        api,
        "POST",
        "/api/v1/reload",
        Some(TOKEN),
        None,
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 409, "{}", r.text());
    assert!(r.text().contains("[site]"), "{}", r.text());
    std::fs::write(&cfg_path, text).unwrap();

    // --- stop cleanly; the ledger has it all ---
    let pid = proxy.pid().to_string();
    assert!(Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .unwrap()
        .success());
    assert!(
        wait_until(Duration::from_secs(15), || !proxy.is_running()).await,
        "gridproxy did not exit on SIGINT"
    );
    assert!(
        proxy.log().contains("stopping the curtailment engine"),
        "{}",
        proxy.log_tail(2000)
    );
    let audit = Audit::read(&ledger).expect("ledger readable");
    let sleeps = audit
        .commands
        .iter()
        .filter(|c| c.action == Action::Sleep)
        .count();
    let parks: Vec<_> = audit
        .commands
        .iter()
        .filter(|c| c.action == Action::Park)
        .map(|c| c.miner)
        .collect();
    let wakes = audit
        .commands
        .iter()
        .filter(|c| c.action == Action::Wake)
        .count();
    assert!(sleeps >= commandable.len(), "{sleeps} sleep commands");
    assert!(wakes >= 1, "no wake commands for the kW target");
    for m in &stock {
        let id = miner_id(&format!("m{}", m.index));
        assert!(parks.contains(&id), "stock miner m{} never parked", m.index);
    }
    let ok = audit.acks.iter().filter(|a| a.outcome == "ack_ok").count();
    assert!(
        ok >= sleeps + parks.len(),
        "{ok} ok acks for {sleeps} sleeps and {} parks",
        parks.len()
    );
    assert!(audit.signals >= 3, "{} signals recorded", audit.signals);
    assert!(!audit.intervals.is_empty(), "no measured intervals");

    if let Some(pg) = pg {
        // A hand count, not through our reader.
        let count = |t: &str| {
            pg.psql(&pg.db, &format!("SELECT count(*) FROM {t}"))
                .unwrap()
                .parse::<usize>()
                .unwrap()
        };
        assert_eq!(count("commands"), audit.commands.len());
        assert_eq!(count("acks"), audit.acks.len());
        assert_eq!(count("signals"), audit.signals);
        assert!(
            !proxy.log().contains(&password),
            "the ledger password reached the log"
        );
    }

    // `gridproxy report --ledger` summarises the same ledger.
    let out = Command::new(&bin)
        .args(["report", "--ledger"])
        .arg(ledger.to_string())
        .env("GRIDPROXY_LEDGER_PASSWORD", &password)
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "report failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        report.contains(&format!("commands: {}", audit.commands.len()))
            && report.contains("sleep")
            && report.contains("park"),
        "report: {report}"
    );
    // Times are RFC 3339 UTC, not epoch seconds.
    let period = report
        .lines()
        .find(|l| l.starts_with("period: "))
        .unwrap_or_else(|| panic!("no period line: {report}"));
    let first = period["period: ".len()..].split(' ').next().unwrap_or("");
    assert!(
        first.len() == 24 && first.ends_with('Z') && first.as_bytes()[10] == b'T',
        "not RFC 3339: {period}"
    );

    println!(
        "operate_site: {n} miners, {nominal_kw:.1} kW nameplate; 0 % -> all asleep/parked in {zero_secs:.2} s \
         ({kw_zero:.2} kW); {target} kW target met in {target_secs:.2} s ({kw_target:.2} kW); \
         ledger: {} commands ({sleeps} sleep, {} park, {wakes} wake), {ok} ok acks, {} signals, {} intervals; \
         {:.1} s in all",
        audit.commands.len(),
        parks.len(),
        audit.signals,
        audit.intervals.len(),
        t0.elapsed().as_secs_f64()
    );
    drop(site);
}

#[test]
fn a_bad_site_key_is_refused_with_key_and_line() {
    let _gate = gridproxy_tests::module_gate(module_path!());
    let bin = gridproxy_bin();
    let dir = temp_dir("operate-site-bad");
    let path = dir.join("bad.toml");
    let text = "[[pools]]\nname = \"p\"\naddress = \"127.0.0.1:3334\"\nprotocol = \"sv1\"\nuser = \"u\"\n\n\
                [site]\nledger = \"l.sqlite\"\nmin_onn_secs = 30\n\n\
                [[site.miners]]\nname = \"a\"\nfirmware = \"luxos\"\naddress = \"127.0.0.1:4028\"\nths = 100.0\nwatts = 3000.0\n";
    std::fs::write(&path, text).unwrap();
    for args in [vec!["check-config"], vec!["run", "--config"]] {
        let out = Command::new(&bin).args(&args).arg(&path).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(
            err.contains("min_onn_secs") && err.contains("line 9"),
            "{args:?}: {err}"
        );
    }
    // A semantic error: a Braiins miner without its password.
    let text = text
        .replace("min_onn_secs = 30\n", "")
        .replace("\"luxos\"", "\"braiins\"");
    std::fs::write(&path, &text).unwrap();
    let out = Command::new(&bin)
        .args(["run", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("site.miners[0].password") && err.contains("(line 10)"),
        "{err}"
    );
    assert!(
        !dir.join("l.sqlite").exists(),
        "a refused config created the ledger"
    );
}

#[test]
fn the_site_example_is_valid() {
    let _gate = gridproxy_tests::module_gate(module_path!());
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/site.toml");
    let text = std::fs::read_to_string(path).expect("examples/site.toml");
    let cfg = gridproxy::Config::parse(&text, "examples/site.toml").expect("valid example");
    let site = cfg.site.expect("[site]");
    assert_eq!(site.miners.len(), 6);
    let s = &site.signals;
    assert!(s.mqtt.is_some() && s.openadr.is_some() && s.price.is_some());
    // Every key of the example is on: price mode and the dispatch fail-safe.
    let p = site.policy();
    assert!(p.economics.is_some() && p.staleness.dispatch.is_some());
}
