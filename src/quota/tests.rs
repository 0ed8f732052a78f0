//! Tests of the in-process store, of the behaviour both stores share, and of the Redis store
//! where no Redis is needed (refusals before Redis, an unreachable or silent Redis). The
//! same behaviour against the Redis on 127.0.0.1:6379 is in `redis_server` (feature
//! `integration`).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use signer_actors::error::{ErrorCode, SignerError};
use signer_actors::ports::{QuotaGrant, QuotaRequest, QuotaStore};

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

/// An enforcing gate with `p` as plan `team`.
fn enforcing(p: Plan) -> QuotaGate {
    QuotaGate {
        mode: GateMode::Enforce,
        fail_open: false,
        redis_prefix: "test:quota:unused:".into(),
        batch_max: 64,
        plans: plans(p),
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
    // (no connection is made)
    let gate = QuotaGate {
        batch_max: 7,
        ..enforcing(plan(1.0, 1, 1, 0))
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
    // Without Redis, the store in memory (that it writes nothing to Redis, and that the
    // Redis store does: redis_server::from_config_picks_redis_when_given_a_pool).
    let memory = from_config(&enforcing(plan(0.01, 1, 10, 0)), None).unwrap();
    memory.acquire("acme", "team", 10, 1).await.unwrap();
    refused(memory.acquire("acme", "team", 10, 1).await);
}

#[tokio::test]
async fn a_tiny_rate_still_refuses_with_a_wait() {
    let memory = MemoryQuota::new(plans(plan(1e-300, 1, 10, 0))).unwrap();
    tiny_rate_refuses_with_a_wait(&memory).await;
}

async fn tiny_rate_refuses_with_a_wait(q: &dyn QuotaStore) {
    q.acquire("acme", "team", 10, 1).await.unwrap();
    let (_, wait) = refused(q.acquire("acme", "team", 10, 1).await);
    assert_eq!(wait, 1_000_000_000_000);
}

/// Both stores tell the pipeline a plan's payload limit, so a `payloadRef` over it is
/// refused before the object is read.
#[tokio::test]
async fn stores_report_the_plans_payload_limit() {
    let memory = MemoryQuota::new(plans(plan(1.0, 5, 100, 0))).unwrap();
    assert_eq!(memory.max_payload_bytes("team"), Some(1024));
    assert_eq!(memory.max_payload_bytes("other"), None);
    // (the Redis store knows it without asking Redis: no connection is made)
    let redis = RedisQuota::new(pool(REDIS_URL), enforcing(plan(1.0, 5, 100, 0))).unwrap();
    assert_eq!(redis.max_payload_bytes("team"), Some(1024));
    assert_eq!(redis.max_payload_bytes("other"), None);
}

// Against the machine's Redis (each test with a key prefix of its own, removed at the end),
// and the batching measurement against a redis-server of its own.
#[cfg(feature = "integration")]
mod redis_server;
