//! The supervision tree with in-memory ports: what happens when an actor dies mid-job.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use ring::signature::{Ed25519KeyPair, KeyPair as _};
use tokio::sync::mpsc;

use super::disabled::{DisabledEntitlement, DisabledProvenance, DisabledQuota};
use super::{Pipeline, PipelineConfig, Ports};
use crate::keys::{
    KeyAlgorithm, KeyError, KeySignature, KeySigner, KeySource, PublicKey, SignerIdentity,
};
use crate::ports::*;

#[derive(Debug, Clone, PartialEq)]
enum Settled {
    Ack,
    Nak,
}

/// A JetStream stand-in: NAKed messages come back with `delivered + 1`.
struct Queue {
    tx: mpsc::UnboundedSender<MemDelivery>,
    settled: Mutex<Vec<(u64, Settled)>>,
}

struct MemDelivery {
    queue: Arc<Queue>,
    body: Vec<u8>,
    seq: u64,
    delivered: u64,
}

#[async_trait]
impl Delivery for MemDelivery {
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
    async fn nak(&self, delay: Duration) -> Result<(), PortError> {
        self.queue
            .settled
            .lock()
            .unwrap()
            .push((self.seq, Settled::Nak));
        let again = MemDelivery {
            queue: self.queue.clone(),
            body: self.body.clone(),
            seq: self.seq,
            delivered: self.delivered + 1,
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
            .ok_or(PortError("already open".into()))?;
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

#[derive(Default)]
struct MemIdempotency(Mutex<HashMap<String, u64>>);

#[async_trait]
impl IdempotencyStore for MemIdempotency {
    async fn claim(&self, key: &str, _: &str, _: Duration) -> Result<Claim, PortError> {
        Ok(match self.0.lock().unwrap().get(key) {
            Some(seq) => Claim::Done {
                result_sequence: *seq,
            },
            None => Claim::Acquired,
        })
    }
    async fn complete(&self, key: &str, seq: u64) -> Result<(), PortError> {
        self.0.lock().unwrap().insert(key.into(), seq);
        Ok(())
    }
    async fn release(&self, _: &str, _: &str) -> Result<(), PortError> {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_actor_that_dies_is_restarted_and_its_job_redelivered() {
    let (tx, rx) = mpsc::unbounded_channel();
    let queue = Arc::new(Queue {
        tx,
        settled: Mutex::new(Vec::new()),
    });
    let publisher = Arc::new(MemPublisher::default());
    let rng = ring::rand::SystemRandom::new();
    let keys = Arc::new(Keys {
        pkcs8: Ed25519KeyPair::generate_pkcs8(&rng)
            .unwrap()
            .as_ref()
            .to_vec(),
        armed: Arc::new(AtomicBool::new(true)),
        loads: AtomicUsize::new(0),
    });
    let mut cfg = PipelineConfig::new(
        "test-worker",
        HashMap::from([("default".to_string(), vec!["panicky".to_string()])]),
    );
    cfg.backoff_base = Duration::from_millis(10);
    cfg.backoff_max = Duration::from_millis(100);
    let ports = Ports {
        source: Arc::new(MemSource(Arc::new(Mutex::new(Some(rx))))),
        publisher: publisher.clone(),
        idempotency: Arc::new(MemIdempotency::default()),
        keys: keys.clone(),
        revocations: Arc::new(NoRevocations),
        entitlement: Arc::new(DisabledEntitlement),
        quota: Arc::new(DisabledQuota),
        provenance: Arc::new(DisabledProvenance),
    };
    let pipeline = Pipeline::start(cfg, ports).await.unwrap();
    queue
        .tx
        .send(MemDelivery {
            queue: queue.clone(),
            body: request_body("r-1"),
            seq: 1,
            delivered: 1,
        })
        .unwrap();

    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !queue.settled.lock().unwrap().contains(&(1, Settled::Ack)) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "never acked: {:?}",
            queue.settled.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
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
