//! The Provenance actor's bound, cache and single-flight, with in-memory registries.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use async_trait::async_trait;
use ractor::rpc::CallResult;

use super::*;

/// A registry stand-in: the repository `hang` never answers (and counts the lookups
/// dropped unfinished), `down` is unreachable, `bad` is untrusted, `panic` panics,
/// `offline` is decided without a lookup; anything else is trusted after `slow`.
struct Port {
    dropped: Arc<AtomicUsize>,
    calls: AtomicUsize,
    slow: Duration,
    /// Digests looked up, in order.
    seen: Mutex<Vec<String>>,
}

impl Port {
    fn new(slow: Duration) -> Arc<Self> {
        Arc::new(Port {
            dropped: Arc::new(AtomicUsize::new(0)),
            calls: AtomicUsize::new(0),
            slow,
            seen: Mutex::new(Vec::new()),
        })
    }
}

struct CountDrop(Arc<AtomicUsize>);

impl Drop for CountDrop {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

#[async_trait]
impl ReleaseVerifier for Port {
    fn decide_offline(
        &self,
        repository: &str,
        _: &str,
    ) -> Option<Result<ProvenanceGrant, SignerError>> {
        (repository == "offline").then_some(Ok(ProvenanceGrant::Allowlisted))
    }

    async fn look_up(
        &self,
        repository: &str,
        digest: &str,
    ) -> Result<ProvenanceGrant, SignerError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.seen.lock().unwrap().push(digest.to_string());
        tokio::time::sleep(self.slow).await;
        match repository {
            "hang" => {
                let _guard = CountDrop(self.dropped.clone());
                std::future::pending::<()>().await;
                unreachable!()
            }
            "down" => Err(SignerError::ProvenanceUnavailable("registry down".into())),
            "bad" => Err(SignerError::ProvenanceUntrusted("no signature".into())),
            "panic" => panic!("a hostile registry"),
            _ => Ok(trusted()),
        }
    }
}

/// What [`Port`] answers for a trusted image: a signature it "found" on a referrer.
fn trusted() -> ProvenanceGrant {
    ProvenanceGrant::Trusted(ReleaseSignature {
        keyid: "ab".repeat(32),
        location: crate::ports::SignatureLocation::Referrer,
        reference: format!("sha256:{}", "cd".repeat(32)),
        format: crate::ports::SignatureFormat::DsseAttestation,
    })
}

async fn ask_digest(
    actor: &ActorRef<ProvenanceMsg>,
    tenant: &str,
    repository: &str,
    digest: &str,
    timeout: Duration,
) -> CallResult<Result<ProvenanceGrant, SignerError>> {
    let (tenant, repository, image_digest) = (
        tenant.to_string(),
        repository.to_string(),
        digest.to_string(),
    );
    actor
        .call(
            |reply| ProvenanceMsg::Verify {
                tenant,
                repository,
                image_digest,
                reply,
            },
            Some(timeout),
        )
        .await
        .unwrap()
}

async fn ask(
    actor: &ActorRef<ProvenanceMsg>,
    tenant: &str,
    repository: &str,
    timeout: Duration,
) -> CallResult<Result<ProvenanceGrant, SignerError>> {
    ask_digest(actor, tenant, repository, "sha256:x", timeout).await
}

async fn answer(
    actor: &ActorRef<ProvenanceMsg>,
    tenant: &str,
    repository: &str,
    digest: &str,
) -> Result<ProvenanceGrant, SignerError> {
    match ask_digest(actor, tenant, repository, digest, Duration::from_secs(30)).await {
        CallResult::Success(r) => r,
        other => panic!("no answer: {other:?}"),
    }
}

async fn stats(actor: &ActorRef<ProvenanceMsg>) -> ProvenanceStats {
    actor
        .call(ProvenanceMsg::Stats, Some(Duration::from_secs(5)))
        .await
        .unwrap()
        .unwrap()
}

fn limits(per_tenant: usize, wait: Duration, cache_ttl: Duration) -> ProvenanceLimits {
    ProvenanceLimits {
        per_tenant,
        wait,
        cache_ttl,
        cache_entries: 3,
    }
}

/// The caller's timeout and the actor's deadline are the same instant: either may
/// answer first (the caller sees a timeout, or the actor's "unavailable").
fn ended_at_the_deadline(r: CallResult<Result<ProvenanceGrant, SignerError>>) {
    match r {
        CallResult::Timeout => {}
        CallResult::Success(Err(e)) if e.code() == ErrorCode::ProvenanceUnavailable => {}
        CallResult::Success(other) => panic!("a hanging lookup answered {other:?}"),
        CallResult::SenderError => panic!("the actor dropped the reply"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_tenant_over_its_bound_waits_or_fails_while_others_are_answered() {
    let port = Port::new(Duration::ZERO);
    let dropped = port.dropped.clone();
    let limits = limits(2, Duration::from_millis(300), Duration::ZERO);
    let (actor, handle) =
        Actor::spawn(None, Provenance, (port as Arc<dyn ReleaseVerifier>, limits))
            .await
            .unwrap();
    let long = Duration::from_secs(30);

    // Tenant A fills its bound with two lookups (of two images) that never end.
    let hung: Vec<_> = ["sha256:h1", "sha256:h2"]
        .into_iter()
        .map(|digest| {
            let actor = actor.clone();
            tokio::spawn(async move { ask_digest(&actor, "a", "hang", digest, long).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;

    // Tenant B is answered at once, whatever A does.
    let started = std::time::Instant::now();
    let CallResult::Success(b) = ask(&actor, "b", "ok", long).await else {
        panic!("no answer for tenant b");
    };
    assert_eq!(b, Ok(trusted()));
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );

    // A third lookup of A waits `wait`, then is unavailable (retryable).
    let started = std::time::Instant::now();
    let CallResult::Success(a) = ask(&actor, "a", "ok", long).await else {
        panic!("no answer for tenant a");
    };
    let err = a.unwrap_err();
    assert_eq!(err.code(), ErrorCode::ProvenanceUnavailable, "{err}");
    assert!(err.code().retryable());
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!(dropped.load(Ordering::SeqCst), 0);

    // A lookup is ended at its caller's deadline: it is dropped (so its checks are
    // cancelled) and gives its permit back.
    for h in hung {
        h.abort();
    }
    ended_at_the_deadline(ask(&actor, "c", "hang", Duration::from_millis(200)).await);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while dropped.load(Ordering::SeqCst) < 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "the lookup was not dropped"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    actor.stop(None);
    let _ = handle.await;
}

#[tokio::test]
async fn permits_come_back_at_the_deadline() {
    let port = Port::new(Duration::ZERO);
    let dropped = port.dropped.clone();
    let limits = limits(1, Duration::from_secs(5), Duration::ZERO);
    let (actor, handle) =
        Actor::spawn(None, Provenance, (port as Arc<dyn ReleaseVerifier>, limits))
            .await
            .unwrap();
    // The only permit of A is held by a lookup that hangs until its 200 ms deadline.
    ended_at_the_deadline(ask(&actor, "a", "hang", Duration::from_millis(200)).await);
    // The next lookup of A gets the permit back (within its 5 s wait).
    let CallResult::Success(r) = ask(&actor, "a", "ok", Duration::from_secs(30)).await else {
        panic!("no answer");
    };
    assert_eq!(r, Ok(trusted()));
    assert_eq!(dropped.load(Ordering::SeqCst), 1);
    actor.stop(None);
    let _ = handle.await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_jobs_with_one_image_make_one_lookup_per_tenant() {
    let port = Port::new(Duration::from_millis(200));
    let limits = limits(1, Duration::from_secs(5), Duration::ZERO);
    let (actor, _) = Actor::spawn(
        None,
        Provenance,
        (port.clone() as Arc<dyn ReleaseVerifier>, limits),
    )
    .await
    .unwrap();
    // Ten jobs of A with one image; with a bound of one lookup, they would take 2 s in a
    // row if each made its own.
    let started = std::time::Instant::now();
    let jobs: Vec<_> = (0..10)
        .map(|_| {
            let actor = actor.clone();
            tokio::spawn(async move { answer(&actor, "a", "ok", "sha256:same").await })
        })
        .collect();
    for j in jobs {
        assert_eq!(j.await.unwrap(), Ok(trusted()));
    }
    assert_eq!(port.calls.load(Ordering::SeqCst), 1);
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    let s = stats(&actor).await;
    assert_eq!((s.lookups, s.joined), (1, 9));
    // Untrusted answers are shared too.
    let jobs: Vec<_> = (0..3)
        .map(|_| {
            let actor = actor.clone();
            tokio::spawn(async move { answer(&actor, "a", "bad", "sha256:same").await })
        })
        .collect();
    for j in jobs {
        let e = j.await.unwrap().unwrap_err();
        assert_eq!(e.code(), ErrorCode::ProvenanceUntrusted);
    }
    assert_eq!(port.calls.load(Ordering::SeqCst), 2);
    actor.stop(None);
}

#[tokio::test]
async fn definite_verdicts_are_cached_for_the_ttl_and_outages_never() {
    let port = Port::new(Duration::ZERO);
    let limits = limits(4, Duration::from_secs(5), Duration::from_millis(300));
    let (actor, _) = Actor::spawn(
        None,
        Provenance,
        (port.clone() as Arc<dyn ReleaseVerifier>, limits),
    )
    .await
    .unwrap();
    let calls = || port.calls.load(Ordering::SeqCst);
    // Trusted and untrusted: asked once within the TTL (whichever tenant asks).
    for tenant in ["a", "b"] {
        assert_eq!(
            answer(&actor, tenant, "ok", "sha256:1").await,
            Ok(trusted())
        );
        let e = answer(&actor, tenant, "bad", "sha256:1").await.unwrap_err();
        assert_eq!(
            (e.code(), e.to_string().contains("no signature")),
            (ErrorCode::ProvenanceUntrusted, true)
        );
    }
    assert_eq!(calls(), 2);
    assert_eq!(stats(&actor).await.cache_hits, 2);
    // The cache is per repository: the same digest elsewhere was never checked.
    answer(&actor, "a", "other", "sha256:1").await.unwrap();
    assert_eq!(calls(), 3);
    // Past the TTL the registry is asked again.
    tokio::time::sleep(Duration::from_millis(350)).await;
    answer(&actor, "a", "ok", "sha256:1").await.unwrap();
    assert_eq!(calls(), 4);
    // "Unavailable" is never kept: every job asks again.
    for _ in 0..2 {
        let e = answer(&actor, "a", "down", "sha256:1").await.unwrap_err();
        assert_eq!(e.code(), ErrorCode::ProvenanceUnavailable);
    }
    assert_eq!(calls(), 6);
    // Offline decisions need no lookup and are not cached.
    assert_eq!(
        answer(&actor, "a", "offline", "sha256:1").await,
        Ok(ProvenanceGrant::Allowlisted)
    );
    assert_eq!(calls(), 6);
    actor.stop(None);
}

#[tokio::test]
async fn the_verdict_cache_is_bounded() {
    let port = Port::new(Duration::ZERO);
    let limits = limits(4, Duration::from_secs(5), Duration::from_secs(60));
    let (actor, _) = Actor::spawn(
        None,
        Provenance,
        (port.clone() as Arc<dyn ReleaseVerifier>, limits),
    )
    .await
    .unwrap();
    for i in 0..10 {
        answer(&actor, "a", "ok", &format!("sha256:{i}"))
            .await
            .unwrap();
    }
    assert_eq!(stats(&actor).await.cached, 3, "cache_entries");
    // The latest are kept, the first was evicted.
    answer(&actor, "a", "ok", "sha256:9").await.unwrap();
    assert_eq!(port.calls.load(Ordering::SeqCst), 10);
    answer(&actor, "a", "ok", "sha256:0").await.unwrap();
    assert_eq!(port.calls.load(Ordering::SeqCst), 11);
    actor.stop(None);
}

#[tokio::test]
async fn a_panicking_lookup_fails_the_actor() {
    let port = Port::new(Duration::ZERO);
    let limits = limits(4, Duration::from_secs(5), Duration::from_secs(60));
    let (actor, handle) = Actor::spawn(
        None,
        Provenance,
        (port.clone() as Arc<dyn ReleaseVerifier>, limits),
    )
    .await
    .unwrap();
    answer(&actor, "a", "ok", "sha256:1").await.unwrap();
    let r = ask_digest(&actor, "a", "panic", "sha256:1", Duration::from_secs(10)).await;
    assert!(!matches!(r, CallResult::Success(_)), "{r:?}");
    // The actor stopped (its supervisor restarts it with an empty cache).
    tokio::time::timeout(Duration::from_secs(10), handle)
        .await
        .expect("the actor did not fail")
        .unwrap();
}
