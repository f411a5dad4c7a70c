//! Wall-clock timestamps passed into the engine by its caller.
//!
//! The policy engine never reads a clock. Its caller (the edge task that owns
//! the engine) reads one and passes `now` into every `handle_*`/`poll_*` call.
//! Timestamps are milliseconds since the Unix epoch rather than
//! [`std::time::Instant`] because they are also written to the ledger, compared
//! with DR event windows sent by utilities, and must mean the same thing after
//! a restart.
//!
//! The clocks the edge tasks read live here too: [`SystemClock`] in
//! production, [`ScaledClock`] for site time run faster than real time, both
//! [`EdgeClock`]s (a clock the driver can also sleep on).

use std::fmt;
use std::ops::{Add, Sub};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A point in time: milliseconds since 1970-01-01T00:00:00Z.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Timestamp(u64);

impl Timestamp {
    /// The epoch itself.
    pub const ZERO: Timestamp = Timestamp(0);

    /// A timestamp `ms` milliseconds after the epoch.
    pub const fn from_millis(ms: u64) -> Self {
        Timestamp(ms)
    }

    /// A timestamp `s` seconds after the epoch.
    pub const fn from_secs(s: u64) -> Self {
        Timestamp(s.saturating_mul(1000))
    }

    /// RFC 3339 in UTC with milliseconds (`2026-12-07T10:00:00.250Z`), for
    /// reports people read; a time past year 9999 is written as its millis.
    pub fn to_rfc3339(self) -> String {
        i64::try_from(self.0)
            .ok()
            .and_then(|ms| jiff::Timestamp::from_millisecond(ms).ok())
            .map(|t| format!("{t:.3}"))
            .unwrap_or_else(|| format!("{self} (out of range)"))
    }

    /// Milliseconds since the epoch.
    pub const fn as_millis(self) -> u64 {
        self.0
    }

    /// Time elapsed from `earlier` to `self`, zero if `earlier` is later.
    pub fn saturating_since(self, earlier: Timestamp) -> Duration {
        Duration::from_millis(self.0.saturating_sub(earlier.0))
    }

    /// `self + d`, saturating at the far end of time.
    pub fn saturating_add(self, d: Duration) -> Timestamp {
        Timestamp(self.0.saturating_add(duration_ms(d)))
    }

    /// `self - d`, saturating at the epoch.
    pub fn saturating_sub(self, d: Duration) -> Timestamp {
        Timestamp(self.0.saturating_sub(duration_ms(d)))
    }
}

/// Whole milliseconds in `d`, saturating.
pub(crate) fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Add<Duration> for Timestamp {
    type Output = Timestamp;
    fn add(self, d: Duration) -> Timestamp {
        self.saturating_add(d)
    }
}

impl Sub<Duration> for Timestamp {
    type Output = Timestamp;
    fn sub(self, d: Duration) -> Timestamp {
        self.saturating_sub(d)
    }
}

impl Sub<Timestamp> for Timestamp {
    type Output = Duration;
    /// Saturating: a later `rhs` gives zero.
    fn sub(self, rhs: Timestamp) -> Duration {
        self.saturating_since(rhs)
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{:03}", self.0 / 1000, self.0 % 1000)
    }
}

/// A source of `now` for the edge tasks that drive the engine.
///
/// Tests substitute a virtual clock; production uses [`SystemClock`]. The
/// policy engine itself never holds a `Clock`.
pub trait Clock {
    /// The current time.
    fn now(&self) -> Timestamp;
}

/// The operating system's wall clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        let d = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        Timestamp(duration_ms(d))
    }
}

/// A [`Clock`] the driver can also sleep on.
pub trait EdgeClock: Clock + Send + Sync + 'static {
    /// How much real time `d` of this clock's time takes.
    fn real(&self, d: Duration) -> Duration;
}

impl EdgeClock for SystemClock {
    fn real(&self, d: Duration) -> Duration {
        d
    }
}

/// Site time running `speed` times faster than the wall clock, anchored so
/// that wall time `wall_origin` is site time `origin`.
///
/// Built from wall-clock time (not a process-local `Instant`), so separate
/// processes given the same anchor agree on the time, and a restarted
/// process continues where the killed one was.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ScaledClock {
    origin: Timestamp,
    wall_origin: Timestamp,
    speed: f64,
}

impl ScaledClock {
    /// Site time equal to wall time now, running `speed` times faster from
    /// here. `speed` must be finite and > 0 (else 1.0 is used).
    pub fn new(speed: f64) -> ScaledClock {
        let now = SystemClock.now();
        ScaledClock::anchored(now, now, speed)
    }

    /// Site time `origin` at wall time `wall_origin`, running `speed` times
    /// faster than the wall clock.
    pub fn anchored(origin: Timestamp, wall_origin: Timestamp, speed: f64) -> ScaledClock {
        let speed = if speed.is_finite() && speed > 0.0 {
            speed
        } else {
            1.0
        };
        ScaledClock {
            origin,
            wall_origin,
            speed,
        }
    }

    /// Site time at the anchor.
    pub fn origin(&self) -> Timestamp {
        self.origin
    }

    /// Wall time at the anchor.
    pub fn wall_origin(&self) -> Timestamp {
        self.wall_origin
    }

    /// Site seconds per wall second.
    pub fn speed(&self) -> f64 {
        self.speed
    }
}

impl Clock for ScaledClock {
    fn now(&self) -> Timestamp {
        let wall = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let since = wall.saturating_sub(Duration::from_millis(self.wall_origin.as_millis()));
        self.origin + since.mul_f64(self.speed)
    }
}

impl EdgeClock for ScaledClock {
    fn real(&self, d: Duration) -> Duration {
        d.div_f64(self.speed)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn rfc3339_is_utc_with_millis() {
        use super::Timestamp;
        assert_eq!(
            Timestamp::from_millis(0).to_rfc3339(),
            "1970-01-01T00:00:00.000Z"
        );
        assert_eq!(
            Timestamp::from_millis(1_796_637_600_250).to_rfc3339(),
            "2026-12-07T10:00:00.250Z"
        );
        assert!(Timestamp::from_millis(u64::MAX)
            .to_rfc3339()
            .contains("out of range"));
    }

    use super::*;

    #[test]
    fn arithmetic_saturates() {
        let t = Timestamp::from_secs(10);
        assert_eq!(
            t + Duration::from_millis(1500),
            Timestamp::from_millis(11_500)
        );
        assert_eq!(t - Duration::from_secs(20), Timestamp::ZERO);
        assert_eq!(Timestamp::from_secs(5) - t, Duration::ZERO);
        assert_eq!(t - Timestamp::from_secs(4), Duration::from_secs(6));
        assert_eq!(t.to_string(), "10.000");
    }

    #[test]
    fn scaled_clock_runs_fast_and_converts_back() {
        let c = ScaledClock::anchored(Timestamp::from_secs(1000), SystemClock.now(), 10.0);
        assert!(c.now() >= Timestamp::from_secs(1000));
        assert_eq!(c.real(Duration::from_secs(10)), Duration::from_secs(1));
        let again = ScaledClock::anchored(c.origin(), c.wall_origin(), c.speed());
        let (a, b) = (c.now(), again.now());
        assert!(b.saturating_since(a) < Duration::from_millis(500));
    }
}
