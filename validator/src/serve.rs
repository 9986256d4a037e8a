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
//! request is checked on the async worker (parsing, the in-memory client
//! lookup, the HMAC); the decision (KSM, module, counter compare-and-set)
//! runs on the blocking pool; when the deadline passes first, the answer is
//! a `BACKEND_ERROR` signed with the client's key. The abandoned work may still finish and record the
//! OTP's counters, which spends the OTP: the user presses the key again.
//! That is the safe side: an OTP is never accepted twice.
//!
//! **Replication** (`[replication]`, see [`crate::replicate`]): after the
//! local compare-and-set accepts an OTP, the replication node's verdict is
//! awaited under the same deadline: `OK` with its `sl`, `REPLAYED_OTP`,
//! `NOT_ENOUGH_ANSWERS`, or `OK` (logged, counted) when accepted at risk.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use httpd::metrics::{header, Histogram};
pub use httpd::{HttpOptions, Running};
use httpd::{Method, Rejection, Reply, Request, StatusCode};

use crate::protocol::{Response, Status, Version};
use crate::verify::{Prepared, Verifier};

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
        // As yubikey-val: the query string, or the form body when the query
        // is empty.
        let form = match (req.method, req.query) {
            (Method::GET, q) => q.unwrap_or_default(),
            (Method::POST, Some(q)) if !q.is_empty() => q,
            (Method::POST, _) => String::from_utf8(req.body.to_vec()).unwrap_or_else(|_| "%".to_owned()),
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
    /// Check the request here (parsing, an in-memory client lookup, the
    /// HMAC: microseconds), then decide on the blocking pool (KSM, module,
    /// counter store), answering by the deadline whatever those do. Once
    /// the client is known, even a missed deadline is signed with its key.
    async fn verify(&self, started: std::time::Instant, pairs: Vec<(String, String)>, version: Version) -> Response {
        let checked = match self.parts.verifier.prepare(&pairs, version, SystemTime::now()) {
            Prepared::Done(r) => return r,
            Prepared::Checked(c) => c,
        };
        // The request's own timeout can only shorten the ceiling.
        let deadline = started + checked.deadline(self.ceiling);
        let verifier = self.parts.verifier.clone();
        let missed = || {
            self.deadline_missed.fetch_add(1, Ordering::Relaxed);
            tracing::error!(
                waited_ms = started.elapsed().as_millis(),
                "verify missed its deadline: KSM, security module or database too slow; answering BACKEND_ERROR"
            );
            checked.backend_error(SystemTime::now())
        };
        // The KSM: in place when it cannot block (the soft keystore), else
        // on the blocking pool under the deadline.
        let decoded = if verifier.inline_decode() {
            verifier.decode(&checked, SystemTime::now())
        } else {
            let (v, job) = (verifier.clone(), checked.clone());
            match httpd::blocking(deadline, move || v.decode(&job, SystemTime::now())).await {
                Some(d) => d,
                None => return missed(),
            }
        };
        let decoded = match decoded {
            Ok(d) => d,
            Err(r) => return checked.sign(r),
        };
        // The compare-and-set: the counter writer answers this task after
        // its COMMIT; no thread waits through the fsync.
        let cas = verifier.counter_store().compare_and_set_async(&decoded.update);
        let cas = match tokio::time::timeout_at(deadline.into(), cas).await {
            Ok(cas) => cas,
            Err(_) => return missed(),
        };
        // Replication: once the local store accepted the OTP, await the
        // quorum's verdict under the same deadline.
        match (&cas, verifier.async_peer_sync()) {
            (Ok(crate::CasOutcome::Accepted), Some(peers)) => {
                let level = verifier.sync_level(&checked);
                let verdict = peers.submit(&decoded.update, level, checked.timeout());
                match tokio::time::timeout_at(deadline.into(), verdict).await {
                    Ok(synced) => checked.sign(verifier.conclude_synced(&checked, &decoded, Ok(synced), SystemTime::now())),
                    Err(_) => missed(),
                }
            }
            _ => checked.sign(verifier.conclude(&checked, &decoded, cas, SystemTime::now())),
        }
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
    // The in-process KSM over the soft keystore never blocks for long.
    let inline_decode = matches!(config.ksm, KsmSource::Store { .. } | KsmSource::Dir { .. });
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
    let mut metrics: Vec<MetricsSource> = vec![Box::new(move |out: &mut String| c.render_metrics(out))];
    let replication = match &config.replication {
        Some(r) => Some(Arc::new(crate::replicate::Replication::start(r, counters.clone())?)),
        None => None,
    };
    let mut verifier =
        Verifier::new(Arc::new(clients), decoder, counters, crate::verify::VerifyOptions::default()).with_inline_decode(inline_decode);
    if let Some(r) = replication {
        let m = r.clone();
        metrics.push(Box::new(move |out: &mut String| m.render_metrics(out)));
        verifier = verifier.with_async_peer_sync(r);
    }
    Ok(Parts { verifier: Arc::new(verifier), health, metrics })
}
