//! `ksm`: the key storage module's command line.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use hsm::cli::{KeystoreArgs, KeystoreCommand};
use ksm::aead_dir::{AeadDir, KeyHandleDir};
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
}

fn main() -> ExitCode {
    hsm::cli::init_logging();
    let cli = Cli::parse();
    match cli.command {
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
