//! `validator serve`: verify 2.0 over HTTP/1.1, for pam_yubico and ykclient.
//!
//! `GET` and `POST /wsapi/2.0/verify` (and `/wsapi/verify`, protocol 1.x).
//! Every answer is the protocol's body, HTTP 200 whatever the status (as
//! yubikey-val; ykclient ignores the HTTP status anyway), signed with the
//! client's key whenever the `id` resolves.
//!
//! **Bounded answer time.** pam_yubico sets no timeout, so a hung
//! validator hangs sshd. Each request is answered by its deadline: the
//! request's `timeout` parameter, capped by the configured ceiling. The
//! decision (client lookup, KSM, counter compare-and-set) runs on the
//! blocking pool; when the deadline passes first, the answer is a signed
//! `BACKEND_ERROR`. The abandoned work may still finish and record the
//! OTP's counters, which spends the OTP: the user presses the key again.
//! That is the safe side: an OTP is never accepted twice.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use httpd::metrics::{header, Histogram};
pub use httpd::{HttpOptions, Running};
use httpd::{Method, Rejection, Reply, Request, StatusCode};

use crate::protocol::{Response, Status, Version};
use crate::verify::{Checked, Prepared, Verifier};

/// A readiness check: `Err` says what is not ready.
pub type HealthCheck = Box<dyn Fn() -> Result<(), String> + Send + Sync>;
/// A writer of more Prometheus series (the counter store's, say).
pub type MetricsSource = Box<dyn Fn(&mut String) + Send + Sync>;

/// What the service is made of.
pub struct Parts {
    /// The decision.
    pub verifier: Arc<Verifier>,
    /// Readiness checks, run for `/health` on the blocking pool.
    pub health: Vec<HealthCheck>,
    /// Extra series for `/metrics`.
    pub metrics: Vec<MetricsSource>,
}

/// Bind `opts.listen` and serve. `opts.request_timeout` is the ceiling on
/// every answer.
pub fn start(parts: Parts, opts: HttpOptions) -> std::io::Result<Running> {
    let service =
        ValidatorService { parts, ceiling: opts.request_timeout, by_status: Default::default(), deadline_missed: AtomicU64::new(0) };
    httpd::start(Arc::new(service), opts)
}

struct ValidatorService {
    parts: Parts,
    ceiling: Duration,
    by_status: [Histogram; Status::ALL.len()],
    deadline_missed: AtomicU64,
}

impl httpd::Handler for ValidatorService {
    const NAME: &'static str = "validator";

    async fn handle(self: Arc<Self>, req: Request) -> Result<Reply, Rejection> {
        let version = Version::from_path(&req.path).ok_or(Rejection::NotFound)?;
        let form = match req.method {
            Method::GET => req.query.unwrap_or_default(),
            Method::POST => String::from_utf8(req.body.to_vec()).unwrap_or_else(|_| "%".to_owned()),
            _ => return Err(Rejection::MethodNotAllowed),
        };
        let response = match httpd::form::pairs(&form) {
            Ok(pairs) => self.verify(req.started, pairs, version).await,
            // Nothing in a garbled query can be trusted, the id included.
            Err(_) => Response::bare(Status::MissingParameter, SystemTime::now()),
        };
        let status = response.status();
        self.by_status[status_index(status)].observe(req.started.elapsed());
        Ok(Reply::text(StatusCode::OK, response.render()))
    }

    async fn health(self: Arc<Self>) -> Result<(), String> {
        let me = self.clone();
        let deadline = std::time::Instant::now() + self.ceiling;
        httpd::blocking(deadline, move || me.parts.health.iter().try_for_each(|check| check()))
            .await
            .unwrap_or_else(|| Err("health check timed out".to_owned()))
    }

    fn metrics(&self, out: &mut String) {
        header(out, "validator_verify_requests_total", "counter", "Verify requests answered, by status.");
        for (s, h) in Status::ALL.iter().zip(&self.by_status) {
            let _ = writeln!(out, "validator_verify_requests_total{{status=\"{}\"}} {}", s.as_str(), h.count());
        }
        header(out, "validator_verify_duration_seconds", "histogram", "Time from request to answer, by status.");
        for (s, h) in Status::ALL.iter().zip(&self.by_status) {
            h.render(out, "validator_verify_duration_seconds", &format!("status=\"{}\"", s.as_str()));
        }
        header(
            out,
            "validator_deadline_missed_total",
            "counter",
            "Requests answered BACKEND_ERROR because the decision missed its deadline.",
        );
        let _ = writeln!(out, "validator_deadline_missed_total {}", self.deadline_missed.load(Ordering::Relaxed));
        for source in &self.parts.metrics {
            source(out);
        }
    }
}

fn status_index(s: Status) -> usize {
    Status::ALL.iter().position(|x| *x == s).unwrap_or(0)
}

impl ValidatorService {
    /// Decide on the blocking pool, answering by the deadline whatever the
    /// KSM, module or database do.
    async fn verify(&self, started: std::time::Instant, pairs: Vec<(String, String)>, version: Version) -> Response {
        // The request's own timeout can only shorten the ceiling. It is read
        // here, before the blocking work, so the wait can be bounded by it.
        let asked = crate::protocol::parse_request(&pairs, version).ok().and_then(|r| r.timeout());
        let deadline = started + asked.map_or(self.ceiling, |t| t.min(self.ceiling));
        // What the blocking side has checked so far: enough to sign a
        // BACKEND_ERROR with the client's key if the deadline passes.
        let checked: Arc<Mutex<Option<Checked>>> = Arc::default();
        let slot = checked.clone();
        let verifier = self.parts.verifier.clone();
        let decided = httpd::blocking(deadline, move || match verifier.prepare(&pairs, version, SystemTime::now()) {
            Prepared::Done(r) => r,
            Prepared::Checked(c) => {
                if let Ok(mut s) = slot.lock() {
                    *s = Some(c.clone());
                }
                verifier.complete(&c, SystemTime::now())
            }
        })
        .await;
        decided.unwrap_or_else(|| {
            self.deadline_missed.fetch_add(1, Ordering::Relaxed);
            tracing::error!(
                waited_ms = started.elapsed().as_millis(),
                "verify missed its deadline: KSM, security module or database too slow; answering BACKEND_ERROR"
            );
            let now = SystemTime::now();
            match checked.lock().ok().and_then(|c| c.clone()) {
                Some(c) => c.backend_error(now),
                None => Response::bare(Status::BackendError, now),
            }
        })
    }
}

/// Open everything a configuration names: the keystore (unlocked), the
/// client and counter stores, the KSM. Fails, saying what, before anything
/// listens.
pub fn assemble(config: &crate::config::ServeConfig) -> Result<Parts, String> {
    use hsm::SecurityModule;

    use crate::config::KsmSource;
    use crate::counters::{CounterOptions, SqliteCounters};

    let keystore = hsm::cli::KeystoreArgs { keystore: config.keystore.clone(), password_file: config.password_file.clone() };
    let hsm: Arc<hsm::soft::SoftHsm> = Arc::new(keystore.open().map_err(|e| format!("security module: {e}"))?);
    let clients = crate::clients::SqliteClients::open(&config.db, hsm.clone()).map_err(|e| format!("API clients: {e}"))?;
    let counters = Arc::new(
        SqliteCounters::open_with(&config.db, CounterOptions { synchronous: config.synchronous, ..CounterOptions::default() })
            .map_err(|e| format!("counter store: {e}"))?,
    );
    let decode_handles = |given: &[ksm::aead_dir::KeyHandleDir]| -> Result<Vec<ksm::aead_dir::KeyHandleDir>, String> {
        if !given.is_empty() {
            return Ok(given.to_vec());
        }
        let all = hsm.key_handles().map_err(|e| format!("security module: {e}"))?;
        let usable: Vec<_> = all.iter().filter(|h| h.flags.contains(hsm::Flags::OTP_DECODE)).map(|h| h.key_handle.into()).collect();
        if usable.is_empty() {
            return Err(format!("no key handle in {} may decode OTPs", config.keystore.display()));
        }
        Ok(usable)
    };
    let mut health: Vec<HealthCheck> = Vec::new();
    let decoder: Arc<dyn crate::OtpDecoder> = match &config.ksm {
        KsmSource::Store { path, key_handles } => {
            let store = ksm::store::AeadStore::open_existing(path).map_err(|e| e.to_string())?;
            let k = Arc::new(ksm::Ksm::new(hsm.clone(), Box::new(store), decode_handles(key_handles)?));
            let h = k.clone();
            health.push(Box::new(move || h.health()));
            k
        }
        KsmSource::Dir { path, key_handles } => {
            let k = Arc::new(ksm::Ksm::new(hsm.clone(), Box::new(ksm::aead_dir::AeadDir::new(path)), decode_handles(key_handles)?));
            let h = k.clone();
            health.push(Box::new(move || h.health()));
            k
        }
        KsmSource::Remote { urls, timeout } => Arc::new(crate::remote_ksm::RemoteKsm::new(urls, *timeout)?),
    };
    let c = counters.clone();
    health.push(Box::new(move || c.check().map_err(|e| e.to_string())));
    let c = counters.clone();
    let metrics: Vec<MetricsSource> = vec![Box::new(move |out: &mut String| c.render_metrics(out))];
    let verifier = Verifier::new(Arc::new(clients), decoder, counters, crate::verify::VerifyOptions::default());
    Ok(Parts { verifier: Arc::new(verifier), health, metrics })
}
