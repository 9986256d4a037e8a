//! Counter replication with a safety rule: a pure, sans-IO state machine.
//!
//! **I/O contract: no network, no files, no clock, no randomness, no
//! threads.** The caller passes `now` and one [`Input`] to
//! [`Machine::handle`] and carries out the [`Action`]s it returns: sends a
//! [`Message`] to a peer, runs a durable compare-and-set, answers a request,
//! arms a timer, logs an [`Event`]. The same code runs in production under
//! the QUIC transport and in the tests under a simulator with a fake clock,
//! drops, duplicates, reordering, partitions and crashes.
//!
//! # The rule
//!
//! An OTP is accepted only after `required` nodes of the group (this site
//! included) have **durably** compare-and-set its `(counter, use)`:
//!
//! - two sites, no witness: `required = 2`, write-all;
//! - two sites and a counters-only witness: `required = 2` of 3, a majority.
//!
//! [`QuorumConfig::validate`] refuses any `required` that is not a strict
//! majority of the group, so that any two quorums share a node.
//!
//! **The compare-and-set at a peer** ([`peer_cas`]) for a [`Proposal`]
//! `(public id, counters, nonce, OTP digest)` against the stored record:
//!
//! | stored | result |
//! |---|---|
//! | nothing, or lower counters | [`CasDecision::Store`]: the proposal replaces it |
//! | equal counters, same nonce **and** same OTP digest | [`CasDecision::SameRequest`]: success, nothing written |
//! | equal counters otherwise, or higher | [`CasDecision::Stale`]: a replay, the stored counters go back |
//!
//! The middle row is pam_yubico's fan-out: one OTP with one nonce sent to
//! both sites. Each site's local compare-and-set accepts it and each peer
//! compare-and-set finds the very same request, so both sites answer `OK`.
//! The digest makes sure that equal counters carried by a *different* OTP
//! string are not mistaken for the same request.
//!
//! **Safety argument.** Take two accepted requests for one key, `r1` and
//! `r2`, with different identities (nonce or digest). Their quorums share a
//! node `X` where both compare-and-sets succeeded, in some order, say `r1`
//! first. After `r1`, `X` holds `r1`'s counters or higher, durably, and a
//! record with `r1`'s counters carries `r1`'s identity (later writes are
//! strictly greater). So `r2` succeeded at `X` only with strictly greater
//! counters: no value is accepted twice, except the same request fanned
//! out. And if `r1` was *answered* before `r2` even arrived, then `r1`'s
//! compare-and-set at `X` came first, so `r2 > r1`: nothing lower is
//! accepted after something higher (linearizability). With two sites
//! (write-all) the origin is in every quorum, and [`Event::Superseded`]
//! makes the order hold for the answers themselves: a pending request is
//! refused as soon as a higher value for its key is stored at its origin.
//! With a witness the quorums of two requests may meet only at a third
//! node, so for two *concurrent* requests the lower one's `OK` can still be
//! delivered after the higher one's (both compare-and-sets were in order at
//! the meeting node; only the answer was late). Closing that would cost a
//! second round trip; a request that starts after an `OK` is always
//! ordered.
//!
//! # The decision for a request of this site
//!
//! The local store's compare-and-set runs first, outside the machine (the
//! validator's group-committed `CounterStore::compare_and_set`, whose
//! `REPLAYED_REQUEST`/`REPLAYED_OTP` verdicts answer the request directly).
//! Only when it accepted is the request fed in as [`Input::LocalAccepted`]:
//! it counts as the first acknowledgement. This keeps one durable write path
//! per site and matches the validator's `PeerSync` hook, which is called
//! after the local compare-and-set. A crash after that write and before the
//! quorum burns the counter at this site and answers nothing: safe.
//!
//! The machine sends [`Message::CasRequest`] to every other node at once and
//! answers ([`Action::Answer`]):
//!
//! - [`Verdict::Accepted`] as soon as `required` nodes acknowledged, before
//!   the deadline;
//! - [`Verdict::Replayed`] as soon as any peer answers stale, or a higher
//!   value for the key is stored here ([`Event::Superseded`]);
//! - at the deadline, [`Verdict::NotEnoughAnswers`] (fail closed), or
//!   [`Verdict::AcceptedAtRisk`] with [`Event::AcceptedAtRisk`] while an
//!   accept-at-risk window ([`Policy::AcceptAtRisk`]) is open.
//!
//! It never answers `NotEnoughAnswers` before the deadline, even when it
//! knows a peer is down: pam_yubico asks both sites at once and takes the
//! first decisive answer, so a fast failure from the minority side would
//! defeat an `OK` from the majority side.
//!
//! **`sl` and `timeout`.** A request's sync level is the percentage of *all*
//! nodes, this one included, that must hold the counters, rounded up;
//! `required` is a floor that no level lowers, in either policy, and 100
//! asks for every node ([`Machine::required_for`]). With a witness,
//! yubikey-val's default 60 is then exactly the 2-of-3 majority (yubikey-val
//! counts peers only, which would turn the default into write-all and make
//! the witness useless). A request's `timeout` shortens the deadline, never
//! lengthens it. The `sl` of an answer is the percentage of all nodes that
//! held the counters at the decision, so an accepted answer's `sl` is at
//! least the level asked.
//!
//! # Idempotency
//!
//! Requests carry a [`RequestId`] chosen by the origin, unique for the
//! origin's lifetime *across restarts* (e.g. a random 64-bit number, or a
//! boot epoch in the high bits). A peer runs at most one durable
//! compare-and-set per `(origin, request id)` at a time, answers a duplicate
//! that arrives afterwards from a cache (for twice the deadline), and past
//! that the value rule itself makes the duplicate harmless. Replies echo the
//! public id and counters; the origin ignores replies that do not match, a
//! second reply from the same peer, and every reply after its decision.

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::time::{Duration, Instant};

use otp::{Counters, PublicId};

/// Longest deadline [`QuorumConfig::validate`] accepts.
pub const MAX_DEADLINE: Duration = Duration::from_secs(3600);

/// A node of the replication group: a site or the witness.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SiteId(pub u16);

impl fmt::Display for SiteId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "site-{}", self.0)
    }
}

/// One request of its origin site; unique for the origin's lifetime,
/// restarts included (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RequestId(pub u64);

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// A collision-resistant 256-bit digest of the OTP text (SHA-256 of the
/// lower-case modhex OTP), computed by the caller. Peers compare it to tell
/// the same request from a different OTP with equal counters, without
/// receiving or storing the OTP itself.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct OtpDigest(pub [u8; 32]);

impl fmt::Debug for OtpDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("OtpDigest(")?;
        for b in &self.0[..6] {
            write!(f, "{b:02x}")?;
        }
        f.write_str("…)")
    }
}

/// The counters one accepted OTP asks every node to hold, with the identity
/// of the request (nonce and OTP digest).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Proposal {
    /// The YubiKey.
    pub public_id: PublicId,
    /// Its `(counter, use)`, caps-lock bit dropped: the replay order.
    pub counters: Counters,
    /// The verify request's nonce.
    pub nonce: String,
    /// The digest of the OTP text.
    pub otp_digest: OtpDigest,
}

impl Proposal {
    /// Is `stored` this very request (equal counters, nonce and digest)?
    #[must_use]
    pub fn is_same_request(&self, stored: &StoredCounters) -> bool {
        self.counters == stored.counters && self.nonce == stored.nonce && self.otp_digest == stored.otp_digest
    }
}

/// What a node durably holds for one public id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredCounters {
    /// The highest counters accepted by a compare-and-set.
    pub counters: Counters,
    /// The nonce of the request that wrote them.
    pub nonce: String,
    /// The OTP digest of the request that wrote them.
    pub otp_digest: OtpDigest,
}

impl From<&Proposal> for StoredCounters {
    fn from(p: &Proposal) -> Self {
        Self { counters: p.counters, nonce: p.nonce.clone(), otp_digest: p.otp_digest }
    }
}

/// The outcome of the peer compare-and-set rule ([`peer_cas`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CasDecision {
    /// Strictly greater than the stored counters (or nothing stored): write
    /// the proposal, durably, then acknowledge.
    Store,
    /// Equal counters, nonce and digest: the same request, already stored;
    /// acknowledge without writing.
    SameRequest,
    /// Lower counters, or equal ones from another request: a replay. Nothing
    /// is written; the stored counters go back to the origin.
    Stale {
        /// The counters the node holds.
        stored: Counters,
    },
}

/// The peer compare-and-set rule. The I/O layer applies it atomically with
/// the write (inside one transaction, or as an equivalent conditional
/// update), and reports the result once it is durable.
#[must_use]
pub fn peer_cas(stored: Option<&StoredCounters>, proposal: &Proposal) -> CasDecision {
    match stored {
        None => CasDecision::Store,
        Some(s) if proposal.counters > s.counters => CasDecision::Store,
        Some(s) if proposal.is_same_request(s) => CasDecision::SameRequest,
        Some(s) => CasDecision::Stale { stored: s.counters },
    }
}

/// The durable compare-and-set of a peer's request, as the I/O layer
/// reports it in [`Input::PeerCasDone`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeerCasResult {
    /// [`CasDecision::Store`], written and fsynced.
    Stored,
    /// [`CasDecision::SameRequest`].
    SameRequest,
    /// [`CasDecision::Stale`].
    Stale {
        /// The counters the node holds.
        stored: Counters,
    },
    /// The store failed (I/O error, locked database): nothing is known to be
    /// durable. The origin does not count it and may ask again.
    Failed,
}

impl From<CasDecision> for PeerCasResult {
    fn from(d: CasDecision) -> Self {
        match d {
            CasDecision::Store => Self::Stored,
            CasDecision::SameRequest => Self::SameRequest,
            CasDecision::Stale { stored } => Self::Stale { stored },
        }
    }
}

/// A peer's answer to a [`Message::CasRequest`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplyOutcome {
    /// The peer durably holds the proposal (stored now or already).
    Ack,
    /// The peer holds these counters, which refuse the proposal.
    Stale {
        /// The peer's stored counters.
        stored: Counters,
    },
    /// The peer's store failed; not an acknowledgement.
    Failed,
}

/// What nodes send each other. Authentication is the transport's job (mutual
/// TLS): the sender arrives as [`Input::Message`]'s `from`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    /// "Compare-and-set this durably, then tell me."
    CasRequest {
        /// The origin's request id.
        req_id: RequestId,
        /// The site that accepted the OTP locally; must be the sender.
        origin: SiteId,
        /// What to compare-and-set.
        proposal: Proposal,
    },
    /// The answer, sent only after the compare-and-set is durable.
    CasReply {
        /// The origin's request id.
        req_id: RequestId,
        /// Echo of the proposal's public id.
        public_id: PublicId,
        /// Echo of the proposal's counters.
        counters: Counters,
        /// The outcome.
        outcome: ReplyOutcome,
    },
}

/// What to do when the quorum is not reached by the deadline.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Policy {
    /// Answer [`Verdict::NotEnoughAnswers`] (the default).
    FailClosed,
    /// Until `until`, answer [`Verdict::AcceptedAtRisk`] instead, with an
    /// [`Event::AcceptedAtRisk`] for each; afterwards, fail closed. Exposure:
    /// an OTP accepted here can be accepted again at a site that did not
    /// receive it, for as long as the window lasts.
    AcceptAtRisk {
        /// End of the window (exclusive), checked at the deadline.
        until: Instant,
    },
}

/// The replication group as one node sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QuorumConfig {
    /// The other full sites.
    pub peers: Vec<SiteId>,
    /// The counters-only witness, if any (not set in the witness's own
    /// configuration, which lists both sites as peers).
    pub witness: Option<SiteId>,
    /// How many nodes, this one included, must durably hold an OTP's
    /// counters before it is accepted: a strict majority of the group.
    pub required: usize,
    /// The longest a request waits for its quorum.
    pub deadline: Duration,
    /// What happens when the deadline passes first.
    pub policy: Policy,
    /// Ask the peers that have not acknowledged again at this interval
    /// until the decision (`None`: only on [`Input::PeerUp`]; the QUIC
    /// transport already retransmits).
    pub resend_every: Option<Duration>,
}

impl QuorumConfig {
    /// Two sites, write-all, failing closed.
    #[must_use]
    pub fn two_sites(peer: SiteId, deadline: Duration) -> Self {
        Self { peers: vec![peer], witness: None, required: 2, deadline, policy: Policy::FailClosed, resend_every: None }
    }

    /// Two sites and a witness, 2 of 3, failing closed.
    #[must_use]
    pub fn with_witness(peer: SiteId, witness: SiteId, deadline: Duration) -> Self {
        Self { peers: vec![peer], witness: Some(witness), required: 2, deadline, policy: Policy::FailClosed, resend_every: None }
    }

    /// The witness's own configuration: both sites as peers. It only answers
    /// compare-and-sets.
    #[must_use]
    pub fn witness_of(site_a: SiteId, site_b: SiteId, deadline: Duration) -> Self {
        Self { peers: vec![site_a, site_b], witness: None, required: 2, deadline, policy: Policy::FailClosed, resend_every: None }
    }

    /// The other nodes of the group: the peers, then the witness.
    pub fn others(&self) -> impl Iterator<Item = SiteId> + '_ {
        self.peers.iter().copied().chain(self.witness)
    }

    /// The number of nodes in the group, this one included.
    #[must_use]
    pub fn group_size(&self) -> usize {
        1 + self.others().count()
    }

    /// Check the configuration of node `site`: no duplicate nodes, `site`
    /// not among the others, `required` a strict majority of the group (so
    /// that any two quorums intersect) and at most the group, a deadline in
    /// `(0, MAX_DEADLINE]`, a non-zero resend interval.
    pub fn validate(&self, site: SiteId) -> Result<(), ConfigError> {
        let mut seen = vec![site];
        for other in self.others() {
            if seen.contains(&other) {
                return Err(ConfigError::DuplicateSite(other));
            }
            seen.push(other);
        }
        let total = seen.len();
        if self.required * 2 <= total || self.required > total {
            return Err(ConfigError::NotAMajority { required: self.required, group: total });
        }
        if self.deadline.is_zero() || self.deadline > MAX_DEADLINE {
            return Err(ConfigError::Deadline(self.deadline));
        }
        if self.resend_every.is_some_and(|d| d.is_zero()) {
            return Err(ConfigError::ResendInterval);
        }
        Ok(())
    }
}

/// A configuration [`QuorumConfig::validate`] refuses.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConfigError {
    /// A node appears twice (or the node itself among the others).
    DuplicateSite(SiteId),
    /// `required` is not a strict majority of the group, or exceeds it.
    NotAMajority {
        /// The configured value.
        required: usize,
        /// The number of nodes, this one included.
        group: usize,
    },
    /// Zero, or longer than [`MAX_DEADLINE`].
    Deadline(Duration),
    /// A zero resend interval.
    ResendInterval,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::DuplicateSite(s) => write!(f, "{s} is listed twice in the replication group"),
            Self::NotAMajority { required, group } => write!(
                f,
                "required = {required} is not a strict majority of the {group} nodes: two sides of a partition could both accept an OTP"
            ),
            Self::Deadline(d) => write!(f, "deadline {d:?} must be above zero and at most {MAX_DEADLINE:?}"),
            Self::ResendInterval => f.write_str("the resend interval must be above zero"),
        }
    }
}

impl std::error::Error for ConfigError {}

/// One input to [`Machine::handle`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Input {
    /// This site's durable compare-and-set just accepted `proposal` (the
    /// counters were strictly greater): replicate it and decide.
    LocalAccepted {
        /// A request id unique for this site's lifetime, restarts included.
        req_id: RequestId,
        /// What was accepted.
        proposal: Proposal,
        /// The verify request's `sl` (percentage), if it gave one.
        sync_level: Option<u8>,
        /// The verify request's `timeout`, if it gave one.
        timeout: Option<Duration>,
    },
    /// A message from node `from` (authenticated by the transport).
    Message {
        /// The sender.
        from: SiteId,
        /// What it sent.
        message: Message,
    },
    /// The durable compare-and-set asked for by [`Action::DurableCas`] is
    /// done (fsynced) or failed.
    PeerCasDone {
        /// As in the action.
        origin: SiteId,
        /// As in the action.
        req_id: RequestId,
        /// What the store did.
        result: PeerCasResult,
    },
    /// The timer of [`Action::SetTimer`] fired (early or spurious ticks are
    /// harmless).
    Tick,
    /// The transport (re)connected to `site`: outstanding requests are sent
    /// to it again.
    PeerUp {
        /// The node now reachable.
        site: SiteId,
    },
}

/// The answer to a request of this site.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The quorum holds the counters durably: `OK`.
    Accepted {
        /// Percentage of the group holding them.
        sl: u8,
    },
    /// A node holds these counters or higher: `REPLAYED_OTP`.
    Replayed,
    /// The deadline passed first: `NOT_ENOUGH_ANSWERS`. The counters stay
    /// burned at the nodes that took them.
    NotEnoughAnswers {
        /// Percentage of the group holding them.
        sl: u8,
    },
    /// The deadline passed first inside an accept-at-risk window: `OK`, but
    /// logged and counted ([`Event::AcceptedAtRisk`]).
    AcceptedAtRisk {
        /// Percentage of the group holding them.
        sl: u8,
    },
}

/// Something for the log and the metrics.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// A request of this site missed its quorum and failed closed.
    QuorumFailed {
        /// The request.
        req_id: RequestId,
        /// The YubiKey.
        public_id: PublicId,
        /// The OTP's counters.
        counters: Counters,
        /// Nodes that held them (this one included).
        acks: usize,
        /// Nodes that had to.
        required: usize,
    },
    /// A request of this site missed its quorum and was accepted at risk.
    AcceptedAtRisk {
        /// The request.
        req_id: RequestId,
        /// The YubiKey.
        public_id: PublicId,
        /// The OTP's counters.
        counters: Counters,
        /// Nodes that held them (this one included).
        acks: usize,
        /// Nodes that should have.
        required: usize,
        /// The end of the window.
        until: Instant,
    },
    /// A peer refused a request of this site: it holds higher or equal
    /// counters (a replay, or a race with another request).
    PeerRefused {
        /// The request.
        req_id: RequestId,
        /// The peer.
        from: SiteId,
        /// The YubiKey.
        public_id: PublicId,
        /// The OTP's counters.
        counters: Counters,
        /// The peer's counters.
        stored: Counters,
    },
    /// A request of this site was refused because higher counters for its
    /// key were stored here while it waited.
    Superseded {
        /// The request.
        req_id: RequestId,
        /// The YubiKey.
        public_id: PublicId,
        /// The OTP's counters.
        counters: Counters,
        /// The higher counters now stored.
        by: Counters,
    },
    /// This node refused a peer's compare-and-set (it holds higher or equal
    /// counters): yubikey-val's "remote server has received a request to
    /// validate an already validated OTP".
    RefusedPeerRequest {
        /// The peer.
        origin: SiteId,
        /// Its request.
        req_id: RequestId,
        /// The YubiKey.
        public_id: PublicId,
        /// The peer's counters.
        counters: Counters,
        /// This node's counters.
        stored: Counters,
    },
    /// This node's store failed a peer's compare-and-set.
    PeerCasFailed {
        /// The peer.
        origin: SiteId,
        /// Its request.
        req_id: RequestId,
    },
    /// A peer reported that its store failed a request of this site.
    PeerReportedFailure {
        /// The request.
        req_id: RequestId,
        /// The peer.
        from: SiteId,
    },
    /// A message or input that was dropped.
    Ignored {
        /// The sender, or the origin of a compare-and-set result.
        from: SiteId,
        /// Why.
        reason: IgnoredReason,
    },
}

/// Why an input was dropped ([`Event::Ignored`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum IgnoredReason {
    /// The sender is not in the group.
    UnknownSite,
    /// A compare-and-set request whose `origin` is not its sender.
    OriginMismatch,
    /// A reply whose echo does not match the pending request.
    ReplyMismatch,
    /// A request id reused for a different proposal while the first one is
    /// still being stored.
    RequestIdReused,
    /// [`Input::LocalAccepted`] with the id of a pending request.
    DuplicateLocalRequest,
    /// [`Input::PeerCasDone`] for no compare-and-set in flight.
    UnexpectedCasResult,
}

/// What the caller must do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Send `message` to `to`. Loss is tolerated (the request times out).
    Send {
        /// The receiver.
        to: SiteId,
        /// The message.
        message: Message,
    },
    /// Apply [`peer_cas`] to the stored record of `proposal.public_id`
    /// atomically, make it durable, then feed [`Input::PeerCasDone`].
    DurableCas {
        /// The requesting site.
        origin: SiteId,
        /// Its request id.
        req_id: RequestId,
        /// What to compare-and-set.
        proposal: Proposal,
    },
    /// Answer request `req_id` of this site; exactly once per request fed
    /// with [`Input::LocalAccepted`] (unless the machine is lost first).
    Answer {
        /// The request.
        req_id: RequestId,
        /// The verdict.
        verdict: Verdict,
    },
    /// Feed [`Input::Tick`] at `at` or soon after; replaces any earlier
    /// timer.
    SetTimer {
        /// When.
        at: Instant,
    },
    /// Log it, count it.
    Event(Event),
}

/// A peer's progress on one pending request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PeerState {
    Waiting,
    Acked,
    Failed,
}

#[derive(Debug)]
struct Pending {
    proposal: Proposal,
    required: usize,
    deadline: Instant,
    peers: BTreeMap<SiteId, PeerState>,
    next_resend: Option<Instant>,
}

impl Pending {
    fn acks(&self) -> usize {
        1 + self.peers.values().filter(|s| **s == PeerState::Acked).count()
    }

    fn request(&self, req_id: RequestId, origin: SiteId) -> Message {
        Message::CasRequest { req_id, origin, proposal: self.proposal.clone() }
    }
}

#[derive(Debug)]
struct Answered {
    proposal: Proposal,
    outcome: ReplyOutcome,
    expires: Instant,
}

/// One node's counter replication: see the module docs.
#[derive(Debug)]
pub struct Machine {
    site: SiteId,
    config: QuorumConfig,
    /// This site's requests waiting for their quorum.
    pending: BTreeMap<RequestId, Pending>,
    /// Peers' requests whose durable compare-and-set is in flight.
    storing: BTreeMap<(SiteId, RequestId), Proposal>,
    /// Peers' requests answered recently, for duplicates.
    answered: BTreeMap<(SiteId, RequestId), Answered>,
    answered_expiry: VecDeque<(Instant, SiteId, RequestId)>,
    /// The highest counters known to be stored here recently, per key.
    recent: BTreeMap<PublicId, (Counters, Instant)>,
    recent_expiry: VecDeque<(Instant, PublicId)>,
    /// The timer last asked for.
    armed: Option<Instant>,
}

impl Machine {
    /// A node with no volatile state (at start, or after a crash: the
    /// durable store is all that survives, and all that safety needs).
    pub fn new(site: SiteId, config: QuorumConfig) -> Result<Self, ConfigError> {
        config.validate(site)?;
        Ok(Self {
            site,
            config,
            pending: BTreeMap::new(),
            storing: BTreeMap::new(),
            answered: BTreeMap::new(),
            answered_expiry: VecDeque::new(),
            recent: BTreeMap::new(),
            recent_expiry: VecDeque::new(),
            armed: None,
        })
    }

    /// This node.
    #[must_use]
    pub fn site(&self) -> SiteId {
        self.site
    }

    /// The configuration.
    #[must_use]
    pub fn config(&self) -> &QuorumConfig {
        &self.config
    }

    /// Requests of this site still waiting for a decision.
    #[must_use]
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// When the machine next needs a [`Input::Tick`], if ever.
    #[must_use]
    pub fn next_wakeup(&self) -> Option<Instant> {
        self.pending.values().flat_map(|p| [Some(p.deadline), p.next_resend]).flatten().min()
    }

    /// The nodes (this one included) a request with sync level `sync_level`
    /// needs: `⌈group × sl / 100⌉` (sl capped at 100), but never fewer than
    /// [`QuorumConfig::required`]; without a level, `required`.
    #[must_use]
    pub fn required_for(&self, sync_level: Option<u8>) -> usize {
        let group = self.config.group_size();
        let floor = self.config.required;
        match sync_level {
            None => floor,
            Some(sl) => {
                let asked = (group * usize::from(sl.min(100))).div_ceil(100);
                asked.clamp(floor, group)
            }
        }
    }

    /// Process one input at time `now` (monotonic; never earlier than a
    /// previous call's) and return what to do, in order.
    #[must_use]
    pub fn handle(&mut self, now: Instant, input: Input) -> Vec<Action> {
        let mut out = Vec::new();
        if self.armed.is_some_and(|at| at <= now) {
            self.armed = None;
        }
        self.forget_old(now);
        // Deadlines first: a reply processed at or after the deadline is late.
        self.expire(now, &mut out);
        match input {
            Input::LocalAccepted { req_id, proposal, sync_level, timeout } => {
                self.local_accepted(now, req_id, proposal, sync_level, timeout, &mut out);
            }
            Input::Message { from, message } => self.message(from, message, &mut out),
            Input::PeerCasDone { origin, req_id, result } => self.peer_cas_done(now, origin, req_id, result, &mut out),
            Input::Tick => {}
            Input::PeerUp { site } => self.peer_up(site, &mut out),
        }
        self.expire(now, &mut out);
        self.resend_due(now, &mut out);
        self.arm_timer(&mut out);
        out
    }

    fn is_other(&self, site: SiteId) -> bool {
        self.config.others().any(|s| s == site)
    }

    fn retention(&self, now: Instant) -> Instant {
        now.checked_add(self.config.deadline.saturating_mul(2)).unwrap_or(now)
    }

    fn local_accepted(
        &mut self,
        now: Instant,
        req_id: RequestId,
        proposal: Proposal,
        sync_level: Option<u8>,
        timeout: Option<Duration>,
        out: &mut Vec<Action>,
    ) {
        if self.pending.contains_key(&req_id) {
            out.push(Action::Event(Event::Ignored { from: self.site, reason: IgnoredReason::DuplicateLocalRequest }));
            return;
        }
        // A higher value was stored here since (the local CAS was a while ago).
        if let Some(&(by, _)) = self.recent.get(&proposal.public_id) {
            if by > proposal.counters {
                out.push(Action::Event(Event::Superseded { req_id, public_id: proposal.public_id, counters: proposal.counters, by }));
                out.push(Action::Answer { req_id, verdict: Verdict::Replayed });
                return;
            }
        }
        self.stored_here(now, proposal.public_id, proposal.counters, out);
        let wait = timeout.map_or(self.config.deadline, |t| t.min(self.config.deadline));
        // An overflowing deadline cannot happen with MAX_DEADLINE; if it did,
        // failing at once is the safe side.
        let deadline = now.checked_add(wait).unwrap_or(now);
        let next_resend = self.config.resend_every.and_then(|d| now.checked_add(d));
        let pending = Pending {
            proposal,
            required: self.required_for(sync_level),
            deadline,
            peers: self.config.others().map(|s| (s, PeerState::Waiting)).collect(),
            next_resend,
        };
        for to in self.config.others() {
            out.push(Action::Send { to, message: pending.request(req_id, self.site) });
        }
        if pending.acks() >= pending.required {
            let sl = self.sl(pending.acks());
            out.push(Action::Answer { req_id, verdict: Verdict::Accepted { sl } });
            return;
        }
        self.pending.insert(req_id, pending);
    }

    fn message(&mut self, from: SiteId, message: Message, out: &mut Vec<Action>) {
        if !self.is_other(from) {
            out.push(Action::Event(Event::Ignored { from, reason: IgnoredReason::UnknownSite }));
            return;
        }
        match message {
            Message::CasRequest { req_id, origin, proposal } => {
                if origin != from {
                    out.push(Action::Event(Event::Ignored { from, reason: IgnoredReason::OriginMismatch }));
                    return;
                }
                self.cas_request(origin, req_id, proposal, out);
            }
            Message::CasReply { req_id, public_id, counters, outcome } => {
                self.cas_reply(from, req_id, public_id, counters, outcome, out);
            }
        }
    }

    fn cas_request(&mut self, origin: SiteId, req_id: RequestId, proposal: Proposal, out: &mut Vec<Action>) {
        let key = (origin, req_id);
        if let Some(done) = self.answered.get(&key) {
            if done.proposal == proposal {
                out.push(Action::Send { to: origin, message: reply(req_id, &proposal, done.outcome) });
                return;
            }
            // The origin reused the id (after a restart): start afresh.
            self.answered.remove(&key);
        }
        if let Some(storing) = self.storing.get(&key) {
            if *storing != proposal {
                out.push(Action::Event(Event::Ignored { from: origin, reason: IgnoredReason::RequestIdReused }));
            }
            // Otherwise a duplicate: the reply follows the durable write.
            return;
        }
        self.storing.insert(key, proposal.clone());
        out.push(Action::DurableCas { origin, req_id, proposal });
    }

    fn peer_cas_done(&mut self, now: Instant, origin: SiteId, req_id: RequestId, result: PeerCasResult, out: &mut Vec<Action>) {
        let Some(proposal) = self.storing.remove(&(origin, req_id)) else {
            out.push(Action::Event(Event::Ignored { from: origin, reason: IgnoredReason::UnexpectedCasResult }));
            return;
        };
        let outcome = match result {
            PeerCasResult::Stored => {
                self.stored_here(now, proposal.public_id, proposal.counters, out);
                ReplyOutcome::Ack
            }
            PeerCasResult::SameRequest => ReplyOutcome::Ack,
            PeerCasResult::Stale { stored } => {
                out.push(Action::Event(Event::RefusedPeerRequest {
                    origin,
                    req_id,
                    public_id: proposal.public_id,
                    counters: proposal.counters,
                    stored,
                }));
                self.stored_here(now, proposal.public_id, stored, out);
                ReplyOutcome::Stale { stored }
            }
            PeerCasResult::Failed => {
                out.push(Action::Event(Event::PeerCasFailed { origin, req_id }));
                ReplyOutcome::Failed
            }
        };
        out.push(Action::Send { to: origin, message: reply(req_id, &proposal, outcome) });
        if outcome != ReplyOutcome::Failed {
            let expires = self.retention(now);
            self.answered.insert((origin, req_id), Answered { proposal, outcome, expires });
            self.answered_expiry.push_back((expires, origin, req_id));
        }
    }

    fn cas_reply(
        &mut self,
        from: SiteId,
        req_id: RequestId,
        public_id: PublicId,
        counters: Counters,
        outcome: ReplyOutcome,
        out: &mut Vec<Action>,
    ) {
        // Unknown: decided already (late or duplicated reply), or not ours.
        let Some(pending) = self.pending.get_mut(&req_id) else { return };
        if pending.proposal.public_id != public_id || pending.proposal.counters != counters {
            out.push(Action::Event(Event::Ignored { from, reason: IgnoredReason::ReplyMismatch }));
            return;
        }
        let Some(state) = pending.peers.get_mut(&from) else {
            out.push(Action::Event(Event::Ignored { from, reason: IgnoredReason::UnknownSite }));
            return;
        };
        match outcome {
            ReplyOutcome::Ack => {
                *state = PeerState::Acked;
                let acks = pending.acks();
                if acks >= pending.required {
                    let sl = self.sl(acks);
                    self.pending.remove(&req_id);
                    out.push(Action::Answer { req_id, verdict: Verdict::Accepted { sl } });
                }
            }
            ReplyOutcome::Stale { stored } => {
                self.pending.remove(&req_id);
                out.push(Action::Event(Event::PeerRefused { req_id, from, public_id, counters, stored }));
                out.push(Action::Answer { req_id, verdict: Verdict::Replayed });
            }
            ReplyOutcome::Failed => {
                if *state == PeerState::Waiting {
                    *state = PeerState::Failed;
                }
                out.push(Action::Event(Event::PeerReportedFailure { req_id, from }));
            }
        }
    }

    fn peer_up(&mut self, site: SiteId, out: &mut Vec<Action>) {
        for (req_id, p) in &self.pending {
            if p.peers.get(&site).is_some_and(|s| *s != PeerState::Acked) {
                out.push(Action::Send { to: site, message: p.request(*req_id, self.site) });
            }
        }
    }

    /// `counters` are durably stored here for `public_id`: remember them for
    /// a while and refuse this site's pending requests that are lower.
    fn stored_here(&mut self, now: Instant, public_id: PublicId, counters: Counters, out: &mut Vec<Action>) {
        let raise = self.recent.get(&public_id).is_none_or(|(c, _)| counters > *c);
        if raise {
            let expires = self.retention(now);
            self.recent.insert(public_id, (counters, expires));
            self.recent_expiry.push_back((expires, public_id));
        }
        let lower: Vec<RequestId> = self
            .pending
            .iter()
            .filter(|(_, p)| p.proposal.public_id == public_id && p.proposal.counters < counters)
            .map(|(id, _)| *id)
            .collect();
        for req_id in lower {
            if let Some(p) = self.pending.remove(&req_id) {
                out.push(Action::Event(Event::Superseded { req_id, public_id, counters: p.proposal.counters, by: counters }));
                out.push(Action::Answer { req_id, verdict: Verdict::Replayed });
            }
        }
    }

    fn expire(&mut self, now: Instant, out: &mut Vec<Action>) {
        let due: Vec<RequestId> = self.pending.iter().filter(|(_, p)| p.deadline <= now).map(|(id, _)| *id).collect();
        for req_id in due {
            let Some(p) = self.pending.remove(&req_id) else { continue };
            let acks = p.acks();
            let sl = self.sl(acks);
            let public_id = p.proposal.public_id;
            let counters = p.proposal.counters;
            let required = p.required;
            match self.config.policy {
                Policy::AcceptAtRisk { until } if now < until => {
                    out.push(Action::Event(Event::AcceptedAtRisk { req_id, public_id, counters, acks, required, until }));
                    out.push(Action::Answer { req_id, verdict: Verdict::AcceptedAtRisk { sl } });
                }
                _ => {
                    out.push(Action::Event(Event::QuorumFailed { req_id, public_id, counters, acks, required }));
                    out.push(Action::Answer { req_id, verdict: Verdict::NotEnoughAnswers { sl } });
                }
            }
        }
    }

    fn resend_due(&mut self, now: Instant, out: &mut Vec<Action>) {
        let Some(every) = self.config.resend_every else { return };
        for (req_id, p) in &mut self.pending {
            if p.next_resend.is_some_and(|at| at <= now) {
                for (to, state) in &p.peers {
                    if *state != PeerState::Acked {
                        out.push(Action::Send {
                            to: *to,
                            message: Message::CasRequest { req_id: *req_id, origin: self.site, proposal: p.proposal.clone() },
                        });
                    }
                }
                p.next_resend = now.checked_add(every);
            }
        }
    }

    fn arm_timer(&mut self, out: &mut Vec<Action>) {
        let next = self.next_wakeup();
        if let Some(at) = next {
            if self.armed != Some(at) {
                self.armed = Some(at);
                out.push(Action::SetTimer { at });
            }
        }
    }

    fn forget_old(&mut self, now: Instant) {
        while let Some(&(at, origin, req_id)) = self.answered_expiry.front() {
            if at > now {
                break;
            }
            self.answered_expiry.pop_front();
            if self.answered.get(&(origin, req_id)).is_some_and(|a| a.expires == at) {
                self.answered.remove(&(origin, req_id));
            }
        }
        while let Some(&(at, public_id)) = self.recent_expiry.front() {
            if at > now {
                break;
            }
            self.recent_expiry.pop_front();
            if self.recent.get(&public_id).is_some_and(|(_, e)| *e == at) {
                self.recent.remove(&public_id);
            }
        }
    }

    /// Percentage of the group that holds the counters.
    fn sl(&self, acks: usize) -> u8 {
        u8::try_from(acks * 100 / self.config.group_size()).unwrap_or(100)
    }
}

fn reply(req_id: RequestId, proposal: &Proposal, outcome: ReplyOutcome) -> Message {
    Message::CasReply { req_id, public_id: proposal.public_id, counters: proposal.counters, outcome }
}
