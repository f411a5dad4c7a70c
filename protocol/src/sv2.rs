//! Stratum V2 transport, sans-IO: authority keys, the Noise NX handshake and an encrypted
//! frame codec for [`tokio_util::codec::Framed`].
//!
//! Everything cryptographic is `stratum_core::noise_sv2`; headers are `framing_sv2`; message
//! (de)serialization is `parsers_sv2` / `binary_sv2`. This module only moves bytes between
//! them, enforces a frame size limit and turns failures into typed errors.
//!
//! Typical initiator (client) flow, the caller doing the I/O:
//! ```text
//! let (hs, first) = InitiatorHandshake::new(&pool_key)?;   // send `first` (64 bytes)
//! let reply = read_exactly(RESPONDER_MSG_LEN);              // 234 bytes
//! let codec = hs.finish(&reply, unix_now)?;                  // NoiseCodec, use with Framed
//! ```
//! Over `Framed`, start with [`HandshakeCodec`] and switch with `Framed::map_codec` once the
//! handshake is done: bytes already buffered are kept.

use std::{fmt, str::FromStr, time::Duration};

use bytes::{Buf, BufMut, BytesMut};
use stratum_core::{
    bitcoin::{base58, secp256k1},
    codec_sv2::{encrypted_payload_length, SV2_FRAME_PLAINTEXT_CHUNK_SIZE},
    framing_sv2::{framing::EncodableFrame, framing::MessageFrame, header::Header},
    noise_sv2::{
        self, Initiator, NoiseDecryptor, NoiseEncryptor, Responder, AEAD_MAC_LEN,
        ELLSWIFT_ENCODING_SIZE, INITIATOR_EXPECTED_HANDSHAKE_MESSAGE_SIZE,
    },
    parsers_sv2::{AnyMessage, IsSv2Message},
};
use tokio_util::codec::{Decoder, Encoder};

pub use stratum_core::parsers_sv2::{
    AnyMessageOwned, CommonMessagesOwned, MiningOwned, TemplateDistributionOwned,
};
pub use stratum_core::{
    binary_sv2, common_messages_sv2, mining_sv2, parsers_sv2, template_distribution_sv2,
};

/// Any SV2 message, owned (no borrowed lifetimes): what the codec yields and accepts.
pub type Message = AnyMessageOwned;

/// Size of the initiator's handshake message (its ElligatorSwift-encoded ephemeral key).
pub const INITIATOR_MSG_LEN: usize = ELLSWIFT_ENCODING_SIZE;
/// Size of the responder's handshake message (234 bytes on the wire, not the spec's 170).
pub const RESPONDER_MSG_LEN: usize = INITIATOR_EXPECTED_HANDSHAKE_MESSAGE_SIZE;
/// Plaintext SV2 frame header size.
pub const HEADER_LEN: usize = Header::SIZE;
/// Encrypted header size on the wire (header + MAC).
pub const ENCRYPTED_HEADER_LEN: usize = HEADER_LEN + AEAD_MAC_LEN;
/// Default cap on a decoded frame's payload. Mining messages are well below 64 KiB; templates
/// with big coinbases stay under 1 MiB.
pub const DEFAULT_MAX_PAYLOAD: usize = 1 << 20;
/// Encrypted chunk size on the wire: each chunk carries its own MAC.
const WIRE_CHUNK: usize = SV2_FRAME_PLAINTEXT_CHUNK_SIZE + AEAD_MAC_LEN;
/// Version prefix SRI puts in front of base58 authority public keys.
const PUBKEY_VERSION: u16 = 1;

/// A malformed authority key (as written in configs).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// Not base58check (bad alphabet or checksum).
    #[error("authority key is not valid base58check: {0}")]
    Base58(String),
    /// Decoded to the wrong number of bytes.
    #[error("authority key has {got} bytes after decoding, expected {expected}")]
    Length {
        /// Expected decoded length.
        expected: usize,
        /// Actual decoded length.
        got: usize,
    },
    /// Public key with an unknown version prefix.
    #[error("authority public key has version {0}, expected 1")]
    Version(u16),
    /// Bytes are not a valid secp256k1 key.
    #[error("authority key is not a valid secp256k1 key")]
    InvalidKey,
    /// Public and secret key do not belong together.
    #[error("authority public key does not match the secret key")]
    Mismatch,
}

/// Everything that can go wrong on an SV2 transport.
#[derive(Debug, thiserror::Error)]
pub enum Sv2Error {
    /// The peer's certificate is not signed by the pinned authority key, or has expired.
    #[error("noise handshake: responder certificate not valid for the pinned authority key")]
    BadCertificate,
    /// Handshake message of the wrong size.
    #[error("noise handshake: message has {got} bytes, expected {expected}")]
    HandshakeLength {
        /// Expected size.
        expected: usize,
        /// Actual size.
        got: usize,
    },
    /// Any other handshake failure (decryption, bad key material).
    #[error("noise handshake failed: {0}")]
    Handshake(String),
    /// A frame header announced a payload bigger than the configured limit.
    #[error("frame payload of {len} bytes exceeds the limit of {max} bytes")]
    FrameTooLarge {
        /// Announced payload length.
        len: usize,
        /// Configured limit.
        max: usize,
    },
    /// Authentication tag mismatch: corrupted, injected or reordered bytes.
    #[error("frame decryption failed (corrupted or out-of-order data)")]
    Decrypt,
    /// Encryption failed (nonce exhausted).
    #[error("frame encryption failed")]
    Encrypt,
    /// The codec already failed once; the cipher state cannot be trusted any more.
    #[error("transport unusable after an earlier error")]
    Broken,
    /// A decrypted frame does not hold a known, well-formed message.
    #[error("cannot parse message type {msg_type:#04x} (extension {ext_type:#06x}): {reason}")]
    Parse {
        /// Frame message type.
        msg_type: u8,
        /// Frame extension type.
        ext_type: u16,
        /// Parser error text.
        reason: String,
    },
    /// A message could not be serialized into a frame.
    #[error("cannot encode message: {0}")]
    Encode(String),
    /// Socket error (needed by `Framed`).
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

// ---------------------------------------------------------------------------------------------
// Keys

/// An authority public key (x-only secp256k1), as pinned by SV2 clients.
///
/// Parses and prints the SRI config format: base58check of `[1, 0] ++ key`.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct AuthorityPublicKey([u8; 32]);

impl AuthorityPublicKey {
    /// Wraps raw x-only key bytes, checking they are a curve point.
    pub fn from_bytes(bytes: [u8; 32]) -> Result<Self, KeyError> {
        secp256k1::XOnlyPublicKey::from_slice(&bytes).map_err(|_| KeyError::InvalidKey)?;
        Ok(Self(bytes))
    }

    /// The raw 32 key bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl FromStr for AuthorityPublicKey {
    type Err = KeyError;

    fn from_str(s: &str) -> Result<Self, KeyError> {
        let raw = base58::decode_check(s.trim()).map_err(|e| KeyError::Base58(e.to_string()))?;
        if raw.len() != 34 {
            return Err(KeyError::Length {
                expected: 34,
                got: raw.len(),
            });
        }
        let version = u16::from_le_bytes([raw[0], raw[1]]);
        if version != PUBKEY_VERSION {
            return Err(KeyError::Version(version));
        }
        let mut key = [0u8; 32];
        key.copy_from_slice(&raw[2..]);
        Self::from_bytes(key)
    }
}

impl fmt::Display for AuthorityPublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut raw = [0u8; 34];
        raw[..2].copy_from_slice(&PUBKEY_VERSION.to_le_bytes());
        raw[2..].copy_from_slice(&self.0);
        f.write_str(&base58::encode_check(&raw))
    }
}

impl fmt::Debug for AuthorityPublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AuthorityPublicKey({self})")
    }
}

/// An authority key pair, used by responders (pool, TP) to sign their Noise certificate.
#[derive(Clone)]
pub struct AuthorityKeypair {
    public: AuthorityPublicKey,
    secret: [u8; 32],
}

impl AuthorityKeypair {
    /// Builds a pair from a secret key; the public key is derived.
    pub fn from_secret_bytes(secret: [u8; 32]) -> Result<Self, KeyError> {
        let secp = secp256k1::Secp256k1::signing_only();
        let sk = secp256k1::SecretKey::from_slice(&secret).map_err(|_| KeyError::InvalidKey)?;
        let (xonly, _) = secp256k1::Keypair::from_secret_key(&secp, &sk).x_only_public_key();
        Ok(Self {
            public: AuthorityPublicKey(xonly.serialize()),
            secret,
        })
    }

    /// Parses a base58check secret key (SRI `authority_secret_key` format).
    pub fn from_secret_str(secret: &str) -> Result<Self, KeyError> {
        let raw =
            base58::decode_check(secret.trim()).map_err(|e| KeyError::Base58(e.to_string()))?;
        let bytes: [u8; 32] = raw.as_slice().try_into().map_err(|_| KeyError::Length {
            expected: 32,
            got: raw.len(),
        })?;
        Self::from_secret_bytes(bytes)
    }

    /// Parses an SRI config pair and checks that the two keys belong together.
    pub fn from_strs(public: &str, secret: &str) -> Result<Self, KeyError> {
        let kp = Self::from_secret_str(secret)?;
        if kp.public != public.parse::<AuthorityPublicKey>()? {
            return Err(KeyError::Mismatch);
        }
        Ok(kp)
    }

    /// The public half, to hand to clients for pinning.
    pub fn public(&self) -> AuthorityPublicKey {
        self.public
    }

    /// The secret key in SRI config format (base58check).
    pub fn secret_string(&self) -> String {
        base58::encode_check(&self.secret)
    }
}

impl fmt::Debug for AuthorityKeypair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the secret.
        write!(f, "AuthorityKeypair({})", self.public)
    }
}

// ---------------------------------------------------------------------------------------------
// Handshake

/// Client side of the Noise NX handshake, pinned to the server's authority key.
pub struct InitiatorHandshake {
    inner: Box<Initiator>,
}

impl InitiatorHandshake {
    /// Starts a handshake; returns the state and the first message to send (64 bytes).
    pub fn new(
        authority: &AuthorityPublicKey,
    ) -> Result<(Self, [u8; INITIATOR_MSG_LEN]), Sv2Error> {
        let mut inner = Initiator::from_raw_k(authority.0)
            .map_err(|e| Sv2Error::Handshake(format!("{e:?}")))?;
        let first = inner
            .step_0()
            .map_err(|e| Sv2Error::Handshake(format!("step 0: {e:?}")))?;
        Ok((Self { inner }, first))
    }

    /// Completes the handshake with the responder's reply; `now_secs` (unix time) is used to
    /// check the certificate validity window.
    pub fn finish(mut self, reply: &[u8], now_secs: u32) -> Result<NoiseCodec, Sv2Error> {
        let reply: [u8; RESPONDER_MSG_LEN] =
            reply.try_into().map_err(|_| Sv2Error::HandshakeLength {
                expected: RESPONDER_MSG_LEN,
                got: reply.len(),
            })?;
        let engine = self
            .inner
            .step_2_with_now(reply, now_secs)
            .map_err(|e| match e {
                noise_sv2::Error::InvalidCertificate(_) => Sv2Error::BadCertificate,
                other => Sv2Error::Handshake(format!("step 2: {other:?}")),
            })?;
        let (enc, dec) = engine.into_split();
        Ok(NoiseCodec::new(enc, dec))
    }
}

/// Server side of the Noise NX handshake, certified by an authority key pair.
pub struct ResponderHandshake {
    inner: Box<Responder>,
}

impl ResponderHandshake {
    /// Prepares a responder whose certificate is valid for `cert_validity` from the moment it
    /// answers.
    pub fn new(authority: &AuthorityKeypair, cert_validity: Duration) -> Result<Self, Sv2Error> {
        let inner =
            Responder::from_authority_kp(&authority.public.0, &authority.secret, cert_validity)
                .map_err(|e| Sv2Error::Handshake(format!("{e:?}")))?;
        Ok(Self { inner })
    }

    /// Answers the initiator's first message; returns the reply to send (234 bytes) and the
    /// transport codec.
    pub fn respond(
        mut self,
        first: &[u8],
        now_secs: u32,
    ) -> Result<([u8; RESPONDER_MSG_LEN], NoiseCodec), Sv2Error> {
        let first: [u8; INITIATOR_MSG_LEN] =
            first.try_into().map_err(|_| Sv2Error::HandshakeLength {
                expected: INITIATOR_MSG_LEN,
                got: first.len(),
            })?;
        let (reply, engine) = self
            .inner
            .step_1_with_now_rng(first, now_secs, &mut rand::thread_rng())
            .map_err(|e| Sv2Error::Handshake(format!("step 1: {e:?}")))?;
        let (enc, dec) = engine.into_split();
        Ok((reply, NoiseCodec::new(enc, dec)))
    }
}

/// Codec for the two unframed handshake messages: decodes exactly `expected` bytes, encodes
/// raw bytes. Swap it for the [`NoiseCodec`] with `Framed::map_codec` afterwards.
#[derive(Debug, Clone, Copy)]
pub struct HandshakeCodec {
    expected: usize,
}

impl HandshakeCodec {
    /// For the initiator: waits for the responder's 234-byte reply.
    pub fn initiator() -> Self {
        Self {
            expected: RESPONDER_MSG_LEN,
        }
    }

    /// For the responder: waits for the initiator's 64-byte message.
    pub fn responder() -> Self {
        Self {
            expected: INITIATOR_MSG_LEN,
        }
    }
}

impl Decoder for HandshakeCodec {
    type Item = Vec<u8>;
    type Error = Sv2Error;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Vec<u8>>, Sv2Error> {
        if src.len() < self.expected {
            src.reserve(self.expected - src.len());
            return Ok(None);
        }
        Ok(Some(src.split_to(self.expected).to_vec()))
    }
}

impl Encoder<&[u8]> for HandshakeCodec {
    type Error = Sv2Error;

    fn encode(&mut self, item: &[u8], dst: &mut BytesMut) -> Result<(), Sv2Error> {
        dst.extend_from_slice(item);
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Frames

/// One plaintext SV2 frame: header plus serialized payload. Cheap to forward without parsing.
#[derive(Clone)]
pub struct Frame {
    header: Header,
    payload: Vec<u8>,
}

impl Frame {
    /// Serializes a message into a frame (header fields come from the message itself).
    pub fn from_message(msg: Message) -> Result<Self, Sv2Error> {
        let (msg_type, ext_type, channel) =
            (msg.message_type(), msg.extension_type(), msg.channel_bit());
        let frame = MessageFrame::from_message(msg, msg_type, ext_type, channel)
            .map_err(|e| Sv2Error::Encode(e.to_string()))?;
        let mut bytes = vec![0u8; frame.encoded_length()];
        frame
            .encode_into(&mut bytes)
            .map_err(|e| Sv2Error::Encode(e.to_string()))?;
        let header = Header::from_bytes(&bytes).map_err(|e| Sv2Error::Encode(e.to_string()))?;
        bytes.drain(..HEADER_LEN);
        Ok(Self {
            header,
            payload: bytes,
        })
    }

    /// Splits one plaintext frame (header ‖ payload) off the front of `buf`, as carried inside
    /// the Noise transport: `Ok(None)` until all of it is there, an error when the header
    /// announces more than `max_payload` bytes. Returns the frame and the bytes it used.
    pub fn parse_plain(buf: &[u8], max_payload: usize) -> Result<Option<(Self, usize)>, Sv2Error> {
        if buf.len() < HEADER_LEN {
            return Ok(None);
        }
        let header = Header::from_bytes(&buf[..HEADER_LEN]).map_err(|e| Sv2Error::Parse {
            msg_type: buf[2],
            ext_type: u16::from_le_bytes([buf[0], buf[1]]),
            reason: e.to_string(),
        })?;
        let len = header.payload_length();
        if len > max_payload {
            return Err(Sv2Error::FrameTooLarge {
                len,
                max: max_payload,
            });
        }
        let Some(payload) = buf.get(HEADER_LEN..HEADER_LEN + len) else {
            return Ok(None);
        };
        let frame = Self {
            header,
            payload: payload.to_vec(),
        };
        Ok(Some((frame, HEADER_LEN + len)))
    }

    /// The frame as plaintext bytes (header ‖ payload), the inverse of [`Frame::parse_plain`].
    pub fn to_plain(&self) -> Result<Vec<u8>, Sv2Error> {
        let mut out = vec![0u8; HEADER_LEN];
        self.header
            .write_into(&mut out)
            .map_err(|e| Sv2Error::Encode(e.to_string()))?;
        out.extend_from_slice(&self.payload);
        Ok(out)
    }

    /// The frame header (for `parsers_sv2` helpers that take it).
    pub(crate) fn header(&self) -> Header {
        self.header
    }

    /// Message type byte.
    pub fn msg_type(&self) -> u8 {
        self.header.msg_type()
    }

    /// Extension type, channel bit included.
    pub fn ext_type(&self) -> u16 {
        self.header.ext_type()
    }

    /// Whether the channel bit is set (payload then starts with a channel id).
    pub fn is_channel_msg(&self) -> bool {
        self.header.channel_msg()
    }

    /// The serialized message.
    pub fn payload(&self) -> &[u8] {
        &self.payload
    }

    /// Parses the payload into a message.
    pub fn to_message(&self) -> Result<Message, Sv2Error> {
        let mut payload = self.payload.clone();
        let parsed: Result<AnyMessage<'_>, _> = (self.header, payload.as_mut_slice()).try_into();
        parsed
            .map(AnyMessage::into_owned)
            .map_err(|e| Sv2Error::Parse {
                msg_type: self.msg_type(),
                ext_type: self.ext_type(),
                reason: e.to_string(),
            })
    }
}

impl fmt::Debug for Frame {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Frame")
            .field("ext_type", &self.ext_type())
            .field("msg_type", &self.msg_type())
            .field("len", &self.payload.len())
            .finish()
    }
}

// ---------------------------------------------------------------------------------------------
// Transport codec

#[derive(Debug)]
enum ReadState {
    Header,
    Payload(Header),
}

/// Encrypted SV2 transport codec: decodes [`Frame`]s, encodes [`Frame`]s or [`Message`]s.
///
/// Any decode error leaves the codec [`Sv2Error::Broken`]: after a failed decryption the two
/// sides' nonces disagree and the connection must be dropped.
pub struct NoiseCodec {
    enc: NoiseEncryptor,
    dec: NoiseDecryptor,
    max_payload: usize,
    state: ReadState,
    broken: bool,
}

impl NoiseCodec {
    fn new(enc: NoiseEncryptor, dec: NoiseDecryptor) -> Self {
        Self {
            enc,
            dec,
            max_payload: DEFAULT_MAX_PAYLOAD,
            state: ReadState::Header,
            broken: false,
        }
    }

    /// Sets the largest payload accepted from the peer (default [`DEFAULT_MAX_PAYLOAD`]).
    pub fn with_max_payload(mut self, max: usize) -> Self {
        self.max_payload = max;
        self
    }

    fn decrypt(&mut self, mut buf: Vec<u8>) -> Result<Vec<u8>, Sv2Error> {
        self.dec.decrypt(&mut buf).map_err(|_| Sv2Error::Decrypt)?;
        Ok(buf)
    }

    fn decode_inner(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, Sv2Error> {
        loop {
            match self.state {
                ReadState::Header => {
                    if src.len() < ENCRYPTED_HEADER_LEN {
                        src.reserve(ENCRYPTED_HEADER_LEN - src.len());
                        return Ok(None);
                    }
                    let plain = self.decrypt(src.split_to(ENCRYPTED_HEADER_LEN).to_vec())?;
                    let header = Header::from_bytes(&plain).map_err(|_| Sv2Error::Decrypt)?;
                    let len = header.payload_length();
                    if len > self.max_payload {
                        return Err(Sv2Error::FrameTooLarge {
                            len,
                            max: self.max_payload,
                        });
                    }
                    if len == 0 {
                        return Ok(Some(Frame {
                            header,
                            payload: Vec::new(),
                        }));
                    }
                    self.state = ReadState::Payload(header);
                }
                ReadState::Payload(header) => {
                    let wire_len = encrypted_payload_length(&header);
                    if src.len() < wire_len {
                        src.reserve(wire_len - src.len());
                        return Ok(None);
                    }
                    let mut payload = Vec::with_capacity(header.payload_length());
                    let mut wire = src.split_to(wire_len);
                    while wire.has_remaining() {
                        let n = wire.len().min(WIRE_CHUNK);
                        let chunk = self.decrypt(wire.split_to(n).to_vec())?;
                        payload.extend_from_slice(&chunk);
                    }
                    self.state = ReadState::Header;
                    return Ok(Some(Frame { header, payload }));
                }
            }
        }
    }
}

impl fmt::Debug for NoiseCodec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NoiseCodec")
            .field("max_payload", &self.max_payload)
            .field("broken", &self.broken)
            .finish()
    }
}

impl Decoder for NoiseCodec {
    type Item = Frame;
    type Error = Sv2Error;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, Sv2Error> {
        if self.broken {
            return Err(Sv2Error::Broken);
        }
        let res = self.decode_inner(src);
        if res.is_err() {
            self.broken = true;
        }
        res
    }
}

impl Encoder<Frame> for NoiseCodec {
    type Error = Sv2Error;

    fn encode(&mut self, frame: Frame, dst: &mut BytesMut) -> Result<(), Sv2Error> {
        let mut header = vec![0u8; HEADER_LEN];
        frame
            .header
            .write_into(&mut header)
            .map_err(|e| Sv2Error::Encode(e.to_string()))?;
        self.enc
            .encrypt(&mut header)
            .map_err(|_| Sv2Error::Encrypt)?;
        dst.reserve(header.len() + encrypted_payload_length(&frame.header));
        dst.put_slice(&header);
        for chunk in frame.payload.chunks(SV2_FRAME_PLAINTEXT_CHUNK_SIZE) {
            let mut buf = chunk.to_vec();
            self.enc.encrypt(&mut buf).map_err(|_| Sv2Error::Encrypt)?;
            dst.put_slice(&buf);
        }
        Ok(())
    }
}

impl Encoder<Message> for NoiseCodec {
    type Error = Sv2Error;

    fn encode(&mut self, msg: Message, dst: &mut BytesMut) -> Result<(), Sv2Error> {
        self.encode(Frame::from_message(msg)?, dst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use stratum_core::{
        codec_sv2::{self, NoiseEncoder},
        common_messages_sv2::{Protocol, SetupConnectionOwned},
        mining_sv2::SubmitSharesStandard,
    };

    // SRI example authority pair (test key, published in SRI's configs).
    const PUB: &str = "9auqWEzQDVyd2oe1JVGFLMLHZtCo2FFqZwtKA5gd9xbuEu7PH72";
    const SEC: &str = "mkDLTBBRxdBv998612qipDYoTK3YUrqLe8uWw7gu3iXbSrn2n";
    const NOW: u32 = 1_700_000_000;

    fn keypair() -> AuthorityKeypair {
        AuthorityKeypair::from_strs(PUB, SEC).unwrap()
    }

    fn pair() -> (NoiseCodec, NoiseCodec) {
        let kp = keypair();
        let (ini, first) = InitiatorHandshake::new(&kp.public()).unwrap();
        let resp = ResponderHandshake::new(&kp, Duration::from_secs(3600)).unwrap();
        let (reply, server) = resp.respond(&first, NOW).unwrap();
        assert_eq!(reply.len(), 234);
        let client = ini.finish(&reply, NOW + 1).unwrap();
        (client, server)
    }

    fn setup_msg() -> Message {
        let sc = SetupConnectionOwned {
            protocol: Protocol::MiningProtocol,
            min_version: 2,
            max_version: 2,
            flags: 0,
            endpoint_host: "127.0.0.1".to_string().try_into().unwrap(),
            endpoint_port: 3333,
            vendor: "gridproxy".to_string().try_into().unwrap(),
            hardware_version: "".to_string().try_into().unwrap(),
            firmware: "".to_string().try_into().unwrap(),
            device_id: "t".to_string().try_into().unwrap(),
        };
        AnyMessageOwned::Common(CommonMessagesOwned::SetupConnection(sc))
    }

    fn share(seq: u32) -> Message {
        AnyMessageOwned::Mining(MiningOwned::SubmitSharesStandard(SubmitSharesStandard {
            channel_id: 7,
            sequence_number: seq,
            job_id: 3,
            nonce: 0xdead_beef,
            ntime: NOW,
            version: 0x2000_0000,
        }))
    }

    #[test]
    fn keys_parse_and_round_trip() {
        let kp = keypair();
        assert_eq!(kp.public().to_string(), PUB);
        assert_eq!(kp.secret_string(), SEC);
        assert!(!format!("{kp:?}").contains(SEC));
    }

    #[test]
    fn bad_keys_give_typed_errors() {
        assert!(matches!(
            "not-base58-0OIl".parse::<AuthorityPublicKey>(),
            Err(KeyError::Base58(_))
        ));
        // A valid base58check string of the wrong length (the secret key).
        assert!(matches!(
            SEC.parse::<AuthorityPublicKey>(),
            Err(KeyError::Length {
                expected: 34,
                got: 32
            })
        ));
        let mut raw = vec![2u8, 0];
        raw.extend_from_slice(keypair().public().as_bytes());
        assert_eq!(
            base58::encode_check(&raw).parse::<AuthorityPublicKey>(),
            Err(KeyError::Version(2))
        );
        let other = AuthorityKeypair::from_secret_bytes([7u8; 32]).unwrap();
        assert_eq!(
            AuthorityKeypair::from_strs(&other.public().to_string(), SEC).unwrap_err(),
            KeyError::Mismatch
        );
    }

    #[test]
    fn handshake_and_frame_round_trip() {
        let (mut client, mut server) = pair();
        let mut wire = BytesMut::new();
        client.encode(setup_msg(), &mut wire).unwrap();
        client.encode(share(1), &mut wire).unwrap();
        // Feed byte by byte: partial input must never yield a frame early.
        let mut inbuf = BytesMut::new();
        let mut got = Vec::new();
        for b in wire.iter() {
            inbuf.put_u8(*b);
            while let Some(f) = server.decode(&mut inbuf).unwrap() {
                got.push(f);
            }
        }
        assert_eq!(got.len(), 2);
        match got[0].to_message().unwrap() {
            AnyMessageOwned::Common(CommonMessagesOwned::SetupConnection(sc)) => {
                assert_eq!(sc.endpoint_port, 3333)
            }
            other => panic!("unexpected {other:?}"),
        }
        match got[1].to_message().unwrap() {
            AnyMessageOwned::Mining(MiningOwned::SubmitSharesStandard(s)) => {
                assert_eq!((s.sequence_number, s.nonce), (1, 0xdead_beef))
            }
            other => panic!("unexpected {other:?}"),
        }
        // And the other direction.
        let mut back = BytesMut::new();
        server.encode(share(2), &mut back).unwrap();
        let f = client.decode(&mut back).unwrap().unwrap();
        assert!(f.is_channel_msg());
        assert!(back.is_empty());
    }

    #[test]
    fn big_frames_span_chunks() {
        let (mut client, mut server) = pair();
        let payload = vec![0xab; 150_000];
        let frame = Frame {
            header: Header::from_bytes(&[0, 0, 0x70, 0xf0, 0x49, 0x02]).unwrap(),
            payload: payload.clone(),
        };
        assert_eq!(frame.header.payload_length(), 150_000);
        let mut wire = BytesMut::new();
        client.encode(frame, &mut wire).unwrap();
        assert_eq!(
            wire.len(),
            ENCRYPTED_HEADER_LEN + 150_000 + 3 * AEAD_MAC_LEN
        );
        let got = server.decode(&mut wire).unwrap().unwrap();
        assert_eq!(got.payload(), &payload[..]);
    }

    #[test]
    fn oversize_frames_are_rejected() {
        let (mut client, server) = pair();
        let mut server = server.with_max_payload(16);
        let mut wire = BytesMut::new();
        client.encode(setup_msg(), &mut wire).unwrap();
        match server.decode(&mut wire) {
            Err(Sv2Error::FrameTooLarge { max: 16, len }) => assert!(len > 16),
            other => panic!("expected FrameTooLarge, got {other:?}"),
        }
        assert!(matches!(server.decode(&mut wire), Err(Sv2Error::Broken)));
    }

    #[test]
    fn wrong_authority_key_is_refused() {
        let real = keypair();
        let other = AuthorityKeypair::from_secret_bytes([42u8; 32]).unwrap();
        let (ini, first) = InitiatorHandshake::new(&other.public()).unwrap();
        let resp = ResponderHandshake::new(&real, Duration::from_secs(3600)).unwrap();
        let (reply, _) = resp.respond(&first, NOW).unwrap();
        assert!(matches!(
            ini.finish(&reply, NOW),
            Err(Sv2Error::BadCertificate)
        ));
    }

    #[test]
    fn expired_certificate_is_refused() {
        let kp = keypair();
        let (ini, first) = InitiatorHandshake::new(&kp.public()).unwrap();
        let resp = ResponderHandshake::new(&kp, Duration::from_secs(60)).unwrap();
        let (reply, _) = resp.respond(&first, NOW).unwrap();
        assert!(matches!(
            ini.finish(&reply, NOW + 3600),
            Err(Sv2Error::BadCertificate)
        ));
    }

    #[test]
    fn handshake_length_is_checked() {
        let kp = keypair();
        let resp = ResponderHandshake::new(&kp, Duration::from_secs(60)).unwrap();
        assert!(matches!(
            resp.respond(&[0u8; 10], NOW),
            Err(Sv2Error::HandshakeLength {
                expected: 64,
                got: 10
            })
        ));
    }

    #[test]
    fn corrupted_ciphertext_is_an_error_not_a_panic() {
        for pos in [0usize, 5, 21, 22, 30] {
            let (mut client, mut server) = pair();
            let mut wire = BytesMut::new();
            client.encode(setup_msg(), &mut wire).unwrap();
            wire[pos] ^= 0x01;
            let mut res = server.decode(&mut wire);
            while let Ok(None) = res {
                res = server.decode(&mut wire);
                if wire.is_empty() {
                    break;
                }
            }
            assert!(
                matches!(res, Err(Sv2Error::Decrypt | Sv2Error::FrameTooLarge { .. })),
                "flip at {pos}: {res:?}"
            );
        }
    }

    #[test]
    fn garbage_payload_is_a_parse_error() {
        let (mut client, mut server) = pair();
        // SubmitSharesStandard type with a 3-byte payload: too short to parse.
        let frame = Frame {
            header: Header::from_bytes(&[0, 0x80, 0x1a, 3, 0, 0]).unwrap(),
            payload: vec![1, 2, 3],
        };
        let mut wire = BytesMut::new();
        client.encode(frame, &mut wire).unwrap();
        let got = server.decode(&mut wire).unwrap().unwrap();
        assert!(matches!(
            got.to_message(),
            Err(Sv2Error::Parse { msg_type: 0x1a, .. })
        ));
    }

    #[test]
    fn interoperates_with_sri_codec() {
        // SRI's initiator and encoder on one side, ours on the other: same bytes on the wire.
        let kp = keypair();
        let ini = codec_sv2::Handshake::initiator(
            Initiator::from_raw_k(*kp.public().as_bytes()).unwrap(),
        );
        let (first, ini) = ini.step_0().unwrap();
        let resp = ResponderHandshake::new(&kp, Duration::from_secs(3600)).unwrap();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as u32;
        let (reply, mut ours) = resp.respond(first.payload(), now).unwrap();
        let (mut sri_enc, _) = ini.step_2(reply).unwrap().split();
        let msg = share(9);
        let frame = MessageFrame::from_message(
            msg.clone(),
            msg.message_type(),
            msg.extension_type(),
            msg.channel_bit(),
        )
        .unwrap();
        let bytes = NoiseEncoder::new()
            .encode_transport(frame, &mut sri_enc)
            .unwrap();
        let mut wire = BytesMut::from(AsRef::<[u8]>::as_ref(&bytes));
        let got = ours.decode(&mut wire).unwrap().unwrap();
        match got.to_message().unwrap() {
            AnyMessageOwned::Mining(MiningOwned::SubmitSharesStandard(s)) => {
                assert_eq!(s.sequence_number, 9)
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}
