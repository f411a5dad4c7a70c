//! SV2: arbitrary bytes split into plaintext frames and each payload decoded
//! as a message (common, mining, template distribution). A message that
//! decodes must re-encode to a frame that decodes to the same message, and
//! every frame must cross the Noise transport (our encrypting codec, then
//! our decrypting codec fed in arbitrary pieces) unchanged.
#![no_main]

use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use bytes::BytesMut;
use gridproxy_fuzz::Input;
use gridproxy_protocol::sv2::{
    AuthorityKeypair, Frame, InitiatorHandshake, NoiseCodec, ResponderHandshake, Sv2Error,
};
use libfuzzer_sys::fuzz_target;
use tokio_util::codec::{Decoder, Encoder};

const MAX_PAYLOAD: usize = 64 * 1024;

/// One handshake for the whole run: it costs far more than a fuzz input,
/// and the transport's behaviour does not depend on the nonce reached.
fn transport() -> &'static Mutex<(NoiseCodec, NoiseCodec)> {
    static PAIR: OnceLock<Mutex<(NoiseCodec, NoiseCodec)>> = OnceLock::new();
    PAIR.get_or_init(|| {
        let kp = AuthorityKeypair::from_secret_bytes([7u8; 32]).expect("fixed key");
        let (ini, first) = InitiatorHandshake::new(&kp.public()).expect("initiator");
        let resp = ResponderHandshake::new(&kp, Duration::from_secs(3600)).expect("responder");
        let now = 1_700_000_000;
        let (reply, server) = resp.respond(&first, now).expect("respond");
        let client = ini.finish(&reply, now).expect("finish");
        Mutex::new((client, server.with_max_payload(MAX_PAYLOAD)))
    })
}

fn check_message(frame: &Frame) {
    let msg = match frame.to_message() {
        Ok(m) => m,
        Err(e) => {
            assert!(matches!(e, Sv2Error::Parse { .. }), "{e:?}");
            return;
        }
    };
    let shown = format!("{msg:?}");
    let again = Frame::from_message(msg)
        .unwrap_or_else(|e| panic!("decoded message does not re-encode: {e}: {shown}"));
    assert_eq!(again.msg_type(), frame.msg_type(), "{shown}");
    let back = again
        .to_message()
        .unwrap_or_else(|e| panic!("re-encoded message does not decode: {e}: {shown}"));
    assert_eq!(format!("{back:?}"), shown, "message changed on re-encoding");
    let third = Frame::from_message(back).expect("re-encodes");
    assert_eq!(third.payload(), again.payload(), "encoding is not stable");
}

fn cross_noise(frames: &[Frame], cut_seed: u16) {
    let mut pair = transport().lock().unwrap_or_else(|e| e.into_inner());
    let (client, server) = &mut *pair;
    let mut wire = BytesMut::new();
    for f in frames {
        client.encode(f.clone(), &mut wire).expect("encrypt");
    }
    let mut got = Vec::new();
    let mut inbuf = BytesMut::new();
    let cuts = cut_seed.to_le_bytes();
    let mut i = 0;
    while !wire.is_empty() {
        // Pieces of 1..=1021 bytes, from the input: header and MAC splits.
        let n = (usize::from(cuts[i % 2]) * 4 + 1).min(wire.len());
        i += 1;
        inbuf.extend_from_slice(&wire.split_to(n));
        while let Some(f) = server.decode(&mut inbuf).expect("decrypt our own frames") {
            got.push(f.to_plain().expect("encode"));
        }
    }
    assert!(inbuf.is_empty());
    let sent: Vec<_> = frames.iter().map(|f| f.to_plain().expect("encode")).collect();
    assert_eq!(got, sent, "noise transport changed the frames");
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let noise = input.byte() & 1 == 1;
    let cut_seed = input.u16();
    let mut buf = input.rest();
    let mut frames = Vec::new();
    loop {
        match Frame::parse_plain(buf, MAX_PAYLOAD) {
            Ok(Some((frame, used))) => {
                assert_eq!(frame.to_plain().expect("encode"), &buf[..used]);
                check_message(&frame);
                frames.push(frame);
                buf = &buf[used..];
            }
            Ok(None) => break,
            Err(Sv2Error::FrameTooLarge { len, max }) => {
                assert!(len > max);
                break;
            }
            Err(e) => panic!("unexpected framing error {e:?}"),
        }
    }
    if noise && !frames.is_empty() {
        cross_noise(&frames, cut_seed);
    }
});
