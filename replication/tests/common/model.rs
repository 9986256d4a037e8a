//! The in-memory model of a site's counter store that the simulator and
//! the QUIC node tests share: the validator's local compare-and-set, a
//! peer's per `quorum::peer_cas`, and a small seeded generator.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::time::Duration;

use otp::PublicId;
use replication::quorum::{peer_cas, CasDecision, PeerCasResult, Proposal, StoredCounters};

/// SplitMix64: no dependency, the same sequence everywhere.
#[derive(Clone, Debug)]
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0; the modulo bias is irrelevant here).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    pub fn chance(&mut self, p: f64) -> bool {
        ((self.next() >> 11) as f64 / (1u64 << 53) as f64) < p
    }

    pub fn between(&mut self, lo: Duration, hi: Duration) -> Duration {
        let span = (hi - lo).as_micros() as u64;
        lo + Duration::from_micros(if span == 0 { 0 } else { self.below(span + 1) })
    }

    pub fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize]
    }
}

/// The validator's own rule (`CounterStore::compare_and_set`): strictly
/// greater → accepted; equal counters and nonce → REPLAYED_REQUEST;
/// otherwise REPLAYED_OTP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LocalVerdict {
    ReplayedRequest,
    ReplayedOtp,
}

pub type Store = BTreeMap<PublicId, StoredCounters>;

pub fn local_cas(store: &mut Store, p: &Proposal) -> Result<(), LocalVerdict> {
    match store.get(&p.public_id) {
        Some(s) if p.counters < s.counters => Err(LocalVerdict::ReplayedOtp),
        Some(s) if p.counters == s.counters && p.nonce == s.nonce => Err(LocalVerdict::ReplayedRequest),
        Some(s) if p.counters == s.counters => Err(LocalVerdict::ReplayedOtp),
        _ => {
            store.insert(p.public_id, StoredCounters::from(p));
            Ok(())
        }
    }
}

pub fn apply_peer_cas(store: &mut Store, p: &Proposal) -> PeerCasResult {
    let decision = peer_cas(store.get(&p.public_id), p);
    if decision == CasDecision::Store {
        store.insert(p.public_id, StoredCounters::from(p));
    }
    decision.into()
}
