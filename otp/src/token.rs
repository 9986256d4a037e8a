//! The 16-byte Yubico OTP token.
//!
//! | bytes | field | meaning |
//! |---|---|---|
//! | 0–5 | uid | private id |
//! | 6–7 | counter (LE) | power-up counter; bit 15 set = emitted by caps lock |
//! | 8–9 | timestamp low (LE) | 8 Hz timer, low 16 bits |
//! | 10 | timestamp high | timer, high 8 bits |
//! | 11 | use | touches within this power-up |
//! | 12–13 | rnd (LE) | random |
//! | 14–15 | crc (LE) | complement of the CRC-16 of bytes 0–13 |
//!
//! A [`Token`] can only be made by [`Token::from_plaintext`] (which checks the
//! CRC residue), [`Token::decrypt`] or [`TokenFields::build`] (which computes
//! the CRC), so a `&Token` has always passed its CRC.

use std::fmt;

use aes::cipher::{BlockDecrypt, BlockEncrypt};
use zeroize::{Zeroize, ZeroizeOnDrop};

use crate::counter::Counters;
use crate::crc::{crc16, OK_RESIDUE};
use crate::{Error, PrivateId, TokenCiphertext, YubiKeyKey};

/// Caps-lock flag in the raw counter field.
pub const CAPS_LOCK_BIT: u16 = 0x8000;

/// The fields of a token, for building one (as a YubiKey does).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TokenFields {
    /// Private id.
    pub uid: [u8; 6],
    /// Raw 16-bit counter field, caps-lock bit included.
    pub counter: u16,
    /// Timestamp, low 16 bits.
    pub timestamp_low: u16,
    /// Timestamp, high 8 bits.
    pub timestamp_high: u8,
    /// Session use.
    pub session_use: u8,
    /// Random filler.
    pub rnd: u16,
}

impl TokenFields {
    /// Lay out the fields and append the CRC.
    #[must_use]
    pub fn build(&self) -> Token {
        let mut b = [0u8; 16];
        b[..6].copy_from_slice(&self.uid);
        b[6..8].copy_from_slice(&self.counter.to_le_bytes());
        b[8..10].copy_from_slice(&self.timestamp_low.to_le_bytes());
        b[10] = self.timestamp_high;
        b[11] = self.session_use;
        b[12..14].copy_from_slice(&self.rnd.to_le_bytes());
        let crc = !crc16(&b[..14]);
        b[14..].copy_from_slice(&crc.to_le_bytes());
        Token(b)
    }
}

/// A decrypted token whose CRC is valid. Holds the private id: redacted in
/// `Debug` and zeroized on drop.
#[derive(Clone, PartialEq, Eq, Zeroize, ZeroizeOnDrop)]
pub struct Token([u8; 16]);

impl Token {
    /// Check the CRC residue of a 16-byte plaintext.
    pub fn from_plaintext(bytes: [u8; 16]) -> Result<Self, Error> {
        if crc16(&bytes) != OK_RESIDUE {
            return Err(Error::TokenCrc);
        }
        Ok(Self(bytes))
    }

    /// AES-128-ECB decrypt an OTP token and check its CRC.
    pub fn decrypt(key: &YubiKeyKey, ciphertext: &TokenCiphertext) -> Result<Self, Error> {
        Self::decrypt_with(&key.cipher(), ciphertext)
    }

    /// Decrypt with a ready key schedule.
    pub(crate) fn decrypt_with(cipher: &aes::Aes128, ciphertext: &TokenCiphertext) -> Result<Self, Error> {
        let mut block = (*ciphertext.as_bytes()).into();
        cipher.decrypt_block(&mut block);
        let mut plain: [u8; 16] = block.into();
        let out = Self::from_plaintext(plain);
        plain.zeroize();
        out
    }

    /// AES-128-ECB encrypt the token, as a YubiKey does before typing it.
    #[must_use]
    pub fn encrypt(&self, key: &YubiKeyKey) -> TokenCiphertext {
        let mut block = self.0.into();
        key.cipher().encrypt_block(&mut block);
        TokenCiphertext::new(block.into())
    }

    /// Does the token carry this private id? Constant time.
    #[must_use]
    pub fn uid_matches(&self, uid: &PrivateId) -> bool {
        let mine: [u8; 6] = [self.0[0], self.0[1], self.0[2], self.0[3], self.0[4], self.0[5]];
        uid.ct_eq(&mine)
    }

    /// The private id. Handle with care.
    #[must_use]
    pub fn uid(&self) -> PrivateId {
        PrivateId::new([self.0[0], self.0[1], self.0[2], self.0[3], self.0[4], self.0[5]])
    }

    /// The raw 16-bit counter field, caps-lock bit included.
    #[must_use]
    pub fn raw_counter(&self) -> u16 {
        u16::from_le_bytes([self.0[6], self.0[7]])
    }

    /// Was this OTP emitted by the caps-lock trigger?
    #[must_use]
    pub fn caps_lock(&self) -> bool {
        self.raw_counter() & CAPS_LOCK_BIT != 0
    }

    /// Timestamp, low 16 bits.
    #[must_use]
    pub fn timestamp_low(&self) -> u16 {
        u16::from_le_bytes([self.0[8], self.0[9]])
    }

    /// Timestamp, high 8 bits.
    #[must_use]
    pub fn timestamp_high(&self) -> u8 {
        self.0[10]
    }

    /// The 24-bit 8 Hz timestamp.
    #[must_use]
    pub fn timestamp(&self) -> u32 {
        (u32::from(self.timestamp_high()) << 16) | u32::from(self.timestamp_low())
    }

    /// Session use.
    #[must_use]
    pub fn session_use(&self) -> u8 {
        self.0[11]
    }

    /// Random filler.
    #[must_use]
    pub fn rnd(&self) -> u16 {
        u16::from_le_bytes([self.0[12], self.0[13]])
    }

    /// Stored CRC (the complement of the CRC over bytes 0–13).
    #[must_use]
    pub fn crc(&self) -> u16 {
        u16::from_le_bytes([self.0[14], self.0[15]])
    }

    /// The replay-ordering counters (caps-lock bit dropped).
    #[must_use]
    pub fn counters(&self) -> Counters {
        Counters::from_raw(self.raw_counter(), self.session_use())
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Token")
            .field("uid", &"REDACTED")
            .field("counter", &self.raw_counter())
            .field("timestamp", &self.timestamp())
            .field("session_use", &self.session_use())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key() -> YubiKeyKey {
        YubiKeyKey::from_hex("000102030405060708090a0b0c0d0e0f").unwrap()
    }

    #[test]
    fn builds_libyubikey_vector() {
        let t = TokenFields { uid: [1, 2, 3, 4, 5, 6], counter: 1, timestamp_low: 1, timestamp_high: 1, session_use: 1, rnd: 0 }.build();
        assert_eq!(t.crc(), 0xfe36);
        assert_eq!(t.encrypt(&key()).to_modhex(), "dvgtiblfkbgturecfllberrvkinnctnn");
    }

    #[test]
    fn corrupt_token_fails_crc() {
        let t = TokenFields { uid: [1; 6], counter: 7, ..Default::default() }.build();
        let mut c = *t.encrypt(&key()).as_bytes();
        c[3] ^= 1;
        assert_eq!(Token::decrypt(&key(), &TokenCiphertext::new(c)), Err(Error::TokenCrc));
        let wrong = YubiKeyKey::new([9; 16]);
        assert_eq!(Token::decrypt(&wrong, &t.encrypt(&key())), Err(Error::TokenCrc));
    }

    #[test]
    fn caps_lock_is_explicit() {
        let t = TokenFields { counter: 0x8005, session_use: 3, ..Default::default() }.build();
        assert!(t.caps_lock());
        assert_eq!(t.raw_counter(), 0x8005);
        assert_eq!(t.counters(), Counters::new(5, 3).unwrap());
        assert!(!format!("{t:?}").contains("uid: ["));
    }

    proptest! {
        #[test]
        fn round_trip(uid: [u8; 6], counter: u16, tl: u16, th: u8, u: u8, rnd: u16, k: [u8; 16]) {
            let fields = TokenFields { uid, counter, timestamp_low: tl, timestamp_high: th, session_use: u, rnd };
            let key = YubiKeyKey::new(k);
            let t = Token::decrypt(&key, &fields.build().encrypt(&key)).unwrap();
            prop_assert_eq!(*t.uid().expose(), uid);
            prop_assert_eq!((t.raw_counter(), t.timestamp_low(), t.timestamp_high(), t.session_use(), t.rnd()), (counter, tl, th, u, rnd));
            prop_assert!(t.uid_matches(&PrivateId::new(uid)));
        }
    }
}
