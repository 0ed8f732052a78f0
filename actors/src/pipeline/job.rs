//! One job, from the delivered message to its single result:
//! decode -> entitlement -> profile permission -> idempotency lease -> payload (read from
//! the blob bucket for a `payloadRef`) -> provenance -> quota (one unit per signature) ->
//! sign (every key of the profile) -> result placed (inline, or its envelope and bundles
//! stored as objects) -> audit event stored -> result stored -> idempotency record -> ack.
//! Retryable failures NAK with backoff until the last delivery, which publishes them.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use super::gates::{EntitlementMsg, ProvenanceMsg, QuotaMsg};
use super::keyring::KeyMsg;
use super::publisher::PublisherMsg;
use super::{CallError, Shared, audit_writer::AuditMsg, call_actor};
use crate::audit::{
    AuditEvent, AuthRecord, AuthState, Caller, Decision, KeyRecord, PoeRecord, PoeState,
    ProvenanceRecord, ProvenanceVerdict, QuotaOutcome, QuotaRecord,
};
use crate::codec::ContentType;
use crate::error::{ErrorCode, SignerError};
use crate::messages::{
    Artefacts, AuditRef, Completed, EntitlementPoe, ErrorBody, Failed, GateState, Gates,
    InlineArtefacts, ResultKind, SignerEntry, SubjectEntry,
};
use crate::ports::{
    Claim, Delivery, EntitlementVerdict, GateDenial, GateInput, OutMessage, ProvenanceGrant,
    QuotaGrant,
};
use crate::profiles::ProfileRefusal;
use crate::request::{
    PayloadSource, PreparedPayload, SignRequest, is_valid_request_id, is_valid_tenant,
};

/// Tenant recorded when a message names none we can trust.
pub const UNKNOWN_TENANT: &str = "_unknown";

/// How a delivery is settled.
enum Settle {
    Ack,
    Nak(Duration),
}

/// Who a result is about.
#[derive(Clone)]
struct Ids {
    request_id: String,
    tenant: String,
    kind: ResultKind,
    content_type: ContentType,
    traceparent: Option<String>,
}

/// What the gates found, for the audit event and the result.
#[derive(Default)]
struct Findings {
    caller: Option<Caller>,
    auth: Option<AuthState>,
    poe: Option<PoeState>,
    plan: Option<String>,
    quota: Option<QuotaOutcome>,
    quota_retry_after_ms: Option<u64>,
    provenance: Option<ProvenanceVerdict>,
    scanner_digest: Option<String>,
    subjects: Vec<crate::digest::DigestSet>,
}

/// Runs one job and settles its message.
pub(crate) async fn run(shared: &Arc<Shared>, delivery: Box<dyn Delivery>) {
    let started = Instant::now();
    if delivery.delivered() > 1 {
        metrics::counter!("signer_redeliveries_total").increment(1);
    }
    let span = tracing::info_span!(
        "job",
        seq = delivery.stream_sequence(),
        delivered = delivery.delivered(),
        request_id = tracing::field::Empty,
        tenant = tracing::field::Empty,
        traceparent = delivery.header("traceparent").unwrap_or(""),
    );
    let settle = tracing::Instrument::instrument(process(shared, delivery.as_ref()), span).await;
    let t_settle = Instant::now();
    let settled = match settle {
        Settle::Ack => delivery.ack().await,
        Settle::Nak(delay) => delivery.nak(delay).await,
    };
    stage("settle", t_settle);
    if let Err(e) = settled {
        tracing::warn!(error = %e, seq = delivery.stream_sequence(), "settling the message failed; it will be redelivered");
    }
    metrics::histogram!("signer_job_duration_seconds").record(started.elapsed().as_secs_f64());
}

/// Records how long a stage of a job took (`signer_stage_duration_seconds{stage}`): where
/// time goes when jobs are slow.
fn stage(name: &'static str, since: Instant) {
    metrics::histogram!("signer_stage_duration_seconds", "stage" => name)
        .record(since.elapsed().as_secs_f64());
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

/// What a job's subject says about its tenant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SubjectTenant<'a> {
    /// The bare requests subject: no tenant is named.
    Unnamed,
    /// `<requests>.<tenant>` or anything under it: the token right after the requests
    /// subject. The body must name the same tenant, so that publish rights on a tenant's
    /// subjects bind its jobs to it.
    Named(&'a str),
    /// Not the requests subject nor under it (a stream provisioned with other subjects): the
    /// tenant cannot be read, so the job is refused rather than left unbound.
    Foreign,
}

impl<'a> SubjectTenant<'a> {
    /// Reads `subject` against the requests subject `requests` (with its prefix).
    fn of(requests: &str, subject: &'a str) -> Self {
        if subject == requests {
            return SubjectTenant::Unnamed;
        }
        let Some(rest) = subject
            .strip_prefix(requests)
            .and_then(|r| r.strip_prefix('.'))
        else {
            return SubjectTenant::Foreign;
        };
        match rest.split('.').next() {
            Some(tenant) if !tenant.is_empty() => SubjectTenant::Named(tenant),
            _ => SubjectTenant::Foreign,
        }
    }

    fn named(self) -> Option<&'a str> {
        match self {
            SubjectTenant::Named(t) => Some(t),
            _ => None,
        }
    }
}

fn backoff(shared: &Shared, delivered: u64, error: &SignerError) -> Duration {
    if let Some(ms) = error.retry_after_ms() {
        return Duration::from_millis(ms.max(1));
    }
    let exp = delivered.saturating_sub(1).min(16) as u32;
    shared
        .cfg
        .backoff_base
        .saturating_mul(1 << exp)
        .min(shared.cfg.backoff_max)
}

fn decision_of(code: ErrorCode) -> Decision {
    use ErrorCode::*;
    match code {
        AuthInvalid | AuthExpired | AudienceMismatch | ScopeMissing | TenantMismatch
        | DpopInvalid | DpopReplayed | PoeInvalid | PoeExpired | EntitlementDenied
        | QuotaExceeded | ProvenanceUntrusted | KeyRevoked => Decision::Denied,
        _ => Decision::Failed,
    }
}

fn call_failed(e: CallError) -> SignerError {
    SignerError::Internal(e.to_string())
}

async fn process(shared: &Arc<Shared>, d: &dyn Delivery) -> Settle {
    let traceparent = d.header("traceparent").map(str::to_owned);
    let content_type = ContentType::from_header(d.header("Content-Type"));
    let subject = SubjectTenant::of(&shared.cfg.requests_subject, d.subject());
    let subject_tenant = subject.named().map(str::to_owned);
    // Who a refusal is addressed to when the body is not a valid request: Nats-Msg-Id, else
    // the body's requestId if it can be read, else `seq-<n>`; the subject's tenant, else the
    // body's, else `_unknown`.
    let fallback_ids = |content_type, probe: crate::codec::IdProbe| Ids {
        request_id: d
            .header("Nats-Msg-Id")
            .map(str::to_owned)
            .filter(|id| is_valid_request_id(id))
            .or(probe.request_id.filter(|id| is_valid_request_id(id)))
            .unwrap_or_else(|| format!("seq-{}", d.stream_sequence())),
        tenant: subject_tenant
            .clone()
            .filter(|t| is_valid_tenant(t))
            .or(probe.tenant.filter(|t| is_valid_tenant(t)))
            .unwrap_or_else(|| UNKNOWN_TENANT.into()),
        kind: ResultKind::Unknown,
        content_type,
        traceparent: traceparent.clone(),
    };

    let content_type = match content_type {
        Ok(ct) => ct,
        Err(e) => {
            return finish_failed(
                shared,
                d,
                fallback_ids(ContentType::Json, Default::default()),
                None,
                e,
                Findings::default(),
            )
            .await;
        }
    };
    if d.body().len() > shared.cfg.max_body_bytes {
        let e = SignerError::PayloadTooLarge(format!(
            "body is {} bytes, the limit is {}",
            d.body().len(),
            shared.cfg.max_body_bytes
        ));
        return finish_failed(
            shared,
            d,
            fallback_ids(content_type, Default::default()),
            None,
            e,
            Findings::default(),
        )
        .await;
    }
    let request: SignRequest = match content_type.decode::<SignRequest>(d.body()) {
        Ok(r) => r,
        Err(_) => {
            // Not a v1 body; say unsupported_api_version when it names another version.
            let e = match crate::codec::decode_request(d.body(), content_type) {
                Err(e) => e,
                Ok(_) => SignerError::InvalidRequest("body does not decode".into()),
            };
            let probe = crate::codec::probe_ids(d.body(), content_type);
            return finish_failed(
                shared,
                d,
                fallback_ids(content_type, probe),
                None,
                e,
                Findings::default(),
            )
            .await;
        }
    };
    let ids = Ids {
        request_id: if is_valid_request_id(&request.request_id) {
            request.request_id.clone()
        } else {
            fallback_ids(content_type, Default::default()).request_id
        },
        tenant: if is_valid_tenant(&request.tenant) {
            request.tenant.clone()
        } else {
            fallback_ids(content_type, Default::default()).tenant
        },
        kind: request.kind.into(),
        content_type,
        traceparent: traceparent.clone(),
    };
    let span = tracing::Span::current();
    span.record("request_id", ids.request_id.as_str());
    span.record("tenant", ids.tenant.as_str());

    let mut findings = Findings {
        scanner_digest: Some(request.scanner.image_digest.clone()),
        ..Findings::default()
    };
    // Before anything that costs or records something (payload, gates, the requestId's
    // claim, quota): a job older than the queue age limit is answered and forgotten.
    if let Err(e) = check_queue_age(d.published(), SystemTime::now(), shared.cfg.max_queue_age) {
        return finish_failed(shared, d, ids, None, e, findings).await;
    }
    let source = match request.validate().and_then(|_| request.payload_source()) {
        Ok(p) => p,
        Err(e) => return finish_failed(shared, d, ids, None, e, findings).await,
    };
    if let PayloadSource::Inline(prepared) = &source {
        findings.subjects = prepared.subjects.iter().map(|s| s.digest.clone()).collect();
    }
    let mismatch = match subject {
        SubjectTenant::Named(t) if t != request.tenant => Some(format!(
            "subject names tenant {t:?}, body names {:?}",
            request.tenant
        )),
        SubjectTenant::Foreign => Some(format!(
            "subject {:?} is not under {:?}: its tenant cannot be checked",
            d.subject(),
            shared.cfg.requests_subject
        )),
        _ => None,
    };
    if let Some(m) = mismatch {
        let e = SignerError::TenantMismatch(m);
        return finish_failed(shared, d, ids, None, e, findings).await;
    }
    if !shared.cfg.profiles.contains(request.profile()) {
        let e = unknown_profile(&request);
        return finish_failed(shared, d, ids, None, e, findings).await;
    }

    let request = Arc::new(request);
    let t_gates = Instant::now();
    // Authentication first: a request that does not authenticate must not use up a
    // requestId (its refusal is answered, not remembered).
    let gate_input = GateInput {
        request: request.clone(),
        subject_tenant: subject_tenant.clone(),
        payload_bytes: usize::try_from(source.size()).unwrap_or(usize::MAX),
        published: d.published(),
    };
    let verdict = match authenticate(shared, gate_input, &mut findings).await {
        Ok(v) => v,
        Err(e) => return retry_or_fail(shared, d, ids, None, e, findings).await,
    };

    // A profile is an entitlement: whether this tenant, on the plan of its verified
    // licence, may use it. Decided before the claim and the quota, so a refusal uses up
    // no requestId and is charged nothing.
    if let Err(refusal) =
        shared
            .cfg
            .profiles
            .permit(request.profile(), &request.tenant, &verdict.plan)
    {
        let e = match refusal {
            ProfileRefusal::Unknown(_) => SignerError::InvalidRequest(refusal.to_string()),
            ProfileRefusal::Tenant { .. } | ProfileRefusal::Plan { .. } => {
                metrics::counter!("signer_profile_denied_total", "profile" => request.profile().to_owned())
                    .increment(1);
                SignerError::EntitlementDenied(refusal.to_string())
            }
        };
        return finish_failed(shared, d, ids, None, e, findings).await;
    }

    // The keys: the profile's, refined for the tenant and its plan, as rotated at runtime.
    let Some(selection) = shared.cfg.profiles.select(
        request.profile(),
        &request.tenant,
        Some(verdict.plan.as_str()).filter(|p| !p.is_empty()),
        shared.ports.assignments.as_ref(),
    ) else {
        return finish_failed(shared, d, ids, None, unknown_profile(&request), findings).await;
    };
    tracing::debug!(
        profile = request.profile(),
        scope = %selection.scope,
        assigned = selection.assigned,
        keys = ?selection.keys,
        "keys selected"
    );
    let key_names = selection.keys;

    let idem_key = format!("{}/{}", ids.tenant, ids.request_id);
    let t_claim = Instant::now();
    let claimed = match shared
        .ports
        .idempotency
        .claim(&idem_key, &shared.cfg.worker_id, shared.cfg.lease)
        .await
    {
        Ok(Claim::Acquired) => Ok(()),
        Ok(Claim::Done { result_sequence }) => {
            return answer_duplicate(shared, &ids, result_sequence).await;
        }
        Ok(Claim::Busy { retry_after }) => return Settle::Nak(retry_after),
        Err(e) => Err(SignerError::Internal(format!(
            "idempotency store unavailable: {e}"
        ))),
    };
    stage("claim", t_claim);

    // A referenced payload is read once the requestId is ours (two copies of a job do not
    // both read it) and before provenance and quota (its size and digest are checked
    // before anything is charged).
    let prepared = match claimed {
        Ok(()) => payload(shared, source, &verdict.plan, &mut findings).await,
        Err(e) => Err(e),
    };
    // The payload moves into the envelope (a 40 MB payload is not copied for it); its
    // subjects are kept for the result.
    let (outcome, subjects) = match prepared {
        Ok(prepared) => {
            let subjects = prepared.subjects.clone();
            let signed = admit_and_sign(
                shared,
                &request,
                &verdict,
                prepared,
                &key_names,
                &mut findings,
            )
            .await;
            (signed, subjects)
        }
        Err(e) => (Err(e), Vec::new()),
    };
    stage("gates_and_sign", t_gates);
    let settle = match outcome {
        Ok(signed) => {
            finish_signed(
                shared, d, &ids, &idem_key, &subjects, signed, verdict, findings,
            )
            .await
        }
        Err(e) => retry_or_fail(shared, d, ids, Some(&idem_key), e, findings).await,
    };
    if let Settle::Nak(_) = settle
        && let Err(e) = shared
            .ports
            .idempotency
            .release(&idem_key, &shared.cfg.worker_id)
            .await
    {
        tracing::warn!(error = %e, "releasing the idempotency lease failed; it expires by itself");
    }
    settle
}

/// A retryable failure is NAKed with backoff while deliveries remain and the wait is within
/// `backoff_max`; otherwise (last delivery, or a quota wait longer than that, which is
/// better left to the caller than parked in the queue) it is published, with
/// `retryAfterMs` for the caller.
async fn retry_or_fail(
    shared: &Arc<Shared>,
    d: &dyn Delivery,
    ids: Ids,
    idem_key: Option<&str>,
    e: SignerError,
    findings: Findings,
) -> Settle {
    let delay = backoff(shared, d.delivered(), &e);
    if e.code().retryable()
        && d.delivered() < shared.cfg.max_deliver
        && delay <= shared.cfg.backoff_max
    {
        tracing::info!(code = %e.code(), error = %e, "retryable failure; NAK with backoff");
        metrics::counter!("signer_retries_total", "code" => e.code().as_str()).increment(1);
        return Settle::Nak(delay);
    }
    finish_failed(shared, d, ids, idem_key, e, findings).await
}

/// The entitlement gate: OpTok, DPoP, Proof-of-Entitlement.
async fn authenticate(
    shared: &Arc<Shared>,
    input: GateInput,
    findings: &mut Findings,
) -> Result<EntitlementVerdict, SignerError> {
    let entitlement = shared.read_refs().entitlement.clone();
    let verdict = call_actor(entitlement, "entitlement", shared.cfg.call_timeout, |r| {
        EntitlementMsg::Verify(input, r)
    })
    .await
    .map_err(call_failed)?;
    match verdict {
        Ok(v) => {
            findings.caller.clone_from(&v.caller);
            findings.auth = Some(v.auth);
            findings.poe = Some(v.poe);
            findings.plan = Some(v.plan.clone());
            Ok(v)
        }
        Err(GateDenial {
            error,
            caller,
            auth,
            poe,
            plan,
        }) => {
            findings.caller = caller;
            findings.auth = auth;
            findings.poe = poe;
            findings.plan = plan;
            Err(error)
        }
    }
}

/// Refuses a job that was `published` longer than `max_age` before `now` with
/// `request_expired`. A publish time after `now` (the broker's clock ahead of ours) counts
/// as no wait at all.
fn check_queue_age(
    published: SystemTime,
    now: SystemTime,
    max_age: Duration,
) -> Result<(), SignerError> {
    let waited = now.duration_since(published).unwrap_or(Duration::ZERO);
    if waited > max_age {
        return Err(SignerError::RequestExpired(format!(
            "the job waited {} in the queue, the limit is {}",
            humantime::format_duration(Duration::from_secs(waited.as_secs())),
            humantime::format_duration(max_age)
        )));
    }
    Ok(())
}

fn unknown_profile(request: &SignRequest) -> SignerError {
    SignerError::InvalidRequest(format!("unknown signing profile {:?}", request.profile()))
}

/// The bytes to sign: the request's own, or the object its `payloadRef` names (whose
/// subjects are then recorded).
async fn payload(
    shared: &Arc<Shared>,
    source: PayloadSource,
    plan: &str,
    findings: &mut Findings,
) -> Result<PreparedPayload, SignerError> {
    match source {
        PayloadSource::Inline(p) => Ok(p),
        PayloadSource::Referenced {
            object,
            payload_type,
        } => {
            let t_fetch = Instant::now();
            let p = super::artefacts::fetch_payload(shared, &object, payload_type, plan).await?;
            stage("payload_fetch", t_fetch);
            findings.subjects = p.subjects.iter().map(|s| s.digest.clone()).collect();
            Ok(p)
        }
    }
}

/// Provenance, then quota (last, so a job retried for an earlier reason is not charged
/// twice), then one signature per key of the profile.
async fn admit_and_sign(
    shared: &Arc<Shared>,
    request: &Arc<SignRequest>,
    verdict: &EntitlementVerdict,
    prepared: PreparedPayload,
    key_names: &[String],
    findings: &mut Findings,
) -> Result<crate::signing::SignedEnvelope, SignerError> {
    let timeout = shared.cfg.call_timeout;
    let provenance = shared.read_refs().provenance.clone();
    let (repository, image_digest) = (
        request.scanner.repository.clone(),
        request.scanner.image_digest.clone(),
    );
    let grant = call_actor(provenance, "provenance", timeout, |reply| {
        ProvenanceMsg::Verify {
            repository,
            image_digest,
            reply,
        }
    })
    .await
    .map_err(call_failed)?;
    findings.provenance = Some(match &grant {
        Ok(ProvenanceGrant::Trusted) => ProvenanceVerdict::Trusted,
        Ok(ProvenanceGrant::Allowlisted) => ProvenanceVerdict::Allowlisted,
        Ok(ProvenanceGrant::Disabled) => ProvenanceVerdict::Disabled,
        Err(e) if e.code() == ErrorCode::ProvenanceUntrusted => ProvenanceVerdict::Untrusted,
        Err(_) => ProvenanceVerdict::Unavailable,
    });
    grant?;

    let quota = shared.read_refs().quota.clone();
    let (tenant, plan, bytes) = (
        request.tenant.clone(),
        verdict.plan.clone(),
        prepared.bytes.len(),
    );
    // Quota is charged per signature: one unit per key that signs.
    let signatures = u32::try_from(key_names.len()).unwrap_or(u32::MAX);
    let grant = call_actor(quota.clone(), "quota", timeout, |reply| QuotaMsg::Acquire {
        tenant,
        plan,
        payload_bytes: bytes,
        signatures,
        reply,
    })
    .await
    .map_err(call_failed)?;
    let grant = match grant {
        Ok(g) => g,
        Err(e) => {
            findings.quota = Some(match e.code() {
                ErrorCode::QuotaExceeded | ErrorCode::PayloadTooLarge => QuotaOutcome::Exceeded,
                ErrorCode::Internal => QuotaOutcome::Unavailable,
                // e.g. a plan the quota configuration does not know: the error code says why
                _ => QuotaOutcome::NotChecked,
            });
            findings.quota_retry_after_ms = e.retry_after_ms();
            return Err(e);
        }
    };
    findings.quota = Some(match grant {
        QuotaGrant::Allowed => QuotaOutcome::Allowed,
        QuotaGrant::Disabled => QuotaOutcome::Disabled,
        QuotaGrant::FailOpen => QuotaOutcome::FailOpen,
    });
    let signed = sign(shared, prepared, key_names).await;
    if let Some(q) = quota {
        let _ = q.cast(QuotaMsg::Release {
            tenant: request.tenant.clone(),
            plan: verdict.plan.clone(),
        });
    }
    signed
}

/// Asks every key actor of the profile to sign the PAE, concurrently, in profile order.
/// The PAE is built once, straight into the shared buffer the key actors read.
async fn sign(
    shared: &Arc<Shared>,
    prepared: PreparedPayload,
    key_names: &[String],
) -> Result<crate::signing::SignedEnvelope, SignerError> {
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

fn gate_state(auth: AuthState) -> GateState {
    match auth {
        AuthState::Disabled => GateState::Disabled,
        _ => GateState::Passed,
    }
}

#[allow(clippy::too_many_arguments)]
async fn finish_signed(
    shared: &Arc<Shared>,
    d: &dyn Delivery,
    ids: &Ids,
    idem_key: &str,
    subjects: &[crate::statement::Subject],
    signed: crate::signing::SignedEnvelope,
    verdict: EntitlementVerdict,
    findings: Findings,
) -> Settle {
    let keys: Vec<KeyRecord> = signed
        .signers
        .iter()
        .map(|s| KeyRecord {
            keyid: s.keyid.clone(),
            source: s.source,
            mode: s.mode,
        })
        .collect();
    let poe = match verdict.poe {
        PoeState::Bypassed => EntitlementPoe::Bypassed,
        PoeState::Disabled => EntitlementPoe::Disabled,
        _ => EntitlementPoe::Valid,
    };
    let mut completed = Completed {
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
            auth: Some(gate_state(verdict.auth)),
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
        // measured with the longest sequence; set once the audit event is stored
        audit: AuditRef {
            stream: shared.cfg.audit_stream.clone(),
            seq: u64::MAX,
        },
    };
    // Placed before the audit event: a result that cannot be published is answered as a
    // failure (with its own event), not recorded as signed.
    if let Err(settle) = place_result(shared, d, ids, idem_key, &mut completed, &findings).await {
        return settle;
    }
    let event = audit_event(ids, Decision::Signed, None, findings.clone_parts(), keys);
    let t_audit = Instant::now();
    completed.audit.seq = match persist(shared, d, || append_audit(shared, event.clone())).await {
        Ok(seq) => seq,
        Err(settle) => return settle,
    };
    stage("audit", t_audit);
    let subject = shared.cfg.completed_subject.clone();
    publish_result(
        shared,
        d,
        ids,
        Some(idem_key),
        subject,
        &completed,
        "completed",
        None,
    )
    .await
}

/// Keeps a result inline when it fits the inline limit; otherwise stores its envelope and
/// bundles in the blob bucket (retried like any store of the outcome) and makes it carry
/// their references. With no blob store, a result too large to publish is answered with
/// `payload_too_large` ([`super::artefacts::ResultTooLarge`]).
async fn place_result(
    shared: &Arc<Shared>,
    d: &dyn Delivery,
    ids: &Ids,
    idem_key: &str,
    completed: &mut Completed,
    findings: &Findings,
) -> Result<(), Settle> {
    use super::artefacts::{Placement, ResultTooLarge, placement, store};
    let limit = shared.cfg.max_inline_result_bytes;
    let size = match placement(limit, ids.content_type, completed) {
        Ok(Placement::Inline) => return Ok(()),
        Ok(Placement::Reference { size }) => size,
        Err(e) => return Err(retry_later(shared, d, e)),
    };
    let (Some(blobs), Artefacts::Inline(inline)) =
        (shared.ports.blobs.clone(), &completed.artefacts)
    else {
        let e = SignerError::from(ResultTooLarge { size, limit });
        return Err(finish_failed(
            shared,
            d,
            ids.clone(),
            Some(idem_key),
            e,
            findings.clone_parts(),
        )
        .await);
    };
    let t_store = Instant::now();
    let stored = persist(shared, d, || {
        store(blobs.as_ref(), &ids.tenant, &ids.request_id, inline)
    })
    .await?;
    stage("result_objects", t_store);
    metrics::counter!("signer_results_by_reference_total").increment(1);
    completed.artefacts = Artefacts::Referenced(stored);
    Ok(())
}

impl Findings {
    /// The audit-relevant parts (the struct itself is consumed by the event).
    fn clone_parts(&self) -> Findings {
        Findings {
            caller: self.caller.clone(),
            auth: self.auth,
            poe: self.poe,
            plan: self.plan.clone(),
            quota: self.quota,
            quota_retry_after_ms: self.quota_retry_after_ms,
            provenance: self.provenance,
            scanner_digest: self.scanner_digest.clone(),
            subjects: self.subjects.clone(),
        }
    }
}

async fn finish_failed(
    shared: &Arc<Shared>,
    d: &dyn Delivery,
    ids: Ids,
    idem_key: Option<&str>,
    error: SignerError,
    findings: Findings,
) -> Settle {
    tracing::info!(request_id = %ids.request_id, tenant = %ids.tenant, code = %error.code(), error = %error, "job refused");
    // (request_id and tenant are repeated: the span may not have them for undecodable input)
    let event = audit_event(
        &ids,
        decision_of(error.code()),
        Some(error.code()),
        findings,
        Vec::new(),
    );
    let t_audit = Instant::now();
    let audit_seq = match persist(shared, d, || append_audit(shared, event.clone())).await {
        Ok(seq) => seq,
        Err(settle) => return settle,
    };
    stage("audit", t_audit);
    let failed = Failed {
        api_version: crate::API_VERSION.into(),
        request_id: ids.request_id.clone(),
        tenant: ids.tenant.clone(),
        kind: ids.kind,
        error: ErrorBody::from(&error),
        audit: AuditRef {
            stream: shared.cfg.audit_stream.clone(),
            seq: audit_seq,
        },
    };
    let subject = shared.cfg.failed_subject.clone();
    publish_result(
        shared,
        d,
        &ids,
        idem_key,
        subject,
        &failed,
        "failed",
        Some(error.code()),
    )
    .await
}

/// Stores part of an outcome (the audit event, the result). Before the last delivery a
/// failure NAKs the job (it comes back with backoff). On the last delivery nothing would
/// bring it back, so the job keeps trying in process, telling JetStream it is still in
/// progress, until the store answers: a job never ends without its result.
async fn persist<T, F, Fut>(shared: &Shared, d: &dyn Delivery, mut attempt: F) -> Result<T, Settle>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, SignerError>>,
{
    let mut delay = shared.cfg.backoff_base;
    loop {
        let e = match attempt().await {
            Ok(v) => return Ok(v),
            Err(e) => e,
        };
        if d.delivered() < shared.cfg.max_deliver {
            return Err(retry_later(shared, d, e));
        }
        tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64,
            "last delivery: could not store the outcome; retrying in process");
        if let Err(e) = d.in_progress().await {
            tracing::warn!(error = %e, "could not extend the delivery");
        }
        tokio::time::sleep(delay).await;
        delay = delay.saturating_mul(2).min(shared.cfg.backoff_max);
    }
}

fn retry_later(shared: &Shared, d: &dyn Delivery, e: SignerError) -> Settle {
    tracing::warn!(error = %e, "could not store the outcome; the job will be redelivered");
    Settle::Nak(backoff(shared, d.delivered(), &e))
}

fn audit_event(
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
        control: None,
        decision,
        error_code: code,
        trace_id: ids.traceparent.as_deref().and_then(trace_id),
        prev_hash: String::new(),
        hash: String::new(),
    }
}

async fn append_audit(shared: &Arc<Shared>, event: AuditEvent) -> Result<u64, SignerError> {
    let audit = shared.read_refs().audit.clone();
    call_actor(audit, "audit_writer", shared.cfg.call_timeout, |r| {
        AuditMsg::Append(Box::new(event), r)
    })
    .await
    .map_err(call_failed)?
    .map_err(|e| SignerError::Internal(format!("audit: {e}")))
}

#[allow(clippy::too_many_arguments)]
async fn publish_result<T: serde::Serialize>(
    shared: &Arc<Shared>,
    d: &dyn Delivery,
    ids: &Ids,
    idem_key: Option<&str>,
    subject: String,
    body: &T,
    outcome: &'static str,
    code: Option<ErrorCode>,
) -> Settle {
    let body = match ids.content_type.encode(body) {
        Ok(b) => b,
        Err(e) => return retry_later(shared, d, e),
    };
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
    let message = OutMessage {
        subject,
        headers,
        body,
    };
    let publish = || {
        let message = message.clone();
        async move {
            let publisher = shared.read_refs().publisher.clone();
            call_actor(publisher, "publisher", shared.cfg.call_timeout, |r| {
                PublisherMsg::Publish(message, r)
            })
            .await
            .map_err(call_failed)
            .and_then(|r| {
                r.map_err(|e| SignerError::Internal(format!("publishing the result: {e}")))
            })
        }
    };
    let t_publish = Instant::now();
    let stored = match persist(shared, d, publish).await {
        Ok(s) => s,
        Err(settle) => return settle,
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
    // (quota refusals are counted where they happen: signer_quota_exceeded_total{tenant,plan,reason})
    tracing::debug!(
        outcome,
        result_seq = stored.stream_sequence,
        duplicate = stored.duplicate,
        "result stored"
    );
    Settle::Ack
}

/// A request that was already answered: publish its original result again (a no-op within
/// the results stream's duplicate window) and acknowledge, without signing anything.
async fn answer_duplicate(shared: &Arc<Shared>, ids: &Ids, result_sequence: u64) -> Settle {
    metrics::counter!("signer_jobs_total", "outcome" => "duplicate", "code" => "").increment(1);
    let publisher = shared.read_refs().publisher.clone();
    let republished = call_actor(publisher, "publisher", shared.cfg.call_timeout, |r| {
        PublisherMsg::Republish(result_sequence, r)
    })
    .await;
    match republished {
        Ok(Ok(Some(_))) => Settle::Ack,
        Ok(Ok(None)) => {
            tracing::warn!(request_id = %ids.request_id, result_sequence, "duplicate request; its original result has left the results stream");
            Settle::Ack
        }
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "republishing the original result failed; retrying");
            Settle::Nak(shared.cfg.backoff_base)
        }
        Err(e) => {
            tracing::warn!(error = %e, "republishing the original result failed; retrying");
            Settle::Nak(shared.cfg.backoff_base)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subject_tenant_and_trace_id_parsing() {
        use SubjectTenant::*;
        let of = |s| SubjectTenant::of("sign.requests", s);
        assert_eq!(of("sign.requests.acme"), Named("acme"));
        assert_eq!(of("sign.requests"), Unnamed);
        // the tenant is the token right after the requests subject, however deep
        assert_eq!(of("sign.requests.acme.x"), Named("acme"));
        assert_eq!(of("sign.requests.acme.x.y.z"), Named("acme"));
        // with the configured prefix
        let prefixed = |s| SubjectTenant::of("t1.sign.requests", s);
        assert_eq!(prefixed("t1.sign.requests.acme"), Named("acme"));
        assert_eq!(prefixed("t1.sign.requests.acme.x"), Named("acme"));
        assert_eq!(prefixed("t1.sign.requests"), Unnamed);
        // anything else cannot be read, and is not taken as unbound
        assert_eq!(prefixed("sign.requests.acme"), Foreign);
        assert_eq!(prefixed("t2.sign.requests.acme"), Foreign);
        assert_eq!(of("sign.requestsacme"), Foreign);
        assert_eq!(of("x.sign.requests.acme"), Foreign);
        assert_eq!(of("sign.requests."), Foreign);
        assert_eq!(Named("acme").named(), Some("acme"));
        assert_eq!(Foreign.named(), None);
        assert_eq!(
            trace_id("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").as_deref(),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        assert_eq!(trace_id("garbage"), None);
    }

    #[test]
    fn queue_age_is_measured_from_the_publish_time() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let limit = Duration::from_secs(60);
        assert_eq!(check_queue_age(t0, t0, limit), Ok(()));
        assert_eq!(
            check_queue_age(t0, t0 + limit, limit),
            Ok(()),
            "at the limit"
        );
        let e = check_queue_age(t0, t0 + limit + Duration::from_millis(1), limit).unwrap_err();
        assert_eq!(e.code(), ErrorCode::RequestExpired);
        assert!(!e.code().retryable());
        // The broker's clock ahead of ours: no wait.
        assert_eq!(check_queue_age(t0 + limit * 10, t0, limit), Ok(()));
    }
}
