//! Encrypt-key unlock: the software keystore's password sealed to an RSA key
//! held in a PKCS#11 token, so that a server boots with the token present
//! and no password typed or stored in clear.
//!
//! # Design
//! The soft keystore keeps its own format (argon2id-derived key, AES-GCM);
//! only its **password** is sealed. [`Pkcs11Hsm::generate_unlock_key`]
//! makes an RSA key pair (2048, 3072 or 4096 bits) inside the token, both
//! halves labelled alike: the private key is a private token object,
//! sensitive, not extractable, decrypt-only (`CKA_ALLOWED_MECHANISMS` =
//! RSA-OAEP), so it never leaves the token; the public key may only
//! encrypt. [`seal_password`] encrypts the password *in the token* with the
//! public key (RSA-OAEP) and writes a small sealed-password file, mode 0600:
//!
//! ```text
//! "OSPW" ‖ version 0x01 ‖ OAEP hash (0x01 SHA-256, 0x02 SHA-1)
//!        ‖ LE16(label length) ‖ key label (UTF-8)
//!        ‖ LE16(ciphertext length) ‖ RSA-OAEP ciphertext
//! ```
//!
//! At boot, [`unlock_with_token`] (or [`unlock_keystore`] on an open
//! keystore) logs in to the token, has the token decrypt the ciphertext with
//! the private key, and unlocks the keystore with the result, which lives
//! only in zeroizing memory and is never logged.
//!
//! # OAEP parameters
//! Sealing asks for OAEP with SHA-256 and MGF1-SHA-256. SoftHSM2 2.6.1
//! refuses those parameters and accepts only SHA-1 with MGF1-SHA-1 (seen in
//! `tests/pkcs11_unlock.rs`); when the token refuses the SHA-256 parameters
//! (`CKR_ARGUMENTS_BAD` or `CKR_MECHANISM_PARAM_INVALID`), sealing falls
//! back to SHA-1, records the choice in the file, and logs it; unlocking
//! uses what the file records (changing that byte only makes decryption
//! fail). OAEP's security as an encryption scheme does not rest on the
//! collision resistance of its hash, so SHA-1 OAEP remains sound here. No
//! OAEP label (encoding parameter) is used. eduMFA's encrypt-key module
//! uses PKCS#1 v1.5 padding instead; OAEP avoids its padding oracles.
//!
//! # What it protects, and what it does not
//! Whoever holds the sealed file *and* can use the token (its user PIN)
//! recovers the keystore password; either alone is useless. The PIN is
//! still needed on the server (a PIN file), as with eduMFA's encrypt-key
//! module: the point is that the secret needed at boot is bound to a device
//! that can be removed or locked, not that the server needs no secret. A
//! modified sealed file, a file sealed by another token or key, a missing
//! key, a wrong PIN or a missing token fail with an error, and the keystore
//! stays locked.
//!
//! Login in PKCS#11 is per application: the token stays logged in for this
//! process after unlocking (other [`Pkcs11Hsm`] instances of the process
//! may be using it), and the sessions used here are closed.

use std::path::Path;

use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::rsa::{PkcsMgfType, PkcsOaepParams, PkcsOaepSource};
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;
use zeroize::{Zeroize, Zeroizing};

use super::{changing_token_objects, reading_token_objects, token, Fault, KeyProtection, Pkcs11Config, Pkcs11Hsm};
use crate::fsutil::{write_atomic, Mode};
use crate::soft::SoftHsm;
use crate::{Error, Password, SecurityModule};

/// First bytes of a sealed-password file.
pub const SEALED_MAGIC: &[u8; 4] = b"OSPW";
/// The sealed-password format version written and read.
pub const SEALED_VERSION: u8 = 1;
/// RSA key sizes [`Pkcs11Hsm::generate_unlock_key`] accepts.
pub const UNLOCK_KEY_BITS: [usize; 3] = [2048, 3072, 4096];
/// Default label of the unlock key pair.
pub const DEFAULT_UNLOCK_KEY_LABEL: &str = "otp-appliance-unlock";

/// Longest key label a sealed file holds.
const MAX_LABEL: usize = 255;
/// Longest ciphertext accepted (an 8192-bit modulus).
const MAX_CIPHERTEXT: usize = 1024;

/// The OAEP hash (and MGF1 hash) a password was sealed with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OaepHash {
    /// SHA-256 with MGF1-SHA-256 (preferred).
    Sha256,
    /// SHA-1 with MGF1-SHA-1 (what SoftHSM2 2.6 supports).
    Sha1,
}

impl OaepHash {
    fn code(self) -> u8 {
        match self {
            Self::Sha256 => 1,
            Self::Sha1 => 2,
        }
    }

    fn from_code(code: u8) -> Option<Self> {
        match code {
            1 => Some(Self::Sha256),
            2 => Some(Self::Sha1),
            _ => None,
        }
    }

    /// Digest length in bytes.
    fn len(self) -> usize {
        match self {
            Self::Sha256 => 32,
            Self::Sha1 => 20,
        }
    }

    fn mechanism(self) -> Mechanism<'static> {
        let params = match self {
            Self::Sha256 => PkcsOaepParams::new(MechanismType::SHA256, PkcsMgfType::MGF1_SHA256, PkcsOaepSource::empty()),
            Self::Sha1 => PkcsOaepParams::new(MechanismType::SHA1, PkcsMgfType::MGF1_SHA1, PkcsOaepSource::empty()),
        };
        Mechanism::RsaPkcsOaep(params)
    }
}

impl std::fmt::Display for OaepHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Sha256 => "SHA-256",
            Self::Sha1 => "SHA-1",
        })
    }
}

/// A keystore password sealed to an RSA key in a token (the contents of a
/// sealed-password file; see the [module docs](self)).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SealedPassword {
    /// Label of the RSA key pair in the token.
    pub key_label: String,
    /// The OAEP hash used.
    pub hash: OaepHash,
    /// The RSA-OAEP ciphertext of the password.
    pub ciphertext: Vec<u8>,
}

impl SealedPassword {
    /// The file's bytes.
    #[must_use]
    pub fn to_bytes(&self) -> Vec<u8> {
        let label = self.key_label.as_bytes();
        let mut out = Vec::with_capacity(4 + 2 + 2 + label.len() + 2 + self.ciphertext.len());
        out.extend_from_slice(SEALED_MAGIC);
        out.push(SEALED_VERSION);
        out.push(self.hash.code());
        // Lengths are bounded by MAX_LABEL and MAX_CIPHERTEXT when sealing.
        out.extend_from_slice(&u16::try_from(label.len()).unwrap_or(u16::MAX).to_le_bytes());
        out.extend_from_slice(label);
        out.extend_from_slice(&u16::try_from(self.ciphertext.len()).unwrap_or(u16::MAX).to_le_bytes());
        out.extend_from_slice(&self.ciphertext);
        out
    }

    /// Parse [`SealedPassword::to_bytes`]; anything else is
    /// [`Error::InvalidInput`].
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, Error> {
        let bad = |why: &str| Error::InvalidInput(format!("not a sealed keystore password: {why}"));
        let rest = bytes.strip_prefix(SEALED_MAGIC.as_slice()).ok_or_else(|| bad("wrong magic"))?;
        let (&version, rest) = rest.split_first().ok_or_else(|| bad("truncated"))?;
        if version != SEALED_VERSION {
            return Err(bad(&format!("unknown version {version}")));
        }
        let (&hash, rest) = rest.split_first().ok_or_else(|| bad("truncated"))?;
        let hash = OaepHash::from_code(hash).ok_or_else(|| bad("unknown OAEP hash"))?;
        let (label, rest) = take_field(rest).ok_or_else(|| bad("truncated key label"))?;
        if label.is_empty() || label.len() > MAX_LABEL {
            return Err(bad("bad key label length"));
        }
        let key_label = std::str::from_utf8(label).map_err(|_| bad("key label is not UTF-8"))?.to_owned();
        let (ciphertext, rest) = take_field(rest).ok_or_else(|| bad("truncated ciphertext"))?;
        if ciphertext.is_empty() || ciphertext.len() > MAX_CIPHERTEXT {
            return Err(bad("bad ciphertext length"));
        }
        if !rest.is_empty() {
            return Err(bad("trailing bytes"));
        }
        Ok(Self { key_label, hash, ciphertext: ciphertext.to_vec() })
    }

    /// Read a sealed-password file.
    pub fn read(path: &Path) -> Result<Self, Error> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        Self::from_bytes(&bytes).map_err(|e| match e {
            Error::InvalidInput(m) => Error::InvalidInput(format!("{}: {m}", path.display())),
            other => other,
        })
    }

    /// Write it to a new file (mode 0600, atomically; an existing file is
    /// refused).
    pub fn write_new(&self, path: &Path) -> Result<(), Error> {
        write_atomic(path, &self.to_bytes(), Mode::CreateNew)
    }
}

/// `LE16(length) ‖ bytes`, and what follows.
fn take_field(bytes: &[u8]) -> Option<(&[u8], &[u8])> {
    let len = u16::from_le_bytes([*bytes.first()?, *bytes.get(1)?]);
    let rest = bytes.get(2..)?;
    let len = usize::from(len);
    Some((rest.get(..len)?, rest.get(len..)?))
}

/// The search for one half of an unlock key pair.
fn key_template(class: ObjectClass, label: &str) -> [Attribute; 4] {
    [Attribute::Class(class), Attribute::KeyType(KeyType::RSA), Attribute::Token(true), Attribute::Label(label.as_bytes().to_vec())]
}

fn check_label(label: &str) -> Result<(), Error> {
    if label.is_empty() || label.len() > MAX_LABEL {
        return Err(Error::InvalidInput(format!("an unlock key label must be 1 to {MAX_LABEL} bytes")));
    }
    Ok(())
}

/// The one token object of `class` labelled `label`.
fn find_key(session: &Session, class: ObjectClass, label: &str, what: &str) -> Result<ObjectHandle, Fault> {
    let found = {
        let _reading = reading_token_objects();
        session.find_objects(&key_template(class, label))
    }
    .map_err(token("find the unlock key"))?;
    match found.as_slice() {
        [one] => Ok(*one),
        [] => Err(Fault::Final(Error::NotReady(format!(
            "the token holds no RSA {what} labelled {label:?} (make one with `keystore seal-password --generate-key`)"
        )))),
        _ => Err(Fault::Final(Error::NotReady(format!(
            "the token holds {} RSA {what}s labelled {label:?}; remove all but one",
            found.len()
        )))),
    }
}

impl Pkcs11Hsm {
    /// Generate an RSA key pair for encrypt-key unlock in the token
    /// (`bits` = 2048, 3072 or 4096), both halves labelled `label`. The
    /// private key is a private token object, sensitive, not extractable,
    /// decrypt-only with RSA-OAEP; the public key may only encrypt. A key
    /// with this label is refused as [`Error::InvalidInput`].
    pub fn generate_unlock_key(&self, label: &str, bits: usize) -> Result<(), Error> {
        check_label(label)?;
        if !UNLOCK_KEY_BITS.contains(&bits) {
            return Err(Error::InvalidInput(format!("an unlock key has 2048, 3072 or 4096 bits, not {bits}")));
        }
        self.require_unlocked()?;
        let id = label.as_bytes().to_vec();
        self.run("generate an unlock key pair", |_, _, s| {
            let _changing = changing_token_objects();
            for class in [ObjectClass::PUBLIC_KEY, ObjectClass::PRIVATE_KEY] {
                if !s.session.find_objects(&key_template(class, label)).map_err(token("look for the unlock key"))?.is_empty() {
                    return Err(Fault::Final(Error::InvalidInput(format!("the token already holds an RSA key labelled {label:?}"))));
                }
            }
            let public = [
                Attribute::Token(true),
                Attribute::Private(false),
                Attribute::Label(label.as_bytes().to_vec()),
                Attribute::Id(id.clone()),
                Attribute::ModulusBits((bits as u64).into()),
                Attribute::PublicExponent(vec![0x01, 0x00, 0x01]),
                Attribute::Encrypt(true),
                Attribute::Verify(false),
                Attribute::Wrap(false),
            ];
            let private = [
                Attribute::Token(true),
                Attribute::Private(true),
                Attribute::Label(label.as_bytes().to_vec()),
                Attribute::Id(id.clone()),
                Attribute::Sensitive(true),
                Attribute::Extractable(false),
                Attribute::Decrypt(true),
                Attribute::Sign(false),
                Attribute::Unwrap(false),
                Attribute::Derive(false),
                Attribute::AllowedMechanisms(vec![MechanismType::RSA_PKCS_OAEP]),
            ];
            s.session.generate_key_pair(&Mechanism::RsaPkcsKeyPairGen, &public, &private).map_err(token("generate an RSA key pair"))?;
            Ok(())
        })?;
        tracing::info!(label = %label, bits, "generated an unlock key pair in the token");
        Ok(())
    }

    /// Whether the token holds an unlock private key labelled `label`.
    pub fn unlock_key_exists(&self, label: &str) -> Result<bool, Error> {
        self.require_unlocked()?;
        self.run("look for the unlock key", |_, _, s| {
            let _reading = reading_token_objects();
            Ok(!s
                .session
                .find_objects(&key_template(ObjectClass::PRIVATE_KEY, label))
                .map_err(token("look for the unlock key"))?
                .is_empty())
        })
    }

    /// How the token protects the unlock private key labelled `label` (read
    /// back from the token; `value_readable` tells whether the private
    /// exponent could be read).
    pub fn unlock_key_protection(&self, label: &str) -> Result<KeyProtection, Error> {
        self.require_unlocked()?;
        self.run("read the unlock key's protection", |_, _, s| {
            let key = find_key(&s.session, ObjectClass::PRIVATE_KEY, label, "private key")?;
            super::protection_of(&s.session, key, AttributeType::PrivateExponent, "read the unlock key's attributes")
        })
    }

    /// Encrypt `password` in the token with the public key labelled
    /// `label` (RSA-OAEP, SHA-256 where the token supports it, else SHA-1).
    pub fn seal_password(&self, label: &str, password: &Password) -> Result<SealedPassword, Error> {
        check_label(label)?;
        self.require_unlocked()?;
        let (hash, ciphertext) = self.run("seal the keystore password", |_, _, s| {
            let key = find_key(&s.session, ObjectClass::PUBLIC_KEY, label, "public key")?;
            let modulus =
                match s.session.get_attributes(key, &[AttributeType::Modulus]).map_err(token("read the unlock key's modulus"))?.first() {
                    Some(Attribute::Modulus(m)) => m.len(),
                    _ => 0,
                };
            if modulus * 8 < 2048 {
                return Err(Fault::Final(Error::NotReady(format!("the unlock key {label:?} is not an RSA key of at least 2048 bits"))));
            }
            let mut last = None;
            for hash in [OaepHash::Sha256, OaepHash::Sha1] {
                let room = modulus - 2 * hash.len() - 2;
                if password.expose().len() > room {
                    return Err(Fault::Final(Error::InvalidInput(format!(
                        "the password is too long to seal with this {}-bit key (at most {room} bytes)",
                        modulus * 8
                    ))));
                }
                match s.session.encrypt(&hash.mechanism(), key, password.expose()) {
                    Ok(ct) => return Ok((hash, ct)),
                    Err(CkError::Pkcs11(RvError::ArgumentsBad | RvError::MechanismParamInvalid, _)) if hash == OaepHash::Sha256 => {
                        tracing::info!("the token refuses RSA-OAEP with SHA-256; sealing with SHA-1 OAEP");
                        last = Some(hash);
                    }
                    Err(e) => return Err(Fault::Token { step: "encrypt with the unlock key", source: e }),
                }
            }
            Err(Fault::Final(Error::NotReady(format!(
                "the token supports no RSA-OAEP parameters this appliance uses (last tried {last:?})"
            ))))
        })?;
        if ciphertext.len() > MAX_CIPHERTEXT {
            return Err(Error::NotReady("the token returned an implausibly long RSA ciphertext".to_owned()));
        }
        tracing::info!(label = %label, oaep = %hash, "sealed the keystore password to the token");
        Ok(SealedPassword { key_label: label.to_owned(), hash, ciphertext })
    }

    /// Decrypt a sealed password in the token.
    fn unseal_password(&self, sealed: &SealedPassword) -> Result<Password, Error> {
        self.require_unlocked()?;
        let refused = || {
            Error::InvalidInput(
                "the token could not decrypt the sealed password: the file was modified, or it was sealed to another key or token"
                    .to_owned(),
            )
        };
        let mut plain = self.run("unseal the keystore password", |_, _, s| {
            let key = find_key(&s.session, ObjectClass::PRIVATE_KEY, &sealed.key_label, "private key")?;
            match s.session.decrypt(&sealed.hash.mechanism(), key, &sealed.ciphertext) {
                Ok(p) => Ok(Zeroizing::new(p)),
                // SoftHSM2 reports a failed OAEP check as CKR_GENERAL_ERROR:
                // a verdict only if the session is demonstrably alive.
                Err(CkError::Pkcs11(
                    RvError::EncryptedDataInvalid
                    | RvError::EncryptedDataLenRange
                    | RvError::GeneralError
                    | RvError::FunctionFailed
                    | RvError::ArgumentsBad
                    | RvError::MechanismParamInvalid,
                    _,
                )) if s.session.get_session_info().is_ok() => Err(Fault::Final(refused())),
                Err(e) => Err(Fault::Token { step: "decrypt with the unlock key", source: e }),
            }
        })?;
        let text = match String::from_utf8(std::mem::take(&mut *plain)) {
            Ok(t) => t,
            Err(e) => {
                e.into_bytes().zeroize();
                return Err(refused());
            }
        };
        Password::new(text).map_err(|_| refused())
    }
}

/// Open the token and log in with the configured PIN (a PIN source is
/// required). A refused PIN is reported as [`Error::NotReady`] naming the
/// PIN, not as [`Error::WrongPassword`] (which speaks of the keystore).
pub fn open_token(config: &Pkcs11Config) -> Result<Pkcs11Hsm, Error> {
    if config.pin_file.is_none() && config.pin_env.is_none() {
        return Err(Error::InvalidInput("encrypt-key unlock needs the token's user PIN: give a PIN file or variable".to_owned()));
    }
    Pkcs11Hsm::open(config.clone()).map_err(|e| match e {
        Error::WrongPassword => Error::NotReady("the PKCS#11 token refused the user PIN".to_owned()),
        other => other,
    })
}

/// Seal `password` to the token's unlock key labelled `key_label` and write
/// the sealed-password file `out` (mode 0600; an existing file is refused).
pub fn seal_password(config: &Pkcs11Config, key_label: &str, password: &Password, out: &Path) -> Result<SealedPassword, Error> {
    if out.exists() {
        return Err(Error::AlreadyExists(out.to_path_buf()));
    }
    let hsm = open_token(config)?;
    let sealed = hsm.seal_password(key_label, password)?;
    sealed.write_new(out)?;
    Ok(sealed)
}

/// Unlock an open software keystore with the password sealed in
/// `sealed_file`, decrypted by the token `config` names. On any error the
/// keystore stays locked.
pub fn unlock_keystore(keystore: &SoftHsm, sealed_file: &Path, config: &Pkcs11Config) -> Result<(), Error> {
    let sealed = SealedPassword::read(sealed_file)?;
    let hsm = open_token(config)?;
    let password = hsm.unseal_password(&sealed)?;
    drop(hsm);
    keystore.unlock(&password).map_err(|e| match e {
        Error::WrongPassword => Error::InvalidInput(format!(
            "the password sealed in {} does not open the keystore {}",
            sealed_file.display(),
            keystore.path().display()
        )),
        other => other,
    })
}

/// Open the software keystore at `keystore_path` and unlock it with the
/// password sealed in `sealed_file` (see [`unlock_keystore`]).
pub fn unlock_with_token(keystore_path: &Path, sealed_file: &Path, config: &Pkcs11Config) -> Result<SoftHsm, Error> {
    let keystore = SoftHsm::open(keystore_path)?;
    unlock_keystore(&keystore, sealed_file, config)?;
    Ok(keystore)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn sealed_file_round_trip_and_strict_parse() {
        let s = SealedPassword { key_label: "k".to_owned(), hash: OaepHash::Sha1, ciphertext: vec![7; 256] };
        let bytes = s.to_bytes();
        assert_eq!(SealedPassword::from_bytes(&bytes).unwrap(), s);
        for cut in 0..bytes.len() {
            assert!(SealedPassword::from_bytes(&bytes[..cut]).is_err(), "truncated at {cut}");
        }
        let mut long = bytes.clone();
        long.push(0);
        assert!(SealedPassword::from_bytes(&long).is_err());
        for (i, v) in [(0, b'X'), (4, 2), (5, 9)] {
            let mut b = bytes.clone();
            b[i] = v;
            assert!(SealedPassword::from_bytes(&b).is_err(), "byte {i}");
        }
    }
}
