//! `AEAD_YUBIKEY_OTP_DECODE`: check an OTP against a YubiKey's AEAD.
//!
//! This is the YubiHSM 1 command's semantics, done in software for the soft
//! backend and used as the reference for the others:
//! 1. open the AEAD (MAC check) under the key handle and nonce;
//! 2. the plaintext must be 22 bytes: the secrets `key(16) ‖ uid(6)`;
//! 3. AES-128-ECB decrypt the token with that key, check the CRC residue;
//! 4. compare the token's uid with the AEAD's, in constant time;
//! 5. return the counters and timestamp only, never the key or the uid.
//!
//! It is stateless: replay protection belongs to the validation server.

use zeroize::Zeroizing;

use crate::counter::Counters;
use crate::secrets::SECRETS_LEN;
use crate::{Aead, AeadNonce, Error, HandleKey, KeyHandle, Token, TokenCiphertext, YubiKeySecrets};

/// What the module returns for a valid OTP: the YubiHSM response fields.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OtpDecode {
    /// Raw 16-bit power-up counter (`useCtr`), caps-lock bit included.
    pub use_ctr: u16,
    /// Session use (`sessionCtr`).
    pub session_ctr: u8,
    /// Timestamp, high 8 bits.
    pub timestamp_high: u8,
    /// Timestamp, low 16 bits.
    pub timestamp_low: u16,
}

impl OtpDecode {
    /// Take the public fields of a checked token.
    #[must_use]
    pub fn from_token(token: &Token) -> Self {
        Self {
            use_ctr: token.raw_counter(),
            session_ctr: token.session_use(),
            timestamp_high: token.timestamp_high(),
            timestamp_low: token.timestamp_low(),
        }
    }

    /// The replay-ordering counters (caps-lock bit dropped).
    #[must_use]
    pub fn counters(&self) -> Counters {
        Counters::from_raw(self.use_ctr, self.session_ctr)
    }

    /// The 24-bit 8 Hz timestamp.
    #[must_use]
    pub fn timestamp(&self) -> u32 {
        (u32::from(self.timestamp_high) << 16) | u32::from(self.timestamp_low)
    }

    /// The Yubico KSM success line, without newline:
    /// `OK counter=%04x low=%04x high=%02x use=%02x`. The counter is the raw
    /// field, as the PHP KSM and pyhsm print it.
    #[must_use]
    pub fn ksm_line(&self) -> String {
        format!(
            "OK counter={:04x} low={:04x} high={:02x} use={:02x}",
            self.use_ctr, self.timestamp_low, self.timestamp_high, self.session_ctr
        )
    }

    /// Read a KSM success line back: the inverse of [`OtpDecode::ksm_line`].
    /// Hex digits of either case and one trailing `\n` or `\r\n` are accepted
    /// (pyhsm appends one); anything else, `ERR …` lines included, is `None`.
    #[must_use]
    pub fn parse_ksm_line(line: &str) -> Option<Self> {
        fn field<'a>(rest: &'a str, name: &str, width: usize) -> Option<(u16, &'a str)> {
            let rest = rest.strip_prefix(name)?.strip_prefix('=')?;
            let digits = rest.get(..width)?;
            if !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
                return None;
            }
            Some((u16::from_str_radix(digits, 16).ok()?, &rest[width..]))
        }
        let line = line.strip_suffix('\n').map_or(line, |l| l.strip_suffix('\r').unwrap_or(l));
        let (use_ctr, rest) = field(line.strip_prefix("OK ")?, "counter", 4)?;
        let (timestamp_low, rest) = field(rest.strip_prefix(' ')?, "low", 4)?;
        let (high, rest) = field(rest.strip_prefix(' ')?, "high", 2)?;
        let (session, rest) = field(rest.strip_prefix(' ')?, "use", 2)?;
        if !rest.is_empty() {
            return None;
        }
        Some(Self { use_ctr, session_ctr: u8::try_from(session).ok()?, timestamp_high: u8::try_from(high).ok()?, timestamp_low })
    }
}

/// Check `otp` against a YubiKey AEAD, as the YubiHSM does (see module docs).
///
/// Errors: [`Error::AeadIntegrity`] for a tampered AEAD or the wrong
/// key/handle/nonce, [`Error::Length`] if the AEAD does not hold YubiKey
/// secrets, [`Error::TokenCrc`] and [`Error::UidMismatch`] for a bad OTP.
pub fn decode_otp(key: &HandleKey, kh: KeyHandle, nonce: &AeadNonce, aead: &Aead, otp: &TokenCiphertext) -> Result<OtpDecode, Error> {
    if aead.plaintext_len() != SECRETS_LEN {
        return Err(Error::length("YubiKey AEAD", "30", aead.len()));
    }
    let mut plain = Zeroizing::new([0u8; SECRETS_LEN]);
    key.open_into(kh, nonce, aead, &mut plain[..])?;
    let secrets = YubiKeySecrets::from_plaintext(&plain[..])?;
    let token = Token::decrypt(&secrets.key, otp)?;
    if !token.uid_matches(&secrets.uid) {
        return Err(Error::UidMismatch);
    }
    Ok(OtpDecode::from_token(&token))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Otp, PrivateId, YubiKeyKey};

    #[test]
    fn ksm_lines_read_back() {
        for d in [
            OtpDecode { use_ctr: 0x8005, session_ctr: 9, timestamp_high: 0x12, timestamp_low: 0xbeef },
            OtpDecode { use_ctr: 0, session_ctr: 0, timestamp_high: 0, timestamp_low: 0 },
            OtpDecode { use_ctr: 0xffff, session_ctr: 0xff, timestamp_high: 0xff, timestamp_low: 0xffff },
        ] {
            assert_eq!(OtpDecode::parse_ksm_line(&d.ksm_line()), Some(d));
            assert_eq!(OtpDecode::parse_ksm_line(&format!("{}\r\n", d.ksm_line())), Some(d));
        }
        for bad in [
            "ERR Corrupt OTP",
            "OK counter=0001 low=0001 high=01",
            "OK counter=0001 low=0001 high=01 use=01 x",
            "OK counter=+001 low=0001 high=01 use=01",
            "OK counter=0001  low=0001 high=01 use=01",
            "OK counter=0001 low=0001 high=01 use=01\n\n",
            "OK counter=é001 low=0001 high=01 use=01",
            "",
        ] {
            assert_eq!(OtpDecode::parse_ksm_line(bad), None, "{bad:?}");
        }
    }

    /// The full-chain vector of the reference (otp-and-aead.md §6.6).
    #[test]
    fn full_chain_vector() {
        let hk = HandleKey::new(&hex::decode("000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f").unwrap()).unwrap();
        let otp = Otp::parse("cccccccccccbdvgtiblfkbgturecfllberrvkinnctnn").unwrap();
        let aead = Aead::from_slice(&hex::decode("e3a7c01981220c1488d5e703607ca4b385652043735807924551c4463d75").unwrap()).unwrap();
        let nonce = otp.public_id().aead_nonce().unwrap();
        let d = decode_otp(&hk, KeyHandle::new(1), &nonce, &aead, otp.token()).unwrap();
        assert_eq!(d.ksm_line(), "OK counter=0001 low=0001 high=01 use=01");
        assert_eq!(decode_otp(&hk, KeyHandle::new(2), &nonce, &aead, otp.token()), Err(Error::AeadIntegrity));
    }

    #[test]
    fn uid_mismatch() {
        let hk = HandleKey::new(&[3; 32]).unwrap();
        let kh = KeyHandle::new(5);
        let nonce = AeadNonce::new([0, 0, 0, 0, 0, 9]);
        let key = YubiKeyKey::new([4; 16]);
        let secrets = YubiKeySecrets { key: key.clone(), uid: PrivateId::new([1; 6]) };
        let aead = hk.seal(kh, &nonce, &*secrets.to_plaintext()).unwrap();
        let token = crate::token::TokenFields { uid: [2; 6], counter: 1, ..Default::default() }.build();
        assert_eq!(decode_otp(&hk, kh, &nonce, &aead, &token.encrypt(&key)), Err(Error::UidMismatch));
        // A non-YubiKey AEAD is refused before any decryption.
        let other = hk.seal(kh, &nonce, &[0; 16]).unwrap();
        assert!(matches!(decode_otp(&hk, kh, &nonce, &other, &token.encrypt(&key)), Err(Error::Length { .. })));
    }
}
