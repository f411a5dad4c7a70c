//! Stock cgminer telemetry (no control surface: such miners can only be
//! parked by the proxy).
//!
//! Hashrate from `summary` (`GHS 5s`); power from `stats` (the first
//! `STATS` entry with a `Power` field). Stock firmware that reports no power
//! gives [`ClientError::Protocol`]; a site meter must cover such miners.

use serde_json::{json, Value};

use super::cgminer::{self, check_status, number};
use super::{bounded, ClientConfig, ClientError, Reading};

/// A stock cgminer API client (read-only).
#[derive(Debug, Clone)]
pub struct StockClient {
    cfg: ClientConfig,
}

impl StockClient {
    /// A client for the miner at `cfg.addr`.
    pub fn new(cfg: ClientConfig) -> StockClient {
        StockClient { cfg }
    }

    /// Power and hashrate.
    pub async fn telemetry(&self) -> Result<Reading, ClientError> {
        bounded(self.cfg.timeout, async {
            let summary =
                cgminer::request(&self.cfg.addr, &json!({ "command": "summary" })).await?;
            check_status(&summary)?;
            let stats = cgminer::request(&self.cfg.addr, &json!({ "command": "stats" })).await?;
            check_status(&stats)?;
            let power = stats
                .get("STATS")
                .and_then(Value::as_array)
                .and_then(|a| a.iter().position(|s| s.get("Power").is_some()))
                .ok_or(ClientError::Protocol("stats report no power".into()))?;
            Ok(Reading {
                power_w: number(&stats, &format!("/STATS/{power}/Power"))?,
                hashrate_ths: number(&summary, "/SUMMARY/0/GHS 5s")? / 1000.0,
            })
        })
        .await
    }
}
