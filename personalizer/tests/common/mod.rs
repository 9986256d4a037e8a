//! A personalisation laptop for the tests: a keystore, an initialised
//! home, crypto officers with `openssl` keys, sessions and quorum
//! approvals, all through the `personalizer` binary.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};

use appliance_tests::softhsm2::TokenDir;
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use hsm::soft::SoftHsm;
use hsm::{Flags, Password};
use otp::KeyHandle;

pub const KEYSTORE_PASSWORD: &str = "keystore password";

pub struct Laptop {
    _tmp: tempfile::TempDir,
    pub dir: PathBuf,
    pub home: PathBuf,
    /// The token directory when the module is a SoftHSM2 token.
    pub softhsm2: Option<TokenDir>,
}

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

pub fn openssl(args: &[&str]) {
    let out = Command::new("openssl").args(args).output().expect("openssl is installed");
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

impl Laptop {
    /// A keystore (cheap KDF) and an initialised home with cheap operator
    /// password hashes.
    pub fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let home = dir.join("home");
        std::fs::write(dir.join("ks.pw"), format!("{KEYSTORE_PASSWORD}\n")).unwrap();
        let ks = dir.join("keystore");
        let l = Self { _tmp: tmp, dir, home, softhsm2: None };
        l.ok(&[
            "keystore",
            "init",
            "--keystore",
            s(&ks),
            "--password-file",
            s(&l.path("ks.pw")),
            "--kdf-memory-mib",
            "1",
            "--kdf-iterations",
            "1",
        ]);
        l.init(&["--keystore", s(&ks)]);
        l
    }

    /// The same laptop on a throwaway SoftHSM2 token labelled "laptop"
    /// (PIN in a file named by the `[hsm]` table).
    pub fn on_softhsm2() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let tokens = TokenDir::new(Path::new(env!("CARGO_TARGET_TMPDIR")), Path::new(hsm::pkcs11::DEFAULT_MODULE));
        let _slot = tokens.init_token("laptop", "8642", "97531");
        std::fs::write(dir.join("token.pin"), "8642\n").unwrap();
        let table = dir.join("hsm.toml");
        let pin = dir.join("token.pin");
        std::fs::write(&table, format!("[hsm]\ntype = \"pkcs11\"\ntoken_label = \"laptop\"\npin_file = {:?}\n", s(&pin))).unwrap();
        let l = Self { _tmp: tmp, home: dir.join("home"), dir, softhsm2: Some(tokens) };
        l.init(&["--hsm-config", s(&table)]);
        l
    }

    /// `personalizer init` with `module` arguments, then cheap operator
    /// hashes for the tests (the default is 64 MiB, 3 passes).
    fn init(&self, module: &[&str]) {
        let mut args = vec!["init", "--hsm-id", "laptop-1"];
        args.extend_from_slice(module);
        let out = self.ok(&args);
        assert!(out.contains("fingerprint"), "{out}");
        let config = self.home.join("personalizer.toml");
        let text = std::fs::read_to_string(&config).unwrap();
        std::fs::write(&config, text.replace("operator_kdf_memory_mib = 64", "operator_kdf_memory_mib = 1")).unwrap();
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// The `personalizer` command with this laptop's environment, in the
    /// session of `session` if given (for runs that need more than `run`,
    /// such as a piped stdin).
    pub fn command(&self, session: Option<&str>) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_personalizer"));
        cmd.env("PERSONALIZER_HOME", &self.home)
            .env("PERSONALIZER_KEYSTORE_PASSWORD_FILE", self.path("ks.pw"))
            .env_remove("PERSONALIZER_SESSION")
            .env_remove("RUST_LOG");
        if let Some(tokens) = &self.softhsm2 {
            cmd.env("SOFTHSM2_CONF", tokens.conf());
        }
        if let Some(who) = session {
            cmd.env("PERSONALIZER_SESSION", self.path(&format!("{who}.session")));
        }
        cmd
    }

    pub fn run(&self, session: Option<&str>, args: &[&str]) -> Output {
        self.command(session).args(args).output().unwrap()
    }

    pub fn ok(&self, args: &[&str]) -> String {
        self.ok_as(None, args)
    }

    pub fn ok_as(&self, who: Option<&str>, args: &[&str]) -> String {
        let out = self.run(who, args);
        assert!(out.status.success(), "{args:?} failed: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    }

    pub fn refused_as(&self, who: Option<&str>, args: &[&str]) -> String {
        let out = self.run(who, args);
        assert!(!out.status.success(), "{args:?} should have been refused: {}", String::from_utf8_lossy(&out.stdout));
        String::from_utf8(out.stderr).unwrap()
    }

    /// openssl signs the 32 bytes of a base64 challenge, as an officer does.
    pub fn sign(&self, who: &str, challenge_b64: &str) -> PathBuf {
        let (bin, sig) = (self.path(&format!("{who}.challenge.bin")), self.path(&format!("{who}.challenge.sig")));
        std::fs::write(&bin, B64.decode(challenge_b64).unwrap()).unwrap();
        openssl(&["dgst", "-sha256", "-sign", s(&self.path(&format!("{who}.key.pem"))), "-out", s(&sig), s(&bin)]);
        sig
    }

    /// Fill in the Signature of an authdata file.
    pub fn sign_authdata(&self, who: &str, file: &Path) {
        let mut json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(file).unwrap()).unwrap();
        let digest = json["Data"][0]["Digest"].as_str().unwrap().to_owned();
        let sig = std::fs::read(self.sign(who, &digest)).unwrap();
        json["Data"][0]["Signature"] = B64.encode(sig).into();
        std::fs::write(file, json.to_string()).unwrap();
    }

    /// Add `who` with a password and an openssl key, register the key.
    pub fn officer(&self, who: &str, by: Option<&str>) {
        std::fs::write(self.path(&format!("{who}.pw")), format!("{who} password\n")).unwrap();
        let key = self.path(&format!("{who}.key.pem"));
        openssl(&["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", s(&key)]);
        openssl(&["pkey", "-in", s(&key), "-pubout", "-out", s(&self.path(&format!("{who}.pub.pem")))]);
        self.ok_as(by, &["operator", "add", who, "--password-file", s(&self.path(&format!("{who}.pw")))]);
        let auth = self.path(&format!("{who}.set2fa.json"));
        let pw = self.path(&format!("{who}.pw"));
        let public = self.path(&format!("{who}.pub.pem"));
        let out = self.ok(&["operator", "set-2fa", who, "--public-key", s(&public), "--authdata", s(&auth), "--password-file", s(&pw)]);
        assert!(out.contains("challenge written"), "{out}");
        self.sign_authdata(who, &auth);
        let out = self.ok(&["operator", "set-2fa", who, "--authdata", s(&auth)]);
        assert!(out.contains("2FA key registered"), "{out}");
    }

    pub fn login(&self, who: &str) {
        let auth = self.path(&format!("{who}.login.json"));
        let session = self.path(&format!("{who}.session"));
        let _ = std::fs::remove_file(&auth);
        let _ = std::fs::remove_file(&session);
        let pw = self.path(&format!("{who}.pw"));
        self.ok(&["login", who, "--authdata", s(&auth), "--password-file", s(&pw), "--session-out", s(&session)]);
        self.sign_authdata(who, &auth);
        let out = self.ok(&["login", who, "--authdata", s(&auth), "--session-out", s(&session)]);
        assert!(out.contains(&format!("logged in as {who}")), "{out}");
    }

    /// `who` requests `op` on `context`; `approvers` approve; the token
    /// file (a new one each time, beside the laptop's other files).
    pub fn approval(&self, who: &str, op: &str, context: &str, approvers: &[&str]) -> PathBuf {
        static TOKENS: AtomicUsize = AtomicUsize::new(0);
        let token = self.path(&format!("{op}-{}.token.json", TOKENS.fetch_add(1, Ordering::Relaxed)));
        self.ok_as(Some(who), &["quorum", "request", "--operation", op, "--context", context, "--token-out", s(&token)]);
        for a in approvers {
            let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&token).unwrap()).unwrap();
            let sig = self.sign(a, json["token"].as_str().unwrap());
            self.ok_as(Some(a), &["quorum", "approve", "--token", s(&token), "--signature", s(&sig)]);
        }
        token
    }

    pub fn audit_json(&self) -> Vec<serde_json::Value> {
        let out = self.ok(&["audit", "export"]);
        out.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    }
}

impl Laptop {
    /// The keystore file.
    pub fn keystore(&self) -> PathBuf {
        self.path("keystore")
    }

    /// Add a key handle straight into the keystore file (a fixture: the
    /// command line creates handles only under quorum, see officers.rs).
    pub fn handle(&self, kh: u32, flags: Flags, bits: usize) {
        let hsm = SoftHsm::open_unlocked(&self.keystore(), &Password::new(KEYSTORE_PASSWORD).unwrap()).unwrap();
        hsm.add_handle(KeyHandle::new(kh), flags, bits).unwrap();
    }

    /// Officers alice and bob with 2FA keys, both logged in.
    pub fn with_officers() -> Self {
        Self::new().officers()
    }

    /// Add officers alice and bob to this laptop, both logged in.
    pub fn officers(self) -> Self {
        let l = self;
        l.officer("alice", None);
        l.login("alice");
        l.officer("bob", Some("alice"));
        l.login("bob");
        l
    }

    /// A plaintext-output approval for `paths` (as given on the command
    /// line; the context joins them with commas) requested by alice,
    /// approved by alice and bob: the token file.
    pub fn plaintext_approval(&self, paths: &[&str]) -> String {
        s(&self.approval("alice", "plaintext-output", &paths.join(","), &["alice", "bob"])).to_owned()
    }
}
