//! Exporting the [`AeadStore`] to a pyhsm-layout AEAD directory, as pyhsm's
//! `yhsm-db-export` does: v1 files at `<dir>/0x<hex kh>/<pairs…>/<id>`.
//!
//! Files are written mode 0600, atomically and durably, and never
//! overwritten. Exporting again into the same directory is idempotent: an
//! existing file holding the same AEAD counts as already present, one
//! holding another AEAD as a conflict (and stays as it is).

use std::path::Path;

use indicatif::ProgressBar;
use otp::aead_file::{relative_path, AeadFile, AeadRecord};
use otp::{KeyHandle, PublicId};

use crate::aead_dir::{AeadDir, KeyHandleDir};
use crate::import::{ImportError, ImportReport, Location};
use crate::store::AeadStore;

/// How many rows an export of `handles` (all if empty) will visit, for a
/// progress bar.
pub fn export_size(store: &AeadStore, handles: &[KeyHandle]) -> Result<u64, ImportError> {
    if handles.is_empty() {
        return Ok(store.count()?);
    }
    Ok(store.count_by_key_handle()?.into_iter().filter(|(kh, _)| handles.contains(kh)).map(|(_, n)| n).sum())
}

/// Write every stored AEAD under one of `handles` (all if empty) to `dir`,
/// which is created if needed. In the report, `added` counts files written.
/// A file that cannot be written is an error with its path; the export goes
/// on. The store is read as one consistent snapshot.
pub fn export_aead_dir(store: &AeadStore, dir: &Path, handles: &[KeyHandle], progress: &ProgressBar) -> Result<ImportReport, ImportError> {
    std::fs::create_dir_all(dir).map_err(|source| ImportError::Io { path: dir.to_path_buf(), source })?;
    let out = AeadDir::new(dir);
    let mut report = ImportReport::default();
    store.for_each(|public_id, record| {
        if handles.is_empty() || handles.contains(&record.key_handle) {
            export_one(&out, &public_id, &record, &mut report);
            progress.inc(1);
        }
        Ok::<_, ImportError>(())
    })?;
    Ok(report)
}

fn export_one(out: &AeadDir, public_id: &PublicId, record: &AeadRecord, report: &mut ImportReport) {
    // The canonical `0x…` directory name, as yhsm-db-export writes it.
    let kh = KeyHandleDir::from(record.key_handle);
    let path = out.base().join(relative_path(&kh.write_name(), public_id));
    // Look first, so that a repeated export writes (and fsyncs) nothing;
    // the write itself still refuses to replace a file that appears meanwhile.
    let written =
        if path.symlink_metadata().is_ok() { Err(hsm::Error::AlreadyExists(path.clone())) } else { out.write(&kh, public_id, record) };
    match written {
        Ok(_) => report.added += 1,
        Err(hsm::Error::AlreadyExists(_)) => {
            if holds(&path, public_id, record) {
                report.already_present += 1;
            } else {
                report.conflict(
                    Location::Path(path),
                    format!("public id {public_id} under key handle {}: the file holds another AEAD; left unchanged", record.key_handle),
                );
            }
        }
        Err(e) => report.error(Location::Path(path), format!("cannot write: {e}")),
    }
}

/// Does the file at `path` hold `record`? Compares what the file means, not
/// its bytes: a v0 file or a CRLF marker holding the same AEAD is the same.
fn holds(path: &Path, public_id: &PublicId, record: &AeadRecord) -> bool {
    // An AEAD file is under 100 bytes; do not read anything much larger.
    let small = path.metadata().is_ok_and(|m| m.len() <= 1024);
    small
        .then(|| std::fs::read(path).ok())
        .flatten()
        .and_then(|bytes| AeadFile::parse(&bytes).ok())
        .and_then(|file| file.resolve(record.key_handle, public_id).ok())
        .is_some_and(|existing| existing == *record)
}
