//! `personalizer`: the personalisation laptop's command line.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use hsm::cli::{KeystoreArgs, KeystoreCommand};
use hsm::signing::SigningKey;
use ksm::aead_dir::{AeadDir, KeyHandleDir};
use personalizer::ledger::Ledger;
use personalizer::{generate, GenerateParams, RunOptions, StartId};
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
    /// Import a YK-KSM export (`# ykksm 1`): wrap each secret in the module
    /// under each key handle and write a pyhsm AEAD directory, as pyhsm's
    /// yhsm-import-keys does. Bad rows are skipped and reported with their
    /// line numbers (exit status 1); re-running is idempotent.
    Import {
        #[command(flatten)]
        keystore: KeystoreArgs,
        /// The YK-KSM export; `-` reads stdin.
        #[arg(long, value_name = "FILE")]
        ykksm_csv: PathBuf,
        /// Key handles to wrap each secret under (comma-separated); each
        /// needs the `import` flags.
        #[arg(long, value_name = "KH[,KH…]", required = true, value_delimiter = ',')]
        key_handles: Vec<KeyHandleDir>,
        /// Output AEAD directory (pyhsm layout), created if missing.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Let the module choose each AEAD nonce instead of the public id.
        #[arg(long)]
        random_nonce: bool,
    },
    /// Decrypt AEADs inside the module, as pyhsm's yhsm-decrypt-aead: to a
    /// new plaintext file (raw, yubikey-csv), or re-wrapped under another
    /// key handle for key rotation (aead). The key handle needs the export
    /// flag. Bad files are skipped and reported (exit status 1).
    DecryptAead {
        #[command(flatten)]
        keystore: KeystoreArgs,
        /// The pyhsm-layout AEAD directory to read.
        #[arg(long, value_name = "DIR")]
        aead_dir: PathBuf,
        /// The key handle whose AEADs are decrypted (its directory below
        /// --aead-dir: as typed, else 0x-hex, else decimal).
        #[arg(long, value_name = "KH")]
        key_handle: KeyHandleDir,
        /// What to produce.
        #[arg(long, value_enum)]
        format: personalizer::migrate::Format,
        /// raw, yubikey-csv: the new file for the plaintext (mode 0600; an
        /// existing file or symbolic link is refused). Never stdout.
        #[arg(long, value_name = "FILE")]
        output: Option<PathBuf>,
        /// aead: the key handle to re-wrap under (needs the `import` flags).
        #[arg(long, value_name = "KH", visible_alias = "key-handle-out")]
        rewrap_to: Option<KeyHandleDir>,
        /// aead: the AEAD directory to write, created if missing.
        #[arg(long, value_name = "DIR", visible_alias = "output-dir")]
        out: Option<PathBuf>,
        /// aead: let the module choose each new nonce instead of the public id.
        #[arg(long)]
        random_nonce: bool,
        /// Only these public ids (modhex, comma-separated).
        #[arg(long, value_name = "ID[,ID…]", value_delimiter = ',')]
        public_id: Vec<otp::PublicId>,
        /// Only public ids from this one on (a number or a modhex id).
        #[arg(long, value_name = "ID", value_parser = personalizer::migrate::parse_public_id_number)]
        start_public_id: Option<u64>,
        /// Only public ids up to this one (a number or a modhex id).
        #[arg(long, value_name = "ID", value_parser = personalizer::migrate::parse_public_id_number)]
        stop_public_id: Option<u64>,
        /// Stop at the first bad AEAD; no plaintext file is then written.
        #[arg(long)]
        fail_fast: bool,
    },
    /// Generate YubiKey secrets inside the module and write their AEADs.
    ///
    /// Public ids come from the ledger and are never reused; a run that
    /// was interrupted is continued with --resume.
    Generate {
        #[command(flatten)]
        keystore: KeystoreArgs,
        /// How many YubiKeys.
        #[arg(long, short = 'c', default_value_t = 1)]
        count: u64,
        /// First public id: a decimal number or a modhex id.
        #[arg(long, value_name = "ID", required_unless_present = "resume")]
        start_public_id: Option<StartId>,
        /// Public id length in modhex characters.
        #[arg(long, default_value_t = 12, value_name = "N")]
        public_id_chars: usize,
        /// Key handles to wrap each secret under (comma-separated).
        #[arg(long, value_name = "KH[,KH…]", required_unless_present = "resume", value_delimiter = ',')]
        key_handles: Vec<KeyHandleDir>,
        /// Output AEAD directory (pyhsm layout), created if missing.
        #[arg(long, value_name = "DIR", required_unless_present = "resume")]
        out: Option<PathBuf>,
        /// Let the module choose each AEAD nonce instead of the public id.
        #[arg(long)]
        random_nonce: bool,
        /// The public-id ledger (default: ledger.db in --home).
        #[arg(long, value_name = "FILE")]
        ledger: Option<PathBuf>,
        /// The personalizer's home directory.
        #[arg(long, value_name = "DIR", env = "PERSONALIZER_HOME")]
        home: Option<PathBuf>,
        /// Continue the unfinished run of the ledger (or run RUN) after a
        /// crash; the run's ids, handles and directory come from the ledger.
        #[arg(long, value_name = "RUN", num_args = 0..=1, conflicts_with_all = ["start_public_id", "key_handles", "out", "random_nonce"])]
        resume: Option<Option<u64>>,
        /// Also write the plaintext secrets, once, in pyhsm's yubikey-csv
        /// format, to this new file (mode 0600), for programming YubiKeys.
        /// The first key handle must carry the export flag.
        #[arg(long, value_name = "FILE")]
        yubikey_csv: Option<PathBuf>,
        /// Also write one `ykpersonalize` command per YubiKey to this new
        /// file (mode 0600). The first key handle must carry the export flag.
        #[arg(long, value_name = "FILE")]
        ykpersonalize: Option<PathBuf>,
        /// Also write a signed transfer bundle of every AEAD of the run.
        #[arg(long, value_name = "FILE")]
        bundle: Option<PathBuf>,
        /// Sign the bundle with this unencrypted PKCS#8 PEM key instead of
        /// the sealed key of --home (tests).
        #[arg(long, value_name = "FILE", hide = true)]
        signing_key_pem: Option<PathBuf>,
        /// Keys per durable batch.
        #[arg(long, value_name = "N", default_value_t = personalizer::generate::DEFAULT_BATCH, hide = true)]
        batch: u64,
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
        Command::Import { keystore, ykksm_csv, key_handles, out, random_nonce } => {
            use personalizer::migrate::{check_ykksm_import, import_ykksm, YkksmImport};
            let stdin = ykksm_csv.as_os_str() == "-";
            let source = if stdin { "stdin".to_owned() } else { ykksm_csv.display().to_string() };
            let import = YkksmImport { key_handles, nonce: nonce_policy(random_nonce), source };
            let input: Box<dyn std::io::Read> = if stdin {
                Box::new(std::io::stdin().lock())
            } else {
                Box::new(std::fs::File::open(&ykksm_csv).map_err(|e| hsm::Error::io(&ykksm_csv, e))?)
            };
            let hsm = keystore.open()?;
            check_ykksm_import(&hsm, &import).map_err(migrate_error)?;
            let progress = ksm::import::progress_bar(None, "YK-KSM rows");
            let report = import_ykksm(&hsm, input, &AeadDir::new(&out), &import, &progress);
            progress.finish_and_clear();
            let report = report.map_err(migrate_error)?;
            migrated(&report, &format!("imported YK-KSM secrets into {}: {report}", out.display()))
        }
        Command::DecryptAead {
            keystore,
            aead_dir,
            key_handle,
            format,
            output,
            rewrap_to,
            out,
            random_nonce,
            public_id,
            start_public_id,
            stop_public_id,
            fail_fast,
        } => {
            use personalizer::migrate::{decrypt_aead, DecryptAead, Format, PublicIdFilter};
            let filter = PublicIdFilter { ids: public_id, start: start_public_id, stop: stop_public_id };
            let run =
                DecryptAead { aead_dir, key_handle, filter, format, output, rewrap_to, out, nonce: nonce_policy(random_nonce), fail_fast };
            run.validate().map_err(migrate_error)?;
            let hsm = keystore.open()?;
            let progress = ksm::import::progress_bar(None, "AEADs");
            let report = decrypt_aead(&hsm, &run, &progress);
            progress.finish_and_clear();
            let report = report.map_err(migrate_error)?;
            let summary = match (format, &run.output, &run.rewrap_to, &run.out) {
                (Format::Aead, _, Some(to), Some(out)) => format!("re-wrapped under key handle {to} into {}: {report}", out.display()),
                (_, Some(file), _, _) => {
                    format!("wrote the secrets of {} YubiKey(s) to {} (mode 0600); errors {}", report.added, file.display(), report.errors)
                }
                _ => report.to_string(),
            };
            migrated(&report, &summary)
        }
        Command::Generate {
            keystore,
            count,
            start_public_id,
            public_id_chars,
            key_handles,
            out,
            random_nonce,
            ledger,
            home,
            resume,
            yubikey_csv,
            ykpersonalize,
            bundle,
            signing_key_pem,
            batch,
        } => {
            let ledger_path = match (ledger, &home) {
                (Some(p), _) => p,
                (None, Some(h)) => personalizer::home::Home::open(h).map_err(|e| personalizer::Error::Usage(e.to_string()))?.ledger_db(),
                (None, None) => {
                    return Err(personalizer::Error::Usage("give the public-id ledger with --ledger FILE or --home DIR".to_owned()))
                }
            };
            let hsm = keystore.open()?;
            let signing_key = match (&bundle, signing_key_pem, &home) {
                (None, _, _) => None,
                (Some(_), Some(pem), _) => {
                    let text = Zeroizing::new(std::fs::read_to_string(&pem).map_err(|e| hsm::Error::io(&pem, e))?);
                    Some(SigningKey::from_pkcs8_pem(&text).map_err(|e| personalizer::Error::Usage(format!("{}: {e}", pem.display())))?)
                }
                (Some(_), None, Some(h)) => {
                    let sealed = personalizer::home::Home::open(h).map_err(|e| personalizer::Error::Usage(e.to_string()))?.signing_key();
                    Some(
                        SigningKey::unseal_file(&hsm, &sealed)
                            .map_err(|e| personalizer::Error::Usage(format!("{}: {e}", sealed.display())))?,
                    )
                }
                (Some(_), None, None) => {
                    return Err(personalizer::Error::Usage("--bundle needs the signing key: give --home DIR".to_owned()))
                }
            };
            let opts = RunOptions {
                yubikey_csv: yubikey_csv.as_deref(),
                ykpersonalize: ykpersonalize.as_deref(),
                bundle: bundle.as_deref().zip(signing_key.as_ref()),
                batch,
                ..RunOptions::default()
            };
            let mut ledger = Ledger::open(&ledger_path)?;
            let bar = ksm::import::progress_bar(None, "generating");
            let mut progress = |n: u64| bar.set_position(n);
            let report = match (resume, start_public_id, out) {
                (Some(run), _, _) => personalizer::resume(&hsm, &mut ledger, run, &opts, &mut progress)?,
                (None, Some(start), Some(out)) => {
                    bar.set_length(count);
                    let params = GenerateParams { count, start, public_id_chars, key_handles, random_nonce };
                    generate(&hsm, &mut ledger, &out, &params, &opts, &mut progress)?
                }
                _ => return Err(personalizer::Error::Usage("give --start-public-id and --out, or --resume".to_owned())),
            };
            bar.finish_and_clear();
            for path in &report.outputs {
                println!("wrote personalisation secrets for {} YubiKey(s) to {} (mode 0600)", report.count, path.display());
            }
            if let Some(path) = &report.bundle {
                println!("wrote the signed transfer bundle {}", path.display());
            }
            println!(
                "run {}: generated {} YubiKey(s), public ids {} to {}, AEADs under {}",
                report.run,
                report.count,
                report.first,
                report.last,
                report.out.display()
            );
            Ok(())
        }
    }
}

fn nonce_policy(random_nonce: bool) -> ksm::import::NoncePolicy {
    if random_nonce {
        ksm::import::NoncePolicy::Random
    } else {
        ksm::import::NoncePolicy::PublicId
    }
}

fn migrate_error(e: personalizer::migrate::MigrateError) -> personalizer::Error {
    personalizer::Error::Usage(e.to_string())
}

/// Print an import or decrypt-aead report: issues on stderr, `summary` on
/// stdout; an error if there were conflicts or errors.
fn migrated(report: &ksm::import::ImportReport, summary: &str) -> Result<(), personalizer::Error> {
    let _ = personalizer::migrate::write_issues(report, &mut std::io::stderr());
    println!("{summary}");
    if report.is_clean() {
        Ok(())
    } else {
        Err(personalizer::Error::Usage(format!(
            "{} conflict(s) and {} error(s), listed above; everything else was done",
            report.conflicts, report.errors
        )))
    }
}
