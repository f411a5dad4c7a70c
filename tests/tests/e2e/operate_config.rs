//! Broken configs each produce a precise error: the file, the key and the
//! line (what `gridproxy check-config` and `gridproxy run` print).

fn check(text: &str, origin: &str) -> Result<gridproxy::Config, gridproxy::config::ConfigError> {
    gridproxy::Config::parse(text, origin)
}

const KEY: &str = "9auqWEzQDVyd2oe1JVGFLMLHZtCo2FFqZwtKA5gd9xbuEu7PH72";

/// A valid base; `{EXTRA}` is appended.
fn base(extra: &str) -> String {
    format!(
        r#"# a site
[[pools]]
name = "main"
address = "127.0.0.1:34254"
protocol = "sv2"
authority_pubkey = "{KEY}"
user = "acct"

[[pools]]
name = "backup"
address = "127.0.0.1:3334"
protocol = "sv1"
user = "acct"
priority = 1

[listen]
sv1 = "127.0.0.1:3333"

[api]
listen = "127.0.0.1:8080"

[[api.tokens]]
name = "grafana"
role = "read"
token = "0123456789abcdef0123"
{extra}"#
    )
}

/// A valid authority key other than `KEY`.
fn other_key() -> String {
    gridproxy_protocol::sv2::AuthorityKeypair::from_secret_bytes([9; 32])
        .unwrap()
        .public()
        .to_string()
}

fn line_of(text: &str, needle: &str) -> usize {
    text.lines()
        .position(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("{needle:?} not in config"))
        + 1
}

/// (what is broken, config text, key expected in the message, the line's marker text)
fn cases() -> Vec<(&'static str, String, &'static str, &'static str)> {
    vec![
        (
            "typo in a key",
            base("").replace("[listen]\n", "[listen]\nsv11 = \"127.0.0.1:1\"\n"),
            "sv11",
            "sv11 =",
        ),
        (
            "wrong type",
            base("\n[limits]\nmax_connections = \"lots\"\n"),
            "max_connections",
            "max_connections =",
        ),
        (
            "pool address without a port",
            base("").replace("127.0.0.1:3334", "backup.example"),
            "address",
            "backup.example",
        ),
        (
            "pool URL whose scheme disagrees with protocol",
            base("").replace("127.0.0.1:3334", "stratum2+tcp://backup.example:3334"),
            "pools[1].address",
            "stratum2+tcp://backup.example",
        ),
        (
            "pool URL key that differs from authority_pubkey",
            base("").replace(
                "127.0.0.1:34254",
                &format!("stratum2+tcp://main.example:34254/{}", other_key()),
            ),
            "pools[0].authority_pubkey",
            "authority_pubkey =",
        ),
        (
            "pool URL with an unknown scheme",
            base("").replace("127.0.0.1:3334", "tcp://backup.example:3334"),
            "address",
            "tcp://backup.example",
        ),
        (
            "sv2 pool without its pinned key",
            base("").replace(&format!("authority_pubkey = \"{KEY}\"\n"), ""),
            "pools[0].authority_pubkey",
            "[[pools]]",
        ),
        (
            "sv2 key that does not parse",
            base("").replace(KEY, "notakey"),
            "pools[0].authority_pubkey",
            "notakey",
        ),
        (
            "negative split weight",
            base("").replace("priority = 1\n", "priority = 1\nweight = -2.0\n"),
            "pools[1].weight",
            "weight = -2.0",
        ),
        (
            "extranonce2 too long for firmware",
            base("\n[extranonce]\nextranonce2_size = 12\n"),
            "extranonce.extranonce2_size",
            "extranonce2_size = 12",
        ),
        (
            "unknown role",
            base("").replace("role = \"read\"", "role = \"admin\""),
            "role",
            "role = \"admin\"",
        ),
        (
            "token too short",
            base("").replace("0123456789abcdef0123", "short"),
            "api.tokens[0].token",
            "token = \"short\"",
        ),
        (
            "duplicate token name",
            base("\n[[api.tokens]]\nname = \"grafana\"\nrole = \"operate\"\ntoken_env = \"OPS_TOKEN\"\n"),
            "api.tokens[1].name",
            "name = \"grafana\"\nrole = \"operate\"",
        ),
        (
            "token and token_env together",
            base("").replace(
                "token = \"0123456789abcdef0123\"",
                "token = \"0123456789abcdef0123\"\ntoken_env = \"X\"",
            ),
            "api.tokens[0].token",
            "token = \"0123456789abcdef0123\"",
        ),
        (
            "API on a public address without tokens",
            base("")
                .replace("127.0.0.1:8080", "0.0.0.0:8080")
                .replace("[[api.tokens]]\nname = \"grafana\"\nrole = \"read\"\ntoken = \"0123456789abcdef0123\"\n", ""),
            "api.listen",
            "0.0.0.0:8080",
        ),
        (
            "TOML syntax error",
            base("").replace("name = \"backup\"", "name = \"backup"),
            "",
            "name = \"backup",
        ),
    ]
}

#[test]
fn the_valid_base_and_the_example_config_pass() {
    let _gate = gridproxy_tests::module_gate(module_path!());
    check(&base(""), "site.toml").unwrap();
    // Pools as people write them: names, IPv6, URLs (the scheme sets the
    // protocol, the SV2 URL pins the key).
    let forms = base("")
        .replace(
            "address = \"127.0.0.1:34254\"\nprotocol = \"sv2\"\nauthority_pubkey",
            &format!("address = \"stratum2+tcp://pool.example.com:34254/{KEY}\"\nauthority_pubkey"),
        )
        .replace(
            "address = \"127.0.0.1:3334\"\nprotocol = \"sv1\"",
            "address = \"stratum+tcp://[::1]:3334\"",
        );
    let c = check(&forms, "site.toml").unwrap();
    assert_eq!(c.pools[0].address.endpoint.host, "pool.example.com");
    assert_eq!(c.pools[1].protocol().as_str(), "sv1");
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/gridproxy.toml");
    let text = std::fs::read_to_string(example).unwrap();
    let c = check(&text, "examples/gridproxy.toml").unwrap();
    // The example says it shows every key at its default: hold it to that.
    use gridproxy_proxy::config::{DifficultyConfig, ExtranonceConfig, Limits, RoutingConfig};
    assert_eq!(c.difficulty, DifficultyConfig::default(), "[difficulty]");
    assert_eq!(c.limits, Limits::default(), "[limits]");
    assert_eq!(c.routing, RoutingConfig::default(), "[routing]");
    assert_eq!(c.extranonce, ExtranonceConfig::default(), "[extranonce]");
}

#[test]
fn broken_configs_name_the_key_and_the_line() {
    let _gate = gridproxy_tests::module_gate(module_path!());
    for (what, text, key, marker) in cases() {
        let err = match check(&text, "site.toml") {
            Ok(_) => panic!("{what}: accepted"),
            Err(e) => e.to_string(),
        };
        // The line: where the marker text starts (multi-line markers: its first line).
        let first = marker.lines().next().unwrap();
        let line = if marker.contains('\n') {
            // the second occurrence block (duplicate token name)
            let idx = text
                .find(marker)
                .unwrap_or_else(|| panic!("{what}: marker"));
            text[..idx].lines().count() + 1
        } else {
            line_of(&text, first)
        };
        assert!(err.starts_with("site.toml"), "{what}: no file name: {err}");
        assert!(err.contains(key), "{what}: key {key:?} not named: {err}");
        assert!(
            err.contains(&format!("line {line}")),
            "{what}: line {line} not named: {err}"
        );
        println!("{what}: {err}");
    }
}
