//! TLS for the grid links (MQTT broker, OpenADR VTN): one rustls client
//! configuration for rumqttc, reqwest and tokio-tungstenite alike.
//!
//! - Crypto: rustls with the `ring` provider, the same as the control API's
//!   HTTPS (passed explicitly: with more than one provider linked, rustls has
//!   no process default and its plain `builder()` would panic).
//! - Trust: the certificates of [`TlsOptions::ca_file`] only (a private CA),
//!   or, without one, the Mozilla root store built into the binary
//!   (`webpki-roots`), the same on every host, whatever its system store.
//! - The server's certificate must name the host the client connects to (a
//!   DNS name, or an IP address as an IP subject alternative name).
//! - Optional client certificate ([`TlsOptions::client_cert`]) for brokers
//!   that require one.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use thiserror::Error;

/// The rustls version the clients are built with, for callers that build
/// their own configuration.
pub use rustls;

/// How a grid link verifies its server (and identifies itself).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TlsOptions {
    /// PEM file of the CA certificate(s) to trust instead of the built-in
    /// public roots (a private CA).
    pub ca_file: Option<PathBuf>,
    /// PEM certificate chain presented to the server (with `client_key`).
    pub client_cert: Option<PathBuf>,
    /// PEM private key of `client_cert`.
    pub client_key: Option<PathBuf>,
}

/// A TLS set-up that cannot be built (a file missing or without PEM in it).
#[derive(Debug, Error)]
#[error("{0}")]
pub struct TlsError(String);

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certs(key: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bad = |e: &dyn std::fmt::Display| TlsError(format!("{key} {}: {e}", path.display()));
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| bad(&e))?
        .collect::<Result<_, _>>()
        .map_err(|e| bad(&e))?;
    if certs.is_empty() {
        return Err(bad(&"no PEM certificate in it"));
    }
    Ok(certs)
}

impl TlsOptions {
    /// Trust only the CA certificates in `ca_file`.
    pub fn with_ca(ca_file: impl Into<PathBuf>) -> TlsOptions {
        TlsOptions {
            ca_file: Some(ca_file.into()),
            ..TlsOptions::default()
        }
    }

    /// Read the files and build the client configuration (no ALPN: HTTP/1.1,
    /// websocket and MQTT alike).
    pub fn client_config(&self) -> Result<rustls::ClientConfig, TlsError> {
        let mut roots = rustls::RootCertStore::empty();
        match &self.ca_file {
            Some(p) => {
                for c in certs("ca_file", p)? {
                    roots.add(c).map_err(|e| {
                        TlsError(format!(
                            "ca_file {}: not a CA certificate: {e}",
                            p.display()
                        ))
                    })?;
                }
            }
            None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        }
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError(e.to_string()))?
            .with_root_certificates(roots);
        match (&self.client_cert, &self.client_key) {
            (None, None) => Ok(builder.with_no_client_auth()),
            (Some(c), Some(k)) => {
                let chain = certs("client_cert", c)?;
                let key = PrivateKeyDer::from_pem_file(k)
                    .map_err(|e| TlsError(format!("client_key {}: {e}", k.display())))?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| TlsError(format!("client_cert and client_key do not match: {e}")))
            }
            _ => Err(TlsError(
                "client_cert and client_key go together: give both or neither".into(),
            )),
        }
    }
}

/// The TLS failure behind an error (a certificate the server sent that we
/// do not trust, a name it does not cover, a handshake the peer broke off),
/// in words, or `None` when the error has nothing to do with TLS. Looks
/// through `source()` and through `io::Error`s (whose `source()` skips the
/// error they wrap).
pub fn tls_failure(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(r) = err.downcast_ref::<rustls::Error>() {
            return Some(describe(r));
        }
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            if let Some(inner) = io.get_ref() {
                if let Some(found) = tls_failure(inner) {
                    return Some(found);
                }
            }
        }
        cur = err.source();
    }
    None
}

fn describe(e: &rustls::Error) -> String {
    use rustls::{CertificateError, Error};
    match e {
        Error::InvalidCertificate(CertificateError::UnknownIssuer) => {
            "the server's certificate is not signed by a trusted CA (UnknownIssuer): \
             check ca_file"
                .into()
        }
        Error::InvalidCertificate(
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
        ) => format!(
            "the server's certificate does not name the host connected to ({e}): check \
             the host in the address against the certificate's names"
        ),
        Error::InvalidCertificate(c) => format!("the server's certificate is refused: {c:?}"),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str, body: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("gridproxy-grid-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(name);
        std::fs::write(&p, body).unwrap();
        p
    }

    #[test]
    fn a_private_ca_or_the_public_roots() {
        let ca = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let pem = tmp("ca.pem", &ca.cert.pem());
        assert!(TlsOptions::with_ca(&pem).client_config().is_ok());
        assert!(TlsOptions::default().client_config().is_ok());

        let e = TlsOptions::with_ca(tmp("empty.pem", "not pem"))
            .client_config()
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("ca_file") && e.contains("no PEM certificate"),
            "{e}"
        );
        let e = TlsOptions::with_ca("/nonexistent/ca.pem")
            .client_config()
            .unwrap_err()
            .to_string();
        assert!(e.contains("/nonexistent/ca.pem"), "{e}");

        let key = tmp("key.pem", &ca.key_pair.serialize_pem());
        let both = TlsOptions {
            client_cert: Some(pem.clone()),
            client_key: Some(key),
            ..TlsOptions::with_ca(&pem)
        };
        assert!(both.client_config().is_ok());
        let half = TlsOptions {
            client_cert: Some(pem.clone()),
            ..TlsOptions::with_ca(&pem)
        };
        assert!(half
            .client_config()
            .unwrap_err()
            .to_string()
            .contains("both"));
    }

    #[test]
    fn tls_failures_are_found_inside_io_errors() {
        let r = rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer);
        let io = std::io::Error::new(std::io::ErrorKind::InvalidData, r);
        let msg = tls_failure(&io).expect("found");
        assert!(msg.contains("ca_file"), "{msg}");
        let plain = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert_eq!(tls_failure(&plain), None);
    }
}
