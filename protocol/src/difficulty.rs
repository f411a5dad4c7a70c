//! Difficulty ↔ target math on 256-bit targets.
//!
//! A [`Target`] is the 256-bit threshold a block hash (read as a little-endian
//! integer, as Bitcoin does) must not exceed. Pool difficulty 1 is the
//! "bdiff" target `0x00000000FFFF0000…0` (= 0xFFFF · 2^208).

use std::cmp::Ordering;
use std::fmt;

/// A 256-bit unsigned target, stored as four little-endian `u64` limbs.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Target([u64; 4]);

/// Difficulty-1 target (bdiff): 0xFFFF << 208.
pub const DIFF1: Target = Target([0, 0, 0, 0x0000_0000_FFFF_0000]);

impl Target {
    /// The largest possible target (every hash meets it).
    pub const MAX: Target = Target([u64::MAX; 4]);

    /// From 32 little-endian bytes (the SV2 wire form of a target, and the byte
    /// order a sha256d output is compared in).
    pub fn from_le_bytes(b: [u8; 32]) -> Self {
        let mut l = [0u64; 4];
        for (i, limb) in l.iter_mut().enumerate() {
            *limb = u64::from_le_bytes(b[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
        }
        Target(l)
    }

    /// To 32 little-endian bytes.
    pub fn to_le_bytes(self) -> [u8; 32] {
        let mut b = [0u8; 32];
        for (i, limb) in self.0.iter().enumerate() {
            b[i * 8..i * 8 + 8].copy_from_slice(&limb.to_le_bytes());
        }
        b
    }

    /// From the compact `nBits` encoding of a block header. Negative or
    /// overflowing encodings saturate to zero / [`Target::MAX`].
    pub fn from_compact(nbits: u32) -> Self {
        let exp = nbits >> 24;
        let mant = (nbits & 0x007f_ffff) as u64;
        if nbits & 0x0080_0000 != 0 || mant == 0 {
            return Target::default();
        }
        if exp <= 3 {
            return Target([mant >> (8 * (3 - exp)), 0, 0, 0]);
        }
        let shift = 8 * (exp - 3);
        if shift + 23 > 256 {
            return Target::MAX;
        }
        Target([mant, 0, 0, 0]).shl(shift)
    }

    /// True when a sha256d hash (32 bytes as produced) is at or below this target.
    #[inline]
    pub fn is_met_by(&self, hash: &[u8; 32]) -> bool {
        Target::from_le_bytes(*hash) <= *self
    }

    fn shl(self, s: u32) -> Self {
        if s >= 256 {
            return Target::default();
        }
        let (limbs, bits) = ((s / 64) as usize, s % 64);
        let mut r = [0u64; 4];
        for i in (limbs..4).rev() {
            let src = i - limbs;
            r[i] = self.0[src] << bits;
            if bits > 0 && src > 0 {
                r[i] |= self.0[src - 1] >> (64 - bits);
            }
        }
        Target(r)
    }

    fn shr(self, s: u32) -> Self {
        if s >= 256 {
            return Target::default();
        }
        let (limbs, bits) = ((s / 64) as usize, s % 64);
        let mut r = [0u64; 4];
        for (i, out) in r.iter_mut().enumerate().take(4 - limbs) {
            let src = i + limbs;
            *out = self.0[src] >> bits;
            if bits > 0 && src + 1 < 4 {
                *out |= self.0[src + 1] << (64 - bits);
            }
        }
        Target(r)
    }

    fn div_u64(self, d: u64) -> Self {
        let mut r = [0u64; 4];
        let mut rem: u128 = 0;
        for i in (0..4).rev() {
            let cur = (rem << 64) | self.0[i] as u128;
            r[i] = (cur / d as u128) as u64;
            rem = cur % d as u128;
        }
        Target(r)
    }

    /// Approximate value as f64 (for difficulty display and vardiff).
    pub fn to_f64(&self) -> f64 {
        self.0
            .iter()
            .rev()
            .fold(0.0, |acc, &l| acc * 18_446_744_073_709_551_616.0 + l as f64)
    }

    /// The target for a pool difficulty (`DIFF1 / difficulty`). Difficulties
    /// at or below zero or not finite give [`Target::MAX`]-like easy targets.
    pub fn from_difficulty(difficulty: f64) -> Self {
        if !(difficulty.is_finite() && difficulty > 0.0) {
            return Target::MAX;
        }
        // difficulty = m · 2^e with an integer mantissa of at most 53 bits, and
        // DIFF1 = 0xFFFF · 2^208, so target = 0xFFFF · 2^(208 − e) / m, exactly.
        let (m, e) = decompose(difficulty);
        if e <= 208 {
            div_shifted(0xFFFF, (208 - e) as u32, m)
        } else {
            DIFF1.shr(e as u32).div_u64(m)
        }
    }

    /// The pool difficulty this target corresponds to (`DIFF1 / target`).
    pub fn to_difficulty(&self) -> f64 {
        let t = self.to_f64();
        if t == 0.0 {
            return f64::INFINITY;
        }
        DIFF1.to_f64() / t
    }
}

/// floor(a · 2^shift / m), saturating at [`Target::MAX`]; long division by
/// 64-bit limbs so no intermediate exceeds 128 bits.
fn div_shifted(a: u64, shift: u32, m: u64) -> Target {
    let (limbs, bits) = ((shift / 64) as usize, shift % 64);
    let top = (a as u128) << bits;
    let mut num = vec![(top >> 64) as u64, top as u64];
    num.extend(std::iter::repeat_n(0u64, limbs));
    let mut q = Vec::with_capacity(num.len());
    let mut rem: u128 = 0;
    for limb in num {
        let cur = (rem << 64) | limb as u128;
        q.push((cur / m as u128) as u64);
        rem = cur % m as u128;
    }
    // q is big-endian by limb; anything above 256 bits saturates.
    let n = q.len();
    if n > 4 && q[..n - 4].iter().any(|&l| l != 0) {
        return Target::MAX;
    }
    let mut t = [0u64; 4];
    for (i, limb) in q.iter().rev().take(4).enumerate() {
        t[i] = *limb;
    }
    Target(t)
}

/// Split a positive finite f64 into (odd-free integer mantissa, exponent).
fn decompose(x: f64) -> (u64, i32) {
    let bits = x.to_bits();
    let exp = ((bits >> 52) & 0x7ff) as i32;
    let frac = bits & ((1u64 << 52) - 1);
    let (mut m, mut e) = if exp == 0 {
        (frac, -1074)
    } else {
        (frac | (1u64 << 52), exp - 1075)
    };
    let tz = m.trailing_zeros();
    m >>= tz;
    e += tz as i32;
    (m, e)
}

impl Ord for Target {
    fn cmp(&self, other: &Self) -> Ordering {
        for i in (0..4).rev() {
            match self.0[i].cmp(&other.0[i]) {
                Ordering::Equal => continue,
                o => return o,
            }
        }
        Ordering::Equal
    }
}

impl PartialOrd for Target {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Debug for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Target(")?;
        for l in self.0.iter().rev() {
            write!(f, "{l:016x}")?;
        }
        write!(f, ")")
    }
}

/// The difficulty a hash achieved (`DIFF1 / hash`), for stats.
pub fn hash_difficulty(hash: &[u8; 32]) -> f64 {
    Target::from_le_bytes(*hash).to_difficulty()
}

/// Round a difficulty down to a power of two (some firmware breaks on odd or
/// fractional difficulties), never below `floor` (itself rounded up to a power of two).
pub fn round_pow2(difficulty: f64, floor: f64) -> f64 {
    let floor = if floor.is_finite() && floor > 0.0 {
        2f64.powi(floor.log2().ceil() as i32)
    } else {
        1.0
    };
    if !(difficulty.is_finite() && difficulty > 0.0) {
        return floor;
    }
    let down = 2f64.powi(difficulty.log2().floor() as i32);
    down.max(floor)
}

/// Estimated hashrate (H/s) from a sum of share difficulties over a time span.
pub fn hashrate_from_shares(difficulty_sum: f64, seconds: f64) -> f64 {
    if seconds <= 0.0 {
        return 0.0;
    }
    difficulty_sum * 4_294_967_296.0 / seconds
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex_be(s: &str) -> Target {
        let mut b: [u8; 32] = hex::decode(s).unwrap().try_into().unwrap();
        b.reverse();
        Target::from_le_bytes(b)
    }

    #[test]
    fn diff1_is_bdiff() {
        assert_eq!(
            DIFF1,
            hex_be("00000000ffff0000000000000000000000000000000000000000000000000000")
        );
        assert_eq!(Target::from_difficulty(1.0), DIFF1);
        assert_eq!(DIFF1.to_difficulty(), 1.0);
    }

    #[test]
    fn known_pairs() {
        // Genesis nBits 0x1d00ffff is difficulty 1.
        assert_eq!(Target::from_compact(0x1d00ffff), DIFF1);
        // Block 0000…0c835b (Sep 2021), nBits 0x170ed0eb: difficulty ≈ 19.0 T.
        let d = Target::from_compact(0x170ed0eb).to_difficulty();
        assert!((d - 18_997_641_161_758.95).abs() / d < 1e-9, "{d}");
        // Difficulty 1024 = DIFF1 >> 10.
        assert_eq!(
            Target::from_difficulty(1024.0),
            hex_be("00000000003fffc0000000000000000000000000000000000000000000000000")
        );
        // Fractional difficulty 0.5 doubles the target.
        assert_eq!(
            Target::from_difficulty(0.5),
            hex_be("00000001fffe0000000000000000000000000000000000000000000000000000")
        );
        // Non-power-of-two divides exactly: DIFF1 / 3.
        let t = Target::from_difficulty(3.0);
        assert!((t.to_difficulty() - 3.0).abs() < 1e-12);
        assert_eq!(Target::from_difficulty(0.0), Target::MAX);
        // Fractional difficulties as pools send them (SRI translator, CPU-scale): no overflow.
        for d in [
            0.00011641377829718635,
            4.656612873077393e-6,
            1.0 / 65536.0,
            1e-9,
        ] {
            let back = Target::from_difficulty(d).to_difficulty();
            assert!((back - d).abs() / d < 1e-12, "{d} -> {back}");
        }
        assert_eq!(
            Target::from_difficulty(1.0 / 65536.0),
            hex_be("0000ffff00000000000000000000000000000000000000000000000000000000")
        );
        assert_eq!(Target::from_difficulty(f64::NAN), Target::MAX);
        assert_eq!(Target::from_difficulty(1e-300), Target::MAX);
    }

    #[test]
    fn le_round_trip_and_compare() {
        let t = Target::from_difficulty(12345.0);
        assert_eq!(Target::from_le_bytes(t.to_le_bytes()), t);
        assert!(Target::from_difficulty(2.0) < Target::from_difficulty(1.0));
    }

    #[test]
    fn pow2_rounding_with_floor() {
        assert_eq!(round_pow2(1000.0, 1.0), 512.0);
        assert_eq!(round_pow2(1024.0, 1.0), 1024.0);
        assert_eq!(round_pow2(3.0, 16.0), 16.0);
        assert_eq!(round_pow2(100.0, 10.0), 64.0);
        assert_eq!(round_pow2(5.0, 10.0), 16.0);
        assert_eq!(round_pow2(0.3, 0.01), 0.25);
        assert_eq!(round_pow2(f64::NAN, 8.0), 8.0);
    }

    #[test]
    fn hashrate_estimate() {
        // 60 shares of difficulty 1 in 60 s is 2^32 H/s.
        assert_eq!(hashrate_from_shares(60.0, 60.0), 4_294_967_296.0);
        assert_eq!(hashrate_from_shares(1.0, 0.0), 0.0);
    }
}
