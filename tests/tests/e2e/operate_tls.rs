//! The control API over HTTPS (`[api] tls_cert` / `tls_key`): a client that
//! trusts the certificate gets answers with the same bearer-token rules
//! (401 / 403 / 200); plain HTTP on the TLS port gets nothing; a client that
//! trusts another certificate fails the handshake. Relative certificate
//! paths resolve against the config file's folder, and a half TLS config is
//! refused naming the key and line.

use gridproxy::api::{self, client};
use gridproxy_tests::free_addr;
use std::path::Path;
use std::time::Duration;

const OPERATE: &str = "operate-token-0123456789";
const READ: &str = "read-only-token-0123456789";
const T: Duration = Duration::from_secs(10);

/// A self-signed certificate for 127.0.0.1 (IP SAN) and localhost, as PEM.
fn self_signed() -> (String, String) {
    let c = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into(), "localhost".into()])
        .expect("certificate");
    (c.cert.pem(), c.key_pair.serialize_pem())
}

fn config(tls: &str) -> String {
    format!(
        "[[pools]]\nname = \"p\"\naddress = \"{}\"\nprotocol = \"sv1\"\nuser = \"acct\"\n\n\
         [listen]\nsv1 = \"127.0.0.1:0\"\n\n\
         [api]\nlisten = \"127.0.0.1:0\"\n{tls}\n\n\
         [[api.tokens]]\nname = \"ops\"\nrole = \"operate\"\ntoken = \"{OPERATE}\"\n\n\
         [[api.tokens]]\nname = \"viewer\"\nrole = \"read\"\ntoken = \"{READ}\"\n",
        free_addr()
    )
}

fn write(dir: &Path, name: &str, text: &str) {
    std::fs::write(dir.join(name), text).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_api_with_tokens_and_a_pinned_certificate() {
    let _gate = gridproxy_tests::module_gate(module_path!());
    let dir = std::env::temp_dir().join(format!("gridproxy-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (cert, key) = self_signed();
    write(&dir, "api.pem", &cert);
    write(&dir, "api.key", &key);
    write(
        &dir,
        "gridproxy.toml",
        &config("tls_cert = \"api.pem\"\ntls_key = \"api.key\""),
    );
    let cfg = gridproxy::Config::load(&dir.join("gridproxy.toml")).expect("config with TLS loads");
    assert_eq!(
        cfg.api.tls_cert.as_deref(),
        Some(dir.join("api.pem").as_path())
    );
    let app = gridproxy_tests::start_app(cfg, None).await;
    let proxy = app.proxy.clone();
    let server = app.api.clone().expect("[api] listen is set");
    let addr = server.addr;
    let tls = api::tls::connector(&dir.join("api.pem")).unwrap();

    let r = client::request_tls(addr, &tls, "GET", "/api/v1/whoami", Some(READ), None, T)
        .await
        .expect("HTTPS answer");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json().unwrap()["role"], "read", "{}", r.text());
    let r = client::request_tls(addr, &tls, "GET", "/api/v1/fleet", None, None, T)
        .await
        .unwrap();
    assert_eq!(r.status, 401);
    let body = serde_json::json!({"action": "park", "workers": "nobody.*"});
    let r = client::request_tls(
        addr,
        &tls,
        "POST",
        "/api/v1/curtail",
        Some(READ),
        Some(&body),
        T,
    )
    .await
    .unwrap();
    assert_eq!(r.status, 403);
    let r = client::request_tls(
        addr,
        &tls,
        "POST",
        "/api/v1/curtail",
        Some(OPERATE),
        Some(&body),
        T,
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let r = client::request_tls(addr, &tls, "GET", "/metrics", None, None, T)
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    assert!(r.text().contains("gridproxy_"), "metrics over HTTPS");
    println!(
        "HTTPS API on {addr}: whoami 200, no token 401, read token on curtail 403, operate 200"
    );

    // Plain HTTP on the TLS port gets no HTTP answer.
    let plain = client::request(addr, "GET", "/api/v1/whoami", Some(READ), None, T).await;
    assert!(plain.is_err(), "plain HTTP was answered: {plain:?}");

    // A client trusting another certificate refuses the server.
    let (other, _) = self_signed();
    write(&dir, "other.pem", &other);
    let wrong = api::tls::connector(&dir.join("other.pem")).unwrap();
    let e = client::request_tls(addr, &wrong, "GET", "/api/v1/whoami", Some(READ), None, T)
        .await
        .expect_err("untrusted certificate accepted");
    assert!(e.contains("TLS"), "{e}");
    println!("untrusted certificate: {e}");

    // Half a TLS config is refused with key and line.
    write(&dir, "half.toml", &config("tls_cert = \"api.pem\""));
    let e = gridproxy::Config::load(&dir.join("half.toml"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("api.tls_cert") && e.contains("line"), "{e}");
    write(
        &dir,
        "missing.toml",
        &config("tls_cert = \"nope.pem\"\ntls_key = \"api.key\""),
    );
    let e = gridproxy::Config::load(&dir.join("missing.toml"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("nope.pem") && e.contains("line"), "{e}");

    proxy.stop.cancel();
    let _ = std::fs::remove_dir_all(&dir);
}
