//! Large artefacts through the blob bucket, with [`MemoryBlobStore`]: a `payloadRef` is
//! read, checked and signed; a result over the inline limit carries references; bad
//! references are refused with their contract codes before anything is charged.

use super::*;
use crate::error::ErrorCode;
use crate::messages::{Artefacts, Completed};
use crate::objects::{DEFAULT_BUCKET, MemoryBlobStore, ObjectRef};

/// Grants everything, counts charges, and gives every plan a `max_payload_bytes`.
struct PlanLimit {
    limit: u64,
    charges: AtomicUsize,
}

#[async_trait]
impl QuotaStore for PlanLimit {
    async fn acquire(
        &self,
        _: &str,
        _: &str,
        payload_bytes: usize,
        _: u32,
    ) -> Result<QuotaGrant, crate::error::SignerError> {
        assert!(
            payload_bytes as u64 <= self.limit,
            "the plan limit is checked first"
        );
        self.charges.fetch_add(1, Ordering::SeqCst);
        Ok(QuotaGrant::Allowed)
    }
    async fn release(&self, _: &str, _: &str) {}
    fn max_payload_bytes(&self, _: &str) -> Option<u64> {
        Some(self.limit)
    }
}

struct Rig {
    queue: Arc<Queue>,
    publisher: Arc<MemPublisher>,
    pipeline: Pipeline,
    blobs: Arc<MemoryBlobStore>,
    quota: Arc<PlanLimit>,
}

/// A pipeline with a blob store (`with_blobs`), a plan limit of `plan_limit` bytes and the
/// default inline result limit unless `inline_limit` is given.
async fn rig(with_blobs: bool, plan_limit: u64, inline_limit: Option<usize>) -> Rig {
    rig_signing(with_blobs, plan_limit, inline_limit, Default::default()).await
}

/// The same, with `signs` as what the `default` profile signs.
async fn rig_signing(
    with_blobs: bool,
    plan_limit: u64,
    inline_limit: Option<usize>,
    signs: crate::policy::SigningPolicy,
) -> Rig {
    let blobs = Arc::new(MemoryBlobStore::new(DEFAULT_BUCKET));
    let quota = Arc::new(PlanLimit {
        limit: plan_limit,
        charges: AtomicUsize::new(0),
    });
    let (b, q) = (blobs.clone(), quota.clone());
    let (queue, publisher, pipeline) = start_with(Arc::new(TwoKeys), "a", move |cfg, ports| {
        if let Some(limit) = inline_limit {
            cfg.max_inline_result_bytes = limit;
        }
        ports.quota = q;
        if let Some(default) = cfg.profiles.get("default").cloned() {
            let profile = crate::profiles::ProfileKeys { signs, ..default };
            cfg.profiles = crate::profiles::ProfileTable::new(HashMap::from([(
                "default".to_string(),
                profile,
            )]));
        }
        if with_blobs {
            ports.blobs = Some(b);
        }
    })
    .await;
    let status = pipeline.status();
    until("keys loaded", || status.ready().is_ok()).await;
    Rig {
        queue,
        publisher,
        pipeline,
        blobs,
        quota,
    }
}

/// A valid in-toto Statement of about `size` bytes (the predicate carries the filler).
fn statement_of(size: usize) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "_type": crate::statement::STATEMENT_V1,
        "subject": [{"name": "sbom", "digest": {"sha256": "5".repeat(64)}}],
        "predicateType": "https://spdx.dev/Document",
        "predicate": {"filler": "x".repeat(size)}
    }))
    .unwrap()
}

/// A request body whose content is `content` (`statement`, `payload` or `payloadRef`).
fn body_with(id: &str, content: serde_json::Value) -> Vec<u8> {
    let mut v = serde_json::json!({
        "apiVersion": crate::API_VERSION, "requestId": id, "tenant": "acme", "kind": "dsse",
        "auth": {"opTok": "t"}, "poe": {"format": "jwt", "value": "p"},
        "scanner": {"repository": "r", "imageDigest": format!("sha256:{}", "0".repeat(64))},
    });
    for (k, val) in content.as_object().unwrap() {
        v[k] = val.clone();
    }
    serde_json::to_vec(&v).unwrap()
}

fn send(queue: &Arc<Queue>, seq: u64, body: Vec<u8>) {
    queue
        .tx
        .send(MemDelivery {
            queue: queue.clone(),
            subject: "sign.requests".into(),
            body,
            seq,
            delivered: 1,
            published: SystemTime::now(),
        })
        .unwrap();
}

/// Waits for job `seq` to be acked and returns its one result (subject, JSON).
async fn result_of(rig: &Rig, seq: u64) -> (String, serde_json::Value) {
    until("job acked", || acked(&rig.queue, seq)).await;
    let id = format!("r-{seq}");
    let results: Vec<(String, serde_json::Value)> = rig
        .publisher
        .0
        .lock()
        .unwrap()
        .iter()
        .filter(|m| m.subject.starts_with("sign.") && m.header("Signer-Request-Id") == Some(&id))
        .map(|m| (m.subject.clone(), serde_json::from_slice(&m.body).unwrap()))
        .collect();
    assert_eq!(results.len(), 1, "one result for {id}");
    results.into_iter().next().unwrap()
}

/// The audit events of `request_id`.
fn audit_of(rig: &Rig, request_id: &str) -> Vec<serde_json::Value> {
    published_json(&rig.publisher, "signer.audit.")
        .into_iter()
        .filter(|e| e["requestId"] == request_id)
        .collect()
}

fn reference(name: &str, bytes: &[u8]) -> serde_json::Value {
    serde_json::to_value(ObjectRef::of(DEFAULT_BUCKET, name, bytes)).unwrap()
}

/// Fetches a result object and checks it against its reference.
fn fetch(blobs: &MemoryBlobStore, r: &ObjectRef) -> Vec<u8> {
    assert_eq!(r.bucket, DEFAULT_BUCKET);
    let bytes = blobs
        .object(&r.name)
        .expect("the referenced object is stored");
    r.check(&bytes)
        .expect("the object is what its reference says");
    bytes.to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_referenced_payload_is_signed_as_is_and_its_large_result_goes_by_reference() {
    let rig = rig(true, 64 << 20, None).await;
    let statement = statement_of(3 << 20);
    rig.blobs.insert("up/r-1", statement.clone());
    send(
        &rig.queue,
        1,
        body_with(
            "r-1",
            serde_json::json!({"payloadRef": reference("up/r-1", &statement)}),
        ),
    );
    let (subject, result) = result_of(&rig, 1).await;
    assert_eq!(subject, "sign.completed", "{result}");
    assert!(result.get("envelope").is_none() && result.get("bundles").is_none());
    let completed: Completed = serde_json::from_value(result.clone()).unwrap();
    completed.validate().unwrap();
    let Artefacts::Referenced(refs) = &completed.artefacts else {
        panic!("inline: {result}")
    };
    assert_eq!(
        refs.envelope_ref.name,
        crate::objects::envelope_object_name("acme", "r-1")
    );
    assert_eq!(refs.bundle_refs.len(), 1);
    let envelope: crate::dsse::Envelope =
        serde_json::from_slice(&fetch(&rig.blobs, &refs.envelope_ref)).unwrap();
    assert_eq!(
        envelope.payload, statement,
        "the object's bytes, signed as they are"
    );
    assert_eq!(envelope.payload_type, crate::statement::INTOTO_PAYLOAD_TYPE);
    assert_eq!(envelope.jcs_sha256().unwrap(), completed.bundle_sha256);
    let key = crate::keys::PublicKey::from_pem(completed.signers[0].public_key.as_deref().unwrap())
        .unwrap();
    assert!(key.verify(&envelope.pae(), &envelope.signatures[0].sig));
    let bundle: crate::bundle::Bundle =
        serde_json::from_slice(&fetch(&rig.blobs, &refs.bundle_refs[0])).unwrap();
    assert_eq!(bundle.verify_keyful(&[key]).unwrap(), 0);
    assert_eq!(bundle.dsse_envelope.payload, statement);
    // the statement's subjects are the result's and the audit event's
    assert_eq!(result["subjects"][0]["name"], "sbom");
    let events = audit_of(&rig, "r-1");
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["decision"], "signed");
    assert_eq!(events[0]["subjects"][0]["sha256"], "5".repeat(64));
    assert_eq!(rig.quota.charges.load(Ordering::SeqCst), 1);

    // A small statement in the same deployment stays inline.
    let puts = rig.blobs.puts();
    send(&rig.queue, 2, request_body("r-2"));
    let (subject, result) = result_of(&rig, 2).await;
    assert_eq!(subject, "sign.completed");
    assert!(result.get("envelope").is_some() && result.get("envelopeRef").is_none());
    assert_eq!(
        rig.blobs.puts(),
        puts,
        "nothing stored for an inline result"
    );
    assert_eq!(rig.pipeline.shutdown(Duration::from_secs(5)).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_references_are_refused_with_their_codes_audited_and_uncharged() {
    let rig = rig(true, 1 << 20, None).await;
    let statement = statement_of(10_000);
    rig.blobs.insert("obj", statement.clone());
    let good = ObjectRef::of(DEFAULT_BUCKET, "obj", &statement);
    let cases: Vec<(ObjectRef, ErrorCode, &str)> = vec![
        (
            ObjectRef {
                sha256: "0".repeat(64),
                ..good.clone()
            },
            ErrorCode::InvalidRequest,
            "sha256",
        ),
        (
            ObjectRef {
                size: good.size - 1,
                ..good.clone()
            },
            ErrorCode::InvalidRequest,
            "bytes",
        ),
        (
            ObjectRef {
                size: good.size + 1,
                ..good.clone()
            },
            ErrorCode::InvalidRequest,
            "bytes",
        ),
        (
            ObjectRef {
                name: "missing".into(),
                ..good.clone()
            },
            ErrorCode::InvalidRequest,
            "not in bucket",
        ),
        (
            ObjectRef {
                bucket: "OTHER".into(),
                ..good.clone()
            },
            ErrorCode::InvalidRequest,
            "bucket",
        ),
        // over the plan's max_payload_bytes (1 MiB): refused before reading
        (
            ObjectRef {
                size: (1 << 20) + 1,
                ..good.clone()
            },
            ErrorCode::PayloadTooLarge,
            "plan",
        ),
        // over the global limit (64 MiB)
        (
            ObjectRef {
                size: 1 << 40,
                ..good.clone()
            },
            ErrorCode::PayloadTooLarge,
            "limit",
        ),
    ];
    for (i, (r, code, says)) in cases.into_iter().enumerate() {
        let seq = i as u64 + 1;
        let reads = rig.blobs.gets();
        let id = format!("r-{seq}");
        send(
            &rig.queue,
            seq,
            body_with(&id, serde_json::json!({"payloadRef": r})),
        );
        let (subject, result) = result_of(&rig, seq).await;
        assert_eq!(subject, "sign.failed", "case {i}: {result}");
        assert_eq!(result["error"]["code"], code.as_str(), "case {i}: {result}");
        assert_eq!(result["error"]["retryable"], false);
        let message = result["error"]["message"].as_str().unwrap();
        assert!(message.contains(says), "case {i}: {message}");
        let events = audit_of(&rig, &id);
        assert_eq!(events.len(), 1, "case {i}");
        assert_eq!(events[0]["errorCode"], code.as_str());
        if code == ErrorCode::PayloadTooLarge {
            assert_eq!(rig.blobs.gets(), reads, "case {i}: refused before reading");
        }
        let settled = rig.queue.settled.lock().unwrap().clone();
        assert!(
            !settled.contains(&(seq, Settled::Nak)),
            "case {i}: not retried"
        );
    }
    assert_eq!(
        rig.quota.charges.load(Ordering::SeqCst),
        0,
        "nothing charged"
    );
    assert_eq!(rig.pipeline.shutdown(Duration::from_secs(5)).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_referenced_payload_the_profile_does_not_sign_is_refused_once_read_and_uncharged() {
    use crate::policy::{CYCLONEDX_PREDICATE_TYPE, SigningPolicy};
    let signs = SigningPolicy {
        predicate_types: Some([CYCLONEDX_PREDICATE_TYPE.to_string()].into()),
        ..SigningPolicy::default()
    };
    let rig = rig_signing(true, 64 << 20, None, signs).await;
    // an SPDX statement, which the profile does not sign: known only once the object is read
    let statement = statement_of(10_000);
    rig.blobs.insert("spdx", statement.clone());
    let r = reference("spdx", &statement);
    send(
        &rig.queue,
        1,
        body_with("r-1", serde_json::json!({"payloadRef": r})),
    );
    let (subject, result) = result_of(&rig, 1).await;
    assert_eq!(subject, "sign.failed", "{result}");
    assert_eq!(result["error"]["code"], "invalid_request");
    let message = result["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("does not sign predicateType \"https://spdx.dev/Document\""),
        "{message}"
    );
    let events = audit_of(&rig, "r-1");
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["errorCode"], "invalid_request");
    assert_eq!(events[0]["predicateType"], "https://spdx.dev/Document");
    assert_eq!(
        rig.quota.charges.load(Ordering::SeqCst),
        0,
        "nothing charged"
    );
    // a CycloneDX statement by reference is signed
    let mut bom: serde_json::Value = serde_json::from_slice(&statement).unwrap();
    bom["predicateType"] = CYCLONEDX_PREDICATE_TYPE.into();
    let bom = serde_json::to_vec(&bom).unwrap();
    rig.blobs.insert("bom", bom.clone());
    let r = reference("bom", &bom);
    send(
        &rig.queue,
        2,
        body_with("r-2", serde_json::json!({"payloadRef": r})),
    );
    let (subject, result) = result_of(&rig, 2).await;
    assert_eq!(subject, "sign.completed", "{result}");
    assert_eq!(
        audit_of(&rig, "r-2")[0]["predicateType"],
        CYCLONEDX_PREDICATE_TYPE
    );
    assert_eq!(rig.pipeline.shutdown(Duration::from_secs(5)).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_store_outage_is_retried_and_the_job_signed_once_it_is_back() {
    let rig = rig(true, 64 << 20, None).await;
    let statement = statement_of(1000);
    rig.blobs.insert("obj", statement.clone());
    rig.blobs.set_down(true);
    send(
        &rig.queue,
        1,
        body_with(
            "r-1",
            serde_json::json!({"payloadRef": reference("obj", &statement)}),
        ),
    );
    until("a retry", || {
        rig.queue
            .settled
            .lock()
            .unwrap()
            .contains(&(1, Settled::Nak))
    })
    .await;
    rig.blobs.set_down(false);
    let (subject, result) = result_of(&rig, 1).await;
    assert_eq!(subject, "sign.completed", "{result}");
    // a small result stays inline even for a referenced payload
    assert!(result.get("envelope").is_some());
    assert_eq!(rig.quota.charges.load(Ordering::SeqCst), 1, "charged once");
    assert_eq!(rig.pipeline.shutdown(Duration::from_secs(5)).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_over_the_inline_limit_without_a_blob_store_is_payload_too_large() {
    let rig = rig(false, 64 << 20, Some(20_000)).await;
    let statement: serde_json::Value = serde_json::from_slice(&statement_of(30_000)).unwrap();
    send(
        &rig.queue,
        1,
        body_with("r-1", serde_json::json!({"statement": statement})),
    );
    let (subject, result) = result_of(&rig, 1).await;
    assert_eq!(subject, "sign.failed", "{result}");
    assert_eq!(result["error"]["code"], "payload_too_large");
    assert_eq!(result["error"]["retryable"], false);
    let events = audit_of(&rig, "r-1");
    assert_eq!(events.len(), 1, "one event, not a signed one: {events:?}");
    assert_eq!(events[0]["decision"], "failed");

    // and a payloadRef is refused outright without a blob store
    let small = statement_of(10);
    send(
        &rig.queue,
        2,
        body_with(
            "r-2",
            serde_json::json!({"payloadRef": reference("x", &small)}),
        ),
    );
    let (subject, result) = result_of(&rig, 2).await;
    assert_eq!(subject, "sign.failed");
    assert_eq!(result["error"]["code"], "invalid_request");
    assert_eq!(rig.pipeline.shutdown(Duration::from_secs(5)).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_referenced_non_statement_in_toto_payload_is_invalid() {
    let rig = rig(true, 64 << 20, None).await;
    let junk = b"{\"not\": \"a statement\"}".to_vec();
    rig.blobs.insert("junk", junk.clone());
    send(
        &rig.queue,
        1,
        body_with(
            "r-1",
            serde_json::json!({"payloadRef": reference("junk", &junk)}),
        ),
    );
    let (subject, result) = result_of(&rig, 1).await;
    assert_eq!(subject, "sign.failed");
    assert_eq!(result["error"]["code"], "invalid_request");
    // the same bytes under another payloadType are signed as they are
    send(
        &rig.queue,
        2,
        body_with(
            "r-2",
            serde_json::json!({"payloadRef": reference("junk", &junk), "payloadType": "application/json"}),
        ),
    );
    let (subject, result) = result_of(&rig, 2).await;
    assert_eq!(subject, "sign.completed", "{result}");
    assert_eq!(
        crate::b64::decode(result["envelope"]["payload"].as_str().unwrap()).unwrap(),
        junk
    );
    assert_eq!(rig.pipeline.shutdown(Duration::from_secs(5)).await, 0);
}
