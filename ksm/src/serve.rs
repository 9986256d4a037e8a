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
//! The HTTP plumbing is [`httpd`]'s: tokio's multi-threaded runtime, every
//! decrypt (a blocking security-module call and an AEAD-store read) on the
//! blocking pool under a deadline, request targets and bodies bounded.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use httpd::metrics::{answers_by, single, Histogram};
pub use httpd::{HttpOptions, Running};
use httpd::{Method, Rejection, Reply, Request, StatusCode};

use crate::{Ksm, KsmError};

/// pyhsm's `yhsm-yubikey-ksm` default.
pub const DEFAULT_LISTEN: SocketAddr = SocketAddr::V4(std::net::SocketAddrV4::new(std::net::Ipv4Addr::LOCALHOST, 8002));

/// The service's defaults, listening on [`DEFAULT_LISTEN`].
#[must_use]
pub fn default_options() -> HttpOptions {
    HttpOptions::new(DEFAULT_LISTEN)
}

/// Bind `opts.listen` and serve `ksm` on background threads.
pub fn start(ksm: Arc<Ksm>, opts: HttpOptions) -> std::io::Result<Running> {
    let timeout = opts.request_timeout;
    httpd::start(Arc::new(KsmService { ksm, timeout, decrypts: Default::default() }), opts)
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
}

struct KsmService {
    ksm: Arc<Ksm>,
    timeout: Duration,
    decrypts: [Histogram; Outcome::ALL.len()],
}

impl httpd::Handler for KsmService {
    const NAME: &'static str = "ksm";

    async fn handle(self: Arc<Self>, req: Request) -> Result<Reply, Rejection> {
        if !matches!(req.path.as_str(), "/wsapi/decrypt" | "/wsapi/decrypt/") {
            return Err(Rejection::NotFound);
        }
        let form = match req.method {
            Method::GET => req.query.unwrap_or_default(),
            // A body that is not UTF-8 is no form at all.
            Method::POST => String::from_utf8(req.body.to_vec()).unwrap_or_else(|_| "%".to_owned()),
            _ => return Err(Rejection::MethodNotAllowed),
        };
        Ok(self.decrypt(req.started, httpd::form::value(&form, "otp")).await)
    }

    async fn health(self: Arc<Self>) -> Result<(), String> {
        let ksm = self.ksm.clone();
        httpd::blocking(Instant::now() + self.timeout, move || ksm.health())
            .await
            .unwrap_or_else(|| Err("health check timed out".to_owned()))
    }

    fn metrics(&self, out: &mut String) {
        answers_by(
            out,
            ("ksm_decrypt_requests_total", "Decrypt requests answered, by result."),
            ("ksm_decrypt_duration_seconds", "Time from request to answer, by result."),
            "result",
            Outcome::ALL.iter().map(|o| o.label()).zip(&self.decrypts),
        );
        single(
            out,
            "ksm_security_module_ready",
            "gauge",
            "1 when the security module is ready to decode.",
            u8::from(self.ksm.module_status() == hsm::Status::Ready),
        );
    }

    fn rejected(&self, why: Rejection) -> Reply {
        match why {
            // Nothing that long or large is an OTP.
            Rejection::TargetTooLong | Rejection::BodyTooLarge => Reply::line(why.status(), "ERR Invalid OTP format"),
            _ => Reply::line(why.status(), why.label()),
        }
    }
}

impl KsmService {
    /// Run one decrypt on the blocking pool under the deadline.
    async fn decrypt(&self, started: Instant, otp: Result<Option<String>, httpd::form::FormError>) -> Reply {
        let otp = match otp {
            Ok(v) => v.unwrap_or_default(),
            // Malformed escapes or a repeated otp= are no OTP format at all.
            Err(e) => {
                tracing::info!(error = %e, "decrypt refused: unreadable otp parameter");
                return self.finish(started, Outcome::InvalidFormat, StatusCode::OK, "ERR Invalid OTP format");
            }
        };
        let ksm = self.ksm.clone();
        match httpd::blocking(started + self.timeout, move || ksm.decrypt(&otp)).await {
            Some(Ok(decoded)) => self.finish(started, Outcome::Ok, StatusCode::OK, &decoded.ksm_line()),
            Some(Err(e)) => {
                crate::log_failure(&e);
                let status = if e.is_backend_failure() { StatusCode::SERVICE_UNAVAILABLE } else { StatusCode::OK };
                self.finish(started, Outcome::of(&e), status, &e.to_string())
            }
            None => {
                tracing::error!(
                    timeout_ms = self.timeout.as_millis(),
                    "decrypt missed its deadline: security module or AEAD store too slow"
                );
                self.finish(started, Outcome::Timeout, StatusCode::SERVICE_UNAVAILABLE, "ERR Backend error")
            }
        }
    }

    fn finish(&self, started: Instant, outcome: Outcome, status: StatusCode, line: &str) -> Reply {
        self.decrypts[Outcome::ALL.iter().position(|o| *o == outcome).unwrap_or(0)].observe(started.elapsed());
        Reply::line(status, line)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcome_labels_are_distinct() {
        let labels: std::collections::BTreeSet<_> = Outcome::ALL.iter().map(|o| o.label()).collect();
        assert_eq!(labels.len(), Outcome::ALL.len());
    }
}
