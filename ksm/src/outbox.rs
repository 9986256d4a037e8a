//! Per-peer cursors over a replication outbox table in SQLite, shared by
//! the AEAD store here and the validator's API client table.
//!
//! An outbox is `<outbox>(seq INTEGER PRIMARY KEY AUTOINCREMENT, …)`, and
//! its cursors `<cursors>(peer TEXT PRIMARY KEY, acked_seq INTEGER)`: each
//! peer's acknowledged position. Cursors only move forward; one past the
//! head (a file restored from an older backup) is clamped to the head; the
//! rows every known peer holds are deleted with each acknowledgement (a
//! range delete on the primary key: one probe when there is nothing to
//! drop).
//!
//! Pulls arrive every fraction of a second and most acknowledge nothing
//! new: [`Outbox::unchanged`] answers those from a read connection, so only
//! a pull that moves a cursor takes the database's write lock (which the
//! validator's counter writer also needs, when the client table shares its
//! file).

use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

/// A peer's position in an outbox.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerPosition {
    /// The peer's acknowledged cursor: it holds every row up to it.
    pub cursor: u64,
    /// The highest sequence number ever appended (0 before the first).
    pub head: u64,
}

/// The names of an outbox table and of its cursor table.
#[derive(Clone, Copy, Debug)]
pub struct Outbox {
    /// The outbox table.
    pub table: &'static str,
    /// Its cursor table.
    pub cursors: &'static str,
}

fn seq(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

impl Outbox {
    /// The highest `seq` ever appended (0 before the first; compaction
    /// does not lower it).
    pub fn head(&self, conn: &Connection) -> rusqlite::Result<u64> {
        let head: Option<i64> = conn
            .prepare_cached("SELECT seq FROM sqlite_sequence WHERE name = ?1")?
            .query_row(params![self.table], |r| r.get(0))
            .optional()?;
        Ok(head.map_or(0, seq))
    }

    /// `peer`'s position, if acknowledging `acked` would change nothing: a
    /// known peer whose cursor is already at `acked` (or the head), or no
    /// acknowledgement at all. Read only.
    pub fn unchanged(&self, conn: &Connection, peer: &str, acked: Option<u64>) -> rusqlite::Result<Option<PeerPosition>> {
        let cursor: Option<i64> = conn
            .prepare_cached(&format!("SELECT acked_seq FROM {} WHERE peer = ?1", self.cursors))?
            .query_row(params![peer], |r| r.get(0))
            .optional()?;
        let Some(cursor) = cursor.map(seq) else { return Ok(None) };
        let head = self.head(conn)?;
        Ok(acked.is_none_or(|n| n.min(head) <= cursor).then_some(PeerPosition { cursor, head }))
    }

    /// Record that `peer` holds every row up to `acked` (registering it if
    /// unknown; `None` only registers), compact, and answer its position:
    /// one `IMMEDIATE` transaction.
    pub fn ack(&self, conn: &mut Connection, peer: &str, acked: Option<u64>) -> rusqlite::Result<PeerPosition> {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let position = self.record(&tx, peer, acked)?;
        tx.commit()?;
        Ok(position)
    }

    /// [`Self::ack`] inside the caller's write transaction.
    pub fn record(&self, conn: &Connection, peer: &str, acked: Option<u64>) -> rusqlite::Result<PeerPosition> {
        let head = self.head(conn)?;
        let acked = acked.map_or(0, |n| n.min(head));
        conn.execute(
            &format!(
                "INSERT INTO {0} (peer, acked_seq) VALUES (?1, ?2) \
                 ON CONFLICT (peer) DO UPDATE SET acked_seq = max(acked_seq, excluded.acked_seq)",
                self.cursors
            ),
            params![peer, i64::try_from(acked).unwrap_or(i64::MAX)],
        )?;
        let cursor: i64 =
            conn.query_row(&format!("SELECT acked_seq FROM {} WHERE peer = ?1", self.cursors), params![peer], |r| r.get(0))?;
        self.compact(conn)?;
        Ok(PeerPosition { cursor: seq(cursor), head })
    }

    /// Delete the rows every known peer holds (none while no peer is
    /// known); how many.
    pub fn compact(&self, conn: &Connection) -> rusqlite::Result<u64> {
        let sql = format!("DELETE FROM {} WHERE seq <= (SELECT min(acked_seq) FROM {})", self.table, self.cursors);
        Ok(conn.execute(&sql, [])? as u64)
    }

    /// Forget `peer`: it no longer holds back compaction.
    pub fn remove(&self, conn: &Connection, peer: &str) -> rusqlite::Result<()> {
        conn.execute(&format!("DELETE FROM {} WHERE peer = ?1", self.cursors), params![peer]).map(drop)
    }

    /// Every known peer and its cursor, by name.
    pub fn cursors(&self, conn: &Connection) -> rusqlite::Result<Vec<(String, u64)>> {
        let mut stmt = conn.prepare_cached(&format!("SELECT peer, acked_seq FROM {} ORDER BY peer", self.cursors))?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, seq(r.get(1)?))))?;
        rows.collect()
    }
}
