//! The curtailment ledger on a real PostgreSQL server (issue 19, part 1):
//! the same records as SQLite and the same readings back (audit, recovery,
//! M&V input), append-only enforced by the server, group commit all or
//! none, a server restart as a fault that heals, and `gridproxy report`
//! reading it.

use std::time::{Duration, Instant};

use gridproxy_curtail as curtail;
use gridproxy_tests::bench::temp_dir;
use gridproxy_tests::postgres::PgCluster;

use curtail::command::{Ack, Action, Command, CommandId};
use curtail::driver::Audit;
use curtail::fleet::{ControlSurface, MinerId};
use curtail::ledger::{read_mv_input, Interval, Ledger, Location};
use curtail::policy::{Decision, DrEventState, FailReason, Mode, PolicyEvent};
use curtail::signal::{DispatchSignal, DrEvent, DrTarget, PriceSignal, Signal};
use curtail::time::Timestamp;

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
        target: DrTarget::LimitKw(250.0),
        start: Timestamp::from_secs(start),
        end: end.map(Timestamp::from_secs),
        issued_at: Timestamp::from_secs(start - 60),
    }
}

/// One of every kind of record, nulls included, some in a group commit.
fn write_script(l: &mut Ledger) {
    let t = Timestamp::from_secs;
    l.record_signal(
        t(999),
        &Signal::Price(PriceSignal {
            at: t(998),
            usd_per_mwh: -12.5,
            forecast: vec![],
        }),
    )
    .unwrap();
    l.record_signal(
        t(1000),
        &Signal::Dispatch(DispatchSignal {
            at: t(1000),
            target_kw: None,
        }),
    )
    .unwrap();
    l.record_commands(&[
        cmd(1, 1, Action::Sleep, true),
        cmd(2, 2, Action::Park, true),
        cmd(3, 3, Action::SetPowerTarget(2100), true),
    ])
    .unwrap();
    l.batch(|l| {
        l.record_ack(t(1002), CommandId(1), &Ack::Ok)?;
        l.record_ack(
            t(1003),
            CommandId(2),
            &Ack::Failed("refused: 'quoted'".into()),
        )?;
        l.record_command(&cmd(4, 2, Action::Wake, false))?;
        l.record_policy_event(&PolicyEvent::Verified {
            command: CommandId(1),
            miner: MinerId(1),
            at: t(1005),
        })
    })
    .unwrap();
    l.record_policy_event(&PolicyEvent::CommandFailed {
        command: CommandId(3),
        miner: MinerId(3),
        at: t(1006),
        reason: FailReason::AckTimeout,
    })
    .unwrap();
    l.record_policy_event(&PolicyEvent::Decision(Decision {
        at: t(1001),
        mode: Mode::Dispatch,
        cap_kw: Some(250.0),
        expected_kw: 240.0,
        changes: 3,
        reason: "dispatch to 250 kW".into(),
    }))
    .unwrap();
    l.record_policy_event(&PolicyEvent::Unresponsive {
        miner: MinerId(u64::from(u32::MAX) * 1000),
        at: t(1007),
    })
    .unwrap();
    let (e1, e2) = (event("e1", 2000, Some(9000)), event("e2", 2000, None));
    for (e, st) in [
        (&e1, DrEventState::Scheduled),
        (&e2, DrEventState::Scheduled),
        (&e1, DrEventState::Active),
        (&e1, DrEventState::Ended),
    ] {
        l.record_event(t(1990), e, st, 500.0).unwrap();
    }
    for (i, site) in [(0, Some(900.0)), (1, None)] {
        l.record_interval(&Interval {
            start: t(300 * i),
            end: t(300 * (i + 1)),
            fleet_kw: 420.5 + i as f64,
            site_kw: site,
            miners: 120,
        })
        .unwrap();
    }
}

fn pg_location(pg: &PgCluster) -> Location {
    Location::parse(&pg.url())
        .unwrap()
        .with_password(Some(pg.password.clone()))
}

#[test]
fn the_postgres_ledger_keeps_and_reads_back_what_sqlite_does() {
    let pg = PgCluster::start("ledger", "ledger");
    let pg_loc = pg_location(&pg);
    let dir = temp_dir("ledger-pg");
    let sqlite = dir.join("ledger.sqlite");

    let mut a = Ledger::open(&sqlite).unwrap();
    let mut b = Ledger::connect(&pg_loc).unwrap();
    write_script(&mut a);
    write_script(&mut b);

    // Same rows, same readings.
    assert_eq!(a.counts().unwrap(), b.counts().unwrap());
    let counts = b.counts().unwrap();
    assert_eq!(
        counts.iter().find(|c| c.0 == "commands").map(|c| c.1),
        Some(4)
    );
    assert_eq!(a.recover().unwrap(), b.recover().unwrap());
    let resume = b.recover().unwrap();
    assert_eq!(resume.next_command_id, 5);
    assert_eq!(resume.curtailed.len(), 2, "miner 1 asleep, miner 3 capped");
    assert_eq!(resume.events.len(), 1, "e2 still open");
    for id in 1..=5 {
        assert_eq!(
            a.command(CommandId(id)).unwrap(),
            b.command(CommandId(id)).unwrap()
        );
    }
    let (sa, sb) = (Audit::read(&sqlite).unwrap(), Audit::read(&pg_loc).unwrap());
    assert_eq!(sa, sb);
    assert_eq!(sb.acks.len(), 4);
    assert_eq!(sb.acks[1].detail.as_deref(), Some("refused: 'quoted'"));
    assert_eq!(sb.notes[0].miner, Some(MinerId(u64::from(u32::MAX) * 1000)));
    assert_eq!(
        read_mv_input(&sqlite).unwrap(),
        read_mv_input(&pg_loc).unwrap()
    );
    b.integrity_check().unwrap();

    // Group commit is all or none: a duplicate id fails the whole batch.
    let e = b.batch(|l| {
        l.record_command(&cmd(5, 5, Action::Sleep, true))?;
        l.record_command(&cmd(2, 2, Action::Sleep, true))
    });
    assert!(e.is_err(), "a duplicate command id must fail the batch");
    assert!(b.command(CommandId(5)).unwrap().is_none(), "rolled back");
    b.record_command(&cmd(5, 5, Action::Sleep, true)).unwrap();

    // The server refuses edits, whoever asks.
    for sql in [
        "UPDATE commands SET action = 'wake'",
        "DELETE FROM acks",
        "TRUNCATE notes",
    ] {
        let e = pg.psql("ledger", sql).expect_err(sql);
        assert!(e.contains("append-only"), "{sql}: {e}");
    }

    // A second instance opening the same database finds it as left.
    drop(b);
    let mut b = Ledger::connect(&pg_loc).unwrap();
    assert_eq!(b.recover().unwrap().next_command_id, 6);

    // Credentials: a password in the URL is refused before connecting; a
    // wrong one fails without showing it.
    let with_pw = pg.url().replace("gridproxy@", "gridproxy:sekrit@");
    assert!(Location::parse(&with_pw).is_err());
    let wrong = Location::parse(&pg.url())
        .unwrap()
        .with_password(Some("wrong-password-123".into()));
    let e = Ledger::connect(&wrong).unwrap_err().to_string();
    assert!(e.contains("password"), "{e}");
    assert!(!e.contains("wrong-password-123"), "{e}");
    assert!(!format!("{wrong:?}").contains("wrong-password-123"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_postgres_restart_is_a_ledger_fault_that_heals() {
    let pg = PgCluster::start("restart", "ledger");
    let mut l = Ledger::connect(&pg_location(&pg)).unwrap();
    l.record_command(&cmd(1, 1, Action::Sleep, true)).unwrap();
    pg.restart();
    // The connection the ledger held is gone: writes fail until it has
    // reconnected (the driver's writer retries exactly like this), then
    // land, and nothing written before is lost.
    let t0 = Instant::now();
    let mut failures = 0;
    loop {
        match l.record_command(&cmd(2, 2, Action::Sleep, true)) {
            Ok(()) => break,
            Err(e) => {
                failures += 1;
                assert!(
                    t0.elapsed() < Duration::from_secs(30),
                    "still failing after 30 s: {e}"
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
    println!("postgres restart: {failures} failed write(s) before the ledger reconnected");
    assert!(
        failures >= 1,
        "the old connection cannot have survived a restart"
    );
    let a = Audit::read(pg_location(&pg)).unwrap();
    let ids: Vec<u64> = a.commands.iter().map(|c| c.id.0).collect();
    assert_eq!(ids, vec![1, 2]);
}

/// The site lease and fencing (issue 19, part 3, ledger side): one holder
/// at a time, a new token per grant, and a holder whose lease lapsed (a
/// paused process) cannot record a command, so it cannot send one.
#[test]
fn one_lease_holder_at_a_time_and_a_lapsed_holder_is_fenced() {
    let pg = PgCluster::start("lease", "ledger");
    let loc = pg_location(&pg);
    let mut a = Ledger::connect(&loc).unwrap();
    let mut b = Ledger::connect(&loc).unwrap();
    let ttl = Duration::from_millis(1500);

    let la = a
        .acquire_lease("site-1", "a", ttl)
        .unwrap()
        .expect("free lease");
    assert!(
        b.acquire_lease("site-1", "b", ttl).unwrap().is_none(),
        "held by a"
    );
    // Another site's lease is its own.
    assert!(b.acquire_lease("site-2", "b", ttl).unwrap().is_some());
    a.fence(&la).unwrap();
    a.record_command(&cmd(1, 1, Action::Sleep, true)).unwrap();
    let mut renewed = la.clone();
    assert!(a.renew_lease(&mut renewed, ttl).unwrap());
    assert_eq!(renewed.token, la.token, "a renewal keeps the token");

    // a stops renewing (paused): b takes over once the server says the
    // lease expired, with the next token.
    let t0 = Instant::now();
    let lb = loop {
        if let Some(l) = b.acquire_lease("site-1", "b", ttl).unwrap() {
            break l;
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "lease never lapsed");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(lb.token, la.token + 1);
    assert!(
        Instant::now() >= renewed.valid_until,
        "a's own deadline passed too"
    );

    // a wakes up: its command is refused, its renewal too.
    let e = a
        .record_command(&cmd(2, 2, Action::Sleep, true))
        .unwrap_err();
    assert!(matches!(e, curtail::ledger::LedgerError::Fenced(_)), "{e}");
    assert!(!a.renew_lease(&mut renewed, ttl).unwrap());

    // b follows the ledger and goes on from it.
    let resume = b.recover().unwrap();
    assert_eq!(resume.next_command_id, 2, "a's refused command left no gap");
    assert_eq!(resume.curtailed.len(), 1, "b knows miner 1 is asleep");
    b.fence(&lb).unwrap();
    b.record_commands(&[
        cmd(2, 2, Action::Sleep, true),
        cmd(3, 3, Action::Park, true),
    ])
    .unwrap();

    let audit = Audit::read(&loc).unwrap();
    let got: Vec<(u64, Option<u64>)> = audit.commands.iter().map(|c| (c.id.0, c.fence)).collect();
    assert_eq!(
        got,
        vec![
            (1, Some(la.token)),
            (2, Some(lb.token)),
            (3, Some(lb.token))
        ]
    );

    // A clean stop hands the lease over at once.
    b.release_lease(&lb).unwrap();
    let again = a
        .acquire_lease("site-1", "a", ttl)
        .unwrap()
        .expect("released");
    assert_eq!(again.token, lb.token + 1);

    // SQLite has no lease: one instance, one file.
    let dir = temp_dir("ledger-lease");
    let mut s = Ledger::open(dir.join("l.sqlite")).unwrap();
    assert!(s.acquire_lease("site-1", "a", ttl).is_err());
    let _ = std::fs::remove_dir_all(&dir);
}
