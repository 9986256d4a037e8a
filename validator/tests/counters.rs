//! The SQLite counter store: atomic compare-and-set under concurrency, group
//! commit, durability across reopen and `kill -9`.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::{BTreeMap, HashSet};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use otp::{Counters, PublicId};
use replication::node::DurableCas;
use replication::quorum::{self, OtpDigest, PeerCasResult, Proposal, SiteId};
use validator::counters::{CounterOptions, MergeCounts, OutboxRow, SqliteCounters, Synchronous};
use validator::{CasOutcome, CounterStore, CounterUpdate};

fn id(n: u64) -> PublicId {
    PublicId::from_number(n, 6).unwrap()
}

fn ctr(c: u16, u: u8) -> Counters {
    Counters::new(c, u).unwrap()
}

fn update(public_id: PublicId, counters: Counters, nonce: &str) -> CounterUpdate {
    CounterUpdate {
        public_id,
        counters,
        timestamp_high: 0x12,
        timestamp_low: 0x3456,
        nonce: nonce.to_owned(),
        otp_digest: digest(nonce),
        now: 1_700_000_000,
    }
}

/// A stand-in OTP digest derived from a label (tests need only distinct
/// values).
fn digest(label: &str) -> [u8; 32] {
    let mut d = [0u8; 32];
    for (i, b) in label.bytes().enumerate() {
        d[i % 32] ^= b.wrapping_add(i as u8);
    }
    d[31] ^= 0x5a;
    d
}

/// Ticket `n` of a YubiKey's sequence: (n / 256, n % 256).
fn ticket(n: u32) -> Counters {
    ctr(u16::try_from(n / 256).unwrap(), (n % 256) as u8)
}

fn open(path: &Path, synchronous: Synchronous) -> SqliteCounters {
    SqliteCounters::open_with(path, CounterOptions { synchronous, ..CounterOptions::default() }).unwrap()
}

#[test]
fn accepts_only_strictly_greater_and_tells_replays_apart() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteCounters::open(&dir.path().join("v.db")).unwrap();
    use CasOutcome::*;
    let cas = |c, u, nonce| store.compare_and_set(&update(id(1), ctr(c, u), nonce)).unwrap();
    assert_eq!(cas(5, 5, "nonce-aaaaaaaaaaaa"), Accepted, "a new YubiKey");
    assert_eq!(cas(5, 5, "nonce-aaaaaaaaaaaa"), ReplayedRequest, "same counters, same nonce");
    assert_eq!(cas(5, 5, "nonce-bbbbbbbbbbbb"), ReplayedOtp, "same counters, other nonce");
    assert_eq!(cas(5, 4, "nonce-aaaaaaaaaaaa"), ReplayedOtp, "lower use, even with the stored nonce");
    assert_eq!(cas(4, 255, "nonce-cccccccccccc"), ReplayedOtp, "lower counter");
    assert_eq!(cas(5, 6, "nonce-dddddddddddd"), Accepted, "next use");
    assert_eq!(cas(6, 0, "nonce-eeeeeeeeeeee"), Accepted, "next power-up");
    assert_eq!(cas(5, 200, "nonce-ffffffffffff"), ReplayedOtp, "a higher use does not beat a higher counter");
    let stored = store.get(&id(1)).unwrap().unwrap();
    assert_eq!(stored.counters, ctr(6, 0));
    assert_eq!(stored.nonce, "nonce-eeeeeeeeeeee");
    assert_eq!(
        (stored.timestamp_high, stored.timestamp_low, stored.modified, stored.created),
        (0x12, 0x3456, 1_700_000_000, 1_700_000_000)
    );
    assert_eq!(store.get(&id(2)).unwrap(), None);
    // The counter (0, 0) is a valid first value.
    assert_eq!(store.compare_and_set(&update(id(2), ctr(0, 0), "n")).unwrap(), Accepted);
    assert_eq!(store.count().unwrap(), 2);
    store.check().unwrap();
    let st = store.stats();
    assert_eq!((st.accepted, st.replayed_request, st.replayed_otp, st.failed_updates), (4, 1, 4, 0));
}

#[test]
fn sixty_four_copies_of_one_otp_give_exactly_one_accept() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SqliteCounters::open(&dir.path().join("v.db")).unwrap());
    for (round, distinct_nonces) in [(1u16, false), (2, true), (3, true)] {
        let barrier = Arc::new(Barrier::new(64));
        let threads: Vec<_> = (0..64)
            .map(|t| {
                let (store, barrier) = (store.clone(), barrier.clone());
                // Round 1: one request 64 times. Rounds 2-3: one OTP sent with
                // two nonces (as to two servers), or 64 different nonces.
                let nonce = match (distinct_nonces, round) {
                    (false, _) => "same-nonce-0000000".to_owned(),
                    (true, 2) => format!("two-nonces-{:07}", t % 2),
                    _ => format!("many-nonces-{t:06}"),
                };
                std::thread::spawn(move || {
                    let u = update(id(7), ctr(round, 1), &nonce);
                    barrier.wait();
                    (nonce, store.compare_and_set(&u).unwrap())
                })
            })
            .collect();
        let results: Vec<(String, CasOutcome)> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        let winners: Vec<&String> = results.iter().filter(|(_, o)| *o == CasOutcome::Accepted).map(|(n, _)| n).collect();
        assert_eq!(winners.len(), 1, "round {round}: exactly one accept, got {results:?}");
        let winner = winners[0];
        for (nonce, outcome) in &results {
            if nonce == winner && outcome != &CasOutcome::Accepted {
                assert_eq!(*outcome, CasOutcome::ReplayedRequest, "round {round}: the winner's nonce again");
            } else if nonce != winner {
                assert_eq!(*outcome, CasOutcome::ReplayedOtp, "round {round}: another nonce");
            }
        }
        assert_eq!(store.get(&id(7)).unwrap().unwrap().nonce, *winner);
    }
    let st = store.stats();
    println!("64 copies x 3 rounds: {} transactions, mean batch {:.1}, max {}", st.batches, st.mean_batch(), st.max_batch);
}

#[test]
fn interleaved_updates_of_one_key_only_ever_increase() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SqliteCounters::open(&dir.path().join("v.db")).unwrap());
    let key = id(42);
    let next = Arc::new(AtomicU32::new(1));
    // The highest value any thread has seen accepted so far: a value not
    // above it, sent afterwards, must be refused.
    let floor = Arc::new(Mutex::new(Counters::new(0, 0).unwrap()));
    let accepted = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(AtomicBool::new(false));
    // A reader polling the committed value: it must never decrease.
    let monitor = {
        let (store, stop) = (store.clone(), stop.clone());
        std::thread::spawn(move || {
            let (mut last, mut reads) = (None, 0u32);
            while !stop.load(Ordering::Relaxed) {
                if let Some(s) = store.get(&key).unwrap() {
                    assert!(last.is_none_or(|l| s.counters >= l), "went backwards: {last:?} then {:?}", s.counters);
                    last = Some(s.counters);
                    reads += 1;
                }
            }
            reads
        })
    };
    let threads: Vec<_> = (0..16u32)
        .map(|t| {
            let (store, next, floor, accepted) = (store.clone(), next.clone(), floor.clone(), accepted.clone());
            std::thread::spawn(move || {
                let mut sent = 0u32;
                for i in 0..150u32 {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    // Every fifth send replays an older value on purpose.
                    let n = if i % 5 == 4 { n.saturating_sub(3 + t % 7) } else { n };
                    let value = ticket(n);
                    let before = *floor.lock().unwrap();
                    let outcome = store.compare_and_set(&update(key, value, &format!("t{t}-i{i}-nonce-xxxx"))).unwrap();
                    sent = sent.max(n);
                    if value <= before {
                        assert_ne!(outcome, CasOutcome::Accepted, "{value:?} accepted after {before:?} had been acknowledged");
                    }
                    if outcome == CasOutcome::Accepted {
                        let mut f = floor.lock().unwrap();
                        *f = (*f).max(value);
                        accepted.lock().unwrap().push(value);
                    }
                }
                sent
            })
        })
        .collect();
    let max_sent = threads.into_iter().map(|t| t.join().unwrap()).max().unwrap();
    stop.store(true, Ordering::Relaxed);
    let reads = monitor.join().unwrap();
    let accepted = accepted.lock().unwrap();
    let distinct: HashSet<_> = accepted.iter().collect();
    assert_eq!(distinct.len(), accepted.len(), "a value was accepted twice");
    assert_eq!(store.get(&key).unwrap().unwrap().counters, ticket(max_sent), "the final value is the largest sent");
    let st = store.stats();
    println!(
        "interleaved: {} accepted of {}, {} monitor reads, {} transactions, mean batch {:.2}",
        accepted.len(),
        16 * 150,
        reads,
        st.batches,
        st.mean_batch()
    );
}

#[test]
fn a_batch_with_duplicates_is_decided_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteCounters::open(&dir.path().join("v.db")).unwrap();
    use CasOutcome::*;
    let (a, b) = (id(1), id(2));
    let batch = [
        update(a, ctr(1, 1), "n1"),
        update(a, ctr(1, 1), "n1"),
        update(a, ctr(1, 1), "n2"),
        update(b, ctr(3, 0), "n3"),
        update(a, ctr(1, 0), "n4"),
        update(a, ctr(1, 2), "n5"),
        update(b, ctr(3, 0), "n3"),
        update(a, ctr(1, 1), "n1"),
        update(a, ctr(2, 0), "n6"),
    ];
    let outcomes = store.compare_and_set_many(&batch).unwrap();
    assert_eq!(outcomes, [Accepted, ReplayedRequest, ReplayedOtp, Accepted, ReplayedOtp, Accepted, ReplayedRequest, ReplayedOtp, Accepted]);
    assert_eq!(store.stats().batches, 1, "one transaction");
    assert_eq!(store.get(&a).unwrap().unwrap().counters, ctr(2, 0));
    assert_eq!(store.get(&b).unwrap().unwrap().counters, ctr(3, 0));
    // The same batch again: everything is a replay now.
    let again = store.compare_and_set_many(&batch).unwrap();
    assert!(again.iter().all(|o| *o != Accepted), "{again:?}");
    assert_eq!(again[8], ReplayedRequest);
    assert!(store.compare_and_set_many(&[]).unwrap().is_empty());
}

#[test]
fn state_survives_reopen_and_the_file_is_private() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v.db");
    {
        let store = SqliteCounters::open(&path).unwrap();
        for n in 1..=100u32 {
            assert_eq!(store.compare_and_set(&update(id(u64::from(n % 10)), ticket(n), "nonce-1234567890")).unwrap(), CasOutcome::Accepted);
        }
    }
    assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    let store = SqliteCounters::open(&path).unwrap();
    assert_eq!(store.count().unwrap(), 10);
    for k in 0..10u64 {
        let last = (90..=100u32).filter(|n| u64::from(n % 10) == k).max().unwrap();
        assert_eq!(store.get(&id(k)).unwrap().unwrap().counters, ticket(last));
        assert_eq!(store.compare_and_set(&update(id(k), ticket(last), "nonce-1234567890")).unwrap(), CasOutcome::ReplayedRequest);
        assert_eq!(store.compare_and_set(&update(id(k), ticket(last - 5), "other-nonce-0000")).unwrap(), CasOutcome::ReplayedOtp);
    }
}

#[test]
fn a_failed_transaction_answers_every_caller_and_accepts_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v.db");
    let store = Arc::new(
        SqliteCounters::open_with(&path, CounterOptions { busy_timeout: Duration::from_millis(200), ..CounterOptions::default() }).unwrap(),
    );
    assert_eq!(store.compare_and_set(&update(id(1), ctr(1, 0), "n")).unwrap(), CasOutcome::Accepted);
    // Another process holds the write lock longer than the busy timeout.
    let other = rusqlite::Connection::open(&path).unwrap();
    other.execute_batch("BEGIN IMMEDIATE").unwrap();
    let threads: Vec<_> = (0..8u64)
        .map(|t| {
            let store = store.clone();
            std::thread::spawn(move || store.compare_and_set(&update(id(10 + t), ctr(1, 0), "n")))
        })
        .collect();
    for t in threads {
        let e = t.join().unwrap().unwrap_err();
        assert!(e.0.contains("counter store"), "{e}");
    }
    assert!(store.check().is_err() || store.stats().failed_batches > 0);
    other.execute_batch("ROLLBACK").unwrap();
    let st = store.stats();
    assert!(st.failed_batches >= 1 && st.failed_updates == 8, "{st:?}");
    for t in 0..8 {
        assert_eq!(store.get(&id(10 + t)).unwrap(), None, "nothing of a failed batch is stored");
    }
    // It recovers: the same updates are accepted now (they never were).
    for t in 0..8 {
        assert_eq!(store.compare_and_set(&update(id(10 + t), ctr(1, 0), "n")).unwrap(), CasOutcome::Accepted);
    }
    store.check().unwrap();
}

#[test]
fn group_commit_batches_concurrent_callers() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SqliteCounters::open(&dir.path().join("v.db")).unwrap());
    let barrier = Arc::new(Barrier::new(32));
    let started = Instant::now();
    let threads: Vec<_> = (0..32u64)
        .map(|t| {
            let (store, barrier) = (store.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                for n in 1..=100u32 {
                    assert_eq!(store.compare_and_set(&update(id(t), ticket(n), "nonce-0123456789")).unwrap(), CasOutcome::Accepted);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let elapsed = started.elapsed();
    let st = store.stats();
    println!(
        "group commit, 32 callers x 100 updates (FULL): {} transactions, mean batch {:.1}, max {}, {:.0} updates/s",
        st.batches,
        st.mean_batch(),
        st.max_batch,
        3200.0 / elapsed.as_secs_f64()
    );
    assert_eq!(st.updates, 3200);
    assert!(st.mean_batch() > 1.0, "no batching: {st:?}");
    let mut metrics = String::new();
    store.render_metrics(&mut metrics);
    assert!(metrics.contains(&format!("validator_counter_batches_total {}\n", st.batches)), "{metrics}");
    assert!(metrics.contains("validator_counter_updates_total{outcome=\"accepted\"} 3200\n"), "{metrics}");
    assert!(metrics.contains("validator_counter_batch_size_bucket{le=\"+Inf\"}"), "{metrics}");
    assert!(metrics.contains("validator_counter_commit_seconds_count"), "{metrics}");
    assert!(metrics.contains("validator_counter_synchronous{mode=\"full\"} 1\n"), "{metrics}");
}

// ------------------------------------------------------ replication side

fn proposal(public_id: PublicId, counters: Counters, nonce: &str, otp_digest: [u8; 32]) -> Proposal {
    Proposal { public_id, counters, nonce: nonce.to_owned(), otp_digest: OtpDigest(otp_digest) }
}

/// A small deterministic generator (xorshift64*), so failures replay.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Rows of the outbox, all of them.
fn outbox(store: &SqliteCounters) -> Vec<OutboxRow> {
    store.outbox_after(0, usize::MAX).unwrap()
}

#[test]
fn peer_compare_and_set_follows_the_quorum_rule() {
    use PeerCasResult::*;
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteCounters::open(&dir.path().join("v.db")).unwrap();
    let (a, da, db) = (id(1), digest("otp-a"), digest("otp-b"));
    let peer = |c, u, nonce, d| store.peer_compare_and_set(&proposal(a, ctr(c, u), nonce, d)).unwrap();
    assert_eq!(peer(3, 1, "nonce-1", da), Stored, "a new YubiKey");
    let stored = store.get(&a).unwrap().unwrap();
    assert_eq!((stored.counters, stored.nonce.as_str(), stored.otp_digest), (ctr(3, 1), "nonce-1", da));
    assert_eq!((stored.timestamp_high, stored.timestamp_low), (0, 0), "a peer's OTP timestamp is not replicated");
    assert_eq!(peer(3, 1, "nonce-1", da), SameRequest, "equal counters, same nonce and digest");
    assert_eq!(peer(3, 1, "nonce-2", da), Stale { stored: ctr(3, 1) }, "equal counters, another nonce");
    assert_eq!(peer(3, 1, "nonce-1", db), Stale { stored: ctr(3, 1) }, "equal counters, same nonce, another OTP");
    assert_eq!(peer(3, 0, "nonce-1", da), Stale { stored: ctr(3, 1) }, "lower use");
    assert_eq!(peer(2, 200, "nonce-3", db), Stale { stored: ctr(3, 1) }, "lower counter");
    assert_eq!(peer(3, 2, "nonce-4", db), Stored, "strictly greater");
    assert_eq!(store.get(&a).unwrap().unwrap().counters, ctr(3, 2));
    // Local and peer updates of one key meet in one rule.
    assert_eq!(store.compare_and_set(&update(a, ctr(3, 2), "nonce-4")).unwrap(), CasOutcome::ReplayedOtp, "digest differs");
    let mut same = update(a, ctr(3, 2), "nonce-4");
    same.otp_digest = db;
    assert_eq!(store.compare_and_set(&same).unwrap(), CasOutcome::ReplayedRequest, "the request the peer stored");
    // pam_yubico's fan-out: accepted here, then the other site's proposal.
    let local = update(a, ctr(4, 0), "fan-out-nonce");
    assert_eq!(store.compare_and_set(&local).unwrap(), CasOutcome::Accepted);
    assert_eq!(peer(4, 0, "fan-out-nonce", local.otp_digest), SameRequest);
    assert_eq!(peer(4, 0, "other-nonce", local.otp_digest), Stale { stored: ctr(4, 0) });
    // Through the node's trait.
    let p = proposal(id(9), ctr(1, 0), "n", da);
    assert_eq!(DurableCas::peer_cas(&store, SiteId(2), &p), Stored);
    assert_eq!(DurableCas::peer_cas(&store, SiteId(2), &p), SameRequest);
    let st = store.stats();
    assert_eq!((st.peer_stored, st.peer_same_request, st.peer_stale), (3, 3, 5), "{st:?}");
    let mut metrics = String::new();
    store.render_metrics(&mut metrics);
    assert!(metrics.contains("validator_counter_peer_cas_total{outcome=\"stale\"} 5\n"), "{metrics}");
}

/// Thousands of random proposals on a few keys, grouped in concurrent
/// batches or not: the store answers exactly what `quorum::peer_cas` says
/// against a model of the stored records.
#[test]
fn peer_compare_and_set_matches_the_model() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteCounters::open(&dir.path().join("v.db")).unwrap();
    let mut model: BTreeMap<PublicId, quorum::StoredCounters> = BTreeMap::new();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for _ in 0..3000 {
        let key = id(rng.below(4));
        let counters = ctr(u16::try_from(rng.below(4)).unwrap(), u8::try_from(rng.below(3)).unwrap());
        let nonce = format!("nonce-{}", rng.below(3));
        let d = digest(&format!("otp-{}", rng.below(2)));
        let p = proposal(key, counters, &nonce, d);
        let expected: PeerCasResult = quorum::peer_cas(model.get(&key), &p).into();
        assert_eq!(store.peer_compare_and_set(&p).unwrap(), expected, "{p:?} against {:?}", model.get(&key));
        if expected == PeerCasResult::Stored {
            model.insert(key, quorum::StoredCounters::from(&p));
        }
    }
    for (key, m) in &model {
        let s = store.get(key).unwrap().unwrap();
        assert_eq!((s.counters, &s.nonce, s.otp_digest), (m.counters, &m.nonce, m.otp_digest.0));
    }
}

#[test]
fn a_peer_store_is_durable_before_the_answer() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v.db");
    let p = proposal(id(5), ctr(7, 7), "nonce-durable", digest("otp-durable"));
    {
        let store = SqliteCounters::open(&path).unwrap();
        store.add_peer("site-2").unwrap();
        assert_eq!(store.peer_compare_and_set(&p).unwrap(), PeerCasResult::Stored);
        // Committed when answered: another connection sees it at once.
        let other = rusqlite::Connection::open(&path).unwrap();
        let (c, u, n): (i64, i64, i64) = other
            .query_row(
                "SELECT counter, session_use, (SELECT count(*) FROM outbox) FROM counters WHERE public_id = ?1",
                [id(5).to_modhex()],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .unwrap();
        assert_eq!((c, u, n), (7, 7, 1));
    }
    let store = SqliteCounters::open(&path).unwrap();
    assert_eq!(store.get(&id(5)).unwrap().unwrap().otp_digest, digest("otp-durable"));
    assert_eq!(store.peer_compare_and_set(&p).unwrap(), PeerCasResult::SameRequest);
    let rows = outbox(&store);
    assert_eq!(rows.len(), 1);
    assert_eq!((rows[0].public_id, rows[0].counters, rows[0].nonce.as_str()), (id(5), ctr(7, 7), "nonce-durable"));
}

#[test]
fn the_outbox_is_written_with_the_update_and_only_then() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v.db");
    let store = Arc::new(
        SqliteCounters::open_with(&path, CounterOptions { busy_timeout: Duration::from_millis(200), ..CounterOptions::default() }).unwrap(),
    );
    store.add_peer("site-2").unwrap();
    let u = update(id(1), ctr(1, 0), "nonce-1");
    assert_eq!(store.compare_and_set(&u).unwrap(), CasOutcome::Accepted);
    assert_eq!(store.compare_and_set(&u).unwrap(), CasOutcome::ReplayedRequest);
    assert_eq!(store.compare_and_set(&update(id(1), ctr(0, 9), "nonce-2")).unwrap(), CasOutcome::ReplayedOtp);
    let p = proposal(id(1), ctr(1, 0), "nonce-1", u.otp_digest);
    assert_eq!(store.peer_compare_and_set(&p).unwrap(), PeerCasResult::SameRequest);
    assert!(matches!(store.peer_compare_and_set(&proposal(id(1), ctr(1, 0), "x", u.otp_digest)).unwrap(), PeerCasResult::Stale { .. }));
    let rows = outbox(&store);
    assert_eq!(rows.len(), 1, "only the accepted change: {rows:?}");
    assert_eq!(
        (rows[0].public_id, rows[0].counters, rows[0].nonce.as_str(), rows[0].otp_digest, rows[0].modified),
        (id(1), ctr(1, 0), "nonce-1", OtpDigest(u.otp_digest), 1_700_000_000)
    );
    // A failed batch writes neither the counters nor the outbox.
    let other = rusqlite::Connection::open(&path).unwrap();
    other.execute_batch("BEGIN IMMEDIATE").unwrap();
    let threads: Vec<_> = (0..6u64)
        .map(|t| {
            let store = store.clone();
            std::thread::spawn(move || {
                if t % 2 == 0 {
                    store.compare_and_set(&update(id(10 + t), ctr(1, 0), "n")).map(drop)
                } else {
                    store.peer_compare_and_set(&proposal(id(10 + t), ctr(1, 0), "n", digest("n"))).map(drop)
                }
            })
        })
        .collect();
    for t in threads {
        assert!(t.join().unwrap().is_err());
    }
    other.execute_batch("ROLLBACK").unwrap();
    for t in 0..6 {
        assert_eq!(store.get(&id(10 + t)).unwrap(), None);
    }
    assert_eq!(outbox(&store).len(), 1, "nothing of the failed batch is in the outbox");
    // Under concurrency: one outbox row per accepted change, no more.
    let threads: Vec<_> = (0..8u64)
        .map(|t| {
            let store = store.clone();
            std::thread::spawn(move || {
                let mut accepted = 0;
                for n in 1..=50u32 {
                    // Two threads per key, local and peer, racing.
                    let key = id(100 + t / 2);
                    let stored = if t % 2 == 0 {
                        store.compare_and_set(&update(key, ticket(n), &format!("t{t}"))).unwrap() == CasOutcome::Accepted
                    } else {
                        store.peer_compare_and_set(&proposal(key, ticket(n), &format!("t{t}"), digest("p"))).unwrap()
                            == PeerCasResult::Stored
                    };
                    accepted += u32::from(stored);
                }
                accepted
            })
        })
        .collect();
    let accepted: u32 = threads.into_iter().map(|t| t.join().unwrap()).sum();
    assert_eq!(outbox(&store).len(), 1 + accepted as usize);
}

#[test]
fn outbox_order_cursors_and_compaction() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteCounters::open(&dir.path().join("v.db")).unwrap();
    // A lone site writes no outbox: nothing to catch up with.
    assert_eq!(store.compare_and_set(&update(id(60), ctr(1, 0), "n")).unwrap(), CasOutcome::Accepted);
    assert!(outbox(&store).is_empty());
    store.add_peer("site-2").unwrap();
    store.add_peer("witness").unwrap();
    let changes: Vec<(PublicId, Counters)> = (1..=10u32).map(|n| (id(u64::from(n % 3)), ticket(n))).collect();
    for (i, (key, c)) in changes.iter().enumerate() {
        if i % 2 == 0 {
            assert_eq!(store.compare_and_set(&update(*key, *c, "n")).unwrap(), CasOutcome::Accepted);
        } else {
            assert_eq!(store.peer_compare_and_set(&proposal(*key, *c, "n", digest("n"))).unwrap(), PeerCasResult::Stored);
        }
    }
    let rows = outbox(&store);
    assert_eq!(rows.iter().map(|r| (r.public_id, r.counters)).collect::<Vec<_>>(), changes, "commit order");
    assert!(rows.windows(2).all(|w| w[0].seq < w[1].seq));
    let seqs: Vec<u64> = rows.iter().map(|r| r.seq).collect();
    // Paging from a cursor.
    let page = store.outbox_after(seqs[2], 3).unwrap();
    assert_eq!(page.iter().map(|r| r.seq).collect::<Vec<_>>(), &seqs[3..6]);
    assert!(store.outbox_after(seqs[9], 10).unwrap().is_empty());
    store.ack("site-2", seqs[5]).unwrap();
    assert_eq!(store.compact().unwrap(), 0, "the witness has acknowledged nothing");
    store.ack("witness", seqs[2]).unwrap();
    store.add_peer("witness").unwrap(); // registering again keeps its cursor
    assert_eq!(store.compact().unwrap(), 3, "at or below the smallest cursor");
    assert_eq!(store.outbox_after(0, 100).unwrap().first().map(|r| r.seq), Some(seqs[3]));
    store.ack("site-2", seqs[1]).unwrap(); // late and older: ignored
    assert_eq!(store.peer_cursors().unwrap(), vec![("site-2".to_owned(), seqs[5]), ("witness".to_owned(), seqs[2])]);
    store.remove_peer("witness").unwrap();
    assert_eq!(store.compact().unwrap(), 3);
    store.ack("site-2", seqs[9]).unwrap();
    assert_eq!(store.compact().unwrap(), 4);
    assert!(outbox(&store).is_empty());
    // Sequence numbers are never reused, even after the outbox emptied.
    assert_eq!(store.compare_and_set(&update(id(50), ctr(1, 0), "n")).unwrap(), CasOutcome::Accepted);
    assert!(outbox(&store)[0].seq > seqs[9]);
    assert_eq!(store.outbox_after(seqs[9], 10).unwrap().len(), 1);
}

/// One key's state: (counters, nonce, digest, modified).
type KeyState = Option<(Counters, String, [u8; 32], i64)>;

/// A store's final state as (counters, nonce, digest, modified) per key.
fn state(store: &SqliteCounters, keys: u64) -> Vec<KeyState> {
    (0..keys).map(|k| store.get(&id(k)).unwrap().map(|s| (s.counters, s.nonce, s.otp_digest, s.modified))).collect()
}

#[test]
fn merge_max_is_idempotent_order_independent_and_never_lowers() {
    const KEYS: u64 = 12;
    let dir = tempfile::tempdir().unwrap();
    // A peer's outbox: local accepts and peer stores on 12 keys.
    let origin = SqliteCounters::open(&dir.path().join("origin.db")).unwrap();
    origin.add_peer("site-2").unwrap();
    let mut rng = Rng(42);
    for n in 0..400u32 {
        let key = id(rng.below(KEYS));
        let c = ticket(n + u32::try_from(rng.below(30)).unwrap() + 1);
        let _ = origin.compare_and_set(&update(key, c, &format!("o{n}"))).unwrap();
    }
    let mut rows = outbox(&origin);
    // Conflicting rows with equal counters (as after accept-at-risk at two
    // sites), and exact duplicates.
    let last = rows[rows.len() - 1].clone();
    rows.push(OutboxRow { seq: 0, nonce: "zz-conflict".to_owned(), ..last.clone() });
    rows.push(OutboxRow { seq: 0, otp_digest: OtpDigest([0xff; 32]), ..last.clone() });
    rows.push(rows[3].clone());
    assert!(rows.len() > 50, "{} rows", rows.len());
    // Each target already holds some counters of its own, some above the
    // peer's rows: those must stay.
    let prepare = |name: &str| {
        let s = SqliteCounters::open(&dir.path().join(name)).unwrap();
        s.add_peer("origin").unwrap();
        for k in 0..KEYS / 2 {
            assert_eq!(
                s.compare_and_set(&update(id(k * 2), ticket(300 + u32::try_from(k).unwrap() * 40), "own")).unwrap(),
                CasOutcome::Accepted
            );
        }
        s
    };
    let before = state(&prepare("probe.db"), KEYS);
    let in_order = prepare("a.db");
    let counts = in_order.merge_max(&rows).unwrap();
    assert_eq!(counts.applied + counts.unchanged, rows.len() as u64);
    assert!(counts.applied > 0 && counts.unchanged > 0, "{counts:?}");
    let again = in_order.merge_max(&rows).unwrap();
    assert_eq!(again, MergeCounts { applied: 0, unchanged: rows.len() as u64 }, "idempotent");
    let expected = state(&in_order, KEYS);
    // Reversed, twice.
    let reversed = prepare("b.db");
    let mut rev = rows.clone();
    rev.reverse();
    reversed.merge_max(&rev).unwrap();
    reversed.merge_max(&rev).unwrap();
    assert_eq!(state(&reversed, KEYS), expected, "reversed");
    // Shuffled, in chunks of varying size, with chunks repeated.
    for round in 0..5u64 {
        let target = prepare(&format!("shuffled-{round}.db"));
        let mut shuffled = rows.clone();
        let mut rng = Rng(round + 7);
        for i in (1..shuffled.len()).rev() {
            shuffled.swap(i, usize::try_from(rng.below(i as u64 + 1)).unwrap());
        }
        let mut start = 0;
        while start < shuffled.len() {
            let end = (start + 1 + usize::try_from(rng.below(40)).unwrap()).min(shuffled.len());
            target.merge_max(&shuffled[start..end]).unwrap();
            if rng.below(3) == 0 {
                target.merge_max(&shuffled[start..end]).unwrap();
            }
            start = end;
        }
        assert_eq!(state(&target, KEYS), expected, "shuffle {round}");
    }
    // The result is the per-key maximum; nothing went down.
    for k in 0..KEYS {
        let from_rows = rows.iter().filter(|r| r.public_id == id(k)).map(|r| r.counters).max();
        let own = before[usize::try_from(k).unwrap()].as_ref().map(|s| s.0);
        let got = expected[usize::try_from(k).unwrap()].as_ref().map(|s| s.0);
        assert_eq!(got, from_rows.max(own), "key {k}");
    }
    // Merged rows are not re-published.
    assert_eq!(outbox(&in_order).len(), KEYS as usize / 2);
    // A merged value refuses its own replay locally and at the peer rule.
    let r = &rows[0];
    let p = proposal(r.public_id, r.counters, &r.nonce, r.otp_digest.0);
    assert!(matches!(in_order.peer_compare_and_set(&p).unwrap(), PeerCasResult::SameRequest | PeerCasResult::Stale { .. }));
}

#[test]
fn a_new_site_bootstraps_from_a_snapshot_then_the_outbox() {
    let dir = tempfile::tempdir().unwrap();
    let source = SqliteCounters::open(&dir.path().join("source.db")).unwrap();
    source.add_peer("site-2").unwrap();
    assert_eq!(source.outbox_last_seq().unwrap(), 0);
    for n in 1..=50u32 {
        let _ = source.compare_and_set(&update(id(u64::from(n % 7)), ticket(n), &format!("s{n}"))).unwrap();
    }
    let last = source.outbox_last_seq().unwrap();
    assert_eq!(last, outbox(&source).last().unwrap().seq);
    source.add_peer("new").unwrap();
    source.ack("new", last).unwrap();
    source.ack("site-2", last).unwrap();
    assert_eq!(source.compact().unwrap(), 50);
    assert_eq!(source.outbox_last_seq().unwrap(), last, "compaction does not lower it");
    let new = SqliteCounters::open(&dir.path().join("new.db")).unwrap();
    let mut after: Option<PublicId> = None;
    let mut pages = 0;
    loop {
        let page = source.snapshot_after(after.as_ref(), 3).unwrap();
        if page.is_empty() {
            break;
        }
        pages += 1;
        // Changes while the snapshot is paged go to the outbox.
        let _ = source.compare_and_set(&update(id(pages), ticket(100 + u32::try_from(pages).unwrap()), "during")).unwrap();
        new.merge_max(&page).unwrap();
        after = page.last().map(|r| r.public_id);
    }
    assert_eq!(pages, 3);
    let rows = source.outbox_after(last, 1000).unwrap();
    new.merge_max(&rows).unwrap();
    source.ack("new", rows.last().unwrap().seq).unwrap();
    assert_eq!(
        state(&new, 7).iter().map(|s| s.as_ref().map(|s| (s.0, s.1.clone(), s.2))).collect::<Vec<_>>(),
        state(&source, 7).iter().map(|s| s.as_ref().map(|s| (s.0, s.1.clone(), s.2))).collect::<Vec<_>>()
    );
    let mut metrics = String::new();
    source.render_metrics(&mut metrics);
    assert!(metrics.contains("validator_counter_outbox_unacked{peer=\"new\"} 0\n"), "{metrics}");
}

/// The schema before OTP digests and the outbox, as the previous release
/// created it.
const PREVIOUS_SCHEMA: &str = "
CREATE TABLE counters (
    public_id   TEXT    NOT NULL PRIMARY KEY,
    counter     INTEGER NOT NULL,
    session_use INTEGER NOT NULL,
    high        INTEGER NOT NULL,
    low         INTEGER NOT NULL,
    nonce       TEXT    NOT NULL,
    modified    INTEGER NOT NULL,
    created     INTEGER NOT NULL
) STRICT, WITHOUT ROWID;
";

#[test]
fn a_database_of_the_previous_schema_is_migrated() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("old.db");
    {
        let old = rusqlite::Connection::open(&path).unwrap();
        old.pragma_update(None, "journal_mode", "WAL").unwrap();
        old.execute_batch(PREVIOUS_SCHEMA).unwrap();
        for k in 0..3u64 {
            old.execute(
                "INSERT INTO counters VALUES (?1, ?2, 4, 1, 2, 'old-nonce', 100, 50)",
                rusqlite::params![id(k).to_modhex(), 10 + k as i64],
            )
            .unwrap();
        }
    }
    for _ in 0..2 {
        // Opened twice: the second open finds it migrated.
        let store = SqliteCounters::open(&path).unwrap();
        assert_eq!(store.count().unwrap(), 3);
        let s = store.get(&id(1)).unwrap().unwrap();
        assert_eq!((s.counters, s.nonce.as_str(), s.otp_digest, s.modified, s.created), (ctr(11, 4), "old-nonce", [0; 32], 100, 50));
        assert!(outbox(&store).is_empty());
    }
    let store = SqliteCounters::open(&path).unwrap();
    store.add_peer("site-2").unwrap();
    // Old rows keep refusing their counters; the zero digest matches no OTP.
    assert_eq!(store.compare_and_set(&update(id(1), ctr(11, 4), "old-nonce")).unwrap(), CasOutcome::ReplayedOtp);
    assert!(matches!(
        store.peer_compare_and_set(&proposal(id(1), ctr(11, 4), "old-nonce", digest("x"))).unwrap(),
        PeerCasResult::Stale { .. }
    ));
    assert_eq!(store.compare_and_set(&update(id(1), ctr(11, 5), "new")).unwrap(), CasOutcome::Accepted);
    assert_eq!(store.get(&id(1)).unwrap().unwrap().otp_digest, digest("new"));
    assert_eq!(outbox(&store).len(), 1);
    store.ack("site-2", 1).unwrap();
    let conn = rusqlite::Connection::open(&path).unwrap();
    let columns: Vec<String> = conn
        .prepare("SELECT name FROM pragma_table_info('counters')")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(columns[8..], ["otp_digest", "sync_bucket"]);
    // The digest bucket of every old row was filled in.
    let buckets: Vec<(String, i64)> = conn
        .prepare("SELECT public_id, sync_bucket FROM counters")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(buckets.len(), 3);
    assert!(buckets.iter().all(|(id, b)| i64::from(replication::sync::bucket_of(id.as_bytes())) == *b), "{buckets:?}");
}

// ------------------------------------------------------------- kill -9

const CHILD_DB: &str = "VALIDATOR_TEST_COUNTERS_CHILD_DB";
const CHILD_SYNC: &str = "VALIDATOR_TEST_COUNTERS_CHILD_SYNC";

/// Child mode of `kill9_loses_no_acknowledged_update`: does nothing unless
/// the environment selects it. Hammers the store from 16 threads (4 of them
/// per YubiKey, so with replays) and prints every accepted update only
/// after `compare_and_set` returned, until killed (or 60 s).
#[test]
fn child_hammer() {
    let Ok(db) = std::env::var(CHILD_DB) else { return };
    let synchronous: Synchronous = std::env::var(CHILD_SYNC).unwrap().parse().unwrap();
    let store = Arc::new(open(Path::new(&db), synchronous));
    let tickets: Arc<Vec<AtomicU32>> = Arc::new((0..4).map(|_| AtomicU32::new(1)).collect());
    let threads: Vec<_> = (0..16u32)
        .map(|t| {
            let (store, tickets) = (store.clone(), tickets.clone());
            std::thread::spawn(move || {
                let key = t % 4;
                let started = Instant::now();
                let mut i = 0u64;
                while started.elapsed() < Duration::from_secs(60) {
                    i += 1;
                    let n = tickets[key as usize].fetch_add(1, Ordering::Relaxed);
                    let nonce = format!("c{t}i{i}");
                    let u = update(id(u64::from(key) + 1), ticket(n), &nonce);
                    if matches!(store.compare_and_set(&u), Ok(CasOutcome::Accepted)) {
                        println!("ACCEPTED {} {} {} {nonce}", key + 1, u.counters.counter(), u.counters.session_use());
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

fn kill9(synchronous: Synchronous) {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("v.db");
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["child_hammer", "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_DB, &db)
        .env(CHILD_SYNC, synchronous.name())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let lines = Arc::new(Mutex::new(Vec::<String>::new()));
    let reader = {
        let lines = lines.clone();
        std::thread::spawn(move || {
            let mut r = BufReader::new(stdout);
            loop {
                let mut line = String::new();
                match r.read_line(&mut line) {
                    Ok(0) | Err(_) => break,
                    // A line cut by the kill has no newline: not acknowledged.
                    Ok(_) if line.ends_with('\n') && line.starts_with("ACCEPTED ") => lines.lock().unwrap().push(line),
                    Ok(_) => {}
                }
            }
        })
    };
    let started = Instant::now();
    // Let it run a while under load, then kill it mid-batch.
    while (lines.lock().unwrap().len() < 5000 || started.elapsed() < Duration::from_millis(1500))
        && started.elapsed() < Duration::from_secs(20)
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap(); // SIGKILL
    let status = child.wait().unwrap();
    reader.join().unwrap();
    assert!(!status.success(), "the child was killed, not finished: {status:?}");
    let lines = lines.lock().unwrap();
    assert!(lines.len() > 100, "the child acknowledged only {} updates", lines.len());
    let store = open(&db, synchronous);
    let mut highest: BTreeMap<u64, Counters> = BTreeMap::new();
    let mut replays = Vec::with_capacity(lines.len());
    for line in lines.iter() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (key, c, u, nonce) = (f[1].parse::<u64>().unwrap(), f[2].parse().unwrap(), f[3].parse().unwrap(), f[4]);
        let counters = ctr(c, u);
        replays.push(update(id(key), counters, nonce));
        let h = highest.entry(key).or_insert(counters);
        *h = (*h).max(counters);
    }
    // Replayed in transactions of 256 (a replay changes nothing anyway).
    for chunk in replays.chunks(256) {
        for (u, outcome) in chunk.iter().zip(store.compare_and_set_many(chunk).unwrap()) {
            assert_ne!(outcome, CasOutcome::Accepted, "{synchronous}: acknowledged update {u:?} was lost by kill -9");
        }
    }
    for (key, h) in &highest {
        assert!(store.get(&id(*key)).unwrap().unwrap().counters >= *h);
    }
    println!("kill -9 ({synchronous}): {} acknowledged updates, every one rejected after restart", lines.len());
}

/// `kill -9` mid-run loses nothing that was acknowledged. With FULL this
/// holds for power loss too; with NORMAL (WAL) a commit is in the OS page
/// cache when acknowledged, so it survives the death of the process (which
/// is all this test can show) but not of the OS.
#[test]
fn kill9_loses_no_acknowledged_update() {
    kill9(Synchronous::Full);
    kill9(Synchronous::Normal);
}

// ------------------------------------------------------------ benchmark

fn bench_one(synchronous: Synchronous, threads: u64, duration: Duration) {
    // On the target directory's file system (not a tmpfs), so fsync costs.
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let store = Arc::new(open(&dir.path().join("bench.db"), synchronous));
    let barrier = Arc::new(Barrier::new(usize::try_from(threads).unwrap() + 1));
    let workers: Vec<_> = (0..threads)
        .map(|t| {
            let (store, barrier) = (store.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                let started = Instant::now();
                let mut latencies = Vec::new();
                let mut n = 0u32;
                while started.elapsed() < duration {
                    n += 1;
                    // A new YubiKey every 1000 updates, as with many users.
                    let key = id(t * 1_000_000 + u64::from(n / 1000));
                    let t0 = Instant::now();
                    let outcome = store.compare_and_set(&update(key, ticket(n % 1000 + 1), "bench-nonce-00000")).unwrap();
                    latencies.push(t0.elapsed());
                    assert_eq!(outcome, CasOutcome::Accepted);
                }
                latencies
            })
        })
        .collect();
    barrier.wait();
    let started = Instant::now();
    let mut latencies: Vec<Duration> = workers.into_iter().flat_map(|w| w.join().unwrap()).collect();
    let elapsed = started.elapsed();
    latencies.sort();
    let pct = |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)];
    let st = store.stats();
    println!(
        "synchronous={:<6} threads={threads:<3} {:>8.0} updates/s  mean batch {:>5.1}  max batch {:>3}  p50 {:>6.2} ms  p99 {:>6.2} ms  ({} updates, {} commits)",
        synchronous.name(),
        latencies.len() as f64 / elapsed.as_secs_f64(),
        st.mean_batch(),
        st.max_batch,
        pct(0.5).as_secs_f64() * 1e3,
        pct(0.99).as_secs_f64() * 1e3,
        latencies.len(),
        st.batches,
    );
}

/// Throughput of the store alone, FULL vs NORMAL, 8 and 32 callers:
/// `cargo test --release -p validator --test counters -- --ignored --nocapture bench`
#[test]
#[ignore = "benchmark: run with --ignored --nocapture"]
fn bench_counter_store() {
    let seconds = std::env::var("BENCH_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(3);
    println!("SQLite {}", rusqlite::version());
    for synchronous in [Synchronous::Full, Synchronous::Normal] {
        for threads in [1, 8, 32] {
            bench_one(synchronous, threads, Duration::from_secs(seconds));
        }
    }
}

/// Catch-up cost: 100,000 changed counters pulled from a peer's outbox in
/// pages and merged, FULL:
/// `cargo test --release -p validator --test counters -- --ignored --nocapture bench_catch_up`
#[test]
#[ignore = "benchmark: run with --ignored --nocapture"]
fn bench_catch_up() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let source = SqliteCounters::open(&dir.path().join("source.db")).unwrap();
    source.add_peer("target").unwrap();
    let updates: Vec<CounterUpdate> = (0..100_000u64).map(|k| update(id(k + 1), ctr(1, 0), "bench-nonce")).collect();
    let started = Instant::now();
    for chunk in updates.chunks(1000) {
        source.compare_and_set_many(chunk).unwrap();
    }
    println!("source: 100,000 accepts with outbox rows in {:.2} s", started.elapsed().as_secs_f64());
    let target = SqliteCounters::open(&dir.path().join("target.db")).unwrap();
    for page in [1000usize, 10_000] {
        let started = Instant::now();
        let (mut cursor, mut applied) = (0u64, 0u64);
        loop {
            let rows = source.outbox_after(cursor, page).unwrap();
            let Some(last) = rows.last() else { break };
            cursor = last.seq;
            applied += target.merge_max(&rows).unwrap().applied;
            source.ack("target", cursor).unwrap();
        }
        println!("catch-up of 100,000 rows, pages of {page}: {:.2} s ({applied} applied)", started.elapsed().as_secs_f64());
    }
}
