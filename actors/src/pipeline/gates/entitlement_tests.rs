//! The Entitlement actor's caches and disciplines, with in-memory ports (no network).
//!
//! Tokens of the fake Authority are `kid:exp` (`exp` in unix seconds); `panic` makes the
//! check panic.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use ractor::{Actor, ActorProcessingErr, ActorRef, SupervisionEvent};

use super::*;
use crate::error::ErrorCode;
use crate::request::SignRequest;

struct FakeKeys(Vec<String>);

impl TokenKeys for FakeKeys {
    fn has_key(&self, key_id: &str) -> bool {
        self.0.iter().any(|k| k == key_id)
    }
    fn len(&self) -> usize {
        self.0.len()
    }
}

#[derive(Default)]
struct FakeAuthority {
    /// The kids the Authority publishes now.
    published: Mutex<Vec<String>>,
    fetches: AtomicUsize,
    checks: AtomicUsize,
    fail_fetch: AtomicBool,
    /// How long a load and a check take (so concurrent jobs overlap).
    slow: Duration,
    capacity: usize,
    unknown_kid_interval: Duration,
}

impl FakeAuthority {
    fn new(kids: &[&str]) -> Arc<Self> {
        Arc::new(FakeAuthority {
            published: Mutex::new(kids.iter().map(|k| k.to_string()).collect()),
            slow: Duration::from_millis(100),
            capacity: 100,
            unknown_kid_interval: Duration::from_secs(3600),
            ..FakeAuthority::default()
        })
    }
}

#[async_trait]
impl TokenAuthority for FakeAuthority {
    async fn fetch_keys(&self) -> Result<Arc<dyn TokenKeys>, PortError> {
        self.fetches.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(self.slow).await;
        if self.fail_fetch.load(Ordering::SeqCst) {
            return Err(PortError::transient("authority down"));
        }
        Ok(Arc::new(FakeKeys(self.published.lock().unwrap().clone())))
    }

    fn verify_token(
        &self,
        raw: &str,
        keys: &dyn TokenKeys,
        now: u64,
    ) -> Result<VerifiedToken, TokenRefusal> {
        self.checks.fetch_add(1, Ordering::SeqCst);
        std::thread::sleep(self.slow);
        if raw == "panic" {
            panic!("a hostile token");
        }
        let (kid, exp) = raw
            .split_once(':')
            .ok_or_else(|| TokenRefusal::Refused(SignerError::AuthInvalid("garbage".into())))?;
        let exp: u64 = exp
            .parse()
            .map_err(|_| TokenRefusal::Refused(SignerError::AuthInvalid("exp".into())))?;
        if !keys.has_key(kid) {
            return Err(TokenRefusal::UnknownKey {
                kid: kid.into(),
                error: SignerError::AuthInvalid(format!("no key {kid}")),
            });
        }
        if exp < now {
            return Err(TokenRefusal::Refused(SignerError::AuthExpired(
                "expired".into(),
            )));
        }
        Ok(VerifiedToken {
            issuer: "https://authority.test".into(),
            subject: "svc:scanner".into(),
            tenant: "acme".into(),
            scope: vec!["signer.sign".into()],
            expires: exp,
            not_before: None,
            issued_at: None,
            jkt: None,
            key_id: kid.into(),
            reuse_until: exp + 1,
        })
    }

    fn refresh_every(&self) -> Duration {
        Duration::from_secs(3600)
    }

    fn unknown_kid_interval(&self) -> Duration {
        self.unknown_kid_interval
    }

    fn token_cache_capacity(&self) -> usize {
        self.capacity
    }
}

/// The rest of the gate: passes every job with a verified token (judging its date as of the
/// job, as the real one does), and counts its calls.
struct Gate {
    authority: Arc<FakeAuthority>,
    calls: AtomicUsize,
}

#[async_trait]
impl EntitlementVerifier for Gate {
    fn tokens(&self) -> Option<Arc<dyn TokenAuthority>> {
        Some(self.authority.clone())
    }

    async fn verify(
        &self,
        input: &GateInput,
        token: Option<&VerifiedToken>,
    ) -> Result<EntitlementVerdict, GateDenial> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let token =
            token.ok_or_else(|| GateDenial::from(SignerError::Internal("no token".into())))?;
        if token.expires < unix_seconds(input.published) {
            return Err(SignerError::AuthExpired("expired (re-judged)".into()).into());
        }
        Ok(EntitlementVerdict {
            caller: Some(crate::audit::Caller {
                iss: token.issuer.clone(),
                sub: token.subject.clone(),
            }),
            auth: AuthState::Valid,
            poe: PoeState::Valid,
            plan: "team".into(),
        })
    }
}

fn at(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(secs)
}

fn input(token: &str, published: SystemTime) -> GateInput {
    let v = serde_json::json!({
        "apiVersion": crate::API_VERSION,
        "requestId": "01JDQ6Y8ABC",
        "tenant": "acme",
        "kind": "dsse",
        "auth": {"opTok": token},
        "poe": {"format": "jwt", "value": "x.y.z"},
        "scanner": {"repository": "registry.example:5000/stella-ops/scanner", "imageDigest": format!("sha256:{}", "c".repeat(64))},
        "statement": {
            "_type": "https://in-toto.io/Statement/v1",
            "subject": [{"name": "app", "digest": {"sha256": "a".repeat(64)}}],
            "predicateType": "https://slsa.dev/provenance/v1",
            "predicate": {}
        }
    });
    let request: SignRequest = serde_json::from_value(v).unwrap();
    GateInput {
        request: Arc::new(request),
        subject_tenant: None,
        payload_bytes: 10,
        published,
    }
}

async fn ask(
    actor: &ActorRef<EntitlementMsg>,
    token: &str,
    published: SystemTime,
) -> Result<EntitlementVerdict, GateDenial> {
    let input = input(token, published);
    match actor
        .call(
            |r| EntitlementMsg::Verify(input, r),
            Some(Duration::from_secs(20)),
        )
        .await
        .unwrap()
    {
        ractor::rpc::CallResult::Success(r) => r,
        other => panic!("no answer: {other:?}"),
    }
}

async fn stats(actor: &ActorRef<EntitlementMsg>) -> EntitlementStats {
    actor
        .call(EntitlementMsg::Stats, Some(Duration::from_secs(5)))
        .await
        .unwrap()
        .unwrap()
}

async fn start(authority: &Arc<FakeAuthority>) -> (ActorRef<EntitlementMsg>, Arc<Gate>) {
    let gate = Arc::new(Gate {
        authority: authority.clone(),
        calls: AtomicUsize::new(0),
    });
    let (actor, _) = Actor::spawn(
        None,
        Entitlement,
        gate.clone() as Arc<dyn EntitlementVerifier>,
    )
    .await
    .unwrap();
    (actor, gate)
}

const NOW: u64 = 1_900_000_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_jobs_share_one_key_load_and_one_token_check() {
    let authority = FakeAuthority::new(&["k1"]);
    let (actor, gate) = start(&authority).await;
    let token = format!("k1:{}", NOW + 300);
    let jobs: Vec<_> = (0..20)
        .map(|_| {
            let (actor, token) = (actor.clone(), token.clone());
            tokio::spawn(async move { ask(&actor, &token, at(NOW)).await })
        })
        .collect();
    for j in jobs {
        j.await.unwrap().unwrap();
    }
    // The first jobs found no key set yet: they waited for the one load, then for the one
    // check of their token.
    assert_eq!(authority.fetches.load(Ordering::SeqCst), 1);
    assert_eq!(authority.checks.load(Ordering::SeqCst), 1);
    assert_eq!(
        gate.calls.load(Ordering::SeqCst),
        20,
        "the rest runs per job"
    );
    // Later jobs are answered from the cache.
    ask(&actor, &token, at(NOW + 10)).await.unwrap();
    let s = stats(&actor).await;
    assert_eq!((s.token_checks, s.token_cache_hits, s.key_loads), (1, 1, 1));
    actor.stop(None);
}

#[tokio::test]
async fn a_cached_token_serves_within_its_validity_and_not_after() {
    let authority = FakeAuthority::new(&["k1"]);
    let (actor, _) = start(&authority).await;
    let exp = NOW + 300;
    let token = format!("k1:{exp}");
    ask(&actor, &token, at(NOW)).await.unwrap();
    // Within validity (reuse_until = exp + 1): from the cache.
    ask(&actor, &token, at(exp)).await.unwrap();
    assert_eq!(authority.checks.load(Ordering::SeqCst), 1);
    assert_eq!(stats(&actor).await.token_cache_hits, 1);
    // At reuse_until the entry is gone: checked again, and refused.
    let d = ask(&actor, &token, at(exp + 1)).await.unwrap_err();
    assert_eq!(d.error.code(), ErrorCode::AuthExpired);
    assert_eq!((d.caller, d.auth), (None, Some(AuthState::Invalid)));
    assert_eq!(authority.checks.load(Ordering::SeqCst), 2);
    // A job published earlier than the cached verdict was made is judged at its own time.
    ask(&actor, &token, at(NOW - 100)).await.unwrap();
    actor.stop(None);
}

#[tokio::test]
async fn the_token_cache_is_bounded() {
    let authority = Arc::new(FakeAuthority {
        capacity: 2,
        ..Arc::into_inner(FakeAuthority::new(&["k1"])).unwrap()
    });
    let (actor, _) = start(&authority).await;
    for i in 0..5 {
        ask(&actor, &format!("k1:{}", NOW + 100 + i), at(NOW))
            .await
            .unwrap();
    }
    assert_eq!(stats(&actor).await.cached_tokens, 2);
    // The two latest to expire were kept: the first token is checked again.
    ask(&actor, &format!("k1:{}", NOW + 104), at(NOW))
        .await
        .unwrap();
    assert_eq!(authority.checks.load(Ordering::SeqCst), 5);
    ask(&actor, &format!("k1:{}", NOW + 100), at(NOW))
        .await
        .unwrap();
    assert_eq!(authority.checks.load(Ordering::SeqCst), 6);
    actor.stop(None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_kids_reload_once_and_a_failed_reload_keeps_the_last_good_set() {
    let authority = Arc::new(FakeAuthority {
        unknown_kid_interval: Duration::from_secs(1),
        ..Arc::into_inner(FakeAuthority::new(&["k1"])).unwrap()
    });
    let (actor, _) = start(&authority).await;
    ask(&actor, &format!("k1:{}", NOW + 300), at(NOW))
        .await
        .unwrap();
    assert_eq!(authority.fetches.load(Ordering::SeqCst), 1);

    // The Authority rotates in k2; concurrent jobs with k2 tokens share one reload.
    tokio::time::sleep(Duration::from_secs(1)).await;
    authority.published.lock().unwrap().push("k2".into());
    let jobs: Vec<_> = (0..10)
        .map(|i| {
            let actor = actor.clone();
            tokio::spawn(
                async move { ask(&actor, &format!("k2:{}", NOW + 300 + i), at(NOW)).await },
            )
        })
        .collect();
    for j in jobs {
        j.await.unwrap().unwrap();
    }
    assert_eq!(authority.fetches.load(Ordering::SeqCst), 2);

    // Made-up kids reload at most once per interval, and are refused.
    for _ in 0..3 {
        let d = ask(&actor, &format!("kx:{}", NOW + 300), at(NOW))
            .await
            .unwrap_err();
        assert_eq!(d.error.code(), ErrorCode::AuthInvalid);
    }
    assert_eq!(authority.fetches.load(Ordering::SeqCst), 2);

    // The Authority goes down: known keys keep working; an unknown kid (perhaps a rotation
    // we cannot see) is retryable.
    authority.fail_fetch.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let d = ask(&actor, &format!("ky:{}", NOW + 300), at(NOW))
        .await
        .unwrap_err();
    assert_eq!(
        d.error.code(),
        ErrorCode::EntitlementUnavailable,
        "{}",
        d.error
    );
    assert_eq!(d.auth, Some(AuthState::NotChecked));
    ask(&actor, &format!("k1:{}", NOW + 999), at(NOW))
        .await
        .unwrap();
    actor.stop(None);
}

#[tokio::test]
async fn a_withdrawn_key_ends_its_cached_tokens() {
    let authority = FakeAuthority::new(&["k1", "k2"]);
    let (actor, _) = start(&authority).await;
    let token = format!("k2:{}", NOW + 300);
    ask(&actor, &token, at(NOW)).await.unwrap();
    authority.published.lock().unwrap().retain(|k| k != "k2");
    actor.cast(EntitlementMsg::Refresh).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let d = ask(&actor, &token, at(NOW)).await.unwrap_err();
    assert_eq!(d.error.code(), ErrorCode::AuthInvalid);
    assert_eq!(stats(&actor).await.token_cache_hits, 0);
    actor.stop(None);
}

/// Restarts its one child (an Entitlement actor) when it fails, and says where it is now.
struct Restarter;

struct RestarterState {
    port: Arc<dyn EntitlementVerifier>,
    current: Arc<Mutex<Option<ActorRef<EntitlementMsg>>>>,
    restarts: Arc<AtomicUsize>,
}

impl Actor for Restarter {
    type Msg = ();
    type State = RestarterState;
    type Arguments = RestarterState;

    async fn pre_start(
        &self,
        myself: ActorRef<()>,
        state: RestarterState,
    ) -> Result<RestarterState, ActorProcessingErr> {
        let (child, _) =
            Actor::spawn_linked(None, Entitlement, state.port.clone(), myself.get_cell()).await?;
        *state.current.lock().unwrap() = Some(child);
        Ok(state)
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<()>,
        evt: SupervisionEvent,
        state: &mut RestarterState,
    ) -> Result<(), ActorProcessingErr> {
        if let SupervisionEvent::ActorFailed(..) = evt {
            state.restarts.fetch_add(1, Ordering::SeqCst);
            let (child, _) =
                Actor::spawn_linked(None, Entitlement, state.port.clone(), myself.get_cell())
                    .await?;
            *state.current.lock().unwrap() = Some(child);
        }
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_check_restarts_the_actor_with_its_caches_rebuilt() {
    let authority = FakeAuthority::new(&["k1"]);
    let gate: Arc<dyn EntitlementVerifier> = Arc::new(Gate {
        authority: authority.clone(),
        calls: AtomicUsize::new(0),
    });
    let current = Arc::new(Mutex::new(None));
    let restarts = Arc::new(AtomicUsize::new(0));
    let (sup, _) = Actor::spawn(
        None,
        Restarter,
        RestarterState {
            port: gate,
            current: current.clone(),
            restarts: restarts.clone(),
        },
    )
    .await
    .unwrap();
    let actor = || current.lock().unwrap().clone().unwrap();
    let token = format!("k1:{}", NOW + 300);
    ask(&actor(), &token, at(NOW)).await.unwrap();
    ask(&actor(), &token, at(NOW)).await.unwrap();
    assert_eq!(authority.checks.load(Ordering::SeqCst), 1);

    // The panicking job gets no answer (its call fails); the actor is restarted.
    let fetches = authority.fetches.load(Ordering::SeqCst);
    let first = actor();
    let input = input("panic", at(NOW));
    let r = first
        .call(
            |r| EntitlementMsg::Verify(input, r),
            Some(Duration::from_secs(10)),
        )
        .await;
    assert!(
        !matches!(r, Ok(ractor::rpc::CallResult::Success(_))),
        "the panicking check answered"
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while restarts.load(Ordering::SeqCst) == 0 || actor().get_id() == first.get_id() {
        assert!(std::time::Instant::now() < deadline, "not restarted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The new incarnation starts empty: it loads the key set again and checks the token
    // again, once, then serves it from its cache.
    ask(&actor(), &token, at(NOW)).await.unwrap();
    ask(&actor(), &token, at(NOW)).await.unwrap();
    assert_eq!(authority.fetches.load(Ordering::SeqCst), fetches + 1);
    assert_eq!(
        authority.checks.load(Ordering::SeqCst),
        3,
        "1 + the panic + 1"
    );
    let s = stats(&actor()).await;
    assert_eq!((s.token_checks, s.token_cache_hits), (1, 1));
    sup.stop(None);
}
