//! `[hsm]` tables: every backend parses from TOML, mistakes are refused
//! with a message naming them, and each one opens a real module: a soft
//! keystore, a throwaway SoftHSM2 token (Debian package `softhsm2`), and the
//! `yhsm1-emulator` binary's pty.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use appliance_tests::softhsm2::TokenDir;
use appliance_tests::yhsm1::{keys_json, Emulator};
use hsm::config::{HsmConfig, Yhsm1Config, Yhsm1Handle};
use hsm::pkcs11::{unlock, Pkcs11Config, Pkcs11Hsm, DEFAULT_MODULE};
use hsm::soft::format::KdfParams;
use hsm::soft::SoftHsm;
use hsm::{Flags, NonceSource, Password, SecurityModule, Status};
use otp::{AeadNonce, HandleKey, KeyHandle};

const KEY: [u8; 16] = [0x42; 16];
const MASTER_KEY: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

fn parse(text: &str) -> Result<HsmConfig, String> {
    toml::from_str::<HsmConfig>(text).map_err(|e| e.to_string())
}

#[test]
fn every_type_parses() {
    let soft = parse("type = \"soft\"\nkeystore = \"/var/lib/ks\"\npassword_file = \"/etc/pw\"\n").unwrap();
    assert_eq!(soft, HsmConfig::soft(Path::new("/var/lib/ks"), Some(Path::new("/etc/pw"))));
    assert_eq!(soft.kind(), "soft");
    assert!(soft.has_data_keys());
    assert_eq!(soft.to_string(), "the soft keystore /var/lib/ks");

    let HsmConfig::Pkcs11(p) = parse("type = \"pkcs11\"\ntoken_label = \"T\"\npin_env = \"PIN\"\nretries = 4\n").unwrap() else {
        panic!("not pkcs11")
    };
    assert_eq!(p, Pkcs11Config { pin_env: Some("PIN".into()), retries: 4, ..Pkcs11Config::for_token("T") });

    let y = parse(
        "type = \"yhsm1\"\ndevice = \"/dev/ttyACM0\"\nmaster_key_file = \"/etc/mk\"\ntimeout_ms = 500\n\
         key_handles = [{ id = \"0x2000\", flags = \"otp-decode\" }, { id = 1, flags = 0x20000000, key_bits = 128 }]\n",
    )
    .unwrap();
    assert!(!y.has_data_keys());
    assert_eq!(y.to_string(), "the YubiHSM 1 at /dev/ttyACM0");
    let HsmConfig::Yhsm1(y) = y else { panic!("not yhsm1") };
    assert_eq!(y.timeout_ms, Some(500));
    assert_eq!(
        y.key_handles,
        [
            Yhsm1Handle { id: KeyHandle::new(0x2000), flags: Flags::OTP_DECODE, key_bits: 256 },
            Yhsm1Handle { id: KeyHandle::new(1), flags: Flags::from_bits(0x2000_0000), key_bits: 128 },
        ]
    );
    let daemon = parse("type = \"yhsm1\"\nsocket = \"/run/yhsm1.sock\"\n").unwrap();
    assert!(daemon.check().is_ok());
}

#[test]
fn mistakes_are_refused_clearly() {
    let e = parse("type = \"soft\"\nkeystore = \"ks\"\npasword_file = \"pw\"\n").unwrap_err();
    assert!(e.contains("pasword_file"), "{e}");
    let e = parse("type = \"pkcs11\"\ntoken_lable = \"T\"\n").unwrap_err();
    assert!(e.contains("token_lable"), "{e}");
    let e = parse("type = \"yhsm1\"\ndevice = \"/dev/x\"\ntimeout = 5\n").unwrap_err();
    assert!(e.contains("timeout"), "{e}");
    let e = parse("type = \"yhsm2\"\n").unwrap_err();
    assert!(e.contains("yhsm2") && e.contains("soft") && e.contains("pkcs11") && e.contains("yhsm1"), "{e}");
    let e = parse("keystore = \"ks\"\n").unwrap_err();
    assert!(e.contains("type"), "{e}");
    let e = parse("type = \"soft\"\n").unwrap_err();
    assert!(e.contains("keystore"), "{e}");
    let e = parse("type = \"yhsm1\"\ndevice = \"/dev/x\"\nkey_handles = [{ id = \"0x2000\", flags = \"otp-decod\" }]\n").unwrap_err();
    assert!(e.contains("otp-decod"), "{e}");
    let e = parse("type = \"yhsm1\"\ndevice = \"/dev/x\"\nkey_handles = [{ id = \"0xzz\", flags = \"otp-decode\" }]\n").unwrap_err();
    assert!(e.contains("0xzz"), "{e}");

    let both = parse("type = \"yhsm1\"\ndevice = \"/dev/x\"\nsocket = \"/run/s\"\n").unwrap();
    assert!(both.check().unwrap_err().to_string().contains("not both"));
    assert!(both.open().unwrap_err().to_string().contains("not both"));
    let neither = parse("type = \"yhsm1\"\n").unwrap();
    assert!(neither.check().unwrap_err().to_string().contains("no YubiHSM 1"));
    for (text, says) in [
        ("password_file = \"p\"\nsealed_password = \"s\"\n[unlock_token]\ntoken_label = \"U\"\n", "not both"),
        ("sealed_password = \"s\"\n", "needs an [hsm.unlock_token]"),
        ("[unlock_token]\ntoken_label = \"U\"\n", "only with `sealed_password`"),
    ] {
        let c = parse(&format!("type = \"soft\"\nkeystore = \"ks\"\n{text}")).unwrap();
        let e = c.check().unwrap_err().to_string();
        assert!(e.contains(says), "{text}: {e}");
    }
    let e = parse("type = \"soft\"\nkeystore = \"ks\"\nsealed_password = \"s\"\n[unlock_token]\ntoken_lable = \"U\"\n").unwrap_err();
    assert!(e.contains("token_lable"), "{e}");
    let slot_and_label = parse("type = \"pkcs11\"\ntoken_label = \"T\"\nslot = 1\n").unwrap();
    assert!(slot_and_label.check().unwrap_err().to_string().contains("not both"));
}

#[test]
fn soft_opens_and_unlocks_a_keystore() {
    let dir = tempfile::tempdir().unwrap();
    let ks = dir.path().join("keystore");
    let pw = dir.path().join("password");
    SoftHsm::create(&ks, &Password::new("secret").unwrap(), KdfParams::INSECURE_FOR_TESTS).unwrap();
    std::fs::write(&pw, "secret\n").unwrap();
    let text = format!("type = \"soft\"\nkeystore = {:?}\npassword_file = {:?}\n", ks.display().to_string(), pw.display().to_string());
    let hsm = parse(&text).unwrap().open().unwrap();
    assert_eq!(hsm.status(), Status::Ready);
    std::fs::write(&pw, "wrong\n").unwrap();
    assert!(matches!(parse(&text).unwrap().open().unwrap_err(), hsm::Error::WrongPassword));
}

/// A soft keystore holding handle 1 with [`KEY`] and every flag.
fn soft_with_key() -> (tempfile::TempDir, SoftHsm) {
    let dir = tempfile::tempdir().unwrap();
    let soft = SoftHsm::create(&dir.path().join("keystore"), &Password::new("pw").unwrap(), KdfParams::INSECURE_FOR_TESTS).unwrap();
    soft.import_handles(&[(KeyHandle::new(1), Flags::from_bits(0x7fff_ffff), HandleKey::new(&KEY).unwrap())]).unwrap();
    (dir, soft)
}

#[test]
fn pkcs11_opens_a_throwaway_softhsm2_token() {
    let tokens = TokenDir::new(Path::new(env!("CARGO_TARGET_TMPDIR")), Path::new(DEFAULT_MODULE));
    let _slot = tokens.init_token("config-test", "1234", "4321");
    // The only test of this binary that loads the module.
    tokens.use_in_this_process();
    let dir = tokens.root();
    let pin = dir.join("pin");
    std::fs::write(&pin, "1234\n").unwrap();
    let text = format!("type = \"pkcs11\"\ntoken_label = \"config-test\"\npin_file = {:?}\n", pin.display().to_string());
    let config = parse(&text).unwrap();
    let HsmConfig::Pkcs11(p) = &config else { panic!("not pkcs11") };
    Pkcs11Hsm::open(p.clone())
        .unwrap()
        .import_handle_key(KeyHandle::new(1), Flags::from_bits(0x7fff_ffff), &HandleKey::new(&KEY).unwrap())
        .unwrap();

    let hsm = config.open().unwrap();
    assert_eq!(hsm.status(), Status::Ready);
    let (_soft_dir, soft) = soft_with_key();
    let n = NonceSource::Given(AeadNonce::new([1, 2, 3, 4, 5, 6]));
    let pt = [7u8; 22];
    assert_eq!(hsm.import_aead(KeyHandle::new(1), n, &pt).unwrap(), soft.import_aead(KeyHandle::new(1), n, &pt).unwrap());

    // Encrypt-key unlock: a soft keystore whose password is sealed to an
    // RSA key in the token.
    let ks = dir.join("sealed.keystore");
    let password = Password::new("sealed secret").unwrap();
    SoftHsm::create(&ks, &password, KdfParams::INSECURE_FOR_TESTS).unwrap();
    unlock::open_token(p).unwrap().generate_unlock_key("config-unlock", 2048).unwrap();
    let sealed = dir.join("password.sealed");
    unlock::seal_password(p, "config-unlock", &password, &sealed).unwrap();
    let text = format!(
        "type = \"soft\"\nkeystore = {:?}\nsealed_password = {:?}\n[unlock_token]\ntoken_label = \"config-test\"\npin_file = {:?}\n",
        ks.display().to_string(),
        sealed.display().to_string(),
        pin.display().to_string()
    );
    let soft = parse(&text).unwrap().open().unwrap();
    assert_eq!(soft.status(), Status::Ready);

    std::fs::write(&pin, "9999\n").unwrap();
    assert!(matches!(config.open().unwrap_err(), hsm::Error::WrongPassword));
    let missing = parse("type = \"pkcs11\"\ntoken_label = \"no-such-token\"\n").unwrap();
    let e = missing.open().unwrap_err().to_string();
    assert!(e.contains("no-such-token"), "{e}");
}

/// A `yhsm1-emulator`, locked under [`MASTER_KEY`], holding handle 1 with
/// [`KEY`] and every flag.
fn emulator() -> Emulator {
    let keys = keys_json([(1, KEY.as_slice())]);
    Emulator::start(Path::new(env!("CARGO_BIN_EXE_yhsm1-emulator")), &keys, &["--locked", "--master-key", MASTER_KEY])
}

#[test]
fn yhsm1_opens_the_emulator_and_unlocks_it() {
    let emu = emulator();
    let dir = tempfile::tempdir().unwrap();
    let mk = dir.path().join("master-key");
    std::fs::write(&mk, format!("{MASTER_KEY}\n")).unwrap();
    let text = format!(
        "type = \"yhsm1\"\ndevice = {:?}\nmaster_key_file = {:?}\ntimeout_ms = 3000\nkey_handles = [{{ id = 1, flags = \"0x7fffffff\", key_bits = 128 }}]\n",
        emu.path().display().to_string(),
        mk.display().to_string()
    );
    let config = parse(&text).unwrap();
    let hsm = config.open().unwrap();
    assert_eq!(hsm.status(), Status::Ready);
    assert_eq!(hsm.key_handles().unwrap().len(), 1);
    let (_soft_dir, soft) = soft_with_key();
    let n = NonceSource::Given(AeadNonce::new([1, 2, 3, 4, 5, 6]));
    let pt = [7u8; 22];
    assert_eq!(hsm.import_aead(KeyHandle::new(1), n, &pt).unwrap(), soft.import_aead(KeyHandle::new(1), n, &pt).unwrap());
    drop(hsm);

    // A fresh emulator starts locked: without the master key file it is
    // opened but stays locked.
    drop(emu);
    let fresh = emulator();
    let HsmConfig::Yhsm1(y) = config else { panic!("not yhsm1") };
    let locked = HsmConfig::Yhsm1(Yhsm1Config { device: Some(fresh.path().to_owned()), master_key_file: None, ..y.clone() });
    assert_eq!(locked.open().unwrap().status(), Status::Locked);
    let wrong = dir.path().join("wrong");
    std::fs::write(&wrong, "00").unwrap();
    let wrong = HsmConfig::Yhsm1(Yhsm1Config { device: Some(fresh.path().to_owned()), master_key_file: Some(wrong), ..y });
    assert!(matches!(wrong.open().unwrap_err(), hsm::Error::WrongPassword));
}
