//! The YubiHSM 2 OTP AEAD: 36 bytes, `nonce(6) ‖ CCM ciphertext(22) ‖ MAC(8)`.
//!
//! It is exactly the YubiHSM 1 construction with the key's 4-byte *nonce id*
//! in place of the key handle: `yhsm2 = nonce ‖ yhsm1_aead(kh = nonce_id,
//! nonce)`. So one [`HandleKey`](crate::HandleKey) serves both generations.

use crate::aead::YUBIKEY_AEAD_LEN;
use crate::aead_file::AeadRecord;
use crate::{Aead, AeadNonce, Error, KeyHandle};

/// Length of a YubiHSM 2 OTP AEAD.
pub const LEN: usize = 6 + YUBIKEY_AEAD_LEN;

/// A YubiHSM 2 OTP AEAD.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Yhsm2OtpAead {
    nonce: AeadNonce,
    aead: Aead,
}

impl Yhsm2OtpAead {
    /// Parse the 36-byte form.
    pub fn parse(bytes: &[u8]) -> Result<Self, Error> {
        if bytes.len() != LEN {
            return Err(Error::length("YubiHSM 2 OTP AEAD", "36", bytes.len()));
        }
        Ok(Self { nonce: AeadNonce::from_slice(&bytes[..6])?, aead: Aead::from_slice(&bytes[6..])? })
    }

    /// Wrap a YubiHSM 1 style record whose key handle is the nonce id. The
    /// AEAD must hold YubiKey secrets (30 bytes).
    pub fn from_record(record: &AeadRecord) -> Result<Self, Error> {
        if record.aead.len() != YUBIKEY_AEAD_LEN {
            return Err(Error::length("YubiKey AEAD", "30", record.aead.len()));
        }
        Ok(Self { nonce: record.nonce, aead: record.aead })
    }

    /// The 36 bytes.
    #[must_use]
    pub fn to_bytes(&self) -> [u8; LEN] {
        let mut out = [0u8; LEN];
        out[..6].copy_from_slice(self.nonce.as_bytes());
        out[6..].copy_from_slice(self.aead.as_bytes());
        out
    }

    /// The YubiHSM 1 view under a key whose nonce id is `nonce_id`.
    #[must_use]
    pub fn to_record(&self, nonce_id: u32) -> AeadRecord {
        AeadRecord { key_handle: KeyHandle::new(nonce_id), nonce: self.nonce, aead: self.aead }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_vector() {
        let bytes = hex::decode("000000000001e3a7c01981220c1488d5e703607ca4b385652043735807924551c4463d75").unwrap();
        let a = Yhsm2OtpAead::parse(&bytes).unwrap();
        let rec = a.to_record(1);
        assert_eq!(rec.nonce.as_bytes(), &[0, 0, 0, 0, 0, 1]);
        assert_eq!(Yhsm2OtpAead::from_record(&rec).unwrap().to_bytes().to_vec(), bytes);
        assert!(Yhsm2OtpAead::parse(&bytes[..35]).is_err());
    }
}
