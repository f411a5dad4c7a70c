//! Mapping tests on event JSON as the openleadr-rs VTN sends it.

use super::*;
use serde_json::json;
use std::time::Duration;

const NOW: Timestamp = Timestamp::from_secs(1_767_225_600); // 2026-01-01T00:00:00Z

fn event(
    descriptors: serde_json::Value,
    period: serde_json::Value,
    intervals: serde_json::Value,
) -> serde_json::Value {
    json!({
        "id": "ev-1",
        "createdDateTime": "2026-01-01T00:00:00Z",
        "modificationDateTime": "2026-01-01T00:00:00Z",
        "objectType": "EVENT",
        "programID": "prog-1",
        "eventName": "test",
        "priority": 0,
        "targets": ["ven-1"],
        "reportDescriptors": null,
        "payloadDescriptors": descriptors,
        "intervalPeriod": period,
        "intervals": intervals,
    })
}

fn map(raw: &serde_json::Value) -> Result<Mapped, SkipReason> {
    map_event(raw, NOW, 200.0, &MapConfig::default())
}

#[test]
fn import_capacity_limit_kw_is_a_limit_over_the_event_window() {
    let raw = event(
        json!([{"objectType": "EVENT_PAYLOAD_DESCRIPTOR", "payloadType": "IMPORT_CAPACITY_LIMIT", "units": "KW"}]),
        json!({"start": "2026-01-01T00:00:00Z", "duration": "PT1H"}),
        json!([{"id": 0, "payloads": [{"type": "IMPORT_CAPACITY_LIMIT", "values": [150.5]}]}]),
    );
    let m = map(&raw).unwrap();
    assert_eq!(m.id, "ev-1");
    assert_eq!(
        m.dr,
        vec![DrEvent {
            id: "ev-1".into(),
            target: DrTarget::LimitKw(150.5),
            start: NOW,
            end: Some(NOW + Duration::from_secs(3600)),
            issued_at: NOW,
        }]
    );
    assert!(m.price.is_none());
}

#[test]
fn megawatts_and_integers_are_converted_and_missing_units_mean_kw() {
    let raw = event(
        json!([{"objectType": "EVENT_PAYLOAD_DESCRIPTOR", "payloadType": "DISPATCH_SETPOINT", "units": "MW"}]),
        json!({"start": "2026-01-01T00:00:00Z", "duration": "PT30M"}),
        json!([{"id": 0, "payloads": [{"type": "DISPATCH_SETPOINT", "values": [2]}]}]),
    );
    assert_eq!(map(&raw).unwrap().dr[0].target, DrTarget::LimitKw(2000.0));
    let raw = event(
        json!(null),
        json!({"start": "2026-01-01T00:00:00Z"}),
        json!([{"id": 0, "payloads": [{"type": "IMPORT_CAPACITY_LIMIT", "values": [75.0]}]}]),
    );
    let m = map(&raw).unwrap();
    assert_eq!(m.dr[0].target, DrTarget::LimitKw(75.0));
    assert_eq!(m.dr[0].end, None, "no duration: until cancelled");
}

#[test]
fn sequential_intervals_get_one_obligation_each() {
    let raw = event(
        json!([{"objectType": "EVENT_PAYLOAD_DESCRIPTOR", "payloadType": "IMPORT_CAPACITY_LIMIT", "units": "KW"}]),
        json!({"start": "2026-01-01T00:00:00Z", "duration": "PT15M"}),
        json!([
            {"id": 0, "payloads": [{"type": "IMPORT_CAPACITY_LIMIT", "values": [100.0]}]},
            {"id": 1, "payloads": [{"type": "IMPORT_CAPACITY_LIMIT", "values": [80.0]}]},
            {"id": 7, "intervalPeriod": {"start": "2026-01-01T02:00:00Z", "duration": "PT1H"},
             "payloads": [{"type": "IMPORT_CAPACITY_LIMIT", "values": [60.0]}]}
        ]),
    );
    let m = map(&raw).unwrap();
    let got: Vec<(&str, u64, Option<u64>)> =
        m.dr.iter()
            .map(|e| {
                (
                    e.id.as_str(),
                    e.start.saturating_since(NOW).as_secs(),
                    e.end.map(|t| t.saturating_since(NOW).as_secs()),
                )
            })
            .collect();
    assert_eq!(
        got,
        vec![
            ("ev-1/0", 0, Some(900)),
            ("ev-1/1", 900, Some(1800)),
            ("ev-1/7", 7200, Some(10800))
        ]
    );
}

#[test]
fn simple_levels_follow_the_configured_fractions() {
    let simple = |level: i64| {
        event(
            json!(null),
            json!({"start": "0001-01-01T00:00:00Z", "duration": "P9999Y"}),
            json!([{"id": 0, "payloads": [{"type": "SIMPLE", "values": [level]}]}]),
        )
    };
    // "0001-01-01" is "now", P9999Y is "until further notice".
    let m = map(&simple(1)).unwrap();
    assert_eq!(m.dr[0].target, DrTarget::ShedKw(100.0)); // half of 200 kW
    assert_eq!((m.dr[0].start, m.dr[0].end), (NOW, None));
    assert_eq!(
        map(&simple(2)).unwrap().dr[0].target,
        DrTarget::LimitKw(0.0)
    );
    assert_eq!(
        map(&simple(3)).unwrap().dr[0].target,
        DrTarget::LimitKw(0.0)
    );
    assert!(
        map(&simple(0)).unwrap().dr.is_empty(),
        "level 0 asks nothing"
    );
    let cfg = MapConfig {
        simple_shed: [0.0, 0.25, 0.5, 1.0],
    };
    let m = map_event(&simple(2), NOW, 200.0, &cfg).unwrap();
    assert_eq!(m.dr[0].target, DrTarget::ShedKw(100.0));
    assert!(matches!(map(&simple(4)), Err(SkipReason::Value { .. })));
    assert!(matches!(map(&simple(-1)), Err(SkipReason::Value { .. })));
}

#[test]
fn price_intervals_are_price_now_and_forecast_in_usd_per_mwh() {
    let raw = event(
        json!([{"objectType": "EVENT_PAYLOAD_DESCRIPTOR", "payloadType": "PRICE", "units": "KWH", "currency": "USD"}]),
        json!({"start": "2025-12-31T23:30:00Z", "duration": "PT1H"}),
        json!([
            {"id": 0, "payloads": [{"type": "PRICE", "values": [0.042]}]},
            {"id": 1, "payloads": [{"type": "PRICE", "values": [0.25]}]},
            {"id": 2, "payloads": [{"type": "PRICE", "values": [-0.01]}]}
        ]),
    );
    let m = map(&raw).unwrap();
    assert!(m.dr.is_empty());
    let p = m.price.as_ref().unwrap().at(NOW).unwrap();
    assert!((p.usd_per_mwh - 42.0).abs() < 1e-9);
    let f: Vec<(u64, f64)> = p
        .forecast
        .iter()
        .map(|f| (f.start.saturating_since(NOW).as_secs(), f.usd_per_mwh))
        .collect();
    assert_eq!(f.len(), 2);
    assert_eq!(f[0].0, 1800);
    assert!((f[0].1 - 250.0).abs() < 1e-9 && (f[1].1 + 10.0).abs() < 1e-9);
    // Later, the second interval is the price.
    let later = m
        .price
        .as_ref()
        .unwrap()
        .at(NOW + Duration::from_secs(2400))
        .unwrap();
    assert!((later.usd_per_mwh - 250.0).abs() < 1e-9);
    // After the last interval there is no price.
    assert!(m
        .price
        .as_ref()
        .unwrap()
        .at(NOW + Duration::from_secs(4 * 3600))
        .is_none());
    assert!(matches!(m.signals(NOW)[..], [Signal::Price(_)]));
}

#[test]
fn malformed_events_are_skipped_with_a_reason() {
    let limit = |units: &str, values: serde_json::Value| {
        event(
            json!([{"objectType": "EVENT_PAYLOAD_DESCRIPTOR", "payloadType": "IMPORT_CAPACITY_LIMIT", "units": units}]),
            json!({"start": "2026-01-01T00:00:00Z", "duration": "PT1H"}),
            json!([{"id": 0, "payloads": [{"type": "IMPORT_CAPACITY_LIMIT", "values": values}]}]),
        )
    };
    // Wrong units.
    assert_eq!(
        map(&limit("KWH", json!([100.0]))),
        Err(SkipReason::Units {
            kind: "IMPORT_CAPACITY_LIMIT".into(),
            units: "KWH".into()
        })
    );
    assert!(matches!(
        map(&limit("KVAR", json!([100.0]))),
        Err(SkipReason::Units { .. })
    ));
    // Negative, missing values.
    assert!(matches!(
        map(&limit("KW", json!([-5.0]))),
        Err(SkipReason::Value { .. })
    ));
    assert!(matches!(
        map(&limit("KW", json!([]))),
        Err(SkipReason::Value { .. })
    ));
    // Wrong value type (the wire accepts it when parsing; the VTN validates
    // it, another VTN might not).
    assert!(matches!(
        map(&limit("KW", json!(["lots"]))),
        Err(SkipReason::Value { .. })
    ));
    // Unknown (private) type only.
    let private = event(
        json!(null),
        json!({"start": "2026-01-01T00:00:00Z"}),
        json!([{"id": 0, "payloads": [{"type": "x-site-mood", "values": ["grumpy"]}]}]),
    );
    assert_eq!(
        map(&private),
        Err(SkipReason::Unsupported("x-site-mood".into()))
    );
    // Not an event; no intervals; no timing.
    assert!(matches!(
        map(&json!({"id": "x"})),
        Err(SkipReason::Parse(_))
    ));
    assert_eq!(
        map(&event(
            json!(null),
            json!({"start": "2026-01-01T00:00:00Z"}),
            json!([])
        )),
        Err(SkipReason::NoIntervals)
    );
    assert!(matches!(
        map(&event(
            json!(null),
            json!(null),
            json!([{"id": 0, "payloads": [{"type": "IMPORT_CAPACITY_LIMIT", "values": [1.0]}]}])
        )),
        Err(SkipReason::Timing { .. })
    ));
    // Price in euros.
    let eur = event(
        json!([{"objectType": "EVENT_PAYLOAD_DESCRIPTOR", "payloadType": "PRICE", "units": "KWH", "currency": "EUR"}]),
        json!({"start": "2026-01-01T00:00:00Z", "duration": "PT1H"}),
        json!([{"id": 0, "payloads": [{"type": "PRICE", "values": [0.1]}]}]),
    );
    assert_eq!(map(&eur), Err(SkipReason::Currency("EUR".into())));
    // Beyond the engine's range.
    assert!(matches!(
        map(&limit("KW", json!([1e12]))),
        Err(SkipReason::Invalid(_))
    ));
}

#[test]
fn unknown_payloads_next_to_known_ones_are_ignored_not_fatal() {
    let raw = event(
        json!([{"objectType": "EVENT_PAYLOAD_DESCRIPTOR", "payloadType": "IMPORT_CAPACITY_LIMIT", "units": "KW"}]),
        json!({"start": "2026-01-01T00:00:00Z", "duration": "PT1H"}),
        json!([{"id": 0, "payloads": [
            {"type": "IMPORT_CAPACITY_LIMIT", "values": [90.0]},
            {"type": "ALERT_FLEX_ALERT", "values": ["conserve"]},
            {"type": "DISPATCH_SETPOINT", "values": [70.0]}
        ]}]),
    );
    let m = map(&raw).unwrap();
    // Two kW asks in one interval: the tighter one holds.
    assert_eq!(m.dr[0].target, DrTarget::LimitKw(70.0));
    assert_eq!(m.ignored, vec!["ALERT_FLEX_ALERT".to_string()]);
}

#[test]
fn event_key_survives_unparseable_events() {
    let raw =
        json!({"id": "weird", "modificationDateTime": "2026-01-01T00:00:00Z", "intervals": 5});
    assert_eq!(
        event_key(&raw),
        Some(("weird".into(), "2026-01-01T00:00:00Z".into()))
    );
    assert!(map(&raw).is_err());
    assert_eq!(event_key(&json!({"no": "id"})), None);
}
