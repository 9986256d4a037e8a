//! Choosing a security module in TOML: one tagged table per backend.
//!
//! The servers' configuration files carry an `[hsm]` table whose `type`
//! key names the backend; the other keys are that backend's, and any key it
//! does not know is refused:
//!
//! ```toml
//! [hsm]
//! type = "soft"
//! keystore = "/var/lib/otp-appliance/ksm.keystore"
//! password_file = "/etc/otp-appliance/ksm.password"
//! ```
//!
//! The soft keystore may instead boot without a typed password, its
//! password sealed to an RSA key in a PKCS#11 token (encrypt-key unlock,
//! see [`crate::pkcs11::unlock`]):
//!
//! ```toml
//! [hsm]
//! type = "soft"
//! keystore = "/var/lib/otp-appliance/ksm.keystore"
//! sealed_password = "/etc/otp-appliance/ksm.password.sealed"
//! [hsm.unlock_token]
//! token_label = "otp-appliance-unlock"
//! pin_file = "/etc/otp-appliance/token.pin"
//! ```
//!
//! ```toml
//! [hsm]
//! type = "pkcs11"
//! module = "/usr/lib/softhsm/libsofthsm2.so"
//! token_label = "otp-appliance"
//! pin_file = "/etc/otp-appliance/token.pin"
//! decode = "key-in-token"   # optional; default "ccm" (see crate::pkcs11::wrapped)
//! ```
//!
//! ```toml
//! [hsm]
//! type = "yhsm1"
//! device = "/dev/ttyACM0"          # or: socket = "/run/yhsm1/yhsm1.sock"
//! master_key_file = "/etc/otp-appliance/yhsm1.master-key"
//! timeout_ms = 2000
//! key_handles = [{ id = "0x2000", flags = "otp-decode" }]
//! ```
//!
//! Paths are used as written: relative ones are relative to the working
//! directory of the process, as every other path of these files is.
//!
//! [`HsmConfig::open`] opens and unlocks the module: the soft keystore's
//! password comes from `password_file` or, without one, is prompted for on
//! the terminal (as the `--keystore` flags do); the PKCS#11 PIN comes from
//! `pin_file` or `pin_env` (no prompt: without either the token stays
//! locked); the YubiHSM 1's master key (hex, as `yhsm-keystore-unlock`
//! takes it) comes from `master_key_file`, and without one the stick is used
//! as it is (a stick without a keystore password needs no unlock).

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use otp::KeyHandle;
use serde::{Deserialize, Deserializer};

use crate::admin::KeyAdmin;
use crate::pkcs11::{Pkcs11Config, Pkcs11Hsm};
use crate::soft::SoftHsm;
use crate::yhsm1::client::{Yhsm1, Yhsm1Options};
use crate::{password, Error, Flags, HandleInfo, SecurityModule, Status};

/// Which security module to use, and how to reach and unlock it.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
pub enum HsmConfig {
    /// The software keystore: a password-encrypted file.
    Soft {
        /// The keystore file.
        keystore: PathBuf,
        /// File holding its password (one line); prompted for on the
        /// terminal when neither it nor `sealed_password` is given.
        #[serde(default)]
        password_file: Option<PathBuf>,
        /// Encrypt-key unlock: the file written by `keystore
        /// seal-password`, the password sealed to an RSA key in the token
        /// of `unlock_token`. Not together with `password_file`.
        #[serde(default)]
        sealed_password: Option<PathBuf>,
        /// `[hsm.unlock_token]`: the PKCS#11 token that unseals
        /// `sealed_password` (its PIN from `pin_file` or `pin_env`).
        #[serde(default)]
        unlock_token: Option<Pkcs11Config>,
    },
    /// A PKCS#11 token (SoftHSM2, YubiHSM 2, CloudHSM, Nitrokey HSM).
    Pkcs11(Pkcs11Config),
    /// A YubiHSM 1 on a serial line, or shared through `yhsm1-daemon`.
    Yhsm1(Yhsm1Config),
}

/// The `type = "yhsm1"` table.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Yhsm1Config {
    /// The serial device (`/dev/ttyACM0`), opened exclusively. Not together
    /// with `socket`.
    #[serde(default)]
    pub device: Option<PathBuf>,
    /// The Unix socket of a `yhsm1-daemon` that owns the device. Not
    /// together with `device`.
    #[serde(default)]
    pub socket: Option<PathBuf>,
    /// File holding the keystore master key in hex (one line); when absent
    /// the stick is not unlocked.
    #[serde(default)]
    pub master_key_file: Option<PathBuf>,
    /// Deadline of one command in milliseconds (default 2000).
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    /// The key handles configured on the stick, with their flags: a
    /// YubiHSM 1 cannot list them.
    #[serde(default)]
    pub key_handles: Vec<Yhsm1Handle>,
}

/// One `key_handles` entry of a YubiHSM 1: `{ id = "0x2000", flags =
/// "otp-decode" }`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Yhsm1Handle {
    /// The key handle: decimal, `0x` hex or 4 characters (pyhsm syntax),
    /// or a TOML integer.
    #[serde(deserialize_with = "key_handle")]
    pub id: KeyHandle,
    /// Its flags as configured on the stick: names, a preset or a `0x`
    /// word.
    #[serde(deserialize_with = "flags")]
    pub flags: Flags,
    /// AES key size in bits, for listings only (default 256).
    #[serde(default = "default_key_bits")]
    pub key_bits: usize,
}

fn default_key_bits() -> usize {
    256
}

/// A number or a text, for keys that accept both.
#[derive(Deserialize)]
#[serde(untagged)]
enum NumberOrText {
    Number(u32),
    Text(String),
}

fn key_handle<'de, D: Deserializer<'de>>(d: D) -> Result<KeyHandle, D::Error> {
    match NumberOrText::deserialize(d)? {
        NumberOrText::Number(n) => Ok(KeyHandle::new(n)),
        NumberOrText::Text(s) => KeyHandle::from_str(&s).map_err(serde::de::Error::custom),
    }
}

fn flags<'de, D: Deserializer<'de>>(d: D) -> Result<Flags, D::Error> {
    match NumberOrText::deserialize(d)? {
        NumberOrText::Number(n) => Ok(Flags::from_bits(n)),
        NumberOrText::Text(s) => Flags::from_str(&s).map_err(serde::de::Error::custom),
    }
}

impl fmt::Display for HsmConfig {
    /// What the module is, for messages: "the soft keystore /path", …
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Soft { keystore, .. } => write!(f, "the soft keystore {}", keystore.display()),
            Self::Pkcs11(c) => match (&c.token_label, c.slot) {
                (Some(label), _) => write!(f, "the PKCS#11 token {label:?} of {}", c.module.display()),
                (None, Some(n)) if n >= 0 => write!(f, "the PKCS#11 token in slot {n} of {}", c.module.display()),
                (None, _) => write!(f, "the PKCS#11 token of {}", c.module.display()),
            },
            Self::Yhsm1(c) => match (&c.device, &c.socket) {
                (Some(d), _) => write!(f, "the YubiHSM 1 at {}", d.display()),
                (None, Some(s)) => write!(f, "the YubiHSM 1 behind the daemon socket {}", s.display()),
                (None, None) => f.write_str("the YubiHSM 1"),
            },
        }
    }
}

impl HsmConfig {
    /// The soft keystore at `keystore`, the meaning of the servers' older
    /// top-level `keystore` and `password_file` keys.
    #[must_use]
    pub fn soft(keystore: &Path, password_file: Option<&Path>) -> Self {
        Self::Soft {
            keystore: keystore.to_path_buf(),
            password_file: password_file.map(Path::to_path_buf),
            sealed_password: None,
            unlock_token: None,
        }
    }

    /// The backend's name as written in `type`.
    #[must_use]
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Soft { .. } => "soft",
            Self::Pkcs11(_) => "pkcs11",
            Self::Yhsm1(_) => "yhsm1",
        }
    }

    /// Does the backend hold the data keys of
    /// [`SecurityModule::encrypt_value`]? A YubiHSM 1 has none.
    #[must_use]
    pub fn has_data_keys(&self) -> bool {
        !matches!(self, Self::Yhsm1(_))
    }

    /// Refuse contradictory settings without touching any device or file.
    pub fn check(&self) -> Result<(), Error> {
        match self {
            Self::Soft { password_file, sealed_password, unlock_token, .. } => match (password_file, sealed_password, unlock_token) {
                (Some(_), Some(_), _) => Err(Error::InvalidInput(
                    "give the keystore password either in `password_file` or sealed in `sealed_password`, not both".to_owned(),
                )),
                (_, Some(_), None) => Err(Error::InvalidInput(
                    "`sealed_password` needs an [hsm.unlock_token] table: the PKCS#11 token holding the unlock key".to_owned(),
                )),
                (_, None, Some(_)) => Err(Error::InvalidInput(
                    "[hsm.unlock_token] is used only with `sealed_password` (the file written by `keystore seal-password`)".to_owned(),
                )),
                (_, Some(_), Some(token)) => Pkcs11Hsm::new(token.clone()).map(drop),
                (_, None, None) => Ok(()),
            },
            Self::Pkcs11(c) => Pkcs11Hsm::new(c.clone()).map(drop),
            Self::Yhsm1(c) => {
                c.target()?;
                if c.timeout_ms == Some(0) {
                    return Err(Error::InvalidInput("yhsm1 timeout_ms must be positive".to_owned()));
                }
                Ok(())
            }
        }
    }

    /// Open the module and unlock it with the configured password, PIN or
    /// master key (see the [module docs](self)).
    pub fn open(&self) -> Result<Arc<dyn SecurityModule>, Error> {
        Ok(self.open_any()?.module())
    }

    /// The same, for the key ceremony: a module that creates, imports and
    /// exports key-handle keys. A YubiHSM 1 is refused: it takes its keys
    /// in its configuration mode only.
    pub fn open_admin(&self) -> Result<Arc<dyn KeyAdmin>, Error> {
        self.open_any()?.admin()
    }

    /// Open the module for a command line tool that has a secret file of
    /// its own (`--password-file`): a soft keystore with no password source
    /// in the table reads it, and a module the table leaves locked (a token
    /// with no `pin_file` or `pin_env`) is unlocked with it as its PIN.
    /// Without the file, both are prompted for on the terminal.
    pub fn open_admin_with(&self, secret_file: Option<&Path>) -> Result<Arc<dyn KeyAdmin>, Error> {
        self.open_with_any(secret_file)?.admin()
    }

    /// [`HsmConfig::open_admin_with`] for any module, a YubiHSM 1 included.
    pub fn open_with(&self, secret_file: Option<&Path>) -> Result<Arc<dyn SecurityModule>, Error> {
        Ok(self.open_with_any(secret_file)?.module())
    }

    fn open_with_any(&self, secret_file: Option<&Path>) -> Result<Opened, Error> {
        let mut config = self.clone();
        if let Self::Soft { password_file: password_file @ None, sealed_password: None, .. } = &mut config {
            *password_file = secret_file.map(Path::to_path_buf);
        }
        let opened = config.open_any()?;
        let module = opened.as_module();
        if module.status() == Status::Locked {
            module.unlock(&password::obtain(secret_file, "PIN or password of the security module: ", false)?)?;
        }
        Ok(opened)
    }

    fn open_any(&self) -> Result<Opened, Error> {
        self.check()?;
        match self {
            Self::Soft { keystore, sealed_password: Some(sealed), unlock_token: Some(token), .. } => {
                Ok(Opened::Admin(Arc::new(crate::pkcs11::unlock::unlock_with_token(keystore, sealed, token)?)))
            }
            Self::Soft { keystore, password_file, .. } => {
                let hsm = SoftHsm::open(keystore)?;
                let pw = password::obtain(password_file.as_deref(), "Keystore password: ", false)?;
                hsm.unlock(&pw)?;
                Ok(Opened::Admin(Arc::new(hsm)))
            }
            Self::Pkcs11(c) => Ok(Opened::Admin(Arc::new(Pkcs11Hsm::open(c.clone())?))),
            Self::Yhsm1(c) => {
                let options = Yhsm1Options {
                    timeout: c.timeout_ms.map_or(Duration::ZERO, Duration::from_millis),
                    handles: c.key_handles.iter().map(|h| HandleInfo { key_handle: h.id, flags: h.flags, key_bits: h.key_bits }).collect(),
                };
                let hsm = match c.target()? {
                    Yhsm1Target::Device(path) => Yhsm1::open(path, options)?,
                    Yhsm1Target::Socket(path) => Yhsm1::connect(path, options)?,
                };
                if let Some(file) = &c.master_key_file {
                    let key = password::obtain(Some(file), "", false)?;
                    hsm.unlock(&key)?;
                }
                Ok(Opened::Plain(Arc::new(hsm)))
            }
        }
    }
}

enum Opened {
    Admin(Arc<dyn KeyAdmin>),
    Plain(Arc<dyn SecurityModule>),
}

impl Opened {
    fn as_module(&self) -> &dyn SecurityModule {
        match self {
            Self::Admin(m) => &**m,
            Self::Plain(m) => &**m,
        }
    }

    fn module(self) -> Arc<dyn SecurityModule> {
        match self {
            Self::Admin(m) => m,
            Self::Plain(m) => m,
        }
    }

    fn admin(self) -> Result<Arc<dyn KeyAdmin>, Error> {
        match self {
            Self::Admin(m) => Ok(m),
            Self::Plain(_) => Err(Error::Unsupported(
                "a YubiHSM 1 takes its key handles in its configuration mode (its console), not from this program".to_owned(),
            )),
        }
    }
}

/// A TOML document holding only an `[hsm]` table (the `--hsm-config` files
/// of the command-line tools).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HsmTable {
    hsm: HsmConfig,
}

/// Parse `text`, a TOML document holding only an `[hsm]` table.
pub fn parse_hsm_table(text: &str) -> Result<HsmConfig, Error> {
    let table: HsmTable = toml::from_str(text).map_err(|e| Error::InvalidInput(format!("the [hsm] table: {e}")))?;
    Ok(table.hsm)
}

/// Read and parse an `--hsm-config` file.
pub fn read_hsm_table(path: &Path) -> Result<HsmConfig, Error> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    parse_hsm_table(&text).map_err(|e| Error::InvalidInput(format!("{}: {e}", path.display())))
}

enum Yhsm1Target<'a> {
    Device(&'a Path),
    Socket(&'a Path),
}

impl Yhsm1Config {
    fn target(&self) -> Result<Yhsm1Target<'_>, Error> {
        match (&self.device, &self.socket) {
            (Some(d), None) => Ok(Yhsm1Target::Device(d)),
            (None, Some(s)) => Ok(Yhsm1Target::Socket(s)),
            (Some(_), Some(_)) => {
                Err(Error::InvalidInput("give the YubiHSM 1 either as a `device` or as a daemon's `socket`, not both".to_owned()))
            }
            (None, None) => Err(Error::InvalidInput(
                "no YubiHSM 1: give its serial `device` (/dev/ttyACM0) or the `socket` of a yhsm1-daemon".to_owned(),
            )),
        }
    }
}
