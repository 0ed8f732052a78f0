//! Step 1, decode: what the message is and who it is about, before anything is charged,
//! claimed or recorded. Every refusal here is final (none of its codes is retryable).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::{Findings, Ids, Job, Stop};
use crate::codec::{ContentType, IdProbe};
use crate::error::SignerError;
use crate::messages::ResultKind;
use crate::pipeline::PipelineConfig;
use crate::policy::Signable;
use crate::ports::Delivery;
use crate::request::{
    PayloadSource, PreparedPayload, SignRequest, is_valid_request_id, is_valid_tenant,
};

/// A decoded request that passed every check that needs no gate.
#[derive(Debug)]
pub(in crate::pipeline) struct Decoded {
    pub request: Arc<SignRequest>,
    /// Its bytes to sign, or the object that holds them.
    pub source: PayloadSource,
    /// The tenant the subject names (equal to the body's), if it names one.
    pub subject_tenant: Option<String>,
}

/// Decodes the delivery and checks it: Content-Type, body size, body (apiVersion, schema),
/// queue age, request rules, subject tenant, profile, what the profile signs (an inline
/// payload's predicate type and report policy). Sets the job's ids (the body's, or
/// the fallbacks of an undecodable message) and the findings the body gives (scanner
/// digest, subjects of an inline payload).
pub(in crate::pipeline) fn decode(job: &mut Job<'_>) -> Result<Decoded, Stop> {
    let (cfg, d) = (job.cfg(), job.delivery);
    let content_type = ContentType::from_header(d.header("Content-Type")).map_err(Stop::Refused)?;
    job.ids = fallback_ids(cfg, d, content_type, IdProbe::default());
    if d.body().len() > cfg.max_body_bytes {
        return Err(Stop::Refused(SignerError::PayloadTooLarge(format!(
            "body is {} bytes, the limit is {}",
            d.body().len(),
            cfg.max_body_bytes
        ))));
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
            job.ids = fallback_ids(cfg, d, content_type, probe);
            return Err(Stop::Refused(e));
        }
    };
    let fallback = fallback_ids(cfg, d, content_type, IdProbe::default());
    job.ids = Ids {
        request_id: if is_valid_request_id(&request.request_id) {
            request.request_id.clone()
        } else {
            fallback.request_id
        },
        tenant: if is_valid_tenant(&request.tenant) {
            request.tenant.clone()
        } else {
            fallback.tenant
        },
        kind: request.kind.into(),
        content_type,
        traceparent: fallback.traceparent,
    };
    let span = tracing::Span::current();
    span.record("request_id", job.ids.request_id.as_str());
    span.record("tenant", job.ids.tenant.as_str());

    // Recorded only when it is a digest: the audit event carries nothing unchecked.
    job.findings = Findings {
        scanner_digest: crate::digest::parse_oci_sha256(&request.scanner.image_digest)
            .is_ok()
            .then(|| request.scanner.image_digest.clone()),
        ..Findings::default()
    };
    // Before anything that costs or records something (payload, gates, the requestId's
    // claim, quota): a job older than the queue age limit is answered and forgotten.
    check_queue_age(d.published(), SystemTime::now(), cfg.max_queue_age).map_err(Stop::Refused)?;
    let source = request
        .validate()
        .and_then(|_| request.payload_source())
        .map_err(Stop::Refused)?;
    job.findings.policy = request.policy();
    if let PayloadSource::Inline(prepared) = &source {
        job.findings.subjects = prepared.subjects.iter().map(|s| s.digest.clone()).collect();
        job.findings
            .predicate_type
            .clone_from(&prepared.predicate_type);
    }
    let subject = SubjectTenant::of(&cfg.requests_subject, d.subject());
    bind_tenant(cfg, d.subject(), subject, &request).map_err(Stop::Refused)?;
    if !cfg.profiles.contains(request.profile()) {
        return Err(Stop::Refused(unknown_profile(&request)));
    }
    // An inline payload is checked now; a referenced one once it is read (after the claim).
    if let PayloadSource::Inline(prepared) = &source {
        check_signable(cfg, &request, prepared).map_err(Stop::Refused)?;
    }
    Ok(Decoded {
        request: Arc::new(request),
        source,
        subject_tenant: subject.named().map(str::to_owned),
    })
}

/// Who a refusal is addressed to when the body is not a valid request: Nats-Msg-Id, else
/// the body's requestId if it can be read, else `seq-<n>`; the subject's tenant, else the
/// body's, else `_unknown`.
pub(in crate::pipeline) fn fallback_ids(
    cfg: &PipelineConfig,
    d: &dyn Delivery,
    content_type: ContentType,
    probe: IdProbe,
) -> Ids {
    let subject_tenant = SubjectTenant::of(&cfg.requests_subject, d.subject()).named();
    Ids {
        request_id: d
            .header("Nats-Msg-Id")
            .map(str::to_owned)
            .filter(|id| is_valid_request_id(id))
            .or(probe.request_id.filter(|id| is_valid_request_id(id)))
            .unwrap_or_else(|| format!("seq-{}", d.stream_sequence())),
        tenant: subject_tenant
            .map(str::to_owned)
            .filter(|t| is_valid_tenant(t))
            .or(probe.tenant.filter(|t| is_valid_tenant(t)))
            .unwrap_or_else(|| super::UNKNOWN_TENANT.into()),
        kind: ResultKind::Unknown,
        content_type,
        traceparent: d.header("traceparent").map(str::to_owned),
    }
}

/// The subject's tenant must be the body's; a subject outside the requests subject cannot
/// bind its job to a tenant and is refused.
fn bind_tenant(
    cfg: &PipelineConfig,
    raw_subject: &str,
    subject: SubjectTenant<'_>,
    request: &SignRequest,
) -> Result<(), SignerError> {
    let mismatch = match subject {
        SubjectTenant::Named(t) if t != request.tenant => format!(
            "subject names tenant {}, body names {}",
            crate::echo::echo(t),
            crate::echo::echo(&request.tenant)
        ),
        SubjectTenant::Foreign => format!(
            "subject {} is not under {:?}: its tenant cannot be checked",
            crate::echo::echo(raw_subject),
            cfg.requests_subject
        ),
        _ => return Ok(()),
    };
    Err(SignerError::TenantMismatch(mismatch))
}

/// Whether the request's profile signs this payload: its predicate type, and the policy a
/// report predicate carries (`docs/contract.md#signing-policy`). Refused with
/// `invalid_request`: the request asks for something its profile does not sign.
pub(in crate::pipeline) fn check_signable(
    cfg: &PipelineConfig,
    request: &SignRequest,
    prepared: &PreparedPayload,
) -> Result<(), SignerError> {
    let Some(policy) = cfg.profiles.signing_policy(request.profile()) else {
        return Err(unknown_profile(request));
    };
    let stated = request.policy();
    let what = Signable {
        payload_type: &prepared.payload_type,
        predicate_type: prepared.predicate_type.as_deref(),
        policy: stated.as_ref(),
    };
    policy.check(request.profile(), what).map_err(|refusal| {
        metrics::counter!("signer_policy_refused_total", "profile" => request.profile().to_owned())
            .increment(1);
        SignerError::InvalidRequest(refusal.to_string())
    })
}

pub(in crate::pipeline) fn unknown_profile(request: &SignRequest) -> SignerError {
    SignerError::InvalidRequest(format!(
        "unknown signing profile {}",
        crate::echo::echo(request.profile())
    ))
}

/// What a job's subject says about its tenant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(in crate::pipeline) enum SubjectTenant<'a> {
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
    pub fn of(requests: &str, subject: &'a str) -> Self {
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

    pub fn named(self) -> Option<&'a str> {
        match self {
            SubjectTenant::Named(t) => Some(t),
            _ => None,
        }
    }
}

/// Refuses a job that was `published` longer than `max_age` before `now` with
/// `request_expired`. A publish time after `now` (the broker's clock ahead of ours) counts
/// as no wait at all.
pub(in crate::pipeline) fn check_queue_age(
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorCode;

    #[test]
    fn subject_tenant_parsing() {
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
