//! The PKCS#11 backend against a real SoftHSM2 token, created by the tests
//! in a throwaway directory (Debian package `softhsm2`, installed by
//! `scripts/test.sh`).
//!
//! SoftHSM2 reads `SOFTHSM2_CONF` when the module is first initialised in a
//! process, and the backend keeps one context per module for the process,
//! so the tokens are one process-wide fixture ([`fixture`]) made before any
//! test touches the module. Tests share the token but not its keys: each
//! uses its own key-label prefix.
//!
//! Throughput (not asserted): `cargo test --release -p hsm --test pkcs11 --
//! --ignored --nocapture decode_throughput`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;
use std::sync::OnceLock;
use std::time::Instant;

use appliance_tests::softhsm2::TokenDir;
use hsm::admin::{export_decode_only, KeyAdmin};
use hsm::pkcs11::{DecodeMode, Pkcs11Config, Pkcs11Hsm, DEFAULT_MODULE};
use hsm::soft::format::KdfParams;
use hsm::soft::SoftHsm;
use hsm::{DataKey, Error, Flags, NonceSource, OtpFault, Password, SecurityModule, Status};
use otp::aead_file::AeadRecord;
use otp::token::TokenFields;
use otp::{Aead, AeadNonce, HandleKey, KeyHandle, PublicId, YubiKeySecrets};

const LABEL: &str = "appliance-test";
/// Used by the logout test only: PKCS#11 login state is per token.
const FAULT_LABEL: &str = "appliance-fault";
const PIN: &str = "1234";
const SO_PIN: &str = "4321";
const PIN_VAR: &str = "OTP_APPLIANCE_TEST_TOKEN_PIN";
const WRONG_PIN_VAR: &str = "OTP_APPLIANCE_TEST_WRONG_PIN";

struct Fixture {
    tokens: TokenDir,
    /// Slot number SoftHSM2 gave the main token.
    slot: u64,
}

/// Two fresh tokens in a private token directory, `SOFTHSM2_CONF` pointing
/// at it. Fails, naming the Debian package, if SoftHSM2 is missing.
fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let tokens = TokenDir::new(Path::new(env!("CARGO_TARGET_TMPDIR")), Path::new(DEFAULT_MODULE));
        let slot = tokens.init_token(LABEL, PIN, SO_PIN);
        let _ = tokens.init_token(FAULT_LABEL, PIN, SO_PIN);
        // Before the module is first loaded, and before other threads of
        // this binary read the environment (they all start with fixture()).
        tokens.use_in_this_process();
        std::env::set_var(PIN_VAR, PIN);
        std::env::set_var(WRONG_PIN_VAR, "9999");
        Fixture { tokens, slot }
    })
}

/// The main token, keys labelled with `prefix`, no PIN source.
fn config(prefix: &str) -> Pkcs11Config {
    fixture();
    Pkcs11Config {
        handle_label_prefix: format!("{prefix}-kh-"),
        data_key_label_prefix: format!("{prefix}-dk-"),
        ..Pkcs11Config::for_token(LABEL)
    }
}

/// An unlocked module on the main token (PIN from the environment).
fn open(prefix: &str) -> Pkcs11Hsm {
    let hsm = Pkcs11Hsm::open(Pkcs11Config { pin_env: Some(PIN_VAR.to_owned()), ..config(prefix) }).unwrap();
    assert_eq!(hsm.status(), Status::Ready);
    hsm
}

fn pin() -> Password {
    Password::new(PIN).unwrap()
}

/// A soft keystore holding the same handle keys.
fn soft(handles: &[(KeyHandle, Flags, &[u8])]) -> (SoftHsm, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let soft = SoftHsm::create(&dir.path().join("keystore"), &Password::new("pw").unwrap(), KdfParams::INSECURE_FOR_TESTS).unwrap();
    let new: Vec<_> = handles.iter().map(|(kh, f, k)| (*kh, *f, HandleKey::new(k).unwrap())).collect();
    soft.import_handles(&new).unwrap();
    (soft, dir)
}

const FULL: Flags = Flags::from_bits(
    Flags::AEAD_GENERATE.bits()
        | Flags::BUFFER_AEAD_GENERATE.bits()
        | Flags::OTP_DECODE.bits()
        | Flags::EXPORT.bits()
        | Flags::USER_NONCE.bits()
        | Flags::BUFFER_LOAD.bits(),
);

fn nonce(hex_text: &str) -> AeadNonce {
    AeadNonce::from_slice(&hex::decode(hex_text).unwrap()).unwrap()
}

fn yubikey_secrets(hsm: &dyn SecurityModule, rec: &AeadRecord) -> YubiKeySecrets {
    YubiKeySecrets::from_plaintext(&hsm.decrypt_aead(rec).unwrap()).unwrap()
}

/// (name, AES key, key handle, nonce hex, plaintext, AEAD hex).
type Vector<'a> = (&'a str, &'a [u8], u32, &'a str, Vec<u8>, &'a str);

#[test]
fn reference_vectors_and_soft_backend_agree_byte_for_byte() {
    // otp-and-aead.md §2.2: (key, key handle, nonce, plaintext, AEAD).
    let k2000 = [0x20u8, 0x00].repeat(16);
    let kvec: Vec<u8> = (0u8..32).collect();
    let mut foo = vec![0u8; 16];
    foo[..3].copy_from_slice(b"foo");
    let mut secrets = (0u8..16).collect::<Vec<_>>();
    secrets.extend_from_slice(&[1, 2, 3, 4, 5, 6]);
    let vectors: [Vector<'_>; 5] = [
        ("v1", &k2000, 0x2000, "4d4d4d4d4d4d", foo.clone(), "6657738b1501b25e455387c9a4e05ad94f84d3975ef2f942"),
        ("v2", &k2000, 0x2000, "4d4d4d4d4d4d", vec![0x41; 22], "41795dca5440f31f0412c688e5a11b98488d6b8e001ca913a9b559d0cb68"),
        (
            "v3",
            &k2000,
            0x2000,
            "4d4d4d4d4d4d",
            vec![0x41; 64],
            "41795dca5440f31f0412c688e5a11b98488d6b8e001c2f118c244f7c70e5857b0faee31a66d20269dc7dadfd6a59416cf7d07c71e8585fa510bc20b10e05ab5ba27627068bf99cf7",
        ),
        ("v4", &[0x09; 16], 1, "4d4d4d4d4d4d", foo, "146e56d1027355e497278aa58dbbc22aa379b5dd598b415d"),
        ("v5", &kvec, 1, "000000000001", secrets, "e3a7c01981220c1488d5e703607ca4b385652043735807924551c4463d75"),
    ];
    for (name, key, kh, n, pt, expected) in vectors {
        let hsm = open(&format!("kat-{name}"));
        let kh = KeyHandle::new(kh);
        hsm.import_handle_key(kh, FULL, &HandleKey::new(key).unwrap()).unwrap();
        let rec = hsm.import_aead(kh, NonceSource::Given(nonce(n)), &pt).unwrap();
        assert_eq!(hex::encode(rec.aead.as_bytes()), expected, "vector {name}");
        assert_eq!(*hsm.decrypt_aead(&rec).unwrap(), pt, "vector {name} opens");
    }

    // Every plaintext length, AES-128/192/256: the same bytes as the soft
    // backend holding the same keys.
    let keys: [(KeyHandle, &[u8]); 3] =
        [(KeyHandle::new(0x10), &[0x11; 16]), (KeyHandle::new(0x11), &[0x5a; 24]), (KeyHandle::new(0x12), &[0xc3; 32])];
    let hsm = open("same-as-soft");
    for (kh, key) in keys {
        hsm.import_handle_key(kh, FULL, &HandleKey::new(key).unwrap()).unwrap();
    }
    let (soft, _dir) = soft(&keys.map(|(kh, k)| (kh, FULL, k)));
    for (kh, _) in keys {
        for len in 1..=64usize {
            let pt: Vec<u8> = (0..len).map(|i| (i * 7 + len) as u8).collect();
            let n = AeadNonce::new([len as u8, 2, 3, 4, 5, 6]);
            let ours = hsm.import_aead(kh, NonceSource::Given(n), &pt).unwrap();
            let theirs = soft.import_aead(kh, NonceSource::Given(n), &pt).unwrap();
            assert_eq!(ours, theirs, "{kh} {len} bytes");
            assert_eq!(*soft.decrypt_aead(&ours).unwrap(), pt);
        }
    }
    for len in [0usize, 65] {
        let e = hsm.import_aead(keys[0].0, NonceSource::Given(AeadNonce::new([1; 6])), &vec![0; len]).unwrap_err();
        assert!(matches!(e, Error::InvalidInput(_)), "{len} bytes: {e:?}");
    }
}

#[test]
fn generated_handles_wrap_one_secret_and_decode_its_otps() {
    let hsm = open("generate");
    let (a, b) = (KeyHandle::new(0x20), KeyHandle::new(0x21));
    let flags = Flags::PERSONALIZER | Flags::OTP_DECODE;
    assert_eq!(hsm.add_handle(a, flags, 256).unwrap().key_bits, 256);
    assert_eq!(hsm.add_handle(b, flags, 128).unwrap().key_bits, 128);
    assert!(matches!(hsm.add_handle(a, flags, 256), Err(Error::DuplicateKeyHandle(k)) if k == a));
    assert!(matches!(hsm.add_handle(KeyHandle::new(0x22), flags, 100), Err(Error::InvalidInput(_))));
    let listed = hsm.key_handles().unwrap();
    assert_eq!(listed.iter().map(|h| (h.key_handle, h.flags, h.key_bits)).collect::<Vec<_>>(), vec![(a, flags, 256), (b, flags, 128)]);

    let id = PublicId::from_modhex("vvccccbbdd").unwrap();
    let recs = hsm.generate_yubikey_aeads(&[a, b], NonceSource::Given(id.aead_nonce().unwrap())).unwrap();
    assert_eq!(recs.len(), 2);
    assert_ne!(recs[0].aead, recs[1].aead, "different handle keys");
    let secrets = yubikey_secrets(&hsm, &recs[0]);
    assert_eq!(*hsm.decrypt_aead(&recs[1]).unwrap(), *secrets.to_plaintext(), "one secret under both handles");

    let fields = TokenFields {
        uid: *secrets.uid.expose(),
        counter: 0x8005,
        timestamp_low: 0xbeef,
        timestamp_high: 0x12,
        session_use: 9,
        rnd: 0x4242,
    };
    let otp = fields.build().encrypt(&secrets.key);
    for rec in &recs {
        let d = hsm.decode_otp(rec, &otp).unwrap();
        assert_eq!((d.use_ctr, d.session_ctr, d.timestamp_high, d.timestamp_low), (0x8005, 9, 0x12, 0xbeef));
    }
    // Bad OTPs are verdicts, not backend failures.
    let other_uid = TokenFields { uid: [0xee; 6], ..fields.clone() }.build().encrypt(&secrets.key);
    let e = hsm.decode_otp(&recs[0], &other_uid).unwrap_err();
    assert!(matches!(e, Error::OtpInvalid(OtpFault::UidMismatch)) && !e.is_backend_failure(), "{e:?}");
    let other_key = fields.build().encrypt(&otp::YubiKeyKey::new([0x99; 16]));
    let e = hsm.decode_otp(&recs[0], &other_key).unwrap_err();
    assert!(matches!(e, Error::OtpInvalid(OtpFault::Crc)) && !e.is_backend_failure(), "{e:?}");

    // Random nonces: never zero, fresh secrets each time.
    let r1 = hsm.generate_yubikey_aeads(&[a], NonceSource::Random).unwrap();
    let r2 = hsm.generate_yubikey_aeads(&[a], NonceSource::Random).unwrap();
    assert!(!r1[0].nonce.is_zero() && r1[0].nonce != r2[0].nonce);
    assert_ne!(*hsm.decrypt_aead(&r1[0]).unwrap(), *hsm.decrypt_aead(&r2[0]).unwrap());
    assert_ne!(*hsm.decrypt_aead(&r1[0]).unwrap(), *secrets.to_plaintext());
}

#[test]
fn flags_are_stored_in_the_token_and_enforced() {
    let hsm = open("flags");
    let (decode, perso, key) = (KeyHandle::new(0x30), KeyHandle::new(0x31), [0x30u8; 32]);
    hsm.import_handle_key(decode, Flags::OTP_DECODE, &HandleKey::new(&key).unwrap()).unwrap();
    hsm.import_handle_key(perso, Flags::PERSONALIZER, &HandleKey::new(&key).unwrap()).unwrap();
    assert!(matches!(hsm.import_handle_key(decode, Flags::OTP_DECODE, &HandleKey::new(&key).unwrap()), Err(Error::DuplicateKeyHandle(_))));

    // An AEAD made outside (same key), decoded by the decode-only handle.
    let secrets = YubiKeySecrets { key: otp::YubiKeyKey::new([4; 16]), uid: otp::PrivateId::new([5; 6]) };
    let n = AeadNonce::new([0, 0, 0, 0, 0, 7]);
    let rec = AeadRecord {
        key_handle: decode,
        nonce: n,
        aead: HandleKey::new(&key).unwrap().seal(decode, &n, &*secrets.to_plaintext()).unwrap(),
    };
    let otp = TokenFields { uid: [5; 6], counter: 3, session_use: 1, ..Default::default() }.build().encrypt(&secrets.key);
    assert_eq!(hsm.decode_otp(&rec, &otp).unwrap().use_ctr, 3);

    let denied: Vec<(&str, Error)> = vec![
        ("generate", hsm.generate_yubikey_aeads(&[decode], NonceSource::Random).unwrap_err()),
        ("export", hsm.decrypt_aead(&rec).unwrap_err()),
        ("import", hsm.import_aead(decode, NonceSource::Random, &[1; 22]).unwrap_err()),
        ("decode with a personalizer handle", hsm.decode_otp(&AeadRecord { key_handle: perso, ..rec }, &otp).unwrap_err()),
    ];
    for (op, e) in denied {
        assert!(matches!(e, Error::NotPermitted { .. }), "{op}: {e:?}");
    }
    // USER_NONCE is needed for a chosen nonce, not for a random one.
    let no_user_nonce = KeyHandle::new(0x32);
    hsm.import_handle_key(no_user_nonce, Flags::BUFFER_AEAD_GENERATE, &HandleKey::new(&key).unwrap()).unwrap();
    assert!(matches!(hsm.generate_yubikey_aeads(&[no_user_nonce], NonceSource::Given(n)), Err(Error::NotPermitted { .. })));
    hsm.generate_yubikey_aeads(&[no_user_nonce], NonceSource::Random).unwrap();
    // All or nothing: one forbidden handle fails the whole request.
    assert!(matches!(hsm.generate_yubikey_aeads(&[perso, decode], NonceSource::Given(n)), Err(Error::NotPermitted { .. })));
    assert!(matches!(hsm.decode_otp(&AeadRecord { key_handle: KeyHandle::new(0x3f), ..rec }, &otp), Err(Error::UnknownKeyHandle(_))));

    // A second instance reads the same flags back from the token.
    let again = open("flags");
    let flags: Vec<_> = again.key_handles().unwrap().iter().map(|h| (h.key_handle, h.flags)).collect();
    assert_eq!(flags, vec![(decode, Flags::OTP_DECODE), (perso, Flags::PERSONALIZER), (no_user_nonce, Flags::BUFFER_AEAD_GENERATE)]);
    assert!(matches!(again.decrypt_aead(&rec), Err(Error::NotPermitted { .. })));
}

#[test]
fn tampered_aeads_are_invalid_not_backend_errors() {
    let hsm = open("tamper");
    let kh = KeyHandle::new(0x40);
    hsm.add_handle(kh, FULL, 256).unwrap();
    let rec = hsm.generate_yubikey_aeads(&[kh], NonceSource::Random).unwrap()[0];
    let secrets = yubikey_secrets(&hsm, &rec);
    let otp = TokenFields { uid: *secrets.uid.expose(), counter: 1, ..Default::default() }.build().encrypt(&secrets.key);
    hsm.decode_otp(&rec, &otp).unwrap();
    for i in 0..rec.aead.len() {
        let mut bytes = rec.aead.as_bytes().to_vec();
        bytes[i] ^= 0x01;
        let bad = AeadRecord { aead: Aead::from_slice(&bytes).unwrap(), ..rec };
        for e in [hsm.decode_otp(&bad, &otp).unwrap_err(), hsm.decrypt_aead(&bad).unwrap_err()] {
            assert!(matches!(e, Error::AeadInvalid(otp::Error::AeadIntegrity)), "byte {i}: {e:?}");
            assert!(!e.is_backend_failure(), "byte {i}");
        }
    }
    let other_nonce = AeadRecord { nonce: AeadNonce::new([9; 6]), ..rec };
    assert!(matches!(hsm.decode_otp(&other_nonce, &otp), Err(Error::AeadInvalid(_))));
    let short = AeadRecord { aead: Aead::from_slice(&rec.aead.as_bytes()[..24]).unwrap(), ..rec };
    let e = hsm.decode_otp(&short, &otp).unwrap_err();
    assert!(matches!(e, Error::AeadInvalid(_)) && !e.is_backend_failure(), "{e:?}");
}

#[test]
fn pin_unlocks_and_status_follows() {
    let hsm = Pkcs11Hsm::new(config("pin")).unwrap();
    assert_eq!(hsm.status(), Status::Locked);
    let rec = AeadRecord { key_handle: KeyHandle::new(1), nonce: AeadNonce::new([1; 6]), aead: Aead::from_slice(&[0; 30]).unwrap() };
    assert!(matches!(hsm.decrypt_aead(&rec), Err(Error::Locked)));
    assert!(matches!(hsm.add_handle(KeyHandle::new(1), Flags::OTP_DECODE, 256), Err(Error::Locked)));
    assert!(matches!(hsm.encrypt_value(DataKey::Token, b"x"), Err(Error::Locked)));
    let mut buf = [0u8; 32];
    hsm.random(&mut buf).unwrap();
    assert_ne!(buf, [0; 32], "random bytes come from the token while locked");

    let e = hsm.unlock(&Password::new("0000").unwrap()).unwrap_err();
    assert!(matches!(e, Error::WrongPassword), "{e:?}");
    assert_eq!(hsm.status(), Status::Locked);
    hsm.unlock(&pin()).unwrap();
    assert_eq!(hsm.status(), Status::Ready);
    hsm.unlock(&pin()).unwrap();
    // The process is logged in already; a wrong PIN is still refused.
    assert!(matches!(hsm.unlock(&Password::new("0000").unwrap()), Err(Error::WrongPassword)));
    assert_eq!(hsm.status(), Status::Ready);

    // PIN sources.
    let f = fixture();
    let pin_file = f.tokens.root().join("pin");
    std::fs::write(&pin_file, format!("{PIN}\n")).unwrap();
    let from_file = Pkcs11Hsm::open(Pkcs11Config { pin_file: Some(pin_file), ..config("pin") }).unwrap();
    assert_eq!(from_file.status(), Status::Ready);
    let wrong = Pkcs11Hsm::open(Pkcs11Config { pin_env: Some(WRONG_PIN_VAR.to_owned()), ..config("pin") }).unwrap_err();
    assert!(matches!(wrong, Error::WrongPassword), "{wrong:?}");
    let unset = Pkcs11Hsm::open(Pkcs11Config { pin_env: Some("OTP_APPLIANCE_NO_SUCH_VARIABLE".to_owned()), ..config("pin") }).unwrap_err();
    assert!(unset.to_string().contains("OTP_APPLIANCE_NO_SUCH_VARIABLE"), "{unset}");
    let missing = Pkcs11Hsm::open(Pkcs11Config { pin_file: Some(f.tokens.root().join("no-such-pin")), ..config("pin") }).unwrap_err();
    assert!(matches!(missing, Error::Io { .. }), "{missing:?}");
}

#[test]
fn missing_module_or_token_is_a_clear_not_ready() {
    let cases = [
        (Pkcs11Config { module: "/nonexistent/libpkcs11.so".into(), ..config("missing") }, "/nonexistent/libpkcs11.so"),
        (Pkcs11Config::for_token("no-such-token"), "no-such-token"),
        (Pkcs11Config { slot: Some(424_242), ..Pkcs11Config::default() }, "slot 424242"),
        // Two tokens exist: "the only slot" is ambiguous.
        (Pkcs11Config::default(), "several tokens"),
    ];
    fixture();
    for (config, needle) in cases {
        let e = Pkcs11Hsm::open(config.clone()).unwrap_err();
        assert!(matches!(e, Error::NotReady(_)) && e.is_backend_failure(), "{e:?}");
        assert!(e.to_string().contains(needle), "{e} should mention {needle}");
        let hsm = Pkcs11Hsm::new(config).unwrap();
        assert_eq!(hsm.status(), Status::NotReady);
        assert!(matches!(hsm.unlock(&pin()), Err(Error::NotReady(_))));
        assert!(matches!(hsm.random(&mut [0; 4]), Err(Error::Random(_))));
    }
    let e = Pkcs11Hsm::open(Pkcs11Config { module: "/nonexistent/libpkcs11.so".into(), ..config("missing") }).unwrap_err();
    assert!(e.to_string().contains("softhsm2"), "names the Debian package: {e}");
    // The slot number SoftHSM2 assigned works too.
    let by_number =
        Pkcs11Hsm::open(Pkcs11Config { slot: Some(fixture().slot as i64), pin_env: Some(PIN_VAR.to_owned()), ..Pkcs11Config::default() });
    assert_eq!(by_number.unwrap().status(), Status::Ready);
    assert!(matches!(Pkcs11Hsm::new(Pkcs11Config { slot: Some(1), ..Pkcs11Config::for_token(LABEL) }), Err(Error::InvalidInput(_))));
}

#[test]
fn handle_keys_cannot_leave_the_token() {
    let hsm = open("protect");
    let (generated, imported) = (KeyHandle::new(0x50), KeyHandle::new(0x51));
    hsm.add_handle(generated, Flags::OTP_DECODE, 256).unwrap();
    hsm.import_handle_key(imported, Flags::OTP_DECODE, &HandleKey::new(&[0x51; 32]).unwrap()).unwrap();
    let g = hsm.key_protection(generated).unwrap();
    assert!(g.sensitive && !g.extractable && g.always_sensitive && g.never_extractable && g.local && g.on_token, "{g:?}");
    assert!(!g.value_readable, "{g:?}");
    let i = hsm.key_protection(imported).unwrap();
    assert!(i.sensitive && !i.extractable && i.on_token && !i.value_readable, "{i:?}");
    assert!(!i.local, "an imported key is not generated in the token: {i:?}");
}

/// The key ceremony on a token: an exportable handle leaves only for the
/// servers' keystore, and the servers' copy makes the same AEADs; a
/// non-extractable one never leaves.
#[test]
fn exportable_handles_leave_only_through_the_ceremony() {
    let hsm = open("ceremony");
    let (laptop, server_only) = (KeyHandle::new(0x60), KeyHandle::new(0x61));
    KeyAdmin::create_handle(&hsm, laptop, FULL, 256, true).unwrap();
    KeyAdmin::create_handle(&hsm, server_only, Flags::OTP_DECODE, 128, false).unwrap();
    let p = hsm.key_protection(laptop).unwrap();
    assert!(p.sensitive && p.extractable && p.local && !p.value_readable, "wrapped out only, never shown: {p:?}");
    let e = hsm.export_handle_keys(&[server_only]).unwrap_err();
    assert!(matches!(&e, Error::Unsupported(m) if m.contains("non-extractable")), "{e:?}");
    assert!(matches!(hsm.export_handle_keys(&[KeyHandle::new(0x6f)]), Err(Error::UnknownKeyHandle(_))));

    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("servers.keystore");
    let pw = Password::new("servers").unwrap();
    let listed = export_decode_only(&hsm, &out, &pw, KdfParams::INSECURE_FOR_TESTS, &[laptop]).unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!((listed[0].flags, listed[0].key_bits), (Flags::OTP_DECODE, 256));
    let servers = SoftHsm::open(&out).unwrap();
    servers.unlock(&pw).unwrap();
    // The laptop's token wraps a secret; the servers' keystore decodes it.
    let rec = hsm.generate_yubikey_aeads(&[laptop], NonceSource::Random).unwrap().remove(0);
    let secrets = yubikey_secrets(&hsm, &rec);
    let otp = TokenFields { uid: *secrets.uid.expose(), counter: 9, ..Default::default() }.build().encrypt(&secrets.key);
    assert_eq!(servers.decode_otp(&rec, &otp).unwrap().use_ctr, 9);
    assert!(matches!(servers.generate_yubikey_aeads(&[laptop], NonceSource::Random), Err(Error::NotPermitted { .. })));

    // A server's token loads the servers' keystore: all or nothing.
    let server_token = open("ceremony-server");
    let keys = servers.export_handle_keys(&[laptop]).unwrap();
    server_token.import_handle_key(KeyHandle::new(0x62), Flags::OTP_DECODE, &HandleKey::new(&[1; 16]).unwrap()).unwrap();
    let clash = [keys[0].clone(), (KeyHandle::new(0x62), Flags::OTP_DECODE, HandleKey::new(&[2; 16]).unwrap())];
    assert!(matches!(KeyAdmin::import_handles(&server_token, &clash, false), Err(Error::DuplicateKeyHandle(_))));
    assert!(matches!(server_token.export_handle_keys(&[laptop]), Err(Error::UnknownKeyHandle(_))), "nothing was stored");
    KeyAdmin::import_handles(&server_token, &keys, false).unwrap();
    assert_eq!(server_token.decode_otp(&rec, &otp).unwrap().use_ctr, 9);
    assert!(!server_token.key_protection(laptop).unwrap().extractable, "imported keys never leave again");
}

#[test]
fn values_round_trip_under_token_data_keys() {
    let hsm = open("values");
    let mut made = Vec::new();
    for key in DataKey::ALL {
        let ct = hsm.encrypt_value(key, b"a stored secret").unwrap();
        assert_eq!(ct.len(), 1 + 12 + 15 + 16);
        assert_ne!(hsm.encrypt_value(key, b"a stored secret").unwrap(), ct, "fresh nonce");
        assert_eq!(*hsm.decrypt_value(key, &ct).unwrap(), *b"a stored secret");
        made.push((key, ct));
    }
    // Keys live in the token: another instance decrypts.
    let again = open("values");
    for (key, ct) in &made {
        assert_eq!(*again.decrypt_value(*key, ct).unwrap(), *b"a stored secret");
        let other = DataKey::ALL.into_iter().find(|k| k != key).unwrap();
        let e = again.decrypt_value(other, ct).unwrap_err();
        assert!(matches!(e, Error::ValueInvalid) && !e.is_backend_failure(), "{e:?}");
        for i in 0..ct.len() {
            let mut bad = ct.clone();
            bad[i] ^= 0x80;
            let e = again.decrypt_value(*key, &bad).unwrap_err();
            assert!(matches!(e, Error::ValueInvalid), "byte {i}: {e:?}");
        }
    }
    assert!(matches!(hsm.decrypt_value(DataKey::Token, &[1; 20]), Err(Error::ValueInvalid)));
    hsm.create_data_keys().unwrap();
    // Another prefix means other keys.
    assert!(matches!(open("values-elsewhere").decrypt_value(DataKey::Token, &made[0].1), Err(Error::ValueInvalid)));
}

#[test]
fn config_embeds_in_a_tagged_toml_enum() {
    #[derive(Debug, serde::Deserialize)]
    #[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
    enum Backend {
        Pkcs11(Pkcs11Config),
    }
    let Backend::Pkcs11(c) = toml::from_str("type = \"pkcs11\"\ntoken_label = \"T\"\npin_file = \"/etc/pin\"\nretries = 5\n").unwrap();
    assert_eq!(c, Pkcs11Config { pin_file: Some("/etc/pin".into()), retries: 5, ..Pkcs11Config::for_token("T") });
    assert_eq!(c.module, Path::new(DEFAULT_MODULE));
    let e = toml::from_str::<Backend>("type = \"pkcs11\"\ntoken_lable = \"T\"\n").unwrap_err();
    assert!(e.to_string().contains("token_lable"), "{e}");
    assert_eq!(c.decode, DecodeMode::Ccm, "the default");
    let Backend::Pkcs11(k) = toml::from_str("type = \"pkcs11\"\ndecode = \"key-in-token\"\nkey_in_token_cache = 10\n").unwrap();
    assert_eq!((k.decode, k.key_in_token_cache), (DecodeMode::KeyInToken, 10));
    assert!(toml::from_str::<Backend>("type = \"pkcs11\"\ndecode = \"in-token\"\n").is_err());
}

/// `decode = "key-in-token"` through the ordinary `decode_otp`: the same
/// verdicts as CCM mode, a full cache emptied and refilled.
#[test]
fn key_in_token_decoding_is_a_configuration_choice() {
    let ccm = open("kit");
    let kh = KeyHandle::new(0x70);
    ccm.add_handle(kh, FULL, 256).unwrap();
    let kit = Pkcs11Hsm::open(Pkcs11Config {
        pin_env: Some(PIN_VAR.to_owned()),
        decode: DecodeMode::KeyInToken,
        key_in_token_cache: 2,
        ..config("kit")
    })
    .unwrap();
    let recs = ccm.generate_yubikey_aeads(&[kh], NonceSource::Random).unwrap();
    let mut all = vec![recs[0]];
    all.extend(ccm.generate_yubikey_aeads(&[kh], NonceSource::Random).unwrap());
    all.extend(ccm.generate_yubikey_aeads(&[kh], NonceSource::Random).unwrap());
    for round in 0..2 {
        for (i, rec) in all.iter().enumerate() {
            let secrets = yubikey_secrets(&ccm, rec);
            let counter = u16::try_from(10 * round + i + 1).unwrap();
            let otp = TokenFields { uid: *secrets.uid.expose(), counter, ..Default::default() }.build().encrypt(&secrets.key);
            assert_eq!(kit.decode_otp(rec, &otp).unwrap(), ccm.decode_otp(rec, &otp).unwrap());
            let other = TokenFields { uid: [3; 6], counter, ..Default::default() }.build().encrypt(&secrets.key);
            assert!(matches!(kit.decode_otp(rec, &other), Err(Error::OtpInvalid(_))));
            let mut tampered = *rec;
            let mut bytes = tampered.aead.as_bytes().to_vec();
            bytes[3] ^= 1;
            tampered.aead = Aead::from_slice(&bytes).unwrap();
            assert!(matches!(kit.decode_otp(&tampered, &otp), Err(Error::AeadInvalid(_))));
        }
    }
}

#[test]
fn worker_threads_use_their_own_sessions() {
    let hsm = open("threads");
    let kh = KeyHandle::new(0x60);
    hsm.add_handle(kh, FULL, 256).unwrap();
    let rec = hsm.generate_yubikey_aeads(&[kh], NonceSource::Random).unwrap()[0];
    let secrets = yubikey_secrets(&hsm, &rec);
    std::thread::scope(|s| {
        for t in 0..4u16 {
            let (hsm, secrets) = (&hsm, &secrets);
            s.spawn(move || {
                for i in 0..100u16 {
                    let otp = TokenFields { uid: *secrets.uid.expose(), counter: t, session_use: (i % 256) as u8, ..Default::default() }
                        .build()
                        .encrypt(&secrets.key);
                    assert_eq!(hsm.decode_otp(&rec, &otp).unwrap().use_ctr, t);
                }
            });
        }
    });
}

#[test]
fn a_logout_elsewhere_is_recovered_from() {
    // On its own token, so that other tests' logins are untouched.
    fixture();
    let config = Pkcs11Config {
        pin_env: Some(PIN_VAR.to_owned()),
        handle_label_prefix: "fault-kh-".to_owned(),
        ..Pkcs11Config::for_token(FAULT_LABEL)
    };
    let hsm = Pkcs11Hsm::open(config).unwrap();
    let kh = KeyHandle::new(0x70);
    hsm.add_handle(kh, FULL, 256).unwrap();
    let rec = hsm.generate_yubikey_aeads(&[kh], NonceSource::Random).unwrap()[0];
    let secrets = yubikey_secrets(&hsm, &rec);
    let otp = TokenFields { uid: *secrets.uid.expose(), counter: 2, ..Default::default() }.build().encrypt(&secrets.key);
    hsm.decode_otp(&rec, &otp).unwrap();

    // Someone else in the process logs the application out of the token.
    let ctx = cryptoki::context::Pkcs11::new(DEFAULT_MODULE).unwrap();
    match ctx.initialize(cryptoki::context::CInitializeArgs::new(cryptoki::context::CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(cryptoki::error::Error::Pkcs11(cryptoki::error::RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(e) => panic!("{e}"),
    }
    let slot = ctx
        .get_slots_with_initialized_token()
        .unwrap()
        .into_iter()
        .find(|s| ctx.get_token_info(*s).unwrap().label() == FAULT_LABEL)
        .unwrap();
    let other = ctx.open_ro_session(slot).unwrap();
    other.logout().unwrap();
    assert!(matches!(other.get_session_info().unwrap().session_state(), cryptoki::session::SessionState::RoPublic));

    // The module logs in again with the PIN it was unlocked with.
    assert_eq!(hsm.decode_otp(&rec, &otp).unwrap().use_ctr, 2);
    assert_eq!(hsm.status(), Status::Ready);
    assert_eq!(hsm.key_handles().unwrap().len(), 1);
}

#[test]
fn key_in_token_mode_gives_the_same_verdicts() {
    let hsm = open("in-token");
    let (kh, perso) = (KeyHandle::new(0xa0), KeyHandle::new(0xa1));
    hsm.add_handle(kh, FULL, 256).unwrap();
    hsm.add_handle(perso, Flags::PERSONALIZER, 256).unwrap();
    let id = PublicId::from_modhex("vvccccbbdd").unwrap();
    let rec = hsm.generate_yubikey_aeads(&[kh], NonceSource::Given(id.aead_nonce().unwrap())).unwrap()[0];
    let secrets = yubikey_secrets(&hsm, &rec);
    let wrapped = hsm.wrap_for_token(&rec).unwrap();
    assert_eq!(wrapped.key_handle, kh);
    assert_eq!(wrapped.uid, *secrets.uid.expose());
    assert!(!wrapped.wrapped_key.windows(16).any(|w| w == secrets.key.expose()), "the key is wrapped, not copied");
    let stored = hsm::pkcs11::TokenWrappedSecret::from_bytes(&wrapped.to_bytes()).unwrap();

    let fields = TokenFields { uid: *secrets.uid.expose(), counter: 0x21, timestamp_low: 7, timestamp_high: 8, session_use: 9, rnd: 1 };
    let otp = fields.build().encrypt(&secrets.key);
    assert_eq!(hsm.decode_otp_in_token(&stored, &otp).unwrap(), hsm.decode_otp(&rec, &otp).unwrap());
    // A second instance (its own sessions) finds the same wrapping key.
    assert_eq!(open("in-token").decode_otp_in_token(&stored, &otp).unwrap().use_ctr, 0x21);

    let e = hsm.decode_otp_in_token(&stored, &TokenFields { uid: [3; 6], ..fields.clone() }.build().encrypt(&secrets.key)).unwrap_err();
    assert!(matches!(e, Error::OtpInvalid(OtpFault::UidMismatch)), "{e:?}");
    let e = hsm.decode_otp_in_token(&stored, &fields.build().encrypt(&otp::YubiKeyKey::new([1; 16]))).unwrap_err();
    assert!(matches!(e, Error::OtpInvalid(OtpFault::Crc)), "{e:?}");
    for i in 0..stored.wrapped_key.len() {
        let mut bad = stored.clone();
        bad.wrapped_key[i] ^= 0x04;
        let e = hsm.decode_otp_in_token(&bad, &otp).unwrap_err();
        assert!(matches!(e, Error::AeadInvalid(_)) && !e.is_backend_failure(), "byte {i}: {e:?}");
    }
    // Under another handle (another wrapping key) it does not unwrap.
    hsm.add_handle(KeyHandle::new(0xa2), Flags::OTP_DECODE, 256).unwrap();
    let moved = hsm::pkcs11::TokenWrappedSecret { key_handle: KeyHandle::new(0xa2), ..stored.clone() };
    assert!(matches!(hsm.decode_otp_in_token(&moved, &otp), Err(Error::AeadInvalid(_))));
    // Flags: both steps need OTP_DECODE.
    let perso_rec = hsm.generate_yubikey_aeads(&[perso], NonceSource::Random).unwrap()[0];
    assert!(matches!(hsm.wrap_for_token(&perso_rec), Err(Error::NotPermitted { .. })));
    let as_perso = hsm::pkcs11::TokenWrappedSecret { key_handle: perso, ..stored.clone() };
    assert!(matches!(hsm.decode_otp_in_token(&as_perso, &otp), Err(Error::NotPermitted { .. })));
    let mut tampered = rec;
    tampered.aead = Aead::from_slice(&[0; 30]).unwrap();
    assert!(matches!(hsm.wrap_for_token(&tampered), Err(Error::AeadInvalid(_))));
    assert!(matches!(Pkcs11Hsm::new(config("in-token")).unwrap().decode_otp_in_token(&stored, &otp), Err(Error::Locked)));
}

/// Decodes per second on SoftHSM2 (CCM from ECB + CBC, session-object key
/// copies). Not asserted; run with `--release --ignored --nocapture`.
#[test]
#[ignore = "measurement: cargo test --release -p hsm --test pkcs11 -- --ignored --nocapture decode_throughput"]
fn decode_throughput() {
    let hsm = open("bench");
    let kh = KeyHandle::new(0x80);
    hsm.add_handle(kh, FULL, 256).unwrap();
    let rec = hsm.generate_yubikey_aeads(&[kh], NonceSource::Random).unwrap()[0];
    let secrets = yubikey_secrets(&hsm, &rec);
    let otp = TokenFields { uid: *secrets.uid.expose(), counter: 1, ..Default::default() }.build().encrypt(&secrets.key);
    let threads: usize = std::env::var("DECODE_THREADS").ok().and_then(|t| t.parse().ok()).unwrap_or(2);
    let per_thread = 50_000;
    for _ in 0..1000 {
        hsm.decode_otp(&rec, &otp).unwrap();
    }
    let start = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                for _ in 0..per_thread {
                    hsm.decode_otp(&rec, &otp).unwrap();
                }
            });
        }
    });
    let secs = start.elapsed().as_secs_f64();
    println!(
        "PKCS#11/SoftHSM2 decode_otp (CCM from ECB + CBC): {} decodes in {secs:.2} s on {threads} threads = {:.0} decodes/s",
        threads * per_thread,
        (threads * per_thread) as f64 / secs
    );

    let wrapped = hsm.wrap_for_token(&rec).unwrap();
    let start = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                for _ in 0..per_thread {
                    hsm.decode_otp_in_token(&wrapped, &otp).unwrap();
                }
            });
        }
    });
    let secs = start.elapsed().as_secs_f64();
    println!(
        "PKCS#11/SoftHSM2 decode_otp_in_token (key-in-token): {} decodes in {secs:.2} s on {threads} threads = {:.0} decodes/s",
        threads * per_thread,
        (threads * per_thread) as f64 / secs
    );
}

/// Set in the child process that runs [`a_deleted_token_is_not_ready_never_a_verdict`].
const CHILD_VAR: &str = "OTP_APPLIANCE_PKCS11_TOKEN_DELETION_CHILD";

/// Deleting a token breaks SoftHSM2's slot list for the whole process, so
/// this scenario runs in a child process of this test binary, with its own
/// token directory.
#[test]
fn a_deleted_token_is_not_ready_never_a_verdict() {
    if std::env::var_os(CHILD_VAR).is_some() {
        return deleted_token_scenario();
    }
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["a_deleted_token_is_not_ready_never_a_verdict", "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_VAR, "1")
        .output()
        .unwrap();
    let text = format!("{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && text.contains("1 passed"), "child process failed:\n{text}");
}

fn deleted_token_scenario() {
    let tokens = TokenDir::new(Path::new(env!("CARGO_TARGET_TMPDIR")), Path::new(DEFAULT_MODULE));
    let _slot = tokens.init_token("gone", PIN, SO_PIN);
    // Only this test runs in this process.
    tokens.use_in_this_process();
    let hsm = Pkcs11Hsm::new(Pkcs11Config::for_token("gone")).unwrap();
    hsm.unlock(&pin()).unwrap();
    let kh = KeyHandle::new(0x90);
    hsm.add_handle(kh, FULL, 256).unwrap();
    let rec = hsm.generate_yubikey_aeads(&[kh], NonceSource::Random).unwrap()[0];
    let secrets = yubikey_secrets(&hsm, &rec);
    let otp = TokenFields { uid: *secrets.uid.expose(), counter: 4, ..Default::default() }.build().encrypt(&secrets.key);
    assert_eq!(hsm.decode_otp(&rec, &otp).unwrap().use_ctr, 4);

    let _ = tokens.util(&["--delete-token", "--token", "gone"]);
    assert_eq!(hsm.status(), Status::NotReady);
    let mut tampered = rec;
    tampered.aead = Aead::from_slice(&[0u8; 30]).unwrap();
    let bad_otp = TokenFields { uid: [0; 6], counter: 4, ..Default::default() }.build().encrypt(&secrets.key);
    for (what, e) in [
        ("decode", hsm.decode_otp(&rec, &otp).unwrap_err()),
        ("decode a tampered AEAD", hsm.decode_otp(&tampered, &otp).unwrap_err()),
        ("decode a bad OTP", hsm.decode_otp(&rec, &bad_otp).unwrap_err()),
        ("list handles", hsm.key_handles().unwrap_err()),
    ] {
        assert!(matches!(e, Error::NotReady(_)) && e.is_backend_failure(), "{what}: {e:?}");
    }
    assert_eq!(hsm.status(), Status::NotReady);
}
