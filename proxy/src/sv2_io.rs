//! SV2 I/O edge: the Noise handshake over a TCP stream (both roles) and
//! reading whole messages from a `Framed` transport.

use futures::{SinkExt, StreamExt};
use gridproxy_protocol::sv2::{
    AuthorityKeypair, AuthorityPublicKey, HandshakeCodec, InitiatorHandshake, Message, NoiseCodec,
    ResponderHandshake, Sv2Error,
};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::codec::Framed;

/// Seconds since the Unix epoch (certificate validity, job times).
pub fn unix_now() -> u32 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as u32)
        .unwrap_or(0)
}

fn eof(what: &str) -> Sv2Error {
    Sv2Error::Io(std::io::Error::new(
        std::io::ErrorKind::UnexpectedEof,
        what.to_string(),
    ))
}

/// Initiator handshake pinned to `authority`; returns the encrypted transport.
pub async fn connect_noise<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    authority: &AuthorityPublicKey,
) -> Result<Framed<S, NoiseCodec>, Sv2Error> {
    let (hs, first) = InitiatorHandshake::new(authority)?;
    let mut framed = Framed::new(stream, HandshakeCodec::initiator());
    framed.send(&first[..]).await?;
    let reply = framed
        .next()
        .await
        .ok_or_else(|| eof("peer closed during the handshake"))??;
    let codec = hs.finish(&reply, unix_now())?;
    Ok(framed.map_codec(|_| codec))
}

/// Responder handshake with our authority key pair.
pub async fn accept_noise<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    authority: &AuthorityKeypair,
    cert_validity: Duration,
    max_frame: usize,
) -> Result<Framed<S, NoiseCodec>, Sv2Error> {
    let hs = ResponderHandshake::new(authority, cert_validity)?;
    let mut framed = Framed::new(stream, HandshakeCodec::responder());
    let first = framed
        .next()
        .await
        .ok_or_else(|| eof("peer closed during the handshake"))??;
    let (reply, codec) = hs.respond(&first, unix_now())?;
    framed.send(&reply[..]).await?;
    Ok(framed.map_codec(|_| codec.with_max_payload(max_frame)))
}

/// The next message, or an error when the peer closed or sent garbage.
pub async fn next_msg<S: AsyncRead + AsyncWrite + Unpin>(
    framed: &mut Framed<S, NoiseCodec>,
) -> Result<Message, Sv2Error> {
    let frame = framed
        .next()
        .await
        .ok_or_else(|| eof("peer closed the connection"))??;
    frame.to_message()
}
