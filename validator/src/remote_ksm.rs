//! Remote KSMs over Yubico's KSM protocol, for split deployments and for
//! migrating from yubikey-ksm or pyhsm's KSM.
//!
//! URLs are given as yubikey-val's `otp2ksmurls` gives them, the OTP
//! appended: `http://127.0.0.1:8002/wsapi/decrypt?otp=`. Plain HTTP only
//! (keep the KSM on loopback or a private link). The KSMs are asked in
//! order; the first `OK` wins. A verdict (`ERR Unknown yubikey`,
//! `ERR Corrupt OTP`, `ERR Invalid OTP format`) is believed only when no
//! KSM failed: if one was unreachable, timed out or answered anything else,
//! the answer is a backend failure, since the unreachable one might have
//! known the key. yubikey-val instead turns every KSM failure into
//! `BAD_OTP`.

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Mutex;
use std::time::Duration;

use httpd::client::Connection;
use ksm::KsmError;
use otp::{Otp, OtpDecode};

use crate::OtpDecoder;

/// One remote KSM.
#[derive(Debug)]
struct Remote {
    url: String,
    addr: SocketAddr,
    /// Path and query up to the OTP.
    prefix: String,
    /// Idle kept-alive connections.
    idle: Mutex<Vec<Connection>>,
}

/// Remote KSMs, asked in order.
#[derive(Debug)]
pub struct RemoteKsm {
    remotes: Vec<Remote>,
    timeout: Duration,
}

/// What one KSM said.
enum Said {
    Ok(OtpDecode),
    Verdict(KsmError),
    Failed(String),
}

impl RemoteKsm {
    /// Parse `urls` (`http://host:port/path?otp=`); `timeout` bounds each
    /// connect, write and read.
    pub fn new(urls: &[String], timeout: Duration) -> Result<Self, String> {
        if urls.is_empty() {
            return Err("no KSM URLs".to_owned());
        }
        let remotes = urls.iter().map(|u| parse_url(u)).collect::<Result<Vec<_>, _>>()?;
        Ok(Self { remotes, timeout })
    }

    fn ask(&self, remote: &Remote, otp: &str) -> Said {
        let mut conn =
            remote.idle.lock().ok().and_then(|mut idle| idle.pop()).unwrap_or_else(|| Connection::new(remote.addr, self.timeout));
        let said = match conn.get(&format!("{}{otp}", remote.prefix)) {
            Ok(resp) => match std::str::from_utf8(&resp.body) {
                Ok(body) => interpret(body, otp),
                Err(_) => Said::Failed("answer is not UTF-8".to_owned()),
            },
            Err(e) => Said::Failed(e.to_string()),
        };
        if conn.is_open() {
            if let Ok(mut idle) = remote.idle.lock() {
                idle.push(conn);
            }
        }
        if let Said::Failed(why) = &said {
            tracing::error!(ksm = %remote.url, error = %why, "remote KSM failed");
        }
        said
    }
}

fn interpret(body: &str, otp: &str) -> Said {
    if let Some(d) = OtpDecode::parse_ksm_line(body) {
        return Said::Ok(d);
    }
    let line = body.trim_end_matches(['\r', '\n']);
    let public_id = Otp::parse(otp).map(|o| o.public_id());
    match (line, public_id) {
        ("ERR Unknown yubikey" | "ERR Unknown public_id", Ok(id)) => Said::Verdict(KsmError::UnknownYubikey(id)),
        // The remote does not say whether the CRC or the uid failed.
        ("ERR Corrupt OTP", _) => Said::Verdict(KsmError::CorruptOtp(hsm::Error::OtpInvalid(hsm::OtpFault::Crc))),
        ("ERR Invalid OTP format" | "ERR Invalid OTP", Err(e)) => Said::Verdict(KsmError::InvalidFormat(e)),
        _ => Said::Failed(format!("answered {:?}", &line[..line.len().min(80)])),
    }
}

impl OtpDecoder for RemoteKsm {
    fn decode(&self, otp: &str) -> Result<OtpDecode, KsmError> {
        let mut verdict = None;
        let mut failure = None;
        for remote in &self.remotes {
            match self.ask(remote, otp) {
                Said::Ok(d) => return Ok(d),
                Said::Verdict(v) => verdict = verdict.or(Some(v)),
                Said::Failed(why) => failure = failure.or(Some(format!("remote KSM {}: {why}", remote.url))),
            }
        }
        match (failure, verdict) {
            (Some(why), _) => Err(KsmError::Backend(hsm::Error::NotReady(why))),
            (None, Some(v)) => Err(v),
            (None, None) => Err(KsmError::Backend(hsm::Error::NotReady("no KSM answered".to_owned()))),
        }
    }
}

fn parse_url(url: &str) -> Result<Remote, String> {
    let bad = |why: &str| format!("KSM URL {url:?}: {why}");
    let rest = url.strip_prefix("http://").ok_or_else(|| bad("only http:// is supported"))?;
    let (authority, path) = rest.find('/').map_or((rest, "/"), |i| rest.split_at(i));
    let addr = authority
        .to_socket_addrs()
        .map_err(|e| bad(&format!("cannot resolve {authority:?} (give host:port): {e}")))?
        .next()
        .ok_or_else(|| bad("resolves to no address"))?;
    if !path.ends_with("otp=") {
        return Err(bad("must end in `otp=`, the OTP is appended to it"));
    }
    Ok(Remote { url: url.to_owned(), addr, prefix: path.to_owned(), idle: Mutex::new(Vec::new()) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let r = parse_url("http://127.0.0.1:8002/wsapi/decrypt?otp=").unwrap();
        assert_eq!((r.addr, r.prefix.as_str()), ("127.0.0.1:8002".parse().unwrap(), "/wsapi/decrypt?otp="));
        assert!(parse_url("https://127.0.0.1:8002/wsapi/decrypt?otp=").is_err());
        assert!(parse_url("http://127.0.0.1/wsapi/decrypt?otp=").is_err());
        assert!(parse_url("http://127.0.0.1:8002/wsapi/decrypt").is_err());
        assert!(RemoteKsm::new(&[], Duration::from_secs(1)).is_err());
    }

    #[test]
    fn answers_are_read_strictly() {
        let otp = "cccccccccccbdvgtiblfkbgturecfllberrvkinnctnn";
        assert!(matches!(interpret("OK counter=0001 low=0001 high=01 use=01\n", otp), Said::Ok(_)));
        assert!(matches!(interpret("ERR Unknown yubikey\n", otp), Said::Verdict(KsmError::UnknownYubikey(_))));
        assert!(matches!(interpret("ERR Corrupt OTP\n", otp), Said::Verdict(KsmError::CorruptOtp(_))));
        for failure in ["ERR Backend error\n", "ERR Database error\n", "ERR\n", "", "<html>", "ERR Invalid OTP format\n"] {
            assert!(matches!(interpret(failure, otp), Said::Failed(_)), "{failure:?}");
        }
    }
}
