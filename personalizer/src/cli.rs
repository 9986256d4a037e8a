//! The crypto officers' side of the command line: the home directory, the
//! keystore that signs the audit log, sessions, quorum approvals, the
//! key-handle ceremony and the audit commands.
//!
//! Every command that runs through a [`Context`] ends the same way: its
//! [`AuditEvent`] (success or refusal, with the reason) is appended to the
//! audit log, then a signed checkpoint is taken, before the command's own
//! result is reported. A command whose audit record cannot be written
//! fails.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use clap::{Args, Subcommand};
use hsm::admin::{export_decode_only, KeyAdmin};
use hsm::config::HsmConfig;
use hsm::signing::{SigningKey, VerifyingKey};
use hsm::soft::format::KdfParams;
use hsm::{password, Flags, Password};
use otp::KeyHandle;

use crate::audit::AuditLog;
use crate::event::{AuditEvent, AuditSink};
use crate::home::{parse_hsm_table, Home, ModuleSetting};
use crate::operators::{AuthData, OperatorDb, OperatorName, Session, SessionToken};
use crate::quorum::{policy_context, QuorumOperation, QuorumToken};

/// A command's failure: a sentence for the operator.
pub type CliResult<T> = Result<T, String>;

/// Options every officer command takes.
#[derive(Args, Debug, Clone)]
pub struct HomeArgs {
    /// The personalizer's home directory (configuration, operators, ledger,
    /// audit log, signing key).
    #[arg(long, global = true, env = "PERSONALIZER_HOME", value_name = "DIR")]
    pub home: Option<PathBuf>,
    /// File holding the keystore password (one line), or the token's PIN
    /// when the `[hsm]` table names no `pin_file` or `pin_env`; prompted
    /// for on the terminal without it. The module seals the signing key of
    /// the audit log, so every command needs it.
    #[arg(long, global = true, env = "PERSONALIZER_KEYSTORE_PASSWORD_FILE", value_name = "FILE")]
    pub keystore_password_file: Option<PathBuf>,
    /// The session file written by `personalizer login` (privileged
    /// commands).
    #[arg(long, global = true, env = "PERSONALIZER_SESSION", value_name = "FILE")]
    pub session: Option<PathBuf>,
}

impl HomeArgs {
    fn dir(&self) -> CliResult<&Path> {
        self.home.as_deref().ok_or_else(|| "name the home directory with --home DIR or PERSONALIZER_HOME".to_owned())
    }

    /// Open and unlock the module `config` describes; a soft keystore or
    /// a token without a secret source of its own takes
    /// `--keystore-password-file` (or a prompt).
    fn open_module(&self, config: &HsmConfig) -> CliResult<Arc<dyn KeyAdmin>> {
        config.open_admin_with(self.keystore_password_file.as_deref()).map_err(|e| e.to_string())
    }
}

/// Seconds since the Unix epoch.
#[must_use]
pub fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// An opened installation: configuration, unlocked module, signing key,
/// operators and audit log.
pub struct Context {
    home: Home,
    hsm: Arc<dyn KeyAdmin>,
    signer: SigningKey,
    operators: OperatorDb,
    audit: AuditLog,
    session_file: Option<PathBuf>,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context").field("home", &self.home.dir()).finish_non_exhaustive()
    }
}

impl Context {
    /// Open the home directory of `args` and unlock its keystore.
    pub fn open(args: &HomeArgs) -> CliResult<Self> {
        let home = Home::open(args.dir()?).map_err(|e| e.to_string())?;
        let hsm = args.open_module(&home.module().map_err(|e| e.to_string())?)?;
        let signer = SigningKey::unseal_file(&*hsm, &home.signing_key()).map_err(|e| format!("signing key: {e}"))?;
        let operators = OperatorDb::open(&home).map_err(|e| e.to_string())?;
        let audit = AuditLog::open_with_head(&home.audit_db(), &home.audit_head()).map_err(|e| e.to_string())?;
        Ok(Self { home, hsm, signer, operators, audit, session_file: args.session.clone() })
    }

    /// The home directory.
    #[must_use]
    pub fn home(&self) -> &Home {
        &self.home
    }

    /// The unlocked security module.
    #[must_use]
    pub fn hsm(&self) -> &dyn KeyAdmin {
        &*self.hsm
    }

    /// The installation's signing key (bundles, audit checkpoints).
    #[must_use]
    pub fn signer(&self) -> &SigningKey {
        &self.signer
    }

    /// The operators database.
    pub fn operators(&mut self) -> &mut OperatorDb {
        &mut self.operators
    }

    /// The session of `--session` / `PERSONALIZER_SESSION`, checked now.
    pub fn session(&self) -> CliResult<Session> {
        let path = self
            .session_file
            .as_deref()
            .ok_or("this command needs a session: log in with `personalizer login`, then pass --session FILE")?;
        let token = SessionToken::read(path).map_err(|e| e.to_string())?;
        self.operators.session(&token, now()).map_err(|e| e.to_string())
    }

    /// Consume the quorum approval in token file `approval` for `op` on
    /// `context`, requested by the operator of `session`: the approvers.
    pub fn quorum(&mut self, session: &Session, approval: Option<&Path>, op: QuorumOperation, context: &str) -> CliResult<Vec<String>> {
        let path = approval.ok_or_else(|| {
            format!(
                "quorum approval is required for {op}: `personalizer quorum request --operation {op} --context {context:?}`, have it \
                 approved, then pass --approval FILE"
            )
        })?;
        let token = QuorumToken::read(path).map_err(|e| e.to_string())?;
        let approvers = self.operators.consume(session, token.id, op, context, now()).map_err(|e| e.to_string())?;
        Ok(approvers.iter().map(ToString::to_string).collect())
    }

    /// Record the outcome of `action`, checkpoint the log, and hand the
    /// result back. `ok` builds the success event from the result.
    pub fn finish<T>(
        mut self,
        operator: Option<&str>,
        action: &str,
        result: CliResult<T>,
        ok: impl FnOnce(&T) -> AuditEvent,
    ) -> CliResult<T> {
        let event = match &result {
            Ok(value) => ok(value),
            Err(reason) => AuditEvent::refused(operator, action, reason),
        };
        self.audit.record(&event).map_err(|e| format!("audit log: {e} (the operation's result is above)"))?;
        self.audit.checkpoint(&self.signer).map_err(|e| format!("audit checkpoint: {e}"))?;
        result
    }
}

fn read_password(file: Option<&Path>, prompt: &str, confirm: bool) -> CliResult<Password> {
    password::obtain(file, prompt, confirm).map_err(|e| e.to_string())
}

fn name(s: &str) -> CliResult<OperatorName> {
    s.parse().map_err(|e: crate::operators::OperatorError| e.to_string())
}

// ---------------------------------------------------------------------------
// init

/// `personalizer init`.
#[derive(Args, Debug, Clone)]
#[command(group(clap::ArgGroup::new("module").required(true).args(["keystore", "hsm_config"])))]
pub struct InitArgs {
    /// The soft keystore this installation uses; it must exist
    /// (`personalizer keystore init`).
    #[arg(long, value_name = "FILE")]
    pub keystore: Option<PathBuf>,
    /// A TOML file holding an `[hsm]` table naming the module instead: a
    /// PKCS#11 token (`type = "pkcs11"`, `token_label`, `pin_file`, …) or
    /// a soft keystore unlocked through one. Copied into personalizer.toml.
    #[arg(long, value_name = "FILE")]
    pub hsm_config: Option<PathBuf>,
    /// This module's name in 2FA challenge files (`HsmId`).
    #[arg(long, default_value = "personalizer", value_name = "NAME")]
    pub hsm_id: String,
}

/// Create the home directory: configuration with a fresh pepper, a new
/// signing key sealed under the keystore, its public key for `--trust`,
/// and an audit log whose first entry is this. Returns the report.
pub fn init(args: &HomeArgs, init: &InitArgs) -> CliResult<String> {
    let dir = args.dir()?;
    let (keystore, table);
    let (setting, module) = match (&init.keystore, &init.hsm_config) {
        (Some(k), _) => {
            keystore = std::path::absolute(k).map_err(|e| format!("{}: {e}", k.display()))?;
            (ModuleSetting::Keystore(&keystore), HsmConfig::soft(&keystore, None))
        }
        (None, Some(file)) => {
            table = std::fs::read_to_string(file).map_err(|e| format!("{}: {e}", file.display()))?;
            (ModuleSetting::Table(&table), parse_hsm_table(&table).map_err(|e| format!("{}: {e}", file.display()))?)
        }
        (None, None) => return Err("name the module with --keystore FILE or --hsm-config FILE".to_owned()),
    };
    let hsm = args.open_module(&module)?;
    let home = Home::create(dir, setting, &init.hsm_id).map_err(|e| e.to_string())?;
    let signer = SigningKey::generate().map_err(|e| e.to_string())?;
    signer.seal_to_file(&*hsm, &home.signing_key()).map_err(|e| e.to_string())?;
    let public = signer.verifying_key();
    let pem = public.to_pem().map_err(|e| e.to_string())?;
    std::fs::write(home.signing_public_key(), pem).map_err(|e| format!("{}: {e}", home.signing_public_key().display()))?;
    OperatorDb::open(&home).map_err(|e| e.to_string())?;
    let mut audit = AuditLog::open_with_head(&home.audit_db(), &home.audit_head()).map_err(|e| e.to_string())?;
    let event = AuditEvent::ok(
        None,
        "init",
        serde_json::json!({ "module": module.to_string(), "hsm_id": init.hsm_id, "signing_key": public.fingerprint() }),
    );
    audit.record(&event).map_err(|e| format!("audit log: {e}"))?;
    audit.checkpoint(&signer).map_err(|e| format!("audit checkpoint: {e}"))?;
    Ok(format!(
        "initialised {}\nsigning key (RSA-2048) fingerprint {}\npublic key for `ksm import --bundle … --trust`: {}",
        home.dir().display(),
        public.fingerprint(),
        home.signing_public_key().display()
    ))
}

// ---------------------------------------------------------------------------
// operators and sessions

/// `personalizer operator …`.
#[derive(Subcommand, Debug, Clone)]
pub enum OperatorCommand {
    /// Add a crypto officer. The first one needs no session; afterwards an
    /// officer's session is required.
    Add {
        /// Name: 1–32 of a-z 0-9 . _ -.
        name: String,
        /// File holding the new officer's password; prompted for without it.
        #[arg(long, value_name = "FILE")]
        password_file: Option<PathBuf>,
    },
    /// Change an officer's password (their own session and current password).
    Passwd {
        /// The officer.
        name: String,
        /// File holding the current password.
        #[arg(long, value_name = "FILE")]
        password_file: Option<PathBuf>,
        /// File holding the new password.
        #[arg(long, value_name = "FILE")]
        new_password_file: Option<PathBuf>,
    },
    /// Register an officer's RSA-2048 2FA key. First run: writes a challenge
    /// to --authdata (needs the password). Sign its Digest with the new
    /// key, put the base64 signature into Signature, run again.
    #[command(name = "set-2fa")]
    Set2fa {
        /// The officer.
        name: String,
        /// The officer's public key (PEM, `openssl pkey -pubout`).
        #[arg(long, value_name = "PEM")]
        public_key: Option<PathBuf>,
        /// The challenge file (written on the first run, read on the second).
        #[arg(long, value_name = "FILE")]
        authdata: PathBuf,
        /// File holding the password (first run).
        #[arg(long, value_name = "FILE")]
        password_file: Option<PathBuf>,
    },
    /// Replace your own 2FA key (needs your session); two runs as set-2fa.
    #[command(name = "rotate-2fa")]
    Rotate2fa {
        /// The new public key (PEM), first run.
        #[arg(long, value_name = "PEM")]
        public_key: Option<PathBuf>,
        /// The challenge file.
        #[arg(long, value_name = "FILE")]
        authdata: PathBuf,
    },
    /// Remove an officer's 2FA key: they cannot log in until a new key is
    /// registered (needs a session).
    #[command(name = "disable-2fa")]
    Disable2fa {
        /// The officer.
        name: String,
    },
    /// List officers (never hashes).
    List,
}

/// `personalizer login NAME --authdata FILE`.
#[derive(Args, Debug, Clone)]
pub struct LoginArgs {
    /// The officer.
    pub name: String,
    /// The challenge file: written on the first run (after the password),
    /// signed by the officer, then read on the second run.
    #[arg(long, value_name = "FILE")]
    pub authdata: PathBuf,
    /// File holding the password (first run); prompted for without it.
    #[arg(long, value_name = "FILE")]
    pub password_file: Option<PathBuf>,
    /// Where the second run writes the session token (mode 0600).
    #[arg(long, value_name = "FILE")]
    pub session_out: PathBuf,
}

const SIGN_HELP: &str = "sign it: `jq -r '.Data[0].Digest' FILE | base64 -d > digest.bin; openssl dgst -sha256 -sign key.pem \
                         -out digest.sig digest.bin`, put `base64 -w0 digest.sig` into Signature, and run the same command again";

fn challenge_written(authdata: &AuthData, path: &Path) -> CliResult<String> {
    authdata.write(path).map_err(|e| e.to_string())?;
    Ok(format!("challenge written to {}; {SIGN_HELP}", path.display()))
}

/// `personalizer operator …`.
pub fn operator(args: &HomeArgs, cmd: &OperatorCommand) -> CliResult<String> {
    let mut ctx = Context::open(args)?;
    let now = now();
    match cmd {
        OperatorCommand::Add { name: who, password_file } => {
            let first = ctx.operators().list().map_err(|e| e.to_string())?.is_empty();
            let session = if first { None } else { Some(ctx.session()) };
            let by = session.as_ref().and_then(|s| s.as_ref().ok()).map(|s| s.operator.to_string());
            let result = (|| {
                if let Some(session) = session {
                    session?;
                }
                let who = name(who)?;
                let pw = read_password(password_file.as_deref(), &format!("Password for {who}: "), true)?;
                ctx.operators().add(&who, &pw, now).map_err(|e| e.to_string())?;
                Ok(format!("added operator {who}; register their 2FA key with `personalizer operator set-2fa {who}`"))
            })();
            ctx.finish(by.as_deref(), "operator.add", result, |_| {
                AuditEvent::ok(by.as_deref(), "operator.add", serde_json::json!({ "operator": who, "first": first }))
            })
        }
        OperatorCommand::Passwd { name: who, password_file, new_password_file } => {
            let result = (|| {
                let session = ctx.session()?;
                let who = name(who)?;
                if session.operator != who {
                    return Err(format!("{} may change only their own password", session.operator));
                }
                let current = read_password(password_file.as_deref(), "Current password: ", false)?;
                let new = read_password(new_password_file.as_deref(), "New password: ", true)?;
                ctx.operators().passwd(&who, &current, &new, now).map_err(|e| e.to_string())?;
                Ok(format!("password of {who} changed; their sessions have ended"))
            })();
            ctx.finish(Some(who), "operator.passwd", result, |_| AuditEvent::ok(Some(who), "operator.passwd", serde_json::json!({})))
        }
        OperatorCommand::Set2fa { name: who, public_key, authdata, password_file } => {
            let mut fingerprint = None;
            let result = (|| {
                let who = name(who)?;
                if let Some(pem) = public_key {
                    let key = VerifyingKey::from_pem_file(pem).map_err(|e| e.to_string())?;
                    let pw = read_password(password_file.as_deref(), &format!("Password for {who}: "), false)?;
                    let challenge = ctx.operators().begin_set_2fa(&who, &pw, &key, now).map_err(|e| e.to_string())?;
                    return challenge_written(&challenge, authdata);
                }
                let signed = AuthData::read(authdata).map_err(|e| e.to_string())?;
                let fp = ctx.operators().set_2fa(&who, &signed, now).map_err(|e| e.to_string())?;
                fingerprint = Some(fp.clone());
                Ok(format!("2FA key registered for {who} (fingerprint {fp})"))
            })();
            let step = if public_key.is_some() { "operator.set-2fa.challenge" } else { "operator.set-2fa" };
            ctx.finish(Some(who), step, result, |_| AuditEvent::ok(Some(who), step, serde_json::json!({ "key_fingerprint": fingerprint })))
        }
        OperatorCommand::Rotate2fa { public_key, authdata } => {
            let session = ctx.session();
            let who = session.as_ref().ok().map(|s| s.operator.to_string());
            let mut fingerprint = None;
            let result = (|| {
                let session = session?;
                if let Some(pem) = public_key {
                    let key = VerifyingKey::from_pem_file(pem).map_err(|e| e.to_string())?;
                    let challenge = ctx.operators().begin_rotate_2fa(&session, &key, now).map_err(|e| e.to_string())?;
                    return challenge_written(&challenge, authdata);
                }
                let signed = AuthData::read(authdata).map_err(|e| e.to_string())?;
                let fp = ctx.operators().rotate_2fa(&session.operator, &signed, now).map_err(|e| e.to_string())?;
                fingerprint = Some(fp.clone());
                Ok(format!("2FA key of {} replaced (fingerprint {fp}); log in again", session.operator))
            })();
            let step = if public_key.is_some() { "operator.rotate-2fa.challenge" } else { "operator.rotate-2fa" };
            ctx.finish(who.as_deref(), step, result, |_| {
                AuditEvent::ok(who.as_deref(), step, serde_json::json!({ "key_fingerprint": fingerprint }))
            })
        }
        OperatorCommand::Disable2fa { name: who } => {
            let session = ctx.session();
            let by = session.as_ref().ok().map(|s| s.operator.to_string());
            let result = (|| {
                session?;
                let who = name(who)?;
                ctx.operators().disable_2fa(&who, now).map_err(|e| e.to_string())?;
                Ok(format!("2FA of {who} disabled: they cannot log in until a key is registered again"))
            })();
            ctx.finish(by.as_deref(), "operator.disable-2fa", result, |_| {
                AuditEvent::ok(by.as_deref(), "operator.disable-2fa", serde_json::json!({ "operator": who }))
            })
        }
        OperatorCommand::List => {
            let result = (|| {
                let mut text = format!("{:<32} {:<4} {:<64}", "operator", "2fa", "key fingerprint");
                for o in ctx.operators().list().map_err(|e| e.to_string())? {
                    text.push_str(&format!(
                        "\n{:<32} {:<4} {}",
                        o.name.as_str(),
                        if o.two_factor { "yes" } else { "no" },
                        o.key_fingerprint.as_deref().unwrap_or("-")
                    ));
                }
                Ok(text)
            })();
            ctx.finish(None, "operator.list", result, |_| AuditEvent::ok(None, "operator.list", serde_json::json!({})))
        }
    }
}

/// `personalizer login`: two runs, as the module documentation of
/// [`crate::operators`] describes.
pub fn login(args: &HomeArgs, login: &LoginArgs) -> CliResult<String> {
    let mut ctx = Context::open(args)?;
    let now = now();
    let who = login.name.clone();
    let first = !login.authdata.exists();
    let mut expires = None;
    let result = (|| {
        let operator = name(&who)?;
        if first {
            let pw = read_password(login.password_file.as_deref(), &format!("Password for {operator}: "), false)?;
            let challenge = ctx.operators().begin_login(&operator, &pw, now).map_err(|e| e.to_string())?;
            return challenge_written(&challenge, &login.authdata);
        }
        if login.session_out.exists() {
            return Err(format!("{} exists; name a new session file", login.session_out.display()));
        }
        let signed = AuthData::read(&login.authdata).map_err(|e| e.to_string())?;
        let new = ctx.operators().finish_login(&operator, &signed, now).map_err(|e| e.to_string())?;
        new.token.write(&login.session_out).map_err(|e| e.to_string())?;
        expires = Some(new.session.expires_at);
        Ok(format!(
            "logged in as {operator}; session in {} (mode 0600) until {}",
            login.session_out.display(),
            crate::audit::rfc3339(i64::try_from(new.session.expires_at).unwrap_or(i64::MAX))
        ))
    })();
    let action = if first { "login.challenge" } else { "login" };
    ctx.finish(Some(&who), action, result, |_| AuditEvent::ok(Some(&who), action, serde_json::json!({ "expires": expires })))
}

/// `personalizer logout`.
pub fn logout(args: &HomeArgs) -> CliResult<String> {
    let mut ctx = Context::open(args)?;
    let session = ctx.session();
    let who = session.as_ref().ok().map(|s| s.operator.to_string());
    let result = (|| {
        session?;
        let path = args.session.as_deref().ok_or("no session file given")?;
        let token = SessionToken::read(path).map_err(|e| e.to_string())?;
        ctx.operators().logout(&token).map_err(|e| e.to_string())?;
        Ok("logged out".to_owned())
    })();
    ctx.finish(who.as_deref(), "logout", result, |_| AuditEvent::ok(who.as_deref(), "logout", serde_json::json!({})))
}

// ---------------------------------------------------------------------------
// quorum

/// `personalizer quorum …`.
#[derive(Subcommand, Debug, Clone)]
pub enum QuorumCommand {
    /// Ask for approval of an operation (needs your session); writes the
    /// token file the approvers sign. Valid for 600 s, usable once.
    Request {
        /// create-key-handle, import-key-handle, export-keystore,
        /// plaintext-output or change-policy.
        #[arg(long)]
        operation: QuorumOperation,
        /// What it applies to, exactly as the guarded command will name it
        /// (its error message says what to use).
        #[arg(long)]
        context: String,
        /// The token file to write (mode 0600).
        #[arg(long, value_name = "FILE")]
        token_out: PathBuf,
    },
    /// Approve a request with your session and your signature over its
    /// token (`jq -r .token FILE | base64 -d > t.bin; openssl dgst -sha256
    /// -sign key.pem -out t.sig t.bin`).
    Approve {
        /// The token file.
        #[arg(long, value_name = "FILE")]
        token: PathBuf,
        /// Your signature over the token bytes (binary, as openssl writes it).
        #[arg(long, value_name = "FILE")]
        signature: PathBuf,
    },
    /// Show a request's approvals.
    Status {
        /// The token file.
        #[arg(long, value_name = "FILE")]
        token: PathBuf,
    },
    /// Show the M of every operation, or change one (`--set OP=M`, which
    /// itself needs a change-policy approval with context `OP=M`).
    Policy {
        /// OP=M.
        #[arg(long, value_name = "OP=M")]
        set: Option<String>,
        /// The change-policy token file.
        #[arg(long, value_name = "FILE")]
        approval: Option<PathBuf>,
    },
}

/// `personalizer quorum …`.
pub fn quorum(args: &HomeArgs, cmd: &QuorumCommand) -> CliResult<String> {
    let mut ctx = Context::open(args)?;
    let now = now();
    let session = ctx.session();
    let who = session.as_ref().ok().map(|s| s.operator.to_string());
    match cmd {
        QuorumCommand::Request { operation, context, token_out } => {
            let mut id = None;
            let result = (|| {
                let token = ctx.operators().request(&session?, *operation, context, now).map_err(|e| e.to_string())?;
                token.write(token_out).map_err(|e| e.to_string())?;
                id = Some(token.id);
                Ok(format!(
                    "quorum request {} for {operation} on {context:?} written to {}; each approver signs its token and runs \
                     `personalizer quorum approve --token {}`",
                    token.id,
                    token_out.display(),
                    token_out.display()
                ))
            })();
            ctx.finish(who.as_deref(), "quorum.request", result, |_| {
                AuditEvent::ok(
                    who.as_deref(),
                    "quorum.request",
                    serde_json::json!({ "id": id, "operation": operation.as_str(), "context": context }),
                )
            })
        }
        QuorumCommand::Approve { token, signature } => {
            let mut id = None;
            let result = (|| {
                let session = session?;
                let mut file = QuorumToken::read(token).map_err(|e| e.to_string())?;
                id = Some(file.id);
                let sig = std::fs::read(signature).map_err(|e| format!("{}: {e}", signature.display()))?;
                ctx.operators().approve(&session, file.id, &sig, now).map_err(|e| e.to_string())?;
                file.add_approval(&session.operator, &sig);
                file.write(token).map_err(|e| e.to_string())?;
                let status = ctx.operators().request_status(file.id).map_err(|e| e.to_string())?;
                Ok(format!("approved request {}: {} of {} approvals", file.id, status.approvers.len(), status.required))
            })();
            ctx.finish(who.as_deref(), "quorum.approve", result, |_| {
                AuditEvent::ok(who.as_deref(), "quorum.approve", serde_json::json!({ "id": id }))
            })
        }
        QuorumCommand::Status { token } => {
            let result = (|| {
                let file = QuorumToken::read(token).map_err(|e| e.to_string())?;
                let s = ctx.operators().request_status(file.id).map_err(|e| e.to_string())?;
                let approvers: Vec<&str> = s.approvers.iter().map(OperatorName::as_str).collect();
                Ok(format!(
                    "request {}: {} on {:?} by {}; {} of {} approvals ({}); {}",
                    s.id,
                    s.operation,
                    s.context,
                    s.requester,
                    s.approvers.len(),
                    s.required,
                    approvers.join(", "),
                    match s.used_at {
                        Some(_) => "used".to_owned(),
                        None if s.expires <= now => "expired".to_owned(),
                        None => format!("expires in {} s", s.expires - now),
                    }
                ))
            })();
            ctx.finish(who.as_deref(), "quorum.status", result, |_| AuditEvent::ok(who.as_deref(), "quorum.status", serde_json::json!({})))
        }
        QuorumCommand::Policy { set: None, .. } => {
            let result = (|| {
                let mut text = String::from("operation           M");
                for (op, m) in ctx.operators().policies().map_err(|e| e.to_string())? {
                    text.push_str(&format!("\n{:<19} {m}", op.as_str()));
                }
                Ok(text)
            })();
            ctx.finish(who.as_deref(), "quorum.policy", result, |_| AuditEvent::ok(who.as_deref(), "quorum.policy", serde_json::json!({})))
        }
        QuorumCommand::Policy { set: Some(spec), approval } => {
            let mut approvers = Vec::new();
            let result = (|| {
                let session = session?;
                let (op, m) = spec.split_once('=').ok_or_else(|| format!("--set takes OP=M, not {spec:?}"))?;
                let op: QuorumOperation = op.parse().map_err(|e: crate::operators::OperatorError| e.to_string())?;
                let m: u64 = m.parse().map_err(|_| format!("M must be a number, not {m:?}"))?;
                let path = approval.as_deref().ok_or_else(|| {
                    format!("changing the policy needs a change-policy approval with context {:?}", policy_context(op, m))
                })?;
                let token = QuorumToken::read(path).map_err(|e| e.to_string())?;
                let by = ctx.operators().set_policy(&session, token.id, op, m, now).map_err(|e| e.to_string())?;
                approvers = by.iter().map(ToString::to_string).collect();
                Ok(format!("{op} now needs {m} approvals"))
            })();
            let approved = approvers.clone();
            ctx.finish(who.as_deref(), "quorum.set-policy", result, |_| {
                AuditEvent::ok(who.as_deref(), "quorum.set-policy", serde_json::json!({ "policy": spec })).approved_by(approved)
            })
        }
    }
}

// ---------------------------------------------------------------------------
// key-handle ceremony

/// `personalizer key-handle …`.
#[derive(Subcommand, Debug, Clone)]
pub enum KeyHandleCommand {
    /// Create a key handle inside the module (quorum: create-key-handle,
    /// context `<key handle>`). On the laptop: `--flags personalizer`
    /// (generate and export once).
    Create {
        /// Key handle id: decimal, 0x-hex or 4 characters.
        #[arg(long, value_name = "KH")]
        key_handle: KeyHandle,
        /// Permission flags (a preset or names; see `keystore add-handle --help`).
        #[arg(long, default_value = "personalizer")]
        flags: Flags,
        /// AES key size: 128, 192 or 256.
        #[arg(long, default_value_t = 256)]
        key_bits: usize,
        /// The create-key-handle token file.
        #[arg(long, value_name = "FILE")]
        approval: Option<PathBuf>,
    },
    /// Import known handle keys from a pyhsm soft-HSM JSON file (quorum:
    /// import-key-handle, context = the file name).
    ImportPyhsm {
        /// The pyhsm JSON file.
        #[arg(long, value_name = "FILE")]
        json: PathBuf,
        /// Flags for every imported handle.
        #[arg(long)]
        flags: Flags,
        /// The import-key-handle token file.
        #[arg(long, value_name = "FILE")]
        approval: Option<PathBuf>,
    },
    /// Export the validation servers' keystore: the listed handles,
    /// decode-only, with their own data keys, sealed under a password given
    /// now (quorum: export-keystore, context = the handles, comma-separated,
    /// as typed).
    ExportServers {
        /// Handles to export.
        #[arg(long, value_name = "KH[,KH…]", value_delimiter = ',', required = true)]
        key_handles: Vec<String>,
        /// The new keystore file (must not exist; mode 0600).
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        /// File holding the export password; prompted for (twice) without it.
        #[arg(long, value_name = "FILE")]
        export_password_file: Option<PathBuf>,
        /// argon2id memory cost of the exported keystore, in MiB.
        #[arg(long, default_value_t = KdfParams::DEFAULT.memory_kib / 1024, value_name = "MIB")]
        kdf_memory_mib: u32,
        /// argon2id passes of the exported keystore.
        #[arg(long, default_value_t = KdfParams::DEFAULT.iterations, value_name = "N")]
        kdf_iterations: u32,
        /// The export-keystore token file.
        #[arg(long, value_name = "FILE")]
        approval: Option<PathBuf>,
    },
    /// List the module's key handles and flags.
    List,
}

/// `personalizer key-handle …`.
pub fn key_handle(args: &HomeArgs, cmd: &KeyHandleCommand) -> CliResult<String> {
    let mut ctx = Context::open(args)?;
    let session = ctx.session();
    let who = session.as_ref().ok().map(|s| s.operator.to_string());
    let mut approvers = Vec::new();
    let (action, detail, result) = match cmd {
        KeyHandleCommand::Create { key_handle, flags, key_bits, approval } => {
            let result = (|| {
                let session = session?;
                approvers = ctx.quorum(&session, approval.as_deref(), QuorumOperation::CreateKeyHandle, &key_handle.to_string())?;
                // Exportable: the validation servers get it (export-servers).
                let info = ctx.hsm().create_handle(*key_handle, *flags, *key_bits, true).map_err(|e| e.to_string())?;
                Ok(format!("created key handle {} (AES-{}, flags {}) inside the module", info.key_handle, info.key_bits, info.flags))
            })();
            (
                "key-handle.create",
                serde_json::json!({ "key_handle": key_handle.to_string(), "flags": flags.to_string(), "key_bits": key_bits }),
                result,
            )
        }
        KeyHandleCommand::ImportPyhsm { json, flags, approval } => {
            let context = json.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            let mut imported = Vec::new();
            let result = (|| {
                let session = session?;
                approvers = ctx.quorum(&session, approval.as_deref(), QuorumOperation::ImportKeyHandle, &context)?;
                let keys = hsm::cli::read_pyhsm_json(json).map_err(|e| e.to_string())?;
                let new: Vec<_> = keys.into_iter().map(|(kh, key)| (kh, *flags, key)).collect();
                // Exportable, as created handles are: the servers get them.
                ctx.hsm().import_handles(&new, true).map_err(|e| e.to_string())?;
                imported = new.iter().map(|(kh, _, _)| kh.to_string()).collect();
                Ok(format!("imported {} key handle(s): {}", imported.len(), imported.join(", ")))
            })();
            ("key-handle.import-pyhsm", serde_json::json!({ "file": context, "flags": flags.to_string(), "handles": imported }), result)
        }
        KeyHandleCommand::ExportServers { key_handles, out, export_password_file, kdf_memory_mib, kdf_iterations, approval } => {
            let context = key_handles.join(",");
            let result = (|| {
                let session = session?;
                let handles: Vec<KeyHandle> =
                    key_handles.iter().map(|s| s.parse().map_err(|e: otp::Error| format!("{s:?}: {e}"))).collect::<CliResult<_>>()?;
                approvers = ctx.quorum(&session, approval.as_deref(), QuorumOperation::ExportKeystore, &context)?;
                let pw = read_password(export_password_file.as_deref(), "Password for the servers' keystore: ", true)?;
                let kdf = KdfParams { memory_kib: kdf_memory_mib.saturating_mul(1024), iterations: *kdf_iterations, parallelism: 1 };
                let listed = export_decode_only(ctx.hsm(), out, &pw, kdf, &handles).map_err(|e| e.to_string())?;
                Ok(format!("exported {} decode-only key handle(s) to {} (mode 0600)", listed.len(), out.display()))
            })();
            ("key-handle.export-servers", serde_json::json!({ "handles": context, "out": out.display().to_string() }), result)
        }
        KeyHandleCommand::List => {
            let result = (|| {
                let mut text = format!("{:<12} {:>8}  flags", "key handle", "key");
                for h in ctx.hsm().key_handles().map_err(|e| e.to_string())? {
                    text.push_str(&format!("\n{:<12} {:>8}  {}", h.key_handle.to_string(), format!("AES-{}", h.key_bits), h.flags));
                }
                Ok(text)
            })();
            ("key-handle.list", serde_json::json!({}), result)
        }
    };
    let approved = approvers.clone();
    ctx.finish(who.as_deref(), action, result, |_| AuditEvent::ok(who.as_deref(), action, detail).approved_by(approved))
}

// ---------------------------------------------------------------------------
// audit

/// `personalizer audit …`.
#[derive(Subcommand, Debug, Clone)]
pub enum AuditCommand {
    /// Check the hash chain, every checkpoint signature and the head file;
    /// name the first bad entry. Exit 0 when intact, 1 otherwise.
    Verify {
        /// The public key to check checkpoints with (default: the
        /// installation's signing-key.pub.pem).
        #[arg(long, value_name = "PEM")]
        trust: Option<PathBuf>,
    },
    /// Write every entry and checkpoint as JSON lines.
    Export {
        /// Output file (default: stdout; the log holds no secrets).
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
}

/// `personalizer audit …`: these read the log only, need no keystore and
/// no session, and record nothing. Returns the report and whether the log
/// is intact.
pub fn audit(args: &HomeArgs, cmd: &AuditCommand) -> CliResult<(String, bool)> {
    let home = Home::open(args.dir()?).map_err(|e| e.to_string())?;
    match cmd {
        AuditCommand::Verify { trust } => {
            let key_file = trust.clone().unwrap_or_else(|| home.signing_public_key());
            let key = VerifyingKey::from_pem_file(&key_file).map_err(|e| format!("{}: {e}", key_file.display()))?;
            let report = crate::audit::verify(&home.audit_db(), &home.audit_head(), &key);
            Ok((report.to_string(), report.is_ok()))
        }
        AuditCommand::Export { out } => {
            let summary = match out {
                Some(path) => {
                    let mut file = std::fs::File::create_new(path).map_err(|e| format!("{}: {e}", path.display()))?;
                    crate::audit::export(&home.audit_db(), &mut file).map_err(|e| e.to_string())?
                }
                None => crate::audit::export(&home.audit_db(), &mut std::io::stdout().lock()).map_err(|e| e.to_string())?,
            };
            Ok((format!("exported {} entries and {} checkpoints", summary.entries, summary.checkpoints), true))
        }
    }
}
