//! Stratum V2 extensions, sans-IO: the messages of Extensions Negotiation
//! (0x0001) and the `user_identity` TLV of Worker-Specific Hashrate Tracking
//! (0x0002), over `stratum-core`'s `extensions_sv2` and `parsers_sv2` TLV
//! helpers. This module adds what those lack: a rule that fits any worker
//! name into the TLV's 32 bytes ([`tlv_identity`]), and appending or reading
//! TLVs on a [`Frame`].
//!
//! Spec: sv2-spec `extensions/0x0001-extensions-negotiation.md` and
//! `extensions/0x0002-worker-specific-hashrate-tracking.md`; the TLV layout
//! is `03-Protocol-Overview.md` §3.4.3 (Type = extension_type U16 ‖
//! field_type U8, Length U16, Value; multibyte fields little-endian as
//! everywhere in SV2, §3.1: the byte examples in those two documents print
//! the U16s big-endian, SRI's pool reads them little-endian).

use sha2::{Digest, Sha256};
use stratum_core::parsers_sv2::{
    parse_message_frame_with_tlvs, AnyMessage, Tlv, TlvField, TlvList,
};

use crate::sv2::{Frame, Message, Sv2Error, HEADER_LEN};

pub use stratum_core::extensions_sv2::{
    RequestExtensionsErrorOwned, RequestExtensionsOwned, RequestExtensionsSuccessOwned,
    UserIdentity, EXTENSION_TYPE_EXTENSIONS_NEGOTIATION, EXTENSION_TYPE_WORKER_HASHRATE_TRACKING,
    MAX_USER_IDENTITY_LENGTH, TLV_FIELD_TYPE_USER_IDENTITY,
};
pub use stratum_core::parsers_sv2::{ExtensionsNegotiationOwned, ExtensionsOwned};

/// Bytes of a long name kept in front of its hash (see [`tlv_identity`]).
pub const IDENTITY_PREFIX_MAX: usize = MAX_USER_IDENTITY_LENGTH - 1 - IDENTITY_HASH_HEX;
/// Hex digits of the name's SHA-256 appended to a cut name (48 bits).
pub const IDENTITY_HASH_HEX: usize = 12;

/// The `user_identity` TLV value for a worker name: at most
/// [`MAX_USER_IDENTITY_LENGTH`] (32) bytes of UTF-8, as 0x0002 §1.1 allows
/// (a longer value makes the pool reject the message, §3.4.3).
///
/// The rule: a name of up to 32 bytes goes as it is. A longer name becomes
/// its first bytes, at most [`IDENTITY_PREFIX_MAX`] (19) and cut at a
/// character boundary, then `~`, then the first [`IDENTITY_HASH_HEX`] (12)
/// lowercase hex digits of the SHA-256 of the whole name:
/// `customer-with-a-lon~3f2a9c01b7de`. The readable prefix keeps the
/// account part; the hash keeps distinct long names distinct (two of them
/// share an identity only if their 48-bit hashes collide: about 2e-7 for
/// 10,000 names with the same prefix), and a cut name never equals a short
/// name unless a worker is literally named like another's cut form.
pub fn tlv_identity(name: &str) -> String {
    if name.len() <= MAX_USER_IDENTITY_LENGTH {
        return name.to_string();
    }
    let mut end = IDENTITY_PREFIX_MAX;
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    let digest = Sha256::digest(name.as_bytes());
    let mut out = String::with_capacity(MAX_USER_IDENTITY_LENGTH);
    out.push_str(&name[..end]);
    out.push('~');
    out.push_str(&hex::encode(&digest[..IDENTITY_HASH_HEX / 2]));
    out
}

/// The encoded `user_identity` TLV (0x0002 field 0x01) for a worker name,
/// cut by [`tlv_identity`].
pub fn user_identity_tlv(name: &str) -> Result<Vec<u8>, Sv2Error> {
    let id = UserIdentity::new(&tlv_identity(name))
        .map_err(|e| Sv2Error::Encode(format!("user_identity: {e}")))?;
    id.to_bytes()
        .map_err(|e| Sv2Error::Encode(format!("user_identity TLV: {e:?}")))
}

/// A message framed with encoded TLV fields appended to its payload (TLVs
/// go at the end of the payload, §3.4.3; the frame's `extension_type` stays
/// the message's own, `09-Extensions.md`).
pub fn frame_with_tlvs(msg: Message, tlvs: &[u8]) -> Result<Frame, Sv2Error> {
    let frame = Frame::from_message(msg)?;
    if tlvs.is_empty() {
        return Ok(frame);
    }
    let mut plain = frame.to_plain()?;
    let len = plain.len() - HEADER_LEN + tlvs.len();
    if len >= 1 << 24 {
        return Err(Sv2Error::Encode("payload over 16 MiB".into()));
    }
    plain[3..6].copy_from_slice(&(len as u32).to_le_bytes()[..3]);
    plain.extend_from_slice(tlvs);
    let (frame, _) = Frame::parse_plain(&plain, len)?.expect("a whole frame");
    Ok(frame)
}

/// The message of a frame and the TLV fields after it that belong to one
/// of the `negotiated` extensions (others are ignored, as 0x0002 §1.3 says a
/// receiver must). A TLV that is cut short ends the list.
pub fn message_with_tlvs(
    frame: &Frame,
    negotiated: &[u16],
) -> Result<(Message, Vec<Tlv>), Sv2Error> {
    let header = frame.header();
    let mut payload = frame.payload().to_vec();
    let (msg, tlvs): (AnyMessage<'_>, _) =
        parse_message_frame_with_tlvs(header, payload.as_mut_slice(), negotiated).map_err(|e| {
            Sv2Error::Parse {
                msg_type: frame.msg_type(),
                ext_type: frame.ext_type(),
                reason: format!("{e:?}"),
            }
        })?;
    Ok((msg.into_owned(), tlvs.unwrap_or_default()))
}

/// The `user_identity` among decoded TLVs, if there is a valid one.
pub fn find_user_identity(tlvs: &[Tlv]) -> Option<String> {
    tlvs.iter()
        .find(|t| {
            t.r#type.extension_type == EXTENSION_TYPE_WORKER_HASHRATE_TRACKING
                && t.r#type.field_type == TLV_FIELD_TYPE_USER_IDENTITY
        })
        .and_then(|t| UserIdentity::from_tlv(t).ok())
        .map(|id| id.as_string_or_hex())
}

/// Encoded TLVs, for tests and fixtures that build them from parts.
pub fn encode_tlvs(tlvs: &[Tlv]) -> Result<Vec<u8>, Sv2Error> {
    match TlvList::from_slice(tlvs).map_err(|e| Sv2Error::Encode(format!("{e:?}")))? {
        TlvList::Owned(b) => Ok(b),
        TlvList::Bytes(b) => Ok(b.to_vec()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sv2::mining_sv2::SubmitSharesExtendedOwned;
    use crate::sv2::MiningOwned;

    #[test]
    fn short_names_go_as_they_are() {
        assert_eq!(tlv_identity("acct.rig1"), "acct.rig1");
        assert_eq!(tlv_identity(""), "");
        let exactly = "a".repeat(32);
        assert_eq!(tlv_identity(&exactly), exactly);
    }

    #[test]
    fn long_names_keep_a_prefix_and_a_hash_and_stay_distinct() {
        let a = format!("{}.rig-0001", "customer-with-a-long-account-name");
        let b = format!("{}.rig-0002", "customer-with-a-long-account-name");
        let (ia, ib) = (tlv_identity(&a), tlv_identity(&b));
        assert_eq!(ia.len(), 32);
        assert!(ia.starts_with("customer-with-a-lon~"), "{ia}");
        assert_ne!(ia, ib, "same prefix, different names");
        // The hash is the first 6 bytes of SHA-256 of the whole name.
        let digest = Sha256::digest(a.as_bytes());
        assert_eq!(&ia[20..], hex::encode(&digest[..6]));
        // Deterministic: the same name gives the same identity every time.
        assert_eq!(tlv_identity(&a), ia);
        // 33 bytes is already cut.
        assert_eq!(tlv_identity(&"b".repeat(33)).len(), 32);
        // Many long names with one prefix: all distinct.
        let ids: std::collections::HashSet<String> = (0..10_000)
            .map(|i| tlv_identity(&format!("{}-{i}", "x".repeat(40))))
            .collect();
        assert_eq!(ids.len(), 10_000);
    }

    #[test]
    fn a_cut_never_splits_a_character() {
        // 'é' is 2 bytes: 18 ASCII bytes then 'é' straddles byte 19.
        let name = format!("{}é{}", "a".repeat(18), "z".repeat(20));
        let id = tlv_identity(&name);
        assert!(id.starts_with(&"a".repeat(18)));
        assert_eq!(id.as_bytes()[18], b'~', "{id}");
        assert!(id.len() <= 32);
        let emoji = "🦀".repeat(10); // 40 bytes
        let id = tlv_identity(&emoji);
        assert!(id.len() <= 32 && id.starts_with("🦀🦀🦀🦀~"), "{id}");
    }

    #[test]
    fn the_tlv_is_type_length_value_little_endian() {
        let tlv = user_identity_tlv("Worker_001").unwrap();
        let mut want = vec![0x02, 0x00, 0x01, 0x0a, 0x00];
        want.extend_from_slice(b"Worker_001");
        assert_eq!(tlv, want);
    }

    #[test]
    fn a_frame_with_a_tlv_round_trips() {
        let submit = SubmitSharesExtendedOwned {
            channel_id: 7,
            sequence_number: 9,
            job_id: 3,
            nonce: 0xdead_beef,
            ntime: 1_700_000_000,
            version: 0x2000_0000,
            extranonce: vec![1, 2, 3, 4].try_into().unwrap(),
        };
        let msg = Message::Mining(MiningOwned::SubmitSharesExtended(submit.clone()));
        let plain_len = Frame::from_message(msg.clone()).unwrap().payload().len();
        let tlv = user_identity_tlv("acct.rig7").unwrap();
        let frame = frame_with_tlvs(msg, &tlv).unwrap();
        assert_eq!(frame.payload().len(), plain_len + tlv.len());
        // Parsed with 0x0002 negotiated: the message and its identity.
        let (back, tlvs) = message_with_tlvs(&frame, &[0x0002]).unwrap();
        let Message::Mining(MiningOwned::SubmitSharesExtended(back)) = back else {
            panic!("not a SubmitSharesExtended: {back:?}");
        };
        assert_eq!(back, submit);
        assert_eq!(find_user_identity(&tlvs).as_deref(), Some("acct.rig7"));
        // Not negotiated: the TLV is ignored, the message still parses.
        let (_, none) = message_with_tlvs(&frame, &[]).unwrap();
        assert!(none.is_empty());
        assert!(frame.to_message().is_ok());
    }
}
