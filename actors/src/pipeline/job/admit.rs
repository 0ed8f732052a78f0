//! Steps 2, 4 and 5: authenticate (entitlement, then the profile's permit and its keys),
//! the payload, then admit (provenance, quota) and sign. Each refusal records what the
//! gate found in the job's findings, for the audit event.

use std::sync::Arc;
use std::time::Instant;

use super::{Job, Stop, call_failed, decode::Decoded, stage};
use crate::audit::QuotaOutcome;
use crate::error::{ErrorCode, SignerError};
use crate::pipeline::call_actor;
use crate::pipeline::gates::{EntitlementMsg, ProvenanceMsg, QuotaMsg, provenance_verdict};
use crate::pipeline::keyring::KeyMsg;
use crate::ports::{EntitlementVerdict, GateInput, QuotaGrant};
use crate::profiles::ProfileRefusal;
use crate::request::{PayloadSource, PreparedPayload, SignRequest};
use crate::signing::SignedEnvelope;

/// An authenticated job the profile admits: who it is, and the keys that sign it.
#[derive(Debug)]
pub(in crate::pipeline) struct Admitted {
    pub verdict: EntitlementVerdict,
    /// The profile's keys for this tenant and plan (one signature each).
    pub keys: Vec<String>,
}

/// A signed job: the envelope, the subjects of its payload, and who it was signed for.
pub(in crate::pipeline) struct Signed {
    pub envelope: SignedEnvelope,
    pub subjects: Vec<crate::statement::Subject>,
    pub verdict: EntitlementVerdict,
}

/// The entitlement gate (OpTok, DPoP, PoE), then whether the profile admits the tenant on
/// its verified plan, then the profile's keys. Before the claim: a request that does not
/// authenticate, or may not use its profile, uses up no requestId and is charged nothing.
pub(in crate::pipeline) async fn authenticate(
    job: &mut Job<'_>,
    decoded: &Decoded,
) -> Result<Admitted, Stop> {
    let shared = job.shared;
    let request = &decoded.request;
    let input = GateInput {
        request: request.clone(),
        subject_tenant: decoded.subject_tenant.clone(),
        payload_bytes: usize::try_from(decoded.source.size()).unwrap_or(usize::MAX),
        published: job.delivery.published(),
    };
    let entitlement = shared.read_refs().entitlement.clone();
    let verdict = call_actor(entitlement, "entitlement", shared.cfg.call_timeout, |r| {
        EntitlementMsg::Verify(input, r)
    })
    .await
    .map_err(|e| Stop::Refused(call_failed(e)))?;
    let verdict = job.findings.entitlement(verdict).map_err(Stop::Refused)?;

    // A profile is an entitlement: whether this tenant, on the plan of its verified
    // licence, may use it.
    let profiles = &shared.cfg.profiles;
    if let Err(refusal) = profiles.permit(request.profile(), &request.tenant, &verdict.plan) {
        return Err(Stop::Refused(match refusal {
            ProfileRefusal::Unknown(_) => SignerError::InvalidRequest(refusal.to_string()),
            ProfileRefusal::Tenant { .. } | ProfileRefusal::Plan { .. } => {
                metrics::counter!("signer_profile_denied_total", "profile" => request.profile().to_owned())
                    .increment(1);
                SignerError::EntitlementDenied(refusal.to_string())
            }
        }));
    }
    // The keys: the profile's, refined for the tenant and its plan, as rotated at runtime.
    let Some(selection) = profiles.select(
        request.profile(),
        &request.tenant,
        Some(verdict.plan.as_str()).filter(|p| !p.is_empty()),
        shared.ports.assignments.as_ref(),
    ) else {
        return Err(Stop::Refused(super::decode::unknown_profile(request)));
    };
    tracing::debug!(
        profile = request.profile(),
        scope = %selection.scope,
        assigned = selection.assigned,
        keys = ?selection.keys,
        "keys selected"
    );
    Ok(Admitted {
        verdict,
        keys: selection.keys,
    })
}

/// The bytes to sign: the request's own, or the object its `payloadRef` names (whose
/// subjects and predicate type are then recorded, and checked against what the profile
/// signs). Read after the claim, so two copies of a job do not both read it, and before
/// provenance and quota, so a bad reference or a payload the profile does not sign is
/// charged nothing.
pub(in crate::pipeline) async fn payload(
    job: &mut Job<'_>,
    request: &SignRequest,
    source: PayloadSource,
    plan: &str,
) -> Result<PreparedPayload, Stop> {
    match source {
        PayloadSource::Inline(p) => Ok(p),
        PayloadSource::Referenced {
            object,
            payload_type,
        } => {
            let t_fetch = Instant::now();
            let p =
                crate::pipeline::artefacts::fetch_payload(job.shared, &object, payload_type, plan)
                    .await
                    .map_err(Stop::Refused)?;
            stage("payload_fetch", t_fetch);
            job.findings.subjects = p.subjects.iter().map(|s| s.digest.clone()).collect();
            job.findings.predicate_type.clone_from(&p.predicate_type);
            super::decode::check_signable(&job.shared.cfg, request, &p).map_err(Stop::Refused)?;
            Ok(p)
        }
    }
}

/// Provenance, then quota (last, so a job retried for an earlier reason is not charged
/// twice; one unit per signature), then one signature per key of the profile. The payload
/// moves into the envelope (a 40 MB payload is not copied for it).
pub(in crate::pipeline) async fn admit_and_sign(
    job: &mut Job<'_>,
    request: &Arc<SignRequest>,
    admitted: Admitted,
    prepared: PreparedPayload,
) -> Result<Signed, Stop> {
    let shared = job.shared;
    let timeout = shared.cfg.call_timeout;
    let f = &mut job.findings;
    let provenance = shared.read_refs().provenance.clone();
    let (repository, image_digest) = (
        request.scanner.repository.clone(),
        request.scanner.image_digest.clone(),
    );
    let grant = call_actor(provenance, "provenance", timeout, |reply| {
        ProvenanceMsg::Verify {
            tenant: request.tenant.clone(),
            repository,
            image_digest,
            reply,
        }
    })
    .await
    .map_err(|e| Stop::Refused(call_failed(e)))?;
    f.provenance = Some(provenance_verdict(&grant));
    grant.map_err(Stop::Refused)?;

    let quota = shared.read_refs().quota.clone();
    let Admitted { verdict, keys } = admitted;
    let (tenant, plan, bytes) = (
        request.tenant.clone(),
        verdict.plan.clone(),
        prepared.bytes.len(),
    );
    // Quota is charged per signature: one unit per key that signs.
    let signatures = u32::try_from(keys.len()).unwrap_or(u32::MAX);
    let grant = call_actor(quota.clone(), "quota", timeout, |reply| QuotaMsg::Acquire {
        tenant,
        plan,
        payload_bytes: bytes,
        signatures,
        reply,
    })
    .await
    .map_err(|e| Stop::Refused(call_failed(e)))?;
    let grant = match grant {
        Ok(g) => g,
        Err(e) => {
            f.quota = Some(match e.code() {
                ErrorCode::QuotaExceeded | ErrorCode::PayloadTooLarge => QuotaOutcome::Exceeded,
                ErrorCode::Internal => QuotaOutcome::Unavailable,
                // e.g. a plan the quota configuration does not know: the error code says why
                _ => QuotaOutcome::NotChecked,
            });
            f.quota_retry_after_ms = e.retry_after_ms();
            return Err(Stop::Refused(e));
        }
    };
    f.quota = Some(match grant {
        QuotaGrant::Allowed => QuotaOutcome::Allowed,
        QuotaGrant::Disabled => QuotaOutcome::Disabled,
        QuotaGrant::FailOpen => QuotaOutcome::FailOpen,
    });
    let subjects = prepared.subjects.clone();
    let signed = sign(job, prepared, &keys).await;
    if let Some(q) = quota {
        let _ = q.cast(QuotaMsg::Release {
            tenant: request.tenant.clone(),
            plan: verdict.plan.clone(),
        });
    }
    Ok(Signed {
        envelope: signed.map_err(Stop::Refused)?,
        subjects,
        verdict,
    })
}

/// Asks every key actor of the profile to sign the PAE, concurrently, in profile order.
/// The PAE is built once, straight into the shared buffer the key actors read.
async fn sign(
    job: &Job<'_>,
    prepared: PreparedPayload,
    key_names: &[String],
) -> Result<SignedEnvelope, SignerError> {
    let shared = job.shared;
    let pae: Arc<[u8]> = crate::dsse::pae_header(&prepared.payload_type, prepared.bytes.len())
        .iter()
        .chain(prepared.bytes.iter())
        .copied()
        .collect();
    let actors: Vec<_> = {
        let refs = shared.read_refs();
        key_names
            .iter()
            .map(|n| (n.as_str(), refs.keys.get(n).and_then(|pool| pool.pick())))
            .collect()
    };
    let calls = actors.into_iter().map(|(name, actor)| {
        let pae = pae.clone();
        async move {
            let actor = actor
                .ok_or_else(|| SignerError::KeyUnavailable(format!("key {name} is not loaded")))?;
            call_actor(Some(actor), "key", shared.cfg.call_timeout, |r| {
                KeyMsg::Sign(pae, r)
            })
            .await
            .map_err(|e| SignerError::KeyUnavailable(format!("key {name}: {e}")))?
            .map_err(SignerError::from)
        }
    });
    let signatures = futures::future::try_join_all(calls).await?;
    drop(pae);
    crate::signing::assemble(prepared.payload_type, prepared.bytes, signatures)
        .map_err(|e| SignerError::Internal(format!("assembling the envelope: {e}")))
}
