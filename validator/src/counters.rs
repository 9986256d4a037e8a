//! The durable counter store: one SQLite row per YubiKey, an atomic
//! compare-and-set per update, and group commit.
//!
//! **Compare-and-set.** An update is one conditional upsert:
//!
//! ```sql
//! INSERT INTO counters (…) VALUES (…)
//! ON CONFLICT (public_id) DO UPDATE SET …
//! WHERE (excluded.counter, excluded.session_use) > (counters.counter, counters.session_use)
//! ```
//!
//! and its verdict is the number of rows it changed (`sqlite3_changes()`):
//! one means the update was strictly greater (or the YubiKey was new) and is
//! now stored, [`CasOutcome::Accepted`]. Zero means the stored pair is
//! greater than or equal; only then is the row read, to tell
//! [`CasOutcome::ReplayedRequest`] (equal counters *and* equal nonce: the same
//! request seen again) from [`CasOutcome::ReplayedOtp`]. There is no separate
//! read-then-write, so there is no window between a check and its write
//! (yubikey-val's TOCTOU race), and the stored pair can never decrease.
//!
//! **Group commit.** One writer thread owns the only read-write connection.
//! Callers (blocking threads, many at once) send their update through a
//! channel and block for the answer. The writer takes everything queued, up
//! to [`CounterOptions::max_batch`] updates, runs the upserts one after the
//! other in one `BEGIN IMMEDIATE` transaction (each sees the ones before it,
//! so two copies of one OTP in a batch are decided correctly), `COMMIT`s
//! (one fsync for the whole batch), and only then answers every caller:
//! `Accepted` is never returned for an update that is not durable. If any
//! statement or the `COMMIT` fails, the transaction is rolled back and every
//! caller in the batch gets [`BackendFailure`]: nothing in it was accepted.
//! The writer does not wait for a batch to fill: while one batch is being
//! committed, the next one queues up, so batches grow with load and a lone
//! request pays for one fsync only.
//!
//! **Durability.** WAL journal, `synchronous = FULL` by default: the WAL is
//! fsynced at every commit, so an `Accepted` survives a process crash and a
//! power loss. [`Synchronous::Normal`] (for benchmarks, or a disk whose
//! flush cannot be afforded) skips that fsync: a commit survives a crash of
//! the process (`kill -9`), but the last transactions before a power loss or
//! kernel crash may roll back — reopening a replay window for every OTP
//! accepted in them. Do not run it in production without a peer that holds
//! the same counters.
//!
//! **Failure.** If the writer thread dies or its channel closes, callers get
//! [`BackendFailure`] at once, never a hang; a caller also stops waiting
//! after [`CounterOptions::reply_timeout`] (the update may then still be
//! committed: a burned OTP, never a double acceptance). Dropping the store
//! lets the writer finish what is queued and joins it.
//!
//! **Schema.** `counters(public_id TEXT PRIMARY KEY, counter, session_use,
//! high, low, nonce, modified, created, otp_digest)`, `STRICT, WITHOUT
//! ROWID`: the public id in modhex (yubikey-val's `yk_publicname`), the
//! 15-bit counter and the use (caps-lock bit dropped, [`Counters`]), the
//! timestamp of the accepted OTP (0 when the counters came from a peer),
//! the nonce of its request, Unix times, and the SHA-256 of the accepted
//! OTP text ([`CounterUpdate::otp_digest`], a `BLOB` of 32 bytes). Equal
//! counters are the same request ([`CasOutcome::ReplayedRequest`]) only with
//! the same nonce *and* digest, as in the peer rule.
//!
//! **Digest buckets.** `counters.sync_bucket` holds the public id's
//! replication digest bucket ([`replication::sync::bucket_of`]), set when
//! the row is inserted (it never changes) and indexed, so that
//! [`SyncStore::bucket`] reads one bucket's rows rather than the whole
//! table. A database without the column gets it when opened (`ALTER TABLE
//! counters ADD COLUMN sync_bucket INTEGER NOT NULL DEFAULT -1`, the index,
//! and the existing rows filled in, in the migration transaction); rows
//! left at -1 (written by an older binary) are still found, and filled in
//! at the next open.
//!
//! **Migration.** A database of the previous schema (no `otp_digest`) is
//! migrated when opened, in the same write transaction that creates missing
//! tables: `ALTER TABLE counters ADD COLUMN otp_digest BLOB NOT NULL DEFAULT
//! X'00…00'`. The existing rows get 32 zero bytes, the digest of no OTP, so
//! a request stored before the migration, seen again with equal counters,
//! is answered `REPLAYED_OTP` rather than `REPLAYED_REQUEST` (still a
//! refusal). Nothing else changes; the file stays readable by the new code
//! only (the old code ignores the extra column and tables, but would write
//! no outbox rows).
//!
//! # Replication
//!
//! **Peer compare-and-set.** [`SqliteCounters::peer_compare_and_set`] runs
//! a peer's [`Proposal`] through exactly [`quorum::peer_cas`] against the
//! stored `(counters, nonce, digest)`, inside a group-commit batch like the
//! local updates (so local and peer updates of one key are serialized by
//! the one writer), and answers after `COMMIT`. It also implements the
//! replication node's [`replication::node::DurableCas`].
//!
//! **Outbox.** Every accepted change — a local `Accepted` or a peer
//! `Stored` — appends `outbox(seq INTEGER PRIMARY KEY AUTOINCREMENT,
//! public_id, counter, session_use, nonce, otp_digest, modified)` in the
//! same transaction as its upsert: a failed batch writes neither. `seq`
//! grows in commit order (one writer) and is never reused (`AUTOINCREMENT`),
//! even once the outbox was emptied. `peer_cursors(peer TEXT PRIMARY KEY,
//! acked_seq)` holds each peer's acknowledged position
//! ([`SqliteCounters::add_peer`], [`SqliteCounters::ack`]: cursors only move
//! forward); [`SqliteCounters::compact`] deletes the rows at or below the
//! smallest cursor of all known peers (none while no peer is known).
//!
//! **Catch-up.** The puller asks the peer for [`SqliteCounters::outbox_after`]
//! its cursor, applies the rows with [`SqliteCounters::merge_max`] (one
//! transaction, durable on return; the max rule is idempotent and
//! order-independent and never lowers a counter), then acknowledges the last
//! `seq`; the peer records it with [`SqliteCounters::ack`] and compacts.
//! A new site bootstraps from [`SqliteCounters::snapshot_after`] pages and
//! then the outbox (see there). A site with no peer registered writes no
//! outbox rows at all, so a single-site deployment does not grow one.
//! Merged rows are not appended to the puller's outbox: every node pulls
//! from every other one. Maintenance jobs (merge, ack, peer changes,
//! compaction) run on the writer thread too, each in a transaction of its
//! own between group-commit batches.
//!
//! **Sync store.** [`SqliteCounters`] is the counters dataset of
//! [`replication::sync`] ([`SyncStore`]): items are encoded by
//! [`sync_item`] (public id → counters, use, OTP digest, nonce; never the
//! site-local `modified`, `created` or timestamp), `changes` records the
//! puller's acknowledgement (registering it) and compacts in the same
//! writer job — only when the cursor moves or the peer is new: a pull that
//! moves nothing is answered from the read connection — then reads the
//! outbox after the cursor; `digest` and
//! `bucket` scan the table on a read-only connection of their own; `merge`
//! decodes the whole page first (a malformed item refuses the page) and
//! applies it with [`SqliteCounters::merge_max`].
//!
//! The database file is created with mode 0600. It may be the same file as
//! the API clients' ([`crate::clients`]): the tables are separate.

use std::fmt::{self, Write as _};
use std::fs::OpenOptions;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, SyncSender};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use httpd::metrics::{header, single, Histogram};
use ksm::outbox::{Outbox, PeerPosition};
use otp::{Counters, PublicId};
use replication::quorum::{self, OtpDigest, PeerCasResult, Proposal};
use replication::sync::{Changes, Digest, Item, Merged, SyncError, SyncStore};
use rusqlite::{params, Connection, OpenFlags, OptionalExtension};

use crate::{BackendFailure, CasOutcome, CounterStore, CounterUpdate};

/// Tables created when missing. `counters.otp_digest` is declared here for
/// a new database; a database of the previous schema gets it from
/// [`MIGRATE_DIGEST`] (see [`migrate`]).
const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS counters (
    public_id   TEXT    NOT NULL PRIMARY KEY,
    counter     INTEGER NOT NULL,
    session_use INTEGER NOT NULL,
    high        INTEGER NOT NULL,
    low         INTEGER NOT NULL,
    nonce       TEXT    NOT NULL,
    modified    INTEGER NOT NULL,
    created     INTEGER NOT NULL,
    otp_digest  BLOB    NOT NULL DEFAULT X'0000000000000000000000000000000000000000000000000000000000000000',
    sync_bucket INTEGER NOT NULL DEFAULT -1
) STRICT, WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS outbox (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    public_id   TEXT    NOT NULL,
    counter     INTEGER NOT NULL,
    session_use INTEGER NOT NULL,
    nonce       TEXT    NOT NULL,
    otp_digest  BLOB    NOT NULL,
    modified    INTEGER NOT NULL
) STRICT;
CREATE TABLE IF NOT EXISTS peer_cursors (
    peer        TEXT    NOT NULL PRIMARY KEY,
    acked_seq   INTEGER NOT NULL
) STRICT, WITHOUT ROWID;
";

/// The migration from the schema without OTP digests: rows written before
/// it carry 32 zero bytes (no OTP hashes to that), which never match a
/// real request's digest.
/// The migration to a stored digest bucket ([`replication::sync::bucket_of`]
/// of the public id, set when a row is inserted): -1 until
/// [`backfill_buckets`] fills it in.
const MIGRATE_BUCKET: &str = "ALTER TABLE counters ADD COLUMN sync_bucket INTEGER NOT NULL DEFAULT -1";
/// The index that makes one bucket a range read rather than a full scan.
const BUCKET_INDEX: &str = "CREATE INDEX IF NOT EXISTS counters_sync_bucket ON counters (sync_bucket)";

const MIGRATE_DIGEST: &str =
    "ALTER TABLE counters ADD COLUMN otp_digest BLOB NOT NULL DEFAULT X'0000000000000000000000000000000000000000000000000000000000000000'";

/// The compare-and-set: insert, or update only if strictly greater
/// (row values compare lexicographically). `created` is set on insert only.
const UPSERT: &str =
    "INSERT INTO counters (public_id, counter, session_use, high, low, nonce, modified, created, otp_digest, sync_bucket) \
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?7, ?8, ?9) \
     ON CONFLICT (public_id) DO UPDATE SET counter = excluded.counter, session_use = excluded.session_use, \
     high = excluded.high, low = excluded.low, nonce = excluded.nonce, modified = excluded.modified, \
     otp_digest = excluded.otp_digest \
     WHERE (excluded.counter, excluded.session_use) > (counters.counter, counters.session_use)";
/// The max merge of a peer's outbox row: strictly greater counters win; at
/// equal counters the greater (nonce, digest) wins, so that the result does
/// not depend on the order rows arrive in. The timestamp of a peer's OTP is
/// not replicated: `high` and `low` become 0.
const MERGE: &str = "INSERT INTO counters (public_id, counter, session_use, high, low, nonce, modified, created, otp_digest, sync_bucket) \
     VALUES (?1, ?2, ?3, 0, 0, ?4, ?5, ?5, ?6, ?7) \
     ON CONFLICT (public_id) DO UPDATE SET counter = excluded.counter, session_use = excluded.session_use, \
     high = 0, low = 0, nonce = excluded.nonce, modified = excluded.modified, otp_digest = excluded.otp_digest \
     WHERE (excluded.counter, excluded.session_use, excluded.nonce, excluded.otp_digest) \
     > (counters.counter, counters.session_use, counters.nonce, counters.otp_digest)";
/// Only while some peer is registered: a lone site keeps no outbox (a peer
/// joining later bootstraps from a snapshot, then the outbox after its
/// registration).
/// The outbox and its per-peer cursors ([`ksm::outbox`]).
const OUTBOX: Outbox = Outbox { table: "outbox", cursors: "peer_cursors" };
const APPEND_OUTBOX: &str = "INSERT INTO outbox (public_id, counter, session_use, nonce, otp_digest, modified) \
     SELECT ?1, ?2, ?3, ?4, ?5, ?6 WHERE EXISTS (SELECT 1 FROM peer_cursors)";
const SELECT_VERDICT: &str = "SELECT counter, session_use, nonce, otp_digest FROM counters WHERE public_id = ?1";
const SELECT_ROW: &str = "SELECT counter, session_use, high, low, nonce, modified, created, otp_digest FROM counters WHERE public_id = ?1";
const SELECT_OUTBOX: &str = "SELECT seq, public_id, counter, session_use, nonce, otp_digest, modified FROM outbox \
     WHERE seq > ?1 ORDER BY seq LIMIT ?2";

/// Default busy timeout: how long a write waits for another process's
/// write transaction on the same file (e.g. `validator client add`).
pub const DEFAULT_BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// Default cap on the updates in one transaction.
pub const DEFAULT_MAX_BATCH: usize = 256;
/// Default time a caller waits for the writer's answer.
pub const DEFAULT_REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// Upper bounds of the batch-size histogram.
const BATCH_BUCKETS: [u64; 11] = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024];

/// SQLite's `synchronous` setting for the counter database (WAL mode).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Synchronous {
    /// fsync the WAL at every commit: durable across power loss. The default.
    #[default]
    Full,
    /// No fsync at commit: durable across process crashes only; a power loss
    /// or OS crash may roll back the last commits (and so accept their OTPs
    /// again). For benchmarks.
    Normal,
}

impl Synchronous {
    /// The pragma value.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::Full => "full",
            Self::Normal => "normal",
        }
    }
}

impl fmt::Display for Synchronous {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Synchronous {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "full" => Ok(Self::Full),
            "normal" => Ok(Self::Normal),
            _ => Err(format!("synchronous must be `full` or `normal`, not `{s}`")),
        }
    }
}

/// How to open a [`SqliteCounters`].
#[derive(Clone, Debug)]
pub struct CounterOptions {
    /// `synchronous` (default FULL).
    pub synchronous: Synchronous,
    /// Most updates in one transaction (at least 1; default 256).
    pub max_batch: usize,
    /// How long a caller waits for its answer before giving up with
    /// [`BackendFailure`] (default 10 s).
    pub reply_timeout: Duration,
    /// SQLite busy timeout of the connections (default 5 s).
    pub busy_timeout: Duration,
}

impl Default for CounterOptions {
    fn default() -> Self {
        Self {
            synchronous: Synchronous::Full,
            max_batch: DEFAULT_MAX_BATCH,
            reply_timeout: DEFAULT_REPLY_TIMEOUT,
            busy_timeout: DEFAULT_BUSY_TIMEOUT,
        }
    }
}

/// What the store holds for one YubiKey.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredCounters {
    /// The last accepted (counter, use).
    pub counters: Counters,
    /// Its timestamp, high 8 bits.
    pub timestamp_high: u8,
    /// Its timestamp, low 16 bits.
    pub timestamp_low: u16,
    /// The nonce of the request that was accepted.
    pub nonce: String,
    /// When it was accepted (Unix seconds, the update's `now`).
    pub modified: i64,
    /// When the YubiKey was first seen (Unix seconds).
    pub created: i64,
    /// The OTP digest of the request that was accepted (zero bytes for a
    /// row written before digests were stored).
    pub otp_digest: [u8; 32],
}

/// A snapshot of the writer's figures.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CounterStats {
    /// Transactions committed (one fsync each).
    pub batches: u64,
    /// Transactions that failed (rolled back; their callers got
    /// [`BackendFailure`]).
    pub failed_batches: u64,
    /// Updates in committed transactions.
    pub updates: u64,
    /// Of those, accepted.
    pub accepted: u64,
    /// Of those, replayed requests.
    pub replayed_request: u64,
    /// Of those, replayed OTPs.
    pub replayed_otp: u64,
    /// Updates answered [`BackendFailure`] because their batch failed.
    pub failed_updates: u64,
    /// Largest committed batch.
    pub max_batch: u64,
    /// Peer compare-and-sets that stored the proposal.
    pub peer_stored: u64,
    /// Peer compare-and-sets that found the same request.
    pub peer_same_request: u64,
    /// Peer compare-and-sets answered stale.
    pub peer_stale: u64,
}

impl CounterStats {
    /// Mean updates per committed transaction.
    #[must_use]
    pub fn mean_batch(&self) -> f64 {
        if self.batches == 0 {
            0.0
        } else {
            self.updates as f64 / self.batches as f64
        }
    }
}

/// Histogram of batch sizes with [`BATCH_BUCKETS`].
#[derive(Debug, Default)]
struct SizeHistogram {
    buckets: [AtomicU64; BATCH_BUCKETS.len() + 1],
    sum: AtomicU64,
    count: AtomicU64,
    max: AtomicU64,
}

impl SizeHistogram {
    fn observe(&self, n: u64) {
        let i = BATCH_BUCKETS.iter().position(|b| n <= *b).unwrap_or(BATCH_BUCKETS.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum.fetch_add(n, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
        self.max.fetch_max(n, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str) {
        httpd::metrics::render_buckets(out, name, "", &BATCH_BUCKETS, &self.buckets, self.sum.load(Ordering::Relaxed));
    }
}

/// The writer's figures, shared with the store handle.
#[derive(Debug, Default)]
struct Stats {
    failed_batches: AtomicU64,
    accepted: AtomicU64,
    replayed_request: AtomicU64,
    replayed_otp: AtomicU64,
    failed_updates: AtomicU64,
    peer_stored: AtomicU64,
    peer_same_request: AtomicU64,
    peer_stale: AtomicU64,
    batch_sizes: SizeHistogram,
    /// The `COMMIT` alone (the fsync).
    commit: Histogram,
    /// A whole transaction, `BEGIN` to `COMMIT`.
    transaction: Histogram,
    /// What a caller waits: queue, transaction and commit.
    cas: Histogram,
}

/// One caller's work and where to answer.
struct Job {
    work: Work,
    reply: Reply,
}

/// A transaction of its own, run by the writer (merge, cursor, compaction).
type AloneFn = Box<dyn FnOnce(&Connection) -> Result<Done, String> + Send>;

/// What the writer is asked to do.
enum Work {
    /// Local compare-and-sets, in order (none: a liveness probe); grouped
    /// with other callers' in one transaction.
    Local(Vec<CounterUpdate>),
    /// A peer's compare-and-set; grouped like local updates.
    Peer { proposal: Proposal, now: i64 },
    /// Its own transaction, never grouped.
    Alone(AloneFn),
}

impl Work {
    /// The updates it adds to a group-commit batch.
    fn len(&self) -> usize {
        match self {
            Self::Local(u) => u.len(),
            Self::Peer { .. } => 1,
            Self::Alone(_) => 0,
        }
    }
}

/// What the writer answers, after COMMIT.
enum Done {
    Local(Vec<CasOutcome>),
    Peer(PeerCasResult),
    Merged(MergeCounts),
    Count(u64),
    /// A peer's cursor and the outbox head ([`SyncStore::changes`]).
    Cursor(PeerPosition),
}

type Answer = Result<Done, BackendFailure>;

/// Where the writer answers: a thread blocked in [`SqliteCounters::submit`],
/// or a task awaiting [`CounterStore::compare_and_set_async`].
enum Reply {
    Blocking(SyncSender<Answer>),
    Async(tokio::sync::oneshot::Sender<Answer>),
}

impl Reply {
    /// A caller that gave up is no longer listening: fine.
    fn send(self, answer: Answer) {
        match self {
            Self::Blocking(s) => {
                let _ = s.send(answer);
            }
            Self::Async(s) => {
                let _ = s.send(answer);
            }
        }
    }
}

/// One row of the outbox: a change accepted here (a local accept or a
/// peer's compare-and-set that stored), for peers to pull.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutboxRow {
    /// Position in the outbox: increasing in commit order, never reused.
    pub seq: u64,
    /// The YubiKey.
    pub public_id: PublicId,
    /// The counters stored.
    pub counters: Counters,
    /// The nonce of the request that stored them.
    pub nonce: String,
    /// The OTP digest of that request.
    pub otp_digest: OtpDigest,
    /// When they were stored (Unix seconds).
    pub modified: i64,
}

/// What [`SqliteCounters::merge_max`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MergeCounts {
    /// Rows that changed the stored state (greater counters, or a new key).
    pub applied: u64,
    /// Rows that changed nothing (not greater than what is stored).
    pub unchanged: u64,
}

/// The SQLite counter store. See the [module docs](self).
pub struct SqliteCounters {
    path: PathBuf,
    options: CounterOptions,
    sender: Option<Sender<Job>>,
    writer: Option<JoinHandle<()>>,
    reader: Mutex<Connection>,
    stats: Arc<Stats>,
}

impl fmt::Debug for SqliteCounters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteCounters").field("path", &self.path).field("options", &self.options).finish()
    }
}

fn failure(context: &str, e: impl fmt::Display) -> BackendFailure {
    BackendFailure(format!("counter store: {context}: {e}"))
}

/// Create `path` with mode 0600 if it does not exist; warn if an existing
/// file is readable by others.
pub(crate) fn create_private(path: &Path) -> Result<(), String> {
    match OpenOptions::new().write(true).create_new(true).mode(0o600).open(path) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            if let Ok(meta) = std::fs::metadata(path) {
                if meta.permissions().mode() & 0o077 != 0 {
                    tracing::warn!(path = %path.display(), "database is readable by other users; chmod 600 it");
                }
            }
            Ok(())
        }
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

/// Open a read-write connection to an existing database file: busy
/// timeout, WAL (checked: some file systems refuse it), `synchronous`.
pub(crate) fn open_read_write(path: &Path, synchronous: Synchronous, busy: Duration) -> Result<Connection, String> {
    let ctx = |e: rusqlite::Error| format!("{}: {e}", path.display());
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX).map_err(ctx)?;
    conn.busy_timeout(busy).map_err(ctx)?;
    let mode: String = conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0)).map_err(ctx)?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(format!("{}: the journal mode stays `{mode}`, WAL is required", path.display()));
    }
    conn.pragma_update(None, "synchronous", synchronous.name()).map_err(ctx)?;
    Ok(conn)
}

/// A read-only connection (WAL readers never wait for the writer).
pub(crate) fn open_read_only(path: &Path, busy: Duration) -> Result<Connection, String> {
    let ctx = |e: rusqlite::Error| format!("{}: {e}", path.display());
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX).map_err(ctx)?;
    conn.busy_timeout(busy).map_err(ctx)?;
    Ok(conn)
}

/// Create the tables that are missing and bring a database of the previous
/// schema (no `counters.otp_digest`) up to date, in one write transaction
/// (two processes opening one old file at once migrate it once).
fn migrate(conn: &Connection) -> Result<(), String> {
    conn.execute_batch("BEGIN IMMEDIATE").map_err(|e| format!("begin: {e}"))?;
    let result = (|| -> rusqlite::Result<()> {
        conn.execute_batch(SCHEMA)?;
        let has_digest: bool = conn.query_row("SELECT count(*) FROM pragma_table_info('counters') WHERE name = 'otp_digest'", [], |r| {
            r.get::<_, i64>(0).map(|n| n > 0)
        })?;
        if !has_digest {
            conn.execute_batch(MIGRATE_DIGEST)?;
            tracing::info!("counter store migrated: column counters.otp_digest added (zero for the existing rows)");
        }
        let has_bucket: bool =
            conn.query_row("SELECT count(*) FROM pragma_table_info('counters') WHERE name = 'sync_bucket'", [], |r| {
                r.get::<_, i64>(0).map(|n| n > 0)
            })?;
        if !has_bucket {
            conn.execute_batch(MIGRATE_BUCKET)?;
            tracing::info!("counter store migrated: column counters.sync_bucket added");
        }
        conn.execute_batch(BUCKET_INDEX)?;
        let filled = backfill_buckets(conn)?;
        if filled > 0 {
            tracing::info!(rows = filled, "counter store: digest buckets filled in");
        }
        conn.execute_batch("COMMIT")
    })();
    result.map_err(|e| {
        rollback(conn);
        e.to_string()
    })
}

/// The digest bucket of a public id (modhex), as stored in `sync_bucket`.
fn sync_bucket(public_id: &str) -> i64 {
    i64::from(replication::sync::bucket_of(public_id.as_bytes()))
}

/// Fill in `sync_bucket` where it is -1 (rows from before the column, or
/// written by an older binary since); how many. Inside the caller's
/// transaction.
fn backfill_buckets(conn: &Connection) -> rusqlite::Result<usize> {
    let missing: Vec<String> =
        conn.prepare("SELECT public_id FROM counters WHERE sync_bucket = -1")?.query_map([], |r| r.get(0))?.collect::<Result<_, _>>()?;
    let mut update = conn.prepare("UPDATE counters SET sync_bucket = ?2 WHERE public_id = ?1")?;
    for public_id in &missing {
        update.execute(params![public_id, sync_bucket(public_id)])?;
    }
    Ok(missing.len())
}

/// Counters from their columns, if valid.
fn counters_from(counter: i64, session_use: i64) -> Option<Counters> {
    Counters::new(u16::try_from(counter).ok()?, u8::try_from(session_use).ok()?).ok()
}

/// An outbox or snapshot row as SQLite gives it: seq (0 for snapshot
/// rows), public id, counter, use, nonce, digest, modified.
type RawRow = (i64, String, i64, i64, String, Vec<u8>, i64);

fn raw_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<RawRow> {
    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?, r.get(6)?))
}

/// Check a raw row; a damaged one is named by its seq (outbox) or its
/// public id (snapshot).
fn outbox_row((seq, public_id, counter, session_use, nonce, digest, modified): RawRow) -> Result<OutboxRow, BackendFailure> {
    let damaged = || {
        let which = if seq == 0 { format!("the row of {public_id}") } else { format!("outbox row {seq}") };
        BackendFailure(format!("counter store: {which} is damaged"))
    };
    Ok(OutboxRow {
        seq: u64::try_from(seq).map_err(|_| damaged())?,
        public_id: public_id.parse().map_err(|_| damaged())?,
        counters: counters_from(counter, session_use).ok_or_else(damaged)?,
        nonce,
        otp_digest: OtpDigest(digest.try_into().map_err(|_| damaged())?),
        modified,
    })
}

/// The current Unix time in seconds.
fn unix_now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

fn lock(m: &Mutex<Connection>) -> std::sync::MutexGuard<'_, Connection> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl SqliteCounters {
    /// Open (creating it, mode 0600, if missing) the counter store at `path`
    /// with the default options (`synchronous = FULL`).
    pub fn open(path: &Path) -> Result<Self, BackendFailure> {
        Self::open_with(path, CounterOptions::default())
    }

    /// Open with explicit options.
    pub fn open_with(path: &Path, options: CounterOptions) -> Result<Self, BackendFailure> {
        let options = CounterOptions { max_batch: options.max_batch.max(1), ..options };
        create_private(path).map_err(|e| failure("open", e))?;
        let conn = open_read_write(path, options.synchronous, options.busy_timeout).map_err(|e| failure("open", e))?;
        migrate(&conn).map_err(|e| failure("schema", e))?;
        let reader = open_read_only(path, options.busy_timeout).map_err(|e| failure("open", e))?;
        let stats = Arc::new(Stats::default());
        let (sender, receiver) = mpsc::channel();
        let writer = {
            let stats = stats.clone();
            let max_batch = options.max_batch;
            std::thread::Builder::new()
                .name("counter-writer".to_owned())
                .spawn(move || writer_loop(&conn, &receiver, max_batch, &stats))
                .map_err(|e| failure("cannot start the writer thread", e))?
        };
        tracing::info!(path = %path.display(), synchronous = %options.synchronous, max_batch = options.max_batch, "counter store open");
        Ok(Self { path: path.to_path_buf(), options, sender: Some(sender), writer: Some(writer), reader: Mutex::new(reader), stats })
    }

    /// The database file.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The options in force.
    #[must_use]
    pub fn options(&self) -> &CounterOptions {
        &self.options
    }

    /// Record several updates, in order, in one transaction (possibly
    /// shared with other callers'); one outcome per update. A public id
    /// repeated in `updates` is decided against the earlier ones.
    pub fn compare_and_set_many(&self, updates: &[CounterUpdate]) -> Result<Vec<CasOutcome>, BackendFailure> {
        if updates.is_empty() {
            return Ok(Vec::new());
        }
        let outcomes = self.submit_local(updates.to_vec())?;
        if outcomes.len() == updates.len() {
            Ok(outcomes)
        } else {
            Err(BackendFailure(format!("counter store: {} outcomes for {} updates", outcomes.len(), updates.len())))
        }
    }

    /// Local updates to the writer; their outcomes.
    fn submit_local(&self, updates: Vec<CounterUpdate>) -> Result<Vec<CasOutcome>, BackendFailure> {
        match self.submit(Work::Local(updates))? {
            Done::Local(outcomes) => Ok(outcomes),
            _ => Err(BackendFailure("counter store: the writer answered another question".to_owned())),
        }
    }

    /// Hand a job to the writer and wait for its answer.
    fn submit(&self, work: Work) -> Answer {
        let started = Instant::now();
        let (reply, answer) = mpsc::sync_channel(1);
        let sender = self.sender.as_ref().ok_or_else(|| BackendFailure("counter store: closed".to_owned()))?;
        sender
            .send(Job { work, reply: Reply::Blocking(reply) })
            .map_err(|_| BackendFailure("counter store: the writer thread has stopped".to_owned()))?;
        let result = match answer.recv_timeout(self.options.reply_timeout) {
            Ok(result) => result,
            Err(RecvTimeoutError::Timeout) => Err(BackendFailure(format!(
                "counter store: no answer from the writer within {} ms (the update may still be committed)",
                self.options.reply_timeout.as_millis()
            ))),
            Err(RecvTimeoutError::Disconnected) => {
                Err(BackendFailure("counter store: the writer thread stopped before answering".to_owned()))
            }
        };
        self.stats.cas.observe(started.elapsed());
        result
    }

    /// What is stored for `public_id` (committed state), if anything.
    pub fn get(&self, public_id: &PublicId) -> Result<Option<StoredCounters>, BackendFailure> {
        type Row = (i64, i64, i64, i64, String, i64, i64, Vec<u8>);
        let conn = lock(&self.reader);
        let row: Option<Row> = conn
            .prepare_cached(SELECT_ROW)
            .and_then(|mut s| {
                s.query_row(params![public_id.to_modhex()], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?, r.get(6)?, r.get(7)?))
                })
                .optional()
            })
            .map_err(|e| failure("read", e))?;
        drop(conn);
        let Some((counter, session_use, high, low, nonce, modified, created, digest)) = row else { return Ok(None) };
        let damaged = || BackendFailure(format!("counter store: the row of {public_id} is damaged"));
        let counters = counters_from(counter, session_use).ok_or_else(damaged)?;
        Ok(Some(StoredCounters {
            counters,
            timestamp_high: u8::try_from(high).map_err(|_| damaged())?,
            timestamp_low: u16::try_from(low).map_err(|_| damaged())?,
            nonce,
            modified,
            created,
            otp_digest: digest.try_into().map_err(|_| damaged())?,
        }))
    }

    /// The peer compare-and-set of `proposal`, with exactly the rule of
    /// [`quorum::peer_cas`], decided and written atomically in a
    /// group-committed transaction like local updates (so local and peer
    /// updates of one key are serialized) and answered only after COMMIT:
    /// [`PeerCasResult::Stored`] is durable. A store writes the counters
    /// row (timestamp 0: a peer's OTP timestamp is not replicated) and an
    /// outbox row. Never answers [`PeerCasResult::Failed`]: a failure is
    /// the `Err`, and nothing of it was written.
    pub fn peer_compare_and_set(&self, proposal: &Proposal) -> Result<PeerCasResult, BackendFailure> {
        let now = unix_now();
        match self.submit(Work::Peer { proposal: proposal.clone(), now })? {
            Done::Peer(result) => Ok(result),
            _ => Err(BackendFailure("counter store: the writer answered another question".to_owned())),
        }
    }

    /// Up to `limit` outbox rows after `after`, in `seq` order (committed
    /// state). A peer catching up asks from its acknowledged cursor.
    pub fn outbox_after(&self, after: u64, limit: usize) -> Result<Vec<OutboxRow>, BackendFailure> {
        let after = i64::try_from(after).unwrap_or(i64::MAX);
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let conn = lock(&self.reader);
        let rows: Vec<RawRow> = conn
            .prepare_cached(SELECT_OUTBOX)
            .and_then(|mut s| s.query_map(params![after, limit], raw_row)?.collect())
            .map_err(|e| failure("read outbox", e))?;
        drop(conn);
        rows.into_iter().map(outbox_row).collect()
    }

    /// Register `peer` with cursor 0 if it is unknown, so that [`Self::compact`]
    /// keeps every row for it until it acknowledges. Register every peer
    /// before the first compaction: rows below the minimum cursor of the
    /// peers *known then* are deleted.
    pub fn add_peer(&self, peer: &str) -> Result<(), BackendFailure> {
        let peer = peer.to_owned();
        self.alone(move |conn| {
            conn.execute("INSERT INTO peer_cursors (peer, acked_seq) VALUES (?1, 0) ON CONFLICT (peer) DO NOTHING", params![peer])
                .map_err(|e| format!("add peer: {e}"))?;
            Ok(Done::Count(0))
        })
        .map(drop)
    }

    /// Forget `peer` (decommissioned): it no longer holds back compaction.
    pub fn remove_peer(&self, peer: &str) -> Result<(), BackendFailure> {
        let peer = peer.to_owned();
        self.alone(move |conn| OUTBOX.remove(conn, &peer).map(|()| Done::Count(0)).map_err(|e| format!("remove peer: {e}"))).map(drop)
    }

    /// `peer` has applied every outbox row up to `seq`. The cursor only
    /// moves forward (an older, late acknowledgement changes nothing); an
    /// unknown peer is registered.
    pub fn ack(&self, peer: &str, seq: u64) -> Result<(), BackendFailure> {
        let peer = peer.to_owned();
        let seq = i64::try_from(seq).map_err(|_| BackendFailure(format!("counter store: cursor {seq} out of range")))?;
        self.alone(move |conn| {
            conn.execute(
                "INSERT INTO peer_cursors (peer, acked_seq) VALUES (?1, ?2) \
                 ON CONFLICT (peer) DO UPDATE SET acked_seq = max(acked_seq, excluded.acked_seq)",
                params![peer, seq],
            )
            .map_err(|e| format!("ack: {e}"))?;
            Ok(Done::Count(0))
        })
        .map(drop)
    }

    /// The highest `seq` ever appended to the outbox (0 before the first):
    /// a peer whose cursor is here has everything. Compaction does not
    /// lower it.
    pub fn outbox_last_seq(&self) -> Result<u64, BackendFailure> {
        OUTBOX.head(&lock(&self.reader)).map_err(|e| failure("read outbox", e))
    }

    /// A page of the whole counter state, for bootstrapping a new site: up
    /// to `limit` keys after `after` (exclusive; `None` from the start) in
    /// public-id order, as rows with `seq` 0 for [`Self::merge_max`].
    ///
    /// **Bootstrap.** The new site first reads the source's
    /// [`Self::outbox_last_seq`] `L` (and the source registers it with
    /// [`Self::add_peer`] and acknowledges `L` for it, so nothing after `L`
    /// is compacted away), then pages through the snapshot merging each
    /// page, then pulls the outbox after `L` as in ordinary catch-up. A
    /// change committed during the paging is in the outbox after `L`, and
    /// the max rule makes the order of the two irrelevant.
    pub fn snapshot_after(&self, after: Option<&PublicId>, limit: usize) -> Result<Vec<OutboxRow>, BackendFailure> {
        let after = after.map(PublicId::to_modhex).unwrap_or_default();
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let conn = lock(&self.reader);
        let rows: Vec<RawRow> = conn
            .prepare_cached(
                "SELECT 0, public_id, counter, session_use, nonce, otp_digest, modified FROM counters \
                 WHERE public_id > ?1 ORDER BY public_id LIMIT ?2",
            )
            .and_then(|mut s| s.query_map(params![after, limit], raw_row)?.collect())
            .map_err(|e| failure("read snapshot", e))?;
        drop(conn);
        rows.into_iter().map(outbox_row).collect()
    }

    /// Every known peer and its acknowledged cursor, by name.
    pub fn peer_cursors(&self) -> Result<Vec<(String, u64)>, BackendFailure> {
        OUTBOX.cursors(&lock(&self.reader)).map_err(|e| failure("read cursors", e))
    }

    /// Delete the outbox rows at or below the smallest acknowledged cursor
    /// of all known peers (none when no peer is known); how many.
    pub fn compact(&self) -> Result<u64, BackendFailure> {
        match self.alone(|conn| OUTBOX.compact(conn).map(Done::Count).map_err(|e| format!("compact: {e}")))? {
            Done::Count(n) => Ok(n),
            _ => Err(BackendFailure("counter store: the writer answered another question".to_owned())),
        }
    }

    /// Apply a peer's outbox rows with the max rule, in one transaction:
    /// a row is written only if its counters are strictly greater than the
    /// stored ones (at equal counters, a greater (nonce, digest) wins, so
    /// that concurrent conflicting rows converge whatever their order). A
    /// counter is never lowered; applying the same rows again, or in
    /// another order, gives the same state. `seq` is ignored: the caller
    /// acknowledges the last one it pulled after this returns. Merged rows
    /// are not appended to this site's outbox: every site pulls from every
    /// other one directly. Merge in pages (say 1,000 rows, a few ms): the
    /// writer runs no local compare-and-set while a merge is in progress.
    ///
    /// **Catch-up.** A site that was down or cut off pulls each peer's
    /// [`Self::outbox_after`] its cursor, applies the rows with
    /// `merge_max` (durable on return), then acknowledges the last `seq`
    /// to that peer, which records it with [`Self::ack`] and may
    /// [`Self::compact`].
    pub fn merge_max(&self, rows: &[OutboxRow]) -> Result<MergeCounts, BackendFailure> {
        // Only what would change the state goes to the writer: between
        // two sites that are up, nearly every pulled row is already held
        // (its compare-and-set reached both), and the writer, which the
        // live compare-and-sets wait for, should not spend a transaction
        // finding that out.
        let fresh = self.newer_than_stored(rows)?;
        let held = (rows.len() - fresh.len()) as u64;
        if fresh.is_empty() {
            return Ok(MergeCounts { applied: 0, unchanged: held });
        }
        let rows = fresh;
        match self.alone(move |conn| {
            let mut merge = conn.prepare_cached(MERGE).map_err(|e| format!("prepare: {e}"))?;
            let mut counts = MergeCounts::default();
            for row in &rows {
                let public_id = row.public_id.to_modhex();
                let changed = merge
                    .execute(params![
                        public_id,
                        row.counters.counter(),
                        row.counters.session_use(),
                        row.nonce,
                        row.modified,
                        row.otp_digest.0.as_slice(),
                        sync_bucket(&public_id)
                    ])
                    .map_err(|e| format!("merge of {public_id}: {e}"))?;
                if changed == 0 {
                    counts.unchanged += 1;
                } else {
                    counts.applied += 1;
                }
            }
            Ok(Done::Merged(counts))
        })? {
            Done::Merged(counts) => Ok(MergeCounts { unchanged: counts.unchanged + held, ..counts }),
            _ => Err(BackendFailure("counter store: the writer answered another question".to_owned())),
        }
    }

    /// The rows of `rows` that [`MERGE`] would write, judged on the reader
    /// connection (committed state): greater than the stored `(counter,
    /// use, nonce, digest)`, compared as SQLite compares them (integers,
    /// then text and blob bytes), or a key not stored. Stored values only
    /// grow, so a row dropped here could not have changed anything later.
    fn newer_than_stored(&self, rows: &[OutboxRow]) -> Result<Vec<OutboxRow>, BackendFailure> {
        let conn = lock(&self.reader);
        // One read transaction (one snapshot, one WAL lock) for the page.
        let tx = conn.unchecked_transaction().map_err(|e| failure("read", e))?;
        let mut stmt = tx.prepare_cached(SELECT_VERDICT).map_err(|e| failure("read", e))?;
        let mut fresh = Vec::new();
        for row in rows {
            let stored: Option<(i64, i64, String, Vec<u8>)> = stmt
                .query_row(params![row.public_id.to_modhex()], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
                .optional()
                .map_err(|e| failure("read", e))?;
            let newer = stored.is_none_or(|(counter, session_use, nonce, digest)| {
                (i64::from(row.counters.counter()), i64::from(row.counters.session_use()), row.nonce.as_bytes(), &row.otp_digest.0[..])
                    > (counter, session_use, nonce.as_bytes(), digest.as_slice())
            });
            if newer {
                fresh.push(row.clone());
            }
        }
        drop(stmt);
        tx.finish().map_err(|e| failure("read", e))?;
        Ok(fresh)
    }

    /// Run `f` in a transaction of its own on the writer thread.
    fn alone(&self, f: impl FnOnce(&Connection) -> Result<Done, String> + Send + 'static) -> Answer {
        self.submit(Work::Alone(Box::new(f)))
    }

    /// How many YubiKeys have counters (a full count: for tooling, not for
    /// every metrics scrape).
    pub fn count(&self) -> Result<u64, BackendFailure> {
        let n: i64 = lock(&self.reader).query_row("SELECT count(*) FROM counters", [], |r| r.get(0)).map_err(|e| failure("read", e))?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// Health check for `/health`: the writer thread is alive and answers
    /// (after the batch in progress: a failing batch fails the check), and
    /// the table can be read.
    pub fn check(&self) -> Result<(), BackendFailure> {
        if self.writer.as_ref().is_none_or(JoinHandle::is_finished) {
            return Err(BackendFailure("counter store: the writer thread has stopped".to_owned()));
        }
        self.submit_local(Vec::new())?;
        lock(&self.reader)
            .query_row("SELECT count(*) FROM (SELECT 1 FROM counters LIMIT 1)", [], |_| Ok(()))
            .map_err(|e| failure("read", e))
    }

    /// The writer's figures so far.
    #[must_use]
    pub fn stats(&self) -> CounterStats {
        let s = &self.stats;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        CounterStats {
            batches: load(&s.batch_sizes.count),
            failed_batches: load(&s.failed_batches),
            updates: load(&s.batch_sizes.sum),
            accepted: load(&s.accepted),
            replayed_request: load(&s.replayed_request),
            replayed_otp: load(&s.replayed_otp),
            failed_updates: load(&s.failed_updates),
            max_batch: load(&s.batch_sizes.max),
            peer_stored: load(&s.peer_stored),
            peer_same_request: load(&s.peer_same_request),
            peer_stale: load(&s.peer_stale),
        }
    }

    /// Append the store's series to a Prometheus text exposition.
    pub fn render_metrics(&self, out: &mut String) {
        let s = &self.stats;
        let st = self.stats();
        single(out, "validator_counter_batches_total", "counter", "Counter-store transactions committed (one fsync each).", st.batches);
        single(
            out,
            "validator_counter_batch_failures_total",
            "counter",
            "Counter-store transactions that failed and were rolled back.",
            st.failed_batches,
        );
        header(out, "validator_counter_updates_total", "counter", "Compare-and-set updates by outcome.");
        for (outcome, n) in [
            ("accepted", st.accepted),
            ("replayed_request", st.replayed_request),
            ("replayed_otp", st.replayed_otp),
            ("failed", st.failed_updates),
        ] {
            let _ = writeln!(out, "validator_counter_updates_total{{outcome=\"{outcome}\"}} {n}");
        }
        header(out, "validator_counter_peer_cas_total", "counter", "Peer compare-and-sets by outcome.");
        for (outcome, n) in [("stored", st.peer_stored), ("same_request", st.peer_same_request), ("stale", st.peer_stale)] {
            let _ = writeln!(out, "validator_counter_peer_cas_total{{outcome=\"{outcome}\"}} {n}");
        }
        header(out, "validator_counter_batch_size", "histogram", "Updates per committed counter-store transaction.");
        s.batch_sizes.render(out, "validator_counter_batch_size");
        single(out, "validator_counter_batch_size_max", "gauge", "Largest committed counter-store transaction.", st.max_batch);
        header(
            out,
            "validator_counter_commit_seconds",
            "histogram",
            "Time of the COMMIT (WAL write and fsync) of a counter-store transaction.",
        );
        s.commit.render(out, "validator_counter_commit_seconds", "");
        header(out, "validator_counter_transaction_seconds", "histogram", "Time of a counter-store transaction, BEGIN to COMMIT.");
        s.transaction.render(out, "validator_counter_transaction_seconds", "");
        header(out, "validator_counter_cas_seconds", "histogram", "Time a caller waits for a compare-and-set: queue, transaction, commit.");
        s.cas.render(out, "validator_counter_cas_seconds", "");
        if let (Ok(last), Ok(cursors)) = (self.outbox_last_seq(), self.peer_cursors()) {
            single(out, "validator_counter_outbox_last_seq", "gauge", "Highest sequence number appended to the replication outbox.", last);
            header(out, "validator_counter_outbox_unacked", "gauge", "Outbox rows a peer has not acknowledged yet.");
            for (peer, acked) in cursors {
                let peer: String = peer.chars().filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':')).collect();
                let _ = writeln!(out, "validator_counter_outbox_unacked{{peer=\"{peer}\"}} {}", last.saturating_sub(acked));
            }
        }
        header(out, "validator_counter_synchronous", "gauge", "SQLite synchronous setting of the counter store (1 for the one in force).");
        for mode in [Synchronous::Full, Synchronous::Normal] {
            let _ = writeln!(out, "validator_counter_synchronous{{mode=\"{mode}\"}} {}", u8::from(mode == self.options.synchronous));
        }
    }
}

impl CounterStore for SqliteCounters {
    /// Queue the update; the writer answers the awaiting task itself after
    /// COMMIT, so no thread waits through the transaction and its fsync.
    /// The caller bounds the wait (the request deadline); dropping the
    /// future leaves the update to be committed (a burned OTP, never a
    /// double acceptance).
    fn compare_and_set_async(&self, u: &CounterUpdate) -> crate::CasFuture {
        let started = Instant::now();
        let stats = self.stats.clone();
        let (reply, answer) = tokio::sync::oneshot::channel();
        let queued = match self.sender.as_ref() {
            None => Err(BackendFailure("counter store: closed".to_owned())),
            Some(s) => s
                .send(Job { work: Work::Local(vec![u.clone()]), reply: Reply::Async(reply) })
                .map_err(|_| BackendFailure("counter store: the writer thread has stopped".to_owned())),
        };
        Box::pin(async move {
            queued?;
            let result = match answer.await {
                Ok(Ok(Done::Local(outcomes))) => match outcomes.as_slice() {
                    [one] => Ok(*one),
                    _ => Err(BackendFailure(format!("counter store: {} outcomes for one update", outcomes.len()))),
                },
                Ok(Ok(_)) => Err(BackendFailure("counter store: the writer answered another question".to_owned())),
                Ok(Err(e)) => Err(e),
                Err(_) => Err(BackendFailure("counter store: the writer thread stopped before answering".to_owned())),
            };
            stats.cas.observe(started.elapsed());
            result
        })
    }

    fn compare_and_set(&self, u: &CounterUpdate) -> Result<CasOutcome, BackendFailure> {
        let outcomes = self.submit_local(vec![u.clone()])?;
        match outcomes.as_slice() {
            [one] => Ok(*one),
            _ => Err(BackendFailure(format!("counter store: {} outcomes for one update", outcomes.len()))),
        }
    }
}

/// A failed peer compare-and-set: logged (never the proposal's nonce or
/// digest) and answered [`PeerCasResult::Failed`], which the origin does
/// not count.
fn peer_cas_failed(origin: quorum::SiteId, public_id: PublicId, e: &BackendFailure) -> PeerCasResult {
    tracing::error!(%origin, %public_id, error = %e, "peer compare-and-set failed");
    PeerCasResult::Failed
}

impl replication::node::DurableCas for SqliteCounters {
    /// [`SqliteCounters::peer_compare_and_set`].
    fn peer_cas(&self, origin: quorum::SiteId, proposal: &Proposal) -> PeerCasResult {
        self.peer_compare_and_set(proposal).unwrap_or_else(|e| peer_cas_failed(origin, proposal.public_id, &e))
    }

    /// Queued like [`DurableCas::peer_cas`](replication::node::DurableCas::peer_cas), but the writer answers the awaiting
    /// task itself after COMMIT (as [`CounterStore::compare_and_set_async`]).
    fn peer_cas_async(self: Arc<Self>, origin: quorum::SiteId, proposal: Proposal) -> replication::node::CasFuture {
        let public_id = proposal.public_id;
        let (reply, answer) = tokio::sync::oneshot::channel();
        let queued = match self.sender.as_ref() {
            None => Err(BackendFailure("counter store: closed".to_owned())),
            Some(s) => s
                .send(Job { work: Work::Peer { proposal, now: unix_now() }, reply: Reply::Async(reply) })
                .map_err(|_| BackendFailure("counter store: the writer thread has stopped".to_owned())),
        };
        Box::pin(async move {
            let result = match queued {
                Err(e) => Err(e),
                Ok(()) => match answer.await {
                    Ok(Ok(Done::Peer(result))) => Ok(result),
                    Ok(Ok(_)) => Err(BackendFailure("counter store: the writer answered another question".to_owned())),
                    Ok(Err(e)) => Err(e),
                    Err(_) => Err(BackendFailure("counter store: the writer thread stopped before answering".to_owned())),
                },
            };
            result.unwrap_or_else(|e| peer_cas_failed(origin, public_id, &e))
        })
    }
}

impl Drop for SqliteCounters {
    /// Close the channel: the writer answers what is queued, then stops.
    fn drop(&mut self) {
        drop(self.sender.take());
        if let Some(writer) = self.writer.take() {
            if writer.join().is_err() {
                tracing::error!(path = %self.path.display(), "the counter writer thread panicked");
            }
        }
    }
}

/// The writer: take what is queued, one transaction, answer after COMMIT.
/// A job that needs a transaction of its own ([`Work::Alone`]) ends the
/// batch being gathered and runs after it.
fn writer_loop(conn: &Connection, jobs: &Receiver<Job>, max_batch: usize, stats: &Stats) {
    let mut batch: Vec<Job> = Vec::with_capacity(max_batch);
    let mut held: Option<Job> = None;
    loop {
        let first = match held.take() {
            Some(job) => job,
            None => match jobs.recv() {
                Ok(job) => job,
                Err(_) => break,
            },
        };
        let first = match first.work {
            Work::Alone(f) => {
                let answer = run_alone(conn, f).map_err(|e| {
                    stats.failed_batches.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(error = %e, "counter-store maintenance transaction failed");
                    BackendFailure(format!("counter store: {e}"))
                });
                first.reply.send(answer);
                continue;
            }
            work => Job { work, reply: first.reply },
        };
        let mut updates = first.work.len();
        batch.push(first);
        while updates < max_batch {
            match jobs.try_recv() {
                Ok(job) if matches!(job.work, Work::Alone(_)) => {
                    held = Some(job);
                    break;
                }
                Ok(job) => {
                    updates += job.work.len();
                    batch.push(job);
                }
                Err(_) => break,
            }
        }
        if updates == 0 {
            // Liveness probes only.
            for job in batch.drain(..) {
                job.reply.send(Ok(Done::Local(Vec::new())));
            }
            continue;
        }
        match run_batch(conn, &batch, stats) {
            Ok(answers) => {
                stats.batch_sizes.observe(updates as u64);
                for (job, done) in batch.drain(..).zip(answers) {
                    count(stats, &done);
                    job.reply.send(Ok(done));
                }
            }
            Err(e) => {
                stats.failed_batches.fetch_add(1, Ordering::Relaxed);
                stats.failed_updates.fetch_add(updates as u64, Ordering::Relaxed);
                tracing::error!(error = %e, updates, "counter-store transaction failed; every update in it answered as a backend failure");
                for job in batch.drain(..) {
                    job.reply.send(Err(BackendFailure(format!("counter store: {e}"))));
                }
            }
        }
    }
}

/// Add a committed answer to the figures.
fn count(stats: &Stats, done: &Done) {
    match done {
        Done::Local(outcomes) => {
            for o in outcomes {
                let counter = match o {
                    CasOutcome::Accepted => &stats.accepted,
                    CasOutcome::ReplayedRequest => &stats.replayed_request,
                    CasOutcome::ReplayedOtp => &stats.replayed_otp,
                };
                counter.fetch_add(1, Ordering::Relaxed);
            }
        }
        Done::Peer(result) => {
            let counter = match result {
                PeerCasResult::Stored => &stats.peer_stored,
                PeerCasResult::SameRequest => &stats.peer_same_request,
                PeerCasResult::Stale { .. } | PeerCasResult::Failed => &stats.peer_stale,
            };
            counter.fetch_add(1, Ordering::Relaxed);
        }
        Done::Merged(_) | Done::Count(_) | Done::Cursor(..) => {}
    }
}

/// The statements of a group-commit batch.
struct Statements<'c> {
    upsert: rusqlite::CachedStatement<'c>,
    verdict: rusqlite::CachedStatement<'c>,
    outbox: rusqlite::CachedStatement<'c>,
}

/// One transaction over every update of `batch`, committed. One answer per
/// job.
fn run_batch(conn: &Connection, batch: &[Job], stats: &Stats) -> Result<Vec<Done>, String> {
    let started = Instant::now();
    conn.execute_batch("BEGIN IMMEDIATE").map_err(|e| format!("begin: {e}"))?;
    let answers = (|| -> Result<Vec<Done>, String> {
        let prepare = |sql| conn.prepare_cached(sql).map_err(|e| format!("prepare: {e}"));
        let mut st = Statements { upsert: prepare(UPSERT)?, verdict: prepare(SELECT_VERDICT)?, outbox: prepare(APPEND_OUTBOX)? };
        batch
            .iter()
            .map(|job| match &job.work {
                Work::Local(updates) => updates.iter().map(|u| compare_and_set_one(&mut st, u)).collect::<Result<_, _>>().map(Done::Local),
                Work::Peer { proposal, now } => peer_compare_and_set_one(&mut st, proposal, *now).map(Done::Peer),
                Work::Alone(_) => Err("a maintenance job inside a batch".to_owned()),
            })
            .collect()
    })();
    let answers = match answers {
        Ok(a) => a,
        Err(e) => {
            rollback(conn);
            return Err(e);
        }
    };
    let commit_started = Instant::now();
    if let Err(e) = conn.execute_batch("COMMIT") {
        rollback(conn);
        return Err(format!("commit: {e}"));
    }
    stats.commit.observe(commit_started.elapsed());
    stats.transaction.observe(started.elapsed());
    Ok(answers)
}

/// `f` in a transaction of its own, committed.
fn run_alone(conn: &Connection, f: AloneFn) -> Result<Done, String> {
    conn.execute_batch("BEGIN IMMEDIATE").map_err(|e| format!("begin: {e}"))?;
    let done = match f(conn) {
        Ok(d) => d,
        Err(e) => {
            rollback(conn);
            return Err(e);
        }
    };
    if let Err(e) = conn.execute_batch("COMMIT") {
        rollback(conn);
        return Err(format!("commit: {e}"));
    }
    Ok(done)
}

fn rollback(conn: &Connection) {
    if !conn.is_autocommit() {
        if let Err(e) = conn.execute_batch("ROLLBACK") {
            tracing::error!(error = %e, "counter-store rollback failed");
        }
    }
}

/// What a row holds, as the replication rule sees it.
fn stored_row(verdict: &mut rusqlite::CachedStatement<'_>, public_id: &str) -> Result<Option<quorum::StoredCounters>, String> {
    let row: Option<(i64, i64, String, Vec<u8>)> = verdict
        .query_row(params![public_id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
        .optional()
        .map_err(|e| format!("read of {public_id}: {e}"))?;
    let Some((counter, session_use, nonce, digest)) = row else { return Ok(None) };
    let damaged = || format!("the row of {public_id} is damaged");
    Ok(Some(quorum::StoredCounters {
        counters: counters_from(counter, session_use).ok_or_else(damaged)?,
        nonce,
        otp_digest: OtpDigest(digest.try_into().map_err(|_| damaged())?),
    }))
}

/// Append a stored change to the outbox (same transaction as the upsert).
fn append_outbox(
    outbox: &mut rusqlite::CachedStatement<'_>,
    public_id: &str,
    counters: Counters,
    nonce: &str,
    digest: &[u8; 32],
    now: i64,
) -> Result<(), String> {
    outbox
        .execute(params![public_id, counters.counter(), counters.session_use(), nonce, digest.as_slice(), now])
        .map(drop)
        .map_err(|e| format!("outbox append for {public_id}: {e}"))
}

/// The conditional upsert, decided on the rows it changed; the row is read
/// only when nothing changed. An accepted update is appended to the outbox.
fn compare_and_set_one(st: &mut Statements<'_>, u: &CounterUpdate) -> Result<CasOutcome, String> {
    let public_id = u.public_id.to_modhex();
    let (counter, session_use) = (u.counters.counter(), u.counters.session_use());
    let changed = st
        .upsert
        .execute(params![
            public_id,
            counter,
            session_use,
            u.timestamp_high,
            u.timestamp_low,
            u.nonce,
            u.now,
            u.otp_digest.as_slice(),
            sync_bucket(&public_id)
        ])
        .map_err(|e| format!("update of {public_id}: {e}"))?;
    match changed {
        1 => {
            append_outbox(&mut st.outbox, &public_id, u.counters, &u.nonce, &u.otp_digest, u.now)?;
            Ok(CasOutcome::Accepted)
        }
        0 => match stored_row(&mut st.verdict, &public_id)? {
            Some(s) if s.counters == u.counters && s.nonce == u.nonce && s.otp_digest.0 == u.otp_digest => Ok(CasOutcome::ReplayedRequest),
            Some(_) => Ok(CasOutcome::ReplayedOtp),
            None => Err(format!("update of {public_id} changed nothing and there is no row")),
        },
        n => Err(format!("update of {public_id} changed {n} rows")),
    }
}

/// A peer's compare-and-set: read the row, decide with [`quorum::peer_cas`]
/// and, on [`quorum::CasDecision::Store`], write it and the outbox row. The
/// writer holds the write lock of the transaction: nothing comes between
/// the read and the write.
fn peer_compare_and_set_one(st: &mut Statements<'_>, p: &Proposal, now: i64) -> Result<PeerCasResult, String> {
    let public_id = p.public_id.to_modhex();
    let stored = stored_row(&mut st.verdict, &public_id)?;
    let decision = quorum::peer_cas(stored.as_ref(), p);
    if decision == quorum::CasDecision::Store {
        let (counter, session_use) = (p.counters.counter(), p.counters.session_use());
        let changed = st
            .upsert
            .execute(params![public_id, counter, session_use, 0u8, 0u16, p.nonce, now, p.otp_digest.0.as_slice(), sync_bucket(&public_id)])
            .map_err(|e| format!("peer update of {public_id}: {e}"))?;
        if changed != 1 {
            return Err(format!("peer update of {public_id} changed {changed} rows after the rule said store"));
        }
        append_outbox(&mut st.outbox, &public_id, p.counters, &p.nonce, &p.otp_digest.0, now)?;
    }
    Ok(decision.into())
}

/// The item encoding of the counters dataset ([`replication::sync::Dataset::COUNTERS`]).
///
/// **Key:** the public id in modhex, as ASCII bytes (what the `counters`
/// table is keyed by). **Value:** `counter` (u16 big-endian) ‖ `use` (u8) ‖
/// the OTP digest (32 bytes) ‖ the nonce (its UTF-8 bytes, the rest of the
/// value, at most [`sync_item::MAX_SYNC_NONCE`] bytes). The site-local columns
/// (`modified`, `created`, the OTP timestamp) are not part of it, so two
/// sites that merged each other's rows hold byte-identical values and
/// equal digests.
pub mod sync_item {
    use otp::{Counters, PublicId};
    use replication::quorum::OtpDigest;

    /// Longest nonce carried in an item (the protocol allows 16 to 40
    /// characters; the store is generous).
    pub const MAX_SYNC_NONCE: usize = 255;
    /// Bytes before the nonce.
    const FIXED: usize = 2 + 1 + 32;

    /// The item key of `public_id`.
    #[must_use]
    pub fn key(public_id: &PublicId) -> Vec<u8> {
        public_id.to_modhex().into_bytes()
    }

    /// The item value of a counters row.
    #[must_use]
    pub fn value(counters: Counters, otp_digest: &[u8; 32], nonce: &str) -> Vec<u8> {
        let mut v = Vec::with_capacity(FIXED + nonce.len());
        v.extend_from_slice(&counters.counter().to_be_bytes());
        v.push(counters.session_use());
        v.extend_from_slice(otp_digest);
        v.extend_from_slice(nonce.as_bytes());
        v
    }

    /// Decode an item; `None` if it is malformed.
    #[must_use]
    pub fn decode(key: &[u8], value: &[u8]) -> Option<(PublicId, Counters, OtpDigest, String)> {
        let public_id: PublicId = std::str::from_utf8(key).ok()?.parse().ok()?;
        // Only the canonical spelling: one key per YubiKey at every site.
        if public_id.to_modhex().as_bytes() != key || value.len() < FIXED || value.len() > FIXED + MAX_SYNC_NONCE {
            return None;
        }
        let (fixed, nonce) = value.split_at(FIXED);
        let counters = Counters::new(u16::from_be_bytes([fixed[0], fixed[1]]), fixed[2]).ok()?;
        let digest: [u8; 32] = fixed[3..].try_into().ok()?;
        let nonce = std::str::from_utf8(nonce).ok()?.to_owned();
        Some((public_id, counters, OtpDigest(digest), nonce))
    }
}

/// A text column of a scanned row, borrowed.
fn scan_text(v: rusqlite::types::ValueRef<'_>) -> Result<&str, SyncError> {
    v.as_str().map_err(|e| SyncError(format!("counter store: scan: {e}")))
}

fn sync_err(e: BackendFailure) -> SyncError {
    SyncError(e.0)
}

impl SqliteCounters {
    /// Every counters row as an item, in one consistent read on a
    /// connection of its own (the hot read connection is not held), passed
    /// to `f` with its key's bucket.
    fn scan_items(&self, only: Option<u8>, mut f: impl FnMut(&[u8], &[u8])) -> Result<(), SyncError> {
        let conn = open_read_only(&self.path, self.options.busy_timeout).map_err(SyncError)?;
        let err = |e: rusqlite::Error| SyncError(format!("counter store: scan: {e}"));
        // One bucket: an index range (plus any row an older binary wrote
        // without its bucket, -1, checked below).
        let columns = "SELECT public_id, counter, session_use, nonce, otp_digest FROM counters";
        let sql = if only.is_some() { format!("{columns} WHERE sync_bucket IN (?1, -1)") } else { columns.to_owned() };
        let mut stmt = conn.prepare(&sql).map_err(err)?;
        let mut rows = match only {
            Some(b) => stmt.query(params![b]),
            None => stmt.query([]),
        }
        .map_err(err)?;
        while let Some(row) = rows.next().map_err(err)? {
            let public_id = scan_text(row.get_ref(0).map_err(err)?)?;
            let key = public_id.as_bytes();
            // Only the key is hashed for the rows of other buckets.
            if only.is_some_and(|b| replication::sync::bucket_of(key) != b) {
                continue;
            }
            let damaged = || SyncError(format!("counter store: the row of {public_id} is damaged"));
            let counters = counters_from(row.get(1).map_err(err)?, row.get(2).map_err(err)?).ok_or_else(damaged)?;
            let nonce = scan_text(row.get_ref(3).map_err(err)?)?;
            let digest: &[u8; 32] = row.get_ref(4).map_err(err)?.as_blob().ok().and_then(|b| b.try_into().ok()).ok_or_else(damaged)?;
            f(key, &sync_item::value(counters, digest, nonce));
        }
        Ok(())
    }
}

/// The counters dataset: items as in [`sync_item`], merged with
/// [`SqliteCounters::merge_max`].
///
/// [`SyncStore::changes`] records the acknowledgement (registering an
/// unknown peer, so that the outbox is written for it from then on),
/// compacts, and answers the outbox rows after the peer's cursor — in one
/// writer job, then a read. [`SyncStore::digest`] and
/// [`SyncStore::bucket`] scan the whole table on a read-only connection of
/// their own. Merged rows are not added to this site's outbox.
impl SyncStore for SqliteCounters {
    fn changes(&self, peer: &str, after: Option<u64>, limit: usize) -> Result<Changes, SyncError> {
        // Most pulls move no cursor: answered from the read connection, so
        // they cost the writer (and its group commits) nothing.
        let unchanged =
            OUTBOX.unchanged(&lock(&self.reader), peer, after).map_err(|e| SyncError(format!("counter store: read cursors: {e}")))?;
        let PeerPosition { cursor, head } = match unchanged {
            Some(position) => position,
            None => {
                let owned = peer.to_owned();
                let job = move |conn: &Connection| OUTBOX.record(conn, &owned, after).map(Done::Cursor).map_err(|e| format!("ack: {e}"));
                match self.alone(job).map_err(sync_err)? {
                    Done::Cursor(position) => position,
                    _ => return Err(SyncError("counter store: the writer answered another question".to_owned())),
                }
            }
        };
        // After what the puller says it holds (it may say less than it
        // acknowledged before: it lost state); without it, after its cursor.
        let from = after.map_or(cursor, |n| n.min(head));
        let rows = self.outbox_after(from, limit).map_err(sync_err)?;
        let last = rows.last().map_or(from, |r| r.seq);
        let items = rows
            .iter()
            .map(|r| Item { key: sync_item::key(&r.public_id), value: sync_item::value(r.counters, &r.otp_digest.0, &r.nonce) })
            .collect();
        Ok(Changes { items, last, head: head.max(last) })
    }

    fn digest(&self) -> Result<Digest, SyncError> {
        let mut digest = Digest::default();
        self.scan_items(None, |k, v| digest.add(k, v))?;
        Ok(digest)
    }

    fn bucket(&self, bucket: u8) -> Result<Vec<Item>, SyncError> {
        let mut items = Vec::new();
        self.scan_items(Some(bucket), |k, v| items.push(Item { key: k.to_vec(), value: v.to_vec() }))?;
        Ok(items)
    }

    fn merge(&self, peer: &str, items: &[Item]) -> Result<Merged, SyncError> {
        let now = unix_now();
        let rows = items
            .iter()
            .enumerate()
            .map(|(i, item)| {
                let (public_id, counters, otp_digest, nonce) = sync_item::decode(&item.key, &item.value)
                    .ok_or_else(|| SyncError(format!("counters from {peer}: item {i} is malformed; nothing merged")))?;
                Ok(OutboxRow { seq: 0, public_id, counters, nonce, otp_digest, modified: now })
            })
            .collect::<Result<Vec<_>, SyncError>>()?;
        let counts = self.merge_max(&rows).map_err(sync_err)?;
        Ok(Merged { applied: counts.applied, unchanged: counts.unchanged, conflicts: 0 })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn update(n: u16) -> CounterUpdate {
        CounterUpdate {
            public_id: PublicId::from_number(1, 6).unwrap(),
            counters: Counters::new(n, 0).unwrap(),
            timestamp_high: 0,
            timestamp_low: 0,
            nonce: "0123456789abcdef".to_owned(),
            otp_digest: [7; 32],
            now: 1,
        }
    }

    /// A store whose "writer" is `writer`, to test the caller's side when
    /// the writer misbehaves.
    fn with_writer(dir: &Path, writer: impl FnOnce(Receiver<Job>) + Send + 'static) -> SqliteCounters {
        let path = dir.join("c.db");
        drop(SqliteCounters::open(&path).unwrap());
        let (sender, receiver) = mpsc::channel();
        let writer = std::thread::spawn(move || writer(receiver));
        SqliteCounters {
            path: path.clone(),
            options: CounterOptions { reply_timeout: Duration::from_millis(300), ..CounterOptions::default() },
            sender: Some(sender),
            writer: Some(writer),
            reader: Mutex::new(open_read_only(&path, DEFAULT_BUSY_TIMEOUT).unwrap()),
            stats: Arc::new(Stats::default()),
        }
    }

    #[test]
    fn dead_writer_is_a_backend_failure_not_a_hang() {
        let dir = tempfile::tempdir().unwrap();
        let store = with_writer(dir.path(), drop);
        std::thread::sleep(Duration::from_millis(50));
        let started = Instant::now();
        assert!(store.compare_and_set(&update(1)).is_err());
        assert!(store.check().is_err());
        assert!(started.elapsed() < Duration::from_secs(1));
    }

    #[test]
    fn writer_dying_mid_batch_answers_its_callers() {
        let dir = tempfile::tempdir().unwrap();
        // Takes the job, then "dies" without answering: the reply sender is
        // dropped with it.
        let store = with_writer(dir.path(), |rx| {
            let job = rx.recv().unwrap();
            drop(job);
        });
        let e = store.compare_and_set(&update(1)).unwrap_err();
        assert!(e.0.contains("stopped"), "{e}");
    }

    #[test]
    fn stuck_writer_times_out() {
        let dir = tempfile::tempdir().unwrap();
        let store = with_writer(dir.path(), |rx| {
            let _job = rx.recv().unwrap();
            std::thread::sleep(Duration::from_secs(2));
        });
        let started = Instant::now();
        let e = store.compare_and_set(&update(1)).unwrap_err();
        assert!(e.0.contains("no answer"), "{e}");
        assert!(started.elapsed() < Duration::from_secs(1));
    }

    #[test]
    fn synchronous_parses() {
        assert_eq!("FULL".parse::<Synchronous>().unwrap(), Synchronous::Full);
        assert_eq!("normal".parse::<Synchronous>().unwrap(), Synchronous::Normal);
        assert!("off".parse::<Synchronous>().is_err());
    }
}
