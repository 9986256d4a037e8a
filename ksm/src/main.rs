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
    /// Import AEADs into the SQLite store: a pyhsm AEAD directory, a YK-KSM
    /// export wrapped through the security module, or a signed transfer
    /// bundle from the personalizer.
    #[command(long_about = IMPORT_HELP, after_help = TRANSFER_EXIT)]
    Import(ImportArgs),
    /// Export the SQLite store to a pyhsm-layout AEAD directory.
    #[command(long_about = EXPORT_HELP, after_help = TRANSFER_EXIT)]
    Export(ExportArgs),
    /// Inspect the SQLite AEAD store.
    #[command(subcommand)]
    Store(StoreCommand),
    /// Decrypt one OTP and print the Yubico KSM answer line
    /// (`OK counter=… low=… high=… use=…` or `ERR …`); exits 1 on ERR.
    Decrypt {
        #[command(flatten)]
        keystore: KeystoreArgs,
        /// pyhsm-layout AEAD directory (`<dir>/<key handle>/<pairs>/<public id>`).
        #[arg(long, value_name = "DIR", required_unless_present = "store", conflicts_with = "store")]
        aead_dir: Option<PathBuf>,
        /// The SQLite AEAD store, instead of --aead-dir.
        #[arg(long, value_name = "DB")]
        store: Option<PathBuf>,
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
    #[arg(long, env = "OTP_KEYSTORE", value_name = "PATH", conflicts_with = "hsm_config")]
    keystore: Option<PathBuf>,
    /// A TOML file holding an `[hsm]` table (a PKCS#11 token, a YubiHSM 1…),
    /// instead of --keystore; it replaces the configuration file's module.
    #[arg(long, env = "OTP_HSM_CONFIG", value_name = "PATH")]
    hsm_config: Option<PathBuf>,
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
        hsm: args.hsm_config.as_deref().map(hsm::config::read_hsm_table).transpose().map_err(|e| e.to_string())?,
        password_file: args.password_file,
        store: args.store,
        aead_dir: args.aead_dir,
        key_handles: args.key_handles,
        request_timeout_ms: args.request_timeout_ms,
        ..ksm::config::ConfigFile::default()
    };
    let config = file.overridden_by(flags).resolve()?;
    let hsm = config.hsm.open().map_err(|e| format!("security module ({}): {e}", config.hsm))?;
    let store: Box<dyn ksm::AeadLookup> = match &config.aeads {
        AeadSource::Store(path) => Box::new(AeadStore::open_existing(path).map_err(|e| e.to_string())?),
        AeadSource::Dir(dir) => Box::new(AeadDir::new(dir)),
    };
    let ksm = Arc::new(Ksm::new(hsm, store, config.key_handles.clone()));
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
        Command::Import(args) => report_exit(import(args)),
        Command::Export(args) => report_exit(export(args)),
        Command::Store(cmd) => match store_command(&cmd) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(2)
            }
        },
        Command::Decrypt { keystore, aead_dir, store, key_handles, otp } => {
            let hsm = match keystore.open() {
                Ok(h) => h,
                Err(e) => {
                    // The protocol line first, so scripts see the verdict.
                    println!("ERR Backend error");
                    eprintln!("error: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let aeads: Box<dyn ksm::AeadLookup> = match (aead_dir, store) {
                (Some(dir), _) => Box::new(AeadDir::new(dir)),
                (None, Some(db)) => match AeadStore::open_existing(&db) {
                    Ok(s) => Box::new(s),
                    Err(e) => {
                        println!("ERR Database error");
                        eprintln!("error: {e}");
                        return ExitCode::FAILURE;
                    }
                },
                (None, None) => {
                    eprintln!("error: give --aead-dir or --store");
                    return ExitCode::from(2);
                }
            };
            let ksm = Ksm::new(hsm, aeads, key_handles);
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

// ------------------------------------------------- import, export, store

const TRANSFER_EXIT: &str = "\
Prints one line to stdout: `added N, already present N, conflicts N, errors N`,
and each conflict and error (with its file or line) to stderr.

Exit status: 0 when there were no conflicts and no errors; 1 when there were
(whatever could be imported was); 2 when the command could not run at all
(bad arguments, unreadable input, store or security-module failure).";

const IMPORT_HELP: &str = "Import AEADs into the SQLite store.

Imports are idempotent: a (public id, key handle) pair already stored with the
same AEAD counts as `already present`. A pair stored with a different AEAD is a
`conflict`: the stored AEAD is kept, never overwritten; a conflicting AEAD
file is quarantined in the store (`ksm store conflicts` lists them).
Unreadable or garbled entries are `errors`, reported with their path or line;
the rest is imported.

--aead-dir reads a pyhsm-layout tree (`<dir>/<key handle>/<pairs…>/<public
id>`, v0 and v1 files) as yhsm-db-import does; the key handle comes from the
first directory below DIR.

--ykksm-csv reads a YK-KSM export (first line `# ykksm 1`, rows
`seq,publicname,uid,aeskey,…`) and wraps each secret in the security module
under --key-handle, which needs the `import` flags (buffer-load,
buffer-aead-generate, and user-nonce unless --random-nonce). Public id 0 is
skipped. A pair that is already stored is never wrapped again; it is compared
with the CSV's secret: byte for byte when both use the public id as nonce,
otherwise by decoding a test OTP in the module if the handle also has
otp-decode (a different secret is a conflict, reported and not written). If
the handle cannot decode, such pairs count as already present and are listed
as unverified on stderr.

--bundle reads a signed transfer bundle written by the personalizer (public
ids, one AEAD per key handle, a manifest and an RSA-2048/SHA-256 signature).
The whole file is verified with the public key given by --trust before
anything is imported: a tampered, truncated or differently signed bundle is
refused (exit status 2) and nothing is imported. What was verified (count,
key handles, public id range, signer fingerprint) is printed to stderr.";

const EXPORT_HELP: &str = "Export the SQLite store to a pyhsm-layout AEAD directory, as yhsm-db-export
does: v1 files (mode 0600) at `<dir>/0x<hex key handle>/<pairs…>/<public id>`.

Existing files are never overwritten: one holding the same AEAD counts as
`already present`, one holding another AEAD as a `conflict`. `added` counts
the files written.";

/// `ksm import`: exactly one source.
#[derive(clap::Args, Debug)]
#[command(group(clap::ArgGroup::new("source").required(true).args(["aead_dir", "ykksm_csv", "bundle"])))]
struct ImportArgs {
    /// The SQLite AEAD store; created (mode 0600) if missing.
    #[arg(long, value_name = "DB")]
    store: PathBuf,
    /// A pyhsm-layout AEAD directory to import.
    #[arg(long, value_name = "DIR")]
    aead_dir: Option<PathBuf>,
    /// A YK-KSM export (`# ykksm 1`) to wrap and import; `-` reads stdin.
    #[arg(long, value_name = "FILE", requires = "key_handle")]
    ykksm_csv: Option<PathBuf>,
    /// The key handle to wrap YK-KSM secrets under (decimal, 0x-hex or 4 characters).
    #[arg(long, value_name = "KH", requires = "ykksm_csv")]
    key_handle: Option<otp::KeyHandle>,
    /// Let the module draw each AEAD's nonce instead of using the public id
    /// (pyhsm's --random-nonce); the handle then needs no user-nonce flag.
    #[arg(long, requires = "ykksm_csv")]
    random_nonce: bool,
    /// A signed transfer bundle from the personalizer; verified with --trust
    /// before anything is imported.
    #[arg(long, value_name = "FILE", requires = "trust")]
    bundle: Option<PathBuf>,
    /// The personalizer's public key (`-----BEGIN PUBLIC KEY-----` PEM) that
    /// must have signed the --bundle.
    #[arg(long, value_name = "PUBKEY", requires = "bundle")]
    trust: Option<PathBuf>,
    /// The keystore (needed with --ykksm-csv).
    #[arg(long, env = "OTP_KEYSTORE", value_name = "PATH")]
    keystore: Option<PathBuf>,
    /// File holding the keystore password (one line); prompted for on a
    /// terminal otherwise.
    #[arg(long, env = "OTP_KEYSTORE_PASSWORD_FILE", value_name = "PATH")]
    password_file: Option<PathBuf>,
}

/// `ksm export`.
#[derive(clap::Args, Debug)]
struct ExportArgs {
    /// The SQLite AEAD store (must exist).
    #[arg(long, value_name = "DB")]
    store: PathBuf,
    /// The directory to write; created if missing.
    #[arg(long, value_name = "DIR")]
    aead_dir: PathBuf,
    /// Export only these key handles (comma-separated); all by default.
    #[arg(long = "key-handle", value_name = "KH,…", value_delimiter = ',')]
    key_handles: Vec<otp::KeyHandle>,
}

/// `ksm store …`.
#[derive(Subcommand, Debug)]
enum StoreCommand {
    /// Count the AEADs per key handle and the quarantined conflicts.
    Stats {
        /// The SQLite AEAD store (must exist).
        #[arg(long, value_name = "DB")]
        store: PathBuf,
    },
    /// List the quarantined AEADs, one per line, beside the AEAD kept for the
    /// same pair: `<public id> <key handle> seen=… origin=… refused=<nonce>:<aead>
    /// stored=<nonce>:<aead> stored-created=… stored-origin=…` (times in Unix seconds).
    Conflicts {
        /// The SQLite AEAD store (must exist).
        #[arg(long, value_name = "DB")]
        store: PathBuf,
    },
}

fn unix_now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// Print a report (line on stdout, details on stderr) and choose the exit status.
fn report_exit(result: Result<ksm::import::ImportReport, String>) -> ExitCode {
    let report = match result {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    for issue in &report.issues {
        eprintln!("{issue}");
    }
    if report.issues_not_kept() > 0 {
        eprintln!("… and {} more conflicts and errors", report.issues_not_kept());
    }
    if report.skipped > 0 {
        eprintln!("note: skipped {} entries (hidden files, files outside key-handle directories, public id 0)", report.skipped);
    }
    if report.unverified > 0 {
        eprintln!(
            "note: {} pairs were already stored and not wrapped again; the key handle cannot decode OTPs, \
             so they were not compared with the CSV's secrets",
            report.unverified
        );
    }
    println!("{report}");
    if report.is_clean() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn import(args: ImportArgs) -> Result<ksm::import::ImportReport, String> {
    use ksm::import::{self, CsvImport, NoncePolicy};
    let now = unix_now();
    if let Some(dir) = &args.aead_dir {
        if !dir.is_dir() {
            return Err(format!("{} is not a directory", dir.display()));
        }
        let store = AeadStore::open(&args.store).map_err(|e| e.to_string())?;
        let progress = import::progress_bar(None, "AEAD files");
        let report = import::import_aead_dir(&store, dir, now, &progress).map_err(|e| e.to_string());
        progress.finish_and_clear();
        return report;
    }
    if let Some(bundle) = &args.bundle {
        return import_bundle(bundle, args.trust.as_deref(), &args.store, now);
    }
    let (Some(csv), Some(key_handle)) = (&args.ykksm_csv, args.key_handle) else {
        return Err("give --aead-dir, or --ykksm-csv with --key-handle".to_owned());
    };
    let keystore = KeystoreArgs::soft(
        args.keystore.clone().ok_or("--ykksm-csv needs --keystore (the module wraps the secrets)")?,
        args.password_file.clone(),
    );
    let nonce = if args.random_nonce { NoncePolicy::Random } else { NoncePolicy::PublicId };
    // The keystore and the handle's permission first: nothing is created or
    // written if the handle may not import.
    let hsm = keystore.open().map_err(|e| format!("security module: {e}"))?;
    import::check_import_handle(&*hsm, key_handle, nonce).map_err(|e| e.to_string())?;
    let source = if csv.as_os_str() == "-" { "stdin".to_owned() } else { csv.display().to_string() };
    let input: Box<dyn std::io::Read> = if csv.as_os_str() == "-" {
        Box::new(std::io::stdin().lock())
    } else {
        Box::new(std::fs::File::open(csv).map_err(|e| format!("{source}: {e}"))?)
    };
    let store = AeadStore::open(&args.store).map_err(|e| e.to_string())?;
    let progress = import::progress_bar(None, "YK-KSM rows");
    let report =
        import::import_ykksm_csv(&store, &*hsm, input, &CsvImport { key_handle, nonce, source }, now, &progress).map_err(|e| e.to_string());
    progress.finish_and_clear();
    report
}

/// `ksm import --bundle FILE --trust PUBKEY`.
fn import_bundle(
    bundle: &std::path::Path,
    trust: Option<&std::path::Path>,
    store: &std::path::Path,
    now: i64,
) -> Result<ksm::import::ImportReport, String> {
    let trust = trust.ok_or("--bundle needs --trust (the personalizer's public key)")?;
    let key = hsm::signing::VerifyingKey::from_pem_file(trust).map_err(|e| format!("trusted key {}: {e}", trust.display()))?;
    if !bundle.is_file() {
        return Err(format!("{} is not a file", bundle.display()));
    }
    let refused = |e: ksm::bundle::BundleError| {
        use ksm::bundle::BundleError as E;
        match e {
            // Refused by the verification, which comes before any import.
            E::Malformed { .. } | E::Truncated(_) | E::BadSignature { .. } | E::WrongSigner { .. } | E::HashMismatch { .. } => {
                format!("{}: {e}; nothing was imported", bundle.display())
            }
            _ => format!("{}: {e}", bundle.display()),
        }
    };
    // Verified before the store is even opened (or created); the import
    // verifies again, and refuses a file changed since.
    let m = ksm::bundle::verify(bundle, &key).map_err(refused)?;
    let handles: Vec<String> = m.key_handles.iter().map(ToString::to_string).collect();
    eprintln!(
        "verified bundle {}: {} YubiKeys, key handles {}, public ids {} to {}, origin {:?}, created {}, signed by {}",
        bundle.display(),
        m.count,
        handles.join(","),
        m.first_public_id,
        m.last_public_id,
        m.origin,
        m.created,
        m.signer
    );
    let store = AeadStore::open(store).map_err(|e| e.to_string())?;
    let progress = ksm::import::progress_bar(Some(m.count), "bundle entries");
    let result = ksm::bundle::import_bundle(&store, bundle, &key, now, &progress);
    progress.finish_and_clear();
    let imported = result.map_err(refused)?;
    Ok(imported.report)
}

fn export(args: ExportArgs) -> Result<ksm::import::ImportReport, String> {
    let store = AeadStore::open_existing(&args.store).map_err(|e| e.to_string())?;
    let total = ksm::export::export_size(&store, &args.key_handles).map_err(|e| e.to_string())?;
    let progress = ksm::import::progress_bar(Some(total), "exporting");
    let report = ksm::export::export_aead_dir(&store, &args.aead_dir, &args.key_handles, &progress).map_err(|e| e.to_string());
    progress.finish_and_clear();
    report
}

fn store_command(cmd: &StoreCommand) -> Result<(), String> {
    match cmd {
        StoreCommand::Stats { store } => {
            let store = AeadStore::open_existing(store).map_err(|e| e.to_string())?;
            let by_handle = store.count_by_key_handle().map_err(|e| e.to_string())?;
            println!("{:<12} {:>10} {:>10}", "key handle", "decimal", "aeads");
            for (kh, n) in &by_handle {
                println!("{:<12} {:>10} {n:>10}", kh.to_string(), kh.get());
            }
            println!("{:<12} {:>10} {:>10}", "total", "", by_handle.iter().map(|(_, n)| n).sum::<u64>());
            println!("conflicts {}", store.conflict_count().map_err(|e| e.to_string())?);
            Ok(())
        }
        StoreCommand::Conflicts { store } => {
            let store = AeadStore::open_existing(store).map_err(|e| e.to_string())?;
            let hex = |r: &otp::aead_file::AeadRecord| format!("{}:{}", hex::encode(r.nonce.as_bytes()), hex::encode(r.aead.as_bytes()));
            for c in store.conflicts().map_err(|e| e.to_string())? {
                let stored = match &c.stored {
                    Some((record, created, origin)) => format!("stored={} stored-created={created} stored-origin={origin}", hex(record)),
                    None => "stored=none".to_owned(),
                };
                println!(
                    "{} {} seen={} origin={} refused={} {stored}",
                    c.public_id,
                    c.refused.key_handle,
                    c.seen,
                    c.origin,
                    hex(&c.refused)
                );
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn cli_is_consistent() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}
