//! M-of-N quorum approval of sensitive operations, in the manner of
//! CloudHSM's quorum token-sign.
//!
//! 1. The requester, with a valid session, calls [`OperatorDb::request`]
//!    for a [`QuorumOperation`] and a context (the key handle, the output
//!    file name, …) and hands the resulting [`QuorumToken`] file around.
//! 2. Each approver, with their **own** valid 2FA session, signs the 32
//!    decoded `token` bytes with their 2FA key (`openssl dgst -sha256
//!    -sign`, or `openssl pkeyutl -sign -pkeyopt digest:sha256`) and
//!    [`OperatorDb::approve`] records it. The requester may approve their
//!    own request once; that counts as one approval.
//! 3. The requester's command calls [`OperatorDb::consume`], which
//!    succeeds only with at least M approvals from distinct operators who
//!    still have the 2FA key they signed with, for the same operation,
//!    context and requester, before expiry ([`QUORUM_TOKEN_TTL_SECS`]),
//!    and only once: it marks the request used in the same write
//!    transaction.
//!
//! The token is `SHA-256` over a domain label, the module's `hsm_id`, the
//! request id, operation, context, requester, expiry and 32 bytes from
//! the operating system's random number generator, each length-prefixed.
//! [`OperatorDb::consume`] recomputes it from the operation and context
//! the command asks for, so a signature approves exactly that operation.
//!
//! The policy is one M per operation, [`DEFAULT_QUORUM`] unless set,
//! between [`MIN_QUORUM`] and [`MAX_QUORUM`] and never more than the
//! operators with 2FA. Changing it ([`OperatorDb::set_policy`]) itself
//! consumes a [`QuorumOperation::ChangePolicy`] approval whose context is
//! [`policy_context`].

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use hsm::fsutil::{write_atomic, Mode};
use hsm::signing::SigningKey;
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::operators::{
    check_session, from_db_time, load_operator, random32, to_db_time, OperatorDb, OperatorError, OperatorName, Session,
};

/// How long a quorum request may be approved and used, in seconds.
pub const QUORUM_TOKEN_TTL_SECS: u64 = 600;
/// The M of an operation without a policy.
pub const DEFAULT_QUORUM: u64 = 2;
/// The smallest M a policy may set.
pub const MIN_QUORUM: u64 = 2;
/// The largest M a policy may set.
pub const MAX_QUORUM: u64 = 8;
/// `version` of quorum token files.
pub const QUORUM_TOKEN_VERSION: &str = "1";

/// Operations that need a quorum.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum QuorumOperation {
    /// Create a key handle in the module.
    CreateKeyHandle,
    /// Import a key handle.
    ImportKeyHandle,
    /// Export the keystore.
    ExportKeystore,
    /// Write YubiKey secrets in plaintext (personalisation output).
    PlaintextOutput,
    /// Change the quorum policy.
    ChangePolicy,
}

impl QuorumOperation {
    /// Every operation.
    pub const ALL: [Self; 5] =
        [Self::CreateKeyHandle, Self::ImportKeyHandle, Self::ExportKeystore, Self::PlaintextOutput, Self::ChangePolicy];

    /// The kebab-case name.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::CreateKeyHandle => "create-key-handle",
            Self::ImportKeyHandle => "import-key-handle",
            Self::ExportKeystore => "export-keystore",
            Self::PlaintextOutput => "plaintext-output",
            Self::ChangePolicy => "change-policy",
        }
    }
}

impl fmt::Display for QuorumOperation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for QuorumOperation {
    type Err = OperatorError;
    fn from_str(s: &str) -> Result<Self, OperatorError> {
        Self::ALL.into_iter().find(|op| op.as_str() == s).ok_or_else(|| OperatorError::BadOperation(s.to_owned()))
    }
}

/// The context of the [`QuorumOperation::ChangePolicy`] request that
/// [`OperatorDb::set_policy`] consumes: `"<operation>=<m>"`.
#[must_use]
pub fn policy_context(op: QuorumOperation, m: u64) -> String {
    format!("{op}={m}")
}

/// One approval in a [`QuorumToken`] file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuorumApproval {
    /// The approver.
    pub operator: OperatorName,
    /// Base64 of their signature over the token bytes.
    pub signature: String,
}

/// A quorum request as a file handed between operators:
/// `{"version":"1","id":…,"operation":…,"context":…,"requester":…,"token":"<base64 32 bytes>","expires":…,"approvals":[]}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuorumToken {
    /// Always [`QUORUM_TOKEN_VERSION`].
    pub version: String,
    /// The request's id in the operators database.
    pub id: i64,
    /// What is to be approved.
    pub operation: QuorumOperation,
    /// What it applies to.
    pub context: String,
    /// Who asked.
    pub requester: OperatorName,
    /// Base64 of the 32 bytes approvers sign.
    pub token: String,
    /// Expiry, seconds since the Unix epoch.
    pub expires: u64,
    /// Approvals collected so far (informative: the database is what
    /// [`OperatorDb::consume`] counts).
    pub approvals: Vec<QuorumApproval>,
}

impl QuorumToken {
    /// Read a token file.
    pub fn read(path: &Path) -> Result<Self, OperatorError> {
        let text = std::fs::read_to_string(path).map_err(|e| hsm::Error::io(path, e))?;
        let token: Self = serde_json::from_str(&text).map_err(|e| OperatorError::BadQuorumToken(format!("{}: {e}", path.display())))?;
        if token.version != QUORUM_TOKEN_VERSION {
            return Err(OperatorError::BadQuorumToken(format!("version {:?}, expected {QUORUM_TOKEN_VERSION:?}", token.version)));
        }
        Ok(token)
    }

    /// Write it (mode 0600, replacing an existing file).
    pub fn write(&self, path: &Path) -> Result<(), OperatorError> {
        let mut text = serde_json::to_string_pretty(self).map_err(|e| OperatorError::BadQuorumToken(e.to_string()))?;
        text.push('\n');
        write_atomic(path, text.as_bytes(), Mode::Replace)?;
        Ok(())
    }

    /// The 32 bytes to sign.
    pub fn token_bytes(&self) -> Result<[u8; 32], OperatorError> {
        let bytes = B64.decode(self.token.trim()).map_err(|_| OperatorError::BadQuorumToken("token is not base64".to_owned()))?;
        bytes.try_into().map_err(|_| OperatorError::BadQuorumToken("token is not 32 bytes".to_owned()))
    }

    /// Record `operator`'s signature in the file (replacing theirs).
    pub fn add_approval(&mut self, operator: &OperatorName, signature: &[u8]) {
        self.approvals.retain(|a| a.operator != *operator);
        self.approvals.push(QuorumApproval { operator: operator.clone(), signature: B64.encode(signature) });
    }

    /// Sign the token bytes with `key` as `openssl dgst -sha256 -sign`
    /// does (tests and tools; operators normally use openssl).
    pub fn sign_with(&self, key: &SigningKey) -> Result<Vec<u8>, OperatorError> {
        Ok(key.sign(&self.token_bytes()?)?)
    }
}

/// The state of a quorum request, for listings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct QuorumStatus {
    /// The request id.
    pub id: i64,
    /// What for.
    pub operation: QuorumOperation,
    /// What it applies to.
    pub context: String,
    /// Who asked.
    pub requester: OperatorName,
    /// Expiry.
    pub expires: u64,
    /// When it was consumed, if it was.
    pub used_at: Option<u64>,
    /// Who approved, in order.
    pub approvers: Vec<OperatorName>,
    /// The M the policy requires now.
    pub required: u64,
}

fn token_digest(
    hsm_id: &str,
    id: i64,
    op: QuorumOperation,
    context: &str,
    requester: &OperatorName,
    expires: u64,
    nonce: &[u8],
) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"personalizer quorum token v1\0");
    let id = id.to_string();
    let expires = expires.to_string();
    for field in [
        hsm_id.as_bytes(),
        id.as_bytes(),
        op.as_str().as_bytes(),
        context.as_bytes(),
        requester.as_str().as_bytes(),
        expires.as_bytes(),
        nonce,
    ] {
        let len = u32::try_from(field.len()).unwrap_or(u32::MAX);
        h.update(len.to_be_bytes());
        h.update(field);
    }
    h.finalize().into()
}

fn check_context(context: &str) -> Result<(), OperatorError> {
    if (1..=256).contains(&context.chars().count()) && !context.chars().any(char::is_control) {
        Ok(())
    } else {
        Err(OperatorError::BadContext)
    }
}

fn check_m(m: u64) -> Result<(), OperatorError> {
    if (MIN_QUORUM..=MAX_QUORUM).contains(&m) {
        Ok(())
    } else {
        Err(OperatorError::PolicyOutOfRange(m))
    }
}

struct RequestRow {
    operation: QuorumOperation,
    context: String,
    requester: OperatorName,
    nonce: Vec<u8>,
    token: Vec<u8>,
    expires: u64,
    used_at: Option<u64>,
}

/// A `quorum_requests` row as stored: operation, context, requester,
/// nonce, token, expiry, use time.
type RawRequest = (String, String, String, Vec<u8>, Vec<u8>, i64, Option<i64>);

fn load_request(conn: &Connection, id: i64) -> Result<RequestRow, OperatorError> {
    let row: Option<RawRequest> = conn
        .query_row(
            "SELECT operation, context, requester, nonce, token, expires_at, used_at FROM quorum_requests WHERE id = ?1",
            [id],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?, r.get(6)?)),
        )
        .optional()?;
    let (operation, context, requester, nonce, token, expires, used_at) = row.ok_or(OperatorError::NoSuchRequest(id))?;
    Ok(RequestRow {
        operation: operation.parse()?,
        context,
        requester: requester.parse()?,
        nonce,
        token,
        expires: from_db_time(expires),
        used_at: used_at.map(from_db_time),
    })
}

fn load_approvals(conn: &Connection, id: i64) -> Result<Vec<(OperatorName, Vec<u8>)>, OperatorError> {
    let mut stmt = conn.prepare("SELECT operator, signature FROM quorum_approvals WHERE request_id = ?1 ORDER BY approved_at, rowid")?;
    let rows = stmt.query_map([id], |r| Ok((r.get::<_, String>(0)?, r.get::<_, Vec<u8>>(1)?)))?;
    let mut out = Vec::new();
    for row in rows {
        let (name, sig) = row?;
        out.push((name.parse()?, sig));
    }
    Ok(out)
}

fn policy_in(conn: &Connection, op: QuorumOperation) -> Result<u64, OperatorError> {
    let m: Option<i64> = conn.query_row("SELECT m FROM quorum_policy WHERE operation = ?1", [op.as_str()], |r| r.get(0)).optional()?;
    Ok(m.map_or(DEFAULT_QUORUM, |m| u64::try_from(m).unwrap_or(DEFAULT_QUORUM)))
}

/// The checks of [`OperatorDb::consume`], inside the caller's transaction.
fn consume_in(
    conn: &Connection,
    hsm_id: &str,
    session: &Session,
    id: i64,
    op: QuorumOperation,
    context: &str,
    now: u64,
) -> Result<Vec<OperatorName>, OperatorError> {
    let session = check_session(conn, &session.token_hash, now)?;
    let req = load_request(conn, id)?;
    if req.used_at.is_some() {
        return Err(OperatorError::RequestUsed(id));
    }
    if now >= req.expires {
        return Err(OperatorError::RequestExpired { id, expires: req.expires });
    }
    if req.operation != op {
        return Err(OperatorError::WrongOperation { id, expected: op, actual: req.operation });
    }
    if req.context != context {
        return Err(OperatorError::WrongContext { id, expected: context.to_owned(), actual: req.context });
    }
    if req.requester != session.operator {
        return Err(OperatorError::WrongRequester { id, requester: req.requester, operator: session.operator });
    }
    // Recomputed from what the command asks for, not read back: a row
    // edited in the database no longer matches the signatures.
    let token = token_digest(hsm_id, id, op, context, &session.operator, req.expires, &req.nonce);
    let mut approvers: Vec<OperatorName> = Vec::new();
    for (approver, signature) in load_approvals(conn, id)? {
        if approvers.contains(&approver) {
            return Err(OperatorError::DuplicateApprover { id, operator: approver });
        }
        let key = match load_operator(conn, &approver)? {
            None => return Err(OperatorError::ApprovalInvalid(approver, "the operator was removed")),
            Some(row) => match row.key {
                None => return Err(OperatorError::ApprovalInvalid(approver, "the approver has no 2FA key any more")),
                Some(key) => key,
            },
        };
        if key.verify_challenge(&token, &signature).is_err() {
            return Err(OperatorError::ApprovalInvalid(approver, "it does not verify with the approver's current 2FA key"));
        }
        approvers.push(approver);
    }
    let need = policy_in(conn, op)?;
    let have = u64::try_from(approvers.len()).unwrap_or(u64::MAX);
    if have < need {
        return Err(OperatorError::TooFewApprovals { have, need });
    }
    let n = conn.execute("UPDATE quorum_requests SET used_at = ?2 WHERE id = ?1 AND used_at IS NULL", params![id, to_db_time(now)?])?;
    if n != 1 {
        return Err(OperatorError::RequestUsed(id));
    }
    Ok(approvers)
}

impl OperatorDb {
    /// Ask for approval of `op` on `context` (the key handle, the output
    /// file, …): a new request, valid [`QUORUM_TOKEN_TTL_SECS`], as the
    /// file to hand to approvers.
    pub fn request(&mut self, session: &Session, op: QuorumOperation, context: &str, now: u64) -> Result<QuorumToken, OperatorError> {
        check_context(context)?;
        let hsm_id = self.hsm_id.clone();
        let nonce = random32()?;
        let expires = now.saturating_add(QUORUM_TOKEN_TTL_SECS);
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let session = check_session(&tx, &session.token_hash, now)?;
        tx.execute(
            "INSERT INTO quorum_requests (operation, context, requester, nonce, token, created_at, expires_at) VALUES (?1, ?2, ?3, ?4, x'', ?5, ?6)",
            params![op.as_str(), context, session.operator.as_str(), &nonce[..], to_db_time(now)?, to_db_time(expires)?],
        )?;
        let id = tx.last_insert_rowid();
        let token = token_digest(&hsm_id, id, op, context, &session.operator, expires, &nonce);
        tx.execute("UPDATE quorum_requests SET token = ?2 WHERE id = ?1", params![id, &token[..]])?;
        tx.commit()?;
        Ok(QuorumToken {
            version: QUORUM_TOKEN_VERSION.to_owned(),
            id,
            operation: op,
            context: context.to_owned(),
            requester: session.operator,
            token: B64.encode(token),
            expires,
            approvals: Vec::new(),
        })
    }

    /// Record the approval of request `id` by the operator of `session`
    /// (their own valid 2FA session): `signature` is theirs over the 32
    /// token bytes. Each operator approves a request at most once.
    pub fn approve(&mut self, session: &Session, id: i64, signature: &[u8], now: u64) -> Result<(), OperatorError> {
        let t = to_db_time(now)?;
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let session = check_session(&tx, &session.token_hash, now)?;
        let approver = session.operator;
        let req = load_request(&tx, id)?;
        if req.used_at.is_some() {
            return Err(OperatorError::RequestUsed(id));
        }
        if now >= req.expires {
            return Err(OperatorError::RequestExpired { id, expires: req.expires });
        }
        let key = load_operator(&tx, &approver)?.and_then(|r| r.key).ok_or_else(|| OperatorError::No2fa(approver.clone()))?;
        let already: Option<i64> = tx
            .query_row("SELECT 1 FROM quorum_approvals WHERE request_id = ?1 AND operator = ?2", params![id, approver.as_str()], |r| {
                r.get(0)
            })
            .optional()?;
        if already.is_some() {
            return Err(OperatorError::DuplicateApprover { id, operator: approver });
        }
        let token: [u8; 32] =
            req.token.as_slice().try_into().map_err(|_| OperatorError::BadQuorumToken(format!("request {id} has no token")))?;
        if key.verify_challenge(&token, signature).is_err() {
            return Err(OperatorError::BadApproval { id, operator: approver });
        }
        tx.execute(
            "INSERT INTO quorum_approvals (request_id, operator, signature, approved_at) VALUES (?1, ?2, ?3, ?4)",
            params![id, approver.as_str(), signature, t],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Use request `id` for `op` on `context` by the operator of `session`,
    /// who must be its requester: checks every condition of the module
    /// documentation, marks it used and returns the approvers (in approval
    /// order), for the audit log. Single-use, in one write transaction.
    pub fn consume(
        &mut self,
        session: &Session,
        id: i64,
        op: QuorumOperation,
        context: &str,
        now: u64,
    ) -> Result<Vec<OperatorName>, OperatorError> {
        let hsm_id = self.hsm_id.clone();
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let approvers = consume_in(&tx, &hsm_id, session, id, op, context, now)?;
        tx.commit()?;
        Ok(approvers)
    }

    /// The M of `op`.
    pub fn policy(&self, op: QuorumOperation) -> Result<u64, OperatorError> {
        policy_in(&self.conn, op)
    }

    /// The M of every operation.
    pub fn policies(&self) -> Result<Vec<(QuorumOperation, u64)>, OperatorError> {
        QuorumOperation::ALL.into_iter().map(|op| Ok((op, self.policy(op)?))).collect()
    }

    /// Set the M of `op`, consuming request `id` (a
    /// [`QuorumOperation::ChangePolicy`] request by the operator of
    /// `session` with context [`policy_context`]`(op, m)`) in the same
    /// transaction. M must be in 2..=8 and at most the number of operators
    /// with 2FA. Returns the approvers.
    pub fn set_policy(
        &mut self,
        session: &Session,
        id: i64,
        op: QuorumOperation,
        m: u64,
        now: u64,
    ) -> Result<Vec<OperatorName>, OperatorError> {
        check_m(m)?;
        let n = self.operators_with_2fa()?;
        if m > n {
            return Err(OperatorError::PolicyTooLarge { m, n });
        }
        let hsm_id = self.hsm_id.clone();
        let m_db = i64::try_from(m).map_err(|_| OperatorError::PolicyOutOfRange(m))?;
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let approvers = consume_in(&tx, &hsm_id, session, id, QuorumOperation::ChangePolicy, &policy_context(op, m), now)?;
        tx.execute(
            "INSERT INTO quorum_policy (operation, m) VALUES (?1, ?2) ON CONFLICT(operation) DO UPDATE SET m = excluded.m",
            params![op.as_str(), m_db],
        )?;
        tx.commit()?;
        Ok(approvers)
    }

    /// The state of request `id`.
    pub fn request_status(&self, id: i64) -> Result<QuorumStatus, OperatorError> {
        let req = load_request(&self.conn, id)?;
        Ok(QuorumStatus {
            id,
            operation: req.operation,
            context: req.context,
            requester: req.requester,
            expires: req.expires,
            used_at: req.used_at,
            approvers: load_approvals(&self.conn, id)?.into_iter().map(|(n, _)| n).collect(),
            required: policy_in(&self.conn, req.operation)?,
        })
    }

    /// Requests neither used nor expired at `now`.
    pub fn open_requests(&self, now: u64) -> Result<Vec<QuorumStatus>, OperatorError> {
        let mut stmt = self.conn.prepare("SELECT id FROM quorum_requests WHERE used_at IS NULL AND expires_at > ?1 ORDER BY id")?;
        let ids = stmt.query_map([to_db_time(now)?], |r| r.get::<_, i64>(0))?.collect::<Result<Vec<_>, _>>()?;
        ids.into_iter().map(|id| self.request_status(id)).collect()
    }

    /// Request `id` as a token file, with the approvals recorded so far.
    pub fn quorum_token(&self, id: i64) -> Result<QuorumToken, OperatorError> {
        let req = load_request(&self.conn, id)?;
        Ok(QuorumToken {
            version: QUORUM_TOKEN_VERSION.to_owned(),
            id,
            operation: req.operation,
            context: req.context,
            requester: req.requester,
            token: B64.encode(&req.token),
            expires: req.expires,
            approvals: load_approvals(&self.conn, id)?
                .into_iter()
                .map(|(operator, sig)| QuorumApproval { operator, signature: B64.encode(sig) })
                .collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn operations_parse_and_display_kebab_case() {
        for op in QuorumOperation::ALL {
            assert_eq!(op.to_string().parse::<QuorumOperation>().unwrap(), op);
            assert_eq!(serde_json::to_string(&op).unwrap(), format!("\"{op}\""));
        }
        assert_eq!("plaintext-output".parse::<QuorumOperation>().unwrap(), QuorumOperation::PlaintextOutput);
        assert!(matches!("PlaintextOutput".parse::<QuorumOperation>(), Err(OperatorError::BadOperation(_))));
        assert_eq!(policy_context(QuorumOperation::ExportKeystore, 3), "export-keystore=3");
    }

    #[test]
    fn token_binds_every_field() {
        let alice: OperatorName = "alice".parse().unwrap();
        let bob: OperatorName = "bob".parse().unwrap();
        let op = QuorumOperation::CreateKeyHandle;
        let base = token_digest("h", 1, op, "0x2000", &alice, 10, &[0; 32]);
        assert_ne!(base, token_digest("i", 1, op, "0x2000", &alice, 10, &[0; 32]));
        assert_ne!(base, token_digest("h", 2, op, "0x2000", &alice, 10, &[0; 32]));
        assert_ne!(base, token_digest("h", 1, QuorumOperation::ImportKeyHandle, "0x2000", &alice, 10, &[0; 32]));
        assert_ne!(base, token_digest("h", 1, op, "0x2001", &alice, 10, &[0; 32]));
        assert_ne!(base, token_digest("h", 1, op, "0x2000", &bob, 10, &[0; 32]));
        assert_ne!(base, token_digest("h", 1, op, "0x2000", &alice, 11, &[0; 32]));
        assert_ne!(base, token_digest("h", 1, op, "0x2000", &alice, 10, &[1; 32]));
        assert!(check_m(1).is_err() && check_m(9).is_err() && check_m(2).is_ok() && check_m(8).is_ok());
        assert!(check_context("").is_err() && check_context("a\nb").is_err() && check_context(&"x".repeat(257)).is_err());
    }
}
