//! The software security module: a password-encrypted keystore file.
//!
//! The file holds the key handles (id, AES key, flags) and the three data
//! keys; see [`format`](mod@format) for its layout. It is created mode 0600 and every
//! change is written atomically (a crash leaves the old or the new file).
//! The module is [`Status::Locked`] until [`SecurityModule::unlock`] is
//! given the password; keys then live in memory only, zeroized on drop.
//!
//! Random numbers come from the operating system's CSPRNG.

pub mod faults;
pub mod format;

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{RwLock, RwLockReadGuard};

use aes_gcm::aead::{Aead as _, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use otp::aead_file::AeadRecord;
use otp::secrets::SECRETS_LEN;
use otp::{AeadNonce, HandleKey, KeyHandle, OtpDecode, TokenCiphertext};
use rand_core::{OsRng, RngCore};
use zeroize::Zeroizing;

use self::faults::FaultInjector;
use self::format::{Contents, Handle, Header, KdfParams, OpenError, DATA_KEYS_LEN};
use crate::admin::{ExportedKey, KeyAdmin};
use crate::fsutil::{write_atomic, Mode};
use crate::{DataKey, Error, Flags, HandleInfo, NonceSource, Password, SecurityModule, Status};

/// Version byte of [`SecurityModule::encrypt_value`] output.
const VALUE_V1: u8 = 1;

/// The software keystore backend.
pub struct SoftHsm {
    path: PathBuf,
    state: RwLock<State>,
    faults: FaultInjector,
}

enum State {
    /// The file as read, not yet decrypted.
    Locked {
        file: Vec<u8>,
        header: Header,
    },
    Ready(Box<Unlocked>),
}

struct Unlocked {
    file_key: Zeroizing<[u8; 32]>,
    header: Header,
    contents: Contents,
    values: [Aes256Gcm; 3],
}

impl Unlocked {
    fn new(file_key: Zeroizing<[u8; 32]>, header: Header, contents: Contents) -> Self {
        let k = |i: usize| Aes256Gcm::new_from_slice(&contents.data_keys[32 * i..32 * (i + 1)]).map_err(|_| ());
        // Slices of exactly 32 bytes: new_from_slice cannot fail here.
        let values = match (k(0), k(1), k(2)) {
            (Ok(a), Ok(b), Ok(c)) => [a, b, c],
            _ => unreachable!("data keys are 32 bytes each"),
        };
        Self { file_key, header, contents, values }
    }

    fn handle(&self, kh: KeyHandle, operation: &'static str, needs: &[Flags]) -> Result<&Handle, Error> {
        let h = self.contents.handles.get(&kh).ok_or(Error::UnknownKeyHandle(kh))?;
        // `needs` lists alternatives: any one of them suffices.
        if needs.iter().any(|n| h.flags.contains(*n)) {
            Ok(h)
        } else {
            Err(Error::NotPermitted { key_handle: kh, operation, needs: needs[0] })
        }
    }
}

impl std::fmt::Debug for SoftHsm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SoftHsm").field("path", &self.path).field("status", &self.status()).finish()
    }
}

fn random_bytes(out: &mut [u8]) -> Result<(), Error> {
    OsRng.try_fill_bytes(out).map_err(|e| Error::Random(e.to_string()))
}

fn random_nonce() -> Result<AeadNonce, Error> {
    loop {
        let mut n = [0u8; 6];
        random_bytes(&mut n)?;
        let n = AeadNonce::new(n);
        // A zero nonce means "module chooses" on a YubiHSM; never emit one.
        if !n.is_zero() {
            return Ok(n);
        }
    }
}

impl SoftHsm {
    /// Create a new keystore at `path` (which must not exist), with fresh
    /// random data keys and no key handles. The result is unlocked.
    pub fn create(path: &Path, password: &Password, kdf: KdfParams) -> Result<Self, Error> {
        Self::create_with_handles(path, password, kdf, &[])
    }

    /// The same, holding `handles` from the start: one write, so a failure
    /// leaves no keystore behind.
    pub fn create_with_handles(path: &Path, password: &Password, kdf: KdfParams, handles: &[ExportedKey]) -> Result<Self, Error> {
        kdf.validate().map_err(Error::InvalidInput)?;
        let mut map = BTreeMap::new();
        for (kh, flags, key) in handles {
            if map.insert(*kh, Handle { flags: *flags, key: key.clone() }).is_some() {
                return Err(Error::DuplicateKeyHandle(*kh));
            }
        }
        let mut header = Header { kdf, salt: [0; 16], nonce: [0; 12] };
        random_bytes(&mut header.salt)?;
        random_bytes(&mut header.nonce)?;
        let mut data_keys = Zeroizing::new([0u8; DATA_KEYS_LEN]);
        random_bytes(&mut data_keys[..])?;
        let contents = Contents { data_keys, handles: map };
        let file_key = format::derive(password, &header)?;
        let file = format::seal(&file_key, &header, &contents)?;
        write_atomic(path, &file, Mode::CreateNew)?;
        tracing::info!(path = %path.display(), handles = handles.len(), "created keystore");
        Ok(Self {
            path: path.to_path_buf(),
            state: RwLock::new(State::Ready(Box::new(Unlocked::new(file_key, header, contents)))),
            faults: FaultInjector::from_env(),
        })
    }

    /// Open an existing keystore. It starts [`Status::Locked`].
    pub fn open(path: &Path) -> Result<Self, Error> {
        let file = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let header = Header::parse(&file).map_err(|reason| Error::KeystoreCorrupt { path: path.to_path_buf(), reason })?;
        if let Ok(meta) = std::fs::metadata(path) {
            if meta.permissions().mode() & 0o077 != 0 {
                tracing::warn!(path = %path.display(), mode = format!("{:o}", meta.permissions().mode() & 0o777), "keystore is readable by other users; chmod 600 it");
            }
        }
        Ok(Self { path: path.to_path_buf(), state: RwLock::new(State::Locked { file, header }), faults: FaultInjector::from_env() })
    }

    /// Open and unlock in one step.
    pub fn open_unlocked(path: &Path, password: &Password) -> Result<Self, Error> {
        let hsm = Self::open(path)?;
        hsm.unlock(password)?;
        Ok(hsm)
    }

    /// The keystore file.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The module's fault injector (see [`faults`]).
    #[must_use]
    pub fn faults(&self) -> &FaultInjector {
        &self.faults
    }

    /// Drop the keys from memory; the module becomes [`Status::Locked`].
    ///
    /// The locked state keeps the keystore as this module last wrote it,
    /// re-encrypted from memory (sealing is deterministic: same key, nonce
    /// and contents give the same bytes), so locking never depends on the
    /// file still being readable and cannot fail open.
    pub fn lock(&self) -> Result<(), Error> {
        let mut state = self.write_state();
        if let State::Ready(u) = &*state {
            let file = format::seal(&u.file_key, &u.header, &u.contents)?;
            let header = u.header.clone();
            *state = State::Locked { file, header };
        }
        Ok(())
    }

    /// Create a key handle whose AES key is drawn from the module's random
    /// generator (`key_bits` = 128, 192 or 256). The key never leaves.
    pub fn add_handle(&self, kh: KeyHandle, flags: Flags, key_bits: usize) -> Result<HandleInfo, Error> {
        if !matches!(key_bits, 128 | 192 | 256) {
            return Err(Error::InvalidInput(format!("key size must be 128, 192 or 256 bits, not {key_bits}")));
        }
        let mut key = Zeroizing::new(vec![0u8; key_bits / 8]);
        random_bytes(&mut key)?;
        self.import_handles(&[(kh, flags, HandleKey::new(&key)?)])?;
        Ok(HandleInfo { key_handle: kh, flags, key_bits })
    }

    /// Add handles with known keys (migration from pyhsm), all or nothing.
    /// Existing handle ids are refused.
    pub fn import_handles(&self, new: &[(KeyHandle, Flags, HandleKey)]) -> Result<(), Error> {
        self.mutate(|contents| {
            for (kh, flags, key) in new {
                if contents.handles.contains_key(kh) {
                    return Err(Error::DuplicateKeyHandle(*kh));
                }
                contents.handles.insert(*kh, Handle { flags: *flags, key: key.clone() });
            }
            Ok(())
        })?;
        for (kh, flags, key) in new {
            tracing::info!(key_handle = %kh, %flags, bits = key.bits(), "added key handle");
        }
        Ok(())
    }

    /// Apply `change` to a copy of the contents, persist it, then publish it:
    /// the file is written before anyone can use the new state.
    fn mutate(&self, change: impl FnOnce(&mut Contents) -> Result<(), Error>) -> Result<(), Error> {
        let mut state = self.write_state();
        let State::Ready(u) = &mut *state else { return Err(Error::Locked) };
        let mut contents = u.contents.clone();
        change(&mut contents)?;
        let mut header = u.header.clone();
        random_bytes(&mut header.nonce)?;
        let file = format::seal(&u.file_key, &header, &contents)?;
        write_atomic(&self.path, &file, Mode::Replace)?;
        let file_key = u.file_key.clone();
        **u = Unlocked::new(file_key, header, contents);
        Ok(())
    }

    fn write_state(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        // A panic while holding the lock cannot leave a half-updated state
        // (updates are single assignments), so a poisoned lock is usable.
        self.state.write().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The unlocked keys, once the device boundary has been passed.
    fn ready(&self) -> Result<ReadyGuard<'_>, Error> {
        self.faults.check(&self.path)?;
        let guard = self.state.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        match &*guard {
            State::Ready(_) => Ok(ReadyGuard(guard)),
            State::Locked { .. } => Err(Error::Locked),
        }
    }
}

struct ReadyGuard<'a>(RwLockReadGuard<'a, State>);

impl std::ops::Deref for ReadyGuard<'_> {
    type Target = Unlocked;
    fn deref(&self) -> &Unlocked {
        match &*self.0 {
            State::Ready(u) => u,
            State::Locked { .. } => unreachable!("ReadyGuard is only made for a ready state"),
        }
    }
}

/// The flag a caller-chosen nonce needs, if any. A zero nonce is the
/// YubiHSM's "module chooses" and needs none.
fn nonce_flags(nonce: NonceSource) -> Flags {
    match nonce {
        NonceSource::Given(n) if !n.is_zero() => Flags::USER_NONCE,
        _ => Flags::NONE,
    }
}

fn resolve_nonce(nonce: NonceSource) -> Result<AeadNonce, Error> {
    match nonce {
        NonceSource::Given(n) if !n.is_zero() => Ok(n),
        _ => random_nonce(),
    }
}

/// Every key of a soft keystore is in its file, so `exportable` changes
/// nothing: the file's password is what protects them.
impl KeyAdmin for SoftHsm {
    fn create_handle(&self, kh: KeyHandle, flags: Flags, key_bits: usize, _exportable: bool) -> Result<HandleInfo, Error> {
        self.add_handle(kh, flags, key_bits)
    }

    fn import_handles(&self, new: &[ExportedKey], _exportable: bool) -> Result<(), Error> {
        SoftHsm::import_handles(self, new)
    }

    fn export_handle_keys(&self, handles: &[KeyHandle]) -> Result<Vec<ExportedKey>, Error> {
        let u = self.ready()?;
        handles
            .iter()
            .map(|kh| u.contents.handles.get(kh).map(|h| (*kh, h.flags, h.key.clone())).ok_or(Error::UnknownKeyHandle(*kh)))
            .collect()
    }
}

impl SecurityModule for SoftHsm {
    fn status(&self) -> Status {
        if self.faults.armed() {
            return Status::NotReady;
        }
        match &*self.state.read().unwrap_or_else(std::sync::PoisonError::into_inner) {
            State::Ready(_) => Status::Ready,
            State::Locked { .. } => Status::Locked,
        }
    }

    fn unlock(&self, password: &Password) -> Result<(), Error> {
        self.faults.check(&self.path)?;
        let mut state = self.write_state();
        let (file, header) = match &*state {
            State::Locked { file, header } => (file.clone(), header.clone()),
            State::Ready(u) => {
                // Check the password even when unlocked: a wrong one must fail.
                let key = format::derive(password, &u.header)?;
                return if *key == *u.file_key { Ok(()) } else { Err(Error::WrongPassword) };
            }
        };
        let file_key = format::derive(password, &header)?;
        let contents = format::open(&file_key, &header, &file).map_err(|e| match e {
            OpenError::Authentication => Error::WrongPassword,
            OpenError::Contents(reason) => Error::KeystoreCorrupt { path: self.path.clone(), reason },
        })?;
        *state = State::Ready(Box::new(Unlocked::new(file_key, header, contents)));
        tracing::info!(path = %self.path.display(), "keystore unlocked");
        Ok(())
    }

    fn random(&self, out: &mut [u8]) -> Result<(), Error> {
        self.faults.check(&self.path)?;
        random_bytes(out)
    }

    fn key_handles(&self) -> Result<Vec<HandleInfo>, Error> {
        let u = self.ready()?;
        Ok(u.contents.handles.iter().map(|(kh, h)| HandleInfo { key_handle: *kh, flags: h.flags, key_bits: h.key.bits() }).collect())
    }

    fn generate_yubikey_aeads(&self, handles: &[KeyHandle], nonce: NonceSource) -> Result<Vec<AeadRecord>, Error> {
        if handles.is_empty() {
            return Err(Error::InvalidInput("no key handles given".to_owned()));
        }
        let u = self.ready()?;
        let extra = nonce_flags(nonce);
        let keys = handles
            .iter()
            .map(|kh| u.handle(*kh, "generate AEADs", &[Flags::BUFFER_AEAD_GENERATE | extra]).map(|h| (*kh, h)))
            .collect::<Result<Vec<_>, _>>()?;
        // The secret: key(16) ‖ uid(6), from the module's generator, only
        // ever in zeroizing memory.
        let mut secret = Zeroizing::new([0u8; SECRETS_LEN]);
        random_bytes(&mut secret[..])?;
        keys.into_iter()
            .map(|(kh, h)| {
                let nonce = resolve_nonce(nonce)?;
                Ok(AeadRecord { key_handle: kh, nonce, aead: h.key.seal(kh, &nonce, &secret[..])? })
            })
            .collect()
    }

    fn import_aead(&self, kh: KeyHandle, nonce: NonceSource, plaintext: &[u8]) -> Result<AeadRecord, Error> {
        let u = self.ready()?;
        let extra = nonce_flags(nonce);
        let h = u.handle(
            kh,
            "wrap imported secrets",
            &[Flags::AEAD_GENERATE | extra, Flags::BUFFER_LOAD | Flags::BUFFER_AEAD_GENERATE | extra],
        )?;
        let nonce = resolve_nonce(nonce)?;
        Ok(AeadRecord { key_handle: kh, nonce, aead: h.key.seal(kh, &nonce, plaintext)? })
    }

    fn decode_otp(&self, record: &AeadRecord, otp: &TokenCiphertext) -> Result<OtpDecode, Error> {
        let u = self.ready()?;
        let h = u.handle(record.key_handle, "decode OTPs", &[Flags::OTP_DECODE])?;
        if record.aead.plaintext_len() != SECRETS_LEN {
            return Err(Error::AeadInvalid(otp::Error::Length { what: "YubiKey AEAD", expected: "30", got: record.aead.len() }));
        }
        Ok(otp::decode::decode_otp(&h.key, record.key_handle, &record.nonce, &record.aead, otp)?)
    }

    fn decrypt_aead(&self, record: &AeadRecord) -> Result<Zeroizing<Vec<u8>>, Error> {
        let u = self.ready()?;
        let h = u.handle(record.key_handle, "export AEAD plaintext", &[Flags::EXPORT])?;
        Ok(h.key.open(record.key_handle, &record.nonce, &record.aead)?)
    }

    fn encrypt_value(&self, key: DataKey, plaintext: &[u8]) -> Result<Vec<u8>, Error> {
        let u = self.ready()?;
        let mut nonce = [0u8; 12];
        random_bytes(&mut nonce)?;
        let aad = value_aad(key);
        let ct = u.values[key.index()]
            .encrypt(Nonce::from_slice(&nonce), Payload { msg: plaintext, aad: &aad })
            .map_err(|_| Error::InvalidInput("value too large to encrypt".to_owned()))?;
        let mut out = Vec::with_capacity(1 + 12 + ct.len());
        out.push(VALUE_V1);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ct);
        Ok(out)
    }

    fn decrypt_value(&self, key: DataKey, ciphertext: &[u8]) -> Result<Zeroizing<Vec<u8>>, Error> {
        let u = self.ready()?;
        if ciphertext.len() < 1 + 12 + 16 || ciphertext[0] != VALUE_V1 {
            return Err(Error::ValueInvalid);
        }
        let aad = value_aad(key);
        u.values[key.index()]
            .decrypt(Nonce::from_slice(&ciphertext[1..13]), Payload { msg: &ciphertext[13..], aad: &aad })
            .map(Zeroizing::new)
            .map_err(|_| Error::ValueInvalid)
    }
}

/// Associated data binding a value to its purpose: a config value cannot be
/// passed off as a token value even if the keys were equal.
fn value_aad(key: DataKey) -> Vec<u8> {
    format!("otp-appliance/value/v1/{}", key.name()).into_bytes()
}
