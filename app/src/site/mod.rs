//! `[site]`: the curtailment engine and its grid signal sources, run by
//! `gridproxy run` next to the proxy.
//!
//! The section lists the miners (firmware, API address, credentials,
//! nameplate figures, the SV1 worker they hash as through this proxy), the
//! engine's policy knobs, and the signal sources in `[site.signals]`: an
//! OpenADR 3 VEN, MQTT dispatch, a polled price feed and a site-load meter.
//! [`start`] assembles them: the curtailment driver (with its SQLite
//! ledger), the firmware clients, the proxy's park actuator, each source
//! feeding the driver, and the link to the control API's site view and
//! `POST /api/v1/curtail` commands.
//!
//! Nothing here listens: the sources are clients (VTN, broker, price URL,
//! meter) and the firmware APIs are reached outbound.
//!
//! ```toml
//! [site]
//! ledger = "curtail-ledger.sqlite"     # relative to the config file
//! hashprice_usd_per_ph_day = 55.0      # enables price mode
//!
//! [[site.miners]]
//! name = "r1-01"
//! firmware = "luxos"                   # luxos | braiins | whatsminer | vnish | stock
//! address = "10.0.1.11:4028"
//! ths = 104.0
//! watts = 3068.0                       # or j_per_th = 29.5
//! worker = "acct.r1-01"                # SV1 worker name through this proxy
//!
//! [site.signals.mqtt]
//! broker = "mqtts://10.0.0.2:8883"     # TLS; a password never goes over plain MQTT off loopback
//! ca_file = "mqtt-ca.pem"
//! site_id = "s1"                       # topics site/s1/dispatch, /status, /ack
//! ```
//!
//! - [`config`]: the section's schema and validation.
//! - [`start`]: wiring it up and running it ([`start::start`], [`start::RunningSite`]).
//! - [`lease`]: active/standby among instances sharing a PostgreSQL ledger.
//! - [`park`]: the engine's hand on the proxy (park, unpark, reroute).
//! - [`parks`]: the site's parks and pins on this router, shared with the
//!   other instances.
//! - [`peers`]: pushing them to the other instances (`[[site.peers]]`).
//! - [`view`]: the site view, built from the driver's status.
//! - [`handle`]: the site view's types and the handle the control API reads it through.

pub mod config;
pub mod handle;
pub mod lease;
pub mod park;
pub mod parks;
pub mod peers;
pub mod start;
pub mod view;

pub use config::{miner_id, SiteConfig};
pub use start::{start, RunningSite};

/// The site as started: run by this instance, or under the site lease.
pub enum SiteRun {
    /// This instance runs the engine.
    Direct(RunningSite),
    /// The instance holding the site lease runs it.
    Leased(lease::LeasedSite),
}

impl SiteRun {
    /// The ledger.
    pub fn ledger(&self) -> &gridproxy_curtail::ledger::Location {
        match self {
            SiteRun::Direct(r) => &r.ledger,
            SiteRun::Leased(l) => &l.ledger,
        }
    }

    /// Stop (answers to commands in flight awaited; a lease given up).
    pub async fn stop(self) {
        match self {
            SiteRun::Direct(r) => r.stop().await,
            SiteRun::Leased(l) => l.stop().await,
        }
    }
}
