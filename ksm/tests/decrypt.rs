//! The KSM decrypt path, library and command line, with real files.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use hsm::soft::format::KdfParams;
use hsm::soft::SoftHsm;
use hsm::{Flags, NonceSource, Password, SecurityModule};
use ksm::aead_dir::{AeadDir, KeyHandleDir};
use ksm::{Ksm, KsmError};
use otp::aead_file::{relative_path, AeadRecord};
use otp::token::TokenFields;
use otp::{HandleKey, KeyHandle, Otp, PublicId, YubiKeySecrets};

const KH: KeyHandle = KeyHandle::new(0x2000);

struct Site {
    dir: tempfile::TempDir,
    hsm: Arc<SoftHsm>,
    aeads: AeadDir,
}

/// A keystore with one decode+generate+export handle and `n` YubiKeys.
fn site(n: u64) -> (Site, Vec<(PublicId, YubiKeySecrets)>) {
    let dir = tempfile::tempdir().unwrap();
    let hsm = SoftHsm::create(&dir.path().join("ks"), &Password::new("pw").unwrap(), KdfParams::INSECURE_FOR_TESTS).unwrap();
    let key = HandleKey::new(&[7; 32]).unwrap();
    hsm.import_handles(&[(KH, Flags::PERSONALIZER | Flags::OTP_DECODE, key)]).unwrap();
    let aeads = AeadDir::new(dir.path().join("aeads"));
    let mut keys = Vec::new();
    for i in 1..=n {
        let id = PublicId::from_number(i, 6).unwrap();
        let rec = hsm.generate_yubikey_aeads(&[KH], NonceSource::Given(id.aead_nonce().unwrap())).unwrap().remove(0);
        aeads.write(&KH.into(), &id, &rec).unwrap();
        keys.push((id, YubiKeySecrets::from_plaintext(&hsm.decrypt_aead(&rec).unwrap()).unwrap()));
    }
    (Site { dir, hsm: Arc::new(hsm), aeads }, keys)
}

fn otp_for(id: &PublicId, s: &YubiKeySecrets, counter: u16, session_use: u8) -> String {
    let t = TokenFields { uid: *s.uid.expose(), counter, session_use, timestamp_low: 0xbeef, timestamp_high: 0x12, rnd: 7 }.build();
    Otp::new(*id, t.encrypt(&s.key)).to_string()
}

fn ksm(site: &Site, handles: &[&str]) -> Ksm {
    Ksm::new(site.hsm.clone(), Box::new(site.aeads.clone()), handles.iter().map(|h| h.parse().unwrap()).collect())
}

#[test]
fn decodes_and_answers_ksm_lines() {
    let (site, keys) = site(3);
    let k = ksm(&site, &["0x2000"]);
    for (id, s) in &keys {
        assert_eq!(k.answer(&otp_for(id, s, 5, 9)), "OK counter=0005 low=beef high=12 use=09");
        // The caps-lock bit is part of the raw counter the protocol prints.
        assert_eq!(k.answer(&otp_for(id, s, 0x8005, 0)), "OK counter=8005 low=beef high=12 use=00");
    }
}

#[test]
fn every_err_path() {
    let (site, keys) = site(2);
    let k = ksm(&site, &["0x2000"]);
    let (id, s) = &keys[0];
    let good = otp_for(id, s, 1, 0);

    assert!(matches!(k.decrypt(""), Err(KsmError::NoOtp)));
    assert_eq!(k.answer(""), "ERR No OTP provided");
    for bad in ["hello", "cccccccccccbdvgtiblfkbgturecfllberrvkinnctnna", &format!("{good}x"), &good.replace('c', "é")] {
        assert_eq!(k.answer(bad), "ERR Invalid OTP format", "{bad}");
    }
    // Unknown public id.
    let stranger = otp_for(&PublicId::from_number(99, 6).unwrap(), s, 1, 0);
    assert_eq!(k.answer(&stranger), "ERR Unknown yubikey");
    // CRC failure: another YubiKey's token under this id.
    let (_, s2) = &keys[1];
    let crc_bad = otp_for(id, s2, 1, 0);
    assert!(matches!(k.decrypt(&crc_bad), Err(KsmError::CorruptOtp(hsm::Error::OtpInvalid(hsm::OtpFault::Crc)))));
    assert_eq!(k.answer(&crc_bad), "ERR Corrupt OTP");
    // uid mismatch: right key, wrong private id.
    let t = TokenFields { uid: [9; 6], counter: 1, ..Default::default() }.build();
    let uid_bad = Otp::new(*id, t.encrypt(&s.key)).to_string();
    assert!(matches!(k.decrypt(&uid_bad), Err(KsmError::CorruptOtp(hsm::Error::OtpInvalid(hsm::OtpFault::UidMismatch)))));
    assert_eq!(k.answer(&uid_bad), "ERR Corrupt OTP");

    // A tampered AEAD is the store's fault, not the OTP's: a backend failure.
    let path = site.aeads.base().join(relative_path("0x2000", id));
    let mut bytes = std::fs::read(&path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&path, &bytes).unwrap();
    let e = k.decrypt(&good).unwrap_err();
    assert!(matches!(e, KsmError::CorruptAead(_)) && e.is_backend_failure());
    assert_eq!(k.answer(&good), "ERR Corrupt AEAD");
    // A truncated file cannot be read as an AEAD at all.
    std::fs::write(&path, &bytes[..20]).unwrap();
    let e = k.decrypt(&good).unwrap_err();
    assert!(matches!(e, KsmError::Database(_)) && e.is_backend_failure(), "{e:?}");
    assert_eq!(k.answer(&good), "ERR Database error");
}

#[test]
fn permission_and_lock_are_backend_failures() {
    let (site, keys) = site(1);
    let (id, s) = &keys[0];
    let good = otp_for(id, s, 1, 0);
    // A personalizer-only keystore with the same key cannot decode.
    let gen_only = SoftHsm::create(&site.dir.path().join("gen"), &Password::new("pw").unwrap(), KdfParams::INSECURE_FOR_TESTS).unwrap();
    gen_only.import_handles(&[(KH, Flags::PERSONALIZER, HandleKey::new(&[7; 32]).unwrap())]).unwrap();
    let k = Ksm::new(Arc::new(gen_only), Box::new(site.aeads.clone()), vec![KH.into()]);
    let e = k.decrypt(&good).unwrap_err();
    assert!(matches!(e, KsmError::Backend(hsm::Error::NotPermitted { .. })) && e.is_backend_failure());
    assert_eq!(k.answer(&good), "ERR Backend error");
    // A locked keystore.
    let locked = SoftHsm::open(&site.dir.path().join("ks")).unwrap();
    let k = Ksm::new(Arc::new(locked), Box::new(site.aeads.clone()), vec![KH.into()]);
    assert!(matches!(k.decrypt(&good), Err(KsmError::Backend(hsm::Error::Locked))));
}

#[test]
fn several_handles_and_pyhsm_directory_names() {
    let (site, keys) = site(1);
    let (id, s) = &keys[0];
    // A second handle with its own key; the AEAD lives under the typed
    // directory name "8193" (pyhsm names directories as typed).
    let kh2 = KeyHandle::new(8193);
    site.hsm.add_handle(kh2, Flags::PERSONALIZER | Flags::OTP_DECODE, 128).unwrap();
    let id2 = PublicId::from_number(2, 6).unwrap();
    let rec = site.hsm.generate_yubikey_aeads(&[kh2], NonceSource::Given(id2.aead_nonce().unwrap())).unwrap().remove(0);
    site.aeads.write(&"8193".parse().unwrap(), &id2, &rec).unwrap();
    let s2 = YubiKeySecrets::from_plaintext(&site.hsm.decrypt_aead(&rec).unwrap()).unwrap();
    assert!(site.aeads.base().join("8193").is_dir());

    // Typed as hex, the handle still finds the decimal directory.
    let k = ksm(&site, &["0x2000", "0x2001"]);
    assert!(k.answer(&otp_for(id, s, 3, 1)).starts_with("OK counter=0003"));
    assert!(k.answer(&otp_for(&id2, &s2, 4, 2)).starts_with("OK counter=0004"));
    // Only the other handle configured: its AEAD is unknown.
    assert_eq!(ksm(&site, &["0x2001"]).answer(&otp_for(id, s, 3, 1)), "ERR Unknown yubikey");

    // A v0 file (bare AEAD) takes its nonce from the public id.
    let id3 = PublicId::from_number(3, 6).unwrap();
    let rec3 = site.hsm.generate_yubikey_aeads(&[KH], NonceSource::Given(id3.aead_nonce().unwrap())).unwrap().remove(0);
    let p = site.aeads.base().join(relative_path("0x2000", &id3));
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(&p, rec3.aead.as_bytes()).unwrap();
    let s3 = YubiKeySecrets::from_plaintext(&site.hsm.decrypt_aead(&rec3).unwrap()).unwrap();
    assert!(k.answer(&otp_for(&id3, &s3, 1, 1)).starts_with("OK "));
    // A v1 file that names another key handle is refused as a store error.
    let wrong = AeadRecord { key_handle: kh2, ..rec3 };
    std::fs::write(&p, wrong.to_v1_bytes()).unwrap();
    assert_eq!(k.answer(&otp_for(&id3, &s3, 1, 1)), "ERR Database error");
}

#[test]
fn write_refuses_to_overwrite() {
    let (site, keys) = site(1);
    let (id, _) = &keys[0];
    let rec = site.hsm.generate_yubikey_aeads(&[KH], NonceSource::Random).unwrap().remove(0);
    let kh: KeyHandleDir = KH.into();
    assert!(matches!(site.aeads.write(&kh, id, &rec), Err(hsm::Error::AlreadyExists(_))));
}

fn ksm_cmd(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_ksm")).args(args).env_remove("RUST_LOG").output().unwrap()
}

#[test]
fn command_line_decrypt() {
    let dir = tempfile::tempdir().unwrap();
    let d = |p: &str| dir.path().join(p).to_str().unwrap().to_owned();
    std::fs::write(d("pw"), "secret\n").unwrap();
    std::fs::write(d("keys.json"), format!("{{\"8192\": \"{}\"}}", "07".repeat(32))).unwrap();
    let ks = ["--keystore", &d("ks"), "--password-file", &d("pw")];
    let out = ksm_cmd(&[&["keystore", "init"][..], &ks, &["--kdf-memory-mib", "1", "--kdf-iterations", "1"]].concat());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = ksm_cmd(&[&["keystore", "import-pyhsm"][..], &ks, &["--json", &d("keys.json"), "--flags", "decode-only"]].concat());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // The AEAD is made outside the KSM (same key, in the pure core), as the
    // personalisation laptop would.
    let id = PublicId::from_number(1, 6).unwrap();
    let secrets = YubiKeySecrets::from_plaintext(&[3u8; 22]).unwrap();
    let aead = HandleKey::new(&[7; 32]).unwrap().seal(KH, &id.aead_nonce().unwrap(), &*secrets.to_plaintext()).unwrap();
    AeadDir::new(d("aeads")).write(&KH.into(), &id, &AeadRecord { key_handle: KH, nonce: id.aead_nonce().unwrap(), aead }).unwrap();

    let decrypt = |otp: &str, pwfile: &str| {
        ksm_cmd(&["decrypt", "--keystore", &d("ks"), "--password-file", &d(pwfile), "--aead-dir", &d("aeads"), "--key-handle", "8192", otp])
    };
    let out = decrypt(&otp_for(&id, &secrets, 0x12, 0x34), "pw");
    assert!(out.status.success());
    assert_eq!(String::from_utf8(out.stdout).unwrap(), "OK counter=0012 low=beef high=12 use=34\n");

    let out = decrypt("not-an-otp", "pw");
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(String::from_utf8(out.stdout).unwrap(), "ERR Invalid OTP format\n");

    std::fs::write(d("wrong"), "nope").unwrap();
    let out = decrypt(&otp_for(&id, &secrets, 1, 1), "wrong");
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(String::from_utf8(out.stdout).unwrap(), "ERR Backend error\n");
    assert!(String::from_utf8(out.stderr).unwrap().contains("wrong password"));
    assert_no_secret_in(&d("aeads"));

    // The same through the SQLite store; a missing store is a database error.
    let out = ksm_cmd(&["import", "--store", &d("aeads.db"), "--aead-dir", &d("aeads")]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let from_store = |db: &str| {
        let otp = otp_for(&id, &secrets, 0x12, 0x35);
        ksm_cmd(&["decrypt", "--keystore", &d("ks"), "--password-file", &d("pw"), "--store", &d(db), "--key-handle", "8192", &otp])
    };
    assert_eq!(String::from_utf8(from_store("aeads.db").stdout).unwrap(), "OK counter=0012 low=beef high=12 use=35\n");
    let out = from_store("typo.db");
    assert_eq!((out.status.code(), String::from_utf8(out.stdout).unwrap().as_str()), (Some(1), "ERR Database error\n"));
    assert!(!dir.path().join("typo.db").exists());
}

/// The AEAD directory holds AEADs only: no file contains the handle key.
fn assert_no_secret_in(dir: &str) {
    for entry in walk(Path::new(dir)) {
        let bytes = std::fs::read(&entry).unwrap();
        assert!(!bytes.windows(32).any(|w| w == [7u8; 32]), "{}", entry.display());
    }
}

fn walk(p: &Path) -> Vec<std::path::PathBuf> {
    if p.is_file() {
        return vec![p.to_path_buf()];
    }
    std::fs::read_dir(p).unwrap().flat_map(|e| walk(&e.unwrap().path())).collect()
}

#[test]
fn decrypts_from_the_sqlite_store() {
    let (site, keys) = site(2);
    let store = ksm::store::AeadStore::open(&site.dir.path().join("aeads.db")).unwrap();
    for (id, _) in &keys {
        let rec = ksm::AeadLookup::lookup(&site.aeads, id, &KH.into()).unwrap().unwrap();
        assert_eq!(store.put(id, &rec, "test", 0).unwrap(), ksm::store::PutOutcome::Added);
    }
    let k = Ksm::new(site.hsm.clone(), Box::new(store), vec![KH.into()]);
    for (id, s) in &keys {
        assert_eq!(k.answer(&otp_for(id, s, 2, 3)), "OK counter=0002 low=beef high=12 use=03");
    }
    assert_eq!(k.answer(&otp_for(&PublicId::from_number(9, 6).unwrap(), &keys[0].1, 1, 1)), "ERR Unknown yubikey");
}
