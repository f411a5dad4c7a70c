//! Endpoints as people write them: `host:port`, `[v6]:port`, `ipv4:port`,
//! and pool URLs `stratum+tcp://host:port` (SV1) and
//! `stratum2+tcp://host:port/<authority key>` (SV2, the key pinned).
//!
//! Parsing is pure and never resolves a name: a name is looked up each time
//! a connection is made ([`Endpoint::resolve`]), so a pool that moves to
//! another address is followed on the next reconnect and a name that does
//! not resolve yet is an upstream error (retried), not a refused start.

use gridproxy_protocol::sv2::AuthorityPublicKey;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// Longest host name accepted (DNS: 253 characters).
pub const MAX_HOST: usize = 253;

/// A host (name or IP address) and a port.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Endpoint {
    /// A DNS name, an IPv4 address or an IPv6 address (without brackets).
    pub host: String,
    /// TCP port (never 0).
    pub port: u16,
}

/// Why an address does not parse; the message says what was expected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{input:?}: {reason}")]
pub struct EndpointError {
    /// The text as given.
    pub input: String,
    /// What is wrong with it.
    pub reason: String,
}

fn bad(input: &str, reason: impl Into<String>) -> EndpointError {
    EndpointError {
        input: input.to_string(),
        reason: reason.into(),
    }
}

impl Endpoint {
    /// `host:port`, `[v6]:port` or `ipv4:port`; the port is required.
    pub fn parse(s: &str) -> Result<Endpoint, EndpointError> {
        parse_host_port(s.trim(), None).map_err(|reason| bad(s, reason))
    }

    /// As [`Endpoint::parse`], but a bare `host`, `ipv4` or IPv6 address
    /// (`::1`, `[::1]`) takes `default_port`.
    pub fn parse_with_default_port(s: &str, default_port: u16) -> Result<Endpoint, EndpointError> {
        parse_host_port(s.trim(), Some(default_port)).map_err(|reason| bad(s, reason))
    }

    /// The host as an IP address, when it is one (no lookup).
    pub fn ip(&self) -> Option<IpAddr> {
        self.host.parse().ok()
    }

    /// Every address the host stands for now, in the resolver's order (an
    /// IP address is returned as it is, without a lookup).
    pub async fn resolve(&self) -> std::io::Result<Vec<SocketAddr>> {
        if let Some(ip) = self.ip() {
            return Ok(vec![SocketAddr::new(ip, self.port)]);
        }
        Ok(tokio::net::lookup_host((self.host.as_str(), self.port))
            .await?
            .collect())
    }
}

impl From<SocketAddr> for Endpoint {
    fn from(a: SocketAddr) -> Endpoint {
        Endpoint {
            host: a.ip().to_string(),
            port: a.port(),
        }
    }
}

impl fmt::Display for Endpoint {
    /// `host:port`, IPv6 in brackets.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// Parses `host[:port]`; `default_port: None` makes the port required.
fn parse_host_port(s: &str, default_port: Option<u16>) -> Result<Endpoint, String> {
    if s.is_empty() {
        return Err("empty address".into());
    }
    if s.contains('@') {
        return Err(
            "credentials do not belong in the address (give user and password instead)".into(),
        );
    }
    let need_port = || match default_port {
        Some(p) => Ok(p),
        None => Err("needs a port: host:port".to_string()),
    };
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let Some((v6, after)) = rest.split_once(']') else {
            return Err("an IPv6 address opened with [ has no closing ]".into());
        };
        if v6.parse::<Ipv6Addr>().is_err() {
            return Err(format!("{v6:?} in brackets is not an IPv6 address"));
        }
        let port = match after {
            "" => need_port()?,
            p => match p.strip_prefix(':') {
                Some(p) => parse_port(p)?,
                None => return Err("expected :port after the ]".into()),
            },
        };
        (v6.to_string(), port)
    } else if s.parse::<Ipv6Addr>().is_ok() {
        // A bare IPv6 address: its last group cannot be told from a port.
        match default_port {
            Some(p) => (s.to_string(), p),
            None => return Err("write an IPv6 address in brackets with a port: [::1]:3333".into()),
        }
    } else {
        match s.rsplit_once(':') {
            Some((h, _)) if h.contains(':') => {
                return Err("write an IPv6 address in brackets: [::1]:3333".into())
            }
            Some((h, p)) => (h.to_string(), parse_port(p)?),
            None => (s.to_string(), need_port()?),
        }
    };
    if !host.contains(':') {
        check_host(&host)?;
    }
    Ok(Endpoint { host, port })
}

fn parse_port(p: &str) -> Result<u16, String> {
    match p.parse::<u16>() {
        Ok(0) => Err("port 0 cannot be connected to".into()),
        Ok(n) if !p.starts_with('+') => Ok(n),
        _ => Err(format!("port {p:?} is not a number 1-65535")),
    }
}

/// A DNS name (letters, digits, `-`, `_`, dot-separated labels of 1-63
/// characters, an optional final dot) or an IPv4 address.
fn check_host(h: &str) -> Result<(), String> {
    if h.is_empty() {
        return Err("no host before the port".into());
    }
    if h.len() > MAX_HOST {
        return Err(format!("host name longer than {MAX_HOST} characters"));
    }
    // All digits and dots: it must be a whole IPv4 address (the resolver
    // would read `10.1` as 10.0.0.1).
    if h.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return h
            .parse::<Ipv4Addr>()
            .map(drop)
            .map_err(|_| format!("{h:?} is not an IPv4 address"));
    }
    let name = h.strip_suffix('.').unwrap_or(h);
    let label_ok = |l: &str| {
        (1..=63).contains(&l.len())
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    if name.split('.').all(label_ok) {
        Ok(())
    } else {
        Err(format!("{h:?} is not a host name or IP address"))
    }
}

/// The protocol a pool URL's scheme names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scheme {
    /// `stratum+tcp://`: Stratum V1.
    Sv1,
    /// `stratum2+tcp://`: Stratum V2 (Noise).
    Sv2,
}

impl Scheme {
    /// The scheme as written in a URL.
    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::Sv1 => "stratum+tcp",
            Scheme::Sv2 => "stratum2+tcp",
        }
    }
}

/// A pool's `address`: where it is and, written as a URL, which protocol
/// it speaks and (SV2) the authority key it must be signed with.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Deserialize)]
#[serde(try_from = "String")]
pub struct PoolAddress {
    /// Host and port.
    pub endpoint: Endpoint,
    /// The URL's scheme; `None` for a plain `host:port`.
    pub scheme: Option<Scheme>,
    /// `stratum2+tcp://host:port/<key>`: the authority key pinned by the URL.
    pub authority_pubkey: Option<AuthorityPublicKey>,
}

impl PoolAddress {
    /// Parses one of `host:port`, `[v6]:port`, `ipv4:port`,
    /// `stratum+tcp://host:port` or `stratum2+tcp://host:port[/<key>]`.
    pub fn parse(s: &str) -> Result<PoolAddress, EndpointError> {
        let t = s.trim();
        let Some((scheme, rest)) = t.split_once("://") else {
            return Ok(PoolAddress {
                endpoint: Endpoint::parse(t).map_err(|e| bad(s, e.reason))?,
                scheme: None,
                authority_pubkey: None,
            });
        };
        let scheme = match scheme.to_ascii_lowercase().as_str() {
            "stratum+tcp" => Scheme::Sv1,
            "stratum2+tcp" => Scheme::Sv2,
            "stratum+ssl" | "stratum+tls" | "stratum2+ssl" | "stratum2+tls" => {
                return Err(bad(
                    s,
                    format!("{scheme}:// (TLS) is not supported: use stratum+tcp:// (SV1) or stratum2+tcp:// (SV2, encrypted by Noise)"),
                ))
            }
            _ => {
                return Err(bad(
                    s,
                    format!("unknown scheme {scheme:?}: use host:port, stratum+tcp://host:port (SV1) or stratum2+tcp://host:port/<authority key> (SV2)"),
                ))
            }
        };
        if rest.contains(['?', '#']) {
            return Err(bad(s, "a pool address has no query or fragment"));
        }
        let (authority, path) = match rest.split_once('/') {
            Some((a, p)) => (a, p.strip_suffix('/').unwrap_or(p)),
            None => (rest, ""),
        };
        let endpoint = parse_host_port(authority, None).map_err(|r| bad(s, r))?;
        let authority_pubkey = match (scheme, path) {
            (_, "") => None,
            (Scheme::Sv1, _) => {
                return Err(bad(
                    s,
                    "a stratum+tcp:// (SV1) address has no path; an authority key goes with stratum2+tcp://",
                ))
            }
            (Scheme::Sv2, key) if key.contains('/') => {
                return Err(bad(
                    s,
                    "expected stratum2+tcp://host:port/<authority key> (one path segment)",
                ))
            }
            (Scheme::Sv2, key) => Some(
                key.parse::<AuthorityPublicKey>()
                    .map_err(|e| bad(s, format!("the key in the URL: {e}")))?,
            ),
        };
        Ok(PoolAddress {
            endpoint,
            scheme: Some(scheme),
            authority_pubkey,
        })
    }
}

impl TryFrom<String> for PoolAddress {
    type Error = EndpointError;
    fn try_from(s: String) -> Result<Self, EndpointError> {
        PoolAddress::parse(&s)
    }
}

impl std::str::FromStr for PoolAddress {
    type Err = EndpointError;
    fn from_str(s: &str) -> Result<Self, EndpointError> {
        PoolAddress::parse(s)
    }
}

impl fmt::Display for PoolAddress {
    /// As it would be written: `host:port` or the URL (with its key).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(s) = self.scheme {
            write!(f, "{}://", s.as_str())?;
        }
        write!(f, "{}", self.endpoint)?;
        if let Some(k) = &self.authority_pubkey {
            write!(f, "/{k}")?;
        }
        Ok(())
    }
}

/// A pool's `client.reconnect`: where to (absent parts: where we are) and
/// after how long.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Redirect {
    /// Host to reconnect to.
    pub host: Option<String>,
    /// Port to reconnect to.
    pub port: Option<u16>,
    /// Wait before reconnecting.
    pub wait: std::time::Duration,
}

impl std::fmt::Display for Redirect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (&self.host, self.port) {
            (Some(h), Some(p)) => write!(f, "to {h}:{p}")?,
            (Some(h), None) => write!(f, "to {h}")?,
            (None, Some(p)) => write!(f, "to port {p}")?,
            (None, None) => write!(f, "to the same address")?,
        }
        write!(f, " in {:?}", self.wait)
    }
}

/// Where a `client.reconnect` from the pool at `current` (configured as
/// `configured`) leads: `Ok(None)` stays, `Ok(Some)` moves, `Err` refuses
/// (with why). As cgminer does, a pool may send us to another port of the
/// same host or to another host of its own domain (`eu.pool.example` ->
/// `us.pool.example`), never elsewhere.
pub fn redirect_target(
    configured: &Endpoint,
    current: &Endpoint,
    r: &Redirect,
) -> Result<Option<Endpoint>, String> {
    let host = match &r.host {
        None => current.host.clone(),
        Some(h) => {
            // Validated as an address would be (`[v6]` allowed).
            let ep = Endpoint::parse_with_default_port(h, current.port)
                .map_err(|e| format!("not a host: {e}"))?;
            ep.host
        }
    };
    let port = r.port.unwrap_or(current.port);
    let to = Endpoint { host, port };
    let norm = |h: &str| h.trim_end_matches('.').to_ascii_lowercase();
    if norm(&to.host) == norm(&current.host) && to.port == current.port {
        return Ok(None);
    }
    let (want, have) = (norm(&to.host), norm(&configured.host));
    let parent = |h: &str| -> Option<String> {
        if h.parse::<std::net::IpAddr>().is_ok() {
            return None;
        }
        h.split_once('.')
            .map(|(_, d)| d.to_string())
            .filter(|d| d.contains('.'))
    };
    let same_domain = matches!((parent(&want), parent(&have)), (Some(a), Some(b)) if a == b);
    if want == have || same_domain {
        Ok(Some(to))
    } else {
        Err(format!(
            "{} is neither {} nor in its domain",
            to.host, configured.host
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "9auqWEzQDVyd2oe1JVGFLMLHZtCo2FFqZwtKA5gd9xbuEu7PH72";

    fn ep(host: &str, port: u16) -> Endpoint {
        Endpoint {
            host: host.into(),
            port,
        }
    }

    fn reason(r: Result<impl fmt::Debug, EndpointError>) -> String {
        r.expect_err("should not parse").to_string()
    }

    #[test]
    fn host_port_forms() {
        for (s, want) in [
            ("stratum.example.com:3333", ep("stratum.example.com", 3333)),
            ("  localhost:1 ", ep("localhost", 1)),
            ("127.0.0.1:34254", ep("127.0.0.1", 34254)),
            ("[::1]:3336", ep("::1", 3336)),
            ("[2001:db8::7]:65535", ep("2001:db8::7", 65535)),
            ("pool_1.internal.:3333", ep("pool_1.internal.", 3333)),
            ("POOL-A:3333", ep("POOL-A", 3333)),
        ] {
            let got = Endpoint::parse(s).unwrap();
            assert_eq!(got, want, "{s}");
        }
        assert_eq!(ep("::1", 3336).to_string(), "[::1]:3336");
        assert_eq!(ep("a.b", 1).to_string(), "a.b:1");
        assert_eq!(
            Endpoint::from("[::1]:9".parse::<SocketAddr>().unwrap()),
            ep("::1", 9)
        );
    }

    #[test]
    fn host_port_errors_say_what_is_wrong() {
        for (s, says) in [
            ("", "empty address"),
            ("stratum.example.com", "needs a port"),
            ("127.0.0.1", "needs a port"),
            ("host:", "is not a number"),
            ("host:x", "is not a number"),
            ("host:70000", "is not a number"),
            ("host:+5", "is not a number"),
            ("host:0", "port 0"),
            (":3333", "no host"),
            ("::1", "in brackets"),
            ("::1:3333", "in brackets"),
            ("[::1]", "needs a port"),
            ("[::1", "no closing ]"),
            ("[nothost]:1", "not an IPv6 address"),
            ("[::1]3333", "expected :port"),
            ("10.1:3333", "not an IPv4 address"),
            ("300.0.0.1:3333", "not an IPv4 address"),
            ("bad host:3333", "not a host name"),
            ("-lead.example:3333", "not a host name"),
            ("a..b:3333", "not a host name"),
            ("user@host:3333", "credentials"),
            ("host:3333/x", "is not a number"),
        ] {
            let e = reason(Endpoint::parse(s));
            assert!(e.contains(says), "{s:?}: {e}");
            assert!(e.starts_with(&format!("{s:?}")), "names the input: {e}");
        }
        let long = format!("{}:1", "a.".repeat(130));
        assert!(reason(Endpoint::parse(&long)).contains("longer than 253"));
    }

    #[test]
    fn default_port_forms() {
        let p = |s| Endpoint::parse_with_default_port(s, 4028);
        assert_eq!(p("10.0.1.11").unwrap(), ep("10.0.1.11", 4028));
        assert_eq!(p("10.0.1.11:80").unwrap(), ep("10.0.1.11", 80));
        assert_eq!(p("miner-01.rack2").unwrap(), ep("miner-01.rack2", 4028));
        assert_eq!(
            p("miner-01.rack2:4029").unwrap(),
            ep("miner-01.rack2", 4029)
        );
        assert_eq!(p("::1").unwrap(), ep("::1", 4028));
        assert_eq!(p("[::1]").unwrap(), ep("::1", 4028));
        assert_eq!(p("[fe80::2]:50051").unwrap(), ep("fe80::2", 50051));
        assert!(reason(p("miner:x")).contains("not a number"));
        assert!(reason(p("::1:x")).contains("in brackets"));
    }

    #[test]
    fn pool_address_forms() {
        let key: AuthorityPublicKey = KEY.parse().unwrap();
        for (s, endpoint, scheme, k) in [
            (
                "pool.example.com:3333",
                ep("pool.example.com", 3333),
                None,
                None,
            ),
            ("[::1]:3333", ep("::1", 3333), None, None),
            (
                "stratum+tcp://pool.example.com:3333",
                ep("pool.example.com", 3333),
                Some(Scheme::Sv1),
                None,
            ),
            (
                "STRATUM+TCP://127.0.0.1:3333/",
                ep("127.0.0.1", 3333),
                Some(Scheme::Sv1),
                None,
            ),
            (
                "stratum2+tcp://[::1]:3336",
                ep("::1", 3336),
                Some(Scheme::Sv2),
                None,
            ),
            (
                &format!("stratum2+tcp://pool.example.com:3336/{KEY}"),
                ep("pool.example.com", 3336),
                Some(Scheme::Sv2),
                Some(key),
            ),
            (
                &format!("stratum2+tcp://localhost:3336/{KEY}/"),
                ep("localhost", 3336),
                Some(Scheme::Sv2),
                Some(key),
            ),
        ] {
            let a = PoolAddress::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"));
            assert_eq!(
                a,
                PoolAddress {
                    endpoint,
                    scheme,
                    authority_pubkey: k
                },
                "{s}"
            );
            // Printed as written (canonical form) and parsed back the same.
            assert_eq!(PoolAddress::parse(&a.to_string()).unwrap(), a, "{s}");
        }
        assert_eq!(
            PoolAddress::parse(&format!("stratum2+tcp://h:1/{KEY}"))
                .unwrap()
                .to_string(),
            format!("stratum2+tcp://h:1/{KEY}")
        );
    }

    #[test]
    fn pool_address_errors_say_what_is_wrong() {
        for (s, says) in [
            ("pool.example.com", "needs a port"),
            ("stratum+tcp://pool.example.com", "needs a port"),
            ("stratum+tcp://", "empty address"),
            ("stratum+ssl://pool.example.com:443", "TLS"),
            ("http://pool.example.com:3333", "unknown scheme"),
            (
                &format!("stratum+tcp://pool.example.com:3333/{KEY}"),
                "has no path",
            ),
            (
                "stratum2+tcp://pool.example.com:3336/notakey",
                "the key in the URL",
            ),
            (
                &format!("stratum2+tcp://pool.example.com:3336/{KEY}/x"),
                "one path segment",
            ),
            ("stratum+tcp://pool.example.com:3333?x=1", "query"),
            (
                "stratum+tcp://worker:pw@pool.example.com:3333",
                "credentials",
            ),
            ("stratum+tcp://::1:3333", "in brackets"),
        ] {
            let e = reason(PoolAddress::parse(s));
            assert!(e.contains(says), "{s:?}: {e}");
        }
    }

    #[test]
    fn deserializes_from_a_string_with_the_reason() {
        #[derive(serde::Deserialize, Debug)]
        struct T {
            #[allow(dead_code)]
            address: PoolAddress,
        }
        let t: T = toml::from_str("address = 'stratum+tcp://h:1'").unwrap();
        assert_eq!(t.address.scheme, Some(Scheme::Sv1));
        let e = toml::from_str::<T>("\naddress = 'h'")
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 2") && e.contains("needs a port"), "{e}");
    }

    #[test]
    fn a_pool_may_redirect_within_its_host_or_domain_only() {
        let r = |host: Option<&str>, port: Option<u16>| Redirect {
            host: host.map(String::from),
            port,
            wait: std::time::Duration::ZERO,
        };
        let conf = ep("eu.pool.example", 3333);
        let go = |cur: &Endpoint, red: Redirect| redirect_target(&conf, cur, &red);
        assert_eq!(go(&conf, r(None, None)), Ok(None));
        assert_eq!(go(&conf, r(Some("EU.pool.example."), Some(3333))), Ok(None));
        assert_eq!(
            go(&conf, r(None, Some(4444))),
            Ok(Some(ep("eu.pool.example", 4444)))
        );
        assert_eq!(
            go(&conf, r(Some("us.pool.example"), None)),
            Ok(Some(ep("us.pool.example", 3333)))
        );
        assert_eq!(
            go(&conf, r(Some("us.pool.example"), Some(443))),
            Ok(Some(ep("us.pool.example", 443)))
        );
        // From a redirect back to the configured pool.
        assert_eq!(
            go(
                &ep("us.pool.example", 443),
                r(Some("eu.pool.example"), Some(3333))
            ),
            Ok(Some(conf.clone()))
        );
        for bad in [
            "evil.example",
            "pool.example",
            "a.b.pool.example",
            "10.0.0.1",
            "bad host",
        ] {
            let e = go(&conf, r(Some(bad), Some(3333)));
            assert!(e.is_err(), "{bad}: {e:?}");
        }
        // An IP address: its own port only; a TLD is not a domain.
        let ip = ep("127.0.0.1", 1);
        assert_eq!(
            redirect_target(&ip, &ip, &r(Some("127.0.0.1"), Some(2))),
            Ok(Some(ep("127.0.0.1", 2)))
        );
        assert!(redirect_target(&ip, &ip, &r(Some("127.0.0.2"), Some(2))).is_err());
        let tld = ep("a.example", 1);
        assert!(redirect_target(&tld, &tld, &r(Some("b.example"), None)).is_err());
        let local = ep("localhost", 1);
        assert_eq!(
            redirect_target(&local, &local, &r(Some("localhost"), Some(2))),
            Ok(Some(ep("localhost", 2)))
        );
    }

    #[tokio::test]
    async fn an_ip_is_not_looked_up_and_localhost_resolves() {
        assert_eq!(
            ep("::1", 5).resolve().await.unwrap(),
            vec!["[::1]:5".parse::<SocketAddr>().unwrap()]
        );
        let l = ep("localhost", 7).resolve().await.unwrap();
        assert!(
            !l.is_empty() && l.iter().all(|a| a.ip().is_loopback() && a.port() == 7),
            "{l:?}"
        );
    }
}
