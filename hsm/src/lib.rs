//! The security module: one small, blocking trait and its backends.
//!
//! Every key the appliance relies on lives behind [`SecurityModule`]: the
//! key handles that wrap YubiKey secrets into AEADs (YubiHSM 1 semantics),
//! and three data keys (token, config, value) that encrypt stored secrets at
//! rest, as eduMFA's security module does. Callers see AEADs, counters and
//! ciphertexts; the handle keys never leave the module.
//!
//! The trait is blocking because the real devices (PKCS#11, a YubiHSM on a
//! serial line) have blocking APIs; async servers call it from a blocking
//! pool.
//!
//! Backends: [`soft::SoftHsm`], a password-encrypted keystore file.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod admin;
pub mod cli;
pub mod config;
mod error;
mod flags;
pub mod fsutil;
pub mod password;
pub mod pkcs11;
pub mod signing;
pub mod soft;
pub mod yhsm1;

use std::fmt;

use otp::aead_file::AeadRecord;
use otp::{AeadNonce, KeyHandle, OtpDecode, TokenCiphertext};
use zeroize::Zeroizing;

pub use crate::error::{Error, OtpFault};
pub use crate::flags::Flags;
pub use crate::password::Password;

/// Is the module able to serve requests?
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// Unlocked and working.
    Ready,
    /// Present, but its keys are locked: [`SecurityModule::unlock`] first.
    Locked,
    /// Not usable at the moment (device or file gone, I/O fault).
    NotReady,
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Ready => "ready",
            Self::Locked => "locked",
            Self::NotReady => "not ready",
        })
    }
}

/// Where an AEAD's 6-byte nonce comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NonceSource {
    /// The caller chooses it (for YubiKeys: the public id). Needs the
    /// handle's [`Flags::USER_NONCE`], as on a YubiHSM 1 since firmware 1.0.4.
    Given(AeadNonce),
    /// The module draws a random, non-zero nonce.
    Random,
}

/// The three data keys, separated by purpose (eduMFA's token, config and
/// value keys).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DataKey {
    /// Secrets of tokens.
    Token,
    /// Configuration secrets, such as validation API client keys.
    Config,
    /// Any other stored value.
    Value,
}

impl DataKey {
    /// All purposes, in keystore order.
    pub const ALL: [Self; 3] = [Self::Token, Self::Config, Self::Value];

    /// Lowercase name.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::Token => "token",
            Self::Config => "config",
            Self::Value => "value",
        }
    }

    pub(crate) fn index(self) -> usize {
        match self {
            Self::Token => 0,
            Self::Config => 1,
            Self::Value => 2,
        }
    }
}

/// What may be said about a key handle without revealing its key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HandleInfo {
    /// The handle.
    pub key_handle: KeyHandle,
    /// Its permission flags.
    pub flags: Flags,
    /// AES key size in bits.
    pub key_bits: usize,
}

/// A security module. Implementations enforce each key handle's [`Flags`].
pub trait SecurityModule: Send + Sync + fmt::Debug {
    /// Is the module ready, locked or unavailable?
    fn status(&self) -> Status;

    /// Unlock the module's keys.
    fn unlock(&self, password: &Password) -> Result<(), Error>;

    /// Fill `out` from the module's random generator.
    fn random(&self, out: &mut [u8]) -> Result<(), Error>;

    /// The key handles the module holds.
    fn key_handles(&self) -> Result<Vec<HandleInfo>, Error>;

    /// Generate a new YubiKey secret (AES key and private id) *inside* the
    /// module and return only its AEADs: the same secret wrapped under each
    /// of `handles`, in order (pyhsm's `yhsm-generate-keys`). Each handle
    /// needs [`Flags::BUFFER_AEAD_GENERATE`].
    fn generate_yubikey_aeads(&self, handles: &[KeyHandle], nonce: NonceSource) -> Result<Vec<AeadRecord>, Error>;

    /// Make an AEAD of a secret the caller already holds (imports). Needs
    /// [`Flags::AEAD_GENERATE`], or [`Flags::BUFFER_LOAD`] with
    /// [`Flags::BUFFER_AEAD_GENERATE`].
    fn import_aead(&self, kh: KeyHandle, nonce: NonceSource, plaintext: &[u8]) -> Result<AeadRecord, Error>;

    /// `AEAD_YUBIKEY_OTP_DECODE`: check an OTP token against a YubiKey AEAD
    /// and return its counters. The key and uid stay inside. Needs
    /// [`Flags::OTP_DECODE`].
    fn decode_otp(&self, record: &AeadRecord, otp: &TokenCiphertext) -> Result<OtpDecode, Error>;

    /// Decrypt an AEAD for personalisation output. Needs [`Flags::EXPORT`].
    fn decrypt_aead(&self, record: &AeadRecord) -> Result<Zeroizing<Vec<u8>>, Error>;

    /// Encrypt a value at rest under one of the data keys.
    fn encrypt_value(&self, key: DataKey, plaintext: &[u8]) -> Result<Vec<u8>, Error>;

    /// Decrypt a value made by [`SecurityModule::encrypt_value`] with the same purpose.
    fn decrypt_value(&self, key: DataKey, ciphertext: &[u8]) -> Result<Zeroizing<Vec<u8>>, Error>;
}
