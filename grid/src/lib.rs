//! Grid signal sources: each turns an outside feed into curtailment-engine
//! [`Signal`](gridproxy_curtail::signal::Signal)s sent on the driver's
//! channel. I/O lives here; the engine that decides stays pure in `curtail`.

pub mod mqtt;
pub mod openadr;
pub mod price;
pub mod site_load;
