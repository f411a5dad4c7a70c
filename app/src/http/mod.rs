//! HTTP/1.1 on the control API's terms, for both of its sides: a minimal
//! client ([`client`]: `gridproxy status`, the site's pushes of parks to
//! its peers, tests) and the TLS setup of the server and the client
//! ([`tls`]). Depends on no other module of the daemon, so the API and the
//! site both use it without importing each other.

pub mod client;
pub mod tls;
