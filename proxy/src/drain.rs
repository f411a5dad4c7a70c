//! The drain a restart goes through, as a plan with no I/O: what to wait
//! for next, given the time and what is still outstanding. [`crate::Proxy::drain`]
//! runs it; the tests here run it on made-up instants.
//!
//! 1. **Miners.** The listeners are closed (a new process on the same port
//!    gets every new connection) and every session is told to leave: SV1
//!    miners get `client.reconnect` (same endpoint), SV2 channels get
//!    `CloseChannel`. Shares that arrive meanwhile are still answered and
//!    forwarded. This phase ends when every session has ended, or after
//!    [`MINER_LINGER`] (at most half the grace): a miner that ignores the
//!    reconnect is then cut off, so the pools' answers still have time.
//! 2. **Pools.** No share can arrive any more; each upstream sends what is
//!    queued and waits for the pool's answer to every share it forwarded,
//!    then closes. This phase ends when every upstream has closed.
//! 3. Whatever is left when the grace runs out is stopped at once.

use std::time::Duration;
use tokio::time::Instant;

/// Longest time the miners are given to leave after being told to.
pub const MINER_LINGER: Duration = Duration::from_secs(10);

/// A draining upstream still owed answers gives up after hearing nothing
/// from its pool this long: a pool that batches its acknowledgements (SRI's
/// `share_batch_size`) sends no more once shares stop, and a restart should
/// not wait out the whole grace for them.
pub const POOL_QUIET: Duration = Duration::from_secs(5);

/// Where a drain is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Miners were told to leave; waiting for their sessions to end.
    Miners,
    /// Sessions are gone; waiting for the pools' answers.
    Pools,
    /// Everything answered and closed.
    Done,
    /// The grace ran out first.
    OutOfTime,
}

/// What the runner does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Wait for sessions to end, until this instant at the latest.
    WaitMiners(Instant),
    /// Stop the sessions still open (they had their time), then re-plan.
    CutMiners,
    /// Tell the upstreams to finish (once), and wait for them until this instant.
    WaitPools(Instant),
    /// Nothing is owed: stop everything.
    Finish,
    /// The grace is over: stop everything now, answered or not.
    GiveUp,
}

/// A drain's plan: the deadlines, and the phase reached.
#[derive(Debug, Clone)]
pub struct Drain {
    deadline: Instant,
    miners_until: Instant,
    phase: Phase,
}

impl Drain {
    /// A drain starting at `now` with `grace` in all.
    pub fn new(now: Instant, grace: Duration) -> Drain {
        Drain {
            deadline: now + grace,
            miners_until: now + MINER_LINGER.min(grace / 2),
            phase: Phase::Miners,
        }
    }

    /// The phase reached so far.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// When everything is stopped regardless.
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// The next step, given the time, the miner sessions still open and the
    /// upstreams still open (each ends once every share it forwarded has
    /// its answer).
    pub fn next(&mut self, now: Instant, sessions: usize, upstreams: usize) -> Step {
        if matches!(self.phase, Phase::Done | Phase::OutOfTime) {
            return if self.phase == Phase::Done {
                Step::Finish
            } else {
                Step::GiveUp
            };
        }
        if self.phase == Phase::Miners {
            if sessions > 0 {
                if now >= self.deadline {
                    self.phase = Phase::OutOfTime;
                    return Step::GiveUp;
                }
                if now >= self.miners_until {
                    // Cut them off; the next call finds no sessions.
                    return Step::CutMiners;
                }
                return Step::WaitMiners(self.miners_until);
            }
            self.phase = Phase::Pools;
        }
        if upstreams == 0 {
            self.phase = Phase::Done;
            return Step::Finish;
        }
        if now >= self.deadline {
            self.phase = Phase::OutOfTime;
            return Step::GiveUp;
        }
        Step::WaitPools(self.deadline)
    }
}

/// Whether an upstream that was told to drain may close: nothing is queued
/// for it and every share it sent has the pool's answer.
pub fn upstream_done(draining: bool, queued: usize, unanswered: usize) -> bool {
    draining && queued == 0 && unanswered == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn miners_then_pools_then_done() {
        let t0 = Instant::now();
        let mut d = Drain::new(t0, 30 * S);
        assert_eq!(d.next(t0, 1000, 1), Step::WaitMiners(t0 + MINER_LINGER));
        assert_eq!(d.phase(), Phase::Miners);
        // Miners gone before the linger: on to the pools at once.
        assert_eq!(d.next(t0 + 2 * S, 0, 1), Step::WaitPools(t0 + 30 * S));
        assert_eq!(d.phase(), Phase::Pools);
        assert_eq!(d.next(t0 + 3 * S, 0, 0), Step::Finish);
        assert_eq!(d.phase(), Phase::Done);
        // Done stays done.
        assert_eq!(d.next(t0 + 40 * S, 0, 0), Step::Finish);
    }

    #[test]
    fn miners_who_stay_are_cut_off_and_the_pools_keep_their_time() {
        let t0 = Instant::now();
        let mut d = Drain::new(t0, 30 * S);
        assert_eq!(d.next(t0 + MINER_LINGER, 3, 1), Step::CutMiners);
        assert_eq!(d.phase(), Phase::Miners);
        assert_eq!(
            d.next(t0 + MINER_LINGER, 0, 1),
            Step::WaitPools(t0 + 30 * S)
        );
    }

    #[test]
    fn a_short_grace_gives_the_miners_half() {
        let t0 = Instant::now();
        let mut d = Drain::new(t0, 4 * S);
        assert_eq!(d.next(t0, 1, 1), Step::WaitMiners(t0 + 2 * S));
        assert_eq!(d.next(t0 + 2 * S, 1, 1), Step::CutMiners);
    }

    #[test]
    fn the_grace_bounds_the_pools_wait() {
        let t0 = Instant::now();
        let mut d = Drain::new(t0, 10 * S);
        assert_eq!(d.next(t0, 0, 2), Step::WaitPools(t0 + 10 * S));
        assert_eq!(d.next(t0 + 10 * S, 0, 1), Step::GiveUp);
        assert_eq!(d.phase(), Phase::OutOfTime);
        assert_eq!(d.next(t0 + 11 * S, 0, 0), Step::GiveUp);
    }

    #[test]
    fn a_zero_grace_gives_up_at_once_if_anything_is_owed() {
        let t0 = Instant::now();
        assert_eq!(Drain::new(t0, Duration::ZERO).next(t0, 1, 0), Step::GiveUp);
        assert_eq!(Drain::new(t0, Duration::ZERO).next(t0, 0, 1), Step::GiveUp);
        assert_eq!(Drain::new(t0, Duration::ZERO).next(t0, 0, 0), Step::Finish);
    }

    #[test]
    fn an_upstream_closes_only_when_nothing_is_queued_or_unanswered() {
        assert!(!upstream_done(false, 0, 0), "not before it is told");
        assert!(!upstream_done(true, 1, 0), "a queued share is still sent");
        assert!(
            !upstream_done(true, 0, 1),
            "a sent share is still owed its answer"
        );
        assert!(upstream_done(true, 0, 0));
    }
}
