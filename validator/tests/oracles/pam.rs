//! Real pam_yubico driven by `pamtester` through throwaway PAM services:
//! the checks that it is there, the service guard and what a login showed.
//! Needs root (PAM reads `/etc/pam.d`).
//!
//! Included with `#[path]` by the test binaries that log in through PAM.
#![allow(dead_code)]

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

use appliance_tests::tools;

/// pamtester's messages (to stdout on success, stderr otherwise).
pub const SUCCESS: &str = "pamtester: successfully authenticated";
/// `PAM_AUTH_ERR`.
pub const AUTH_ERR: &str = "pamtester: Authentication failure";
/// `PAM_AUTHINFO_UNAVAIL`.
pub const AUTHINFO_UNAVAIL: &str = "pamtester: Authentication service cannot retrieve authentication info";
/// `PAM_USER_UNKNOWN`.
pub const USER_UNKNOWN: &str = "pamtester: User not known to the underlying authentication module";

pub fn require_root() {
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
pub fn require_pam_yubico() -> PathBuf {
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
/// pam_yubico alone over `urls` (its `urllist`, asked in parallel), with its
/// own debug log; the file is removed on drop.
pub struct PamService {
    pamtester: PathBuf,
    name: String,
    /// The service file under `/etc/pam.d`.
    pub file: PathBuf,
    debug_log: PathBuf,
}

impl PamService {
    pub fn new(dir: &Path, client_id: u64, key: &str, urls: &[String], authfile: &Path) -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let name = format!("otp-appliance-test-{}-{n}", std::process::id());
        let debug_log = dir.join(format!("{name}.debug.log"));
        // pam_yubico only writes to a debug_file that already exists.
        std::fs::write(&debug_log, b"").unwrap();
        let file = Path::new("/etc/pam.d").join(&name);
        let service = format!(
            "auth required pam_yubico.so id={client_id} key={key} urllist={} authfile={} debug debug_file={}\n\
             account required pam_permit.so\n",
            urls.join(";"),
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
    pub fn login(&self, user: &str, input: &str) -> Login {
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
pub struct Login {
    /// pamtester's exit status.
    pub code: Option<i32>,
    /// Its standard output and error.
    pub output: String,
    /// pam_yubico's debug log of this run.
    pub debug: String,
}

impl Login {
    /// The exit status, and the output followed by the debug log (to
    /// search and to show in assertion messages).
    pub fn outcome(&self) -> (Option<i32>, String) {
        (self.code, format!("{}\n--- debug log:\n{}", self.output, self.debug))
    }

    /// pamtester's verdict line is `message`, with exit status 0 for
    /// success and 1 otherwise.
    #[track_caller]
    pub fn expect(&self, message: &str) -> &Self {
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
    pub fn logged(&self, text: &str) -> &Self {
        assert!(self.debug.contains(text), "debug log lacks {text:?}:\n{}", self.debug);
        self
    }

    /// pam_yubico never called the validation server.
    #[track_caller]
    pub fn no_request(&self) -> &Self {
        assert!(!self.debug.contains("ykclient return value"), "pam_yubico called the server:\n{}", self.debug);
        self
    }

    /// ykclient's return value as pam_yubico logs it, e.g.
    /// `ykclient return value (2): Yubikey OTP was replayed (REPLAYED_OTP)`.
    #[track_caller]
    pub fn ykclient_rc(&self, rc: u32, name: &str) -> &Self {
        let want = if rc == 0 { "ykclient return value (0): Success".to_owned() } else { format!("ykclient return value ({rc}): ") };
        let line = self.debug.lines().find(|l| l.contains("ykclient return value"));
        let line = line.unwrap_or_else(|| panic!("no ykclient call:\n{}", self.debug));
        let named = rc == 0 || line.ends_with(&format!("({name})"));
        assert!(line.contains(&want) && named, "wanted ykclient rc {rc} {name}, got: {line}");
        self
    }
}
