//! The sync exchange between nodes over real QUIC on loopback (127.0.0.1
//! and 127.0.0.2): outbox pull, restart catch-up, anti-entropy, bootstrap,
//! store failures, a dataset one side lacks, duplicate delivery.
//!
//! The store is `MemSync`, written here: `key → u64` with the max rule, an
//! outbox with a sequence number per local change and an acknowledgement
//! per peer, a switch that makes every call fail, and writes that bypass
//! the outbox (to make divergences no outbox carries).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use replication::node::{DurableCas, Node, NodeConfig};
use replication::quorum::{PeerCasResult, Proposal, QuorumConfig, SiteId};
use replication::sync::{bucket_of, Changes, Dataset, Digest, Item, Merged, SyncError, SyncStore};
use replication::syncer::{SyncOptions, SyncSetup, SyncStatus};
use replication::transport::{Endpoint, Peer, Settings};
use replication::wire::{self, RefusalCode, SyncReply, SyncRequest};

// ---------------------------------------------------------------------------
// Sites, certificates, endpoints.

mod common;

use common::{pki, Pki, Spec, A, B};

impl Pki {
    /// The same address again after a shutdown: the old socket is released
    /// by the endpoint's driver task, shortly after the node stopped.
    async fn rebind(&self, spec: Spec, addr: SocketAddr, other: Spec) -> Endpoint {
        let end = Instant::now() + Duration::from_secs(5);
        loop {
            match self.try_endpoint(spec, addr, &[other]) {
                Ok(endpoint) => return endpoint,
                Err(e) if Instant::now() >= end => panic!("cannot bind {addr} again: {e}"),
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }
}

/// Never called: these tests submit nothing.
struct NoCas;

impl DurableCas for NoCas {
    fn peer_cas(&self, _origin: SiteId, _proposal: &Proposal) -> PeerCasResult {
        PeerCasResult::Failed
    }
}

fn options() -> SyncOptions {
    SyncOptions {
        pull_interval: Duration::from_millis(20),
        deadline: Duration::from_secs(3),
        max_backoff: Duration::from_millis(300),
        ..SyncOptions::default()
    }
}

/// A node of `spec` on `endpoint`, with `other` at `other_addr`, holding
/// `stores`.
fn node(
    spec: Spec,
    endpoint: Endpoint,
    other: Spec,
    other_addr: SocketAddr,
    stores: &[(Dataset, Arc<MemSync>)],
    options: SyncOptions,
) -> Node {
    let config = NodeConfig {
        site: spec.id,
        quorum: QuorumConfig::two_sites(other.id, Duration::from_millis(500)),
        peers: BTreeMap::from([(other.id, Peer::new(other.name, other_addr))]),
    };
    let stores = stores.iter().map(|(d, s)| (*d, s.clone() as Arc<dyn SyncStore>)).collect();
    Node::start_with(config, endpoint, Arc::new(NoCas), SyncSetup { stores, options }).unwrap()
}

/// Two nodes holding one dataset each, both up; returns B's address too.
fn pair(pki: &Pki, a: &Arc<MemSync>, b: &Arc<MemSync>, options: SyncOptions) -> (Node, Node, SocketAddr) {
    let ea = pki.endpoint(A, format!("{}:0", A.ip).parse().unwrap(), &[B]);
    let eb = pki.endpoint(B, format!("{}:0", B.ip).parse().unwrap(), &[A]);
    let (aa, ab) = (ea.local_addr().unwrap(), eb.local_addr().unwrap());
    let na = node(A, ea, B, ab, &[(Dataset::COUNTERS, a.clone())], options.clone());
    let nb = node(B, eb, A, aa, &[(Dataset::COUNTERS, b.clone())], options);
    (na, nb, ab)
}

fn status(node: &Node, dataset: Dataset) -> SyncStatus {
    node.sync_status().into_iter().find(|s| s.dataset == dataset).expect("a status for the dataset")
}

/// Polls `cond` every 10 ms until it holds or `timeout` passes.
async fn eventually(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Both at once: a node whose peer is gone waits for its connection to
/// drain.
async fn shutdown([a, b]: [Node; 2]) {
    tokio::join!(a.shutdown(), b.shutdown());
}

async fn timed<F: Future>(f: F) -> (F::Output, Duration) {
    let t = Instant::now();
    let out = f.await;
    (out, t.elapsed())
}

// ---------------------------------------------------------------------------
// The store.

#[derive(Default)]
struct MemInner {
    items: BTreeMap<Vec<u8>, u64>,
    /// (seq, key, value) of every local change and every merge that changed
    /// something, in order.
    outbox: Vec<(u64, Vec<u8>, u64)>,
    head: u64,
    acks: BTreeMap<String, u64>,
    /// The keys of each digest bucket (so that `bucket` hashes nothing).
    buckets: BTreeMap<u8, BTreeSet<Vec<u8>>>,
}

impl MemInner {
    /// The max rule; true if it changed the state.
    fn apply(&mut self, key: &[u8], value: u64, outbox: bool) -> bool {
        if self.items.get(key).is_some_and(|&v| v >= value) {
            return false;
        }
        if self.items.insert(key.to_vec(), value).is_none() {
            self.buckets.entry(bucket_of(key)).or_default().insert(key.to_vec());
        }
        if outbox {
            self.head += 1;
            let head = self.head;
            self.outbox.push((head, key.to_vec(), value));
        }
        true
    }
}

#[derive(Default)]
struct MemSync {
    inner: Mutex<MemInner>,
    fail: AtomicBool,
    /// Calls of `changes` (peers' pulls).
    pulls: AtomicU64,
}

fn key(n: u64) -> Vec<u8> {
    format!("key-{n:06}").into_bytes()
}

impl MemSync {
    fn lock(&self) -> std::sync::MutexGuard<'_, MemInner> {
        self.inner.lock().unwrap()
    }

    /// A local change, through the outbox.
    fn put(&self, n: u64, value: u64) {
        self.lock().apply(&key(n), value, true);
    }

    /// A write no outbox carries (a lost row, a bug, a store restored from
    /// a backup).
    fn put_silently(&self, n: u64, value: u64) {
        self.lock().apply(&key(n), value, false);
    }

    fn get(&self, n: u64) -> Option<u64> {
        self.lock().items.get(&key(n)).copied()
    }

    fn state(&self) -> BTreeMap<Vec<u8>, u64> {
        self.lock().items.clone()
    }

    fn len(&self) -> usize {
        self.lock().items.len()
    }

    fn head(&self) -> u64 {
        self.lock().head
    }

    fn ack(&self, peer: &str) -> Option<u64> {
        self.lock().acks.get(peer).copied()
    }

    /// Forgets `peer`'s acknowledgement, so that its next pull without a
    /// cursor gets the whole outbox again.
    fn forget_ack(&self, peer: &str) {
        self.lock().acks.remove(peer);
    }

    fn set_failing(&self, fail: bool) {
        self.fail.store(fail, Ordering::SeqCst);
    }

    fn check(&self) -> Result<(), SyncError> {
        if self.fail.load(Ordering::SeqCst) {
            Err(SyncError("injected fault".into()))
        } else {
            Ok(())
        }
    }
}

impl SyncStore for MemSync {
    fn changes(&self, peer: &str, after: Option<u64>, limit: usize) -> Result<Changes, SyncError> {
        self.pulls.fetch_add(1, Ordering::SeqCst);
        self.check()?;
        let mut inner = self.lock();
        let start = match after {
            Some(n) => {
                let ack = inner.acks.entry(peer.to_string()).or_insert(0);
                *ack = (*ack).max(n);
                n
            }
            None => inner.acks.get(peer).copied().unwrap_or(0),
        };
        let items: Vec<_> = inner.outbox.iter().filter(|(seq, _, _)| *seq > start).take(limit).cloned().collect();
        let last = items.last().map_or(start, |(seq, _, _)| *seq);
        let items = items.into_iter().map(|(_, key, value)| Item { key, value: value.to_be_bytes().to_vec() }).collect();
        Ok(Changes { items, last, head: inner.head })
    }

    fn digest(&self) -> Result<Digest, SyncError> {
        self.check()?;
        let mut d = Digest::default();
        for (k, v) in &self.lock().items {
            d.add(k, &v.to_be_bytes());
        }
        Ok(d)
    }

    fn bucket(&self, bucket: u8) -> Result<Vec<Item>, SyncError> {
        self.check()?;
        let inner = self.lock();
        let Some(keys) = inner.buckets.get(&bucket) else { return Ok(Vec::new()) };
        Ok(keys.iter().map(|k| Item { key: k.clone(), value: inner.items[k].to_be_bytes().to_vec() }).collect())
    }

    fn merge(&self, _peer: &str, items: &[Item]) -> Result<Merged, SyncError> {
        self.check()?;
        let mut values = Vec::with_capacity(items.len());
        for item in items {
            let bytes: [u8; 8] = item.value.as_slice().try_into().map_err(|_| SyncError("value is not a u64".into()))?;
            values.push((item.key.as_slice(), u64::from_be_bytes(bytes)));
        }
        let mut inner = self.lock();
        let mut merged = Merged::default();
        for (k, v) in values {
            if inner.apply(k, v, true) {
                merged.applied += 1;
            } else {
                merged.unchanged += 1;
            }
        }
        Ok(merged)
    }
}

// ---------------------------------------------------------------------------
// Scenarios.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_at_a_reach_b_by_pull() {
    let pki = pki();
    let (a, b) = (Arc::new(MemSync::default()), Arc::new(MemSync::default()));
    let (na, nb, _) = pair(&pki, &a, &b, options());
    // Both in step (the first pull and the start-up digest round done).
    assert!(eventually(Duration::from_secs(10), || status(&nb, Dataset::COUNTERS).digest_rounds >= 1).await);
    assert!(eventually(Duration::from_secs(10), || status(&na, Dataset::COUNTERS).digest_rounds >= 1).await);

    for n in 0..100 {
        a.put(n, n + 1);
    }
    b.put(1000, 7);
    let (ok, took) = timed(eventually(Duration::from_secs(10), || a.state() == b.state() && b.len() == 101)).await;
    assert!(ok, "A: {} items, B: {}", a.len(), b.len());
    println!("100 changes pulled in {took:?}");

    // The status follows each merge.
    assert!(eventually(Duration::from_secs(2), || status(&nb, Dataset::COUNTERS).applied == 100).await);
    let s = status(&nb, Dataset::COUNTERS);
    println!("{s:#?}");
    assert_eq!(s.peer, A.name);
    assert_eq!(s.site, A.id);
    // A's outbox also carries B's own change back once A merged it: an
    // echo that changes nothing.
    assert_eq!(s.applied, 100);
    assert!(s.items_pulled == 100 || (s.items_pulled == 101 && s.unchanged == 1), "{s:?}");
    assert_eq!(s.bucket_items, 0, "the outbox carried everything");
    assert_eq!(s.conflicts, 0);
    assert!(eventually(Duration::from_secs(2), || status(&nb, Dataset::COUNTERS).cursor == Some(a.head())).await);
    let s = status(&nb, Dataset::COUNTERS);
    assert_eq!(s.lag_changes, Some(0));
    assert_eq!(s.peer_head, Some(a.head()));
    assert!(s.caught_up_at.is_some() && s.last_pull.is_some());
    assert!(s.lag < Duration::from_secs(2), "{:?}", s.lag);
    assert!(s.last_error.is_none() && !s.unsupported);
    // B's own change went the other way, and A recorded B's
    // acknowledgement of its whole outbox.
    assert_eq!(a.get(1000), Some(7));
    assert!(eventually(Duration::from_secs(2), || a.ack(B.name) == Some(a.head())).await);

    // One more change arrives within a few pull intervals.
    a.put(5, 1_000);
    let (ok, took) = timed(eventually(Duration::from_secs(5), || b.get(5) == Some(1_000))).await;
    assert!(ok);
    assert!(took < Duration::from_secs(1), "{took:?}");
    shutdown([na, nb]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_site_catches_up_on_ten_thousand_changes() {
    let pki = pki();
    let (a, b) = (Arc::new(MemSync::default()), Arc::new(MemSync::default()));
    let (na, nb, b_addr) = pair(&pki, &a, &b, options());
    let a_addr = na.endpoint().local_addr().unwrap();
    for n in 0..10 {
        a.put(n, 1);
    }
    assert!(eventually(Duration::from_secs(10), || b.len() == 10 && a.ack(B.name) == Some(10)).await);

    nb.shutdown().await;
    // B's pullers stopped with it.
    let pulls = a.pulls.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(a.pulls.load(Ordering::SeqCst), pulls);
    for n in 0..10_000 {
        a.put(n, 2);
    }
    assert_eq!(a.head(), 10_010);
    assert_eq!(a.ack(B.name), Some(10), "B acknowledged nothing while down");

    // B comes back at the same address with its store; its cursor starts
    // from the acknowledgement A recorded.
    let eb = pki.rebind(B, b_addr, A).await;
    let nb = node(B, eb, A, a_addr, &[(Dataset::COUNTERS, b.clone())], options());
    let (ok, took) = timed(eventually(Duration::from_secs(20), || a.state() == b.state())).await;
    assert!(ok, "B holds {} of {} items", b.len(), a.len());
    println!("10,000 changes caught up in {took:?}");
    assert!(eventually(Duration::from_secs(5), || a.ack(B.name) == Some(a.head())).await, "A's ack for B: {:?}", a.ack(B.name));
    assert!(eventually(Duration::from_secs(5), || status(&nb, Dataset::COUNTERS).digest_rounds >= 1).await);
    let s = status(&nb, Dataset::COUNTERS);
    println!("{s:#?}");
    assert_eq!(s.items_pulled, 10_000, "exactly the backlog after the recorded ack");
    assert_eq!(s.applied, 10_000);
    assert!(s.pulls >= 5, "pages of at most 2,000: {}", s.pulls);
    assert_eq!(s.cursor, Some(10_010));
    assert_eq!(s.lag_changes, Some(0));
    // The outbox went first: the digest round after it found nothing.
    assert_eq!(s.buckets_differing, 0);
    assert_eq!(s.bucket_items, 0);
    shutdown([na, nb]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anti_entropy_repairs_what_no_outbox_carries() {
    let pki = pki();
    let (a, b) = (Arc::new(MemSync::default()), Arc::new(MemSync::default()));
    let options = SyncOptions { digest_interval: Duration::from_millis(200), ..options() };
    let (na, nb, _) = pair(&pki, &a, &b, options);
    for n in 0..50 {
        a.put(n, 10);
    }
    assert!(eventually(Duration::from_secs(10), || b.len() == 50).await);

    // Divergences behind the outboxes' backs, both ways.
    b.put_silently(7, 99); // newer at B
    b.put_silently(500, 1); // only at B
    a.put_silently(600, 2); // only at A
    a.put_silently(8, 50); // newer at A
    assert_ne!(a.state(), b.state());
    let (ok, took) = timed(eventually(Duration::from_secs(10), || a.state() == b.state())).await;
    assert!(ok, "A: {:?} B: {:?}", a.get(7), b.get(8));
    println!("repaired by anti-entropy in {took:?}");
    assert_eq!((a.get(7), a.get(500), a.get(600), a.get(8)), (Some(99), Some(1), Some(2), Some(50)));
    // Each side took the other's two values from whole buckets (no outbox
    // row carries them). The status is updated right after the merge.
    for (node, site) in [(&na, "A"), (&nb, "B")] {
        let repaired = |s: &SyncStatus| s.buckets_differing >= 1 && s.bucket_items >= 2 && s.digest_rounds >= 1;
        assert!(eventually(Duration::from_secs(2), || repaired(&status(node, Dataset::COUNTERS))).await, "{site}");
        let s = status(node, Dataset::COUNTERS);
        println!("{site}: {s:#?}");
        assert_eq!(s.conflicts, 0);
        assert!(s.last_error.is_none());
    }
    shutdown([na, nb]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_site_bootstraps_from_digest_and_buckets() {
    let pki = pki();
    let a = Arc::new(MemSync::default());
    // Written before any peer existed: no outbox rows.
    for n in 0..5_000 {
        a.put_silently(n, n * 3);
    }
    assert_eq!(a.head(), 0);
    let b = Arc::new(MemSync::default());
    let (na, nb, _) = pair(&pki, &a, &b, options());
    let (ok, took) = timed(eventually(Duration::from_secs(20), || a.state() == b.state())).await;
    assert!(ok, "B holds {} of 5,000", b.len());
    println!("5,000 items bootstrapped in {took:?}");
    let non_empty = a.digest().unwrap().buckets().iter().filter(|b| **b != [0; 32]).count() as u64;
    assert!(eventually(Duration::from_secs(2), || status(&nb, Dataset::COUNTERS).digest_rounds >= 1).await);
    let s = status(&nb, Dataset::COUNTERS);
    println!("{s:#?}");
    assert_eq!(s.items_pulled, 0, "nothing came through the outbox");
    assert_eq!(s.bucket_items, 5_000);
    assert_eq!(s.applied, 5_000);
    assert_eq!(s.buckets_differing, non_empty);
    assert!(s.digest_rounds >= 1);
    shutdown([na, nb]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merge_failure_keeps_the_cursor_and_recovers() {
    let pki = pki();
    let (a, b) = (Arc::new(MemSync::default()), Arc::new(MemSync::default()));
    let (na, nb, _) = pair(&pki, &a, &b, options());
    a.put(0, 1);
    assert!(eventually(Duration::from_secs(10), || status(&nb, Dataset::COUNTERS).cursor == Some(1)).await);
    assert!(eventually(Duration::from_secs(2), || a.ack(B.name) == Some(1)).await);

    b.set_failing(true);
    for n in 1..=300 {
        a.put(n, 5);
    }
    assert!(eventually(Duration::from_secs(10), || status(&nb, Dataset::COUNTERS).errors >= 3).await);
    let s = status(&nb, Dataset::COUNTERS);
    println!("{s:#?}");
    assert!(s.last_error.as_deref().is_some_and(|e| e.contains("injected fault")), "{:?}", s.last_error);
    assert_eq!(s.cursor, Some(1), "a failed merge does not move the cursor");
    assert_eq!(s.applied, 1);
    assert_eq!(a.ack(B.name), Some(1), "nor acknowledge anything to A");
    assert_eq!(b.len(), 1);

    b.set_failing(false);
    let (ok, took) = timed(eventually(Duration::from_secs(10), || a.state() == b.state())).await;
    assert!(ok, "B holds {} of {}", b.len(), a.len());
    println!("recovered in {took:?}");
    assert!(eventually(Duration::from_secs(5), || a.ack(B.name) == Some(301)).await);
    let s = status(&nb, Dataset::COUNTERS);
    assert_eq!(s.cursor, Some(301));
    assert_eq!(s.applied, 301, "every item, once");
    assert_eq!(s.conflicts, 0);
    shutdown([na, nb]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dataset_missing_at_the_peer_is_reported_and_others_still_sync() {
    let pki = pki();
    let (a_counters, a_aeads, b_counters) = (Arc::new(MemSync::default()), Arc::new(MemSync::default()), Arc::new(MemSync::default()));
    let ea = pki.endpoint(A, format!("{}:0", A.ip).parse().unwrap(), &[B]);
    let eb = pki.endpoint(B, format!("{}:0", B.ip).parse().unwrap(), &[A]);
    let (aa, ab) = (ea.local_addr().unwrap(), eb.local_addr().unwrap());
    // A is a full site, B holds counters only (a witness).
    let na = node(A, ea, B, ab, &[(Dataset::COUNTERS, a_counters.clone()), (Dataset::AEADS, a_aeads.clone())], options());
    let nb = node(B, eb, A, aa, &[(Dataset::COUNTERS, b_counters.clone())], options());
    for n in 0..20 {
        a_counters.put(n, 1);
        b_counters.put(100 + n, 2);
        a_aeads.put(n, 3);
    }
    assert!(eventually(Duration::from_secs(10), || a_counters.len() == 40 && a_counters.state() == b_counters.state()).await);
    assert!(eventually(Duration::from_secs(5), || status(&na, Dataset::AEADS).unsupported).await);
    let aeads = status(&na, Dataset::AEADS);
    println!("{aeads:#?}");
    assert!(aeads.last_error.as_deref().is_some_and(|e| e.contains("unknown dataset")), "{:?}", aeads.last_error);
    assert_eq!(aeads.pulls, 0);
    // Not asked again (the pull interval is 20 ms), except once more when
    // B is first seen up (by any of the pairs' requests).
    tokio::time::sleep(Duration::from_millis(200)).await;
    let errors = status(&na, Dataset::AEADS).errors;
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(status(&na, Dataset::AEADS).errors, errors);
    assert!(errors <= 2, "{errors}");
    // The counters pair is unaffected; B pulls only what it holds.
    assert!(eventually(Duration::from_secs(2), || status(&na, Dataset::COUNTERS).applied == 20).await);
    let counters = status(&na, Dataset::COUNTERS);
    assert!(counters.last_error.is_none() && !counters.unsupported);
    assert!(eventually(Duration::from_secs(2), || nb.sync_status().iter().any(|s| s.applied == 20)).await);
    let at_b = nb.sync_status();
    assert_eq!(at_b.len(), 1);
    assert_eq!(at_b[0].dataset, Dataset::COUNTERS);
    assert_eq!(a_aeads.ack(B.name), None, "B never asked for AEADs");
    shutdown([na, nb]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_and_stale_pages_are_harmless() {
    let pki = pki();
    let (a, b) = (Arc::new(MemSync::default()), Arc::new(MemSync::default()));
    let (na, nb, b_addr) = pair(&pki, &a, &b, options());
    let a_addr = na.endpoint().local_addr().unwrap();
    for n in 0..500 {
        a.put(n, 4);
    }
    assert!(eventually(Duration::from_secs(10), || b.len() == 500 && a.ack(B.name) == Some(500)).await);
    nb.shutdown().await;

    // B moved past A on ten keys; A lost B's acknowledgement, so the whole
    // outbox comes again: every page a duplicate, and older than B's state
    // on those keys.
    for n in 0..10 {
        b.put_silently(n, 40);
    }
    a.forget_ack(B.name);
    let before = b.state();
    let eb = pki.rebind(B, b_addr, A).await;
    let nb = node(B, eb, A, a_addr, &[(Dataset::COUNTERS, b.clone())], options());
    assert!(eventually(Duration::from_secs(10), || status(&nb, Dataset::COUNTERS).cursor == Some(500)).await);
    let s = status(&nb, Dataset::COUNTERS);
    println!("{s:#?}");
    assert_eq!(s.items_pulled, 500, "the outbox again");
    assert_eq!(s.applied, 0, "nothing changed");
    assert!(s.unchanged >= 500);
    assert_eq!(b.state(), before);
    assert_eq!(b.get(3), Some(40));
    // A learns B's newer values by anti-entropy (B came back up).
    assert!(eventually(Duration::from_secs(10), || a.state() == b.state()).await);
    assert_eq!(a.get(3), Some(40));
    shutdown([na, nb]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_requests_are_served_and_bad_ones_refused() {
    let pki = pki();
    let b = Arc::new(MemSync::default());
    for n in 0..10 {
        b.put(n, 9);
    }
    // B alone (A's address is dead); a raw transport client with A's
    // certificate asks B directly.
    let dead = std::net::UdpSocket::bind(format!("{}:0", A.ip)).unwrap().local_addr().unwrap();
    let eb = pki.endpoint(B, format!("{}:0", B.ip).parse().unwrap(), &[A]);
    let nb = node(B, eb, A, dead, &[(Dataset::COUNTERS, b.clone())], SyncOptions { deadline: Duration::from_millis(300), ..options() });
    let raw = pki.endpoint(A, format!("{}:0", A.ip).parse().unwrap(), &[B]);
    let target = Peer::new(B.name, nb.endpoint().local_addr().unwrap());
    let ask = |frame: bytes::Bytes| {
        let (raw, target) = (raw.clone(), target.clone());
        async move { raw.request(&target, frame, Instant::now() + Duration::from_secs(5)).await.unwrap() }
    };
    let changes = |reply: &[u8]| match wire::decode_sync_reply(reply).unwrap() {
        SyncReply::Changes(c) => c,
        other => panic!("not a page: {other:?}"),
    };

    // The same page twice: the same bytes, and the acknowledgement does not
    // move backwards.
    let pull = SyncRequest::Pull { dataset: Dataset::COUNTERS, after: Some(0), limit: 4 };
    let first = ask(wire::encode_sync_request(&pull)).await;
    let again = ask(wire::encode_sync_request(&pull)).await;
    assert_eq!(first, again);
    let page = changes(&first);
    assert_eq!((page.items.len(), page.last, page.head), (4, 4, 10));
    assert_eq!(page.items[0].key, key(0));
    assert_eq!(b.ack(A.name), Some(0));
    let rest =
        changes(&ask(wire::encode_sync_request(&SyncRequest::Pull { dataset: Dataset::COUNTERS, after: Some(4), limit: 100 })).await);
    assert_eq!((rest.items.len(), rest.last, rest.head), (6, 10, 10));
    assert_eq!(b.ack(A.name), Some(4));
    // No cursor: from the recorded acknowledgement.
    let resumed =
        changes(&ask(wire::encode_sync_request(&SyncRequest::Pull { dataset: Dataset::COUNTERS, after: None, limit: 100 })).await);
    assert_eq!(resumed, rest);

    // Digest and bucket.
    match wire::decode_sync_reply(&ask(wire::encode_sync_request(&SyncRequest::Digest { dataset: Dataset::COUNTERS })).await).unwrap() {
        SyncReply::Digest(d) => assert_eq!(d, b.digest().unwrap()),
        other => panic!("not a digest: {other:?}"),
    }
    let bucket = bucket_of(&key(3));
    match wire::decode_sync_reply(&ask(wire::encode_sync_request(&SyncRequest::Bucket { dataset: Dataset::COUNTERS, bucket })).await)
        .unwrap()
    {
        SyncReply::Items(items) => {
            assert!(items.iter().any(|i| i.key == key(3) && i.value == 9u64.to_be_bytes()));
            assert!(items.iter().all(|i| bucket_of(&i.key) == bucket));
        }
        other => panic!("not items: {other:?}"),
    }

    // Refusals, each with its code and a reason.
    let refusal = |reply: &[u8]| match wire::decode_sync_reply(reply).unwrap() {
        SyncReply::Refused { code, reason } => (code, reason),
        other => panic!("not a refusal: {other:?}"),
    };
    let (code, _) = refusal(&ask(wire::encode_sync_request(&SyncRequest::Digest { dataset: Dataset::AEADS })).await);
    assert_eq!(code, RefusalCode::UnknownDataset);
    let (code, _) = refusal(&ask(bytes::Bytes::from_static(&[0x01, 0x10, 0x01])).await);
    assert_eq!(code, RefusalCode::BadRequest);
    assert_eq!(nb.metrics().bad_messages, 1);
    b.set_failing(true);
    let (code, reason) = refusal(&ask(wire::encode_sync_request(&pull)).await);
    assert_eq!((code, reason.as_str()), (RefusalCode::StoreFailure, "injected fault"));
    b.set_failing(false);
    // B's own puller for the dead A reports it.
    assert!(eventually(Duration::from_secs(5), || status(&nb, Dataset::COUNTERS).errors >= 1).await);
    assert!(status(&nb, Dataset::COUNTERS).last_error.is_some());
    raw.close();
    nb.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_too_large_for_a_frame_are_asked_again_smaller() {
    let pki = pki();
    let (a, b) = (Arc::new(MemSync::default()), Arc::new(MemSync::default()));
    for n in 0..1_000 {
        a.put(n, 1);
    }
    // 21 bytes an item: a page of 2,000, 1,000 or 500 items is over the
    // frame, 250 fit (and so does the 8 KiB digest).
    let settings = Settings { max_frame: 9_000, ..Settings::default() };
    let ea = pki.endpoint_with(A, format!("{}:0", A.ip).parse().unwrap(), &[B], settings.clone()).unwrap();
    let eb = pki.endpoint_with(B, format!("{}:0", B.ip).parse().unwrap(), &[A], settings).unwrap();
    let (aa, ab) = (ea.local_addr().unwrap(), eb.local_addr().unwrap());
    let na = node(A, ea, B, ab, &[(Dataset::COUNTERS, a.clone())], options());
    let nb = node(B, eb, A, aa, &[(Dataset::COUNTERS, b.clone())], options());
    assert!(eventually(Duration::from_secs(10), || a.state() == b.state()).await, "B holds {}", b.len());
    assert!(eventually(Duration::from_secs(5), || status(&nb, Dataset::COUNTERS).digest_rounds >= 1).await);
    let s = status(&nb, Dataset::COUNTERS);
    println!("{s:#?}");
    assert_eq!(s.errors, 3, "2,000, 1,000 and 500 refused");
    assert!(s.last_error.as_deref().is_some_and(|e| e.contains("reply too large")), "{:?}", s.last_error);
    assert_eq!(s.items_pulled, 1_000);
    assert!(s.pulls >= 4, "pages of 250: {}", s.pulls);
    assert_eq!(s.page_limit, 250);
    assert_eq!(s.bucket_items, 0);
    shutdown([na, nb]).await;
}
