//! The YubiHSM 1 client: a [`SecurityModule`] on a USB serial line.
//!
//! [`Yhsm1`] opens the device (`/dev/ttyACM0` on Linux, or any tty such as
//! the emulator's pty) raw at 115200 baud, resynchronises the line with 96
//! zero bytes, asks `SYSTEM_INFO_QUERY` and refuses any protocol version
//! other than 1 (a stick that does not answer is probed as pyhsm does, and
//! one left in configuration mode is reported as such). Each trait method is one or a few whole commands, serialized
//! by one mutex around the port: a command is written and its response read
//! before another thread may speak, and a multi-command sequence (load the
//! buffer, then AEAD it) holds the port throughout.
//!
//! The port can also be shared between processes: one process owns it and
//! serves it on a local socket ([`super::daemon`]), and [`Yhsm1::connect`]
//! reaches the device through that socket with the same semantics.
//!
//! **Deadlines and faults.** Every command has a deadline
//! ([`Yhsm1Options::timeout`], 2 s by default) covering the write and the
//! whole response. A device that does not answer in time, a serial peer that
//! is gone, a response to another command, a nonce or key handle that does
//! not echo the request, or a frame of the wrong size is a *backend failure*
//! ([`Error::is_backend_failure`]), never an OTP verdict. After a garbled
//! frame the line is resynchronised (96 zeros, then the input is drained)
//! and the command tried once more; after an I/O fault the port is closed
//! and reopened, resynchronised and checked on the next call, so a device
//! that comes back is used again.
//!
//! **Status codes.** `FUNCTION_DISABLED` (a flag missing) is
//! [`Error::NotPermitted`], `KEY_HANDLE_INVALID` [`Error::UnknownKeyHandle`],
//! `AEAD_INVALID` [`Error::AeadInvalid`], `OTP_INVALID`
//! [`Error::OtpInvalid`] (the device does not say whether the CRC or the
//! private id failed: reported as [`OtpFault::Crc`]), `KEY_STORAGE_LOCKED`
//! [`Error::Locked`]; any other refusal is [`Error::NotReady`].
//!
//! **What a YubiHSM 1 does not offer.** It has no command that returns an
//! AEAD's plaintext, so [`SecurityModule::decrypt_aead`] answers
//! [`Error::NotPermitted`]; it has no data keys, so
//! [`SecurityModule::encrypt_value`] and [`SecurityModule::decrypt_value`]
//! answer [`Error::InvalidInput`]. Exporting secrets and encrypting values at
//! rest need another module (the soft keystore or PKCS#11). Nor can its key
//! handles be listed: [`SecurityModule::key_handles`] returns the ones given
//! in [`Yhsm1Options::handles`], as configured on the stick.
//!
//! **Unlock.** [`SecurityModule::unlock`] sends `KEY_STORE_DECRYPT` with the
//! master key as pyhsm's `yhsm-keystore-unlock` does: the password is the
//! key in hex (at most 64 digits, i.e. 32 bytes), decoded and right-padded
//! with zero bytes to 32. The decoded key is zeroized after use.

use std::fmt;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use otp::aead_file::AeadRecord;
use otp::secrets::SECRETS_LEN;
use otp::{Aead, AeadNonce, KeyHandle, OtpDecode, TokenCiphertext};
use serialport::SerialPort as _;
use zeroize::Zeroizing;

use super::daemon;
use super::proto::{self, AeadResponse, Command, FrameReader, Request, Response, MAX_AEAD_DATA, MAX_ECHO, RESYNC, YUBIKEY_AEAD_LEN};
use crate::{DataKey, Error, Flags, HandleInfo, NonceSource, OtpFault, Password, SecurityModule, Status};

/// Line speed of the YubiHSM 1 (pyhsm's setting; a CDC-ACM device ignores it).
pub const BAUD_RATE: u32 = 115_200;
/// Default deadline for one command.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the input must stay quiet for a drain to end.
const DRAIN_QUIET: Duration = Duration::from_millis(50);
/// A drain gives up after this long, so a line full of noise cannot hold it.
const DRAIN_LIMIT: Duration = Duration::from_secs(1);

/// How to use the device.
#[derive(Clone, Debug, Default)]
pub struct Yhsm1Options {
    /// Deadline of one command (write and whole response); zero means
    /// [`DEFAULT_TIMEOUT`].
    pub timeout: Duration,
    /// The key handles configured on the stick, with their flags: a YubiHSM 1
    /// cannot list them. Returned by [`SecurityModule::key_handles`], and
    /// used to pick `AEAD_GENERATE` or the buffer commands for imports.
    pub handles: Vec<HandleInfo>,
}

impl Yhsm1Options {
    pub(super) fn deadline(&self) -> Duration {
        if self.timeout.is_zero() {
            DEFAULT_TIMEOUT
        } else {
            self.timeout
        }
    }
}

fn remaining(deadline: Instant) -> io::Result<Duration> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        Err(io::Error::new(io::ErrorKind::TimedOut, "the YubiHSM did not answer in time"))
    } else {
        Ok(left)
    }
}

fn closed() -> io::Error {
    io::Error::new(io::ErrorKind::UnexpectedEof, "the serial line was closed")
}

/// Why a command did not complete.
pub(super) enum Fault {
    /// The link failed (timeout, peer gone): close it.
    Io(io::Error),
    /// A frame that makes no sense: resynchronise.
    Garbled(String),
    /// The daemon reports a device fault (it resyncs or reopens by itself).
    Remote(String),
}

impl From<io::Error> for Fault {
    fn from(e: io::Error) -> Self {
        Self::Io(e)
    }
}

impl From<proto::ProtoError> for Fault {
    fn from(e: proto::ProtoError) -> Self {
        Self::Garbled(e.to_string())
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Io(e) => write!(f, "{e}"),
            Self::Garbled(why) => write!(f, "garbled response: {why}"),
            Self::Remote(why) => write!(f, "{why}"),
        }
    }
}

/// Something that runs whole commands on the device.
pub(super) trait Channel: Send {
    /// Run `reqs` in order, without anything else in between, each within
    /// `timeout`.
    fn exchange(&mut self, reqs: &[Request], timeout: Duration) -> Result<Vec<Response>, Fault>;
    /// Bring the line back to a frame boundary.
    fn resync(&mut self, timeout: Duration) -> io::Result<()>;
}

/// The serial port and its frame reader.
pub(super) struct SerialChannel {
    port: serialport::TTYPort,
    reader: FrameReader,
}

impl SerialChannel {
    /// Open the port, resync, query the system info and require protocol 1.
    pub(super) fn open(path: &Path, timeout: Duration) -> Result<(Self, proto::SystemInfo), Error> {
        let io_err = |kind: io::ErrorKind, what: String| Error::io(path, io::Error::new(kind, what));
        let port = serialport::new(path.to_string_lossy(), BAUD_RATE).timeout(timeout).open_native().map_err(|e| {
            let e = io::Error::from(e);
            io_err(e.kind(), format!("cannot open the YubiHSM serial port: {e}"))
        })?;
        let mut chan = Self { port, reader: FrameReader::new() };
        chan.resync(timeout).map_err(|e| io_err(e.kind(), format!("resync: {e}")))?;
        let info = match chan.exchange(&[Request::SystemInfoQuery], timeout) {
            Ok(resps) => match resps.as_slice() {
                [Response::SystemInfo(info)] => *info,
                _ => return Err(io_err(io::ErrorKind::InvalidData, "SYSTEM_INFO_QUERY: unexpected response".to_owned())),
            },
            Err(fault) => {
                // No frame came back: maybe the stick is in configuration
                // mode, where it speaks a text console instead.
                let silent_or_garbled =
                    matches!(&fault, Fault::Io(e) if e.kind() == io::ErrorKind::TimedOut) || matches!(fault, Fault::Garbled(_));
                if silent_or_garbled {
                    if let Some(prompt) = chan.config_prompt(timeout) {
                        return Err(Error::NotReady(format!(
                            "{}: the YubiHSM is in configuration mode (its console answers {prompt:?}), not HSM mode; \
                             unplug it and plug it in again without touching it",
                            path.display()
                        )));
                    }
                }
                let kind = match &fault {
                    Fault::Io(e) => e.kind(),
                    _ => io::ErrorKind::InvalidData,
                };
                return Err(io_err(kind, format!("SYSTEM_INFO_QUERY: {fault}")));
            }
        };
        check_protocol(path, &info)?;
        Ok((chan, info))
    }

    /// pyhsm's check for configuration mode: the console answers carriage
    /// returns with a prompt such as `HSM> ` (also `NO_CFG`, `WSAPI`).
    fn config_prompt(&mut self, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        self.send(b"\r\r\r", deadline).ok()?;
        let mut seen = Vec::new();
        let mut buf = [0u8; 64];
        while seen.len() < 1024 {
            let n = self.recv(&mut buf, deadline).ok()?;
            seen.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&seen);
            let prompt = text
                .split(['\r', '\n'])
                .map(str::trim)
                .find(|line| ["NO_CFG", "WSAPI", "HSM"].iter().any(|p| line.starts_with(p)) && line.ends_with('>'));
            if let Some(prompt) = prompt {
                return Some(prompt.to_owned());
            }
        }
        None
    }

    fn set_timeout(&mut self, t: Duration) -> io::Result<()> {
        self.port.set_timeout(t).map_err(io::Error::from)
    }

    fn send(&mut self, mut bytes: &[u8], deadline: Instant) -> io::Result<()> {
        while !bytes.is_empty() {
            let t = remaining(deadline)?;
            self.set_timeout(t)?;
            match self.port.write(bytes) {
                Ok(0) => return Err(io::Error::new(io::ErrorKind::WriteZero, "the serial line accepted no bytes")),
                Ok(n) => bytes = &bytes[n..],
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Read what is there (at least one byte) before `deadline`.
    fn recv(&mut self, buf: &mut [u8], deadline: Instant) -> io::Result<usize> {
        loop {
            let t = remaining(deadline)?;
            self.set_timeout(t)?;
            match self.port.read(buf) {
                Ok(0) => return Err(closed()),
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Throw away whatever arrives until the line is quiet.
    fn drain(&mut self) -> io::Result<()> {
        let started = Instant::now();
        let mut sink = [0u8; 256];
        self.set_timeout(DRAIN_QUIET)?;
        while started.elapsed() < DRAIN_LIMIT {
            match self.port.read(&mut sink) {
                Ok(0) => return Err(closed()),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::TimedOut => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Err(io::Error::new(io::ErrorKind::InvalidData, "the serial line did not fall quiet after a resync"))
    }

    /// Write one request and read its response.
    fn transact(&mut self, req: &Request, deadline: Instant) -> Result<Response, Fault> {
        let frame = req.encode()?;
        // Anything left from before belongs to no one.
        self.reader.clear();
        self.send(&frame.encode(), deadline)?;
        let mut buf = Zeroizing::new([0u8; 128]);
        loop {
            if let Some(frame) = self.reader.next_frame() {
                return Ok(Response::decode(req.command(), &frame?)?);
            }
            let n = self.recv(&mut buf[..], deadline)?;
            self.reader.push(&buf[..n]);
        }
    }
}

impl Channel for SerialChannel {
    fn exchange(&mut self, reqs: &[Request], timeout: Duration) -> Result<Vec<Response>, Fault> {
        reqs.iter().map(|req| self.transact(req, Instant::now() + timeout)).collect()
    }

    /// 96 zero bytes (`YSM_NULL` without a length byte), then drain.
    fn resync(&mut self, timeout: Duration) -> io::Result<()> {
        self.send(&RESYNC, Instant::now() + timeout)?;
        self.drain()?;
        self.reader.clear();
        Ok(())
    }
}

pub(super) fn check_protocol(path: &Path, info: &proto::SystemInfo) -> Result<(), Error> {
    if info.protocol_version == 1 {
        return Ok(());
    }
    Err(Error::NotReady(format!(
        "{}: the device speaks YubiHSM protocol {}, only protocol 1 is supported",
        path.display(),
        info.protocol_version
    )))
}

/// Where the device is.
#[derive(Clone, Debug)]
enum Target {
    /// A serial port this process opens.
    Serial(PathBuf),
    /// A daemon's socket ([`super::daemon`]).
    Daemon(PathBuf),
}

impl Target {
    fn path(&self) -> &Path {
        match self {
            Self::Serial(p) | Self::Daemon(p) => p,
        }
    }

    fn open(&self, timeout: Duration) -> Result<(Box<dyn Channel>, proto::SystemInfo), Error> {
        match self {
            Self::Serial(path) => SerialChannel::open(path, timeout).map(|(c, i)| (Box::new(c) as Box<dyn Channel>, i)),
            Self::Daemon(path) => daemon::DaemonChannel::connect(path, timeout).map(|(c, i)| (Box::new(c) as Box<dyn Channel>, i)),
        }
    }
}

/// The channel and what is known about the keystore lock.
struct Conn {
    channel: Option<Box<dyn Channel>>,
    /// `Some(true)` once the device said KEY_STORAGE_LOCKED, `Some(false)`
    /// once a key operation or an unlock succeeded.
    locked: Option<bool>,
}

/// A YubiHSM 1 on a serial line, or shared through a daemon. See the
/// [module docs](self).
pub struct Yhsm1 {
    target: Target,
    options: Yhsm1Options,
    info: proto::SystemInfo,
    conn: Mutex<Conn>,
}

impl fmt::Debug for Yhsm1 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Yhsm1").field("target", &self.target).field("info", &self.info).finish_non_exhaustive()
    }
}

/// `firmware 1.0.4, protocol 1, uid …`, for logs.
pub(super) fn describe(info: &proto::SystemInfo) -> String {
    format!(
        "firmware {}.{}.{}, protocol {}, uid {}",
        info.version_major,
        info.version_minor,
        info.version_build,
        info.protocol_version,
        hex::encode(info.system_uid)
    )
}

/// What a refusal means, for [`Error::NotPermitted`].
#[derive(Clone, Copy)]
struct Operation {
    what: &'static str,
    needs: Flags,
}

impl Yhsm1 {
    /// Open the serial device at `path`: resync, `SYSTEM_INFO_QUERY`,
    /// protocol 1. The port is opened exclusively: while this module holds
    /// it, other processes must go through a daemon.
    pub fn open(path: impl AsRef<Path>, options: Yhsm1Options) -> Result<Self, Error> {
        Self::with_target(Target::Serial(path.as_ref().to_path_buf()), options)
    }

    /// Use the device through the daemon listening on `socket`
    /// ([`super::daemon`]).
    pub fn connect(socket: impl AsRef<Path>, options: Yhsm1Options) -> Result<Self, Error> {
        Self::with_target(Target::Daemon(socket.as_ref().to_path_buf()), options)
    }

    fn with_target(target: Target, options: Yhsm1Options) -> Result<Self, Error> {
        let (channel, info) = target.open(options.deadline())?;
        tracing::info!(path = %target.path().display(), device = describe(&info), "opened YubiHSM 1");
        Ok(Self { target, options, info, conn: Mutex::new(Conn { channel: Some(channel), locked: None }) })
    }

    /// The device path (or the daemon's socket).
    #[must_use]
    pub fn path(&self) -> &Path {
        self.target.path()
    }

    /// What the device said about itself (`SYSTEM_INFO_QUERY`) when opened.
    #[must_use]
    pub fn info(&self) -> proto::SystemInfo {
        self.info
    }

    /// `ECHO`: send `data` (at most 95 bytes) and check it comes back.
    pub fn echo(&self, data: &[u8]) -> Result<(), Error> {
        if data.len() > MAX_ECHO {
            return Err(Error::InvalidInput(format!("ECHO carries at most {MAX_ECHO} bytes, not {}", data.len())));
        }
        let mut conn = self.lock();
        self.run(&mut conn, Request::Echo(data.to_vec()), |resp| match resp {
            Response::Echo(back) if back == data => Ok(()),
            _ => Err("the ECHO response differs from the request".to_owned()),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Conn> {
        // A panic mid-command leaves at worst a garbled line, which the
        // next command detects and resyncs.
        self.conn.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn invalid_data(&self, why: String) -> Error {
        Error::io(self.path(), io::Error::new(io::ErrorKind::InvalidData, why))
    }

    /// Run `reqs` back to back: (re)connect if needed, exchange, `check`.
    ///
    /// A garbled frame or a failed check resyncs the line and runs the batch
    /// once more (every command used here may be repeated: decodes are
    /// stateless, and a repeated generation only replaces a secret nobody
    /// has seen); a second failure is returned. An I/O fault (timeout, peer
    /// gone) closes the port, to be reopened by the next call, and is
    /// returned at once, so a call never waits much past its deadline.
    fn run_all<T>(&self, conn: &mut Conn, reqs: &[Request], mut check: impl FnMut(Vec<Response>) -> Result<T, String>) -> Result<T, Error> {
        let timeout = self.options.deadline();
        let command = reqs.last().map_or(Command::Echo, Request::command);
        let mut attempt = 0;
        loop {
            attempt += 1;
            if conn.channel.is_none() {
                conn.locked = None;
                let (channel, info) = self.target.open(timeout)?;
                if info != self.info {
                    tracing::warn!(path = %self.path().display(), device = describe(&info), "a different YubiHSM answered after reconnecting");
                }
                conn.channel = Some(channel);
            }
            let Some(channel) = conn.channel.as_mut() else {
                return Err(Error::NotReady(format!("{}: the YubiHSM is not connected", self.path().display())));
            };
            let result = channel.exchange(reqs, timeout).and_then(|resps| {
                if resps.len() == reqs.len() {
                    check(resps).map_err(Fault::Garbled)
                } else {
                    Err(Fault::Garbled(format!("{} responses to {} requests", resps.len(), reqs.len())))
                }
            });
            match result {
                Ok(v) => return Ok(v),
                Err(Fault::Io(e)) => {
                    tracing::warn!(path = %self.path().display(), %command, error = %e, "YubiHSM I/O fault; the port will be reopened");
                    conn.channel = None;
                    let e = if e.kind() == io::ErrorKind::TimedOut {
                        io::Error::new(io::ErrorKind::TimedOut, format!("the YubiHSM did not answer {command} within {timeout:?}"))
                    } else {
                        io::Error::new(e.kind(), format!("{command} failed on the line to the YubiHSM: {e}"))
                    };
                    return Err(Error::io(self.path(), e));
                }
                Err(Fault::Remote(why)) => return Err(Error::io(self.path(), io::Error::other(format!("{command}: {why}")))),
                Err(Fault::Garbled(why)) => {
                    tracing::warn!(path = %self.path().display(), %command, why, attempt, "garbled YubiHSM response; resyncing");
                    if let Err(e) = channel.resync(timeout) {
                        tracing::warn!(path = %self.path().display(), error = %e, "resync failed; the port will be reopened");
                        conn.channel = None;
                        return Err(self.invalid_data(format!("{command}: {why}")));
                    }
                    if attempt >= 2 {
                        return Err(self.invalid_data(format!("{command}: {why} (again after a resync)")));
                    }
                }
            }
        }
    }

    /// One command.
    fn run<T>(&self, conn: &mut Conn, req: Request, mut check: impl FnMut(Response) -> Result<T, String>) -> Result<T, Error> {
        self.run_all(conn, std::slice::from_ref(&req), |resps| match resps.into_iter().next() {
            Some(resp) => check(resp),
            None => Err("no response".to_owned()),
        })
    }

    /// The error a non-OK status of a key operation means.
    fn refused(&self, conn: &mut Conn, command: Command, status: proto::Status, kh: KeyHandle, op: Operation) -> Error {
        match status {
            proto::Status::KeyHandleInvalid => Error::UnknownKeyHandle(kh),
            proto::Status::AeadInvalid => Error::AeadInvalid(otp::Error::AeadIntegrity),
            proto::Status::OtpInvalid => Error::OtpInvalid(OtpFault::Crc),
            proto::Status::FunctionDisabled => Error::NotPermitted { key_handle: kh, operation: op.what, needs: op.needs },
            proto::Status::KeyStorageLocked => {
                conn.locked = Some(true);
                Error::Locked
            }
            other => Error::NotReady(format!("{}: the YubiHSM refused {command} with status {other}", self.path().display())),
        }
    }

    /// The record an `AEAD_GENERATE`/`BUFFER_AEAD_GENERATE` answer holds,
    /// or the error its status means.
    fn aead_record(
        &self,
        conn: &mut Conn,
        command: Command,
        resp: AeadResponse,
        kh: KeyHandle,
        op: Operation,
    ) -> Result<AeadRecord, Error> {
        if resp.status != proto::Status::Ok {
            return Err(self.refused(conn, command, resp.status, kh, op));
        }
        conn.locked = Some(false);
        let nonce = AeadNonce::new(resp.nonce);
        if nonce.is_zero() {
            return Err(self.invalid_data(format!("{command}: the YubiHSM returned an AEAD with a zero nonce")));
        }
        let aead = Aead::from_slice(&resp.aead).map_err(|e| self.invalid_data(format!("{command}: {e}")))?;
        Ok(AeadRecord { key_handle: kh, nonce, aead })
    }

    fn flags_of(&self, kh: KeyHandle) -> Option<Flags> {
        self.options.handles.iter().find(|h| h.key_handle == kh).map(|h| h.flags)
    }
}

/// The echoed nonce and key handle must match the request (a request nonce
/// of zero, "device chooses", matches any).
fn check_echo(nonce: &proto::Nonce, kh: u32, want_nonce: AeadNonce, want_kh: KeyHandle) -> Result<(), String> {
    if kh != want_kh.get() {
        return Err(format!("the response is for key handle {kh:#x}, not {want_kh}"));
    }
    if !want_nonce.is_zero() && nonce != want_nonce.as_bytes() {
        return Err("the response's nonce differs from the request's".to_owned());
    }
    Ok(())
}

/// An AEAD answer, with its echo checked.
fn aead_answer(resp: Response, nonce: AeadNonce, kh: KeyHandle) -> Result<AeadResponse, String> {
    match resp {
        Response::AeadGenerate(a) | Response::BufferAeadGenerate(a) => {
            check_echo(&a.nonce, a.kh, nonce, kh)?;
            Ok(a)
        }
        _ => Err("unexpected response".to_owned()),
    }
}

impl SecurityModule for Yhsm1 {
    /// `ECHO` tells whether the device answers. Whether its keystore is
    /// locked is what the last key operation or unlock said or, when nothing
    /// is known yet, what an `AEAD_YUBIKEY_OTP_DECODE` of an all-zero AEAD
    /// answers (a check without side effects).
    fn status(&self) -> Status {
        if self.echo(b"status").is_err() {
            return Status::NotReady;
        }
        let mut conn = self.lock();
        match conn.locked {
            Some(true) => return Status::Locked,
            Some(false) => return Status::Ready,
            None => {}
        }
        let kh = self.options.handles.first().map_or(KeyHandle::new(1), |h| h.key_handle);
        let probe = Request::AeadYubikeyOtpDecode { public_id: [0; 6], kh: kh.get(), otp: [0; 16], aead: [0; YUBIKEY_AEAD_LEN] };
        let status = self.run(&mut conn, probe, |resp| match resp {
            Response::AeadYubikeyOtpDecode { public_id, kh: got, status, .. } => {
                check_echo(&public_id, got, AeadNonce::new([0; 6]), kh)?;
                Ok(status)
            }
            _ => Err("unexpected response".to_owned()),
        });
        match status {
            Ok(proto::Status::KeyStorageLocked) => {
                conn.locked = Some(true);
                Status::Locked
            }
            Ok(_) => Status::Ready,
            Err(_) => Status::NotReady,
        }
    }

    fn unlock(&self, password: &Password) -> Result<(), Error> {
        let text = std::str::from_utf8(password.expose())
            .map_err(|_| Error::InvalidInput("the YubiHSM master key must be given in hex".to_owned()))?
            .trim();
        if text.len() > 64 || text.len() % 2 != 0 || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(Error::InvalidInput(
                "the YubiHSM master key must be an even number of hex digits, at most 64 (32 bytes)".to_owned(),
            ));
        }
        let mut key = Zeroizing::new([0u8; 32]);
        hex::decode_to_slice(text, &mut key[..text.len() / 2])
            .map_err(|_| Error::InvalidInput("the YubiHSM master key is not valid hex".to_owned()))?;
        let mut conn = self.lock();
        let status = self.run(&mut conn, Request::KeyStoreDecrypt(key), |resp| match resp {
            Response::KeyStoreDecrypt(status) => Ok(status),
            _ => Err("unexpected response".to_owned()),
        })?;
        match status {
            proto::Status::Ok => {
                conn.locked = Some(false);
                tracing::info!(path = %self.path().display(), "YubiHSM keystore unlocked");
                Ok(())
            }
            proto::Status::Mismatch | proto::Status::KeyStorageLocked => {
                conn.locked = Some(true);
                Err(Error::WrongPassword)
            }
            other => Err(Error::NotReady(format!("{}: the YubiHSM refused KEY_STORE_DECRYPT with status {other}", self.path().display()))),
        }
    }

    fn random(&self, out: &mut [u8]) -> Result<(), Error> {
        let mut conn = self.lock();
        for chunk in out.chunks_mut(MAX_ECHO) {
            let n = u8::try_from(chunk.len()).unwrap_or(u8::MAX);
            self.run(&mut conn, Request::RandomGenerate(n), |resp| match resp {
                Response::RandomGenerate(bytes) if bytes.len() == chunk.len() => {
                    chunk.copy_from_slice(&bytes);
                    Ok(())
                }
                _ => Err(format!("asked for {n} random bytes, got another answer")),
            })?;
        }
        Ok(())
    }

    fn key_handles(&self) -> Result<Vec<HandleInfo>, Error> {
        Ok(self.options.handles.clone())
    }

    fn generate_yubikey_aeads(&self, handles: &[KeyHandle], nonce: NonceSource) -> Result<Vec<AeadRecord>, Error> {
        if handles.is_empty() {
            return Err(Error::InvalidInput("no key handles given".to_owned()));
        }
        let (nonce, needs) = request_nonce(nonce, Flags::BUFFER_AEAD_GENERATE);
        let op = Operation { what: "generate AEADs", needs };
        // One sequence, nothing in between (not even another process's
        // command through a daemon): load 22 random bytes into the device's
        // buffer, then AEAD it under each handle. The secret never crosses
        // the line.
        let len = u8::try_from(SECRETS_LEN).unwrap_or(u8::MAX);
        let mut reqs = vec![Request::BufferRandomLoad { offset: 0, len }];
        reqs.extend(handles.iter().map(|kh| Request::BufferAeadGenerate { nonce: *nonce.as_bytes(), kh: kh.get() }));
        let mut conn = self.lock();
        let answers = self.run_all(&mut conn, &reqs, |resps| {
            let mut resps = resps.into_iter();
            match resps.next() {
                Some(Response::BufferRandomLoad(n)) if n == len => {}
                _ => return Err(format!("BUFFER_RANDOM_LOAD did not fill the buffer with {len} bytes")),
            }
            resps.zip(handles).map(|(resp, kh)| aead_answer(resp, nonce, *kh)).collect::<Result<Vec<_>, _>>()
        })?;
        answers.into_iter().zip(handles).map(|(a, kh)| self.aead_record(&mut conn, Command::BufferAeadGenerate, a, *kh, op)).collect()
    }

    fn import_aead(&self, kh: KeyHandle, nonce: NonceSource, plaintext: &[u8]) -> Result<AeadRecord, Error> {
        if plaintext.is_empty() || plaintext.len() > MAX_AEAD_DATA {
            return Err(Error::InvalidInput(format!("a YubiHSM AEAD holds 1 to {MAX_AEAD_DATA} bytes, not {}", plaintext.len())));
        }
        let (nonce, needs) = request_nonce(nonce, Flags::AEAD_GENERATE);
        let op = Operation { what: "wrap imported secrets", needs };
        let buffered = Flags::BUFFER_LOAD | Flags::BUFFER_AEAD_GENERATE;
        // AEAD_GENERATE unless the configured flags say only the buffer
        // commands are allowed; with no configured flags, try both.
        let configured = self.flags_of(kh);
        let use_buffer = configured.is_some_and(|f| !f.contains(Flags::AEAD_GENERATE) && f.contains(buffered));
        let mut conn = self.lock();
        if !use_buffer {
            let req = Request::AeadGenerate { nonce: *nonce.as_bytes(), kh: kh.get(), data: Zeroizing::new(plaintext.to_vec()) };
            let answer = self.run(&mut conn, req, |resp| aead_answer(resp, nonce, kh))?;
            match self.aead_record(&mut conn, Command::AeadGenerate, answer, kh, op) {
                Err(Error::NotPermitted { .. }) if configured.is_none() => {}
                other => return other,
            }
        }
        let reqs = [
            Request::BufferLoad { offset: 0, data: Zeroizing::new(plaintext.to_vec()) },
            Request::BufferAeadGenerate { nonce: *nonce.as_bytes(), kh: kh.get() },
        ];
        let answer = self.run_all(&mut conn, &reqs, |resps| {
            let mut resps = resps.into_iter();
            match resps.next() {
                Some(Response::BufferLoad(n)) if usize::from(n) == plaintext.len() => {}
                _ => return Err(format!("BUFFER_LOAD did not leave the {} bytes sent in the buffer", plaintext.len())),
            }
            aead_answer(resps.next().ok_or("no BUFFER_AEAD_GENERATE response")?, nonce, kh)
        })?;
        self.aead_record(&mut conn, Command::BufferAeadGenerate, answer, kh, op)
    }

    fn decode_otp(&self, record: &AeadRecord, otp: &TokenCiphertext) -> Result<OtpDecode, Error> {
        let aead: [u8; YUBIKEY_AEAD_LEN] = record
            .aead
            .as_bytes()
            .try_into()
            .map_err(|_| Error::AeadInvalid(otp::Error::Length { what: "YubiKey AEAD", expected: "30", got: record.aead.len() }))?;
        let kh = record.key_handle;
        let req = Request::AeadYubikeyOtpDecode { public_id: *record.nonce.as_bytes(), kh: kh.get(), otp: *otp.as_bytes(), aead };
        let mut conn = self.lock();
        let (status, decoded) = self.run(&mut conn, req, |resp| match resp {
            Response::AeadYubikeyOtpDecode { public_id, kh: got, use_ctr, session_ctr, timestamp_high, timestamp_low, status } => {
                check_echo(&public_id, got, record.nonce, kh)?;
                Ok((status, OtpDecode { use_ctr, session_ctr, timestamp_high, timestamp_low }))
            }
            _ => Err("unexpected response".to_owned()),
        })?;
        if status != proto::Status::Ok {
            let op = Operation { what: "decode OTPs", needs: Flags::OTP_DECODE };
            return Err(self.refused(&mut conn, Command::AeadYubikeyOtpDecode, status, kh, op));
        }
        conn.locked = Some(false);
        Ok(decoded)
    }

    /// Not offered: a YubiHSM 1 never returns an AEAD's plaintext.
    fn decrypt_aead(&self, record: &AeadRecord) -> Result<Zeroizing<Vec<u8>>, Error> {
        Err(Error::NotPermitted {
            key_handle: record.key_handle,
            operation: "export AEAD plaintext (a YubiHSM 1 has no such command)",
            needs: Flags::EXPORT,
        })
    }

    /// Not offered: a YubiHSM 1 has no data keys; use another module.
    fn encrypt_value(&self, key: DataKey, _plaintext: &[u8]) -> Result<Vec<u8>, Error> {
        Err(no_data_keys(key))
    }

    /// Not offered: a YubiHSM 1 has no data keys; use another module.
    fn decrypt_value(&self, key: DataKey, _ciphertext: &[u8]) -> Result<Zeroizing<Vec<u8>>, Error> {
        Err(no_data_keys(key))
    }
}

fn no_data_keys(key: DataKey) -> Error {
    Error::InvalidInput(format!("a YubiHSM 1 has no data keys: the {} key needs another security module (soft or PKCS#11)", key.name()))
}

/// The nonce to send (zero: "the device chooses") and the flags the
/// operation then needs.
fn request_nonce(nonce: NonceSource, base: Flags) -> (AeadNonce, Flags) {
    match nonce {
        NonceSource::Given(n) if !n.is_zero() => (n, base | Flags::USER_NONCE),
        _ => (AeadNonce::new([0; 6]), base),
    }
}

/// A daemon's connection to the device: used by [`super::daemon`].
pub(super) fn open_serial(path: &Path, timeout: Duration) -> Result<(Box<dyn Channel>, proto::SystemInfo), Error> {
    Target::Serial(path.to_path_buf()).open(timeout)
}
