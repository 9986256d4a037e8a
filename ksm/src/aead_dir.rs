//! AEADs in a pyhsm-layout directory: `<dir>/<key handle>/<pairs…>/<id>`.

use std::fmt;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use hsm::fsutil::{write_atomic, Mode};
use otp::aead_file::{key_handle_dir_names, relative_path, AeadFile, AeadRecord};
use otp::{KeyHandle, PublicId};

use crate::{AeadLookup, LookupError};

/// A key handle as the operator typed it. pyhsm names the key-handle
/// directory after the typed string, so `"1"` and `"0x1"` can be different
/// directories; lookups try the typed form, then the canonical ones.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyHandleDir {
    /// The handle.
    pub key_handle: KeyHandle,
    /// The text typed, if any.
    pub typed: Option<String>,
}

impl KeyHandleDir {
    /// The directory name to write under: the typed form (pyhsm's choice),
    /// or the canonical hex.
    #[must_use]
    pub fn write_name(&self) -> String {
        self.typed.clone().unwrap_or_else(|| self.key_handle.canonical())
    }
}

impl From<KeyHandle> for KeyHandleDir {
    fn from(key_handle: KeyHandle) -> Self {
        Self { key_handle, typed: None }
    }
}

impl FromStr for KeyHandleDir {
    type Err = otp::Error;
    fn from_str(s: &str) -> Result<Self, otp::Error> {
        Ok(Self { key_handle: s.parse()?, typed: Some(s.to_owned()) })
    }
}

impl fmt::Display for KeyHandleDir {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.key_handle, f)
    }
}

/// A pyhsm-layout AEAD directory.
#[derive(Clone, Debug)]
pub struct AeadDir {
    base: PathBuf,
}

impl AeadDir {
    /// Use `base` as the directory.
    #[must_use]
    pub fn new(base: impl Into<PathBuf>) -> Self {
        Self { base: base.into() }
    }

    /// The base directory.
    #[must_use]
    pub fn base(&self) -> &Path {
        &self.base
    }

    /// Write a v1 AEAD file for `public_id` (mode 0600, atomic); an
    /// existing file is never overwritten.
    pub fn write(&self, kh: &KeyHandleDir, public_id: &PublicId, record: &AeadRecord) -> Result<PathBuf, hsm::Error> {
        let path = self.base.join(relative_path(&kh.write_name(), public_id));
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| hsm::Error::Io { path: parent.to_path_buf(), source: e })?;
        }
        write_atomic(&path, &record.to_v1_bytes(), Mode::CreateNew)?;
        Ok(path)
    }
}

impl AeadLookup for AeadDir {
    fn lookup(&self, public_id: &PublicId, kh: &KeyHandleDir) -> Result<Option<AeadRecord>, LookupError> {
        for name in key_handle_dir_names(kh.typed.as_deref(), kh.key_handle) {
            let path = self.base.join(relative_path(&name, public_id));
            let bytes = match std::fs::read(&path) {
                Ok(b) => b,
                Err(e) if e.kind() == ErrorKind::NotFound => continue,
                Err(e) => return Err(LookupError(format!("{}: {e}", path.display()))),
            };
            let parsed = AeadFile::parse(&bytes).map_err(|e| LookupError(format!("{}: {e}", path.display())))?;
            let record = parsed.resolve(kh.key_handle, public_id).map_err(|e| LookupError(format!("{}: {e}", path.display())))?;
            return Ok(Some(record));
        }
        Ok(None)
    }
}
