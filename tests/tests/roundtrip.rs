//! Property tests across the core's AEAD file, AEAD and decode APIs.
//!
//! `otp` already round-trips modhex, OTP strings and tokens in its unit tests;
//! these cover what spans modules: AEAD records through the v1 file format,
//! parsing of arbitrary file contents, seal/open, the YubiHSM 2 form, and the
//! personalizer -> file -> KSM path.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests may panic")]

use otp::aead_file::{AeadFile, AeadRecord, ResolveError, MAGIC, MAGIC_CRLF};
use otp::decode::decode_otp;
use otp::token::TokenFields;
use otp::yhsm2::{self, Yhsm2OtpAead};
use otp::{Aead, AeadNonce, Error, HandleKey, KeyHandle, PrivateId, PublicId, YubiKeyKey, YubiKeySecrets};
use proptest::collection::vec;
use proptest::prelude::*;

fn aead_bytes() -> impl Strategy<Value = Vec<u8>> {
    vec(any::<u8>(), 9..=72)
}

fn aes_key() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![Just(16usize), Just(24), Just(32)].prop_flat_map(|n| vec(any::<u8>(), n))
}

fn record() -> impl Strategy<Value = AeadRecord> {
    (any::<u32>(), any::<[u8; 6]>(), aead_bytes()).prop_map(|(kh, nonce, aead)| AeadRecord {
        key_handle: KeyHandle::new(kh),
        nonce: AeadNonce::new(nonce),
        aead: Aead::from_slice(&aead).unwrap(),
    })
}

/// File contents worth throwing at the parser: random bytes, and random bytes
/// behind each marker (with a version byte that is usually 1), and prefixes
/// of the markers.
fn file_contents() -> impl Strategy<Value = Vec<u8>> {
    let version = prop_oneof![4 => Just(1u8), 1 => any::<u8>()];
    prop_oneof![
        vec(any::<u8>(), 0..100),
        (prop_oneof![Just(MAGIC), Just(MAGIC_CRLF)], version, vec(any::<u8>(), 0..90)).prop_map(|(m, v, rest)| {
            let mut out = m.to_vec();
            out.push(v);
            out.extend(rest);
            out
        }),
        (prop_oneof![Just(MAGIC), Just(MAGIC_CRLF)], 0..=14usize).prop_map(|(m, n)| m[..n.min(m.len())].to_vec()),
    ]
}

proptest! {
    /// AeadRecord -> v1 bytes -> parse gives the same record, under either marker.
    #[test]
    fn v1_file_round_trip(rec in record()) {
        let bytes = rec.to_v1_bytes();
        prop_assert_eq!(bytes.len(), MAGIC.len() + 1 + 4 + 6 + rec.aead.len());
        prop_assert_eq!(AeadFile::parse(&bytes), Ok(AeadFile::V1(rec)));
        let crlf = [MAGIC_CRLF, &bytes[MAGIC.len()..]].concat();
        prop_assert_eq!(AeadFile::parse(&crlf), Ok(AeadFile::V1(rec)));
        // Resolving against its own key handle gives it back; any other fails.
        let pid = PublicId::from_bytes(&[]).unwrap();
        prop_assert_eq!(AeadFile::V1(rec).resolve(rec.key_handle, &pid), Ok(rec));
        let other = KeyHandle::new(rec.key_handle.get() ^ 1);
        prop_assert_eq!(
            AeadFile::V1(rec).resolve(other, &pid),
            Err(ResolveError::KeyHandleMismatch { expected: other, found: rec.key_handle })
        );
    }

    /// Parsing never panics; what parses re-encodes to the input.
    #[test]
    fn parse_arbitrary_file(bytes in file_contents()) {
        match AeadFile::parse(&bytes) {
            Ok(AeadFile::V1(rec)) => {
                let canonical = if bytes.starts_with(MAGIC_CRLF) {
                    [MAGIC, &bytes[MAGIC_CRLF.len()..]].concat()
                } else {
                    bytes.clone()
                };
                prop_assert!(bytes.starts_with(MAGIC) || bytes.starts_with(MAGIC_CRLF));
                prop_assert_eq!(rec.to_v1_bytes(), canonical);
            }
            Ok(AeadFile::V0(aead)) => {
                prop_assert_eq!(aead.as_bytes(), &bytes[..]);
                prop_assert!(!bytes.starts_with(MAGIC) && !bytes.starts_with(MAGIC_CRLF));
            }
            Err(Error::FileVersion(v)) => {
                let at = if bytes.starts_with(MAGIC) { MAGIC.len() } else { MAGIC_CRLF.len() };
                prop_assert_eq!(bytes.get(at), Some(&v));
                prop_assert_ne!(v, 1);
            }
            Err(Error::FileTruncated { len }) => prop_assert_eq!(len, bytes.len()),
            Err(Error::Length { .. }) => {}
            Err(other) => prop_assert!(false, "unexpected error {other:?}"),
        }
    }

    /// Sealing then opening gives the plaintext back; any change of key
    /// handle, nonce, key or a single bit is refused.
    #[test]
    fn seal_open(
        key in aes_key(),
        kh: u32,
        nonce: [u8; 6],
        plaintext in vec(any::<u8>(), 1..=64),
        other_kh: u32,
        other_nonce: [u8; 6],
        flip in (any::<prop::sample::Index>(), 0u8..8),
    ) {
        let hk = HandleKey::new(&key).unwrap();
        let (kh, n) = (KeyHandle::new(kh), AeadNonce::new(nonce));
        let sealed = hk.seal(kh, &n, &plaintext).unwrap();
        prop_assert_eq!(sealed.len(), plaintext.len() + 8);
        prop_assert_eq!(sealed.plaintext_len(), plaintext.len());
        prop_assert_eq!(&hk.open(kh, &n, &sealed).unwrap()[..], &plaintext[..]);
        prop_assert_eq!(hk.seal(kh, &n, &plaintext).unwrap(), sealed, "sealing is deterministic");

        if other_kh != kh.get() {
            prop_assert_eq!(hk.open(KeyHandle::new(other_kh), &n, &sealed), Err(Error::AeadIntegrity));
        }
        if other_nonce != nonce {
            prop_assert_eq!(hk.open(kh, &AeadNonce::new(other_nonce), &sealed), Err(Error::AeadIntegrity));
        }
        let mut other_key = key.clone();
        other_key[0] ^= 1;
        prop_assert_eq!(HandleKey::new(&other_key).unwrap().open(kh, &n, &sealed), Err(Error::AeadIntegrity));

        let mut bent = sealed.as_bytes().to_vec();
        let i = flip.0.index(bent.len());
        bent[i] ^= 1 << flip.1;
        let bent = Aead::from_slice(&bent).unwrap();
        let mut out = vec![0xaa; plaintext.len()];
        prop_assert_eq!(hk.open_into(kh, &n, &bent, &mut out), Err(Error::AeadIntegrity));
        prop_assert!(out.iter().all(|&b| b == 0), "a refused open leaves the buffer zeroed");
    }

    /// The 36-byte YubiHSM 2 form round-trips; other lengths are refused.
    #[test]
    fn yhsm2_form(bytes in vec(any::<u8>(), 0..80)) {
        match Yhsm2OtpAead::parse(&bytes) {
            Ok(a) => {
                prop_assert_eq!(bytes.len(), yhsm2::LEN);
                prop_assert_eq!(a.to_bytes().to_vec(), bytes.clone());
                let rec = a.to_record(7);
                prop_assert_eq!(Yhsm2OtpAead::from_record(&rec).unwrap(), a);
            }
            Err(e) => {
                prop_assert_ne!(bytes.len(), yhsm2::LEN);
                let is_length = matches!(e, Error::Length { .. });
                prop_assert!(is_length, "{e:?}");
            }
        }
    }

    /// Personalizer -> v1 file -> KSM: seal a YubiKey's secrets, write and read
    /// the file, then decode an OTP of that YubiKey.
    #[test]
    fn provisioned_key_decodes(
        hsm_key in aes_key(),
        kh: u32,
        public_id in vec(any::<u8>(), 0..=6),
        yk_key: [u8; 16],
        uid: [u8; 6],
        counter: u16,
        timestamp_low: u16,
        timestamp_high: u8,
        session_use: u8,
        rnd: u16,
    ) {
        let hk = HandleKey::new(&hsm_key).unwrap();
        let kh = KeyHandle::new(kh);
        let public_id = PublicId::from_bytes(&public_id).unwrap();
        let nonce = public_id.aead_nonce().unwrap();
        let secrets = YubiKeySecrets { key: YubiKeyKey::new(yk_key), uid: PrivateId::new(uid) };
        let aead = hk.seal(kh, &nonce, &secrets.to_plaintext()[..]).unwrap();
        let file = AeadRecord { key_handle: kh, nonce, aead }.to_v1_bytes();

        let rec = AeadFile::parse(&file).unwrap().resolve(kh, &public_id).unwrap();
        let fields = TokenFields { uid, counter, timestamp_low, timestamp_high, session_use, rnd };
        let otp = fields.build().encrypt(&secrets.key);
        let d = decode_otp(&hk, rec.key_handle, &rec.nonce, &rec.aead, &otp).unwrap();
        prop_assert_eq!((d.use_ctr, d.session_ctr, d.timestamp_high, d.timestamp_low), (counter, session_use, timestamp_high, timestamp_low));

        // The same file found as v0 (raw AEAD) resolves to the same record.
        let v0 = AeadFile::parse(aead.as_bytes()).unwrap().resolve(kh, &public_id).unwrap();
        prop_assert_eq!(v0, rec);

        // A token with the right key but another uid: a valid CRC, refused on the uid.
        let mut other_uid = uid;
        other_uid[0] ^= 0x80;
        let foreign = TokenFields { uid: other_uid, ..fields }.build().encrypt(&secrets.key);
        prop_assert_eq!(decode_otp(&hk, kh, &nonce, &aead, &foreign), Err(Error::UidMismatch));
    }
}
