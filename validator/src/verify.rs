//! The verify decision: request pairs in, a signed [`Response`] out.
//!
//! **I/O contract: no network, no files, no clock.** The caller passes the
//! decoded pairs and `now`; the only I/O is behind the three traits of the
//! crate root ([`ClientStore`], [`OtpDecoder`], [`CounterStore`]) and the
//! replication hook [`PeerSync`]. Blocking: call it from a blocking thread.
//!
//! Two phases, so that the HTTP layer can bound the slow one and still sign
//! its answer:
//! 1. [`Verifier::prepare`] checks the parameters, finds the client and
//!    checks the request's signature. It either answers at once
//!    ([`Prepared::Done`]) or hands back a [`Checked`] request.
//! 2. [`Verifier::complete`] decrypts the OTP (KSM), records its counters
//!    (compare-and-set) and syncs with the peers; it may block. When the
//!    deadline ([`Checked::deadline`]) passes first, the HTTP layer answers
//!    [`Checked::backend_error`] instead, signed with the client's key.
//!
//! # Order of checks
//!
//! yubikey-val's (see [`crate::protocol::parse_request`] for the parameter
//! checks), then: the client (`NO_SUCH_CLIENT` when absent or disabled),
//! the request's `h` (`BAD_SIGNATURE`), the KSM (`BAD_OTP` for an unknown
//! YubiKey or a corrupt OTP, `BACKEND_ERROR` when the KSM, module or AEAD
//! store fails), the counters (`REPLAYED_REQUEST` when the stored counters
//! and nonce equal the request's, `REPLAYED_OTP` when the stored counters
//! are as high or higher, `BACKEND_ERROR` when the store fails), the sync
//! peers, `OK`.
//!
//! # Signing
//!
//! Every answer is signed with the client's key as soon as the request
//! names a client that exists, errors included, and also when that client
//! is disabled (so that its operator reads `NO_SUCH_CLIENT`, not a bad
//! server signature). Only when the id is missing, malformed or unknown, or
//! the client store fails, is the answer signed with the empty key, as
//! yubikey-val signs all of its early errors.
//!
//! # Sync level
//!
//! Without replication the default hook [`NoPeers`] answers as yubikey-val
//! does with an empty sync pool, which skips the sync and sends `sl=0`.
//! With replication (`[replication]`, [`crate::replicate`]), the async
//! server awaits the [`AsyncPeerSync`] hook instead and answers through
//! [`Verifier::conclude_synced`]. The requested level is resolved
//! (`fast`, `secure`, absent → [`VerifyOptions`]) and passed to the hook.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use otp::{Otp, PublicId};
use sha2::{Digest, Sha256};

use crate::protocol::{self, Echo, Rejection, RequestSignature, Response, SessionFields, Status, SyncLevel, Version};
use crate::{ApiClient, BackendFailure, CasOutcome, ClientId, ClientKey, ClientStore, CounterStore, CounterUpdate, OtpDecoder};

/// Server-side defaults, yubikey-val's by default.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VerifyOptions {
    /// The sync level when the request names none (`__YKVAL_SYNC_DEFAULT_LEVEL__`, 60).
    pub default_sync_level: u8,
    /// `sl=fast` (`__YKVAL_SYNC_FAST_LEVEL__`, 1).
    pub fast_sync_level: u8,
    /// `sl=secure` (`__YKVAL_SYNC_SECURE_LEVEL__`, 40).
    pub secure_sync_level: u8,
}

impl Default for VerifyOptions {
    fn default() -> Self {
        Self { default_sync_level: 60, fast_sync_level: 1, secure_sync_level: 40 }
    }
}

impl VerifyOptions {
    /// The percentage of peers a request asks for.
    #[must_use]
    pub fn resolve(&self, level: Option<SyncLevel>) -> u8 {
        match level {
            None => self.default_sync_level,
            Some(SyncLevel::Fast) => self.fast_sync_level,
            Some(SyncLevel::Secure) => self.secure_sync_level,
            Some(SyncLevel::Percent(p)) => p,
        }
    }
}

/// What the sync peers said about an OTP the local store just accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyncOutcome {
    /// Enough peers confirmed it, or none were asked: `OK` with this `sl`
    /// (the percentage of all peers that answered validly).
    Synced {
        /// The answer's `sl`.
        sl: u8,
    },
    /// Too few peers answered in time: `NOT_ENOUGH_ANSWERS` with this `sl`.
    NotEnoughAnswers {
        /// The answer's `sl`.
        sl: u8,
    },
    /// A peer had seen these counters, or higher: `REPLAYED_OTP`.
    Replayed,
}

/// The replication hook (issue 5): called after the local compare-and-set
/// accepted an OTP, before anything is answered.
pub trait PeerSync: Send + Sync {
    /// Tell the peers about `update`; `level` is the percentage of them
    /// (1–100) the request asks to hear from, within `timeout` if it gave
    /// one. An `Err` is answered `BACKEND_ERROR`.
    fn sync(&self, update: &CounterUpdate, level: u8, timeout: Option<Duration>) -> Result<SyncOutcome, BackendFailure>;
}

/// The replication hook awaited by the async server (`serve`): called after
/// the local compare-and-set accepted an OTP; the future resolves by the
/// hook's own deadline at the latest.
pub trait AsyncPeerSync: Send + Sync {
    /// Replicate `update`; `level` and `timeout` as in [`PeerSync::sync`].
    fn submit(&self, update: &CounterUpdate, level: u8, timeout: Option<Duration>) -> BoxFuture<SyncOutcome>;
}

/// A boxed, sendable future.
pub type BoxFuture<T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'static>>;

/// No sync peers: yubikey-val with an empty `__YKVAL_SYNC_POOL__` skips the
/// sync and answers `sl=0`.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoPeers;

impl PeerSync for NoPeers {
    fn sync(&self, _: &CounterUpdate, _: u8, _: Option<Duration>) -> Result<SyncOutcome, BackendFailure> {
        Ok(SyncOutcome::Synced { sl: 0 })
    }
}

/// The first phase's result.
#[derive(Clone, Debug)]
pub enum Prepared {
    /// Answer this at once.
    Done(Response),
    /// Go on with [`Verifier::complete`].
    Checked(Checked),
}

/// A request whose parameters, client and signature are good and whose OTP
/// is well-formed: what [`Verifier::complete`] works on.
#[derive(Clone, Debug)]
pub struct Checked {
    client_id: ClientId,
    key: ClientKey,
    otp: Otp,
    echo: Echo,
    nonce: String,
    timestamp: bool,
    sync_level: Option<SyncLevel>,
    timeout: Option<Duration>,
}

impl Checked {
    /// `BACKEND_ERROR`, signed with the client's key: the answer when the
    /// deadline passes before [`Verifier::complete`] returns. (The OTP may
    /// still be accepted by the store meanwhile; it is then spent, as with
    /// any failure after yubikey-val's counter update.)
    #[must_use]
    pub fn backend_error(&self, now: SystemTime) -> Response {
        Response::bare(Status::BackendError, now).signed_with(Some(self.key.clone()))
    }

    /// Sign an answer to this request with the client's key.
    #[must_use]
    pub fn sign(&self, r: Response) -> Response {
        r.signed_with(Some(self.key.clone()))
    }

    /// The request's own `timeout`, if it gave one.
    #[must_use]
    pub fn timeout(&self) -> Option<Duration> {
        self.timeout
    }

    /// How long phase 2 may take: the request's `timeout`, capped by the
    /// server's `ceiling`.
    #[must_use]
    pub fn deadline(&self, ceiling: Duration) -> Duration {
        self.timeout.map_or(ceiling, |t| t.min(ceiling))
    }

    /// The client.
    #[must_use]
    pub fn client_id(&self) -> ClientId {
        self.client_id
    }

    /// The YubiKey.
    #[must_use]
    pub fn public_id(&self) -> PublicId {
        self.otp.public_id()
    }
}

/// The decision, over the client, KSM and counter interfaces.
pub struct Verifier {
    clients: Arc<dyn ClientStore>,
    decoder: Arc<dyn OtpDecoder>,
    counters: Arc<dyn CounterStore>,
    peers: Arc<dyn PeerSync>,
    async_peers: Option<Arc<dyn AsyncPeerSync>>,
    options: VerifyOptions,
    inline_decode: bool,
}

impl Verifier {
    /// Assemble a verifier with no sync peers ([`NoPeers`]).
    #[must_use]
    pub fn new(
        clients: Arc<dyn ClientStore>,
        decoder: Arc<dyn OtpDecoder>,
        counters: Arc<dyn CounterStore>,
        options: VerifyOptions,
    ) -> Self {
        Self { clients, decoder, counters, peers: Arc::new(NoPeers), async_peers: None, options, inline_decode: false }
    }

    /// The decoder never blocks (the in-process KSM over the software
    /// keystore: memory and a local SQLite read, microseconds), so an async
    /// caller may run [`Self::decode`] in place rather than on a blocking
    /// pool. Off by default: remote KSMs and hardware modules block.
    #[must_use]
    pub fn with_inline_decode(mut self, inline: bool) -> Self {
        self.inline_decode = inline;
        self
    }

    /// See [`Self::with_inline_decode`].
    #[must_use]
    pub fn inline_decode(&self) -> bool {
        self.inline_decode
    }

    /// Sync accepted OTPs with these peers.
    #[must_use]
    pub fn with_peer_sync(mut self, peers: Arc<dyn PeerSync>) -> Self {
        self.peers = peers;
        self
    }

    /// Replicate accepted OTPs through this async hook: the async server
    /// awaits it instead of calling the blocking [`PeerSync`].
    #[must_use]
    pub fn with_async_peer_sync(mut self, peers: Arc<dyn AsyncPeerSync>) -> Self {
        self.async_peers = Some(peers);
        self
    }

    /// The async replication hook, if any.
    #[must_use]
    pub fn async_peer_sync(&self) -> Option<&Arc<dyn AsyncPeerSync>> {
        self.async_peers.as_ref()
    }

    /// The sync level (percentage) `checked` asks for, resolved.
    #[must_use]
    pub fn sync_level(&self, checked: &Checked) -> u8 {
        self.options.resolve(checked.sync_level)
    }

    /// Phase 1: parameters, client, signature. Never blocks on the KSM or
    /// the counter store (only on the [`ClientStore`], which is in memory).
    pub fn prepare(&self, pairs: &[(String, String)], version: Version, now: SystemTime) -> Prepared {
        let request = match protocol::parse_request(pairs, version) {
            Ok(r) => r,
            Err(rejection) => return Prepared::Done(self.reject(&rejection, now)),
        };
        let client = match self.clients.client(request.id()) {
            Ok(Some(c)) => c,
            Ok(None) => {
                tracing::debug!(client = %request.id(), "NO_SUCH_CLIENT: unknown client");
                return Prepared::Done(Response::bare(Status::NoSuchClient, now));
            }
            Err(e) => {
                tracing::error!(client = %request.id(), error = %e, "BACKEND_ERROR: client store failed");
                return Prepared::Done(Response::bare(Status::BackendError, now));
            }
        };
        let ApiClient { id, active, key } = client;
        if !active {
            tracing::debug!(client = %id, "NO_SUCH_CLIENT: client disabled");
            return Prepared::Done(Response::bare(Status::NoSuchClient, now).signed_with(Some(key)));
        }
        if protocol::check_request_signature(pairs, key.expose()) == RequestSignature::Invalid {
            tracing::info!(client = %id, "BAD_SIGNATURE");
            return Prepared::Done(Response::bare(Status::BadSignature, now).signed_with(Some(key)));
        }
        Prepared::Checked(Checked {
            client_id: id,
            key,
            otp: *request.otp(),
            echo: request.echo(),
            // 1.x has no nonce; the empty one never equals a 2.0 nonce, and
            // an equal-counters replay of a 1.x request is REPLAYED_OTP.
            nonce: request.nonce().map(|n| n.as_str().to_owned()).unwrap_or_default(),
            timestamp: request.timestamp(),
            sync_level: request.sync_level(),
            timeout: request.timeout(),
        })
    }

    /// Phase 2: KSM, counters, peers. Blocks; run it under a deadline.
    pub fn complete(&self, checked: &Checked, now: SystemTime) -> Response {
        self.decide(checked, now).signed_with(Some(checked.key.clone()))
    }

    /// Both phases, without a deadline (tools and tests).
    pub fn verify(&self, pairs: &[(String, String)], version: Version, now: SystemTime) -> Response {
        match self.prepare(pairs, version, now) {
            Prepared::Done(r) => r,
            Prepared::Checked(c) => self.complete(&c, now),
        }
    }

    fn reject(&self, rejection: &Rejection, now: SystemTime) -> Response {
        tracing::debug!(status = %rejection.status, reason = rejection.reason, "request refused");
        let key = rejection.client_id.and_then(|id| match self.clients.client(id) {
            Ok(found) => found.map(|c| c.key),
            Err(e) => {
                tracing::warn!(client = %id, error = %e, "client store failed; answer signed with the empty key");
                None
            }
        });
        Response::bare(rejection.status, now).signed_with(key)
    }

    fn decide(&self, checked: &Checked, now: SystemTime) -> Response {
        let decoded = match self.decode(checked, now) {
            Ok(d) => d,
            Err(r) => return r,
        };
        let cas = self.counters.compare_and_set(&decoded.update);
        self.conclude(checked, &decoded, cas, now)
    }

    /// Phase 2, first half: the KSM (blocking unless
    /// [`Self::inline_decode`]). `Err` is the answer, unsigned.
    pub fn decode(&self, checked: &Checked, now: SystemTime) -> Result<Decoded, Response> {
        let client = checked.client_id;
        let public_id = checked.otp.public_id();
        let decoded = match self.decoder.decode(&checked.otp.to_string()) {
            Ok(d) => d,
            Err(e) if e.is_backend_failure() => {
                tracing::error!(%client, %public_id, error = %e, detail = %e.detail(), "BACKEND_ERROR: OTP decryption failed");
                return Err(Response::bare(Status::BackendError, now));
            }
            Err(e) => {
                tracing::info!(%client, %public_id, error = %e, detail = %e.detail(), "BAD_OTP");
                return Err(Response::bare(Status::BadOtp, now));
            }
        };
        let update = CounterUpdate {
            public_id,
            counters: decoded.counters(),
            timestamp_high: decoded.timestamp_high,
            timestamp_low: decoded.timestamp_low,
            nonce: checked.nonce.clone(),
            otp_digest: otp_digest(&checked.otp),
            now: unix_seconds(now),
        };
        Ok(Decoded { decoded, update })
    }

    /// The counter store, for [`CounterStore::compare_and_set_async`] of
    /// [`Decoded::update`].
    #[must_use]
    pub fn counter_store(&self) -> &Arc<dyn CounterStore> {
        &self.counters
    }

    /// Phase 2, second half: the answer given the compare-and-set's
    /// outcome, after the sync peers (which may block once there are
    /// any). Unsigned; see [`Checked::sign`].
    pub fn conclude(&self, checked: &Checked, d: &Decoded, cas: Result<CasOutcome, BackendFailure>, now: SystemTime) -> Response {
        let client = checked.client_id;
        let Decoded { update, .. } = d;
        let public_id = update.public_id;
        match cas {
            Ok(CasOutcome::Accepted) => {}
            Ok(CasOutcome::ReplayedRequest) => {
                tracing::info!(%client, %public_id, counters = %update.counters, "REPLAYED_REQUEST");
                return Response::replayed(&checked.echo, true, now);
            }
            Ok(CasOutcome::ReplayedOtp) => {
                tracing::info!(%client, %public_id, counters = %update.counters, "REPLAYED_OTP");
                return Response::replayed(&checked.echo, false, now);
            }
            Err(e) => {
                tracing::error!(%client, %public_id, error = %e, "BACKEND_ERROR: counter store failed");
                return Response::bare(Status::BackendError, now);
            }
        }
        let level = self.options.resolve(checked.sync_level);
        let synced = self.peers.sync(update, level, checked.timeout);
        self.conclude_synced(checked, d, synced, now)
    }

    /// The answer to an OTP the local compare-and-set accepted, given what
    /// the peers said (from [`PeerSync`] or an [`AsyncPeerSync`]). Unsigned.
    pub fn conclude_synced(
        &self,
        checked: &Checked,
        d: &Decoded,
        synced: Result<SyncOutcome, BackendFailure>,
        now: SystemTime,
    ) -> Response {
        let client = checked.client_id;
        let Decoded { decoded, update } = d;
        let public_id = update.public_id;
        let level = self.options.resolve(checked.sync_level);
        match synced {
            Ok(SyncOutcome::Synced { sl }) => {
                let session = checked.timestamp.then(|| SessionFields::from_decode(decoded));
                Response::ok(&checked.echo, sl, session, now)
            }
            Ok(SyncOutcome::NotEnoughAnswers { sl }) => {
                tracing::warn!(%client, %public_id, level, sl, "NOT_ENOUGH_ANSWERS");
                Response::not_enough_answers(&checked.echo, sl, now)
            }
            Ok(SyncOutcome::Replayed) => {
                tracing::warn!(%client, %public_id, counters = %update.counters, "REPLAYED_OTP: a sync peer had seen it");
                Response::replayed(&checked.echo, false, now)
            }
            Err(e) => {
                tracing::error!(%client, %public_id, error = %e, "BACKEND_ERROR: peer sync failed");
                Response::bare(Status::BackendError, now)
            }
        }
    }
}

/// A decoded OTP and the counter update it asks for (phase 2, between
/// [`Verifier::decode`] and [`Verifier::conclude`]).
#[derive(Clone, Debug)]
pub struct Decoded {
    /// What the KSM said.
    pub decoded: otp::OtpDecode,
    /// What to record.
    pub update: CounterUpdate,
}

/// SHA-256 of the OTP text as the verifier parsed it (normalised
/// lower-case modhex, public id included): [`CounterUpdate::otp_digest`].
#[must_use]
pub fn otp_digest(otp: &Otp) -> [u8; 32] {
    Sha256::digest(otp.to_string().as_bytes()).into()
}

/// Unix seconds, negative before 1970, saturating.
fn unix_seconds(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => i64::try_from(e.duration().as_secs()).map_or(i64::MIN, |s| -s),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sync_levels_resolve() {
        let o = VerifyOptions::default();
        assert_eq!(o.resolve(None), 60);
        assert_eq!(o.resolve(Some(SyncLevel::Fast)), 1);
        assert_eq!(o.resolve(Some(SyncLevel::Secure)), 40);
        assert_eq!(o.resolve(Some(SyncLevel::Percent(77))), 77);
    }

    #[test]
    fn otp_digest_is_sha256_of_the_normalised_otp() {
        let lower = "cccccccccccbdvgtiblfkbgturecfllberrvkinnctnn";
        let a: Otp = lower.parse().unwrap();
        let b: Otp = lower.to_ascii_uppercase().parse().unwrap();
        let expected: [u8; 32] = Sha256::digest(lower.as_bytes()).into();
        assert_eq!(otp_digest(&a), expected);
        assert_eq!(otp_digest(&b), expected, "case is folded before hashing");
        let other: Otp = "cccccccccccbdvgtiblfkbgturecfllberrvkinnctnb".parse().unwrap();
        assert_ne!(otp_digest(&other), expected);
    }

    #[test]
    fn unix_seconds_saturate() {
        assert_eq!(unix_seconds(UNIX_EPOCH + Duration::from_secs(5)), 5);
        assert_eq!(unix_seconds(UNIX_EPOCH - Duration::from_secs(5)), -5);
    }
}
