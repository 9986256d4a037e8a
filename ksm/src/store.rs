//! The AEAD store: SQLite (bundled), WAL, `synchronous = FULL`.
//!
//! One row per (public id, key handle) with the nonce, the blob, a SHA-256
//! digest of nonce ‖ AEAD, the time it was added and where it came from.
//! The primary key makes a lookup one B-tree probe. Adding a pair that exists
//! with *different* bytes is refused and the newcomer is kept in
//! `aead_conflicts` for inspection: nothing is ever silently overwritten.

use std::path::Path;
use std::sync::Mutex;

use otp::aead_file::AeadRecord;
use otp::{Aead, AeadNonce, KeyHandle, PublicId};
use rusqlite::{params, Connection, OptionalExtension};
use sha2::{Digest, Sha256};

use crate::aead_dir::KeyHandleDir;
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
";

/// What adding one AEAD did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PutOutcome {
    /// A new row.
    Added,
    /// The same bytes were there already (imports are idempotent).
    AlreadyPresent,
    /// Different bytes are stored for the pair; the newcomer was quarantined.
    Conflict,
}

/// The SQLite AEAD store.
pub struct AeadStore {
    conn: Mutex<Connection>,
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

impl AeadStore {
    /// Open (creating if needed) the store at `path`.
    pub fn open(path: &Path) -> Result<Self, LookupError> {
        let conn = Connection::open(path).map_err(db_err)?;
        conn.pragma_update(None, "journal_mode", "WAL").map_err(db_err)?;
        conn.pragma_update(None, "synchronous", "FULL").map_err(db_err)?;
        conn.busy_timeout(std::time::Duration::from_secs(5)).map_err(db_err)?;
        conn.execute_batch(SCHEMA).map_err(db_err)?;
        Ok(Self { conn: Mutex::new(conn) })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        // A panic mid-statement leaves SQLite consistent (it is transactional).
        self.conn.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Add one AEAD, atomically; see [`PutOutcome`]. `now` is Unix seconds.
    pub fn put(&self, public_id: &PublicId, record: &AeadRecord, origin: &str, now: i64) -> Result<PutOutcome, LookupError> {
        let d = digest(record);
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(db_err)?;
        let existing: Option<Vec<u8>> = tx
            .query_row(
                "SELECT digest FROM aeads WHERE public_id = ?1 AND key_handle = ?2",
                params![public_id.as_bytes(), record.key_handle.get()],
                |r| r.get(0),
            )
            .optional()
            .map_err(db_err)?;
        // The pair exists with other bytes: quarantine the newcomer instead.
        let (outcome, sql) = match existing {
            Some(stored) if stored == d => (PutOutcome::AlreadyPresent, None),
            Some(_) => (
                PutOutcome::Conflict,
                Some("INSERT INTO aead_conflicts (public_id, key_handle, nonce, aead, digest, seen, origin) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)"),
            ),
            None => (
                PutOutcome::Added,
                Some("INSERT INTO aeads (public_id, key_handle, nonce, aead, digest, created, origin) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)"),
            ),
        };
        if let Some(sql) = sql {
            let nonce = &record.nonce.as_bytes()[..];
            tx.execute(sql, params![public_id.as_bytes(), record.key_handle.get(), nonce, record.aead.as_bytes(), &d[..], now, origin])
                .map_err(db_err)?;
        }
        tx.commit().map_err(db_err)?;
        Ok(outcome)
    }

    /// The stored AEAD for (public id, key handle).
    pub fn get(&self, public_id: &PublicId, kh: KeyHandle) -> Result<Option<AeadRecord>, LookupError> {
        let row: Option<(Vec<u8>, Vec<u8>)> = self
            .conn()
            .prepare_cached("SELECT nonce, aead FROM aeads WHERE public_id = ?1 AND key_handle = ?2")
            .map_err(db_err)?
            .query_row(params![public_id.as_bytes(), kh.get()], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()
            .map_err(db_err)?;
        let Some((nonce, aead)) = row else { return Ok(None) };
        let bad = |e: otp::Error| LookupError(format!("AEAD store row for {public_id} under {kh} is damaged: {e}"));
        Ok(Some(AeadRecord {
            key_handle: kh,
            nonce: AeadNonce::from_slice(&nonce).map_err(bad)?,
            aead: Aead::from_slice(&aead).map_err(bad)?,
        }))
    }

    /// How many conflicting AEADs are quarantined.
    pub fn conflict_count(&self) -> Result<i64, LookupError> {
        self.conn().query_row("SELECT count(*) FROM aead_conflicts", [], |r| r.get(0)).map_err(db_err)
    }
}

impl AeadLookup for AeadStore {
    fn lookup(&self, public_id: &PublicId, kh: &KeyHandleDir) -> Result<Option<AeadRecord>, LookupError> {
        self.get(public_id, kh.key_handle)
    }
}

#[cfg(test)]
mod tests {
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
    }

    #[test]
    fn damaged_rows_and_files_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("aeads.db");
        let store = AeadStore::open(&path).unwrap();
        let id = PublicId::from_number(1, 6).unwrap();
        store.put(&id, &record(1, 1), "test", 1).unwrap();
        store.conn().execute("UPDATE aeads SET aead = x'00'", []).unwrap();
        assert!(store.get(&id, KeyHandle::new(1)).unwrap_err().0.contains("damaged"));
        let junk = dir.path().join("junk.db");
        std::fs::write(&junk, b"this is not a database, just some text that is long enough").unwrap();
        assert!(AeadStore::open(&junk).is_err());
    }
}
