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
//! high, low, nonce, modified, created)`, `STRICT, WITHOUT ROWID`: the
//! public id in modhex (yubikey-val's `yk_publicname`), the 15-bit counter
//! and the use (caps-lock bit dropped, [`Counters`]), the timestamp of the
//! accepted OTP, the nonce of its request, and Unix times.
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

use httpd::metrics::{header, Histogram};
use otp::{Counters, PublicId};
use rusqlite::{params, Connection, OpenFlags, OptionalExtension};

use crate::{BackendFailure, CasOutcome, CounterStore, CounterUpdate};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS counters (
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

/// The compare-and-set: insert, or update only if strictly greater
/// (row values compare lexicographically). `created` is set on insert only.
const UPSERT: &str = "INSERT INTO counters (public_id, counter, session_use, high, low, nonce, modified, created) \
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?7) \
     ON CONFLICT (public_id) DO UPDATE SET counter = excluded.counter, session_use = excluded.session_use, \
     high = excluded.high, low = excluded.low, nonce = excluded.nonce, modified = excluded.modified \
     WHERE (excluded.counter, excluded.session_use) > (counters.counter, counters.session_use)";
const SELECT_VERDICT: &str = "SELECT counter, session_use, nonce FROM counters WHERE public_id = ?1";
const SELECT_ROW: &str = "SELECT counter, session_use, high, low, nonce, modified, created FROM counters WHERE public_id = ?1";

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
        let mut cumulative = 0u64;
        for (i, bound) in BATCH_BUCKETS.iter().enumerate() {
            cumulative += self.buckets[i].load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        cumulative += self.buckets[BATCH_BUCKETS.len()].load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cumulative}");
        let _ = writeln!(out, "{name}_sum {}", self.sum.load(Ordering::Relaxed));
        let _ = writeln!(out, "{name}_count {cumulative}");
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
    batch_sizes: SizeHistogram,
    /// The `COMMIT` alone (the fsync).
    commit: Histogram,
    /// A whole transaction, `BEGIN` to `COMMIT`.
    transaction: Histogram,
    /// What a caller waits: queue, transaction and commit.
    cas: Histogram,
}

/// One caller's work: its updates (none for a liveness probe) and where to
/// answer.
struct Job {
    updates: Vec<CounterUpdate>,
    reply: Reply,
}

type Answer = Result<Vec<CasOutcome>, BackendFailure>;

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
        conn.execute_batch(SCHEMA).map_err(|e| failure("schema", e))?;
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
        let outcomes = self.submit(updates.to_vec())?;
        if outcomes.len() == updates.len() {
            Ok(outcomes)
        } else {
            Err(BackendFailure(format!("counter store: {} outcomes for {} updates", outcomes.len(), updates.len())))
        }
    }

    /// Hand a job to the writer and wait for its answer.
    fn submit(&self, updates: Vec<CounterUpdate>) -> Result<Vec<CasOutcome>, BackendFailure> {
        let started = Instant::now();
        let (reply, answer) = mpsc::sync_channel(1);
        let sender = self.sender.as_ref().ok_or_else(|| BackendFailure("counter store: closed".to_owned()))?;
        sender
            .send(Job { updates, reply: Reply::Blocking(reply) })
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
        type Row = (i64, i64, i64, i64, String, i64, i64);
        let conn = lock(&self.reader);
        let row: Option<Row> = conn
            .prepare_cached(SELECT_ROW)
            .and_then(|mut s| {
                s.query_row(params![public_id.to_modhex()], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?, r.get(6)?))
                })
                .optional()
            })
            .map_err(|e| failure("read", e))?;
        drop(conn);
        let Some((counter, session_use, high, low, nonce, modified, created)) = row else { return Ok(None) };
        let damaged = || BackendFailure(format!("counter store: the row of {public_id} is damaged"));
        let counters = match (u16::try_from(counter), u8::try_from(session_use)) {
            (Ok(c), Ok(u)) => Counters::new(c, u).map_err(|_| damaged())?,
            _ => return Err(damaged()),
        };
        Ok(Some(StoredCounters {
            counters,
            timestamp_high: u8::try_from(high).map_err(|_| damaged())?,
            timestamp_low: u16::try_from(low).map_err(|_| damaged())?,
            nonce,
            modified,
            created,
        }))
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
        self.submit(Vec::new())?;
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
        }
    }

    /// Append the store's series to a Prometheus text exposition.
    pub fn render_metrics(&self, out: &mut String) {
        let s = &self.stats;
        let st = self.stats();
        header(out, "validator_counter_batches_total", "counter", "Counter-store transactions committed (one fsync each).");
        let _ = writeln!(out, "validator_counter_batches_total {}", st.batches);
        header(out, "validator_counter_batch_failures_total", "counter", "Counter-store transactions that failed and were rolled back.");
        let _ = writeln!(out, "validator_counter_batch_failures_total {}", st.failed_batches);
        header(out, "validator_counter_updates_total", "counter", "Compare-and-set updates by outcome.");
        for (outcome, n) in [
            ("accepted", st.accepted),
            ("replayed_request", st.replayed_request),
            ("replayed_otp", st.replayed_otp),
            ("failed", st.failed_updates),
        ] {
            let _ = writeln!(out, "validator_counter_updates_total{{outcome=\"{outcome}\"}} {n}");
        }
        header(out, "validator_counter_batch_size", "histogram", "Updates per committed counter-store transaction.");
        s.batch_sizes.render(out, "validator_counter_batch_size");
        header(out, "validator_counter_batch_size_max", "gauge", "Largest committed counter-store transaction.");
        let _ = writeln!(out, "validator_counter_batch_size_max {}", st.max_batch);
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
                .send(Job { updates: vec![u.clone()], reply: Reply::Async(reply) })
                .map_err(|_| BackendFailure("counter store: the writer thread has stopped".to_owned())),
        };
        Box::pin(async move {
            queued?;
            let result = match answer.await {
                Ok(Ok(outcomes)) => match outcomes.as_slice() {
                    [one] => Ok(*one),
                    _ => Err(BackendFailure(format!("counter store: {} outcomes for one update", outcomes.len()))),
                },
                Ok(Err(e)) => Err(e),
                Err(_) => Err(BackendFailure("counter store: the writer thread stopped before answering".to_owned())),
            };
            stats.cas.observe(started.elapsed());
            result
        })
    }

    fn compare_and_set(&self, u: &CounterUpdate) -> Result<CasOutcome, BackendFailure> {
        let outcomes = self.submit(vec![u.clone()])?;
        match outcomes.as_slice() {
            [one] => Ok(*one),
            _ => Err(BackendFailure(format!("counter store: {} outcomes for one update", outcomes.len()))),
        }
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
fn writer_loop(conn: &Connection, jobs: &Receiver<Job>, max_batch: usize, stats: &Stats) {
    let mut batch: Vec<Job> = Vec::with_capacity(max_batch);
    while let Ok(first) = jobs.recv() {
        let mut updates = first.updates.len();
        batch.push(first);
        while updates < max_batch {
            match jobs.try_recv() {
                Ok(job) => {
                    updates += job.updates.len();
                    batch.push(job);
                }
                Err(_) => break,
            }
        }
        if updates == 0 {
            // Liveness probes only.
            for job in batch.drain(..) {
                job.reply.send(Ok(Vec::new()));
            }
            continue;
        }
        match run_batch(conn, &batch, stats) {
            Ok(outcomes) => {
                stats.batch_sizes.observe(updates as u64);
                for (job, outcome) in batch.drain(..).zip(outcomes) {
                    for o in &outcome {
                        let counter = match o {
                            CasOutcome::Accepted => &stats.accepted,
                            CasOutcome::ReplayedRequest => &stats.replayed_request,
                            CasOutcome::ReplayedOtp => &stats.replayed_otp,
                        };
                        counter.fetch_add(1, Ordering::Relaxed);
                    }
                    job.reply.send(Ok(outcome));
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

/// One transaction over every update of `batch`, committed. Outcomes per job.
fn run_batch(conn: &Connection, batch: &[Job], stats: &Stats) -> Result<Vec<Vec<CasOutcome>>, String> {
    let started = Instant::now();
    conn.execute_batch("BEGIN IMMEDIATE").map_err(|e| format!("begin: {e}"))?;
    let outcomes = (|| -> Result<Vec<Vec<CasOutcome>>, String> {
        let mut upsert = conn.prepare_cached(UPSERT).map_err(|e| format!("prepare: {e}"))?;
        let mut verdict = conn.prepare_cached(SELECT_VERDICT).map_err(|e| format!("prepare: {e}"))?;
        batch.iter().map(|job| job.updates.iter().map(|u| compare_and_set_one(&mut upsert, &mut verdict, u)).collect()).collect()
    })();
    let outcomes = match outcomes {
        Ok(o) => o,
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
    Ok(outcomes)
}

fn rollback(conn: &Connection) {
    if !conn.is_autocommit() {
        if let Err(e) = conn.execute_batch("ROLLBACK") {
            tracing::error!(error = %e, "counter-store rollback failed");
        }
    }
}

/// The conditional upsert, decided on the rows it changed; the row is read
/// only when nothing changed.
fn compare_and_set_one(
    upsert: &mut rusqlite::CachedStatement<'_>,
    verdict: &mut rusqlite::CachedStatement<'_>,
    u: &CounterUpdate,
) -> Result<CasOutcome, String> {
    let public_id = u.public_id.to_modhex();
    let (counter, session_use) = (u.counters.counter(), u.counters.session_use());
    let changed = upsert
        .execute(params![public_id, counter, session_use, u.timestamp_high, u.timestamp_low, u.nonce, u.now])
        .map_err(|e| format!("update of {public_id}: {e}"))?;
    match changed {
        1 => Ok(CasOutcome::Accepted),
        0 => {
            let stored: Option<(i64, i64, String)> = verdict
                .query_row(params![public_id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                .optional()
                .map_err(|e| format!("read of {public_id}: {e}"))?;
            match stored {
                Some((c, s, nonce)) if c == i64::from(counter) && s == i64::from(session_use) && nonce == u.nonce => {
                    Ok(CasOutcome::ReplayedRequest)
                }
                Some(_) => Ok(CasOutcome::ReplayedOtp),
                None => Err(format!("update of {public_id} changed nothing and there is no row")),
            }
        }
        n => Err(format!("update of {public_id} changed {n} rows")),
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
