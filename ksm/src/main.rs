//! `ksm`: the key storage module's command line.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use hsm::cli::{KeystoreArgs, KeystoreCommand};
use ksm::aead_dir::{AeadDir, KeyHandleDir};
use ksm::config::AeadSource;
use ksm::store::AeadStore;
use ksm::Ksm;

/// Key storage module: decrypts YubiKey OTPs with AEADs and a security module.
#[derive(Parser, Debug)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Manage the software keystore (key handles and data keys).
    #[command(subcommand)]
    Keystore(KeystoreCommand),
    /// Decrypt one OTP and print the Yubico KSM answer line
    /// (`OK counter=… low=… high=… use=…` or `ERR …`); exits 1 on ERR.
    Decrypt {
        #[command(flatten)]
        keystore: KeystoreArgs,
        /// pyhsm-layout AEAD directory (`<dir>/<key handle>/<pairs>/<public id>`).
        #[arg(long, value_name = "DIR")]
        aead_dir: PathBuf,
        /// Key handle(s) to try, in order (decimal, 0x-hex or 4 characters).
        #[arg(long = "key-handle", value_name = "KH", required = true, value_delimiter = ',')]
        key_handles: Vec<KeyHandleDir>,
        /// The OTP as the YubiKey typed it.
        otp: String,
    },
    /// Serve the Yubico KSM protocol over HTTP (`GET /wsapi/decrypt?otp=…`),
    /// with `/health` and Prometheus `/metrics`. Runs until SIGTERM/SIGINT.
    Serve(ServeArgs),
}

/// `ksm serve` flags; each overrides the same key of `--config`.
#[derive(clap::Args, Debug)]
struct ServeArgs {
    /// TOML configuration file (see ksm.toml.example); flags override it.
    #[arg(long, env = "OTP_KSM_CONFIG", value_name = "PATH")]
    config: Option<PathBuf>,
    /// The keystore file.
    #[arg(long, env = "OTP_KEYSTORE", value_name = "PATH")]
    keystore: Option<PathBuf>,
    /// File holding the keystore password (prompted for on a terminal otherwise).
    #[arg(long, env = "OTP_KEYSTORE_PASSWORD_FILE", value_name = "PATH")]
    password_file: Option<PathBuf>,
    /// The SQLite AEAD store (filled by `ksm import`).
    #[arg(long, value_name = "DB", conflicts_with = "aead_dir")]
    store: Option<PathBuf>,
    /// A pyhsm-layout AEAD directory, instead of --store.
    #[arg(long, value_name = "DIR")]
    aead_dir: Option<PathBuf>,
    /// Key handles to try, in order (decimal, 0x-hex or 4 characters).
    #[arg(long, value_name = "KH,…", value_delimiter = ',')]
    key_handles: Option<Vec<String>>,
    /// Listen address [default: 127.0.0.1:8002].
    #[arg(long, value_name = "ADDR")]
    listen: Option<std::net::SocketAddr>,
    /// Deadline for every request, in milliseconds [default: 5000].
    #[arg(long, value_name = "MS")]
    request_timeout_ms: Option<u64>,
}

fn serve(args: ServeArgs) -> Result<(), String> {
    let file = match &args.config {
        Some(path) => ksm::config::ConfigFile::load(path)?,
        None => ksm::config::ConfigFile::default(),
    };
    let flags = ksm::config::ConfigFile {
        listen: args.listen,
        keystore: args.keystore,
        password_file: args.password_file,
        store: args.store,
        aead_dir: args.aead_dir,
        key_handles: args.key_handles,
        request_timeout_ms: args.request_timeout_ms,
        ..ksm::config::ConfigFile::default()
    };
    let config = file.overridden_by(flags).resolve()?;
    let keystore = KeystoreArgs { keystore: config.keystore.clone(), password_file: config.password_file.clone() };
    let hsm = keystore.open().map_err(|e| format!("security module: {e}"))?;
    let store: Box<dyn ksm::AeadLookup> = match &config.aeads {
        AeadSource::Store(path) => Box::new(AeadStore::open(path).map_err(|e| e.to_string())?),
        AeadSource::Dir(dir) => Box::new(AeadDir::new(dir)),
    };
    let ksm = Arc::new(Ksm::new(Arc::new(hsm), store, config.key_handles.clone()));
    ksm.health().map_err(|e| format!("not ready: {e}"))?;
    let running = ksm::serve::start(ksm, config.http.clone()).map_err(|e| format!("cannot listen on {}: {e}", config.http.listen))?;
    let handles: Vec<String> = config.key_handles.iter().map(ToString::to_string).collect();
    eprintln!("ksm: serving http://{}/wsapi/decrypt?otp= with key handles {}", running.local_addr(), handles.join(","));
    running.wait_for_signal().map_err(|e| e.to_string())
}

fn main() -> ExitCode {
    hsm::cli::init_logging();
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => match serve(args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Keystore(cmd) => match hsm::cli::run(&cmd, &mut std::io::stdout()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Decrypt { keystore, aead_dir, key_handles, otp } => {
            let hsm = match keystore.open() {
                Ok(h) => h,
                Err(e) => {
                    // The protocol line first, so scripts see the verdict.
                    println!("ERR Backend error");
                    eprintln!("error: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let ksm = Ksm::new(Arc::new(hsm), Box::new(AeadDir::new(aead_dir)), key_handles);
            let line = ksm.answer(&otp);
            println!("{line}");
            if line.starts_with("OK ") {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
    }
}
