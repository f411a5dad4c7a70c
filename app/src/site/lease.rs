//! Active/standby (`[site.lease]`): every instance sharing a site's
//! PostgreSQL ledger runs this; the one that holds the site lease runs the
//! curtailment engine and its signal sources (so the VTN and the MQTT
//! broker see one client), the others wait and take the lease when it
//! lapses. Taking over is a restart: the engine recovers from the ledger
//! which miners are curtailed, so none is woken by the handover. The
//! engine records commands under its lease token (fencing): once another
//! instance holds the lease, its next command is refused and never sent.
//! A command recorded just before a pause that outlasts the lease is not
//! sent either: the driver checks this instance's own deadline (moved by
//! each renewal) between record and send.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gridproxy_curtail::ledger::{Deadline, Lease, Ledger, LedgerError, Location};
use tokio_util::sync::CancellationToken;

use super::config::{LeaseConfig, SiteConfig};
use super::handle::{LeaseView, SiteHandle};
use super::start::{start, LatencySink};

/// The supervisor task of a leased site.
pub struct LeasedSite {
    task: tokio::task::JoinHandle<()>,
    stop: CancellationToken,
    /// The shared ledger.
    pub ledger: Location,
}

impl LeasedSite {
    /// Stop the engine if this instance runs it (answers to commands in
    /// flight awaited) and give the lease up.
    pub async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

type Shared = Arc<Mutex<Ledger>>;

/// Run `f` on the lease's own ledger connection, off the async threads.
async fn on_ledger<T: Send + 'static>(
    l: &Shared,
    f: impl FnOnce(&mut Ledger) -> Result<T, LedgerError> + Send + 'static,
) -> Result<T, String> {
    let l = l.clone();
    tokio::task::spawn_blocking(move || f(&mut l.lock().unwrap_or_else(|e| e.into_inner())))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())
}

/// Connect to the ledger and start supervising; the site starts when the
/// lease is this instance's.
pub async fn supervise(
    cfg: &SiteConfig,
    lease: &LeaseConfig,
    router: Arc<gridproxy_proxy::router::Router>,
    site: Arc<SiteHandle>,
    latency: Option<LatencySink>,
    shutdown: CancellationToken,
) -> anyhow::Result<(LeasedSite, String)> {
    let loc: Location = cfg.ledger_location()?;
    let conn_loc = loc.clone();
    let ledger = tokio::task::spawn_blocking(move || Ledger::connect(&conn_loc))
        .await?
        .map_err(|e| anyhow::anyhow!("site.ledger ({loc}): {e}"))?;
    // Dropping a PostgreSQL ledger is fine anywhere (its runtime goes in the
    // background), so the Mutex may end on an async thread.
    let ledger: Shared = Arc::new(Mutex::new(ledger));
    let instance = lease.instance_name();
    let line = format!(
        "curtailment engine: site {:?} shared through ledger {loc}; instance {instance:?} runs it \
         while it holds the site lease ({} s)",
        lease.site_id, lease.secs
    );
    let stop = shutdown.child_token();
    let task = tokio::spawn(run(
        cfg.clone(),
        lease.clone(),
        instance,
        ledger,
        router,
        site,
        latency,
        stop.clone(),
    ));
    Ok((
        LeasedSite {
            task,
            stop,
            ledger: loc,
        },
        line,
    ))
}

#[allow(clippy::too_many_arguments)]
async fn run(
    cfg: SiteConfig,
    lease_cfg: LeaseConfig,
    instance: String,
    ledger: Shared,
    router: Arc<gridproxy_proxy::router::Router>,
    site: Arc<SiteHandle>,
    latency: Option<LatencySink>,
    stop: CancellationToken,
) {
    let ttl = Duration::from_secs(lease_cfg.secs);
    let every = ttl / 3;
    let site_id = lease_cfg.site_id.clone();
    loop {
        // Standby until the lease is free.
        held(&site, None);
        let mut said = false;
        let lease = loop {
            let (s, i) = (site_id.clone(), instance.clone());
            match on_ledger(&ledger, move |l| l.acquire_lease(&s, &i, ttl)).await {
                Ok(Some(l)) => break l,
                Ok(None) if !said => {
                    tracing::info!(site = %site_id, "site lease held by another instance: standby");
                    said = true;
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(error = %e, "site lease: cannot reach the ledger"),
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
        };
        tracing::info!(
            site = %site_id,
            token = lease.token,
            "site lease acquired: this instance runs the curtailment engine"
        );
        held(&site, Some(lease.token));
        let deadline = Deadline::new(&lease);
        let running = match start(
            &cfg,
            router.clone(),
            site.clone(),
            latency.clone(),
            stop.clone(),
            Some((lease.clone(), deadline.clone())),
        )
        .await
        {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "curtailment engine did not start; giving the lease up");
                release(&ledger, lease).await;
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(ttl) => continue,
                }
            }
        };
        for line in &running.started {
            tracing::info!("{line}");
        }
        match hold(&ledger, lease, &deadline, &running, ttl, &stop).await {
            Held::Stopped(lease) => {
                running.stop().await;
                release(&ledger, lease).await;
                held(&site, None);
                return;
            }
            Held::EngineStopped(lease) => {
                // Give the lease up and compete for it again: whoever takes
                // it next (this instance too) restarts from the ledger.
                tracing::error!(site = %site_id, "curtailment engine stopped while holding the site lease: giving it up");
                running.stop().await;
                release(&ledger, lease).await;
            }
            Held::Lost(why) => {
                tracing::error!(site = %site_id, "site lease lost ({why}): stopping the curtailment engine; standby");
                // Its commands are fenced already; stop it all the same.
                running.stop().await;
            }
        }
    }
}

/// Publish whether this instance holds the lease (`/metrics`, `/api/v1/fleet`).
fn held(site: &SiteHandle, token: Option<u64>) {
    site.set_lease(LeaseView {
        held: token.is_some(),
        token: token.unwrap_or(0),
    });
}

enum Held {
    /// Asked to stop, lease still ours.
    Stopped(Lease),
    /// Another instance may act now.
    Lost(String),
    /// The engine stopped by itself (see the log), lease still ours.
    EngineStopped(Lease),
}

/// Renew every third of the lease until asked to stop or the lease is
/// lost (refused, or not renewed before this instance's own deadline).
/// Each renewal moves `deadline`, which the driver checks before sending.
async fn hold(
    ledger: &Shared,
    mut lease: Lease,
    deadline: &Deadline,
    running: &super::RunningSite,
    ttl: Duration,
    stop: &CancellationToken,
) -> Held {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return Held::Stopped(lease),
            _ = tokio::time::sleep(ttl / 3) => {}
        }
        if running.driver_stopped() {
            return Held::EngineStopped(lease);
        }
        let mut l = lease.clone();
        let r = on_ledger(ledger, move |db| {
            db.renew_lease(&mut l, ttl).map(|ok| (ok, l))
        })
        .await;
        match r {
            Ok((true, renewed)) => {
                deadline.extend(&renewed);
                lease = renewed;
            }
            Ok((false, _)) => return Held::Lost("another instance holds it".into()),
            Err(e) if Instant::now() >= lease.valid_until => {
                return Held::Lost(format!("not renewed in time: {e}"))
            }
            Err(e) => tracing::warn!(error = %e, "site lease renewal failed; retrying"),
        }
    }
}

async fn release(ledger: &Shared, lease: Lease) {
    if let Err(e) = on_ledger(ledger, move |l| l.release_lease(&lease)).await {
        tracing::warn!(error = %e, "site lease not released (it lapses on its own)");
    }
}
