//! The YubiHSM 1 emulator binary on a real pty: raw frames from Rust, and
//! python pyhsm 1.2.1 (Python 2.7) as an independent client — its API and
//! its tools `yhsm-generate-keys`, `yhsm-decrypt-aead` and `yhsm-yubikey-ksm` — with every AEAD
//! and decode compared against the soft backend.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use appliance_tests::yhsm1::Emulator;
use hmac::{Hmac, Mac};
use hsm::password::Password;
use hsm::soft::format::KdfParams;
use hsm::soft::SoftHsm;
use hsm::yhsm1::proto::{nonce_bytes, AeadResponse, Frame, FrameReader, Request, Response, Status, RESYNC};
use hsm::{Flags, NonceSource, SecurityModule};
use otp::aead_file::AeadFile;
use otp::token::TokenFields;
use otp::{AeadNonce, HandleKey, KeyHandle, Otp, PublicId, TokenCiphertext, YubiKeyKey};
use rustix::termios::{tcgetattr, tcsetattr, OptionalActions, SpecialCodeIndex};
use serde_json::{json, Value};
use zeroize::Zeroizing;

/// Handle 1: every flag. Handle 0x2000: decode only. Same key under both, as
/// pyhsm's documentation advises for a generating and a validating stick.
const KEY1: &str = "000102030405060708090a0b0c0d0e0f";
const KEYS_JSON: &str = r#"{"1": "000102030405060708090a0b0c0d0e0f", "8192": "000102030405060708090a0b0c0d0e0f"}"#;
const MASTER_KEY: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

const INSTALL_PYHSM: &str = "~/.pyenv/versions/2.7.18/bin/python -m pip install pyhsm==1.2.1.post1 python-daemon sqlalchemy \
                             (pyhsm 1.2.1 is published as 1.2.1.post1; it brings pyserial and pycrypto, which needs gcc and \
                             the Python 2.7 headers of pyenv's build); scripts/test.sh does this";

/// The Python 2.7 with pyhsm: `$PYHSM_PYTHON`, else pyenv's 2.7.18.
fn python2() -> PathBuf {
    let python = std::env::var_os("PYHSM_PYTHON").map(PathBuf::from).unwrap_or_else(|| {
        let home = std::env::var_os("HOME").expect("HOME is not set");
        Path::new(&home).join(".pyenv/versions/2.7.18/bin/python")
    });
    assert!(python.exists(), "Python 2.7 not found at {}: install Python 2.7.18 with pyenv, then {INSTALL_PYHSM}", python.display());
    let check = Command::new(&python)
        .args(["-c", "import pyhsm, serial, Crypto, daemon, sqlalchemy; assert pyhsm.__version__.startswith('1.2.1'), pyhsm.__version__"])
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "pyhsm 1.2.1 is not usable under {}: {}\ninstall it with {INSTALL_PYHSM}",
        python.display(),
        String::from_utf8_lossy(&check.stderr)
    );
    python
}

/// A pyhsm console script (`yhsm-generate-keys`, ...) beside that python.
fn pyhsm_tool(python: &Path, name: &str) -> PathBuf {
    let tool = python.with_file_name(name);
    assert!(tool.exists(), "{} is missing: install pyhsm with {INSTALL_PYHSM}", tool.display());
    tool
}

fn driver(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/pyhsm").join(name)
}

/// A `yhsm1-emulator` on [`KEYS_JSON`], handle 0x2000 decode-only, with
/// `extra` arguments.
fn emulator(extra: &[&str]) -> Emulator {
    let mut args = vec!["--flags", "0x2000=otp-decode"];
    args.extend_from_slice(extra);
    Emulator::start(Path::new(env!("CARGO_BIN_EXE_yhsm1-emulator")), KEYS_JSON, &args)
}

/// Open the emulator's pty like a serial device: raw, and reads give up after
/// 10 s of silence (a dead emulator fails the test instead of hanging it).
fn open_port(emu: &Emulator) -> Port {
    let file = std::fs::OpenOptions::new().read(true).write(true).open(emu.path()).unwrap();
    let mut t = tcgetattr(&file).unwrap();
    t.make_raw();
    t.special_codes[SpecialCodeIndex::VMIN] = 0;
    t.special_codes[SpecialCodeIndex::VTIME] = 100;
    tcsetattr(&file, OptionalActions::Now, &t).unwrap();
    Port { file, reader: FrameReader::new() }
}

struct Port {
    file: std::fs::File,
    reader: FrameReader,
}

impl Port {
    fn read_frame(&mut self) -> Frame {
        loop {
            if let Some(f) = self.reader.next_frame() {
                return f.unwrap();
            }
            let mut buf = [0u8; 256];
            let n = self.file.read(&mut buf).unwrap();
            assert!(n > 0, "the emulator did not answer");
            self.reader.push(&buf[..n]);
        }
    }

    fn ask(&mut self, req: &Request) -> Response {
        self.file.write_all(&req.encode().unwrap().encode()).unwrap();
        let frame = self.read_frame();
        Response::decode(req.command(), &frame).unwrap()
    }
}

fn aead_of(resp: Response) -> AeadResponse {
    match resp {
        Response::AeadGenerate(a) | Response::BufferAeadGenerate(a) | Response::RandomAeadGenerate(a) => a,
        other => panic!("not an AEAD response: {other:?}"),
    }
}

/// The soft backend holding KEY1 under handles 1 and 0x2000 (the flags
/// needed to import, decode and export).
fn soft() -> (SoftHsm, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let hsm =
        SoftHsm::create(&dir.path().join("keystore"), &Password::new("pw for tests").unwrap(), KdfParams::INSECURE_FOR_TESTS).unwrap();
    let flags = Flags::AEAD_GENERATE | Flags::USER_NONCE | Flags::OTP_DECODE | Flags::EXPORT;
    let key = hex::decode(KEY1).unwrap();
    hsm.import_handles(&[
        (KeyHandle::new(1), flags, HandleKey::new(&key).unwrap()),
        (KeyHandle::new(0x2000), flags, HandleKey::new(&key).unwrap()),
    ])
    .unwrap();
    (hsm, dir)
}

/// A YubiKey: its secrets, their AEAD under `kh` made by the soft backend,
/// and OTPs from it.
struct YubiKey {
    public_id: [u8; 6],
    key: [u8; 16],
    uid: [u8; 6],
}

impl YubiKey {
    fn secrets(&self) -> Vec<u8> {
        [&self.key[..], &self.uid[..]].concat()
    }
    fn otp(&self, counter: u16, session_use: u8) -> TokenCiphertext {
        TokenFields { uid: self.uid, counter, timestamp_low: 0xbeef, timestamp_high: 0x12, session_use, rnd: 0x4242 }
            .build()
            .encrypt(&YubiKeyKey::new(self.key))
    }
}

const YK: YubiKey = YubiKey { public_id: [0, 0, 0, 0, 0x10, 0x01], key: [0x5a; 16], uid: [1, 2, 3, 4, 5, 6] };

#[test]
fn raw_frames_over_the_pty() {
    let emu = emulator(&[]);
    let mut port = open_port(&emu);
    // Resync first, as clients do, then the basic commands.
    port.file.write_all(&RESYNC).unwrap();
    assert_eq!(port.ask(&Request::Echo(b"ekoeko".to_vec())), Response::Echo(b"ekoeko".to_vec()));
    let Response::SystemInfo(info) = port.ask(&Request::SystemInfoQuery) else { panic!("no system info") };
    assert_eq!((info.protocol_version, info.version_major), (1, 1));
    let Response::RandomGenerate(r1) = port.ask(&Request::RandomGenerate(95)) else { panic!() };
    let Response::RandomGenerate(r2) = port.ask(&Request::RandomGenerate(95)) else { panic!() };
    assert_eq!(r1.len(), 95);
    assert_ne!(r1, r2);

    // A frame written one byte at a time is answered once.
    let frame = Request::Echo(vec![0x0d, 0x0a, 0x00, 0xff]).encode().unwrap().encode();
    for b in frame.iter() {
        port.file.write_all(std::slice::from_ref(b)).unwrap();
        port.file.flush().unwrap();
    }
    assert_eq!(
        Response::decode(hsm::yhsm1::proto::Command::Echo, &port.read_frame()).unwrap(),
        Response::Echo(vec![0x0d, 0x0a, 0x00, 0xff])
    );

    // A half-sent frame, then a resync: the link recovers.
    port.file.write_all(&[0x20, 0x01, 0x01, 0x02]).unwrap();
    port.file.write_all(&RESYNC).unwrap();
    assert_eq!(port.ask(&Request::Echo(b"again".to_vec())), Response::Echo(b"again".to_vec()));

    // AEAD_GENERATE equals the soft backend's AEAD; AEAD_DECRYPT_CMP checks it.
    let (soft, _dir) = soft();
    let nonce = [9, 8, 7, 6, 5, 4];
    let plain = b"twenty-two byte secret".to_vec();
    let a = aead_of(port.ask(&Request::AeadGenerate { nonce, kh: 1, data: Zeroizing::new(plain.clone()) }));
    assert_eq!(a.status, Status::Ok);
    let record = soft.import_aead(KeyHandle::new(1), NonceSource::Given(AeadNonce::new(nonce)), &plain).unwrap();
    assert_eq!(a.aead, record.aead.as_bytes());
    let cmp = |port: &mut Port, clear: &[u8], aead: &[u8]| {
        port.ask(&Request::AeadDecryptCmp { nonce, kh: 1, data: Zeroizing::new([clear, aead].concat()) }).status().unwrap()
    };
    assert_eq!(cmp(&mut port, &plain, &a.aead), Status::Ok);
    let mut wrong = plain.clone();
    wrong[0] ^= 1;
    assert_eq!(cmp(&mut port, &wrong, &a.aead), Status::Mismatch);
    let mut tampered = a.aead.clone();
    tampered[3] ^= 1;
    assert_eq!(cmp(&mut port, &plain, &tampered), Status::AeadInvalid);

    // OTP decode: an OTP built by the otp crate against the soft backend's AEAD.
    let record = soft.import_aead(KeyHandle::new(0x2000), NonceSource::Given(AeadNonce::new(YK.public_id)), &YK.secrets()).unwrap();
    let otp = YK.otp(0x0102, 3);
    let decode = |port: &mut Port, kh: u32, otp: &TokenCiphertext, aead: &[u8]| {
        port.ask(&Request::AeadYubikeyOtpDecode { public_id: YK.public_id, kh, otp: *otp.as_bytes(), aead: aead.try_into().unwrap() })
    };
    let expected = soft.decode_otp(&record, &otp).unwrap();
    assert_eq!(
        decode(&mut port, 0x2000, &otp, record.aead.as_bytes()),
        Response::AeadYubikeyOtpDecode {
            public_id: YK.public_id,
            kh: 0x2000,
            use_ctr: expected.use_ctr,
            session_ctr: expected.session_ctr,
            timestamp_high: expected.timestamp_high,
            timestamp_low: expected.timestamp_low,
            status: Status::Ok,
        }
    );
    assert_eq!(expected.use_ctr, 0x0102);
    let mut bad = *otp.as_bytes();
    bad[5] ^= 0x80;
    assert_eq!(decode(&mut port, 0x2000, &TokenCiphertext::new(bad), record.aead.as_bytes()).status(), Some(Status::OtpInvalid));
    let mut tampered = record.aead.as_bytes().to_vec();
    tampered[0] ^= 1;
    assert_eq!(decode(&mut port, 0x2000, &otp, &tampered).status(), Some(Status::AeadInvalid));

    // Permissions: the decode-only handle may not make AEADs; unknown handles.
    let a = aead_of(port.ask(&Request::AeadGenerate { nonce, kh: 0x2000, data: Zeroizing::new(plain.clone()) }));
    assert_eq!((a.status, a.aead.len()), (Status::FunctionDisabled, 0));
    let a = aead_of(port.ask(&Request::RandomAeadGenerate { nonce, kh: 7, len: 22 }));
    assert_eq!(a.status, Status::KeyHandleInvalid);
    let a = aead_of(port.ask(&Request::RandomAeadGenerate { nonce, kh: 1, len: 65 }));
    assert_eq!(a.status, Status::InvalidParameter);

    // The nonce counter: the value before the increment.
    let Response::NonceGet { nonce: n0, .. } = port.ask(&Request::NonceGet(0)) else { panic!() };
    port.ask(&Request::NonceGet(3));
    let Response::NonceGet { status, nonce: n1 } = port.ask(&Request::NonceGet(0)) else { panic!() };
    assert_eq!(status, Status::Ok);
    let volatile = |n: [u8; 6]| u32::from_le_bytes([n[0], n[1], n[2], n[3]]);
    assert_eq!(volatile(n1), volatile(n0) + 3);
    assert_eq!(n1[4..], n0[4..]);
}

#[test]
fn locked_until_the_master_key() {
    let emu = emulator(&["--locked", "--master-key", MASTER_KEY]);
    let mut port = open_port(&emu);
    let gen = |port: &mut Port| aead_of(port.ask(&Request::RandomAeadGenerate { nonce: [0; 6], kh: 1, len: 22 })).status;
    assert_eq!(gen(&mut port), Status::KeyStorageLocked);
    // Echo still works while locked.
    assert_eq!(port.ask(&Request::Echo(vec![1])), Response::Echo(vec![1]));
    let master: [u8; 32] = hex::decode(MASTER_KEY).unwrap().try_into().unwrap();
    let mut wrong = master;
    wrong[31] ^= 1;
    assert_eq!(port.ask(&Request::KeyStoreDecrypt(Zeroizing::new(wrong))), Response::KeyStoreDecrypt(Status::KeyStorageLocked));
    assert_eq!(gen(&mut port), Status::KeyStorageLocked);
    assert_eq!(port.ask(&Request::KeyStoreDecrypt(Zeroizing::new(master))), Response::KeyStoreDecrypt(Status::Ok));
    assert_eq!(gen(&mut port), Status::Ok);
    // A wrong key locks it again.
    port.ask(&Request::KeyStoreDecrypt(Zeroizing::new(wrong)));
    assert_eq!(gen(&mut port), Status::KeyStorageLocked);
}

/// Run `api.py` with `ops` against the emulator; one result per op.
fn pyhsm_api(python: &Path, emu: &Emulator, ops: &Value) -> Vec<Value> {
    let mut child = Command::new(python)
        .arg(driver("api.py"))
        .arg(emu.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(ops.to_string().as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "pyhsm failed: {}", String::from_utf8_lossy(&out.stderr));
    let results: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(results.len(), ops.as_array().unwrap().len());
    results
}

fn ok(v: &Value) -> &Value {
    v.get("ok").unwrap_or_else(|| panic!("pyhsm reported an error: {v}"))
}

fn status(v: &Value) -> u64 {
    v.get("status").and_then(Value::as_u64).unwrap_or_else(|| panic!("expected a YubiHSM status error, got {v}"))
}

#[test]
fn pyhsm_api_agrees_with_the_soft_backend() {
    let python = python2();
    let emu = emulator(&[]);
    let (soft, _dir) = soft();
    let record = soft.import_aead(KeyHandle::new(0x2000), NonceSource::Given(AeadNonce::new(YK.public_id)), &YK.secrets()).unwrap();
    let otp = YK.otp(0x0005, 0x0b);
    let mut bad_otp = *otp.as_bytes();
    bad_otp[0] ^= 1;
    let samples: [([u8; 6], Vec<u8>); 3] =
        [([0, 0, 0, 0, 0, 1], b"A".to_vec()), ([0xc0, 0xff, 0xee, 0, 0, 7], YK.secrets()), ([1, 2, 3, 4, 5, 6], vec![0xa5; 64])];
    let all_bytes: Vec<u8> = (0..=255).collect();
    let mut ops = vec![
        json!({"op": "echo", "data": hex::encode(&all_bytes[..86])}),
        json!({"op": "info"}),
        json!({"op": "random", "len": 64}),
        json!({"op": "random", "len": 64}),
        json!({"op": "validate_aead_otp", "public_id": hex::encode(YK.public_id), "otp": hex::encode(otp.as_bytes()), "kh": 0x2000, "aead": hex::encode(record.aead.as_bytes())}),
        json!({"op": "validate_aead_otp", "public_id": hex::encode(YK.public_id), "otp": hex::encode(bad_otp), "kh": 0x2000, "aead": hex::encode(record.aead.as_bytes())}),
        json!({"op": "generate_aead_simple", "nonce": "000000000001", "kh": 0x2000, "data": "41"}),
        json!({"op": "hmac_sha1", "kh": 1, "data": hex::encode(b"Hi There")}),
        json!({"op": "nonce", "increment": 0}),
    ];
    // pyhsm's validate_aead sends cleartext ‖ AEAD in one frame: at most
    // 86 bytes, so only the short samples.
    let first = ops.len();
    for (nonce, data) in &samples {
        ops.push(json!({"op": "generate_aead_simple", "nonce": hex::encode(nonce), "kh": 1, "data": hex::encode(data)}));
    }
    for (nonce, data) in &samples[..2] {
        let aead = soft.import_aead(KeyHandle::new(1), NonceSource::Given(AeadNonce::new(*nonce)), data).unwrap();
        ops.push(json!({"op": "validate_aead", "nonce": hex::encode(nonce), "kh": 1, "cleartext": hex::encode(data), "aead": hex::encode(aead.aead.as_bytes())}));
        let mut wrong = data.clone();
        wrong[0] ^= 1;
        ops.push(json!({"op": "validate_aead", "nonce": hex::encode(nonce), "kh": 1, "cleartext": hex::encode(wrong), "aead": hex::encode(aead.aead.as_bytes())}));
    }
    let r = pyhsm_api(&python, &emu, &Value::Array(ops));

    assert_eq!(ok(&r[0]).as_str().unwrap(), hex::encode(&all_bytes[..86]));
    assert_eq!(ok(&r[1])["protocol"], 1);
    assert_eq!(ok(&r[1])["system_uid"], hex::encode(hsm::yhsm1::emulator::SYSTEM_UID));
    assert_eq!(ok(&r[2]).as_str().unwrap().len(), 128);
    assert_ne!(ok(&r[2]), ok(&r[3]));
    // validate_aead_otp gives the counters the soft backend decodes.
    let expected = soft.decode_otp(&record, &otp).unwrap();
    assert_eq!(
        ok(&r[4]),
        &json!({"use_ctr": expected.use_ctr, "session_ctr": expected.session_ctr, "ts_high": expected.timestamp_high, "ts_low": expected.timestamp_low})
    );
    assert_eq!((expected.use_ctr, expected.session_ctr), (5, 0x0b));
    assert_eq!(status(&r[5]), 0x83, "a garbled OTP is YSM_OTP_INVALID");
    assert_eq!(status(&r[6]), 0x89, "the decode-only handle may not make AEADs");
    let mut mac = Hmac::<sha1::Sha1>::new_from_slice(&hex::decode(KEY1).unwrap()).unwrap();
    mac.update(b"Hi There");
    assert_eq!(ok(&r[7]).as_str().unwrap(), hex::encode(mac.finalize().into_bytes()));
    assert_eq!(ok(&r[8])["pu_count"], 1);
    // generate_aead_simple equals the soft backend byte for byte, and pyhsm's
    // validate_aead accepts the soft backend's AEAD.
    for (i, (nonce, data)) in samples.iter().enumerate() {
        let soft_aead = soft.import_aead(KeyHandle::new(1), NonceSource::Given(AeadNonce::new(*nonce)), data).unwrap();
        let got = ok(&r[first + i]);
        assert_eq!(got["nonce"], hex::encode(nonce));
        assert_eq!(got["kh"], 1);
        assert_eq!(got["aead"].as_str().unwrap(), hex::encode(soft_aead.aead.as_bytes()), "sample {i}");
    }
    for i in 0..2 {
        let at = first + samples.len() + 2 * i;
        assert_eq!(ok(&r[at]), &Value::Bool(true), "pyhsm validates the soft AEAD of sample {i}");
        assert_eq!(ok(&r[at + 1]), &Value::Bool(false), "pyhsm refuses a wrong cleartext for sample {i}");
    }
}
#[test]
fn pyhsm_unlocks_a_locked_emulator() {
    let python = python2();
    let emu = emulator(&["--locked", "--master-key", MASTER_KEY]);
    let wrong = format!("{}00", &MASTER_KEY[..62]);
    let gen = json!({"op": "generate_aead_simple", "nonce": "000000000001", "kh": 1, "data": "41"});
    let ops = json!([gen, {"op": "unlock", "key": wrong}, gen, {"op": "unlock", "key": MASTER_KEY}, gen]);
    let r = pyhsm_api(&python, &emu, &ops);
    assert_eq!(status(&r[0]), 0x8a);
    assert_eq!(status(&r[1]), 0x8a);
    assert_eq!(status(&r[2]), 0x8a);
    assert_eq!(ok(&r[3]), &Value::Bool(true));
    assert_eq!(ok(&r[4])["nonce"], "000000000001");
}

/// pyhsm's tools: `yhsm-generate-keys` makes AEADs of secrets generated in
/// the emulator, which the soft backend opens; `yhsm-yubikey-ksm` serves
/// decodes of OTPs made from those secrets, equal to the soft backend's.
#[test]
fn pyhsm_tools_generate_keys_and_ksm() {
    let python = python2();
    let emu = emulator(&[]);
    let (soft, _dir) = soft();
    let work = tempfile::tempdir().unwrap();
    let aeads = work.path().join("aeads");
    std::fs::create_dir(&aeads).unwrap();

    let out = Command::new(&python)
        .arg(pyhsm_tool(&python, "yhsm-generate-keys"))
        .arg("-D")
        .arg(emu.path())
        .arg("-O")
        .arg(&aeads)
        .args(["-c", "3", "--key-handles", "1", "--start-public-id", "4096"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "yhsm-generate-keys failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // Three files, at aeads/1/<pairs>/<modhex public id>, v1 format.
    let mut secrets = Vec::new();
    for n in 4096u64..4099 {
        let public_id = PublicId::from_number(n, 6).unwrap();
        let path = aeads.join(otp::aead_file::relative_path("1", &public_id));
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let AeadFile::V1(record) = AeadFile::parse(&bytes).unwrap() else { panic!("{} is not a v1 AEAD file", path.display()) };
        assert_eq!(record.key_handle, KeyHandle::new(1));
        assert_eq!(record.nonce, public_id.aead_nonce().unwrap());
        assert_eq!(record.aead.len(), 30);
        // The soft backend (same handle key) opens it: key(16) ‖ uid(6).
        let plain = soft.decrypt_aead(&record).unwrap();
        assert_eq!(plain.len(), 22);
        secrets.push((public_id, record, plain));
    }
    assert!(secrets[0].2 != secrets[1].2 && secrets[1].2 != secrets[2].2, "each YubiKey gets fresh secrets");

    // pyhsm's own software decryption (yhsm-decrypt-aead, given the handle
    // key) reads the same secrets out of the emulator's AEADs.
    let out = Command::new(&python)
        .arg(pyhsm_tool(&python, "yhsm-decrypt-aead"))
        .args(["--aes-key", KEY1, "--format", "yubikey-csv"])
        .arg(&aeads)
        .output()
        .unwrap();
    assert!(out.status.success(), "yhsm-decrypt-aead failed: {}", String::from_utf8_lossy(&out.stderr));
    let csv = String::from_utf8(out.stdout).unwrap();
    assert_eq!(csv.lines().count(), 3, "{csv}");
    for (public_id, _, plain) in &secrets {
        let row = format!(",{},{},{},000000000000,", public_id.to_modhex(), hex::encode(&plain[16..]), hex::encode(&plain[..16]));
        assert!(csv.lines().any(|l| l.contains(&row)), "no row {row} in yhsm-decrypt-aead's output:\n{csv}");
    }

    // The KSM on a free local port, reading the same AEAD directory.
    let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap().local_addr().unwrap().port();
    let ksm_log = work.path().join("ksm.log");
    let ksm = Command::new(&python)
        .arg(pyhsm_tool(&python, "yhsm-yubikey-ksm"))
        .arg("-D")
        .arg(emu.path())
        .arg("-B")
        .arg(&aeads)
        .args(["--key-handles", "1", "--addr", "127.0.0.1", "--port", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&ksm_log).unwrap())
        .spawn()
        .unwrap();
    let _ksm = KillOnDrop(ksm);

    let (public_id, record, plain) = &secrets[1];
    let key: [u8; 16] = plain[..16].try_into().unwrap();
    let yk = YubiKey { public_id: *record.nonce.as_bytes(), key, uid: plain[16..].try_into().unwrap() };
    let token = yk.otp(0x0007, 2);
    let otp_text = format!("{}{}", public_id.to_modhex(), token.to_modhex());
    assert!(Otp::parse(&otp_text).is_ok());
    let expected = soft.decode_otp(record, &token).unwrap();

    let body = http_get(port, &format!("/wsapi/decrypt?otp={otp_text}"), &ksm_log);
    assert_eq!(body, format!("{}\n", expected.ksm_line()));
    assert_eq!(otp::OtpDecode::parse_ksm_line(&body), Some(expected));
    // A token under another key: the emulator refuses it, the KSM says ERR.
    let forged = YubiKey { key: [0x33; 16], ..yk }.otp(7, 2);
    let body = http_get(port, &format!("/wsapi/decrypt?otp={}{}", public_id.to_modhex(), forged.to_modhex()), &ksm_log);
    assert_eq!(body, "ERR\n");
    let unknown = PublicId::from_number(99, 6).unwrap();
    let body = http_get(port, &format!("/wsapi/decrypt?otp={}{}", unknown.to_modhex(), token.to_modhex()), &ksm_log);
    assert_eq!(body, "ERR Unknown public_id\n");
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// GET `path` from the KSM, waiting (bounded) for it to listen.
fn http_get(port: u16, path: &str, log: &Path) -> String {
    let mut stream = None;
    for _ in 0..300 {
        match TcpStream::connect((Ipv4Addr::LOCALHOST, port)) {
            Ok(s) => {
                stream = Some(s);
                break;
            }
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(100)),
        }
    }
    let mut stream =
        stream.unwrap_or_else(|| panic!("yhsm-yubikey-ksm never listened: {}", std::fs::read_to_string(log).unwrap_or_default()));
    stream.set_read_timeout(Some(std::time::Duration::from_secs(30))).unwrap();
    write!(stream, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or_else(|| panic!("not an HTTP response: {response:?}"));
    assert!(head.starts_with("HTTP/1.0 200"), "{head}");
    body.to_owned()
}

#[test]
fn nonce_bytes_layout_matches_pyhsm() {
    // pyhsm reads volatile = LE32(n[0:4]), pu_count = LE16(n[4:6]).
    assert_eq!(nonce_bytes(0x0403_0201, 0x0605), [1, 2, 3, 4, 5, 6]);
}
