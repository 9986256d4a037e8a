//! What every command tells the audit log: who, what, the approvers, and
//! counts or public-id ranges — never a secret.
//!
//! Commands build an [`AuditEvent`] and hand it to an [`AuditSink`]; the
//! audit log ([`crate::audit`]) is the sink in the binary, tests may
//! collect events in a `Vec`.

use serde::Serialize;

/// Did the operation succeed?
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// It did what was asked.
    Ok,
    /// It was refused (authentication, quorum, bad input) or failed.
    Refused,
}

/// One audited operation.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct AuditEvent {
    /// The operator whose session ran it (none: bootstrap, or a refused
    /// login whose name is in `detail`).
    pub operator: Option<String>,
    /// Dotted action name, e.g. `operator.add`, `login`, `quorum.approve`,
    /// `generate`.
    pub action: String,
    /// Operators whose quorum approvals the operation consumed.
    pub approvers: Vec<String>,
    /// Success or refusal.
    pub outcome: Outcome,
    /// Non-secret details: counts, public-id ranges, key handles, the
    /// reason of a refusal.
    pub detail: serde_json::Value,
}

impl AuditEvent {
    /// A successful `action` by `operator`.
    #[must_use]
    pub fn ok(operator: Option<&str>, action: &str, detail: serde_json::Value) -> Self {
        Self { operator: operator.map(str::to_owned), action: action.to_owned(), approvers: Vec::new(), outcome: Outcome::Ok, detail }
    }

    /// A refused `action`, with the reason.
    #[must_use]
    pub fn refused(operator: Option<&str>, action: &str, reason: &str) -> Self {
        Self {
            operator: operator.map(str::to_owned),
            action: action.to_owned(),
            approvers: Vec::new(),
            outcome: Outcome::Refused,
            detail: serde_json::json!({ "reason": reason }),
        }
    }

    /// The same event with the approvers that authorised it.
    #[must_use]
    pub fn approved_by(mut self, approvers: Vec<String>) -> Self {
        self.approvers = approvers;
        self
    }
}

/// Where audit events go.
pub trait AuditSink {
    /// Record `event` durably before the command reports success.
    fn record(&mut self, event: &AuditEvent) -> Result<(), String>;
}

impl AuditSink for Vec<AuditEvent> {
    fn record(&mut self, event: &AuditEvent) -> Result<(), String> {
        self.push(event.clone());
        Ok(())
    }
}
