//! `personalizer generate`: YubiKey secrets made inside the security
//! module, wrapped under every listed key handle, streamed to disk.
//!
//! # A run
//!
//! 1. The request is checked, and the module is asked once to generate a
//!    throw-away secret under the listed handles (and to decrypt it, if
//!    secrets are to be output), so that a handle that is missing or not
//!    permitted is reported before any id is allocated.
//! 2. Output files are created (new regular files only, see
//!    [`crate::output`]), then the whole public-id range is reserved in the
//!    [ledger](crate::ledger) in one transaction.
//! 3. Each YubiKey is generated, its AEADs written (pyhsm v1 files, pyhsm
//!    layout), its personalisation line and bundle entry appended, one key
//!    at a time: memory does not grow with the run.
//! 4. Every [`RunOptions::batch`] keys the AEAD files are made durable, then
//!    the progress is committed to the ledger.
//!
//! # Durability
//!
//! AEAD files are written with plain `O_CREAT|O_EXCL` writes (mode 0600),
//! not one fsync each (which would cap a run at a few thousand files a
//! second), by a small pool of threads ([`RunOptions::writers`]) fed through
//! bounded queues. At the end of each batch the pool is fenced (every file
//! of the batch written, or the run stops with the first error), the
//! batch's personalisation lines are handed to the kernel, and one
//! `syncfs(2)` on the AEAD directory's file system flushes the batch's files
//! and directory entries; only *then* is the ledger's `done` count raised,
//! in its own durable SQLite commit. So a key counted as done in the ledger
//! always has all its AEAD files on disk, whatever crashes when, and no
//! personalisation line ever reaches a file before all its key's AEADs.
//!
//! Keys after the recorded count may or may not have reached the disk.
//! `--resume` ([`resume`]) handles them without ever making two secrets for
//! one public id:
//!
//! - all of an id's AEAD files present and well-formed: kept as they are
//!   (the secret may already have been output);
//! - some present: the secret is re-wrapped from a present AEAD to the
//!   missing handles through the module (needs the export flag on the
//!   present handle and an import permission on the missing one); if the
//!   module refuses, the partial files are removed and a new secret made.
//!   That is safe because a key's personalisation line is only written
//!   after *all* its AEAD files, so a partial key's secret was never output;
//! - none present (or only truncated ones): generated as usual.
//!
//! Personalisation output and the transfer bundle of a resumed run are
//! written anew and cover the whole run: AEADs of the keys done before the
//! crash are read back from the directory. The output of the interrupted
//! invocation is incomplete and should be destroyed.

use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Write as _};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::mpsc::{channel, sync_channel, Receiver, SyncSender};
use std::thread::JoinHandle;

use hsm::signing::SigningKey;
use hsm::{NonceSource, SecurityModule};
use ksm::aead_dir::KeyHandleDir;
use ksm::bundle::{BundleError, BundleWriter, Manifest};
use otp::aead_file::{relative_path, AeadFile, AeadRecord};
use otp::{KeyHandle, PublicId, YubiKeySecrets};

use crate::ledger::{Ledger, LedgerError, Run, RunSpec};
use crate::output::{OutputError, OutputFormat, SecretsFile};

/// The first public id of a run: a number (decimal) or a modhex id, as
/// pyhsm's `--start-public-id` takes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StartId(pub u64);

impl FromStr for StartId {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
            return s.parse().map(Self).map_err(|e| format!("{s:?}: {e}"));
        }
        PublicId::from_modhex(s).map(|id| Self(id.to_number())).map_err(|e| format!("{s:?} is neither a number nor a modhex id: {e}"))
    }
}

/// Errors of a personalisation run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Bad arguments.
    #[error("{0}")]
    Usage(String),
    /// The security module or a file failed.
    #[error(transparent)]
    Hsm(#[from] hsm::Error),
    /// The public-id ledger refused or failed.
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    /// Personalisation output was refused or failed.
    #[error(transparent)]
    Output(#[from] OutputError),
    /// The AEAD directory does not hold what the ledger says it should.
    #[error("{0}")]
    Inconsistent(String),
    /// The transfer bundle failed.
    #[error("transfer bundle: {0}")]
    Bundle(String),
    /// A run stopped after its ids were reserved.
    #[error("{source}; run {run} stopped unfinished and keeps its public ids: fix the cause, then continue it with `personalizer generate --resume {run}`")]
    Stopped {
        /// The run's number in the ledger.
        run: u64,
        /// Why it stopped.
        source: Box<Error>,
    },
}

/// What to generate.
#[derive(Clone, Debug)]
pub struct GenerateParams {
    /// How many YubiKeys.
    pub count: u64,
    /// The first public id (as a number).
    pub start: StartId,
    /// Public id length in modhex characters (even, 2..=12).
    pub public_id_chars: usize,
    /// Handles to wrap each secret under.
    pub key_handles: Vec<KeyHandleDir>,
    /// Let the module choose nonces instead of using the public id.
    pub random_nonce: bool,
}

/// Where a run's results go besides the AEAD directory.
#[derive(Clone, Copy, Debug)]
pub struct RunOptions<'a> {
    /// pyhsm yubikey-csv secrets output (a new file).
    pub yubikey_csv: Option<&'a Path>,
    /// `ykpersonalize` command lines (a new file).
    pub ykpersonalize: Option<&'a Path>,
    /// A signed transfer bundle of every AEAD of the run, and the key that
    /// signs its manifest.
    pub bundle: Option<(&'a Path, &'a SigningKey)>,
    /// Keys per durable batch (ledger progress step), 1 to [`MAX_BATCH`].
    pub batch: u64,
    /// Threads creating AEAD files, 1 to [`MAX_WRITERS`].
    pub writers: usize,
}

/// Keys per durable batch by default.
pub const DEFAULT_BATCH: u64 = 1000;
/// Largest batch: a batch's secrets lines are held (in zeroizing memory)
/// until its AEAD files are written.
pub const MAX_BATCH: u64 = 10_000;
/// File-writing threads by default.
pub const DEFAULT_WRITERS: usize = 4;

impl Default for RunOptions<'_> {
    fn default() -> Self {
        Self { yubikey_csv: None, ykpersonalize: None, bundle: None, batch: DEFAULT_BATCH, writers: DEFAULT_WRITERS }
    }
}

/// What a run did (non-secret: fit for the audit log).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunReport {
    /// The run's number in the ledger.
    pub run: u64,
    /// Its first public id.
    pub first: PublicId,
    /// Its last public id.
    pub last: PublicId,
    /// How many YubiKeys the run covers.
    pub count: u64,
    /// Secrets generated by this invocation.
    pub generated: u64,
    /// Keys whose AEAD files were found complete and kept (resume).
    pub kept: u64,
    /// Keys with some AEAD files whose secret was re-wrapped to the missing
    /// handles (resume).
    pub rewrapped: u64,
    /// Keys with partial AEAD files that were replaced by a new secret
    /// (resume; their secret had never been output).
    pub replaced: u64,
    /// The key handles, in order.
    pub key_handles: Vec<KeyHandle>,
    /// The AEAD directory.
    pub out: PathBuf,
    /// Secrets output files written.
    pub outputs: Vec<PathBuf>,
    /// The transfer bundle written.
    pub bundle: Option<PathBuf>,
    /// Its signed manifest.
    pub manifest: Option<Manifest>,
}

/// Decrypt a YubiKey AEAD for personalisation output (needs the handle's
/// export flag).
pub fn export_secrets(hsm: &dyn SecurityModule, record: &AeadRecord) -> Result<YubiKeySecrets, Error> {
    let plain = hsm.decrypt_aead(record)?;
    YubiKeySecrets::from_plaintext(&plain).map_err(|e| Error::Hsm(hsm::Error::AeadInvalid(e)))
}

/// Start a run: reserve `params`' ids in `ledger`, generate each key in
/// `hsm` and write its AEADs under `out` (created if missing), and the
/// outputs of `opts`. `progress` is called with the number of keys of the
/// run handled so far.
pub fn generate(
    hsm: &dyn SecurityModule,
    ledger: &mut Ledger,
    out: &Path,
    params: &GenerateParams,
    opts: &RunOptions<'_>,
    progress: &mut dyn FnMut(u64),
) -> Result<RunReport, Error> {
    if !params.public_id_chars.is_multiple_of(2) || !(2..=12).contains(&params.public_id_chars) {
        return Err(Error::Usage(format!("--public-id-chars must be even and 2 to 12, not {}", params.public_id_chars)));
    }
    if params.start.0 == 0 {
        return Err(Error::Usage("public id 0 is not allowed (the YubiHSM refuses it)".to_owned()));
    }
    if params.count == 0 {
        return Err(Error::Usage("--count must be at least 1".to_owned()));
    }
    if params.key_handles.is_empty() {
        return Err(Error::Usage("give at least one key handle".to_owned()));
    }
    for (i, a) in params.key_handles.iter().enumerate() {
        if params.key_handles[..i].iter().any(|b| b.key_handle == a.key_handle) {
            return Err(Error::Usage(format!("key handle {} is listed twice", a.key_handle)));
        }
    }
    std::fs::create_dir_all(out).map_err(|e| hsm::Error::io(out, e))?;
    let out = std::fs::canonicalize(out).map_err(|e| hsm::Error::io(out, e))?;
    let spec = RunSpec {
        first: params.start.0,
        count: params.count,
        public_id_chars: params.public_id_chars,
        key_handles: params.key_handles.iter().map(KeyHandleDir::write_name).collect(),
        random_nonce: params.random_nonce,
        out_dir: out,
    };
    let draft = Run { id: 0, spec, done: 0, finished: false };
    let first = draft.public_id(0)?;
    probe(hsm, &params.key_handles, nonce_for(&first, params.random_nonce)?, opts)?;
    let mut sinks = Sinks::open(opts)?;
    let run = match ledger.reserve(&draft.spec) {
        Ok(run) => run,
        Err(e) => {
            sinks.abandon();
            return Err(e.into());
        }
    };
    tracing::info!(run = run.id, first = %first, count = run.spec.count, "public ids reserved");
    execute(hsm, ledger, &run, &params.key_handles, false, sinks, opts, progress)
        .map_err(|e| Error::Stopped { run: run.id, source: Box::new(e) })
}

/// Continue an unfinished run of `ledger` (`run`, or the only unfinished
/// one) after a crash, with new outputs covering the whole run.
pub fn resume(
    hsm: &dyn SecurityModule,
    ledger: &mut Ledger,
    run: Option<u64>,
    opts: &RunOptions<'_>,
    progress: &mut dyn FnMut(u64),
) -> Result<RunReport, Error> {
    let run = ledger.unfinished(run)?;
    let handles = run
        .spec
        .key_handles
        .iter()
        .map(|s| s.parse::<KeyHandleDir>().map_err(|e| Error::Inconsistent(format!("ledger run {}: key handle {s:?}: {e}", run.id))))
        .collect::<Result<Vec<_>, _>>()?;
    if !run.spec.out_dir.is_dir() {
        return Err(Error::Inconsistent(format!(
            "run {} writes to {}, which is not a directory any more; cannot resume",
            run.id,
            run.spec.out_dir.display()
        )));
    }
    probe(hsm, &handles, nonce_for(&run.public_id(0)?, run.spec.random_nonce)?, opts)?;
    let sinks = Sinks::open(opts)?;
    tracing::info!(run = run.id, done = run.done, count = run.spec.count, "resuming");
    execute(hsm, ledger, &run, &handles, true, sinks, opts, progress).map_err(|e| Error::Stopped { run: run.id, source: Box::new(e) })
}

fn nonce_for(id: &PublicId, random: bool) -> Result<NonceSource, Error> {
    Ok(if random { NonceSource::Random } else { NonceSource::Given(id.aead_nonce().map_err(|e| Error::Usage(e.to_string()))?) })
}

/// Let the module refuse a handle before anything is allocated: generate a
/// throw-away secret (and export it, when outputs need that).
fn probe(hsm: &dyn SecurityModule, handles: &[KeyHandleDir], nonce: NonceSource, opts: &RunOptions<'_>) -> Result<(), Error> {
    let kh: Vec<KeyHandle> = handles.iter().map(|k| k.key_handle).collect();
    let records = hsm.generate_yubikey_aeads(&kh, nonce)?;
    if opts.yubikey_csv.is_some() || opts.ykpersonalize.is_some() {
        if let Some(first) = records.first() {
            drop(export_secrets(hsm, first)?);
        }
    }
    Ok(())
}

/// The outputs of a run besides the AEAD files.
struct Sinks<'a> {
    files: Vec<SecretsFile>,
    bundle: Option<BundleSink<'a>>,
}

/// The signed transfer bundle being written, and its signing key.
struct BundleSink<'a> {
    writer: BundleWriter,
    key: &'a SigningKey,
}

impl<'a> Sinks<'a> {
    /// Create the secrets outputs; the bundle path is only checked here and
    /// created by [`Sinks::start_bundle`] once the run has its number.
    fn open(opts: &RunOptions<'a>) -> Result<Self, Error> {
        if let Some((path, _)) = opts.bundle {
            match path.symlink_metadata() {
                Ok(_) => return Err(Error::Bundle(BundleError::Exists(path.to_path_buf()).to_string())),
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => return Err(hsm::Error::io(path, e).into()),
            }
        }
        let mut sinks = Self { files: Vec::new(), bundle: None };
        let mut add = |path: Option<&Path>, format| -> Result<(), Error> {
            if let Some(p) = path {
                let lines = usize::try_from(opts.batch.clamp(1, MAX_BATCH)).unwrap_or(1);
                sinks.files.push(SecretsFile::create_buffered(p, format, lines)?);
            }
            Ok(())
        };
        let r = add(opts.yubikey_csv, OutputFormat::YubikeyCsv).and_then(|()| add(opts.ykpersonalize, OutputFormat::Ykpersonalize));
        if let Err(e) = r {
            sinks.abandon();
            return Err(e);
        }
        Ok(sinks)
    }

    /// Start the bundle of `run`, if one was asked for.
    fn start_bundle(&mut self, opts: &RunOptions<'a>, run: &Run, handles: &[KeyHandle]) -> Result<(), Error> {
        if let Some((path, key)) = opts.bundle {
            let origin = format!("personalizer run {} ({} YubiKeys from {})", run.id, run.spec.count, run.public_id(0)?);
            let writer = BundleWriter::create(path, handles, &origin).map_err(|e| Error::Bundle(e.to_string()))?;
            self.bundle = Some(BundleSink { writer, key });
        }
        Ok(())
    }

    fn wants_secrets(&self) -> bool {
        !self.files.is_empty()
    }

    fn wants_records(&self) -> bool {
        self.wants_secrets() || self.bundle.is_some()
    }

    /// Remove the (still empty) outputs of a run that did not start.
    fn abandon(&mut self) {
        for f in self.files.drain(..) {
            let _ = std::fs::remove_file(f.path());
        }
        // An unfinished bundle writer removes its temporary file on drop.
        self.bundle = None;
    }
}

/// Writes AEAD files, creating each directory once.
struct AeadWriter {
    base: PathBuf,
    names: Vec<String>,
    base_dir: File,
    pool: WriterPool,
}

/// What an id's AEAD file holds.
enum Found {
    Missing,
    Broken,
    Valid(AeadRecord),
}

impl AeadWriter {
    fn new(base: &Path, handles: &[KeyHandleDir], writers: usize) -> Result<Self, Error> {
        let base_dir = File::open(base).map_err(|e| hsm::Error::io(base, e))?;
        Ok(Self {
            base: base.to_path_buf(),
            names: handles.iter().map(KeyHandleDir::write_name).collect(),
            base_dir,
            pool: WriterPool::new(writers.clamp(1, MAX_WRITERS)).map_err(|e| hsm::Error::io(base, e))?,
        })
    }

    fn path(&self, h: usize, id: &PublicId) -> PathBuf {
        self.base.join(relative_path(&self.names[h], id))
    }

    /// Queue the AEAD of handle number `h` for writing: a new file, never
    /// replacing one. Written by the time [`AeadWriter::fence`] returns.
    fn write(&mut self, h: usize, id: &PublicId, record: &AeadRecord) -> Result<(), Error> {
        self.pool.send(Job { path: self.path(h, id), bytes: record.to_v1_bytes(), id: *id })
    }

    /// Wait until every queued file is written; the first failure, if any.
    fn fence(&mut self) -> Result<(), Error> {
        self.pool.fence()
    }

    fn read(&self, h: usize, kh: KeyHandle, id: &PublicId, nonce: Option<&otp::AeadNonce>) -> Result<Found, Error> {
        let path = self.path(h, id);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Found::Missing),
            Err(e) => return Err(hsm::Error::io(&path, e).into()),
        };
        Ok(match AeadFile::parse(&bytes) {
            Ok(AeadFile::V1(rec))
                if rec.key_handle == kh
                    && rec.aead.plaintext_len() == otp::secrets::SECRETS_LEN
                    && nonce.is_none_or(|n| *n == rec.nonce) =>
            {
                Found::Valid(rec)
            }
            _ => Found::Broken,
        })
    }

    fn remove(&self, h: usize, id: &PublicId) -> Result<(), Error> {
        let path = self.path(h, id);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(hsm::Error::io(&path, e).into()),
        }
    }

    /// Make every file written so far durable: one `syncfs(2)` on the AEAD
    /// directory's file system (data, inodes and directory entries). Call
    /// [`AeadWriter::fence`] first.
    fn sync(&self) -> Result<(), Error> {
        rustix::fs::syncfs(&self.base_dir).map_err(|e| hsm::Error::io(&self.base, e.into()).into())
    }
}

/// Most file-writing threads a run uses.
pub const MAX_WRITERS: usize = 16;

/// One AEAD file to create.
struct Job {
    path: PathBuf,
    bytes: Vec<u8>,
    id: PublicId,
}

enum Msg {
    Write(Job),
    Fence,
}

/// Threads that create AEAD files. Each pyhsm-layout file sits in a
/// directory of its own, so a key costs two `mkdir`s and two file creations
/// per handle pair; on file systems where inode allocation is slow those
/// dominate the run, and several threads overlap them. Queues are bounded:
/// memory does not grow with the run.
struct WriterPool {
    senders: Vec<SyncSender<Msg>>,
    acks: Receiver<Option<Error>>,
    workers: Vec<JoinHandle<()>>,
    next: usize,
}

impl WriterPool {
    fn new(n: usize) -> std::io::Result<Self> {
        let (ack_tx, acks) = channel();
        let mut pool = Self { senders: Vec::with_capacity(n), acks, workers: Vec::with_capacity(n), next: 0 };
        for _ in 0..n {
            let (tx, rx) = sync_channel::<Msg>(256);
            let ack = ack_tx.clone();
            let worker = std::thread::Builder::new().name("aead-writer".to_owned()).spawn(move || {
                let mut failed: Option<Error> = None;
                for msg in rx {
                    match msg {
                        Msg::Write(job) if failed.is_none() => failed = create_aead_file(&job).err(),
                        Msg::Write(_) => {}
                        Msg::Fence => {
                            if ack.send(failed.take()).is_err() {
                                return;
                            }
                        }
                    }
                }
            })?;
            pool.senders.push(tx);
            pool.workers.push(worker);
        }
        Ok(pool)
    }

    fn send(&mut self, job: Job) -> Result<(), Error> {
        let i = self.next % self.senders.len().max(1);
        self.next = self.next.wrapping_add(1);
        self.senders
            .get(i)
            .and_then(|s| s.send(Msg::Write(job)).ok())
            .ok_or_else(|| Error::Inconsistent("an AEAD writer thread stopped".to_owned()))
    }

    fn fence(&mut self) -> Result<(), Error> {
        for s in &self.senders {
            s.send(Msg::Fence).map_err(|_| Error::Inconsistent("an AEAD writer thread stopped".to_owned()))?;
        }
        let mut first = None;
        for _ in 0..self.senders.len() {
            let ack = self.acks.recv().map_err(|_| Error::Inconsistent("an AEAD writer thread stopped".to_owned()))?;
            first = first.or(ack);
        }
        first.map_or(Ok(()), Err)
    }
}

impl Drop for WriterPool {
    fn drop(&mut self) {
        self.senders.clear();
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

/// Create `job.path` (mode 0600, `O_EXCL`) and its directory.
fn create_aead_file(job: &Job) -> Result<(), Error> {
    let path = &job.path;
    if let Some(dir) = path.parent() {
        match std::fs::create_dir(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
            Err(e) if e.kind() == ErrorKind::NotFound => std::fs::create_dir_all(dir).map_err(|e| hsm::Error::io(dir, e))?,
            Err(e) => return Err(hsm::Error::io(dir, e).into()),
        }
    }
    let mut f = OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).map_err(|e| match e.kind() {
        ErrorKind::AlreadyExists => Error::Inconsistent(format!(
            "{} exists already, but public id {} was never allocated before this run: \
             the AEAD directory holds keys from elsewhere; refusing to overwrite it",
            path.display(),
            job.id
        )),
        _ => hsm::Error::io(path, e).into(),
    })?;
    f.write_all(&job.bytes).map_err(|e| hsm::Error::io(path, e).into())
}

/// Counters of a run.
#[derive(Default)]
struct Tally {
    generated: u64,
    kept: u64,
    rewrapped: u64,
    replaced: u64,
}

#[allow(clippy::too_many_arguments)]
fn execute<'a>(
    hsm: &dyn SecurityModule,
    ledger: &mut Ledger,
    run: &Run,
    handles: &[KeyHandleDir],
    resuming: bool,
    mut sinks: Sinks<'a>,
    opts: &RunOptions<'a>,
    progress: &mut dyn FnMut(u64),
) -> Result<RunReport, Error> {
    let batch = opts.batch.clamp(1, MAX_BATCH);
    let kh: Vec<KeyHandle> = handles.iter().map(|k| k.key_handle).collect();
    sinks.start_bundle(opts, run, &kh)?;
    let mut aeads = AeadWriter::new(&run.spec.out_dir, handles, opts.writers)?;
    let mut tally = Tally::default();
    let count = run.spec.count;
    // Keys already durable are only read back when an output needs them.
    let from = if sinks.wants_records() { 0 } else { run.done };
    progress(from);
    for i in from..count {
        let id = run.public_id(i)?;
        let nonce = nonce_for(&id, run.spec.random_nonce)?;
        let expected_nonce = match nonce {
            NonceSource::Given(n) => Some(n),
            NonceSource::Random => None,
        };
        let records = if i < run.done {
            read_done(&aeads, run, &kh, &id, expected_nonce.as_ref())?
        } else if resuming {
            recover(hsm, &mut aeads, &kh, &id, nonce, expected_nonce.as_ref(), &mut tally)?
        } else {
            let records = hsm.generate_yubikey_aeads(&kh, nonce)?;
            for (h, record) in records.iter().enumerate() {
                aeads.write(h, &id, record)?;
            }
            tally.generated += 1;
            records
        };
        // Only now, with every AEAD of the key written, may its secret leave.
        if sinks.wants_secrets() {
            let first = records.first().ok_or_else(|| Error::Inconsistent("the module returned no AEAD".to_owned()))?;
            let secrets = export_secrets(hsm, first)?;
            for f in &mut sinks.files {
                f.write(i + 1, &id, &secrets)?;
            }
        }
        if let Some(b) = &mut sinks.bundle {
            b.writer.add(&id, &records).map_err(|e| Error::Bundle(e.to_string()))?;
        }
        let n = i + 1;
        if n > run.done && (n % batch == 0 || n == count) {
            // Every AEAD file of the batch is written; only now do the
            // batch's secrets lines reach the kernel, so that no output ever
            // holds a key whose AEADs are not all on disk.
            aeads.fence()?;
            for f in &mut sinks.files {
                f.flush()?;
            }
            aeads.sync()?;
            ledger.record_progress(run.id, n)?;
        }
        progress(n);
    }
    aeads.fence()?;
    let mut outputs = Vec::new();
    for f in sinks.files.drain(..) {
        outputs.push(f.finish()?);
    }
    let manifest = match sinks.bundle.take() {
        Some(b) => Some(b.writer.finish(b.key).map_err(|e| Error::Bundle(e.to_string()))?),
        None => None,
    };
    aeads.sync()?;
    ledger.finish(run.id)?;
    let report = RunReport {
        run: run.id,
        first: run.public_id(0)?,
        last: run.public_id(count - 1)?,
        count,
        generated: tally.generated,
        kept: tally.kept,
        rewrapped: tally.rewrapped,
        replaced: tally.replaced,
        key_handles: kh,
        out: run.spec.out_dir.clone(),
        outputs,
        bundle: manifest.is_some().then(|| opts.bundle.map(|(p, _)| p.to_path_buf())).flatten(),
        manifest,
    };
    tracing::info!(
        run = report.run,
        first = %report.first,
        last = %report.last,
        generated = report.generated,
        kept = report.kept,
        rewrapped = report.rewrapped,
        replaced = report.replaced,
        "run complete"
    );
    Ok(report)
}

/// The AEADs of a key the ledger counts as durable.
fn read_done(
    aeads: &AeadWriter,
    run: &Run,
    kh: &[KeyHandle],
    id: &PublicId,
    nonce: Option<&otp::AeadNonce>,
) -> Result<Vec<AeadRecord>, Error> {
    let mut records = Vec::with_capacity(kh.len());
    for (h, k) in kh.iter().enumerate() {
        match aeads.read(h, *k, id, nonce)? {
            Found::Valid(r) => records.push(r),
            Found::Missing | Found::Broken => {
                return Err(Error::Inconsistent(format!(
                    "the ledger records public id {id} of run {} as written, but {} is missing or damaged",
                    run.id,
                    aeads.path(h, id).display()
                )))
            }
        }
    }
    Ok(records)
}

/// A key after the ledger's count, on resume: keep what is there.
fn recover(
    hsm: &dyn SecurityModule,
    aeads: &mut AeadWriter,
    kh: &[KeyHandle],
    id: &PublicId,
    nonce: NonceSource,
    expected: Option<&otp::AeadNonce>,
    tally: &mut Tally,
) -> Result<Vec<AeadRecord>, Error> {
    let found = kh.iter().enumerate().map(|(h, k)| aeads.read(h, *k, id, expected)).collect::<Result<Vec<_>, _>>()?;
    let valid: Vec<Option<AeadRecord>> = found.iter().map(|f| if let Found::Valid(r) = f { Some(*r) } else { None }).collect();
    for (h, f) in found.iter().enumerate() {
        if matches!(f, Found::Broken) {
            tracing::warn!(public_id = %id, path = %aeads.path(h, id).display(), "removing a truncated AEAD file left by the crash");
            aeads.remove(h, id)?;
        }
    }
    if valid.iter().all(Option::is_some) {
        tally.kept += 1;
        return Ok(valid.into_iter().flatten().collect());
    }
    if let Some(present) = valid.iter().flatten().next() {
        // Re-wrap the existing secret to the missing handles.
        match rewrap(hsm, present, kh, &valid, nonce) {
            Ok(records) => {
                for (h, r) in records.iter().enumerate() {
                    if valid[h].is_none() {
                        aeads.write(h, id, r)?;
                    }
                }
                tally.rewrapped += 1;
                return Ok(records);
            }
            Err(e) => {
                tracing::warn!(public_id = %id, error = %e, "cannot re-wrap a partially written key; replacing its never-output secret");
                for h in 0..kh.len() {
                    aeads.remove(h, id)?;
                }
                tally.replaced += 1;
            }
        }
    } else {
        tally.generated += 1;
    }
    let records = hsm.generate_yubikey_aeads(kh, nonce)?;
    for (h, record) in records.iter().enumerate() {
        aeads.write(h, id, record)?;
    }
    Ok(records)
}

fn rewrap(
    hsm: &dyn SecurityModule,
    present: &AeadRecord,
    kh: &[KeyHandle],
    valid: &[Option<AeadRecord>],
    nonce: NonceSource,
) -> Result<Vec<AeadRecord>, Error> {
    let plain = hsm.decrypt_aead(present)?;
    kh.iter().zip(valid).map(|(k, v)| v.map_or_else(|| hsm.import_aead(*k, nonce, &plain).map_err(Error::from), Ok)).collect()
}
