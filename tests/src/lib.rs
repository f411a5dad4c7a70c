//! Shared harness for end-to-end tests: peer discovery, free ports, process guards.
//!
//! The real peers (SRI `pool_sv2`, `translator_sv2`, `mining_device`) are built once by
//! `scripts/peers.sh install` into [`peers_bin_dir`]. Each spawned peer is a [`PeerProcess`]:
//! it gets its own temp dir (config + `peer.log` with stdout and stderr), and is killed when
//! dropped. If the test panics, its log dir is kept and its path printed, with the log's tail.
//!
//! Typical use (inside `#[tokio::test]`):
//! ```no_run
//! # async fn demo() {
//! use gridproxy_tests::*;
//! let tp = start_tp().await;                      // mock Template Provider, free port
//! let pool = start_pool(tp.addr()).await;         // pool_sv2, waits until it listens
//! let tproxy = start_translator(&pool).await;     // translator_sv2, SV1 on tproxy.sv1_addr
//! let dev = spawn_mining_device(pool.addr, Some(&pool.authority_pubkey), Default::default());
//! assert!(pool.wait_shares_accepted(1.0, std::time::Duration::from_secs(60)).await);
//! # }
//! ```
//! Keep every handle alive for the duration of the test: dropping one stops that peer.
//!
//! All end-to-end tests are modules of one binary (`tests/e2e`), so they share one process:
//! every test opens with [`module_gate`] (modules run one after another, as the separate
//! binaries did), tracing is installed once by [`init_tracing`], and [`SERIAL`] is the one
//! lock for tests that must run alone. [`bench`] is the site harness (TP → `pool_sv2` →
//! gridproxy → emulated fleet → curtailment driver). [`tls`] makes a private CA and puts a
//! TLS front on a plain-text peer.

pub mod bench;
pub mod postgres;
pub mod tls;

use std::{
    collections::HashSet,
    fs,
    io::{Read, Seek, SeekFrom},
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicU64, Ordering},
        Mutex, OnceLock,
    },
    time::Duration,
};

use gridproxy_fixtures::tp::{MockTp, TpConfig, TEST_AUTHORITY_SECRET_KEY};
use gridproxy_protocol::sv2::AuthorityPublicKey;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    time::Instant,
};

pub use gridproxy_fixtures::tp::TEST_AUTHORITY_PUBLIC_KEY;

/// Pool config template (`peers/pool.toml.in`).
pub const POOL_TEMPLATE: &str = include_str!("../../peers/pool.toml.in");
/// Translator config template (`peers/translator.toml.in`).
pub const TRANSLATOR_TEMPLATE: &str = include_str!("../../peers/translator.toml.in");

/// How long a peer may take to start listening.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------------
// One process for every test

/// Only one site-sized (or otherwise heavy) test at a time within a module: the machine has
/// two shared cores. Modules never overlap anyway ([`module_gate`]).
pub static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Runs a test alone in its module (the [`SERIAL`] lock), failing it after `limit`.
pub async fn serially(limit: Duration, test: impl std::future::Future<Output = ()>) {
    let _serial = SERIAL.lock().await;
    tokio::time::timeout(limit, test)
        .await
        .expect("test finished in time");
}

/// Holds [`module_gate`] open for its module until dropped.
#[must_use = "the gate closes when this is dropped"]
pub struct ModuleGate {
    _private: (),
}

#[derive(Default)]
struct GateState {
    module: Option<&'static str>,
    holders: usize,
    /// When the module in the gate first got in.
    since: Option<std::time::Instant>,
}

/// Where each module's time in the gate is appended (`module seconds`), for
/// the test script's summary of the slowest modules: the environment's
/// `GRIDPROXY_TEST_TIMES`, if set.
fn record_module_time(module: &str, secs: f64) {
    let Some(path) = std::env::var_os("GRIDPROXY_TEST_TIMES") else {
        return;
    };
    use std::io::Write as _;
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    {
        let _ = writeln!(f, "{secs:8.1} {module}");
    }
}

fn gate() -> &'static (Mutex<GateState>, std::sync::Condvar) {
    static GATE: OnceLock<(Mutex<GateState>, std::sync::Condvar)> = OnceLock::new();
    GATE.get_or_init(Default::default)
}

/// Waits until no test of another module runs, then lets this test in; call it first in
/// every test, with `module_path!()`. Tests of one module may run side by side (as they did
/// in their own binary); tests of different modules never do (as separate binaries never
/// did), so the timing-sensitive end-to-end tests keep the machine to their module. Blocks
/// the thread, which is fine before a test has started anything.
pub fn module_gate(module: &'static str) -> ModuleGate {
    let (lock, cvar) = gate();
    let mut st = lock.lock().unwrap_or_else(|e| e.into_inner());
    while st.holders > 0 && st.module != Some(module) {
        st = cvar.wait(st).unwrap_or_else(|e| e.into_inner());
    }
    if st.holders == 0 {
        st.since = Some(std::time::Instant::now());
    }
    st.module = Some(module);
    st.holders += 1;
    ModuleGate { _private: () }
}

impl Drop for ModuleGate {
    fn drop(&mut self) {
        let (lock, cvar) = gate();
        let mut st = lock.lock().unwrap_or_else(|e| e.into_inner());
        st.holders -= 1;
        if st.holders == 0 {
            if let (Some(m), Some(t)) = (st.module, st.since.take()) {
                record_module_time(m, t.elapsed().as_secs_f64());
            }
            st.module = None;
            cvar.notify_all();
        }
    }
}

/// Installs the process's tracing subscriber once (later calls do nothing): events go to
/// the test writer, filtered by `RUST_LOG` (empty: errors only), and `gridproxy_grid::openadr`
/// and `gridproxy_grid::mqtt` events at info and up (plus `RUST_LOG`) also go to the active
/// [`LogCapture`], if any.
pub fn init_tracing() {
    use tracing_subscriber::{layer::SubscriberExt, util::SubscriberInitExt, EnvFilter, Layer};
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        let rust_log = std::env::var("RUST_LOG").unwrap_or_default();
        let grid = "gridproxy_grid::openadr=info,gridproxy_grid::mqtt=info";
        let capture_filter = if rust_log.is_empty() {
            grid.to_string()
        } else {
            format!("{rust_log},{grid}")
        };
        let _ = tracing_subscriber::registry()
            .with(
                tracing_subscriber::fmt::layer()
                    .with_test_writer()
                    .with_filter(EnvFilter::new(rust_log)),
            )
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(false)
                    .with_writer(|| CaptureWriter)
                    .with_filter(EnvFilter::new(capture_filter)),
            )
            .try_init();
    });
}

type LogBuf = std::sync::Arc<Mutex<Vec<u8>>>;

fn active_capture() -> &'static Mutex<Option<LogBuf>> {
    static ACTIVE: Mutex<Option<LogBuf>> = Mutex::new(None);
    &ACTIVE
}

/// Log lines of this process, collected from [`LogCapture::start`] until it is dropped (one
/// capture at a time: run the test under [`SERIAL`]). What is collected is what
/// [`init_tracing`] sends to captures.
pub struct LogCapture(LogBuf);

impl LogCapture {
    /// Installs [`init_tracing`] if needed and starts collecting (ending any other capture).
    pub fn start() -> LogCapture {
        init_tracing();
        let buf = LogBuf::default();
        *active_capture().lock().unwrap_or_else(|e| e.into_inner()) = Some(buf.clone());
        LogCapture(buf)
    }

    /// What was collected so far, line by line.
    pub fn lines(&self) -> Vec<String> {
        String::from_utf8_lossy(&self.0.lock().unwrap_or_else(|e| e.into_inner()))
            .lines()
            .map(String::from)
            .collect()
    }
}

impl Drop for LogCapture {
    fn drop(&mut self) {
        let mut active = active_capture().lock().unwrap_or_else(|e| e.into_inner());
        if active
            .as_ref()
            .is_some_and(|a| std::sync::Arc::ptr_eq(a, &self.0))
        {
            *active = None;
        }
    }
}

struct CaptureWriter;

impl std::io::Write for CaptureWriter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        if let Some(c) = active_capture()
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            c.lock()
                .unwrap_or_else(|e| e.into_inner())
                .extend_from_slice(b);
        }
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Peer binaries

/// Start the whole application (engine, control API, site) as `gridproxy
/// run` does; with `config_path`, reloads re-read that file and SIGHUP is
/// handled.
pub async fn start_app(cfg: gridproxy::Config, config_path: Option<PathBuf>) -> gridproxy::App {
    let sighup = config_path.is_some();
    let opts = gridproxy::AppOptions {
        config_path,
        sighup,
    };
    gridproxy::App::start(cfg, opts)
        .await
        .expect("gridproxy starts")
}

/// Start the proxy engine on the engine's part of an application config
/// (tests that need no control API or site).
pub async fn start_proxy(
    cfg: gridproxy::Config,
) -> Result<gridproxy_proxy::Proxy, gridproxy_proxy::error::StartError> {
    gridproxy_proxy::Proxy::start(cfg.proxy(), tokio_util::sync::CancellationToken::new()).await
}

/// Where `scripts/peers.sh install` puts the peer binaries:
/// `$GRIDPROXY_CACHE/peers/bin`, else `$HOME/.cache/gridproxy/peers/bin`.
pub fn peers_bin_dir() -> PathBuf {
    match std::env::var_os("GRIDPROXY_CACHE") {
        Some(c) => PathBuf::from(c).join("peers").join("bin"),
        None => {
            let home = std::env::var_os("HOME").unwrap_or_else(|| ".".into());
            PathBuf::from(home).join(".cache/gridproxy/peers/bin")
        }
    }
}

/// Whether the peer binary `name` is installed.
pub fn has_peer(name: &str) -> bool {
    peers_bin_dir().join(name).is_file()
}

/// Path of the peer binary `name` (`pool_sv2`, `translator_sv2`, `mining_device`).
///
/// # Panics
/// With instructions if it is not installed.
pub fn peer_bin(name: &str) -> PathBuf {
    let path = peers_bin_dir().join(name);
    if !path.is_file() {
        panic!(
            "peer binary `{name}` not found at {}.\n\
             Build the real peers once with `scripts/peers.sh install` (cold build ~30 min; \
             set GRIDPROXY_CACHE to use another cache folder).",
            path.display()
        );
    }
    path
}

// ---------------------------------------------------------------------------------------------
// Ports

/// A free TCP port on 127.0.0.1. Ports handed out by this process are never handed out twice,
/// so parallel tests do not collide with each other (another process still could, rarely).
pub fn free_port() -> u16 {
    static GIVEN: OnceLock<Mutex<HashSet<u16>>> = OnceLock::new();
    let given = GIVEN.get_or_init(|| Mutex::new(HashSet::new()));
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("bind 127.0.0.1:0")
            .port();
        if given.lock().unwrap().insert(port) {
            return port;
        }
    }
}

/// `127.0.0.1:<free port>`.
pub fn free_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

/// Waits until something accepts TCP connections on `addr`; `false` on timeout.
///
/// Note: the probe connection is closed at once; SV2 servers log it as a failed handshake.
pub async fn wait_for_port(addr: SocketAddr, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Ok(Ok(_)) =
            tokio::time::timeout(Duration::from_millis(500), TcpStream::connect(addr)).await
        {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// Polls `cond` every 100 ms until it is true; `false` on timeout.
pub async fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Processes

/// A spawned peer: killed (and reaped) on drop; stdout+stderr go to `log_path()`.
pub struct PeerProcess {
    name: String,
    child: Child,
    dir: PathBuf,
    log_path: PathBuf,
}

impl PeerProcess {
    /// A fresh, empty per-peer directory under the system temp dir.
    pub fn make_dir(name: &str) -> PathBuf {
        static N: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join("gridproxy-tests").join(format!(
            "{name}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("create peer temp dir");
        dir
    }

    /// Spawns `cmd` with output captured to `<dir>/peer.log`. Inherited `POOL__*` / `TPROXY__*`
    /// variables are removed (set overrides on `cmd` after calling [`clean_env`]), and colours
    /// are disabled so logs are greppable.
    pub fn spawn(name: &str, dir: PathBuf, mut cmd: Command) -> PeerProcess {
        let log_path = dir.join("peer.log");
        let log = fs::File::create(&log_path).expect("create peer log");
        let log2 = log.try_clone().expect("clone log handle");
        cmd.current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2))
            .env("NO_COLOR", "1");
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn {name} ({cmd:?}): {e}"));
        PeerProcess {
            name: name.to_string(),
            child,
            dir,
            log_path,
        }
    }

    /// Peer name (for messages).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// OS process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The peer's directory (config, log).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The captured stdout+stderr.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The whole log so far.
    pub fn log(&self) -> String {
        fs::read(&self.log_path)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// The last `bytes` of the log.
    pub fn log_tail(&self, bytes: u64) -> String {
        let Ok(mut f) = fs::File::open(&self.log_path) else {
            return String::new();
        };
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        let _ = f.seek(SeekFrom::Start(len.saturating_sub(bytes)));
        let mut buf = Vec::new();
        let _ = f.read_to_end(&mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    }

    /// How many log lines contain `needle`.
    pub fn count_in_log(&self, needle: &str) -> usize {
        self.log().lines().filter(|l| l.contains(needle)).count()
    }

    /// Waits until the log has at least `n` lines containing `needle`; `false` on timeout or
    /// if the process exits first.
    pub async fn wait_for_log_count(&mut self, needle: &str, n: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.count_in_log(needle) >= n {
                return true;
            }
            if !self.is_running() || Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until a log line contains `needle`; `false` on timeout or early exit.
    pub async fn wait_for_log(&mut self, needle: &str, timeout: Duration) -> bool {
        self.wait_for_log_count(needle, 1, timeout).await
    }

    /// Whether the process is still alive.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The exit code once the process has exited (`None` while it runs,
    /// or if a signal ended it).
    pub fn exit_code(&mut self) -> Option<i32> {
        self.child.try_wait().ok().flatten().and_then(|s| s.code())
    }

    /// Kills the process now (idempotent).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for PeerProcess {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() || std::env::var_os("GRIDPROXY_KEEP_LOGS").is_some() {
            eprintln!(
                "--- {} (pid {}) log kept at {} ; tail:\n{}\n---",
                self.name,
                self.child.id(),
                self.log_path.display(),
                self.log_tail(4000)
            );
        } else {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// Removes inherited `POOL__*` / `TPROXY__*` overrides from `cmd`'s environment, so a stray
/// variable in the developer's shell cannot change (or un-loopback) a peer's config.
pub fn clean_env(cmd: &mut Command) {
    remove_env(cmd, &["POOL__", "TPROXY__"]);
}

/// Removes every inherited variable whose name starts with one of `prefixes` from `cmd`'s
/// environment.
pub fn remove_env(cmd: &mut Command, prefixes: &[&str]) {
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy();
        if prefixes.iter().any(|p| k.starts_with(p)) {
            cmd.env_remove(k.as_ref());
        }
    }
}

/// Replaces every `{{KEY}}` in `template`; panics if one is left unfilled.
pub fn fill_template(template: &str, vars: &[(&str, String)]) -> String {
    let mut out = template.to_string();
    for (k, v) in vars {
        out = out.replace(&format!("{{{{{k}}}}}"), v);
    }
    // Comments may talk about placeholders; settings must not keep any.
    if let Some(line) = out
        .lines()
        .find(|l| !l.trim_start().starts_with('#') && l.contains("{{"))
    {
        panic!("unfilled placeholder in peer config: {line}");
    }
    out
}

// ---------------------------------------------------------------------------------------------
// HTTP / Prometheus (loopback monitoring endpoints)

/// `GET path` over HTTP/1.0 on loopback; returns the body.
pub async fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<String> {
    let fut = async {
        let mut s = TcpStream::connect(addr).await?;
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
            .await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        let text = String::from_utf8_lossy(&buf).into_owned();
        let status_ok = text.starts_with("HTTP/1.0 200") || text.starts_with("HTTP/1.1 200");
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        if status_ok {
            Ok(body)
        } else {
            Err(std::io::Error::other(format!(
                "GET {path}: {}",
                text.lines().next().unwrap_or("no response")
            )))
        }
    };
    tokio::time::timeout(Duration::from_secs(5), fut)
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))?
}

/// Sum of every sample of metric `name` (all label sets) in Prometheus text format.
pub fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

// ---------------------------------------------------------------------------------------------
// Mock Template Provider

/// Starts the fixture TP on a free loopback port with default settings
/// (easy `nbits`, a template every 10 s, SRI example authority key).
pub async fn start_tp() -> MockTp {
    start_tp_with(TpConfig::default()).await
}

/// Starts the fixture TP on a free loopback port with a tip that stays put when a block is
/// found (`new_tip_on_solution: false`), so no share goes stale by a race.
pub async fn start_quiet_tp() -> MockTp {
    start_tp_with(TpConfig {
        new_tip_on_solution: false,
        ..Default::default()
    })
    .await
}

/// Starts the fixture TP with `cfg` on a free loopback port.
pub async fn start_tp_with(cfg: TpConfig) -> MockTp {
    MockTp::start("127.0.0.1:0".parse().unwrap(), cfg)
        .await
        .expect("mock TP binds a loopback port")
}

// ---------------------------------------------------------------------------------------------
// SRI pool

/// Knobs for [`start_pool_with`].
#[derive(Clone, Debug)]
pub struct PoolOptions {
    /// Pool's share rate target per channel (with the channel's nominal hashrate this sets
    /// the share difficulty). Default 60.
    pub shares_per_minute: f32,
    /// Shares per `SubmitShares.Success`. Default 1 (every share acknowledged).
    pub share_batch_size: u32,
    /// Key the TP's certificate must be signed with (default: the SRI example key, which
    /// the fixture TP uses by default).
    pub tp_authority: Option<AuthorityPublicKey>,
    /// Extra `POOL__…` environment overrides.
    pub env: Vec<(String, String)>,
    /// Loopback address its SV2 listener binds (default 127.0.0.1; `::1` for IPv6).
    pub listen_ip: Option<std::net::IpAddr>,
}

impl Default for PoolOptions {
    fn default() -> Self {
        Self {
            shares_per_minute: 60.0,
            share_batch_size: 1,
            tp_authority: None,
            env: Vec::new(),
            listen_ip: None,
        }
    }
}

/// A running `pool_sv2`.
pub struct Pool {
    /// SV2 (Noise) listen address for miners/proxies.
    pub addr: SocketAddr,
    /// Authority key its certificate is signed with (SRI example key).
    pub authority_pubkey: AuthorityPublicKey,
    /// Monitoring HTTP address (`/metrics`, `/api/v1/...`).
    pub monitoring_addr: SocketAddr,
    /// The process (log, kill).
    pub process: PeerProcess,
}

impl Pool {
    /// Prometheus text from `/metrics`.
    pub async fn metrics(&self) -> std::io::Result<String> {
        http_get(self.monitoring_addr, "/metrics").await
    }

    /// A scrape of the pool's own client metrics, or why there is none: an
    /// unreachable endpoint, or a page without `sv2_clients_total` (not the
    /// pool's monitoring), is an error, never a page of zeros.
    pub async fn client_metrics(&self) -> Result<String, String> {
        let text = self
            .metrics()
            .await
            .map_err(|e| format!("pool_sv2 /metrics at {}: {e}", self.monitoring_addr))?;
        if !text.lines().any(|l| l.starts_with("sv2_clients_total")) {
            return Err(format!(
                "pool_sv2 /metrics at {} has no sv2_clients_total: {:.200}",
                self.monitoring_addr, text
            ));
        }
        Ok(text)
    }

    /// Shares accepted from all clients (`sv2_client_shares_accepted_total`;
    /// ≤1 s stale). Panics when the metrics cannot be read.
    pub async fn shares_accepted(&self) -> f64 {
        let text = self
            .client_metrics()
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        metric_sum(&text, "sv2_client_shares_accepted_total")
    }

    /// Shares rejected from all clients (`sv2_client_shares_rejected_total`,
    /// which has a series only per error code seen, so none means zero on a
    /// page that is the pool's). Panics when the metrics cannot be read.
    pub async fn shares_rejected(&self) -> f64 {
        let text = self
            .client_metrics()
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        metric_sum(&text, "sv2_client_shares_rejected_total")
    }

    /// Waits until the pool's metrics show at least `n` accepted shares.
    pub async fn wait_shares_accepted(&self, n: f64, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let seen = self.client_metrics().await;
            if let Ok(text) = &seen {
                if metric_sum(text, "sv2_client_shares_accepted_total") >= n {
                    return true;
                }
            }
            if Instant::now() >= deadline {
                if let Err(e) = seen {
                    panic!("{e}");
                }
                return false;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

/// Starts `pool_sv2` against the TP at `tp_addr` with [`PoolOptions::default`].
pub async fn start_pool(tp_addr: SocketAddr) -> Pool {
    start_pool_with(tp_addr, PoolOptions::default()).await
}

/// Starts `pool_sv2` on free loopback ports against the TP at `tp_addr`, and waits until it
/// has a template and accepts connections.
///
/// # Panics
/// If the binary is missing or the pool does not come up within [`STARTUP_TIMEOUT`].
pub async fn start_pool_with(tp_addr: SocketAddr, opts: PoolOptions) -> Pool {
    let bin = peer_bin("pool_sv2");
    let addr = match opts.listen_ip {
        Some(ip) => {
            assert!(ip.is_loopback(), "peers listen on loopback only, not {ip}");
            SocketAddr::new(ip, free_port())
        }
        None => free_addr(),
    };
    let monitoring_addr = free_addr();
    let authority_pubkey: AuthorityPublicKey =
        TEST_AUTHORITY_PUBLIC_KEY.parse().expect("SRI example key");
    let tp_key = opts.tp_authority.unwrap_or(authority_pubkey);
    let config = fill_template(
        POOL_TEMPLATE,
        &[
            ("AUTHORITY_PUBLIC_KEY", authority_pubkey.to_string()),
            (
                "AUTHORITY_SECRET_KEY",
                TEST_AUTHORITY_SECRET_KEY.to_string(),
            ),
            ("LISTEN", addr.to_string()),
            (
                "SHARES_PER_MINUTE",
                format!("{:.3}", opts.shares_per_minute),
            ),
            ("SHARE_BATCH_SIZE", opts.share_batch_size.to_string()),
            ("MONITORING", monitoring_addr.to_string()),
            ("TP_ADDRESS", tp_addr.to_string()),
            ("TP_AUTHORITY_PUBLIC_KEY", tp_key.to_string()),
        ],
    );
    let dir = PeerProcess::make_dir("pool_sv2");
    fs::write(dir.join("pool.toml"), config).expect("write pool config");
    let mut cmd = Command::new(bin);
    cmd.arg("-c").arg(dir.join("pool.toml"));
    clean_env(&mut cmd);
    cmd.envs(opts.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    let mut process = PeerProcess::spawn("pool_sv2", dir, cmd);
    // The pool binds first, then waits for a template before accepting: this line means
    // both. (No TCP probe: it would show up in the pool's logs and client counts.)
    let ready = process
        .wait_for_log("ready to accept connections", STARTUP_TIMEOUT)
        .await;
    assert!(
        ready,
        "pool_sv2 did not become ready on {addr} (TP {tp_addr}); log tail:\n{}",
        process.log_tail(3000)
    );
    Pool {
        addr,
        authority_pubkey,
        monitoring_addr,
        process,
    }
}

/// Starts `pool_sv2` again from a killed pool's config (same ports, same TP), and waits
/// until it is ready to accept connections.
pub async fn restart_pool(old: &Pool) -> PeerProcess {
    let dir = PeerProcess::make_dir("pool_sv2_restarted");
    fs::copy(old.process.dir().join("pool.toml"), dir.join("pool.toml")).unwrap();
    let mut cmd = Command::new(peer_bin("pool_sv2"));
    cmd.arg("-c").arg(dir.join("pool.toml"));
    clean_env(&mut cmd);
    let mut p = PeerProcess::spawn("pool_sv2", dir, cmd);
    assert!(
        p.wait_for_log("ready to accept connections", Duration::from_secs(30))
            .await,
        "{}",
        p.log_tail(2000)
    );
    p
}

// ---------------------------------------------------------------------------------------------
// SRI translator (SV1 -> SV2)

/// Knobs for [`start_translator_with`].
#[derive(Clone, Debug)]
pub struct TranslatorOptions {
    /// Assumed hashrate of the weakest SV1 miner (H/s): sets the initial SV1 difficulty.
    /// Default 100 kH/s, so CPU miners find shares.
    pub min_individual_miner_hashrate: f64,
    /// Target SV1 share rate per miner. Default 30.
    pub shares_per_minute: f32,
    /// Translator vardiff. Default off (stable difficulty for counting).
    pub enable_vardiff: bool,
    /// One upstream channel for all miners (default) or one each.
    pub aggregate_channels: bool,
    /// extranonce2 size given to SV1 miners. Default 4.
    pub extranonce2_size: u16,
    /// Upstream user identity. Default "gridproxy-test".
    pub user_identity: String,
    /// Extra `TPROXY__…` environment overrides (never `MINER_TELEMETRY`).
    pub env: Vec<(String, String)>,
}

impl Default for TranslatorOptions {
    fn default() -> Self {
        Self {
            min_individual_miner_hashrate: 100_000.0,
            shares_per_minute: 30.0,
            enable_vardiff: false,
            aggregate_channels: true,
            extranonce2_size: 4,
            user_identity: "gridproxy-test".into(),
            env: Vec::new(),
        }
    }
}

/// A running `translator_sv2`.
pub struct Translator {
    /// SV1 listen address (point SV1 miners here).
    pub sv1_addr: SocketAddr,
    /// Monitoring HTTP address (`/metrics`, `/api/v1/sv1/clients`).
    pub monitoring_addr: SocketAddr,
    /// The process (log, kill).
    pub process: PeerProcess,
}

impl Translator {
    /// Prometheus text from `/metrics`.
    pub async fn metrics(&self) -> std::io::Result<String> {
        http_get(self.monitoring_addr, "/metrics").await
    }
}

/// Starts `translator_sv2` with [`TranslatorOptions::default`] upstream of `pool`.
pub async fn start_translator(pool: &Pool) -> Translator {
    start_translator_with(pool, TranslatorOptions::default()).await
}

/// Starts `translator_sv2` with its SV1 listener on a free loopback port, connected to `pool`
/// (pinned to its authority key), and waits until the SV1 port accepts connections.
///
/// # Panics
/// If the binary is missing, it does not come up within [`STARTUP_TIMEOUT`], or miner
/// telemetry (LAN scanning) is not reported disabled.
pub async fn start_translator_with(pool: &Pool, opts: TranslatorOptions) -> Translator {
    assert!(
        opts.env
            .iter()
            .all(|(k, _)| !k.to_ascii_uppercase().contains("MINER_TELEMETRY")),
        "never enable translator miner telemetry (it scans LAN ranges)"
    );
    let bin = peer_bin("translator_sv2");
    let sv1_addr = free_addr();
    let monitoring_addr = free_addr();
    let config = fill_template(
        TRANSLATOR_TEMPLATE,
        &[
            ("SV1_PORT", sv1_addr.port().to_string()),
            ("EXTRANONCE2_SIZE", opts.extranonce2_size.to_string()),
            ("AGGREGATE_CHANNELS", opts.aggregate_channels.to_string()),
            ("MONITORING", monitoring_addr.to_string()),
            (
                "MIN_HASHRATE",
                format!("{:.1}", opts.min_individual_miner_hashrate),
            ),
            (
                "SHARES_PER_MINUTE",
                format!("{:.3}", opts.shares_per_minute),
            ),
            ("ENABLE_VARDIFF", opts.enable_vardiff.to_string()),
            ("POOL_HOST", pool.addr.ip().to_string()),
            ("POOL_PORT", pool.addr.port().to_string()),
            (
                "POOL_AUTHORITY_PUBLIC_KEY",
                pool.authority_pubkey.to_string(),
            ),
            ("USER_IDENTITY", opts.user_identity.clone()),
        ],
    );
    let dir = PeerProcess::make_dir("translator_sv2");
    fs::write(dir.join("translator.toml"), config).expect("write translator config");
    let mut cmd = Command::new(bin);
    cmd.arg("-c").arg(dir.join("translator.toml"));
    clean_env(&mut cmd);
    cmd.envs(opts.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    let mut process = PeerProcess::spawn("translator_sv2", dir, cmd);
    // Logged right after the bind. (No TCP probe: it would register as an SV1 client.)
    let up = process
        .wait_for_log(&format!("listening on {sv1_addr}"), STARTUP_TIMEOUT)
        .await;
    assert!(
        up,
        "translator_sv2 did not listen on {sv1_addr}; log tail:\n{}",
        process.log_tail(3000)
    );
    // Defence in depth: the telemetry task must report itself disabled.
    let no_scan = process
        .wait_for_log(
            "miner telemetry discovery disabled",
            Duration::from_secs(10),
        )
        .await;
    assert!(
        no_scan,
        "translator_sv2 did not report miner telemetry disabled; log tail:\n{}",
        process.log_tail(3000)
    );
    Translator {
        sv1_addr,
        monitoring_addr,
        process,
    }
}

// ---------------------------------------------------------------------------------------------
// SRI mining_device (SV2 CPU miner, standard channel)

/// Knobs for [`spawn_mining_device`].
#[derive(Clone, Debug)]
pub struct MiningDeviceOptions {
    /// Microseconds slept between hashes (slows it down; also applied while it measures its
    /// own hashrate). Default 0.
    pub handicap_us: u32,
    /// Worker threads. Default 1 (this machine has 2 cores).
    pub cores: u32,
    /// `user_identity` for the channel.
    pub user: String,
    /// Multiplier on the advertised hashrate (below 1 → easier target, more shares).
    pub nominal_hashrate_multiplier: Option<f32>,
}

impl Default for MiningDeviceOptions {
    fn default() -> Self {
        Self {
            handicap_us: 0,
            cores: 1,
            user: "mining-device".into(),
            nominal_hashrate_multiplier: None,
        }
    }
}

/// Log line `mining_device` prints for every `SubmitShares.Success` it receives.
pub const MINING_DEVICE_ACCEPTED: &str = "Received SubmitSharesSuccess";

/// Spawns SRI's `mining_device` against the SV2 endpoint `addr`, pinning `pubkey` if given.
/// It measures its hashrate for ~5 s before opening its channel. Note: it panics on
/// `CloseChannel`, `SetExtranoncePrefix` and `OpenMiningChannel.Error`.
pub fn spawn_mining_device(
    addr: SocketAddr,
    pubkey: Option<&AuthorityPublicKey>,
    opts: MiningDeviceOptions,
) -> PeerProcess {
    let bin = peer_bin("mining_device");
    let dir = PeerProcess::make_dir("mining_device");
    let mut cmd = Command::new(bin);
    cmd.arg("--address-pool")
        .arg(addr.to_string())
        .arg("--handicap")
        .arg(opts.handicap_us.to_string())
        .arg("--cores")
        .arg(opts.cores.to_string())
        .arg("--id-user")
        .arg(&opts.user);
    if let Some(k) = pubkey {
        cmd.arg("--pubkey-pool").arg(k.to_string());
    }
    if let Some(m) = opts.nominal_hashrate_multiplier {
        cmd.arg("--nominal-hashrate-multiplier").arg(m.to_string());
    }
    PeerProcess::spawn("mining_device", dir, cmd)
}

// ---------------------------------------------------------------------------------------------
// Fixture SV1 fleets

/// Starts `n` fixture SV1 miners named `PREFIX.i` against `addr`, all counting into one stats
/// block; half roll version bits and half do not, as in a mixed fleet. Cancel the token to stop.
pub fn start_sv1_miners(
    addr: SocketAddr,
    n: usize,
    prefix: &str,
    hashrate: f64,
) -> (
    std::sync::Arc<gridproxy_fixtures::stats::MinerStats>,
    tokio_util::sync::CancellationToken,
) {
    use gridproxy_fixtures::sv1_miner::{self, Sv1MinerConfig};
    let stats = std::sync::Arc::new(gridproxy_fixtures::stats::MinerStats::default());
    let stop = tokio_util::sync::CancellationToken::new();
    for i in 0..n {
        let mut cfg = Sv1MinerConfig::new(addr, format!("{prefix}.{i}"));
        cfg.hashrate = hashrate;
        cfg.version_rolling = i % 2 == 0;
        tokio::spawn(sv1_miner::run(cfg, stats.clone(), stop.clone()));
    }
    (stats, stop)
}

/// Resident set size of this process (an in-process proxy included), KiB.
pub fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .expect("VmRSS in /proc/self/status")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_sum_adds_label_sets() {
        let text = "# HELP x\n# TYPE x gauge\n\
                    sv2_client_shares_accepted_total{client_id=\"1\"} 3\n\
                    sv2_client_shares_accepted_total{client_id=\"2\"} 4.5\n\
                    sv2_client_shares_accepted_total_other 100\n";
        assert_eq!(metric_sum(text, "sv2_client_shares_accepted_total"), 7.5);
        assert_eq!(metric_sum(text, "missing"), 0.0);
    }

    #[test]
    fn templates_fill_completely() {
        let vars: Vec<(&str, String)> = [
            "AUTHORITY_PUBLIC_KEY",
            "AUTHORITY_SECRET_KEY",
            "LISTEN",
            "SHARES_PER_MINUTE",
            "SHARE_BATCH_SIZE",
            "MONITORING",
            "TP_ADDRESS",
            "TP_AUTHORITY_PUBLIC_KEY",
        ]
        .iter()
        .map(|k| (*k, "1".to_string()))
        .collect();
        let out = fill_template(POOL_TEMPLATE, &vars);
        assert!(out.contains("listen_address = \"1\""));
        // Comments may mention it; no line may open the section.
        assert!(!TRANSLATOR_TEMPLATE
            .lines()
            .any(|l| l.trim_start().starts_with("[miner_telemetry")));
    }

    #[test]
    fn free_ports_are_distinct() {
        let a: HashSet<u16> = (0..20).map(|_| free_port()).collect();
        assert_eq!(a.len(), 20);
    }
}
