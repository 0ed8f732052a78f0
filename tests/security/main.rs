//! Every way a job can be talked out of a signature, through the real worker: a real
//! Authority/licensing key pair, Redis, and a registry with signed and unsigned scanner
//! images. Each case is a test of its own ([`refusals!`]) on one deployment shared by them
//! (`shared`), and checks the contract code, the audit event, and that nothing was signed.

#[path = "../common/mod.rs"]
mod common;
mod freshness;
mod profiles;
mod replay;

mod control;
mod gatebounds;
mod shared;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use common::registry::TestRegistry;
use common::stack::{ResultMsg, Stack, plan, redis_at, request};
use oci_client::Reference;
use oci_client::secrets::RegistryAuth;
use serde_json::{Value, json};
use signer_actors::keys::KeyAlgorithm;
use stella_signer::config::GatesConfig;
use stella_signer::keys::file::FileKey;
use stella_signer_tools::mint::{self, MintAlg};
use stella_signer_tools::push::Pusher;

const ISSUER: &str = "https://authority.test.stella-ops.local";
const HTU: &str = "nats:sign.requests";

/// Gates whose entitlement gate takes OpToks of `authority_jwks` (from [`ISSUER`], DPoP-bound
/// to [`HTU`]) with licences of `licensing_jwks`; quota and provenance enforce, with no plan
/// and nothing trusted until the case adds them.
fn entitlement_gates(authority_jwks: &Path, licensing_jwks: &Path) -> GatesConfig {
    let mut gates = GatesConfig::default();
    let entitlement = &mut gates.entitlement;
    entitlement.issuer = ISSUER.into();
    entitlement.jwks_file = Some(authority_jwks.to_path_buf());
    entitlement.dpop_htu = HTU.into();
    entitlement.poe.licensing_jwks_file = Some(licensing_jwks.to_path_buf());
    gates
}

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

/// The deployment of the gate cases, and the credentials an attacker would have.
struct Gates {
    stack: Stack,
    _registry: TestRegistry,
    w: World,
    /// Another Authority key (under the real one's kid), another licensing key.
    forger: Issuer,
    forged_licensing: Issuer,
    /// A DPoP key the OpTok is not bound to.
    stranger_pem: String,
    /// The Authority's public JWKS file (an HS256 "secret" an attacker can read).
    authority_jwks: PathBuf,
    _dir: tempfile::TempDir,
}

static GATES: OnceLock<Gates> = OnceLock::new();

/// Tag of the gate deployment's streams (see `Stack::remove_stale`).
const GATES_TAG: &str = "gateworld";

fn gates() -> &'static Gates {
    shared::once(&GATES, build_gates)
}

async fn build_gates() -> Gates {
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
    let reg = TestRegistry::start_shared();
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

    let mut gates = entitlement_gates(&authority_jwks, &licensing_jwks);
    gates
        .quota
        .plans
        .insert("big".into(), plan(10000.0, 10000, 1000));
    gates.quota.plans.insert("tiny".into(), plan(0.01, 2, 10));
    gates.provenance.trusted_keys = vec![release.public_key.clone()];
    gates.provenance.insecure_registries = vec![reg.host()];
    // Redis records under prefixes of the stack's own
    let mut stack = Stack::with_gates(GATES_TAG, gates);
    stack.configure(|c| {
        c.redis = redis_at("redis://127.0.0.1:6379");
        // retryable refusals (quota) are final at once here
        c.nats.max_deliver = 1;
    });
    let (_c, js) = stack.connect().await;
    Stack::remove_stale(&js, GATES_TAG).await;
    stack.spawn_shared_worker();
    stack.wait_provisioned(&js).await;

    let (forger, _) = Issuer::new(dir.path(), "forger", MintAlg::EdDsa);
    let (forged_licensing, _) = Issuer::new(dir.path(), "forged-licensing", MintAlg::Es256);
    let (stranger_pem, _) = mint::generate_signing_key(MintAlg::EdDsa).unwrap();
    Gates {
        stack,
        _registry: reg,
        w: World {
            authority,
            licensing,
            proof_jkt: mint::jkt_of(&proof_jwk),
            proof_pem,
            scanner_repo: repo.clone(),
            trusted_digest,
            unsigned_digest,
            untrusted_digest,
            other_digest,
        },
        forger,
        forged_licensing,
        stranger_pem,
        authority_jwks,
        _dir: dir,
    }
}

/// How long a case waits for its result and audit event: generous, the deployment is shared
/// and the machine may be loaded; a passing case waits only as long as the worker takes.
const WAIT: Duration = Duration::from_secs(60);

/// Publishes `request` as `id` on `sign.requests.<subject>` of `stack`; returns its one
/// result and its audit events.
async fn judge(
    stack: &Stack,
    id: &str,
    subject: &str,
    mut request: Value,
) -> (ResultMsg, Vec<Value>) {
    request["requestId"] = id.into();
    let (_c, js) = stack.connect().await;
    stack
        .publish(
            &js,
            &format!("sign.requests.{subject}"),
            &[("Nats-Msg-Id", id)],
            serde_json::to_vec(&request).unwrap(),
        )
        .await;
    let mut results = stack.results_for(&js, id, WAIT).await;
    assert_eq!(results.len(), 1, "{id}: one result, got {results:#?}");
    let audit = stack.audit_for(&js, id, WAIT).await;
    (results.remove(0), audit)
}

/// `request` is refused with `code`, audited once as denied with that code, and not
/// signed; returns the result and the audit event.
async fn refused(
    stack: &Stack,
    id: &str,
    subject: &str,
    request: Value,
    code: &str,
) -> (ResultMsg, Value) {
    let (r, mut events) = judge(stack, id, subject, request).await;
    assert!(!r.completed(), "{id}: SIGNED, expected {code}");
    assert_eq!(r.code(), code, "{id}: {}", r.body["error"]["message"]);
    assert_eq!(events.len(), 1, "{id}: audit events {events:#?}");
    let e = events.remove(0);
    assert_eq!(
        (e["decision"].as_str(), e["errorCode"].as_str()),
        (Some("denied"), Some(code)),
        "{id}: {e:#}"
    );
    assert!(
        e.get("keys").is_none(),
        "{id}: a denied job names keys: {e:#}"
    );
    (r, e)
}

/// `request` is signed and audited once; returns the result and the audit event.
async fn signed(stack: &Stack, id: &str, subject: &str, request: Value) -> (ResultMsg, Value) {
    let (r, mut events) = judge(stack, id, subject, request).await;
    assert!(
        r.completed(),
        "{id}: expected a signature, got {}",
        r.body["error"]
    );
    assert_eq!(events.len(), 1, "{id}: audit events {events:#?}");
    (r, events.remove(0))
}

/// One test per refusal: `name => code, |gates, id| (subject tenant, request);`.
macro_rules! refusals {
    ($($(#[$doc:meta])* $name:ident => $code:literal, |$g:ident, $id:ident| $case:expr;)*) => {$(
        $(#[$doc])*
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            let $g = gates();
            let $id = stringify!($name);
            let (subject, request): (&str, Value) = $case;
            refused(&$g.stack, $id, subject, request, $code).await;
        }
    )*};
}

/// A request by `acme` (plan `big`) that passes every gate but for `change`.
fn acme(g: &Gates, id: &str, change: impl FnOnce(&mut Value)) -> (&'static str, Value) {
    let mut r = g.w.good(id, "acme", "big");
    change(&mut r);
    ("acme", r)
}

/// OpTok claims for `acme`, changed.
fn claims(g: &Gates, change: impl FnOnce(&mut Value)) -> Value {
    let mut c = g.w.optok_claims("acme");
    change(&mut c);
    c
}

/// `acme`'s request with this OpTok (and a proof made for it).
fn with_optok(g: &Gates, id: &str, optok: String) -> (&'static str, Value) {
    ("acme", g.w.with_optok(g.w.good(id, "acme", "big"), optok))
}

/// `acme`'s request with this licence.
fn with_poe(g: &Gates, id: &str, poe: String) -> (&'static str, Value) {
    acme(g, id, |r| r["poe"]["value"] = poe.into())
}

/// `acme`'s request for this scanner image.
fn with_scanner(g: &Gates, id: &str, digest: &str) -> (&'static str, Value) {
    acme(g, id, |r| r["scanner"]["imageDigest"] = digest.into())
}

// --- OpTok ---
refusals! {
    /// Signed by another key under the Authority's kid.
    optok_forged => "auth_invalid", |g, id| with_optok(g, id, mint::mint_optok(
        &g.forger.pem, &g.w.authority.kid, &g.w.optok_claims("acme")).unwrap());
    optok_alg_none => "auth_invalid", |g, id| with_optok(g, id, format!(
        "{}.{}.",
        b64(&json!({"alg": "none", "typ": "JWT"})),
        b64(&g.w.optok_claims("acme"))
    ));
    /// HS256 keyed with the Authority's public key set.
    optok_hs256_public_key => "auth_invalid", |g, id| with_optok(g, id, {
        let input = format!(
            "{}.{}",
            b64(&json!({"alg": "HS256", "kid": g.w.authority.kid, "typ": "JWT"})),
            b64(&g.w.optok_claims("acme"))
        );
        let secret = std::fs::read(&g.authority_jwks).unwrap();
        let tag = ring::hmac::sign(
            &ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &secret),
            input.as_bytes(),
        );
        format!("{input}.{}", URL_SAFE_NO_PAD.encode(tag.as_ref()))
    });
    optok_expired => "auth_expired", |g, id| with_optok(g, id, g.w.optok(&claims(g, |c| {
        c["exp"] = (now() - 3600).into();
        c["iat"] = (now() - 7200).into();
        c["nbf"] = (now() - 7200).into();
    })));
    optok_wrong_aud => "audience_mismatch", |g, id| with_optok(g, id, g.w.optok(&claims(g, |c| {
        c["aud"] = json!(["attestor"]);
    })));
    optok_no_scope => "scope_missing", |g, id| with_optok(g, id, g.w.optok(&claims(g, |c| {
        c["scope"] = "scanner.read".into();
    })));
    /// The token is globex's, the request acme's.
    tenant_token => "tenant_mismatch", |g, id| with_optok(g, id, g.w.optok(&g.w.optok_claims("globex")));
    /// Published on globex's subject.
    tenant_subject => "tenant_mismatch", |g, id| ("globex", g.w.good(id, "acme", "big"));
}

// --- DPoP ---
refusals! {
    dpop_missing => "dpop_invalid", |g, id| acme(g, id, |r| {
        r["auth"].as_object_mut().unwrap().remove("dpop");
    });
    dpop_wrong_thumbprint => "dpop_invalid", |g, id| acme(g, id, |r| {
        let op = r["auth"]["opTok"].as_str().unwrap().to_string();
        r["auth"]["dpop"] = mint::mint_dpop(&g.stranger_pem, &op, HTU, now(), &format!("jti-{}", rand_hex()))
            .unwrap()
            .into();
    });
    /// A proof made for another token.
    dpop_wrong_ath => "dpop_invalid", |g, id| acme(g, id, |r| {
        let another = claims(g, |c| c["sub"] = "svc:another-caller".into());
        r["auth"]["dpop"] = g.w.dpop(&g.w.optok(&another)).into();
    });
    dpop_stale => "dpop_invalid", |g, id| acme(g, id, |r| {
        let op = r["auth"]["opTok"].as_str().unwrap().to_string();
        r["auth"]["dpop"] = mint::mint_dpop(&g.w.proof_pem, &op, HTU, now() - 3600, &format!("jti-{}", rand_hex()))
            .unwrap()
            .into();
    });
}

/// A proof signs its first job; the same proof on another job is a replay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dpop_replayed() {
    let g = gates();
    let first = g.w.good("dpop_first_use", "acme", "big");
    let mut replay = g.w.good("dpop_replayed", "acme", "big");
    replay["auth"] = first["auth"].clone();
    signed(&g.stack, "dpop_first_use", "acme", first).await;
    refused(&g.stack, "dpop_replayed", "acme", replay, "dpop_replayed").await;
}

// --- Proof-of-Entitlement ---
refusals! {
    /// A better plan in the claims, the signature kept.
    poe_tampered => "poe_invalid", |g, id| acme(g, id, |r| {
        let poe = r["poe"]["value"].as_str().unwrap().to_string();
        let parts: Vec<&str> = poe.split('.').collect();
        let mut claims = g.w.poe_claims("acme", "big");
        claims["plan"] = "enterprise-unlimited".into();
        r["poe"]["value"] = format!("{}.{}.{}", parts[0], b64(&claims), parts[2]).into();
    });
    poe_forged => "poe_invalid", |g, id| with_poe(g, id, mint::mint_poe(
        &g.forged_licensing.pem, &g.w.licensing.kid, &g.w.poe_claims("acme", "big")).unwrap());
    poe_expired => "poe_expired", |g, id| with_poe(g, id, g.w.poe(&{
        let mut c = g.w.poe_claims("acme", "big");
        c["exp"] = (now() - 3600).into();
        c["iat"] = (now() - 7200).into();
        c
    }));
    poe_other_tenant => "poe_invalid", |g, id| with_poe(g, id, g.w.poe(&g.w.poe_claims("globex", "big")));
    poe_feature_missing => "entitlement_denied", |g, id| with_poe(g, id, g.w.poe(&{
        let mut c = g.w.poe_claims("acme", "big");
        c["features"] = json!(["scanner.scan"]);
        c
    }));
}

/// Burst 2: two jobs sign, the third is refused, retryable, with a wait (max_deliver 1 makes
/// the refusal final at once). `tinyco` is this test's tenant alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quota_burst_then_exceeded() {
    let g = gates();
    for id in ["quota-1", "quota-2"] {
        signed(&g.stack, id, "tinyco", g.w.good(id, "tinyco", "tiny")).await;
    }
    let (r, _) = refused(
        &g.stack,
        "quota-3",
        "tinyco",
        g.w.good("quota-3", "tinyco", "tiny"),
        "quota_exceeded",
    )
    .await;
    assert!(
        r.body["error"]["retryAfterMs"].as_u64().unwrap() > 1000,
        "{:#}",
        r.body
    );
    assert_eq!(r.body["error"]["retryable"], true);
}

// --- scanner provenance ---
refusals! {
    scanner_unsigned => "provenance_untrusted", |g, id| with_scanner(g, id, &g.w.unsigned_digest);
    scanner_untrusted_key => "provenance_untrusted", |g, id| with_scanner(g, id, &g.w.untrusted_digest);
    /// The trusted release's signature, copied to another image.
    scanner_signature_for_another_digest => "provenance_untrusted", |g, id| with_scanner(g, id, &g.w.other_digest);
}

/// A job that passes every gate is signed, and its audit event names the caller and every
/// gate's verdict.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_that_passes_every_gate_is_signed_and_audited() {
    let g = gates();
    let (_, ok) = signed(&g.stack, "ok-1", "acme", g.w.good("ok-1", "acme", "big")).await;
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
    assert_eq!(ok["provenance"]["scannerDigest"], g.w.trusted_digest);
}
