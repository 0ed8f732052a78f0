//! Tests against the Redis on 127.0.0.1:6379 (each with its own key prefix, removed at the
//! end) and of the in-process store.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ::redis as redis_rs;
use signer_actors::error::{ErrorCode, SignerError};
use signer_actors::ports::{QuotaGrant, QuotaRelease, QuotaRequest, QuotaStore};

use super::*;

const REDIS_URL: &str = "redis://127.0.0.1:6379";

fn plan(rps: f64, burst: u32, max_concurrent: u32, daily_cap: u64) -> Plan {
    Plan {
        requests_per_second: rps,
        burst,
        max_concurrent,
        max_payload_bytes: 1024,
        daily_cap,
        max_signatures_per_request: None,
    }
}

fn plans(p: Plan) -> BTreeMap<String, Plan> {
    BTreeMap::from([("team".to_owned(), p)])
}

fn pool(url: &str) -> crate::redis::Redis {
    crate::redis::connect_url(url).unwrap()
}

/// A key prefix of its own, and the means to remove its keys.
struct Space {
    prefix: String,
    pool: crate::redis::Redis,
}

impl Space {
    fn new() -> Self {
        let mut bytes = [0u8; 8];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes).unwrap();
        Space {
            prefix: format!("test:quota:{}:", hex::encode(bytes)),
            pool: pool(REDIS_URL),
        }
    }

    fn gate(&self, p: Plan) -> QuotaGate {
        QuotaGate {
            mode: GateMode::Enforce,
            fail_open: false,
            redis_prefix: self.prefix.clone(),
            batch_max: 64,
            plans: plans(p),
        }
    }

    /// A replica: its own pool, same keys.
    fn replica(&self, p: Plan) -> RedisQuota {
        RedisQuota::new(pool(REDIS_URL), self.gate(p)).unwrap()
    }

    async fn keys(&self) -> Vec<String> {
        let mut conn = self.pool.clone();
        redis_rs::cmd("KEYS")
            .arg(format!("{}*", self.prefix))
            .query_async(&mut conn)
            .await
            .unwrap()
    }

    async fn clean(self) {
        let keys = self.keys().await;
        if !keys.is_empty() {
            let mut conn = self.pool.clone();
            redis_rs::cmd("DEL")
                .arg(&keys)
                .query_async::<i64>(&mut conn)
                .await
                .unwrap();
        }
    }
}

/// `(reason word in the message, retry_after_ms)` of a quota_exceeded error.
fn refused(r: Result<QuotaGrant, SignerError>) -> (String, u64) {
    match r {
        Err(e @ SignerError::QuotaExceeded { .. }) => {
            assert!(e.code().retryable());
            (e.message().to_owned(), e.retry_after_ms().unwrap())
        }
        other => panic!("expected quota_exceeded, got {other:?}"),
    }
}

fn ms_to_utc_midnight() -> u64 {
    let now = unix_ms();
    (now / DAY_MS + 1) * DAY_MS - now
}

// ---- behaviour shared by both stores ----

async fn burst_then_refused(q: &dyn QuotaStore) {
    // 1 request/s, burst 5.
    for i in 0..5 {
        assert_eq!(
            q.acquire("acme", "team", 10, 1).await.unwrap(),
            QuotaGrant::Allowed,
            "request {i}"
        );
        q.release("acme", "team").await;
    }
    let (message, wait) = refused(q.acquire("acme", "team", 10, 1).await);
    assert_eq!(message, "plan 'team' allows 1 signatures/s");
    assert!((500..=1000).contains(&wait), "retryAfterMs {wait}");
}

async fn refills(q: &dyn QuotaStore) {
    // 2 requests/s, burst 2.
    for _ in 0..2 {
        q.acquire("acme", "team", 10, 1).await.unwrap();
        q.release("acme", "team").await;
    }
    let (_, wait) = refused(q.acquire("acme", "team", 10, 1).await);
    assert!((1..=500).contains(&wait), "retryAfterMs {wait}");
    tokio::time::sleep(Duration::from_millis(wait + 30)).await;
    assert_eq!(
        q.acquire("acme", "team", 10, 1).await.unwrap(),
        QuotaGrant::Allowed
    );
    q.release("acme", "team").await;
    refused(q.acquire("acme", "team", 10, 1).await);
}

async fn concurrency(q: &dyn QuotaStore) {
    // 2 concurrent jobs, plenty of rate.
    assert_eq!(
        q.acquire("acme", "team", 10, 1).await.unwrap(),
        QuotaGrant::Allowed
    );
    q.acquire("acme", "team", 10, 1).await.unwrap();
    let (message, wait) = refused(q.acquire("acme", "team", 10, 1).await);
    assert_eq!(message, "plan 'team' allows 2 concurrent jobs per tenant");
    assert_eq!(wait, CONCURRENCY_RETRY_MS);
    // Another tenant has slots of its own.
    q.acquire("other", "team", 10, 1).await.unwrap();
    q.release("other", "team").await;

    q.release("acme", "team").await;
    q.acquire("acme", "team", 10, 1).await.unwrap();
    refused(q.acquire("acme", "team", 10, 1).await);

    // Surplus releases never take the count below zero.
    for _ in 0..5 {
        q.release("acme", "team").await;
    }
    q.acquire("acme", "team", 10, 1).await.unwrap();
    q.acquire("acme", "team", 10, 1).await.unwrap();
    refused(q.acquire("acme", "team", 10, 1).await);
    q.release("acme", "team").await;
    q.release("acme", "team").await;
}

async fn daily_cap(q: &dyn QuotaStore) {
    // cap 3 a day, plenty of rate and slots.
    for _ in 0..3 {
        q.acquire("acme", "team", 10, 1).await.unwrap();
        q.release("acme", "team").await;
    }
    let (message, wait) = refused(q.acquire("acme", "team", 10, 1).await);
    assert_eq!(message, "plan 'team' allows 3 signatures per UTC day");
    let expected = ms_to_utc_midnight();
    assert!(
        wait.abs_diff(expected) < 5_000,
        "retryAfterMs {wait}, ms to UTC midnight {expected}"
    );
    q.acquire("other", "team", 10, 1).await.unwrap();
}

async fn payload_and_plan(q: &dyn QuotaStore) {
    // burst 1: a refused payload takes no token.
    let e = q.acquire("acme", "team", 1025, 1).await.unwrap_err();
    assert_eq!(e.code(), ErrorCode::PayloadTooLarge);
    assert!(!e.code().retryable());
    assert_eq!(
        e.message(),
        "payload of 1025 bytes exceeds the 1024 bytes allowed by plan 'team'"
    );
    let e = q.acquire("acme", "gold", 10, 1).await.unwrap_err();
    assert_eq!(
        e,
        SignerError::EntitlementDenied("plan 'gold' is not configured".into())
    );
    assert_eq!(
        q.acquire("acme", "team", 1024, 1).await.unwrap(),
        QuotaGrant::Allowed
    );
    q.release("acme", "team").await;
    refused(q.acquire("acme", "team", 10, 1).await);
}

/// `quota_exceeded` never comes for a request the plan can never grant: that is
/// `entitlement_denied`, with the limit in the message.
fn denied(r: Result<QuotaGrant, SignerError>, limit: &str) {
    match r {
        Err(SignerError::EntitlementDenied(m)) => {
            assert!(m.contains(limit), "{m}");
            assert!(!ErrorCode::EntitlementDenied.retryable());
        }
        other => panic!("expected entitlement_denied, got {other:?}"),
    }
}

async fn signatures_are_units(q: &dyn QuotaStore) {
    // One token per 100 s, burst 3: nothing refills during the test.
    assert_eq!(
        q.acquire("acme", "team", 10, 2).await.unwrap(),
        QuotaGrant::Allowed
    );
    q.release("acme", "team").await;
    // One token left: a second two-signature job is refused, and takes nothing...
    let (message, wait) = refused(q.acquire("acme", "team", 10, 2).await);
    assert_eq!(message, "plan 'team' allows 0.01 signatures/s");
    assert!(wait > 90_000, "retryAfterMs {wait} (one more token)");
    // ...so the last token is still there for a one-signature job.
    assert_eq!(
        q.acquire("acme", "team", 10, 1).await.unwrap(),
        QuotaGrant::Allowed
    );
    q.release("acme", "team").await;
    refused(q.acquire("acme", "team", 10, 1).await);
    // More signatures than the bucket holds could never be granted.
    denied(
        q.acquire("globex", "team", 10, 4).await,
        "the profile makes 4 signatures; plan 'team' allows a burst of 3",
    );
    // and took nothing: globex still has its whole burst; 0 counts as 1
    q.acquire("globex", "team", 10, 0).await.unwrap();
    q.acquire("globex", "team", 10, 2).await.unwrap();
    refused(q.acquire("globex", "team", 10, 1).await);
}

async fn daily_cap_counts_signatures(q: &dyn QuotaStore) {
    // cap 5 signatures a day, plenty of rate and slots.
    for _ in 0..2 {
        q.acquire("acme", "team", 10, 2).await.unwrap();
        q.release("acme", "team").await;
    }
    let (message, _) = refused(q.acquire("acme", "team", 10, 2).await);
    assert_eq!(message, "plan 'team' allows 5 signatures per UTC day");
    q.acquire("acme", "team", 10, 1).await.unwrap();
    q.release("acme", "team").await;
    refused(q.acquire("acme", "team", 10, 1).await);
    denied(
        q.acquire("other", "team", 10, 6).await,
        "allows 5 per UTC day",
    );
}

async fn signature_cap_and_one_slot_per_job(q: &dyn QuotaStore) {
    // at most 2 signatures per request, burst 3, one job at a time.
    denied(
        q.acquire("acme", "team", 10, 3).await,
        "the profile makes 3 signatures; plan 'team' allows 2 per request",
    );
    // the refusal took nothing: the whole burst is still there
    q.acquire("acme", "team", 10, 2).await.unwrap();
    // a two-signature job holds one slot, not two
    let (message, _) = refused(q.acquire("acme", "team", 10, 1).await);
    assert_eq!(message, "plan 'team' allows 1 concurrent jobs per tenant");
    q.release("acme", "team").await;
    q.acquire("acme", "team", 10, 1).await.unwrap();
    q.release("acme", "team").await;
    refused(q.acquire("acme", "team", 10, 1).await);
}

fn capped(rps: f64, burst: u32, max_concurrent: u32, cap: u32) -> Plan {
    Plan {
        max_signatures_per_request: Some(cap),
        ..plan(rps, burst, max_concurrent, 0)
    }
}

// ---- Redis ----

#[tokio::test]
async fn redis_charges_one_unit_per_signature() {
    let s = Space::new();
    signatures_are_units(&s.replica(plan(0.01, 3, 100, 0))).await;
    s.clean().await;
}

#[tokio::test]
async fn redis_daily_cap_counts_signatures() {
    let s = Space::new();
    daily_cap_counts_signatures(&s.replica(plan(1000.0, 100, 100, 5))).await;
    s.clean().await;
}

#[tokio::test]
async fn redis_signature_cap_and_one_slot_per_job() {
    let s = Space::new();
    signature_cap_and_one_slot_per_job(&s.replica(capped(0.01, 3, 1, 2))).await;
    // the refused request wrote nothing for its tenant
    let q = s.replica(capped(0.01, 3, 1, 2));
    denied(q.acquire("initech", "team", 10, 3).await, "per request");
    assert!(
        !s.keys().await.iter().any(|k| k.contains("{initech}")),
        "{:?}",
        s.keys().await
    );
    s.clean().await;
}

#[tokio::test]
async fn redis_multi_signature_charges_are_atomic_across_replicas() {
    let s = Space::new();
    // burst 10, nothing refills: 40 concurrent three-signature jobs from two replicas
    // get exactly three grants (9 units), and no refused job takes a partial charge.
    let p = plan(0.01, 10, 1000, 0);
    let replicas = [Arc::new(s.replica(p.clone())), Arc::new(s.replica(p))];
    let mut tasks = Vec::new();
    for i in 0..40 {
        let q = replicas[i % 2].clone();
        tasks.push(tokio::spawn(async move {
            q.acquire("acme", "team", 10, 3).await
        }));
    }
    let mut allowed = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(QuotaGrant::Allowed) => allowed += 1,
            r => {
                refused(r);
            }
        }
    }
    assert_eq!(allowed, 3);
    replicas[0].acquire("acme", "team", 10, 1).await.unwrap();
    refused(replicas[1].acquire("acme", "team", 10, 1).await);
    s.clean().await;
}

#[tokio::test]
async fn redis_burst_then_quota_exceeded() {
    let s = Space::new();
    burst_then_refused(&s.replica(plan(1.0, 5, 100, 0))).await;
    s.clean().await;
}

#[tokio::test]
async fn redis_refills_over_time() {
    let s = Space::new();
    refills(&s.replica(plan(2.0, 2, 100, 0))).await;
    s.clean().await;
}

#[tokio::test]
async fn redis_replicas_share_one_budget() {
    let s = Space::new();
    // One token per 100 s: nothing refills during the test.
    let p = plan(0.01, 10, 1000, 0);
    let replicas = [Arc::new(s.replica(p.clone())), Arc::new(s.replica(p))];
    let mut tasks = Vec::new();
    for i in 0..40 {
        let q = replicas[i % 2].clone();
        tasks.push(tokio::spawn(async move {
            q.acquire("acme", "team", 10, 1).await
        }));
    }
    let mut allowed = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(QuotaGrant::Allowed) => allowed += 1,
            r => {
                let (message, wait) = refused(r);
                assert_eq!(message, "plan 'team' allows 0.01 signatures/s");
                assert!(wait > 90_000, "retryAfterMs {wait}");
            }
        }
    }
    assert_eq!(allowed, 10);
    s.clean().await;
}

#[tokio::test]
async fn redis_tenants_are_independent() {
    let s = Space::new();
    let q = s.replica(plan(0.01, 1, 100, 0));
    q.acquire("acme", "team", 10, 1).await.unwrap();
    refused(q.acquire("acme", "team", 10, 1).await);
    assert_eq!(
        q.acquire("globex", "team", 10, 1).await.unwrap(),
        QuotaGrant::Allowed
    );
    s.clean().await;
}

#[tokio::test]
async fn redis_concurrency_limit_and_release() {
    let s = Space::new();
    concurrency(&s.replica(plan(1000.0, 100, 2, 0))).await;
    s.clean().await;
}

#[tokio::test]
async fn redis_slots_of_a_crashed_replica_expire() {
    let s = Space::new();
    let p = plan(1000.0, 100, 1, 0);
    let crashed = s
        .replica(p.clone())
        .with_slot_lease(Duration::from_millis(300));
    crashed.acquire("acme", "team", 10, 1).await.unwrap();
    drop(crashed); // never releases
    let q = s.replica(p);
    refused(q.acquire("acme", "team", 10, 1).await);
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        q.acquire("acme", "team", 10, 1).await.unwrap(),
        QuotaGrant::Allowed
    );
    // Releasing on one replica never frees another's slot.
    let other = s.replica(plan(1000.0, 100, 1, 0));
    other.release("acme", "team").await;
    refused(other.acquire("acme", "team", 10, 1).await);
    q.release("acme", "team").await;
    other.acquire("acme", "team", 10, 1).await.unwrap();
    s.clean().await;
}

#[tokio::test]
async fn redis_daily_cap() {
    let s = Space::new();
    let q = s.replica(plan(1000.0, 100, 100, 3));
    daily_cap(&q).await;
    // The counter expires after the day (plus margin), the bucket once it would be full.
    let mut conn = s.pool.clone();
    let daily: i64 = redis_rs::cmd("PTTL")
        .arg(format!("{}{{acme}}:daily", s.prefix))
        .query_async(&mut conn)
        .await
        .unwrap();
    let expected = ms_to_utc_midnight() + 3_600_000;
    assert!(
        (daily as u64).abs_diff(expected) < 5_000,
        "{daily} vs {expected}"
    );
    let bucket: i64 = redis_rs::cmd("PTTL")
        .arg(format!("{}{{acme}}:bucket", s.prefix))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!((1..=1_100).contains(&bucket), "bucket PTTL {bucket}");
    drop(conn);
    s.clean().await;
}

#[tokio::test]
async fn redis_payload_too_large_and_unknown_plan() {
    let s = Space::new();
    payload_and_plan(&s.replica(plan(0.01, 1, 100, 0))).await;
    s.clean().await;
}

#[tokio::test]
async fn redis_longest_wait_wins() {
    let s = Space::new();
    // Daily cap 1 and burst 1: both refuse; the cap's wait (until midnight) is reported.
    let q = s.replica(plan(0.01, 1, 100, 1));
    q.acquire("acme", "team", 10, 1).await.unwrap();
    let (message, wait) = refused(q.acquire("acme", "team", 10, 1).await);
    let midnight = ms_to_utc_midnight();
    if midnight > 100_000 {
        assert_eq!(message, "plan 'team' allows 1 signatures per UTC day");
        assert!(wait.abs_diff(midnight) < 5_000);
    } else {
        assert_eq!(message, "plan 'team' allows 0.01 signatures/s");
    }
    s.clean().await;
}

#[tokio::test]
async fn redis_unreachable_fails_closed() {
    let gate = QuotaGate {
        plans: plans(plan(1.0, 1, 1, 0)),
        ..QuotaGate::default()
    };
    let q = RedisQuota::new(pool("redis://127.0.0.1:1"), gate).unwrap();
    let e = q.acquire("acme", "team", 10, 1).await.unwrap_err();
    assert_eq!(e.code(), ErrorCode::Internal);
    assert!(e.code().retryable());
    assert!(e.message().starts_with("quota store unavailable: "), "{e}");
    // Plan and payload checks need no Redis.
    assert_eq!(
        q.acquire("acme", "team", 2000, 1).await.unwrap_err().code(),
        ErrorCode::PayloadTooLarge
    );
    q.release("acme", "team").await;
}

#[tokio::test]
async fn redis_unreachable_fails_open() {
    let gate = QuotaGate {
        fail_open: true,
        plans: plans(plan(1.0, 1, 1, 0)),
        ..QuotaGate::default()
    };
    let q = RedisQuota::new(pool("redis://127.0.0.1:1"), gate).unwrap();
    for _ in 0..3 {
        assert_eq!(
            q.acquire("acme", "team", 10, 1).await.unwrap(),
            QuotaGrant::FailOpen
        );
        q.release("acme", "team").await;
    }
}

#[tokio::test]
async fn redis_that_never_answers_fails_open_in_time() {
    // Accepts connections and never says a word.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let silent = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            open.push(socket);
        }
    });
    let gate = QuotaGate {
        fail_open: true,
        plans: plans(plan(1.0, 1, 1, 0)),
        ..QuotaGate::default()
    };
    let q = RedisQuota::new(pool(&format!("redis://127.0.0.1:{port}")), gate)
        .unwrap()
        .with_timeout(Duration::from_millis(300));
    let started = Instant::now();
    assert_eq!(
        q.acquire("acme", "team", 10, 1).await.unwrap(),
        QuotaGrant::FailOpen
    );
    assert!(started.elapsed() < Duration::from_secs(2));
    silent.abort();
}

// ---- batches (Redis) ----

fn request(tenant: &str, plan: &str, payload_bytes: usize, signatures: u32) -> QuotaRequest {
    QuotaRequest {
        tenant: tenant.into(),
        plan: plan.into(),
        payload_bytes,
        signatures,
    }
}

/// An answer in a form two runs can be compared in: the grant, or the code and message of
/// the refusal with its `retryAfterMs` rounded to seconds.
fn comparable(r: &Result<QuotaGrant, SignerError>) -> String {
    match r {
        Ok(g) => format!("{g:?}"),
        Err(e) => format!(
            "{} {} {:?}",
            e.code(),
            e.message(),
            e.retry_after_ms().map(|ms| ms.div_ceil(1000))
        ),
    }
}

/// A batch with every kind of answer: two tenants, a rate limit reached in the middle, a
/// two-signature request refused where a one-signature one still passes, a payload too
/// large, an unknown plan, the concurrency limit.
fn mixed_batch() -> Vec<QuotaRequest> {
    vec![
        request("acme", "team", 10, 1),
        request("acme", "team", 10, 2),
        request("globex", "team", 10, 1),
        request("acme", "team", 5000, 1), // payload too large: nothing charged
        request("acme", "gold", 10, 1),   // unknown plan
        request("acme", "team", 10, 1),   // 4 of 5 units
        request("acme", "team", 10, 2),   // 2 more do not fit: refused, takes nothing
        request("acme", "team", 10, 1),   // the last unit
        request("acme", "team", 10, 1),   // rate
        request("globex", "team", 10, 1),
        request("globex", "team", 10, 1),
        request("globex", "team", 10, 1), // its 4th slot
        request("globex", "team", 10, 1), // concurrency (4 slots)
    ]
}

#[tokio::test]
async fn redis_a_batch_answers_as_sequential_calls_do() {
    // burst 5 for each tenant, nothing refills during the test, 4 concurrent jobs
    let p = plan(0.001, 5, 4, 0);
    let (one, many) = (Space::new(), Space::new());
    let sequential = one.replica(p.clone());
    let mut expected = Vec::new();
    for r in mixed_batch() {
        expected.push(
            sequential
                .acquire(&r.tenant, &r.plan, r.payload_bytes, r.signatures)
                .await,
        );
    }
    let batched = many.replica(p).acquire_many(&mixed_batch()).await;
    let expected: Vec<String> = expected.iter().map(comparable).collect();
    let got: Vec<String> = batched.iter().map(comparable).collect();
    assert_eq!(got, expected);
    // and the answers are the ones the rules give
    let codes: Vec<_> = batched
        .iter()
        .map(|r| r.clone().map_err(|e| e.code()))
        .collect();
    use ErrorCode::*;
    let allowed = Ok(QuotaGrant::Allowed);
    assert_eq!(
        codes,
        [
            allowed,
            allowed,
            allowed,
            Err(PayloadTooLarge),
            Err(EntitlementDenied),
            allowed,
            Err(QuotaExceeded),
            allowed,
            Err(QuotaExceeded),
            allowed,
            allowed,
            allowed,
            Err(QuotaExceeded),
        ]
    );
    assert!(comparable(&batched[6]).contains("signatures/s"));
    assert!(comparable(&batched[12]).contains("concurrent"));
    one.clean().await;
    many.clean().await;
}

#[tokio::test]
async fn redis_batches_from_two_replicas_share_one_budget_exactly() {
    let s = Space::new();
    // burst 10, nothing refills: 4 rounds of 2 concurrent batches of 8 (from two replicas)
    // get exactly 10 units, whatever the interleaving.
    let p = plan(0.001, 10, 1000, 0);
    let replicas = [Arc::new(s.replica(p.clone())), Arc::new(s.replica(p))];
    let mut tasks = Vec::new();
    for i in 0..8 {
        let q = replicas[i % 2].clone();
        tasks.push(tokio::spawn(async move {
            let batch: Vec<_> = (0..8)
                .map(|j| request("acme", "team", 10, 1 + ((i + j) % 2) as u32))
                .collect();
            let answers = q.acquire_many(&batch).await;
            batch
                .iter()
                .zip(answers)
                .map(|(r, a)| match a {
                    Ok(QuotaGrant::Allowed) => r.signatures,
                    other => {
                        refused(other);
                        0
                    }
                })
                .sum::<u32>()
        }));
    }
    let mut units = 0;
    for t in tasks {
        units += t.await.unwrap();
    }
    assert_eq!(units, 10, "granted units");
    refused(replicas[0].acquire("acme", "team", 10, 1).await);
    s.clean().await;
}

#[tokio::test]
async fn redis_a_batch_loads_the_script_when_redis_has_lost_it() {
    let s = Space::new();
    let salt = s.prefix.clone();
    let q = s
        .replica(plan(0.001, 3, 100, 0))
        .with_unloaded_script(&salt);
    // every command of the first pipeline is refused NOSCRIPT (nothing runs), then sent
    // again: each request is decided once
    let answers = q
        .acquire_many(&vec![request("acme", "team", 10, 1); 5])
        .await;
    let allowed = answers
        .iter()
        .filter(|a| matches!(a, Ok(QuotaGrant::Allowed)))
        .count();
    assert_eq!(allowed, 3, "{answers:?}");
    for a in answers.into_iter().skip(3) {
        refused(a);
    }
    // the single call takes the same path
    let q = s
        .replica(plan(0.001, 3, 100, 0))
        .with_unloaded_script(&format!("{salt}-single"));
    refused(q.acquire("acme", "team", 10, 1).await);
    s.clean().await;
}

#[tokio::test]
async fn redis_a_batch_releases_in_one_go() {
    let s = Space::new();
    let q = s.replica(plan(1000.0, 100, 1, 0));
    let batch = [
        request("acme", "team", 10, 1),
        request("globex", "team", 10, 1),
    ];
    assert!(q.acquire_many(&batch).await.iter().all(Result::is_ok));
    assert!(q.acquire_many(&batch).await.into_iter().all(|a| a.is_err()));
    q.release_many(&[
        QuotaRelease {
            tenant: "acme".into(),
            plan: "team".into(),
        },
        QuotaRelease {
            tenant: "globex".into(),
            plan: "team".into(),
        },
        // nothing held: a no-op
        QuotaRelease {
            tenant: "initech".into(),
            plan: "team".into(),
        },
    ])
    .await;
    assert!(q.acquire_many(&batch).await.iter().all(Result::is_ok));
    s.clean().await;
}

#[tokio::test]
async fn redis_unreachable_fails_each_request_of_a_batch_as_configured() {
    for fail_open in [false, true] {
        let gate = QuotaGate {
            fail_open,
            plans: plans(plan(1.0, 1, 1, 0)),
            ..QuotaGate::default()
        };
        let q = RedisQuota::new(pool("redis://127.0.0.1:1"), gate).unwrap();
        let answers = q
            .acquire_many(&[
                request("acme", "team", 10, 1),
                request("acme", "team", 2000, 1),
                request("globex", "team", 10, 1),
            ])
            .await;
        // the local check needs no Redis
        assert_eq!(
            answers[1].as_ref().unwrap_err().code(),
            ErrorCode::PayloadTooLarge
        );
        for a in [&answers[0], &answers[2]] {
            if fail_open {
                assert_eq!(a, &Ok(QuotaGrant::FailOpen));
            } else {
                let e = a.as_ref().unwrap_err();
                assert_eq!(e.code(), ErrorCode::Internal);
                assert!(e.message().starts_with("quota store unavailable: "), "{e}");
            }
        }
    }
}

#[tokio::test]
async fn redis_the_batch_size_comes_from_the_configuration() {
    let s = Space::new();
    let gate = QuotaGate {
        batch_max: 7,
        ..s.gate(plan(1.0, 1, 1, 0))
    };
    let q = from_config(&gate, Some(pool(REDIS_URL))).unwrap();
    assert_eq!(q.batch_max(), 7);
    assert_eq!(from_config(&gate, None).unwrap().batch_max(), 7);
    let zero = QuotaGate {
        batch_max: 0,
        ..gate
    };
    assert_eq!(
        from_config(&zero, Some(pool(REDIS_URL))).err(),
        Some(QuotaSetupError::BatchMax)
    );
    assert_eq!(
        from_config(&zero, None).err(),
        Some(QuotaSetupError::BatchMax)
    );
}

// ---- memory ----

#[tokio::test]
async fn memory_burst_then_quota_exceeded() {
    burst_then_refused(&MemoryQuota::new(plans(plan(1.0, 5, 100, 0))).unwrap()).await;
}

#[tokio::test]
async fn memory_refills_over_time() {
    refills(&MemoryQuota::new(plans(plan(2.0, 2, 100, 0))).unwrap()).await;
}

#[tokio::test]
async fn memory_concurrency_limit_and_release() {
    concurrency(&MemoryQuota::new(plans(plan(1000.0, 100, 2, 0))).unwrap()).await;
}

#[tokio::test]
async fn memory_daily_cap() {
    daily_cap(&MemoryQuota::new(plans(plan(1000.0, 100, 100, 3))).unwrap()).await;
}

#[tokio::test]
async fn memory_payload_too_large_and_unknown_plan() {
    payload_and_plan(&MemoryQuota::new(plans(plan(0.01, 1, 100, 0))).unwrap()).await;
}

#[tokio::test]
async fn memory_tenants_are_independent() {
    let q = MemoryQuota::new(plans(plan(0.01, 1, 100, 0))).unwrap();
    q.acquire("acme", "team", 10, 1).await.unwrap();
    refused(q.acquire("acme", "team", 10, 1).await);
    q.acquire("globex", "team", 10, 1).await.unwrap();
}

#[tokio::test]
async fn memory_charges_one_unit_per_signature() {
    signatures_are_units(&MemoryQuota::new(plans(plan(0.01, 3, 100, 0))).unwrap()).await;
}

#[tokio::test]
async fn memory_daily_cap_counts_signatures() {
    daily_cap_counts_signatures(&MemoryQuota::new(plans(plan(1000.0, 100, 100, 5))).unwrap()).await;
}

#[tokio::test]
async fn memory_signature_cap_and_one_slot_per_job() {
    signature_cap_and_one_slot_per_job(&MemoryQuota::new(plans(capped(0.01, 3, 1, 2))).unwrap())
        .await;
}

// ---- configuration ----

#[tokio::test]
async fn invalid_configurations_are_refused() {
    let gate = |p: Option<Plan>| QuotaGate {
        plans: p.map(plans).unwrap_or_default(),
        ..QuotaGate::default()
    };
    let err = |p| from_config(&gate(p), None).err().unwrap();
    assert_eq!(err(None), QuotaSetupError::NoPlans);
    for (bad, what) in [
        (plan(0.0, 1, 1, 0), "requests_per_second"),
        (plan(-1.0, 1, 1, 0), "requests_per_second"),
        (plan(f64::NAN, 1, 1, 0), "requests_per_second"),
        (plan(f64::INFINITY, 1, 1, 0), "requests_per_second"),
        (plan(1.0, 0, 1, 0), "burst"),
        (plan(1.0, 1, 0, 0), "max_concurrent"),
        (
            Plan {
                max_payload_bytes: 0,
                ..plan(1.0, 1, 1, 0)
            },
            "max_payload_bytes",
        ),
        (
            capped(1.0, 5, 1, 0),
            "max_signatures_per_request must be at least 1",
        ),
        (
            capped(1.0, 2, 1, 3),
            "max_signatures_per_request must not exceed burst",
        ),
        (
            Plan {
                daily_cap: 2,
                ..capped(1.0, 5, 1, 3)
            },
            "max_signatures_per_request must not exceed daily_cap",
        ),
    ] {
        match err(Some(bad)) {
            QuotaSetupError::InvalidPlan { plan, reason } => {
                assert_eq!(plan, "team");
                assert!(reason.starts_with(what), "{reason}");
            }
            other => panic!("{other:?}"),
        }
    }
    // The Redis store checks the same.
    assert!(RedisQuota::new(pool(REDIS_URL), gate(None)).is_err());
}

#[tokio::test]
async fn from_config_picks_the_store() {
    let disabled = QuotaGate {
        mode: GateMode::Disabled,
        ..QuotaGate::default()
    };
    let q = from_config(&disabled, None).unwrap();
    assert_eq!(
        q.acquire("acme", "anything", usize::MAX, 1).await.unwrap(),
        QuotaGrant::Disabled
    );

    let s = Space::new();
    let gate = s.gate(plan(0.01, 1, 10, 0));
    let memory = from_config(&gate, None).unwrap();
    let redis = from_config(&gate, Some(pool(REDIS_URL))).unwrap();
    memory.acquire("acme", "team", 10, 1).await.unwrap();
    assert!(s.keys().await.is_empty(), "the memory store wrote to Redis");
    redis.acquire("acme", "team", 10, 1).await.unwrap();
    assert_eq!(s.keys().await.len(), 2, "bucket and slots");
    refused(redis.acquire("acme", "team", 10, 1).await);
    s.clean().await;
}

#[tokio::test]
async fn a_tiny_rate_still_refuses_with_a_wait() {
    let s = Space::new();
    let p = plan(1e-300, 1, 10, 0);
    let redis = s.replica(p.clone());
    let memory = MemoryQuota::new(plans(p)).unwrap();
    for q in [&redis as &dyn QuotaStore, &memory] {
        q.acquire("acme", "team", 10, 1).await.unwrap();
        let (_, wait) = refused(q.acquire("acme", "team", 10, 1).await);
        assert_eq!(wait, 1_000_000_000_000);
    }
    s.clean().await;
}

/// Both stores tell the pipeline a plan's payload limit, so a `payloadRef` over it is
/// refused before the object is read.
#[tokio::test]
async fn stores_report_the_plans_payload_limit() {
    let memory = MemoryQuota::new(plans(plan(1.0, 5, 100, 0))).unwrap();
    assert_eq!(memory.max_payload_bytes("team"), Some(1024));
    assert_eq!(memory.max_payload_bytes("other"), None);
    let s = Space::new();
    let redis = s.replica(plan(1.0, 5, 100, 0));
    assert_eq!(redis.max_payload_bytes("team"), Some(1024));
    assert_eq!(redis.max_payload_bytes("other"), None);
}

// ---- measurement ----

/// Reads `field` (a number) from Redis `INFO` of `url`.
async fn info_number(url: &str, section: &str, field: &str) -> f64 {
    let mut conn = pool(url);
    let info: String = redis_rs::cmd("INFO")
        .arg(section)
        .query_async(&mut conn)
        .await
        .unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap()
}

/// This process's CPU seconds (user + system) from `/proc/self/stat`.
fn own_cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    ticks / 100.0
}

/// A measurement, not a check: what a job's quota acquire and release cost in Redis, asked
/// the way the Quota actor asked before batching (a task and a script call per acquire, a
/// task and a `ZREM` per release) and through the batching actor now, one job at a time and
/// 256 jobs at once, against a `redis-server` of its own. Run with
/// `cargo test -p stella-signer --lib measure_quota_batching -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn measure_quota_batching() {
    use signer_actors::pipeline::{Quota, QuotaMsg};
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let dir = tempfile::tempdir().unwrap();
    let mut server = std::process::Command::new("redis-server")
        .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
        .args(["--save", "", "--appendonly", "no"])
        .arg("--dir")
        .arg(dir.path())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let url = format!("redis://127.0.0.1:{port}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let p = plan(1e9, 1_000_000_000, 1_000_000, 0);
    let modes = ["per call (before)", "batching actor (after)"];
    let loads = [
        (1, 5_000),
        (1, 5_000),
        (256, 40_000),
        (256, 40_000),
        (256, 40_000),
        (256, 40_000),
    ];
    for (mode, (concurrency, jobs)) in modes.iter().cycle().zip(loads) {
        let gate = QuotaGate {
            mode: GateMode::Enforce,
            fail_open: false,
            redis_prefix: format!("m{}:", unix_ms()),
            batch_max: 64,
            plans: plans(p.clone()),
        };
        let store: Arc<dyn QuotaStore> = Arc::new(RedisQuota::new(pool(&url), gate).unwrap());
        store.acquire("warm", "team", 10, 1).await.unwrap(); // loads the script
        let actor = if mode.starts_with("batching") {
            let (a, _) = ractor::Actor::spawn(None, Quota, store.clone())
                .await
                .unwrap();
            Some(a)
        } else {
            None
        };
        let cpu = info_number(&url, "cpu", "used_cpu_user").await
            + info_number(&url, "cpu", "used_cpu_sys").await;
        let commands = info_number(&url, "stats", "total_commands_processed").await;
        let own = own_cpu_seconds();
        let started = Instant::now();
        let mut workers = Vec::new();
        for w in 0..concurrency {
            let store = store.clone();
            let actor = actor.clone();
            workers.push(tokio::spawn(async move {
                let tenant = format!("t{}", w % 16);
                for _ in 0..jobs / concurrency {
                    match &actor {
                        None => {
                            let (s, t) = (store.clone(), tenant.clone());
                            let grant =
                                tokio::spawn(async move { s.acquire(&t, "team", 10, 1).await })
                                    .await
                                    .unwrap();
                            assert_eq!(grant, Ok(QuotaGrant::Allowed));
                            let (s, t) = (store.clone(), tenant.clone());
                            tokio::spawn(async move { s.release(&t, "team").await });
                        }
                        Some(a) => {
                            let grant = a
                                .call(
                                    |reply| QuotaMsg::Acquire {
                                        tenant: tenant.clone(),
                                        plan: "team".into(),
                                        payload_bytes: 10,
                                        signatures: 1,
                                        reply,
                                    },
                                    Some(Duration::from_secs(10)),
                                )
                                .await
                                .unwrap();
                            assert!(matches!(
                                grant,
                                ractor::rpc::CallResult::Success(Ok(QuotaGrant::Allowed))
                            ));
                            a.cast(QuotaMsg::Release {
                                tenant: tenant.clone(),
                                plan: "team".into(),
                            })
                            .unwrap();
                        }
                    }
                }
            }));
        }
        for w in workers {
            w.await.unwrap();
        }
        let took = started.elapsed().as_secs_f64();
        let own = own_cpu_seconds() - own;
        tokio::time::sleep(Duration::from_millis(300)).await; // the last releases
        let cpu = info_number(&url, "cpu", "used_cpu_user").await
            + info_number(&url, "cpu", "used_cpu_sys").await
            - cpu;
        let commands = info_number(&url, "stats", "total_commands_processed").await - commands;
        let jobs = (jobs / concurrency * concurrency) as f64;
        println!(
            "{mode:>24}, {concurrency:>3} at once: {:>7.0} acquire+release/s, {:>6.1} µs per job (acquire + release, wall), Redis CPU {:>5.1} µs/job, Redis commands {:.2}/job (pipelined commands count one each), test process CPU {:>5.1} µs/job",
            jobs / took,
            took * 1e6 / jobs * concurrency as f64,
            cpu * 1e6 / jobs,
            commands / jobs,
            own * 1e6 / jobs
        );
        if let Some(a) = actor {
            a.stop(None);
        }
    }
    // where Redis spends it (`calls`, `usec_per_call`): the script's commands, EVALSHA, ZREM
    let mut conn = pool(&url);
    let stats: String = redis_rs::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut conn)
        .await
        .unwrap();
    for line in stats.lines().filter(|l| l.starts_with("cmdstat_")) {
        println!("  {line}");
    }
    let _ = server.kill();
    let _ = server.wait();
}
