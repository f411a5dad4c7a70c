//! Config: arbitrary text through the TOML config loader and the `[api]`
//! checks. A config that is accepted must satisfy every documented bound;
//! one that is refused must say why, and a line it names must exist.
#![no_main]

use gridproxy::config::api::MIN_TOKEN_LEN;
use gridproxy::config::locate::{line_of_nearest, parse_path};
use gridproxy::config::{Config, ConfigError};
use gridproxy_proxy::config::PoolProtocol;
use gridproxy_protocol::sv2::AuthorityPublicKey;
use libfuzzer_sys::fuzz_target;

fn assert_valid(c: &Config) {
    assert!(!c.pools.is_empty());
    for p in &c.pools {
        assert!(p.weight.is_finite() && p.weight > 0.0, "weight {}", p.weight);
        if p.protocol() == PoolProtocol::Sv2 {
            let key = p.authority_key().expect("sv2 pool has a key");
            key.parse::<AuthorityPublicKey>().expect("sv2 key was checked");
        }
    }
    let order = c.proxy().pool_order();
    assert_eq!(order.len(), c.pools.len());
    assert!(order
        .windows(2)
        .all(|w| c.pools[w[0]].priority <= c.pools[w[1]].priority));
    assert!((4..=8).contains(&c.extranonce.extranonce2_size));
    assert!((1..=4).contains(&c.extranonce.miner_bytes));
    let d = &c.difficulty;
    assert!(d.min > 0.0 && d.max >= d.min && d.initial > 0.0 && d.shares_per_minute > 0.0);
    assert!(c.limits.max_connections > 0 && c.limits.max_line >= 256);
    let _ = (c.limits.handshake_timeout(), c.limits.idle_timeout());
    if c.listen.sv2.is_some() {
        assert!(c.listen.sv2_authority_pubkey.is_some() && c.listen.sv2_authority_secret.is_some());
    }
    let api = &c.api;
    assert!((1..=3600).contains(&api.sample_secs));
    assert!(api.metrics_max_workers <= 10_000);
    if api.listen.is_some_and(|a| !a.ip().is_loopback()) {
        assert!(!api.tokens.is_empty(), "non-loopback API without tokens");
    }
    let mut names = std::collections::HashSet::new();
    for t in &api.tokens {
        assert!(!t.name.trim().is_empty() && names.insert(&t.name));
        assert!(t.token.is_some() != t.token_env.is_some());
        if let Some(s) = &t.token {
            assert!(s.len() >= MIN_TOKEN_LEN);
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let lines = text.lines().count();
    match Config::parse(text, "fuzz.toml") {
        Ok(c) => assert_valid(&c),
        Err(e) => {
            let msg = e.to_string();
            assert!(msg.starts_with("fuzz.toml: ") && msg.len() > 11, "{msg}");
            if let ConfigError::Invalid {
                key, message, line, ..
            } = &e
            {
                assert!(!key.is_empty() && !message.is_empty());
                if let Some(n) = *line {
                    assert!((1..=lines).contains(&n), "line {n} of {lines}: {msg}");
                }
            }
        }
    }
    // The span-based line finder on keys the validators name, against any text.
    for key in [
        "pools",
        "pools[0].weight",
        "pools[1].authority_pubkey",
        "extranonce.extranonce2_size",
        "limits",
        "api.tokens[0].token",
        "difficulty",
        "site.miners[2].address",
    ] {
        if let Some(n) = line_of_nearest(text, &parse_path(key)) {
            assert!((1..=lines).contains(&n), "{key}: line {n} of {lines}");
        }
    }
});
