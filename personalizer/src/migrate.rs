//! Migration and key rotation: bringing YK-KSM secrets under the module,
//! and getting secrets out of AEADs again, in the spirit of pyhsm's
//! `yhsm-import-keys` and `yhsm-decrypt-aead`.
//!
//! - [`import_ykksm`] reads a Yubico YK-KSM export (`# ykksm 1`, parsed by
//!   [`ksm::import::YkksmReader`]) and wraps every secret in the module
//!   under each requested key handle, writing a pyhsm-layout AEAD directory.
//! - [`decrypt_aead`] walks one key handle's AEADs in a pyhsm-layout
//!   directory and either writes their plaintext to a new file
//!   ([`Format::Raw`], [`Format::YubikeyCsv`]) or re-wraps them under another
//!   key handle for key rotation ([`Format::Aead`]), in which case the
//!   plaintext never leaves zeroized memory.
//!
//! **Bad entries are skipped and reported**, as `ksm import` does: each
//! unusable row or file is an error with its line number or path in the
//! returned [`ImportReport`], the rest is processed, and the caller exits
//! non-zero when the report is not clean. Only a failure of the input as a
//! whole, of the output, or of the security module stops a run
//! ([`MigrateError`]). With [`DecryptAead::fail_fast`] the first bad entry
//! stops the run, and no plaintext file is left behind.
//!
//! AEAD files are written mode 0600 and never overwritten: an existing file
//! holding the same AEAD counts as *already present*, one holding another
//! AEAD as a *conflict* and stays as it is. Re-running an import with the
//! public id as nonce is therefore idempotent; with random nonces, existing
//! files cannot be compared and are conflicts.
//!
//! Everything streams: memory does not grow with the number of YubiKeys.

use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use hsm::{Flags, NonceSource, SecurityModule};
use indicatif::ProgressBar;
use ksm::aead_dir::{AeadDir, KeyHandleDir};
use ksm::import::{check_import_handle, ImportError, ImportReport, Location, NoncePolicy, YkksmReader, YkksmRow};
use otp::aead_file::{key_handle_dir_names, relative_path, AeadFile, AeadRecord};
use otp::{PublicId, YubiKeySecrets};
use zeroize::Zeroizing;

use crate::output::{OutputFormat, SecretsFile};

/// An AEAD file is under 100 bytes; anything much larger is not one.
const MAX_AEAD_FILE: u64 = 1024;

/// Why a migration stopped as a whole.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MigrateError {
    /// Bad or inconsistent arguments.
    #[error("{0}")]
    Usage(String),
    /// The security module failed or refused (locked, unknown handle,
    /// missing permission).
    #[error("security module: {0}")]
    Module(#[from] hsm::Error),
    /// A file or directory could not be read or written at all.
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
    /// The plaintext output file was refused or failed.
    #[error(transparent)]
    Output(#[from] crate::output::OutputError),
    /// [`DecryptAead::fail_fast`] stopped the run at the first bad entry.
    #[error("stopped at the first error (--fail-fast): {0}; no plaintext file was written")]
    Stopped(String),
}

impl From<ImportError> for MigrateError {
    fn from(e: ImportError) -> Self {
        match e {
            ImportError::Module(e) => Self::Module(e),
            ImportError::Io { path, source } => Self::Io { path, source },
            ImportError::Format(m) => Self::Format(m),
            other => Self::Format(other.to_string()),
        }
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> MigrateError + '_ {
    move |source| MigrateError::Io { path: path.to_path_buf(), source }
}

/// What [`import_ykksm`] does.
#[derive(Clone, Debug)]
pub struct YkksmImport {
    /// Handles to wrap each secret under; each needs the `import` flags
    /// (buffer-load and buffer-aead-generate, or aead-generate; and
    /// user-nonce unless the nonce is random).
    pub key_handles: Vec<KeyHandleDir>,
    /// Where AEAD nonces come from: the public id (pyhsm's default) or the
    /// module's random generator (`--random-nonce`).
    pub nonce: NoncePolicy,
    /// Names the input in messages: its path, or `stdin`.
    pub source: String,
}

/// Check that every handle of `import` exists and may wrap imported
/// secrets. [`import_ykksm`] does this first; callers may do it before
/// reading anything else.
pub fn check_ykksm_import(hsm: &dyn SecurityModule, import: &YkksmImport) -> Result<(), MigrateError> {
    if import.key_handles.is_empty() {
        return Err(MigrateError::Usage("give at least one key handle".to_owned()));
    }
    for kh in &import.key_handles {
        check_import_handle(hsm, kh.key_handle, import.nonce)?;
    }
    Ok(())
}

/// Import a Yubico YK-KSM export (`# ykksm 1`) from `input`: wrap each
/// row's secret (`aeskey ‖ uid`) with [`SecurityModule::import_aead`] under
/// every handle of `import`, and write the AEADs (v1 files, pyhsm layout) to
/// `out`, as pyhsm's `yhsm-import-keys` does.
///
/// The header must be exactly `# ykksm 1`, or nothing is written. Rows are
/// `seq,publicname,uid,aeskey,…` ([`YkksmReader`]); public id 0 is skipped
/// and counted in [`ImportReport::skipped`]. In the report, `added` counts
/// AEAD files written (one per row and handle) and a bad row is an error
/// with its line number, never quoting secrets. `progress` advances once per
/// row.
pub fn import_ykksm(
    hsm: &dyn SecurityModule,
    input: impl Read,
    out: &AeadDir,
    import: &YkksmImport,
    progress: &ProgressBar,
) -> Result<ImportReport, MigrateError> {
    check_ykksm_import(hsm, import)?;
    let mut rows = YkksmReader::new(input, &import.source)?;
    let mut report = ImportReport::default();
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
        let Some(nonce) = nonce_for(import.nonce, &public_id, &at, &mut report) else {
            continue;
        };
        let plaintext = secrets.to_plaintext();
        for kh in &import.key_handles {
            store_aead(hsm, out, kh, &public_id, nonce, &plaintext[..], &mut report)?;
        }
    }
    Ok(report)
}

/// The nonce for `public_id` under `policy`; `None` (an error in `report`)
/// if the id is too long to be a nonce.
fn nonce_for(policy: NoncePolicy, public_id: &PublicId, at: &Location, report: &mut ImportReport) -> Option<NonceSource> {
    match policy {
        NoncePolicy::Random => Some(NonceSource::Random),
        NoncePolicy::PublicId => match public_id.aead_nonce() {
            Ok(n) => Some(NonceSource::Given(n)),
            Err(e) => {
                report.error(at.clone(), format!("public id {public_id}: {e}; use --random-nonce"));
                None
            }
        },
    }
}

/// Wrap `plaintext` under `kh` and write it to `out`, unless a file is
/// there already: then compare (public-id nonce) or report a conflict.
fn store_aead(
    hsm: &dyn SecurityModule,
    out: &AeadDir,
    kh: &KeyHandleDir,
    public_id: &PublicId,
    nonce: NonceSource,
    plaintext: &[u8],
    report: &mut ImportReport,
) -> Result<(), MigrateError> {
    let path = out.base().join(relative_path(&kh.write_name(), public_id));
    if path.symlink_metadata().is_ok() {
        let NonceSource::Given(_) = nonce else {
            report.conflict(
                Location::Path(path),
                format!(
                    "public id {public_id} under key handle {kh}: a file exists; not replaced (with random nonces it cannot be compared)"
                ),
            );
            return Ok(());
        };
        // The same secret under the same nonce gives the same AEAD.
        let record = hsm.import_aead(kh.key_handle, nonce, plaintext)?;
        if file_holds(&path, public_id, &record) {
            report.already_present += 1;
        } else {
            report.conflict(
                Location::Path(path),
                format!("public id {public_id} under key handle {kh}: the file holds another AEAD; left unchanged"),
            );
        }
        return Ok(());
    }
    let record = hsm.import_aead(kh.key_handle, nonce, plaintext)?;
    match out.write(kh, public_id, &record) {
        Ok(_) => report.added += 1,
        Err(hsm::Error::AlreadyExists(p)) => {
            report.conflict(
                Location::Path(p),
                format!("public id {public_id} under key handle {kh}: a file appeared meanwhile; left unchanged"),
            );
        }
        Err(e) => report.error(Location::Path(path), format!("cannot write: {e}")),
    }
    Ok(())
}

/// Does the AEAD file at `path` mean `record`? (v0, v1, CRLF marker alike.)
fn file_holds(path: &Path, public_id: &PublicId, record: &AeadRecord) -> bool {
    path.metadata().is_ok_and(|m| m.len() <= MAX_AEAD_FILE)
        && fs::read(path)
            .ok()
            .and_then(|bytes| AeadFile::parse(&bytes).ok())
            .and_then(|file| file.resolve(record.key_handle, public_id).ok())
            .is_some_and(|existing| existing == *record)
}

/// Which public ids a [`DecryptAead`] run visits. Empty: all.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PublicIdFilter {
    /// Only these public ids (if not empty).
    pub ids: Vec<PublicId>,
    /// Only public ids whose number is at least this (pyhsm's
    /// `--start-public-id`).
    pub start: Option<u64>,
    /// Only public ids whose number is at most this (pyhsm's
    /// `--stop-public-id`).
    pub stop: Option<u64>,
}

impl PublicIdFilter {
    /// Is `id` wanted?
    #[must_use]
    pub fn matches(&self, id: &PublicId) -> bool {
        let n = id.to_number();
        (self.ids.is_empty() || self.ids.contains(id)) && self.start.is_none_or(|s| n >= s) && self.stop.is_none_or(|s| n <= s)
    }
}

/// A public id as a number, from a decimal number or a modhex id (as
/// pyhsm's `--start-public-id` and `--stop-public-id` take it).
pub fn parse_public_id_number(s: &str) -> Result<u64, String> {
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        return s.parse().map_err(|e| format!("{s:?}: {e}"));
    }
    PublicId::from_modhex(s).map(|id| id.to_number()).map_err(|e| format!("{s:?} is neither a number nor a modhex id: {e}"))
}

/// The output of [`decrypt_aead`], as pyhsm's `yhsm-decrypt-aead --format`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// One line per YubiKey, `<modhex public id>,<key hex><uid hex>`: the
    /// 22-byte AEAD plaintext (AES key then private id) in hex.
    Raw,
    /// Re-wrap each secret under another key handle (key rotation) into a
    /// new AEAD directory; no plaintext is written anywhere.
    Aead,
    /// pyhsm's YubiKey personalisation CSV:
    /// `n,<modhex public id>,<uid hex>,<key hex>,000000000000,,,,,,`.
    YubikeyCsv,
}

/// A `decrypt-aead` run.
#[derive(Clone, Debug)]
pub struct DecryptAead {
    /// The pyhsm-layout AEAD directory to read.
    pub aead_dir: PathBuf,
    /// The key handle whose AEADs are read, as typed: its directory below
    /// `aead_dir` is the typed name if it exists, else the canonical hex,
    /// else decimal. It needs the `export` flag.
    pub key_handle: KeyHandleDir,
    /// Which public ids.
    pub filter: PublicIdFilter,
    /// What to produce.
    pub format: Format,
    /// [`Format::Raw`] and [`Format::YubikeyCsv`]: the new file to write
    /// (mode 0600; an existing file or symbolic link is refused).
    pub output: Option<PathBuf>,
    /// [`Format::Aead`]: the key handle to re-wrap under.
    pub rewrap_to: Option<KeyHandleDir>,
    /// [`Format::Aead`]: the AEAD directory to write.
    pub out: Option<PathBuf>,
    /// [`Format::Aead`]: nonces of the new AEADs.
    pub nonce: NoncePolicy,
    /// Stop at the first bad entry instead of skipping it.
    pub fail_fast: bool,
}

impl DecryptAead {
    /// Check the arguments without touching the module: the right outputs
    /// for the format, an input directory, no existing output file.
    pub fn validate(&self) -> Result<(), MigrateError> {
        let usage = |m: &str| Err(MigrateError::Usage(m.to_owned()));
        if !self.aead_dir.is_dir() {
            return Err(MigrateError::Usage(format!("{} is not a directory", self.aead_dir.display())));
        }
        match self.format {
            Format::Aead => {
                let Some(to) = &self.rewrap_to else { return usage("--format aead needs --rewrap-to KH") };
                if self.out.is_none() {
                    return usage("--format aead needs --out DIR");
                }
                if self.output.is_some() {
                    return usage("--format aead writes no plaintext file: --output is not allowed");
                }
                if to.key_handle == self.key_handle.key_handle {
                    return usage("--rewrap-to must name another key handle than --key-handle");
                }
            }
            Format::Raw | Format::YubikeyCsv => {
                let Some(output) = &self.output else {
                    return usage("--format raw and yubikey-csv write plaintext secrets only to a new file: give --output FILE");
                };
                if self.rewrap_to.is_some() || self.out.is_some() {
                    return usage("--rewrap-to and --out go with --format aead only");
                }
                if output.as_os_str() == "-" {
                    return usage("plaintext secrets are never written to stdout: give --output FILE, a new file");
                }
                if output.symlink_metadata().is_ok() {
                    return Err(MigrateError::Usage(format!(
                        "{} exists already (or is a symbolic link); plaintext secrets are only written to a new file",
                        output.display()
                    )));
                }
            }
        }
        Ok(())
    }
}

/// Check that `kh` exists and carries the `export` flag, which decrypting
/// an AEAD needs.
pub fn check_export_handle(hsm: &dyn SecurityModule, kh: &KeyHandleDir) -> Result<(), MigrateError> {
    let info = hsm.key_handles()?.into_iter().find(|h| h.key_handle == kh.key_handle).ok_or(hsm::Error::UnknownKeyHandle(kh.key_handle))?;
    if !info.flags.contains(Flags::EXPORT) {
        return Err(hsm::Error::NotPermitted { key_handle: kh.key_handle, operation: "decrypt AEADs", needs: Flags::EXPORT }.into());
    }
    Ok(())
}

/// Decrypt the AEADs of `run.key_handle` in `run.aead_dir` inside the
/// module ([`SecurityModule::decrypt_aead`], which needs the handle's
/// `export` flag), as pyhsm's `yhsm-decrypt-aead` does in software:
///
/// - [`Format::Raw`], [`Format::YubikeyCsv`]: write one line per YubiKey to
///   `run.output`, a new file (mode 0600, written under a temporary name and
///   linked into place only when complete, never replacing anything). Lines
///   of the CSV are numbered from 1 in the order visited (directory names
///   sorted). Plaintext goes through zeroized buffers only.
/// - [`Format::Aead`]: key rotation. Each plaintext is wrapped again with
///   [`SecurityModule::import_aead`] under `run.rewrap_to` (nonce per
///   `run.nonce`) and written to `run.out`; nothing else is written.
///
/// Files whose names are not modhex public ids are skipped, as pyhsm does;
/// hidden files too. A garbled file, one that fails its integrity check or
/// does not hold a YubiKey secret is an error with its path. In the report,
/// `added` counts lines or AEAD files written. Zero matching AEADs is an
/// error (nothing is written).
pub fn decrypt_aead(hsm: &dyn SecurityModule, run: &DecryptAead, progress: &ProgressBar) -> Result<ImportReport, MigrateError> {
    run.validate()?;
    check_export_handle(hsm, &run.key_handle)?;
    let base = key_handle_dir(&run.aead_dir, &run.key_handle)?;
    let mut report = ImportReport::default();
    match run.format {
        Format::Aead => {
            let (Some(to), Some(out)) = (&run.rewrap_to, &run.out) else {
                return Err(MigrateError::Usage("--format aead needs --rewrap-to and --out".to_owned()));
            };
            check_import_handle(hsm, to.key_handle, run.nonce)?;
            let out = AeadDir::new(out);
            let mut found = 0u64;
            walk(&base, run, &mut report, progress, |public_id, record, path, report| {
                let Some(plain) = open_secret(hsm, &record, path, report)? else { return Ok(()) };
                found += 1;
                let Some(nonce) = nonce_for(run.nonce, &public_id, &Location::Path(path.to_path_buf()), report) else {
                    return Ok(());
                };
                store_aead(hsm, &out, to, &public_id, nonce, &plain[..], report)
            })?;
            nothing_found(found, &report, run)?;
        }
        Format::Raw | Format::YubikeyCsv => {
            let Some(output) = &run.output else {
                return Err(MigrateError::Usage("give --output FILE".to_owned()));
            };
            let format = match run.format {
                Format::YubikeyCsv => OutputFormat::YubikeyCsv,
                _ => OutputFormat::Raw,
            };
            let mut file = SecretsFile::create(output, format)?;
            let mut n = 0u64;
            let written = walk(&base, run, &mut report, progress, |public_id, record, path, report| {
                let Some(plain) = open_secret(hsm, &record, path, report)? else { return Ok(()) };
                n += 1;
                let secrets = YubiKeySecrets::from_plaintext(&plain).map_err(|e| MigrateError::Module(hsm::Error::AeadInvalid(e)))?;
                file.write(n, &public_id, &secrets)?;
                report.added += 1;
                Ok(())
            })
            .and_then(|()| nothing_found(n, &report, run));
            match written {
                // A run that failed leaves no plaintext file behind.
                Err(e) => {
                    file.discard();
                    return Err(e);
                }
                Ok(()) => {
                    file.finish()?;
                }
            }
        }
    }
    Ok(report)
}

fn nothing_found(found: u64, report: &ImportReport, run: &DecryptAead) -> Result<(), MigrateError> {
    if found == 0 && report.errors == 0 {
        return Err(MigrateError::Usage(format!(
            "no AEAD of key handle {} in {} matches; nothing written",
            run.key_handle,
            run.aead_dir.display()
        )));
    }
    Ok(())
}

/// Decrypt one record in the module. A verdict on the entry (integrity,
/// not a YubiKey secret) is an error in `report` and `None`; a module
/// failure stops the run.
fn open_secret(
    hsm: &dyn SecurityModule,
    record: &AeadRecord,
    path: &Path,
    report: &mut ImportReport,
) -> Result<Option<Zeroizing<Vec<u8>>>, MigrateError> {
    let plain = match hsm.decrypt_aead(record) {
        Ok(p) => p,
        Err(e) if e.is_backend_failure() => return Err(e.into()),
        Err(e) => {
            report.error(Location::Path(path.to_path_buf()), e.to_string());
            return Ok(None);
        }
    };
    if let Err(e) = YubiKeySecrets::from_plaintext(&plain) {
        report.error(Location::Path(path.to_path_buf()), format!("not a YubiKey secrets AEAD: {e}"));
        return Ok(None);
    }
    Ok(Some(plain))
}

/// The directory of `kh` below `base`: the typed name, the canonical hex
/// or decimal, whichever exists first.
fn key_handle_dir(base: &Path, kh: &KeyHandleDir) -> Result<PathBuf, MigrateError> {
    let names = key_handle_dir_names(kh.typed.as_deref(), kh.key_handle);
    names.iter().map(|n| base.join(n)).find(|p| p.symlink_metadata().is_ok_and(|m| m.is_dir())).ok_or_else(|| {
        MigrateError::Usage(format!("{} holds no directory for key handle {kh} (looked for {})", base.display(), names.join(", ")))
    })
}

/// Entries of a directory, sorted by name.
fn sorted_entries(dir: &Path) -> std::io::Result<Vec<fs::DirEntry>> {
    let mut entries = fs::read_dir(dir)?.collect::<std::io::Result<Vec<_>>>()?;
    entries.sort_by_key(fs::DirEntry::file_name);
    Ok(entries)
}

/// Visit every AEAD file below `base` (one key handle's directory) whose
/// public id passes the filter, depth first in name order, without
/// recursion. Memory is bounded by the directory fan-out, not the count.
fn walk(
    base: &Path,
    run: &DecryptAead,
    report: &mut ImportReport,
    progress: &ProgressBar,
    mut visit: impl FnMut(PublicId, AeadRecord, &Path, &mut ImportReport) -> Result<(), MigrateError>,
) -> Result<(), MigrateError> {
    let stop = |report: &ImportReport| -> Result<(), MigrateError> {
        match report.issues.first() {
            Some(issue) if run.fail_fast => Err(MigrateError::Stopped(issue.to_string())),
            _ => Ok(()),
        }
    };
    let mut stack = vec![base.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let entries = match sorted_entries(&dir) {
            Ok(e) => e,
            Err(e) if dir == base => return Err(io(base)(e)),
            Err(e) => {
                report.error(Location::Path(dir), format!("cannot read directory: {e}"));
                stop(report)?;
                continue;
            }
        };
        let mut subdirs = Vec::new();
        for entry in entries {
            let path = entry.path();
            let name = entry.file_name();
            if name.as_encoded_bytes().first() == Some(&b'.') {
                report.skipped += 1;
                continue;
            }
            // Follows symbolic links, so that links to files work and links
            // to directories can be refused.
            let meta = match fs::metadata(&path) {
                Ok(m) => m,
                Err(e) => {
                    report.error(Location::Path(path), format!("cannot read: {e}"));
                    stop(report)?;
                    continue;
                }
            };
            let is_link = entry.file_type().is_ok_and(|t| t.is_symlink());
            if meta.is_dir() && !is_link {
                subdirs.push(path);
                continue;
            }
            let Some(public_id) = name.to_str().and_then(|n| PublicId::from_modhex(n).ok()) else {
                // pyhsm ignores files whose names are not modhex.
                report.skipped += 1;
                continue;
            };
            if !run.filter.matches(&public_id) {
                continue;
            }
            progress.inc(1);
            match read_record(&path, &meta, &public_id, &run.key_handle) {
                Ok(record) => visit(public_id, record, &path, report)?,
                Err(reason) => report.error(Location::Path(path), reason),
            }
            stop(report)?;
        }
        stack.extend(subdirs.into_iter().rev());
    }
    Ok(())
}

/// Read one AEAD file; `Err` says why it is unusable.
fn read_record(path: &Path, meta: &fs::Metadata, public_id: &PublicId, kh: &KeyHandleDir) -> Result<AeadRecord, String> {
    if meta.is_dir() {
        return Err("symbolic link to a directory: not followed".to_owned());
    }
    if !meta.is_file() {
        return Err("not a regular file".to_owned());
    }
    if meta.len() > MAX_AEAD_FILE {
        return Err(format!("{} bytes is too large for an AEAD file", meta.len()));
    }
    let bytes = fs::read(path).map_err(|e| format!("cannot read: {e}"))?;
    let file = AeadFile::parse(&bytes).map_err(|e| format!("not an AEAD file: {e}"))?;
    file.resolve(kh.key_handle, public_id).map_err(|e| e.to_string())
}

/// Write a report's issues and notes to `err` (for stderr), one a line.
pub fn write_issues(report: &ImportReport, err: &mut dyn Write) -> std::io::Result<()> {
    for issue in &report.issues {
        writeln!(err, "{issue}")?;
    }
    if report.issues_not_kept() > 0 {
        writeln!(err, "… and {} more conflicts and errors", report.issues_not_kept())?;
    }
    if report.skipped > 0 {
        writeln!(err, "note: skipped {} entries (public id 0, hidden files, names that are not modhex public ids)", report.skipped)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters() {
        let id = |n| PublicId::from_number(n, 6).unwrap();
        let all = PublicIdFilter::default();
        assert!(all.matches(&id(1)));
        let range = PublicIdFilter { start: Some(2), stop: Some(3), ..PublicIdFilter::default() };
        assert!(!range.matches(&id(1)) && range.matches(&id(2)) && range.matches(&id(3)) && !range.matches(&id(4)));
        let some = PublicIdFilter { ids: vec![id(5)], ..PublicIdFilter::default() };
        assert!(some.matches(&id(5)) && !some.matches(&id(6)));
        assert_eq!(parse_public_id_number("cccccccccccd"), Ok(2));
        assert_eq!(parse_public_id_number("17"), Ok(17));
        assert!(parse_public_id_number("xyz").is_err());
    }
}
