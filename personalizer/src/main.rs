//! `personalizer`: the personalisation laptop's command line.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use hsm::cli::{KeystoreArgs, KeystoreCommand};
use hsm::fsutil::{write_atomic, Mode};
use ksm::aead_dir::{AeadDir, KeyHandleDir};
use personalizer::{export_secrets, generate, yubikey_csv_line, GenerateParams, StartId};
use zeroize::Zeroizing;

/// Personalisation of YubiKeys: secrets are generated inside the security
/// module and leave it as AEADs (YubiHSM 1 format, pyhsm layout).
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
    /// Generate YubiKey secrets inside the module and write their AEADs.
    Generate {
        #[command(flatten)]
        keystore: KeystoreArgs,
        /// How many YubiKeys.
        #[arg(long, short = 'c', default_value_t = 1)]
        count: u64,
        /// First public id: a decimal number or a modhex id.
        #[arg(long, value_name = "ID")]
        start_public_id: StartId,
        /// Public id length in modhex characters.
        #[arg(long, default_value_t = 12, value_name = "N")]
        public_id_chars: usize,
        /// Key handles to wrap each secret under (comma-separated).
        #[arg(long, value_name = "KH[,KH…]", required = true, value_delimiter = ',')]
        key_handles: Vec<KeyHandleDir>,
        /// Output AEAD directory (pyhsm layout), created if missing.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Let the module choose each AEAD nonce instead of the public id.
        #[arg(long)]
        random_nonce: bool,
        /// Also write the plaintext secrets, once, in pyhsm's yubikey-csv
        /// format, to this new file (mode 0600), for programming YubiKeys.
        /// The first key handle must carry the export flag.
        #[arg(long, value_name = "FILE")]
        yubikey_csv: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    hsm::cli::init_logging();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<(), personalizer::Error> {
    match cli.command {
        Command::Keystore(cmd) => Ok(hsm::cli::run(&cmd, &mut std::io::stdout())?),
        Command::Generate { keystore, count, start_public_id, public_id_chars, key_handles, out, random_nonce, yubikey_csv } => {
            if let Some(csv) = &yubikey_csv {
                if csv.exists() {
                    return Err(hsm::Error::AlreadyExists(csv.clone()).into());
                }
            }
            let hsm = keystore.open()?;
            let params = GenerateParams { count, start: start_public_id, public_id_chars, key_handles, random_nonce };
            let dir = AeadDir::new(&out);
            let generated = generate(&hsm, &dir, &params, |g| tracing::debug!(public_id = %g.public_id, "generated"))?;
            if let Some(csv) = &yubikey_csv {
                let mut text = Zeroizing::new(String::new());
                for (i, g) in generated.iter().enumerate() {
                    let secrets = export_secrets(&hsm, &g.records[0])?;
                    text.push_str(&yubikey_csv_line(i as u64 + 1, &g.public_id, &secrets));
                }
                write_atomic(csv, text.as_bytes(), Mode::CreateNew)?;
                println!("wrote personalisation secrets for {} YubiKey(s) to {} (mode 0600)", generated.len(), csv.display());
            }
            if let (Some(first), Some(last)) = (generated.first(), generated.last()) {
                println!(
                    "generated {} YubiKey(s), public ids {} to {}, AEADs under {}",
                    generated.len(),
                    first.public_id,
                    last.public_id,
                    out.display()
                );
            }
            Ok(())
        }
    }
}
