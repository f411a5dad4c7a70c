//! Chaos: the real openleadr-rs VTN and its PostgreSQL are SIGKILLed in the
//! middle of a DR event and restarted on the same database.
//!
//! Set-up as in `grid_openadr.rs` (the VTN from `scripts/vtn.sh up`, the
//! test as the utility through `openleadr_client`, gridproxy's VEN feeding
//! the curtailment driver of a 36-miner emulated site, site time 10x real
//! time; the shared pieces are in `vtn_support`, extended here with kill and
//! restart).
//!
//! 1. A capacity limit at 60 % of the site's draw is met.
//! 2. The VTN and every PostgreSQL process are SIGKILLed. For the outage
//!    (12 s wall, 2 min site time) the site stays within the limit and the
//!    engine issues no restoring command; the VEN reports "VTN unreachable"
//!    and retries with a growing backoff (read back from its log); nothing
//!    panics.
//! 3. PostgreSQL restarts (crash recovery) and the VTN restarts on the same
//!    database: the event is still there, the VEN logs in again (time from
//!    restart to its first sync measured), the site is still within the
//!    limit, and a lower limit created after the restart is met within 5 s.
//!    Then both events are cut short and the fleet comes back.
//! 4. The ledger: SQLite integrity check, command ids 1..n without a gap,
//!    every command the driver reported committed present and answered, DR
//!    event 1 ended only by the utility's cancel; RSS of this process (site,
//!    driver and VEN) bounded.
//!
//! Needs `scripts/vtn.sh install` (fails, with that instruction, without it).

use std::ffi::OsString;
use std::net::SocketAddr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::vtn_support::*;
use gridproxy_curtail as curtail;
use gridproxy_grid::openadr::{spawn_ven, VenHandle};
use gridproxy_tests::bench::*;
use gridproxy_tests::{http_get, rss_kib, LogCapture};
use openleadr_client::Filter;
use tokio::sync::watch;

use curtail::driver::{Audit, CommitHook, Record};
use curtail::ledger::Ledger;

const TEST_LIMIT: Duration = Duration::from_secs(180);
/// Wall time from creating an event on the VTN to the site within its limit.
const DEADLINE_REAL: Duration = Duration::from_secs(5);
/// How long the VTN stays dead (wall).
const OUTAGE_REAL: Duration = Duration::from_secs(12);
/// The VEN's longest wait between reconnect attempts.
const BACKOFF_MAX: Duration = Duration::from_secs(4);

/// `(state, parent pid)` of a process, `None` once it is gone.
fn proc_stat(pid: u32) -> Option<(char, u32)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) state ppid ...": comm may hold spaces and parentheses.
    let rest = &s[s.rfind(')')? + 1..];
    let mut f = rest.split_whitespace();
    let state = f.next()?.chars().next()?;
    let ppid = f.next()?.parse().ok()?;
    Some((state, ppid))
}

/// Whether `pid` is gone (or a zombie, which holds no socket or memory).
fn dead(pid: u32) -> bool {
    proc_stat(pid).is_none_or(|(state, _)| state == 'Z')
}

/// Pids whose parent is `pid` (PostgreSQL's backends and workers).
fn children_of(pid: u32) -> Vec<u32> {
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&p| proc_stat(p).is_some_and(|(_, ppid)| ppid == pid))
        .collect()
}

fn sigkill(pid: u32) {
    // A PostgreSQL backend may already be gone (its client, the VTN, died).
    let _ = Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .stderr(Stdio::null())
        .status();
}

fn read_pid(path: &Path) -> u32 {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| s.lines().next()?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no pid in {}", path.display()))
}

/// What a kill took down, and what a restart needs.
struct Killed {
    vtn_pid: u32,
    pg_pids: Vec<u32>,
    /// The killed VTN's environment. `scripts/vtn.sh up` keeps the
    /// database URL (with its throw-away password) and the token-signing
    /// secret nowhere else; reusing them restarts the VTN on the same
    /// database with the same tokens valid.
    vtn_env: Vec<(OsString, OsString)>,
}

/// The VTN killed and restarted by the test.
impl Vtn {
    fn addr(&self) -> SocketAddr {
        let port = &self.env[0].1;
        format!("127.0.0.1:{port}").parse().expect("VTN address")
    }

    fn pg_data(&self) -> PathBuf {
        self.run_dir.join("pg/data")
    }

    /// SIGKILL the VTN, the postmaster and every PostgreSQL child at once
    /// (a crash: no shutdown checkpoint); returns once all are gone.
    async fn kill9(&mut self) -> Killed {
        let vtn_pid = read_pid(&self.run_dir.join("vtn.pid"));
        let pg_pid = read_pid(&self.run_dir.join("pg.pid"));
        let environ = std::fs::read(format!("/proc/{vtn_pid}/environ")).expect("VTN environment");
        let vtn_env = environ
            .split(|b| *b == 0)
            .filter_map(|kv| {
                let i = kv.iter().position(|b| *b == b'=')?;
                Some((
                    std::ffi::OsStr::from_bytes(&kv[..i]).to_os_string(),
                    std::ffi::OsStr::from_bytes(&kv[i + 1..]).to_os_string(),
                ))
            })
            .collect::<Vec<_>>();
        assert!(
            vtn_env.iter().any(|(k, _)| k == "DATABASE_URL"),
            "the VTN's environment has no DATABASE_URL"
        );
        // Children first in the list, read before the kill re-parents them.
        let mut pg_pids = children_of(pg_pid);
        pg_pids.push(pg_pid);
        sigkill(vtn_pid);
        for &p in &pg_pids {
            sigkill(p);
        }
        let t = Instant::now();
        while !(dead(vtn_pid) && pg_pids.iter().all(|&p| dead(p))) {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "VTN/PostgreSQL still alive 10 s after SIGKILL"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Killed {
            vtn_pid,
            pg_pids,
            vtn_env,
        }
    }

    /// Start PostgreSQL again on the same data directory (crash recovery).
    fn restart_pg(&self) {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .expect("PostgreSQL installed")
            .filter_map(|e| Some(e.ok()?.path().join("bin")))
            .filter(|b| b.join("pg_ctl").is_file())
            .max()
            .expect("pg_ctl");
        let root = Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| o.stdout.starts_with(b"0\n"));
        let data = self.pg_data();
        let log = self.run_dir.join("pg/postgres.log");
        let mut cmd = if root {
            // As in scripts/vtn.sh: postgres refuses to run as root.
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(bin.join("pg_ctl"));
            c
        } else {
            Command::new(bin.join("pg_ctl"))
        };
        let out = cmd
            .arg("-D")
            .arg(&data)
            .arg("-l")
            .arg(&log)
            .args(["-w", "-t", "60", "start"])
            .stdin(Stdio::null())
            .output()
            .expect("run pg_ctl start");
        assert!(
            out.status.success(),
            "pg_ctl start failed: {}{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        // `scripts/vtn.sh down` stops what pg.pid names.
        let pid = read_pid(&data.join("postmaster.pid"));
        std::fs::write(self.run_dir.join("pg.pid"), format!("{pid}\n")).expect("write pg.pid");
    }

    /// Start the VTN again with the killed one's environment (same port,
    /// database and signing key); returns once `/health` answers.
    async fn restart_vtn(&mut self, env: &[(OsString, OsString)]) -> Duration {
        let t = Instant::now();
        let log = std::fs::File::create(self.run_dir.join("vtn-restarted.log")).expect("log");
        let child = Command::new(vtn_bin())
            .env_clear()
            .envs(env.iter().map(|(k, v)| (k, v)))
            .current_dir(&self.run_dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("restart the VTN");
        std::fs::write(self.run_dir.join("vtn.pid"), format!("{}\n", child.id()))
            .expect("write vtn.pid");
        self.restarted = Some(child);
        loop {
            if http_get(self.addr(), "/health").await.is_ok() {
                return t.elapsed();
            }
            if let Some(Ok(Some(st))) = self.restarted.as_mut().map(|c| c.try_wait()) {
                panic!(
                    "restarted VTN exited ({st}):\n{}",
                    std::fs::read_to_string(self.run_dir.join("vtn-restarted.log"))
                        .unwrap_or_default()
                );
            }
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "restarted VTN not healthy after 30 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// A committed command, as the driver's commit hook saw it.
struct Committed {
    at: Instant,
    id: u64,
    curtail: bool,
}

/// A commit hook recording every committed command into `committed`.
fn record_commits(committed: Arc<Mutex<Vec<Committed>>>) -> CommitHook {
    Arc::new(move |r: &Record| {
        if let Record::Commands(cmds) = r {
            let at = Instant::now();
            committed
                .lock()
                .unwrap()
                .extend(cmds.iter().map(|c| Committed {
                    at,
                    id: c.id.0,
                    curtail: c.curtail,
                }));
        }
    })
}

/// Events last two hours (wall time: 12 min of the engine's 10x clock, well
/// past the test).
const EVENT_DURATION: &str = "PT2H";

/// "retrying in 2s" -> 2 s.
fn retry_delay(line: &str) -> Option<Duration> {
    let s = line.split("retrying in ").nth(1)?.trim();
    if let Some(ms) = s.strip_suffix("ms") {
        return ms
            .parse::<f64>()
            .ok()
            .map(|v| Duration::from_secs_f64(v / 1000.0));
    }
    s.strip_suffix('s')?
        .parse::<f64>()
        .ok()
        .map(Duration::from_secs_f64)
}

/// Highest site draw sampled in `[from, to]`, kW.
fn max_kw(samples: &Mutex<Vec<(Instant, f64)>>, from: Instant, to: Instant) -> f64 {
    samples
        .lock()
        .unwrap()
        .iter()
        .filter(|(t, _)| *t >= from && *t <= to)
        .map(|(_, kw)| *kw)
        .fold(0.0, f64::max)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn site_holds_the_event_through_a_vtn_and_database_crash() {
    let _gate = gridproxy_tests::module_gate(module_path!());
    serially(TEST_LIMIT, run()).await;
}

async fn run() {
    // The VEN's log lines (`gridproxy_grid::openadr` at info, and RUST_LOG), for the
    // checks on its retries; the process's one subscriber is shared with every test.
    let logs = LogCapture::start();
    let t_test = Instant::now();
    let dir = temp_dir("chaos-vtn");
    let mut vtn = Vtn::up(&dir.join("vtn"));
    let url = vtn.var("VTN_URL").to_string();
    println!(
        "chaos_vtn: VTN up at {url} after {:.1} s",
        t_test.elapsed().as_secs_f64()
    );

    // --- the site, the driver, the site meter ---
    let site = start_site((74, 0), "cvtn").await;
    let ledger = dir.join("ledger.db");
    let committed: Arc<Mutex<Vec<Committed>>> = Arc::default();
    let h = start_vtn_site_driver(&site, &ledger, Some(record_commits(committed.clone()))).await;
    let base_kw = site_kw(&site);
    let (kw_tx, kw_rx) = watch::channel(base_kw);
    let samples: Arc<Mutex<Vec<(Instant, f64)>>> = Arc::default();
    let meter = {
        let site = site.clone();
        let samples = samples.clone();
        tokio::spawn(async move {
            loop {
                let kw = site_kw(&site);
                samples.lock().unwrap().push((Instant::now(), kw));
                if kw_tx.send(kw).is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };

    // --- the VEN ---
    let mut cfg = vtn.ven_config();
    cfg.backoff_max = BACKOFF_MAX;
    cfg.request_timeout = Duration::from_secs(3);
    let ven: VenHandle = spawn_ven(cfg, h.signals(), kw_rx.clone()).expect("VEN starts");
    assert!(
        ven.wait_for(Duration::from_secs(15), |s| s.connected && s.websocket)
            .await
            .is_some(),
        "VEN connected with websocket: {:?}",
        ven.status()
    );

    // --- the utility ---
    let utility = vtn.utility("gridproxy-chaos", EVENT_DURATION).await;

    // 1. A capacity limit at 60 % of the site's draw.
    let target1 = share_kw(base_kw, 0.6);
    let t0 = Instant::now();
    let ev1 = utility
        .create_limit("cap-60", target1, "KW")
        .await
        .expect("create event 1");
    let id1 = ev1.id().to_string();
    let within1 = time_to_limit(&site, target1, t0, DEADLINE_REAL).await;
    println!(
        "chaos_vtn: site {base_kw:.1} kW, event 1 limit {target1:.1} kW: within after {within1:?} \
         (wall, deadline {DEADLINE_REAL:?})"
    );
    assert!(
        within1.is_some(),
        "site at {:.1} kW {DEADLINE_REAL:?} after event 1 (limit {target1:.1}); VEN {:?}",
        site_kw(&site),
        ven.status()
    );
    assert!(
        ven.wait_for(Duration::from_secs(10), |s| s.applied.contains_key(&id1)
            && s.reports_sent >= 2)
            .await
            .is_some(),
        "VEN applied event 1 and reported: {:?}",
        ven.status()
    );
    // Settled: the engine's dwell passes, the site holds the limit.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let asleep_before = site.miners().iter().filter(|m| asleep(m)).count();
    let rss0 = rss_kib();

    // 2. SIGKILL the VTN and PostgreSQL mid-event.
    let before = ven.status();
    let engine_kill = h.status().now;
    let t_kill = Instant::now();
    let killed = vtn.kill9().await;
    println!(
        "chaos_vtn: SIGKILLed VTN pid {} and {} PostgreSQL processes ({:?}) with the site at \
         {:.1} kW ({asleep_before} of {} miners asleep)",
        killed.vtn_pid,
        killed.pg_pids.len(),
        killed.pg_pids,
        site_kw(&site),
        site.len()
    );
    let noticed = ven
        .wait_for(Duration::from_secs(5), |s| {
            !s.connected && s.last_error.is_some()
        })
        .await
        .map(|s| (t_kill.elapsed(), s));
    let Some((noticed_after, s)) = noticed else {
        panic!("VEN did not notice the dead VTN: {:?}", ven.status());
    };
    let err = s.last_error.clone().unwrap_or_default();
    println!("chaos_vtn: VEN error after {noticed_after:?}: {err}");
    assert!(
        err.contains("VTN unreachable at http://127.0.0.1:"),
        "unclear error: {err}"
    );
    assert!(!s.websocket);
    // The outage: hold it, watching the site.
    while t_kill.elapsed() < OUTAGE_REAL {
        assert!(!h.is_finished(), "driver died during the outage");
        assert!(
            !ven.status().connected,
            "VEN claims a connection to a dead VTN"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let t_outage_end = Instant::now();
    let outage_max = max_kw(&samples, t_kill, t_outage_end);
    let asleep_during = site.miners().iter().filter(|m| asleep(m)).count();
    let restoring_in_outage = committed
        .lock()
        .unwrap()
        .iter()
        .filter(|c| c.at >= t_kill && !c.curtail)
        .count();
    let st = ven.status();
    println!(
        "chaos_vtn: outage {:.1} s wall ({:.0} s site): site max {outage_max:.2} kW (limit \
         {target1:.1}), {asleep_during} miners asleep, {restoring_in_outage} restoring commands; \
         VEN still holds {:?}",
        OUTAGE_REAL.as_secs_f64(),
        OUTAGE_REAL.as_secs_f64() * SPEED,
        st.applied.keys().collect::<Vec<_>>()
    );
    assert!(
        outage_max <= target1 * 1.005,
        "site went to {outage_max:.2} kW (limit {target1:.1}) while the VTN was down"
    );
    assert_eq!(
        restoring_in_outage, 0,
        "the engine restored miners because the VTN was unreachable"
    );
    assert!(
        asleep_during >= asleep_before,
        "miners woke during the outage: {asleep_before} asleep before, {asleep_during} after"
    );
    assert!(st.applied.contains_key(&id1), "VEN forgot event 1: {st:?}");
    assert_eq!(st.signals_sent, before.signals_sent, "VEN sent signals");
    // Its log: a clear error per attempt, and a growing wait between them.
    let outage_log: Vec<String> = logs
        .lines()
        .into_iter()
        .filter(|l| l.contains("openadr:") && l.contains("retrying in"))
        .collect();
    let delays: Vec<Duration> = outage_log.iter().filter_map(|l| retry_delay(l)).collect();
    for l in outage_log.iter().take(2) {
        println!("chaos_vtn: VEN log: {}", l.trim());
    }
    println!("chaos_vtn: VEN retry delays during the outage: {delays:?}");
    assert!(
        outage_log
            .iter()
            .all(|l| l.contains("WARN") && l.contains(&format!("VTN unreachable at {url}"))),
        "VEN log lines: {outage_log:#?}"
    );
    assert!(
        delays.len() >= 3,
        "VEN retried {} times in {OUTAGE_REAL:?}: {outage_log:#?}",
        delays.len()
    );
    assert_eq!(delays[0], Duration::from_secs(1));
    assert!(
        delays.windows(2).all(|w| w[1] >= w[0]) && delays.iter().all(|d| *d <= BACKOFF_MAX),
        "backoff not growing up to {BACKOFF_MAX:?}: {delays:?}"
    );
    assert!(
        delays.contains(&BACKOFF_MAX),
        "backoff never reached {BACKOFF_MAX:?}: {delays:?}"
    );

    // 3. Restart PostgreSQL, then the VTN, on the same database.
    let t_pg = Instant::now();
    vtn.restart_pg();
    let pg_restart = t_pg.elapsed();
    let pg_log = std::fs::read_to_string(vtn.run_dir.join("pg/postgres.log")).unwrap_or_default();
    assert!(
        pg_log.contains("database system was not properly shut down"),
        "PostgreSQL did not go through crash recovery:\n{pg_log}"
    );
    let syncs_at_restart = ven.status().syncs;
    let t_restart = Instant::now();
    let healthy = vtn.restart_vtn(&killed.vtn_env).await;
    let synced = ven
        .wait_for(Duration::from_secs(30), |s| {
            s.connected && s.syncs > syncs_at_restart
        })
        .await
        .map(|_| t_restart.elapsed());
    let ws_up = ven
        .wait_for(Duration::from_secs(30), |s| s.websocket)
        .await
        .map(|_| t_restart.elapsed());
    println!(
        "chaos_vtn: PostgreSQL restarted (crash recovery) in {pg_restart:?}; VTN healthy \
         {healthy:?} after its restart; VEN's first sync {synced:?} and websocket {ws_up:?} \
         after the VTN restart ({:.1} s after the kill)",
        t_kill.elapsed().as_secs_f64()
    );
    let synced = synced.unwrap_or_else(|| panic!("VEN did not reconnect: {:?}", ven.status()));
    assert!(
        synced <= healthy + BACKOFF_MAX + Duration::from_secs(3),
        "VEN took {synced:?} to sync after the restart (backoff max {BACKOFF_MAX:?})"
    );
    assert!(
        ws_up.is_some(),
        "websocket after restart: {:?}",
        ven.status()
    );
    // The event survived in the database, and the VEN did not re-send it
    // (unchanged) nor end it.
    let events = utility
        .program
        .get_event_list(Filter::none())
        .await
        .expect("list events after the restart");
    assert!(
        events.iter().any(|e| e.id().as_str() == id1),
        "event 1 lost by the VTN restart"
    );
    let st = ven.status();
    assert!(st.applied.contains_key(&id1));
    assert_eq!(st.signals_sent, before.signals_sent);
    // Reports resume (the report object in the database is updated).
    let reports_at = st.reports_sent;
    assert!(
        reports_reach(&ven, reports_at + 2).await,
        "reports after the restart: {:?}",
        ven.status()
    );
    let reports = ev1.get_report_list(None).await.expect("list reports");
    assert_eq!(reports.len(), 1, "one report for event 1, updated in place");
    let after_restart_max = max_kw(&samples, t_kill, Instant::now());
    assert!(
        after_restart_max <= target1 * 1.005,
        "site went to {after_restart_max:.2} kW (limit {target1:.1}) around the restart"
    );

    // A lower limit created after the restart.
    let target2 = share_kw(base_kw, 0.4);
    let notifications = ven.status().notifications;
    let engine_ev2 = h.status().now;
    let t2 = Instant::now();
    let Timed {
        ev: ev2,
        id: id2,
        applied: applied2,
        within: within2,
    } = utility
        .create_timed(
            "cap-40",
            target2,
            "create event 2 after the restart",
            &ven,
            &site,
            DEADLINE_REAL,
        )
        .await;
    println!(
        "chaos_vtn: event 2 (limit {target2:.1} kW) after the restart: VEN applied after \
         {applied2:?}, site within after {within2:?} (wall), {} notification(s)",
        ven.status().notifications - notifications
    );
    assert!(applied2.is_some(), "VEN status: {:?}", ven.status());
    assert!(
        within2.is_some(),
        "site at {:.1} kW, limit {target2:.1}",
        site_kw(&site)
    );
    assert!(
        ven.status().notifications > notifications,
        "event 2 did not come by websocket"
    );
    let restoring_before_ev2 = committed
        .lock()
        .unwrap()
        .iter()
        .filter(|c| c.at >= t_kill && c.at < t2 && !c.curtail)
        .count();
    assert_eq!(
        restoring_before_ev2, 0,
        "restoring commands between the kill and event 2"
    );

    // Both events cut short: the fleet comes back.
    let engine_cancel = h.status().now;
    let t3 = Instant::now();
    for mut ev in [ev1, ev2] {
        cut_short(&mut ev).await;
    }
    let restored = time_to_restore(&site, base_kw, t3).await;
    println!(
        "chaos_vtn: both events cut short: site back to {:.1} kW after {restored:?} (wall)",
        site_kw(&site)
    );
    assert!(
        restored.is_some(),
        "site at {:.1} of {base_kw:.1} kW",
        site_kw(&site)
    );

    // 4. Shut down; the ledger and memory.
    let vst = ven.status();
    ven.stop().await;
    meter.abort();
    let _ = h
        .wait_for(Duration::from_secs(10), |s| s.in_flight == 0)
        .await;
    let report = h.shutdown().await.expect("driver stops cleanly");
    assert_eq!(report.unanswered, 0);
    assert_eq!(report.status.failed, 0, "{:?}", report.status);
    Ledger::open(&ledger)
        .expect("ledger opens")
        .integrity_check()
        .expect("ledger integrity");
    let audit = Audit::read(&ledger).expect("ledger readable");
    let ids: Vec<u64> = audit.commands.iter().map(|c| c.id.0).collect();
    assert!(
        ids.iter().enumerate().all(|(i, id)| *id == i as u64 + 1),
        "command ids with gaps: {ids:?}"
    );
    let hooked: Vec<u64> = committed.lock().unwrap().iter().map(|c| c.id).collect();
    assert_eq!(hooked.len(), ids.len(), "committed vs in the ledger");
    assert!(hooked.iter().all(|id| ids.contains(id)));
    assert_eq!(ids.len() as u64, report.status.issued);
    let ok = every_command_answered(&audit);
    let states = |id: &str| -> Vec<(curtail::time::Timestamp, String)> {
        audit
            .events
            .iter()
            .filter(|e| e.event_id == id)
            .map(|e| (e.at, e.state.clone()))
            .collect()
    };
    let (s1, s2) = (states(&id1), states(&id2));
    println!(
        "chaos_vtn: ledger: {} commands ({ok} OK, ids 1..={} without a gap), {} signals; event \
         1 states {:?}, event 2 states {:?}",
        ids.len(),
        ids.len(),
        audit.signals,
        s1.iter().map(|s| &s.1).collect::<Vec<_>>(),
        s2.iter().map(|s| &s.1).collect::<Vec<_>>()
    );
    assert!(s1.iter().any(|(_, st)| st == "active"), "{s1:?}");
    assert!(
        s1.iter()
            .filter(|(_, st)| st == "ended")
            .all(|(at, _)| *at >= engine_cancel),
        "event 1 ended before the cancel (kill at {engine_kill}): {s1:?}"
    );
    assert!(s1.iter().any(|(_, st)| st == "ended"), "{s1:?}");
    assert!(
        s2.iter().all(|(at, _)| *at >= engine_ev2),
        "event 2 states before it was created: {s2:?}"
    );
    let rss1 = rss_kib();
    println!(
        "chaos_vtn: RSS {} MiB before the kill, {} MiB at the end (+{} KiB); VEN: {} syncs, {} \
         notifications, {} signals, {} reports; total {:.1} s",
        rss0 / 1024,
        rss1 / 1024,
        rss1.saturating_sub(rss0),
        vst.syncs,
        vst.notifications,
        vst.signals_sent,
        vst.reports_sent,
        t_test.elapsed().as_secs_f64()
    );
    assert!(
        rss1 < rss0 + 32 * 1024,
        "RSS grew from {rss0} KiB to {rss1} KiB"
    );
    site.stop();
    drop(vtn);
    let _ = std::fs::remove_dir_all(dir);
}
