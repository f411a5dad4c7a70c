//! The dashboard in headless Chromium (Debian `chromium` + `chromium-driver`,
//! installed by `scripts/browser.sh install`), driven over WebDriver: the
//! page loads against a running demo site, its four plots fill with data and
//! keep updating, the worker search filters, and the manual curtailment
//! control works with an operate token (and is refused with a read token).
//! A screenshot is kept at `target/artifacts/dashboard.png`.

use gridproxy::api::client;
use gridproxy::demo::{self, DemoOptions};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

const T: Duration = Duration::from_secs(30);
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

fn bin(var: &str, default: &str) -> String {
    let p = std::env::var(var).unwrap_or_else(|_| default.into());
    assert!(
        std::path::Path::new(&p).exists(),
        "{p} not found: run `bash scripts/browser.sh install` (Debian chromium, chromium-driver)"
    );
    p
}

fn artifacts() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../target")));
    let d = target.join("artifacts");
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Standard base64 (what WebDriver screenshots are).
fn b64decode(s: &str) -> Vec<u8> {
    let val = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in s.bytes() {
        let Some(v) = val(c) else { continue };
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    out
}

struct Driver {
    child: Child,
    addr: SocketAddr,
    profile: PathBuf,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

async fn start_driver() -> Driver {
    let chromedriver = bin("CHROMEDRIVER", "/usr/bin/chromedriver");
    let addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let profile = std::env::temp_dir().join(format!(
        "gridproxy-chromium-{}-{}",
        std::process::id(),
        addr.port()
    ));
    let log = artifacts().join("chromedriver.log");
    let child = Command::new(chromedriver)
        .arg(format!("--port={}", addr.port()))
        .arg(format!("--log-path={}", log.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start chromedriver");
    let d = Driver {
        child,
        addr,
        profile,
    };
    let deadline = tokio::time::Instant::now() + T;
    loop {
        if let Ok(r) =
            client::request(d.addr, "GET", "/status", None, None, Duration::from_secs(2)).await
        {
            if r.json()
                .map(|v| v["value"]["ready"] == true)
                .unwrap_or(false)
            {
                return d;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "chromedriver did not start"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

struct Session<'a> {
    d: &'a Driver,
    id: String,
}

impl<'a> Session<'a> {
    async fn new(d: &'a Driver) -> Session<'a> {
        let chromium = bin("CHROMIUM", "/usr/bin/chromium");
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium,
                "args": [
                    "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    "--no-first-run", "--window-size=1400,1250",
                    format!("--user-data-dir={}", d.profile.display()),
                ]
            }
        }}});
        let r = client::request(
            d.addr,
            "POST",
            "/session",
            None,
            Some(&caps),
            Duration::from_secs(60),
        )
        .await
        .unwrap();
        let v = r.json().unwrap();
        let id = v["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session: {v}"))
            .to_string();
        Session { d, id }
    }

    async fn cmd(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let p = format!("/session/{}{path}", self.id);
        let body = body.or_else(|| (method == "POST").then(|| json!({})));
        let r = client::request(self.d.addr, method, &p, None, body.as_ref(), T)
            .await
            .unwrap();
        let v = r.json().unwrap();
        assert!(
            r.status == 200,
            "webdriver {method} {path}: {} {v}",
            r.status
        );
        v["value"].clone()
    }

    async fn js(&self, script: &str) -> Value {
        self.cmd(
            "POST",
            "/execute/sync",
            Some(json!({"script": script, "args": []})),
        )
        .await
    }

    async fn el(&self, css: &str) -> String {
        let v = self
            .cmd(
                "POST",
                "/element",
                Some(json!({"using": "css selector", "value": css})),
            )
            .await;
        v[ELEMENT].as_str().unwrap().to_string()
    }

    async fn type_into(&self, css: &str, text: &str) {
        let e = self.el(css).await;
        self.cmd("POST", &format!("/element/{e}/clear"), None).await;
        self.cmd(
            "POST",
            &format!("/element/{e}/value"),
            Some(json!({"text": text})),
        )
        .await;
    }

    async fn click(&self, css: &str) {
        let e = self.el(css).await;
        self.cmd("POST", &format!("/element/{e}/click"), None).await;
    }

    async fn wait_js(&self, what: &str, script: &str, secs: u64) -> Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
        loop {
            let v = self.js(script).await;
            if v != Value::Null && v != Value::Bool(false) {
                return v;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {what} ({script})"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    async fn screenshot(&self, name: &str) -> PathBuf {
        let v = self.cmd("GET", "/screenshot", None).await;
        let png = b64decode(v.as_str().unwrap());
        assert!(png.starts_with(b"\x89PNG"), "not a PNG");
        let p = artifacts().join(name);
        std::fs::write(&p, png).unwrap();
        p
    }

    async fn close(self) {
        let p = format!("/session/{}", self.id);
        let _ = client::request(self.d.addr, "DELETE", &p, None, None, T).await;
    }
}

async fn fleet(api: SocketAddr, token: &str) -> Value {
    client::request(api, "GET", "/api/v1/fleet", Some(token), None, T)
        .await
        .unwrap()
        .json()
        .unwrap()
}

const POINTS: &str = "return ['plot-power','plot-hashrate','plot-price','plot-pools'].map(id => +document.getElementById(id).dataset.points)";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_in_chromium_plots_live_data_and_curtails() {
    let _gate = gridproxy_tests::module_gate(module_path!());
    let stop = CancellationToken::new();
    let demo = demo::start(
        DemoOptions {
            miners: 80,
            api_listen: "127.0.0.1:0".parse().unwrap(),
            step: Duration::from_secs(4),
            status_every: Duration::ZERO,
            time_scale: 0.1,
            subnet: (62, 0),
            ledger: Some(
                artifacts().join(format!("dashboard-ledger-{}.sqlite", std::process::id())),
            ),
            ..DemoOptions::default()
        },
        stop.clone(),
    )
    .await
    .unwrap();
    let api = demo.api_addr;
    let (op, read) = (demo.operate_token.clone(), demo.read_token.clone());
    let deadline = tokio::time::Instant::now() + T;
    while fleet(api, &read).await["miners_connected"]
        .as_u64()
        .unwrap_or(0)
        < 60
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "demo miners did not connect"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    let driver = start_driver().await;
    let s = Session::new(&driver).await;
    s.cmd(
        "POST",
        "/url",
        Some(json!({"url": format!("http://{api}/")})),
    )
    .await;
    s.wait_js(
        "the page",
        "return document.readyState === 'complete' && document.title",
        20,
    )
    .await;
    // The page is served with a CSP that forbids framing.
    let page = gridproxy::api::client::request(api, "GET", "/", None, None, T)
        .await
        .expect("dashboard page");
    let csp = page
        .headers
        .iter()
        .find(|(k, _)| k == "content-security-policy")
        .map(|(_, v)| v.clone())
        .unwrap_or_default();
    assert!(
        csp.contains("frame-ancestors 'none'") && csp.contains("script-src 'self'"),
        "CSP: {csp:?}"
    );
    // The operator types the token in; it is kept for this tab only.
    s.type_into("#token", &op).await;
    s.click("#token-save").await;
    s.wait_js(
        "the token in sessionStorage only",
        "return sessionStorage.getItem('gridproxy.token') !== null && localStorage.getItem('gridproxy.token') === null",
        20,
    )
    .await;
    s.wait_js(
        "the operate role",
        "return document.getElementById('role').textContent.includes('operate')",
        20,
    )
    .await;

    // All four plots get data, then keep growing.
    let first = s
        .wait_js(
            "data in every plot",
            &format!("const p = (() => {{ {POINTS} }})(); return p.every(n => n > 2) && p"),
            40,
        )
        .await;
    let before = first[0].as_u64().unwrap();
    s.wait_js(
        "the power plot to update",
        &format!("return (() => {{ {POINTS} }})()[0] > {before}"),
        20,
    )
    .await;
    // Chips show live values.
    let kw = s
        .js("return document.getElementById('c-kw').textContent")
        .await;
    assert!(
        kw.as_str().unwrap().contains("kW") || kw.as_str().unwrap().contains("MW"),
        "{kw}"
    );

    // Worker table and search.
    s.wait_js(
        "worker rows",
        "return document.querySelectorAll('#workers tbody tr').length >= 60",
        20,
    )
    .await;
    s.type_into("#worker-search", "luxos").await;
    s.wait_js(
        "the search to filter",
        "const r = [...document.querySelectorAll('#workers tbody tr')]; return r.length > 0 && r.length < 60 && r.every(t => t.textContent.includes('luxos'))",
        20,
    )
    .await;
    s.js("const i = document.getElementById('worker-search'); i.value = ''; i.dispatchEvent(new Event('input'));")
        .await;

    // Manual curtailment: park a worker group.
    s.type_into("#ct-workers", "site.1*").await;
    s.click("#ct-apply").await;
    let msg = s
        .wait_js(
            "the park to be confirmed",
            "const t = document.getElementById('curtail-result').textContent; return t.startsWith('✓') && t",
            20,
        )
        .await;
    let n: u64 = msg
        .as_str()
        .unwrap()
        .rsplit(": ")
        .next()
        .and_then(|t| t.split(' ').next())
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("no count in {msg}"));
    assert!(n > 0, "{msg}");
    s.wait_js(
        "the operator action in the log",
        "return document.getElementById('log').textContent.includes('demo-operator: park \"site.1*\"')",
        20,
    )
    .await;
    s.js("document.getElementById('ct-action').value = 'unpark'")
        .await;
    s.click("#ct-apply").await;
    s.wait_js(
        "the unpark",
        "return document.getElementById('curtail-result').textContent.startsWith('✓ unpark')",
        20,
    )
    .await;

    // Cap the site: the engine gets a manual override; the target shows up.
    s.js("document.getElementById('ct-action').value = 'cap_kw'")
        .await;
    s.type_into("#ct-kw", "150").await;
    s.click("#ct-apply").await;
    s.wait_js(
        "the cap to be accepted",
        "return document.getElementById('curtail-result').textContent.startsWith('✓ cap site at 150 kW')",
        20,
    )
    .await;
    let deadline = tokio::time::Instant::now() + T;
    loop {
        let f = fleet(api, &read).await;
        if f["site"]["target_kw"].as_f64().is_some_and(|k| k <= 150.0) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "cap not in force: {}",
            f["site"]
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    s.wait_js(
        "the target chip",
        "return document.getElementById('c-target').textContent.includes('kW')",
        20,
    )
    .await;
    // Let the plots show the site following the cap, then keep a screenshot.
    s.js("window.scrollTo(0, 0)").await;
    tokio::time::sleep(Duration::from_secs(8)).await;
    s.wait_js(
        "the full worker table",
        "return document.querySelectorAll('#workers tbody tr').length >= 60",
        20,
    )
    .await;
    let shot = s.screenshot("dashboard.png").await;
    let pts = s.js(POINTS).await;
    assert!(
        pts.as_array()
            .unwrap()
            .iter()
            .all(|n| n.as_u64().unwrap() > 5),
        "{pts}"
    );

    // A read-only token is refused by the control, with the reason shown.
    s.type_into("#token", &read).await;
    s.click("#token-save").await;
    s.wait_js(
        "the read role",
        "return document.getElementById('role').textContent.includes('(read)')",
        20,
    )
    .await;
    s.js("document.getElementById('ct-action').value = 'clear'")
        .await;
    s.click("#ct-apply").await;
    s.wait_js(
        "the 403",
        "return document.getElementById('curtail-result').textContent.startsWith('403')",
        20,
    )
    .await;
    s.close().await;
    drop(driver);
    println!("dashboard screenshot: {}", shot.display());
    demo.stop();
    let report = demo.join().await.unwrap();
    assert!(report.pool_accepted > 0, "{}", report.summary());
}

#[test]
fn base64_decoder() {
    let _gate = gridproxy_tests::module_gate(module_path!());
    assert_eq!(b64decode("aGVsbG8gd29ybGQ="), b"hello world");
    assert_eq!(b64decode("iVBORw=="), b"\x89PNG");
}
