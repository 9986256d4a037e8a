//! Independent oracles: the core must agree with other implementations.
//!
//! - Debian's libyubikey-dev tools (`ykgenerate`, `ykparse`, `modhex`), the C
//!   reference implementation of Yubico OTP tokens and modhex;
//! - Python's `cryptography` AESCCM for the YubiHSM 1 AEAD, driven through
//!   `tests/oracles/aesccm.py` (one process per test, a request per line).
//!
//! Inputs are random. The seed is printed (visible when a test fails) and
//! `ORACLE_SEED=<n>` replays it. A missing tool fails the test with the
//! package to install: these tests never pass by skipping.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests may panic")]

use std::collections::HashMap;
use std::ffi::OsStr;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::thread;

use appliance_tests::tools;
use otp::decode::decode_otp;
use otp::token::TokenFields;
use otp::yhsm2::Yhsm2OtpAead;
use otp::{modhex, Aead, AeadNonce, Error, HandleKey, KeyHandle, Otp, PublicId, Token, TokenCiphertext, YubiKeyKey};
use rand::rngs::{SmallRng, SysRng};
use rand::{RngExt, SeedableRng, TryRng};

const YK_PACKAGE: &str = "libyubikey-dev";

fn seeded(test: &str) -> SmallRng {
    let seed = match std::env::var("ORACLE_SEED") {
        Ok(s) => s.parse::<u64>().expect("ORACLE_SEED must be a decimal u64"),
        Err(_) => SysRng.try_next_u64().expect("OS randomness"),
    };
    println!("{test}: seed {seed} (replay with ORACLE_SEED={seed})");
    SmallRng::seed_from_u64(seed)
}

fn run(program: &Path, args: &[&OsStr]) -> Output {
    Command::new(program).args(args).output().unwrap_or_else(|e| panic!("cannot run {}: {e}", program.display()))
}

fn stdout_line(out: &Output) -> String {
    String::from_utf8(out.stdout.clone()).expect("UTF-8 output").trim_end_matches('\n').to_owned()
}

/// Random token fields; a quarter of the counters are edge values.
fn random_fields(rng: &mut SmallRng) -> TokenFields {
    let counter = match rng.random_range(0..8u8) {
        0 => 0,
        1 => 0x7fff,
        2 => 0x8000 | rng.random::<u16>(),
        3 => 0xffff,
        _ => rng.random(),
    };
    TokenFields {
        uid: rng.random(),
        counter,
        timestamp_low: rng.random(),
        timestamp_high: rng.random(),
        session_use: rng.random(),
        rnd: rng.random(),
    }
}

fn assert_fields(t: &Token, f: &TokenFields, ctx: &str) {
    assert_eq!(t.uid().expose(), &f.uid, "{ctx}: uid");
    assert_eq!(t.raw_counter(), f.counter, "{ctx}: counter");
    assert_eq!(t.timestamp_low(), f.timestamp_low, "{ctx}: timestamp low");
    assert_eq!(t.timestamp_high(), f.timestamp_high, "{ctx}: timestamp high");
    assert_eq!(t.session_use(), f.session_use, "{ctx}: session use");
}

// ------------------------------------------------------------ libyubikey

/// `ykgenerate` makes OTPs for random secrets; our core decrypts them, the
/// CRC passes and every field comes back. Debian's 1.13 ignores a 7th (rnd)
/// argument and draws rnd itself, so rnd is not compared.
#[test]
fn ykgenerate_tokens_decrypt_with_our_core() {
    let ykgenerate = tools::require("ykgenerate", YK_PACKAGE);
    let mut rng = seeded("ykgenerate_tokens_decrypt_with_our_core");
    for i in 0..32 {
        let key: [u8; 16] = rng.random();
        let f = random_fields(&mut rng);
        let args = [
            hex::encode(key),
            hex::encode(f.uid),
            format!("{:04x}", f.counter),
            format!("{:04x}", f.timestamp_low),
            format!("{:02x}", f.timestamp_high),
            format!("{:02x}", f.session_use),
        ];
        let out = run(&ykgenerate, &args.iter().map(OsStr::new).collect::<Vec<_>>());
        let ctx = format!("case {i}: ykgenerate {}", args.join(" "));
        assert!(out.status.success(), "{ctx}: {}", String::from_utf8_lossy(&out.stderr));
        let otp = stdout_line(&out);
        assert_eq!(otp.len(), 32, "{ctx}: output {otp:?}");
        let ciphertext = TokenCiphertext::from_slice(&modhex::decode(&otp).expect("modhex output")).unwrap();
        let token = Token::decrypt(&YubiKeyKey::new(key), &ciphertext).unwrap_or_else(|e| panic!("{ctx}: our core rejects {otp}: {e}"));
        assert_fields(&token, &f, &ctx);
        assert_eq!(token.caps_lock(), f.counter & 0x8000 != 0, "{ctx}: caps lock");
        // With the OTP as a YubiKey types it, behind a public id.
        let public_id = PublicId::from_bytes(&rng.random::<[u8; 6]>()).unwrap();
        let typed = Otp::parse(&format!("{public_id}{otp}")).unwrap();
        assert_eq!(typed.token(), &ciphertext, "{ctx}: token split");
    }
}

/// The `ykparse` report of one token.
struct Parsed {
    crc_ok: bool,
    fields: HashMap<String, String>,
    text: String,
}

impl Parsed {
    fn number(&self, label: &str) -> u64 {
        let v = self.fields.get(label).unwrap_or_else(|| panic!("ykparse printed no `{label}`:\n{}", self.text));
        v.split_whitespace().next().and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("bad `{label}`: {v:?}"))
    }
}

fn ykparse(program: &Path, key: &[u8; 16], token: &str) -> Parsed {
    let out = run(program, &[OsStr::new(&hex::encode(key)), OsStr::new(token)]);
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    // "crc" appears twice: the stored field in "Struct:", then the residue in
    // "Derived:". Keep the first of each label, and the residue apart.
    let mut fields = HashMap::new();
    let mut residue = None;
    for (k, v) in text.lines().filter_map(|l| l.split_once(':')) {
        let (k, v) = (k.trim().to_owned(), v.trim().to_owned());
        if k == "crc" && fields.contains_key("crc") {
            residue = Some(v);
        } else {
            fields.entry(k).or_insert(v);
        }
    }
    let crc_ok = fields.get("crc check").map(String::as_str) == Some("ok");
    assert_eq!(residue.as_deref() == Some("F0B8"), crc_ok, "ykparse residue vs its crc check:\n{text}");
    assert_eq!(out.status.success(), crc_ok, "ykparse exit status vs its own crc check:\n{text}");
    Parsed { crc_ok, fields, text }
}

/// Tokens we build and encrypt are accepted by `ykparse` with the same
/// fields; and for tampered tokens, we reject exactly when `ykparse` does.
#[test]
fn our_tokens_pass_ykparse() {
    let ykparse_bin = tools::require("ykparse", YK_PACKAGE);
    let mut rng = seeded("our_tokens_pass_ykparse");
    let mut rejected = 0;
    let rounds = 32;
    for i in 0..rounds {
        let key: [u8; 16] = rng.random();
        let f = random_fields(&mut rng);
        let token = f.build();
        let ciphertext = token.encrypt(&YubiKeyKey::new(key));
        let ctx = format!("case {i}: key {} token {}", hex::encode(key), ciphertext.to_modhex());

        // Every other case is typed behind a public id: ykparse then warns and
        // uses the last 32 characters, as our Otp::parse splits.
        let prefix = if i % 2 == 1 { PublicId::from_bytes(&rng.random::<[u8; 6]>()).unwrap().to_modhex() } else { String::new() };
        let typed = format!("{prefix}{}", ciphertext.to_modhex());
        assert_eq!(Otp::parse(&typed).unwrap().token(), &ciphertext, "{ctx}");
        let p = ykparse(&ykparse_bin, &key, &typed);
        assert!(p.crc_ok, "{ctx}: ykparse rejects our token:\n{}", p.text);
        if !prefix.is_empty() {
            assert!(p.text.contains(&format!("ignoring prefix: {prefix}")), "{ctx}: no overlong warning:\n{}", p.text);
        }
        let uid = p.fields.get("uid").map(|u| u.replace(' ', "")).unwrap_or_default();
        assert_eq!(uid, hex::encode(f.uid), "{ctx}: uid\n{}", p.text);
        assert_eq!(p.number("counter"), u64::from(f.counter), "{ctx}: counter\n{}", p.text);
        assert_eq!(p.number("timestamp (low)"), u64::from(f.timestamp_low), "{ctx}: low\n{}", p.text);
        assert_eq!(p.number("timestamp (high)"), u64::from(f.timestamp_high), "{ctx}: high\n{}", p.text);
        assert_eq!(p.number("session use"), u64::from(f.session_use), "{ctx}: use\n{}", p.text);
        assert_eq!(p.number("random"), u64::from(f.rnd), "{ctx}: rnd\n{}", p.text);
        assert_eq!(p.number("crc"), u64::from(token.crc()), "{ctx}: crc\n{}", p.text);
        assert_eq!(p.number("cleaned counter"), u64::from(f.counter & 0x7fff), "{ctx}: cleaned counter\n{}", p.text);
        let caps = if f.counter & 0x8000 != 0 { "yes" } else { "no" };
        assert_eq!(p.fields.get("triggered by caps lock").map(String::as_str), Some(caps), "{ctx}\n{}", p.text);

        // Tamper with one bit: both sides must reach the same verdict (the
        // CRC-16 lets a random block through with probability 2^-16, so the
        // verdicts are compared, not assumed).
        let mut bent = *ciphertext.as_bytes();
        bent[rng.random_range(0..16)] ^= 1 << rng.random_range(0..8);
        let bent = TokenCiphertext::new(bent);
        let ours = Token::decrypt(&YubiKeyKey::new(key), &bent);
        let theirs = ykparse(&ykparse_bin, &key, &bent.to_modhex());
        assert_eq!(ours.is_ok(), theirs.crc_ok, "{ctx}: tampered {} verdicts differ", bent.to_modhex());
        if let Err(e) = ours {
            assert_eq!(e, Error::TokenCrc);
            rejected += 1;
        }
    }
    assert!(rejected >= rounds - 1, "only {rejected} of {rounds} tampered tokens were rejected");
}

/// The `modhex` tool and `otp::modhex` agree on random data, both ways, in
/// hex mode (`-h`) and raw mode.
#[test]
fn modhex_cli_agrees() {
    let tool = tools::require("modhex", YK_PACKAGE);
    let mut rng = seeded("modhex_cli_agrees");
    for i in 0..40 {
        let len = if i == 0 { 1 } else { rng.random_range(1..=48usize) };
        let mut bytes = vec![0u8; len];
        rng.fill(&mut bytes[..]);
        let ours = modhex::encode(&bytes);
        let ctx = format!("case {i}: {}", hex::encode(&bytes));

        let enc = run(&tool, &[OsStr::new("-h"), OsStr::new(&hex::encode(&bytes))]);
        assert!(enc.status.success(), "{ctx}");
        assert_eq!(stdout_line(&enc), ours, "{ctx}: modhex -h");
        let dec = run(&tool, &[OsStr::new("-d"), OsStr::new("-h"), OsStr::new(&ours)]);
        assert_eq!(stdout_line(&dec), hex::encode(&bytes), "{ctx}: modhex -d -h");
        assert_eq!(modhex::decode(&ours).unwrap(), bytes, "{ctx}: our decode");

        // Raw mode: the tool prints the decoded bytes as they are.
        let dec_raw = run(&tool, &[OsStr::new("-d"), OsStr::new(&ours)]);
        assert_eq!(dec_raw.stdout, bytes, "{ctx}: modhex -d");

        // Raw input goes through argv, so it cannot hold NUL, and it must not
        // look like an option.
        let raw: Vec<u8> = bytes.iter().map(|&b| if b == 0 { 1 } else { b }).collect();
        let raw: Vec<u8> = if raw[0] == b'-' { [b"x", &raw[1..]].concat() } else { raw };
        let enc_raw = run(&tool, &[OsStr::from_bytes(&raw)]);
        assert_eq!(stdout_line(&enc_raw), modhex::encode(&raw), "{ctx}: modhex <raw>");
    }
}

// ------------------------------------------------------------- AES-CCM

/// One AESCCM oracle process: send every request, read every answer.
fn python_ccm(requests: &[String]) -> HashMap<String, Result<Vec<u8>, String>> {
    let python = tools::require_python_cryptography();
    let script: PathBuf = Path::new(env!("CARGO_MANIFEST_DIR")).join("oracles/aesccm.py");
    assert!(script.is_file(), "{} is missing", script.display());
    let mut child = Command::new(python)
        .arg(&script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start python3");
    let mut stdin = child.stdin.take().unwrap();
    let input = requests.join("\n") + "\n";
    let writer = thread::spawn(move || stdin.write_all(input.as_bytes()));
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    assert!(out.status.success(), "aesccm.py failed:\n{}", String::from_utf8_lossy(&out.stderr));
    let mut answers = HashMap::new();
    for line in String::from_utf8(out.stdout).unwrap().lines() {
        let mut parts = line.split(' ');
        let (id, status, value) = (parts.next().unwrap(), parts.next().unwrap(), parts.next().unwrap_or(""));
        let answer = match status {
            "ok" => Ok(hex::decode(value).unwrap()),
            _ => Err(value.to_owned()),
        };
        answers.insert(id.to_owned(), answer);
    }
    assert_eq!(answers.len(), requests.len(), "one answer per request");
    answers
}

fn request(op: &str, id: &str, key: &[u8], kh: KeyHandle, nonce: &AeadNonce, data: &[u8]) -> String {
    format!("{op} {id} {} {} {} {}", hex::encode(key), kh.get(), hex::encode(nonce.as_bytes()), hex::encode(data))
}

fn flip_random_bit(rng: &mut SmallRng, bytes: &[u8]) -> Vec<u8> {
    let mut out = bytes.to_vec();
    let i = rng.random_range(0..out.len());
    out[i] ^= 1 << rng.random_range(0..8);
    out
}

struct CcmCase {
    key: Vec<u8>,
    kh: KeyHandle,
    nonce: AeadNonce,
    plaintext: Vec<u8>,
    ours: Aead,
}

/// AES-128/192/256, plaintexts of 1, 16, 22, 64 bytes and two random lengths:
/// Python's AESCCM with the pyhsm nonce layout and our `HandleKey` produce the
/// same AEAD, each opens the other's, and each rejects a tampered AEAD and a
/// wrong key handle.
#[test]
fn aesccm_agrees_with_python_cryptography() {
    let mut rng = seeded("aesccm_agrees_with_python_cryptography");
    let mut cases = Vec::new();
    for key_len in [16usize, 24, 32] {
        let lengths = [1usize, 16, 22, 64, rng.random_range(1..=64), rng.random_range(1..=64)];
        for len in lengths {
            let mut key = vec![0u8; key_len];
            rng.fill(&mut key[..]);
            let mut plaintext = vec![0u8; len];
            rng.fill(&mut plaintext[..]);
            let kh = KeyHandle::new(rng.random());
            let nonce = AeadNonce::new(rng.random());
            let ours = HandleKey::new(&key).unwrap().seal(kh, &nonce, &plaintext).unwrap();
            cases.push(CcmCase { key, kh, nonce, plaintext, ours });
        }
    }
    let mut requests = Vec::new();
    let mut tampered = Vec::new();
    for (i, c) in cases.iter().enumerate() {
        let bent = flip_random_bit(&mut rng, c.ours.as_bytes());
        let other_kh = KeyHandle::new(c.kh.get() ^ (1 << rng.random_range(0..32)));
        requests.push(request("seal", &format!("seal{i}"), &c.key, c.kh, &c.nonce, &c.plaintext));
        requests.push(request("open", &format!("open{i}"), &c.key, c.kh, &c.nonce, c.ours.as_bytes()));
        requests.push(request("open", &format!("bent{i}"), &c.key, c.kh, &c.nonce, &bent));
        requests.push(request("open", &format!("otherkh{i}"), &c.key, other_kh, &c.nonce, c.ours.as_bytes()));
        tampered.push(bent);
    }
    let answers = python_ccm(&requests);

    for (i, c) in cases.iter().enumerate() {
        let ctx = format!("case {i}: AES-{} kh {:?} pt {} bytes", c.key.len() * 8, c.kh, c.plaintext.len());
        let theirs = answers[&format!("seal{i}")].clone().expect("python seals");
        assert_eq!(hex::encode(&theirs), hex::encode(c.ours.as_bytes()), "{ctx}: sealed AEADs differ");
        assert_eq!(answers[&format!("open{i}")].as_deref(), Ok(&c.plaintext[..]), "{ctx}: python opens ours");
        assert_eq!(
            answers[&format!("bent{i}")].as_ref().map_err(String::as_str).err(),
            Some("InvalidTag"),
            "{ctx}: python opens a tampered AEAD"
        );
        assert_eq!(
            answers[&format!("otherkh{i}")].as_ref().map_err(String::as_str).err(),
            Some("InvalidTag"),
            "{ctx}: python ignores the key handle"
        );

        let hk = HandleKey::new(&c.key).unwrap();
        let theirs = Aead::from_slice(&theirs).unwrap();
        assert_eq!(&hk.open(c.kh, &c.nonce, &theirs).unwrap()[..], &c.plaintext[..], "{ctx}: we open python's");
        let bent = Aead::from_slice(&flip_random_bit(&mut rng, theirs.as_bytes())).unwrap();
        assert_eq!(hk.open(c.kh, &c.nonce, &bent), Err(Error::AeadIntegrity), "{ctx}: we open a tampered AEAD");
        let bent_ours = Aead::from_slice(&tampered[i]).unwrap();
        assert_eq!(hk.open(c.kh, &c.nonce, &bent_ours), Err(Error::AeadIntegrity), "{ctx}: we open the bit-flipped AEAD");
    }
}

/// The whole chain from foreign parts: Python seals a YubiKey's secrets,
/// `ykgenerate` makes its OTP, and our `decode_otp` returns the counters,
/// both from the YubiHSM 1 AEAD and from its YubiHSM 2 form.
#[test]
fn full_chain_from_foreign_parts() {
    let ykgenerate = tools::require("ykgenerate", YK_PACKAGE);
    let mut rng = seeded("full_chain_from_foreign_parts");
    struct Chain {
        hsm_key: [u8; 32],
        kh: KeyHandle,
        public_id: PublicId,
        fields: TokenFields,
        otp: String,
    }
    let mut chains = Vec::new();
    let mut requests = Vec::new();
    for i in 0..8 {
        let hsm_key: [u8; 32] = rng.random();
        let kh = KeyHandle::new(rng.random());
        let public_id = PublicId::from_bytes(&rng.random::<[u8; 6]>()).unwrap();
        let yk_key: [u8; 16] = rng.random();
        let fields = random_fields(&mut rng);
        let args = [
            hex::encode(yk_key),
            hex::encode(fields.uid),
            format!("{:04x}", fields.counter),
            format!("{:04x}", fields.timestamp_low),
            format!("{:02x}", fields.timestamp_high),
            format!("{:02x}", fields.session_use),
        ];
        let out = run(&ykgenerate, &args.iter().map(OsStr::new).collect::<Vec<_>>());
        assert!(out.status.success());
        let otp = format!("{public_id}{}", stdout_line(&out));
        let secrets = [&yk_key[..], &fields.uid[..]].concat();
        let nonce = public_id.aead_nonce().unwrap();
        requests.push(request("seal", &format!("chain{i}"), &hsm_key, kh, &nonce, &secrets));
        chains.push(Chain { hsm_key, kh, public_id, fields, otp });
    }
    let answers = python_ccm(&requests);
    for (i, c) in chains.iter().enumerate() {
        let ctx = format!("chain {i}: otp {}", c.otp);
        let aead_bytes = answers[&format!("chain{i}")].clone().expect("python seals");
        let aead = Aead::from_slice(&aead_bytes).unwrap();
        let otp = Otp::parse(&c.otp).unwrap();
        assert_eq!(otp.public_id(), c.public_id);
        let hk = HandleKey::new(&c.hsm_key).unwrap();
        let nonce = otp.public_id().aead_nonce().unwrap();
        let d = decode_otp(&hk, c.kh, &nonce, &aead, otp.token()).unwrap_or_else(|e| panic!("{ctx}: {e}"));
        assert_eq!(
            (d.use_ctr, d.session_ctr, d.timestamp_high, d.timestamp_low),
            (c.fields.counter, c.fields.session_use, c.fields.timestamp_high, c.fields.timestamp_low),
            "{ctx}"
        );
        assert_eq!(
            d.ksm_line(),
            format!(
                "OK counter={:04x} low={:04x} high={:02x} use={:02x}",
                c.fields.counter, c.fields.timestamp_low, c.fields.timestamp_high, c.fields.session_use
            ),
            "{ctx}"
        );

        // The YubiHSM 2 form: nonce || AEAD, with the key handle as nonce id.
        let y2 = Yhsm2OtpAead::parse(&[nonce.as_bytes(), &aead_bytes[..]].concat()).unwrap();
        let rec = y2.to_record(c.kh.get());
        assert_eq!(decode_otp(&hk, rec.key_handle, &rec.nonce, &rec.aead, otp.token()), Ok(d), "{ctx}: YubiHSM 2 form");
        let wrong = KeyHandle::new(c.kh.get().wrapping_add(1));
        assert_eq!(decode_otp(&hk, wrong, &nonce, &aead, otp.token()), Err(Error::AeadIntegrity), "{ctx}: wrong handle");
    }
}
