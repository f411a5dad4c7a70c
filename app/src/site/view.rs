//! The site view: what the dashboard, `/api/v1/fleet` (`site`), the MQTT status and
//! the VEN's reports show, built from the driver's published status alone
//! (each miner's commanded state and last reading, open DR events, the last
//! price), so nothing beside the engine tracks state of its own.

use crate::site::handle::{
    now_ms, CommandCounts, DrEventView, LedgerView, MinerView, SignalCounts, SiteHandle, SiteState,
};
use gridproxy_curtail::driver::DriverStatus;
use gridproxy_curtail::fleet::MinerId;
use gridproxy_grid::mqtt;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// What the inventory says of one miner (the driver knows it by id only).
#[derive(Debug, Clone)]
pub struct MinerInfo {
    /// Ledger id.
    pub id: MinerId,
    /// Worker name through this proxy, else the inventory name: the view's key.
    pub key: String,
    /// Model, e.g. `S19j Pro`.
    pub model: String,
    /// Firmware / control surface, e.g. `luxos`.
    pub firmware: String,
}

/// Where the publisher sends what the grid sources read back.
#[derive(Default)]
pub struct Feeds {
    /// Site kW for the VEN's reports.
    pub site_kw: Option<watch::Sender<f64>>,
    /// Site status for MQTT.
    pub mqtt: Option<watch::Sender<mqtt::SiteStatus>>,
}

/// The site state and per-miner view for one driver status.
pub fn build(
    st: &DriverStatus,
    inventory: &[MinerInfo],
    nominal_kw: f64,
    override_note: Option<String>,
) -> (SiteState, HashMap<String, MinerView>) {
    let (mut curtailed, mut ths, mut measured_w) = (0usize, 0.0, 0.0);
    let mut views = HashMap::with_capacity(inventory.len());
    for m in inventory {
        let status = st.miners.get(m.id);
        let state = status.map_or_else(|| "unknown".to_string(), |s| s.commanded.to_string());
        if status.is_some_and(|s| s.commanded.is_curtailed()) {
            curtailed += 1;
        }
        let (p, h) = status
            .and_then(|s| s.telemetry)
            .map_or((0.0, 0.0), |t| (t.power_w, t.hashrate_ths));
        ths += h;
        measured_w += p;
        views.insert(
            m.key.clone(),
            MinerView {
                worker: m.key.clone(),
                model: m.model.clone(),
                firmware: m.firmware.clone(),
                state,
                power_w: p,
                ths: h,
            },
        );
    }
    let events = st
        .dr_events
        .iter()
        .map(|e| DrEventView {
            id: e.id.clone(),
            state: e.state.as_str().to_string(),
            target: e.target_text(),
            limit_kw: Some(e.limit_kw),
            start_ms: e.start.as_millis(),
            end_ms: e.end.map(|t| t.as_millis()),
        })
        .collect();
    let state = SiteState {
        attached: true,
        lease: None,
        peers: Vec::new(),
        parks: 0,
        updated_ms: now_ms(),
        site_kw: st.measured_kw.unwrap_or(measured_w / 1000.0),
        target_kw: st.cap_kw,
        expected_kw: st.expected_kw,
        nominal_kw,
        price_usd_per_mwh: st.price_usd_per_mwh,
        mode: st.mode.as_str().to_string(),
        fleet_ths: ths,
        miners_total: inventory.len(),
        miners_curtailed: curtailed,
        events,
        commands: CommandCounts {
            issued: st.issued,
            verified: st.verified,
            failed: st.failed,
        },
        driver_running: true,
        ledger: LedgerView {
            error: st.ledger.error.clone(),
            failing_secs: st
                .ledger
                .failing_since
                .map(|t| st.now.saturating_since(t).as_secs()),
            fault_engaged: st.ledger.fault_engaged,
            write_errors: st.ledger.write_errors,
            dropped: st.ledger.dropped,
            unrecorded_commands: st.ledger.unrecorded_commands,
        },
        signals: SignalCounts {
            received: st.signals,
            refused: st.rejected_signals,
            duplicate: st.duplicate_signals,
            rate_limited: st.rate_limited_signals,
        },
        override_note,
    };
    (state, views)
}

/// Publish the view every `every` until `stop`: to the API's site handle,
/// and the site kW and status to the grid sources that report them.
pub fn spawn_publisher(
    site: Arc<SiteHandle>,
    status: watch::Receiver<DriverStatus>,
    inventory: Arc<Vec<MinerInfo>>,
    nominal_kw: f64,
    feeds: Feeds,
    every: Duration,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let st = status.borrow().clone();
            let (mut state, views) = build(&st, &inventory, nominal_kw, site.override_note());
            // The driver holds the sender: gone means the driver stopped.
            state.driver_running = status.has_changed().is_ok();
            if let Some(tx) = &feeds.site_kw {
                let _ = tx.send(state.site_kw);
            }
            if let Some(tx) = &feeds.mqtt {
                let _ = tx.send(
                    mqtt::SiteStatus {
                        miners_running: state.miners_total - state.miners_curtailed,
                        miners_asleep: state.miners_curtailed,
                        ..Default::default()
                    }
                    .with_engine(st.mode, st.cap_kw, Some(state.site_kw)),
                );
            }
            site.publish_miners(views);
            site.publish(state);
        }
    })
}
