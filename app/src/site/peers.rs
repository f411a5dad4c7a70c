//! Parking across instances (`[[site.peers]]`): while this instance runs
//! the engine, it pushes the site's whole set of parks and pins
//! ([`SiteParks`](super::parks::SiteParks)) to every other instance's control API
//! (`POST /api/v1/site/parks`, an `operate` token of that instance), at
//! once on a change and every `peer_sync_secs` besides, so a miner is
//! parked or moved wherever it connects, and a peer that restarted or
//! missed a push catches up. Each answer says which workers the peer holds
//! (`/api/v1/fleet` `site.peers`, `/metrics` `gridproxy_site_peer_*`).
//!
//! A push is the whole set, not a change: applying it twice is harmless
//! and a lost one is repaired by the next.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::config::{resolve_secret, PeerConfig};
use super::handle::{now_ms, PeerView, SiteHandle};
use super::parks::{ParkSync, SyncReply};
use crate::http::client;

/// Bound on one push (connect, send, answer).
const PUSH_TIMEOUT: Duration = Duration::from_secs(5);

/// A peer, resolved: where, with which token, over what.
struct Link {
    name: String,
    address: String,
    token: String,
    tls: Option<tokio_rustls::TlsConnector>,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link")
            .field("name", &self.name)
            .field("address", &self.address)
            .field("tls", &self.tls.is_some())
            .finish_non_exhaustive()
    }
}

impl Link {
    fn new(i: usize, p: &PeerConfig) -> anyhow::Result<Link> {
        let key = format!("site.peers[{i}].token");
        let token = resolve_secret(&key, &p.token, &p.token_env, &p.token_file)?
            .ok_or_else(|| anyhow::anyhow!("{key}: none given"))?;
        let tls = match &p.ca_file {
            Some(ca) => Some(
                crate::http::tls::connector(ca)
                    .map_err(|e| anyhow::anyhow!("site.peers[{i}].ca_file: {e}"))?,
            ),
            None => None,
        };
        Ok(Link {
            name: p.name.clone(),
            address: p.address.clone(),
            token,
            tls,
        })
    }

    async fn push(&self, sync: &ParkSync) -> Result<SyncReply, String> {
        let addr: SocketAddr = tokio::net::lookup_host(&self.address)
            .await
            .map_err(|e| format!("{}: {e}", self.address))?
            .next()
            .ok_or_else(|| format!("{}: no address", self.address))?;
        let body = serde_json::to_value(sync).map_err(|e| e.to_string())?;
        let path = "/api/v1/site/parks";
        let r = client::request_via(
            addr,
            self.tls.as_ref(),
            "POST",
            path,
            Some(&self.token),
            Some(&body),
            PUSH_TIMEOUT,
        )
        .await?;
        if r.status != 200 {
            let text = r.text();
            return Err(format!(
                "HTTP {}: {}",
                r.status,
                text.trim().chars().take(300).collect::<String>()
            ));
        }
        serde_json::from_slice(&r.body).map_err(|e| format!("answer: {e}"))
    }
}

/// Start pushing to every peer in `peers` while `stop` runs; `fence` is
/// this instance's lease token. Errors on a token that cannot be read.
pub fn spawn(
    peers: &[PeerConfig],
    every: Duration,
    from: String,
    fence: Option<u64>,
    site: Arc<SiteHandle>,
    stop: CancellationToken,
) -> anyhow::Result<Vec<tokio::task::JoinHandle<()>>> {
    let links = peers
        .iter()
        .enumerate()
        .map(|(i, p)| Link::new(i, p))
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(links
        .into_iter()
        .map(|link| {
            tokio::spawn(run(
                link,
                every,
                from.clone(),
                fence,
                site.clone(),
                stop.clone(),
            ))
        })
        .collect())
}

async fn run(
    link: Link,
    every: Duration,
    from: String,
    fence: Option<u64>,
    site: Arc<SiteHandle>,
    stop: CancellationToken,
) {
    let parks = &site.parks;
    let mut changed = parks.subscribe();
    let mut view = PeerView {
        name: link.name.clone(),
        address: link.address.clone(),
        ..PeerView::default()
    };
    site.set_peer(Some(view.clone()));
    loop {
        changed.mark_unchanged();
        let sync = ParkSync {
            from: from.clone(),
            fence,
            parks: parks.snapshot(),
        };
        let r = tokio::select! {
            _ = stop.cancelled() => break,
            r = link.push(&sync) => r,
        };
        match r {
            Ok(reply) => {
                if !view.up {
                    tracing::info!(peer = %link.name, applied = reply.applied, workers = reply.workers.len(), "site peer reached: parks in force there");
                }
                if reply.unknown_pools > 0 {
                    tracing::warn!(peer = %link.name, pins = reply.unknown_pools, "site peer has no pool of that name for some pins (parks apply)");
                }
                view.up = true;
                view.last_ok_ms = Some(now_ms());
                view.applied = reply.applied;
                view.workers = reply.workers.len();
                view.pushes_ok += 1;
                view.error = None;
            }
            Err(e) => {
                if view.up || view.pushes_failed == 0 {
                    tracing::warn!(peer = %link.name, error = %e, "site peer not reached: parks not pushed (retrying)");
                }
                view.up = false;
                view.pushes_failed += 1;
                view.error = Some(e);
            }
        }
        site.set_peer(Some(view.clone()));
        // A failed push waits its turn too (a down peer is not hammered).
        tokio::select! {
            _ = stop.cancelled() => break,
            r = changed.changed() => if r.is_err() { break },
            _ = tokio::time::sleep(every) => {}
        }
    }
}
