//! Key-in-token mode: the stricter option where a YubiKey's AES key stays
//! inside the token when its OTPs are decoded.
//!
//! A YubiHSM 1 AEAD can only be opened by the CCM construction, which puts
//! the YubiKey's key in host memory. This mode converts it once
//! ([`Pkcs11Hsm::wrap_for_token`]): the key is loaded as a session object,
//! wrapped with RFC 3394 AES key wrap (CKM_AES_KEY_WRAP) under a wrapping
//! key of the key handle, `<handle label>-kek` (AES-256, wrap/unwrap only,
//! sensitive, not extractable, created on first use), and destroyed. The
//! result, a [`TokenWrappedSecret`], is stored instead of the AEAD.
//!
//! Decoding ([`Pkcs11Hsm::decode_otp_in_token`]) unwraps the key into a
//! sensitive, non-extractable session object, AES-ECB decrypts the OTP block
//! with it *in the token*, and destroys it. The host sees only the OTP
//! plaintext (counters, and the private id it compares in constant time),
//! never the key. The key-wrap integrity check takes the place of the CCM
//! MAC: a modified blob, or one presented under another key handle, is
//! refused as [`Error::AeadInvalid`].
//!
//! Both need the handle's [`Flags::OTP_DECODE`]: conversion exposes no more
//! than a decode does.
//!
//! Services select the mode with `decode = "key-in-token"` in the `[hsm]`
//! table: [`SecurityModule::decode_otp`](crate::SecurityModule::decode_otp)
//! then converts each AEAD on its first decode and keeps the result in
//! memory (`key_in_token_cache` entries), so AEAD stores and files stay as
//! they are; the YubiKey key is in host memory once per YubiKey and process
//! instead of at every decode.

use std::fmt;

use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;
use otp::aead::YUBIKEY_AEAD_LEN;
use otp::aead_file::AeadRecord;
use otp::secrets::SECRETS_LEN;
use otp::{KeyHandle, OtpDecode, PrivateId, Token, TokenCiphertext, YubiKeySecrets};
use zeroize::{Zeroize, Zeroizing};

use super::{
    ccm, ccm_fault, changing_token_objects, lock, reading_token_objects, token, token_key_template, Fault, Pkcs11Hsm, PooledSession,
    TokenKey, CONVERTED_KEY_LEN,
};
use crate::{Error, Flags, OtpFault};

/// Length of an AES-KW-wrapped 16-byte key.
pub const WRAPPED_KEY_LEN: usize = 24;
/// Length of [`TokenWrappedSecret::to_bytes`].
pub const WRAPPED_SECRET_LEN: usize = 4 + WRAPPED_KEY_LEN + 6;

/// A YubiKey's secrets for key-in-token decoding: its AES key wrapped under
/// the key handle's wrapping key, and its private id. The private id is
/// secret: redacted in `Debug`, zeroized on drop.
#[derive(Clone, PartialEq, Eq)]
pub struct TokenWrappedSecret {
    /// The key handle whose wrapping key wrapped the key.
    pub key_handle: KeyHandle,
    /// `AES-KW(kek, key)`.
    pub wrapped_key: [u8; WRAPPED_KEY_LEN],
    /// The private id.
    pub uid: [u8; 6],
}

impl Drop for TokenWrappedSecret {
    fn drop(&mut self) {
        self.uid.zeroize();
    }
}

impl fmt::Debug for TokenWrappedSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenWrappedSecret").field("key_handle", &self.key_handle).field("uid", &"REDACTED").finish_non_exhaustive()
    }
}

impl TokenWrappedSecret {
    /// `LE32(key handle) ‖ wrapped key(24) ‖ uid(6)`, 34 bytes, zeroized on
    /// drop.
    #[must_use]
    pub fn to_bytes(&self) -> Zeroizing<Vec<u8>> {
        let mut out = Zeroizing::new(Vec::with_capacity(WRAPPED_SECRET_LEN));
        out.extend_from_slice(&self.key_handle.get().to_le_bytes());
        out.extend_from_slice(&self.wrapped_key);
        out.extend_from_slice(&self.uid);
        out
    }

    /// Read [`TokenWrappedSecret::to_bytes`] back.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, Error> {
        if bytes.len() != WRAPPED_SECRET_LEN {
            return Err(Error::InvalidInput(format!("a token-wrapped secret must be {WRAPPED_SECRET_LEN} bytes, got {}", bytes.len())));
        }
        let mut kh = [0u8; 4];
        kh.copy_from_slice(&bytes[..4]);
        let mut wrapped_key = [0u8; WRAPPED_KEY_LEN];
        wrapped_key.copy_from_slice(&bytes[4..4 + WRAPPED_KEY_LEN]);
        let mut uid = [0u8; 6];
        uid.copy_from_slice(&bytes[4 + WRAPPED_KEY_LEN..]);
        Ok(Self { key_handle: KeyHandle::new(u32::from_le_bytes(kh)), wrapped_key, uid })
    }
}

impl Pkcs11Hsm {
    /// Convert a YubiKey AEAD into a [`TokenWrappedSecret`] (see the
    /// [module docs](crate::pkcs11::wrapped)). The YubiKey's key is in host memory
    /// (zeroizing) during this one call. Needs [`Flags::OTP_DECODE`].
    pub fn wrap_for_token(&self, record: &AeadRecord) -> Result<TokenWrappedSecret, Error> {
        self.require_unlocked()?;
        let kh = record.key_handle;
        self.run("wrap a YubiKey key in the token", |this, _, s| {
            let e = this.permitted(&s.session, kh, "decode OTPs", &[Flags::OTP_DECODE])?;
            if record.aead.plaintext_len() != SECRETS_LEN {
                return Err(Fault::Final(Error::AeadInvalid(otp::Error::Length {
                    what: "YubiKey AEAD",
                    expected: "30",
                    got: record.aead.len(),
                })));
            }
            let key = Self::key_object(s, kh, &e);
            let mut plain = Zeroizing::new([0u8; SECRETS_LEN]);
            ccm::open_into(&mut TokenKey { session: &s.session, key }, kh, &record.nonce, &record.aead, &mut plain[..])
                .map_err(ccm_fault)?;
            let secrets = YubiKeySecrets::from_plaintext(&plain[..]).map_err(|e| Fault::Final(e.into()))?;
            let kek = this.kek(s, kh)?;
            let mut template = vec![
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::KeyType(KeyType::AES),
                Attribute::Token(false),
                Attribute::Sensitive(true),
                Attribute::Extractable(true),
                Attribute::Value(secrets.key.expose().to_vec()),
            ];
            let created = s.session.create_object(&template);
            for a in &mut template {
                if let Attribute::Value(v) = a {
                    v.zeroize();
                }
            }
            let object = created.map_err(token("load a YubiKey key for wrapping"))?;
            let wrapped = s.session.wrap_key(&Mechanism::AesKeyWrap, kek, object);
            let destroyed = s.session.destroy_object(object);
            let wrapped = wrapped.map_err(token("wrap a YubiKey key"))?;
            destroyed.map_err(token("destroy the unwrapped YubiKey key"))?;
            let wrapped_key: [u8; WRAPPED_KEY_LEN] = wrapped.as_slice().try_into().map_err(|_| {
                Fault::Final(Error::NotReady(format!("the token wrapped a 16-byte key into {} bytes, not 24", wrapped.len())))
            })?;
            Ok(TokenWrappedSecret { key_handle: kh, wrapped_key, uid: *secrets.uid.expose() })
        })
    }

    /// `decode = "key-in-token"`: the [`TokenWrappedSecret`] of `record`,
    /// converted on its first decode in this process and kept (by key
    /// handle, nonce and the whole AEAD, so a modified AEAD is converted —
    /// and refused — afresh). The YubiKey key is in host memory once per
    /// YubiKey and process, not at every decode.
    pub(super) fn converted_secret(&self, record: &AeadRecord) -> Result<TokenWrappedSecret, Error> {
        let aead = record.aead.as_bytes();
        if aead.len() != YUBIKEY_AEAD_LEN {
            return self.wrap_for_token(record); // refused there, with the reason
        }
        let mut key = [0u8; CONVERTED_KEY_LEN];
        key[..4].copy_from_slice(&record.key_handle.get().to_le_bytes());
        key[4..10].copy_from_slice(record.nonce.as_bytes());
        key[10..].copy_from_slice(aead);
        if let Some(secret) = lock(&self.converted).get(&key) {
            return Ok(secret.clone());
        }
        let secret = self.wrap_for_token(record)?;
        let mut converted = lock(&self.converted);
        if converted.len() >= self.config.key_in_token_cache.max(1) {
            converted.clear();
        }
        converted.insert(key, secret.clone());
        Ok(secret)
    }

    /// Check an OTP against a [`TokenWrappedSecret`], the YubiKey's key
    /// staying in the token. Same verdicts as
    /// [`SecurityModule::decode_otp`](crate::SecurityModule::decode_otp);
    /// needs [`Flags::OTP_DECODE`].
    pub fn decode_otp_in_token(&self, secret: &TokenWrappedSecret, otp: &TokenCiphertext) -> Result<OtpDecode, Error> {
        self.require_unlocked()?;
        let kh = secret.key_handle;
        let plain = self.run("decode an OTP in the token", |this, _, s| {
            this.permitted(&s.session, kh, "decode OTPs", &[Flags::OTP_DECODE])?;
            let kek = this.kek(s, kh)?;
            let template = [
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::KeyType(KeyType::AES),
                Attribute::Token(false),
                Attribute::Sensitive(true),
                Attribute::Extractable(false),
                Attribute::Decrypt(true),
                Attribute::Encrypt(false),
            ];
            let key = match s.session.unwrap_key(&Mechanism::AesKeyWrap, kek, &secret.wrapped_key, &template) {
                Ok(k) => k,
                // SoftHSM2 2.6 reports a failed integrity check as
                // CKR_GENERAL_ERROR: a verdict only if the session is alive.
                Err(CkError::Pkcs11(
                    RvError::GeneralError | RvError::WrappedKeyInvalid | RvError::WrappedKeyLenRange | RvError::EncryptedDataInvalid,
                    _,
                )) if s.session.get_session_info().is_ok() => return Err(Fault::Final(Error::AeadInvalid(otp::Error::AeadIntegrity))),
                Err(e) => return Err(Fault::Token { step: "unwrap a YubiKey key", source: e }),
            };
            let decrypted = s.session.decrypt(&Mechanism::AesEcb, key, otp.as_bytes());
            let destroyed = s.session.destroy_object(key);
            let decrypted = Zeroizing::new(decrypted.map_err(token("decrypt an OTP block"))?);
            destroyed.map_err(token("destroy the unwrapped YubiKey key"))?;
            let block: [u8; 16] = decrypted
                .as_slice()
                .try_into()
                .map_err(|_| Fault::Final(Error::NotReady("the token returned an OTP block of the wrong length".to_owned())))?;
            Ok(Zeroizing::new(block))
        })?;
        let token = Token::from_plaintext(*plain)?;
        if !token.uid_matches(&PrivateId::new(secret.uid)) {
            return Err(Error::OtpInvalid(OtpFault::UidMismatch));
        }
        Ok(OtpDecode::from_token(&token))
    }

    /// This session's copy of the handle's wrapping key, created in the
    /// token on first use.
    fn kek(&self, s: &mut PooledSession, kh: KeyHandle) -> Result<ObjectHandle, Fault> {
        if let Some(o) = s.kek_copies.get(&kh) {
            return Ok(*o);
        }
        let object = self.find_or_create_kek(&s.session, kh)?;
        let copy = {
            let _reading = reading_token_objects();
            s.session.copy_object(object, &[Attribute::Token(false)]).unwrap_or(object)
        };
        s.kek_copies.insert(kh, copy);
        Ok(copy)
    }

    fn find_or_create_kek(&self, session: &Session, kh: KeyHandle) -> Result<ObjectHandle, Fault> {
        // One creator at a time.
        let _changing = changing_token_objects();
        let label = format!("{}-kek", self.config.handle_label(kh));
        let found = session.find_objects(&token_key_template(&label)).map_err(token("find a wrapping key"))?;
        match found.as_slice() {
            [one] => Ok(*one),
            [] => {
                let template = [
                    Attribute::Class(ObjectClass::SECRET_KEY),
                    Attribute::KeyType(KeyType::AES),
                    Attribute::ValueLen(32u64.into()),
                    Attribute::Label(label.clone().into_bytes()),
                    Attribute::Token(true),
                    Attribute::Private(true),
                    Attribute::Sensitive(true),
                    Attribute::Extractable(false),
                    Attribute::Wrap(true),
                    Attribute::Unwrap(true),
                    Attribute::Encrypt(false),
                    Attribute::Decrypt(false),
                    Attribute::AllowedMechanisms(vec![MechanismType::AES_KEY_WRAP]),
                ];
                let o = session.generate_key(&Mechanism::AesKeyGen, &template).map_err(token("create a wrapping key"))?;
                tracing::info!(key_handle = %kh, label = %label, "created the key handle's wrapping key in the token");
                Ok(o)
            }
            _ => Err(Fault::Final(Error::NotReady(format!("the token holds {} keys labelled {label:?}; remove all but one", found.len())))),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn bytes_round_trip_and_redaction() {
        let s = TokenWrappedSecret { key_handle: KeyHandle::new(0x2000), wrapped_key: [7; 24], uid: [1, 2, 3, 4, 5, 6] };
        let b = s.to_bytes();
        assert_eq!(b.len(), WRAPPED_SECRET_LEN);
        assert_eq!(&b[..4], &[0x00, 0x20, 0, 0]);
        assert_eq!(TokenWrappedSecret::from_bytes(&b).unwrap(), s);
        assert!(TokenWrappedSecret::from_bytes(&b[..33]).is_err());
        assert!(!format!("{s:?}").contains("1, 2, 3"));
    }
}
