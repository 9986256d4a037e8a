//! Plumbing shared by the benchmark binaries: where the cargo target
//! directory is, child processes that cannot outlive the benchmark, free
//! loopback ports, `/proc` memory figures, and a large cached AEAD store.

use std::io::{BufRead as _, BufReader, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStderr, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

use hsm::soft::SoftHsm;
use hsm::{NonceSource, SecurityModule};
use ksm::store::AeadStore;
use otp::{KeyHandle, PublicId};

/// A benchmark's plumbing failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HarnessError {
    /// A file, process or socket operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// Why it failed.
        source: std::io::Error,
    },
    /// The security module refused or failed.
    #[error("security module: {0}")]
    Hsm(#[from] hsm::Error),
    /// The AEAD store failed.
    #[error("AEAD store: {0}")]
    Store(#[from] ksm::LookupError),
    /// A public id was malformed.
    #[error("{0}")]
    Otp(#[from] otp::Error),
    /// Anything else, said in words.
    #[error("{0}")]
    Other(String),
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> HarnessError {
    let context = context.into();
    move |source| HarnessError::Io { context, source }
}

/// `<target>` from the running binary's location (`<target>/release/<bin>`).
pub fn target_dir() -> Result<PathBuf, HarnessError> {
    let exe = std::env::current_exe().map_err(io("locating the running binary"))?;
    exe.parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .ok_or_else(|| HarnessError::Other(format!("{} is not inside a cargo target directory", exe.display())))
}

/// Seconds since the Unix epoch (0 before it).
#[must_use]
pub fn now_unix() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(0))
}

/// A free loopback port (bound, read and released; a tiny race is accepted).
pub fn free_port() -> Result<SocketAddr, HarnessError> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(io("binding 127.0.0.1:0"))?;
    l.local_addr().map_err(io("reading a bound address"))
}

/// The last `bytes` of a text file (at a character boundary), trimmed;
/// empty if it cannot be read. For showing a child's log in an error.
#[must_use]
pub fn tail(path: &Path, bytes: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let start = text.len().saturating_sub(bytes);
    let start = (start..text.len()).find(|&i| text.is_char_boundary(i)).unwrap_or(text.len());
    text[start..].trim().to_owned()
}

/// A child process killed (and reaped) when dropped, on every exit path.
#[derive(Debug)]
pub struct ChildGuard {
    name: &'static str,
    child: Child,
}

impl ChildGuard {
    /// Guard `child`; `name` is used in messages.
    #[must_use]
    pub fn new(name: &'static str, child: Child) -> Self {
        Self { name, child }
    }

    /// The process id.
    #[must_use]
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Has the child exited? `Err` (with its status) if so.
    pub fn check_running(&mut self) -> Result<(), HarnessError> {
        match self.child.try_wait().map_err(io(format!("waiting for {}", self.name)))? {
            Some(status) => Err(HarnessError::Other(format!("{} exited ({status})", self.name))),
            None => Ok(()),
        }
    }

    /// Wait until `addr` accepts connections, or the child dies, or `limit`.
    pub fn wait_listening(&mut self, addr: SocketAddr, limit: Duration) -> Result<(), HarnessError> {
        let start = Instant::now();
        loop {
            self.check_running()?;
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            if start.elapsed() > limit {
                return Err(HarnessError::Other(format!("{} did not listen on {addr} within {limit:?}", self.name)));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Wait for the first line from [`tee_lines`] for which `find` gives a
    /// value, while the child runs, for at most `limit`.
    pub fn wait_for_line<T>(
        &mut self,
        lines: &Receiver<String>,
        limit: Duration,
        find: impl Fn(&str) -> Option<T>,
    ) -> Result<T, HarnessError> {
        let start = Instant::now();
        loop {
            match lines.recv_timeout(Duration::from_millis(50)) {
                Ok(line) => {
                    if let Some(found) = find(&line) {
                        return Ok(found);
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    self.check_running()?;
                    return Err(HarnessError::Other(format!("{} closed its output without the expected line", self.name)));
                }
            }
            self.check_running()?;
            if start.elapsed() > limit {
                return Err(HarnessError::Other(format!("{}: the expected line did not come within {limit:?}", self.name)));
            }
        }
    }

    /// Ask politely (SIGTERM), then insist.
    pub fn stop(mut self) {
        let _ = Command::new("kill").arg("-TERM").arg(self.pid().to_string()).stderr(Stdio::null()).status();
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(3) {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // Drop kills.
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// The address in the line `validator serve` (or `ksm serve`) prints once
/// it listens: `… serving http://ADDR/…`.
#[must_use]
pub fn serving_addr(line: &str) -> Option<SocketAddr> {
    let rest = line.split("serving http://").nth(1)?;
    rest.split('/').next()?.parse().ok()
}

/// Spawn `command` (a `serve`), its standard error copied to `log`, and
/// wait for its "serving http://ADDR" line: the guarded child and ADDR.
/// On failure the error carries the end of its output.
pub fn spawn_serving(
    name: &'static str,
    mut command: Command,
    log: &Path,
    limit: Duration,
) -> Result<(ChildGuard, SocketAddr), HarnessError> {
    let mut child =
        command.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().map_err(io(format!("starting {name}")))?;
    let stderr = child.stderr.take().ok_or_else(|| HarnessError::Other(format!("{name}: no stderr pipe")))?;
    let mut guard = ChildGuard::new(name, child);
    let lines = tee_lines(stderr, log)?;
    match guard.wait_for_line(&lines, limit, serving_addr) {
        Ok(addr) => Ok((guard, addr)),
        Err(e) => {
            drop(guard);
            std::thread::sleep(Duration::from_millis(100));
            Err(HarnessError::Other(format!("{e}; its output:\n{}", tail(log, 2000))))
        }
    }
}

/// Copy a child's standard error, line by line, into `log` and into the
/// returned channel (which may be dropped once the wanted line came), on a
/// background thread that ends with the child's output.
pub fn tee_lines(stderr: ChildStderr, log: &Path) -> Result<Receiver<String>, HarnessError> {
    let mut file = std::fs::File::create(log).map_err(io(format!("creating {}", log.display())))?;
    let (tx, rx) = mpsc::channel();
    std::thread::Builder::new()
        .name("child-stderr".to_owned())
        .spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { return };
                let _ = writeln!(file, "{line}");
                let _ = tx.send(line);
            }
        })
        .map_err(io("starting a log thread"))?;
    Ok(rx)
}

/// Resident memory of a process, from `/proc/<pid>/status`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Mem {
    /// `VmRSS`, KiB.
    pub rss_kb: u64,
    /// `VmHWM` (peak resident set), KiB.
    pub hwm_kb: u64,
}

/// Read [`Mem`] of `pid`.
pub fn proc_mem(pid: u32) -> Result<Mem, HarnessError> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).map_err(io(path))?;
    Ok(parse_proc_status(&status))
}

/// CPU time (user + system) `pid` has used, from `/proc/<pid>/stat`
/// (clock ticks of 10 ms, the Linux default `USER_HZ`).
pub fn proc_cpu(pid: u32) -> Result<Duration, HarnessError> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).map_err(io(path.clone()))?;
    parse_proc_stat(&stat).ok_or_else(|| HarnessError::Other(format!("{path}: unexpected format")))
}

/// User + system CPU time from the text of a `/proc/<pid>/stat` file.
#[must_use]
pub fn parse_proc_stat(stat: &str) -> Option<Duration> {
    // The command name (field 2) is in parentheses and may hold spaces:
    // count the fields after its closing one (utime and stime are 14, 15).
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(Duration::from_millis((utime + stime) * 10))
}

/// [`Mem`] from the text of a `/proc/<pid>/status` file (missing fields: 0).
#[must_use]
pub fn parse_proc_status(status: &str) -> Mem {
    let field = |name: &str| -> Option<u64> {
        status.lines().find_map(|l| l.strip_prefix(name)).and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
    };
    Mem { rss_kb: field("VmRSS:").unwrap_or(0), hwm_kb: field("VmHWM:").unwrap_or(0) }
}

/// KiB as `12.3 MiB`.
#[must_use]
pub fn mib(kb: u64) -> String {
    format!("{:.1} MiB", kb as f64 / 1024.0)
}

/// Rows per transaction when filling a store.
pub const STORE_BATCH: usize = 10_000;

/// A keystore and an AEAD store of many YubiKeys, cached on disk.
#[derive(Clone, Debug)]
pub struct BigStore {
    /// The cache directory.
    pub dir: PathBuf,
    /// The keystore file.
    pub keystore: PathBuf,
    /// A file holding its password.
    pub password_file: PathBuf,
    /// The SQLite AEAD store.
    pub store: PathBuf,
}

impl BigStore {
    /// Reuse `dir` if a complete build of `n` AEADs is there; otherwise
    /// (re)build it: `make_keystore(path)` creates the keystore with a
    /// handle `kh` that may generate, then `n` AEADs for public ids
    /// `1..=n` (`id_bytes` long) are generated in the module and stored.
    /// A `complete` marker is written last, so an interrupted build is
    /// redone. `password` goes to [`Self::password_file`].
    pub fn build_or_reuse(
        dir: &Path,
        n: u64,
        id_bytes: usize,
        kh: KeyHandle,
        password: &str,
        make_keystore: impl FnOnce(&Path) -> Result<SoftHsm, HarnessError>,
    ) -> Result<Self, HarnessError> {
        let b = Self {
            keystore: dir.join("keystore"),
            password_file: dir.join("password"),
            store: dir.join("aeads.db"),
            dir: dir.to_path_buf(),
        };
        let marker = dir.join("complete");
        if std::fs::read_to_string(&marker).is_ok_and(|m| m.trim() == n.to_string()) {
            println!("memory: reusing the cached store of {n} AEADs in {}", dir.display());
            return Ok(b);
        }
        if dir.exists() {
            std::fs::remove_dir_all(dir).map_err(io(format!("removing {}", dir.display())))?;
        }
        std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
        std::fs::write(&b.password_file, password).map_err(io("writing the password file"))?;
        let hsm = make_keystore(&b.keystore)?;
        let store = AeadStore::open(&b.store)?;
        let t = Instant::now();
        let mut batch = Vec::with_capacity(STORE_BATCH);
        for i in 1..=n {
            let id = PublicId::from_number(i, id_bytes)?;
            let record = hsm
                .generate_yubikey_aeads(&[kh], NonceSource::Given(id.aead_nonce()?))?
                .into_iter()
                .next()
                .ok_or_else(|| HarnessError::Other("the security module returned no AEAD".to_owned()))?;
            batch.push((id, record));
            if batch.len() == STORE_BATCH || i == n {
                store.put_many(&batch, "bench", now_unix())?;
                batch.clear();
            }
            if i % 100_000 == 0 {
                eprintln!("  memory: {i}/{n} AEADs stored ({:.0}s)", t.elapsed().as_secs_f64());
            }
        }
        drop(store);
        std::fs::write(&marker, format!("{n}\n")).map_err(io("writing the completion marker"))?;
        println!("memory: built a store of {n} AEADs in {:.1}s ({})", t.elapsed().as_secs_f64(), dir.display());
        Ok(b)
    }

    /// `n` public ids spread evenly over `1..=total`, so that lookups touch
    /// the whole B-tree rather than one hot page.
    pub fn spread_ids(total: u64, n: u64, id_bytes: usize) -> Result<Vec<PublicId>, HarnessError> {
        let n = n.min(total);
        (0..n).map(|k| Ok(PublicId::from_number(1 + k * total / n, id_bytes)?)).collect()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    use hsm::soft::format::KdfParams;
    use hsm::{Flags, Password};
    use otp::HandleKey;

    #[test]
    fn mib_and_proc_status() {
        assert_eq!(mib(2048), "2.0 MiB");
        let m = parse_proc_status("Name:\tx\nVmHWM:\t  1234 kB\nVmRSS:\t   999 kB\n");
        assert_eq!(m, Mem { rss_kb: 999, hwm_kb: 1234 });
        assert_eq!(parse_proc_status(""), Mem::default());
        let own = proc_mem(std::process::id()).unwrap();
        assert!(own.rss_kb > 0 && own.hwm_kb >= own.rss_kb, "{own:?}");
    }

    #[test]
    fn cpu_from_proc_stat() {
        let stat = "4242 (validator serve) S 1 4242 4242 0 -1 4194560 1234 0 0 0 150 25 0 0 20 0 9 0 100 0 0";
        assert_eq!(parse_proc_stat(stat), Some(Duration::from_millis(1750)));
        assert_eq!(parse_proc_stat("garbage"), None);
    }

    #[test]
    fn serving_line() {
        assert_eq!(
            serving_addr("validator: serving http://127.0.0.1:4567/wsapi/2.0/verify"),
            Some(SocketAddr::from(([127, 0, 0, 1], 4567)))
        );
        assert_eq!(serving_addr("validator: listening"), None);
    }

    #[test]
    fn tail_is_char_safe() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("log");
        std::fs::write(&p, "ééé\nend\n").unwrap();
        assert_eq!(tail(&p, 6), "end");
        assert_eq!(tail(&dir.path().join("missing"), 10), "");
    }

    #[test]
    fn child_lines_and_exit() {
        let dir = tempfile::tempdir().unwrap();
        let mut child =
            Command::new("sh").args(["-c", "echo one >&2; echo 'serving at 42' >&2; sleep 5"]).stderr(Stdio::piped()).spawn().unwrap();
        let stderr = child.stderr.take().unwrap();
        let mut guard = ChildGuard::new("sh", child);
        let lines = tee_lines(stderr, &dir.path().join("log")).unwrap();
        let n: u32 = guard.wait_for_line(&lines, Duration::from_secs(5), |l| l.strip_prefix("serving at ")?.parse().ok()).unwrap();
        assert_eq!(n, 42);
        guard.check_running().unwrap();
        guard.stop();
        assert!(std::fs::read_to_string(dir.path().join("log")).unwrap().starts_with("one\n"));

        // A child that exits without the line is reported, not waited for.
        let mut child = Command::new("sh").args(["-c", "echo nothing >&2"]).stderr(Stdio::piped()).spawn().unwrap();
        let stderr = child.stderr.take().unwrap();
        let mut guard = ChildGuard::new("sh", child);
        let lines = tee_lines(stderr, &dir.path().join("log2")).unwrap();
        let started = Instant::now();
        assert!(guard.wait_for_line(&lines, Duration::from_secs(10), |_| None::<()>).is_err());
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn big_store_is_built_once() {
        let dir = tempfile::tempdir().unwrap();
        let kh = KeyHandle::new(1);
        let make = |p: &Path| -> Result<SoftHsm, HarnessError> {
            let hsm = SoftHsm::create(p, &Password::new("pw").unwrap(), KdfParams::INSECURE_FOR_TESTS)?;
            hsm.import_handles(&[(kh, Flags::PERSONALIZER | Flags::OTP_DECODE, HandleKey::new(&[7; 32])?)])?;
            Ok(hsm)
        };
        let cache = dir.path().join("rss-5");
        let b = BigStore::build_or_reuse(&cache, 5, 6, kh, "pw", make).unwrap();
        let ids = BigStore::spread_ids(5, 10, 6).unwrap();
        assert_eq!(ids.len(), 5);
        let store = AeadStore::open_existing(&b.store).unwrap();
        for id in &ids {
            assert!(store.get(id, kh).unwrap().is_some(), "{id}");
        }
        drop(store);
        // The second call reuses the cache and does not make a keystore.
        BigStore::build_or_reuse(&cache, 5, 6, kh, "pw", |_| Err(HarnessError::Other("rebuilt".to_owned()))).unwrap();
        assert_eq!(
            BigStore::spread_ids(1_000_000, 4, 6).unwrap(),
            [1, 250_001, 500_001, 750_001].map(|n| PublicId::from_number(n, 6).unwrap())
        );
    }
}
