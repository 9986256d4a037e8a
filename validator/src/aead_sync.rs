//! The AEAD dataset of [`replication::sync`] over the KSM's
//! [`AeadStore`] (the `ksm` crate does not depend on `replication`: the
//! adapter lives here).
//!
//! **Items.** Key: the public id's bytes (0 to 8) ‖ the key handle (u32
//! big-endian), so 4 to 12 bytes. Value: the nonce (6 bytes) ‖ the AEAD
//! blob. Only these canonical bytes travel and are digested; the
//! site-local `created` and `origin` columns are not.
//!
//! **Rule.** Insert a new pair; a pair held with other bytes is
//! quarantined (`aead_conflicts`, once per distinct bytes) and counted in
//! [`Merged::conflicts`], never overwritten. Two sites holding different
//! bytes for one pair keep differing digests in its bucket until an
//! operator settles it (`ksm conflicts`): each anti-entropy round reports
//! the conflict again but adds no quarantine row.
//!
//! **Outbox.** The store's trigger fills the outbox for every pair
//! inserted at this site (`ksm import` in another process included; not
//! the pairs merged from peers) while a peer is registered;
//! [`SyncStore::changes`] registers the puller, records its
//! acknowledgement and compacts in one transaction (only when the cursor
//! moves), then reads.

use std::sync::Arc;

use ksm::store::{AeadStore, PutOutcome};
use ksm::LookupError;
use otp::aead_file::AeadRecord;
use otp::{Aead, AeadNonce, KeyHandle, PublicId};
use replication::sync::{bucket_of, Changes, Digest, Item, Merged, SyncError, SyncStore};

/// Bytes of the nonce at the start of a value.
const NONCE_LEN: usize = 6;
/// Bytes of the key handle at the end of a key.
const KH_LEN: usize = 4;

/// The item key of a pair.
#[must_use]
pub fn item_key(public_id: &PublicId, key_handle: KeyHandle) -> Vec<u8> {
    let mut k = Vec::with_capacity(public_id.as_bytes().len() + KH_LEN);
    k.extend_from_slice(public_id.as_bytes());
    k.extend_from_slice(&key_handle.get().to_be_bytes());
    k
}

/// The item value of an AEAD: nonce ‖ AEAD.
#[must_use]
pub fn item_value(record: &AeadRecord) -> Vec<u8> {
    let mut v = Vec::with_capacity(NONCE_LEN + record.aead.len());
    v.extend_from_slice(record.nonce.as_bytes());
    v.extend_from_slice(record.aead.as_bytes());
    v
}

/// Decode an item; `None` if it is malformed.
#[must_use]
pub fn decode_item(item: &Item) -> Option<(PublicId, AeadRecord)> {
    let split = item.key.len().checked_sub(KH_LEN)?;
    let (id, kh) = item.key.split_at(split);
    let public_id = PublicId::from_bytes(id).ok()?;
    let key_handle = KeyHandle::new(u32::from_be_bytes(kh.try_into().ok()?));
    if item.value.len() < NONCE_LEN {
        return None;
    }
    let (nonce, aead) = item.value.split_at(NONCE_LEN);
    Some((public_id, AeadRecord { key_handle, nonce: AeadNonce::from_slice(nonce).ok()?, aead: Aead::from_slice(aead).ok()? }))
}

fn sync_err(e: LookupError) -> SyncError {
    SyncError(e.0)
}

fn unix_now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// The AEAD dataset ([`replication::sync::Dataset::AEADS`]) of an
/// [`AeadStore`]. See the [module docs](self).
#[derive(Debug, Clone)]
pub struct AeadSync {
    store: Arc<AeadStore>,
}

impl AeadSync {
    /// The dataset of `store` (shared with the KSM that serves from it).
    #[must_use]
    pub fn new(store: Arc<AeadStore>) -> Self {
        Self { store }
    }

    /// The store underneath.
    #[must_use]
    pub fn store(&self) -> &AeadStore {
        &self.store
    }

    /// Every item, with its bucket, in one consistent scan on a connection
    /// of its own.
    fn scan(&self, mut f: impl FnMut(u8, Vec<u8>, Vec<u8>)) -> Result<(), SyncError> {
        self.store
            .for_each(|public_id, record| {
                let key = item_key(&public_id, record.key_handle);
                f(bucket_of(&key), key, item_value(&record));
                Ok::<_, LookupError>(())
            })
            .map_err(sync_err)
    }
}

impl SyncStore for AeadSync {
    fn changes(&self, peer: &str, after: Option<u64>, limit: usize) -> Result<Changes, SyncError> {
        let position = self.store.ack_peer(peer, after).map_err(sync_err)?;
        // After what the puller says it holds (it may say less than it
        // acknowledged before: it lost state); without it, after its cursor.
        let from = after.map_or(position.cursor, |n| n.min(position.head));
        let rows = self.store.outbox_after(from, limit).map_err(sync_err)?;
        let last = rows.last().map_or(from, |r| r.seq);
        // A pair removed by hand since is skipped (its row still moves the cursor).
        let items = rows
            .iter()
            .filter_map(|r| r.record.as_ref().map(|rec| Item { key: item_key(&r.public_id, r.key_handle), value: item_value(rec) }))
            .collect();
        Ok(Changes { items, last, head: position.head.max(last) })
    }

    fn digest(&self) -> Result<Digest, SyncError> {
        let mut digest = Digest::default();
        self.scan(|_, k, v| digest.add(&k, &v))?;
        Ok(digest)
    }

    fn bucket(&self, bucket: u8) -> Result<Vec<Item>, SyncError> {
        let mut items = Vec::new();
        self.scan(|b, key, value| {
            if b == bucket {
                items.push(Item { key, value });
            }
        })?;
        Ok(items)
    }

    fn merge(&self, peer: &str, items: &[Item]) -> Result<Merged, SyncError> {
        let rows = items
            .iter()
            .enumerate()
            .map(|(i, item)| {
                decode_item(item).ok_or_else(|| SyncError(format!("AEADs from {peer}: item {i} is malformed; nothing merged")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let outcomes = self.store.merge_from_peer(peer, &rows, unix_now()).map_err(sync_err)?;
        let mut merged = Merged::default();
        for o in outcomes {
            match o {
                PutOutcome::Added => merged.applied += 1,
                PutOutcome::AlreadyPresent => merged.unchanged += 1,
                PutOutcome::Conflict => merged.conflicts += 1,
            }
        }
        if merged.conflicts > 0 {
            tracing::warn!(peer, conflicts = merged.conflicts, "AEADs from a peer conflict with stored ones; quarantined, not applied");
        }
        Ok(merged)
    }
}
