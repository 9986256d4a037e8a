//! The software keystore: file format, damage, permissions, persistence,
//! pyhsm import, the `keystore` CLI, and that secrets stay out of `Debug`
//! output and logs.
//!
//! Trait behaviour (flags, AEADs, values) is in `backends.rs`; this file is
//! what only the soft backend has.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use clap::Parser;
use hsm::cli::{read_pyhsm_json, run, KeystoreCommand};
use hsm::soft::format::KdfParams;
use hsm::soft::SoftHsm;
use hsm::{DataKey, Error, Flags, NonceSource, Password, SecurityModule, Status};
use otp::token::TokenFields;
use otp::{AeadNonce, HandleKey, KeyHandle, YubiKeySecrets};

const PASSWORD: &str = "Tr0ub4dor&3 keystore password";
const KDF: KdfParams = KdfParams::INSECURE_FOR_TESTS;
const HEADER_LEN: usize = 50;
const TAG_LEN: usize = 16;

fn password() -> Password {
    Password::new(PASSWORD).unwrap()
}

/// Known handle keys, as a pyhsm migration would bring them.
const KNOWN: &[(u32, &str)] = &[
    (1, "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f"),
    (0x2000, "c0ffee00c0ffee01c0ffee02c0ffee03"),
    (0x314d_534b, "5ec7e75ec7e75ec7e75ec7e75ec7e75ec7e75ec7e75ec7e7"),
];

fn known_handles(flags: Flags) -> Vec<(KeyHandle, Flags, HandleKey)> {
    KNOWN.iter().map(|(kh, key)| (KeyHandle::new(*kh), flags, HandleKey::new(&hex::decode(key).unwrap()).unwrap())).collect()
}

/// A temporary directory with a keystore holding the [`KNOWN`] handles and
/// one generated handle (0x20, personalizer).
fn keystore() -> (tempfile::TempDir, PathBuf, SoftHsm) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keystore");
    let hsm = SoftHsm::create(&path, &password(), KDF).unwrap();
    hsm.import_handles(&known_handles(Flags::PERSONALIZER | Flags::OTP_DECODE)).unwrap();
    hsm.add_handle(KeyHandle::new(0x20), Flags::PERSONALIZER, 256).unwrap();
    (dir, path, hsm)
}

fn dir_entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    names
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode()
}

// ---------------------------------------------------------------------------
// An independent reader of the documented file format (hsm/src/soft/format.rs
// module docs), so the tests do not trust the code they test.

struct Decrypted {
    kdf: KdfParams,
    file_key: [u8; 32],
    data_keys: [[u8; 32]; 3],
    handles: Vec<(KeyHandle, Flags, Vec<u8>)>,
}

impl Decrypted {
    /// Every secret in the file, as bytes.
    fn secrets(&self) -> Vec<Vec<u8>> {
        let mut out = vec![self.file_key.to_vec()];
        out.extend(self.data_keys.iter().map(|k| k.to_vec()));
        out.extend(self.handles.iter().map(|(_, _, k)| k.clone()));
        out
    }
}

fn decrypt_keystore(file: &[u8], password: &str) -> Decrypted {
    use aes_gcm::aead::{Aead as _, KeyInit, Payload};
    use argon2::{Algorithm, Argon2, Params, Version};

    let (head, body) = file.split_at(HEADER_LEN);
    assert_eq!(&head[..8], b"OTPKEYST", "magic");
    assert_eq!(head[8], 1, "file version");
    assert_eq!(head[9], 1, "kdf = argon2id");
    let u32_at = |i: usize| u32::from_le_bytes(head[i..i + 4].try_into().unwrap());
    let kdf = KdfParams { memory_kib: u32_at(10), iterations: u32_at(14), parallelism: u32_at(18) };
    let salt = &head[22..38];
    let nonce = &head[38..50];
    let mut file_key = [0u8; 32];
    Argon2::new(Algorithm::Argon2id, Version::V0x13, Params::new(kdf.memory_kib, kdf.iterations, kdf.parallelism, Some(32)).unwrap())
        .hash_password_into(password.as_bytes(), salt, &mut file_key)
        .unwrap();
    let plain = aes_gcm::Aes256Gcm::new((&file_key).into())
        .decrypt(aes_gcm::Nonce::from_slice(nonce), Payload { msg: body, aad: head })
        .expect("the documented format decrypts");
    assert_eq!(plain[0], 1, "contents version");
    let mut data_keys = [[0u8; 32]; 3];
    for (i, k) in data_keys.iter_mut().enumerate() {
        k.copy_from_slice(&plain[1 + 32 * i..1 + 32 * (i + 1)]);
    }
    let mut at = 1 + 96;
    let rd = |at: &mut usize| {
        let v = u32::from_le_bytes(plain[*at..*at + 4].try_into().unwrap());
        *at += 4;
        v
    };
    let count = rd(&mut at);
    let mut handles = Vec::new();
    for _ in 0..count {
        let kh = KeyHandle::new(rd(&mut at));
        let flags = Flags::from_bits(rd(&mut at));
        let len = usize::from(plain[at]);
        at += 1;
        handles.push((kh, flags, plain[at..at + len].to_vec()));
        at += len;
    }
    assert_eq!(at, plain.len(), "no trailing bytes");
    Decrypted { kdf, file_key, data_keys, handles }
}

/// Does `text` show `secret` in any usual spelling: hex (any case, any
/// separators), decimal bytes as `Debug` prints them (`[1, 2, …]`, on one
/// line or many), or as text?
fn leaks(text: &str, secret: &[u8]) -> bool {
    let hexish: String = text.chars().filter(char::is_ascii_hexdigit).map(|c| c.to_ascii_lowercase()).collect();
    let numbers: Vec<u64> = text.split(|c: char| !c.is_ascii_digit()).filter(|s| !s.is_empty()).filter_map(|s| s.parse().ok()).collect();
    hexish.contains(&hex::encode(secret))
        || numbers.windows(secret.len()).any(|w| w.iter().zip(secret).all(|(n, b)| *n == u64::from(*b)))
        || (secret.len() >= 8 && std::str::from_utf8(secret).is_ok_and(|s| text.contains(s)))
}

fn assert_no_secret(text: &str, secrets: &[Vec<u8>], what: &str) {
    for s in secrets {
        assert!(!leaks(text, s), "{what} contains the secret {}:\n{text}", hex::encode(s));
    }
    assert!(!text.contains(PASSWORD), "{what} contains the password");
}

#[test]
fn leak_detector_detects() {
    let key = [0xc3u8, 0x57, 0x98, 0x73, 0x1c, 0x6f, 0x67, 0x70, 0x35, 0xef, 0x7e, 0x40, 0x92, 0x75, 0x36, 0xcb];
    let wrapped = [&[1u8, 2][..], &key, &[3]].concat();
    for shown in [
        format!("key={}", hex::encode(key)),
        format!("KEY {}", hex::encode_upper(key)),
        format!("{:?}", &key[..]),
        format!("{wrapped:?}"),
        format!("{wrapped:#?}"),
        key.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":"),
    ] {
        assert!(leaks(&shown, &key), "{shown}");
    }
    assert!(leaks("value: totp seed 1234, end", b"totp seed 1234"));
    assert!(!leaks(&format!("{:?} {}", &key[1..], hex::encode(&key[..15])), &key));
}

// ---------------------------------------------------------------------------
// Format.

#[test]
fn file_matches_documented_format() {
    let (_dir, path, hsm) = keystore();
    let file = std::fs::read(&path).unwrap();
    let d = decrypt_keystore(&file, PASSWORD);
    assert_eq!(d.kdf, KDF);
    let expect_len = HEADER_LEN + 1 + 96 + 4 + [32usize, 16, 24, 32].iter().map(|k| 9 + k).sum::<usize>() + TAG_LEN;
    assert_eq!(file.len(), expect_len);
    // Handles in id order, with their flags and the imported keys.
    let ids: Vec<u32> = d.handles.iter().map(|(kh, _, _)| kh.get()).collect();
    assert_eq!(ids, [1, 0x20, 0x2000, 0x314d_534b]);
    for (kh, key) in KNOWN {
        let (_, flags, k) = d.handles.iter().find(|(h, _, _)| h.get() == *kh).unwrap();
        assert_eq!(*flags, Flags::PERSONALIZER | Flags::OTP_DECODE);
        assert_eq!(hex::encode(k), *key);
    }
    let (_, flags, generated) = &d.handles[1];
    assert_eq!(*flags, Flags::PERSONALIZER);
    assert_eq!(generated.len(), 32);
    assert_ne!(generated[..], [0; 32]);
    // Three distinct, random data keys.
    assert_ne!(d.data_keys[0], d.data_keys[1]);
    assert_ne!(d.data_keys[1], d.data_keys[2]);
    assert_ne!(d.data_keys[0], [0; 32]);
    // The key listing agrees with the file.
    let listed: Vec<(u32, u32, usize)> =
        hsm.key_handles().unwrap().iter().map(|h| (h.key_handle.get(), h.flags.bits(), h.key_bits)).collect();
    let filed: Vec<(u32, u32, usize)> = d.handles.iter().map(|(kh, f, k)| (kh.get(), f.bits(), k.len() * 8)).collect();
    assert_eq!(listed, filed);
    // Every rewrite draws a fresh GCM nonce (same key, same salt).
    hsm.add_handle(KeyHandle::new(0x21), Flags::OTP_DECODE, 128).unwrap();
    let again = std::fs::read(&path).unwrap();
    assert_eq!(again[..38], file[..38], "header up to the salt unchanged");
    assert_ne!(again[38..50], file[38..50], "GCM nonce renewed");
    assert_eq!(decrypt_keystore(&again, PASSWORD).file_key, d.file_key);
}

#[test]
fn generated_handle_key_is_the_one_used() {
    // The generated key in the file really is the key the module wraps with:
    // an AEAD from the module opens in software under the filed key.
    let (_dir, path, hsm) = keystore();
    let kh = KeyHandle::new(0x20);
    let rec = hsm.generate_yubikey_aeads(&[kh], NonceSource::Random).unwrap().remove(0);
    let d = decrypt_keystore(&std::fs::read(&path).unwrap(), PASSWORD);
    let key = HandleKey::new(&d.handles.iter().find(|(h, _, _)| *h == kh).unwrap().2).unwrap();
    assert_eq!(*key.open(kh, &rec.nonce, &rec.aead).unwrap(), *hsm.decrypt_aead(&rec).unwrap());
}

// ---------------------------------------------------------------------------
// Passwords and damage.

#[test]
fn wrong_password_leaves_it_locked() {
    let (_dir, path, _hsm) = keystore();
    let before = std::fs::read(&path).unwrap();
    let hsm = SoftHsm::open(&path).unwrap();
    assert_eq!(hsm.status(), Status::Locked);
    for wrong in ["", " ", "tr0ub4dor&3 keystore password", &format!("{PASSWORD}\n"), &PASSWORD[..PASSWORD.len() - 1]] {
        let Ok(pw) = Password::new(wrong) else {
            assert!(wrong.is_empty(), "only the empty password is refused outright");
            continue;
        };
        let e = hsm.unlock(&pw).unwrap_err();
        assert!(matches!(e, Error::WrongPassword), "{wrong:?}: {e:?}");
        assert!(e.is_backend_failure());
        assert_eq!(hsm.status(), Status::Locked);
        assert!(matches!(hsm.key_handles(), Err(Error::Locked)));
    }
    assert!(matches!(SoftHsm::open_unlocked(&path, &Password::new("nope").unwrap()), Err(Error::WrongPassword)));
    hsm.unlock(&password()).unwrap();
    assert_eq!(hsm.status(), Status::Ready);
    assert_eq!(hsm.key_handles().unwrap().len(), 4);
    assert_eq!(std::fs::read(&path).unwrap(), before, "unlocking never writes");
    // lock() drops the keys again.
    hsm.lock().unwrap();
    assert_eq!(hsm.status(), Status::Locked);
    assert!(matches!(hsm.encrypt_value(DataKey::Token, b"x"), Err(Error::Locked)));
    assert!(matches!(hsm.add_handle(KeyHandle::new(9), Flags::OTP_DECODE, 128), Err(Error::Locked)));
    assert!(matches!(hsm.import_handles(&known_handles(Flags::OTP_DECODE)[..1]), Err(Error::Locked)));
    assert_eq!(std::fs::read(&path).unwrap(), before, "a locked module does not write");
    hsm.unlock(&password()).unwrap();
    assert_eq!(hsm.status(), Status::Ready);
}

#[test]
fn lock_never_fails_open() {
    // Locking must drop the keys even when the file is gone or replaced.
    let (dir, path, hsm) = keystore();
    let before = std::fs::read(&path).unwrap();
    let moved = dir.path().join("moved");
    std::fs::rename(&path, &moved).unwrap();
    let _ = hsm.lock();
    assert_eq!(hsm.status(), Status::Locked, "keys dropped although the file is missing");
    assert!(matches!(hsm.encrypt_value(DataKey::Token, b"x"), Err(Error::Locked)));
    assert!(matches!(hsm.key_handles(), Err(Error::Locked)));
    // It unlocks again from what it held, and the file it finds is still its own.
    hsm.unlock(&password()).unwrap();
    assert_eq!(hsm.key_handles().unwrap().len(), 4);
    std::fs::write(&path, b"garbage").unwrap();
    let _ = hsm.lock();
    assert_eq!(hsm.status(), Status::Locked, "keys dropped although the file is garbage");
    std::fs::rename(&moved, &path).unwrap();
    hsm.unlock(&password()).unwrap();
    hsm.lock().unwrap();
    hsm.lock().unwrap();
    assert_eq!(hsm.status(), Status::Locked);
    assert_eq!(std::fs::read(&path).unwrap(), before, "locking never writes");
}

/// Open and unlock a file's bytes; return the error (there must be one).
fn open_bytes(dir: &Path, bytes: &[u8]) -> Error {
    let path = dir.join("damaged");
    std::fs::write(&path, bytes).unwrap();
    let e = match SoftHsm::open(&path) {
        Err(e) => e,
        Ok(hsm) => {
            assert_eq!(hsm.status(), Status::Locked);
            let e = hsm.unlock(&password()).expect_err("a damaged keystore must not unlock");
            assert_eq!(hsm.status(), Status::Locked);
            e
        }
    };
    assert_eq!(std::fs::read(&path).unwrap(), bytes, "a failed open never writes");
    e
}

fn is_corrupt(e: &Error) -> bool {
    matches!(e, Error::KeystoreCorrupt { .. })
}

#[test]
fn every_flipped_byte_is_refused() {
    let (dir, path, _hsm) = keystore();
    let file = std::fs::read(&path).unwrap();
    let tag_start = file.len() - TAG_LEN;
    for i in 0..file.len() {
        // Flips in the memory size can ask for up to 64 MiB: a second or two
        // in a debug build, the slowest part of this file.
        for mask in [0x01u8, 0x80] {
            let mut bad = file.clone();
            bad[i] ^= mask;
            let e = open_bytes(dir.path(), &bad);
            let region = match i {
                0..=9 => "magic/version/kdf id",
                10..=21 => "kdf parameters",
                22..=37 => "salt",
                38..=49 => "nonce",
                _ if i < tag_start => "ciphertext",
                _ => "tag",
            };
            assert!(e.is_backend_failure(), "byte {i} ({region}): {e:?}");
            match region {
                "magic/version/kdf id" => assert!(is_corrupt(&e), "byte {i} ({region}): {e:?}"),
                "kdf parameters" => assert!(is_corrupt(&e) || matches!(e, Error::WrongPassword), "byte {i} ({region}): {e:?}"),
                _ => assert!(matches!(e, Error::WrongPassword), "byte {i} ({region}): {e:?}"),
            }
        }
    }
}

#[test]
fn truncated_and_extended_files_are_refused() {
    let (dir, path, _hsm) = keystore();
    let file = std::fs::read(&path).unwrap();
    for len in 0..file.len() {
        let e = open_bytes(dir.path(), &file[..len]);
        if len < HEADER_LEN + TAG_LEN {
            assert!(is_corrupt(&e), "{len} bytes: {e:?}");
            assert!(e.to_string().contains("truncated"), "{len} bytes: {e}");
        } else {
            assert!(matches!(e, Error::WrongPassword), "{len} bytes: {e:?}");
        }
    }
    let mut longer = file.clone();
    longer.push(0);
    assert!(matches!(open_bytes(dir.path(), &longer), Error::WrongPassword));
    let mut doubled = file.clone();
    doubled.extend_from_slice(&file);
    assert!(matches!(open_bytes(dir.path(), &doubled), Error::WrongPassword));
}

#[test]
fn not_a_keystore() {
    let (dir, path, _hsm) = keystore();
    let file = std::fs::read(&path).unwrap();
    let mut bad_magic = file.clone();
    bad_magic[..8].copy_from_slice(b"OTPKEYSX");
    let samples: Vec<(&str, Vec<u8>, &str)> = vec![
        ("bad magic", bad_magic, "bad magic"),
        ("text", b"this is not a keystore, just some text that is long enough to have a header".to_vec(), "bad magic"),
        ("json", br#"{"1": "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f"}"#.to_vec(), "bad magic"),
        ("short junk", b"hello".to_vec(), "bad magic"),
        ("zeros", vec![0; 300], "bad magic"),
        ("version 2", [&file[..8], &[2], &file[9..]].concat(), "version"),
        ("kdf 2", [&file[..9], &[2], &file[10..]].concat(), "key derivation"),
    ];
    for (what, bytes, reason) in samples {
        let e = open_bytes(dir.path(), &bytes);
        assert!(is_corrupt(&e), "{what}: {e:?}");
        let text = e.to_string();
        assert!(text.contains(reason) && text.contains("corrupt"), "{what}: {text}");
    }
    let e = SoftHsm::open(&dir.path().join("missing")).unwrap_err();
    assert!(matches!(e, Error::Io { .. }) && e.is_backend_failure(), "{e:?}");
    let e = SoftHsm::open(dir.path()).unwrap_err();
    assert!(matches!(e, Error::Io { .. }), "a directory: {e:?}");
}

#[test]
fn absurd_kdf_parameters_are_refused_quickly() {
    let (dir, path, _hsm) = keystore();
    let file = std::fs::read(&path).unwrap();
    let with = |offset: usize, value: u32| {
        let mut b = file.clone();
        b[offset..offset + 4].copy_from_slice(&value.to_le_bytes());
        b
    };
    let started = std::time::Instant::now();
    for (what, bytes) in [
        ("memory u32::MAX", with(10, u32::MAX)),
        ("memory 4 GiB + 1 KiB", with(10, 4 * 1024 * 1024 + 1)),
        ("memory 0", with(10, 0)),
        ("iterations u32::MAX", with(14, u32::MAX)),
        ("iterations 65", with(14, 65)),
        ("iterations 0", with(14, 0)),
        ("parallelism u32::MAX", with(18, u32::MAX)),
        ("parallelism 17", with(18, 17)),
        ("parallelism 0", with(18, 0)),
        ("memory below 8 x lanes", with(18, 16)),
    ] {
        let e = open_bytes(dir.path(), &bytes);
        assert!(is_corrupt(&e), "{what}: {e:?}");
    }
    assert!(started.elapsed() < std::time::Duration::from_secs(5), "refused before deriving");
    // Reasonable but different parameters: the header is authenticated.
    for (what, bytes) in [("memory 128", with(10, 128)), ("iterations 2", with(14, 2)), ("parallelism 2", with(18, 2))] {
        assert!(matches!(open_bytes(dir.path(), &bytes), Error::WrongPassword), "{what}");
    }
    // create() validates too, and leaves no file behind.
    for bad in [KdfParams { memory_kib: 0, ..KDF }, KdfParams { iterations: 0, ..KDF }, KdfParams { memory_kib: u32::MAX, ..KDF }] {
        let p = dir.path().join("new");
        let e = SoftHsm::create(&p, &password(), bad).unwrap_err();
        assert!(matches!(e, Error::InvalidInput(_)), "{bad:?}: {e:?}");
        assert!(!p.exists());
    }
}

// ---------------------------------------------------------------------------
// Files: mode, atomicity, persistence.

#[test]
fn created_0600_and_kept_0600() {
    let (dir, path, hsm) = keystore();
    let m = mode(&path);
    assert_eq!(m & 0o170_000, 0o100_000, "a regular file");
    assert_eq!(m & 0o7777, 0o600);
    hsm.add_handle(KeyHandle::new(0x30), Flags::OTP_DECODE, 192).unwrap();
    assert_eq!(mode(&path) & 0o7777, 0o600, "after add_handle");
    // Even a keystore someone loosened is written back 0600.
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let reopened = SoftHsm::open_unlocked(&path, &password()).unwrap();
    reopened.import_handles(&[(KeyHandle::new(0x31), Flags::OTP_DECODE, HandleKey::new(&[1; 16]).unwrap())]).unwrap();
    assert_eq!(mode(&path) & 0o7777, 0o600, "after import_handles");
    assert_eq!(dir_entries(dir.path()), ["keystore"]);
}

#[test]
fn create_refuses_existing_path() {
    let dir = tempfile::tempdir().unwrap();
    let precious = dir.path().join("precious");
    std::fs::write(&precious, b"do not overwrite me").unwrap();
    std::fs::set_permissions(&precious, std::fs::Permissions::from_mode(0o640)).unwrap();
    let e = SoftHsm::create(&precious, &password(), KDF).unwrap_err();
    assert!(matches!(&e, Error::AlreadyExists(p) if *p == precious), "{e:?}");
    assert_eq!(std::fs::read(&precious).unwrap(), b"do not overwrite me");
    assert_eq!(mode(&precious) & 0o7777, 0o640);
    assert_eq!(dir_entries(dir.path()), ["precious"]);

    // Nor an existing keystore, which keeps its password and handles.
    let path = dir.path().join("keystore");
    let first = SoftHsm::create(&path, &password(), KDF).unwrap();
    first.add_handle(KeyHandle::new(7), Flags::OTP_DECODE, 128).unwrap();
    let before = std::fs::read(&path).unwrap();
    let e = SoftHsm::create(&path, &Password::new("another").unwrap(), KDF).unwrap_err();
    assert!(matches!(e, Error::AlreadyExists(_)), "{e:?}");
    assert_eq!(std::fs::read(&path).unwrap(), before);
    assert_eq!(SoftHsm::open_unlocked(&path, &password()).unwrap().key_handles().unwrap().len(), 1);
    assert_eq!(dir_entries(dir.path()), ["keystore", "precious"]);

    // A missing directory is an I/O error, not a panic.
    let e = SoftHsm::create(&dir.path().join("no/such/dir/ks"), &password(), KDF).unwrap_err();
    assert!(matches!(e, Error::Io { .. }), "{e:?}");
    assert_eq!(dir_entries(dir.path()), ["keystore", "precious"]);
}

#[test]
fn no_temporary_files_left() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ks");
    let hsm = SoftHsm::create(&path, &password(), KDF).unwrap();
    assert_eq!(dir_entries(dir.path()), ["ks"]);
    for (i, bits) in [128, 192, 256].into_iter().enumerate() {
        hsm.add_handle(KeyHandle::new(i as u32 + 0x100), Flags::PERSONALIZER, bits).unwrap();
        assert_eq!(dir_entries(dir.path()), ["ks"]);
    }
    hsm.import_handles(&known_handles(Flags::OTP_DECODE)).unwrap();
    assert!(hsm.add_handle(KeyHandle::new(1), Flags::OTP_DECODE, 128).is_err());
    assert!(hsm.import_handles(&known_handles(Flags::OTP_DECODE)).is_err());
    assert_eq!(dir_entries(dir.path()), ["ks"]);
}

#[test]
fn handles_persist_across_reopen() {
    let (_dir, path, hsm) = keystore();
    let kh = KeyHandle::new(0x20); // its key was generated inside the module
    let rec = hsm.generate_yubikey_aeads(&[kh, KeyHandle::new(1)], NonceSource::Given(AeadNonce::new([1, 2, 3, 4, 5, 6]))).unwrap();
    let secret = hsm.decrypt_aead(&rec[0]).unwrap();
    let values: Vec<Vec<u8>> = DataKey::ALL.iter().map(|k| hsm.encrypt_value(*k, k.name().as_bytes()).unwrap()).collect();
    let listed = hsm.key_handles().unwrap();
    drop(hsm);

    let again = SoftHsm::open_unlocked(&path, &password()).unwrap();
    assert_eq!(again.key_handles().unwrap(), listed);
    assert_eq!(*again.decrypt_aead(&rec[0]).unwrap(), *secret, "the generated handle key persisted");
    assert_eq!(*again.decrypt_aead(&rec[1]).unwrap(), *secret);
    for (k, v) in DataKey::ALL.iter().zip(&values) {
        assert_eq!(*again.decrypt_value(*k, v).unwrap(), *k.name().as_bytes(), "data keys persisted");
    }
    // And a handle added after reopening persists too.
    again.add_handle(KeyHandle::new(0x40), Flags::IMPORT, 128).unwrap();
    drop(again);
    let third = SoftHsm::open_unlocked(&path, &password()).unwrap();
    let info = third.key_handles().unwrap().into_iter().find(|h| h.key_handle == KeyHandle::new(0x40)).unwrap();
    assert_eq!((info.flags, info.key_bits), (Flags::IMPORT, 128));
}

#[test]
fn duplicate_handles_refused_file_unchanged() {
    let (_dir, path, hsm) = keystore();
    let before = std::fs::read(&path).unwrap();
    let listed = hsm.key_handles().unwrap();
    let dup = |e: Error, kh: u32| assert!(matches!(e, Error::DuplicateKeyHandle(k) if k == KeyHandle::new(kh)), "{e:?}");

    dup(hsm.add_handle(KeyHandle::new(0x20), Flags::OTP_DECODE, 256).unwrap_err(), 0x20);
    dup(hsm.add_handle(KeyHandle::new(1), Flags::OTP_DECODE, 128).unwrap_err(), 1);
    // All or nothing: the new handle 0x50 is not added either.
    let batch =
        vec![(KeyHandle::new(0x50), Flags::OTP_DECODE, HandleKey::new(&[5; 16]).unwrap()), known_handles(Flags::OTP_DECODE).remove(1)];
    dup(hsm.import_handles(&batch).unwrap_err(), 0x2000);
    // A batch that repeats itself.
    let twice = vec![(KeyHandle::new(0x51), Flags::OTP_DECODE, HandleKey::new(&[5; 16]).unwrap()); 2];
    dup(hsm.import_handles(&twice).unwrap_err(), 0x51);

    assert_eq!(std::fs::read(&path).unwrap(), before, "the file is untouched");
    assert_eq!(hsm.key_handles().unwrap(), listed, "memory is untouched");
    assert_eq!(SoftHsm::open_unlocked(&path, &password()).unwrap().key_handles().unwrap(), listed);
    // The old key of handle 1 is still the one in use.
    let d = decrypt_keystore(&std::fs::read(&path).unwrap(), PASSWORD);
    assert_eq!(hex::encode(&d.handles[0].2), KNOWN[0].1);

    for bits in [0usize, 64, 100, 512] {
        let e = hsm.add_handle(KeyHandle::new(0x60), Flags::OTP_DECODE, bits).unwrap_err();
        assert!(matches!(e, Error::InvalidInput(_)), "{bits}: {e:?}");
    }
    assert_eq!(std::fs::read(&path).unwrap(), before);
}

#[test]
fn concurrent_additions_are_not_lost() {
    let (_dir, path, hsm) = keystore();
    let hsm = Arc::new(hsm);
    let threads: Vec<_> = (0..8u32)
        .map(|t| {
            let hsm = Arc::clone(&hsm);
            std::thread::spawn(move || {
                for i in 0..4 {
                    hsm.add_handle(KeyHandle::new(0x1000 + t * 16 + i), Flags::OTP_DECODE, 128).unwrap();
                    hsm.generate_yubikey_aeads(&[KeyHandle::new(0x20)], NonceSource::Random).unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(hsm.key_handles().unwrap().len(), 4 + 32);
    assert_eq!(SoftHsm::open_unlocked(&path, &password()).unwrap().key_handles().unwrap().len(), 4 + 32);
}

// ---------------------------------------------------------------------------
// pyhsm JSON.

fn json_file(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn pyhsm_json_import() {
    let dir = tempfile::tempdir().unwrap();
    let good = format!(r#"{{"1": "{}", "0x2000": "{}", "KSM1": " {} "}}"#, KNOWN[0].1, KNOWN[1].1.to_uppercase(), KNOWN[2].1);
    let keys = read_pyhsm_json(&json_file(dir.path(), "good.json", &good)).unwrap();
    let mut got: Vec<(u32, String)> = keys.iter().map(|(kh, k)| (kh.get(), hex::encode(k.expose()))).collect();
    got.sort();
    let mut want: Vec<(u32, String)> = KNOWN.iter().map(|(kh, k)| (*kh, (*k).to_owned())).collect();
    want.sort();
    assert_eq!(got, want);

    let secret = KNOWN[0].1;
    let bad: Vec<(&str, String)> = vec![
        ("bad hex", format!(r#"{{"1": "{}zz"}}"#, &secret[..62])),
        ("odd hex", format!(r#"{{"1": "{}"}}"#, &secret[..63])),
        ("key length 20", format!(r#"{{"1": "{}"}}"#, &secret[..40])),
        ("key length 0", r#"{"1": ""}"#.to_owned()),
        ("bad key handle", format!(r#"{{"abcde": "{secret}"}}"#)),
        ("negative key handle", format!(r#"{{"-1": "{secret}"}}"#)),
        ("key handle too big", format!(r#"{{"4294967296": "{secret}"}}"#)),
        ("one good one bad", format!(r#"{{"1": "{secret}", "2": "nothex"}}"#)),
        ("empty object", "{}".to_owned()),
        ("not json", "this is not json".to_owned()),
        ("array", format!(r#"["{secret}"]"#)),
        ("number value", r#"{"1": 5}"#.to_owned()),
        ("empty file", String::new()),
    ];
    for (what, text) in bad {
        let e = read_pyhsm_json(&json_file(dir.path(), "bad.json", &text)).expect_err(what);
        assert!(matches!(e, Error::InvalidInput(_)), "{what}: {e:?}");
        let msg = e.to_string();
        assert!(msg.contains("bad.json"), "{what}: the message names the file: {msg}");
        assert!(!msg.contains(&secret[..32]), "{what}: the message shows key material: {msg}");
    }
    let e = read_pyhsm_json(&dir.path().join("missing.json")).unwrap_err();
    assert!(matches!(e, Error::Io { .. }), "{e:?}");
}

// ---------------------------------------------------------------------------
// Secrets stay out of Debug output and logs.

#[test]
fn debug_output_is_redacted() {
    let (_dir, path, hsm) = keystore();
    let d = decrypt_keystore(&std::fs::read(&path).unwrap(), PASSWORD);
    let secrets = d.secrets();
    let rec = hsm.generate_yubikey_aeads(&[KeyHandle::new(1)], NonceSource::Random).unwrap().remove(0);
    let plain = hsm.decrypt_aead(&rec).unwrap();
    let yk = YubiKeySecrets::from_plaintext(&plain).unwrap();
    let mut all = secrets.clone();
    all.push(plain.to_vec());
    all.push(yk.key.expose().to_vec());
    all.push(yk.uid.expose().to_vec());

    let ready = format!("{hsm:?} {hsm:#?}");
    assert!(ready.contains("Ready") || ready.contains("ready"), "{ready}");
    assert_no_secret(&ready, &all, "Debug of an unlocked SoftHsm");
    let locked = SoftHsm::open(&path).unwrap();
    assert_no_secret(&format!("{locked:?} {locked:#?}"), &all, "Debug of a locked SoftHsm");

    let hk = HandleKey::new(&hex::decode(KNOWN[0].1).unwrap()).unwrap();
    assert_no_secret(&format!("{hk:?} {hk:#?}"), &all, "Debug of HandleKey");
    let pw = password();
    let shown = format!("{pw:?} {pw:#?}");
    assert!(shown.contains("REDACTED"), "{shown}");
    assert_no_secret(&shown, &all, "Debug of Password");
    let shown = format!("{yk:?} {yk:#?}");
    assert!(shown.contains("REDACTED"), "{shown}");
    assert_no_secret(&shown, &all, "Debug of YubiKeySecrets");
    // Errors and handle listings carry no keys either.
    let e = hsm.unlock(&Password::new("wrong").unwrap()).unwrap_err();
    assert_no_secret(&format!("{e:?} {e}"), &all, "an error");
    assert_no_secret(&format!("{:?}", hsm.key_handles().unwrap()), &all, "the handle list");
}

/// A `MakeWriter` collecting formatted log lines.
#[derive(Clone, Default)]
struct LogBuffer(Arc<Mutex<Vec<u8>>>);

impl Write for LogBuffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogBuffer {
    type Writer = Self;
    fn make_writer(&'a self) -> Self {
        self.clone()
    }
}

#[test]
fn logs_never_contain_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keystore");
    let cli_path = dir.path().join("cli-keystore");
    let pw_file = json_file(dir.path(), "pw", &format!("{PASSWORD}\n"));
    let pyhsm = json_file(dir.path(), "keys.json", r#"{"0x70": "7070707070707070a1a2a3a4a5a6a7a8"}"#);
    let log = LogBuffer::default();
    let subscriber = tracing_subscriber::fmt().with_writer(log.clone()).with_max_level(tracing::Level::TRACE).with_ansi(false).finish();

    let mut exported = Vec::new();
    tracing::subscriber::with_default(subscriber, || {
        // Other tests of this binary hit the same callsites on threads with
        // no subscriber; a callsite whose interest was cached as "never"
        // there would skip this subscriber. Recompute it with this one in
        // place, and again before the warning that only a loosened file
        // gives (another test opens such a file too).
        tracing::callsite::rebuild_interest_cache();
        let hsm = SoftHsm::create(&path, &password(), KDF).unwrap();
        hsm.import_handles(&known_handles(Flags::PERSONALIZER | Flags::OTP_DECODE)).unwrap();
        hsm.add_handle(KeyHandle::new(0x20), Flags::PERSONALIZER | Flags::OTP_DECODE, 256).unwrap();
        let _ = hsm.add_handle(KeyHandle::new(0x20), Flags::OTP_DECODE, 256);
        drop(hsm);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        tracing::callsite::rebuild_interest_cache();
        let hsm = SoftHsm::open(&path).unwrap();
        let _ = hsm.unlock(&Password::new("wrong").unwrap());
        hsm.unlock(&password()).unwrap();
        let recs = hsm.generate_yubikey_aeads(&[KeyHandle::new(0x20), KeyHandle::new(1)], NonceSource::Random).unwrap();
        let plain = hsm.decrypt_aead(&recs[0]).unwrap();
        let yk = YubiKeySecrets::from_plaintext(&plain).unwrap();
        let tok = TokenFields { uid: *yk.uid.expose(), counter: 3, session_use: 1, ..Default::default() }.build().encrypt(&yk.key);
        hsm.decode_otp(&recs[1], &tok).unwrap();
        let imported = hsm.import_aead(KeyHandle::new(0x2000), NonceSource::Random, &[0x5c; 22]).unwrap();
        let _ = hsm.decrypt_aead(&imported);
        let v = hsm.encrypt_value(DataKey::Token, b"totp seed 12345678901234567890").unwrap();
        hsm.decrypt_value(DataKey::Token, &v).unwrap();
        hsm.lock().unwrap();
        exported.extend_from_slice(&plain);
        exported.extend_from_slice(b"totp seed 12345678901234567890");

        for args in [
            vec!["init", "--kdf-memory-mib", "1", "--kdf-iterations", "1"],
            vec!["add-handle", "--key-handle", "0x20", "--flags", "personalizer"],
            vec!["import-pyhsm", "--json", pyhsm.to_str().unwrap(), "--flags", "decode-only"],
            vec!["list"],
        ] {
            run(&cli(&cli_path, &pw_file, &args), &mut Vec::new()).unwrap();
        }
    });

    let log = String::from_utf8(log.0.lock().unwrap().clone()).unwrap();
    assert!(log.contains("created keystore"), "the log captured the module's events:\n{log}");
    assert!(log.contains("added key handle"), "{log}");
    assert!(log.contains("keystore unlocked"), "{log}");
    assert!(log.contains("readable by other users"), "{log}");
    let mut secrets = decrypt_keystore(&std::fs::read(&path).unwrap(), PASSWORD).secrets();
    secrets.extend(decrypt_keystore(&std::fs::read(&cli_path).unwrap(), PASSWORD).secrets());
    assert_eq!(secrets.len(), (1 + 3 + 4) + (1 + 3 + 2), "file keys, data keys and handle keys of both keystores");
    secrets.push(exported[..16].to_vec());
    secrets.push(exported[16..22].to_vec());
    secrets.push(exported[22..].to_vec());
    assert_no_secret(&log, &secrets, "the log");
}

// ---------------------------------------------------------------------------
// The CLI.

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: KeystoreCommand,
}

/// `<subcommand> --keystore <path> --password-file <pw> <args>`, parsed by clap.
fn cli(keystore: &Path, password_file: &Path, args: &[&str]) -> KeystoreCommand {
    let mut argv = vec!["keystore", args[0], "--keystore", keystore.to_str().unwrap(), "--password-file", password_file.to_str().unwrap()];
    argv.extend_from_slice(&args[1..]);
    Cli::try_parse_from(argv).unwrap().cmd
}

fn run_cli(keystore: &Path, password_file: &Path, args: &[&str]) -> Result<String, Error> {
    let mut out = Vec::new();
    run(&cli(keystore, password_file, args), &mut out)?;
    Ok(String::from_utf8(out).unwrap())
}

#[test]
fn cli_init_add_import_list() {
    let dir = tempfile::tempdir().unwrap();
    let ks = dir.path().join("ks");
    let pw = json_file(dir.path(), "pw", &format!("{PASSWORD}\n"));
    let pyhsm_key = "8b3f1c2d4e5f60718293a4b5c6d7e8f9";
    let json = json_file(dir.path(), "keys.json", &format!(r#"{{"0x2000": "{pyhsm_key}", "KSM1": "{}"}}"#, KNOWN[0].1));

    let out = run_cli(&ks, &pw, &["init", "--kdf-memory-mib", "1", "--kdf-iterations", "1"]).unwrap();
    assert!(out.contains("created keystore") && out.contains("1 MiB"), "{out}");
    assert_eq!(mode(&ks) & 0o7777, 0o600);
    let d = decrypt_keystore(&std::fs::read(&ks).unwrap(), PASSWORD);
    assert_eq!(d.kdf, KdfParams { memory_kib: 1024, iterations: 1, parallelism: 1 });
    assert!(d.handles.is_empty());

    let out = run_cli(&ks, &pw, &["add-handle", "--key-handle", "0x20", "--flags", "personalizer"]).unwrap();
    assert!(out.contains("0x20") && out.contains("AES-256"), "{out}");
    let out = run_cli(&ks, &pw, &["add-handle", "--key-handle", "33", "--flags", "otp-decode,export", "--key-bits", "128"]).unwrap();
    assert!(out.contains("0x21") && out.contains("AES-128") && out.contains("otp-decode,export"), "{out}");
    let out = run_cli(&ks, &pw, &["import-pyhsm", "--json", json.to_str().unwrap(), "--flags", "decode-only"]).unwrap();
    assert!(out.contains("2 key handle(s) imported"), "{out}");
    assert_no_secret(&out, &[hex::decode(pyhsm_key).unwrap(), hex::decode(KNOWN[0].1).unwrap()], "import-pyhsm output");
    assert_eq!(mode(&ks) & 0o7777, 0o600);

    let list = run_cli(&ks, &pw, &["list"]).unwrap();
    let lines: Vec<&str> = list.lines().collect();
    assert_eq!(lines.len(), 5, "header + 4 handles:\n{list}");
    assert!(lines[0].contains("key handle") && lines[0].contains("flags"), "{list}");
    let line = |kh: &str| *lines.iter().find(|l| l.starts_with(kh)).unwrap_or_else(|| panic!("{kh} missing:\n{list}"));
    let perso = line("0x20 ");
    assert!(
        perso.contains(&Flags::PERSONALIZER.to_string()) && perso.contains(&format!("{:#010x}", Flags::PERSONALIZER.bits())),
        "{perso}"
    );
    assert!(perso.contains("AES-256") && perso.contains(" 32 "), "{perso}");
    assert!(line("0x21 ").contains("otp-decode,export (0x01000200)"), "{list}");
    assert!(line("0x2000 ").contains("otp-decode (0x00000200)") && line("0x2000 ").contains("AES-128"), "{list}");
    assert!(line("0x314d534b ").contains("AES-256") && line("0x314d534b ").contains("827151179"), "{list}");
    // Every key in the file, generated or imported, stays out of the listing.
    let d = decrypt_keystore(&std::fs::read(&ks).unwrap(), PASSWORD);
    assert_eq!(d.handles.len(), 4);
    assert_eq!(hex::encode(&d.handles.iter().find(|h| h.0 == KeyHandle::new(0x2000)).unwrap().2), pyhsm_key);
    assert_no_secret(&list, &d.secrets(), "list output");

    // Importing the same file again: duplicates, nothing changes.
    let before = std::fs::read(&ks).unwrap();
    let e = run_cli(&ks, &pw, &["import-pyhsm", "--json", json.to_str().unwrap(), "--flags", "decode-only"]).unwrap_err();
    assert!(matches!(e, Error::DuplicateKeyHandle(_)), "{e:?}");
    assert_eq!(std::fs::read(&ks).unwrap(), before);
    assert_eq!(dir_entries(dir.path()), ["keys.json", "ks", "pw"]);
}

#[test]
fn cli_refusals() {
    let dir = tempfile::tempdir().unwrap();
    let ks = dir.path().join("ks");
    let pw = json_file(dir.path(), "pw", PASSWORD);
    let wrong = json_file(dir.path(), "wrong", "not it\n");
    let empty = json_file(dir.path(), "empty", "\n");

    // Bad KDF parameters and an empty password create nothing.
    assert!(matches!(run_cli(&ks, &pw, &["init", "--kdf-memory-mib", "0", "--kdf-iterations", "1"]), Err(Error::InvalidInput(_))));
    assert!(matches!(run_cli(&ks, &pw, &["init", "--kdf-memory-mib", "1", "--kdf-iterations", "0"]), Err(Error::InvalidInput(_))));
    assert!(run_cli(&ks, &empty, &["init", "--kdf-memory-mib", "1", "--kdf-iterations", "1"]).is_err());
    assert!(!ks.exists());
    // Commands on a missing keystore fail cleanly.
    assert!(matches!(run_cli(&ks, &pw, &["list"]), Err(Error::Io { .. })));

    run_cli(&ks, &pw, &["init", "--kdf-memory-mib", "1", "--kdf-iterations", "1"]).unwrap();
    let before = std::fs::read(&ks).unwrap();
    let e = run_cli(&ks, &pw, &["init", "--kdf-memory-mib", "1", "--kdf-iterations", "1"]).unwrap_err();
    assert!(matches!(e, Error::AlreadyExists(_)), "{e:?}");
    assert!(matches!(run_cli(&ks, &wrong, &["list"]), Err(Error::WrongPassword)));
    assert!(matches!(run_cli(&ks, &wrong, &["add-handle", "--key-handle", "1", "--flags", "otp-decode"]), Err(Error::WrongPassword)));
    assert!(matches!(run_cli(&ks, &pw, &["import-pyhsm", "--json", "/nonexistent/keys.json", "--flags", "import"]), Err(Error::Io { .. })));
    assert_eq!(std::fs::read(&ks).unwrap(), before);

    // clap refuses malformed arguments before anything runs.
    let pw_s = pw.to_str().unwrap();
    let ks_s = ks.to_str().unwrap();
    for args in [
        vec!["add-handle", "--key-handle", "1", "--flags", "bogus"],
        vec!["add-handle", "--key-handle", "1", "--flags", "otp-decode", "--key-bits", "64"],
        vec!["add-handle", "--key-handle", "abcde", "--flags", "otp-decode"],
        vec!["add-handle", "--key-handle", "1"],
        vec!["import-pyhsm", "--flags", "import"],
    ] {
        let mut argv = vec!["keystore", args[0], "--keystore", ks_s, "--password-file", pw_s];
        argv.extend_from_slice(&args[1..]);
        assert!(Cli::try_parse_from(argv.clone()).is_err(), "{args:?}");
    }
    let list = run_cli(&ks, &pw, &["list"]).unwrap();
    assert_eq!(list.lines().count(), 1, "header only:\n{list}");
}

#[test]
fn otp_decode_after_cli_provisioning() {
    // End to end inside the crate: keys added by the CLI serve the trait.
    let dir = tempfile::tempdir().unwrap();
    let ks = dir.path().join("ks");
    let pw = json_file(dir.path(), "pw", PASSWORD);
    run_cli(&ks, &pw, &["init", "--kdf-memory-mib", "1", "--kdf-iterations", "1"]).unwrap();
    run_cli(&ks, &pw, &["add-handle", "--key-handle", "KSM1", "--flags", "personalizer,otp-decode"]).unwrap();
    let hsm = SoftHsm::open_unlocked(&ks, &password()).unwrap();
    let kh: KeyHandle = "KSM1".parse().unwrap();
    let rec = hsm.generate_yubikey_aeads(&[kh], NonceSource::Given(AeadNonce::new([0xca, 0xfe, 0, 0, 0, 1]))).unwrap().remove(0);
    let yk = YubiKeySecrets::from_plaintext(&hsm.decrypt_aead(&rec).unwrap()).unwrap();
    let tok = TokenFields { uid: *yk.uid.expose(), counter: 0x22, session_use: 5, ..Default::default() }.build().encrypt(&yk.key);
    let d = hsm.decode_otp(&rec, &tok).unwrap();
    assert_eq!((d.use_ctr, d.session_ctr), (0x22, 5));
}

#[test]
fn decode_only_export_for_the_servers() {
    let (dir, _path, hsm) = keystore();
    let kh = KeyHandle::new(0x20); // generated inside, never seen
    let nonce = AeadNonce::new([1, 2, 3, 4, 5, 6]);
    let rec = hsm.generate_yubikey_aeads(&[kh], NonceSource::Given(nonce)).unwrap().remove(0);
    let secrets = YubiKeySecrets::from_plaintext(&hsm.decrypt_aead(&rec).unwrap()).unwrap();
    let out = dir.path().join("servers.keystore");
    let server_pw = Password::new("another password for the servers").unwrap();
    let listed = hsm::admin::export_decode_only(&hsm, &out, &server_pw, KDF, &[kh]).unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!((listed[0].key_handle, listed[0].flags, listed[0].key_bits), (kh, Flags::OTP_DECODE, 256));
    assert_eq!(mode(&out) & 0o777, 0o600);
    assert!(hsm::admin::export_decode_only(&hsm, &out, &server_pw, KDF, &[kh]).is_err(), "never overwrites");
    assert!(matches!(
        hsm::admin::export_decode_only(&hsm, &dir.path().join("x"), &server_pw, KDF, &[KeyHandle::new(0x999)]),
        Err(Error::UnknownKeyHandle(_))
    ));

    // The servers' copy decodes OTPs with the same key and can do nothing else.
    assert!(SoftHsm::open_unlocked(&out, &password()).is_err(), "sealed under the export password");
    let server = SoftHsm::open_unlocked(&out, &server_pw).unwrap();
    let ciphertext =
        TokenFields { uid: *secrets.uid.expose(), counter: 7, session_use: 2, ..Default::default() }.build().encrypt(&secrets.key);
    let decoded = server.decode_otp(&rec, &ciphertext).unwrap();
    assert_eq!((decoded.use_ctr, decoded.session_ctr), (7, 2));
    assert!(matches!(server.decrypt_aead(&rec), Err(Error::NotPermitted { .. })), "no export");
    assert!(matches!(server.generate_yubikey_aeads(&[kh], NonceSource::Random), Err(Error::NotPermitted { .. })), "no generation");
    let value = hsm.encrypt_value(DataKey::Config, b"client key").unwrap();
    assert!(server.decrypt_value(DataKey::Config, &value).is_err(), "data keys of its own");
}
