//! A job is signed once (issue 9, item 6), with in-memory ports: two copies of a request at
//! once, a result publish that fails after signing, audit writes that fail.

use super::*;

/// A stand-in for JetStream streams: keeps what it stores, drops a message whose
/// `Nats-Msg-Id` it already has (answering with the first copy's sequence, as a stream's
/// duplicate window does), and fails acknowledgements on request.
#[derive(Default)]
struct StreamPublisher {
    stored: Arc<Mutex<Vec<OutMessage>>>,
    /// Acknowledgements of `sign.completed` messages to fail (not stored).
    fail_results: AtomicUsize,
    /// How long the audit stream refuses events (not stored), from the first one sent:
    /// an outage, as while a stream elects a new leader.
    audit_outage: Duration,
    audit_outage_from: Mutex<Option<std::time::Instant>>,
    /// Audit events to store whose acknowledgement is then lost.
    lose_audit_acks: AtomicUsize,
    /// Audit events whose acknowledgement waits `audit_hold`, then stores them: a stream
    /// electing a leader while the publish is in flight.
    hold_audit: AtomicUsize,
    audit_hold: Duration,
    /// The request whose `signed` audit event the stream refuses for good.
    refuse_signed_event_of: Option<&'static str>,
    /// The lone events refused for good that way (a batch holding one is refused too).
    refused_for_good: Mutex<Vec<serde_json::Value>>,
    /// Audit events sent (stored or not).
    audit_sends: AtomicUsize,
}

/// Takes one from `counter` if it is above zero.
fn take(counter: &AtomicUsize) -> bool {
    counter
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
}

/// Stores `message` unless its `Nats-Msg-Id` is stored already (then answers with the
/// first copy's sequence).
fn store_into(stored: &Mutex<Vec<OutMessage>>, message: OutMessage) -> Stored {
    let mut stored = stored.lock().unwrap();
    let id = message.header("Nats-Msg-Id").map(str::to_owned);
    if let Some(i) = stored
        .iter()
        .position(|m| id.is_some() && m.header("Nats-Msg-Id") == id.as_deref())
    {
        return Stored {
            stream_sequence: i as u64 + 1,
            duplicate: true,
        };
    }
    stored.push(message);
    Stored {
        stream_sequence: stored.len() as u64,
        duplicate: false,
    }
}

impl StreamPublisher {
    /// Whether the audit stream is in its outage now.
    fn audit_out(&self) -> bool {
        let mut from = self.audit_outage_from.lock().unwrap();
        from.get_or_insert_with(std::time::Instant::now).elapsed() < self.audit_outage
    }

    fn store(&self, message: OutMessage) -> Stored {
        store_into(&self.stored, message)
    }

    /// What is stored under `prefix`, one value per result or audit event (the events of
    /// a batch in order).
    fn json(&self, prefix: &str) -> Vec<serde_json::Value> {
        self.stored
            .lock()
            .unwrap()
            .iter()
            .filter(|m| m.subject.starts_with(prefix))
            .flat_map(|m| crate::audit::decode_message(&m.body).unwrap())
            .collect()
    }

    /// The stored `signed` audit events of `request_id`.
    fn signed_events(&self, request_id: &str) -> Vec<serde_json::Value> {
        self.json("signer.audit.")
            .into_iter()
            .filter(|e| e["requestId"] == request_id && e["decision"] == "signed")
            .collect()
    }
}

#[async_trait]
impl MessagePublisher for StreamPublisher {
    async fn send(&self, message: OutMessage) -> Result<AckFuture, PortError> {
        let unavailable = || PortError::transient("no stream found for given subject");
        let audit = message.subject.starts_with("signer.audit.");
        if audit {
            self.audit_sends.fetch_add(1, Ordering::SeqCst);
        }
        let refused = (message.subject.starts_with("sign.completed") && take(&self.fail_results))
            || (audit && self.audit_out());
        if audit
            && !refused
            && let Some(request_id) = self.refuse_signed_event_of
        {
            // (the whole message, when the event is in a batch)
            let events = crate::audit::decode_message(&message.body).unwrap();
            if events
                .iter()
                .any(|e| e["requestId"] == request_id && e["decision"] == "signed")
            {
                if let [event] = events.as_slice() {
                    self.refused_for_good.lock().unwrap().push(event.clone());
                }
                return Err(PortError::permanent("maximum message size exceeded"));
            }
        }
        if audit && !refused && take(&self.hold_audit) {
            let (stored, hold) = (self.stored.clone(), self.audit_hold);
            return Ok(Box::pin(async move {
                tokio::time::sleep(hold).await;
                Ok(store_into(&stored, message))
            }));
        }
        let outcome = if refused {
            Err(unavailable())
        } else if message.subject.starts_with("signer.audit.") && take(&self.lose_audit_acks) {
            self.store(message);
            Err(PortError::transient("timed out waiting for the ack"))
        } else {
            Ok(self.store(message))
        };
        Ok(Box::pin(async move { outcome }))
    }
    async fn fetch_result(&self, seq: u64) -> Result<Option<OutMessage>, PortError> {
        Ok(self.stored.lock().unwrap().get(seq as usize - 1).cloned())
    }
}

/// An Ed25519 key `k` that counts its signatures and takes `delay` for each.
struct CountingKeys {
    signs: Arc<AtomicUsize>,
    delay: Duration,
}

struct CountingKey {
    inner: EdKey,
    signs: Arc<AtomicUsize>,
    delay: Duration,
}

#[async_trait]
impl KeySigner for CountingKey {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn identity(&self) -> Arc<SignerIdentity> {
        self.inner.identity()
    }
    async fn sign(&self, message: &[u8]) -> Result<KeySignature, KeyError> {
        self.signs.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(self.delay).await;
        self.inner.sign(message).await
    }
}

#[async_trait]
impl KeyFactory for CountingKeys {
    fn names(&self) -> Vec<String> {
        vec!["k".into()]
    }
    async fn load(&self, name: &str) -> Result<Arc<dyn KeySigner>, KeyError> {
        let pair = Ed25519KeyPair::from_pkcs8(&pkcs8())
            .map_err(|e| KeyError::Unavailable(e.to_string()))?;
        let public =
            PublicKey::from_raw(KeyAlgorithm::Ed25519, pair.public_key().as_ref()).unwrap();
        Ok(Arc::new(CountingKey {
            inner: EdKey {
                name: name.into(),
                pair,
                identity: Arc::new(SignerIdentity::keyful(public, KeySource::File)),
            },
            signs: self.signs.clone(),
            delay: self.delay,
        }))
    }
}

struct Once {
    queue: Arc<Queue>,
    publisher: Arc<StreamPublisher>,
    idempotency: Arc<MemIdempotency>,
    ledger: Arc<Ledger>,
    signs: Arc<AtomicUsize>,
    pipeline: Pipeline,
}

/// A pipeline signing with the counting key (each signature taking `delay`), charging the
/// ledger, storing into `publisher`.
async fn start_once(publisher: StreamPublisher, delay: Duration) -> Once {
    start_once_with(publisher, delay, |_| {}).await
}

/// The same, with `change` applied to the configuration.
async fn start_once_with(
    publisher: StreamPublisher,
    delay: Duration,
    change: impl FnOnce(&mut PipelineConfig),
) -> Once {
    let signs = Arc::new(AtomicUsize::new(0));
    let keys = Arc::new(CountingKeys {
        signs: signs.clone(),
        delay,
    });
    let publisher = Arc::new(publisher);
    let idempotency = Arc::new(MemIdempotency::default());
    let ledger = Arc::new(Ledger::default());
    let (p, i, l) = (publisher.clone(), idempotency.clone(), ledger.clone());
    let (queue, _unused, pipeline) = start_with(keys, "k", move |cfg, ports| {
        change(cfg);
        ports.publisher = p;
        ports.idempotency = i;
        ports.quota = l;
    })
    .await;
    let status = pipeline.status();
    until("keys loaded", || status.ready().is_ok()).await;
    Once {
        queue,
        publisher,
        idempotency,
        ledger,
        signs,
        pipeline,
    }
}

impl Once {
    /// Delivers a message with stream sequence `seq` whose body is request `request_id`.
    fn deliver(&self, seq: u64, request_id: &str) {
        self.queue
            .tx
            .send(MemDelivery {
                queue: self.queue.clone(),
                subject: "sign.requests".into(),
                body: request_body(request_id),
                seq,
                delivered: 1,
                published: SystemTime::now(),
            })
            .unwrap();
    }

    fn results(&self, request_id: &str) -> Vec<serde_json::Value> {
        self.publisher
            .json("sign.")
            .into_iter()
            .filter(|r| r["requestId"] == request_id)
            .collect()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_result_publish_after_signing_republishes_the_recorded_outcome() {
    let publisher = StreamPublisher::default();
    publisher.fail_results.store(1, Ordering::SeqCst);
    let o = start_once(publisher, Duration::ZERO).await;
    o.deliver(1, "r-1");
    until("job acked", || acked(&o.queue, 1)).await;

    let settled = o.queue.settled.lock().unwrap().clone();
    assert_eq!(
        settled,
        vec![(1, Settled::Nak), (1, Settled::Ack)],
        "NAKed after the failed publish, then answered"
    );
    assert_eq!(o.signs.load(Ordering::SeqCst), 1, "signed once");
    assert_eq!(o.ledger.0.lock().unwrap().len(), 1, "charged once");
    let signed = o.publisher.signed_events("r-1");
    assert_eq!(signed.len(), 1, "one signed audit event: {signed:?}");
    let results = o.results("r-1");
    assert_eq!(results.len(), 1, "{results:?}");
    let result = &results[0];
    assert!(result["envelope"].is_object(), "{result}");
    // The republished result is the recorded one: it points at the one signed event.
    let audit_seq = result["audit"]["seq"].as_u64().unwrap();
    let stored = o.publisher.stored.lock().unwrap()[audit_seq as usize - 1].clone();
    let event: serde_json::Value = serde_json::from_slice(&stored.body).unwrap();
    assert_eq!(event, signed[0]);
    assert!(matches!(
        o.idempotency.0.lock().unwrap().get("acme/r-1"),
        Some(MemRecord::Done(_))
    ));
    assert_eq!(o.pipeline.shutdown(Duration::from_secs(5)).await, 0);
}

/// The idempotency store with its `record` down (as while its bucket elects a leader):
/// claims, completions and releases pass to `inner`.
struct RecordDown(Arc<MemIdempotency>);

#[async_trait]
impl IdempotencyStore for RecordDown {
    async fn claim(&self, key: &str, owner: &str, lease: Duration) -> Result<Claim, PortError> {
        self.0.claim(key, owner, lease).await
    }
    async fn record(&self, _: &str, _: &str, _: &OutMessage) -> Result<Recorded, PortError> {
        Err(PortError::transient("no responders"))
    }
    async fn complete(&self, key: &str, seq: u64) -> Result<(), PortError> {
        self.0.complete(key, seq).await
    }
    async fn release(&self, key: &str, owner: &str) -> Result<(), PortError> {
        self.0.release(key, owner).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signed_result_that_is_not_recorded_is_retried_here_not_redelivered() {
    // The record cannot be written and the first two result publishes fail: the signed
    // result exists only in this job, so the job keeps it and retries, instead of a NAK
    // whose redelivery would find no record and sign again once the lease expired.
    let signs = Arc::new(AtomicUsize::new(0));
    let keys = Arc::new(CountingKeys {
        signs: signs.clone(),
        delay: Duration::ZERO,
    });
    let publisher = Arc::new(StreamPublisher::default());
    publisher.fail_results.store(2, Ordering::SeqCst);
    let records = Arc::new(MemIdempotency::default());
    let (p, r) = (publisher.clone(), records.clone());
    let (queue, _unused, pipeline) = start_with(keys, "k", move |cfg, ports| {
        cfg.call_timeout = Duration::from_millis(200);
        ports.publisher = p;
        ports.idempotency = Arc::new(RecordDown(r));
    })
    .await;
    let status = pipeline.status();
    until("keys loaded", || status.ready().is_ok()).await;
    queue
        .tx
        .send(MemDelivery {
            queue: queue.clone(),
            subject: "sign.requests".into(),
            body: request_body("r-1"),
            seq: 1,
            delivered: 1,
            published: SystemTime::now(),
        })
        .unwrap();
    until("job acked", || acked(&queue, 1)).await;
    assert_eq!(publisher.fail_results.load(Ordering::SeqCst), 0);
    let settled = queue.settled.lock().unwrap().clone();
    assert_eq!(settled, vec![(1, Settled::Ack)], "never handed back");
    assert_eq!(signs.load(Ordering::SeqCst), 1, "signed once");
    assert_eq!(publisher.signed_events("r-1").len(), 1);
    let results: Vec<_> = publisher
        .json("sign.")
        .into_iter()
        .filter(|r| r["requestId"] == "r-1")
        .collect();
    assert_eq!(results.len(), 1, "{results:?}");
    assert!(matches!(
        records.0.lock().unwrap().get("acme/r-1"),
        Some(MemRecord::Done(_))
    ));
    assert_eq!(pipeline.shutdown(Duration::from_secs(5)).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_copies_of_a_request_at_once_are_signed_once() {
    // Each signature takes 300 ms, so the second copy is claimed while the first is signing
    // (on the same replica: one worker id).
    let o = start_once(StreamPublisher::default(), Duration::from_millis(300)).await;
    o.deliver(1, "r-1");
    o.deliver(2, "r-1");
    until("both copies acked", || {
        acked(&o.queue, 1) && acked(&o.queue, 2)
    })
    .await;
    assert_eq!(o.signs.load(Ordering::SeqCst), 1, "one signature");
    assert_eq!(o.ledger.0.lock().unwrap().len(), 1, "one quota charge");
    assert_eq!(o.publisher.signed_events("r-1").len(), 1);
    assert_eq!(o.results("r-1").len(), 1, "one result");
    let settled = o.queue.settled.lock().unwrap().clone();
    assert!(
        settled.contains(&(2, Settled::Nak)) || settled.contains(&(1, Settled::Nak)),
        "the later copy waited for the lease: {settled:?}"
    );
    assert_eq!(o.pipeline.shutdown(Duration::from_secs(5)).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_audit_writes_are_retried_on_the_same_chain() {
    // The audit stream refuses everything for 300 ms from the first event (four jobs at
    // once); later one event is stored with its acknowledgement lost. The writer sends the
    // same sealed events again, and keeps one chain.
    let publisher = StreamPublisher {
        audit_outage: Duration::from_millis(300),
        ..StreamPublisher::default()
    };
    let o = start_once(publisher, Duration::ZERO).await;
    for seq in 1..=4 {
        o.deliver(seq, &format!("r-{seq}"));
    }
    until("all acked", || (1..=4).all(|s| acked(&o.queue, s))).await;
    o.publisher.lose_audit_acks.store(1, Ordering::SeqCst);
    o.deliver(5, "r-5");
    until("job 5 acked", || acked(&o.queue, 5)).await;
    assert_eq!(o.publisher.lose_audit_acks.load(Ordering::SeqCst), 0);
    assert_eq!(o.signs.load(Ordering::SeqCst), 5, "each job signed once");
    let events = o.publisher.json("signer.audit.");
    assert_eq!(events.len(), 5, "one event per job, none twice: {events:?}");
    for seq in 1..=5 {
        assert_eq!(o.publisher.signed_events(&format!("r-{seq}")).len(), 1);
        assert_eq!(o.results(&format!("r-{seq}")).len(), 1);
    }
    let writers: std::collections::BTreeSet<_> =
        events.iter().map(|e| e["worker"].to_string()).collect();
    assert_eq!(writers.len(), 1, "one chain: {writers:?}");
    let seqs: Vec<_> = events.iter().map(|e| e["writerSeq"].as_u64()).collect();
    assert_eq!(seqs, (1..=5).map(Some).collect::<Vec<_>>());
    let mut verifier = crate::audit::ChainVerifier::default();
    for e in &events {
        verifier.push(e).unwrap();
    }
    assert_eq!(o.pipeline.shutdown(Duration::from_secs(5)).await, 0);
}

/// Checks every chain of `events` (in stream order) and returns the writers.
fn verified_chains(events: &[serde_json::Value]) -> std::collections::BTreeSet<String> {
    let mut verifier = crate::audit::ChainVerifier::default();
    for e in events {
        verifier.push(e).unwrap();
    }
    events.iter().map(|e| e["worker"].to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_audit_append_retried_while_its_event_is_in_flight_is_stored_once() {
    // The stream holds the first audit publish for 700 ms (a leader election), then stores
    // it. The job's call to the writer times out after 200 ms, more than once; each retry
    // joins the event in flight instead of sealing it again.
    let publisher = StreamPublisher {
        hold_audit: AtomicUsize::new(1),
        audit_hold: Duration::from_millis(700),
        ..StreamPublisher::default()
    };
    let o = start_once_with(publisher, Duration::ZERO, |cfg| {
        cfg.call_timeout = Duration::from_millis(200);
    })
    .await;
    o.deliver(1, "r-1");
    until("job acked", || acked(&o.queue, 1)).await;
    assert_eq!(o.publisher.hold_audit.load(Ordering::SeqCst), 0, "held");
    let settled = o.queue.settled.lock().unwrap().clone();
    assert_eq!(settled, vec![(1, Settled::Ack)], "settled once, signed");
    assert_eq!(o.signs.load(Ordering::SeqCst), 1, "signed once");
    let events = o.publisher.json("signer.audit.");
    assert_eq!(events.len(), 1, "one event, sealed once: {events:?}");
    assert_eq!(events[0]["decision"], "signed");
    assert_eq!(events[0]["writerSeq"], 1);
    assert_eq!(o.publisher.audit_sends.load(Ordering::SeqCst), 1);
    let results = o.results("r-1");
    assert_eq!(results.len(), 1, "{results:?}");
    assert!(results[0]["envelope"].is_object(), "{}", results[0]);
    let audit_seq = results[0]["audit"]["seq"].as_u64().unwrap();
    let stored = o.publisher.stored.lock().unwrap()[audit_seq as usize - 1].clone();
    let event = crate::audit::decode_message(&stored.body).unwrap();
    assert_eq!(event, events, "the result points at the one event");
    assert_eq!(o.pipeline.shutdown(Duration::from_secs(5)).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_append_after_its_event_is_stored_is_answered_with_its_sequence() {
    let o = start_once(StreamPublisher::default(), Duration::ZERO).await;
    o.deliver(1, "r-1");
    until("job acked", || acked(&o.queue, 1)).await;
    let before = o.publisher.json("signer.audit.");
    assert_eq!(before.len(), 1);
    // An event to append: the job's, as a new decision would carry it before sealing.
    let mut event: crate::audit::AuditEvent = serde_json::from_value(before[0].clone()).unwrap();
    event.request_id = "r-2".into();
    let append = |id: crate::pipeline::audit_writer::AppendId, event: crate::audit::AuditEvent| {
        let audit = o.pipeline.shared.read_refs().audit.clone();
        async move {
            crate::pipeline::call_actor(audit, "audit_writer", Duration::from_secs(5), |r| {
                crate::pipeline::audit_writer::AuditMsg::Append(id, Box::new(event), r)
            })
            .await
            .unwrap()
            .unwrap()
        }
    };
    let id = crate::pipeline::audit_writer::AppendId::fresh();
    let seq = append(id, event.clone()).await;
    assert_eq!(o.publisher.json("signer.audit.").len(), 2, "stored");
    assert_eq!(append(id, event.clone()).await, seq, "the same sequence");
    assert_eq!(append(id, event.clone()).await, seq);
    let after = o.publisher.json("signer.audit.");
    assert_eq!(after.len(), 2, "nothing more stored: {after:?}");
    assert_eq!(
        o.publisher.audit_sends.load(Ordering::SeqCst),
        2,
        "nothing sent"
    );
    // Another id is another event.
    let other = append(crate::pipeline::audit_writer::AppendId::fresh(), event).await;
    assert_eq!(other, seq + 1);
    let after = o.publisher.json("signer.audit.");
    assert_eq!(after.len(), 3);
    assert_eq!(verified_chains(&after).len(), 1, "one chain");
    assert_eq!(o.pipeline.shutdown(Duration::from_secs(5)).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_restarted_after_a_refusal_for_good_stores_every_other_event_once() {
    // Four jobs at once; the audit stream is down for 500 ms from the first event, and the
    // jobs' calls time out after 200 ms, so each job retries its append during the outage.
    // Then the stream refuses r-2's signed event for good: the writer starts a new chain and
    // seals the events after it again onto it, with their ids, so the retries still join.
    // (One delivery: r-2's `internal` refusal is answered at once, not NAKed to come back.)
    let publisher = StreamPublisher {
        audit_outage: Duration::from_millis(500),
        refuse_signed_event_of: Some("r-2"),
        ..StreamPublisher::default()
    };
    let o = start_once_with(publisher, Duration::ZERO, |cfg| {
        cfg.call_timeout = Duration::from_millis(200);
        cfg.max_deliver = 1;
    })
    .await;
    for seq in 1..=4 {
        o.deliver(seq, &format!("r-{seq}"));
    }
    until("all acked", || (1..=4).all(|s| acked(&o.queue, s))).await;
    assert_eq!(o.signs.load(Ordering::SeqCst), 4, "each job signed once");
    for r in ["r-1", "r-3", "r-4"] {
        let signed = o.publisher.signed_events(r);
        assert_eq!(signed.len(), 1, "{r}: one signed event: {signed:?}");
        let results = o.results(r);
        assert_eq!(results.len(), 1, "{r}: {results:?}");
        assert!(results[0]["envelope"].is_object(), "{}", results[0]);
    }
    assert!(o.publisher.signed_events("r-2").is_empty());
    let events = o.publisher.json("signer.audit.");
    let r2: Vec<_> = events.iter().filter(|e| e["requestId"] == "r-2").collect();
    assert_eq!(r2.len(), 1, "r-2: its refusal, once: {r2:?}");
    assert_eq!(r2[0]["decision"], "failed");
    assert_eq!(r2[0]["errorCode"], "internal");
    let results = o.results("r-2");
    assert_eq!(results.len(), 1, "{results:?}");
    assert_eq!(results[0]["error"]["code"], "internal", "{}", results[0]);
    assert_eq!(events.len(), 4, "one event per job: {events:?}");
    // The chain the refused event was sealed on ends before it: nothing stored links to it,
    // and what was sealed after it (r-2's refusal at least) is on a new chain. (Whether any
    // stored event precedes it on the old chain depends on the order the jobs reached the
    // writer: with none, every stored event is on the new chain.)
    let refused = o.publisher.refused_for_good.lock().unwrap().clone();
    let [refused] = refused.as_slice() else {
        panic!("r-2's signed event refused alone, once: {refused:?}");
    };
    let old_chain: Vec<_> = events
        .iter()
        .filter(|e| e["worker"] == refused["worker"])
        .collect();
    assert!(
        old_chain
            .iter()
            .all(|e| e["writerSeq"].as_u64() < refused["writerSeq"].as_u64()),
        "nothing stored after the refused event on its chain: {old_chain:?}"
    );
    assert_ne!(
        r2[0]["worker"], refused["worker"],
        "a new chain after the refusal"
    );
    let chains = verified_chains(&events);
    assert_eq!(
        chains.len(),
        1 + usize::from(!old_chain.is_empty()),
        "{chains:?}"
    );
    assert_eq!(o.pipeline.shutdown(Duration::from_secs(5)).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outcome_record_round_trips_binary_bodies() {
    let message = OutMessage {
        subject: "sign.completed".into(),
        headers: vec![
            ("Nats-Msg-Id".into(), "acme/r-1".into()),
            ("Content-Type".into(), "application/cbor".into()),
        ],
        body: vec![0xa1, b'\n', 0x00, 0xff, b'{'],
    };
    assert_eq!(OutMessage::from_record(&message.to_record()), Ok(message));
    assert_eq!(
        OutMessage::from_record(b"no header line"),
        Err(OutcomeRecordError::NoHeaderLine)
    );
    assert!(matches!(
        OutMessage::from_record(b"{oops\nbody"),
        Err(OutcomeRecordError::Header(_))
    ));
}
