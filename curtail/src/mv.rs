//! Measurement and verification (M&V) of curtailment, pure.
//!
//! For each reporting interval inside a curtailment episode (a DR event
//! window, or a period the engine curtailed for price, dispatch, balance,
//! override or safe state), it compares a **baseline** kW (what the fleet
//! would have drawn) with the **measured** kW from the ledger:
//!
//! - curtailed MWh = max(0, baseline − actual) × hours / 1000;
//! - avoided energy cost = curtailed MWh × price (time-weighted over the
//!   interval, from the recorded price signals);
//! - revenue forgone = hashrate not mined × hashprice × days × (1 − fee),
//!   with the hashrate of the curtailed kW at the fleet's `j_per_th`;
//! - net = avoided − forgone.
//!
//! Baselines ([`Baseline`]):
//! - `PriorHour`: mean measured kW over the hour before the episode began
//!   (intervals inside other episodes excluded);
//! - `TenOfTen`: per interval, the mean measured kW in the same time of day
//!   (UTC day) on the 10 most recent prior days without any episode,
//!   looking back at most [`MvConfig::lookback_days`] days;
//! - `FixedKw`: a contracted or nominal figure.
//!
//! Intervals without a baseline (no data before the episode, no eligible
//! day) are reported with `baseline_kw: None`, count as zero curtailment and
//! raise a warning rather than a guess.
//!
//! [`ledger::read_mv_input`](crate::ledger::read_mv_input) gathers the
//! input from a ledger file.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::ledger::Interval;
use crate::time::Timestamp;

const DAY_MS: u64 = 86_400_000;
const HOUR_MS: u64 = 3_600_000;

/// How the baseline is estimated.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum Baseline {
    /// Mean draw in the hour before the episode.
    PriorHour,
    /// Same interval on the 10 prior eligible (episode-free) days.
    TenOfTen,
    /// A fixed figure, kW.
    FixedKw(f64),
}

impl Baseline {
    /// Name as used on the command line.
    pub fn name(&self) -> String {
        match self {
            Baseline::PriorHour => "prior-hour".into(),
            Baseline::TenOfTen => "10-of-10".into(),
            Baseline::FixedKw(kw) => format!("fixed {kw} kW"),
        }
    }

    /// Parse `prior-hour`, `10-of-10` or `fixed:KW`.
    pub fn parse(s: &str) -> Result<Baseline, String> {
        match s {
            "prior-hour" => Ok(Baseline::PriorHour),
            "10-of-10" => Ok(Baseline::TenOfTen),
            _ => match s.strip_prefix("fixed:").map(str::parse::<f64>) {
                Some(Ok(kw)) if kw.is_finite() && kw >= 0.0 => Ok(Baseline::FixedKw(kw)),
                _ => Err(format!(
                    "baseline {s:?}: want prior-hour, 10-of-10 or fixed:KW"
                )),
            },
        }
    }
}

/// M&V settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MvConfig {
    /// Baseline method.
    pub baseline: Baseline,
    /// Reporting interval (aligned to the Unix epoch, e.g. 5 or 15 min).
    pub interval: Duration,
    /// Hashprice, $/PH/s/day, used until the ledger has a hashprice signal.
    pub hashprice_usd_per_ph_day: f64,
    /// Pool fee, fraction.
    pub pool_fee: f64,
    /// Efficiency of the curtailed load, J/TH (hashrate lost per kW).
    pub j_per_th: f64,
    /// How far back `TenOfTen` looks for eligible days.
    pub lookback_days: u32,
}

impl Default for MvConfig {
    fn default() -> Self {
        MvConfig {
            baseline: Baseline::PriorHour,
            interval: Duration::from_secs(300),
            hashprice_usd_per_ph_day: 55.0,
            pool_fee: 0.02,
            j_per_th: 25.0,
            lookback_days: 45,
        }
    }
}

/// A curtailment window.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Episode {
    /// What it was: `dr:<event id>`, `price`, `dispatch`, … (joined with
    /// `+` when windows overlap).
    pub label: String,
    /// Start.
    pub start: Timestamp,
    /// End.
    pub end: Timestamp,
}

/// Everything M&V reads.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct MvInput {
    /// Measured draw.
    pub intervals: Vec<Interval>,
    /// Price signals: (at, $/MWh), each in force until the next.
    pub prices: Vec<(Timestamp, f64)>,
    /// Hashprice signals: (at, $/PH/s/day).
    pub hashprices: Vec<(Timestamp, f64)>,
    /// Curtailment episodes.
    pub episodes: Vec<Episode>,
}

/// One reporting interval of an episode.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MvRow {
    /// Interval start (Unix ms).
    pub start: Timestamp,
    /// Interval end.
    pub end: Timestamp,
    /// Episode label.
    pub episode: String,
    /// Baseline, kW (`None`: could not be estimated).
    pub baseline_kw: Option<f64>,
    /// Measured mean draw, kW.
    pub actual_kw: f64,
    /// Hours of measured data in the interval.
    pub hours: f64,
    /// max(0, baseline − actual), kW.
    pub curtailed_kw: f64,
    /// Curtailed energy, MWh.
    pub curtailed_mwh: f64,
    /// Time-weighted price, $/MWh (`None`: no price recorded yet).
    pub price_usd_per_mwh: Option<f64>,
    /// Avoided energy cost, $.
    pub avoided_cost_usd: f64,
    /// Hashprice used, $/PH/s/day.
    pub hashprice_usd_per_ph_day: f64,
    /// Mining revenue forgone, $.
    pub revenue_forgone_usd: f64,
    /// Avoided − forgone, $.
    pub net_usd: f64,
}

/// Sums over the report.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct MvTotals {
    /// Episodes with at least one interval.
    pub episodes: usize,
    /// Reporting intervals.
    pub intervals: usize,
    /// Intervals without a baseline.
    pub intervals_without_baseline: usize,
    /// Curtailed energy, MWh.
    pub curtailed_mwh: f64,
    /// Avoided energy cost, $.
    pub avoided_cost_usd: f64,
    /// Revenue forgone, $.
    pub revenue_forgone_usd: f64,
    /// Net, $.
    pub net_usd: f64,
}

/// The M&V result.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct MvReport {
    /// Baseline method.
    pub baseline: String,
    /// Reporting interval, s.
    pub interval_s: u64,
    /// Rows, by time.
    pub rows: Vec<MvRow>,
    /// Sums.
    pub totals: MvTotals,
    /// Things the reader should know (missing baselines, prices, …).
    pub warnings: Vec<String>,
}

/// Time-weighted mean kW of `intervals` over `[from, to)`, with the hours
/// covered; `None` if nothing overlaps. `skip` excludes a span.
fn mean_kw(
    intervals: &[Interval],
    from: Timestamp,
    to: Timestamp,
    skip: &dyn Fn(Timestamp, Timestamp) -> bool,
) -> Option<(f64, f64)> {
    let (mut kwh, mut ms) = (0.0, 0u64);
    // Intervals are sorted by start; skip those ending before `from`.
    let first = intervals.partition_point(|i| i.end <= from);
    for i in &intervals[first..] {
        if i.start >= to {
            break;
        }
        let (a, b) = (i.start.max(from), i.end.min(to));
        if b <= a || skip(a, b) {
            continue;
        }
        let d = (b - a).as_millis() as u64;
        kwh += i.fleet_kw * d as f64;
        ms += d;
    }
    (ms > 0).then(|| (kwh / ms as f64, ms as f64 / HOUR_MS as f64))
}

/// Time-weighted mean of a step series over `[from, to)`; the part before
/// the first point is left out. `None` if no point is in force.
fn step_mean(series: &[(Timestamp, f64)], from: Timestamp, to: Timestamp) -> Option<f64> {
    let (mut sum, mut ms) = (0.0, 0u64);
    for (k, &(at, v)) in series.iter().enumerate() {
        let until = series.get(k + 1).map_or(to, |n| n.0);
        let (a, b) = (at.max(from), until.min(to));
        if b > a {
            let d = (b - a).as_millis() as u64;
            sum += v * d as f64;
            ms += d;
        }
    }
    (ms > 0).then(|| sum / ms as f64)
}

fn overlaps(eps: &[Episode], a: Timestamp, b: Timestamp) -> bool {
    eps.iter().any(|e| e.start < b && a < e.end)
}

/// Merge overlapping or touching windows, joining labels.
pub fn merge_episodes(mut eps: Vec<Episode>) -> Vec<Episode> {
    eps.retain(|e| e.end > e.start);
    eps.sort_by_key(|e| (e.start, e.end));
    let mut out: Vec<Episode> = Vec::new();
    for e in eps {
        match out.last_mut() {
            Some(last) if e.start <= last.end => {
                last.end = last.end.max(e.end);
                if !last.label.split('+').any(|l| l == e.label) {
                    last.label.push('+');
                    last.label.push_str(&e.label);
                }
            }
            _ => out.push(e),
        }
    }
    out
}

/// Episodes from the engine's decisions (`(at, mode)` in time order; any
/// mode but `normal` curtails) and DR event windows (`(label, start, end)`).
/// An open decision period ends at `until`.
pub fn episodes_from(
    decisions: &[(Timestamp, String)],
    events: &[(String, Timestamp, Timestamp)],
    until: Timestamp,
) -> Vec<Episode> {
    let mut eps: Vec<Episode> = events
        .iter()
        .map(|(l, s, e)| Episode {
            label: format!("dr:{l}"),
            start: *s,
            end: *e,
        })
        .collect();
    let mut open: Option<(Timestamp, String)> = None;
    for (at, mode) in decisions {
        let curtailing = mode != "normal";
        match &open {
            Some((s, m)) if !curtailing || m != mode => {
                eps.push(Episode {
                    label: m.clone(),
                    start: *s,
                    end: *at,
                });
                open = curtailing.then(|| (*at, mode.clone()));
            }
            None if curtailing => open = Some((*at, mode.clone())),
            _ => {}
        }
    }
    if let Some((s, m)) = open {
        eps.push(Episode {
            label: m,
            start: s,
            end: until.max(s),
        });
    }
    merge_episodes(eps)
}

/// Compute the report.
pub fn compute(input: &MvInput, cfg: &MvConfig) -> MvReport {
    let mut intervals = input.intervals.clone();
    intervals.sort_by_key(|i| (i.start, i.end));
    intervals.retain(|i| i.end > i.start && i.fleet_kw.is_finite());
    let mut prices = input.prices.clone();
    prices.retain(|p| p.1.is_finite());
    prices.sort_by_key(|p| p.0);
    let mut hashprices = input.hashprices.clone();
    hashprices.retain(|p| p.1.is_finite() && p.1 >= 0.0);
    hashprices.sort_by_key(|p| p.0);
    let eps = merge_episodes(input.episodes.clone());
    let step_ms = (cfg.interval.as_millis() as u64).max(1000);
    let mut rep = MvReport {
        baseline: cfg.baseline.name(),
        interval_s: step_ms / 1000,
        ..MvReport::default()
    };
    let j_per_th = if cfg.j_per_th.is_finite() && cfg.j_per_th > 0.0 {
        cfg.j_per_th
    } else {
        rep.warnings
            .push(format!("j_per_th {} invalid; 25 used", cfg.j_per_th));
        25.0
    };
    let no_skip = |_: Timestamp, _: Timestamp| false;
    let in_episode = |a: Timestamp, b: Timestamp| overlaps(&eps, a, b);
    let mut no_price_warned = false;
    for ep in &eps {
        let prior = match cfg.baseline {
            Baseline::PriorHour => {
                let from = ep.start - Duration::from_millis(HOUR_MS);
                let b = mean_kw(&intervals, from, ep.start, &in_episode).map(|(kw, _)| kw);
                if b.is_none() {
                    rep.warnings.push(format!(
                        "episode {} at {}: no measured draw in the hour before it; no baseline",
                        ep.label, ep.start
                    ));
                }
                b
            }
            _ => None,
        };
        let mut any = false;
        let mut t = ep.start.as_millis() / step_ms * step_ms;
        while t < ep.end.as_millis() {
            let bucket = (
                Timestamp::from_millis(t),
                Timestamp::from_millis(t + step_ms),
            );
            t += step_ms;
            let (a, b) = (bucket.0.max(ep.start), bucket.1.min(ep.end));
            let Some((actual_kw, hours)) = mean_kw(&intervals, a, b, &no_skip) else {
                continue; // nothing measured here
            };
            any = true;
            let baseline_kw = match cfg.baseline {
                Baseline::PriorHour => prior,
                Baseline::FixedKw(kw) => Some(kw),
                Baseline::TenOfTen => {
                    let mut days = Vec::new();
                    for d in 1..=u64::from(cfg.lookback_days) {
                        if days.len() == 10 {
                            break;
                        }
                        let back = d * DAY_MS;
                        if bucket.0.as_millis() < back {
                            break;
                        }
                        let day0 = (bucket.0.as_millis() - back) / DAY_MS * DAY_MS;
                        let day = (
                            Timestamp::from_millis(day0),
                            Timestamp::from_millis(day0 + DAY_MS),
                        );
                        if overlaps(&eps, day.0, day.1) {
                            continue; // an event day is not eligible
                        }
                        let slot = (
                            Timestamp::from_millis(bucket.0.as_millis() - back),
                            Timestamp::from_millis(bucket.1.as_millis() - back),
                        );
                        if let Some((kw, _)) = mean_kw(&intervals, slot.0, slot.1, &no_skip) {
                            days.push(kw);
                        }
                    }
                    if days.len() < 10 && !days.is_empty() {
                        let w = format!(
                            "10-of-10: only {} eligible day(s) for some intervals",
                            days.len()
                        );
                        if !rep.warnings.contains(&w) {
                            rep.warnings.push(w);
                        }
                    }
                    (!days.is_empty()).then(|| days.iter().sum::<f64>() / days.len() as f64)
                }
            };
            let curtailed_kw = baseline_kw.map_or(0.0, |b| (b - actual_kw).max(0.0));
            let curtailed_mwh = curtailed_kw * hours / 1000.0;
            let price = step_mean(&prices, a, b);
            if price.is_none() && curtailed_mwh > 0.0 && !no_price_warned {
                no_price_warned = true;
                rep.warnings
                    .push("intervals before the first recorded price: avoided cost 0".into());
            }
            let hashprice = step_mean(&hashprices, a, b).unwrap_or(cfg.hashprice_usd_per_ph_day);
            let avoided = curtailed_mwh * price.unwrap_or(0.0);
            let ph_lost = curtailed_kw * 1000.0 / j_per_th / 1000.0;
            let forgone = ph_lost * hashprice * hours / 24.0 * (1.0 - cfg.pool_fee);
            rep.totals.intervals += 1;
            if baseline_kw.is_none() {
                rep.totals.intervals_without_baseline += 1;
            }
            rep.totals.curtailed_mwh += curtailed_mwh;
            rep.totals.avoided_cost_usd += avoided;
            rep.totals.revenue_forgone_usd += forgone;
            rep.totals.net_usd += avoided - forgone;
            rep.rows.push(MvRow {
                start: a,
                end: b,
                episode: ep.label.clone(),
                baseline_kw,
                actual_kw,
                hours,
                curtailed_kw,
                curtailed_mwh,
                price_usd_per_mwh: price,
                avoided_cost_usd: avoided,
                hashprice_usd_per_ph_day: hashprice,
                revenue_forgone_usd: forgone,
                net_usd: avoided - forgone,
            });
        }
        if any {
            rep.totals.episodes += 1;
        }
    }
    if rep.totals.intervals_without_baseline > 0 && cfg.baseline == Baseline::TenOfTen {
        rep.warnings.push(format!(
            "10-of-10: {} interval(s) had no eligible prior day",
            rep.totals.intervals_without_baseline
        ));
    }
    rep
}

impl MvReport {
    /// CSV (RFC 4180, quoted by the `csv` crate): a header and one line per
    /// row; times as Unix seconds, then again as RFC 3339 UTC at the end.
    pub fn to_csv(&self) -> String {
        let mut w = csv::Writer::from_writer(Vec::new());
        let header = [
            "start_unix_s",
            "end_unix_s",
            "episode",
            "baseline_kw",
            "actual_kw",
            "curtailed_kw",
            "curtailed_mwh",
            "price_usd_per_mwh",
            "avoided_cost_usd",
            "hashprice_usd_per_ph_day",
            "revenue_forgone_usd",
            "net_usd",
            "start_utc",
            "end_utc",
        ];
        let opt = |v: Option<f64>, p: usize| v.map_or(String::new(), |v| format!("{v:.p$}"));
        // Writing into a Vec cannot fail; a failure would be a bug in csv.
        let _ = w.write_record(header);
        for r in &self.rows {
            let _ = w.write_record([
                r.start.to_string(),
                r.end.to_string(),
                r.episode.clone(),
                opt(r.baseline_kw, 3),
                format!("{:.3}", r.actual_kw),
                format!("{:.3}", r.curtailed_kw),
                format!("{:.6}", r.curtailed_mwh),
                opt(r.price_usd_per_mwh, 4),
                format!("{:.4}", r.avoided_cost_usd),
                format!("{:.4}", r.hashprice_usd_per_ph_day),
                format!("{:.4}", r.revenue_forgone_usd),
                format!("{:.4}", r.net_usd),
                r.start.to_rfc3339(),
                r.end.to_rfc3339(),
            ]);
        }
        String::from_utf8(w.into_inner().unwrap_or_default()).unwrap_or_default()
    }

    /// JSON (pretty).
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }

    /// Readable summary.
    pub fn text(&self) -> String {
        let t = &self.totals;
        let mut s = format!(
            "M&V ({} baseline, {} s intervals): {} episode(s), {} interval(s)\n\
             curtailed {:.4} MWh; avoided energy cost ${:.2}; mining revenue forgone ${:.2}; net ${:.2}\n",
            self.baseline,
            self.interval_s,
            t.episodes,
            t.intervals,
            t.curtailed_mwh,
            t.avoided_cost_usd,
            t.revenue_forgone_usd,
            t.net_usd
        );
        for w in &self.warnings {
            s.push_str(&format!("warning: {w}\n"));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_quotes_labels_instead_of_mangling_them() {
        let label = "dr:\"peak, west\"\nline2";
        let row = MvRow {
            start: Timestamp::from_millis(1_796_637_600_000),
            end: Timestamp::from_millis(1_796_637_900_000),
            episode: label.into(),
            baseline_kw: None,
            actual_kw: 1.0,
            hours: 300.0 / 3600.0,
            curtailed_kw: 0.0,
            curtailed_mwh: 0.0,
            price_usd_per_mwh: Some(40.0),
            avoided_cost_usd: 0.0,
            hashprice_usd_per_ph_day: 55.0,
            revenue_forgone_usd: 0.0,
            net_usd: 0.0,
        };
        let rep = MvReport {
            rows: vec![row],
            ..MvReport::default()
        };
        let text = rep.to_csv();
        let mut rd = csv::Reader::from_reader(text.as_bytes());
        let head = rd.headers().unwrap().clone();
        assert_eq!(&head[2], "episode");
        assert_eq!(&head[12], "start_utc");
        let rows: Vec<csv::StringRecord> = rd.records().map(Result::unwrap).collect();
        assert_eq!(rows.len(), 1, "{text}");
        assert_eq!(&rows[0][2], label, "the label survives the round trip");
        assert_eq!(&rows[0][3], "", "no baseline is an empty field");
        assert_eq!(&rows[0][12], "2026-12-07T10:00:00.000Z");
        assert_eq!(&rows[0][13], "2026-12-07T10:05:00.000Z");
    }

    fn iv(start_min: u64, end_min: u64, kw: f64) -> Interval {
        Interval {
            start: Timestamp::from_secs(start_min * 60),
            end: Timestamp::from_secs(end_min * 60),
            fleet_kw: kw,
            site_kw: None,
            miners: 1,
        }
    }
    fn m(min: u64) -> Timestamp {
        Timestamp::from_secs(min * 60)
    }

    #[test]
    fn prior_hour_by_hand() {
        // 1000 kW for an hour, an episode 60..90 min at 400 kW then 700 kW.
        let mut intervals: Vec<Interval> = (0..12).map(|k| iv(k * 5, k * 5 + 5, 1000.0)).collect();
        intervals.extend((12..15).map(|k| iv(k * 5, k * 5 + 5, 400.0)));
        intervals.extend((15..18).map(|k| iv(k * 5, k * 5 + 5, 700.0)));
        let input = MvInput {
            intervals,
            prices: vec![(m(0), 50.0), (m(60), 600.0), (m(75), 1200.0)],
            hashprices: vec![],
            episodes: vec![Episode {
                label: "dr:e1".into(),
                start: m(60),
                end: m(90),
            }],
        };
        let cfg = MvConfig {
            interval: Duration::from_secs(900),
            hashprice_usd_per_ph_day: 48.0,
            pool_fee: 0.0,
            j_per_th: 20.0,
            ..MvConfig::default()
        };
        let r = compute(&input, &cfg);
        assert_eq!(r.rows.len(), 2, "{r:#?}");
        // Row 1: 60..75, baseline 1000, actual 400: 600 kW for 0.25 h = 0.15 MWh
        // at $600 = $90. 600 kW at 20 J/TH = 30,000 TH/s = 30 PH/s ×
        // $48/day × 0.25/24 day = $15.
        let a = &r.rows[0];
        assert_eq!(a.baseline_kw, Some(1000.0));
        assert!((a.curtailed_mwh - 0.15).abs() < 1e-9);
        assert!((a.avoided_cost_usd - 90.0).abs() < 1e-9);
        assert!((a.revenue_forgone_usd - 15.0).abs() < 1e-9);
        // Row 2: 300 kW × 0.25 h = 0.075 MWh at $1200 = $90; 15 PH/s → $7.5.
        let b = &r.rows[1];
        assert!((b.curtailed_mwh - 0.075).abs() < 1e-9);
        assert!((b.avoided_cost_usd - 90.0).abs() < 1e-9);
        assert!((b.revenue_forgone_usd - 7.5).abs() < 1e-9);
        assert!((r.totals.net_usd - (180.0 - 22.5)).abs() < 1e-9);
        assert!(r.warnings.is_empty(), "{:?}", r.warnings);
        let csv = r.to_csv();
        assert_eq!(csv.lines().count(), 3);
        assert!(
            csv.lines()
                .nth(1)
                .unwrap()
                .ends_with(",1970-01-01T01:00:00.000Z,1970-01-01T01:15:00.000Z"),
            "{csv}"
        );
        assert!(
            csv.lines().nth(1).unwrap().starts_with(
                "3600.000,4500.000,dr:e1,1000.000,400.000,600.000,0.150000,600.0000,90.0000"
            ),
            "{csv}"
        );
        let j: serde_json::Value = serde_json::from_str(&r.to_json()).unwrap();
        assert_eq!(j["rows"].as_array().unwrap().len(), 2);
    }

    #[test]
    fn ten_of_ten_skips_event_days_and_uses_the_same_slot() {
        // 12 days; day d draws 100*d kW in slot 10:00-10:15, 50 kW otherwise.
        // Day 5 had an event (not eligible); the event is on day 12.
        let mut intervals = Vec::new();
        for d in 0..13u64 {
            let base = d * 1440;
            intervals.push(iv(base, base + 600, 50.0));
            intervals.push(iv(
                base + 600,
                base + 615,
                if d == 12 { 10.0 } else { 100.0 * d as f64 },
            ));
            intervals.push(iv(base + 615, base + 1440, 50.0));
        }
        let ev = |d: u64| Episode {
            label: format!("e{d}"),
            start: m(d * 1440 + 600),
            end: m(d * 1440 + 615),
        };
        let input = MvInput {
            intervals,
            prices: vec![(m(0), 100.0)],
            hashprices: vec![(m(0), 0.0)],
            episodes: vec![ev(5), ev(12)],
        };
        let cfg = MvConfig {
            baseline: Baseline::TenOfTen,
            interval: Duration::from_secs(900),
            ..MvConfig::default()
        };
        let r = compute(&input, &cfg);
        let row = r.rows.iter().find(|r| r.episode == "e12").unwrap();
        // Prior eligible days: 11,10,9,8,7,6,4,3,2,1 (5 skipped) = 6.1 k / 10.
        assert_eq!(row.baseline_kw, Some(610.0));
        assert!((row.curtailed_kw - 600.0).abs() < 1e-9);
        // 600 kW × 0.25 h = 0.15 MWh at $100.
        assert!((row.avoided_cost_usd - 15.0).abs() < 1e-9);
        assert_eq!(row.revenue_forgone_usd, 0.0);
        // Day 5's own row: only days 4..0 are before it, fewer than 10.
        assert!(
            r.warnings.iter().any(|w| w.contains("eligible day")),
            "{:?}",
            r.warnings
        );
    }

    #[test]
    fn episodes_from_decisions_and_events() {
        let d = |min: u64, mode: &str| (m(min), mode.to_string());
        let eps = episodes_from(
            &[
                d(0, "normal"),
                d(10, "price"),
                d(20, "normal"),
                d(30, "dispatch"),
                d(35, "safe_state"),
            ],
            &[("ev".into(), m(15), m(25))],
            m(50),
        );
        assert_eq!(
            eps,
            vec![
                Episode {
                    label: "price+dr:ev".into(),
                    start: m(10),
                    end: m(25)
                },
                Episode {
                    label: "dispatch+safe_state".into(),
                    start: m(30),
                    end: m(50)
                },
            ]
        );
    }

    #[test]
    fn baseline_parse_and_missing_baseline() {
        assert_eq!(Baseline::parse("fixed:120.5"), Ok(Baseline::FixedKw(120.5)));
        assert!(Baseline::parse("fixed:-1").is_err());
        assert!(Baseline::parse("median").is_err());
        let r = compute(
            &MvInput {
                intervals: vec![iv(0, 5, 10.0)],
                episodes: vec![Episode {
                    label: "x".into(),
                    start: m(0),
                    end: m(5),
                }],
                ..MvInput::default()
            },
            &MvConfig::default(),
        );
        assert_eq!(r.totals.intervals_without_baseline, 1);
        assert_eq!(r.totals.curtailed_mwh, 0.0);
        assert!(!r.warnings.is_empty());
    }
}
