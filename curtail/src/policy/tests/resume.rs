//! Restart: the engine rebuilt from what the ledger recovered carries on
//! where it stopped.

use super::*;
use crate::ledger::Ledger;

/// Ten Whatsminers (sleep and power target), same model: ordered by id.
fn whatsminers(n: u64) -> Vec<MinerSpec> {
    (0..n)
        .map(|i| {
            MinerSpec::new(
                MinerId(i),
                "M50S",
                126.0,
                3276.0,
                ControlSurface::Whatsminer,
            )
        })
        .collect()
}

/// Replace the sim's engine by one rebuilt the way the driver does after a
/// restart: a fresh engine, resumed from the ledger's recovery of every
/// command issued so far.
fn restart(s: &mut Sim, cfg: PolicyConfig, specs: Vec<MinerSpec>) {
    let mut ledger = Ledger::open_in_memory().unwrap();
    for c in &s.log {
        ledger.record_command(c).unwrap();
    }
    let resume = ledger.recover().unwrap();
    let mut e = Engine::new(cfg, Fleet::from_specs(specs).unwrap(), s.now).unwrap();
    e.resume(s.now, resume).unwrap();
    s.e = e;
    s.drain();
}

/// A dispatch met by three sleeps and one fine-tune power target survives a
/// restart as it was: the fine-tuned miner is not taken for one at the end
/// of its curtail chain (its minimum power), so once the dispatch is
/// re-sent the same plan comes out and no command is sent.
#[test]
fn resume_keeps_a_fine_tune_power_limit() {
    let specs = whatsminers(10);
    let cfg = base_cfg();
    let mut s = Sim::new(cfg.clone(), specs.clone());
    let min_w = (3276.0f64 * 0.6).floor() as u32;
    // 32.76 kW of miners; 22.5 kW: three asleep and one just under nominal.
    let dispatch = |at| {
        Signal::Dispatch(DispatchSignal {
            at,
            target_kw: Some(22.5),
        })
    };
    s.signal(dispatch(s.now));
    s.run(120);
    let limits: Vec<(MinerId, u32)> = specs
        .iter()
        .filter_map(|m| s.e.limit_target(m.id).map(|w| (m.id, w)))
        .collect();
    let asleep_before: Vec<bool> = s.miners.iter().map(|m| m.asleep).collect();
    assert_eq!(asleep_before.iter().filter(|a| **a).count(), 3);
    let [(tuned, w)] = limits[..] else {
        panic!("one fine-tuned miner expected: {limits:?}")
    };
    assert!(w > min_w + 100, "a fine-tune well above the minimum: {w} W");
    assert_eq!(s.sim_miner(tuned).limit, Some(f64::from(w)));
    assert_eq!(s.e.in_flight(), 0);

    restart(&mut s, cfg, specs.clone());
    let n = s.log.len();
    s.run(30);
    assert_eq!(s.log.len(), n, "nothing re-sent while held");
    assert_eq!(s.e.limit_target(tuned), Some(w), "restored as a fine-tune");
    assert_eq!(
        s.e.fleet().get(tuned).unwrap().state,
        MinerState::PowerLimited(w)
    );
    // The dispatcher repeats its target: the plan is the one before.
    s.signal(dispatch(s.now));
    s.run(900);
    let after: Vec<_> = s.log[n..].iter().map(|c| (c.miner, c.action)).collect();
    assert!(after.is_empty(), "commands after the restart: {after:?}");
    let asleep_after: Vec<bool> = s.miners.iter().map(|m| m.asleep).collect();
    assert_eq!(asleep_after, asleep_before);
    assert_eq!(s.sim_miner(tuned).limit, Some(f64::from(w)));
    assert!(s.fleet_kw() <= 22.5, "{} kW", s.fleet_kw());
}
