//! The Quota actor's batching, with in-memory stores.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use async_trait::async_trait;
use ractor::rpc::CallResult;
use tokio::sync::Semaphore;

use super::*;

/// A store with a budget of units per tenant (no refill), whose batches each take one
/// simulated round trip (`delay`), optionally waiting for a permit of `gate` first. It
/// records every batch and every release.
struct Budget {
    units: Mutex<HashMap<String, u32>>,
    initial: u32,
    delay: Duration,
    gate: Option<Semaphore>,
    batches: Mutex<Vec<Vec<QuotaRequest>>>,
    released: Mutex<Vec<String>>,
    batch_max: usize,
}

impl Budget {
    fn new(initial: u32, delay: Duration) -> Self {
        Budget {
            units: Mutex::new(HashMap::new()),
            initial,
            delay,
            gate: None,
            batches: Mutex::new(Vec::new()),
            released: Mutex::new(Vec::new()),
            batch_max: 64,
        }
    }

    fn gated(mut self) -> Self {
        self.gate = Some(Semaphore::new(0));
        self
    }

    fn open(&self, permits: usize) {
        if let Some(g) = &self.gate {
            g.add_permits(permits);
        }
    }

    fn batches(&self) -> Vec<Vec<QuotaRequest>> {
        self.batches.lock().unwrap().clone()
    }

    fn charged(&self, tenant: &str) -> u32 {
        let left = self
            .units
            .lock()
            .unwrap()
            .get(tenant)
            .copied()
            .unwrap_or(self.initial);
        self.initial - left
    }
}

#[async_trait]
impl QuotaStore for Budget {
    async fn acquire(
        &self,
        tenant: &str,
        _: &str,
        payload_bytes: usize,
        signatures: u32,
    ) -> Result<QuotaGrant, SignerError> {
        // A payload over 1000 bytes is refused before anything is charged.
        if payload_bytes > 1000 {
            return Err(SignerError::PayloadTooLarge(format!("{payload_bytes}")));
        }
        let mut units = self.units.lock().unwrap();
        let left = units.entry(tenant.to_owned()).or_insert(self.initial);
        let want = signatures.max(1);
        if *left < want {
            return Err(SignerError::QuotaExceeded {
                message: format!("{tenant} has {left} units"),
                retry_after_ms: u64::from(want),
            });
        }
        *left -= want;
        Ok(QuotaGrant::Allowed)
    }

    async fn release(&self, tenant: &str, _: &str) {
        self.released.lock().unwrap().push(tenant.to_owned());
    }

    async fn acquire_many(
        &self,
        requests: &[QuotaRequest],
    ) -> Vec<Result<QuotaGrant, SignerError>> {
        self.batches.lock().unwrap().push(requests.to_vec());
        if let Some(g) = &self.gate {
            g.acquire().await.unwrap().forget();
        }
        tokio::time::sleep(self.delay).await;
        let mut answers = Vec::new();
        for r in requests {
            answers.push(
                self.acquire(&r.tenant, &r.plan, r.payload_bytes, r.signatures)
                    .await,
            );
        }
        answers
    }

    async fn release_many(&self, releases: &[QuotaRelease]) {
        tokio::time::sleep(self.delay).await;
        for r in releases {
            self.release(&r.tenant, &r.plan).await;
        }
    }

    fn batch_max(&self) -> usize {
        self.batch_max
    }
}

async fn start(port: Arc<dyn QuotaStore>) -> ActorRef<QuotaMsg> {
    let (actor, _) = Actor::spawn(None, Quota, port).await.unwrap();
    actor
}

async fn acquire(
    actor: &ActorRef<QuotaMsg>,
    tenant: &str,
    payload_bytes: usize,
    signatures: u32,
    timeout: Duration,
) -> CallResult<Result<QuotaGrant, SignerError>> {
    actor
        .call(
            |reply| QuotaMsg::Acquire {
                tenant: tenant.to_owned(),
                plan: "team".to_owned(),
                payload_bytes,
                signatures,
                reply,
            },
            Some(timeout),
        )
        .await
        .unwrap()
}

async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_acquires_go_in_few_batches_each_caller_with_its_own_answer() {
    // 300 callers at once, each batch a 5 ms round trip; 6 tenants with 40 units each.
    let port = Arc::new(Budget::new(40, Duration::from_millis(5)));
    let actor = start(port.clone()).await;
    let mut calls = Vec::new();
    for i in 0..300usize {
        let actor = actor.clone();
        calls.push(tokio::spawn(async move {
            let tenant = format!("t{}", i % 6);
            // every seventh asks for a payload the store refuses; the others 1 or 2 units
            let bytes = if i % 7 == 0 { 5000 + i } else { 10 };
            let signatures = 1 + (i % 2) as u32;
            let answer = acquire(&actor, &tenant, bytes, signatures, Duration::from_secs(10)).await;
            (tenant, bytes, signatures, answer)
        }));
    }
    let mut allowed: HashMap<String, u32> = HashMap::new();
    let mut refused = 0;
    for call in calls {
        let (tenant, bytes, signatures, answer) = call.await.unwrap();
        match answer {
            CallResult::Success(Ok(QuotaGrant::Allowed)) => {
                assert!(bytes <= 1000);
                *allowed.entry(tenant).or_default() += signatures;
            }
            // its own refusal: the payload it sent, or the units it asked for
            CallResult::Success(Err(SignerError::PayloadTooLarge(m))) => {
                assert_eq!(m, bytes.to_string())
            }
            CallResult::Success(Err(SignerError::QuotaExceeded { retry_after_ms, .. })) => {
                assert_eq!(retry_after_ms, u64::from(signatures));
                refused += 1;
            }
            other => panic!("unexpected answer {other:?}"),
        }
    }
    let batches = port.batches();
    let sent: usize = batches.iter().map(Vec::len).sum();
    assert_eq!(sent, 300, "every request sent once");
    assert!(
        batches.len() <= 30,
        "300 requests in {} batches (sizes {:?})",
        batches.len(),
        batches.iter().map(Vec::len).collect::<Vec<_>>()
    );
    assert!(
        batches.iter().all(|b| b.len() <= 64),
        "bounded by batch_max"
    );
    assert!(refused > 0, "some tenants ran out");
    // what was charged is exactly what was granted: refusals took nothing
    for t in 0..6 {
        let tenant = format!("t{t}");
        let granted = allowed.get(&tenant).copied().unwrap_or(0);
        assert_eq!(port.charged(&tenant), granted, "{tenant}");
        assert!(granted >= 39, "{tenant}: {granted} of 40 units granted");
    }
}

#[tokio::test]
async fn a_lone_request_is_sent_at_once() {
    let port = Arc::new(Budget::new(10, Duration::ZERO));
    let actor = start(port.clone()).await;
    for _ in 0..3 {
        let started = Instant::now();
        let answer = acquire(&actor, "acme", 10, 1, Duration::from_secs(5)).await;
        assert!(matches!(
            answer,
            CallResult::Success(Ok(QuotaGrant::Allowed))
        ));
        assert!(
            started.elapsed() < Duration::from_millis(20),
            "{:?}",
            started.elapsed()
        );
    }
    let sizes: Vec<usize> = port.batches().iter().map(Vec::len).collect();
    assert_eq!(sizes, [1, 1, 1]);
}

/// Sends an Acquire without waiting: the actor's mailbox keeps the order of sends.
fn send_acquire(
    actor: &ActorRef<QuotaMsg>,
    tenant: &str,
) -> ractor::concurrency::OneshotReceiver<Result<QuotaGrant, SignerError>> {
    let (tx, rx) = ractor::concurrency::oneshot();
    actor
        .cast(QuotaMsg::Acquire {
            tenant: tenant.to_owned(),
            plan: "team".to_owned(),
            payload_bytes: 10,
            signatures: 1,
            reply: tx.into(),
        })
        .unwrap();
    rx
}

#[tokio::test]
async fn requests_waiting_for_a_lane_go_together_in_arrival_order() {
    let port = Arc::new(Budget::new(100, Duration::ZERO).gated());
    let actor = start(port.clone()).await;
    let answers: Vec<_> = (0..ACQUIRE_LANES + 5)
        .map(|i| send_acquire(&actor, &format!("t{i}")))
        .collect();
    let p = port.clone();
    until("lanes busy", move || p.batches().len() == ACQUIRE_LANES).await;
    port.open(100);
    for a in answers {
        assert_eq!(a.await.unwrap(), Ok(QuotaGrant::Allowed));
    }
    let batches: Vec<Vec<String>> = port
        .batches()
        .iter()
        .map(|b| b.iter().map(|r| r.tenant.clone()).collect())
        .collect();
    let lanes: Vec<Vec<String>> = (0..ACQUIRE_LANES).map(|i| vec![format!("t{i}")]).collect();
    assert_eq!(
        batches[..ACQUIRE_LANES],
        lanes[..],
        "the first go alone, at once"
    );
    let waited: Vec<String> = (ACQUIRE_LANES..ACQUIRE_LANES + 5)
        .map(|i| format!("t{i}"))
        .collect();
    assert_eq!(
        batches[ACQUIRE_LANES..],
        [waited],
        "the rest together, in order"
    );
}

#[tokio::test]
async fn the_batch_size_is_bounded() {
    let mut budget = Budget::new(100, Duration::ZERO).gated();
    budget.batch_max = 3;
    let port = Arc::new(budget);
    let actor = start(port.clone()).await;
    let mut calls = Vec::new();
    for i in 0..(ACQUIRE_LANES + 7) {
        let actor = actor.clone();
        calls.push(tokio::spawn(async move {
            acquire(&actor, &format!("t{i}"), 10, 1, Duration::from_secs(5)).await
        }));
    }
    let p = port.clone();
    until("lanes busy", move || p.batches().len() == ACQUIRE_LANES).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    port.open(100);
    for c in calls {
        assert!(matches!(c.await.unwrap(), CallResult::Success(Ok(_))));
    }
    let sizes: Vec<usize> = port.batches().iter().map(Vec::len).collect();
    assert_eq!(sizes.iter().sum::<usize>(), ACQUIRE_LANES + 7);
    assert!(sizes.iter().all(|&n| n <= 3), "{sizes:?}");
}

#[tokio::test]
async fn a_store_that_hangs_does_not_wedge_the_actor_past_its_callers() {
    // The first batches never finish; their callers give up after 100 ms.
    let port = Arc::new(Budget::new(100, Duration::ZERO).gated());
    let actor = start(port.clone()).await;
    for _ in 0..(ACQUIRE_LANES + 1) {
        let answer = acquire(&actor, "acme", 10, 1, Duration::from_millis(100)).await;
        assert!(matches!(answer, CallResult::Timeout), "{answer:?}");
    }
    // the store answers again: so does the actor
    port.open(100);
    let answer = acquire(&actor, "acme", 10, 1, Duration::from_secs(5)).await;
    assert!(
        matches!(answer, CallResult::Success(Ok(QuotaGrant::Allowed))),
        "{answer:?}"
    );
}

#[tokio::test]
async fn a_request_whose_caller_has_gone_is_not_sent() {
    let port = Arc::new(Budget::new(100, Duration::ZERO).gated());
    let actor = start(port.clone()).await;
    // fill the lanes with callers that wait
    let mut patient = Vec::new();
    for i in 0..ACQUIRE_LANES {
        let actor = actor.clone();
        patient.push(tokio::spawn(async move {
            acquire(
                &actor,
                &format!("patient{i}"),
                10,
                1,
                Duration::from_secs(5),
            )
            .await
        }));
    }
    let p = port.clone();
    until("lanes busy", move || p.batches().len() == ACQUIRE_LANES).await;
    // this one gives up while it waits for a lane
    let answer = acquire(&actor, "hasty", 10, 1, Duration::from_millis(50)).await;
    assert!(matches!(answer, CallResult::Timeout));
    port.open(100);
    for c in patient {
        assert!(matches!(c.await.unwrap(), CallResult::Success(Ok(_))));
    }
    let answer = acquire(&actor, "later", 10, 1, Duration::from_secs(5)).await;
    assert!(matches!(answer, CallResult::Success(Ok(_))));
    let sent: Vec<String> = port
        .batches()
        .iter()
        .flatten()
        .map(|r| r.tenant.clone())
        .collect();
    assert!(!sent.contains(&"hasty".to_owned()), "{sent:?}");
    assert_eq!(port.charged("hasty"), 0);
}

#[tokio::test]
async fn a_grant_whose_caller_has_gone_is_released() {
    let port = Arc::new(Budget::new(100, Duration::ZERO).gated());
    let actor = start(port.clone()).await;
    let mut first = Vec::new();
    for i in 0..ACQUIRE_LANES {
        let actor = actor.clone();
        first.push(tokio::spawn(async move {
            acquire(&actor, &format!("first{i}"), 10, 1, Duration::from_secs(5)).await
        }));
    }
    let p = port.clone();
    until("lanes busy", move || p.batches().len() == ACQUIRE_LANES).await;
    // one batch of a caller that gives up and one that waits
    let a = actor.clone();
    let hasty =
        tokio::spawn(async move { acquire(&a, "hasty", 10, 1, Duration::from_millis(150)).await });
    let a = actor.clone();
    let patient =
        tokio::spawn(async move { acquire(&a, "patient", 10, 1, Duration::from_secs(5)).await });
    tokio::time::sleep(Duration::from_millis(20)).await;
    port.open(1); // one lane frees; the two go out together, and wait for the store
    let p = port.clone();
    until("the two sent", move || {
        p.batches().len() == ACQUIRE_LANES + 1
    })
    .await;
    assert!(matches!(hasty.await.unwrap(), CallResult::Timeout));
    port.open(100);
    assert!(matches!(
        patient.await.unwrap(),
        CallResult::Success(Ok(QuotaGrant::Allowed))
    ));
    for c in first {
        assert!(matches!(c.await.unwrap(), CallResult::Success(Ok(_))));
    }
    // the store charged the hasty caller, whose job will never release: the actor did
    assert_eq!(port.charged("hasty"), 1);
    let p = port.clone();
    until("hasty released", move || {
        p.released.lock().unwrap().contains(&"hasty".to_owned())
    })
    .await;
    assert_eq!(*port.released.lock().unwrap(), ["hasty"]);
}

/// Counts `release_many` calls; each takes a round trip of `delay`.
struct Releases {
    batches: Mutex<Vec<usize>>,
    released: AtomicUsize,
    delay: Duration,
}

impl Releases {
    fn new(delay: Duration) -> Self {
        Releases {
            batches: Mutex::new(Vec::new()),
            released: AtomicUsize::new(0),
            delay,
        }
    }
}

#[async_trait]
impl QuotaStore for Releases {
    async fn acquire(&self, _: &str, _: &str, _: usize, _: u32) -> Result<QuotaGrant, SignerError> {
        Ok(QuotaGrant::Allowed)
    }
    async fn release(&self, _: &str, _: &str) {
        self.released.fetch_add(1, Ordering::SeqCst);
    }
    async fn release_many(&self, releases: &[QuotaRelease]) {
        self.batches.lock().unwrap().push(releases.len());
        tokio::time::sleep(self.delay).await;
        for r in releases {
            self.release(&r.tenant, &r.plan).await;
        }
    }
}

#[tokio::test]
async fn releases_are_batched_too() {
    let port = Arc::new(Releases::new(Duration::from_millis(5)));
    let actor = start(port.clone()).await;
    for i in 0..200 {
        actor
            .cast(QuotaMsg::Release {
                tenant: format!("t{i}"),
                plan: "team".into(),
            })
            .unwrap();
    }
    let p = port.clone();
    until("all released", move || {
        p.released.load(Ordering::SeqCst) == 200
    })
    .await;
    let batches = port.batches.lock().unwrap().clone();
    assert!(batches.len() <= 3, "{batches:?}");
}

#[tokio::test]
async fn releases_keep_up_with_the_acquire_lanes() {
    // a release round trip as slow as an acquire one (20 ms), 1000 jobs at once: every slot
    // is back within a few round trips of the last grant (the release lane takes more than
    // `batch_max` at a time)
    let port = Arc::new(Budget::new(1000, Duration::from_millis(20)));
    let actor = start(port.clone()).await;
    let mut jobs = Vec::new();
    for i in 0..1000 {
        let actor = actor.clone();
        jobs.push(tokio::spawn(async move {
            let tenant = format!("t{i}");
            let answer = acquire(&actor, &tenant, 10, 1, Duration::from_secs(10)).await;
            assert!(matches!(answer, CallResult::Success(Ok(_))));
            actor
                .cast(QuotaMsg::Release {
                    tenant,
                    plan: "team".into(),
                })
                .unwrap();
        }));
    }
    for j in jobs {
        j.await.unwrap();
    }
    let granted = Instant::now();
    let p = port.clone();
    until("all released", move || {
        p.released.lock().unwrap().len() == 1000
    })
    .await;
    assert!(
        granted.elapsed() < Duration::from_millis(100),
        "{:?}",
        granted.elapsed()
    );
}

#[tokio::test]
async fn a_stopping_actor_gives_back_the_releases_it_holds() {
    let port = Arc::new(Releases::new(Duration::from_millis(200)));
    let (actor, handle) = Actor::spawn(None, Quota, port.clone() as Arc<dyn QuotaStore>)
        .await
        .unwrap();
    for i in 0..50 {
        actor
            .cast(QuotaMsg::Release {
                tenant: format!("t{i}"),
                plan: "team".into(),
            })
            .unwrap();
    }
    // answered after the releases were taken (one mailbox): the first release batch is in
    // flight (200 ms), the other 49 wait in the actor
    let answer = acquire(&actor, "acme", 10, 1, Duration::from_secs(5)).await;
    assert!(matches!(answer, CallResult::Success(Ok(_))));
    assert_eq!(*port.batches.lock().unwrap(), [1]);
    actor.stop(None);
    handle.await.unwrap();
    assert_eq!(
        *port.batches.lock().unwrap(),
        [1, 49],
        "given back while stopping"
    );
    let p = port.clone();
    until("all released", move || {
        p.released.load(Ordering::SeqCst) == 50
    })
    .await;
}

/// Panics on every batch.
struct Panics;

#[async_trait]
impl QuotaStore for Panics {
    async fn acquire(&self, _: &str, _: &str, _: usize, _: u32) -> Result<QuotaGrant, SignerError> {
        panic!("the quota store fell over")
    }
    async fn release(&self, _: &str, _: &str) {}
}

#[tokio::test]
async fn a_batch_that_panics_fails_the_actor() {
    let (actor, handle) = Actor::spawn(None, Quota, Arc::new(Panics) as Arc<dyn QuotaStore>)
        .await
        .unwrap();
    let answer = acquire(&actor, "acme", 10, 1, Duration::from_secs(5)).await;
    assert!(matches!(answer, CallResult::SenderError), "{answer:?}");
    // the actor stops with an error (a supervisor would restart it)
    tokio::time::timeout(Duration::from_secs(5), handle)
        .await
        .expect("actor stopped")
        .unwrap();
}
