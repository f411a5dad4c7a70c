//! A private Eclipse Mosquitto broker (the Debian package's binary) for the
//! MQTT tests: own temp config and password file, loopback listener, login
//! required, killable and restartable on the same port. Publishing goes
//! through the package's `mosquitto_pub`; reading through rumqttc.
//!
//! Binaries: `MOSQUITTO`, `MOSQUITTO_PASSWD`, `MOSQUITTO_PUB` (defaults from
//! the Debian packages). A missing binary fails the test, naming the script
//! that installs it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use gridproxy_grid::mqtt::rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use gridproxy_tests::{free_port, wait_for_port, PeerProcess};
use tokio_util::sync::CancellationToken;

/// Broker login used by the tests.
pub const USER: &str = "gridproxy";
/// Its password.
pub const PASSWORD: &str = "dispatch-secret";

fn bin(var: &str, default: &str) -> PathBuf {
    let p = PathBuf::from(std::env::var(var).unwrap_or_else(|_| default.into()));
    assert!(
        p.is_file(),
        "{} not found (set {var} or run `bash scripts/mosquitto.sh install`, which installs \
         the Debian packages mosquitto and mosquitto-clients)",
        p.display()
    );
    p
}

/// Path of the broker binary.
pub fn mosquitto_bin() -> PathBuf {
    bin("MOSQUITTO", "/usr/sbin/mosquitto")
}

/// Path of `mosquitto_pub`.
pub fn pub_bin() -> PathBuf {
    bin("MOSQUITTO_PUB", "/usr/bin/mosquitto_pub")
}

/// A TLS listener of the broker: its port and PEM files.
#[derive(Clone, Debug)]
pub struct TlsListener {
    /// Port on 127.0.0.1.
    pub port: u16,
    /// The broker's certificate and key.
    pub cert: gridproxy_tests::tls::ServerCert,
    /// Require a client certificate signed by this CA (PEM file).
    pub client_ca: Option<PathBuf>,
}

/// A running (or stopped) private broker.
pub struct Mosquitto {
    /// Its (plain) port on 127.0.0.1.
    pub port: u16,
    /// Its TLS listeners.
    pub tls: Vec<TlsListener>,
    conf_dir: PathBuf,
    process: Option<PeerProcess>,
    /// Broker starts (the first plus restarts).
    pub starts: usize,
}

impl Mosquitto {
    /// Write a config (listener on 127.0.0.1 only, anonymous off, password
    /// file from `mosquitto_passwd`) and start the broker.
    pub async fn start(name: &str) -> Mosquitto {
        Self::start_with_tls(name, Vec::new()).await
    }

    /// As [`Mosquitto::start`], plus TLS listeners (same login rules).
    pub async fn start_with_tls(name: &str, tls: Vec<TlsListener>) -> Mosquitto {
        let passwd_bin = bin("MOSQUITTO_PASSWD", "/usr/bin/mosquitto_passwd");
        let conf_dir = PeerProcess::make_dir(&format!("{name}-mosquitto-conf"));
        let passwd = conf_dir.join("passwd");
        let st = Command::new(&passwd_bin)
            .args(["-b", "-c"])
            .arg(&passwd)
            .args([USER, PASSWORD])
            .status()
            .expect("run mosquitto_passwd");
        assert!(st.success(), "mosquitto_passwd failed: {st}");
        let port = free_port();
        let mut conf = format!(
            "listener {port} 127.0.0.1\nallow_anonymous false\npassword_file {}\n\
             persistence false\nlog_dest stderr\nlog_type all\n",
            passwd.display()
        );
        for l in &tls {
            conf.push_str(&format!(
                "listener {} 127.0.0.1\ncertfile {}\nkeyfile {}\n",
                l.port,
                l.cert.cert.display(),
                l.cert.key.display()
            ));
            if let Some(ca) = &l.client_ca {
                conf.push_str(&format!(
                    "cafile {}\nrequire_certificate true\n",
                    ca.display()
                ));
            }
        }
        // As root, mosquitto switches to user "mosquitto", who cannot read
        // our temp files; stay root (the test's own user).
        if is_root() {
            conf.push_str("user root\n");
        }
        std::fs::write(conf_dir.join("mosquitto.conf"), conf).expect("write mosquitto.conf");
        let mut m = Mosquitto {
            port,
            tls,
            conf_dir,
            process: None,
            starts: 0,
        };
        m.restart().await;
        m
    }

    /// The config directory.
    pub fn conf_dir(&self) -> &Path {
        &self.conf_dir
    }

    /// (Re)start the broker on the same port; waits until it listens.
    pub async fn restart(&mut self) {
        self.kill();
        let dir = PeerProcess::make_dir("mosquitto");
        let mut cmd = Command::new(mosquitto_bin());
        cmd.arg("-c").arg(self.conf_dir.join("mosquitto.conf"));
        self.process = Some(PeerProcess::spawn("mosquitto", dir, cmd));
        self.starts += 1;
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], self.port));
        let up = wait_for_port(addr, Duration::from_secs(10)).await;
        assert!(up, "mosquitto did not listen on {addr}:\n{}", self.log());
        for l in &self.tls {
            let addr = std::net::SocketAddr::from(([127, 0, 0, 1], l.port));
            let up = wait_for_port(addr, Duration::from_secs(10)).await;
            assert!(
                up,
                "mosquitto did not listen on {addr} (TLS):\n{}",
                self.log()
            );
        }
    }

    /// SIGKILL the broker (a crash: no clean disconnects).
    pub fn kill(&mut self) {
        if let Some(p) = self.process.as_mut() {
            p.kill();
        }
    }

    /// Whether the broker runs.
    pub fn is_running(&mut self) -> bool {
        self.process.as_mut().is_some_and(|p| p.is_running())
    }

    /// The current broker's log.
    pub fn log(&self) -> String {
        self.process.as_ref().map(|p| p.log()).unwrap_or_default()
    }

    /// Publish `payload` on `topic` with `mosquitto_pub` (QoS 1), logged in
    /// with `password`. Returns mosquitto_pub's exit status and stderr.
    pub fn publish_as(&self, password: &str, topic: &str, payload: &str) -> (bool, String) {
        let out = Command::new(pub_bin())
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args([
                "-u", USER, "-P", password, "-q", "1", "-t", topic, "-m", payload,
            ])
            .output()
            .expect("run mosquitto_pub");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Publish each of `payloads` on `topic` from one mosquitto_pub (`-l`:
    /// a message per stdin line), QoS 0: a flood. Panics if it fails.
    pub fn publish_lines(&self, topic: &str, payloads: &[String]) {
        use std::io::Write;
        let mut child = Command::new(pub_bin())
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(["-u", USER, "-P", PASSWORD, "-q", "0", "-t", topic, "-l"])
            .stdin(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run mosquitto_pub");
        let mut stdin = child.stdin.take().expect("stdin");
        for p in payloads {
            writeln!(stdin, "{p}").expect("write to mosquitto_pub");
        }
        drop(stdin);
        let out = child.wait_with_output().expect("mosquitto_pub ends");
        assert!(
            out.status.success(),
            "mosquitto_pub -l to {topic} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Publish over TLS to `host:port` with `mosquitto_pub --cafile ca`
    /// (QoS 1, the right login); exit status and stderr.
    pub fn publish_tls(
        &self,
        host: &str,
        port: u16,
        ca: Option<&Path>,
        topic: &str,
        payload: &str,
    ) -> (bool, String) {
        let mut cmd = Command::new(pub_bin());
        cmd.args(["-h", host, "-p", &port.to_string()]);
        if let Some(ca) = ca {
            cmd.arg("--cafile").arg(ca);
        }
        let out = cmd
            .args([
                "-u", USER, "-P", PASSWORD, "-q", "1", "-t", topic, "-m", payload,
            ])
            .output()
            .expect("run mosquitto_pub");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Publish retained (`-r`) with the right password, QoS 1: what a
    /// client connecting later receives first.
    pub fn publish_retained(&self, topic: &str, payload: &str) {
        let out = Command::new(pub_bin())
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args([
                "-u", USER, "-P", PASSWORD, "-q", "1", "-r", "-t", topic, "-m", payload,
            ])
            .output()
            .expect("run mosquitto_pub");
        assert!(
            out.status.success(),
            "mosquitto_pub -r to {topic} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Publish with the right password; panics if mosquitto_pub fails.
    pub fn publish(&self, topic: &str, payload: &str) {
        let (ok, err) = self.publish_as(PASSWORD, topic, payload);
        assert!(ok, "mosquitto_pub to {topic} failed: {err}\n{}", self.log());
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.conf_dir);
    }
}

fn is_root() -> bool {
    // No libc here: /proc tells the effective uid.
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

/// One message seen by a [`Recorder`].
#[derive(Clone, Debug)]
pub struct Seen {
    /// Topic.
    pub topic: String,
    /// Payload parsed as JSON (`Null` if it was not JSON).
    pub json: serde_json::Value,
    /// When it arrived.
    pub at: std::time::Instant,
}

/// A rumqttc subscriber that records every message on some topics and
/// reconnects (with re-subscribe) when the broker restarts.
pub struct Recorder {
    /// Everything seen so far.
    pub seen: Arc<Mutex<Vec<Seen>>>,
    cancel: CancellationToken,
}

impl Recorder {
    /// Subscribe to `topics` on the broker at `port`.
    pub fn start(port: u16, id: &str, topics: &[&str]) -> Recorder {
        let mut o = MqttOptions::new(id, "127.0.0.1", port);
        o.set_credentials(USER, PASSWORD);
        o.set_keep_alive(Duration::from_secs(5));
        let (client, mut el) = AsyncClient::new(o, 16);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let cancel = CancellationToken::new();
        let topics: Vec<String> = topics.iter().map(|s| s.to_string()).collect();
        let (s2, c2) = (seen.clone(), cancel.clone());
        tokio::spawn(async move {
            loop {
                let ev = tokio::select! {
                    _ = c2.cancelled() => break,
                    ev = el.poll() => ev,
                };
                match ev {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        for t in &topics {
                            let _ = client.try_subscribe(t.clone(), QoS::AtLeastOnce);
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let json = serde_json::from_slice(&p.payload).unwrap_or_default();
                        s2.lock().unwrap().push(Seen {
                            topic: p.topic.clone(),
                            json,
                            at: std::time::Instant::now(),
                        });
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                }
            }
        });
        Recorder { seen, cancel }
    }

    /// Messages on `topic` so far.
    pub fn on(&self, topic: &str) -> Vec<Seen> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.topic == topic)
            .cloned()
            .collect()
    }

    /// The ack for dispatch `id`, if it arrived.
    pub fn ack(&self, ack_topic: &str, id: &str) -> Option<serde_json::Value> {
        self.on(ack_topic)
            .into_iter()
            .map(|s| s.json)
            .find(|j| j["id"] == id)
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}
