//! Sharing one YubiHSM 1: a daemon owns the serial port and serves whole
//! commands to other processes on a local Unix socket.
//!
//! A YubiHSM 1 is one serial line, opened exclusively. pyhsm's `yhsm-daemon`
//! shares it over TCP with JSON lines and a lock that clients take around
//! each command; here the unit of work is a *batch* of commands that the
//! daemon runs back to back while it holds the port, so that a sequence such
//! as "load the buffer, then AEAD it under each handle" cannot be split by
//! another client. [`Yhsm1::connect`](super::client::Yhsm1::connect) is the
//! client side.
//!
//! **Wire format** (all lengths big-endian `u16`, at most [`MAX_MESSAGE`]):
//! - request: `len ‖ frames`, the encoded request frames of the batch
//!   (`bcnt ‖ cmd ‖ payload` each, as on the serial line). An empty batch
//!   asks the daemon to resynchronise the line;
//! - reply: `tag ‖ len ‖ body`. Tag 0: the response frames, one per
//!   request, in order. Tag 1: the batch failed on the device side (timeout,
//!   device gone, garbled line); the body is the reason in UTF-8. The daemon
//!   then resyncs the line or, after an I/O fault, reopens the port for the
//!   next batch.
//!
//! The daemon checks that every frame is a well-formed request and every
//! answer a well-formed response; the client checks the echoed nonces and
//! key handles, and asks for a resync when they differ.
//!
//! **Access.** Whoever can connect to the socket can use the device (as with
//! the device node itself): [`bind`] creates it mode 0660, so access is the
//! socket's owner and group. Messages may carry secrets (the master key of
//! an unlock, imported plaintexts): buffers are zeroized and nothing of a
//! message is logged.

use std::io::{self, Read, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use zeroize::Zeroizing;

use super::client::{check_protocol, describe, open_serial, Channel, Fault};
use super::proto::{self, FrameReader, Request, Response};
use crate::Error;

/// Largest request or reply body.
pub const MAX_MESSAGE: usize = 4096;
/// Reply tag: the response frames follow.
const TAG_OK: u8 = 0;
/// Reply tag: a device fault; its description follows.
const TAG_FAULT: u8 = 1;

/// The process that owns the YubiHSM and serves it on a socket.
pub struct Daemon {
    path: PathBuf,
    timeout: Duration,
    device: Mutex<Option<Box<dyn Channel>>>,
}

impl std::fmt::Debug for Daemon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Daemon").field("path", &self.path).field("timeout", &self.timeout).finish_non_exhaustive()
    }
}

/// Bind the daemon's socket at `path`, mode 0660. A stale socket left by a
/// daemon that died is replaced; a live one, or any other file, is refused.
pub fn bind(path: &Path) -> Result<UnixListener, Error> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(Error::AlreadyExists(path.to_path_buf()));
        }
        if UnixStream::connect(path).is_ok() {
            return Err(Error::io(path, io::Error::new(io::ErrorKind::AddrInUse, "another YubiHSM daemon is serving this socket")));
        }
        std::fs::remove_file(path).map_err(|e| Error::io(path, e))?;
    }
    let listener = UnixListener::bind(path).map_err(|e| Error::io(path, e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660)).map_err(|e| Error::io(path, e))?;
    Ok(listener)
}

/// The whole daemon: open the device at `device`, bind `socket` and serve
/// until the listener fails (a `yhsm1-daemon` command is this call).
pub fn run(device: &Path, socket: &Path, timeout: Duration) -> Result<(), Error> {
    let daemon = Arc::new(Daemon::open(device, timeout)?);
    let listener = bind(socket)?;
    tracing::info!(device = %device.display(), socket = %socket.display(), "YubiHSM daemon serving");
    daemon.serve(&listener).map_err(|e| Error::io(socket, e))
}

impl Daemon {
    /// Open the device at `path` (resync, `SYSTEM_INFO_QUERY`, protocol 1);
    /// `timeout` is the per-command deadline.
    pub fn open(path: impl AsRef<Path>, timeout: Duration) -> Result<Self, Error> {
        let path = path.as_ref().to_path_buf();
        let (channel, info) = open_serial(&path, timeout)?;
        tracing::info!(path = %path.display(), device = describe(&info), "YubiHSM daemon opened the device");
        Ok(Self { path, timeout, device: Mutex::new(Some(channel)) })
    }

    /// Accept clients until the listener fails, one thread each.
    pub fn serve(self: Arc<Self>, listener: &UnixListener) -> io::Result<()> {
        loop {
            let (stream, _) = listener.accept()?;
            let daemon = Arc::clone(&self);
            std::thread::spawn(move || daemon.serve_client(stream));
        }
    }

    /// Answer one client's batches until it hangs up.
    pub fn serve_client(&self, mut stream: UnixStream) {
        loop {
            let msg = match read_request(&mut stream) {
                Ok(Some(msg)) => msg,
                Ok(None) => return,
                Err(e) => {
                    tracing::debug!(error = %e, "YubiHSM daemon client dropped");
                    return;
                }
            };
            let (tag, body) = match self.run_batch(&msg) {
                Ok(frames) => (TAG_OK, frames),
                Err(why) => (TAG_FAULT, Zeroizing::new(why.into_bytes())),
            };
            if write_message(&mut stream, Some(tag), &body).is_err() {
                return;
            }
        }
    }

    /// Decode the batch, run it on the device, encode the answers.
    fn run_batch(&self, msg: &[u8]) -> Result<Zeroizing<Vec<u8>>, String> {
        let mut reader = FrameReader::new();
        reader.push(msg);
        let mut reqs = Vec::new();
        while let Some(frame) = reader.next_frame() {
            let frame = frame.map_err(|e| format!("bad request: {e}"))?;
            reqs.push(Request::decode(&frame).map_err(|e| format!("bad request: {e}"))?);
        }
        if !reader.is_idle() {
            return Err("bad request: a frame is cut short".to_owned());
        }
        let mut device = self.device.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if device.is_none() {
            let (channel, info) = open_serial(&self.path, self.timeout).map_err(|e| e.to_string())?;
            tracing::info!(path = %self.path.display(), device = describe(&info), "YubiHSM daemon reopened the device");
            *device = Some(channel);
        }
        let Some(channel) = device.as_mut() else {
            return Err(format!("{}: the YubiHSM is not connected", self.path.display()));
        };
        if reqs.is_empty() {
            return match channel.resync(self.timeout) {
                Ok(()) => Ok(Zeroizing::new(Vec::new())),
                Err(e) => {
                    *device = None;
                    Err(format!("{}: resync failed: {e}", self.path.display()))
                }
            };
        }
        // As the client does: a garbled answer is resynced and the batch run
        // once more; an I/O fault closes the port, reopened by the next batch.
        let mut retried = false;
        loop {
            let fault = match channel.exchange(&reqs, self.timeout) {
                Ok(resps) => {
                    let mut out = Zeroizing::new(Vec::new());
                    for resp in resps {
                        let frame = resp.encode().map_err(|e| e.to_string())?;
                        out.extend_from_slice(&frame.encode());
                    }
                    return Ok(out);
                }
                Err(fault) => fault,
            };
            tracing::warn!(path = %self.path.display(), %fault, "YubiHSM fault in the daemon");
            if let Fault::Io(_) = fault {
                *device = None;
                return Err(format!("{}: {fault}", self.path.display()));
            }
            if channel.resync(self.timeout).is_err() {
                *device = None;
                return Err(format!("{}: {fault}", self.path.display()));
            }
            if retried {
                return Err(format!("{}: {fault} (again after a resync)", self.path.display()));
            }
            retried = true;
        }
    }
}

/// Read one request body; `None` at a clean end of stream.
fn read_request(stream: &mut UnixStream) -> io::Result<Option<Zeroizing<Vec<u8>>>> {
    let mut len = [0u8; 2];
    match stream.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let mut body = Zeroizing::new(vec![0u8; body_len(len)?]);
    stream.read_exact(&mut body)?;
    Ok(Some(body))
}

fn body_len(len: [u8; 2]) -> io::Result<usize> {
    let n = usize::from(u16::from_be_bytes(len));
    if n > MAX_MESSAGE {
        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("message of {n} bytes exceeds {MAX_MESSAGE}")));
    }
    Ok(n)
}

/// Write `tag ‖ len ‖ body` (no tag for requests) in one write.
fn write_message(stream: &mut UnixStream, tag: Option<u8>, body: &[u8]) -> io::Result<()> {
    let len = u16::try_from(body.len())
        .ok()
        .filter(|n| usize::from(*n) <= MAX_MESSAGE)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, format!("message of {} bytes exceeds {MAX_MESSAGE}", body.len())))?;
    let mut out = Zeroizing::new(Vec::with_capacity(3 + body.len()));
    out.extend(tag);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(body);
    stream.write_all(&out)
}

/// The client side: batches over the daemon's socket.
pub(super) struct DaemonChannel {
    stream: UnixStream,
}

impl DaemonChannel {
    /// Connect and ask `SYSTEM_INFO_QUERY`.
    pub(super) fn connect(socket: &Path, timeout: Duration) -> Result<(Self, proto::SystemInfo), Error> {
        let stream = UnixStream::connect(socket)
            .map_err(|e| Error::io(socket, io::Error::new(e.kind(), format!("cannot reach the YubiHSM daemon: {e}"))))?;
        let mut chan = Self { stream };
        let info = match chan.exchange(&[Request::SystemInfoQuery], timeout) {
            Ok(resps) => match resps.as_slice() {
                [Response::SystemInfo(info)] => *info,
                _ => return Err(Error::io(socket, io::Error::new(io::ErrorKind::InvalidData, "SYSTEM_INFO_QUERY: unexpected response"))),
            },
            Err(Fault::Io(e)) => return Err(Error::io(socket, io::Error::new(e.kind(), format!("SYSTEM_INFO_QUERY: {e}")))),
            Err(other) => return Err(Error::io(socket, io::Error::other(format!("SYSTEM_INFO_QUERY: {other}")))),
        };
        check_protocol(socket, &info)?;
        Ok((chan, info))
    }

    /// Send a batch, read the reply body.
    fn call(&mut self, body: &[u8], wait: Duration) -> Result<Zeroizing<Vec<u8>>, Fault> {
        let timed_out = |e: io::Error| {
            if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) {
                Fault::Io(io::Error::new(io::ErrorKind::TimedOut, "the YubiHSM daemon did not answer in time"))
            } else {
                Fault::Io(e)
            }
        };
        self.stream.set_write_timeout(Some(wait))?;
        self.stream.set_read_timeout(Some(wait))?;
        write_message(&mut self.stream, None, body).map_err(timed_out)?;
        let mut head = [0u8; 3];
        self.stream.read_exact(&mut head).map_err(timed_out)?;
        let mut reply = Zeroizing::new(vec![0u8; body_len([head[1], head[2]])?]);
        self.stream.read_exact(&mut reply).map_err(timed_out)?;
        match head[0] {
            TAG_OK => Ok(reply),
            TAG_FAULT => Err(Fault::Remote(String::from_utf8_lossy(&reply).into_owned())),
            tag => Err(Fault::Io(io::Error::new(io::ErrorKind::InvalidData, format!("unknown reply tag {tag} from the YubiHSM daemon")))),
        }
    }
}

/// How long to wait for the daemon: every command's deadline, plus one for
/// reopening the device and one for waiting behind another client.
fn daemon_wait(timeout: Duration, commands: usize) -> Duration {
    timeout.saturating_mul(u32::try_from(commands).unwrap_or(u32::MAX).saturating_add(2))
}

impl Channel for DaemonChannel {
    fn exchange(&mut self, reqs: &[Request], timeout: Duration) -> Result<Vec<Response>, Fault> {
        let mut body = Zeroizing::new(Vec::new());
        for req in reqs {
            body.extend_from_slice(&req.encode()?.encode());
        }
        let reply = self.call(&body, daemon_wait(timeout, reqs.len()))?;
        let mut reader = FrameReader::new();
        reader.push(&reply);
        let mut resps = Vec::with_capacity(reqs.len());
        for req in reqs {
            match reader.next_frame() {
                Some(frame) => resps.push(Response::decode(req.command(), &frame?)?),
                None => return Err(Fault::Garbled(format!("the daemon answered {} of {} commands", resps.len(), reqs.len()))),
            }
        }
        if !reader.is_idle() {
            return Err(Fault::Garbled("the daemon's reply has trailing bytes".to_owned()));
        }
        Ok(resps)
    }

    fn resync(&mut self, timeout: Duration) -> io::Result<()> {
        match self.call(&[], daemon_wait(timeout, 1)) {
            Ok(_) => Ok(()),
            Err(Fault::Io(e)) => Err(e),
            Err(other) => Err(io::Error::other(other.to_string())),
        }
    }
}
