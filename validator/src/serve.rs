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
//!
//! **Roles** ([`assemble_node`]): a site serves all of the above; a
//! counters-only witness (`[replication] role = "witness"`) serves only
//! `/health`, `/metrics` and `/status`, and answers every other path 404
//! with a line saying it verifies nothing.
//!
//! **`GET /status`** (text, `key: field=value …` lines, for people and for
//! `validator status`): `node:` (role, site, QUIC address), `quorum:`,
//! `policy:` (fail-closed, or the accept-at-risk window and what is left
//! of it), `verdicts:`, one `peer:` line per other node (name, site, role,
//! address, `state=up|down|unknown`, since, last RTT, replies, failures,
//! requests received, last error), `sync:` (dataset sync, reserved), and
//! `peers:` with the count by state. Without replication, `replication:
//! off` and `peers: total=0 …`.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use httpd::metrics::{answers_by, single, Histogram};
pub use httpd::{HttpOptions, Running};
use httpd::{Method, Rejection, Reply, Request, StatusCode};

use crate::config::Role;
use crate::protocol::{Response, Status, Version};
use crate::replicate::Replication;
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

/// A node of either role, assembled by [`assemble_node`], ready for
/// [`start_node`].
pub struct Assembled {
    role: Role,
    /// The decision; `None` on a witness.
    verifier: Option<Arc<Verifier>>,
    health: Vec<HealthCheck>,
    metrics: Vec<MetricsSource>,
    replication: Replicated,
}

impl std::fmt::Debug for Assembled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Assembled").field("role", &self.role).finish_non_exhaustive()
    }
}

/// What `/status` can say about replication.
enum Replicated {
    /// No `[replication]` section.
    Off,
    /// Running.
    On(Arc<Replication>),
    /// Started from bare [`Parts`], which do not say.
    Unreported,
}

impl From<Parts> for Assembled {
    fn from(parts: Parts) -> Self {
        Self {
            role: Role::Site,
            verifier: Some(parts.verifier),
            health: parts.health,
            metrics: parts.metrics,
            replication: Replicated::Unreported,
        }
    }
}

impl Assembled {
    fn site(parts: Parts, replication: Option<Arc<Replication>>) -> Self {
        let replication = replication.map_or(Replicated::Off, Replicated::On);
        Self { role: Role::Site, verifier: Some(parts.verifier), health: parts.health, metrics: parts.metrics, replication }
    }

    /// The role.
    #[must_use]
    pub fn role(&self) -> Role {
        self.role
    }

    /// The replication node, when there is one.
    #[must_use]
    pub fn replication(&self) -> Option<&Arc<Replication>> {
        match &self.replication {
            Replicated::On(r) => Some(r),
            Replicated::Off | Replicated::Unreported => None,
        }
    }
}

/// Bind `opts.listen` and serve what [`assemble`] built (or bare
/// [`Parts`], whose `/status` cannot report replication).
/// `opts.request_timeout` is the ceiling on every answer.
pub fn start(parts: impl Into<Assembled>, opts: HttpOptions) -> std::io::Result<Running> {
    start_node(parts.into(), opts)
}

/// Bind `opts.listen` and serve a site or a witness.
pub fn start_node(node: Assembled, opts: HttpOptions) -> std::io::Result<Running> {
    let service =
        ValidatorService { node, ceiling: opts.request_timeout, by_status: Default::default(), deadline_missed: AtomicU64::new(0) };
    httpd::start(Arc::new(service), opts)
}

/// What a witness answers on any path but `/health`, `/metrics`, `/status`.
pub const WITNESS_REFUSAL: &str = "this node is a counters-only replication witness: it verifies no OTP (ask a site)";

struct ValidatorService {
    node: Assembled,
    ceiling: Duration,
    by_status: [Histogram; Status::ALL.len()],
    deadline_missed: AtomicU64,
}

impl ValidatorService {
    /// The `/status` page (see the module docs).
    fn status_text(&self) -> String {
        let mut out = String::from("validator status\n");
        match &self.node.replication {
            Replicated::On(r) => r.render_status(&mut out),
            Replicated::Off => {
                let _ = writeln!(out, "node: role={}", self.node.role);
                let _ = writeln!(out, "replication: off (no [replication] section): this site decides alone");
            }
            Replicated::Unreported => {
                let _ = writeln!(out, "node: role={}", self.node.role);
                let _ = writeln!(out, "replication: not reported (served from bare serve::Parts)");
            }
        }
        // Dataset sync: see `Replication::render_sync_status` (SYNC-STATUS).
        match &self.node.replication {
            Replicated::On(r) => r.render_sync_status(&mut out),
            Replicated::Off => {
                let _ = writeln!(out, "sync: off (no replication)");
                let _ = writeln!(out, "peers: total=0 up=0 down=0 unknown=0");
            }
            Replicated::Unreported => {}
        }
        out
    }
}

impl httpd::Handler for ValidatorService {
    const NAME: &'static str = "validator";

    async fn handle(self: Arc<Self>, req: Request) -> Result<Reply, Rejection> {
        if req.path == "/status" {
            if req.method != Method::GET {
                return Err(Rejection::MethodNotAllowed);
            }
            return Ok(Reply::text(StatusCode::OK, self.status_text()));
        }
        let Some(verifier) = self.node.verifier.clone() else {
            return Ok(Reply::line(StatusCode::NOT_FOUND, WITNESS_REFUSAL));
        };
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
            Ok(pairs) => self.verify(&verifier, req.started, pairs, version).await,
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
        httpd::blocking(deadline, move || me.node.health.iter().try_for_each(|check| check()))
            .await
            .unwrap_or_else(|| Err("health check timed out".to_owned()))
    }

    fn metrics(&self, out: &mut String) {
        if self.node.verifier.is_none() {
            for source in &self.node.metrics {
                source(out);
            }
            return;
        }
        answers_by(
            out,
            ("validator_verify_requests_total", "Verify requests answered, by status."),
            ("validator_verify_duration_seconds", "Time from request to answer, by status."),
            "status",
            Status::ALL.iter().map(|s| s.as_str()).zip(&self.by_status),
        );
        single(
            out,
            "validator_deadline_missed_total",
            "counter",
            "Requests answered BACKEND_ERROR because the decision missed its deadline.",
            self.deadline_missed.load(Ordering::Relaxed),
        );
        for source in &self.node.metrics {
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
    async fn verify(
        &self,
        verifier: &Arc<Verifier>,
        started: std::time::Instant,
        pairs: Vec<(String, String)>,
        version: Version,
    ) -> Response {
        let checked = match verifier.prepare(&pairs, version, SystemTime::now()) {
            Prepared::Done(r) => return r,
            Prepared::Checked(c) => c,
        };
        // The request's own timeout can only shorten the ceiling.
        let deadline = started + checked.deadline(self.ceiling);
        let verifier = verifier.clone();
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

/// Open everything a site's configuration names (failing closed, see
/// [`assemble_node`]).
pub fn assemble(config: &crate::config::ServeConfig) -> Result<Assembled, String> {
    let (parts, replication) = assemble_site(config, None)?;
    Ok(Assembled::site(parts, replication))
}

/// Open everything a configuration names, by role: for a site, the
/// keystore (unlocked), the client and counter stores, the KSM and the
/// replication node (with its accept-at-risk window); for a witness, the
/// counter store and the replication node only. Fails, saying what, before
/// anything listens.
pub fn assemble_node(config: &crate::config::NodeConfig) -> Result<Assembled, String> {
    use crate::config::NodeConfig;
    match config {
        NodeConfig::Site(site) => {
            let (parts, replication) = assemble_site(&site.serve, site.accept_at_risk_until)?;
            Ok(Assembled::site(parts, replication))
        }
        NodeConfig::Witness(w) => {
            use crate::counters::{CounterOptions, SqliteCounters};
            let counters = Arc::new(
                SqliteCounters::open_with(&w.db, CounterOptions { synchronous: w.synchronous, ..CounterOptions::default() })
                    .map_err(|e| format!("counter store: {e}"))?,
            );
            let c = counters.clone();
            let health: Vec<HealthCheck> = vec![Box::new(move || c.check().map_err(|e| e.to_string()))];
            let c = counters.clone();
            let mut metrics: Vec<MetricsSource> = vec![Box::new(move |out: &mut String| c.render_metrics(out))];
            let r = Arc::new(Replication::start_with(&w.replication, Role::Witness, None, counters, Vec::new())?);
            let m = r.clone();
            metrics.push(Box::new(move |out: &mut String| m.render_metrics(out)));
            Ok(Assembled { role: Role::Witness, verifier: None, health, metrics, replication: Replicated::On(r) })
        }
    }
}

/// A site's parts and its replication node.
fn assemble_site(
    config: &crate::config::ServeConfig,
    accept_at_risk_until: Option<SystemTime>,
) -> Result<(Parts, Option<Arc<Replication>>), String> {
    use hsm::SecurityModule;

    use replication::sync::{Dataset, SyncStore};

    use crate::config::KsmSource;
    use crate::counters::{CounterOptions, SqliteCounters};

    let hsm: Arc<dyn SecurityModule> = config.hsm.open().map_err(|e| format!("security module ({}): {e}", config.hsm))?;
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
            return Err(format!("no key handle in {} may decode OTPs", config.hsm));
        }
        Ok(usable)
    };
    let mut health: Vec<HealthCheck> = Vec::new();
    // What the replication node syncs besides the counters, with the peer
    // sites registered in each store's outbox (the witness holds neither).
    let mut datasets: Vec<(Dataset, Arc<dyn SyncStore>)> = Vec::new();
    let peer_sites: Vec<&str> = config.replication.iter().flat_map(|r| r.peers.iter().map(|p| p.name.as_str())).collect();
    if !peer_sites.is_empty() {
        let sync = clients.sync_store().map_err(|e| format!("API clients: {e}"))?;
        for name in &peer_sites {
            sync.db().add_peer(name).map_err(|e| format!("API clients: registering peer {name:?}: {e}"))?;
        }
        datasets.push((Dataset::CLIENTS, Arc::new(sync)));
    }
    // The in-process KSM over the soft keystore never blocks for long; a
    // token or a serial device may, so their decodes go to the blocking pool.
    let inline_decode =
        matches!(config.hsm, hsm::config::HsmConfig::Soft { .. }) && matches!(config.ksm, KsmSource::Store { .. } | KsmSource::Dir { .. });
    let decoder: Arc<dyn crate::OtpDecoder> = match &config.ksm {
        KsmSource::Store { path, key_handles } => {
            let store = Arc::new(ksm::store::AeadStore::open_existing(path).map_err(|e| e.to_string())?);
            if !peer_sites.is_empty() {
                for name in &peer_sites {
                    store.add_peer(name).map_err(|e| format!("AEAD store: registering peer {name:?}: {e}"))?;
                }
                datasets.push((Dataset::AEADS, Arc::new(crate::aead_sync::AeadSync::new(store.clone()))));
            }
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
        Some(r) => Some(Arc::new(Replication::start_with(r, Role::Site, accept_at_risk_until, counters.clone(), datasets)?)),
        None if accept_at_risk_until.is_some() => {
            return Err("accept_at_risk_until needs a [replication] section".to_owned());
        }
        None => None,
    };
    let mut verifier =
        Verifier::new(Arc::new(clients), decoder, counters, crate::verify::VerifyOptions::default()).with_inline_decode(inline_decode);
    if let Some(r) = &replication {
        let m = r.clone();
        metrics.push(Box::new(move |out: &mut String| m.render_metrics(out)));
        verifier = verifier.with_async_peer_sync(r.clone());
    }
    Ok((Parts { verifier: Arc::new(verifier), health, metrics }, replication))
}
