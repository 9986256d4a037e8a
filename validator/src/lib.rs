//! The validation server: Yubico's validation protocol 2.0
//! (`/wsapi/2.0/verify`) for pam_yubico and ykclient, with replay
//! protection that holds under concurrency and crashes.
//!
//! The pieces, each behind a small interface so that replication (issue 5)
//! and remote KSMs can be slotted in:
//! - [`protocol`]: the wire format, sans-IO: request parameters, statuses,
//!   response lines and their HMAC-SHA1 signatures;
//! - [`verify`]: the decision, sans-IO apart from the three traits below;
//! - [`counters`]: the SQLite counter store, an atomic compare-and-set per
//!   public id with group commit ([`CounterStore`]);
//! - [`clients`]: API clients with keys encrypted by the security module
//!   ([`ClientStore`]);
//! - [`authfile`]: pam_yubico's authfile from a users → YubiKeys map;
//! - [`serve`]: the HTTP service.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod aead_sync;
pub mod authfile;
pub mod clients;
pub mod config;
pub mod counters;
pub mod protocol;
pub mod remote_ksm;
pub mod replicate;
pub mod serve;
pub mod verify;

use std::fmt;
use std::str::FromStr;

use otp::{Counters, OtpDecode, PublicId};
use zeroize::Zeroizing;

/// A failure of the appliance (store, module, KSM), never a verdict on the
/// OTP: answered `BACKEND_ERROR`.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BackendFailure(pub String);

/// A validation API client id: 1 to 10 decimal digits, not zero (the rule
/// yubikey-val enforces).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ClientId(u64);

impl ClientId {
    /// The number.
    #[must_use]
    pub fn get(self) -> u64 {
        self.0
    }

    /// From a number (1 ..= 9,999,999,999).
    #[must_use]
    pub fn new(n: u64) -> Option<Self> {
        (1..=9_999_999_999).contains(&n).then_some(Self(n))
    }
}

impl FromStr for ClientId {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        if s.is_empty() || s.len() > 10 || !s.bytes().all(|b| b.is_ascii_digit()) {
            return Err(());
        }
        s.parse::<u64>().ok().and_then(Self::new).ok_or(())
    }
}

impl fmt::Display for ClientId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

/// A client's HMAC-SHA1 key (yubikey-val makes 20 random bytes). Zeroized
/// on drop, never printed.
#[derive(Clone)]
pub struct ClientKey(Zeroizing<Vec<u8>>);

impl ClientKey {
    /// Wrap key bytes.
    #[must_use]
    pub fn new(bytes: Vec<u8>) -> Self {
        Self(Zeroizing::new(bytes))
    }

    /// The key bytes.
    #[must_use]
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for ClientKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClientKey(REDACTED)")
    }
}

/// A validation API client.
#[derive(Clone, Debug)]
pub struct ApiClient {
    /// Its id.
    pub id: ClientId,
    /// Disabled clients get `NO_SUCH_CLIENT`, as yubikey-val's inactive ones.
    pub active: bool,
    /// Its key.
    pub key: ClientKey,
}

/// Where API clients come from.
pub trait ClientStore: Send + Sync {
    /// The client with this id, if any. Called on every request: must be
    /// fast (an in-memory lookup that notices changes made by other
    /// processes, such as `validator client add`).
    fn client(&self, id: ClientId) -> Result<Option<ApiClient>, BackendFailure>;
}

/// Decrypts OTPs: the in-process KSM, or remote KSMs over the KSM protocol.
pub trait OtpDecoder: Send + Sync {
    /// Decode `otp` (already checked to be 32–48 modhex characters).
    fn decode(&self, otp: &str) -> Result<OtpDecode, ksm::KsmError>;
}

impl OtpDecoder for ksm::Ksm {
    fn decode(&self, otp: &str) -> Result<OtpDecode, ksm::KsmError> {
        self.decrypt(otp)
    }
}

/// What a validated OTP asks the counter store to record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CounterUpdate {
    /// The YubiKey.
    pub public_id: PublicId,
    /// Its (counter, use), caps-lock bit dropped: the replay order.
    pub counters: Counters,
    /// Timestamp, high 8 bits (kept, not ordered on).
    pub timestamp_high: u8,
    /// Timestamp, low 16 bits.
    pub timestamp_low: u16,
    /// The request's nonce: equal counters with the same nonce is the same
    /// request seen again (`REPLAYED_REQUEST`).
    pub nonce: String,
    /// SHA-256 of the OTP text as parsed (lower-case modhex, public id
    /// included): with the nonce, the identity of the request. Peers
    /// compare it to tell pam_yubico's fan-out of one request from another
    /// OTP with equal counters; the OTP itself is never stored.
    pub otp_digest: [u8; 32],
    /// Unix seconds.
    pub now: i64,
}

/// The result of a compare-and-set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CasOutcome {
    /// Strictly greater than what was stored: now stored, durably.
    Accepted,
    /// Stored counters equal the update's and so does the stored nonce.
    ReplayedRequest,
    /// Stored counters are greater than or equal to the update's.
    ReplayedOtp,
}

/// A compare-and-set's answer, to await.
pub type CasFuture = std::pin::Pin<Box<dyn std::future::Future<Output = Result<CasOutcome, BackendFailure>> + Send>>;

/// The durable counter state, one row per public id.
pub trait CounterStore: Send + Sync {
    /// [`Self::compare_and_set`] for async callers: the same contract, but
    /// no thread has to wait for the answer. The default decides in the
    /// call (fine for in-memory stores).
    fn compare_and_set_async(&self, u: &CounterUpdate) -> CasFuture {
        Box::pin(std::future::ready(self.compare_and_set(u)))
    }

    /// Atomically record `u` if its counters are strictly greater than the
    /// stored ones. Returns only after the outcome is durable (fsynced):
    /// `Accepted` may be answered `OK` at once.
    fn compare_and_set(&self, u: &CounterUpdate) -> Result<CasOutcome, BackendFailure>;
}
