//! Storing a job's outcome: its audit event and its result message, each retried as its
//! failure's kind allows ([`persist`]).

use std::sync::Arc;
use std::time::Instant;

use super::{Findings, Ids, Job, Settle, stage};
use crate::audit::{
    AuditEvent, AuthRecord, AuthState, Decision, KeyRecord, PoeRecord, PoeState, ProvenanceRecord,
    ProvenanceVerdict, QuotaOutcome, QuotaRecord,
};
use crate::error::{ErrorCode, SignerError};
use crate::pipeline::audit_writer::{AppendId, AuditMsg};
use crate::pipeline::{PipelineConfig, Shared, call_actor};
use crate::ports::{Delivery, OutMessage, PortError, Stored};

/// Why part of a job's outcome (its audit event, its result) was not stored. Only
/// [`StoreError::Unavailable`] is worth retrying; the others are answered at once.
#[derive(Debug, thiserror::Error)]
pub(in crate::pipeline) enum StoreError {
    /// The message is larger than the broker stores inline (its `max_payload`, or the
    /// stream's maximum message size). A result this large is answered
    /// `payload_too_large` (or, with an object store, stored by reference instead).
    #[error("too large to store inline: {0}")]
    TooLarge(#[source] PortError),
    /// The store refused it for another reason that a retry would repeat.
    #[error("refused for good: {0}")]
    Refused(#[source] PortError),
    /// The store or its actor did not answer, or failed in a way that may pass.
    #[error("unavailable: {0}")]
    Unavailable(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl StoreError {
    /// Classifies a port's failure by its kind.
    pub fn of_port(e: PortError) -> Self {
        if e.is_too_large() {
            StoreError::TooLarge(e)
        } else if e.is_permanent() {
            StoreError::Refused(e)
        } else {
            StoreError::Unavailable(Box::new(e))
        }
    }

    pub fn is_permanent(&self) -> bool {
        !matches!(self, StoreError::Unavailable(_))
    }

    /// The error a job is answered with when its outcome cannot be stored for good.
    pub fn answer(&self, what: &str) -> SignerError {
        let message = crate::echo::bound_message(&format!("{what} could not be stored: {self}"));
        match self {
            StoreError::TooLarge(_) => SignerError::PayloadTooLarge(format!(
                "{message}; results this large need an object store"
            )),
            _ => SignerError::Internal(message),
        }
    }
}

/// What a transient store failure may do with the job, as [`persist`] is told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(in crate::pipeline) enum OnTransient {
    /// NAK it before the last delivery: nothing was signed, or the signed result is
    /// recorded in the idempotency record and a redelivery republishes it.
    Redeliver,
    /// Keep trying in process for `retry_budget`, whatever the delivery count: the job is
    /// signed and its result is not recorded, so it lives only here; a redelivery would
    /// find no record and, once the lease expires, sign (and charge) again.
    RetryHere,
}

/// Why a piece of the outcome was not stored, as [`persist`] reports it.
#[derive(Debug)]
pub(in crate::pipeline) enum NotStored {
    /// Settle the delivery this way (NAK before the last delivery; TERM after the budget).
    Settle(Settle),
    /// For good: answer the job now.
    Permanent(StoreError),
}

/// Stores part of an outcome (the audit event, the result). A failure for good is returned
/// at once ([`NotStored::Permanent`]): retrying would fail the same way. A failure for now
/// NAKs the job before the last delivery (it comes back with backoff) when `on_transient`
/// allows it. Otherwise (the last delivery: nothing would bring it back; or a signed,
/// unrecorded result that a redelivery would sign again) the job keeps trying in process,
/// telling JetStream it is still in progress, for `retry_budget`. Then the message is
/// NAKed if deliveries remain, else terminated (logged, counted in
/// `signer_jobs_abandoned_total`): the outcome could not be stored by anyone meanwhile.
pub(in crate::pipeline) async fn persist<T, F, Fut>(
    cfg: &PipelineConfig,
    d: &dyn Delivery,
    on_transient: OnTransient,
    mut attempt: F,
) -> Result<T, NotStored>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, StoreError>>,
{
    let mut delay = cfg.backoff_base;
    let mut budget_ends = None;
    loop {
        let e = match attempt().await {
            Ok(v) => return Ok(v),
            Err(e) if e.is_permanent() => {
                metrics::counter!("signer_store_refusals_total").increment(1);
                return Err(NotStored::Permanent(e));
            }
            Err(e) => e,
        };
        let last = d.delivered() >= cfg.max_deliver;
        if !last && on_transient == OnTransient::Redeliver {
            return Err(NotStored::Settle(retry_later(cfg, d, &e)));
        }
        let ends = *budget_ends.get_or_insert_with(|| Instant::now() + cfg.retry_budget);
        if Instant::now() + delay > ends {
            if !last {
                tracing::error!(error = %e, budget_s = cfg.retry_budget.as_secs(),
                    "the signed outcome could not be stored within the retry budget; NAKed, the redelivery signs again");
                metrics::counter!("signer_signed_outcomes_dropped_total").increment(1);
                return Err(NotStored::Settle(retry_later(cfg, d, &e)));
            }
            tracing::error!(error = %e, budget_s = cfg.retry_budget.as_secs(),
                "last delivery: the outcome could not be stored within the retry budget; the message is terminated without a result");
            metrics::counter!("signer_jobs_abandoned_total", "reason" => "retry_budget")
                .increment(1);
            return Err(NotStored::Settle(Settle::Term));
        }
        tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, last_delivery = last,
            "could not store the outcome; retrying in process");
        let extended = tokio::time::timeout(cfg.call_timeout, d.in_progress()).await;
        if !matches!(extended, Ok(Ok(()))) {
            tracing::warn!("could not extend the delivery");
        }
        tokio::time::sleep(delay).await;
        delay = delay.saturating_mul(2).min(cfg.backoff_max);
    }
}

fn retry_later(cfg: &PipelineConfig, d: &dyn Delivery, e: &StoreError) -> Settle {
    tracing::warn!(error = %e, "could not store the outcome; the job will be redelivered");
    Settle::Nak(super::refusal::exponential_backoff(cfg, d.delivered()))
}

/// The audit event of a job's decision, bounded in size.
pub(in crate::pipeline) fn audit_event(
    ids: &Ids,
    decision: Decision,
    code: Option<ErrorCode>,
    f: Findings,
    keys: Vec<KeyRecord>,
) -> AuditEvent {
    let not_checked = decision != Decision::Signed;
    AuditEvent {
        version: 1,
        time: humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
        worker: String::new(),
        writer_seq: 0,
        request_id: ids.request_id.clone(),
        tenant: ids.tenant.clone(),
        kind: ids.kind.into(),
        caller: f.caller,
        subjects: f.subjects,
        subjects_omitted: None,
        auth: Some(AuthRecord {
            state: f.auth.unwrap_or(AuthState::NotChecked),
        }),
        poe: Some(PoeRecord {
            state: f.poe.unwrap_or(PoeState::NotChecked),
            plan: f.plan,
        }),
        quota: Some(QuotaRecord {
            outcome: f.quota.unwrap_or(QuotaOutcome::NotChecked),
            retry_after_ms: f.quota_retry_after_ms,
        }),
        provenance: Some(ProvenanceRecord {
            verdict: f.provenance.unwrap_or(if not_checked {
                ProvenanceVerdict::NotChecked
            } else {
                ProvenanceVerdict::Disabled
            }),
            scanner_digest: f.scanner_digest,
        }),
        keys,
        predicate_type: f.predicate_type,
        policy: f.policy,
        control: None,
        decision,
        error_code: code,
        trace_id: ids.traceparent.as_deref().and_then(trace_id),
        prev_hash: String::new(),
        hash: String::new(),
    }
    .bounded()
}

/// The trace id of a W3C `traceparent` (`00-<32 hex>-<16 hex>-<2 hex>`), if well formed.
fn trace_id(traceparent: &str) -> Option<String> {
    let mut parts = traceparent.split('-');
    let (_, id) = (parts.next()?, parts.next()?);
    (id.len() == 32
        && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        && id != "0".repeat(32))
    .then(|| id.to_string())
}

/// Has the AuditWriter store `event`. Every retry of one decision's event passes the same
/// `id`, so the writer seals and stores it once however often the call times out.
pub(super) async fn append_audit(
    shared: &Arc<Shared>,
    id: AppendId,
    event: AuditEvent,
) -> Result<u64, StoreError> {
    let audit = shared.read_refs().audit.clone();
    call_actor(audit, "audit_writer", shared.cfg.call_timeout, |r| {
        AuditMsg::Append(id, Box::new(event), r)
    })
    .await
    .map_err(|e| StoreError::Unavailable(Box::new(e)))?
    .map_err(StoreError::of_port)
}

/// The result message of a job: its body in the request's encoding, and the headers the
/// contract names (`Nats-Msg-Id` is tenant/requestId, so the results stream drops a copy).
pub(super) fn result_message<T: serde::Serialize>(
    ids: &Ids,
    subject: String,
    body: &T,
) -> Result<OutMessage, StoreError> {
    // An encoding failure repeats on every try: a refusal for good.
    let body = ids
        .content_type
        .encode(body)
        .map_err(|e| StoreError::Refused(PortError::permanent(e).context("encoding the result")))?;
    let mut headers = vec![
        (
            "Nats-Msg-Id".to_string(),
            format!("{}/{}", ids.tenant, ids.request_id),
        ),
        (
            "Content-Type".to_string(),
            ids.content_type.as_str().to_string(),
        ),
        ("Signer-Tenant".to_string(), ids.tenant.clone()),
        ("Signer-Request-Id".to_string(), ids.request_id.clone()),
        ("Signer-Kind".to_string(), ids.kind.as_str().to_string()),
    ];
    if let Some(tp) = &ids.traceparent {
        headers.push(("traceparent".to_string(), tp.clone()));
    }
    Ok(OutMessage {
        subject,
        headers,
        body,
    })
}

/// Why a result was not stored in time.
#[derive(Debug, thiserror::Error)]
#[error("the results stream did not acknowledge within {0:?}")]
pub(in crate::pipeline) struct NoAckInTime(std::time::Duration);

/// Publishes a result message straight through the publisher port (no actor between: it has
/// no state to guard) and waits, within the call timeout, until the results stream stored it.
pub(in crate::pipeline) async fn send_result(
    shared: &Shared,
    message: OutMessage,
) -> Result<Stored, StoreError> {
    let within = shared.cfg.call_timeout;
    let stored = tokio::time::timeout(within, async {
        shared.ports.publisher.send(message).await?.await
    })
    .await
    .map_err(|_| StoreError::Unavailable(Box::new(NoAckInTime(within))))?;
    stored.map_err(StoreError::of_port)
}

/// Stores a result message, then marks the request done in its idempotency record.
pub(super) async fn publish_message(
    job: &Job<'_>,
    idem_key: Option<&str>,
    message: OutMessage,
    outcome: &'static str,
    code: Option<ErrorCode>,
    on_transient: OnTransient,
) -> Result<Settle, StoreError> {
    let (shared, d) = (job.shared, job.delivery);
    let publish = || send_result(shared, message.clone());
    let t_publish = Instant::now();
    let stored = match persist(&shared.cfg, d, on_transient, publish).await {
        Ok(s) => s,
        Err(NotStored::Settle(settle)) => return Ok(settle),
        Err(NotStored::Permanent(e)) => return Err(e),
    };
    stage("publish", t_publish);
    let t_complete = Instant::now();
    if let Some(key) = idem_key
        && let Err(e) = shared
            .ports
            .idempotency
            .complete(key, stored.stream_sequence)
            .await
    {
        // The result is out; a later duplicate within the stream's window is still dropped.
        tracing::warn!(error = %e, "recording the idempotency result failed");
    }
    stage("complete", t_complete);
    metrics::counter!("signer_jobs_total", "outcome" => outcome, "code" => code.map_or("", ErrorCode::as_str))
        .increment(1);
    crate::pipeline::latency::result_stored(d.published(), outcome);
    // (quota refusals are counted where they happen: signer_quota_exceeded_total{tenant,plan,reason})
    tracing::debug!(
        outcome,
        result_seq = stored.stream_sequence,
        duplicate = stored.duplicate,
        "result stored"
    );
    Ok(Settle::Ack)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trace_id_parsing() {
        assert_eq!(
            trace_id("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").as_deref(),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        assert_eq!(trace_id("garbage"), None);
        assert_eq!(
            trace_id(&format!("00-{}-00f067aa0ba902b7-01", "0".repeat(32))),
            None
        );
    }
}
