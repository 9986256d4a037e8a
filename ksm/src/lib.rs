//! The KSM: find a YubiKey's AEAD and decode its OTP in the security module.
//!
//! [`Ksm::decrypt`] answers exactly what Yubico's KSM protocol answers:
//! `OK counter=… low=… high=… use=…` or one of the [`KsmError`] lines. The
//! KSM keeps no counter state; replay protection is the validator's job.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod aead_dir;
pub mod bundle;
pub mod config;
pub mod export;
pub mod import;
pub mod outbox;
pub mod serve;
pub mod store;

use std::sync::Arc;

use hsm::SecurityModule;
use otp::aead_file::AeadRecord;
use otp::{Otp, OtpDecode, PublicId};

use crate::aead_dir::KeyHandleDir;

/// Where the KSM finds AEADs.
pub trait AeadLookup: Send + Sync {
    /// The AEAD of `public_id` under key handle `kh`, if there is one.
    fn lookup(&self, public_id: &PublicId, kh: &KeyHandleDir) -> Result<Option<AeadRecord>, LookupError>;

    /// Can the store answer at all? For health checks.
    fn check(&self) -> Result<(), LookupError> {
        Ok(())
    }
}

/// A shared store (the replication sync writes into the one the KSM reads).
impl<T: AeadLookup + ?Sized> AeadLookup for Arc<T> {
    fn lookup(&self, public_id: &PublicId, kh: &KeyHandleDir) -> Result<Option<AeadRecord>, LookupError> {
        (**self).lookup(public_id, kh)
    }

    fn check(&self) -> Result<(), LookupError> {
        (**self).check()
    }
}

/// The AEAD store could not answer.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct LookupError(pub String);

/// A failed decrypt, with its KSM protocol line.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KsmError {
    /// The request carried no OTP.
    #[error("ERR No OTP provided")]
    NoOtp,
    /// The OTP is not 32–48 modhex characters.
    #[error("ERR Invalid OTP format")]
    InvalidFormat(otp::Error),
    /// No configured key handle holds an AEAD for the public id.
    #[error("ERR Unknown yubikey")]
    UnknownYubikey(PublicId),
    /// The OTP failed its CRC or private-id check.
    #[error("ERR Corrupt OTP")]
    CorruptOtp(hsm::Error),
    /// The stored AEAD failed its integrity check: a damaged or misplaced
    /// store entry, not the OTP's fault.
    #[error("ERR Corrupt AEAD")]
    CorruptAead(hsm::Error),
    /// The AEAD store failed.
    #[error("ERR Database error")]
    Database(LookupError),
    /// The security module could not decide (locked, not ready, I/O,
    /// missing permission).
    #[error("ERR Backend error")]
    Backend(hsm::Error),
}

impl KsmError {
    /// Is this a failure of the appliance rather than a verdict on the OTP?
    /// Validators report these as `BACKEND_ERROR`, never `BAD_OTP`.
    #[must_use]
    pub fn is_backend_failure(&self) -> bool {
        matches!(self, Self::CorruptAead(_) | Self::Database(_) | Self::Backend(_))
    }

    /// The detail behind the protocol line, for logs.
    #[must_use]
    pub fn detail(&self) -> String {
        match self {
            Self::NoOtp => "no OTP in the request".to_owned(),
            Self::InvalidFormat(e) => e.to_string(),
            Self::UnknownYubikey(id) => format!("no AEAD for public id {id}"),
            Self::CorruptOtp(e) | Self::CorruptAead(e) | Self::Backend(e) => e.to_string(),
            Self::Database(e) => e.to_string(),
        }
    }
}

/// The KSM: a security module, an AEAD store and the key handles to try.
pub struct Ksm {
    hsm: Arc<dyn SecurityModule>,
    store: Box<dyn AeadLookup>,
    handles: Vec<KeyHandleDir>,
}

impl Ksm {
    /// Assemble a KSM. `handles` are tried in order.
    #[must_use]
    pub fn new(hsm: Arc<dyn SecurityModule>, store: Box<dyn AeadLookup>, handles: Vec<KeyHandleDir>) -> Self {
        Self { hsm, store, handles }
    }

    /// Decrypt an OTP string as the KSM protocol does.
    ///
    /// Every configured key handle that holds an AEAD for the public id is
    /// tried in order; the first that decodes wins. If none does, the most
    /// serious failure is reported: a backend failure (cannot decide) over a
    /// corrupt AEAD over a corrupt OTP.
    pub fn decrypt(&self, otp_text: &str) -> Result<OtpDecode, KsmError> {
        if otp_text.is_empty() {
            return Err(KsmError::NoOtp);
        }
        let otp = Otp::parse(otp_text).map_err(KsmError::InvalidFormat)?;
        let public_id = otp.public_id();
        let mut worst: Option<KsmError> = None;
        for kh in &self.handles {
            let Some(record) = self.store.lookup(&public_id, kh).map_err(KsmError::Database)? else { continue };
            let err = match self.hsm.decode_otp(&record, otp.token()) {
                Ok(decoded) => return Ok(decoded),
                Err(e) if e.is_backend_failure() => KsmError::Backend(e),
                Err(e @ hsm::Error::AeadInvalid(_)) => KsmError::CorruptAead(e),
                Err(e) => KsmError::CorruptOtp(e),
            };
            if worst.as_ref().is_none_or(|w| rank(&err) > rank(w)) {
                worst = Some(err);
            }
        }
        Err(worst.unwrap_or(KsmError::UnknownYubikey(public_id)))
    }

    /// [`Ksm::decrypt`] rendered as the protocol's one-line answer.
    pub fn answer(&self, otp_text: &str) -> String {
        match self.decrypt(otp_text) {
            Ok(d) => d.ksm_line(),
            Err(e) => {
                log_failure(&e);
                e.to_string()
            }
        }
    }

    /// The security module's status.
    #[must_use]
    pub fn module_status(&self) -> hsm::Status {
        self.hsm.status()
    }

    /// Ready to decrypt: the module is ready and the AEAD store answers.
    pub fn health(&self) -> Result<(), String> {
        match self.hsm.status() {
            hsm::Status::Ready => {}
            other => return Err(format!("security module {other}")),
        }
        self.store.check().map_err(|e| e.to_string())
    }
}

/// Log a failed decrypt: appliance failures as errors (someone must act),
/// verdicts on the OTP at info.
pub(crate) fn log_failure(e: &KsmError) {
    if e.is_backend_failure() {
        tracing::error!(error = %e.detail(), "decrypt failed: {e}");
    } else {
        tracing::info!(error = %e.detail(), "decrypt refused: {e}");
    }
}

fn rank(e: &KsmError) -> u8 {
    match e {
        KsmError::Backend(_) | KsmError::Database(_) => 3,
        KsmError::CorruptAead(_) => 2,
        _ => 1,
    }
}
