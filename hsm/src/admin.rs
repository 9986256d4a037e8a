//! The key ceremony's operations: creating, importing and exporting the
//! keys behind key handles.
//!
//! Only modules that make their own keys offer them: the soft keystore and
//! a PKCS#11 token. A YubiHSM 1 takes its key handles in its configuration
//! mode, on its own console, and never gives them back.
//!
//! A key handle is either **exportable** — its key may leave the module
//! once more, for the validation servers' keystore (the personalisation
//! laptop's handles) — or not, and then nothing can take its key out (the
//! servers' handles). A PKCS#11 token enforces the difference
//! (`CKA_EXTRACTABLE`); the soft keystore cannot, as every key it holds is
//! in its file, protected by the file's password alone.

use std::path::Path;

use otp::{HandleKey, KeyHandle};

use crate::soft::format::KdfParams;
use crate::soft::SoftHsm;
use crate::{Error, Flags, HandleInfo, Password, SecurityModule};

/// A key handle's key, taken out of its module for the servers' keystore.
pub type ExportedKey = (KeyHandle, Flags, HandleKey);

/// A security module that creates and holds its own key-handle keys.
pub trait KeyAdmin: SecurityModule {
    /// Create key handle `kh` with a fresh `key_bits` AES key (128, 192 or
    /// 256) drawn from the module's generator. `exportable`: whether
    /// [`KeyAdmin::export_handle_keys`] may take the key out later.
    fn create_handle(&self, kh: KeyHandle, flags: Flags, key_bits: usize, exportable: bool) -> Result<HandleInfo, Error>;

    /// Load known keys (migration from pyhsm or a YubiHSM 1's
    /// configuration, or the servers' keystore), all or nothing; existing
    /// handle ids are refused. The keys are in host memory already: a key
    /// ceremony's step. `exportable` as for [`KeyAdmin::create_handle`]
    /// (the laptop's handles, which the servers get, are).
    fn import_handles(&self, new: &[ExportedKey], exportable: bool) -> Result<(), Error>;

    /// The keys of `handles` with their flags, for the servers' keystore:
    /// the one moment a generated key is in host memory (zeroized on drop).
    /// Refused for a handle that is not exportable.
    fn export_handle_keys(&self, handles: &[KeyHandle]) -> Result<Vec<ExportedKey>, Error>;
}

/// Write a new soft keystore at `path` (mode 0600, refused if it exists)
/// for the validation servers: the keys of `handles` from `module`, each
/// with only [`Flags::OTP_DECODE`], fresh data keys of its own, sealed under
/// `password`. The servers can decode OTPs and nothing else; a server with a
/// token loads the file into it (`keystore import-keystore`).
pub fn export_decode_only(
    module: &dyn KeyAdmin,
    path: &Path,
    password: &Password,
    kdf: KdfParams,
    handles: &[KeyHandle],
) -> Result<Vec<HandleInfo>, Error> {
    kdf.validate().map_err(Error::InvalidInput)?;
    if handles.is_empty() {
        return Err(Error::InvalidInput("name at least one key handle to export".to_owned()));
    }
    if path.exists() {
        return Err(Error::AlreadyExists(path.to_path_buf()));
    }
    // HandleKey zeroizes itself on drop.
    let keys: Vec<ExportedKey> = module.export_handle_keys(handles)?.into_iter().map(|(kh, _, key)| (kh, Flags::OTP_DECODE, key)).collect();
    SoftHsm::create_with_handles(path, password, kdf, &keys)?;
    tracing::info!(path = %path.display(), handles = keys.len(), "exported a decode-only keystore");
    Ok(keys.iter().map(|(kh, flags, key)| HandleInfo { key_handle: *kh, flags: *flags, key_bits: key.bits() }).collect())
}
