//! `personalizer generate` throughput and memory: keys provisioned per
//! second with the soft backend, two key handles, every AEAD file, the
//! ledger and a signed transfer bundle counted; peak RSS at 10,000 and
//! 100,000 keys to show that memory stays flat.
//!
//! `cargo bench -p personalizer --bench generate` (release profile). Each
//! measurement runs in a fresh child process (this binary re-executed), so
//! its peak RSS (`VmHWM`) is its own. `GENERATE_BENCH_COUNTS=10000,100000`
//! picks the sizes; `GENERATE_BENCH_DIR` the file system (default: the
//! temporary directory).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use hsm::signing::SigningKey;
use hsm::soft::format::KdfParams;
use hsm::soft::SoftHsm;
use hsm::{Flags, Password};
use ksm::aead_dir::KeyHandleDir;
use otp::{HandleKey, KeyHandle};
use personalizer::ledger::Ledger;
use personalizer::{generate, GenerateParams, RunOptions, StartId};

const MODES: [(&str, &str); 3] = [
    ("lib", "library: 2 AEAD files per key, ledger, signed bundle"),
    ("lib+csv", "library: the same plus a yubikey-csv (one export decrypt per key)"),
    ("binary", "release binary in an officer's session, end to end: keystore unlock, session check, AEADs, ledger, bundle, audit log"),
];

fn vm_hwm_kib(status: &str) -> u64 {
    status.lines().find_map(|l| l.strip_prefix("VmHWM:")).and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok()).unwrap_or(0)
}

fn keystore(dir: &Path) -> SoftHsm {
    let hsm = SoftHsm::create(&dir.join("ks"), &Password::new("bench").unwrap(), KdfParams::INSECURE_FOR_TESTS).unwrap();
    hsm.import_handles(&[
        (KeyHandle::new(0x2000), Flags::PERSONALIZER, HandleKey::new(&[7; 32]).unwrap()),
        (KeyHandle::new(0x314d_534b), Flags::IMPORT, HandleKey::new(&[9; 16]).unwrap()),
    ])
    .unwrap();
    hsm
}

/// The binary with the bench's home and keystore password.
fn personalizer_cmd(dir: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_personalizer"));
    cmd.env("PERSONALIZER_HOME", dir.join("home")).env("PERSONALIZER_KEYSTORE_PASSWORD_FILE", dir.join("pw")).env_remove("RUST_LOG");
    cmd
}

fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// Sign the challenge of an authdata file with `key`, as `openssl dgst
/// -sha256 -sign` does.
fn sign_authdata(file: &Path, key: &SigningKey) {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(file).unwrap()).unwrap();
    let challenge = b64.decode(json["Data"][0]["Digest"].as_str().unwrap()).unwrap();
    json["Data"][0]["Signature"] = b64.encode(key.sign(&challenge).unwrap()).into();
    std::fs::write(file, json.to_string()).unwrap();
}

/// An initialised home with one crypto officer (2FA key `key`) logged in,
/// as on the laptop: the session file.
fn laptop(dir: &Path, key: &SigningKey) -> std::path::PathBuf {
    std::fs::write(dir.join("pw"), "bench\n").unwrap();
    run_ok(personalizer_cmd(dir).args(["init", "--hsm-id", "bench", "--keystore"]).arg(dir.join("ks")));
    let config = dir.join("home/personalizer.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, text.replace("operator_kdf_memory_mib = 64", "operator_kdf_memory_mib = 1")).unwrap();
    std::fs::write(dir.join("alice.pw"), "alice password\n").unwrap();
    std::fs::write(dir.join("alice.pub.pem"), key.verifying_key().to_pem().unwrap()).unwrap();
    run_ok(personalizer_cmd(dir).args(["operator", "add", "alice", "--password-file"]).arg(dir.join("alice.pw")));
    let (auth, public, pw) = (dir.join("set2fa.json"), dir.join("alice.pub.pem"), dir.join("alice.pw"));
    run_ok(
        personalizer_cmd(dir)
            .args(["operator", "set-2fa", "alice", "--public-key"])
            .arg(&public)
            .arg("--authdata")
            .arg(&auth)
            .arg("--password-file")
            .arg(&pw),
    );
    sign_authdata(&auth, key);
    run_ok(personalizer_cmd(dir).args(["operator", "set-2fa", "alice", "--authdata"]).arg(&auth));
    let (login, session) = (dir.join("login.json"), dir.join("alice.session"));
    run_ok(
        personalizer_cmd(dir)
            .args(["login", "alice", "--authdata"])
            .arg(&login)
            .arg("--password-file")
            .arg(&pw)
            .arg("--session-out")
            .arg(&session),
    );
    sign_authdata(&login, key);
    run_ok(personalizer_cmd(dir).args(["login", "alice", "--authdata"]).arg(&login).arg("--session-out").arg(&session));
    session
}

/// A kept directory: `path()` as a `TempDir` has.
struct Dir(std::path::PathBuf);

impl Dir {
    fn path(&self) -> &Path {
        &self.0
    }
}

/// One measurement, in this process: prints `RESULT <secs> <vmhwm kB>`.
fn child(mode: &str, count: u64, base: &Path) {
    // The parent removes every run's files at the very end: on a file
    // system without a journal, ext4 skips inodes freed in the last minutes
    // when allocating (`recently_deleted`), so deleting 200,000 files just
    // before a measurement slows the next one several times over.
    let dir = tempfile::Builder::new().prefix("generate-bench-").tempdir_in(base).unwrap().keep();
    let dir = Dir(dir);
    let hsm = keystore(dir.path());
    let key = SigningKey::generate().unwrap();
    let out = dir.path().join("aeads");
    let (csv, bundle, ledger_path) = (dir.path().join("secrets.csv"), dir.path().join("run.bundle"), dir.path().join("ledger.db"));
    let secs = if mode == "binary" {
        drop(hsm);
        let session = laptop(dir.path(), &key);
        let t = Instant::now();
        let mut proc = personalizer_cmd(dir.path())
            .arg("generate")
            .args(["--count", &count.to_string(), "--start-public-id", "1", "--key-handles", "0x2000,KSM1", "--out"])
            .arg(&out)
            .arg("--bundle")
            .arg(&bundle)
            .env("PERSONALIZER_SESSION", &session)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // VmHWM only grows: the last sample before exit is the peak, give or
        // take the final few milliseconds.
        let mut hwm = 0;
        let status = loop {
            if let Ok(s) = std::fs::read_to_string(format!("/proc/{}/status", proc.id())) {
                hwm = hwm.max(vm_hwm_kib(&s));
            }
            if let Some(st) = proc.try_wait().unwrap() {
                break st;
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        assert!(status.success());
        let secs = t.elapsed().as_secs_f64();
        println!("RESULT {secs} {hwm}");
        return;
    } else {
        let mut ledger = Ledger::open(&ledger_path).unwrap();
        let params = GenerateParams {
            count,
            start: StartId(1),
            public_id_chars: 12,
            key_handles: vec!["0x2000".parse::<KeyHandleDir>().unwrap(), "KSM1".parse().unwrap()],
            random_nonce: false,
        };
        let opts = RunOptions {
            yubikey_csv: (mode == "lib+csv").then_some(csv.as_path()),
            bundle: Some((bundle.as_path(), &key)),
            writers: std::env::var("GENERATE_BENCH_WRITERS").map_or(generate::DEFAULT_WRITERS, |w| w.parse().unwrap()),
            ..RunOptions::default()
        };
        let t = Instant::now();
        let report = generate(&hsm, &mut ledger, &out, &params, &opts, &mut |_| {}).unwrap();
        let secs = t.elapsed().as_secs_f64();
        assert_eq!(report.count, count);
        assert_eq!(report.manifest.unwrap().count, count);
        secs
    };
    let hwm = vm_hwm_kib(&std::fs::read_to_string("/proc/self/status").unwrap());
    println!("RESULT {secs} {hwm}");
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let base = std::env::var_os("GENERATE_BENCH_DIR").map_or_else(std::env::temp_dir, Into::into);
    if args.get(1).map(String::as_str) == Some("child") {
        child(&args[2], args[3].parse().unwrap(), &base);
        return;
    }
    let counts: Vec<u64> = std::env::var("GENERATE_BENCH_COUNTS")
        .unwrap_or_else(|_| "10000,100000".to_owned())
        .split(',')
        .map(|c| c.trim().parse().unwrap())
        .collect();
    println!("personalizer generate: soft backend, 2 key handles (AES-256 0x2000, AES-128 KSM1), batches of 1,000");
    println!("files under {}", base.display());
    println!();
    println!("| mode | keys | seconds | keys/s | peak RSS (VmHWM) |");
    println!("|---|---:|---:|---:|---:|");
    for (mode, _) in MODES {
        for &count in &counts {
            let out = Command::new(std::env::current_exe().unwrap()).args(["child", mode, &count.to_string()]).output().unwrap();
            assert!(out.status.success(), "{mode} {count}: {}", String::from_utf8_lossy(&out.stderr));
            let text = String::from_utf8(out.stdout).unwrap();
            let line = text.lines().find_map(|l| l.strip_prefix("RESULT ")).unwrap();
            let mut f = line.split(' ');
            let secs: f64 = f.next().unwrap().parse().unwrap();
            let hwm: u64 = f.next().unwrap().parse().unwrap();
            #[allow(clippy::cast_precision_loss)]
            let rate = count as f64 / secs;
            println!("| {mode} | {count} | {secs:.2} | {rate:.0} | {:.1} MiB |", hwm as f64 / 1024.0);
        }
    }
    for e in std::fs::read_dir(&base).unwrap().flatten() {
        if e.file_name().to_string_lossy().starts_with("generate-bench-") {
            std::fs::remove_dir_all(e.path()).unwrap();
        }
    }
    println!();
    for (mode, what) in MODES {
        println!("- {mode}: {what}");
    }
}
