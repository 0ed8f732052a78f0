//! One job, from the delivered message to its single result, as the contract reads:
//!
//! ```text
//! decode       decode.rs   Content-Type, size, body, apiVersion, ids, queue age (before
//!                          anything is charged or recorded), schema, subject tenant, profile,
//!                          what the profile signs (predicate type, report policy)
//! authenticate admit.rs    entitlement gate (OpTok, DPoP, PoE), then the profile's permit for
//!                          the tenant and plan, then the keys          (nothing claimed yet)
//! claim        claim.rs    idempotency lease of this attempt: done before -> republish the
//!                          original result; signed before -> publish the recorded outcome;
//!                          another attempt's lease -> NAK
//! payload      admit.rs    the bytes to sign (a `payloadRef` is read now, after the claim,
//!                          and then checked against what the profile signs)
//! admit + sign admit.rs    provenance, quota (one unit per signature), one signature per key
//! store        signed.rs   result placed (inline or by reference) -> audit event -> result
//!                          message recorded in the idempotency record -> result published ->
//!                          record done
//! settle       mod.rs      ack, NAK with a delay, or TERM, within the call timeout
//! ```
//!
//! Each step returns `Result<Next, Stop>`: [`Stop`] says how the job ends early (refused,
//! answered at once, a duplicate republished, a recorded outcome republished, or settled
//! without a result), and [`Job::stop`] carries that out. A refusal is NAKed with backoff
//! while it is retryable and deliveries remain; the last delivery publishes it
//! ([`refusal::Refusal`]).
//!
//! A job is signed once: the lease names this job attempt (worker id and a nonce), so a
//! second copy of the request waits even on the same replica; the lease is renewed while
//! the job works ([`claim::Hold`]); once signed, the lease is kept (not released) on any
//! failure, and the result message is recorded before it is published, so a redelivery
//! republishes it instead of signing and charging again.
//!
//! Storing the outcome (audit event, result) fails in two ways ([`store::StoreError`]): for
//! good (the broker refuses the message for its size, a stream refuses it), answered at once
//! with a compact `sign.failed` (`payload_too_large` or `internal`) and acked; or for now
//! (unreachable, timed out), NAKed before the last delivery and retried in process within
//! `retry_budget` on it, after which the message is terminated. A signed job whose result
//! message is not yet recorded is not NAKed at once for such a failure: it retries in
//! process within `retry_budget` on every delivery ([`store::OnTransient::RetryHere`]),
//! because the signature exists nowhere else, and only then is NAKed (terminated on the
//! last delivery). A job never holds its slot longer than `job_timeout`, nor
//! past the drain deadline (it is then NAKed, and a lease it holds before signing is given
//! back by [`claim::LeaseGuard`]).

// The steps are visible to the pipeline's tests, which drive them one by one.
pub(in crate::pipeline) mod admit;
pub(in crate::pipeline) mod claim;
pub(in crate::pipeline) mod decode;
pub(in crate::pipeline) mod refusal;
pub(in crate::pipeline) mod signed;
pub(in crate::pipeline) mod store;

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{PipelineConfig, Shared};
use crate::audit::{AuthState, Caller, PoeState, ProvenanceVerdict, QuotaOutcome};
use crate::codec::ContentType;
use crate::error::SignerError;
use crate::messages::ResultKind;
use crate::ports::{Delivery, EntitlementVerdict, GateDenial, OutMessage, PortError};

use admit::Signed;
use claim::{Hold, LeaseGuard};

/// Tenant recorded when a message names none we can trust.
pub const UNKNOWN_TENANT: &str = "_unknown";

/// How a delivery is settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(in crate::pipeline) enum Settle {
    Ack,
    Nak(Duration),
    /// Not to be redelivered: the last delivery, whose outcome could not be stored within
    /// the retry budget (nothing would bring it back; the broker's advisory says so).
    Term,
}

/// How a step ends a job early.
#[derive(Debug)]
pub(in crate::pipeline) enum Stop {
    /// A check or a gate refused the job: NAKed with backoff while the error is retryable
    /// and deliveries remain, else answered on `sign.failed` ([`refusal::Refusal`]).
    Refused(SignerError),
    /// Answered on `sign.failed` at once, never retried: the signed outcome can never be
    /// stored as it is (a compact `payload_too_large` or `internal`).
    Answer(SignerError),
    /// Answered before (the record is done): its original result is republished, nothing
    /// is signed or charged.
    Duplicate { result_sequence: u64 },
    /// Signed before, its result maybe not stored: the result message recorded in the
    /// idempotency record is published, nothing is signed or charged.
    SignedBefore(OutMessage),
    /// Settled without a result: NAKed while another attempt holds the lease, NAKed or
    /// terminated when the outcome could not be stored for now.
    Settle(Settle),
}

/// Who a result is about.
#[derive(Debug, Clone)]
pub(in crate::pipeline) struct Ids {
    pub request_id: String,
    pub tenant: String,
    pub kind: ResultKind,
    pub content_type: ContentType,
    pub traceparent: Option<String>,
}

/// What the gates found, for the audit event and the result.
#[derive(Debug, Default)]
pub(in crate::pipeline) struct Findings {
    pub caller: Option<Caller>,
    pub auth: Option<AuthState>,
    pub poe: Option<PoeState>,
    pub plan: Option<String>,
    pub quota: Option<QuotaOutcome>,
    pub quota_retry_after_ms: Option<u64>,
    pub provenance: Option<ProvenanceVerdict>,
    pub scanner_digest: Option<String>,
    pub subjects: Vec<crate::digest::DigestSet>,
    /// The payload's predicateType, once the payload is known to be a Statement.
    pub predicate_type: Option<String>,
    /// The policy the request says its report was evaluated under.
    pub policy: Option<crate::policy::PolicyRecord>,
}

impl Findings {
    /// Records what the entitlement gate found (who asked, auth, PoE, plan): its verdict,
    /// or the refusal (a job's, or a pre-flight question's).
    pub(in crate::pipeline) fn entitlement(
        &mut self,
        answer: Result<EntitlementVerdict, GateDenial>,
    ) -> Result<EntitlementVerdict, SignerError> {
        match answer {
            Ok(v) => {
                self.caller.clone_from(&v.caller);
                self.auth = Some(v.auth);
                self.poe = Some(v.poe);
                self.plan = Some(v.plan.clone());
                Ok(v)
            }
            Err(GateDenial {
                error,
                caller,
                auth,
                poe,
                plan,
            }) => {
                (self.caller, self.auth, self.poe, self.plan) = (caller, auth, poe, plan);
                Err(error)
            }
        }
    }

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
            predicate_type: self.predicate_type.clone(),
            policy: self.policy.clone(),
        }
    }
}

/// One job attempt: its delivery, the pipeline, who it is about, what the gates found,
/// and its idempotency lease once claimed.
pub(in crate::pipeline) struct Job<'a> {
    pub shared: &'a Arc<Shared>,
    pub delivery: &'a dyn Delivery,
    /// Until the body is decoded: the fallback ids of an undecodable message.
    pub ids: Ids,
    pub findings: Findings,
    /// Set by the claim (also when the idempotency store failed: a NAK then releases
    /// whatever it may have taken); given back if the job is dropped before it signed.
    pub lease: Option<LeaseGuard>,
    /// Set once the job signed: from then on the lease is never released.
    pub signed: bool,
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
            Err(_) => (timed_out(&shared.cfg, delivery.as_ref()), shared.cfg.call_timeout),
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

/// The job: signed, then its outcome stored, or stopped on the way; then how to settle it.
pub(in crate::pipeline) async fn process(shared: &Arc<Shared>, d: &dyn Delivery) -> Settle {
    let mut job = Job::new(shared, d);
    let settle = match sign(&mut job).await {
        Ok(signed) => {
            // From here the signature exists only in this process: the lease is kept, and
            // renewed while the outcome is stored.
            let hold = job.signed();
            hold.run(async {
                match signed::store(&mut job, signed).await {
                    Ok(settle) => settle,
                    Err(stop) => job.stop(stop).await,
                }
            })
            .await
        }
        Err(stop) => job.stop(stop).await,
    };
    job.let_go(settle).await
}

/// Decode, authenticate, claim, read the payload, admit and sign: the steps up to the
/// signatures, each refusing with the [`Stop`] that ends the job.
pub(in crate::pipeline) async fn sign(job: &mut Job<'_>) -> Result<Signed, Stop> {
    let decoded = decode::decode(job)?;
    let t_gates = Instant::now();
    let admitted = admit::authenticate(job, &decoded).await?;
    let hold = claim::claim(job).await?;
    let signed = hold
        .run(async {
            let payload = admit::payload(
                job,
                &decoded.request,
                decoded.source,
                &admitted.verdict.plan,
            )
            .await?;
            admit::admit_and_sign(job, &decoded.request, admitted, payload).await
        })
        .await;
    stage("gates_and_sign", t_gates);
    signed
}

impl<'a> Job<'a> {
    /// A job of `d`, addressed by its headers until its body is decoded.
    pub fn new(shared: &'a Arc<Shared>, d: &'a dyn Delivery) -> Self {
        let ids = decode::fallback_ids(
            &shared.cfg,
            d,
            ContentType::Json,
            crate::codec::IdProbe::default(),
        );
        Job {
            shared,
            delivery: d,
            ids,
            findings: Findings::default(),
            lease: None,
            signed: false,
        }
    }

    fn cfg(&self) -> &'a PipelineConfig {
        &self.shared.cfg
    }

    /// The idempotency key, once claimed (a refusal then completes the record).
    fn idem_key(&self) -> Option<String> {
        self.lease.as_ref().map(|l| l.key.clone())
    }

    /// What renews this attempt's lease and its delivery while work runs. The job may be
    /// borrowed by that work: the hold keeps its own copy of the lease.
    fn hold(&self) -> Hold<'a> {
        Hold {
            shared: self.shared,
            delivery: self.delivery,
            lease: self
                .lease
                .as_ref()
                .map(|l| (l.key.clone(), l.owner.clone())),
        }
    }

    /// The job signed: its lease is never given back from now on.
    fn signed(&mut self) -> Hold<'a> {
        self.signed = true;
        if let Some(lease) = &mut self.lease {
            lease.armed = false;
        }
        self.hold()
    }

    /// Ends the job as `stop` says, and says how to settle its message.
    pub async fn stop(&mut self, stop: Stop) -> Settle {
        match stop {
            Stop::Refused(e) => refusal::retry_or_answer(self, e).await,
            Stop::Answer(e) => refusal::answer(self, e).await,
            Stop::Duplicate { result_sequence } => {
                claim::answer_duplicate(self, result_sequence).await
            }
            Stop::SignedBefore(outcome) => claim::republish_outcome(self, outcome).await,
            Stop::Settle(settle) => settle,
        }
    }

    /// Lets go of the lease: given back on a NAK while nothing was signed (the redelivery
    /// need not wait for it to expire), kept otherwise.
    async fn let_go(mut self, settle: Settle) -> Settle {
        let Some(mut lease) = self.lease.take() else {
            return settle;
        };
        lease.armed = false;
        if let Settle::Nak(_) = settle
            && !self.signed
            && let Err(e) = self
                .shared
                .ports
                .idempotency
                .release(&lease.key, &lease.owner)
                .await
        {
            tracing::warn!(error = %e, "releasing the idempotency lease failed; it expires by itself");
        }
        settle
    }
}

/// How long a job cut off by the shutdown may take to NAK its message.
const CANCELLED_SETTLE_TIMEOUT: Duration = Duration::from_secs(1);

/// A job that ran past `job_timeout`: its work is dropped and the message NAKed for a
/// retry, or terminated on the last delivery (nothing would redeliver it).
fn timed_out(cfg: &PipelineConfig, d: &dyn Delivery) -> Settle {
    metrics::counter!("signer_job_timeouts_total").increment(1);
    if d.delivered() < cfg.max_deliver {
        tracing::warn!(
            seq = d.stream_sequence(),
            timeout_s = cfg.job_timeout.as_secs(),
            "job ran past worker.job_timeout; NAKed for a retry"
        );
        Settle::Nak(refusal::exponential_backoff(cfg, d.delivered()))
    } else {
        tracing::error!(
            seq = d.stream_sequence(),
            timeout_s = cfg.job_timeout.as_secs(),
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

fn call_failed(e: super::CallError) -> SignerError {
    SignerError::Internal(e.to_string())
}
