//! The binary encoding of [`quorum::Message`](crate::quorum::Message) and of
//! the [`sync`](crate::sync) exchange ([`SyncRequest`], [`SyncReply`]) on
//! the replication transport.
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
//! tag 0x03   Batch:      count:u16 (1..=256) (len:u16 message){count}
//!
//! tag 0x10   Pull:        dataset:u8 cursor limit:u32
//! tag 0x11   Digest:      dataset:u8
//! tag 0x12   Bucket:      dataset:u8 bucket:u8
//! tag 0x20   Changes:     last:u64 head:u64 items
//! tag 0x21   DigestReply: 256 × [u8; 32]
//! tag 0x22   Items:       items
//! tag 0x2f   Refused:     code:u8 reason
//! cursor     = 0x00 (none) | 0x01 after:u64
//! items      = count:u32 item{count}
//! item       = key_len:u8 (0..=64) key value_len:u16 (0..=4096) value
//! code       = 0x01 unknown dataset | 0x02 store failure | 0x03 reply too large | 0x04 bad request
//! reason     = len:u8 (0..=200) UTF-8 bytes
//! ```
//!
//! A batch carries several quorum messages to one peer in one frame
//! ([`encode_batch`], [`decode_batch`]): the node sends the compare-and-set
//! requests that queued up while it was busy together, and the peer answers
//! with a batch of the replies it has (a request it drops has none).
//! Tags 0x01–0x0f are the quorum's ([`encode`], [`decode`]); 0x10–0x2f the
//! sync exchange's ([`encode_sync_request`], [`decode_sync_request`],
//! [`encode_sync_reply`], [`decode_sync_reply`]). [`is_sync`] tells a
//! server which decoder a frame is for. An item count is checked against
//! the bytes left (every item takes at least three) before anything is
//! allocated, so the frame bounds it.
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
use crate::sync::{Changes, Dataset, Digest, Item, BUCKETS, MAX_KEY, MAX_VALUE};

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
const TAG_BATCH: u8 = 0x03;

const TAG_PULL: u8 = 0x10;
const TAG_DIGEST: u8 = 0x11;
const TAG_BUCKET: u8 = 0x12;
const TAG_CHANGES: u8 = 0x20;
const TAG_DIGEST_REPLY: u8 = 0x21;
const TAG_ITEMS: u8 = 0x22;
const TAG_REFUSED: u8 = 0x2f;
const SYNC_TAGS: std::ops::RangeInclusive<u8> = 0x10..=0x2f;

/// Longest reason in a [`SyncReply::Refused`], in bytes.
pub const MAX_REASON: usize = 200;
/// Smallest encoded item (empty key and value): three length bytes.
const MIN_ITEM: usize = 3;

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
    /// An item key longer than [`MAX_KEY`].
    KeyLength(usize),
    /// An item value longer than [`MAX_VALUE`].
    ValueLength(usize),
    /// More items than the frame can hold, or than a `u32` counts.
    ItemCount(u64),
    /// A batch of more than [`MAX_BATCH`] messages (or none).
    BatchSize(usize),
    /// A message too long for a batch.
    BatchMessageLength(usize),
    /// A refusal reason longer than [`MAX_REASON`] or not UTF-8.
    Reason,
    /// An unknown refusal code or cursor flag.
    Code(u8),
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
            Self::KeyLength(n) => write!(f, "item key of {n} bytes (at most {MAX_KEY})"),
            Self::ValueLength(n) => write!(f, "item value of {n} bytes (at most {MAX_VALUE})"),
            Self::ItemCount(n) => write!(f, "{n} items do not fit the frame"),
            Self::BatchSize(n) => write!(f, "a batch of {n} messages (1 to {MAX_BATCH})"),
            Self::BatchMessageLength(n) => write!(f, "a message of {n} bytes in a batch (at most 65535)"),
            Self::Reason => write!(f, "refusal reason longer than {MAX_REASON} bytes or not UTF-8"),
            Self::Code(c) => write!(f, "unknown code 0x{c:02x}"),
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

/// A sync request: what a puller asks a peer for, about one dataset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyncRequest {
    /// The outbox after a cursor ([`SyncStore::changes`](crate::sync::SyncStore::changes)),
    /// answered with [`SyncReply::Changes`].
    Pull {
        /// The dataset.
        dataset: Dataset,
        /// The puller's cursor (its acknowledgement); `None` after a restart.
        after: Option<u64>,
        /// At most this many items.
        limit: u32,
    },
    /// The whole dataset's digest, answered with [`SyncReply::Digest`].
    Digest {
        /// The dataset.
        dataset: Dataset,
    },
    /// Every item of one bucket, answered with [`SyncReply::Items`].
    Bucket {
        /// The dataset.
        dataset: Dataset,
        /// The bucket.
        bucket: u8,
    },
}

impl SyncRequest {
    /// The dataset asked about.
    #[must_use]
    pub fn dataset(&self) -> Dataset {
        match *self {
            Self::Pull { dataset, .. } | Self::Digest { dataset } | Self::Bucket { dataset, .. } => dataset,
        }
    }
}

/// Why a peer did not answer a [`SyncRequest`] with data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RefusalCode {
    /// The dataset is not registered there (a witness holds counters only).
    UnknownDataset,
    /// Its store failed (I/O, a damaged row); worth a retry.
    StoreFailure,
    /// The reply would exceed the frame limit: ask for fewer items.
    TooLarge,
    /// The request made no sense to it.
    BadRequest,
}

impl RefusalCode {
    fn to_byte(self) -> u8 {
        match self {
            Self::UnknownDataset => 0x01,
            Self::StoreFailure => 0x02,
            Self::TooLarge => 0x03,
            Self::BadRequest => 0x04,
        }
    }

    fn from_byte(byte: u8) -> Result<Self, WireError> {
        Ok(match byte {
            0x01 => Self::UnknownDataset,
            0x02 => Self::StoreFailure,
            0x03 => Self::TooLarge,
            0x04 => Self::BadRequest,
            other => return Err(WireError::Code(other)),
        })
    }
}

impl fmt::Display for RefusalCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::UnknownDataset => "unknown dataset",
            Self::StoreFailure => "store failure",
            Self::TooLarge => "reply too large",
            Self::BadRequest => "bad request",
        })
    }
}

/// The answer to a [`SyncRequest`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SyncReply {
    /// A page of the outbox.
    Changes(Changes),
    /// The dataset's digest.
    Digest(Digest),
    /// A bucket's items.
    Items(Vec<Item>),
    /// No data, and why.
    Refused {
        /// The kind of refusal.
        code: RefusalCode,
        /// A short reason for the puller's log (at most [`MAX_REASON`] bytes).
        reason: String,
    },
}

impl SyncReply {
    /// A refusal, its reason cut to [`MAX_REASON`] bytes (at a character
    /// boundary).
    #[must_use]
    pub fn refused(code: RefusalCode, reason: &str) -> Self {
        let mut end = reason.len().min(MAX_REASON);
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        Self::Refused { code, reason: reason[..end].to_string() }
    }
}

/// Most messages in one [`encode_batch`] frame.
pub const MAX_BATCH: usize = 256;

/// Whether `frame` is a batch of quorum messages ([`decode_batch`]).
#[must_use]
pub fn is_batch(frame: &[u8]) -> bool {
    matches!(frame, [VERSION, TAG_BATCH, ..])
}

/// One frame holding `messages` (each already encoded, e.g. by
/// [`encode`]). An empty message stands for "no reply". Fails for more
/// than [`MAX_BATCH`] messages, none, or one longer than 64 KiB.
pub fn encode_batch(messages: &[Bytes]) -> Result<Bytes, WireError> {
    if messages.is_empty() || messages.len() > MAX_BATCH {
        return Err(WireError::BatchSize(messages.len()));
    }
    let mut out = BytesMut::with_capacity(4 + messages.iter().map(|m| 2 + m.len()).sum::<usize>());
    out.put_u8(VERSION);
    out.put_u8(TAG_BATCH);
    // At most MAX_BATCH: fits.
    out.put_u16(messages.len() as u16);
    for m in messages {
        let len = u16::try_from(m.len()).map_err(|_| WireError::BatchMessageLength(m.len()))?;
        out.put_u16(len);
        out.put_slice(m);
    }
    Ok(out.freeze())
}

/// The messages of a batch frame, still encoded, in order.
pub fn decode_batch(input: &[u8]) -> Result<Vec<&[u8]>, WireError> {
    let mut r = Reader { rest: input };
    r.version()?;
    match r.u8()? {
        TAG_BATCH => {}
        other => return Err(WireError::Tag(other)),
    }
    let count = usize::from(r.u16()?);
    if count == 0 || count > MAX_BATCH {
        return Err(WireError::BatchSize(count));
    }
    let mut messages = Vec::with_capacity(count);
    for _ in 0..count {
        let len = usize::from(r.u16()?);
        messages.push(r.take(len)?);
    }
    if !r.rest.is_empty() {
        return Err(WireError::TrailingBytes(r.rest.len()));
    }
    Ok(messages)
}

/// Whether `frame` carries a sync message (rather than a quorum message):
/// this version and a tag of the sync range. It says nothing of the rest.
#[must_use]
pub fn is_sync(frame: &[u8]) -> bool {
    matches!(frame, [VERSION, tag, ..] if SYNC_TAGS.contains(tag))
}

/// Encodes a sync request (it cannot fail).
#[must_use]
pub fn encode_sync_request(request: &SyncRequest) -> Bytes {
    let mut out = BytesMut::with_capacity(16);
    out.put_u8(VERSION);
    match *request {
        SyncRequest::Pull { dataset, after, limit } => {
            out.put_u8(TAG_PULL);
            out.put_u8(dataset.0);
            match after {
                None => out.put_u8(0),
                Some(n) => {
                    out.put_u8(1);
                    out.put_u64(n);
                }
            }
            out.put_u32(limit);
        }
        SyncRequest::Digest { dataset } => {
            out.put_u8(TAG_DIGEST);
            out.put_u8(dataset.0);
        }
        SyncRequest::Bucket { dataset, bucket } => {
            out.put_u8(TAG_BUCKET);
            out.put_u8(dataset.0);
            out.put_u8(bucket);
        }
    }
    out.freeze()
}

/// Decodes a sync request; the whole input must be that request.
pub fn decode_sync_request(input: &[u8]) -> Result<SyncRequest, WireError> {
    let mut r = Reader { rest: input };
    r.version()?;
    let request = match r.u8()? {
        TAG_PULL => {
            let dataset = Dataset(r.u8()?);
            let after = match r.u8()? {
                0 => None,
                1 => Some(r.u64()?),
                other => return Err(WireError::Code(other)),
            };
            SyncRequest::Pull { dataset, after, limit: r.u32()? }
        }
        TAG_DIGEST => SyncRequest::Digest { dataset: Dataset(r.u8()?) },
        TAG_BUCKET => SyncRequest::Bucket { dataset: Dataset(r.u8()?), bucket: r.u8()? },
        other => return Err(WireError::Tag(other)),
    };
    r.end()?;
    Ok(request)
}

/// The encoded length of `reply`, without encoding it (to check it against
/// the frame limit first).
#[must_use]
pub fn sync_reply_len(reply: &SyncReply) -> usize {
    let items = |items: &[Item]| 4 + items.iter().map(|i| MIN_ITEM + i.key.len() + i.value.len()).sum::<usize>();
    2 + match reply {
        SyncReply::Changes(changes) => 16 + items(&changes.items),
        SyncReply::Digest(_) => BUCKETS * 32,
        SyncReply::Items(list) => items(list),
        SyncReply::Refused { reason, .. } => 2 + reason.len(),
    }
}

/// Encodes a sync reply. Fails for an item the format cannot carry (a key
/// or value too long), more than `u32::MAX` items, or a reason too long.
pub fn encode_sync_reply(reply: &SyncReply) -> Result<Bytes, WireError> {
    let mut out = BytesMut::with_capacity(sync_reply_len(reply));
    out.put_u8(VERSION);
    match reply {
        SyncReply::Changes(changes) => {
            out.put_u8(TAG_CHANGES);
            out.put_u64(changes.last);
            out.put_u64(changes.head);
            put_items(&mut out, &changes.items)?;
        }
        SyncReply::Digest(digest) => {
            out.put_u8(TAG_DIGEST_REPLY);
            for bucket in digest.buckets() {
                out.put_slice(bucket);
            }
        }
        SyncReply::Items(items) => {
            out.put_u8(TAG_ITEMS);
            put_items(&mut out, items)?;
        }
        SyncReply::Refused { code, reason } => {
            let len = u8::try_from(reason.len()).ok().filter(|&n| usize::from(n) <= MAX_REASON).ok_or(WireError::Reason)?;
            out.put_u8(TAG_REFUSED);
            out.put_u8(code.to_byte());
            out.put_u8(len);
            out.put_slice(reason.as_bytes());
        }
    }
    Ok(out.freeze())
}

/// Decodes a sync reply; the whole input must be that reply.
pub fn decode_sync_reply(input: &[u8]) -> Result<SyncReply, WireError> {
    let mut r = Reader { rest: input };
    r.version()?;
    let reply = match r.u8()? {
        TAG_CHANGES => {
            let last = r.u64()?;
            let head = r.u64()?;
            SyncReply::Changes(Changes { items: r.items()?, last, head })
        }
        TAG_DIGEST_REPLY => {
            let mut buckets = [[0u8; 32]; BUCKETS];
            for bucket in &mut buckets {
                *bucket = r.array()?;
            }
            SyncReply::Digest(Digest::from_buckets(buckets))
        }
        TAG_ITEMS => SyncReply::Items(r.items()?),
        TAG_REFUSED => {
            let code = RefusalCode::from_byte(r.u8()?)?;
            let len = usize::from(r.u8()?);
            if len > MAX_REASON {
                return Err(WireError::Reason);
            }
            let reason = std::str::from_utf8(r.take(len)?).map_err(|_| WireError::Reason)?.to_string();
            SyncReply::Refused { code, reason }
        }
        other => return Err(WireError::Tag(other)),
    };
    r.end()?;
    Ok(reply)
}

fn put_items(out: &mut BytesMut, items: &[Item]) -> Result<(), WireError> {
    let count = u32::try_from(items.len()).map_err(|_| WireError::ItemCount(items.len() as u64))?;
    out.put_u32(count);
    for item in items {
        let key_len =
            u8::try_from(item.key.len()).ok().filter(|&n| usize::from(n) <= MAX_KEY).ok_or(WireError::KeyLength(item.key.len()))?;
        let value_len = u16::try_from(item.value.len())
            .ok()
            .filter(|&n| usize::from(n) <= MAX_VALUE)
            .ok_or(WireError::ValueLength(item.value.len()))?;
        out.put_u8(key_len);
        out.put_slice(&item.key);
        out.put_u16(value_len);
        out.put_slice(&item.value);
    }
    Ok(())
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

    fn u32(&mut self) -> Result<u32, WireError> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, WireError> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    fn version(&mut self) -> Result<(), WireError> {
        match self.u8()? {
            VERSION => Ok(()),
            other => Err(WireError::Version(other)),
        }
    }

    fn end(&self) -> Result<(), WireError> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(WireError::TrailingBytes(self.rest.len()))
        }
    }

    /// A counted list of items: the count is checked against the bytes
    /// left before anything is allocated.
    fn items(&mut self) -> Result<Vec<Item>, WireError> {
        let count = self.u32()?;
        let count_usize = usize::try_from(count).map_err(|_| WireError::ItemCount(u64::from(count)))?;
        if count_usize > self.rest.len() / MIN_ITEM {
            return Err(WireError::ItemCount(u64::from(count)));
        }
        let mut items = Vec::with_capacity(count_usize);
        for _ in 0..count_usize {
            let key_len = usize::from(self.u8()?);
            if key_len > MAX_KEY {
                return Err(WireError::KeyLength(key_len));
            }
            let key = self.take(key_len)?.to_vec();
            let value_len = usize::from(self.u16()?);
            if value_len > MAX_VALUE {
                return Err(WireError::ValueLength(value_len));
            }
            let value = self.take(value_len)?.to_vec();
            items.push(Item { key, value });
        }
        Ok(items)
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

    #[test]
    fn batches_round_trip_and_refuse_garbage() {
        let parts = [Bytes::from_static(b"\x01\x02abc"), Bytes::new(), Bytes::from_static(b"z")];
        let frame = encode_batch(&parts).unwrap();
        assert!(is_batch(&frame) && !is_sync(&frame));
        let back = decode_batch(&frame).unwrap();
        assert_eq!(back, vec![&b"\x01\x02abc"[..], &b""[..], &b"z"[..]]);
        assert_eq!(encode_batch(&[]), Err(WireError::BatchSize(0)));
        assert_eq!(encode_batch(&vec![Bytes::new(); MAX_BATCH + 1]), Err(WireError::BatchSize(MAX_BATCH + 1)));
        assert_eq!(encode_batch(&[Bytes::from(vec![0u8; 70_000])]), Err(WireError::BatchMessageLength(70_000)));
        for cut in 0..frame.len() {
            assert!(decode_batch(&frame[..cut]).is_err(), "cut at {cut}");
        }
        let mut long = frame.to_vec();
        long.push(0);
        assert_eq!(decode_batch(&long), Err(WireError::TrailingBytes(1)));
        assert_eq!(decode_batch(&[VERSION, TAG_BATCH, 0x01, 0x01]), Err(WireError::BatchSize(257)));
        assert_eq!(decode_batch(&[VERSION, TAG_BATCH, 0, 0]), Err(WireError::BatchSize(0)));
        assert!(decode(&frame).is_err(), "a batch is not a single message");
    }
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

    fn item(key: &[u8], value: &[u8]) -> Item {
        Item { key: key.to_vec(), value: value.to_vec() }
    }

    #[test]
    fn sync_request_layout_is_pinned() {
        let pull = SyncRequest::Pull { dataset: Dataset::AEADS, after: Some(0x0102), limit: 2000 };
        assert_eq!(encode_sync_request(&pull).as_ref(), &[0x01, 0x10, 2, 1, 0, 0, 0, 0, 0, 0, 1, 2, 0, 0, 0x07, 0xd0]);
        let first = SyncRequest::Pull { dataset: Dataset::COUNTERS, after: None, limit: 1 };
        assert_eq!(encode_sync_request(&first).as_ref(), &[0x01, 0x10, 1, 0, 0, 0, 0, 1]);
        assert_eq!(encode_sync_request(&SyncRequest::Digest { dataset: Dataset::CLIENTS }).as_ref(), &[0x01, 0x11, 3]);
        assert_eq!(encode_sync_request(&SyncRequest::Bucket { dataset: Dataset(9), bucket: 0xfe }).as_ref(), &[0x01, 0x12, 9, 0xfe]);
        let changes = SyncReply::Changes(Changes { items: vec![item(b"k", b"vv")], last: 5, head: 7 });
        let bytes = encode_sync_reply(&changes).unwrap();
        assert_eq!(bytes.as_ref(), &[0x01, 0x20, 0, 0, 0, 0, 0, 0, 0, 5, 0, 0, 0, 0, 0, 0, 0, 7, 0, 0, 0, 1, 1, b'k', 0, 2, b'v', b'v']);
        assert_eq!(bytes.len(), sync_reply_len(&changes));
        let refused = SyncReply::refused(RefusalCode::UnknownDataset, "no");
        assert_eq!(encode_sync_reply(&refused).unwrap().as_ref(), &[0x01, 0x2f, 0x01, 2, b'n', b'o']);
    }

    #[test]
    fn sync_messages_round_trip_and_are_told_apart() {
        let mut digest = Digest::default();
        digest.add(b"a", b"1");
        let replies = [
            SyncReply::Changes(Changes::default()),
            SyncReply::Changes(Changes { items: vec![item(&[7; MAX_KEY], &[9; MAX_VALUE]), item(b"", b"")], last: u64::MAX, head: 3 }),
            SyncReply::Digest(digest),
            SyncReply::Items(vec![]),
            SyncReply::Items(vec![item(b"key", b"value")]),
            SyncReply::refused(RefusalCode::StoreFailure, "disk on fire"),
            SyncReply::refused(RefusalCode::TooLarge, ""),
            SyncReply::refused(RefusalCode::BadRequest, &"é".repeat(150)),
        ];
        for reply in replies {
            let bytes = encode_sync_reply(&reply).unwrap();
            assert_eq!(bytes.len(), sync_reply_len(&reply));
            assert!(is_sync(&bytes));
            assert_eq!(decode_sync_reply(&bytes).unwrap(), reply);
            assert!(decode(&bytes).is_err());
        }
        // The reason is cut at a character boundary.
        let SyncReply::Refused { reason, .. } = SyncReply::refused(RefusalCode::BadRequest, &"é".repeat(150)) else { panic!() };
        assert_eq!(reason.len(), MAX_REASON);
        for request in [
            SyncRequest::Pull { dataset: Dataset(0), after: Some(u64::MAX), limit: u32::MAX },
            SyncRequest::Pull { dataset: Dataset(255), after: None, limit: 0 },
            SyncRequest::Digest { dataset: Dataset::COUNTERS },
            SyncRequest::Bucket { dataset: Dataset::AEADS, bucket: 0 },
        ] {
            let bytes = encode_sync_request(&request);
            assert!(is_sync(&bytes));
            assert_eq!(decode_sync_request(&bytes).unwrap(), request);
        }
        assert!(!is_sync(&encode(&request("n")).unwrap()));
        assert!(!is_sync(&[VERSION]));
        assert!(!is_sync(&[0x02, 0x10]));
    }

    #[test]
    fn unencodable_sync_replies_are_refused() {
        let long_key = SyncReply::Items(vec![item(&[0; MAX_KEY + 1], b"")]);
        assert_eq!(encode_sync_reply(&long_key), Err(WireError::KeyLength(MAX_KEY + 1)));
        let long_value = SyncReply::Items(vec![item(b"", &[0; MAX_VALUE + 1])]);
        assert_eq!(encode_sync_reply(&long_value), Err(WireError::ValueLength(MAX_VALUE + 1)));
        let long_reason = SyncReply::Refused { code: RefusalCode::StoreFailure, reason: "x".repeat(MAX_REASON + 1) };
        assert_eq!(encode_sync_reply(&long_reason), Err(WireError::Reason));
    }

    #[test]
    fn malformed_sync_input_is_an_error() {
        let good = encode_sync_reply(&SyncReply::Items(vec![item(b"ab", b"cd")])).unwrap().to_vec();
        for cut in 0..good.len() {
            assert!(decode_sync_reply(&good[..cut]).is_err(), "cut at {cut}");
        }
        // A count larger than the bytes left allows, even a huge one, is
        // refused before any allocation.
        let mut v = good.clone();
        v[2..6].copy_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(decode_sync_reply(&v), Err(WireError::ItemCount(u64::from(u32::MAX))));
        let mut v = good.clone();
        v[5] = 3;
        assert_eq!(decode_sync_reply(&v), Err(WireError::ItemCount(3)));
        let mut v = good.clone();
        v[6] = MAX_KEY as u8 + 1;
        assert_eq!(decode_sync_reply(&v), Err(WireError::KeyLength(MAX_KEY + 1)));
        let mut v = good.clone();
        v[9..11].copy_from_slice(&(MAX_VALUE as u16 + 1).to_be_bytes());
        assert_eq!(decode_sync_reply(&v), Err(WireError::ValueLength(MAX_VALUE + 1)));
        let mut v = good.clone();
        v.push(0);
        assert_eq!(decode_sync_reply(&v), Err(WireError::TrailingBytes(1)));
        assert_eq!(decode_sync_reply(&[0x01, 0x2f, 0x09, 0]), Err(WireError::Code(9)));
        assert_eq!(decode_sync_reply(&[0x01, 0x2f, 0x01, 1, 0xff]), Err(WireError::Reason));
        assert_eq!(decode_sync_reply(&[0x01, 0x2f, 0x01, 201]), Err(WireError::Reason));
        assert_eq!(decode_sync_reply(&[0x01, 0x10, 1, 0, 0, 0, 0, 1]), Err(WireError::Tag(0x10)));
        assert_eq!(decode_sync_request(&[0x01, 0x20]), Err(WireError::Tag(0x20)));
        assert_eq!(decode_sync_request(&[0x01, 0x10, 1, 2, 0, 0, 0, 1]), Err(WireError::Code(2)));
        assert_eq!(decode_sync_request(&[0x02, 0x11, 1]), Err(WireError::Version(2)));
        assert_eq!(decode_sync_request(&[0x01, 0x11, 1, 0]), Err(WireError::TrailingBytes(1)));
        assert_eq!(decode_sync_request(&[0x01, 0x12, 1]), Err(WireError::Truncated));
    }

    fn arb_item() -> impl Strategy<Value = Item> + Clone {
        (proptest::collection::vec(any::<u8>(), 0..=MAX_KEY), proptest::collection::vec(any::<u8>(), 0..=64))
            .prop_map(|(key, value)| Item { key, value })
    }

    fn arb_sync_reply() -> impl Strategy<Value = SyncReply> {
        let items = proptest::collection::vec(arb_item(), 0..8);
        let code = prop_oneof![
            Just(RefusalCode::UnknownDataset),
            Just(RefusalCode::StoreFailure),
            Just(RefusalCode::TooLarge),
            Just(RefusalCode::BadRequest)
        ];
        prop_oneof![
            (items.clone(), any::<u64>(), any::<u64>()).prop_map(|(items, last, head)| SyncReply::Changes(Changes { items, last, head })),
            items.prop_map(SyncReply::Items),
            proptest::collection::vec((any::<u8>(), any::<u8>()), 0..4).prop_map(|kv| {
                let mut d = Digest::default();
                for (k, v) in kv {
                    d.add(&[k], &[v]);
                }
                SyncReply::Digest(d)
            }),
            (code, ".{0,60}").prop_map(|(code, reason)| SyncReply::refused(code, &reason)),
        ]
    }

    fn arb_sync_request() -> impl Strategy<Value = SyncRequest> {
        prop_oneof![
            (any::<u8>(), proptest::option::of(any::<u64>()), any::<u32>()).prop_map(|(d, after, limit)| SyncRequest::Pull {
                dataset: Dataset(d),
                after,
                limit
            }),
            any::<u8>().prop_map(|d| SyncRequest::Digest { dataset: Dataset(d) }),
            (any::<u8>(), any::<u8>()).prop_map(|(d, bucket)| SyncRequest::Bucket { dataset: Dataset(d), bucket }),
        ]
    }

    proptest! {
        #[test]
        fn random_sync_bytes_never_panic(tag in 0x10u8..=0x2f, body in proptest::collection::vec(any::<u8>(), 0..200)) {
            let mut bytes = vec![VERSION, tag];
            bytes.extend_from_slice(&body);
            if let Ok(reply) = decode_sync_reply(&bytes) {
                prop_assert_eq!(encode_sync_reply(&reply).unwrap().to_vec(), bytes.clone());
            }
            if let Ok(request) = decode_sync_request(&bytes) {
                prop_assert_eq!(encode_sync_request(&request).to_vec(), bytes);
            }
        }

        #[test]
        fn mutated_sync_messages_never_panic(reply in arb_sync_reply(), request in arb_sync_request(), at in any::<usize>(), byte in any::<u8>()) {
            for mut bytes in [encode_sync_reply(&reply).unwrap().to_vec(), encode_sync_request(&request).to_vec()] {
                let i = at % bytes.len();
                bytes[i] = byte;
                if let Ok(decoded) = decode_sync_reply(&bytes) {
                    prop_assert_eq!(encode_sync_reply(&decoded).unwrap().to_vec(), bytes.clone());
                }
                if let Ok(decoded) = decode_sync_request(&bytes) {
                    prop_assert_eq!(encode_sync_request(&decoded).to_vec(), bytes);
                }
            }
        }

        #[test]
        fn arbitrary_sync_messages_round_trip(reply in arb_sync_reply(), request in arb_sync_request()) {
            let bytes = encode_sync_reply(&reply).unwrap();
            prop_assert_eq!(bytes.len(), sync_reply_len(&reply));
            prop_assert_eq!(decode_sync_reply(&bytes).unwrap(), reply);
            prop_assert_eq!(decode_sync_request(&encode_sync_request(&request)).unwrap(), request);
        }

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
