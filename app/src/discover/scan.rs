//! The ranges to sweep and the sweep itself: at most `concurrency` hosts at
//! once, each under its own deadline, with a progress line on stderr.

use std::io::{IsTerminal, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use ipnet::IpNet;

use super::identify::{self, Found, ProbeConfig};

/// Hosts probed at once by default.
pub const DEFAULT_CONCURRENCY: usize = 64;
/// Most hosts probed at once (each holds up to five sockets).
pub const MAX_CONCURRENCY: usize = 1024;
/// Per-host deadline by default.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(3000);
/// Most addresses swept without `--force` (a /16).
pub const MAX_HOSTS: u128 = 1 << 16;
/// Most addresses swept even with `--force` (a /8).
pub const MAX_HOSTS_FORCED: u128 = 1 << 24;

/// The addresses to sweep: CIDR ranges, overlaps merged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ranges {
    nets: Vec<IpNet>,
    total: u64,
}

fn size(n: &IpNet) -> u128 {
    let bits = u32::from(n.max_prefix_len() - n.prefix_len());
    1u128.checked_shl(bits).unwrap_or(u128::MAX)
}

impl Ranges {
    /// Parse `10.0.0.0/24`, `fd00::/120` or a bare address (a /32 or
    /// /128). Refuses more than [`MAX_HOSTS`] addresses in all unless
    /// `force` (then up to [`MAX_HOSTS_FORCED`]).
    pub fn parse<S: AsRef<str>>(args: &[S], force: bool) -> Result<Ranges, String> {
        if args.is_empty() {
            return Err(
                "give at least one range: a CIDR such as 192.168.1.0/24, or an address".into(),
            );
        }
        let mut nets = Vec::with_capacity(args.len());
        for a in args {
            let a = a.as_ref().trim();
            let net = if a.contains('/') {
                a.parse::<IpNet>().map_err(|_| {
                    format!(
                        "{a:?} is not a CIDR range (expected e.g. 192.168.1.0/24 or fd00::/120)"
                    )
                })?
            } else {
                IpNet::from(a.parse::<IpAddr>().map_err(|_| {
                    format!(
                        "{a:?} is not an IP address or a CIDR range (host names are not scanned)"
                    )
                })?)
            };
            nets.push(net.trunc());
        }
        let nets = IpNet::aggregate(&nets);
        let total = nets.iter().map(size).fold(0u128, u128::saturating_add);
        let limit = if force { MAX_HOSTS_FORCED } else { MAX_HOSTS };
        if total > limit {
            let how = if force {
                "even with --force".to_owned()
            } else {
                "without --force (a /16 at most)".to_owned()
            };
            return Err(format!(
                "{} addresses is more than the {limit} allowed {how}: give narrower ranges",
                if total == u128::MAX {
                    "2^128".to_owned()
                } else {
                    total.to_string()
                }
            ));
        }
        Ok(Ranges {
            nets,
            total: total as u64,
        })
    }

    /// How many addresses.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// Every address of every range, network and broadcast addresses
    /// included (the caller asked for the range; they cost one refused
    /// connect each).
    pub fn addresses(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.nets
            .iter()
            .flat_map(|n| -> Box<dyn Iterator<Item = IpAddr>> {
                match n {
                    IpNet::V4(v) => {
                        let (a, b) = (u32::from(v.network()), u32::from(v.broadcast()));
                        Box::new((a..=b).map(|x| IpAddr::V4(Ipv4Addr::from(x))))
                    }
                    IpNet::V6(v) => {
                        let (a, b) = (u128::from(v.network()), u128::from(v.broadcast()));
                        Box::new((a..=b).map(|x| IpAddr::V6(Ipv6Addr::from(x))))
                    }
                }
            })
    }
}

/// How to sweep.
#[derive(Clone)]
pub struct Options {
    /// Hosts probed at once (1..=[`MAX_CONCURRENCY`]).
    pub concurrency: usize,
    /// Per-host deadline (each probe gets half of it).
    pub timeout: Duration,
    /// Braiins OS `root` password (read from the environment by the CLI).
    pub braiins_password: Option<String>,
    /// Print progress on stderr.
    pub progress: bool,
}

impl std::fmt::Debug for Options {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Options")
            .field("concurrency", &self.concurrency)
            .field("timeout", &self.timeout)
            .field(
                "braiins_password",
                &self.braiins_password.as_ref().map(|_| "<redacted>"),
            )
            .field("progress", &self.progress)
            .finish()
    }
}

impl Default for Options {
    fn default() -> Self {
        Options {
            concurrency: DEFAULT_CONCURRENCY,
            timeout: DEFAULT_TIMEOUT,
            braiins_password: None,
            progress: false,
        }
    }
}

/// What a sweep found.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// Miners found, by address.
    pub found: Vec<Found>,
    /// Addresses probed.
    pub probed: u64,
    /// Wall time of the sweep.
    pub elapsed: Duration,
}

struct Progress {
    total: u64,
    probed: AtomicU64,
    found: AtomicU64,
}

impl Progress {
    fn line(&self) -> String {
        format!(
            "discover: {}/{} hosts probed, {} miners found",
            self.probed.load(Ordering::Relaxed),
            self.total,
            self.found.load(Ordering::Relaxed)
        )
    }
}

/// Sweep `ranges`.
pub async fn run(ranges: &Ranges, opts: &Options) -> Outcome {
    let start = Instant::now();
    let progress = Arc::new(Progress {
        total: ranges.total(),
        probed: AtomicU64::new(0),
        found: AtomicU64::new(0),
    });
    // One updating line on a terminal; a line every 5 s in a log.
    let tty = std::io::stderr().is_terminal();
    let reporter = opts.progress.then(|| {
        let p = progress.clone();
        tokio::spawn(async move {
            let every = if tty {
                Duration::from_millis(250)
            } else {
                Duration::from_secs(5)
            };
            let mut tick = tokio::time::interval(every);
            tick.tick().await;
            loop {
                tick.tick().await;
                let mut e = std::io::stderr().lock();
                let _ = if tty {
                    write!(e, "\r{}", p.line())
                } else {
                    writeln!(e, "{}", p.line())
                };
            }
        })
    });
    let cfg = ProbeConfig {
        timeout: opts.timeout / 2,
        braiins_password: opts.braiins_password.clone(),
    };
    let deadline = opts.timeout;
    let concurrency = opts.concurrency.clamp(1, MAX_CONCURRENCY);
    let mut found: Vec<Found> = futures::stream::iter(ranges.addresses())
        .map(|ip| {
            let (cfg, p) = (&cfg, &progress);
            async move {
                let r = tokio::time::timeout(deadline, identify::host(ip, cfg))
                    .await
                    .ok()
                    .flatten();
                p.probed.fetch_add(1, Ordering::Relaxed);
                if r.is_some() {
                    p.found.fetch_add(1, Ordering::Relaxed);
                }
                r
            }
        })
        .buffer_unordered(concurrency)
        .filter_map(futures::future::ready)
        .collect()
        .await;
    if let Some(r) = reporter {
        r.abort();
    }
    found.sort_by_key(|f| f.ip);
    let elapsed = start.elapsed();
    if opts.progress {
        let mut e = std::io::stderr().lock();
        let _ = writeln!(
            e,
            "{}{} in {:.1} s",
            if tty { "\r" } else { "" },
            progress.line(),
            elapsed.as_secs_f64()
        );
    }
    Outcome {
        probed: progress.probed.load(Ordering::Relaxed),
        found,
        elapsed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_parse_count_merge_and_refuse() {
        let r = Ranges::parse(&["127.0.0.0/27"], false).unwrap();
        assert_eq!(r.total(), 32);
        let a: Vec<_> = r.addresses().collect();
        assert_eq!(a.first().unwrap().to_string(), "127.0.0.0");
        assert_eq!(a.last().unwrap().to_string(), "127.0.0.31");
        // A bare address is one host; overlaps are merged; v6 works.
        let r = Ranges::parse(
            &["10.0.0.7", "10.0.0.0/30", "10.0.0.2", "::1", "fd00::/126"],
            false,
        )
        .unwrap();
        assert_eq!(r.total(), 4 + 1 + 1 + 4);
        assert!(r.addresses().any(|a| a.to_string() == "::1"));
        // Host bits are dropped, as a router would.
        assert_eq!(Ranges::parse(&["10.1.2.3/24"], false).unwrap().total(), 256);
        // Too large without --force, and even with it past a /8.
        let e = Ranges::parse(&["10.0.0.0/15"], false).unwrap_err();
        assert!(e.contains("--force"), "{e}");
        assert_eq!(
            Ranges::parse(&["10.0.0.0/15"], true).unwrap().total(),
            1 << 17
        );
        assert!(Ranges::parse(&["10.0.0.0/7"], true).is_err());
        assert!(Ranges::parse(&["fd00::/64"], true).is_err());
        assert!(Ranges::parse(&["::/0"], true).is_err());
        // Bad input is a clear error.
        assert!(Ranges::parse(&["miner.local"], false)
            .unwrap_err()
            .contains("not an IP"));
        assert!(Ranges::parse(&["10.0.0.0/33"], false)
            .unwrap_err()
            .contains("CIDR"));
        assert!(Ranges::parse::<&str>(&[], false).is_err());
    }

    #[test]
    fn the_password_stays_out_of_debug() {
        let o = Options {
            braiins_password: Some("hunter2-secret".into()),
            ..Options::default()
        };
        let d = format!("{o:?}");
        assert!(!d.contains("hunter2") && d.contains("<redacted>"), "{d}");
    }

    #[tokio::test]
    async fn nothing_listening_finds_nothing_quickly() {
        // 127.0.0.200/30 on loopback: nothing listens on the miner ports.
        let r = Ranges::parse(&["127.0.0.200/30"], false).unwrap();
        let out = run(&r, &Options::default()).await;
        assert_eq!(out.probed, 4);
        assert!(out.found.is_empty());
        assert!(out.elapsed < Duration::from_secs(3), "{:?}", out.elapsed);
    }
}
