//! Step 6, store a signed job's outcome: the result placed (inline or by reference), its
//! `signed` audit event, the result message recorded in the idempotency record, the result
//! published, the record done. Until the result message is recorded, the signature exists
//! only in this process: transient failures are retried here, not handed to a redelivery.

use std::time::Instant;

use super::store::{NotStored, OnTransient, StoreError, append_audit, audit_event, persist};
use super::{Job, Settle, Signed, Stop, stage};
use crate::audit::{AuthState, Decision, KeyRecord, PoeState, ProvenanceVerdict, QuotaOutcome};
use crate::messages::{
    Artefacts, AuditRef, Completed, EntitlementPoe, GateState, Gates, InlineArtefacts, SignerEntry,
    SubjectEntry,
};
use crate::pipeline::Shared;
use crate::pipeline::audit_writer::AppendId;
use crate::ports::{OutMessage, PortError, Recorded};

/// Stores the outcome of a signed job; `Ok` with how to settle it (ack, or NAK / TERM when
/// it could not be stored for now), or [`Stop::Answer`] when it can never be stored as it
/// is: the job is then answered with a compact refusal and its own audit event, so that it
/// still ends in exactly one result.
pub(in crate::pipeline) async fn store(job: &mut Job<'_>, signed: Signed) -> Result<Settle, Stop> {
    let (shared, d) = (job.shared, job.delivery);
    let keys: Vec<KeyRecord> = signed
        .envelope
        .signers
        .iter()
        .map(|s| KeyRecord {
            keyid: s.keyid.clone(),
            source: s.source,
            mode: s.mode,
        })
        .collect();
    let mut completed = completed(job, signed);
    // Placed before the audit event: a result that cannot be published is answered as a
    // failure (with its own event), not recorded as signed.
    place_result(job, &mut completed).await?;
    let event = audit_event(
        &job.ids,
        Decision::Signed,
        None,
        job.findings.clone_parts(),
        keys,
    );
    let t_audit = Instant::now();
    // One id for every retry of this append: the writer stores the event once.
    let append_id = AppendId::fresh();
    let append = || append_audit(shared, append_id, event.clone());
    completed.audit.seq = match persist(&shared.cfg, d, OnTransient::RetryHere, append).await {
        Ok(seq) => seq,
        Err(NotStored::Settle(settle)) => return Ok(settle),
        Err(NotStored::Permanent(e)) => {
            return Err(Stop::Answer(e.answer("the audit event of the signature")));
        }
    };
    stage("audit", t_audit);
    let subject = shared.cfg.completed_subject.clone();
    let key = job.idem_key();
    let published = match super::store::result_message(&job.ids, subject, &completed) {
        Ok(message) => {
            let recorded = match (&job.lease, key.as_deref()) {
                (Some(lease), Some(key)) => {
                    record_outcome(shared, key, &lease.owner, &message).await
                }
                _ => false,
            };
            let on_transient = match recorded {
                true => OnTransient::Redeliver,
                false => OnTransient::RetryHere,
            };
            let message_key = key.as_deref();
            super::store::publish_message(
                job,
                message_key,
                message,
                "completed",
                None,
                on_transient,
            )
            .await
        }
        Err(e) => Err(e),
    };
    // Signed, but the result can never be stored: answered with a compact refusal.
    published.map_err(|e| Stop::Answer(e.answer("the signed result")))
}

/// The `sign.completed` result of a signed job (its audit reference is set once the event
/// is stored).
fn completed(job: &Job<'_>, signed: Signed) -> Completed {
    let Signed {
        envelope: signed,
        subjects,
        verdict,
    } = signed;
    let (ids, findings) = (&job.ids, &job.findings);
    let poe = match verdict.poe {
        PoeState::Bypassed => EntitlementPoe::Bypassed,
        PoeState::Disabled => EntitlementPoe::Disabled,
        _ => EntitlementPoe::Valid,
    };
    Completed {
        api_version: crate::API_VERSION.into(),
        request_id: ids.request_id.clone(),
        tenant: ids.tenant.clone(),
        kind: ids.kind,
        subjects: subjects.iter().map(SubjectEntry::from).collect(),
        artefacts: Artefacts::Inline(InlineArtefacts {
            envelope: signed.envelope,
            bundles: signed.bundles,
        }),
        bundle_sha256: signed.bundle_sha256,
        signers: signed
            .signers
            .iter()
            .map(|s| SignerEntry::from(s.as_ref()))
            .collect(),
        entitlement: crate::messages::Entitlement {
            plan: verdict.plan.clone(),
            poe,
        },
        gates: Some(Gates {
            auth: Some(match verdict.auth {
                AuthState::Disabled => GateState::Disabled,
                _ => GateState::Passed,
            }),
            poe: Some(match poe {
                EntitlementPoe::Valid => GateState::Passed,
                EntitlementPoe::Disabled => GateState::Disabled,
                EntitlementPoe::Bypassed => GateState::Bypassed,
            }),
            quota: findings.quota.map(|q| match q {
                QuotaOutcome::Disabled => GateState::Disabled,
                QuotaOutcome::FailOpen => GateState::Bypassed,
                _ => GateState::Passed,
            }),
            provenance: findings.provenance.map(|p| match p {
                ProvenanceVerdict::Disabled => GateState::Disabled,
                ProvenanceVerdict::Allowlisted => GateState::Allowlisted,
                _ => GateState::Passed,
            }),
        }),
        policy: findings.policy.clone(),
        // measured with the longest sequence; set once the audit event is stored
        audit: AuditRef {
            stream: job.cfg().audit_stream.clone(),
            seq: u64::MAX,
        },
    }
}

/// Records a signed job's result message in its idempotency record, before it is published;
/// `true` once it is recorded. A store failure is retried with backoff for up to
/// `call_timeout` (the lease is held meanwhile): the record is what keeps a redelivery from
/// signing again. If it still fails, or the lease was lost, the result is published anyway
/// (it is signed and audited), retried in process rather than redelivered.
async fn record_outcome(shared: &Shared, key: &str, owner: &str, message: &OutMessage) -> bool {
    let t_record = Instant::now();
    let mut delay = shared.cfg.backoff_base;
    let recorded = loop {
        match shared.ports.idempotency.record(key, owner, message).await {
            Ok(Recorded::Kept) => break true,
            Ok(Recorded::LeaseLost) => {
                metrics::counter!("signer_outcome_record_failures_total", "reason" => "lease_lost")
                    .increment(1);
                tracing::warn!(
                    "the idempotency lease was taken over before the outcome was recorded; publishing it"
                );
                break false;
            }
            Err(e) if t_record.elapsed() + delay > shared.cfg.call_timeout || e.is_permanent() => {
                metrics::counter!("signer_outcome_record_failures_total", "reason" => "store")
                    .increment(1);
                tracing::warn!(error = %e, "recording the outcome failed; publishing it");
                break false;
            }
            Err(e) => {
                tracing::info!(error = %e, retry_in_ms = delay.as_millis() as u64, "recording the outcome failed; retrying");
                tokio::time::sleep(delay).await;
                delay = delay.saturating_mul(2).min(shared.cfg.backoff_max);
            }
        }
    };
    stage("record", t_record);
    recorded
}

/// Keeps a result inline when it fits the inline limit; otherwise stores its envelope and
/// bundles in the blob bucket (retried like any store of the outcome) and makes it carry
/// their references. With no blob store, a result too large to publish is answered with
/// `payload_too_large` ([`crate::pipeline::artefacts::ResultTooLarge`]).
async fn place_result(job: &Job<'_>, completed: &mut Completed) -> Result<(), Stop> {
    use crate::error::SignerError;
    use crate::pipeline::artefacts::{Placement, ResultTooLarge, placement, store};
    let (shared, ids) = (job.shared, &job.ids);
    let limit = shared.cfg.max_inline_result_bytes;
    let size = match placement(limit, ids.content_type, completed) {
        Ok(Placement::Inline) => return Ok(()),
        Ok(Placement::Reference { size }) => size,
        // the result does not encode: that repeats on every try
        Err(e) => {
            let e = StoreError::Refused(PortError::permanent(e).context("encoding the result"));
            return Err(Stop::Answer(e.answer("the signed result")));
        }
    };
    let (Some(blobs), Artefacts::Inline(inline)) =
        (shared.ports.blobs.clone(), &completed.artefacts)
    else {
        return Err(Stop::Answer(SignerError::from(ResultTooLarge {
            size,
            limit,
        })));
    };
    let t_store = Instant::now();
    // (an object store failure is taken as passing: a full or refusing bucket is retried
    // within the budget like an unreachable one)
    let stored = persist(
        &shared.cfg,
        job.delivery,
        OnTransient::RetryHere,
        || async {
            store(blobs.as_ref(), &ids.tenant, &ids.request_id, inline)
                .await
                .map_err(|e| StoreError::Unavailable(Box::new(e)))
        },
    )
    .await;
    let stored = match stored {
        Ok(stored) => stored,
        Err(NotStored::Settle(settle)) => return Err(Stop::Settle(settle)),
        Err(NotStored::Permanent(e)) => {
            return Err(Stop::Answer(e.answer("the result objects")));
        }
    };
    stage("result_objects", t_store);
    metrics::counter!("signer_results_by_reference_total").increment(1);
    completed.artefacts = Artefacts::Referenced(stored);
    Ok(())
}
