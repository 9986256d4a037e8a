//! The YubiHSM 1 AEAD: AES-CCM with an 8-byte MAC, L = 2, no associated data.
//!
//! The 13-byte CCM nonce is `LE32(key handle) ‖ nonce(6) ‖ 00 00 00`, so an
//! AEAD made under one key handle does not open under another, even when the
//! two handles hold the same AES key. For YubiKey AEADs the 6-byte nonce is
//! the public id (right-padded with zeros), unless the AEAD was made with a
//! random nonce, which then travels in the v1 AEAD file.
//!
//! This is plain RFC 3610 CCM: the `ccm` crate computes it, nothing here is
//! hand-rolled.

use std::fmt;
use std::str::FromStr;

use aes::{Aes128, Aes192, Aes256};
use ccm::aead::generic_array::GenericArray;
use ccm::aead::{AeadInPlace, KeyInit};
use ccm::consts::{U13, U8};
use ccm::Ccm;
use zeroize::Zeroizing;

use crate::error::write_hex;
use crate::Error;

/// MAC length of a YubiHSM AEAD.
pub const MAC_LEN: usize = 8;
/// Largest plaintext a YubiHSM 1 seals (`YSM_DATA_BUF_SIZE`).
pub const MAX_PLAINTEXT: usize = 64;
/// Largest AEAD (`YSM_AEAD_MAX_SIZE`).
pub const MAX_AEAD: usize = MAX_PLAINTEXT + MAC_LEN;
/// Length of the AEAD of a YubiKey's secrets (22 + 8).
pub const YUBIKEY_AEAD_LEN: usize = 30;

/// A YubiHSM key handle: a 32-bit identifier of a key inside the module.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyHandle(u32);

impl KeyHandle {
    /// Wrap a number.
    #[must_use]
    pub const fn new(id: u32) -> Self {
        Self(id)
    }

    /// The number.
    #[must_use]
    pub const fn get(self) -> u32 {
        self.0
    }

    /// The canonical text form, `0x` and lowercase hex (as pyhsm's
    /// `yhsm-db-export` names directories).
    #[must_use]
    pub fn canonical(self) -> String {
        format!("{:#x}", self.0)
    }
}

/// Parses pyhsm's key handle syntax: decimal first (so `"1234"` is decimal),
/// then `0x`-prefixed hex, then exactly four ASCII characters read as a
/// little-endian u32 (`"KSM1"` = 0x314d534b).
impl FromStr for KeyHandle {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        let bad = || Error::KeyHandleSyntax(s.to_owned());
        if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
            return s.parse::<u32>().map(Self).map_err(|_| bad());
        }
        if let Some(h) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
            if h.is_empty() || !h.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(bad());
            }
            return u32::from_str_radix(h, 16).map(Self).map_err(|_| bad());
        }
        match s.as_bytes() {
            [a, b, c, d] if s.is_ascii() && s.bytes().all(|x| x.is_ascii_graphic()) => Ok(Self(u32::from_le_bytes([*a, *b, *c, *d]))),
            _ => Err(bad()),
        }
    }
}

impl fmt::Display for KeyHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

impl fmt::Debug for KeyHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyHandle({:#x})", self.0)
    }
}

/// The 6-byte AEAD nonce (for YubiKeys, normally the public id).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct AeadNonce([u8; 6]);

impl AeadNonce {
    /// Wrap 6 bytes.
    #[must_use]
    pub const fn new(bytes: [u8; 6]) -> Self {
        Self(bytes)
    }

    /// Build from a slice that must be 6 bytes long.
    pub fn from_slice(bytes: &[u8]) -> Result<Self, Error> {
        let arr: [u8; 6] = bytes.try_into().map_err(|_| Error::length("AEAD nonce", "6", bytes.len()))?;
        Ok(Self(arr))
    }

    /// The bytes.
    #[must_use]
    pub fn as_bytes(&self) -> &[u8; 6] {
        &self.0
    }

    /// All zero? (On a YubiHSM, a zero nonce asks the module to choose one.)
    #[must_use]
    pub fn is_zero(&self) -> bool {
        self.0 == [0; 6]
    }

    /// The 13-byte CCM nonce `LE32(kh) ‖ nonce ‖ 00 00 00`.
    #[must_use]
    pub fn ccm_nonce(&self, kh: KeyHandle) -> [u8; 13] {
        let mut n = [0u8; 13];
        n[..4].copy_from_slice(&kh.get().to_le_bytes());
        n[4..10].copy_from_slice(&self.0);
        n
    }
}

impl fmt::Debug for AeadNonce {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AeadNonce(")?;
        write_hex(f, &self.0)?;
        f.write_str(")")
    }
}

/// An AEAD blob: CCM ciphertext followed by the 8-byte MAC, 9 to 72 bytes.
/// Not secret (that is the point of it), stored inline without allocation.
#[derive(Clone, Copy)]
pub struct Aead {
    len: u8,
    bytes: [u8; MAX_AEAD],
}

impl Aead {
    /// Build from bytes: 9 to 72 long (1 to 64 bytes of plaintext, plus MAC).
    pub fn from_slice(bytes: &[u8]) -> Result<Self, Error> {
        if !(MAC_LEN + 1..=MAX_AEAD).contains(&bytes.len()) {
            return Err(Error::length("AEAD", "9 to 72", bytes.len()));
        }
        let mut b = [0u8; MAX_AEAD];
        b[..bytes.len()].copy_from_slice(bytes);
        Ok(Self { len: bytes.len() as u8, bytes: b })
    }

    /// The bytes.
    #[must_use]
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }

    /// Length in bytes.
    #[must_use]
    #[allow(clippy::len_without_is_empty, reason = "an AEAD is never empty")]
    pub fn len(&self) -> usize {
        usize::from(self.len)
    }

    /// Length of the plaintext inside.
    #[must_use]
    pub fn plaintext_len(&self) -> usize {
        self.len() - MAC_LEN
    }
}

impl PartialEq for Aead {
    fn eq(&self, other: &Self) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}
impl Eq for Aead {}

impl fmt::Debug for Aead {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Aead(")?;
        write_hex(f, self.as_bytes())?;
        f.write_str(")")
    }
}

#[derive(Clone)]
enum Cipher {
    Aes128(Box<Ccm<Aes128, U8, U13>>),
    Aes192(Box<Ccm<Aes192, U8, U13>>),
    Aes256(Box<Ccm<Aes256, U8, U13>>),
}

/// The AES key behind a key handle, with its key schedule ready.
///
/// Holds secret material: zeroized on drop (the `aes` crate's `zeroize`
/// feature clears the schedule), printed as `REDACTED`.
#[derive(Clone)]
pub struct HandleKey {
    key: Zeroizing<Vec<u8>>,
    cipher: Cipher,
}

impl HandleKey {
    /// Build from a 16-, 24- or 32-byte AES key.
    pub fn new(key: &[u8]) -> Result<Self, Error> {
        let cipher = match key.len() {
            16 => Cipher::Aes128(Box::new(Ccm::new(GenericArray::from_slice(key)))),
            24 => Cipher::Aes192(Box::new(Ccm::new(GenericArray::from_slice(key)))),
            32 => Cipher::Aes256(Box::new(Ccm::new(GenericArray::from_slice(key)))),
            n => return Err(Error::KeySize(n)),
        };
        Ok(Self { key: Zeroizing::new(key.to_vec()), cipher })
    }

    /// The raw key. Handle with care: only keystores serialising it need it.
    #[must_use]
    pub fn expose(&self) -> &[u8] {
        &self.key
    }

    /// Key size in bits.
    #[must_use]
    pub fn bits(&self) -> usize {
        self.key.len() * 8
    }

    /// Seal `plaintext` (1 to 64 bytes) under key handle `kh` and `nonce`.
    pub fn seal(&self, kh: KeyHandle, nonce: &AeadNonce, plaintext: &[u8]) -> Result<Aead, Error> {
        if !(1..=MAX_PLAINTEXT).contains(&plaintext.len()) {
            return Err(Error::length("AEAD plaintext", "1 to 64", plaintext.len()));
        }
        let n = nonce.ccm_nonce(kh);
        let n = GenericArray::from_slice(&n);
        let mut buf = Zeroizing::new([0u8; MAX_AEAD]);
        let len = plaintext.len();
        buf[..len].copy_from_slice(plaintext);
        let tag = match &self.cipher {
            Cipher::Aes128(c) => c.encrypt_in_place_detached(n, &[], &mut buf[..len]),
            Cipher::Aes192(c) => c.encrypt_in_place_detached(n, &[], &mut buf[..len]),
            Cipher::Aes256(c) => c.encrypt_in_place_detached(n, &[], &mut buf[..len]),
        }
        .map_err(|_| Error::length("AEAD plaintext", "1 to 64", len))?;
        buf[len..len + MAC_LEN].copy_from_slice(&tag);
        Aead::from_slice(&buf[..len + MAC_LEN])
    }

    /// Open an AEAD into `out`, which must be exactly its plaintext length.
    /// `out` is left zeroed if the MAC does not verify.
    pub fn open_into(&self, kh: KeyHandle, nonce: &AeadNonce, aead: &Aead, out: &mut [u8]) -> Result<(), Error> {
        let plen = aead.plaintext_len();
        if out.len() != plen {
            return Err(Error::length("AEAD plaintext buffer", "the AEAD's plaintext length", out.len()));
        }
        let n = nonce.ccm_nonce(kh);
        let n = GenericArray::from_slice(&n);
        out.copy_from_slice(&aead.as_bytes()[..plen]);
        let tag = GenericArray::from_slice(&aead.as_bytes()[plen..]);
        // The ccm crate compares the MAC in constant time.
        let ok = match &self.cipher {
            Cipher::Aes128(c) => c.decrypt_in_place_detached(n, &[], out, tag),
            Cipher::Aes192(c) => c.decrypt_in_place_detached(n, &[], out, tag),
            Cipher::Aes256(c) => c.decrypt_in_place_detached(n, &[], out, tag),
        };
        ok.map_err(|_| {
            out.fill(0);
            Error::AeadIntegrity
        })
    }

    /// Open an AEAD, returning its plaintext (zeroized on drop).
    pub fn open(&self, kh: KeyHandle, nonce: &AeadNonce, aead: &Aead) -> Result<Zeroizing<Vec<u8>>, Error> {
        let mut out = Zeroizing::new(vec![0u8; aead.plaintext_len()]);
        self.open_into(kh, nonce, aead, &mut out)?;
        Ok(out)
    }
}

impl fmt::Debug for HandleKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "HandleKey(AES-{}, REDACTED)", self.bits())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_handle_syntax() {
        assert_eq!("8192".parse::<KeyHandle>().unwrap(), KeyHandle::new(8192));
        assert_eq!("0x2000".parse::<KeyHandle>().unwrap(), KeyHandle::new(0x2000));
        assert_eq!("KSM1".parse::<KeyHandle>().unwrap(), KeyHandle::new(0x314d534b));
        assert_eq!("1234".parse::<KeyHandle>().unwrap(), KeyHandle::new(1234));
        for bad in ["", "0x", "0xg1", "-1", "abc", "abcde", "4294967296", "0x100000000", "a b "] {
            assert!(bad.parse::<KeyHandle>().is_err(), "{bad:?}");
        }
        assert_eq!(KeyHandle::new(0x20).canonical(), "0x20");
    }

    #[test]
    fn key_sizes() {
        assert!(HandleKey::new(&[0; 16]).is_ok());
        assert!(HandleKey::new(&[0; 24]).is_ok());
        assert!(HandleKey::new(&[0; 32]).is_ok());
        assert_eq!(HandleKey::new(&[0; 20]).err(), Some(Error::KeySize(20)));
        let k = HandleKey::new(&[7; 32]).unwrap();
        assert_eq!(format!("{k:?}"), "HandleKey(AES-256, REDACTED)");
    }

    #[test]
    fn plaintext_bounds() {
        let k = HandleKey::new(&[1; 32]).unwrap();
        let n = AeadNonce::new([1; 6]);
        assert!(k.seal(KeyHandle::new(1), &n, &[]).is_err());
        assert!(k.seal(KeyHandle::new(1), &n, &[0; 65]).is_err());
        assert_eq!(k.seal(KeyHandle::new(1), &n, &[0; 64]).unwrap().len(), 72);
        assert!(Aead::from_slice(&[0; 8]).is_err());
        assert!(Aead::from_slice(&[0; 73]).is_err());
    }
}
