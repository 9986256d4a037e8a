//! `ksm-bench`: our KSM over HTTP, our KSM in-process and pyhsm's
//! `yhsm-yubikey-ksm` (soft HSM), side by side in one run, at several
//! concurrencies; optionally the resident memory of `ksm serve` with a
//! large AEAD store.
//!
//! Everything runs on this machine, on 127.0.0.1; every level is bounded in
//! request count and time. See `scripts/bench-ksm.sh`.

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use clap::{Parser, ValueEnum};
use hsm::soft::format::KdfParams;
use hsm::soft::SoftHsm;
use hsm::{Flags, Password};
use ksm::aead_dir::{AeadDir, KeyHandleDir};
use ksm::store::AeadStore;
use ksm::Ksm;
use loadgen::fleet::{self, Fleet, OtpCase};
use loadgen::harness::{free_port, mib, now_unix, proc_mem, tail, target_dir, BigStore, ChildGuard, HarnessError, STORE_BATCH as BATCH};
use loadgen::http::Connection;
use loadgen::ksm_answer;
use loadgen::run::{self, Report};
use loadgen::stats::{ms, STALL};
use otp::aead_file::AeadRecord;
use otp::{HandleKey, KeyHandle, PublicId};

/// The one key handle, as typed: pyhsm then finds `aeads/1/…`.
const KH_TYPED: &str = "1";
const KH: KeyHandle = KeyHandle::new(1);
/// The handle's AES-256 key, known so that pyhsm's soft HSM gets the same
/// key through `keys.json`. Test material only.
const HANDLE_KEY: [u8; 32] = [
    0x42, 0x65, 0x6e, 0x63, 0x68, 0x6d, 0x61, 0x72, 0x6b, 0x20, 0x6b, 0x65, 0x79, 0x2c, 0x20, 0x6e, 0x6f, 0x74, 0x20, 0x61, 0x20, 0x73,
    0x65, 0x63, 0x72, 0x65, 0x74, 0x21, 0x00, 0x01, 0x02, 0x03,
];
const PASSWORD: &str = "ksm-bench";
const PUBLIC_ID_BYTES: usize = 6;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum PyhsmMode {
    /// Run pyhsm if it can be found and started; otherwise say so and skip it.
    Auto,
    /// pyhsm must run.
    On,
    /// Do not run pyhsm.
    Off,
}

/// Side-by-side KSM benchmark: our KSM over HTTP, in-process, and pyhsm's
/// yhsm-yubikey-ksm with its soft HSM, all on 127.0.0.1.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// YubiKeys (AEADs) to provision for the throughput runs.
    #[arg(long, default_value_t = 1000)]
    keys: u64,
    /// Measured requests per target and concurrency level.
    #[arg(long, default_value_t = 20_000)]
    requests_per_level: usize,
    /// Unmeasured requests sent before each measured run.
    #[arg(long, default_value_t = 1000)]
    warmup: usize,
    /// Concurrency levels (client threads, one connection each).
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    concurrency: Vec<usize>,
    /// Stop a level after this many seconds even if requests remain.
    #[arg(long, default_value_t = 60)]
    time_limit_secs: u64,
    /// Which targets the throughput runs measure, in order.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "ours-http,ours-inproc,pyhsm,loopback-floor")]
    targets: Vec<Target>,
    /// Whether to run pyhsm's KSM.
    #[arg(long, value_enum, default_value_t = PyhsmMode::Auto)]
    pyhsm: PyhsmMode,
    /// Where pyhsm is installed (`pip install --prefix`); default
    /// `$PYHSM_PREFIX` or `<target>/pyhsm-py27`. `yhsm-yubikey-ksm` on PATH
    /// is used when it is not there.
    #[arg(long, env = "PYHSM_PREFIX", value_name = "DIR")]
    pyhsm_prefix: Option<PathBuf>,
    /// Also measure `ksm serve`'s memory with a store of this many AEADs
    /// (built once and cached under `<target>/ksm-bench/`). 0: skip.
    #[arg(long, default_value_t = 0)]
    rss_keys: u64,
    /// Requests sent to `ksm serve` in the memory measurement.
    #[arg(long, default_value_t = 50_000)]
    rss_requests: usize,
    /// The `ksm` binary for the memory measurement; default: next to this one.
    #[arg(long, value_name = "PATH")]
    ksm_bin: Option<PathBuf>,
    /// Our HTTP service's async worker threads (`HttpOptions::workers`);
    /// default: the service's own default.
    #[arg(long, value_name = "N")]
    http_workers: Option<usize>,
    /// Our HTTP service's blocking-pool threads for decrypts
    /// (`HttpOptions::max_blocking_threads`); default: the service's own.
    #[arg(long, value_name = "N")]
    http_blocking_threads: Option<usize>,
    /// Skip the throughput runs (with --rss-keys: memory only).
    #[arg(long)]
    skip_throughput: bool,
    /// Working directory for keystores, AEADs and caches; default `<target>/ksm-bench`.
    #[arg(long, value_name = "DIR")]
    work_dir: Option<PathBuf>,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// A keystore with the one benchmark handle (decode, generate, export).
fn keystore(path: &Path) -> Result<SoftHsm> {
    let hsm = SoftHsm::create(path, &Password::new(PASSWORD)?, KdfParams::INSECURE_FOR_TESTS)?;
    hsm.import_handles(&[(KH, Flags::PERSONALIZER | Flags::OTP_DECODE | Flags::EXPORT, HandleKey::new(&HANDLE_KEY)?)])?;
    Ok(hsm)
}

// ---------------------------------------------------------------------------
// pyhsm

struct Pyhsm {
    script: PathBuf,
    pythonpath: Option<PathBuf>,
}

fn find_pyhsm(prefix: Option<&Path>, target: &Path) -> Option<Pyhsm> {
    let prefix = prefix.map_or_else(|| target.join("pyhsm-py27"), Path::to_path_buf);
    let script = prefix.join("bin/yhsm-yubikey-ksm");
    if script.is_file() {
        return Some(Pyhsm { script, pythonpath: Some(prefix.join("lib/python2.7/site-packages")) });
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join("yhsm-yubikey-ksm")).find(|p| p.is_file()).map(|script| Pyhsm { script, pythonpath: None })
}

fn start_pyhsm(p: &Pyhsm, keys_json: &Path, aead_dir: &Path, log: &Path) -> Result<(ChildGuard, SocketAddr)> {
    let addr = free_port()?;
    let mut cmd = Command::new(&p.script);
    cmd.arg("-D").arg(keys_json).arg("-B").arg(aead_dir).args(["--key-handles", KH_TYPED, "--addr", "127.0.0.1", "--port"]);
    cmd.arg(addr.port().to_string());
    if let Some(pp) = &p.pythonpath {
        cmd.env("PYTHONPATH", pp);
    }
    let log_file = std::fs::File::create(log)?;
    cmd.stdin(Stdio::null()).stdout(log_file.try_clone()?).stderr(log_file);
    let child = cmd.spawn().with_context(|| format!("starting {}", p.script.display()))?;
    let mut guard = ChildGuard::new("yhsm-yubikey-ksm", child);
    if let Err(e) = guard.wait_listening(addr, Duration::from_secs(20)) {
        bail!("{e}; its output:\n{}", tail(log, 2000));
    }
    Ok((guard, addr))
}

// ---------------------------------------------------------------------------
// The calibration server

/// A minimal HTTP/1.1 server: a thread per connection, a fixed 200 answer
/// to every request, keep-alive. What is left when the KSM does no work.
struct FloorServer {
    addr: SocketAddr,
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

const FLOOR_ANSWER: &[u8] =
    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 40\r\n\r\nOK counter=0000 low=0000 high=00 use=00\n";

impl FloorServer {
    fn start() -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new().name("floor-accept".to_owned()).spawn(move || {
            for stream in listener.incoming() {
                if flag.load(std::sync::atomic::Ordering::Relaxed) {
                    return;
                }
                let Ok(stream) = stream else { continue };
                let _ = std::thread::Builder::new().name("floor-conn".to_owned()).spawn(move || Self::serve(stream));
            }
        })?;
        Ok(Self { addr, stop, thread })
    }

    fn serve(mut stream: TcpStream) {
        let _ = stream.set_nodelay(true);
        let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
        let mut buf = Vec::with_capacity(1024);
        let mut chunk = [0u8; 2048];
        loop {
            // Answer every complete request head in the buffer.
            while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                buf.drain(..end + 4);
                if stream.write_all(FLOOR_ANSWER).is_err() {
                    return;
                }
            }
            match std::io::Read::read(&mut stream, &mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
            if buf.len() > 64 * 1024 {
                return;
            }
        }
    }

    /// Stop accepting; connection threads end when their clients hang up.
    fn stop(self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        let _ = self.thread.join();
    }
}

// ---------------------------------------------------------------------------
// Running one target at one level

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Target {
    /// Our KSM over HTTP (`ksm::serve`, in this process).
    #[value(name = "ours-http")]
    OursHttp,
    /// Our KSM called directly (`Ksm::decrypt`).
    #[value(name = "ours-inproc")]
    OursInProcess,
    /// pyhsm's yhsm-yubikey-ksm (soft HSM), a subprocess.
    Pyhsm,
    /// Calibration: a do-nothing HTTP server (one thread per connection,
    /// a fixed answer, no decrypt), the most this machine's loopback and
    /// scheduler allow with this client.
    #[value(name = "loopback-floor")]
    LoopbackFloor,
    /// `ksm serve` on the large store (the memory measurement).
    #[value(skip)]
    OursServeBig,
}

impl Target {
    fn label(self) -> &'static str {
        match self {
            Self::OursHttp => "ours-http",
            Self::OursInProcess => "ours-inproc",
            Self::Pyhsm => "pyhsm",
            Self::LoopbackFloor => "loopback-floor",
            Self::OursServeBig => "ksm-serve-big",
        }
    }
}

struct Row {
    target: Target,
    concurrency: usize,
    report: Report,
    connects: u64,
}

/// Send `cases` over HTTP from `concurrency` connections.
/// With `verify`, each answer must be the OTP's own `OK` line; without, any
/// HTTP 200 counts (for the calibration server).
fn http_load(addr: SocketAddr, concurrency: usize, cases: &[OtpCase], time_limit: Duration, verify: bool) -> (Report, u64) {
    run::over_http(addr, concurrency, cases, Some(time_limit), Duration::from_secs(10), |_| {
        move |conn: &mut Connection, case: &OtpCase| {
            let resp = conn.get(&format!("/wsapi/decrypt?otp={}", case.otp)).map_err(|e| format!("request failed: {e}"))?;
            if resp.head.status != 200 {
                return Err(format!("HTTP {}: {:?}", resp.head.status, String::from_utf8_lossy(&resp.body)));
            }
            if verify {
                ksm_answer::check(&resp.body, &case.expect)
            } else {
                Ok(())
            }
        }
    })
}

fn in_process_load(ksm: &Ksm, concurrency: usize, cases: &[OtpCase], time_limit: Duration) -> Report {
    run::run(concurrency, cases, Some(time_limit), |_| {
        |case: &OtpCase| match ksm.decrypt(&case.otp) {
            Ok(d) if d == case.expect => Ok(()),
            Ok(d) => Err(format!("wrong answer: {}", d.ksm_line())),
            Err(e) => Err(e.to_string()),
        }
    })
}

// ---------------------------------------------------------------------------
// Output

fn print_table(rows: &[Row]) {
    println!();
    println!(
        "{:<14} {:>4} {:>9} {:>7} {:>12} {:>9} {:>9} {:>9} {:>7} {:>8}",
        "target", "c", "requests", "errors", "decrypts/s", "p50 ms", "p99 ms", "max ms", "stalls", "conns"
    );
    for r in rows {
        let s = &r.report.summary;
        let conns = if r.target == Target::OursInProcess { "-".to_owned() } else { r.connects.to_string() };
        println!(
            "{:<14} {:>4} {:>9} {:>7} {:>12.0} {:>9} {:>9} {:>9} {:>7} {:>8}",
            r.target.label(),
            r.concurrency,
            s.requests,
            s.errors,
            s.ok_per_second(),
            ms(s.p50),
            ms(s.p99),
            ms(s.max),
            s.stalls,
            conns
        );
    }
    println!("(stalls: requests over {} ms; conns: TCP connections opened by the client)", STALL.as_millis());
    if rows.iter().any(|r| r.target == Target::LoopbackFloor) {
        println!("(loopback-floor: a do-nothing HTTP server, no decrypt: what this machine allows with this client; answers not checked)");
    }
    for r in rows {
        if r.report.unsent > 0 {
            println!("note: {} c={}: time limit reached, {} requests not sent", r.target.label(), r.concurrency, r.report.unsent);
        }
        for e in &r.report.error_examples {
            println!("error: {} c={}: {e}", r.target.label(), r.concurrency);
        }
    }
}

fn print_ratios(rows: &[Row], levels: &[usize]) {
    let rate = |t: Target, c: usize| rows.iter().find(|r| r.target == t && r.concurrency == c).map(|r| r.report.summary.ok_per_second());
    let mut printed = false;
    for &c in levels {
        let Some(py) = rate(Target::Pyhsm, c).filter(|&p| p > 0.0) else { continue };
        if !printed {
            println!();
            println!("ratio to pyhsm (decrypts/s, same run):");
            printed = true;
        }
        let mut line = format!("  c={c:<3}");
        for (t, name) in [(Target::OursHttp, "ours-http / pyhsm"), (Target::OursInProcess, "ours-inproc / pyhsm")] {
            if let Some(x) = rate(t, c) {
                let _ = write!(line, "  {name} = {:.1}x", x / py);
            }
        }
        println!("{line}");
    }
}

// ---------------------------------------------------------------------------
// Throughput: three targets, side by side

fn throughput(args: &Args, target: &Path, work_root: &Path, rows: &mut Vec<Row>) -> Result<()> {
    if args.keys == 0 {
        bail!("--keys must be at least 1");
    }
    std::fs::create_dir_all(work_root)?;
    let work = tempfile::Builder::new().prefix("run-").tempdir_in(work_root)?;
    let t = Instant::now();
    let hsm = Arc::new(keystore(&work.path().join("keystore"))?);
    let aead_dir = AeadDir::new(work.path().join("aeads"));
    let typed: KeyHandleDir = KH_TYPED.parse()?;
    let store = AeadStore::open(&work.path().join("aeads.db"))?;
    let mut fleet = Fleet::new();
    let mut batch: Vec<(PublicId, AeadRecord)> = Vec::with_capacity(BATCH);
    for i in 1..=args.keys {
        let id = PublicId::from_number(i, PUBLIC_ID_BYTES)?;
        let (record, secrets) = fleet::provision(hsm.as_ref(), KH, &id)?;
        aead_dir.write(&typed, &id, &record)?;
        batch.push((id, record));
        if batch.len() == BATCH {
            store.put_many(&batch, "ksm-bench", now_unix())?;
            batch.clear();
        }
        fleet.push(id, secrets);
    }
    store.put_many(&batch, "ksm-bench", now_unix())?;
    let keys_json = work.path().join("keys.json");
    std::fs::write(&keys_json, format!("{{\"{}\": \"{}\"}}\n", KH.get(), hex(&HANDLE_KEY)))?;
    println!(
        "provisioned {} YubiKeys under key handle {KH_TYPED} in {:.1}s: pyhsm-layout AEAD directory and SQLite store in {}",
        args.keys,
        t.elapsed().as_secs_f64(),
        work.path().display()
    );

    let ksm = Arc::new(Ksm::new(hsm.clone(), Box::new(store), vec![typed.clone()]));
    let mut opts = ksm::serve::HttpOptions::new(SocketAddr::from(([127, 0, 0, 1], 0)));
    if let Some(n) = args.http_workers {
        opts.workers = n;
    }
    if let Some(n) = args.http_blocking_threads {
        opts.max_blocking_threads = n;
    }
    let (workers, blocking) = (opts.workers, opts.max_blocking_threads);
    let ours = ksm::serve::start(ksm.clone(), opts).context("starting our KSM over HTTP")?;
    let ours_addr = ours.local_addr();
    println!(
        "ours: ksm::serve on http://{ours_addr} (SQLite store, soft keystore, in this process; workers {}, max blocking threads {blocking})",
        if workers == 0 { "= CPUs".to_owned() } else { workers.to_string() }
    );

    let py = match args.pyhsm {
        _ if !args.targets.contains(&Target::Pyhsm) => None,
        PyhsmMode::Off => {
            println!("pyhsm: off (--pyhsm off)");
            None
        }
        mode => match find_pyhsm(args.pyhsm_prefix.as_deref(), target) {
            None if mode == PyhsmMode::Auto => {
                println!("pyhsm: NOT RUN: yhsm-yubikey-ksm not found (looked in --pyhsm-prefix / <target>/pyhsm-py27 and PATH); scripts/bench-ksm.sh installs it");
                None
            }
            None => bail!("pyhsm: yhsm-yubikey-ksm not found; run scripts/bench-ksm.sh, which installs it"),
            Some(p) => match start_pyhsm(&p, &keys_json, aead_dir.base(), &work.path().join("pyhsm.log")) {
                Ok((guard, addr)) => {
                    println!("pyhsm: {} on http://{addr} (soft HSM -D keys.json, AEAD directory, pid {})", p.script.display(), guard.pid());
                    Some((guard, addr))
                }
                Err(e) if mode == PyhsmMode::Auto => {
                    println!("pyhsm: NOT RUN: {e:#}");
                    None
                }
                Err(e) => return Err(e),
            },
        },
    };

    let floor = FloorServer::start()?;
    let limit = Duration::from_secs(args.time_limit_secs);
    let result = (|| -> Result<()> {
        for &c in &args.concurrency {
            for &target in &args.targets {
                let warm = fleet.otps(args.warmup)?;
                let cases = fleet.otps(args.requests_per_level)?;
                let (report, connects) = match target {
                    Target::OursHttp => {
                        http_load(ours_addr, c, &warm, limit, true);
                        http_load(ours_addr, c, &cases, limit, true)
                    }
                    Target::OursInProcess => {
                        in_process_load(&ksm, c, &warm, limit);
                        (in_process_load(&ksm, c, &cases, limit), 0)
                    }
                    Target::Pyhsm => {
                        let Some((_, addr)) = &py else { continue };
                        http_load(*addr, c, &warm, limit, true);
                        http_load(*addr, c, &cases, limit, true)
                    }
                    Target::LoopbackFloor => {
                        http_load(floor.addr, c, &warm, limit, false);
                        http_load(floor.addr, c, &cases, limit, false)
                    }
                    Target::OursServeBig => continue,
                };
                let s = &report.summary;
                eprintln!(
                    "  {:<12} c={c:<3} {:>9.0} decrypts/s  p99 {} ms  errors {}",
                    target.label(),
                    s.ok_per_second(),
                    ms(s.p99),
                    s.errors
                );
                rows.push(Row { target, concurrency: c, report, connects });
            }
        }
        Ok(())
    })();
    ours.shutdown();
    floor.stop();
    if let Some((guard, _)) = py {
        guard.stop();
    }
    result
}

// ---------------------------------------------------------------------------
// Memory of `ksm serve` with a large store

fn memory(args: &Args, work_root: &Path, rows: &mut Vec<Row>) -> Result<()> {
    let n = args.rss_keys;
    let b = BigStore::build_or_reuse(&work_root.join(format!("rss-{n}")), n, PUBLIC_ID_BYTES, KH, PASSWORD, |path| {
        keystore(path).map_err(|e| HarnessError::Other(format!("{e:#}")))
    })?;
    let ksm_bin = match &args.ksm_bin {
        Some(p) => p.clone(),
        None => std::env::current_exe()?.with_file_name("ksm"),
    };
    if !ksm_bin.is_file() {
        bail!("{} not found: build it first (cargo build --release -p ksm) or pass --ksm-bin", ksm_bin.display());
    }

    // OTPs from keys spread over the whole id range, so lookups touch the
    // whole B-tree rather than one hot page.
    let hsm = SoftHsm::open_unlocked(&b.keystore, &Password::new(PASSWORD)?)?;
    let reader = AeadStore::open_existing(&b.store)?;
    let mut fleet = Fleet::new();
    for id in BigStore::spread_ids(n, 10_000, PUBLIC_ID_BYTES)? {
        let record = reader.get(&id, KH)?.with_context(|| format!("{id} missing from the cached store; delete {}", b.dir.display()))?;
        fleet.push(id, fleet::secrets_of(&hsm, &record)?);
    }
    drop(reader);
    let cases = fleet.otps(args.rss_requests)?;

    let addr = free_port()?;
    let log = b.dir.join("serve.log");
    let log_file = std::fs::File::create(&log)?;
    let child = Command::new(&ksm_bin)
        .arg("serve")
        .arg("--keystore")
        .arg(&b.keystore)
        .arg("--password-file")
        .arg(&b.password_file)
        .arg("--store")
        .arg(&b.store)
        .args(["--key-handles", KH_TYPED, "--listen"])
        .arg(addr.to_string())
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(log_file.try_clone()?)
        .stderr(log_file)
        .spawn()
        .with_context(|| format!("starting {} serve", ksm_bin.display()))?;
    let mut guard = ChildGuard::new("ksm serve", child);
    if let Err(e) = guard.wait_listening(addr, Duration::from_secs(30)) {
        bail!("{e}; its output:\n{}", tail(&log, 2000));
    }
    let idle = proc_mem(guard.pid())?;
    let c = args.concurrency.iter().copied().max().unwrap_or(32);
    let (report, connects) = http_load(addr, c, &cases, Duration::from_secs(args.time_limit_secs), true);
    let loaded = proc_mem(guard.pid())?;
    let pid = guard.pid();
    let db_size = std::fs::metadata(&b.store).map(|m| m.len()).unwrap_or(0);
    rows.push(Row { target: Target::OursServeBig, concurrency: c, report, connects });
    guard.stop();
    println!();
    println!(
        "memory: `{} serve` (pid {}) with {n} AEADs in the store ({:.1} MiB on disk)",
        ksm_bin.display(),
        pid,
        db_size as f64 / 1048576.0
    );
    println!("  after start:              VmRSS {:>10}   VmHWM {:>10}", mib(idle.rss_kb), mib(idle.hwm_kb));
    println!(
        "  after {} requests, c={c}: VmRSS {:>10}   VmHWM {:>10}   (target: < 200 MiB)",
        args.rss_requests,
        mib(loaded.rss_kb),
        mib(loaded.hwm_kb)
    );
    Ok(())
}

fn main() -> std::process::ExitCode {
    match bench(&Args::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ksm-bench: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn bench(args: &Args) -> Result<()> {
    if args.concurrency.is_empty() || args.concurrency.contains(&0) {
        bail!("--concurrency needs positive levels, e.g. 1,8,32");
    }
    let target = target_dir()?;
    let work_root = args.work_dir.clone().unwrap_or_else(|| target.join("ksm-bench"));
    std::fs::create_dir_all(&work_root)?;
    let cpus = std::thread::available_parallelism().map_or(0, std::num::NonZero::get);
    if !args.skip_throughput {
        println!(
            "ksm-bench: {} keys, {} requests per level (+{} warm-up), concurrency {:?}, {cpus} CPUs, loopback only",
            args.keys, args.requests_per_level, args.warmup, args.concurrency
        );
    }
    if cfg!(debug_assertions) {
        println!("warning: debug build; run with --release for real figures");
    }
    let mut rows = Vec::new();
    if !args.skip_throughput {
        throughput(args, &target, &work_root, &mut rows)?;
    }
    if args.rss_keys > 0 {
        memory(args, &work_root, &mut rows)?;
    }
    print_table(&rows);
    print_ratios(&rows, &args.concurrency);
    let _ = std::io::stdout().flush();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex() {
        assert_eq!(super::hex(&[0, 0xab, 0x10]), "00ab10");
    }

    #[test]
    fn floor_server_keeps_alive_and_stops() {
        let floor = FloorServer::start().unwrap_or_else(|e| panic!("{e}"));
        let mut c = Connection::new(floor.addr, Duration::from_secs(5));
        for _ in 0..3 {
            let r = c.get("/wsapi/decrypt?otp=x").unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(r.head.status, 200);
            assert!(ksm_answer::parse_ok(&r.body).is_some());
        }
        assert_eq!(c.stats().connects, 1);
        drop(c);
        floor.stop();
    }
}
