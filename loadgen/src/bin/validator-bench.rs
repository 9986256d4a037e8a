//! `validator-bench`: the validator (verify 2.0 over HTTP, in-process KSM,
//! durable SQLite counters with group commit), assembled in this process
//! by `validator::serve::assemble` exactly as `validator serve` assembles
//! it, under closed-loop load of unique, valid, HMAC-signed requests, once
//! per `synchronous` mode (a fresh database each) and concurrency level;
//! optionally the resident memory of the real `validator serve` binary
//! with a large AEAD store.
//!
//! `--backend` chooses the security module the validator decodes with: the
//! soft keystore, or a throwaway SoftHSM2 token (`softhsm2`, through the
//! PKCS#11 backend, configured as `validator serve`'s `[hsm] type =
//! "pkcs11"` would be) holding the same handle key and its own data keys.
//!
//! Every answer is checked as a strict client would: `status=OK`, the
//! request's `otp` and `nonce` echoed, a valid `h` under the client's key,
//! and the session counter, use and timestamp the OTP encoded. Anything
//! else is an error. The counter store's figures over each level come from
//! the difference of two `/metrics` scrapes around it.
//!
//! Everything runs on this machine, on 127.0.0.1; every level is bounded in
//! request count and time. See `scripts/bench-validator.sh`.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use appliance_tests::softhsm2::TokenDir;
use base64::Engine as _;
use clap::{ArgAction, Parser, ValueEnum};
use hsm::config::HsmConfig;
use hsm::pkcs11::{DecodeMode, Pkcs11Config, Pkcs11Hsm};
use hsm::soft::format::KdfParams;
use hsm::soft::SoftHsm;
use hsm::{Flags, Password, SecurityModule};
use ksm::store::AeadStore;
use loadgen::fleet::{self, Fleet, OtpCase};
use loadgen::harness::{mib, now_unix, proc_mem, spawn_serving, target_dir, BigStore, HarnessError, Mem, STORE_BATCH};
use loadgen::http::Connection;
use loadgen::prometheus::{highest_bucket_between, Samples};
use loadgen::run::{self, Report};
use loadgen::stats::{ms, STALL};
use loadgen::verify_answer::{self, NonceSource};
use otp::{HandleKey, KeyHandle, PublicId};
use validator::clients::SqliteClients;
use validator::config::{KsmSource, ServeConfig};
use validator::counters::Synchronous;
use validator::serve::{self, HttpOptions};
use validator::{ClientId, ClientKey};
use zeroize::Zeroizing;

const KH: KeyHandle = KeyHandle::new(1);
const PASSWORD: &str = "validator-bench";
const PUBLIC_ID_BYTES: usize = 6;
/// The API client the load signs as.
const CLIENT_ID: u64 = 1;
/// How long the client waits for one answer.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);

/// Label and PINs of the throwaway SoftHSM2 token.
const TOKEN_LABEL: &str = "validator-bench";
const TOKEN_PIN: &str = "validator-bench-pin";
const TOKEN_SO_PIN: &str = "validator-bench-so";

/// Targets of issue 4 (soft keystore), checked and reported at the end.
const TARGET_RATE_FULL: f64 = 20_000.0;
const TARGET_P99_C32: Duration = Duration::from_millis(10);
const TARGET_RSS_KB: u64 = 300 * 1024;
/// Target of issue 7: the validator on SoftHSM2.
const TARGET_RATE_SOFTHSM2: f64 = 10_000.0;

/// The security module the validator decodes OTPs and seals API client
/// keys with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Backend {
    /// The soft keystore (`[hsm] type = "soft"`).
    Soft,
    /// A throwaway SoftHSM2 token through the PKCS#11 backend (`[hsm] type = "pkcs11"`).
    Softhsm2,
    /// The same token with `decode = "key-in-token"`.
    Softhsm2KeyInToken,
}

impl Backend {
    fn name(self) -> &'static str {
        match self {
            Self::Soft => "soft",
            Self::Softhsm2 => "softhsm2",
            Self::Softhsm2KeyInToken => "softhsm2-key-in-token",
        }
    }
}

/// Validator benchmark: verify 2.0 over HTTP with the in-process KSM and
/// durable counters, unique valid signed OTPs, per synchronous mode and
/// concurrency, all on 127.0.0.1.
///
/// An option given twice takes its last value (`scripts/bench-validator.sh`
/// passes defaults that later options override).
#[derive(Parser, Debug)]
#[command(version, about, args_override_self = true)]
struct Args {
    /// YubiKeys (AEADs) to provision for the throughput runs.
    #[arg(long, default_value_t = 1000)]
    keys: u64,
    /// Measured requests per synchronous mode and concurrency level.
    #[arg(long, default_value_t = 40_000)]
    requests_per_level: usize,
    /// Unmeasured requests sent before each measured run.
    #[arg(long, default_value_t = 2000)]
    warmup: usize,
    /// Concurrency levels (client threads, one kept-alive connection each).
    #[arg(long, action = ArgAction::Set, value_delimiter = ',', default_value = "8,32")]
    concurrency: Vec<usize>,
    /// Counter-store durability modes to measure, each on a fresh database.
    #[arg(long, action = ArgAction::Set, value_delimiter = ',', default_value = "full,normal", value_parser = parse_synchronous)]
    synchronous: Vec<Synchronous>,
    /// Security modules to measure the validator on, each with fresh
    /// databases: `soft` (the keystore file), `softhsm2` (a throwaway
    /// SoftHSM2 token through PKCS#11; needs the Debian package softhsm2),
    /// `softhsm2-key-in-token` (the same token, `decode = "key-in-token"`).
    #[arg(long, action = ArgAction::Set, value_delimiter = ',', default_value = "soft", value_enum)]
    backend: Vec<Backend>,
    /// Stop a level after this many seconds even if requests remain.
    #[arg(long, default_value_t = 60)]
    time_limit_secs: u64,
    /// The service's async worker threads (`HttpOptions::workers`);
    /// default: the service's own default.
    #[arg(long, value_name = "N")]
    http_workers: Option<usize>,
    /// The service's blocking-pool threads (`HttpOptions::max_blocking_threads`);
    /// default: the service's own.
    #[arg(long, value_name = "N")]
    http_blocking_threads: Option<usize>,
    /// Also measure the memory of `validator serve` with a store of this
    /// many YubiKeys (built once and cached under `<target>/validator-bench/`). 0: skip.
    #[arg(long, default_value_t = 0)]
    rss_keys: u64,
    /// Requests sent to `validator serve` in the memory measurement.
    #[arg(long, default_value_t = 50_000)]
    rss_requests: usize,
    /// YubiKeys, spread over the whole id range, that the memory
    /// measurement's requests come from.
    #[arg(long, default_value_t = 10_000)]
    rss_spread: u64,
    /// The `validator` binary for the memory measurement; default: next to this one.
    #[arg(long, value_name = "PATH")]
    validator_bin: Option<PathBuf>,
    /// Skip the throughput runs (with --rss-keys: memory only).
    #[arg(long)]
    skip_throughput: bool,
    /// Working directory for keystores, stores and caches; default `<target>/validator-bench`.
    #[arg(long, value_name = "DIR")]
    work_dir: Option<PathBuf>,
}

fn parse_synchronous(s: &str) -> Result<Synchronous, String> {
    s.parse()
}

/// A keystore with the one benchmark handle: decode (the KSM), generate
/// (provisioning) and export (reading secrets back to make OTPs). Its
/// config data key seals the API client keys.
fn keystore(path: &Path) -> Result<SoftHsm, HarnessError> {
    let hsm = SoftHsm::create(path, &Password::new(PASSWORD)?, KdfParams::INSECURE_FOR_TESTS)?;
    hsm.add_handle(KH, Flags::PERSONALIZER | Flags::OTP_DECODE | Flags::EXPORT, 256)?;
    Ok(hsm)
}

/// [`keystore`] with a handle key drawn here, returned too so that a token
/// can be given the same key (as `add_handle` does, from the OS generator).
fn keystore_with_known_key(path: &Path) -> Result<(SoftHsm, HandleKey)> {
    let mut raw = Zeroizing::new([0u8; 32]);
    getrandom::fill(&mut raw[..]).map_err(|e| anyhow::anyhow!("drawing the handle key: {e}"))?;
    let key = HandleKey::new(&raw[..])?;
    let hsm = SoftHsm::create(path, &Password::new(PASSWORD)?, KdfParams::INSECURE_FOR_TESTS)?;
    hsm.import_handles(&[(KH, Flags::PERSONALIZER | Flags::OTP_DECODE | Flags::EXPORT, key.clone())])?;
    Ok((hsm, key))
}

/// A throwaway SoftHSM2 token holding the benchmark's handle key (decode
/// only, as a validation server's) and the data keys, and the `[hsm]`
/// configuration `validator serve` would be given for it.
struct Token {
    config: HsmConfig,
    /// The module the bench set the token up with: it seals the API
    /// client's key as `validator client add` would.
    setup: Arc<Pkcs11Hsm>,
    /// Deleted on drop.
    _dir: TokenDir,
}

impl Token {
    /// Must run before this process first loads the PKCS#11 module.
    fn create(base: &Path, key: &HandleKey) -> Result<Self> {
        let module = Path::new(hsm::pkcs11::DEFAULT_MODULE);
        if !module.exists() {
            bail!("{} is missing: apt-get install softhsm2", module.display());
        }
        let dir = TokenDir::new(base, module);
        let _slot = dir.init_token(TOKEN_LABEL, TOKEN_PIN, TOKEN_SO_PIN);
        dir.use_in_this_process();
        let pin_file = dir.root().join("pin");
        std::fs::write(&pin_file, TOKEN_PIN)?;
        let pkcs11 = Pkcs11Config { pin_file: Some(pin_file), ..Pkcs11Config::for_token(TOKEN_LABEL) };
        let setup = Pkcs11Hsm::open(pkcs11.clone()).context("opening the SoftHSM2 token")?;
        setup.import_handle_key(KH, Flags::OTP_DECODE, key).context("importing the handle key into the token")?;
        setup.create_data_keys().context("creating the token's data keys")?;
        Ok(Self { config: HsmConfig::Pkcs11(pkcs11), setup: Arc::new(setup), _dir: dir })
    }
}

// ---------------------------------------------------------------------------
// Load and figures

/// Send `cases` as signed verify requests from `concurrency` connections
/// and check every answer.
fn verify_load(addr: SocketAddr, key: &ClientKey, concurrency: usize, cases: &[OtpCase], time_limit: Duration) -> (Report, u64) {
    run::over_http(addr, concurrency, cases, Some(time_limit), CLIENT_TIMEOUT, |index| {
        let mut nonces = NonceSource::from_clock(index as u64);
        move |conn: &mut Connection, case: &OtpCase| {
            let nonce = nonces.nonce();
            let target = verify_answer::verify_target(CLIENT_ID, key.expose(), &case.otp, &nonce);
            let resp = conn.get(&target).map_err(|e| format!("request failed: {e}"))?;
            if resp.head.status != 200 {
                return Err(format!("HTTP {}: {:?}", resp.head.status, String::from_utf8_lossy(&resp.body)));
            }
            verify_answer::check(&resp.body, key.expose(), &case.otp, &nonce, &case.expect)
        }
    })
}

/// One `/metrics` scrape.
fn scrape(addr: SocketAddr) -> Result<Samples> {
    let resp = Connection::new(addr, CLIENT_TIMEOUT).get("/metrics").context("scraping /metrics")?;
    if resp.head.status != 200 {
        bail!("/metrics answered HTTP {}", resp.head.status);
    }
    Ok(Samples::parse(&String::from_utf8_lossy(&resp.body)))
}

fn check_health(addr: SocketAddr) -> Result<()> {
    let resp = Connection::new(addr, CLIENT_TIMEOUT).get("/health").context("asking /health")?;
    if resp.head.status != 200 {
        bail!("/health: HTTP {}: {}", resp.head.status, String::from_utf8_lossy(&resp.body).trim());
    }
    Ok(())
}

/// The largest transaction of a level. The store exports the largest
/// batch since start (a gauge) and a histogram: when the gauge grew during
/// the level it is the level's own maximum; otherwise the level's is at
/// most the smaller of the gauge and the bound of its highest bucket.
#[derive(Clone, Copy, Debug, PartialEq)]
enum MaxBatch {
    Exact(u64),
    AtMost(u64),
    Unknown,
}

impl std::fmt::Display for MaxBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Exact(n) => write!(f, "{n}"),
            Self::AtMost(n) => write!(f, "<={n}"),
            Self::Unknown => f.write_str("-"),
        }
    }
}

/// The counter store and the service over one level: differences of two
/// `/metrics` scrapes.
#[derive(Clone, Copy, Debug)]
struct StoreFigures {
    /// Transactions committed (one WAL write, and with FULL one fsync, each).
    commits: f64,
    /// Updates in them.
    updates: f64,
    accepted: f64,
    replayed: f64,
    /// Failed transactions and the updates answered BACKEND_ERROR with them.
    failed_batches: f64,
    failed_updates: f64,
    max_batch: MaxBatch,
    /// Mean COMMIT time (the fsync with FULL), ms.
    commit_ms: Option<f64>,
    /// Mean transaction time, BEGIN to COMMIT, ms.
    transaction_ms: Option<f64>,
    /// Mean time a request waits for its compare-and-set (queue, transaction, commit), ms.
    cas_ms: Option<f64>,
    /// Mean time from request head to answer inside the service, for OK answers, ms.
    server_ms: Option<f64>,
    /// OK answers the service counted.
    ok_answers: f64,
    /// Answers the service gave after the deadline (signed BACKEND_ERROR).
    deadline_missed: f64,
}

impl StoreFigures {
    fn between(before: &Samples, after: &Samples) -> Self {
        let d = |series: &str| after.delta(before, series);
        let mean_ms = |name: &str| {
            let n = d(&format!("{name}_count"));
            (n > 0.0).then(|| d(&format!("{name}_sum")) / n * 1000.0)
        };
        let updates = |outcome: &str| d(&format!("validator_counter_updates_total{{outcome=\"{outcome}\"}}"));
        let gauge_before = before.get("validator_counter_batch_size_max");
        let gauge_after = after.get("validator_counter_batch_size_max");
        let highest = highest_bucket_between(before, after, "validator_counter_batch_size");
        let max_batch = match (gauge_before, gauge_after, highest) {
            (Some(b), Some(a), _) if a > b => MaxBatch::Exact(a as u64),
            (_, _, None) => MaxBatch::Unknown,
            (_, Some(a), Some(h)) => MaxBatch::AtMost(a.min(h) as u64),
            (_, None, Some(h)) if h.is_finite() => MaxBatch::AtMost(h as u64),
            _ => MaxBatch::Unknown,
        };
        let server_count = d("validator_verify_duration_seconds_count{status=\"OK\"}");
        Self {
            commits: d("validator_counter_batches_total"),
            updates: d("validator_counter_batch_size_sum"),
            accepted: updates("accepted"),
            replayed: updates("replayed_request") + updates("replayed_otp"),
            failed_batches: d("validator_counter_batch_failures_total"),
            failed_updates: updates("failed"),
            max_batch,
            commit_ms: mean_ms("validator_counter_commit_seconds"),
            transaction_ms: mean_ms("validator_counter_transaction_seconds"),
            cas_ms: mean_ms("validator_counter_cas_seconds"),
            server_ms: (server_count > 0.0).then(|| d("validator_verify_duration_seconds_sum{status=\"OK\"}") / server_count * 1000.0),
            ok_answers: d("validator_verify_requests_total{status=\"OK\"}"),
            deadline_missed: d("validator_deadline_missed_total"),
        }
    }

    fn mean_batch(&self) -> Option<f64> {
        (self.commits > 0.0).then(|| self.updates / self.commits)
    }
}

struct Row {
    /// The security module.
    backend: Backend,
    /// `full`, `normal`, or the memory run's label.
    label: String,
    concurrency: usize,
    report: Report,
    connects: u64,
    store: StoreFigures,
}

/// Unmeasured load before a level (connections, caches, thread pools).
fn warm_up(addr: SocketAddr, key: &ClientKey, c: usize, warm: &[OtpCase], limit: Duration) {
    if !warm.is_empty() {
        let (w, _) = verify_load(addr, key, c, warm, limit);
        if w.summary.errors > 0 {
            eprintln!("  warm-up c={c}: {} errors, e.g. {:?}", w.summary.errors, w.error_examples.first());
        }
    }
}

/// Measure one level between two scrapes.
fn level(addr: SocketAddr, key: &ClientKey, c: usize, cases: &[OtpCase], limit: Duration) -> Result<(Report, u64, StoreFigures)> {
    let before = scrape(addr)?;
    let (report, connects) = verify_load(addr, key, c, cases, limit);
    let after = scrape(addr)?;
    Ok((report, connects, StoreFigures::between(&before, &after)))
}

fn opt_ms(x: Option<f64>) -> String {
    x.map_or_else(|| "-".to_owned(), |v| format!("{v:.3}"))
}

fn print_table(rows: &[Row]) {
    println!();
    println!(
        "{:<8} {:<10} {:>3} {:>8} {:>6} {:>13} {:>7} {:>7} {:>8} {:>6} {:>8} {:>9} {:>6} {:>6} {:>9} {:>7} {:>7}",
        "backend",
        "sync",
        "c",
        "requests",
        "errors",
        "validations/s",
        "p50 ms",
        "p99 ms",
        "max ms",
        "stalls",
        "commits",
        "commits/s",
        "batch",
        "max",
        "commit ms",
        "cas ms",
        "srv ms"
    );
    for r in rows {
        let s = &r.report.summary;
        let f = &r.store;
        let secs = s.elapsed.as_secs_f64();
        let commits_per_s = if secs > 0.0 { f.commits / secs } else { 0.0 };
        println!(
            "{:<8} {:<10} {:>3} {:>8} {:>6} {:>13.0} {:>7} {:>7} {:>8} {:>6} {:>8.0} {:>9.0} {:>6} {:>6} {:>9} {:>7} {:>7}",
            r.backend.name(),
            r.label,
            r.concurrency,
            s.requests,
            s.errors,
            s.ok_per_second(),
            ms(s.p50),
            ms(s.p99),
            ms(s.max),
            s.stalls,
            f.commits,
            commits_per_s,
            f.mean_batch().map_or_else(|| "-".to_owned(), |b| format!("{b:.1}")),
            f.max_batch.to_string(),
            opt_ms(f.commit_ms),
            opt_ms(f.cas_ms),
            opt_ms(f.server_ms),
        );
    }
    println!(
        "(validations/s: correct answers per second of wall time; stalls: requests over {} ms; commits: counter-store transactions; \
         batch: mean updates per commit; max: largest commit of the level (<=N: bound from the histogram); commit ms: mean COMMIT \
         (the WAL fsync with FULL); cas ms: mean wait of a request for its compare-and-set; srv ms: mean time inside the service \
         per OK answer)",
        STALL.as_millis()
    );
    for r in rows {
        let s = &r.report.summary;
        let f = &r.store;
        let tag = format!("{} {} c={}", r.backend.name(), r.label, r.concurrency);
        if r.report.unsent > 0 {
            println!("note: {tag}: time limit reached, {} requests not sent", r.report.unsent);
        }
        if r.connects > r.concurrency as u64 {
            println!("note: {tag}: {} TCP connections for {} client threads (keep-alive broken?)", r.connects, r.concurrency);
        }
        let ok = s.requests.saturating_sub(s.errors) as f64;
        if (f.ok_answers - ok).abs() > 0.5 || (f.accepted - ok).abs() > 0.5 {
            println!(
                "note: {tag}: the client counted {ok} correct answers, the service {} OK answers and the store {} accepted updates",
                f.ok_answers, f.accepted
            );
        }
        if f.replayed > 0.0 || f.failed_batches > 0.0 || f.failed_updates > 0.0 || f.deadline_missed > 0.0 {
            println!(
                "note: {tag}: store: {} replayed, {} failed transactions ({} updates); {} answers after the deadline",
                f.replayed, f.failed_batches, f.failed_updates, f.deadline_missed
            );
        }
        for e in &r.report.error_examples {
            println!("error: {tag}: {e}");
        }
    }
    println!();
    for r in rows {
        let f = &r.store;
        println!(
            "store {} {} c={}: {} commits, {} updates ({} accepted), mean batch {}, max {}, transaction {} ms, commit {} ms",
            r.backend.name(),
            r.label,
            r.concurrency,
            f.commits,
            f.updates,
            f.accepted,
            f.mean_batch().map_or_else(|| "-".to_owned(), |b| format!("{b:.2}")),
            f.max_batch,
            opt_ms(f.transaction_ms),
            opt_ms(f.commit_ms)
        );
    }
}

fn print_targets(rows: &[Row], memory: Option<&MemoryFigures>) {
    println!();
    println!("targets (issues 4 and 7, 2 cores, load generator on the same cores):");
    let full: Vec<&Row> = rows.iter().filter(|r| r.backend == Backend::Soft && r.label == Synchronous::Full.name()).collect();
    if let Some(best) = full.iter().max_by(|a, b| a.report.summary.ok_per_second().total_cmp(&b.report.summary.ok_per_second())) {
        let rate = best.report.summary.ok_per_second();
        println!(
            "  soft: >= {TARGET_RATE_FULL:.0} validations/s with synchronous=FULL: {} ({rate:.0}/s at c={})",
            if rate >= TARGET_RATE_FULL { "MET" } else { "MISSED" },
            best.concurrency
        );
    }
    for r in rows.iter().filter(|r| r.backend == Backend::Soft && r.concurrency == 32) {
        let p99 = r.report.summary.p99;
        println!(
            "  soft: p99 < {} ms at c=32 ({}): {} ({} ms)",
            TARGET_P99_C32.as_millis(),
            r.label,
            if p99 < TARGET_P99_C32 { "MET" } else { "MISSED" },
            ms(p99)
        );
    }
    for mode in [Synchronous::Full, Synchronous::Normal] {
        let on_token = rows.iter().filter(|r| r.backend == Backend::Softhsm2 && r.label == mode.name());
        if let Some(best) = on_token.max_by(|a, b| a.report.summary.ok_per_second().total_cmp(&b.report.summary.ok_per_second())) {
            let rate = best.report.summary.ok_per_second();
            println!(
                "  softhsm2: >= {TARGET_RATE_SOFTHSM2:.0} validations/s with synchronous={}: {} ({rate:.0}/s at c={})",
                mode.name(),
                if rate >= TARGET_RATE_SOFTHSM2 { "MET" } else { "MISSED" },
                best.concurrency
            );
        }
    }
    if let Some(m) = memory {
        println!(
            "  memory < {} with {} YubiKeys: {} (VmHWM {} under load; VmRSS {} right after start)",
            mib(TARGET_RSS_KB),
            m.keys,
            if m.loaded.hwm_kb < TARGET_RSS_KB { "MET" } else { "MISSED" },
            mib(m.loaded.hwm_kb),
            mib(m.idle.rss_kb)
        );
    }
    let errors: u64 = rows.iter().map(|r| r.report.summary.errors).sum();
    println!("  every answer correct: {}", if errors == 0 { "yes".to_owned() } else { format!("NO, {errors} errors") });
}

// ---------------------------------------------------------------------------
// Throughput: the service in this process, once per synchronous mode

fn throughput(args: &Args, work_root: &Path, rows: &mut Vec<Row>) -> Result<()> {
    if args.keys == 0 {
        bail!("--keys must be at least 1");
    }
    std::fs::create_dir_all(work_root)?;
    let work = tempfile::Builder::new().prefix("run-").tempdir_in(work_root)?;
    let t = Instant::now();
    let (keystore, handle_key) = keystore_with_known_key(&work.path().join("keystore"))?;
    let hsm = Arc::new(keystore);
    let store_path = work.path().join("aeads.db");
    let store = AeadStore::open(&store_path)?;
    let mut fleet = Fleet::new();
    let mut batch = Vec::with_capacity(STORE_BATCH);
    for i in 1..=args.keys {
        let id = PublicId::from_number(i, PUBLIC_ID_BYTES)?;
        let (record, secrets) = fleet::provision(hsm.as_ref(), KH, &id)?;
        batch.push((id, record));
        if batch.len() == STORE_BATCH || i == args.keys {
            store.put_many(&batch, "validator-bench", now_unix())?;
            batch.clear();
        }
        fleet.push(id, secrets);
    }
    drop(store);
    println!(
        "provisioned {} YubiKeys in {:.1}s: AEAD store, keystore and databases in {}",
        args.keys,
        t.elapsed().as_secs_f64(),
        work.path().display()
    );
    // Declared after `work`, so deleted before it.
    let token = if args.backend.iter().any(|b| matches!(b, Backend::Softhsm2 | Backend::Softhsm2KeyInToken)) {
        let token = Token::create(work.path(), &handle_key)?;
        println!(
            "SoftHSM2 token {TOKEN_LABEL:?} ({}): the handle key imported (otp-decode), data keys created",
            hsm::pkcs11::DEFAULT_MODULE
        );
        Some(token)
    } else {
        None
    };
    drop(handle_key);

    let password_file = work.path().join("password");
    std::fs::write(&password_file, PASSWORD)?;
    let limit = Duration::from_secs(args.time_limit_secs);
    for &backend in &args.backend {
        // The module that seals the API client's key, and the `[hsm]`
        // table `validator serve` opens its own module from.
        let (sealer, hsm_config): (Arc<dyn SecurityModule>, HsmConfig) = match (backend, &token) {
            (Backend::Soft, _) => (hsm.clone(), HsmConfig::soft(hsm.path(), Some(&password_file))),
            (Backend::Softhsm2, Some(t)) => (t.setup.clone(), t.config.clone()),
            (Backend::Softhsm2KeyInToken, Some(t)) => {
                let HsmConfig::Pkcs11(c) = &t.config else { bail!("the token's configuration is not pkcs11") };
                (t.setup.clone(), HsmConfig::Pkcs11(Pkcs11Config { decode: DecodeMode::KeyInToken, ..c.clone() }))
            }
            (Backend::Softhsm2 | Backend::Softhsm2KeyInToken, None) => bail!("no SoftHSM2 token was set up"),
        };
        let backend_name = backend.name();
        for &mode in &args.synchronous {
            let db = work.path().join(format!("validator-{backend_name}-{mode}.db"));
            // The client first, as `validator client add` would.
            let key = {
                let clients = SqliteClients::open(&db, sealer.clone()).context("API clients")?;
                let client_id = ClientId::new(CLIENT_ID).context("client id")?;
                clients.add(Some(client_id), None).context("adding the API client")?.1
            };
            let mut http = HttpOptions::new(SocketAddr::from(([127, 0, 0, 1], 0)));
            if let Some(n) = args.http_workers {
                http.workers = n;
            }
            if let Some(n) = args.http_blocking_threads {
                http.max_blocking_threads = n;
            }
            let (workers, blocking) = (http.workers, http.max_blocking_threads);
            // What `validator serve` runs with `--db … --synchronous MODE
            // --store …` and this `[hsm]` table (soft: `--keystore …
            // --password-file …`; softhsm2: type = "pkcs11", token_label,
            // pin_file), assembled by the same function.
            let config = ServeConfig {
                db: db.clone(),
                synchronous: mode,
                hsm: hsm_config.clone(),
                ksm: KsmSource::Store { path: store_path.clone(), key_handles: Vec::new() },
                http: http.clone(),
                replication: None,
            };
            let parts = serve::assemble(&config).map_err(|e| anyhow::anyhow!("assembling the validator: {e}"))?;
            let running = serve::start(parts, http).context("starting the validator")?;
            let addr = running.local_addr();
            println!(
                "validator: backend={backend_name} synchronous={mode}: http://{addr}/wsapi/2.0/verify (serve::assemble + serve::start in this process; fresh database; workers {}, max blocking threads {blocking})",
                if workers == 0 { "= CPUs".to_owned() } else { workers.to_string() }
            );
            let result = (|| -> Result<()> {
                check_health(addr)?;
                for &c in &args.concurrency {
                    let warm = fleet.otps(args.warmup)?;
                    let cases = fleet.otps(args.requests_per_level)?;
                    warm_up(addr, &key, c, &warm, limit);
                    let (report, connects, store) = level(addr, &key, c, &cases, limit)?;
                    let s = &report.summary;
                    eprintln!(
                        "  backend={backend_name:<8} sync={mode:<6} c={c:<3} {:>8.0} validations/s  p99 {} ms  errors {}  mean batch {}",
                        s.ok_per_second(),
                        ms(s.p99),
                        s.errors,
                        store.mean_batch().map_or_else(|| "-".to_owned(), |b| format!("{b:.1}"))
                    );
                    rows.push(Row { backend, label: mode.name().to_owned(), concurrency: c, report, connects, store });
                }
                Ok(())
            })();
            // Joins the service, and with its parts the counter writer.
            running.shutdown();
            result?;
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Memory of `validator serve` with a large store

struct MemoryFigures {
    keys: u64,
    idle: Mem,
    loaded: Mem,
}

/// `key=BASE64` from `validator client add`'s output.
fn key_from_output(stdout: &str) -> Option<ClientKey> {
    let b64 = stdout.lines().find_map(|l| l.trim().strip_prefix("key="))?;
    base64::engine::general_purpose::STANDARD.decode(b64.trim()).ok().map(ClientKey::new)
}

fn memory(args: &Args, work_root: &Path, rows: &mut Vec<Row>) -> Result<MemoryFigures> {
    let n = args.rss_keys;
    let b = BigStore::build_or_reuse(&work_root.join(format!("rss-{n}")), n, PUBLIC_ID_BYTES, KH, PASSWORD, keystore)?;
    let bin = match &args.validator_bin {
        Some(p) => p.clone(),
        None => std::env::current_exe()?.with_file_name("validator"),
    };
    if !bin.is_file() {
        bail!("{} not found: build it first (cargo build --release -p validator) or pass --validator-bin", bin.display());
    }

    // A fresh validator database each time.
    let db = b.dir.join("validator.db");
    for suffix in ["", "-wal", "-shm"] {
        let p = PathBuf::from(format!("{}{suffix}", db.display()));
        if p.exists() {
            std::fs::remove_file(&p)?;
        }
    }
    let added = Command::new(&bin)
        .args(["client", "add", "--db"])
        .arg(&db)
        .arg("--keystore")
        .arg(&b.keystore)
        .arg("--password-file")
        .arg(&b.password_file)
        .args(["--id", &CLIENT_ID.to_string()])
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {} client add", bin.display()))?;
    if !added.status.success() {
        bail!("{} client add failed ({}): {}", bin.display(), added.status, String::from_utf8_lossy(&added.stderr).trim());
    }
    let key = key_from_output(&String::from_utf8_lossy(&added.stdout)).context("`validator client add` printed no key=BASE64 line")?;

    // OTPs from keys spread over the whole id range.
    let hsm = SoftHsm::open_unlocked(&b.keystore, &Password::new(PASSWORD)?)?;
    let reader = AeadStore::open_existing(&b.store)?;
    let mut fleet = Fleet::new();
    for id in BigStore::spread_ids(n, args.rss_spread, PUBLIC_ID_BYTES)? {
        let record = reader.get(&id, KH)?.with_context(|| format!("{id} missing from the cached store; delete {}", b.dir.display()))?;
        fleet.push(id, fleet::secrets_of(&hsm, &record)?);
    }
    drop(reader);
    drop(hsm);
    let cases = fleet.otps(args.rss_requests)?;

    let mut serve = Command::new(&bin);
    serve
        .arg("serve")
        .arg("--db")
        .arg(&db)
        .arg("--keystore")
        .arg(&b.keystore)
        .arg("--password-file")
        .arg(&b.password_file)
        .arg("--store")
        .arg(&b.store)
        .args(["--listen", "127.0.0.1:0"])
        .env("RUST_LOG", "warn");
    let (guard, addr) = spawn_serving("validator serve", serve, &b.dir.join("serve.log"), Duration::from_secs(60))?;
    check_health(addr)?;
    let idle = proc_mem(guard.pid())?;
    let c = args.concurrency.iter().copied().max().unwrap_or(32);
    let (report, connects, store) = level(addr, &key, c, &cases, Duration::from_secs(args.time_limit_secs))?;
    let loaded = proc_mem(guard.pid())?;
    let pid = guard.pid();
    guard.stop();
    let db_size = std::fs::metadata(&b.store).map(|m| m.len()).unwrap_or(0);
    rows.push(Row { backend: Backend::Soft, label: format!("serve-{}", short_count(n)), concurrency: c, report, connects, store });
    println!();
    println!(
        "memory: `{} serve` (pid {pid}, synchronous=full) with {n} YubiKeys in the AEAD store ({:.1} MiB on disk), {} of them in the load",
        bin.display(),
        db_size as f64 / 1_048_576.0,
        args.rss_spread.min(n)
    );
    println!("  after start:              VmRSS {:>10}   VmHWM {:>10}", mib(idle.rss_kb), mib(idle.hwm_kb));
    println!(
        "  after {} requests, c={c}: VmRSS {:>10}   VmHWM {:>10}   (target: < {})",
        args.rss_requests,
        mib(loaded.rss_kb),
        mib(loaded.hwm_kb),
        mib(TARGET_RSS_KB)
    );
    Ok(MemoryFigures { keys: n, idle, loaded })
}

/// 1000000 as `1M`, 2500 as `2500`.
fn short_count(n: u64) -> String {
    if n >= 1_000_000 && n.is_multiple_of(1_000_000) {
        format!("{}M", n / 1_000_000)
    } else if n >= 1000 && n.is_multiple_of(1000) {
        format!("{}k", n / 1000)
    } else {
        n.to_string()
    }
}

fn main() -> std::process::ExitCode {
    match bench(&Args::parse()) {
        Ok(true) => std::process::ExitCode::SUCCESS,
        Ok(false) => std::process::ExitCode::FAILURE,
        Err(e) => {
            eprintln!("validator-bench: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Run everything; `Ok(false)` when some answer was wrong.
fn bench(args: &Args) -> Result<bool> {
    if args.concurrency.is_empty() || args.concurrency.contains(&0) {
        bail!("--concurrency needs positive levels, e.g. 8,32");
    }
    if args.backend.is_empty() {
        bail!("--backend needs at least one of soft, softhsm2, softhsm2-key-in-token");
    }
    let target = target_dir()?;
    let work_root = args.work_dir.clone().unwrap_or_else(|| target.join("validator-bench"));
    std::fs::create_dir_all(&work_root)?;
    let cpus = std::thread::available_parallelism().map_or(0, std::num::NonZero::get);
    if !args.skip_throughput {
        let modes: Vec<&str> = args.synchronous.iter().map(|m| m.name()).collect();
        let backends: Vec<&str> = args.backend.iter().map(|b| b.name()).collect();
        println!(
            "validator-bench: {} keys, {} requests per level (+{} warm-up), concurrency {:?}, synchronous {modes:?}, backends {backends:?}, {cpus} CPUs, loopback only",
            args.keys, args.requests_per_level, args.warmup, args.concurrency
        );
    }
    if cfg!(debug_assertions) {
        println!("warning: debug build; run with --release for real figures");
    }
    let mut rows = Vec::new();
    // The table is printed even when a later part fails.
    let mut outcome = Ok(());
    if !args.skip_throughput {
        outcome = throughput(args, &work_root, &mut rows);
    }
    let mut memory_figures = None;
    if outcome.is_ok() && args.rss_keys > 0 {
        match memory(args, &work_root, &mut rows) {
            Ok(m) => memory_figures = Some(m),
            Err(e) => outcome = Err(e),
        }
    }
    print_table(&rows);
    print_targets(&rows, memory_figures.as_ref());
    let _ = std::io::stdout().flush();
    outcome?;
    Ok(rows.iter().all(|r| r.report.summary.errors == 0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_the_validator_prints() {
        let key = key_from_output("id=1\nkey=MDEyMzQ1Njc4OWFiY2RlZmdoaWo=\n").unwrap_or_else(|| panic!("no key"));
        assert_eq!(key.expose(), b"0123456789abcdefghij");
        assert!(key_from_output("id=1\n").is_none());
    }

    #[test]
    fn max_batch_of_a_level() {
        let s = |text: &str| Samples::parse(text);
        let before = s("validator_counter_batch_size_max 20\nvalidator_counter_batch_size_bucket{le=\"16\"} 5\nvalidator_counter_batch_size_bucket{le=\"32\"} 6\n");
        let grew = s("validator_counter_batch_size_max 25\nvalidator_counter_batch_size_bucket{le=\"16\"} 5\nvalidator_counter_batch_size_bucket{le=\"32\"} 9\n");
        assert_eq!(StoreFigures::between(&before, &grew).max_batch, MaxBatch::Exact(25));
        let small = s("validator_counter_batch_size_max 20\nvalidator_counter_batch_size_bucket{le=\"16\"} 9\nvalidator_counter_batch_size_bucket{le=\"32\"} 10\n");
        assert_eq!(StoreFigures::between(&before, &small).max_batch, MaxBatch::AtMost(16));
        assert_eq!(StoreFigures::between(&before, &before).max_batch, MaxBatch::Unknown);
        assert_eq!(MaxBatch::AtMost(16).to_string(), "<=16");
    }

    #[test]
    fn backends_and_overridden_defaults() {
        let parse = |argv: &[&str]| Args::try_parse_from(argv).unwrap_or_else(|e| panic!("{argv:?}: {e}"));
        assert_eq!(parse(&["validator-bench"]).backend, [Backend::Soft]);
        assert_eq!(parse(&["validator-bench", "--backend", "soft,softhsm2"]).backend, [Backend::Soft, Backend::Softhsm2]);
        // What scripts/bench-validator.sh does: its defaults, then the caller's options.
        let a = parse(&["validator-bench", "--concurrency", "8,32", "--rss-keys", "1000000", "--rss-keys", "0", "--concurrency", "32"]);
        assert_eq!((a.rss_keys, a.concurrency), (0, vec![32]));
        assert!(Args::try_parse_from(["validator-bench", "--backend", "yhsm1"]).is_err());
    }

    #[test]
    fn short_counts() {
        assert_eq!(short_count(1_000_000), "1M");
        assert_eq!(short_count(10_000), "10k");
        assert_eq!(short_count(1234), "1234");
    }
}
