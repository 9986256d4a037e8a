//! A small blocking HTTP/1.x client over `TcpStream`: the load generator's
//! and the validator's for remote KSMs.
//!
//! The response parser ([`parse_head`], [`decode_chunked`]) is pure: it
//! takes bytes and returns values, no I/O. [`Connection`] owns the socket:
//! it writes `GET` requests, reads exactly one response at a time, keeps the
//! connection when the server keeps it alive and reconnects when the server
//! closes it (pyhsm's `BaseHTTPServer` answers HTTP/1.0 and closes after
//! every request).

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// The largest response head (status line and headers) accepted.
pub const MAX_HEAD: usize = 16 * 1024;
/// The largest response body accepted.
pub const MAX_BODY: usize = 1024 * 1024;
/// How many headers a response may carry.
pub const MAX_HEADERS: usize = 64;

/// A response that is not HTTP/1.x as this client understands it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HttpError {
    /// The status line is malformed.
    #[error("bad status line: {0:?}")]
    StatusLine(String),
    /// A header line has no colon or is not text.
    #[error("bad header line: {0:?}")]
    HeaderLine(String),
    /// The head or body exceeds its limit.
    #[error("{what} longer than {limit} bytes")]
    TooLong {
        /// Head or body.
        what: &'static str,
        /// The limit.
        limit: usize,
    },
    /// Too many header lines.
    #[error("more than {MAX_HEADERS} headers")]
    TooManyHeaders,
    /// `Content-Length` is not a number, or appears twice with different values.
    #[error("bad Content-Length: {0:?}")]
    ContentLength(String),
    /// A `Transfer-Encoding` other than `chunked`.
    #[error("unsupported Transfer-Encoding: {0:?}")]
    TransferEncoding(String),
    /// Malformed chunked framing.
    #[error("bad chunked body: {0}")]
    Chunk(&'static str),
}

/// The protocol version of a response.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    /// HTTP/1.0: closes after the response unless `Connection: keep-alive`.
    Http10,
    /// HTTP/1.1: persistent unless `Connection: close`.
    Http11,
}

/// A parsed status line and header block.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResponseHead {
    /// Protocol version.
    pub version: Version,
    /// Status code.
    pub status: u16,
    /// Reason phrase, possibly empty.
    pub reason: String,
    /// Header fields in order, names as sent.
    pub headers: Vec<(String, String)>,
}

/// How the body of a response is delimited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    /// No body (1xx, 204, 304).
    Empty,
    /// Exactly this many bytes.
    Length(usize),
    /// `Transfer-Encoding: chunked`.
    Chunked,
    /// Everything until the server closes the connection.
    UntilClose,
}

impl ResponseHead {
    /// The first header named `name` (case-insensitive).
    #[must_use]
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    fn connection_has(&self, token: &str) -> bool {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case("connection"))
            .flat_map(|(_, v)| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    }

    /// How the body is delimited (RFC 9112 §6.3, for responses to `GET`).
    pub fn framing(&self) -> Result<Framing, HttpError> {
        if (100..200).contains(&self.status) || self.status == 204 || self.status == 304 {
            return Ok(Framing::Empty);
        }
        if let Some(te) = self.header("transfer-encoding") {
            // Only a lone `chunked` coding is understood.
            return if te.trim().eq_ignore_ascii_case("chunked") {
                Ok(Framing::Chunked)
            } else {
                Err(HttpError::TransferEncoding(te.to_owned()))
            };
        }
        let mut length: Option<usize> = None;
        for (_, v) in self.headers.iter().filter(|(n, _)| n.eq_ignore_ascii_case("content-length")) {
            let n: usize = v.trim().parse().map_err(|_| HttpError::ContentLength(v.clone()))?;
            if length.is_some_and(|l| l != n) {
                return Err(HttpError::ContentLength(v.clone()));
            }
            length = Some(n);
        }
        match length {
            Some(n) if n > MAX_BODY => Err(HttpError::TooLong { what: "body", limit: MAX_BODY }),
            Some(n) => Ok(Framing::Length(n)),
            None => Ok(Framing::UntilClose),
        }
    }

    /// May the connection carry another request after this response?
    /// (Ignores framing; a body read until close always ends the connection.)
    #[must_use]
    pub fn keep_alive(&self) -> bool {
        match self.version {
            Version::Http11 => !self.connection_has("close"),
            Version::Http10 => self.connection_has("keep-alive"),
        }
    }
}

fn find_head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4)
}

/// Parse a response head from the start of `buf`.
///
/// `Ok(None)`: more bytes are needed. `Ok(Some((head, n)))`: the head took
/// the first `n` bytes; the body starts at `buf[n..]`. Lines end in CRLF.
pub fn parse_head(buf: &[u8]) -> Result<Option<(ResponseHead, usize)>, HttpError> {
    let Some(end) = find_head_end(buf) else {
        return if buf.len() > MAX_HEAD { Err(HttpError::TooLong { what: "response head", limit: MAX_HEAD }) } else { Ok(None) };
    };
    if end > MAX_HEAD {
        return Err(HttpError::TooLong { what: "response head", limit: MAX_HEAD });
    }
    let text =
        std::str::from_utf8(&buf[..end - 4]).map_err(|_| HttpError::StatusLine(String::from_utf8_lossy(&buf[..end]).into_owned()))?;
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let bad_status = || HttpError::StatusLine(status_line.to_owned());
    let (version, rest) = status_line.split_once(' ').ok_or_else(bad_status)?;
    let version = match version {
        "HTTP/1.1" => Version::Http11,
        "HTTP/1.0" => Version::Http10,
        _ => return Err(bad_status()),
    };
    let (code, reason) = rest.split_once(' ').unwrap_or((rest, ""));
    if code.len() != 3 || !code.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad_status());
    }
    let status: u16 = code.parse().map_err(|_| bad_status())?;
    let mut headers = Vec::new();
    for line in lines {
        if headers.len() == MAX_HEADERS {
            return Err(HttpError::TooManyHeaders);
        }
        let (name, value) = line.split_once(':').ok_or_else(|| HttpError::HeaderLine(line.to_owned()))?;
        if name.is_empty() || name.bytes().any(|b| b.is_ascii_whitespace()) {
            return Err(HttpError::HeaderLine(line.to_owned()));
        }
        headers.push((name.to_owned(), value.trim().to_owned()));
    }
    Ok(Some((ResponseHead { version, status, reason: reason.to_owned(), headers }, end)))
}

/// Decode a complete chunked body from the start of `buf`.
///
/// `Ok(None)`: more bytes are needed. `Ok(Some((body, n)))`: the body,
/// trailers included, took the first `n` bytes. Chunk extensions and
/// trailer fields are skipped.
pub fn decode_chunked(buf: &[u8]) -> Result<Option<(Vec<u8>, usize)>, HttpError> {
    let mut body = Vec::new();
    let mut pos = 0;
    loop {
        let Some(eol) = buf[pos..].windows(2).position(|w| w == b"\r\n") else { return Ok(None) };
        let line = std::str::from_utf8(&buf[pos..pos + eol]).map_err(|_| HttpError::Chunk("size line is not text"))?;
        let size_text = line.split(';').next().unwrap_or("").trim();
        if size_text.is_empty() || size_text.len() > 8 {
            return Err(HttpError::Chunk("bad chunk size"));
        }
        let size = usize::from_str_radix(size_text, 16).map_err(|_| HttpError::Chunk("bad chunk size"))?;
        pos += eol + 2;
        if size == 0 {
            // Trailer fields, then an empty line.
            loop {
                let Some(eol) = buf[pos..].windows(2).position(|w| w == b"\r\n") else { return Ok(None) };
                pos += eol + 2;
                if eol == 0 {
                    return Ok(Some((body, pos)));
                }
            }
        }
        if body.len() + size > MAX_BODY {
            return Err(HttpError::TooLong { what: "body", limit: MAX_BODY });
        }
        if buf.len() < pos + size + 2 {
            return Ok(None);
        }
        body.extend_from_slice(&buf[pos..pos + size]);
        if &buf[pos + size..pos + size + 2] != b"\r\n" {
            return Err(HttpError::Chunk("chunk not followed by CRLF"));
        }
        pos += size + 2;
    }
}

/// A complete response.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    /// Status line and headers.
    pub head: ResponseHead,
    /// The body, de-chunked.
    pub body: Vec<u8>,
}

/// A request that did not yield a response.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// No progress within the connection's timeout (connect, write or read).
    #[error("timed out: nothing for {0:?}")]
    Timeout(Duration),
    /// Connecting, writing or reading failed.
    #[error("{0}")]
    Io(#[from] io::Error),
    /// The response broke the protocol.
    #[error("{0}")]
    Http(#[from] HttpError),
    /// The server closed the connection in the middle of a response.
    #[error("connection closed mid-response")]
    Truncated,
}

/// Counters of what a [`Connection`] did on the wire.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WireStats {
    /// TCP connections opened.
    pub connects: u64,
    /// Requests retried once on a fresh connection because a kept-alive one
    /// turned out closed before any response byte arrived.
    pub stale_retries: u64,
}

/// One client connection to one server, reopened as needed.
pub struct Connection {
    addr: SocketAddr,
    host: String,
    timeout: Duration,
    stream: Option<TcpStream>,
    buf: Vec<u8>,
    stats: WireStats,
}

impl fmt::Debug for Connection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connection").field("addr", &self.addr).field("open", &self.stream.is_some()).field("stats", &self.stats).finish()
    }
}

/// Why reading a response stopped early.
enum ReadFailure {
    /// The connection ended (EOF or reset) before any response byte.
    ClosedBeforeResponse(ClientError),
    Other(ClientError),
}

impl Connection {
    /// A client for `addr`; nothing is connected until the first request.
    /// `timeout` bounds connecting and every read and write.
    #[must_use]
    pub fn new(addr: SocketAddr, timeout: Duration) -> Self {
        Self { addr, host: addr.to_string(), timeout, stream: None, buf: Vec::with_capacity(4096), stats: WireStats::default() }
    }

    /// What this connection did on the wire so far.
    #[must_use]
    pub fn stats(&self) -> WireStats {
        self.stats
    }

    /// Is a connection open for the next request?
    #[must_use]
    pub fn is_open(&self) -> bool {
        self.stream.is_some()
    }

    fn connect(&mut self) -> Result<(), ClientError> {
        let stream = TcpStream::connect_timeout(&self.addr, self.timeout)?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(self.timeout))?;
        stream.set_write_timeout(Some(self.timeout))?;
        self.stream = Some(stream);
        self.buf.clear();
        self.stats.connects += 1;
        Ok(())
    }

    /// Send `GET target` (origin form, e.g. `/wsapi/decrypt?otp=…`) and read
    /// the whole response.
    pub fn get(&mut self, target: &str) -> Result<Response, ClientError> {
        let timeout = self.timeout;
        self.get_inner(target).map_err(|e| match e {
            // A socket timeout surfaces as WouldBlock (EAGAIN) or TimedOut.
            ClientError::Io(io) if matches!(io.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                ClientError::Timeout(timeout)
            }
            e => e,
        })
    }

    fn get_inner(&mut self, target: &str) -> Result<Response, ClientError> {
        let request = format!("GET {target} HTTP/1.1\r\nHost: {}\r\nUser-Agent: otp-appliance\r\nAccept: */*\r\n\r\n", self.host);
        let reused = self.stream.is_some();
        match self.exchange(request.as_bytes()) {
            Ok(r) => Ok(r),
            // A kept-alive connection the server had already closed: the
            // request never reached it, so sending it again is safe.
            Err(ReadFailure::ClosedBeforeResponse(_)) if reused => {
                self.stats.stale_retries += 1;
                self.exchange(request.as_bytes()).map_err(|f| match f {
                    ReadFailure::ClosedBeforeResponse(e) | ReadFailure::Other(e) => e,
                })
            }
            Err(ReadFailure::ClosedBeforeResponse(e) | ReadFailure::Other(e)) => Err(e),
        }
    }

    fn exchange(&mut self, request: &[u8]) -> Result<Response, ReadFailure> {
        if self.stream.is_none() {
            self.connect().map_err(ReadFailure::Other)?;
        }
        let result = self.exchange_on_open(request);
        if result.is_err() {
            self.stream = None;
            self.buf.clear();
        }
        result
    }

    fn exchange_on_open(&mut self, request: &[u8]) -> Result<Response, ReadFailure> {
        let Some(stream) = self.stream.as_mut() else { return Err(ReadFailure::Other(ClientError::Truncated)) };
        if let Err(e) = stream.write_all(request) {
            return Err(if is_closed(&e) { ReadFailure::ClosedBeforeResponse(e.into()) } else { ReadFailure::Other(e.into()) });
        }
        // Head.
        let (head, head_len) = loop {
            if let Some(parsed) = parse_head(&self.buf).map_err(|e| ReadFailure::Other(e.into()))? {
                break parsed;
            }
            match self.fill() {
                Ok(0) if self.buf.is_empty() => return Err(ReadFailure::ClosedBeforeResponse(ClientError::Truncated)),
                Ok(0) => return Err(ReadFailure::Other(ClientError::Truncated)),
                Ok(_) => {}
                Err(e) if self.buf.is_empty() && is_closed(&e) => return Err(ReadFailure::ClosedBeforeResponse(e.into())),
                Err(e) => return Err(ReadFailure::Other(e.into())),
            }
        };
        let framing = head.framing().map_err(|e| ReadFailure::Other(e.into()))?;
        let other = |e: ClientError| ReadFailure::Other(e);
        let (body, consumed, must_close) = match framing {
            Framing::Empty => (Vec::new(), head_len, false),
            Framing::Length(n) => {
                while self.buf.len() < head_len + n {
                    if self.fill().map_err(|e| other(e.into()))? == 0 {
                        return Err(other(ClientError::Truncated));
                    }
                }
                (self.buf[head_len..head_len + n].to_vec(), head_len + n, false)
            }
            Framing::Chunked => loop {
                if let Some((body, n)) = decode_chunked(&self.buf[head_len..]).map_err(|e| other(e.into()))? {
                    break (body, head_len + n, false);
                }
                if self.fill().map_err(|e| other(e.into()))? == 0 {
                    return Err(other(ClientError::Truncated));
                }
            },
            Framing::UntilClose => {
                while self.fill().map_err(|e| other(e.into()))? != 0 {
                    if self.buf.len() - head_len > MAX_BODY {
                        return Err(other(HttpError::TooLong { what: "body", limit: MAX_BODY }.into()));
                    }
                }
                (self.buf[head_len..].to_vec(), self.buf.len(), true)
            }
        };
        self.buf.drain(..consumed);
        if must_close || !head.keep_alive() {
            self.stream = None;
            self.buf.clear();
        }
        Ok(Response { head, body })
    }

    /// Read more bytes into the buffer; 0 means the peer closed.
    fn fill(&mut self) -> io::Result<usize> {
        let Some(stream) = self.stream.as_mut() else { return Ok(0) };
        let mut chunk = [0u8; 4096];
        loop {
            match stream.read(&mut chunk) {
                Ok(n) => {
                    self.buf.extend_from_slice(&chunk[..n]);
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

fn is_closed(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionAborted | io::ErrorKind::UnexpectedEof
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    use std::net::TcpListener;

    #[test]
    fn pyhsm_style_http10_reads_to_close() {
        let raw = b"HTTP/1.0 200 OK\r\nServer: BaseHTTP/0.3 Python/2.7.18\r\nDate: Mon, 01 Jan 2024 00:00:00 GMT\r\nContent-type: text/html\r\n\r\nOK counter=0001 low=0002 high=03 use=04\n";
        let (head, n) = parse_head(raw).unwrap().unwrap();
        assert_eq!(head.version, Version::Http10);
        assert_eq!(head.status, 200);
        assert_eq!(head.reason, "OK");
        assert_eq!(head.header("CONTENT-TYPE"), Some("text/html"));
        assert_eq!(head.framing().unwrap(), Framing::UntilClose);
        assert!(!head.keep_alive());
        assert!(raw[n..].starts_with(b"OK counter="));
    }

    #[test]
    fn http11_content_length_and_keep_alive() {
        let raw = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-type: text/plain\r\n\r\nhello";
        let (head, n) = parse_head(raw).unwrap().unwrap();
        assert_eq!(head.framing().unwrap(), Framing::Length(5));
        assert!(head.keep_alive());
        assert_eq!(&raw[n..], b"hello");
        // Every prefix short of the blank line is incomplete, not an error.
        for cut in 0..n {
            assert_eq!(parse_head(&raw[..cut]).unwrap(), None, "cut at {cut}");
        }
    }

    #[test]
    fn connection_tokens() {
        let head = |v: &str, conn: &str| parse_head(format!("{v} 200 OK\r\nConnection: {conn}\r\n\r\n").as_bytes()).unwrap().unwrap().0;
        assert!(!head("HTTP/1.1", "close").keep_alive());
        assert!(!head("HTTP/1.1", "Upgrade, Close").keep_alive());
        assert!(head("HTTP/1.1", "upgrade").keep_alive());
        assert!(head("HTTP/1.0", "Keep-Alive").keep_alive());
        assert!(!head("HTTP/1.0", "upgrade").keep_alive());
    }

    #[test]
    fn framing_rules() {
        let framing =
            |extra: &str, status: u16| parse_head(format!("HTTP/1.1 {status} X\r\n{extra}\r\n").as_bytes()).unwrap().unwrap().0.framing();
        assert_eq!(framing("", 204), Ok(Framing::Empty));
        assert_eq!(framing("Content-Length: 10\r\n", 304), Ok(Framing::Empty));
        assert_eq!(framing("Transfer-Encoding: chunked\r\nContent-Length: 3\r\n", 200), Ok(Framing::Chunked));
        assert_eq!(framing("Content-Length: 3\r\nContent-Length: 3\r\n", 200), Ok(Framing::Length(3)));
        assert!(matches!(framing("Content-Length: 3\r\nContent-Length: 4\r\n", 200), Err(HttpError::ContentLength(_))));
        assert!(matches!(framing("Content-Length: -1\r\n", 200), Err(HttpError::ContentLength(_))));
        assert!(matches!(framing("Content-Length: 99999999999\r\n", 200), Err(HttpError::TooLong { .. })));
        assert!(matches!(framing("Transfer-Encoding: gzip, chunked\r\n", 200), Err(HttpError::TransferEncoding(_))));
        assert_eq!(framing("", 403), Ok(Framing::UntilClose));
    }

    #[test]
    fn malformed_heads() {
        for raw in [
            &b"HTTP/2 200 OK\r\n\r\n"[..],
            b"HTTP/1.1 20 OK\r\n\r\n",
            b"HTTP/1.1 2000 OK\r\n\r\n",
            b"HTTP/1.1\r\n\r\n",
            b"ICY 200 OK\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nbad name: x\r\n\r\n",
            b"HTTP/1.1 200 OK\r\n: x\r\n\r\n",
            b"HTTP/1.1 200 \xff\r\n\r\n",
        ] {
            assert!(parse_head(raw).is_err(), "{:?}", String::from_utf8_lossy(raw));
        }
        // A reason phrase is optional.
        assert_eq!(parse_head(b"HTTP/1.1 200\r\n\r\n").unwrap().unwrap().0.reason, "");
        let huge = vec![b'a'; MAX_HEAD + 1];
        assert!(matches!(parse_head(&huge), Err(HttpError::TooLong { .. })));
        let many: String = "HTTP/1.1 200 OK\r\n".to_owned() + &"a: b\r\n".repeat(MAX_HEADERS + 1) + "\r\n";
        assert_eq!(parse_head(many.as_bytes()), Err(HttpError::TooManyHeaders));
    }

    #[test]
    fn chunked_bodies() {
        let raw = b"5;ext=1\r\nhello\r\n7\r\n, world\r\n0\r\nX-Trailer: t\r\n\r\nNEXT";
        let (body, n) = decode_chunked(raw).unwrap().unwrap();
        assert_eq!(body, b"hello, world");
        assert_eq!(&raw[n..], b"NEXT");
        for cut in 0..n {
            assert_eq!(decode_chunked(&raw[..cut]).unwrap(), None, "cut at {cut}");
        }
        assert_eq!(decode_chunked(b"0\r\n\r\n").unwrap(), Some((Vec::new(), 5)));
        assert!(decode_chunked(b"zz\r\n").is_err());
        assert!(decode_chunked(b"\r\n").is_err());
        assert!(decode_chunked(b"3\r\nabcX\r\n").is_err());
        assert!(decode_chunked(b"fffffffff\r\n").is_err());
    }

    /// A one-shot server thread answering canned responses, for the
    /// connection logic: reuse, close, reconnect.
    fn serve(responses: Vec<(&'static [u8], bool)>) -> (SocketAddr, std::thread::JoinHandle<usize>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let handle = std::thread::spawn(move || {
            let mut accepted = 0;
            let mut it = responses.into_iter().peekable();
            while it.peek().is_some() {
                let (mut s, _) = listener.accept().unwrap();
                accepted += 1;
                for (resp, close) in it.by_ref() {
                    let mut req = Vec::new();
                    let mut b = [0u8; 1024];
                    while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                        let n = s.read(&mut b).unwrap();
                        assert_ne!(n, 0);
                        req.extend_from_slice(&b[..n]);
                    }
                    assert!(req.starts_with(b"GET /x HTTP/1.1\r\nHost: 127.0.0.1:"));
                    s.write_all(resp).unwrap();
                    if close {
                        break;
                    }
                }
            }
            accepted
        });
        (addr, handle)
    }

    #[test]
    fn connection_reuse_and_reconnect() {
        let (addr, server) = serve(vec![
            (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nab", false),
            (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nc\r\n0\r\n\r\n", false),
            (b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nConnection: close\r\n\r\nd", true),
            (b"HTTP/1.0 200 OK\r\n\r\ne\n", true),
            (b"HTTP/1.0 200 OK\r\n\r\nf\n", true),
        ]);
        let mut c = Connection::new(addr, Duration::from_secs(5));
        let bodies: Vec<Vec<u8>> = (0..5).map(|_| c.get("/x").unwrap().body).collect();
        assert_eq!(bodies, [&b"ab"[..], b"c", b"d", b"e\n", b"f\n"]);
        assert!(!c.is_open());
        assert_eq!(c.stats(), WireStats { connects: 3, stale_retries: 0 });
        assert_eq!(server.join().unwrap(), 3);
    }

    #[test]
    fn stale_keep_alive_is_retried_once() {
        // The server answers keep-alive, then closes without reading more.
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            for body in ["1", "2"] {
                let (mut s, _) = listener.accept().unwrap();
                let mut b = [0u8; 1024];
                let _ = s.read(&mut b).unwrap();
                s.write_all(format!("HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n{body}").as_bytes()).unwrap();
                s.shutdown(std::net::Shutdown::Both).unwrap();
            }
        });
        let mut c = Connection::new(addr, Duration::from_secs(5));
        assert_eq!(c.get("/x").unwrap().body, b"1");
        assert!(c.is_open());
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(c.get("/x").unwrap().body, b"2");
        assert_eq!(c.stats(), WireStats { connects: 2, stale_retries: 1 });
        server.join().unwrap();
    }

    #[test]
    fn silence_is_a_timeout() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            // Accept and read, but never answer.
            let (mut s, _) = listener.accept().unwrap();
            let mut b = [0u8; 1024];
            let _ = s.read(&mut b).unwrap();
            std::thread::sleep(Duration::from_millis(300));
        });
        let mut c = Connection::new(addr, Duration::from_millis(100));
        assert!(matches!(c.get("/x"), Err(ClientError::Timeout(_))));
        assert!(!c.is_open());
        server.join().unwrap();
    }

    #[test]
    fn truncated_body_is_an_error() {
        let (addr, server) = serve(vec![(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", true)]);
        let mut c = Connection::new(addr, Duration::from_secs(5));
        assert!(matches!(c.get("/x"), Err(ClientError::Truncated)));
        assert!(!c.is_open());
        server.join().unwrap();
    }
}
