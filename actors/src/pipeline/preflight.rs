//! Provenance pre-flight (`signer.verify.referrers`, `docs/contract.md#provenance-pre-flight`):
//! the verdict the provenance gate would give a job for a scanner image, asked before any
//! job is published.
//!
//! A question reads like a job up to the provenance gate and goes through the very same
//! actors: decode and the request rules ([`SignRequest::validate`] on the job the question
//! stands for), the Entitlement actor (OpTok, DPoP when the token is bound, PoE: judged as
//! of the moment the question arrived), then the Provenance actor (its verdict cache,
//! single-flight and per-tenant bound included). Nothing is claimed, charged or signed: no
//! profile, no quota, no key. Every decision is an audit event (`kind: verify_referrers`)
//! in the replica's chain, stored before the answer is given; an answer whose event could
//! not be stored says `internal` (retryable) instead of the verdict.

use std::sync::Arc;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use super::gates::{EntitlementMsg, ProvenanceMsg, provenance_verdict};
use super::job::refusal::decision_of;
use super::job::store::audit_event;
use super::job::{Findings, Ids as JobIds, UNKNOWN_TENANT};
use super::{Shared, call_actor};
use crate::audit::{AuditEvent, AuditKind, Decision, ProvenanceVerdict};
use crate::codec::ContentType;
use crate::error::SignerError;
use crate::messages::{AuditRef, ErrorBody, ResultKind};
use crate::ports::{GateInput, ProvenanceGrant, ReleaseSignature};
use crate::request::{Auth, Kind, Poe, Scanner, SignRequest, is_valid_request_id, is_valid_tenant};

/// Largest question read: an OpTok, a DPoP proof and a licence are a few kilobytes each.
pub const MAX_PREFLIGHT_BYTES: usize = 64 * 1024;

/// A question on `signer.verify.referrers`: the identity members of a job (`auth`, `poe`)
/// and the scanner image, flat.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VerifyReferrersRequest {
    pub api_version: String,
    pub request_id: String,
    pub tenant: String,
    pub auth: Auth,
    pub poe: Poe,
    pub repository: String,
    pub image_digest: String,
}

impl VerifyReferrersRequest {
    /// The rules beyond the types, as for the job it stands for (apiVersion, requestId,
    /// tenant, non-empty tokens and repository, a `sha256:<64 hex>` digest).
    pub fn validate(&self) -> Result<(), SignerError> {
        self.as_job().validate()
    }

    /// The job this question stands for: its identity and scanner, nothing to sign. What
    /// the gates read of a job, and what a DPoP proof is bound to.
    fn as_job(&self) -> SignRequest {
        SignRequest {
            api_version: self.api_version.clone(),
            request_id: self.request_id.clone(),
            tenant: self.tenant.clone(),
            kind: Kind::Dsse,
            auth: self.auth.clone(),
            poe: self.poe.clone(),
            scanner: Scanner {
                repository: self.repository.clone(),
                image_digest: self.image_digest.clone(),
            },
            statement: None,
            payload: None,
            payload_type: None,
            payload_ref: None,
            export: None,
            options: None,
        }
    }
}

/// The answer: the gate's verdict, and with `trusted` the release key and where its
/// signature was found; `error` unless the verdict lets a job through.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VerifyReferrersReply {
    pub api_version: String,
    /// The question's `requestId` (for an unreadable question, as its audit event has it).
    pub request_id: String,
    /// The question's tenant, or `_unknown`.
    pub tenant: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repository: Option<String>,
    /// The scanner image digest asked about (when it is a digest).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_digest: Option<String>,
    /// `trusted`, `allowlisted`, `untrusted`, `unavailable`, `disabled`, or `not_checked`
    /// when the question was refused before the provenance gate.
    pub verdict: ProvenanceVerdict,
    /// With `trusted`: the release key and where its signature is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<ReleaseSignature>,
    /// Why a job would not pass (the contract's codes), absent when it would.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorBody>,
    /// The decision's audit event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audit: Option<AuditRef>,
}

impl VerifyReferrersReply {
    /// Field rules beyond the types (what a client may rely on): ids, a signature exactly
    /// with `trusted`, an error exactly when the verdict does not let a job through.
    pub fn validate(&self) -> Result<(), String> {
        use crate::messages::{check, is_hex};
        check(self.api_version == crate::API_VERSION, "apiVersion")?;
        check(is_valid_request_id(&self.request_id), "requestId pattern")?;
        check(is_valid_tenant(&self.tenant), "tenant pattern")?;
        let trusted = self.verdict == ProvenanceVerdict::Trusted;
        check(
            trusted == self.signature.is_some(),
            "a signature exactly with verdict trusted",
        )?;
        if let Some(s) = &self.signature {
            check(
                is_hex(&s.keyid, 64),
                "signature.keyid must be 64 lowercase hex",
            )?;
        }
        let refused = matches!(
            self.verdict,
            ProvenanceVerdict::Untrusted
                | ProvenanceVerdict::Unavailable
                | ProvenanceVerdict::NotChecked
        );
        check(
            refused == self.error.is_some(),
            "an error exactly when the verdict does not let a job through",
        )?;
        if let Some(a) = &self.audit {
            check(a.seq >= 1, "audit.seq starts at 1")?;
        }
        Ok(())
    }
}

/// An encoded answer, in the question's encoding (JSON when that was unknown).
#[derive(Debug, Clone)]
pub struct PreflightAnswer {
    pub content_type: ContentType,
    pub body: Vec<u8>,
    pub reply: VerifyReferrersReply,
}

impl PreflightAnswer {
    /// The answer to a question that was not decided on (nor audited): `error` says why
    /// (a replica at its bound of questions answers `provenance_unavailable`).
    pub fn unaudited(content_type: Option<&str>, body: &[u8], error: SignerError) -> Self {
        let encoding = ContentType::from_header(content_type).unwrap_or(ContentType::Json);
        let ids = Ids::probed(body, encoding);
        Self::encode(
            encoding,
            VerifyReferrersReply {
                api_version: crate::API_VERSION.into(),
                request_id: ids.request_id,
                tenant: ids.tenant,
                repository: None,
                image_digest: None,
                verdict: ProvenanceVerdict::NotChecked,
                signature: None,
                error: Some(ErrorBody::from(&error.bounded())),
                audit: None,
            },
        )
    }

    fn encode(content_type: ContentType, reply: VerifyReferrersReply) -> Self {
        PreflightAnswer {
            content_type,
            body: content_type.encode(&reply).unwrap_or_default(),
            reply,
        }
    }
}

/// Who a question is about, as far as it could be read.
struct Ids {
    request_id: String,
    tenant: String,
    repository: Option<String>,
    image_digest: Option<String>,
}

impl Ids {
    /// The ids of an unreadable question: its `requestId` and `tenant` when those can be
    /// read and are valid, else `verify-<32 hex of the body's SHA-256>` and `_unknown`.
    fn probed(body: &[u8], content_type: ContentType) -> Ids {
        let probe = crate::codec::probe_ids(body, content_type);
        Ids {
            request_id: probe
                .request_id
                .filter(|id| is_valid_request_id(id))
                .unwrap_or_else(|| format!("verify-{}", &hex::encode(Sha256::digest(body))[..32])),
            tenant: probe
                .tenant
                .filter(|t| is_valid_tenant(t))
                .unwrap_or_else(|| UNKNOWN_TENANT.into()),
            repository: None,
            image_digest: None,
        }
    }
}

/// Answers pre-flight questions with the pipeline's gate actors and audit chain.
#[derive(Clone)]
pub struct Preflight(pub(super) Arc<Shared>);

impl Preflight {
    /// Decides on one question (`content_type`: its `Content-Type` header), audits the
    /// decision and encodes the answer. Never fails: every refusal is an answer.
    pub async fn answer(
        &self,
        content_type: Option<&str>,
        traceparent: Option<&str>,
        body: &[u8],
    ) -> PreflightAnswer {
        let ct = ContentType::from_header(content_type);
        let encoding = *ct.as_ref().unwrap_or(&ContentType::Json);
        let mut ids = Ids::probed(body, encoding);
        let mut findings = Findings::default();
        let outcome = match ct {
            Err(e) => Err(e),
            Ok(ct) => self.decide(ct, body, &mut ids, &mut findings).await,
        };
        let (verdict, signature, error) = match outcome {
            Ok(result) => {
                let verdict = provenance_verdict(&result);
                match result {
                    Ok(ProvenanceGrant::Trusted(s)) => (verdict, Some(s), None),
                    Ok(_) => (verdict, None, None),
                    Err(e) => (verdict, None, Some(e)),
                }
            }
            Err(e) => (ProvenanceVerdict::NotChecked, None, Some(e)),
        };
        let decision = match &error {
            None => Decision::Accepted,
            Some(e) => decision_of(e.code()),
        };
        let event = Self::event(&ids, findings, verdict, decision, &error, traceparent);
        let (error, audit) = match super::AuditSink(self.0.clone()).append(event).await {
            Ok(seq) => (
                error,
                Some(AuditRef {
                    stream: self.0.cfg.audit_stream.clone(),
                    seq,
                }),
            ),
            Err(e) => {
                tracing::error!(error = %e, request_id = %ids.request_id, "pre-flight not answered: its audit event was not stored");
                (
                    Some(SignerError::Internal(format!(
                        "the decision's audit event was not stored ({e}); ask again"
                    ))),
                    None,
                )
            }
        };
        // An answer whose decision was not recorded carries no verdict.
        let (verdict, signature) = if audit.is_some() {
            (verdict, signature)
        } else {
            (ProvenanceVerdict::NotChecked, None)
        };
        let error = error.map(|e| ErrorBody::from(&e.bounded()));
        metrics::counter!("signer_preflight_total",
            "verdict" => verdict.as_str(),
            "code" => error.as_ref().map_or("", |e| e.code.as_str()))
        .increment(1);
        PreflightAnswer::encode(
            encoding,
            VerifyReferrersReply {
                api_version: crate::API_VERSION.into(),
                request_id: ids.request_id,
                tenant: ids.tenant,
                repository: ids.repository.map(|r| crate::echo::clip(&r)),
                image_digest: ids.image_digest,
                verdict,
                signature,
                error,
                audit,
            },
        )
    }

    /// Decode, the request rules, then the Entitlement and the Provenance actors, as a job
    /// meets them: the provenance gate's answer, or (`Err`) the refusal before it.
    async fn decide(
        &self,
        ct: ContentType,
        body: &[u8],
        ids: &mut Ids,
        f: &mut Findings,
    ) -> Result<Result<ProvenanceGrant, SignerError>, SignerError> {
        if body.len() > MAX_PREFLIGHT_BYTES {
            return Err(SignerError::PayloadTooLarge(format!(
                "body is {} bytes, the limit is {MAX_PREFLIGHT_BYTES}",
                body.len()
            )));
        }
        let question: VerifyReferrersRequest = ct.decode(body)?;
        let job = question.as_job();
        if is_valid_request_id(&job.request_id) {
            ids.request_id.clone_from(&job.request_id);
        }
        if is_valid_tenant(&job.tenant) {
            ids.tenant.clone_from(&job.tenant);
        }
        ids.image_digest = crate::digest::parse_oci_sha256(&job.scanner.image_digest)
            .is_ok()
            .then(|| job.scanner.image_digest.clone());
        ids.repository = Some(job.scanner.repository.clone());
        job.validate()?;

        let shared = &self.0;
        let timeout = shared.cfg.call_timeout;
        let job = Arc::new(job);
        let input = GateInput {
            request: job.clone(),
            subject_tenant: None,
            payload_bytes: 0,
            published: SystemTime::now(),
        };
        let entitlement = shared.read_refs().entitlement.clone();
        let verdict = call_actor(entitlement, "entitlement", timeout, |r| {
            EntitlementMsg::Verify(input, r)
        })
        .await
        .map_err(|e| SignerError::Internal(e.to_string()))?;
        f.entitlement(verdict)?;

        let provenance = shared.read_refs().provenance.clone();
        call_actor(provenance, "provenance", timeout, |reply| {
            ProvenanceMsg::Verify {
                tenant: job.tenant.clone(),
                repository: job.scanner.repository.clone(),
                image_digest: job.scanner.image_digest.clone(),
                reply,
            }
        })
        .await
        .map_err(|e| SignerError::Internal(e.to_string()))
    }

    /// The decision's audit event, bounded in size: a job's refused at the provenance gate
    /// (or before), as a pre-flight: no quota, no keys, no subjects.
    fn event(
        ids: &Ids,
        mut f: Findings,
        verdict: ProvenanceVerdict,
        decision: Decision,
        error: &Option<SignerError>,
        traceparent: Option<&str>,
    ) -> AuditEvent {
        f.provenance = Some(verdict);
        f.scanner_digest.clone_from(&ids.image_digest);
        let job = JobIds {
            request_id: ids.request_id.clone(),
            tenant: ids.tenant.clone(),
            kind: ResultKind::Unknown,
            content_type: ContentType::Json,
            traceparent: traceparent.map(str::to_owned),
        };
        let code = error.as_ref().map(SignerError::code);
        AuditEvent {
            kind: AuditKind::VerifyReferrers,
            quota: None,
            ..audit_event(&job, decision, code, f, vec![])
        }
    }
}
