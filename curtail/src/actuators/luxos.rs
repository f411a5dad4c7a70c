//! LuxOS client: cgminer-style TCP JSON (port 4028 on real miners).
//!
//! Privileged commands carry a session id as the first `parameter` field
//! (`"<sid>,sleep"`). The id comes from `logon`, or from `session` when
//! another logon is still live (LuxOS allows one session). A command refused
//! for a stale session logs on again once.
//!
//! A power target is a profile: LuxOS steps power by profile, so the client
//! reads `profiles` and sets the highest one at or below the target (the
//! lowest profile if none is), as [`ControlSurface::LuxOs`] documents.
//!
//! [`ControlSurface::LuxOs`]: crate::fleet::ControlSurface::LuxOs

use serde_json::{json, Value};
use tokio::sync::Mutex;

use super::cgminer::{self, check_status, number, status_of};
use super::{bounded, ClientConfig, ClientError, Reading};

/// One LuxOS power profile.
#[derive(Clone, Debug, PartialEq)]
pub struct Profile {
    /// Name to pass to `profileset`.
    pub name: String,
    /// Expected power, W.
    pub watts: u32,
}

/// A LuxOS API client.
#[derive(Debug)]
pub struct LuxOsClient {
    cfg: ClientConfig,
    session: Mutex<Option<String>>,
}

impl LuxOsClient {
    /// A client for the miner at `cfg.addr`.
    pub fn new(cfg: ClientConfig) -> LuxOsClient {
        LuxOsClient {
            cfg,
            session: Mutex::new(None),
        }
    }

    /// `curtail sleep`.
    pub async fn sleep(&self) -> Result<(), ClientError> {
        bounded(self.cfg.timeout, self.privileged("curtail", "sleep")).await
    }

    /// `curtail wakeup`.
    pub async fn wakeup(&self) -> Result<(), ClientError> {
        bounded(self.cfg.timeout, self.privileged("curtail", "wakeup")).await
    }

    /// The miner's profiles.
    pub async fn profiles(&self) -> Result<Vec<Profile>, ClientError> {
        bounded(self.cfg.timeout, async {
            parse_profiles(&self.command(json!({ "command": "profiles" })).await?)
        })
        .await
    }

    /// Set the profile closest to `watts` from below; returns it.
    pub async fn set_power_target(&self, watts: u32) -> Result<Profile, ClientError> {
        bounded(self.cfg.timeout, async {
            let profiles = parse_profiles(&self.command(json!({ "command": "profiles" })).await?)?;
            let p = pick_profile(&profiles, watts)
                .ok_or(ClientError::Protocol("miner lists no profiles".into()))?
                .clone();
            self.privileged("profileset", &p.name).await?;
            Ok(p)
        })
        .await
    }

    /// Power (`power`) and hashrate (`summary`).
    pub async fn telemetry(&self) -> Result<Reading, ClientError> {
        bounded(self.cfg.timeout, async {
            let power = self.command(json!({ "command": "power" })).await?;
            let summary = self.command(json!({ "command": "summary" })).await?;
            Ok(Reading {
                power_w: number(&power, "/POWER/0/Watts")?,
                hashrate_ths: number(&summary, "/SUMMARY/0/GHS 5s")? / 1000.0,
            })
        })
        .await
    }

    async fn command(&self, req: Value) -> Result<Value, ClientError> {
        let v = cgminer::request(&self.cfg.addr, &req).await?;
        check_status(&v)?;
        Ok(v)
    }

    async fn privileged(&self, command: &str, arg: &str) -> Result<(), ClientError> {
        // The lock serialises logons, so concurrent commands share one.
        let mut session = self.session.lock().await;
        for attempt in 0..2 {
            let sid = match session.as_ref() {
                Some(s) => s.clone(),
                None => session.insert(self.logon().await?).clone(),
            };
            let req = json!({ "command": command, "parameter": format!("{sid},{arg}") });
            let v = cgminer::request(&self.cfg.addr, &req).await?;
            match status_of(&v) {
                Some((_, _, msg)) if is_session_error(&msg) && attempt == 0 => {
                    *session = None;
                }
                Some((_, _, msg)) if is_session_error(&msg) => {
                    return Err(ClientError::Auth(msg));
                }
                _ => return check_status(&v),
            }
        }
        Err(ClientError::Auth("session refused".into()))
    }

    async fn logon(&self) -> Result<String, ClientError> {
        let v = cgminer::request(&self.cfg.addr, &json!({ "command": "logon" })).await?;
        if check_status(&v).is_ok() {
            if let Some(id) = session_id(&v) {
                return Ok(id);
            }
        }
        // One session at a time: reuse the live one.
        let v = self.command(json!({ "command": "session" })).await?;
        session_id(&v).ok_or(ClientError::Auth("no session available".into()))
    }
}

fn session_id(v: &Value) -> Option<String> {
    v.pointer("/SESSION/0/SessionID")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
}

fn is_session_error(msg: &str) -> bool {
    msg.to_ascii_lowercase().contains("session")
}

/// The profiles a `profiles` reply lists (sans-IO; public for the fuzz targets).
pub fn parse_profiles(v: &Value) -> Result<Vec<Profile>, ClientError> {
    let list = v
        .get("PROFILES")
        .and_then(Value::as_array)
        .ok_or(ClientError::Protocol("no PROFILES in reply".into()))?;
    list.iter()
        .map(|p| {
            let name = p
                .get("Profile Name")
                .and_then(Value::as_str)
                .ok_or(ClientError::Protocol("profile without a name".into()))?;
            let watts = number(p, "/Watts")?;
            Ok(Profile {
                name: name.to_owned(),
                watts: watts.max(0.0).round() as u32,
            })
        })
        .collect()
}

/// The highest profile at or below `watts`, else the lowest.
pub fn pick_profile(profiles: &[Profile], watts: u32) -> Option<&Profile> {
    profiles
        .iter()
        .filter(|p| p.watts <= watts)
        .max_by_key(|p| p.watts)
        .or_else(|| profiles.iter().min_by_key(|p| p.watts))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_profile_from_below() {
        let v = json!({ "PROFILES": [
            { "Profile Name": "default", "Watts": 3068 },
            { "Profile Name": "-1", "Watts": 2915 },
            { "Profile Name": "-2", "Watts": "2761" },
        ]});
        let ps = parse_profiles(&v).unwrap();
        assert_eq!(pick_profile(&ps, 3000).unwrap().name, "-1");
        assert_eq!(pick_profile(&ps, 5000).unwrap().name, "default");
        assert_eq!(pick_profile(&ps, 100).unwrap().name, "-2");
        assert!(pick_profile(&[], 100).is_none());
        assert!(parse_profiles(&json!({})).is_err());
    }
}
