//! The public-id ledger: every id this personalizer ever allocated, so that
//! no id is handed out twice, even after a crash or a rerun.
//!
//! A run reserves its whole range in one transaction before its first key
//! is generated ([`Ledger::reserve`]); a range that touches any id of an
//! earlier run, finished or not, is refused. While the run goes on it
//! records how many of its keys are durable on disk
//! ([`Ledger::record_progress`]), and [`Ledger::finish`] marks it complete.
//! An unfinished run is continued with `personalizer generate --resume`,
//! never started again.
//!
//! Ids are compared as numbers: `cccccccccccb` and `cb` are the same id 1,
//! so a range is refused whatever public-id length either run used.
//!
//! The ledger is a SQLite file (mode 0600) with `synchronous=FULL`: a
//! committed reservation or progress mark survives a power loss.

use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use otp::PublicId;
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

/// Errors of the ledger.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LedgerError {
    /// The requested range touches ids allocated before.
    #[error(
        "public ids {first} to {last} were already allocated by run {run} (ids {run_first} to {run_last}): \
         ids are never reused; start after {run_last}, or continue an unfinished run with --resume"
    )]
    Overlap {
        /// The first id of the request that was allocated before.
        first: String,
        /// The last id of the request that was allocated before.
        last: String,
        /// The earlier run.
        run: u64,
        /// That run's first id.
        run_first: String,
        /// That run's last id.
        run_last: String,
    },
    /// No such run, or it cannot be resumed.
    #[error("{0}")]
    Run(String),
    /// The database failed.
    #[error("ledger {path}: {source}")]
    Sqlite {
        /// The ledger file.
        path: PathBuf,
        /// The cause.
        source: rusqlite::Error,
    },
    /// The ledger file could not be created.
    #[error("ledger {path}: {source}")]
    Io {
        /// The ledger file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

/// What a run asks for, as recorded in the ledger.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunSpec {
    /// The first public id, as a number (> 0).
    pub first: u64,
    /// How many consecutive ids.
    pub count: u64,
    /// Public id length in modhex characters.
    pub public_id_chars: usize,
    /// The key handles, as their AEAD directories are named.
    pub key_handles: Vec<String>,
    /// Nonces chosen by the module rather than the public id.
    pub random_nonce: bool,
    /// The AEAD directory.
    pub out_dir: PathBuf,
}

/// A run in the ledger.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Run {
    /// The run's number.
    pub id: u64,
    /// What it generates.
    pub spec: RunSpec,
    /// How many of its keys, from the first, are durably written.
    pub done: u64,
    /// Whether it completed.
    pub finished: bool,
}

impl Run {
    /// The `i`-th public id of the run (`i` from 0).
    pub fn public_id(&self, i: u64) -> Result<PublicId, LedgerError> {
        let n = self.spec.first.checked_add(i).ok_or_else(|| LedgerError::Run("public id overflows".to_owned()))?;
        PublicId::from_number(n, self.spec.public_id_chars / 2).map_err(|e| LedgerError::Run(format!("public id {n}: {e}")))
    }
}

/// The ledger database.
#[derive(Debug)]
pub struct Ledger {
    conn: Connection,
    path: PathBuf,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS runs (
    id              INTEGER PRIMARY KEY,
    first_id        INTEGER NOT NULL CHECK (first_id > 0),
    last_id         INTEGER NOT NULL CHECK (last_id >= first_id),
    public_id_chars INTEGER NOT NULL,
    key_handles     TEXT NOT NULL,
    random_nonce    INTEGER NOT NULL,
    out_dir         TEXT NOT NULL,
    done            INTEGER NOT NULL DEFAULT 0,
    started_at      INTEGER NOT NULL,
    finished_at     INTEGER
);
CREATE INDEX IF NOT EXISTS runs_first ON runs (first_id);
";

fn to_sql(n: u64, what: &str) -> Result<i64, LedgerError> {
    i64::try_from(n).map_err(|_| LedgerError::Run(format!("{what} {n} is too large for the ledger")))
}

fn from_sql(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

fn now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX)).unwrap_or(0)
}

/// `n` as a modhex id of `chars` characters, with its number.
fn show(n: u64, chars: usize) -> String {
    match PublicId::from_number(n, chars / 2) {
        Ok(id) => format!("{id} ({n})"),
        Err(_) => n.to_string(),
    }
}

impl Ledger {
    /// Open the ledger at `path`, creating it (mode 0600) if missing.
    pub fn open(path: &Path) -> Result<Self, LedgerError> {
        let io = |e| LedgerError::Io { path: path.to_path_buf(), source: e };
        // Create the file ourselves so that it is private from the start;
        // SQLite gives its journal files the same mode.
        if !path.exists() {
            match OpenOptions::new().write(true).create_new(true).mode(0o600).open(path) {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(io(e)),
            }
        }
        let sql = |e| LedgerError::Sqlite { path: path.to_path_buf(), source: e };
        let conn = Connection::open(path).map_err(sql)?;
        conn.busy_timeout(std::time::Duration::from_secs(10)).map_err(sql)?;
        conn.pragma_update(None, "journal_mode", "WAL").map_err(sql)?;
        conn.pragma_update(None, "synchronous", "FULL").map_err(sql)?;
        conn.execute_batch(SCHEMA).map_err(sql)?;
        Ok(Self { conn, path: path.to_path_buf() })
    }

    /// The ledger file.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn sql(&self) -> impl Fn(rusqlite::Error) -> LedgerError + '_ {
        move |e| LedgerError::Sqlite { path: self.path.clone(), source: e }
    }

    fn overlap(conn: &Connection, spec: &RunSpec) -> Result<Option<LedgerError>, rusqlite::Error> {
        let (first, last) = match last_id(spec) {
            Ok(last) => (spec.first, last),
            Err(_) => return Ok(None),
        };
        let (Ok(f), Ok(l)) = (i64::try_from(first), i64::try_from(last)) else { return Ok(None) };
        let row: Option<(i64, i64, i64, i64)> = conn
            .query_row(
                "SELECT id, first_id, last_id, public_id_chars FROM runs WHERE first_id <= ?2 AND last_id >= ?1 ORDER BY first_id LIMIT 1",
                params![f, l],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .optional()?;
        Ok(row.map(|(run, rf, rl, chars)| {
            let (rf, rl) = (from_sql(rf), from_sql(rl));
            let chars = usize::try_from(chars).unwrap_or(12);
            LedgerError::Overlap {
                first: show(first.max(rf), spec.public_id_chars),
                last: show(last.min(rl), spec.public_id_chars),
                run: from_sql(run),
                run_first: show(rf, chars),
                run_last: show(rl, chars),
            }
        }))
    }

    /// Reserve the whole range of `spec` in one transaction, or refuse it
    /// if any of its ids was ever allocated.
    pub fn reserve(&mut self, spec: &RunSpec) -> Result<Run, LedgerError> {
        if spec.count == 0 {
            return Err(LedgerError::Run("a run needs at least one key".to_owned()));
        }
        let last = last_id(spec)?;
        let (first, last_sql) = (to_sql(spec.first, "public id")?, to_sql(last, "public id")?);
        let path = self.path.clone();
        let sql = move |e| LedgerError::Sqlite { path: path.clone(), source: e };
        // IMMEDIATE: the write lock is taken before the overlap check, so two
        // personalizers sharing a ledger cannot both reserve one range.
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(&sql)?;
        if let Some(err) = Self::overlap(&tx, spec).map_err(&sql)? {
            return Err(err);
        }
        tx.execute(
            "INSERT INTO runs (first_id, last_id, public_id_chars, key_handles, random_nonce, out_dir, started_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                first,
                last_sql,
                i64::try_from(spec.public_id_chars).unwrap_or(12),
                spec.key_handles.join(","),
                spec.random_nonce,
                spec.out_dir.to_string_lossy(),
                now()
            ],
        )
        .map_err(&sql)?;
        let id = from_sql(tx.last_insert_rowid());
        tx.commit().map_err(&sql)?;
        Ok(Run { id, spec: spec.clone(), done: 0, finished: false })
    }

    /// Record that the first `done` keys of `run` are durably written.
    pub fn record_progress(&mut self, run: u64, done: u64) -> Result<(), LedgerError> {
        let n = self
            .conn
            .execute("UPDATE runs SET done = ?2 WHERE id = ?1 AND done <= ?2", params![to_sql(run, "run")?, to_sql(done, "count")?])
            .map_err(self.sql())?;
        if n != 1 {
            return Err(LedgerError::Run(format!("run {run} is not in the ledger, or has recorded more progress than {done}")));
        }
        Ok(())
    }

    /// Mark `run` complete.
    pub fn finish(&mut self, run: u64) -> Result<(), LedgerError> {
        self.conn
            .execute("UPDATE runs SET done = last_id - first_id + 1, finished_at = ?2 WHERE id = ?1", params![to_sql(run, "run")?, now()])
            .map_err(self.sql())?;
        Ok(())
    }

    /// Every run, oldest first.
    pub fn runs(&self) -> Result<Vec<Run>, LedgerError> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT id, first_id, last_id, public_id_chars, key_handles, random_nonce, out_dir, done, finished_at \
                 FROM runs ORDER BY id",
            )
            .map_err(self.sql())?;
        let rows = stmt
            .query_map([], |r| {
                let (first, last): (i64, i64) = (r.get(1)?, r.get(2)?);
                let handles: String = r.get(4)?;
                let out: String = r.get(6)?;
                Ok(Run {
                    id: from_sql(r.get(0)?),
                    spec: RunSpec {
                        first: from_sql(first),
                        count: from_sql(last - first + 1),
                        public_id_chars: usize::try_from(r.get::<_, i64>(3)?).unwrap_or(12),
                        key_handles: handles.split(',').map(str::to_owned).collect(),
                        random_nonce: r.get(5)?,
                        out_dir: PathBuf::from(out),
                    },
                    done: from_sql(r.get(7)?),
                    finished: r.get::<_, Option<i64>>(8)?.is_some(),
                })
            })
            .map_err(self.sql())?;
        rows.collect::<Result<Vec<_>, _>>().map_err(self.sql())
    }

    /// The run to continue: `id`, or the only unfinished one.
    pub fn unfinished(&self, id: Option<u64>) -> Result<Run, LedgerError> {
        let runs = self.runs()?;
        if let Some(id) = id {
            let run =
                runs.into_iter().find(|r| r.id == id).ok_or_else(|| LedgerError::Run(format!("there is no run {id} in the ledger")))?;
            if run.finished {
                return Err(LedgerError::Run(format!("run {id} is complete; there is nothing to resume")));
            }
            return Ok(run);
        }
        let mut open: Vec<Run> = runs.into_iter().filter(|r| !r.finished).collect();
        match open.len() {
            0 => Err(LedgerError::Run("there is no unfinished run in the ledger to resume".to_owned())),
            1 => Ok(open.remove(0)),
            _ => Err(LedgerError::Run(format!(
                "several runs are unfinished ({}): name one with --resume RUN",
                open.iter().map(|r| r.id.to_string()).collect::<Vec<_>>().join(", ")
            ))),
        }
    }
}

/// The last id of `spec`, checked to fit its public id length.
fn last_id(spec: &RunSpec) -> Result<u64, LedgerError> {
    let last = spec
        .count
        .checked_sub(1)
        .and_then(|c| spec.first.checked_add(c))
        .ok_or_else(|| LedgerError::Run(format!("{} ids from {} overflow", spec.count, spec.first)))?;
    PublicId::from_number(last, spec.public_id_chars / 2).map_err(|e| {
        LedgerError::Run(format!("the run's last public id {last} does not fit in {} characters: {e}", spec.public_id_chars))
    })?;
    Ok(last)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn spec(first: u64, count: u64) -> RunSpec {
        RunSpec {
            first,
            count,
            public_id_chars: 12,
            key_handles: vec!["0x2000".to_owned(), "KSM1".to_owned()],
            random_nonce: false,
            out_dir: PathBuf::from("/x"),
        }
    }

    #[test]
    fn ranges_are_never_reused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.db");
        let mut l = Ledger::open(&path).unwrap();
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        }
        let r = l.reserve(&spec(10, 10)).unwrap();
        assert_eq!((r.id, r.done, r.finished), (1, 0, false));
        for (first, count) in [(10, 1), (19, 5), (1, 10), (5, 100), (15, 1)] {
            let err = l.reserve(&spec(first, count)).unwrap_err().to_string();
            assert!(err.contains("already allocated by run 1"), "{first}+{count}: {err}");
        }
        let err = l.reserve(&spec(5, 100)).unwrap_err().to_string();
        assert!(err.contains("public ids cccccccccccl (10) to ccccccccccbe (19)"), "{err}");
        l.reserve(&spec(1, 9)).unwrap();
        l.reserve(&spec(20, 1)).unwrap();
        assert!(l.reserve(&spec(0, 1)).is_err());
        assert!(l.reserve(&spec(30, 0)).is_err());
        assert!(l.reserve(&RunSpec { public_id_chars: 2, ..spec(250, 10) }).unwrap_err().to_string().contains("does not fit"));

        // Progress and completion persist; a finished run is not resumable.
        l.record_progress(1, 4).unwrap();
        assert!(l.record_progress(1, 3).is_err(), "progress never goes back");
        drop(l);
        let mut l = Ledger::open(&path).unwrap();
        let runs = l.runs().unwrap();
        assert_eq!(runs.len(), 3);
        assert_eq!(runs[0].spec, spec(10, 10));
        assert_eq!(runs[0].done, 4);
        assert!(l.unfinished(None).unwrap_err().to_string().contains("several runs"));
        assert_eq!(l.unfinished(Some(1)).unwrap().done, 4);
        l.finish(2).unwrap();
        l.finish(3).unwrap();
        assert_eq!(l.unfinished(None).unwrap().id, 1);
        assert!(l.unfinished(Some(2)).unwrap_err().to_string().contains("complete"));
        assert!(l.unfinished(Some(9)).unwrap_err().to_string().contains("no run 9"));
        l.finish(1).unwrap();
        assert_eq!(l.runs().unwrap()[0].done, 10);
        assert!(l.unfinished(None).is_err());
        // Even finished, the ids stay allocated, whatever the id length.
        assert!(l.reserve(&spec(12, 1)).is_err());
        let short = l.reserve(&RunSpec { public_id_chars: 2, ..spec(12, 1) }).unwrap_err().to_string();
        assert!(short.contains("public ids cr (12) to cr (12) were already allocated by run 1"), "{short}");
    }
}
