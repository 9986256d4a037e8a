//! `personalizer`: the personalisation laptop's command line.
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use hsm::cli::KeystoreCommand;
use ksm::aead_dir::{AeadDir, KeyHandleDir};
use personalizer::cli::{
    self as officers, AuditCommand, CliResult, Context, HomeArgs, InitArgs, KeyHandleCommand, LoginArgs, OperatorCommand, QuorumCommand,
};
use personalizer::event::AuditEvent;
use personalizer::ledger::Ledger;
use personalizer::quorum::QuorumOperation;
use personalizer::{generate, GenerateParams, RunOptions, StartId};

/// Personalisation of YubiKeys: secrets are generated inside the security
/// module and leave it as AEADs (YubiHSM 1 format, pyhsm layout).
///
/// Crypto officers log in with two factors (password, then a challenge
/// signed with their RSA key); the most sensitive operations also need an
/// M-of-N quorum; every command is recorded in a signed, hash-chained audit
/// log. Start with `keystore init`, `init`, `operator add`, `operator
/// set-2fa` and `login`.
#[derive(Parser, Debug)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(flatten)]
    home: HomeArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create the software keystore (`keystore init`) or list its handles.
    /// Key handles are created under quorum with `key-handle create`.
    #[command(subcommand)]
    Keystore(KeystoreCommand),
    /// Set up the home directory: configuration with a fresh pepper, the
    /// installation's signing key sealed under the keystore, the audit log.
    Init(InitArgs),
    /// Manage crypto officers and their 2FA keys.
    #[command(subcommand)]
    Operator(OperatorCommand),
    /// Open a session: password, then a signed challenge (two runs).
    Login(LoginArgs),
    /// End the session of --session.
    Logout,
    /// M-of-N approvals: request, approve, status, policy.
    #[command(subcommand)]
    Quorum(QuorumCommand),
    /// The key-handle ceremony: create or import handles in the module,
    /// export the validation servers' decode-only keystore (quorum).
    #[command(subcommand)]
    KeyHandle(KeyHandleCommand),
    /// Verify or export the audit log.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Import a YK-KSM export (`# ykksm 1`): wrap each secret in the module
    /// under each key handle and write a pyhsm AEAD directory, as pyhsm's
    /// yhsm-import-keys does. Bad rows are skipped and reported with their
    /// line numbers (exit status 1); re-running is idempotent. Needs a
    /// session.
    Import {
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
    /// flag. Bad files are skipped and reported (exit status 1). Needs a
    /// session; a plaintext file (raw, yubikey-csv) also a plaintext-output
    /// quorum approval whose context is the --output path as given.
    DecryptAead {
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
        /// The plaintext-output quorum token file (raw, yubikey-csv).
        #[arg(long, value_name = "FILE")]
        approval: Option<PathBuf>,
    },
    /// Generate YubiKey secrets inside the module and write their AEADs.
    ///
    /// Public ids come from the ledger and are never reused; a run that
    /// was interrupted is continued with --resume. Needs a session; the
    /// plaintext outputs (--yubikey-csv, --ykpersonalize) also a
    /// plaintext-output quorum approval whose context is their paths as
    /// given, comma-separated.
    Generate {
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
        /// The plaintext-output quorum token file.
        #[arg(long, value_name = "FILE")]
        approval: Option<PathBuf>,
        /// Keys per durable batch.
        #[arg(long, value_name = "N", default_value_t = personalizer::generate::DEFAULT_BATCH, hide = true)]
        batch: u64,
    },
}

fn main() -> ExitCode {
    hsm::cli::init_logging();
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn say(text: CliResult<String>) -> CliResult<ExitCode> {
    println!("{}", text?);
    Ok(ExitCode::SUCCESS)
}

fn run(cli: Cli) -> CliResult<ExitCode> {
    let home = cli.home;
    match cli.command {
        Command::Keystore(cmd) => {
            if matches!(cmd, KeystoreCommand::AddHandle { .. } | KeystoreCommand::ImportPyhsm { .. }) {
                return Err("on the personalisation laptop key handles are created under quorum: `personalizer key-handle create` \
                            or `personalizer key-handle import-pyhsm`"
                    .to_owned());
            }
            hsm::cli::run(&cmd, &mut std::io::stdout()).map_err(|e| e.to_string())?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Init(args) => say(officers::init(&home, &args)),
        Command::Operator(cmd) => say(officers::operator(&home, &cmd)),
        Command::Login(args) => say(officers::login(&home, &args)),
        Command::Logout => say(officers::logout(&home)),
        Command::Quorum(cmd) => say(officers::quorum(&home, &cmd)),
        Command::KeyHandle(cmd) => say(officers::key_handle(&home, &cmd)),
        Command::Audit(cmd) => {
            let (report, intact) = officers::audit(&home, &cmd)?;
            if matches!(cmd, AuditCommand::Export { out: None }) {
                eprintln!("{report}");
            } else {
                println!("{report}");
            }
            Ok(if intact { ExitCode::SUCCESS } else { ExitCode::from(1) })
        }
        Command::Import { ykksm_csv, key_handles, out, random_nonce } => {
            use personalizer::migrate::{check_ykksm_import, import_ykksm, YkksmImport};
            let ctx = Context::open(&home)?;
            let session = ctx.session();
            let who = session.as_ref().ok().map(|s| s.operator.to_string());
            let handles: Vec<String> = key_handles.iter().map(ToString::to_string).collect();
            let stdin = ykksm_csv.as_os_str() == "-";
            let source = if stdin { "stdin".to_owned() } else { ykksm_csv.display().to_string() };
            let result = (|| {
                session?;
                let import = YkksmImport { key_handles, nonce: nonce_policy(random_nonce), source: source.clone() };
                let input: Box<dyn std::io::Read> = if stdin {
                    Box::new(std::io::stdin().lock())
                } else {
                    Box::new(std::fs::File::open(&ykksm_csv).map_err(|e| format!("{}: {e}", ykksm_csv.display()))?)
                };
                check_ykksm_import(ctx.hsm(), &import).map_err(|e| e.to_string())?;
                let progress = ksm::import::progress_bar(None, "YK-KSM rows");
                let report = import_ykksm(ctx.hsm(), input, &AeadDir::new(&out), &import, &progress);
                progress.finish_and_clear();
                report.map_err(|e| e.to_string())
            })();
            let result = ctx.finish(who.as_deref(), "import.ykksm", result, |r| {
                AuditEvent::ok(
                    who.as_deref(),
                    "import.ykksm",
                    serde_json::json!({ "source": source, "key_handles": handles, "out": out.display().to_string(),
                        "added": r.added, "already_present": r.already_present, "conflicts": r.conflicts, "errors": r.errors }),
                )
            })?;
            migrated(&result, &format!("imported YK-KSM secrets into {}: {result}", out.display()))
        }
        Command::DecryptAead {
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
            approval,
        } => {
            use personalizer::migrate::{decrypt_aead, DecryptAead, Format, PublicIdFilter};
            let filter = PublicIdFilter { ids: public_id, start: start_public_id, stop: stop_public_id };
            let run =
                DecryptAead { aead_dir, key_handle, filter, format, output, rewrap_to, out, nonce: nonce_policy(random_nonce), fail_fast };
            run.validate().map_err(|e| e.to_string())?;
            let mut ctx = Context::open(&home)?;
            let session = ctx.session();
            let who = session.as_ref().ok().map(|s| s.operator.to_string());
            let mut approvers = Vec::new();
            let result = (|| {
                let session = session?;
                if let Some(file) = &run.output {
                    approvers = ctx.quorum(&session, approval.as_deref(), QuorumOperation::PlaintextOutput, &path_context(&[file]))?;
                }
                let progress = ksm::import::progress_bar(None, "AEADs");
                let report = decrypt_aead(ctx.hsm(), &run, &progress);
                progress.finish_and_clear();
                report.map_err(|e| e.to_string())
            })();
            let approved = approvers.clone();
            let detail = |r: &ksm::import::ImportReport| {
                serde_json::json!({ "format": format!("{format:?}"), "key_handle": run.key_handle.to_string(),
                    "aead_dir": run.aead_dir.display().to_string(), "output": run.output.as_ref().map(|p| p.display().to_string()),
                    "rewrap_to": run.rewrap_to.as_ref().map(ToString::to_string), "count": r.added, "errors": r.errors })
            };
            let report = ctx.finish(who.as_deref(), "decrypt-aead", result, |r| {
                AuditEvent::ok(who.as_deref(), "decrypt-aead", detail(r)).approved_by(approved)
            })?;
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
            count,
            start_public_id,
            public_id_chars,
            key_handles,
            out,
            random_nonce,
            resume,
            yubikey_csv,
            ykpersonalize,
            bundle,
            approval,
            batch,
        } => {
            let mut ctx = Context::open(&home)?;
            let session = ctx.session();
            let who = session.as_ref().ok().map(|s| s.operator.to_string());
            let mut approvers = Vec::new();
            let plaintext: Vec<&Path> = yubikey_csv.iter().chain(&ykpersonalize).map(PathBuf::as_path).collect();
            let result = (|| {
                let session = session?;
                if !plaintext.is_empty() {
                    approvers = ctx.quorum(&session, approval.as_deref(), QuorumOperation::PlaintextOutput, &path_context(&plaintext))?;
                }
                let opts = RunOptions {
                    yubikey_csv: yubikey_csv.as_deref(),
                    ykpersonalize: ykpersonalize.as_deref(),
                    bundle: bundle.as_deref().map(|b| (b, ctx.signer())),
                    batch,
                    ..RunOptions::default()
                };
                let mut ledger = Ledger::open(&ctx.home().ledger_db()).map_err(|e| e.to_string())?;
                let bar = ksm::import::progress_bar(None, "generating");
                let mut progress = |n: u64| bar.set_position(n);
                let report = match (resume, start_public_id, &out) {
                    (Some(run), _, _) => personalizer::resume(ctx.hsm(), &mut ledger, run, &opts, &mut progress),
                    (None, Some(start), Some(out)) => {
                        bar.set_length(count);
                        let params = GenerateParams { count, start, public_id_chars, key_handles: key_handles.clone(), random_nonce };
                        generate(ctx.hsm(), &mut ledger, out, &params, &opts, &mut progress)
                    }
                    _ => return Err("give --start-public-id and --out, or --resume".to_owned()),
                };
                bar.finish_and_clear();
                report.map_err(|e| e.to_string())
            })();
            let approved = approvers.clone();
            let report = ctx.finish(who.as_deref(), "generate", result, |r| {
                AuditEvent::ok(
                    who.as_deref(),
                    "generate",
                    serde_json::json!({ "run": r.run, "count": r.count, "generated": r.generated, "kept": r.kept,
                        "rewrapped": r.rewrapped, "replaced": r.replaced,
                        "first_public_id": r.first.to_string(), "last_public_id": r.last.to_string(),
                        "key_handles": r.key_handles.iter().map(ToString::to_string).collect::<Vec<_>>(),
                        "out": r.out.display().to_string(),
                        "plaintext_outputs": r.outputs.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
                        "bundle": r.bundle.as_ref().map(|p| p.display().to_string()) }),
                )
                .approved_by(approved)
            })?;
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
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// The quorum context of plaintext outputs: their paths as given.
fn path_context(paths: &[&Path]) -> String {
    paths.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(",")
}

fn nonce_policy(random_nonce: bool) -> ksm::import::NoncePolicy {
    if random_nonce {
        ksm::import::NoncePolicy::Random
    } else {
        ksm::import::NoncePolicy::PublicId
    }
}

/// Print an import or decrypt-aead report: issues on stderr, `summary` on
/// stdout; an error if there were conflicts or errors.
fn migrated(report: &ksm::import::ImportReport, summary: &str) -> CliResult<ExitCode> {
    let _ = personalizer::migrate::write_issues(report, &mut std::io::stderr());
    println!("{summary}");
    if report.is_clean() {
        Ok(ExitCode::SUCCESS)
    } else {
        Err(format!("{} conflict(s) and {} error(s), listed above; everything else was done", report.conflicts, report.errors))
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
