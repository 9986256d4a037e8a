//! The real `validator serve` binary killed with SIGKILL under load,
//! restarted on the same database: every OTP it had answered `OK` is
//! refused when replayed (`synchronous=full`, the default).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

#[path = "oracles/site.rs"]
mod site;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use hsm::soft::format::KdfParams;
use hsm::soft::SoftHsm;
use hsm::{Flags, Password};
use httpd::client::Connection;
use ksm::store::AeadStore;
use otp::{HandleKey, PublicId};
use site::{nonce, ticket, LoadKey, Server, KH, PASSWORD};
use validator::counters::SqliteCounters;
use validator::protocol::{parse_response, signed_query, verify_response};

/// Load threads, one YubiKey each (so every OTP sent is fresh).
const THREADS: usize = 8;

/// Files of one validator site: keystore, password, AEAD store, database.
struct Files {
    dir: tempfile::TempDir,
    keys: Vec<LoadKey>,
}

impl Files {
    fn new(n: u64) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let hsm = SoftHsm::create(&dir.path().join("v.ks"), &Password::new(PASSWORD).unwrap(), KdfParams::INSECURE_FOR_TESTS).unwrap();
        hsm.import_handles(&[(KH, Flags::PERSONALIZER | Flags::OTP_DECODE | Flags::EXPORT, HandleKey::new(&[0x5e; 32]).unwrap())]).unwrap();
        std::fs::write(dir.path().join("pw"), format!("{PASSWORD}\n")).unwrap();
        let store = AeadStore::open(&dir.path().join("aeads.db")).unwrap();
        let keys = (1..=n)
            .map(|i| {
                let id = PublicId::from_number(0x2000 + i, 6).unwrap();
                LoadKey::provision(&hsm, &store, id)
            })
            .collect();
        Self { dir, keys }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_validator"));
        cmd.args(args)
            .arg("--db")
            .arg(self.path("validator.db"))
            .arg("--keystore")
            .arg(self.path("v.ks"))
            .arg("--password-file")
            .arg(self.path("pw"))
            .env_remove("OTP_KEYSTORE")
            .env_remove("OTP_KEYSTORE_PASSWORD_FILE")
            .env_remove("OTP_VALIDATOR_DB")
            .env_remove("OTP_VALIDATOR_CONFIG");
        cmd
    }

    /// `validator client add --id N`: the key it prints.
    fn add_client(&self, id: u64) -> Vec<u8> {
        let out = self.command(&["client", "add", "--id", &id.to_string()]).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let stdout = String::from_utf8(out.stdout).unwrap();
        assert!(stdout.lines().any(|l| l == format!("id={id}")), "{stdout}");
        let b64 = stdout.lines().find_map(|l| l.strip_prefix("key=")).unwrap();
        base64::engine::general_purpose::STANDARD.decode(b64).unwrap()
    }
}

/// `validator serve` over the files, with `extra` flags.
fn serve(files: &Files, extra: &[&str]) -> Server {
    let mut cmd = files.command(&["serve", "--listen", "127.0.0.1:0"]);
    cmd.arg("--store").arg(files.path("aeads.db")).args(extra).env("RUST_LOG", "warn");
    Server::spawn(cmd)
}

/// One verify over a kept-alive connection: the body, if one came.
fn verify(conn: &mut Connection, key: &[u8], otp: &str, nonce: &str) -> Option<String> {
    let q = signed_query(&[("id", "1"), ("otp", otp), ("nonce", nonce)], Some(key));
    let resp = conn.get(&format!("/wsapi/2.0/verify?{q}")).ok()?;
    assert_eq!(resp.head.status, 200);
    Some(String::from_utf8(resp.body).unwrap())
}

/// The answer's status, after checking its signature and echo.
fn checked_status(body: &str, key: &[u8], otp: &str, nonce: &str) -> String {
    assert!(verify_response(body, key), "bad signature: {body:?}");
    let fields = parse_response(body).unwrap();
    let status = fields["status"].clone();
    if status != "BACKEND_ERROR" {
        assert_eq!((fields.get("otp").map(String::as_str), fields.get("nonce").map(String::as_str)), (Some(otp), Some(nonce)), "{body:?}");
    }
    status
}

/// An OTP answered `OK`: (thread/key, ticket, otp, nonce).
type Accepted = (usize, usize, String, String);

#[test]
fn kill9_under_load_then_every_accepted_otp_is_refused_on_replay() {
    let files = Files::new(THREADS as u64);
    let key = Arc::new(files.add_client(1));
    let server = serve(&files, &[]);
    let addr = server.addr;

    // Load: THREADS threads, one YubiKey each, fresh OTPs back to back.
    // An OTP is recorded only once its whole answer, OK and signed, is in.
    let accepted = Arc::new(Mutex::new(Vec::<Accepted>::new()));
    let unanswered = Arc::new(AtomicUsize::new(0));
    let loaders: Vec<_> = (0..THREADS)
        .map(|t| {
            let (key, accepted, unanswered, yk) = (key.clone(), accepted.clone(), unanswered.clone(), files.keys[t].clone());
            std::thread::spawn(move || {
                let mut conn = Connection::new(addr, Duration::from_secs(10));
                let started = Instant::now();
                for i in 0.. {
                    assert!(started.elapsed() < Duration::from_secs(60), "the server was never killed");
                    let (otp, n) = (yk.otp(ticket(i)), nonce(t, i, "load"));
                    let Some(body) = verify(&mut conn, &key, &otp, &n) else {
                        unanswered.fetch_add(1, Ordering::Relaxed);
                        return;
                    };
                    // Under load before the kill, every fresh OTP is OK.
                    assert_eq!(checked_status(&body, &key, &otp, &n), "OK", "{body}");
                    accepted.lock().unwrap().push((t, i, otp, n));
                }
            })
        })
        .collect();
    let started = Instant::now();
    while (accepted.lock().unwrap().len() < 400 || started.elapsed() < Duration::from_millis(1500))
        && started.elapsed() < Duration::from_secs(30)
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    let at_kill = accepted.lock().unwrap().len();
    server.kill9();
    for l in loaders {
        l.join().unwrap();
    }
    let accepted = accepted.lock().unwrap().clone();
    assert!(accepted.len() > 100, "only {} OTPs accepted under load", accepted.len());
    assert_eq!(unanswered.load(Ordering::Relaxed), THREADS, "every loader was cut off by the kill");

    // Restart on the same database and replay everything that was OK.
    let server = serve(&files, &[]);
    let addr = server.addr;
    let mut by_key: Vec<Vec<Accepted>> = vec![Vec::new(); THREADS];
    for a in &accepted {
        by_key[a.0].push(a.clone());
    }
    let tally = Arc::new(Mutex::new(BTreeMap::<(bool, String), usize>::new()));
    let replayers: Vec<_> = by_key
        .iter()
        .cloned()
        .map(|mine| {
            let (key, tally) = (key.clone(), tally.clone());
            std::thread::spawn(move || {
                let mut conn = Connection::new(addr, Duration::from_secs(10));
                for (t, i, otp, n) in &mine {
                    // The captured request as it was, then with a new nonce.
                    for (same, n) in [(true, n.clone()), (false, nonce(*t, *i, "again"))] {
                        let body = verify(&mut conn, &key, otp, &n).expect("the restarted server answers");
                        let status = checked_status(&body, &key, otp, &n);
                        *tally.lock().unwrap().entry((same, status)).or_default() += 1;
                    }
                }
            })
        })
        .collect();
    for r in replayers {
        r.join().unwrap();
    }
    let tally = tally.lock().unwrap().clone();
    let count = |same: bool, status: &str| tally.get(&(same, status.to_owned())).copied().unwrap_or(0);
    println!(
        "kill -9 under load (synchronous=full, {THREADS} threads): {} OTPs answered OK before the kill ({at_kill} when it was sent), \
         {} requests cut off; after restart, replayed with their nonce: {} REPLAYED_REQUEST + {} REPLAYED_OTP, \
         with a new nonce: {} REPLAYED_OTP; OK: {}",
        accepted.len(),
        THREADS,
        count(true, "REPLAYED_REQUEST"),
        count(true, "REPLAYED_OTP"),
        count(false, "REPLAYED_OTP"),
        count(true, "OK") + count(false, "OK"),
    );
    assert_eq!(count(true, "OK") + count(false, "OK"), 0, "an OTP answered OK before the crash was accepted again: {tally:?}");
    assert_eq!(count(true, "REPLAYED_REQUEST") + count(true, "REPLAYED_OTP"), accepted.len(), "{tally:?}");
    assert_eq!(count(false, "REPLAYED_OTP"), accepted.len(), "{tally:?}");
    // At most the last OK of each key can be the very same request again
    // (an unanswered later OTP may have been committed before the kill).
    assert!(count(true, "REPLAYED_REQUEST") <= THREADS, "{tally:?}");

    // The restarted server works: the next OTP of each key is OK.
    let mut conn = Connection::new(addr, Duration::from_secs(10));
    for (t, yk) in files.keys.iter().enumerate() {
        let next = by_key[t].iter().map(|a| a.1).max().map_or(0, |i| i + 2);
        let (otp, n) = (yk.otp(ticket(next)), nonce(t, next, "next"));
        let body = verify(&mut conn, &key, &otp, &n).unwrap();
        assert_eq!(checked_status(&body, &key, &otp, &n), "OK", "{body}");
    }
    drop(conn);
    let log = server.stop();
    assert!(!log.contains("panicked"), "{log}");

    // The stored counters are at least every OTP answered OK.
    let store = SqliteCounters::open(&files.path("validator.db")).unwrap();
    for (t, yk) in files.keys.iter().enumerate() {
        let stored = store.get(&yk.id).unwrap().unwrap().counters;
        let highest = by_key[t].iter().map(|a| ticket(a.1)).max().unwrap();
        assert!(stored > highest, "key {t}: stored {stored} ≤ highest accepted {highest}");
    }
}

/// A keystore that is missing, or the wrong password, stops `validator
/// serve` before it listens, saying why: it never serves an answer it
/// cannot back.
#[test]
fn serve_refuses_to_start_without_its_keystore() {
    let files = Files::new(1);
    files.add_client(1);
    let run = |keystore: &Path, password_file: &Path| {
        let out = Command::new(env!("CARGO_BIN_EXE_validator"))
            .args(["serve", "--listen", "127.0.0.1:0", "--db"])
            .arg(files.path("validator.db"))
            .arg("--keystore")
            .arg(keystore)
            .arg("--password-file")
            .arg(password_file)
            .arg("--store")
            .arg(files.path("aeads.db"))
            .env_remove("OTP_VALIDATOR_CONFIG")
            .output()
            .unwrap();
        assert!(!out.status.success());
        String::from_utf8(out.stderr).unwrap()
    };
    let e = run(&files.path("gone.ks"), &files.path("pw"));
    assert!(e.contains("gone.ks") && !e.contains("serving"), "{e}");
    std::fs::write(files.path("wrong"), "nope\n").unwrap();
    let e = run(&files.path("v.ks"), &files.path("wrong"));
    assert!(e.contains("wrong password") && !e.contains("serving"), "{e}");
}
