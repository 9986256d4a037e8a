//! OTP decode throughput on one core, soft backend.
//!
//! `cargo bench -p hsm --bench decode` prints ns per decode and decodes per
//! second for: the whole `SecurityModule::decode_otp` of the soft backend;
//! the pure core's decode with a cached handle key; the same with the handle
//! key schedule rebuilt every time; and the two key schedules alone.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::hint::black_box;
use std::time::{Duration, Instant};

use aes::cipher::KeyInit;
use hsm::soft::format::KdfParams;
use hsm::soft::SoftHsm;
use hsm::{Flags, NonceSource, Password, SecurityModule};
use otp::aead_file::AeadRecord;
use otp::token::TokenFields;
use otp::{HandleKey, KeyHandle, PublicId, TokenCiphertext, YubiKeySecrets};

const KEYS: usize = 1024;

fn measure(name: &str, mut op: impl FnMut(usize)) {
    // Warm up, then run for about two seconds in batches.
    for i in 0..20_000 {
        op(i);
    }
    let mut n = 0usize;
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(2) {
        for _ in 0..10_000 {
            op(n);
            n += 1;
        }
    }
    let secs = start.elapsed().as_secs_f64();
    println!("{name:<58} {:>8.1} ns/op {:>12.0} ops/s", secs * 1e9 / n as f64, n as f64 / secs);
}

fn main() {
    let dir = tempfile::tempdir().unwrap();
    let hsm = SoftHsm::create(&dir.path().join("ks"), &Password::new("bench").unwrap(), KdfParams::INSECURE_FOR_TESTS).unwrap();
    let kh = KeyHandle::new(0x2000);
    hsm.add_handle(kh, Flags::PERSONALIZER | Flags::OTP_DECODE, 256).unwrap();

    // KEYS YubiKeys, each with 8 distinct OTPs: every decode sees a
    // different (AEAD, OTP) pair from the one before.
    let mut cases: Vec<(AeadRecord, TokenCiphertext)> = Vec::new();
    let mut secrets: Vec<YubiKeySecrets> = Vec::new();
    for i in 0..KEYS {
        let id = PublicId::from_number(i as u64 + 1, 6).unwrap();
        let rec = hsm.generate_yubikey_aeads(&[kh], NonceSource::Given(id.aead_nonce().unwrap())).unwrap().remove(0);
        let s = YubiKeySecrets::from_plaintext(&hsm.decrypt_aead(&rec).unwrap()).unwrap();
        for u in 0..8u8 {
            let t =
                TokenFields { uid: *s.uid.expose(), counter: 1, session_use: u, timestamp_low: u16::from(u), ..Default::default() }.build();
            cases.push((rec, t.encrypt(&s.key)));
        }
        secrets.push(s);
    }
    let mask = cases.len() - 1;
    println!("OTP decode, one thread, {} distinct YubiKeys x 8 OTPs, AES-256 handle key", KEYS);

    measure("soft backend SecurityModule::decode_otp (everything)", |i| {
        let (rec, otp) = &cases[i & mask];
        black_box(hsm.decode_otp(rec, otp).unwrap());
    });

    let handle_key = HandleKey::new(&[0x42; 32]).unwrap();
    let pure: Vec<(AeadRecord, TokenCiphertext)> = cases
        .iter()
        .enumerate()
        .map(|(i, (rec, otp))| {
            let s = &secrets[i / 8];
            let aead = handle_key.seal(kh, &rec.nonce, &*s.to_plaintext()).unwrap();
            (AeadRecord { aead, ..*rec }, *otp)
        })
        .collect();
    measure("pure otp::decode::decode_otp, cached handle key schedule", |i| {
        let (rec, otp) = &pure[i & mask];
        black_box(otp::decode::decode_otp(&handle_key, kh, &rec.nonce, &rec.aead, otp).unwrap());
    });
    measure("pure decode_otp, handle key schedule rebuilt per decode", |i| {
        let (rec, otp) = &pure[i & mask];
        let k = HandleKey::new(&[0x42; 32]).unwrap();
        black_box(otp::decode::decode_otp(&k, kh, &rec.nonce, &rec.aead, otp).unwrap());
    });
    measure("key schedule alone: AES-256 handle key (HandleKey::new)", |i| {
        black_box(HandleKey::new(&[i as u8; 32]).unwrap());
    });
    measure("key schedule alone: AES-128 YubiKey key (once per OTP)", |i| {
        black_box(aes::Aes128::new(&[i as u8; 16].into()));
    });
}
