//! `personalizer generate` end to end: the real binary, real files, an
//! independent AES-CCM oracle (Python `cryptography`), Debian's
//! `ykgenerate`, the public-id ledger across a kill -9 and `--resume`.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use appliance_tests::tools;
use hsm::signing::{SigningKey, VerifyingKey};
use hsm::soft::format::KdfParams;
use hsm::soft::SoftHsm;
use hsm::{Flags, Password};
use ksm::aead_dir::AeadDir;
use ksm::Ksm;
use otp::aead_file::{relative_path, AeadFile, AeadRecord};
use otp::token::TokenFields;
use otp::{HandleKey, KeyHandle, Otp, PrivateId, PublicId, YubiKeyKey};
use personalizer::ledger::Ledger;

fn personalizer(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_personalizer")).args(args).env_remove("RUST_LOG").output().unwrap()
}

fn ok(out: Output) -> String {
    assert!(out.status.success(), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

fn refused(out: Output) -> String {
    assert!(!out.status.success(), "should have failed; stdout: {}", String::from_utf8_lossy(&out.stdout));
    String::from_utf8(out.stderr).unwrap()
}

/// Generates, decodes and exports.
const KH0: KeyHandle = KeyHandle::new(0x2000);
/// "KSM1": generates and imports, never exports.
const KH1: KeyHandle = KeyHandle::new(0x314d_534b);
const KEY0: [u8; 32] = [0x5a; 32];
const KEY1: [u8; 16] = [0xc3; 16];

/// A keystore with two handles of known keys, and the password file.
struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let hsm = SoftHsm::create(&dir.path().join("ks"), &Password::new("correct horse").unwrap(), KdfParams::INSECURE_FOR_TESTS).unwrap();
        let key0: [u8; 32] = std::array::from_fn(|i| KEY0[i] ^ u8::try_from(i).unwrap());
        hsm.import_handles(&[
            (KH0, Flags::PERSONALIZER | Flags::OTP_DECODE, HandleKey::new(&key0).unwrap()),
            (KH1, Flags::IMPORT, HandleKey::new(&KEY1).unwrap()),
        ])
        .unwrap();
        std::fs::write(dir.path().join("pw"), "correct horse\n").unwrap();
        Self { dir }
    }

    fn key0() -> [u8; 32] {
        std::array::from_fn(|i| KEY0[i] ^ u8::try_from(i).unwrap())
    }

    fn p(&self, name: &str) -> String {
        self.dir.path().join(name).to_str().unwrap().to_owned()
    }

    /// `generate` with the keystore and ledger arguments, then `extra`.
    fn args(&self, extra: &[&str]) -> Vec<String> {
        let mut v: Vec<String> =
            ["generate", "--keystore", &self.p("ks"), "--password-file", &self.p("pw"), "--ledger", &self.p("ledger.db")]
                .iter()
                .map(|s| (*s).to_owned())
                .collect();
        v.extend(extra.iter().map(|s| (*s).to_owned()));
        v
    }

    fn generate(&self, extra: &[&str]) -> Output {
        let args = self.args(extra);
        personalizer(&args.iter().map(String::as_str).collect::<Vec<_>>())
    }

    /// A signing key for bundles, as the hidden --signing-key-pem file.
    fn signing_key(&self) -> VerifyingKey {
        let key = SigningKey::generate().unwrap();
        std::fs::write(self.p("signing.pem"), key.to_pkcs8_pem().unwrap().as_bytes()).unwrap();
        key.verifying_key()
    }

    fn hsm(&self) -> Arc<SoftHsm> {
        Arc::new(SoftHsm::open_unlocked(&self.dir.path().join("ks"), &Password::new("correct horse").unwrap()).unwrap())
    }
}

/// One CSV row: public id → (n, uid hex, key hex).
fn parse_csv(text: &str) -> BTreeMap<String, (u64, String, String)> {
    let mut rows = BTreeMap::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split(',').collect();
        assert_eq!(f.len(), 11, "{line}");
        assert_eq!(&f[4..], ["000000000000", "", "", "", "", "", ""], "{line}");
        assert!(rows.insert(f[1].to_owned(), (f[0].parse().unwrap(), f[2].to_owned(), f[3].to_owned())).is_none(), "{line} twice");
    }
    rows
}

/// Every AEAD file below `base/<kh dir>`: public id → record.
fn aead_files(base: &Path, kh_dir: &str) -> BTreeMap<String, (PathBuf, AeadRecord)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![base.join(kh_dir)];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            } else {
                let name = e.file_name().to_str().unwrap().to_owned();
                let id = PublicId::from_modhex(&name).unwrap();
                assert_eq!(e.path(), base.join(relative_path(kh_dir, &id)), "pyhsm layout");
                assert_eq!(e.metadata().unwrap().permissions().mode() & 0o777, 0o600);
                let AeadFile::V1(rec) = AeadFile::parse(&std::fs::read(e.path()).unwrap()).unwrap() else { panic!("not v1") };
                assert!(out.insert(name, (e.path(), rec)).is_none());
            }
        }
    }
    out
}

/// The Python `cryptography` oracle opens each AEAD with the handle key:
/// public id → (uid hex, key hex).
fn oracle_open(key: &[u8], records: &BTreeMap<String, (PathBuf, AeadRecord)>) -> BTreeMap<String, (String, String)> {
    let python = tools::require_python_cryptography();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/oracles/aesccm.py");
    let mut child = Command::new(python).arg(script).stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
    let mut input = String::new();
    for (id, (_, rec)) in records {
        input.push_str(&format!(
            "open {id} {} {} {} {}\n",
            hex::encode(key),
            rec.key_handle.get(),
            hex::encode(rec.nonce.as_bytes()),
            hex::encode(rec.aead.as_bytes())
        ));
    }
    let mut stdin = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()).unwrap());
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    assert!(out.status.success());
    let mut opened = BTreeMap::new();
    for line in String::from_utf8(out.stdout).unwrap().lines() {
        let f: Vec<&str> = line.split(' ').collect();
        assert_eq!(f[1], "ok", "oracle refused {line}");
        let plain = hex::decode(f[2]).unwrap();
        assert_eq!(plain.len(), 22);
        opened.insert(f[0].to_owned(), (hex::encode(&plain[16..]), hex::encode(&plain[..16])));
    }
    assert_eq!(opened.len(), records.len());
    opened
}

/// The bundle verifies with `trust` and holds exactly the AEAD files of
/// ids `first..first + count`, in order.
fn check_bundle(bundle: &Path, trust: &VerifyingKey, aeads: &Path, first: u64, count: u64) {
    let files0 = aead_files(aeads, "0x2000");
    let files1 = aead_files(aeads, "KSM1");
    let mut next = first;
    let manifest = ksm::bundle::read_verified(bundle, trust, |id, records| {
        assert_eq!(id.to_number(), next, "bundle entries in run order");
        next += 1;
        let name = id.to_string();
        assert_eq!(records, [files0[&name].1, files1[&name].1], "{name}");
        Ok(())
    })
    .unwrap();
    assert_eq!(next, first + count);
    assert_eq!(manifest.count, count);
    assert_eq!(manifest.key_handles, [KH0, KH1]);
    assert_eq!(manifest.first_public_id.to_number(), first);
    assert!(manifest.origin.starts_with("personalizer run "), "{}", manifest.origin);
}

/// An OTP from Debian's `ykgenerate` for this key and uid.
fn ykgenerate(key: &str, uid: &str, counter: u16, session_use: u8) -> String {
    let ykgenerate = tools::require("ykgenerate", "libyubikey-dev");
    let out =
        Command::new(ykgenerate).args([key, uid, &format!("{counter:04x}"), "c0a8", "3e", &format!("{session_use:02x}")]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// The AEAD directory the oracle opens equals our CSV and our ykpersonalize
/// lines; ykgenerate OTPs from the CSV's secrets decode through the KSM.
#[test]
fn aeads_open_with_an_independent_oracle_and_otps_validate() {
    let f = Fixture::new();
    let (aeads, csv, ykp) = (f.p("aeads"), f.p("secrets.csv"), f.p("ykpersonalize.sh"));
    let trust = f.signing_key();
    let out = ok(f.generate(&[
        "--bundle",
        &f.p("run.bundle"),
        "--signing-key-pem",
        &f.p("signing.pem"),
        "--count",
        "25",
        "--start-public-id",
        "vvcccccccccb",
        "--key-handles",
        "0x2000,KSM1",
        "--out",
        &aeads,
        "--yubikey-csv",
        &csv,
        "--ykpersonalize",
        &ykp,
    ]));
    assert!(out.contains("public ids vvcccccccccb to vvccccccccbk"), "{out}");
    assert!(out.contains("wrote the signed transfer bundle"), "{out}");
    check_bundle(Path::new(&f.p("run.bundle")), &trust, Path::new(&aeads), 0xff00_0000_0001, 25);

    let csv_text = std::fs::read_to_string(&csv).unwrap();
    let rows = parse_csv(&csv_text);
    assert_eq!(rows.len(), 25);
    for (id, (n, _, key)) in &rows {
        assert_eq!(PublicId::from_modhex(id).unwrap().to_number() - PublicId::from_modhex("vvcccccccccb").unwrap().to_number() + 1, *n);
        assert!(!out.contains(key.as_str()), "a secret reached stdout");
    }
    for path in [&csv, &ykp] {
        assert_eq!(std::fs::metadata(path).unwrap().permissions().mode() & 0o777, 0o600);
    }

    // The oracle, from the handle keys alone, finds exactly the CSV's secrets
    // under both handles.
    for (kh_dir, kh, key) in [("0x2000", KH0, &Fixture::key0()[..]), ("KSM1", KH1, &KEY1[..])] {
        let files = aead_files(Path::new(&aeads), kh_dir);
        assert_eq!(files.len(), 25, "{kh_dir}");
        for (id, (_, rec)) in &files {
            assert_eq!(rec.key_handle, kh);
            assert_eq!(rec.nonce, PublicId::from_modhex(id).unwrap().aead_nonce().unwrap(), "public id as nonce");
        }
        let opened = oracle_open(key, &files);
        let from_csv: BTreeMap<String, (String, String)> =
            rows.iter().map(|(id, (_, uid, key))| (id.clone(), (uid.clone(), key.clone()))).collect();
        assert_eq!(opened, from_csv, "{kh_dir}");
    }
    // ykpersonalize lines carry the same secrets.
    let ykp_text = std::fs::read_to_string(&ykp).unwrap();
    assert_eq!(ykp_text.lines().count(), 25);
    let mut by_n: Vec<_> = rows.iter().collect();
    by_n.sort_by_key(|(_, (n, _, _))| *n);
    for ((id, (_, uid, key)), line) in by_n.into_iter().zip(ykp_text.lines()) {
        assert_eq!(line, format!("ykpersonalize -1 -ofixed={id} -ouid={uid} -a{key} -y"));
    }
    // Program "YubiKeys" with ykgenerate from the CSV and decode their OTPs
    // through the KSM with our AEAD directory.
    let ksm = Ksm::new(f.hsm(), Box::new(AeadDir::new(&aeads)), vec!["0x2000".parse().unwrap()]);
    for (i, (id, (_, uid, key))) in rows.iter().enumerate().take(6) {
        let counter = 7 + u16::try_from(i).unwrap();
        let otp = format!("{id}{}", ykgenerate(key, uid, counter, 2));
        assert_eq!(ksm.answer(&otp), format!("OK counter={counter:04x} low=c0a8 high=3e use=02"), "{otp}");
    }
    // A wrong key does not validate.
    let (id, (_, uid, _)) = rows.iter().next().unwrap();
    assert_ne!(ksm.answer(&format!("{id}{}", ykgenerate(&"00".repeat(16), uid, 1, 1))).get(..2), Some("OK"));
}

#[test]
fn generate_writes_aeads_and_secrets_once() {
    let f = Fixture::new();
    let (aeads, secrets) = (f.p("aeads"), f.p("secrets.csv"));
    let gen =
        ["--count", "5", "--start-public-id", "cccccccccccd", "--key-handles", "0x2000,KSM1", "--out", &aeads, "--yubikey-csv", &secrets];
    let report = ok(f.generate(&gen));
    assert!(report.contains("public ids cccccccccccd to ccccccccccch"), "{report}");
    // Secrets leave once: a second run refuses to overwrite the CSV, and
    // does not touch the ledger.
    assert!(refused(f.generate(&gen)).contains("exists already"));
    // With a fresh CSV the ledger refuses the ids, naming the overlap.
    let err = refused(f.generate(&[&gen[..9], &[&f.p("other.csv")]].concat()));
    assert!(err.contains("public ids cccccccccccd (2) to ccccccccccch (6) were already allocated by run 1"), "{err}");
    assert!(!Path::new(&f.p("other.csv")).exists(), "no output left behind by a refused run");
    let err = refused(f.generate(&["--count", "3", "--start-public-id", "6", "--key-handles", "0x2000", "--out", &aeads]));
    assert!(err.contains("public ids ccccccccccch (6) to ccccccccccch (6)"), "{err}");
    ok(f.generate(&["--count", "3", "--start-public-id", "7", "--key-handles", "0x2000", "--out", &aeads]));

    let csv = std::fs::read_to_string(&secrets).unwrap();
    assert_eq!(std::fs::metadata(&secrets).unwrap().permissions().mode() & 0o777, 0o600);
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines.len(), 5);
    let ksm = Ksm::new(f.hsm(), Box::new(AeadDir::new(&aeads)), vec!["0x2000".parse().unwrap()]);
    for (i, line) in lines.iter().enumerate() {
        let fl: Vec<&str> = line.split(',').collect();
        assert_eq!(fl[0], (i + 1).to_string());
        let id = PublicId::from_modhex(fl[1]).unwrap();
        assert_eq!(id.to_number(), 2 + i as u64);
        for (kh_dir, kh) in [("0x2000", KH0), ("KSM1", KH1)] {
            let path = Path::new(&aeads).join(relative_path(kh_dir, &id));
            let AeadFile::V1(rec) = AeadFile::parse(&std::fs::read(&path).unwrap()).unwrap() else { panic!("not v1") };
            assert_eq!(rec.key_handle, kh);
            assert_eq!(rec.aead.len(), 30);
        }
        let key = YubiKeyKey::from_hex(fl[3]).unwrap();
        let uid = PrivateId::from_hex(fl[2]).unwrap();
        let token = TokenFields { uid: *uid.expose(), counter: 3, session_use: 4, ..Default::default() }.build();
        assert_eq!(ksm.answer(&Otp::new(id, token.encrypt(&key)).to_string()), "OK counter=0003 low=0000 high=00 use=04");
    }
    let runs = Ledger::open(Path::new(&f.p("ledger.db"))).unwrap().runs().unwrap();
    assert_eq!(
        runs.iter().map(|r| (r.spec.first, r.spec.count, r.done, r.finished)).collect::<Vec<_>>(),
        [(2, 5, 5, true), (7, 3, 3, true)]
    );
}

#[test]
fn generate_refuses_bad_requests() {
    let dir = tempfile::tempdir().unwrap();
    let d = |p: &str| dir.path().join(p).to_str().unwrap().to_owned();
    std::fs::write(d("pw"), "pw").unwrap();
    let ks = ["--keystore", &d("ks"), "--password-file", &d("pw")];
    ok(personalizer(&[&["keystore", "init"][..], &ks, &["--kdf-memory-mib", "1", "--kdf-iterations", "1"]].concat()));
    ok(personalizer(&[&["keystore", "add-handle"][..], &ks, &["--key-handle", "1", "--flags", "decode-only"]].concat()));
    ok(personalizer(&[&["keystore", "add-handle"][..], &ks, &["--key-handle", "2", "--flags", "buffer-aead-generate"]].concat()));
    let ledger = d("ledger.db");
    let run =
        |extra: &[&str]| refused(personalizer(&[&["generate"][..], &ks, &["--out", &d("aeads"), "--ledger", &ledger], extra].concat()));
    assert!(run(&["--start-public-id", "1", "--key-handles", "1"]).contains("not permitted"));
    // Public id as nonce needs user-nonce; a random nonce does not.
    assert!(run(&["--start-public-id", "1", "--key-handles", "2"]).contains("user-nonce"));
    // Refused requests allocated nothing: id 1 is still free.
    ok(personalizer(
        &[
            &["generate"][..],
            &ks,
            &["--out", &d("aeads"), "--ledger", &ledger, "--start-public-id", "1", "--key-handles", "2", "--random-nonce"],
        ]
        .concat(),
    ));
    // Exporting secrets needs the export flag.
    assert!(run(&["--start-public-id", "7", "--key-handles", "2", "--random-nonce", "--yubikey-csv", &d("s.csv")]).contains("export"));
    assert!(!dir.path().join("s.csv").exists());
    assert!(run(&["--start-public-id", "0", "--key-handles", "2"]).contains("public id 0"));
    assert!(run(&["--start-public-id", "xyz", "--key-handles", "2"]).contains("neither a number nor a modhex id"));
    assert!(run(&["--start-public-id", "1", "--key-handles", "2", "--public-id-chars", "7"]).contains("even"));
    assert!(run(&["--start-public-id", "250", "--count", "10", "--key-handles", "2", "--public-id-chars", "2", "--random-nonce"])
        .contains("does not fit"));
    assert!(run(&["--start-public-id", "9", "--key-handles", "99", "--random-nonce"]).contains("does not exist"));
    assert!(run(&["--start-public-id", "9", "--key-handles", "2,0x2", "--random-nonce"]).contains("listed twice"));
    assert!(refused(personalizer(&[&["generate"][..], &ks, &["--ledger", &ledger, "--resume"]].concat())).contains("no unfinished run"));
    assert!(run(&["--resume"]).contains("cannot be used with"));
    let no_ledger =
        refused(personalizer(&[&["generate"][..], &ks, &["--out", &d("aeads"), "--start-public-id", "9", "--key-handles", "2"]].concat()));
    assert!(no_ledger.contains("--ledger"), "{no_ledger}");
    let runs = Ledger::open(Path::new(&ledger)).unwrap().runs().unwrap();
    assert_eq!(runs.len(), 1, "only the successful run reserved ids");
}

/// Secrets go only to a new regular file: never over an existing one, a
/// symlink, `-` (stdout) or a directory; refusals allocate no ids.
#[test]
fn secrets_output_only_to_new_private_files() {
    let f = Fixture::new();
    std::fs::write(f.p("old.csv"), "keep me").unwrap();
    std::os::unix::fs::symlink(f.p("target.csv"), f.p("link.csv")).unwrap();
    std::fs::create_dir(f.p("adir")).unwrap();
    let base = ["--count", "4", "--start-public-id", "100", "--key-handles", "0x2000", "--out", &f.p("aeads")];
    for (flag, path, why) in [
        ("--yubikey-csv", f.p("old.csv"), "exists already"),
        ("--yubikey-csv", f.p("link.csv"), "symbolic link"),
        ("--ykpersonalize", "-".to_owned(), "stdout"),
        ("--ykpersonalize", f.p("adir"), "directory"),
        ("--yubikey-csv", "/dev/null".to_owned(), "device"),
    ] {
        let err = refused(f.generate(&[&base[..], &[flag, &path]].concat()));
        assert!(err.contains(why), "{path}: {err}");
    }
    // A bundle, too, only under a new name, and only with a signing key.
    assert!(refused(f.generate(&[&base[..], &["--bundle", &f.p("b")]].concat())).contains("signing key"));
    f.signing_key();
    let err = refused(f.generate(&[&base[..], &["--bundle", &f.p("old.csv"), "--signing-key-pem", &f.p("signing.pem")]].concat()));
    assert!(err.contains("already exists; a transfer bundle is never overwritten"), "{err}");
    assert_eq!(std::fs::read_to_string(f.p("old.csv")).unwrap(), "keep me");
    assert!(!Path::new(&f.p("target.csv")).exists(), "the symlink was not followed");
    // Nothing was reserved: the same ids are still free.
    let out = f.generate(&[&base[..], &["--yubikey-csv", &f.p("new.csv"), "--ykpersonalize", &f.p("new.sh")]].concat());
    assert!(out.status.success(), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let csv = std::fs::read_to_string(f.p("new.csv")).unwrap();
    for (_, (_, uid, key)) in parse_csv(&csv) {
        assert!(!stdout.contains(&key) && !stdout.contains(&uid), "a secret reached stdout");
        assert!(!stderr.contains(&key), "a secret reached stderr");
    }
    for p in ["new.csv", "new.sh"] {
        assert_eq!(std::fs::metadata(f.p(p)).unwrap().permissions().mode() & 0o777, 0o600);
    }
    // Not on a tmpfs: a warning on stderr (on a tmpfs: none).
    let on_tmpfs = std::fs::File::open(f.p("new.csv")).map(|file| personalizer::output::on_tmpfs(&file).unwrap()).unwrap();
    assert_eq!(stderr.contains("is not on a tmpfs"), !on_tmpfs, "{stderr}");
}

/// All files of a finished run: one AEAD per handle per id, both holding
/// the same secret (per the oracle), exactly the CSV's; nothing else.
fn check_complete_run(f: &Fixture, first: u64, count: u64, csv: &str) -> BTreeMap<String, (String, String)> {
    let aeads = f.p("aeads");
    let ids: BTreeSet<String> = (first..first + count).map(|n| PublicId::from_number(n, 6).unwrap().to_string()).collect();
    let files0 = aead_files(Path::new(&aeads), "0x2000");
    let files1 = aead_files(Path::new(&aeads), "KSM1");
    assert_eq!(files0.keys().cloned().collect::<BTreeSet<_>>(), ids, "exactly one AEAD per id under 0x2000");
    assert_eq!(files1.keys().cloned().collect::<BTreeSet<_>>(), ids, "exactly one AEAD per id under KSM1");
    let opened0 = oracle_open(&Fixture::key0(), &files0);
    let opened1 = oracle_open(&KEY1, &files1);
    assert_eq!(opened0, opened1, "the same secret under both handles");
    let rows = parse_csv(&std::fs::read_to_string(csv).unwrap());
    let from_csv: BTreeMap<String, (String, String)> =
        rows.iter().map(|(id, (_, uid, key))| (id.clone(), (uid.clone(), key.clone()))).collect();
    assert_eq!(from_csv, opened0, "the resumed CSV covers the whole run");
    for (id, (n, _, _)) in &rows {
        assert_eq!(PublicId::from_modhex(id).unwrap().to_number() - first + 1, *n);
    }
    let secrets: BTreeSet<_> = opened0.values().collect();
    assert_eq!(secrets.len(), opened0.len(), "no secret used twice");
    opened0
}

/// A run killed with SIGKILL mid-way is completed by `--resume`: every id
/// once, one secret per id, the ledger finished and the range still taken.
#[test]
fn a_killed_run_resumes_without_reusing_ids() {
    let f = Fixture::new();
    let trust = f.signing_key();
    let count = 6_000u64;
    let args = f.args(&[
        "--count",
        &count.to_string(),
        "--start-public-id",
        "1000",
        "--key-handles",
        "0x2000,KSM1",
        "--out",
        &f.p("aeads"),
        "--yubikey-csv",
        &f.p("crashed.csv"),
        "--bundle",
        &f.p("run.bundle"),
        "--signing-key-pem",
        &f.p("signing.pem"),
        "--batch",
        "200",
    ]);
    let mut child =
        Command::new(env!("CARGO_BIN_EXE_personalizer")).args(&args).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let ledger_path = PathBuf::from(f.p("ledger.db"));
    let deadline = Instant::now() + Duration::from_secs(120);
    let done_at_kill = loop {
        assert!(Instant::now() < deadline, "no progress recorded");
        assert!(child.try_wait().unwrap().is_none(), "the run finished before it could be killed");
        if ledger_path.exists() {
            if let Some(run) = Ledger::open(&ledger_path).ok().and_then(|l| l.runs().ok()).and_then(|r| r.into_iter().next()) {
                if run.done >= 400 {
                    std::thread::sleep(Duration::from_millis(20));
                    child.kill().unwrap();
                    child.wait().unwrap();
                    break run.done;
                }
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let run_at_kill = Ledger::open(&ledger_path).unwrap().runs().unwrap().remove(0);
    assert!(!run_at_kill.finished && run_at_kill.done >= done_at_kill && run_at_kill.done < count, "{run_at_kill:?}");
    assert_eq!(run_at_kill.done % 200, 0, "progress is recorded per batch");

    // The crashed range stays allocated.
    let err = refused(f.generate(&["--count", "1", "--start-public-id", "6999", "--key-handles", "0x2000", "--out", &f.p("aeads")]));
    assert!(err.contains("already allocated by run 1"), "{err}");
    // Resume needs new outputs; the crashed CSV is not overwritten.
    assert!(refused(f.generate(&["--resume", "--yubikey-csv", &f.p("crashed.csv")])).contains("exists already"));
    assert!(!Path::new(&f.p("run.bundle")).exists(), "no bundle from the killed run");
    let out = ok(f.generate(&[
        "--resume",
        "--yubikey-csv",
        &f.p("resumed.csv"),
        "--bundle",
        &f.p("run.bundle"),
        "--signing-key-pem",
        &f.p("signing.pem"),
    ]));
    assert!(out.contains("run 1: generated 6000 YubiKey(s)"), "{out}");
    let run = Ledger::open(&ledger_path).unwrap().runs().unwrap().remove(0);
    assert!(run.finished && run.done == count);
    assert!(refused(f.generate(&["--resume"])).contains("no unfinished run"));

    let secrets = check_complete_run(&f, 1000, count, &f.p("resumed.csv"));
    check_bundle(Path::new(&f.p("run.bundle")), &trust, Path::new(&f.p("aeads")), 1000, count);
    // Every line of the crashed CSV was for a key whose AEADs were all
    // written first, so the resumed run kept its secret.
    let crashed = parse_csv(&std::fs::read_to_string(f.p("crashed.csv")).unwrap());
    assert!(crashed.len() as u64 >= run_at_kill.done, "the output is flushed per batch");
    for (id, (_, uid, key)) in crashed {
        assert_eq!(secrets[&id], (uid, key), "{id} changed secret on resume");
    }
}

/// The states a crash can leave after the ledger's count, built by hand:
/// complete keys are kept byte for byte, a key missing one handle's file is
/// re-wrapped, a key whose only exportable AEAD is truncated gets a new
/// secret, missing keys are generated; the keys before the count are read
/// back for the outputs.
#[test]
fn resume_keeps_rewraps_or_replaces_partial_keys() {
    let f = Fixture::new();
    let aeads = f.p("aeads");
    ok(f.generate(&["--count", "50", "--start-public-id", "500", "--key-handles", "0x2000,KSM1", "--out", &aeads, "--batch", "10"]));
    // Pretend the run crashed after its second batch.
    let conn = rusqlite::Connection::open(f.p("ledger.db")).unwrap();
    conn.execute("UPDATE runs SET done = 20, finished_at = NULL WHERE id = 1", []).unwrap();
    drop(conn);
    let path = |kh: &str, n: u64| Path::new(&aeads).join(relative_path(kh, &PublicId::from_number(n, 6).unwrap()));
    let before = |n: u64| (std::fs::read(path("0x2000", n)).unwrap(), std::fs::read(path("KSM1", n)).unwrap());
    let kept: Vec<_> = (500..530).filter(|n| ![520, 521, 522].contains(n)).map(|n| (n, before(n))).collect();
    let rewrap_0 = std::fs::read(path("0x2000", 520)).unwrap();
    std::fs::remove_file(path("KSM1", 520)).unwrap(); // re-wrap to KSM1 from 0x2000
    std::fs::write(path("0x2000", 521), b"YubiHSM AEAD\n").unwrap(); // truncated; KSM1 cannot export: replaced
    let replaced_1 = std::fs::read(path("KSM1", 521)).unwrap();
    std::fs::remove_file(path("0x2000", 522)).unwrap(); // re-wrap needs an export from KSM1: replaced
    for n in 530..550 {
        std::fs::remove_file(path("0x2000", n)).unwrap();
        std::fs::remove_file(path("KSM1", n)).unwrap();
    }
    let trust = f.signing_key();
    let out = ok(f.generate(&[
        "--resume",
        "1",
        "--yubikey-csv",
        &f.p("resumed.csv"),
        "--bundle",
        &f.p("b"),
        "--signing-key-pem",
        &f.p("signing.pem"),
    ]));
    assert!(out.contains("run 1: generated 50 YubiKey(s), public ids cccccccccbvf to cccccccccddg"), "{out}");
    let secrets = check_complete_run(&f, 500, 50, &f.p("resumed.csv"));
    for (n, bytes) in kept {
        assert_eq!(before(n), bytes, "key {n} was kept as it was");
    }
    assert_eq!(std::fs::read(path("0x2000", 520)).unwrap(), rewrap_0, "re-wrapped, not regenerated");
    assert_ne!(std::fs::read(path("KSM1", 521)).unwrap(), replaced_1, "a new secret for a key never output");
    assert_eq!(secrets.len(), 50);
    check_bundle(Path::new(&f.p("b")), &trust, Path::new(&aeads), 500, 50);
}
