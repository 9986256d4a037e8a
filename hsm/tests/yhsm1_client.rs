//! The YubiHSM 1 client ([`Yhsm1`]) on a real pty.
//!
//! The device is a small protocol fake served on the master side of a pty
//! (the client opens the slave path like any serial device). It keeps its
//! own key handles, flags, keystore lock and buffer, and can be told to
//! misbehave: stay silent, prefix a response with garbage, echo the wrong key
//! handle, or die. Results are checked against [`SoftHsm`] and `otp`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use appliance_tests::yhsm1::{keys_json, Emulator};
use hsm::soft::format::KdfParams;
use hsm::soft::SoftHsm;
use hsm::yhsm1::client::{Yhsm1, Yhsm1Options};
use hsm::yhsm1::daemon::{self, Daemon};
use hsm::{DataKey, Error, Flags, HandleInfo, NonceSource, Password, SecurityModule, Status};
use otp::aead_file::AeadRecord;
use otp::token::TokenFields;
use otp::{AeadNonce, HandleKey, KeyHandle, TokenCiphertext, YubiKeySecrets};
use serialport::{SerialPort as _, TTYPort};

const MASTER_KEY_HEX: &str = "00112233445566778899aabbccddeeff";

/// Every AEAD flag.
const FULL: Flags = Flags::from_bits(
    Flags::AEAD_GENERATE.bits()
        | Flags::BUFFER_AEAD_GENERATE.bits()
        | Flags::OTP_DECODE.bits()
        | Flags::USER_NONCE.bits()
        | Flags::BUFFER_LOAD.bits(),
);
const KH_FULL: KeyHandle = KeyHandle::new(1);
const KH_IMPORT: KeyHandle = KeyHandle::new(0x1002);
const KH_DECODE: KeyHandle = KeyHandle::new(0x21);
const KH_NO_USER_NONCE: KeyHandle = KeyHandle::new(0x22);
const KH_UNKNOWN: KeyHandle = KeyHandle::new(0x99);

fn handles() -> Vec<(KeyHandle, Flags, Vec<u8>)> {
    vec![
        (KH_FULL, FULL, (0u8..32).collect()),
        (KH_IMPORT, Flags::IMPORT, vec![0x20; 32]),
        (KH_DECODE, Flags::OTP_DECODE, (0u8..32).collect()),
        (KH_NO_USER_NONCE, Flags::from_bits(FULL.bits() & !Flags::USER_NONCE.bits()), vec![0x77; 16]),
    ]
}

fn key_of(kh: KeyHandle) -> HandleKey {
    let (_, _, key) = handles().into_iter().find(|(k, _, _)| *k == kh).unwrap();
    HandleKey::new(&key).unwrap()
}

// ---------------------------------------------------------------------------
// The fake device.

/// How the fake should misbehave next.
#[derive(Default)]
struct Faults {
    /// Read requests, never answer.
    silent: AtomicBool,
    /// Send garbage before the next response.
    garbage_next: AtomicBool,
    /// Send garbage before every response.
    garbage_always: AtomicBool,
    /// Request frames received.
    requests: AtomicUsize,
    /// Behave like a stick in configuration mode: a text console.
    config_mode: AtomicBool,
    /// Echo a wrong key handle in the next AEAD response.
    wrong_handle_next: AtomicBool,
    /// Close the pty and stop.
    die: AtomicBool,
}

struct State {
    keys: HashMap<u32, (HandleKey, Flags)>,
    locked: bool,
    buffer: Vec<u8>,
    buffer_random: bool,
    rng: u64,
}

impl State {
    fn random(&mut self, n: usize) -> Vec<u8> {
        (0..n)
            .map(|_| {
                self.rng ^= self.rng << 13;
                self.rng ^= self.rng >> 7;
                self.rng ^= self.rng << 17;
                (self.rng >> 24) as u8
            })
            .collect()
    }

    /// Look up a handle for an operation: status code on refusal.
    fn handle(&self, kh: u32, needs: Flags) -> Result<&HandleKey, u8> {
        if self.locked {
            return Err(0x8a);
        }
        let (key, flags) = self.keys.get(&kh).ok_or(0x81u8)?;
        if flags.contains(needs) {
            Ok(key)
        } else {
            Err(0x89)
        }
    }

    fn aead(&mut self, nonce: [u8; 6], kh: u32, data: &[u8], needs: Flags) -> Vec<u8> {
        let mut nonce = nonce;
        let needs = if nonce == [0; 6] { needs } else { needs | Flags::USER_NONCE };
        let result = self.handle(kh, needs).cloned();
        if nonce == [0; 6] {
            nonce.copy_from_slice(&self.random(6));
        }
        let mut out = nonce.to_vec();
        out.extend_from_slice(&kh.to_le_bytes());
        match result {
            Ok(key) => {
                let aead = key.seal(KeyHandle::new(kh), &AeadNonce::new(nonce), data).unwrap();
                out.push(0x80);
                out.push(aead.len() as u8);
                out.extend_from_slice(aead.as_bytes());
            }
            Err(st) => out.extend_from_slice(&[st, 0]),
        }
        out
    }

    fn answer(&mut self, cmd: u8, p: &[u8]) -> Vec<u8> {
        let kh_at = |i: usize| u32::from_le_bytes(p[i..i + 4].try_into().unwrap());
        let nonce_at = |i: usize| -> [u8; 6] { p[i..i + 6].try_into().unwrap() };
        match cmd {
            0x26 => {
                let mut out = vec![1, 0, 4, 1];
                out.extend_from_slice(b"FAKEYHSM0001");
                out
            }
            0x23 => p.to_vec(),
            0x24 => {
                let mut out = vec![p[0]];
                out.extend(self.random(usize::from(p[0])));
                out
            }
            0x21 => {
                self.buffer.truncate(usize::from(p[0]));
                let more = self.random(usize::from(p[1]));
                self.buffer.extend(more);
                self.buffer_random = true;
                vec![self.buffer.len() as u8]
            }
            0x20 => {
                self.buffer.truncate(usize::from(p[0]));
                self.buffer.extend_from_slice(&p[2..2 + usize::from(p[1])]);
                self.buffer_random = false;
                vec![self.buffer.len() as u8]
            }
            0x01 => self.aead(nonce_at(0), kh_at(6), &p[11..11 + usize::from(p[10])], Flags::AEAD_GENERATE),
            0x02 => {
                let needs = if self.buffer_random { Flags::BUFFER_AEAD_GENERATE } else { Flags::BUFFER_AEAD_GENERATE | Flags::BUFFER_LOAD };
                let data = self.buffer.clone();
                self.aead(nonce_at(0), kh_at(6), &data, needs)
            }
            0x06 => {
                let (nonce, kh) = (nonce_at(0), kh_at(6));
                let mut out = p[..10].to_vec();
                let otp = TokenCiphertext::from_slice(&p[10..26]).unwrap();
                let aead = otp::Aead::from_slice(&p[26..56]).unwrap();
                let st = match self.handle(kh, Flags::OTP_DECODE) {
                    Err(st) => Err(st),
                    Ok(key) => otp::decode::decode_otp(key, KeyHandle::new(kh), &AeadNonce::new(nonce), &aead, &otp).map_err(|e| match e {
                        otp::Error::AeadIntegrity => 0x82,
                        _ => 0x83,
                    }),
                };
                match st {
                    Ok(d) => {
                        out.extend_from_slice(&d.use_ctr.to_le_bytes());
                        out.extend_from_slice(&[d.session_ctr, d.timestamp_high]);
                        out.extend_from_slice(&d.timestamp_low.to_le_bytes());
                        out.push(0x80);
                    }
                    Err(st) => out.extend_from_slice(&[0, 0, 0, 0, 0, 0, st]),
                }
                out
            }
            0x29 => {
                let mut want = [0u8; 32];
                hex::decode_to_slice(MASTER_KEY_HEX, &mut want[..16]).unwrap();
                if p == want {
                    self.locked = false;
                    vec![0x80]
                } else {
                    self.locked = true;
                    vec![0x8b]
                }
            }
            _ => vec![0x8c],
        }
    }
}

/// A fake YubiHSM 1 on a pty.
struct Fake {
    path: String,
    faults: Arc<Faults>,
    /// The slave side stays open so that the pty lives until the client
    /// has opened it.
    _slave: TTYPort,
    thread: Option<JoinHandle<()>>,
}

impl Fake {
    fn start(locked: bool) -> Self {
        let (mut master, slave) = TTYPort::pair().unwrap();
        let path = slave.name().unwrap();
        let faults = Arc::new(Faults::default());
        let mut state = State {
            keys: handles().into_iter().map(|(kh, f, k)| (kh.get(), (HandleKey::new(&k).unwrap(), f))).collect(),
            locked,
            buffer: Vec::new(),
            buffer_random: false,
            rng: 0x1234_5678_9abc_def1,
        };
        let f = Arc::clone(&faults);
        master.set_timeout(Duration::from_millis(50)).unwrap();
        let thread = std::thread::spawn(move || loop {
            if f.die.load(Ordering::SeqCst) {
                return; // drops the master: the peer is gone
            }
            let mut b = [0u8; 1];
            match master.read(&mut b) {
                Ok(1) => {}
                Ok(_) => return,
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => continue,
                Err(_) => return,
            }
            if f.config_mode.load(Ordering::SeqCst) {
                if b[0] == b'\r' && master.write_all(b"\r\nHSM (keys changed)> ").is_err() {
                    return;
                }
                continue;
            }
            if b[0] == 0 {
                continue; // YSM_NULL: resync bytes
            }
            let mut body = vec![0u8; usize::from(b[0])];
            master.set_timeout(Duration::from_secs(5)).unwrap();
            let read = master.read_exact(&mut body);
            master.set_timeout(Duration::from_millis(50)).unwrap();
            if read.is_err() {
                return;
            }
            f.requests.fetch_add(1, Ordering::SeqCst);
            if f.silent.load(Ordering::SeqCst) {
                continue;
            }
            let mut resp = state.answer(body[0], &body[1..]);
            if f.wrong_handle_next.swap(false, Ordering::SeqCst) && resp.len() >= 10 {
                resp[6] ^= 0x01;
            }
            let mut frame = Vec::new();
            if f.garbage_next.swap(false, Ordering::SeqCst) || f.garbage_always.load(Ordering::SeqCst) {
                frame.extend_from_slice(&[0x05, 0xe3, 0x17, 0x00, 0xff, 0x42, 0x99]);
            }
            frame.push(resp.len() as u8 + 1);
            frame.push(body[0] | 0x80);
            frame.extend_from_slice(&resp);
            if master.write_all(&frame).is_err() {
                return;
            }
        });
        Self { path, faults, _slave: slave, thread: Some(thread) }
    }

    fn open(&self) -> Yhsm1 {
        Yhsm1::open(&self.path, options()).unwrap()
    }

    /// Close the device side and wait until it is gone.
    fn kill(&mut self) {
        self.faults.die.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}

impl Drop for Fake {
    fn drop(&mut self) {
        self.kill();
    }
}

fn options() -> Yhsm1Options {
    Yhsm1Options {
        timeout: Duration::from_secs(2),
        handles: handles().into_iter().map(|(kh, flags, k)| HandleInfo { key_handle: kh, flags, key_bits: k.len() * 8 }).collect(),
    }
}

fn soft() -> (tempfile::TempDir, SoftHsm) {
    let dir = tempfile::tempdir().unwrap();
    let password = Password::new("pw").unwrap();
    let soft = SoftHsm::create(&dir.path().join("ks"), &password, KdfParams::INSECURE_FOR_TESTS).unwrap();
    let new: Vec<_> = handles().into_iter().map(|(kh, f, k)| (kh, f, HandleKey::new(&k).unwrap())).collect();
    soft.import_handles(&new).unwrap();
    (dir, soft)
}

fn nonce(b: u8) -> AeadNonce {
    AeadNonce::new([b, 2, 3, 4, 5, 6])
}

/// An OTP of the YubiKey whose secrets `record` wraps.
fn otp_for(record: &AeadRecord, counter: u16, session_use: u8) -> TokenCiphertext {
    let plain = key_of(record.key_handle).open(record.key_handle, &record.nonce, &record.aead).unwrap();
    let secrets = YubiKeySecrets::from_plaintext(&plain).unwrap();
    let mut uid = [0u8; 6];
    uid.copy_from_slice(&plain[16..22]);
    TokenFields { uid, counter, timestamp_low: 0xbeef, timestamp_high: 0x12, session_use, rnd: 0x5555 }.build().encrypt(&secrets.key)
}

fn assert_backend(e: &Error) {
    assert!(e.is_backend_failure(), "expected a backend failure, got {e:?}");
}

// ---------------------------------------------------------------------------
// Tests.

#[test]
fn device_info_and_random() {
    let fake = Fake::start(false);
    let hsm = fake.open();
    assert_eq!(hsm.info().protocol_version, 1);
    assert_eq!(&hsm.info().system_uid, b"FAKEYHSM0001");
    hsm.echo(b"hello").unwrap();
    // 200 bytes: three RANDOM_GENERATE commands of at most 95.
    let mut out = [0u8; 200];
    hsm.random(&mut out).unwrap();
    assert!(out[150..].iter().any(|b| *b != 0), "the last chunk was filled");
    assert_eq!(hsm.status(), Status::Ready);
    assert_eq!(hsm.key_handles().unwrap().len(), handles().len());
}

#[test]
fn imported_aeads_equal_the_soft_modules() {
    let fake = Fake::start(false);
    let hsm = fake.open();
    let (_dir, soft) = soft();
    for (kh, pt) in [
        (KH_FULL, b"foo".to_vec()),
        (KH_FULL, vec![0x41; 22]),
        (KH_FULL, vec![0x41; 64]),
        // Only BUFFER_LOAD + BUFFER_AEAD_GENERATE: the buffer path.
        (KH_IMPORT, vec![0x42; 22]),
    ] {
        let ours = hsm.import_aead(kh, NonceSource::Given(nonce(9)), &pt).unwrap();
        let theirs = soft.import_aead(kh, NonceSource::Given(nonce(9)), &pt).unwrap();
        assert_eq!(ours, theirs, "{kh} with {} bytes", pt.len());
    }
    // A device-chosen nonce is non-zero and opens under the handle key.
    let r = hsm.import_aead(KH_FULL, NonceSource::Random, b"secret").unwrap();
    assert!(!r.nonce.is_zero());
    assert_eq!(&key_of(KH_FULL).open(KH_FULL, &r.nonce, &r.aead).unwrap()[..], b"secret");
    // Out-of-range plaintexts are refused before reaching the device.
    assert!(matches!(hsm.import_aead(KH_FULL, NonceSource::Random, &[0; 65]), Err(Error::InvalidInput(_))));
}

#[test]
fn generated_aeads_decode_otps() {
    let fake = Fake::start(false);
    let hsm = fake.open();
    let records = hsm.generate_yubikey_aeads(&[KH_FULL, KH_IMPORT], NonceSource::Given(nonce(1))).unwrap();
    assert_eq!(records.len(), 2);
    // The same secret under each handle.
    let a = key_of(KH_FULL).open(KH_FULL, &records[0].nonce, &records[0].aead).unwrap();
    let b = key_of(KH_IMPORT).open(KH_IMPORT, &records[1].nonce, &records[1].aead).unwrap();
    assert_eq!(a, b);
    assert_eq!(records[0].nonce, nonce(1));

    let otp = otp_for(&records[0], 0x8007, 3);
    let d = hsm.decode_otp(&records[0], &otp).unwrap();
    assert_eq!((d.use_ctr, d.session_ctr, d.timestamp_high, d.timestamp_low), (0x8007, 3, 0x12, 0xbeef));
    // The soft module agrees.
    let (_dir, soft) = soft();
    assert_eq!(soft.decode_otp(&records[0], &otp).unwrap(), d);

    // A fresh generation gives another secret.
    let again = hsm.generate_yubikey_aeads(&[KH_FULL], NonceSource::Random).unwrap();
    assert_ne!(key_of(KH_FULL).open(KH_FULL, &again[0].nonce, &again[0].aead).unwrap(), a);
}

#[test]
fn verdicts_and_permissions() {
    let fake = Fake::start(false);
    let hsm = fake.open();
    let record = hsm.import_aead(KH_FULL, NonceSource::Given(nonce(5)), &[7; 22]).unwrap();
    let otp = otp_for(&record, 1, 1);
    hsm.decode_otp(&record, &otp).unwrap();

    let mut tampered = record.aead.as_bytes().to_vec();
    tampered[3] ^= 0x40;
    let bad = AeadRecord { aead: otp::Aead::from_slice(&tampered).unwrap(), ..record };
    let e = hsm.decode_otp(&bad, &otp).unwrap_err();
    assert!(matches!(e, Error::AeadInvalid(_)), "{e:?}");
    assert!(!e.is_backend_failure());

    let wrong = TokenCiphertext::new([0x33; 16]);
    let e = hsm.decode_otp(&record, &wrong).unwrap_err();
    assert!(matches!(e, Error::OtpInvalid(_)), "{e:?}");
    assert!(!e.is_backend_failure());

    // KH_DECODE holds the same key but the AEAD is bound to KH_FULL.
    let moved = AeadRecord { key_handle: KH_DECODE, ..record };
    assert!(matches!(hsm.decode_otp(&moved, &otp), Err(Error::AeadInvalid(_))));

    // Flags: no OTP_DECODE, no USER_NONCE, no AEAD_GENERATE.
    let on_import = AeadRecord { key_handle: KH_IMPORT, ..record };
    assert!(matches!(hsm.decode_otp(&on_import, &otp), Err(Error::NotPermitted { key_handle: KH_IMPORT, .. })));
    let e = hsm.generate_yubikey_aeads(&[KH_NO_USER_NONCE], NonceSource::Given(nonce(2))).unwrap_err();
    assert!(matches!(e, Error::NotPermitted { key_handle: KH_NO_USER_NONCE, needs, .. } if needs.contains(Flags::USER_NONCE)), "{e:?}");
    hsm.generate_yubikey_aeads(&[KH_NO_USER_NONCE], NonceSource::Random).unwrap();
    assert!(matches!(hsm.import_aead(KH_DECODE, NonceSource::Random, b"x"), Err(Error::NotPermitted { .. })));
    let e = hsm.decode_otp(&AeadRecord { key_handle: KH_UNKNOWN, ..record }, &otp).unwrap_err();
    assert!(matches!(e, Error::UnknownKeyHandle(KH_UNKNOWN)), "{e:?}");

    // What a YubiHSM 1 cannot do.
    assert!(matches!(hsm.decrypt_aead(&record), Err(Error::NotPermitted { .. })));
    assert!(hsm.encrypt_value(DataKey::Token, b"v").is_err());
    assert!(hsm.decrypt_value(DataKey::Config, b"v").is_err());
}

#[test]
fn locked_until_unlocked() {
    let fake = Fake::start(true);
    let hsm = fake.open();
    assert_eq!(hsm.status(), Status::Locked);
    let e = hsm.import_aead(KH_FULL, NonceSource::Random, b"x").unwrap_err();
    assert!(matches!(e, Error::Locked), "{e:?}");
    assert_backend(&e);
    assert!(matches!(hsm.unlock(&Password::new("not hex").unwrap()), Err(Error::InvalidInput(_))));
    assert!(matches!(hsm.unlock(&Password::new("ffff").unwrap()), Err(Error::WrongPassword)));
    assert_eq!(hsm.status(), Status::Locked);
    // pyhsm's form: hex, zero-padded to 32 bytes.
    hsm.unlock(&Password::new(MASTER_KEY_HEX).unwrap()).unwrap();
    assert_eq!(hsm.status(), Status::Ready);
    hsm.import_aead(KH_FULL, NonceSource::Random, b"x").unwrap();
    // One process owns the port: a second open is refused while it is held.
    let e = Yhsm1::open(&fake.path, options()).unwrap_err();
    assert_backend(&e);
    drop(hsm);
    // A new client knows nothing yet and asks the device.
    assert_eq!(fake.open().status(), Status::Ready);
}

#[test]
fn peer_gone_is_a_backend_error_then_a_new_device_works() {
    let mut fake = Fake::start(false);
    let hsm = fake.open();
    let record = hsm.import_aead(KH_FULL, NonceSource::Given(nonce(3)), &[1; 22]).unwrap();
    let otp = otp_for(&record, 5, 0);
    hsm.decode_otp(&record, &otp).unwrap();
    fake.kill();
    let e = hsm.decode_otp(&record, &otp).unwrap_err();
    assert_backend(&e);
    assert!(matches!(e, Error::Io { .. }), "{e:?}");
    // Still gone: reopening fails the same way, never a verdict.
    assert_backend(&hsm.decode_otp(&record, &otp).unwrap_err());
    assert_eq!(hsm.status(), Status::NotReady);

    let fake = Fake::start(false);
    let hsm = fake.open();
    assert_eq!(hsm.decode_otp(&record, &otp).unwrap().use_ctr, 5);
}

#[test]
fn silent_device_times_out_then_recovers() {
    let fake = Fake::start(false);
    let hsm = Yhsm1::open(&fake.path, Yhsm1Options { timeout: Duration::from_secs(1), ..options() }).unwrap();
    let record = hsm.import_aead(KH_FULL, NonceSource::Given(nonce(4)), &[2; 22]).unwrap();
    let otp = otp_for(&record, 9, 9);
    fake.faults.silent.store(true, Ordering::SeqCst);
    let e = hsm.decode_otp(&record, &otp).unwrap_err();
    assert_backend(&e);
    assert!(matches!(&e, Error::Io { source, .. } if source.kind() == std::io::ErrorKind::TimedOut), "{e:?}");
    fake.faults.silent.store(false, Ordering::SeqCst);
    // The port is reopened, resynced and checked: the next call works.
    assert_eq!(hsm.decode_otp(&record, &otp).unwrap().use_ctr, 9);
}

#[test]
fn configuration_mode_is_reported() {
    let fake = Fake::start(false);
    fake.faults.config_mode.store(true, Ordering::SeqCst);
    let e = Yhsm1::open(&fake.path, Yhsm1Options { timeout: Duration::from_secs(1), ..options() }).unwrap_err();
    assert!(matches!(&e, Error::NotReady(m) if m.contains("configuration mode") && m.contains("HSM (keys changed)>")), "{e:?}");
    assert_backend(&e);
    fake.faults.config_mode.store(false, Ordering::SeqCst);
    fake.open().echo(b"HSM mode").unwrap();
}

#[test]
fn garbage_and_wrong_echo_resync() {
    let fake = Fake::start(false);
    let hsm = fake.open();
    let record = hsm.import_aead(KH_FULL, NonceSource::Given(nonce(6)), &[3; 22]).unwrap();
    let otp = otp_for(&record, 2, 2);
    let requests = || fake.faults.requests.load(Ordering::SeqCst);

    // Noise before one answer: resync and one more try, within the call.
    let before = requests();
    fake.faults.garbage_next.store(true, Ordering::SeqCst);
    assert_eq!(hsm.decode_otp(&record, &otp).unwrap().use_ctr, 2);
    assert_eq!(requests() - before, 2, "the command was sent again after the resync");

    // An answer for another key handle is refused the same way.
    let before = requests();
    fake.faults.wrong_handle_next.store(true, Ordering::SeqCst);
    assert_eq!(hsm.decode_otp(&record, &otp).unwrap().use_ctr, 2);
    assert_eq!(requests() - before, 2);
    fake.faults.wrong_handle_next.store(true, Ordering::SeqCst);
    assert_eq!(hsm.import_aead(KH_FULL, NonceSource::Given(nonce(6)), &[3; 22]).unwrap(), record);

    // A line that stays garbled: a backend error after one retry, never a
    // verdict; then it works again.
    let before = requests();
    fake.faults.garbage_always.store(true, Ordering::SeqCst);
    let e = hsm.decode_otp(&record, &otp).unwrap_err();
    assert_backend(&e);
    assert!(!matches!(e, Error::OtpInvalid(_) | Error::AeadInvalid(_)));
    assert_eq!(requests() - before, 2);
    fake.faults.garbage_always.store(false, Ordering::SeqCst);
    assert_eq!(hsm.decode_otp(&record, &otp).unwrap().use_ctr, 2);
}

#[test]
fn threads_share_one_port() {
    let fake = Fake::start(false);
    let hsm = Arc::new(fake.open());
    let record = hsm.import_aead(KH_FULL, NonceSource::Given(nonce(7)), &[4; 22]).unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let workers: Vec<_> = (0..4u8)
        .map(|t| {
            let (hsm, seen) = (Arc::clone(&hsm), Arc::clone(&seen));
            std::thread::spawn(move || {
                for i in 0..10u8 {
                    let otp = otp_for(&record, u16::from(t) * 100 + u16::from(i), i);
                    let d = hsm.decode_otp(&record, &otp).unwrap();
                    seen.lock().unwrap().push((d.use_ctr, d.session_ctr));
                    let _ = hsm.generate_yubikey_aeads(&[KH_FULL], NonceSource::Random).unwrap();
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    let mut seen = seen.lock().unwrap().clone();
    seen.sort_unstable();
    let mut want: Vec<_> = (0..4u16).flat_map(|t| (0..10u8).map(move |i| (t * 100 + u16::from(i), i))).collect();
    want.sort_unstable();
    assert_eq!(seen, want);
}

// ---------------------------------------------------------------------------
// Sharing the device through the daemon's socket.

/// A daemon owning `fake`'s port, serving on a socket in a temporary
/// directory.
fn daemon(fake: &Fake) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("yhsm1.sock");
    let listener = daemon::bind(&socket).unwrap();
    let d = Arc::new(Daemon::open(&fake.path, Duration::from_secs(1)).unwrap());
    std::thread::spawn(move || d.serve(&listener));
    (dir, socket)
}

#[test]
fn daemon_shares_one_device_between_clients() {
    let fake = Fake::start(false);
    let (_dir, socket) = daemon(&fake);
    // The daemon owns the port: opening it directly is refused.
    assert_backend(&Yhsm1::open(&fake.path, options()).unwrap_err());
    let a = Arc::new(Yhsm1::connect(&socket, options()).unwrap());
    let b = Yhsm1::connect(&socket, options()).unwrap();
    assert_eq!(&a.info().system_uid, b"FAKEYHSM0001");

    let (_sdir, soft) = soft();
    for kh in [KH_FULL, KH_IMPORT] {
        let ours = a.import_aead(kh, NonceSource::Given(nonce(8)), &[0x42; 22]).unwrap();
        assert_eq!(ours, soft.import_aead(kh, NonceSource::Given(nonce(8)), &[0x42; 22]).unwrap());
    }
    let records = a.generate_yubikey_aeads(&[KH_FULL, KH_IMPORT], NonceSource::Given(nonce(1))).unwrap();
    let otp = otp_for(&records[0], 77, 1);
    assert_eq!(b.decode_otp(&records[0], &otp).unwrap().use_ctr, 77);
    assert!(matches!(b.decode_otp(&records[0], &TokenCiphertext::new([1; 16])), Err(Error::OtpInvalid(_))));
    let mut rnd = [0u8; 120];
    b.random(&mut rnd).unwrap();
    assert_eq!(b.status(), Status::Ready);

    // Generations from one client interleave with the other's decodes; each
    // buffer load stays with its AEADs.
    let gen = {
        let a = Arc::clone(&a);
        std::thread::spawn(move || {
            (0..15).map(|_| a.generate_yubikey_aeads(&[KH_FULL, KH_IMPORT], NonceSource::Random).unwrap()).collect::<Vec<_>>()
        })
    };
    for i in 0..15u16 {
        assert_eq!(b.decode_otp(&records[0], &otp_for(&records[0], i, 0)).unwrap().use_ctr, i);
        b.import_aead(KH_IMPORT, NonceSource::Random, &[i as u8; 22]).unwrap();
    }
    for pair in gen.join().unwrap() {
        let x = key_of(KH_FULL).open(KH_FULL, &pair[0].nonce, &pair[0].aead).unwrap();
        let y = key_of(KH_IMPORT).open(KH_IMPORT, &pair[1].nonce, &pair[1].aead).unwrap();
        assert_eq!(x, y);
    }
}

#[test]
fn daemon_faults_are_backend_errors() {
    let mut fake = Fake::start(false);
    let (_dir, socket) = daemon(&fake);
    let hsm = Yhsm1::connect(&socket, options()).unwrap();
    let record = hsm.import_aead(KH_FULL, NonceSource::Given(nonce(3)), &[1; 22]).unwrap();
    let otp = otp_for(&record, 5, 0);

    fake.faults.silent.store(true, Ordering::SeqCst);
    assert_backend(&hsm.decode_otp(&record, &otp).unwrap_err());
    fake.faults.silent.store(false, Ordering::SeqCst);
    assert_eq!(hsm.decode_otp(&record, &otp).unwrap().use_ctr, 5);

    // Noise is resynced and retried by the daemon; a wrong echo by the
    // client (through the daemon); both within the call.
    fake.faults.garbage_next.store(true, Ordering::SeqCst);
    assert_eq!(hsm.decode_otp(&record, &otp).unwrap().use_ctr, 5);
    fake.faults.wrong_handle_next.store(true, Ordering::SeqCst);
    assert_eq!(hsm.decode_otp(&record, &otp).unwrap().use_ctr, 5);
    fake.faults.garbage_always.store(true, Ordering::SeqCst);
    assert_backend(&hsm.decode_otp(&record, &otp).unwrap_err());
    fake.faults.garbage_always.store(false, Ordering::SeqCst);
    assert_eq!(hsm.decode_otp(&record, &otp).unwrap().use_ctr, 5);

    fake.kill();
    for _ in 0..2 {
        let e = hsm.decode_otp(&record, &otp).unwrap_err();
        assert_backend(&e);
        assert!(!matches!(e, Error::OtpInvalid(_) | Error::AeadInvalid(_)));
    }
    assert_eq!(hsm.status(), Status::NotReady);
}

#[test]
fn daemon_socket_checks() {
    let fake = Fake::start(false);
    let (_dir, socket) = daemon(&fake);
    // A live socket is not taken over.
    assert!(daemon::bind(&socket).is_err());
    // A malformed batch gets a fault reply, not a device command.
    let mut raw = std::os::unix::net::UnixStream::connect(&socket).unwrap();
    raw.write_all(&[0, 3, 0x02, 0x7e, 0x00]).unwrap();
    let mut head = [0u8; 3];
    raw.read_exact(&mut head).unwrap();
    assert_eq!(head[0], 1, "fault tag");
    let mut why = vec![0u8; usize::from(u16::from_be_bytes([head[1], head[2]]))];
    raw.read_exact(&mut why).unwrap();
    assert!(String::from_utf8(why).unwrap().contains("bad request"));
    // The device is still fine for others.
    Yhsm1::connect(&socket, options()).unwrap().echo(b"ok").unwrap();
    // No daemon: a clear backend error.
    let e = Yhsm1::connect(_dir.path().join("nobody.sock"), options()).unwrap_err();
    assert_backend(&e);
}

// ---------------------------------------------------------------------------
// The `yhsm1-emulator` binary: a separate process serving a pty.

/// A `yhsm1-emulator` with [`handles`] and their flags; `--locked` with the
/// master key when `locked`.
fn emulator(locked: bool) -> Emulator {
    let hs = handles();
    let keys = keys_json(hs.iter().map(|(kh, _, k)| (kh.get(), k.as_slice())));
    let mut args: Vec<String> =
        hs.iter().flat_map(|(kh, flags, _)| ["--flags".to_owned(), format!("{:#x}={:#010x}", kh.get(), flags.bits())]).collect();
    if locked {
        args.extend(["--locked", "--master-key", MASTER_KEY_HEX].map(str::to_owned));
    }
    Emulator::start(std::path::Path::new(env!("CARGO_BIN_EXE_yhsm1-emulator")), &keys, &args)
}

#[test]
fn emulator_agrees_with_the_soft_module() {
    let emu = emulator(false);
    let hsm = Yhsm1::open(emu.path(), options()).unwrap();
    assert_eq!(hsm.info().protocol_version, 1);
    let (_dir, soft) = soft();
    for (kh, pt) in [(KH_FULL, b"foo".to_vec()), (KH_FULL, vec![0x41; 22]), (KH_FULL, vec![0x41; 64]), (KH_IMPORT, vec![0x42; 22])] {
        let ours = hsm.import_aead(kh, NonceSource::Given(nonce(9)), &pt).unwrap();
        assert_eq!(ours, soft.import_aead(kh, NonceSource::Given(nonce(9)), &pt).unwrap(), "{kh} with {} bytes", pt.len());
    }
    let records = hsm.generate_yubikey_aeads(&[KH_FULL, KH_IMPORT], NonceSource::Given(nonce(1))).unwrap();
    let otp = otp_for(&records[0], 0x0102, 7);
    let d = hsm.decode_otp(&records[0], &otp).unwrap();
    assert_eq!((d.use_ctr, d.session_ctr), (0x0102, 7));
    assert_eq!(soft.decode_otp(&records[0], &otp).unwrap(), d);
    // Random nonces come from the device, never zero.
    let r = hsm.generate_yubikey_aeads(&[KH_NO_USER_NONCE], NonceSource::Random).unwrap();
    assert!(!r[0].nonce.is_zero());

    let mut tampered = records[0].aead.as_bytes().to_vec();
    tampered[29] ^= 1;
    let bad = AeadRecord { aead: otp::Aead::from_slice(&tampered).unwrap(), ..records[0] };
    assert!(matches!(hsm.decode_otp(&bad, &otp), Err(Error::AeadInvalid(_))));
    assert!(matches!(hsm.decode_otp(&records[0], &TokenCiphertext::new([9; 16])), Err(Error::OtpInvalid(_))));
    let on_import = AeadRecord { key_handle: KH_IMPORT, ..records[1] };
    assert!(matches!(hsm.decode_otp(&on_import, &otp), Err(Error::NotPermitted { .. })));
    assert!(matches!(hsm.generate_yubikey_aeads(&[KH_NO_USER_NONCE], NonceSource::Given(nonce(2))), Err(Error::NotPermitted { .. })));
    assert!(matches!(hsm.import_aead(KH_UNKNOWN, NonceSource::Random, b"x"), Err(Error::UnknownKeyHandle(KH_UNKNOWN))));
}

#[test]
fn emulator_locked_until_unlocked() {
    let emu = emulator(true);
    let hsm = Yhsm1::open(emu.path(), options()).unwrap();
    assert_eq!(hsm.status(), Status::Locked);
    assert!(matches!(hsm.generate_yubikey_aeads(&[KH_FULL], NonceSource::Random), Err(Error::Locked)));
    assert!(matches!(hsm.unlock(&Password::new("0badc0de").unwrap()), Err(Error::WrongPassword)));
    hsm.unlock(&Password::new(MASTER_KEY_HEX).unwrap()).unwrap();
    assert_eq!(hsm.status(), Status::Ready);
    hsm.generate_yubikey_aeads(&[KH_FULL], NonceSource::Random).unwrap();
}

#[test]
fn emulator_killed_mid_session_then_restarted() {
    let mut emu = emulator(false);
    let hsm = Yhsm1::open(emu.path(), options()).unwrap();
    let record = hsm.import_aead(KH_FULL, NonceSource::Given(nonce(4)), &[5; 22]).unwrap();
    let otp = otp_for(&record, 12, 3);
    assert_eq!(hsm.decode_otp(&record, &otp).unwrap().use_ctr, 12);
    emu.kill();
    for _ in 0..2 {
        let e = hsm.decode_otp(&record, &otp).unwrap_err();
        assert_backend(&e);
        assert!(matches!(e, Error::Io { .. }), "{e:?}");
    }
    assert_eq!(hsm.status(), Status::NotReady);
    // A new emulator with the same keys: a new client works, and the AEAD
    // made before the fault still decodes.
    let emu = emulator(false);
    let hsm = Yhsm1::open(emu.path(), options()).unwrap();
    assert_eq!(hsm.decode_otp(&record, &otp).unwrap().use_ctr, 12);
}

/// The `yhsm1-daemon` binary owns the emulated device; two clients share it.
#[test]
fn emulator_through_the_daemon() {
    let emu = emulator(false);
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("yhsm1.sock");
    let mut daemon = std::process::Command::new(env!("CARGO_BIN_EXE_yhsm1-daemon"))
        .arg("--device")
        .arg(emu.path())
        .args(["--socket", socket.to_str().unwrap()])
        .spawn()
        .unwrap();
    let connected = (0..200).find_map(|_| {
        std::thread::sleep(Duration::from_millis(25));
        Yhsm1::connect(&socket, options()).ok()
    });
    let Some(a) = connected else {
        let _ = daemon.kill();
        panic!("yhsm1-daemon did not serve {}", socket.display());
    };
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&socket).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o660, "the socket is for the owner and its group");
    let b = Yhsm1::connect(&socket, options()).unwrap();
    let records = a.generate_yubikey_aeads(&[KH_FULL], NonceSource::Given(nonce(6))).unwrap();
    let otp = otp_for(&records[0], 99, 1);
    assert_eq!(b.decode_otp(&records[0], &otp).unwrap().use_ctr, 99);
    let _ = daemon.kill();
    let _ = daemon.wait();
}

/// OTP decodes per second through the client on the emulator's pty (a
/// measurement for BENCHMARKS.md, not a check):
/// `cargo test --release -p hsm --test yhsm1_client -- --ignored --nocapture`.
#[test]
#[ignore = "measurement"]
fn emulator_decode_throughput() {
    let emu = emulator(false);
    let hsm = Yhsm1::open(emu.path(), options()).unwrap();
    let record = hsm.import_aead(KH_FULL, NonceSource::Given(nonce(1)), &[6; 22]).unwrap();
    let otps: Vec<_> = (0..2000u16).map(|i| otp_for(&record, i, 0)).collect();
    let started = std::time::Instant::now();
    for (i, otp) in otps.iter().enumerate() {
        assert_eq!(usize::from(hsm.decode_otp(&record, otp).unwrap().use_ctr), i);
    }
    let secs = started.elapsed().as_secs_f64();
    println!("yhsm1 emulator over a pty: {:.0} decodes/s ({} in {secs:.2} s)", otps.len() as f64 / secs, otps.len());
}

/// A real YubiHSM 1 (hardware-notes/yubihsm1.md, "Hardware tests"):
/// `APPLIANCE_HW_YHSM1=/dev/ttyACM0 cargo test -p hsm -- --ignored yhsm1_hardware`,
/// with `APPLIANCE_HW_YHSM1_MASTER_KEY=<hex>` if its keystore is locked.
/// The stick is configured as pyhsm's test set-up does: key handle 0x2000
/// holds `2000`×16 and may AEAD host data with a given nonce, so its AEAD of
/// reference vector 1 (otp-and-aead.md §2.2) is known.
#[test]
#[ignore = "needs a YubiHSM 1: set APPLIANCE_HW_YHSM1"]
fn yhsm1_hardware() {
    let Ok(device) = std::env::var("APPLIANCE_HW_YHSM1") else {
        eprintln!("APPLIANCE_HW_YHSM1 is not set: no YubiHSM 1 to test");
        return;
    };
    let hsm = Yhsm1::open(&device, Yhsm1Options::default()).unwrap();
    assert_eq!(hsm.info().protocol_version, 1);
    hsm.echo(&(0u8..95).collect::<Vec<_>>()).unwrap();
    let mut rnd = [0u8; 200];
    hsm.random(&mut rnd).unwrap();
    assert!(rnd.iter().any(|b| *b != 0));
    if let Ok(key) = std::env::var("APPLIANCE_HW_YHSM1_MASTER_KEY") {
        hsm.unlock(&Password::new(key).unwrap()).unwrap();
    }
    assert_eq!(hsm.status(), Status::Ready);
    let kh = KeyHandle::new(0x2000);
    let mut pt = b"foo".to_vec();
    pt.resize(16, 0);
    let r = hsm.import_aead(kh, NonceSource::Given(AeadNonce::new([0x4d; 6])), &pt).unwrap();
    assert_eq!(hex::encode(r.aead.as_bytes()), "6657738b1501b25e455387c9a4e05ad94f84d3975ef2f942");
    let soft_key = HandleKey::new(&[0x20, 0x00].repeat(16)).unwrap();
    assert_eq!(r.aead, soft_key.seal(kh, &AeadNonce::new([0x4d; 6]), &pt).unwrap());
    // A tampered YubiKey AEAD is a verdict, not a fault.
    let yk = hsm.import_aead(kh, NonceSource::Given(AeadNonce::new([0x4d; 6])), &[0x41; 22]).unwrap();
    let mut bad = yk.aead.as_bytes().to_vec();
    bad[0] ^= 1;
    let bad = AeadRecord { aead: otp::Aead::from_slice(&bad).unwrap(), ..yk };
    match hsm.decode_otp(&bad, &TokenCiphertext::new([0; 16])) {
        Err(Error::AeadInvalid(_) | Error::NotPermitted { .. }) => {}
        other => panic!("expected AEAD_INVALID or FUNCTION_DISABLED, got {other:?}"),
    }
}

#[test]
fn daemon_connection_lost_then_reconnected() {
    let fake = Fake::start(false);
    let d = Arc::new(Daemon::open(&fake.path, Duration::from_secs(1)).unwrap());
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("yhsm1.sock");
    let listener = daemon::bind(&socket).unwrap();
    // Serve each connection by hand, keeping a handle to cut it.
    let (cut_tx, cut_rx) = std::sync::mpsc::channel::<std::os::unix::net::UnixStream>();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let stream = stream.unwrap();
            cut_tx.send(stream.try_clone().unwrap()).unwrap();
            let d = Arc::clone(&d);
            std::thread::spawn(move || d.serve_client(stream));
        }
    });
    let hsm = Yhsm1::connect(&socket, options()).unwrap();
    let record = hsm.import_aead(KH_FULL, NonceSource::Given(nonce(2)), &[8; 22]).unwrap();
    let otp = otp_for(&record, 3, 3);
    assert_eq!(hsm.decode_otp(&record, &otp).unwrap().use_ctr, 3);
    // The daemon's side of the connection goes away.
    cut_rx.recv().unwrap().shutdown(std::net::Shutdown::Both).unwrap();
    let e = hsm.decode_otp(&record, &otp).unwrap_err();
    assert_backend(&e);
    assert!(matches!(e, Error::Io { .. }), "{e:?}");
    // The next call connects again.
    assert_eq!(hsm.decode_otp(&record, &otp).unwrap().use_ctr, 3);
    assert!(cut_rx.recv().is_ok(), "a second connection was made");
}
