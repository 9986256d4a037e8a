//! Crypto officers: accounts, two-factor login and sessions.
//!
//! Everything lives in one SQLite database, [`Home::operators_db`] (WAL,
//! `synchronous = FULL`, mode 0600, schema created on open): operators,
//! their 2FA public keys, outstanding challenges, sessions, and the quorum
//! policy, requests and approvals of [`crate::quorum`].
//!
//! # Passwords
//!
//! Password hashes are argon2id PHC strings
//! (`$argon2id$v=19$m=…,t=…,p=…$salt$hash`). The per-installation pepper from
//! `personalizer.toml` ([`crate::home::Config::pepper_bytes`]) is argon2's
//! **secret parameter** (`Argon2::new_with_secret`, the "K" input of RFC
//! 9106), not a prefix of the password: it never appears in the database,
//! so whoever can write `operators.db` but not read the configuration
//! cannot plant a hash of a password they know. The cost is [`KdfCost`]
//! ([`KdfCost::DEFAULT`]: 64 MiB, 3 passes, 1 lane); a hash is verified
//! with the parameters recorded in its own PHC string.
//!
//! A failed password check says only "wrong operator name or password",
//! and an unknown name costs one hash too.
//!
//! # Two factors
//!
//! Every session needs both factors: the password, then a signature with
//! the operator's registered RSA-2048 key over a fresh challenge. An
//! operator without a 2FA key (never registered, or disabled with
//! [`OperatorDb::disable_2fa`]) **cannot open sessions** at all.
//!
//! Challenges travel as an [`AuthData`] file in the shape of CloudHSM's
//! authentication data file:
//!
//! ```json
//! {"Version":"1.0","PublicKey":"","Data":[{"HsmId":"laptop-1","Digest":"<base64 of 32 bytes>","Signature":""}]}
//! ```
//!
//! The operator signs the 32 decoded `Digest` bytes (`base64 -d > d.bin;
//! openssl dgst -sha256 -sign key.pem -out d.sig d.bin`, or CloudHSM's
//! `openssl pkeyutl -sign -inkey key.pem -pkeyopt digest:sha256 -in d.bin
//! -out d.sig`) and puts the base64 signature into `Signature`. The digest
//! is 32 bytes from the operating system's random number generator.
//! Challenges are bound to one operator and one [`ChallengePurpose`],
//! expire after `challenge_ttl_secs`, are answered at most once (a wrong
//! signature uses the challenge up too), and become void when the
//! operator's credentials change in between.
//!
//! Registering ([`OperatorDb::begin_set_2fa`]) or rotating
//! ([`OperatorDb::begin_rotate_2fa`]) a key proves possession of the new
//! private key the same way: the challenge carries the new public key in
//! `PublicKey` and must be signed with the new key.
//!
//! # Sessions
//!
//! A successful [`OperatorDb::finish_login`] returns a 32-byte random
//! [`SessionToken`] (64 hex characters) once; the database stores only its
//! SHA-256. A session lasts `session_ttl_secs` and ends earlier with
//! [`OperatorDb::logout`] or when the operator's password or 2FA key
//! changes (set, rotated or disabled). Every privileged command calls
//! [`OperatorDb::session`].
//!
//! # Authorisation
//!
//! This module checks credentials; deciding who may call
//! [`OperatorDb::add`], [`OperatorDb::reset_password`] or
//! [`OperatorDb::disable_2fa`] (another operator's session, a quorum) is
//! the caller's job. Times are seconds since the Unix epoch, passed in as
//! `now`.

use std::fmt;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use hsm::fsutil::{write_atomic, Mode};
use hsm::signing::{SigningError, SigningKey, VerifyingKey};
use hsm::Password;
use rand_core::RngCore;
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

use crate::home::{Home, HomeError};
use crate::quorum::QuorumOperation;

/// `Version` of the [`AuthData`] files this module writes and reads.
pub const AUTHDATA_VERSION: &str = "1.0";

/// Errors of operator accounts, logins, sessions and quorum approvals.
/// Each message is a sentence meant for the operator.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OperatorError {
    /// Not a valid operator name.
    #[error("{0:?} is not a valid operator name: use 1 to 32 characters from a-z, 0-9, '.', '_' and '-'")]
    BadName(String),
    /// An operator of that name exists.
    #[error("operator {0} exists already")]
    Exists(OperatorName),
    /// No operator of that name.
    #[error("there is no operator named {0}")]
    NoSuchOperator(OperatorName),
    /// The name or the password is wrong (deliberately not saying which).
    #[error("wrong operator name or password")]
    WrongCredentials,
    /// The operator has no 2FA key, so cannot open sessions.
    #[error("operator {0} has no 2FA key; every session needs 2FA, so register a key first")]
    No2fa(OperatorName),
    /// The operator has a 2FA key already.
    #[error("operator {0} has a 2FA key already; rotate it instead")]
    Has2fa(OperatorName),
    /// Another operator registered this public key.
    #[error("this public key is already the 2FA key of {0}; every operator needs their own key")]
    KeyInUse(OperatorName),
    /// Rotation to the key already registered.
    #[error("the new key is the current 2FA key of {0}")]
    SameKey(OperatorName),
    /// The authentication data file is malformed or for another module.
    #[error("invalid authentication data: {0}")]
    BadAuthData(String),
    /// No such challenge for this operator and purpose.
    #[error("this challenge was not issued to {operator} for {purpose}")]
    UnknownChallenge {
        /// Who answered.
        operator: OperatorName,
        /// What for.
        purpose: ChallengePurpose,
    },
    /// The challenge expired.
    #[error("this challenge expired at {0}; start again")]
    ChallengeExpired(u64),
    /// The challenge was answered before.
    #[error("this challenge was used already; start again")]
    ChallengeUsed,
    /// The operator's credentials changed after the challenge was issued.
    #[error("the credentials of {0} changed after this challenge was issued; start again")]
    ChallengeVoided(OperatorName),
    /// The 2FA signature does not verify.
    #[error("the signature does not verify with the 2FA key of {0}")]
    BadSignature(OperatorName),
    /// Not a session token.
    #[error("not a session token: {0}")]
    BadToken(String),
    /// No such session: never opened, or logged out.
    #[error("there is no such session (logged out, or never opened); log in again")]
    NoSession,
    /// The session expired.
    #[error("the session of {operator} expired at {expires_at}; log in again")]
    SessionExpired {
        /// Whose session.
        operator: OperatorName,
        /// When it ended.
        expires_at: u64,
    },
    /// The session ended because the operator's credentials changed.
    #[error("the session of {0} is no longer valid: {1}; log in again")]
    SessionRevoked(OperatorName, &'static str),
    /// A quorum M outside 2..=8.
    #[error("a quorum must need between 2 and 8 approvals, not {0}")]
    PolicyOutOfRange(u64),
    /// A quorum M larger than the number of operators with 2FA.
    #[error("a quorum of {m} is more than the {n} operators with 2FA could ever give")]
    PolicyTooLarge {
        /// Requested M.
        m: u64,
        /// Operators with 2FA.
        n: u64,
    },
    /// Not a quorum operation name.
    #[error("{0:?} is not a quorum operation (create-key-handle, import-key-handle, export-keystore, plaintext-output or change-policy)")]
    BadOperation(String),
    /// An empty or unprintable quorum context.
    #[error("a quorum context must be 1 to 256 printable characters")]
    BadContext,
    /// The quorum token file is malformed.
    #[error("invalid quorum token: {0}")]
    BadQuorumToken(String),
    /// No quorum request of that id.
    #[error("there is no quorum request {0}")]
    NoSuchRequest(i64),
    /// The quorum request expired.
    #[error("quorum request {id} expired at {expires}; make a new request")]
    RequestExpired {
        /// The request.
        id: i64,
        /// When it expired.
        expires: u64,
    },
    /// The quorum request was consumed already.
    #[error("quorum request {0} was used already; make a new request")]
    RequestUsed(i64),
    /// The quorum request is for another operation.
    #[error("quorum request {id} is for {actual}, not {expected}")]
    WrongOperation {
        /// The request.
        id: i64,
        /// What the command needs.
        expected: QuorumOperation,
        /// What was approved.
        actual: QuorumOperation,
    },
    /// The quorum request is for another context.
    #[error("quorum request {id} is for {actual:?}, not {expected:?}")]
    WrongContext {
        /// The request.
        id: i64,
        /// What the command needs.
        expected: String,
        /// What was approved.
        actual: String,
    },
    /// Someone else made the quorum request.
    #[error("quorum request {id} was made by {requester}, not by {operator}")]
    WrongRequester {
        /// The request.
        id: i64,
        /// Who made it.
        requester: OperatorName,
        /// Who tried to use it.
        operator: OperatorName,
    },
    /// The operator approved this request before.
    #[error("{operator} approved quorum request {id} already; approvals must come from distinct operators")]
    DuplicateApprover {
        /// The request.
        id: i64,
        /// The approver.
        operator: OperatorName,
    },
    /// The approval signature does not verify.
    #[error("the approval signature of {operator} does not verify for quorum request {id}")]
    BadApproval {
        /// The request.
        id: i64,
        /// The approver.
        operator: OperatorName,
    },
    /// A recorded approval no longer counts.
    #[error("the approval of {0} no longer counts: {1}; ask for a new request")]
    ApprovalInvalid(OperatorName, &'static str),
    /// Not enough approvals.
    #[error("{have} of {need} approvals; {} more needed", need - have)]
    TooFewApprovals {
        /// Approvals recorded.
        have: u64,
        /// Approvals the policy requires.
        need: u64,
    },
    /// Password hashing failed (bad parameters, or a corrupt hash).
    #[error("password hashing failed: {0}")]
    Kdf(String),
    /// The random number generator failed.
    #[error("the operating system's random number generator failed: {0}")]
    Random(String),
    /// A timestamp out of range.
    #[error("time {0} is out of range")]
    BadTime(u64),
    /// The database failed.
    #[error("operators database: {0}")]
    Db(#[from] rusqlite::Error),
    /// The configuration is unusable.
    #[error(transparent)]
    Home(#[from] HomeError),
    /// A file could not be read or written.
    #[error(transparent)]
    Hsm(#[from] hsm::Error),
    /// A key could not be used.
    #[error(transparent)]
    Signing(#[from] SigningError),
}

/// An operator name: 1 to 32 characters from `[a-z0-9._-]`.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct OperatorName(String);

impl OperatorName {
    /// The name.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for OperatorName {
    type Err = OperatorError;
    fn from_str(s: &str) -> Result<Self, OperatorError> {
        let ok = (1..=32).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b));
        if ok {
            Ok(Self(s.to_owned()))
        } else {
            Err(OperatorError::BadName(s.to_owned()))
        }
    }
}

impl TryFrom<String> for OperatorName {
    type Error = OperatorError;
    fn try_from(s: String) -> Result<Self, OperatorError> {
        s.parse()
    }
}

impl From<OperatorName> for String {
    fn from(n: OperatorName) -> String {
        n.0
    }
}

impl fmt::Display for OperatorName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for OperatorName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

/// argon2id cost of new password hashes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KdfCost {
    /// Memory in KiB.
    pub memory_kib: u32,
    /// Passes over the memory.
    pub iterations: u32,
    /// Lanes.
    pub parallelism: u32,
}

impl KdfCost {
    /// 64 MiB, 3 passes, 1 lane: a fraction of a second on a laptop.
    pub const DEFAULT: Self = Self { memory_kib: 64 * 1024, iterations: 3, parallelism: 1 };
    /// The smallest argon2 allows (8 KiB, 1 pass): for tests only.
    pub const MINIMAL: Self = Self { memory_kib: 8, iterations: 1, parallelism: 1 };

    fn params(self) -> Result<Params, OperatorError> {
        Params::new(self.memory_kib, self.iterations, self.parallelism, Some(32)).map_err(|e| OperatorError::Kdf(e.to_string()))
    }
}

impl Default for KdfCost {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// What a challenge is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChallengePurpose {
    /// The second factor of a login.
    Login,
    /// Proof of possession of a first 2FA key.
    Register2fa,
    /// Proof of possession of a replacement 2FA key.
    Rotate2fa,
}

impl ChallengePurpose {
    fn as_str(self) -> &'static str {
        match self {
            Self::Login => "login",
            Self::Register2fa => "register-2fa",
            Self::Rotate2fa => "rotate-2fa",
        }
    }
}

impl fmt::Display for ChallengePurpose {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A CloudHSM-style authentication data file: the challenge and, once the
/// operator signed it, the signature.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthData {
    /// Always [`AUTHDATA_VERSION`].
    #[serde(rename = "Version")]
    pub version: String,
    /// The key being registered (SPKI PEM), empty for a login.
    #[serde(rename = "PublicKey")]
    pub public_key: String,
    /// One entry per module; this personalizer writes exactly one.
    #[serde(rename = "Data")]
    pub data: Vec<AuthDataEntry>,
}

/// One challenge of an [`AuthData`] file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthDataEntry {
    /// The module's name (`hsm_id` in `personalizer.toml`).
    #[serde(rename = "HsmId")]
    pub hsm_id: String,
    /// Base64 of the 32 challenge bytes.
    #[serde(rename = "Digest")]
    pub digest: String,
    /// Base64 of the operator's signature over the challenge bytes; empty
    /// until signed.
    #[serde(rename = "Signature")]
    pub signature: String,
}

impl AuthData {
    fn new(hsm_id: &str, public_key: String, digest: &[u8; 32]) -> Self {
        Self {
            version: AUTHDATA_VERSION.to_owned(),
            public_key,
            data: vec![AuthDataEntry { hsm_id: hsm_id.to_owned(), digest: B64.encode(digest), signature: String::new() }],
        }
    }

    /// Read an authentication data file.
    pub fn read(path: &Path) -> Result<Self, OperatorError> {
        let text = std::fs::read_to_string(path).map_err(|e| hsm::Error::io(path, e))?;
        serde_json::from_str(&text).map_err(|e| OperatorError::BadAuthData(format!("{}: {e}", path.display())))
    }

    /// Write it (mode 0600, replacing an existing file).
    pub fn write(&self, path: &Path) -> Result<(), OperatorError> {
        let mut text = serde_json::to_string_pretty(self).map_err(|e| OperatorError::BadAuthData(e.to_string()))?;
        text.push('\n');
        write_atomic(path, text.as_bytes(), Mode::Replace)?;
        Ok(())
    }

    fn entry(&self) -> Result<&AuthDataEntry, OperatorError> {
        if self.version != AUTHDATA_VERSION {
            return Err(OperatorError::BadAuthData(format!("version {:?}, expected {AUTHDATA_VERSION:?}", self.version)));
        }
        match self.data.as_slice() {
            [entry] => Ok(entry),
            other => Err(OperatorError::BadAuthData(format!("{} Data entries, expected exactly one", other.len()))),
        }
    }

    /// The 32 challenge bytes (what the operator signs).
    pub fn digest(&self) -> Result<[u8; 32], OperatorError> {
        let entry = self.entry()?;
        let bytes = B64.decode(entry.digest.trim()).map_err(|_| OperatorError::BadAuthData("Digest is not base64".to_owned()))?;
        bytes.try_into().map_err(|_| OperatorError::BadAuthData("Digest is not 32 bytes".to_owned()))
    }

    /// The decoded signature.
    pub fn signature(&self) -> Result<Vec<u8>, OperatorError> {
        let entry = self.entry()?;
        if entry.signature.trim().is_empty() {
            return Err(OperatorError::BadAuthData("Signature is empty: sign the Digest first".to_owned()));
        }
        B64.decode(entry.signature.trim()).map_err(|_| OperatorError::BadAuthData("Signature is not base64".to_owned()))
    }

    /// Put a signature (raw bytes, e.g. the file `openssl dgst -sign`
    /// wrote) into every entry.
    pub fn set_signature(&mut self, signature: &[u8]) {
        for entry in &mut self.data {
            entry.signature = B64.encode(signature);
        }
    }

    /// Sign every entry's digest with `key` (`sha256WithRSAEncryption` over
    /// the 32 bytes, as `openssl dgst -sha256 -sign` does). For tests and
    /// tools; operators normally sign with openssl.
    pub fn sign_with(&mut self, key: &SigningKey) -> Result<(), OperatorError> {
        for entry in &mut self.data {
            let digest = B64.decode(entry.digest.trim()).map_err(|_| OperatorError::BadAuthData("Digest is not base64".to_owned()))?;
            entry.signature = B64.encode(key.sign(&digest)?);
        }
        Ok(())
    }
}

/// A session token: 32 random bytes as 64 hex characters. Shown once;
/// zeroized on drop and redacted in `Debug`.
#[derive(Clone)]
pub struct SessionToken(Zeroizing<String>);

impl SessionToken {
    /// Parse a token (surrounding whitespace is ignored).
    pub fn parse(text: &str) -> Result<Self, OperatorError> {
        let t = text.trim();
        if t.len() == 64 && t.bytes().all(|b| b.is_ascii_hexdigit()) {
            Ok(Self(Zeroizing::new(t.to_ascii_lowercase())))
        } else {
            Err(OperatorError::BadToken("expected 64 hex characters".to_owned()))
        }
    }

    /// The token text, to hand to the operator.
    #[must_use]
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Read a token file.
    pub fn read(path: &Path) -> Result<Self, OperatorError> {
        let text = Zeroizing::new(std::fs::read_to_string(path).map_err(|e| hsm::Error::io(path, e))?);
        Self::parse(&text)
    }

    /// Write the token to a file (mode 0600, replacing an existing one).
    pub fn write(&self, path: &Path) -> Result<(), OperatorError> {
        let text = Zeroizing::new(format!("{}\n", self.expose()));
        write_atomic(path, text.as_bytes(), Mode::Replace)?;
        Ok(())
    }

    fn hash(&self) -> [u8; 32] {
        Sha256::digest(self.0.as_bytes()).into()
    }
}

impl fmt::Debug for SessionToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SessionToken(REDACTED)")
    }
}

/// A valid session, as checked by [`OperatorDb::session`].
#[derive(Clone)]
pub struct Session {
    /// Whose.
    pub operator: OperatorName,
    /// When it was opened.
    pub created_at: u64,
    /// When it ends.
    pub expires_at: u64,
    pub(crate) token_hash: [u8; 32],
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session")
            .field("operator", &self.operator)
            .field("created_at", &self.created_at)
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

/// What a successful login returns: the token (once) and the session.
#[derive(Debug)]
pub struct NewSession {
    /// Give this to the operator; it is not stored.
    pub token: SessionToken,
    /// The session.
    pub session: Session,
}

/// One operator, as listed (never the hash).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct OperatorInfo {
    /// The name.
    pub name: OperatorName,
    /// Whether a 2FA key is registered (without one, no sessions).
    pub two_factor: bool,
    /// SHA-256 of the 2FA key's SPKI DER, hex.
    pub key_fingerprint: Option<String>,
    /// When the operator was added.
    pub created_at: u64,
    /// When the password was last set.
    pub password_changed_at: u64,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS operators (
    name TEXT PRIMARY KEY,
    password_hash TEXT NOT NULL,
    public_key_pem TEXT,
    key_fingerprint TEXT UNIQUE,
    epoch INTEGER NOT NULL DEFAULT 0,
    created_at INTEGER NOT NULL,
    password_changed_at INTEGER NOT NULL,
    two_factor_changed_at INTEGER
);
CREATE TABLE IF NOT EXISTS challenges (
    id INTEGER PRIMARY KEY,
    operator TEXT NOT NULL REFERENCES operators(name),
    purpose TEXT NOT NULL,
    digest BLOB NOT NULL UNIQUE,
    pending_key_pem TEXT,
    epoch INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    used INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS sessions (
    token_hash BLOB PRIMARY KEY,
    operator TEXT NOT NULL REFERENCES operators(name),
    epoch INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS quorum_policy (
    operation TEXT PRIMARY KEY,
    m INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS quorum_requests (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    operation TEXT NOT NULL,
    context TEXT NOT NULL,
    requester TEXT NOT NULL REFERENCES operators(name),
    nonce BLOB NOT NULL,
    token BLOB NOT NULL,
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    used_at INTEGER
);
CREATE TABLE IF NOT EXISTS quorum_approvals (
    request_id INTEGER NOT NULL REFERENCES quorum_requests(id),
    operator TEXT NOT NULL REFERENCES operators(name),
    signature BLOB NOT NULL,
    approved_at INTEGER NOT NULL,
    PRIMARY KEY (request_id, operator)
);
PRAGMA user_version = 1;
";

/// The operators database.
pub struct OperatorDb {
    pub(crate) conn: Connection,
    pepper: Zeroizing<Vec<u8>>,
    pub(crate) hsm_id: String,
    session_ttl: u64,
    challenge_ttl: u64,
    cost: KdfCost,
}

impl fmt::Debug for OperatorDb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OperatorDb").field("hsm_id", &self.hsm_id).field("cost", &self.cost).finish_non_exhaustive()
    }
}

pub(crate) fn to_db_time(t: u64) -> Result<i64, OperatorError> {
    i64::try_from(t).map_err(|_| OperatorError::BadTime(t))
}

pub(crate) fn from_db_time(t: i64) -> u64 {
    u64::try_from(t).unwrap_or(0)
}

pub(crate) fn random32() -> Result<[u8; 32], OperatorError> {
    let mut b = [0u8; 32];
    rand_core::OsRng.try_fill_bytes(&mut b).map_err(|e| OperatorError::Random(e.to_string()))?;
    Ok(b)
}

/// The registered key of an operator row.
pub(crate) struct OperatorRow {
    pub(crate) password_hash: Zeroizing<String>,
    pub(crate) key: Option<VerifyingKey>,
    pub(crate) epoch: i64,
}

pub(crate) fn load_operator(conn: &Connection, name: &OperatorName) -> Result<Option<OperatorRow>, OperatorError> {
    let row: Option<(String, Option<String>, i64)> = conn
        .query_row("SELECT password_hash, public_key_pem, epoch FROM operators WHERE name = ?1", [name.as_str()], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })
        .optional()?;
    match row {
        None => Ok(None),
        Some((hash, pem, epoch)) => {
            let key = pem.map(|p| VerifyingKey::from_pem(&p)).transpose()?;
            Ok(Some(OperatorRow { password_hash: Zeroizing::new(hash), key, epoch }))
        }
    }
}

/// Check a session by its token hash inside `conn` (possibly a transaction).
pub(crate) fn check_session(conn: &Connection, token_hash: &[u8; 32], now: u64) -> Result<Session, OperatorError> {
    let row: Option<(Vec<u8>, String, i64, i64, i64)> = conn
        .query_row(
            "SELECT token_hash, operator, epoch, created_at, expires_at FROM sessions WHERE token_hash = ?1",
            [&token_hash[..]],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
        )
        .optional()?;
    let Some((stored, operator, epoch, created_at, expires_at)) = row else {
        return Err(OperatorError::NoSession);
    };
    if !bool::from(stored.ct_eq(&token_hash[..])) {
        return Err(OperatorError::NoSession);
    }
    let operator: OperatorName = operator.parse()?;
    let expires_at = from_db_time(expires_at);
    if now >= expires_at {
        return Err(OperatorError::SessionExpired { operator, expires_at });
    }
    let Some(row) = load_operator(conn, &operator)? else {
        return Err(OperatorError::SessionRevoked(operator, "the operator was removed"));
    };
    if row.key.is_none() {
        return Err(OperatorError::SessionRevoked(operator, "2FA was disabled"));
    }
    if row.epoch != epoch {
        return Err(OperatorError::SessionRevoked(operator, "the password or the 2FA key changed"));
    }
    Ok(Session { operator, created_at: from_db_time(created_at), expires_at, token_hash: *token_hash })
}

impl OperatorDb {
    /// Open (creating if needed) [`Home::operators_db`] with the pepper,
    /// TTLs, `hsm_id` and password-hash cost of the home's configuration
    /// (`operator_kdf_memory_mib`, `operator_kdf_iterations`; by default
    /// [`KdfCost::DEFAULT`]).
    pub fn open(home: &Home) -> Result<Self, OperatorError> {
        let config = home.config();
        let cost = KdfCost {
            memory_kib: config.operator_kdf_memory_mib.saturating_mul(1024),
            iterations: config.operator_kdf_iterations,
            parallelism: 1,
        };
        Self::open_with_cost(home, cost)
    }

    /// [`OperatorDb::open`] with another cost for new password hashes.
    pub fn open_with_cost(home: &Home, cost: KdfCost) -> Result<Self, OperatorError> {
        cost.params()?;
        let config = home.config();
        let pepper = config.pepper_bytes()?;
        let path = home.operators_db();
        create_private_file(&path)?;
        let conn = Connection::open(&path)?;
        conn.busy_timeout(Duration::from_secs(10))?;
        let mode: String = conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(OperatorError::Db(rusqlite::Error::InvalidParameterName(format!("journal_mode is {mode}, not wal"))));
        }
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.execute_batch(SCHEMA)?;
        Ok(Self {
            conn,
            pepper,
            hsm_id: config.hsm_id.clone(),
            session_ttl: config.session_ttl_secs,
            challenge_ttl: config.challenge_ttl_secs,
            cost,
        })
    }

    /// Change the cost of password hashes made from now on.
    pub fn set_kdf_cost(&mut self, cost: KdfCost) -> Result<(), OperatorError> {
        cost.params()?;
        self.cost = cost;
        Ok(())
    }

    /// The module name written into challenge files.
    #[must_use]
    pub fn hsm_id(&self) -> &str {
        &self.hsm_id
    }

    fn argon2(&self, params: Params) -> Result<Argon2<'_>, OperatorError> {
        Argon2::new_with_secret(&self.pepper, Algorithm::Argon2id, Version::V0x13, params).map_err(|e| OperatorError::Kdf(e.to_string()))
    }

    fn hash_password(&self, password: &Password) -> Result<Zeroizing<String>, OperatorError> {
        let salt = SaltString::encode_b64(&random32()?[..16]).map_err(|e| OperatorError::Kdf(e.to_string()))?;
        let hash =
            self.argon2(self.cost.params()?)?.hash_password(password.expose(), &salt).map_err(|e| OperatorError::Kdf(e.to_string()))?;
        Ok(Zeroizing::new(hash.to_string()))
    }

    fn password_matches(&self, password: &Password, phc: &str) -> Result<bool, OperatorError> {
        let parsed = PasswordHash::new(phc).map_err(|e| OperatorError::Kdf(format!("stored hash: {e}")))?;
        if parsed.algorithm != Algorithm::Argon2id.ident() {
            return Err(OperatorError::Kdf(format!("stored hash uses {}, not argon2id", parsed.algorithm)));
        }
        // `verify_password` uses the hash's own parameters, keeps the
        // secret (pepper) and compares in constant time.
        Ok(self.argon2(self.cost.params()?)?.verify_password(password.expose(), &parsed).is_ok())
    }

    /// The first factor: the operator's row if the password is right;
    /// otherwise the generic [`OperatorError::WrongCredentials`], after
    /// hashing anyway when the name is unknown.
    fn check_password(&self, conn: &Connection, name: &OperatorName, password: &Password) -> Result<OperatorRow, OperatorError> {
        match load_operator(conn, name)? {
            Some(row) => {
                if self.password_matches(password, &row.password_hash)? {
                    Ok(row)
                } else {
                    Err(OperatorError::WrongCredentials)
                }
            }
            None => {
                let _ = self.hash_password(password)?;
                Err(OperatorError::WrongCredentials)
            }
        }
    }

    /// Add an operator (without 2FA: register a key before they can log
    /// in).
    pub fn add(&mut self, name: &OperatorName, password: &Password, now: u64) -> Result<(), OperatorError> {
        let hash = self.hash_password(password)?;
        let t = to_db_time(now)?;
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        if load_operator(&tx, name)?.is_some() {
            return Err(OperatorError::Exists(name.clone()));
        }
        tx.execute(
            "INSERT INTO operators (name, password_hash, created_at, password_changed_at) VALUES (?1, ?2, ?3, ?3)",
            params![name.as_str(), hash.as_str(), t],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Change an operator's password, given the current one. Ends their
    /// sessions.
    pub fn passwd(&mut self, name: &OperatorName, current: &Password, new: &Password, now: u64) -> Result<(), OperatorError> {
        self.check_password(&self.conn, name, current)?;
        self.reset_password(name, new, now)
    }

    /// Set an operator's password without the current one (the caller
    /// authorises this, e.g. with a quorum). Ends their sessions.
    pub fn reset_password(&mut self, name: &OperatorName, new: &Password, now: u64) -> Result<(), OperatorError> {
        let hash = self.hash_password(new)?;
        let t = to_db_time(now)?;
        let n = self.conn.execute(
            "UPDATE operators SET password_hash = ?2, password_changed_at = ?3, epoch = epoch + 1 WHERE name = ?1",
            params![name.as_str(), hash.as_str(), t],
        )?;
        if n == 0 {
            return Err(OperatorError::NoSuchOperator(name.clone()));
        }
        self.conn.execute("DELETE FROM sessions WHERE operator = ?1", [name.as_str()])?;
        Ok(())
    }

    fn issue_challenge(
        &mut self,
        name: &OperatorName,
        purpose: ChallengePurpose,
        pending: Option<&VerifyingKey>,
        epoch: i64,
        now: u64,
    ) -> Result<AuthData, OperatorError> {
        let digest = random32()?;
        let expires = to_db_time(now.saturating_add(self.challenge_ttl))?;
        let pem = pending.map(VerifyingKey::to_pem).transpose()?;
        self.conn.execute(
            "INSERT INTO challenges (operator, purpose, digest, pending_key_pem, epoch, expires_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![name.as_str(), purpose.as_str(), &digest[..], pem, epoch, expires],
        )?;
        Ok(AuthData::new(&self.hsm_id, pem.unwrap_or_default(), &digest))
    }

    fn check_new_key(&self, name: &OperatorName, key: &VerifyingKey) -> Result<(), OperatorError> {
        let owner: Option<String> =
            self.conn.query_row("SELECT name FROM operators WHERE key_fingerprint = ?1", [key.fingerprint()], |r| r.get(0)).optional()?;
        match owner {
            Some(o) if o == name.as_str() => Err(OperatorError::SameKey(name.clone())),
            Some(o) => Err(OperatorError::KeyInUse(o.parse()?)),
            None => Ok(()),
        }
    }

    /// Step 1 of registering an operator's first 2FA key (`openssl pkey
    /// -pubout` of their RSA-2048 key), authorised by their password: the
    /// challenge to sign with the new key, `PublicKey` set to it.
    pub fn begin_set_2fa(
        &mut self,
        name: &OperatorName,
        password: &Password,
        key: &VerifyingKey,
        now: u64,
    ) -> Result<AuthData, OperatorError> {
        let row = self.check_password(&self.conn, name, password)?;
        if row.key.is_some() {
            return Err(OperatorError::Has2fa(name.clone()));
        }
        self.check_new_key(name, key)?;
        self.issue_challenge(name, ChallengePurpose::Register2fa, Some(key), row.epoch, now)
    }

    /// Step 2 of registering: the challenge signed with the new key. The
    /// operator can log in from now on.
    pub fn set_2fa(&mut self, name: &OperatorName, signed: &AuthData, now: u64) -> Result<String, OperatorError> {
        self.finish_key_change(name, ChallengePurpose::Register2fa, signed, now)
    }

    /// Step 1 of replacing a 2FA key, from the operator's own session
    /// (which proves the password and the old key): the challenge to sign
    /// with the new key.
    pub fn begin_rotate_2fa(&mut self, session: &Session, key: &VerifyingKey, now: u64) -> Result<AuthData, OperatorError> {
        let session = check_session(&self.conn, &session.token_hash, now)?;
        let name = session.operator;
        let row = load_operator(&self.conn, &name)?.ok_or_else(|| OperatorError::NoSuchOperator(name.clone()))?;
        self.check_new_key(&name, key)?;
        self.issue_challenge(&name, ChallengePurpose::Rotate2fa, Some(key), row.epoch, now)
    }

    /// Step 2 of rotating: the challenge signed with the new key. The old
    /// key stops working and every session of the operator ends.
    pub fn rotate_2fa(&mut self, name: &OperatorName, signed: &AuthData, now: u64) -> Result<String, OperatorError> {
        self.finish_key_change(name, ChallengePurpose::Rotate2fa, signed, now)
    }

    /// Remove an operator's 2FA key (the caller authorises this). The
    /// operator can no longer open sessions, their sessions end, and their
    /// pending quorum approvals stop counting, until a key is registered
    /// again with [`OperatorDb::begin_set_2fa`].
    pub fn disable_2fa(&mut self, name: &OperatorName, now: u64) -> Result<(), OperatorError> {
        let t = to_db_time(now)?;
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let row = load_operator(&tx, name)?.ok_or_else(|| OperatorError::NoSuchOperator(name.clone()))?;
        if row.key.is_none() {
            return Err(OperatorError::No2fa(name.clone()));
        }
        tx.execute(
            "UPDATE operators SET public_key_pem = NULL, key_fingerprint = NULL, two_factor_changed_at = ?2, epoch = epoch + 1 WHERE name = ?1",
            params![name.as_str(), t],
        )?;
        tx.execute("DELETE FROM sessions WHERE operator = ?1", [name.as_str()])?;
        tx.commit()?;
        Ok(())
    }

    /// Check and use up the challenge answered in `signed`: returns the
    /// pending key and the operator's row, or an error (a wrong signature
    /// uses the challenge up too). `key` is the key to verify with when
    /// the challenge has no pending key (login).
    fn answer_challenge(
        tx: &Connection,
        name: &OperatorName,
        purpose: ChallengePurpose,
        signed: &AuthData,
        hsm_id: &str,
        now: u64,
    ) -> Result<(Option<VerifyingKey>, OperatorRow), OperatorError> {
        let entry = signed.entry()?;
        if entry.hsm_id != hsm_id {
            return Err(OperatorError::BadAuthData(format!("HsmId {:?} is not this module ({hsm_id:?})", entry.hsm_id)));
        }
        let digest = signed.digest()?;
        let signature = signed.signature()?;
        let challenge: Option<(i64, Option<String>, i64, i64, bool)> = tx
            .query_row(
                "SELECT id, pending_key_pem, epoch, expires_at, used FROM challenges WHERE operator = ?1 AND purpose = ?2 AND digest = ?3",
                params![name.as_str(), purpose.as_str(), &digest[..]],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
            )
            .optional()?;
        let Some((id, pending, epoch, expires_at, used)) = challenge else {
            return Err(OperatorError::UnknownChallenge { operator: name.clone(), purpose });
        };
        if used {
            return Err(OperatorError::ChallengeUsed);
        }
        let expires_at = from_db_time(expires_at);
        if now >= expires_at {
            return Err(OperatorError::ChallengeExpired(expires_at));
        }
        tx.execute("UPDATE challenges SET used = 1 WHERE id = ?1", [id])?;
        let row = load_operator(tx, name)?.ok_or_else(|| OperatorError::NoSuchOperator(name.clone()))?;
        if row.epoch != epoch {
            return Err(OperatorError::ChallengeVoided(name.clone()));
        }
        let pending = pending.map(|p| VerifyingKey::from_pem(&p)).transpose()?;
        if let Some(p) = &pending {
            if !signed.public_key.trim().is_empty() && VerifyingKey::from_pem(&signed.public_key)? != *p {
                return Err(OperatorError::BadAuthData("PublicKey is not the key this challenge was issued for".to_owned()));
            }
        }
        let verify_with = match (&pending, &row.key) {
            (Some(p), _) => p,
            (None, Some(k)) => k,
            (None, None) => return Err(OperatorError::No2fa(name.clone())),
        };
        verify_with.verify_challenge(&digest, &signature).map_err(|_| OperatorError::BadSignature(name.clone()))?;
        Ok((pending, row))
    }

    /// Run `answer_challenge` in a write transaction; a failure after the
    /// challenge was used up still commits that.
    fn with_challenge<T>(
        &mut self,
        name: &OperatorName,
        purpose: ChallengePurpose,
        signed: &AuthData,
        now: u64,
        then: impl FnOnce(&Connection, Option<VerifyingKey>, OperatorRow) -> Result<T, OperatorError>,
    ) -> Result<T, OperatorError> {
        let hsm_id = self.hsm_id.clone();
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        match Self::answer_challenge(&tx, name, purpose, signed, &hsm_id, now) {
            Ok((pending, row)) => {
                let out = then(&tx, pending, row)?;
                tx.commit()?;
                Ok(out)
            }
            Err(e) => {
                tx.commit()?;
                Err(e)
            }
        }
    }

    fn finish_key_change(
        &mut self,
        name: &OperatorName,
        purpose: ChallengePurpose,
        signed: &AuthData,
        now: u64,
    ) -> Result<String, OperatorError> {
        let t = to_db_time(now)?;
        self.with_challenge(name, purpose, signed, now, |tx, pending, row| {
            let Some(key) = pending else {
                return Err(OperatorError::BadAuthData("the challenge carries no key".to_owned()));
            };
            match (purpose, &row.key) {
                (ChallengePurpose::Register2fa, Some(_)) => return Err(OperatorError::Has2fa(name.clone())),
                (ChallengePurpose::Rotate2fa, None) => return Err(OperatorError::No2fa(name.clone())),
                _ => {}
            }
            let fingerprint = key.fingerprint();
            let owner: Option<String> =
                tx.query_row("SELECT name FROM operators WHERE key_fingerprint = ?1", [&fingerprint], |r| r.get(0)).optional()?;
            if let Some(o) = owner {
                return Err(if o == name.as_str() { OperatorError::SameKey(name.clone()) } else { OperatorError::KeyInUse(o.parse()?) });
            }
            tx.execute(
                "UPDATE operators SET public_key_pem = ?2, key_fingerprint = ?3, two_factor_changed_at = ?4, epoch = epoch + 1 WHERE name = ?1",
                params![name.as_str(), key.to_pem()?, fingerprint, t],
            )?;
            tx.execute("DELETE FROM sessions WHERE operator = ?1", [name.as_str()])?;
            Ok(fingerprint)
        })
    }

    /// Login step 1: check the password and return the challenge
    /// ([`AuthData`] with an empty `PublicKey`) for the operator to sign
    /// with their 2FA key. Refused for operators without 2FA.
    pub fn begin_login(&mut self, name: &OperatorName, password: &Password, now: u64) -> Result<AuthData, OperatorError> {
        let row = self.check_password(&self.conn, name, password)?;
        if row.key.is_none() {
            return Err(OperatorError::No2fa(name.clone()));
        }
        self.issue_challenge(name, ChallengePurpose::Login, None, row.epoch, now)
    }

    /// Login step 2: the signed challenge. Opens a session of
    /// `session_ttl_secs` and returns its token, which is not stored.
    pub fn finish_login(&mut self, name: &OperatorName, signed: &AuthData, now: u64) -> Result<NewSession, OperatorError> {
        let token_bytes = Zeroizing::new(random32()?);
        let token = SessionToken(Zeroizing::new(hex::encode(token_bytes.as_ref())));
        let token_hash = token.hash();
        let expires_at = now.saturating_add(self.session_ttl);
        let (created, expires) = (to_db_time(now)?, to_db_time(expires_at)?);
        self.with_challenge(name, ChallengePurpose::Login, signed, now, |tx, _, row| {
            tx.execute(
                "INSERT INTO sessions (token_hash, operator, epoch, created_at, expires_at) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![&token_hash[..], name.as_str(), row.epoch, created, expires],
            )?;
            Ok(())
        })?;
        Ok(NewSession { token, session: Session { operator: name.clone(), created_at: now, expires_at, token_hash } })
    }

    /// The session of `token`, if it is still valid at `now`.
    pub fn session(&self, token: &SessionToken, now: u64) -> Result<Session, OperatorError> {
        check_session(&self.conn, &token.hash(), now)
    }

    /// End the session of `token` (an unknown or expired one is fine).
    pub fn logout(&mut self, token: &SessionToken) -> Result<(), OperatorError> {
        self.conn.execute("DELETE FROM sessions WHERE token_hash = ?1", [&token.hash()[..]])?;
        Ok(())
    }

    /// Delete expired sessions and challenges, and quorum requests that
    /// expired more than a day ago. Returns how many rows went.
    pub fn purge_expired(&mut self, now: u64) -> Result<usize, OperatorError> {
        let t = to_db_time(now)?;
        let day_ago = to_db_time(now.saturating_sub(86_400))?;
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut n = tx.execute("DELETE FROM sessions WHERE expires_at <= ?1", [t])?;
        n += tx.execute("DELETE FROM challenges WHERE expires_at <= ?1 OR used = 1", [t])?;
        n += tx.execute(
            "DELETE FROM quorum_approvals WHERE request_id IN (SELECT id FROM quorum_requests WHERE expires_at <= ?1)",
            [day_ago],
        )?;
        n += tx.execute("DELETE FROM quorum_requests WHERE expires_at <= ?1", [day_ago])?;
        tx.commit()?;
        Ok(n)
    }

    /// Every operator, by name.
    pub fn list(&self) -> Result<Vec<OperatorInfo>, OperatorError> {
        let mut stmt = self.conn.prepare("SELECT name, key_fingerprint, created_at, password_changed_at FROM operators ORDER BY name")?;
        let rows =
            stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, Option<String>>(1)?, r.get::<_, i64>(2)?, r.get::<_, i64>(3)?)))?;
        let mut out = Vec::new();
        for row in rows {
            let (name, fingerprint, created, changed) = row?;
            out.push(OperatorInfo {
                name: name.parse()?,
                two_factor: fingerprint.is_some(),
                key_fingerprint: fingerprint,
                created_at: from_db_time(created),
                password_changed_at: from_db_time(changed),
            });
        }
        Ok(out)
    }

    /// An operator's 2FA key, if registered.
    pub fn public_key(&self, name: &OperatorName) -> Result<Option<VerifyingKey>, OperatorError> {
        Ok(load_operator(&self.conn, name)?.ok_or_else(|| OperatorError::NoSuchOperator(name.clone()))?.key)
    }

    /// How many operators have a 2FA key (the largest possible quorum).
    pub fn operators_with_2fa(&self) -> Result<u64, OperatorError> {
        let n: i64 = self.conn.query_row("SELECT COUNT(*) FROM operators WHERE public_key_pem IS NOT NULL", [], |r| r.get(0))?;
        Ok(u64::try_from(n).unwrap_or(0))
    }
}

/// Create `path` empty with mode 0600 unless it exists, so SQLite (and its
/// `-wal`/`-shm` files, which copy the mode) never make it world-readable.
fn create_private_file(path: &Path) -> Result<(), OperatorError> {
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(hsm::Error::io(path, e).into()),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn names_parse() {
        for ok in ["a", "alice", "bob.smith", "x_1-2", &"a".repeat(32)] {
            assert_eq!(ok.parse::<OperatorName>().unwrap().as_str(), ok);
        }
        for bad in ["", "Alice", "a b", "é", "a/b", &"a".repeat(33)] {
            assert!(matches!(bad.parse::<OperatorName>(), Err(OperatorError::BadName(_))), "{bad}");
        }
        let json: Result<OperatorName, _> = serde_json::from_str("\"ROOT\"");
        assert!(json.is_err());
    }

    #[test]
    fn token_parse_and_redaction() {
        let t = SessionToken::parse(&format!("  {}\n", "AB".repeat(32))).unwrap();
        assert_eq!(t.expose(), "ab".repeat(32));
        assert_eq!(format!("{t:?}"), "SessionToken(REDACTED)");
        assert!(SessionToken::parse("abcd").is_err());
        assert!(SessionToken::parse(&"zz".repeat(32)).is_err());
    }

    #[test]
    fn authdata_json_shape() {
        let a = AuthData::new("hsm-1", String::new(), &[1u8; 32]);
        let v: serde_json::Value = serde_json::to_value(&a).unwrap();
        assert_eq!(v["Version"], "1.0");
        assert_eq!(v["PublicKey"], "");
        assert_eq!(v["Data"][0]["HsmId"], "hsm-1");
        assert_eq!(v["Data"][0]["Signature"], "");
        assert_eq!(a.digest().unwrap(), [1u8; 32]);
        assert!(a.signature().is_err(), "unsigned");
        let extra = r#"{"Version":"1.0","PublicKey":"","Data":[],"Extra":1}"#;
        assert!(serde_json::from_str::<AuthData>(extra).is_err());
    }
}
