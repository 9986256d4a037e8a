//! `personalizer generate` end to end: the real binary (with officers,
//! sessions and quorum, as on the laptop) and the library, real files, an
//! independent AES-CCM oracle (Python `cryptography`), Debian's
//! `ykgenerate`, the public-id ledger across a kill -9 and `--resume`.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use appliance_tests::tools;
use common::{Laptop, KEYSTORE_PASSWORD};
use hsm::signing::{SigningKey, VerifyingKey};
use hsm::soft::format::KdfParams;
use hsm::soft::SoftHsm;
use hsm::{Flags, Password};
use ksm::aead_dir::{AeadDir, KeyHandleDir};
use ksm::Ksm;
use otp::aead_file::{relative_path, AeadFile, AeadRecord};
use otp::{HandleKey, KeyHandle, PublicId};
use personalizer::ledger::Ledger;
use personalizer::{GenerateParams, RunOptions, RunReport, StartId};

/// Generates, decodes and exports.
const KH0: KeyHandle = KeyHandle::new(0x2000);
/// "KSM1": generates and imports, never exports.
const KH1: KeyHandle = KeyHandle::new(0x314d_534b);
const KEY1: [u8; 16] = [0xc3; 16];

fn key0() -> [u8; 32] {
    std::array::from_fn(|i| 0x5a ^ u8::try_from(i).unwrap())
}

/// The two handles, with keys the oracle knows.
fn import_known_handles(hsm: &SoftHsm) {
    hsm.import_handles(&[
        (KH0, Flags::PERSONALIZER | Flags::OTP_DECODE, HandleKey::new(&key0()).unwrap()),
        (KH1, Flags::IMPORT, HandleKey::new(&KEY1).unwrap()),
    ])
    .unwrap();
}

fn ok(out: Output) -> String {
    assert!(out.status.success(), "stdout: {}\nstderr: {}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

fn refused(out: Output) -> String {
    assert!(!out.status.success(), "should have failed; stdout: {}", String::from_utf8_lossy(&out.stdout));
    String::from_utf8(out.stderr).unwrap()
}

/// The laptop: officers alice and bob logged in, the two known handles.
struct Fixture {
    l: Laptop,
}

impl Fixture {
    fn new() -> Self {
        let l = Laptop::with_officers();
        import_known_handles(&SoftHsm::open_unlocked(&l.keystore(), &Password::new(KEYSTORE_PASSWORD).unwrap()).unwrap());
        Self { l }
    }

    fn p(&self, name: &str) -> String {
        self.l.path(name).to_str().unwrap().to_owned()
    }

    /// `personalizer generate …` in alice's session.
    fn generate(&self, extra: &[&str]) -> Output {
        self.l.run(Some("alice"), &[&["generate"][..], extra].concat())
    }

    fn trust(&self) -> VerifyingKey {
        VerifyingKey::from_pem_file(&self.l.home.join("signing-key.pub.pem")).unwrap()
    }

    fn ledger(&self) -> PathBuf {
        self.l.home.join("ledger.db")
    }

    fn hsm(&self) -> Arc<SoftHsm> {
        Arc::new(SoftHsm::open_unlocked(&self.l.keystore(), &Password::new(KEYSTORE_PASSWORD).unwrap()).unwrap())
    }
}

/// The library on its own: a keystore, a ledger and a signing key.
struct Lib {
    dir: tempfile::TempDir,
    hsm: SoftHsm,
    ledger: Ledger,
    key: SigningKey,
}

impl Lib {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let hsm = SoftHsm::create(&dir.path().join("ks"), &Password::new("pw").unwrap(), KdfParams::INSECURE_FOR_TESTS).unwrap();
        import_known_handles(&hsm);
        let ledger = Ledger::open(&dir.path().join("ledger.db")).unwrap();
        Self { dir, hsm, ledger, key: SigningKey::generate().unwrap() }
    }

    fn p(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn params(start: u64, count: u64, handles: &str) -> GenerateParams {
        GenerateParams {
            count,
            start: StartId(start),
            public_id_chars: 12,
            key_handles: handles.split(',').map(|h| h.parse::<KeyHandleDir>().unwrap()).collect(),
            random_nonce: false,
        }
    }

    fn generate(&mut self, params: &GenerateParams, opts: &RunOptions<'_>) -> Result<RunReport, personalizer::Error> {
        let out = self.p("aeads");
        personalizer::generate(&self.hsm, &mut self.ledger, &out, params, opts, &mut |_| {})
    }

    fn runs(&self) -> Vec<(u64, u64, u64, bool)> {
        self.ledger.runs().unwrap().iter().map(|r| (r.spec.first, r.spec.count, r.done, r.finished)).collect()
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

/// All files of a finished run: one AEAD per handle per id, both holding
/// the same secret (per the oracle), exactly the CSV's; nothing else.
fn check_complete_run(aeads: &Path, first: u64, count: u64, csv: &Path) -> BTreeMap<String, (String, String)> {
    let ids: BTreeSet<String> = (first..first + count).map(|n| PublicId::from_number(n, 6).unwrap().to_string()).collect();
    let files0 = aead_files(aeads, "0x2000");
    let files1 = aead_files(aeads, "KSM1");
    assert_eq!(files0.keys().cloned().collect::<BTreeSet<_>>(), ids, "exactly one AEAD per id under 0x2000");
    assert_eq!(files1.keys().cloned().collect::<BTreeSet<_>>(), ids, "exactly one AEAD per id under KSM1");
    let opened0 = oracle_open(&key0(), &files0);
    let opened1 = oracle_open(&KEY1, &files1);
    assert_eq!(opened0, opened1, "the same secret under both handles");
    let rows = parse_csv(&std::fs::read_to_string(csv).unwrap());
    let from_csv: BTreeMap<String, (String, String)> =
        rows.iter().map(|(id, (_, uid, key))| (id.clone(), (uid.clone(), key.clone()))).collect();
    assert_eq!(from_csv, opened0, "the CSV covers the whole run");
    for (id, (n, _, _)) in &rows {
        assert_eq!(PublicId::from_modhex(id).unwrap().to_number() - first + 1, *n);
    }
    let secrets: BTreeSet<_> = opened0.values().collect();
    assert_eq!(secrets.len(), opened0.len(), "no secret used twice");
    opened0
}

/// Through the binary, in a session with a plaintext-output approval: the
/// AEAD directory the oracle opens equals our CSV and ykpersonalize lines,
/// the bundle verifies with the home's public key and holds the same AEADs,
/// ykgenerate OTPs from the CSV decode through the KSM, and no secret
/// reaches stdout, stderr or the audit log.
#[test]
fn aeads_open_with_an_independent_oracle_and_otps_validate() {
    let f = Fixture::new();
    let (aeads, csv, ykp, bundle) = (f.p("aeads"), f.p("secrets.csv"), f.p("ykpersonalize.sh"), f.p("run.bundle"));
    let approval = f.l.plaintext_approval(&[&csv, &ykp]);
    let args = [
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
        "--bundle",
        &bundle,
        "--approval",
        &approval,
    ];
    let run = f.generate(&args);
    let stderr = String::from_utf8_lossy(&run.stderr).into_owned();
    let out = ok(run);
    assert!(out.contains("public ids vvcccccccccb to vvccccccccbk"), "{out}");
    assert!(out.contains("wrote the signed transfer bundle"), "{out}");
    check_bundle(Path::new(&bundle), &f.trust(), Path::new(&aeads), 0xff00_0000_0001, 25);

    let rows = parse_csv(&std::fs::read_to_string(&csv).unwrap());
    assert_eq!(rows.len(), 25);
    let audit = std::fs::read(f.l.home.join("audit.db")).unwrap();
    for (id, (n, uid, key)) in &rows {
        assert_eq!(PublicId::from_modhex(id).unwrap().to_number() - 0xff00_0000_0001 + 1, *n);
        for text in [&out, &stderr] {
            assert!(!text.contains(key.as_str()) && !text.contains(uid.as_str()), "a secret reached stdout or stderr");
        }
        assert!(!audit.windows(key.len()).any(|w| w == key.as_bytes()), "a secret reached the audit log");
    }
    for path in [&csv, &ykp] {
        assert_eq!(std::fs::metadata(path).unwrap().permissions().mode() & 0o777, 0o600);
    }
    // Not on a tmpfs: a warning on stderr (on a tmpfs: none).
    let on_tmpfs = personalizer::output::on_tmpfs(&std::fs::File::open(&csv).unwrap()).unwrap();
    assert_eq!(stderr.contains("is not on a tmpfs"), !on_tmpfs, "{stderr}");

    // The oracle, from the handle keys alone, finds exactly the CSV's
    // secrets under both handles, in pyhsm's layout.
    let from_csv: BTreeMap<String, (String, String)> =
        rows.iter().map(|(id, (_, uid, key))| (id.clone(), (uid.clone(), key.clone()))).collect();
    for (kh_dir, kh, key) in [("0x2000", KH0, &key0()[..]), ("KSM1", KH1, &KEY1[..])] {
        let files = aead_files(Path::new(&aeads), kh_dir);
        assert_eq!(files.len(), 25, "{kh_dir}");
        for (id, (_, rec)) in &files {
            assert_eq!(rec.key_handle, kh);
            assert_eq!(rec.nonce, PublicId::from_modhex(id).unwrap().aead_nonce().unwrap(), "public id as nonce");
        }
        assert_eq!(oracle_open(key, &files), from_csv, "{kh_dir}");
    }
    // ykpersonalize lines carry the same secrets, in run order.
    let ykp_text = std::fs::read_to_string(&ykp).unwrap();
    assert_eq!(ykp_text.lines().count(), 25);
    let mut by_n: Vec<_> = rows.iter().collect();
    by_n.sort_by_key(|(_, (n, _, _))| *n);
    for ((id, (_, uid, key)), line) in by_n.into_iter().zip(ykp_text.lines()) {
        assert_eq!(line, format!("ykpersonalize -1 -ofixed={id} -ouid={uid} -a{key} -y"));
    }
    // "YubiKeys" programmed from the CSV make OTPs with ykgenerate that the
    // KSM decodes with our AEAD directory; a wrong key does not validate.
    let ksm = Ksm::new(f.hsm(), Box::new(AeadDir::new(&aeads)), vec!["0x2000".parse().unwrap()]);
    for (i, (id, (_, uid, key))) in rows.iter().enumerate().take(6) {
        let counter = 7 + u16::try_from(i).unwrap();
        let otp = format!("{id}{}", ykgenerate(key, uid, counter, 2));
        assert_eq!(ksm.answer(&otp), format!("OK counter={counter:04x} low=c0a8 high=3e use=02"), "{otp}");
    }
    let (id, (_, uid, _)) = rows.iter().next().unwrap();
    assert!(!ksm.answer(&format!("{id}{}", ykgenerate(&"00".repeat(16), uid, 1, 1))).starts_with("OK"));

    // The same ids again: refused by the ledger, naming the overlap.
    let err = refused(f.generate(&["--count", "1", "--start-public-id", "vvccccccccbk", "--key-handles", "0x2000", "--out", &aeads]));
    assert!(err.contains("public ids vvccccccccbk"), "{err}");
    assert!(err.contains("were already allocated by run 1"), "{err}");
}

/// A run killed with SIGKILL mid-way is completed by `--resume`: every id
/// once, one secret per id, the secrets of the killed run's output kept,
/// the bundle covering the whole run, the range still taken.
#[test]
fn a_killed_run_resumes_without_reusing_ids() {
    let f = Fixture::new();
    let count = 6_000u64;
    let (aeads, crashed, resumed, bundle) = (f.p("aeads"), f.p("crashed.csv"), f.p("resumed.csv"), f.p("run.bundle"));
    let approval = f.l.plaintext_approval(&[&crashed]);
    let mut child = Command::new(env!("CARGO_BIN_EXE_personalizer"))
        .args(["generate", "--count", &count.to_string(), "--start-public-id", "1000", "--key-handles", "0x2000,KSM1"])
        .args(["--out", &aeads, "--yubikey-csv", &crashed, "--bundle", &bundle, "--approval", &approval, "--batch", "200"])
        .env("PERSONALIZER_HOME", &f.l.home)
        .env("PERSONALIZER_KEYSTORE_PASSWORD_FILE", f.l.path("ks.pw"))
        .env("PERSONALIZER_SESSION", f.l.path("alice.session"))
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    let done_at_kill = loop {
        assert!(Instant::now() < deadline, "no progress recorded");
        assert!(child.try_wait().unwrap().is_none(), "the run finished before it could be killed");
        if let Some(run) = Ledger::open(&f.ledger()).ok().and_then(|l| l.runs().ok()).and_then(|r| r.into_iter().next()) {
            if run.done >= 400 {
                std::thread::sleep(Duration::from_millis(20));
                child.kill().unwrap();
                child.wait().unwrap();
                break run.done;
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let at_kill = Ledger::open(&f.ledger()).unwrap().runs().unwrap().remove(0);
    assert!(!at_kill.finished && at_kill.done >= done_at_kill && at_kill.done < count, "{at_kill:?}");
    assert_eq!(at_kill.done % 200, 0, "progress is recorded per batch");
    assert!(!Path::new(&bundle).exists(), "no bundle from the killed run");

    // The killed run's range stays allocated.
    let err = refused(f.generate(&["--count", "1", "--start-public-id", "6999", "--key-handles", "0x2000", "--out", &aeads]));
    assert!(err.contains("already allocated by run 1"), "{err}");
    let approval = f.l.plaintext_approval(&[&resumed]);
    let out = ok(f.generate(&["--resume", "--yubikey-csv", &resumed, "--bundle", &bundle, "--approval", &approval]));
    assert!(out.contains("run 1: generated 6000 YubiKey(s)"), "{out}");
    let run = Ledger::open(&f.ledger()).unwrap().runs().unwrap().remove(0);
    assert!(run.finished && run.done == count);
    assert!(refused(f.generate(&["--resume"])).contains("no unfinished run"));

    let secrets = check_complete_run(Path::new(&aeads), 1000, count, Path::new(&resumed));
    check_bundle(Path::new(&bundle), &f.trust(), Path::new(&aeads), 1000, count);
    // The killed run's output was flushed per batch, after the batch's AEAD
    // files: every key in it kept its secret.
    let killed = parse_csv(&std::fs::read_to_string(&crashed).unwrap());
    assert!(killed.len() as u64 >= at_kill.done, "{} lines, {} done", killed.len(), at_kill.done);
    for (id, (_, uid, key)) in killed {
        assert_eq!(secrets[&id], (uid, key), "{id} changed secret on resume");
    }
}

/// The ledger refuses any id of an earlier run, before anything is written.
#[test]
fn ids_are_never_reused() {
    let mut lib = Lib::new();
    lib.generate(&Lib::params(2, 5, "0x2000,KSM1"), &RunOptions::default()).unwrap();
    let csv = lib.p("again.csv");
    let opts = RunOptions { yubikey_csv: Some(&csv), ..RunOptions::default() };
    for (start, count) in [(2, 5), (6, 1), (1, 2), (1, 100)] {
        let err = lib.generate(&Lib::params(start, count, "0x2000"), &opts).unwrap_err().to_string();
        assert!(err.contains("were already allocated by run 1 (ids cccccccccccd (2) to ccccccccccch (6))"), "{err}");
        assert!(!csv.exists(), "no output left behind by a refused run");
    }
    lib.generate(&Lib::params(7, 3, "0x2000"), &opts).unwrap();
    lib.generate(&Lib::params(1, 1, "0x2000"), &RunOptions::default()).unwrap();
    assert_eq!(lib.runs(), [(2, 5, 5, true), (7, 3, 3, true), (1, 1, 1, true)]);
    assert_eq!(aead_files(&lib.p("aeads"), "0x2000").len(), 9);
    assert_eq!(aead_files(&lib.p("aeads"), "KSM1").len(), 5);
}

#[test]
fn bad_requests_are_refused_before_any_id_is_reserved() {
    let mut lib = Lib::new();
    lib.hsm.add_handle(KeyHandle::new(1), Flags::OTP_DECODE, 256).unwrap();
    lib.hsm.add_handle(KeyHandle::new(2), Flags::BUFFER_AEAD_GENERATE | Flags::RANDOM_AEAD_GENERATE, 256).unwrap();
    let csv = lib.p("s.csv");
    let mut err = |params: GenerateParams, opts: &RunOptions<'_>| lib.generate(&params, opts).unwrap_err().to_string();
    let none = RunOptions::default();
    assert!(err(Lib::params(1, 1, "1"), &none).contains("not permitted"));
    // Public id as nonce needs user-nonce; a random nonce does not.
    assert!(err(Lib::params(1, 1, "2"), &none).contains("user-nonce"));
    let random = |start, handles| GenerateParams { random_nonce: true, ..Lib::params(start, 1, handles) };
    // Exporting secrets needs the export flag; the CSV is then not created.
    let with_csv = RunOptions { yubikey_csv: Some(&csv), ..RunOptions::default() };
    assert!(err(random(7, "2"), &with_csv).contains("export"));
    assert!(!csv.exists());
    assert!(err(Lib::params(0, 1, "0x2000"), &none).contains("public id 0"));
    assert!(err(GenerateParams { public_id_chars: 7, ..Lib::params(1, 1, "0x2000") }, &none).contains("even"));
    assert!(err(GenerateParams { public_id_chars: 2, ..Lib::params(250, 10, "0x2000") }, &none).contains("does not fit"));
    assert!(err(Lib::params(1, 0, "0x2000"), &none).contains("at least 1"));
    assert!(err(random(9, "99"), &none).contains("does not exist"));
    assert!(err(random(9, "2,0x2"), &none).contains("listed twice"));
    let resume = personalizer::resume(&lib.hsm, &mut lib.ledger, None, &none, &mut |_| {}).unwrap_err().to_string();
    assert!(resume.contains("no unfinished run"), "{resume}");
    assert!(lib.runs().is_empty(), "nothing was reserved");
    let report = lib.generate(&random(1, "2"), &none).unwrap();
    assert_eq!((report.run, report.generated), (1, 1));
}

/// Secrets go only to a new regular file: never over an existing one, a
/// symlink, `-` (stdout), a directory or a device; a bundle only under a
/// new name. Refusals reserve no ids.
#[test]
fn secrets_output_only_to_new_private_files() {
    let mut lib = Lib::new();
    std::fs::write(lib.p("old.csv"), "keep me").unwrap();
    std::os::unix::fs::symlink(lib.p("target.csv"), lib.p("link.csv")).unwrap();
    std::fs::create_dir(lib.p("adir")).unwrap();
    let params = Lib::params(100, 4, "0x2000,KSM1");
    let (old, link, dash, adir, null) =
        (lib.p("old.csv"), lib.p("link.csv"), PathBuf::from("-"), lib.p("adir"), PathBuf::from("/dev/null"));
    for (opts, why) in [
        (RunOptions { yubikey_csv: Some(&old), ..RunOptions::default() }, "exists already"),
        (RunOptions { yubikey_csv: Some(&link), ..RunOptions::default() }, "symbolic link"),
        (RunOptions { ykpersonalize: Some(&dash), ..RunOptions::default() }, "stdout"),
        (RunOptions { ykpersonalize: Some(&adir), ..RunOptions::default() }, "directory"),
        (RunOptions { yubikey_csv: Some(&null), ..RunOptions::default() }, "device"),
    ] {
        let err = lib.generate(&params, &opts).unwrap_err().to_string();
        assert!(err.contains(why), "{why}: {err}");
    }
    let key = SigningKey::generate().unwrap();
    let err = lib.generate(&params, &RunOptions { bundle: Some((&old, &key)), ..RunOptions::default() }).unwrap_err().to_string();
    assert!(err.contains("already exists; a transfer bundle is never overwritten"), "{err}");
    assert_eq!(std::fs::read_to_string(lib.p("old.csv")).unwrap(), "keep me");
    assert!(!lib.p("target.csv").exists(), "the symlink was not followed");
    assert!(lib.runs().is_empty(), "nothing was reserved");

    let (csv, ykp) = (lib.p("new.csv"), lib.p("new.sh"));
    let report =
        lib.generate(&params, &RunOptions { yubikey_csv: Some(&csv), ykpersonalize: Some(&ykp), ..RunOptions::default() }).unwrap();
    assert_eq!(report.outputs, [csv.clone(), ykp.clone()]);
    for p in [&csv, &ykp] {
        assert_eq!(std::fs::metadata(p).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(std::fs::read_to_string(p).unwrap().lines().count(), 4);
    }
}

/// A file in the way (keys from elsewhere) stops the run; the ids stay
/// reserved and the run unfinished.
#[test]
fn a_foreign_aead_file_stops_the_run() {
    let mut lib = Lib::new();
    let foreign = lib.p("aeads").join(relative_path("0x2000", &PublicId::from_number(32, 6).unwrap()));
    std::fs::create_dir_all(foreign.parent().unwrap()).unwrap();
    std::fs::write(&foreign, b"not ours").unwrap();
    let err = lib.generate(&Lib::params(1, 40, "0x2000"), &RunOptions::default()).unwrap_err().to_string();
    assert!(err.contains("exists already, but public id ccccccccccdc was never allocated before this run"), "{err}");
    assert!(err.contains("run 1 stopped unfinished and keeps its public ids"), "{err}");
    assert_eq!(std::fs::read(&foreign).unwrap(), b"not ours");
    assert_eq!(lib.runs(), [(1, 40, 0, false)]);
}

/// The states a crash can leave after the ledger's count, built by hand:
/// complete keys are kept byte for byte, a key missing one handle's file is
/// re-wrapped, a key whose only exportable AEAD is truncated or missing
/// gets a new secret, missing keys are generated; the keys before the count
/// are read back for the outputs and the bundle.
#[test]
fn resume_keeps_rewraps_or_replaces_partial_keys() {
    let mut lib = Lib::new();
    lib.generate(&Lib::params(500, 50, "0x2000,KSM1"), &RunOptions { batch: 10, ..RunOptions::default() }).unwrap();
    // Pretend the run crashed after its second batch.
    let conn = rusqlite::Connection::open(lib.p("ledger.db")).unwrap();
    conn.execute("UPDATE runs SET done = 20, finished_at = NULL WHERE id = 1", []).unwrap();
    drop(conn);
    let aeads = lib.p("aeads");
    let path = |kh: &str, n: u64| aeads.join(relative_path(kh, &PublicId::from_number(n, 6).unwrap()));
    let before = |n: u64| (std::fs::read(path("0x2000", n)).unwrap(), std::fs::read(path("KSM1", n)).unwrap());
    let kept: Vec<_> = (500..530).filter(|n| ![520, 521, 522].contains(n)).map(|n| (n, before(n))).collect();
    let rewrap_0 = std::fs::read(path("0x2000", 520)).unwrap();
    std::fs::remove_file(path("KSM1", 520)).unwrap(); // re-wrapped to KSM1 from 0x2000
    std::fs::write(path("0x2000", 521), b"YubiHSM AEAD\n").unwrap(); // truncated; KSM1 cannot export: replaced
    let replaced_1 = std::fs::read(path("KSM1", 521)).unwrap();
    std::fs::remove_file(path("0x2000", 522)).unwrap(); // re-wrapping needs an export from KSM1: replaced
    for n in 530..550 {
        std::fs::remove_file(path("0x2000", n)).unwrap();
        std::fs::remove_file(path("KSM1", n)).unwrap();
    }
    let (csv, bundle) = (lib.p("resumed.csv"), lib.p("run.bundle"));
    let opts = RunOptions { yubikey_csv: Some(&csv), bundle: Some((&bundle, &lib.key)), ..RunOptions::default() };
    let report = personalizer::resume(&lib.hsm, &mut lib.ledger, Some(1), &opts, &mut |_| {}).unwrap();
    assert_eq!((report.first.to_string().as_str(), report.last.to_string().as_str()), ("cccccccccbvf", "cccccccccddg"));
    assert_eq!((report.kept, report.rewrapped, report.replaced, report.generated), (7, 1, 2, 20));
    let secrets = check_complete_run(&aeads, 500, 50, &csv);
    check_bundle(&bundle, &lib.key.verifying_key(), &aeads, 500, 50);
    for (n, bytes) in kept {
        assert_eq!(before(n), bytes, "key {n} was kept as it was");
    }
    assert_eq!(std::fs::read(path("0x2000", 520)).unwrap(), rewrap_0, "re-wrapped, not regenerated");
    assert_ne!(std::fs::read(path("KSM1", 521)).unwrap(), replaced_1, "a new secret for a key never output");
    assert_eq!(secrets.len(), 50);
    assert_eq!(lib.runs(), [(500, 50, 50, true)]);
}
