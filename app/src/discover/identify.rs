//! Which firmware answered on a host, and what it says about the miner.
//!
//! Fingerprints: the substrings `asic-rs` (0.6.2) matches in a cgminer API
//! reply (`LUXMINER`, `BTMINER`/`BITMICRO`, `ANTMINER`, `BOSMINER`, `VNISH`)
//! and in the web root (`AnthillOS` for VNish, a `401` digest challenge with
//! realm `antMiner…` for stock Antminers, `Braiins OS`, `Luxor Firmware`, a
//! `307` to https or `/cgi-bin/luci` for Whatsminer), through its firmware
//! registry, applied to the replies of our own bounded [`probe`]s: asic-rs's
//! own I/O reads without a size bound and, for a stock Antminer's model,
//! logs in with the factory password. Braiins OS is also recognised by its
//! gRPC service (asic-rs looks only at port 4028 and the web UI).
//!
//! Then the facts, read with plain read-only requests: LuxOS `version`
//! (`Type`) and `profiles` (the `default` profile's watts and TH/s);
//! cgminer `version` (`Type`) and `stats` (`total_rateideal`, GH/s, where
//! bmminer reports it); Whatsminer `devdetails` (`Model`) and `summary`
//! (`Factory GHS`); VNish `GET /api/v1/info` (`miner`,
//! `system.network_status.hostname`); Braiins OS `GetMinerDetails` (model,
//! sticker hashrate, hostname; needs the `root` password).

use std::net::IpAddr;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use asic_rs::core::traits::entry::FirmwareEntry;
use asic_rs::core::traits::identification::WebResponse;
use serde_json::Value;

use super::probe::{self, BraiinsDetails, WebReply};
use crate::site::config::FirmwareKind;

/// A miner found on a host.
#[derive(Debug, Clone, PartialEq)]
pub struct Found {
    /// Its address.
    pub ip: IpAddr,
    /// Its firmware.
    pub firmware: FirmwareKind,
    /// What identified it (the asic-rs entry, or the gRPC service).
    pub by: String,
    /// Model, e.g. `Antminer S19j Pro`.
    pub model: Option<String>,
    /// Nominal hashrate, TH/s.
    pub ths: Option<f64>,
    /// Nominal power, W.
    pub watts: Option<f64>,
    /// Host name the firmware reports.
    pub hostname: Option<String>,
    /// Something the operator should know (e.g. no password to read more).
    pub note: Option<String>,
}

/// How to probe.
#[derive(Clone, Default)]
pub struct ProbeConfig {
    /// Each probe's timeout.
    pub timeout: Duration,
    /// Braiins OS `root` password, to read model and sticker hashrate.
    pub braiins_password: Option<String>,
}

impl std::fmt::Debug for ProbeConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProbeConfig")
            .field("timeout", &self.timeout)
            .field(
                "braiins_password",
                &self.braiins_password.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

static REGISTRY: LazyLock<Vec<Arc<dyn FirmwareEntry>>> =
    LazyLock::new(asic_rs::factory::default_firmware_registry);

/// The first asic-rs registry entry (third-party firmwares before stock
/// ones) that recognises one of the cgminer replies or the web reply.
pub fn fingerprint(rpc: &[&Value], web: Option<&WebReply>) -> Option<String> {
    let upper: Vec<String> = rpc.iter().map(|v| v.to_string().to_uppercase()).collect();
    let web = web.map(|w| WebResponse {
        body: &w.body,
        auth_header: &w.www_authenticate,
        algo_header: "",
        redirect_header: &w.location,
        status: w.status,
    });
    REGISTRY
        .iter()
        .find(|fw| {
            upper.iter().any(|r| fw.identify_rpc(r))
                || web.as_ref().is_some_and(|w| fw.identify_web(w))
        })
        .map(|fw| fw.to_string())
}

/// gridproxy's firmware for an asic-rs entry name; a stock Antminer whose
/// web interface asks for digest auth is `antminer` (sleep by web), else
/// `stock` (telemetry only, parked at the proxy).
pub fn kind_of(asic_rs_name: &str, web: Option<&WebReply>) -> Option<FirmwareKind> {
    Some(match asic_rs_name {
        "LuxOS" => FirmwareKind::Luxos,
        "Braiins" => FirmwareKind::Braiins,
        "VNish" => FirmwareKind::Vnish,
        "WhatsMiner Stock" => FirmwareKind::Whatsminer,
        "AntMiner Stock" => {
            if web.is_some_and(antminer_web) {
                FirmwareKind::Antminer
            } else {
                FirmwareKind::Stock
            }
        }
        _ => return None,
    })
}

/// A stock Antminer web interface: digest auth with realm `antMiner…`.
fn antminer_web(w: &WebReply) -> bool {
    w.status == 401
        && w.www_authenticate.starts_with("Digest")
        && w.www_authenticate.contains("realm=\"antMiner")
}

fn text(v: &Value, pointer: &str) -> Option<String> {
    v.pointer(pointer)
        .and_then(Value::as_str)
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
}

fn positive(v: &Value, pointer: &str) -> Option<f64> {
    match v.pointer(pointer)? {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
    .filter(|x| x.is_finite() && *x > 0.0)
}

/// Probe `ip` and identify what runs there. `None`: nothing gridproxy can
/// drive answered (no miner, or an unidentified one).
pub async fn host(ip: IpAddr, cfg: &ProbeConfig) -> Option<Found> {
    let t = cfg.timeout;
    let (version, web, bos) = tokio::join!(
        probe::cgminer(ip, "version", t),
        probe::http_get(ip, "/", t),
        probe::braiins(ip, cfg.braiins_password.as_deref(), t),
    );
    if let Some(d) = bos {
        return Some(braiins(ip, d, cfg.braiins_password.is_some()));
    }
    // Whatsminer answers `version` with an error but names itself in
    // `summary` (and `devdetails`); asic-rs sends `devdetails`.
    let (summary, devdetails) = if version.is_some() {
        tokio::join!(
            probe::cgminer(ip, "summary", t),
            probe::cgminer(ip, "devdetails", t)
        )
    } else {
        (None, None)
    };
    let rpc: Vec<&Value> = [&version, &summary, &devdetails]
        .into_iter()
        .flatten()
        .collect();
    let web_ref = web.as_ref();
    let name = fingerprint(&rpc, web_ref)?;
    let firmware = kind_of(&name, web_ref)?;
    let mut found = Found {
        ip,
        firmware,
        by: format!("asic-rs {name}"),
        model: None,
        ths: None,
        watts: None,
        hostname: None,
        note: None,
    };
    let type_of = |v: &Option<Value>| v.as_ref().and_then(|v| text(v, "/VERSION/0/Type"));
    match firmware {
        FirmwareKind::Luxos => {
            found.model = type_of(&version);
            // The `default` profile is the miner's stock operating point.
            if let Some(p) = probe::cgminer(ip, "profiles", t).await {
                let default = p.get("PROFILES").and_then(Value::as_array).and_then(|a| {
                    a.iter()
                        .find(|x| x.get("Profile Name").and_then(Value::as_str) == Some("default"))
                });
                if let Some(d) = default {
                    found.watts = positive(d, "/Watts");
                    found.ths = positive(d, "/Hashrate");
                }
            }
        }
        FirmwareKind::Stock | FirmwareKind::Antminer => {
            found.model = type_of(&version);
            if let Some(s) = probe::cgminer(ip, "stats", t).await {
                found.ths = (0..4)
                    .find_map(|i| positive(&s, &format!("/STATS/{i}/total_rateideal")))
                    .map(|ghs| ghs / 1000.0);
            }
        }
        FirmwareKind::Whatsminer => {
            found.model = devdetails
                .as_ref()
                .and_then(|v| text(v, "/DEVDETAILS/0/Model"));
            found.ths = summary
                .as_ref()
                .and_then(|v| positive(v, "/SUMMARY/0/Factory GHS"))
                .map(|ghs| ghs / 1000.0);
        }
        FirmwareKind::Vnish => {
            if let Some(info) = probe::http_get(ip, "/api/v1/info", t).await {
                if let Ok(v) = serde_json::from_str::<Value>(&info.body) {
                    found.model = text(&v, "/miner");
                    found.hostname = text(&v, "/system/network_status/hostname");
                }
            }
        }
        FirmwareKind::Braiins => {}
    }
    Some(found)
}

fn braiins(ip: IpAddr, d: BraiinsDetails, had_password: bool) -> Found {
    let note = (!d.read).then(|| {
        if had_password {
            "login as root refused: model and sticker hashrate not read".to_owned()
        } else {
            "give --braiins-password-env to read model and sticker hashrate".to_owned()
        }
    });
    Found {
        ip,
        firmware: FirmwareKind::Braiins,
        by: "gRPC braiins.bos.v1.MinerService".into(),
        model: d.model,
        ths: d.sticker_ths,
        watts: None,
        hostname: d.hostname,
        note,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn web(status: u16, auth: &str, body: &str) -> WebReply {
        WebReply {
            status,
            www_authenticate: auth.into(),
            location: String::new(),
            body: body.into(),
        }
    }

    #[test]
    fn fingerprints_map_to_our_firmwares() {
        let lux = json!({"STATUS":[{"STATUS":"S","Description":"LUXminer 2024.5.1"}],"VERSION":[{"LUXminer":"2024.5.1","Type":"Antminer S19j Pro"}]});
        let n = fingerprint(&[&lux], None).unwrap();
        assert_eq!(kind_of(&n, None), Some(FirmwareKind::Luxos));
        let stock = json!({"STATUS":[{"STATUS":"S","Description":"cgminer 4.11.1"}],"VERSION":[{"CGMiner":"4.11.1","Type":"Antminer S19j Pro"}]});
        let n = fingerprint(&[&stock], None).unwrap();
        assert_eq!(kind_of(&n, None), Some(FirmwareKind::Stock));
        let digest = web(
            401,
            "Digest realm=\"antMiner Configuration\", nonce=\"x\"",
            "",
        );
        let n = fingerprint(&[&stock], Some(&digest)).unwrap();
        assert_eq!(kind_of(&n, Some(&digest)), Some(FirmwareKind::Antminer));
        let wm = json!({"STATUS":[{"STATUS":"S","Description":"btminer"}],"SUMMARY":[{}]});
        let n = fingerprint(&[&wm], None).unwrap();
        assert_eq!(kind_of(&n, None), Some(FirmwareKind::Whatsminer));
        let vnish = web(200, "", "<html><title>AnthillOS</title></html>");
        let n = fingerprint(&[], Some(&vnish)).unwrap();
        assert_eq!(kind_of(&n, Some(&vnish)), Some(FirmwareKind::Vnish));
        // A plain web server and an unrelated JSON service are not miners.
        assert_eq!(
            fingerprint(&[], Some(&web(200, "", "<h1>It works!</h1>"))),
            None
        );
        let other = json!({"STATUS":[{"STATUS":"S","Description":"something"}]});
        assert_eq!(fingerprint(&[&other], None), None);
        // A 401 with another realm is not an Antminer.
        let basic = web(401, "Basic realm=\"router\"", "");
        assert_eq!(fingerprint(&[], Some(&basic)), None);
    }
}
