//! The YubiHSM 1 serial protocol (HSM mode), without I/O.
//!
//! A frame on the wire is `bcnt ‖ cmd ‖ payload`, where `bcnt` counts the
//! command byte and the payload (`bcnt = 1 + payload length`) and the payload
//! holds at most [`MAX_PAYLOAD`] bytes. A response repeats the command with
//! [`RESPONSE_FLAG`] set. Integers are little-endian.
//!
//! A client resynchronises the link by sending [`RESYNC`], 96 zero bytes
//! without a length byte (`YSM_NULL`); [`FrameReader`] skips zero bytes
//! between frames and drops a frame whose command byte is zero.
//!
//! Both sides are here: a client encodes a [`Request`] and decodes a
//! [`Response`]; a device (the emulator) decodes a [`Request`] and encodes a
//! [`Response`].

use std::fmt;

use zeroize::Zeroizing;

/// Largest payload of one frame (`YSM_MAX_PKT_SIZE`).
pub const MAX_PAYLOAD: usize = 0x60;
/// Largest `bcnt` value: the command byte plus a full payload.
pub const MAX_BCNT: usize = MAX_PAYLOAD + 1;
/// Set on the command byte of every response (`YSM_RESPONSE`).
pub const RESPONSE_FLAG: u8 = 0x80;
/// The resynchronisation sequence: `YSM_NULL` and 95 zero bytes, no length byte.
pub const RESYNC: [u8; 96] = [0; 96];
/// Largest data of one `YSM_AEAD_GENERATE` or `YSM_BUFFER_LOAD` (and the
/// size of the internal buffer).
pub const MAX_AEAD_DATA: usize = 64;
/// Largest `YSM_ECHO` / `YSM_RANDOM_GENERATE` byte count.
pub const MAX_ECHO: usize = MAX_PAYLOAD - 1;
/// Largest `YSM_HMAC_SHA1_GENERATE` data per frame.
pub const MAX_HMAC_DATA: usize = MAX_PAYLOAD - 6;
/// Size of a YubiKey AEAD: secrets (22) plus the MAC (8).
pub const YUBIKEY_AEAD_LEN: usize = 30;
/// Size of a SHA-1 digest.
pub const SHA1_LEN: usize = 20;
/// `YSM_HMAC_SHA1_GENERATE` flag: start a new HMAC.
pub const HMAC_RESET: u8 = 0x01;
/// `YSM_HMAC_SHA1_GENERATE` flag: this is the last part; return the hash.
pub const HMAC_FINAL: u8 = 0x02;
/// `YSM_HMAC_SHA1_GENERATE` flag: write the hash to the internal buffer.
pub const HMAC_TO_BUFFER: u8 = 0x04;

/// Errors of the protocol codec.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProtoError {
    /// A length byte larger than a frame can be: the link is out of sync.
    #[error("frame length byte {0:#04x} exceeds the largest frame ({MAX_BCNT:#04x}); resynchronising")]
    Oversized(u8),
    /// A payload too long for one frame.
    #[error("payload of {0} bytes exceeds the {MAX_PAYLOAD}-byte frame limit")]
    PayloadTooLong(usize),
    /// A command byte this codec does not know.
    #[error("unsupported YubiHSM command {0:#04x}")]
    UnknownCommand(u8),
    /// A response to another command than the one sent.
    #[error("YubiHSM answered command {got:#04x} to command {sent:#04x}")]
    WrongResponse {
        /// The request's command.
        sent: u8,
        /// The response's command byte.
        got: u8,
    },
    /// A payload whose length or contents do not fit its command.
    #[error("malformed {command} payload: {reason}")]
    Malformed {
        /// The command's name.
        command: &'static str,
        /// What is wrong.
        reason: String,
    },
}

fn malformed(command: Command, reason: impl Into<String>) -> ProtoError {
    ProtoError::Malformed { command: command.name(), reason: reason.into() }
}

/// The commands this codec speaks (`YSM_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Command {
    /// `YSM_AEAD_GENERATE` (0x01): AEAD of host data.
    AeadGenerate,
    /// `YSM_BUFFER_AEAD_GENERATE` (0x02): AEAD of the internal buffer.
    BufferAeadGenerate,
    /// `YSM_RANDOM_AEAD_GENERATE` (0x03): AEAD of random bytes.
    RandomAeadGenerate,
    /// `YSM_AEAD_DECRYPT_CMP` (0x04): compare an AEAD's plaintext.
    AeadDecryptCmp,
    /// `YSM_AEAD_YUBIKEY_OTP_DECODE` (0x06).
    AeadYubikeyOtpDecode,
    /// `YSM_HMAC_SHA1_GENERATE` (0x10).
    HmacSha1Generate,
    /// `YSM_BUFFER_LOAD` (0x20).
    BufferLoad,
    /// `YSM_BUFFER_RANDOM_LOAD` (0x21).
    BufferRandomLoad,
    /// `YSM_NONCE_GET` (0x22).
    NonceGet,
    /// `YSM_ECHO` (0x23).
    Echo,
    /// `YSM_RANDOM_GENERATE` (0x24).
    RandomGenerate,
    /// `YSM_SYSTEM_INFO_QUERY` (0x26).
    SystemInfoQuery,
    /// `YSM_KEY_STORE_DECRYPT` (0x29): unlock with the master key.
    KeyStoreDecrypt,
}

impl Command {
    /// Every command, for tables and tests.
    pub const ALL: [Self; 13] = [
        Self::AeadGenerate,
        Self::BufferAeadGenerate,
        Self::RandomAeadGenerate,
        Self::AeadDecryptCmp,
        Self::AeadYubikeyOtpDecode,
        Self::HmacSha1Generate,
        Self::BufferLoad,
        Self::BufferRandomLoad,
        Self::NonceGet,
        Self::Echo,
        Self::RandomGenerate,
        Self::SystemInfoQuery,
        Self::KeyStoreDecrypt,
    ];

    /// The command byte.
    #[must_use]
    pub const fn code(self) -> u8 {
        match self {
            Self::AeadGenerate => 0x01,
            Self::BufferAeadGenerate => 0x02,
            Self::RandomAeadGenerate => 0x03,
            Self::AeadDecryptCmp => 0x04,
            Self::AeadYubikeyOtpDecode => 0x06,
            Self::HmacSha1Generate => 0x10,
            Self::BufferLoad => 0x20,
            Self::BufferRandomLoad => 0x21,
            Self::NonceGet => 0x22,
            Self::Echo => 0x23,
            Self::RandomGenerate => 0x24,
            Self::SystemInfoQuery => 0x26,
            Self::KeyStoreDecrypt => 0x29,
        }
    }

    /// The command of a command byte (the response flag ignored).
    #[must_use]
    pub fn from_code(code: u8) -> Option<Self> {
        let code = code & !RESPONSE_FLAG;
        Self::ALL.into_iter().find(|c| c.code() == code)
    }

    /// The `YSM_*` name.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::AeadGenerate => "YSM_AEAD_GENERATE",
            Self::BufferAeadGenerate => "YSM_BUFFER_AEAD_GENERATE",
            Self::RandomAeadGenerate => "YSM_RANDOM_AEAD_GENERATE",
            Self::AeadDecryptCmp => "YSM_AEAD_DECRYPT_CMP",
            Self::AeadYubikeyOtpDecode => "YSM_AEAD_YUBIKEY_OTP_DECODE",
            Self::HmacSha1Generate => "YSM_HMAC_SHA1_GENERATE",
            Self::BufferLoad => "YSM_BUFFER_LOAD",
            Self::BufferRandomLoad => "YSM_BUFFER_RANDOM_LOAD",
            Self::NonceGet => "YSM_NONCE_GET",
            Self::Echo => "YSM_ECHO",
            Self::RandomGenerate => "YSM_RANDOM_GENERATE",
            Self::SystemInfoQuery => "YSM_SYSTEM_INFO_QUERY",
            Self::KeyStoreDecrypt => "YSM_KEY_STORE_DECRYPT",
        }
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A status byte (`YSM_STATUS`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Status {
    /// 0x80 `YSM_STATUS_OK`.
    Ok,
    /// 0x81 `YSM_KEY_HANDLE_INVALID`: no such key handle.
    KeyHandleInvalid,
    /// 0x82 `YSM_AEAD_INVALID`: the AEAD's MAC did not verify.
    AeadInvalid,
    /// 0x83 `YSM_OTP_INVALID`: CRC or private id wrong.
    OtpInvalid,
    /// 0x84 `YSM_OTP_REPLAY`.
    OtpReplay,
    /// 0x85 `YSM_ID_DUPLICATE`.
    IdDuplicate,
    /// 0x86 `YSM_ID_NOT_FOUND`.
    IdNotFound,
    /// 0x87 `YSM_DB_FULL`.
    DbFull,
    /// 0x88 `YSM_MEMORY_ERROR`.
    MemoryError,
    /// 0x89 `YSM_FUNCTION_DISABLED`: the key handle's flags forbid it.
    FunctionDisabled,
    /// 0x8a `YSM_KEY_STORAGE_LOCKED`.
    KeyStorageLocked,
    /// 0x8b `YSM_MISMATCH`.
    Mismatch,
    /// 0x8c `YSM_INVALID_PARAMETER`.
    InvalidParameter,
    /// Any other byte.
    Other(u8),
}

impl Status {
    /// The status byte.
    #[must_use]
    pub const fn code(self) -> u8 {
        match self {
            Self::Ok => 0x80,
            Self::KeyHandleInvalid => 0x81,
            Self::AeadInvalid => 0x82,
            Self::OtpInvalid => 0x83,
            Self::OtpReplay => 0x84,
            Self::IdDuplicate => 0x85,
            Self::IdNotFound => 0x86,
            Self::DbFull => 0x87,
            Self::MemoryError => 0x88,
            Self::FunctionDisabled => 0x89,
            Self::KeyStorageLocked => 0x8a,
            Self::Mismatch => 0x8b,
            Self::InvalidParameter => 0x8c,
            Self::Other(b) => b,
        }
    }

    /// The status of a byte.
    #[must_use]
    pub const fn from_code(b: u8) -> Self {
        match b {
            0x80 => Self::Ok,
            0x81 => Self::KeyHandleInvalid,
            0x82 => Self::AeadInvalid,
            0x83 => Self::OtpInvalid,
            0x84 => Self::OtpReplay,
            0x85 => Self::IdDuplicate,
            0x86 => Self::IdNotFound,
            0x87 => Self::DbFull,
            0x88 => Self::MemoryError,
            0x89 => Self::FunctionDisabled,
            0x8a => Self::KeyStorageLocked,
            0x8b => Self::Mismatch,
            0x8c => Self::InvalidParameter,
            b => Self::Other(b),
        }
    }

    /// The `YSM_*` name.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Ok => "YSM_STATUS_OK",
            Self::KeyHandleInvalid => "YSM_KEY_HANDLE_INVALID",
            Self::AeadInvalid => "YSM_AEAD_INVALID",
            Self::OtpInvalid => "YSM_OTP_INVALID",
            Self::OtpReplay => "YSM_OTP_REPLAY",
            Self::IdDuplicate => "YSM_ID_DUPLICATE",
            Self::IdNotFound => "YSM_ID_NOT_FOUND",
            Self::DbFull => "YSM_DB_FULL",
            Self::MemoryError => "YSM_MEMORY_ERROR",
            Self::FunctionDisabled => "YSM_FUNCTION_DISABLED",
            Self::KeyStorageLocked => "YSM_KEY_STORAGE_LOCKED",
            Self::Mismatch => "YSM_MISMATCH",
            Self::InvalidParameter => "YSM_INVALID_PARAMETER",
            Self::Other(_) => "unknown status",
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({:#04x})", self.name(), self.code())
    }
}

/// One frame: a command byte and its payload.
#[derive(Clone, PartialEq, Eq)]
pub struct Frame {
    /// The command byte (with [`RESPONSE_FLAG`] for responses).
    pub cmd: u8,
    /// The payload, at most [`MAX_PAYLOAD`] bytes. Zeroized on drop: it may
    /// carry secrets (buffer loads, the master key).
    pub payload: Zeroizing<Vec<u8>>,
}

impl fmt::Debug for Frame {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Frame(cmd {:#04x}, {} payload bytes)", self.cmd, self.payload.len())
    }
}

impl Frame {
    /// A frame; the payload must fit.
    pub fn new(cmd: u8, payload: Vec<u8>) -> Result<Self, ProtoError> {
        if payload.len() > MAX_PAYLOAD {
            return Err(ProtoError::PayloadTooLong(payload.len()));
        }
        Ok(Self { cmd, payload: Zeroizing::new(payload) })
    }

    /// The bytes on the wire: `bcnt ‖ cmd ‖ payload`.
    #[must_use]
    pub fn encode(&self) -> Zeroizing<Vec<u8>> {
        let mut out = Zeroizing::new(Vec::with_capacity(self.payload.len() + 2));
        // `new` and the reader keep the payload within MAX_PAYLOAD, so the
        // count fits a byte; saturate rather than wrap if a caller built one
        // by hand.
        out.push(u8::try_from(self.payload.len() + 1).unwrap_or(u8::MAX));
        out.push(self.cmd);
        out.extend_from_slice(&self.payload);
        out
    }

    /// Is this a response (command byte with [`RESPONSE_FLAG`])?
    #[must_use]
    pub fn is_response(&self) -> bool {
        self.cmd & RESPONSE_FLAG != 0
    }
}

/// Reads frames out of arbitrary byte chunks.
///
/// Feed it what the line delivers with [`FrameReader::push`], then take
/// frames with [`FrameReader::next_frame`] until it returns `None`. Zero
/// bytes between frames are skipped (the [`RESYNC`] sequence), a frame whose
/// command byte is zero (`YSM_NULL`) is dropped, and a run of 96 zero bytes
/// inside a frame abandons it. A length byte larger than [`MAX_BCNT`] is
/// reported once as [`ProtoError::Oversized`]; then bytes are discarded up to
/// the next zero byte, where the reader starts over.
#[derive(Default)]
pub struct FrameReader {
    input: std::collections::VecDeque<u8>,
    /// The frame being assembled: `bcnt` then the bytes read so far.
    partial: Option<(usize, Zeroizing<Vec<u8>>)>,
    zero_run: usize,
    discarding: bool,
}

impl fmt::Debug for FrameReader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FrameReader")
            .field("buffered", &self.input.len())
            .field("in_frame", &self.partial.is_some())
            .field("discarding", &self.discarding)
            .finish()
    }
}

impl FrameReader {
    /// An empty reader.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Append bytes read from the line.
    pub fn push(&mut self, bytes: &[u8]) {
        self.input.extend(bytes);
    }

    /// Forget everything buffered and any partial frame (after a resync).
    pub fn clear(&mut self) {
        self.input.clear();
        self.partial = None;
        self.zero_run = 0;
        self.discarding = false;
    }

    /// Is a frame partly read, or input waiting?
    #[must_use]
    pub fn is_idle(&self) -> bool {
        self.input.is_empty() && self.partial.is_none()
    }

    /// The next complete frame, an error for a broken length byte, or `None`
    /// when more input is needed.
    pub fn next_frame(&mut self) -> Option<Result<Frame, ProtoError>> {
        while let Some(b) = self.input.pop_front() {
            if b == 0 {
                self.zero_run += 1;
            } else {
                self.zero_run = 0;
            }
            if self.discarding {
                if b == 0 {
                    self.discarding = false;
                }
                continue;
            }
            let Some((bcnt, bytes)) = self.partial.as_mut() else {
                match usize::from(b) {
                    0 => continue,
                    n if n > MAX_BCNT => {
                        self.discarding = true;
                        return Some(Err(ProtoError::Oversized(b)));
                    }
                    n => {
                        self.partial = Some((n, Zeroizing::new(Vec::with_capacity(n))));
                        continue;
                    }
                }
            };
            bytes.push(b);
            if bytes.len() == *bcnt {
                let done = self.partial.take();
                let Some((_, bytes)) = done else { continue };
                let cmd = bytes[0];
                if cmd == 0 {
                    continue;
                }
                return Some(Ok(Frame { cmd, payload: Zeroizing::new(bytes[1..].to_vec()) }));
            }
            if self.zero_run >= RESYNC.len() {
                self.partial = None;
            }
        }
        None
    }
}

/// A 6-byte AEAD nonce (or YubiKey public id) as sent on the line.
pub type Nonce = [u8; 6];

/// A request to the YubiHSM.
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Request {
    /// `YSM_ECHO`: up to [`MAX_ECHO`] bytes.
    Echo(Vec<u8>),
    /// `YSM_SYSTEM_INFO_QUERY`.
    SystemInfoQuery,
    /// `YSM_RANDOM_GENERATE`: this many random bytes (≤ [`MAX_ECHO`]).
    RandomGenerate(u8),
    /// `YSM_BUFFER_RANDOM_LOAD`: put `len` random bytes at `offset` (offset 0
    /// clears the buffer first).
    BufferRandomLoad {
        /// Where in the buffer.
        offset: u8,
        /// How many bytes.
        len: u8,
    },
    /// `YSM_BUFFER_LOAD`: put `data` at `offset` (offset 0 clears the buffer
    /// first).
    BufferLoad {
        /// Where in the buffer.
        offset: u8,
        /// At most [`MAX_AEAD_DATA`] bytes.
        data: Zeroizing<Vec<u8>>,
    },
    /// `YSM_BUFFER_AEAD_GENERATE`: AEAD of the buffer.
    BufferAeadGenerate {
        /// The nonce (zero: the device picks one).
        nonce: Nonce,
        /// The key handle.
        kh: u32,
    },
    /// `YSM_AEAD_GENERATE`: AEAD of `data`.
    AeadGenerate {
        /// The nonce (zero: the device picks one).
        nonce: Nonce,
        /// The key handle.
        kh: u32,
        /// 1 to [`MAX_AEAD_DATA`] bytes.
        data: Zeroizing<Vec<u8>>,
    },
    /// `YSM_RANDOM_AEAD_GENERATE`: AEAD of `len` random bytes.
    RandomAeadGenerate {
        /// The nonce (zero: the device picks one).
        nonce: Nonce,
        /// The key handle.
        kh: u32,
        /// How many random bytes.
        len: u8,
    },
    /// `YSM_AEAD_YUBIKEY_OTP_DECODE`.
    AeadYubikeyOtpDecode {
        /// The YubiKey's public id, the AEAD's nonce.
        public_id: Nonce,
        /// The key handle.
        kh: u32,
        /// The 16-byte encrypted token.
        otp: [u8; 16],
        /// The YubiKey's 30-byte AEAD.
        aead: [u8; YUBIKEY_AEAD_LEN],
    },
    /// `YSM_AEAD_DECRYPT_CMP`: does the AEAD hold `data[..n - 8 - plen]`?
    AeadDecryptCmp {
        /// The AEAD's nonce.
        nonce: Nonce,
        /// The key handle.
        kh: u32,
        /// Cleartext followed by the AEAD (so cleartext length + plaintext
        /// length + 8 bytes).
        data: Zeroizing<Vec<u8>>,
    },
    /// `YSM_KEY_STORE_DECRYPT`: unlock the keystore with its master key.
    KeyStoreDecrypt(Zeroizing<[u8; 32]>),
    /// `YSM_NONCE_GET`: read the nonce counter, then add `increment`.
    NonceGet(u16),
    /// `YSM_HMAC_SHA1_GENERATE`: one part of an HMAC-SHA1.
    HmacSha1Generate {
        /// The key handle.
        kh: u32,
        /// [`HMAC_RESET`], [`HMAC_FINAL`], [`HMAC_TO_BUFFER`].
        flags: u8,
        /// At most [`MAX_HMAC_DATA`] bytes.
        data: Vec<u8>,
    },
}

impl fmt::Debug for Request {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::KeyStoreDecrypt(_) => f.write_str("KeyStoreDecrypt(REDACTED)"),
            Self::BufferLoad { offset, data } => write!(f, "BufferLoad {{ offset: {offset}, {} bytes REDACTED }}", data.len()),
            Self::AeadGenerate { nonce, kh, data } => {
                write!(f, "AeadGenerate {{ nonce: {}, kh: {kh:#x}, {} bytes REDACTED }}", hex::encode(nonce), data.len())
            }
            Self::AeadDecryptCmp { nonce, kh, data } => {
                write!(f, "AeadDecryptCmp {{ nonce: {}, kh: {kh:#x}, {} bytes REDACTED }}", hex::encode(nonce), data.len())
            }
            other => write!(f, "{}", other.command()),
        }
    }
}

/// Cursor over a payload, for decoding.
struct Reader<'a> {
    cmd: Command,
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], ProtoError> {
        if self.bytes.len() < n {
            return Err(malformed(self.cmd, format!("truncated: needs {n} more bytes, has {}", self.bytes.len())));
        }
        let (head, tail) = self.bytes.split_at(n);
        self.bytes = tail;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, ProtoError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, ProtoError> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, ProtoError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], ProtoError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }
    /// A count byte and that many bytes.
    fn counted(&mut self, max: usize) -> Result<&'a [u8], ProtoError> {
        let n = usize::from(self.u8()?);
        if n > max {
            return Err(malformed(self.cmd, format!("byte count {n} exceeds {max}")));
        }
        self.take(n)
    }
    fn end(self) -> Result<(), ProtoError> {
        if self.bytes.is_empty() {
            Ok(())
        } else {
            Err(malformed(self.cmd, format!("{} unexpected trailing bytes", self.bytes.len())))
        }
    }
}

fn count_byte(cmd: Command, n: usize, max: usize) -> Result<u8, ProtoError> {
    if n > max {
        return Err(malformed(cmd, format!("{n} bytes exceed {max}")));
    }
    u8::try_from(n).map_err(|_| malformed(cmd, format!("{n} bytes exceed {max}")))
}

impl Request {
    /// The command.
    #[must_use]
    pub fn command(&self) -> Command {
        match self {
            Self::Echo(_) => Command::Echo,
            Self::SystemInfoQuery => Command::SystemInfoQuery,
            Self::RandomGenerate(_) => Command::RandomGenerate,
            Self::BufferRandomLoad { .. } => Command::BufferRandomLoad,
            Self::BufferLoad { .. } => Command::BufferLoad,
            Self::BufferAeadGenerate { .. } => Command::BufferAeadGenerate,
            Self::AeadGenerate { .. } => Command::AeadGenerate,
            Self::RandomAeadGenerate { .. } => Command::RandomAeadGenerate,
            Self::AeadYubikeyOtpDecode { .. } => Command::AeadYubikeyOtpDecode,
            Self::AeadDecryptCmp { .. } => Command::AeadDecryptCmp,
            Self::KeyStoreDecrypt(_) => Command::KeyStoreDecrypt,
            Self::NonceGet(_) => Command::NonceGet,
            Self::HmacSha1Generate { .. } => Command::HmacSha1Generate,
        }
    }

    /// Encode as a frame (client side). Fails if a field is too long.
    pub fn encode(&self) -> Result<Frame, ProtoError> {
        let cmd = self.command();
        let mut p = Vec::with_capacity(MAX_PAYLOAD);
        match self {
            Self::Echo(data) => {
                p.push(count_byte(cmd, data.len(), MAX_ECHO)?);
                p.extend_from_slice(data);
            }
            Self::SystemInfoQuery => {}
            Self::RandomGenerate(n) => {
                count_byte(cmd, usize::from(*n), MAX_ECHO)?;
                p.push(*n);
            }
            Self::BufferRandomLoad { offset, len } => p.extend_from_slice(&[*offset, *len]),
            Self::BufferLoad { offset, data } => {
                p.push(*offset);
                p.push(count_byte(cmd, data.len(), MAX_AEAD_DATA)?);
                p.extend_from_slice(data);
            }
            Self::BufferAeadGenerate { nonce, kh } => {
                p.extend_from_slice(nonce);
                p.extend_from_slice(&kh.to_le_bytes());
            }
            Self::AeadGenerate { nonce, kh, data } => {
                p.extend_from_slice(nonce);
                p.extend_from_slice(&kh.to_le_bytes());
                p.push(count_byte(cmd, data.len(), MAX_AEAD_DATA)?);
                p.extend_from_slice(data);
            }
            Self::RandomAeadGenerate { nonce, kh, len } => {
                p.extend_from_slice(nonce);
                p.extend_from_slice(&kh.to_le_bytes());
                p.push(*len);
            }
            Self::AeadYubikeyOtpDecode { public_id, kh, otp, aead } => {
                p.extend_from_slice(public_id);
                p.extend_from_slice(&kh.to_le_bytes());
                p.extend_from_slice(otp);
                p.extend_from_slice(aead);
            }
            Self::AeadDecryptCmp { nonce, kh, data } => {
                p.extend_from_slice(nonce);
                p.extend_from_slice(&kh.to_le_bytes());
                p.push(count_byte(cmd, data.len(), MAX_PAYLOAD - 11)?);
                p.extend_from_slice(data);
            }
            Self::KeyStoreDecrypt(key) => p.extend_from_slice(&key[..]),
            Self::NonceGet(inc) => p.extend_from_slice(&inc.to_le_bytes()),
            Self::HmacSha1Generate { kh, flags, data } => {
                p.extend_from_slice(&kh.to_le_bytes());
                p.push(*flags);
                p.push(count_byte(cmd, data.len(), MAX_HMAC_DATA)?);
                p.extend_from_slice(data);
            }
        }
        Frame::new(cmd.code(), p)
    }

    /// Decode a request frame (device side).
    pub fn decode(frame: &Frame) -> Result<Self, ProtoError> {
        if frame.is_response() {
            return Err(ProtoError::UnknownCommand(frame.cmd));
        }
        let cmd = Command::from_code(frame.cmd).ok_or(ProtoError::UnknownCommand(frame.cmd))?;
        let mut r = Reader { cmd, bytes: &frame.payload };
        let req = match cmd {
            Command::Echo => Self::Echo(r.counted(MAX_ECHO)?.to_vec()),
            Command::SystemInfoQuery => Self::SystemInfoQuery,
            Command::RandomGenerate => Self::RandomGenerate(r.u8()?),
            Command::BufferRandomLoad => Self::BufferRandomLoad { offset: r.u8()?, len: r.u8()? },
            Command::BufferLoad => {
                let offset = r.u8()?;
                Self::BufferLoad { offset, data: Zeroizing::new(r.counted(MAX_AEAD_DATA)?.to_vec()) }
            }
            Command::BufferAeadGenerate => Self::BufferAeadGenerate { nonce: r.array()?, kh: r.u32()? },
            Command::AeadGenerate => {
                let (nonce, kh) = (r.array()?, r.u32()?);
                Self::AeadGenerate { nonce, kh, data: Zeroizing::new(r.counted(MAX_AEAD_DATA)?.to_vec()) }
            }
            Command::RandomAeadGenerate => Self::RandomAeadGenerate { nonce: r.array()?, kh: r.u32()?, len: r.u8()? },
            Command::AeadYubikeyOtpDecode => {
                Self::AeadYubikeyOtpDecode { public_id: r.array()?, kh: r.u32()?, otp: r.array()?, aead: r.array()? }
            }
            Command::AeadDecryptCmp => {
                let (nonce, kh) = (r.array()?, r.u32()?);
                Self::AeadDecryptCmp { nonce, kh, data: Zeroizing::new(r.counted(MAX_PAYLOAD - 11)?.to_vec()) }
            }
            Command::KeyStoreDecrypt => Self::KeyStoreDecrypt(Zeroizing::new(r.array()?)),
            Command::NonceGet => Self::NonceGet(r.u16()?),
            Command::HmacSha1Generate => {
                let (kh, flags) = (r.u32()?, r.u8()?);
                Self::HmacSha1Generate { kh, flags, data: r.counted(MAX_HMAC_DATA)?.to_vec() }
            }
        };
        r.end()?;
        Ok(req)
    }
}

/// The answer to `YSM_SYSTEM_INFO_QUERY`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SystemInfo {
    /// Firmware major version.
    pub version_major: u8,
    /// Firmware minor version.
    pub version_minor: u8,
    /// Firmware build.
    pub version_build: u8,
    /// Protocol version (1; pyhsm refuses anything else).
    pub protocol_version: u8,
    /// The device's unique id.
    pub system_uid: [u8; 12],
}

/// The answer to an AEAD-generating command.
#[derive(Clone, PartialEq, Eq)]
pub struct AeadResponse {
    /// The nonce used (the device's choice if the request's was zero).
    pub nonce: Nonce,
    /// The key handle.
    pub kh: u32,
    /// The outcome.
    pub status: Status,
    /// The AEAD (empty unless the status is OK).
    pub aead: Vec<u8>,
}

impl fmt::Debug for AeadResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "AeadResponse {{ nonce: {}, kh: {:#x}, status: {}, aead: {} }}",
            hex::encode(self.nonce),
            self.kh,
            self.status,
            hex::encode(&self.aead)
        )
    }
}

/// A response from the YubiHSM.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Response {
    /// `YSM_ECHO`: the bytes sent.
    Echo(Vec<u8>),
    /// `YSM_SYSTEM_INFO_QUERY`.
    SystemInfo(SystemInfo),
    /// `YSM_RANDOM_GENERATE`: the random bytes.
    RandomGenerate(Vec<u8>),
    /// `YSM_BUFFER_RANDOM_LOAD`: bytes now in the buffer.
    BufferRandomLoad(u8),
    /// `YSM_BUFFER_LOAD`: bytes now in the buffer.
    BufferLoad(u8),
    /// `YSM_BUFFER_AEAD_GENERATE`.
    BufferAeadGenerate(AeadResponse),
    /// `YSM_AEAD_GENERATE`.
    AeadGenerate(AeadResponse),
    /// `YSM_RANDOM_AEAD_GENERATE`.
    RandomAeadGenerate(AeadResponse),
    /// `YSM_AEAD_YUBIKEY_OTP_DECODE`.
    AeadYubikeyOtpDecode {
        /// The public id sent.
        public_id: Nonce,
        /// The key handle sent.
        kh: u32,
        /// The token's raw use counter (zero unless OK).
        use_ctr: u16,
        /// Session use.
        session_ctr: u8,
        /// Timestamp, high byte.
        timestamp_high: u8,
        /// Timestamp, low 16 bits.
        timestamp_low: u16,
        /// The outcome.
        status: Status,
    },
    /// `YSM_AEAD_DECRYPT_CMP`: OK on a match, MISMATCH otherwise.
    AeadDecryptCmp {
        /// The nonce sent.
        nonce: Nonce,
        /// The key handle sent.
        kh: u32,
        /// The outcome.
        status: Status,
    },
    /// `YSM_KEY_STORE_DECRYPT`.
    KeyStoreDecrypt(Status),
    /// `YSM_NONCE_GET`: the counter before the increment.
    NonceGet {
        /// The outcome.
        status: Status,
        /// `LE32(volatile counter) ‖ LE16(power-up count)`.
        nonce: Nonce,
    },
    /// `YSM_HMAC_SHA1_GENERATE`.
    HmacSha1Generate {
        /// The key handle sent.
        kh: u32,
        /// The outcome.
        status: Status,
        /// The digest, present only on the final part (and not written to
        /// the buffer).
        hash: Option<[u8; SHA1_LEN]>,
    },
}

impl Response {
    /// The command answered.
    #[must_use]
    pub fn command(&self) -> Command {
        match self {
            Self::Echo(_) => Command::Echo,
            Self::SystemInfo(_) => Command::SystemInfoQuery,
            Self::RandomGenerate(_) => Command::RandomGenerate,
            Self::BufferRandomLoad(_) => Command::BufferRandomLoad,
            Self::BufferLoad(_) => Command::BufferLoad,
            Self::BufferAeadGenerate(_) => Command::BufferAeadGenerate,
            Self::AeadGenerate(_) => Command::AeadGenerate,
            Self::RandomAeadGenerate(_) => Command::RandomAeadGenerate,
            Self::AeadYubikeyOtpDecode { .. } => Command::AeadYubikeyOtpDecode,
            Self::AeadDecryptCmp { .. } => Command::AeadDecryptCmp,
            Self::KeyStoreDecrypt(_) => Command::KeyStoreDecrypt,
            Self::NonceGet { .. } => Command::NonceGet,
            Self::HmacSha1Generate { .. } => Command::HmacSha1Generate,
        }
    }

    /// The status byte, for commands that carry one.
    #[must_use]
    pub fn status(&self) -> Option<Status> {
        match self {
            Self::BufferAeadGenerate(a) | Self::AeadGenerate(a) | Self::RandomAeadGenerate(a) => Some(a.status),
            Self::AeadYubikeyOtpDecode { status, .. }
            | Self::AeadDecryptCmp { status, .. }
            | Self::KeyStoreDecrypt(status)
            | Self::NonceGet { status, .. }
            | Self::HmacSha1Generate { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// Encode as a frame (device side).
    pub fn encode(&self) -> Result<Frame, ProtoError> {
        let cmd = self.command();
        let mut p = Vec::with_capacity(MAX_PAYLOAD);
        match self {
            Self::Echo(data) | Self::RandomGenerate(data) => {
                p.push(count_byte(cmd, data.len(), MAX_ECHO)?);
                p.extend_from_slice(data);
            }
            Self::SystemInfo(i) => {
                p.extend_from_slice(&[i.version_major, i.version_minor, i.version_build, i.protocol_version]);
                p.extend_from_slice(&i.system_uid);
            }
            Self::BufferRandomLoad(n) | Self::BufferLoad(n) => p.push(*n),
            Self::BufferAeadGenerate(a) | Self::AeadGenerate(a) | Self::RandomAeadGenerate(a) => {
                p.extend_from_slice(&a.nonce);
                p.extend_from_slice(&a.kh.to_le_bytes());
                p.push(a.status.code());
                p.push(count_byte(cmd, a.aead.len(), MAX_AEAD_DATA + 8)?);
                p.extend_from_slice(&a.aead);
            }
            Self::AeadYubikeyOtpDecode { public_id, kh, use_ctr, session_ctr, timestamp_high, timestamp_low, status } => {
                p.extend_from_slice(public_id);
                p.extend_from_slice(&kh.to_le_bytes());
                p.extend_from_slice(&use_ctr.to_le_bytes());
                p.push(*session_ctr);
                p.push(*timestamp_high);
                p.extend_from_slice(&timestamp_low.to_le_bytes());
                p.push(status.code());
            }
            Self::AeadDecryptCmp { nonce, kh, status } => {
                p.extend_from_slice(nonce);
                p.extend_from_slice(&kh.to_le_bytes());
                p.push(status.code());
            }
            Self::KeyStoreDecrypt(status) => p.push(status.code()),
            Self::NonceGet { status, nonce } => {
                p.push(status.code());
                p.extend_from_slice(nonce);
            }
            Self::HmacSha1Generate { kh, status, hash } => {
                p.extend_from_slice(&kh.to_le_bytes());
                p.push(status.code());
                match hash {
                    Some(h) => {
                        p.push(SHA1_LEN as u8);
                        p.extend_from_slice(h);
                    }
                    None => {
                        p.push(0);
                        p.extend_from_slice(&[0; SHA1_LEN]);
                    }
                }
            }
        }
        Frame::new(cmd.code() | RESPONSE_FLAG, p)
    }

    /// Decode the response to a request of command `sent` (client side).
    pub fn decode(sent: Command, frame: &Frame) -> Result<Self, ProtoError> {
        if frame.cmd != sent.code() | RESPONSE_FLAG {
            return Err(ProtoError::WrongResponse { sent: sent.code(), got: frame.cmd });
        }
        let cmd = sent;
        let mut r = Reader { cmd, bytes: &frame.payload };
        let aead = |r: &mut Reader<'_>| -> Result<AeadResponse, ProtoError> {
            let (nonce, kh, status) = (r.array()?, r.u32()?, Status::from_code(r.u8()?));
            Ok(AeadResponse { nonce, kh, status, aead: r.counted(MAX_AEAD_DATA + 8)?.to_vec() })
        };
        let resp = match cmd {
            Command::Echo => Self::Echo(r.counted(MAX_ECHO)?.to_vec()),
            Command::RandomGenerate => Self::RandomGenerate(r.counted(MAX_ECHO)?.to_vec()),
            Command::SystemInfoQuery => Self::SystemInfo(SystemInfo {
                version_major: r.u8()?,
                version_minor: r.u8()?,
                version_build: r.u8()?,
                protocol_version: r.u8()?,
                system_uid: r.array()?,
            }),
            Command::BufferRandomLoad => Self::BufferRandomLoad(r.u8()?),
            Command::BufferLoad => Self::BufferLoad(r.u8()?),
            Command::BufferAeadGenerate => Self::BufferAeadGenerate(aead(&mut r)?),
            Command::AeadGenerate => Self::AeadGenerate(aead(&mut r)?),
            Command::RandomAeadGenerate => Self::RandomAeadGenerate(aead(&mut r)?),
            Command::AeadYubikeyOtpDecode => Self::AeadYubikeyOtpDecode {
                public_id: r.array()?,
                kh: r.u32()?,
                use_ctr: r.u16()?,
                session_ctr: r.u8()?,
                timestamp_high: r.u8()?,
                timestamp_low: r.u16()?,
                status: Status::from_code(r.u8()?),
            },
            Command::AeadDecryptCmp => Self::AeadDecryptCmp { nonce: r.array()?, kh: r.u32()?, status: Status::from_code(r.u8()?) },
            Command::KeyStoreDecrypt => Self::KeyStoreDecrypt(Status::from_code(r.u8()?)),
            Command::NonceGet => Self::NonceGet { status: Status::from_code(r.u8()?), nonce: r.array()? },
            Command::HmacSha1Generate => {
                let (kh, status) = (r.u32()?, Status::from_code(r.u8()?));
                let n = usize::from(r.u8()?);
                let bytes: [u8; SHA1_LEN] = r.array()?;
                let hash = match n {
                    0 => None,
                    SHA1_LEN => Some(bytes),
                    n => return Err(malformed(cmd, format!("hash length {n}, expected 0 or {SHA1_LEN}"))),
                };
                Self::HmacSha1Generate { kh, status, hash }
            }
        };
        r.end()?;
        Ok(resp)
    }
}

/// `YSM_NONCE_GET`'s six bytes: `LE32(volatile) ‖ LE16(power-up count)`.
#[must_use]
pub fn nonce_bytes(volatile: u32, power_ups: u16) -> Nonce {
    let mut n = [0u8; 6];
    n[..4].copy_from_slice(&volatile.to_le_bytes());
    n[4..].copy_from_slice(&power_ups.to_le_bytes());
    n
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use proptest::prelude::*;

    use super::*;

    fn frames_of(reader: &mut FrameReader) -> Vec<Result<Frame, ProtoError>> {
        std::iter::from_fn(|| reader.next_frame()).collect()
    }

    #[test]
    fn echo_frame_bytes() {
        let f = Request::Echo(b"ab".to_vec()).encode().unwrap();
        assert_eq!(&f.encode()[..], &[4, 0x23, 2, b'a', b'b']);
        let r = Response::Echo(b"ab".to_vec()).encode().unwrap();
        assert_eq!(&r.encode()[..], &[4, 0xa3, 2, b'a', b'b']);
        assert_eq!(Response::decode(Command::Echo, &r).unwrap(), Response::Echo(b"ab".to_vec()));
        // The answer to another command is refused.
        assert_eq!(Response::decode(Command::RandomGenerate, &r), Err(ProtoError::WrongResponse { sent: 0x24, got: 0xa3 }));
    }

    #[test]
    fn little_endian_fields() {
        let f = Request::BufferAeadGenerate { nonce: [1, 2, 3, 4, 5, 6], kh: 0x1002 }.encode().unwrap();
        assert_eq!(&f.encode()[..], &[11, 0x02, 1, 2, 3, 4, 5, 6, 0x02, 0x10, 0, 0]);
        let n = Response::NonceGet { status: Status::Ok, nonce: nonce_bytes(0x0102_0304, 0x0506) }.encode().unwrap();
        assert_eq!(&n.payload[..], &[0x80, 4, 3, 2, 1, 6, 5]);
    }

    #[test]
    fn oversized_payload_refused() {
        assert_eq!(Frame::new(1, vec![0; MAX_PAYLOAD + 1]), Err(ProtoError::PayloadTooLong(MAX_PAYLOAD + 1)));
        assert!(Request::Echo(vec![0; MAX_ECHO + 1]).encode().is_err());
        assert!(Request::AeadGenerate { nonce: [0; 6], kh: 1, data: Zeroizing::new(vec![0; 65]) }.encode().is_err());
    }

    #[test]
    fn reader_handles_split_reads_and_resync() {
        let a = Request::Echo(b"hello".to_vec()).encode().unwrap().encode();
        let b = Request::SystemInfoQuery.encode().unwrap().encode();
        let mut stream = RESYNC.to_vec();
        stream.extend_from_slice(&a);
        stream.extend_from_slice(&RESYNC);
        stream.extend_from_slice(&b);
        let mut reader = FrameReader::new();
        let mut got = Vec::new();
        for byte in &stream {
            reader.push(std::slice::from_ref(byte));
            got.extend(frames_of(&mut reader));
        }
        let got: Vec<Frame> = got.into_iter().map(Result::unwrap).collect();
        assert_eq!(got.len(), 2);
        assert_eq!(Request::decode(&got[0]).unwrap(), Request::Echo(b"hello".to_vec()));
        assert_eq!(Request::decode(&got[1]).unwrap(), Request::SystemInfoQuery);
        assert!(reader.is_idle());
    }

    #[test]
    fn resync_abandons_a_partial_frame() {
        let mut reader = FrameReader::new();
        // A frame announced as 0x61 bytes, cut after three, then a resync:
        // the zeros complete it with a zero command byte (YSM_NULL), and it
        // is dropped.
        reader.push(&[0x61, 0x00, 0x01]);
        reader.push(&RESYNC);
        let b = Request::SystemInfoQuery.encode().unwrap().encode();
        reader.push(&b);
        let got = frames_of(&mut reader);
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(got[0].as_ref().unwrap().cmd, 0x26);
    }

    #[test]
    fn oversized_length_byte_then_recovery() {
        let mut reader = FrameReader::new();
        reader.push(&[0x62, 0x23, 0x01]);
        reader.push(&RESYNC);
        reader.push(&Request::Echo(vec![7]).encode().unwrap().encode());
        let got = frames_of(&mut reader);
        assert_eq!(got[0], Err(ProtoError::Oversized(0x62)));
        assert_eq!(Request::decode(got[1].as_ref().unwrap()).unwrap(), Request::Echo(vec![7]));
        assert_eq!(got.len(), 2);
    }

    #[test]
    fn malformed_requests_are_errors() {
        // Echo count larger than the data.
        let f = Frame::new(0x23, vec![5, 1, 2]).unwrap();
        assert!(matches!(Request::decode(&f), Err(ProtoError::Malformed { .. })));
        // Trailing bytes.
        let f = Frame::new(0x26, vec![1]).unwrap();
        assert!(matches!(Request::decode(&f), Err(ProtoError::Malformed { .. })));
        assert_eq!(Request::decode(&Frame::new(0x55, vec![]).unwrap()), Err(ProtoError::UnknownCommand(0x55)));
        // A status printed as a sentence.
        assert_eq!(Status::from_code(0x89).to_string(), "YSM_FUNCTION_DISABLED (0x89)");
    }

    fn nonce() -> impl Strategy<Value = Nonce> {
        any::<[u8; 6]>()
    }
    fn bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
        proptest::collection::vec(any::<u8>(), 0..=max)
    }

    fn request() -> impl Strategy<Value = Request> {
        prop_oneof![
            bytes(MAX_ECHO).prop_map(Request::Echo),
            Just(Request::SystemInfoQuery),
            (0..=MAX_ECHO as u8).prop_map(Request::RandomGenerate),
            (any::<u8>(), any::<u8>()).prop_map(|(offset, len)| Request::BufferRandomLoad { offset, len }),
            (any::<u8>(), bytes(MAX_AEAD_DATA)).prop_map(|(offset, d)| Request::BufferLoad { offset, data: Zeroizing::new(d) }),
            (nonce(), any::<u32>()).prop_map(|(nonce, kh)| Request::BufferAeadGenerate { nonce, kh }),
            (nonce(), any::<u32>(), bytes(MAX_AEAD_DATA)).prop_map(|(nonce, kh, d)| Request::AeadGenerate {
                nonce,
                kh,
                data: Zeroizing::new(d)
            }),
            (nonce(), any::<u32>(), any::<u8>()).prop_map(|(nonce, kh, len)| Request::RandomAeadGenerate { nonce, kh, len }),
            (nonce(), any::<u32>(), any::<[u8; 16]>(), any::<[u8; 30]>())
                .prop_map(|(public_id, kh, otp, aead)| Request::AeadYubikeyOtpDecode { public_id, kh, otp, aead }),
            (nonce(), any::<u32>(), bytes(MAX_PAYLOAD - 11)).prop_map(|(nonce, kh, d)| Request::AeadDecryptCmp {
                nonce,
                kh,
                data: Zeroizing::new(d)
            }),
            any::<[u8; 32]>().prop_map(|k| Request::KeyStoreDecrypt(Zeroizing::new(k))),
            any::<u16>().prop_map(Request::NonceGet),
            (any::<u32>(), any::<u8>(), bytes(MAX_HMAC_DATA)).prop_map(|(kh, flags, data)| Request::HmacSha1Generate { kh, flags, data }),
        ]
    }

    fn aead_response() -> impl Strategy<Value = AeadResponse> {
        (nonce(), any::<u32>(), any::<u8>(), bytes(MAX_AEAD_DATA + 8)).prop_map(|(nonce, kh, s, aead)| AeadResponse {
            nonce,
            kh,
            status: Status::from_code(s),
            aead,
        })
    }

    fn response() -> impl Strategy<Value = Response> {
        prop_oneof![
            bytes(MAX_ECHO).prop_map(Response::Echo),
            bytes(MAX_ECHO).prop_map(Response::RandomGenerate),
            (any::<[u8; 4]>(), any::<[u8; 12]>()).prop_map(|(v, system_uid)| Response::SystemInfo(SystemInfo {
                version_major: v[0],
                version_minor: v[1],
                version_build: v[2],
                protocol_version: v[3],
                system_uid
            })),
            any::<u8>().prop_map(Response::BufferLoad),
            any::<u8>().prop_map(Response::BufferRandomLoad),
            aead_response().prop_map(Response::AeadGenerate),
            aead_response().prop_map(Response::BufferAeadGenerate),
            aead_response().prop_map(Response::RandomAeadGenerate),
            (nonce(), any::<u32>(), any::<u16>(), any::<[u8; 2]>(), any::<u16>(), any::<u8>()).prop_map(
                |(public_id, kh, use_ctr, c, timestamp_low, s)| {
                    Response::AeadYubikeyOtpDecode {
                        public_id,
                        kh,
                        use_ctr,
                        session_ctr: c[0],
                        timestamp_high: c[1],
                        timestamp_low,
                        status: Status::from_code(s),
                    }
                }
            ),
            (nonce(), any::<u32>(), any::<u8>()).prop_map(|(nonce, kh, s)| Response::AeadDecryptCmp {
                nonce,
                kh,
                status: Status::from_code(s)
            }),
            any::<u8>().prop_map(|s| Response::KeyStoreDecrypt(Status::from_code(s))),
            (any::<u8>(), nonce()).prop_map(|(s, nonce)| Response::NonceGet { status: Status::from_code(s), nonce }),
            (any::<u32>(), any::<u8>(), proptest::option::of(any::<[u8; 20]>())).prop_map(|(kh, s, hash)| Response::HmacSha1Generate {
                kh,
                status: Status::from_code(s),
                hash
            }),
        ]
    }

    proptest! {
        #[test]
        fn requests_round_trip_through_the_reader(reqs in proptest::collection::vec(request(), 1..6), cut in 1usize..40) {
            let mut wire = Vec::new();
            for r in &reqs {
                wire.extend_from_slice(&r.encode().unwrap().encode());
            }
            let mut reader = FrameReader::new();
            let mut got = Vec::new();
            for chunk in wire.chunks(cut) {
                reader.push(chunk);
                got.extend(frames_of(&mut reader));
            }
            let got: Vec<Request> = got.into_iter().map(|f| Request::decode(&f.unwrap()).unwrap()).collect();
            prop_assert_eq!(got, reqs);
        }

        #[test]
        fn responses_round_trip(resp in response()) {
            let frame = resp.encode().unwrap();
            let mut reader = FrameReader::new();
            reader.push(&frame.encode());
            let back = reader.next_frame().unwrap().unwrap();
            prop_assert_eq!(Response::decode(resp.command(), &back).unwrap(), resp);
        }

        #[test]
        fn no_byte_string_panics_the_decoder(wire in proptest::collection::vec(any::<u8>(), 0..400), cut in 1usize..50) {
            let mut reader = FrameReader::new();
            for chunk in wire.chunks(cut) {
                reader.push(chunk);
                while let Some(f) = reader.next_frame() {
                    if let Ok(f) = f {
                        prop_assert!(f.payload.len() <= MAX_PAYLOAD);
                        let _ = Request::decode(&f);
                        for c in Command::ALL {
                            let _ = Response::decode(c, &f);
                        }
                    }
                }
            }
        }

        #[test]
        fn any_payload_decodes_or_errs(cmd in any::<u8>(), payload in bytes(MAX_PAYLOAD)) {
            let f = Frame::new(cmd, payload).unwrap();
            // What decodes and re-encodes decodes to the same value.
            if let Ok(r) = Request::decode(&f) {
                if let Ok(again) = r.encode() {
                    prop_assert_eq!(Request::decode(&again).unwrap(), r);
                }
            }
            for c in Command::ALL {
                if let Ok(r) = Response::decode(c, &f) {
                    prop_assert_eq!(Response::decode(c, &r.encode().unwrap()).unwrap(), r);
                }
            }
        }
    }
}
