//! Transport security of the grid links, against real peers, with a CA
//! made per test (`gridproxy_tests::tls`, rcgen).
//!
//! - MQTT over TLS: Eclipse Mosquitto (Debian package) with two TLS
//!   listeners (one certificate for `localhost`/127.0.0.1 signed by our CA,
//!   one signed by it for another name). gridproxy's MQTT client trusting
//!   another CA, the built-in public roots, or connecting where the name
//!   does not match gets a clear TLS error, logged at error level, keeps
//!   retrying, reports not connected and applies no dispatch (one published
//!   over TLS meanwhile changes nothing). With our CA it connects and a
//!   dispatch published over TLS by `mosquitto_pub --cafile` puts the fleet
//!   to sleep. A third listener requires a client certificate: refused
//!   without one, connected with one signed by our CA.
//! - OpenADR over https and wss: the openleadr-rs VTN serves plain HTTP, so
//!   a TLS forwarder with our certificate stands in front of it. The VEN,
//!   given `https://localhost:PORT` and the CA file, logs in, opens the
//!   websocket notifier through the same TLS front (`wss://`), receives the
//!   utility's capacity-limit event by notification and the site meets it.
//!   Without the CA (public roots) or with another CA it fails with a clear
//!   TLS error, stays disconnected and sends no signal.

use std::time::{Duration, Instant};

use crate::mqtt_support::*;
use crate::vtn_support::*;
use gridproxy_curtail as curtail;
use gridproxy_fixtures::site::Site;
use gridproxy_grid::mqtt::{self, MqttConfig, SiteStatus};
use gridproxy_grid::openadr::{spawn_ven, VenConfig};
use gridproxy_grid::tls::TlsOptions;
use gridproxy_tests::bench::*;
use gridproxy_tests::tls::{TestCa, TlsForwarder};
use gridproxy_tests::{free_port, wait_until, LogCapture};
use tokio::sync::watch;

use curtail::driver::{DriverConfig, Nothing};
use curtail::policy::{Mode, PolicyConfig, Staleness};

const TEST_LIMIT: Duration = Duration::from_secs(180);
const DISPATCH: &str = "site/tls/dispatch";
const ACK: &str = "site/tls/ack";

fn temp(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("gridproxy-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("temp dir");
    d
}

fn mqtt_config(port: u16, tls: TlsOptions, client_id: &str) -> MqttConfig {
    MqttConfig {
        host: "127.0.0.1".into(),
        port,
        client_id: client_id.into(),
        username: Some(USER.into()),
        password: Some(PASSWORD.into()),
        tls: Some(tls),
        keepalive: Duration::from_secs(5),
        status_interval: Duration::from_millis(500),
        backoff_min: Duration::from_millis(100),
        backoff_max: Duration::from_millis(500),
        ..MqttConfig::for_site("tls")
    }
}

fn policy() -> PolicyConfig {
    PolicyConfig {
        max_commands_per_sec: 50,
        restore_batch: 20,
        min_on: Duration::from_secs(20),
        min_off: Duration::from_secs(20),
        ack_timeout: Duration::from_secs(20),
        verify_grace: Duration::from_secs(20),
        staleness: Staleness::NONE,
        ..PolicyConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_over_tls_with_a_private_ca() {
    let _gate = gridproxy_tests::module_gate(module_path!());
    serially(TEST_LIMIT, mqtt_run()).await;
}

async fn mqtt_run() {
    let logs = LogCapture::start();
    let dir = temp("grid-tls-mqtt");
    let ca = TestCa::new(&dir, "site");
    let other = TestCa::new(&dir, "other");
    let good = TlsListener {
        port: free_port(),
        cert: ca.server_cert("broker", &["localhost", "127.0.0.1"]),
        client_ca: None,
    };
    let misnamed = TlsListener {
        port: free_port(),
        cert: ca.server_cert("misnamed", &["broker.other.example"]),
        client_ca: None,
    };
    // A listener that wants a client certificate from our CA.
    let mutual = TlsListener {
        client_ca: Some(ca.ca_file()),
        port: free_port(),
        ..good.clone()
    };
    let broker = Mosquitto::start_with_tls(
        "grid-tls",
        vec![good.clone(), misnamed.clone(), mutual.clone()],
    )
    .await;
    let rec = Recorder::start(broker.port, "tls-recorder", &[ACK]);

    // The listener speaks TLS only: plain MQTT to it fails; TLS with our CA
    // (checked against the name "localhost") works.
    let (ok, _) = broker.publish_tls("localhost", good.port, None, "probe", "x");
    assert!(!ok, "plain MQTT accepted on the TLS listener");
    let (ok, err) = broker.publish_tls("localhost", good.port, Some(&ca.ca_file()), "probe", "x");
    assert!(ok, "mosquitto_pub over TLS: {err}\n{}", broker.log());

    // --- the site and its driver ---
    let bench = SiteBench::new("mqtls", (76, 0)).mixed(3).start().await;
    let site = bench.site.clone();
    let nominal_kw = site.nominal_w() / 1000.0;
    let clock = ScaledClock::new(SPEED);
    let h = bench
        .start_driver(
            policy(),
            Nothing,
            clock,
            DriverConfig {
                poll_interval: Duration::from_secs(5),
                interval: Duration::from_secs(10),
                ..DriverConfig::default()
            },
        )
        .await;
    let (_status_tx, status_rx) = watch::channel(SiteStatus::default());
    assert!(site.miners().iter().all(at_nominal));
    let issued = h.status().issued;

    // --- TLS failures: clear, retried, not connected, nothing applied ---
    let failing = [
        (
            "another CA",
            mqtt_config(good.port, TlsOptions::with_ca(other.ca_file()), "bad-ca"),
            "not signed by a trusted CA",
        ),
        (
            "the public roots",
            mqtt_config(good.port, TlsOptions::default(), "no-ca"),
            "not signed by a trusted CA",
        ),
        (
            "a certificate for another name",
            mqtt_config(misnamed.port, TlsOptions::with_ca(ca.ca_file()), "misnamed"),
            "does not name the host",
        ),
    ];
    let mut bad = Vec::new();
    for (what, cfg, _) in &failing {
        let c = mqtt::spawn(
            cfg.clone(),
            nominal_kw,
            h.signals(),
            status_rx.clone(),
            clock,
        )
        .unwrap_or_else(|e| panic!("{what}: {e}"));
        bad.push(c);
    }
    for ((what, _, expect), c) in failing.iter().zip(&bad) {
        let s = c
            .wait_for(Duration::from_secs(10), |s| s.connection_errors >= 3)
            .await
            .unwrap_or_else(|| panic!("{what}: retried TLS errors: {:?}", c.state()));
        let err = s.last_error.clone().unwrap_or_default();
        println!("mqtt tls, {what}: {err} ({} attempts)", s.connection_errors);
        assert!(
            err.contains("TLS handshake with broker") && err.contains(expect),
            "{what}: {err}"
        );
        assert!(!s.connected && s.connects == 0, "{what}: {s:?}");
    }
    // Logged as errors, not warnings.
    let logged = logs
        .lines()
        .into_iter()
        .filter(|l| l.contains("ERROR") && l.contains("TLS handshake with broker"))
        .count();
    assert!(logged >= 3, "TLS failures logged at error level: {logged}");
    // A dispatch published over TLS reaches the broker but none of them.
    let (ok, err) = broker.publish_tls(
        "localhost",
        good.port,
        Some(&ca.ca_file()),
        DISPATCH,
        r#"{"id":"while-bad","target_pct":0}"#,
    );
    assert!(ok, "{err}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    for ((what, ..), c) in failing.iter().zip(&bad) {
        let s = c.state();
        assert!(
            !s.connected && s.accepted == 0 && s.connects == 0,
            "{what}: {s:?}"
        );
    }
    assert!(
        rec.ack(ACK, "while-bad").is_none(),
        "a failing client acked"
    );
    assert_eq!(h.status().issued, issued, "a dispatch reached the engine");
    assert_ne!(h.status().mode, Mode::Dispatch);
    assert!(site.miners().iter().all(at_nominal));

    // --- with our CA: connected, a dispatch over TLS is applied ---
    let client = mqtt::spawn(
        mqtt_config(
            good.port,
            TlsOptions::with_ca(ca.ca_file()),
            "gridproxy-tls",
        ),
        nominal_kw,
        h.signals(),
        status_rx.clone(),
        clock,
    )
    .expect("config valid");
    assert!(
        client
            .wait_for(Duration::from_secs(10), |s| s.connected)
            .await
            .is_some(),
        "client connects over TLS: {:?}\n{}",
        client.state(),
        broker.log()
    );
    // The subscription is in place once the broker logs it.
    assert!(
        wait_until(Duration::from_secs(5), || broker
            .log()
            .contains(&format!("gridproxy-tls 1 {DISPATCH}")))
        .await,
        "subscription in the broker log:\n{}",
        broker.log()
    );
    let t = Instant::now();
    let (ok, err) = broker.publish_tls(
        "localhost",
        good.port,
        Some(&ca.ca_file()),
        DISPATCH,
        r#"{"id":"tls-0","target_pct":0}"#,
    );
    assert!(ok, "{err}");
    assert!(
        wait_until(Duration::from_secs(5), || rec.ack(ACK, "tls-0").is_some()).await,
        "no ack for tls-0: {:?}",
        client.state()
    );
    let a = rec.ack(ACK, "tls-0").unwrap();
    assert_eq!(a["accepted"], true, "{a}");
    assert!(
        wait_until(Duration::from_secs(20), || site.miners().iter().all(asleep)).await,
        "fleet asleep after the TLS dispatch: {:.1} kW",
        site_kw(&site)
    );
    println!(
        "mqtt tls: dispatch 0 % over TLS acked and the {} miners asleep {:.2} s after \
         publishing ({:.2} kW); mode {}",
        site.len(),
        t.elapsed().as_secs_f64(),
        site_kw(&site),
        h.status().mode.as_str()
    );
    assert_eq!(h.status().mode, Mode::Dispatch);
    assert_eq!(client.state().accepted, 1);
    // The failing clients never got anywhere.
    for ((what, ..), c) in failing.iter().zip(&bad) {
        let s = c.state();
        assert!(!s.connected && s.connects == 0, "{what}: {s:?}");
    }

    // --- a broker that wants a client certificate ---
    let anonymous = mqtt::spawn(
        mqtt_config(mutual.port, TlsOptions::with_ca(ca.ca_file()), "no-cert"),
        nominal_kw,
        h.signals(),
        status_rx.clone(),
        clock,
    )
    .expect("config valid");
    let s = anonymous
        .wait_for(Duration::from_secs(10), |s| s.connection_errors >= 2)
        .await
        .unwrap_or_else(|| panic!("refused without a certificate: {:?}", anonymous.state()));
    println!("mqtt tls, no client certificate: {:?}", s.last_error);
    assert!(!s.connected && s.connects == 0, "{s:?}");
    assert!(
        s.last_error.as_deref().is_some_and(|e| e.contains("TLS")),
        "{s:?}"
    );
    anonymous.shutdown().await;
    let id = ca.client_cert("site-client", "gridproxy-site");
    let with_cert = mqtt::spawn(
        mqtt_config(
            mutual.port,
            TlsOptions {
                client_cert: Some(id.cert.clone()),
                client_key: Some(id.key.clone()),
                ..TlsOptions::with_ca(ca.ca_file())
            },
            "with-cert",
        ),
        nominal_kw,
        h.signals(),
        status_rx.clone(),
        clock,
    )
    .expect("config valid");
    assert!(
        with_cert
            .wait_for(Duration::from_secs(10), |s| s.connected)
            .await
            .is_some(),
        "client certificate accepted: {:?}\n{}",
        with_cert.state(),
        broker.log()
    );
    println!("mqtt tls: connected with a client certificate");
    with_cert.shutdown().await;

    for c in bad {
        c.shutdown().await;
    }
    client.shutdown().await;
    let _ = h.shutdown().await.expect("driver stops");
    site.stop();
    drop(broker);
    let _ = std::fs::remove_dir_all(&bench.dir);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ven_over_https_and_wss_with_a_private_ca() {
    let _gate = gridproxy_tests::module_gate(module_path!());
    serially(TEST_LIMIT, vtn_run()).await;
}

/// 12 emulated miners (3 per firmware).
async fn small_site() -> std::sync::Arc<Site> {
    Site::start(SiteBench::new("vtls", (77, 0)).mixed(3).config())
        .await
        .map(std::sync::Arc::new)
        .expect("site starts")
}

async fn vtn_run() {
    let logs = LogCapture::start();
    let dir = temp("grid-tls-vtn");
    let vtn = Vtn::up(&dir.join("vtn"));
    let plain: std::net::SocketAddr = vtn
        .var("VTN_URL")
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .parse()
        .expect("VTN_URL is http://ip:port");
    let ca = TestCa::new(&dir, "vtn");
    let other = TestCa::new(&dir, "other");
    let front =
        TlsForwarder::start(&ca.server_cert("vtn", &["localhost", "127.0.0.1"]), plain).await;
    let https = format!("https://localhost:{}", front.port);

    let site = small_site().await;
    let h = start_vtn_site_driver(&site, &dir.join("ledger.db"), None).await;
    let base_kw = site_kw(&site);
    let (kw_tx, kw_rx) = watch::channel(base_kw);
    let meter = {
        let site = site.clone();
        tokio::spawn(async move {
            while kw_tx.send(site_kw(&site)).is_ok() {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };
    let ven_cfg = |tls: TlsOptions| {
        let mut c = VenConfig::new(
            &https,
            vtn.var("VEN_CLIENT_ID"),
            vtn.var("VEN_CLIENT_SECRET"),
            vtn.var("VEN_NAME"),
        );
        c.report_interval = Duration::from_secs(1);
        c.backoff_max = Duration::from_secs(1);
        c.tls = tls;
        c
    };

    // --- without our CA: a clear TLS error, no login, no signal ---
    for (what, tls) in [
        ("the public roots", TlsOptions::default()),
        ("another CA", TlsOptions::with_ca(other.ca_file())),
    ] {
        let failed_before = front.failed_handshakes();
        let (tx, mut rx) = tokio::sync::mpsc::channel(8);
        let ven = spawn_ven(ven_cfg(tls), tx, kw_rx.clone()).expect("VEN starts");
        let mut errors = 0;
        let mut w = ven.watch();
        let t = Instant::now();
        while errors < 2 && t.elapsed() < Duration::from_secs(10) {
            if tokio::time::timeout(Duration::from_secs(5), w.changed())
                .await
                .is_err()
            {
                break;
            }
            if w.borrow().last_error.is_some() {
                errors += 1;
            }
        }
        let s = ven.status();
        let err = s.last_error.clone().unwrap_or_default();
        println!("openadr tls, {what}: {err} ({errors} errors seen)");
        assert!(errors >= 2, "{what}: retried");
        assert!(
            err.contains("TLS handshake with the VTN")
                && err.contains("not signed by a trusted CA"),
            "{what}: {err}"
        );
        assert!(
            !s.connected && s.syncs == 0 && s.signals_sent == 0,
            "{what}: {s:?}"
        );
        assert!(
            front.failed_handshakes() > failed_before,
            "{what}: refused at the handshake"
        );
        ven.stop().await;
        assert!(rx.try_recv().is_err(), "{what}: a signal was sent");
    }
    let logged = logs
        .lines()
        .into_iter()
        .filter(|l| l.contains("ERROR") && l.contains("TLS handshake with the VTN"))
        .count();
    assert!(logged >= 2, "TLS failures logged at error level: {logged}");

    // --- with our CA: https and the wss notifier through the TLS front ---
    let handshakes = front.handshakes();
    let ven = spawn_ven(
        ven_cfg(TlsOptions::with_ca(ca.ca_file())),
        h.signals(),
        kw_rx.clone(),
    )
    .expect("VEN starts");
    let s = ven
        .wait_for(Duration::from_secs(15), |s| s.connected && s.websocket)
        .await
        .unwrap_or_else(|| panic!("VEN over https with websocket: {:?}", ven.status()));
    assert!(s.last_error.is_none(), "{s:?}");
    println!(
        "openadr tls: VEN logged in over {https}, websocket up ({} TLS handshakes)",
        front.handshakes() - handshakes
    );
    // Login/requests and the websocket: at least two TLS connections.
    assert!(front.handshakes() - handshakes >= 2);

    let utility = vtn.utility("gridproxy-tls", "PT1H").await;
    let limit = share_kw(base_kw, 0.5);
    let Timed {
        id,
        applied,
        within,
        ..
    } = utility
        .create_timed(
            "cap-50",
            limit,
            "create event",
            &ven,
            &site,
            Duration::from_secs(10),
        )
        .await;
    let st = ven.status();
    println!(
        "openadr tls: site {base_kw:.1} kW, limit {limit:.1} kW: applied after {applied:?}, \
         site within after {within:?}, now {:.1} kW; {} notifications, {} syncs",
        site_kw(&site),
        st.notifications,
        st.syncs
    );
    assert!(applied.is_some(), "VEN never applied {id}: {st:?}");
    assert!(
        within.is_some(),
        "site at {:.1} kW, limit {limit:.1}",
        site_kw(&site)
    );
    assert!(st.notifications >= 1, "the event came over wss");
    assert!(
        reports_reach(&ven, 2).await,
        "reports over https: {:?}",
        ven.status()
    );

    ven.stop().await;
    meter.abort();
    let report = h.shutdown().await.expect("driver stops");
    assert_eq!(report.status.failed, 0, "{:?}", report.status);
    site.stop();
    drop(front);
    drop(vtn);
    let _ = std::fs::remove_dir_all(dir);
}
