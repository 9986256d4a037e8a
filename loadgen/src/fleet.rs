//! An OTP factory: YubiKeys provisioned through a security module, each
//! emitting unique OTPs whose decoded fields are known in advance.
//!
//! The secrets are generated inside the module as the personalizer does
//! ([`SecurityModule::generate_yubikey_aeads`] with the public id as nonce)
//! and read back with [`SecurityModule::decrypt_aead`], which needs a key
//! handle with [`hsm::Flags::EXPORT`]. Use test keystores only.

use hsm::{NonceSource, SecurityModule};
use otp::aead_file::AeadRecord;
use otp::token::TokenFields;
use otp::{KeyHandle, Otp, OtpDecode, PublicId, YubiKeySecrets};

/// The factory failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FleetError {
    /// The security module refused or failed.
    #[error("security module: {0}")]
    Hsm(#[from] hsm::Error),
    /// A public id or secret was malformed.
    #[error("{0}")]
    Otp(#[from] otp::Error),
    /// The module returned no AEAD.
    #[error("the security module returned no AEAD")]
    NoAead,
    /// The fleet has no YubiKeys.
    #[error("the fleet has no YubiKeys")]
    Empty,
    /// A YubiKey used up its counters.
    #[error("YubiKey {0} has used up its counters")]
    Exhausted(PublicId),
}

/// Provision one YubiKey: generate its secret in the module, wrapped under
/// `kh` with the public id as nonce (pyhsm's layout), and read the secret
/// back to build OTPs with.
pub fn provision(hsm: &dyn SecurityModule, kh: KeyHandle, public_id: &PublicId) -> Result<(AeadRecord, YubiKeySecrets), FleetError> {
    let record =
        hsm.generate_yubikey_aeads(&[kh], NonceSource::Given(public_id.aead_nonce()?))?.into_iter().next().ok_or(FleetError::NoAead)?;
    let secrets = secrets_of(hsm, &record)?;
    Ok((record, secrets))
}

/// Read a YubiKey's secret out of its AEAD (for AEADs made earlier).
pub fn secrets_of(hsm: &dyn SecurityModule, record: &AeadRecord) -> Result<YubiKeySecrets, FleetError> {
    Ok(YubiKeySecrets::from_plaintext(&hsm.decrypt_aead(record)?)?)
}

/// One OTP and what a KSM must answer for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OtpCase {
    /// The OTP as the YubiKey types it.
    pub otp: String,
    /// Its decoded fields.
    pub expect: OtpDecode,
}

struct Key {
    public_id: PublicId,
    secrets: YubiKeySecrets,
    counter: u16,
    session_use: u8,
    timestamp: u32,
}

/// YubiKeys that emit OTPs round-robin. Each OTP is unique: per key, the
/// session use counts up and the power-up counter advances when it wraps,
/// as on a real key; the 8 Hz timestamp advances too.
#[derive(Default)]
pub struct Fleet {
    keys: Vec<Key>,
    next: usize,
    issued: u64,
}

impl std::fmt::Debug for Fleet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fleet").field("keys", &self.keys.len()).field("issued", &self.issued).finish_non_exhaustive()
    }
}

/// The highest counter value emitted; bit 15 is the caps-lock flag.
const MAX_COUNTER: u16 = 0x7fff;

impl Fleet {
    /// An empty fleet.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Add a YubiKey. Its OTPs start at counter 1, session use 0.
    pub fn push(&mut self, public_id: PublicId, secrets: YubiKeySecrets) {
        // Spread the start times so keys do not move in lockstep.
        let timestamp = u32::from_le_bytes([public_id.as_bytes()[0], public_id.as_bytes()[1], public_id.as_bytes()[2], 0]) ^ 0x0012_3456;
        self.keys.push(Key { public_id, secrets, counter: 1, session_use: 0, timestamp });
    }

    /// How many YubiKeys.
    #[must_use]
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// No YubiKeys?
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// OTPs issued so far.
    #[must_use]
    pub fn issued(&self) -> u64 {
        self.issued
    }

    /// The next OTP, from the next YubiKey in turn.
    pub fn next_otp(&mut self) -> Result<OtpCase, FleetError> {
        let n = self.keys.len();
        let Some(key) = self.keys.get_mut(self.next % n.max(1)) else { return Err(FleetError::Empty) };
        if key.counter > MAX_COUNTER {
            return Err(FleetError::Exhausted(key.public_id));
        }
        self.next = (self.next + 1) % n;
        self.issued += 1;
        // Random-looking filler; uniqueness comes from the counters.
        let rnd = (self.issued.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 48) as u16;
        let fields = TokenFields {
            uid: *key.secrets.uid.expose(),
            counter: key.counter,
            timestamp_low: (key.timestamp & 0xffff) as u16,
            timestamp_high: ((key.timestamp >> 16) & 0xff) as u8,
            session_use: key.session_use,
            rnd,
        };
        let expect = OtpDecode {
            use_ctr: fields.counter,
            session_ctr: fields.session_use,
            timestamp_high: fields.timestamp_high,
            timestamp_low: fields.timestamp_low,
        };
        let otp = Otp::new(key.public_id, fields.build().encrypt(&key.secrets.key)).to_string();
        // Advance: session use, then the power-up counter when it wraps.
        key.timestamp = (key.timestamp + 37) & 0x00ff_ffff;
        if key.session_use == u8::MAX {
            key.session_use = 0;
            key.counter += 1;
        } else {
            key.session_use += 1;
        }
        Ok(OtpCase { otp, expect })
    }

    /// The next `n` OTPs.
    pub fn otps(&mut self, n: usize) -> Result<Vec<OtpCase>, FleetError> {
        (0..n).map(|_| self.next_otp()).collect()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    use std::collections::HashSet;

    use hsm::soft::format::KdfParams;
    use hsm::soft::SoftHsm;
    use hsm::{Flags, Password};
    use otp::{HandleKey, Token};

    #[test]
    fn unique_otps_that_decode_to_what_they_promise() {
        let dir = tempfile::tempdir().unwrap();
        let hsm = SoftHsm::create(&dir.path().join("ks"), &Password::new("pw").unwrap(), KdfParams::INSECURE_FOR_TESTS).unwrap();
        let kh = KeyHandle::new(1);
        hsm.import_handles(&[(kh, Flags::PERSONALIZER | Flags::OTP_DECODE | Flags::EXPORT, HandleKey::new(&[3; 32]).unwrap())]).unwrap();
        let mut fleet = Fleet::new();
        assert!(matches!(fleet.next_otp(), Err(FleetError::Empty)));
        let mut records = Vec::new();
        for i in 1..=3 {
            let id = PublicId::from_number(i, 6).unwrap();
            let (record, secrets) = provision(&hsm, kh, &id).unwrap();
            assert_eq!(secrets_of(&hsm, &record).unwrap().uid.expose(), secrets.uid.expose());
            records.push((id, record));
            fleet.push(id, secrets);
        }
        // Enough to wrap the session use of every key at least once.
        let cases = fleet.otps(3 * 300).unwrap();
        assert_eq!(fleet.issued(), 900);
        let unique: HashSet<&str> = cases.iter().map(|c| c.otp.as_str()).collect();
        assert_eq!(unique.len(), cases.len());
        for (i, case) in cases.iter().enumerate() {
            let (id, record) = &records[i % 3];
            assert!(case.otp.starts_with(&id.to_modhex()));
            let otp = Otp::parse(&case.otp).unwrap();
            assert_eq!(hsm.decode_otp(record, otp.token()).unwrap(), case.expect, "case {i}");
        }
        // Per key: use 0..=255 at counter 1, then counter 2 from use 0.
        assert_eq!((cases[0].expect.use_ctr, cases[0].expect.session_ctr), (1, 0));
        assert_eq!((cases[3 * 255].expect.use_ctr, cases[3 * 255].expect.session_ctr), (1, 255));
        assert_eq!((cases[3 * 256].expect.use_ctr, cases[3 * 256].expect.session_ctr), (2, 0));
        // The uid inside is the key's own.
        let secrets = secrets_of(&hsm, &records[0].1).unwrap();
        let token = Token::decrypt(&secrets.key, Otp::parse(&cases[0].otp).unwrap().token()).unwrap();
        assert!(token.uid_matches(&secrets.uid));
    }
}
