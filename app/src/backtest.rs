//! `gridproxy backtest`: replay a price trace through the curtailment
//! engine on a virtual clock and compare its profit with running flat out
//! and with a perfect-foresight oracle.
//!
//! - **Engine**: the same [`Engine`] the driver runs (same dwell, command
//!   rate, restore batching, hysteresis), fed one price signal per trace
//!   interval (no forecast), with ideal actuators: every command is
//!   acknowledged and takes effect after the firmware's ramp time, confirmed
//!   by telemetry. Energy and revenue are integrated between events.
//! - **Always on**: every miner at nameplate all the time.
//! - **Oracle**: knows every price in advance. Per miner model, a dynamic
//!   program over the trace's intervals chooses on or off for each whole
//!   interval to maximise hash revenue − energy cost, subject to the same
//!   min-on/min-off dwell as the engine (counted in whole intervals, rounded
//!   up). It may switch only at interval boundaries but its switches take
//!   effect instantly (no ramp), and it draws standby power while off. It
//!   may not run a miner at partial power (the engine in price mode does not
//!   either), and it has no fleet cap or DR obligations: it is an upper
//!   bound on what price response alone can earn, given the dwell.
//!
//! Traces: ERCOT RTM settlement-point price CSV (as shipped in
//! `fixtures/traces/`, parsed by [`gridproxy_grid::price::ercot`]) or the
//! demo's `price[,dr:FRACTION:START:LEN]` lines. Fleets: the demo's mix of
//! models and firmwares, or a TOML file ([`FleetFile`]).

use crate::mix::{counts, parse_trace, surface, trace, TraceStep};
use curtail::command::{Ack, Action};
use curtail::fleet::{Fleet, MinerId, MinerSpec, Telemetry};
use curtail::policy::{
    Economics, Engine, Freshness, PolicyConfig, PolicyEvent, SafeState, Staleness,
};
use curtail::signal::{DrEvent, DrTarget, PriceSignal, Signal};
use curtail::time::Timestamp;
use gridproxy_curtail as curtail;
use gridproxy_fixtures::site::Firmware;
use gridproxy_grid::price::ercot::{self, RtmOptions};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::Duration;

/// A fleet file (TOML): economics and one entry per model.
///
/// ```toml
/// hashprice_usd_per_ph_day = 55.0
/// pool_fee = 0.02
/// pue = 1.0
/// [[miners]]
/// model = "S19j Pro"
/// count = 60
/// ths = 104.0
/// watts = 3068.0
/// sleep_w = 18.0          # optional, default 0.6 % of watts
/// firmware = "braiinsos"  # optional (ramp times), default luxos
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetFile {
    /// Hashprice, $/PH/s/day.
    pub hashprice_usd_per_ph_day: Option<f64>,
    /// Pool fee, 0..1.
    pub pool_fee: Option<f64>,
    /// Site PUE (≥ 1).
    pub pue: Option<f64>,
    /// Models.
    pub miners: Vec<FleetEntry>,
}

/// One model in a [`FleetFile`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetEntry {
    /// Model name.
    pub model: String,
    /// How many.
    pub count: usize,
    /// Nameplate hashrate, TH/s.
    pub ths: f64,
    /// Nameplate power, W.
    pub watts: f64,
    /// Standby power asleep, W.
    pub sleep_w: Option<f64>,
    /// Firmware (ramp times): luxos, braiinsos, whatsminer, vnish, stock.
    pub firmware: Option<String>,
}

fn firmware(name: Option<&str>) -> anyhow::Result<Firmware> {
    Ok(
        match name.unwrap_or("luxos").to_ascii_lowercase().as_str() {
            "luxos" => Firmware::LuxOs,
            "braiins" | "braiinsos" | "bos" => Firmware::BraiinsOs,
            "whatsminer" => Firmware::Whatsminer,
            "vnish" => Firmware::Vnish,
            "stock" | "cgminer" => Firmware::Stock,
            other => anyhow::bail!(
                "firmware {other:?}: want luxos, braiinsos, whatsminer, vnish or stock"
            ),
        },
    )
}

impl FleetFile {
    /// Parse and check a fleet file.
    pub fn parse(text: &str) -> anyhow::Result<FleetFile> {
        let f: FleetFile = toml::from_str(text).map_err(|e| anyhow::anyhow!("fleet file: {e}"))?;
        anyhow::ensure!(!f.miners.is_empty(), "fleet file: no [[miners]]");
        anyhow::ensure!(
            f.miners.iter().map(|m| m.count).sum::<usize>() <= 1_000_000,
            "fleet file: more than 1,000,000 miners"
        );
        for m in &f.miners {
            let ok = |v: f64| v.is_finite() && v > 0.0;
            anyhow::ensure!(
                ok(m.ths) && ok(m.watts),
                "fleet file: {}: ths and watts must be > 0",
                m.model
            );
            anyhow::ensure!(
                m.sleep_w
                    .is_none_or(|s| s.is_finite() && s >= 0.0 && s < m.watts),
                "fleet file: {}: sleep_w must be in [0, watts)",
                m.model
            );
            firmware(m.firmware.as_deref())
                .map_err(|e| anyhow::anyhow!("fleet file: {}: {e}", m.model))?;
        }
        Ok(f)
    }

    fn specs(&self) -> anyhow::Result<Vec<MinerSpec>> {
        let mut out = Vec::new();
        for m in &self.miners {
            let fw = firmware(m.firmware.as_deref())?;
            for _ in 0..m.count {
                out.push(spec(
                    out.len() as u64,
                    &m.model,
                    m.ths,
                    m.watts,
                    m.sleep_w.unwrap_or(m.watts * 0.006),
                    fw,
                ));
            }
        }
        Ok(out)
    }
}

fn spec(id: u64, model: &str, ths: f64, w: f64, sleep_w: f64, fw: Firmware) -> MinerSpec {
    let r = fw.ramps();
    let mut spec = MinerSpec::new(MinerId(id), model, ths, w, surface(fw));
    spec.ramp.sleep_latency = r.sleep;
    spec.ramp.wake_latency = r.wake;
    spec.ramp.limit_latency = r.limit;
    spec.ramp.sleep_w = sleep_w;
    spec.ramp.min_power_w = (w * 0.6).floor();
    if fw == Firmware::Stock {
        spec.ramp.parked_w = sleep_w;
    }
    spec
}

/// How to run [`backtest`].
#[derive(Debug, Clone)]
pub struct BacktestOptions {
    /// Demo-format trace (`price[,dr:FRACTION:START:LEN]` per line); used
    /// when `prices` is `None`. `None`: the demo's.
    pub trace: Option<String>,
    /// ERCOT RTM settlement-point price CSV text.
    pub prices: Option<String>,
    /// Settlement point to take from `prices`.
    pub point: String,
    /// Length of one demo-format trace line (ERCOT traces carry their own).
    pub interval: Duration,
    /// Miners of the demo site's mix (when `fleet` is `None`).
    pub miners: usize,
    /// Fleet file; overrides `miners`.
    pub fleet: Option<FleetFile>,
    /// Hashprice, $ per PH/s per day (`None`: the fleet file's, else 55).
    pub hashprice: Option<f64>,
    /// Pool fee (`None`: the fleet file's, else 0.02).
    pub pool_fee: Option<f64>,
    /// Hysteresis half-band around breakevens, $/MWh.
    pub hysteresis: f64,
    /// Policy to run (economics, staleness are filled in); `None`: defaults
    /// (min on 300 s, min off 600 s).
    pub policy: Option<PolicyConfig>,
}

impl Default for BacktestOptions {
    fn default() -> Self {
        Self {
            trace: None,
            prices: None,
            point: "HB_HOUSTON".into(),
            interval: Duration::from_secs(300),
            miners: 500,
            fleet: None,
            hashprice: None,
            pool_fee: None,
            hysteresis: 4.0,
            policy: None,
        }
    }
}

/// Money and energy of one way of running the site.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Ledgerless {
    /// Energy, MWh.
    pub mwh: f64,
    /// Energy cost, $.
    pub cost: f64,
    /// Mining revenue after the pool fee, $.
    pub revenue: f64,
}

impl Ledgerless {
    /// Revenue − cost, $.
    pub fn profit(&self) -> f64 {
        self.revenue - self.cost
    }
}

/// Per model: the three ways of running it.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ModelResult {
    /// Model.
    pub model: String,
    /// Miners.
    pub count: usize,
    /// Breakeven energy price, $/MWh.
    pub breakeven: f64,
    /// Always on.
    pub always_on: Ledgerless,
    /// Engine.
    pub engine: Ledgerless,
    /// Oracle.
    pub oracle: Ledgerless,
    /// Hours the oracle ran one miner.
    pub oracle_on_hours: f64,
    /// Hours the engine ran one miner (mean).
    pub engine_on_hours: f64,
}

/// What [`backtest`] found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct BacktestReport {
    /// Trace intervals replayed.
    pub intervals: usize,
    /// Interval length, s.
    pub interval_s: f64,
    /// Simulated time, seconds.
    pub seconds: f64,
    /// First interval start (Unix ms).
    pub start_ms: u64,
    /// Miners.
    pub miners: usize,
    /// Nameplate, kW.
    pub nominal_kw: f64,
    /// Hashprice used.
    pub hashprice: f64,
    /// Every miner running all the time.
    pub flat_out: Ledgerless,
    /// Under the curtailment policy.
    pub policy: Ledgerless,
    /// Perfect-foresight oracle.
    pub oracle: Ledgerless,
    /// Per model.
    pub models: Vec<ModelResult>,
    /// Commands by action.
    pub commands: BTreeMap<&'static str, u64>,
    /// Commands that failed.
    pub failed: u64,
    /// DR events: (id, limit kW, highest draw while active kW, mean draw while active kW).
    pub dr: Vec<(String, f64, f64, f64)>,
}

impl BacktestReport {
    /// Engine profit ÷ oracle profit (`None` if the oracle makes no profit).
    pub fn ratio(&self) -> Option<f64> {
        let o = self.oracle.profit();
        (o > 0.0).then(|| self.policy.profit() / o)
    }

    /// Share of the oracle's gain over always-on that the engine captured:
    /// (engine − always-on) ÷ (oracle − always-on); defined even when every
    /// strategy loses money (e.g. standby draw through days at the cap).
    pub fn capture(&self) -> Option<f64> {
        let gap = self.oracle.profit() - self.flat_out.profit();
        (gap > 1e-9).then(|| (self.policy.profit() - self.flat_out.profit()) / gap)
    }

    /// Readable summary.
    pub fn text(&self) -> String {
        let row = |name: &str, l: &Ledgerless| {
            format!(
                "{name:<20} {:>10.2} MWh  cost ${:>13.2}  revenue ${:>11.2}  profit ${:>13.2}\n",
                l.mwh,
                l.cost,
                l.revenue,
                l.profit()
            )
        };
        let mut s = format!(
            "backtest: {} intervals of {:.0} s ({:.1} h), {} miners ({:.0} kW nameplate), hashprice ${:.2}/PH/day\n",
            self.intervals,
            self.interval_s,
            self.seconds / 3600.0,
            self.miners,
            self.nominal_kw,
            self.hashprice
        );
        s.push_str(&row("always on", &self.flat_out));
        s.push_str(&row("engine (policy)", &self.policy));
        s.push_str(&row("oracle (foresight)", &self.oracle));
        s.push_str(&format!(
            "avoided energy cost ${:.2}, mining revenue given up ${:.2}, profit gained over always-on ${:.2}\n",
            self.flat_out.cost - self.policy.cost,
            self.flat_out.revenue - self.policy.revenue,
            self.policy.profit() - self.flat_out.profit()
        ));
        match self.ratio() {
            Some(r) => s.push_str(&format!("engine/oracle profit ratio: {:.2} %\n", r * 100.0)),
            None => s.push_str("engine/oracle profit ratio: n/a (oracle profit <= 0)\n"),
        }
        if let Some(c) = self.capture() {
            s.push_str(&format!(
                "engine captured {:.2} % of the oracle's gain over always-on (engine ${:.2} short of the oracle)\n",
                c * 100.0,
                self.oracle.profit() - self.policy.profit()
            ));
        }
        s.push_str("per model (profit $):   breakeven    always-on       engine       oracle   engine/oracle\n");
        for m in &self.models {
            let r = if m.oracle.profit() > 0.0 {
                format!("{:.2} %", m.engine.profit() / m.oracle.profit() * 100.0)
            } else {
                "n/a".into()
            };
            s.push_str(&format!(
                "  {:<10} x{:<5} {:>9.2} {:>12.2} {:>12.2} {:>12.2}   {r}\n",
                m.model,
                m.count,
                m.breakeven,
                m.always_on.profit(),
                m.engine.profit(),
                m.oracle.profit()
            ));
        }
        s.push_str(&format!(
            "commands: {} ({}), failed {}\n",
            self.commands.values().sum::<u64>(),
            self.commands
                .iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect::<Vec<_>>()
                .join(", "),
            self.failed
        ));
        for (id, limit, max, mean) in &self.dr {
            s.push_str(&format!(
                "DR event {id}: limit {limit:.0} kW; while active: max {max:.0} kW, mean {mean:.0} kW ({})\n",
                if *max <= limit + 0.5 { "held" } else { "exceeded" }
            ));
        }
        s
    }
}

/// ERCOT RTM CSV as a uniform series: one step per interval from the first
/// row to the last, a missing interval holding the previous price.
pub fn ercot_steps(
    text: &str,
    point: &str,
) -> anyhow::Result<(Timestamp, Duration, Vec<TraceStep>)> {
    let p = ercot::parse_rtm(text, &RtmOptions::new(point))
        .map_err(|e| anyhow::anyhow!("price trace: {e}"))?;
    for e in p.errors.iter().take(5) {
        tracing::warn!("price trace: {e}; row skipped");
    }
    anyhow::ensure!(
        !p.rows.is_empty(),
        "price trace: no rows for settlement point {point} (points in file: {:?})",
        p.points
    );
    let step = Duration::from_secs(u64::from(p.interval_minutes) * 60);
    let t0 = p.rows[0].at;
    let last = p.rows[p.rows.len() - 1].at;
    let n = ((last - t0).as_millis() / step.as_millis()) as usize + 1;
    let mut out = Vec::with_capacity(n);
    let mut k = 0;
    for i in 0..n {
        let at = t0 + step * i as u32;
        while k + 1 < p.rows.len() && p.rows[k + 1].at <= at {
            k += 1;
        }
        out.push(TraceStep {
            price: p.rows[k].usd_per_mwh,
            dr: None,
        });
    }
    Ok((t0, step, out))
}

/// Per-interval profit of one miner on and off, $.
fn interval_profit(s: &MinerSpec, price: f64, rev_per_ths_h: f64, pue: f64, h: f64) -> (f64, f64) {
    let on = s.nominal_ths * rev_per_ths_h * h - s.nominal_w * pue / 1e6 * price * h;
    let off = -s.ramp.sleep_w * pue / 1e6 * price * h;
    (on, off)
}

/// Perfect-foresight schedule for one miner: on/off per interval maximising
/// profit with at least `min_on` intervals on after waking and `min_off` off
/// after sleeping. Starts on with its dwell satisfied (as the engine does).
pub fn oracle_schedule(
    on_profit: &[f64],
    off_profit: &[f64],
    min_on: usize,
    min_off: usize,
) -> Vec<bool> {
    let n = on_profit.len();
    let (a, b) = (min_on.max(1), min_off.max(1));
    // State: on with k intervals served (1..=a, a = free to switch), or off
    // likewise (1..=b). Index: on k -> k-1, off k -> a + k-1.
    let ns = a + b;
    let neg = f64::NEG_INFINITY;
    let mut val = vec![neg; ns];
    let mut back: Vec<Vec<u32>> = Vec::with_capacity(n);
    // Before interval 0: on, dwell served.
    let mut prev = vec![neg; ns];
    prev[a - 1] = 0.0;
    for t in 0..n {
        val.iter_mut().for_each(|v| *v = neg);
        let mut from = vec![u32::MAX; ns];
        let mut relax = |to: usize, v: f64, src: usize, val: &mut [f64]| {
            if v > val[to] {
                val[to] = v;
                from[to] = src as u32;
            }
        };
        for (s, &p) in prev.iter().enumerate() {
            if p == neg {
                continue;
            }
            if s < a {
                let k = s + 1;
                // stay on
                relax((k + 1).min(a) - 1, p + on_profit[t], s, &mut val);
                if k >= a {
                    relax(a, p + off_profit[t], s, &mut val); // switch off: off k=1
                }
            } else {
                let k = s - a + 1;
                relax(a + (k + 1).min(b) - 1, p + off_profit[t], s, &mut val);
                if k >= b {
                    relax(0, p + on_profit[t], s, &mut val); // switch on: on k=1
                }
            }
        }
        back.push(from);
        std::mem::swap(&mut prev, &mut val);
    }
    let mut s = (0..ns)
        .max_by(|&x, &y| prev[x].total_cmp(&prev[y]))
        .unwrap_or(0);
    let mut out = vec![false; n];
    for t in (0..n).rev() {
        out[t] = s < a;
        s = back[t][s] as usize;
    }
    out
}

/// Replay a price trace against the curtailment policy on a virtual clock,
/// with ideal actuators, and compare with always-on and the oracle.
pub fn backtest(opts: &BacktestOptions) -> anyhow::Result<BacktestReport> {
    let (t0, interval, steps) = match &opts.prices {
        Some(text) => ercot_steps(text, &opts.point)?,
        None => {
            let steps = match &opts.trace {
                Some(t) => parse_trace(t),
                None => trace(),
            };
            (Timestamp::from_secs(1_700_000_000), opts.interval, steps)
        }
    };
    anyhow::ensure!(!steps.is_empty(), "the trace has no price lines");
    anyhow::ensure!(
        steps.len() <= 1_000_000,
        "the trace has more than 1,000,000 intervals"
    );
    let hashprice = opts
        .hashprice
        .or(opts.fleet.as_ref().and_then(|f| f.hashprice_usd_per_ph_day))
        .unwrap_or(55.0);
    let pool_fee = opts
        .pool_fee
        .or(opts.fleet.as_ref().and_then(|f| f.pool_fee))
        .unwrap_or(0.02);
    let pue = opts.fleet.as_ref().and_then(|f| f.pue).unwrap_or(1.0);
    let specs = match &opts.fleet {
        Some(f) => f.specs()?,
        None => {
            anyhow::ensure!(opts.miners > 0, "miners must be > 0");
            // The demo site's composition, nominal figures, real ramp times.
            let mut specs = Vec::new();
            for (fw, n) in counts(opts.miners) {
                let models = fw.models();
                for k in 0..n {
                    let m = models[k % models.len()];
                    specs.push(spec(
                        specs.len() as u64,
                        m.name,
                        m.nominal_ths,
                        m.nominal_w,
                        m.sleep_w,
                        fw,
                    ));
                }
            }
            specs
        }
    };
    let fleet = Fleet::from_specs(specs.clone()).map_err(|e| anyhow::anyhow!("fleet: {e}"))?;
    let nominal_kw = fleet.nominal_kw();
    let economics = Economics {
        hashprice_usd_per_ph_day: hashprice,
        pool_fee,
        pue,
        hysteresis_usd_per_mwh: opts.hysteresis,
    };
    let policy = PolicyConfig {
        economics: Some(economics),
        staleness: Staleness {
            price: Some(Freshness {
                max_age: interval * 3,
                on_stale: SafeState::KeepRunning,
            }),
            ..Staleness::NONE
        },
        ..opts.policy.clone().unwrap_or_default()
    };
    let (min_on, min_off) = (policy.min_on, policy.min_off);
    let mut engine = Engine::new(policy, fleet, t0).map_err(|e| anyhow::anyhow!("policy: {e}"))?;
    let n = specs.len();
    // Per miner: power now (W), hashrate now (TH/s), limit (W).
    let mut power: Vec<f64> = specs.iter().map(|s| s.nominal_w).collect();
    let mut ths: Vec<f64> = specs.iter().map(|s| s.nominal_ths).collect();
    let mut limit: Vec<Option<u32>> = vec![None; n];
    let mut asleep = vec![false; n];
    let mut per: Vec<Ledgerless> = vec![Ledgerless::default(); n];
    let mut on_secs = vec![0.0f64; n];
    // Effects pending: (time, seq) -> (miner, power, ths).
    let mut effects: BTreeMap<(Timestamp, u64), (usize, f64, f64)> = BTreeMap::new();
    let mut seq = 0u64;
    for s in &specs {
        let t = Telemetry {
            at: t0,
            power_w: s.nominal_w,
            hashrate_ths: s.nominal_ths,
        };
        engine
            .handle_telemetry(t0, s.id, t)
            .map_err(|e| anyhow::anyhow!("telemetry: {e}"))?;
    }
    let end = t0 + interval * steps.len() as u32;
    let mut now = t0;
    let mut next_interval = 0usize;
    let mut price = steps[0].price;
    let mut rep = BacktestReport {
        intervals: steps.len(),
        interval_s: interval.as_secs_f64(),
        seconds: (end - t0).as_secs_f64(),
        start_ms: t0.as_millis(),
        miners: n,
        nominal_kw,
        hashprice,
        ..Default::default()
    };
    // DR events: id -> (limit, start, end, max, sum kW·s, seconds)
    let mut dr: Vec<(String, f64, Timestamp, Timestamp, f64, f64, f64)> = Vec::new();
    let rev_per_ths_s = hashprice / 1000.0 / 86_400.0 * (1.0 - pool_fee);
    while now < end {
        // Take effect, report telemetry.
        while let Some((&(t, k), _)) = effects.iter().next() {
            if t > now {
                break;
            }
            let (i, w, h) = effects.remove(&(t, k)).expect("present");
            power[i] = w;
            ths[i] = h;
            let tel = Telemetry {
                at: t,
                power_w: w,
                hashrate_ths: h,
            };
            engine
                .handle_telemetry(now, specs[i].id, tel)
                .map_err(|e| anyhow::anyhow!("telemetry: {e}"))?;
        }
        // Trace.
        while next_interval < steps.len() && t0 + interval * next_interval as u32 <= now {
            let s = &steps[next_interval];
            price = s.price;
            let sig = Signal::Price(PriceSignal {
                at: now,
                usd_per_mwh: s.price,
                forecast: vec![],
            });
            engine
                .handle_signal(now, sig)
                .map_err(|e| anyhow::anyhow!("price: {e}"))?;
            if let Some((frac, after, len)) = s.dr {
                let start = now + interval * after;
                let stop = start + interval * len;
                let lim = (nominal_kw * frac).round();
                let id = format!("dr-{}", dr.len() + 1);
                dr.push((id.clone(), lim, start, stop, 0.0, 0.0, 0.0));
                let ev = DrEvent {
                    id,
                    target: DrTarget::LimitKw(lim),
                    start,
                    end: Some(stop),
                    issued_at: now,
                };
                engine
                    .handle_signal(now, Signal::DrEvent(ev))
                    .map_err(|e| anyhow::anyhow!("dr event: {e}"))?;
            }
            next_interval += 1;
        }
        if engine.poll_timeout().is_some_and(|t| t <= now) {
            engine.handle_timeout(now);
        }
        while let Some(c) = engine.poll_action(now) {
            *rep.commands.entry(c.action.as_str()).or_default() += 1;
            let i = c.miner.0 as usize;
            let s = &specs[i];
            let hash_at = |w: f64| {
                let span = s.nominal_w - s.ramp.sleep_w;
                s.nominal_ths * ((w - s.ramp.sleep_w) / span).clamp(0.0, 1.0).powf(0.8)
            };
            let run_w = |l: Option<u32>| l.map(f64::from).unwrap_or(s.nominal_w);
            let effect = match c.action {
                Action::Sleep => {
                    asleep[i] = true;
                    Some((s.ramp.sleep_latency, s.ramp.sleep_w, 0.0))
                }
                Action::Wake => {
                    asleep[i] = false;
                    let w = run_w(limit[i]);
                    Some((s.ramp.wake_latency, w, hash_at(w)))
                }
                Action::SetPowerTarget(w) => {
                    limit[i] = (f64::from(w) < s.nominal_w).then_some(w);
                    if asleep[i] {
                        None
                    } else {
                        let w = run_w(limit[i]);
                        Some((s.ramp.limit_latency, w, hash_at(w)))
                    }
                }
                Action::Park => Some((Duration::ZERO, s.ramp.parked_w, 0.0)),
                Action::Unpark => Some((Duration::ZERO, s.nominal_w, s.nominal_ths)),
                Action::Reroute(_) => None,
            };
            engine
                .handle_ack(now, c.id, Ack::Ok)
                .map_err(|e| anyhow::anyhow!("ack: {e}"))?;
            if let Some((lat, w, h)) = effect {
                seq += 1;
                effects.insert((now + lat.max(Duration::from_millis(1)), seq), (i, w, h));
            }
        }
        while let Some(ev) = engine.poll_event() {
            if let PolicyEvent::CommandFailed { .. } = ev {
                rep.failed += 1;
            }
        }
        // Next instant.
        let mut next = end;
        if next_interval < steps.len() {
            next = next.min(t0 + interval * next_interval as u32);
        }
        if let Some(t) = engine.poll_timeout() {
            next = next.min(t.max(now + Duration::from_millis(1)));
        }
        if let Some((&(t, _), _)) = effects.iter().next() {
            next = next.min(t);
        }
        let next = next.max(now + Duration::from_millis(1));
        // Integrate over [now, next).
        let dt = (next - now).as_secs_f64();
        let mut kw = 0.0;
        for i in 0..n {
            let mwh = power[i] * pue * dt / 3600.0 / 1e6;
            per[i].mwh += mwh;
            per[i].cost += mwh * price;
            per[i].revenue += ths[i] * dt * rev_per_ths_s;
            if ths[i] > 0.0 {
                on_secs[i] += dt;
            }
            kw += power[i] / 1000.0;
        }
        for e in dr.iter_mut() {
            if now >= e.2 && now < e.3 {
                e.4 = e.4.max(kw);
                e.5 += kw * dt;
                e.6 += dt;
            }
        }
        now = next;
    }
    rep.dr = dr
        .into_iter()
        .map(|(id, lim, _, _, max, sum, secs)| {
            (id, lim, max, if secs > 0.0 { sum / secs } else { 0.0 })
        })
        .collect();

    // Always-on and oracle, per model (same model, same economics).
    let h = interval.as_secs_f64() / 3600.0;
    let rev_per_ths_h = rev_per_ths_s * 3600.0;
    let dwell = |d: Duration| (d.as_secs_f64() / interval.as_secs_f64()).ceil() as usize;
    let mut by_model: BTreeMap<(String, u64, u64, u64), Vec<usize>> = BTreeMap::new();
    for (i, s) in specs.iter().enumerate() {
        let key = (
            s.model.to_string(),
            s.nominal_ths.to_bits(),
            s.nominal_w.to_bits(),
            s.ramp.sleep_w.to_bits(),
        );
        by_model.entry(key).or_default().push(i);
    }
    for ((model, ..), idx) in by_model {
        let s = &specs[idx[0]];
        let k = idx.len() as f64;
        let (on, off): (Vec<f64>, Vec<f64>) = steps
            .iter()
            .map(|st| interval_profit(s, st.price, rev_per_ths_h, pue, h))
            .unzip();
        let plan = oracle_schedule(&on, &off, dwell(min_on), dwell(min_off));
        let mut m = ModelResult {
            model,
            count: idx.len(),
            breakeven: economics.breakeven_usd_per_mwh(s.j_per_th()),
            ..Default::default()
        };
        for (t, st) in steps.iter().enumerate() {
            let on_mwh = s.nominal_w * pue / 1e6 * h * k;
            m.always_on.mwh += on_mwh;
            m.always_on.cost += on_mwh * st.price;
            m.always_on.revenue += s.nominal_ths * rev_per_ths_h * h * k;
            let w = if plan[t] { s.nominal_w } else { s.ramp.sleep_w };
            let mwh = w * pue / 1e6 * h * k;
            m.oracle.mwh += mwh;
            m.oracle.cost += mwh * st.price;
            if plan[t] {
                m.oracle.revenue += s.nominal_ths * rev_per_ths_h * h * k;
                m.oracle_on_hours += h;
            }
        }
        for &i in &idx {
            m.engine.mwh += per[i].mwh;
            m.engine.cost += per[i].cost;
            m.engine.revenue += per[i].revenue;
            m.engine_on_hours += on_secs[i] / 3600.0 / k;
        }
        for (tot, part) in [
            (&mut rep.flat_out, m.always_on),
            (&mut rep.policy, m.engine),
            (&mut rep.oracle, m.oracle),
        ] {
            tot.mwh += part.mwh;
            tot.cost += part.cost;
            tot.revenue += part.revenue;
        }
        rep.models.push(m);
    }
    rep.models
        .sort_by(|a, b| a.breakeven.total_cmp(&b.breakeven));
    Ok(rep)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backtest_curtails_on_the_spike_and_holds_the_dr_limit() {
        let r = backtest(&BacktestOptions {
            miners: 100,
            ..Default::default()
        })
        .unwrap();
        assert!(r.policy.cost < r.flat_out.cost, "{}", r.text());
        assert!(r.policy.profit() > r.flat_out.profit(), "{}", r.text());
        assert_eq!(r.dr.len(), 1);
        assert!(
            r.commands.get("sleep").copied().unwrap_or(0) > 0,
            "{}",
            r.text()
        );
        assert_eq!(r.failed, 0, "{}", r.text());
    }

    #[test]
    fn oracle_respects_dwell_and_takes_every_profitable_interval() {
        // Without dwell: on exactly where on beats off.
        let on = [5.0, -3.0, 4.0, -1.0, -1.0, 2.0];
        let off = [0.0; 6];
        assert_eq!(
            oracle_schedule(&on, &off, 1, 1),
            vec![true, false, true, false, false, true]
        );
        // min-off 2: a single bad interval is not worth two off intervals.
        let plan = oracle_schedule(&on, &off, 1, 2);
        assert_eq!(plan, vec![true, true, true, false, false, true]);
        // Every off run is at least 2 long (the last may be cut by the end).
        let on = [1.0, -9.0, 1.0, -9.0, 1.0, 1.0, -9.0, 5.0];
        for (a, b) in [(1, 1), (2, 1), (1, 3), (3, 2)] {
            let p = oracle_schedule(&on, &[0.0; 8], a, b);
            let mut runs: Vec<(bool, usize)> = Vec::new();
            for x in &p {
                match runs.last_mut() {
                    Some((v, n)) if v == x => *n += 1,
                    _ => runs.push((*x, 1)),
                }
            }
            for (k, (v, len)) in runs.iter().enumerate() {
                let last = k + 1 == runs.len();
                let first = k == 0;
                if !last && !first {
                    assert!(*len >= if *v { a } else { b }, "{a},{b}: {p:?}");
                }
                if first && !*v && !last {
                    assert!(*len >= b, "{a},{b}: {p:?}");
                }
            }
            // Brute force over all 2^8 schedules with the same rules.
            let best = (0u32..256)
                .filter_map(|mask| {
                    let sched: Vec<bool> = (0..8).map(|i| mask >> i & 1 == 1).collect();
                    let mut prev = (true, usize::MAX / 2);
                    for &x in &sched {
                        if x != prev.0 {
                            let need = if prev.0 { a } else { b };
                            if prev.1 < need {
                                return None;
                            }
                            prev = (x, 1);
                        } else {
                            prev.1 += 1;
                        }
                    }
                    Some(
                        sched
                            .iter()
                            .zip(&on)
                            .map(|(x, v)| if *x { *v } else { 0.0 })
                            .sum::<f64>(),
                    )
                })
                .fold(f64::NEG_INFINITY, f64::max);
            let got: f64 = p
                .iter()
                .zip(&on)
                .map(|(x, v)| if *x { *v } else { 0.0 })
                .sum();
            assert!((got - best).abs() < 1e-9, "{a},{b}: {p:?} {got} vs {best}");
        }
    }

    #[test]
    fn fleet_file_parses_and_rejects_nonsense() {
        let f = FleetFile::parse(
            "hashprice_usd_per_ph_day = 50.0\n[[miners]]\nmodel = \"S21\"\ncount = 3\nths = 200.0\nwatts = 3500.0\n",
        )
        .unwrap();
        assert_eq!(f.specs().unwrap().len(), 3);
        for bad in [
            "[[miners]]\nmodel = \"x\"\ncount = 1\nths = 0.0\nwatts = 3000.0\n",
            "[[miners]]\nmodel = \"x\"\ncount = 1\nths = 1.0\nwatts = 3000.0\nfirmware = \"foo\"\n",
            "[[miners]]\nmodel = \"x\"\ncount = 1\nths = 1.0\nwatts = 3000.0\nsleep_w = 4000.0\n",
            "[[miners]]\nmodel = \"x\"\ncount = 1\nths = 1.0\nwatts = 3000.0\ncolour = 1\n",
            "miners = []\n",
        ] {
            assert!(FleetFile::parse(bad).is_err(), "{bad}");
        }
    }
}
