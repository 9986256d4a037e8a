//! The personalizer: YubiKey secrets are generated inside the security
//! module and leave it only as AEADs, and once as personalisation output.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod audit;
pub mod event;
pub mod home;
pub mod migrate;
pub mod operators;
pub mod quorum;

use std::fmt::Write as _;
use std::str::FromStr;

use hsm::{NonceSource, SecurityModule};
use ksm::aead_dir::{AeadDir, KeyHandleDir};
use otp::aead_file::AeadRecord;
use otp::{PublicId, YubiKeySecrets};
use zeroize::Zeroizing;

/// The first public id of a run: a number (decimal) or a modhex id, as
/// pyhsm's `--start-public-id` takes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StartId(pub u64);

impl FromStr for StartId {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
            return s.parse().map(Self).map_err(|e| format!("{s:?}: {e}"));
        }
        PublicId::from_modhex(s).map(|id| Self(id.to_number())).map_err(|e| format!("{s:?} is neither a number nor a modhex id: {e}"))
    }
}

/// Errors of a personalisation run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Bad arguments.
    #[error("{0}")]
    Usage(String),
    /// The security module or a file failed.
    #[error(transparent)]
    Hsm(#[from] hsm::Error),
}

/// One generated YubiKey: its public id and one AEAD per key handle.
#[derive(Debug)]
pub struct Generated {
    /// The public id.
    pub public_id: PublicId,
    /// The AEADs, in key-handle order.
    pub records: Vec<AeadRecord>,
}

/// What to generate.
#[derive(Clone, Debug)]
pub struct GenerateParams {
    /// How many YubiKeys.
    pub count: u64,
    /// The first public id (as a number).
    pub start: StartId,
    /// Public id length in modhex characters (even, 2..=12).
    pub public_id_chars: usize,
    /// Handles to wrap each secret under.
    pub key_handles: Vec<KeyHandleDir>,
    /// Let the module choose nonces instead of using the public id.
    pub random_nonce: bool,
}

/// Generate `params.count` YubiKey secrets in the module and write their
/// AEADs (v1, pyhsm layout) to `out`. Calls `progress` after each key.
pub fn generate(
    hsm: &dyn SecurityModule,
    out: &AeadDir,
    params: &GenerateParams,
    mut progress: impl FnMut(&Generated),
) -> Result<Vec<Generated>, Error> {
    if !params.public_id_chars.is_multiple_of(2) || !(2..=12).contains(&params.public_id_chars) {
        return Err(Error::Usage(format!("--public-id-chars must be even and 2 to 12, not {}", params.public_id_chars)));
    }
    if params.start.0 == 0 {
        return Err(Error::Usage("public id 0 is not allowed (the YubiHSM refuses it)".to_owned()));
    }
    let handles: Vec<_> = params.key_handles.iter().map(|k| k.key_handle).collect();
    let mut done = Vec::new();
    for i in 0..params.count {
        let n = params.start.0.checked_add(i).ok_or_else(|| Error::Usage("public id overflows".to_owned()))?;
        let public_id = PublicId::from_number(n, params.public_id_chars / 2).map_err(|e| Error::Usage(format!("public id {n}: {e}")))?;
        let nonce = if params.random_nonce {
            NonceSource::Random
        } else {
            NonceSource::Given(public_id.aead_nonce().map_err(|e| Error::Usage(e.to_string()))?)
        };
        let records = hsm.generate_yubikey_aeads(&handles, nonce)?;
        for (kh, record) in params.key_handles.iter().zip(&records) {
            out.write(kh, &public_id, record)?;
        }
        let g = Generated { public_id, records };
        progress(&g);
        done.push(g);
    }
    Ok(done)
}

/// One line of pyhsm's `yhsm-decrypt-aead --format yubikey-csv`:
/// `n,<public id>,<uid hex>,<key hex>,000000000000,,,,,,`.
pub fn yubikey_csv_line(n: u64, public_id: &PublicId, secrets: &YubiKeySecrets) -> Zeroizing<String> {
    let mut line = Zeroizing::new(String::with_capacity(96));
    // Writing to a String cannot fail.
    let _ =
        writeln!(line, "{n},{public_id},{},{},000000000000,,,,,,", hex::encode(secrets.uid.expose()), hex::encode(secrets.key.expose()));
    line
}

/// Decrypt a YubiKey AEAD for personalisation output (needs the handle's
/// export flag).
pub fn export_secrets(hsm: &dyn SecurityModule, record: &AeadRecord) -> Result<YubiKeySecrets, Error> {
    let plain = hsm.decrypt_aead(record)?;
    YubiKeySecrets::from_plaintext(&plain).map_err(|e| Error::Hsm(hsm::Error::AeadInvalid(e)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_ids() {
        assert_eq!("1".parse::<StartId>().unwrap(), StartId(1));
        assert_eq!("cccccccccccb".parse::<StartId>().unwrap(), StartId(1));
        assert!("xyz".parse::<StartId>().is_err());
    }

    #[test]
    fn csv_line_format() {
        let s = YubiKeySecrets::from_plaintext(&hex::decode("000102030405060708090a0b0c0d0e0f010203040506").unwrap()).unwrap();
        let id = PublicId::from_number(1, 6).unwrap();
        assert_eq!(&*yubikey_csv_line(8, &id, &s), "8,cccccccccccb,010203040506,000102030405060708090a0b0c0d0e0f,000000000000,,,,,,\n");
    }
}
