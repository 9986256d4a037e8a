//! Replication for `validator serve` (issue 5), off unless the
//! configuration has a `[replication]` section: the counters' quorum rule,
//! and the catch-up and anti-entropy of the counters (every node), the
//! AEAD store and the API clients (full sites) through the node's dataset
//! sync ([`replication::syncer`]).
//!
//! **Runtime.** [`Replication::start`] runs before the HTTP server exists,
//! so the replication [`Node`] gets its own small tokio runtime (two
//! workers), owned here and kept alive for as long as the [`Replication`]
//! is (the [`Verifier`](crate::verify::Verifier) holds it through its
//! [`AsyncPeerSync`] hook). The HTTP workers only await a oneshot answer of
//! the node, which works across runtimes; no async worker blocks. On drop
//! the runtime is shut down in the background (safe inside another
//! runtime): the endpoint's tasks stop, so peers see this site go down.
//!
//! **Roles.** A site's group is its peer site plus the optional witness
//! (`QuorumConfig::two_sites`, or `with_witness`: 2 of 3); a witness's own
//! group lists both sites as peers (`QuorumConfig::witness_of`) and it only
//! answers their compare-and-sets.
//!
//! **Accept-at-risk.** A site configured with `accept_at_risk_until` runs
//! `Policy::AcceptAtRisk` until that (wall-clock) time, turned into a
//! monotonic instant at the start: moving the clock afterwards neither
//! lengthens nor shortens the window. Each acceptance without quorum is
//! logged (WARN) and counted; afterwards the machine fails closed again.
//!
//! **Status.** [`Replication::render_status`] writes the `/status` lines:
//! this node, its quorum and policy, verdict counters, one line per peer.
//! Peers' reachability is what this node's own requests found: its
//! compare-and-sets and its sync pulls, which every node (the witness
//! too) sends each peer at least every pull interval (100 ms), so a peer
//! going down shows within that and a request deadline.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use httpd::metrics::{header, single};
use replication::node::{DurableCas, Node, NodeConfig, Reachability};
use replication::pki::{Fingerprint, Identity};
use replication::quorum::{OtpDigest, PeerCasResult, Policy, Proposal, QuorumConfig, SiteId, Verdict};
use replication::sync::{Dataset, SyncStore};
use replication::syncer::{SyncOptions, SyncSetup, SyncStatus};
use replication::transport::{Endpoint, EndpointConfig, Peer, PeerRule, Settings, Trust};

use crate::config::{format_utc, PeerSection, ReplicationConfig, Role, MAX_ACCEPT_AT_RISK};
use crate::counters::SqliteCounters;
use crate::verify::{AsyncPeerSync, BoxFuture, SyncOutcome};
use crate::CounterUpdate;

/// A running replication node and the runtime it runs on.
pub struct Replication {
    node: Option<Node>,
    runtime: Option<tokio::runtime::Runtime>,
    role: Role,
    site: u16,
    listen: std::net::SocketAddr,
    quorum: QuorumConfig,
    /// The accept-at-risk window's end: monotonic, and as configured.
    window: Option<(Instant, SystemTime)>,
    /// Names and roles of the other nodes, by site id.
    roles: BTreeMap<SiteId, Role>,
    heard: Arc<Heard>,
}

/// Peers' compare-and-set requests this node answered, by origin: when the
/// last one came and how many.
#[derive(Debug, Default)]
struct Heard(Mutex<BTreeMap<SiteId, (Instant, u64)>>);

impl Heard {
    fn get(&self, site: SiteId) -> Option<(Instant, u64)> {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(&site).copied()
    }
}

/// The counter store as the node's [`DurableCas`], noting who asked (the
/// dataset sync takes the bare store).
struct Observed<S> {
    store: Arc<S>,
    heard: Arc<Heard>,
}

impl Heard {
    fn note(&self, origin: SiteId) {
        let mut heard = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let entry = heard.entry(origin).or_insert((Instant::now(), 0));
        *entry = (Instant::now(), entry.1 + 1);
    }
}

impl<S: DurableCas> DurableCas for Observed<S> {
    fn peer_cas(&self, origin: SiteId, proposal: &Proposal) -> PeerCasResult {
        self.heard.note(origin);
        self.store.peer_cas(origin, proposal)
    }

    fn peer_cas_async(self: Arc<Self>, origin: SiteId, proposal: Proposal) -> replication::node::CasFuture {
        self.heard.note(origin);
        self.store.clone().peer_cas_async(origin, proposal)
    }
}

impl std::fmt::Debug for Replication {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replication").field("node", &self.node).finish_non_exhaustive()
    }
}

fn rule(p: &PeerSection) -> Result<PeerRule, String> {
    Ok(match &p.fingerprint {
        Some(f) => {
            let pin: Fingerprint = f.parse().map_err(|e| format!("replication: peer {:?} fingerprint: {e}", p.name))?;
            PeerRule::name_and_pin(p.name.clone(), pin)
        }
        None => PeerRule::name(p.name.clone()),
    })
}

impl Replication {
    /// [`Self::start_with`] for a site failing closed, syncing counters only.
    pub fn start(config: &ReplicationConfig, counters: Arc<SqliteCounters>) -> Result<Self, String> {
        Self::start_with(config, Role::Site, None, counters, Vec::new())
    }

    /// Load the certificates, bind the QUIC endpoint, register each peer's
    /// outbox in `counters` and start the node over `counters` as its
    /// durable compare-and-set, as a site (accepting at risk until
    /// `accept_at_risk_until`, if given) or as the witness. The node pulls
    /// and serves the counters and every dataset of `datasets` (a site's
    /// AEADs and API clients; their stores register the peer sites
    /// themselves).
    pub fn start_with(
        config: &ReplicationConfig,
        role: Role,
        accept_at_risk_until: Option<SystemTime>,
        counters: Arc<SqliteCounters>,
        datasets: Vec<(Dataset, Arc<dyn SyncStore>)>,
    ) -> Result<Self, String> {
        let identity = Identity::load(&config.certificate, &config.key).map_err(|e| format!("replication identity: {e}"))?;
        let ca = replication::pki::load_certificate(&config.ca).map_err(|e| format!("replication CA: {e}"))?;
        let all: Vec<&PeerSection> = config.peers.iter().chain(config.witness.as_ref()).collect();
        let rules = all.iter().map(|p| rule(p)).collect::<Result<Vec<_>, _>>()?;
        let trust = Trust::new(ca, rules).map_err(|e| format!("replication trust: {e}"))?;
        let mut quorum = match (role, config.peers.as_slice(), &config.witness) {
            (Role::Witness, [a, b], None) => QuorumConfig::witness_of(SiteId(a.site), SiteId(b.site), config.deadline),
            (Role::Witness, _, _) => return Err("replication: a witness needs exactly the two sites as peers".to_owned()),
            (Role::Site, [peer], Some(w)) => QuorumConfig::with_witness(SiteId(peer.site), SiteId(w.site), config.deadline),
            (Role::Site, [peer], None) => QuorumConfig::two_sites(SiteId(peer.site), config.deadline),
            (Role::Site, _, _) => return Err("replication: a site needs exactly one peer site".to_owned()),
        };
        let window = match (role, accept_at_risk_until) {
            (Role::Site, Some(until)) => {
                if until.duration_since(SystemTime::now()).is_ok_and(|ahead| ahead > MAX_ACCEPT_AT_RISK) {
                    return Err(format!(
                        "replication: the accept-at-risk window ending {} is longer than {} h",
                        format_utc(until),
                        MAX_ACCEPT_AT_RISK.as_secs() / 3600
                    ));
                }
                Some(open_window(until))
            }
            (Role::Witness, Some(_)) => return Err("replication: a witness cannot accept at risk".to_owned()),
            (_, None) => None,
        };
        if let Some((end, _)) = window {
            quorum.policy = Policy::AcceptAtRisk { until: end };
        }
        let mut roles: BTreeMap<SiteId, Role> = config.peers.iter().map(|p| (SiteId(p.site), Role::Site)).collect();
        if let Some(w) = &config.witness {
            roles.insert(SiteId(w.site), Role::Witness);
        }
        let peers: BTreeMap<SiteId, Peer> = all.iter().map(|p| (SiteId(p.site), Peer::new(p.name.clone(), p.addr))).collect();
        for p in &all {
            counters.add_peer(&p.name).map_err(|e| format!("replication: registering peer {:?}: {e}", p.name))?;
        }
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("replication")
            .enable_all()
            .build()
            .map_err(|e| format!("replication runtime: {e}"))?;
        let heard = Arc::new(Heard::default());
        let mut stores: BTreeMap<Dataset, Arc<dyn SyncStore>> = datasets.into_iter().collect();
        stores.insert(Dataset::COUNTERS, counters.clone());
        let sync = SyncSetup { stores, options: SyncOptions::default() };
        let store = Arc::new(Observed { store: counters, heard: heard.clone() });
        let node = {
            let _entered = runtime.enter();
            let endpoint = Endpoint::bind(EndpointConfig { bind: config.listen, identity, trust, settings: Settings::default() })
                .map_err(|e| format!("replication endpoint {}: {e}", config.listen))?;
            Node::start_with(NodeConfig { site: SiteId(config.site), quorum: quorum.clone(), peers }, endpoint, store, sync)
                .map_err(|e| format!("replication node: {e}"))?
        };
        if let Some((end, until)) = window {
            let site = config.site;
            runtime.spawn(async move {
                tokio::time::sleep_until(end.into()).await;
                tracing::warn!(site, until = %format_utc(until), "accept-at-risk window closed: failing closed again");
            });
        }
        tracing::info!(site = config.site, %role, group = quorum.group_size(), required = quorum.required, "replication started");
        Ok(Self { node: Some(node), runtime: Some(runtime), role, site: config.site, listen: config.listen, quorum, window, roles, heard })
    }

    /// This node's role.
    #[must_use]
    pub fn role(&self) -> Role {
        self.role
    }

    /// What is left of the accept-at-risk window (zero once closed, `None`
    /// when none was configured).
    #[must_use]
    pub fn accept_at_risk_remaining(&self) -> Option<Duration> {
        self.window.map(|(end, _)| end.saturating_duration_since(Instant::now()))
    }

    /// The node.
    #[must_use]
    pub fn node(&self) -> Option<&Node> {
        self.node.as_ref()
    }

    /// The address the QUIC endpoint is bound to.
    pub fn local_addr(&self) -> Option<std::net::SocketAddr> {
        self.node.as_ref().and_then(|n| n.endpoint().local_addr().ok())
    }

    /// Prometheus series: peers' state, RPC failures, verdicts.
    pub fn render_metrics(&self, out: &mut String) {
        let Some(node) = &self.node else { return };
        let m = node.metrics();
        header(out, "validator_replication_verdicts_total", "counter", "Replicated verify requests, by verdict.");
        for (verdict, n) in [
            ("accepted", m.accepted),
            ("replayed", m.replayed),
            ("not_enough_answers", m.not_enough_answers),
            ("accepted_at_risk", m.accepted_at_risk),
        ] {
            let _ = writeln!(out, "validator_replication_verdicts_total{{verdict=\"{verdict}\"}} {n}");
        }
        single(
            out,
            "validator_replication_accept_at_risk_window_seconds",
            "gauge",
            "Seconds left in the accept-at-risk window (0 when closed or none).",
            self.accept_at_risk_remaining().unwrap_or_default().as_secs_f64().ceil(),
        );
        single(
            out,
            "validator_replication_accepted_at_risk_total",
            "counter",
            "OTPs accepted without their quorum (accept-at-risk).",
            m.accepted_at_risk,
        );
        single(out, "validator_replication_quorum_failures_total", "counter", "Requests that missed their quorum.", m.quorum_failures);
        single(out, "validator_replication_rpc_failures_total", "counter", "Requests to peers that failed (transport).", m.rpc_failures);
        single(out, "validator_replication_requests_sent_total", "counter", "Compare-and-set requests sent to peers.", m.requests_sent);
        single(
            out,
            "validator_replication_request_rpcs_total",
            "counter",
            "RPCs carrying them (requests queued together share one).",
            m.request_rpcs,
        );
        single(out, "validator_replication_peer_requests_total", "counter", "Peers' compare-and-set requests answered.", m.peer_requests);
        header(out, "validator_replication_peer_transitions_total", "counter", "Peers going up or down.");
        let _ = writeln!(out, "validator_replication_peer_transitions_total{{to=\"up\"}} {}", m.peer_up);
        let _ = writeln!(out, "validator_replication_peer_transitions_total{{to=\"down\"}} {}", m.peer_down);
        let t = node.endpoint().stats();
        header(out, "validator_replication_connections_total", "counter", "QUIC connections with peers, by outcome.");
        let _ = writeln!(out, "validator_replication_connections_total{{outcome=\"dialled\"}} {}", t.dialled);
        let _ = writeln!(out, "validator_replication_connections_total{{outcome=\"accepted\"}} {}", t.accepted);
        let _ = writeln!(out, "validator_replication_connections_total{{outcome=\"refused\"}} {}", t.refused);
        header(out, "validator_replication_peer_up", "gauge", "1 when the peer's last request succeeded.");
        for p in node.peers() {
            let up = u8::from(p.reachability == Reachability::Up);
            let _ = writeln!(out, "validator_replication_peer_up{{peer=\"{}\",site=\"{}\"}} {up}", p.peer.name, p.site.0);
        }
        header(
            out,
            "validator_replication_peer_path_rtt_seconds",
            "gauge",
            "QUIC's smoothed round-trip estimate of the network path to the peer.",
        );
        for p in node.peers() {
            if let Some(rtt) = node.endpoint().path_rtt(&p.peer) {
                let _ = writeln!(out, "validator_replication_peer_path_rtt_seconds{{peer=\"{}\"}} {}", p.peer.name, rtt.as_secs_f64());
            }
        }
        header(
            out,
            "validator_replication_peer_rtt_seconds",
            "summary",
            "Round-trip times of the requests to the peer that were answered.",
        );
        for p in node.peers() {
            let _ = writeln!(out, "validator_replication_peer_rtt_seconds_sum{{peer=\"{}\"}} {}", p.peer.name, p.rtt_total.as_secs_f64());
            let _ = writeln!(out, "validator_replication_peer_rtt_seconds_count{{peer=\"{}\"}} {}", p.peer.name, p.replies);
        }
        Self::render_sync_metrics(node, out);
    }

    /// The `/status` lines of replication (see [`crate::serve`]): `node:`,
    /// `quorum:`, `policy:`, `verdicts:`, one `peer:` per other node, and
    /// `peers:` with the count by state.
    pub fn render_status(&self, out: &mut String) {
        let Some(node) = &self.node else { return };
        let _ = writeln!(out, "node: role={} site={} listen={}", self.role, self.site, self.listen);
        let _ = writeln!(
            out,
            "quorum: required={} group={} deadline_ms={}",
            self.quorum.required,
            self.quorum.group_size(),
            self.quorum.deadline.as_millis()
        );
        match (self.role, self.window) {
            (Role::Witness, _) => {
                let _ = writeln!(out, "policy: witness (answers the sites' compare-and-sets, decides nothing)");
            }
            (Role::Site, None) => {
                let _ = writeln!(out, "policy: fail-closed");
            }
            (Role::Site, Some((end, until))) => {
                let left = end.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    let _ = writeln!(out, "policy: fail-closed (accept-at-risk window ended {})", format_utc(until));
                } else {
                    let _ = writeln!(
                        out,
                        "policy: ACCEPT-AT-RISK until={} remaining_s={} (an OTP missing its quorum is accepted; it may be replayed at a site that missed it)",
                        format_utc(until),
                        left.as_secs()
                    );
                }
            }
        }
        let m = node.metrics();
        let _ = writeln!(
            out,
            "verdicts: accepted={} replayed={} not_enough_answers={} accepted_at_risk={} peer_requests={} rpc_failures={}",
            m.accepted, m.replayed, m.not_enough_answers, m.accepted_at_risk, m.peer_requests, m.rpc_failures
        );
        let now = Instant::now();
        let (mut up, mut down, mut unknown) = (0, 0, 0);
        for p in node.peers() {
            let heard = self.heard.get(p.site);
            let state = match p.reachability {
                Reachability::Up => "up",
                Reachability::Down => "down",
                Reachability::Unknown => "unknown",
            };
            match state {
                "up" => up += 1,
                "down" => down += 1,
                _ => unknown += 1,
            }
            let role = self.roles.get(&p.site).copied().unwrap_or_default();
            let ago = |t: Option<Instant>| t.map_or_else(|| "-".to_owned(), |t| now.saturating_duration_since(t).as_secs().to_string());
            let _ = writeln!(
                out,
                "peer: name={} site={} role={role} addr={} state={state} since_s={} last_rtt_ms={} replies={} failures={} requests_in={} last_request_in_s={} last_error={}",
                p.peer.name,
                p.site.0,
                p.peer.addr,
                ago(p.since),
                p.last_rtt.map_or_else(|| "-".to_owned(), rtt_ms),
                p.replies,
                p.failures,
                heard.map_or(0, |h| h.1),
                ago(heard.map(|h| h.0)),
                p.last_error.as_ref().map_or_else(|| "-".to_owned(), |e| format!("{:?}", e.to_string())),
            );
        }
        let _ = writeln!(out, "peers: total={} up={up} down={down} unknown={unknown}", up + down + unknown);
    }

    /// The `/status` lines of dataset sync: one `sync:` line per peer and
    /// dataset pulled from it (changes behind, time since last caught up,
    /// items applied, conflicts, anti-entropy rounds, errors).
    pub fn render_sync_status(&self, out: &mut String) {
        let Some(node) = &self.node else { return };
        let now = Instant::now();
        for s in node.sync_status() {
            if s.unsupported {
                let _ = writeln!(out, "sync: peer={} dataset={} not held by the peer", s.peer, s.dataset);
                continue;
            }
            let _ = writeln!(
                out,
                "sync: peer={} dataset={} behind={} lag_ms={} cursor={} peer_head={} last_pull_s={} pulled={} applied={} conflicts={} \
                 digest_rounds={} buckets_repaired={} errors={} last_error={}",
                s.peer,
                s.dataset,
                s.lag_changes.map_or_else(|| "-".to_owned(), |n| n.to_string()),
                s.lag.as_millis(),
                s.cursor.map_or_else(|| "-".to_owned(), |n| n.to_string()),
                s.peer_head.map_or_else(|| "-".to_owned(), |n| n.to_string()),
                s.last_pull.map_or_else(|| "-".to_owned(), |t| now.saturating_duration_since(t).as_secs().to_string()),
                s.items_pulled + s.bucket_items,
                s.applied,
                s.conflicts,
                s.digest_rounds,
                s.buckets_differing,
                s.errors,
                s.last_error.as_ref().map_or_else(|| "-".to_owned(), |e| format!("{e:?}")),
            );
        }
    }

    /// Prometheus series of dataset sync, by peer and dataset.
    fn render_sync_metrics(node: &Node, out: &mut String) {
        let statuses: Vec<_> = node.sync_status().into_iter().filter(|s| !s.unsupported).collect();
        type Series = (&'static str, &'static str, &'static str, fn(&SyncStatus) -> f64);
        let series: [Series; 6] = [
            ("validator_replication_sync_behind", "gauge", "Changes the peer had that were not merged here yet, at the last pull.", |s| {
                s.lag_changes.unwrap_or(0) as f64
            }),
            ("validator_replication_sync_lag_seconds", "gauge", "Time since a pull from the peer last reached its head.", |s| {
                s.lag.as_secs_f64()
            }),
            ("validator_replication_sync_applied_total", "counter", "Items from the peer that changed the local state.", |s| {
                s.applied as f64
            }),
            ("validator_replication_sync_conflicts_total", "counter", "Items from the peer refused and quarantined.", |s| {
                s.conflicts as f64
            }),
            ("validator_replication_sync_buckets_repaired_total", "counter", "Anti-entropy buckets found differing.", |s| {
                s.buckets_differing as f64
            }),
            ("validator_replication_sync_errors_total", "counter", "Failed sync exchanges with the peer.", |s| s.errors as f64),
        ];
        for (name, kind, help, value) in series {
            header(out, name, kind, help);
            for s in &statuses {
                let _ = writeln!(out, "{name}{{peer=\"{}\",dataset=\"{}\"}} {}", s.peer, s.dataset, value(s));
            }
        }
    }
}

/// The window ending at `until` (wall clock) as a monotonic instant,
/// announced in the log with its exposure.
fn open_window(until: SystemTime) -> (Instant, SystemTime) {
    let now = Instant::now();
    match until.duration_since(SystemTime::now()) {
        Ok(left) if !left.is_zero() => {
            tracing::warn!(
                until = %format_utc(until),
                remaining_s = left.as_secs(),
                "ACCEPT-AT-RISK window open: until then an OTP whose quorum is missed is answered OK anyway (logged and \
                 counted); exposure: such an OTP can be accepted a second time at a site that did not receive it"
            );
            (now.checked_add(left).unwrap_or(now), until)
        }
        _ => {
            tracing::warn!(until = %format_utc(until), "accept_at_risk_until has passed: failing closed (remove it from the configuration)");
            (now, until)
        }
    }
}

fn rtt_ms(d: Duration) -> String {
    format!("{:.3}", d.as_secs_f64() * 1000.0)
}

impl AsyncPeerSync for Replication {
    fn submit(&self, update: &CounterUpdate, level: u8, timeout: Option<Duration>) -> BoxFuture<SyncOutcome> {
        let Some(node) = &self.node else {
            return Box::pin(async { SyncOutcome::NotEnoughAnswers { sl: 0 } });
        };
        let proposal = Proposal {
            public_id: update.public_id,
            counters: update.counters,
            nonce: update.nonce.clone(),
            otp_digest: OtpDigest(update.otp_digest),
        };
        let public_id = update.public_id;
        let verdict = node.submit(proposal, Some(level), timeout);
        Box::pin(async move {
            match verdict.await {
                Verdict::Accepted { sl } => SyncOutcome::Synced { sl },
                Verdict::Replayed => SyncOutcome::Replayed,
                Verdict::NotEnoughAnswers { sl } => SyncOutcome::NotEnoughAnswers { sl },
                Verdict::AcceptedAtRisk { sl } => {
                    tracing::warn!(%public_id, sl, "OTP accepted AT RISK: quorum missed inside the accept-at-risk window");
                    SyncOutcome::Synced { sl }
                }
            }
        })
    }
}

impl Drop for Replication {
    fn drop(&mut self) {
        // The node's own drop stops its driver; the runtime must not block
        // here (this may run on another runtime's worker).
        drop(self.node.take());
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}
