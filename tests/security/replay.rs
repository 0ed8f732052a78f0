//! DPoP replay and request idempotency through the real worker, against what an attacker can
//! do with time and with the loss of Redis: a proof refused before a Redis restart stays
//! refused after it, a signed requestId republished after the restart is not signed again,
//! a copy of a proof that waited in the stream past `2 × dpop_max_age` is still a replay,
//! and one tenant's client cannot burn another's `jti`s.
//!
//! Each case runs its own `redis-server` (without persistence, like the default deployment)
//! on a free loopback port for the quota gate, and restarts only that one.

use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer};
use serde_json::{Value, json};

use super::{HTU, Issuer, World, entitlement_gates, now, rand_hex};
use crate::common::servers::OwnRedis;
use crate::common::stack::{ResultMsg, Stack, plan, redis_at};
use stella_signer::config::GateMode;
use stella_signer_tools::mint::{self, MintAlg};

/// A deployment with real entitlement and quota gates (quota in `redis`), provenance off
/// (not what these cases are about), and retries enough to ride out a Redis reconnect.
/// The returned directory holds the Authority's and licensing keys: keep it.
fn stack(tag: &str, redis: &OwnRedis, dpop_max_age: Duration) -> (Stack, World, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let (authority, authority_jwks) = Issuer::new(dir.path(), "authority", MintAlg::EdDsa);
    let (licensing, licensing_jwks) = Issuer::new(dir.path(), "licensing", MintAlg::Es256);
    let (proof_pem, proof_jwk) = mint::generate_signing_key(MintAlg::EdDsa).unwrap();
    let mut gates = entitlement_gates(&authority_jwks, &licensing_jwks);
    gates.entitlement.dpop_max_age = dpop_max_age;
    gates.entitlement.clock_skew = Duration::from_secs(1);
    gates
        .quota
        .plans
        .insert("big".into(), plan(10000.0, 10000, 1000));
    gates.provenance.mode = GateMode::Disabled;
    let stack = Stack::with_gates(tag, gates);
    stack.configure(|c| {
        c.redis = redis_at(redis.url());
        c.nats.max_deliver = 6;
    });
    let world = World {
        authority,
        licensing,
        proof_jkt: mint::jkt_of(&proof_jwk),
        proof_pem,
        scanner_repo: "localhost/stella-ops/scanner".into(),
        trusted_digest: format!("sha256:{}", "1".repeat(64)),
        unsigned_digest: String::new(),
        untrusted_digest: String::new(),
        other_digest: String::new(),
    };
    (stack, world, dir)
}

/// Publishes `r` on the tenant's subject under `msg_id`.
async fn publish(stack: &Stack, js: &jetstream::Context, r: &Value, msg_id: &str) {
    let tenant = r["tenant"].as_str().unwrap().to_string();
    stack
        .publish(
            js,
            &format!("sign.requests.{tenant}"),
            &[("Nats-Msg-Id", msg_id)],
            serde_json::to_vec(r).unwrap(),
        )
        .await;
}

/// Every result so far, once `ids` distinct requests have one.
async fn results(stack: &Stack, js: &jetstream::Context, ids: usize) -> Vec<ResultMsg> {
    let out = stack
        .results(js, ids, Duration::from_secs(60), Duration::from_millis(300))
        .await;
    assert!(
        out.len() >= ids,
        "{} results, expected {ids}; logs:\n{}\n{}",
        out.len(),
        stack.log(0),
        stack.log(1)
    );
    out
}

/// The results of request `id`.
fn of<'a>(results: &'a [ResultMsg], id: &str) -> Vec<&'a ResultMsg> {
    results
        .iter()
        .filter(|r| r.header("Signer-Request-Id") == Some(id))
        .collect()
}

/// Waits until the worker has acknowledged every delivered job.
async fn drained(stack: &Stack, js: &jetstream::Context) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut c: consumer::PullConsumer = js
            .get_stream(stack.stream("REQ"))
            .await
            .unwrap()
            .get_consumer(&stack.id)
            .await
            .unwrap();
        let info = c.info().await.unwrap();
        if info.num_pending == 0 && info.num_ack_pending == 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "jobs left unacknowledged: {} pending, {} in flight",
            info.num_pending,
            info.num_ack_pending
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Audit events of request `id` with this decision.
fn decided<'a>(audit: &'a [Value], id: &str, decision: &str) -> Vec<&'a Value> {
    audit
        .iter()
        .filter(|e| e["requestId"] == id && e["decision"] == decision)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_and_idempotency_records_survive_a_redis_restart() {
    let mut redis = OwnRedis::start();
    let (mut stack, w, _keys) = stack("rpl", &redis, Duration::from_secs(60));
    stack.spawn_worker();
    let (_c, js) = stack.connect().await;
    stack.wait_provisioned(&js).await;

    let first = w.good("rr-1", "acme", "big");
    publish(&stack, &js, &first, "rr-1-a").await;
    let out = results(&stack, &js, 1).await;
    assert!(
        of(&out, "rr-1")[0].completed(),
        "{:#}",
        of(&out, "rr-1")[0].body
    );

    redis.restart_empty();

    // the same proof P on a new request: still a replay
    let mut again = w.good("rr-2", "acme", "big");
    again["auth"] = first["auth"].clone();
    publish(&stack, &js, &again, "rr-2-a").await;
    results(&stack, &js, 2).await;
    // the signed request republished under a new message id: a duplicate, not signed again
    // (after rr-2's answer, so that its proof is not recorded anew before rr-2 is judged)
    publish(&stack, &js, &first, "rr-1-b").await;
    drained(&stack, &js).await;
    let out = results(&stack, &js, 2).await;
    let replayed = of(&out, "rr-2");
    assert_eq!(replayed.len(), 1);
    assert!(!replayed[0].completed(), "the replay was SIGNED");
    assert_eq!(
        replayed[0].code(),
        "dpop_replayed",
        "{:#}",
        replayed[0].body
    );
    let original = of(&out, "rr-1");
    assert_eq!(
        original.len(),
        1,
        "one result for rr-1, not a second signature"
    );
    assert!(original[0].completed());

    let audit = stack.audit_events(&js).await;
    assert_eq!(
        decided(&audit, "rr-1", "signed").len(),
        1,
        "rr-1 signed once: {audit:#?}"
    );
    let denied = decided(&audit, "rr-2", "denied");
    assert_eq!(denied.len(), 1, "{audit:#?}");
    assert_eq!(denied[0]["errorCode"], "dpop_replayed");
    assert!(decided(&audit, "rr-2", "signed").is_empty());
    // the records are where the jobs are
    let bucket = js
        .get_key_value(stack.stream("DPOP"))
        .await
        .expect("the replay bucket");
    let mut keys = bucket.keys().await.unwrap();
    let mut n = 0;
    while let Some(Ok(k)) = futures::StreamExt::next(&mut keys).await {
        assert!(k.starts_with(&format!("{}.", w.proof_jkt)), "{k}");
        n += 1;
    }
    assert_eq!(n, 1, "one record: proof P under its key's thumbprint");
    stack.cleanup(&js).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_of_a_proof_that_waited_past_twice_its_max_age_is_still_a_replay() {
    let redis = OwnRedis::start();
    let max_age = 5;
    let (mut stack, w, _keys) = stack("rplw", &redis, Duration::from_secs(max_age));
    stack.spawn_worker();
    let (_c, js) = stack.connect().await;
    stack.wait_provisioned(&js).await;

    // The proof's iat is 4 s ahead (within the window), which leaves the second copy 9 s to
    // be published while still fresh (the first job signed and its worker stopped first),
    // however slow this machine is today.
    let iat = now() + 4;
    let first = {
        let mut r = w.good("rw-1", "acme", "big");
        let optok = r["auth"]["opTok"].as_str().unwrap().to_string();
        let proof = mint::mint_dpop(
            &w.proof_pem,
            &optok,
            HTU,
            iat,
            &format!("jti-{}", rand_hex()),
        )
        .unwrap();
        r["auth"]["dpop"] = proof.into();
        r
    };
    let t0 = Instant::now();
    publish(&stack, &js, &first, "rw-1").await;
    let out = results(&stack, &js, 1).await;
    assert!(
        of(&out, "rw-1")[0].completed(),
        "{:#}",
        of(&out, "rw-1")[0].body
    );
    stack.signal(0, "TERM");
    assert_eq!(stack.wait(0, Duration::from_secs(30)), Some(0));

    // the second copy, 1 s after the first and fresh when published...
    tokio::time::sleep(Duration::from_secs(1).saturating_sub(t0.elapsed())).await;
    let mut copy = w.good("rw-2", "acme", "big");
    copy["auth"] = first["auth"].clone();
    let published_at = now();
    publish(&stack, &js, &copy, "rw-2").await;
    assert!(
        published_at <= iat + max_age,
        "the machine took {:?} to sign one job and stop: the copy was stale when published, \
         this run proves nothing",
        t0.elapsed()
    );
    // ...waits in the stream past every window but max_queue_age (2 × max_age + skew from
    // the first use), then a worker takes it
    tokio::time::sleep(Duration::from_secs(2 * max_age + 2)).await;
    stack.spawn_worker();
    let out = results(&stack, &js, 2).await;
    let copy = of(&out, "rw-2");
    assert_eq!(copy.len(), 1);
    assert!(!copy[0].completed(), "the replayed copy was SIGNED");
    assert_eq!(
        copy[0].code(),
        "dpop_replayed",
        "judged at its publish time the copy is fresh, so it is a replay: {:#}",
        copy[0].body
    );
    let audit = stack.audit_events(&js).await;
    assert_eq!(decided(&audit, "rw-2", "denied").len(), 1, "{audit:#?}");
    stack.cleanup(&js).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_tenants_proof_key_cannot_burn_another_tenants_jti() {
    let redis = OwnRedis::start();
    let (mut stack, w, _keys) = stack("rplt", &redis, Duration::from_secs(60));
    stack.spawn_worker();
    let (_c, js) = stack.connect().await;
    stack.wait_provisioned(&js).await;

    // tenant B's client, with its own proof key, and a jti A's client will also use
    let (b_pem, b_jwk) = mint::generate_signing_key(MintAlg::Es256).unwrap();
    let jti = format!("jti-predictable-{}", rand_hex());
    let with_proof = |id: &str, tenant: &str, pem: &str, jkt: &str| {
        let mut claims = w.optok_claims(tenant);
        claims["cnf"] = json!({"jkt": jkt});
        let optok = w.optok(&claims);
        let mut r = w.good(id, tenant, "big");
        r["auth"] = json!({
            "opTok": optok,
            "dpop": mint::mint_dpop(pem, &optok, HTU, now(), &jti).unwrap(),
        });
        r
    };
    // A (acme) uses B's jti first; B (globex) then uses it with its own key
    let a = with_proof("rt-a", "acme", &w.proof_pem, &w.proof_jkt);
    let b = with_proof("rt-b", "globex", &b_pem, &mint::jkt_of(&b_jwk));
    // and A using the same jti again with its own key is a replay (the check still works)
    let a_again = with_proof("rt-a2", "acme", &w.proof_pem, &w.proof_jkt);
    let mut n = 0;
    for (r, id) in [(&a, "rt-a"), (&b, "rt-b"), (&a_again, "rt-a2")] {
        publish(&stack, &js, r, id).await;
        n += 1;
        results(&stack, &js, n).await;
    }
    let out = results(&stack, &js, 3).await;
    assert!(
        of(&out, "rt-a")[0].completed(),
        "{:#}",
        of(&out, "rt-a")[0].body
    );
    assert!(
        of(&out, "rt-b")[0].completed(),
        "tenant B's proof was refused because tenant A used its jti: {:#}",
        of(&out, "rt-b")[0].body
    );
    assert_eq!(of(&out, "rt-a2")[0].code(), "dpop_replayed");
    stack.cleanup(&js).await;
}
