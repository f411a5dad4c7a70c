//! Share validation: build the 80-byte block header a miner hashed, sha256d it,
//! and compare with a target.
//!
//! Byte orders follow Bitcoin's serialization: hashes (prev hash, merkle
//! branch, merkle root) are kept in internal byte order, integers in the
//! header are little-endian. SV1 sends the prev hash with each 32-bit word
//! byte-swapped; [`prevhash_from_sv1`] undoes that.

use crate::difficulty::Target;
use sha2::{Digest, Sha256};

/// sha256(sha256(data)).
#[inline]
pub fn sha256d(data: &[u8]) -> [u8; 32] {
    let first = Sha256::digest(data);
    Sha256::digest(first).into()
}

/// The header fields of a job that do not depend on the miner's work.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Job {
    /// Block version before version rolling.
    pub version: u32,
    /// Previous block hash, internal byte order.
    pub prev_hash: [u8; 32],
    /// Coinbase transaction bytes before the extranonce.
    pub coinbase_prefix: Vec<u8>,
    /// Coinbase transaction bytes after the extranonce.
    pub coinbase_suffix: Vec<u8>,
    /// Merkle branch from the coinbase to the root, internal byte order.
    pub merkle_branch: Vec<[u8; 32]>,
    /// Compact network target.
    pub nbits: u32,
    /// Job's time (miners may roll it forward).
    pub ntime: u32,
}

/// What a miner submits for a job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Work<'a> {
    /// Full extranonce: the proxy-assigned prefix (SV1 extranonce1) then the miner's part.
    pub extranonce: &'a [u8],
    /// Header time.
    pub ntime: u32,
    /// Header nonce.
    pub nonce: u32,
    /// Version bits the miner rolled, if any (only bits inside `version_mask` are used).
    pub version_bits: Option<u32>,
}

/// Header bytes that are not yet hashed, for diagnostics and tests.
pub type Header = [u8; 80];

/// Why a share does not validate as work (not a protocol error: a value).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WorkError {
    /// The miner rolled version bits outside the negotiated mask.
    #[error("version bits {bits:#010x} outside negotiated mask {mask:#010x}")]
    VersionBitsOutsideMask {
        /// bits the miner sent
        bits: u32,
        /// negotiated mask
        mask: u32,
    },
}

/// Merkle root of a coinbase (prefix ‖ extranonce ‖ suffix) up a branch.
pub fn merkle_root(coinbase_parts: &[&[u8]], branch: &[[u8; 32]]) -> [u8; 32] {
    let mut h = Sha256::new();
    for p in coinbase_parts {
        h.update(p);
    }
    let mut acc: [u8; 32] = Sha256::digest(h.finalize()).into();
    let mut buf = [0u8; 64];
    for b in branch {
        buf[..32].copy_from_slice(&acc);
        buf[32..].copy_from_slice(b);
        acc = sha256d(&buf);
    }
    acc
}

/// Apply rolled version bits under a mask (BIP310 / BIP320).
pub fn rolled_version(base: u32, version_bits: Option<u32>, mask: u32) -> Result<u32, WorkError> {
    match version_bits {
        None => Ok(base),
        Some(bits) => {
            // Firmware sends either only the rolled bits or the whole version;
            // both are fine as long as nothing outside the mask differs from base.
            let outside = (bits ^ base) & !mask;
            if outside != 0 && bits & !mask != 0 {
                return Err(WorkError::VersionBitsOutsideMask { bits, mask });
            }
            Ok((base & !mask) | (bits & mask))
        }
    }
}

/// Assemble the 80-byte header from its six fields.
pub fn header(
    version: u32,
    prev_hash: &[u8; 32],
    merkle_root: &[u8; 32],
    ntime: u32,
    nbits: u32,
    nonce: u32,
) -> Header {
    let mut h = [0u8; 80];
    h[0..4].copy_from_slice(&version.to_le_bytes());
    h[4..36].copy_from_slice(prev_hash);
    h[36..68].copy_from_slice(merkle_root);
    h[68..72].copy_from_slice(&ntime.to_le_bytes());
    h[72..76].copy_from_slice(&nbits.to_le_bytes());
    h[76..80].copy_from_slice(&nonce.to_le_bytes());
    h
}

impl Job {
    /// The header the miner hashed for this work.
    pub fn header(&self, work: &Work<'_>, version_mask: u32) -> Result<Header, WorkError> {
        let root = merkle_root(
            &[
                &self.coinbase_prefix,
                work.extranonce,
                &self.coinbase_suffix,
            ],
            &self.merkle_branch,
        );
        let version = rolled_version(self.version, work.version_bits, version_mask)?;
        Ok(header(
            version,
            &self.prev_hash,
            &root,
            work.ntime,
            self.nbits,
            work.nonce,
        ))
    }

    /// sha256d of the header for this work (internal byte order).
    pub fn hash(&self, work: &Work<'_>, version_mask: u32) -> Result<[u8; 32], WorkError> {
        Ok(sha256d(&self.header(work, version_mask)?))
    }
}

/// A job whose merkle root is fixed (SV2 standard channels): only version,
/// time and nonce vary.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeaderJob {
    /// Block version before rolling.
    pub version: u32,
    /// Previous block hash, internal byte order.
    pub prev_hash: [u8; 32],
    /// Merkle root, internal byte order.
    pub merkle_root: [u8; 32],
    /// Compact network target.
    pub nbits: u32,
}

impl HeaderJob {
    /// sha256d of the header with the given time, nonce and full version.
    pub fn hash(&self, version: u32, ntime: u32, nonce: u32) -> [u8; 32] {
        sha256d(&header(
            version,
            &self.prev_hash,
            &self.merkle_root,
            ntime,
            self.nbits,
            nonce,
        ))
    }
}

/// Result of checking a hash against the miner's and the upstream's targets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShareCheck {
    /// Meets the miner's target (the miner gets "accepted").
    pub meets_miner: bool,
    /// Meets the upstream target (forward to the pool).
    pub meets_upstream: bool,
    /// Meets the network target (a block).
    pub meets_network: bool,
}

/// Compare one hash with the three targets that matter.
pub fn check(hash: &[u8; 32], miner: &Target, upstream: &Target, nbits: u32) -> ShareCheck {
    let h = Target::from_le_bytes(*hash);
    ShareCheck {
        meets_miner: h <= *miner,
        meets_upstream: h <= *upstream,
        meets_network: h <= Target::from_compact(nbits),
    }
}

/// Convert the SV1 `mining.notify` prev hash (each 4-byte word byte-swapped)
/// to internal byte order. The conversion is its own inverse.
pub fn prevhash_from_sv1(sv1: &[u8; 32]) -> [u8; 32] {
    let mut out = [0u8; 32];
    for (o, i) in out.chunks_exact_mut(4).zip(sv1.chunks_exact(4)) {
        o.copy_from_slice(&[i[3], i[2], i[1], i[0]]);
    }
    out
}

/// Internal-order prev hash to its SV1 wire form.
pub fn prevhash_to_sv1(internal: &[u8; 32]) -> [u8; 32] {
    prevhash_from_sv1(internal)
}

/// Display form of a hash (reversed bytes, as block explorers show it).
pub fn display_hex(hash: &[u8; 32]) -> String {
    let mut r = *hash;
    r.reverse();
    hex::encode(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h32(s: &str) -> [u8; 32] {
        hex::decode(s).unwrap().try_into().unwrap()
    }

    // Genesis block, coinbase split at the scriptSig as a pool would split it.
    const GENESIS_CB: &str = "01000000010000000000000000000000000000000000000000000000000000000000000000ffffffff4d04ffff001d0104455468652054696d65732030332f4a616e2f32303039204368616e63656c6c6f72206f6e206272696e6b206f66207365636f6e64206261696c6f757420666f722062616e6b73ffffffff0100f2052a01000000434104678afdb0fe5548271967f1a67130b7105cd6a828e03909a67962e0ea1f61deb649f6bc3f4cef38c4f35504e51ec112de5c384df7ba0b8d578a4c702b6bf11d5fac00000000";

    fn genesis_job(cb: &[u8], split: usize, en_len: usize) -> (Job, Vec<u8>) {
        let job = Job {
            version: 1,
            prev_hash: [0; 32],
            coinbase_prefix: cb[..split].to_vec(),
            coinbase_suffix: cb[split + en_len..].to_vec(),
            merkle_branch: vec![],
            nbits: 0x1d00ffff,
            ntime: 1231006505,
        };
        (job, cb[split..split + en_len].to_vec())
    }

    #[test]
    fn genesis_header_recomputed_from_parts() {
        let cb = hex::decode(GENESIS_CB).unwrap();
        let (job, en) = genesis_job(&cb, 42, 8);
        let work = Work {
            extranonce: &en,
            ntime: 1231006505,
            nonce: 2083236893,
            version_bits: None,
        };
        let hash = job.hash(&work, 0).unwrap();
        assert_eq!(
            display_hex(&hash),
            "000000000019d6689c085ae165831e934ff763ae46a2a6c172b3f1b60a8ce26f"
        );
        let c = check(
            &hash,
            &Target::from_difficulty(1.0),
            &Target::from_difficulty(1.0),
            job.nbits,
        );
        assert!(c.meets_miner && c.meets_upstream && c.meets_network);
    }

    // Mainnet block 000000000000000000000c835b2adcaedc20fdf6ee440009c249452c726dafae
    // (height 702861, 2021-09-30, 2500 transactions, version 0x3fffe004: rolled bits).
    const B702861_CB: &str = "02000000010000000000000000000000000000000000000000000000000000000000000000ffffffff58038db90a0475a45561fabe6d6db43c2ece440513219decd96f67a31bf0191f9a5f2d6c952e5029005e3d30f562040000001e34c5f062696e616e63652f6672323134818226021704159799809b19f82f7807000000000000ffffffff02f53f8c25000000001600143156afc4249915008020f932783319f3e610b97d0000000000000000266a24aa21a9ed71bfcc287cd6271682f35f5fba3963861571e0f186899eb0a41a5ebc360a3faa00000000";
    const B702861_BRANCH: [&str; 12] = [
        "f0a4506db7e1d2deb5bfc216b67dbb04b389997172322ffbea33909b6817f77b",
        "a25f8476db623e38399e4e03264be4e7c071d30aa55e8b84b4d7192e2dfb3ec3",
        "edd33e190dc2dfba2544371a9f67f0f2bcc1eb8770a7dab95061d369afef1663",
        "69b9d0464b38b83e7927e85dac07dcde156b78c4bd787d44a79df9fb0f398bfc",
        "d995c1154c5c4f26a3fac78b71d9a55700bb9efe82b3d4568bb13241996544c2",
        "fce87b18abcb2a50baae34308b38978ffa0815982b27af42508f2ff1b9f099f7",
        "7272655644ab1aa97f70b12611e3348d19f8746c98ee7197487a641e427d1a28",
        "3d938ce02a7ddeb7d7c9b0074bf9f2b0442e0291f935c76d736d76ca201fbad4",
        "6166b96f7c77610d4ee1d4fd8149506d0f3d295d4eced1ae91e80fc3ed1c4a39",
        "9043ccb97e76afce49a80d696bfa172029002434d8b8c4eeadf6e7e620a3dd03",
        "c99fde101018ab06e45a50f6832d2249d3f048c15ec885d35905920590858ccf",
        "593cfabbb80ed5f0182b0984682937dbd0223428c45d1763a9ee9306ba96cf7e",
    ];
    const B702861_HEADER: &str = "04e0ff3f5f3b2119529dc4013ff0f427a457bed706e7b5b8dec30900000000000000000022906797f7ab258c0f896c35b2d6725c0554f579af99754b241aec8c76727d4091a45561ebd00e17e3d6da41";
    const B702861_HASH: &str = "000000000000000000000c835b2adcaedc20fdf6ee440009c249452c726dafae";

    /// The block as a pool would hand it out over SV1: base version 0x20000004,
    /// mask 0x1fffe000; the miner rolled 0x1fffe000 and found the nonce.
    fn b702861() -> (Job, Vec<u8>) {
        let cb = hex::decode(B702861_CB).unwrap();
        let hdr = hex::decode(B702861_HEADER).unwrap();
        // Split inside the scriptSig: 4-byte extranonce1 + 4-byte extranonce2.
        let split = 50;
        let job = Job {
            version: 0x2000_0004,
            prev_hash: hdr[4..36].try_into().unwrap(),
            coinbase_prefix: cb[..split].to_vec(),
            coinbase_suffix: cb[split + 8..].to_vec(),
            merkle_branch: B702861_BRANCH.iter().map(|s| h32(s)).collect(),
            nbits: 0x170ed0eb,
            ntime: 1633002641,
        };
        (job, cb[split..split + 8].to_vec())
    }

    #[test]
    fn version_rolled_mainnet_block_recomputed_from_parts() {
        let (job, en) = b702861();
        let work = Work {
            extranonce: &en,
            ntime: 1633002641,
            nonce: 1104860899,
            version_bits: Some(0x1fffe000),
        };
        let header = job.header(&work, 0x1fffe000).unwrap();
        assert_eq!(hex::encode(header), B702861_HEADER);
        let hash = sha256d(&header);
        assert_eq!(display_hex(&hash), B702861_HASH);
        assert!(Target::from_compact(job.nbits).is_met_by(&hash));
    }

    #[test]
    fn corrupted_fields_fail() {
        let (job, en) = b702861();
        let good = Work {
            extranonce: &en,
            ntime: 1633002641,
            nonce: 1104860899,
            version_bits: Some(0x1fffe000),
        };
        let net = Target::from_compact(job.nbits);
        let mask = 0x1fffe000;
        assert!(net.is_met_by(&job.hash(&good, mask).unwrap()));

        let mut bad_en = en.clone();
        bad_en[7] ^= 1;
        let cases: Vec<(&str, Job, Work)> = vec![
            (
                "nonce",
                job.clone(),
                Work {
                    nonce: good.nonce + 1,
                    ..good.clone()
                },
            ),
            (
                "ntime",
                job.clone(),
                Work {
                    ntime: good.ntime + 1,
                    ..good.clone()
                },
            ),
            (
                "extranonce",
                job.clone(),
                Work {
                    extranonce: &bad_en,
                    ..good.clone()
                },
            ),
            (
                "version bits",
                job.clone(),
                Work {
                    version_bits: Some(0x1fffc000),
                    ..good.clone()
                },
            ),
            (
                "no rolling",
                job.clone(),
                Work {
                    version_bits: None,
                    ..good.clone()
                },
            ),
            (
                "nbits",
                Job {
                    nbits: 0x170ed0ec,
                    ..job.clone()
                },
                good.clone(),
            ),
            (
                "branch",
                {
                    let mut j = job.clone();
                    j.merkle_branch[3][0] ^= 0x80;
                    j
                },
                good.clone(),
            ),
            (
                "prev hash",
                {
                    let mut j = job.clone();
                    j.prev_hash[31] ^= 1;
                    j
                },
                good.clone(),
            ),
            (
                "coinbase",
                {
                    let mut j = job.clone();
                    j.coinbase_suffix[0] ^= 1;
                    j
                },
                good.clone(),
            ),
        ];
        for (what, j, w) in cases {
            let h = j.hash(&w, mask).unwrap();
            assert_ne!(display_hex(&h), B702861_HASH, "{what}");
            assert!(
                !net.is_met_by(&h),
                "corrupted {what} still meets the network target"
            );
        }
    }

    #[test]
    fn version_bits_outside_mask_are_refused() {
        assert_eq!(
            rolled_version(0x2000_0000, Some(0x0000_2000), 0x1fffe000),
            Ok(0x2000_2000)
        );
        // Full version form with the same outside bits is fine.
        assert_eq!(
            rolled_version(0x2000_0000, Some(0x2000_4000), 0x1fffe000),
            Ok(0x2000_4000)
        );
        assert!(rolled_version(0x2000_0000, Some(0x4000_0000), 0x1fffe000).is_err());
        assert!(rolled_version(0x2000_0000, Some(0x0000_2000), 0).is_err());
    }

    #[test]
    fn sv1_prevhash_word_swap() {
        let internal = h32("5f3b2119529dc4013ff0f427a457bed706e7b5b8dec309000000000000000000");
        let sv1 = prevhash_to_sv1(&internal);
        assert_eq!(
            hex::encode(sv1),
            "19213b5f01c49d5227f4f03fd7be57a4b8b5e7060009c3de0000000000000000"
        );
        assert_eq!(prevhash_from_sv1(&sv1), internal);
    }

    #[test]
    fn header_job_matches_full_job() {
        let (job, en) = b702861();
        let root = merkle_root(
            &[&job.coinbase_prefix, &en, &job.coinbase_suffix],
            &job.merkle_branch,
        );
        let hj = HeaderJob {
            version: job.version,
            prev_hash: job.prev_hash,
            merkle_root: root,
            nbits: job.nbits,
        };
        assert_eq!(
            display_hex(&hj.hash(0x3fffe004, 1633002641, 1104860899)),
            B702861_HASH
        );
    }
}
