//! The CRC-16 of Yubico OTP tokens (ISO 13239, reflected polynomial 0x8408).
//!
//! A token stores the complement of the CRC over its first 14 bytes; the
//! CRC over all 16 bytes is then the constant residue [`OK_RESIDUE`].

/// CRC over a whole valid token (`YUBIKEY_CRC_OK_RESIDUE`).
pub const OK_RESIDUE: u16 = 0xf0b8;

/// CRC-16 with initial value 0xffff and no final XOR.
#[must_use]
pub fn crc16(data: &[u8]) -> u16 {
    let mut crc: u16 = 0xffff;
    for &b in data {
        crc ^= u16::from(b);
        for _ in 0..8 {
            let lsb = crc & 1;
            crc >>= 1;
            if lsb != 0 {
                crc ^= 0x8408;
            }
        }
    }
    crc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libyubikey_self_test_values() {
        assert_eq!(crc16(&[0, 1, 2, 3, 4]), 62919);
        assert_eq!(crc16(&[0xfe]), 4470);
        assert_eq!(crc16(&[0x55, 0xaa, 0x00, 0xff]), 52149);
        let v = hex_literal(b"0102030405063075000 93dfa60ea");
        assert_eq!(crc16(&v), 35339);
    }

    fn hex_literal(s: &[u8]) -> Vec<u8> {
        let s: String = s.iter().filter(|c| !c.is_ascii_whitespace()).map(|&c| c as char).collect();
        hex::decode(s).unwrap()
    }
}
