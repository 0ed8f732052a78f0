//! The Entitlement actor's caches and disciplines, with in-memory ports (no network).
//!
//! Tokens of the fake Authority are `kid:exp` (`exp` in unix seconds); `panic` makes the
//! check panic. Licence JWTs of the fake licensing authority are `kid:exp` too; the fake
//! licensing service knows the value `good` and rejects any other, and its answers' ages are
//! measured on a clock the test moves.

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

// ---- the licence side: licence JWTs and licensing answers ----

/// A monotonic clock the test moves; it stands still otherwise.
struct ManualClock {
    start: std::time::Instant,
    offset: Mutex<Duration>,
}

impl ManualClock {
    fn new() -> Arc<Self> {
        Arc::new(ManualClock {
            start: std::time::Instant::now(),
            offset: Mutex::new(Duration::ZERO),
        })
    }

    fn advance(&self, by: Duration) {
        *self.offset.lock().unwrap() += by;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> std::time::Instant {
        self.start + *self.offset.lock().unwrap()
    }
}

fn licence_terms(tenant: &str, exp: u64) -> crate::ports::LicenceTerms {
    crate::ports::LicenceTerms {
        tenant: Some(tenant.into()),
        plan: Some("team".into()),
        features: vec!["signer.sign".into()],
        expires: Some(exp),
        not_before: None,
        revoked: false,
    }
}

/// Judges terms as the real port does in substance: tenant, then `exp` at the job's time.
fn judge_terms(
    terms: &crate::ports::LicenceTerms,
    tenant: &str,
    now: u64,
) -> Result<PoeGrant, PoeRefusal> {
    let refuse = |error: SignerError, state: PoeState| PoeRefusal {
        error,
        state,
        plan: None,
    };
    if terms.tenant.as_deref() != Some(tenant) {
        return Err(refuse(
            SignerError::PoeInvalid("another tenant's".into()),
            PoeState::Invalid,
        ));
    }
    if terms.expires.is_some_and(|exp| exp < now) {
        return Err(refuse(
            SignerError::PoeExpired("expired".into()),
            PoeState::Expired,
        ));
    }
    Ok(PoeGrant {
        state: PoeState::Valid,
        plan: terms.plan.clone().unwrap_or_default(),
    })
}

/// Licences of the fake licensing authority are `kid:exp`.
#[derive(Default)]
struct FakeLicences {
    /// The kids in the licensing set now.
    published: Mutex<Vec<String>>,
    fetches: AtomicUsize,
    checks: AtomicUsize,
    judged: AtomicUsize,
    fail_fetch: AtomicBool,
    slow: Duration,
    unknown_kid_interval: Duration,
}

impl FakeLicences {
    fn new(kids: &[&str]) -> Arc<Self> {
        Arc::new(FakeLicences {
            published: Mutex::new(kids.iter().map(|k| k.to_string()).collect()),
            slow: Duration::from_millis(100),
            unknown_kid_interval: Duration::from_secs(3600),
            ..FakeLicences::default()
        })
    }
}

#[async_trait]
impl LicenceAuthority for FakeLicences {
    async fn fetch_keys(&self) -> Result<Arc<dyn TokenKeys>, PortError> {
        self.fetches.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(self.slow).await;
        if self.fail_fetch.load(Ordering::SeqCst) {
            return Err(PortError::transient("licensing JWKS unreadable"));
        }
        Ok(Arc::new(FakeKeys(self.published.lock().unwrap().clone())))
    }

    fn verify_licence(
        &self,
        raw: &str,
        keys: &dyn TokenKeys,
    ) -> Result<VerifiedLicence, LicenceRefusal> {
        self.checks.fetch_add(1, Ordering::SeqCst);
        std::thread::sleep(self.slow);
        let invalid = |why: &str| PoeRefusal {
            error: SignerError::PoeInvalid(why.into()),
            state: PoeState::Invalid,
            plan: None,
        };
        let (kid, exp) = raw
            .split_once(':')
            .ok_or_else(|| LicenceRefusal::Refused(invalid("garbage")))?;
        let exp: u64 = exp
            .parse()
            .map_err(|_| LicenceRefusal::Refused(invalid("exp")))?;
        if !keys.has_key(kid) {
            return Err(LicenceRefusal::UnknownKey {
                kid: kid.into(),
                refusal: invalid(&format!("no licensing key {kid}")),
            });
        }
        Ok(VerifiedLicence {
            terms: licence_terms("acme", exp),
            key_id: kid.into(),
            reuse_until: exp + 1,
        })
    }

    fn judge(
        &self,
        licence: &VerifiedLicence,
        tenant: &str,
        now: u64,
    ) -> Result<PoeGrant, PoeRefusal> {
        self.judged.fetch_add(1, Ordering::SeqCst);
        judge_terms(&licence.terms, tenant, now)
    }

    fn refresh_every(&self) -> Duration {
        Duration::from_secs(3600)
    }

    fn unknown_kid_interval(&self) -> Duration {
        self.unknown_kid_interval
    }
}

/// A licensing service that knows `good` (for any tenant) and rejects anything else; down
/// while `failing` is set.
struct FakeService {
    requests: AtomicUsize,
    failing: AtomicBool,
    slow: Duration,
    ttl: Duration,
    grace: Duration,
    clock: Arc<ManualClock>,
}

impl FakeService {
    fn new(ttl_ms: u64, grace_ms: u64) -> Arc<Self> {
        Arc::new(FakeService {
            requests: AtomicUsize::new(0),
            failing: AtomicBool::new(false),
            slow: Duration::from_millis(100),
            ttl: Duration::from_millis(ttl_ms),
            grace: Duration::from_millis(grace_ms),
            clock: ManualClock::new(),
        })
    }
}

#[async_trait]
impl LicensingService for FakeService {
    async fn introspect(&self, value: &str, tenant: &str) -> Result<LicensingAnswer, PortError> {
        self.requests.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(self.slow).await;
        if self.failing.load(Ordering::SeqCst) {
            return Err(PortError::transient("licensing: HTTP 503"));
        }
        Ok(match value {
            "good" => LicensingAnswer::Answered {
                active: true,
                terms: licence_terms(tenant, NOW + 3600),
            },
            _ => LicensingAnswer::Rejected(404),
        })
    }

    fn judge(
        &self,
        answer: &LicensingAnswer,
        tenant: &str,
        now: u64,
    ) -> Result<PoeGrant, PoeRefusal> {
        match answer {
            LicensingAnswer::Answered {
                active: true,
                terms,
            } => judge_terms(terms, tenant, now),
            _ => Err(PoeRefusal {
                error: SignerError::PoeInvalid("rejected".into()),
                state: PoeState::Invalid,
                plan: None,
            }),
        }
    }

    fn cache_ttl(&self) -> Duration {
        self.ttl
    }

    fn grace(&self) -> Duration {
        self.grace
    }

    fn clock(&self) -> Arc<dyn Clock> {
        self.clock.clone()
    }
}

/// A gate whose caller step passes every job (counting them) and leaves the licence to the
/// actor, by the request's `poe.format`.
struct LicenceGate {
    licences: Arc<FakeLicences>,
    service: Arc<FakeService>,
    authenticated: AtomicUsize,
}

#[async_trait]
impl EntitlementVerifier for LicenceGate {
    fn licences(&self) -> Option<Arc<dyn LicenceAuthority>> {
        Some(self.licences.clone())
    }

    fn licensing(&self) -> Option<Arc<dyn LicensingService>> {
        Some(self.service.clone())
    }

    async fn verify(
        &self,
        _: &GateInput,
        _: Option<&VerifiedToken>,
    ) -> Result<EntitlementVerdict, GateDenial> {
        Err(SignerError::Internal("the actor calls authenticate".into()).into())
    }

    async fn authenticate(
        &self,
        input: &GateInput,
        _: Option<&VerifiedToken>,
    ) -> Result<Authenticated, GateDenial> {
        self.authenticated.fetch_add(1, Ordering::SeqCst);
        Ok(Authenticated {
            caller: Some(crate::audit::Caller {
                iss: "https://authority.test".into(),
                sub: "svc:scanner".into(),
            }),
            auth: AuthState::Valid,
            licence: match input.request.poe.format {
                crate::request::PoeFormat::Jwt => LicenceStep::Jwt,
                crate::request::PoeFormat::Introspect => LicenceStep::Introspect,
            },
        })
    }
}

async fn start_licences(
    licences: &Arc<FakeLicences>,
    service: &Arc<FakeService>,
) -> (ActorRef<EntitlementMsg>, Arc<LicenceGate>) {
    let gate = Arc::new(LicenceGate {
        licences: licences.clone(),
        service: service.clone(),
        authenticated: AtomicUsize::new(0),
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

/// A job of `tenant` with this PoE, published at `published`.
fn poe_input(format: &str, value: &str, tenant: &str, published: SystemTime) -> GateInput {
    let mut input = input("unused", published);
    let mut request = (*input.request).clone();
    request.tenant = tenant.into();
    request.poe =
        serde_json::from_value(serde_json::json!({"format": format, "value": value})).unwrap();
    input.request = Arc::new(request);
    input
}

async fn ask_poe(
    actor: &ActorRef<EntitlementMsg>,
    input: GateInput,
) -> Result<EntitlementVerdict, GateDenial> {
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

fn jwt(licence: &str, published: u64) -> GateInput {
    poe_input("jwt", licence, "acme", at(published))
}

fn introspect(value: &str, tenant: &str) -> GateInput {
    poe_input("introspect", value, tenant, at(NOW))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_licence_costs_one_signature_check_for_many_jobs_and_is_judged_per_job() {
    let licences = FakeLicences::new(&["l1"]);
    let (actor, gate) = start_licences(&licences, &FakeService::new(60_000, 0)).await;
    let exp = NOW + 300;
    let licence = format!("l1:{exp}");
    // Concurrent jobs: the first found no key set yet (the actor started without one): one
    // load, then one check of the licence, shared by all.
    let jobs: Vec<_> = (0..20)
        .map(|_| {
            let (actor, licence) = (actor.clone(), licence.clone());
            tokio::spawn(async move { ask_poe(&actor, jwt(&licence, NOW)).await })
        })
        .collect();
    for j in jobs {
        let v = j.await.unwrap().unwrap();
        assert_eq!((v.poe, v.plan.as_str()), (PoeState::Valid, "team"));
        assert_eq!(v.auth, AuthState::Valid);
    }
    assert_eq!(licences.fetches.load(Ordering::SeqCst), 1);
    assert_eq!(licences.checks.load(Ordering::SeqCst), 1);
    // Later jobs come from the cache...
    for _ in 0..5 {
        ask_poe(&actor, jwt(&licence, NOW + 10)).await.unwrap();
    }
    // ...and are still judged for each job: the same licence in another tenant's job is
    // refused, from the cache.
    let other = poe_input("jwt", &licence, "globex", at(NOW + 10));
    let d = ask_poe(&actor, other).await.unwrap_err();
    assert_eq!(d.error.code(), ErrorCode::PoeInvalid, "{}", d.error);
    assert_eq!(
        (d.poe, d.auth),
        (Some(PoeState::Invalid), Some(AuthState::Valid))
    );
    assert!(
        d.caller.is_some(),
        "the caller was established before the licence"
    );
    assert_eq!(
        licences.checks.load(Ordering::SeqCst),
        1,
        "one signature check"
    );
    assert_eq!(
        licences.judged.load(Ordering::SeqCst),
        26,
        "one judgement per job"
    );
    assert_eq!(gate.authenticated.load(Ordering::SeqCst), 26);
    let s = stats(&actor).await;
    assert_eq!(
        (s.licence_checks, s.licence_cache_hits, s.cached_licences),
        (1, 6, 1)
    );
    // A job published at its last second of use is served from the cache; one published at
    // reuse_until (exp + 1) finds the entry gone: checked again, and refused by its date.
    ask_poe(&actor, jwt(&licence, exp)).await.unwrap();
    let d = ask_poe(&actor, jwt(&licence, exp + 1)).await.unwrap_err();
    assert_eq!(d.error.code(), ErrorCode::PoeExpired, "{}", d.error);
    assert_eq!(d.poe, Some(PoeState::Expired));
    assert_eq!(licences.checks.load(Ordering::SeqCst), 2);
    actor.stop(None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_out_licensing_key_stops_its_cached_licences_counting() {
    let licences = FakeLicences::new(&["l1", "l2"]);
    let (actor, _) = start_licences(&licences, &FakeService::new(60_000, 0)).await;
    let by_l2 = format!("l2:{}", NOW + 300);
    let by_l1 = format!("l1:{}", NOW + 300);
    for licence in [&by_l1, &by_l2, &by_l1, &by_l2] {
        ask_poe(&actor, jwt(licence, NOW)).await.unwrap();
    }
    assert_eq!(licences.checks.load(Ordering::SeqCst), 2);

    // The licensing service rotates l2 out; the next reload of its set drops it.
    licences.published.lock().unwrap().retain(|k| k != "l2");
    let before = stats(&actor).await;
    actor.cast(EntitlementMsg::RefreshLicenceKeys).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while stats(&actor).await.licence_key_loads_finished == before.licence_key_loads_finished {
        assert!(std::time::Instant::now() < deadline, "not reloaded");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Its cached licence no longer counts: checked again, against a set without its key.
    let d = ask_poe(&actor, jwt(&by_l2, NOW)).await.unwrap_err();
    assert_eq!(d.error.code(), ErrorCode::PoeInvalid, "{}", d.error);
    assert_eq!(d.poe, Some(PoeState::Invalid));
    assert_eq!(licences.checks.load(Ordering::SeqCst), 3);
    // The other key's licence still comes from the cache.
    ask_poe(&actor, jwt(&by_l1, NOW)).await.unwrap();
    let s = stats(&actor).await;
    assert_eq!(s.licence_cache_hits, before.licence_cache_hits + 1);
    assert_eq!(licences.checks.load(Ordering::SeqCst), 3);
    actor.stop(None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_jobs_with_one_licence_share_one_licensing_request() {
    let service = FakeService::new(60_000, 0);
    let (actor, _) = start_licences(&FakeLicences::new(&[]), &service).await;
    let jobs: Vec<_> = (0..20)
        .map(|i| {
            let actor = actor.clone();
            // Two values, each for two tenants: four requests, each shared by five jobs.
            let value = if i % 2 == 0 { "good" } else { "unknown" };
            let tenant = if i % 4 < 2 { "acme" } else { "globex" };
            tokio::spawn(async move { (value, ask_poe(&actor, introspect(value, tenant)).await) })
        })
        .collect();
    for j in jobs {
        match j.await.unwrap() {
            ("good", r) => assert_eq!(r.unwrap().poe, PoeState::Valid),
            (_, r) => assert_eq!(r.unwrap_err().error.code(), ErrorCode::PoeInvalid),
        }
    }
    assert_eq!(
        service.requests.load(Ordering::SeqCst),
        4,
        "one request per value and tenant"
    );
    // Within the TTL, answers (refusals too) come from the cache.
    ask_poe(&actor, introspect("good", "acme")).await.unwrap();
    ask_poe(&actor, introspect("unknown", "globex"))
        .await
        .unwrap_err();
    assert_eq!(service.requests.load(Ordering::SeqCst), 4);
    let s = stats(&actor).await;
    assert_eq!((s.licensing_requests, s.cached_answers), (4, 4));
    assert!(s.answer_cache_hits >= 2, "{s:?}");
    actor.stop(None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn during_an_outage_a_cached_answer_serves_until_ttl_plus_grace_and_not_after() {
    let service = FakeService::new(200, 600);
    let (actor, _) = start_licences(&FakeLicences::new(&[]), &service).await;
    let good = || introspect("good", "acme");
    ask_poe(&actor, good()).await.unwrap();
    service.clock.advance(Duration::from_millis(199));
    ask_poe(&actor, good()).await.unwrap();
    assert_eq!(service.requests.load(Ordering::SeqCst), 1, "within the TTL");

    // Past the TTL the service is asked again; it is down: the answer serves in its grace.
    service.failing.store(true, Ordering::SeqCst);
    service.clock.advance(Duration::from_millis(1));
    let v = ask_poe(&actor, good()).await.unwrap();
    assert_eq!(v.poe, PoeState::Valid);
    assert_eq!(service.requests.load(Ordering::SeqCst), 2);
    // A value never answered has nothing to fall back on: retryable.
    let d = ask_poe(&actor, introspect("good", "globex"))
        .await
        .unwrap_err();
    assert_eq!(d.error.code(), ErrorCode::EntitlementUnavailable);
    assert!(d.error.code().retryable());
    assert_eq!(
        (d.poe, d.auth),
        (Some(PoeState::Unavailable), Some(AuthState::Valid))
    );

    // On the last millisecond of ttl + grace (799 ms after the answer) it still serves...
    service.clock.advance(Duration::from_millis(599));
    ask_poe(&actor, good()).await.unwrap();
    // ...at 800 ms it does not.
    service.clock.advance(Duration::from_millis(1));
    let d = ask_poe(&actor, good()).await.unwrap_err();
    assert_eq!(
        d.error.code(),
        ErrorCode::EntitlementUnavailable,
        "{}",
        d.error
    );
    assert_eq!(d.poe, Some(PoeState::Unavailable));
    assert!(d.caller.is_some());
    assert_eq!(stats(&actor).await.answers_in_grace, 2);

    // The service is back: a fresh answer, cached for a new TTL.
    service.failing.store(false, Ordering::SeqCst);
    ask_poe(&actor, good()).await.unwrap();
    let requests = service.requests.load(Ordering::SeqCst);
    service.clock.advance(Duration::from_millis(100));
    ask_poe(&actor, good()).await.unwrap();
    assert_eq!(service.requests.load(Ordering::SeqCst), requests);
    actor.stop(None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_licensing_kids_reload_once_and_a_failed_reload_keeps_the_last_good_set() {
    let licences = Arc::new(FakeLicences {
        unknown_kid_interval: Duration::from_secs(1),
        ..Arc::into_inner(FakeLicences::new(&["l1"])).unwrap()
    });
    let (actor, _) = start_licences(&licences, &FakeService::new(60_000, 0)).await;
    ask_poe(&actor, jwt(&format!("l1:{}", NOW + 300), NOW))
        .await
        .unwrap();
    assert_eq!(licences.fetches.load(Ordering::SeqCst), 1);

    // The licensing service rotates in l3; concurrent jobs with l3 licences share one reload.
    tokio::time::sleep(Duration::from_secs(1)).await;
    licences.published.lock().unwrap().push("l3".into());
    let jobs: Vec<_> = (0..10)
        .map(|i| {
            let actor = actor.clone();
            tokio::spawn(async move {
                ask_poe(&actor, jwt(&format!("l3:{}", NOW + 300 + i), NOW)).await
            })
        })
        .collect();
    for j in jobs {
        j.await.unwrap().unwrap();
    }
    assert_eq!(licences.fetches.load(Ordering::SeqCst), 2);

    // Made-up kids reload at most once per interval, and are refused.
    for _ in 0..3 {
        let d = ask_poe(&actor, jwt(&format!("lx:{}", NOW + 300), NOW))
            .await
            .unwrap_err();
        assert_eq!(d.error.code(), ErrorCode::PoeInvalid, "{}", d.error);
    }
    assert_eq!(licences.fetches.load(Ordering::SeqCst), 2);

    // The licensing set cannot be read: known keys keep working from the last good set; an
    // unknown kid (perhaps a rotation we cannot see) is retryable.
    licences.fail_fetch.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let d = ask_poe(&actor, jwt(&format!("ly:{}", NOW + 300), NOW))
        .await
        .unwrap_err();
    assert_eq!(
        d.error.code(),
        ErrorCode::EntitlementUnavailable,
        "{}",
        d.error
    );
    assert_eq!(d.poe, Some(PoeState::Unavailable));
    ask_poe(&actor, jwt(&format!("l1:{}", NOW + 999), NOW))
        .await
        .unwrap();
    actor.stop(None);
}
