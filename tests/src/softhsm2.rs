//! Throwaway SoftHSM2 token directories.
//!
//! SoftHSM2 finds its tokens through the configuration file named by
//! `SOFTHSM2_CONF`, which a process reads once, when it first loads the
//! module. A [`TokenDir`] is a private directory holding such a file and its
//! tokens; `softhsm2-util` runs on it with the variable set for the child
//! only, and [`TokenDir::use_in_this_process`] points the test process at it.

// A fixture that cannot be set up fails the test that asked for it.
#![allow(clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::tools::HINT;

/// A private SoftHSM2 configuration and token directory, deleted on drop.
pub struct TokenDir {
    dir: tempfile::TempDir,
    conf: PathBuf,
}

impl TokenDir {
    /// A new directory under `base` (a test binary's `CARGO_TARGET_TMPDIR`).
    ///
    /// # Panics
    /// If `module` (the SoftHSM2 PKCS#11 library) is missing, naming the
    /// package, or on an I/O error.
    #[must_use]
    pub fn new(base: &Path, module: &Path) -> Self {
        assert!(module.exists(), "{} is missing: apt-get install softhsm2, {HINT}", module.display());
        let dir = tempfile::Builder::new().prefix("softhsm2-").tempdir_in(base).expect("a temporary directory");
        let tokens = dir.path().join("tokens");
        std::fs::create_dir(&tokens).expect("the token directory");
        let conf = dir.path().join("softhsm2.conf");
        let text = format!(
            "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\nslots.mechanisms = ALL\n",
            tokens.display()
        );
        std::fs::write(&conf, text).expect("softhsm2.conf");
        Self { dir, conf }
    }

    /// The directory (free for other test files too).
    #[must_use]
    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    /// The configuration file, for `SOFTHSM2_CONF`.
    #[must_use]
    pub fn conf(&self) -> &Path {
        &self.conf
    }

    /// Where SoftHSM2 keeps the tokens (one subdirectory each).
    #[must_use]
    pub fn tokens(&self) -> PathBuf {
        self.dir.path().join("tokens")
    }

    /// Run `softhsm2-util` on these tokens; its standard output.
    ///
    /// # Panics
    /// If it cannot run (naming the package) or fails.
    #[must_use]
    pub fn util(&self, args: &[&str]) -> String {
        let out = Command::new("softhsm2-util")
            .env("SOFTHSM2_CONF", &self.conf)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run softhsm2-util ({e}): apt-get install softhsm2, {HINT}"));
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "softhsm2-util {args:?}: {stdout}{}", String::from_utf8_lossy(&out.stderr));
        stdout
    }

    /// Initialise a token labelled `label` in a free slot; the slot number
    /// SoftHSM2 gave it (a new one at every initialisation).
    ///
    /// # Panics
    /// If `softhsm2-util` fails or does not name the slot.
    #[must_use]
    pub fn init_token(&self, label: &str, pin: &str, so_pin: &str) -> u64 {
        let text = self.util(&["--init-token", "--free", "--label", label, "--pin", pin, "--so-pin", so_pin]);
        text.trim().rsplit(' ').next().and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("no slot number in {text:?}"))
    }

    /// Point this process at these tokens (`SOFTHSM2_CONF`). Call it before
    /// the module is first loaded, and before other threads of the test
    /// binary read the environment.
    pub fn use_in_this_process(&self) {
        std::env::set_var("SOFTHSM2_CONF", &self.conf);
    }
}
