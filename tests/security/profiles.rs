//! Profiles as an entitlement, quota charged per signature, and the subject/tenant binding,
//! through the real worker with real gates: OpToks, DPoP proofs and licences minted with
//! real keys, quota in Redis (a key prefix of the deployment's own), provenance by allowlist
//! (the registry path is covered by the main cases). One deployment serves the four tests
//! (`shared`), each with a tenant of its own. Each refusal is checked for its code, its one
//! audit event, that nothing was signed, and that nothing was charged.

use super::*;

use common::stack::verify_completed;
use stella_signer::config::Plan;

/// The deployment of the profile tests: plans `team` (plenty of everything, but not
/// `multi`), `enterprise` (`multi`, burst 3 and about nothing refilled during a run) and
/// `solo` (may name `multi`, one signature per request).
struct Profiles {
    stack: Stack,
    w: World,
    quota_prefix: String,
    _dir: tempfile::TempDir,
}

static PROFILES: OnceLock<Profiles> = OnceLock::new();

/// Tag of the profile deployment's streams (see `Stack::remove_stale`).
const PROFILES_TAG: &str = "profworld";

fn profiles() -> &'static Profiles {
    shared::once(&PROFILES, build_profiles)
}

/// The Redis keys of this test's quota prefix that belong to `tenant`.
async fn quota_keys(prefix: &str, tenant: &str) -> Vec<String> {
    let mut conn = stella_signer::redis::connect_url("redis://127.0.0.1:6379").unwrap();
    redis::cmd("KEYS")
        .arg(format!("{prefix}{{{tenant}}}:*"))
        .query_async(&mut conn)
        .await
        .unwrap()
}

async fn build_profiles() -> Profiles {
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
    let mut stack = Stack::with_gates(PROFILES_TAG, gates);
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
    let (_c, js) = stack.connect().await;
    Stack::remove_stale(&js, PROFILES_TAG).await;
    stack.spawn_shared_worker();
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
    Profiles {
        stack,
        w,
        quota_prefix,
        _dir: dir,
    }
}

impl Profiles {
    /// `tenant`'s request on `plan`, signed with `profile`.
    fn job(&self, id: &str, tenant: &str, plan: &str, profile: &str) -> Value {
        let mut r = self.w.good(id, tenant, plan);
        r["options"] = json!({ "profile": profile });
        r
    }

    async fn signed(&self, id: &str, subject: &str, request: Value) -> (ResultMsg, Value) {
        let (r, e) = signed(&self.stack, id, subject, request).await;
        verify_completed(&self.stack, &r);
        (r, e)
    }
}

/// Plan team may not use `multi`: refused after authentication (the plan is the licence's)
/// and before the quota, so nothing is charged; its `default` profile is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_profile_the_plan_does_not_allow_is_refused_before_the_quota() {
    let p = profiles();
    let (r, e) = refused(
        &p.stack,
        "team-multi",
        "teamco",
        p.job("team-multi", "teamco", "team", "multi"),
        "entitlement_denied",
    )
    .await;
    assert_eq!(
        r.body["error"]["message"],
        "signing profile \"multi\" is not available on plan \"team\""
    );
    assert_eq!(r.body["error"]["retryable"], false);
    assert_eq!(
        (e["auth"]["state"].as_str(), e["poe"]["plan"].as_str()),
        (Some("valid"), Some("team"))
    );
    assert_eq!(e["quota"]["outcome"], "not_checked");
    assert_eq!(
        quota_keys(&p.quota_prefix, "teamco").await,
        Vec::<String>::new(),
        "the refused profile charged the quota"
    );
    let job = p.job("team-default", "teamco", "team", "default");
    p.signed("team-default", "teamco", job).await;
    assert!(
        !quota_keys(&p.quota_prefix, "teamco").await.is_empty(),
        "a granted job is charged in this prefix (so the check above could fail)"
    );
}

/// Burst 3: a two-key job takes two units, so a second one is refused, and takes nothing:
/// the last unit still serves a one-key job, then the bucket is empty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quota_counts_signatures_and_a_refused_job_takes_nothing() {
    let p = profiles();
    let job = p.job("ent-multi-1", "entco", "enterprise", "multi");
    let (two, e) = p.signed("ent-multi-1", "entco", job).await;
    assert_eq!(
        two.body["envelope"]["signatures"].as_array().unwrap().len(),
        2
    );
    assert_eq!(e["keys"].as_array().unwrap().len(), 2);
    let job = p.job("ent-multi-2", "entco", "enterprise", "multi");
    let (exceeded, e) = refused(&p.stack, "ent-multi-2", "entco", job, "quota_exceeded").await;
    assert_eq!(exceeded.body["error"]["retryable"], true);
    assert!(
        exceeded.body["error"]["retryAfterMs"].as_u64().unwrap() > 1000,
        "{:#}",
        exceeded.body
    );
    assert_eq!(e["quota"]["outcome"], "exceeded");
    let job = p.job("ent-default-1", "entco", "enterprise", "default");
    p.signed("ent-default-1", "entco", job).await;
    let job = p.job("ent-default-2", "entco", "enterprise", "default");
    refused(&p.stack, "ent-default-2", "entco", job, "quota_exceeded").await;
}

/// Plan solo may name `multi`, but caps a request at one signature: refused before the
/// quota is charged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signature_cap_refuses_a_bigger_profile_and_charges_nothing() {
    let p = profiles();
    let job = p.job("solo-multi", "soloco", "solo", "multi");
    let (r, _) = refused(&p.stack, "solo-multi", "soloco", job, "entitlement_denied").await;
    assert_eq!(
        r.body["error"]["message"],
        "the profile makes 2 signatures; plan 'solo' allows 1 per request"
    );
    assert_eq!(
        quota_keys(&p.quota_prefix, "soloco").await,
        Vec::<String>::new(),
        "the request over the signature cap charged the quota"
    );
    let job = p.job("solo-default", "soloco", "solo", "default");
    p.signed("solo-default", "soloco", job).await;
}

/// The tenant is the token right after `sign.requests`, however deep the subject.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_subject_names_the_tenant_right_after_sign_requests() {
    let p = profiles();
    let job = p.job("deep-mismatch", "globex", "team", "default");
    let (r, _) = refused(&p.stack, "deep-mismatch", "acme.x", job, "tenant_mismatch").await;
    assert_eq!(
        r.body["error"]["message"],
        "subject names tenant \"acme\", body names \"globex\""
    );
    let job = p.job("deep-ok", "acme", "team", "default");
    let (r, _) = p.signed("deep-ok", "acme.x.y", job).await;
    assert_eq!(r.body["tenant"], "acme");
}
