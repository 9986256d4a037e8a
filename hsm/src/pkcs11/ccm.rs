//! The YubiHSM 1 AEAD (RFC 3610 CCM, 8-byte MAC, L = 2, no associated
//! data) built from two token operations, for tokens without CKM_AES_CCM.
//!
//! The handle key stays in the token. The token computes:
//! 1. the CTR keystream: one AES-ECB encryption of the counter blocks
//!    `A_0 ‖ A_1 ‖ … ‖ A_n`, where `A_i = 0x01 ‖ N ‖ BE16(i)`;
//! 2. the CBC-MAC: one AES-CBC encryption, with a zero IV, of
//!    `B_0 ‖ P` (P zero-padded to whole blocks), where
//!    `B_0 = 0x19 ‖ N ‖ BE16(len)`; its last block is the MAC.
//!
//! The host only lays out blocks and XORs: `C = P ⊕ S_1…`,
//! `T = first8(MAC) ⊕ first8(S_0)`. `N` is the 13-byte nonce
//! [`AeadNonce::ccm_nonce`] of the `otp` crate, so the result is
//! byte-identical to [`otp::HandleKey::seal`].
//!
//! Opening decrypts first (the MAC is over the plaintext), then compares
//! the MAC in constant time; the plaintext buffer is wiped on mismatch.

use otp::aead::{MAC_LEN, MAX_AEAD, MAX_PLAINTEXT};
use otp::{Aead, AeadNonce, KeyHandle};
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

const BLOCK: usize = 16;
/// CTR block flags: L − 1.
const CTR_FLAGS: u8 = 0x01;
/// B_0 flags: no associated data, M = 8, L = 2.
const B0_FLAGS: u8 = ((MAC_LEN as u8 - 2) / 2) << 3 | 0x01;

/// The two AES operations the construction needs, performed where the key
/// lives. Both return exactly as many bytes as they were given.
pub(crate) trait BlockOps {
    /// The error of the operations.
    type Error;
    /// AES-ECB encryption of whole blocks.
    fn ecb_encrypt(&mut self, blocks: &[u8]) -> Result<Zeroizing<Vec<u8>>, Self::Error>;
    /// AES-CBC encryption of whole blocks with an all-zero IV.
    fn cbc_zero_iv_encrypt(&mut self, blocks: &[u8]) -> Result<Zeroizing<Vec<u8>>, Self::Error>;
}

/// Why [`seal`] or [`open_into`] failed.
#[derive(Debug)]
pub(crate) enum CcmError<E> {
    /// The plaintext is not 1 to 64 bytes, or a buffer has the wrong size.
    Length(String),
    /// The MAC did not verify.
    Integrity,
    /// The token operation failed, or returned the wrong number of bytes.
    Ops(E),
    /// The token returned output of the wrong length.
    OutputLength,
}

fn blocks_for(len: usize) -> usize {
    len.div_ceil(BLOCK)
}

/// `A_0 ‖ A_1 ‖ … ‖ A_n` for a message of `len` bytes.
fn counter_blocks(n: &[u8; 13], len: usize) -> Vec<u8> {
    let count = blocks_for(len) + 1;
    let mut out = vec![0u8; count * BLOCK];
    for (i, block) in out.chunks_exact_mut(BLOCK).enumerate() {
        block[0] = CTR_FLAGS;
        block[1..14].copy_from_slice(n);
        // i ≤ 5 (64 bytes at most), so the counter fits.
        block[14..].copy_from_slice(&(i as u16).to_be_bytes());
    }
    out
}

/// `B_0 ‖ P ‖ 0…` (zero-padded), in zeroizing memory.
fn mac_blocks(n: &[u8; 13], plaintext: &[u8]) -> Zeroizing<Vec<u8>> {
    let mut out = Zeroizing::new(vec![0u8; (1 + blocks_for(plaintext.len())) * BLOCK]);
    out[0] = B0_FLAGS;
    out[1..14].copy_from_slice(n);
    // plaintext.len() ≤ 64 (checked by the callers).
    out[14..16].copy_from_slice(&(plaintext.len() as u16).to_be_bytes());
    out[BLOCK..BLOCK + plaintext.len()].copy_from_slice(plaintext);
    out
}

/// The tag: `first8(last block of the CBC output) ⊕ first8(S_0)`.
fn tag<E>(cbc_out: &[u8], keystream: &[u8]) -> Result<[u8; MAC_LEN], CcmError<E>> {
    let last = cbc_out.len().checked_sub(BLOCK).ok_or(CcmError::OutputLength)?;
    let mut t = [0u8; MAC_LEN];
    for (i, b) in t.iter_mut().enumerate() {
        *b = cbc_out[last + i] ^ keystream[i];
    }
    Ok(t)
}

fn check_len<E>(what: &str, len: usize) -> Result<(), CcmError<E>> {
    if (1..=MAX_PLAINTEXT).contains(&len) {
        Ok(())
    } else {
        Err(CcmError::Length(format!("{what} must be 1 to {MAX_PLAINTEXT} bytes, got {len}")))
    }
}

/// Seal `plaintext` (1 to 64 bytes) under key handle `kh` and `nonce`.
pub(crate) fn seal<O: BlockOps>(ops: &mut O, kh: KeyHandle, nonce: &AeadNonce, plaintext: &[u8]) -> Result<Aead, CcmError<O::Error>> {
    check_len("AEAD plaintext", plaintext.len())?;
    let n = nonce.ccm_nonce(kh);
    let keystream = ops.ecb_encrypt(&counter_blocks(&n, plaintext.len())).map_err(CcmError::Ops)?;
    let cbc = ops.cbc_zero_iv_encrypt(&mac_blocks(&n, plaintext)).map_err(CcmError::Ops)?;
    if keystream.len() != (1 + blocks_for(plaintext.len())) * BLOCK || cbc.len() != keystream.len() {
        return Err(CcmError::OutputLength);
    }
    let mut out = Zeroizing::new([0u8; MAX_AEAD]);
    let len = plaintext.len();
    for (i, p) in plaintext.iter().enumerate() {
        out[i] = p ^ keystream[BLOCK + i];
    }
    out[len..len + MAC_LEN].copy_from_slice(&tag(&cbc, &keystream)?);
    Aead::from_slice(&out[..len + MAC_LEN]).map_err(|e| CcmError::Length(e.to_string()))
}

/// Open `aead` into `out`, which must be exactly its plaintext length.
/// `out` is left zeroed if the MAC does not verify.
pub(crate) fn open_into<O: BlockOps>(
    ops: &mut O,
    kh: KeyHandle,
    nonce: &AeadNonce,
    aead: &Aead,
    out: &mut [u8],
) -> Result<(), CcmError<O::Error>> {
    let len = aead.plaintext_len();
    check_len("AEAD plaintext", len)?;
    if out.len() != len {
        return Err(CcmError::Length(format!("the plaintext buffer must be {len} bytes, got {}", out.len())));
    }
    let n = nonce.ccm_nonce(kh);
    let keystream = ops.ecb_encrypt(&counter_blocks(&n, len)).map_err(CcmError::Ops)?;
    if keystream.len() != (1 + blocks_for(len)) * BLOCK {
        return Err(CcmError::OutputLength);
    }
    let (ciphertext, expected) = aead.as_bytes().split_at(len);
    for (i, c) in ciphertext.iter().enumerate() {
        out[i] = c ^ keystream[BLOCK + i];
    }
    let cbc = match ops.cbc_zero_iv_encrypt(&mac_blocks(&n, out)) {
        Ok(c) if c.len() == keystream.len() => c,
        Ok(_) => {
            out.fill(0);
            return Err(CcmError::OutputLength);
        }
        Err(e) => {
            out.fill(0);
            return Err(CcmError::Ops(e));
        }
    };
    let computed = tag(&cbc, &keystream)?;
    if bool::from(computed.ct_eq(expected)) {
        Ok(())
    } else {
        out.fill(0);
        Err(CcmError::Integrity)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use aes::cipher::{BlockEncrypt, KeyInit};
    use otp::HandleKey;

    use super::*;

    /// The two operations done on the host with the `aes` crate, to check the
    /// construction against the `ccm` crate without a token.
    struct HostAes(aes::Aes256);

    impl BlockOps for HostAes {
        type Error = std::convert::Infallible;
        fn ecb_encrypt(&mut self, blocks: &[u8]) -> Result<Zeroizing<Vec<u8>>, Self::Error> {
            let mut out = Zeroizing::new(blocks.to_vec());
            for b in out.chunks_exact_mut(BLOCK) {
                self.0.encrypt_block(b.into());
            }
            Ok(out)
        }
        fn cbc_zero_iv_encrypt(&mut self, blocks: &[u8]) -> Result<Zeroizing<Vec<u8>>, Self::Error> {
            let mut out = Zeroizing::new(blocks.to_vec());
            let mut prev = [0u8; BLOCK];
            for b in out.chunks_exact_mut(BLOCK) {
                for (x, p) in b.iter_mut().zip(prev) {
                    *x ^= p;
                }
                self.0.encrypt_block(b.into());
                prev.copy_from_slice(b);
            }
            Ok(out)
        }
    }

    #[test]
    fn matches_the_ccm_crate_for_every_length() {
        let key = [0x20u8, 0x00].repeat(16);
        let mut ops = HostAes(aes::Aes256::new_from_slice(&key).unwrap());
        let reference = HandleKey::new(&key).unwrap();
        let kh = KeyHandle::new(0x2000);
        let nonce = AeadNonce::new(*b"MMMMMM");
        for len in 1..=MAX_PLAINTEXT {
            let pt: Vec<u8> = (0..len as u8).map(|i| i.wrapping_mul(37)).collect();
            let ours = seal(&mut ops, kh, &nonce, &pt).unwrap();
            assert_eq!(ours, reference.seal(kh, &nonce, &pt).unwrap(), "{len} bytes");
            let mut back = vec![0u8; len];
            open_into(&mut ops, kh, &nonce, &ours, &mut back).unwrap();
            assert_eq!(back, pt);
        }
        // Reference vector 1 (otp-and-aead.md §2.2).
        let mut foo = [0u8; 16];
        foo[..3].copy_from_slice(b"foo");
        assert_eq!(hex::encode(seal(&mut ops, kh, &nonce, &foo).unwrap().as_bytes()), "6657738b1501b25e455387c9a4e05ad94f84d3975ef2f942");
    }

    #[test]
    fn tampering_and_bounds() {
        let mut ops = HostAes(aes::Aes256::new_from_slice(&[7u8; 32]).unwrap());
        let kh = KeyHandle::new(1);
        let nonce = AeadNonce::new([1, 2, 3, 4, 5, 6]);
        let aead = seal(&mut ops, kh, &nonce, &[9u8; 22]).unwrap();
        for i in 0..aead.len() {
            let mut bytes = aead.as_bytes().to_vec();
            bytes[i] ^= 0x40;
            let bad = Aead::from_slice(&bytes).unwrap();
            let mut out = [0xffu8; 22];
            assert!(matches!(open_into(&mut ops, kh, &nonce, &bad, &mut out), Err(CcmError::Integrity)), "byte {i}");
            assert_eq!(out, [0u8; 22], "plaintext wiped");
        }
        let mut out = [0u8; 22];
        assert!(matches!(open_into(&mut ops, KeyHandle::new(2), &nonce, &aead, &mut out), Err(CcmError::Integrity)));
        assert!(matches!(open_into(&mut ops, kh, &nonce, &aead, &mut [0u8; 21]), Err(CcmError::Length(_))));
        assert!(matches!(seal(&mut ops, kh, &nonce, &[]), Err(CcmError::Length(_))));
        assert!(matches!(seal(&mut ops, kh, &nonce, &[0; 65]), Err(CcmError::Length(_))));
    }
}
