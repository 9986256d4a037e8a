//! The audit log: every operation, append-only, hash-chained, with signed
//! checkpoints.
//!
//! # What is stored
//!
//! `audit.db` (SQLite, WAL, `synchronous = FULL`) holds two tables:
//!
//! * `entries`: one row per [`AuditEvent`] — sequence number (1, 2, …),
//!   time (Unix seconds, UTC), operator, action, approvers, outcome and the
//!   detail JSON — plus the previous entry's hash and the entry's own hash:
//!   `hash_i = SHA-256(hash_{i-1} || canonical(entry_i))`, where the
//!   canonical encoding ([`AuditEntry::canonical_bytes`]) is a domain tag
//!   followed by length-prefixed fields, the sequence number included. The
//!   first entry follows [`genesis_hash`].
//! * `checkpoints`: signed statements "the log has `count` entries, the
//!   last is `last_seq` and its hash is `head_hash`", each also binding the
//!   hash of the previous checkpoint's signature. [`AuditLog::checkpoint`]
//!   takes one (the commands do at the end of every run) with the
//!   personalizer's RSA-2048 signing key.
//!
//! Triggers refuse `UPDATE` and `DELETE` on both tables. Someone with the
//! `sqlite3` shell can drop them; what catches that is [`verify`].
//!
//! The latest checkpoint is also written to `audit.head` beside the
//! database (mode 0600, replaced atomically). Deleting the tail of the log
//! — its last entries together with their checkpoint rows — leaves the
//! database behind that file, and is reported. (Whoever can also roll
//! `audit.head` back to an older copy can truncate undetected; print or
//! copy the head off the machine where that matters.)
//!
//! # What is never stored
//!
//! Secrets. An [`AuditEvent`] carries names, counts and public-id ranges;
//! the log stores exactly that.
//!
//! # Entries without a checkpoint
//!
//! Entries after the last signed checkpoint are written either by a
//! command that stopped (crash, power loss) before its checkpoint, or by
//! someone who appended rows without the signing key. Nothing in the file
//! tells the two apart, so [`verify`] fails on them. When [`AuditLog::open`]
//! finds such entries it records an [`UNSIGNED_FOUND_ACTION`] entry naming
//! them before anything else, so that the next checkpoint does not sign
//! them silently; [`verify`] lists those entries as notes.

use std::collections::HashMap;
use std::fmt;
use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hsm::fsutil::{write_atomic, Mode};
use hsm::signing::{SigningError, SigningKey, VerifyingKey};
use rusqlite::{params, Connection, OpenFlags, OptionalExtension, TransactionBehavior};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::event::{AuditEvent, AuditSink};

/// A SHA-256 digest.
pub type Hash = [u8; 32];

/// Domain tag at the start of every entry's canonical encoding.
pub const ENTRY_TAG: &[u8] = b"personalizer audit entry v1";
/// Domain tag at the start of every checkpoint's signed bytes.
pub const CHECKPOINT_TAG: &[u8] = b"personalizer audit checkpoint v1";
/// Hashed into the chain's starting value, [`genesis_hash`].
const GENESIS_TAG: &[u8] = b"personalizer audit genesis v1";
/// `PRAGMA user_version` of the schema below.
const SCHEMA_VERSION: i64 = 1;
/// The action of the entry [`AuditLog::open`] records when it finds
/// entries after the last checkpoint.
pub const UNSIGNED_FOUND_ACTION: &str = "audit.unsigned-found";
/// `"format"` of the `audit.head` file.
const HEAD_FORMAT: &str = "personalizer-audit-head-v1";

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS entries (
    seq       INTEGER PRIMARY KEY,
    time      INTEGER NOT NULL,
    operator  TEXT,
    action    TEXT NOT NULL,
    approvers TEXT NOT NULL,
    outcome   TEXT NOT NULL,
    detail    TEXT NOT NULL,
    prev_hash BLOB NOT NULL,
    hash      BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS checkpoints (
    number              INTEGER PRIMARY KEY,
    last_seq            INTEGER NOT NULL,
    head_hash           BLOB NOT NULL,
    count               INTEGER NOT NULL,
    time                INTEGER NOT NULL,
    prev_signature_hash BLOB NOT NULL,
    key_fingerprint     TEXT NOT NULL,
    signature           BLOB NOT NULL
);
";

const TRIGGERS: &str = "
CREATE TRIGGER IF NOT EXISTS entries_no_update BEFORE UPDATE ON entries
BEGIN SELECT RAISE(ABORT, 'audit entries are append-only: UPDATE is refused'); END;
CREATE TRIGGER IF NOT EXISTS entries_no_delete BEFORE DELETE ON entries
BEGIN SELECT RAISE(ABORT, 'audit entries are append-only: DELETE is refused'); END;
CREATE TRIGGER IF NOT EXISTS checkpoints_no_update BEFORE UPDATE ON checkpoints
BEGIN SELECT RAISE(ABORT, 'audit checkpoints are append-only: UPDATE is refused'); END;
CREATE TRIGGER IF NOT EXISTS checkpoints_no_delete BEFORE DELETE ON checkpoints
BEGIN SELECT RAISE(ABORT, 'audit checkpoints are append-only: DELETE is refused'); END;
";

const ENTRY_COLUMNS: &str = "seq, time, operator, action, approvers, outcome, detail, prev_hash, hash";
const CHECKPOINT_COLUMNS: &str = "number, last_seq, head_hash, count, time, prev_signature_hash, key_fingerprint, signature";

/// The hash the first entry chains from: SHA-256 of a domain tag.
#[must_use]
pub fn genesis_hash() -> Hash {
    Sha256::digest(GENESIS_TAG).into()
}

/// `SHA-256(prev || canonical)`: one link of the chain.
#[must_use]
pub fn chain_hash(prev: &Hash, canonical: &[u8]) -> Hash {
    let mut h = Sha256::new();
    h.update(prev);
    h.update(canonical);
    h.finalize().into()
}

/// Errors of the audit log.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuditError {
    /// The database could not be opened, read or written.
    #[error("audit log {path}: {reason}")]
    Database {
        /// The database file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// The log or its head file has been tampered with (or damaged); the
    /// sentence says what was found. Run [`verify`] for the full report.
    #[error("the audit log does not check out: {0}")]
    Tampered(String),
    /// Signing a checkpoint failed.
    #[error("cannot sign the audit checkpoint: {0}")]
    Signing(#[from] SigningError),
    /// Writing the head file failed.
    #[error(transparent)]
    Hsm(#[from] hsm::Error),
    /// Writing an export failed.
    #[error("cannot write the audit export: {0}")]
    Export(std::io::Error),
}

fn db_error(path: &Path, e: impl fmt::Display) -> AuditError {
    AuditError::Database { path: path.to_path_buf(), reason: e.to_string() }
}

/// One entry as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditEntry {
    /// Sequence number: 1, 2, 3, … without gaps.
    pub seq: u64,
    /// When it was recorded, Unix seconds (UTC).
    pub time: i64,
    /// The operator whose session ran it.
    pub operator: Option<String>,
    /// The action, e.g. `generate`.
    pub action: String,
    /// The operators whose approvals it consumed.
    pub approvers: Vec<String>,
    /// `ok` or `refused`.
    pub outcome: String,
    /// The detail JSON, exactly as stored (and hashed).
    pub detail: String,
    /// The previous entry's hash ([`genesis_hash`] for entry 1).
    pub prev_hash: Hash,
    /// This entry's hash as stored.
    pub hash: Hash,
}

/// Appends `bytes` with a big-endian u64 length prefix.
fn put_field(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u64).to_be_bytes());
    out.extend_from_slice(bytes);
}

impl AuditEntry {
    /// The canonical encoding the chain hashes: the length-prefixed
    /// [`ENTRY_TAG`], seq (u64 big-endian), time (i64 big-endian), the
    /// operator (`0x00`, or `0x01` and the length-prefixed name), the
    /// length-prefixed action, the approver count (u64 big-endian) and each
    /// approver length-prefixed, then the length-prefixed outcome and detail.
    /// Every length prefix is a u64, big-endian. The hashes are not part of
    /// it.
    #[must_use]
    pub fn canonical_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(128 + self.detail.len());
        put_field(&mut out, ENTRY_TAG);
        out.extend_from_slice(&self.seq.to_be_bytes());
        out.extend_from_slice(&self.time.to_be_bytes());
        match &self.operator {
            None => out.push(0),
            Some(name) => {
                out.push(1);
                put_field(&mut out, name.as_bytes());
            }
        }
        put_field(&mut out, self.action.as_bytes());
        out.extend_from_slice(&(self.approvers.len() as u64).to_be_bytes());
        for approver in &self.approvers {
            put_field(&mut out, approver.as_bytes());
        }
        put_field(&mut out, self.outcome.as_bytes());
        put_field(&mut out, self.detail.as_bytes());
        out
    }

    /// `SHA-256(prev_hash || canonical_bytes)`, recomputed from the stored
    /// fields.
    #[must_use]
    pub fn computed_hash(&self) -> Hash {
        chain_hash(&self.prev_hash, &self.canonical_bytes())
    }

    /// The export line: a JSON object with `"type": "entry"`.
    #[must_use]
    pub fn to_json(&self) -> serde_json::Value {
        // Stored detail is JSON; a damaged one is exported as a string.
        let detail = serde_json::from_str(&self.detail).unwrap_or_else(|_| serde_json::Value::String(self.detail.clone()));
        serde_json::json!({
            "type": "entry",
            "seq": self.seq,
            "time": self.time,
            "time_utc": rfc3339(self.time),
            "operator": self.operator,
            "action": self.action,
            "approvers": self.approvers,
            "outcome": self.outcome,
            "detail": detail,
            "prev_hash": hex::encode(self.prev_hash),
            "hash": hex::encode(self.hash),
        })
    }
}

/// A signed checkpoint.
#[derive(Clone, PartialEq, Eq)]
pub struct Checkpoint {
    /// 1, 2, 3, … without gaps.
    pub number: u64,
    /// The last entry it covers (0: none).
    pub last_seq: u64,
    /// That entry's hash ([`genesis_hash`] when there is none).
    pub head_hash: Hash,
    /// How many entries the log held.
    pub count: u64,
    /// When it was taken, Unix seconds (UTC).
    pub time: i64,
    /// SHA-256 of the previous checkpoint's signature (zeros for the first).
    pub prev_signature_hash: Hash,
    /// Fingerprint of the key that signed it (informational; the
    /// signature is checked against the key the verifier trusts).
    pub key_fingerprint: String,
    /// RSA-2048 PKCS#1 v1.5 / SHA-256 over [`Checkpoint::signed_bytes`].
    pub signature: Vec<u8>,
}

impl fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Checkpoint(#{} through entry {}, head {})", self.number, self.last_seq, hex::encode(self.head_hash))
    }
}

impl Checkpoint {
    /// What is signed: the length-prefixed [`CHECKPOINT_TAG`], number,
    /// last_seq (u64 big-endian), head_hash, count (u64 big-endian), time
    /// (i64 big-endian), prev_signature_hash and the length-prefixed key
    /// fingerprint.
    #[must_use]
    pub fn signed_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(192);
        put_field(&mut out, CHECKPOINT_TAG);
        out.extend_from_slice(&self.number.to_be_bytes());
        out.extend_from_slice(&self.last_seq.to_be_bytes());
        out.extend_from_slice(&self.head_hash);
        out.extend_from_slice(&self.count.to_be_bytes());
        out.extend_from_slice(&self.time.to_be_bytes());
        out.extend_from_slice(&self.prev_signature_hash);
        put_field(&mut out, self.key_fingerprint.as_bytes());
        out
    }

    /// SHA-256 of the signature: what the next checkpoint binds.
    #[must_use]
    pub fn signature_hash(&self) -> Hash {
        Sha256::digest(&self.signature).into()
    }

    /// Does the signature verify under `key`?
    #[must_use]
    pub fn verifies(&self, key: &VerifyingKey) -> bool {
        key.verify(&self.signed_bytes(), &self.signature).is_ok()
    }

    /// The export line, also the content of `audit.head`.
    #[must_use]
    pub fn to_json(&self) -> serde_json::Value {
        // Serialising a struct of strings and integers cannot fail.
        serde_json::to_value(HeadRecord::from(self)).unwrap_or(serde_json::Value::Null)
    }
}

/// The JSON form of a checkpoint (export lines and `audit.head`).
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct HeadRecord {
    #[serde(rename = "type")]
    kind: String,
    format: String,
    number: u64,
    last_seq: u64,
    head_hash: String,
    count: u64,
    time: i64,
    time_utc: String,
    prev_signature_hash: String,
    key_fingerprint: String,
    signature: String,
}

impl From<&Checkpoint> for HeadRecord {
    fn from(c: &Checkpoint) -> Self {
        Self {
            kind: "checkpoint".to_owned(),
            format: HEAD_FORMAT.to_owned(),
            number: c.number,
            last_seq: c.last_seq,
            head_hash: hex::encode(c.head_hash),
            count: c.count,
            time: c.time,
            time_utc: rfc3339(c.time),
            prev_signature_hash: hex::encode(c.prev_signature_hash),
            key_fingerprint: c.key_fingerprint.clone(),
            signature: hex::encode(&c.signature),
        }
    }
}

fn hash_from_hex(field: &str, text: &str) -> Result<Hash, String> {
    let bytes = hex::decode(text).map_err(|_| format!("{field} is not hex"))?;
    <Hash>::try_from(bytes.as_slice()).map_err(|_| format!("{field} is {} bytes, not 32", bytes.len()))
}

impl TryFrom<HeadRecord> for Checkpoint {
    type Error = String;
    fn try_from(r: HeadRecord) -> Result<Self, String> {
        if r.kind != "checkpoint" || r.format != HEAD_FORMAT {
            return Err(format!("it is a {:?} record of format {:?}, not a {HEAD_FORMAT} checkpoint", r.kind, r.format));
        }
        Ok(Self {
            number: r.number,
            last_seq: r.last_seq,
            head_hash: hash_from_hex("head_hash", &r.head_hash)?,
            count: r.count,
            time: r.time,
            prev_signature_hash: hash_from_hex("prev_signature_hash", &r.prev_signature_hash)?,
            key_fingerprint: r.key_fingerprint,
            signature: hex::decode(&r.signature).map_err(|_| "signature is not hex".to_owned())?,
        })
    }
}

/// RFC 3339 UTC, e.g. `2026-11-26T16:32:06Z` (the Unix seconds if out of
/// range).
#[must_use]
pub fn rfc3339(unix: i64) -> String {
    match time::OffsetDateTime::from_unix_timestamp(unix) {
        Ok(t) => format!("{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z", t.year(), u8::from(t.month()), t.day(), t.hour(), t.minute(), t.second()),
        Err(_) => unix.to_string(),
    }
}

fn now_unix() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.ct_eq(b).into()
}

// ---------------------------------------------------------------------
// Reading rows

fn column_u64(row: &rusqlite::Row<'_>, idx: usize, name: &str) -> Result<u64, String> {
    let v: i64 = row.get(idx).map_err(|e| format!("{name}: {e}"))?;
    u64::try_from(v).map_err(|_| format!("{name} is negative ({v})"))
}

fn column_hash(row: &rusqlite::Row<'_>, idx: usize, name: &str) -> Result<Hash, String> {
    let v: Vec<u8> = row.get(idx).map_err(|e| format!("{name}: {e}"))?;
    <Hash>::try_from(v.as_slice()).map_err(|_| format!("{name} is {} bytes, not 32", v.len()))
}

/// Decode one `entries` row (in [`ENTRY_COLUMNS`] order).
fn entry_from_row(row: &rusqlite::Row<'_>) -> Result<AuditEntry, String> {
    let approvers: String = row.get(4).map_err(|e| format!("approvers: {e}"))?;
    Ok(AuditEntry {
        seq: column_u64(row, 0, "seq")?,
        time: row.get(1).map_err(|e| format!("time: {e}"))?,
        operator: row.get(2).map_err(|e| format!("operator: {e}"))?,
        action: row.get(3).map_err(|e| format!("action: {e}"))?,
        approvers: serde_json::from_str(&approvers).map_err(|e| format!("approvers are not a JSON list of names: {e}"))?,
        outcome: row.get(5).map_err(|e| format!("outcome: {e}"))?,
        detail: row.get(6).map_err(|e| format!("detail: {e}"))?,
        prev_hash: column_hash(row, 7, "prev_hash")?,
        hash: column_hash(row, 8, "hash")?,
    })
}

/// Decode one `checkpoints` row (in [`CHECKPOINT_COLUMNS`] order).
fn checkpoint_from_row(row: &rusqlite::Row<'_>) -> Result<Checkpoint, String> {
    Ok(Checkpoint {
        number: column_u64(row, 0, "number")?,
        last_seq: column_u64(row, 1, "last_seq")?,
        head_hash: column_hash(row, 2, "head_hash")?,
        count: column_u64(row, 3, "count")?,
        time: row.get(4).map_err(|e| format!("time: {e}"))?,
        prev_signature_hash: column_hash(row, 5, "prev_signature_hash")?,
        key_fingerprint: row.get(6).map_err(|e| format!("key_fingerprint: {e}"))?,
        signature: row.get(7).map_err(|e| format!("signature: {e}"))?,
    })
}

/// A row that did not decode: its raw seq/number if that much was
/// readable, and why.
type RowResult<T> = Result<T, (Option<i64>, String)>;

fn read_rows<T>(
    conn: &Connection,
    sql: &str,
    decode: fn(&rusqlite::Row<'_>) -> Result<T, String>,
    args: impl rusqlite::Params,
) -> rusqlite::Result<Vec<RowResult<T>>> {
    let mut stmt = conn.prepare(sql)?;
    let mut rows = stmt.query(args)?;
    let mut out = Vec::new();
    while let Some(row) = rows.next()? {
        out.push(decode(row).map_err(|e| (row.get::<_, i64>(0).ok(), e)));
    }
    Ok(out)
}

fn row_problem(what: &str, (key, reason): (Option<i64>, String)) -> String {
    match key {
        Some(k) => format!("{what} {k} cannot be read: {reason}"),
        None => format!("a {what} row cannot be read: {reason}"),
    }
}

fn last_checkpoint(conn: &Connection) -> Result<Option<Checkpoint>, String> {
    let sql = format!("SELECT {CHECKPOINT_COLUMNS} FROM checkpoints ORDER BY number DESC LIMIT 1");
    let rows = read_rows(conn, &sql, checkpoint_from_row, []).map_err(|e| e.to_string())?;
    match rows.into_iter().next() {
        None => Ok(None),
        Some(Ok(c)) => Ok(Some(c)),
        Some(Err(e)) => Err(row_problem("checkpoint", e)),
    }
}

fn checkpoint_number(conn: &Connection, number: u64) -> Result<Option<Checkpoint>, String> {
    let n = i64::try_from(number).map_err(|_| format!("checkpoint number {number} is out of range"))?;
    let sql = format!("SELECT {CHECKPOINT_COLUMNS} FROM checkpoints WHERE number = ?1");
    let rows = read_rows(conn, &sql, checkpoint_from_row, [n]).map_err(|e| e.to_string())?;
    match rows.into_iter().next() {
        None => Ok(None),
        Some(Ok(c)) => Ok(Some(c)),
        Some(Err(e)) => Err(row_problem("checkpoint", e)),
    }
}

/// Read and parse a head file. `Ok(None)`: it does not exist.
fn read_head(path: &Path) -> Result<Option<Checkpoint>, String> {
    let text = match std::fs::read(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot read it: {e}")),
    };
    let record: HeadRecord = serde_json::from_slice(&text).map_err(|e| format!("not a checkpoint record: {e}"))?;
    Checkpoint::try_from(record).map(Some)
}

/// The structural check [`AuditLog::open`] makes (no key needed): the
/// checkpoint in the head file is in the database, unchanged; a database
/// with checkpoints has a head file. (The database may hold newer
/// checkpoints: a command stopped between storing one and writing the
/// head file.)
fn check_head_against_db(conn: &Connection, head_path: &Path) -> Result<(), AuditError> {
    let head = read_head(head_path).map_err(|e| AuditError::Tampered(format!("{}: {e}", head_path.display())))?;
    let last = last_checkpoint(conn).map_err(AuditError::Tampered)?;
    match (head, last) {
        (None, None) => Ok(()),
        (None, Some(last)) => Err(AuditError::Tampered(format!(
            "{} is missing but the database holds checkpoints up to #{} (entry {}); restore the file or investigate",
            head_path.display(),
            last.number,
            last.last_seq
        ))),
        (Some(head), _) => match checkpoint_number(conn, head.number).map_err(AuditError::Tampered)? {
            None => Err(AuditError::Tampered(format!(
                "{} holds checkpoint #{} (entries through {}) but the database does not have it: the log was truncated or replaced",
                head_path.display(),
                head.number,
                head.last_seq
            ))),
            Some(row) if row != head => Err(AuditError::Tampered(format!(
                "checkpoint #{} in the database differs from the one in {}",
                head.number,
                head_path.display()
            ))),
            Some(_) => Ok(()),
        },
    }
}

// ---------------------------------------------------------------------
// The writer

/// An open audit log, for appending.
pub struct AuditLog {
    conn: Connection,
    path: PathBuf,
    head: PathBuf,
    unsigned_at_open: Option<(u64, u64)>,
}

impl fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuditLog").field("path", &self.path).field("head", &self.head).finish_non_exhaustive()
    }
}

/// `audit.db` → `audit.head`: the head file [`AuditLog::open`] uses, the
/// same as [`crate::home::Home::audit_head`].
#[must_use]
pub fn default_head_path(db: &Path) -> PathBuf {
    db.with_extension("head")
}

impl AuditLog {
    /// Open (creating if needed, mode 0600) the log at `db`, with its head
    /// file at [`default_head_path`].
    pub fn open(db: &Path) -> Result<Self, AuditError> {
        Self::open_with_head(db, &default_head_path(db))
    }

    /// Open (creating if needed, mode 0600) the log at `db` with its head
    /// file at `head`.
    ///
    /// Refuses ([`AuditError::Tampered`]) a log whose head file and last
    /// checkpoint disagree: a command must not extend a log whose tail was
    /// cut. Entries found after the last checkpoint are named in a new
    /// [`UNSIGNED_FOUND_ACTION`] entry.
    pub fn open_with_head(db: &Path, head: &Path) -> Result<Self, AuditError> {
        match OpenOptions::new().write(true).create_new(true).mode(0o600).open(db) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(db_error(db, format!("cannot create it: {e}"))),
        }
        let conn = Connection::open_with_flags(db, OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX)
            .map_err(|e| db_error(db, format!("cannot open it: {e}")))?;
        let not_a_log = |e: rusqlite::Error| db_error(db, format!("is not a usable audit log: {e}"));
        conn.busy_timeout(Duration::from_secs(10)).map_err(not_a_log)?;
        let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0)).map_err(not_a_log)?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(db_error(db, format!("cannot switch it to WAL mode (journal mode is {mode})")));
        }
        conn.execute_batch("PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON;").map_err(not_a_log)?;
        let mut log = Self { conn, path: db.to_path_buf(), head: head.to_path_buf(), unsigned_at_open: None };
        log.create_schema()?;
        check_head_against_db(&log.conn, &log.head)?;
        log.record_unsigned_found()?;
        Ok(log)
    }

    fn create_schema(&mut self) -> Result<(), AuditError> {
        let path = self.path.clone();
        let err = |e: rusqlite::Error| db_error(&path, format!("cannot create the schema: {e}"));
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(err)?;
        let version: i64 = tx.query_row("PRAGMA user_version", [], |r| r.get(0)).map_err(err)?;
        match version {
            0 => {
                tx.execute_batch(SCHEMA).map_err(err)?;
                tx.execute_batch(&format!("PRAGMA user_version = {SCHEMA_VERSION}")).map_err(err)?;
            }
            SCHEMA_VERSION => {
                let tables: i64 = tx
                    .query_row("SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name IN ('entries', 'checkpoints')", [], |r| {
                        r.get(0)
                    })
                    .map_err(err)?;
                if tables != 2 {
                    return Err(AuditError::Tampered(format!("{}: the entries or checkpoints table is missing", path.display())));
                }
            }
            other => {
                return Err(db_error(&path, format!("has schema version {other}; this personalizer knows version {SCHEMA_VERSION}")));
            }
        }
        // Re-created if someone dropped them; verification catches what
        // was done meanwhile.
        tx.execute_batch(TRIGGERS).map_err(err)?;
        tx.commit().map_err(err)
    }

    /// If entries follow the last checkpoint, say so in the log itself.
    fn record_unsigned_found(&mut self) -> Result<(), AuditError> {
        let path = self.path.clone();
        let signed = last_checkpoint(&self.conn).map_err(AuditError::Tampered)?.map_or(0, |c| c.last_seq);
        let last: Option<i64> = self.conn.query_row("SELECT max(seq) FROM entries", [], |r| r.get(0)).map_err(|e| db_error(&path, e))?;
        let last = last.and_then(|l| u64::try_from(l).ok()).unwrap_or(0);
        if last > signed {
            self.unsigned_at_open = Some((signed + 1, last));
            let event = AuditEvent::ok(
                None,
                UNSIGNED_FOUND_ACTION,
                serde_json::json!({
                    "first_seq": signed + 1,
                    "last_seq": last,
                    "note": "these entries had no signed checkpoint when the log was opened: \
                             a command stopped before its checkpoint, or they were appended without the signing key",
                }),
            );
            self.append(&event)?;
        }
        Ok(())
    }

    /// The entries that followed the last checkpoint when the log was
    /// opened (first and last seq), if any.
    #[must_use]
    pub fn unsigned_at_open(&self) -> Option<(u64, u64)> {
        self.unsigned_at_open
    }

    /// The database file.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The head file.
    #[must_use]
    pub fn head_path(&self) -> &Path {
        &self.head
    }

    /// Append `event` now; returns its seq. Durable when this returns (one
    /// committed transaction, `synchronous = FULL`).
    pub fn append(&mut self, event: &AuditEvent) -> Result<u64, AuditError> {
        self.append_at(event, now_unix())
    }

    /// Append `event` with the given time (Unix seconds); returns its seq.
    pub fn append_at(&mut self, event: &AuditEvent, time: i64) -> Result<u64, AuditError> {
        let path = self.path.clone();
        let err = |e: rusqlite::Error| db_error(&path, format!("cannot append: {e}"));
        let approvers = serde_json::to_string(&event.approvers).map_err(|e| db_error(&path, e))?;
        let detail = serde_json::to_string(&event.detail).map_err(|e| db_error(&path, e))?;
        let outcome = match serde_json::to_value(event.outcome) {
            Ok(serde_json::Value::String(s)) => s,
            _ => return Err(db_error(&path, "the outcome does not serialise to a string")),
        };
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(err)?;
        let last: Option<(i64, Vec<u8>)> = tx
            .query_row("SELECT seq, hash FROM entries ORDER BY seq DESC LIMIT 1", [], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()
            .map_err(err)?;
        let (prev_seq, prev_hash) = match last {
            None => (0, genesis_hash()),
            Some((seq, hash)) => {
                let seq = u64::try_from(seq).map_err(|_| AuditError::Tampered(format!("the last entry has seq {seq}")))?;
                let hash = <Hash>::try_from(hash.as_slice())
                    .map_err(|_| AuditError::Tampered(format!("entry {seq}'s hash is {} bytes, not 32", hash.len())))?;
                (seq, hash)
            }
        };
        let mut entry = AuditEntry {
            seq: prev_seq + 1,
            time,
            operator: event.operator.clone(),
            action: event.action.clone(),
            approvers: event.approvers.clone(),
            outcome,
            detail,
            prev_hash,
            hash: [0; 32],
        };
        entry.hash = entry.computed_hash();
        let seq = i64::try_from(entry.seq).map_err(|_| db_error(&path, "the sequence number overflows"))?;
        tx.execute(
            &format!("INSERT INTO entries ({ENTRY_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)"),
            params![
                seq,
                entry.time,
                entry.operator,
                entry.action,
                approvers,
                entry.outcome,
                entry.detail,
                &entry.prev_hash[..],
                &entry.hash[..]
            ],
        )
        .map_err(err)?;
        tx.commit().map_err(err)?;
        Ok(entry.seq)
    }

    /// Sign a checkpoint over the whole log with `key`, store it, and
    /// replace the head file with it.
    ///
    /// First verifies the whole log as [`verify`] does, under `key`'s
    /// public half: a log with any problem other than entries not yet
    /// covered by a checkpoint (the ones this checkpoint is for) is not
    /// signed ([`AuditError::Tampered`]), so that signing never launders
    /// tampering. Reading the log costs one pass over it per command.
    pub fn checkpoint(&mut self, key: &SigningKey) -> Result<Checkpoint, AuditError> {
        self.checkpoint_at(key, now_unix())
    }

    /// [`AuditLog::checkpoint`] with the given time (Unix seconds).
    pub fn checkpoint_at(&mut self, key: &SigningKey, time: i64) -> Result<Checkpoint, AuditError> {
        let path = self.path.clone();
        let err = |e: rusqlite::Error| db_error(&path, format!("cannot write a checkpoint: {e}"));
        let public = key.verifying_key();
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(err)?;
        let mut report = VerifyReport::new(&public);
        let state = verify_with(&tx, &self.head, &public, &mut report).map_err(err)?;
        if let Some(problem) = report.problems.iter().find(|p| !matches!(p, Problem::Unsigned { .. })) {
            return Err(AuditError::Tampered(format!("{problem} (not signing a checkpoint over it; run the audit verification)")));
        }
        let previous = state.last_checkpoint;
        let (last_seq, running) = (state.last_seq, state.last_hash);
        let count: i64 = tx.query_row("SELECT count(*) FROM entries", [], |r| r.get(0)).map_err(err)?;
        let count = u64::try_from(count).unwrap_or(0);
        if count != last_seq {
            return Err(AuditError::Tampered(format!("the log holds {count} entries but its last is entry {last_seq}")));
        }
        let mut cp = Checkpoint {
            number: previous.as_ref().map_or(1, |p| p.number + 1),
            last_seq,
            head_hash: running,
            count,
            time,
            prev_signature_hash: previous.as_ref().map_or([0; 32], Checkpoint::signature_hash),
            key_fingerprint: public.fingerprint(),
            signature: Vec::new(),
        };
        cp.signature = key.sign(&cp.signed_bytes())?;
        let (number, last, n) = (i64::try_from(cp.number), i64::try_from(cp.last_seq), i64::try_from(cp.count));
        let (Ok(number), Ok(last), Ok(n)) = (number, last, n) else {
            return Err(db_error(&path, "a checkpoint field overflows"));
        };
        tx.execute(
            &format!("INSERT INTO checkpoints ({CHECKPOINT_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)"),
            params![number, last, &cp.head_hash[..], n, cp.time, &cp.prev_signature_hash[..], cp.key_fingerprint, cp.signature],
        )
        .map_err(err)?;
        tx.commit().map_err(err)?;
        // After the commit: a crash here leaves the database one checkpoint
        // ahead of the head file, which verification accepts (the newer
        // checkpoint is signed); the other order would look like truncation.
        let text = serde_json::to_vec_pretty(&cp.to_json()).map_err(|e| db_error(&path, e))?;
        write_atomic(&self.head, &text, Mode::Replace)?;
        Ok(cp)
    }

    /// Every entry, in order (for display and tests).
    pub fn entries(&self) -> Result<Vec<AuditEntry>, AuditError> {
        read_entries(&self.conn, &self.path)
    }

    /// The last checkpoint in the database.
    pub fn last_checkpoint(&self) -> Result<Option<Checkpoint>, AuditError> {
        last_checkpoint(&self.conn).map_err(AuditError::Tampered)
    }
}

impl AuditSink for AuditLog {
    fn record(&mut self, event: &AuditEvent) -> Result<(), String> {
        self.append(event).map(|_| ()).map_err(|e| e.to_string())
    }
}

fn read_entries(conn: &Connection, path: &Path) -> Result<Vec<AuditEntry>, AuditError> {
    let sql = format!("SELECT {ENTRY_COLUMNS} FROM entries ORDER BY seq");
    read_rows(conn, &sql, entry_from_row, [])
        .map_err(|e| db_error(path, e))?
        .into_iter()
        .map(|r| r.map_err(|e| AuditError::Tampered(row_problem("entry", e))))
        .collect()
}

fn open_read_only(db: &Path) -> Result<Connection, AuditError> {
    if !db.is_file() {
        return Err(db_error(db, "does not exist or is not a file"));
    }
    let conn = Connection::open_with_flags(db, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)
        .map_err(|e| db_error(db, format!("cannot open it: {e}")))?;
    let not_a_log = |e: rusqlite::Error| db_error(db, format!("is not an audit log: {e}"));
    conn.busy_timeout(Duration::from_secs(10)).map_err(not_a_log)?;
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0)).map_err(not_a_log)?;
    if version != SCHEMA_VERSION {
        return Err(db_error(db, format!("is not an audit log of schema version {SCHEMA_VERSION} (it has version {version})")));
    }
    Ok(conn)
}

// ---------------------------------------------------------------------
// Export

/// What [`export`] wrote.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExportSummary {
    /// Entry lines.
    pub entries: u64,
    /// Checkpoint lines.
    pub checkpoints: u64,
}

/// Write the log as JSON lines: one `{"type": "entry", …}` object per
/// entry (seq, time, time_utc, operator, action, approvers, outcome,
/// detail, prev_hash, hash), each checkpoint as a `{"type": "checkpoint",
/// …}` line after the entry it ends on. Does not verify; run [`verify`].
pub fn export(db: &Path, out: &mut dyn Write) -> Result<ExportSummary, AuditError> {
    let conn = open_read_only(db)?;
    let entries = read_entries(&conn, db)?;
    let sql = format!("SELECT {CHECKPOINT_COLUMNS} FROM checkpoints ORDER BY number");
    let checkpoints = read_rows(&conn, &sql, checkpoint_from_row, [])
        .map_err(|e| db_error(db, e))?
        .into_iter()
        .map(|r| r.map_err(|e| AuditError::Tampered(row_problem("checkpoint", e))))
        .collect::<Result<Vec<_>, _>>()?;
    let mut line = |value: serde_json::Value| -> Result<(), AuditError> {
        serde_json::to_writer(&mut *out, &value).map_err(|e| AuditError::Export(e.into()))?;
        out.write_all(b"\n").map_err(AuditError::Export)
    };
    let mut cps = checkpoints.iter().peekable();
    while let Some(cp) = cps.next_if(|c| c.last_seq == 0) {
        line(cp.to_json())?;
    }
    for e in &entries {
        line(e.to_json())?;
        while let Some(cp) = cps.next_if(|c| c.last_seq <= e.seq) {
            line(cp.to_json())?;
        }
    }
    for cp in cps {
        line(cp.to_json())?;
    }
    out.flush().map_err(AuditError::Export)?;
    Ok(ExportSummary { entries: entries.len() as u64, checkpoints: checkpoints.len() as u64 })
}

// ---------------------------------------------------------------------
// Verification

/// One thing [`verify`] found wrong.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Problem {
    /// The database cannot be opened or read as an audit log.
    Database(String),
    /// An entry row does not decode (wrong types, bad JSON, short hash).
    EntryUnreadable {
        /// Its seq, or the expected one if the seq itself is unreadable.
        seq: u64,
        /// Why.
        reason: String,
    },
    /// A gap in the sequence: `seq` is missing, the next entry is `next`.
    EntryMissing {
        /// The first missing seq.
        seq: u64,
        /// The seq found in its place.
        next: u64,
    },
    /// Entry `seq` does not chain from the entry before it.
    ChainBroken {
        /// The entry.
        seq: u64,
        /// The entry whose hash its previous-hash actually names, when that
        /// entry is present elsewhere in the log (reordering).
        follows: Option<u64>,
    },
    /// Entry `seq`'s content does not match its hash: it was modified.
    EntryModified {
        /// The entry.
        seq: u64,
    },
    /// Entries after the last valid signed checkpoint.
    Unsigned {
        /// The first one.
        first: u64,
        /// The last one.
        last: u64,
    },
    /// A checkpoint row does not decode.
    CheckpointUnreadable {
        /// Its number, if readable.
        number: Option<u64>,
        /// Why.
        reason: String,
    },
    /// A gap in the checkpoint numbers.
    CheckpointMissing {
        /// The missing number.
        number: u64,
    },
    /// A checkpoint's signature does not verify under the trusted key.
    CheckpointBadSignature {
        /// The checkpoint.
        number: u64,
        /// The fingerprint it claims.
        claimed_fingerprint: String,
    },
    /// A checkpoint does not bind the previous checkpoint's signature.
    CheckpointChainBroken {
        /// The checkpoint.
        number: u64,
    },
    /// A validly signed checkpoint does not match the entries.
    CheckpointMismatch {
        /// The checkpoint.
        number: u64,
        /// The first entry it covers beyond the previous checkpoint.
        first_seq: u64,
        /// The last entry it covers.
        last_seq: u64,
        /// What does not match.
        reason: String,
    },
    /// A validly signed checkpoint covers entries the database no longer
    /// has: its tail was deleted.
    EntriesDeleted {
        /// The checkpoint.
        number: u64,
        /// The last entry it covers.
        last_seq: u64,
        /// The last entry in the database (0: none).
        db_last_seq: u64,
    },
    /// The head file does not exist.
    HeadMissing {
        /// Where it should be.
        path: PathBuf,
    },
    /// The head file cannot be read or parsed.
    HeadUnreadable {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The head file's signature does not verify under the trusted key.
    HeadBadSignature {
        /// The file.
        path: PathBuf,
        /// The checkpoint number it claims.
        number: u64,
    },
    /// The database lacks the checkpoint the head file holds: its tail
    /// was deleted (or the database replaced by an older copy).
    Truncated {
        /// The head file's checkpoint.
        head_number: u64,
        /// The last entry the head file covers.
        head_last_seq: u64,
        /// The last checkpoint in the database (0: none).
        db_last_number: u64,
        /// The last entry in the database (0: none).
        db_last_seq: u64,
    },
    /// The database has the head file's checkpoint number with other
    /// content.
    HeadMismatch {
        /// The checkpoint.
        number: u64,
    },
}

impl Problem {
    /// The first entry this problem makes untrustworthy, if it names one.
    #[must_use]
    pub fn seq(&self) -> Option<u64> {
        match self {
            Self::EntryUnreadable { seq, .. }
            | Self::EntryMissing { seq, .. }
            | Self::ChainBroken { seq, .. }
            | Self::EntryModified { seq } => Some(*seq),
            Self::Unsigned { first, .. } => Some(*first),
            Self::CheckpointMismatch { first_seq, .. } => Some(*first_seq),
            Self::EntriesDeleted { db_last_seq, .. } => Some(db_last_seq.saturating_add(1)),
            Self::Truncated { head_last_seq, db_last_seq, .. } => (db_last_seq < head_last_seq).then_some(db_last_seq.saturating_add(1)),
            _ => None,
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Database(reason) => write!(f, "{reason}"),
            Self::EntryUnreadable { seq, reason } => write!(f, "entry {seq} cannot be read: {reason}"),
            Self::EntryMissing { seq, next } => {
                let after = match seq.checked_sub(1) {
                    Some(0) | None => format!("the log starts at entry {next}"),
                    Some(before) => format!("the entry after {before} is {next}"),
                };
                if next.saturating_sub(*seq) <= 1 {
                    write!(f, "entry {seq} is missing (deleted): {after}")
                } else {
                    write!(f, "entries {seq} to {} are missing (deleted): {after}", next - 1)
                }
            }
            Self::ChainBroken { seq, follows } => {
                match seq.checked_sub(1) {
                    Some(0) | None => write!(f, "entry {seq} does not start from the genesis hash")?,
                    Some(before) => write!(f, "entry {seq} does not follow entry {before}")?,
                }
                match follows {
                    Some(other) => write!(f, ": it names entry {other} as its predecessor (entries were reordered)"),
                    None => {
                        write!(f, ": its previous-hash is not the hash before it (an entry was removed, inserted or replaced before it)")
                    }
                }
            }
            Self::EntryModified { seq } => write!(f, "entry {seq} was modified: its content does not match its hash"),
            Self::Unsigned { first, last } => {
                let which = if first == last { format!("entry {first} is") } else { format!("entries {first} to {last} are") };
                write!(
                    f,
                    "{which} not covered by a valid signed checkpoint: either a command stopped before its checkpoint \
                     (crash, power loss) or someone appended them without the signing key; the two cannot be told apart, \
                     so they are not trusted"
                )
            }
            Self::CheckpointUnreadable { number: Some(n), reason } => write!(f, "checkpoint #{n} cannot be read: {reason}"),
            Self::CheckpointUnreadable { number: None, reason } => write!(f, "a checkpoint row cannot be read: {reason}"),
            Self::CheckpointMissing { number } => write!(f, "checkpoint #{number} is missing (deleted)"),
            Self::CheckpointBadSignature { number, claimed_fingerprint } => write!(
                f,
                "checkpoint #{number} has a bad or forged signature: it does not verify under the trusted key \
                 (it claims key fingerprint {claimed_fingerprint})"
            ),
            Self::CheckpointChainBroken { number } => {
                write!(f, "checkpoint #{number} does not bind checkpoint #{}'s signature", number.saturating_sub(1))
            }
            Self::CheckpointMismatch { number, first_seq, last_seq, reason } => write!(
                f,
                "checkpoint #{number} is validly signed but does not match the entries ({reason}): \
                 something in entries {first_seq} to {last_seq} was changed"
            ),
            Self::EntriesDeleted { number, last_seq, db_last_seq } => write!(
                f,
                "checkpoint #{number} covers entries through {last_seq} but the database ends at entry {db_last_seq}: \
                 entries {} to {last_seq} were deleted",
                db_last_seq.saturating_add(1)
            ),
            Self::HeadMissing { path } => write!(f, "the head file {} is missing (the signed end of the log)", path.display()),
            Self::HeadUnreadable { path, reason } => write!(f, "the head file {} is corrupt: {reason}", path.display()),
            Self::HeadBadSignature { path, number } => write!(
                f,
                "the head file {} (checkpoint #{number}) has a bad or forged signature: it does not verify under the trusted key",
                path.display()
            ),
            Self::Truncated { head_number, head_last_seq, db_last_number, db_last_seq } => write!(
                f,
                "the database is behind the head file: the head holds checkpoint #{head_number} covering entries through \
                 {head_last_seq}, the database ends at checkpoint #{db_last_number} and entry {db_last_seq} \
                 (its tail was deleted or it was replaced by an older copy)"
            ),
            Self::HeadMismatch { number } => {
                write!(f, "checkpoint #{number} in the database differs from the one in the head file")
            }
        }
    }
}

/// The outcome of [`verify`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifyReport {
    /// Entry rows read.
    pub entries: u64,
    /// Checkpoint rows read.
    pub checkpoints: u64,
    /// The last entry covered by an unbroken run of valid checkpoints.
    pub signed_through: u64,
    /// The head file's checkpoint number, if it was read.
    pub head_number: Option<u64>,
    /// The trusted key's fingerprint.
    pub key_fingerprint: String,
    /// What is wrong, first found first; empty when the log checks out.
    pub problems: Vec<Problem>,
    /// Things worth knowing that are not failures.
    pub notes: Vec<String>,
}

impl VerifyReport {
    fn new(key: &VerifyingKey) -> Self {
        Self {
            entries: 0,
            checkpoints: 0,
            signed_through: 0,
            head_number: None,
            key_fingerprint: key.fingerprint(),
            problems: Vec::new(),
            notes: Vec::new(),
        }
    }

    /// No problem found.
    #[must_use]
    pub fn is_ok(&self) -> bool {
        self.problems.is_empty()
    }

    /// The lowest entry seq a problem names.
    #[must_use]
    pub fn first_bad_seq(&self) -> Option<u64> {
        self.problems.iter().filter_map(Problem::seq).min()
    }
}

impl fmt::Display for VerifyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_ok() {
            write!(
                f,
                "audit log OK: {} entries, {} checkpoints, signed through entry {} (head checkpoint #{}, key {})",
                self.entries,
                self.checkpoints,
                self.signed_through,
                self.head_number.unwrap_or(0),
                self.key_fingerprint
            )?;
        } else {
            let n = self.problems.len();
            write!(f, "audit log FAILED verification: {n} problem{}", if n == 1 { "" } else { "s" })?;
            if let Some(seq) = self.first_bad_seq() {
                write!(f, ", first bad entry is {seq}")?;
            }
            write!(f, " ({} entries, {} checkpoints, signed through entry {})", self.entries, self.checkpoints, self.signed_through)?;
            for p in &self.problems {
                write!(f, "\n  - {p}")?;
            }
        }
        for note in &self.notes {
            write!(f, "\n  note: {note}")?;
        }
        Ok(())
    }
}

/// Check the whole log at `db` and its head file against the trusted
/// signing key: the chain of entries, every checkpoint's signature, chain
/// and coverage, and that the database is not behind the head file.
/// Opens the database read-only; never fails, the report says what is
/// wrong.
#[must_use]
pub fn verify(db: &Path, head_file: &Path, key: &VerifyingKey) -> VerifyReport {
    let mut report = VerifyReport::new(key);
    let conn = match open_read_only(db) {
        Ok(c) => c,
        Err(e) => {
            report.problems.push(Problem::Database(e.to_string()));
            return report;
        }
    };
    if let Err(e) = verify_with(&conn, head_file, key, &mut report).map(|_| ()) {
        report.problems.push(Problem::Database(db_error(db, e).to_string()));
    }
    report
}

/// Where the verified log ends (meaningful when no problem other than
/// [`Problem::Unsigned`] was found).
struct ChainState {
    last_seq: u64,
    last_hash: Hash,
    last_checkpoint: Option<Checkpoint>,
}

fn verify_with(conn: &Connection, head_file: &Path, key: &VerifyingKey, report: &mut VerifyReport) -> rusqlite::Result<ChainState> {
    // Entries: the chain from genesis. `chain[i]` is entry i's verified
    // hash, as far as the chain is intact.
    let rows = read_rows(conn, &format!("SELECT {ENTRY_COLUMNS} FROM entries ORDER BY seq"), entry_from_row, [])?;
    let stored: HashMap<Hash, u64> = rows.iter().filter_map(|r| r.as_ref().ok()).map(|e| (e.hash, e.seq)).collect();
    let mut chain = vec![genesis_hash()];
    let mut intact = true;
    let mut last_row_seq = 0u64;
    for row in &rows {
        report.entries += 1;
        let entry = match row {
            Ok(e) => e,
            Err((raw, reason)) => {
                if let Some(s) = raw.and_then(|s| u64::try_from(s).ok()) {
                    last_row_seq = last_row_seq.max(s);
                }
                if intact {
                    let seq = raw.and_then(|s| u64::try_from(s).ok()).unwrap_or(chain.len() as u64);
                    report.problems.push(Problem::EntryUnreadable { seq, reason: reason.clone() });
                    intact = false;
                }
                continue;
            }
        };
        last_row_seq = last_row_seq.max(entry.seq);
        if !intact {
            continue;
        }
        let expected = chain.len() as u64;
        let previous = chain[chain.len() - 1];
        if entry.seq < expected {
            // Only seq 0 can sort before the expected number.
            report.problems.push(Problem::EntryUnreadable { seq: entry.seq, reason: "sequence numbers start at 1".to_owned() });
            intact = false;
        } else if entry.seq != expected {
            report.problems.push(Problem::EntryMissing { seq: expected, next: entry.seq });
            intact = false;
        } else if !ct_eq(&entry.prev_hash, &previous) {
            let follows = stored.get(&entry.prev_hash).copied().filter(|&s| s != expected - 1);
            report.problems.push(Problem::ChainBroken { seq: entry.seq, follows });
            intact = false;
        } else if !ct_eq(&entry.computed_hash(), &entry.hash) {
            report.problems.push(Problem::EntryModified { seq: entry.seq });
            intact = false;
        } else {
            chain.push(entry.hash);
            if entry.action == UNSIGNED_FOUND_ACTION {
                let detail: serde_json::Value = serde_json::from_str(&entry.detail).unwrap_or_default();
                let range = match (detail["first_seq"].as_u64(), detail["last_seq"].as_u64()) {
                    (Some(a), Some(b)) if a == b => format!("entry {a} was"),
                    (Some(a), Some(b)) => format!("entries {a} to {b} were"),
                    _ => "entries were".to_owned(),
                };
                report.notes.push(format!(
                    "entry {} records that {range} found without a checkpoint when the log was opened \
                     (a command stopped before its checkpoint, or they were appended without the signing key); \
                     later checkpoints cover them",
                    entry.seq
                ));
            }
        }
    }
    let valid_through = chain.len() as u64 - 1;

    // Checkpoints: numbered 1.., each signed, each binding the previous
    // signature, each matching the verified chain.
    let rows = read_rows(conn, &format!("SELECT {CHECKPOINT_COLUMNS} FROM checkpoints ORDER BY number"), checkpoint_from_row, [])?;
    let mut by_number: HashMap<u64, Checkpoint> = HashMap::new();
    let mut db_last_number = 0u64;
    let mut good = true;
    let mut expected_number = 1u64;
    let mut prev_sig_hash: Hash = [0; 32];
    let mut prev_last_seq = 0u64;
    let mut last_good: Option<Checkpoint> = None;
    for row in rows {
        report.checkpoints += 1;
        let cp = match row {
            Ok(cp) => cp,
            Err((raw, reason)) => {
                if good {
                    let number = raw.and_then(|n| u64::try_from(n).ok());
                    report.problems.push(Problem::CheckpointUnreadable { number, reason });
                    good = false;
                }
                continue;
            }
        };
        db_last_number = db_last_number.max(cp.number);
        by_number.insert(cp.number, cp.clone());
        if !good {
            continue;
        }
        let mismatch = |reason: String| Problem::CheckpointMismatch {
            number: cp.number,
            first_seq: prev_last_seq + 1,
            last_seq: cp.last_seq.max(prev_last_seq + 1),
            reason,
        };
        let problem = if cp.number != expected_number {
            Some(Problem::CheckpointMissing { number: expected_number })
        } else if !cp.verifies(key) {
            Some(Problem::CheckpointBadSignature { number: cp.number, claimed_fingerprint: cp.key_fingerprint.clone() })
        } else if !ct_eq(&cp.prev_signature_hash, &prev_sig_hash) {
            Some(Problem::CheckpointChainBroken { number: cp.number })
        } else if cp.last_seq < prev_last_seq {
            Some(mismatch(format!("it ends at entry {} but checkpoint #{} already covered {prev_last_seq}", cp.last_seq, cp.number - 1)))
        } else if cp.count != cp.last_seq {
            Some(mismatch(format!("it counts {} entries but ends at entry {}", cp.count, cp.last_seq)))
        } else if cp.last_seq > last_row_seq {
            Some(Problem::EntriesDeleted { number: cp.number, last_seq: cp.last_seq, db_last_seq: last_row_seq })
        } else if cp.last_seq > valid_through {
            // The entry chain broke first; that problem is reported.
            None
        } else if !ct_eq(&chain[usize::try_from(cp.last_seq).unwrap_or(usize::MAX).min(chain.len() - 1)], &cp.head_hash) {
            Some(mismatch(format!("entry {}'s hash is not the signed head hash", cp.last_seq)))
        } else {
            report.signed_through = cp.last_seq;
            last_good = Some(cp.clone());
            prev_last_seq = cp.last_seq;
            prev_sig_hash = cp.signature_hash();
            expected_number += 1;
            continue;
        };
        report.problems.extend(problem);
        good = false;
    }

    // Entries after the last good checkpoint.
    if intact && last_row_seq > report.signed_through {
        report.problems.push(Problem::Unsigned { first: report.signed_through + 1, last: last_row_seq });
    }

    // The head file: signed, and present in the database unchanged.
    match read_head(head_file) {
        Ok(None) => {
            // Without checkpoints, unsigned entries are already reported.
            if report.checkpoints > 0 {
                report.problems.push(Problem::HeadMissing { path: head_file.to_path_buf() });
            }
        }
        Err(reason) => report.problems.push(Problem::HeadUnreadable { path: head_file.to_path_buf(), reason }),
        Ok(Some(head)) => {
            report.head_number = Some(head.number);
            if !head.verifies(key) {
                report.problems.push(Problem::HeadBadSignature { path: head_file.to_path_buf(), number: head.number });
            } else {
                match by_number.get(&head.number) {
                    None => report.problems.push(Problem::Truncated {
                        head_number: head.number,
                        head_last_seq: head.last_seq,
                        db_last_number,
                        db_last_seq: last_row_seq,
                    }),
                    Some(row) if *row != head => report.problems.push(Problem::HeadMismatch { number: head.number }),
                    Some(_) => {}
                }
                if head.number < db_last_number {
                    report.notes.push(format!(
                        "the database holds checkpoints up to #{db_last_number}, newer than the head file's #{}: \
                         a command stopped between storing a checkpoint and writing the head file",
                        head.number
                    ));
                }
            }
        }
    }
    Ok(ChainState { last_seq: valid_through, last_hash: chain[chain.len() - 1], last_checkpoint: last_good })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn entry() -> AuditEntry {
        AuditEntry {
            seq: 7,
            time: 1_700_000_000,
            operator: Some("alice".to_owned()),
            action: "generate".to_owned(),
            approvers: vec!["bob".to_owned(), "carol".to_owned()],
            outcome: "ok".to_owned(),
            detail: r#"{"count":3}"#.to_owned(),
            prev_hash: [0; 32],
            hash: [0; 32],
        }
    }

    fn field(bytes: &[u8]) -> Vec<u8> {
        let mut v = (bytes.len() as u64).to_be_bytes().to_vec();
        v.extend_from_slice(bytes);
        v
    }

    #[test]
    fn canonical_encoding_is_the_documented_layout() {
        let mut expected = field(ENTRY_TAG);
        expected.extend_from_slice(&7u64.to_be_bytes());
        expected.extend_from_slice(&1_700_000_000i64.to_be_bytes());
        expected.push(1);
        expected.extend(field(b"alice"));
        expected.extend(field(b"generate"));
        expected.extend_from_slice(&2u64.to_be_bytes());
        expected.extend(field(b"bob"));
        expected.extend(field(b"carol"));
        expected.extend(field(b"ok"));
        expected.extend(field(br#"{"count":3}"#));
        assert_eq!(entry().canonical_bytes(), expected);
        // The hashes are not encoded; the chain hash covers the previous one.
        let mut other = entry();
        other.hash = [9; 32];
        assert_eq!(other.canonical_bytes(), expected);
        other.prev_hash = [1; 32];
        assert_ne!(other.computed_hash(), entry().computed_hash());
        let mut manual = Sha256::new();
        manual.update([0u8; 32]);
        manual.update(&expected);
        assert_eq!(entry().computed_hash(), <Hash>::from(manual.finalize()));
    }

    #[test]
    fn canonical_encoding_is_unambiguous() {
        let base = entry().canonical_bytes();
        let variants: Vec<fn(&mut AuditEntry)> = vec![
            |e| e.seq = 8,
            |e| e.time += 1,
            |e| e.operator = None,
            |e| e.operator = Some(String::new()),
            // Moving bytes between neighbouring fields.
            |e| {
                e.operator = Some("alic".to_owned());
                e.action = "egenerate".to_owned();
            },
            |e| e.approvers = vec!["bobcarol".to_owned()],
            |e| e.approvers = vec!["bob".to_owned(), "carol".to_owned(), String::new()],
            |e| e.approvers = vec!["carol".to_owned(), "bob".to_owned()],
            |e| {
                e.outcome = "ok{".to_owned();
                e.detail = r#""count":3}"#.to_owned();
            },
            |e| e.outcome = "refused".to_owned(),
        ];
        let mut seen = vec![base];
        for change in variants {
            let mut e = entry();
            change(&mut e);
            let bytes = e.canonical_bytes();
            assert!(!seen.contains(&bytes), "two different entries encode the same: {e:?}");
            seen.push(bytes);
        }
        // An operator named "" and no operator differ.
        let mut none = entry();
        none.operator = None;
        let mut empty = entry();
        empty.operator = Some(String::new());
        assert_ne!(none.computed_hash(), empty.computed_hash());
    }

    #[test]
    fn checkpoint_signed_bytes_cover_every_field() {
        let cp = Checkpoint {
            number: 2,
            last_seq: 9,
            head_hash: [3; 32],
            count: 9,
            time: 5,
            prev_signature_hash: [4; 32],
            key_fingerprint: "ab".to_owned(),
            signature: vec![1, 2, 3],
        };
        let base = cp.signed_bytes();
        assert!(base.starts_with(&field(CHECKPOINT_TAG)));
        let changes: Vec<fn(&mut Checkpoint)> = vec![
            |c| c.number = 3,
            |c| c.last_seq = 10,
            |c| c.head_hash[31] ^= 1,
            |c| c.count = 8,
            |c| c.time = 6,
            |c| c.prev_signature_hash[0] ^= 1,
            |c| c.key_fingerprint = "abc".to_owned(),
        ];
        for change in changes {
            let mut c = cp.clone();
            change(&mut c);
            assert_ne!(c.signed_bytes(), base);
        }
        // The signature itself is not signed.
        let mut c = cp.clone();
        c.signature = vec![9];
        assert_eq!(c.signed_bytes(), base);
        // The JSON form round-trips.
        let record: HeadRecord = serde_json::from_value(cp.to_json()).unwrap();
        assert_eq!(Checkpoint::try_from(record).unwrap(), cp);
    }

    #[test]
    fn rfc3339_utc() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(rfc3339(i64::MAX), i64::MAX.to_string());
    }
}
