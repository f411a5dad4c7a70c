//! Firmware that reboots while a curtailment is in flight.

use super::*;

/// A 0 kW dispatch: every Whatsminer is told to sleep. Two of them ack
/// `power_off` and reboot before acting on it, one back within the sleep's
/// verification window, one after it. Neither failure says the firmware
/// cannot sleep, so neither escalates to the minimum power target (or a
/// park): the sleep is sent again once telemetry shows the miner
/// responsive, and every miner ends asleep.
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
    for id in [short, long] {
        let a = actions(id);
        assert!(
            a.iter().all(|a| *a == Action::Sleep) && a.len() >= 2,
            "{id}: only sleeps, resent after the reboot: {a:?}"
        );
        assert_eq!(
            s.e.fleet().get(id).unwrap().state,
            MinerState::Sleeping,
            "{id}"
        );
    }
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
