//! The job's decisions, one by one, with in-memory ports and without NATS (issue 9, item
//! 1): the steps of `job/` are called directly on one delivery, against a running pipeline
//! (its actors over in-memory ports), and their typed outcomes checked. Every port call is
//! written to one log, in order, so a test sees which gates were consulted and which not.

use std::time::Instant;

use super::*;
use crate::error::{ErrorCode, SignerError};
use crate::pipeline::job::{self, Job, Settle, Stop};
use crate::pipeline::job::{
    refusal::Refusal,
    store::{NotStored, OnTransient, StoreError},
};

/// Every port call of a rig, in order: `entitlement`, `claim`, `provenance`, `quota`,
/// `sign`, `record`, `complete`, `release`.
#[derive(Default)]
struct Log(Mutex<Vec<&'static str>>);

impl Log {
    fn push(&self, call: &'static str) {
        self.0.lock().unwrap().push(call);
    }
    fn calls(&self) -> Vec<&'static str> {
        self.0.lock().unwrap().clone()
    }
    fn count(&self, call: &str) -> usize {
        self.calls().iter().filter(|c| **c == call).count()
    }
    fn clear(&self) {
        self.0.lock().unwrap().clear();
    }
}

/// What a test gate does when asked.
#[derive(Clone)]
enum Gate {
    Pass,
    Refuse(SignerError),
    /// Never answers (the call times out, or the job is cut off).
    Hang,
}

impl Gate {
    async fn decide(&self) -> Result<(), SignerError> {
        match self {
            Gate::Pass => Ok(()),
            Gate::Refuse(e) => Err(e.clone()),
            Gate::Hang => futures::future::pending().await,
        }
    }
}

struct LoggedEntitlement(Arc<Log>, Gate);

#[async_trait]
impl EntitlementVerifier for LoggedEntitlement {
    async fn verify(
        &self,
        _: &GateInput,
        _: Option<&crate::ports::VerifiedToken>,
    ) -> Result<EntitlementVerdict, GateDenial> {
        self.0.push("entitlement");
        self.1.decide().await.map_err(GateDenial::from)?;
        Ok(EntitlementVerdict {
            caller: None,
            auth: crate::audit::AuthState::Valid,
            poe: crate::audit::PoeState::Valid,
            plan: "team".into(),
        })
    }
}

struct LoggedProvenance(Arc<Log>, Gate);

#[async_trait]
impl ReleaseVerifier for LoggedProvenance {
    async fn look_up(&self, _: &str, _: &str) -> Result<ProvenanceGrant, SignerError> {
        self.0.push("provenance");
        self.1.decide().await?;
        Ok(ProvenanceGrant::Trusted(ReleaseSignature {
            keyid: "ab".repeat(32),
            location: SignatureLocation::Tag,
            reference: format!("sha256-{}.sig", "0".repeat(64)),
            format: SignatureFormat::CosignSignature,
        }))
    }
}

struct LoggedQuota(Arc<Log>, Gate);

#[async_trait]
impl QuotaStore for LoggedQuota {
    async fn acquire(&self, _: &str, _: &str, _: usize, _: u32) -> Result<QuotaGrant, SignerError> {
        self.0.push("quota");
        self.1.decide().await?;
        Ok(QuotaGrant::Allowed)
    }
    async fn release(&self, _: &str, _: &str) {}
}

/// The in-memory idempotency store, logged.
struct LoggedIdempotency(Arc<Log>, MemIdempotency);

#[async_trait]
impl IdempotencyStore for LoggedIdempotency {
    async fn claim(&self, key: &str, owner: &str, lease: Duration) -> Result<Claim, PortError> {
        self.0.push("claim");
        self.1.claim(key, owner, lease).await
    }
    async fn record(
        &self,
        key: &str,
        owner: &str,
        outcome: &OutMessage,
    ) -> Result<Recorded, PortError> {
        self.0.push("record");
        self.1.record(key, owner, outcome).await
    }
    async fn complete(&self, key: &str, seq: u64) -> Result<(), PortError> {
        self.0.push("complete");
        self.1.complete(key, seq).await
    }
    async fn release(&self, key: &str, owner: &str) -> Result<(), PortError> {
        self.0.push("release");
        self.1.release(key, owner).await
    }
}

/// Key `k`, an Ed25519 key whose signatures are logged.
struct LoggedKeys(Arc<Log>);

struct LoggedKey(Arc<Log>, EdKey);

#[async_trait]
impl KeySigner for LoggedKey {
    fn name(&self) -> &str {
        self.1.name()
    }
    fn identity(&self) -> Arc<SignerIdentity> {
        self.1.identity()
    }
    async fn sign(&self, message: &[u8]) -> Result<KeySignature, KeyError> {
        self.0.push("sign");
        self.1.sign(message).await
    }
}

#[async_trait]
impl KeyFactory for LoggedKeys {
    fn names(&self) -> Vec<String> {
        vec!["k".into()]
    }
    async fn load(&self, name: &str) -> Result<Arc<dyn KeySigner>, KeyError> {
        let pair = Ed25519KeyPair::from_pkcs8(&pkcs8())
            .map_err(|e| KeyError::Unavailable(e.to_string()))?;
        let public =
            PublicKey::from_raw(KeyAlgorithm::Ed25519, pair.public_key().as_ref()).unwrap();
        Ok(Arc::new(LoggedKey(
            self.0.clone(),
            EdKey {
                name: name.into(),
                pair,
                identity: Arc::new(SignerIdentity::keyful(public, KeySource::File)),
            },
        )))
    }
}

/// The in-memory publisher, refusing `sign.completed` for good when `refuse_results`.
struct Results {
    inner: MemPublisher,
    refuse_results: bool,
}

#[async_trait]
impl MessagePublisher for Results {
    async fn send(&self, message: OutMessage) -> Result<AckFuture, PortError> {
        if self.refuse_results && message.subject == "sign.completed" {
            return Err(PortError::permanent(
                "the results stream refuses the message",
            ));
        }
        self.inner.send(message).await
    }
    async fn fetch_result(&self, seq: u64) -> Result<Option<OutMessage>, PortError> {
        self.inner.fetch_result(seq).await
    }
}

/// A job source with nothing in it: the tests hand deliveries to the steps themselves.
struct NoJobs;

struct Never;

#[async_trait]
impl JobSourceFactory for NoJobs {
    async fn open(&self) -> Result<Box<dyn JobSource>, PortError> {
        Ok(Box::new(Never))
    }
}

#[async_trait]
impl JobSource for Never {
    async fn next(&mut self) -> Option<Result<Box<dyn Delivery>, PortError>> {
        futures::future::pending().await
    }
}

/// How `job::run` settled a [`One`].
#[derive(Debug, Clone, Copy, PartialEq)]
enum Seen {
    Ack,
    Nak(Duration),
    Term,
}

/// One delivery of a request, on its `delivered`-th delivery.
struct One {
    subject: String,
    headers: Vec<(&'static str, String)>,
    body: Vec<u8>,
    delivered: u64,
    published: SystemTime,
    settled: Arc<Mutex<Vec<Seen>>>,
}

impl One {
    fn new(request_id: &str, delivered: u64) -> Self {
        One {
            subject: "sign.requests.acme".into(),
            headers: Vec::new(),
            body: request_body(request_id),
            delivered,
            published: SystemTime::now(),
            settled: Arc::default(),
        }
    }
}

#[async_trait]
impl Delivery for One {
    fn subject(&self) -> &str {
        &self.subject
    }
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    fn body(&self) -> &[u8] {
        &self.body
    }
    fn stream_sequence(&self) -> u64 {
        7
    }
    fn delivered(&self) -> u64 {
        self.delivered
    }
    fn published(&self) -> SystemTime {
        self.published
    }
    async fn ack(&self) -> Result<(), PortError> {
        self.settled.lock().unwrap().push(Seen::Ack);
        Ok(())
    }
    async fn nak(&self, delay: Duration) -> Result<(), PortError> {
        self.settled.lock().unwrap().push(Seen::Nak(delay));
        Ok(())
    }
    async fn in_progress(&self) -> Result<(), PortError> {
        Ok(())
    }
    async fn term(&self) -> Result<(), PortError> {
        self.settled.lock().unwrap().push(Seen::Term);
        Ok(())
    }
}

/// The gates of a rig.
struct Gates {
    entitlement: Gate,
    provenance: Gate,
    quota: Gate,
}

impl Default for Gates {
    fn default() -> Self {
        Gates {
            entitlement: Gate::Pass,
            provenance: Gate::Pass,
            quota: Gate::Pass,
        }
    }
}

/// A running pipeline over logged in-memory ports, whose job source stays empty.
struct Rig {
    pipeline: Pipeline,
    log: Arc<Log>,
    results: Arc<Results>,
    idempotency: Arc<LoggedIdempotency>,
}

/// Backoff 10 ms doubling up to 40 ms, 5 deliveries.
async fn rig(gates: Gates, change: impl FnOnce(&mut PipelineConfig, &mut Results)) -> Rig {
    let log = Arc::new(Log::default());
    let mut cfg = PipelineConfig::new(
        "steps-worker",
        HashMap::from([("default".to_string(), vec!["k".to_string()])]),
    );
    cfg.backoff_base = Duration::from_millis(10);
    cfg.backoff_max = Duration::from_millis(40);
    cfg.max_deliver = 5;
    cfg.call_timeout = Duration::from_secs(5);
    let mut results = Results {
        inner: MemPublisher::default(),
        refuse_results: false,
    };
    change(&mut cfg, &mut results);
    let results = Arc::new(results);
    let idempotency = Arc::new(LoggedIdempotency(log.clone(), MemIdempotency::default()));
    let ports = Ports {
        source: Arc::new(NoJobs),
        publisher: results.clone(),
        idempotency: idempotency.clone(),
        keys: Arc::new(LoggedKeys(log.clone())),
        revocations: Arc::new(NoRevocations),
        assignments: Arc::new(crate::profiles::NoAssignments),
        entitlement: Arc::new(LoggedEntitlement(log.clone(), gates.entitlement)),
        quota: Arc::new(LoggedQuota(log.clone(), gates.quota)),
        provenance: Arc::new(LoggedProvenance(log.clone(), gates.provenance)),
        blobs: None,
    };
    let pipeline = Pipeline::start(cfg, ports).await.unwrap();
    let status = pipeline.status();
    until("pipeline ready", || status.ready().is_ok()).await;
    Rig {
        pipeline,
        log,
        results,
        idempotency,
    }
}

impl Rig {
    fn shared(&self) -> &Arc<crate::pipeline::Shared> {
        &self.pipeline.shared
    }

    /// The job on `d`, as the intake runs it, but without settling: how it would be settled.
    async fn process(&self, d: &One) -> Settle {
        job::process(self.shared(), d).await
    }

    /// Messages stored under `prefix`, as JSON (audit batches flattened).
    fn stored(&self, prefix: &str) -> Vec<serde_json::Value> {
        published_json(&self.results.inner, prefix)
    }

    /// The one `sign.failed` result of `request_id` and its error code.
    fn failed(&self, request_id: &str) -> serde_json::Value {
        let failed: Vec<_> = self
            .stored("sign.failed")
            .into_iter()
            .filter(|r| r["requestId"] == request_id)
            .collect();
        assert_eq!(
            failed.len(),
            1,
            "one sign.failed for {request_id}: {failed:?}"
        );
        failed[0].clone()
    }

    fn record(&self, key: &str) -> Option<MemRecord> {
        self.idempotency.1.0.lock().unwrap().get(key).cloned()
    }

    async fn stop(self) {
        assert_eq!(self.pipeline.shutdown(Duration::from_secs(5)).await, 0);
    }
}

fn cfg_for_backoff() -> PipelineConfig {
    let mut cfg = PipelineConfig::new("w", HashMap::from([("default".to_string(), vec![])]));
    cfg.backoff_base = Duration::from_millis(10);
    cfg.backoff_max = Duration::from_millis(40);
    cfg.max_deliver = 5;
    cfg
}

// ---- retry with backoff, last delivery ----

#[test]
fn a_refusal_is_retried_with_backoff_bounded_by_backoff_max_until_the_last_delivery() {
    let cfg = cfg_for_backoff();
    let unavailable = SignerError::KeyUnavailable("hsm away".into());
    let ms = Duration::from_millis;
    let decisions: Vec<_> = (1..=5)
        .map(|n| Refusal::of(&cfg, n, &unavailable))
        .collect();
    assert_eq!(
        decisions,
        [
            Refusal::Retry(ms(10)),
            Refusal::Retry(ms(20)),
            Refusal::Retry(ms(40)),
            Refusal::Retry(ms(40)),
            Refusal::Answer,
        ],
        "doubling per delivery, at most backoff_max; the last delivery answers"
    );
    // A final code is answered at once.
    let denied = SignerError::AuthInvalid("bad signature".into());
    assert_eq!(Refusal::of(&cfg, 1, &denied), Refusal::Answer);
    // A quota refusal waits its retryAfterMs, unless that is longer than backoff_max.
    let quota = |ms| SignerError::QuotaExceeded {
        message: "rate".into(),
        retry_after_ms: ms,
    };
    assert_eq!(Refusal::of(&cfg, 1, &quota(25)), Refusal::Retry(ms(25)));
    assert_eq!(Refusal::of(&cfg, 3, &quota(25)), Refusal::Retry(ms(25)));
    assert_eq!(Refusal::of(&cfg, 1, &quota(41)), Refusal::Answer);
    assert_eq!(Refusal::of(&cfg, 5, &quota(25)), Refusal::Answer);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retryable_gate_failure_naks_with_growing_delays_and_the_last_delivery_publishes_it() {
    let unavailable = SignerError::EntitlementUnavailable("licensing unreachable".into());
    let rig = rig(
        Gates {
            entitlement: Gate::Refuse(unavailable),
            ..Gates::default()
        },
        |_, _| {},
    )
    .await;
    let ms = Duration::from_millis;
    let mut settles = Vec::new();
    for delivered in 1..=5 {
        settles.push(rig.process(&One::new("r-retry", delivered)).await);
        if delivered < 5 {
            assert!(
                rig.stored("sign.").is_empty(),
                "nothing published before the last delivery"
            );
            assert!(rig.stored("signer.audit.").is_empty(), "nor audited");
        }
    }
    assert_eq!(
        settles,
        [
            Settle::Nak(ms(10)),
            Settle::Nak(ms(20)),
            Settle::Nak(ms(40)),
            Settle::Nak(ms(40)),
            Settle::Ack,
        ]
    );
    let failed = rig.failed("r-retry");
    assert_eq!(failed["error"]["code"], "entitlement_unavailable");
    assert_eq!(failed["error"]["retryable"], true);
    // Authentication comes before the claim: no requestId was used up by any delivery.
    assert_eq!(rig.log.calls(), ["entitlement"; 5]);
    assert_eq!(rig.record("acme/r-retry"), None);
    rig.stop().await;
}

// ---- duplicates: done, signed before, busy ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_answered_before_republishes_its_original_result_and_signs_nothing() {
    let rig = rig(Gates::default(), |_, _| {}).await;
    // First delivery: signed and answered.
    assert_eq!(rig.process(&One::new("r-dup", 1)).await, Settle::Ack);
    assert_eq!(rig.log.count("sign"), 1);
    let Some(MemRecord::Done(seq)) = rig.record("acme/r-dup") else {
        panic!("the record is done: {:?}", rig.record("acme/r-dup"));
    };
    rig.log.clear();

    // The claim step says how the copy stops: a duplicate of result `seq`.
    let copy = One::new("r-dup", 1);
    let mut job = Job::new(rig.shared(), &copy);
    let decoded = job::decode::decode(&mut job).unwrap();
    let _admitted = job::admit::authenticate(&mut job, &decoded).await.unwrap();
    match job::claim::claim(&mut job).await {
        Err(Stop::Duplicate { result_sequence }) => assert_eq!(result_sequence, seq),
        other => panic!("expected a duplicate, got {:?}", other.map(|_| ())),
    }
    assert!(job.lease.is_none(), "a duplicate takes no lease");
    drop(job);

    // The whole job: the original result published again, acked, nothing signed or charged.
    let completed_before = rig.stored("sign.completed").len();
    assert_eq!(rig.process(&copy).await, Settle::Ack);
    assert_eq!(rig.log.count("sign"), 0);
    assert_eq!(rig.log.count("quota"), 0);
    assert_eq!(rig.log.count("provenance"), 0);
    let completed = rig.stored("sign.completed");
    assert_eq!(completed.len(), completed_before + 1, "republished");
    assert_eq!(completed[0], completed[completed_before], "the same result");
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_signed_before_publishes_its_recorded_outcome_and_a_busy_one_waits() {
    let rig = rig(Gates::default(), |_, _| {}).await;
    let outcome = OutMessage {
        subject: "sign.completed".into(),
        headers: vec![("Nats-Msg-Id".into(), "acme/r-signed".into())],
        body: br#"{"recorded":true}"#.to_vec(),
    };
    rig.idempotency
        .1
        .0
        .lock()
        .unwrap()
        .insert("acme/r-signed".into(), MemRecord::Signed(outcome.clone()));
    rig.idempotency.1.0.lock().unwrap().insert(
        "acme/r-busy".into(),
        MemRecord::Lease("another-attempt".into()),
    );

    let d = One::new("r-signed", 2);
    let mut job = Job::new(rig.shared(), &d);
    let decoded = job::decode::decode(&mut job).unwrap();
    job::admit::authenticate(&mut job, &decoded).await.unwrap();
    match job::claim::claim(&mut job).await {
        Err(Stop::SignedBefore(recorded)) => assert_eq!(recorded, outcome),
        other => panic!("expected the recorded outcome, got {:?}", other.map(|_| ())),
    }
    drop(job);
    assert_eq!(rig.process(&d).await, Settle::Ack);
    assert_eq!(
        rig.stored("sign.completed"),
        [serde_json::json!({"recorded": true})]
    );
    assert_eq!(
        rig.record("acme/r-signed"),
        Some(MemRecord::Done(1)),
        "done once published"
    );

    // Another attempt holds the lease: NAKed with the delivery's backoff, capped by what
    // the store says the lease has left (20 ms here), and the lease is not touched.
    for (delivered, wait) in [(1, 10), (2, 20), (4, 20)] {
        let d = One::new("r-busy", delivered);
        let mut job = Job::new(rig.shared(), &d);
        let decoded = job::decode::decode(&mut job).unwrap();
        job::admit::authenticate(&mut job, &decoded).await.unwrap();
        match job::claim::claim(&mut job).await {
            Err(Stop::Settle(Settle::Nak(delay))) => {
                assert_eq!(delay, Duration::from_millis(wait), "delivery {delivered}")
            }
            other => panic!("expected a NAK, got {:?}", other.map(|_| ())),
        }
    }
    assert_eq!(
        rig.record("acme/r-busy"),
        Some(MemRecord::Lease("another-attempt".into()))
    );
    assert_eq!(rig.log.count("sign"), 0);
    assert_eq!(rig.log.count("release"), 0);

    // On the last delivery a NAK would end the message without a result: the claim waits
    // for the other attempt's lease instead, and takes it once it is gone.
    let last = rig.shared().cfg.max_deliver;
    let records = rig.idempotency.clone();
    let freed = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        records.1.0.lock().unwrap().remove("acme/r-busy");
    });
    let d = One::new("r-busy", last);
    let mut job = Job::new(rig.shared(), &d);
    let decoded = job::decode::decode(&mut job).unwrap();
    job::admit::authenticate(&mut job, &decoded).await.unwrap();
    let started = std::time::Instant::now();
    let claimed = job::claim::claim(&mut job).await;
    assert!(claimed.is_ok(), "the last delivery took the freed lease");
    assert!(started.elapsed() >= Duration::from_millis(150), "it waited");
    drop(claimed);
    drop(job);
    freed.await.unwrap();
    rig.stop().await;
}

// ---- gate order ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_gate_stops_the_job_before_every_later_gate_and_the_claim() {
    let untrusted = SignerError::ProvenanceUntrusted("not a release".into());
    let over = SignerError::QuotaExceeded {
        message: "daily cap".into(),
        retry_after_ms: 3_600_000,
    };
    let denied = SignerError::PoeInvalid("wrong tenant".into());
    let cases: Vec<(&str, Gates, Option<&str>, Vec<&str>)> = vec![
        (
            "all pass",
            Gates::default(),
            None,
            vec![
                "entitlement",
                "claim",
                "provenance",
                "quota",
                "sign",
                "record",
                "complete",
            ],
        ),
        (
            "entitlement refuses: nothing claimed, nothing else asked",
            Gates {
                entitlement: Gate::Refuse(denied),
                ..Gates::default()
            },
            Some("poe_invalid"),
            vec!["entitlement"],
        ),
        (
            "provenance refuses: quota not asked, nothing signed",
            Gates {
                provenance: Gate::Refuse(untrusted),
                ..Gates::default()
            },
            Some("provenance_untrusted"),
            vec!["entitlement", "claim", "provenance", "complete"],
        ),
        (
            "quota refuses: nothing signed",
            Gates {
                quota: Gate::Refuse(over),
                ..Gates::default()
            },
            Some("quota_exceeded"),
            vec!["entitlement", "claim", "provenance", "quota", "complete"],
        ),
    ];
    for (case, gates, code, calls) in cases {
        let rig = rig(gates, |_, _| {}).await;
        assert_eq!(
            rig.process(&One::new("r-order", 1)).await,
            Settle::Ack,
            "{case}"
        );
        assert_eq!(rig.log.calls(), calls, "{case}");
        match code {
            None => assert_eq!(rig.stored("sign.completed").len(), 1, "{case}"),
            Some(code) => assert_eq!(rig.failed("r-order")["error"]["code"], code, "{case}"),
        }
        rig.stop().await;
    }

    // A job too old is refused before any gate.
    let rig = rig(Gates::default(), |cfg, _| {
        cfg.max_queue_age = Duration::from_secs(60);
    })
    .await;
    let mut old = One::new("r-old", 1);
    old.published = SystemTime::now() - Duration::from_secs(61);
    let mut job = Job::new(rig.shared(), &old);
    match job::decode::decode(&mut job) {
        Err(Stop::Refused(e)) => assert_eq!(e.code(), ErrorCode::RequestExpired),
        other => panic!("expected request_expired, got {:?}", other.map(|_| ())),
    }
    assert_eq!(job.ids.request_id, "r-old", "addressed by the body's ids");
    drop(job);
    assert_eq!(rig.process(&old).await, Settle::Ack);
    assert_eq!(rig.failed("r-old")["error"]["code"], "request_expired");
    assert!(rig.log.calls().is_empty(), "{:?}", rig.log.calls());
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decode_refuses_with_the_code_and_addresses_the_refusal_as_well_as_it_can() {
    let rig = rig(Gates::default(), |_, _| {}).await;
    let refused = |d: &One| {
        let mut job = Job::new(rig.shared(), d);
        match job::decode::decode(&mut job) {
            Err(Stop::Refused(e)) => (e.code(), job.ids.request_id, job.ids.tenant),
            other => panic!("expected a refusal, got {:?}", other.map(|_| ())),
        }
    };
    let id = |s: &str| s.to_string();
    // Undecodable: addressed by the stream sequence and the subject's tenant.
    let mut d = One::new("r-x", 1);
    d.body = b"{not json".to_vec();
    assert_eq!(
        refused(&d),
        (ErrorCode::InvalidRequest, id("seq-7"), id("acme"))
    );
    // ... or by Nats-Msg-Id when it is a valid requestId.
    d.headers.push(("Nats-Msg-Id", "r-from-header".into()));
    assert_eq!(refused(&d).1, "r-from-header");
    // Another apiVersion, a Content-Type we do not speak, a body over the limit.
    let mut d = One::new("r-v2", 1);
    let mut body: serde_json::Value = serde_json::from_slice(&d.body).unwrap();
    body["apiVersion"] = "signer.stella-ops.org/v2".into();
    d.body = serde_json::to_vec(&body).unwrap();
    assert_eq!(refused(&d).0, ErrorCode::UnsupportedApiVersion);
    let mut d = One::new("r-ct", 1);
    d.headers.push(("Content-Type", "text/plain".into()));
    assert_eq!(refused(&d).0, ErrorCode::UnsupportedMediaType);
    let mut d = One::new("r-big", 1);
    d.body = vec![b' '; rig.shared().cfg.max_body_bytes + 1];
    assert_eq!(refused(&d).0, ErrorCode::PayloadTooLarge);
    // The subject's tenant binds the job; a subject outside the requests subject cannot.
    let mut d = One::new("r-other", 1);
    d.subject = "sign.requests.globex".into();
    assert_eq!(
        refused(&d),
        (ErrorCode::TenantMismatch, id("r-other"), id("acme"))
    );
    d.subject = "elsewhere.acme".into();
    assert_eq!(refused(&d).0, ErrorCode::TenantMismatch);
    // An unknown profile is refused before any gate.
    let mut d = One::new("r-profile", 1);
    let mut body: serde_json::Value = serde_json::from_slice(&d.body).unwrap();
    body["options"] = serde_json::json!({"profile": "nope"});
    d.body = serde_json::to_vec(&body).unwrap();
    assert_eq!(refused(&d).0, ErrorCode::InvalidRequest);
    assert!(rig.log.calls().is_empty(), "{:?}", rig.log.calls());
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_steps_return_what_the_next_step_needs() {
    let rig = rig(Gates::default(), |_, _| {}).await;
    let d = One::new("r-steps", 1);
    let mut job = Job::new(rig.shared(), &d);
    assert_eq!(
        job.ids.request_id, "seq-7",
        "before decoding: the fallback ids"
    );
    let decoded = job::decode::decode(&mut job).unwrap();
    assert_eq!(job.ids.request_id, "r-steps");
    assert_eq!(job.ids.tenant, "acme");
    assert_eq!(decoded.subject_tenant.as_deref(), Some("acme"));
    assert_eq!(
        job.findings.subjects.len(),
        1,
        "subjects of the inline statement"
    );
    let admitted = job::admit::authenticate(&mut job, &decoded).await.unwrap();
    assert_eq!(admitted.verdict.plan, "team");
    assert_eq!(admitted.keys, ["k"]);
    assert_eq!(job.findings.plan.as_deref(), Some("team"));
    assert!(rig.log.calls() == ["entitlement"], "{:?}", rig.log.calls());
    let hold = job::claim::claim(&mut job).await.unwrap();
    let lease = job.lease.as_ref().expect("the claim holds a lease");
    assert!(lease.armed, "given back if the job is cut off now");
    assert_eq!(lease.key, "acme/r-steps");
    assert!(lease.owner.starts_with("steps-worker."), "{}", lease.owner);
    assert!(matches!(rig.record("acme/r-steps"), Some(MemRecord::Lease(o)) if o == lease.owner));
    let signed = hold
        .run(async {
            let payload = job::admit::payload(&mut job, &decoded.request, decoded.source, "team")
                .await
                .unwrap();
            job::admit::admit_and_sign(&mut job, &decoded.request, admitted, payload).await
        })
        .await
        .unwrap();
    assert_eq!(signed.envelope.envelope.signatures.len(), 1);
    assert_eq!(rig.log.count("sign"), 1);
    let settle = job::signed::store(&mut job, signed).await.unwrap();
    assert_eq!(settle, Settle::Ack);
    assert!(matches!(
        rig.record("acme/r-steps"),
        Some(MemRecord::Done(_))
    ));
    rig.stop().await;
}

// ---- a permanent store failure ----

#[test]
fn store_failures_are_classified_by_their_kind() {
    let refused = StoreError::of_port(PortError::permanent("stream refused"));
    assert!(matches!(refused, StoreError::Refused(_)));
    assert!(refused.is_permanent());
    assert_eq!(refused.answer("the result").code(), ErrorCode::Internal);
    let down = StoreError::of_port(PortError::transient("no responders"));
    assert!(matches!(down, StoreError::Unavailable(_)));
    assert!(!down.is_permanent());
    let large = StoreError::of_port(PortError::permanent(crate::ports::MessageTooLarge {
        bytes: 2 << 20,
        source: "maximum payload exceeded".into(),
    }));
    assert!(matches!(large, StoreError::TooLarge(_)));
    assert_eq!(
        large.answer("the result").code(),
        ErrorCode::PayloadTooLarge
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persist_answers_a_permanent_failure_at_once_and_retries_a_transient_one_as_told() {
    let rig = rig(Gates::default(), |cfg, _| {
        cfg.retry_budget = Duration::from_millis(200);
    })
    .await;
    let cfg = &rig.shared().cfg;
    let tries = AtomicUsize::new(0);
    let failing = |e: fn() -> PortError| {
        let tries = &tries;
        move || {
            tries.fetch_add(1, Ordering::SeqCst);
            let e = e();
            async move { Err::<(), _>(StoreError::of_port(e)) }
        }
    };
    let first = One::new("r-p", 1);
    let last = One::new("r-p", 5);

    // For good: answered at once, whatever the delivery and the discipline.
    let permanent = || PortError::permanent("refused");
    for (d, on) in [
        (&first, OnTransient::Redeliver),
        (&last, OnTransient::RetryHere),
    ] {
        tries.store(0, Ordering::SeqCst);
        let out = job::store::persist(cfg, d, on, failing(permanent)).await;
        assert!(matches!(
            out,
            Err(NotStored::Permanent(StoreError::Refused(_)))
        ));
        assert_eq!(tries.load(Ordering::SeqCst), 1, "not retried");
    }
    // For now, before the last delivery, nothing signed: NAKed with the delivery's backoff.
    let transient = || PortError::transient("no responders");
    tries.store(0, Ordering::SeqCst);
    let out = job::store::persist(cfg, &first, OnTransient::Redeliver, failing(transient)).await;
    assert!(matches!(
        out,
        Err(NotStored::Settle(Settle::Nak(d))) if d == Duration::from_millis(10)
    ));
    assert_eq!(tries.load(Ordering::SeqCst), 1);
    // For now, signed and unrecorded: retried here within the budget, then NAKed (TERM on
    // the last delivery).
    for (d, settle) in [
        (&first, Settle::Nak(Duration::from_millis(10))),
        (&last, Settle::Term),
    ] {
        tries.store(0, Ordering::SeqCst);
        let started = Instant::now();
        let out = job::store::persist(cfg, d, OnTransient::RetryHere, failing(transient)).await;
        assert!(
            matches!(out, Err(NotStored::Settle(s)) if s == settle),
            "{settle:?}"
        );
        assert!(tries.load(Ordering::SeqCst) > 2, "retried in process");
        assert!(
            started.elapsed() <= Duration::from_millis(400),
            "within the budget"
        );
    }
    // And a transient failure that passes is stored.
    tries.store(0, Ordering::SeqCst);
    let out = job::store::persist(cfg, &first, OnTransient::RetryHere, || {
        let n = tries.fetch_add(1, Ordering::SeqCst);
        async move {
            if n < 2 {
                Err(StoreError::of_port(PortError::transient(
                    "electing a leader",
                )))
            } else {
                Ok(n)
            }
        }
    })
    .await;
    assert!(matches!(out, Ok(2)));
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signed_result_the_stream_refuses_for_good_is_answered_compact_internal_and_acked() {
    let rig = rig(Gates::default(), |_, results| results.refuse_results = true).await;
    let d = One::new("r-refused", 1);
    let mut job = Job::new(rig.shared(), &d);
    let signed = job::sign(&mut job).await.unwrap();
    match job::signed::store(&mut job, signed).await {
        Err(Stop::Answer(e)) => assert_eq!(e.code(), ErrorCode::Internal, "{e}"),
        other => panic!("expected an answer, got {other:?}"),
    }
    drop(job);

    let d = One::new("r-refused-2", 1);
    assert_eq!(
        rig.process(&d).await,
        Settle::Ack,
        "answered at once, not retried"
    );
    assert_eq!(rig.log.count("sign"), 2, "one signature per job");
    let failed = rig.failed("r-refused-2");
    assert_eq!(failed["error"]["code"], "internal");
    assert!(rig.stored("sign.completed").is_empty());
    let decisions: Vec<_> = rig
        .stored("signer.audit.")
        .into_iter()
        .filter(|e| e["requestId"] == "r-refused-2")
        .map(|e| e["decision"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(
        decisions,
        ["signed", "failed"],
        "the signature and its refusal"
    );
    assert!(failed["audit"]["seq"].as_u64().is_some());
    assert!(
        matches!(rig.record("acme/r-refused-2"), Some(MemRecord::Done(_))),
        "the refusal is the request's one result"
    );
    rig.stop().await;
}

// ---- a cancelled gate ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gate_call_that_times_out_is_retried_and_its_lease_given_back() {
    // The gate actor ends the lookup at the call's deadline (the provenance actor answers
    // `provenance_unavailable` then) or the call itself times out (`internal`): either way
    // a retryable failure, whose code the job does not choose.
    let hanging_provenance = Gates {
        provenance: Gate::Hang,
        ..Gates::default()
    };
    let hanging_quota = Gates {
        quota: Gate::Hang,
        ..Gates::default()
    };
    for (gates, calls) in [
        (
            hanging_provenance,
            vec!["entitlement", "claim", "provenance", "release"],
        ),
        (
            hanging_quota,
            vec!["entitlement", "claim", "provenance", "quota", "release"],
        ),
    ] {
        let rig = rig(gates, |cfg, _| {
            cfg.call_timeout = Duration::from_millis(200)
        })
        .await;
        let started = Instant::now();
        let settle = rig.process(&One::new("r-hang", 1)).await;
        assert!(started.elapsed() >= Duration::from_millis(150));
        assert_eq!(settle, Settle::Nak(Duration::from_millis(10)), "{calls:?}");
        assert_eq!(
            rig.log.calls(),
            calls,
            "no later gate asked, nothing signed, the lease given back"
        );
        assert_eq!(
            rig.record("acme/r-hang"),
            None,
            "the redelivery need not wait"
        );
        assert!(rig.stored("sign.").is_empty());
        // The last delivery answers with the retryable code.
        assert_eq!(rig.process(&One::new("r-hang", 5)).await, Settle::Ack);
        let failed = rig.failed("r-hang");
        let code = failed["error"]["code"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert!(
            ["internal", "provenance_unavailable"].contains(&code.as_str()),
            "{failed}"
        );
        assert_eq!(failed["error"]["retryable"], true);
        assert_eq!(rig.log.count("sign"), 0);
        rig.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_cut_off_in_a_gate_gives_its_lease_back() {
    // At the job timeout: NAKed with backoff.
    let cut = rig(
        Gates {
            quota: Gate::Hang,
            ..Gates::default()
        },
        |cfg, _| {
            cfg.call_timeout = Duration::from_secs(600);
            cfg.job_timeout = Duration::from_millis(200);
        },
    )
    .await;
    let d = One::new("r-cut", 1);
    let settled = d.settled.clone();
    job::run(cut.shared(), Box::new(d)).await;
    assert_eq!(
        *settled.lock().unwrap(),
        [Seen::Nak(Duration::from_millis(10))]
    );
    until("the lease given back", || {
        cut.record("acme/r-cut").is_none()
    })
    .await;
    assert_eq!(cut.log.count("release"), 1);
    assert_eq!(cut.log.count("sign"), 0);
    // On the last delivery the job is terminated (nothing would redeliver it).
    let d = One::new("r-cut", 5);
    let settled = d.settled.clone();
    job::run(cut.shared(), Box::new(d)).await;
    assert_eq!(*settled.lock().unwrap(), [Seen::Term]);
    until("the lease given back", || {
        cut.record("acme/r-cut").is_none()
    })
    .await;
    cut.stop().await;

    // At the drain deadline: NAKed at once for another replica.
    let drain = rig(
        Gates {
            provenance: Gate::Hang,
            ..Gates::default()
        },
        |cfg, _| cfg.call_timeout = Duration::from_secs(600),
    )
    .await;
    let d = One::new("r-drain", 1);
    let settled = d.settled.clone();
    let shared = drain.shared().clone();
    let running = tokio::spawn(async move { job::run(&shared, Box::new(d)).await });
    until("waiting on provenance", || {
        drain.log.count("provenance") == 1
    })
    .await;
    assert!(matches!(
        drain.record("acme/r-drain"),
        Some(MemRecord::Lease(_))
    ));
    drain.shared().cancel_jobs.send_replace(true);
    running.await.unwrap();
    assert_eq!(*settled.lock().unwrap(), [Seen::Nak(Duration::ZERO)]);
    until("the lease given back", || {
        drain.record("acme/r-drain").is_none()
    })
    .await;
    drain.stop().await;
}

// ---- what a profile signs ----

/// The `default` profile, signed by `k`, with `signs` as what it signs.
fn signing(signs: crate::policy::SigningPolicy) -> impl FnOnce(&mut PipelineConfig, &mut Results) {
    move |cfg, _| {
        cfg.profiles = crate::profiles::ProfileTable::new(HashMap::from([(
            "default".to_string(),
            crate::profiles::ProfileKeys {
                keys: vec!["k".into()],
                signs,
                ..Default::default()
            },
        )]));
    }
}

/// A request for `predicate_type` with `options`.
fn request_for(id: &str, predicate_type: &str, options: serde_json::Value) -> One {
    let mut d = One::new(id, 1);
    let mut body: serde_json::Value = serde_json::from_slice(&d.body).unwrap();
    body["statement"]["predicateType"] = predicate_type.into();
    if !options.is_null() {
        body["options"] = options;
    }
    d.body = serde_json::to_vec(&body).unwrap();
    d
}

/// The one audit event of `request_id`.
fn audit_event_of(rig: &Rig, request_id: &str) -> serde_json::Value {
    let events: Vec<_> = rig
        .stored("signer.audit.")
        .into_iter()
        .filter(|e| e["requestId"] == request_id)
        .collect();
    assert_eq!(events.len(), 1, "one audit event for {request_id}");
    events[0].clone()
}

fn policy_digest(c: char) -> String {
    format!("sha256:{}", c.to_string().repeat(64))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_predicate_type_the_profile_does_not_sign_is_refused_audited_and_nothing_asked() {
    use crate::policy::{CYCLONEDX_PREDICATE_TYPE, SPDX_PREDICATE_TYPE, SigningPolicy};
    let signs = SigningPolicy {
        predicate_types: Some(
            [CYCLONEDX_PREDICATE_TYPE, SPDX_PREDICATE_TYPE]
                .map(String::from)
                .into(),
        ),
        ..SigningPolicy::default()
    };
    let rig = rig(Gates::default(), signing(signs)).await;
    let d = request_for(
        "r-slsa",
        "https://slsa.dev/provenance/v1",
        serde_json::Value::Null,
    );
    let mut job = Job::new(rig.shared(), &d);
    match job::decode::decode(&mut job) {
        Err(Stop::Refused(e)) => {
            assert_eq!(e.code(), ErrorCode::InvalidRequest);
            assert!(
                e.message()
                    .contains("does not sign predicateType \"https://slsa.dev/provenance/v1\""),
                "{}",
                e.message()
            );
        }
        other => panic!("expected invalid_request, got {:?}", other.map(|_| ())),
    }
    drop(job);
    assert_eq!(rig.process(&d).await, Settle::Ack);
    let failed = rig.failed("r-slsa");
    assert_eq!(failed["error"]["code"], "invalid_request");
    assert!(
        failed["error"]["message"]
            .as_str()
            .unwrap()
            .contains(CYCLONEDX_PREDICATE_TYPE)
    );
    // before every gate: not authenticated, claimed, charged nor signed
    assert!(rig.log.calls().is_empty(), "{:?}", rig.log.calls());
    let event = audit_event_of(&rig, "r-slsa");
    assert_eq!(event["decision"], "failed");
    assert_eq!(event["errorCode"], "invalid_request");
    assert_eq!(event["predicateType"], "https://slsa.dev/provenance/v1");
    // a listed type is signed, and its audit event says which type it was
    let d = request_for("r-bom", CYCLONEDX_PREDICATE_TYPE, serde_json::Value::Null);
    assert_eq!(rig.process(&d).await, Settle::Ack);
    assert_eq!(rig.stored("sign.completed").len(), 1);
    let event = audit_event_of(&rig, "r-bom");
    assert_eq!(event["decision"], "signed");
    assert_eq!(event["predicateType"], CYCLONEDX_PREDICATE_TYPE);
    assert!(
        event.get("policy").is_none(),
        "no policy stated, none recorded"
    );
    // raw bytes have no predicate type: a listed profile does not sign them
    let mut raw = One::new("r-raw", 1);
    let mut body: serde_json::Value = serde_json::from_slice(&raw.body).unwrap();
    body.as_object_mut().unwrap().remove("statement");
    body["payload"] = "aGVsbG8=".into();
    body["payloadType"] = "text/plain".into();
    raw.body = serde_json::to_vec(&body).unwrap();
    assert_eq!(rig.process(&raw).await, Settle::Ack);
    let msg = rig.failed("r-raw")["error"]["message"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(msg.contains("not payloadType \"text/plain\""), "{msg}");
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_report_needs_the_policy_the_profile_requires_and_its_policy_is_recorded() {
    use crate::policy::{SCAN_REPORT_PREDICATE_TYPE as REPORT, SigningPolicy};
    let signs = SigningPolicy {
        require_policy: true,
        allowed_policy_digests: Some([policy_digest('a')].into()),
        ..SigningPolicy::default()
    };
    let rig = rig(Gates::default(), signing(signs)).await;
    let options =
        |c: char| serde_json::json!({"policyDigest": policy_digest(c), "viewSet": "prod"});
    // no policy: refused before any gate, audited
    let d = request_for("r-nopolicy", REPORT, serde_json::Value::Null);
    assert_eq!(rig.process(&d).await, Settle::Ack);
    let msg = rig.failed("r-nopolicy")["error"]["message"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        msg.contains("requires options.policyDigest and options.viewSet"),
        "{msg}"
    );
    // a digest the profile does not accept: refused, and the audit event says which
    let d = request_for("r-otherpolicy", REPORT, options('b'));
    assert_eq!(rig.process(&d).await, Settle::Ack);
    let failed = rig.failed("r-otherpolicy");
    assert_eq!(failed["error"]["code"], "invalid_request");
    assert!(
        failed["error"]["message"]
            .as_str()
            .unwrap()
            .contains(&policy_digest('b'))
    );
    let event = audit_event_of(&rig, "r-otherpolicy");
    assert_eq!(event["errorCode"], "invalid_request");
    assert_eq!(
        event["policy"],
        serde_json::json!({"digest": policy_digest('b'), "viewSet": "prod"})
    );
    assert!(rig.log.calls().is_empty(), "{:?}", rig.log.calls());
    // half a policy is a malformed request, whatever the profile
    let d = request_for(
        "r-half",
        REPORT,
        serde_json::json!({"policyDigest": policy_digest('a')}),
    );
    assert_eq!(rig.process(&d).await, Settle::Ack);
    assert!(
        rig.failed("r-half")["error"]["message"]
            .as_str()
            .unwrap()
            .contains("go together")
    );
    // the accepted policy: signed, recorded in the result and the audit event
    let d = request_for("r-report", REPORT, options('a'));
    assert_eq!(rig.process(&d).await, Settle::Ack);
    let completed = rig.stored("sign.completed");
    assert_eq!(completed.len(), 1);
    let recorded = serde_json::json!({"digest": policy_digest('a'), "viewSet": "prod"});
    assert_eq!(completed[0]["policy"], recorded);
    let event = audit_event_of(&rig, "r-report");
    assert_eq!(event["decision"], "signed");
    assert_eq!(event["policy"], recorded);
    assert_eq!(event["predicateType"], REPORT);
    // an SBOM is not a report: no policy needed, none recorded
    let d = request_for(
        "r-sbom",
        crate::policy::SPDX_PREDICATE_TYPE,
        serde_json::Value::Null,
    );
    assert_eq!(rig.process(&d).await, Settle::Ack);
    let completed = rig.stored("sign.completed");
    assert_eq!(completed.len(), 2);
    assert!(completed[1].get("policy").is_none());
    rig.stop().await;
}
