//! Sampling: turns the proxy's counters into rates (per worker, per pool,
//! fleet) and keeps a bounded history for the dashboard's plots.
//!
//! One task samples every `sample_secs`; readers take a cheap clone of the
//! last sample. The registry map is locked once per sample (never on the
//! share path).

use crate::site::handle::{now_ms, SiteHandle};
use gridproxy_proxy::downstream::Ctx;
use serde::Serialize;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Hashes per share of difficulty 1.
const HASHES_PER_DIFF1: f64 = 4_294_967_296.0;
/// Averaging window of the rate estimates.
const WINDOW: Duration = Duration::from_secs(15);

/// One point of history.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Point {
    /// Unix ms.
    pub t: u64,
    /// Fleet hashrate the proxy measured from accepted shares, H/s.
    pub hashrate_hs: f64,
    /// Miners connected.
    pub miners: u64,
    /// Site draw, kW (when a site driver is attached).
    pub site_kw: Option<f64>,
    /// kW cap in force.
    pub target_kw: Option<f64>,
    /// Expected draw once the plan is carried out, kW.
    pub expected_kw: Option<f64>,
    /// Energy price, $/MWh.
    pub price: Option<f64>,
    /// Hashrate the pools acknowledged, H/s, by pool index.
    pub pools_hs: Vec<f64>,
    /// Miners assigned, by pool index.
    pub pools_miners: Vec<usize>,
}

/// Rate estimate of one worker.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct WorkerRate {
    /// H/s, averaged.
    pub hashrate_hs: f64,
    last_sum: f64,
    last_accepted: u64,
}

#[derive(Debug, Default)]
struct Inner {
    history: VecDeque<Point>,
    workers: HashMap<String, WorkerRate>,
    pools: Vec<(f64, f64, u64)>,
    last: Option<Instant>,
}

/// Shared sampler state.
#[derive(Debug)]
pub struct Live {
    cap: usize,
    inner: RwLock<Inner>,
}

fn ewma(prev: f64, sample: f64, dt: f64) -> f64 {
    let a = 1.0 - (-dt / WINDOW.as_secs_f64()).exp();
    prev + a * (sample - prev)
}

impl Live {
    /// Keep `cap` points of history.
    pub fn new(cap: usize) -> Arc<Self> {
        Arc::new(Self {
            cap: cap.max(2),
            inner: RwLock::new(Inner::default()),
        })
    }

    /// Take one sample now.
    pub fn sample(&self, ctx: &Ctx, site: &SiteHandle) {
        let now = Instant::now();
        let snap = ctx.registry.snapshot();
        let shares = ctx.router.shares();
        let pools = ctx.router.pools();
        let s = site.state();
        let mut g = self.inner.write().unwrap_or_else(|e| e.into_inner());
        let dt = g.last.map(|l| now.duration_since(l).as_secs_f64());
        g.last = Some(now);
        // The sessions' own measurements (float, per miner) give the fleet
        // rate; accepted-difficulty deltas give each worker's share of it.
        // A worker whose sum did not move while it had accepted shares (no
        // usable difficulty on them) is credited with the fleet's average
        // hashes per share.
        let fleet_hs: f64 = shares.iter().map(|p| p.hashrate).sum();
        let dt_ok = dt.filter(|d| *d > 0.0);
        let accepted_delta: u64 = snap
            .iter()
            .map(|w| {
                g.workers
                    .get(&w.name)
                    .map(|e| w.accepted.saturating_sub(e.last_accepted))
                    .unwrap_or(0)
            })
            .sum();
        let hashes_per_share = match dt_ok {
            Some(dt) if accepted_delta > 0 => fleet_hs * dt / accepted_delta as f64,
            _ => 0.0,
        };
        let mut total = 0.0;
        let mut seen = std::collections::HashSet::with_capacity(snap.len());
        for w in &snap {
            seen.insert(w.name.as_str());
            let e = g.workers.entry(w.name.clone()).or_insert(WorkerRate {
                hashrate_hs: 0.0,
                last_sum: w.difficulty_sum,
                last_accepted: w.accepted,
            });
            if let Some(dt) = dt_ok {
                let dsum = (w.difficulty_sum - e.last_sum).max(0.0);
                let dacc = w.accepted.saturating_sub(e.last_accepted);
                let hashes = if dsum > 0.0 {
                    dsum * HASHES_PER_DIFF1
                } else {
                    dacc as f64 * hashes_per_share
                };
                e.hashrate_hs = if w.connections == 0 {
                    0.0
                } else if e.hashrate_hs == 0.0 {
                    hashes / dt
                } else {
                    ewma(e.hashrate_hs, hashes / dt, dt)
                };
            }
            e.last_sum = w.difficulty_sum;
            e.last_accepted = w.accepted;
            total += e.hashrate_hs;
        }
        g.workers.retain(|k, _| seen.contains(k.as_str()));
        if g.pools.len() != pools.len() {
            g.pools = pools
                .iter()
                .map(|p| (0.0, p.stats.difficulty_sum(), p.stats.accepted.get()))
                .collect();
        }
        let mut pools_hs = Vec::with_capacity(pools.len());
        for (i, p) in pools.iter().enumerate() {
            let (sum, acc) = (p.stats.difficulty_sum(), p.stats.accepted.get());
            let (rate, last_sum, last_acc) = g.pools[i];
            let rate = match dt_ok {
                Some(dt) => {
                    let dsum = (sum - last_sum).max(0.0);
                    let hashes = if dsum > 0.0 {
                        dsum * HASHES_PER_DIFF1
                    } else {
                        acc.saturating_sub(last_acc) as f64 * hashes_per_share
                    };
                    if rate == 0.0 {
                        hashes / dt
                    } else {
                        ewma(rate, hashes / dt, dt)
                    }
                }
                None => rate,
            };
            g.pools[i] = (rate, sum, acc);
            pools_hs.push(rate);
        }
        let total = if total > 0.0 { total } else { fleet_hs };
        let point = Point {
            t: now_ms(),
            hashrate_hs: total,
            miners: ctx.slots_in_use(),
            site_kw: s.attached.then_some(s.site_kw),
            target_kw: s.target_kw,
            expected_kw: s.attached.then_some(s.expected_kw),
            price: s.price_usd_per_mwh,
            pools_hs,
            pools_miners: shares.iter().map(|p| p.miners).collect(),
        };
        g.history.push_back(point);
        while g.history.len() > self.cap {
            g.history.pop_front();
        }
    }

    /// History points after unix ms `since`.
    pub fn history(&self, since: u64) -> Vec<Point> {
        let g = self.inner.read().unwrap_or_else(|e| e.into_inner());
        g.history.iter().filter(|p| p.t > since).cloned().collect()
    }

    /// The newest point.
    pub fn last(&self) -> Option<Point> {
        self.inner
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .history
            .back()
            .cloned()
    }

    /// Per-worker rates.
    pub fn worker_rates(&self) -> HashMap<String, f64> {
        self.inner
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .workers
            .iter()
            .map(|(k, v)| (k.clone(), v.hashrate_hs))
            .collect()
    }

    /// Sample every `every` until shutdown.
    pub fn spawn(
        self: &Arc<Self>,
        ctx: Arc<Ctx>,
        site: Arc<SiteHandle>,
        every: Duration,
        shutdown: CancellationToken,
    ) {
        let me = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every.max(Duration::from_millis(100)));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tick.tick() => me.sample(&ctx, &site),
                }
            }
        });
    }
}
