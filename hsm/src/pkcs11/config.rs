//! Configuration of the PKCS#11 backend.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::{Error, Password};

/// Where Debian's `softhsm2` package installs its module.
pub const DEFAULT_MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";
/// Default label prefix of key-handle keys: handle 0x20 is `yhsm-kh-0x20`.
pub const DEFAULT_HANDLE_PREFIX: &str = "yhsm-kh-";
/// Default label prefix of the data keys: `otp-appliance-token`, `-config`,
/// `-value`.
pub const DEFAULT_DATA_KEY_PREFIX: &str = "otp-appliance-";
/// Default number of retries after a session or device error.
pub const DEFAULT_RETRIES: u32 = 2;

/// How to reach the token and its keys.
///
/// Deserializes from TOML with unknown fields refused, so that it can be the
/// body of a `type = "pkcs11"` variant of a tagged backend enum:
///
/// ```toml
/// type = "pkcs11"
/// module = "/usr/lib/softhsm/libsofthsm2.so"
/// token_label = "otp-appliance"
/// pin_file = "/etc/otp-appliance/token.pin"
/// ```
///
/// The token is chosen by `token_label` (best: SoftHSM2 gives a token a new
/// slot number at every initialisation) or by `slot`: a slot number, or
/// `-1` for the only slot holding a token (the default). The user PIN comes
/// from `pin_file` (one line) or from the environment variable named by
/// `pin_env`; with neither, the module is [`Status::Locked`](crate::Status::Locked)
/// until [`SecurityModule::unlock`](crate::SecurityModule::unlock) is given
/// the PIN.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pkcs11Config {
    /// The PKCS#11 module (shared library).
    #[serde(default = "default_module")]
    pub module: PathBuf,
    /// Slot number, or `-1` for the only slot with a token. Not together
    /// with `token_label`.
    #[serde(default)]
    pub slot: Option<i64>,
    /// Label of the token to use.
    #[serde(default)]
    pub token_label: Option<String>,
    /// File holding the user PIN (a trailing newline is ignored).
    #[serde(default)]
    pub pin_file: Option<PathBuf>,
    /// Name of an environment variable holding the user PIN.
    #[serde(default)]
    pub pin_env: Option<String>,
    /// Label prefix of key-handle keys; the handle's canonical id
    /// (`0x20`) follows.
    #[serde(default = "default_handle_prefix")]
    pub handle_label_prefix: String,
    /// Label prefix of the data keys; `token`, `config` or `value` follows.
    #[serde(default = "default_data_key_prefix")]
    pub data_key_label_prefix: String,
    /// How often an operation is retried, on a fresh session, after a
    /// session or device error.
    #[serde(default = "default_retries")]
    pub retries: u32,
    /// How OTPs are decoded: `"ccm"` (the default: the AEAD opened with
    /// token AES operations, the YubiKey key in host memory during each
    /// decode) or `"key-in-token"` (each YubiKey's AEAD converted once per
    /// process into a token-wrapped key, which then decrypts the OTP inside
    /// the token; see [`crate::pkcs11::wrapped`]).
    #[serde(default)]
    pub decode: DecodeMode,
    /// With `decode = "key-in-token"`: how many converted YubiKeys are kept
    /// (default 100,000; the whole cache is dropped when it is full).
    #[serde(default = "default_key_in_token_cache")]
    pub key_in_token_cache: usize,
}

/// How a PKCS#11 token decodes OTPs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DecodeMode {
    /// CCM built from the token's ECB and CBC operations.
    #[default]
    Ccm,
    /// The YubiKey key unwrapped into the token for every decode.
    KeyInToken,
}

fn default_key_in_token_cache() -> usize {
    100_000
}

fn default_module() -> PathBuf {
    PathBuf::from(DEFAULT_MODULE)
}
fn default_handle_prefix() -> String {
    DEFAULT_HANDLE_PREFIX.to_owned()
}
fn default_data_key_prefix() -> String {
    DEFAULT_DATA_KEY_PREFIX.to_owned()
}
fn default_retries() -> u32 {
    DEFAULT_RETRIES
}

impl Default for Pkcs11Config {
    fn default() -> Self {
        Self {
            module: default_module(),
            slot: None,
            token_label: None,
            pin_file: None,
            pin_env: None,
            handle_label_prefix: default_handle_prefix(),
            data_key_label_prefix: default_data_key_prefix(),
            retries: default_retries(),
            decode: DecodeMode::default(),
            key_in_token_cache: default_key_in_token_cache(),
        }
    }
}

/// Which slot to use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum SlotSelector {
    /// The only slot with a token.
    Only,
    /// A slot number.
    Number(u64),
    /// The slot whose token has this label.
    Label(String),
}

impl std::fmt::Display for SlotSelector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Only => f.write_str("the only slot with a token"),
            Self::Number(n) => write!(f, "slot {n}"),
            Self::Label(l) => write!(f, "the token labelled {l:?}"),
        }
    }
}

impl Pkcs11Config {
    /// The default module, the token with this label, no PIN source.
    #[must_use]
    pub fn for_token(label: &str) -> Self {
        Self { token_label: Some(label.to_owned()), ..Self::default() }
    }

    pub(crate) fn slot_selector(&self) -> Result<SlotSelector, Error> {
        match (&self.token_label, self.slot) {
            (Some(_), Some(_)) => Err(Error::InvalidInput("give either a token label or a slot number, not both".to_owned())),
            (Some(label), None) if label.is_empty() => Err(Error::InvalidInput("the token label is empty".to_owned())),
            (Some(label), None) => Ok(SlotSelector::Label(label.clone())),
            (None, None | Some(-1)) => Ok(SlotSelector::Only),
            (None, Some(n)) => u64::try_from(n)
                .map(SlotSelector::Number)
                .map_err(|_| Error::InvalidInput(format!("slot {n} is not a slot number (use -1 for the only slot with a token)"))),
        }
    }

    /// The configured PIN, if a source is configured.
    pub(crate) fn read_pin(&self) -> Result<Option<Password>, Error> {
        match (&self.pin_file, &self.pin_env) {
            (Some(_), Some(_)) => Err(Error::InvalidInput("give the PIN either in a file or in the environment, not both".to_owned())),
            (Some(path), None) => read_pin_file(path).map(Some),
            (None, Some(var)) => match std::env::var(var) {
                Ok(pin) => {
                    Password::new(pin).map(Some).map_err(|_| Error::InvalidInput(format!("the PIN in environment variable {var} is empty")))
                }
                Err(_) => Err(Error::InvalidInput(format!("environment variable {var} (the token PIN) is not set or not UTF-8"))),
            },
            (None, None) => Ok(None),
        }
    }

    pub(crate) fn handle_label(&self, kh: otp::KeyHandle) -> String {
        format!("{}{}", self.handle_label_prefix, kh.canonical())
    }

    pub(crate) fn data_key_label(&self, key: crate::DataKey) -> String {
        format!("{}{}", self.data_key_label_prefix, key.name())
    }
}

fn read_pin_file(path: &Path) -> Result<Password, Error> {
    let text = zeroize::Zeroizing::new(std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?);
    let pin = text.strip_suffix('\n').map_or(text.as_str(), |t| t.strip_suffix('\r').unwrap_or(t));
    Password::new(pin).map_err(|_| Error::InvalidInput(format!("PIN file {} is empty", path.display())))
}
