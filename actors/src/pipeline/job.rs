//! One job, from the delivered message to its single result:
//! decode -> entitlement -> profile permission -> idempotency lease -> payload (read from
//! the blob bucket for a `payloadRef`) -> provenance -> quota (one unit per signature) ->
//! sign (every key of the profile) -> result placed (inline, or its envelope and bundles
//! stored as objects) -> audit event stored -> result message recorded in the idempotency
//! record -> result stored -> idempotency record done -> ack.
//! Retryable failures NAK with backoff until the last delivery, which publishes them.
//!
//! A job is signed once: the lease names this job attempt (worker id and a nonce), so a
//! second copy of the request waits even on the same replica; once signed, the lease is
//! kept (not released) on any failure, and the result message is recorded before it is
//! published, so a redelivery republishes it instead of signing and charging again.
//!
//! Storing the outcome (audit event, result) fails in two ways ([`StoreError`]): for good
//! (the broker refuses the message for its size, a stream refuses it), answered at once
//! with a compact `sign.failed` (`payload_too_large` or `internal`) and acked; or for now
//! (unreachable, timed out), NAKed before the last delivery and retried in process within
//! `retry_budget` on it, after which the message is terminated. A signed job whose result
//! message is not yet recorded is never NAKed for such a failure: it retries in process
//! within `retry_budget` on every delivery, because the signature exists nowhere else.
//! A job never holds its slot
//! longer than `job_timeout`, nor past the drain deadline (it is then NAKed).

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
    Claim, Delivery, EntitlementVerdict, GateDenial, GateInput, OutMessage, PortError,
    ProvenanceGrant, QuotaGrant, Recorded,
};
use crate::profiles::ProfileRefusal;
use crate::request::{
    PayloadSource, PreparedPayload, SignRequest, is_valid_request_id, is_valid_tenant,
};

/// Tenant recorded when a message names none we can trust.
pub const UNKNOWN_TENANT: &str = "_unknown";

/// How a delivery is settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Settle {
    Ack,
    Nak(Duration),
    /// Not to be redelivered: the last delivery, whose outcome could not be stored within
    /// the retry budget (nothing would bring it back; the broker's advisory says so).
    Term,
}

/// Why part of a job's outcome (its audit event, its result) was not stored. Only
/// [`StoreError::Unavailable`] is worth retrying; the others are answered at once.
#[derive(Debug, thiserror::Error)]
pub(crate) enum StoreError {
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
    fn of_port(e: PortError) -> Self {
        if e.is_too_large() {
            StoreError::TooLarge(e)
        } else if e.is_permanent() {
            StoreError::Refused(e)
        } else {
            StoreError::Unavailable(Box::new(e))
        }
    }

    fn is_permanent(&self) -> bool {
        !matches!(self, StoreError::Unavailable(_))
    }

    /// The error a job is answered with when its outcome cannot be stored for good.
    fn answer(&self, what: &str) -> SignerError {
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
enum OnTransient {
    /// NAK it before the last delivery: nothing was signed, or the signed result is
    /// recorded in the idempotency record and a redelivery republishes it.
    Redeliver,
    /// Keep trying in process for `retry_budget`, whatever the delivery count: the job is
    /// signed and its result is not recorded, so it lives only here; a redelivery would
    /// find no record and, once the lease expires, sign (and charge) again.
    RetryHere,
}

/// Why a piece of the outcome was not stored, as [`persist`] reports it.
enum NotStored {
    /// Settle the delivery this way (NAK before the last delivery; TERM after the budget).
    Settle(Settle),
    /// For good: answer the job now.
    Permanent(StoreError),
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
    let work = tracing::Instrument::instrument(process(shared, delivery.as_ref()), span);
    let mut cancel = shared.cancel_jobs.subscribe();
    // The slot is held for `job_timeout` at most, and not past the drain deadline.
    let (settle, settle_within) = tokio::select! {
        done = tokio::time::timeout(shared.cfg.job_timeout, work) => match done {
            Ok(settle) => (settle, shared.cfg.call_timeout),
            Err(_) => (timed_out(shared, delivery.as_ref()), shared.cfg.call_timeout),
        },
        _ = cancel.wait_for(|cancelled| *cancelled) => {
            tracing::warn!(seq = delivery.stream_sequence(), "shutdown: job cut off at the drain deadline; NAKed for another replica");
            (Settle::Nak(Duration::ZERO), CANCELLED_SETTLE_TIMEOUT)
        }
    };
    let t_settle = Instant::now();
    let settled = tokio::time::timeout(settle_within, async {
        match settle {
            Settle::Ack => delivery.ack().await,
            Settle::Nak(delay) => delivery.nak(delay).await,
            Settle::Term => delivery.term().await,
        }
    })
    .await
    .unwrap_or_else(|_| Err(PortError::transient("settling did not finish in time")));
    stage("settle", t_settle);
    if let Err(e) = settled {
        tracing::warn!(error = %e, seq = delivery.stream_sequence(), "settling the message failed; it will be redelivered");
    }
    metrics::histogram!("signer_job_duration_seconds").record(started.elapsed().as_secs_f64());
}

/// How long a job cut off by the shutdown may take to NAK its message.
const CANCELLED_SETTLE_TIMEOUT: Duration = Duration::from_secs(1);

/// A job that ran past `job_timeout`: its work is dropped and the message NAKed for a
/// retry, or terminated on the last delivery (nothing would redeliver it).
fn timed_out(shared: &Shared, d: &dyn Delivery) -> Settle {
    metrics::counter!("signer_job_timeouts_total").increment(1);
    if d.delivered() < shared.cfg.max_deliver {
        tracing::warn!(
            seq = d.stream_sequence(),
            timeout_s = shared.cfg.job_timeout.as_secs(),
            "job ran past worker.job_timeout; NAKed for a retry"
        );
        Settle::Nak(exponential_backoff(shared, d.delivered()))
    } else {
        tracing::error!(
            seq = d.stream_sequence(),
            timeout_s = shared.cfg.job_timeout.as_secs(),
            "job ran past worker.job_timeout on its last delivery; terminated without a result"
        );
        metrics::counter!("signer_jobs_abandoned_total", "reason" => "job_timeout").increment(1);
        Settle::Term
    }
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
    exponential_backoff(shared, delivered)
}

/// `backoff_base` doubled per delivery so far, at most `backoff_max`.
fn exponential_backoff(shared: &Shared, delivered: u64) -> Duration {
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

    // Recorded only when it is a digest: the audit event carries nothing unchecked.
    let mut findings = Findings {
        scanner_digest: crate::digest::parse_oci_sha256(&request.scanner.image_digest)
            .is_ok()
            .then(|| request.scanner.image_digest.clone()),
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
            "subject names tenant {}, body names {}",
            crate::echo::echo(t),
            crate::echo::echo(&request.tenant)
        )),
        SubjectTenant::Foreign => Some(format!(
            "subject {} is not under {:?}: its tenant cannot be checked",
            crate::echo::echo(d.subject()),
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
    let owner = attempt_owner(&shared.cfg.worker_id);
    let t_claim = Instant::now();
    let claimed = match claim(shared, d, &idem_key, &owner).await {
        Ok(Claim::Acquired) => Ok(()),
        Ok(Claim::Done { result_sequence }) => {
            return answer_duplicate(shared, &ids, result_sequence).await;
        }
        Ok(Claim::Signed { outcome }) => {
            return republish_outcome(shared, d, &idem_key, outcome).await;
        }
        Ok(Claim::Busy { retry_after }) => return Settle::Nak(busy_delay(shared, d, retry_after)),
        Err(e) => Err(SignerError::Internal(format!(
            "idempotency store unavailable: {e}"
        ))),
    };
    stage("claim", t_claim);
    // Held until this attempt settles: if the job is cut off (`job_timeout`, the drain
    // deadline) before it signed, the lease is given back so the redelivery need not wait
    // for it to expire.
    let mut lease = LeaseGuard {
        shared: shared.clone(),
        key: idem_key.clone(),
        owner: owner.clone(),
        armed: claimed.is_ok(),
    };

    // A referenced payload is read once the requestId is ours (two copies of a job do not
    // both read it) and before provenance and quota (its size and digest are checked
    // before anything is charged).
    let prepared = match claimed {
        Ok(()) => {
            let work = payload(shared, source, &verdict.plan, &mut findings);
            hold_lease(shared, d, (&idem_key, &owner), work).await
        }
        Err(e) => Err(e),
    };
    // The payload moves into the envelope (a 40 MB payload is not copied for it); its
    // subjects are kept for the result.
    let (outcome, subjects) = match prepared {
        Ok(prepared) => {
            let subjects = prepared.subjects.clone();
            let work = admit_and_sign(
                shared,
                &request,
                &verdict,
                prepared,
                &key_names,
                &mut findings,
            );
            (
                hold_lease(shared, d, (&idem_key, &owner), work).await,
                subjects,
            )
        }
        Err(e) => (Err(e), Vec::new()),
    };
    stage("gates_and_sign", t_gates);
    // Once signed, the lease is never given back: a redelivery must find this attempt's
    // recorded outcome (or wait for the lease to expire), not sign again.
    let signed_once = outcome.is_ok();
    lease.armed &= !signed_once;
    let settle = match outcome {
        Ok(signed) => {
            let work = finish_signed(
                shared,
                d,
                &ids,
                (&idem_key, &owner),
                &subjects,
                signed,
                verdict,
                findings,
            );
            hold_lease(shared, d, (&idem_key, &owner), work).await
        }
        Err(e) => retry_or_fail(shared, d, ids, Some(&idem_key), e, findings).await,
    };
    if let Settle::Nak(_) = settle
        && !signed_once
        && let Err(e) = shared.ports.idempotency.release(&idem_key, &owner).await
    {
        tracing::warn!(error = %e, "releasing the idempotency lease failed; it expires by itself");
    }
    lease.armed = false;
    settle
}

/// Claims the request for this attempt. On the last delivery a lease held by another
/// attempt is waited for here (telling JetStream the job is in progress), not NAKed:
/// nothing would deliver the message again. `job_timeout` bounds the wait.
async fn claim(
    shared: &Shared,
    d: &dyn Delivery,
    key: &str,
    owner: &str,
) -> Result<Claim, PortError> {
    loop {
        let claim = shared
            .ports
            .idempotency
            .claim(key, owner, shared.cfg.lease)
            .await;
        match claim {
            Ok(Claim::Busy { retry_after }) if d.delivered() >= shared.cfg.max_deliver => {
                tracing::info!(
                    wait_ms = retry_after.as_millis() as u64,
                    "last delivery: another attempt holds the request; waiting for its lease"
                );
                let extended = tokio::time::timeout(shared.cfg.call_timeout, d.in_progress()).await;
                if !matches!(extended, Ok(Ok(()))) {
                    tracing::warn!("could not extend the delivery");
                }
                let wait = retry_after
                    .min(shared.cfg.lease / 3)
                    .max(Duration::from_millis(10));
                tokio::time::sleep(wait).await;
            }
            other => return other,
        }
    }
}

/// Gives an attempt's lease back when its job is dropped before it settled (cut off at
/// `job_timeout` or at the drain deadline) and had not signed. A job that signed keeps its
/// lease: its redelivery must find the recorded outcome, not sign again.
struct LeaseGuard {
    shared: Arc<Shared>,
    key: String,
    owner: String,
    armed: bool,
}

impl Drop for LeaseGuard {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (shared, key, owner) = (
            self.shared.clone(),
            std::mem::take(&mut self.key),
            std::mem::take(&mut self.owner),
        );
        runtime.spawn(async move {
            if let Err(e) = shared.ports.idempotency.release(&key, &owner).await {
                tracing::warn!(error = %e, "releasing the lease of a cut-off job failed; it expires by itself");
            }
        });
    }
}

/// The lease owner of one job attempt: the worker id and a random nonce. Two copies of a
/// request on one replica are two attempts, so the second cannot re-take the first's lease.
fn attempt_owner(worker_id: &str) -> String {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let mut nonce = [0u8; 8];
    if ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut nonce).is_err() {
        // No system randomness: a process-wide counter and the clock still tell attempts apart.
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let t = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or_default();
        nonce = (t ^ n.rotate_left(48)).to_be_bytes();
    }
    let hex: String = nonce.iter().map(|b| format!("{b:02x}")).collect();
    format!("{worker_id}.{hex}")
}

/// Runs `work` while keeping this attempt's lease and its delivery alive: every third of the
/// lease (or of the consumer's AckWait, if shorter) the lease is renewed (a claim by the same
/// owner) and JetStream told the job is in progress. A job slowed down by a failover (an audit or result stream electing a leader)
/// therefore keeps its request: neither a redelivery nor another replica can take the
/// request over and sign it again while this attempt still works on it. Renewal stops once
/// the record is no longer this attempt's lease (the outcome is recorded, or the lease was
/// lost).
async fn hold_lease<T>(
    shared: &Shared,
    d: &dyn Delivery,
    (key, owner): (&str, &str),
    work: impl std::future::Future<Output = T>,
) -> T {
    let period = (shared.cfg.lease.min(shared.cfg.ack_wait) / 3).max(Duration::from_millis(100));
    let keep_alive = async {
        let mut renewing = true;
        loop {
            tokio::time::sleep(period).await;
            if let Err(e) = d.in_progress().await {
                tracing::warn!(error = %e, "could not extend the delivery");
            }
            if !renewing {
                continue;
            }
            match shared
                .ports
                .idempotency
                .claim(key, owner, shared.cfg.lease)
                .await
            {
                Ok(Claim::Acquired) => {}
                Ok(_) => renewing = false,
                Err(e) => tracing::warn!(error = %e, "renewing the idempotency lease failed"),
            }
        }
    };
    tokio::select! {
        out = work => out,
        never = keep_alive => never,
    }
}

/// How long a copy of a request waits while another attempt holds its lease: the backoff of
/// its delivery, and no longer than the lease has left (a twin usually finishes in
/// milliseconds; a lease of a dead replica is taken over when it expires).
fn busy_delay(shared: &Shared, d: &dyn Delivery, retry_after: Duration) -> Duration {
    let exp = d.delivered().saturating_sub(1).min(16) as u32;
    shared
        .cfg
        .backoff_base
        .saturating_mul(1 << exp)
        .min(shared.cfg.backoff_max)
        .min(retry_after)
        .max(Duration::from_millis(1))
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
        tracing::info!(code = %e.code(), error = %crate::echo::bound_message(e.message()), "retryable failure; NAK with backoff");
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
    SignerError::InvalidRequest(format!(
        "unknown signing profile {}",
        crate::echo::echo(request.profile())
    ))
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
            tenant: request.tenant.clone(),
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
    (idem_key, owner): (&str, &str),
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
    // Until the result message is recorded, the signature exists only in this process:
    // transient failures are retried here, not handed to a redelivery.
    if let Err(settle) = place_result(shared, d, ids, idem_key, &mut completed, &findings).await {
        return settle;
    }
    let event = audit_event(ids, Decision::Signed, None, findings.clone_parts(), keys);
    let t_audit = Instant::now();
    let append = || append_audit(shared, event.clone());
    completed.audit.seq = match persist(shared, d, OnTransient::RetryHere, append).await {
        Ok(seq) => seq,
        Err(NotStored::Settle(settle)) => return settle,
        Err(NotStored::Permanent(e)) => {
            let answer = e.answer("the audit event of the signature");
            return finish_failed(shared, d, ids.clone(), Some(idem_key), answer, findings).await;
        }
    };
    stage("audit", t_audit);
    let subject = shared.cfg.completed_subject.clone();
    let published = match result_message(ids, subject, &completed) {
        Ok(message) => {
            let on_transient = match record_outcome(shared, idem_key, owner, &message).await {
                true => OnTransient::Redeliver,
                false => OnTransient::RetryHere,
            };
            let key = Some(idem_key);
            publish_message(shared, d, key, message, "completed", None, on_transient).await
        }
        Err(e) => Err(e),
    };
    match published {
        Ok(settle) => settle,
        // Signed, but the result can never be stored: the job is answered with a compact
        // refusal (and its own audit event), so that it still ends in exactly one result.
        Err(e) => {
            let answer = e.answer("the signed result");
            finish_failed(shared, d, ids.clone(), Some(idem_key), answer, findings).await
        }
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

/// A request that was signed before but whose result may not be stored (the publish failed,
/// or the replica died in between): publish the recorded result message. Nothing is signed
/// or charged; the result carries the audit reference of the original `signed` event.
async fn republish_outcome(
    shared: &Arc<Shared>,
    d: &dyn Delivery,
    idem_key: &str,
    outcome: OutMessage,
) -> Settle {
    metrics::counter!("signer_outcome_republished_total").increment(1);
    tracing::info!("signed before; publishing the recorded result");
    let published = publish_message(
        shared,
        d,
        Some(idem_key),
        outcome,
        "completed",
        None,
        OnTransient::Redeliver,
    );
    match published.await {
        Ok(settle) => settle,
        Err(e) => {
            // It was stored once (it is the recorded result of this request), so the store
            // now refusing it for good is a change on the broker's side: anything we could
            // answer with instead would be a second result. End the message.
            tracing::error!(error = %e, "the recorded result cannot be stored any more; the message is terminated");
            metrics::counter!("signer_jobs_abandoned_total", "reason" => "refused_by_store")
                .increment(1);
            Settle::Term
        }
    }
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
        // the result does not encode: that repeats on every try
        Err(e) => {
            let e = StoreError::Refused(PortError::permanent(e).context("encoding the result"));
            let answer = e.answer("the signed result");
            return Err(finish_failed(
                shared,
                d,
                ids.clone(),
                Some(idem_key),
                answer,
                findings.clone_parts(),
            )
            .await);
        }
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
    // (an object store failure is taken as passing: a full or refusing bucket is retried
    // within the budget like an unreachable one)
    let stored = persist(shared, d, OnTransient::RetryHere, || async {
        store(blobs.as_ref(), &ids.tenant, &ids.request_id, inline)
            .await
            .map_err(|e| StoreError::Unavailable(Box::new(e)))
    })
    .await;
    let stored = match stored {
        Ok(stored) => stored,
        Err(NotStored::Settle(settle)) => return Err(settle),
        Err(NotStored::Permanent(e)) => {
            let answer = e.answer("the result objects");
            return Err(finish_failed(
                shared,
                d,
                ids.clone(),
                Some(idem_key),
                answer,
                findings.clone_parts(),
            )
            .await);
        }
    };
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

/// Answers the job with `error` on `sign.failed`, with its audit event. When that cannot be
/// stored for good (a stream refuses it), a compact refusal (`internal`, or
/// `payload_too_large` for a message over the broker's limit) without the gates' findings
/// is stored instead; when even that is refused, the message is terminated.
async fn finish_failed(
    shared: &Arc<Shared>,
    d: &dyn Delivery,
    ids: Ids,
    idem_key: Option<&str>,
    error: SignerError,
    findings: Findings,
) -> Settle {
    let error = error.bounded();
    let e = match store_failed(shared, d, &ids, idem_key, &error, findings).await {
        Ok(settle) => return settle,
        Err(e) => e,
    };
    tracing::warn!(error = %e, code = %error.code(), "the refusal could not be stored; answering with a compact one");
    let compact = e.answer("the refusal").bounded();
    match store_failed(shared, d, &ids, idem_key, &compact, Findings::default()).await {
        Ok(settle) => settle,
        Err(e) => {
            tracing::error!(error = %e, request_id = %ids.request_id, "not even a compact refusal could be stored; the message is terminated without a result");
            metrics::counter!("signer_jobs_abandoned_total", "reason" => "refused_by_store")
                .increment(1);
            Settle::Term
        }
    }
}

/// Stores the audit event and the `sign.failed` result of `error`. `Err` only when one of
/// them was refused for good.
async fn store_failed(
    shared: &Arc<Shared>,
    d: &dyn Delivery,
    ids: &Ids,
    idem_key: Option<&str>,
    error: &SignerError,
    findings: Findings,
) -> Result<Settle, StoreError> {
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
    let append = || append_audit(shared, event.clone());
    let audit_seq = match persist(shared, d, OnTransient::Redeliver, append).await {
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
    let message = result_message(ids, subject, &failed)?;
    let code = Some(error.code());
    publish_message(
        shared,
        d,
        idem_key,
        message,
        "failed",
        code,
        OnTransient::Redeliver,
    )
    .await
}

/// Stores part of an outcome (the audit event, the result). A failure for good is returned
/// at once ([`NotStored::Permanent`]): retrying would fail the same way. A failure for now
/// NAKs the job before the last delivery (it comes back with backoff) when `on_transient`
/// allows it. Otherwise (the last delivery: nothing would bring it back; or a signed,
/// unrecorded result that a redelivery would sign again) the job keeps trying in process,
/// telling JetStream it is still in progress, for `retry_budget`. Then the message is
/// NAKed if deliveries remain, else terminated (logged, counted in
/// `signer_jobs_abandoned_total`): the outcome could not be stored by anyone meanwhile.
async fn persist<T, F, Fut>(
    shared: &Shared,
    d: &dyn Delivery,
    on_transient: OnTransient,
    mut attempt: F,
) -> Result<T, NotStored>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, StoreError>>,
{
    let mut delay = shared.cfg.backoff_base;
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
        let last = d.delivered() >= shared.cfg.max_deliver;
        if !last && on_transient == OnTransient::Redeliver {
            return Err(NotStored::Settle(retry_later(shared, d, &e)));
        }
        let ends = *budget_ends.get_or_insert_with(|| Instant::now() + shared.cfg.retry_budget);
        if Instant::now() + delay > ends {
            if !last {
                tracing::error!(error = %e, budget_s = shared.cfg.retry_budget.as_secs(),
                    "the signed outcome could not be stored within the retry budget; NAKed, the redelivery signs again");
                metrics::counter!("signer_signed_outcomes_dropped_total").increment(1);
                return Err(NotStored::Settle(retry_later(shared, d, &e)));
            }
            tracing::error!(error = %e, budget_s = shared.cfg.retry_budget.as_secs(),
                "last delivery: the outcome could not be stored within the retry budget; the message is terminated without a result");
            metrics::counter!("signer_jobs_abandoned_total", "reason" => "retry_budget")
                .increment(1);
            return Err(NotStored::Settle(Settle::Term));
        }
        tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, last_delivery = last,
            "could not store the outcome; retrying in process");
        let extended = tokio::time::timeout(shared.cfg.call_timeout, d.in_progress()).await;
        if !matches!(extended, Ok(Ok(()))) {
            tracing::warn!("could not extend the delivery");
        }
        tokio::time::sleep(delay).await;
        delay = delay.saturating_mul(2).min(shared.cfg.backoff_max);
    }
}

fn retry_later(shared: &Shared, d: &dyn Delivery, e: &StoreError) -> Settle {
    tracing::warn!(error = %e, "could not store the outcome; the job will be redelivered");
    Settle::Nak(exponential_backoff(shared, d.delivered()))
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
        control: None,
        decision,
        error_code: code,
        trace_id: ids.traceparent.as_deref().and_then(trace_id),
        prev_hash: String::new(),
        hash: String::new(),
    }
    .bounded()
}

async fn append_audit(shared: &Arc<Shared>, event: AuditEvent) -> Result<u64, StoreError> {
    let audit = shared.read_refs().audit.clone();
    call_actor(audit, "audit_writer", shared.cfg.call_timeout, |r| {
        AuditMsg::Append(Box::new(event), r)
    })
    .await
    .map_err(|e| StoreError::Unavailable(Box::new(e)))?
    .map_err(StoreError::of_port)
}

/// The result message of a job: its body in the request's encoding, and the headers the
/// contract names (`Nats-Msg-Id` is tenant/requestId, so the results stream drops a copy).
fn result_message<T: serde::Serialize>(
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

/// Stores a result message, then marks the request done in its idempotency record.
async fn publish_message(
    shared: &Arc<Shared>,
    d: &dyn Delivery,
    idem_key: Option<&str>,
    message: OutMessage,
    outcome: &'static str,
    code: Option<ErrorCode>,
    on_transient: OnTransient,
) -> Result<Settle, StoreError> {
    let publish = || {
        let message = message.clone();
        async move {
            let publisher = shared.read_refs().publisher.clone();
            call_actor(publisher, "publisher", shared.cfg.call_timeout, |r| {
                PublisherMsg::Publish(message, r)
            })
            .await
            .map_err(|e| StoreError::Unavailable(Box::new(e)))?
            .map_err(StoreError::of_port)
        }
    };
    let t_publish = Instant::now();
    let stored = match persist(shared, d, on_transient, publish).await {
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
    super::latency::result_stored(d.published(), outcome);
    // (quota refusals are counted where they happen: signer_quota_exceeded_total{tenant,plan,reason})
    tracing::debug!(
        outcome,
        result_seq = stored.stream_sequence,
        duplicate = stored.duplicate,
        "result stored"
    );
    Ok(Settle::Ack)
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
