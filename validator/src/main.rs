//! `validator`: the validation server's command line.
#![forbid(unsafe_code)]

use std::io::Read as _;
use std::path::PathBuf;
use std::process::ExitCode;

use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use base64::engine::DecodePaddingMode;
use base64::Engine as _;
use clap::{Args, Parser, Subcommand};
use hsm::cli::{KeystoreArgs, KeystoreCommand};
use ksm::store::AeadStore;
use validator::authfile::{self, StoreIds};
use validator::clients::{ClientDb, ClientInfo};
use validator::config::Role;
use validator::{ClientId, ClientKey};
use zeroize::Zeroizing;

/// `validator serve` flags; each overrides the same key of `--config`.
#[derive(Args, Debug)]
struct ServeArgs {
    /// TOML configuration file (see validator.toml.example); flags override it.
    #[arg(long, env = "OTP_VALIDATOR_CONFIG", value_name = "PATH")]
    config: Option<PathBuf>,
    /// The validator's SQLite database (counters and API clients).
    #[arg(long, value_name = "FILE")]
    db: Option<PathBuf>,
    /// `full` (every accepted OTP fsynced before OK) or `normal` [default: full].
    #[arg(long, value_name = "MODE")]
    synchronous: Option<String>,
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
    /// In-process KSM over the SQLite AEAD store (filled by `ksm import`).
    #[arg(long, value_name = "DB", conflicts_with_all = ["aead_dir", "ksm_url"])]
    store: Option<PathBuf>,
    /// In-process KSM over a pyhsm-layout AEAD directory.
    #[arg(long, value_name = "DIR", conflicts_with = "ksm_url")]
    aead_dir: Option<PathBuf>,
    /// Key handles for the in-process KSM [default: every handle allowed to decode].
    #[arg(long, value_name = "KH,…", value_delimiter = ',')]
    key_handles: Option<Vec<String>>,
    /// Remote KSM URL ending in `otp=` (repeat for several), instead of an in-process KSM.
    #[arg(long = "ksm-url", value_name = "URL")]
    ksm_url: Option<Vec<String>>,
    /// Listen address [default: 127.0.0.1:8080].
    #[arg(long, value_name = "ADDR")]
    listen: Option<std::net::SocketAddr>,
    /// Ceiling on every answer, in milliseconds [default: 5000].
    #[arg(long, value_name = "MS")]
    request_timeout_ms: Option<u64>,
}

fn serve(args: ServeArgs) -> Result<(), String> {
    use validator::config::{ConfigFile, KsmSection};
    let file = match &args.config {
        Some(path) => ConfigFile::load(path)?,
        None => ConfigFile::default(),
    };
    let flags = ConfigFile {
        listen: args.listen,
        db: args.db,
        synchronous: args.synchronous,
        keystore: args.keystore,
        hsm: args.hsm_config.as_deref().map(hsm::config::read_hsm_table).transpose().map_err(|e| e.to_string())?,
        password_file: args.password_file,
        request_timeout_ms: args.request_timeout_ms,
        ksm: Some(KsmSection {
            store: args.store,
            aead_dir: args.aead_dir,
            key_handles: args.key_handles,
            urls: args.ksm_url,
            timeout_ms: None,
        }),
        ..ConfigFile::default()
    };
    let config = file.overridden_by(flags).resolve_node()?;
    let node = validator::serve::assemble_node(&config)?;
    let http = config.http().clone();
    let running = validator::serve::start_node(node, http.clone()).map_err(|e| format!("cannot listen on {}: {e}", http.listen))?;
    match config.role() {
        Role::Site => eprintln!("validator: serving http://{}/wsapi/2.0/verify", running.local_addr()),
        Role::Witness => eprintln!("validator: witness serving http://{}/status (counters only)", running.local_addr()),
    }
    running.wait_for_signal().map_err(|e| e.to_string())
}

const STATUS_HELP: &str = "Print a running server's GET /status: this node (site or witness), its
quorum (required of the group), its policy (fail-closed, or the accept-at-risk
window and what is left of it), verdict counters, and one line per peer (name,
site, role, address, up/down/unknown, since, last RTT, replies, failures,
requests received, last error).

A peer is `unknown` until this node has exchanged a request with it; every
node, the witness too, pulls changes from each peer at least every 100 ms, so
the state is that fresh.";

const STATUS_EXIT: &str = "Exit status: 0 when every peer is up (or replication is off); 1 when a peer is down or unknown; 2 when the status could not be fetched or read.";

/// `validator status`: where the server is.
#[derive(Args, Debug)]
#[command(group = clap::ArgGroup::new("server").required(true).args(["url", "config"]))]
struct StatusArgs {
    /// The server's base URL, e.g. http://127.0.0.1:8080 (its /status is fetched).
    #[arg(long, value_name = "URL")]
    url: Option<String>,
    /// The server's configuration file: its `listen` address is used.
    #[arg(long, value_name = "PATH")]
    config: Option<PathBuf>,
    /// Connect and read timeout, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 5000)]
    timeout_ms: u64,
}

/// `host:port` of an `http://` URL (path ignored).
fn url_addr(url: &str) -> Result<std::net::SocketAddr, String> {
    use std::net::ToSocketAddrs as _;
    let rest = url.strip_prefix("http://").ok_or_else(|| format!("{url:?}: only http:// URLs are served"))?;
    let authority = rest.split(['/', '?']).next().unwrap_or_default();
    let authority = if authority.rsplit_once(':').is_some_and(|(_, p)| p.bytes().all(|b| b.is_ascii_digit()) && !p.is_empty()) {
        authority.to_owned()
    } else {
        format!("{authority}:80")
    };
    authority.to_socket_addrs().map_err(|e| format!("{url:?}: {e}"))?.next().ok_or_else(|| format!("{url:?}: no address"))
}

/// The address to reach a server listening on `listen` (an unspecified
/// address is reached over loopback).
fn reachable(listen: std::net::SocketAddr) -> std::net::SocketAddr {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
    match listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => (Ipv4Addr::LOCALHOST, listen.port()).into(),
        IpAddr::V6(ip) if ip.is_unspecified() => (Ipv6Addr::LOCALHOST, listen.port()).into(),
        _ => listen,
    }
}

/// Fetch and print the status; the exit code as documented in `STATUS_EXIT`.
fn status_command(args: &StatusArgs) -> ExitCode {
    match fetch_status(args) {
        Ok(text) => {
            print!("{text}");
            match peers_all_up(&text) {
                Ok(true) => ExitCode::SUCCESS,
                Ok(false) => ExitCode::from(1),
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(2)
                }
            }
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

fn fetch_status(args: &StatusArgs) -> Result<String, String> {
    let addr = match (&args.url, &args.config) {
        (Some(url), _) => url_addr(url)?,
        (None, Some(path)) => reachable(validator::config::ConfigFile::load(path)?.http()?.listen),
        (None, None) => return Err("give --url or --config".to_owned()),
    };
    let timeout = std::time::Duration::from_millis(args.timeout_ms.max(1));
    let mut conn = httpd::client::Connection::new(addr, timeout);
    let response = conn.get("/status").map_err(|e| format!("GET http://{addr}/status: {e}"))?;
    if response.head.status != 200 {
        return Err(format!("GET http://{addr}/status: HTTP {}", response.head.status));
    }
    String::from_utf8(response.body).map_err(|_| format!("GET http://{addr}/status: the answer is not UTF-8"))
}

/// From the status page: every `peer:` line says `state=up`. Errors when
/// the page has no `peers:` summary (not a status page, or replication not
/// reported).
fn peers_all_up(text: &str) -> Result<bool, String> {
    if !text.lines().any(|l| l.starts_with("peers: ")) {
        return Err(
            "the answer has no `peers:` summary: not a validator status page, or a server that does not report replication".to_owned()
        );
    }
    Ok(text.lines().filter(|l| l.starts_with("peer: ")).all(|l| l.split(' ').any(|field| field == "state=up")))
}

/// Validation server: Yubico validation protocol 2.0 for pam_yubico, with
/// durable replay protection.
#[derive(Parser, Debug)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve Yubico's validation protocol 2.0 (`/wsapi/2.0/verify`) with
    /// `/health`, Prometheus `/metrics` and `/status`, until SIGTERM/SIGINT;
    /// or, with `[replication] role = "witness"`, a counters-only witness.
    Serve(ServeArgs),
    /// Print a running server's replication status (exit 0: all peers up, 1: a peer down or unknown, 2: no answer).
    #[command(long_about = STATUS_HELP, after_help = STATUS_EXIT)]
    Status(StatusArgs),
    /// Manage validation API clients (id and HMAC key) in the validator's database.
    #[command(subcommand)]
    Client(ClientCommand),
    /// Write pam_yubico's authfile (`user:id1:id2`) from a YAML map of users to YubiKey public ids.
    #[command(long_about = AUTHFILE_HELP, after_help = AUTHFILE_EXIT)]
    Authfile(AuthfileArgs),
    /// Manage the software keystore (key handles and data keys).
    #[command(subcommand)]
    Keystore(KeystoreCommand),
}

/// The validator's SQLite database (counters and clients).
#[derive(Args, Debug, Clone)]
struct DbArg {
    /// The validator's SQLite database (it holds the counters and the clients).
    #[arg(long, env = "OTP_VALIDATOR_DB", value_name = "FILE")]
    db: PathBuf,
}

#[derive(Subcommand, Debug)]
enum ClientCommand {
    /// Add a client; prints `id=N` and `key=BASE64` once on stdout.
    ///
    /// The key is stored encrypted with the keystore's config key. Without
    /// --key (or --key-file) a new 20-byte key is drawn from the module, as
    /// yubikey-val's ykval-gen-clients does.
    Add {
        #[command(flatten)]
        db: DbArg,
        #[command(flatten)]
        keystore: KeystoreArgs,
        /// The client id (1 to 9999999999); default: one more than the largest in use.
        #[arg(long, value_name = "N", value_parser = parse_client_id)]
        id: Option<ClientId>,
        /// An existing base64 key, e.g. from yubikey-val's `clients.secret`
        /// (16 to 64 bytes). Visible to other local users in the process list:
        /// prefer --key-file.
        #[arg(long, value_name = "B64", conflicts_with = "key_file")]
        key: Option<String>,
        /// A file holding the base64 key (`-`: standard input).
        #[arg(long, value_name = "FILE")]
        key_file: Option<PathBuf>,
        /// Free-form notes (who the client is).
        #[arg(long, value_name = "TEXT", default_value = "")]
        notes: String,
    },
    /// List clients: id, status, creation time, notes (never keys).
    List {
        #[command(flatten)]
        db: DbArg,
    },
    /// Disable a client: its requests get NO_SUCH_CLIENT (a running server
    /// notices within half a second).
    Disable {
        #[command(flatten)]
        db: DbArg,
        /// The client id.
        #[arg(long, value_name = "N", value_parser = parse_client_id)]
        id: ClientId,
    },
    /// Enable a disabled client again.
    Enable {
        #[command(flatten)]
        db: DbArg,
        /// The client id.
        #[arg(long, value_name = "N", value_parser = parse_client_id)]
        id: ClientId,
    },
    /// Give a client a new random key; prints `id=N` and `key=BASE64` once.
    /// The old key stops working (a running server notices within half a second).
    Rotate {
        #[command(flatten)]
        db: DbArg,
        #[command(flatten)]
        keystore: KeystoreArgs,
        /// The client id.
        #[arg(long, value_name = "N", value_parser = parse_client_id)]
        id: ClientId,
    },
}

const AUTHFILE_HELP: &str = "Write pam_yubico's authfile from a YAML map of users to YubiKey public ids.

The map gives each user a list of public ids, or a single one:

    alice: [cccccccccccb, cccccccccccd]
    bob: cccccccccccf

The output holds one line per user, `user:id1:id2`, users and ids sorted, and is
replaced atomically (mode 0644: pam_yubico reads it, it holds no secret). An
unchanged file is not rewritten.

Errors (nothing is written): user names that are empty, start with `#`, or
contain `:`, whitespace or control characters; ids that are not 2 to 16 modhex
characters of even length; an id listed under two users; with --store, ids the
AEAD store has no AEAD for (unless --allow-unknown). Warnings: an id listed twice
for one user (written once), upper-case ids (folded), ids whose length is not
--token-id-length (pam_yubico would never match them), users without ids.";

const AUTHFILE_EXIT: &str = "Exit status: 0 when written (or unchanged), warnings on stderr; 1 on errors, each on stderr, nothing written.";

#[derive(Args, Debug)]
struct AuthfileArgs {
    /// The YAML map of users to public ids.
    #[arg(long, value_name = "FILE")]
    map: PathBuf,
    /// The authfile to write, e.g. /etc/yubikey_mappings.
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
    /// The KSM's SQLite AEAD store: ids without an AEAD there are reported.
    #[arg(long, value_name = "DB")]
    store: Option<PathBuf>,
    /// With --store: write ids without an AEAD anyway, as warnings.
    #[arg(long, requires = "store")]
    allow_unknown: bool,
    /// pam_yubico's token_id_length (ids of another length are reported).
    #[arg(long, value_name = "N", default_value_t = 12, value_parser = clap::value_parser!(u8).range(2..=16))]
    token_id_length: u8,
}

fn parse_client_id(s: &str) -> Result<ClientId, String> {
    s.parse().map_err(|()| format!("`{s}` is not a client id (1 to 9999999999)"))
}

/// Base64 as yubikey-val keys are written, padding optional.
const B64_LENIENT: GeneralPurpose =
    GeneralPurpose::new(&base64::alphabet::STANDARD, GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent));

fn decode_key(text: &str) -> Result<ClientKey, String> {
    let bytes = Zeroizing::new(B64_LENIENT.decode(text.trim()).map_err(|_| "the key is not base64".to_owned())?);
    Ok(ClientKey::new(bytes.to_vec()))
}

fn read_key_file(path: &std::path::Path) -> Result<ClientKey, String> {
    let mut text = Zeroizing::new(String::new());
    let result = if path.as_os_str() == "-" {
        std::io::stdin().read_to_string(&mut text)
    } else {
        std::fs::File::open(path).and_then(|mut f| f.read_to_string(&mut text))
    };
    result.map_err(|e| format!("{}: {e}", path.display()))?;
    decode_key(&text)
}

/// `id=N` and `key=BASE64`, the only time the key is shown.
fn print_key(id: ClientId, key: &ClientKey) {
    let b64 = Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(key.expose()));
    println!("id={id}");
    println!("key={}", b64.as_str());
}

/// `YYYY-MM-DDTHH:MM:SSZ` from Unix seconds.
fn utc(t: i64) -> String {
    validator::config::format_unix(t)
}

fn client(cmd: ClientCommand) -> Result<(), String> {
    match cmd {
        ClientCommand::Add { db, keystore, id, key, key_file, notes } => {
            let key = match (key, key_file) {
                (Some(k), _) => Some(decode_key(&Zeroizing::new(k))?),
                (None, Some(path)) => Some(read_key_file(&path)?),
                (None, None) => None,
            };
            if let Some(k) = &key {
                validator::clients::check_key(k).map_err(|e| e.to_string())?;
            }
            let hsm = keystore.open().map_err(|e| format!("security module: {e}"))?;
            let clients = ClientDb::open(&db.db).map_err(|e| e.to_string())?;
            let (id, key) = clients.add(&*hsm, id, key, &notes).map_err(|e| e.to_string())?;
            print_key(id, &key);
            Ok(())
        }
        ClientCommand::List { db } => {
            let clients = ClientDb::open_existing(&db.db).map_err(|e| e.to_string())?;
            println!("{:>10}  {:<8}  {:<20}  notes", "id", "status", "created");
            for ClientInfo { id, active, created, notes } in clients.list().map_err(|e| e.to_string())? {
                let status = if active { "active" } else { "disabled" };
                println!("{:>10}  {status:<8}  {:<20}  {notes}", id.to_string(), utc(created));
            }
            Ok(())
        }
        ClientCommand::Disable { db, id } => {
            ClientDb::open_existing(&db.db).and_then(|c| c.disable(id)).map_err(|e| e.to_string())?;
            eprintln!("client {id} disabled");
            Ok(())
        }
        ClientCommand::Enable { db, id } => {
            ClientDb::open_existing(&db.db).and_then(|c| c.enable(id)).map_err(|e| e.to_string())?;
            eprintln!("client {id} enabled");
            Ok(())
        }
        ClientCommand::Rotate { db, keystore, id } => {
            let clients = ClientDb::open_existing(&db.db).map_err(|e| e.to_string())?;
            let hsm = keystore.open().map_err(|e| format!("security module: {e}"))?;
            let key = clients.rotate(&*hsm, id).map_err(|e| e.to_string())?;
            print_key(id, &key);
            Ok(())
        }
    }
}

fn authfile_command(args: &AuthfileArgs) -> Result<(), String> {
    let yaml = std::fs::read_to_string(&args.map).map_err(|e| format!("{}: {e}", args.map.display()))?;
    let options = authfile::Options { token_id_length: usize::from(args.token_id_length), allow_unknown: args.allow_unknown };
    let store = match &args.store {
        Some(path) => Some(AeadStore::open_existing(path).map_err(|e| e.to_string())?),
        None => None,
    };
    let known = match &store {
        Some(s) => Some(StoreIds::new(s)?),
        None => None,
    };
    let built = authfile::build(&yaml, &options, known.as_ref().map(|k| k as &dyn authfile::KnownIds));
    let file = match built {
        Ok(f) => f,
        Err(rejected) => {
            for w in &rejected.warnings {
                eprintln!("warning: {w}");
            }
            for e in &rejected.errors {
                eprintln!("error: {e}");
            }
            return Err(format!("{} error(s) in {}; {} not written", rejected.errors.len(), args.map.display(), args.out.display()));
        }
    };
    for w in &file.warnings {
        eprintln!("warning: {w}");
    }
    let changed = authfile::write(&args.out, &file.text)?;
    let what = if changed { "wrote" } else { "unchanged:" };
    eprintln!("{what} {} ({} users, {} public ids)", args.out.display(), file.users, file.ids);
    Ok(())
}

fn exit(result: Result<(), String>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    hsm::cli::init_logging();
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => exit(serve(args)),
        Command::Status(args) => status_command(&args),
        Command::Client(cmd) => exit(client(cmd)),
        Command::Authfile(args) => exit(authfile_command(&args)),
        Command::Keystore(cmd) => exit(hsm::cli::run(&cmd, &mut std::io::stdout()).map_err(|e| e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_dates() {
        assert_eq!(utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(utc(1_764_158_461), "2025-11-26T12:01:01Z");
        assert_eq!(utc(-1), "1969-12-31T23:59:59Z");
    }

    #[test]
    fn cli_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn status_urls_and_verdicts() {
        assert_eq!(url_addr("http://127.0.0.1:8080").unwrap(), "127.0.0.1:8080".parse().unwrap());
        assert_eq!(url_addr("http://127.0.0.2:9/status").unwrap(), "127.0.0.2:9".parse().unwrap());
        assert_eq!(url_addr("http://127.0.0.1").unwrap(), "127.0.0.1:80".parse().unwrap());
        assert!(url_addr("https://127.0.0.1:1").is_err());
        assert_eq!(reachable("0.0.0.0:8080".parse().unwrap()), "127.0.0.1:8080".parse().unwrap());
        assert_eq!(reachable("[::]:1".parse().unwrap()), "[::1]:1".parse().unwrap());
        let up = "peer: name=a site=2 state=up since_s=1\npeers: total=1 up=1 down=0 unknown=0\n";
        assert_eq!(peers_all_up(up), Ok(true));
        assert_eq!(peers_all_up(&up.replace("state=up", "state=down")), Ok(false));
        assert_eq!(peers_all_up(&up.replace("state=up", "state=unknown")), Ok(false));
        assert_eq!(peers_all_up("peers: total=0 up=0 down=0 unknown=0\n"), Ok(true));
        assert!(peers_all_up("<html>").is_err());
    }

    #[test]
    fn keys_decode_with_or_without_padding() {
        assert_eq!(decode_key("AAECAwQFBgcICQoLDA0ODxAREhM=").unwrap().expose(), (0u8..20).collect::<Vec<_>>());
        assert_eq!(decode_key("AAECAwQFBgcICQoLDA0ODxAREhM").unwrap().expose(), (0u8..20).collect::<Vec<_>>());
        assert!(decode_key("not base64!").is_err());
    }
}
