//! Importing AEADs into the [`AeadStore`]: pyhsm AEAD directories and
//! Yubico YK-KSM exports (`# ykksm 1` CSV).
//!
//! Imports are idempotent and never abort on a bad entry: every file or line
//! ends up in exactly one count of the [`ImportReport`] (added, already
//! present, conflict, error) or is skipped for a stated reason. Only a
//! failure of the store, of the security module or of the input as a whole
//! stops an import ([`ImportError`]); what was committed before stays, and
//! running the import again picks up where it stopped.
//!
//! Rows are written in batches of [`BATCH`], one transaction (one fsync)
//! each, through [`AeadStore::put_many`].

use std::collections::HashSet;
use std::fmt;
use std::io::{ErrorKind, IsTerminal, Read};
use std::path::{Path, PathBuf};

use hsm::{Flags, NonceSource, SecurityModule, Status};
use indicatif::{ProgressBar, ProgressStyle};
use otp::aead_file::{AeadFile, AeadRecord, ResolveError};
use otp::token::TokenFields;
use otp::{KeyHandle, PrivateId, PublicId, YubiKeyKey, YubiKeySecrets};
use zeroize::{Zeroize, Zeroizing};

use crate::store::{AeadStore, PutOutcome};
use crate::LookupError;

/// Rows per transaction.
pub const BATCH: usize = 10_000;
/// At most this many errors and conflicts are kept with their details; the
/// counts are always exact.
pub const MAX_ISSUES: usize = 1_000;
/// An AEAD file is at most 97 bytes (v1 with a CRLF marker and a 72-byte
/// AEAD); anything much larger is not one and is not read.
const MAX_AEAD_FILE: u64 = 1024;
/// Longest CSV line read; longer lines are errors.
const MAX_LINE: usize = 4096;
/// The first line of a YK-KSM export.
pub const YKKSM_HEADER: &str = "# ykksm 1";

/// Where an entry of an import or export came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Location {
    /// A file or directory.
    Path(PathBuf),
    /// A line of the input (1-based).
    Line(u64),
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Path(p) => write!(f, "{}", p.display()),
            Self::Line(n) => write!(f, "line {n}"),
        }
    }
}

/// Was an entry refused because it was broken, or because it disagrees
/// with the store?
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IssueKind {
    /// The entry differs from what the store (or the target directory)
    /// holds for the same pair; what was there is kept.
    Conflict,
    /// The entry could not be read or used.
    Error,
}

/// One refused entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Issue {
    /// Conflict or error.
    pub kind: IssueKind,
    /// The file or line.
    pub location: Location,
    /// Why.
    pub reason: String,
}

impl fmt::Display for Issue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.kind {
            IssueKind::Conflict => "conflict",
            IssueKind::Error => "error",
        };
        write!(f, "{kind}: {}: {}", self.location, self.reason)
    }
}

/// What an import (or an export) did. Displays as
/// `added 3, already present 0, conflicts 1, errors 2`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ImportReport {
    /// New rows (for an export: files written).
    pub added: u64,
    /// Entries whose pair was there already with the same AEAD.
    pub already_present: u64,
    /// Entries whose pair holds a different AEAD; nothing was replaced.
    pub conflicts: u64,
    /// Entries that could not be read or used.
    pub errors: u64,
    /// Entries ignored on purpose: hidden files, entries outside any
    /// key-handle directory, public id 0 in a YK-KSM export.
    pub skipped: u64,
    /// Of `already_present`: pairs of a YK-KSM import that were present
    /// but could not be compared with the CSV's secret (see
    /// [`import_ykksm_csv`]).
    pub unverified: u64,
    /// The first [`MAX_ISSUES`] conflicts and errors, in input order.
    pub issues: Vec<Issue>,
}

impl ImportReport {
    /// No conflicts and no errors?
    #[must_use]
    pub fn is_clean(&self) -> bool {
        self.conflicts == 0 && self.errors == 0
    }

    /// Errors and conflicts beyond those kept in [`Self::issues`].
    #[must_use]
    pub fn issues_not_kept(&self) -> u64 {
        (self.conflicts + self.errors).saturating_sub(self.issues.len() as u64)
    }

    /// Count an error at `location`, keeping its details while fewer than
    /// [`MAX_ISSUES`] are kept.
    pub fn error(&mut self, location: Location, reason: impl Into<String>) {
        self.errors += 1;
        self.issue(IssueKind::Error, location, reason.into());
    }

    /// Count a conflict at `location`, keeping its details while fewer
    /// than [`MAX_ISSUES`] are kept.
    pub fn conflict(&mut self, location: Location, reason: impl Into<String>) {
        self.conflicts += 1;
        self.issue(IssueKind::Conflict, location, reason.into());
    }

    fn issue(&mut self, kind: IssueKind, location: Location, reason: String) {
        if kind == IssueKind::Error {
            tracing::debug!(%location, "{reason}");
        }
        if self.issues.len() < MAX_ISSUES {
            self.issues.push(Issue { kind, location, reason });
        }
    }

    fn outcome(&mut self, outcome: PutOutcome, location: Location, public_id: &PublicId, kh: KeyHandle) {
        match outcome {
            PutOutcome::Added => self.added += 1,
            PutOutcome::AlreadyPresent => self.already_present += 1,
            PutOutcome::Conflict => self.conflict(
                location,
                format!("public id {public_id} under key handle {kh}: the store holds a different AEAD; kept it, quarantined this one"),
            ),
        }
    }
}

impl fmt::Display for ImportReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "added {}, already present {}, conflicts {}, errors {}", self.added, self.already_present, self.conflicts, self.errors)
    }
}

/// Why an import or export stopped as a whole.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ImportError {
    /// The AEAD store failed.
    #[error(transparent)]
    Store(#[from] LookupError),
    /// The security module failed or refused (locked, no such handle, not
    /// permitted).
    #[error("security module: {0}")]
    Module(#[from] hsm::Error),
    /// The input or output could not be read or written at all.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The input is not in the expected format.
    #[error("{0}")]
    Format(String),
}

/// A progress display on stderr when it is a terminal, hidden otherwise.
/// `total` is the number of entries if known (a bar), else a counter.
#[must_use]
pub fn progress_bar(total: Option<u64>, what: &'static str) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let (bar, template) = match total {
        Some(n) => (ProgressBar::new(n), "{msg} [{bar:40}] {human_pos}/{human_len} eta {eta}"),
        None => (ProgressBar::new_spinner(), "{spinner} {msg} {human_pos} in {elapsed}"),
    };
    if let Ok(style) = ProgressStyle::with_template(template) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(what);
    bar.enable_steady_tick(std::time::Duration::from_millis(200));
    bar
}

/// Rows waiting for their transaction, with where each came from.
struct Pending {
    rows: Vec<(PublicId, AeadRecord)>,
    locations: Vec<Location>,
    ids: HashSet<(PublicId, KeyHandle)>,
    origin: String,
    now: i64,
}

impl Pending {
    fn new(origin: String, now: i64) -> Self {
        Self { rows: Vec::with_capacity(BATCH), locations: Vec::with_capacity(BATCH), ids: HashSet::new(), origin, now }
    }

    fn holds(&self, public_id: &PublicId, kh: KeyHandle) -> bool {
        self.ids.contains(&(*public_id, kh))
    }

    fn push(
        &mut self,
        store: &AeadStore,
        report: &mut ImportReport,
        public_id: PublicId,
        record: AeadRecord,
        at: Location,
    ) -> Result<(), ImportError> {
        self.ids.insert((public_id, record.key_handle));
        self.rows.push((public_id, record));
        self.locations.push(at);
        if self.rows.len() >= BATCH {
            self.flush(store, report)?;
        }
        Ok(())
    }

    fn flush(&mut self, store: &AeadStore, report: &mut ImportReport) -> Result<(), ImportError> {
        let outcomes = store.put_many(&self.rows, &self.origin, self.now)?;
        for ((outcome, (public_id, record)), at) in outcomes.into_iter().zip(&self.rows).zip(self.locations.drain(..)) {
            report.outcome(outcome, at, public_id, record.key_handle);
        }
        self.rows.clear();
        self.ids.clear();
        Ok(())
    }
}

fn absolute(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())
}

/// Entries of a directory, sorted by name so that reports are stable.
fn sorted_entries(dir: &Path) -> std::io::Result<Vec<std::fs::DirEntry>> {
    let mut entries = std::fs::read_dir(dir)?.collect::<std::io::Result<Vec<_>>>()?;
    entries.sort_by_key(std::fs::DirEntry::file_name);
    Ok(entries)
}

fn is_hidden(name: &std::ffi::OsStr) -> bool {
    name.as_encoded_bytes().first() == Some(&b'.')
}

/// Import a pyhsm-layout AEAD directory,
/// `<dir>/<key handle>/<pairs…>/<modhex public id>`, as pyhsm's
/// `yhsm-db-import` does.
///
/// - The key handle comes from the first path component below `dir`, in
///   any form pyhsm accepts (decimal, `0x` hex, 4 characters). A directory
///   whose name is not a key handle is an error; files directly in `dir`
///   and hidden entries (such as `write_atomic`'s temporary files) are
///   skipped.
/// - The public id is the file name. v0 files (the AEAD alone) take the
///   directory's key handle and the public id as nonce; v1 files carry
///   both. A v1 file naming another key handle than its directory is an
///   error and is not imported: the AEAD only opens under the handle it
///   names, so the file is misplaced and an operator must decide.
/// - Unreadable, oversized, garbled or misnamed files are errors with their
///   path; the import goes on. Symbolic links to files are followed, links
///   to directories are not.
///
/// Rows get the origin `aead-dir:<absolute dir>` and creation time `now`.
pub fn import_aead_dir(store: &AeadStore, dir: &Path, now: i64, progress: &ProgressBar) -> Result<ImportReport, ImportError> {
    let io = |path: &Path, source| ImportError::Io { path: path.to_path_buf(), source };
    let top = sorted_entries(dir).map_err(|e| io(dir, e))?;
    let mut report = ImportReport::default();
    let mut pending = Pending::new(format!("aead-dir:{}", absolute(dir).display()), now);
    for entry in top {
        let path = entry.path();
        if is_hidden(&entry.file_name()) || !entry.file_type().is_ok_and(|t| t.is_dir()) {
            report.skipped += 1;
            progress.inc(1);
            continue;
        }
        let Some(kh) = entry.file_name().to_str().and_then(|s| s.parse::<KeyHandle>().ok()) else {
            report.error(Location::Path(path), "not a key-handle directory (its name must be decimal, 0x-hex or 4 characters)");
            continue;
        };
        // Depth-first, in name order, without recursion.
        let mut stack = vec![path];
        while let Some(d) = stack.pop() {
            let entries = match sorted_entries(&d) {
                Ok(e) => e,
                Err(e) => {
                    report.error(Location::Path(d), format!("cannot read directory: {e}"));
                    continue;
                }
            };
            let mut subdirs = Vec::new();
            for entry in entries {
                let path = entry.path();
                if is_hidden(&entry.file_name()) {
                    report.skipped += 1;
                    continue;
                }
                // Follows symbolic links, so that a link to a directory
                // can be told from a link to a file.
                let meta = match std::fs::metadata(&path) {
                    Ok(m) => m,
                    Err(e) => {
                        report.error(Location::Path(path), format!("cannot read: {e}"));
                        continue;
                    }
                };
                let is_link = entry.file_type().is_ok_and(|t| t.is_symlink());
                if meta.is_dir() && !is_link {
                    subdirs.push(path);
                } else if meta.is_dir() {
                    report.error(Location::Path(path), "symbolic link to a directory: not followed");
                } else if !meta.is_file() {
                    report.error(Location::Path(path), "not a regular file");
                } else {
                    progress.inc(1);
                    if let Some((public_id, record)) = read_aead_file(&path, &entry.file_name(), meta.len(), kh, &mut report) {
                        pending.push(store, &mut report, public_id, record, Location::Path(path))?;
                    }
                }
            }
            // Popped in name order.
            stack.extend(subdirs.into_iter().rev());
        }
    }
    pending.flush(store, &mut report)?;
    Ok(report)
}

/// Read one AEAD file; an unusable file is recorded in `report`.
fn read_aead_file(
    path: &Path,
    name: &std::ffi::OsStr,
    len: u64,
    kh: KeyHandle,
    report: &mut ImportReport,
) -> Option<(PublicId, AeadRecord)> {
    let at = || Location::Path(path.to_path_buf());
    let Some(public_id) = name.to_str().and_then(|n| PublicId::from_modhex(n).ok()) else {
        report.error(at(), "file name is not a modhex public id");
        return None;
    };
    if len > MAX_AEAD_FILE {
        report.error(at(), format!("{len} bytes is too large for an AEAD file"));
        return None;
    }
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) => {
            report.error(at(), format!("cannot read: {e}"));
            return None;
        }
    };
    let parsed = match AeadFile::parse(&bytes) {
        Ok(p) => p,
        Err(e) => {
            report.error(at(), format!("not an AEAD file: {e}"));
            return None;
        }
    };
    match parsed.resolve(kh, &public_id) {
        Ok(record) => Some((public_id, record)),
        Err(ResolveError::KeyHandleMismatch { expected, found }) => {
            tracing::warn!(path = %path.display(), "AEAD file is for key handle {found} but lies under {expected}; not imported");
            report
                .error(at(), format!("v1 file is for key handle {found} but lies in the directory of key handle {expected}; not imported"));
            None
        }
        Err(e) => {
            report.error(at(), e.to_string());
            None
        }
    }
}

/// How YK-KSM secrets are wrapped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NoncePolicy {
    /// The public id is the nonce (pyhsm's default): the same secret always
    /// gives the same AEAD bytes. Needs the handle's `user-nonce` flag.
    PublicId,
    /// The module draws a random nonce, stored with the AEAD (pyhsm's
    /// `--random-nonce`).
    Random,
}

/// A YK-KSM import.
#[derive(Clone, Debug)]
pub struct CsvImport {
    /// The handle to wrap secrets under.
    pub key_handle: KeyHandle,
    /// Where nonces come from.
    pub nonce: NoncePolicy,
    /// What the rows' origin names, e.g. the file path or `stdin`.
    pub source: String,
}

/// Is `kh` allowed to wrap imported secrets under `policy`? Checked before
/// anything is read or written. Returns whether it may also decode OTPs,
/// which lets existing pairs be compared with the CSV's secrets.
pub fn check_import_handle(hsm: &dyn SecurityModule, kh: KeyHandle, policy: NoncePolicy) -> Result<bool, ImportError> {
    match hsm.status() {
        Status::Ready => {}
        Status::Locked => return Err(hsm::Error::Locked.into()),
        Status::NotReady => return Err(hsm::Error::NotReady("the security module is not available".to_owned()).into()),
    }
    let info = hsm.key_handles()?.into_iter().find(|h| h.key_handle == kh).ok_or(hsm::Error::UnknownKeyHandle(kh))?;
    let nonce = match policy {
        NoncePolicy::PublicId => Flags::USER_NONCE,
        NoncePolicy::Random => Flags::NONE,
    };
    let wraps = [Flags::AEAD_GENERATE | nonce, Flags::BUFFER_LOAD | Flags::BUFFER_AEAD_GENERATE | nonce];
    if !wraps.iter().any(|w| info.flags.contains(*w)) {
        return Err(hsm::Error::NotPermitted { key_handle: kh, operation: "wrap imported secrets", needs: wraps[1] }.into());
    }
    Ok(info.flags.contains(Flags::OTP_DECODE))
}

/// Import a Yubico YK-KSM export (`# ykksm 1`), as pyhsm's
/// `yhsm-import-keys` does, wrapping each secret in the security module.
///
/// - The first line must be exactly `# ykksm 1`, or nothing is imported.
///   Other lines starting with `#`, and empty lines, are skipped. Rows are
///   `seq,publicname,uid,aeskey,…`: a modhex public id, the private id in
///   hex (12 digits; fewer are zero-padded, as pyhsm does), the AES key in 32 hex digits; further fields
///   are ignored. Public id 0 is skipped, as pyhsm does.
/// - Each secret (`aeskey ‖ uid`) is wrapped by
///   [`SecurityModule::import_aead`] under `import.key_handle`, whose flags
///   are checked first ([`check_import_handle`]).
/// - A bad row is an error with its line number, never echoing secrets;
///   the import goes on.
///
/// **Idempotency.** A pair already in the store is never written again.
/// With [`NoncePolicy::PublicId`] and a stored AEAD under the same nonce,
/// the fresh AEAD is compared byte for byte: equal is *already present*,
/// different is a *conflict*. Otherwise (a random nonce on either side) the
/// bytes cannot match, so if the handle can also decode OTPs the stored
/// AEAD is checked against the CSV's secret with a test OTP decoded in the
/// module: it decodes is *already present*, it does not is a *conflict*. If
/// the handle cannot decode, the pair counts as *already present* and as
/// [`ImportReport::unverified`]. A conflicting row is reported with its line
/// number and not written anywhere: wrapping another secret under the
/// stored AEAD's (key handle, nonce) would reuse a CCM nonce.
pub fn import_ykksm_csv(
    store: &AeadStore,
    hsm: &dyn SecurityModule,
    input: impl Read,
    import: &CsvImport,
    now: i64,
    progress: &ProgressBar,
) -> Result<ImportReport, ImportError> {
    let kh = import.key_handle;
    let can_decode = check_import_handle(hsm, kh, import.nonce)?;
    let mut rows = YkksmReader::new(input, &import.source)?;
    let mut report = ImportReport::default();
    let mut pending = Pending::new(format!("ykksm-csv:{}", import.source), now);
    while let Some((number, row)) = rows.next_row()? {
        progress.inc(1);
        let at = Location::Line(number);
        let (public_id, secrets) = match row {
            YkksmRow::Secret(public_id, secrets) => (public_id, secrets),
            YkksmRow::PublicIdZero => {
                report.skipped += 1;
                continue;
            }
            YkksmRow::Invalid(reason) => {
                report.error(at, reason);
                continue;
            }
        };
        let nonce = match import.nonce {
            NoncePolicy::PublicId => match public_id.aead_nonce() {
                Ok(n) => NonceSource::Given(n),
                Err(e) => {
                    report.error(at, format!("public id {public_id}: {e}; use --random-nonce"));
                    continue;
                }
            },
            NoncePolicy::Random => NonceSource::Random,
        };
        if pending.holds(&public_id, kh) {
            // A repeated id: let its first row reach the store first.
            pending.flush(store, &mut report)?;
        }
        let plaintext = secrets.to_plaintext();
        let Some(stored) = store.get(&public_id, kh)? else {
            let record = hsm.import_aead(kh, nonce, &plaintext[..])?;
            pending.push(store, &mut report, public_id, record, at)?;
            continue;
        };
        let same = match nonce {
            NonceSource::Given(n) if stored.nonce == n => Some(hsm.import_aead(kh, nonce, &plaintext[..])? == stored),
            _ if can_decode => Some(holds_secret(hsm, &stored, &secrets)?),
            _ => None,
        };
        match same {
            Some(true) => report.already_present += 1,
            Some(false) => report.conflict(
                at,
                format!("public id {public_id} under key handle {kh}: the store holds an AEAD of another secret; kept it, nothing written"),
            ),
            None => {
                report.already_present += 1;
                report.unverified += 1;
            }
        }
    }
    pending.flush(store, &mut report)?;
    Ok(report)
}

/// Does `stored` hold `secrets`? A test OTP made with the secrets is
/// decoded in the module: the CRC and the private id must both match.
fn holds_secret(hsm: &dyn SecurityModule, stored: &AeadRecord, secrets: &YubiKeySecrets) -> Result<bool, ImportError> {
    let mut fields = TokenFields { uid: *secrets.uid.expose(), counter: 1, ..TokenFields::default() };
    let token = fields.build();
    fields.uid.zeroize();
    let otp = token.encrypt(&secrets.key);
    match hsm.decode_otp(stored, &otp) {
        Ok(_) => Ok(true),
        Err(hsm::Error::OtpInvalid(_) | hsm::Error::AeadInvalid(_)) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// One data row of a YK-KSM export, as [`YkksmReader`] reads it.
#[derive(Debug)]
pub enum YkksmRow {
    /// A YubiKey: its public id and secrets.
    Secret(PublicId, YubiKeySecrets),
    /// Public id 0, which a YubiHSM refuses: skipped, as pyhsm does.
    PublicIdZero,
    /// A row that cannot be used, and why. The reason never quotes a
    /// secret field.
    Invalid(String),
}

/// A streaming reader of a Yubico YK-KSM export (`# ykksm 1`): one row at a
/// time, in constant memory, every buffer zeroized. Rows are
/// `seq,publicname,uid,aeskey,…`; see [`import_ykksm_csv`] for the rules.
pub struct YkksmReader<R> {
    lines: SecretLines<R>,
    line: Zeroizing<Vec<u8>>,
    number: u64,
    source: String,
}

impl<R: Read> YkksmReader<R> {
    /// Read and check the header line, which must be exactly
    /// [`YKKSM_HEADER`]. `source` names the input in messages (a path or
    /// `stdin`).
    pub fn new(input: R, source: &str) -> Result<Self, ImportError> {
        let mut reader = Self {
            lines: SecretLines::new(input),
            line: Zeroizing::new(Vec::with_capacity(MAX_LINE)),
            number: 0,
            source: source.to_owned(),
        };
        let first = reader.lines.next(&mut reader.line).map_err(|e| reader.io(e))?;
        reader.number = 1;
        if !(matches!(first, Some(true)) && strip_cr(&reader.line) == YKKSM_HEADER.as_bytes()) {
            return Err(ImportError::Format(format!(
                "{source}: not a YK-KSM export: the first line must be exactly `{YKKSM_HEADER}`; nothing imported"
            )));
        }
        Ok(reader)
    }

    fn io(&self, source: std::io::Error) -> ImportError {
        ImportError::Io { path: PathBuf::from(&self.source), source }
    }

    /// The next data row with its 1-based line number, or `None` at the
    /// end. Comment lines (`#…`) and empty lines are passed over; a line
    /// that is too long or not UTF-8 is a [`YkksmRow::Invalid`] row.
    pub fn next_row(&mut self) -> Result<Option<(u64, YkksmRow)>, ImportError> {
        loop {
            let Some(complete) = self.lines.next(&mut self.line).map_err(|e| self.io(e))? else {
                return Ok(None);
            };
            self.number += 1;
            let number = self.number;
            if !complete {
                return Ok(Some((number, YkksmRow::Invalid(format!("longer than {MAX_LINE} bytes")))));
            }
            let Ok(text) = std::str::from_utf8(strip_cr(&self.line)) else {
                return Ok(Some((number, YkksmRow::Invalid("not UTF-8 text".to_owned()))));
            };
            if text.trim().is_empty() || text.starts_with('#') {
                continue;
            }
            let row = match parse_row(text) {
                Ok(Some((public_id, secrets))) => YkksmRow::Secret(public_id, secrets),
                Ok(None) => YkksmRow::PublicIdZero,
                Err(reason) => YkksmRow::Invalid(reason),
            };
            return Ok(Some((number, row)));
        }
    }
}

fn strip_cr(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// One row: `Ok(None)` for public id 0. Messages never quote secret fields.
fn parse_row(text: &str) -> Result<Option<(PublicId, YubiKeySecrets)>, String> {
    let mut fields = text.split(',').map(str::trim);
    let (Some(_seq), Some(name), Some(uid), Some(key)) = (fields.next(), fields.next(), fields.next(), fields.next()) else {
        return Err("expected at least 4 comma-separated fields: seq,publicname,uid,aeskey".to_owned());
    };
    let public_id = PublicId::from_modhex(name).map_err(|e| format!("public id {name:?}: {e}"))?;
    if public_id.to_number() == 0 {
        return Ok(None);
    }
    if uid.is_empty() || uid.len() > 12 || !uid.len().is_multiple_of(2) || !uid.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!("public id {public_id}: uid must be 2 to 12 hex digits (12 in YK-KSM exports)"));
    }
    if key.len() != 32 || !key.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!("public id {public_id}: AES key must be 32 hex digits"));
    }
    let uid = PrivateId::from_hex(uid).map_err(|_| format!("public id {public_id}: bad uid"))?;
    let key = YubiKeyKey::from_hex(key).map_err(|_| format!("public id {public_id}: bad AES key"))?;
    Ok(Some((public_id, YubiKeySecrets { key, uid })))
}

/// Lines of a secret-bearing input. Every buffer the text passes through
/// is fixed-size and zeroized on drop, so no copy is left in freed memory.
struct SecretLines<R> {
    inner: R,
    buf: Zeroizing<Vec<u8>>,
    start: usize,
    end: usize,
    eof: bool,
}

impl<R: Read> SecretLines<R> {
    fn new(inner: R) -> Self {
        Self { inner, buf: Zeroizing::new(vec![0; 64 * 1024]), start: 0, end: 0, eof: false }
    }

    /// The next line, without its `\n`, into `line` (whose capacity must be
    /// [`MAX_LINE`]). `Some(false)`: the line was too long and was dropped.
    fn next(&mut self, line: &mut Zeroizing<Vec<u8>>) -> std::io::Result<Option<bool>> {
        line.zeroize();
        let mut too_long = false;
        let mut any = false;
        loop {
            if self.start == self.end {
                if self.eof {
                    return Ok(any.then_some(!too_long));
                }
                self.start = 0;
                self.end = loop {
                    match self.inner.read(&mut self.buf) {
                        Ok(n) => break n,
                        Err(e) if e.kind() == ErrorKind::Interrupted => {}
                        Err(e) => return Err(e),
                    }
                };
                self.eof = self.end == 0;
                continue;
            }
            any = true;
            let chunk = &self.buf[self.start..self.end];
            let (piece, done) = match chunk.iter().position(|&b| b == b'\n') {
                Some(i) => (&chunk[..i], i + 1),
                None => (chunk, chunk.len()),
            };
            if line.len() + piece.len() > MAX_LINE {
                too_long = true;
            } else if !too_long {
                line.extend_from_slice(piece);
            }
            let newline = done > piece.len();
            self.start += done;
            if newline {
                return Ok(Some(!too_long));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(input: &[u8]) -> Vec<Option<String>> {
        let mut l = SecretLines::new(input);
        // A tiny buffer exercises lines that span reads.
        l.buf = Zeroizing::new(vec![0; 3]);
        let mut line = Zeroizing::new(Vec::with_capacity(MAX_LINE));
        let mut out = Vec::new();
        while let Some(ok) = l.next(&mut line).unwrap() {
            out.push(ok.then(|| String::from_utf8(line.to_vec()).unwrap()));
        }
        out
    }

    #[test]
    fn secret_lines() {
        let s = |t: &str| Some(t.to_owned());
        assert_eq!(lines(b"# ykksm 1\nab,cd\r\n\nlast"), [s("# ykksm 1"), s("ab,cd\r"), s(""), s("last")]);
        assert_eq!(lines(b""), Vec::<Option<String>>::new());
        assert_eq!(lines(b"x\n"), [s("x")]);
        let long = format!("a\n{}\nb\n", "z".repeat(MAX_LINE + 1));
        assert_eq!(lines(long.as_bytes()), [s("a"), None, s("b")]);
        let exact = "y".repeat(MAX_LINE);
        assert_eq!(lines(exact.as_bytes()), [Some(exact)]);
    }

    #[test]
    fn rows() {
        let (id, s) = parse_row("1,cccccccccccb,010203040506,000102030405060708090a0b0c0d0e0f,,2010-01-01,").unwrap().unwrap();
        assert_eq!(id.to_modhex(), "cccccccccccb");
        assert_eq!(hex::encode(*s.to_plaintext()), "000102030405060708090a0b0c0d0e0f010203040506");
        assert!(parse_row("1,cccccccccccc,010203040506,000102030405060708090a0b0c0d0e0f").unwrap().is_none());
        let secret = "ffeeddccbbaa99887766554433221100";
        for bad in [
            "1,cccccccccccb,010203040506".to_owned(),
            format!("1,xyz,010203040506,{secret}"),
            format!("1,cccccccccccb,0102030405060708,{secret}"),
            format!("1,cccccccccccb,01020304050g,{secret}"),
            "1,cccccccccccb,010203040506,ffeeddccbbaa9988776655443322110".to_owned(),
            "1,cccccccccccb,010203040506,ffeeddccbbaa998877665544332211zz".to_owned(),
        ] {
            let e = parse_row(&bad).unwrap_err();
            assert!(!e.contains("ffeedd") && !e.contains("010203"), "{e}");
        }
        let report = ImportReport { added: 3, conflicts: 1, errors: 2, ..ImportReport::default() };
        assert_eq!(report.to_string(), "added 3, already present 0, conflicts 1, errors 2");
        assert!(!report.is_clean());
    }
}
