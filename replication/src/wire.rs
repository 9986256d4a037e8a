//! The binary encoding of [`quorum::Message`](crate::quorum::Message) on the
//! replication transport.
//!
//! **I/O contract: pure functions over byte slices.** No network, no files,
//! no clock. Decoding never panics and never allocates more than the input
//! bounds allow: every length is checked against a fixed limit before use.
//!
//! # Format, version 1
//!
//! All integers are big-endian. A message is exactly one frame of the
//! transport; trailing bytes are an error.
//!
//! ```text
//! message    = version:u8 (0x01) tag:u8 body
//! tag 0x01   CasRequest: req_id:u64 origin:u16 public_id counters nonce digest:[u8; 32]
//! tag 0x02   CasReply:   req_id:u64 public_id counters outcome
//! public_id  = len:u8 (0..=8) bytes
//! counters   = counter:u16 (0..=0x7fff) use:u8
//! nonce      = len:u8 (0..=40) printable ASCII bytes (0x21..=0x7e)
//! outcome    = 0x00 Ack | 0x01 Stale counters | 0x02 Failed
//! ```
//!
//! The limits follow the data: a YubiKey public id is at most 8 bytes,
//! the 15-bit counter is [`otp::counter::MAX_COUNTER`]-bounded, and the verify
//! protocol's nonce is 16 to 40 printable characters (the codec only
//! enforces the upper bound and the alphabet; the validator checks the
//! rest before anything reaches replication).

use std::fmt;

use bytes::{BufMut, Bytes, BytesMut};
use otp::{Counters, PublicId};

use crate::quorum::{Message, OtpDigest, Proposal, ReplyOutcome, RequestId, SiteId};

/// The format version this module writes and reads.
pub const VERSION: u8 = 0x01;
/// Longest nonce, in bytes.
pub const MAX_NONCE: usize = 40;
/// Longest public id, in bytes.
pub const MAX_PUBLIC_ID: usize = 8;
/// Longest encoded message, in bytes (a request with the longest id and
/// nonce).
pub const MAX_MESSAGE: usize = 2 + 8 + 2 + 1 + MAX_PUBLIC_ID + 3 + 1 + MAX_NONCE + 32;

const TAG_CAS_REQUEST: u8 = 0x01;
const TAG_CAS_REPLY: u8 = 0x02;

const OUTCOME_ACK: u8 = 0x00;
const OUTCOME_STALE: u8 = 0x01;
const OUTCOME_FAILED: u8 = 0x02;

/// Why a message could not be encoded or decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum WireError {
    /// The input ended inside a field.
    Truncated,
    /// An unknown format version.
    Version(u8),
    /// An unknown message tag.
    Tag(u8),
    /// An unknown reply outcome tag.
    Outcome(u8),
    /// A public id longer than [`MAX_PUBLIC_ID`].
    PublicIdLength(usize),
    /// A nonce longer than [`MAX_NONCE`].
    NonceLength(usize),
    /// A nonce byte outside printable ASCII.
    NonceCharacter,
    /// A counter above [`otp::counter::MAX_COUNTER`].
    Counter(u16),
    /// Bytes left after a complete message.
    TrailingBytes(usize),
}

impl fmt::Display for WireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Truncated => f.write_str("message truncated"),
            Self::Version(v) => write!(f, "unknown message version 0x{v:02x}"),
            Self::Tag(t) => write!(f, "unknown message tag 0x{t:02x}"),
            Self::Outcome(t) => write!(f, "unknown reply outcome 0x{t:02x}"),
            Self::PublicIdLength(n) => write!(f, "public id of {n} bytes (at most {MAX_PUBLIC_ID})"),
            Self::NonceLength(n) => write!(f, "nonce of {n} bytes (at most {MAX_NONCE})"),
            Self::NonceCharacter => f.write_str("nonce is not printable ASCII"),
            Self::Counter(c) => write!(f, "counter 0x{c:04x} above the 15-bit maximum"),
            Self::TrailingBytes(n) => write!(f, "{n} bytes after the message"),
        }
    }
}

impl std::error::Error for WireError {}

/// Encodes `message`. Fails only for a nonce the format cannot carry
/// (longer than [`MAX_NONCE`] or not printable ASCII).
pub fn encode(message: &Message) -> Result<Bytes, WireError> {
    let mut out = BytesMut::with_capacity(MAX_MESSAGE);
    out.put_u8(VERSION);
    match message {
        Message::CasRequest { req_id, origin, proposal } => {
            check_nonce(proposal.nonce.as_bytes())?;
            out.put_u8(TAG_CAS_REQUEST);
            out.put_u64(req_id.0);
            out.put_u16(origin.0);
            put_public_id(&mut out, proposal.public_id);
            put_counters(&mut out, proposal.counters);
            // Checked above: at most MAX_NONCE bytes.
            out.put_u8(proposal.nonce.len() as u8);
            out.put_slice(proposal.nonce.as_bytes());
            out.put_slice(&proposal.otp_digest.0);
        }
        Message::CasReply { req_id, public_id, counters, outcome } => {
            out.put_u8(TAG_CAS_REPLY);
            out.put_u64(req_id.0);
            put_public_id(&mut out, *public_id);
            put_counters(&mut out, *counters);
            match outcome {
                ReplyOutcome::Ack => out.put_u8(OUTCOME_ACK),
                ReplyOutcome::Stale { stored } => {
                    out.put_u8(OUTCOME_STALE);
                    put_counters(&mut out, *stored);
                }
                ReplyOutcome::Failed => out.put_u8(OUTCOME_FAILED),
            }
        }
    }
    Ok(out.freeze())
}

/// Decodes one message; the whole input must be that message.
pub fn decode(input: &[u8]) -> Result<Message, WireError> {
    let mut r = Reader { rest: input };
    let version = r.u8()?;
    if version != VERSION {
        return Err(WireError::Version(version));
    }
    let message = match r.u8()? {
        TAG_CAS_REQUEST => {
            let req_id = RequestId(r.u64()?);
            let origin = SiteId(r.u16()?);
            let public_id = r.public_id()?;
            let counters = r.counters()?;
            let nonce = r.nonce()?;
            let otp_digest = OtpDigest(r.array::<32>()?);
            Message::CasRequest { req_id, origin, proposal: Proposal { public_id, counters, nonce, otp_digest } }
        }
        TAG_CAS_REPLY => {
            let req_id = RequestId(r.u64()?);
            let public_id = r.public_id()?;
            let counters = r.counters()?;
            let outcome = match r.u8()? {
                OUTCOME_ACK => ReplyOutcome::Ack,
                OUTCOME_STALE => ReplyOutcome::Stale { stored: r.counters()? },
                OUTCOME_FAILED => ReplyOutcome::Failed,
                other => return Err(WireError::Outcome(other)),
            };
            Message::CasReply { req_id, public_id, counters, outcome }
        }
        other => return Err(WireError::Tag(other)),
    };
    if !r.rest.is_empty() {
        return Err(WireError::TrailingBytes(r.rest.len()));
    }
    Ok(message)
}

fn check_nonce(nonce: &[u8]) -> Result<(), WireError> {
    if nonce.len() > MAX_NONCE {
        return Err(WireError::NonceLength(nonce.len()));
    }
    if !nonce.iter().all(|b| b.is_ascii_graphic()) {
        return Err(WireError::NonceCharacter);
    }
    Ok(())
}

fn put_public_id(out: &mut BytesMut, public_id: PublicId) {
    let bytes = public_id.as_bytes();
    // `PublicId` holds at most 8 bytes.
    out.put_u8(bytes.len() as u8);
    out.put_slice(bytes);
}

fn put_counters(out: &mut BytesMut, counters: Counters) {
    out.put_u16(counters.counter());
    out.put_u8(counters.session_use());
}

/// A cursor that fails with [`WireError::Truncated`] instead of panicking.
struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if self.rest.len() < n {
            return Err(WireError::Truncated);
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.array::<1>()?[0])
    }

    fn u16(&mut self) -> Result<u16, WireError> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, WireError> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    fn public_id(&mut self) -> Result<PublicId, WireError> {
        let len = usize::from(self.u8()?);
        if len > MAX_PUBLIC_ID {
            return Err(WireError::PublicIdLength(len));
        }
        PublicId::from_bytes(self.take(len)?).map_err(|_| WireError::PublicIdLength(len))
    }

    fn counters(&mut self) -> Result<Counters, WireError> {
        let counter = self.u16()?;
        let session_use = self.u8()?;
        Counters::new(counter, session_use).map_err(|_| WireError::Counter(counter))
    }

    fn nonce(&mut self) -> Result<String, WireError> {
        let len = usize::from(self.u8()?);
        if len > MAX_NONCE {
            return Err(WireError::NonceLength(len));
        }
        let bytes = self.take(len)?;
        check_nonce(bytes)?;
        // Printable ASCII is UTF-8.
        String::from_utf8(bytes.to_vec()).map_err(|_| WireError::NonceCharacter)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use proptest::prelude::*;

    fn request(nonce: &str) -> Message {
        Message::CasRequest {
            req_id: RequestId(0x0102_0304_0506_0708),
            origin: SiteId(0x0a0b),
            proposal: Proposal {
                public_id: PublicId::from_bytes(&[0xca, 0xfe, 0xba, 0xbe, 0x00, 0x01]).unwrap(),
                counters: Counters::new(0x1234, 0x56).unwrap(),
                nonce: nonce.to_string(),
                otp_digest: OtpDigest([0x11; 32]),
            },
        }
    }

    fn reply(outcome: ReplyOutcome) -> Message {
        Message::CasReply {
            req_id: RequestId(7),
            public_id: PublicId::from_bytes(&[1, 2, 3]).unwrap(),
            counters: Counters::new(0x7fff, 0xff).unwrap(),
            outcome,
        }
    }

    #[test]
    fn request_layout_is_pinned() {
        let bytes = encode(&request("abc")).unwrap();
        let mut expected = vec![0x01, 0x01, 1, 2, 3, 4, 5, 6, 7, 8, 0x0a, 0x0b, 6, 0xca, 0xfe, 0xba, 0xbe, 0x00, 0x01, 0x12, 0x34, 0x56, 3];
        expected.extend_from_slice(b"abc");
        expected.extend_from_slice(&[0x11; 32]);
        assert_eq!(bytes.as_ref(), expected.as_slice());
    }

    #[test]
    fn reply_layout_is_pinned() {
        let stale = Counters::new(2, 3).unwrap();
        let bytes = encode(&reply(ReplyOutcome::Stale { stored: stale })).unwrap();
        assert_eq!(bytes.as_ref(), &[0x01, 0x02, 0, 0, 0, 0, 0, 0, 0, 7, 3, 1, 2, 3, 0x7f, 0xff, 0xff, 0x01, 0, 2, 3]);
    }

    #[test]
    fn round_trips() {
        let long_nonce = "n".repeat(MAX_NONCE);
        let messages = [
            request(""),
            request("0123456789abcdef"),
            request(&long_nonce),
            reply(ReplyOutcome::Ack),
            reply(ReplyOutcome::Failed),
            reply(ReplyOutcome::Stale { stored: Counters::new(0, 0).unwrap() }),
            Message::CasReply {
                req_id: RequestId(u64::MAX),
                public_id: PublicId::from_bytes(&[]).unwrap(),
                counters: Counters::new(0, 0).unwrap(),
                outcome: ReplyOutcome::Ack,
            },
        ];
        for m in messages {
            let bytes = encode(&m).unwrap();
            assert!(bytes.len() <= MAX_MESSAGE);
            assert_eq!(decode(&bytes).unwrap(), m);
        }
        assert_eq!(encode(&request(&long_nonce)).unwrap().len(), MAX_MESSAGE - 2);
    }

    #[test]
    fn unencodable_nonces_are_refused() {
        assert_eq!(encode(&request(&"n".repeat(MAX_NONCE + 1))), Err(WireError::NonceLength(MAX_NONCE + 1)));
        assert_eq!(encode(&request("with space")), Err(WireError::NonceCharacter));
        assert_eq!(encode(&request("é")), Err(WireError::NonceCharacter));
    }

    #[test]
    fn malformed_input_is_an_error() {
        let good = encode(&request("nonce")).unwrap().to_vec();
        assert_eq!(decode(&[]), Err(WireError::Truncated));
        for cut in 0..good.len() {
            assert_eq!(decode(&good[..cut]), Err(WireError::Truncated), "cut at {cut}");
        }
        let mut v = good.clone();
        v[0] = 0x02;
        assert_eq!(decode(&v), Err(WireError::Version(2)));
        let mut v = good.clone();
        v[1] = 0x03;
        assert_eq!(decode(&v), Err(WireError::Tag(3)));
        let mut v = good.clone();
        v[12] = 9;
        assert_eq!(decode(&v), Err(WireError::PublicIdLength(9)));
        let mut v = good.clone();
        v[19] = 0x80; // counter high byte
        assert_eq!(decode(&v), Err(WireError::Counter(0x8034)));
        let mut v = good.clone();
        v[22] = 41; // nonce length
        assert_eq!(decode(&v), Err(WireError::NonceLength(41)));
        let mut v = good.clone();
        v[23] = b' ';
        assert_eq!(decode(&v), Err(WireError::NonceCharacter));
        let mut v = good.clone();
        v.push(0);
        assert_eq!(decode(&v), Err(WireError::TrailingBytes(1)));

        let mut v = encode(&reply(ReplyOutcome::Ack)).unwrap().to_vec();
        let last = v.len() - 1;
        v[last] = 0x03;
        assert_eq!(decode(&v), Err(WireError::Outcome(3)));
    }

    fn arb_counters() -> impl Strategy<Value = Counters> {
        (0..=otp::counter::MAX_COUNTER, any::<u8>()).prop_map(|(c, u)| Counters::new(c, u).unwrap())
    }

    fn arb_message() -> impl Strategy<Value = Message> {
        let public_id = proptest::collection::vec(any::<u8>(), 0..=MAX_PUBLIC_ID).prop_map(|b| PublicId::from_bytes(&b).unwrap());
        let request = (any::<u64>(), any::<u16>(), public_id.clone(), arb_counters(), "[!-~]{0,40}", any::<[u8; 32]>()).prop_map(
            |(req_id, origin, public_id, counters, nonce, digest)| Message::CasRequest {
                req_id: RequestId(req_id),
                origin: SiteId(origin),
                proposal: Proposal { public_id, counters, nonce, otp_digest: OtpDigest(digest) },
            },
        );
        let outcome = prop_oneof![
            Just(ReplyOutcome::Ack),
            Just(ReplyOutcome::Failed),
            arb_counters().prop_map(|stored| ReplyOutcome::Stale { stored })
        ];
        let reply = (any::<u64>(), public_id, arb_counters(), outcome).prop_map(|(req_id, public_id, counters, outcome)| {
            Message::CasReply { req_id: RequestId(req_id), public_id, counters, outcome }
        });
        prop_oneof![request, reply]
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..120)) {
            // Whatever decodes re-encodes to the very same bytes (canonical).
            if let Ok(m) = decode(&bytes) {
                prop_assert_eq!(encode(&m).unwrap().to_vec(), bytes);
            }
        }

        #[test]
        fn mutated_messages_never_panic(m in arb_message(), at in any::<usize>(), byte in any::<u8>()) {
            let mut bytes = encode(&m).unwrap().to_vec();
            let i = at % bytes.len();
            bytes[i] = byte;
            if let Ok(decoded) = decode(&bytes) {
                prop_assert_eq!(encode(&decoded).unwrap().to_vec(), bytes);
            }
        }

        #[test]
        fn arbitrary_messages_round_trip(m in arb_message()) {
            let bytes = encode(&m).unwrap();
            prop_assert!(bytes.len() <= MAX_MESSAGE);
            prop_assert_eq!(decode(&bytes).unwrap(), m);
        }
    }
}
