//! A refused job: retried with backoff while that may help, else answered on `sign.failed`
//! with its audit event (a compact answer when even that cannot be stored).

use std::time::{Duration, Instant};

use super::store::{NotStored, OnTransient, StoreError, append_audit, audit_event, persist};
use super::{Findings, Job, Settle, stage};
use crate::audit::Decision;
use crate::error::{ErrorCode, SignerError};
use crate::messages::{AuditRef, ErrorBody, Failed};
use crate::pipeline::PipelineConfig;
use crate::pipeline::audit_writer::AppendId;

/// What a refusal does on this delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(in crate::pipeline) enum Refusal {
    /// NAK it: it comes back after this delay.
    Retry(Duration),
    /// Answer it on `sign.failed` now.
    Answer,
}

impl Refusal {
    /// A retryable failure is NAKed with backoff (or its `retryAfterMs`) while deliveries
    /// remain and the wait is within `backoff_max`; otherwise (a final code, the last
    /// delivery, or a quota wait longer than that, which is better left to the caller than
    /// parked in the queue) it is answered, with `retryAfterMs` for the caller.
    pub fn of(cfg: &PipelineConfig, delivered: u64, e: &SignerError) -> Self {
        let delay = backoff(cfg, delivered, e);
        if e.code().retryable() && delivered < cfg.max_deliver && delay <= cfg.backoff_max {
            Refusal::Retry(delay)
        } else {
            Refusal::Answer
        }
    }
}

/// Retries the refused job later or answers it now, as [`Refusal::of`] decides.
pub(super) async fn retry_or_answer(job: &mut Job<'_>, e: SignerError) -> Settle {
    match Refusal::of(job.cfg(), job.delivery.delivered(), &e) {
        Refusal::Retry(delay) => {
            tracing::info!(code = %e.code(), error = %crate::echo::bound_message(e.message()), "retryable failure; NAK with backoff");
            metrics::counter!("signer_retries_total", "code" => e.code().as_str()).increment(1);
            Settle::Nak(delay)
        }
        Refusal::Answer => answer(job, e).await,
    }
}

/// Answers the job with `error` on `sign.failed`, with its audit event. When that cannot be
/// stored for good (a stream refuses it), a compact refusal (`internal`, or
/// `payload_too_large` for a message over the broker's limit) without the gates' findings
/// is stored instead; when even that is refused, the message is terminated.
pub(super) async fn answer(job: &mut Job<'_>, error: SignerError) -> Settle {
    let error = error.bounded();
    let findings = std::mem::take(&mut job.findings);
    let e = match store_failed(job, &error, findings).await {
        Ok(settle) => return settle,
        Err(e) => e,
    };
    tracing::warn!(error = %e, code = %error.code(), "the refusal could not be stored; answering with a compact one");
    let compact = e.answer("the refusal").bounded();
    match store_failed(job, &compact, Findings::default()).await {
        Ok(settle) => settle,
        Err(e) => {
            tracing::error!(error = %e, request_id = %job.ids.request_id, "not even a compact refusal could be stored; the message is terminated without a result");
            metrics::counter!("signer_jobs_abandoned_total", "reason" => "refused_by_store")
                .increment(1);
            Settle::Term
        }
    }
}

/// Stores the audit event and the `sign.failed` result of `error`. `Err` only when one of
/// them was refused for good.
async fn store_failed(
    job: &Job<'_>,
    error: &SignerError,
    findings: Findings,
) -> Result<Settle, StoreError> {
    let (shared, ids) = (job.shared, &job.ids);
    tracing::info!(request_id = %ids.request_id, tenant = %ids.tenant, code = %error.code(), error = %error, "job refused");
    // (request_id and tenant are repeated: the span may not have them for undecodable input)
    let event = audit_event(
        ids,
        decision_of(error.code()),
        Some(error.code()),
        findings,
        Vec::new(),
    );
    let t_audit = Instant::now();
    // One id for every retry of this append: the writer stores the event once.
    let append_id = AppendId::fresh();
    let append = || append_audit(shared, append_id, event.clone());
    let audit_seq = match persist(&shared.cfg, job.delivery, OnTransient::Redeliver, append).await {
        Ok(seq) => seq,
        Err(NotStored::Settle(settle)) => return Ok(settle),
        Err(NotStored::Permanent(e)) => return Err(e),
    };
    stage("audit", t_audit);
    let failed = Failed {
        api_version: crate::API_VERSION.into(),
        request_id: ids.request_id.clone(),
        tenant: ids.tenant.clone(),
        kind: ids.kind,
        error: ErrorBody::from(error),
        audit: AuditRef {
            stream: shared.cfg.audit_stream.clone(),
            seq: audit_seq,
        },
    };
    let subject = shared.cfg.failed_subject.clone();
    let message = super::store::result_message(ids, subject, &failed)?;
    let key = job.idem_key();
    let code = Some(error.code());
    super::store::publish_message(
        job,
        key.as_deref(),
        message,
        "failed",
        code,
        OnTransient::Redeliver,
    )
    .await
}

fn backoff(cfg: &PipelineConfig, delivered: u64, error: &SignerError) -> Duration {
    if let Some(ms) = error.retry_after_ms() {
        return Duration::from_millis(ms.max(1));
    }
    exponential_backoff(cfg, delivered)
}

/// `backoff_base` doubled per delivery so far, at most `backoff_max`.
pub(in crate::pipeline) fn exponential_backoff(cfg: &PipelineConfig, delivered: u64) -> Duration {
    let exp = delivered.saturating_sub(1).min(16) as u32;
    cfg.backoff_base
        .saturating_mul(1 << exp)
        .min(cfg.backoff_max)
}

pub(in crate::pipeline) fn decision_of(code: ErrorCode) -> Decision {
    use ErrorCode::*;
    match code {
        AuthInvalid | AuthExpired | AudienceMismatch | ScopeMissing | TenantMismatch
        | DpopInvalid | DpopReplayed | PoeInvalid | PoeExpired | EntitlementDenied
        | QuotaExceeded | ProvenanceUntrusted | KeyRevoked => Decision::Denied,
        _ => Decision::Failed,
    }
}
