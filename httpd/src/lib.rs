//! The HTTP plumbing shared by the appliance's services (`ksm serve`,
//! `validator serve`).
//!
//! A [`Handler`] sees a [`Request`] whose size has already been bounded:
//! the request target to [`MAX_TARGET_BYTES`], the body to
//! [`MAX_BODY_BYTES`] and read within the deadline, headers within the
//! deadline too (slow clients are cut off). The server adds `/health` and
//! `/metrics` (Prometheus text: the handler's series, then connection and
//! rejection counts) and runs on tokio's multi-threaded runtime; handlers
//! run blocking work through [`blocking`], which puts it on the blocking
//! pool under a deadline. [`client`] is the matching blocking client.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod client;
pub mod form;
pub mod metrics;

use std::convert::Infallible;
use std::fmt::Write as _;
use std::future::Future;
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
pub use hyper::{Method, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::sync::{oneshot, Semaphore};

use crate::metrics::header;

/// Longest accepted request target (path and query).
pub const MAX_TARGET_BYTES: usize = 1024;
/// Longest accepted request body (form posts).
pub const MAX_BODY_BYTES: usize = 1024;

/// How a service runs.
#[derive(Clone, Debug)]
pub struct HttpOptions {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Deadline for a whole request, from its headers to its answer.
    pub request_timeout: Duration,
    /// Async worker threads; 0 means one per CPU.
    pub workers: usize,
    /// Threads for blocking calls (security module, databases).
    pub max_blocking_threads: usize,
    /// Open connections served at once; more wait in the listen queue.
    pub max_connections: usize,
}

impl HttpOptions {
    /// Defaults, listening on `listen`.
    #[must_use]
    pub fn new(listen: SocketAddr) -> Self {
        Self { listen, request_timeout: Duration::from_secs(5), workers: 0, max_blocking_threads: 64, max_connections: 4096 }
    }
}

/// A request, bounded in size, body read.
#[derive(Debug)]
pub struct Request {
    /// The method.
    pub method: Method,
    /// The path, without the query.
    pub path: String,
    /// The raw query string after `?`, if any.
    pub query: Option<String>,
    /// The body (empty for GET).
    pub body: Bytes,
    /// When the headers were read: deadlines count from here.
    pub started: Instant,
    /// The client.
    pub peer: SocketAddr,
}

/// An answer.
#[derive(Debug)]
pub struct Reply {
    /// HTTP status.
    pub status: StatusCode,
    /// Content type.
    pub content_type: &'static str,
    /// Body.
    pub body: Bytes,
}

impl Reply {
    /// A `text/plain` body.
    #[must_use]
    pub fn text(status: StatusCode, body: impl Into<Bytes>) -> Self {
        Self { status, content_type: "text/plain; charset=utf-8", body: body.into() }
    }

    /// One line of `text/plain`, newline added.
    #[must_use]
    pub fn line(status: StatusCode, line: &str) -> Self {
        Self::text(status, format!("{line}\n"))
    }
}

/// Why a request was refused before (or instead of) being handled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rejection {
    /// No such path.
    NotFound,
    /// The path does not take this method.
    MethodNotAllowed,
    /// The request target is longer than [`MAX_TARGET_BYTES`].
    TargetTooLong,
    /// The body is longer than [`MAX_BODY_BYTES`].
    BodyTooLarge,
    /// The body did not arrive within the deadline.
    BodyTooSlow,
}

impl Rejection {
    const ALL: [Self; 5] = [Self::NotFound, Self::MethodNotAllowed, Self::TargetTooLong, Self::BodyTooLarge, Self::BodyTooSlow];

    /// Metric label.
    #[must_use]
    pub fn label(self) -> &'static str {
        match self {
            Self::NotFound => "not_found",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::TargetTooLong => "target_too_long",
            Self::BodyTooLarge => "body_too_large",
            Self::BodyTooSlow => "body_too_slow",
        }
    }

    /// HTTP status.
    #[must_use]
    pub fn status(self) -> StatusCode {
        match self {
            Self::NotFound => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::TargetTooLong => StatusCode::URI_TOO_LONG,
            Self::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::BodyTooSlow => StatusCode::REQUEST_TIMEOUT,
        }
    }
}

/// A service's logic.
pub trait Handler: Send + Sync + 'static {
    /// Metric name prefix (`ksm`, `validator`).
    const NAME: &'static str;

    /// Answer a request to any path but `/health` and `/metrics`.
    fn handle(self: Arc<Self>, req: Request) -> impl Future<Output = Result<Reply, Rejection>> + Send;

    /// Ready to serve? `Err` explains why not (answered 503).
    fn health(self: Arc<Self>) -> impl Future<Output = Result<(), String>> + Send;

    /// Append the service's own Prometheus series.
    fn metrics(&self, out: &mut String);

    /// The body of a refusal (default: its reason as one line).
    fn rejected(&self, why: Rejection) -> Reply {
        Reply::line(why.status(), why.label())
    }
}

/// Run `f` on the blocking pool, giving up when `deadline` passes.
///
/// `None` when the deadline passed (the work itself cannot be cancelled
/// and finishes on its own) or the work panicked.
pub async fn blocking<T: Send + 'static>(deadline: Instant, f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    let job = tokio::task::spawn_blocking(f);
    match tokio::time::timeout_at(deadline.into(), job).await {
        Ok(Ok(v)) => Some(v),
        Ok(Err(e)) => {
            tracing::error!(error = %e, "blocking task failed");
            None
        }
        Err(_) => None,
    }
}

#[derive(Default)]
struct ServerStats {
    rejected: [AtomicU64; Rejection::ALL.len()],
    connections: AtomicU64,
    open_connections: AtomicU64,
}

struct Shared<H> {
    handler: Arc<H>,
    opts: HttpOptions,
    stats: ServerStats,
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

/// Bind `opts.listen` and serve `handler` on background threads.
///
/// Errors (address in use, no permission) are returned here, before any
/// thread is started.
pub fn start<H: Handler>(handler: Arc<H>, opts: HttpOptions) -> io::Result<Running> {
    let workers = if opts.workers == 0 { std::thread::available_parallelism().map_or(2, std::num::NonZero::get) } else { opts.workers };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .max_blocking_threads(opts.max_blocking_threads.max(1))
        .thread_name(format!("{}-http", H::NAME))
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
    let shared = Arc::new(Shared { handler, opts, stats: ServerStats::default() });
    tracing::info!(%addr, workers, service = H::NAME, "listening");
    let thread = std::thread::Builder::new().name(format!("{}-accept", H::NAME)).spawn(move || {
        rt.block_on(accept_loop(listener, shared, stop_rx));
        rt.shutdown_timeout(Duration::from_secs(1));
    })?;
    Ok(Running { addr, stop: Some(stop_tx), thread: Some(thread) })
}

async fn accept_loop<H: Handler>(listener: tokio::net::TcpListener, shared: Arc<Shared<H>>, mut stop: oneshot::Receiver<()>) {
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
            let stats = &shared.stats;
            stats.connections.fetch_add(1, Ordering::Relaxed);
            stats.open_connections.fetch_add(1, Ordering::Relaxed);
            let service = service_fn(|req| serve_one(shared.clone(), req, peer));
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(shared.opts.request_timeout)
                .max_buf_size(16 * 1024)
                .serve_connection(TokioIo::new(stream), service);
            if let Err(e) = conn.await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
            stats.open_connections.fetch_sub(1, Ordering::Relaxed);
            drop(permit);
        });
    }
}

fn to_response(r: Reply) -> hyper::Response<Full<Bytes>> {
    let mut resp = hyper::Response::new(Full::new(r.body));
    *resp.status_mut() = r.status;
    resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(r.content_type));
    resp
}

async fn serve_one<H: Handler>(
    shared: Arc<Shared<H>>,
    req: hyper::Request<Incoming>,
    peer: SocketAddr,
) -> Result<hyper::Response<Full<Bytes>>, Infallible> {
    let reply = match route(&shared, req, peer).await {
        Ok(r) => r,
        Err(why) => {
            shared.stats.rejected[why as usize].fetch_add(1, Ordering::Relaxed);
            shared.handler.rejected(why)
        }
    };
    Ok(to_response(reply))
}

async fn route<H: Handler>(shared: &Arc<Shared<H>>, req: hyper::Request<Incoming>, peer: SocketAddr) -> Result<Reply, Rejection> {
    let started = Instant::now();
    if req.uri().path_and_query().map_or(0, |pq| pq.as_str().len()) > MAX_TARGET_BYTES {
        return Err(Rejection::TargetTooLong);
    }
    let path = req.uri().path().to_owned();
    match path.as_str() {
        "/health" | "/metrics" if req.method() != Method::GET => Err(Rejection::MethodNotAllowed),
        "/health" => Ok(match shared.handler.clone().health().await {
            Ok(()) => Reply::line(StatusCode::OK, "ok"),
            Err(why) => Reply::line(StatusCode::SERVICE_UNAVAILABLE, &format!("not ready: {why}")),
        }),
        "/metrics" => Ok(metrics(shared)),
        _ => {
            let method = req.method().clone();
            let query = req.uri().query().map(str::to_owned);
            let body = match method {
                Method::GET | Method::HEAD => Bytes::new(),
                _ => {
                    let limited = Limited::new(req.into_body(), MAX_BODY_BYTES);
                    match tokio::time::timeout(shared.opts.request_timeout, limited.collect()).await {
                        Ok(Ok(collected)) => collected.to_bytes(),
                        Ok(Err(_)) => return Err(Rejection::BodyTooLarge),
                        Err(_) => return Err(Rejection::BodyTooSlow),
                    }
                }
            };
            shared.handler.clone().handle(Request { method, path, query, body, started, peer }).await
        }
    }
}

fn metrics<H: Handler>(shared: &Shared<H>) -> Reply {
    let mut out = String::with_capacity(8 * 1024);
    shared.handler.metrics(&mut out);
    let name = H::NAME;
    let s = &shared.stats;
    header(&mut out, &format!("{name}_http_rejected_total"), "counter", "Requests refused before they were handled, by reason.");
    for r in Rejection::ALL {
        let _ = writeln!(out, "{name}_http_rejected_total{{reason=\"{}\"}} {}", r.label(), s.rejected[r as usize].load(Ordering::Relaxed));
    }
    header(&mut out, &format!("{name}_http_connections_total"), "counter", "Connections accepted.");
    let _ = writeln!(out, "{name}_http_connections_total {}", s.connections.load(Ordering::Relaxed));
    header(&mut out, &format!("{name}_http_open_connections"), "gauge", "Connections open now.");
    let _ = writeln!(out, "{name}_http_open_connections {}", s.open_connections.load(Ordering::Relaxed));
    Reply { status: StatusCode::OK, content_type: "text/plain; version=0.0.4; charset=utf-8", body: out.into() }
}
