//! The three replicated datasets behind `replication::sync::SyncStore`:
//! counters, AEADs and API clients, each exchanged between two stores on
//! real SQLite files through the trait only (outbox pull with the
//! acknowledgement in the next pull, digests, buckets).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::path::Path;
use std::time::Instant;

use std::sync::Arc;

use hsm::soft::format::KdfParams;
use hsm::soft::SoftHsm;
use hsm::{Password, SecurityModule};
use ksm::store::AeadStore;
use otp::aead_file::AeadRecord;
use otp::{Aead, AeadNonce, Counters, KeyHandle, PublicId};
use replication::sync::{bucket_of, Digest, Item, SyncStore};
use validator::aead_sync::{item_key, AeadSync};
use validator::clients::{ClientDb, ClientSync, SqliteClients};
use validator::counters::{CounterOptions, SqliteCounters, Synchronous};
use validator::{ClientId, ClientKey, ClientStore, CounterStore, CounterUpdate};

fn pid(n: u64) -> PublicId {
    PublicId::from_number(n, 6).unwrap()
}

fn ctr(c: u16, u: u8) -> Counters {
    Counters::new(c, u).unwrap()
}

fn label_digest(label: &str) -> [u8; 32] {
    let mut d = [0u8; 32];
    for (i, b) in label.bytes().enumerate() {
        d[i % 32] ^= b.wrapping_add(i as u8);
    }
    d
}

fn update(public_id: PublicId, counters: Counters, nonce: &str) -> CounterUpdate {
    CounterUpdate {
        public_id,
        counters,
        timestamp_high: 1,
        timestamp_low: 2,
        nonce: nonce.to_owned(),
        otp_digest: label_digest(nonce),
        now: 1_700_000_000,
    }
}

/// Pull everything `from` has for `me` into `to`, in pages of `page`,
/// acknowledging each page with the next pull (`cursor` carries the
/// puller's position across calls, `None` after a restart). Returns the
/// items merged that changed something.
fn pull(from: &dyn SyncStore, to: &dyn SyncStore, me: &str, origin: &str, cursor: &mut Option<u64>, page: usize) -> u64 {
    let mut applied = 0;
    loop {
        let changes = from.changes(me, *cursor, page).unwrap();
        assert!(changes.head >= changes.last, "{changes:?}");
        if changes.items.is_empty() {
            *cursor = Some(changes.last);
            return applied;
        }
        applied += to.merge(origin, &changes.items).unwrap().applied;
        *cursor = Some(changes.last);
    }
}

/// Anti-entropy: pull every bucket of `from` whose digest differs.
fn repair(from: &dyn SyncStore, to: &dyn SyncStore, origin: &str) -> usize {
    let differing = from.digest().unwrap().differing(&to.digest().unwrap());
    for &b in &differing {
        let items = from.bucket(b).unwrap();
        assert!(items.iter().all(|i| bucket_of(&i.key) == b));
        to.merge(origin, &items).unwrap();
    }
    differing.len()
}

fn fill(store: &SqliteCounters, range: std::ops::Range<u64>, c: u16, nonce: &str) {
    let updates: Vec<_> = range.map(|k| update(pid(k), ctr(c, 0), nonce)).collect();
    for chunk in updates.chunks(1000) {
        store.compare_and_set_many(chunk).unwrap();
    }
}

// ---------------------------------------------------------------- counters

fn counters_at(path: &Path) -> SqliteCounters {
    SqliteCounters::open(path).unwrap()
}

#[test]
fn counters_converge_both_ways_through_the_trait() {
    let dir = tempfile::tempdir().unwrap();
    let a = counters_at(&dir.path().join("a.db"));
    let b = counters_at(&dir.path().join("b.db"));
    // Each registers the other by its first pull (the outbox is written
    // only while a peer is known).
    let (mut a_from_b, mut b_from_a) = (None, None);
    assert_eq!(pull(&a, &b, "b", "a", &mut b_from_a, 100), 0);
    assert_eq!(pull(&b, &a, "a", "b", &mut a_from_b, 100), 0);
    fill(&a, 1..60, 5, "a-nonce-0000001");
    fill(&b, 30..90, 7, "b-nonce-0000001");
    assert_ne!(a.digest().unwrap(), b.digest().unwrap());
    assert_eq!(pull(&a, &b, "b", "a", &mut b_from_a, 16), 29);
    assert_eq!(pull(&b, &a, "a", "b", &mut a_from_b, 16), 60);
    assert_eq!(a.digest().unwrap(), b.digest().unwrap());
    // Max rule: B's 7s won over A's 5s at A as well.
    assert_eq!(a.get(&pid(40)).unwrap().unwrap().counters, ctr(7, 0));
    assert_eq!(b.get(&pid(10)).unwrap().unwrap().counters, ctr(5, 0));
    // Local columns differ (timestamps are not replicated) but the digest
    // is over the replicated value only.
    assert_eq!(b.get(&pid(10)).unwrap().unwrap().timestamp_high, 0);
    assert_eq!(a.get(&pid(10)).unwrap().unwrap().timestamp_high, 1);
    // Nothing bounces: merged rows are not in the puller's outbox.
    assert_eq!(pull(&a, &b, "b", "a", &mut b_from_a, 16), 0);
    assert_eq!(pull(&b, &a, "a", "b", &mut a_from_b, 16), 0);
    assert_eq!(b.changes("a", None, 100).unwrap().items.len(), 0);
}

#[test]
fn counters_merge_is_idempotent_order_independent_and_never_lowers() {
    let dir = tempfile::tempdir().unwrap();
    let a = counters_at(&dir.path().join("a.db"));
    a.changes("b", None, 1).unwrap();
    for round in 0..5u16 {
        fill(&a, 1..40, round + 1, &format!("nonce-round-{round:04}"));
    }
    let items = a.changes("b", None, 10_000).unwrap().items;
    assert_eq!(items.len(), 5 * 39);
    // B: in order, each page twice; C: reversed, in pages of 7.
    let b = counters_at(&dir.path().join("b.db"));
    let c = counters_at(&dir.path().join("c.db"));
    for page in items.chunks(13) {
        let first = b.merge("a", page).unwrap();
        let second = b.merge("a", page).unwrap();
        assert_eq!((second.applied, second.unchanged), (0, page.len() as u64), "{first:?}");
    }
    let mut reversed = items.clone();
    reversed.reverse();
    for page in reversed.chunks(7) {
        c.merge("a", page).unwrap();
    }
    assert_eq!(a.digest().unwrap(), b.digest().unwrap());
    assert_eq!(b.digest().unwrap(), c.digest().unwrap());
    // Never lowered: a key B holds higher keeps its counters.
    b.changes("a", None, 1).unwrap();
    b.compare_and_set(&update(pid(3), ctr(100, 2), "b-own-nonce-0001")).unwrap();
    let m = b.merge("a", &items).unwrap();
    assert_eq!((m.applied, m.conflicts), (0, 0));
    assert_eq!(b.get(&pid(3)).unwrap().unwrap().counters, ctr(100, 2));
    // A's page of B's change raises A.
    let mut cursor = None;
    pull(&b, &a, "a", "b", &mut cursor, 10);
    assert_eq!(a.get(&pid(3)).unwrap().unwrap().counters, ctr(100, 2));
}

#[test]
fn counters_cursors_acks_compaction_and_restart() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.db");
    let a = counters_at(&path);
    // No peer known: no outbox.
    fill(&a, 1..11, 1, "before-any-peer1");
    assert_eq!(a.outbox_last_seq().unwrap(), 0);
    assert_eq!(a.changes("b", None, 100).unwrap(), replication::sync::Changes::default());
    a.changes("c", None, 100).unwrap();
    fill(&a, 1..11, 2, "after-peers-0001");
    let page = a.changes("b", None, 4).unwrap();
    assert_eq!((page.items.len(), page.last, page.head), (4, 4, 10));
    // Without an acknowledgement, the same page again.
    assert_eq!(a.changes("b", None, 4).unwrap(), page);
    // Acknowledge 4: the next page; nothing compacted while c is at 0.
    let next = a.changes("b", Some(4), 4).unwrap();
    assert_eq!((next.items.len(), next.last), (4, 8));
    assert_eq!(a.changes("b", None, 100).unwrap().items.len(), 6);
    assert_eq!(a.outbox_after(0, 100).unwrap().len(), 10);
    // Cursors only move forward; a puller that says it holds less (it lost
    // state) gets the rows after what it says.
    assert_eq!(a.changes("b", Some(2), 1).unwrap().last, 3);
    assert_eq!(a.peer_cursors().unwrap(), [("b".to_owned(), 4), ("c".to_owned(), 0)]);
    // c acknowledges 6: rows up to 4 (the minimum) go.
    a.changes("c", Some(6), 1).unwrap();
    assert_eq!(a.outbox_after(0, 100).unwrap().first().unwrap().seq, 5);
    // A cursor past the head is clamped to it.
    let past = a.changes("c", Some(1000), 1).unwrap();
    assert_eq!((past.last, past.head), (10, 10));
    drop(a);
    // Restart: cursors kept; a puller without a cursor resumes from its own.
    let a = counters_at(&path);
    assert_eq!(a.peer_cursors().unwrap(), [("b".to_owned(), 4), ("c".to_owned(), 10)]);
    let resumed = a.changes("b", None, 100).unwrap();
    assert_eq!((resumed.items.len(), resumed.last), (6, 10));
    a.changes("b", Some(10), 1).unwrap();
    assert!(a.outbox_after(0, 100).unwrap().is_empty());
    // seq is never reused after compaction.
    fill(&a, 1..2, 3, "after-compaction");
    assert_eq!(a.changes("b", None, 10).unwrap().last, 11);
}

#[test]
fn counters_anti_entropy_repairs_what_the_outbox_never_had() {
    let dir = tempfile::tempdir().unwrap();
    let a = counters_at(&dir.path().join("a.db"));
    let b = counters_at(&dir.path().join("b.db"));
    // Written before any peer was known: only the digest sees them.
    fill(&a, 1..300, 9, "lonely-nonce-001");
    fill(&b, 200..400, 4, "other-nonce-0001");
    let differing = repair(&a, &b, "a");
    assert!(differing > 100, "{differing} buckets");
    repair(&b, &a, "b");
    assert_eq!(a.digest().unwrap(), b.digest().unwrap());
    assert!(repair(&a, &b, "a") == 0);
    assert_eq!(b.get(&pid(250)).unwrap().unwrap().counters, ctr(9, 0));
    assert_eq!(a.count().unwrap(), 399);
    // The digest is the XOR of the items' hashes, whatever the order.
    let mut d = Digest::default();
    for bucket in 0..=255u8 {
        for item in a.bucket(bucket).unwrap() {
            d.add(&item.key, &item.value);
        }
    }
    assert_eq!(d, a.digest().unwrap());
}

#[test]
fn counters_malformed_items_are_refused_whole() {
    let dir = tempfile::tempdir().unwrap();
    let a = counters_at(&dir.path().join("a.db"));
    let b = counters_at(&dir.path().join("b.db"));
    a.changes("b", None, 1).unwrap();
    fill(&a, 1..5, 3, "good-nonce-00001");
    let good = a.changes("b", None, 100).unwrap().items;
    let mut bad_items: Vec<Vec<Item>> = Vec::new();
    let template = good[0].clone();
    for (key, value) in [
        (b"not modhex!".to_vec(), template.value.clone()),
        (b"cccccccccccccccccc".to_vec(), template.value.clone()),
        (template.key.to_ascii_uppercase(), template.value.clone()),
        (template.key.clone(), template.value[..10].to_vec()),
        (template.key.clone(), [&[0xff, 0xff, 0][..], &template.value[3..]].concat()),
        (template.key.clone(), [&template.value[..35], &[0xff, 0xfe][..]].concat()),
        (template.key.clone(), [template.value.clone(), vec![b'x'; 300]].concat()),
    ] {
        let mut page = good.clone();
        page.push(Item { key, value });
        bad_items.push(page);
    }
    for page in &bad_items {
        assert!(b.merge("a", page).is_err());
        assert_eq!(b.count().unwrap(), 0);
    }
    assert_eq!(b.merge("a", &good).unwrap().applied, 4);
}

// ------------------------------------------------------------------- AEADs

fn record(kh: u32, byte: u8) -> AeadRecord {
    AeadRecord {
        key_handle: KeyHandle::new(kh),
        nonce: AeadNonce::new([byte, 0, 0, 0, 0, 1]),
        aead: Aead::from_slice(&[byte; 30]).unwrap(),
    }
}

fn aeads_at(path: &Path) -> AeadSync {
    AeadSync::new(Arc::new(AeadStore::open(path).unwrap()))
}

fn import(sync: &AeadSync, ids: std::ops::Range<u64>, kh: u32, byte: u8) {
    let rows: Vec<_> = ids.map(|n| (pid(n), record(kh, byte))).collect();
    sync.store().put_many(&rows, "import", 1).unwrap();
}

#[test]
fn aeads_converge_and_a_conflict_is_quarantined_not_applied() {
    let dir = tempfile::tempdir().unwrap();
    let a = aeads_at(&dir.path().join("a.db"));
    let b = aeads_at(&dir.path().join("b.db"));
    let (mut b_from_a, mut a_from_b) = (None, None);
    pull(&a, &b, "b", "a", &mut b_from_a, 10);
    pull(&b, &a, "a", "b", &mut a_from_b, 10);
    import(&a, 1..50, 1, 1);
    import(&b, 40..80, 1, 1);
    // `ksm import` in another process: another connection to A's file.
    let a_import = AeadStore::open(a.store().path()).unwrap();
    a_import.put_many(&[(pid(500), record(2, 5))], "ksm import", 2).unwrap();
    // The same pair with other bytes at both sites.
    a.store().put(&pid(1000), &record(1, 0xaa), "import", 1).unwrap();
    b.store().put(&pid(1000), &record(1, 0xbb), "import", 1).unwrap();
    assert_eq!(pull(&a, &b, "b", "a", &mut b_from_a, 7), 39 + 1);
    assert_eq!(pull(&b, &a, "a", "b", &mut a_from_b, 7), 30);
    // Only the conflicting pair's bucket differs.
    assert_eq!(a.digest().unwrap().differing(&b.digest().unwrap()), [bucket_of(&item_key(&pid(1000), KeyHandle::new(1)))]);
    for (site, kept, refused) in [(&a, 0xaa, 0xbb), (&b, 0xbb, 0xaa)] {
        assert_eq!(site.store().get(&pid(1000), KeyHandle::new(1)).unwrap(), Some(record(1, kept)));
        let conflicts = site.store().conflicts().unwrap();
        assert_eq!(conflicts.len(), 1);
        assert_eq!(conflicts[0].refused, record(1, refused));
        assert!(conflicts[0].origin.starts_with("peer:"), "{}", conflicts[0].origin);
        assert_eq!(conflicts[0].stored.as_ref().map(|s| s.0), Some(record(1, kept)));
    }
    // Anti-entropy reports the conflict again, quarantines nothing twice.
    let bucket = b.bucket(bucket_of(&item_key(&pid(1000), KeyHandle::new(1)))).unwrap();
    let m = a.merge("b", &bucket).unwrap();
    assert_eq!((m.applied, m.conflicts), (0, 1));
    assert_eq!(a.store().conflict_count().unwrap(), 1);
    // Nothing bounces for ever: merged pairs are in the puller's outbox,
    // their origin finds them present.
    assert_eq!(pull(&a, &b, "b", "a", &mut b_from_a, 7), 0);
    assert_eq!(pull(&b, &a, "a", "b", &mut a_from_b, 7), 0);
    assert_eq!(a.store().count().unwrap(), 81);
    assert_eq!(b.store().count().unwrap(), 81);
}

#[test]
fn aeads_merge_is_idempotent_and_order_independent_and_repairs_by_bucket() {
    let dir = tempfile::tempdir().unwrap();
    let a = aeads_at(&dir.path().join("a.db"));
    // Imported before any peer: outbox empty, the digest repairs.
    import(&a, 1..200, 1, 3);
    import(&a, 100..150, 7, 4);
    assert!(a.changes("b", None, 100).unwrap().items.is_empty());
    let b = aeads_at(&dir.path().join("b.db"));
    let c = aeads_at(&dir.path().join("c.db"));
    assert!(repair(&a, &b, "a") > 100);
    assert_eq!(a.digest().unwrap(), b.digest().unwrap());
    let mut all: Vec<Item> = (0..=255u8).flat_map(|bk| a.bucket(bk).unwrap()).collect();
    assert_eq!(all.len(), 249);
    all.reverse();
    for page in all.chunks(11) {
        assert_eq!(c.merge("a", page).unwrap().applied, page.len() as u64);
        let again = c.merge("a", page).unwrap();
        assert_eq!((again.applied, again.unchanged, again.conflicts), (0, page.len() as u64, 0));
    }
    assert_eq!(c.digest().unwrap(), a.digest().unwrap());
    assert_eq!(b.store().get(&pid(120), KeyHandle::new(7)).unwrap(), Some(record(7, 4)));
}

#[test]
fn aeads_cursors_acks_compaction_and_restart() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.db");
    let a = aeads_at(&path);
    a.changes("b", None, 1).unwrap();
    a.store().add_peer("c").unwrap();
    import(&a, 1..11, 1, 1);
    let page = a.changes("b", None, 4).unwrap();
    assert_eq!((page.items.len(), page.last, page.head), (4, 4, 10));
    assert_eq!(a.changes("b", None, 4).unwrap(), page);
    assert_eq!(a.changes("b", Some(4), 100).unwrap().last, 10);
    assert_eq!(a.changes("b", Some(1), 1).unwrap().last, 2);
    assert_eq!(a.store().peer_cursors().unwrap(), [("b".to_owned(), 4), ("c".to_owned(), 0)]);
    assert_eq!(a.store().outbox_after(0, 100).unwrap().len(), 10);
    a.changes("c", Some(7), 1).unwrap();
    assert_eq!(a.store().outbox_after(0, 100).unwrap().first().unwrap().seq, 5);
    assert_eq!(a.changes("c", Some(99), 1).unwrap().last, 10);
    drop(a);
    let a = aeads_at(&path);
    assert_eq!(a.store().peer_cursors().unwrap(), [("b".to_owned(), 4), ("c".to_owned(), 10)]);
    assert_eq!(a.changes("b", None, 100).unwrap().items.len(), 6);
    a.changes("b", Some(10), 1).unwrap();
    assert!(a.store().outbox_after(0, 100).unwrap().is_empty());
    assert_eq!(a.store().outbox_last_seq().unwrap(), 10);
    import(&a, 20..21, 1, 1);
    assert_eq!(a.changes("b", None, 10).unwrap().last, 11);
}

#[test]
fn aeads_malformed_items_are_refused_whole() {
    let dir = tempfile::tempdir().unwrap();
    let a = aeads_at(&dir.path().join("a.db"));
    a.changes("b", None, 1).unwrap();
    import(&a, 1..4, 1, 1);
    let good = a.changes("b", None, 100).unwrap().items;
    let b = aeads_at(&dir.path().join("b.db"));
    let t = good[0].clone();
    for (key, value) in [
        (vec![1, 2, 3], t.value.clone()),
        (vec![1; 13], t.value.clone()),
        (t.key.clone(), t.value[..5].to_vec()),
        (t.key.clone(), t.value[..10].to_vec()),
        (t.key.clone(), [t.value.clone(), vec![0; 60]].concat()),
    ] {
        let mut page = good.clone();
        page.insert(1, Item { key, value });
        assert!(b.merge("a", &page).is_err());
        assert_eq!(b.store().count().unwrap(), 0);
    }
    assert_eq!(b.merge("a", &good).unwrap().applied, 3);
}

// ------------------------------------------------------------- API clients

/// One site: its own keystore (its own config data key), its database, the
/// server's caching store and the dataset.
struct Site {
    _dir: tempfile::TempDir,
    db: std::path::PathBuf,
    hsm: Arc<dyn SecurityModule>,
    server: SqliteClients,
    sync: ClientSync,
}

fn site(password: &str) -> Site {
    let dir = tempfile::tempdir().unwrap();
    let hsm: Arc<dyn SecurityModule> =
        Arc::new(SoftHsm::create(&dir.path().join("ks"), &Password::new(password).unwrap(), KdfParams::INSECURE_FOR_TESTS).unwrap());
    let db = dir.path().join("validator.db");
    let server = SqliteClients::open_with_refresh(&db, hsm.clone(), std::time::Duration::from_millis(50)).unwrap();
    let sync = server.sync_store().unwrap();
    Site { _dir: dir, db, hsm, server, sync }
}

fn cid(n: u64) -> ClientId {
    ClientId::new(n).unwrap()
}

/// Wait (within a few refresh intervals) until the server's view of `id`
/// satisfies `ok`.
fn eventually(server: &SqliteClients, id: ClientId, ok: impl Fn(Option<(bool, Vec<u8>)>) -> bool) {
    let deadline = Instant::now() + std::time::Duration::from_secs(3);
    loop {
        let seen = server.client(id).unwrap().map(|c| (c.active, c.key.expose().to_vec()));
        if ok(seen) {
            return;
        }
        assert!(Instant::now() < deadline, "client {id} never reached the expected state");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

#[test]
fn clients_created_rotated_disabled_at_a_work_accordingly_at_b() {
    let a = site("site a password");
    let b = site("site b password");
    let (mut b_from_a, mut a_from_b) = (None, None);
    pull(&a.sync, &b.sync, "b", "a", &mut b_from_a, 10);
    pull(&b.sync, &a.sync, "a", "b", &mut a_from_b, 10);

    let (seven, key1) = a.server.add(Some(cid(7)), None).unwrap();
    assert_eq!(pull(&a.sync, &b.sync, "b", "a", &mut b_from_a, 10), 1);
    eventually(&b.server, seven, |c| c == Some((true, key1.expose().to_vec())));
    assert_eq!(a.sync.digest().unwrap(), b.sync.digest().unwrap());
    // Re-sealed under B's own key: A's keystore cannot open B's copy.
    assert!(SqliteClients::open(&b.db, a.hsm.clone()).is_err());
    assert!(SqliteClients::open(&b.db, b.hsm.clone()).is_ok());
    // The merged row is in B's outbox; A finds it unchanged: no bounce.
    let back = b.sync.changes("a", a_from_b, 10).unwrap();
    assert_eq!(back.items.len(), 1);
    let m = a.sync.merge("b", &back.items).unwrap();
    assert_eq!((m.applied, m.unchanged), (0, 1));
    a_from_b = Some(back.last);
    assert_eq!(pull(&b.sync, &a.sync, "a", "b", &mut a_from_b, 10), 0);

    let key2 = a.server.rotate(seven).unwrap();
    assert_eq!(a.server.db().row_version(seven).unwrap(), Some(2));
    pull(&a.sync, &b.sync, "b", "a", &mut b_from_a, 10);
    eventually(&b.server, seven, |c| c == Some((true, key2.expose().to_vec())));
    assert_eq!(b.server.db().row_version(seven).unwrap(), Some(2));

    a.server.disable(seven).unwrap();
    pull(&a.sync, &b.sync, "b", "a", &mut b_from_a, 10);
    eventually(&b.server, seven, |c| matches!(c, Some((false, _))));
    a.server.enable(seven).unwrap();
    pull(&a.sync, &b.sync, "b", "a", &mut b_from_a, 10);
    eventually(&b.server, seven, |c| matches!(c, Some((true, _))));
    assert_eq!(a.sync.digest().unwrap(), b.sync.digest().unwrap());

    // `validator client add` in another process: a connection of its own.
    let cli = ClientDb::open(&a.db).unwrap();
    let (nine, key9) = cli.add(a.hsm.as_ref(), Some(cid(9)), Some(ClientKey::new(vec![9; 20])), "added by the CLI").unwrap();
    assert_eq!(pull(&a.sync, &b.sync, "b", "a", &mut b_from_a, 10), 1);
    eventually(&b.server, nine, |c| c == Some((true, key9.expose().to_vec())));
    assert_eq!(b.server.list().unwrap().iter().find(|c| c.id == nine).unwrap().notes, "added by the CLI");
    pull(&b.sync, &a.sync, "a", "b", &mut a_from_b, 10);
    assert_eq!(a.sync.digest().unwrap(), b.sync.digest().unwrap());
}

#[test]
fn clients_concurrent_changes_converge_and_a_disable_wins_a_tie() {
    let a = site("site a password");
    let b = site("site b password");
    let (mut b_from_a, mut a_from_b) = (None, None);
    pull(&a.sync, &b.sync, "b", "a", &mut b_from_a, 10);
    pull(&b.sync, &a.sync, "a", "b", &mut a_from_b, 10);
    a.server.add(Some(cid(3)), None).unwrap();
    a.server.add(Some(cid(4)), None).unwrap();
    pull(&a.sync, &b.sync, "b", "a", &mut b_from_a, 10);
    // Cut off: A rotates 3 and B disables it (both at version 2); B rotates
    // 4 twice (version 3) while A disables it once (version 2).
    a.server.rotate(cid(3)).unwrap();
    b.server.disable(cid(3)).unwrap();
    let key4 = {
        b.server.rotate(cid(4)).unwrap();
        b.server.rotate(cid(4)).unwrap()
    };
    a.server.disable(cid(4)).unwrap();
    // Any order.
    pull(&b.sync, &a.sync, "a", "b", &mut a_from_b, 1);
    pull(&a.sync, &b.sync, "b", "a", &mut b_from_a, 1);
    pull(&b.sync, &a.sync, "a", "b", &mut a_from_b, 1);
    assert_eq!(a.sync.digest().unwrap(), b.sync.digest().unwrap());
    for s in [&a, &b] {
        s.server.reload().unwrap();
        assert!(!s.server.client(cid(3)).unwrap().unwrap().active, "the disable wins the tie");
        let four = s.server.client(cid(4)).unwrap().unwrap();
        assert!(four.active, "the higher version wins");
        assert_eq!(four.key.expose(), key4.expose());
    }
    // Idempotent: every bucket merged again changes nothing.
    for bk in 0..=255u8 {
        let items = a.sync.bucket(bk).unwrap();
        if !items.is_empty() {
            assert_eq!(b.sync.merge("a", &items).unwrap().applied, 0);
        }
    }
}

#[test]
fn clients_anti_entropy_order_independence_cursors_and_restart() {
    let a = site("site a password");
    // Made before any peer was known: only the digest finds them.
    for n in 1..=12 {
        a.server.add(Some(cid(n)), None).unwrap();
    }
    a.server.disable(cid(5)).unwrap();
    let b = site("site b password");
    let c = site("site c password");
    assert!(repair(&a.sync, &b.sync, "a") > 0);
    assert_eq!(a.sync.digest().unwrap(), b.sync.digest().unwrap());
    let mut all: Vec<Item> = (0..=255u8).flat_map(|bk| a.sync.bucket(bk).unwrap()).collect();
    assert_eq!(all.len(), 12);
    all.reverse();
    for page in all.chunks(5) {
        c.sync.merge("a", page).unwrap();
        assert_eq!(c.sync.merge("a", page).unwrap().applied, 0);
    }
    assert_eq!(c.sync.digest().unwrap(), a.sync.digest().unwrap());
    c.server.reload().unwrap();
    assert!(!c.server.client(cid(5)).unwrap().unwrap().active);

    // Cursors: registered by the first pull, acknowledged by the next.
    assert!(a.sync.changes("b", None, 10).unwrap().items.is_empty());
    for n in [1, 2, 3] {
        a.server.rotate(cid(n)).unwrap();
    }
    let page = a.sync.changes("b", None, 2).unwrap();
    assert_eq!((page.items.len(), page.last, page.head), (2, 2, 3));
    a.sync.changes("b", Some(2), 0).unwrap();
    assert_eq!(a.sync.db().peer_cursors().unwrap(), [("b".to_owned(), 2)]);
    assert_eq!(a.sync.db().outbox_after(0, 10).unwrap(), [(3, cid(3))]);
    // Restart: the files stay, every handle goes.
    let Site { _dir, db, hsm, server, sync } = a;
    drop((server, sync));
    let reopened = ClientSync::open(&db, hsm).unwrap();
    assert_eq!(reopened.db().peer_cursors().unwrap(), [("b".to_owned(), 2)]);
    let rest = reopened.changes("b", None, 10).unwrap();
    assert_eq!((rest.items.len(), rest.last), (1, 3));
    // Items never print their values (they hold keys).
    assert!(!format!("{:?}", rest.items).contains("value:"));
}

#[test]
fn clients_malformed_items_are_refused_whole() {
    let a = site("site a password");
    let b = site("site b password");
    a.sync.changes("b", None, 1).unwrap();
    a.server.add(Some(cid(1)), None).unwrap();
    a.server.add(Some(cid(2)), None).unwrap();
    let good = a.sync.changes("b", None, 10).unwrap().items;
    let t = good[0].clone();
    let with = |at: usize, byte: u8| {
        let mut v = t.value.clone();
        v[at] = byte;
        v
    };
    for (key, value) in [
        (vec![0; 8], t.value.clone()),                                         // client id 0
        (vec![0, 0, 0, 1], t.value.clone()),                                   // short id
        (t.key.clone(), with(0, 2)),                                           // unknown format
        (t.key.clone(), [&t.value[..1], &[0; 8][..], &t.value[9..]].concat()), // version 0
        (t.key.clone(), with(9, 2)),                                           // disabled neither 0 nor 1
        (t.key.clone(), with(19, 200)),                                        // notes longer than the value
        (t.key.clone(), t.value[..t.value.len() - 10].to_vec()),               // key of 10 bytes
        (t.key.clone(), t.value[..15].to_vec()),
    ] {
        let mut page = good.clone();
        page.insert(1, Item { key, value });
        assert!(b.sync.merge("a", &page).is_err());
        assert!(b.server.list().unwrap().is_empty());
    }
    assert_eq!(b.sync.merge("a", &good).unwrap().applied, 2);
}

/// Digest and merge costs of the counters dataset:
/// `cargo test --release -p validator --test sync_stores -- --ignored --nocapture bench_counters_sync`
#[test]
#[ignore = "benchmark: run with --ignored --nocapture"]
fn bench_counters_sync() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let opts = CounterOptions { synchronous: Synchronous::Normal, ..CounterOptions::default() };
    let source = SqliteCounters::open_with(&dir.path().join("source.db"), opts).unwrap();
    source.changes("target", None, 1).unwrap();
    let mut filled = 0u64;
    for total in [100_000u64, 1_000_000] {
        fill(&source, filled + 1..total + 1, 1, "bench-nonce-0001");
        filled = total;
        let started = Instant::now();
        let digest = source.digest().unwrap();
        println!("digest over {total} counters: {:.3} s ({digest:?})", started.elapsed().as_secs_f64());
        let started = Instant::now();
        let bucket = source.bucket(7).unwrap();
        println!("one bucket of {total} counters ({} items): {:.3} s", bucket.len(), started.elapsed().as_secs_f64());
        if total == 100_000 {
            // Merge 100,000 in pages of 2,000, through the trait (FULL).
            let target = SqliteCounters::open(&dir.path().join("target.db")).unwrap();
            let started = Instant::now();
            let mut cursor = None;
            let applied = pull(&source, &target, "target", "source", &mut cursor, 2000);
            println!(
                "catch-up of {total} counters, pages of 2,000 (changes + merge, FULL): {:.2} s ({applied} applied)",
                started.elapsed().as_secs_f64()
            );
            // The merges alone: 50 pages of 2,000 into a fresh store (FULL).
            let pages: Vec<Vec<Item>> =
                (0..=255u8).flat_map(|b| source.bucket(b).unwrap()).collect::<Vec<_>>().chunks(2000).map(<[Item]>::to_vec).collect();
            let fresh = SqliteCounters::open(&dir.path().join("fresh.db")).unwrap();
            let started = Instant::now();
            let mut applied = 0;
            for page in &pages {
                applied += fresh.merge("source", page).unwrap().applied;
            }
            println!(
                "merge of {total} counters in {} pages of 2,000 (merge only, FULL): {:.2} s ({applied} applied)",
                pages.len(),
                started.elapsed().as_secs_f64()
            );
            let items = source.bucket(9).unwrap();
            let started = Instant::now();
            let m = target.merge("source", &items).unwrap();
            println!("merge of one bucket again ({} items, unchanged): {:.3} s", m.unchanged, started.elapsed().as_secs_f64());
            assert_eq!(target.digest().unwrap(), source.digest().unwrap());
        }
    }
}

#[test]
fn counters_buckets_come_from_the_stored_column_and_old_rows_are_filled_in() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.db");
    let a = counters_at(&path);
    fill(&a, 1..200, 2, "bucket-nonce-001");
    let before: Vec<Vec<Item>> = (0..=255u8).map(|b| a.bucket(b).unwrap()).collect();
    // Rows as an older binary writes them: no bucket (-1).
    let conn = rusqlite::Connection::open(&path).unwrap();
    assert_eq!(conn.execute("UPDATE counters SET sync_bucket = -1 WHERE counter = 2", []).unwrap(), 199);
    let after: Vec<Vec<Item>> = (0..=255u8).map(|b| a.bucket(b).unwrap()).collect();
    assert_eq!(before, after);
    drop(a);
    let a = counters_at(&path);
    let missing: i64 = conn.query_row("SELECT count(*) FROM counters WHERE sync_bucket = -1", [], |r| r.get(0)).unwrap();
    assert_eq!(missing, 0);
    let stored: Vec<(String, i64)> = conn
        .prepare("SELECT public_id, sync_bucket FROM counters")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert!(stored.iter().all(|(id, b)| i64::from(bucket_of(id.as_bytes())) == *b));
    assert_eq!((0..=255u8).map(|b| a.bucket(b).unwrap()).collect::<Vec<_>>(), before);
}
