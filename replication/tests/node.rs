//! The replication node over real QUIC on loopback (127.0.0.1/2/3): two
//! sites, or two sites and a witness, each with an in-memory durable store
//! that follows `quorum::peer_cas`, certificates from a private CA written
//! to and loaded from a temp dir.
//!
//! The validator's part is played by `validate`: the local compare-and-set
//! first (strictly greater, or the request is answered locally), then
//! `Node::submit`.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use otp::{Counters, PublicId};
use replication::node::{DurableCas, Error as NodeError, Node, NodeConfig, NodeEvent, Reachability};
use replication::quorum::{peer_cas, CasDecision, Event, OtpDigest, PeerCasResult, Policy, Proposal, QuorumConfig, SiteId, Verdict};
use replication::transport::{Endpoint, Peer};
use replication::wire;

const DEADLINE: Duration = Duration::from_millis(300);

mod common;

use common::model::{apply_peer_cas, local_cas, LocalVerdict, Rng, Store};
use common::{free_addr, pki, Pki, Spec, A, B, W};

// ---------------------------------------------------------------------------
// The durable store: a peer's compare-and-set per `peer_cas`, and the
// validator's local rule.

#[derive(Default)]
struct MemStore {
    records: Mutex<Store>,
}

impl MemStore {
    fn local_cas(&self, p: &Proposal) -> Result<(), LocalVerdict> {
        local_cas(&mut self.records.lock().unwrap(), p)
    }

    fn get(&self, public_id: PublicId) -> Option<Counters> {
        self.records.lock().unwrap().get(&public_id).map(|s| s.counters)
    }
}

impl DurableCas for MemStore {
    fn peer_cas(&self, _origin: SiteId, proposal: &Proposal) -> PeerCasResult {
        apply_peer_cas(&mut self.records.lock().unwrap(), proposal)
    }
}

struct Site {
    node: Node,
    store: Arc<MemStore>,
}

fn start(spec: Spec, endpoint: Endpoint, quorum: QuorumConfig, peers: &[(Spec, SocketAddr)], store: Arc<MemStore>) -> Site {
    let peers = peers.iter().map(|(s, addr)| (s.id, Peer::new(s.name, *addr))).collect();
    let node = Node::start(NodeConfig { site: spec.id, quorum, peers }, endpoint, store.clone()).unwrap();
    Site { node, store }
}

// ---------------------------------------------------------------------------
// OTPs.

fn key(n: u64) -> PublicId {
    PublicId::from_number(n, 6).unwrap()
}

/// `variant` stands for a different OTP string with equal counters.
fn otp(key_no: u64, counter: u16, session_use: u8, nonce: &str, variant: u8) -> Proposal {
    let mut d = [0u8; 32];
    d[..8].copy_from_slice(&key_no.to_be_bytes());
    d[8..10].copy_from_slice(&counter.to_be_bytes());
    d[10] = session_use;
    d[11] = variant;
    Proposal {
        public_id: key(key_no),
        counters: Counters::new(counter, session_use).unwrap(),
        nonce: nonce.to_string(),
        otp_digest: OtpDigest(d),
    }
}

#[derive(Debug, PartialEq, Eq, Clone, Copy)]
enum Outcome {
    Local(LocalVerdict),
    Node(Verdict),
}

fn is_ok(o: Outcome) -> bool {
    matches!(o, Outcome::Node(Verdict::Accepted { .. } | Verdict::AcceptedAtRisk { .. }))
}

/// What the validator does: local compare-and-set, then replication.
async fn validate(site: &Site, p: Proposal) -> Outcome {
    match site.store.local_cas(&p) {
        Err(local) => Outcome::Local(local),
        Ok(()) => Outcome::Node(site.node.submit(p, None, None).await),
    }
}

/// Two sites, write-all, both up.
fn two_sites(pki: &Pki) -> (Site, Site) {
    let ea = pki.endpoint(A, format!("{}:0", A.ip).parse().unwrap(), &[B]);
    let eb = pki.endpoint(B, format!("{}:0", B.ip).parse().unwrap(), &[A]);
    let (aa, ab) = (ea.local_addr().unwrap(), eb.local_addr().unwrap());
    let a = start(A, ea, QuorumConfig::two_sites(B.id, DEADLINE), &[(B, ab)], Arc::default());
    let b = start(B, eb, QuorumConfig::two_sites(A.id, DEADLINE), &[(A, aa)], Arc::default());
    (a, b)
}

// ---------------------------------------------------------------------------
// Scenarios.

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn same_otp_and_nonce_at_both_sites_is_accepted_at_both() {
    let pki = pki();
    let (a, b) = two_sites(&pki);

    // pam_yubico's fan-out: one OTP, one nonce, both sites at once. Both
    // local compare-and-sets run first, then both replicate concurrently.
    let p = otp(1, 10, 0, "nonce0123456789abc", 0);
    assert!(a.store.local_cas(&p).is_ok());
    assert!(b.store.local_cas(&p).is_ok());
    let (va, vb) = tokio::join!(a.node.submit(p.clone(), None, None), b.node.submit(p.clone(), None, None));
    assert_eq!(va, Verdict::Accepted { sl: 100 });
    assert_eq!(vb, Verdict::Accepted { sl: 100 });

    // The same OTP with *different* nonces at both sites: a replay race,
    // at most one OK (here neither: each peer holds the other request).
    let p = otp(1, 11, 0, "nonceAAAAAAAAAAAAAAAA", 0);
    let q = Proposal { nonce: "nonceBBBBBBBBBBBBBBBB".into(), ..p.clone() };
    assert!(a.store.local_cas(&p).is_ok());
    assert!(b.store.local_cas(&q).is_ok());
    let (va, vb) = tokio::join!(a.node.submit(p, None, None), b.node.submit(q, None, None));
    assert_eq!((va, vb), (Verdict::Replayed, Verdict::Replayed));

    // The next OTP is fine again, at either site.
    assert_eq!(validate(&b, otp(1, 12, 0, "nonce-next-1", 0)).await, Outcome::Node(Verdict::Accepted { sl: 100 }));
    assert_eq!(a.node.metrics().accepted, 1);
    assert_eq!(b.node.metrics().accepted, 2);
    assert_eq!(a.node.metrics().replayed + b.node.metrics().replayed, 2);
    a.node.shutdown().await;
    b.node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replay_at_b_after_an_ok_at_a_is_refused() {
    let pki = pki();
    let (a, b) = two_sites(&pki);
    let p = otp(2, 5, 3, "nonce-first-0001", 0);
    assert_eq!(validate(&a, p.clone()).await, Outcome::Node(Verdict::Accepted { sl: 100 }));
    // Write-all: B durably holds the counters before A answered OK, so B's
    // own compare-and-set refuses the replay, whatever the nonce.
    assert_eq!(b.store.get(p.public_id), Some(p.counters));
    assert_eq!(validate(&b, p.clone()).await, Outcome::Local(LocalVerdict::ReplayedRequest));
    let replay = Proposal { nonce: "nonce-replay-0002".into(), ..p.clone() };
    assert_eq!(validate(&b, replay.clone()).await, Outcome::Local(LocalVerdict::ReplayedOtp));
    // Even a site whose local store missed it (forced here) is refused by
    // its peer.
    assert_eq!(b.node.submit(replay, None, None).await, Verdict::Replayed);
    let lower = otp(2, 5, 2, "nonce-lower-0003", 0);
    assert_eq!(b.node.submit(lower, None, None).await, Verdict::Replayed);
    a.node.shutdown().await;
    b.node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dead_peer_fails_closed_within_the_deadline() {
    let pki = pki();
    // B was never started: nothing listens at its address.
    let ea = pki.endpoint(A, format!("{}:0", A.ip).parse().unwrap(), &[B]);
    let a = start(A, ea, QuorumConfig::two_sites(B.id, DEADLINE), &[(B, free_addr(B))], Arc::default());

    let t = Instant::now();
    let v = validate(&a, otp(3, 1, 0, "nonce-dead-peer-1", 0)).await;
    let took = t.elapsed();
    println!("dead peer: NOT_ENOUGH_ANSWERS after {took:?} (deadline {DEADLINE:?})");
    assert_eq!(v, Outcome::Node(Verdict::NotEnoughAnswers { sl: 50 }));
    assert!(took >= DEADLINE, "never before the deadline: {took:?}");
    assert!(took < DEADLINE + Duration::from_millis(150), "within the deadline: {took:?}");

    // The verify request's `timeout` shortens it.
    let t = Instant::now();
    let v = a.node.submit(otp(3, 2, 0, "nonce-dead-peer-2", 0), Some(100), Some(Duration::from_millis(100))).await;
    let took = t.elapsed();
    assert_eq!(v, Verdict::NotEnoughAnswers { sl: 50 });
    assert!(took >= Duration::from_millis(100) && took < Duration::from_millis(250), "{took:?}");

    let m = a.node.metrics();
    assert_eq!((m.not_enough_answers, m.quorum_failures, m.accepted), (2, 2, 0));
    // The RPC fails at the same deadline; give it a moment to be recorded.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let peers = a.node.peers();
    assert_eq!(peers[0].reachability, Reachability::Down);
    assert!(a.node.metrics().peer_down >= 1);
    a.node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn accept_at_risk_is_answered_logged_and_counted() {
    let pki = pki();
    let ea = pki.endpoint(A, format!("{}:0", A.ip).parse().unwrap(), &[B]);
    let mut quorum = QuorumConfig::two_sites(B.id, Duration::from_millis(100));
    quorum.policy = Policy::AcceptAtRisk { until: Instant::now() + Duration::from_secs(3600) };
    let a = start(A, ea, quorum, &[(B, free_addr(B))], Arc::default());
    let mut events = a.node.subscribe();
    assert_eq!(validate(&a, otp(8, 1, 0, "nonce-at-risk", 0)).await, Outcome::Node(Verdict::AcceptedAtRisk { sl: 50 }));
    let m = a.node.metrics();
    assert_eq!((m.accepted_at_risk, m.quorum_failures, m.accepted, m.submitted), (1, 0, 0, 1));
    let mut seen = false;
    while let Ok(event) = events.try_recv() {
        seen |= matches!(event, NodeEvent::Machine(Event::AcceptedAtRisk { acks: 1, required: 2, .. }));
    }
    assert!(seen, "the acceptance at risk is reported");
    a.node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_refuses_an_inconsistent_peer_table() {
    let pki = pki();
    let config = |peers: Vec<(Spec, SocketAddr)>| NodeConfig {
        site: A.id,
        quorum: QuorumConfig::two_sites(B.id, DEADLINE),
        peers: peers.into_iter().map(|(s, addr)| (s.id, Peer::new(s.name, addr))).collect(),
    };
    let ep = || pki.endpoint(A, format!("{}:0", A.ip).parse().unwrap(), &[B]);
    let store = Arc::new(MemStore::default());
    let err = Node::start(config(vec![]), ep(), store.clone()).unwrap_err();
    assert!(matches!(err, NodeError::MissingPeer(SiteId(2))), "{err}");
    let err = Node::start(config(vec![(B, free_addr(B)), (W, free_addr(W))]), ep(), store.clone()).unwrap_err();
    assert!(matches!(err, NodeError::UnknownPeer(SiteId(3))), "{err}");
    let mut bad = config(vec![(B, free_addr(B))]);
    bad.quorum.required = 1;
    let err = Node::start(bad, ep(), store).unwrap_err();
    assert!(matches!(err, NodeError::Config(_)), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn peer_shut_down_fails_closed_and_a_restart_recovers() {
    let pki = pki();
    let (a, b) = two_sites(&pki);
    let b_addr = b.node.endpoint().local_addr().unwrap();
    let a_addr = a.node.endpoint().local_addr().unwrap();
    assert_eq!(validate(&a, otp(4, 1, 0, "nonce-before-down", 0)).await, Outcome::Node(Verdict::Accepted { sl: 100 }));
    assert_eq!(a.node.peers()[0].reachability, Reachability::Up);

    let b_store = b.store.clone();
    b.node.shutdown().await;
    let t = Instant::now();
    let v = validate(&a, otp(4, 2, 0, "nonce-while-down", 0)).await;
    let took = t.elapsed();
    println!("peer shut down: {v:?} after {took:?}");
    assert_eq!(v, Outcome::Node(Verdict::NotEnoughAnswers { sl: 50 }));
    assert!(took >= DEADLINE && took < DEADLINE + Duration::from_millis(150), "{took:?}");

    // B comes back at the same address with its durable store.
    let eb = pki.endpoint(B, b_addr, &[A]);
    let b = start(B, eb, QuorumConfig::two_sites(A.id, DEADLINE), &[(A, a_addr)], b_store);
    let mut ok = None;
    for i in 0..5u8 {
        // The first request after the restart may die with the old
        // connection (a stateless reset); the next one reconnects.
        let v = validate(&a, otp(4, 3, i, &format!("nonce-after-up-{i}"), 0)).await;
        if is_ok(v) {
            ok = Some(i);
            break;
        }
        assert_eq!(v, Outcome::Node(Verdict::NotEnoughAnswers { sl: 50 }));
    }
    let i = ok.expect("A accepts again once B is back");
    assert_eq!(b.store.get(key(4)), Some(Counters::new(3, i).unwrap()));
    a.node.shutdown().await;
    b.node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn witness_keeps_a_accepting_with_b_down_and_b_refuses_the_replay_later() {
    let pki = pki();
    let b_addr = free_addr(B);
    let ea = pki.endpoint(A, format!("{}:0", A.ip).parse().unwrap(), &[B, W]);
    let ew = pki.endpoint(W, format!("{}:0", W.ip).parse().unwrap(), &[A, B]);
    let (aa, aw) = (ea.local_addr().unwrap(), ew.local_addr().unwrap());
    let a = start(A, ea, QuorumConfig::with_witness(B.id, W.id, DEADLINE), &[(B, b_addr), (W, aw)], Arc::default());
    let w = start(W, ew, QuorumConfig::witness_of(A.id, B.id, DEADLINE), &[(A, aa), (B, b_addr)], Arc::default());

    // B is down: A and the witness are a majority.
    let p = otp(5, 7, 1, "nonce-with-witness", 0);
    assert_eq!(validate(&a, p.clone()).await, Outcome::Node(Verdict::Accepted { sl: 66 }));
    for u in 2..6u8 {
        assert_eq!(validate(&a, otp(5, 7, u, &format!("nonce-w-{u}"), 0)).await, Outcome::Node(Verdict::Accepted { sl: 66 }));
    }
    assert_eq!(w.store.get(key(5)), Some(Counters::new(7, 5).unwrap()));

    // B starts with a store that never saw those OTPs: its local
    // compare-and-set accepts a replay of the first one, and the quorum
    // refuses it.
    let eb = pki.endpoint(B, b_addr, &[A, W]);
    let b = start(B, eb, QuorumConfig::with_witness(A.id, W.id, DEADLINE), &[(A, aa), (W, aw)], Arc::default());
    let replay = Proposal { nonce: "nonce-replay-at-b".into(), ..p };
    assert_eq!(validate(&b, replay).await, Outcome::Node(Verdict::Replayed));
    // A fresh OTP is accepted at B as soon as two of three hold it; the
    // third follows.
    assert_eq!(validate(&b, otp(5, 8, 0, "nonce-fresh-at-b", 0)).await, Outcome::Node(Verdict::Accepted { sl: 66 }));
    let fresh = Counters::new(8, 0).unwrap();
    let t = Instant::now();
    while a.store.get(key(5)) != Some(fresh) || w.store.get(key(5)) != Some(fresh) {
        assert!(t.elapsed() < Duration::from_secs(2), "the third node never got it");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    a.node.shutdown().await;
    b.node.shutdown().await;
    w.node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn garbage_and_foreign_requests_get_no_reply() {
    let pki = pki();
    let (a, b) = two_sites(&pki);
    // A raw transport client holding A's certificate (B authorizes it by
    // name) sends what the node cannot use.
    let raw = pki.endpoint(A, format!("{}:0", A.ip).parse().unwrap(), &[B]);
    let target = Peer::new(B.name, b.node.endpoint().local_addr().unwrap());
    let soon = || Instant::now() + Duration::from_secs(5);
    let reply = raw.request(&target, Bytes::from_static(b"\x01\x09junk"), soon()).await.unwrap();
    assert!(reply.is_empty());
    // A request claiming another origin than its sender.
    let forged = replication::quorum::Message::CasRequest {
        req_id: replication::quorum::RequestId(1),
        origin: W.id,
        proposal: otp(6, 1, 0, "n", 0),
    };
    let reply = raw.request(&target, wire::encode(&forged).unwrap(), soon()).await.unwrap();
    assert!(reply.is_empty());
    assert_eq!(b.store.get(key(6)), None);
    // A genuine request gets its durable reply.
    let genuine = replication::quorum::Message::CasRequest {
        req_id: replication::quorum::RequestId(2),
        origin: A.id,
        proposal: otp(6, 1, 0, "n", 0),
    };
    let reply = raw.request(&target, wire::encode(&genuine).unwrap(), soon()).await.unwrap();
    assert!(matches!(
        wire::decode(&reply).unwrap(),
        replication::quorum::Message::CasReply { outcome: replication::quorum::ReplyOutcome::Ack, .. }
    ));
    assert_eq!(b.store.get(key(6)), Some(Counters::new(1, 0).unwrap()));
    // The duplicate is answered from the machine's cache, at once.
    let reply2 = raw.request(&target, wire::encode(&genuine).unwrap(), soon()).await.unwrap();
    assert_eq!(reply, reply2);
    assert_eq!(b.node.metrics().bad_messages, 1);
    raw.close();
    a.node.shutdown().await;
    b.node.shutdown().await;
}

// ---------------------------------------------------------------------------
// Concurrency: the invariant under many submissions from several tasks.

#[derive(Clone, Debug)]
struct Record {
    site: &'static str,
    proposal: Proposal,
    started: Instant,
    answered: Instant,
    outcome: Outcome,
}

fn same_request(x: &Proposal, y: &Proposal) -> bool {
    x.counters == y.counters && x.nonce == y.nonce && x.otp_digest == y.otp_digest
}

/// No OTP value accepted twice (the same fanned-out request aside), and no
/// value accepted by a request that started after a higher or equal one
/// had been answered OK.
fn check(records: &[Record]) {
    let mut by_key: BTreeMap<PublicId, Vec<&Record>> = BTreeMap::new();
    for r in records.iter().filter(|r| is_ok(r.outcome)) {
        by_key.entry(r.proposal.public_id).or_default().push(r);
    }
    for accepted in by_key.values() {
        for (i, x) in accepted.iter().enumerate() {
            for y in &accepted[i + 1..] {
                if x.proposal.counters == y.proposal.counters {
                    assert!(same_request(&x.proposal, &y.proposal), "accepted twice: {x:?} and {y:?}");
                }
            }
            for y in accepted.iter() {
                if y.started > x.answered && !same_request(&x.proposal, &y.proposal) {
                    assert!(y.proposal.counters > x.proposal.counters, "{y:?} accepted after the higher or equal {x:?} was answered");
                }
            }
        }
    }
}

/// `tasks` tasks, each submitting `per_task` OTPs: a quarter fanned out to
/// both sites at once (same OTP, same nonce, as pam_yubico does), the rest
/// at one site picked at random. Counters follow the clock (one step every
/// 2 ms, with jitter), so that tasks collide on values while the keys keep
/// moving forward, and the nonce and OTP string vary, so that equal
/// counters are sometimes the same request and sometimes a replay.
async fn hammer(a: Arc<Site>, b: Arc<Site>, tasks: u64, per_task: u64) -> Vec<Record> {
    let mut set = tokio::task::JoinSet::new();
    for t in 0..tasks {
        let (a, b) = (a.clone(), b.clone());
        set.spawn(async move {
            let mut rng = Rng(0x5eed_0000 + t);
            let mut out = Vec::new();
            let epoch = Instant::now();
            for _ in 0..per_task {
                tokio::time::sleep(Duration::from_micros(rng.below(2000))).await;
                let key_no = 100 + rng.below(3);
                let counter = 1 + (epoch.elapsed().as_millis() / 2) as u16 + rng.below(2) as u16;
                let session_use = rng.below(3) as u8;
                let nonce = format!("nonce-{}", rng.below(3));
                let variant = rng.below(2) as u8;
                let p = otp(key_no, counter, session_use, &nonce, variant);
                let started = Instant::now();
                match rng.below(4) {
                    0 => {
                        let (va, vb) = tokio::join!(validate(&a, p.clone()), validate(&b, p.clone()));
                        let answered = Instant::now();
                        out.push(Record { site: "A", proposal: p.clone(), started, answered, outcome: va });
                        out.push(Record { site: "B", proposal: p, started, answered, outcome: vb });
                    }
                    n => {
                        let (name, site) = if n % 2 == 0 { ("A", &a) } else { ("B", &b) };
                        let outcome = validate(site, p.clone()).await;
                        out.push(Record { site: name, proposal: p, started, answered: Instant::now(), outcome });
                    }
                }
            }
            out
        });
    }
    let mut records = Vec::new();
    while let Some(joined) = set.join_next().await {
        records.extend(joined.unwrap());
    }
    records
}

fn summary(records: &[Record]) -> String {
    let ok = records.iter().filter(|r| is_ok(r.outcome)).count();
    let node_replayed = records.iter().filter(|r| r.outcome == Outcome::Node(Verdict::Replayed)).count();
    let local = records.iter().filter(|r| matches!(r.outcome, Outcome::Local(_))).count();
    let nea = records.iter().filter(|r| matches!(r.outcome, Outcome::Node(Verdict::NotEnoughAnswers { .. }))).count();
    let at_a = records.iter().filter(|r| r.site == "A" && is_ok(r.outcome)).count();
    format!(
        "{} submissions: {ok} OK ({at_a} at A), {node_replayed} refused by a peer, {local} refused locally, {nea} not enough answers",
        records.len()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_submissions_never_accept_a_value_twice() {
    // Two sites, write-all.
    let pki = pki();
    let (a, b) = two_sites(&pki);
    let records = hammer(Arc::new(a), Arc::new(b), 8, 60).await;
    println!("two sites: {}", summary(&records));
    check(&records);
    assert!(records.iter().any(|r| is_ok(r.outcome)));
    assert!(records.iter().all(|r| !matches!(r.outcome, Outcome::Node(Verdict::NotEnoughAnswers { .. }))));

    // Two sites and a witness, all up.
    let (_pki, a, b, _w) = pki_three();
    let records = hammer(a, b, 8, 60).await;
    println!("with a witness: {}", summary(&records));
    check(&records);
    assert!(records.iter().any(|r| is_ok(r.outcome)));
}

/// Two sites and a witness, all up.
fn pki_three() -> (Pki, Arc<Site>, Arc<Site>, Arc<Site>) {
    let pki = pki();
    let ea = pki.endpoint(A, format!("{}:0", A.ip).parse().unwrap(), &[B, W]);
    let eb = pki.endpoint(B, format!("{}:0", B.ip).parse().unwrap(), &[A, W]);
    let ew = pki.endpoint(W, format!("{}:0", W.ip).parse().unwrap(), &[A, B]);
    let (aa, ab, aw) = (ea.local_addr().unwrap(), eb.local_addr().unwrap(), ew.local_addr().unwrap());
    let a = start(A, ea, QuorumConfig::with_witness(B.id, W.id, DEADLINE), &[(B, ab), (W, aw)], Arc::default());
    let b = start(B, eb, QuorumConfig::with_witness(A.id, W.id, DEADLINE), &[(A, aa), (W, aw)], Arc::default());
    let w = start(W, ew, QuorumConfig::witness_of(A.id, B.id, DEADLINE), &[(A, aa), (B, ab)], Arc::default());
    (pki, Arc::new(a), Arc::new(b), Arc::new(w))
}

// ---------------------------------------------------------------------------
// Latency.

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_site_accept_latency_over_loopback() {
    let pki = pki();
    let (a, b) = two_sites(&pki);
    // Warm up: the connection is dialled on first use.
    assert!(is_ok(validate(&a, otp(7, 1, 0, "warm-up", 0)).await));
    let mut took = Vec::new();
    for i in 0..300u16 {
        let p = otp(7, 2 + i / 256, (i % 256) as u8, &format!("nonce-latency-{i}"), 0);
        assert!(a.store.local_cas(&p).is_ok());
        let t = Instant::now();
        let v = a.node.submit(p, None, None).await;
        took.push(t.elapsed());
        assert_eq!(v, Verdict::Accepted { sl: 100 });
    }
    took.sort();
    let pct = |q: usize| took[(took.len() - 1) * q / 100];
    println!(
        "two-site accept, extra latency over the local compare-and-set (loopback, in-memory store, {} builds): median {:?}, p90 {:?}, p99 {:?}, max {:?}",
        if cfg!(debug_assertions) { "debug" } else { "release" },
        pct(50),
        pct(90),
        pct(99),
        took[took.len() - 1]
    );
    let rtt = a.node.peers()[0].clone();
    println!("peer RPC: {} replies, mean {:?}", rtt.replies, rtt.rtt_total / u32::try_from(rtt.replies).unwrap());
    assert!(pct(50) < Duration::from_millis(50), "median {:?}", pct(50));
    a.node.shutdown().await;
    b.node.shutdown().await;
}

/// Requests queued while the driver is busy leave in batch frames, and
/// every one of them is decided as if sent alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_burst_of_submissions_travels_in_batches_and_all_are_accepted() {
    let pki = pki();
    let (a, b) = two_sites(&pki);
    // Warm the connection up first.
    assert!(is_ok(validate(&a, otp(1, 1, 0, "warm-up", 0)).await));
    let before = a.node.metrics();
    let proposals: Vec<Proposal> = (0..300).map(|i| otp(1000 + i, 5, 0, "burst", 0)).collect();
    for p in &proposals {
        a.store.local_cas(p).unwrap();
    }
    // All submitted before any is awaited: they queue up in the channel.
    let verdicts: Vec<_> = proposals.iter().map(|p| a.node.submit(p.clone(), None, None)).collect();
    for v in verdicts {
        assert!(matches!(v.await, Verdict::Accepted { .. }));
    }
    let after = a.node.metrics();
    let (sent, rpcs) = (after.requests_sent - before.requests_sent, after.request_rpcs - before.request_rpcs);
    println!("300 submissions: {sent} requests in {rpcs} RPCs");
    assert_eq!(sent, 300);
    assert!(rpcs < sent / 2, "hardly batched: {sent} requests in {rpcs} RPCs");
    // B holds every one: the same proposal again is the same request.
    let records = b.store.records.lock().unwrap();
    for p in &proposals {
        assert_eq!(peer_cas(records.get(&p.public_id), p), CasDecision::SameRequest);
    }
}
