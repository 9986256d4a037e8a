//! One validation site for the tests that drive independent clients
//! (pam_yubico through pamtester, ykclient, PyPI's yubico-client) against
//! the real `validator serve` binary.
//!
//! The keystore and the AEAD store are built in-process with YubiKey
//! secrets the test chooses, so that Debian's `ykgenerate` (libyubikey-dev)
//! can make every OTP independently of this workspace's token code. API
//! clients are added and disabled through the `validator client` command
//! line, as an operator would.
//!
//! Included with `#[path]` by several test binaries; each uses a part.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{BufRead as _, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use appliance_tests::tools;
use hsm::soft::format::KdfParams;
use hsm::soft::SoftHsm;
use hsm::{Flags, NonceSource, Password, SecurityModule};
use ksm::store::AeadStore;
use otp::token::TokenFields;
use otp::{Counters, HandleKey, KeyHandle, Otp, PublicId, YubiKeySecrets};

/// The keystore password (also in `Site::password_file`).
pub const PASSWORD: &str = "correct horse";
/// The key handle the YubiKey secrets are wrapped under.
pub const KH: KeyHandle = KeyHandle::new(0x2000);
/// The timestamp every generated OTP carries: `timestamp` in answers is
/// `(TS_HIGH << 16) | TS_LOW`.
pub const TS_LOW: u16 = 0xc0a8;
/// See [`TS_LOW`].
pub const TS_HIGH: u8 = 0x3e;

/// A YubiKey whose secrets the test knows.
pub struct YubiKey {
    /// 12 modhex characters, pam_yubico's default `token_id_length`.
    pub public_id: String,
    key_hex: String,
    uid_hex: String,
}

impl YubiKey {
    /// An OTP from Debian's `ykgenerate`, prefixed with the public id.
    pub fn otp(&self, counter: u16, session_use: u8) -> String {
        let ykgenerate = tools::require("ykgenerate", "libyubikey-dev");
        let out = Command::new(ykgenerate)
            .args([
                self.key_hex.as_str(),
                self.uid_hex.as_str(),
                &format!("{counter:04x}"),
                &format!("{TS_LOW:04x}"),
                &format!("{TS_HIGH:02x}"),
                &format!("{session_use:02x}"),
            ])
            .output()
            .unwrap();
        assert!(out.status.success(), "ykgenerate: {}", String::from_utf8_lossy(&out.stderr));
        let token = String::from_utf8(out.stdout).unwrap().trim().to_owned();
        assert_eq!(token.len(), 32, "ykgenerate printed {token:?}");
        format!("{}{token}", self.public_id)
    }
}

/// `otp` with one character of its token changed: its CRC no longer checks.
pub fn garbled(otp: &str) -> String {
    let mut bad = otp.to_owned();
    let at = otp.len() - 10;
    let flipped = if &otp[at..=at] == "c" { "b" } else { "c" };
    bad.replace_range(at..=at, flipped);
    bad
}

/// Keystore, AEAD store and validator database in a temporary directory.
pub struct Site {
    pub dir: tempfile::TempDir,
    pub keystore: PathBuf,
    pub password_file: PathBuf,
    pub store: PathBuf,
    pub db: PathBuf,
    pub yubikeys: Vec<YubiKey>,
}

impl Site {
    /// A site with `count` provisioned YubiKeys and no API client yet.
    pub fn new(count: u8) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let keystore = dir.path().join("validator.keystore");
        let password_file = dir.path().join("pw");
        std::fs::write(&password_file, format!("{PASSWORD}\n")).unwrap();
        let hsm = SoftHsm::create(&keystore, &Password::new(PASSWORD).unwrap(), KdfParams::INSECURE_FOR_TESTS).unwrap();
        let handle_key: [u8; 32] = std::array::from_fn(|i| u8::try_from(i).unwrap().wrapping_mul(29) ^ 0xa5);
        hsm.import_handles(&[(KH, Flags::IMPORT | Flags::OTP_DECODE, HandleKey::new(&handle_key).unwrap())]).unwrap();
        let store = dir.path().join("aeads.db");
        let aeads = AeadStore::open(&store).unwrap();
        let yubikeys = (1..=count)
            .map(|i| {
                let public_id = PublicId::from_number(0x0a0b_0c0d_0000 + u64::from(i), 6).unwrap();
                let key: [u8; 16] = std::array::from_fn(|j| u8::try_from(j).unwrap().wrapping_mul(13).wrapping_add(i.wrapping_mul(31)));
                let uid = [0x51, i, 0x53, 0x54, 0x55, 0x56];
                let plaintext = [key.as_slice(), uid.as_slice()].concat();
                let record = hsm.import_aead(KH, NonceSource::Given(public_id.aead_nonce().unwrap()), &plaintext).unwrap();
                aeads.put(&public_id, &record, "test", 0).unwrap();
                YubiKey { public_id: public_id.to_string(), key_hex: hex::encode(key), uid_hex: hex::encode(uid) }
            })
            .collect();
        drop(aeads);
        drop(hsm);
        let db = dir.path().join("validator.db");
        Self { dir, keystore, password_file, store, db, yubikeys }
    }

    /// Run the `validator` binary (none of its environment variables set).
    pub fn validator(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_validator"))
            .args(args)
            .env_remove("OTP_KEYSTORE")
            .env_remove("OTP_KEYSTORE_PASSWORD_FILE")
            .env_remove("OTP_VALIDATOR_DB")
            .env_remove("OTP_VALIDATOR_CONFIG")
            .output()
            .unwrap()
    }

    /// `validator client add --id N`: the new base64 key it prints.
    pub fn add_client(&self, id: u64) -> String {
        let out = self.validator(&[
            "client",
            "add",
            "--db",
            path(&self.db),
            "--keystore",
            path(&self.keystore),
            "--password-file",
            path(&self.password_file),
            "--id",
            &id.to_string(),
        ]);
        assert!(out.status.success(), "client add: {}", String::from_utf8_lossy(&out.stderr));
        let stdout = String::from_utf8(out.stdout).unwrap();
        let mut lines = stdout.lines();
        assert_eq!(lines.next(), Some(format!("id={id}").as_str()), "{stdout}");
        let key = lines.next().and_then(|l| l.strip_prefix("key=")).unwrap_or_else(|| panic!("no key printed: {stdout}"));
        key.to_owned()
    }

    /// `validator client disable --id N`.
    pub fn disable_client(&self, id: u64) {
        let out = self.validator(&["client", "disable", "--db", path(&self.db), "--id", &id.to_string()]);
        assert!(out.status.success(), "client disable: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// `validator serve` on a free loopback port, in-process KSM over the store.
    pub fn serve(&self) -> Server {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_validator"));
        cmd.args(["serve", "--listen", "127.0.0.1:0", "--db", path(&self.db), "--store", path(&self.store)])
            .args(["--keystore", path(&self.keystore), "--password-file", path(&self.password_file)])
            .env("RUST_LOG", "info");
        Server::spawn(cmd)
    }
}

/// A path as the `&str` the command lines take.
pub fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A running `validator serve`; killed on drop if not stopped.
pub struct Server {
    child: Option<Child>,
    pub addr: SocketAddr,
    log: Arc<Mutex<String>>,
    drain: Option<JoinHandle<()>>,
}

/// `validator_verify_requests_total` by status.
pub type Counts = BTreeMap<String, u64>;

impl Server {
    /// Spawn `command` (a `validator serve`, environment defaults for the
    /// keystore, database and config removed) and wait for the line saying
    /// where it serves; its standard error is kept draining into the log
    /// so that it never blocks on a full pipe.
    pub fn spawn(mut command: Command) -> Self {
        let mut child = command
            .env_remove("OTP_KEYSTORE")
            .env_remove("OTP_KEYSTORE_PASSWORD_FILE")
            .env_remove("OTP_VALIDATOR_DB")
            .env_remove("OTP_VALIDATOR_CONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stderr = BufReader::new(child.stderr.take().unwrap());
        let mut early = String::new();
        let addr: SocketAddr = loop {
            let mut line = String::new();
            if stderr.read_line(&mut line).unwrap() == 0 {
                let _ = child.kill();
                let _ = child.wait();
                panic!("validator serve exited before listening:\n{early}");
            }
            early.push_str(&line);
            if let Some(rest) = line.split("serving http://").nth(1) {
                break rest.split('/').next().unwrap().parse().unwrap();
            }
        };
        let log = Arc::new(Mutex::new(early));
        let drain = {
            let log = log.clone();
            std::thread::spawn(move || {
                for line in stderr.lines().map_while(Result::ok) {
                    let mut log = log.lock().unwrap();
                    log.push_str(&line);
                    log.push('\n');
                }
            })
        };
        Self { child: Some(child), addr, log, drain: Some(drain) }
    }

    /// SIGKILL: no chance to flush or clean up.
    pub fn kill9(mut self) {
        let mut child = self.child.take().unwrap();
        child.kill().unwrap();
        assert!(!child.wait().unwrap().success());
        self.drain.take().unwrap().join().unwrap();
    }

    /// The verify URL, as pam_yubico's `urllist=` and ykclient's `--url` take it.
    pub fn url(&self) -> String {
        format!("http://{}/wsapi/2.0/verify", self.addr)
    }

    /// One GET on a fresh connection: HTTP status and body.
    pub fn get(&self, target: &str) -> (u16, String) {
        let mut conn = httpd::client::Connection::new(self.addr, Duration::from_secs(10));
        let r = conn.get(target).unwrap();
        (r.head.status, String::from_utf8(r.body).unwrap())
    }

    /// The `status=` of an unsigned verify request sent directly.
    pub fn status_of(&self, client: u64, otp: &str) -> String {
        let (code, body) = self.get(&format!("/wsapi/2.0/verify?id={client}&otp={otp}&nonce=probeprobeprobeprobe"));
        assert_eq!(code, 200, "{body}");
        body.lines().find_map(|l| l.strip_prefix("status=")).unwrap_or_else(|| panic!("no status in {body:?}")).to_owned()
    }

    /// `/metrics`: the verify answers counted so far, by status.
    pub fn counts(&self) -> Counts {
        let (code, body) = self.get("/metrics");
        assert_eq!(code, 200, "{body}");
        let counts: Counts = body
            .lines()
            .filter_map(|l| l.strip_prefix("validator_verify_requests_total{status=\""))
            .map(|rest| {
                let (status, value) = rest.split_once("\"} ").unwrap();
                (status.to_owned(), value.trim().parse().unwrap())
            })
            .collect();
        assert!(counts.contains_key("OK") && counts.contains_key("REPLAYED_OTP"), "{body}");
        counts
    }

    /// The statuses whose counts moved since `before`, with how much.
    pub fn moved_since(&self, before: &Counts) -> Vec<(String, u64)> {
        self.counts()
            .into_iter()
            .filter_map(|(status, n)| {
                let was = before.get(&status).copied().unwrap_or(0);
                (n != was).then(|| (status, n - was))
            })
            .collect()
    }

    /// Wait (up to 5 s) until an unsigned request for `otp` from `client`
    /// gets `want` (a running server notices client changes within half
    /// a second). Use an OTP whose answer never spends it.
    pub fn wait_for_status(&self, client: u64, otp: &str, want: &str) {
        let start = Instant::now();
        loop {
            let got = self.status_of(client, otp);
            if got == want {
                return;
            }
            assert!(start.elapsed() < Duration::from_secs(5), "still {got}, not {want}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// What the server logged so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// SIGTERM; the server must exit 0. Returns its log.
    pub fn stop(mut self) -> String {
        let mut child = self.child.take().unwrap();
        let term = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
        assert!(term.success());
        let status = child.wait().unwrap();
        self.drain.take().unwrap().join().unwrap();
        let log = self.log();
        assert!(status.success(), "validator serve exited with {status}:\n{log}");
        log
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

// ---------------------------------------------------------------------------
// YubiKeys made in-process, for load: OTPs from this workspace's token code.

/// A YubiKey generated in-process: its AEAD stored, its secrets kept here.
#[derive(Clone)]
pub struct LoadKey {
    pub id: PublicId,
    pub secrets: YubiKeySecrets,
}

impl LoadKey {
    /// YubiKey `id`: an AEAD under [`KH`] generated by `hsm`, put in `store`.
    pub fn provision(hsm: &SoftHsm, store: &AeadStore, id: PublicId) -> Self {
        let rec = hsm.generate_yubikey_aeads(&[KH], NonceSource::Given(id.aead_nonce().unwrap())).unwrap().remove(0);
        store.put(&id, &rec, "test", 0).unwrap();
        Self { id, secrets: YubiKeySecrets::from_plaintext(&hsm.decrypt_aead(&rec).unwrap()).unwrap() }
    }

    /// The OTP with counters `c`.
    pub fn otp(&self, c: Counters) -> String {
        let t = TokenFields {
            uid: *self.secrets.uid.expose(),
            counter: c.counter(),
            session_use: c.session_use(),
            timestamp_low: 0x0101,
            timestamp_high: 0x02,
            rnd: 0x0303,
        }
        .build();
        Otp::new(self.id, t.encrypt(&self.secrets.key)).to_string()
    }
}

/// Ticket `i` of a YubiKey: fresh and increasing.
pub fn ticket(i: usize) -> Counters {
    Counters::new(u16::try_from(1 + i / 250).unwrap(), u8::try_from(i % 250).unwrap()).unwrap()
}

/// The nonce of ticket `i` of YubiKey `key`, tagged.
pub fn nonce(key: usize, i: usize, tag: &str) -> String {
    format!("{tag}k{key}i{i:0>16}")
}
