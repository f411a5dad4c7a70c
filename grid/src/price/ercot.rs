//! ERCOT settlement-point price reports (sans-IO).
//!
//! Real-time (RTM) rows, as in ERCOT's "Settlement Point Prices at Resource
//! Nodes, Hubs and Load Zones" report:
//!
//! ```text
//! DeliveryDate,DeliveryHour,DeliveryInterval,SettlementPointName,SettlementPointType,SettlementPointPrice,DSTFlag
//! 08/17/2023,20,12,HB_HOUSTON,HU,5078.40,N
//! ```
//!
//! `DeliveryHour` is hour-ending (1..=24) and `DeliveryInterval` numbers the
//! intervals inside it: 1..=4 in ERCOT's 15-minute settlement report, 1..=12
//! for 5-minute data. Times are Central Prevailing Time; on the day clocks go
//! back, the repeated hour carries `DSTFlag = Y`.
//!
//! Day-ahead (DAM) rows: `DeliveryDate,HourEnding,SettlementPoint,
//! SettlementPointPrice,DSTFlag` with `HourEnding` like `01:00` .. `24:00`;
//! they become the forecast of a price signal.
//!
//! Columns are found by name (any order, any case); other settlement points
//! are skipped; a bad row is reported and skipped, never fatal.

use std::collections::BTreeSet;

use gridproxy_curtail::signal::PricePoint;
use gridproxy_curtail::time::Timestamp;
use jiff::civil::{Date, DateTime};
use jiff::tz::{AmbiguousOffset, TimeZone};

use super::{check_price, PriceError, PriceSample};

/// Interval length of an RTM report.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum IntervalLen {
    /// 15 minutes if no `DeliveryInterval` exceeds 4, else 5 minutes.
    #[default]
    Auto,
    /// Fixed minutes (5 or 15; must divide 60).
    Minutes(u32),
}

/// What to take from an RTM report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RtmOptions {
    /// Settlement point, e.g. `HB_HOUSTON`, `LZ_WEST`.
    pub point: String,
    /// Interval length.
    pub interval: IntervalLen,
}

impl RtmOptions {
    /// Rows of `point`, interval length detected.
    pub fn new(point: &str) -> RtmOptions {
        RtmOptions {
            point: point.to_string(),
            interval: IntervalLen::Auto,
        }
    }
}

/// A parsed report.
#[derive(Clone, Debug, PartialEq)]
pub struct Parsed<T> {
    /// Good rows of the chosen settlement point, by time.
    pub rows: Vec<T>,
    /// Rows rejected, with why.
    pub errors: Vec<PriceError>,
    /// Every settlement point named in the file.
    pub points: BTreeSet<String>,
    /// Interval length used, minutes (RTM only).
    pub interval_minutes: u32,
}

impl<T> Default for Parsed<T> {
    fn default() -> Self {
        Parsed {
            rows: Vec::new(),
            errors: Vec::new(),
            points: BTreeSet::new(),
            interval_minutes: 0,
        }
    }
}

fn csv_err(line: u64, msg: impl Into<String>) -> PriceError {
    PriceError::Csv {
        line,
        msg: msg.into(),
    }
}

/// Central Prevailing Time (America/Chicago), from the bundled tz database.
fn cpt() -> Result<TimeZone, PriceError> {
    TimeZone::get("America/Chicago").map_err(|e| PriceError::Time(e.to_string()))
}

/// `MM/DD/YYYY` (ERCOT) or `YYYY-MM-DD`.
pub fn parse_date(s: &str) -> Result<Date, PriceError> {
    let s = s.trim();
    let bad = || PriceError::Time(format!("date {s:?} (want MM/DD/YYYY or YYYY-MM-DD)"));
    let parts: Vec<&str> = s.split(['/', '-']).collect();
    if parts.len() != 3 {
        return Err(bad());
    }
    let n: Vec<i32> = parts
        .iter()
        .map(|p| p.parse::<i32>().map_err(|_| bad()))
        .collect::<Result<_, _>>()?;
    let (y, m, d) = if s.contains('/') {
        (n[2], n[0], n[1])
    } else {
        (n[0], n[1], n[2])
    };
    let (Ok(y), Ok(m), Ok(d)) = (i16::try_from(y), i8::try_from(m), i8::try_from(d)) else {
        return Err(bad());
    };
    Date::new(y, m, d).map_err(|_| bad())
}

/// Local CPT time `minutes` after midnight of `date` (may reach 24 h: the
/// next day) as a UTC timestamp. `repeated`: the second pass through the
/// hour clocks go back (ERCOT's `DSTFlag = Y`).
pub fn cpt_timestamp(
    tz: &TimeZone,
    date: Date,
    minutes: u32,
    repeated: bool,
) -> Result<Timestamp, PriceError> {
    let midnight: DateTime = date.at(0, 0, 0, 0);
    let local = midnight
        .checked_add(jiff::SignedDuration::from_mins(i64::from(minutes)))
        .map_err(|e| PriceError::Time(e.to_string()))?;
    let amb = tz.to_ambiguous_zoned(local);
    let zoned = match amb.offset() {
        AmbiguousOffset::Gap { .. } => {
            return Err(PriceError::Time(format!(
                "{local} does not exist in Central Prevailing Time (clocks go forward)"
            )))
        }
        AmbiguousOffset::Fold { .. } if repeated => amb.later(),
        _ => amb.earlier(),
    }
    .map_err(|e| PriceError::Time(e.to_string()))?;
    let ms = zoned.timestamp().as_millisecond();
    u64::try_from(ms)
        .map(Timestamp::from_millis)
        .map_err(|_| PriceError::Time(format!("{local} before 1970")))
}

/// Column positions by (case-insensitive) name.
struct Columns(Vec<String>);

impl Columns {
    fn find(&self, names: &[&str]) -> Option<usize> {
        self.0
            .iter()
            .position(|h| names.iter().any(|n| h.trim().eq_ignore_ascii_case(n)))
    }
    fn need(&self, names: &[&str]) -> Result<usize, PriceError> {
        self.find(names)
            .ok_or_else(|| csv_err(1, format!("no column {} in header", names[0])))
    }
}

fn reader(text: &str) -> csv::Reader<&[u8]> {
    csv::ReaderBuilder::new()
        .trim(csv::Trim::All)
        .flexible(true)
        .comment(Some(b'#'))
        .from_reader(text.as_bytes())
}

fn field(r: &csv::StringRecord, i: usize, line: u64) -> Result<&str, PriceError> {
    r.get(i)
        .ok_or_else(|| csv_err(line, format!("missing column {}", i + 1)))
}

fn number(s: &str, what: &str, line: u64) -> Result<f64, PriceError> {
    s.parse::<f64>()
        .map_err(|_| csv_err(line, format!("{what} {s:?} is not a number")))
}

fn flag(s: &str) -> bool {
    s.eq_ignore_ascii_case("y") || s.eq_ignore_ascii_case("true")
}

/// Parse an RTM settlement-point price report.
pub fn parse_rtm(text: &str, opts: &RtmOptions) -> Result<Parsed<PriceSample>, PriceError> {
    let tz = cpt()?;
    let mut rd = reader(text);
    let head = Columns(
        rd.headers()
            .map_err(|e| csv_err(1, e.to_string()))?
            .iter()
            .map(str::to_string)
            .collect(),
    );
    let c_date = head.need(&["DeliveryDate"])?;
    let c_hour = head.need(&["DeliveryHour"])?;
    let c_int = head.need(&["DeliveryInterval"])?;
    let c_point = head.need(&["SettlementPointName", "SettlementPoint"])?;
    let c_price = head.need(&["SettlementPointPrice"])?;
    let c_dst = head.find(&["DSTFlag"]);
    let mut out = Parsed::default();
    // (line, date, hour, interval, repeated, price), converted once the
    // interval length is known.
    let mut raw = Vec::new();
    for rec in rd.records() {
        let rec = match rec {
            Ok(r) => r,
            Err(e) => {
                let line = e.position().map_or(0, |p| p.line());
                out.errors.push(csv_err(line, e.to_string()));
                continue;
            }
        };
        let line = rec.position().map_or(0, |p| p.line());
        let row = (|| {
            let point = field(&rec, c_point, line)?;
            out.points.insert(point.to_string());
            if !point.eq_ignore_ascii_case(&opts.point) {
                return Ok(None);
            }
            let date = parse_date(field(&rec, c_date, line)?)?;
            let hour = number(field(&rec, c_hour, line)?, "DeliveryHour", line)?;
            let int = number(field(&rec, c_int, line)?, "DeliveryInterval", line)?;
            if !(1.0..=24.0).contains(&hour) || hour.fract() != 0.0 {
                return Err(csv_err(line, format!("DeliveryHour {hour} not in 1..=24")));
            }
            if !(1.0..=12.0).contains(&int) || int.fract() != 0.0 {
                return Err(csv_err(
                    line,
                    format!("DeliveryInterval {int} not in 1..=12"),
                ));
            }
            let price = check_price(number(
                field(&rec, c_price, line)?,
                "SettlementPointPrice",
                line,
            )?)
            .map_err(|e| csv_err(line, e.to_string()))?;
            let repeated = c_dst.and_then(|c| rec.get(c)).is_some_and(flag);
            Ok(Some((line, date, hour as u32, int as u32, repeated, price)))
        })();
        match row {
            Ok(Some(r)) => raw.push(r),
            Ok(None) => {}
            Err(e) => out.errors.push(e),
        }
    }
    let minutes = match opts.interval {
        IntervalLen::Minutes(m) if m > 0 && 60 % m == 0 => m,
        IntervalLen::Minutes(m) => {
            return Err(csv_err(
                0,
                format!("interval of {m} min does not divide an hour"),
            ))
        }
        IntervalLen::Auto if raw.iter().all(|r| r.3 <= 4) => 15,
        IntervalLen::Auto => 5,
    };
    out.interval_minutes = minutes;
    for (line, date, hour, int, repeated, price) in raw {
        if int > 60 / minutes {
            out.errors.push(csv_err(
                line,
                format!("DeliveryInterval {int} past the hour at {minutes}-minute intervals"),
            ));
            continue;
        }
        let start = (hour - 1) * 60 + (int - 1) * minutes;
        match cpt_timestamp(&tz, date, start, repeated) {
            Ok(at) => out.rows.push(PriceSample {
                at,
                usd_per_mwh: price,
            }),
            Err(e) => out.errors.push(csv_err(line, e.to_string())),
        }
    }
    out.rows.sort_by_key(|s| s.at);
    dedup(&mut out.rows, |s| s.at, &mut out.errors);
    Ok(out)
}

/// Parse a DAM hourly report into forecast points (one per hour start).
pub fn parse_dam(text: &str, point: &str) -> Result<Parsed<PricePoint>, PriceError> {
    let tz = cpt()?;
    let mut rd = reader(text);
    let head = Columns(
        rd.headers()
            .map_err(|e| csv_err(1, e.to_string()))?
            .iter()
            .map(str::to_string)
            .collect(),
    );
    let c_date = head.need(&["DeliveryDate"])?;
    let c_hour = head.need(&["HourEnding", "DeliveryHour"])?;
    let c_point = head.need(&["SettlementPoint", "SettlementPointName"])?;
    let c_price = head.need(&["SettlementPointPrice"])?;
    let c_dst = head.find(&["DSTFlag"]);
    let mut out = Parsed {
        interval_minutes: 60,
        ..Parsed::default()
    };
    for rec in rd.records() {
        let rec = match rec {
            Ok(r) => r,
            Err(e) => {
                let line = e.position().map_or(0, |p| p.line());
                out.errors.push(csv_err(line, e.to_string()));
                continue;
            }
        };
        let line = rec.position().map_or(0, |p| p.line());
        let row = (|| {
            let p = field(&rec, c_point, line)?;
            out.points.insert(p.to_string());
            if !p.eq_ignore_ascii_case(point) {
                return Ok(None);
            }
            let date = parse_date(field(&rec, c_date, line)?)?;
            let he = field(&rec, c_hour, line)?;
            let hour = number(he.split(':').next().unwrap_or(he), "HourEnding", line)?;
            if !(1.0..=24.0).contains(&hour) || hour.fract() != 0.0 {
                return Err(csv_err(line, format!("HourEnding {he:?} not in 1..=24")));
            }
            let price = check_price(number(
                field(&rec, c_price, line)?,
                "SettlementPointPrice",
                line,
            )?)
            .map_err(|e| csv_err(line, e.to_string()))?;
            let repeated = c_dst.and_then(|c| rec.get(c)).is_some_and(flag);
            let start = cpt_timestamp(&tz, date, (hour as u32 - 1) * 60, repeated)
                .map_err(|e| csv_err(line, e.to_string()))?;
            Ok(Some(PricePoint {
                start,
                usd_per_mwh: price,
            }))
        })();
        match row {
            Ok(Some(r)) => out.rows.push(r),
            Ok(None) => {}
            Err(e) => out.errors.push(e),
        }
    }
    out.rows.sort_by_key(|p| p.start);
    dedup(&mut out.rows, |p| p.start, &mut out.errors);
    Ok(out)
}

/// Two rows for the same time: keep the first, report the rest.
fn dedup<T>(rows: &mut Vec<T>, key: impl Fn(&T) -> Timestamp, errors: &mut Vec<PriceError>) {
    let mut last: Option<Timestamp> = None;
    rows.retain(|r| {
        let k = key(r);
        if last == Some(k) {
            errors.push(csv_err(0, format!("two rows for the interval at {k}")));
            false
        } else {
            last = Some(k);
            true
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEAD: &str = "DeliveryDate,DeliveryHour,DeliveryInterval,SettlementPointName,SettlementPointType,SettlementPointPrice,DSTFlag\n";

    fn utc(s: &str) -> Timestamp {
        let t: jiff::Timestamp = s.parse().unwrap();
        Timestamp::from_millis(t.as_millisecond() as u64)
    }

    #[test]
    fn five_minute_rows_in_cdt_become_utc() {
        let text = format!(
            "{HEAD}08/17/2023,20,10,HB_HOUSTON,HU,4500.5,N\n\
             08/17/2023,20,12,HB_HOUSTON,HU,5078.40,N\n\
             08/17/2023,20,12,LZ_WEST,LZ,4999.00,N\n\
             \"08/17/2023\",\"20\",\"11\",\"HB_HOUSTON\",\"HU\",\"5010\",\"N\"\n"
        );
        let p = parse_rtm(&text, &RtmOptions::new("HB_HOUSTON")).unwrap();
        assert!(p.errors.is_empty(), "{:?}", p.errors);
        assert_eq!(p.interval_minutes, 5);
        assert_eq!(p.rows.len(), 3);
        // Hour ending 20, interval 12 = 19:55 CDT = 00:55 UTC next day.
        assert_eq!(p.rows[2].at, utc("2023-08-18T00:55:00Z"));
        assert_eq!(p.rows[2].usd_per_mwh, 5078.40);
        assert_eq!(p.rows[0].at, utc("2023-08-18T00:45:00Z"));
        assert_eq!(p.rows[1].usd_per_mwh, 5010.0);
        assert_eq!(p.points.len(), 2);
    }

    #[test]
    fn fifteen_minute_report_in_cst_detected() {
        let text = format!(
            "{HEAD}02/15/2021,1,1,HB_HOUSTON,HU,1200,N\n02/15/2021,1,4,HB_HOUSTON,HU,9000,N\n02/15/2021,24,4,HB_HOUSTON,HU,9000,N\n"
        );
        let p = parse_rtm(&text, &RtmOptions::new("hb_houston")).unwrap();
        assert_eq!(p.interval_minutes, 15);
        assert_eq!(p.rows[0].at, utc("2021-02-15T06:00:00Z"));
        assert_eq!(p.rows[1].at, utc("2021-02-15T06:45:00Z"));
        assert_eq!(p.rows[2].at, utc("2021-02-16T05:45:00Z"));
    }

    #[test]
    fn repeated_hour_on_fall_back_day_uses_dst_flag() {
        // 2023-11-05: 01:00-02:00 CDT then again CST.
        let text =
            format!("{HEAD}11/05/2023,2,1,HB_HOUSTON,HU,20,N\n11/05/2023,2,1,HB_HOUSTON,HU,21,Y\n");
        let p = parse_rtm(
            &text,
            &RtmOptions {
                point: "HB_HOUSTON".into(),
                interval: IntervalLen::Minutes(15),
            },
        )
        .unwrap();
        assert!(p.errors.is_empty(), "{:?}", p.errors);
        assert_eq!(p.rows[0].at, utc("2023-11-05T06:00:00Z"));
        assert_eq!(p.rows[1].at, utc("2023-11-05T07:00:00Z"));
    }

    #[test]
    fn bad_rows_are_reported_and_skipped() {
        let text = format!(
            "{HEAD}08/17/2023,20,1,HB_HOUSTON,HU,abc,N\n\
             08/17/2023,25,1,HB_HOUSTON,HU,10,N\n\
             13/40/2023,1,1,HB_HOUSTON,HU,10,N\n\
             08/17/2023,1,1,HB_HOUSTON,HU,NaN,N\n\
             08/17/2023,1,1,HB_HOUSTON,HU,2000000,N\n\
             08/17/2023,1,2,HB_HOUSTON\n\
             03/12/2023,3,1,HB_HOUSTON,HU,10,N\n\
             08/17/2023,1,3,HB_HOUSTON,HU,10,N\n\
             08/17/2023,1,3,HB_HOUSTON,HU,11,N\n"
        );
        let p = parse_rtm(&text, &RtmOptions::new("HB_HOUSTON")).unwrap();
        assert_eq!(p.rows.len(), 1, "{:?}", p.rows);
        assert_eq!(p.rows[0].usd_per_mwh, 10.0);
        // abc, hour 25, month 13, NaN, 2e6, short row, DST gap, duplicate.
        assert_eq!(p.errors.len(), 8, "{:#?}", p.errors);
        let msgs: Vec<String> = p.errors.iter().map(|e| e.to_string()).collect();
        assert!(msgs.iter().any(|m| m.contains("not a number")), "{msgs:?}");
        assert!(msgs.iter().any(|m| m.contains("out of range")), "{msgs:?}");
        assert!(
            msgs.iter().any(|m| m.contains("does not exist")),
            "{msgs:?}"
        );
    }

    #[test]
    fn missing_column_is_an_error() {
        let e = parse_rtm("a,b,c\n1,2,3\n", &RtmOptions::new("X")).unwrap_err();
        assert!(e.to_string().contains("DeliveryDate"), "{e}");
    }

    #[test]
    fn dam_hours_become_forecast_points() {
        let text = "DeliveryDate,HourEnding,SettlementPoint,SettlementPointPrice,DSTFlag\n\
                    08/17/2023,01:00,HB_HOUSTON,31.5,N\n\
                    08/17/2023,20:00,HB_HOUSTON,2500,N\n\
                    08/17/2023,20:00,HB_NORTH,2400,N\n\
                    08/17/2023,xx:00,HB_HOUSTON,1,N\n";
        let p = parse_dam(text, "HB_HOUSTON").unwrap();
        assert_eq!(p.rows.len(), 2);
        assert_eq!(p.errors.len(), 1);
        assert_eq!(p.rows[0].start, utc("2023-08-17T05:00:00Z"));
        assert_eq!(p.rows[1].start, utc("2023-08-18T00:00:00Z"));
        assert_eq!(p.rows[1].usd_per_mwh, 2500.0);
    }
}
