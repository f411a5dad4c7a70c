//! Running `[site]`: the driver with its ledger, the firmware clients, the
//! proxy's park actuator, every signal source, and operator commands.

use super::config::*;
use super::park::ProxyActuator;
use super::view::{self, MinerInfo};
use crate::site::handle::{SiteCommand, SiteHandle};
use curtail::actuators::{FleetActuator, HostPort, MinerEndpoint};
use curtail::command::Ack;
use curtail::driver::{self, DriverConfig, DriverHandle, Edge, Record, Route};
use curtail::fleet::MinerId;
use curtail::ledger::{Ledger, Location};
use curtail::policy::PolicyEvent;
use curtail::signal::{DrTarget, ManualOverride, OverrideMode, Signal};
use curtail::time::{Clock, SystemClock};
use gridproxy_curtail as curtail;
use gridproxy_grid::{mqtt, openadr, price, site_load};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Where command latencies go (action, outcome, seconds): the app's
/// metrics, kept out of this module so the site does not depend on them.
pub type LatencySink = Arc<dyn Fn(&'static str, &'static str, f64) + Send + Sync>;

/// What the commit hook keeps between commits for the operator log and the
/// command-latency metric: when each command was issued, and the commands
/// sent since the last log line. (The site view itself comes from the
/// driver's status: see [`super::view`].)
#[derive(Default)]
pub(crate) struct CommandLog {
    issued_at: Mutex<HashMap<u64, (Instant, &'static str)>>,
    /// Commands sent since the last log line, by action.
    pending: Mutex<HashMap<&'static str, usize>>,
}

impl CommandLog {
    /// One log line for the commands sent since the last call.
    pub(crate) fn flush_commands(&self, site: &SiteHandle) {
        let p = std::mem::take(&mut *lock(&self.pending));
        if p.is_empty() {
            return;
        }
        let mut parts: Vec<String> = p.iter().map(|(a, n)| format!("{a} ×{n}")).collect();
        parts.sort();
        site.log
            .push("curtail", format!("commands sent: {}", parts.join(", ")));
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The driver's commit hook: writes the site log and times commands from
/// issue to acknowledgement. Miners are named from `names` (else by id).
/// With `log_each_commit` every batch of commands gets its log line at
/// once; without, they gather until [`CommandLog::flush_commands`].
pub(crate) fn hook(
    tracker: Arc<CommandLog>,
    site: Arc<SiteHandle>,
    latency: Option<LatencySink>,
    names: Arc<HashMap<MinerId, String>>,
    log_each_commit: bool,
) -> driver::CommitHook {
    let name = move |id: MinerId| names.get(&id).cloned().unwrap_or_else(|| id.to_string());
    Arc::new(move |r: &Record| match r {
        Record::Commands(cs) => {
            let now = Instant::now();
            {
                let mut issued = lock(&tracker.issued_at);
                let mut by = lock(&tracker.pending);
                for c in cs {
                    issued.insert(c.id.0, (now, c.action.as_str()));
                    *by.entry(c.action.as_str()).or_default() += 1;
                }
            }
            if log_each_commit {
                tracker.flush_commands(&site);
            }
        }
        Record::Ack { id, ack, .. } => {
            let e = lock(&tracker.issued_at).remove(&id.0);
            if let (Some((t, action)), Some(record)) = (e, &latency) {
                let outcome = if matches!(ack, Ack::Ok) {
                    "ok"
                } else {
                    "failed"
                };
                record(action, outcome, t.elapsed().as_secs_f64());
            }
            if let Ack::Failed(why) = ack {
                site.log
                    .push("curtail", format!("command {id} failed: {why}"));
            }
        }
        Record::Event(PolicyEvent::Decision(d)) => site.log.push(
            "curtail",
            format!(
                "plan: mode {}, {} changes, expect {:.0} kW{} ({})",
                d.mode.as_str(),
                d.changes,
                d.expected_kw,
                d.cap_kw
                    .map(|c| format!(", cap {c:.0} kW"))
                    .unwrap_or_default(),
                d.reason
            ),
        ),
        Record::Event(PolicyEvent::DrEvent {
            event,
            state,
            baseline_kw,
            ..
        }) => {
            let target = match event.target {
                DrTarget::LimitKw(k) => format!("limit {k:.0} kW"),
                DrTarget::ShedKw(k) => format!("shed {k:.0} kW"),
            };
            site.log.push(
                "dr_event",
                format!(
                    "{}: {} ({target}, baseline {baseline_kw:.0} kW)",
                    event.id,
                    state.as_str()
                ),
            );
        }
        Record::Event(PolicyEvent::Escalated {
            miner, from, to, ..
        }) => site.log.push(
            "curtail",
            format!(
                "{}: {} failed, escalating to {}",
                name(*miner),
                from.as_str(),
                to.as_str()
            ),
        ),
        Record::Event(PolicyEvent::Unresponsive { miner, .. }) => site
            .log
            .push("curtail", format!("{}: unresponsive", name(*miner))),
        Record::Event(PolicyEvent::SafeState { stale, .. }) => site.log.push(
            "curtail",
            match stale {
                Some(s) => format!("safe state: {s} is stale"),
                None => "safe state left".into(),
            },
        ),
        _ => {}
    })
}

/// A running site: driver, sources, publisher. Stop it with [`RunningSite::stop`].
pub struct RunningSite {
    driver: DriverHandle,
    mqtt: Option<mqtt::MqttHandle>,
    ven: Option<openadr::VenHandle>,
    stop: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    site: Arc<SiteHandle>,
    /// One line per part started (for the operator).
    pub started: Vec<String>,
    /// The ledger.
    pub ledger: Location,
}

impl RunningSite {
    /// Whether the driver has stopped by itself (an error: its ledger
    /// writer failed, its commands were fenced, its lease lapsed).
    pub fn driver_stopped(&self) -> bool {
        self.driver.is_finished()
    }

    /// Stop the sources, then the driver (waiting for answers to commands
    /// in flight, so the ledger is complete).
    pub async fn stop(self) {
        self.stop.cancel();
        if let Some(m) = self.mqtt {
            m.shutdown().await;
        }
        if let Some(v) = self.ven {
            v.stop().await;
        }
        for t in self.tasks {
            let _ = t.await;
        }
        // Not running the engine: this instance pushes to no peer now.
        self.site.set_peer(None);
        match self.driver.shutdown().await {
            Ok(r) => tracing::info!(
                issued = r.status.issued,
                verified = r.status.verified,
                failed = r.status.failed,
                unanswered = r.unanswered,
                "curtailment driver stopped"
            ),
            Err(e) => tracing::warn!(error = %e, "curtailment driver stopped with an error"),
        }
    }
}

/// Start the site: engine, driver and ledger, firmware clients, the proxy's
/// park actuator over `router`, every configured signal source, and the link
/// to the control API (`site`: state published, operator commands obeyed).
pub async fn start(
    cfg: &SiteConfig,
    router: Arc<gridproxy_proxy::router::Router>,
    site: Arc<SiteHandle>,
    latency: Option<LatencySink>,
    shutdown: CancellationToken,
    fence: Option<(curtail::ledger::Lease, curtail::ledger::Deadline)>,
) -> anyhow::Result<RunningSite> {
    let stop = shutdown.child_token();
    let fleet = cfg
        .fleet()
        .map_err(|e| anyhow::anyhow!("site.miners: {e}"))?;
    let nominal_kw = fleet.nominal_kw();
    let timeout = Duration::from_millis(cfg.client_timeout_ms);
    let mut firmware = FleetActuator::new(timeout);
    let proxy = ProxyActuator::new(router, site.parks.clone());
    let mut names = HashMap::new();
    let mut info: Vec<(MinerId, &MinerConfig)> = Vec::new();
    for (i, m) in cfg.miners.iter().enumerate() {
        let id = miner_id(&m.name);
        let key = format!("site.miners[{i}].password");
        let password = resolve_secret(&key, &m.password, &m.password_env, &m.password_file)?
            .unwrap_or_default();
        let at = m
            .endpoint()
            .map_err(|e| anyhow::anyhow!("site.miners[{i}].address: {e}"))?;
        let mut ep = MinerEndpoint::new(m.firmware.surface(), HostPort::new(at.host, at.port))
            .with_credentials(
                m.username.clone().unwrap_or_else(|| "root".into()),
                password,
            );
        if m.firmware == FirmwareKind::Antminer {
            let web = m
                .web_endpoint()
                .map_err(|e| anyhow::anyhow!("site.miners[{i}].web: {e}"))?;
            ep = ep.with_web(HostPort::new(web.host, web.port));
        }
        if m.firmware == FirmwareKind::Whatsminer {
            let api = m
                .whatsminer_api()
                .map_err(|e| anyhow::anyhow!("site.miners[{i}].address: {e}"))?;
            ep = ep.with_whatsminer_api(api);
        }
        firmware.insert(id, &ep);
        if let Some(w) = &m.worker {
            proxy.insert(id, w.clone());
        }
        names.insert(id, m.name.clone());
        info.push((id, m));
    }
    let firmware = Arc::new(firmware);
    let telemetry = firmware.clone();
    let tracker = Arc::new(CommandLog::default());
    let names = Arc::new(names);
    let ledger = cfg.ledger_location()?;
    if let Some(dir) = ledger.path().and_then(|p| p.parent()) {
        if !dir.as_os_str().is_empty() && !dir.is_dir() {
            anyhow::bail!("site.ledger: folder {} does not exist", dir.display());
        }
    }
    site.set_ledger(ledger.clone());
    // Miners left parked before a restart stay parked in the new router.
    let loc = ledger.clone();
    let resume = tokio::task::spawn_blocking(move || Ledger::open_and_recover(loc).map(|(_, r)| r))
        .await?
        .map_err(|e| anyhow::anyhow!("site.ledger ({ledger}): {e}"))?;
    proxy.restore(&resume);
    let peer_fence = fence.as_ref().map(|(l, _)| (l.holder.clone(), l.token));
    let dcfg = DriverConfig {
        poll_interval: Duration::from_secs(cfg.telemetry_secs),
        interval: Duration::from_secs(cfg.ledger_interval_secs),
        drain_timeout: Duration::from_secs(5),
        ledger_fault_timeout: Duration::from_secs(cfg.ledger_fault_secs),
        on_ledger_fault: cfg.on_ledger_fault.safe_state(),
        ledger_max_bytes: cfg.ledger_max_mib.map(|m| m.saturating_mul(1 << 20)),
        send_deadline: fence.as_ref().map(|(_, d)| d.clone()),
        fence: fence.map(|(l, _)| l),
        commit_hook: Some(hook(
            tracker.clone(),
            site.clone(),
            latency,
            names.clone(),
            true,
        )),
        ..DriverConfig::default()
    };
    let drv = driver::spawn(
        &ledger,
        cfg.policy(),
        fleet,
        Edge {
            actuator: Route {
                firmware,
                proxy: proxy.clone(),
            },
            telemetry,
            clock: SystemClock,
        },
        dcfg,
    )
    .await
    .map_err(|e| anyhow::anyhow!("curtailment driver ({ledger}): {e}"))?;

    let mut started = vec![format!(
        "curtailment engine: {} miners, {:.1} kW nameplate; ledger {}",
        cfg.miners.len(),
        nominal_kw,
        cfg.ledger.display()
    )];
    let mut tasks = Vec::new();
    if !cfg.peers.is_empty() {
        let (from, token) = match &peer_fence {
            Some((holder, token)) => (holder.clone(), Some(*token)),
            None => ("gridproxy".to_string(), None),
        };
        tasks.extend(super::peers::spawn(
            &cfg.peers,
            Duration::from_secs(cfg.peer_sync_secs),
            from,
            token,
            site.clone(),
            stop.clone(),
        )?);
        started.push(format!(
            "site peers: parks and pins pushed to {} every {} s and on each change",
            cfg.peers
                .iter()
                .map(|p| format!("{} ({})", p.name, p.address))
                .collect::<Vec<_>>()
                .join(", "),
            cfg.peer_sync_secs
        ));
    }

    // What the sources read back: site status (MQTT) and site kW (VEN).
    let (status_tx, status_rx) = watch::channel(mqtt::SiteStatus::default());
    let (kw_tx, kw_rx) = watch::channel(0.0f64);

    let sig = &cfg.signals;
    let mqtt = match &sig.mqtt {
        Some(q) => {
            let (host, port, tls) =
                mqtt_broker(q).map_err(|e| anyhow::anyhow!("site.signals.mqtt.broker: {e}"))?;
            let password = resolve_secret(
                "site.signals.mqtt.password",
                &q.password,
                &q.password_env,
                &q.password_file,
            )?;
            let c = mqtt_config(q, host.clone(), port, tls, password);
            let topic = c.dispatch_topic.clone();
            let h = mqtt::spawn(c, nominal_kw, drv.signals(), status_rx, SystemClock)
                .map_err(|e| anyhow::anyhow!("site.signals.mqtt: {e}"))?;
            started.push(format!(
                "MQTT dispatch: broker {}{host}:{port}, topic {topic}, silence {} s -> {:?}",
                if tls { "mqtts://" } else { "" },
                q.silence_timeout_secs,
                q.on_silence
            ));
            Some(h)
        }
        None => None,
    };
    let ven = match &sig.openadr {
        Some(o) => {
            let secret = resolve_secret(
                "site.signals.openadr.client_secret",
                &o.client_secret,
                &o.client_secret_env,
                &o.client_secret_file,
            )?
            .unwrap_or_default();
            let mut c = openadr::VenConfig::new(&o.vtn_url, &o.client_id, &secret, &o.ven_name);
            c.token_url = o.token_url.clone();
            c.tls.ca_file = o.ca_file.clone();
            c.programs = o.programs.clone();
            c.poll_interval = Duration::from_secs(o.poll_secs);
            c.websocket = o.websocket;
            c.report_interval = Duration::from_secs(o.report_secs);
            c.request_timeout = Duration::from_secs(o.request_timeout_secs);
            if let Some(sh) = o.simple_shed {
                c.mapping.simple_shed = sh;
            }
            started.push(format!("OpenADR 3 VEN {:?}: VTN {}", o.ven_name, o.vtn_url));
            Some(
                openadr::spawn_ven(c, drv.signals(), kw_rx)
                    .map_err(|e| anyhow::anyhow!("site.signals.openadr: {e}"))?,
            )
        }
        None => None,
    };
    if let Some(p) = &sig.price {
        let (url, format) = match (&p.ercot_csv_url, &p.json_url) {
            (Some(u), _) => (
                u.clone(),
                price::feed::Format::ErcotRtm(price::ercot::RtmOptions::new(
                    p.settlement_point.as_deref().unwrap_or_default(),
                )),
            ),
            (None, Some(u)) => (
                u.clone(),
                price::feed::Format::Json(price::json::JsonFormat {
                    price: p.json_price.clone(),
                    time: (!p.json_time.is_empty()).then(|| p.json_time.clone()),
                    ..Default::default()
                }),
            ),
            (None, None) => anyhow::bail!("site.signals.price: no URL"),
        };
        let mut pc = price::feed::PollConfig::new(&url, format, Duration::from_secs(p.poll_secs));
        pc.timeout = Duration::from_secs(p.timeout_secs);
        pc.max_skew = Duration::from_secs(cfg.max_clock_skew_secs);
        let feed = price::feed::PriceFeed::new(pc)
            .map_err(|e| anyhow::anyhow!("site.signals.price: {e}"))?;
        tasks.push(tokio::spawn(feed.run(
            drv.signals(),
            SystemClock,
            stop.clone(),
        )));
        started.push(format!(
            "price feed: {url} every {} s (stale after {} s -> {:?})",
            p.poll_secs, p.max_age_secs, p.on_stale
        ));
    }
    if let Some(m) = &sig.site_load {
        let meter = if let Some(u) = &m.prometheus_url {
            site_load::Meter::Prometheus(site_load::prometheus::PrometheusMeter {
                base_url: u.clone(),
                query: m.prometheus_query.clone().unwrap_or_default(),
                factor: m.factor,
            })
        } else if let Some(a) = &m.modbus {
            use site_load::modbus::{DataType, RegisterKind, WordOrder};
            site_load::Meter::Modbus(site_load::modbus::ModbusMeter {
                addr: modbus_endpoint(a)
                    .map_err(|e| anyhow::anyhow!("site.signals.site_load.modbus: {e}"))?
                    .to_string(),
                unit: m.modbus_unit,
                kind: match m.modbus_table {
                    ModbusTable::Holding => RegisterKind::Holding,
                    ModbusTable::Input => RegisterKind::Input,
                },
                address: m.modbus_register,
                data_type: match m.modbus_type {
                    ModbusType::U16 => DataType::U16,
                    ModbusType::I16 => DataType::I16,
                    ModbusType::U32 => DataType::U32,
                    ModbusType::I32 => DataType::I32,
                    ModbusType::F32 => DataType::F32,
                },
                word_order: match m.modbus_word_order {
                    ModbusWordOrder::HighFirst => WordOrder::HighFirst,
                    ModbusWordOrder::LowFirst => WordOrder::LowFirst,
                },
                scale: m.factor,
            })
        } else {
            site_load::Meter::HttpJson(site_load::http_json::HttpJsonMeter {
                url: m.http_json_url.clone().unwrap_or_default(),
                pointer: m.http_json_pointer.clone().unwrap_or_default(),
                factor: m.factor,
            })
        };
        let what = match &meter {
            site_load::Meter::Prometheus(p) => format!("Prometheus {}", p.base_url),
            site_load::Meter::Modbus(p) => format!("Modbus {}", p.addr),
            site_load::Meter::HttpJson(p) => format!("HTTP JSON {}", p.url),
        };
        let poller = site_load::Poller::new(
            meter,
            site_load::PollConfig {
                interval: Duration::from_millis(m.poll_ms),
                timeout: Duration::from_millis(m.timeout_ms),
                max_kw: m.max_kw,
            },
        )
        .map_err(|e| anyhow::anyhow!("site.signals.site_load: {e}"))?;
        let (_status, task) = site_load::spawn(poller, SystemClock, drv.signals(), stop.clone());
        tasks.push(task);
        started.push(format!(
            "site-load meter: {what} every {} ms (stale after {} s -> {:?})",
            m.poll_ms, m.max_age_secs, m.on_stale
        ));
    }
    if sig.mqtt.is_none() && sig.openadr.is_none() && sig.price.is_none() && sig.site_load.is_none()
    {
        started.push("no [site.signals]: curtailment follows the control API only".into());
    }

    // Operator commands from the control API.
    let rx = site.attach(64);
    tasks.push(tokio::spawn(operator_commands(
        rx,
        drv.signals(),
        site.clone(),
        {
            let status = drv.watch();
            move || {
                let st = status.borrow().clone();
                st.measured_kw.unwrap_or(st.expected_kw)
            }
        },
        stop.clone(),
    )));

    // The publisher: site state for the API, status for MQTT, kW for the VEN.
    let inventory: Vec<MinerInfo> = info
        .iter()
        .map(|(id, m)| MinerInfo {
            id: *id,
            key: m.worker.clone().unwrap_or_else(|| m.name.clone()),
            model: m.model.clone().unwrap_or_default(),
            firmware: m.firmware.as_str().to_string(),
        })
        .collect();
    tasks.push(view::spawn_publisher(
        site.clone(),
        drv.watch(),
        Arc::new(inventory),
        nominal_kw,
        view::Feeds {
            site_kw: Some(kw_tx),
            mqtt: Some(status_tx),
        },
        Duration::from_secs(1),
        stop.clone(),
    ));
    site.log.push("curtail", started.join("; "));
    Ok(RunningSite {
        driver: drv,
        mqtt,
        ven,
        stop,
        tasks,
        site,
        started,
        ledger,
    })
}

/// Turn the control API's site commands into manual overrides; `now_kw`
/// is the site's draw a shed is taken from.
pub(crate) async fn operator_commands(
    mut rx: tokio::sync::mpsc::Receiver<SiteCommand>,
    signals: tokio::sync::mpsc::Sender<Signal>,
    site: Arc<SiteHandle>,
    now_kw: impl Fn() -> f64,
    stop: CancellationToken,
) {
    loop {
        let c = tokio::select! {
            _ = stop.cancelled() => return,
            c = rx.recv() => match c { Some(c) => c, None => return },
        };
        let at = SystemClock.now();
        let (mode, by, note) = match c {
            SiteCommand::CapKw { kw, by } => {
                (OverrideMode::CapKw(kw), by, Some(format!("cap {kw:.0} kW")))
            }
            SiteCommand::ShedKw { kw, by } => {
                let cap = (now_kw() - kw).max(0.0);
                (
                    OverrideMode::CapKw(cap),
                    by,
                    Some(format!("shed {kw:.0} kW (cap {cap:.0} kW)")),
                )
            }
            SiteCommand::CurtailAll { by } => {
                (OverrideMode::CurtailAll, by, Some("curtail all".into()))
            }
            SiteCommand::RunAll { by } => (OverrideMode::RunAll, by, Some("run all".into())),
            SiteCommand::Clear { by } => (OverrideMode::Clear, by, None),
        };
        site.set_override_note(note);
        let s = Signal::Override(ManualOverride {
            at,
            mode,
            until: None,
            by,
        });
        if signals.send(s).await.is_err() {
            return;
        }
    }
}
