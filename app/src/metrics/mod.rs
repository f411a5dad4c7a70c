//! Prometheus metrics through the `metrics` facade and
//! `metrics-exporter-prometheus`.
//!
//! The recorder is owned (not installed globally), so several proxies in one
//! process (tests) keep separate series. Counters the proxy already keeps as
//! atomics (shares, pool answers) are copied into the recorder at scrape
//! time; events that happen elsewhere (curtailment command latency) are
//! recorded as they happen through [`Metrics::command_latency`].
//!
//! Cardinality is bounded: per-worker series exist for the top
//! `metrics_max_workers` workers by hashrate, everything else is summed into
//! `worker="_other"` (these families are rendered directly, exactly N + 1
//! series per scrape). Share counters never fall: see [`workers`].

mod workers;

use crate::site::handle::SiteState;
use gridproxy_proxy::downstream::Ctx;
use gridproxy_proxy::stats::{IdentityNegotiation, RejectReason, WorkerSnapshot};
use metrics::{
    counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram, Unit,
};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};
use metrics_util::MetricKindMask;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::Duration;
use workers::WorkerSeries;

/// Latency buckets of curtailment commands, seconds.
const LATENCY_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// The proxy's metrics.
pub struct Metrics {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    max_workers: usize,
    workers: Mutex<WorkerSeries>,
    process: metrics_process::Collector,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics")
            .field("max_workers", &self.max_workers)
            .finish()
    }
}

fn snake(r: RejectReason) -> &'static str {
    match r {
        RejectReason::StaleJob => "stale_job",
        RejectReason::Duplicate => "duplicate",
        RejectReason::LowDifficulty => "low_difficulty",
        RejectReason::BadNonce => "bad_nonce",
        RejectReason::Invalid => "invalid",
        RejectReason::Unauthorized => "unauthorized",
    }
}

impl Metrics {
    /// A recorder keeping at most `max_workers` per-worker series.
    pub fn new(max_workers: usize) -> Self {
        let recorder = PrometheusBuilder::new()
            .idle_timeout(
                MetricKindMask::COUNTER | MetricKindMask::GAUGE,
                Some(Duration::from_secs(60)),
            )
            .set_buckets_for_metric(
                Matcher::Full("gridproxy_curtail_command_latency_seconds".into()),
                LATENCY_BUCKETS,
            )
            .expect("non-empty buckets")
            .build_recorder();
        let handle = recorder.handle();
        let m = Self {
            recorder,
            handle,
            max_workers,
            workers: Mutex::new(WorkerSeries::default()),
            process: metrics_process::Collector::default(),
        };
        m.with(|| {
            describe();
            m.process.describe();
        });
        m
    }

    fn with<T>(&self, f: impl FnOnce() -> T) -> T {
        metrics::with_local_recorder(&self.recorder, f)
    }

    /// [`Metrics::command_latency`] as the site's latency sink.
    pub fn latency_sink(self: &std::sync::Arc<Self>) -> crate::site::start::LatencySink {
        let m = self.clone();
        std::sync::Arc::new(move |action, outcome, secs| m.command_latency(action, outcome, secs))
    }

    /// Record how long an actuator took to answer a curtailment command.
    pub fn command_latency(&self, action: &str, outcome: &str, seconds: f64) {
        let (a, o) = (action.to_string(), outcome.to_string());
        self.with(|| {
            histogram!("gridproxy_curtail_command_latency_seconds", "action" => a, "outcome" => o)
                .record(seconds)
        });
    }

    /// Refresh every series from the proxy's state and render the text format.
    pub fn render(
        &self,
        ctx: &Ctx,
        site: &SiteState,
        worker_rates: &HashMap<String, f64>,
        fleet_hs: f64,
    ) -> String {
        let workers = ctx.registry.snapshot();
        // One scrape at a time updates the series (a poisoned lock only
        // means a panicked scrape; its state is still consistent).
        let mut series = self.workers.lock().unwrap_or_else(|e| e.into_inner());
        series.update(&workers, worker_rates, self.max_workers);
        self.with(|| {
            self.refresh(ctx, &workers, series.total(), site, fleet_hs);
            self.process.collect();
        });
        self.handle.run_upkeep();
        let mut out = self.handle.render();
        series.render(&mut out);
        render_work(&mut out, ctx, series.total().work);
        render_fanout(&mut out, ctx);
        out
    }

    fn refresh(
        &self,
        ctx: &Ctx,
        workers: &[WorkerSnapshot],
        total: &workers::Counts,
        site: &SiteState,
        fleet_hs: f64,
    ) {
        gauge!("gridproxy_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
        gauge!("gridproxy_miners_connected").set(ctx.slots_in_use() as f64);
        gauge!("gridproxy_workers_known").set(workers.len() as f64);
        counter!("gridproxy_limit_trips_total", "limit" => "max_connections")
            .absolute(ctx.trips.connections.get());
        counter!("gridproxy_limit_trips_total", "limit" => "max_connections_per_ip")
            .absolute(ctx.trips.connections_per_ip.get());
        counter!("gridproxy_limit_trips_total", "limit" => "requests_per_second")
            .absolute(ctx.trips.request_flood.get());
        counter!("gridproxy_limit_trips_total", "limit" => "submits_per_second")
            .absolute(ctx.trips.submit_flood.get());
        counter!("gridproxy_limit_trips_total", "limit" => "max_channels_per_connection")
            .absolute(ctx.trips.channels.get());
        counter!("gridproxy_limit_trips_total", "limit" => "channel_opens_per_second")
            .absolute(ctx.trips.channel_opens.get());
        counter!("gridproxy_limit_trips_total", "limit" => "max_reject_ratio")
            .absolute(ctx.trips.reject_ratio.get());
        counter!("gridproxy_limit_trips_total", "limit" => "read_budget")
            .absolute(ctx.trips.read_budget.get());
        counter!("gridproxy_workers_evicted_total").absolute(ctx.registry.evicted.get());
        counter!("gridproxy_workers_untracked_total").absolute(ctx.registry.untracked.get());
        gauge!("gridproxy_hashrate_hashes_per_second").set(fleet_hs);

        counter!("gridproxy_shares_total", "result" => "accepted").absolute(total.accepted);
        for (i, r) in RejectReason::ALL.into_iter().enumerate() {
            counter!("gridproxy_shares_total", "result" => snake(r)).absolute(total.rejected[i]);
        }

        let shares = ctx.router.shares();
        for (p, h) in ctx.router.pools().iter().enumerate() {
            let name = h.stats.name.clone();
            let s = shares.get(p);
            gauge!("gridproxy_pool_up", "pool" => name.clone()).set(if s.is_some_and(|s| s.live) {
                1.0
            } else {
                0.0
            });
            gauge!("gridproxy_pool_miners", "pool" => name.clone())
                .set(s.map(|s| s.miners as f64).unwrap_or(0.0));
            gauge!("gridproxy_pool_hashrate_hashes_per_second", "pool" => name.clone())
                .set(s.map(|s| s.hashrate).unwrap_or(0.0));
            counter!("gridproxy_pool_shares_submitted_total", "pool" => name.clone())
                .absolute(h.stats.submitted.get());
            counter!("gridproxy_pool_shares_total", "pool" => name.clone(), "result" => "accepted")
                .absolute(h.stats.accepted.get());
            counter!("gridproxy_pool_shares_total", "pool" => name.clone(), "result" => "rejected")
                .absolute(h.stats.rejected.get());
            counter!("gridproxy_pool_connects_total", "pool" => name.clone())
                .absolute(h.stats.connects.get());
            counter!("gridproxy_pool_shares_unanswered_total", "pool" => name.clone())
                .absolute(h.stats.unanswered.get());
            counter!("gridproxy_pool_channel_updates_total", "pool" => name.clone())
                .absolute(h.stats.channel_updates.get());
            gauge!("gridproxy_pool_channel_nominal_hashes_per_second", "pool" => name.clone())
                .set(h.stats.channel_nominal());
            gauge!("gridproxy_pool_worker_identity", "pool" => name.clone())
                .set(if h.stats.identity_granted() { 1.0 } else { 0.0 });
            for r in IdentityNegotiation::ALL {
                counter!("gridproxy_pool_worker_identity_negotiations_total", "pool" => name.clone(), "result" => r.as_str())
                    .absolute(h.stats.identity_negotiations(r));
            }
            counter!("gridproxy_limit_trips_total", "limit" => "max_pending_shares", "pool" => name.clone())
                .absolute(h.stats.pending_dropped.get());
            counter!("gridproxy_limit_trips_total", "limit" => "max_future_jobs", "pool" => name.clone())
                .absolute(h.stats.future_jobs_dropped.get());
            for (reason, n) in h.stats.reasons() {
                counter!("gridproxy_pool_rejects_total", "pool" => name.clone(), "reason" => reason)
                    .absolute(n);
            }
            counter!("gridproxy_pool_jobs_total", "pool" => name).absolute(h.stats.jobs.get());
        }

        for a in ctx.router.account_totals() {
            let name = a.name;
            gauge!("gridproxy_account_miners", "account" => name.clone()).set(a.miners as f64);
            gauge!("gridproxy_account_hashrate_hashes_per_second", "account" => name.clone())
                .set(a.hashrate);
            counter!("gridproxy_account_shares_submitted_total", "account" => name.clone())
                .absolute(a.submitted);
            counter!("gridproxy_account_shares_total", "account" => name.clone(), "result" => "accepted")
                .absolute(a.accepted);
            counter!("gridproxy_account_shares_total", "account" => name, "result" => "rejected")
                .absolute(a.rejected);
        }

        gauge!("gridproxy_site_attached").set(if site.attached { 1.0 } else { 0.0 });
        if let Some(l) = site.lease {
            gauge!("gridproxy_site_lease_held").set(if l.held { 1.0 } else { 0.0 });
            gauge!("gridproxy_site_lease_token").set(l.token as f64);
        }
        for p in &site.peers {
            let peer = p.name.clone();
            gauge!("gridproxy_site_peer_up", "peer" => peer.clone()).set(if p.up {
                1.0
            } else {
                0.0
            });
            gauge!("gridproxy_site_peer_workers", "peer" => peer.clone()).set(p.workers as f64);
            gauge!("gridproxy_site_peer_parks", "peer" => peer.clone()).set(p.applied as f64);
            counter!("gridproxy_site_peer_pushes_total", "peer" => peer.clone(), "result" => "ok")
                .absolute(p.pushes_ok);
            counter!("gridproxy_site_peer_pushes_total", "peer" => peer, "result" => "failed")
                .absolute(p.pushes_failed);
        }
        gauge!("gridproxy_site_parks").set(site.parks as f64);
        if site.attached {
            gauge!("gridproxy_site_power_watts").set(site.site_kw * 1000.0);
            gauge!("gridproxy_site_target_power_watts")
                .set(site.target_kw.map(|k| k * 1000.0).unwrap_or(f64::NAN));
            gauge!("gridproxy_site_expected_power_watts").set(site.expected_kw * 1000.0);
            gauge!("gridproxy_site_nominal_power_watts").set(site.nominal_kw * 1000.0);
            gauge!("gridproxy_energy_price_usd_per_megawatt_hour")
                .set(site.price_usd_per_mwh.unwrap_or(f64::NAN));
            gauge!("gridproxy_fleet_reported_hashrate_hashes_per_second")
                .set(site.fleet_ths * 1e12);
            gauge!("gridproxy_dr_events_active")
                .set(site.events.iter().filter(|e| e.state == "active").count() as f64);
            gauge!("gridproxy_dr_events_scheduled").set(
                site.events
                    .iter()
                    .filter(|e| e.state == "scheduled")
                    .count() as f64,
            );
            gauge!("gridproxy_fleet_miners").set(site.miners_total as f64);
            gauge!("gridproxy_fleet_miners_curtailed").set(site.miners_curtailed as f64);
            counter!("gridproxy_curtail_commands_total", "outcome" => "issued")
                .absolute(site.commands.issued);
            counter!("gridproxy_curtail_commands_total", "outcome" => "verified")
                .absolute(site.commands.verified);
            counter!("gridproxy_curtail_commands_total", "outcome" => "failed")
                .absolute(site.commands.failed);
            let l = &site.ledger;
            gauge!("gridproxy_ledger_failing").set(if l.error.is_some() { 1.0 } else { 0.0 });
            gauge!("gridproxy_ledger_fault_engaged").set(if l.fault_engaged { 1.0 } else { 0.0 });
            counter!("gridproxy_ledger_write_errors_total").absolute(l.write_errors);
            counter!("gridproxy_ledger_dropped_records_total").absolute(l.dropped);
            counter!("gridproxy_ledger_unrecorded_commands_total").absolute(l.unrecorded_commands);
            gauge!("gridproxy_site_driver_running").set(if site.driver_running {
                1.0
            } else {
                0.0
            });
            let sig = &site.signals;
            for (outcome, n) in [
                ("received", sig.received),
                ("refused", sig.refused),
                ("duplicate", sig.duplicate),
                ("rate_limited", sig.rate_limited),
            ] {
                counter!("gridproxy_site_signals_total", "outcome" => outcome).absolute(n);
            }
        }
    }
}

fn describe() {
    describe_gauge!(
        "gridproxy_miners_connected",
        Unit::Count,
        "Downstream miner connections holding an extranonce slot."
    );
    describe_gauge!(
        "gridproxy_workers_known",
        Unit::Count,
        "Worker names seen since start."
    );
    describe_gauge!(
        "gridproxy_hashrate_hashes_per_second",
        "Fleet hashrate measured from shares the proxy accepted (60 s average), hashes per second."
    );
    describe_counter!(
        "gridproxy_shares_total",
        Unit::Count,
        "Miner shares answered by the proxy, by result (accepted or the reject reason); never falls when the worker registry forgets a name."
    );
    describe_gauge!(
        "gridproxy_pool_up",
        "1 when the upstream pool is connected, set up and has a job."
    );
    describe_gauge!(
        "gridproxy_pool_miners",
        Unit::Count,
        "Miners assigned to the pool now."
    );
    describe_gauge!(
        "gridproxy_pool_hashrate_hashes_per_second",
        "Measured hashrate of the miners assigned to the pool, hashes per second."
    );
    describe_counter!(
        "gridproxy_pool_shares_submitted_total",
        Unit::Count,
        "Shares sent to the pool."
    );
    describe_counter!(
        "gridproxy_pool_shares_total",
        Unit::Count,
        "The pool's answers to shares sent, by result (accepted, rejected)."
    );
    describe_counter!(
        "gridproxy_pool_rejects_total",
        Unit::Count,
        "Shares the pool rejected, by the reason it gave (at most 32 reasons per pool, the rest as \"other\")."
    );
    describe_gauge!(
        "gridproxy_build_info",
        "1, labelled with the gridproxy version."
    );
    describe_counter!(
        "gridproxy_pool_connects_total",
        Unit::Count,
        "Upstream sessions set up."
    );
    describe_counter!(
        "gridproxy_pool_channel_updates_total",
        Unit::Count,
        "UpdateChannel messages sent: the SV2 channel's nominal hashrate followed the miners' measured one."
    );
    describe_gauge!(
        "gridproxy_pool_channel_nominal_hashes_per_second",
        "The SV2 channel's nominal hashrate as last told to the pool (0 for SV1 pools)."
    );
    describe_gauge!(
        "gridproxy_pool_worker_identity",
        "1 while the SV2 pool's connection has extension 0x0002 (worker-specific hashrate tracking): every share carries its worker's user_identity."
    );
    describe_counter!(
        "gridproxy_pool_worker_identity_negotiations_total",
        Unit::Count,
        "SV2 connections by how the 0x0002 negotiation ended: granted, refused (by the pool), disabled (worker_identity = false), no_answer (a pool without extension negotiation)."
    );
    describe_counter!(
        "gridproxy_pool_shares_unanswered_total",
        Unit::Count,
        "Shares sent to the pool with no answer when their connection ended (the pool went away, or silent during a drain)."
    );
    describe_counter!(
        "gridproxy_pool_jobs_total",
        Unit::Count,
        "Jobs received from the pool."
    );
    describe_gauge!(
        "gridproxy_account_miners",
        Unit::Count,
        "Miners connected in each account ([[accounts]]; default: the pools' own user)."
    );
    describe_gauge!(
        "gridproxy_account_hashrate_hashes_per_second",
        "Measured hashrate of each account's miners, H/s."
    );
    describe_counter!(
        "gridproxy_account_shares_submitted_total",
        Unit::Count,
        "Shares forwarded to the pools under each account's user."
    );
    describe_counter!(
        "gridproxy_account_shares_total",
        Unit::Count,
        "The pools' answers to each account's forwarded shares, by result."
    );
    describe_gauge!(
        "gridproxy_site_attached",
        "1 when a curtailment driver publishes site state."
    );
    describe_gauge!(
        "gridproxy_site_power_watts",
        "Measured mining draw of the site, watts."
    );
    describe_gauge!(
        "gridproxy_site_target_power_watts",
        "Power cap in force (DR event, dispatch or override), watts; NaN when none."
    );
    describe_gauge!(
        "gridproxy_site_expected_power_watts",
        "Draw expected once the current plan is carried out, watts."
    );
    describe_gauge!(
        "gridproxy_site_nominal_power_watts",
        "Nameplate draw of the fleet, watts."
    );
    describe_gauge!(
        "gridproxy_energy_price_usd_per_megawatt_hour",
        "Energy price now, US dollars per MWh; NaN when unknown."
    );
    describe_gauge!(
        "gridproxy_fleet_reported_hashrate_hashes_per_second",
        "Fleet hashrate reported by firmware telemetry, hashes per second."
    );
    describe_gauge!(
        "gridproxy_dr_events_active",
        Unit::Count,
        "Demand-response events whose window is active."
    );
    describe_gauge!(
        "gridproxy_dr_events_scheduled",
        Unit::Count,
        "Demand-response events received, not yet active."
    );
    describe_gauge!(
        "gridproxy_fleet_miners",
        Unit::Count,
        "Miners in the curtailment inventory."
    );
    describe_gauge!(
        "gridproxy_fleet_miners_curtailed",
        Unit::Count,
        "Miners sleeping, power-limited or parked now."
    );
    describe_counter!(
        "gridproxy_curtail_commands_total",
        Unit::Count,
        "Curtailment commands, by outcome (issued, verified, failed)."
    );
    describe_gauge!(
        "gridproxy_ledger_failing",
        "1 while curtailment ledger writes fail (retried; see /healthz)."
    );
    describe_gauge!(
        "gridproxy_ledger_fault_engaged",
        "1 while the ledger has failed past ledger_fault_secs: site in its ledger-fault safe state."
    );
    describe_counter!(
        "gridproxy_ledger_write_errors_total",
        Unit::Count,
        "Failed ledger write attempts."
    );
    describe_counter!(
        "gridproxy_ledger_dropped_records_total",
        Unit::Count,
        "Ledger records dropped while writes failed and the queue was full."
    );
    describe_counter!(
        "gridproxy_ledger_unrecorded_commands_total",
        Unit::Count,
        "Curtailment commands sent without being recorded first (ledger fault engaged)."
    );
    describe_gauge!(
        "gridproxy_site_lease_held",
        "With [site.lease]: 1 while this instance holds the site lease and runs the engine, 0 in standby."
    );
    describe_gauge!(
        "gridproxy_site_lease_token",
        "With [site.lease]: the fencing token of the lease this instance holds (0 in standby)."
    );
    describe_gauge!(
        "gridproxy_site_peer_up",
        "With [[site.peers]], on the instance running the engine: 1 while the last push of parks to that peer was applied there."
    );
    describe_gauge!(
        "gridproxy_site_peer_workers",
        "With [[site.peers]]: workers connected at that peer, as it answered the last push."
    );
    describe_gauge!(
        "gridproxy_site_peer_parks",
        "With [[site.peers]]: parks and pins in force at that peer after the last push."
    );
    describe_counter!(
        "gridproxy_site_peer_pushes_total",
        Unit::Count,
        "With [[site.peers]]: pushes of the site's parks to that peer, by result (ok, failed)."
    );
    describe_gauge!(
        "gridproxy_site_parks",
        "Parks and pins the site (this instance's engine, or the active instance's pushes) has in force on this instance's router."
    );
    describe_gauge!(
        "gridproxy_site_driver_running",
        "1 while the curtailment driver runs; 0 once it has stopped."
    );
    describe_counter!(
        "gridproxy_limit_trips_total",
        Unit::Count,
        "Times a protective limit refused or cut something, by limit."
    );
    describe_counter!(
        "gridproxy_workers_evicted_total",
        Unit::Count,
        "Worker names forgotten: idle past limits.worker_idle_secs, or evicted when limits.max_workers was reached."
    );
    describe_counter!(
        "gridproxy_workers_untracked_total",
        Unit::Count,
        "New worker names served without per-worker counters (registry full of connected workers)."
    );
    describe_counter!(
        "gridproxy_site_signals_total",
        Unit::Count,
        "Grid and operator signals received, and those refused (range, future timestamp), duplicate or over the rate (none of these is recorded)."
    );
    describe_histogram!(
        "gridproxy_curtail_command_latency_seconds",
        Unit::Seconds,
        "Time from issuing a curtailment command to the actuator's answer, seconds."
    );
}

/// Escape a label value for the text exposition format.
pub(crate) fn label(v: &str) -> String {
    let mut o = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => o.push_str("\\\\"),
            '"' => o.push_str("\\\""),
            '\n' => o.push_str("\\n"),
            c => o.push(c),
        }
    }
    o
}

/// The work families, rendered here because difficulty sums are fractional
/// (CPU-scale difficulties are far below 1) and `metrics` counters are
/// integers.
fn render_work(out: &mut String, ctx: &Ctx, proxy_work: f64) {
    if !out.ends_with('\n') && !out.is_empty() {
        out.push('\n');
    }
    out.push_str("# HELP gridproxy_work_total Difficulty the proxy accepted from miners: the sum of each accepted share's difficulty (forgotten workers included).\n");
    out.push_str("# TYPE gridproxy_work_total counter\n");
    let _ = writeln!(out, "gridproxy_work_total {proxy_work}");
    out.push_str("# HELP gridproxy_pool_work_total Difficulty the pool accepted: the sum of the difficulty of each share it accepted (what pools pay on).\n");
    out.push_str("# TYPE gridproxy_pool_work_total counter\n");
    for h in ctx.router.pools().iter() {
        let _ = writeln!(
            out,
            "gridproxy_pool_work_total{{pool=\"{}\"}} {}",
            label(&h.stats.name),
            h.stats.difficulty_sum()
        );
    }
}

/// `gridproxy_job_fanout_seconds`: the proxy's own atomic histogram (one
/// observation per miner per block), rendered as a Prometheus histogram.
fn render_fanout(out: &mut String, ctx: &Ctx) {
    let (buckets, count, sum) = ctx.fanout_seconds.snapshot();
    out.push_str("# HELP gridproxy_job_fanout_seconds Time from a new block's job arriving from the pool to its hand-over to each miner's connection, seconds (one observation per miner per block: the largest is the last miner to switch).\n");
    out.push_str("# TYPE gridproxy_job_fanout_seconds histogram\n");
    for (le, n) in buckets {
        let _ = writeln!(
            out,
            "gridproxy_job_fanout_seconds_bucket{{le=\"{le}\"}} {n}"
        );
    }
    let _ = writeln!(
        out,
        "gridproxy_job_fanout_seconds_bucket{{le=\"+Inf\"}} {count}"
    );
    let _ = writeln!(out, "gridproxy_job_fanout_seconds_sum {sum}");
    let _ = writeln!(out, "gridproxy_job_fanout_seconds_count {count}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
