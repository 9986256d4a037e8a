//! A validation server whose module is a PKCS#11 token (a throwaway
//! SoftHSM2 one), set up with the `ksm` binary: the servers' keystore from
//! the key-handle ceremony loaded into the token (`keystore
//! import-keystore --hsm-config`), handles listed and added there, and
//! `ksm decrypt` and `ksm serve --hsm-config` answering from the token.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::path::Path;
use std::process::{Command, Output};

use appliance_tests::softhsm2::TokenDir;
use common::Server;
use hsm::admin::export_decode_only;
use hsm::pkcs11::{Pkcs11Config, Pkcs11Hsm, DEFAULT_MODULE};
use hsm::soft::format::KdfParams;
use hsm::soft::SoftHsm;
use hsm::{Flags, NonceSource, Password, SecurityModule};
use ksm::aead_dir::AeadDir;
use otp::token::TokenFields;
use otp::{HandleKey, KeyHandle, Otp, PublicId, YubiKeySecrets};

const KH: KeyHandle = KeyHandle::new(0x2000);

fn ksm(tokens: &TokenDir, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ksm")).env("SOFTHSM2_CONF", tokens.conf()).env_remove("RUST_LOG").args(args).output().unwrap()
}

fn ok(out: &Output) -> String {
    assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn refused(out: &Output) -> String {
    assert!(!out.status.success(), "should have failed: {}", String::from_utf8_lossy(&out.stdout));
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn a_server_token_takes_the_ceremony_keystore_and_decodes() {
    let tokens = TokenDir::new(Path::new(env!("CARGO_TARGET_TMPDIR")), Path::new(DEFAULT_MODULE));
    let _slot = tokens.init_token("auth1", "1470", "2580");
    let root = tokens.root();
    std::fs::write(root.join("pin"), "1470\n").unwrap();
    let table = root.join("hsm.toml");
    std::fs::write(&table, format!("[hsm]\ntype = \"pkcs11\"\ntoken_label = \"auth1\"\npin_file = {:?}\n", s(&root.join("pin")))).unwrap();

    // The laptop (a soft keystore here): a YubiKey, and the servers' keystore.
    let laptop = SoftHsm::create(&root.join("laptop.ks"), &Password::new("pw").unwrap(), KdfParams::INSECURE_FOR_TESTS).unwrap();
    laptop.import_handles(&[(KH, Flags::PERSONALIZER, HandleKey::new(&[0x3c; 32]).unwrap())]).unwrap();
    let id = PublicId::from_number(42, 6).unwrap();
    let rec = laptop.generate_yubikey_aeads(&[KH], NonceSource::Given(id.aead_nonce().unwrap())).unwrap().remove(0);
    let secrets = YubiKeySecrets::from_plaintext(&laptop.decrypt_aead(&rec).unwrap()).unwrap();
    let aeads = root.join("aeads");
    AeadDir::new(&aeads).write(&KH.into(), &id, &rec).unwrap();
    let servers = root.join("servers.keystore");
    std::fs::write(root.join("servers.pw"), "servers\n").unwrap();
    export_decode_only(&laptop, &servers, &Password::new("servers").unwrap(), KdfParams::INSECURE_FOR_TESTS, &[KH]).unwrap();

    let module = ["--hsm-config", s(&table)];
    let servers_pw = root.join("servers.pw");
    let import = [&["keystore", "import-keystore"][..], &module, &["--from", s(&servers), "--from-password-file", s(&servers_pw)]].concat();
    let out = ok(&ksm(&tokens, &import));
    assert!(out.contains("imported key handle 0x2000 (AES-256, flags otp-decode)"), "{out}");
    let err = refused(&ksm(&tokens, &import));
    assert!(err.contains("0x2000") && err.contains("exists"), "imported twice: {err}");
    ok(&ksm(&tokens, &[&["keystore", "add-handle"][..], &module, &["--key-handle", "0x31", "--flags", "decode-only"]].concat()));
    let listed = ok(&ksm(&tokens, &[&["keystore", "list"][..], &module].concat()));
    assert!(listed.contains("0x2000") && listed.contains("0x31") && listed.contains("otp-decode"), "{listed}");
    let err = refused(&ksm(&tokens, &[&["keystore", "init"][..], &module].concat()));
    assert!(err.contains("--keystore"), "{err}");

    // The token decodes; a wrong OTP is a verdict, not a backend error.
    let token = TokenFields { uid: *secrets.uid.expose(), counter: 12, session_use: 3, ..Default::default() }.build();
    let otp = Otp::new(id, token.encrypt(&secrets.key)).to_string();
    let decrypt =
        |otp: &str| ksm(&tokens, &[&["decrypt"][..], &module, &["--aead-dir", s(&aeads), "--key-handle", "0x2000", otp]].concat());
    let out = ok(&decrypt(&otp));
    assert!(out.starts_with("OK counter=000c"), "{out}");
    let other = TokenFields { uid: [9; 6], counter: 12, ..Default::default() }.build().encrypt(&secrets.key);
    let out = decrypt(&Otp::new(id, other).to_string());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("ERR Corrupt OTP"), "{out:?}");

    // `ksm serve` on the token: the Yubico KSM protocol over loopback.
    let server = Server::start(
        &["--hsm-config", s(&table), "--aead-dir", s(&aeads), "--key-handles", "0x2000", "--listen", "127.0.0.1:0"],
        &[("SOFTHSM2_CONF", tokens.conf().as_os_str())],
    );
    assert_eq!(server.get(&format!("/wsapi/decrypt?otp={otp}")), (200, "OK counter=000c low=0000 high=00 use=03\n".to_owned()));
    drop(server);

    // In the token the imported key is sensitive and can never leave.
    tokens.use_in_this_process();
    let hsm = Pkcs11Hsm::open(Pkcs11Config { pin_file: Some(root.join("pin")), ..Pkcs11Config::for_token("auth1") }).unwrap();
    let p = hsm.key_protection(KH).unwrap();
    assert!(p.sensitive && !p.extractable && !p.value_readable, "{p:?}");
    assert_eq!(hsm.decode_otp(&rec, &token.encrypt(&secrets.key)).unwrap().use_ctr, 12);
}
