//! Real pam_yubico (Debian's libpam-yubico, with libykclient) against the
//! `validator serve` binary, driven by `pamtester` through throwaway PAM
//! service files (validation-protocol.md §6).
//!
//! Needs root: PAM reads its services from `/etc/pam.d`. CI runs the suite
//! as root; anywhere else these tests fail and say so. Every service file is
//! removed by a guard, also when an assertion fails.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

#[path = "oracles/site.rs"]
mod site;

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

use appliance_tests::tools;
use site::{garbled, Site};

/// pamtester's messages (to stdout on success, stderr otherwise).
const SUCCESS: &str = "pamtester: successfully authenticated";
/// `PAM_AUTH_ERR`.
const AUTH_ERR: &str = "pamtester: Authentication failure";
/// `PAM_AUTHINFO_UNAVAIL`.
const AUTHINFO_UNAVAIL: &str = "pamtester: Authentication service cannot retrieve authentication info";
/// `PAM_USER_UNKNOWN`.
const USER_UNKNOWN: &str = "pamtester: User not known to the underlying authentication module";

fn require_root() {
    let out = Command::new("id").arg("-u").output().unwrap();
    let uid = String::from_utf8(out.stdout).unwrap();
    assert_eq!(
        uid.trim(),
        "0",
        "the pam_yubico tests must run as root: they write throwaway PAM services to /etc/pam.d \
         (CI runs scripts/test.sh as root; run it with sudo)"
    );
}

/// `pamtester`, after checking that pam_yubico is installed.
fn require_pam_yubico() -> PathBuf {
    let pamtester = tools::require("pamtester", "pamtester");
    let module = ["/lib/security/pam_yubico.so", "/lib/x86_64-linux-gnu/security/pam_yubico.so", "/usr/lib/security/pam_yubico.so"];
    assert!(
        module.iter().any(|m| Path::new(m).is_file()),
        "pam_yubico.so not found in {module:?}: apt-get install libpam-yubico, {}",
        tools::HINT
    );
    pamtester
}

/// A PAM service `/etc/pam.d/otp-appliance-test-<pid>-<n>` running
/// pam_yubico alone, with its own debug log; the file is removed on drop.
struct PamService {
    pamtester: PathBuf,
    name: String,
    file: PathBuf,
    debug_log: PathBuf,
}

impl PamService {
    fn new(dir: &Path, client_id: u64, key: &str, url: &str, authfile: &Path) -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let name = format!("otp-appliance-test-{}-{n}", std::process::id());
        let debug_log = dir.join(format!("{name}.debug.log"));
        // pam_yubico only writes to a debug_file that already exists.
        std::fs::write(&debug_log, b"").unwrap();
        let file = Path::new("/etc/pam.d").join(&name);
        let service = format!(
            "auth required pam_yubico.so id={client_id} key={key} urllist={url} authfile={} debug debug_file={}\n\
             account required pam_permit.so\n",
            authfile.display(),
            debug_log.display()
        );
        let pamtester = require_pam_yubico();
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).open(&file).unwrap();
        // From here on the guard owns the file.
        let me = Self { pamtester, name, file, debug_log };
        f.write_all(service.as_bytes()).unwrap();
        me
    }

    /// `echo INPUT | pamtester -v SERVICE USER authenticate`.
    fn login(&self, user: &str, input: &str) -> Login {
        std::fs::write(&self.debug_log, b"").unwrap();
        let mut child = Command::new(&self.pamtester)
            .args(["-v", &self.name, user, "authenticate"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(format!("{input}\n").as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        let output = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        Login { code: out.status.code(), output, debug: std::fs::read_to_string(&self.debug_log).unwrap() }
    }
}

impl Drop for PamService {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.file);
    }
}

/// What one pamtester run showed.
struct Login {
    code: Option<i32>,
    output: String,
    /// pam_yubico's debug log of this run.
    debug: String,
}

impl Login {
    /// pamtester's verdict line is `message`, with exit status 0 for
    /// success and 1 otherwise.
    #[track_caller]
    fn expect(&self, message: &str) -> &Self {
        let code = if message == SUCCESS { 0 } else { 1 };
        assert!(
            self.code == Some(code) && self.output.lines().any(|l| l.ends_with(message)),
            "wanted {message:?} (exit {code}), got exit {:?}:\n{}\n--- debug log:\n{}",
            self.code,
            self.output,
            self.debug
        );
        self
    }

    /// pam_yubico's debug log has a line containing `text`.
    #[track_caller]
    fn logged(&self, text: &str) -> &Self {
        assert!(self.debug.contains(text), "debug log lacks {text:?}:\n{}", self.debug);
        self
    }

    /// pam_yubico never called the validation server.
    #[track_caller]
    fn no_request(&self) -> &Self {
        assert!(!self.debug.contains("ykclient return value"), "pam_yubico called the server:\n{}", self.debug);
        self
    }

    /// ykclient's return value as pam_yubico logs it, e.g.
    /// `ykclient return value (2): Yubikey OTP was replayed (REPLAYED_OTP)`.
    #[track_caller]
    fn ykclient_rc(&self, rc: u32, name: &str) -> &Self {
        let want = if rc == 0 { "ykclient return value (0): Success".to_owned() } else { format!("ykclient return value ({rc}): ") };
        let line = self.debug.lines().find(|l| l.contains("ykclient return value"));
        let line = line.unwrap_or_else(|| panic!("no ykclient call:\n{}", self.debug));
        let named = rc == 0 || line.ends_with(&format!("({name})"));
        assert!(line.contains(&want) && named, "wanted ykclient rc {rc} {name}, got: {line}");
        self
    }
}

/// pam_yubico's authfile, written by `validator authfile` from a YAML map,
/// giving alice the first YubiKey and bob the second.
fn authfile(site: &Site) -> PathBuf {
    let (alice, bob) = (&site.yubikeys[0].public_id, &site.yubikeys[1].public_id);
    let map = site.dir.path().join("users.yaml");
    std::fs::write(&map, format!("alice: [{alice}]\nbob: {bob}\n")).unwrap();
    let out_file = site.dir.path().join("authfile");
    let out = site.validator(&["authfile", "--map", site::path(&map), "--out", site::path(&out_file), "--store", site::path(&site.store)]);
    assert!(out.status.success(), "validator authfile: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(std::fs::read_to_string(&out_file).unwrap(), format!("alice:{alice}\nbob:{bob}\n"));
    out_file
}

/// A fresh OTP logs in; the same OTP again, and an older counter, fail
/// with REPLAYED_OTP (PAM_AUTH_ERR); a newer one logs in again; a
/// password typed before the OTP is split off; bob logs in with his own
/// YubiKey. The validator's /metrics agrees with each verdict.
#[test]
fn pam_yubico_logs_in_once_per_otp() {
    require_root();
    require_pam_yubico();
    let site = Site::new(2);
    let key = site.add_client(1);
    let auth = authfile(&site);
    let server = site.serve();
    let pam = PamService::new(site.dir.path(), 1, &key, &server.url(), &auth);
    let (alice, bob) = (&site.yubikeys[0], &site.yubikeys[1]);

    let fresh = alice.otp(0x0010, 3);
    let before = server.counts();
    pam.login("alice", &fresh)
        .expect(SUCCESS)
        .ykclient_rc(0, "OK")
        .logged("Match user/token as alice/")
        .logged("done. [Success]")
        .logged(&format!("&otp={fresh}&timestamp=1&h="));
    assert_eq!(server.moved_since(&before), [("OK".to_owned(), 1)]);

    let before = server.counts();
    pam.login("alice", &fresh).expect(AUTH_ERR).ykclient_rc(2, "REPLAYED_OTP");
    assert_eq!(server.moved_since(&before), [("REPLAYED_OTP".to_owned(), 1)]);

    // An OTP the YubiKey made before the accepted one, never sent.
    let before = server.counts();
    pam.login("alice", &alice.otp(0x000f, 9)).expect(AUTH_ERR).ykclient_rc(2, "REPLAYED_OTP");
    // Same counter, earlier session use.
    pam.login("alice", &alice.otp(0x0010, 2)).expect(AUTH_ERR).ykclient_rc(2, "REPLAYED_OTP");
    assert_eq!(server.moved_since(&before), [("REPLAYED_OTP".to_owned(), 2)]);

    // The next press of the key logs in again.
    let before = server.counts();
    pam.login("alice", &alice.otp(0x0010, 4)).expect(SUCCESS);
    pam.login("alice", &alice.otp(0x0011, 0)).expect(SUCCESS);

    // Password and OTP typed together: pam_yubico keeps the leading bytes
    // as the system password and validates the OTP.
    pam.login("alice", &format!("hunter2{}", alice.otp(0x0011, 1)))
        .expect(SUCCESS)
        .logged("Skipping first 7 bytes")
        .logged("Extracted a probable system password");
    // Bob's own YubiKey.
    pam.login("bob", &bob.otp(0x0001, 0)).expect(SUCCESS).logged("Match user/token as bob/");
    assert_eq!(server.moved_since(&before), [("OK".to_owned(), 4)]);

    // A garbled OTP of alice's YubiKey: BAD_OTP, also PAM_AUTH_ERR.
    let before = server.counts();
    pam.login("alice", &garbled(&alice.otp(0x0012, 0))).expect(AUTH_ERR).ykclient_rc(1, "BAD_OTP");
    assert_eq!(server.moved_since(&before), [("BAD_OTP".to_owned(), 1)]);

    drop(pam);
    server.stop();
}

/// The mapping decides before the server is asked: a YubiKey listed for
/// another user, or a user with no YubiKey, fails with no request at all.
/// A wrong client key fails on the server's signature (ykclient rc 107),
/// and a disabled client reads NO_SUCH_CLIENT (signed with its key, so not
/// a signature failure as with yubikey-val).
#[test]
fn pam_yubico_refuses_unmapped_tokens_wrong_keys_and_disabled_clients() {
    require_root();
    require_pam_yubico();
    let site = Site::new(2);
    let key = site.add_client(1);
    let auth = authfile(&site);
    let server = site.serve();
    let pam = PamService::new(site.dir.path(), 1, &key, &server.url(), &auth);
    let (alice, bob) = (&site.yubikeys[0], &site.yubikeys[1]);

    // Alice with bob's YubiKey: the token is not hers.
    let bobs = bob.otp(0x0005, 0);
    let before = server.counts();
    pam.login("alice", &bobs).expect(AUTH_ERR).logged("Unauthorized token for this user").no_request();
    // Carol has no YubiKey at all: refused before the prompt is even read.
    pam.login("carol", &alice.otp(0x0005, 0)).expect(USER_UNKNOWN).logged("No tokens found for user").no_request();
    assert_eq!(server.moved_since(&before), [], "a request reached the validator");
    // Bob's OTP was never sent, so it still logs bob in.
    pam.login("bob", &bobs).expect(SUCCESS);

    // A service configured with another key than the client's: the server
    // refuses the request's h (BAD_SIGNATURE, signed with the client's
    // real key), and ykclient, checking with the wrong key, reports the
    // answer's signature as invalid.
    let wrong_key = "AAECAwQFBgcICQoLDA0ODxAREhM=";
    assert_ne!(wrong_key, key);
    let wrong = PamService::new(site.dir.path(), 1, wrong_key, &server.url(), &auth);
    let otp = alice.otp(0x0006, 0);
    let before = server.counts();
    wrong.login("alice", &otp).expect(AUTHINFO_UNAVAIL).ykclient_rc(107, "BAD_SERVER_SIGNATURE");
    assert_eq!(server.moved_since(&before), [("BAD_SIGNATURE".to_owned(), 1)]);
    // The refused request did not spend the OTP.
    pam.login("alice", &otp).expect(SUCCESS);

    // An unknown client id (its answer is signed with the empty key, as
    // yubikey-val does): a signature failure for pam_yubico.
    let stranger = PamService::new(site.dir.path(), 2, &key, &server.url(), &auth);
    let before = server.counts();
    stranger.login("alice", &alice.otp(0x0007, 0)).expect(AUTHINFO_UNAVAIL).ykclient_rc(107, "BAD_SERVER_SIGNATURE");
    assert_eq!(server.moved_since(&before), [("NO_SUCH_CLIENT".to_owned(), 1)]);

    // Client 1 disabled while the server runs.
    site.disable_client(1);
    server.wait_for_status(1, &garbled(&alice.otp(0x0100, 0)), "NO_SUCH_CLIENT");
    let before = server.counts();
    pam.login("alice", &alice.otp(0x0007, 0)).expect(AUTHINFO_UNAVAIL).ykclient_rc(5, "NO_SUCH_CLIENT");
    assert_eq!(server.moved_since(&before), [("NO_SUCH_CLIENT".to_owned(), 1)]);

    drop((pam, wrong, stranger));
    let log = server.stop();
    assert!(!log.contains("ERROR"), "the validator logged errors:\n{log}");
}

/// The guard removes its service file even when the test panics.
#[test]
fn pam_service_files_are_removed_on_panic() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let file = std::panic::catch_unwind(|| {
        let pam = PamService::new(dir.path(), 1, "AAAA", "http://127.0.0.1:9/wsapi/2.0/verify", &dir.path().join("authfile"));
        assert!(pam.file.is_file());
        std::panic::panic_any(pam.file.clone());
    })
    .unwrap_err()
    .downcast::<PathBuf>()
    .unwrap();
    assert!(file.starts_with("/etc/pam.d") && !file.exists(), "{} left behind", file.display());
}
