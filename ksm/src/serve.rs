//! `ksm serve`: Yubico's KSM decryption protocol over HTTP/1.1.
//!
//! `GET /wsapi/decrypt?otp=OTP` (pyhsm's URL), `GET /wsapi/decrypt/?otp=OTP`
//! and `POST /wsapi/decrypt/` with a form body `otp=OTP` (yubikey-ksm's)
//! answer one line plus a newline: `OK counter=… low=… high=… use=…` or an
//! `ERR …` line from [`KsmError`]. Verdicts on the OTP are HTTP 200, as both
//! Yubico KSMs answer; failures of the appliance (security module, AEAD
//! store, deadline) are HTTP 503 with `ERR Backend error`,
//! `ERR Database error` or `ERR Corrupt AEAD`, and a log line.
//!
//! `GET /health` is 200 when the security module is ready and the AEAD
//! store answers, 503 otherwise. `GET /metrics` is Prometheus text.
//!
//! Connections are served by tokio's multi-threaded runtime; every decrypt
//! (a blocking security-module call and an AEAD-store read) runs on the
//! blocking pool, under a deadline. Request lines and headers are bounded
//! by hyper's buffer limit and a header-read timeout, queries and bodies by
//! [`MAX_QUERY_BYTES`] and [`MAX_BODY_BYTES`].

use std::convert::Infallible;
use std::fmt::Write as _;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::sync::{oneshot, Semaphore};

use crate::metrics::{header, Histogram};
use crate::{Ksm, KsmError};

/// Longest accepted request target (path and query). An OTP is at most 48
/// characters; anything near this limit is not a KSM request.
pub const MAX_QUERY_BYTES: usize = 1024;
/// Longest accepted request body (`otp=` form posts).
pub const MAX_BODY_BYTES: usize = 1024;

/// How the HTTP service runs.
#[derive(Clone, Debug)]
pub struct HttpOptions {
    /// Address to listen on (default `127.0.0.1:8002`, as pyhsm's KSM).
    pub listen: SocketAddr,
    /// Deadline for a whole request, from its headers to its answer.
    pub request_timeout: Duration,
    /// Async worker threads; 0 means one per CPU.
    pub workers: usize,
    /// Threads for blocking security-module calls.
    pub max_blocking_threads: usize,
    /// Open connections served at once; more wait in the listen queue.
    pub max_connections: usize,
}

impl Default for HttpOptions {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8002)),
            request_timeout: Duration::from_secs(5),
            workers: 0,
            max_blocking_threads: 64,
            max_connections: 4096,
        }
    }
}

/// What a decrypt request came to, for metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    Ok,
    NoOtp,
    InvalidFormat,
    UnknownYubikey,
    CorruptOtp,
    CorruptAead,
    DatabaseError,
    BackendError,
    Timeout,
}

impl Outcome {
    const ALL: [Self; 9] = [
        Self::Ok,
        Self::NoOtp,
        Self::InvalidFormat,
        Self::UnknownYubikey,
        Self::CorruptOtp,
        Self::CorruptAead,
        Self::DatabaseError,
        Self::BackendError,
        Self::Timeout,
    ];

    fn label(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::NoOtp => "no_otp",
            Self::InvalidFormat => "invalid_format",
            Self::UnknownYubikey => "unknown_yubikey",
            Self::CorruptOtp => "corrupt_otp",
            Self::CorruptAead => "corrupt_aead",
            Self::DatabaseError => "database_error",
            Self::BackendError => "backend_error",
            Self::Timeout => "timeout",
        }
    }

    fn of(e: &KsmError) -> Self {
        match e {
            KsmError::NoOtp => Self::NoOtp,
            KsmError::InvalidFormat(_) => Self::InvalidFormat,
            KsmError::UnknownYubikey(_) => Self::UnknownYubikey,
            KsmError::CorruptOtp(_) => Self::CorruptOtp,
            KsmError::CorruptAead(_) => Self::CorruptAead,
            KsmError::Database(_) => Self::DatabaseError,
            KsmError::Backend(_) => Self::BackendError,
        }
    }

    fn index(self) -> usize {
        Self::ALL.iter().position(|o| *o == self).unwrap_or(0)
    }
}

/// Requests refused before they reached the KSM.
#[derive(Clone, Copy, Debug)]
enum Rejected {
    NotFound,
    Method,
    TooLarge,
    BadBody,
}

impl Rejected {
    const ALL: [Self; 4] = [Self::NotFound, Self::Method, Self::TooLarge, Self::BadBody];

    fn label(self) -> &'static str {
        match self {
            Self::NotFound => "not_found",
            Self::Method => "method_not_allowed",
            Self::TooLarge => "too_large",
            Self::BadBody => "bad_body",
        }
    }
}

#[derive(Default)]
struct Metrics {
    decrypts: [Histogram; Outcome::ALL.len()],
    rejected: [AtomicU64; Rejected::ALL.len()],
    connections: AtomicU64,
    open_connections: AtomicU64,
}

struct Shared {
    ksm: Arc<Ksm>,
    opts: HttpOptions,
    metrics: Metrics,
}

/// A running service; dropping it without [`Running::shutdown`] leaves it
/// running until the process ends.
pub struct Running {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Running {
    /// The address actually bound (useful with port 0).
    #[must_use]
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stop accepting, give open requests a moment, and stop.
    pub fn shutdown(mut self) {
        self.stop_and_join();
    }

    /// Serve until SIGINT or SIGTERM, then stop.
    pub fn wait_for_signal(mut self) -> io::Result<()> {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        rt.block_on(async {
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
            tokio::select! {
                r = tokio::signal::ctrl_c() => r?,
                _ = term.recv() => {}
            }
            Ok::<(), io::Error>(())
        })?;
        tracing::info!("signal received, shutting down");
        self.stop_and_join();
        Ok(())
    }

    fn stop_and_join(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Bind `opts.listen` and serve `ksm` on background threads.
///
/// Errors (address in use, no permission) are returned here, before any
/// thread is started.
pub fn start(ksm: Arc<Ksm>, opts: HttpOptions) -> io::Result<Running> {
    let workers = if opts.workers == 0 { std::thread::available_parallelism().map_or(2, std::num::NonZero::get) } else { opts.workers };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .max_blocking_threads(opts.max_blocking_threads.max(1))
        .thread_name("ksm-http")
        .enable_all()
        .build()?;
    let listener = rt.block_on(async {
        let socket = if opts.listen.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
        socket.set_reuseaddr(true)?;
        socket.set_nodelay(true)?;
        socket.bind(opts.listen)?;
        socket.listen(1024)
    })?;
    let addr = listener.local_addr()?;
    let (stop_tx, stop_rx) = oneshot::channel();
    let shared = Arc::new(Shared { ksm, opts, metrics: Metrics::default() });
    tracing::info!(%addr, workers, "KSM listening");
    let thread = std::thread::Builder::new().name("ksm-accept".to_owned()).spawn(move || {
        rt.block_on(accept_loop(listener, shared, stop_rx));
        rt.shutdown_timeout(Duration::from_secs(1));
    })?;
    Ok(Running { addr, stop: Some(stop_tx), thread: Some(thread) })
}

async fn accept_loop(listener: tokio::net::TcpListener, shared: Arc<Shared>, mut stop: oneshot::Receiver<()>) {
    let slots = Arc::new(Semaphore::new(shared.opts.max_connections.max(1)));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else { return };
        let (stream, peer) = tokio::select! {
            _ = &mut stop => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors and the like: back off, keep serving.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let shared = shared.clone();
        tokio::spawn(async move {
            let m = &shared.metrics;
            m.connections.fetch_add(1, Ordering::Relaxed);
            m.open_connections.fetch_add(1, Ordering::Relaxed);
            let service = service_fn(|req| handle(shared.clone(), req));
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(shared.opts.request_timeout)
                .max_buf_size(16 * 1024)
                .serve_connection(TokioIo::new(stream), service);
            if let Err(e) = conn.await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
            m.open_connections.fetch_sub(1, Ordering::Relaxed);
            drop(permit);
        });
    }
}

type Reply = Response<Full<Bytes>>;

fn reply(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Reply {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

fn text(status: StatusCode, line: &str) -> Reply {
    reply(status, "text/plain; charset=utf-8", format!("{line}\n"))
}

fn reject(shared: &Shared, why: Rejected, status: StatusCode, line: &str) -> Reply {
    shared.metrics.rejected[why as usize].fetch_add(1, Ordering::Relaxed);
    text(status, line)
}

async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Result<Reply, Infallible> {
    let started = Instant::now();
    let target_len = req.uri().path_and_query().map_or(0, |pq| pq.as_str().len());
    if target_len > MAX_QUERY_BYTES {
        return Ok(reject(&shared, Rejected::TooLarge, StatusCode::URI_TOO_LONG, "ERR Invalid OTP format"));
    }
    let path = req.uri().path();
    Ok(match path {
        "/wsapi/decrypt" | "/wsapi/decrypt/" => match *req.method() {
            Method::GET => {
                let otp = req.uri().query().map(|q| form_value(q, "otp"));
                decrypt(&shared, started, otp).await
            }
            Method::POST => match read_form(&shared, req).await {
                Ok(body) => decrypt(&shared, started, Some(form_value(&body, "otp"))).await,
                Err(r) => r,
            },
            _ => reject(&shared, Rejected::Method, StatusCode::METHOD_NOT_ALLOWED, "ERR method not allowed"),
        },
        "/health" if req.method() == Method::GET => health(&shared).await,
        "/metrics" if req.method() == Method::GET => metrics(&shared),
        "/health" | "/metrics" => reject(&shared, Rejected::Method, StatusCode::METHOD_NOT_ALLOWED, "method not allowed"),
        _ => reject(&shared, Rejected::NotFound, StatusCode::NOT_FOUND, "not found"),
    })
}

/// A POST body, bounded in size and time.
async fn read_form(shared: &Shared, req: Request<Incoming>) -> Result<String, Reply> {
    let body = Limited::new(req.into_body(), MAX_BODY_BYTES);
    match tokio::time::timeout(shared.opts.request_timeout, body.collect()).await {
        Ok(Ok(collected)) => String::from_utf8(collected.to_bytes().to_vec())
            .map_err(|_| reject(shared, Rejected::BadBody, StatusCode::BAD_REQUEST, "ERR Invalid OTP format")),
        Ok(Err(_)) => Err(reject(shared, Rejected::TooLarge, StatusCode::PAYLOAD_TOO_LARGE, "ERR Invalid OTP format")),
        Err(_) => Err(reject(shared, Rejected::BadBody, StatusCode::REQUEST_TIMEOUT, "ERR request body too slow")),
    }
}

/// Run one decrypt on the blocking pool under the deadline.
async fn decrypt(shared: &Shared, started: Instant, otp: Option<Result<Option<String>, FormError>>) -> Reply {
    let otp = match otp {
        None | Some(Ok(None)) => String::new(),
        Some(Ok(Some(v))) => v,
        // Malformed escapes or a repeated otp= are no OTP format at all.
        Some(Err(e)) => {
            tracing::info!(error = ?e, "decrypt refused: unreadable otp parameter");
            return finish(shared, started, Outcome::InvalidFormat, StatusCode::OK, "ERR Invalid OTP format");
        }
    };
    let ksm = shared.ksm.clone();
    let job = tokio::task::spawn_blocking(move || ksm.decrypt(&otp));
    let deadline = shared.opts.request_timeout.saturating_sub(started.elapsed());
    match tokio::time::timeout(deadline, job).await {
        Ok(Ok(Ok(decoded))) => finish(shared, started, Outcome::Ok, StatusCode::OK, &decoded.ksm_line()),
        Ok(Ok(Err(e))) => {
            crate::log_failure(&e);
            let status = if e.is_backend_failure() { StatusCode::SERVICE_UNAVAILABLE } else { StatusCode::OK };
            finish(shared, started, Outcome::of(&e), status, &e.to_string())
        }
        Ok(Err(join)) => {
            tracing::error!(error = %join, "decrypt task failed");
            finish(shared, started, Outcome::BackendError, StatusCode::SERVICE_UNAVAILABLE, "ERR Backend error")
        }
        Err(_) => {
            tracing::error!(
                timeout_ms = shared.opts.request_timeout.as_millis(),
                "decrypt missed its deadline: security module or AEAD store too slow"
            );
            finish(shared, started, Outcome::Timeout, StatusCode::SERVICE_UNAVAILABLE, "ERR Backend error")
        }
    }
}

fn finish(shared: &Shared, started: Instant, outcome: Outcome, status: StatusCode, line: &str) -> Reply {
    shared.metrics.decrypts[outcome.index()].observe(started.elapsed());
    text(status, line)
}

async fn health(shared: &Shared) -> Reply {
    let ksm = shared.ksm.clone();
    let job = tokio::task::spawn_blocking(move || ksm.health());
    match tokio::time::timeout(shared.opts.request_timeout, job).await {
        Ok(Ok(Ok(()))) => text(StatusCode::OK, "ok"),
        Ok(Ok(Err(why))) => text(StatusCode::SERVICE_UNAVAILABLE, &format!("not ready: {why}")),
        Ok(Err(_)) => text(StatusCode::SERVICE_UNAVAILABLE, "not ready: health check failed"),
        Err(_) => text(StatusCode::SERVICE_UNAVAILABLE, "not ready: health check timed out"),
    }
}

fn metrics(shared: &Shared) -> Reply {
    let m = &shared.metrics;
    let mut out = String::with_capacity(8 * 1024);
    header(&mut out, "ksm_decrypt_requests_total", "counter", "Decrypt requests answered, by result.");
    for o in Outcome::ALL {
        let _ = writeln!(out, "ksm_decrypt_requests_total{{result=\"{}\"}} {}", o.label(), m.decrypts[o.index()].count());
    }
    header(&mut out, "ksm_decrypt_duration_seconds", "histogram", "Time from request to answer, by result.");
    for o in Outcome::ALL {
        m.decrypts[o.index()].render(&mut out, "ksm_decrypt_duration_seconds", &format!("result=\"{}\"", o.label()));
    }
    header(&mut out, "ksm_http_rejected_total", "counter", "Requests refused before decryption, by reason.");
    for r in Rejected::ALL {
        let _ = writeln!(out, "ksm_http_rejected_total{{reason=\"{}\"}} {}", r.label(), m.rejected[r as usize].load(Ordering::Relaxed));
    }
    header(&mut out, "ksm_http_connections_total", "counter", "Connections accepted.");
    let _ = writeln!(out, "ksm_http_connections_total {}", m.connections.load(Ordering::Relaxed));
    header(&mut out, "ksm_http_open_connections", "gauge", "Connections open now.");
    let _ = writeln!(out, "ksm_http_open_connections {}", m.open_connections.load(Ordering::Relaxed));
    header(&mut out, "ksm_security_module_ready", "gauge", "1 when the security module is ready to decode.");
    let _ = writeln!(out, "ksm_security_module_ready {}", u8::from(shared.ksm.module_status() == hsm::Status::Ready));
    reply(StatusCode::OK, "text/plain; version=0.0.4; charset=utf-8", out)
}

/// A query or form body that cannot be read unambiguously.
#[derive(Debug, PartialEq, Eq)]
enum FormError {
    /// A `%` not followed by two hex digits, or bytes that are not UTF-8.
    Escape,
    /// The key appears more than once.
    Repeated,
}

/// The value of `key` in an `application/x-www-form-urlencoded` string.
fn form_value(form: &str, key: &str) -> Result<Option<String>, FormError> {
    let mut found = None;
    for pair in form.split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        if percent_decode(k)? == key {
            if found.is_some() {
                return Err(FormError::Repeated);
            }
            found = Some(percent_decode(v)?);
        }
    }
    Ok(found)
}

fn percent_decode(s: &str) -> Result<String, FormError> {
    if !s.contains(['%', '+']) {
        return Ok(s.to_owned());
    }
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let digit = |j: usize| b.get(j).and_then(|c| char::from(*c).to_digit(16)).ok_or(FormError::Escape);
                out.push(u8::try_from(digit(i + 1)? * 16 + digit(i + 2)?).map_err(|_| FormError::Escape)?);
                i += 2;
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8(out).map_err(|_| FormError::Escape)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn form_values() {
        assert_eq!(form_value("otp=abc", "otp"), Ok(Some("abc".to_owned())));
        assert_eq!(form_value("a=1&otp=ab%63&b", "otp"), Ok(Some("abc".to_owned())));
        assert_eq!(form_value("o%74p=x+y", "otp"), Ok(Some("x y".to_owned())));
        assert_eq!(form_value("otp", "otp"), Ok(Some(String::new())));
        assert_eq!(form_value("other=1", "otp"), Ok(None));
        assert_eq!(form_value("", "otp"), Ok(None));
        assert_eq!(form_value("otp=a&otp=b", "otp"), Err(FormError::Repeated));
        for bad in ["otp=%", "otp=%4", "otp=%zz", "otp=%ff", "otp=%+1"] {
            assert_eq!(form_value(bad, "otp"), Err(FormError::Escape), "{bad}");
        }
    }

    #[test]
    fn outcome_labels_are_distinct() {
        let labels: std::collections::BTreeSet<_> = Outcome::ALL.iter().map(|o| o.label()).collect();
        assert_eq!(labels.len(), Outcome::ALL.len());
        for (i, o) in Outcome::ALL.iter().enumerate() {
            assert_eq!(o.index(), i);
        }
    }
}
