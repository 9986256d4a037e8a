//! `personalizer generate` end to end: keystore, AEAD files, CSV, decode.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Output};
use std::sync::Arc;

use hsm::soft::SoftHsm;
use hsm::{Password, SecurityModule};
use ksm::aead_dir::AeadDir;
use ksm::Ksm;
use otp::aead_file::{relative_path, AeadFile};
use otp::token::TokenFields;
use otp::{KeyHandle, Otp, PrivateId, PublicId, YubiKeyKey};

fn personalizer(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_personalizer")).args(args).env_remove("RUST_LOG").output().unwrap()
}

fn ok(out: Output) -> String {
    assert!(out.status.success(), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn generate_writes_aeads_and_secrets_once() {
    let dir = tempfile::tempdir().unwrap();
    let d = |p: &str| dir.path().join(p).to_str().unwrap().to_owned();
    std::fs::write(d("pw"), "correct horse\n").unwrap();
    let ks = ["--keystore", &d("ks"), "--password-file", &d("pw")];
    ok(personalizer(&[&["keystore", "init"][..], &ks, &["--kdf-memory-mib", "1", "--kdf-iterations", "1"]].concat()));
    ok(personalizer(&[&["keystore", "add-handle"][..], &ks, &["--key-handle", "0x2000", "--flags", "personalizer,otp-decode"]].concat()));
    ok(personalizer(
        &[&["keystore", "add-handle"][..], &ks, &["--key-handle", "KSM1", "--flags", "personalizer", "--key-bits", "128"]].concat(),
    ));
    let list = ok(personalizer(&[&["keystore", "list"][..], &ks].concat()));
    assert!(list.contains("0x2000") && list.contains("0x314d534b") && list.contains("AES-128") && list.contains("otp-decode"), "{list}");

    let (aeads, secrets) = (d("aeads"), d("secrets.csv"));
    let gen = [
        &["generate"][..],
        &ks,
        &["--count", "5", "--start-public-id", "cccccccccccd", "--key-handles", "0x2000,KSM1", "--out", &aeads, "--yubikey-csv", &secrets],
    ]
    .concat();
    let report = ok(personalizer(&gen));
    assert!(report.contains("public ids cccccccccccd to ccccccccccch"), "{report}");
    // Secrets leave once: a second run refuses to overwrite the CSV.
    let again = personalizer(&gen);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("exists already"));

    let csv = std::fs::read_to_string(d("secrets.csv")).unwrap();
    assert_eq!(std::fs::metadata(d("secrets.csv")).unwrap().permissions().mode() & 0o777, 0o600);
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines.len(), 5);

    let hsm = Arc::new(SoftHsm::open(&dir.path().join("ks")).unwrap());
    hsm.unlock(&Password::new("correct horse").unwrap()).unwrap();
    let ksm = Ksm::new(hsm, Box::new(AeadDir::new(d("aeads"))), vec!["0x2000".parse().unwrap()]);
    for (i, line) in lines.iter().enumerate() {
        let f: Vec<&str> = line.split(',').collect();
        assert_eq!(f.len(), 11, "{line}");
        assert_eq!(f[0], (i + 1).to_string());
        assert_eq!(&f[4..], ["000000000000", "", "", "", "", "", ""]);
        let id = PublicId::from_modhex(f[1]).unwrap();
        assert_eq!(id.to_number(), 2 + i as u64);
        // v1 files under both handles, in pyhsm's layout, mode 0600.
        for (kh_dir, kh) in [("0x2000", 0x2000), ("KSM1", 0x314d534b)] {
            let path = dir.path().join("aeads").join(relative_path(kh_dir, &id));
            assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
            let AeadFile::V1(rec) = AeadFile::parse(&std::fs::read(&path).unwrap()).unwrap() else { panic!("not v1") };
            assert_eq!(rec.key_handle, KeyHandle::new(kh));
            assert_eq!(rec.nonce, id.aead_nonce().unwrap());
            assert_eq!(rec.aead.len(), 30);
        }
        // Program a "YubiKey" from the CSV and decode its OTP.
        let key = YubiKeyKey::from_hex(f[3]).unwrap();
        let uid = PrivateId::from_hex(f[2]).unwrap();
        let token = TokenFields { uid: *uid.expose(), counter: 3, session_use: 4, ..Default::default() }.build();
        let otp = Otp::new(id, token.encrypt(&key)).to_string();
        assert_eq!(ksm.answer(&otp), "OK counter=0003 low=0000 high=00 use=04");
    }
}

#[test]
fn generate_refuses_bad_requests() {
    let dir = tempfile::tempdir().unwrap();
    let d = |p: &str| dir.path().join(p).to_str().unwrap().to_owned();
    std::fs::write(d("pw"), "pw").unwrap();
    let ks = ["--keystore", &d("ks"), "--password-file", &d("pw")];
    ok(personalizer(&[&["keystore", "init"][..], &ks, &["--kdf-memory-mib", "1", "--kdf-iterations", "1"]].concat()));
    ok(personalizer(&[&["keystore", "add-handle"][..], &ks, &["--key-handle", "1", "--flags", "decode-only"]].concat()));
    ok(personalizer(&[&["keystore", "add-handle"][..], &ks, &["--key-handle", "2", "--flags", "buffer-aead-generate"]].concat()));
    let run = |extra: &[&str]| {
        let out = personalizer(&[&["generate"][..], &ks, &["--out", &d("aeads")], extra].concat());
        assert!(!out.status.success(), "{extra:?} should fail");
        String::from_utf8(out.stderr).unwrap()
    };
    assert!(run(&["--start-public-id", "1", "--key-handles", "1"]).contains("not permitted"));
    // Public id as nonce needs user-nonce; a random nonce does not.
    assert!(run(&["--start-public-id", "1", "--key-handles", "2"]).contains("user-nonce"));
    ok(personalizer(
        &[&["generate"][..], &ks, &["--out", &d("aeads"), "--start-public-id", "1", "--key-handles", "2", "--random-nonce"]].concat(),
    ));
    // Exporting secrets needs the export flag.
    assert!(run(&["--start-public-id", "7", "--key-handles", "2", "--random-nonce", "--yubikey-csv", &d("s.csv")]).contains("export"));
    assert!(!dir.path().join("s.csv").exists());
    assert!(run(&["--start-public-id", "0", "--key-handles", "2"]).contains("public id 0"));
    assert!(run(&["--start-public-id", "xyz", "--key-handles", "2"]).contains("neither a number nor a modhex id"));
    assert!(run(&["--start-public-id", "1", "--key-handles", "2", "--public-id-chars", "7"]).contains("even"));
    assert!(run(&["--start-public-id", "1", "--key-handles", "99", "--random-nonce"]).contains("does not exist"));
}
