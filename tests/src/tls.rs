//! TLS for the tests of the grid links: a private CA made per test (rcgen)
//! with server certificates it signs, written as PEM files, and a
//! TLS-terminating TCP forwarder to put in front of a plain-text peer (the
//! openleadr-rs VTN serves HTTP only). The forwarder copies bytes both ways
//! after the handshake, so HTTP and the websocket upgrade pass unchanged.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// A CA of our own, its certificate in `dir/<name>-ca.pem`.
pub struct TestCa {
    /// Where the PEM files go.
    pub dir: PathBuf,
    name: String,
    cert: rcgen::Certificate,
    key: KeyPair,
}

/// A certificate and its key, as PEM files.
#[derive(Clone, Debug)]
pub struct ServerCert {
    /// The certificate (leaf only; clients trust the CA).
    pub cert: PathBuf,
    /// Its private key.
    pub key: PathBuf,
}

impl TestCa {
    /// A fresh CA called `name`; files in `dir` (created).
    pub fn new(dir: &Path, name: &str) -> TestCa {
        std::fs::create_dir_all(dir).expect("CA dir");
        let mut p = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name
            .push(DnType::CommonName, format!("gridproxy test CA {name}"));
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().expect("CA key");
        let cert = p.self_signed(&key).expect("CA certificate");
        let ca = TestCa {
            dir: dir.to_path_buf(),
            name: name.to_string(),
            cert,
            key,
        };
        std::fs::write(ca.ca_file(), ca.cert.pem()).expect("write CA");
        ca
    }

    /// The CA certificate's PEM file.
    pub fn ca_file(&self) -> PathBuf {
        self.dir.join(format!("{}-ca.pem", self.name))
    }

    /// A server certificate for `names` (DNS names or IP addresses, as
    /// subject alternative names), signed by this CA; files
    /// `<file>.pem` and `<file>.key`.
    pub fn server_cert(&self, file: &str, names: &[&str]) -> ServerCert {
        self.leaf(file, names, ExtendedKeyUsagePurpose::ServerAuth)
    }

    /// A client certificate for `name`, signed by this CA (files as
    /// [`TestCa::server_cert`]'s).
    pub fn client_cert(&self, file: &str, name: &str) -> ServerCert {
        self.leaf(file, &[name], ExtendedKeyUsagePurpose::ClientAuth)
    }

    fn leaf(&self, file: &str, names: &[&str], usage: ExtendedKeyUsagePurpose) -> ServerCert {
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let mut p = CertificateParams::new(names.clone()).expect("server params");
        p.distinguished_name
            .push(DnType::CommonName, names[0].clone());
        p.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        p.extended_key_usages = vec![usage];
        let key = KeyPair::generate().expect("server key");
        let cert = p
            .signed_by(&key, &self.cert, &self.key)
            .expect("server certificate");
        let out = ServerCert {
            cert: self.dir.join(format!("{file}.pem")),
            key: self.dir.join(format!("{file}.key")),
        };
        std::fs::write(&out.cert, cert.pem()).expect("write certificate");
        std::fs::write(&out.key, key.serialize_pem()).expect("write key");
        out
    }
}

/// A TLS front for a plain TCP service: accepts TLS on 127.0.0.1 and
/// forwards the decrypted bytes to `upstream`. Stops when dropped.
pub struct TlsForwarder {
    /// The TLS port on 127.0.0.1.
    pub port: u16,
    /// Handshakes completed.
    pub handshakes: Arc<AtomicU64>,
    /// Handshakes that failed (the client refused our certificate, or spoke
    /// no TLS).
    pub failed_handshakes: Arc<AtomicU64>,
    cancel: CancellationToken,
}

impl TlsForwarder {
    /// Listen on a free loopback port with `cert` and forward to `upstream`.
    pub async fn start(cert: &ServerCert, upstream: SocketAddr) -> TlsForwarder {
        let acceptor = gridproxy::api::tls::acceptor(&cert.cert, &cert.key)
            .unwrap_or_else(|e| panic!("TLS forwarder certificate: {e}"));
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the TLS forwarder");
        let port = listener.local_addr().expect("local addr").port();
        let cancel = CancellationToken::new();
        let handshakes = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let (c, ok, bad) = (cancel.clone(), handshakes.clone(), failed.clone());
        tokio::spawn(async move {
            loop {
                let (tcp, _) = tokio::select! {
                    _ = c.cancelled() => return,
                    r = listener.accept() => match r {
                        Ok(a) => a,
                        Err(_) => continue,
                    },
                };
                let (acceptor, c, ok, bad) = (acceptor.clone(), c.clone(), ok.clone(), bad.clone());
                tokio::spawn(async move {
                    let mut tls = match acceptor.accept(tcp).await {
                        Ok(s) => s,
                        Err(e) => {
                            bad.fetch_add(1, Ordering::Relaxed);
                            tracing::info!("tls forwarder: handshake failed: {e}");
                            return;
                        }
                    };
                    ok.fetch_add(1, Ordering::Relaxed);
                    let Ok(mut up) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    tokio::select! {
                        _ = c.cancelled() => {}
                        _ = tokio::io::copy_bidirectional(&mut tls, &mut up) => {}
                    }
                });
            }
        });
        TlsForwarder {
            port,
            handshakes,
            failed_handshakes: failed,
            cancel,
        }
    }

    /// Handshakes completed so far.
    pub fn handshakes(&self) -> u64 {
        self.handshakes.load(Ordering::Relaxed)
    }

    /// Handshakes failed so far.
    pub fn failed_handshakes(&self) -> u64 {
        self.failed_handshakes.load(Ordering::Relaxed)
    }
}

impl Drop for TlsForwarder {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}
