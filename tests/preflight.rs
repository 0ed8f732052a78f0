//! Provenance pre-flight (`signer.verify.referrers`) against a real worker: the entitlement
//! gate enforcing (OpToks of a test Authority, DPoP-bound, licences of a test licensing
//! service, DPoP replay records in NATS), the provenance gate reading a real registry
//! (Debian's `docker-registry`) with a trusted release key and an allowlisted digest. The
//! answers are compared with what signing jobs for the same images get, every question's
//! audit event is read back, the CLI is run end to end, and an outside Python client
//! (nats-py, PyJWT, cryptography) asks the subject with tokens it mints itself.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::registry::TestRegistry;
use common::stack::{MIN_WAIT, Stack, disabled_gates, request};
use serde_json::{Value, json};
use signer_actors::keys::{KeyAlgorithm, KeySigner as _};
use stella_signer::config::GateMode;
use stella_signer::keys::file::FileKey;
use stella_signer_tools::mint::{self, MintAlg};
use stella_signer_tools::push::Pusher;

const ISSUER: &str = "https://authority.test.stella-ops.local";
const HTU: &str = "nats:sign.requests";
const TENANT: &str = "acme";

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn random_id(prefix: &str) -> String {
    let mut b = [0u8; 6];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b).unwrap();
    format!("{prefix}-{}", hex::encode(b))
}

/// A signing key with its kid, published in a JWKS file (the Authority, the licensing
/// service), its private key written out for the Python client (P-256: ring's Ed25519
/// PKCS#8 v2 does not load in Python's cryptography).
struct Issuer {
    pem: String,
    kid: String,
    jwks: PathBuf,
    private_key: PathBuf,
}

impl Issuer {
    fn new(dir: &Path, name: &str, alg: MintAlg) -> Issuer {
        let (pem, jwk) = mint::generate_signing_key(alg).unwrap();
        let jwks = dir.join(format!("{name}-jwks.json"));
        std::fs::write(
            &jwks,
            serde_json::to_vec(&mint::jwks(std::slice::from_ref(&jwk))).unwrap(),
        )
        .unwrap();
        let private_key = dir.join(format!("{name}.pem"));
        std::fs::write(&private_key, &pem).unwrap();
        let kid = jwk.kid.clone().unwrap_or_else(|| mint::jkt_of(&jwk));
        Issuer {
            pem,
            kid,
            jwks,
            private_key,
        }
    }
}

/// The deployment and the scanner images in its registry.
struct World {
    stack: Stack,
    reg: TestRegistry,
    client: async_nats::Client,
    js: async_nats::jetstream::Context,
    authority: Issuer,
    licensing: Issuer,
    /// Another Authority key, under the real one's kid.
    forger: Issuer,
    proof_pem: String,
    proof_jkt: String,
    repo: String,
    /// keyid of the release key.
    release: String,
    /// Signed by the release key: cosign's signature tag.
    signed: String,
    /// Signed by the release key: a DSSE attestation referrer (and its digest).
    attested: String,
    referrer: String,
    /// Unsigned, in the allowlist.
    allowlisted: String,
    /// Unsigned.
    unsigned: String,
    /// Unsigned and never asked about before a test asks.
    fresh: String,
    _dir: tempfile::TempDir,
}

async fn world(tag: &str) -> World {
    let dir = tempfile::tempdir().unwrap();
    let authority = Issuer::new(dir.path(), "authority", MintAlg::Es256);
    let licensing = Issuer::new(dir.path(), "licensing", MintAlg::Es256);
    let forger = Issuer::new(dir.path(), "forger", MintAlg::Es256);
    let (proof_pem, proof_jwk) = mint::generate_signing_key(MintAlg::EdDsa).unwrap();
    let release = FileKey::generate(KeyAlgorithm::EcdsaP256Sha256, dir.path(), "release").unwrap();
    let release_key = FileKey::load(&release.private_key, "release").unwrap();

    let reg = TestRegistry::start();
    let repo = reg.repository("stella-ops/scanner");
    let push = Pusher::new(&[reg.host()]).unwrap();
    let signed = push.push_test_image(&repo).await.unwrap();
    push.sign_image_cosign(&repo, &signed, &release_key)
        .await
        .unwrap();
    let attested = push.push_test_image(&repo).await.unwrap();
    let referrer = push
        .attach_dsse_referrer(&repo, &attested, &release_key)
        .await
        .unwrap();
    let allowlisted = push.push_test_image(&repo).await.unwrap();
    let unsigned = push.push_test_image(&repo).await.unwrap();
    let fresh = push.push_test_image(&repo).await.unwrap();

    let mut gates = disabled_gates();
    let e = &mut gates.entitlement;
    e.mode = GateMode::Enforce;
    e.issuer = ISSUER.into();
    e.jwks_file = Some(authority.jwks.clone());
    e.dpop_htu = HTU.into();
    e.poe.licensing_jwks_file = Some(licensing.jwks.clone());
    let p = &mut gates.provenance;
    p.mode = GateMode::Enforce;
    p.trusted_keys = vec![release.public_key.clone()];
    p.insecure_registries = vec![reg.host()];
    p.allowlist = vec![allowlisted.clone()];
    p.registry_timeout = Duration::from_secs(5);
    let mut stack = Stack::with_gates(tag, gates);
    stack.spawn_worker();
    let (client, js) = stack.connect().await;
    stack.wait_provisioned(&js).await;
    stack.wait_log(0, &["provenance pre-flight answering"], MIN_WAIT);
    World {
        stack,
        reg,
        client,
        js,
        authority,
        licensing,
        forger,
        proof_pem,
        proof_jkt: mint::jkt_of(&proof_jwk),
        repo,
        release: release_key.identity().keyid.clone(),
        signed,
        attested,
        referrer,
        allowlisted,
        unsigned,
        fresh,
        _dir: dir,
    }
}

impl World {
    fn optok_by(&self, issuer: &Issuer) -> String {
        let t = now();
        let claims = json!({"iss": ISSUER, "sub": "svc:scanner", "aud": ["signer"],
            "scope": "signer.sign", "tid": TENANT, "iat": t, "nbf": t, "exp": t + 600,
            "cnf": {"jkt": self.proof_jkt}});
        mint::mint_optok(&issuer.pem, &self.authority.kid, &claims).unwrap()
    }

    /// `auth` and `poe` as a job carries them: a fresh DPoP proof for the OpTok.
    fn identity_by(&self, issuer: &Issuer) -> Value {
        let optok = self.optok_by(issuer);
        let proof =
            mint::mint_dpop(&self.proof_pem, &optok, HTU, now(), &random_id("jti")).unwrap();
        let t = now();
        let licence = json!({"tid": TENANT, "plan": "team", "features": ["signer.sign"],
            "iat": t, "exp": t + 600});
        json!({
            "auth": {"opTok": optok, "dpop": proof},
            "poe": {"format": "jwt", "value": mint::mint_poe(&self.licensing.pem, &self.licensing.kid, &licence).unwrap()},
        })
    }

    fn question(&self, id: &str, digest: &str) -> Value {
        self.question_by(&self.authority, id, digest)
    }

    fn question_by(&self, issuer: &Issuer, id: &str, digest: &str) -> Value {
        let identity = self.identity_by(issuer);
        json!({
            "apiVersion": signer_actors::API_VERSION, "requestId": id, "tenant": TENANT,
            "auth": identity["auth"], "poe": identity["poe"],
            "repository": self.repo, "imageDigest": digest,
        })
    }

    /// Asks the subject (JSON) and returns the answer, checked against its schema.
    async fn ask(&self, question: &Value) -> Value {
        let request = async_nats::Request::new()
            .payload(serde_json::to_vec(question).unwrap().into())
            .timeout(Some(MIN_WAIT));
        let answer = self
            .client
            .send_request(self.stack.subject("signer.verify.referrers"), request)
            .await
            .unwrap_or_else(|e| panic!("no answer: {e}; log:\n{}", self.stack.log(0)));
        let reply: Value = serde_json::from_slice(&answer.payload).unwrap();
        schema_valid(&reply);
        reply
    }

    /// The one audit event of `request_id`.
    async fn event(&self, request_id: &str) -> Value {
        let events = self.stack.audit_for(&self.js, request_id, MIN_WAIT).await;
        assert_eq!(events.len(), 1, "{events:#?}");
        let e = events.into_iter().next().unwrap();
        assert_eq!(e["kind"], "verify_referrers", "{e:#}");
        e
    }

    /// Publishes a signing job for `digest` and returns its result.
    async fn job(&self, id: &str, digest: &str) -> common::stack::ResultMsg {
        let identity = self.identity_by(&self.authority);
        let mut body = request(id, TENANT, None);
        body["auth"] = identity["auth"].clone();
        body["poe"] = identity["poe"].clone();
        body["scanner"] = json!({"repository": self.repo, "imageDigest": digest});
        self.stack
            .publish(
                &self.js,
                &format!("sign.requests.{TENANT}"),
                &[("Nats-Msg-Id", id)],
                serde_json::to_vec(&body).unwrap(),
            )
            .await;
        let results = self.stack.results_for(&self.js, id, MIN_WAIT).await;
        assert_eq!(results.len(), 1, "{results:#?}");
        results.into_iter().next().unwrap()
    }

    /// `stella-signer provenance check REPO@DIGEST` with a fresh identity: (exit code,
    /// stdout, stderr).
    fn cli(&self, digest: &str, extra: &[&str]) -> (i32, String, String) {
        let identity = self
            ._dir
            .path()
            .join(format!("{}.json", random_id("identity")));
        std::fs::write(
            &identity,
            serde_json::to_vec(&self.identity_by(&self.authority)).unwrap(),
        )
        .unwrap();
        let out = common::signer()
            .args(["provenance", "check", &format!("{}@{digest}", self.repo)])
            .arg("--config")
            .arg(&self.stack.config)
            .args(["--tenant", TENANT, "--identity"])
            .arg(&identity)
            .args(extra)
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    }
}

fn schema_valid(reply: &Value) {
    let violations = stella_signer::schemas::SchemaKind::VerifyReferrersReply
        .violations(reply)
        .unwrap();
    assert!(violations.is_empty(), "{violations:?}: {reply:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pre_flight_gives_the_gates_verdict_audited_as_jobs_get_it() {
    let mut w = world("preflight").await;

    // Trusted by cosign's signature tag, with the release key and where it was found.
    let reply = w.ask(&w.question("q-signed", &w.signed)).await;
    assert_eq!(reply["verdict"], "trusted", "{reply:#}");
    let hex = w.signed.trim_start_matches("sha256:");
    assert_eq!(
        reply["signature"],
        json!({"keyid": w.release, "location": "tag", "reference": format!("sha256-{hex}.sig"), "format": "cosign_signature"})
    );
    assert!(reply.get("error").is_none(), "{reply:#}");
    assert_eq!(reply["imageDigest"], w.signed.as_str());
    let event = w.event("q-signed").await;
    assert!(
        reply["audit"]["seq"].as_u64().is_some_and(|s| s >= 1),
        "{reply:#}"
    );
    assert_eq!(event["decision"], "accepted");
    assert_eq!(
        event["caller"],
        json!({"iss": ISSUER, "sub": "svc:scanner"})
    );
    assert_eq!(event["auth"]["state"], "valid");
    assert_eq!(event["poe"], json!({"state": "valid", "plan": "team"}));
    assert_eq!(
        event["provenance"],
        json!({"verdict": "trusted", "scannerDigest": w.signed})
    );

    // Trusted by a DSSE referrer (the registry has no referrers API: the tag schema).
    let reply = w.ask(&w.question("q-attested", &w.attested)).await;
    assert_eq!(
        reply["signature"],
        json!({"keyid": w.release, "location": "referrer", "reference": w.referrer, "format": "dsse_attestation"}),
        "{reply:#}"
    );

    // Allowlisted: no signature, no registry needed.
    let reply = w.ask(&w.question("q-allow", &w.allowlisted)).await;
    assert_eq!(reply["verdict"], "allowlisted", "{reply:#}");
    assert!(reply.get("signature").is_none() && reply.get("error").is_none());
    assert_eq!(w.event("q-allow").await["decision"], "accepted");

    // Unsigned: untrusted, with the gate's code.
    let reply = w.ask(&w.question("q-unsigned", &w.unsigned)).await;
    assert_eq!(reply["verdict"], "untrusted", "{reply:#}");
    assert_eq!(
        (&reply["error"]["code"], &reply["error"]["retryable"]),
        (&json!("provenance_untrusted"), &json!(false))
    );
    let event = w.event("q-unsigned").await;
    assert_eq!(
        (&event["decision"], &event["errorCode"]),
        (&json!("denied"), &json!("provenance_untrusted"))
    );

    // Jobs for the same images get the same verdicts from the same gate.
    let signed_job = w.job("job-signed", &w.signed).await;
    assert!(
        signed_job.completed(),
        "{:#}\n{}",
        signed_job.body,
        w.stack.log(0)
    );
    common::stack::verify_completed(&w.stack, &signed_job);
    let unsigned_job = w.job("job-unsigned", &w.unsigned).await;
    assert_eq!(unsigned_job.code(), "provenance_untrusted");
    for (job, verdict) in [("job-signed", "trusted"), ("job-unsigned", "untrusted")] {
        let events = w.stack.audit_for(&w.js, job, MIN_WAIT).await;
        assert_eq!(events[0]["provenance"]["verdict"], verdict, "{events:#?}");
    }

    // A forged OpToken: refused by the entitlement gate, the image not looked up.
    let reply = w.ask(&w.question_by(&w.forger, "q-forged", &w.fresh)).await;
    assert_eq!(
        (&reply["verdict"], &reply["error"]["code"]),
        (&json!("not_checked"), &json!("auth_invalid")),
        "{reply:#}"
    );
    let event = w.event("q-forged").await;
    assert_eq!(
        (&event["decision"], &event["auth"]["state"]),
        (&json!("denied"), &json!("invalid"))
    );
    assert!(
        !w.stack.log(0).contains(&w.fresh),
        "the refused question's image was looked up"
    );

    // A DPoP proof is single-use: the same identity for another question is a replay.
    let first = w.question("q-proof-1", &w.signed);
    assert_eq!(w.ask(&first).await["verdict"], "trusted");
    let mut again = first.clone();
    again["requestId"] = "q-proof-2".into();
    let reply = w.ask(&again).await;
    assert_eq!(reply["error"]["code"], "dpop_replayed", "{reply:#}");

    // Bad input: answered invalid_request and audited, never a crash.
    let request = async_nats::Request::new()
        .payload(b"{\"apiVersion\": 7"[..].into())
        .timeout(Some(MIN_WAIT));
    let answer = w
        .client
        .send_request(w.stack.subject("signer.verify.referrers"), request)
        .await
        .unwrap();
    let reply: Value = serde_json::from_slice(&answer.payload).unwrap();
    schema_valid(&reply);
    assert_eq!(reply["error"]["code"], "invalid_request", "{reply:#}");
    assert_eq!(reply["tenant"], "_unknown");
    let id = reply["requestId"].as_str().unwrap().to_string();
    assert_eq!(w.event(&id).await["decision"], "failed");

    // The CLI: a line and exit 0 when trusted; JSON (over CBOR) and exit 1 when not.
    let (code, out, err) = w.cli(&w.signed, &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.starts_with("trusted ")
            && out.contains(&format!("keyid={}", w.release))
            && out.contains("tag sha256-"),
        "{out}"
    );
    let (code, out, err) = w.cli(&w.unsigned, &["--json", "--cbor"]);
    assert_eq!(code, 1, "{out}{err}");
    let reply: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (&reply["verdict"], &reply["error"]["code"]),
        (&json!("untrusted"), &json!("provenance_untrusted"))
    );
    let (code, out, err) = w.cli(&w.allowlisted, &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.starts_with("allowlisted "), "{out}");

    // The registry down: an image never judged is unavailable (retryable); one judged
    // within cache_ttl keeps its verdict, as it does for jobs.
    w.reg.stop();
    let reply = w.ask(&w.question("q-down", &w.fresh)).await;
    assert_eq!(
        (
            &reply["verdict"],
            &reply["error"]["code"],
            &reply["error"]["retryable"]
        ),
        (
            &json!("unavailable"),
            &json!("provenance_unavailable"),
            &json!(true)
        ),
        "{reply:#}"
    );
    assert_eq!(w.event("q-down").await["decision"], "failed");
    let reply = w.ask(&w.question("q-cached", &w.signed)).await;
    assert_eq!(reply["verdict"], "trusted", "{reply:#}");
    let (code, out, err) = w.cli(&w.fresh, &[]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(out.starts_with("unavailable "), "{out}");

    // Every decision went into the worker's audit chain, intact.
    let (code, out) = w.stack.audit_verify();
    assert_eq!(code, Some(0), "{out}");
    let js = w.js.clone();
    w.stack.cleanup(&js).await;
}

/// An outside client: Python with nats-py, minting its own DPoP key, OpToken bound to it,
/// proof and licence (the test only plays the Authority and the licensing service).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_client_asks_the_subject() {
    let w = world("preflightpy").await;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/preflight_client.py");
    let out = Command::new(common::outside_python())
        .arg(script)
        .args(["--nats", common::stack::NATS_URL])
        .args(["--subject", &w.stack.subject("signer.verify.referrers")])
        .args([
            "--tenant", TENANT, "--plan", "team", "--issuer", ISSUER, "--htu", HTU,
        ])
        .arg("--authority-key")
        .arg(&w.authority.private_key)
        .args([
            "--authority-kid",
            &w.authority.kid,
            "--authority-alg",
            "ES256",
        ])
        .arg("--licensing-key")
        .arg(&w.licensing.private_key)
        .args([
            "--licensing-kid",
            &w.licensing.kid,
            "--licensing-alg",
            "ES256",
        ])
        .args(["--repository", &w.repo, "--request-id", "q-python"])
        .args(["--digest", &w.signed, "--digest", &w.unsigned])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        w.stack.log(0)
    );
    let answers: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(answers.len(), 2, "{stdout}");
    for a in &answers {
        schema_valid(a);
    }
    assert_eq!(answers[0]["verdict"], "trusted", "{:#}", answers[0]);
    assert_eq!(answers[0]["signature"]["keyid"], w.release.as_str());
    assert_eq!(answers[1]["verdict"], "untrusted", "{:#}", answers[1]);
    let event = w.event("q-python-0").await;
    assert_eq!(event["caller"]["sub"], "svc:python-scanner");
    assert_eq!(event["provenance"]["verdict"], "trusted");
    let js = w.js.clone();
    w.stack.cleanup(&js).await;
}
