//! Accounts: under which pool user each miner's shares leave the proxy.
//!
//! A hosting site's customers each have their own account at the pool. An
//! `[[accounts]]` entry names the miners that belong to it (worker-name
//! globs, listeners, source networks; every criterion given must match, and
//! the first account that matches wins) and the user (and SV1 password) to
//! use at each pool. Miners that match no account belong to the default
//! account: the pools' own `user`.
//!
//! The engine runs one upstream session per (pool, account) pair, a *slot*:
//! the default account's slot keeps the pool's name, an account's slot is
//! named `pool@account`. The router routes each miner among its account's
//! slots only, with the same priorities and weights as the pools'. Sans-IO:
//! this module only matches names and addresses.

use serde::Deserialize;
use std::collections::BTreeMap;
use std::net::IpAddr;

/// The default account's index; an `[[accounts]]` entry `i` is `i + 1`.
pub const DEFAULT_ACCOUNT: usize = 0;
/// The default account's name in stats and the API.
pub const DEFAULT_NAME: &str = "default";
/// Accounts one configuration may hold (each one is an upstream session per pool).
pub const MAX_ACCOUNTS: usize = 256;
/// Match criteria one account may list, per kind.
pub const MAX_RULES: usize = 256;

/// Which listener a miner came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Listener {
    /// The SV1 (JSON lines) listener.
    Sv1,
    /// The SV2 (Noise) listener.
    Sv2,
}

/// Where a miner came from: what an account can match besides its name.
/// `None` fields match only accounts that do not ask for them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Origin {
    /// The listener it connected to.
    pub listener: Option<Listener>,
    /// Its source address.
    pub source: Option<IpAddr>,
}

/// The login an account uses at one pool. Its `Debug` leaves the password out.
#[derive(Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccountLogin {
    /// User identity at that pool (SV1 `mining.authorize`, SV2 channel `user_identity`).
    pub user: String,
    /// SV1 password.
    #[serde(default = "default_password")]
    pub password: String,
}

fn default_password() -> String {
    "x".into()
}

impl std::fmt::Debug for AccountLogin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccountLogin")
            .field("user", &self.user)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// One `[[accounts]]` entry.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccountConfig {
    /// A short name (letters, digits, `.`, `_`, `-`), unique, not `default`.
    pub name: String,
    /// Worker-name globs (`*` matches any run of characters, so `acme.*`
    /// is a prefix); empty: any name.
    #[serde(default)]
    pub workers: Vec<String>,
    /// Listeners (`sv1`, `sv2`); empty: either.
    #[serde(default)]
    pub listeners: Vec<Listener>,
    /// Source networks in CIDR form (`10.1.0.0/16`, `fd00::/8`); empty: any.
    #[serde(default)]
    pub sources: Vec<String>,
    /// The login at each pool, by pool name. The account's miners go only
    /// to the pools listed here.
    pub pools: BTreeMap<String, AccountLogin>,
}

/// Whether `name` matches `pattern` (`*` matches any run of characters,
/// including none; no other character is special).
pub fn glob(pattern: &str, name: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == name;
    }
    let mut rest = name;
    for (i, p) in parts.iter().enumerate() {
        if i == 0 {
            match rest.strip_prefix(p) {
                Some(r) => rest = r,
                None => return false,
            }
        } else if i == parts.len() - 1 {
            return rest.ends_with(p);
        } else {
            match rest.find(p) {
                Some(at) => rest = &rest[at + p.len()..],
                None => return false,
            }
        }
    }
    true
}

/// A source network, parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Net {
    addr: IpAddr,
    prefix: u8,
}

impl Net {
    fn parse(s: &str) -> Result<Net, String> {
        let (a, p) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = a
            .trim()
            .parse()
            .map_err(|_| format!("{s:?} is not an address or network (10.1.0.0/16, fd00::/8)"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match p {
            Some(p) => p
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|&p| p <= max)
                .ok_or_else(|| format!("{s:?}: the prefix length must be 0..={max}"))?,
            None => max,
        };
        Ok(Net { addr, prefix })
    }

    fn contains(&self, ip: IpAddr) -> bool {
        // An IPv4 miner reaching a dual-stack listener shows as ::ffff:a.b.c.d.
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = u32::MAX.checked_shl(32 - self.prefix as u32).unwrap_or(0);
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = u128::MAX.checked_shl(128 - self.prefix as u32).unwrap_or(0);
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

/// One account's criteria, compiled.
#[derive(Debug, Clone, PartialEq)]
struct Rule {
    workers: Vec<String>,
    listeners: Vec<Listener>,
    sources: Vec<Net>,
}

impl Rule {
    fn matches(&self, worker: &str, origin: Origin) -> bool {
        (self.workers.is_empty() || self.workers.iter().any(|g| glob(g, worker)))
            && (self.listeners.is_empty()
                || origin.listener.is_some_and(|l| self.listeners.contains(&l)))
            && (self.sources.is_empty()
                || origin
                    .source
                    .is_some_and(|ip| self.sources.iter().any(|n| n.contains(ip))))
    }
}

/// The accounts of a configuration, ready to match miners.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Accounts {
    names: Vec<String>,
    rules: Vec<Rule>,
}

impl Accounts {
    /// Compile `[[accounts]]`; the error says which entry and key is wrong
    /// (as `accounts[i].key`, message).
    pub fn new(accounts: &[AccountConfig]) -> Result<Accounts, (String, String)> {
        if accounts.len() > MAX_ACCOUNTS {
            return Err((
                "accounts".into(),
                format!("at most {MAX_ACCOUNTS} accounts"),
            ));
        }
        let mut names = vec![DEFAULT_NAME.to_string()];
        let mut rules = Vec::new();
        for (i, a) in accounts.iter().enumerate() {
            let key = |k: &str| format!("accounts[{i}].{k}");
            let ok_char = |c: char| c.is_ascii_alphanumeric() || "._-".contains(c);
            if a.name.is_empty() || a.name.len() > 64 || !a.name.chars().all(ok_char) {
                return Err((
                    key("name"),
                    "1..=64 letters, digits, '.', '_' or '-'".into(),
                ));
            }
            if names.contains(&a.name) {
                return Err((
                    key("name"),
                    format!("{:?} is taken (\"default\" is the pools' own user)", a.name),
                ));
            }
            if a.workers.len() > MAX_RULES || a.sources.len() > MAX_RULES {
                return Err((key("workers"), format!("at most {MAX_RULES} entries each")));
            }
            if let Some(w) = a.workers.iter().find(|w| w.is_empty() || w.len() > 256) {
                return Err((
                    key("workers"),
                    format!("{w:?}: a glob of 1..=256 characters"),
                ));
            }
            let sources = a
                .sources
                .iter()
                .map(|s| Net::parse(s))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| (key("sources"), e))?;
            if a.pools.is_empty() {
                return Err((
                    key("pools"),
                    "give the account's user at one pool at least: [accounts.pools.<pool name>] user = \"...\"".into(),
                ));
            }
            names.push(a.name.clone());
            rules.push(Rule {
                workers: a.workers.clone(),
                listeners: a.listeners.clone(),
                sources,
            });
        }
        Ok(Accounts { names, rules })
    }

    /// The account a miner belongs to: the first whose criteria all match,
    /// else [`DEFAULT_ACCOUNT`].
    pub fn account_of(&self, worker: &str, origin: Origin) -> usize {
        self.rules
            .iter()
            .position(|r| r.matches(worker, origin))
            .map_or(DEFAULT_ACCOUNT, |i| i + 1)
    }

    /// Account names by index (the default account first).
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// The index of the account named `name`.
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.names.iter().position(|n| n == name)
    }
}

/// The upstream slot name of `pool` for `account` (`None`: the default account).
pub fn slot_name(pool: &str, account: Option<&str>) -> String {
    match account {
        Some(a) => format!("{pool}@{a}"),
        None => pool.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn account(
        name: &str,
        workers: &[&str],
        listeners: &[Listener],
        sources: &[&str],
    ) -> AccountConfig {
        AccountConfig {
            name: name.into(),
            workers: workers.iter().map(|s| s.to_string()).collect(),
            listeners: listeners.to_vec(),
            sources: sources.iter().map(|s| s.to_string()).collect(),
            pools: [(
                "main".to_string(),
                AccountLogin {
                    user: format!("{name}.user"),
                    password: "x".into(),
                },
            )]
            .into(),
        }
    }

    fn from(listener: Listener, ip: &str) -> Origin {
        Origin {
            listener: Some(listener),
            source: Some(ip.parse().unwrap()),
        }
    }

    #[test]
    fn first_matching_account_wins_and_the_rest_are_default() {
        let a = Accounts::new(&[
            account("acme", &["acme.*"], &[], &[]),
            account("rack7", &[], &[], &["10.7.0.0/16"]),
            account("sv2", &[], &[Listener::Sv2], &[]),
            account("late", &["acme.x*"], &[], &[]),
        ])
        .unwrap();
        let o = from(Listener::Sv1, "10.7.3.4");
        assert_eq!(
            a.account_of("acme.x1", o),
            1,
            "first match wins over a later one"
        );
        assert_eq!(a.account_of("bob.1", o), 2, "source network");
        assert_eq!(a.account_of("bob.1", from(Listener::Sv2, "10.8.0.1")), 3);
        assert_eq!(
            a.account_of("bob.1", from(Listener::Sv1, "10.8.0.1")),
            DEFAULT_ACCOUNT
        );
        // An unknown origin matches only accounts that do not ask for one.
        assert_eq!(a.account_of("bob.1", Origin::default()), DEFAULT_ACCOUNT);
        assert_eq!(a.names(), ["default", "acme", "rack7", "sv2", "late"]);
        assert_eq!(a.index_of("rack7"), Some(2));
    }

    #[test]
    fn all_given_criteria_must_match() {
        let a =
            Accounts::new(&[account("x", &["a*"], &[Listener::Sv1], &["192.168.1.0/24"])]).unwrap();
        assert_eq!(a.account_of("a1", from(Listener::Sv1, "192.168.1.9")), 1);
        assert_eq!(a.account_of("b1", from(Listener::Sv1, "192.168.1.9")), 0);
        assert_eq!(a.account_of("a1", from(Listener::Sv2, "192.168.1.9")), 0);
        assert_eq!(a.account_of("a1", from(Listener::Sv1, "192.168.2.9")), 0);
        // A v4 miner on a dual-stack socket.
        assert_eq!(
            a.account_of("a1", from(Listener::Sv1, "::ffff:192.168.1.9")),
            1
        );
    }

    #[test]
    fn networks_parse_and_contain() {
        let n = Net::parse("fd00::/8").unwrap();
        assert!(n.contains("fd12::1".parse().unwrap()));
        assert!(!n.contains("fe80::1".parse().unwrap()));
        assert!(Net::parse("0.0.0.0/0")
            .unwrap()
            .contains("8.8.8.8".parse().unwrap()));
        assert!(Net::parse("10.0.0.1")
            .unwrap()
            .contains("10.0.0.1".parse().unwrap()));
        assert!(Net::parse("10.0.0.0/33").is_err());
        assert!(Net::parse("ten/8").is_err());
    }

    #[test]
    fn bad_accounts_are_refused_with_their_key() {
        let e = Accounts::new(&[account("default", &[], &[], &[])]).unwrap_err();
        assert_eq!(e.0, "accounts[0].name");
        let e = Accounts::new(&[account("a b", &[], &[], &[])]).unwrap_err();
        assert_eq!(e.0, "accounts[0].name");
        let e =
            Accounts::new(&[account("a", &[], &[], &[]), account("a", &[], &[], &[])]).unwrap_err();
        assert_eq!(e.0, "accounts[1].name");
        let e = Accounts::new(&[account("a", &[], &[], &["10.0.0.0/99"])]).unwrap_err();
        assert_eq!(e.0, "accounts[0].sources");
        let mut no_pools = account("a", &[], &[], &[]);
        no_pools.pools.clear();
        assert_eq!(
            Accounts::new(&[no_pools]).unwrap_err().0,
            "accounts[0].pools"
        );
    }

    #[test]
    fn globs() {
        assert!(glob("*", "a.b"));
        assert!(glob("site.s9-*", "site.s9-12"));
        assert!(!glob("site.s9-*", "site.s19-12"));
        assert!(glob("*-12", "site.s9-12"));
        assert!(glob("site.*-1*", "site.s9-12"));
        assert!(glob("exact", "exact"));
        assert!(!glob("exact", "exact2"));
    }

    #[test]
    fn debug_leaves_the_password_out() {
        let l = AccountLogin {
            user: "u".into(),
            password: "hunter2".into(),
        };
        assert!(!format!("{l:?}").contains("hunter2"));
    }
}
