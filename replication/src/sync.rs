//! Catch-up and anti-entropy of replicated datasets: counters, AEADs and
//! API clients, behind one small store trait.
//!
//! The quorum rule ([`quorum`](crate::quorum)) keeps every *accepted* OTP at
//! the sites that count; this module makes every site converge on
//! everything else: changes a site missed while it was down or cut off,
//! counters burned at one site only, acceptances made at risk, the AEADs
//! imported and the API clients changed at one site.
//!
//! **Datasets.** A dataset is a set of `key → value` [`Item`]s whose
//! encoding and merge rule belong to the embedder ([`SyncStore`]). The
//! merge must be idempotent and order-independent (counters: the max rule;
//! AEADs: insert, and quarantine a different value, never overwrite;
//! clients: a per-row version, highest wins, ties broken by the value
//! bytes), so that pages can be applied again, late or in any order.
//!
//! **Outbox pull.** Every store keeps a per-peer outbox: changes in commit
//! order with increasing sequence numbers. A site *pulls* each peer's
//! changes after its cursor ([`SyncStore::changes`]), merges them durably
//! ([`SyncStore::merge`]), and sends the last sequence number with its
//! next pull: that is its acknowledgement, below which the peer may
//! compact. A puller that restarted sends no cursor and gets the changes
//! after the one the peer recorded for it.
//!
//! **Anti-entropy.** As a safety net, and to bootstrap a new site, a site
//! periodically compares a bucketed [`Digest`] of a peer's dataset with its
//! own and pulls the whole of each bucket that differs
//! ([`SyncStore::bucket`]). A new, empty site differs in every bucket: the
//! full-state sync is the same exchange.
//!
//! The exchange on the wire is in [`wire`](crate::wire) ([`SyncRequest`],
//! [`SyncReply`]); the node drives it ([`syncer`](crate::syncer),
//! [`Node::start_with`](crate::node::Node::start_with)).
//!
//! [`SyncRequest`]: crate::wire::SyncRequest
//! [`SyncReply`]: crate::wire::SyncReply

use std::fmt;

use sha2::{Digest as _, Sha256};

/// Number of digest buckets.
pub const BUCKETS: usize = 256;
/// Longest item key, in bytes.
pub const MAX_KEY: usize = 64;
/// Longest item value, in bytes.
pub const MAX_VALUE: usize = 4096;

/// A replicated dataset, by its wire number.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Dataset(pub u8);

impl Dataset {
    /// OTP counters (every node, the witness included).
    pub const COUNTERS: Self = Self(1);
    /// AEADs (full sites).
    pub const AEADS: Self = Self(2);
    /// Validation API clients (full sites).
    pub const CLIENTS: Self = Self(3);

    /// Its name in logs and metrics.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::COUNTERS => "counters",
            Self::AEADS => "aeads",
            Self::CLIENTS => "clients",
            _ => "unknown",
        }
    }
}

impl fmt::Display for Dataset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One entry of a dataset, in the store's own encoding. Keys are at most
/// [`MAX_KEY`] bytes and values at most [`MAX_VALUE`].
#[derive(Clone, PartialEq, Eq)]
pub struct Item {
    /// The key (a public id, a public id and key handle, a client id).
    pub key: Vec<u8>,
    /// The value. It may hold a secret (an API client's key): never logged.
    pub value: Vec<u8>,
}

impl fmt::Debug for Item {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Item").field("key", &hex::encode(&self.key)).field("value_len", &self.value.len()).finish()
    }
}

/// The digest bucket of `key`: the first byte of its SHA-256.
#[must_use]
pub fn bucket_of(key: &[u8]) -> u8 {
    Sha256::digest(key)[0]
}

/// A bucketed digest of a whole dataset: per bucket, the XOR of
/// SHA-256(len(key) ‖ key ‖ value) over its items. XOR makes it
/// independent of the order items are added in, so a store computes it in
/// one scan in any order. Two sites holding the same items have the same
/// digest; a bucket that differs is pulled whole.
#[derive(Clone, PartialEq, Eq)]
pub struct Digest {
    buckets: Box<[[u8; 32]; BUCKETS]>,
}

impl Default for Digest {
    fn default() -> Self {
        Self { buckets: Box::new([[0; 32]; BUCKETS]) }
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let filled = self.buckets.iter().filter(|b| **b != [0; 32]).count();
        f.debug_struct("Digest").field("non_empty_buckets", &filled).finish()
    }
}

impl Digest {
    /// Adds one item.
    pub fn add(&mut self, key: &[u8], value: &[u8]) {
        let mut h = Sha256::new();
        // Keys are at most MAX_KEY bytes: the length fits in one byte.
        h.update([u8::try_from(key.len()).unwrap_or(u8::MAX)]);
        h.update(key);
        h.update(value);
        let item: [u8; 32] = h.finalize().into();
        let bucket = &mut self.buckets[usize::from(bucket_of(key))];
        for (b, i) in bucket.iter_mut().zip(item) {
            *b ^= i;
        }
    }

    /// The buckets, in order.
    #[must_use]
    pub fn buckets(&self) -> &[[u8; 32]; BUCKETS] {
        &self.buckets
    }

    /// Builds a digest from its buckets (as received).
    #[must_use]
    pub fn from_buckets(buckets: [[u8; 32]; BUCKETS]) -> Self {
        Self { buckets: Box::new(buckets) }
    }

    /// The buckets where `self` and `other` differ.
    #[must_use]
    pub fn differing(&self, other: &Self) -> Vec<u8> {
        (0..=u8::MAX).filter(|&b| self.buckets[usize::from(b)] != other.buckets[usize::from(b)]).collect()
    }
}

/// A page of a peer's outbox.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// The changed items, in commit order (at most the page limit). A key
    /// may appear more than once.
    pub items: Vec<Item>,
    /// The sequence number to send as the next cursor: that of the last
    /// item, or the starting cursor when there is none.
    pub last: u64,
    /// The store's highest sequence number: `head - last` is how far the
    /// puller is behind (its replication lag, in changes).
    pub head: u64,
}

/// What a merge did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Merged {
    /// Items that changed the local state.
    pub applied: u64,
    /// Items that changed nothing (already held, or older).
    pub unchanged: u64,
    /// Items refused and quarantined (an AEAD with other bytes than the one
    /// held): reported, never applied.
    pub conflicts: u64,
}

/// Why a store could not answer (I/O, a damaged row): a backend failure,
/// retried at the next round.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct SyncError(pub String);

/// The embedder's side of one dataset. Blocking: the node runs it on the
/// blocking pool. `peer` is the peer's authorized name (its certificate's).
pub trait SyncStore: Send + Sync + 'static {
    /// Outbox items after the cursor. `after: Some(n)`: `peer` has durably
    /// merged everything up to `n`; record that (cursors only move
    /// forward) and answer the items after `n`. `after: None`: from the
    /// cursor recorded for `peer` (0 when none). At most `limit` items.
    fn changes(&self, peer: &str, after: Option<u64>, limit: usize) -> Result<Changes, SyncError>;

    /// The digest of the whole dataset (committed state).
    fn digest(&self) -> Result<Digest, SyncError>;

    /// Every item of one digest bucket.
    fn bucket(&self, bucket: u8) -> Result<Vec<Item>, SyncError>;

    /// Merge a peer's items with the dataset's rule, durably (after the
    /// fsync) on return. Malformed items are errors of the whole call: none
    /// of the page is applied.
    fn merge(&self, peer: &str, items: &[Item]) -> Result<Merged, SyncError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_is_order_independent_and_sees_changes() {
        let mut a = Digest::default();
        let mut b = Digest::default();
        a.add(b"k1", b"v1");
        a.add(b"k2", b"v2");
        b.add(b"k2", b"v2");
        b.add(b"k1", b"v1");
        assert_eq!(a, b);
        assert!(a.differing(&b).is_empty());
        let mut c = Digest::default();
        c.add(b"k1", b"v1");
        c.add(b"k2", b"v3");
        assert_eq!(a.differing(&c), vec![bucket_of(b"k2")]);
        // Key and value are framed: moving a byte across changes the digest.
        let mut d = Digest::default();
        d.add(b"k", b"1v1");
        let mut e = Digest::default();
        e.add(b"k1", b"v1");
        assert_ne!(d.buckets()[usize::from(bucket_of(b"k"))], [0; 32]);
        assert_ne!(d, e);
    }
}
