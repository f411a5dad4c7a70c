//! Share counters that only ever go up, from a worker registry that forgets.
//!
//! The registry (`proxy::stats`) forgets idle workers and re-creates a name
//! from zero when it comes back, and per-worker series exist only for the top
//! `metrics_max_workers` by hashrate, the rest summed as `worker="_other"`.
//! Copying its counts straight out would make totals fall when a worker is
//! forgotten and `_other` fall when a worker climbs into the top N: to
//! Prometheus, a counter reset, and `rate()` would count the whole `_other`
//! again. So each scrape takes every worker's *increase* since the last one
//! and adds it to whichever series the worker belongs to now. Every series is
//! then monotonic by construction; only a forgotten worker's own series
//! disappears (a new series later starts from zero, which `rate()` reads
//! right).
//!
//! Memory: one entry per worker the registry knows (the registry is bounded).

use gridproxy_proxy::stats::{RejectReason, WorkerSnapshot};
use std::collections::HashMap;
use std::fmt::Write as _;

/// Shares and work of one worker (or a sum of them).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Counts {
    /// Accepted by the proxy.
    pub accepted: u64,
    /// Rejected by the proxy, by [`RejectReason::ALL`] index.
    pub rejected: [u64; RejectReason::ALL.len()],
    /// Sum of accepted difficulty: the work the shares stand for.
    pub work: f64,
}

impl Counts {
    fn of(w: &WorkerSnapshot) -> Self {
        let mut c = Counts {
            accepted: w.accepted,
            work: w.difficulty_sum,
            ..Counts::default()
        };
        for (r, n) in &w.rejected {
            if let Some(i) = RejectReason::ALL.iter().position(|x| x == r) {
                c.rejected[i] += n;
            }
        }
        c
    }

    /// The increase from `prev`, or all of `self` when any part fell (the
    /// registry forgot the name and counts it from zero again).
    fn since(&self, prev: &Counts) -> Counts {
        let fell = self.accepted < prev.accepted
            || self.work < prev.work
            || self.rejected.iter().zip(&prev.rejected).any(|(a, b)| a < b);
        if fell {
            return *self;
        }
        let mut d = Counts {
            accepted: self.accepted - prev.accepted,
            work: self.work - prev.work,
            ..Counts::default()
        };
        for (i, r) in d.rejected.iter_mut().enumerate() {
            *r = self.rejected[i] - prev.rejected[i];
        }
        d
    }

    fn add(&mut self, d: &Counts) {
        self.accepted += d.accepted;
        self.work += d.work;
        for (a, b) in self.rejected.iter_mut().zip(&d.rejected) {
            *a += b;
        }
    }

    /// All rejects, whatever the reason.
    pub fn rejected_sum(&self) -> u64 {
        self.rejected.iter().sum()
    }
}

/// Monotonic share counters kept across scrapes.
#[derive(Debug, Default)]
pub struct WorkerSeries {
    /// The registry's counts at the last scrape, per worker.
    last: HashMap<String, Counts>,
    /// What each worker's own series shows (kept while it is out of the top N).
    own: HashMap<String, Counts>,
    /// `worker="_other"`.
    other: Counts,
    other_shown: bool,
    /// Every worker, for the proxy-wide families.
    total: Counts,
    /// Top-N rows of the last update: (label, hashrate).
    top: Vec<(String, f64)>,
    other_hs: f64,
}

impl WorkerSeries {
    /// Take this scrape's registry snapshot and hashrates (H/s by name).
    pub fn update(&mut self, workers: &[WorkerSnapshot], rates: &HashMap<String, f64>, max: usize) {
        let mut ranked: Vec<(f64, &WorkerSnapshot)> = workers
            .iter()
            .map(|w| (rates.get(&w.name).copied().unwrap_or(0.0), w))
            .collect();
        ranked.sort_by(|a, b| b.0.total_cmp(&a.0).then_with(|| a.1.name.cmp(&b.1.name)));
        self.top.clear();
        self.other_hs = 0.0;
        for (i, (hs, w)) in ranked.iter().enumerate() {
            let now = Counts::of(w);
            let d = match self.last.get(&w.name) {
                Some(prev) => now.since(prev),
                None => now,
            };
            self.last.insert(w.name.clone(), now);
            self.total.add(&d);
            if i < max {
                self.own.entry(w.name.clone()).or_default().add(&d);
                self.top.push((w.name.clone(), *hs));
            } else {
                self.other.add(&d);
                self.other_hs += hs;
                self.other_shown = true;
            }
        }
        // Forget what the registry forgot (bounded by the registry).
        if self.last.len() > workers.len() {
            let live: std::collections::HashSet<&str> =
                workers.iter().map(|w| w.name.as_str()).collect();
            self.last.retain(|k, _| live.contains(k.as_str()));
            self.own.retain(|k, _| live.contains(k.as_str()));
        }
    }

    /// Proxy-wide counts (every worker, forgotten ones included).
    pub fn total(&self) -> &Counts {
        &self.total
    }

    /// The per-worker families in the text exposition format.
    pub fn render(&self, out: &mut String) {
        let mut rows: Vec<(String, f64, Counts)> = self
            .top
            .iter()
            .map(|(n, hs)| {
                (
                    super::label(n),
                    *hs,
                    self.own.get(n).copied().unwrap_or_default(),
                )
            })
            .collect();
        if self.other_shown {
            rows.push(("_other".into(), self.other_hs, self.other));
        }
        if rows.is_empty() {
            return;
        }
        if !out.ends_with('\n') && !out.is_empty() {
            out.push('\n');
        }
        out.push_str("# HELP gridproxy_worker_hashrate_hashes_per_second Hashrate per worker (the top workers by hashrate; the rest summed as worker=\"_other\"), hashes per second.\n");
        out.push_str("# TYPE gridproxy_worker_hashrate_hashes_per_second gauge\n");
        for (name, hs, _) in &rows {
            let _ = writeln!(
                out,
                "gridproxy_worker_hashrate_hashes_per_second{{worker=\"{name}\"}} {hs}"
            );
        }
        out.push_str("# HELP gridproxy_worker_shares_total Shares per worker (the top workers; the rest summed as worker=\"_other\"), by result; never falls when a worker leaves the top.\n");
        out.push_str("# TYPE gridproxy_worker_shares_total counter\n");
        for (name, _, c) in &rows {
            let _ = writeln!(
                out,
                "gridproxy_worker_shares_total{{worker=\"{name}\",result=\"accepted\"}} {}",
                c.accepted
            );
            let _ = writeln!(
                out,
                "gridproxy_worker_shares_total{{worker=\"{name}\",result=\"rejected\"}} {}",
                c.rejected_sum()
            );
        }
        out.push_str("# HELP gridproxy_worker_work_total Difficulty-weighted accepted shares per worker (the top workers; the rest summed as worker=\"_other\").\n");
        out.push_str("# TYPE gridproxy_worker_work_total counter\n");
        for (name, _, c) in &rows {
            let _ = writeln!(
                out,
                "gridproxy_worker_work_total{{worker=\"{name}\"}} {}",
                c.work
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(name: &str, accepted: u64, rejected: u64) -> WorkerSnapshot {
        WorkerSnapshot {
            name: name.into(),
            accepted,
            rejected: vec![(RejectReason::StaleJob, rejected)],
            forwarded: 0,
            upstream_accepted: 0,
            upstream_rejected: 0,
            difficulty_sum: accepted as f64 * 1024.0,
            hashrate: 0.0,
            last_share_ms: 0,
            connections: 1,
        }
    }

    /// Every (series → value) of a render.
    fn values(s: &WorkerSeries) -> HashMap<String, f64> {
        let mut out = String::new();
        s.render(&mut out);
        out.lines()
            .filter(|l| l.starts_with("gridproxy_worker_") && !l.contains("hashrate"))
            .map(|l| {
                let (k, v) = l.rsplit_once(' ').unwrap();
                (k.to_string(), v.parse().unwrap())
            })
            .collect()
    }

    #[test]
    fn leaving_and_rejoining_the_top_n_never_makes_a_counter_fall() {
        let mut s = WorkerSeries::default();
        let mut seen: HashMap<String, f64> = HashMap::new();
        let mut check = |s: &WorkerSeries, step: &str| {
            for (k, v) in values(s) {
                if let Some(old) = seen.insert(k.clone(), v) {
                    assert!(v >= old, "{step}: {k} fell from {old} to {v}");
                }
            }
        };
        let rates = |a: f64, b: f64| HashMap::from([("a".to_string(), a), ("b".to_string(), b)]);
        // a leads; b is summed into _other.
        s.update(&[w("a", 10, 1), w("b", 100, 5)], &rates(2.0, 1.0), 1);
        check(&s, "1");
        let v = values(&s);
        assert_eq!(
            v["gridproxy_worker_shares_total{worker=\"_other\",result=\"accepted\"}"],
            100.0
        );
        // b overtakes a: _other now holds a, and must not fall from 100.
        s.update(&[w("a", 12, 1), w("b", 150, 5)], &rates(1.0, 3.0), 1);
        check(&s, "2");
        let v = values(&s);
        assert_eq!(
            v["gridproxy_worker_shares_total{worker=\"_other\",result=\"accepted\"}"],
            102.0
        );
        assert_eq!(
            v["gridproxy_worker_shares_total{worker=\"b\",result=\"accepted\"}"],
            50.0
        );
        // a leads again: its own series continues from 10.
        s.update(&[w("a", 20, 2), w("b", 151, 5)], &rates(5.0, 1.0), 1);
        check(&s, "3");
        let v = values(&s);
        assert_eq!(
            v["gridproxy_worker_shares_total{worker=\"a\",result=\"accepted\"}"],
            18.0
        );
        assert_eq!(
            v["gridproxy_worker_shares_total{worker=\"a\",result=\"rejected\"}"],
            2.0
        );
        assert_eq!(
            v["gridproxy_worker_work_total{worker=\"a\"}"],
            18.0 * 1024.0
        );
        // Totals count everything once: 20 + 151 accepted.
        assert_eq!(s.total().accepted, 171);
        // The registry forgets b, then b comes back from zero: totals keep
        // rising, nothing falls.
        s.update(&[w("a", 21, 2)], &rates(5.0, 0.0), 1);
        check(&s, "4");
        s.update(&[w("a", 22, 2), w("b", 3, 0)], &rates(5.0, 1.0), 1);
        check(&s, "5");
        assert_eq!(s.total().accepted, 171 + 2 + 3);
        assert_eq!(s.total().rejected_sum(), 7);
        assert_eq!(s.last.len(), 2, "bounded by the registry");
    }
}
