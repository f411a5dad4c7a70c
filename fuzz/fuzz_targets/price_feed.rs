//! Price feeds (`gridproxy_grid::price`, sans-IO): ERCOT RTM and DAM CSV
//! reports, HTTP JSON bodies found by pointers, the `Guard` every sample
//! passes, `signal` and the file `Replay`.
//!
//! Invariants beyond "no panic": every row or reading produced is finite and
//! within ±`MAX_ABS_PRICE`; report rows come out strictly by time; a row or
//! reading written back in the same format (by the serialisers below, built
//! on the crate's own `cpt_timestamp`) parses to the same value; the guard
//! admits only good prices at times that never go back, and its errors and
//! repeats match a model; every signal built from admitted samples validates;
//! a replay keeps the samples' spacing.
#![no_main]

use gridproxy_curtail::signal::{PricePoint, Signal, MAX_ABS_PRICE, MAX_FORECAST_POINTS};
use gridproxy_curtail::time::Timestamp;
use gridproxy_fuzz::{f64_close, Input};
use gridproxy_grid::price::ercot::{self, IntervalLen, Parsed, RtmOptions};
use gridproxy_grid::price::feed::Replay;
use gridproxy_grid::price::json::{self, JsonFormat};
use gridproxy_grid::price::{signal, Guard, PriceError, PriceSample};
use jiff::tz::TimeZone;
use libfuzzer_sys::fuzz_target;
use serde_json::{json, Value};
use std::cell::RefCell;
use std::collections::HashSet;
use std::sync::OnceLock;

const POINTS: &[&str] = &["HB_HOUSTON", "lz_west", "HB_NORTH", "X"];

fn price_ok(p: f64) {
    assert!(p.is_finite() && p.abs() <= MAX_ABS_PRICE, "price {p}");
}

/// Central Prevailing Time, looked up once per process.
fn cpt() -> &'static TimeZone {
    static TZ: OnceLock<TimeZone> = OnceLock::new();
    TZ.get_or_init(|| TimeZone::get("America/Chicago").expect("bundled tzdb"))
}

thread_local! {
    /// Reports with no rows written back (header only) whose re-parse has
    /// already been checked, by (kind, point, interval length). The text of
    /// such a report depends only on these, and parsing is deterministic, so
    /// checking it again would only rebuild a CSV reader (the most expensive
    /// step of this target) for the same answer.
    static EMPTY_CHECKED: RefCell<HashSet<(&'static str, String, u32)>> =
        RefCell::new(HashSet::new());
}

/// True the first time a header-only report of this kind is seen.
fn first_empty(kind: &'static str, point: &str, minutes: u32) -> bool {
    EMPTY_CHECKED.with(|s| s.borrow_mut().insert((kind, point.to_string(), minutes)))
}

/// Local CPT date, minutes after midnight and DST flag of a UTC time, as an
/// ERCOT report writes it.
fn local(tz: &TimeZone, at: Timestamp) -> (String, u32, bool) {
    let ms = i64::try_from(at.as_millis()).expect("ms fits i64");
    let z = jiff::Timestamp::from_millisecond(ms)
        .expect("row time representable")
        .to_zoned(tz.clone());
    let dt = z.datetime();
    assert_eq!((dt.second(), dt.subsec_nanosecond()), (0, 0), "{at}");
    let mins = dt.hour() as u32 * 60 + dt.minute() as u32;
    let date = z.date();
    // Repeated hour: the first pass through the local time is not this one.
    let first = ercot::cpt_timestamp(tz, date, mins, false).expect("local time exists");
    let text = format!("{:02}/{:02}/{:04}", date.month(), date.day(), date.year());
    (text, mins, first != at)
}

fn flag(y: bool) -> &'static str {
    if y {
        "Y"
    } else {
        "N"
    }
}

fn check_parsed<T>(p: &Parsed<T>, text: &str, point: &str, key: impl Fn(&T) -> Timestamp) {
    assert!(
        p.rows.windows(2).all(|w| key(&w[0]) < key(&w[1])),
        "rows strictly by time"
    );
    if !p.rows.is_empty() {
        assert!(p.points.iter().any(|q| q.eq_ignore_ascii_case(point)));
    }
    // The csv reader also ends lines at a lone CR.
    let lines = text.bytes().filter(|b| *b == b'\n' || *b == b'\r').count() as u64 + 2;
    for e in &p.errors {
        if let PriceError::Csv { line, .. } = e {
            assert!(*line <= lines, "error line {line} of {lines}: {e}");
        }
    }
}

/// The samples through a guard in order (they are strictly increasing and
/// in range, so each is new), then one of them again.
fn guard_rows(rows: &[PriceSample], again: usize) {
    let mut g = Guard::new();
    for s in rows {
        assert_eq!(g.admit(*s), Ok(Some(*s)));
    }
    if let Some(s) = rows.get(again % rows.len().max(1)) {
        let r = g.admit(*s);
        if Some(s.at) == g.last() {
            assert_eq!(r, Ok(None));
        } else {
            assert!(matches!(r, Err(PriceError::Backwards { .. })), "{r:?}");
        }
    }
}

/// `rows` (of a report of `m`-minute intervals) written back as a report of
/// the same interval length: it parses to the same rows, without errors.
fn rtm_again(rows: &[PriceSample], point: &str, m: u32) {
    let tz = cpt();
    let mut out = String::from("DeliveryDate,DeliveryHour,DeliveryInterval,SettlementPointName,SettlementPointType,SettlementPointPrice,DSTFlag\n");
    for s in rows {
        let (date, mins, y) = local(tz, s.at);
        assert_eq!(mins % m, 0, "{} not on a {m}-minute boundary", s.at);
        let (hour, int) = (mins / 60 + 1, (mins % 60) / m + 1);
        out += &format!(
            "{date},{hour},{int},{point},HU,{},{}\n",
            s.usd_per_mwh,
            flag(y)
        );
    }
    let again = ercot::parse_rtm(
        &out,
        &RtmOptions {
            point: point.to_string(),
            interval: IntervalLen::Minutes(m),
        },
    )
    .expect("re-serialised report parses");
    assert!(again.errors.is_empty(), "{:?}\n{out}", again.errors);
    assert_eq!(again.rows, rows, "\n{out}");
}

fn rtm(text: &str, point: &str, interval: IntervalLen, start: u64) {
    let opts = RtmOptions {
        point: point.to_string(),
        interval,
    };
    let Ok(p) = ercot::parse_rtm(text, &opts) else {
        return;
    };
    let m = p.interval_minutes;
    assert!(m > 0 && 60 % m == 0, "interval {m}");
    if interval == IntervalLen::Auto {
        assert!(m == 5 || m == 15);
    }
    check_parsed(&p, text, point, |s| s.at);
    p.rows.iter().for_each(|s| price_ok(s.usd_per_mwh));
    guard_rows(&p.rows, start as usize);

    // Written back as a report of the same interval length: the same rows.
    if !p.rows.is_empty() || first_empty("rtm", point, m) {
        rtm_again(&p.rows, point, m);
    }

    // Replayed from `start`: every sample once, spacing kept.
    let mut r = Replay::new(p.rows.clone(), Vec::new(), Timestamp::from_millis(start));
    let mut sent = Vec::new();
    while let Some(t) = r.next_at() {
        let due = r.due(t);
        assert!(!due.is_empty(), "next_at {t} but nothing due");
        sent.extend(due);
    }
    assert_eq!(sent.len(), p.rows.len());
    for (sig, row) in sent.iter().zip(&p.rows) {
        assert!(sig.validate().is_ok(), "{sig:?}");
        let Signal::Price(ps) = sig else {
            panic!("replay sent {sig:?}");
        };
        assert_eq!(ps.usd_per_mwh, row.usd_per_mwh);
        assert_eq!(
            ps.at.as_millis() - start,
            row.at.as_millis() - p.rows[0].at.as_millis()
        );
    }
}

fn dam(text: &str, point: &str) {
    let Ok(p) = ercot::parse_dam(text, point) else {
        return;
    };
    assert_eq!(p.interval_minutes, 60);
    check_parsed(&p, text, point, |f| f.start);
    p.rows.iter().for_each(|f| price_ok(f.usd_per_mwh));

    let tz = cpt();
    if p.rows.is_empty() && !first_empty("dam", point, 60) {
        return;
    }
    let mut out =
        String::from("DeliveryDate,HourEnding,SettlementPoint,SettlementPointPrice,DSTFlag\n");
    for f in &p.rows {
        let (date, mins, y) = local(tz, f.start);
        assert_eq!(mins % 60, 0, "{} not on the hour", f.start);
        out += &format!(
            "{date},{:02}:00,{point},{},{}\n",
            mins / 60 + 1,
            f.usd_per_mwh,
            flag(y)
        );
    }
    let again = ercot::parse_dam(&out, point).expect("re-serialised report parses");
    assert!(again.errors.is_empty(), "{:?}\n{out}", again.errors);
    assert_eq!(again.rows, p.rows, "\n{out}");

    // As the forecast of a price now: only later points, and it validates.
    if let Some(first) = p.rows.first() {
        let s = PriceSample {
            at: first.start,
            usd_per_mwh: 0.0,
        };
        let sig = signal(s, &p.rows);
        assert!(sig.validate().is_ok(), "{sig:?}");
    }
}

/// The formats a target picks from.
fn format(k: u8) -> JsonFormat {
    match k % 4 {
        0 => JsonFormat::default(),
        1 => JsonFormat {
            forecast: Some("/dam".into()),
            ..JsonFormat::default()
        },
        2 => JsonFormat {
            price: "/data/0/price".into(),
            time: None,
            ..JsonFormat::default()
        },
        _ => JsonFormat {
            price: "/p".into(),
            time: Some("/t".into()),
            forecast: Some("/f".into()),
            forecast_time: "/0".into(),
            forecast_price: "/1".into(),
        },
    }
}

/// A time as a feed may send it: RFC 3339 up to 1e11 ms, else epoch ms (a
/// number that large is read as ms).
fn time_value(t: Timestamp) -> Value {
    let ms = t.as_millis();
    if ms as f64 > 1.0e11 {
        json!(ms)
    } else {
        let t = jiff::Timestamp::from_millisecond(ms as i64).expect("small time representable");
        json!(t.to_string())
    }
}

/// A reading written back in format `k`.
fn body_of(k: u8, sample: &PriceSample, forecast: &[PricePoint]) -> Value {
    let fc = |pair: bool| -> Value {
        forecast
            .iter()
            .map(|f| {
                if pair {
                    json!([time_value(f.start), f.usd_per_mwh])
                } else {
                    json!({"start": time_value(f.start), "price": f.usd_per_mwh})
                }
            })
            .collect()
    };
    match k % 4 {
        0 => json!({"timestamp": time_value(sample.at), "lmp": sample.usd_per_mwh}),
        1 => {
            json!({"timestamp": time_value(sample.at), "lmp": sample.usd_per_mwh, "dam": fc(false)})
        }
        2 => json!({"data": [{"price": sample.usd_per_mwh}]}),
        _ => json!({"t": time_value(sample.at), "p": sample.usd_per_mwh, "f": fc(true)}),
    }
}

fn http_json(body: &str, k: u8, received: Timestamp) {
    let fmt = format(k);
    let Ok(r) = json::parse(body, &fmt, received) else {
        return;
    };
    price_ok(r.sample.usd_per_mwh);
    if fmt.time.is_none() {
        assert_eq!(r.sample.at, received);
    }
    assert!(r.forecast.windows(2).all(|w| w[0].start <= w[1].start));
    r.forecast.iter().for_each(|f| price_ok(f.usd_per_mwh));
    if r.forecast_error.is_some() {
        assert!(r.forecast.is_empty());
    }

    let back = body_of(k, &r.sample, &r.forecast).to_string();
    let again = json::parse(&back, &fmt, received).expect("re-serialised body parses");
    assert_eq!(again.sample.at, r.sample.at, "{back}");
    assert!(f64_close(again.sample.usd_per_mwh, r.sample.usd_per_mwh));
    assert_eq!(again.forecast.len(), r.forecast.len(), "{back}");
    for (a, b) in again.forecast.iter().zip(&r.forecast) {
        assert_eq!(a.start, b.start);
        assert!(f64_close(a.usd_per_mwh, b.usd_per_mwh));
    }
    if fmt.forecast.is_some() && r.forecast_error.is_none() {
        assert!(again.forecast_error.is_none());
    }

    // What the feed sends: the admitted sample with the forecast after it.
    let mut g = Guard::new();
    let s = g.admit(r.sample).expect("a parsed sample is admitted");
    let sig = signal(s.expect("first sample is new"), &r.forecast);
    assert!(sig.validate().is_ok(), "{sig:?}");
    let Signal::Price(p) = &sig else {
        panic!("{sig:?}");
    };
    assert!(p.forecast.iter().all(|f| f.start > r.sample.at));
    let later = r.forecast.iter().filter(|f| f.start > r.sample.at).count();
    assert_eq!(p.forecast.len(), later.min(MAX_FORECAST_POINTS));
}

/// Raw samples (time step, price bits) through a guard, against a model.
fn guard_model(mut inp: Input) {
    let mut g = Guard::new();
    let mut last: Option<Timestamp> = None;
    let mut t: u64 = 1_700_000_000_000;
    while !inp.0.is_empty() {
        // Steps of a minute, -64..=63 of them.
        let step = i64::from(inp.byte() as i8 >> 1) * 60_000;
        t = t.saturating_add_signed(step);
        let mut b = [0u8; 8];
        b.iter_mut().for_each(|x| *x = inp.byte());
        let p = f64::from_le_bytes(b);
        let s = PriceSample {
            at: Timestamp::from_millis(t),
            usd_per_mwh: p,
        };
        let r = g.admit(s);
        let good = p.is_finite() && p.abs() <= MAX_ABS_PRICE;
        match (&r, good, last) {
            (Err(PriceError::OutOfRange(x)), false, _) => assert!(x.to_bits() == p.to_bits()),
            (Err(PriceError::Backwards { last: l, got }), true, Some(m)) => {
                assert_eq!((*l, *got), (m, s.at));
                assert!(s.at < m);
            }
            (Ok(None), true, Some(m)) => assert_eq!(s.at, m),
            (Ok(Some(x)), true, m) => {
                assert_eq!(*x, s);
                assert!(m.is_none_or(|m| s.at > m));
                last = Some(s.at);
                let sig = signal(*x, &[]);
                assert!(sig.validate().is_ok(), "{sig:?}");
            }
            _ => panic!("guard gave {r:?} for {s:?} after {last:?}"),
        }
        assert_eq!(g.last(), last);
    }
}

fuzz_target!(|data: &[u8]| {
    let mut inp = Input(data);
    let mode = inp.byte();
    let knob = inp.byte();
    let start = u64::from(inp.u16()) * 1000;
    if mode % 4 == 3 {
        return guard_model(inp);
    }
    let text = String::from_utf8_lossy(inp.rest());
    let point = POINTS[usize::from(knob) % POINTS.len()];
    match mode % 4 {
        0 => {
            let interval = match knob >> 2 {
                0..=31 => IntervalLen::Auto,
                32..=47 => IntervalLen::Minutes(15),
                48..=55 => IntervalLen::Minutes(5),
                k => IntervalLen::Minutes(u32::from(k) - 55),
            };
            rtm(&text, point, interval, start)
        }
        1 => dam(&text, point),
        _ => http_json(&text, knob, Timestamp::from_millis(start)),
    }
});
