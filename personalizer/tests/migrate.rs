//! `personalizer import` and `personalizer decrypt-aead` end to end: the
//! laptop's keystore (officers' sessions, quorum approvals for plaintext
//! outputs), real files, the real binary; AEADs checked by the Python
//! `cryptography` oracle, OTPs made by Debian's `ykgenerate`.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;

use common::{Laptop, KEYSTORE_PASSWORD};
use hsm::soft::SoftHsm;
use hsm::{Flags, Password, SecurityModule};
use ksm::aead_dir::AeadDir;
use ksm::Ksm;
use otp::aead_file::{relative_path, AeadFile};
use otp::{HandleKey, KeyHandle, PublicId};

/// Where `name` is on `PATH`; a missing oracle fails the test, naming the
/// Debian package to install (as `appliance_tests::tools::require`).
fn require(name: &str, package: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.metadata().is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0))
        .unwrap_or_else(|| panic!("{name} not found on PATH: apt-get install {package}"))
}

/// `python3` with `cryptography`'s AESCCM.
fn require_python_cryptography() -> PathBuf {
    let python = require("python3", "python3");
    let out = Command::new(&python).args(["-c", "from cryptography.hazmat.primitives.ciphers.aead import AESCCM"]).output().unwrap();
    assert!(out.status.success(), "python3 cannot import cryptography's AESCCM: apt-get install python3-cryptography");
    python
}

/// `personalizer …` in officer alice's session.
fn alice(l: &Laptop, args: &[&str]) -> Output {
    l.run(Some("alice"), args)
}

fn ok(out: Output) -> String {
    assert!(out.status.success(), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// A failed run that did not panic: its stderr.
fn failed(out: Output) -> String {
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(!out.status.success(), "should have failed; stdout: {}", String::from_utf8_lossy(&out.stdout));
    assert!(!stderr.contains("panicked"), "{stderr}");
    stderr
}

/// The laptop (officers alice and bob logged in) whose keystore holds the
/// given handles, with AES keys the test knows; and an empty work
/// directory for the test's files.
fn laptop(handles: &[(u32, &str, [u8; 32])]) -> (Laptop, PathBuf) {
    let l = Laptop::with_officers();
    let new: Vec<_> = handles
        .iter()
        .map(|(kh, flags, key)| (KeyHandle::new(*kh), flags.parse::<Flags>().unwrap(), HandleKey::new(key).unwrap()))
        .collect();
    open_keystore(&l).import_handles(&new).unwrap();
    let work = l.path("work");
    std::fs::create_dir(&work).unwrap();
    (l, work)
}

/// The laptop's keystore, unlocked.
fn open_keystore(l: &Laptop) -> Arc<SoftHsm> {
    Arc::new(SoftHsm::open_unlocked(&l.keystore(), &Password::new(KEYSTORE_PASSWORD).unwrap()).unwrap())
}

/// A YubiKey's public id, uid and AES key, all hex but the id (modhex).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Yk {
    id: String,
    uid: String,
    key: String,
}

fn yubikeys(n: u64) -> Vec<Yk> {
    (1..=n)
        .map(|i| {
            let b = u8::try_from(i).unwrap();
            Yk {
                id: PublicId::from_number(0x00de_ad00_0000 + i * 0x0101, 6).unwrap().to_string(),
                uid: hex::encode([0xa0 ^ b, 0x11, b.wrapping_mul(29), 0x5c, b, 0xe7]),
                key: hex::encode(std::array::from_fn::<u8, 16, _>(|j| b.wrapping_mul(37) ^ u8::try_from(j * 11).unwrap())),
            }
        })
        .collect()
}

/// A `# ykksm 1` export as YK-KSM writes it: serialnr, publicname,
/// internalname, aeskey, lockcode, created, accessed.
fn ykksm_row(seq: u64, yk: &Yk) -> String {
    format!("{},{},{},{},000000000000,2010-06-18T12:00:00,", 100_000 + seq, yk.id, yk.uid, yk.key)
}

/// Every AEAD file (path, key handle, nonce, AEAD) checked by the Python
/// `cryptography` oracle against `key‖uid`, under the handle key `handle_key`.
fn oracle_opens(files: &[(PathBuf, u32, [u8; 32], String)]) {
    let python = require_python_cryptography();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/oracles/aesccm.py");
    let mut requests = String::new();
    for (i, (path, kh, handle_key, _)) in files.iter().enumerate() {
        // Read the v1 file by hand: marker, version, LE32 key handle, nonce, AEAD.
        let bytes = std::fs::read(path).unwrap();
        assert_eq!(&bytes[..14], b"YubiHSM AEAD\n\x01", "{}", path.display());
        assert_eq!(u32::from_le_bytes(bytes[14..18].try_into().unwrap()), *kh);
        assert_eq!(bytes.len(), 54);
        requests.push_str(&format!(
            "open {i} {} {kh} {} {}\n",
            hex::encode(handle_key),
            hex::encode(&bytes[18..24]),
            hex::encode(&bytes[24..])
        ));
    }
    let mut py = Command::new(python).arg(script).stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
    py.stdin.take().unwrap().write_all(requests.as_bytes()).unwrap();
    let out = py.wait_with_output().unwrap();
    assert!(out.status.success());
    let answers = String::from_utf8(out.stdout).unwrap();
    let answers: Vec<&str> = answers.lines().collect();
    assert_eq!(answers.len(), files.len());
    for (i, ((path, _, _, want), answer)) in files.iter().zip(answers).enumerate() {
        assert_eq!(answer, format!("{i} ok {want}"), "{}", path.display());
    }
}

fn aead_path(base: &Path, kh_dir: &str, id: &str) -> PathBuf {
    base.join(relative_path(kh_dir, &PublicId::from_modhex(id).unwrap()))
}

fn files_below(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

const KEY_A: [u8; 32] = [0x3c; 32];
const KEY_B: [u8; 32] = *b"another handle key, 32 bytes....";

#[test]
fn ykksm_import_then_decrypt_gives_back_the_secrets() {
    let (l, work) = laptop(&[(0x2000, "import,export", KEY_A), (8193, "import", KEY_B)]);
    let d = |p: &str| work.join(p).to_str().unwrap().to_owned();
    let yks = yubikeys(4);
    let mut csv = vec!["# ykksm 1".to_owned(), "# exported for the migration test".to_owned()];
    csv.extend(yks.iter().enumerate().map(|(i, yk)| ykksm_row(i as u64, yk)));
    csv.push(format!("9,cccccccccccc,{},{},000000000000,,", yks[0].uid, yks[0].key));
    std::fs::write(d("keys.csv"), csv.join("\n") + "\n").unwrap();

    let (csv_path, aeads) = (d("keys.csv"), d("aeads"));
    let import = ["import", "--ykksm-csv", &csv_path, "--key-handles", "0x2000,8193", "--out", &aeads];
    // The gate: importing needs an officer's session; nothing is written.
    let e = failed(l.run(None, &import));
    assert!(e.contains("needs a session"), "{e}");
    assert!(!work.join("aeads").exists());
    let report = ok(alice(&l, &import));
    assert!(report.contains("added 8, already present 0, conflicts 0, errors 0"), "{report}");
    // pyhsm's layout under each handle as typed, the public id as nonce; the
    // independent oracle opens every file to the CSV's key‖uid.
    let mut files = Vec::new();
    for yk in &yks {
        for (typed, kh, key) in [("0x2000", 0x2000, KEY_A), ("8193", 8193, KEY_B)] {
            let path = aead_path(&work.join("aeads"), typed, &yk.id);
            assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
            let AeadFile::V1(rec) = AeadFile::parse(&std::fs::read(&path).unwrap()).unwrap() else { panic!("not v1") };
            assert_eq!(rec.nonce.as_bytes(), PublicId::from_modhex(&yk.id).unwrap().as_bytes());
            files.push((path, kh, key, format!("{}{}", yk.key, yk.uid)));
        }
    }
    assert_eq!(files_below(&work.join("aeads")).len(), 8, "public id 0 is skipped");
    oracle_opens(&files);
    // Importing again changes nothing.
    let again = ok(alice(&l, &import));
    assert!(again.contains("added 0, already present 8, conflicts 0, errors 0"), "{again}");

    // decrypt-aead --format yubikey-csv: the original secrets, a new 0600 file.
    let decrypt = |extra: &[&str]| alice(&l, &[&["decrypt-aead", "--aead-dir", &aeads][..], extra].concat());
    // A plaintext file: --output with its own plaintext-output approval.
    let to_file = |extra: &[&str], output: &str| {
        let token = l.plaintext_approval(&[output]);
        decrypt(&[extra, &["--output", output, "--approval", &token]].concat())
    };
    // The gate: without an approval no plaintext file is written.
    let e = failed(decrypt(&["--key-handle", "0x2000", "--format", "yubikey-csv", "--output", &d("gated.csv")]));
    assert!(e.contains("quorum approval is required for plaintext-output"), "{e}");
    assert!(!work.join("gated.csv").exists());
    let out = ok(to_file(&["--key-handle", "0x2000", "--format", "yubikey-csv"], &d("secrets.csv")));
    assert!(out.contains("4 YubiKey"), "{out}");
    for yk in &yks {
        assert!(!out.contains(&yk.key) && !out.contains(&yk.uid), "secrets on stdout: {out}");
    }
    assert_eq!(std::fs::metadata(d("secrets.csv")).unwrap().permissions().mode() & 0o777, 0o600);
    let text = std::fs::read_to_string(d("secrets.csv")).unwrap();
    let mut numbers = Vec::new();
    let mut got = Vec::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split(',').collect();
        assert_eq!(f.len(), 11, "{line}");
        assert_eq!(&f[4..], ["000000000000", "", "", "", "", "", ""]);
        numbers.push(f[0].parse::<u64>().unwrap());
        got.push(Yk { id: f[1].to_owned(), uid: f[2].to_owned(), key: f[3].to_owned() });
    }
    assert_eq!(numbers, [1, 2, 3, 4]);
    got.sort();
    let mut want = yks.clone();
    want.sort();
    assert_eq!(got, want);

    // --format raw with a public-id filter: `<id>,<key hex><uid hex>`.
    ok(to_file(&["--key-handle", "0x2000", "--format", "raw", "--public-id", &yks[2].id], &d("raw.txt")));
    assert_eq!(std::fs::read_to_string(d("raw.txt")).unwrap(), format!("{},{}{}\n", yks[2].id, yks[2].key, yks[2].uid));
    ok(to_file(&["--key-handle", "0x2000", "--format", "raw", "--start-public-id", &yks[1].id], &d("range.txt")));
    assert_eq!(std::fs::read_to_string(d("range.txt")).unwrap().lines().count(), 3);

    // A handle without the export flag is refused, and nothing is written.
    let e = failed(to_file(&["--key-handle", "8193", "--format", "yubikey-csv"], &d("no.csv")));
    assert!(e.contains("not permitted to decrypt AEADs") && e.contains("export"), "{e}");
    assert!(!work.join("no.csv").exists());

    // Output rules: never an existing file, never through a symbolic link,
    // never without --output (even approved); nothing left behind.
    std::fs::write(d("taken.csv"), "keep me").unwrap();
    let e = failed(to_file(&["--key-handle", "0x2000", "--format", "yubikey-csv"], &d("taken.csv")));
    assert!(e.contains("exists already"), "{e}");
    assert_eq!(std::fs::read_to_string(d("taken.csv")).unwrap(), "keep me");
    std::os::unix::fs::symlink(d("elsewhere.csv"), d("link.csv")).unwrap();
    let e = failed(to_file(&["--key-handle", "0x2000", "--format", "raw"], &d("link.csv")));
    assert!(e.contains("symbolic link"), "{e}");
    assert!(!work.join("elsewhere.csv").exists());
    let e = failed(decrypt(&["--key-handle", "0x2000", "--format", "yubikey-csv"]));
    assert!(e.contains("--output"), "{e}");
    let out = to_file(&["--key-handle", "0x2000", "--format", "yubikey-csv"], "-");
    assert!(out.stdout.is_empty());
    assert!(failed(out).contains("never written to stdout"));
    let e = failed(to_file(&["--key-handle", "0x2000", "--format", "raw", "--public-id", "cccccccccccv"], &d("none.txt")));
    assert!(e.contains("no AEAD of key handle"), "{e}");
    assert!(!work.join("none.txt").exists());
    let mut names: Vec<String> = std::fs::read_dir(&work).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    names.sort();
    assert_eq!(names, ["aeads", "keys.csv", "link.csv", "range.txt", "raw.txt", "secrets.csv", "taken.csv"]);

    // A tampered AEAD is an error with its path; the others still come out.
    let victim = aead_path(&work.join("aeads"), "0x2000", &yks[0].id);
    let mut bytes = std::fs::read(&victim).unwrap();
    bytes[30] ^= 1;
    std::fs::write(&victim, bytes).unwrap();
    let out = to_file(&["--key-handle", "0x2000", "--format", "raw"], &d("partial.txt"));
    let e = failed(out);
    assert!(e.contains(&victim.display().to_string()) && e.contains("AEAD invalid"), "{e}");
    assert_eq!(std::fs::read_to_string(d("partial.txt")).unwrap().lines().count(), 3);
    let e = failed(to_file(&["--key-handle", "0x2000", "--format", "raw", "--fail-fast"], &d("ff.txt")));
    assert!(e.contains("--fail-fast"), "{e}");
    assert!(!work.join("ff.txt").exists());
}

#[test]
fn malformed_ykksm_exports_are_reported_with_line_numbers() {
    let (l, work) = laptop(&[(0x2000, "import", KEY_A), (0x2001, "otp-decode", KEY_B)]);
    let d = |p: &str| work.join(p).to_str().unwrap().to_owned();
    let import = |csv: &str, kh: &str| {
        std::fs::write(d("in.csv"), csv).unwrap();
        alice(&l, &["import", "--ykksm-csv", &d("in.csv"), "--key-handles", kh, "--out", &d("aeads")])
    };
    let yks = yubikeys(2);
    let good = ykksm_row(1, &yks[0]);

    for header in ["# ykksm 2", "serial,publicname,uid,key", "", " # ykksm 1"] {
        let e = failed(import(&format!("{header}\n{good}\n"), "0x2000"));
        assert!(e.contains("first line must be exactly `# ykksm 1`") && e.contains("nothing imported"), "{e}");
        assert!(!work.join("aeads").exists());
    }

    let secret = "ffeeddccbbaa99887766554433221100";
    let rows = [
        "# ykksm 1".to_owned(),
        good.clone(),
        format!("2,{},{},{}zz,000000000000,,", yks[1].id, yks[1].uid, &secret[..30]), // line 3: bad hex key
        format!("3,{},{}", yks[1].id, yks[1].uid),                                    // line 4: too few columns
        format!("4,{},0102030405gg,{secret},000000000000,,", yks[1].id),              // line 5: bad hex uid
        format!("5,not-modhex,{},{secret},,,", yks[1].uid),                           // line 6: bad public id
        String::new(),
        format!("6,{},{},{secret}", yks[1].id, "01020304050607"), // line 8: uid too long
    ];
    let out = import(&(rows.join("\n") + "\n"), "0x2000");
    assert_eq!(out.status.code(), Some(1), "bad rows are skipped and reported: exit 1");
    let stdout = String::from_utf8(out.stdout.clone()).unwrap();
    let e = failed(out);
    assert!(stdout.contains("added 1, already present 0, conflicts 0, errors 5"), "{stdout}");
    for (line, what) in [
        (3, "AES key must be 32 hex digits"),
        (4, "expected at least 4 comma-separated fields"),
        (5, "uid must be"),
        (6, "public id \"not-modhex\""),
        (8, "uid must be"),
    ] {
        assert!(e.lines().any(|l| l.contains(&format!("line {line}:")) && l.contains(what)), "line {line} ({what}) missing in:\n{e}");
    }
    assert!(!e.contains("ffeedd") && !e.contains("0102030405"), "secrets echoed: {e}");
    assert_eq!(files_below(&work.join("aeads")), [aead_path(&work.join("aeads"), "0x2000", &yks[0].id)]);

    // A handle that may not wrap imported secrets is refused up front.
    std::fs::remove_dir_all(work.join("aeads")).unwrap();
    let e = failed(import(&format!("# ykksm 1\n{good}\n"), "0x2001"));
    assert!(e.contains("not permitted to wrap imported secrets"), "{e}");
    assert!(!work.join("aeads").exists());
    let e = failed(import(&format!("# ykksm 1\n{good}\n"), "0x2002"));
    assert!(e.contains("does not exist"), "{e}");
}

/// Key rotation: AEADs generated under A are re-wrapped under B inside the
/// module; B's AEADs decode `ykgenerate` OTPs to the right counters.
#[test]
fn rotation_rewraps_under_a_new_handle() {
    let ykgenerate = require("ykgenerate", "libyubikey-dev");
    let (l, work) = laptop(&[(0x1001, "personalizer", KEY_A), (0x1002, "import,otp-decode", KEY_B), (0x1003, "otp-decode", KEY_B)]);
    let d = |p: &str| work.join(p).to_str().unwrap().to_owned();
    // The public-id ledger of generate lives apart, in the laptop's home.
    ok(alice(&l, &["generate", "--count", "3", "--start-public-id", "1", "--key-handles", "0x1001", "--out", &d("a")]));

    let rewrap = |extra: &[&str]| {
        alice(&l, &[&["decrypt-aead", "--aead-dir", &d("a"), "--key-handle", "0x1001", "--format", "aead"][..], extra].concat())
    };
    let out = ok(rewrap(&["--rewrap-to", "0x1002", "--out", &d("b")]));
    assert!(out.contains("added 3, already present 0, conflicts 0, errors 0"), "{out}");
    // No plaintext anywhere: only the two AEAD trees.
    let mut names: Vec<String> = std::fs::read_dir(&work).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    names.sort();
    assert_eq!(names, ["a", "b"]);
    let again = ok(rewrap(&["--rewrap-to", "0x1002", "--out", &d("b")]));
    assert!(again.contains("added 0, already present 3"), "{again}");

    // The secrets, for programming "YubiKeys" (A carries the export flag).
    let token = l.plaintext_approval(&[&d("s.csv")]);
    ok(alice(
        &l,
        &[
            "decrypt-aead",
            "--aead-dir",
            &d("a"),
            "--key-handle",
            "0x1001",
            "--format",
            "yubikey-csv",
            "--output",
            &d("s.csv"),
            "--approval",
            &token,
        ],
    ));
    let secrets: BTreeMap<String, (String, String)> = std::fs::read_to_string(d("s.csv"))
        .unwrap()
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            (f[1].to_owned(), (f[2].to_owned(), f[3].to_owned()))
        })
        .collect();
    assert_eq!(secrets.len(), 3);

    let hsm = open_keystore(&l);
    let ksm_b = Ksm::new(hsm.clone(), Box::new(AeadDir::new(d("b"))), vec!["0x1002".parse().unwrap()]);
    for (n, (id, (uid, key))) in secrets.iter().enumerate() {
        let a = std::fs::read(aead_path(&work.join("a"), "0x1001", id)).unwrap();
        let b_path = aead_path(&work.join("b"), "0x1002", id);
        assert_eq!(std::fs::metadata(&b_path).unwrap().permissions().mode() & 0o777, 0o600);
        let b = std::fs::read(&b_path).unwrap();
        let (AeadFile::V1(ra), AeadFile::V1(rb)) = (AeadFile::parse(&a).unwrap(), AeadFile::parse(&b).unwrap()) else { panic!("not v1") };
        assert_eq!((ra.key_handle, rb.key_handle), (KeyHandle::new(0x1001), KeyHandle::new(0x1002)));
        assert_ne!(ra.aead, rb.aead);
        assert_eq!(rb.nonce, PublicId::from_modhex(id).unwrap().aead_nonce().unwrap());
        assert_eq!(hsm.decrypt_aead(&ra).unwrap().to_vec(), hex::decode(format!("{key}{uid}")).unwrap());

        let counter = 0x21 + u16::try_from(n).unwrap();
        let token = Command::new(&ykgenerate).args([key, uid, &format!("{counter:04x}"), "c0a8", "3e", "05"]).output().unwrap();
        assert!(token.status.success(), "{}", String::from_utf8_lossy(&token.stderr));
        let otp = format!("{id}{}", String::from_utf8(token.stdout).unwrap().trim());
        assert_eq!(ksm_b.answer(&otp), format!("OK counter={counter:04x} low=c0a8 high=3e use=05"));
    }

    // Refusals: same handle, a target that may not wrap, a source without export.
    let e = failed(rewrap(&["--rewrap-to", "0x1001", "--out", &d("c")]));
    assert!(e.contains("another key handle"), "{e}");
    let e = failed(rewrap(&["--rewrap-to", "0x1003", "--out", &d("c")]));
    assert!(e.contains("not permitted to wrap imported secrets"), "{e}");
    let e = failed(rewrap(&["--rewrap-to", "0x1002", "--out", &d("c"), "--output", &d("plain.csv")]));
    assert!(e.contains("no plaintext file"), "{e}");
    let e = failed(alice(
        &l,
        &["decrypt-aead", "--aead-dir", &d("b"), "--key-handle", "0x1002", "--format", "aead", "--rewrap-to", "0x1001", "--out", &d("c")],
    ));
    assert!(e.contains("not permitted to decrypt AEADs"), "{e}");
    assert!(!work.join("c").exists() && !work.join("plain.csv").exists());
}

/// `--random-nonce` from stdin: the module draws the nonces (stored in the
/// v1 header, no user-nonce flag needed); the oracle opens the files with
/// those nonces; re-importing cannot compare and reports conflicts.
#[test]
fn random_nonce_import_from_stdin() {
    let (l, work) = laptop(&[(7, "buffer-load,buffer-aead-generate,export", KEY_B)]);
    let d = |p: &str| work.join(p).to_str().unwrap().to_owned();
    let yks = yubikeys(2);
    let csv = format!("# ykksm 1\n{}\n{}\n", ykksm_row(1, &yks[0]), ykksm_row(2, &yks[1]));
    let import = |extra: &[&str]| {
        let mut child = l
            .command(Some("alice"))
            .args([&["import", "--ykksm-csv", "-", "--key-handles", "7", "--out", &d("aeads")][..], extra].concat())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // The child may refuse before reading stdin.
        let _ = child.stdin.take().unwrap().write_all(csv.as_bytes());
        child.wait_with_output().unwrap()
    };
    let e = failed(import(&[]));
    assert!(e.contains("not permitted to wrap imported secrets") && e.contains("user-nonce"), "{e}");
    let out = ok(import(&["--random-nonce"]));
    assert!(out.contains("added 2, already present 0, conflicts 0, errors 0"), "{out}");
    let mut files = Vec::new();
    for yk in &yks {
        let path = aead_path(&work.join("aeads"), "7", &yk.id);
        let AeadFile::V1(rec) = AeadFile::parse(&std::fs::read(&path).unwrap()).unwrap() else { panic!("not v1") };
        assert_ne!(rec.nonce.as_bytes(), PublicId::from_modhex(&yk.id).unwrap().as_bytes());
        files.push((path, 7, KEY_B, format!("{}{}", yk.key, yk.uid)));
    }
    oracle_opens(&files);
    let again = import(&["--random-nonce"]);
    assert_eq!(again.status.code(), Some(1));
    let stdout = String::from_utf8(again.stdout.clone()).unwrap();
    assert!(stdout.contains("added 0, already present 0, conflicts 2, errors 0"), "{stdout}");
    assert!(failed(again).contains("cannot be compared"));

    let token = l.plaintext_approval(&[&d("s.csv")]);
    ok(alice(
        &l,
        &[
            "decrypt-aead",
            "--aead-dir",
            &d("aeads"),
            "--key-handle",
            "7",
            "--format",
            "yubikey-csv",
            "--output",
            &d("s.csv"),
            "--approval",
            &token,
        ],
    ));
    let text = std::fs::read_to_string(d("s.csv")).unwrap();
    for yk in &yks {
        assert!(text.lines().any(|l| l.contains(&format!(",{},{},{},", yk.id, yk.uid, yk.key))), "{text}");
    }
}
