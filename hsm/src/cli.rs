//! The `keystore` subcommands, shared by the `personalizer` and `ksm`
//! binaries from one clap definition.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};
use otp::{HandleKey, KeyHandle};
use zeroize::Zeroizing;

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

/// Where the keystore is and how to unlock it.
#[derive(Args, Debug, Clone)]
pub struct KeystoreArgs {
    /// The keystore file.
    #[arg(long, env = "OTP_KEYSTORE", value_name = "PATH")]
    pub keystore: PathBuf,
    /// File holding the keystore password (one line). Without it, the
    /// password is prompted for on the terminal.
    #[arg(long, env = "OTP_KEYSTORE_PASSWORD_FILE", value_name = "PATH")]
    pub password_file: Option<PathBuf>,
}

impl KeystoreArgs {
    /// Open the keystore and unlock it.
    pub fn open(&self) -> Result<SoftHsm, Error> {
        let hsm = SoftHsm::open(&self.keystore)?;
        let pw = password::obtain(self.password_file.as_deref(), "Keystore password: ", false)?;
        hsm.unlock(&pw)?;
        Ok(hsm)
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

/// Manage the software keystore.
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
    /// Create a key handle whose AES key is generated inside the module.
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
            if keystore.keystore.exists() {
                return Err(Error::AlreadyExists(keystore.keystore.clone()));
            }
            let pw = password::obtain(keystore.password_file.as_deref(), "New keystore password: ", true)?;
            SoftHsm::create(&keystore.keystore, &pw, kdf)?;
            w(out, format!("created keystore {} (argon2id {} MiB, {} passes)", keystore.keystore.display(), kdf_memory_mib, kdf_iterations))
        }
        KeystoreCommand::AddHandle { keystore, key_handle, flags, key_bits } => {
            let hsm = keystore.open()?;
            let info = hsm.add_handle(*key_handle, *flags, *key_bits)?;
            w(out, format!("added key handle {} (AES-{}, flags {})", info.key_handle, info.key_bits, info.flags))
        }
        KeystoreCommand::List { keystore } => list_handles(&keystore.open()?, out),
        KeystoreCommand::SealPassword { keystore, token, key_label, generate_key, key_bits, out: path } => {
            if path.exists() {
                return Err(Error::AlreadyExists(path.clone()));
            }
            // Seal only a password that opens the keystore.
            let soft = SoftHsm::open(&keystore.keystore)?;
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
            if let Err(e) = unlock::unlock_with_token(&keystore.keystore, path, &config) {
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
            let hsm = keystore.open()?;
            let new: Vec<(KeyHandle, Flags, HandleKey)> = keys.into_iter().map(|(kh, key)| (kh, *flags, key)).collect();
            hsm.import_handles(&new)?;
            for (kh, _, key) in &new {
                w(out, format!("imported key handle {kh} (AES-{}, flags {flags})", key.bits()))?;
            }
            w(out, format!("{} key handle(s) imported", new.len()))
        }
    }
}

fn list_handles(hsm: &SoftHsm, out: &mut dyn Write) -> Result<(), Error> {
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
