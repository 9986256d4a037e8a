//! The sync exchange driven by the node: pullers for every (peer, dataset),
//! the server side of [`SyncRequest`]s, and their status.
//!
//! # Design
//!
//! **One task per (peer, dataset).** A site pulls every dataset it has
//! registered ([`SyncSetup::stores`]) from every peer of its table; the
//! peer does the same the other way, so each direction is a pull and every
//! merge is local. The task alternates two exchanges, one at a time, so
//! that one store never sees two merges from the same peer at once:
//!
//! - **Outbox pull** ([`SyncRequest::Pull`]). The cursor starts as `None`:
//!   the peer then answers from the acknowledgement it recorded for us, so a
//!   restarted site neither needs its own bookkeeping nor loses anything.
//!   The page is merged on the blocking pool; only once the merge returned
//!   (durably) does the cursor become `Some(changes.last)`, which the next
//!   pull carries as the acknowledgement. A failed merge leaves the cursor
//!   where it was: the same page comes again. A full page
//!   ([`SyncOptions::page_limit`] items, the peer's head not reached) is
//!   followed by the next pull at once, otherwise by
//!   [`SyncOptions::pull_interval`].
//! - **Anti-entropy** ([`SyncRequest::Digest`], [`SyncRequest::Bucket`]):
//!   at start, every [`SyncOptions::digest_interval`], and when the peer
//!   comes back up ([`NodeEvent::PeerUp`]), but never while the outbox
//!   pull is behind (its last page was full): a restarted site first
//!   catches up through the cheap outbox, and the round that follows finds
//!   little or nothing to repair. Then the peer's digest is compared
//!   with the local one (computed on the blocking pool) and each differing
//!   bucket is fetched whole and merged. It repairs what no outbox carries
//!   (lost or compacted rows, writes that bypassed it) and bootstraps an
//!   empty site. One-directional as well: the peer's own round repairs the
//!   other side. A failed round is tried again at the next interval or
//!   when the peer comes back up.
//!
//! **Errors** (an RPC failure, a refusal, an undecodable reply, a store
//! failure) are logged on transitions only (warn when a pair starts
//! failing, info when it recovers; debug in between) and retried after a
//! backoff that starts at the pull interval and doubles up to
//! [`SyncOptions::max_backoff`]. A peer that answers
//! [`RefusalCode::UnknownDataset`] (a witness holds counters only) is not
//! asked about that dataset again until it comes back up or a digest
//! interval has passed; that is logged once, at info. A
//! [`RefusalCode::TooLarge`] halves the page limit of that pair (down to
//! one item). A digest (8 KiB) or a single bucket over the frame limit
//! cannot be split: that round fails and is retried at the next interval,
//! while the outbox pull goes on.
//!
//! **Serving.** The node's transport handler hands sync frames
//! ([`wire::is_sync`]) to the sync server: the store call and the reply's
//! encoding run on the blocking pool with the peer's name from the peer
//! table (the one the transport authorized). An unknown dataset, a store
//! error, a reply over the frame limit and an undecodable request are
//! answered with a [`SyncReply::Refused`] and a short reason.
//!
//! **Sans-IO parts.** The bookkeeping of a pair (cursor, page limit,
//! backoff, when the next digest round is due, what "caught up" means) is
//! the plain [`PairState`], unit-tested without a network; the digest
//! comparison is [`Digest::differing`](crate::sync::Digest::differing).
//!
//! # Lag
//!
//! [`SyncStatus::lag_changes`] is `head - last` of the last page merged:
//! how many of the peer's changes we had not yet merged then.
//! [`SyncStatus::lag`] is the time since the last merged pull that reached
//! the peer's head (`last >= head`), i.e. since this site last held all of
//! the peer's outbox; before the first such pull, the time since the pair
//! started. While in step it stays below the pull interval plus one round
//! trip.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::broadcast;

use crate::node::NodeEvent;
use crate::quorum::SiteId;
use crate::sync::{Changes, Dataset, Merged, SyncError, SyncStore};
use crate::transport::{Endpoint, Peer, RpcError};
use crate::wire::{self, RefusalCode, SyncReply, SyncRequest, WireError};

/// Timing and sizes of the sync exchange. The defaults suit two sites and
/// a witness over a WAN.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SyncOptions {
    /// Pause between pulls once a page came back short (default 100 ms:
    /// an empty pull costs the peer one read, no write).
    pub pull_interval: Duration,
    /// Most items per pulled page (default 2,000; at most [`MAX_VALUE`]-sized
    /// values that is about 8 MiB, within the 16 MiB frame).
    ///
    /// [`MAX_VALUE`]: crate::sync::MAX_VALUE
    pub page_limit: u32,
    /// Pause between anti-entropy rounds (default 60 s); a round also runs
    /// at start and when a peer comes back up.
    pub digest_interval: Duration,
    /// Deadline of each sync request (default 10 s).
    pub deadline: Duration,
    /// Longest pause after repeated failures (default 5 s).
    pub max_backoff: Duration,
}

impl Default for SyncOptions {
    fn default() -> Self {
        Self {
            pull_interval: Duration::from_millis(100),
            page_limit: 2_000,
            digest_interval: Duration::from_secs(60),
            deadline: Duration::from_secs(10),
            max_backoff: Duration::from_secs(5),
        }
    }
}

/// The datasets a node replicates, for
/// [`Node::start_with`](crate::node::Node::start_with).
#[derive(Clone, Default)]
pub struct SyncSetup {
    /// The local store of each dataset this site holds: it is served to
    /// peers and pulled from every peer.
    pub stores: BTreeMap<Dataset, Arc<dyn SyncStore>>,
    /// Timing and sizes.
    pub options: SyncOptions,
}

impl fmt::Debug for SyncSetup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SyncSetup").field("datasets", &self.stores.keys().collect::<Vec<_>>()).field("options", &self.options).finish()
    }
}

/// The sync state of one (peer, dataset) pair, as this site pulls it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SyncStatus {
    /// The peer.
    pub site: SiteId,
    /// Its name.
    pub peer: String,
    /// The dataset.
    pub dataset: Dataset,
    /// Pages pulled and merged.
    pub pulls: u64,
    /// Items received in those pages.
    pub items_pulled: u64,
    /// Items received in differing buckets (anti-entropy).
    pub bucket_items: u64,
    /// Items that changed the local state (pages and buckets).
    pub applied: u64,
    /// Items that changed nothing (pages and buckets).
    pub unchanged: u64,
    /// Items refused and quarantined by the store (pages and buckets).
    pub conflicts: u64,
    /// When the last page was merged.
    pub last_pull: Option<Instant>,
    /// The cursor: the peer's last change merged here (`None` until the
    /// first merge since the start).
    pub cursor: Option<u64>,
    /// The peer's head at the last merged pull.
    pub peer_head: Option<u64>,
    /// `head - last` at the last merged pull (see the module docs).
    pub lag_changes: Option<u64>,
    /// When a merged pull last reached the peer's head.
    pub caught_up_at: Option<Instant>,
    /// Time since `caught_up_at`, or since the start if never (see the
    /// module docs); computed when the status is read.
    pub lag: Duration,
    /// Anti-entropy rounds completed.
    pub digest_rounds: u64,
    /// Buckets found differing, over all rounds.
    pub buckets_differing: u64,
    /// Failed exchanges (RPC, refusal, store).
    pub errors: u64,
    /// The last failure, for operators (no secrets: reasons and errors only).
    pub last_error: Option<String>,
    /// The peer said it does not hold this dataset.
    pub unsupported: bool,
    /// The page limit in use ([`SyncOptions::page_limit`], halved for each
    /// [`RefusalCode::TooLarge`]).
    pub page_limit: u32,
}

/// The statuses, shared by the pullers and the node handle.
#[derive(Default)]
pub(crate) struct Statuses {
    pairs: Mutex<BTreeMap<(SiteId, Dataset), (SyncStatus, Instant)>>,
}

impl Statuses {
    fn insert(&self, site: SiteId, peer: &str, dataset: Dataset, page_limit: u32) {
        let status = SyncStatus {
            site,
            peer: peer.to_string(),
            dataset,
            pulls: 0,
            items_pulled: 0,
            bucket_items: 0,
            applied: 0,
            unchanged: 0,
            conflicts: 0,
            last_pull: None,
            cursor: None,
            peer_head: None,
            lag_changes: None,
            caught_up_at: None,
            lag: Duration::ZERO,
            digest_rounds: 0,
            buckets_differing: 0,
            errors: 0,
            last_error: None,
            unsupported: false,
            page_limit,
        };
        self.lock().insert((site, dataset), (status, Instant::now()));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<(SiteId, Dataset), (SyncStatus, Instant)>> {
        self.pairs.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn update(&self, site: SiteId, dataset: Dataset, f: impl FnOnce(&mut SyncStatus)) {
        if let Some((status, _)) = self.lock().get_mut(&(site, dataset)) {
            f(status);
        }
    }

    /// Every pair, in (peer, dataset) order, with the time lag as of now.
    pub(crate) fn snapshot(&self) -> Vec<SyncStatus> {
        let now = Instant::now();
        self.lock()
            .values()
            .map(|(status, started)| {
                let mut status = status.clone();
                status.lag = now.saturating_duration_since(status.caught_up_at.unwrap_or(*started));
                status
            })
            .collect()
    }
}

fn add_merged(status: &mut SyncStatus, merged: Merged) {
    status.applied = status.applied.saturating_add(merged.applied);
    status.unchanged = status.unchanged.saturating_add(merged.unchanged);
    status.conflicts = status.conflicts.saturating_add(merged.conflicts);
}

// ---------------------------------------------------------------------------
// Sans-IO bookkeeping.

/// A doubling backoff between `base` and `max`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    /// Starts at `base` (at least 1 ms), doubles up to `max`.
    #[must_use]
    pub fn new(base: Duration, max: Duration) -> Self {
        let base = base.max(Duration::from_millis(1));
        Self { base, max: max.max(base), next: base }
    }

    /// The pause after one more failure.
    pub fn fail(&mut self) -> Duration {
        let pause = self.next;
        self.next = self.next.saturating_mul(2).min(self.max);
        pause
    }

    /// Whether the last outcome was a success (no pause pending).
    #[must_use]
    pub fn is_reset(&self) -> bool {
        self.next == self.base
    }

    /// After a success.
    pub fn reset(&mut self) {
        self.next = self.base;
    }
}

/// What a puller does next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Next {
    /// Pull again at once (a full page).
    Now,
    /// Wait this long first.
    After(Duration),
}

/// The bookkeeping of one (peer, dataset) puller, without I/O.
#[derive(Clone, Debug)]
pub struct PairState {
    /// The peer's last change merged here.
    pub cursor: Option<u64>,
    /// The page limit in use (halved on [`RefusalCode::TooLarge`]).
    pub limit: u32,
    /// The peer does not hold the dataset: do not ask until this instant.
    pub unsupported_until: Option<Instant>,
    /// The next anti-entropy round is due at this instant.
    pub digest_at: Instant,
    /// Whether the pair is failing (for logging transitions only).
    pub failing: bool,
    /// Whether the last page was full: more is waiting in the peer's
    /// outbox (true until the first page, so that the outbox goes first).
    pub behind: bool,
    backoff: Backoff,
    pull_interval: Duration,
    digest_interval: Duration,
}

impl PairState {
    /// A new pair: no cursor, a digest round due at once.
    #[must_use]
    pub fn new(now: Instant, options: &SyncOptions) -> Self {
        Self {
            cursor: None,
            limit: options.page_limit.max(1),
            unsupported_until: None,
            digest_at: now,
            failing: false,
            behind: true,
            backoff: Backoff::new(options.pull_interval, options.max_backoff),
            pull_interval: options.pull_interval,
            digest_interval: options.digest_interval,
        }
    }

    /// The next pull request.
    #[must_use]
    pub fn pull(&self, dataset: Dataset) -> SyncRequest {
        SyncRequest::Pull { dataset, after: self.cursor, limit: self.limit }
    }

    /// Whether an anti-entropy round is due (never while behind).
    #[must_use]
    pub fn digest_due(&self, now: Instant) -> bool {
        !self.behind && now >= self.digest_at
    }

    /// An anti-entropy round completed.
    pub fn digest_done(&mut self, now: Instant) {
        self.digest_at = now.checked_add(self.digest_interval).unwrap_or(now);
    }

    /// Whether the peer is to be asked about the dataset now.
    #[must_use]
    pub fn supported(&self, now: Instant) -> bool {
        self.unsupported_until.is_none_or(|until| now >= until)
    }

    /// A page of `items` items up to `last`, the peer's head being `head`
    /// (pulled with [`pull`](Self::pull)), is durably merged: the cursor
    /// moves to its end. Returns whether the peer's head was reached, and
    /// when to pull next.
    pub fn merged(&mut self, items: usize, last: u64, head: u64) -> (bool, Next) {
        self.cursor = Some(last);
        self.backoff.reset();
        let caught_up = last >= head;
        let full = items >= usize::try_from(self.limit).unwrap_or(usize::MAX);
        self.behind = full && !caught_up;
        let next = if self.behind { Next::Now } else { Next::After(self.pull_interval) };
        (caught_up, next)
    }

    /// An exchange succeeded without a page (a digest round).
    pub fn succeeded(&mut self) {
        self.backoff.reset();
    }

    /// An exchange failed: the cursor stays; returns the pause.
    pub fn failed(&mut self) -> Duration {
        self.backoff.fail()
    }

    /// The peer refused for a reason: adjusts the state and returns the
    /// pause.
    pub fn refused(&mut self, now: Instant, code: RefusalCode) -> Duration {
        match code {
            RefusalCode::UnknownDataset => {
                self.unsupported_until = Some(now.checked_add(self.digest_interval).unwrap_or(now));
                self.digest_interval
            }
            RefusalCode::TooLarge => {
                self.limit = (self.limit / 2).max(1);
                self.backoff.reset();
                Duration::ZERO
            }
            RefusalCode::StoreFailure | RefusalCode::BadRequest => self.failed(),
        }
    }

    /// The peer came back up: ask it again about everything, run a digest
    /// round, and pull at once.
    pub fn peer_up(&mut self, now: Instant) {
        self.unsupported_until = None;
        self.digest_at = now;
        self.backoff.reset();
    }
}

// ---------------------------------------------------------------------------
// The puller task.

/// Why one exchange failed.
#[derive(Debug)]
enum StepError {
    Rpc(RpcError),
    NoReply,
    Decode(WireError),
    Refused { code: RefusalCode, reason: String },
    Unexpected(&'static str),
    Store(SyncError),
    Panicked,
}

impl fmt::Display for StepError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Rpc(e) => write!(f, "request failed: {e}"),
            Self::NoReply => f.write_str("the peer gave no reply"),
            Self::Decode(e) => write!(f, "undecodable reply: {e}"),
            // The reason is the peer's text: quoted, control characters escaped.
            Self::Refused { code, reason } => write!(f, "the peer refused: {code}: {reason:?}"),
            Self::Unexpected(what) => write!(f, "unexpected reply: {what}"),
            Self::Store(e) => write!(f, "local store: {e}"),
            Self::Panicked => f.write_str("local store panicked"),
        }
    }
}

/// Reports the outcome of each sync RPC to the node's peer tracking.
pub(crate) type RpcReport = Arc<dyn Fn(SiteId, Result<Duration, RpcError>) + Send + Sync>;

/// What a puller task needs.
pub(crate) struct Puller {
    pub(crate) node: SiteId,
    pub(crate) site: SiteId,
    pub(crate) peer: Peer,
    pub(crate) dataset: Dataset,
    pub(crate) store: Arc<dyn SyncStore>,
    pub(crate) endpoint: Endpoint,
    pub(crate) options: SyncOptions,
    pub(crate) statuses: Arc<Statuses>,
    pub(crate) events: broadcast::Receiver<NodeEvent>,
    pub(crate) report: RpcReport,
}

impl Puller {
    /// Registers the pair's status; call before spawning [`run`](Self::run).
    pub(crate) fn register(&self) {
        self.statuses.insert(self.site, &self.peer.name, self.dataset, self.options.page_limit.max(1));
    }

    /// Runs until aborted.
    pub(crate) async fn run(mut self) {
        let mut state = PairState::new(Instant::now(), &self.options);
        loop {
            let now = Instant::now();
            let pause = if !state.supported(now) {
                state.unsupported_until.map_or(Duration::ZERO, |until| until.saturating_duration_since(now))
            } else {
                let mut pause = None;
                if state.digest_due(now) {
                    match self.anti_entropy().await {
                        Ok(()) => {
                            state.digest_done(Instant::now());
                            state.succeeded();
                            self.recovered(&mut state);
                        }
                        Err(error) => {
                            // Retried with the next pull's pause or backoff.
                            state.digest_done(Instant::now());
                            pause = Some(self.failure(&mut state, error));
                        }
                    }
                }
                match pause {
                    Some(pause) => pause,
                    None => match self.pull(&mut state).await {
                        Ok(Next::Now) => continue,
                        Ok(Next::After(pause)) => pause,
                        Err(error) => self.failure(&mut state, error),
                    },
                }
            };
            self.wait(&mut state, pause).await;
        }
    }

    /// Sleeps for `pause`, or until the peer comes back up.
    async fn wait(&mut self, state: &mut PairState, pause: Duration) {
        let until = tokio::time::Instant::now() + pause;
        loop {
            tokio::select! {
                () = tokio::time::sleep_until(until) => return,
                event = self.events.recv() => match event {
                    Ok(NodeEvent::PeerUp { site }) if site == self.site => {
                        state.peer_up(Instant::now());
                        return;
                    }
                    Ok(_) => {}
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        // A PeerUp may be among the lost events.
                        state.peer_up(Instant::now());
                        return;
                    }
                    Err(broadcast::error::RecvError::Closed) => {
                        tokio::time::sleep_until(until).await;
                        return;
                    }
                },
            }
        }
    }

    fn recovered(&self, state: &mut PairState) {
        if state.failing {
            state.failing = false;
            tracing::info!(node = %self.node, peer = %self.site, dataset = %self.dataset, "sync with peer recovered");
        }
    }

    /// Logs and records a failure; returns the pause before the retry.
    fn failure(&self, state: &mut PairState, error: StepError) -> Duration {
        let now = Instant::now();
        let message = error.to_string();
        let mut newly_unsupported = false;
        self.statuses.update(self.site, self.dataset, |s| {
            s.errors = s.errors.saturating_add(1);
            s.last_error = Some(message.clone());
            if matches!(error, StepError::Refused { code: RefusalCode::UnknownDataset, .. }) {
                newly_unsupported = !s.unsupported;
                s.unsupported = true;
            }
        });
        let (node, peer, dataset) = (self.node, self.site, self.dataset);
        match error {
            StepError::Refused { code, .. } => {
                let pause = state.refused(now, code);
                let limit = state.limit;
                self.statuses.update(self.site, self.dataset, |s| s.page_limit = limit);
                match code {
                    RefusalCode::UnknownDataset if newly_unsupported => {
                        tracing::info!(%node, %peer, %dataset, "the peer does not hold this dataset: not pulled from it");
                    }
                    RefusalCode::UnknownDataset => {}
                    RefusalCode::TooLarge => {
                        tracing::warn!(%node, %peer, %dataset, limit = state.limit, "page too large for a frame: asking for fewer items");
                    }
                    _ if !state.failing => tracing::warn!(%node, %peer, %dataset, error = %message, "sync with peer failing"),
                    _ => tracing::debug!(%node, %peer, %dataset, error = %message, "sync with peer still failing"),
                }
                state.failing = state.failing || matches!(code, RefusalCode::StoreFailure | RefusalCode::BadRequest);
                pause
            }
            _ => {
                if state.failing {
                    tracing::debug!(%node, %peer, %dataset, error = %message, "sync with peer still failing");
                } else {
                    tracing::warn!(%node, %peer, %dataset, error = %message, "sync with peer failing");
                }
                state.failing = true;
                state.failed()
            }
        }
    }

    /// One RPC.
    async fn call(&self, request: &SyncRequest) -> Result<SyncReply, StepError> {
        let started = Instant::now();
        let deadline = started.checked_add(self.options.deadline).unwrap_or(started);
        let result = self.endpoint.request(&self.peer, wire::encode_sync_request(request), deadline).await;
        match result {
            Ok(reply) => {
                (self.report)(self.site, Ok(started.elapsed()));
                if reply.is_empty() {
                    return Err(StepError::NoReply);
                }
                match wire::decode_sync_reply(&reply).map_err(StepError::Decode)? {
                    SyncReply::Refused { code, reason } => Err(StepError::Refused { code, reason }),
                    reply => Ok(reply),
                }
            }
            Err(error) => {
                (self.report)(self.site, Err(error.clone()));
                Err(StepError::Rpc(error))
            }
        }
    }

    /// Runs `f` on the local store on the blocking pool.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&dyn SyncStore) -> Result<T, SyncError> + Send + 'static,
    ) -> Result<T, StepError> {
        let store = self.store.clone();
        match tokio::task::spawn_blocking(move || f(store.as_ref())).await {
            Ok(result) => result.map_err(StepError::Store),
            Err(_) => Err(StepError::Panicked),
        }
    }

    /// One pull and its merge.
    async fn pull(&self, state: &mut PairState) -> Result<Next, StepError> {
        let Changes { items, last, head } = match self.call(&state.pull(self.dataset)).await? {
            SyncReply::Changes(changes) => changes,
            _ => return Err(StepError::Unexpected("not a page of changes")),
        };
        let count = items.len();
        let peer = self.peer.name.clone();
        let merged = self.blocking(move |store| store.merge(&peer, &items)).await?;
        let now = Instant::now();
        let (caught_up, next) = state.merged(count, last, head);
        self.recovered(state);
        if merged.conflicts > 0 {
            tracing::warn!(node = %self.node, peer = %self.site, dataset = %self.dataset, conflicts = merged.conflicts,
                "items from the peer conflict with ours: quarantined");
        }
        self.statuses.update(self.site, self.dataset, |s| {
            s.pulls = s.pulls.saturating_add(1);
            s.items_pulled = s.items_pulled.saturating_add(count as u64);
            add_merged(s, merged);
            s.last_pull = Some(now);
            s.cursor = state.cursor;
            s.peer_head = Some(head);
            s.lag_changes = Some(head.saturating_sub(last));
            if caught_up {
                s.caught_up_at = Some(now);
            }
            s.unsupported = false;
        });
        Ok(next)
    }

    /// One anti-entropy round: the peer's digest against ours, and every
    /// differing bucket pulled and merged.
    async fn anti_entropy(&self) -> Result<(), StepError> {
        let remote = match self.call(&SyncRequest::Digest { dataset: self.dataset }).await? {
            SyncReply::Digest(digest) => digest,
            _ => return Err(StepError::Unexpected("not a digest")),
        };
        let local = self.blocking(|store| store.digest()).await?;
        let differing = local.differing(&remote);
        self.statuses.update(self.site, self.dataset, |s| {
            s.buckets_differing = s.buckets_differing.saturating_add(differing.len() as u64);
            s.unsupported = false;
        });
        if !differing.is_empty() {
            tracing::info!(node = %self.node, peer = %self.site, dataset = %self.dataset, buckets = differing.len(),
                "anti-entropy: buckets differ; pulling them");
        }
        for bucket in differing {
            let items = match self.call(&SyncRequest::Bucket { dataset: self.dataset, bucket }).await? {
                SyncReply::Items(items) => items,
                _ => return Err(StepError::Unexpected("not a bucket's items")),
            };
            let count = items.len() as u64;
            let peer = self.peer.name.clone();
            let merged = self.blocking(move |store| store.merge(&peer, &items)).await?;
            self.statuses.update(self.site, self.dataset, |s| {
                s.bucket_items = s.bucket_items.saturating_add(count);
                add_merged(s, merged);
            });
        }
        self.statuses.update(self.site, self.dataset, |s| s.digest_rounds = s.digest_rounds.saturating_add(1));
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// Serving.

/// The reply to one sync frame from `peer` (its name in the peer table).
pub(crate) async fn serve(stores: &BTreeMap<Dataset, Arc<dyn SyncStore>>, peer: &str, frame: &[u8], max_frame: usize) -> Bytes {
    let reply = match wire::decode_sync_request(frame) {
        Err(error) => SyncReply::refused(RefusalCode::BadRequest, &error.to_string()),
        Ok(request) => match stores.get(&request.dataset()) {
            None => SyncReply::refused(RefusalCode::UnknownDataset, &format!("dataset {} is not held here", request.dataset().0)),
            Some(store) => {
                let store = store.clone();
                let peer = peer.to_string();
                let answer = tokio::task::spawn_blocking(move || answer(store.as_ref(), &peer, request, max_frame)).await;
                match answer {
                    Ok(bytes) => return bytes,
                    Err(_) => SyncReply::refused(RefusalCode::StoreFailure, "the store panicked"),
                }
            }
        },
    };
    wire::encode_sync_reply(&reply).unwrap_or_default()
}

/// Runs the store call and encodes its reply (blocking). The page limit
/// is capped to what a frame can hold.
fn answer(store: &dyn SyncStore, peer: &str, request: SyncRequest, max_frame: usize) -> Bytes {
    let result = match request {
        SyncRequest::Pull { after, limit, .. } => {
            // No more than a frame can carry (an item takes three bytes at
            // least), whatever the peer asks for.
            let limit = usize::try_from(limit).unwrap_or(usize::MAX).min(max_frame / 3);
            store.changes(peer, after, limit).map(SyncReply::Changes)
        }
        SyncRequest::Digest { .. } => store.digest().map(SyncReply::Digest),
        SyncRequest::Bucket { bucket, .. } => store.bucket(bucket).map(SyncReply::Items),
    };
    let reply = match result {
        Ok(reply) if wire::sync_reply_len(&reply) > max_frame => {
            SyncReply::refused(RefusalCode::TooLarge, &format!("{} bytes over the {max_frame}-byte frame", wire::sync_reply_len(&reply)))
        }
        Ok(reply) => reply,
        Err(error) => {
            tracing::warn!(%peer, dataset = %request.dataset(), %error, "sync store failed a peer's request");
            SyncReply::refused(RefusalCode::StoreFailure, &error.0)
        }
    };
    match wire::encode_sync_reply(&reply) {
        Ok(bytes) => bytes,
        Err(error) => {
            tracing::error!(%peer, dataset = %request.dataset(), %error, "sync store returned an item the wire cannot carry");
            wire::encode_sync_reply(&SyncReply::refused(RefusalCode::StoreFailure, &error.to_string())).unwrap_or_default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options() -> SyncOptions {
        SyncOptions {
            pull_interval: Duration::from_millis(100),
            page_limit: 3,
            digest_interval: Duration::from_secs(60),
            deadline: Duration::from_secs(1),
            max_backoff: Duration::from_millis(450),
        }
    }

    #[test]
    fn backoff_doubles_up_to_the_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(450));
        let pauses: Vec<u128> = (0..5).map(|_| b.fail().as_millis()).collect();
        assert_eq!(pauses, [100, 200, 400, 450, 450]);
        assert!(!b.is_reset());
        b.reset();
        assert!(b.is_reset());
        assert_eq!(b.fail(), Duration::from_millis(100));
        // A zero base still backs off.
        assert_eq!(Backoff::new(Duration::ZERO, Duration::ZERO).fail(), Duration::from_millis(1));
    }

    #[test]
    fn the_cursor_moves_only_on_merged_pages() {
        let now = Instant::now();
        let mut s = PairState::new(now, &options());
        assert_eq!(s.pull(Dataset::COUNTERS), SyncRequest::Pull { dataset: Dataset::COUNTERS, after: None, limit: 3 });
        // A full page behind the head: at once.
        assert_eq!(s.merged(3, 13, 20), (false, Next::Now));
        assert_eq!(s.cursor, Some(13));
        // A failure (a merge or the RPC) keeps the cursor and backs off.
        assert_eq!(s.failed(), Duration::from_millis(100));
        assert_eq!(s.failed(), Duration::from_millis(200));
        assert_eq!(s.pull(Dataset::COUNTERS), SyncRequest::Pull { dataset: Dataset::COUNTERS, after: Some(13), limit: 3 });
        // A full page that reaches the head: caught up, no extra pull.
        assert_eq!(s.merged(3, 20, 20), (true, Next::After(Duration::from_millis(100))));
        assert_eq!(s.failed(), Duration::from_millis(100), "a success reset the backoff");
        // An empty page keeps the cursor the peer answered with.
        assert_eq!(s.merged(0, 20, 20), (true, Next::After(Duration::from_millis(100))));
        assert_eq!(s.cursor, Some(20));
    }

    #[test]
    fn refusals_adjust_the_pair() {
        let now = Instant::now();
        let mut s = PairState::new(now, &options());
        assert!(!s.digest_due(now), "the outbox goes first");
        assert_eq!(s.merged(3, 3, 9), (false, Next::Now));
        assert!(!s.digest_due(now), "not while behind");
        assert_eq!(s.merged(1, 9, 9), (true, Next::After(Duration::from_millis(100))));
        assert!(s.digest_due(now));
        s.digest_done(now);
        assert!(!s.digest_due(now + Duration::from_secs(59)));
        assert!(s.digest_due(now + Duration::from_secs(60)));

        assert_eq!(s.refused(now, RefusalCode::TooLarge), Duration::ZERO);
        assert_eq!(s.limit, 1);
        assert_eq!(s.refused(now, RefusalCode::TooLarge), Duration::ZERO);
        assert_eq!(s.limit, 1, "never below one item");

        assert!(s.supported(now));
        assert_eq!(s.refused(now, RefusalCode::UnknownDataset), Duration::from_secs(60));
        assert!(!s.supported(now + Duration::from_secs(1)));
        assert!(s.supported(now + Duration::from_secs(60)), "asked again after a digest interval");
        s.peer_up(now + Duration::from_secs(1));
        assert!(s.supported(now + Duration::from_secs(1)), "asked again when the peer is back");
        assert!(s.digest_due(now + Duration::from_secs(1)));

        assert_eq!(s.refused(now, RefusalCode::StoreFailure), Duration::from_millis(100));
        assert_eq!(s.refused(now, RefusalCode::BadRequest), Duration::from_millis(200));
    }

    /// Answers pulls with `n` empty-valued items, remembering the limit.
    struct Stub {
        limit: Mutex<usize>,
        n: usize,
    }

    impl SyncStore for Stub {
        fn changes(&self, _peer: &str, after: Option<u64>, limit: usize) -> Result<Changes, SyncError> {
            *self.limit.lock().map_err(|_| SyncError("poisoned".into()))? = limit;
            let items = vec![crate::sync::Item { key: vec![1], value: vec![] }; self.n.min(limit)];
            Ok(Changes { last: after.unwrap_or(0) + items.len() as u64, head: self.n as u64, items })
        }
        fn digest(&self) -> Result<crate::sync::Digest, SyncError> {
            Err(SyncError("no digest".into()))
        }
        fn bucket(&self, _bucket: u8) -> Result<Vec<crate::sync::Item>, SyncError> {
            Ok(vec![crate::sync::Item { key: vec![0; crate::sync::MAX_KEY + 1], value: vec![] }])
        }
        fn merge(&self, _peer: &str, _items: &[crate::sync::Item]) -> Result<Merged, SyncError> {
            Ok(Merged::default())
        }
    }

    #[test]
    fn the_server_caps_pages_and_refuses_what_it_cannot_send() {
        let decode = |b: Bytes| wire::decode_sync_reply(&b).unwrap_or_else(|e| panic!("{e}"));
        let store = Stub { limit: Mutex::new(0), n: 1_000 };
        let pull = SyncRequest::Pull { dataset: Dataset::COUNTERS, after: None, limit: u32::MAX };
        // 300 bytes of frame: at most 100 items asked of the store; the
        // page of 100 four-byte items does not fit either.
        let reply = decode(answer(&store, "b", pull, 300));
        assert_eq!(*store.limit.lock().unwrap_or_else(|p| p.into_inner()), 100);
        assert!(matches!(reply, SyncReply::Refused { code: RefusalCode::TooLarge, .. }), "{reply:?}");
        let small = SyncRequest::Pull { dataset: Dataset::COUNTERS, after: Some(5), limit: 10 };
        match decode(answer(&store, "b", small, 300)) {
            SyncReply::Changes(c) => assert_eq!((c.items.len(), c.last, c.head), (10, 15, 1_000)),
            other => panic!("{other:?}"),
        }
        // A store error and an item the wire cannot carry are refusals.
        let digest = decode(answer(&store, "b", SyncRequest::Digest { dataset: Dataset::COUNTERS }, 1 << 20));
        assert_eq!(digest, SyncReply::refused(RefusalCode::StoreFailure, "no digest"));
        let bucket = decode(answer(&store, "b", SyncRequest::Bucket { dataset: Dataset::COUNTERS, bucket: 0 }, 1 << 20));
        assert!(matches!(bucket, SyncReply::Refused { code: RefusalCode::StoreFailure, .. }), "{bucket:?}");
    }

    #[test]
    fn statuses_compute_the_time_lag() {
        let statuses = Statuses::default();
        statuses.insert(SiteId(2), "b", Dataset::COUNTERS, 10);
        std::thread::sleep(Duration::from_millis(20));
        let s = statuses.snapshot();
        assert_eq!(s.len(), 1);
        assert!(s[0].lag >= Duration::from_millis(20), "since the start while never caught up");
        statuses.update(SiteId(2), Dataset::COUNTERS, |s| s.caught_up_at = Some(Instant::now()));
        assert!(statuses.snapshot()[0].lag < Duration::from_millis(20));
    }
}
