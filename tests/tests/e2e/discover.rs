//! `gridproxy discover` over loopback, the real binary against firmware
//! emulators each bound to its own `127.0.X.N` on its standard ports
//! (cgminer API 4028, web 80, Braiins OS gRPC 50051; we run as root, so
//! port 80 binds).
//!
//! The fleet (one /27): LuxOS, Braiins OS, Whatsminer, VNish, stock
//! cgminer and stock Antminer (cgminer API + web interface) emulators, a
//! plain HTTP server that is no miner, and empty addresses. Every miner has
//! its own nominal TH/s and watts, so a figure read from the wrong host
//! shows.
//!
//! Checked: every emulator is found with its firmware, and model, TH/s and
//! watts exactly where its firmware reports them (LuxOS `profiles`, Braiins
//! OS sticker hashrate, the cgminer `version` type, VNish `/api/v1/info`),
//! `0` with a TODO elsewhere; nothing is found at the empty addresses or the
//! HTTP server; the file as written is refused by `check-config` (TODOs),
//! and accepted once the operator fills them in; the run time is printed.
//! The second test drives a demand-response event on a fleet loaded from a
//! discovered file, as `curtail_dr` does, and meets its target.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use gridproxy::config::Config;
use gridproxy::site::config::FirmwareKind;
use gridproxy::site::miner_id;
use gridproxy_curtail as curtail;
use gridproxy_fixtures::firmware::model::ModelConfig;
use gridproxy_fixtures::firmware::{braiins, luxos, stock, vnish, whatsminer, EmulatorHandle};
use gridproxy_tests::bench::{temp_dir, ScaledClock, SPEED};
use gridproxy_tests::wait_until;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use curtail::actuators::{FleetActuator, MinerEndpoint};
use curtail::driver::{self, DriverConfig, Edge, Nothing, Route};
use curtail::fleet::ControlSurface;
use curtail::policy::{PolicyConfig, Staleness};
use curtail::signal::{DrEvent, DrTarget, Signal};
use curtail::time::Clock;

use crate::operate_site::gridproxy_bin;

const LIMIT: Duration = Duration::from_secs(240);
const BOS_PW: &str = "bos-secret-1";
const WM_PW: &str = "wm-secret-2";
const VN_PW: &str = "vn-secret-3";
const AM_PW: &str = "am-secret-4";
/// The model the LuxOS, VNish and stock emulators report.
const MODEL: &str = "Antminer S19j Pro";

/// What sits at one address of the /27.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Host {
    Miner(FirmwareKind),
    /// A plain web server on port 80: not a miner.
    Web,
    Empty,
}

fn plan(n: u8) -> Host {
    use FirmwareKind::*;
    match n {
        2..=5 | 29 => Host::Miner(Luxos),
        6..=9 | 30 => Host::Miner(Braiins),
        10..=13 => Host::Miner(Whatsminer),
        14..=17 | 31 => Host::Miner(Vnish),
        18..=21 => Host::Miner(Stock),
        22..=26 => Host::Miner(Antminer),
        27 => Host::Web,
        _ => Host::Empty,
    }
}

/// Nominal figures of the miner at `.n`: distinct per address.
fn model_config(n: u8) -> ModelConfig {
    let mut c = ModelConfig::s19j_pro().with_time_scale(1.0 / SPEED);
    c.nominal_ths = 80.0 + f64::from(n);
    c.nominal_w = 2900.0 + 10.0 * f64::from(n);
    c.min_power_w = 0.6 * c.nominal_w;
    c
}

struct Fleet {
    net: u8,
    emulators: Vec<(u8, EmulatorHandle)>,
    _web: Vec<stock::StockWeb>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Fleet {
    fn ip(&self, n: u8) -> Ipv4Addr {
        Ipv4Addr::new(127, 0, self.net, n)
    }

    fn kw(&self) -> f64 {
        self.emulators
            .iter()
            .map(|(_, e)| e.state().power_w)
            .sum::<f64>()
            / 1000.0
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// A web server that answers every request with a plain page.
async fn plain_web(addr: SocketAddr) -> tokio::task::JoinHandle<()> {
    let l = tokio::net::TcpListener::bind(addr).await.expect("bind web");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 2048];
                let _ = s.read(&mut buf).await;
                let body = "<html><body><h1>It works!</h1></body></html>";
                let r = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(r.as_bytes()).await;
            });
        }
    })
}

/// Start the fleet of [`plan`] on `127.0.net.0/27`.
async fn start_fleet(net: u8) -> Fleet {
    let mut f = Fleet {
        net,
        emulators: Vec::new(),
        _web: Vec::new(),
        tasks: Vec::new(),
    };
    for n in 0..32u8 {
        let ip = IpAddr::V4(f.ip(n));
        let at = |port| SocketAddr::new(ip, port);
        let cfg = model_config(n);
        let e = match plan(n) {
            Host::Empty => continue,
            Host::Web => {
                f.tasks.push(plain_web(at(80)).await);
                continue;
            }
            Host::Miner(FirmwareKind::Luxos) => luxos::spawn(at(4028), cfg).await,
            Host::Miner(FirmwareKind::Braiins) => braiins::spawn(at(50051), cfg, BOS_PW).await,
            Host::Miner(FirmwareKind::Whatsminer) => whatsminer::spawn(at(4028), cfg, WM_PW).await,
            Host::Miner(FirmwareKind::Vnish) => vnish::spawn(at(80), cfg, VN_PW).await,
            Host::Miner(FirmwareKind::Stock) => stock::spawn(at(4028), cfg).await,
            Host::Miner(FirmwareKind::Antminer) => {
                stock::spawn_with_web(at(4028), at(80), cfg, "root", AM_PW)
                    .await
                    .map(|(e, w)| {
                        f._web.push(w);
                        e
                    })
            }
        };
        f.emulators
            .push((n, e.unwrap_or_else(|e| panic!("emulator on {ip}: {e}"))));
    }
    f
}

/// Run `gridproxy discover 127.0.net.0/27 --out <file>`; returns the file's
/// text and the run time the binary printed.
fn discover(net: u8, out: &Path) -> (String, String) {
    let started = Instant::now();
    let o = Command::new(gridproxy_bin())
        .args(["discover", &format!("127.0.{net}.0/27"), "--out"])
        .arg(out)
        .args(["--braiins-password-env", "DISCOVER_TEST_BOS_PW"])
        .env("DISCOVER_TEST_BOS_PW", BOS_PW)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run gridproxy discover");
    let wall = started.elapsed();
    let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "discover failed: {stderr}");
    // Not a terminal: periodic progress lines, then the closing one.
    let last = stderr
        .lines()
        .find(|l| l.starts_with("discover: 32/32 hosts probed"))
        .unwrap_or_else(|| panic!("no closing progress line: {stderr}"))
        .to_owned();
    println!("{stderr}");
    println!("discover over 32 addresses: {last} (process wall time {wall:.2?})");
    (std::fs::read_to_string(out).expect("output file"), last)
}

/// The `key = value` lines of each `[[site.miners]]` entry, by address,
/// value without its comment.
fn entries(text: &str) -> HashMap<String, HashMap<String, String>> {
    let mut out = HashMap::new();
    for block in text.split("[[site.miners]]").skip(1) {
        let kv: HashMap<String, String> = block
            .lines()
            .filter(|l| !l.trim_start().starts_with('#'))
            .filter_map(|l| {
                let (k, v) = l.split_once(" = ")?;
                let v = v.split("  #").next().unwrap_or(v).trim();
                Some((k.trim().to_owned(), v.trim_matches('"').to_owned()))
            })
            .collect();
        out.insert(kv["address"].clone(), kv);
    }
    out
}

fn site_file(dir: &Path, miners: &str) -> PathBuf {
    let p = dir.join(format!("site-{}.toml", rand_suffix()));
    let text = format!(
        "[[pools]]\nname = \"p\"\naddress = \"stratum+tcp://127.0.0.1:3333\"\nuser = \"u\"\n\n\
         [site]\nledger = \"ledger.sqlite\"\n\n{miners}"
    );
    std::fs::write(&p, text).expect("write site config");
    p
}

fn rand_suffix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

fn check_config(path: &Path) -> (bool, String) {
    let o = Command::new(gridproxy_bin())
        .arg("check-config")
        .arg(path)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run check-config");
    (
        o.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
    )
}

/// The operator's edit: every TODO filled with the miner's real figures.
fn fill_todos(text: &str, fleet_net: u8) -> String {
    let mut out = String::new();
    let mut n = 0u8;
    for line in text.lines() {
        if let Some(a) = line.strip_prefix("address = \"") {
            let ip: Ipv4Addr = a.split(':').next().unwrap().parse().unwrap();
            assert_eq!(ip.octets()[2], fleet_net);
            n = ip.octets()[3];
        }
        let c = model_config(n);
        let filled = if line.starts_with("ths = 0.0  # TODO") {
            format!("ths = {:.1}", c.nominal_ths)
        } else if line.starts_with("watts = 0.0  # TODO") {
            format!("watts = {:.1}", c.nominal_w)
        } else if line.starts_with("worker = \"\"  # TODO") {
            format!("worker = \"site.stock{n}\"")
        } else {
            line.to_owned()
        };
        out.push_str(&filled);
        out.push('\n');
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discover_finds_and_identifies_every_firmware_on_a_27() {
    let _gate = gridproxy_tests::module_gate(module_path!());
    gridproxy_tests::serially(LIMIT, async {
        let net = 0;
        let fleet = start_fleet(net).await;
        let dir = temp_dir("discover");
        let out = dir.join("miners.toml");
        let (text, _) = tokio::task::spawn_blocking({
            let out = out.clone();
            move || discover(net, &out)
        })
        .await
        .unwrap();
        println!("{text}");
        let found = entries(&text);
        for n in 0..32u8 {
            let ip = fleet.ip(n);
            let port = match plan(n) {
                Host::Miner(FirmwareKind::Braiins) => 50051,
                Host::Miner(FirmwareKind::Vnish) => 80,
                _ => 4028,
            };
            let key = format!("{ip}:{port}");
            let kind = match plan(n) {
                Host::Miner(k) => k,
                other => {
                    assert!(
                        !found.keys().any(|a| a.starts_with(&format!("{ip}:"))),
                        "{ip} ({other:?}) was reported as a miner"
                    );
                    continue;
                }
            };
            let e = found
                .get(&key)
                .unwrap_or_else(|| panic!("{ip}: {kind:?} not found at {key}"));
            assert_eq!(e["firmware"], kind.as_str(), "{ip}");
            let c = model_config(n);
            let (model, ths, watts) = match kind {
                FirmwareKind::Luxos => (Some(MODEL), Some(c.nominal_ths), Some(c.nominal_w)),
                FirmwareKind::Braiins => (None, Some(c.nominal_ths), None),
                FirmwareKind::Vnish | FirmwareKind::Stock | FirmwareKind::Antminer => {
                    (Some(MODEL), None, None)
                }
                FirmwareKind::Whatsminer => (None, None, None),
            };
            assert_eq!(e.get("model").map(String::as_str), model, "{ip} model");
            let num = |k: &str| e[k].parse::<f64>().unwrap_or_else(|_| panic!("{ip} {k}"));
            assert_eq!(num("ths"), ths.unwrap_or(0.0), "{ip} ths");
            assert_eq!(num("watts"), watts.map_or(0.0, f64::round), "{ip} watts");
            // Passwords never written; the firmwares that need one name a variable.
            assert!(!e.contains_key("password"), "{ip}");
            assert_eq!(
                e.contains_key("password_env"),
                !matches!(kind, FirmwareKind::Luxos | FirmwareKind::Stock),
                "{ip}"
            );
        }
        assert_eq!(found.len(), fleet.emulators.len());
        for pw in [BOS_PW, WM_PW, VN_PW, AM_PW] {
            assert!(!text.contains(pw), "a password was written");
        }

        // As written, the TODOs keep it from loading; filled in, it loads.
        let (ok, msg) = check_config(&site_file(&dir, &text));
        assert!(!ok && msg.contains("site.miners["), "{msg}");
        let filled = fill_todos(&text, net);
        let path = site_file(&dir, &filled);
        let (ok, msg) = check_config(&path);
        assert!(ok, "{msg}\n{filled}");
        assert!(
            msg.contains(&format!("site with {} miners", fleet.emulators.len())),
            "{msg}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    })
    .await;
}

fn policy() -> PolicyConfig {
    PolicyConfig {
        max_commands_per_sec: 50,
        restore_batch: 20,
        restore_interval: Duration::from_secs(10),
        min_on: Duration::from_secs(30),
        min_off: Duration::from_secs(30),
        ack_timeout: Duration::from_secs(20),
        verify_grace: Duration::from_secs(20),
        retry_backoff: Duration::from_secs(10),
        dr_lead_margin: Duration::from_secs(55),
        staleness: Staleness::NONE,
        ..PolicyConfig::default()
    }
}

fn surface(f: FirmwareKind) -> ControlSurface {
    match f {
        FirmwareKind::Luxos => ControlSurface::LuxOs,
        FirmwareKind::Braiins => ControlSurface::BraiinsOs,
        FirmwareKind::Whatsminer => ControlSurface::Whatsminer,
        FirmwareKind::Vnish => ControlSurface::Vnish,
        FirmwareKind::Stock => ControlSurface::None,
        FirmwareKind::Antminer => ControlSurface::AntminerStock,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dr_event_on_a_discovered_fleet_meets_its_target() {
    let _gate = gridproxy_tests::module_gate(module_path!());
    gridproxy_tests::serially(LIMIT, async {
        gridproxy_tests::init_tracing();
        let net = 2;
        let fleet = start_fleet(net).await;
        let dir = temp_dir("discover-dr");
        let out = dir.join("miners.toml");
        let (text, _) = tokio::task::spawn_blocking({
            let out = out.clone();
            move || discover(net, &out)
        })
        .await
        .unwrap();
        // The operator fills the TODOs and loads the file with the real loader.
        let path = site_file(&dir, &fill_todos(&text, net));
        let cfg = Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
        let site = cfg.site.expect("[site]");
        assert_eq!(site.miners.len(), fleet.emulators.len());

        // Firmware clients from the entries, passwords from their variables
        // (set here as the operator would export them).
        let password = |var: &str| match var {
            "GRIDPROXY_BRAIINS_PASSWORD" => BOS_PW,
            "GRIDPROXY_WHATSMINER_PASSWORD" => WM_PW,
            "GRIDPROXY_VNISH_PASSWORD" => VN_PW,
            "GRIDPROXY_ANTMINER_PASSWORD" => AM_PW,
            v => panic!("unexpected password_env {v}"),
        };
        let mut fw = FleetActuator::new(Duration::from_millis(1000));
        for m in &site.miners {
            let addr: SocketAddr = m.address.parse().expect("ip:port");
            let pw = m.password_env.as_deref().map(password).unwrap_or("");
            let mut ep = MinerEndpoint::new(surface(m.firmware), addr).with_credentials("root", pw);
            if m.firmware == FirmwareKind::Antminer {
                ep = ep.with_web(SocketAddr::new(addr.ip(), 80).into());
            }
            fw.insert(miner_id(&m.name), &ep);
        }
        let fw = Arc::new(fw);
        let fleet_model = site.fleet().expect("fleet from the discovered file");
        let clock = ScaledClock::new(SPEED);
        let ledger = dir.join("ledger.sqlite");
        let h = driver::spawn(
            &ledger,
            policy(),
            fleet_model,
            Edge {
                actuator: Route {
                    firmware: fw.clone(),
                    proxy: Nothing,
                },
                telemetry: fw,
                clock,
            },
            DriverConfig {
                poll_interval: Duration::from_secs(5),
                poll_concurrency: 64,
                interval: Duration::from_secs(10),
                ..DriverConfig::default()
            },
        )
        .await
        .expect("driver starts");
        assert!(
            h.wait_for(Duration::from_secs(20), |s| s.measured_kw.is_some())
                .await
                .is_some(),
            "first telemetry round"
        );

        // "At most 40 % of the site's kW within 60 s", held 60 s (site time).
        let base_kw = fleet.kw();
        let target_kw = 0.4 * base_kw;
        let band_kw = 0.02 * target_kw;
        let t0 = clock.now();
        let start = t0 + Duration::from_secs(60);
        let end = start + Duration::from_secs(60);
        h.send(Signal::DrEvent(DrEvent {
            id: "discovered-1".into(),
            target: DrTarget::LimitKw(target_kw),
            start,
            end: Some(end),
            issued_at: t0,
        }))
        .await
        .unwrap();
        let mut samples = Vec::new();
        while clock.now() < end {
            samples.push((clock.now(), fleet.kw()));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let in_event: Vec<f64> = samples
            .iter()
            .filter(|(t, _)| *t >= start)
            .map(|(_, k)| *k)
            .collect();
        let (lo, hi) = in_event
            .iter()
            .fold((f64::MAX, f64::MIN), |(a, b), &k| (a.min(k), b.max(k)));
        let status = h.status();
        println!(
            "discovered fleet of {}: site {base_kw:.1} kW, target {target_kw:.1} ±{band_kw:.1} kW, \
             {lo:.1}..{hi:.1} kW during the event; {} commands, {} escalations",
            site.miners.len(),
            status.issued,
            status.escalated
        );
        assert!(!in_event.is_empty());
        assert!(
            lo >= target_kw - band_kw && hi <= target_kw + band_kw,
            "site kW left ±2 % of {target_kw:.1} during the event: {lo:.1}..{hi:.1}; samples {:?}",
            samples
                .iter()
                .map(|(t, k)| (t.saturating_since(t0).as_secs(), (*k * 10.0).round() / 10.0))
                .collect::<Vec<_>>()
        );
        // Restored after the event.
        assert!(
            wait_until(Duration::from_secs(60), || fleet.kw() > 0.98 * base_kw).await,
            "restore: {:.1} of {base_kw:.1} kW",
            fleet.kw()
        );
        let report = h.shutdown().await.expect("driver stops cleanly");
        assert_eq!(report.unanswered, 0);
        assert_eq!(report.status.failed, 0, "{:?}", report.status);
        let _ = std::fs::remove_dir_all(&dir);
    })
    .await;
}
