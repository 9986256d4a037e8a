//! The PKCS#11 backend: key handles as AES keys inside a token (SoftHSM2 in
//! tests; YubiHSM 2, CloudHSM, Nitrokey HSM in production), through the
//! `cryptoki` crate.
//!
//! # What lives in the token
//! - **Key handles**: one AES secret key per handle, labelled
//!   `<handle_label_prefix><canonical id>` (default `yhsm-kh-0x20`). The
//!   key is sensitive, not extractable, a token object, private and
//!   encrypt-only (`CKA_ALLOWED_MECHANISMS` = AES-ECB, AES-CBC). Its
//!   **flags** are stored in the key object itself, in `CKA_ID`: the 12
//!   bytes `"KHF1" ‖ LE32(key handle) ‖ LE32(flags)`. Keeping them in the
//!   key (rather than in a separate data object) means they cannot drift
//!   apart or be orphaned. They are enforced here exactly as the soft
//!   backend does. Like the soft keystore's flags under its password, they
//!   bind this software, not a PIN holder: anyone with the user PIN can use
//!   the keys directly. (`CKA_MODIFIABLE` false would freeze them, but
//!   SoftHSM2 then refuses to copy the key into a session object, and its
//!   token objects run at about a third of the speed.)
//!   [`Pkcs11Hsm::add_handle`] generates the key in the token;
//!   [`Pkcs11Hsm::import_handle_key`] loads a known key (migration from
//!   pyhsm), which is the one moment a handle key is outside a token and
//!   deserves a quorum.
//! - **Data keys**: three AES-256 keys `<data_key_label_prefix>token`,
//!   `…config`, `…value`, used with CKM_AES_GCM in the token; created on
//!   first use or by [`Pkcs11Hsm::create_data_keys`]. Values have the soft
//!   backend's layout (`0x01 ‖ nonce(12) ‖ ciphertext ‖ tag(16)`, associated
//!   data naming the purpose) but of course not its keys.
//!
//! # AEADs
//! Byte-compatible with the YubiHSM 1 and the soft backend. No token we
//! target offers CKM_AES_CCM (SoftHSM2 2.6 and 2.7 lack it, as does the
//! YubiHSM 2's module), and `cryptoki` 0.12 cannot even name it (no constant,
//! filtered out of `get_mechanism_list`), so CCM is always built from two
//! token operations per AEAD: an AES-ECB keystream and an AES-CBC (zero IV)
//! MAC, with block layout and XOR on the host (see `ccm.rs`). The handle key
//! never leaves the token.
//!
//! **Honest limit**: the AEAD *plaintext* (the YubiKey's AES key and private
//! id) is in host memory while an OTP is decoded or an AEAD is made, because
//! the XOR of the keystream and the OTP block decryption happen on the host
//! (the same code as the soft backend: [`otp::token::Token::decrypt`], CRC
//! and constant-time uid checks). It is held in `Zeroizing` buffers and
//! wiped after each call. A YubiHSM 1 does this inside the device.
//!
//! The stricter option, [key-in-token mode](wrapped), converts a YubiKey's
//! AEAD once into an AES-KW blob under a wrapping key in the token; its OTPs
//! are then decrypted by the token and the key is never in host memory
//! again.
//!
//! # Robustness
//! - One `Pkcs11` context per module path per process (`C_Initialize` once;
//!   `CKR_CRYPTOKI_ALREADY_INITIALIZED` is accepted).
//! - Sessions come from a small pool: each operation takes one, so every
//!   worker thread works on its own session, and gives it back. Each pooled
//!   session keeps session-object copies of the handle keys it used (still
//!   sensitive and non-extractable; SoftHSM2 runs them about 3× faster than
//!   token objects), which die with the session.
//! - Login is per application and token in PKCS#11; the PIN given to
//!   [`SecurityModule::unlock`] is kept (zeroizing) so that fresh sessions
//!   are logged in, and `CKR_USER_ALREADY_LOGGED_IN` counts as success once
//!   the PIN has been checked (against the PIN that logged the process in).
//! - A session or device error (`CKR_SESSION_HANDLE_INVALID`,
//!   `CKR_DEVICE_REMOVED`, `CKR_TOKEN_NOT_PRESENT`, `CKR_DEVICE_ERROR`, …)
//!   drops every pooled session and cached object handle, finds the token
//!   again (by label, so a renumbered slot is found) and retries, up to
//!   [`Pkcs11Config::retries`] times. What still fails is
//!   [`Error::NotReady`]: a backend failure, never a verdict on an OTP.
//! - [`SecurityModule::status`]: `NotReady` when the module, the token or a
//!   session cannot be had or the token no longer answers `C_GetTokenInfo`
//!   (this also drops the pool and its key copies), `Locked` before a PIN
//!   was given, else `Ready`. Between a token's disappearance and the next
//!   status check or fault, sessions may go on working with their key copies
//!   (SoftHSM2 keeps them in memory when its token files are deleted).
//! - Key-handle flags and object handles are cached per instance; a handle
//!   changed by another process is seen after a reconnect or a new
//!   instance.

mod ccm;
mod config;
pub mod unlock;
pub mod wrapped;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError, RwLock};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, SessionState, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::RawAuthPin;
use otp::aead_file::AeadRecord;
use otp::secrets::SECRETS_LEN;
use otp::{AeadNonce, HandleKey, KeyHandle, OtpDecode, Token, TokenCiphertext, YubiKeySecrets};
use subtle::ConstantTimeEq;
use zeroize::{Zeroize, Zeroizing};

use self::config::SlotSelector;
pub use self::config::{DecodeMode, Pkcs11Config, DEFAULT_DATA_KEY_PREFIX, DEFAULT_HANDLE_PREFIX, DEFAULT_MODULE, DEFAULT_RETRIES};
pub use self::wrapped::TokenWrappedSecret;
use crate::admin::{ExportedKey, KeyAdmin};
use crate::{DataKey, Error, Flags, HandleInfo, NonceSource, OtpFault, Password, SecurityModule, Status};

/// Version byte of [`SecurityModule::encrypt_value`] output (as the soft
/// backend's).
const VALUE_V1: u8 = 1;
/// GCM nonce and tag lengths.
const GCM_NONCE: usize = 12;
const GCM_TAG: usize = 16;
/// Marker of the flag word in a handle key's `CKA_ID`.
const ID_MAGIC: &[u8; 4] = b"KHF1";

/// The `CKA_ID` of a key-handle key: `"KHF1" ‖ LE32(kh) ‖ LE32(flags)`.
fn encode_id(kh: KeyHandle, flags: Flags) -> Vec<u8> {
    let mut id = ID_MAGIC.to_vec();
    id.extend_from_slice(&kh.get().to_le_bytes());
    id.extend_from_slice(&flags.bits().to_le_bytes());
    id
}

/// The flags in a `CKA_ID`, if it is ours and names `kh`.
fn decode_id(id: &[u8], kh: KeyHandle) -> Option<Flags> {
    let rest = id.strip_prefix(ID_MAGIC)?;
    let (handle, flags) = (rest.get(..4)?, rest.get(4..)?);
    if flags.len() != 4 || u32::from_le_bytes(handle.try_into().ok()?) != kh.get() {
        return None;
    }
    Some(Flags::from_bits(u32::from_le_bytes(flags.try_into().ok()?)))
}

// ---------------------------------------------------------------------------
// Process-wide state: one context per module, the PIN that logged in.

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every update under these locks is a single assignment or insertion.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Serializes this process's changes to token objects (creation) against
/// its searches and copies of them. SoftHSM2 2.6 is not safe there: a
/// C_FindObjects or C_CopyObject racing a C_CreateObject/C_GenerateKey of a
/// token object in another thread makes one of them fail with
/// CKR_TEMPLATE_INCONSISTENT or CKR_GENERAL_ERROR (SoftHSMv2 issue 573,
/// fixed after 2.6.1). Only the key ceremony and first uses create or
/// search, so the hot path (encrypt and decrypt) does not take it.
fn token_objects() -> &'static RwLock<()> {
    static TOKEN_OBJECTS: RwLock<()> = RwLock::new(());
    &TOKEN_OBJECTS
}

/// A search or copy of token objects.
fn reading_token_objects() -> std::sync::RwLockReadGuard<'static, ()> {
    token_objects().read().unwrap_or_else(PoisonError::into_inner)
}

/// A creation of token objects (with the searches around it).
fn changing_token_objects() -> std::sync::RwLockWriteGuard<'static, ()> {
    token_objects().write().unwrap_or_else(PoisonError::into_inner)
}

fn libraries() -> &'static Mutex<HashMap<PathBuf, Pkcs11>> {
    static LIBRARIES: OnceLock<Mutex<HashMap<PathBuf, Pkcs11>>> = OnceLock::new();
    LIBRARIES.get_or_init(Default::default)
}

/// For each token (module, slot, serial), the PIN that logged this process
/// in: PKCS#11 login is per application, so a second `C_Login` only says
/// `CKR_USER_ALREADY_LOGGED_IN` and cannot check a PIN.
fn logins() -> &'static Mutex<HashMap<String, Zeroizing<Vec<u8>>>> {
    static LOGINS: OnceLock<Mutex<HashMap<String, Zeroizing<Vec<u8>>>>> = OnceLock::new();
    LOGINS.get_or_init(Default::default)
}

/// The initialised context of a module, loaded once per process.
fn load_library(path: &Path) -> Result<Pkcs11, Error> {
    let mut libs = lock(libraries());
    if let Some(ctx) = libs.get(path) {
        return Ok(ctx.clone());
    }
    if !path.exists() {
        return Err(Error::NotReady(format!(
            "PKCS#11 module {} does not exist (for SoftHSM2, install the Debian package softhsm2)",
            path.display()
        )));
    }
    let ctx = Pkcs11::new(path).map_err(|e| Error::NotReady(format!("cannot load PKCS#11 module {}: {e}", path.display())))?;
    match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(e) => {
            return Err(Error::NotReady(format!(
                "PKCS#11 module {} failed to initialise ({}); SoftHSM2 fails so when its configuration (SOFTHSM2_CONF) is missing or wrong",
                path.display(),
                describe(&e)
            )))
        }
    }
    libs.insert(path.to_path_buf(), ctx.clone());
    Ok(ctx)
}

/// A short description of a cryptoki error (the crate's own text for
/// return values is a paragraph of the specification).
fn describe(e: &CkError) -> String {
    match e {
        CkError::Pkcs11(rv, function) => format!("C_{function} returned {rv:?}"),
        other => other.to_string(),
    }
}

fn find_slot(ctx: &Pkcs11, selector: &SlotSelector, module: &Path) -> Result<Slot, Error> {
    let slots = ctx
        .get_slots_with_initialized_token()
        .map_err(|e| Error::NotReady(format!("cannot list the slots of PKCS#11 module {}: {}", module.display(), describe(&e))))?;
    let label_of = |s: &Slot| ctx.get_token_info(*s).map(|i| i.label().to_owned()).unwrap_or_default();
    let present = || slots.iter().map(|s| format!("{} ({:?})", s.id(), label_of(s))).collect::<Vec<_>>().join(", ");
    match selector {
        SlotSelector::Only => match slots.as_slice() {
            [one] => Ok(*one),
            [] => Err(Error::NotReady(format!("PKCS#11 module {} has no initialised token", module.display()))),
            _ => Err(Error::NotReady(format!(
                "PKCS#11 module {} has several tokens ({}); choose one by token_label",
                module.display(),
                present()
            ))),
        },
        SlotSelector::Number(n) => slots.iter().find(|s| s.id() == *n).copied().ok_or_else(|| {
            Error::NotReady(format!(
                "PKCS#11 module {}: slot {n} holds no initialised token (slots with a token: {})",
                module.display(),
                present()
            ))
        }),
        SlotSelector::Label(label) => {
            let found: Vec<Slot> = slots.iter().filter(|s| label_of(s) == *label).copied().collect();
            match found.as_slice() {
                [one] => Ok(*one),
                [] => Err(Error::NotReady(format!(
                    "PKCS#11 module {} has no token labelled {label:?} (tokens present: {})",
                    module.display(),
                    if slots.is_empty() { "none".to_owned() } else { present() }
                ))),
                _ => Err(Error::NotReady(format!(
                    "PKCS#11 module {} has {} tokens labelled {label:?}; relabel all but one",
                    module.display(),
                    found.len()
                ))),
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Faults inside an operation.

/// An operation's failure: a final answer, or a token error that may be
/// retried on a fresh session.
enum Fault {
    Final(Error),
    Token { step: &'static str, source: CkError },
}

impl From<Error> for Fault {
    fn from(e: Error) -> Self {
        Self::Final(e)
    }
}

fn token(step: &'static str) -> impl FnOnce(CkError) -> Fault {
    move |source| Fault::Token { step, source }
}

/// Errors after which a fresh session (and a fresh look for the token) may
/// succeed.
fn retryable(e: &CkError) -> bool {
    matches!(
        e,
        CkError::Pkcs11(
            RvError::SessionHandleInvalid
                | RvError::SessionClosed
                | RvError::DeviceError
                | RvError::DeviceRemoved
                | RvError::DeviceMemory
                | RvError::TokenNotPresent
                | RvError::TokenNotRecognized
                | RvError::CryptokiNotInitialized
                | RvError::UserNotLoggedIn
                | RvError::KeyHandleInvalid
                | RvError::ObjectHandleInvalid
                | RvError::GeneralError
                | RvError::FunctionFailed,
            _
        )
    )
}

fn ccm_fault(e: ccm::CcmError<CkError>) -> Fault {
    match e {
        ccm::CcmError::Length(msg) => Fault::Final(Error::InvalidInput(msg)),
        ccm::CcmError::Integrity => Fault::Final(Error::AeadInvalid(otp::Error::AeadIntegrity)),
        ccm::CcmError::Ops(source) => Fault::Token { step: "run AES on a key-handle key", source },
        ccm::CcmError::OutputLength => Fault::Final(Error::NotReady("the token returned AES output of the wrong length".to_owned())),
    }
}

/// The handle key's two operations, done by the token.
struct TokenKey<'a> {
    session: &'a Session,
    key: ObjectHandle,
}

impl ccm::BlockOps for TokenKey<'_> {
    type Error = CkError;
    fn ecb_encrypt(&mut self, blocks: &[u8]) -> Result<Zeroizing<Vec<u8>>, CkError> {
        self.session.encrypt(&Mechanism::AesEcb, self.key, blocks).map(Zeroizing::new)
    }
    fn cbc_zero_iv_encrypt(&mut self, blocks: &[u8]) -> Result<Zeroizing<Vec<u8>>, CkError> {
        self.session.encrypt(&Mechanism::AesCbc([0; 16]), self.key, blocks).map(Zeroizing::new)
    }
}

// ---------------------------------------------------------------------------
// The backend.

/// The token as found: context, slot, and a name for the login registry.
struct Connection {
    ctx: Pkcs11,
    slot: Slot,
    /// module, slot and token serial: the key of [`logins`].
    token_id: String,
    generation: u64,
}

/// A pooled session and what it has set up.
struct PooledSession {
    session: Session,
    generation: u64,
    /// Session-object copies of handle keys (or the token object itself
    /// where the token cannot copy).
    copies: HashMap<KeyHandle, ObjectHandle>,
    /// Session-object copies of the handles' wrapping keys
    /// ([key-in-token mode](wrapped)).
    kek_copies: HashMap<KeyHandle, ObjectHandle>,
}

/// A key handle as read from the token.
#[derive(Clone, Copy, Debug)]
struct HandleEntry {
    object: ObjectHandle,
    flags: Flags,
    bits: usize,
}

/// How a key is protected, as the token reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeyProtection {
    /// `CKA_SENSITIVE`: the value is never revealed in plaintext.
    pub sensitive: bool,
    /// `CKA_EXTRACTABLE`: the key may be wrapped out of the token.
    pub extractable: bool,
    /// `CKA_ALWAYS_SENSITIVE`: it has been sensitive since it was made.
    pub always_sensitive: bool,
    /// `CKA_NEVER_EXTRACTABLE`: it has never been extractable.
    pub never_extractable: bool,
    /// `CKA_LOCAL`: generated inside the token.
    pub local: bool,
    /// `CKA_TOKEN`: stored in the token (not a session object).
    pub on_token: bool,
    /// `CKA_MODIFIABLE`: its attributes (the flag word) may be changed.
    pub modifiable: bool,
    /// Whether reading `CKA_VALUE` returned the key.
    pub value_readable: bool,
}

/// The PKCS#11 security module (see the [module docs](self)).
pub struct Pkcs11Hsm {
    config: Pkcs11Config,
    selector: SlotSelector,
    connection: Mutex<Option<Arc<Connection>>>,
    generation: AtomicU64,
    /// The PIN this instance was unlocked with; `None` = locked.
    pin: RwLock<Option<Password>>,
    pool: Mutex<Vec<PooledSession>>,
    handles: RwLock<HashMap<KeyHandle, HandleEntry>>,
    /// Token objects of the data keys, found or created on first use.
    data_keys: Mutex<[Option<ObjectHandle>; 3]>,
    /// `decode = "key-in-token"`: YubiKey AEADs already converted, by
    /// (key handle, nonce, AEAD).
    converted: Mutex<HashMap<[u8; CONVERTED_KEY_LEN], TokenWrappedSecret>>,
}

/// A [`Pkcs11Hsm::converted`] key: LE32 key handle, nonce, AEAD.
const CONVERTED_KEY_LEN: usize = 4 + 6 + otp::aead::YUBIKEY_AEAD_LEN;

impl std::fmt::Debug for Pkcs11Hsm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pkcs11Hsm")
            .field("module", &self.config.module)
            .field("token", &self.selector.to_string())
            .field("unlocked", &self.unlocked())
            .finish_non_exhaustive()
    }
}

impl Pkcs11Hsm {
    /// A module for `config`, without touching the token yet: errors only
    /// for a contradictory configuration. It starts [`Status::Locked`] (or
    /// [`Status::NotReady`] if the token cannot be reached); the configured
    /// PIN source is not read (see [`Pkcs11Hsm::open`]).
    pub fn new(config: Pkcs11Config) -> Result<Self, Error> {
        let selector = config.slot_selector()?;
        Ok(Self {
            config,
            selector,
            connection: Mutex::new(None),
            generation: AtomicU64::new(0),
            pin: RwLock::new(None),
            pool: Mutex::new(Vec::new()),
            handles: RwLock::new(HashMap::new()),
            data_keys: Mutex::new([None; 3]),
            converted: Mutex::new(HashMap::new()),
        })
    }

    /// Load the module, find the token, and log in with the configured PIN
    /// (file or environment) if there is one. Fails with a clear
    /// [`Error::NotReady`] when the module or the token is missing, and with
    /// [`Error::WrongPassword`] for a wrong PIN.
    pub fn open(config: Pkcs11Config) -> Result<Self, Error> {
        let pin = config.read_pin()?;
        let hsm = Self::new(config)?;
        hsm.connect()?;
        if let Some(pin) = pin {
            hsm.unlock(&pin)?;
        }
        Ok(hsm)
    }

    /// The configuration.
    #[must_use]
    pub fn config(&self) -> &Pkcs11Config {
        &self.config
    }

    fn unlocked(&self) -> bool {
        self.pin.read().unwrap_or_else(PoisonError::into_inner).is_some()
    }

    fn require_unlocked(&self) -> Result<(), Error> {
        if self.unlocked() {
            Ok(())
        } else {
            Err(Error::Locked)
        }
    }

    /// The token, found once and again after a fault.
    fn connect(&self) -> Result<Arc<Connection>, Error> {
        let mut conn = lock(&self.connection);
        if let Some(c) = &*conn {
            return Ok(Arc::clone(c));
        }
        let ctx = load_library(&self.config.module)?;
        let slot = find_slot(&ctx, &self.selector, &self.config.module)?;
        let serial = ctx.get_token_info(slot).map(|i| i.serial_number().to_owned()).unwrap_or_default();
        let c = Arc::new(Connection {
            token_id: format!("{}|{}|{serial}", self.config.module.display(), slot.id()),
            ctx,
            slot,
            generation: self.generation.load(Ordering::SeqCst),
        });
        *conn = Some(Arc::clone(&c));
        Ok(c)
    }

    /// Forget the token, every session and every cached object handle.
    fn reset(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        *lock(&self.connection) = None;
        lock(&self.pool).clear();
        self.handles.write().unwrap_or_else(PoisonError::into_inner).clear();
        *lock(&self.data_keys) = [None; 3];
    }

    fn checkout(&self) -> Result<(Arc<Connection>, PooledSession), Fault> {
        let conn = self.connect()?;
        let pooled = {
            let mut pool = lock(&self.pool);
            pool.retain(|s| s.generation == conn.generation);
            pool.pop()
        };
        let s = match pooled {
            Some(s) => s,
            None => {
                let session = conn.ctx.open_rw_session(conn.slot).map_err(token("open a session"))?;
                PooledSession { session, generation: conn.generation, copies: HashMap::new(), kek_copies: HashMap::new() }
            }
        };
        // Log the session in if the application is not (another instance
        // may have logged out, or the token was re-inserted).
        let pin = self.pin.read().unwrap_or_else(PoisonError::into_inner).clone();
        if let Some(pin) = pin {
            let state = s.session.get_session_info().map_err(token("read the session state"))?.session_state();
            if !matches!(state, SessionState::RoUser | SessionState::RwUser) {
                match self.login(&conn, &s.session, &pin) {
                    Ok(()) => {}
                    Err(Fault::Final(Error::WrongPassword)) => {
                        return Err(Fault::Final(Error::NotReady(
                            "the token no longer accepts the PIN this module was unlocked with".to_owned(),
                        )))
                    }
                    Err(other) => return Err(other),
                }
            }
        }
        Ok((conn, s))
    }

    fn checkin(&self, s: PooledSession) {
        if s.generation == self.generation.load(Ordering::SeqCst) {
            lock(&self.pool).push(s);
        }
    }

    /// Run `f` on a pooled session, retrying on a fresh one after session
    /// or device errors.
    fn run<T>(
        &self,
        operation: &'static str,
        mut f: impl FnMut(&Self, &Connection, &mut PooledSession) -> Result<T, Fault>,
    ) -> Result<T, Error> {
        let mut attempt = 0;
        loop {
            let outcome = match self.checkout() {
                Ok((conn, mut s)) => {
                    let r = f(self, &conn, &mut s);
                    if !matches!(r, Err(Fault::Token { .. })) {
                        self.checkin(s);
                    }
                    r
                }
                Err(fault) => Err(fault),
            };
            match outcome {
                Ok(v) => return Ok(v),
                Err(Fault::Final(e)) => return Err(e),
                Err(Fault::Token { step, source }) => {
                    if retryable(&source) {
                        // Start afresh, whether or not this call retries.
                        self.reset();
                        if attempt < self.config.retries {
                            attempt += 1;
                            tracing::warn!(operation, step, error = %describe(&source), attempt, "PKCS#11 token error; retrying on a fresh session");
                            continue;
                        }
                    }
                    return Err(Error::NotReady(format!(
                        "PKCS#11 token failed to {step} ({}) while trying to {operation}",
                        describe(&source)
                    )));
                }
            }
        }
    }

    /// `C_Login` as the user, tolerating a process already logged in once
    /// the PIN is known to be the one that logged it in.
    fn login(&self, conn: &Connection, session: &Session, pin: &Password) -> Result<(), Fault> {
        let raw = || RawAuthPin::new(Box::new(pin.expose().to_vec()));
        let record = || {
            lock(logins()).insert(conn.token_id.clone(), Zeroizing::new(pin.expose().to_vec()));
        };
        let refused = |e: CkError| match e {
            CkError::Pkcs11(RvError::PinIncorrect | RvError::PinInvalid | RvError::PinLenRange, _) => Fault::Final(Error::WrongPassword),
            CkError::Pkcs11(RvError::PinLocked, _) => Fault::Final(Error::NotReady(
                "the token's user PIN is locked after too many wrong PINs; the security officer must reset it".to_owned(),
            )),
            CkError::Pkcs11(RvError::UserPinNotInitialized, _) => {
                Fault::Final(Error::NotReady("the token has no user PIN yet; initialise it first".to_owned()))
            }
            other => Fault::Token { step: "log in", source: other },
        };
        match session.login_with_raw(UserType::User, &raw()) {
            Ok(()) => {
                record();
                Ok(())
            }
            Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {
                let known = lock(logins()).get(&conn.token_id).map(|k| bool::from(k.as_slice().ct_eq(pin.expose())));
                match known {
                    Some(true) => Ok(()),
                    Some(false) => Err(Fault::Final(Error::WrongPassword)),
                    None => {
                        // Logged in by someone we cannot ask: check the PIN
                        // by logging in again.
                        let _ = session.logout();
                        session.login_with_raw(UserType::User, &raw()).map_err(refused)?;
                        record();
                        Ok(())
                    }
                }
            }
            Err(e) => Err(refused(e)),
        }
    }

    // ---- key handles ------------------------------------------------------

    fn lookup_handle(&self, session: &Session, kh: KeyHandle) -> Result<HandleEntry, Fault> {
        if let Some(e) = self.handles.read().unwrap_or_else(PoisonError::into_inner).get(&kh) {
            return Ok(*e);
        }
        let label = self.config.handle_label(kh);
        let _reading = reading_token_objects();
        let found = session.find_objects(&token_key_template(&label)).map_err(token("find a key-handle key"))?;
        let object = match found.as_slice() {
            [] => return Err(Fault::Final(Error::UnknownKeyHandle(kh))),
            [one] => *one,
            _ => {
                return Err(Fault::Final(Error::NotReady(format!(
                    "the token holds {} keys labelled {label:?}; remove all but one",
                    found.len()
                ))))
            }
        };
        let entry = read_entry(session, object, kh, &label)?;
        self.handles.write().unwrap_or_else(PoisonError::into_inner).insert(kh, entry);
        Ok(entry)
    }

    /// The handle, if one of `needs` (alternatives) is among its flags.
    fn permitted(&self, session: &Session, kh: KeyHandle, operation: &'static str, needs: &[Flags]) -> Result<HandleEntry, Fault> {
        let e = self.lookup_handle(session, kh)?;
        if needs.iter().any(|n| e.flags.contains(*n)) {
            Ok(e)
        } else {
            Err(Fault::Final(Error::NotPermitted { key_handle: kh, operation, needs: needs.first().copied().unwrap_or(Flags::NONE) }))
        }
    }

    /// The object to compute with: this session's copy of the handle key.
    fn key_object(s: &mut PooledSession, kh: KeyHandle, entry: &HandleEntry) -> ObjectHandle {
        if let Some(o) = s.copies.get(&kh) {
            return *o;
        }
        let copied = {
            let _reading = reading_token_objects();
            s.session.copy_object(entry.object, &[Attribute::Token(false)])
        };
        let o = match copied {
            Ok(copy) => copy,
            Err(e) => {
                tracing::debug!(key_handle = %kh, error = %describe(&e), "token cannot copy the key into a session object; using the token object");
                entry.object
            }
        };
        s.copies.insert(kh, o);
        o
    }

    fn resolve_nonce(session: &Session, nonce: NonceSource) -> Result<AeadNonce, Fault> {
        match nonce {
            NonceSource::Given(n) if !n.is_zero() => Ok(n),
            _ => loop {
                let mut n = [0u8; 6];
                session.generate_random_slice(&mut n).map_err(token("generate a nonce"))?;
                let n = AeadNonce::new(n);
                // Zero means "module chooses" on a YubiHSM; never emit one.
                if !n.is_zero() {
                    return Ok(n);
                }
            },
        }
    }

    /// Create a key handle whose AES key (`key_bits` = 128, 192 or 256) is
    /// generated inside the token: sensitive, not extractable, a private
    /// token object, encrypt-only (ECB and CBC, where the token honours
    /// `CKA_ALLOWED_MECHANISMS`), flags in `CKA_ID`.
    pub fn add_handle(&self, kh: KeyHandle, flags: Flags, key_bits: usize) -> Result<HandleInfo, Error> {
        self.create_handle_key(kh, flags, key_bits, None, false)
    }

    /// Load a **known** AES key as a key handle: the migration path from
    /// pyhsm or a YubiHSM 1 configuration, where the key exists outside any
    /// token. It is the one moment a handle key is in host memory and gives
    /// whoever holds the key every AEAD made under it, so callers should
    /// gate it like a key ceremony (quorum approval). The key is stored as
    /// [`Pkcs11Hsm::add_handle`] stores generated ones (sensitive, not
    /// extractable), but the token will not mark it `CKA_LOCAL` or
    /// `CKA_NEVER_EXTRACTABLE`-since-birth.
    pub fn import_handle_key(&self, kh: KeyHandle, flags: Flags, key: &HandleKey) -> Result<HandleInfo, Error> {
        self.create_handle_key(kh, flags, key.bits(), Some(key.expose()), false)
    }

    /// `extractable`: the key may leave the token, wrapped (still
    /// sensitive: never shown in plaintext).
    fn create_handle_key(
        &self,
        kh: KeyHandle,
        flags: Flags,
        key_bits: usize,
        value: Option<&[u8]>,
        extractable: bool,
    ) -> Result<HandleInfo, Error> {
        if !matches!(key_bits, 128 | 192 | 256) {
            return Err(Error::InvalidInput(format!("key size must be 128, 192 or 256 bits, not {key_bits}")));
        }
        self.require_unlocked()?;
        let label = self.config.handle_label(kh);
        let find = token_key_template(&label);
        self.run("create a key handle", |_, _, s| {
            let _changing = changing_token_objects();
            if !s.session.find_objects(&find).map_err(token("look for the key handle"))?.is_empty() {
                return Err(Fault::Final(Error::DuplicateKeyHandle(kh)));
            }
            let mut template = vec![
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::KeyType(KeyType::AES),
                Attribute::Label(label.clone().into_bytes()),
                Attribute::Id(encode_id(kh, flags)),
                Attribute::Token(true),
                Attribute::Private(true),
                Attribute::Sensitive(true),
                Attribute::Extractable(extractable),
                Attribute::Encrypt(true),
                Attribute::Decrypt(false),
                Attribute::Sign(false),
                Attribute::Verify(false),
                Attribute::Wrap(false),
                Attribute::Unwrap(false),
                Attribute::Derive(false),
                Attribute::AllowedMechanisms(vec![MechanismType::AES_ECB, MechanismType::AES_CBC]),
            ];
            let created = match value {
                None => {
                    template.push(Attribute::ValueLen((key_bits as u64 / 8).into()));
                    s.session.generate_key(&Mechanism::AesKeyGen, &template)
                }
                Some(key) => {
                    template.push(Attribute::Value(key.to_vec()));
                    let r = s.session.create_object(&template);
                    for a in &mut template {
                        if let Attribute::Value(v) = a {
                            v.zeroize();
                        }
                    }
                    r
                }
            };
            let object = created.map_err(token("create the key-handle key"))?;
            // Someone else created the same handle meanwhile: keep theirs.
            if s.session.find_objects(&find).map_err(token("look for the key handle"))?.len() > 1 {
                let _ = s.session.destroy_object(object);
                return Err(Fault::Final(Error::DuplicateKeyHandle(kh)));
            }
            Ok(())
        })?;
        self.handles.write().unwrap_or_else(PoisonError::into_inner).remove(&kh);
        tracing::info!(key_handle = %kh, %flags, bits = key_bits, generated_in_token = value.is_none(), extractable, "added key handle");
        Ok(HandleInfo { key_handle: kh, flags, key_bits })
    }

    /// How the token protects a handle's key (read back from the token).
    pub fn key_protection(&self, kh: KeyHandle) -> Result<KeyProtection, Error> {
        self.require_unlocked()?;
        self.run("read a key's protection", |this, _, s| {
            let e = this.lookup_handle(&s.session, kh)?;
            let _reading = reading_token_objects();
            protection_of(&s.session, e.object, AttributeType::Value, "read the key's attributes")
        })
    }

    // ---- data keys --------------------------------------------------------

    /// Make sure the three data keys exist in the token (creating missing
    /// ones: AES-256, sensitive, not extractable, GCM only).
    pub fn create_data_keys(&self) -> Result<(), Error> {
        self.require_unlocked()?;
        for key in DataKey::ALL {
            self.run("create the data keys", |this, _, s| this.data_key(&s.session, key))?;
        }
        Ok(())
    }

    fn data_key(&self, session: &Session, key: DataKey) -> Result<ObjectHandle, Fault> {
        // Held while creating, so that this instance creates a key once.
        let mut keys = lock(&self.data_keys);
        if let Some(o) = keys[key.index()] {
            return Ok(o);
        }
        let label = self.config.data_key_label(key);
        let find = token_key_template(&label);
        let _changing = changing_token_objects();
        let found = session.find_objects(&find).map_err(token("find a data key"))?;
        let object = match found.as_slice() {
            [one] => *one,
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
                    Attribute::Encrypt(true),
                    Attribute::Decrypt(true),
                    Attribute::Sign(false),
                    Attribute::Wrap(false),
                    Attribute::Unwrap(false),
                    Attribute::Derive(false),
                    Attribute::AllowedMechanisms(vec![MechanismType::AES_GCM]),
                ];
                let o = session.generate_key(&Mechanism::AesKeyGen, &template).map_err(token("create a data key"))?;
                tracing::info!(label = %label, "created data key in the token");
                o
            }
            _ => {
                return Err(Fault::Final(Error::NotReady(format!(
                    "the token holds {} keys labelled {label:?}; values would be ambiguous",
                    found.len()
                ))))
            }
        };
        keys[key.index()] = Some(object);
        Ok(object)
    }
}

/// The search for a token (not session) secret key by label: the session
/// copies of handle keys carry the same label and must not count.
fn token_key_template(label: &str) -> [Attribute; 3] {
    [Attribute::Class(ObjectClass::SECRET_KEY), Attribute::Token(true), Attribute::Label(label.as_bytes().to_vec())]
}

/// A handle's flags and size from its key object.
fn read_entry(session: &Session, object: ObjectHandle, kh: KeyHandle, label: &str) -> Result<HandleEntry, Fault> {
    let attrs = session
        .get_attributes(object, &[AttributeType::Id, AttributeType::ValueLen, AttributeType::KeyType])
        .map_err(token("read a key handle's attributes"))?;
    let (mut flags, mut len, mut aes) = (None, 0u64, false);
    for a in attrs {
        match a {
            Attribute::Id(id) => flags = decode_id(&id, kh),
            Attribute::ValueLen(l) => len = *l,
            Attribute::KeyType(t) => aes = t == KeyType::AES,
            _ => {}
        }
    }
    let flags = flags.ok_or_else(|| {
        Fault::Final(Error::NotReady(format!(
            "key {label:?} carries no flag word for key handle {kh} in CKA_ID; create key handles with add_handle or import_handle_key"
        )))
    })?;
    let bits = usize::try_from(len).unwrap_or(0).saturating_mul(8);
    if !aes || !matches!(bits, 128 | 192 | 256) {
        return Err(Fault::Final(Error::NotReady(format!("key {label:?} is not an AES key of 128, 192 or 256 bits"))));
    }
    Ok(HandleEntry { object, flags, bits })
}

/// The flag a caller-chosen nonce needs (none for a zero nonce, which asks
/// the module to choose).
fn nonce_flags(nonce: NonceSource) -> Flags {
    match nonce {
        NonceSource::Given(n) if !n.is_zero() => Flags::USER_NONCE,
        _ => Flags::NONE,
    }
}

/// The OTP check on a decrypted YubiKey AEAD, as the soft backend does it
/// (`otp::decode`): AES-128 decrypt the token, check its CRC, compare the
/// uid in constant time.
fn check_otp(plain: &[u8], otp: &TokenCiphertext) -> Result<OtpDecode, Error> {
    let secrets = YubiKeySecrets::from_plaintext(plain)?;
    let token = Token::decrypt(&secrets.key, otp)?;
    if !token.uid_matches(&secrets.uid) {
        return Err(Error::OtpInvalid(OtpFault::UidMismatch));
    }
    Ok(OtpDecode::from_token(&token))
}

/// Associated data binding a value to its purpose (as the soft backend).
fn value_aad(key: DataKey) -> Vec<u8> {
    format!("otp-appliance/value/v1/{}", key.name()).into_bytes()
}

/// The key ceremony on a token. Handles made `exportable` are sensitive but
/// extractable: the token never shows their value, but lets them out
/// wrapped; [`KeyAdmin::export_handle_keys`] wraps each under a fresh
/// session key and unwraps a non-sensitive session copy to read it, so the
/// key is in host memory (zeroized) only for the servers' keystore. Other
/// handles can never leave the token.
impl KeyAdmin for Pkcs11Hsm {
    fn create_handle(&self, kh: KeyHandle, flags: Flags, key_bits: usize, exportable: bool) -> Result<HandleInfo, Error> {
        self.create_handle_key(kh, flags, key_bits, None, exportable)
    }

    fn import_handles(&self, new: &[ExportedKey], exportable: bool) -> Result<(), Error> {
        // A token has no transaction: check first, so that a clash fails
        // before anything is stored.
        let held = self.key_handles()?;
        if let Some((kh, _, _)) = new.iter().find(|(kh, _, _)| held.iter().any(|h| h.key_handle == *kh)) {
            return Err(Error::DuplicateKeyHandle(*kh));
        }
        for (kh, flags, key) in new {
            self.create_handle_key(*kh, *flags, key.bits(), Some(key.expose()), exportable)?;
        }
        Ok(())
    }

    fn export_handle_keys(&self, handles: &[KeyHandle]) -> Result<Vec<ExportedKey>, Error> {
        self.require_unlocked()?;
        handles
            .iter()
            .map(|&kh| {
                let value = self.run("export a key-handle key", |this, _, s| {
                    let e = this.lookup_handle(&s.session, kh)?;
                    if !protection_of(&s.session, e.object, AttributeType::Value, "read the key's attributes")?.extractable {
                        return Err(Fault::Final(Error::Unsupported(format!(
                            "key handle {kh} was made non-extractable in the token: its key cannot leave it"
                        ))));
                    }
                    let session_key = [
                        Attribute::Class(ObjectClass::SECRET_KEY),
                        Attribute::KeyType(KeyType::AES),
                        Attribute::ValueLen(32.into()),
                        Attribute::Token(false),
                        Attribute::Wrap(true),
                        Attribute::Unwrap(true),
                    ];
                    let kek = s.session.generate_key(&Mechanism::AesKeyGen, &session_key).map_err(token("make a session wrapping key"))?;
                    let copy = [
                        Attribute::Class(ObjectClass::SECRET_KEY),
                        Attribute::KeyType(KeyType::AES),
                        Attribute::Token(false),
                        Attribute::Sensitive(false),
                        Attribute::Extractable(true),
                    ];
                    let read = s
                        .session
                        .wrap_key(&Mechanism::AesKeyWrap, kek, e.object)
                        .and_then(|wrapped| s.session.unwrap_key(&Mechanism::AesKeyWrap, kek, &wrapped, &copy))
                        .and_then(|plain| {
                            let attrs = s.session.get_attributes(plain, &[AttributeType::Value]);
                            let _ = s.session.destroy_object(plain);
                            attrs
                        });
                    let _ = s.session.destroy_object(kek);
                    let mut attrs = read.map_err(token("wrap the key out of the token"))?;
                    let value = attrs.iter_mut().find_map(|a| match a {
                        Attribute::Value(v) => Some(Zeroizing::new(std::mem::take(v))),
                        _ => None,
                    });
                    Ok((e.flags, value.ok_or_else(|| Fault::Final(Error::NotReady("the token did not return the key".to_owned())))?))
                })?;
                let (flags, key) = value;
                Ok((kh, flags, HandleKey::new(&key)?))
            })
            .collect()
    }
}

impl SecurityModule for Pkcs11Hsm {
    fn status(&self) -> Status {
        // The token must still answer: a cached slot whose token is gone
        // (removed, deleted) drops every session and key copy, and the
        // token is looked for afresh.
        let present = self.connect().map(|c| c.ctx.get_token_info(c.slot).is_ok());
        match present {
            Ok(true) => {}
            Ok(false) => {
                tracing::warn!(module = %self.config.module.display(), token = %self.selector, "PKCS#11 token no longer answers");
                self.reset();
                if self.connect().is_err() {
                    return Status::NotReady;
                }
            }
            Err(_) => return Status::NotReady,
        }
        if !self.unlocked() {
            return Status::Locked;
        }
        let probe = self.run("check the token", |_, _, s| {
            let state = s.session.get_session_info().map_err(token("read the session state"))?.session_state();
            Ok(matches!(state, SessionState::RoUser | SessionState::RwUser))
        });
        match probe {
            Ok(true) => Status::Ready,
            Ok(false) | Err(_) => Status::NotReady,
        }
    }

    fn unlock(&self, password: &Password) -> Result<(), Error> {
        self.run("log in", |this, conn, s| this.login(conn, &s.session, password))?;
        *self.pin.write().unwrap_or_else(PoisonError::into_inner) = Some(password.clone());
        tracing::info!(module = %self.config.module.display(), token = %self.selector, "PKCS#11 token unlocked");
        Ok(())
    }

    fn random(&self, out: &mut [u8]) -> Result<(), Error> {
        self.run("generate random bytes", |_, _, s| s.session.generate_random_slice(out).map_err(token("generate random bytes"))).map_err(
            |e| match e {
                Error::NotReady(m) => Error::Random(m),
                other => other,
            },
        )
    }

    fn key_handles(&self) -> Result<Vec<HandleInfo>, Error> {
        self.require_unlocked()?;
        let prefix = self.config.handle_label_prefix.as_bytes();
        self.run("list key handles", |this, _, s| {
            let objects = {
                let _reading = reading_token_objects();
                s.session.find_objects(&[Attribute::Class(ObjectClass::SECRET_KEY), Attribute::Token(true)])
            }
            .map_err(token("list keys"))?;
            let mut out = Vec::new();
            for object in objects {
                let attrs = s.session.get_attributes(object, &[AttributeType::Label]).map_err(token("read a key label"))?;
                let Some(Attribute::Label(label)) = attrs.into_iter().next() else { continue };
                let Some(id) = label.strip_prefix(prefix).and_then(|r| std::str::from_utf8(r).ok()) else { continue };
                let Ok(kh) = id.parse::<KeyHandle>() else { continue };
                if this.config.handle_label(kh).as_bytes() != label.as_slice() {
                    continue;
                }
                match read_entry(&s.session, object, kh, &String::from_utf8_lossy(&label)) {
                    Ok(e) => out.push(HandleInfo { key_handle: kh, flags: e.flags, key_bits: e.bits }),
                    Err(Fault::Final(e)) => tracing::warn!(key_handle = %kh, error = %e, "skipping a malformed key handle"),
                    Err(fault) => return Err(fault),
                }
            }
            out.sort_by_key(|h| h.key_handle);
            Ok(out)
        })
    }

    fn generate_yubikey_aeads(&self, handles: &[KeyHandle], nonce: NonceSource) -> Result<Vec<AeadRecord>, Error> {
        if handles.is_empty() {
            return Err(Error::InvalidInput("no key handles given".to_owned()));
        }
        self.require_unlocked()?;
        let extra = nonce_flags(nonce);
        self.run("generate YubiKey AEADs", |this, _, s| {
            let entries = handles
                .iter()
                .map(|kh| this.permitted(&s.session, *kh, "generate AEADs", &[Flags::BUFFER_AEAD_GENERATE | extra]).map(|e| (*kh, e)))
                .collect::<Result<Vec<_>, _>>()?;
            // The secret key(16) ‖ uid(6), from the token's generator.
            let mut secret = Zeroizing::new([0u8; SECRETS_LEN]);
            s.session.generate_random_slice(&mut secret[..]).map_err(token("generate a YubiKey secret"))?;
            let mut out = Vec::with_capacity(entries.len());
            for (kh, e) in entries {
                let nonce = Self::resolve_nonce(&s.session, nonce)?;
                let key = Self::key_object(s, kh, &e);
                let aead = ccm::seal(&mut TokenKey { session: &s.session, key }, kh, &nonce, &secret[..]).map_err(ccm_fault)?;
                out.push(AeadRecord { key_handle: kh, nonce, aead });
            }
            Ok(out)
        })
    }

    fn import_aead(&self, kh: KeyHandle, nonce: NonceSource, plaintext: &[u8]) -> Result<AeadRecord, Error> {
        self.require_unlocked()?;
        let extra = nonce_flags(nonce);
        self.run("wrap an imported secret", |this, _, s| {
            let e = this.permitted(
                &s.session,
                kh,
                "wrap imported secrets",
                &[Flags::AEAD_GENERATE | extra, Flags::BUFFER_LOAD | Flags::BUFFER_AEAD_GENERATE | extra],
            )?;
            let nonce = Self::resolve_nonce(&s.session, nonce)?;
            let key = Self::key_object(s, kh, &e);
            let aead = ccm::seal(&mut TokenKey { session: &s.session, key }, kh, &nonce, plaintext).map_err(ccm_fault)?;
            Ok(AeadRecord { key_handle: kh, nonce, aead })
        })
    }

    fn decode_otp(&self, record: &AeadRecord, otp: &TokenCiphertext) -> Result<OtpDecode, Error> {
        self.require_unlocked()?;
        if self.config.decode == DecodeMode::KeyInToken {
            return self.decode_otp_in_token(&self.converted_secret(record)?, otp);
        }
        let kh = record.key_handle;
        let plain = self.run("decode an OTP", |this, _, s| {
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
            Ok(plain)
        })?;
        check_otp(&plain[..], otp)
    }

    fn decrypt_aead(&self, record: &AeadRecord) -> Result<Zeroizing<Vec<u8>>, Error> {
        self.require_unlocked()?;
        let kh = record.key_handle;
        self.run("decrypt an AEAD", |this, _, s| {
            let e = this.permitted(&s.session, kh, "export AEAD plaintext", &[Flags::EXPORT])?;
            let key = Self::key_object(s, kh, &e);
            let mut out = Zeroizing::new(vec![0u8; record.aead.plaintext_len()]);
            ccm::open_into(&mut TokenKey { session: &s.session, key }, kh, &record.nonce, &record.aead, &mut out).map_err(ccm_fault)?;
            Ok(out)
        })
    }

    fn encrypt_value(&self, key: DataKey, plaintext: &[u8]) -> Result<Vec<u8>, Error> {
        self.require_unlocked()?;
        let aad = value_aad(key);
        self.run("encrypt a value", |this, _, s| {
            let object = this.data_key(&s.session, key)?;
            let mut iv = [0u8; GCM_NONCE];
            s.session.generate_random_slice(&mut iv).map_err(token("generate a nonce"))?;
            let params = GcmParams::new(&mut iv, &aad, ((GCM_TAG * 8) as u64).into())
                .map_err(|e| Fault::Final(Error::InvalidInput(format!("GCM parameters: {e}"))))?;
            let ct = s.session.encrypt(&Mechanism::AesGcm(params), object, plaintext).map_err(token("encrypt with a data key"))?;
            // Store the IV the token used, read back from the parameter
            // buffer: most tokens use ours, but some (AWS CloudHSM) generate
            // their own and write it there.
            let mut out = Vec::with_capacity(1 + GCM_NONCE + ct.len());
            out.push(VALUE_V1);
            out.extend_from_slice(&iv);
            out.extend_from_slice(&ct);
            Ok(out)
        })
    }

    fn decrypt_value(&self, key: DataKey, ciphertext: &[u8]) -> Result<Zeroizing<Vec<u8>>, Error> {
        self.require_unlocked()?;
        if ciphertext.len() < 1 + GCM_NONCE + GCM_TAG || ciphertext[0] != VALUE_V1 {
            return Err(Error::ValueInvalid);
        }
        let aad = value_aad(key);
        self.run("decrypt a value", |this, _, s| {
            let object = this.data_key(&s.session, key)?;
            let mut iv = [0u8; GCM_NONCE];
            iv.copy_from_slice(&ciphertext[1..1 + GCM_NONCE]);
            let params = GcmParams::new(&mut iv, &aad, ((GCM_TAG * 8) as u64).into())
                .map_err(|e| Fault::Final(Error::InvalidInput(format!("GCM parameters: {e}"))))?;
            match s.session.decrypt(&Mechanism::AesGcm(params), object, &ciphertext[1 + GCM_NONCE..]) {
                Ok(plain) => Ok(Zeroizing::new(plain)),
                // SoftHSM2 2.6 reports a bad tag as CKR_GENERAL_ERROR: it is
                // a verdict only if the session is demonstrably alive.
                Err(CkError::Pkcs11(
                    RvError::GeneralError | RvError::EncryptedDataInvalid | RvError::EncryptedDataLenRange | RvError::FunctionFailed,
                    _,
                )) if s.session.get_session_info().is_ok() => Err(Fault::Final(Error::ValueInvalid)),
                Err(e) => Err(Fault::Token { step: "decrypt with a data key", source: e }),
            }
        })
    }
}

/// How the token protects `object`: its protection attributes read back,
/// and whether `secret` (the key value, or an RSA private exponent) came
/// out readable (its bytes, if any, are wiped at once).
fn protection_of(session: &Session, object: ObjectHandle, secret: AttributeType, what: &'static str) -> Result<KeyProtection, Fault> {
    let attrs = session
        .get_attributes(
            object,
            &[
                AttributeType::Sensitive,
                AttributeType::Extractable,
                AttributeType::AlwaysSensitive,
                AttributeType::NeverExtractable,
                AttributeType::Local,
                AttributeType::Token,
                AttributeType::Modifiable,
                secret,
            ],
        )
        .map_err(token(what))?;
    let mut p = KeyProtection {
        sensitive: false,
        extractable: true,
        always_sensitive: false,
        never_extractable: false,
        local: false,
        on_token: false,
        modifiable: true,
        value_readable: false,
    };
    for a in attrs {
        match a {
            Attribute::Sensitive(v) => p.sensitive = v,
            Attribute::Extractable(v) => p.extractable = v,
            Attribute::AlwaysSensitive(v) => p.always_sensitive = v,
            Attribute::NeverExtractable(v) => p.never_extractable = v,
            Attribute::Local(v) => p.local = v,
            Attribute::Token(v) => p.on_token = v,
            Attribute::Modifiable(v) => p.modifiable = v,
            Attribute::Value(mut v) | Attribute::PrivateExponent(mut v) => {
                p.value_readable = !v.is_empty();
                v.zeroize();
            }
            _ => {}
        }
    }
    Ok(p)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn flag_word_in_cka_id() {
        let kh = KeyHandle::new(0x2000);
        let id = encode_id(kh, Flags::PERSONALIZER);
        assert_eq!(id.len(), 12);
        assert_eq!(decode_id(&id, kh), Some(Flags::PERSONALIZER));
        assert_eq!(decode_id(&id, KeyHandle::new(0x2001)), None, "bound to its handle");
        assert_eq!(decode_id(&id[..11], kh), None);
        assert_eq!(decode_id(b"\x01", kh), None);
        let mut other = id.clone();
        other[0] = b'X';
        assert_eq!(decode_id(&other, kh), None);
    }

    #[test]
    fn config_selects_slots_and_pins() {
        let c = Pkcs11Config::default();
        assert_eq!(c.slot_selector().unwrap(), SlotSelector::Only);
        assert_eq!(Pkcs11Config { slot: Some(-1), ..c.clone() }.slot_selector().unwrap(), SlotSelector::Only);
        assert_eq!(Pkcs11Config { slot: Some(7), ..c.clone() }.slot_selector().unwrap(), SlotSelector::Number(7));
        assert!(Pkcs11Config { slot: Some(-2), ..c.clone() }.slot_selector().is_err());
        assert!(Pkcs11Config { slot: Some(1), ..Pkcs11Config::for_token("T") }.slot_selector().is_err());
        assert_eq!(Pkcs11Config::for_token("T").slot_selector().unwrap(), SlotSelector::Label("T".to_owned()));
        assert_eq!(c.handle_label(KeyHandle::new(0x20)), "yhsm-kh-0x20");
        assert_eq!(c.data_key_label(DataKey::Config), "otp-appliance-config");
        let both = Pkcs11Config { pin_file: Some("/x".into()), pin_env: Some("X".into()), ..c.clone() };
        assert!(matches!(both.read_pin(), Err(Error::InvalidInput(_))));
        let unset = Pkcs11Config { pin_env: Some("OTP_APPLIANCE_SURELY_UNSET_PIN_VARIABLE".into()), ..c };
        let e = unset.read_pin().unwrap_err();
        assert!(e.to_string().contains("OTP_APPLIANCE_SURELY_UNSET_PIN_VARIABLE"), "{e}");
    }
}
