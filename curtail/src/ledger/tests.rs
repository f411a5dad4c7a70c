use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Command as Proc, Stdio};
use std::time::Duration;

use super::*;
use crate::fleet::{ControlSurface, Fleet, MinerSpec};
use crate::policy::{Engine, PolicyConfig, PolicyEvent, Staleness};
use crate::signal::{DrEvent, DrTarget, PriceSignal};

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let p = std::env::temp_dir().join(format!(
            "gridproxy-ledger-{name}-{}-{nanos}",
            std::process::id()
        ));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    fn db(&self) -> PathBuf {
        self.0.join("ledger.sqlite")
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn cmd(id: u64, miner: u64, action: Action, curtail: bool) -> Command {
    Command {
        id: CommandId(id),
        miner: MinerId(miner),
        surface: ControlSurface::BraiinsOs,
        action,
        issued_at: Timestamp::from_secs(1000 + id),
        curtail,
    }
}

fn event(id: &str, start: u64, end: Option<u64>) -> DrEvent {
    DrEvent {
        id: id.into(),
        target: DrTarget::ShedKw(100.0),
        start: Timestamp::from_secs(start),
        end: end.map(Timestamp::from_secs),
        issued_at: Timestamp::from_secs(start - 60),
    }
}

#[test]
fn write_reopen_recover() {
    let dir = TempDir::new("recover");
    {
        let mut l = Ledger::open(dir.db()).unwrap();
        l.record_signal(
            Timestamp::from_secs(999),
            &Signal::Price(PriceSignal {
                at: Timestamp::from_secs(998),
                usd_per_mwh: 120.0,
                forecast: vec![],
            }),
        )
        .unwrap();
        l.record_commands(&[
            cmd(1, 1, Action::Sleep, true),
            cmd(2, 2, Action::Sleep, true),
            cmd(3, 3, Action::Park, true),
        ])
        .unwrap();
        l.record_command(&cmd(4, 2, Action::Wake, false)).unwrap();
        l.record_command(&cmd(5, 4, Action::SetPowerTarget(2100), true))
            .unwrap();
        l.record_command(&cmd(6, 5, Action::SetPowerTarget(3500), false))
            .unwrap();
        l.record_ack(Timestamp::from_secs(1002), CommandId(1), &Ack::Ok)
            .unwrap();
        l.record_policy_event(&PolicyEvent::Verified {
            command: CommandId(1),
            miner: MinerId(1),
            at: Timestamp::from_secs(1005),
        })
        .unwrap();
        let e1 = event("e1", 2000, Some(9000));
        let e2 = event("e2", 2000, Some(3000));
        for (e, st) in [
            (&e1, DrEventState::Scheduled),
            (&e2, DrEventState::Scheduled),
            (&e1, DrEventState::Active),
            (&e2, DrEventState::Active),
            (&e2, DrEventState::Ended),
        ] {
            l.record_event(Timestamp::from_secs(1990), e, st, 500.0)
                .unwrap();
        }
        l.record_interval(&Interval {
            start: Timestamp::from_secs(0),
            end: Timestamp::from_secs(300),
            fleet_kw: 420.5,
            site_kw: Some(900.0),
            miners: 120,
        })
        .unwrap();
    }
    let (mut l, r) = Ledger::open_and_recover(dir.db()).unwrap();
    l.integrity_check().unwrap();
    assert_eq!(r.next_command_id, 7);
    assert_eq!(
        r.curtailed,
        vec![
            (MinerId(1), Action::Sleep, Timestamp::from_secs(1001)),
            (MinerId(3), Action::Park, Timestamp::from_secs(1003)),
            (
                MinerId(4),
                Action::SetPowerTarget(2100),
                Timestamp::from_secs(1005)
            ),
        ],
        "miner 2 was woken and miner 5 restored to nominal: not curtailed"
    );
    assert_eq!(r.events.len(), 1);
    assert_eq!(r.events[0].0.id, "e1");
    assert_eq!(r.events[0].1, 500.0);
    let counts: std::collections::HashMap<_, _> = l.counts().unwrap().into_iter().collect();
    assert_eq!(counts["commands"], 6);
    assert_eq!(counts["acks"], 2);
    assert_eq!(counts["events"], 5);
    assert_eq!(counts["signals"], 1);
    assert_eq!(
        l.command(CommandId(5)).unwrap().unwrap().action,
        Action::SetPowerTarget(2100)
    );
    let iv = l
        .intervals(Timestamp::from_secs(100), Timestamp::from_secs(200))
        .unwrap();
    assert_eq!(iv.len(), 1);
    assert_eq!(iv[0].fleet_kw, 420.5);
}

#[test]
fn records_are_append_only() {
    let mut l = Ledger::open_in_memory().unwrap();
    l.record_command(&cmd(1, 1, Action::Sleep, true)).unwrap();
    assert!(l
        .sqlite()
        .execute("UPDATE commands SET action = 'wake'", [])
        .is_err());
    assert!(l.sqlite().execute("DELETE FROM commands", []).is_err());
    // A duplicate command id is refused, not overwritten.
    assert!(matches!(
        l.record_command(&cmd(1, 9, Action::Wake, false)),
        Err(LedgerError::Sqlite(_))
    ));
    assert_eq!(
        l.command(CommandId(1)).unwrap().unwrap().action,
        Action::Sleep
    );
    // A failed batch leaves nothing behind.
    let mut l = l;
    assert!(l
        .record_commands(&[
            cmd(2, 2, Action::Sleep, true),
            cmd(1, 3, Action::Sleep, true)
        ])
        .is_err());
    assert!(l.command(CommandId(2)).unwrap().is_none());
}

#[test]
fn pragmas_are_wal_and_full() {
    let dir = TempDir::new("pragmas");
    let l = Ledger::open(dir.db()).unwrap();
    let mode: String = l
        .sqlite()
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .unwrap();
    let sync: i64 = l
        .sqlite()
        .query_row("PRAGMA synchronous", [], |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
    assert_eq!(sync, 2, "FULL");
}

const CHILD_ENV: &str = "GRIDPROXY_LEDGER_KILL_CHILD_DB";

/// Child half of `survives_sigkill_mid_write`: runs only when re-executed
/// with `CHILD_ENV` set. Writes commands as fast as it can, printing each id
/// after its commit returns, until killed (or a safety bound).
#[test]
fn sigkill_child_writer() {
    let Ok(path) = std::env::var(CHILD_ENV) else {
        return;
    };
    let mut l = Ledger::open(path).unwrap();
    let out = std::io::stdout();
    let start = std::time::Instant::now();
    let mut id = 1u64;
    while id < 1_000_000 && start.elapsed() < Duration::from_secs(60) {
        if matches!(id % 3, 0) {
            // A batch transaction of 5.
            let batch: Vec<_> = (id..id + 5)
                .map(|i| cmd(i, i % 100, Action::Sleep, true))
                .collect();
            l.record_commands(&batch).unwrap();
            let mut o = out.lock();
            for c in &batch {
                writeln!(o, "COMMITTED {}", c.id.0).unwrap();
            }
            o.flush().unwrap();
            id += 5;
        } else {
            l.record_command(&cmd(id, id % 100, Action::Sleep, true))
                .unwrap();
            l.record_ack(Timestamp::from_secs(id), CommandId(id), &Ack::Ok)
                .unwrap();
            let mut o = out.lock();
            writeln!(o, "COMMITTED {id}").unwrap();
            o.flush().unwrap();
            id += 1;
        }
    }
}

#[test]
fn survives_sigkill_mid_write() {
    let dir = TempDir::new("sigkill");
    let exe = std::env::current_exe().unwrap();
    let mut child = Proc::new(exe)
        .args([
            "--exact",
            "ledger::tests::sigkill_child_writer",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, dir.db())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut committed = Vec::new();
    for line in BufReader::new(stdout).lines() {
        let line = line.unwrap();
        if let Some(id) = line.strip_prefix("COMMITTED ") {
            committed.push(id.parse::<u64>().unwrap());
            if committed.len() >= 400 {
                break;
            }
        }
    }
    // Child::kill sends SIGKILL on Unix: no destructor, no clean close.
    child.kill().unwrap();
    let status = child.wait().unwrap();
    assert!(
        !status.success(),
        "child must have been killed, got {status:?}"
    );
    assert!(
        committed.len() >= 400,
        "child wrote only {}",
        committed.len()
    );

    let mut l = Ledger::open(dir.db()).unwrap();
    l.integrity_check().unwrap();
    for &id in &committed {
        assert!(
            l.command(CommandId(id)).unwrap().is_some(),
            "command {id} was reported committed but is missing"
        );
    }
    let r = l.recover().unwrap();
    assert!(r.next_command_id > *committed.iter().max().unwrap());
    // It still takes writes.
    l.record_command(&cmd(r.next_command_id, 1, Action::Wake, false))
        .unwrap();
}

fn small_fleet(n: u64) -> Fleet {
    Fleet::from_specs((0..n).map(|i| {
        MinerSpec::new(
            MinerId(i),
            "S19",
            100.0,
            3000.0 + (i as f64) * 10.0,
            ControlSurface::LuxOs,
        )
    }))
    .unwrap()
}

/// Engine → ledger → crash → ledger → engine: the restarted engine sends no
/// wake for curtailed miners, even with no signal and a keep-running safe
/// state.
#[test]
fn restart_does_not_wake_curtailed_miners() {
    let dir = TempDir::new("restart");
    let cfg = PolicyConfig {
        staleness: Staleness::NONE,
        ..PolicyConfig::default()
    };
    let t0 = Timestamp::from_secs(1_700_000_000);
    let curtailed: Vec<MinerId>;
    {
        let mut l = Ledger::open(dir.db()).unwrap();
        let mut e = Engine::new(cfg.clone(), small_fleet(20), t0).unwrap();
        let ev = DrEvent {
            id: "ev-1".into(),
            target: DrTarget::LimitKw(30.0),
            start: t0,
            end: Some(t0 + Duration::from_secs(3600)),
            issued_at: t0,
        };
        let sig = Signal::DrEvent(ev);
        l.record_signal(t0, &sig).unwrap();
        e.handle_signal(t0, sig).unwrap();
        let cmds = e.poll_actions(t0);
        assert!(!cmds.is_empty());
        for c in &cmds {
            l.record_command(c).unwrap();
        }
        while let Some(ev) = e.poll_event() {
            l.record_policy_event(&ev).unwrap();
        }
        curtailed = cmds.iter().map(|c| c.miner).collect();
        // crash: nothing else recorded, engine dropped
    }
    let mut l = Ledger::open(dir.db()).unwrap();
    let resume = l.recover().unwrap();
    assert_eq!(resume.events.len(), 1);
    let t1 = t0 + Duration::from_secs(20);
    let mut e = Engine::new(cfg, small_fleet(20), t1).unwrap();
    e.resume(t1, resume).unwrap();
    for m in &curtailed {
        assert_eq!(e.is_curtail_target(*m), Some(true), "{m}");
    }
    assert!(
        e.poll_actions(t1).is_empty(),
        "nothing re-sent, nothing woken"
    );
    // Event still applies; once it ends, wakes respect min-off from the recorded time.
    let end = t1 + Duration::from_secs(60);
    e.handle_signal(
        end,
        Signal::DrEnd {
            id: "ev-1".into(),
            at: end,
        },
    )
    .unwrap();
    // Only the fine-tuned miner's power target is raised; sleepers wait out
    // the min-off dwell counted from the recorded sleep.
    let early = e.poll_actions(end);
    assert!(
        early
            .iter()
            .all(|c| matches!(c.action, Action::SetPowerTarget(_))),
        "{early:?}"
    );
    let later = t0 + cfg_min_off() + Duration::from_secs(1);
    e.handle_timeout(later);
    let wakes = e.poll_actions(later);
    assert!(!wakes.is_empty());
    assert!(wakes.iter().all(|c| c.action == Action::Wake));
    assert!(
        wakes.iter().all(|c| c.id.0 > curtailed.len() as u64),
        "ids continue"
    );
}

fn cfg_min_off() -> Duration {
    PolicyConfig::default().min_off
}

/// Group commit: a batch is one transaction; a failure inside it leaves
/// none of its records, and a good batch keeps all of them in order.
#[test]
fn a_batch_commits_all_or_none() {
    let dir = TempDir::new("batch");
    let mut l = Ledger::open(dir.db()).unwrap();
    let ok = Ack::Ok;
    l.batch(|l| {
        l.record_commands(&[
            cmd(1, 1, Action::Sleep, true),
            cmd(2, 2, Action::Sleep, true),
        ])?;
        l.record_ack(Timestamp::from_secs(2000), CommandId(1), &ok)?;
        l.record_command(&cmd(3, 3, Action::Wake, false))
    })
    .unwrap();
    // Id 4 is fine, id 2 again is refused (primary key): the batch goes whole.
    let e = l.batch(|l| {
        l.record_command(&cmd(4, 4, Action::Sleep, true))?;
        l.record_command(&cmd(2, 2, Action::Sleep, true))
    });
    assert!(e.is_err(), "a duplicate id must fail the batch");
    assert!(l.command(CommandId(4)).unwrap().is_none(), "rolled back");
    for id in 1..=3 {
        assert!(
            l.command(CommandId(id)).unwrap().is_some(),
            "command {id} kept"
        );
    }
    // The ledger takes plain writes again after a rolled-back batch.
    l.record_command(&cmd(4, 4, Action::Sleep, true)).unwrap();
    drop(l);
    let mut l = Ledger::open(dir.db()).unwrap();
    l.integrity_check().unwrap();
    assert!(l.command(CommandId(4)).unwrap().is_some());
}

/// A version-1 file (before `commands.fence`) opens, gains the column, and
/// keeps its rows.
#[test]
fn a_version_1_file_gains_the_fence_column() {
    let dir = TempDir::new("v1");
    {
        let c = rusqlite::Connection::open(dir.db()).unwrap();
        c.execute_batch(
            "CREATE TABLE commands (id INTEGER PRIMARY KEY, at_ms INTEGER NOT NULL, \
             miner INTEGER NOT NULL, surface TEXT NOT NULL, action TEXT NOT NULL, \
             value INTEGER, curtail INTEGER NOT NULL);
             INSERT INTO commands VALUES (1, 1000, 7, 'braiins_os', 'sleep', NULL, 1);
             PRAGMA user_version = 1;",
        )
        .unwrap();
    }
    let mut l = Ledger::open(dir.db()).unwrap();
    let c = l.command(CommandId(1)).unwrap().unwrap();
    assert_eq!(
        (c.miner, c.action, c.fence),
        (MinerId(7), Action::Sleep, None)
    );
    l.record_command(&cmd(2, 2, Action::Wake, false)).unwrap();
    let v: i64 = l
        .sqlite()
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(v, SCHEMA_VERSION);
    drop(l);
    // And again: the migration runs once.
    let mut l = Ledger::open(dir.db()).unwrap();
    assert_eq!(l.recover().unwrap().next_command_id, 3);
}
