//! Reports the VEN sends back per event: measured site DEMAND (kW), USAGE
//! (kWh per interval) and the BASELINE (site kW when the event arrived).
//! Pure: builds the OpenADR 3 report body from samples the VEN task keeps.

use std::collections::VecDeque;

use chrono::{DateTime, Utc};
use gridproxy_curtail::time::Timestamp;
use serde_json::{json, Value};

/// Most intervals kept (and sent) per event report.
pub const MAX_SAMPLES: usize = 720;

/// One measured interval.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sample {
    /// Interval start (wall).
    pub start: Timestamp,
    /// Interval end (wall).
    pub end: Timestamp,
    /// Site draw measured at its end, kW.
    pub kw: f64,
}

/// The report state of one event.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EventReport {
    /// Site kW when the event was received.
    pub baseline_kw: f64,
    /// Measured intervals, oldest first (at most [`MAX_SAMPLES`]).
    pub samples: VecDeque<Sample>,
    /// The VTN's id of the report once created (then updated in place).
    pub report_id: Option<String>,
    /// End of the last interval.
    pub last: Option<Timestamp>,
}

impl EventReport {
    /// A new report with its baseline.
    pub fn new(baseline_kw: f64, now: Timestamp) -> EventReport {
        EventReport {
            baseline_kw,
            last: Some(now),
            ..EventReport::default()
        }
    }

    /// Record the site draw `kw` measured at `now` (ignored if not a number
    /// or no time passed).
    pub fn sample(&mut self, now: Timestamp, kw: f64) {
        let start = self.last.unwrap_or(now);
        if !kw.is_finite() || kw < 0.0 || now <= start {
            return;
        }
        self.samples.push_back(Sample {
            start,
            end: now,
            kw,
        });
        while self.samples.len() > MAX_SAMPLES {
            self.samples.pop_front();
        }
        self.last = Some(now);
    }

    /// The report body (`POST /reports`, `PUT /reports/{id}`).
    pub fn body(&self, event_id: &str, client_name: &str) -> Value {
        let intervals: Vec<Value> = self
            .samples
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let secs = s.end.saturating_since(s.start).as_secs_f64();
                json!({
                    "id": i,
                    "intervalPeriod": {
                        "start": rfc3339(s.start),
                        "duration": format!("PT{secs:.3}S"),
                    },
                    "payloads": [
                        {"type": "DEMAND", "values": [round3(s.kw)]},
                        {"type": "USAGE", "values": [round3(s.kw * secs / 3600.0)]},
                        {"type": "BASELINE", "values": [round3(self.baseline_kw)]},
                    ],
                })
            })
            .collect();
        json!({
            "objectType": "REPORT",
            "eventID": event_id,
            "clientName": client_name,
            "reportName": format!("gridproxy {client_name} site load for {event_id}"),
            "payloadDescriptors": [
                {"objectType": "REPORT_PAYLOAD_DESCRIPTOR", "payloadType": "DEMAND", "readingType": "DIRECT_READ", "units": "KW"},
                {"objectType": "REPORT_PAYLOAD_DESCRIPTOR", "payloadType": "USAGE", "readingType": "DIRECT_READ", "units": "KWH"},
                {"objectType": "REPORT_PAYLOAD_DESCRIPTOR", "payloadType": "BASELINE", "readingType": "ESTIMATED", "units": "KW"},
            ],
            "resources": [{
                "resourceName": "AGGREGATED_REPORT",
                "intervals": intervals,
            }],
        })
    }
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// RFC 3339 of a wall timestamp.
pub fn rfc3339(t: Timestamp) -> String {
    DateTime::<Utc>::from_timestamp_millis(i64::try_from(t.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use openleadr_wire::report::ReportRequest;
    use openleadr_wire::values_map::Value as WireValue;

    #[test]
    fn body_is_a_wire_report_with_demand_usage_and_baseline() {
        let t0 = Timestamp::from_secs(1_700_000_000);
        let mut r = EventReport::new(120.0, t0);
        r.sample(t0 + std::time::Duration::from_secs(60), 90.0);
        r.sample(t0 + std::time::Duration::from_secs(60), 80.0); // no time passed: dropped
        r.sample(t0 + std::time::Duration::from_secs(120), f64::NAN); // dropped
        r.sample(t0 + std::time::Duration::from_secs(180), 60.0);
        assert_eq!(r.samples.len(), 2);
        let body = r.body("ev-1", "ven-1");
        // The VTN parses reports with these types: so must this body.
        let req: ReportRequest = serde_json::from_value(body).expect("a valid report request");
        assert_eq!(req.event_id.as_str(), "ev-1");
        assert_eq!(req.client_name, "ven-1");
        let ivs = &req.resources[0].intervals;
        assert_eq!(ivs.len(), 2);
        let vals = |i: usize, ty: &str| -> f64 {
            let p = ivs[i]
                .payloads
                .iter()
                .find(|p| p.value_type.0 == ty)
                .unwrap();
            match p.values[0] {
                WireValue::Number(n) => n,
                ref v => panic!("{v:?}"),
            }
        };
        assert_eq!(vals(0, "DEMAND"), 90.0);
        assert_eq!(vals(0, "USAGE"), 1.5); // 90 kW for one minute
        assert_eq!(vals(1, "DEMAND"), 60.0);
        assert_eq!(vals(1, "USAGE"), 2.0); // 60 kW for two minutes
        assert_eq!(vals(1, "BASELINE"), 120.0);
    }

    #[test]
    fn samples_are_bounded() {
        let t0 = Timestamp::from_secs(1_700_000_000);
        let mut r = EventReport::new(1.0, t0);
        for i in 1..=(MAX_SAMPLES as u64 + 10) {
            r.sample(t0 + std::time::Duration::from_secs(i), 1.0);
        }
        assert_eq!(r.samples.len(), MAX_SAMPLES);
    }
}
