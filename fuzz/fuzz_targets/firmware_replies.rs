//! Firmware replies: what a miner (or anything answering on its port) may
//! send back to the curtailment clients. cgminer-style TCP JSON (LuxOS,
//! Whatsminer, stock), the VNish REST status + body, Whatsminer's encrypted
//! replies and `get_token` salts, and Braiins OS protobuf messages.
#![no_main]

use std::sync::OnceLock;

use gridproxy_curtail::actuators::braiins::{pb, reading_of};
use gridproxy_curtail::actuators::cgminer::{check_status, number, parse_reply, status_of};
use gridproxy_curtail::actuators::luxos::{parse_profiles, pick_profile};
use gridproxy_curtail::actuators::vnish;
use gridproxy_curtail::actuators::whatsminer::Token;
use gridproxy_curtail::actuators::ClientError;
use gridproxy_fuzz::{json_close, Input};
use http::StatusCode;
use libfuzzer_sys::fuzz_target;
use prost::Message;
use serde_json::Value;

/// Where the clients read telemetry.
const POINTERS: &[&str] = &[
    "/POWER/0/Watts",
    "/SUMMARY/0/GHS 5s",
    "/SUMMARY/0/Power",
    "/SUMMARY/0/MHS 5s",
    "/STATS/1/Power",
    "/miner/power_consumption",
    "/miner/instant_hashrate",
];

fn numbers(v: &Value) {
    for p in POINTERS {
        if let Ok(x) = number(v, p) {
            assert!(x.is_finite());
        }
    }
}

fn cgminer(bytes: &[u8]) {
    let Ok(v) = parse_reply(bytes) else {
        return;
    };
    // What parses once parses again the same, NUL-terminated as cgminer sends it.
    let again = parse_reply(format!("{v}\0").as_bytes()).expect("re-encoded reply parses");
    assert!(json_close(&v, &again), "{v} -> {again}");
    let status = status_of(&v).map(|(s, code, msg)| (s.to_owned(), code, msg));
    match (check_status(&v), status.as_ref()) {
        (Ok(()), Some((s, _, _))) => assert!(s == "S" || s == "I"),
        (Err(ClientError::Rejected(m)), Some((s, code, msg))) => {
            assert!(s != "S" && s != "I");
            assert_eq!(m, format!("code {code}: {msg}"));
        }
        (Err(ClientError::Protocol(_)), None) => {}
        (r, s) => panic!("check_status {r:?} disagrees with status_of {s:?}"),
    }
    numbers(&v);
    if let Ok(profiles) = parse_profiles(&v) {
        assert_eq!(Some(profiles.len()), v["PROFILES"].as_array().map(Vec::len));
        for watts in [0, 1500, 3000, u32::MAX] {
            match pick_profile(&profiles, watts) {
                None => assert!(profiles.is_empty()),
                Some(p) if p.watts <= watts => {
                    assert!(!profiles.iter().any(|q| q.watts > p.watts && q.watts <= watts))
                }
                Some(p) => assert!(profiles.iter().all(|q| q.watts >= p.watts)),
            }
        }
    }
}

fn vnish_reply(status: u16, body: &[u8]) {
    let Ok(status) = StatusCode::from_u16(status) else {
        return;
    };
    // As the HTTP client reads a body.
    let v = if body.iter().all(u8::is_ascii_whitespace) {
        Value::Null
    } else {
        match serde_json::from_slice::<Value>(body) {
            Ok(v) => v,
            Err(_) => return,
        }
    };
    match vnish::check(status, &v) {
        Ok(()) => assert!(status.is_success()),
        Err(ClientError::Auth(_)) => {
            assert!(status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN)
        }
        Err(_) => assert!(!status.is_success()),
    }
    if let Ok(presets) = vnish::parse_presets(&v) {
        assert!(presets.len() <= v.as_array().map_or(0, Vec::len));
    }
    numbers(&v);
}

fn token() -> &'static Token {
    static T: OnceLock<Token> = OnceLock::new();
    T.get_or_init(|| Token::derive("admin", "BQ5hoXV9", "jbzkfQls", "0415").expect("token"))
}

fn whatsminer_enc(bytes: &[u8]) {
    let t = token();
    if let Ok(text) = std::str::from_utf8(bytes) {
        if let Ok(plain) = t.decrypt(text) {
            if let Ok(v) = serde_json::from_str::<Value>(&plain) {
                let _ = check_status(&v);
            }
        }
        // Our own ciphertext decrypts to what went in (less the zero padding).
        let back = t.decrypt(&t.encrypt(bytes));
        if text.is_empty() {
            assert!(back.is_err());
        } else {
            assert_eq!(back.expect("decrypt our own"), text.trim_end_matches('\0'));
        }
    }
}

fn whatsminer_token(input: &mut Input) {
    // salt, newsalt and time from a `get_token` reply; md5crypt is slow, keep them short.
    let mut field = || {
        let n = usize::from(input.byte() % 24);
        let b: Vec<u8> = (0..n).map(|_| input.byte()).collect();
        String::from_utf8_lossy(&b).into_owned()
    };
    let (salt, newsalt, time) = (field(), field(), field());
    if let Ok(t) = Token::derive("admin", &salt, &newsalt, &time) {
        assert!(!t.sign.is_empty());
        assert_eq!(t.decrypt(&t.encrypt(b"{}")).expect("round trip"), "{}");
    }
}

/// Decode, and if it decodes: re-encoding is stable.
fn proto<M: Message + Default>(bytes: &[u8]) -> Option<M> {
    let m = M::decode(bytes).ok()?;
    let once = m.encode_to_vec();
    let back = M::decode(once.as_slice()).expect("re-encoded message decodes");
    assert_eq!(back.encode_to_vec(), once, "protobuf encoding not stable");
    Some(m)
}

fn braiins(kind: u8, bytes: &[u8]) {
    match kind % 4 {
        0 => {
            if let Some(stats) = proto::<pb::GetMinerStatsResponse>(bytes) {
                if let Ok(r) = reading_of(stats) {
                    assert!(r.hashrate_ths.is_finite() && r.hashrate_ths >= 0.0);
                    assert!(r.power_w.is_finite() && r.power_w >= 0.0);
                }
            }
        }
        1 => {
            let _ = proto::<pb::LoginResponse>(bytes);
        }
        2 => {
            let _ = proto::<pb::SetPowerTargetResponse>(bytes);
        }
        _ => {
            let _ = proto::<pb::PauseMiningResponse>(bytes);
            let _ = proto::<pb::ResumeMiningResponse>(bytes);
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    match input.byte() % 5 {
        0 => cgminer(input.rest()),
        1 => {
            let status = input.u16() % 1000;
            vnish_reply(status, input.rest())
        }
        2 => whatsminer_enc(input.rest()),
        3 => whatsminer_token(&mut input),
        _ => {
            let kind = input.byte();
            braiins(kind, input.rest())
        }
    }
});
