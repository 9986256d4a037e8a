//! `replication`: the replication PKI (and, later, the replication service).
#![forbid(unsafe_code)]

use std::fs::{self, DirBuilder};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use replication::pki::{self, Ca, CertInfo};

/// Replication between the appliance's sites over QUIC with mutual TLS.
///
/// Every site holds a certificate from one private CA, used for nothing
/// else. Being signed by the CA is not enough: each site also pins its
/// peers' certificate fingerprints (or allows their names), as printed by
/// `cert issue` and `cert show`.
#[derive(Parser, Debug)]
#[command(name = "replication", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// The private replication CA.
    #[command(subcommand)]
    Ca(CaCommand),
    /// Site certificates.
    #[command(subcommand)]
    Cert(CertCommand),
}

#[derive(Subcommand, Debug)]
enum CaCommand {
    /// Create a new CA: DIR/ca.key (mode 0600) and DIR/ca.pem. Never
    /// overwrites an existing CA. Keep ca.key offline after issuing the site
    /// certificates.
    Init(CaInitArgs),
}

#[derive(Args, Debug)]
struct CaInitArgs {
    /// Directory for ca.pem and ca.key (created mode 0700 if missing).
    #[arg(long, value_name = "DIR")]
    dir: PathBuf,
    /// The CA's common name.
    #[arg(long, value_name = "CN", default_value = pki::DEFAULT_CA_NAME)]
    common_name: String,
    /// Validity in days.
    #[arg(long, value_name = "DAYS", default_value_t = 3650)]
    days: u64,
}

#[derive(Subcommand, Debug)]
enum CertCommand {
    /// Issue a site certificate: OUT/NAME.key (mode 0600) and OUT/NAME.pem,
    /// with NAME as its DNS name, usable as TLS client and server. Never
    /// overwrites. Prints the fingerprint to pin at the other sites.
    Issue(CertIssueArgs),
    /// Print a certificate's subject, names, validity, usages and SHA-256
    /// fingerprint (the value peers pin).
    Show(CertShowArgs),
}

#[derive(Args, Debug)]
struct CertIssueArgs {
    /// The CA directory (ca.pem and ca.key from `ca init`).
    #[arg(long, value_name = "DIR")]
    ca_dir: PathBuf,
    /// The site name, e.g. auth1, auth2, witness: lower-case letters,
    /// digits, '-' and '.'.
    #[arg(long, value_name = "NAME")]
    name: String,
    /// Directory for NAME.pem and NAME.key (created mode 0700 if missing).
    #[arg(long, value_name = "DIR", default_value = ".")]
    out: PathBuf,
    /// Validity in days (never beyond the CA's).
    #[arg(long, value_name = "DAYS", default_value_t = 1825)]
    days: u64,
}

#[derive(Args, Debug)]
struct CertShowArgs {
    /// A PEM certificate file (the first certificate in it is shown).
    #[arg(value_name = "FILE")]
    file: PathBuf,
}

fn days(n: u64) -> Duration {
    Duration::from_secs(n.saturating_mul(86_400))
}

fn ensure_dir(dir: &Path) -> Result<(), String> {
    if dir.is_dir() {
        return Ok(());
    }
    DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(|e| format!("{}: {e}", dir.display()))
}

fn ca_init(args: CaInitArgs) -> Result<(), String> {
    for file in [pki::CA_KEY_FILE, pki::CA_CERT_FILE] {
        let path = args.dir.join(file);
        if fs::symlink_metadata(&path).is_ok() {
            return Err(format!("{} already exists; refusing to overwrite a CA", path.display()));
        }
    }
    ensure_dir(&args.dir)?;
    let ca = Ca::generate(&args.common_name, days(args.days)).map_err(|e| e.to_string())?;
    let files = ca.write(&args.dir).map_err(|e| e.to_string())?;
    println!("CA key:         {} (mode 0600; keep it offline)", files.key.display());
    println!("CA certificate: {}", files.cert.display());
    println!("CA fingerprint: {}", ca.fingerprint());
    Ok(())
}

fn cert_issue(args: CertIssueArgs) -> Result<(), String> {
    pki::validate_name(&args.name).map_err(|e| e.to_string())?;
    let ca = Ca::load(&args.ca_dir).map_err(|e| e.to_string())?;
    ensure_dir(&args.out)?;
    let site = ca.issue(&args.name, days(args.days)).map_err(|e| e.to_string())?;
    let files = site.write(&args.out).map_err(|e| e.to_string())?;
    println!("key:         {} (mode 0600)", files.key.display());
    println!("certificate: {}", files.cert.display());
    println!("name:        {}", site.name());
    println!("not after:   {}", pki::display_time(site.not_after()));
    println!("fingerprint: {}", site.fingerprint());
    Ok(())
}

fn cert_show(args: CertShowArgs) -> Result<(), String> {
    let info = CertInfo::load(&args.file).map_err(|e| e.to_string())?;
    println!("{info}");
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Ca(CaCommand::Init(args)) => ca_init(args),
        Command::Cert(CertCommand::Issue(args)) => cert_issue(args),
        Command::Cert(CertCommand::Show(args)) => cert_show(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("replication: {e}");
            ExitCode::FAILURE
        }
    }
}
