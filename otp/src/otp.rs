//! The OTP string a YubiKey types: a public id and a 32-character token.
//!
//! **Case handling.** Modhex has no upper case, but a YubiKey typing with
//! caps lock on, or a user pasting from a form, produces upper-case letters.
//! [`Otp::parse`] accepts ASCII upper case and folds it to lower case, as
//! YK-VAL does; every other character outside the modhex alphabet is an
//! error. Whitespace is not trimmed: an OTP with spaces is malformed.

use std::fmt;
use std::str::FromStr;

use crate::error::write_hex;
use crate::{modhex, AeadNonce, Error};

/// Length of the encrypted token in modhex characters.
pub const TOKEN_CHARS: usize = 32;
/// Longest public id in modhex characters.
pub const MAX_PUBLIC_ID_CHARS: usize = 16;

/// A YubiKey public id: 0 to 8 bytes, usually 6 (12 modhex characters).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PublicId {
    len: u8,
    bytes: [u8; 8],
}

impl PublicId {
    /// Build from raw bytes (at most 8).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, Error> {
        if bytes.len() > 8 {
            return Err(Error::PublicIdLength { len: bytes.len() });
        }
        let mut b = [0u8; 8];
        b[..bytes.len()].copy_from_slice(bytes);
        Ok(Self { len: bytes.len() as u8, bytes: b })
    }

    /// Parse a modhex public id (0 to 16 lowercase characters, even length).
    pub fn from_modhex(text: &str) -> Result<Self, Error> {
        let bytes = modhex::decode(text)?;
        Self::from_bytes(&bytes)
    }

    /// The public id of a sequence number, as pyhsm's `yhsm-generate-keys`
    /// allocates them: the number big-endian in `bytes` bytes.
    pub fn from_number(n: u64, bytes: usize) -> Result<Self, Error> {
        let needed = (64 - n.leading_zeros() as usize).div_ceil(8);
        if bytes > 8 || needed > bytes {
            return Err(Error::PublicIdLength { len: bytes.max(needed) });
        }
        let be = n.to_be_bytes();
        Self::from_bytes(&be[8 - bytes..])
    }

    /// The public id as a big-endian number (the inverse of [`Self::from_number`]).
    #[must_use]
    pub fn to_number(&self) -> u64 {
        self.as_bytes().iter().fold(0u64, |acc, &b| (acc << 8) | u64::from(b))
    }

    /// The raw bytes.
    #[must_use]
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }

    /// The modhex form, as the YubiKey types it.
    #[must_use]
    pub fn to_modhex(&self) -> String {
        modhex::encode(self.as_bytes())
    }

    /// The YubiHSM AEAD nonce for this id: the id right-padded with zeros to
    /// 6 bytes. Ids longer than 6 bytes cannot be used as a nonce.
    pub fn aead_nonce(&self) -> Result<AeadNonce, Error> {
        if self.len > 6 {
            return Err(Error::PublicIdTooLongForNonce { len: usize::from(self.len) });
        }
        let mut n = [0u8; 6];
        n[..usize::from(self.len)].copy_from_slice(self.as_bytes());
        Ok(AeadNonce::new(n))
    }
}

impl fmt::Display for PublicId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_modhex())
    }
}

impl fmt::Debug for PublicId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicId({self})")
    }
}

impl FromStr for PublicId {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        Self::from_modhex(s)
    }
}

/// The 16 AES-encrypted bytes of an OTP token. Not secret on its own.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct TokenCiphertext([u8; 16]);

impl TokenCiphertext {
    /// Wrap 16 bytes.
    #[must_use]
    pub fn new(bytes: [u8; 16]) -> Self {
        Self(bytes)
    }

    /// Build from a slice that must be 16 bytes long.
    pub fn from_slice(bytes: &[u8]) -> Result<Self, Error> {
        let arr: [u8; 16] = bytes.try_into().map_err(|_| Error::length("OTP token", "16", bytes.len()))?;
        Ok(Self(arr))
    }

    /// The bytes.
    #[must_use]
    pub fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }

    /// The 32-character modhex form.
    #[must_use]
    pub fn to_modhex(&self) -> String {
        modhex::encode(&self.0)
    }
}

impl fmt::Debug for TokenCiphertext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TokenCiphertext(")?;
        write_hex(f, &self.0)?;
        f.write_str(")")
    }
}

/// A parsed OTP: public id plus encrypted token.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Otp {
    public_id: PublicId,
    token: TokenCiphertext,
}

impl Otp {
    /// Parse the string a YubiKey typed. See the module docs for case rules.
    pub fn parse(text: &str) -> Result<Self, Error> {
        let len = text.chars().count();
        if !(TOKEN_CHARS..=TOKEN_CHARS + MAX_PUBLIC_ID_CHARS).contains(&len) {
            return Err(Error::OtpLength { len });
        }
        // `len` is in characters; a non-ASCII character makes the byte
        // length differ and is reported by the modhex check below.
        let lower = text.to_ascii_lowercase();
        if let Some((position, found)) = lower.chars().enumerate().find(|(_, c)| !c.is_ascii() || modhex::nibble(*c as u8).is_none()) {
            return Err(Error::ModhexCharacter { position, found });
        }
        let split = lower.len() - TOKEN_CHARS;
        let public_id = PublicId::from_modhex(&lower[..split])?;
        let mut token = [0u8; 16];
        modhex::decode_into(&lower[split..], &mut token)?;
        Ok(Self { public_id, token: TokenCiphertext(token) })
    }

    /// Assemble from parts.
    #[must_use]
    pub fn new(public_id: PublicId, token: TokenCiphertext) -> Self {
        Self { public_id, token }
    }

    /// The public id.
    #[must_use]
    pub fn public_id(&self) -> PublicId {
        self.public_id
    }

    /// The encrypted token.
    #[must_use]
    pub fn token(&self) -> &TokenCiphertext {
        &self.token
    }
}

impl fmt::Display for Otp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", self.public_id, self.token.to_modhex())
    }
}

impl FromStr for Otp {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        Self::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_reference_otp() {
        let otp = Otp::parse("cccccccccccbdvgtiblfkbgturecfllberrvkinnctnn").unwrap();
        assert_eq!(otp.public_id().as_bytes(), &[0, 0, 0, 0, 0, 1]);
        assert_eq!(hex::encode(otp.token().as_bytes()), "2f5d71a4915dec304aa13ccf97bb0dbb");
    }

    #[test]
    fn upper_case_is_folded() {
        let a = Otp::parse("CCCCCCCCCCCBDVGTIBLFKBGTURECFLLBERRVKINNCTNN").unwrap();
        let b = Otp::parse("cccccccccccbdvgtiblfkbgturecfllberrvkinnctnn").unwrap();
        assert_eq!(a, b);
        assert_eq!(a.to_string(), "cccccccccccbdvgtiblfkbgturecfllberrvkinnctnn");
    }

    #[test]
    fn rejects_malformed() {
        assert_eq!(Otp::parse("cccc"), Err(Error::OtpLength { len: 4 }));
        assert_eq!(Otp::parse(&"c".repeat(49)), Err(Error::OtpLength { len: 49 }));
        // 33 characters: a one-character public id cannot be modhex.
        assert_eq!(Otp::parse(&"c".repeat(33)), Err(Error::ModhexOddLength { len: 1 }));
        let mut bad = "c".repeat(44);
        bad.replace_range(40..41, "a");
        assert_eq!(Otp::parse(&bad), Err(Error::ModhexCharacter { position: 40, found: 'a' }));
        let accented = format!("é{}", "c".repeat(43));
        assert_eq!(Otp::parse(&accented), Err(Error::ModhexCharacter { position: 0, found: 'é' }));
        let spaced = format!(" {}", "c".repeat(43));
        assert!(matches!(Otp::parse(&spaced), Err(Error::ModhexCharacter { position: 0, found: ' ' })));
    }

    #[test]
    fn public_id_numbers_and_nonce() {
        let id = PublicId::from_number(1, 6).unwrap();
        assert_eq!(id.to_modhex(), "cccccccccccb");
        assert_eq!(id.to_number(), 1);
        assert_eq!(id.aead_nonce().unwrap().as_bytes(), &[0, 0, 0, 0, 0, 1]);
        assert!(PublicId::from_number(0x1_0000_0000_0000, 6).is_err());
        let short = PublicId::from_modhex("vv").unwrap();
        assert_eq!(short.aead_nonce().unwrap().as_bytes(), &[0xff, 0, 0, 0, 0, 0]);
        let long = PublicId::from_modhex("cccccccccccccccb").unwrap();
        assert_eq!(long.aead_nonce(), Err(Error::PublicIdTooLongForNonce { len: 8 }));
        assert!(PublicId::from_bytes(&[0; 9]).is_err());
    }

    proptest! {
        #[test]
        fn round_trip(id in proptest::collection::vec(any::<u8>(), 0..=8), tok: [u8; 16]) {
            let otp = Otp::new(PublicId::from_bytes(&id).unwrap(), TokenCiphertext::new(tok));
            let text = otp.to_string();
            prop_assert_eq!(Otp::parse(&text).unwrap(), otp);
            prop_assert_eq!(Otp::parse(&text.to_ascii_uppercase()).unwrap(), otp);
        }

        #[test]
        fn parse_never_panics(text in "\\PC{0,50}") {
            let _ = Otp::parse(&text);
        }
    }
}
