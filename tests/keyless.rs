//! Keyless signing through `serve` against the offline Sigstore peer (Fulcio v2 and an
//! RFC 3161 TSA): the bundles verify with sigstore-js against the peer's trusted root and
//! the identity in the token, one certificate serves many jobs, a certificate near its end
//! is replaced with one for the token the file holds now, and an unreachable Fulcio fails
//! jobs as retryable `key_unavailable`.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::operators::Operators;
use common::sigstore::{MockSigstore, write_identity_token};
use common::stack::{ResultMsg, Stack, request};
use common::{run, verify_bundle_peer, verify_dsse_peer, write_json};
use stella_signer::config::{FulcioKeyConfig, ProfileConfig};

const ISSUER: &str = "https://token.actions.example.com";
const SUBJECT: &str = "https://ci.example.com/acme/scanner/.ci/release.yml@refs/heads/main";

/// A `fulcio` key `keyless` for Fulcio at `fulcio`, whose certificates must chain to `roots`.
fn keyless_key(fulcio: &str, token: &Path, roots: &Path) -> FulcioKeyConfig {
    FulcioKeyConfig::new("keyless", fulcio, token, roots)
}

/// Adds `key` and the profile `keyless` it signs alone to `stack`.
fn configure_keyless(stack: &Stack, key: FulcioKeyConfig) {
    stack.configure(|c| {
        c.keys.push(key.into());
        c.profiles
            .insert("keyless".into(), ProfileConfig::new(["keyless"]));
    });
}

/// The public key of a PEM certificate, by openssl (independent of our parsing).
fn certificate_public_key(dir: &Path, name: &str, cert_pem: &str) -> std::path::PathBuf {
    let cert = dir.join(format!("{name}.crt"));
    std::fs::write(&cert, cert_pem).unwrap();
    let mut cmd = Command::new("openssl");
    cmd.args(["x509", "-noout", "-pubkey", "-in"]).arg(&cert);
    let (code, text) = run(cmd);
    assert_eq!(code, 0, "openssl: {text}");
    let public = dir.join(format!("{name}.pub"));
    std::fs::write(&public, text).unwrap();
    public
}

/// Checks a keyless signature of `r` (index `i`) with both peers; returns its leaf PEM.
fn verify_keyless(mock: &MockSigstore, dir: &Path, r: &ResultMsg, i: usize, san: &str) -> String {
    let id = r.header("Signer-Request-Id").unwrap_or("?").to_string();
    let violations = stella_signer::schemas::SchemaKind::Completed
        .violations(&r.body)
        .unwrap();
    assert!(violations.is_empty(), "{id}: {violations:#?}");
    let signer = &r.body["signers"][i];
    assert_eq!(signer["mode"], "keyless", "{id}: {signer:#}");
    assert_eq!(signer["source"], "fulcio", "{id}");
    assert_eq!(signer["algorithm"], "ecdsa-p256-sha256", "{id}");
    assert!(
        signer.get("publicKey").is_none(),
        "{id}: keyless signers carry a certificate"
    );
    let chain = signer["certificateChain"].as_array().unwrap();
    assert_eq!(chain.len(), 2, "{id}: leaf and Fulcio root");
    let leaf = chain[0].as_str().unwrap().to_string();

    let bundle = &r.body["bundles"][i];
    let material = &bundle["verificationMaterial"];
    assert!(material.get("publicKey").is_none(), "{id}: {material:#}");
    assert_eq!(material["tlogEntries"], serde_json::json!([]), "{id}");
    assert_eq!(
        material["timestampVerificationData"]["rfc3161Timestamps"]
            .as_array()
            .map(Vec::len),
        Some(1),
        "{id}"
    );
    let path = write_json(dir, &format!("{id}-{i}.bundle.json"), bundle);
    let trusted_root = mock.trusted_root();
    let (code, text) = verify_bundle_peer(
        &path,
        &[
            "--trusted-root",
            trusted_root.to_str().unwrap(),
            "--tlog",
            "0",
            "--san",
            san,
            "--issuer",
            ISSUER,
            "--intoto",
        ],
    );
    assert_eq!(code, 0, "sigstore-js on {id} bundle {i}: {text}");

    // The envelope's signature also verifies, with securesystemslib, under the key the
    // certificate names.
    let public = certificate_public_key(dir, &format!("{id}-{i}"), &leaf);
    let single = serde_json::json!({
        "payloadType": r.body["envelope"]["payloadType"],
        "payload": r.body["envelope"]["payload"],
        "signatures": [r.body["envelope"]["signatures"][i]],
    });
    let envelope = write_json(dir, &format!("{id}-{i}.envelope.json"), &single);
    let (code, text) = verify_dsse_peer(&envelope, &[&public], &["--intoto"]);
    assert_eq!(code, 0, "securesystemslib on {id} signature {i}: {text}");
    leaf
}

async fn publish_jobs(stack: &Stack, js: &async_nats::jetstream::Context, jobs: &[(&str, &str)]) {
    for (id, profile) in jobs {
        let body = serde_json::to_vec(&request(id, "acme", Some(profile))).unwrap();
        stack
            .publish(js, "sign.requests.acme", &[("Nats-Msg-Id", id)], body)
            .await;
    }
}

fn result_for<'a>(results: &'a [ResultMsg], id: &str) -> &'a ResultMsg {
    results
        .iter()
        .find(|r| r.header("Signer-Request-Id") == Some(id))
        .unwrap_or_else(|| panic!("no result for {id}"))
}

/// `signer_key_certificate_expiry_seconds{key,mode="keyless"}` from a worker's /metrics
/// (the poller sets it every 5 s).
async fn certificate_seconds_left(port: u16, key: &str) -> f64 {
    use std::io::{Read as _, Write as _};
    let prefix =
        format!("signer_key_certificate_expiry_seconds{{key=\"{key}\",mode=\"keyless\"}} ");
    let deadline = std::time::Instant::now() + common::stack::MIN_WAIT;
    loop {
        let mut text = String::new();
        if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) {
            let _ = write!(s, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
            let _ = s.read_to_string(&mut text);
        }
        if let Some(v) = text
            .lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|v| v.trim().parse().ok())
        {
            return v;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no {prefix} in\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyless_bundles_verify_with_sigstore_js_and_one_certificate_serves_many_jobs() {
    let mock = MockSigstore::start();
    let secrets = tempfile::tempdir().unwrap();
    let token = secrets.path().join("token");
    write_identity_token(&token, ISSUER, SUBJECT);
    let mut stack = Stack::new("keyless");
    let key = FulcioKeyConfig {
        tsa_url: Some(mock.tsa_url()),
        ..keyless_key(&mock.url(), &token, &mock.trusted_root())
    };
    configure_keyless(&stack, key);
    stack.configure(|c| {
        c.profiles.insert(
            "keyless-multi".into(),
            ProfileConfig::new(["keyless", "ed"]),
        );
    });
    let metrics_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    stack.spawn_worker_env(&[("SIGNER_HTTP__LISTEN", &format!("127.0.0.1:{metrics_port}"))]);
    let (_c, js) = stack.connect().await;
    stack.wait_provisioned(&js).await;
    stack.wait_log(
        0,
        &["keyless certificate issued", SUBJECT],
        Duration::from_secs(20),
    );
    // the current certificate's time left is a gauge, by key name
    let left = certificate_seconds_left(metrics_port, "keyless").await;
    assert!(left > 0.0 && left <= 24.0 * 3600.0, "{left}");

    let jobs: Vec<(String, &str)> = (0..6)
        .map(|i| (format!("kl-{i}"), "keyless"))
        .chain([("kl-multi".to_string(), "keyless-multi")])
        .collect();
    let refs: Vec<(&str, &str)> = jobs.iter().map(|(i, p)| (i.as_str(), *p)).collect();
    publish_jobs(&stack, &js, &refs).await;
    let results = stack
        .results(
            &js,
            jobs.len(),
            Duration::from_secs(30),
            Duration::from_millis(300),
        )
        .await;
    assert_eq!(
        results.len(),
        jobs.len(),
        "{results:#?}\n{}\n{}",
        stack.log(0),
        mock.log()
    );

    let out = tempfile::tempdir().unwrap();
    let mut leaves = std::collections::BTreeSet::new();
    for (id, _) in &jobs {
        let r = result_for(&results, id);
        assert!(r.completed(), "{id}: {:#}\n{}", r.body, stack.log(0));
        leaves.insert(verify_keyless(&mock, out.path(), r, 0, SUBJECT));
    }
    // the multi-signature job: the file key's bundle is keyful as before
    let multi = result_for(&results, "kl-multi");
    assert_eq!(multi.body["signers"][1]["mode"], "keyful");
    let ed_pub = out.path().join("ed.pub");
    std::fs::write(&ed_pub, stack.public_keys[1].to_pem()).unwrap();
    let bundle = write_json(out.path(), "multi-1.bundle.json", &multi.body["bundles"][1]);
    let (code, text) = verify_bundle_peer(
        &bundle,
        &[
            ed_pub.to_str().unwrap(),
            "--hint",
            &stack.public_keys[1].keyid(),
        ],
    );
    assert_eq!(code, 0, "sigstore-js on the keyful bundle: {text}");

    assert_eq!(
        leaves.len(),
        1,
        "one certificate for every job of its window"
    );
    assert_eq!(mock.certificates_issued(), 1, "{}", mock.log());
    assert_eq!(
        mock.timestamps_issued(),
        jobs.len(),
        "one timestamp per signature"
    );

    // A tampered keyless bundle is refused by the same verifier.
    let r = result_for(&results, "kl-0");
    let mut forged = r.body["bundles"][0].clone();
    let other = result_for(&results, "kl-1");
    forged["dsseEnvelope"]["payload"] = other.body["envelope"]["payload"].clone();
    let path = write_json(out.path(), "forged.bundle.json", &forged);
    let trusted_root = mock.trusted_root();
    let (code, text) = verify_bundle_peer(
        &path,
        &[
            "--trusted-root",
            trusted_root.to_str().unwrap(),
            "--tlog",
            "0",
        ],
    );
    assert_eq!(
        code, 1,
        "a payload from another job must not verify: {text}"
    );
    stack.cleanup(&js).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_near_its_end_is_replaced_for_the_token_the_file_holds_now() {
    let mock = MockSigstore::start();
    let secrets = tempfile::tempdir().unwrap();
    let token = secrets.path().join("token");
    write_identity_token(&token, ISSUER, "https://ci.example.com/first");
    // Fulcio certificates live 10 minutes: renewing 10 minutes ahead means a new one for
    // every signature, which is how this test sees renewals without waiting.
    let mut stack = Stack::new("klrenew");
    let key = FulcioKeyConfig {
        tsa_url: Some(mock.tsa_url()),
        renew_before: Duration::from_secs(600),
        ..keyless_key(&mock.url(), &token, &mock.trusted_root())
    };
    configure_keyless(&stack, key);
    stack.spawn_worker();
    let (_c, js) = stack.connect().await;
    stack.wait_provisioned(&js).await;
    stack.wait_log(0, &["keyless certificate issued"], Duration::from_secs(20));

    let out = tempfile::tempdir().unwrap();
    publish_jobs(&stack, &js, &[("r-1", "keyless")]).await;
    let first = stack
        .results(&js, 1, Duration::from_secs(30), Duration::ZERO)
        .await;
    assert_eq!(first.len(), 1, "{}", stack.log(0));
    let leaf1 = verify_keyless(
        &mock,
        out.path(),
        result_for(&first, "r-1"),
        0,
        "https://ci.example.com/first",
    );

    // The platform rotates the projected token in place; no restart.
    write_identity_token(&token, ISSUER, "https://ci.example.com/second");
    publish_jobs(&stack, &js, &[("r-2", "keyless")]).await;
    let both = stack
        .results(&js, 2, Duration::from_secs(30), Duration::ZERO)
        .await;
    assert_eq!(both.len(), 2, "{}", stack.log(0));
    let r2 = result_for(&both, "r-2");
    let leaf2 = verify_keyless(&mock, out.path(), r2, 0, "https://ci.example.com/second");
    assert_ne!(leaf1, leaf2);
    assert_ne!(
        r2.body["signers"][0]["keyid"],
        result_for(&both, "r-1").body["signers"][0]["keyid"],
        "a new certificate comes with a new ephemeral key"
    );
    assert_eq!(
        mock.certificates_issued(),
        3,
        "load, r-1, r-2: {}",
        mock.log()
    );
    stack.cleanup(&js).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_fulcio_fails_jobs_as_retryable_key_unavailable() {
    let secrets = tempfile::tempdir().unwrap();
    let token = secrets.path().join("token");
    write_identity_token(&token, ISSUER, SUBJECT);
    // nothing listens there
    let closed = format!("http://127.0.0.1:{}", common::registry::free_port());
    // any valid roots file: Fulcio never answers
    let mock = MockSigstore::start();
    let mut stack = Stack::new("kldown");
    let key = FulcioKeyConfig {
        http_timeout: Duration::from_secs(2),
        ..keyless_key(&closed, &token, &mock.trusted_root())
    };
    configure_keyless(&stack, key);
    stack.spawn_worker();
    let (_c, js) = stack.connect().await;
    stack.wait_provisioned(&js).await;
    stack.wait_log(
        0,
        &["key not loaded", "keyless", "Fulcio"],
        Duration::from_secs(20),
    );
    publish_jobs(&stack, &js, &[("down-1", "keyless"), ("file-1", "default")]).await;
    let results = stack
        .results(&js, 2, Duration::from_secs(30), Duration::from_millis(300))
        .await;
    assert_eq!(results.len(), 2, "{}", stack.log(0));
    let down = result_for(&results, "down-1");
    assert_eq!(down.code(), "key_unavailable", "{:#}", down.body);
    assert_eq!(down.body["error"]["retryable"], true, "{:#}", down.body);
    assert!(
        result_for(&results, "file-1").completed(),
        "the other keys keep signing"
    );
    stack.cleanup(&js).await;
}

/// Fulcio down when a certificate is due for renewal: the key keeps signing with the
/// certificate it has (it still has minutes to live) instead of failing jobs.
#[tokio::test]
async fn a_fulcio_outage_at_renewal_keeps_signing_with_the_current_certificate() {
    let mut mock = MockSigstore::start();
    let secrets = tempfile::tempdir().unwrap();
    let token = secrets.path().join("token");
    write_identity_token(&token, ISSUER, SUBJECT);
    let settings = stella_signer::keys::keyless::KeylessSettings {
        fulcio_url: mock.url(),
        identity_token_file: token,
        tsa_url: None,
        // due for renewal at every signature
        renew_before: Duration::from_secs(600),
        timeout: Duration::from_secs(2),
        fulcio_roots: mock.trusted_root(),
    };
    use signer_actors::keys::KeySigner as _;
    let key = stella_signer::keys::keyless::KeylessKey::open("kl", settings, None)
        .await
        .unwrap();
    let first = key.sign(b"one").await.unwrap();
    assert_eq!(mock.certificates_issued(), 2, "{}", mock.log());

    mock.stop();
    let second = key.sign(b"two").await.unwrap();
    assert_eq!(
        second.identity.keyid, first.identity.keyid,
        "the current certificate and key are kept"
    );
    assert!(second.identity.public_key.verify(b"two", &second.sig));
    assert_eq!(
        second.identity.certificate_chain,
        first.identity.certificate_chain
    );
}

/// `stella-signer ARGS --config` of `stack`: exit code and output.
fn signer(stack: &Stack, args: &[&str]) -> (i32, String) {
    let mut cmd = common::signer();
    cmd.args(args).arg("--config").arg(&stack.config);
    run(cmd)
}

/// `keys list --json`.
fn keys_list(stack: &Stack) -> Vec<serde_json::Value> {
    let (code, list) = signer(stack, &["keys", "list", "--json"]);
    assert_eq!(code, 0, "{list}");
    serde_json::from_str::<Vec<serde_json::Value>>(&list).unwrap_or_else(|e| panic!("{e}: {list}"))
}

fn listed<'a>(keys: &'a [serde_json::Value], keyid: &str) -> &'a serde_json::Value {
    keys.iter()
        .find(|k| k["keyid"] == keyid)
        .unwrap_or_else(|| panic!("{keyid} is not listed: {keys:#?}"))
}

/// Publishes one job and waits for its result (the `n`th result of the stack).
async fn sign_one(
    stack: &Stack,
    js: &async_nats::jetstream::Context,
    id: &str,
    n: usize,
) -> ResultMsg {
    publish_jobs(stack, js, &[(id, "keyless")]).await;
    let results = stack
        .results(js, n, Duration::from_secs(30), Duration::ZERO)
        .await;
    results
        .into_iter()
        .find(|r| r.header("Signer-Request-Id") == Some(id))
        .unwrap_or_else(|| panic!("no result for {id}: {}", stack.log(0)))
}

/// Fulcio answers, but with certificates of another CA than the configured root: the key is
/// not loaded, jobs fail as retryable `key_unavailable` and nothing is signed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_that_does_not_chain_to_the_configured_root_is_not_used() {
    let fulcio = MockSigstore::start();
    let other = MockSigstore::start();
    let secrets = tempfile::tempdir().unwrap();
    let token = secrets.path().join("token");
    write_identity_token(&token, ISSUER, SUBJECT);
    let mut stack = Stack::new("klroot");
    configure_keyless(
        &stack,
        keyless_key(&fulcio.url(), &token, &other.trusted_root()),
    );
    stack.spawn_worker();
    let (_c, js) = stack.connect().await;
    stack.wait_provisioned(&js).await;
    stack.wait_log(
        0,
        &["key not loaded", "keyless", "fails the fulcio_roots check"],
        Duration::from_secs(20),
    );
    assert!(
        fulcio.certificates_issued() >= 1,
        "Fulcio did answer: {}",
        fulcio.log()
    );
    publish_jobs(
        &stack,
        &js,
        &[("untrusted-1", "keyless"), ("file-1", "default")],
    )
    .await;
    let results = stack
        .results(&js, 2, Duration::from_secs(30), Duration::from_millis(300))
        .await;
    assert_eq!(results.len(), 2, "{}", stack.log(0));
    let refused = result_for(&results, "untrusted-1");
    assert!(!refused.completed(), "signed with an untrusted certificate");
    assert_eq!(refused.code(), "key_unavailable", "{:#}", refused.body);
    assert_eq!(
        refused.body["error"]["retryable"], true,
        "{:#}",
        refused.body
    );
    assert!(result_for(&results, "file-1").completed());
    // the refused certificates are not listed as keys either
    assert!(
        keys_list(&stack).iter().all(|k| k["source"] != "fulcio"),
        "an unused certificate was recorded"
    );
    assert!(
        stack
            .log(0)
            .contains("does not lead to a configured Fulcio root")
            || stack.log(0).contains("not a configured Fulcio root"),
        "{}",
        stack.log(0)
    );
    stack.cleanup(&js).await;
}

/// Every certificate the key obtains is listed; revoking the one in use makes the key get a
/// new one for the next job; revoking the identity makes it refuse (`key_revoked`) without
/// asking Fulcio again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyless_certificates_are_listed_and_revoked_by_certificate_or_identity() {
    let mock = MockSigstore::start();
    let secrets = tempfile::tempdir().unwrap();
    let token = secrets.path().join("token");
    write_identity_token(&token, ISSUER, SUBJECT);
    // key commands are operator-signed ([gates.control] trusts this operator)
    let operator_dir = tempfile::tempdir().unwrap();
    let ops = Operators::new(operator_dir.path(), 1);
    let operator_key = ops.all[0].key_file.to_str().unwrap().to_string();
    let mut stack = ops.stack("klrevoke", 1);
    let key = FulcioKeyConfig {
        tsa_url: Some(mock.tsa_url()),
        ..keyless_key(&mock.url(), &token, &mock.trusted_root())
    };
    configure_keyless(&stack, key);
    stack.spawn_worker();
    let (_c, js) = stack.connect().await;
    stack.wait_provisioned(&js).await;
    stack.wait_log(0, &["keyless certificate issued"], Duration::from_secs(20));
    let out = tempfile::tempdir().unwrap();

    let first = sign_one(&stack, &js, "rk-1", 1).await;
    assert!(first.completed(), "{:#}\n{}", first.body, stack.log(0));
    let leaf1 = verify_keyless(&mock, out.path(), &first, 0, SUBJECT);
    let keyid1 = first.body["signers"][0]["keyid"]
        .as_str()
        .unwrap()
        .to_string();

    // listed: the ephemeral keyid, the certificate, its identity and validity
    let keys = keys_list(&stack);
    let entry = listed(&keys, &keyid1);
    assert_eq!(entry["source"], "fulcio", "{entry:#}");
    assert_eq!(entry["name"], "keyless");
    assert_eq!(entry["status"], "active", "{entry:#}");
    assert_eq!(entry["certificateChain"][0], leaf1.as_str());
    let cert = &entry["certificate"];
    assert_eq!(cert["san"], SUBJECT, "{entry:#}");
    assert_eq!(cert["issuer"], ISSUER, "{entry:#}");
    let der = pem::parse(&leaf1).unwrap().into_contents();
    let sha = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&der));
    assert_eq!(cert["sha256"], sha.as_str(), "{entry:#}");
    assert_eq!(entry["validFrom"], cert["notBefore"]);
    assert_eq!(entry["validUntil"], cert["notAfter"]);

    // revoke the certificate in use, by its SHA-256: the next job gets a new one
    let (code, text) = signer(
        &stack,
        &[
            "keys",
            "revoke",
            &sha,
            "--reason",
            "certificate leaked",
            "--operator-key",
            &operator_key,
        ],
    );
    assert_eq!(code, 0, "{text}");
    stack.wait_log(0, &["key revoked", &keyid1], Duration::from_secs(20));
    let second = sign_one(&stack, &js, "rk-2", 2).await;
    assert!(second.completed(), "{:#}\n{}", second.body, stack.log(0));
    let leaf2 = verify_keyless(&mock, out.path(), &second, 0, SUBJECT);
    let keyid2 = second.body["signers"][0]["keyid"]
        .as_str()
        .unwrap()
        .to_string();
    assert_ne!(keyid2, keyid1, "a new ephemeral key");
    assert_ne!(leaf2, leaf1, "a new certificate");
    assert_eq!(mock.certificates_issued(), 2, "{}", mock.log());
    let keys = keys_list(&stack);
    let revoked = listed(&keys, &keyid1);
    assert_eq!(revoked["status"], "revoked", "{revoked:#}");
    assert_eq!(revoked["revocationReason"], "certificate leaked");
    assert_eq!(listed(&keys, &keyid2)["status"], "active");

    // revoke the identity: the key refuses while it is revoked, and asks Fulcio for nothing
    let (code, text) = signer(
        &stack,
        &[
            "keys",
            "revoke",
            "--issuer",
            ISSUER,
            "--operator-key",
            &operator_key,
        ],
    );
    assert_ne!(code, 0, "--issuer needs --san: {text}");
    let (code, text) = signer(
        &stack,
        &[
            "keys",
            "revoke",
            "--issuer",
            ISSUER,
            "--san",
            SUBJECT,
            "--reason",
            "workflow compromised",
            "--operator-key",
            &operator_key,
        ],
    );
    assert_eq!(code, 0, "{text}");
    stack.wait_log(
        0,
        &["keyless identity revoked", SUBJECT],
        Duration::from_secs(20),
    );
    for i in 3..6 {
        let r = sign_one(&stack, &js, &format!("rk-{i}"), i).await;
        assert!(!r.completed(), "a revoked identity signed: {:#}", r.body);
        assert_eq!(r.code(), "key_revoked", "{:#}", r.body);
        assert_eq!(r.body["error"]["retryable"], false, "{:#}", r.body);
        assert!(
            r.body["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains(SUBJECT)),
            "{:#}",
            r.body
        );
    }
    assert_eq!(mock.certificates_issued(), 2, "{}", mock.log());
    let keys = keys_list(&stack);
    let entry = listed(&keys, &keyid2);
    assert_eq!(entry["status"], "revoked", "{entry:#}");
    assert!(
        entry["revocationReason"]
            .as_str()
            .is_some_and(|r| r.contains("workflow compromised")),
        "{entry:#}"
    );
    stack.cleanup(&js).await;
}

/// A ledger in memory: what `serve`'s key bucket answers, set by the test.
#[derive(Default)]
struct TestLedger {
    recorded: std::sync::Mutex<Vec<(String, String)>>,
    revoked_keyids: std::sync::Mutex<Vec<String>>,
    revoked_identity: std::sync::Mutex<Option<(String, String)>>,
}

#[async_trait::async_trait]
impl stella_signer::keys::keyless::KeylessLedger for TestLedger {
    async fn record_certificate(
        &self,
        _name: &str,
        identity: &signer_actors::keys::SignerIdentity,
        leaf: &stella_signer::keys::fulcio_trust::VerifiedLeaf,
    ) {
        self.recorded
            .lock()
            .unwrap()
            .push((identity.keyid.clone(), leaf.san.clone()));
    }

    fn certificate_revoked(&self, keyid: &str) -> Option<String> {
        let revoked = self.revoked_keyids.lock().unwrap();
        revoked.iter().any(|k| k == keyid).then(|| "test".into())
    }

    fn identity_revoked(&self, issuer: &str, san: &str) -> Option<String> {
        let revoked = self.revoked_identity.lock().unwrap();
        (revoked.as_ref() == Some(&(issuer.to_string(), san.to_string()))).then(|| "test".into())
    }
}

/// A revoked certificate is never used again, not even while Fulcio is down (unlike a
/// certificate merely due for renewal); a revoked identity refuses without calling Fulcio.
#[tokio::test]
async fn a_revoked_certificate_is_never_used_again_even_when_fulcio_is_down() {
    use signer_actors::keys::{KeyError, KeySigner as _};
    let mut mock = MockSigstore::start();
    let secrets = tempfile::tempdir().unwrap();
    let token = secrets.path().join("token");
    write_identity_token(&token, ISSUER, SUBJECT);
    let settings = stella_signer::keys::keyless::KeylessSettings {
        fulcio_url: mock.url(),
        identity_token_file: token,
        tsa_url: None,
        renew_before: Duration::from_secs(60),
        timeout: Duration::from_secs(2),
        fulcio_roots: mock.trusted_root(),
    };
    let ledger = std::sync::Arc::new(TestLedger::default());
    let key = stella_signer::keys::keyless::KeylessKey::open(
        "kl",
        settings.clone(),
        Some(ledger.clone()),
    )
    .await
    .unwrap();
    let first = key.sign(b"one").await.unwrap();
    assert_eq!(
        *ledger.recorded.lock().unwrap(),
        [(first.identity.keyid.clone(), SUBJECT.to_string())],
        "the certificate is recorded with its identity"
    );

    // revoked: the next signature is under a new certificate, which is recorded too
    ledger
        .revoked_keyids
        .lock()
        .unwrap()
        .push(first.identity.keyid.clone());
    let second = key.sign(b"two").await.unwrap();
    assert_ne!(second.identity.keyid, first.identity.keyid);
    assert_eq!(ledger.recorded.lock().unwrap().len(), 2);
    assert_eq!(mock.certificates_issued(), 2, "{}", mock.log());

    // the identity revoked: refused, and Fulcio is not asked
    *ledger.revoked_identity.lock().unwrap() = Some((ISSUER.into(), SUBJECT.into()));
    let err = key.sign(b"three").await.err().unwrap();
    assert!(matches!(err, KeyError::Revoked(_)), "{err:?}");
    assert_eq!(mock.certificates_issued(), 2, "{}", mock.log());
    *ledger.revoked_identity.lock().unwrap() = None;
    assert!(key.sign(b"four").await.is_ok(), "signs again once lifted");

    // the current certificate revoked while Fulcio is down: unavailable, nothing signed
    mock.stop();
    ledger
        .revoked_keyids
        .lock()
        .unwrap()
        .push(second.identity.keyid.clone());
    let err = key.sign(b"five").await.err().unwrap();
    let KeyError::Unavailable(message) = &err else {
        panic!("expected Unavailable, got {err:?}")
    };
    assert!(message.contains("is revoked"), "{message}");
    // and it stays so: the revoked certificate is not kept for later either
    assert!(matches!(
        key.sign(b"six").await,
        Err(KeyError::Unavailable(_))
    ));
}
