//! Replay ordering of Yubico OTPs.
//!
//! A YubiKey's OTPs are ordered by the pair (power-up counter, session use),
//! compared lexicographically: a higher counter wins, and within one counter
//! a higher use wins. A validation server accepts an OTP only if its pair is
//! strictly greater than the last one it accepted for that YubiKey.
//!
//! **Caps lock.** Bit 15 of the token's 16-bit counter field says that the
//! OTP was emitted by the caps-lock trigger, not that the counter is higher.
//! [`Counters`] holds the 15-bit counter only (libyubikey's
//! `yubikey_counter(c) = c & 0x7fff`). Ordering on the raw field would let
//! one caps-lock OTP lock out every later ordinary one, since `0x8005` sorts
//! above `0x0006`.

use std::fmt;

use crate::Error;

/// Largest power-up counter a YubiKey can carry (15 bits).
pub const MAX_COUNTER: u16 = 0x7fff;

/// The replay-ordering pair (counter, use) of one OTP.
///
/// `Ord` is lexicographic on (counter, use), as the derive does on the field
/// order below.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Counters {
    counter: u16,
    session_use: u8,
}

impl Counters {
    /// Build from a 15-bit power-up counter and an 8-bit session use.
    pub fn new(counter: u16, session_use: u8) -> Result<Self, Error> {
        if counter > MAX_COUNTER {
            return Err(Error::CounterRange(counter));
        }
        Ok(Self { counter, session_use })
    }

    /// Build from the token's raw 16-bit counter field, dropping the
    /// caps-lock bit.
    #[must_use]
    pub fn from_raw(raw_counter: u16, session_use: u8) -> Self {
        Self { counter: raw_counter & MAX_COUNTER, session_use }
    }

    /// The 15-bit power-up counter (`yk_counter` in YK-VAL, `useCtr` in pyhsm).
    #[must_use]
    pub fn counter(self) -> u16 {
        self.counter
    }

    /// The touches within this power-up (`yk_use`, pyhsm's `sessionCtr`).
    #[must_use]
    pub fn session_use(self) -> u8 {
        self.session_use
    }

    /// Would an OTP with counters `self` be fresh after `last` was accepted?
    #[must_use]
    pub fn is_after(self, last: Self) -> bool {
        self > last
    }
}

impl fmt::Debug for Counters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Counters({}, {})", self.counter, self.session_use)
    }
}

impl fmt::Display for Counters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "counter={} use={}", self.counter, self.session_use)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn lexicographic() {
        let c = |a, b| Counters::new(a, b).unwrap();
        assert!(c(2, 0) > c(1, 255));
        assert!(c(1, 2) > c(1, 1));
        assert!(!c(1, 1).is_after(c(1, 1)));
        assert!(c(1, 2).is_after(c(1, 1)));
        assert_eq!(Counters::new(0x8000, 0), Err(Error::CounterRange(0x8000)));
    }

    #[test]
    fn caps_lock_bit_is_not_ordering() {
        let caps = Counters::from_raw(0x8005, 0);
        assert_eq!(caps.counter(), 5);
        assert!(Counters::from_raw(6, 0).is_after(caps));
    }

    proptest! {
        #[test]
        fn order_matches_tuple(a in 0u16..=0x7fff, b: u8, c in 0u16..=0x7fff, d: u8) {
            let x = Counters::new(a, b).unwrap();
            let y = Counters::new(c, d).unwrap();
            prop_assert_eq!(x.cmp(&y), (a, b).cmp(&(c, d)));
        }
    }
}
