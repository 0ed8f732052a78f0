//! The server of `signer.control.keys`: one replica of the queue group takes each command,
//! decides on it, records the decision in its audit chain (through the pipeline's
//! AuditWriter), applies it to the key bucket when authorised, and replies.
//!
//! An authorised command is audited *before* it is applied: when the audit stream cannot
//! store the event the command is refused (`unavailable`) and nothing changes, so no change
//! to key state goes unaudited. When applying then fails, a second event (`failed`) says so.

use std::sync::Arc;

use futures::StreamExt as _;
use sha2::{Digest as _, Sha256};
use signer_actors::audit::{
    AuditEvent, AuditKind, CONTROL_TENANT, ControlRecord, ControlRefusal, Decision,
};
use signer_actors::pipeline::AuditSink;

use super::auth::{OperatorAuthority, Refusal};
use super::command::{ControlCommand, ControlEnvelope, ControlReply};
use crate::keystate::{KeyLedger, KeyStateError};

/// Largest control message read (a command with a few signatures is a few kilobytes).
pub const MAX_CONTROL_BYTES: usize = 64 * 1024;

/// How long an authorised command waits for its audit event to be stored before it is
/// refused (`unavailable`): within the 10 s a NATS requester waits by default. The writer
/// keeps retrying the event on its chain (a broker failover); a follow-up `failed` event
/// then says the command was not applied.
pub const AUDIT_WAIT: std::time::Duration = std::time::Duration::from_secs(8);

/// Why an authorised command was not applied: `unavailable` when the key bucket did not
/// answer (sending the command again may work), `invalid_command` otherwise.
#[derive(Debug, thiserror::Error)]
enum ApplyError {
    #[error(transparent)]
    Scope(#[from] super::command::BothTenantAndPlan),
    /// The key ledger refused it (unknown or revoked key, bad keyid, nothing to restore) or
    /// its bucket failed.
    #[error(transparent)]
    KeyState(#[from] KeyStateError),
}

impl ApplyError {
    fn code(&self) -> ControlRefusal {
        match self {
            ApplyError::KeyState(e) if e.is_transient() => ControlRefusal::Unavailable,
            _ => ControlRefusal::InvalidCommand,
        }
    }
}

/// What the server needs.
pub struct ControlServer {
    pub state: Arc<KeyLedger>,
    /// `None` without `[gates.control]`: every command is refused (`control_disabled`).
    pub authority: Option<Arc<OperatorAuthority>>,
    pub audit: AuditSink,
}

/// The decision on one message, before it is applied.
struct Decided {
    action: String,
    record: ControlRecord,
    outcome: Result<ControlCommand, Refusal>,
}

fn now() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}

/// A control audit event (the AuditWriter seals it into the chain).
fn event(payload: &[u8], record: ControlRecord, decision: Decision) -> AuditEvent {
    AuditEvent {
        version: 1,
        time: now(),
        worker: String::new(),
        writer_seq: 0,
        request_id: format!("control-{}", &hex::encode(Sha256::digest(payload))[..32]),
        tenant: CONTROL_TENANT.into(),
        kind: AuditKind::Control,
        caller: None,
        subjects: vec![],
        subjects_omitted: None,
        auth: None,
        poe: None,
        quota: None,
        provenance: None,
        keys: vec![],
        predicate_type: None,
        policy: None,
        control: Some(record),
        decision,
        error_code: None,
        trace_id: None,
        prev_hash: String::new(),
        hash: String::new(),
    }
}

impl ControlServer {
    /// Subscribes to `subject` (in the replicas' queue group: one replica takes each
    /// command; the others follow the bucket, and each command is audited once), then
    /// serves it for as long as the process runs.
    pub async fn spawn(
        self,
        client: async_nats::Client,
        subject: String,
    ) -> Result<tokio::task::JoinHandle<()>, async_nats::SubscribeError> {
        let mut sub = client
            .queue_subscribe(subject, "stella-signer-control".to_string())
            .await?;
        let server = Arc::new(self);
        Ok(tokio::spawn(async move {
            while let Some(msg) = sub.next().await {
                let reply = server.handle(&msg.payload).await;
                if let Some(to) = msg.reply {
                    let body = serde_json::to_vec(&reply).unwrap_or_default();
                    let _ = client.publish(to, body.into()).await;
                }
            }
        }))
    }

    /// Decides, audits, applies: the reply to one message (counted in
    /// `signer_control_commands_total{outcome, code}`).
    pub async fn handle(&self, payload: &[u8]) -> ControlReply {
        let reply = self.handle_inner(payload).await;
        let (outcome, code) = match &reply {
            ControlReply::Accepted { .. } => ("accepted", ""),
            ControlReply::Refused { code, .. } => ("refused", code.as_str()),
            ControlReply::Failed { code, .. } => ("failed", code.as_str()),
        };
        metrics::counter!("signer_control_commands_total", "outcome" => outcome, "code" => code)
            .increment(1);
        reply
    }

    async fn handle_inner(&self, payload: &[u8]) -> ControlReply {
        let decided = self.decide(payload).await;
        let Decided {
            action,
            mut record,
            outcome,
        } = decided;
        let command = match outcome {
            Err(r) => {
                tracing::warn!(action, code = r.code.as_str(), detail = %r.detail,
                    "key control command refused");
                record.refusal = Some(r.code);
                record.detail = Some(r.detail.clone());
                if let Err(e) = self
                    .audit
                    .append(event(payload, record, Decision::Refused))
                    .await
                {
                    tracing::error!(error = %e, "audit event of a refused control command not stored");
                }
                return ControlReply::Refused {
                    code: r.code,
                    detail: r.detail,
                };
            }
            Ok(c) => c,
        };
        let operators: Vec<String> = record
            .signatures
            .iter()
            .filter(|s| s.counted)
            .filter_map(|s| s.sub.clone())
            .collect();
        let accepted = tokio::time::timeout(
            AUDIT_WAIT,
            self.audit
                .append(event(payload, record.clone(), Decision::Accepted)),
        )
        .await;
        let audit_seq = match accepted {
            Ok(Ok(seq)) => seq,
            not_stored => {
                let e = match not_stored {
                    Ok(Err(e)) => e.to_string(),
                    _ => format!("audit event not stored within {}s", AUDIT_WAIT.as_secs()),
                };
                tracing::error!(error = %e, "control command not applied: its audit event was not stored");
                // The writer may still store the `accepted` event later (it retries on its
                // chain): the chain then says, right after it, that nothing was applied.
                record.refusal = Some(ControlRefusal::Unavailable);
                record.detail = Some(format!("not applied: {e}"));
                let audit = self.audit.clone();
                let failed = event(payload, record, Decision::Failed);
                tokio::spawn(async move {
                    if let Err(e) = audit.append(failed).await {
                        tracing::error!(error = %e, "audit event of an unapplied control command not stored");
                    }
                });
                return ControlReply::Refused {
                    code: ControlRefusal::Unavailable,
                    detail: format!("not applied: {e}"),
                };
            }
        };
        match self.apply(&command).await {
            Ok(detail) => {
                tracing::warn!(action, ?operators, %detail, "key control command applied");
                ControlReply::Accepted {
                    action,
                    detail,
                    operators,
                    audit_seq,
                }
            }
            Err(e) => {
                let detail = e.to_string();
                let code = e.code();
                tracing::warn!(action, code = code.as_str(), %detail, "authorised key control command not applied");
                record.refusal = Some(code);
                record.detail = Some(detail.clone());
                if let Err(e) = self
                    .audit
                    .append(event(payload, record, Decision::Failed))
                    .await
                {
                    tracing::error!(error = %e, "audit event of a failed control command not stored");
                }
                ControlReply::Failed { code, detail }
            }
        }
    }

    /// Reads the envelope and checks its signatures.
    async fn decide(&self, payload: &[u8]) -> Decided {
        let unread = |code, detail: String| Decided {
            action: "unknown".into(),
            record: ControlRecord {
                action: "unknown".into(),
                arguments: None,
                command_sha256: None,
                signatures: vec![],
                refusal: None,
                detail: None,
            },
            outcome: Err(Refusal::new(code, detail)),
        };
        if payload.len() > MAX_CONTROL_BYTES {
            return unread(
                ControlRefusal::Malformed,
                format!("larger than {MAX_CONTROL_BYTES} bytes"),
            );
        }
        let envelope = match serde_json::from_slice::<ControlEnvelope>(payload) {
            Ok(e) => e,
            Err(e) => {
                // a bare command, as the control subject took before operator signatures
                let unsigned = serde_json::from_slice::<serde_json::Value>(payload)
                    .ok()
                    .filter(|v| v.get("action").is_some());
                return match unsigned {
                    Some(command) => {
                        let mut d = unread(
                            ControlRefusal::Unsigned,
                            "a bare command: send {\"command\": ..., \"signatures\": [...]}".into(),
                        );
                        let envelope = ControlEnvelope {
                            command,
                            signatures: vec![],
                        };
                        d.action = envelope.action();
                        d.record.action = envelope.action();
                        d.record.arguments = envelope.arguments();
                        d
                    }
                    None => unread(
                        ControlRefusal::Malformed,
                        format!("not a control envelope: {e}"),
                    ),
                };
            }
        };
        let action = envelope.action();
        let arguments = envelope.arguments();
        let Some(authority) = &self.authority else {
            let mut d = unread(
                ControlRefusal::Disabled,
                "no [gates.control] is configured: key commands are refused".into(),
            );
            d.action.clone_from(&action);
            d.record.action = action;
            d.record.arguments = arguments;
            return d;
        };
        let decision = authority.decide(&envelope).await;
        Decided {
            action: action.clone(),
            record: ControlRecord {
                action,
                arguments,
                command_sha256: decision.command_sha256,
                signatures: decision.signatures,
                refusal: None,
                detail: None,
            },
            outcome: decision.outcome,
        }
    }

    /// Applies an authorised command to the key bucket; what changed, or why not.
    async fn apply(&self, command: &ControlCommand) -> Result<String, ApplyError> {
        let scope = command.scope()?;
        match command {
            ControlCommand::Revoke { keyid, reason } => {
                self.state.revoke(keyid, reason).await?;
                Ok(format!("revoked {keyid}"))
            }
            ControlCommand::RevokeIdentity {
                issuer,
                san,
                reason,
            } => {
                let r = self.state.revoke_identity(issuer, san, reason).await?;
                Ok(format!("revoked the identity {} of {}", r.san, r.issuer))
            }
            ControlCommand::Rotate {
                profile,
                keys,
                reason,
                ..
            } => {
                let a = self
                    .state
                    .rotate(profile, scope, keys.clone(), reason)
                    .await?;
                Ok(format!(
                    "profile {} ({}): [{}] -> [{}] at {}",
                    a.profile,
                    a.scope,
                    a.previous.join(", "),
                    a.keys.join(", "),
                    a.rotated_at
                ))
            }
            ControlCommand::Restore { profile, .. } => {
                let a = self.state.restore(profile, &scope).await?;
                Ok(format!(
                    "profile {} ({}): rotation to [{}] undone; its configured keys sign again",
                    a.profile,
                    a.scope,
                    a.keys.join(", "),
                ))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keystate::InvalidCommand;

    #[test]
    fn a_bucket_outage_is_unavailable_and_anything_else_an_invalid_command() {
        let down = KeyStateError::bucket("writing", std::io::Error::other("no responders"));
        assert_eq!(
            ApplyError::from(down).code(),
            ControlRefusal::Unavailable,
            "sending the command again may work"
        );
        let unknown = KeyStateError::from(InvalidCommand::KeyNotLoaded { name: "k".into() });
        assert_eq!(
            ApplyError::from(unknown).code(),
            ControlRefusal::InvalidCommand
        );
        assert_eq!(
            ApplyError::from(super::super::command::BothTenantAndPlan).code(),
            ControlRefusal::InvalidCommand
        );
    }
}
