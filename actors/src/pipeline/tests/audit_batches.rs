//! The AuditWriter stores several events per message (issue #11): batches by time and
//! count, one subject per message, split below the size limit, and a batch the stream
//! refuses for good sent again event by event; every event verifies as if alone.

use super::*;
use crate::audit::{AuditEvent, AuditKind, ChainVerifier, Decision, decode_message};
use crate::pipeline::StandaloneAuditWriter;

fn event(tenant: &str, decision: Decision, i: usize) -> AuditEvent {
    AuditEvent {
        version: 1,
        time: "2026-11-29T00:00:00Z".into(),
        worker: String::new(),
        writer_seq: 0,
        request_id: format!("r-{i}"),
        tenant: tenant.into(),
        kind: AuditKind::Dsse,
        caller: None,
        subjects: vec![],
        subjects_omitted: None,
        auth: None,
        poe: None,
        quota: None,
        provenance: None,
        keys: vec![],
        control: None,
        predicate_type: None,
        policy: None,
        decision,
        error_code: None,
        trace_id: None,
        prev_hash: String::new(),
        hash: String::new(),
    }
}

async fn writer(
    publisher: Arc<dyn MessagePublisher>,
    edit: impl FnOnce(&mut PipelineConfig),
) -> StandaloneAuditWriter {
    let mut cfg = PipelineConfig::new("w", crate::profiles::ProfileTable::default());
    edit(&mut cfg);
    StandaloneAuditWriter::spawn(&cfg, publisher).await.unwrap()
}

/// Appends `events` at once, from as many tasks; their stream sequences by requestId.
async fn append_all(
    w: &Arc<StandaloneAuditWriter>,
    events: Vec<AuditEvent>,
) -> HashMap<String, u64> {
    let tasks: Vec<_> = events
        .into_iter()
        .map(|e| {
            let w = w.clone();
            tokio::spawn(async move { (e.request_id.clone(), w.append(e).await) })
        })
        .collect();
    let mut seqs = HashMap::new();
    for t in tasks {
        let (id, seq) = t.await.unwrap();
        seqs.insert(id, seq.unwrap());
    }
    seqs
}

/// Every stored event in stream order checks out, as one chain.
fn verify_stream(messages: &[OutMessage]) -> usize {
    let mut v = ChainVerifier::default();
    for m in messages {
        for e in decode_message(&m.body).unwrap() {
            v.push(&e).unwrap();
        }
    }
    assert_eq!(v.writers(), 1);
    v.checked()
}

const TENANTS: [&str; 2] = ["acme", "globex"];
const DECISIONS: [Decision; 2] = [Decision::Signed, Decision::Denied];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appends_share_messages_of_one_subject_and_each_event_verifies() {
    let publisher = Arc::new(MemPublisher::default());
    let w = Arc::new(
        writer(publisher.clone(), |cfg| {
            cfg.audit_flush_interval = Duration::from_millis(20);
        })
        .await,
    );
    let events = (0..64)
        .map(|i| event(TENANTS[i % 2], DECISIONS[(i / 2) % 2], i))
        .collect();
    let seqs = append_all(&w, events).await;
    let stored = publisher.0.lock().unwrap().clone();
    assert!(stored.len() < 64, "batched: {} messages", stored.len());
    assert_eq!(verify_stream(&stored), 64);
    let mut batched = 0;
    for (i, m) in stored.iter().enumerate() {
        let events = decode_message(&m.body).unwrap();
        batched += usize::from(events.len() > 1);
        assert_eq!(
            m.body.first() == Some(&b'['),
            events.len() > 1,
            "a lone event is an object"
        );
        for e in &events {
            let subject = format!(
                "signer.audit.{}.{}",
                e["tenant"].as_str().unwrap(),
                e["decision"].as_str().unwrap()
            );
            assert_eq!(m.subject, subject, "one subject per message");
            let id = e["requestId"].as_str().unwrap();
            assert_eq!(
                seqs[id],
                i as u64 + 1,
                "{id}: answered with its message's sequence"
            );
        }
        assert_eq!(
            m.header("Nats-Msg-Id"),
            events.last().unwrap()["hash"].as_str(),
            "the id is the last event's hash"
        );
    }
    assert!(batched > 0, "some message holds several events");
    Arc::into_inner(w).unwrap().stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_is_split_to_stay_under_the_message_size_limit_and_the_count() {
    let publisher = Arc::new(MemPublisher::default());
    let one = serde_json::to_vec(
        &crate::audit::AuditChain::new("w-w0")
            .seal(event("acme", Decision::Signed, 10))
            .unwrap(),
    )
    .unwrap()
    .len();
    let limit = one * 3 + one / 2;
    let w = Arc::new(
        writer(publisher.clone(), |cfg| {
            cfg.audit_flush_interval = Duration::from_millis(50);
            cfg.audit_max_message_bytes = limit;
            cfg.audit_batch_max = 5;
        })
        .await,
    );
    append_all(
        &w,
        (10..40)
            .map(|i| event("acme", Decision::Signed, i))
            .collect(),
    )
    .await;
    let stored = publisher.0.lock().unwrap().clone();
    assert_eq!(verify_stream(&stored), 30);
    assert!(
        stored.iter().all(|m| m.body.len() <= limit),
        "every body within {limit} bytes"
    );
    assert!(
        stored
            .iter()
            .any(|m| decode_message(&m.body).unwrap().len() == 3),
        "filled up to the limit"
    );
    Arc::into_inner(w).unwrap().stop().await;

    // the count bound alone
    let publisher = Arc::new(MemPublisher::default());
    let w = Arc::new(
        writer(publisher.clone(), |cfg| {
            cfg.audit_flush_interval = Duration::from_millis(50);
            cfg.audit_batch_max = 4;
        })
        .await,
    );
    append_all(
        &w,
        (0..20)
            .map(|i| event("acme", Decision::Signed, i))
            .collect(),
    )
    .await;
    let stored = publisher.0.lock().unwrap().clone();
    assert_eq!(verify_stream(&stored), 20);
    let sizes: Vec<_> = stored
        .iter()
        .map(|m| decode_message(&m.body).unwrap().len())
        .collect();
    assert!(sizes.iter().all(|&n| n <= 4), "{sizes:?}");
    assert!(sizes.contains(&4), "{sizes:?}");
    Arc::into_inner(w).unwrap().stop().await;
}

/// Refuses every batch for good (as a stream with a smaller maximum message size than the
/// server's would), stores lone events.
#[derive(Default)]
struct RefusesBatches {
    inner: MemPublisher,
    refused: AtomicUsize,
}

#[async_trait]
impl MessagePublisher for RefusesBatches {
    async fn send(&self, message: OutMessage) -> Result<AckFuture, PortError> {
        if message.body.first() == Some(&b'[') {
            self.refused.fetch_add(1, Ordering::SeqCst);
            return Ok(Box::pin(async {
                Err(PortError::permanent("maximum message size exceeded"))
            }));
        }
        self.inner.send(message).await
    }
    async fn fetch_result(&self, _: u64) -> Result<Option<OutMessage>, PortError> {
        Ok(None)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_refused_for_good_is_sent_again_event_by_event_on_the_same_chain() {
    let publisher = Arc::new(RefusesBatches::default());
    let w = Arc::new(
        writer(publisher.clone(), |cfg| {
            cfg.audit_flush_interval = Duration::from_millis(30);
        })
        .await,
    );
    let seqs = append_all(
        &w,
        (0..12)
            .map(|i| event("acme", Decision::Signed, i))
            .collect(),
    )
    .await;
    assert!(
        publisher.refused.load(Ordering::SeqCst) > 0,
        "a batch was tried"
    );
    let stored = publisher.inner.0.lock().unwrap().clone();
    assert_eq!(stored.len(), 12, "every event stored alone");
    assert_eq!(verify_stream(&stored), 12, "on one chain, without a gap");
    let mut answered: Vec<_> = seqs.values().copied().collect();
    answered.sort();
    assert_eq!(answered, (1..=12).collect::<Vec<_>>());
    Arc::into_inner(w).unwrap().stop().await;
}
