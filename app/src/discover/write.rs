//! `[[site.miners]]` entries for what a sweep found.
//!
//! A value the firmware did not report is written as `0` with a `# TODO`
//! comment: the config loader refuses `ths = 0`, `watts = 0` and an empty
//! stock `worker`, so a file with a value left unset cannot drive a site
//! until the operator fills it in (a guessed figure would silently skew every
//! curtailment plan). Passwords are never written: firmwares that need one
//! get `password_env` naming a variable per firmware.

use std::collections::HashMap;
use std::fmt::Write;
use std::net::SocketAddr;

use super::identify::Found;
use super::probe::{BRAIINS_GRPC_PORT, CGMINER_PORT, WEB_PORT};
use crate::site::config::FirmwareKind;

/// The environment variable `password_env` names for a firmware.
pub fn password_env(fw: FirmwareKind) -> Option<&'static str> {
    match fw {
        FirmwareKind::Braiins => Some("GRIDPROXY_BRAIINS_PASSWORD"),
        FirmwareKind::Whatsminer => Some("GRIDPROXY_WHATSMINER_PASSWORD"),
        FirmwareKind::Vnish => Some("GRIDPROXY_VNISH_PASSWORD"),
        FirmwareKind::Antminer => Some("GRIDPROXY_ANTMINER_PASSWORD"),
        FirmwareKind::Luxos | FirmwareKind::Stock => None,
    }
}

fn port(fw: FirmwareKind) -> u16 {
    match fw {
        FirmwareKind::Braiins => BRAIINS_GRPC_PORT,
        FirmwareKind::Vnish => WEB_PORT,
        _ => CGMINER_PORT,
    }
}

fn quote(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

/// A name safe in logs and on the dashboard: the reported host name when
/// it is unique, else firmware and address (`luxos-10-0-0-5`).
fn names(found: &[Found]) -> Vec<String> {
    let clean = |s: &str| -> String {
        s.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                    c
                } else {
                    '-'
                }
            })
            .take(63)
            .collect()
    };
    let mut count: HashMap<String, usize> = HashMap::new();
    for f in found {
        if let Some(h) = &f.hostname {
            *count.entry(clean(h)).or_default() += 1;
        }
    }
    found
        .iter()
        .map(|f| match f.hostname.as_deref().map(clean) {
            Some(h) if !h.is_empty() && count[&h] == 1 => h,
            _ => format!(
                "{}-{}",
                f.firmware.as_str(),
                f.ip.to_string().replace(['.', ':'], "-")
            ),
        })
        .collect()
}

/// How many values an entry leaves for the operator.
pub fn todos(f: &Found) -> usize {
    usize::from(f.ths.is_none())
        + usize::from(f.watts.is_none())
        + usize::from(f.firmware == FirmwareKind::Stock)
}

/// The entries, with `header` (one or more lines) as a leading comment.
pub fn entries(found: &[Found], header: &str) -> String {
    let mut out = String::new();
    for l in header.lines() {
        let _ = writeln!(out, "# {l}");
    }
    let _ = writeln!(
        out,
        "# Paste under [site]. Values marked TODO were not reported by the firmware:\n\
         # they are 0 (or empty), which the config loader refuses until they are set.\n\
         # Passwords are not written: export the variable each password_env names."
    );
    for (f, name) in found.iter().zip(names(found)) {
        let _ = writeln!(out, "\n[[site.miners]]");
        let _ = writeln!(out, "name = {}", quote(&name));
        let _ = writeln!(out, "firmware = {}", quote(f.firmware.as_str()));
        let addr = SocketAddr::new(f.ip, port(f.firmware)).to_string();
        let _ = writeln!(out, "address = {}", quote(&addr));
        match &f.model {
            Some(m) => {
                let _ = writeln!(out, "model = {}", quote(m));
            }
            None => {
                let _ = writeln!(out, "# model = \"\"  # not reported");
            }
        }
        match f.ths {
            Some(t) => {
                let _ = writeln!(
                    out,
                    "ths = {}",
                    toml::Value::Float((t * 100.0).round() / 100.0)
                );
            }
            None => {
                let _ = writeln!(out, "ths = 0.0  # TODO: nominal TH/s (refused until set)");
            }
        }
        match f.watts {
            Some(w) => {
                let _ = writeln!(out, "watts = {}", toml::Value::Float(w.round()));
            }
            None => {
                let _ = writeln!(
                    out,
                    "watts = 0.0  # TODO: nominal power, W, or replace with j_per_th (refused until set)"
                );
            }
        }
        if f.firmware == FirmwareKind::Stock {
            let _ = writeln!(
                out,
                "worker = \"\"  # TODO: the SV1 worker it mines as through this proxy, to park it (refused until set)"
            );
        }
        if let Some(var) = password_env(f.firmware) {
            let _ = writeln!(out, "password_env = {}", quote(var));
        }
        let _ = writeln!(out, "# found by {}", f.by);
        if let Some(n) = &f.note {
            let _ = writeln!(out, "# note: {n}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn found(ip: &str, fw: FirmwareKind, ths: Option<f64>, watts: Option<f64>) -> Found {
        Found {
            ip: ip.parse().unwrap(),
            firmware: fw,
            by: "test".into(),
            model: Some("Antminer \"S19\"".into()),
            ths,
            watts,
            hostname: None,
            note: Some("a note".into()),
        }
    }

    fn site(miners: &str) -> String {
        format!(
            "[[pools]]\nname = \"p\"\naddress = \"stratum+tcp://127.0.0.1:3333\"\nuser = \"u\"\n\n[site]\nledger = \"l.sqlite\"\n\n{miners}"
        )
    }

    fn load(text: &str) -> Result<Config, String> {
        let dir = std::env::temp_dir().join(format!("gp-discover-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(format!("c{}.toml", rand::random::<u32>()));
        std::fs::write(&p, text).unwrap();
        let r = Config::load(&p).map_err(|e| e.to_string());
        let _ = std::fs::remove_file(&p);
        r
    }

    #[test]
    fn complete_entries_load_and_todos_are_refused() {
        let all = [
            found("10.0.0.2", FirmwareKind::Luxos, Some(104.0), Some(3068.0)),
            found("fd00::3", FirmwareKind::Braiins, Some(90.5), Some(3250.0)),
        ];
        let text = entries(&all, "test run");
        assert!(text.contains("address = \"[fd00::3]:50051\""), "{text}");
        assert!(text.contains("password_env = \"GRIDPROXY_BRAIINS_PASSWORD\""));
        assert!(!text.contains("TODO: nominal"));
        let c = load(&site(&text)).unwrap_or_else(|e| panic!("{e}\n{text}"));
        let s = c.site.unwrap();
        assert_eq!(s.miners.len(), 2);
        assert_eq!(s.miners[0].name, "luxos-10-0-0-2");
        assert_eq!(s.miners[0].model.as_deref(), Some("Antminer \"S19\""));
        assert_eq!(s.miners[1].ths, 90.5);

        // Each unknown value alone keeps the file from loading, naming it.
        for (f, key) in [
            (
                found("10.0.0.4", FirmwareKind::Luxos, None, Some(3000.0)),
                "ths",
            ),
            (
                found("10.0.0.5", FirmwareKind::Vnish, Some(100.0), None),
                "watts",
            ),
            (
                found("10.0.0.6", FirmwareKind::Stock, Some(100.0), Some(3000.0)),
                "worker",
            ),
        ] {
            let text = entries(std::slice::from_ref(&f), "x");
            let e = load(&site(&text)).unwrap_err();
            assert!(e.contains(&format!("site.miners[0].{key}")), "{key}: {e}");
            assert_eq!(todos(&f), 1);
        }
    }
}
