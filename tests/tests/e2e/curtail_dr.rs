//! A demand-response event on a 200-miner site behind gridproxy.
//!
//! The site ([`gridproxy_fixtures::site`]): 45 LuxOS, 45 Braiins OS, 45
//! Whatsminer (every other one on API v3 only, the rest on v2 only, all
//! reached with `api = "auto"`) and 45 VNish emulators plus 10 stock
//! Antminers with their web interface and 10 cgminer-only ones, seven models
//! (17.5 to 34.7 J/TH), each on its own 127.x address, each paired with a
//! fixture SV1 miner that hashes (tiny CPU rate) through an in-process
//! gridproxy into the real `pool_sv2` while its emulator hashes. The
//! curtailment driver runs the engine against the emulators' firmware APIs
//! (and the proxy for park/unpark) with a real SQLite ledger.
//!
//! The event: "site at most 40 % of its kW within 60 s", i.e. a
//! `LimitKw(0.4 × site kW)` starting 60 s after it is issued, held 90 s.
//! Site time runs 10× faster than real time (driver `ScaledClock`,
//! emulator `time_scale = 0.1`): the 60 s window is 6 s of wall time.
//!
//! Checked: measured site kW (the sum of the emulators' power) is within
//! ±2 % of the target by the deadline and stays there for the event; the
//! miners asleep are the least efficient ones and sleep commands went out
//! least-efficient-first; a good share of the fleet still hashes (and its
//! SV1 miners still get shares accepted by the pool); the ledger holds every
//! command with its acknowledgement; restore after the event comes in
//! batches. The second test makes 10 % of the emulators unresponsive: the
//! engine escalates (sleep → power target → park through the proxy) and
//! still meets the target.

use std::collections::HashSet;
use std::time::Duration;

use gridproxy_curtail as curtail;
use gridproxy_fixtures::firmware::Fault;
use gridproxy_fixtures::site::Firmware;
use gridproxy_tests::bench::*;
use gridproxy_tests::*;

use curtail::command::Action;
use curtail::driver::{Audit, DriverConfig};
use curtail::fleet::MinerId;
use curtail::policy::{PolicyConfig, Staleness};
use curtail::signal::{DrEvent, DrTarget, Signal};
use curtail::time::Clock;

/// Upper bound on each test, wall time.
const TEST_LIMIT: Duration = Duration::from_secs(240);

fn policy(staleness: Staleness) -> PolicyConfig {
    PolicyConfig {
        max_commands_per_sec: 50,
        restore_batch: 20,
        restore_interval: Duration::from_secs(10),
        min_on: Duration::from_secs(30),
        min_off: Duration::from_secs(30),
        ack_timeout: Duration::from_secs(20),
        verify_grace: Duration::from_secs(20),
        retry_backoff: Duration::from_secs(10),
        // Start at once: leaves room for a round of escalation in the window.
        dr_lead_margin: Duration::from_secs(55),
        staleness,
        ..PolicyConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dr_event_sheds_200_miners_to_40_percent_within_60s() {
    let _gate = gridproxy_tests::module_gate(module_path!());
    gridproxy_tests::serially(TEST_LIMIT, run("dr", (62, 0), false, Staleness::NONE)).await;
}

/// The same event with the staleness rules a production site runs with
/// (price, site load and dispatch freshness at their defaults): none of them
/// may fire during an event that is met on time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dr_event_met_with_production_staleness_defaults() {
    let _gate = gridproxy_tests::module_gate(module_path!());
    let s = Staleness::default();
    assert!(s.price.is_some() && s.site_load.is_some() && s.dispatch.is_some());
    gridproxy_tests::serially(TEST_LIMIT, run("drprod", (66, 0), false, s)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dr_event_met_with_10_percent_of_emulators_unresponsive() {
    let _gate = gridproxy_tests::module_gate(module_path!());
    gridproxy_tests::serially(TEST_LIMIT, run("drdead", (63, 0), true, Staleness::NONE)).await;
}

async fn run(name: &str, subnet: (u8, u8), with_dead: bool, staleness: Staleness) {
    gridproxy_tests::init_tracing();
    // --- peers: TP, pool_sv2, gridproxy, the site ---
    // Half the stock miners have their web interface: the engine sleeps
    // those (`miner-mode`), and can only park the cgminer-only rest.
    let bench = SiteBench::new(name, subnet)
        .with(|s| {
            s.counts.retain(|(f, _)| *f != Firmware::Stock);
            s.counts
                .extend([(Firmware::Antminer, 10), (Firmware::Stock, 10)]);
            // Every other Whatsminer speaks API v3 only, the rest v2 only;
            // the engine reaches all of them with `api = "auto"`.
            s.whatsminer_v3_every = 2;
        })
        .behind_proxy()
        .start()
        .await;
    let (site, pool, proxy) = (bench.site.clone(), bench.pool(), bench.proxy());
    assert_eq!(site.len(), 200);
    let registry = proxy.ctx.registry.clone();
    let connected = || {
        registry
            .snapshot()
            .iter()
            .filter(|w| w.connections > 0)
            .count()
    };
    assert!(
        wait_until(Duration::from_secs(60), || connected() == 200).await,
        "{} of 200 SV1 miners connected through gridproxy",
        connected()
    );
    let upstream = proxy.ctx.router.pools()[0].stats.clone();
    assert!(
        wait_until(Duration::from_secs(60), || upstream.accepted.get() >= 5).await,
        "pool accepted {} shares; pool log:\n{}",
        upstream.accepted.get(),
        pool.process.log_tail(2000)
    );

    // 10 %: every miner whose index ends in 3 (all firmwares, all models),
    // and the two least efficient stock Antminers (the first the engine
    // would sleep of them).
    let dead: HashSet<usize> = if with_dead {
        let mut antminers: Vec<usize> = (0..site.len())
            .filter(|&i| site.miners()[i].firmware == Firmware::Antminer)
            .collect();
        antminers.sort_by(|a, b| {
            let e = |i: usize| site.miners()[i].j_per_th();
            e(*b).total_cmp(&e(*a))
        });
        (0..site.len())
            .filter(|i| i % 10 == 3)
            .chain(antminers.into_iter().take(2))
            .collect()
    } else {
        HashSet::new()
    };
    // A stock Antminer whose web password was changed on the miner: its
    // sleep fails with an auth error and the engine must park it instead.
    for &i in &dead {
        let m = &site.miners()[i];
        match &m.web {
            Some(web) => web.set_password("changed-on-the-miner"),
            None => m.set_fault(Fault::Unresponsive),
        }
    }

    // --- the driver ---
    let ledger = bench.ledger();
    let clock = ScaledClock::new(SPEED);
    let bridge = bridge(&site, proxy.ctx.router.clone());
    let h = bench
        .start_driver(
            policy(staleness),
            bridge.clone(),
            clock,
            DriverConfig {
                poll_interval: Duration::from_secs(5),
                poll_concurrency: 64,
                interval: Duration::from_secs(10),
                ..DriverConfig::default()
            },
        )
        .await;

    // --- the event ---
    let base_kw = site_kw(&site);
    let target_kw = 0.4 * base_kw;
    let band_kw = 0.02 * target_kw;
    let t0 = clock.now();
    let start = t0 + Duration::from_secs(60);
    let end = start + Duration::from_secs(90);
    h.send(Signal::DrEvent(DrEvent {
        id: format!("{name}-1"),
        target: DrTarget::LimitKw(target_kw),
        start,
        end: Some(end),
        issued_at: t0,
    }))
    .await
    .unwrap();

    let mut samples: Vec<(curtail::time::Timestamp, f64)> = Vec::new();
    let mut at_deadline: Option<Vec<(bool, bool)>> = None; // (asleep, at nominal)
    let mut accepted_at_deadline = 0;
    let mut sv1_accepted_at_deadline = 0;
    while clock.now() < end {
        samples.push((clock.now(), site_kw(&site)));
        if at_deadline.is_none() && clock.now() >= start {
            at_deadline = Some(
                site.miners()
                    .iter()
                    .map(|m| (asleep(m), at_nominal(m)))
                    .collect(),
            );
            accepted_at_deadline = upstream.accepted.get();
            sv1_accepted_at_deadline = site.sv1_stats().accepted.get();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let during_event_status = h.status();
    // SV1 miners of sleeping emulators are disconnected, the others hash on.
    let asleep_workers: Vec<&str> = site
        .miners()
        .iter()
        .filter(|m| asleep(m))
        .map(|m| m.worker.as_str())
        .collect();
    let snapshot = registry.snapshot();
    let still_connected: Vec<&str> = snapshot
        .iter()
        .filter(|w| w.connections > 0 && asleep_workers.contains(&w.name.as_str()))
        .map(|w| w.name.as_str())
        .collect();
    assert!(
        still_connected.is_empty(),
        "asleep but connected: {still_connected:?}"
    );
    let accepted_during = upstream.accepted.get() - accepted_at_deadline;
    let sv1_accepted_during = site.sv1_stats().accepted.get() - sv1_accepted_at_deadline;
    println!(
        "{name}: {} SV1 miners connected at the end of the event, gridproxy accepted \
         {sv1_accepted_during} of their shares and the pool {accepted_during} during it",
        snapshot.iter().filter(|w| w.connections > 0).count()
    );
    assert!(
        accepted_during > 0 && sv1_accepted_during > 0,
        "pool accepted no share from the miners still hashing during the event; upstream {:?}",
        upstream.reasons()
    );

    // --- the window ---
    let inside = |kw: f64| (kw - target_kw).abs() <= band_kw;
    let entered = samples
        .iter()
        .rposition(|(_, kw)| !inside(*kw))
        .map_or(samples[0].0, |i| samples.get(i + 1).map_or(end, |s| s.0));
    let in_event: Vec<f64> = samples
        .iter()
        .filter(|(t, _)| *t >= start)
        .map(|(_, kw)| *kw)
        .collect();
    let (lo, hi) = in_event
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), &k| (a.min(k), b.max(k)));
    println!(
        "{name}: site {base_kw:.1} kW, target {target_kw:.1} kW ±{band_kw:.1}; within band from \
         t0+{:.1} s (site time; deadline t0+60 s), {lo:.1}..{hi:.1} kW during the event; \
         {} commands issued, {} escalations, {} unresponsive",
        entered.saturating_since(t0).as_secs_f64(),
        during_event_status.issued,
        during_event_status.escalated,
        during_event_status.unresponsive,
    );
    assert!(
        entered <= start,
        "site kW entered ±2 % of {target_kw:.1} only at t0+{:?}; samples: {:?}",
        entered.saturating_since(t0),
        samples
            .iter()
            .map(|(t, k)| (t.saturating_since(t0).as_secs(), *k as u64))
            .collect::<Vec<_>>()
    );
    assert!(lo >= target_kw - band_kw && hi <= target_kw + band_kw);

    // Least efficient asleep, not everything asleep.
    let states = at_deadline.expect("sampled at the deadline");
    let controllable =
        |i: usize| site.miners()[i].firmware != Firmware::Stock && !dead.contains(&i);
    let eff = |i: usize| site.miners()[i].j_per_th();
    let sleeping: Vec<usize> = (0..site.len())
        .filter(|&i| controllable(i) && states[i].0)
        .collect();
    // Stock Antminers are slept through their web interface: some are
    // among the least efficient, asleep at standby draw by the deadline.
    let antminers_asleep = sleeping
        .iter()
        .filter(|&&i| site.miners()[i].firmware == Firmware::Antminer)
        .count();
    println!("{name}: {antminers_asleep} stock Antminers asleep (miner-mode) at the deadline");
    assert!(
        antminers_asleep > 0,
        "no stock Antminer slept through its web interface"
    );
    // Whatsminers on API v3 were slept through it (a v3-only emulator
    // answers nothing else).
    let v3_asleep = sleeping
        .iter()
        .filter(|&&i| site.miners()[i].whatsminer_v3)
        .count();
    println!("{name}: {v3_asleep} Whatsminers asleep through API v3 at the deadline");
    assert!(v3_asleep > 0, "no Whatsminer slept through API v3");
    let running: Vec<usize> = (0..site.len())
        .filter(|&i| controllable(i) && states[i].1)
        .collect();
    let least_eff_running = running.iter().map(|&i| eff(i)).fold(f64::MIN, f64::max);
    let most_eff_sleeping = sleeping.iter().map(|&i| eff(i)).fold(f64::MAX, f64::min);
    println!(
        "{name}: at the deadline {} controllable miners asleep (J/TH ≥ {most_eff_sleeping:.2}), \
         {} at nominal (J/TH ≤ {least_eff_running:.2}), {} other",
        sleeping.len(),
        running.len(),
        (0..site.len()).filter(|&i| controllable(i)).count() - sleeping.len() - running.len()
    );
    // Vacuous without both sides: some controllable miner must sleep and
    // some run, or the order check proves nothing.
    assert!(
        !sleeping.is_empty() && !running.is_empty(),
        "{name}: {} asleep, {} running: the efficiency order cannot be checked",
        sleeping.len(),
        running.len()
    );
    assert!(
        most_eff_sleeping >= least_eff_running,
        "a miner of {least_eff_running:.2} J/TH runs while one of {most_eff_sleeping:.2} sleeps"
    );
    // Sleeping every controllable miner would land far below the target.
    let all_asleep_kw: f64 = site
        .miners()
        .iter()
        .map(|m| {
            if controllable(m.index) {
                m.config.sleep_w
            } else {
                m.config.nominal_w
            }
        })
        .sum::<f64>()
        / 1000.0;
    assert!(all_asleep_kw < target_kw - band_kw && !running.is_empty());

    // --- restore ---
    let all_back = || {
        site.miners()
            .iter()
            .all(|m| at_nominal(m) || dead.contains(&m.index))
    };
    assert!(
        wait_until(Duration::from_secs(40), all_back).await,
        "restore incomplete: {} miners below nominal",
        site.miners().iter().filter(|m| !at_nominal(m)).count()
    );
    assert!(
        h.wait_for(Duration::from_secs(20), |s| s.in_flight == 0)
            .await
            .is_some(),
        "commands still in flight: {:?}",
        h.status()
    );
    let report = h.shutdown().await.expect("driver stops cleanly");
    assert_eq!(report.unanswered, 0);

    // `api = "auto"` settles on the API each Whatsminer speaks, v3 where
    // the emulator is v3-only, v2 where it is v2-only (a fresh actuator,
    // as a restarted gridproxy would have).
    let probe = firmware(&site);
    let mut picked = (0, 0);
    for m in site
        .miners()
        .iter()
        .filter(|m| m.firmware == Firmware::Whatsminer)
    {
        if dead.contains(&m.index) {
            continue;
        }
        probe.reading(id(m)).await.expect("Whatsminer telemetry");
        let want = if m.whatsminer_v3 {
            picked.0 += 1;
            curtail::actuators::ApiVersion::V3
        } else {
            picked.1 += 1;
            curtail::actuators::ApiVersion::V2
        };
        assert_eq!(probe.whatsminer_api(id(m)), Some(want), "miner {}", m.index);
    }
    println!(
        "{name}: auto picked v3 for {} and v2 for {} Whatsminers",
        picked.0, picked.1
    );
    assert!(picked.0 > 0 && picked.1 > 0);

    // --- the ledger ---
    let audit = Audit::read(&ledger).expect("ledger readable");
    assert_eq!(audit.commands.len() as u64, report.status.issued);
    let ok = every_command_answered(&audit);
    println!(
        "{name}: ledger: {} commands ({ok} acknowledged OK), {} ack/verification rows, {} notes, \
         {} intervals, {} event states",
        audit.commands.len(),
        audit.acks.len(),
        audit.notes.len(),
        audit.intervals.len(),
        audit.events.len()
    );
    let states: Vec<&str> = audit.events.iter().map(|e| e.state.as_str()).collect();
    assert_eq!(states, ["scheduled", "active", "ended"]);
    assert!(!audit.intervals.is_empty());
    // Firmware commands answered OK were confirmed by telemetry.
    for c in audit.commands.iter().filter(|c| !c.action.is_proxy_side()) {
        let outcomes: Vec<&str> = audit.acks_of(c.id).map(|a| a.outcome.as_str()).collect();
        if outcomes.contains(&"ack_ok") {
            assert!(
                outcomes.contains(&"verified"),
                "{:?} {:?} to {}: {outcomes:?}",
                c.id,
                c.action,
                c.miner
            );
        }
    }
    // The first wave (one plan, rate-limited: every command within 5 s of
    // the first) slept miners least efficient first, then power-limited the
    // margin; later waves (after escalations) only went further down the
    // order: no miner ever curtailed is more efficient than one never
    // curtailed.
    let first_at = audit.commands[0].at;
    let wave: Vec<&curtail::ledger::CommandRecord> = audit
        .commands
        .iter()
        .filter(|c| c.at.saturating_since(first_at) < Duration::from_secs(5))
        .collect();
    let wave_sleeps: Vec<f64> = wave
        .iter()
        .filter(|c| c.action == Action::Sleep)
        .map(|c| eff(c.miner.0 as usize))
        .collect();
    assert!(!wave_sleeps.is_empty(), "the first wave slept no miner");
    assert!(
        wave_sleeps.windows(2).all(|w| w[0] >= w[1]),
        "first wave sleeps by J/TH: {wave_sleeps:?}"
    );
    let slept: HashSet<MinerId> = audit
        .commands
        .iter()
        .filter(|c| c.at < end && c.action == Action::Sleep)
        .map(|c| c.miner)
        .collect();
    let curtailed: HashSet<MinerId> = audit
        .commands
        .iter()
        .filter(|c| c.at < end && c.curtail)
        .map(|c| c.miner)
        .collect();
    let most_eff_curtailed = slept
        .iter()
        .map(|m| eff(m.0 as usize))
        .fold(f64::MAX, f64::min);
    let least_eff_never = (0..site.len())
        .filter(|&i| controllable(i) && !curtailed.contains(&MinerId(i as u64)))
        .map(eff)
        .fold(f64::MIN, f64::max);
    println!(
        "{name}: first wave {} commands ({} sleeps); {} miners slept during the event \
         (J/TH ≥ {most_eff_curtailed:.2}), never curtailed J/TH ≤ {least_eff_never:.2}",
        wave.len(),
        wave_sleeps.len(),
        slept.len()
    );
    assert!(most_eff_curtailed >= least_eff_never);
    // Restore in batches of 20 every 10 s.
    let wakes = wakes_after(&audit, end);
    let batches = assert_staggered(&wakes, 20, Duration::from_secs(10));
    println!("{name}: restore batches {batches:?}");
    assert!(batches.len() >= 2);

    if with_dead {
        assert!(report.status.escalated > 0);
        let escalated: HashSet<MinerId> = audit
            .notes
            .iter()
            .filter(|n| n.kind == "escalated")
            .filter_map(|n| n.miner)
            .collect();
        let parked: Vec<MinerId> = audit
            .commands
            .iter()
            .filter(|c| c.action == Action::Park)
            .map(|c| c.miner)
            .collect();
        println!(
            "{name}: {} miners escalated, {} parked through the proxy",
            escalated.len(),
            parked.len()
        );
        assert!(
            !parked.is_empty(),
            "no park: escalation did not reach the proxy"
        );
        for m in &parked {
            assert!(dead.contains(&(m.0 as usize)), "responsive {m} parked");
            assert!(escalated.contains(m));
            // Sleep, then (if the firmware has one) the minimum power
            // target, then park (a margin power target may come first).
            let chain: Vec<Action> = audit
                .commands
                .iter()
                .filter(|c| c.miner == *m && c.at < end)
                .map(|c| c.action)
                .collect();
            let sleep = chain.iter().position(|a| *a == Action::Sleep);
            assert!(sleep.is_some(), "{m}: {chain:?}");
            assert_eq!(chain.last(), Some(&Action::Park), "{m}: {chain:?}");
        }
        // A stock Antminer with a changed password: its sleep was refused
        // for authentication (a clear actuator error), then it was parked.
        let refused_antminers: Vec<&MinerId> = parked
            .iter()
            .filter(|m| site.miners()[m.0 as usize].firmware == Firmware::Antminer)
            .collect();
        println!(
            "{name}: {} stock Antminers with a changed password parked after an auth error",
            refused_antminers.len()
        );
        assert!(
            !refused_antminers.is_empty(),
            "no stock Antminer escalated to a park"
        );
        for m in &refused_antminers {
            let sleep = audit
                .commands
                .iter()
                .find(|c| c.miner == **m && c.action == Action::Sleep)
                .expect("a sleep first");
            let outcomes: Vec<String> = audit
                .acks_of(sleep.id)
                .map(|a| format!("{} {}", a.outcome, a.detail.clone().unwrap_or_default()))
                .collect();
            assert!(
                outcomes.iter().any(|o| o.contains("auth")),
                "{m}: the sleep's answers {outcomes:?}"
            );
        }
        // Unparked again on restore.
        for m in &parked {
            assert!(!bridge.is_parked(&site.miners()[m.0 as usize].worker));
        }
    } else {
        assert_eq!(report.status.escalated, 0);
        assert_eq!(report.status.failed, 0);
    }
    proxy.stop.cancel();
    site.stop();
    let _ = std::fs::remove_dir_all(&bench.dir);
}
