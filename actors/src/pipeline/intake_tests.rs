//! The Intake's replacement of broken pull streams, and readiness, with in-memory ports: a
//! scripted job source whose streams deliver, fail and end as a test says.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use ring::signature::{Ed25519KeyPair, KeyPair as _};
use tokio::sync::mpsc;

use super::MAX_TRANSIENT_ERRORS;
use crate::keys::{
    KeyAlgorithm, KeyError, KeySignature, KeySigner, KeySource, PublicKey, SignerIdentity,
};
use crate::pipeline::disabled::{DisabledEntitlement, DisabledProvenance, DisabledQuota};
use crate::pipeline::{Pipeline, PipelineConfig, PipelineStatus, Ports};
use crate::ports::*;

/// What a scripted stream does next.
enum Step {
    /// Delivers job `seq` (requestId `r-<seq>`).
    Job(u64),
    /// Reports this error.
    Fail(PortError),
    /// Ends (`None`).
    End,
    /// Waits until the test says go.
    Wait(Arc<tokio::sync::Notify>),
}

/// Jobs acked, by sequence.
type Acks = Arc<Mutex<Vec<u64>>>;

/// Where NAKed jobs come back from (every stream of a [`Source`] reads it once its script is
/// played, as JetStream redelivers to whichever subscription pulls).
type Redeliveries = Arc<tokio::sync::Mutex<mpsc::UnboundedReceiver<Delivered>>>;

struct Delivered {
    seq: u64,
    delivered: u64,
    body: Vec<u8>,
    acks: Acks,
    redeliver: mpsc::UnboundedSender<Delivered>,
}

#[async_trait]
impl Delivery for Delivered {
    fn subject(&self) -> &str {
        "sign.requests"
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
        SystemTime::now()
    }
    async fn ack(&self) -> Result<(), PortError> {
        self.acks.lock().unwrap().push(self.seq);
        Ok(())
    }
    async fn term(&self) -> Result<(), PortError> {
        // settled for good, like an ack (these tests count settled messages)
        self.acks.lock().unwrap().push(self.seq);
        Ok(())
    }
    async fn nak(&self, delay: Duration) -> Result<(), PortError> {
        let again = Delivered {
            seq: self.seq,
            delivered: self.delivered + 1,
            body: self.body.clone(),
            acks: self.acks.clone(),
            redeliver: self.redeliver.clone(),
        };
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let tx = again.redeliver.clone();
            let _ = tx.send(again);
        });
        Ok(())
    }
    async fn in_progress(&self) -> Result<(), PortError> {
        Ok(())
    }
}

/// A stream playing its script, then delivering redeliveries only.
struct Scripted {
    steps: VecDeque<Step>,
    acks: Acks,
    redeliver: mpsc::UnboundedSender<Delivered>,
    redeliveries: Redeliveries,
}

#[async_trait]
impl JobSource for Scripted {
    async fn next(&mut self) -> Option<Result<Box<dyn Delivery>, PortError>> {
        while let Some(Step::Wait(go)) = self.steps.front() {
            go.notified().await;
            self.steps.pop_front();
        }
        match self.steps.pop_front() {
            Some(Step::Job(seq)) => Some(Ok(Box::new(Delivered {
                seq,
                delivered: 1,
                body: request_body(&format!("r-{seq}")),
                acks: self.acks.clone(),
                redeliver: self.redeliver.clone(),
            }))),
            Some(Step::Fail(e)) => Some(Err(e)),
            Some(Step::End) => None,
            Some(Step::Wait(_)) => unreachable!("waited for above"),
            None => {
                let again = self.redeliveries.lock().await.recv().await?;
                Some(Ok(Box::new(again)))
            }
        }
    }
}

/// Hands out one scripted stream per `open`, in order; fails every `open` while `refuse`
/// is set (a server that does not answer yet).
struct Source {
    streams: Mutex<VecDeque<Vec<Step>>>,
    refuse: AtomicBool,
    opened: AtomicUsize,
    acks: Acks,
    redeliver: mpsc::UnboundedSender<Delivered>,
    redeliveries: Redeliveries,
}

impl Source {
    fn new(streams: Vec<Vec<Step>>) -> Arc<Source> {
        let (redeliver, rx) = mpsc::unbounded_channel();
        Arc::new(Source {
            streams: Mutex::new(streams.into()),
            refuse: AtomicBool::new(false),
            opened: AtomicUsize::new(0),
            acks: Acks::default(),
            redeliver,
            redeliveries: Arc::new(tokio::sync::Mutex::new(rx)),
        })
    }

    fn opened(&self) -> usize {
        self.opened.load(Ordering::SeqCst)
    }

    fn acked(&self, seq: u64) -> bool {
        self.acks.lock().unwrap().contains(&seq)
    }
}

#[async_trait]
impl JobSourceFactory for Source {
    async fn open(&self) -> Result<Box<dyn JobSource>, PortError> {
        if self.refuse.load(Ordering::SeqCst) {
            return Err(PortError::transient("no responders").context("consumer lookup"));
        }
        let steps = self.streams.lock().unwrap().pop_front().unwrap_or_default();
        self.opened.fetch_add(1, Ordering::SeqCst);
        Ok(Box::new(Scripted {
            steps: steps.into(),
            acks: self.acks.clone(),
            redeliver: self.redeliver.clone(),
            redeliveries: self.redeliveries.clone(),
        }))
    }
}

/// Stores every message, except that sends to subjects starting with `refuse` fail with a
/// transient error while it is set.
#[derive(Default)]
struct Publisher {
    stored: Mutex<Vec<OutMessage>>,
    refuse: Mutex<Option<String>>,
}

#[async_trait]
impl MessagePublisher for Publisher {
    async fn send(&self, message: OutMessage) -> Result<AckFuture, PortError> {
        if let Some(prefix) = self.refuse.lock().unwrap().as_deref()
            && message.subject.starts_with(prefix)
        {
            return Err(PortError::transient("no responders").context("publish"));
        }
        let mut stored = self.stored.lock().unwrap();
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
        Ok(self.stored.lock().unwrap().get(seq as usize - 1).cloned())
    }
}

#[derive(Default)]
struct Idempotency(Mutex<HashMap<String, u64>>);

#[async_trait]
impl IdempotencyStore for Idempotency {
    async fn claim(&self, key: &str, _: &str, _: Duration) -> Result<Claim, PortError> {
        Ok(match self.0.lock().unwrap().get(key) {
            Some(seq) => Claim::Done {
                result_sequence: *seq,
            },
            None => Claim::Acquired,
        })
    }
    async fn record(&self, _: &str, _: &str, _: &OutMessage) -> Result<Recorded, PortError> {
        Ok(Recorded::Kept)
    }
    async fn complete(&self, key: &str, seq: u64) -> Result<(), PortError> {
        self.0.lock().unwrap().insert(key.into(), seq);
        Ok(())
    }
    async fn release(&self, _: &str, _: &str) -> Result<(), PortError> {
        Ok(())
    }
}

struct Key {
    pair: Ed25519KeyPair,
    identity: Arc<SignerIdentity>,
}

#[async_trait]
impl KeySigner for Key {
    fn name(&self) -> &str {
        "k"
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

struct Keys(Vec<u8>);

#[async_trait]
impl KeyFactory for Keys {
    fn names(&self) -> Vec<String> {
        vec!["k".into()]
    }
    async fn load(&self, _: &str) -> Result<Arc<dyn KeySigner>, KeyError> {
        let pair = Ed25519KeyPair::from_pkcs8(&self.0)
            .map_err(|e| KeyError::Unavailable(e.to_string()))?;
        let public = PublicKey::from_raw(KeyAlgorithm::Ed25519, pair.public_key().as_ref())
            .map_err(|e| KeyError::Unavailable(e.to_string()))?;
        Ok(Arc::new(Key {
            pair,
            identity: Arc::new(SignerIdentity::keyful(public, KeySource::File)),
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

/// A pipeline over `source` and in-memory ports whose `default` profile signs with `k`.
async fn start(source: Arc<Source>, publisher: Arc<Publisher>) -> Pipeline {
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new())
        .unwrap()
        .as_ref()
        .to_vec();
    let mut cfg = PipelineConfig::new(
        "intake-test",
        HashMap::from([("default".to_string(), vec!["k".to_string()])]),
    );
    cfg.backoff_base = Duration::from_millis(10);
    cfg.backoff_max = Duration::from_millis(50);
    // retried until the test lets a store recover, never answered as a last delivery
    cfg.max_deliver = 10_000;
    let ports = Ports {
        source,
        publisher,
        idempotency: Arc::new(Idempotency::default()),
        keys: Arc::new(Keys(pkcs8)),
        revocations: Arc::new(NoRevocations),
        assignments: Arc::new(crate::profiles::NoAssignments),
        entitlement: Arc::new(DisabledEntitlement),
        quota: Arc::new(DisabledQuota),
        provenance: Arc::new(DisabledProvenance),
        blobs: None,
    };
    Pipeline::start(cfg, ports).await.unwrap()
}

/// Waits until `cond` holds, for up to 20 s.
async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The readiness text: `"ready"` or the reasons.
fn readiness(status: &PipelineStatus) -> String {
    match status.ready() {
        Ok(()) => "ready".into(),
        Err(not_ready) => not_ready.to_string(),
    }
}

fn broken(what: &str) -> Step {
    Step::Fail(PortError::permanent(what.to_string()).context("pull stream broken"))
}

fn hiccup() -> Step {
    Step::Fail(PortError::transient("pull request failed").context("pulling"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_reports_a_broken_subscription_is_replaced_and_the_new_one_delivers() {
    let source = Source::new(vec![
        vec![Step::Job(1), broken("missed idle heartbeat")],
        vec![Step::Job(2)],
    ]);
    let pipeline = start(source.clone(), Arc::default()).await;
    until("job 1 acked", || source.acked(1)).await;
    until("job 2, from the new stream, acked", || source.acked(2)).await;
    assert_eq!(source.opened(), 2);
    let status = pipeline.status();
    until("ready", || status.ready().is_ok()).await;
    pipeline.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_errors_keep_the_stream_until_too_many_come_in_a_row() {
    assert_eq!(MAX_TRANSIENT_ERRORS, 3, "the script below assumes 3");
    let source = Source::new(vec![
        vec![
            hiccup(),
            Step::Job(1),
            hiccup(),
            hiccup(),
            Step::Job(2),
            hiccup(),
            hiccup(),
            hiccup(),
        ],
        vec![Step::Job(3)],
    ]);
    let pipeline = start(source.clone(), Arc::default()).await;
    until("jobs 1 and 2 acked", || source.acked(1) && source.acked(2)).await;
    until("job 3 acked", || source.acked(3)).await;
    assert_eq!(
        source.opened(),
        2,
        "isolated errors are retried on the same stream; three in a row replace it"
    );
    pipeline.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_ends_is_reopened_without_restarting_the_intake() {
    let source = Source::new(vec![vec![Step::Job(1), Step::End], vec![Step::Job(2)]]);
    let pipeline = start(source.clone(), Arc::default()).await;
    until("job 2 acked", || source.acked(1) && source.acked(2)).await;
    assert_eq!(source.opened(), 2);
    pipeline.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_says_why_while_the_source_cannot_be_opened_and_recovers_by_itself() {
    let go = Arc::new(tokio::sync::Notify::new());
    let source = Source::new(vec![
        vec![Step::Wait(go.clone()), broken("consumer deleted")],
        vec![Step::Job(1)],
    ]);
    source.refuse.store(true, Ordering::SeqCst);
    let pipeline = start(source.clone(), Arc::default()).await;
    let status = pipeline.status();
    until("not open at startup, with the error", || {
        readiness(&status)
            .contains("job source not open: attempt 1 failed: consumer lookup: no responders")
    })
    .await;

    // opens; then breaks, and cannot be reopened
    source.refuse.store(false, Ordering::SeqCst);
    until("opened and ready", || readiness(&status) == "ready").await;
    assert_eq!(source.opened(), 1);
    source.refuse.store(true, Ordering::SeqCst);
    go.notify_one();
    until("reopening, with the reasons", || {
        let text = readiness(&status);
        text.contains(
            "job source broken (pull stream broken: consumer deleted); reopening: attempt ",
        ) && text.contains("failed: consumer lookup: no responders")
    })
    .await;
    assert!(!source.acked(1));

    // the server answers again: reopened, ready, and the new stream's job is signed
    source.refuse.store(false, Ordering::SeqCst);
    until("job 1 acked", || source.acked(1)).await;
    until("ready again", || readiness(&status) == "ready").await;
    assert_eq!(source.opened(), 2);
    pipeline.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_fails_makes_the_replica_not_ready_until_it_takes_a_write_again() {
    let source = Source::new(vec![vec![Step::Job(1)]]);
    let publisher = Arc::new(Publisher::default());
    *publisher.refuse.lock().unwrap() = Some("sign.".into());
    let pipeline = start(source.clone(), publisher.clone()).await;
    let status = pipeline.status();
    until("results not stored", || {
        readiness(&status).contains("results not stored: publish: no responders (")
    })
    .await;
    assert!(
        !source.acked(1),
        "not acked while its result cannot be stored"
    );

    // the results stream takes writes again: the retried job is stored, and the replica ready
    *publisher.refuse.lock().unwrap() = None;
    until("job 1 acked", || source.acked(1)).await;
    until("ready again", || readiness(&status) == "ready").await;

    pipeline.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_is_the_only_reason_given_once_shutdown_began() {
    let source = Source::new(vec![vec![]]);
    let pipeline = start(source.clone(), Arc::default()).await;
    let status = pipeline.status();
    until("ready", || status.ready().is_ok()).await;
    pipeline.shutdown(Duration::from_secs(5)).await;
    assert_eq!(readiness(&status), "draining");
}
