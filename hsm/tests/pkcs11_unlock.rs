//! Encrypt-key unlock against a real SoftHSM2 token: the keystore password
//! sealed to an RSA key in the token, and the keystore unlocked through it.
//!
//! Like `tests/pkcs11.rs`, the tokens are a process-wide fixture in a
//! throwaway directory (`SOFTHSM2_CONF` is read once per process); each test
//! uses its own key labels.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use appliance_tests::softhsm2::TokenDir;
use clap::{CommandFactory, Parser};
use hsm::cli::{run, KeystoreCommand};
use hsm::pkcs11::unlock::{self, OaepHash, SealedPassword};
use hsm::pkcs11::{Pkcs11Config, Pkcs11Hsm, DEFAULT_MODULE};
use hsm::soft::format::KdfParams;
use hsm::soft::SoftHsm;
use hsm::{DataKey, Error, Flags, Password, SecurityModule, Status};
use otp::KeyHandle;

const LABEL: &str = "unlock-test";
/// A second token: the "wrong token".
const OTHER: &str = "unlock-other";
const PIN: &str = "1234";
const SO_PIN: &str = "4321";
const PIN_VAR: &str = "OTP_APPLIANCE_UNLOCK_TEST_PIN";
const WRONG_PIN_VAR: &str = "OTP_APPLIANCE_UNLOCK_TEST_WRONG_PIN";
/// A password with a recognisable byte pattern, to look for in files.
const PASSWORD: &str = "correct horse battery staple / unlock-test";

struct Fixture {
    tokens: TokenDir,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let tokens = TokenDir::new(Path::new(env!("CARGO_TARGET_TMPDIR")), Path::new(DEFAULT_MODULE));
        for label in [LABEL, OTHER] {
            let _slot = tokens.init_token(label, PIN, SO_PIN);
        }
        tokens.use_in_this_process();
        std::env::set_var(PIN_VAR, PIN);
        std::env::set_var(WRONG_PIN_VAR, "9999");
        std::fs::write(tokens.root().join("pin"), format!("{PIN}\n")).unwrap();
        Fixture { tokens }
    })
}

/// The token labelled `label`, PIN from the environment.
fn config_for(label: &str) -> Pkcs11Config {
    fixture();
    Pkcs11Config { pin_env: Some(PIN_VAR.to_owned()), ..Pkcs11Config::for_token(label) }
}

fn config() -> Pkcs11Config {
    config_for(LABEL)
}

fn token() -> Pkcs11Hsm {
    Pkcs11Hsm::open(config()).unwrap()
}

fn password() -> Password {
    Password::new(PASSWORD).unwrap()
}

/// A keystore with one key handle and a sealed value, in `dir`.
fn keystore(dir: &Path) -> (PathBuf, Vec<u8>) {
    let path = dir.join("keystore");
    let ks = SoftHsm::create(&path, &password(), KdfParams::INSECURE_FOR_TESTS).unwrap();
    ks.add_handle(KeyHandle::new(0x20), Flags::OTP_DECODE, 256).unwrap();
    let value = ks.encrypt_value(DataKey::Config, b"a config secret").unwrap();
    (path, value)
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// A keystore, an unlock key `key_label` in the main token and the
/// password sealed to it.
fn sealed_setup(key_label: &str) -> (tempfile::TempDir, PathBuf, PathBuf, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let (ks, value) = keystore(dir.path());
    token().generate_unlock_key(key_label, 2048).unwrap();
    let sealed = dir.path().join("sealed.bin");
    unlock::seal_password(&config(), key_label, &password(), &sealed).unwrap();
    (dir, ks, sealed, value)
}

/// `unlock_keystore` on a freshly opened keystore fails, with a message
/// containing `needle`, and leaves it locked.
fn refused(ks: &Path, sealed: &Path, config: &Pkcs11Config, needle: &str) -> Error {
    let soft = SoftHsm::open(ks).unwrap();
    let e = unlock::unlock_keystore(&soft, sealed, config).unwrap_err();
    assert!(e.to_string().contains(needle), "expected {needle:?} in: {e}");
    assert_eq!(soft.status(), Status::Locked, "after: {e}");
    assert!(matches!(soft.key_handles(), Err(Error::Locked)));
    e
}

#[test]
fn seal_then_unlock_opens_the_keystore() {
    let (_dir, ks, sealed, value) = sealed_setup("unlock-roundtrip");
    assert_eq!(mode(&sealed), 0o600);
    let bytes = std::fs::read(&sealed).unwrap();
    assert!(!contains(&bytes, PASSWORD.as_bytes()), "the sealed file holds the password in clear");
    assert!(!contains(&bytes, b"correct horse"), "the sealed file holds part of the password");
    let parsed = SealedPassword::from_bytes(&bytes).unwrap();
    assert_eq!(parsed.key_label, "unlock-roundtrip");
    assert_eq!(parsed.ciphertext.len(), 256, "RSA-2048 ciphertext");
    eprintln!("SoftHSM2 sealed with RSA-OAEP {}", parsed.hash);

    let soft = unlock::unlock_with_token(&ks, &sealed, &config()).unwrap();
    assert_eq!(soft.status(), Status::Ready);
    let handles = soft.key_handles().unwrap();
    assert_eq!(handles.len(), 1);
    assert_eq!(handles[0].key_handle, KeyHandle::new(0x20));
    assert_eq!(&soft.decrypt_value(DataKey::Config, &value).unwrap()[..], b"a config secret");

    // Sealing is randomised (OAEP): a second seal differs but opens alike.
    let again = ks.with_file_name("sealed-2.bin");
    unlock::seal_password(&config(), "unlock-roundtrip", &password(), &again).unwrap();
    assert_ne!(std::fs::read(&again).unwrap(), bytes);
    assert_eq!(unlock::unlock_with_token(&ks, &again, &config()).unwrap().status(), Status::Ready);
    // The output file is never overwritten.
    assert!(matches!(unlock::seal_password(&config(), "unlock-roundtrip", &password(), &again), Err(Error::AlreadyExists(_))));
}

#[test]
fn the_private_key_stays_in_the_token() {
    let t = token();
    t.generate_unlock_key("unlock-protection", 2048).unwrap();
    let p = t.unlock_key_protection("unlock-protection").unwrap();
    assert!(p.sensitive, "{p:?}");
    assert!(!p.extractable, "{p:?}");
    assert!(p.always_sensitive, "{p:?}");
    assert!(p.never_extractable, "{p:?}");
    assert!(p.local, "generated in the token: {p:?}");
    assert!(p.on_token, "{p:?}");
    assert!(!p.value_readable, "the private exponent was readable: {p:?}");
    assert!(t.unlock_key_exists("unlock-protection").unwrap());
    assert!(!t.unlock_key_exists("unlock-nothing-here").unwrap());
    // A second key with the same label, bad sizes and labels are refused.
    assert!(matches!(t.generate_unlock_key("unlock-protection", 2048), Err(Error::InvalidInput(_))));
    assert!(matches!(t.generate_unlock_key("unlock-small", 1024), Err(Error::InvalidInput(_))));
    assert!(matches!(t.generate_unlock_key("", 2048), Err(Error::InvalidInput(_))));
    // A password too long for OAEP under a 2048-bit key is refused clearly.
    let long = Password::new("x".repeat(300)).unwrap();
    let e = t.seal_password("unlock-protection", &long).unwrap_err();
    assert!(e.to_string().contains("too long"), "{e}");
}

#[test]
fn wrong_or_missing_token_key_or_pin_leave_the_keystore_locked() {
    let (dir, ks, sealed, _) = sealed_setup("unlock-failures");

    // Another token, without the key.
    refused(&ks, &sealed, &config_for(OTHER), "no RSA private key labelled \"unlock-failures\"");
    // Another token with a key of the same label: it cannot decrypt.
    Pkcs11Hsm::open(config_for(OTHER)).unwrap().generate_unlock_key("unlock-failures", 2048).unwrap();
    refused(&ks, &sealed, &config_for(OTHER), "could not decrypt the sealed password");
    // No such token.
    refused(&ks, &sealed, &config_for("unlock-absent"), "no token labelled \"unlock-absent\"");
    // A missing module.
    refused(&ks, &sealed, &Pkcs11Config { module: "/nonexistent/libpkcs11.so".into(), ..config() }, "does not exist");
    // A wrong PIN, and no PIN at all.
    refused(&ks, &sealed, &Pkcs11Config { pin_env: Some(WRONG_PIN_VAR.to_owned()), ..config() }, "refused the user PIN");
    refused(&ks, &sealed, &Pkcs11Config { pin_env: None, ..config() }, "needs the token's user PIN");
    // The PIN from a file works.
    let by_file = Pkcs11Config { pin_env: None, pin_file: Some(fixture().tokens.root().join("pin")), ..config() };
    assert_eq!(unlock::unlock_with_token(&ks, &sealed, &by_file).unwrap().status(), Status::Ready);

    // A sealed file naming a key the token does not hold.
    let good = SealedPassword::read(&sealed).unwrap();
    let write = |name: &str, bytes: &[u8]| {
        let p = dir.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    };
    let other_label = write("label.bin", &SealedPassword { key_label: "unlock-missing".to_owned(), ..good.clone() }.to_bytes());
    refused(&ks, &other_label, &config(), "no RSA private key labelled \"unlock-missing\"");

    // A tampered ciphertext, at its start, middle and end.
    for i in [0, 128, 255] {
        let mut ct = good.ciphertext.clone();
        ct[i] ^= 0x01;
        let p = write("tampered.bin", &SealedPassword { ciphertext: ct, ..good.clone() }.to_bytes());
        refused(&ks, &p, &config(), "could not decrypt the sealed password");
    }
    // A truncated ciphertext, and the other OAEP hash.
    let short = write("short.bin", &SealedPassword { ciphertext: good.ciphertext[..200].to_vec(), ..good.clone() }.to_bytes());
    refused(&ks, &short, &config(), "could not decrypt the sealed password");
    let flipped = if good.hash == OaepHash::Sha1 { OaepHash::Sha256 } else { OaepHash::Sha1 };
    let hash = write("hash.bin", &SealedPassword { hash: flipped, ..good.clone() }.to_bytes());
    refused(&ks, &hash, &config(), "could not decrypt the sealed password");
    // Not a sealed file at all; a missing file.
    let mut bytes = good.to_bytes();
    bytes[0] ^= 0xff;
    refused(&ks, &write("magic.bin", &bytes), &config(), "not a sealed keystore password");
    refused(&ks, &write("empty.bin", b""), &config(), "not a sealed keystore password");
    refused(&ks, &dir.path().join("absent.bin"), &config(), "absent.bin");

    // A password sealed correctly, but another keystore's.
    let other_pw = dir.path().join("other-pw.bin");
    unlock::seal_password(&config(), "unlock-failures", &Password::new("another password").unwrap(), &other_pw).unwrap();
    refused(&ks, &other_pw, &config(), "does not open the keystore");

    // And the good file still works after all that.
    assert_eq!(unlock::unlock_with_token(&ks, &sealed, &config()).unwrap().status(), Status::Ready);
}

// ---------------------------------------------------------------------------
// The CLI.

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: KeystoreCommand,
}

fn run_cli(args: &[&str]) -> Result<String, Error> {
    let mut argv = vec!["keystore"];
    argv.extend_from_slice(args);
    let cmd = Cli::try_parse_from(argv).unwrap().cmd;
    let mut out = Vec::new();
    run(&cmd, &mut out)?;
    Ok(String::from_utf8(out).unwrap())
}

#[test]
fn cli_seal_password_and_check_sealed() {
    Cli::command().debug_assert();
    let f = fixture();
    let dir = tempfile::tempdir().unwrap();
    let (ks, _) = keystore(dir.path());
    let pw = dir.path().join("pw");
    std::fs::write(&pw, format!("{PASSWORD}\n")).unwrap();
    let wrong_pw = dir.path().join("wrong-pw");
    std::fs::write(&wrong_pw, "not the password\n").unwrap();
    let sealed = dir.path().join("sealed.bin");
    let (ks_s, pw_s, sealed_s, pin_s) =
        (ks.to_str().unwrap(), pw.to_str().unwrap(), sealed.to_str().unwrap(), f.tokens.root().join("pin").to_str().unwrap().to_owned());
    let token = ["--token-label", LABEL, "--pin-file", &pin_s];
    let seal = |password_file: &str, extra: &[&str]| {
        let mut args =
            vec!["seal-password", "--keystore", ks_s, "--password-file", password_file, "--out", sealed_s, "--key-label", "unlock-cli"];
        args.extend_from_slice(&token);
        args.extend_from_slice(extra);
        run_cli(&args)
    };

    // No key yet, and no --generate-key: refused, nothing written.
    let e = seal(pw_s, &[]).unwrap_err();
    assert!(e.to_string().contains("--generate-key"), "{e}");
    assert!(!sealed.exists());
    // A wrong keystore password is never sealed.
    assert!(matches!(seal(wrong_pw.to_str().unwrap(), &["--generate-key", "--key-bits", "2048"]), Err(Error::WrongPassword)));
    assert!(!sealed.exists());

    let out = seal(pw_s, &["--generate-key", "--key-bits", "2048"]).unwrap();
    assert!(out.contains("generated RSA-2048 unlock key") && out.contains("sealed the keystore password"), "{out}");
    assert_eq!(mode(&sealed), 0o600);
    assert!(!contains(&std::fs::read(&sealed).unwrap(), PASSWORD.as_bytes()));
    assert!(matches!(seal(pw_s, &[]), Err(Error::AlreadyExists(_))));

    let mut check = vec!["check-sealed", "--keystore", ks_s, "--sealed-password", sealed_s];
    check.extend_from_slice(&token);
    let out = run_cli(&check).unwrap();
    assert!(out.contains("unlocked through the token") && out.contains("otp-decode"), "{out}");

    // Re-sealing with the existing key does not generate another.
    std::fs::remove_file(&sealed).unwrap();
    let out = seal(pw_s, &[]).unwrap();
    assert!(!out.contains("generated"), "{out}");

    // The service-side arguments.
    let args = hsm::cli::SealedKeystoreArgs {
        keystore: ks.clone(),
        sealed_password: sealed.clone(),
        token: hsm::cli::TokenArgs {
            module: DEFAULT_MODULE.into(),
            token_label: Some(LABEL.to_owned()),
            slot: None,
            pin_file: None,
            pin_env: Some(PIN_VAR.to_owned()),
        },
    };
    assert_eq!(args.open().unwrap().status(), Status::Ready);
}
