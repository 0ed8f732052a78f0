//! Provenance pre-flight through the pipeline's actors, with in-memory ports: the verdict
//! is the Provenance actor's, the Entitlement actor decides first, every decision is
//! audited, nothing is charged or signed.

use std::sync::atomic::AtomicU64;

use super::*;
use crate::error::SignerError;
use crate::pipeline::preflight::{MAX_PREFLIGHT_BYTES, VerifyReferrersReply};

const TRUSTED_REPO: &str = "registry.test/stella-ops/scanner";

/// A registry stand-in: `…/scanner` is trusted (signed by key `ab…` on a referrer),
/// `…/unsigned` untrusted, `…/down` unreachable; counts its lookups.
#[derive(Default)]
struct Registry(AtomicU64);

fn found() -> ReleaseSignature {
    ReleaseSignature {
        keyid: "ab".repeat(32),
        location: SignatureLocation::Referrer,
        reference: format!("sha256:{}", "cd".repeat(32)),
        format: SignatureFormat::SigstoreBundle,
    }
}

#[async_trait]
impl ReleaseVerifier for Registry {
    async fn look_up(&self, repository: &str, _: &str) -> Result<ProvenanceGrant, SignerError> {
        self.0.fetch_add(1, Ordering::SeqCst);
        match repository.rsplit('/').next() {
            Some("scanner") => Ok(ProvenanceGrant::Trusted(found())),
            Some("unsigned") => Err(SignerError::ProvenanceUntrusted(
                "no signature by a trusted key".into(),
            )),
            _ => Err(SignerError::ProvenanceUnavailable("registry down".into())),
        }
    }
}

/// Authenticates the OpTok `good` (as `svc:scanner`, plan `team`); refuses any other.
struct Tokens;

#[async_trait]
impl EntitlementVerifier for Tokens {
    async fn verify(
        &self,
        input: &GateInput,
        _: Option<&VerifiedToken>,
    ) -> Result<EntitlementVerdict, GateDenial> {
        if input.request.auth.op_tok != "good" {
            return Err(GateDenial {
                error: SignerError::AuthInvalid("bad signature".into()),
                caller: None,
                auth: Some(crate::audit::AuthState::Invalid),
                poe: Some(crate::audit::PoeState::NotChecked),
                plan: None,
            });
        }
        Ok(EntitlementVerdict {
            caller: Some(crate::audit::Caller {
                iss: "https://authority.test".into(),
                sub: "svc:scanner".into(),
            }),
            auth: crate::audit::AuthState::Valid,
            poe: crate::audit::PoeState::Valid,
            plan: "team".into(),
        })
    }
}

struct Setup {
    registry: Arc<Registry>,
    ledger: Arc<Ledger>,
    publisher: Arc<MemPublisher>,
    queue: Arc<Queue>,
    pipeline: Pipeline,
}

async fn setup() -> Setup {
    let registry = Arc::new(Registry::default());
    let ledger = Arc::new(Ledger::default());
    let (r, l) = (registry.clone(), ledger.clone());
    let (queue, publisher, pipeline) = start_with(Arc::new(TwoKeys), "a", move |_, ports| {
        ports.entitlement = Arc::new(Tokens);
        ports.provenance = r;
        ports.quota = l;
    })
    .await;
    let status = pipeline.status();
    until("actors running", || status.ready().is_ok()).await;
    Setup {
        registry,
        ledger,
        publisher,
        queue,
        pipeline,
    }
}

fn digest() -> String {
    format!("sha256:{}", "e".repeat(64))
}

fn question(id: &str, token: &str, repository: &str) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": crate::API_VERSION, "requestId": id, "tenant": "acme",
        "auth": {"opTok": token}, "poe": {"format": "jwt", "value": "licence"},
        "repository": repository, "imageDigest": digest(),
    })
}

async fn ask(s: &Setup, body: &serde_json::Value) -> VerifyReferrersReply {
    let answer = s
        .pipeline
        .preflight()
        .answer(None, None, &serde_json::to_vec(body).unwrap())
        .await;
    let decoded: VerifyReferrersReply = serde_json::from_slice(&answer.body).unwrap();
    assert_eq!(decoded, answer.reply, "the body is the reply");
    decoded
}

impl Setup {
    /// The one audit event of `request_id`, valid.
    fn event(&self, request_id: &str) -> serde_json::Value {
        let events = self.publisher.audit(request_id);
        assert_eq!(
            events.len(),
            1,
            "one audit event for {request_id}: {events:#?}"
        );
        let e = events.into_iter().next().unwrap();
        let typed: crate::audit::AuditEvent = serde_json::from_value(e.clone()).unwrap();
        typed.validate().unwrap();
        e
    }

    fn lookups(&self) -> u64 {
        self.registry.0.load(Ordering::SeqCst)
    }
}

#[tokio::test]
async fn a_trusted_image_is_answered_with_its_key_and_where_it_was_found_and_audited() {
    let s = setup().await;
    let reply = ask(&s, &question("q-1", "good", TRUSTED_REPO)).await;
    assert_eq!(reply.verdict, crate::audit::ProvenanceVerdict::Trusted);
    assert_eq!(reply.signature, Some(found()));
    assert_eq!(reply.error, None);
    assert_eq!(
        (reply.request_id.as_str(), reply.tenant.as_str()),
        ("q-1", "acme")
    );
    assert_eq!(reply.image_digest.as_deref(), Some(digest().as_str()));
    let event = s.event("q-1");
    assert_eq!(
        reply.audit.as_ref().map(|a| a.stream.as_str()),
        Some("SIGNER_AUDIT")
    );
    assert_eq!(event["kind"], "verify_referrers");
    assert_eq!(event["decision"], "accepted");
    assert_eq!(event["caller"]["sub"], "svc:scanner");
    assert_eq!(event["auth"]["state"], "valid");
    assert_eq!(event["poe"]["plan"], "team");
    assert_eq!(event["provenance"]["verdict"], "trusted");
    assert_eq!(event["provenance"]["scannerDigest"], digest().as_str());
    assert!(event.get("quota").is_none(), "{event:#}");
    // Nothing charged, nothing signed, no result.
    assert!(s.ledger.0.lock().unwrap().is_empty());
    assert!(
        s.publisher
            .0
            .lock()
            .unwrap()
            .iter()
            .all(|m| m.subject.starts_with("signer.audit."))
    );
    assert_eq!(s.pipeline.shutdown(Duration::from_secs(5)).await, 0);
}

#[tokio::test]
async fn untrusted_and_unavailable_are_answered_with_the_gates_codes() {
    let s = setup().await;
    let reply = ask(&s, &question("q-u", "good", "registry.test/x/unsigned")).await;
    assert_eq!(reply.verdict, crate::audit::ProvenanceVerdict::Untrusted);
    let error = reply.error.clone().unwrap();
    assert_eq!(
        (error.code, error.retryable),
        (crate::error::ErrorCode::ProvenanceUntrusted, false)
    );
    assert_eq!(s.event("q-u")["decision"], "denied");

    let reply = ask(&s, &question("q-d", "good", "registry.test/x/down")).await;
    assert_eq!(reply.verdict, crate::audit::ProvenanceVerdict::Unavailable);
    let error = reply.error.unwrap();
    assert_eq!(
        (error.code, error.retryable),
        (crate::error::ErrorCode::ProvenanceUnavailable, true)
    );
    let event = s.event("q-d");
    assert_eq!(
        (&event["decision"], &event["errorCode"]),
        (
            &serde_json::json!("failed"),
            &serde_json::json!("provenance_unavailable")
        )
    );
    assert_eq!(s.pipeline.shutdown(Duration::from_secs(5)).await, 0);
}

#[tokio::test]
async fn a_refused_token_is_answered_before_any_registry_lookup() {
    let s = setup().await;
    let reply = ask(&s, &question("q-bad", "forged", TRUSTED_REPO)).await;
    assert_eq!(reply.verdict, crate::audit::ProvenanceVerdict::NotChecked);
    assert_eq!(reply.signature, None);
    assert_eq!(
        reply.error.map(|e| e.code),
        Some(crate::error::ErrorCode::AuthInvalid)
    );
    assert_eq!(s.lookups(), 0, "nothing was looked up");
    let event = s.event("q-bad");
    assert_eq!(event["decision"], "denied");
    assert_eq!(event["auth"]["state"], "invalid");
    assert_eq!(event["provenance"]["verdict"], "not_checked");
    assert_eq!(s.pipeline.shutdown(Duration::from_secs(5)).await, 0);
}

#[tokio::test]
async fn bad_questions_are_refused_audited_and_nothing_is_looked_up() {
    let s = setup().await;
    let preflight = s.pipeline.preflight();
    let mut unknown_field = question("q-f", "good", TRUSTED_REPO);
    unknown_field["statement"] = serde_json::json!({});
    let mut bad_digest = question("q-g", "good", TRUSTED_REPO);
    bad_digest["imageDigest"] = "sha256:abc".into();
    let mut old = question("q-v", "good", TRUSTED_REPO);
    old["apiVersion"] = "signer.stella-ops.org/v0".into();
    let mut bad_tenant = question("q-t", "good", TRUSTED_REPO);
    bad_tenant["tenant"] = "a.b".into();
    let json = |v: &serde_json::Value| serde_json::to_vec(v).unwrap();
    use crate::error::ErrorCode::*;
    // (Content-Type, body, code, tenant, requestId: "" for a derived one)
    type Case<'a> = (
        Option<&'a str>,
        Vec<u8>,
        crate::error::ErrorCode,
        &'a str,
        &'a str,
    );
    let cases: Vec<Case> = vec![
        (None, b"{not json".to_vec(), InvalidRequest, "_unknown", ""),
        (None, json(&unknown_field), InvalidRequest, "acme", "q-f"),
        (None, json(&bad_digest), InvalidRequest, "acme", "q-g"),
        (None, json(&old), UnsupportedApiVersion, "acme", "q-v"),
        (None, json(&bad_tenant), InvalidRequest, "_unknown", "q-t"),
        (
            Some("text/plain"),
            json(&question("q-m", "good", TRUSTED_REPO)),
            UnsupportedMediaType,
            "acme",
            "q-m",
        ),
        (
            None,
            vec![b' '; MAX_PREFLIGHT_BYTES + 1],
            PayloadTooLarge,
            "_unknown",
            "",
        ),
    ];
    for (ct, body, code, tenant, id) in cases {
        let answer = preflight.answer(ct, None, &body).await;
        let r = &answer.reply;
        assert_eq!(r.error.as_ref().map(|e| e.code), Some(code), "{r:?}");
        assert_eq!(r.verdict, crate::audit::ProvenanceVerdict::NotChecked);
        assert_eq!(r.tenant, tenant, "{r:?}");
        if !id.is_empty() {
            assert_eq!(r.request_id, id);
        } else {
            assert!(r.request_id.starts_with("verify-"), "{r:?}");
        }
        let event = s.event(&r.request_id);
        assert_eq!(event["decision"], "failed", "{event:#}");
        assert_eq!(event["errorCode"], code.as_str());
        assert!(r.audit.is_some());
    }
    assert_eq!(s.lookups(), 0, "nothing was looked up");
    assert_eq!(s.pipeline.shutdown(Duration::from_secs(5)).await, 0);
}

#[tokio::test]
async fn a_cbor_question_gets_a_cbor_answer_with_its_trace_id_audited() {
    let s = setup().await;
    let mut body = Vec::new();
    ciborium::into_writer(&question("q-c", "good", TRUSTED_REPO), &mut body).unwrap();
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let answer = s
        .pipeline
        .preflight()
        .answer(
            Some("application/cbor"),
            Some(&format!("00-{trace}-00f067aa0ba902b7-01")),
            &body,
        )
        .await;
    assert_eq!(answer.content_type, crate::codec::ContentType::Cbor);
    let decoded: VerifyReferrersReply = ciborium::from_reader(answer.body.as_slice()).unwrap();
    assert_eq!(decoded.signature, Some(found()));
    assert_eq!(s.event("q-c")["traceId"], trace);
    assert_eq!(s.pipeline.shutdown(Duration::from_secs(5)).await, 0);
}

/// The pre-flight and a job meet the same Provenance actor: the job after a pre-flight is
/// answered from the verdict the pre-flight got (one lookup), and records that verdict.
#[tokio::test]
async fn a_job_after_a_pre_flight_gets_the_same_verdict_from_the_same_cache() {
    let s = setup().await;
    let reply = ask(&s, &question("q-j", "good", TRUSTED_REPO)).await;
    assert_eq!(reply.verdict, crate::audit::ProvenanceVerdict::Trusted);
    let mut job: serde_json::Value = serde_json::from_slice(&request_body("r-1")).unwrap();
    job["auth"]["opTok"] = "good".into();
    job["scanner"] = serde_json::json!({"repository": TRUSTED_REPO, "imageDigest": digest()});
    s.queue
        .tx
        .send(MemDelivery {
            queue: s.queue.clone(),
            subject: "sign.requests".into(),
            body: serde_json::to_vec(&job).unwrap(),
            seq: 1,
            delivered: 1,
            published: SystemTime::now(),
        })
        .unwrap();
    until("job acked", || acked(&s.queue, 1)).await;
    let event = s.event("r-1");
    assert_eq!(event["decision"], "signed", "{event:#}");
    assert_eq!(event["provenance"]["verdict"], "trusted");
    assert_eq!(
        s.lookups(),
        1,
        "the job was answered from the pre-flight's verdict"
    );
    assert_eq!(s.pipeline.shutdown(Duration::from_secs(5)).await, 0);
}

/// An audit stream that stores nothing (no leader): every event is refused, transiently.
struct AuditDown;

#[async_trait]
impl MessagePublisher for AuditDown {
    async fn send(&self, _: OutMessage) -> Result<AckFuture, PortError> {
        Err(PortError::transient("no responders"))
    }
    async fn fetch_result(&self, _: u64) -> Result<Option<OutMessage>, PortError> {
        Ok(None)
    }
}

/// No verdict leaves the signer unrecorded: when the decision's audit event is not stored
/// within the call timeout, the answer is `internal` (retryable), with no verdict.
#[tokio::test]
async fn an_answer_whose_audit_event_is_not_stored_carries_no_verdict() {
    let registry = Arc::new(Registry::default());
    let r = registry.clone();
    // the queue is kept: the job source ends when it is dropped
    let (_queue, _, pipeline) = start_with(Arc::new(TwoKeys), "a", move |cfg, ports| {
        cfg.call_timeout = Duration::from_millis(500);
        ports.entitlement = Arc::new(Tokens);
        ports.provenance = r;
        ports.publisher = Arc::new(AuditDown);
    })
    .await;
    let status = pipeline.status();
    until("actors running", || status.ready().is_ok()).await;
    let body = serde_json::to_vec(&question("q-a", "good", TRUSTED_REPO)).unwrap();
    let reply = pipeline.preflight().answer(None, None, &body).await.reply;
    assert_eq!(registry.0.load(Ordering::SeqCst), 1, "the gate was asked");
    assert_eq!(reply.verdict, crate::audit::ProvenanceVerdict::NotChecked);
    assert_eq!((reply.signature, reply.audit), (None, None));
    let error = reply.error.unwrap();
    assert_eq!(
        (error.code, error.retryable),
        (crate::error::ErrorCode::Internal, true)
    );
    assert!(
        error.message.contains("audit event was not stored"),
        "{error:?}"
    );
}

#[test]
fn a_question_not_decided_on_is_answered_unavailable_with_its_ids() {
    let body = serde_json::to_vec(&question("q-busy", "good", TRUSTED_REPO)).unwrap();
    let answer = crate::pipeline::preflight::PreflightAnswer::unaudited(
        None,
        &body,
        SignerError::ProvenanceUnavailable("busy".into()),
    );
    let r = &answer.reply;
    assert_eq!(
        (r.request_id.as_str(), r.tenant.as_str()),
        ("q-busy", "acme")
    );
    assert_eq!(r.verdict, crate::audit::ProvenanceVerdict::NotChecked);
    assert_eq!(r.audit, None);
    assert_eq!(
        r.error.as_ref().map(|e| (e.code, e.retryable)),
        Some((crate::error::ErrorCode::ProvenanceUnavailable, true))
    );
    r.validate().unwrap();
}
