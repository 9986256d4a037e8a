//! The keystore file format (version 1).
//!
//! ```text
//! header (50 bytes, authenticated as associated data):
//!   magic "OTPKEYST" | version 0x01 | kdf 0x01 (argon2id v0x13)
//!   memory KiB u32 LE | iterations u32 LE | parallelism u32 LE
//!   salt [16] | nonce [12]
//! body: AES-256-GCM ciphertext ‖ tag (16) of the contents, under the
//!       argon2id key of the password and salt
//! contents:
//!   version 0x01 | data keys [96] (token, config, value)
//!   handle count u32 LE | per handle: id u32 LE, flags u32 LE, key length u8, key
//! ```
//! Unlike eduMFA's single unsalted SHA-256 of the password, the key comes
//! from argon2id with a random salt, and the header (KDF parameters
//! included) is authenticated, so it cannot be weakened by editing the file.

use std::collections::BTreeMap;

use aes_gcm::aead::{Aead as _, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use argon2::{Algorithm, Argon2, Params, Version};
use otp::{HandleKey, KeyHandle};
use zeroize::Zeroizing;

use crate::{Error, Flags, Password};

pub(crate) const MAGIC: &[u8; 8] = b"OTPKEYST";
const VERSION: u8 = 1;
const KDF_ARGON2ID: u8 = 1;
pub(crate) const HEADER_LEN: usize = 8 + 1 + 1 + 12 + 16 + 12;
const TAG_LEN: usize = 16;
pub(crate) const DATA_KEYS_LEN: usize = 96;

/// Argon2id cost parameters of a keystore.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KdfParams {
    /// Memory in KiB.
    pub memory_kib: u32,
    /// Passes over memory.
    pub iterations: u32,
    /// Lanes.
    pub parallelism: u32,
}

impl KdfParams {
    /// The default: 64 MiB, 3 passes, 1 lane (about 0.1 s on one core).
    pub const DEFAULT: Self = Self { memory_kib: 64 * 1024, iterations: 3, parallelism: 1 };
    /// Cheap parameters for tests only.
    pub const INSECURE_FOR_TESTS: Self = Self { memory_kib: 64, iterations: 1, parallelism: 1 };
    /// Upper bounds, so that an edited header cannot make unlocking hang.
    const MAX: Self = Self { memory_kib: 4 * 1024 * 1024, iterations: 64, parallelism: 16 };

    fn argon2(self) -> Result<Argon2<'static>, String> {
        if self.memory_kib > Self::MAX.memory_kib || self.iterations > Self::MAX.iterations || self.parallelism > Self::MAX.parallelism {
            return Err(format!("argon2 parameters {self:?} exceed the limits {:?}", Self::MAX));
        }
        let p = Params::new(self.memory_kib, self.iterations, self.parallelism, Some(32)).map_err(|e| format!("argon2 parameters: {e}"))?;
        Ok(Argon2::new(Algorithm::Argon2id, Version::V0x13, p))
    }

    /// Check the parameters without deriving anything.
    pub fn validate(self) -> Result<(), String> {
        self.argon2().map(|_| ())
    }
}

/// The parsed, still-encrypted header.
#[derive(Clone, Debug)]
pub(crate) struct Header {
    pub(crate) kdf: KdfParams,
    pub(crate) salt: [u8; 16],
    pub(crate) nonce: [u8; 12],
}

impl Header {
    pub(crate) fn encode(&self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[..8].copy_from_slice(MAGIC);
        h[8] = VERSION;
        h[9] = KDF_ARGON2ID;
        h[10..14].copy_from_slice(&self.kdf.memory_kib.to_le_bytes());
        h[14..18].copy_from_slice(&self.kdf.iterations.to_le_bytes());
        h[18..22].copy_from_slice(&self.kdf.parallelism.to_le_bytes());
        h[22..38].copy_from_slice(&self.salt);
        h[38..50].copy_from_slice(&self.nonce);
        h
    }

    /// Parse the header of a whole file; checks everything that can be
    /// checked without the password.
    pub(crate) fn parse(file: &[u8]) -> Result<Self, String> {
        if file.len() < HEADER_LEN + TAG_LEN {
            if !file.starts_with(MAGIC) && !MAGIC.starts_with(&file[..file.len().min(8)]) {
                return Err("not a keystore file (bad magic)".to_owned());
            }
            return Err(format!("truncated ({} bytes)", file.len()));
        }
        if &file[..8] != MAGIC {
            return Err("not a keystore file (bad magic)".to_owned());
        }
        if file[8] != VERSION {
            return Err(format!("unknown keystore version {}", file[8]));
        }
        if file[9] != KDF_ARGON2ID {
            return Err(format!("unknown key derivation {}", file[9]));
        }
        let u32_at = |i: usize| u32::from_le_bytes([file[i], file[i + 1], file[i + 2], file[i + 3]]);
        let kdf = KdfParams { memory_kib: u32_at(10), iterations: u32_at(14), parallelism: u32_at(18) };
        kdf.validate()?;
        let mut salt = [0u8; 16];
        salt.copy_from_slice(&file[22..38]);
        let mut nonce = [0u8; 12];
        nonce.copy_from_slice(&file[38..50]);
        Ok(Self { kdf, salt, nonce })
    }
}

/// Derive the file key from the password.
pub(crate) fn derive(password: &Password, header: &Header) -> Result<Zeroizing<[u8; 32]>, Error> {
    let mut key = Zeroizing::new([0u8; 32]);
    header
        .kdf
        .argon2()
        .map_err(Error::InvalidInput)?
        .hash_password_into(password.expose(), &header.salt, &mut key[..])
        .map_err(|e| Error::InvalidInput(format!("argon2: {e}")))?;
    Ok(key)
}

/// One key handle in the keystore.
#[derive(Clone, Debug)]
pub(crate) struct Handle {
    pub(crate) flags: Flags,
    pub(crate) key: HandleKey,
}

/// The decrypted contents.
#[derive(Clone)]
pub(crate) struct Contents {
    pub(crate) data_keys: Zeroizing<[u8; DATA_KEYS_LEN]>,
    pub(crate) handles: BTreeMap<KeyHandle, Handle>,
}

impl Contents {
    fn encode(&self) -> Zeroizing<Vec<u8>> {
        let mut out = Zeroizing::new(Vec::with_capacity(1 + DATA_KEYS_LEN + 4 + self.handles.len() * 41));
        out.push(VERSION);
        out.extend_from_slice(&self.data_keys[..]);
        out.extend_from_slice(&(self.handles.len() as u32).to_le_bytes());
        for (kh, h) in &self.handles {
            out.extend_from_slice(&kh.get().to_le_bytes());
            out.extend_from_slice(&h.flags.bits().to_le_bytes());
            let key = h.key.expose();
            out.push(key.len() as u8);
            out.extend_from_slice(key);
        }
        out
    }

    fn decode(bytes: &[u8]) -> Result<Self, String> {
        let mut r = Reader(bytes);
        if r.take(1)?[0] != VERSION {
            return Err("unknown contents version".to_owned());
        }
        let mut data_keys = Zeroizing::new([0u8; DATA_KEYS_LEN]);
        data_keys.copy_from_slice(r.take(DATA_KEYS_LEN)?);
        let count = r.u32()?;
        let mut handles = BTreeMap::new();
        for _ in 0..count {
            let kh = KeyHandle::new(r.u32()?);
            let flags = Flags::from_bits(r.u32()?);
            let len = usize::from(r.take(1)?[0]);
            let key = HandleKey::new(r.take(len)?).map_err(|e| e.to_string())?;
            if handles.insert(kh, Handle { flags, key }).is_some() {
                return Err(format!("key handle {kh} appears twice"));
            }
        }
        if !r.0.is_empty() {
            return Err("trailing bytes after the contents".to_owned());
        }
        Ok(Self { data_keys, handles })
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.0.len() < n {
            return Err("contents truncated".to_owned());
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u32(&mut self) -> Result<u32, String> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
}

/// Encrypt contents into a whole file.
pub(crate) fn seal(file_key: &[u8; 32], header: &Header, contents: &Contents) -> Result<Vec<u8>, Error> {
    let head = header.encode();
    let cipher = Aes256Gcm::new(file_key.into());
    let plain = contents.encode();
    let body = cipher
        .encrypt(Nonce::from_slice(&header.nonce), Payload { msg: &plain, aad: &head })
        .map_err(|_| Error::InvalidInput("keystore too large to encrypt".to_owned()))?;
    let mut out = head.to_vec();
    out.extend_from_slice(&body);
    Ok(out)
}

/// Decrypt a whole file whose header parsed as `header`.
pub(crate) fn open(file_key: &[u8; 32], header: &Header, file: &[u8]) -> Result<Contents, OpenError> {
    let cipher = Aes256Gcm::new(file_key.into());
    let plain = cipher
        .decrypt(Nonce::from_slice(&header.nonce), Payload { msg: &file[HEADER_LEN..], aad: &file[..HEADER_LEN] })
        .map(Zeroizing::new)
        .map_err(|_| OpenError::Authentication)?;
    Contents::decode(&plain).map_err(OpenError::Contents)
}

pub(crate) enum OpenError {
    /// Wrong password or modified file: GCM cannot tell which.
    Authentication,
    /// Authentic but undecodable: a bug or a future version.
    Contents(String),
}
