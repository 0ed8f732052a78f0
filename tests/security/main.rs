//! Every way a job can be talked out of a signature, through the real worker: a real
//! Authority/licensing key pair, Redis, and a registry with signed and unsigned scanner
//! images. Each case checks the contract code, the audit event, and that nothing was signed.

#[path = "../common/mod.rs"]
mod common;
mod freshness;
mod profiles;
mod replay;

mod control;
mod gatebounds;

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use common::registry::TestRegistry;
use common::stack::{Stack, request};
use oci_client::Reference;
use oci_client::secrets::RegistryAuth;
use serde_json::{Value, json};
use signer_actors::keys::KeyAlgorithm;
use stella_signer::keys::file::FileKey;
use stella_signer_tools::mint::{self, MintAlg};
use stella_signer_tools::push::Pusher;

const ISSUER: &str = "https://authority.test.stella-ops.local";
const HTU: &str = "nats:sign.requests";

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

struct Issuer {
    pem: String,
    kid: String,
}

impl Issuer {
    fn new(dir: &std::path::Path, name: &str, alg: MintAlg) -> (Issuer, std::path::PathBuf) {
        let (pem, jwk) = mint::generate_signing_key(alg).unwrap();
        let path = dir.join(format!("{name}-jwks.json"));
        std::fs::write(
            &path,
            serde_json::to_vec(&mint::jwks(std::slice::from_ref(&jwk))).unwrap(),
        )
        .unwrap();
        let kid = jwk.kid.clone().unwrap_or_else(|| mint::jkt_of(&jwk));
        (Issuer { pem, kid }, path)
    }
}

/// Everything a case needs to build its credentials.
struct World {
    authority: Issuer,
    licensing: Issuer,
    proof_pem: String,
    proof_jkt: String,
    scanner_repo: String,
    trusted_digest: String,
    unsigned_digest: String,
    untrusted_digest: String,
    other_digest: String,
}

impl World {
    fn optok_claims(&self, tenant: &str) -> Value {
        let t = now();
        json!({"iss": ISSUER, "sub": "svc:scanner", "aud": ["signer"], "scope": "signer.sign",
               "tid": tenant, "iat": t, "nbf": t, "exp": t + 600, "cnf": {"jkt": self.proof_jkt}})
    }
    fn optok(&self, claims: &Value) -> String {
        mint::mint_optok(&self.authority.pem, &self.authority.kid, claims).unwrap()
    }
    fn dpop(&self, optok: &str) -> String {
        mint::mint_dpop(
            &self.proof_pem,
            optok,
            HTU,
            now(),
            &format!("jti-{}", rand_hex()),
        )
        .unwrap()
    }
    fn poe_claims(&self, tenant: &str, plan: &str) -> Value {
        json!({"tid": tenant, "plan": plan, "features": ["signer.sign"], "iat": now(), "exp": now() + 600})
    }
    fn poe(&self, claims: &Value) -> String {
        mint::mint_poe(&self.licensing.pem, &self.licensing.kid, claims).unwrap()
    }
    /// A request that passes every gate; cases then break one thing.
    fn good(&self, id: &str, tenant: &str, plan: &str) -> Value {
        let optok = self.optok(&self.optok_claims(tenant));
        let mut r = request(id, tenant, None);
        r["auth"] = json!({"opTok": optok, "dpop": self.dpop(&optok)});
        r["poe"] = json!({"format": "jwt", "value": self.poe(&self.poe_claims(tenant, plan))});
        r["scanner"] = json!({"repository": self.scanner_repo, "imageDigest": self.trusted_digest});
        r
    }
    /// Replaces the OpTok (and its DPoP proof, re-minted for the new token).
    fn with_optok(&self, mut r: Value, optok: String) -> Value {
        r["auth"] = json!({"opTok": optok, "dpop": self.dpop(&optok)});
        r
    }
}

fn rand_hex() -> String {
    let mut b = [0u8; 8];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b).unwrap();
    hex::encode(b)
}

fn b64(v: &Value) -> String {
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_gate_refuses_with_its_code_audits_it_and_signs_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (authority, authority_jwks) = Issuer::new(dir.path(), "authority", MintAlg::EdDsa);
    let (licensing, licensing_jwks) = Issuer::new(dir.path(), "licensing", MintAlg::Es256);
    let (proof_pem, proof_jwk) = mint::generate_signing_key(MintAlg::EdDsa).unwrap();
    let release = FileKey::generate(KeyAlgorithm::EcdsaP256Sha256, dir.path(), "release").unwrap();
    let untrusted =
        FileKey::generate(KeyAlgorithm::EcdsaP256Sha256, dir.path(), "untrusted").unwrap();
    let release_key = FileKey::load(&release.private_key, "release").unwrap();
    let untrusted_key = FileKey::load(&untrusted.private_key, "untrusted").unwrap();

    // the registry: a trusted release, an unsigned one, one signed by someone else, and one
    // carrying a valid signature that was made for another image
    let reg = TestRegistry::start();
    let repo = reg.repository("stella-ops/scanner");
    let push = Pusher::new(&[reg.host()]).unwrap();
    let trusted_digest = push.push_test_image(&repo).await.unwrap();
    push.sign_image_cosign(&repo, &trusted_digest, &release_key)
        .await
        .unwrap();
    let unsigned_digest = push.push_test_image(&repo).await.unwrap();
    let untrusted_digest = push.push_test_image(&repo).await.unwrap();
    push.sign_image_cosign(&repo, &untrusted_digest, &untrusted_key)
        .await
        .unwrap();
    let other_digest = push.push_test_image(&repo).await.unwrap();
    let client = oci_client::Client::new(oci_client::client::ClientConfig {
        protocol: oci_client::client::ClientProtocol::HttpsExcept(vec![reg.host()]),
        ..Default::default()
    });
    let sig_tag = |d: &str| {
        Reference::with_tag(
            reg.host(),
            "stella-ops/scanner".into(),
            format!("sha256-{}.sig", d.trim_start_matches("sha256:")),
        )
    };
    let (manifest, _) = client
        .pull_manifest_raw(
            &sig_tag(&trusted_digest),
            &RegistryAuth::Anonymous,
            &["application/vnd.oci.image.manifest.v1+json"],
        )
        .await
        .unwrap();
    client
        .push_manifest_raw(
            &sig_tag(&other_digest),
            manifest,
            "application/vnd.oci.image.manifest.v1+json"
                .parse()
                .unwrap(),
        )
        .await
        .unwrap();

    let gates = format!(
        r#"
[gates.entitlement]
issuer = "{ISSUER}"
jwks_file = "{authority_jwks}"
dpop_htu = "{HTU}"
[gates.entitlement.poe]
licensing_jwks_file = "{licensing_jwks}"
[gates.quota.plans.big]
requests_per_second = 10000.0
burst = 10000
max_concurrent = 1000
max_payload_bytes = 1048576
[gates.quota.plans.tiny]
requests_per_second = 0.01
burst = 2
max_concurrent = 10
max_payload_bytes = 1048576
[gates.provenance]
trusted_keys = ["{release_pub}"]
insecure_registries = ["{host}"]
"#,
        authority_jwks = authority_jwks.display(),
        licensing_jwks = licensing_jwks.display(),
        release_pub = release.public_key.display(),
        host = reg.host(),
    );
    let mut stack = Stack::with_gates("sec", &gates, "[redis]\nurl = \"redis://127.0.0.1:6379\"\n");
    let quota_prefix = format!("[gates.quota]\nredis_prefix = \"{}:quota:\"\n", stack.id);
    let text = std::fs::read_to_string(&stack.config).unwrap();
    // retryable refusals (quota) are final at once here; prefixes of our own in Redis
    let text = text
        .replace("max_deliver = 3", "max_deliver = 1")
        .replace(
            "[gates.quota.plans.big]",
            &format!("{quota_prefix}[gates.quota.plans.big]"),
        )
        .replace(
            "[gates.entitlement]\n",
            &format!(
                "[gates.entitlement]\ndpop_replay_prefix = \"{}:dpop:\"\n",
                stack.id
            ),
        );
    std::fs::write(&stack.config, text).unwrap();
    stack.spawn_worker();
    let (_c, js) = stack.connect().await;
    stack.wait_provisioned(&js).await;

    let w = World {
        authority,
        licensing,
        proof_jkt: mint::jkt_of(&proof_jwk),
        proof_pem,
        scanner_repo: repo.clone(),
        trusted_digest,
        unsigned_digest,
        untrusted_digest,
        other_digest,
    };
    let (other_authority, _) = Issuer::new(dir.path(), "forger", MintAlg::EdDsa);
    let (other_licensing, _) = Issuer::new(dir.path(), "forged-licensing", MintAlg::Es256);
    let (stranger_pem, _) = mint::generate_signing_key(MintAlg::EdDsa).unwrap();

    // (requestId, subject tenant, request, expected code)
    let mut cases: Vec<(String, &str, Value, &str)> = Vec::new();
    let mut case = |id: &str, subject: &'static str, r: Value, code: &'static str| {
        let mut r = r;
        r["requestId"] = id.into();
        cases.push((id.to_string(), subject, r, code));
    };
    case("ok-1", "acme", w.good("ok-1", "acme", "big"), "");

    // --- OpTok ---
    let forged = mint::mint_optok(
        &other_authority.pem,
        &w.authority.kid,
        &w.optok_claims("acme"),
    )
    .unwrap();
    case(
        "optok-forged",
        "acme",
        w.with_optok(w.good("x", "acme", "big"), forged),
        "auth_invalid",
    );
    let none = format!(
        "{}.{}.",
        b64(&json!({"alg": "none", "typ": "JWT"})),
        b64(&w.optok_claims("acme"))
    );
    case(
        "optok-alg-none",
        "acme",
        w.with_optok(w.good("x", "acme", "big"), none),
        "auth_invalid",
    );
    let hs_input = format!(
        "{}.{}",
        b64(&json!({"alg": "HS256", "kid": w.authority.kid, "typ": "JWT"})),
        b64(&w.optok_claims("acme"))
    );
    let secret = std::fs::read(&authority_jwks).unwrap();
    let tag = ring::hmac::sign(
        &ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &secret),
        hs_input.as_bytes(),
    );
    let hs = format!("{hs_input}.{}", URL_SAFE_NO_PAD.encode(tag.as_ref()));
    case(
        "optok-hs256-public-key",
        "acme",
        w.with_optok(w.good("x", "acme", "big"), hs),
        "auth_invalid",
    );
    let mut c = w.optok_claims("acme");
    c["exp"] = (now() - 3600).into();
    c["iat"] = (now() - 7200).into();
    c["nbf"] = (now() - 7200).into();
    case(
        "optok-expired",
        "acme",
        w.with_optok(w.good("x", "acme", "big"), w.optok(&c)),
        "auth_expired",
    );
    let mut c = w.optok_claims("acme");
    c["aud"] = json!(["attestor"]);
    case(
        "optok-wrong-aud",
        "acme",
        w.with_optok(w.good("x", "acme", "big"), w.optok(&c)),
        "audience_mismatch",
    );
    let mut c = w.optok_claims("acme");
    c["scope"] = "scanner.read".into();
    case(
        "optok-no-scope",
        "acme",
        w.with_optok(w.good("x", "acme", "big"), w.optok(&c)),
        "scope_missing",
    );
    case(
        "tenant-token",
        "acme",
        w.with_optok(
            w.good("x", "acme", "big"),
            w.optok(&w.optok_claims("globex")),
        ),
        "tenant_mismatch",
    );
    case(
        "tenant-subject",
        "globex",
        w.good("x", "acme", "big"),
        "tenant_mismatch",
    );

    // --- DPoP ---
    let mut r = w.good("x", "acme", "big");
    r["auth"].as_object_mut().unwrap().remove("dpop");
    case("dpop-missing", "acme", r, "dpop_invalid");
    let mut r = w.good("x", "acme", "big");
    let op = r["auth"]["opTok"].as_str().unwrap().to_string();
    r["auth"]["dpop"] = mint::mint_dpop(&stranger_pem, &op, HTU, now(), "jti-thumb")
        .unwrap()
        .into();
    case("dpop-wrong-thumbprint", "acme", r, "dpop_invalid");
    let mut r = w.good("x", "acme", "big");
    let mut another = w.optok_claims("acme");
    another["sub"] = "svc:another-caller".into();
    r["auth"]["dpop"] = w.dpop(&w.optok(&another)).into();
    case("dpop-wrong-ath", "acme", r, "dpop_invalid");
    let mut r = w.good("x", "acme", "big");
    let op = r["auth"]["opTok"].as_str().unwrap().to_string();
    r["auth"]["dpop"] = mint::mint_dpop(&w.proof_pem, &op, HTU, now() - 3600, "jti-stale")
        .unwrap()
        .into();
    case("dpop-stale", "acme", r, "dpop_invalid");
    let first = w.good("x", "acme", "big");
    let mut replay = w.good("x", "acme", "big");
    replay["auth"] = first["auth"].clone();
    case("dpop-first-use", "acme", first, "");
    case("dpop-replayed", "acme", replay, "dpop_replayed");

    // --- Proof-of-Entitlement ---
    let mut r = w.good("x", "acme", "big");
    let poe = r["poe"]["value"].as_str().unwrap().to_string();
    let parts: Vec<&str> = poe.split('.').collect();
    let mut claims = w.poe_claims("acme", "big");
    claims["plan"] = "enterprise-unlimited".into();
    r["poe"]["value"] = format!("{}.{}.{}", parts[0], b64(&claims), parts[2]).into();
    case("poe-tampered", "acme", r, "poe_invalid");
    let mut r = w.good("x", "acme", "big");
    let forged_poe = mint::mint_poe(
        &other_licensing.pem,
        &w.licensing.kid,
        &w.poe_claims("acme", "big"),
    )
    .unwrap();
    r["poe"]["value"] = forged_poe.into();
    case("poe-forged", "acme", r, "poe_invalid");
    let mut c = w.poe_claims("acme", "big");
    c["exp"] = (now() - 3600).into();
    c["iat"] = (now() - 7200).into();
    let mut r = w.good("x", "acme", "big");
    r["poe"]["value"] = w.poe(&c).into();
    case("poe-expired", "acme", r, "poe_expired");
    let mut r = w.good("x", "acme", "big");
    r["poe"]["value"] = w.poe(&w.poe_claims("globex", "big")).into();
    case("poe-other-tenant", "acme", r, "poe_invalid");
    let mut c = w.poe_claims("acme", "big");
    c["features"] = json!(["scanner.scan"]);
    let mut r = w.good("x", "acme", "big");
    r["poe"]["value"] = w.poe(&c).into();
    case("poe-feature-missing", "acme", r, "entitlement_denied");

    // --- quota: burst 2, the third is refused ---
    case("quota-1", "tinyco", w.good("x", "tinyco", "tiny"), "");
    case("quota-2", "tinyco", w.good("x", "tinyco", "tiny"), "");
    case(
        "quota-3",
        "tinyco",
        w.good("x", "tinyco", "tiny"),
        "quota_exceeded",
    );

    // --- scanner provenance ---
    for (id, digest) in [
        ("scanner-unsigned", &w.unsigned_digest),
        ("scanner-untrusted-key", &w.untrusted_digest),
        ("scanner-signature-for-another-digest", &w.other_digest),
    ] {
        let mut r = w.good("x", "acme", "big");
        r["scanner"]["imageDigest"] = digest.clone().into();
        case(id, "acme", r, "provenance_untrusted");
    }

    // one at a time, in order (replay and quota cases depend on it)
    let mut expected: HashMap<String, &str> = HashMap::new();
    let mut n = 0;
    for (id, subject, r, code) in &cases {
        stack
            .publish(
                &js,
                &format!("sign.requests.{subject}"),
                &[("Nats-Msg-Id", id)],
                serde_json::to_vec(r).unwrap(),
            )
            .await;
        expected.insert(id.clone(), code);
        n += 1;
        stack
            .results(&js, n, Duration::from_secs(30), Duration::ZERO)
            .await;
    }
    let results = stack
        .results(
            &js,
            cases.len(),
            Duration::from_secs(30),
            Duration::from_millis(500),
        )
        .await;
    assert_eq!(
        results.len(),
        cases.len(),
        "one result per case\n{}",
        stack.log(0)
    );
    let audit = stack.audit_events(&js).await;
    let mut failures = Vec::new();
    for r in &results {
        let id = r.header("Signer-Request-Id").unwrap();
        let want = expected[id];
        let events: Vec<&Value> = audit.iter().filter(|e| e["requestId"] == id).collect();
        if want.is_empty() {
            if !r.completed() {
                failures.push(format!(
                    "{id}: expected a signature, got {}",
                    r.body["error"]
                ));
            }
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
        if events.len() != 1
            || events[0]["decision"] != "denied"
            || events[0]["errorCode"] != want
            || events[0].get("keys").is_some()
        {
            failures.push(format!("{id}: audit events {events:?}"));
        }
        if want == "quota_exceeded" {
            assert!(
                r.body["error"]["retryAfterMs"].as_u64().unwrap() > 1000,
                "{:#}",
                r.body
            );
            assert_eq!(r.body["error"]["retryable"], true);
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // the audit event of a good job names the caller and every gate's verdict
    let ok = audit.iter().find(|e| e["requestId"] == "ok-1").unwrap();
    assert_eq!(ok["caller"], json!({"iss": ISSUER, "sub": "svc:scanner"}));
    assert_eq!(
        (
            ok["auth"]["state"].as_str(),
            ok["poe"]["state"].as_str(),
            ok["poe"]["plan"].as_str()
        ),
        (Some("valid"), Some("valid"), Some("big"))
    );
    assert_eq!(
        (
            ok["quota"]["outcome"].as_str(),
            ok["provenance"]["verdict"].as_str()
        ),
        (Some("allowed"), Some("trusted"))
    );
    assert_eq!(ok["provenance"]["scannerDigest"], w.trusted_digest);
    stack.cleanup(&js).await;
}
