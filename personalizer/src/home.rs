//! The personalizer's home directory: its configuration and where each
//! of its files lives.
//!
//! ```text
//! <home>/personalizer.toml     configuration (mode 0600; holds the pepper)
//! <home>/operators.db          crypto officers, challenges, sessions, quorum
//! <home>/ledger.db             public ids ever allocated
//! <home>/audit.db              the hash-chained audit log
//! <home>/audit.head            the last signed checkpoint, outside the database
//! <home>/signing-key.sealed    the signing key, sealed under the module
//! <home>/signing-key.pub.pem   its public half, for `--trust`
//! ```
//!
//! The security module is either a soft keystore file (`keystore = PATH`,
//! relative to the home directory) or an `[hsm]` table, as the servers'
//! configuration files have one ([`hsm::config`]): a PKCS#11 token on the
//! laptop, or a soft keystore unlocked through a token. A YubiHSM 1 cannot
//! be the laptop's module (it takes its key handles on its own console).
//!
//! The pepper lives in the configuration file, not in `operators.db`
//! beside the password hashes, so that whoever can write the database
//! cannot plant a hash of a password they know.

use std::path::{Path, PathBuf};

use hsm::config::HsmConfig;
use hsm::fsutil::{write_atomic, Mode};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

/// Configuration file name inside the home directory.
pub const CONFIG_FILE: &str = "personalizer.toml";

/// `personalizer.toml`.
#[derive(Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The soft keystore file, relative to the home directory unless
    /// absolute. Not together with `[hsm]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keystore: Option<PathBuf>,
    /// Per-installation pepper mixed into every operator password hash:
    /// 64 hex characters.
    pub pepper: String,
    /// The name of this module in 2FA challenge files (`HsmId`).
    pub hsm_id: String,
    /// How long a login session lasts, in seconds.
    #[serde(default = "default_session_ttl")]
    pub session_ttl_secs: u64,
    /// How long a 2FA challenge may be answered, in seconds.
    #[serde(default = "default_challenge_ttl")]
    pub challenge_ttl_secs: u64,
    /// argon2id memory cost of new operator password hashes, in MiB.
    #[serde(default = "default_kdf_memory_mib")]
    pub operator_kdf_memory_mib: u32,
    /// argon2id passes of new operator password hashes.
    #[serde(default = "default_kdf_iterations")]
    pub operator_kdf_iterations: u32,
    /// `[hsm]`: the security module, when it is not a plain keystore file.
    /// Written by `init` from the table it was given, as given.
    #[serde(default, skip_serializing)]
    pub hsm: Option<HsmConfig>,
}

/// Where `personalizer init` finds the security module.
#[derive(Clone, Copy, Debug)]
pub enum ModuleSetting<'a> {
    /// A soft keystore file.
    Keystore(&'a Path),
    /// A TOML document holding one `[hsm]` table, copied into the
    /// configuration as written.
    Table(&'a str),
}

/// Parse `text`, a TOML document holding only an `[hsm]` table, and refuse
/// modules the laptop cannot use.
pub fn parse_hsm_table(text: &str) -> Result<HsmConfig, HomeError> {
    let hsm = hsm::config::parse_hsm_table(text).map_err(|e| HomeError::Config(e.to_string()))?;
    if matches!(hsm, HsmConfig::Yhsm1(_)) {
        return Err(HomeError::Config(
            "a YubiHSM 1 cannot be the personalizer's module: it takes key handles on its own console and cannot seal the signing key"
                .to_owned(),
        ));
    }
    Ok(hsm)
}

fn default_kdf_memory_mib() -> u32 {
    64
}

fn default_kdf_iterations() -> u32 {
    3
}

fn default_session_ttl() -> u64 {
    900
}

fn default_challenge_ttl() -> u64 {
    300
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("keystore", &self.keystore)
            .field("pepper", &"<redacted>")
            .field("hsm_id", &self.hsm_id)
            .field("session_ttl_secs", &self.session_ttl_secs)
            .field("challenge_ttl_secs", &self.challenge_ttl_secs)
            .field("operator_kdf_memory_mib", &self.operator_kdf_memory_mib)
            .field("operator_kdf_iterations", &self.operator_kdf_iterations)
            .field("hsm", &self.hsm)
            .finish()
    }
}

impl Config {
    /// The pepper's bytes.
    pub fn pepper_bytes(&self) -> Result<Zeroizing<Vec<u8>>, HomeError> {
        let bytes = Zeroizing::new(hex::decode(&self.pepper).map_err(|_| HomeError::Config("pepper is not hex".to_owned()))?);
        if bytes.len() != 32 {
            return Err(HomeError::Config(format!("pepper must be 32 bytes (64 hex characters), not {}", bytes.len())));
        }
        Ok(bytes)
    }
}

/// Errors opening or creating a home directory.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HomeError {
    /// The configuration file is missing, unreadable or invalid.
    #[error("{0}")]
    Config(String),
    /// A file operation failed.
    #[error(transparent)]
    Hsm(#[from] hsm::Error),
}

/// An opened home directory.
#[derive(Clone, Debug)]
pub struct Home {
    dir: PathBuf,
    config: Config,
}

impl Home {
    /// Write a new configuration into `dir` (created, mode 0700) with a
    /// fresh random pepper. Refuses to overwrite one.
    pub fn create(dir: &Path, module: ModuleSetting<'_>, hsm_id: &str) -> Result<Self, HomeError> {
        let (keystore, hsm, table) = match module {
            ModuleSetting::Keystore(path) => (Some(path.to_path_buf()), None, ""),
            ModuleSetting::Table(text) => (None, Some(parse_hsm_table(text)?), text),
        };
        create_private_dir(dir)?;
        let mut pepper = Zeroizing::new([0u8; 32]);
        rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, pepper.as_mut());
        let config = Config {
            keystore,
            pepper: hex::encode(pepper.as_ref()),
            hsm_id: hsm_id.to_owned(),
            session_ttl_secs: default_session_ttl(),
            challenge_ttl_secs: default_challenge_ttl(),
            operator_kdf_memory_mib: default_kdf_memory_mib(),
            operator_kdf_iterations: default_kdf_iterations(),
            hsm,
        };
        let mut text = Zeroizing::new(toml::to_string(&config).map_err(|e| HomeError::Config(e.to_string()))?);
        if !table.is_empty() {
            // Tables come after the plain keys.
            text.push('\n');
            text.push_str(table.trim_end());
            text.push('\n');
        }
        write_atomic(&dir.join(CONFIG_FILE), text.as_bytes(), Mode::CreateNew)?;
        Ok(Self { dir: dir.to_path_buf(), config })
    }

    /// Read `dir/personalizer.toml`.
    pub fn open(dir: &Path) -> Result<Self, HomeError> {
        let path = dir.join(CONFIG_FILE);
        let text = Zeroizing::new(std::fs::read_to_string(&path).map_err(|e| {
            HomeError::Config(format!("{}: {e} (create it with `personalizer init --home {}`)", path.display(), dir.display()))
        })?);
        let config: Config = toml::from_str(&text).map_err(|e| HomeError::Config(format!("{}: {e}", path.display())))?;
        config.pepper_bytes()?;
        let home = Self { dir: dir.to_path_buf(), config };
        home.module().map_err(|e| HomeError::Config(format!("{}: {e}", path.display())))?;
        Ok(home)
    }

    /// The directory.
    #[must_use]
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The configuration.
    #[must_use]
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The security module's configuration: `keystore` (resolved against
    /// the home directory) as a soft module, or the `[hsm]` table.
    pub fn module(&self) -> Result<HsmConfig, HomeError> {
        match (&self.config.keystore, &self.config.hsm) {
            (Some(keystore), None) => Ok(HsmConfig::soft(&self.dir.join(keystore), None)),
            (None, Some(HsmConfig::Yhsm1(_))) => Err(HomeError::Config("a YubiHSM 1 cannot be the personalizer's module".to_owned())),
            (None, Some(hsm)) => Ok(hsm.clone()),
            (Some(_), Some(_)) => Err(HomeError::Config("give either `keystore` or an [hsm] table, not both".to_owned())),
            (None, None) => Err(HomeError::Config("no security module: give `keystore` or an [hsm] table".to_owned())),
        }
    }

    /// Operators, challenges, sessions and quorum requests.
    #[must_use]
    pub fn operators_db(&self) -> PathBuf {
        self.dir.join("operators.db")
    }

    /// The public-id ledger.
    #[must_use]
    pub fn ledger_db(&self) -> PathBuf {
        self.dir.join("ledger.db")
    }

    /// The audit log.
    #[must_use]
    pub fn audit_db(&self) -> PathBuf {
        self.dir.join("audit.db")
    }

    /// The last signed audit checkpoint, kept outside the database.
    #[must_use]
    pub fn audit_head(&self) -> PathBuf {
        self.dir.join("audit.head")
    }

    /// The sealed signing key.
    #[must_use]
    pub fn signing_key(&self) -> PathBuf {
        self.dir.join("signing-key.sealed")
    }

    /// The signing key's public PEM.
    #[must_use]
    pub fn signing_public_key(&self) -> PathBuf {
        self.dir.join("signing-key.pub.pem")
    }
}

/// Create `dir` (and parents) with mode 0700 on the last component.
fn create_private_dir(dir: &Path) -> Result<(), HomeError> {
    use std::os::unix::fs::DirBuilderExt;
    if dir.is_dir() {
        return Ok(());
    }
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(|e| hsm::Error::io(dir, e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn create_then_open_round_trips_and_refuses_unknown_keys() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("home");
        let home = Home::create(&dir, ModuleSetting::Keystore(Path::new("keystore.json")), "laptop-1").unwrap();
        assert_eq!(home.config().pepper_bytes().unwrap().len(), 32);
        assert!(Home::create(&dir, ModuleSetting::Keystore(Path::new("k")), "x").is_err(), "never overwritten");
        let again = Home::open(&dir).unwrap();
        assert_eq!(again.config().pepper, home.config().pepper);
        assert!(matches!(again.module().unwrap(), HsmConfig::Soft { keystore, .. } if keystore == dir.join("keystore.json")));
        assert!(!format!("{:?}", again.config()).contains(&home.config().pepper));
        let path = dir.join(CONFIG_FILE);
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, format!("{text}\nsurprise = 1\n")).unwrap();
        let err = Home::open(&dir).unwrap_err().to_string();
        assert!(err.contains("surprise"), "{err}");
    }

    #[test]
    fn an_hsm_table_is_kept_as_written_and_checked() {
        let tmp = tempfile::tempdir().unwrap();
        let table = "[hsm]\ntype = \"pkcs11\"\ntoken_label = \"laptop\"\npin_file = \"/etc/laptop.pin\"\n";
        let home = Home::create(&tmp.path().join("a"), ModuleSetting::Table(table), "laptop-1").unwrap();
        let again = Home::open(home.dir()).unwrap();
        let HsmConfig::Pkcs11(c) = again.module().unwrap() else { panic!("not pkcs11") };
        assert_eq!(c.token_label.as_deref(), Some("laptop"));
        for (bad, why) in [
            ("[hsm]\ntype = \"yhsm1\"\ndevice = \"/dev/ttyACM0\"\n", "YubiHSM 1"),
            ("[hsm]\ntype = \"pkcs11\"\ntokn_label = \"x\"\n", "tokn_label"),
            ("hsm_id = \"x\"\n[hsm]\ntype = \"pkcs11\"\n", "hsm_id"),
        ] {
            let e = Home::create(&tmp.path().join("b"), ModuleSetting::Table(bad), "x").unwrap_err().to_string();
            assert!(e.contains(why), "{bad:?}: {e}");
        }
        // Both a keystore and a table: refused when opened.
        let path = home.dir().join(CONFIG_FILE);
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, format!("keystore = \"k\"\n{text}")).unwrap();
        assert!(Home::open(home.dir()).unwrap_err().to_string().contains("not both"));
    }
}
