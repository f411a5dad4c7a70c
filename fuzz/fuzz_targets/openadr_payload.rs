//! OpenADR 3 events -> engine signals (`gridproxy_grid::openadr::map`,
//! sans-IO): arbitrary JSON as one event or a list of them, as `GET /events`
//! returns it.
//!
//! Invariants beyond "no panic": each event of a list is mapped on its own
//! the way the VEN's sync does it (`event_key`, then `map_event`), and a
//! known-valid event appended to the fuzzed list still maps to exactly what
//! it maps to alone, whatever came before it; every signal a mapped event
//! yields validates, now and at later syncs (prices move from interval to
//! interval); a mapped event keeps the id and modification time it was sent
//! with; an `openleadr_wire::Event` that parses survives its own
//! serialisation and maps the same afterwards.
#![no_main]

use std::sync::OnceLock;
use std::time::Duration;

use gridproxy_curtail::signal::Signal;
use gridproxy_curtail::time::Timestamp;
use gridproxy_fuzz::Input;
use gridproxy_grid::openadr::map::{event_key, map_event, map_wire_event, MapConfig, Mapped};
use libfuzzer_sys::fuzz_target;
use openleadr_wire::event::Event;
use serde_json::{json, Value};

/// 2026-01-01T00:00:00Z.
const NOW: u64 = 1_767_225_600;
/// More events than this in one input are not mapped (bounded work).
const MAX_BATCH: usize = 64;
const KNOWN_ID: &str = "fuzz-known-valid-event";

/// An event as the openleadr-rs VTN sends it: a 100 kW import limit for an
/// hour from `now`.
fn known_valid() -> &'static Value {
    static V: OnceLock<Value> = OnceLock::new();
    V.get_or_init(|| {
        json!({
            "id": KNOWN_ID,
            "createdDateTime": "2026-01-01T00:00:00Z",
            "modificationDateTime": "2026-01-01T00:00:00Z",
            "objectType": "EVENT",
            "programID": "prog-1",
            "eventName": "known",
            "priority": 0,
            "targets": null,
            "reportDescriptors": null,
            "payloadDescriptors": [{"objectType": "EVENT_PAYLOAD_DESCRIPTOR",
                                    "payloadType": "IMPORT_CAPACITY_LIMIT", "units": "KW"}],
            "intervalPeriod": {"start": "0001-01-01T00:00:00Z", "duration": "PT1H"},
            "intervals": [{"id": 0, "payloads": [{"type": "IMPORT_CAPACITY_LIMIT", "values": [100.0]}]}],
        })
    })
}

fn config(k: u8) -> MapConfig {
    match k % 3 {
        0 => MapConfig::default(),
        1 => MapConfig {
            simple_shed: [0.0, 0.25, 0.5, 1.0],
        },
        _ => MapConfig {
            simple_shed: [0.1, 2.0, 0.0, 0.75],
        },
    }
}

/// The signals a mapped event yields now and at the next few syncs.
fn check_signals(m: &Mapped, now: Timestamp) {
    for later in [0, 1, 300, 900, 3600, 86_400, 400 * 86_400] {
        let t = now + Duration::from_secs(later);
        for s in m.signals(t) {
            assert!(s.validate().is_ok(), "at {t}: {s:?}");
            if let Signal::DrEvent(e) = &s {
                assert!(e.id == m.id || e.id.starts_with(&format!("{}/", m.id)));
            }
        }
    }
}

/// One event of a list, as the VEN's sync treats it.
fn one(raw: &Value, now: Timestamp, site_kw: f64, cfg: &MapConfig) -> Option<Mapped> {
    let key = event_key(raw);
    if let Some((id, modified)) = &key {
        assert_eq!(raw["id"].as_str(), Some(id.as_str()));
        assert_eq!(
            raw["modificationDateTime"].as_str().unwrap_or_default(),
            modified
        );
    }
    let m = map_event(raw, now, site_kw, cfg).ok()?;
    let (id, modified) = key.expect("a mapped event has an id");
    assert_eq!((&m.id, &m.modified), (&id, &modified));
    check_signals(&m, now);

    // The wire type survives its own serialisation and maps the same.
    let ev: Event = serde_json::from_value(raw.clone()).expect("mapped, so it parsed");
    let wire = serde_json::to_value(&ev).expect("event serialises");
    let ev2: Event = serde_json::from_value(wire.clone()).expect("re-serialised event parses");
    assert_eq!(ev, ev2, "{wire}");
    assert_eq!(
        map_wire_event(&ev2, now, site_kw, cfg).map(|mut m2| {
            m2.modified.clone_from(&m.modified);
            m2
        }),
        Ok(m.clone())
    );
    Some(m)
}

fuzz_target!(|data: &[u8]| {
    let mut inp = Input(data);
    let knob = inp.byte();
    let hours = u64::from(inp.byte());
    let now = Timestamp::from_secs(NOW + hours * 3600 - 3600 * 24);
    let site_kw = [0.0, 200.0, 5_000.0, 1.0e9][usize::from(knob & 3)];
    let cfg = config(knob >> 2);
    let Ok(v) = serde_json::from_slice::<Value>(inp.rest()) else {
        return;
    };
    let mut batch = match v {
        Value::Array(items) => items,
        other => vec![other],
    };
    batch.truncate(MAX_BATCH);
    // Whatever precedes it, the known event maps as it does alone.
    let alone = map_event(known_valid(), now, site_kw, &cfg);
    assert!(alone.is_ok(), "{alone:?}");
    batch.push(known_valid().clone());
    let mut mapped = Vec::new();
    for raw in &batch {
        mapped.push(one(raw, now, site_kw, &cfg));
    }
    let last = mapped.pop().expect("known event in the batch");
    assert_eq!(last, alone.ok());
    if let Some(m) = last {
        let sent = m.signals(now);
        assert!(sent
            .iter()
            .any(|s| matches!(s, Signal::DrEvent(e) if e.id == KNOWN_ID)));
    }
});
