//! SV2 extension negotiation with a pool, sans-IO: what gridproxy asks for
//! after `SetupConnection.Success` and what the answer means.
//!
//! sv2-spec `extensions/0x0001-extensions-negotiation.md`: a client MUST send
//! `RequestExtensions` right after `SetupConnection.Success` (§1.1, §4.2) and
//! wait for the answer before any other message; it MUST NOT use an
//! extension the answer does not confirm (§1.1); a pool that requires an
//! extension not requested lists it in `RequestExtensions.Error` and
//! disconnects (§4.6); a pool without extension negotiation ignores the
//! request (§4.3), so the wait is bounded and the session goes on without
//! extensions. gridproxy asks for 0x0002 (worker-specific hashrate tracking,
//! `extensions/0x0002-worker-specific-hashrate-tracking.md`) when the pool's
//! `worker_identity` is on, and for nothing when it is off: the request is
//! still sent, so a pool that requires 0x0002 says so.

use crate::error::UpstreamError;
use crate::stats::IdentityNegotiation;
use gridproxy_protocol::sv2::binary_sv2::Seq064KOwned as Seq064K;
use gridproxy_protocol::sv2::Message;
use gridproxy_protocol::sv2_ext::{
    ExtensionsNegotiationOwned, ExtensionsOwned, RequestExtensionsOwned,
    EXTENSION_TYPE_WORKER_HASHRATE_TRACKING,
};
use std::time::Duration;

/// The `request_id` of our one `RequestExtensions` per connection.
const REQUEST_ID: u16 = 1;

/// The shortest wait for the pool's answer.
pub const MIN_WAIT: Duration = Duration::from_secs(1);
/// The longest.
pub const MAX_WAIT: Duration = Duration::from_secs(5);

/// How long to wait for the answer after a `SetupConnection` that took
/// `setup_rtt`: twice that (0x0001 §4.3's suggestion), within
/// [`MIN_WAIT`]..=[`MAX_WAIT`].
pub fn answer_wait(setup_rtt: Duration) -> Duration {
    (setup_rtt * 2).clamp(MIN_WAIT, MAX_WAIT)
}

/// One connection's negotiation.
#[derive(Debug, Clone)]
pub struct Negotiation {
    requested: Vec<u16>,
}

/// What the pool's answer means for the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Negotiated {
    /// Shares carry the worker's `user_identity` TLV.
    pub worker_identity: bool,
    /// For the metric.
    pub result: IdentityNegotiation,
}

impl Negotiation {
    /// `worker_identity`: the pool's config option.
    pub fn new(worker_identity: bool) -> Self {
        let requested = if worker_identity {
            vec![EXTENSION_TYPE_WORKER_HASHRATE_TRACKING]
        } else {
            vec![]
        };
        Self { requested }
    }

    /// The `RequestExtensions` to send.
    pub fn request(&self) -> Message {
        Message::Extensions(ExtensionsOwned::ExtensionsNegotiation(
            ExtensionsNegotiationOwned::RequestExtensions(RequestExtensionsOwned {
                request_id: REQUEST_ID,
                requested_extensions: Seq064K::new(self.requested.clone())
                    .expect("one or no extension fits"),
            }),
        ))
    }

    fn asked_identity(&self) -> bool {
        self.requested
            .contains(&EXTENSION_TYPE_WORKER_HASHRATE_TRACKING)
    }

    fn without(&self, refused: IdentityNegotiation) -> Negotiated {
        Negotiated {
            worker_identity: false,
            result: if self.asked_identity() {
                refused
            } else {
                IdentityNegotiation::Disabled
            },
        }
    }

    /// The pool's answer, if `msg` is one to our request (`None`: not an
    /// answer, keep waiting). An error ends the connection: the pool
    /// requires an extension we did not ask for.
    pub fn on_message(&self, msg: &Message) -> Option<Result<Negotiated, UpstreamError>> {
        let Message::Extensions(ExtensionsOwned::ExtensionsNegotiation(m)) = msg else {
            return None;
        };
        match m {
            ExtensionsNegotiationOwned::RequestExtensionsSuccess(s)
                if s.request_id == REQUEST_ID =>
            {
                // Only what was both requested and confirmed may be used.
                let granted = self.asked_identity()
                    && s.supported_extensions
                        .clone()
                        .into_inner()
                        .contains(&EXTENSION_TYPE_WORKER_HASHRATE_TRACKING);
                Some(Ok(if granted {
                    Negotiated {
                        worker_identity: true,
                        result: IdentityNegotiation::Granted,
                    }
                } else {
                    self.without(IdentityNegotiation::Refused)
                }))
            }
            ExtensionsNegotiationOwned::RequestExtensionsError(e) if e.request_id == REQUEST_ID => {
                let required: Vec<u16> = e
                    .required_extensions
                    .clone()
                    .into_inner()
                    .into_iter()
                    .filter(|x| !self.requested.contains(x))
                    .collect();
                if required.is_empty() {
                    Some(Ok(self.without(IdentityNegotiation::Refused)))
                } else {
                    Some(Err(UpstreamError::ExtensionsRequired {
                        identity_off: required.contains(&EXTENSION_TYPE_WORKER_HASHRATE_TRACKING),
                        required,
                    }))
                }
            }
            _ => None,
        }
    }

    /// The pool refused (for the metric when it also ends the connection).
    pub fn refused(&self) -> Negotiated {
        self.without(IdentityNegotiation::Refused)
    }

    /// No answer in time: go on without extensions.
    pub fn no_answer(&self) -> Negotiated {
        self.without(IdentityNegotiation::NoAnswer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gridproxy_protocol::sv2::{CommonMessagesOwned, Frame};
    use gridproxy_protocol::sv2_ext::{RequestExtensionsErrorOwned, RequestExtensionsSuccessOwned};

    fn success(id: u16, exts: Vec<u16>) -> Message {
        Message::Extensions(ExtensionsOwned::ExtensionsNegotiation(
            ExtensionsNegotiationOwned::RequestExtensionsSuccess(RequestExtensionsSuccessOwned {
                request_id: id,
                supported_extensions: Seq064K::new(exts).unwrap(),
            }),
        ))
    }

    fn error(unsupported: Vec<u16>, required: Vec<u16>) -> Message {
        Message::Extensions(ExtensionsOwned::ExtensionsNegotiation(
            ExtensionsNegotiationOwned::RequestExtensionsError(RequestExtensionsErrorOwned {
                request_id: REQUEST_ID,
                unsupported_extensions: Seq064K::new(unsupported).unwrap(),
                required_extensions: Seq064K::new(required).unwrap(),
            }),
        ))
    }

    const GRANTED: Negotiated = Negotiated {
        worker_identity: true,
        result: IdentityNegotiation::Granted,
    };

    fn without(result: IdentityNegotiation) -> Negotiated {
        Negotiated {
            worker_identity: false,
            result,
        }
    }

    #[test]
    fn granted_only_when_requested_and_confirmed() {
        let on = Negotiation::new(true);
        assert_eq!(
            on.on_message(&success(1, vec![2])).unwrap().unwrap(),
            GRANTED
        );
        assert_eq!(
            on.on_message(&success(1, vec![2, 3])).unwrap().unwrap(),
            GRANTED
        );
        // A success that leaves 0x0002 out: not granted.
        assert_eq!(
            on.on_message(&success(1, vec![])).unwrap().unwrap(),
            without(IdentityNegotiation::Refused)
        );
        // Off: a success that lists 0x0002 anyway is not used.
        let off = Negotiation::new(false);
        assert_eq!(
            off.on_message(&success(1, vec![2])).unwrap().unwrap(),
            without(IdentityNegotiation::Disabled)
        );
    }

    #[test]
    fn an_error_without_requirements_goes_on_without() {
        let on = Negotiation::new(true);
        assert_eq!(
            on.on_message(&error(vec![2], vec![])).unwrap().unwrap(),
            without(IdentityNegotiation::Refused)
        );
        let off = Negotiation::new(false);
        assert_eq!(
            off.on_message(&error(vec![], vec![])).unwrap().unwrap(),
            without(IdentityNegotiation::Disabled)
        );
    }

    #[test]
    fn a_required_extension_not_requested_ends_the_connection() {
        let off = Negotiation::new(false);
        let e = off
            .on_message(&error(vec![], vec![2]))
            .unwrap()
            .unwrap_err();
        assert!(matches!(
            &e,
            UpstreamError::ExtensionsRequired { required, identity_off: true } if required == &[2]
        ));
        assert_eq!(
            e.to_string(),
            "the pool requires SV2 extension 0x0002 and closes the connection without: 0x0002 (worker-specific hashrate tracking) is off for this pool, set worker_identity = true"
        );
        // One we do not implement.
        let on = Negotiation::new(true);
        let e = on
            .on_message(&error(vec![], vec![2, 5]))
            .unwrap()
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "the pool requires SV2 extension 0x0005, which gridproxy does not support, and closes the connection without"
        );
    }

    #[test]
    fn other_messages_and_other_request_ids_are_not_the_answer() {
        let on = Negotiation::new(true);
        assert!(on.on_message(&success(9, vec![2])).is_none());
        let setup_ok = Message::Common(CommonMessagesOwned::SetupConnectionSuccess(
            gridproxy_protocol::sv2::common_messages_sv2::SetupConnectionSuccess {
                used_version: 2,
                flags: 0,
            },
        ));
        assert!(on.on_message(&setup_ok).is_none());
        assert_eq!(on.no_answer(), without(IdentityNegotiation::NoAnswer));
        assert_eq!(
            Negotiation::new(false).no_answer(),
            without(IdentityNegotiation::Disabled)
        );
    }

    #[test]
    fn the_wait_is_twice_the_setup_within_bounds() {
        assert_eq!(answer_wait(Duration::from_millis(2)), MIN_WAIT);
        assert_eq!(
            answer_wait(Duration::from_millis(900)),
            Duration::from_millis(1800)
        );
        assert_eq!(answer_wait(Duration::from_secs(30)), MAX_WAIT);
    }

    /// Golden bytes: the plaintext `RequestExtensions` frame gridproxy sends,
    /// against the layout in 0x0001 §2-3 and the frame header of
    /// `03-Protocol-Overview.md` §3.2, written out by hand.
    #[test]
    fn request_extensions_frame_golden_bytes() {
        let ours = Frame::from_message(Negotiation::new(true).request())
            .unwrap()
            .to_plain()
            .unwrap();
        #[rustfmt::skip]
        let spec: [u8; 12] = [
            // header: extension_type U16 = 0x0001 (channel_msg bit 0), msg_type U8 = 0x00,
            // msg_length U24 = 6
            0x01, 0x00, 0x00, 0x06, 0x00, 0x00,
            // request_id U16 = 1
            0x01, 0x00,
            // requested_extensions SEQ0_64K[U16]: length U16 = 1, then 0x0002
            0x01, 0x00, 0x02, 0x00,
        ];
        assert_eq!(ours, spec);
        // Off: the same message, an empty list.
        let ours = Frame::from_message(Negotiation::new(false).request())
            .unwrap()
            .to_plain()
            .unwrap();
        assert_eq!(
            ours,
            [0x01, 0x00, 0x00, 0x04, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00]
        );
    }
}
