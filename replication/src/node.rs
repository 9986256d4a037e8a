//! The async driver of one site: the [`quorum::Machine`](crate::quorum::Machine)
//! on the QUIC [`transport`](crate::transport).
//!
//! This module makes no decision of its own: it carries out the machine's
//! [`Action`]s and feeds back what happened.
//!
//! - One tokio task owns the machine and processes one input at a time
//!   (submissions, peers' requests and replies, compare-and-set results,
//!   timer ticks), with `now` from the monotonic clock.
//! - [`Action::Send`] of a [`Message::CasRequest`] becomes one RPC
//!   ([`Endpoint::request`]) with the machine's deadline; the reply decodes
//!   ([`wire`]) to a [`Message::CasReply`] that goes back in as
//!   [`Input::Message`]. An RPC error or timeout is simply no reply: the
//!   machine's deadline decides.
//! - Requests are sent once the commands already waiting in the channel
//!   are handled: those queued for one peer meanwhile leave together as one
//!   RPC carrying a [`wire::encode_batch`] frame (under load, tens of
//!   requests share one QUIC stream and its packets), and the peer answers
//!   with a batch of the replies in the same order.
//! - An incoming RPC carrying a `CasRequest` is fed to the machine, and the
//!   RPC's answer is the `CasReply` the machine emits for that
//!   `(origin, request id)`, whether at once (its duplicate cache) or after
//!   the durable compare-and-set. A request the machine drops (unknown
//!   sender, origin mismatch, a request id reused) is answered with an
//!   empty frame, which the caller reads as no reply.
//! - [`Action::DurableCas`] runs the embedder's blocking [`DurableCas`] on
//!   tokio's blocking pool; a panic there counts as
//!   [`PeerCasResult::Failed`].
//! - The timer is the machine's [`Machine::next_wakeup`](crate::quorum::Machine::next_wakeup)
//!   (what [`Action::SetTimer`] announces): the task sleeps until then and
//!   feeds [`Input::Tick`].
//! - A peer whose RPC fails is marked down; the first successful RPC after
//!   that marks it up and feeds [`Input::PeerUp`], so that outstanding
//!   requests are sent to it again.
//!
//! - With [`Node::start_with`], the node also replicates datasets
//!   ([`SyncSetup`]): a puller task per (peer, dataset) and the server side
//!   of the sync exchange, both in [`syncer`]. The transport
//!   handler tells sync frames from quorum frames by their tag
//!   ([`wire::is_sync`]). Sync RPCs count for the peers' reachability like
//!   the quorum's.
//!
//! Request ids start from a random 64-bit base at every start, so that they
//! do not repeat across restarts (see [`quorum`](crate::quorum)'s
//! idempotency notes).

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::quorum::{
    Action, ConfigError, Event, IgnoredReason, Input, Machine, Message, PeerCasResult, Proposal, QuorumConfig, RequestId, SiteId, Verdict,
};
use crate::sync::{Dataset, SyncStore};
use crate::syncer::{self, Puller, RpcReport, Statuses, SyncSetup, SyncStatus};
use crate::transport::{bump, Endpoint, Peer, PeerIdentity, RpcError};
use crate::wire;

/// Capacity of the [`NodeEvent`] channel; a subscriber that falls further
/// behind loses the oldest events (the counters in [`Metrics`] do not).
pub const EVENT_CAPACITY: usize = 1024;

/// The embedder's durable counter store, as a peer sees it.
///
/// Blocking: the node runs it on tokio's blocking pool. It must apply
/// [`quorum::peer_cas`](crate::quorum::peer_cas) to the stored record of
/// `proposal.public_id` atomically with the write, and return only once the
/// result is durable (after the fsync): the origin counts the answer as
/// this node holding the counters.
pub trait DurableCas: Send + Sync + 'static {
    /// The durable compare-and-set of a peer's request.
    fn peer_cas(&self, origin: SiteId, proposal: &Proposal) -> PeerCasResult;

    /// The same as a future, which is what the node awaits. The default
    /// runs [`Self::peer_cas`] on tokio's blocking pool (a panic there is
    /// [`PeerCasResult::Failed`]); a store that can answer a task directly
    /// (a group-commit writer replying after its COMMIT) overrides it and
    /// saves a blocking thread and two context switches per request.
    fn peer_cas_async(self: Arc<Self>, origin: SiteId, proposal: Proposal) -> CasFuture
    where
        Self: Sized,
    {
        Box::pin(async move {
            tokio::task::spawn_blocking(move || self.peer_cas(origin, &proposal)).await.unwrap_or_else(|error| {
                tracing::error!(peer = %origin, %error, "durable compare-and-set panicked");
                PeerCasResult::Failed
            })
        })
    }
}

/// A peer compare-and-set in progress ([`DurableCas::peer_cas_async`]).
pub type CasFuture = std::pin::Pin<Box<dyn Future<Output = PeerCasResult> + Send>>;

/// What [`Node::start`] needs besides the endpoint and the store.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// This node.
    pub site: SiteId,
    /// The replication group and its rule.
    pub quorum: QuorumConfig,
    /// How to reach every other node of the group; the name must be the one
    /// the transport authorizes for that node (its certificate's name).
    pub peers: BTreeMap<SiteId, Peer>,
}

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The quorum configuration is refused.
    #[error("replication group: {0}")]
    Config(#[from] ConfigError),
    /// A node of the group has no entry in the peer table.
    #[error("no address for {0}, a node of the replication group")]
    MissingPeer(SiteId),
    /// The peer table names a node outside the group.
    #[error("{0} is in the peer table but not in the replication group")]
    UnknownPeer(SiteId),
    /// Two nodes share a name, so an incoming request could not be told apart.
    #[error("two nodes are named {0:?}")]
    DuplicatePeerName(String),
    /// Not called from within a tokio runtime.
    #[error("no tokio runtime: {0}")]
    NoRuntime(String),
}

/// Whether a peer answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reachability {
    /// No request sent yet.
    Unknown,
    /// Its last RPC succeeded.
    Up,
    /// Its last RPC failed.
    Down,
}

/// One peer as this node sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerStatus {
    /// The node.
    pub site: SiteId,
    /// Its name and address.
    pub peer: Peer,
    /// Up, down, or not tried yet.
    pub reachability: Reachability,
    /// Since when (`None` while unknown).
    pub since: Option<Instant>,
    /// Round-trip time of the last successful request, the peer's durable
    /// compare-and-set included.
    pub last_rtt: Option<Duration>,
    /// Successful requests.
    pub replies: u64,
    /// Their total round-trip time (divide by `replies` for the mean).
    pub rtt_total: Duration,
    /// Failed requests (errors and timeouts).
    pub failures: u64,
    /// The last failure.
    pub last_error: Option<RpcError>,
}

/// Counters since the node started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Metrics {
    /// Requests of this site submitted.
    pub submitted: u64,
    /// Answered [`Verdict::Accepted`].
    pub accepted: u64,
    /// Answered [`Verdict::Replayed`].
    pub replayed: u64,
    /// Answered [`Verdict::NotEnoughAnswers`] (including submissions a
    /// stopped node could not take).
    pub not_enough_answers: u64,
    /// Answered [`Verdict::AcceptedAtRisk`].
    pub accepted_at_risk: u64,
    /// [`Event::QuorumFailed`]: requests that missed their quorum and failed
    /// closed.
    pub quorum_failures: u64,
    /// Peers' compare-and-set requests received.
    pub peer_requests: u64,
    /// Durable compare-and-sets run for peers that failed.
    pub peer_cas_failures: u64,
    /// Outgoing RPCs that failed (errors and timeouts).
    pub rpc_failures: u64,
    /// Messages that could not be encoded or decoded.
    pub bad_messages: u64,
    /// Transitions of a peer to up.
    pub peer_up: u64,
    /// Transitions of a peer to down.
    pub peer_down: u64,
    /// Compare-and-set requests sent to peers.
    pub requests_sent: u64,
    /// RPCs that carried them (fewer when requests were batched).
    pub request_rpcs: u64,
}

/// Something that happened at this node, for logs and alerts.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum NodeEvent {
    /// A peer answered after being down or unknown.
    PeerUp {
        /// The peer.
        site: SiteId,
    },
    /// A request to a peer failed.
    PeerDown {
        /// The peer.
        site: SiteId,
        /// Why.
        error: RpcError,
    },
    /// An event of the state machine (quorum failures, accept-at-risk,
    /// refusals …).
    Machine(Event),
}

#[derive(Default)]
struct AtomicMetrics {
    submitted: AtomicU64,
    accepted: AtomicU64,
    replayed: AtomicU64,
    not_enough_answers: AtomicU64,
    accepted_at_risk: AtomicU64,
    quorum_failures: AtomicU64,
    peer_requests: AtomicU64,
    peer_cas_failures: AtomicU64,
    rpc_failures: AtomicU64,
    bad_messages: AtomicU64,
    peer_up: AtomicU64,
    peer_down: AtomicU64,
    requests_sent: AtomicU64,
    request_rpcs: AtomicU64,
}

impl AtomicMetrics {
    fn snapshot(&self) -> Metrics {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Metrics {
            submitted: get(&self.submitted),
            accepted: get(&self.accepted),
            replayed: get(&self.replayed),
            not_enough_answers: get(&self.not_enough_answers),
            accepted_at_risk: get(&self.accepted_at_risk),
            quorum_failures: get(&self.quorum_failures),
            peer_requests: get(&self.peer_requests),
            peer_cas_failures: get(&self.peer_cas_failures),
            rpc_failures: get(&self.rpc_failures),
            bad_messages: get(&self.bad_messages),
            peer_up: get(&self.peer_up),
            peer_down: get(&self.peer_down),
            requests_sent: get(&self.requests_sent),
            request_rpcs: get(&self.request_rpcs),
        }
    }

    fn verdict(&self, verdict: Verdict) {
        match verdict {
            Verdict::Accepted { .. } => bump(&self.accepted),
            Verdict::Replayed => bump(&self.replayed),
            Verdict::NotEnoughAnswers { .. } => bump(&self.not_enough_answers),
            Verdict::AcceptedAtRisk { .. } => bump(&self.accepted_at_risk),
        }
    }
}

/// State shared by the node handle, the driver task and the RPC tasks.
struct Shared {
    site: SiteId,
    metrics: AtomicMetrics,
    peers: Mutex<BTreeMap<SiteId, PeerStatus>>,
    events: broadcast::Sender<NodeEvent>,
}

impl Shared {
    fn emit(&self, event: NodeEvent) {
        // No subscriber is fine.
        let _ = self.events.send(event);
    }

    fn with_peer<T>(&self, site: SiteId, f: impl FnOnce(&mut PeerStatus) -> T) -> Option<T> {
        let mut peers = self.peers.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        peers.get_mut(&site).map(f)
    }

    /// Records a reply; true if the peer was down before (not merely
    /// unknown), so that the machine resends to it.
    fn peer_answered(&self, site: SiteId, rtt: Duration) -> bool {
        let before = self.with_peer(site, |p| {
            let before = p.reachability;
            if before != Reachability::Up {
                p.reachability = Reachability::Up;
                p.since = Some(Instant::now());
            }
            p.last_rtt = Some(rtt);
            p.replies += 1;
            p.rtt_total = p.rtt_total.saturating_add(rtt);
            before
        });
        match before {
            Some(Reachability::Up) | None => false,
            Some(before) => {
                bump(&self.metrics.peer_up);
                tracing::info!(node = %self.site, peer = %site, rtt_us = rtt.as_micros(), "peer up");
                self.emit(NodeEvent::PeerUp { site });
                before == Reachability::Down
            }
        }
    }

    fn peer_failed(&self, site: SiteId, error: RpcError) {
        bump(&self.metrics.rpc_failures);
        let before = self.with_peer(site, |p| {
            let before = p.reachability;
            if before != Reachability::Down {
                p.reachability = Reachability::Down;
                p.since = Some(Instant::now());
            }
            p.failures += 1;
            p.last_error = Some(error.clone());
            before
        });
        if before.is_some_and(|b| b != Reachability::Down) {
            bump(&self.metrics.peer_down);
            tracing::warn!(node = %self.site, peer = %site, %error, "peer down");
            self.emit(NodeEvent::PeerDown { site, error });
        } else {
            tracing::debug!(node = %self.site, peer = %site, %error, "request to peer failed");
        }
    }
}

enum Command {
    Submit { req_id: RequestId, proposal: Proposal, sync_level: Option<u8>, timeout: Option<Duration>, reply: oneshot::Sender<Verdict> },
    Incoming { from: SiteId, message: Message, waiter: oneshot::Sender<Bytes> },
    Reply { from: SiteId, message: Message },
    CasDone { origin: SiteId, req_id: RequestId, result: PeerCasResult },
    PeerUp { site: SiteId },
    Shutdown,
}

/// One site's counter replication (and dataset sync, when started with
/// [`Node::start_with`]), running. See the module docs.
///
/// Dropping it stops the node and closes its endpoint, as
/// [`shutdown`](Self::shutdown) does without waiting.
pub struct Node {
    shared: Arc<Shared>,
    commands: mpsc::UnboundedSender<Command>,
    endpoint: Endpoint,
    next_req_id: AtomicU64,
    /// The verdict when the node cannot take a request: fail closed, with
    /// this site alone holding the counters.
    fallback: Verdict,
    driver: Option<JoinHandle<()>>,
    sync_statuses: Arc<Statuses>,
    sync_tasks: Vec<JoinHandle<()>>,
}

impl fmt::Debug for Node {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Node").field("site", &self.shared.site).field("endpoint", &self.endpoint).finish_non_exhaustive()
    }
}

impl Node {
    /// Starts the node: the driver task, and [`Endpoint::serve`] answering
    /// peers' requests on `endpoint` (already bound, with this site's
    /// identity and the peers' authorization rules). Must be called from
    /// within a tokio runtime.
    ///
    /// No dataset is replicated: peers' sync requests are refused as
    /// [`RefusalCode::UnknownDataset`](crate::wire::RefusalCode::UnknownDataset).
    /// See [`start_with`](Self::start_with).
    pub fn start<S: DurableCas>(config: NodeConfig, endpoint: Endpoint, store: Arc<S>) -> Result<Self, Error> {
        Self::start_with(config, endpoint, store, SyncSetup::default())
    }

    /// Starts the node as [`start`](Self::start) does, and replicates the
    /// datasets of `sync`: each is served to peers and pulled from every
    /// peer of the table (see [`syncer`]).
    pub fn start_with<S: DurableCas>(config: NodeConfig, endpoint: Endpoint, store: Arc<S>, sync: SyncSetup) -> Result<Self, Error> {
        tokio::runtime::Handle::try_current().map_err(|e| Error::NoRuntime(e.to_string()))?;
        let NodeConfig { site, quorum, peers } = config;
        let machine = Machine::new(site, quorum.clone())?;
        for other in quorum.others() {
            if !peers.contains_key(&other) {
                return Err(Error::MissingPeer(other));
            }
        }
        let mut by_name = HashMap::new();
        for (id, peer) in &peers {
            if !quorum.others().any(|o| o == *id) {
                return Err(Error::UnknownPeer(*id));
            }
            if by_name.insert(peer.name.to_ascii_lowercase(), *id).is_some() {
                return Err(Error::DuplicatePeerName(peer.name.clone()));
            }
        }
        let statuses = peers
            .iter()
            .map(|(id, peer)| {
                let status = PeerStatus {
                    site: *id,
                    peer: peer.clone(),
                    reachability: Reachability::Unknown,
                    since: None,
                    last_rtt: None,
                    replies: 0,
                    rtt_total: Duration::ZERO,
                    failures: 0,
                    last_error: None,
                };
                (*id, status)
            })
            .collect();
        let (events, _) = broadcast::channel(EVENT_CAPACITY);
        let shared = Arc::new(Shared { site, metrics: AtomicMetrics::default(), peers: Mutex::new(statuses), events });
        let (commands, rx) = mpsc::unbounded_channel();

        let fallback = Verdict::NotEnoughAnswers { sl: u8::try_from(100 / quorum.group_size()).unwrap_or(100) };
        let sync_statuses = Arc::new(Statuses::default());
        let sync_tasks = spawn_pullers(&shared, &commands, &peers, &endpoint, &sync, &sync_statuses);
        let names: Arc<BTreeMap<SiteId, String>> = Arc::new(peers.iter().map(|(id, peer)| (*id, peer.name.clone())).collect());
        let sync_stores = Arc::new(sync.stores);
        let max_frame = endpoint.settings().max_frame;
        let driver = Driver {
            machine,
            deadline: quorum.deadline,
            peers,
            endpoint: endpoint.clone(),
            store,
            shared: shared.clone(),
            commands: commands.clone(),
            submits: HashMap::new(),
            incoming: HashMap::new(),
            next_waiter: 0,
            outgoing: BTreeMap::new(),
        };
        let driver = tokio::spawn(driver.run(rx));

        let by_name = Arc::new(by_name);
        let handler_commands = commands.clone();
        let handler_shared = shared.clone();
        let handler = move |peer: PeerIdentity, request: Bytes| {
            let from = by_name.get(&peer.name.to_ascii_lowercase()).copied();
            let commands = handler_commands.clone();
            let shared = handler_shared.clone();
            let names = names.clone();
            let sync_stores = sync_stores.clone();
            async move {
                if wire::is_sync(&request) {
                    serve_sync(&shared, &names, &sync_stores, max_frame, from, &peer, &request).await
                } else {
                    serve_request(&shared, &commands, from, &peer, &request).await
                }
            }
        };
        tokio::spawn(endpoint.clone().serve(handler));

        tracing::info!(node = %site, group = quorum.group_size(), required = quorum.required, deadline = ?quorum.deadline, "replication node started");
        Ok(Self {
            shared,
            commands,
            endpoint,
            next_req_id: AtomicU64::new(random_base()),
            fallback,
            driver: Some(driver),
            sync_statuses,
            sync_tasks,
        })
    }

    /// This node.
    #[must_use]
    pub fn site(&self) -> SiteId {
        self.shared.site
    }

    /// The endpoint the node serves and sends on.
    #[must_use]
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// Replicates `proposal`, which this site's durable compare-and-set has
    /// just accepted, and resolves to the machine's verdict: at the latest
    /// at the request's deadline (`timeout`, capped by the configured
    /// deadline). `sync_level` and `timeout` are the verify request's `sl`
    /// and `timeout`.
    ///
    /// The request starts now, not when the future is first polled;
    /// dropping the future does not cancel it. A stopped node answers
    /// [`Verdict::NotEnoughAnswers`] (fail closed).
    pub fn submit(
        &self,
        proposal: Proposal,
        sync_level: Option<u8>,
        timeout: Option<Duration>,
    ) -> impl Future<Output = Verdict> + Send + 'static {
        bump(&self.shared.metrics.submitted);
        let req_id = RequestId(self.next_req_id.fetch_add(1, Ordering::Relaxed));
        let (reply, answer) = oneshot::channel();
        let sent = self.commands.send(Command::Submit { req_id, proposal, sync_level, timeout, reply }).is_ok();
        let fallback = self.fallback;
        let shared = self.shared.clone();
        async move {
            let verdict = if sent { answer.await.ok() } else { None };
            verdict.unwrap_or_else(|| {
                bump(&shared.metrics.not_enough_answers);
                tracing::warn!(node = %shared.site, %req_id, "replication node stopped: failing closed");
                fallback
            })
        }
    }

    /// Counters since the start.
    #[must_use]
    pub fn metrics(&self) -> Metrics {
        self.shared.metrics.snapshot()
    }

    /// The peers' state, in site order.
    #[must_use]
    pub fn peers(&self) -> Vec<PeerStatus> {
        let peers = self.shared.peers.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        peers.values().cloned().collect()
    }

    /// The sync state of every (peer, dataset) pair this node pulls, in
    /// (peer, dataset) order. Cheap: a copy of a small table.
    #[must_use]
    pub fn sync_status(&self) -> Vec<SyncStatus> {
        self.sync_statuses.snapshot()
    }

    /// Events from now on (peers up and down, the machine's events).
    #[must_use]
    pub fn subscribe(&self) -> broadcast::Receiver<NodeEvent> {
        self.shared.events.subscribe()
    }

    /// Stops the node: the sync pullers stop (a merge already running on
    /// the blocking pool completes, its page unacknowledged), pending
    /// submissions fail closed, the endpoint closes (peers see their
    /// connections closed) and this waits for all of them.
    pub async fn shutdown(mut self) {
        let _ = self.commands.send(Command::Shutdown);
        for task in &self.sync_tasks {
            task.abort();
        }
        for task in std::mem::take(&mut self.sync_tasks) {
            let _ = task.await;
        }
        self.endpoint.close();
        if let Some(driver) = self.driver.take() {
            let _ = driver.await;
        }
        let _ = tokio::time::timeout(Duration::from_secs(2), self.endpoint.wait_idle()).await;
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        for task in &self.sync_tasks {
            task.abort();
        }
        if self.driver.is_some() {
            let _ = self.commands.send(Command::Shutdown);
            self.endpoint.close();
        }
    }
}

/// A random starting point for request ids: a restarted node does not
/// reuse the ids of its previous life (a collision needs two bases within
/// the number of requests of each other, out of 2^64).
fn random_base() -> u64 {
    let rng = ring::rand::SystemRandom::new();
    match ring::rand::generate::<[u8; 8]>(&rng) {
        Ok(bytes) => u64::from_be_bytes(bytes.expose()),
        Err(_) => {
            // No OS randomness: fall back to the clock, in nanoseconds.
            let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos());
            tracing::warn!("no OS randomness for request ids; using the clock");
            (nanos & u128::from(u64::MAX)) as u64
        }
    }
}

/// One puller task per (peer, dataset), reporting its RPCs to the peers'
/// reachability.
fn spawn_pullers(
    shared: &Arc<Shared>,
    commands: &mpsc::UnboundedSender<Command>,
    peers: &BTreeMap<SiteId, Peer>,
    endpoint: &Endpoint,
    sync: &SyncSetup,
    statuses: &Arc<Statuses>,
) -> Vec<JoinHandle<()>> {
    if sync.stores.is_empty() {
        return Vec::new();
    }
    let report: RpcReport = {
        let shared = shared.clone();
        let commands = commands.clone();
        Arc::new(move |site, result| match result {
            Ok(rtt) => {
                if shared.peer_answered(site, rtt) {
                    let _ = commands.send(Command::PeerUp { site });
                }
            }
            // Our own shutdown says nothing about the peer.
            Err(RpcError::Closed) => {}
            Err(error) => shared.peer_failed(site, error),
        })
    };
    let mut tasks = Vec::new();
    for (site, peer) in peers {
        for (dataset, store) in &sync.stores {
            let puller = Puller {
                node: shared.site,
                site: *site,
                peer: peer.clone(),
                dataset: *dataset,
                store: store.clone(),
                endpoint: endpoint.clone(),
                options: sync.options.clone(),
                statuses: statuses.clone(),
                events: shared.events.subscribe(),
                report: report.clone(),
            };
            puller.register();
            tasks.push(tokio::spawn(puller.run()));
        }
    }
    tasks
}

/// The transport handler for sync frames: the reply frame (an empty frame
/// for a sender outside the group).
async fn serve_sync(
    shared: &Shared,
    names: &BTreeMap<SiteId, String>,
    stores: &BTreeMap<Dataset, Arc<dyn SyncStore>>,
    max_frame: usize,
    from: Option<SiteId>,
    peer: &PeerIdentity,
    request: &[u8],
) -> Bytes {
    let Some(name) = from.and_then(|from| names.get(&from)) else {
        tracing::warn!(node = %shared.site, peer = %peer.name, "sync request from an authorized peer that is not in the group: ignored");
        return Bytes::new();
    };
    if wire::decode_sync_request(request).is_err() {
        bump(&shared.metrics.bad_messages);
    }
    syncer::serve(stores, name, request, max_frame).await
}

/// The transport handler: one peer's request in, the reply frame out (an
/// empty frame for no reply).
async fn serve_request(
    shared: &Shared,
    commands: &mpsc::UnboundedSender<Command>,
    from: Option<SiteId>,
    peer: &PeerIdentity,
    request: &[u8],
) -> Bytes {
    let Some(from) = from else {
        // The transport authorized it, but it is not in our peer table.
        tracing::warn!(node = %shared.site, peer = %peer.name, "request from an authorized peer that is not in the group: ignored");
        return Bytes::new();
    };
    if !wire::is_batch(request) {
        return match incoming(shared, commands, from, request) {
            Some(reply) => reply.await.unwrap_or_default(),
            None => Bytes::new(),
        };
    }
    let requests = match wire::decode_batch(request) {
        Ok(requests) => requests,
        Err(error) => {
            bump(&shared.metrics.bad_messages);
            tracing::warn!(node = %shared.site, peer = %from, %error, "undecodable batch: ignored");
            return Bytes::new();
        }
    };
    // Every request of the batch goes to the machine at once; the replies
    // come back in the requests' order (an empty one where there is none).
    let waiting: Vec<_> = requests.into_iter().map(|r| incoming(shared, commands, from, r)).collect();
    let mut replies = Vec::with_capacity(waiting.len());
    for reply in waiting {
        // The transport's server deadline bounds these waits.
        replies.push(match reply {
            Some(reply) => reply.await.unwrap_or_default(),
            None => Bytes::new(),
        });
    }
    wire::encode_batch(&replies).unwrap_or_default()
}

/// One compare-and-set request of `from`, to the machine: the reply to
/// await, or `None` when the request is refused at once.
fn incoming(shared: &Shared, commands: &mpsc::UnboundedSender<Command>, from: SiteId, request: &[u8]) -> Option<oneshot::Receiver<Bytes>> {
    let message = match wire::decode(request) {
        Ok(message @ Message::CasRequest { .. }) => message,
        Ok(Message::CasReply { .. }) => {
            bump(&shared.metrics.bad_messages);
            tracing::warn!(node = %shared.site, peer = %from, "a reply sent as a request: ignored");
            return None;
        }
        Err(error) => {
            bump(&shared.metrics.bad_messages);
            tracing::warn!(node = %shared.site, peer = %from, %error, "undecodable request: ignored");
            return None;
        }
    };
    bump(&shared.metrics.peer_requests);
    let (waiter, reply) = oneshot::channel();
    commands.send(Command::Incoming { from, message, waiter }).ok()?;
    Some(reply)
}

/// A peer's reply to one of this node's requests, to the machine.
fn reply_to_machine(shared: &Shared, commands: &mpsc::UnboundedSender<Command>, from: SiteId, reply: &[u8]) {
    match wire::decode(reply) {
        Ok(message @ Message::CasReply { .. }) => {
            let _ = commands.send(Command::Reply { from, message });
        }
        Ok(Message::CasRequest { .. }) => {
            bump(&shared.metrics.bad_messages);
            tracing::warn!(node = %shared.site, peer = %from, "peer answered with a request: ignored");
        }
        Err(_) if reply.is_empty() => {
            tracing::debug!(node = %shared.site, peer = %from, "peer gave no reply");
        }
        Err(error) => {
            bump(&shared.metrics.bad_messages);
            tracing::warn!(node = %shared.site, peer = %from, %error, "undecodable reply: ignored");
        }
    }
}

type Waiters = Vec<(u64, oneshot::Sender<Bytes>)>;

/// The task that owns the machine.
struct Driver<S> {
    machine: Machine,
    deadline: Duration,
    peers: BTreeMap<SiteId, Peer>,
    endpoint: Endpoint,
    store: Arc<S>,
    shared: Arc<Shared>,
    commands: mpsc::UnboundedSender<Command>,
    /// This site's requests waiting for their verdict.
    submits: HashMap<RequestId, oneshot::Sender<Verdict>>,
    /// Peers' requests waiting for the machine's reply, by (origin, id).
    incoming: HashMap<(SiteId, RequestId), Waiters>,
    next_waiter: u64,
    /// Compare-and-set requests to send, by peer, flushed (batched) once
    /// the commands waiting in the channel are handled.
    outgoing: BTreeMap<SiteId, Vec<Message>>,
}

impl<S: DurableCas> Driver<S> {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Command>) {
        loop {
            let command = match self.machine.next_wakeup() {
                Some(at) => tokio::select! {
                    command = rx.recv() => command,
                    () = tokio::time::sleep_until(at.into()) => {
                        let actions = self.machine.handle(Instant::now(), Input::Tick);
                        self.execute(actions);
                        self.flush();
                        continue;
                    }
                },
                None => rx.recv().await,
            };
            match command {
                None | Some(Command::Shutdown) => break,
                Some(command) => self.command(command),
            }
            // Whatever queued up meanwhile, before sending: requests to one
            // peer then leave together, in one frame.
            let mut stop = false;
            while self.outgoing.values().map(Vec::len).sum::<usize>() < wire::MAX_BATCH {
                match rx.try_recv() {
                    Ok(Command::Shutdown) => {
                        stop = true;
                        break;
                    }
                    Ok(command) => self.command(command),
                    Err(_) => break,
                }
            }
            self.flush();
            if stop {
                break;
            }
        }
        tracing::info!(node = %self.shared.site, pending = self.submits.len(), "replication node stopped");
    }

    fn command(&mut self, command: Command) {
        let now = Instant::now();
        match command {
            Command::Submit { req_id, proposal, sync_level, timeout, reply } => {
                self.submits.insert(req_id, reply);
                let actions = self.machine.handle(now, Input::LocalAccepted { req_id, proposal, sync_level, timeout });
                self.execute(actions);
            }
            Command::Incoming { from, message, waiter } => {
                let Message::CasRequest { req_id, .. } = &message else { return };
                let key = (from, *req_id);
                let id = self.next_waiter;
                self.next_waiter += 1;
                let waiters = self.incoming.entry(key).or_default();
                waiters.retain(|(_, w)| !w.is_closed());
                waiters.push((id, waiter));
                let actions = self.machine.handle(now, Input::Message { from, message });
                let dropped = actions.iter().any(|a| matches!(a, Action::Event(Event::Ignored { .. })));
                self.execute(actions);
                if dropped {
                    // No reply will come for it: answer with an empty frame.
                    if let Some(waiters) = self.incoming.get_mut(&key) {
                        waiters.retain(|(w, _)| *w != id);
                        if waiters.is_empty() {
                            self.incoming.remove(&key);
                        }
                    }
                }
            }
            Command::Reply { from, message } => {
                let actions = self.machine.handle(now, Input::Message { from, message });
                self.execute(actions);
            }
            Command::CasDone { origin, req_id, result } => {
                let actions = self.machine.handle(now, Input::PeerCasDone { origin, req_id, result });
                self.execute(actions);
            }
            Command::PeerUp { site } => {
                let actions = self.machine.handle(now, Input::PeerUp { site });
                self.execute(actions);
            }
            Command::Shutdown => {}
        }
    }

    fn execute(&mut self, actions: Vec<Action>) {
        for action in actions {
            match action {
                Action::Send { to, message: message @ Message::CasRequest { .. } } => self.send_request(to, message),
                Action::Send { to, message: message @ Message::CasReply { .. } } => self.send_reply(to, &message),
                Action::DurableCas { origin, req_id, proposal } => self.durable_cas(origin, req_id, proposal),
                Action::Answer { req_id, verdict } => {
                    self.shared.metrics.verdict(verdict);
                    match self.submits.remove(&req_id) {
                        Some(reply) => {
                            // The submitter may have dropped its future.
                            let _ = reply.send(verdict);
                        }
                        None => tracing::error!(node = %self.shared.site, %req_id, ?verdict, "verdict for no submission"),
                    }
                }
                // The run loop sleeps until `Machine::next_wakeup`, which is
                // what this announces.
                Action::SetTimer { .. } => {}
                Action::Event(event) => self.event(event),
            }
        }
    }

    fn send_request(&mut self, to: SiteId, message: Message) {
        self.outgoing.entry(to).or_default().push(message);
    }

    /// Sends the queued requests: one RPC per peer, a batch frame when
    /// more than one is queued for it.
    fn flush(&mut self) {
        for (to, messages) in std::mem::take(&mut self.outgoing) {
            let Some(peer) = self.peers.get(&to).cloned() else {
                tracing::error!(node = %self.shared.site, peer = %to, "no address for peer");
                continue;
            };
            let mut encoded = Vec::with_capacity(messages.len());
            for message in &messages {
                match wire::encode(message) {
                    Ok(bytes) => encoded.push(bytes),
                    Err(error) => {
                        // Fails closed at the deadline.
                        bump(&self.shared.metrics.bad_messages);
                        tracing::error!(node = %self.shared.site, peer = %to, %error, "request cannot be encoded");
                    }
                }
            }
            for chunk in encoded.chunks(wire::MAX_BATCH) {
                let frame = match chunk {
                    [one] => one.clone(),
                    many => match wire::encode_batch(many) {
                        Ok(frame) => frame,
                        Err(error) => {
                            tracing::error!(node = %self.shared.site, peer = %to, %error, "batch cannot be encoded");
                            continue;
                        }
                    },
                };
                self.shared.metrics.requests_sent.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                bump(&self.shared.metrics.request_rpcs);
                self.rpc(to, peer.clone(), frame);
            }
        }
    }

    /// One RPC to `to`; its reply (one message or a batch) goes back to
    /// the machine.
    fn rpc(&self, to: SiteId, peer: Peer, request: Bytes) {
        let started = Instant::now();
        let deadline = started.checked_add(self.deadline).unwrap_or(started);
        let endpoint = self.endpoint.clone();
        let shared = self.shared.clone();
        let commands = self.commands.clone();
        tokio::spawn(async move {
            match endpoint.request(&peer, request, deadline).await {
                Ok(reply) => {
                    if shared.peer_answered(to, started.elapsed()) {
                        let _ = commands.send(Command::PeerUp { site: to });
                    }
                    if wire::is_batch(&reply) {
                        match wire::decode_batch(&reply) {
                            Ok(replies) => {
                                for one in replies {
                                    reply_to_machine(&shared, &commands, to, one);
                                }
                            }
                            Err(error) => {
                                bump(&shared.metrics.bad_messages);
                                tracing::warn!(node = %shared.site, peer = %to, %error, "undecodable batch reply: ignored");
                            }
                        }
                    } else {
                        reply_to_machine(&shared, &commands, to, &reply);
                    }
                }
                Err(error) => shared.peer_failed(to, error),
            }
        });
    }

    fn send_reply(&mut self, to: SiteId, message: &Message) {
        let Message::CasReply { req_id, .. } = message else { return };
        let Some(waiters) = self.incoming.remove(&(to, *req_id)) else {
            // The peer's RPC is gone (its deadline); it gets no reply.
            tracing::debug!(node = %self.shared.site, peer = %to, %req_id, "reply with no request waiting: dropped");
            return;
        };
        match wire::encode(message) {
            Ok(bytes) => {
                for (_, waiter) in waiters {
                    let _ = waiter.send(bytes.clone());
                }
            }
            Err(error) => {
                bump(&self.shared.metrics.bad_messages);
                tracing::error!(node = %self.shared.site, peer = %to, %error, "reply cannot be encoded");
            }
        }
    }

    fn durable_cas(&self, origin: SiteId, req_id: RequestId, proposal: Proposal) {
        let cas = self.store.clone().peer_cas_async(origin, proposal);
        let commands = self.commands.clone();
        tokio::spawn(async move {
            let result = cas.await;
            let _ = commands.send(Command::CasDone { origin, req_id, result });
        });
    }

    fn event(&self, event: Event) {
        let node = self.shared.site;
        let metrics = &self.shared.metrics;
        match &event {
            Event::QuorumFailed { req_id, public_id, counters, acks, required } => {
                bump(&metrics.quorum_failures);
                tracing::warn!(%node, %req_id, %public_id, %counters, acks, required, "quorum not reached: failing closed");
            }
            Event::AcceptedAtRisk { req_id, public_id, counters, acks, required, .. } => {
                tracing::warn!(%node, %req_id, %public_id, %counters, acks, required, "quorum not reached: ACCEPTED AT RISK");
            }
            Event::PeerRefused { req_id, from, public_id, counters, stored } => {
                tracing::info!(%node, %req_id, peer = %from, %public_id, %counters, %stored, "peer refused: replayed");
            }
            Event::Superseded { req_id, public_id, counters, by } => {
                tracing::info!(%node, %req_id, %public_id, %counters, %by, "superseded by higher counters");
            }
            Event::RefusedPeerRequest { origin, req_id, public_id, counters, stored } => {
                tracing::info!(%node, peer = %origin, %req_id, %public_id, %counters, %stored, "refused a peer's compare-and-set");
            }
            Event::PeerCasFailed { origin, req_id } => {
                bump(&metrics.peer_cas_failures);
                tracing::warn!(%node, peer = %origin, %req_id, "durable compare-and-set for a peer failed");
            }
            Event::PeerReportedFailure { req_id, from } => {
                tracing::warn!(%node, peer = %from, %req_id, "peer's store failed our request");
            }
            Event::Ignored { from, reason } => match reason {
                IgnoredReason::ReplyMismatch | IgnoredReason::UnexpectedCasResult | IgnoredReason::DuplicateLocalRequest => {
                    tracing::debug!(%node, peer = %from, ?reason, "input ignored");
                }
                _ => tracing::warn!(%node, peer = %from, ?reason, "message ignored"),
            },
        }
        self.shared.emit(NodeEvent::Machine(event));
    }
}
