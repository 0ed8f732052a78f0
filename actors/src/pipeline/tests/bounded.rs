//! Failure handling with in-memory ports: a store that refuses for good is answered at once,
//! one that is down is retried within a budget, and no job holds its slot without a deadline.

use std::sync::atomic::AtomicU64;
use std::time::Instant;

use super::*;

/// What the faulty publisher does with one message.
enum Fault {
    /// Store it.
    Pass,
    /// Refuse it with this error.
    Refuse(PortError),
    /// Take it and never acknowledge it.
    Hang,
}

/// Decides the fate of a message from it and its attempt number on its subject (from 1).
type Rule = Box<dyn Fn(&OutMessage, u64) -> Fault + Send + Sync>;

/// A [`MemPublisher`] that refuses what `rule` says, counting every attempt per subject.
struct FaultyPublisher {
    inner: Arc<MemPublisher>,
    rule: Rule,
    attempts: Mutex<HashMap<String, u64>>,
}

impl FaultyPublisher {
    fn new(rule: impl Fn(&OutMessage, u64) -> Fault + Send + Sync + 'static) -> Arc<Self> {
        Arc::new(FaultyPublisher {
            inner: Arc::new(MemPublisher::default()),
            rule: Box::new(rule),
            attempts: Mutex::new(HashMap::new()),
        })
    }

    /// Attempts to publish on subjects starting with `prefix`.
    fn attempts(&self, prefix: &str) -> u64 {
        self.attempts
            .lock()
            .unwrap()
            .iter()
            .filter(|(s, _)| s.starts_with(prefix))
            .map(|(_, n)| n)
            .sum()
    }
}

#[async_trait]
impl MessagePublisher for FaultyPublisher {
    async fn send(&self, message: OutMessage) -> Result<AckFuture, PortError> {
        let n = {
            let mut attempts = self.attempts.lock().unwrap();
            let n = attempts.entry(message.subject.clone()).or_insert(0);
            *n += 1;
            *n
        };
        match (self.rule)(&message, n) {
            Fault::Pass => self.inner.send(message).await,
            Fault::Refuse(e) => Err(e),
            Fault::Hang => Ok(Box::pin(futures::future::pending())),
        }
    }
    async fn fetch_result(&self, seq: u64) -> Result<Option<OutMessage>, PortError> {
        self.inner.fetch_result(seq).await
    }
}

fn too_large(bytes: usize) -> PortError {
    PortError::permanent(MessageTooLarge {
        bytes,
        source: "maximum payload exceeded".into(),
    })
    .context("publish")
}

fn keys() -> Arc<Keys> {
    Arc::new(Keys {
        pkcs8: pkcs8(),
        armed: Arc::new(AtomicBool::new(false)),
        loads: AtomicUsize::new(0),
    })
}

/// A pipeline publishing through `publisher`, with `change` applied to its configuration.
async fn start_faulty(
    publisher: Arc<FaultyPublisher>,
    change: impl FnOnce(&mut PipelineConfig, &mut Ports),
) -> (Arc<Queue>, Pipeline) {
    let (queue, _, pipeline) = start_with(keys(), "panicky", move |cfg, ports| {
        ports.publisher = publisher;
        change(cfg, ports);
    })
    .await;
    (queue, pipeline)
}

fn settled(queue: &Queue, seq: u64) -> Vec<Settled> {
    queue
        .settled
        .lock()
        .unwrap()
        .iter()
        .filter(|(s, _)| *s == seq)
        .map(|(_, how)| how.clone())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signed_result_over_the_brokers_limit_is_answered_payload_too_large_at_once() {
    let publisher = FaultyPublisher::new(|m, _| {
        if m.subject == "sign.completed" {
            Fault::Refuse(too_large(m.body.len()))
        } else {
            Fault::Pass
        }
    });
    let (queue, pipeline) = start_faulty(publisher.clone(), |_, _| {}).await;
    submit(&queue, 1);
    until("job 1 acked", || acked(&queue, 1)).await;
    assert_eq!(
        settled(&queue, 1),
        [Settled::Ack],
        "answered at once, no NAK"
    );
    assert_eq!(publisher.attempts("sign.completed"), 1, "not retried");

    let failed = published_json(&publisher.inner, "sign.failed");
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert_eq!(failed[0]["requestId"], "r-1");
    assert_eq!(failed[0]["error"]["code"], "payload_too_large");
    assert_eq!(failed[0]["error"]["retryable"], false);
    assert!(
        failed[0]["error"]["message"]
            .as_str()
            .unwrap()
            .contains("object store"),
        "{failed:?}"
    );
    // the signature's event, then the refusal's; the result points at the latter
    let events = published_json(&publisher.inner, "signer.audit");
    let decisions: Vec<_> = events.iter().map(|e| e["decision"].clone()).collect();
    assert_eq!(decisions, ["signed", "failed"], "{events:?}");
    assert_eq!(events[1]["errorCode"], "payload_too_large");
    let stored = publisher.inner.0.lock().unwrap().clone();
    let audit_seq = failed[0]["audit"]["seq"].as_u64().unwrap() as usize;
    assert!(stored[audit_seq - 1].subject.starts_with("signer.audit"));
    drop(stored);
    pipeline.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_the_stream_refuses_is_replaced_by_a_compact_internal_one() {
    // The first sign.failed is refused for good (not for its size); the compact one passes.
    let publisher = FaultyPublisher::new(|m, n| {
        if m.subject == "sign.failed" && n == 1 {
            Fault::Refuse(PortError::permanent("stream refuses the message").context("publish"))
        } else {
            Fault::Pass
        }
    });
    let (queue, pipeline) = start_faulty(publisher.clone(), |_, _| {}).await;
    let mut body: serde_json::Value = serde_json::from_slice(&request_body("r-1")).unwrap();
    body["apiVersion"] = "v2".into();
    queue
        .tx
        .send(MemDelivery {
            queue: queue.clone(),
            subject: "sign.requests".into(),
            body: serde_json::to_vec(&body).unwrap(),
            seq: 1,
            delivered: 1,
            published: SystemTime::now(),
        })
        .unwrap();
    until("job 1 acked", || acked(&queue, 1)).await;
    assert_eq!(settled(&queue, 1), [Settled::Ack]);
    let failed = published_json(&publisher.inner, "sign.failed");
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert_eq!(failed[0]["error"]["code"], "internal");
    let events = published_json(&publisher.inner, "signer.audit");
    let codes: Vec<_> = events.iter().map(|e| e["errorCode"].clone()).collect();
    assert_eq!(codes, ["unsupported_api_version", "internal"], "{events:?}");
    pipeline.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_no_result_can_be_stored_for_is_terminated_not_retried_forever() {
    let publisher = FaultyPublisher::new(|m, _| {
        if m.subject.starts_with("sign.") {
            Fault::Refuse(PortError::permanent("stream refuses the message"))
        } else {
            Fault::Pass
        }
    });
    let (queue, pipeline) = start_faulty(publisher.clone(), |_, _| {}).await;
    submit(&queue, 1);
    until("job 1 terminated", || {
        settled(&queue, 1).contains(&Settled::Term)
    })
    .await;
    assert_eq!(settled(&queue, 1), [Settled::Term]);
    // the signed result, the refusal, the compact refusal: each tried once
    assert_eq!(publisher.attempts("sign.completed"), 1);
    assert_eq!(publisher.attempts("sign.failed"), 2);
    assert_eq!(pipeline.status().inflight(), 0, "its slot is free");
    pipeline.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_stays_down_is_retried_within_the_budget_on_the_last_delivery() {
    let down = Arc::new(AtomicBool::new(true));
    let d = down.clone();
    let publisher = FaultyPublisher::new(move |m, _| {
        if d.load(Ordering::SeqCst) && m.subject.starts_with("sign.") {
            Fault::Refuse(PortError::transient("no responders"))
        } else {
            Fault::Pass
        }
    });
    let budget = Duration::from_millis(400);
    let (queue, pipeline) = start_faulty(publisher.clone(), move |cfg, _| {
        cfg.max_deliver = 2;
        cfg.retry_budget = budget;
    })
    .await;
    let started = Instant::now();
    submit(&queue, 1);
    until("job 1 terminated", || {
        settled(&queue, 1).contains(&Settled::Term)
    })
    .await;
    let took = started.elapsed();
    // delivery 1: NAK at the first failure; delivery 2 (the last): retried in process,
    // then terminated when the budget is spent
    assert_eq!(settled(&queue, 1), [Settled::Nak, Settled::Term]);
    let tries = publisher.attempts("sign.completed");
    assert!(tries >= 3, "retried in process: {tries}");
    // (it stops when the next wait would overrun the budget: within one backoff_max of it)
    assert!(took >= budget - Duration::from_millis(100), "{took:?}");
    assert!(took < budget + Duration::from_secs(5), "{took:?}");
    assert_eq!(pipeline.status().inflight(), 0, "its slot is free");
    // the store is back: the next job is signed
    down.store(false, Ordering::SeqCst);
    submit(&queue, 2);
    until("job 2 acked", || acked(&queue, 2)).await;
    pipeline.shutdown(Duration::from_secs(5)).await;
}

/// The job publishes its result through the port itself: an acknowledgement that never
/// comes is bounded by the call timeout, like any store that does not answer; the result
/// recorded before it is published is then published by the redelivery, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_whose_ack_never_comes_is_given_up_at_the_call_timeout() {
    let publisher = FaultyPublisher::new(|m, n| {
        if m.subject.starts_with("sign.completed") && n == 1 {
            Fault::Hang
        } else {
            Fault::Pass
        }
    });
    let (queue, pipeline) = start_faulty(publisher.clone(), |cfg, _| {
        cfg.call_timeout = Duration::from_secs(1);
    })
    .await;
    submit(&queue, 1);
    until("job 1 acked", || acked(&queue, 1)).await;
    assert_eq!(settled(&queue, 1), [Settled::Nak, Settled::Ack]);
    assert_eq!(publisher.attempts("sign.completed"), 2);
    let results = publisher
        .inner
        .0
        .lock()
        .unwrap()
        .iter()
        .filter(|m| m.subject.starts_with("sign."))
        .count();
    assert_eq!(results, 1, "one result stored");
    pipeline.shutdown(Duration::from_secs(5)).await;
}

/// A quota store whose first `hangs` calls never answer.
struct HangingQuota {
    calls: AtomicU64,
    hangs: u64,
}

#[async_trait]
impl QuotaStore for HangingQuota {
    async fn acquire(
        &self,
        _: &str,
        _: &str,
        _: usize,
        _: u32,
    ) -> Result<QuotaGrant, crate::error::SignerError> {
        if self.calls.fetch_add(1, Ordering::SeqCst) < self.hangs {
            futures::future::pending::<()>().await;
        }
        Ok(QuotaGrant::Allowed)
    }
    async fn release(&self, _: &str, _: &str) {}
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_that_hangs_gives_its_slot_back_at_the_job_timeout() {
    let quota = Arc::new(HangingQuota {
        calls: AtomicU64::new(0),
        hangs: 1,
    });
    let q = quota.clone();
    let (queue, _, pipeline) = start_with(keys(), "panicky", move |cfg, ports| {
        cfg.call_timeout = Duration::from_secs(600);
        cfg.job_timeout = Duration::from_millis(300);
        cfg.max_inflight = 1;
        ports.quota = q;
    })
    .await;
    let started = Instant::now();
    submit(&queue, 1);
    until("job 1 acked", || acked(&queue, 1)).await;
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!(
        settled(&queue, 1),
        [Settled::Nak, Settled::Ack],
        "cut off, NAKed, then signed on redelivery"
    );
    assert_eq!(quota.calls.load(Ordering::SeqCst), 2);
    pipeline.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_cuts_off_hanging_jobs_at_the_drain_timeout() {
    let quota = Arc::new(HangingQuota {
        calls: AtomicU64::new(0),
        hangs: u64::MAX,
    });
    let q = quota.clone();
    let (queue, _, pipeline) = start_with(keys(), "panicky", move |cfg, ports| {
        cfg.call_timeout = Duration::from_secs(600);
        ports.quota = q;
    })
    .await;
    for seq in 1..=3 {
        submit(&queue, seq);
    }
    // (the Quota actor sends a bounded number of batches at once: the store sees at least
    // one call, the other jobs wait in the actor)
    until("3 jobs waiting on the quota", || {
        quota.calls.load(Ordering::SeqCst) >= 1 && pipeline.status().inflight() == 3
    })
    .await;
    let started = Instant::now();
    let left = pipeline.shutdown(Duration::from_secs(2)).await;
    let took = started.elapsed();
    assert_eq!(left, 3);
    assert!(took <= Duration::from_millis(2100), "{took:?}");
    for seq in 1..=3 {
        assert_eq!(settled(&queue, seq), [Settled::Nak], "job {seq}");
    }
}
