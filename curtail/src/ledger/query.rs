//! Read-only queries over a ledger file for M&V reports.

use super::{ts, Db, LedgerError, Location, Val};
use crate::mv::{episodes_from, MvInput};

/// Read what [`mv::compute`](crate::mv::compute) needs from the ledger at
/// `loc`, opened read-only (safe while a driver writes it): measured
/// intervals, price and hashprice signals, and curtailment episodes (DR
/// event windows from start to end, and periods the engine's decisions
/// were in any mode but `normal`).
pub fn read_mv_input(loc: impl Into<Location>) -> Result<MvInput, LedgerError> {
    let mut db = Db::open_read_only(&loc.into())?;
    let intervals = db
        .query(
            "SELECT start_ms, end_ms, fleet_kw, site_kw, miners FROM intervals ORDER BY start_ms, seq",
            &[],
        )?
        .iter()
        .map(super::interval)
        .collect::<Result<Vec<_>, _>>()?;
    let mut series = |kind: &str| -> Result<Vec<_>, LedgerError> {
        db.query(
            "SELECT at_ms, value FROM signals WHERE kind = ?1 AND value IS NOT NULL ORDER BY at_ms, seq",
            &[Val::Text(Some(kind))],
        )?
        .iter()
        .map(|r| Ok((ts(r.int(0)?), r.real(1)?)))
        .collect()
    };
    let prices = series("price")?;
    let hashprices = series("hashprice")?;
    let decisions = db
        .query("SELECT at_ms, mode FROM decisions ORDER BY at_ms, seq", &[])?
        .iter()
        .map(|r| Ok((ts(r.int(0)?), r.text(1)?)))
        .collect::<Result<Vec<_>, LedgerError>>()?;
    let until = intervals
        .iter()
        .map(|i| i.end)
        .chain(decisions.last().map(|d| d.0))
        .max()
        .unwrap_or_default();
    // Each event that became active: from its start to when it ended (or
    // its scheduled end, or the end of the record).
    let mut events = Vec::new();
    let rows = db.query(
        "SELECT event_id, state, at_ms, start_ms, end_ms FROM events ORDER BY event_id, seq",
        &[],
    )?;
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
    for r in rows {
        let (id, state, at, start, end) = (
            r.text(0)?,
            r.text(1)?,
            ts(r.int(2)?),
            ts(r.int(3)?),
            r.opt_int(4)?.map(ts),
        );
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
