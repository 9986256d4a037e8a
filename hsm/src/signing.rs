//! Signing keys: RSA-2048 with SHA-256 (RSASSA-PKCS1-v1_5, `sha256WithRSAEncryption`):
//! the personalizer's own signing key (audit checkpoints, transfer
//! bundles) and the operators' public keys (2FA challenges, quorum
//! approvals).
//!
//! Signatures are exactly what `openssl dgst -sha256 -sign key.pem -out sig
//! FILE` makes and `openssl dgst -sha256 -verify pub.pem -signature sig FILE`
//! accepts. [`VerifyingKey::verify_challenge`] also accepts the CloudHSM
//! documented form, `openssl pkeyutl -sign -pkeyopt digest:sha256` over a
//! 32-byte challenge, which treats the challenge itself as the hash.
//!
//! The private key never exists on disk in the clear: [`SigningKey::seal`]
//! encrypts its PKCS#8 DER under the security module's value data key, and
//! the sealed file is written mode 0600.

use std::fmt;
use std::path::Path;

use crate::fsutil::{write_atomic, Mode};
use crate::{DataKey, SecurityModule};
use rsa::pkcs1v15::Pkcs1v15Sign;
use rsa::pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey, LineEnding};
use rsa::sha2::{Digest, Sha256};
use rsa::traits::PublicKeyParts;
use zeroize::Zeroizing;

/// Modulus size of every key the personalizer makes or accepts.
pub const KEY_BITS: usize = 2048;

/// Errors of keys and signatures.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SigningError {
    /// Not a PEM/DER key of the expected kind.
    #[error("not an RSA key: {0}")]
    BadKey(String),
    /// A key of another size.
    #[error("an RSA-{KEY_BITS} key is required, this one has {0} bits")]
    WrongSize(usize),
    /// The signature does not verify.
    #[error("signature does not verify")]
    BadSignature,
    /// Key generation or the private-key operation failed.
    #[error("RSA operation failed: {0}")]
    Rsa(String),
    /// The security module (sealing) or a file failed.
    #[error(transparent)]
    Hsm(#[from] crate::Error),
}

/// The personalizer's private signing key. Redacted in `Debug`; its
/// big-number limbs are zeroized on drop by `rsa`.
pub struct SigningKey {
    key: rsa::PrivateKey,
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SigningKey(RSA-{}, fingerprint {})", KEY_BITS, self.verifying_key().fingerprint())
    }
}

impl SigningKey {
    /// A fresh RSA-2048 key (e = 65537) from the operating system's RNG.
    pub fn generate() -> Result<Self, SigningError> {
        let key = rsa::PrivateKey::new(&mut getrandom::SysRng, KEY_BITS).map_err(|e| SigningError::Rsa(e.to_string()))?;
        Ok(Self { key })
    }

    /// The key from an unencrypted PKCS#8 PEM (tests, and keys made with
    /// `openssl genpkey`).
    pub fn from_pkcs8_pem(pem: &str) -> Result<Self, SigningError> {
        let key = rsa::PrivateKey::from_pkcs8_pem(pem).map_err(|e| SigningError::BadKey(e.to_string()))?;
        check_size(key.size() * 8)?;
        Ok(Self { key })
    }

    /// `sha256WithRSAEncryption` over `message`.
    pub fn sign(&self, message: &[u8]) -> Result<Vec<u8>, SigningError> {
        let hashed = Sha256::digest(message);
        self.key.sign(Pkcs1v15Sign::new::<Sha256>(), &hashed).map_err(|e| SigningError::Rsa(e.to_string()))
    }

    /// The public half.
    #[must_use]
    pub fn verifying_key(&self) -> VerifyingKey {
        VerifyingKey { key: self.key.to_public_key() }
    }

    /// The PKCS#8 DER encrypted under the module's [`DataKey::Value`].
    pub fn seal(&self, hsm: &dyn SecurityModule) -> Result<Vec<u8>, SigningError> {
        let der = self.key.to_pkcs8_der().map_err(|e| SigningError::Rsa(e.to_string()))?;
        Ok(hsm.encrypt_value(DataKey::Value, der.as_bytes())?)
    }

    /// The inverse of [`SigningKey::seal`].
    pub fn unseal(hsm: &dyn SecurityModule, sealed: &[u8]) -> Result<Self, SigningError> {
        let der = hsm.decrypt_value(DataKey::Value, sealed)?;
        let key = rsa::PrivateKey::from_pkcs8_der(&der).map_err(|e| SigningError::BadKey(e.to_string()))?;
        check_size(key.size() * 8)?;
        Ok(Self { key })
    }

    /// Seal the key into a new file (mode 0600, refused if it exists).
    pub fn seal_to_file(&self, hsm: &dyn SecurityModule, path: &Path) -> Result<(), SigningError> {
        let sealed = self.seal(hsm)?;
        write_atomic(path, &sealed, Mode::CreateNew)?;
        Ok(())
    }

    /// Read a key sealed by [`SigningKey::seal_to_file`].
    pub fn unseal_file(hsm: &dyn SecurityModule, path: &Path) -> Result<Self, SigningError> {
        let sealed = std::fs::read(path).map_err(|e| crate::Error::io(path, e))?;
        Self::unseal(hsm, &sealed)
    }

    /// The unencrypted PKCS#8 PEM (tests only: to sign as an operator).
    pub fn to_pkcs8_pem(&self) -> Result<Zeroizing<String>, SigningError> {
        self.key.to_pkcs8_pem(LineEnding::LF).map(|s| Zeroizing::new(s.to_string())).map_err(|e| SigningError::Rsa(e.to_string()))
    }
}

/// An RSA-2048 public key.
#[derive(Clone, PartialEq, Eq)]
pub struct VerifyingKey {
    key: rsa::PublicKey,
}

impl fmt::Debug for VerifyingKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "VerifyingKey({})", self.fingerprint())
    }
}

impl VerifyingKey {
    /// A `-----BEGIN PUBLIC KEY-----` (SPKI) PEM, as `openssl pkey -pubout`
    /// writes it; RSA-2048 only.
    pub fn from_pem(pem: &str) -> Result<Self, SigningError> {
        let key = rsa::PublicKey::from_public_key_pem(pem.trim()).map_err(|e| SigningError::BadKey(e.to_string()))?;
        check_size(key.size() * 8)?;
        Ok(Self { key })
    }

    /// Read [`VerifyingKey::from_pem`] from a file.
    pub fn from_pem_file(path: &Path) -> Result<Self, SigningError> {
        let pem = std::fs::read_to_string(path).map_err(|e| crate::Error::io(path, e))?;
        Self::from_pem(&pem)
    }

    /// The SPKI PEM.
    pub fn to_pem(&self) -> Result<String, SigningError> {
        self.key.to_public_key_pem(LineEnding::LF).map_err(|e| SigningError::Rsa(e.to_string()))
    }

    /// SHA-256 of the SPKI DER, hex: what operators compare out of band.
    #[must_use]
    pub fn fingerprint(&self) -> String {
        match self.key.to_public_key_der() {
            Ok(der) => hex::encode(Sha256::digest(der.as_bytes())),
            Err(_) => "unencodable".to_owned(),
        }
    }

    /// Check a `sha256WithRSAEncryption` signature over `message`.
    pub fn verify(&self, message: &[u8], signature: &[u8]) -> Result<(), SigningError> {
        let hashed = Sha256::digest(message);
        self.verify_prehashed(&hashed, signature)
    }

    /// Check a signature over a 32-byte challenge made either way operators
    /// are told to sign one: `openssl dgst -sha256 -sign` over the challenge
    /// bytes, or `openssl pkeyutl -sign -pkeyopt digest:sha256`, which signs
    /// the challenge as if it were the hash (CloudHSM's documented form).
    pub fn verify_challenge(&self, challenge: &[u8; 32], signature: &[u8]) -> Result<(), SigningError> {
        self.verify(challenge, signature).or_else(|_| self.verify_prehashed(challenge, signature))
    }

    fn verify_prehashed(&self, hashed: &[u8], signature: &[u8]) -> Result<(), SigningError> {
        self.key.verify(Pkcs1v15Sign::new::<Sha256>(), hashed, signature).map_err(|_| SigningError::BadSignature)
    }
}

fn check_size(bits: usize) -> Result<(), SigningError> {
    if bits == KEY_BITS {
        Ok(())
    } else {
        Err(SigningError::WrongSize(bits))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn sign_verify_pem_round_trip() {
        let key = SigningKey::generate().unwrap();
        let public = key.verifying_key();
        let sig = key.sign(b"entry").unwrap();
        assert_eq!(sig.len(), 256);
        public.verify(b"entry", &sig).unwrap();
        assert!(matches!(public.verify(b"other", &sig), Err(SigningError::BadSignature)));
        let again = VerifyingKey::from_pem(&public.to_pem().unwrap()).unwrap();
        assert_eq!(again, public);
        assert_eq!(again.fingerprint(), public.fingerprint());
        let pem = key.to_pkcs8_pem().unwrap();
        let reloaded = SigningKey::from_pkcs8_pem(&pem).unwrap();
        assert_eq!(reloaded.verifying_key(), public);
        assert!(!format!("{key:?}").contains("BEGIN"), "Debug is redacted");
    }

    #[test]
    fn challenge_accepts_both_openssl_forms_only() {
        let key = SigningKey::generate().unwrap();
        let public = key.verifying_key();
        let challenge = [7u8; 32];
        // openssl dgst -sha256 -sign: the challenge is the message.
        public.verify_challenge(&challenge, &key.sign(&challenge).unwrap()).unwrap();
        // openssl pkeyutl -pkeyopt digest:sha256: the challenge is the hash.
        let prehashed = key.key.sign(Pkcs1v15Sign::new::<Sha256>(), &challenge).unwrap();
        public.verify_challenge(&challenge, &prehashed).unwrap();
        assert!(public.verify_challenge(&[8u8; 32], &prehashed).is_err());
    }
}
