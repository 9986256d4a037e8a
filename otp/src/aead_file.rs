//! pyhsm's AEAD files and directory layout.
//!
//! **v1** (pyhsm ≥ 1.0.4): `"YubiHSM AEAD\n"` (13 bytes; `"\r\n"` accepted
//! on read, as Windows pyhsm wrote it), version byte `0x01`, key handle
//! (LE32), nonce (6 bytes), then the AEAD. A YubiKey AEAD file is 54 bytes.
//!
//! **v0**: raw AEAD bytes only. The nonce then comes from the public id in
//! the file name and the key handle from the directory or the command line.
//!
//! **Layout**: `<dir>/<key handle>/<every 2-character pair of the modhex
//! id>/<id>`, e.g. `aeads/0x20/cc/bb/dd/ee/ff/cc/ccbbddeeffcc`. pyhsm names
//! the key-handle directory exactly as typed on its command line, so readers
//! should try the typed form and the canonical forms; see
//! [`key_handle_dir_names`].
//!
//! Only path *names* are built here; reading and writing is the caller's.

use std::path::PathBuf;

use crate::{Aead, AeadNonce, Error, KeyHandle, PublicId};

/// The v1 marker.
pub const MAGIC: &[u8] = b"YubiHSM AEAD\n";
/// The v1 marker as Windows pyhsm (≤ 1.1.1) wrote it.
pub const MAGIC_CRLF: &[u8] = b"YubiHSM AEAD\r\n";
/// The only known version byte.
pub const VERSION_1: u8 = 1;

/// An AEAD with everything needed to open it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AeadRecord {
    /// Key handle the AEAD is bound to.
    pub key_handle: KeyHandle,
    /// The 6-byte nonce.
    pub nonce: AeadNonce,
    /// The blob.
    pub aead: Aead,
}

impl AeadRecord {
    /// Encode as a v1 file.
    #[must_use]
    pub fn to_v1_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(MAGIC.len() + 1 + 4 + 6 + self.aead.len());
        out.extend_from_slice(MAGIC);
        out.push(VERSION_1);
        out.extend_from_slice(&self.key_handle.get().to_le_bytes());
        out.extend_from_slice(self.nonce.as_bytes());
        out.extend_from_slice(self.aead.as_bytes());
        out
    }
}

/// A parsed AEAD file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AeadFile {
    /// A v0 file: the AEAD only.
    V0(Aead),
    /// A v1 file: key handle, nonce and AEAD.
    V1(AeadRecord),
}

impl AeadFile {
    /// Parse file contents.
    pub fn parse(bytes: &[u8]) -> Result<Self, Error> {
        let header = if bytes.starts_with(MAGIC) {
            Some(MAGIC.len())
        } else if bytes.starts_with(MAGIC_CRLF) {
            Some(MAGIC_CRLF.len())
        } else {
            None
        };
        let Some(at) = header else {
            // A prefix of the marker is a truncated v1 file, not a v0 AEAD.
            if !bytes.is_empty() && (MAGIC.starts_with(bytes) || MAGIC_CRLF.starts_with(bytes)) {
                return Err(Error::FileTruncated { len: bytes.len() });
            }
            return Aead::from_slice(bytes).map(Self::V0);
        };
        let rest = &bytes[at..];
        let Some((&version, rest)) = rest.split_first() else {
            return Err(Error::FileTruncated { len: bytes.len() });
        };
        if version != VERSION_1 {
            return Err(Error::FileVersion(version));
        }
        if rest.len() < 4 + 6 {
            return Err(Error::FileTruncated { len: bytes.len() });
        }
        let kh = KeyHandle::new(u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]));
        let nonce = AeadNonce::from_slice(&rest[4..10])?;
        let aead = Aead::from_slice(&rest[10..])?;
        Ok(Self::V1(AeadRecord { key_handle: kh, nonce, aead }))
    }

    /// Fill in what a v0 file lacks: the key handle it was found under and
    /// the nonce from its public id. A v1 file must name the same key handle.
    pub fn resolve(self, key_handle: KeyHandle, public_id: &PublicId) -> Result<AeadRecord, ResolveError> {
        match self {
            Self::V0(aead) => Ok(AeadRecord { key_handle, nonce: public_id.aead_nonce()?, aead }),
            Self::V1(rec) if rec.key_handle == key_handle => Ok(rec),
            Self::V1(rec) => Err(ResolveError::KeyHandleMismatch { expected: key_handle, found: rec.key_handle }),
        }
    }
}

/// Why an AEAD file could not be resolved into a record.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ResolveError {
    /// A v1 file names another key handle than the one it was looked up for.
    #[error("AEAD file is for key handle {found}, not {expected}")]
    KeyHandleMismatch {
        /// The key handle asked for.
        expected: KeyHandle,
        /// The key handle in the file.
        found: KeyHandle,
    },
    /// The public id cannot form a nonce.
    #[error(transparent)]
    Format(#[from] Error),
}

/// The path of an AEAD below the base directory: `<kh_dir>/<pairs…>/<id>`.
#[must_use]
pub fn relative_path(kh_dir: &str, public_id: &PublicId) -> PathBuf {
    let id = public_id.to_modhex();
    let mut p = PathBuf::from(kh_dir);
    for pair in id.as_bytes().chunks(2) {
        // Modhex is ASCII, so every chunk is valid UTF-8.
        p.push(std::str::from_utf8(pair).unwrap_or("_"));
    }
    p.push(id);
    p
}

/// Directory names under which a key handle's AEADs may be found: the form
/// the operator typed first, then the canonical hex (`0x20`, as written by
/// this appliance and by `yhsm-db-export`), then decimal. No duplicates.
#[must_use]
pub fn key_handle_dir_names(typed: Option<&str>, kh: KeyHandle) -> Vec<String> {
    let mut names: Vec<String> = Vec::with_capacity(3);
    for name in typed.map(str::to_owned).into_iter().chain([kh.canonical(), kh.get().to_string()]) {
        if !names.contains(&name) {
            names.push(name);
        }
    }
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vector5() -> AeadRecord {
        AeadRecord {
            key_handle: KeyHandle::new(1),
            nonce: AeadNonce::new([0, 0, 0, 0, 0, 1]),
            aead: Aead::from_slice(&hex::decode("e3a7c01981220c1488d5e703607ca4b385652043735807924551c4463d75").unwrap()).unwrap(),
        }
    }

    #[test]
    fn v1_reference_bytes() {
        let bytes = vector5().to_v1_bytes();
        assert_eq!(
            hex::encode(&bytes),
            "5975626948534d20414541440a0101000000000000000001e3a7c01981220c1488d5e703607ca4b385652043735807924551c4463d75"
        );
        assert_eq!(bytes.len(), 54);
        assert_eq!(AeadFile::parse(&bytes).unwrap(), AeadFile::V1(vector5()));
    }

    #[test]
    fn crlf_marker_and_v0() {
        let mut crlf = MAGIC_CRLF.to_vec();
        crlf.extend_from_slice(&vector5().to_v1_bytes()[MAGIC.len()..]);
        assert_eq!(AeadFile::parse(&crlf).unwrap(), AeadFile::V1(vector5()));
        let v0 = AeadFile::parse(vector5().aead.as_bytes()).unwrap();
        let id = PublicId::from_modhex("cccccccccccb").unwrap();
        assert_eq!(v0.resolve(KeyHandle::new(1), &id).unwrap(), vector5());
    }

    #[test]
    fn bad_files() {
        let good = vector5().to_v1_bytes();
        assert_eq!(AeadFile::parse(&good[..13]), Err(Error::FileTruncated { len: 13 }));
        assert_eq!(AeadFile::parse(&good[..5]), Err(Error::FileTruncated { len: 5 }));
        assert_eq!(AeadFile::parse(&good[..20]), Err(Error::FileTruncated { len: 20 }));
        assert!(matches!(AeadFile::parse(&good[..30]), Err(Error::Length { .. })));
        let mut v2 = good.clone();
        v2[13] = 2;
        assert_eq!(AeadFile::parse(&v2), Err(Error::FileVersion(2)));
        assert!(AeadFile::parse(&[]).is_err());
        assert!(AeadFile::parse(&[0u8; 200]).is_err());
        let id = PublicId::from_modhex("cccccccccccb").unwrap();
        assert_eq!(
            AeadFile::V1(vector5()).resolve(KeyHandle::new(2), &id),
            Err(ResolveError::KeyHandleMismatch { expected: KeyHandle::new(2), found: KeyHandle::new(1) })
        );
    }

    #[test]
    fn layout() {
        let id = PublicId::from_modhex("ccbbddeeffcc").unwrap();
        assert_eq!(relative_path("0x20", &id), PathBuf::from("0x20/cc/bb/dd/ee/ff/cc/ccbbddeeffcc"));
        assert_eq!(key_handle_dir_names(Some("32"), KeyHandle::new(32)), vec!["32", "0x20"]);
        assert_eq!(key_handle_dir_names(Some("000032"), KeyHandle::new(32)), vec!["000032", "0x20", "32"]);
        assert_eq!(key_handle_dir_names(None, KeyHandle::new(32)), vec!["0x20", "32"]);
    }
}
