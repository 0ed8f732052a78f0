//! Profiles as an entitlement, quota charged per signature, and the subject/tenant binding,
//! through the real worker with real gates: OpToks, DPoP proofs and licences minted with
//! real keys, quota in Redis (a key prefix of this test's own), provenance by allowlist (the
//! registry path is covered by the main cases). Each refusal is checked for its code, its
//! one audit event, that nothing was signed, and that nothing was charged.

use super::*;

use common::stack::verify_completed;
use stella_signer::config::Plan;

/// The Redis keys of this test's quota prefix that belong to `tenant`.
async fn quota_keys(prefix: &str, tenant: &str) -> Vec<String> {
    let mut conn = stella_signer::redis::connect_url("redis://127.0.0.1:6379").unwrap();
    redis::cmd("KEYS")
        .arg(format!("{prefix}{{{tenant}}}:*"))
        .query_async(&mut conn)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn profiles_are_entitlements_quota_counts_signatures_and_subjects_bind_tenants() {
    let dir = tempfile::tempdir().unwrap();
    let (authority, authority_jwks) = Issuer::new(dir.path(), "authority", MintAlg::EdDsa);
    let (licensing, licensing_jwks) = Issuer::new(dir.path(), "licensing", MintAlg::Es256);
    let (proof_pem, proof_jwk) = mint::generate_signing_key(MintAlg::EdDsa).unwrap();
    let scanner = format!("sha256:{}", "5c".repeat(32));

    // team: plenty of everything, but not `multi`; enterprise: `multi`, burst 3 and about
    // nothing refilled during the test; solo: may name `multi`, one signature per request.
    let mut gates = entitlement_gates(&authority_jwks, &licensing_jwks);
    let plans = &mut gates.quota.plans;
    plans.insert("team".into(), plan(1000.0, 1000, 100));
    plans.insert("enterprise".into(), plan(0.01, 3, 10));
    let solo = Plan {
        max_signatures_per_request: Some(1),
        ..plan(1000.0, 100, 10)
    };
    plans.insert("solo".into(), solo);
    gates.provenance.allowlist = vec![scanner.clone()];
    let mut stack = Stack::with_gates("prof", gates);
    let quota_prefix = format!("{}:quota:", stack.id);
    stack.configure(|c| {
        c.redis = redis_at("redis://127.0.0.1:6379");
        // retryable refusals (quota) are final at once
        c.nats.max_deliver = 1;
        let multi = c
            .profiles
            .get_mut("multi")
            .expect("the stack's multi profile");
        multi.allow_plans = Some(["enterprise", "solo"].map(String::from).into());
    });
    stack.spawn_worker();
    let (_c, js) = stack.connect().await;
    stack.wait_provisioned(&js).await;

    let w = World {
        authority,
        licensing,
        proof_jkt: mint::jkt_of(&proof_jwk),
        proof_pem,
        scanner_repo: "registry.example/stella-ops/scanner".into(),
        trusted_digest: scanner.clone(),
        unsigned_digest: String::new(),
        untrusted_digest: String::new(),
        other_digest: String::new(),
    };
    let job = |id: &str, tenant: &str, plan: &str, profile: &str| {
        let mut r = w.good(id, tenant, plan);
        r["requestId"] = id.into();
        r["options"] = json!({ "profile": profile });
        r
    };

    // One at a time, in order: (requestId, subject under sign.requests, request, code).
    let mut n = 0;
    let mut expected: HashMap<String, &str> = HashMap::new();
    let mut send = async |id: &str, subject: &str, r: Value, code: &'static str| {
        stack
            .publish(
                &js,
                &format!("sign.requests.{subject}"),
                &[("Nats-Msg-Id", id)],
                serde_json::to_vec(&r).unwrap(),
            )
            .await;
        expected.insert(id.to_string(), code);
        n += 1;
        let results = stack
            .results(&js, n, Duration::from_secs(30), Duration::ZERO)
            .await;
        assert_eq!(results.len(), n, "no result for {id}\n{}", stack.log(0));
    };

    // plan team may not use `multi`: refused after authentication, nothing charged
    send(
        "team-multi",
        "teamco",
        job("team-multi", "teamco", "team", "multi"),
        "entitlement_denied",
    )
    .await;
    assert_eq!(
        quota_keys(&quota_prefix, "teamco").await,
        Vec::<String>::new(),
        "the refused profile charged the quota"
    );
    send(
        "team-default",
        "teamco",
        job("team-default", "teamco", "team", "default"),
        "",
    )
    .await;
    assert!(
        !quota_keys(&quota_prefix, "teamco").await.is_empty(),
        "a granted job is charged in this prefix (so the check above could fail)"
    );

    // burst 3: a two-key job takes two units, so the second one is refused, and takes
    // nothing: the last unit still serves a one-key job, then the bucket is empty
    send(
        "ent-multi-1",
        "entco",
        job("ent-multi-1", "entco", "enterprise", "multi"),
        "",
    )
    .await;
    send(
        "ent-multi-2",
        "entco",
        job("ent-multi-2", "entco", "enterprise", "multi"),
        "quota_exceeded",
    )
    .await;
    send(
        "ent-default-1",
        "entco",
        job("ent-default-1", "entco", "enterprise", "default"),
        "",
    )
    .await;
    send(
        "ent-default-2",
        "entco",
        job("ent-default-2", "entco", "enterprise", "default"),
        "quota_exceeded",
    )
    .await;

    // plan solo may name `multi`, but caps a request at one signature
    send(
        "solo-multi",
        "soloco",
        job("solo-multi", "soloco", "solo", "multi"),
        "entitlement_denied",
    )
    .await;
    assert_eq!(
        quota_keys(&quota_prefix, "soloco").await,
        Vec::<String>::new(),
        "the request over the signature cap charged the quota"
    );
    send(
        "solo-default",
        "soloco",
        job("solo-default", "soloco", "solo", "default"),
        "",
    )
    .await;

    // the tenant is the token right after sign.requests, however deep the subject
    send(
        "deep-mismatch",
        "acme.x",
        job("deep-mismatch", "globex", "team", "default"),
        "tenant_mismatch",
    )
    .await;
    send(
        "deep-ok",
        "acme.x.y",
        job("deep-ok", "acme", "team", "default"),
        "",
    )
    .await;

    let total = n;
    let results = stack
        .results(
            &js,
            total,
            Duration::from_secs(30),
            Duration::from_millis(500),
        )
        .await;
    assert_eq!(results.len(), total, "one result per job\n{}", stack.log(0));
    let audit = stack.audit_events(&js).await;
    let mut failures = Vec::new();
    for r in &results {
        let id = r.header("Signer-Request-Id").unwrap();
        let want = expected[id];
        let events: Vec<&Value> = audit.iter().filter(|e| e["requestId"] == id).collect();
        if events.len() != 1 {
            failures.push(format!("{id}: {} audit events", events.len()));
            continue;
        }
        let event = events[0];
        if want.is_empty() {
            if !r.completed() {
                failures.push(format!(
                    "{id}: expected a signature, got {}",
                    r.body["error"]
                ));
                continue;
            }
            verify_completed(&stack, r);
            continue;
        }
        if r.completed() {
            failures.push(format!("{id}: SIGNED, expected {want}"));
            continue;
        }
        if r.code() != want {
            failures.push(format!(
                "{id}: got {} ({}), expected {want}",
                r.code(),
                r.body["error"]["message"]
            ));
        }
        if event["decision"] != "denied"
            || event["errorCode"] != want
            || event.get("keys").is_some()
        {
            failures.push(format!("{id}: audit event {event}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    let result = |id: &str| {
        results
            .iter()
            .find(|r| r.header("Signer-Request-Id") == Some(id))
            .unwrap()
    };
    let event = |id: &str| audit.iter().find(|e| e["requestId"] == id).unwrap();

    // the profile refusal came after authentication (the plan is the licence's) and before
    // the quota
    let e = event("team-multi");
    assert_eq!(
        (e["auth"]["state"].as_str(), e["poe"]["plan"].as_str()),
        (Some("valid"), Some("team"))
    );
    assert_eq!(e["quota"]["outcome"], "not_checked");
    assert_eq!(
        result("team-multi").body["error"]["message"],
        "signing profile \"multi\" is not available on plan \"team\""
    );
    assert_eq!(result("team-multi").body["error"]["retryable"], false);

    // two signatures, two keys in the audit event
    let two = result("ent-multi-1");
    assert_eq!(
        two.body["envelope"]["signatures"].as_array().unwrap().len(),
        2
    );
    assert_eq!(event("ent-multi-1")["keys"].as_array().unwrap().len(), 2);
    let exceeded = result("ent-multi-2");
    assert_eq!(exceeded.body["error"]["retryable"], true);
    assert!(
        exceeded.body["error"]["retryAfterMs"].as_u64().unwrap() > 1000,
        "{:#}",
        exceeded.body
    );
    assert_eq!(event("ent-multi-2")["quota"]["outcome"], "exceeded");
    assert_eq!(
        result("solo-multi").body["error"]["message"],
        "the profile makes 2 signatures; plan 'solo' allows 1 per request"
    );
    assert_eq!(
        result("deep-mismatch").body["error"]["message"],
        "subject names tenant \"acme\", body names \"globex\""
    );
    assert_eq!(result("deep-ok").body["tenant"], "acme");
    // this test's keys in Redis (quota, DPoP replay cache, idempotency records)
    let id = stack.id.clone();
    stack.cleanup(&js).await;
    let mut conn = stella_signer::redis::connect_url("redis://127.0.0.1:6379").unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{id}:*"))
        .query_async(&mut conn)
        .await
        .unwrap();
    if !keys.is_empty() {
        let _: i64 = redis::cmd("DEL")
            .arg(&keys)
            .query_async(&mut conn)
            .await
            .unwrap();
    }
}
