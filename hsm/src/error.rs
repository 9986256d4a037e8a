use std::path::PathBuf;

use otp::KeyHandle;

use crate::Flags;

/// Why an OTP was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OtpFault {
    /// The token's CRC-16 residue was wrong: wrong key or garbled OTP.
    Crc,
    /// The token's private id differs from the AEAD's.
    UidMismatch,
}

/// Errors of the security module.
///
/// [`Error::is_backend_failure`] separates "the module could not decide"
/// (to be reported as `BACKEND_ERROR`) from verdicts on the input.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No key handle with this id.
    #[error("key handle {0} does not exist")]
    UnknownKeyHandle(KeyHandle),
    /// This module cannot do that at all (a YubiHSM 1 creating key
    /// handles, a non-extractable PKCS#11 key leaving its token).
    #[error("{0}")]
    Unsupported(String),
    /// The key handle exists but its flags forbid the operation.
    #[error("key handle {key_handle} is not permitted to {operation} (needs flags {needs})")]
    NotPermitted {
        /// The handle.
        key_handle: KeyHandle,
        /// What was attempted.
        operation: &'static str,
        /// The flags that would allow it.
        needs: Flags,
    },
    /// The AEAD failed its integrity check (tampered, or wrong handle/nonce),
    /// or does not hold what the operation expects.
    #[error("AEAD invalid: {0}")]
    AeadInvalid(otp::Error),
    /// The OTP did not verify against its AEAD.
    #[error("OTP invalid: {}", match .0 { OtpFault::Crc => "CRC check failed", OtpFault::UidMismatch => "private id mismatch" })]
    OtpInvalid(OtpFault),
    /// A value ciphertext failed to decrypt (tampered, or another purpose's).
    #[error("encrypted value is corrupt or belongs to another data key")]
    ValueInvalid,
    /// Malformed input to an operation.
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// A key handle with this id exists already.
    #[error("key handle {0} exists already")]
    DuplicateKeyHandle(KeyHandle),
    /// The module's keys are locked.
    #[error("security module is locked: unlock it with the keystore password")]
    Locked,
    /// The module is not available.
    #[error("security module not ready: {0}")]
    NotReady(String),
    /// The password did not open the keystore (or the file was tampered
    /// with), or the token refused the PIN, or the YubiHSM 1 the master key.
    #[error("wrong password, PIN or master key (or a modified keystore file)")]
    WrongPassword,
    /// The keystore file is not a keystore or is damaged.
    #[error("keystore {path} is corrupt: {reason}")]
    KeystoreCorrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// File already exists.
    #[error("{0} exists already; refusing to overwrite it")]
    AlreadyExists(PathBuf),
    /// An I/O error on a file of the module.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The random generator failed.
    #[error("random generator failed: {0}")]
    Random(String),
}

impl Error {
    /// Could the module not decide? Such errors are `BACKEND_ERROR`, never
    /// `BAD_OTP`.
    #[must_use]
    pub fn is_backend_failure(&self) -> bool {
        matches!(
            self,
            Self::Locked
                | Self::NotReady(_)
                | Self::WrongPassword
                | Self::KeystoreCorrupt { .. }
                | Self::Io { .. }
                | Self::Random(_)
                | Self::UnknownKeyHandle(_)
                | Self::NotPermitted { .. }
                | Self::Unsupported(_)
        )
    }

    /// An I/O failure on `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io { path: path.into(), source }
    }
}

impl From<otp::Error> for Error {
    fn from(e: otp::Error) -> Self {
        match e {
            otp::Error::TokenCrc => Self::OtpInvalid(OtpFault::Crc),
            otp::Error::UidMismatch => Self::OtpInvalid(OtpFault::UidMismatch),
            otp::Error::AeadIntegrity => Self::AeadInvalid(e),
            other => Self::InvalidInput(other.to_string()),
        }
    }
}
