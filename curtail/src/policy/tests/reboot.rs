//! Firmware that reboots while a curtailment is in flight.

use super::*;

/// A 0 kW dispatch: every Whatsminer is told to sleep. Two of them ack
/// `power_off` and reboot before acting on it. One is back within the
/// sleep's verification window: the sleep is sent again, nothing else. The
/// other is still away when the sleep fails, so the chain escalates (it
/// might never come back, and the rest of the fleet must cover for it);
/// once it answers again it is put back to sleep, not left at its minimum
/// power target (or parked and hashing).
#[test]
fn sleep_cut_short_by_a_reboot_is_retried_once_the_miner_answers() {
    let specs: Vec<_> = (0..6)
        .map(|i| {
            MinerSpec::new(
                MinerId(i),
                "M50S",
                126.0,
                3276.0,
                ControlSurface::Whatsminer,
            )
        })
        .collect();
    let mut s = Sim::new(base_cfg(), specs);
    let ramp = s.e.fleet().get(MinerId(1)).unwrap().spec.ramp;
    let window = (ramp.sleep_latency + s.e.config().verify_grace).as_secs();
    let (short, long) = (MinerId(1), MinerId(4));
    s.behave(short, Behavior::RebootOnSleep(window / 2));
    s.behave(long, Behavior::RebootOnSleep(window * 3));
    s.signal(Signal::Dispatch(DispatchSignal {
        at: s.now,
        target_kw: Some(0.0),
    }));
    s.run(window * 6);
    let actions = |id| -> Vec<Action> { s.commands_for(id).iter().map(|c| c.action).collect() };
    assert_eq!(actions(short), vec![Action::Sleep, Action::Sleep]);
    // The long reboot ends `window * 3` after its first sleep was sent.
    let back = s.commands_for(long)[0].issued_at + Duration::from_secs(window * 3);
    let after: Vec<Action> = s
        .commands_for(long)
        .iter()
        .filter(|c| c.issued_at >= back)
        .map(|c| c.action)
        .collect();
    assert_eq!(
        after,
        vec![Action::Sleep],
        "{long} once back: {:?}",
        actions(long)
    );
    assert_eq!(s.e.fleet().get(short).unwrap().state, MinerState::Sleeping);
    // Parked by the escalation while away, asleep now (unparked on restore).
    assert!(matches!(
        s.e.fleet().get(long).unwrap().state,
        MinerState::Sleeping | MinerState::Parked
    ));
    assert!(
        s.miners.iter().all(|m| m.asleep),
        "all asleep at 0 kW: {:?}",
        s.miners
            .iter()
            .map(|m| (m.spec.id, m.asleep, m.power))
            .collect::<Vec<_>>()
    );
    assert_eq!(s.e.in_flight(), 0);
}
