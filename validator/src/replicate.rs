//! Counter replication for `validator serve` (issue 5), off unless the
//! configuration has a `[replication]` section.
//!
//! **Runtime.** [`Replication::start`] runs before the HTTP server exists,
//! so the replication [`Node`] gets its own small tokio runtime (two
//! workers), owned here and kept alive for as long as the [`Replication`]
//! is (the [`Verifier`](crate::verify::Verifier) holds it through its
//! [`AsyncPeerSync`] hook). The HTTP workers only await a oneshot answer of
//! the node, which works across runtimes; no async worker blocks. On drop
//! the runtime is shut down in the background (safe inside another
//! runtime): the endpoint's tasks stop, so peers see this site go down.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use httpd::metrics::header;
use replication::node::{Node, NodeConfig, Reachability};
use replication::pki::{Fingerprint, Identity};
use replication::quorum::{OtpDigest, Proposal, QuorumConfig, SiteId, Verdict};
use replication::transport::{Endpoint, EndpointConfig, Peer, PeerRule, Settings, Trust};

use crate::config::{PeerSection, ReplicationConfig};
use crate::counters::SqliteCounters;
use crate::verify::{AsyncPeerSync, BoxFuture, SyncOutcome};
use crate::CounterUpdate;

/// A running replication node and the runtime it runs on.
pub struct Replication {
    node: Option<Node>,
    runtime: Option<tokio::runtime::Runtime>,
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
    /// Load the certificates, bind the QUIC endpoint, register each peer's
    /// outbox in `counters` and start the node over `counters` as its
    /// durable compare-and-set.
    pub fn start(config: &ReplicationConfig, counters: Arc<SqliteCounters>) -> Result<Self, String> {
        let identity = Identity::load(&config.certificate, &config.key).map_err(|e| format!("replication identity: {e}"))?;
        let ca = replication::pki::load_certificate(&config.ca).map_err(|e| format!("replication CA: {e}"))?;
        let all: Vec<&PeerSection> = config.peers.iter().chain(config.witness.as_ref()).collect();
        let rules = all.iter().map(|p| rule(p)).collect::<Result<Vec<_>, _>>()?;
        let trust = Trust::new(ca, rules).map_err(|e| format!("replication trust: {e}"))?;
        let peer = config.peers.first().ok_or("replication: no peer site")?;
        let quorum = match &config.witness {
            Some(w) => QuorumConfig::with_witness(SiteId(peer.site), SiteId(w.site), config.deadline),
            None => QuorumConfig::two_sites(SiteId(peer.site), config.deadline),
        };
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
        let node = {
            let _entered = runtime.enter();
            let endpoint = Endpoint::bind(EndpointConfig { bind: config.listen, identity, trust, settings: Settings::default() })
                .map_err(|e| format!("replication endpoint {}: {e}", config.listen))?;
            Node::start(NodeConfig { site: SiteId(config.site), quorum, peers }, endpoint, counters)
                .map_err(|e| format!("replication node: {e}"))?
        };
        Ok(Self { node: Some(node), runtime: Some(runtime) })
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
        header(out, "validator_replication_accepted_at_risk_total", "counter", "OTPs accepted without their quorum (accept-at-risk).");
        let _ = writeln!(out, "validator_replication_accepted_at_risk_total {}", m.accepted_at_risk);
        header(out, "validator_replication_quorum_failures_total", "counter", "Requests that missed their quorum.");
        let _ = writeln!(out, "validator_replication_quorum_failures_total {}", m.quorum_failures);
        header(out, "validator_replication_rpc_failures_total", "counter", "Requests to peers that failed (transport).");
        let _ = writeln!(out, "validator_replication_rpc_failures_total {}", m.rpc_failures);
        header(out, "validator_replication_peer_requests_total", "counter", "Peers' compare-and-set requests answered.");
        let _ = writeln!(out, "validator_replication_peer_requests_total {}", m.peer_requests);
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
    }
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
