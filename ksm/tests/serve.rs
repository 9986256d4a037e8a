//! `ksm serve` over real HTTP on loopback: the KSM protocol answers, every
//! ERR path, concurrency, deadlines, backend faults and recovery, and the
//! binary serving a directory written by an independent tool.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use appliance_tests::tools;
use hsm::soft::format::KdfParams;
use hsm::soft::SoftHsm;
use hsm::{Flags, NonceSource, Password, SecurityModule};
use ksm::aead_dir::KeyHandleDir;
use ksm::serve::{HttpOptions, Running};
use ksm::store::AeadStore;
use ksm::{AeadLookup, Ksm, LookupError};
use otp::aead_file::AeadRecord;
use otp::token::TokenFields;
use otp::{Aead, HandleKey, KeyHandle, Otp, PublicId, YubiKeySecrets};

/// Decodes, generates and exports.
const KH: KeyHandle = KeyHandle::new(0x2000);
/// Generates and exports, but may not decode.
const KH_NO_DECODE: KeyHandle = KeyHandle::new(0x3000);

/// A parsed HTTP response.
#[derive(Debug)]
struct Reply {
    status: u16,
    body: String,
}

fn request(addr: SocketAddr, method: &str, target: &str, body: &str) -> Reply {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(
        s,
        "{method} {target} HTTP/1.1\r\nHost: ksm\r\nConnection: close\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no header end in {raw:?}"));
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    Reply { status, body: body.to_owned() }
}

fn get(addr: SocketAddr, target: &str) -> Reply {
    request(addr, "GET", target, "")
}

/// The KSM answer for `otp`, checked to be one line ending in a newline.
fn decrypt(addr: SocketAddr, otp: &str) -> (u16, String) {
    let r = get(addr, &format!("/wsapi/decrypt?otp={otp}"));
    let line = r.body.strip_suffix('\n').unwrap_or_else(|| panic!("answer without newline: {:?}", r.body));
    assert!(!line.contains('\n'), "{:?}", r.body);
    (r.status, line.to_owned())
}

fn expected_ok(counter: u16, low: u16, high: u8, session_use: u8) -> String {
    format!("OK counter={counter:04x} low={low:04x} high={high:02x} use={session_use:02x}")
}

fn metric(addr: SocketAddr, series: &str) -> u64 {
    let body = get(addr, "/metrics").body;
    let line = body
        .lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .unwrap_or_else(|| panic!("{series} not in\n{body}"));
    line[series.len() + 1..].parse().unwrap()
}

struct YubiKey {
    id: PublicId,
    secrets: YubiKeySecrets,
}

impl YubiKey {
    fn otp(&self, counter: u16, session_use: u8) -> String {
        self.otp_with_uid(*self.secrets.uid.expose(), counter, session_use)
    }

    fn otp_with_uid(&self, uid: [u8; 6], counter: u16, session_use: u8) -> String {
        let t = TokenFields { uid, counter, session_use, timestamp_low: 0x1234, timestamp_high: 0x56, rnd: 0x789a }.build();
        Otp::new(self.id, t.encrypt(&self.secrets.key)).to_string()
    }
}

struct Site {
    _dir: tempfile::TempDir,
    hsm: Arc<SoftHsm>,
    store_path: std::path::PathBuf,
    keys: Vec<YubiKey>,
}

/// A keystore with a decode handle and a no-decode handle, and a SQLite
/// store holding `n` YubiKeys (ids 1..=n) under the decode handle.
fn site(n: u64) -> Site {
    let dir = tempfile::tempdir().unwrap();
    let hsm = SoftHsm::create(&dir.path().join("ks"), &Password::new("pw").unwrap(), KdfParams::INSECURE_FOR_TESTS).unwrap();
    hsm.import_handles(&[
        (KH, Flags::PERSONALIZER | Flags::OTP_DECODE | Flags::EXPORT, HandleKey::new(&[7; 32]).unwrap()),
        (KH_NO_DECODE, Flags::PERSONALIZER | Flags::EXPORT, HandleKey::new(&[8; 32]).unwrap()),
    ])
    .unwrap();
    let store_path = dir.path().join("aeads.db");
    let store = AeadStore::open(&store_path).unwrap();
    let mut site = Site { _dir: dir, hsm: Arc::new(hsm), store_path, keys: Vec::new() };
    for i in 1..=n {
        let key = site.add_key(&store, i, KH);
        site.keys.push(key);
    }
    site
}

impl Site {
    fn add_key(&self, store: &AeadStore, number: u64, kh: KeyHandle) -> YubiKey {
        let id = PublicId::from_number(number, 6).unwrap();
        let rec = self.hsm.generate_yubikey_aeads(&[kh], NonceSource::Given(id.aead_nonce().unwrap())).unwrap().remove(0);
        store.put(&id, &rec, "test", 0).unwrap();
        YubiKey { id, secrets: YubiKeySecrets::from_plaintext(&self.hsm.decrypt_aead(&rec).unwrap()).unwrap() }
    }

    fn ksm(&self) -> Ksm {
        self.ksm_over(Box::new(AeadStore::open(&self.store_path).unwrap()))
    }

    fn ksm_over(&self, store: Box<dyn AeadLookup>) -> Ksm {
        Ksm::new(self.hsm.clone(), store, vec![KH.into(), KH_NO_DECODE.into()])
    }
}

fn serve(ksm: Ksm, opts: HttpOptions) -> Running {
    ksm::serve::start(Arc::new(ksm), HttpOptions { listen: "127.0.0.1:0".parse().unwrap(), ..opts }).unwrap()
}

#[test]
fn decrypts_over_http_in_every_accepted_request_form() {
    let site = site(3);
    let server = serve(site.ksm(), ksm::serve::default_options());
    let addr = server.local_addr();
    for (i, k) in site.keys.iter().enumerate() {
        let u = u8::try_from(i).unwrap();
        assert_eq!(decrypt(addr, &k.otp(7, u)), (200, expected_ok(7, 0x1234, 0x56, u)));
        // The caps-lock bit travels in the raw counter, as yubikey-ksm prints it.
        assert_eq!(decrypt(addr, &k.otp(0x8007, u)), (200, expected_ok(0x8007, 0x1234, 0x56, u)));
    }
    let otp = site.keys[0].otp(1, 2);
    let want = format!("{}\n", expected_ok(1, 0x1234, 0x56, 2));
    // yubikey-ksm's URL, a POST form, upper case and a percent-escape.
    assert_eq!(get(addr, &format!("/wsapi/decrypt/?otp={otp}")).body, want);
    assert_eq!(request(addr, "POST", "/wsapi/decrypt/", &format!("otp={otp}")).body, want);
    assert_eq!(get(addr, &format!("/wsapi/decrypt?otp={}", otp.to_uppercase())).body, want);
    assert_eq!(get(addr, &format!("/wsapi/decrypt?x=1&otp=%{:x}{}", otp.as_bytes()[0], &otp[1..])).body, want);
    assert_eq!(metric(addr, "ksm_decrypt_requests_total{result=\"ok\"}"), 10);
    assert_eq!(get(addr, "/health").status, 200);
    server.shutdown();
}

#[test]
fn every_err_path_over_http() {
    let site = site(2);
    let store = AeadStore::open(&site.store_path).unwrap();
    // An AEAD under a handle that may not decode.
    let no_decode = site.add_key(&store, 50, KH_NO_DECODE);
    // A tampered AEAD: one bit flipped in the stored blob.
    let tampered = site.add_key(&store, 60, KH);
    let rec = store.get(&tampered.id, KH).unwrap().unwrap();
    let mut bytes = rec.aead.as_bytes().to_vec();
    bytes[3] ^= 0x10;
    let bad = AeadRecord { aead: Aead::from_slice(&bytes).unwrap(), ..rec };
    let other = PublicId::from_number(61, 6).unwrap();
    store.put(&other, &bad, "tampered", 0).unwrap();
    let tampered_otp = {
        let t =
            TokenFields { uid: *tampered.secrets.uid.expose(), counter: 1, session_use: 0, timestamp_low: 0, timestamp_high: 0, rnd: 0 }
                .build();
        Otp::new(other, t.encrypt(&tampered.secrets.key)).to_string()
    };
    let server = serve(site.ksm(), ksm::serve::default_options());
    let addr = server.local_addr();
    let [a, b] = &site.keys[..] else { unreachable!() };

    let cases: Vec<(String, u16, &str, &str)> = vec![
        ("/wsapi/decrypt?otp=".into(), 200, "ERR No OTP provided", "no_otp"),
        ("/wsapi/decrypt".into(), 200, "ERR No OTP provided", "no_otp"),
        ("/wsapi/decrypt?otp=hello".into(), 200, "ERR Invalid OTP format", "invalid_format"),
        (format!("/wsapi/decrypt?otp={}a", a.otp(1, 0)), 200, "ERR Invalid OTP format", "invalid_format"),
        ("/wsapi/decrypt?otp=%zz".into(), 200, "ERR Invalid OTP format", "invalid_format"),
        (format!("/wsapi/decrypt?otp={0}&otp={0}", a.otp(1, 0)), 200, "ERR Invalid OTP format", "invalid_format"),
        (format!("/wsapi/decrypt?otp=vvvvvvvvvvvv{}", &a.otp(1, 0)[12..]), 200, "ERR Unknown yubikey", "unknown_yubikey"),
        // CRC failure: b's token under a's public id.
        (format!("/wsapi/decrypt?otp={}{}", &a.otp(1, 0)[..12], &b.otp(1, 0)[12..]), 200, "ERR Corrupt OTP", "corrupt_otp"),
        // Right key, wrong private id.
        (format!("/wsapi/decrypt?otp={}", a.otp_with_uid([9; 6], 1, 0)), 200, "ERR Corrupt OTP", "corrupt_otp"),
        (format!("/wsapi/decrypt?otp={tampered_otp}"), 503, "ERR Corrupt AEAD", "corrupt_aead"),
        (format!("/wsapi/decrypt?otp={}", no_decode.otp(1, 0)), 503, "ERR Backend error", "backend_error"),
    ];
    for (target, status, line, _) in &cases {
        let r = get(addr, target);
        assert_eq!((r.status, r.body.as_str()), (*status, format!("{line}\n").as_str()), "{target}");
    }
    for label in ["no_otp", "invalid_format", "unknown_yubikey", "corrupt_otp", "corrupt_aead", "backend_error"] {
        let n = cases.iter().filter(|c| c.3 == label).count() as u64;
        assert_eq!(metric(addr, &format!("ksm_decrypt_requests_total{{result=\"{label}\"}}")), n, "{label}");
    }

    // The keystore locked: a backend failure, never a verdict on the OTP.
    site.hsm.lock().unwrap();
    assert_eq!(decrypt(addr, &a.otp(2, 0)), (503, "ERR Backend error".to_owned()));
    let health = get(addr, "/health");
    assert_eq!((health.status, health.body.as_str()), (503, "not ready: security module locked\n"));
    assert_eq!(metric(addr, "ksm_security_module_ready"), 0);
    site.hsm.unlock(&Password::new("pw").unwrap()).unwrap();
    assert_eq!(decrypt(addr, &a.otp(2, 0)), (200, expected_ok(2, 0x1234, 0x56, 0)));
    assert_eq!(metric(addr, "ksm_security_module_ready"), 1);

    // Requests that never reach the KSM.
    assert_eq!(get(addr, "/other").status, 404);
    assert_eq!(get(addr, "/wsapi/2.0/verify?otp=x").status, 404);
    assert_eq!(request(addr, "PUT", "/wsapi/decrypt?otp=x", "").status, 405);
    assert_eq!(request(addr, "DELETE", "/metrics", "").status, 405);
    let long = get(addr, &format!("/wsapi/decrypt?otp={}", "c".repeat(2000)));
    assert_eq!((long.status, long.body.as_str()), (414, "ERR Invalid OTP format\n"));
    let big = request(addr, "POST", "/wsapi/decrypt", &format!("otp={}", "c".repeat(5000)));
    assert_eq!(big.status, 413);
    assert_eq!(metric(addr, "ksm_http_rejected_total{reason=\"not_found\"}"), 2);
    assert_eq!(metric(addr, "ksm_http_rejected_total{reason=\"target_too_long\"}"), 1);
    assert_eq!(metric(addr, "ksm_http_rejected_total{reason=\"body_too_large\"}"), 1);
    assert_eq!(metric(addr, "ksm_http_rejected_total{reason=\"method_not_allowed\"}"), 2);
    server.shutdown();
}

#[test]
fn two_hundred_concurrent_requests_all_answered_correctly() {
    let site = site(40);
    let server = serve(site.ksm(), ksm::serve::default_options());
    let addr = server.local_addr();
    let jobs: Vec<(String, String)> = (0..200u16)
        .map(|i| {
            let k = &site.keys[usize::from(i % 40)];
            let (counter, session_use) = (i / 40 + 1, u8::try_from(i % 7).unwrap());
            (k.otp(counter, session_use), expected_ok(counter, 0x1234, 0x56, session_use))
        })
        .collect();
    let barrier = Arc::new(Barrier::new(jobs.len()));
    let threads: Vec<_> = jobs
        .into_iter()
        .map(|(otp, want)| {
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                // Connect first, so that 200 connections are open at once.
                let mut s = TcpStream::connect(addr).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
                barrier.wait();
                write!(s, "GET /wsapi/decrypt?otp={otp} HTTP/1.1\r\nHost: ksm\r\nConnection: close\r\n\r\n").unwrap();
                let mut raw = String::new();
                s.read_to_string(&mut raw).unwrap();
                assert!(raw.starts_with("HTTP/1.1 200 "), "{raw}");
                assert!(raw.ends_with(&format!("\r\n\r\n{want}\n")), "{otp}: {raw}");
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(metric(addr, "ksm_decrypt_requests_total{result=\"ok\"}"), 200);
    assert!(metric(addr, "ksm_http_connections_total") >= 200);
    server.shutdown();
}

/// An AEAD store that has become very slow.
struct Stalled(AeadStore, Duration);

impl AeadLookup for Stalled {
    fn lookup(&self, public_id: &PublicId, kh: &KeyHandleDir) -> Result<Option<AeadRecord>, LookupError> {
        std::thread::sleep(self.1);
        self.0.lookup(public_id, kh)
    }
}

#[test]
fn a_stalled_backend_is_answered_within_the_deadline() {
    let site = site(1);
    let stalled = Stalled(AeadStore::open(&site.store_path).unwrap(), Duration::from_secs(3));
    let opts = HttpOptions { request_timeout: Duration::from_millis(300), ..ksm::serve::default_options() };
    let server = serve(site.ksm_over(Box::new(stalled)), opts);
    let addr = server.local_addr();
    let t0 = Instant::now();
    assert_eq!(decrypt(addr, &site.keys[0].otp(1, 0)), (503, "ERR Backend error".to_owned()));
    let took = t0.elapsed();
    assert!(took < Duration::from_secs(2), "answered after {took:?}");
    assert_eq!(metric(addr, "ksm_decrypt_requests_total{result=\"timeout\"}"), 1);
    // A request whose headers never finish is cut off too.
    let mut slow = TcpStream::connect(addr).unwrap();
    slow.write_all(b"GET /wsapi/decrypt?otp=").unwrap();
    slow.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut rest = Vec::new();
    let t0 = Instant::now();
    let _ = slow.read_to_end(&mut rest);
    assert!(t0.elapsed() < Duration::from_secs(3), "slow client held the connection for {:?}", t0.elapsed());
    server.shutdown();
}

#[test]
fn a_backend_fault_is_reported_then_recovered_from() {
    let site = site(2);
    let server = serve(site.ksm(), ksm::serve::default_options());
    let addr = server.local_addr();
    let k = &site.keys[0];
    assert_eq!(decrypt(addr, &k.otp(1, 0)).0, 200);

    // The device fails for every operation: ERR Backend error, not Corrupt OTP.
    site.hsm.faults().fail_all();
    for u in 1..=3 {
        assert_eq!(decrypt(addr, &k.otp(1, u)), (503, "ERR Backend error".to_owned()));
    }
    let health = get(addr, "/health");
    assert_eq!(health.status, 503);
    assert!(health.body.contains("not ready"), "{}", health.body);
    assert_eq!(metric(addr, "ksm_security_module_ready"), 0);

    // It comes back: no restart needed.
    site.hsm.faults().clear();
    assert_eq!(decrypt(addr, &k.otp(1, 4)), (200, expected_ok(1, 0x1234, 0x56, 4)));
    assert_eq!(get(addr, "/health").status, 200);

    // A single transient fault fails one request only.
    site.hsm.faults().fail_next(1);
    assert_eq!(decrypt(addr, &k.otp(1, 5)).1, "ERR Backend error");
    assert_eq!(decrypt(addr, &k.otp(1, 6)).0, 200);
    assert_eq!(metric(addr, "ksm_decrypt_requests_total{result=\"backend_error\"}"), 4);
    assert_eq!(metric(addr, "ksm_decrypt_requests_total{result=\"corrupt_otp\"}"), 0);
    assert_eq!(site.hsm.faults().injected(), 4);
    server.shutdown();
}

/// The `ksm serve` binary serves a pyhsm-layout directory written by Python
/// `cryptography` (not by our code) and decodes OTPs made by Debian's
/// `ykgenerate`; a device fault drilled through the fault file is reported
/// and recovered from; SIGTERM stops it cleanly.
#[test]
fn the_binary_serves_foreign_aeads_and_ykgenerate_otps() {
    let python = tools::require_python_cryptography();
    let ykgenerate = tools::require("ykgenerate", "libyubikey-dev");
    let dir = tempfile::tempdir().unwrap();
    let handle_key: [u8; 32] = std::array::from_fn(|i| u8::try_from(i * 7 % 256).unwrap() ^ 0x5a);
    let ks = dir.path().join("ksm.keystore");
    let hsm = SoftHsm::create(&ks, &Password::new("correct horse").unwrap(), KdfParams::INSECURE_FOR_TESTS).unwrap();
    hsm.import_handles(&[(KH, Flags::OTP_DECODE, HandleKey::new(&handle_key).unwrap())]).unwrap();
    drop(hsm);
    std::fs::write(dir.path().join("pw"), "correct horse\n").unwrap();

    // Five YubiKeys, written by the Python oracle under the typed handle "8192".
    let keys: Vec<(String, String, String)> = (1..=5u8)
        .map(|i| {
            let id = PublicId::from_number(0x0102_0304_0000 + u64::from(i), 6).unwrap().to_string();
            (id, hex::encode([i, 2, 3, 4, 5, 6]), hex::encode([i.wrapping_mul(17); 16]))
        })
        .collect();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/oracles/pyhsm_aead_dir.py");
    let aeads = dir.path().join("aeads");
    let mut py = Command::new(python)
        .arg(&script)
        .arg(&aeads)
        .arg("8192")
        .arg(hex::encode(handle_key))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let input: String = keys.iter().map(|(id, uid, key)| format!("{id} {uid} {key}\n")).collect();
    py.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    let out = py.wait_with_output().unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8(out.stdout).unwrap().lines().count(), 5);

    let fault = dir.path().join("pull-the-device");
    let mut child = Command::new(env!("CARGO_BIN_EXE_ksm"))
        .args(["serve", "--key-handles", "8192", "--listen", "127.0.0.1:0"])
        .arg("--keystore")
        .arg(&ks)
        .arg("--password-file")
        .arg(dir.path().join("pw"))
        .arg("--aead-dir")
        .arg(&aeads)
        .env("OTP_SOFTHSM_FAULT_FILE", &fault)
        .env("RUST_LOG", "warn")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let addr: SocketAddr = loop {
        let mut line = String::new();
        assert!(stderr.read_line(&mut line).unwrap() > 0, "ksm serve exited before listening");
        if let Some(rest) = line.split("serving http://").nth(1) {
            break rest.split('/').next().unwrap().parse().unwrap();
        }
    };
    // Keep draining stderr so the server never blocks on a full pipe.
    let log = Arc::new(Mutex::new(String::new()));
    let drain = {
        let log = log.clone();
        std::thread::spawn(move || {
            for line in stderr.lines().map_while(Result::ok) {
                log.lock().unwrap().push_str(&line);
                log.lock().unwrap().push('\n');
            }
        })
    };

    let ykotp = |key: &str, uid: &str, counter: u16, session_use: u8| {
        let out = Command::new(&ykgenerate)
            .args([key, uid, &format!("{counter:04x}"), "c0a8", "3e", &format!("{session_use:02x}")])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    };
    for (n, (id, uid, key)) in keys.iter().enumerate() {
        let counter = 0x10 + u16::try_from(n).unwrap();
        let otp = format!("{id}{}", ykotp(key, uid, counter, 3));
        assert_eq!(decrypt(addr, &otp), (200, expected_ok(counter, 0xc0a8, 0x3e, 3)), "{otp}");
    }

    let (id, uid, key) = &keys[0];
    std::fs::write(&fault, b"").unwrap();
    assert_eq!(decrypt(addr, &format!("{id}{}", ykotp(key, uid, 2, 0))), (503, "ERR Backend error".to_owned()));
    assert_eq!(get(addr, "/health").status, 503);
    std::fs::remove_file(&fault).unwrap();
    assert_eq!(decrypt(addr, &format!("{id}{}", ykotp(key, uid, 2, 1))), (200, expected_ok(2, 0xc0a8, 0x3e, 1)));
    assert_eq!(get(addr, "/health").status, 200);

    let term = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(term.success());
    let status = child.wait().unwrap();
    assert!(status.success(), "ksm serve exited with {status}");
    drain.join().unwrap();
    let log = log.lock().unwrap();
    assert!(log.contains("decrypt failed") && log.contains("Input/output error"), "the fault was not logged:\n{log}");
}

/// The shipped systemd unit runs a command line the binary accepts: its
/// flags parse, and it gets as far as reading the (here missing) config.
#[test]
fn the_systemd_unit_command_line_is_accepted() {
    let unit = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd/otp-ksm.service")).unwrap();
    let exec = unit.lines().find_map(|l| l.strip_prefix("ExecStart=")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_str().unwrap();
    let args: Vec<String> = exec.split_whitespace().skip(1).map(|a| a.replace("%d", root).replace("/etc/otp-appliance", root)).collect();
    assert_eq!(args[0], "serve");
    let out = Command::new(env!("CARGO_BIN_EXE_ksm")).args(&args).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains(&format!("{root}/ksm.toml: No such file")), "{stderr}");
}

/// A mistyped store path is an error at start, not an empty store that
/// answers "Unknown yubikey" to everyone.
#[test]
fn serve_refuses_a_missing_store_and_a_wrong_password() {
    let site = site(1);
    let dir = site._dir.path();
    std::fs::write(dir.join("pw"), "pw\n").unwrap();
    std::fs::write(dir.join("wrong"), "nope\n").unwrap();
    let run = |store: &Path, pw: &str| {
        let out = Command::new(env!("CARGO_BIN_EXE_ksm"))
            .args(["serve", "--key-handles", "0x2000", "--listen", "127.0.0.1:0"])
            .arg("--keystore")
            .arg(dir.join("ks"))
            .arg("--password-file")
            .arg(dir.join(pw))
            .arg("--store")
            .arg(store)
            .output()
            .unwrap();
        assert!(!out.status.success());
        String::from_utf8(out.stderr).unwrap()
    };
    let missing = dir.join("typo.db");
    let e = run(&missing, "pw");
    assert!(e.contains("typo.db"), "{e}");
    assert!(!missing.exists(), "serve created {}", missing.display());
    let e = run(&site.store_path, "wrong");
    assert!(e.contains("wrong password"), "{e}");
}
