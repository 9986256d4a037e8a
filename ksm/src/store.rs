//! The AEAD store: SQLite (bundled), WAL, `synchronous = FULL`.
//!
//! One row per (public id, key handle) with the nonce, the blob, a SHA-256
//! digest of nonce ‖ AEAD, the time it was added and where it came from.
//! The primary key makes a lookup one B-tree probe. Adding a pair that exists
//! with *different* bytes is refused and the newcomer is kept in
//! `aead_conflicts` for inspection: nothing is ever silently overwritten.
//!
//! **Connections.** One writer connection, used by [`AeadStore::put_many`]
//! (one `IMMEDIATE` transaction, so one fsync, per batch), and a small pool
//! of read-only connections for [`AeadStore::get`], which the HTTP service
//! calls from many threads at once. In WAL mode readers never wait for the
//! writer, nor for each other. A full scan ([`AeadStore::for_each`]) opens
//! a connection of its own so that it does not hold a pool slot.
//!
//! **Replication.** An outbox filled by a trigger on `aeads` (so that
//! imports by other processes are covered), per-peer cursors and a merge
//! that never overwrites: see [`AeadStore::ack_peer`],
//! [`AeadStore::outbox_after`] and [`AeadStore::merge_from_peer`]. The
//! tables are created when missing, so an older file gains them when
//! opened. The `SyncStore` adapter is in the validator
//! (`validator::aead_sync`): this crate does not depend on the replication
//! crate.
//!
//! The database file is created with mode 0600; SQLite gives its `-wal` and
//! `-shm` files the same mode.

use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use otp::aead_file::AeadRecord;
use otp::{Aead, AeadNonce, KeyHandle, PublicId};
use rusqlite::{params, Connection, OpenFlags, OptionalExtension, TransactionBehavior};
use sha2::{Digest, Sha256};

use crate::aead_dir::KeyHandleDir;
use crate::outbox::Outbox;
pub use crate::outbox::PeerPosition;
use crate::{AeadLookup, LookupError};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS aeads (
    public_id  BLOB    NOT NULL,
    key_handle INTEGER NOT NULL,
    nonce      BLOB    NOT NULL,
    aead       BLOB    NOT NULL,
    digest     BLOB    NOT NULL,
    created    INTEGER NOT NULL,
    origin     TEXT    NOT NULL,
    PRIMARY KEY (public_id, key_handle)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS aead_conflicts (
    id         INTEGER PRIMARY KEY,
    public_id  BLOB    NOT NULL,
    key_handle INTEGER NOT NULL,
    nonce      BLOB    NOT NULL,
    aead       BLOB    NOT NULL,
    digest     BLOB    NOT NULL,
    seen       INTEGER NOT NULL,
    origin     TEXT    NOT NULL
);
CREATE INDEX IF NOT EXISTS aead_conflicts_pair ON aead_conflicts (public_id, key_handle);
CREATE TABLE IF NOT EXISTS aead_outbox (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    public_id  BLOB    NOT NULL,
    key_handle INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS aead_peer_cursors (
    peer       TEXT    NOT NULL PRIMARY KEY,
    acked_seq  INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TRIGGER IF NOT EXISTS aead_outbox_insert AFTER INSERT ON aeads
    WHEN substr(NEW.origin, 1, 5) <> 'peer:' AND EXISTS (SELECT 1 FROM aead_peer_cursors)
    BEGIN INSERT INTO aead_outbox (public_id, key_handle) VALUES (NEW.public_id, NEW.key_handle); END;
";

const INSERT_NEW: &str = "INSERT INTO aeads (public_id, key_handle, nonce, aead, digest, created, origin) \
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) ON CONFLICT (public_id, key_handle) DO NOTHING";
const SELECT_DIGEST: &str = "SELECT digest FROM aeads WHERE public_id = ?1 AND key_handle = ?2";
const QUARANTINED: &str = "SELECT 1 FROM aead_conflicts WHERE public_id = ?1 AND key_handle = ?2 AND digest = ?3";
const QUARANTINE: &str = "INSERT INTO aead_conflicts (public_id, key_handle, nonce, aead, digest, seen, origin) \
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)";
const SELECT_ONE: &str = "SELECT nonce, aead FROM aeads WHERE public_id = ?1 AND key_handle = ?2";
const SELECT_OUTBOX: &str = "SELECT o.seq, o.public_id, o.key_handle, a.nonce, a.aead FROM aead_outbox o \
     LEFT JOIN aeads a ON a.public_id = o.public_id AND a.key_handle = o.key_handle \
     WHERE o.seq > ?1 ORDER BY o.seq LIMIT ?2";
/// The replication outbox and its per-peer cursors.
const OUTBOX: Outbox = Outbox { table: "aead_outbox", cursors: "aead_peer_cursors" };

/// Busy timeout of every connection: how long a writer waits for another
/// process's write transaction (readers never wait in WAL mode).
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// Upper bound on the read pool, whatever the CPU count.
const MAX_READERS: usize = 32;

/// What adding one AEAD did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PutOutcome {
    /// A new row.
    Added,
    /// The same bytes were there already (imports are idempotent).
    AlreadyPresent,
    /// Different bytes are stored for the pair; the newcomer was quarantined
    /// (once: quarantining the same bytes again adds no second row).
    Conflict,
}

/// A quarantined AEAD, with what the store holds for the same pair.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Conflict {
    /// The public id.
    pub public_id: PublicId,
    /// The AEAD that was refused (its key handle is the pair's).
    pub refused: AeadRecord,
    /// When it was refused (Unix seconds).
    pub seen: i64,
    /// Where it came from.
    pub origin: String,
    /// The AEAD kept for the pair, with its creation time and origin; `None`
    /// if that row has since been removed by hand.
    pub stored: Option<(AeadRecord, i64, String)>,
}

/// One row of the replication outbox: a pair inserted here, for peers to
/// pull.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutboxAead {
    /// Position in the outbox: increasing in commit order, never reused.
    pub seq: u64,
    /// The public id.
    pub public_id: PublicId,
    /// The key handle.
    pub key_handle: KeyHandle,
    /// The stored AEAD; `None` if the row was since removed by hand.
    pub record: Option<AeadRecord>,
}

/// The SQLite AEAD store.
pub struct AeadStore {
    path: PathBuf,
    writer: Mutex<Connection>,
    readers: Vec<Mutex<Connection>>,
    next_reader: AtomicUsize,
}

impl std::fmt::Debug for AeadStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AeadStore").field("path", &self.path).field("readers", &self.readers.len()).finish()
    }
}

fn db_err(e: rusqlite::Error) -> LookupError {
    LookupError(format!("AEAD store: {e}"))
}

/// SHA-256 over nonce ‖ AEAD: what identifies the stored bytes.
#[must_use]
pub fn digest(record: &AeadRecord) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(record.nonce.as_bytes());
    h.update(record.aead.as_bytes());
    h.finalize().into()
}

/// A poisoned lock is still usable: a panic mid-statement leaves SQLite
/// consistent (it is transactional).
fn lock(m: &Mutex<Connection>) -> MutexGuard<'_, Connection> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn read_only(path: &Path) -> Result<Connection, LookupError> {
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX).map_err(db_err)?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(db_err)?;
    Ok(conn)
}

/// SQLite counts are signed; they are never negative.
fn count_at(row: &rusqlite::Row<'_>, column: usize) -> rusqlite::Result<u64> {
    row.get::<_, i64>(column).map(|n| u64::try_from(n).unwrap_or(0))
}

fn count_column(row: &rusqlite::Row<'_>) -> rusqlite::Result<u64> {
    count_at(row, 0)
}

fn blob<'a>(row: &'a rusqlite::Row<'_>, column: usize) -> Result<&'a [u8], LookupError> {
    row.get_ref(column).map_err(db_err)?.as_blob().map_err(|e| LookupError(format!("AEAD store: column {column}: {e}")))
}

/// Decode a row's columns into a record; a malformed row is named.
fn record_from(public_id: &[u8], kh: u32, nonce: &[u8], aead: &[u8]) -> Result<(PublicId, AeadRecord), LookupError> {
    let kh = KeyHandle::new(kh);
    let bad = |e: otp::Error| LookupError(format!("AEAD store row for public id {} under {kh} is damaged: {e}", hex::encode(public_id)));
    let public_id = PublicId::from_bytes(public_id).map_err(bad)?;
    Ok((
        public_id,
        AeadRecord { key_handle: kh, nonce: AeadNonce::from_slice(nonce).map_err(bad)?, aead: Aead::from_slice(aead).map_err(bad)? },
    ))
}

impl AeadStore {
    /// Open the store at `path`, creating it (mode 0600) if needed.
    pub fn open(path: &Path) -> Result<Self, LookupError> {
        match OpenOptions::new().write(true).create_new(true).mode(0o600).open(path) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(LookupError(format!("AEAD store {}: {e}", path.display()))),
        }
        Self::open_existing(path)
    }

    /// Open an existing store; a missing file is an error rather than a new,
    /// empty store (for commands that only read, such as `export`).
    pub fn open_existing(path: &Path) -> Result<Self, LookupError> {
        let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX)
            .map_err(|e| LookupError(format!("AEAD store {}: {e}", path.display())))?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(db_err)?;
        conn.pragma_update(None, "journal_mode", "WAL").map_err(db_err)?;
        conn.pragma_update(None, "synchronous", "FULL").map_err(db_err)?;
        conn.execute_batch(SCHEMA).map_err(db_err)?;
        let n = std::thread::available_parallelism().map_or(4, |n| n.get().saturating_mul(2)).clamp(2, MAX_READERS);
        let readers = (0..n).map(|_| read_only(path).map(Mutex::new)).collect::<Result<Vec<_>, _>>()?;
        Ok(Self { path: path.to_path_buf(), writer: Mutex::new(conn), readers, next_reader: AtomicUsize::new(0) })
    }

    /// The database file.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A read connection: the next one round-robin, or any idle one, or
    /// else wait for the first choice.
    fn reader(&self) -> MutexGuard<'_, Connection> {
        let n = self.readers.len();
        let start = self.next_reader.fetch_add(1, Ordering::Relaxed) % n;
        for i in 0..n {
            match self.readers[(start + i) % n].try_lock() {
                Ok(guard) => return guard,
                Err(std::sync::TryLockError::Poisoned(p)) => return p.into_inner(),
                Err(std::sync::TryLockError::WouldBlock) => {}
            }
        }
        lock(&self.readers[start])
    }

    /// Add one AEAD, atomically; see [`PutOutcome`]. `now` is Unix seconds.
    pub fn put(&self, public_id: &PublicId, record: &AeadRecord, origin: &str, now: i64) -> Result<PutOutcome, LookupError> {
        let outcomes = self.put_many(&[(*public_id, *record)], origin, now)?;
        outcomes.first().copied().ok_or_else(|| LookupError("AEAD store: no outcome for a put".to_owned()))
    }

    /// Add AEADs in one transaction: all of them or none, with one fsync.
    /// Returns one [`PutOutcome`] per row, in order. A pair repeated within
    /// `rows` is compared with its first occurrence.
    pub fn put_many(&self, rows: &[(PublicId, AeadRecord)], origin: &str, now: i64) -> Result<Vec<PutOutcome>, LookupError> {
        let mut outcomes = Vec::with_capacity(rows.len());
        if rows.is_empty() {
            return Ok(outcomes);
        }
        let mut conn = lock(&self.writer);
        // IMMEDIATE takes the write lock up front: a deferred transaction
        // that reads first could not upgrade if another process wrote since.
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(db_err)?;
        {
            let mut insert = tx.prepare_cached(INSERT_NEW).map_err(db_err)?;
            let mut select = tx.prepare_cached(SELECT_DIGEST).map_err(db_err)?;
            let mut quarantined = tx.prepare_cached(QUARANTINED).map_err(db_err)?;
            let mut quarantine = tx.prepare_cached(QUARANTINE).map_err(db_err)?;
            for (public_id, record) in rows {
                let d = digest(record);
                let (id, kh, nonce, aead) =
                    (public_id.as_bytes(), record.key_handle.get(), &record.nonce.as_bytes()[..], record.aead.as_bytes());
                if insert.execute(params![id, kh, nonce, aead, &d[..], now, origin]).map_err(db_err)? == 1 {
                    outcomes.push(PutOutcome::Added);
                    continue;
                }
                let stored: Vec<u8> = select.query_row(params![id, kh], |r| r.get(0)).map_err(db_err)?;
                if stored == d {
                    outcomes.push(PutOutcome::AlreadyPresent);
                    continue;
                }
                // The pair exists with other bytes: quarantine the newcomer
                // (once), never replace what is stored.
                if !quarantined.exists(params![id, kh, &d[..]]).map_err(db_err)? {
                    quarantine.execute(params![id, kh, nonce, aead, &d[..], now, origin]).map_err(db_err)?;
                }
                outcomes.push(PutOutcome::Conflict);
            }
        }
        tx.commit().map_err(db_err)?;
        Ok(outcomes)
    }

    /// The stored AEAD for (public id, key handle).
    pub fn get(&self, public_id: &PublicId, kh: KeyHandle) -> Result<Option<AeadRecord>, LookupError> {
        let conn = self.reader();
        let row: Option<(Vec<u8>, Vec<u8>)> = conn
            .prepare_cached(SELECT_ONE)
            .map_err(db_err)?
            .query_row(params![public_id.as_bytes(), kh.get()], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()
            .map_err(db_err)?;
        drop(conn);
        let Some((nonce, aead)) = row else { return Ok(None) };
        record_from(public_id.as_bytes(), kh.get(), &nonce, &aead).map(|(_, record)| Some(record))
    }

    /// How many AEADs are stored.
    pub fn count(&self) -> Result<u64, LookupError> {
        self.reader().query_row("SELECT count(*) FROM aeads", [], count_column).map_err(db_err)
    }

    /// How many AEADs are stored under each key handle, by handle.
    pub fn count_by_key_handle(&self) -> Result<Vec<(KeyHandle, u64)>, LookupError> {
        let conn = self.reader();
        let mut stmt =
            conn.prepare_cached("SELECT key_handle, count(*) FROM aeads GROUP BY key_handle ORDER BY key_handle").map_err(db_err)?;
        let rows = stmt.query_map([], |r| Ok((KeyHandle::new(r.get(0)?), count_at(r, 1)?))).map_err(db_err)?;
        rows.collect::<Result<_, _>>().map_err(db_err)
    }

    /// How many conflicting AEADs are quarantined.
    pub fn conflict_count(&self) -> Result<u64, LookupError> {
        self.reader().query_row("SELECT count(*) FROM aead_conflicts", [], count_column).map_err(db_err)
    }

    /// Every quarantined AEAD, oldest first, beside what is stored for its pair.
    pub fn conflicts(&self) -> Result<Vec<Conflict>, LookupError> {
        type Row = (Vec<u8>, u32, Vec<u8>, Vec<u8>, i64, String, Option<Vec<u8>>, Option<Vec<u8>>, Option<i64>, Option<String>);
        let conn = self.reader();
        let mut stmt = conn
            .prepare_cached(
                "SELECT c.public_id, c.key_handle, c.nonce, c.aead, c.seen, c.origin, a.nonce, a.aead, a.created, a.origin \
                 FROM aead_conflicts c LEFT JOIN aeads a ON a.public_id = c.public_id AND a.key_handle = c.key_handle \
                 ORDER BY c.id",
            )
            .map_err(db_err)?;
        let rows = stmt
            .query_map([], |r| -> rusqlite::Result<Row> {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?, r.get(6)?, r.get(7)?, r.get(8)?, r.get(9)?))
            })
            .map_err(db_err)?;
        let mut out = Vec::new();
        for row in rows {
            let (id, kh, nonce, aead, seen, origin, s_nonce, s_aead, s_created, s_origin) = row.map_err(db_err)?;
            let (public_id, refused) = record_from(&id, kh, &nonce, &aead)?;
            let stored = match (s_nonce, s_aead, s_created, s_origin) {
                (Some(n), Some(a), Some(c), Some(o)) => Some((record_from(&id, kh, &n, &a)?.1, c, o)),
                _ => None,
            };
            out.push(Conflict { public_id, refused, seen, origin, stored });
        }
        Ok(out)
    }

    /// Call `f` on every stored AEAD, in (public id, key handle) order,
    /// streaming: memory stays constant whatever the store's size. The scan
    /// reads one consistent snapshot. An error from `f` stops it.
    pub fn for_each<E: From<LookupError>>(&self, mut f: impl FnMut(PublicId, AeadRecord) -> Result<(), E>) -> Result<(), E> {
        let conn = read_only(&self.path)?;
        let mut stmt =
            conn.prepare("SELECT public_id, key_handle, nonce, aead FROM aeads ORDER BY public_id, key_handle").map_err(db_err)?;
        let mut rows = stmt.query([]).map_err(db_err)?;
        while let Some(row) = rows.next().map_err(db_err)? {
            let kh = row.get::<_, u32>(1).map_err(db_err)?;
            let (public_id, record) = record_from(blob(row, 0)?, kh, blob(row, 2)?, blob(row, 3)?)?;
            f(public_id, record)?;
        }
        Ok(())
    }
}

/// # Replication
///
/// **Outbox.** A trigger on `aeads` appends `aead_outbox(seq, public_id,
/// key_handle)` for every pair inserted here — by this process or by `ksm
/// import` in another one — but only while some peer is registered in
/// `aead_peer_cursors(peer, acked_seq)`: a lone site keeps no outbox (a
/// peer joining later starts with a full comparison of digests). `seq`
/// grows in commit order and is never reused (`AUTOINCREMENT`). Pairs
/// merged from a peer (origin `peer:<name>`) are not appended, as for the
/// counters: every site pulls from every other one, and an import of a
/// million AEADs does not travel back to where it came from.
///
/// **Merge.** [`AeadStore::merge_from_peer`] is [`AeadStore::put_many`]
/// with the peer as the origin: new pairs are inserted, a pair held with
/// other bytes is quarantined (once) and never overwritten.
impl AeadStore {
    /// Register `peer` with cursor 0 if it is unknown: from now on inserted
    /// pairs are kept in the outbox until it acknowledges them.
    pub fn add_peer(&self, peer: &str) -> Result<(), LookupError> {
        self.ack_peer(peer, None).map(drop)
    }

    /// Forget `peer`: it no longer holds back compaction.
    pub fn remove_peer(&self, peer: &str) -> Result<(), LookupError> {
        OUTBOX.remove(&lock(&self.writer), peer).map_err(db_err)
    }

    /// Record that `peer` holds every outbox row up to `acked` (registering
    /// it if unknown; `None` only registers), compact the rows every known
    /// peer holds, and answer its cursor ([`Outbox`]). A pull that moves
    /// nothing is answered from a read connection.
    pub fn ack_peer(&self, peer: &str, acked: Option<u64>) -> Result<PeerPosition, LookupError> {
        if let Some(position) = OUTBOX.unchanged(&self.reader(), peer, acked).map_err(db_err)? {
            return Ok(position);
        }
        OUTBOX.ack(&mut lock(&self.writer), peer, acked).map_err(db_err)
    }

    /// Every known peer and its acknowledged cursor, by name.
    pub fn peer_cursors(&self) -> Result<Vec<(String, u64)>, LookupError> {
        OUTBOX.cursors(&self.reader()).map_err(db_err)
    }

    /// Delete the outbox rows every known peer has acknowledged (none while
    /// no peer is known); how many.
    pub fn compact(&self) -> Result<u64, LookupError> {
        OUTBOX.compact(&lock(&self.writer)).map_err(db_err)
    }

    /// The highest `seq` ever appended to the outbox (0 before the first).
    pub fn outbox_last_seq(&self) -> Result<u64, LookupError> {
        OUTBOX.head(&self.reader()).map_err(db_err)
    }

    /// Up to `limit` outbox rows after `after`, in `seq` order, with the
    /// AEADs they name (committed state).
    pub fn outbox_after(&self, after: u64, limit: usize) -> Result<Vec<OutboxAead>, LookupError> {
        let after = i64::try_from(after).unwrap_or(i64::MAX);
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let conn = self.reader();
        let mut stmt = conn.prepare_cached(SELECT_OUTBOX).map_err(db_err)?;
        let mut rows = stmt.query(params![after, limit]).map_err(db_err)?;
        let mut out = Vec::new();
        while let Some(row) = rows.next().map_err(db_err)? {
            let seq = count_at(row, 0).map_err(db_err)?;
            let kh: u32 = row.get(2).map_err(db_err)?;
            let id = blob(row, 1)?;
            let nonce = row.get_ref(3).map_err(db_err)?.as_blob_or_null().map_err(|e| LookupError(format!("AEAD store: {e}")))?;
            let aead = row.get_ref(4).map_err(db_err)?.as_blob_or_null().map_err(|e| LookupError(format!("AEAD store: {e}")))?;
            let (public_id, record) = match (nonce, aead) {
                (Some(n), Some(a)) => {
                    let (public_id, record) = record_from(id, kh, n, a)?;
                    (public_id, Some(record))
                }
                _ => (PublicId::from_bytes(id).map_err(|e| LookupError(format!("AEAD store: outbox row {seq} is damaged: {e}")))?, None),
            };
            out.push(OutboxAead { seq, public_id, key_handle: KeyHandle::new(kh), record });
        }
        Ok(out)
    }

    /// Merge a peer's AEADs: [`Self::put_many`] with origin `peer:<name>`.
    /// New pairs are added (not to this site's outbox); a pair held with
    /// other bytes is quarantined once and reported
    /// [`PutOutcome::Conflict`], never overwritten. Durable on return.
    pub fn merge_from_peer(&self, peer: &str, rows: &[(PublicId, AeadRecord)], now: i64) -> Result<Vec<PutOutcome>, LookupError> {
        self.put_many(rows, &format!("peer:{peer}"), now)
    }
}

impl AeadLookup for AeadStore {
    fn lookup(&self, public_id: &PublicId, kh: &KeyHandleDir) -> Result<Option<AeadRecord>, LookupError> {
        self.get(public_id, kh.key_handle)
    }

    /// One read through the pool: the file is readable and is an AEAD store.
    fn check(&self) -> Result<(), LookupError> {
        self.reader().query_row("SELECT count(*) FROM (SELECT 1 FROM aeads LIMIT 1)", [], |_| Ok(())).map_err(db_err)
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;
    use std::sync::Arc;

    use super::*;

    fn record(kh: u32, byte: u8) -> AeadRecord {
        AeadRecord {
            key_handle: KeyHandle::new(kh),
            nonce: AeadNonce::new([0, 0, 0, 0, 0, 1]),
            aead: Aead::from_slice(&[byte; 30]).unwrap(),
        }
    }

    #[test]
    fn put_is_idempotent_and_never_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("aeads.db");
        let store = AeadStore::open(&path).unwrap();
        let id = PublicId::from_number(1, 6).unwrap();
        assert_eq!(store.put(&id, &record(1, 1), "test", 10).unwrap(), PutOutcome::Added);
        assert_eq!(store.put(&id, &record(1, 1), "test", 11).unwrap(), PutOutcome::AlreadyPresent);
        assert_eq!(store.put(&id, &record(1, 2), "other", 12).unwrap(), PutOutcome::Conflict);
        assert_eq!(store.put(&id, &record(2, 2), "test", 13).unwrap(), PutOutcome::Added);
        assert_eq!(store.conflict_count().unwrap(), 1);
        drop(store);
        // Durable and unchanged after reopening.
        let store = AeadStore::open(&path).unwrap();
        assert_eq!(store.get(&id, KeyHandle::new(1)).unwrap(), Some(record(1, 1)));
        assert_eq!(store.get(&id, KeyHandle::new(2)).unwrap(), Some(record(2, 2)));
        assert_eq!(store.get(&id, KeyHandle::new(3)).unwrap(), None);
        assert_eq!(store.get(&PublicId::from_number(2, 6).unwrap(), KeyHandle::new(1)).unwrap(), None);
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    }

    #[test]
    fn put_many_counts_lists_and_quarantines_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = AeadStore::open(&dir.path().join("aeads.db")).unwrap();
        let id = |n| PublicId::from_number(n, 6).unwrap();
        let rows = [(id(1), record(1, 1)), (id(2), record(1, 2)), (id(1), record(1, 1)), (id(1), record(1, 9)), (id(1), record(7, 1))];
        use PutOutcome::*;
        assert_eq!(store.put_many(&rows, "batch", 5).unwrap(), [Added, Added, AlreadyPresent, Conflict, Added]);
        assert_eq!(store.put_many(&rows, "batch", 6).unwrap(), [AlreadyPresent, AlreadyPresent, AlreadyPresent, Conflict, AlreadyPresent]);
        assert!(store.put_many(&[], "none", 7).unwrap().is_empty());
        assert_eq!(store.count().unwrap(), 3);
        assert_eq!(store.count_by_key_handle().unwrap(), [(KeyHandle::new(1), 2), (KeyHandle::new(7), 1)]);
        // The same refused bytes are quarantined once, however often they come.
        assert_eq!(store.conflict_count().unwrap(), 1);
        let conflicts = store.conflicts().unwrap();
        assert_eq!(conflicts.len(), 1);
        let c = &conflicts[0];
        assert_eq!((c.public_id, c.refused, c.seen, c.origin.as_str()), (id(1), record(1, 9), 5, "batch"));
        assert_eq!(c.stored, Some((record(1, 1), 5, "batch".to_owned())));
        let mut seen = Vec::new();
        store
            .for_each(|public_id, rec| {
                seen.push((public_id, rec));
                Ok::<_, LookupError>(())
            })
            .unwrap();
        assert_eq!(seen, [(id(1), record(1, 1)), (id(1), record(7, 1)), (id(2), record(1, 2))]);
        // The callback's error stops the scan.
        let mut calls = 0;
        let r = store.for_each(|_, _| {
            calls += 1;
            Err(LookupError("stop".to_owned()))
        });
        assert_eq!((r.unwrap_err().0, calls), ("stop".to_owned(), 1));
    }

    #[test]
    fn concurrent_readers_see_committed_writes() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(AeadStore::open(&dir.path().join("aeads.db")).unwrap());
        let rows: Vec<_> = (1..=200).map(|n| (PublicId::from_number(n, 6).unwrap(), record(1, n as u8))).collect();
        store.put_many(&rows, "test", 1).unwrap();
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let (store, rows) = (store.clone(), rows.clone());
                std::thread::spawn(move || {
                    for (i, (id, rec)) in rows.iter().enumerate().skip(t) {
                        assert_eq!(store.get(id, KeyHandle::new(1)).unwrap().as_ref(), Some(rec), "row {i}");
                    }
                })
            })
            .collect();
        // A writer at the same time does not disturb them.
        store.put(&PublicId::from_number(999, 6).unwrap(), &record(2, 3), "test", 2).unwrap();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(store.count().unwrap(), 201);
    }

    #[test]
    fn damaged_rows_and_files_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("aeads.db");
        let store = AeadStore::open(&path).unwrap();
        let id = PublicId::from_number(1, 6).unwrap();
        store.put(&id, &record(1, 1), "test", 1).unwrap();
        lock(&store.writer).execute("UPDATE aeads SET aead = x'00'", []).unwrap();
        assert!(store.get(&id, KeyHandle::new(1)).unwrap_err().0.contains("damaged"));
        assert!(store.for_each(|_, _| Ok::<_, LookupError>(())).unwrap_err().0.contains("damaged"));
        store.check().unwrap();
        lock(&store.writer).execute("DROP TABLE aeads", []).unwrap();
        assert!(store.check().is_err());
        let junk = dir.path().join("junk.db");
        std::fs::write(&junk, b"this is not a database, just some text that is long enough").unwrap();
        assert!(AeadStore::open(&junk).is_err());
        assert!(AeadStore::open_existing(&dir.path().join("missing.db")).is_err());
        assert!(!dir.path().join("missing.db").exists());
    }
}
