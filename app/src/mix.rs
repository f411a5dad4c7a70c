//! The demo site's make-up, shared by `gridproxy demo` and `gridproxy
//! backtest`: its mix of firmwares, their control surfaces, and the price
//! trace it replays.

use gridproxy_curtail::fleet::ControlSurface;
use gridproxy_fixtures::site::Firmware;

/// The replayed trace: one line per 5-minute interval, `price[,event]`.
const TRACE: &str = include_str!("../assets/demo_trace.csv");

/// One interval of the trace.
#[derive(Debug, Clone, PartialEq)]
pub struct TraceStep {
    /// $/MWh.
    pub price: f64,
    /// A DR event issued at this interval: (limit as a fraction of nameplate,
    /// start after N intervals, length in intervals).
    pub dr: Option<(f64, u32, u32)>,
}

/// Parse the embedded trace (`price` or `price,dr:FRACTION:START:LEN` per line; `#` comments).
pub fn trace() -> Vec<TraceStep> {
    parse_trace(TRACE)
}

/// The control surface the engine drives for a firmware.
pub fn surface(f: Firmware) -> ControlSurface {
    match f {
        Firmware::LuxOs => ControlSurface::LuxOs,
        Firmware::BraiinsOs => ControlSurface::BraiinsOs,
        Firmware::Whatsminer => ControlSurface::Whatsminer,
        Firmware::Vnish => ControlSurface::Vnish,
        Firmware::Antminer => ControlSurface::AntminerStock,
        Firmware::Stock => ControlSurface::None,
    }
}

/// Parse the demo trace format (`price` or `price,dr:FRACTION:START:LEN`
/// per line; `#` comments).
pub fn parse_trace(text: &str) -> Vec<TraceStep> {
    let mut out = Vec::new();
    for line in text.lines() {
        let l = line.split('#').next().unwrap_or("").trim();
        let mut parts = l.split(',');
        let Some(price) = parts.next().and_then(|p| p.trim().parse::<f64>().ok()) else {
            continue;
        };
        let dr = parts.next().and_then(|e| {
            let f: Vec<&str> = e.trim().split(':').collect();
            (f.len() == 4 && f[0] == "dr").then(|| {
                (
                    f[1].parse().unwrap_or(0.5),
                    f[2].parse().unwrap_or(1),
                    f[3].parse().unwrap_or(6),
                )
            })
        });
        out.push(TraceStep { price, dr });
    }
    out
}

/// How many of `n` miners run each firmware (the demo's shares).
pub fn counts(n: usize) -> Vec<(Firmware, usize)> {
    let shares = [
        (Firmware::LuxOs, 0.24),
        (Firmware::BraiinsOs, 0.20),
        (Firmware::Whatsminer, 0.22),
        (Firmware::Vnish, 0.22),
        (Firmware::Stock, 0.12),
    ];
    let mut out: Vec<(Firmware, usize)> = shares
        .iter()
        .map(|(f, s)| (*f, (n as f64 * s).floor() as usize))
        .collect();
    let mut left = n - out.iter().map(|(_, c)| c).sum::<usize>();
    let mut i = 0;
    let len = out.len();
    while left > 0 {
        out[i % len].1 += 1;
        left -= 1;
        i += 1;
    }
    out.retain(|(_, c)| *c > 0);
    out
}
