//! Shared pieces of the tests against the real openleadr-rs VTN
//! (`grid_openadr`, `chaos_vtn`): the VTN from `scripts/vtn.sh up`, the
//! 36-miner emulated site and its curtailment driver, capacity-limit events
//! as the utility creates them, and waits on the site's draw.
//!
//! Builds on [`gridproxy_tests::bench`] (site, driver, scaled clock).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::{Duration, Instant};

use gridproxy_curtail as curtail;
use gridproxy_fixtures::site::Site;
use gridproxy_grid::openadr::{VenConfig, VenHandle};
use gridproxy_tests::free_port;
use openleadr_client::{BusinessLogic, Client, ClientCredentials, EventClient, ProgramClient};
use openleadr_wire::event::EventRequest;
use openleadr_wire::program::ProgramRequest;
use serde_json::json;

use curtail::driver::{CommitHook, DriverConfig, DriverHandle, Nothing};
use curtail::policy::{PolicyConfig, Staleness};

use gridproxy_tests::bench::{site_kw, ScaledClock, SiteBench, SPEED};
pub use gridproxy_tests::serially;

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repo root")
        .to_path_buf()
}

/// Where `scripts/vtn.sh install` puts the openleadr-vtn binary.
pub fn vtn_bin() -> PathBuf {
    let cache = std::env::var_os("GRIDPROXY_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| ".".into()))
                .join(".cache/gridproxy")
        });
    cache.join("openleadr-vtn/bin/openleadr-vtn")
}

/// A VTN started by `scripts/vtn.sh up` on free loopback ports; `down` on
/// drop (after killing a VTN the test started again itself, if any).
pub struct Vtn {
    /// What `scripts/vtn.sh` was run with; `VTN_PORT` first.
    pub env: Vec<(String, String)>,
    /// The `KEY=value` lines `scripts/vtn.sh up` printed.
    pub vars: HashMap<String, String>,
    /// `VTN_RUN_DIR`: pid files, logs, PostgreSQL's data.
    #[allow(dead_code)]
    pub run_dir: PathBuf,
    /// A VTN the test restarted (its child), killed on drop.
    pub restarted: Option<Child>,
}

impl Vtn {
    pub fn up(run_dir: &Path) -> Vtn {
        let bin = vtn_bin();
        assert!(
            bin.is_file(),
            "openleadr-vtn not found at {}: run `scripts/vtn.sh install` first (builds the real \
             openleadr-rs VTN once, ~15 min cold; set GRIDPROXY_CACHE for another cache folder)",
            bin.display()
        );
        let env = vec![
            ("VTN_PORT".to_string(), free_port().to_string()),
            ("VTN_PG_PORT".to_string(), free_port().to_string()),
            ("VTN_RUN_DIR".to_string(), run_dir.display().to_string()),
            ("VEN_NAME".to_string(), "site-1".to_string()),
        ];
        let out = Command::new("bash")
            .arg(repo().join("scripts/vtn.sh"))
            .arg("up")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .output()
            .expect("run scripts/vtn.sh up");
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        let vtn = Vtn {
            env,
            vars: stdout
                .lines()
                .filter_map(|l| l.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            run_dir: run_dir.to_path_buf(),
            restarted: None,
        };
        assert!(
            out.status.success(),
            "scripts/vtn.sh up failed:\n{}{}",
            stdout,
            String::from_utf8_lossy(&out.stderr)
        );
        vtn
    }

    pub fn var(&self, k: &str) -> &str {
        self.vars
            .get(k)
            .unwrap_or_else(|| panic!("{k} missing from scripts/vtn.sh up output"))
    }

    /// The VEN's config with the VTN's VEN credentials; reports every second.
    pub fn ven_config(&self) -> VenConfig {
        let mut cfg = VenConfig::new(
            self.var("VTN_URL"),
            self.var("VEN_CLIENT_ID"),
            self.var("VEN_CLIENT_SECRET"),
            self.var("VEN_NAME"),
        );
        cfg.report_interval = Duration::from_secs(1);
        cfg
    }

    /// The utility (openleadr-rs's business-logic client) creates a program
    /// whose events target this VTN's VEN and last `duration`.
    pub async fn utility(&self, program: &str, duration: &'static str) -> Utility {
        let program = Client::<BusinessLogic>::with_url(
            self.var("VTN_URL").parse().expect("VTN url"),
            Some(ClientCredentials::new(
                self.var("BL_CLIENT_ID").into(),
                self.var("BL_CLIENT_SECRET").into(),
            )),
        )
        .create_program(ProgramRequest::new(program))
        .await
        .expect("create program");
        Utility {
            program,
            ven_name: self.var("VEN_NAME").to_string(),
            duration,
        }
    }
}

impl Drop for Vtn {
    fn drop(&mut self) {
        if let Some(mut c) = self.restarted.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = Command::new("bash")
            .arg(repo().join("scripts/vtn.sh"))
            .arg("down")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .status();
    }
}

/// 36 emulated miners (9 of each firmware), site time [`SPEED`] x real time.
pub async fn start_site(subnet: (u8, u8), worker_prefix: &str) -> Arc<Site> {
    Site::start(SiteBench::new(worker_prefix, subnet).mixed(9).config())
        .await
        .map(Arc::new)
        .expect("site starts")
}

pub fn policy() -> PolicyConfig {
    PolicyConfig {
        max_commands_per_sec: 50,
        restore_batch: 50,
        restore_interval: Duration::from_secs(5),
        // Short dwell (site time) so the restore fits the test.
        min_on: Duration::from_secs(20),
        min_off: Duration::from_secs(20),
        ack_timeout: Duration::from_secs(20),
        verify_grace: Duration::from_secs(20),
        staleness: Staleness::NONE,
        ..PolicyConfig::default()
    }
}

/// The driver on the site's firmware APIs (no proxy), ledger at `ledger`;
/// returns after its first telemetry round.
pub async fn start_vtn_site_driver(
    site: &Site,
    ledger: &Path,
    commit_hook: Option<CommitHook>,
) -> DriverHandle {
    gridproxy_tests::bench::start_driver(
        site,
        ledger,
        policy(),
        Nothing,
        ScaledClock::new(SPEED),
        DriverConfig {
            poll_interval: Duration::from_secs(3),
            interval: Duration::from_secs(30),
            commit_hook,
            ..DriverConfig::default()
        },
    )
    .await
}

/// The utility's side: a program on the VTN and its events.
pub struct Utility {
    pub program: ProgramClient<BusinessLogic>,
    /// Every event targets this VEN.
    pub ven_name: String,
    /// How long every event lasts (ISO 8601, wall time).
    pub duration: &'static str,
}

/// A limit event just created, and the wall times from just before its
/// creation until the VEN applied it and until the site drew at most its
/// limit.
pub struct Timed {
    pub ev: EventClient<BusinessLogic>,
    pub id: String,
    pub applied: Option<Duration>,
    pub within: Option<Duration>,
}

impl Utility {
    /// Creates an IMPORT_CAPACITY_LIMIT event (kW, or `units`), from now.
    pub async fn create_limit(
        &self,
        name: &str,
        kw: f64,
        units: &str,
    ) -> Result<EventClient<BusinessLogic>, openleadr_client::Error> {
        let start = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        let req: EventRequest = serde_json::from_value(json!({
            "objectType": "EVENT",
            "programID": self.program.id().as_str(),
            "eventName": name,
            "priority": 0,
            "targets": [self.ven_name],
            "intervalPeriod": {"start": start, "duration": self.duration},
            "payloadDescriptors": [{"objectType": "EVENT_PAYLOAD_DESCRIPTOR", "payloadType": "IMPORT_CAPACITY_LIMIT", "units": units}],
            "intervals": [{"id": 0, "payloads": [{"type": "IMPORT_CAPACITY_LIMIT", "values": [kw]}]}],
        }))
        .expect("event request");
        self.program.create_event(req).await
    }

    /// Creates a kW limit event (panics with `what` if the VTN refuses it)
    /// and times the VEN applying it and the site meeting it, each waited for
    /// up to `limit`.
    pub async fn create_timed(
        &self,
        name: &str,
        kw: f64,
        what: &str,
        ven: &VenHandle,
        site: &Site,
        limit: Duration,
    ) -> Timed {
        let t = Instant::now();
        let ev = self
            .create_limit(name, kw, "KW")
            .await
            .unwrap_or_else(|e| panic!("{what}: {e:?}"));
        let id = ev.id().to_string();
        let applied = ven
            .wait_for(limit, |s| s.applied.contains_key(&id))
            .await
            .map(|_| t.elapsed());
        let within = time_to_limit(site, kw, t, limit).await;
        Timed {
            ev,
            id,
            applied,
            within,
        }
    }
}

/// `share` of `base_kw`, rounded to 0.1 kW: an event's limit.
pub fn share_kw(base_kw: f64, share: f64) -> f64 {
    (share * base_kw * 10.0).round() / 10.0
}

/// Whether the VEN has sent `n` reports in all within 10 s.
pub async fn reports_reach(ven: &VenHandle, n: u64) -> bool {
    ven.wait_for(Duration::from_secs(10), |s| s.reports_sent >= n)
        .await
        .is_some()
}

/// The utility cancels an event by cutting its window short: it ends now.
pub async fn cut_short(ev: &mut EventClient<BusinessLogic>) {
    let period = ev
        .content_mut()
        .interval_period
        .as_mut()
        .expect("event has an intervalPeriod");
    let ran = (chrono::Utc::now() - period.start).num_seconds().max(0) + 1;
    period.duration = Some(format!("PT{ran}S").parse().expect("ISO 8601 duration"));
    ev.update().await.expect("cut the event short");
}

/// Wall time until the site draws at most `kw` (+0.5 %), polled every 50 ms.
pub async fn time_to_limit(
    site: &Site,
    kw: f64,
    since: Instant,
    limit: Duration,
) -> Option<Duration> {
    while since.elapsed() < limit {
        if site_kw(site) <= kw * 1.005 {
            return Some(since.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

/// Wall time until the site draws at least 98 % of `base_kw` again, polled
/// every 100 ms for up to 30 s.
pub async fn time_to_restore(site: &Site, base_kw: f64, since: Instant) -> Option<Duration> {
    while since.elapsed() < Duration::from_secs(30) {
        if site_kw(site) >= 0.98 * base_kw {
            return Some(since.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}
