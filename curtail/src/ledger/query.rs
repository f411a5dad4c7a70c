//! Read-only queries over a ledger file for M&V reports.

use std::path::Path;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags};

use super::{ts, LedgerError};
use crate::mv::{episodes_from, MvInput};

/// Read what [`mv::compute`](crate::mv::compute) needs from the ledger at
/// `path`, opened read-only (safe while a driver writes it): measured
/// intervals, price and hashprice signals, and curtailment episodes (DR
/// event windows from start to end, and periods the engine's decisions
/// were in any mode but `normal`).
pub fn read_mv_input(path: impl AsRef<Path>) -> Result<MvInput, LedgerError> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(Duration::from_secs(5))?;
    let mut intervals = Vec::new();
    let mut stmt = conn.prepare(
        "SELECT start_ms, end_ms, fleet_kw, site_kw, miners FROM intervals ORDER BY start_ms, seq",
    )?;
    for row in stmt.query_map([], |r| {
        Ok(super::Interval {
            start: ts(r.get(0)?),
            end: ts(r.get(1)?),
            fleet_kw: r.get(2)?,
            site_kw: r.get(3)?,
            miners: r.get(4)?,
        })
    })? {
        intervals.push(row?);
    }
    let series = |kind: &str| -> Result<Vec<_>, LedgerError> {
        let mut stmt = conn.prepare(
            "SELECT at_ms, value FROM signals WHERE kind = ?1 AND value IS NOT NULL ORDER BY at_ms, seq",
        )?;
        let rows = stmt.query_map([kind], |r| Ok((ts(r.get(0)?), r.get::<_, f64>(1)?)))?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    };
    let prices = series("price")?;
    let hashprices = series("hashprice")?;
    let mut decisions = Vec::new();
    let mut stmt = conn.prepare("SELECT at_ms, mode FROM decisions ORDER BY at_ms, seq")?;
    for row in stmt.query_map([], |r| Ok((ts(r.get(0)?), r.get::<_, String>(1)?)))? {
        decisions.push(row?);
    }
    let until = intervals
        .iter()
        .map(|i| i.end)
        .chain(decisions.last().map(|d| d.0))
        .max()
        .unwrap_or_default();
    // Each event that became active: from its start to when it ended (or
    // its scheduled end, or the end of the record).
    let mut events = Vec::new();
    let mut stmt = conn.prepare(
        "SELECT event_id, state, at_ms, start_ms, end_ms FROM events ORDER BY event_id, seq",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, String>(1)?,
            ts(r.get(2)?),
            ts(r.get(3)?),
            r.get::<_, Option<i64>>(4)?.map(ts),
        ))
    })?;
    let mut cur: Option<(
        String,
        bool,
        crate::time::Timestamp,
        Option<crate::time::Timestamp>,
    )> = None;
    let flush = |c: Option<(String, bool, _, Option<_>)>, events: &mut Vec<_>| {
        if let Some((id, true, start, end)) = c {
            events.push((id, start, end.unwrap_or(until)));
        }
    };
    for row in rows {
        let (id, state, at, start, end) = row?;
        if cur.as_ref().is_none_or(|c| c.0 != id) {
            flush(cur.take(), &mut events);
            cur = Some((id.clone(), false, start, end));
        }
        if let Some(c) = cur.as_mut() {
            c.2 = start;
            match state.as_str() {
                "active" => c.1 = true,
                "ended" => c.3 = Some(at.min(end.unwrap_or(at))),
                _ => c.3 = end,
            }
        }
    }
    flush(cur.take(), &mut events);
    Ok(MvInput {
        episodes: episodes_from(&decisions, &events, until),
        intervals,
        prices,
        hashprices,
    })
}
