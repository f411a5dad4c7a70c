//! Extranonce prefix allocation inside one upstream channel.
//!
//! An upstream extended channel gives us an extranonce prefix and a number of
//! bytes we may roll. We split those bytes into a per-miner part (unique per
//! connected miner, reused after it disconnects) and the miner's own
//! extranonce2 (4–8 bytes: longer breaks some firmware). A miner's SV1
//! extranonce1 is `upstream prefix ‖ miner part`.

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
    /// Released slots, oldest first: reusing the oldest keeps a just-freed
    /// prefix (whose miner may still have shares in flight) out of use longest.
    free: std::collections::VecDeque<u64>,
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
            in_use: 0,
        })
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

    /// Allocate a slot, reusing released ones first.
    pub fn allocate(&mut self) -> Result<Slot, ExtranonceError> {
        let index = match self.free.pop_front() {
            Some(i) => i,
            None if self.next < self.capacity => {
                self.next += 1;
                self.next - 1
            }
            None => return Err(ExtranonceError::Exhausted(self.capacity)),
        };
        self.in_use += 1;
        Ok(Slot {
            index,
            prefix: self.prefix_for(index),
        })
    }

    /// Return a slot. Releasing a slot twice or a foreign one is ignored.
    pub fn release(&mut self, slot: &Slot) {
        if slot.index < self.next && !self.free.contains(&slot.index) {
            self.free.push_back(slot.index);
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
    fn unique_and_reusable() {
        let mut a = ExtranonceAllocator::new(vec![0xab, 0xcd], 6, 2, 4).unwrap();
        assert_eq!(a.extranonce2_size(), 4);
        assert_eq!(a.prefix_len(), 4);
        let slots: Vec<_> = (0..1000).map(|_| a.allocate().unwrap()).collect();
        let uniq: HashSet<_> = slots.iter().map(|s| s.prefix.clone()).collect();
        assert_eq!(uniq.len(), 1000);
        assert!(slots.iter().all(|s| s.prefix.starts_with(&[0xab, 0xcd])));
        assert_eq!(slots[1].prefix, vec![0xab, 0xcd, 0, 1]);
        a.release(&slots[7]);
        a.release(&slots[7]);
        assert_eq!(a.in_use(), 999);
        assert_eq!(a.allocate().unwrap().prefix, slots[7].prefix);
        // The oldest released slot is reused first.
        a.release(&slots[3]);
        a.release(&slots[5]);
        assert_eq!(a.allocate().unwrap().prefix, slots[3].prefix);
        assert_eq!(a.allocate().unwrap().prefix, slots[5].prefix);
    }

    #[test]
    fn exhaustion_and_too_small() {
        let mut a = ExtranonceAllocator::new(vec![], 5, 1, 4).unwrap();
        for _ in 0..256 {
            a.allocate().unwrap();
        }
        assert_eq!(a.allocate(), Err(ExtranonceError::Exhausted(256)));
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
        let s = a.allocate().unwrap();
        assert_eq!(s.prefix.len(), 16);
    }
}
