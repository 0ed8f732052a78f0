//! The supervision tree with in-memory ports: what happens when an actor dies mid-job.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use ring::signature::{Ed25519KeyPair, KeyPair as _};
use tokio::sync::mpsc;

use super::disabled::{DisabledEntitlement, DisabledProvenance, DisabledQuota};
use super::{Pipeline, PipelineConfig, Ports};
use crate::keys::{
    KeyAlgorithm, KeyError, KeySignature, KeySigner, KeySource, PublicKey, SignerIdentity,
};
use crate::ports::*;

/// A job is signed once: concurrent copies, failed result publishes, failed audit writes.
mod once;

/// Provenance pre-flight through the gate actors.
mod preflight;

#[derive(Debug, Clone, PartialEq)]
enum Settled {
    Ack,
    Nak,
    Term,
}

/// A JetStream stand-in: NAKed messages come back with `delivered + 1`.
struct Queue {
    tx: mpsc::UnboundedSender<MemDelivery>,
    settled: Mutex<Vec<(u64, Settled)>>,
}

struct MemDelivery {
    queue: Arc<Queue>,
    subject: String,
    body: Vec<u8>,
    seq: u64,
    delivered: u64,
    /// When the job was "published" (kept across redeliveries, as JetStream does).
    published: SystemTime,
}

#[async_trait]
impl Delivery for MemDelivery {
    fn subject(&self) -> &str {
        &self.subject
    }
    fn header(&self, _: &str) -> Option<&str> {
        None
    }
    fn body(&self) -> &[u8] {
        &self.body
    }
    fn stream_sequence(&self) -> u64 {
        self.seq
    }
    fn delivered(&self) -> u64 {
        self.delivered
    }
    fn published(&self) -> SystemTime {
        self.published
    }
    async fn ack(&self) -> Result<(), PortError> {
        self.queue
            .settled
            .lock()
            .unwrap()
            .push((self.seq, Settled::Ack));
        Ok(())
    }
    async fn in_progress(&self) -> Result<(), PortError> {
        Ok(())
    }
    async fn term(&self) -> Result<(), PortError> {
        self.queue
            .settled
            .lock()
            .unwrap()
            .push((self.seq, Settled::Term));
        Ok(())
    }
    async fn nak(&self, delay: Duration) -> Result<(), PortError> {
        self.queue
            .settled
            .lock()
            .unwrap()
            .push((self.seq, Settled::Nak));
        let again = MemDelivery {
            queue: self.queue.clone(),
            subject: self.subject.clone(),
            body: self.body.clone(),
            seq: self.seq,
            delivered: self.delivered + 1,
            published: self.published,
        };
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let tx = again.queue.tx.clone();
            let _ = tx.send(again);
        });
        Ok(())
    }
}

struct MemSource(Arc<Mutex<Option<mpsc::UnboundedReceiver<MemDelivery>>>>);

#[async_trait]
impl JobSourceFactory for MemSource {
    async fn open(&self) -> Result<Box<dyn JobSource>, PortError> {
        let rx = self
            .0
            .lock()
            .unwrap()
            .take()
            .ok_or(PortError::permanent("already open"))?;
        Ok(Box::new(MemStream(rx)))
    }
}

struct MemStream(mpsc::UnboundedReceiver<MemDelivery>);

#[async_trait]
impl JobSource for MemStream {
    async fn next(&mut self) -> Option<Result<Box<dyn Delivery>, PortError>> {
        self.0
            .recv()
            .await
            .map(|d| Ok(Box::new(d) as Box<dyn Delivery>))
    }
}

#[derive(Default)]
struct MemPublisher(Mutex<Vec<OutMessage>>);

impl MemPublisher {
    /// The audit events published for `request_id` (a message holds one, or a batch).
    fn audit(&self, request_id: &str) -> Vec<serde_json::Value> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|m| m.subject.starts_with("signer.audit."))
            .flat_map(
                |m| match serde_json::from_slice::<serde_json::Value>(&m.body).unwrap() {
                    serde_json::Value::Array(events) => events,
                    event => vec![event],
                },
            )
            .filter(|e| e["requestId"] == request_id)
            .collect()
    }
}

#[async_trait]
impl MessagePublisher for MemPublisher {
    async fn send(&self, message: OutMessage) -> Result<AckFuture, PortError> {
        let mut stored = self.0.lock().unwrap();
        stored.push(message);
        let seq = stored.len() as u64;
        Ok(Box::pin(async move {
            Ok(Stored {
                stream_sequence: seq,
                duplicate: false,
            })
        }))
    }
    async fn fetch_result(&self, seq: u64) -> Result<Option<OutMessage>, PortError> {
        Ok(self.0.lock().unwrap().get(seq as usize - 1).cloned())
    }
}

/// An idempotency record in memory, as the stores keep it.
#[derive(Debug, Clone, PartialEq)]
enum MemRecord {
    Lease(String),
    Signed(OutMessage),
    Done(u64),
}

/// The in-memory twin of the idempotency stores: a lease per job attempt (owner), the
/// signed outcome, then done. Leases do not expire here.
#[derive(Default)]
struct MemIdempotency(Mutex<HashMap<String, MemRecord>>);

#[async_trait]
impl IdempotencyStore for MemIdempotency {
    async fn claim(&self, key: &str, owner: &str, _: Duration) -> Result<Claim, PortError> {
        let mut records = self.0.lock().unwrap();
        Ok(match records.get(key) {
            None => {
                records.insert(key.into(), MemRecord::Lease(owner.into()));
                Claim::Acquired
            }
            Some(MemRecord::Lease(o)) if o == owner => Claim::Acquired,
            Some(MemRecord::Lease(_)) => Claim::Busy {
                retry_after: Duration::from_millis(20),
            },
            Some(MemRecord::Signed(outcome)) => Claim::Signed {
                outcome: outcome.clone(),
            },
            Some(MemRecord::Done(seq)) => Claim::Done {
                result_sequence: *seq,
            },
        })
    }
    async fn record(
        &self,
        key: &str,
        owner: &str,
        outcome: &OutMessage,
    ) -> Result<Recorded, PortError> {
        let mut records = self.0.lock().unwrap();
        match records.get(key) {
            Some(MemRecord::Lease(o)) if o == owner => {
                records.insert(key.into(), MemRecord::Signed(outcome.clone()));
                Ok(Recorded::Kept)
            }
            _ => Ok(Recorded::LeaseLost),
        }
    }
    async fn complete(&self, key: &str, seq: u64) -> Result<(), PortError> {
        self.0
            .lock()
            .unwrap()
            .insert(key.into(), MemRecord::Done(seq));
        Ok(())
    }
    async fn release(&self, key: &str, owner: &str) -> Result<(), PortError> {
        let mut records = self.0.lock().unwrap();
        if matches!(records.get(key), Some(MemRecord::Lease(o)) if o == owner) {
            records.remove(key);
        }
        Ok(())
    }
}

/// An Ed25519 key whose first signature panics (a driver bug, a device that vanished).
struct PanickyKey {
    pair: Ed25519KeyPair,
    identity: Arc<SignerIdentity>,
    armed: Arc<AtomicBool>,
}

#[async_trait]
impl KeySigner for PanickyKey {
    fn name(&self) -> &str {
        "panicky"
    }
    fn identity(&self) -> Arc<SignerIdentity> {
        self.identity.clone()
    }
    async fn sign(&self, message: &[u8]) -> Result<KeySignature, KeyError> {
        if self.armed.swap(false, Ordering::SeqCst) {
            panic!("simulated backend crash");
        }
        Ok(KeySignature {
            sig: self.pair.sign(message).as_ref().to_vec(),
            identity: self.identity.clone(),
            rfc3161_timestamp: None,
        })
    }
}

struct Keys {
    pkcs8: Vec<u8>,
    armed: Arc<AtomicBool>,
    loads: AtomicUsize,
}

#[async_trait]
impl KeyFactory for Keys {
    fn names(&self) -> Vec<String> {
        vec!["panicky".into()]
    }
    async fn load(&self, _: &str) -> Result<Arc<dyn KeySigner>, KeyError> {
        self.loads.fetch_add(1, Ordering::SeqCst);
        let pair = Ed25519KeyPair::from_pkcs8(&self.pkcs8)
            .map_err(|e| KeyError::Unavailable(e.to_string()))?;
        let public =
            PublicKey::from_raw(KeyAlgorithm::Ed25519, pair.public_key().as_ref()).unwrap();
        Ok(Arc::new(PanickyKey {
            pair,
            identity: Arc::new(SignerIdentity::keyful(public, KeySource::File)),
            armed: self.armed.clone(),
        }))
    }
}

fn request_body(id: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "apiVersion": crate::API_VERSION, "requestId": id, "tenant": "acme", "kind": "dsse",
        "auth": {"opTok": "t"}, "poe": {"format": "jwt", "value": "p"},
        "scanner": {"repository": "r", "imageDigest": format!("sha256:{}", "0".repeat(64))},
        "statement": {"_type": crate::statement::STATEMENT_V1, "subject": [{"name": "a", "digest": {"sha256": "1".repeat(64)}}], "predicateType": "p"}
    }))
    .unwrap()
}

fn pkcs8() -> Vec<u8> {
    Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new())
        .unwrap()
        .as_ref()
        .to_vec()
}

/// A pipeline over in-memory ports whose `default` profile signs with `key`.
async fn start(keys: Arc<dyn KeyFactory>, key: &str) -> (Arc<Queue>, Arc<MemPublisher>, Pipeline) {
    start_with(keys, key, |_, _| {}).await
}

/// The same, with `change` applied to the configuration and ports before starting.
async fn start_with(
    keys: Arc<dyn KeyFactory>,
    key: &str,
    change: impl FnOnce(&mut PipelineConfig, &mut Ports),
) -> (Arc<Queue>, Arc<MemPublisher>, Pipeline) {
    let (tx, rx) = mpsc::unbounded_channel();
    let queue = Arc::new(Queue {
        tx,
        settled: Mutex::new(Vec::new()),
    });
    let publisher = Arc::new(MemPublisher::default());
    let mut cfg = PipelineConfig::new(
        "test-worker",
        HashMap::from([("default".to_string(), vec![key.to_string()])]),
    );
    cfg.backoff_base = Duration::from_millis(10);
    cfg.backoff_max = Duration::from_millis(100);
    let mut ports = Ports {
        source: Arc::new(MemSource(Arc::new(Mutex::new(Some(rx))))),
        publisher: publisher.clone(),
        idempotency: Arc::new(MemIdempotency::default()),
        keys,
        revocations: Arc::new(NoRevocations),
        assignments: Arc::new(crate::profiles::NoAssignments),
        entitlement: Arc::new(DisabledEntitlement),
        quota: Arc::new(DisabledQuota),
        provenance: Arc::new(DisabledProvenance),
        blobs: None,
    };
    change(&mut cfg, &mut ports);
    let pipeline = Pipeline::start(cfg, ports).await.unwrap();
    (queue, publisher, pipeline)
}

/// Publishes job `seq` (requestId `r-<seq>`).
fn submit(queue: &Arc<Queue>, seq: u64) {
    submit_published(queue, seq, SystemTime::now());
}

/// Publishes job `seq` as if the broker had stored it at `published`.
fn submit_published(queue: &Arc<Queue>, seq: u64, published: SystemTime) {
    queue
        .tx
        .send(MemDelivery {
            queue: queue.clone(),
            subject: "sign.requests".into(),
            body: request_body(&format!("r-{seq}")),
            seq,
            delivered: 1,
            published,
        })
        .unwrap();
}

/// Waits until `cond` holds, for up to 10 s.
async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn acked(queue: &Queue, seq: u64) -> bool {
    queue.settled.lock().unwrap().contains(&(seq, Settled::Ack))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_actor_that_dies_is_restarted_and_its_job_redelivered() {
    let keys = Arc::new(Keys {
        pkcs8: pkcs8(),
        armed: Arc::new(AtomicBool::new(true)),
        loads: AtomicUsize::new(0),
    });
    let (queue, publisher, pipeline) = start(keys.clone(), "panicky").await;
    submit(&queue, 1);
    until("job 1 acked", || acked(&queue, 1)).await;
    let settled = queue.settled.lock().unwrap().clone();
    assert_eq!(
        settled.first(),
        Some(&(1, Settled::Nak)),
        "not acked when the actor died mid-job: {settled:?}"
    );
    assert_eq!(
        settled.last(),
        Some(&(1, Settled::Ack)),
        "done once the key was back: {settled:?}"
    );
    assert_eq!(settled.iter().filter(|s| s.1 == Settled::Ack).count(), 1);
    assert_eq!(
        keys.loads.load(Ordering::SeqCst),
        2,
        "the Keyring reloaded the key"
    );
    let results: Vec<OutMessage> = publisher
        .0
        .lock()
        .unwrap()
        .iter()
        .filter(|m| m.subject.starts_with("sign."))
        .cloned()
        .collect();
    assert_eq!(results.len(), 1, "one result");
    assert_eq!(results[0].subject, "sign.completed");
    assert!(pipeline.status().ready().is_ok());
    assert_eq!(pipeline.shutdown(Duration::from_secs(5)).await, 0);
}

/// One loaded backend of the pooled key: signs as incarnation `n` (the n-th load).
struct PoolMember {
    pair: Ed25519KeyPair,
    identity: Arc<SignerIdentity>,
    n: usize,
    pool: Arc<PoolKeys>,
}

#[async_trait]
impl KeySigner for PoolMember {
    fn name(&self) -> &str {
        "pooled"
    }
    fn identity(&self) -> Arc<SignerIdentity> {
        self.identity.clone()
    }
    async fn sign(&self, message: &[u8]) -> Result<KeySignature, KeyError> {
        // The session of incarnation `fail` is lost: its next signature fails.
        if self
            .pool
            .fail
            .compare_exchange(self.n, usize::MAX, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
        {
            return Err(KeyError::Unavailable("simulated: session closed".into()));
        }
        self.pool.signed_by.lock().unwrap().push(self.n);
        Ok(KeySignature {
            sig: self.pair.sign(message).as_ref().to_vec(),
            identity: self.identity.clone(),
            rfc3161_timestamp: None,
        })
    }
}

/// A key with a pool of two. Every load is a new incarnation (numbered from 0); a load
/// waits for a permit of `gate`, so a test can hold a reload back.
struct PoolKeys {
    pkcs8: Vec<u8>,
    gate: tokio::sync::Semaphore,
    loads: AtomicUsize,
    signed_by: Mutex<Vec<usize>>,
    /// The incarnation whose next signature fails (`usize::MAX`: none).
    fail: AtomicUsize,
}

/// The factory handed to the pipeline; the test keeps the `Arc<PoolKeys>`.
struct PoolFactory(Arc<PoolKeys>);

#[async_trait]
impl KeyFactory for PoolFactory {
    fn names(&self) -> Vec<String> {
        vec!["pooled".into()]
    }
    fn pool_size(&self, name: &str) -> usize {
        assert_eq!(name, "pooled");
        2
    }
    async fn load(&self, _: &str) -> Result<Arc<dyn KeySigner>, KeyError> {
        self.0
            .gate
            .acquire()
            .await
            .map_err(|e| KeyError::Unavailable(e.to_string()))?
            .forget();
        let n = self.0.loads.fetch_add(1, Ordering::SeqCst);
        let pair = Ed25519KeyPair::from_pkcs8(&self.0.pkcs8)
            .map_err(|e| KeyError::Unavailable(e.to_string()))?;
        let public =
            PublicKey::from_raw(KeyAlgorithm::Ed25519, pair.public_key().as_ref()).unwrap();
        Ok(Arc::new(PoolMember {
            pair,
            identity: Arc::new(SignerIdentity::keyful(public, KeySource::Pkcs11)),
            n,
            pool: self.0.clone(),
        }))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_of_two_signs_with_both_and_reloads_a_failed_member_alone() {
    let keys = Arc::new(PoolKeys {
        pkcs8: pkcs8(),
        gate: tokio::sync::Semaphore::new(2),
        loads: AtomicUsize::new(0),
        signed_by: Mutex::new(Vec::new()),
        fail: AtomicUsize::new(usize::MAX),
    });
    let (queue, publisher, pipeline) = start(Arc::new(PoolFactory(keys.clone())), "pooled").await;
    let status = pipeline.status();
    until("both members loaded", || status.ready().is_ok()).await;
    assert_eq!(keys.loads.load(Ordering::SeqCst), 2, "one load per member");

    // Both members sign: jobs take them in turn.
    for seq in 1..=6 {
        submit(&queue, seq);
        until("job acked", || acked(&queue, seq)).await;
    }
    let signed = keys.signed_by.lock().unwrap().clone();
    assert_eq!(signed.len(), 6, "{signed:?}");
    for n in [0, 1] {
        assert_eq!(
            signed.iter().filter(|m| **m == n).count(),
            3,
            "round robin: {signed:?}"
        );
    }

    // Member 0 loses its session; its reload is held back. The job that met the failure is
    // NAKed and redelivered, member 1 signs it and everything else meanwhile, and the key
    // is not ready until the pool is whole again.
    keys.fail.store(0, Ordering::SeqCst);
    let mut seq = 7;
    while keys.fail.load(Ordering::SeqCst) == 0 {
        submit(&queue, seq);
        until("job acked", || acked(&queue, seq)).await;
        seq += 1;
    }
    let failed_at = seq - 1;
    assert!(
        queue
            .settled
            .lock()
            .unwrap()
            .contains(&(failed_at, Settled::Nak)),
        "the job that met the failure was NAKed for a retry"
    );
    until("member 0 is gone", || status.ready().is_err()).await;
    assert_eq!(
        status.ready().map_err(|e| e.to_string()),
        Err("keys not loaded: pooled".to_string())
    );
    keys.signed_by.lock().unwrap().clear();
    for _ in 0..4 {
        submit(&queue, seq);
        until("job acked while member 0 reloads", || acked(&queue, seq)).await;
        seq += 1;
    }
    assert_eq!(
        *keys.signed_by.lock().unwrap(),
        vec![1; 4],
        "member 1 alone serves while member 0 is down"
    );
    assert_eq!(keys.loads.load(Ordering::SeqCst), 2, "reload held back");
    assert!(status.ready().is_err());

    // Let the reload through: member 0 comes back as incarnation 2, beside member 1.
    keys.gate.add_permits(1);
    until("pool whole again", || status.ready().is_ok()).await;
    assert_eq!(
        keys.loads.load(Ordering::SeqCst),
        3,
        "only member 0 was reloaded"
    );
    keys.signed_by.lock().unwrap().clear();
    for _ in 0..4 {
        submit(&queue, seq);
        until("job acked", || acked(&queue, seq)).await;
        seq += 1;
    }
    let signed = keys.signed_by.lock().unwrap().clone();
    assert_eq!(signed.iter().filter(|m| **m == 2).count(), 2, "{signed:?}");
    assert_eq!(signed.iter().filter(|m| **m == 1).count(), 2, "{signed:?}");

    // Every job: one ack, one sign.completed.
    let jobs = seq - 1;
    let settled = queue.settled.lock().unwrap().clone();
    for s in 1..=jobs {
        let acks = settled.iter().filter(|x| **x == (s, Settled::Ack)).count();
        assert_eq!(acks, 1, "job {s}: {settled:?}");
    }
    let results: Vec<OutMessage> = publisher
        .0
        .lock()
        .unwrap()
        .iter()
        .filter(|m| m.subject.starts_with("sign."))
        .cloned()
        .collect();
    assert_eq!(results.len() as u64, jobs, "one result per job");
    assert!(results.iter().all(|m| m.subject == "sign.completed"));
    assert_eq!(pipeline.shutdown(Duration::from_secs(5)).await, 0);
}

// ---- profiles as an entitlement, quota per signature, subject binding ----

/// An entitlement gate that authenticates every job as its body's tenant on `plan` (the
/// real gate is tested in `stella-signer`; here the plan is what matters).
struct OnPlan(String);

#[async_trait]
impl EntitlementVerifier for OnPlan {
    async fn verify(
        &self,
        _: &GateInput,
        _: Option<&crate::ports::VerifiedToken>,
    ) -> Result<EntitlementVerdict, GateDenial> {
        Ok(EntitlementVerdict {
            caller: None,
            auth: crate::audit::AuthState::Valid,
            poe: crate::audit::PoeState::Valid,
            plan: self.0.clone(),
        })
    }
}

/// A quota store that grants everything and remembers each charge
/// (tenant, plan, signatures).
#[derive(Default)]
struct Ledger(Mutex<Vec<(String, String, u32)>>);

#[async_trait]
impl QuotaStore for Ledger {
    async fn acquire(
        &self,
        tenant: &str,
        plan: &str,
        _: usize,
        signatures: u32,
    ) -> Result<QuotaGrant, crate::error::SignerError> {
        self.0
            .lock()
            .unwrap()
            .push((tenant.into(), plan.into(), signatures));
        Ok(QuotaGrant::Allowed)
    }
    async fn release(&self, _: &str, _: &str) {}
}

/// An Ed25519 key that always signs.
struct EdKey {
    name: String,
    pair: Ed25519KeyPair,
    identity: Arc<SignerIdentity>,
}

#[async_trait]
impl KeySigner for EdKey {
    fn name(&self) -> &str {
        &self.name
    }
    fn identity(&self) -> Arc<SignerIdentity> {
        self.identity.clone()
    }
    async fn sign(&self, message: &[u8]) -> Result<KeySignature, KeyError> {
        Ok(KeySignature {
            sig: self.pair.sign(message).as_ref().to_vec(),
            identity: self.identity.clone(),
            rfc3161_timestamp: None,
        })
    }
}

/// Two Ed25519 keys, `a` and `b`.
struct TwoKeys;

#[async_trait]
impl KeyFactory for TwoKeys {
    fn names(&self) -> Vec<String> {
        vec!["a".into(), "b".into()]
    }
    async fn load(&self, name: &str) -> Result<Arc<dyn KeySigner>, KeyError> {
        let pair = Ed25519KeyPair::from_pkcs8(&pkcs8())
            .map_err(|e| KeyError::Unavailable(e.to_string()))?;
        let public =
            PublicKey::from_raw(KeyAlgorithm::Ed25519, pair.public_key().as_ref()).unwrap();
        Ok(Arc::new(EdKey {
            name: name.into(),
            pair,
            identity: Arc::new(SignerIdentity::keyful(public, KeySource::File)),
        }))
    }
}

struct Deployment {
    queue: Arc<Queue>,
    publisher: Arc<MemPublisher>,
    idempotency: Arc<MemIdempotency>,
    ledger: Arc<Ledger>,
    pipeline: Pipeline,
}

/// Profiles `default` = [a] (open to all) and `multi` = [a, b] (plan `enterprise` only),
/// with every job authenticated on `plan`.
async fn start_profiles(plan: &str) -> Deployment {
    use crate::profiles::{ProfileKeys, ProfileTable};
    let (tx, rx) = mpsc::unbounded_channel();
    let queue = Arc::new(Queue {
        tx,
        settled: Mutex::new(Vec::new()),
    });
    let publisher = Arc::new(MemPublisher::default());
    let idempotency = Arc::new(MemIdempotency::default());
    let ledger = Arc::new(Ledger::default());
    let profiles = ProfileTable::new(HashMap::from([
        (
            "default".to_string(),
            ProfileKeys {
                keys: vec!["a".into()],
                ..ProfileKeys::default()
            },
        ),
        (
            "multi".to_string(),
            ProfileKeys {
                keys: vec!["a".into(), "b".into()],
                allow_plans: Some(["enterprise".to_string()].into()),
                ..ProfileKeys::default()
            },
        ),
    ]));
    let mut cfg = PipelineConfig::new("test-worker", profiles);
    cfg.backoff_base = Duration::from_millis(10);
    cfg.backoff_max = Duration::from_millis(100);
    let ports = Ports {
        source: Arc::new(MemSource(Arc::new(Mutex::new(Some(rx))))),
        publisher: publisher.clone(),
        idempotency: idempotency.clone(),
        keys: Arc::new(TwoKeys),
        revocations: Arc::new(NoRevocations),
        assignments: Arc::new(crate::profiles::NoAssignments),
        entitlement: Arc::new(OnPlan(plan.into())),
        quota: ledger.clone(),
        provenance: Arc::new(DisabledProvenance),
        blobs: None,
    };
    let pipeline = Pipeline::start(cfg, ports).await.unwrap();
    let status = pipeline.status();
    until("keys loaded", || status.ready().is_ok()).await;
    Deployment {
        queue,
        publisher,
        idempotency,
        ledger,
        pipeline,
    }
}

impl Deployment {
    /// Publishes job `seq` (requestId `r-<seq>`, tenant acme) on `subject` for `profile`.
    fn submit(&self, seq: u64, subject: &str, profile: &str) {
        let mut body: serde_json::Value =
            serde_json::from_slice(&request_body(&format!("r-{seq}"))).unwrap();
        body["options"] = serde_json::json!({ "profile": profile });
        self.queue
            .tx
            .send(MemDelivery {
                queue: self.queue.clone(),
                subject: subject.into(),
                body: serde_json::to_vec(&body).unwrap(),
                seq,
                delivered: 1,
                published: SystemTime::now(),
            })
            .unwrap();
    }

    /// The result of `r-<seq>`, once the job is acked.
    async fn result(&self, seq: u64) -> (String, serde_json::Value) {
        until("job acked", || acked(&self.queue, seq)).await;
        let id = format!("r-{seq}");
        let results: Vec<OutMessage> = self
            .publisher
            .0
            .lock()
            .unwrap()
            .iter()
            .filter(|m| {
                m.subject.starts_with("sign.") && m.header("Signer-Request-Id") == Some(&id)
            })
            .cloned()
            .collect();
        assert_eq!(results.len(), 1, "one result for {id}");
        let body = serde_json::from_slice(&results[0].body).unwrap();
        (results[0].subject.clone(), body)
    }

    /// The audit events of `r-<seq>`.
    fn audit(&self, seq: u64) -> Vec<serde_json::Value> {
        self.publisher.audit(&format!("r-{seq}"))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_profile_the_plan_may_not_use_is_refused_audited_and_not_charged() {
    let d = start_profiles("team").await;
    d.submit(1, "sign.requests", "multi");
    let (subject, body) = d.result(1).await;
    assert_eq!(subject, "sign.failed", "{body}");
    assert_eq!(body["error"]["code"], "entitlement_denied", "{body}");
    assert_eq!(body["error"]["retryable"], false);
    assert_eq!(
        body["error"]["message"],
        "signing profile \"multi\" is not available on plan \"team\"",
    );
    let events = d.audit(1);
    assert_eq!(events.len(), 1, "{events:?}");
    let e = &events[0];
    assert_eq!(
        (&e["decision"], &e["errorCode"], &e["poe"]["plan"]),
        (
            &serde_json::json!("denied"),
            &serde_json::json!("entitlement_denied"),
            &serde_json::json!("team")
        )
    );
    assert_eq!(e["quota"]["outcome"], "not_checked");
    assert_eq!(e["auth"]["state"], "valid", "decided after authentication");
    assert!(e.get("keys").is_none(), "nothing signed: {e}");
    // not charged, and the requestId was not claimed (no idempotency record)
    assert!(d.ledger.0.lock().unwrap().is_empty());
    assert!(d.idempotency.0.lock().unwrap().is_empty());

    // the open profile is still the tenant's: charged one unit
    d.submit(2, "sign.requests", "default");
    let (subject, body) = d.result(2).await;
    assert_eq!(subject, "sign.completed", "{body}");
    assert_eq!(
        *d.ledger.0.lock().unwrap(),
        vec![("acme".to_string(), "team".to_string(), 1)]
    );
    assert_eq!(d.pipeline.shutdown(Duration::from_secs(5)).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_two_key_profile_is_charged_two_units() {
    let d = start_profiles("enterprise").await;
    d.submit(1, "sign.requests", "multi");
    let (subject, body) = d.result(1).await;
    assert_eq!(subject, "sign.completed", "{body}");
    assert_eq!(body["envelope"]["signatures"].as_array().unwrap().len(), 2);
    d.submit(2, "sign.requests", "default");
    assert_eq!(d.result(2).await.0, "sign.completed");
    assert_eq!(
        *d.ledger.0.lock().unwrap(),
        vec![
            ("acme".to_string(), "enterprise".to_string(), 2),
            ("acme".to_string(), "enterprise".to_string(), 1)
        ]
    );
    assert_eq!(d.audit(1)[0]["quota"]["outcome"], "allowed");
    assert_eq!(d.pipeline.shutdown(Duration::from_secs(5)).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_subject_under_a_tenant_binds_the_job_to_it() {
    let d = start_profiles("team").await;
    // the body names acme
    d.submit(1, "sign.requests.globex.x", "default");
    d.submit(2, "sign.requests.globex", "default");
    d.submit(3, "sign.requests.acme.x.y", "default");
    d.submit(4, "sign.requests", "default");
    d.submit(5, "other.sign.requests.acme", "default");
    for seq in [1, 2, 5] {
        let (subject, body) = d.result(seq).await;
        assert_eq!(subject, "sign.failed", "{body}");
        assert_eq!(body["error"]["code"], "tenant_mismatch", "{body}");
        let events = d.audit(seq);
        assert_eq!(events.len(), 1);
        assert_eq!(events[0]["errorCode"], "tenant_mismatch");
    }
    assert_eq!(
        d.result(1).await.1["error"]["message"],
        "subject names tenant \"globex\", body names \"acme\""
    );
    for seq in [3, 4] {
        assert_eq!(d.result(seq).await.0, "sign.completed");
    }
    // refused before anything was charged
    assert_eq!(d.ledger.0.lock().unwrap().len(), 2);
    assert_eq!(d.pipeline.shutdown(Duration::from_secs(5)).await, 0);
}

/// Counts idempotency claims (otherwise the in-memory store).
#[derive(Default)]
struct CountingIdempotency {
    inner: MemIdempotency,
    claims: Mutex<Vec<String>>,
}

#[async_trait]
impl IdempotencyStore for CountingIdempotency {
    async fn claim(&self, key: &str, owner: &str, lease: Duration) -> Result<Claim, PortError> {
        self.claims.lock().unwrap().push(key.into());
        self.inner.claim(key, owner, lease).await
    }
    async fn record(
        &self,
        key: &str,
        owner: &str,
        outcome: &OutMessage,
    ) -> Result<Recorded, PortError> {
        self.inner.record(key, owner, outcome).await
    }
    async fn complete(&self, key: &str, seq: u64) -> Result<(), PortError> {
        self.inner.complete(key, seq).await
    }
    async fn release(&self, key: &str, owner: &str) -> Result<(), PortError> {
        self.inner.release(key, owner).await
    }
}

/// Counts quota charges; refuses the first `refuse` of them with `quota_exceeded`
/// (`retry_after`), then allows.
struct CountingQuota {
    charges: AtomicUsize,
    refuse: usize,
    retry_after: Duration,
}

#[async_trait]
impl QuotaStore for CountingQuota {
    async fn acquire(
        &self,
        _: &str,
        _: &str,
        _: usize,
        _: u32,
    ) -> Result<QuotaGrant, crate::error::SignerError> {
        let n = self.charges.fetch_add(1, Ordering::SeqCst);
        if n < self.refuse {
            return Err(crate::error::SignerError::QuotaExceeded {
                message: "test: rate".into(),
                retry_after_ms: self.retry_after.as_millis() as u64,
            });
        }
        Ok(QuotaGrant::Allowed)
    }
    async fn release(&self, _: &str, _: &str) {}
}

/// The results (`sign.*`) and audit events (`signer.audit.*`) published so far, as JSON.
fn published_json(publisher: &MemPublisher, prefix: &str) -> Vec<serde_json::Value> {
    let stored = publisher.0.lock().unwrap();
    let mut out = Vec::new();
    for m in stored.iter().filter(|m| m.subject.starts_with(prefix)) {
        match serde_json::from_slice(&m.body).unwrap() {
            serde_json::Value::Array(batch) => out.extend(batch),
            one => out.push(one),
        }
    }
    out
}

/// `request_expired` pipeline: a queue age limit of `limit`, counting quota (refusing the
/// first `refuse` charges) and idempotency stores.
async fn start_expiring(
    limit: Duration,
    refuse: usize,
    retry_after: Duration,
) -> (
    Arc<Queue>,
    Arc<MemPublisher>,
    Pipeline,
    Arc<CountingQuota>,
    Arc<CountingIdempotency>,
) {
    let keys = Arc::new(Keys {
        pkcs8: pkcs8(),
        armed: Arc::new(AtomicBool::new(false)),
        loads: AtomicUsize::new(0),
    });
    let quota = Arc::new(CountingQuota {
        charges: AtomicUsize::new(0),
        refuse,
        retry_after,
    });
    let idem = Arc::new(CountingIdempotency::default());
    let (q, i) = (quota.clone(), idem.clone());
    let (queue, publisher, pipeline) = start_with(keys, "panicky", move |cfg, ports| {
        cfg.max_queue_age = limit;
        cfg.backoff_max = Duration::from_secs(10);
        ports.quota = q;
        ports.idempotency = i;
    })
    .await;
    (queue, publisher, pipeline, quota, idem)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_older_than_the_queue_age_limit_is_refused_unclaimed_and_uncharged() {
    let limit = Duration::from_secs(3600);
    let (queue, publisher, pipeline, quota, idem) = start_expiring(limit, 0, Duration::ZERO).await;
    let now = SystemTime::now();
    submit_published(&queue, 1, now - limit - Duration::from_secs(5));
    until("job 1 acked", || acked(&queue, 1)).await;
    // One just within the limit is signed.
    submit_published(&queue, 2, now - limit + Duration::from_secs(60));
    until("job 2 acked", || acked(&queue, 2)).await;

    let results = published_json(&publisher, "sign.");
    assert_eq!(results.len(), 2, "{results:?}");
    let expired = results.iter().find(|r| r["requestId"] == "r-1").unwrap();
    assert_eq!(expired["error"]["code"], "request_expired", "{expired}");
    assert_eq!(expired["error"]["retryable"], false);
    let signed = results.iter().find(|r| r["requestId"] == "r-2").unwrap();
    assert!(signed["envelope"].is_object(), "{signed}");

    let events = published_json(&publisher, "signer.audit.");
    let event = events.iter().find(|e| e["requestId"] == "r-1").unwrap();
    assert_eq!(
        (&event["decision"], &event["errorCode"]),
        (&"failed".into(), &"request_expired".into()),
        "{event}"
    );
    assert_eq!(event["quota"]["outcome"], "not_checked");
    assert!(expired["audit"]["seq"].as_u64().is_some());

    assert_eq!(
        *idem.claims.lock().unwrap(),
        vec!["acme/r-2".to_string()],
        "the expired job's requestId was never claimed"
    );
    assert_eq!(
        quota.charges.load(Ordering::SeqCst),
        1,
        "only job 2 was charged"
    );
    let settled = queue.settled.lock().unwrap().clone();
    assert_eq!(settled, vec![(1, Settled::Ack), (2, Settled::Ack)]);
    assert_eq!(pipeline.shutdown(Duration::from_secs(5)).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_retried_past_the_queue_age_limit_expires_on_redelivery() {
    // Published 1 s ago with a 4 s limit; the quota refuses the first charge and asks for a
    // 3.5 s wait, so the redelivery comes when the job is at least 4.5 s old. The publish
    // time is the broker's: a redelivery keeps it.
    let limit = Duration::from_secs(4);
    let (queue, publisher, pipeline, quota, idem) =
        start_expiring(limit, 1, Duration::from_millis(3500)).await;
    submit_published(&queue, 1, SystemTime::now() - Duration::from_secs(1));
    until("job 1 NAKed for the quota", || {
        queue.settled.lock().unwrap().contains(&(1, Settled::Nak))
    })
    .await;
    tokio::time::sleep(limit).await;
    until("job 1 acked", || acked(&queue, 1)).await;

    let results = published_json(&publisher, "sign.");
    assert_eq!(results.len(), 1, "{results:?}");
    assert_eq!(
        results[0]["error"]["code"], "request_expired",
        "{}",
        results[0]
    );
    assert_eq!(
        quota.charges.load(Ordering::SeqCst),
        1,
        "charged (refused) once, on delivery 1"
    );
    assert_eq!(
        idem.claims.lock().unwrap().len(),
        1,
        "claimed on delivery 1 only"
    );
    assert_eq!(pipeline.shutdown(Duration::from_secs(5)).await, 0);
}

/// Records the publish time of every job it is asked about; lets every job through.
#[derive(Default)]
struct RecordingEntitlement(Mutex<Vec<SystemTime>>);

#[async_trait]
impl EntitlementVerifier for RecordingEntitlement {
    async fn verify(
        &self,
        input: &GateInput,
        token: Option<&crate::ports::VerifiedToken>,
    ) -> Result<EntitlementVerdict, GateDenial> {
        self.0.lock().unwrap().push(input.published);
        DisabledEntitlement.verify(input, token).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gate_is_given_the_publish_time_on_every_delivery() {
    // Published an hour ago; the key's first signature fails, so the job is redelivered and
    // judged again (more than once while the key reloads).
    let keys = Arc::new(Keys {
        pkcs8: pkcs8(),
        armed: Arc::new(AtomicBool::new(true)),
        loads: AtomicUsize::new(0),
    });
    let gate = Arc::new(RecordingEntitlement::default());
    let g = gate.clone();
    let (queue, _publisher, pipeline) = start_with(keys, "panicky", move |_, ports| {
        ports.entitlement = g;
    })
    .await;
    let published = SystemTime::now() - Duration::from_secs(3600);
    submit_published(&queue, 1, published);
    until("job 1 acked", || acked(&queue, 1)).await;
    let seen = gate.0.lock().unwrap().clone();
    assert!(seen.len() >= 2, "judged on each delivery: {seen:?}");
    assert!(seen.iter().all(|t| *t == published), "{seen:?}");
    assert_eq!(pipeline.shutdown(Duration::from_secs(5)).await, 0);
}

/// Several audit events per message (issue #11).
mod audit_batches;
/// Payloads and results by reference, with the in-memory blob store.
mod blobs;
mod bounded;
/// The job's decisions step by step (issue 9, item 1).
mod steps;

/// Revokes every key it is asked about.
struct RevokeAll;

impl RevocationList for RevokeAll {
    fn revoked(&self, _: &str) -> Option<String> {
        Some("compromised".into())
    }
}

/// A key actor started on its own signs as a pool member does, checks the revocation list
/// first, and answers `Unavailable` once it is gone.
#[tokio::test]
async fn a_standalone_key_actor_signs_and_refuses_revoked_keys() {
    let key = TwoKeys.load("a").await.unwrap();
    let public = key.identity().public_key.clone();
    let pae: Arc<[u8]> = Arc::from(&b"pae bytes"[..]);
    let actor = super::StandaloneKeyActor::spawn(key.clone(), Arc::new(NoRevocations))
        .await
        .unwrap();
    let signature = actor.sign(pae.clone()).await.unwrap();
    assert!(public.verify(&pae, &signature.sig));

    let revoked = super::StandaloneKeyActor::spawn(key, Arc::new(RevokeAll))
        .await
        .unwrap();
    assert!(matches!(
        revoked.sign(pae.clone()).await,
        Err(KeyError::Revoked(m)) if m.contains("compromised")
    ));
    revoked.0.stop_and_wait(None, None).await.unwrap();
    assert!(matches!(
        revoked.sign(pae).await,
        Err(KeyError::Unavailable(_))
    ));
}
