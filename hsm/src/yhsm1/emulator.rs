//! A YubiHSM 1 (HSM mode) emulated in software, for tests and benchmarks.
//!
//! [`Emulator::handle`] takes the bytes a client wrote and returns the
//! bytes the device would answer; the `yhsm1-emulator` binary serves it on a
//! pty so that real clients (pyhsm, our serial backend) can open it like a
//! `/dev/ttyACM*` device.
//!
//! What it models, with the YubiHSM status codes:
//! - **key handles** with their [`Flags`]: an unknown handle answers
//!   `YSM_KEY_HANDLE_INVALID`, a missing flag `YSM_FUNCTION_DISABLED`; a
//!   caller-chosen (non-zero) nonce needs [`Flags::USER_NONCE`], and an AEAD
//!   of a buffer holding host data needs [`Flags::BUFFER_LOAD`];
//! - **the keystore lock**: an emulator built [`Emulator::locked`] answers
//!   `YSM_KEY_STORAGE_LOCKED` to every key operation until
//!   `YSM_KEY_STORE_DECRYPT` brings the right 32-byte master key; a wrong
//!   key (re)locks it;
//! - **the internal buffer** (64 bytes) of `YSM_BUFFER_LOAD` and
//!   `YSM_BUFFER_RANDOM_LOAD`;
//! - **the nonce counter** of `YSM_NONCE_GET`: `LE32(volatile) ‖
//!   LE16(power-ups)`, the value before the increment; a zero nonce in an
//!   AEAD request takes the next value of that counter.
//!
//! AEADs are the `otp` crate's YubiHSM 1 AES-CCM, so they equal the soft
//! backend's byte for byte; `YSM_AEAD_YUBIKEY_OTP_DECODE` is
//! [`otp::decode::decode_otp`]. The handle table is loaded from pyhsm's
//! soft-HSM JSON (`{"<key handle>": "<hex AES key>"}`) with
//! [`Emulator::from_pyhsm_json`].
//!
//! Two choices where the device's behaviour is not documented: a bad MAC in
//! `YSM_AEAD_DECRYPT_CMP` answers `YSM_AEAD_INVALID`, and a wrong master key
//! answers `YSM_KEY_STORAGE_LOCKED`.

use std::collections::BTreeMap;
use std::fmt;

use hmac::{Hmac, Mac};
use otp::{Aead, AeadNonce, HandleKey, KeyHandle, TokenCiphertext};
use rand_core::{OsRng, RngCore};
use sha1::Sha1;
use zeroize::Zeroizing;

use super::proto::{
    nonce_bytes, AeadResponse, Frame, FrameReader, Nonce, ProtoError, Request, Response, Status, SystemInfo, HMAC_FINAL, HMAC_RESET,
    HMAC_TO_BUFFER, MAX_AEAD_DATA, MAX_ECHO,
};
use crate::Flags;

/// The firmware version the emulator reports (1.0.4: user nonces allowed).
pub const VERSION: (u8, u8, u8) = (1, 0, 4);
/// The emulator's `systemUid`.
pub const SYSTEM_UID: [u8; 12] = *b"RustYHSM1Emu";

type HmacSha1 = Hmac<Sha1>;

/// Errors building an emulator.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EmulatorError {
    /// The key file is not pyhsm's soft-HSM JSON.
    #[error("key file is not a JSON object of key handle to hex AES key: {0}")]
    KeyFile(String),
}

struct Handle {
    key: HandleKey,
    flags: Flags,
}

/// The emulated device. See the [module documentation](self).
pub struct Emulator {
    handles: BTreeMap<u32, Handle>,
    master_key: Option<Zeroizing<[u8; 32]>>,
    locked: bool,
    buffer: Zeroizing<Vec<u8>>,
    buffer_has_host_data: bool,
    nonce_volatile: u32,
    power_ups: u16,
    hmac: Option<(u32, HmacSha1)>,
    reader: FrameReader,
}

impl fmt::Debug for Emulator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Emulator")
            .field("handles", &self.handles.iter().map(|(kh, h)| (*kh, h.flags)).collect::<Vec<_>>())
            .field("locked", &self.locked)
            .field("nonce", &(self.nonce_volatile, self.power_ups))
            .finish_non_exhaustive()
    }
}

/// A refusal: the status to answer with.
type Refusal = Status;

impl Emulator {
    /// An unlocked emulator holding `handles`.
    #[must_use]
    pub fn new(handles: Vec<(KeyHandle, Flags, HandleKey)>) -> Self {
        Self {
            handles: handles.into_iter().map(|(kh, flags, key)| (kh.get(), Handle { key, flags })).collect(),
            master_key: None,
            locked: false,
            buffer: Zeroizing::new(Vec::with_capacity(MAX_AEAD_DATA)),
            buffer_has_host_data: false,
            nonce_volatile: 0,
            power_ups: 1,
            hmac: None,
            reader: FrameReader::new(),
        }
    }

    /// The same, but locked until `YSM_KEY_STORE_DECRYPT` with `master_key`
    /// (pyhsm pads shorter keys with zeros; so does the comparison here).
    #[must_use]
    pub fn locked(mut self, master_key: Zeroizing<[u8; 32]>) -> Self {
        self.master_key = Some(master_key);
        self.locked = true;
        self
    }

    /// Build from pyhsm's soft-HSM JSON, `{"<key handle>": "<hex AES key>"}`
    /// (decimal or `0x` hex handles, 16/24/32-byte keys); `flags_of` gives
    /// each handle's flags.
    pub fn from_pyhsm_json(json: &str, flags_of: impl Fn(KeyHandle) -> Flags) -> Result<Self, EmulatorError> {
        let value: serde_json::Value = serde_json::from_str(json).map_err(|e| EmulatorError::KeyFile(e.to_string()))?;
        let obj = value.as_object().ok_or_else(|| EmulatorError::KeyFile("the top level is not an object".to_owned()))?;
        let mut handles = Vec::with_capacity(obj.len());
        for (kh, key) in obj {
            let kh: KeyHandle = kh.parse().map_err(|e| EmulatorError::KeyFile(format!("key handle {kh:?}: {e}")))?;
            let hex_key = key.as_str().ok_or_else(|| EmulatorError::KeyFile(format!("the key of handle {kh} is not a string")))?;
            let raw = Zeroizing::new(hex::decode(hex_key).map_err(|e| EmulatorError::KeyFile(format!("the key of handle {kh}: {e}")))?);
            let key = HandleKey::new(&raw).map_err(|e| EmulatorError::KeyFile(format!("the key of handle {kh}: {e}")))?;
            handles.push((kh, flags_of(kh), key));
        }
        Ok(Self::new(handles))
    }

    /// Is the keystore locked?
    #[must_use]
    pub fn is_locked(&self) -> bool {
        self.locked
    }

    /// Feed the bytes a client wrote; get back the bytes to answer (possibly
    /// none, possibly several responses). Frames the codec cannot decode
    /// get no answer, as a client then times out and resynchronises; the
    /// errors are returned beside the answer for logging.
    pub fn handle(&mut self, input: &[u8]) -> (Vec<u8>, Vec<ProtoError>) {
        self.reader.push(input);
        let mut out = Vec::new();
        let mut errors = Vec::new();
        while let Some(frame) = self.reader.next_frame() {
            match frame.and_then(|f| self.handle_frame(&f)) {
                Ok(Some(resp)) => out.extend_from_slice(&resp.encode()),
                Ok(None) => {}
                Err(e) => errors.push(e),
            }
        }
        (out, errors)
    }

    /// Answer one request frame (`None`: the request has no answer).
    pub fn handle_frame(&mut self, frame: &Frame) -> Result<Option<Frame>, ProtoError> {
        let request = Request::decode(frame)?;
        match self.respond(request) {
            Some(resp) => resp.encode().map(Some),
            None => Ok(None),
        }
    }

    /// Answer one request (`None` only if the random generator failed).
    pub fn respond(&mut self, request: Request) -> Option<Response> {
        Some(match request {
            Request::Echo(data) => Response::Echo(data),
            Request::SystemInfoQuery => Response::SystemInfo(SystemInfo {
                version_major: VERSION.0,
                version_minor: VERSION.1,
                version_build: VERSION.2,
                protocol_version: 1,
                system_uid: SYSTEM_UID,
            }),
            Request::RandomGenerate(n) => Response::RandomGenerate(random(usize::from(n).min(MAX_ECHO))?.to_vec()),
            Request::BufferRandomLoad { offset, len } => {
                let data = random(usize::from(len))?;
                Response::BufferRandomLoad(self.buffer_write(offset, &data, false))
            }
            Request::BufferLoad { offset, data } => Response::BufferLoad(self.buffer_write(offset, &data, true)),
            Request::NonceGet(increment) => {
                let nonce = nonce_bytes(self.nonce_volatile, self.power_ups);
                self.nonce_volatile = self.nonce_volatile.wrapping_add(u32::from(increment));
                Response::NonceGet { status: Status::Ok, nonce }
            }
            Request::KeyStoreDecrypt(key) => Response::KeyStoreDecrypt(self.key_store_decrypt(&key)),
            Request::AeadGenerate { nonce, kh, data } => {
                Response::AeadGenerate(self.aead_response(nonce, kh, |em| em.seal(nonce, kh, Flags::AEAD_GENERATE, &data)))
            }
            Request::BufferAeadGenerate { nonce, kh } => Response::BufferAeadGenerate(self.aead_response(nonce, kh, |em| {
                if em.buffer_has_host_data {
                    em.key(kh, Flags::BUFFER_LOAD)?;
                }
                let data = em.buffer.clone();
                em.seal(nonce, kh, Flags::BUFFER_AEAD_GENERATE, &data)
            })),
            Request::RandomAeadGenerate { nonce, kh, len } => {
                let data = random(usize::from(len))?;
                Response::RandomAeadGenerate(self.aead_response(nonce, kh, |em| em.seal(nonce, kh, Flags::RANDOM_AEAD_GENERATE, &data)))
            }
            Request::AeadDecryptCmp { nonce, kh, data } => {
                Response::AeadDecryptCmp { nonce, kh, status: status_of(self.decrypt_cmp(nonce, kh, &data)) }
            }
            Request::AeadYubikeyOtpDecode { public_id, kh, otp, aead } => {
                let mut resp = Response::AeadYubikeyOtpDecode {
                    public_id,
                    kh,
                    use_ctr: 0,
                    session_ctr: 0,
                    timestamp_high: 0,
                    timestamp_low: 0,
                    status: Status::Ok,
                };
                match self.otp_decode(public_id, kh, &otp, &aead) {
                    Ok(d) => {
                        if let Response::AeadYubikeyOtpDecode { use_ctr, session_ctr, timestamp_high, timestamp_low, .. } = &mut resp {
                            *use_ctr = d.use_ctr;
                            *session_ctr = d.session_ctr;
                            *timestamp_high = d.timestamp_high;
                            *timestamp_low = d.timestamp_low;
                        }
                    }
                    Err(s) => {
                        if let Response::AeadYubikeyOtpDecode { status, .. } = &mut resp {
                            *status = s;
                        }
                    }
                }
                resp
            }
            Request::HmacSha1Generate { kh, flags, data } => match self.hmac(kh, flags, &data) {
                Ok(hash) => Response::HmacSha1Generate { kh, status: Status::Ok, hash },
                Err(status) => Response::HmacSha1Generate { kh, status, hash: None },
            },
        })
    }

    /// The key of `kh`, if the keystore is open, the handle exists and it
    /// has `needs`.
    fn key(&self, kh: u32, needs: Flags) -> Result<&HandleKey, Refusal> {
        if self.locked {
            return Err(Status::KeyStorageLocked);
        }
        let h = self.handles.get(&kh).ok_or(Status::KeyHandleInvalid)?;
        if !h.flags.contains(needs) {
            return Err(Status::FunctionDisabled);
        }
        Ok(&h.key)
    }

    /// The nonce to use: the caller's (needs [`Flags::USER_NONCE`]) or, for
    /// a zero nonce, the next value of the nonce counter.
    fn nonce_for(&mut self, nonce: Nonce, kh: u32) -> Result<AeadNonce, Refusal> {
        if nonce != [0; 6] {
            self.key(kh, Flags::USER_NONCE)?;
            return Ok(AeadNonce::new(nonce));
        }
        self.nonce_volatile = self.nonce_volatile.wrapping_add(1);
        Ok(AeadNonce::new(nonce_bytes(self.nonce_volatile, self.power_ups)))
    }

    fn seal(&mut self, nonce: Nonce, kh: u32, needs: Flags, data: &[u8]) -> Result<(AeadNonce, Aead), Refusal> {
        self.key(kh, needs)?;
        if !(1..=MAX_AEAD_DATA).contains(&data.len()) {
            return Err(Status::InvalidParameter);
        }
        let nonce = self.nonce_for(nonce, kh)?;
        let key = self.key(kh, needs)?;
        let aead = key.seal(KeyHandle::new(kh), &nonce, data).map_err(|_| Status::InvalidParameter)?;
        Ok((nonce, aead))
    }

    fn aead_response(&mut self, nonce: Nonce, kh: u32, f: impl FnOnce(&mut Self) -> Result<(AeadNonce, Aead), Refusal>) -> AeadResponse {
        match f(self) {
            Ok((n, aead)) => AeadResponse { nonce: *n.as_bytes(), kh, status: Status::Ok, aead: aead.as_bytes().to_vec() },
            Err(status) => AeadResponse { nonce, kh, status, aead: Vec::new() },
        }
    }

    /// Write `data` at `offset` (0 clears the buffer first); bytes past the
    /// 64-byte buffer are dropped. Returns the bytes now in the buffer.
    fn buffer_write(&mut self, offset: u8, data: &[u8], host_data: bool) -> u8 {
        let offset = usize::from(offset);
        if offset == 0 {
            self.buffer.clear();
            self.buffer_has_host_data = false;
        }
        if offset < MAX_AEAD_DATA {
            let end = (offset + data.len()).min(MAX_AEAD_DATA);
            if self.buffer.len() < end {
                self.buffer.resize(end, 0);
            }
            self.buffer[offset..end].copy_from_slice(&data[..end - offset]);
            self.buffer_has_host_data |= host_data;
        }
        // At most MAX_AEAD_DATA (64).
        u8::try_from(self.buffer.len()).unwrap_or(u8::MAX)
    }

    fn key_store_decrypt(&mut self, given: &[u8; 32]) -> Status {
        let Some(master) = &self.master_key else {
            // No encrypted keystore: nothing to unlock.
            return Status::Ok;
        };
        let diff = master.iter().zip(given.iter()).fold(0u8, |acc, (a, b)| acc | (a ^ b));
        if diff == 0 {
            self.locked = false;
            Status::Ok
        } else {
            self.locked = true;
            self.hmac = None;
            Status::KeyStorageLocked
        }
    }

    fn decrypt_cmp(&self, nonce: Nonce, kh: u32, data: &[u8]) -> Result<(), Refusal> {
        let key = self.key(kh, Flags::AEAD_DECRYPT_CMP)?;
        // cleartext ‖ AEAD, where the AEAD is the cleartext's length plus
        // the 8-byte MAC.
        let n = data.len();
        if n < 2 + otp::aead::MAC_LEN || !(n - otp::aead::MAC_LEN).is_multiple_of(2) {
            return Err(Status::InvalidParameter);
        }
        let clear_len = (n - otp::aead::MAC_LEN) / 2;
        let (clear, aead) = data.split_at(clear_len);
        let aead = Aead::from_slice(aead).map_err(|_| Status::InvalidParameter)?;
        let plain = key.open(KeyHandle::new(kh), &AeadNonce::new(nonce), &aead).map_err(|_| Status::AeadInvalid)?;
        let diff = plain.iter().zip(clear.iter()).fold(0u8, |acc, (a, b)| acc | (a ^ b));
        if diff == 0 {
            Ok(())
        } else {
            Err(Status::Mismatch)
        }
    }

    fn otp_decode(&self, public_id: Nonce, kh: u32, otp: &[u8; 16], aead: &[u8]) -> Result<otp::OtpDecode, Refusal> {
        let key = self.key(kh, Flags::OTP_DECODE)?;
        let aead = Aead::from_slice(aead).map_err(|_| Status::InvalidParameter)?;
        otp::decode::decode_otp(key, KeyHandle::new(kh), &AeadNonce::new(public_id), &aead, &TokenCiphertext::new(*otp)).map_err(
            |e| match e {
                otp::Error::TokenCrc | otp::Error::UidMismatch => Status::OtpInvalid,
                _ => Status::AeadInvalid,
            },
        )
    }

    fn hmac(&mut self, kh: u32, flags: u8, data: &[u8]) -> Result<Option<[u8; 20]>, Refusal> {
        let key = self.key(kh, Flags::HMAC_SHA1_GENERATE)?;
        let restart = flags & HMAC_RESET != 0 || !matches!(&self.hmac, Some((k, _)) if *k == kh);
        if restart {
            let mac = HmacSha1::new_from_slice(key.expose()).map_err(|_| Status::InvalidParameter)?;
            self.hmac = Some((kh, mac));
        }
        let Some((_, mac)) = self.hmac.as_mut() else { return Err(Status::InvalidParameter) };
        mac.update(data);
        if flags & HMAC_FINAL == 0 {
            return Ok(None);
        }
        let Some((_, mac)) = self.hmac.take() else { return Err(Status::InvalidParameter) };
        let hash: [u8; 20] = mac.finalize().into_bytes().into();
        if flags & HMAC_TO_BUFFER != 0 {
            self.buffer.clear();
            self.buffer.extend_from_slice(&hash);
            self.buffer_has_host_data = true;
        }
        Ok(Some(hash))
    }
}

fn status_of(r: Result<(), Refusal>) -> Status {
    match r {
        Ok(()) => Status::Ok,
        Err(s) => s,
    }
}

/// `n` bytes from the operating system's generator; `None` if it failed.
fn random(n: usize) -> Option<Zeroizing<Vec<u8>>> {
    let mut out = Zeroizing::new(vec![0u8; n]);
    OsRng.try_fill_bytes(&mut out).ok()?;
    Some(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use otp::token::TokenFields;
    use otp::YubiKeyKey;

    use super::*;

    const KEY: [u8; 16] = *b"0123456789abcdef";

    fn emulator(flags: Flags) -> Emulator {
        Emulator::new(vec![(KeyHandle::new(1), flags, HandleKey::new(&KEY).unwrap())])
    }

    fn ask(em: &mut Emulator, req: Request) -> Response {
        let cmd = req.command();
        let (out, errors) = em.handle(&req.encode().unwrap().encode());
        assert!(errors.is_empty(), "{errors:?}");
        let mut reader = FrameReader::new();
        reader.push(&out);
        let frame = reader.next_frame().unwrap().unwrap();
        assert!(reader.next_frame().is_none());
        Response::decode(cmd, &frame).unwrap()
    }

    fn aead_of(resp: Response) -> AeadResponse {
        match resp {
            Response::AeadGenerate(a) | Response::BufferAeadGenerate(a) | Response::RandomAeadGenerate(a) => a,
            other => panic!("not an AEAD response: {other:?}"),
        }
    }

    #[test]
    fn aead_generate_matches_the_otp_crate_and_enforces_flags() {
        let nonce = [1, 2, 3, 4, 5, 6];
        let data = Zeroizing::new(b"secret data".to_vec());
        let mut em = emulator(Flags::AEAD_GENERATE | Flags::USER_NONCE);
        let a = aead_of(ask(&mut em, Request::AeadGenerate { nonce, kh: 1, data: data.clone() }));
        assert_eq!(a.status, Status::Ok);
        let expected = HandleKey::new(&KEY).unwrap().seal(KeyHandle::new(1), &AeadNonce::new(nonce), &data).unwrap();
        assert_eq!(a.aead, expected.as_bytes());
        // Unknown handle, missing flag, missing USER_NONCE.
        let a = aead_of(ask(&mut em, Request::AeadGenerate { nonce, kh: 2, data: data.clone() }));
        assert_eq!((a.status, a.aead.len()), (Status::KeyHandleInvalid, 0));
        let a = aead_of(ask(&mut em, Request::RandomAeadGenerate { nonce, kh: 1, len: 22 }));
        assert_eq!(a.status, Status::FunctionDisabled);
        let mut em = emulator(Flags::AEAD_GENERATE);
        let a = aead_of(ask(&mut em, Request::AeadGenerate { nonce, kh: 1, data: data.clone() }));
        assert_eq!(a.status, Status::FunctionDisabled);
        // A zero nonce takes the nonce counter's next value.
        let a = aead_of(ask(&mut em, Request::AeadGenerate { nonce: [0; 6], kh: 1, data }));
        assert_eq!((a.status, a.nonce), (Status::Ok, nonce_bytes(1, 1)));
    }

    #[test]
    fn buffer_aead_needs_buffer_load_for_host_data() {
        let mut em = emulator(Flags::BUFFER_AEAD_GENERATE | Flags::USER_NONCE);
        assert_eq!(ask(&mut em, Request::BufferRandomLoad { offset: 0, len: 22 }), Response::BufferRandomLoad(22));
        let a = aead_of(ask(&mut em, Request::BufferAeadGenerate { nonce: [9; 6], kh: 1 }));
        assert_eq!((a.status, a.aead.len()), (Status::Ok, 30));
        assert_eq!(ask(&mut em, Request::BufferLoad { offset: 0, data: Zeroizing::new(vec![7; 16]) }), Response::BufferLoad(16));
        assert_eq!(ask(&mut em, Request::BufferLoad { offset: 16, data: Zeroizing::new(vec![8; 6]) }), Response::BufferLoad(22));
        let a = aead_of(ask(&mut em, Request::BufferAeadGenerate { nonce: [9; 6], kh: 1 }));
        assert_eq!(a.status, Status::FunctionDisabled);
        let mut em = emulator(Flags::IMPORT);
        ask(&mut em, Request::BufferLoad { offset: 0, data: Zeroizing::new(vec![7; 16]) });
        ask(&mut em, Request::BufferLoad { offset: 16, data: Zeroizing::new(vec![8; 6]) });
        let a = aead_of(ask(&mut em, Request::BufferAeadGenerate { nonce: [9; 6], kh: 1 }));
        let mut plain = vec![7; 16];
        plain.extend_from_slice(&[8; 6]);
        let expected = HandleKey::new(&KEY).unwrap().seal(KeyHandle::new(1), &AeadNonce::new([9; 6]), &plain).unwrap();
        assert_eq!(a.aead, expected.as_bytes());
    }

    #[test]
    fn otp_decode_and_decrypt_cmp() {
        let yk_key = [0x11; 16];
        let uid = [1, 2, 3, 4, 5, 6];
        let mut secrets = yk_key.to_vec();
        secrets.extend_from_slice(&uid);
        let public_id = [0, 0, 0, 0, 0, 0x20];
        let handle_key = HandleKey::new(&KEY).unwrap();
        let aead = handle_key.seal(KeyHandle::new(1), &AeadNonce::new(public_id), &secrets).unwrap();
        let token = TokenFields { uid, counter: 5, timestamp_low: 0x1234, timestamp_high: 0x56, session_use: 7, rnd: 9 }.build();
        let otp = *token.encrypt(&YubiKeyKey::new(yk_key)).as_bytes();
        let aead30: [u8; 30] = aead.as_bytes().try_into().unwrap();
        let mut em = emulator(Flags::OTP_DECODE | Flags::AEAD_DECRYPT_CMP);
        let resp = ask(&mut em, Request::AeadYubikeyOtpDecode { public_id, kh: 1, otp, aead: aead30 });
        assert_eq!(
            resp,
            Response::AeadYubikeyOtpDecode {
                public_id,
                kh: 1,
                use_ctr: 5,
                session_ctr: 7,
                timestamp_high: 0x56,
                timestamp_low: 0x1234,
                status: Status::Ok
            }
        );
        let mut bad = otp;
        bad[0] ^= 1;
        assert_eq!(
            ask(&mut em, Request::AeadYubikeyOtpDecode { public_id, kh: 1, otp: bad, aead: aead30 }).status(),
            Some(Status::OtpInvalid)
        );
        let mut tampered = aead30;
        tampered[29] ^= 1;
        assert_eq!(
            ask(&mut em, Request::AeadYubikeyOtpDecode { public_id, kh: 1, otp, aead: tampered }).status(),
            Some(Status::AeadInvalid)
        );
        // Compare: right cleartext, wrong cleartext.
        let mut data = secrets.clone();
        data.extend_from_slice(aead.as_bytes());
        let cmp = |em: &mut Emulator, data: &[u8]| {
            ask(em, Request::AeadDecryptCmp { nonce: public_id, kh: 1, data: Zeroizing::new(data.to_vec()) }).status().unwrap()
        };
        assert_eq!(cmp(&mut em, &data), Status::Ok);
        data[0] ^= 1;
        assert_eq!(cmp(&mut em, &data), Status::Mismatch);
        assert_eq!(cmp(&mut em, &data[..9]), Status::InvalidParameter);
    }

    #[test]
    fn lock_unlock_and_nonce_counter() {
        let master = Zeroizing::new([0x42; 32]);
        let mut em = emulator(Flags::AEAD_GENERATE).locked(master);
        let data = Zeroizing::new(vec![1; 8]);
        let a = aead_of(ask(&mut em, Request::AeadGenerate { nonce: [0; 6], kh: 1, data: data.clone() }));
        assert_eq!(a.status, Status::KeyStorageLocked);
        assert_eq!(ask(&mut em, Request::KeyStoreDecrypt(Zeroizing::new([0x41; 32]))), Response::KeyStoreDecrypt(Status::KeyStorageLocked));
        assert!(em.is_locked());
        assert_eq!(ask(&mut em, Request::KeyStoreDecrypt(Zeroizing::new([0x42; 32]))), Response::KeyStoreDecrypt(Status::Ok));
        assert!(!em.is_locked());
        let a = aead_of(ask(&mut em, Request::AeadGenerate { nonce: [0; 6], kh: 1, data }));
        assert_eq!(a.status, Status::Ok);
        // A wrong key locks again.
        ask(&mut em, Request::KeyStoreDecrypt(Zeroizing::new([0; 32])));
        assert!(em.is_locked());
        // NONCE_GET returns the value before the increment; 0 peeks.
        let n0 = ask(&mut em, Request::NonceGet(0));
        assert_eq!(n0, Response::NonceGet { status: Status::Ok, nonce: nonce_bytes(1, 1) });
        assert_eq!(ask(&mut em, Request::NonceGet(5)), n0);
        assert_eq!(ask(&mut em, Request::NonceGet(1)), Response::NonceGet { status: Status::Ok, nonce: nonce_bytes(6, 1) });
    }

    #[test]
    fn hmac_sha1_in_parts() {
        let mut em = emulator(Flags::HMAC_SHA1_GENERATE);
        let r = ask(&mut em, Request::HmacSha1Generate { kh: 1, flags: HMAC_RESET, data: b"Hi ".to_vec() });
        assert_eq!(r, Response::HmacSha1Generate { kh: 1, status: Status::Ok, hash: None });
        let r = ask(&mut em, Request::HmacSha1Generate { kh: 1, flags: HMAC_FINAL, data: b"There".to_vec() });
        let mut mac = HmacSha1::new_from_slice(&KEY).unwrap();
        mac.update(b"Hi There");
        let expected: [u8; 20] = mac.finalize().into_bytes().into();
        assert_eq!(r, Response::HmacSha1Generate { kh: 1, status: Status::Ok, hash: Some(expected) });
        let r = ask(&mut emulator(Flags::OTP_DECODE), Request::HmacSha1Generate { kh: 1, flags: HMAC_RESET | HMAC_FINAL, data: vec![] });
        assert_eq!(r.status(), Some(Status::FunctionDisabled));
    }

    #[test]
    fn echo_info_random_and_garbage() {
        let mut em = emulator(Flags::NONE);
        assert_eq!(ask(&mut em, Request::Echo(b"ekoeko".to_vec())), Response::Echo(b"ekoeko".to_vec()));
        let Response::SystemInfo(info) = ask(&mut em, Request::SystemInfoQuery) else { panic!() };
        assert_eq!(info.protocol_version, 1);
        let Response::RandomGenerate(r) = ask(&mut em, Request::RandomGenerate(95)) else { panic!() };
        assert_eq!(r.len(), 95);
        // An unknown command gets no answer; the line stays usable.
        let (out, errors) = em.handle(&[2, 0x7e, 0]);
        assert!(out.is_empty());
        assert_eq!(errors, vec![ProtoError::UnknownCommand(0x7e)]);
        assert_eq!(ask(&mut em, Request::Echo(vec![1])), Response::Echo(vec![1]));
    }

    proptest::proptest! {
        /// Any bytes, and frames of every known command with any payload,
        /// are answered with well-formed frames or not at all; never a panic.
        #[test]
        fn no_input_panics_the_emulator(
            frames in proptest::collection::vec(
                (proptest::sample::select(super::super::proto::Command::ALL.to_vec()), proptest::collection::vec(proptest::prelude::any::<u8>(), 0..=96)),
                0..12,
            ),
            noise in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200),
            cut in 1usize..40,
        ) {
            let mut em = emulator(Flags::from_bits(0x7fff_ffff));
            let mut wire = noise;
            wire.extend_from_slice(&super::super::proto::RESYNC);
            for (cmd, payload) in frames {
                wire.extend_from_slice(&Frame::new(cmd.code(), payload).unwrap().encode());
            }
            for chunk in wire.chunks(cut) {
                let (out, _) = em.handle(chunk);
                let mut reader = FrameReader::new();
                reader.push(&out);
                while let Some(f) = reader.next_frame() {
                    let f = f.unwrap();
                    let cmd = super::super::proto::Command::from_code(f.cmd).unwrap();
                    Response::decode(cmd, &f).unwrap();
                }
            }
        }
    }

    #[test]
    fn pyhsm_json() {
        let em =
            Emulator::from_pyhsm_json(r#"{"1": "000102030405060708090a0b0c0d0e0f", "0x2000": "00000000000000000000000000000000"}"#, |kh| {
                if kh.get() == 1 {
                    Flags::OTP_DECODE
                } else {
                    Flags::NONE
                }
            })
            .unwrap();
        assert_eq!(em.handles.len(), 2);
        assert_eq!(em.handles[&1].flags, Flags::OTP_DECODE);
        assert!(Emulator::from_pyhsm_json(r#"{"1": "00"}"#, |_| Flags::NONE).is_err());
        assert!(Emulator::from_pyhsm_json("[]", |_| Flags::NONE).is_err());
    }
}
