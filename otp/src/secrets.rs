//! The YubiKey secrets: the AES-128 OTP key and the 6-byte private id.
//!
//! They travel as the 22-byte plaintext `key(16) ‖ uid(6)` of a YubiHSM
//! `YSM_YUBIKEY_SECRETS` AEAD. Both halves are secret: they zeroize on drop
//! and print as `REDACTED`.

use std::fmt;

use aes::cipher::KeyInit;
use subtle::ConstantTimeEq;
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use crate::Error;

/// Length of the secrets plaintext.
pub const SECRETS_LEN: usize = 22;

/// A YubiKey's AES-128 OTP key.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct YubiKeyKey([u8; 16]);

impl YubiKeyKey {
    /// Wrap 16 key bytes.
    #[must_use]
    pub fn new(bytes: [u8; 16]) -> Self {
        Self(bytes)
    }

    /// Build from a slice that must be 16 bytes long.
    pub fn from_slice(bytes: &[u8]) -> Result<Self, Error> {
        let arr: [u8; 16] = bytes.try_into().map_err(|_| Error::length("YubiKey AES key", "16", bytes.len()))?;
        Ok(Self(arr))
    }

    /// Parse 32 hex digits.
    pub fn from_hex(text: &str) -> Result<Self, Error> {
        let bytes = Zeroizing::new(hex::decode(text.trim()).map_err(|e| Error::Hex(e.to_string()))?);
        Self::from_slice(&bytes)
    }

    /// The key bytes. Handle with care.
    #[must_use]
    pub fn expose(&self) -> &[u8; 16] {
        &self.0
    }

    /// The key schedule for encrypting or decrypting tokens.
    pub(crate) fn cipher(&self) -> aes::Aes128 {
        aes::Aes128::new(&self.0.into())
    }
}

impl fmt::Debug for YubiKeyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("YubiKeyKey(REDACTED)")
    }
}

/// A YubiKey's private id (`uid`), the 6 bytes inside every token.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct PrivateId([u8; 6]);

impl PrivateId {
    /// Wrap 6 bytes.
    #[must_use]
    pub fn new(bytes: [u8; 6]) -> Self {
        Self(bytes)
    }

    /// Build from a slice of at most 6 bytes, right-padded with zeros as
    /// pyhsm's `YHSM_YubiKeySecret` does.
    pub fn from_slice_padded(bytes: &[u8]) -> Result<Self, Error> {
        if bytes.len() > 6 {
            return Err(Error::length("private id (uid)", "at most 6", bytes.len()));
        }
        let mut arr = [0u8; 6];
        arr[..bytes.len()].copy_from_slice(bytes);
        Ok(Self(arr))
    }

    /// Parse up to 12 hex digits.
    pub fn from_hex(text: &str) -> Result<Self, Error> {
        let bytes = Zeroizing::new(hex::decode(text.trim()).map_err(|e| Error::Hex(e.to_string()))?);
        Self::from_slice_padded(&bytes)
    }

    /// The bytes. Handle with care.
    #[must_use]
    pub fn expose(&self) -> &[u8; 6] {
        &self.0
    }

    /// Constant-time comparison.
    #[must_use]
    pub fn ct_eq(&self, other: &[u8; 6]) -> bool {
        self.0.ct_eq(other).into()
    }
}

impl fmt::Debug for PrivateId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PrivateId(REDACTED)")
    }
}

/// The secrets of one YubiKey: the plaintext of its AEAD.
#[derive(Clone, Debug)]
pub struct YubiKeySecrets {
    /// The AES-128 OTP key.
    pub key: YubiKeyKey,
    /// The private id.
    pub uid: PrivateId,
}

impl YubiKeySecrets {
    /// Parse the 22-byte AEAD plaintext `key(16) ‖ uid(6)`.
    pub fn from_plaintext(bytes: &[u8]) -> Result<Self, Error> {
        if bytes.len() != SECRETS_LEN {
            return Err(Error::length("YubiKey secrets plaintext", "22", bytes.len()));
        }
        Ok(Self { key: YubiKeyKey::from_slice(&bytes[..16])?, uid: PrivateId::from_slice_padded(&bytes[16..])? })
    }

    /// The 22-byte AEAD plaintext, zeroized on drop.
    #[must_use]
    pub fn to_plaintext(&self) -> Zeroizing<[u8; SECRETS_LEN]> {
        let mut out = Zeroizing::new([0u8; SECRETS_LEN]);
        out[..16].copy_from_slice(self.key.expose());
        out[16..].copy_from_slice(self.uid.expose());
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plaintext_layout_and_redaction() {
        let s = YubiKeySecrets {
            key: YubiKeyKey::from_hex("000102030405060708090a0b0c0d0e0f").unwrap(),
            uid: PrivateId::from_hex("010203040506").unwrap(),
        };
        assert_eq!(hex::encode(*s.to_plaintext()), "000102030405060708090a0b0c0d0e0f010203040506");
        let back = YubiKeySecrets::from_plaintext(&*s.to_plaintext()).unwrap();
        assert_eq!(back.key.expose(), s.key.expose());
        let shown = format!("{s:?}");
        assert!(shown.contains("REDACTED") && !shown.contains("0102"), "{shown}");
        assert!(YubiKeySecrets::from_plaintext(&[0; 21]).is_err());
        assert_eq!(PrivateId::from_hex("0102").unwrap().expose(), &[1, 2, 0, 0, 0, 0]);
        assert!(PrivateId::from_hex("01020304050607").is_err());
        assert!(YubiKeyKey::from_hex("00").is_err());
        assert!(YubiKeyKey::from_hex("zz").is_err());
    }
}
