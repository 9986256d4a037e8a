//! The `keystore` subcommands, shared by the `personalizer` and `ksm`
//! binaries from one clap definition.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use clap::{Args, Subcommand};
use otp::{HandleKey, KeyHandle};
use zeroize::Zeroizing;

use crate::admin::{ExportedKey, KeyAdmin};
use crate::config::{read_hsm_table, HsmConfig};
use crate::pkcs11::unlock::{self, DEFAULT_UNLOCK_KEY_LABEL};
use crate::pkcs11::{Pkcs11Config, DEFAULT_MODULE};
use crate::soft::format::KdfParams;
use crate::soft::SoftHsm;
use crate::{password, Error, Flags, SecurityModule};

/// Log to stderr at the level `RUST_LOG` asks for (default: warnings), as
/// every binary of the appliance does. Secrets never reach the log.
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into());
    tracing_subscriber::fmt().with_writer(std::io::stderr).with_env_filter(filter).init();
}

/// Which security module to use and how to unlock it: a soft keystore
/// file, or an `--hsm-config` file holding an `[hsm]` table (a PKCS#11
/// token, a YubiHSM 1, a keystore unlocked through a token; see
/// [`crate::config`]).
#[derive(Args, Debug, Clone)]
#[command(group(clap::ArgGroup::new("security_module").required(true).args(["keystore", "hsm_config"])))]
pub struct KeystoreArgs {
    /// The soft keystore file.
    #[arg(long, env = "OTP_KEYSTORE", value_name = "PATH")]
    pub keystore: Option<PathBuf>,
    /// A TOML file holding an `[hsm]` table, instead of --keystore:
    /// `[hsm]` / `type = "pkcs11"` / `token_label = "…"` / `pin_file = "…"`.
    #[arg(long, env = "OTP_HSM_CONFIG", value_name = "PATH")]
    pub hsm_config: Option<PathBuf>,
    /// File holding the keystore password, or the token's PIN when the
    /// `[hsm]` table names none (one line). Without it, it is prompted for
    /// on the terminal.
    #[arg(long, env = "OTP_KEYSTORE_PASSWORD_FILE", value_name = "PATH")]
    pub password_file: Option<PathBuf>,
}

impl KeystoreArgs {
    /// The soft keystore `path` with the password in `password_file`.
    #[must_use]
    pub fn soft(path: PathBuf, password_file: Option<PathBuf>) -> Self {
        Self { keystore: Some(path), hsm_config: None, password_file }
    }

    /// The module these arguments name.
    pub fn config(&self) -> Result<HsmConfig, Error> {
        match (&self.keystore, &self.hsm_config) {
            (Some(keystore), None) => Ok(HsmConfig::soft(keystore, None)),
            (None, Some(file)) => read_hsm_table(file),
            _ => Err(Error::InvalidInput("give either --keystore or --hsm-config".to_owned())),
        }
    }

    /// Open the module and unlock it.
    pub fn open(&self) -> Result<Arc<dyn SecurityModule>, Error> {
        self.config()?.open_with(self.password_file.as_deref())
    }

    /// Open a module that administers its key handles (not a YubiHSM 1).
    pub fn open_admin(&self) -> Result<Arc<dyn KeyAdmin>, Error> {
        self.config()?.open_admin_with(self.password_file.as_deref())
    }

    /// The soft keystore file, for the commands that work on one only.
    fn soft_keystore(&self, command: &str) -> Result<&Path, Error> {
        self.keystore.as_deref().ok_or_else(|| Error::InvalidInput(format!("keystore {command} works on a soft keystore: give --keystore")))
    }
}

/// How to reach the PKCS#11 token holding the keystore's unlock key
/// ([encrypt-key unlock](crate::pkcs11::unlock)).
#[derive(Args, Debug, Clone)]
pub struct TokenArgs {
    /// The PKCS#11 module (shared library).
    #[arg(long = "pkcs11-module", default_value = DEFAULT_MODULE, value_name = "PATH")]
    pub module: PathBuf,
    /// Label of the token (best: SoftHSM2 renumbers slots).
    #[arg(long, value_name = "LABEL", conflicts_with = "slot")]
    pub token_label: Option<String>,
    /// Slot number, or -1 for the only slot with a token.
    #[arg(long, value_name = "N", allow_hyphen_values = true)]
    pub slot: Option<i64>,
    /// File holding the token's user PIN (one line).
    #[arg(long, value_name = "PATH", conflicts_with = "pin_env")]
    pub pin_file: Option<PathBuf>,
    /// Environment variable holding the token's user PIN.
    #[arg(long, value_name = "VAR")]
    pub pin_env: Option<String>,
}

impl TokenArgs {
    /// The backend configuration these arguments describe.
    #[must_use]
    pub fn config(&self) -> Pkcs11Config {
        Pkcs11Config {
            module: self.module.clone(),
            slot: self.slot,
            token_label: self.token_label.clone(),
            pin_file: self.pin_file.clone(),
            pin_env: self.pin_env.clone(),
            ..Pkcs11Config::default()
        }
    }
}

/// A keystore unlocked by a PKCS#11 token instead of a typed password: the
/// password sealed to the token's RSA key by `keystore seal-password`.
/// For services that boot without an operator.
#[derive(Args, Debug, Clone)]
pub struct SealedKeystoreArgs {
    /// The keystore file.
    #[arg(long, env = "OTP_KEYSTORE", value_name = "PATH")]
    pub keystore: PathBuf,
    /// The sealed-password file written by `keystore seal-password`.
    #[arg(long, env = "OTP_KEYSTORE_SEALED_PASSWORD", value_name = "PATH")]
    pub sealed_password: PathBuf,
    /// The token that holds the unlock key.
    #[command(flatten)]
    pub token: TokenArgs,
}

impl SealedKeystoreArgs {
    /// Open the keystore and unlock it through the token.
    pub fn open(&self) -> Result<SoftHsm, Error> {
        unlock::unlock_with_token(&self.keystore, &self.sealed_password, &self.token.config())
    }
}

fn parse_unlock_key_bits(s: &str) -> Result<usize, String> {
    match s {
        "2048" | "3072" | "4096" => s.parse().map_err(|_| String::new()),
        _ => Err("RSA key size must be 2048, 3072 or 4096".to_owned()),
    }
}

fn parse_flags(s: &str) -> Result<Flags, String> {
    s.parse()
}

fn parse_key_bits(s: &str) -> Result<usize, String> {
    match s {
        "128" | "192" | "256" => s.parse().map_err(|_| String::new()),
        _ => Err("key size must be 128, 192 or 256".to_owned()),
    }
}

fn flags_help() -> String {
    let presets: Vec<String> = crate::flags::PRESETS.iter().map(|(n, f, d)| format!("  {n} = {f}: {d}")).collect();
    let names: Vec<&str> = crate::flags::known_names().collect();
    format!("Comma-separated names, a preset, or a 0x flag word. Presets:\n{}\nAccepted names: {}", presets.join("\n"), names.join(", "))
}

/// Manage the security module's key handles: a soft keystore (`--keystore`)
/// or a token (`--hsm-config`).
#[derive(Subcommand, Debug, Clone)]
pub enum KeystoreCommand {
    /// Create a new keystore (mode 0600) with fresh data keys and no key handles.
    Init {
        /// Keystore location and password.
        #[command(flatten)]
        keystore: KeystoreArgs,
        /// argon2id memory cost in MiB.
        #[arg(long, default_value_t = KdfParams::DEFAULT.memory_kib / 1024, value_name = "MIB")]
        kdf_memory_mib: u32,
        /// argon2id passes.
        #[arg(long, default_value_t = KdfParams::DEFAULT.iterations, value_name = "N")]
        kdf_iterations: u32,
    },
    /// Create a key handle whose AES key is generated inside the module (in
    /// a token: sensitive and never extractable).
    AddHandle {
        /// Keystore location and password.
        #[command(flatten)]
        keystore: KeystoreArgs,
        /// Key handle id: decimal, 0x-hex, or 4 ASCII characters (as pyhsm).
        #[arg(long, value_name = "KH")]
        key_handle: KeyHandle,
        /// Permission flags.
        #[arg(long, value_parser = parse_flags, long_help = flags_help())]
        flags: Flags,
        /// AES key size.
        #[arg(long, default_value_t = 256, value_parser = parse_key_bits, value_name = "128|192|256")]
        key_bits: usize,
    },
    /// List key handles and their flags (never the keys).
    List {
        /// Keystore location and password.
        #[command(flatten)]
        keystore: KeystoreArgs,
    },
    /// Import key handles from a pyhsm soft-HSM JSON file
    /// (`{"<key handle>": "<hex AES key>"}`), all or nothing.
    ImportPyhsm {
        /// Keystore location and password.
        #[command(flatten)]
        keystore: KeystoreArgs,
        /// The pyhsm JSON file.
        #[arg(long, value_name = "FILE")]
        json: PathBuf,
        /// Flags for every imported handle.
        #[arg(long, value_parser = parse_flags, long_help = flags_help())]
        flags: Flags,
    },
    /// Load the key handles of a keystore file — the validation servers'
    /// keystore exported by `personalizer key-handle export-servers` — into
    /// this module, keeping their flags, all or nothing. The servers'
    /// ceremony step when their module is a token (where the keys become
    /// non-extractable).
    ImportKeystore {
        /// The module to load them into.
        #[command(flatten)]
        keystore: KeystoreArgs,
        /// The keystore file to read.
        #[arg(long, value_name = "FILE")]
        from: PathBuf,
        /// File holding its password (prompted for without it).
        #[arg(long, value_name = "FILE")]
        from_password_file: Option<PathBuf>,
        /// Only these handles (default: all of them).
        #[arg(long, value_name = "KH[,KH…]", value_delimiter = ',')]
        key_handles: Vec<KeyHandle>,
    },
    /// Seal the keystore password to an RSA key in a PKCS#11 token
    /// (RSA-OAEP), so that a service can unlock the keystore with the token
    /// and its PIN instead of the password. Writes a new file, mode 0600.
    SealPassword {
        /// Keystore location and password (the password is checked).
        #[command(flatten)]
        keystore: KeystoreArgs,
        /// The token.
        #[command(flatten)]
        token: TokenArgs,
        /// Label of the RSA key pair in the token.
        #[arg(long, default_value = DEFAULT_UNLOCK_KEY_LABEL, value_name = "LABEL")]
        key_label: String,
        /// Generate the key pair in the token if it holds none with this label.
        #[arg(long)]
        generate_key: bool,
        /// Size of a generated RSA key.
        #[arg(long, default_value_t = 3072, value_parser = parse_unlock_key_bits, value_name = "2048|3072|4096")]
        key_bits: usize,
        /// The sealed-password file to write (refused if it exists).
        #[arg(long, value_name = "PATH")]
        out: PathBuf,
    },
    /// Unlock the keystore through the token with a sealed password, and
    /// list its key handles: checks what a service will do at boot.
    CheckSealed {
        /// Keystore, sealed password and token.
        #[command(flatten)]
        keystore: SealedKeystoreArgs,
    },
}

/// Run a keystore command, writing its report to `out`.
pub fn run(cmd: &KeystoreCommand, out: &mut dyn Write) -> Result<(), Error> {
    let w = |out: &mut dyn Write, s: String| writeln!(out, "{s}").map_err(|e| Error::io("stdout", e));
    match cmd {
        KeystoreCommand::Init { keystore, kdf_memory_mib, kdf_iterations } => {
            let kdf = KdfParams { memory_kib: kdf_memory_mib.saturating_mul(1024), iterations: *kdf_iterations, parallelism: 1 };
            let path = keystore.soft_keystore("init")?;
            if path.exists() {
                return Err(Error::AlreadyExists(path.to_path_buf()));
            }
            let pw = password::obtain(keystore.password_file.as_deref(), "New keystore password: ", true)?;
            SoftHsm::create(path, &pw, kdf)?;
            w(out, format!("created keystore {} (argon2id {} MiB, {} passes)", path.display(), kdf_memory_mib, kdf_iterations))
        }
        KeystoreCommand::AddHandle { keystore, key_handle, flags, key_bits } => {
            let hsm = keystore.open_admin()?;
            let info = hsm.create_handle(*key_handle, *flags, *key_bits, false)?;
            w(out, format!("added key handle {} (AES-{}, flags {})", info.key_handle, info.key_bits, info.flags))
        }
        KeystoreCommand::List { keystore } => list_handles(&*keystore.open()?, out),
        KeystoreCommand::ImportKeystore { keystore, from, from_password_file, key_handles } => {
            let source = SoftHsm::open(from)?;
            source.unlock(&password::obtain(from_password_file.as_deref(), "Password of the keystore to import: ", false)?)?;
            let handles: Vec<KeyHandle> =
                if key_handles.is_empty() { source.key_handles()?.iter().map(|h| h.key_handle).collect() } else { key_handles.clone() };
            let keys: Vec<ExportedKey> = source.export_handle_keys(&handles)?;
            drop(source);
            let hsm = keystore.open_admin()?;
            hsm.import_handles(&keys, false)?;
            for (kh, flags, key) in &keys {
                w(out, format!("imported key handle {kh} (AES-{}, flags {flags})", key.bits()))?;
            }
            w(out, format!("{} key handle(s) imported from {}", keys.len(), from.display()))
        }
        KeystoreCommand::SealPassword { keystore, token, key_label, generate_key, key_bits, out: path } => {
            if path.exists() {
                return Err(Error::AlreadyExists(path.clone()));
            }
            // Seal only a password that opens the keystore.
            let path_ks = keystore.soft_keystore("seal-password")?;
            let soft = SoftHsm::open(path_ks)?;
            let pw = password::obtain(keystore.password_file.as_deref(), "Keystore password: ", false)?;
            soft.unlock(&pw)?;
            drop(soft);
            let config = token.config();
            let hsm = unlock::open_token(&config)?;
            if !hsm.unlock_key_exists(key_label)? {
                if !*generate_key {
                    return Err(Error::NotReady(format!(
                        "the token holds no unlock key labelled {key_label:?}; add --generate-key to make one"
                    )));
                }
                hsm.generate_unlock_key(key_label, *key_bits)?;
                w(out, format!("generated RSA-{key_bits} unlock key {key_label:?} in the token (private key not extractable)"))?;
            }
            let sealed = hsm.seal_password(key_label, &pw)?;
            drop(hsm);
            sealed.write_new(path)?;
            // What a service will do at boot, before anyone relies on it.
            if let Err(e) = unlock::unlock_with_token(path_ks, path, &config) {
                let _ = std::fs::remove_file(path);
                return Err(e);
            }
            w(out, format!("sealed the keystore password to {key_label:?} (RSA-OAEP {}) in {}", sealed.hash, path.display()))
        }
        KeystoreCommand::CheckSealed { keystore } => {
            let hsm = keystore.open()?;
            w(out, format!("keystore {} unlocked through the token", keystore.keystore.display()))?;
            list_handles(&hsm, out)
        }
        KeystoreCommand::ImportPyhsm { keystore, json, flags } => {
            let keys = read_pyhsm_json(json)?;
            let hsm = keystore.open_admin()?;
            let new: Vec<(KeyHandle, Flags, HandleKey)> = keys.into_iter().map(|(kh, key)| (kh, *flags, key)).collect();
            hsm.import_handles(&new, false)?;
            for (kh, _, key) in &new {
                w(out, format!("imported key handle {kh} (AES-{}, flags {flags})", key.bits()))?;
            }
            w(out, format!("{} key handle(s) imported", new.len()))
        }
    }
}

fn list_handles(hsm: &dyn SecurityModule, out: &mut dyn Write) -> Result<(), Error> {
    let w = |out: &mut dyn Write, s: String| writeln!(out, "{s}").map_err(|e| Error::io("stdout", e));
    w(out, format!("{:<12} {:>10} {:>8}  flags", "key handle", "decimal", "key"))?;
    for h in hsm.key_handles()? {
        w(
            out,
            format!(
                "{:<12} {:>10} {:>8}  {} ({:#010x})",
                h.key_handle,
                h.key_handle.get(),
                format!("AES-{}", h.key_bits),
                h.flags,
                h.flags.bits()
            ),
        )?;
    }
    Ok(())
}

/// Read pyhsm's soft-HSM JSON: `{"<key handle>": "<hex AES key>", …}`.
pub fn read_pyhsm_json(path: &Path) -> Result<Vec<(KeyHandle, HandleKey)>, Error> {
    let text = Zeroizing::new(std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?);
    let bad = |msg: String| Error::InvalidInput(format!("{}: {msg}", path.display()));
    let map: BTreeMap<String, Zeroizing<String>> =
        serde_json::from_str(&text).map_err(|e| bad(format!("not a pyhsm key JSON object: {e}")))?;
    if map.is_empty() {
        return Err(bad("no keys in the file".to_owned()));
    }
    map.iter()
        .map(|(kh, hex_key)| {
            let kh: KeyHandle = kh.parse().map_err(|e: otp::Error| bad(e.to_string()))?;
            let key = Zeroizing::new(hex::decode(hex_key.trim()).map_err(|_| bad(format!("key of handle {kh} is not hex")))?);
            let key = HandleKey::new(&key).map_err(|e| bad(format!("key handle {kh}: {e}")))?;
            Ok((kh, key))
        })
        .collect()
}
