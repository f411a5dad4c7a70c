//! Extranonce prefix allocation inside one upstream channel.
//!
//! An upstream extended channel gives us an extranonce prefix and a number of
//! bytes we may roll. We split those bytes into a per-miner part (unique per
//! connected miner; fresh parts first, a released one only after a
//! quarantine, so a newcomer never repeats a just-departed miner's work on
//! a job that is still open) and the miner's own
//! extranonce2 (4–8 bytes: longer breaks some firmware). A miner's SV1
//! extranonce1 is `upstream prefix ‖ miner part`.

use std::time::{Duration, Instant};

/// Default rest of a released slot: ten minutes, past the life of a job (a
/// block interval on average).
pub const DEFAULT_QUARANTINE: Duration = Duration::from_secs(600);

/// Why an allocator cannot be built or cannot allocate.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ExtranonceError {
    /// The channel's rollable bytes cannot hold the miner part and extranonce2.
    #[error("upstream leaves {available} extranonce bytes; need {miner_part} for miners + {extranonce2} for extranonce2")]
    TooSmall {
        /// bytes the upstream channel lets us roll
        available: usize,
        /// bytes reserved to tell miners apart
        miner_part: usize,
        /// bytes each miner rolls
        extranonce2: usize,
    },
    /// Every miner slot of this channel is in use.
    #[error("all {0} miner slots of this channel are in use")]
    Exhausted(u64),
    /// Every free slot was released too recently to be handed out again.
    #[error("all {0} free miner slots of this channel are in quarantine (released too recently)")]
    Quarantined(u64),
}

/// One miner's allocated slot.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Slot {
    index: u64,
    /// Full prefix handed to the miner (SV1 extranonce1 / SV2 extranonce_prefix).
    pub prefix: Vec<u8>,
}

impl Slot {
    /// The slot's index inside the channel.
    pub fn index(&self) -> u64 {
        self.index
    }
}

/// Hands out unique miner parts; a pure data structure, O(1) per call.
#[derive(Debug, Clone)]
pub struct ExtranonceAllocator {
    upstream_prefix: Vec<u8>,
    miner_part: usize,
    extranonce2: usize,
    capacity: u64,
    next: u64,
    /// Released slots with their release time, oldest first.
    free: std::collections::VecDeque<(u64, Instant)>,
    /// The same indices, for O(1) double-release checks.
    free_set: std::collections::HashSet<u64>,
    /// How long a released slot rests before it is handed out again.
    quarantine: Duration,
    in_use: u64,
}

impl ExtranonceAllocator {
    /// Split `rollable` bytes after `upstream_prefix` into `miner_part` bytes
    /// per miner and `extranonce2` bytes for the miner. Any bytes left over are
    /// given to the miner part, so `extranonce2` is exactly what miners roll.
    pub fn new(
        upstream_prefix: Vec<u8>,
        rollable: usize,
        miner_part: usize,
        extranonce2: usize,
    ) -> Result<Self, ExtranonceError> {
        if miner_part + extranonce2 > rollable {
            return Err(ExtranonceError::TooSmall {
                available: rollable,
                miner_part,
                extranonce2,
            });
        }
        let miner_part = rollable - extranonce2;
        // Capacity is bounded by what a u64 index can express.
        let capacity = if miner_part >= 8 {
            u64::MAX
        } else {
            1u64 << (8 * miner_part)
        };
        Ok(Self {
            upstream_prefix,
            miner_part,
            extranonce2,
            capacity,
            next: 0,
            free: std::collections::VecDeque::new(),
            free_set: std::collections::HashSet::new(),
            quarantine: DEFAULT_QUARANTINE,
            in_use: 0,
        })
    }

    /// How long a released slot rests before reuse (default
    /// [`DEFAULT_QUARANTINE`]): longer than a job lives, so shares of the
    /// old and the new holder can never collide on the same job.
    pub fn with_quarantine(mut self, quarantine: Duration) -> Self {
        self.quarantine = quarantine;
        self
    }

    /// Bytes each miner rolls (its extranonce2 size).
    pub fn extranonce2_size(&self) -> usize {
        self.extranonce2
    }

    /// Length of the full prefix a miner gets.
    pub fn prefix_len(&self) -> usize {
        self.upstream_prefix.len() + self.miner_part
    }

    /// Miners currently holding a slot.
    pub fn in_use(&self) -> u64 {
        self.in_use
    }

    /// Allocate a slot at `now`: a never-used one while any remain, else the
    /// oldest released one whose quarantine has passed.
    pub fn allocate(&mut self, now: Instant) -> Result<Slot, ExtranonceError> {
        let index = if self.next < self.capacity {
            self.next += 1;
            self.next - 1
        } else {
            match self.free.front() {
                Some(&(i, at)) if now.saturating_duration_since(at) >= self.quarantine => {
                    self.free.pop_front();
                    self.free_set.remove(&i);
                    i
                }
                Some(_) => return Err(ExtranonceError::Quarantined(self.free.len() as u64)),
                None => return Err(ExtranonceError::Exhausted(self.capacity)),
            }
        };
        self.in_use += 1;
        Ok(Slot {
            index,
            prefix: self.prefix_for(index),
        })
    }

    /// Return a slot at `now`. Releasing a slot twice or a foreign one is
    /// ignored.
    pub fn release(&mut self, slot: &Slot, now: Instant) {
        if slot.index < self.next && self.free_set.insert(slot.index) {
            self.free.push_back((slot.index, now));
            self.in_use -= 1;
        }
    }

    /// The full prefix for a slot index (big-endian miner part).
    pub fn prefix_for(&self, index: u64) -> Vec<u8> {
        let mut p = Vec::with_capacity(self.prefix_len());
        p.extend_from_slice(&self.upstream_prefix);
        let be = index.to_be_bytes();
        if self.miner_part >= 8 {
            p.resize(p.len() + self.miner_part - 8, 0);
            p.extend_from_slice(&be);
        } else {
            p.extend_from_slice(&be[8 - self.miner_part..]);
        }
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn unique_and_fresh_slots_first() {
        let t0 = Instant::now();
        let mut a = ExtranonceAllocator::new(vec![0xab, 0xcd], 6, 2, 4).unwrap();
        assert_eq!(a.extranonce2_size(), 4);
        assert_eq!(a.prefix_len(), 4);
        let slots: Vec<_> = (0..1000).map(|_| a.allocate(t0).unwrap()).collect();
        let uniq: HashSet<_> = slots.iter().map(|s| s.prefix.clone()).collect();
        assert_eq!(uniq.len(), 1000);
        assert!(slots.iter().all(|s| s.prefix.starts_with(&[0xab, 0xcd])));
        assert_eq!(slots[1].prefix, vec![0xab, 0xcd, 0, 1]);
        a.release(&slots[7], t0);
        a.release(&slots[7], t0);
        assert_eq!(a.in_use(), 999);
        // A miner that connects right after another left does not get its
        // prefix back: fresh slots come first.
        let next = a.allocate(t0).unwrap();
        assert_ne!(next.prefix, slots[7].prefix);
        assert_eq!(next.index(), 1000);
    }

    #[test]
    fn released_slots_rest_before_reuse_oldest_first() {
        let t0 = Instant::now();
        let q = Duration::from_secs(600);
        let mut a = ExtranonceAllocator::new(vec![], 5, 1, 4)
            .unwrap()
            .with_quarantine(q);
        let slots: Vec<_> = (0..256).map(|_| a.allocate(t0).unwrap()).collect();
        assert_eq!(a.allocate(t0), Err(ExtranonceError::Exhausted(256)));
        a.release(&slots[3], t0);
        a.release(&slots[5], t0 + Duration::from_secs(60));
        // Both in quarantine: refused, not reused.
        assert_eq!(
            a.allocate(t0 + Duration::from_secs(599)),
            Err(ExtranonceError::Quarantined(2))
        );
        // The oldest comes out first, once rested; the younger one waits.
        assert_eq!(a.allocate(t0 + q).unwrap().index(), 3);
        assert_eq!(a.allocate(t0 + q), Err(ExtranonceError::Quarantined(1)));
        assert_eq!(
            a.allocate(t0 + q + Duration::from_secs(60))
                .unwrap()
                .index(),
            5
        );
    }

    #[test]
    fn release_is_constant_time_at_scale() {
        // 65,536 slots released and double-released: with a linear scan of
        // the free list this is ~2 billion comparisons; with the set, instant.
        let t0 = Instant::now();
        let mut a = ExtranonceAllocator::new(vec![], 6, 2, 4).unwrap();
        let slots: Vec<_> = (0..65_536).map(|_| a.allocate(t0).unwrap()).collect();
        for s in slots.iter().chain(slots.iter()) {
            a.release(s, t0);
        }
        assert_eq!(a.in_use(), 0);
    }

    #[test]
    fn exhaustion_and_too_small() {
        let t0 = Instant::now();
        let mut a = ExtranonceAllocator::new(vec![], 5, 1, 4).unwrap();
        for _ in 0..256 {
            a.allocate(t0).unwrap();
        }
        assert_eq!(a.allocate(t0), Err(ExtranonceError::Exhausted(256)));
        assert!(matches!(
            ExtranonceAllocator::new(vec![], 4, 1, 4),
            Err(ExtranonceError::TooSmall { .. })
        ));
    }

    #[test]
    fn leftover_bytes_go_to_miner_part() {
        // SRI pools commonly give 16+ rollable bytes; miners still roll 4.
        let mut a = ExtranonceAllocator::new(vec![1; 4], 16, 2, 4).unwrap();
        assert_eq!(a.prefix_len(), 16);
        assert_eq!(a.extranonce2_size(), 4);
        let s = a.allocate(Instant::now()).unwrap();
        assert_eq!(s.prefix.len(), 16);
    }
}
