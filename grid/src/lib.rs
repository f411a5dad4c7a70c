//! Grid signal sources: each turns an outside feed into curtailment-engine
//! [`Signal`](gridproxy_curtail::signal::Signal)s sent on the driver's
//! channel. I/O lives here; the engine that decides stays pure in `curtail`.
//!
//! Modules:
//! - [`mqtt`]: MQTT dispatch targets in, site status out.
//! - [`openadr`]: an OpenADR 3 VEN: events and prices in, reports out.
//! - [`price`]: polled energy price feeds (ERCOT reports, JSON).
//! - [`site_load`]: meters of the site's other load (Modbus, Prometheus, JSON).
//! - [`tls`]: the rustls client configuration of the MQTT and VTN links.
#![warn(missing_docs)]

pub mod mqtt;
pub mod openadr;
pub mod price;
pub mod site_load;
pub mod tls;
