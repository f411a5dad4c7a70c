//! Whatsminer API v2 client (port 4028 on real miners). API v3 (port 4433)
//! is in [`whatsminer_v3`](super::whatsminer_v3).
//!
//! Reads (`summary`) are plain JSON. Writes need a token, per the v2 API:
//! 1. `get_token` returns `time`, `salt`, `newsalt`;
//! 2. `key = md5crypt(password, salt)` and
//!    `sign = md5crypt(key + time, newsalt)`, each taken as the hash part
//!    after the last `$`;
//! 3. the command JSON with `"token": sign` is AES-256-ECB encrypted under
//!    SHA-256(`key`) with zero padding, base64'd and sent as
//!    `{"enc": 1, "data": …}`; the reply `{"enc": …}` decrypts the same way.
//!
//! A fresh token is fetched per command (tokens are cheap and short-lived;
//! this avoids clock-skew and expiry bookkeeping). `md5crypt` comes from the
//! `md5crypt` crate; AES block encryption from RustCrypto `aes` (ECB is just
//! block-by-block, done here).
//!
//! Some Whatsminer firmware acknowledges `power_off` before acting (the
//! `respbefore` flag asks it to), so every command must be confirmed by
//! telemetry; see [`verify`](super::verify).

use aes::cipher::{generic_array::GenericArray, BlockDecrypt, BlockEncrypt, KeyInit};
use aes::Aes256;
use base64::Engine;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::cgminer::{self, check_status, number, status_of};
use super::{bounded, ClientConfig, ClientError, HostPort, Reading};

/// Whatsminer's "check token err".
const CODE_TOKEN: u64 = 135;

/// A Whatsminer API v2 client.
#[derive(Clone)]
pub struct WhatsminerClient {
    cfg: ClientConfig,
    password: String,
}

impl std::fmt::Debug for WhatsminerClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WhatsminerClient")
            .field("cfg", &self.cfg)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// Keys derived from one `get_token` reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Token {
    /// Sent as `"token"` inside the encrypted command.
    pub sign: String,
    /// AES-256 key.
    pub aes_key: [u8; 32],
}

impl Token {
    /// Derive from the admin password and a `get_token` reply's fields.
    pub fn derive(
        password: &str,
        salt: &str,
        newsalt: &str,
        time: &str,
    ) -> Result<Token, ClientError> {
        let key = crypt_hash(password, salt)?;
        let sign = crypt_hash(&format!("{key}{time}"), newsalt)?;
        Ok(Token {
            sign,
            aes_key: Sha256::digest(key.as_bytes()).into(),
        })
    }

    /// Encrypt `plain` to base64.
    pub fn encrypt(&self, plain: &[u8]) -> String {
        let cipher = Aes256::new(GenericArray::from_slice(&self.aes_key));
        let mut buf = plain.to_vec();
        buf.resize(plain.len().div_ceil(16) * 16, 0);
        for block in buf.chunks_exact_mut(16) {
            cipher.encrypt_block(GenericArray::from_mut_slice(block));
        }
        base64::engine::general_purpose::STANDARD.encode(buf)
    }

    /// Decrypt base64 `data`, dropping the zero padding.
    pub fn decrypt(&self, data: &str) -> Result<String, ClientError> {
        let mut buf = base64::engine::general_purpose::STANDARD
            .decode(data.trim())
            .map_err(|e| ClientError::Protocol(format!("bad base64: {e}")))?;
        if buf.is_empty() || buf.len() % 16 != 0 {
            return Err(ClientError::Protocol("ciphertext not whole blocks".into()));
        }
        let cipher = Aes256::new(GenericArray::from_slice(&self.aes_key));
        for block in buf.chunks_exact_mut(16) {
            cipher.decrypt_block(GenericArray::from_mut_slice(block));
        }
        while buf.last() == Some(&0) {
            buf.pop();
        }
        String::from_utf8(buf).map_err(|_| ClientError::Protocol("reply is not UTF-8".into()))
    }
}

/// `md5crypt(key, salt)`, hash part only.
fn crypt_hash(key: &str, salt: &str) -> Result<String, ClientError> {
    let out = md5crypt::md5crypt(key.as_bytes(), salt.as_bytes());
    std::str::from_utf8(&out)
        .ok()
        .and_then(|s| s.rsplit('$').next())
        .filter(|h| !h.is_empty())
        .map(str::to_owned)
        .ok_or(ClientError::Protocol("md5crypt produced no hash".into()))
}

impl WhatsminerClient {
    /// A client for the miner at `cfg.addr` with its admin `password`.
    pub fn new(cfg: ClientConfig, password: impl Into<String>) -> WhatsminerClient {
        WhatsminerClient {
            cfg,
            password: password.into(),
        }
    }

    /// The API address.
    pub fn addr(&self) -> &HostPort {
        &self.cfg.addr
    }

    /// `power_off` (with `respbefore`): stop hashing.
    pub async fn power_off(&self) -> Result<(), ClientError> {
        self.write(json!({ "cmd": "power_off", "respbefore": "true" }))
            .await
    }

    /// `power_on`: resume hashing.
    pub async fn power_on(&self) -> Result<(), ClientError> {
        self.write(json!({ "cmd": "power_on" })).await
    }

    /// `adjust_power_limit` to `watts`.
    pub async fn adjust_power_limit(&self, watts: u32) -> Result<(), ClientError> {
        self.write(json!({ "cmd": "adjust_power_limit", "power_limit": watts.to_string() }))
            .await
    }

    /// Power and hashrate from `summary`.
    pub async fn telemetry(&self) -> Result<Reading, ClientError> {
        bounded(self.cfg.timeout, async {
            let v = cgminer::request(&self.cfg.addr, &json!({ "cmd": "summary" })).await?;
            check_status(&v)?;
            Ok(Reading {
                power_w: number(&v, "/SUMMARY/0/Power")?,
                hashrate_ths: number(&v, "/SUMMARY/0/MHS 5s")? / 1e6,
            })
        })
        .await
    }

    async fn write(&self, mut cmd: Value) -> Result<(), ClientError> {
        bounded(self.cfg.timeout, async {
            let t = cgminer::request(&self.cfg.addr, &json!({ "cmd": "get_token" })).await?;
            check_status(&t)?;
            let field = |k: &str| {
                t.pointer(&format!("/Msg/{k}"))
                    .and_then(Value::as_str)
                    .ok_or_else(|| ClientError::Protocol(format!("get_token reply lacks {k}")))
            };
            let token = Token::derive(
                &self.password,
                field("salt")?,
                field("newsalt")?,
                field("time")?,
            )?;
            cmd["token"] = Value::String(token.sign.clone());
            let req = json!({ "enc": 1, "data": token.encrypt(cmd.to_string().as_bytes()) });
            let reply = cgminer::request(&self.cfg.addr, &req).await?;
            let reply = match reply.get("enc").and_then(Value::as_str) {
                Some(data) => serde_json::from_str(&token.decrypt(data)?)
                    .map_err(|e| ClientError::Protocol(format!("decrypted reply: {e}")))?,
                // Errors before decryption (bad token) come back in clear.
                None => reply,
            };
            match status_of(&reply) {
                Some(("E", CODE_TOKEN, msg)) => Err(ClientError::Auth(msg)),
                _ => check_status(&reply),
            }
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_round_trip() {
        let t = Token::derive("admin", "BQ5hoXV9", "jbzkfQls", "0415").unwrap();
        assert_eq!(t.sign.len(), 22);
        let c = t.encrypt(br#"{"cmd":"power_on"}"#);
        assert_eq!(t.decrypt(&c).unwrap(), r#"{"cmd":"power_on"}"#);
        assert!(t.decrypt("!!").is_err());
        let u = Token::derive("other", "BQ5hoXV9", "jbzkfQls", "0415").unwrap();
        assert_ne!(t, u);
    }
}
