//! Writing secret-bearing files: mode 0600, atomically, durably.
//!
//! A file is written to a temporary name in the same directory (created
//! mode 0600 with `O_EXCL`), fsynced, then moved into place and the
//! directory fsynced. A crash leaves either the old file or the new one,
//! never a partial one; on error the temporary file is removed.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::Error;

/// How [`write_atomic`] treats an existing file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Fail with [`Error::AlreadyExists`] if the target exists.
    CreateNew,
    /// Replace the target.
    Replace,
}

/// Write `bytes` to `path` with mode 0600, atomically.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: Mode) -> Result<(), Error> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path.file_name().ok_or_else(|| Error::InvalidInput(format!("{} is not a file path", path.display())))?;
    let mut suffix = [0u8; 6];
    rand_core::RngCore::try_fill_bytes(&mut rand_core::OsRng, &mut suffix).map_err(|e| Error::Random(e.to_string()))?;
    let tmp = dir.join(format!(".{}.tmp-{}", name.to_string_lossy(), hex::encode(suffix)));
    let result = (|| {
        let mut f = OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp).map_err(|e| Error::io(&tmp, e))?;
        f.write_all(bytes).map_err(|e| Error::io(&tmp, e))?;
        f.sync_all().map_err(|e| Error::io(&tmp, e))?;
        match mode {
            // link(2) fails if the target exists: an atomic no-clobber create.
            Mode::CreateNew => fs::hard_link(&tmp, path).map_err(|e| match e.kind() {
                std::io::ErrorKind::AlreadyExists => Error::AlreadyExists(path.to_path_buf()),
                _ => Error::io(path, e),
            }),
            Mode::Replace => fs::rename(&tmp, path).map_err(|e| Error::io(path, e)),
        }
    })();
    // After a rename the temporary name is gone; otherwise remove it.
    let _ = fs::remove_file(&tmp);
    result?;
    File::open(&dir).and_then(|d| d.sync_all()).map_err(|e| Error::io(&dir, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn creates_0600_and_refuses_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("secret");
        write_atomic(&p, b"one", Mode::CreateNew).unwrap();
        assert_eq!(fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600);
        assert!(matches!(write_atomic(&p, b"two", Mode::CreateNew), Err(Error::AlreadyExists(_))));
        assert_eq!(fs::read(&p).unwrap(), b"one");
        write_atomic(&p, b"three", Mode::Replace).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"three");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1, "no temporary file left behind");
        assert!(write_atomic(&dir.path().join("missing/x"), b"", Mode::Replace).is_err());
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
