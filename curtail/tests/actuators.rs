//! Firmware clients against the fixtures' emulators on loopback.
//!
//! Each emulator runs on its own 127.0.0.x address (port 0) with ramp times
//! scaled by [`SCALE`]. Each test is bounded by [`TEST_LIMIT`]; each client
//! call by [`TIMEOUT`].

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use gridproxy_curtail::actuator::{Actuator, ActuatorError, TelemetrySource};
use gridproxy_curtail::actuators::luxos::LuxOsClient;
use gridproxy_curtail::actuators::verify::{confirm, expected_band, VerifyError};
use gridproxy_curtail::actuators::{
    ApiVersion, ClientConfig, ClientError, FleetActuator, HostPort, MinerEndpoint, WhatsminerApi,
};
use gridproxy_curtail::command::{Action, Command, CommandId, PoolId};
use gridproxy_curtail::fleet::{ControlSurface, MinerId, MinerSpec};
use gridproxy_curtail::time::Timestamp;
use gridproxy_fixtures::firmware::model::{Mode, ModelConfig};
use gridproxy_fixtures::firmware::{
    braiins, luxos, stock, vnish, whatsminer, whatsminer_v3, EmulatorHandle, Fault,
};

/// Ramp times ×0.05: sleep 200 ms, wake 400 ms, full power step 300 ms.
const SCALE: f64 = 0.05;
/// Client timeout per operation.
const TIMEOUT: Duration = Duration::from_secs(1);
/// Upper bound on any one test.
const TEST_LIMIT: Duration = Duration::from_secs(30);
/// Scheduling slack on a shared 2-core machine.
const SLACK: Duration = Duration::from_millis(1500);
const POLL: Duration = Duration::from_millis(20);
const PASSWORD: &str = "s3cret";
const M: MinerId = MinerId(1);

fn addr(last: u8) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, last)), 0)
}

fn model() -> ModelConfig {
    ModelConfig::s19j_pro().with_time_scale(SCALE)
}

fn spec(surface: ControlSurface) -> MinerSpec {
    let m = model();
    let mut s = MinerSpec::new(M, "S19j Pro", m.nominal_ths, m.nominal_w, surface);
    s.ramp.sleep_w = m.sleep_w;
    s
}

/// An emulator to test against: a firmware, or Whatsminer on API v3.
#[derive(Clone, Copy, Debug)]
enum Kind {
    Fw(ControlSurface),
    /// A v3-only Whatsminer emulator, the client set to `api = "v3"`.
    WhatsminerV3,
}

impl From<ControlSurface> for Kind {
    fn from(s: ControlSurface) -> Kind {
        Kind::Fw(s)
    }
}

impl Kind {
    fn surface(self) -> ControlSurface {
        match self {
            Kind::Fw(s) => s,
            Kind::WhatsminerV3 => ControlSurface::Whatsminer,
        }
    }
}

/// Start `kind`'s emulator on 127.0.0.`ip` and a fleet actuator for it
/// with `password`.
async fn setup(kind: impl Into<Kind>, ip: u8, password: &str) -> (EmulatorHandle, FleetActuator) {
    let kind = kind.into();
    let a = addr(ip);
    let emu = match kind {
        Kind::Fw(ControlSurface::LuxOs) => luxos::spawn(a, model()).await,
        Kind::Fw(ControlSurface::BraiinsOs) => braiins::spawn(a, model(), PASSWORD).await,
        Kind::Fw(ControlSurface::Whatsminer) => whatsminer::spawn(a, model(), PASSWORD).await,
        Kind::Fw(ControlSurface::Vnish) => vnish::spawn(a, model(), PASSWORD).await,
        Kind::Fw(ControlSurface::AntminerStock | ControlSurface::None) => {
            stock::spawn(a, model()).await
        }
        Kind::WhatsminerV3 => whatsminer_v3::spawn(a, model(), PASSWORD).await,
    }
    .expect("bind emulator");
    let mut fleet = FleetActuator::new(TIMEOUT);
    let mut ep = MinerEndpoint::new(kind.surface(), emu.addr()).with_credentials("root", password);
    if let Kind::WhatsminerV3 = kind {
        ep = ep.with_whatsminer_api(WhatsminerApi::V3);
    }
    fleet.insert(M, &ep);
    (emu, fleet)
}

fn command(surface: ControlSurface, action: Action) -> Command {
    Command {
        id: CommandId(1),
        miner: M,
        surface,
        action,
        issued_at: Timestamp::ZERO,
        curtail: true,
    }
}

async fn bounded<F: std::future::Future<Output = ()>>(f: F) {
    tokio::time::timeout(TEST_LIMIT, f)
        .await
        .expect("test exceeded its time bound");
}

/// Sleep, wake and a power target, each acked then confirmed by telemetry
/// within the scaled ramp time.
async fn control_cycle(kind: impl Into<Kind>, ip: u8) {
    let kind = kind.into();
    let surface = kind.surface();
    let (emu, fleet) = setup(kind, ip, PASSWORD).await;
    let spec = spec(surface);
    let cfg = model();

    let before = fleet.read(M).await.expect("telemetry");
    assert!((before.power_w - cfg.nominal_w).abs() < 2.0, "{before:?}");
    assert!(
        (before.hashrate_ths - cfg.nominal_ths).abs() < 0.5,
        "{before:?}"
    );

    // Sleep: power ramps down to standby within the (scaled) sleep time.
    let t = Instant::now();
    fleet
        .execute(&command(surface, Action::Sleep))
        .await
        .expect("sleep ack");
    let band = expected_band(Action::Sleep, &spec, None).unwrap();
    let got = confirm(&fleet, M, band, cfg.scaled(cfg.sleep_time) + SLACK, POLL)
        .await
        .expect("sleep confirmed by telemetry");
    assert!(t.elapsed() <= cfg.scaled(cfg.sleep_time) + SLACK);
    assert!(got.hashrate_ths < 20.0, "{got:?}");
    assert_eq!(emu.state().mode, Mode::Sleeping);
    // It settles at standby power with no hashrate.
    tokio::time::sleep(cfg.scaled(cfg.sleep_time)).await;
    let asleep = fleet.read(M).await.unwrap();
    assert!(
        asleep.power_w <= cfg.sleep_w + 1.0 && asleep.hashrate_ths == 0.0,
        "{asleep:?}"
    );

    // Wake: back to nominal within the (scaled) wake time.
    let t = Instant::now();
    fleet
        .execute(&command(surface, Action::Wake))
        .await
        .expect("wake ack");
    let band = expected_band(Action::Wake, &spec, None).unwrap();
    let got = confirm(&fleet, M, band, cfg.scaled(cfg.wake_time) + SLACK, POLL)
        .await
        .expect("wake confirmed by telemetry");
    assert!(t.elapsed() <= cfg.scaled(cfg.wake_time) + SLACK);
    assert!(got.hashrate_ths > 90.0, "{got:?}");

    // Power target: at or below 2500 W (LuxOS/VNish step to a profile).
    fleet
        .execute(&command(surface, Action::SetPowerTarget(2500)))
        .await
        .expect("power target ack");
    let band = expected_band(Action::SetPowerTarget(2500), &spec, None).unwrap();
    let got = confirm(&fleet, M, band, cfg.scaled(cfg.limit_time) + SLACK, POLL)
        .await
        .expect("power target confirmed by telemetry");
    assert!(got.power_w >= cfg.min_power_w, "{got:?}");
    assert!(matches!(emu.state().mode, Mode::PowerLimited(w) if w <= 2500));
}

/// Every fault yields its typed error (or timeout) in bounded time.
async fn fault_suite(kind: impl Into<Kind>, ip: u8) {
    let kind = kind.into();
    let surface = kind.surface();
    let (emu, fleet) = setup(kind, ip, PASSWORD).await;
    let spec = spec(surface);
    let cfg = model();
    let sleep = command(surface, Action::Sleep);

    // Reject: the firmware's refusal, typed.
    emu.set_fault(Fault::Reject);
    let r = fleet.execute(&sleep).await;
    assert!(
        matches!(r, Err(ActuatorError::Rejected { miner: M, .. })),
        "{r:?}"
    );
    assert_eq!(emu.state().mode, Mode::Hashing);

    // Wrong state: acked, claims to sleep, still draws power; telemetry
    // verification catches it.
    emu.set_fault(Fault::WrongState);
    fleet
        .execute(&sleep)
        .await
        .expect("wrong-state firmware acks");
    assert_eq!(emu.state().reported_mode, Mode::Sleeping);
    let band = expected_band(Action::Sleep, &spec, None).unwrap();
    let r = confirm(&fleet, M, band, cfg.scaled(cfg.sleep_time) * 2, POLL).await;
    match r {
        Err(VerifyError::NotConfirmed { last_w, .. }) => {
            assert!(last_w > cfg.nominal_w - 2.0, "{last_w}")
        }
        other => panic!("wrong state not detected: {other:?}"),
    }

    // Slow but within the timeout: succeeds, late.
    emu.set_fault(Fault::Slow(Duration::from_millis(150)));
    let t = Instant::now();
    fleet.read(M).await.expect("slow telemetry still answers");
    assert!(t.elapsed() >= Duration::from_millis(150));

    // Slow beyond the timeout, and unresponsive: a timeout, not a hang.
    // (A cgminer-style emulator, like real firmware, may still carry out a
    // command it answers too late: only telemetry tells.)
    for fault in [Fault::Slow(TIMEOUT * 3), Fault::Unresponsive] {
        emu.set_fault(fault);
        let t = Instant::now();
        let r = fleet.execute(&sleep).await;
        assert_eq!(r, Err(ActuatorError::Timeout { miner: M }), "{fault:?}");
        let r = fleet.read(M).await;
        assert_eq!(r, Err(ActuatorError::Timeout { miner: M }), "{fault:?}");
        assert!(
            t.elapsed() < 2 * TIMEOUT + SLACK,
            "{fault:?}: {:?}",
            t.elapsed()
        );
    }

    // Back to normal: the same client recovers.
    emu.set_fault(Fault::None);
    fleet.execute(&sleep).await.expect("recovered");
}

/// Wrong credentials give an auth error, not a hang or a panic.
async fn wrong_password(surface: ControlSurface, ip: u8) {
    let (_emu, fleet) = setup(surface, ip, "not-the-password").await;
    let r = fleet.execute(&command(surface, Action::Sleep)).await;
    assert_eq!(r, Err(ActuatorError::Auth { miner: M }));
}

#[tokio::test]
async fn luxos_sleep_wake_power_target() {
    bounded(control_cycle(ControlSurface::LuxOs, 11)).await;
}

#[tokio::test]
async fn luxos_faults() {
    bounded(fault_suite(ControlSurface::LuxOs, 12)).await;
}

#[tokio::test]
async fn braiins_sleep_wake_power_target() {
    bounded(control_cycle(ControlSurface::BraiinsOs, 21)).await;
}

#[tokio::test]
async fn braiins_faults() {
    bounded(fault_suite(ControlSurface::BraiinsOs, 22)).await;
}

#[tokio::test]
async fn braiins_wrong_password() {
    bounded(wrong_password(ControlSurface::BraiinsOs, 23)).await;
}

#[tokio::test]
async fn whatsminer_sleep_wake_power_target() {
    bounded(control_cycle(ControlSurface::Whatsminer, 31)).await;
}

#[tokio::test]
async fn whatsminer_faults() {
    bounded(fault_suite(ControlSurface::Whatsminer, 32)).await;
}

#[tokio::test]
async fn whatsminer_wrong_password() {
    bounded(wrong_password(ControlSurface::Whatsminer, 33)).await;
}

#[tokio::test]
async fn whatsminer_v3_sleep_wake_power_target() {
    bounded(control_cycle(Kind::WhatsminerV3, 34)).await;
}

#[tokio::test]
async fn whatsminer_v3_faults() {
    bounded(fault_suite(Kind::WhatsminerV3, 35)).await;
}

/// API v3 has no documented code for a refused token: the emulator answers
/// -1 ("Fail"), and the client's error names the code and the likely cause.
#[tokio::test]
async fn whatsminer_v3_wrong_password() {
    bounded(async {
        let (emu, fleet) = setup(Kind::WhatsminerV3, 36, "not-the-password").await;
        let r = fleet
            .execute(&command(ControlSurface::Whatsminer, Action::Sleep))
            .await;
        match r {
            Err(ActuatorError::Rejected { miner: M, detail }) => assert!(
                detail.contains("code -1") && detail.contains("wrong password"),
                "{detail}"
            ),
            other => panic!("{other:?}"),
        }
        assert_eq!(emu.state().mode, Mode::Hashing);
        // Reads need no token: telemetry still works.
        let r = fleet.read(M).await.expect("telemetry without a token");
        assert!(r.power_w > 3000.0, "{r:?}");
        // A wrong account is refused the same way, the right password too.
        let mut f2 = FleetActuator::new(TIMEOUT);
        f2.insert(
            M,
            &MinerEndpoint::new(ControlSurface::Whatsminer, emu.addr())
                .with_credentials("admin", PASSWORD)
                .with_whatsminer_api(WhatsminerApi::V3),
        );
        let r = f2
            .execute(&command(ControlSurface::Whatsminer, Action::Sleep))
            .await;
        assert!(matches!(r, Err(ActuatorError::Rejected { .. })), "{r:?}");
        // user1 is a write account.
        f2.insert(
            M,
            &MinerEndpoint::new(ControlSurface::Whatsminer, emu.addr())
                .with_credentials("user1", PASSWORD)
                .with_whatsminer_api(WhatsminerApi::V3),
        );
        f2.execute(&command(ControlSurface::Whatsminer, Action::Sleep))
            .await
            .expect("user1 with the password");
        assert_eq!(emu.state().mode, Mode::Sleeping);
    })
    .await;
}

/// `api = "auto"` finds the API each miner speaks and remembers it: a
/// v2-only and a v3-only emulator on one port each, one speaking both on
/// two ports, and v2 firmware whose v3 port is closed (the real default
/// layout: 4433 refused, 4028 answers).
#[tokio::test]
async fn whatsminer_auto_picks_the_api() {
    bounded(async {
        let v2 = whatsminer::spawn(addr(37), model(), PASSWORD)
            .await
            .unwrap();
        let v3 = whatsminer_v3::spawn(addr(38), model(), PASSWORD)
            .await
            .unwrap();
        let (both, both_v3) = whatsminer_v3::spawn_both(addr(39), addr(39), model(), PASSWORD)
            .await
            .unwrap();
        let closed = {
            let l = std::net::TcpListener::bind(addr(37)).unwrap();
            l.local_addr().unwrap()
        };
        let auto = |v3_at: SocketAddr, v2_port: u16| {
            MinerEndpoint::new(ControlSurface::Whatsminer, v3_at)
                .with_credentials("root", PASSWORD)
                .with_whatsminer_api(WhatsminerApi::Auto { v2_port })
        };
        let cases: [(&EmulatorHandle, MinerEndpoint, ApiVersion); 4] = [
            (&v2, auto(v2.addr(), v2.addr().port()), ApiVersion::V2),
            (&v3, auto(v3.addr(), v3.addr().port()), ApiVersion::V3),
            (&both, auto(both_v3, both.addr().port()), ApiVersion::V3),
            (&v2, auto(closed, v2.addr().port()), ApiVersion::V2),
        ];
        for (i, (emu, ep, want)) in cases.into_iter().enumerate() {
            let mut fleet = FleetActuator::new(TIMEOUT);
            fleet.insert(M, &ep);
            assert_eq!(fleet.whatsminer_api(M), None, "case {i}: not probed yet");
            let r = fleet
                .read(M)
                .await
                .unwrap_or_else(|e| panic!("case {i}: {e}"));
            assert!(r.power_w > 10.0, "case {i}: {r:?}");
            assert_eq!(fleet.whatsminer_api(M), Some(want), "case {i}");
            let cmd = |a| command(ControlSurface::Whatsminer, a);
            let sleep_then_wake = [Action::Sleep, Action::Wake];
            for a in sleep_then_wake {
                fleet
                    .execute(&cmd(a))
                    .await
                    .unwrap_or_else(|e| panic!("case {i} {a:?}: {e}"));
                let mode = emu.state().mode;
                let expect = if a == Action::Sleep {
                    Mode::Sleeping
                } else {
                    Mode::Hashing
                };
                assert_eq!(mode, expect, "case {i} after {a:?}");
            }
            assert_eq!(fleet.whatsminer_api(M), Some(want), "case {i} remembered");
        }
        // Nothing listening on either port: a clear error naming both.
        let mut fleet = FleetActuator::new(TIMEOUT);
        fleet.insert(M, &auto(closed, closed.port()));
        match fleet.read(M).await {
            Err(ActuatorError::Unreachable { detail, .. }) => {
                assert!(detail.contains("v3") && detail.contains("v2"), "{detail}")
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(fleet.whatsminer_api(M), None);
    })
    .await;
}

#[tokio::test]
async fn vnish_sleep_wake_power_target() {
    bounded(control_cycle(ControlSurface::Vnish, 41)).await;
}

#[tokio::test]
async fn vnish_faults() {
    bounded(fault_suite(ControlSurface::Vnish, 42)).await;
}

#[tokio::test]
async fn vnish_wrong_password() {
    bounded(wrong_password(ControlSurface::Vnish, 43)).await;
}

#[tokio::test]
async fn stock_is_telemetry_only() {
    bounded(async {
        let (emu, fleet) = setup(ControlSurface::None, 51, "").await;
        let t = fleet.read(M).await.expect("stock telemetry");
        assert!((t.power_w - model().nominal_w).abs() < 2.0, "{t:?}");
        assert!(!fleet.handles(ControlSurface::None));
        assert!(fleet.handles(ControlSurface::AntminerStock));
        assert!(fleet.handles(ControlSurface::Vnish));
        let r = fleet
            .execute(&command(ControlSurface::None, Action::Sleep))
            .await;
        assert!(matches!(r, Err(ActuatorError::Unsupported { .. })), "{r:?}");
        emu.set_fault(Fault::Unresponsive);
        assert_eq!(
            fleet.read(M).await,
            Err(ActuatorError::Timeout { miner: M })
        );
    })
    .await;
}

/// A stock Antminer with its web interface: cgminer API and web server on
/// 127.0.0.`ip`, the actuator given `password`.
async fn setup_antminer(
    ip: u8,
    password: &str,
) -> (EmulatorHandle, stock::StockWeb, FleetActuator) {
    let (emu, web) = stock::spawn_with_web(addr(ip), addr(ip), model(), "root", PASSWORD)
        .await
        .expect("bind emulator");
    let mut fleet = FleetActuator::new(TIMEOUT);
    let ep = MinerEndpoint::new(ControlSurface::AntminerStock, emu.addr())
        .with_credentials("root", password)
        .with_web(HostPort::from(web.addr()));
    fleet.insert(M, &ep);
    (emu, web, fleet)
}

/// Stock Antminer: sleep and wake through the web interface (digest auth),
/// confirmed by the cgminer API's telemetry; the rest of the configuration
/// is written back as it was read.
#[tokio::test]
async fn antminer_stock_sleeps_and_wakes_through_its_web_interface() {
    bounded(async {
        let surface = ControlSurface::AntminerStock;
        let (emu, web, fleet) = setup_antminer(81, PASSWORD).await;
        let (spec, cfg) = (spec(surface), model());
        let before = web.conf();
        fleet
            .execute(&command(surface, Action::Sleep))
            .await
            .expect("sleep ack");
        let band = expected_band(Action::Sleep, &spec, None).unwrap();
        confirm(&fleet, M, band, cfg.scaled(cfg.sleep_time) + SLACK, POLL)
            .await
            .expect("sleep confirmed by telemetry");
        assert_eq!(emu.state().mode, Mode::Sleeping);
        let mut after = web.conf();
        assert_eq!(after["miner-mode"], 1, "{after}");
        after["miner-mode"] = before["miner-mode"].clone();
        assert_eq!(after, before, "the rest of the configuration changed");

        fleet
            .execute(&command(surface, Action::Wake))
            .await
            .expect("wake ack");
        let band = expected_band(Action::Wake, &spec, None).unwrap();
        confirm(&fleet, M, band, cfg.scaled(cfg.wake_time) + SLACK, POLL)
            .await
            .expect("wake confirmed by telemetry");
        assert_eq!(web.conf(), before);
        // No power target on stock firmware.
        let r = fleet
            .execute(&command(surface, Action::SetPowerTarget(2500)))
            .await;
        assert!(matches!(r, Err(ActuatorError::Unsupported { .. })), "{r:?}");
        // A refusal is typed.
        emu.set_fault(Fault::Reject);
        let r = fleet.execute(&command(surface, Action::Sleep)).await;
        assert!(
            matches!(r, Err(ActuatorError::Rejected { miner: M, .. })),
            "{r:?}"
        );
        assert_eq!(emu.state().mode, Mode::Hashing);
    })
    .await;
}

/// The emulator enforces digest auth: a wrong password is an auth error,
/// and the miner keeps hashing.
#[tokio::test]
async fn antminer_stock_wrong_password() {
    bounded(async {
        let (emu, web, fleet) = setup_antminer(82, "not-the-password").await;
        let r = fleet
            .execute(&command(ControlSurface::AntminerStock, Action::Sleep))
            .await;
        assert_eq!(r, Err(ActuatorError::Auth { miner: M }));
        assert_eq!(emu.state().mode, Mode::Hashing);
        assert!(web.refused.load(std::sync::atomic::Ordering::Relaxed) >= 1);
    })
    .await;
}

#[tokio::test]
async fn dispatch_errors_are_typed() {
    bounded(async {
        let (_emu, fleet) = setup(ControlSurface::LuxOs, 61, "").await;
        // Proxy-side actions belong to the proxy's actuator.
        let r = fleet
            .execute(&command(ControlSurface::LuxOs, Action::Reroute(PoolId(2))))
            .await;
        assert!(matches!(r, Err(ActuatorError::Unsupported { .. })), "{r:?}");
        // A command for another surface than the registered one.
        let r = fleet
            .execute(&command(ControlSurface::Vnish, Action::Sleep))
            .await;
        assert!(matches!(r, Err(ActuatorError::Rejected { .. })), "{r:?}");
        // Unknown miner.
        let mut cmd = command(ControlSurface::LuxOs, Action::Sleep);
        cmd.miner = MinerId(99);
        assert_eq!(
            fleet.execute(&cmd).await,
            Err(ActuatorError::UnknownMiner(MinerId(99)))
        );
    })
    .await;
}

#[tokio::test]
async fn nothing_listening_is_unreachable_fast() {
    bounded(async {
        // Bind then drop to get a closed port.
        let closed = std::net::TcpListener::bind(addr(71))
            .unwrap()
            .local_addr()
            .unwrap();
        for surface in [
            ControlSurface::LuxOs,
            ControlSurface::BraiinsOs,
            ControlSurface::Whatsminer,
            ControlSurface::Vnish,
        ] {
            let mut fleet = FleetActuator::new(TIMEOUT);
            fleet.insert(M, &MinerEndpoint::new(surface, closed));
            let r = fleet.execute(&command(surface, Action::Sleep)).await;
            assert!(
                matches!(
                    r,
                    Err(ActuatorError::Unreachable { .. } | ActuatorError::Timeout { .. })
                ),
                "{surface:?}: {r:?}"
            );
        }
    })
    .await;
}

/// Every client reaches its firmware by host name (`localhost`, looked up at
/// connect) and over IPv6 loopback (`::1`, bracketed in HTTP and gRPC URLs).
#[tokio::test]
async fn firmware_is_reached_by_host_name_and_over_ipv6() {
    bounded(async {
        let cfg = model();
        for (host, bind) in [("localhost", "127.0.0.1:0"), ("::1", "[::1]:0")] {
            let bind: SocketAddr = bind.parse().unwrap();
            for surface in [
                ControlSurface::LuxOs,
                ControlSurface::BraiinsOs,
                ControlSurface::Whatsminer,
                ControlSurface::Vnish,
            ] {
                let emu = match surface {
                    ControlSurface::LuxOs => luxos::spawn(bind, cfg).await,
                    ControlSurface::BraiinsOs => braiins::spawn(bind, cfg, PASSWORD).await,
                    ControlSurface::Whatsminer => whatsminer::spawn(bind, cfg, PASSWORD).await,
                    _ => vnish::spawn(bind, cfg, PASSWORD).await,
                }
                .expect("bind emulator");
                let mut fleet = FleetActuator::new(TIMEOUT);
                let at = HostPort::new(host, emu.addr().port());
                fleet.insert(
                    M,
                    &MinerEndpoint::new(surface, at.clone()).with_credentials("root", PASSWORD),
                );
                let r = fleet.execute(&command(surface, Action::Sleep)).await;
                assert_eq!(r, Ok(()), "{surface:?} at {at}");
                assert_eq!(emu.state().mode, Mode::Sleeping, "{surface:?} at {at}");
                let t = fleet.read(M).await;
                assert!(t.is_ok(), "{surface:?} at {at}: {t:?}");
            }
        }
        assert_eq!(HostPort::new("::1", 80).to_string(), "[::1]:80");
        assert_eq!(HostPort::from(addr(5)).to_string(), "127.0.0.5:0");
    })
    .await;
}

/// A name that does not resolve is an unreachable miner naming the host
/// (`.invalid` never resolves), not a hang or a panic.
#[tokio::test]
async fn a_name_that_does_not_resolve_is_unreachable() {
    bounded(async {
        for surface in [ControlSurface::LuxOs, ControlSurface::Vnish] {
            let mut fleet = FleetActuator::new(TIMEOUT);
            let at = HostPort::new("miner.gridproxy-test.invalid", 4028);
            fleet.insert(M, &MinerEndpoint::new(surface, at));
            match fleet.execute(&command(surface, Action::Sleep)).await {
                Err(ActuatorError::Unreachable { detail, .. }) => assert!(
                    detail.contains("miner.gridproxy-test.invalid:4028"),
                    "{surface:?}: {detail}"
                ),
                Err(ActuatorError::Timeout { .. }) => {}
                other => panic!("{surface:?}: {other:?}"),
            }
        }
    })
    .await;
}

#[tokio::test]
async fn fleet_dispatches_by_surface() {
    bounded(async {
        let cfg = model();
        let emus = [
            (ControlSurface::LuxOs, luxos::spawn(addr(81), cfg).await),
            (
                ControlSurface::BraiinsOs,
                braiins::spawn(addr(82), cfg, PASSWORD).await,
            ),
            (
                ControlSurface::Whatsminer,
                whatsminer::spawn(addr(83), cfg, PASSWORD).await,
            ),
            (
                ControlSurface::Vnish,
                vnish::spawn(addr(84), cfg, PASSWORD).await,
            ),
        ];
        let mut fleet = FleetActuator::new(TIMEOUT);
        let mut handles = Vec::new();
        for (i, (surface, emu)) in emus.into_iter().enumerate() {
            let emu = emu.expect("bind emulator");
            let ep = MinerEndpoint::new(surface, emu.addr()).with_credentials("root", PASSWORD);
            fleet.insert(MinerId(i as u64 + 1), &ep);
            handles.push((surface, emu));
        }
        assert_eq!(fleet.len(), 4);
        // All four at once: each command reaches its own firmware.
        let cmds: Vec<Command> = handles
            .iter()
            .enumerate()
            .map(|(i, (surface, _))| {
                let mut c = command(*surface, Action::Sleep);
                c.miner = MinerId(i as u64 + 1);
                c
            })
            .collect();
        let results = futures::future::join_all(cmds.iter().map(|c| fleet.execute(c))).await;
        for (r, (surface, emu)) in results.into_iter().zip(&handles) {
            assert_eq!(r, Ok(()), "{surface:?}");
            assert_eq!(emu.state().mode, Mode::Sleeping, "{surface:?}");
        }
    })
    .await;
}

#[tokio::test]
async fn luxos_clients_share_the_one_session() {
    bounded(async {
        let emu = luxos::spawn(addr(91), model()).await.unwrap();
        let cfg = ClientConfig::new(emu.addr()).with_timeout(TIMEOUT);
        let (a, b) = (LuxOsClient::new(cfg.clone()), LuxOsClient::new(cfg));
        // `a` logs on; `b`'s logon is refused (one session) and it reuses
        // the live session instead.
        a.sleep().await.expect("a sleeps");
        b.wakeup().await.expect("b wakes with the shared session");
        assert_eq!(emu.state().mode, Mode::Hashing);
        let p = b.set_power_target(2800).await.expect("profile");
        assert!(p.watts <= 2800 && p.name.starts_with('-'), "{p:?}");
        // A target below every profile takes the lowest; the model accepts it.
        let low = a.set_power_target(100).await.expect("lowest profile");
        assert!(f64::from(low.watts) >= model().min_power_w);
        emu.set_fault(Fault::Reject);
        assert!(matches!(a.sleep().await, Err(ClientError::Rejected(_))));
    })
    .await;
}

/// Braiins OS before API 1.1.0 puts the login token only in the
/// `authorization` metadata: the client reads it from there, and reports
/// the status the firmware claims (`GetMinerDetails`).
#[tokio::test]
async fn braiins_token_from_metadata_only_firmware() {
    use gridproxy_curtail::actuators::braiins::{pb, BraiinsClient};
    bounded(async {
        let emu = braiins::spawn_with(
            addr(24),
            model(),
            PASSWORD,
            braiins::LoginReply::MetadataOnly,
        )
        .await
        .expect("bind emulator");
        let cfg = ClientConfig::new(emu.addr()).with_timeout(TIMEOUT);
        let client = BraiinsClient::new(cfg, "root", PASSWORD);
        assert_eq!(client.miner_status().await, Ok(pb::MinerStatus::Normal));
        let r = client.telemetry().await.expect("telemetry");
        assert!((r.hashrate_ths - model().nominal_ths).abs() < 0.5, "{r:?}");
        assert_eq!(client.pause_mining().await, Ok(false));
        assert_eq!(emu.state().mode, Mode::Sleeping);
        assert_eq!(client.miner_status().await, Ok(pb::MinerStatus::Paused));
        assert_eq!(client.pause_mining().await, Ok(true));
        assert_eq!(client.resume_mining().await, Ok(false));
        assert_eq!(client.set_power_target(2500).await, Ok(2500));
        assert!(matches!(emu.state().mode, Mode::PowerLimited(2500)));
    })
    .await;
}

/// A Whatsminer acks `power_off` under a 0 kW dispatch and reboots before
/// acting on it (the emulator's [`Fault::RebootOnSleep`]). The driver sees
/// its telemetry fail, then the miner hashing again; the engine sends the
/// sleep again rather than escalating to the minimum power target, and the
/// miner ends asleep.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whatsminer_rebooting_through_power_off_is_put_to_sleep_again() {
    use gridproxy_curtail::driver::{self, Audit, DriverConfig, Edge};
    use gridproxy_curtail::fleet::Fleet;
    use gridproxy_curtail::policy::{PolicyConfig, Staleness};
    use gridproxy_curtail::signal::{DispatchSignal, Signal};
    use gridproxy_curtail::time::{Clock, ScaledClock};

    bounded(async {
        let surface = ControlSurface::Whatsminer;
        let (emu, fleet) = setup(surface, 34, PASSWORD).await;
        let mut telemetry = FleetActuator::new(TIMEOUT);
        telemetry.insert(
            M,
            &MinerEndpoint::new(surface, emu.addr()).with_credentials("root", PASSWORD),
        );
        // Virtual time 20× real: the sleep's verification window (latency +
        // 30 s grace) is about 2 s; the reboot takes 1 s of it.
        let clock = ScaledClock::new(20.0);
        let dir = std::env::temp_dir().join(format!("curtail-reboot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ledger = dir.join("ledger.db");
        let _ = std::fs::remove_file(&ledger);
        let h = driver::spawn(
            &ledger,
            PolicyConfig {
                staleness: Staleness::NONE,
                ..PolicyConfig::default()
            },
            Fleet::from_specs([spec(surface)]).unwrap(),
            Edge {
                actuator: fleet,
                telemetry,
                clock,
            },
            DriverConfig {
                poll_interval: Duration::from_secs(1),
                ..DriverConfig::default()
            },
        )
        .await
        .unwrap();
        emu.set_fault(Fault::RebootOnSleep(Duration::from_secs(1)));
        h.send(Signal::Dispatch(DispatchSignal {
            at: clock.now(),
            target_kw: Some(0.0),
        }))
        .await
        .unwrap();
        // The reboot happened (the fault fired) and the miner came back.
        let rebooted = |emu: &EmulatorHandle| emu.faults().get() == Fault::None;
        while !rebooted(&emu) {
            tokio::time::sleep(POLL).await;
        }
        let asleep = |emu: &EmulatorHandle| {
            let s = emu.state();
            s.mode == Mode::Sleeping && s.settled
        };
        let deadline = Instant::now() + Duration::from_secs(15);
        while !(asleep(&emu) && h.status().in_flight == 0) && Instant::now() < deadline {
            tokio::time::sleep(POLL).await;
        }
        let st = h.status();
        let report = h.shutdown().await.unwrap();
        let audit = Audit::read(&ledger).unwrap();
        let actions: Vec<Action> = audit.commands.iter().map(|c| c.action).collect();
        let _ = std::fs::remove_dir_all(&dir);
        assert!(
            asleep(&emu),
            "miner asleep at 0 kW: {:?}, commands {actions:?}, driver {st:?}",
            emu.state()
        );
        assert!(
            actions.len() >= 2 && actions.iter().all(|a| *a == Action::Sleep),
            "the sleep sent again, nothing else: {actions:?}"
        );
        assert!(st.telemetry_errors > 0, "the reboot was seen: {st:?}");
        assert_eq!(report.unanswered, 0);
    })
    .await;
}
