//! Large artefacts through the JetStream Object Store (`docs/contract.md#large-artefacts`),
//! against the real NATS and `stella-signer serve`: 5 MB and 40 MB statements go in as
//! `payloadRef` (uploaded by `stella-signer submit`), their results come out as
//! `envelopeRef` / `bundleRefs`, and the fetched envelope and bundles verify with the
//! independent peers. Bad references are refused with their codes and audited; a small
//! statement stays inline.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::stack::{ResultMsg, Stack, identity_file, request};
use common::{run, signer, verify_bundle_peer, verify_dsse_peer};
use serde_json::{Value, json};
use signer_actors::objects::ObjectRef;
use stella_signer::schemas::SchemaKind;

/// A stack whose jobs may take long (a 40 MB job on a busy machine): a redelivery in the
/// middle of one would only make the test slower, but it is not what this test is about.
fn large_stack(tag: &str) -> Stack {
    let stack = Stack::new(tag);
    stack.configure(|c| c.nats.ack_wait = Duration::from_secs(120));
    stack
}

/// A CycloneDX-like in-toto Statement of at least `size` bytes: many small components, as
/// a real SBOM has (so the signer cannot get away with a single big string).
fn sbom_statement(size: usize, tag: &str) -> Vec<u8> {
    let mut components = Vec::new();
    let mut total = 0;
    let mut i = 0usize;
    while total < size {
        let c = json!({
            "type": "library",
            "name": format!("pkg-{tag}-{i}"),
            "version": format!("1.{}.{}", i % 97, i % 13),
            "purl": format!("pkg:npm/pkg-{tag}-{i}@1.{}.{}", i % 97, i % 13),
            "hashes": [{"alg": "SHA-256", "content": format!("{:064x}", i)}],
            "licenses": [{"license": {"id": "Apache-2.0"}}]
        });
        total += c.to_string().len() + 1;
        components.push(c);
        i += 1;
    }
    serde_json::to_vec(&json!({
        "_type": "https://in-toto.io/Statement/v1",
        "subject": [{"name": format!("registry.example/acme/app-{tag}"), "digest": {"sha256": "5".repeat(64)}}],
        "predicateType": "https://cyclonedx.org/bom",
        "predicate": {"bomFormat": "CycloneDX", "specVersion": "1.6", "components": components}
    }))
    .unwrap()
}

/// The stack's public keys as PEM files, with their keyids: (path, keyid) for `ec`, `ed`.
fn key_files(stack: &Stack) -> Vec<(PathBuf, String)> {
    stack
        .public_keys
        .iter()
        .enumerate()
        .map(|(i, k)| {
            let path = stack.dir.path().join(format!("key-{i}.pub"));
            std::fs::write(&path, k.to_pem()).unwrap();
            (path, k.keyid())
        })
        .collect()
}

/// `stella-signer submit --wait --out DIR` of `statement` with `profile` (and `extra`
/// flags); returns the printed result.
fn submit(
    stack: &Stack,
    statement: &Path,
    profile: &str,
    id: &str,
    out: &Path,
    extra: &[&str],
) -> Value {
    let mut cmd = signer();
    cmd.args(["submit", "--config"])
        .arg(&stack.config)
        .args(["--tenant", "acme", "--profile", profile, "--request-id", id])
        .arg("--statement")
        .arg(statement)
        .arg("--identity")
        .arg(identity_file(stack.dir.path()))
        .args(["--wait", "--timeout", "300s", "--json", "--out"])
        .arg(out)
        .args(extra);
    let output = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "submit {id}: {stdout}{stderr}\nworker log:\n{}",
        stack.log(0)
    );
    assert!(stderr.contains("uploaded the statement"), "{stderr}");
    assert!(stderr.contains("fetched by reference"), "{stderr}");
    serde_json::from_str(&stdout).unwrap()
}

/// Checks what `submit --out` wrote with the peers: the envelope (every signature, by
/// securesystemslib), each bundle (sigstore-js and securesystemslib), and that the
/// signed payload is the statement file byte for byte.
fn verify_out(out: &Path, statement: &[u8], keys: &[&(PathBuf, String)]) {
    let envelope = out.join("envelope.json");
    let pubs: Vec<&Path> = keys.iter().map(|k| k.0.as_path()).collect();
    let mut extra = vec!["--threshold".to_string(), keys.len().to_string()];
    for k in keys {
        extra.extend(["--expect-keyid".to_string(), k.1.clone()]);
    }
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    let (code, text) = verify_dsse_peer(&envelope, &pubs, &extra);
    assert_eq!(
        code,
        0,
        "securesystemslib on {}: {text}",
        envelope.display()
    );
    let env: signer_actors::dsse::Envelope =
        serde_json::from_slice(&std::fs::read(&envelope).unwrap()).unwrap();
    assert!(
        env.payload == statement,
        "signed as uploaded, byte for byte"
    );
    for (i, key) in keys.iter().enumerate() {
        let bundle = out.join(format!("bundles/bundle-{i}.json"));
        let (code, text) = verify_bundle_peer(
            &bundle,
            &[key.0.to_str().unwrap(), "--hint", &key.1, "--intoto"],
        );
        assert_eq!(code, 0, "sigstore-js on {}: {text}", bundle.display());
        let (code, text) = verify_dsse_peer(&bundle, &[key.0.as_path()], &["--intoto"]);
        assert_eq!(code, 0, "securesystemslib on {}: {text}", bundle.display());
    }
    assert!(
        !out.join(format!("bundles/bundle-{}.json", keys.len()))
            .exists()
    );
}

fn assert_by_reference(result: &Value, bundles: usize) {
    let violations = SchemaKind::Completed.violations(result).unwrap();
    assert!(violations.is_empty(), "{violations:?}");
    assert!(result.get("envelope").is_none() && result.get("bundles").is_none());
    let env: ObjectRef = serde_json::from_value(result["envelopeRef"].clone()).unwrap();
    let refs: Vec<ObjectRef> = serde_json::from_value(result["bundleRefs"].clone()).unwrap();
    assert_eq!(refs.len(), bundles);
    let id = result["requestId"].as_str().unwrap();
    assert_eq!(env.name, format!("results/acme/{id}/envelope.json"));
    for (i, r) in refs.iter().enumerate() {
        assert_eq!(r.name, format!("results/acme/{id}/bundle-{i}.json"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_and_forty_megabyte_statements_are_signed_by_reference_and_verify_with_the_peers() {
    let mut stack = large_stack("lg");
    stack.spawn_worker();
    let (_c, js) = stack.connect().await;
    stack.wait_provisioned(&js).await;
    let keys = key_files(&stack);
    let dir = tempfile::tempdir().unwrap();
    // serve created the bucket, with the default TTL
    let mut blobs = js
        .get_stream(format!("OBJ_{}", stack.stream("BLOBS")))
        .await
        .unwrap();
    assert_eq!(
        blobs.info().await.unwrap().config.max_age,
        Duration::from_secs(7 * 24 * 3600)
    );

    // 5 MB, two keys (ECDSA and Ed25519): two signatures, two bundles
    let five = sbom_statement(5 << 20, "five");
    let five_path = dir.path().join("five.json");
    std::fs::write(&five_path, &five).unwrap();
    let out5 = dir.path().join("out5");
    // in CBOR: the request, and so the result carrying the references, is CBOR on the wire
    let result = submit(&stack, &five_path, "multi", "large-5mb", &out5, &["--cbor"]);
    assert_by_reference(&result, 2);
    verify_out(&out5, &five, &[&keys[0], &keys[1]]);

    // 40 MB, one key
    let forty = sbom_statement(40 << 20, "forty");
    let forty_path = dir.path().join("forty.json");
    std::fs::write(&forty_path, &forty).unwrap();
    let out40 = dir.path().join("out40");
    let result = submit(&stack, &forty_path, "default", "large-40mb", &out40, &[]);
    assert_by_reference(&result, 1);
    verify_out(&out40, &forty, &[&keys[0]]);
    assert_eq!(
        result["subjects"][0]["name"],
        "registry.example/acme/app-forty"
    );

    // one result each, audited as signed with the statements' subjects
    let results = stack
        .results(&js, 2, Duration::from_secs(30), Duration::from_secs(1))
        .await;
    assert_eq!(results.len(), 2, "{results:?}");
    let content_type = |id: &str| {
        results
            .iter()
            .find(|r| r.header("Signer-Request-Id") == Some(id))
            .and_then(|r| r.header("Content-Type"))
            .map(str::to_owned)
    };
    assert_eq!(
        content_type("large-5mb").as_deref(),
        Some("application/cbor")
    );
    assert_eq!(
        content_type("large-40mb").as_deref(),
        Some("application/json")
    );
    let events = stack.audit_events(&js).await;
    for id in ["large-5mb", "large-40mb"] {
        let mine: Vec<&Value> = events.iter().filter(|e| e["requestId"] == id).collect();
        assert_eq!(mine.len(), 1, "{id}: {mine:?}");
        assert_eq!(mine[0]["decision"], "signed");
        assert_eq!(mine[0]["subjects"][0]["sha256"], "5".repeat(64));
    }
    // `watch --fetch` writes the same artefacts, fetched and checked
    let fetched = dir.path().join("fetched");
    let mut cmd = signer();
    cmd.args(["watch", "--config"])
        .arg(&stack.config)
        .args(["--all", "--count", "2", "--idle", "60s", "--fetch"])
        .arg(&fetched);
    let (code, text) = run(cmd);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("envelopeRef="), "{text}");
    assert_eq!(
        std::fs::read(fetched.join("acme/large-5mb/envelope.json")).unwrap(),
        std::fs::read(out5.join("envelope.json")).unwrap()
    );
    verify_out(
        &fetched.join("acme/large-5mb"),
        &five,
        &[&keys[0], &keys[1]],
    );
    stack.cleanup(&js).await;
}

/// Uploads `bytes` as `name` to the stack's bucket.
async fn upload(stack: &Stack, js: &async_nats::jetstream::Context, name: &str, bytes: &[u8]) {
    let store = js.get_object_store(stack.stream("BLOBS")).await.unwrap();
    stella_signer::blobs::put(&store, name, bytes)
        .await
        .unwrap();
}

fn with_ref(id: &str, r: &ObjectRef) -> Vec<u8> {
    let mut body = request(id, "acme", None);
    body.as_object_mut().unwrap().remove("statement");
    body["payloadRef"] = serde_json::to_value(r).unwrap();
    serde_json::to_vec(&body).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_references_are_refused_audited_and_a_small_statement_stays_inline() {
    let mut stack = large_stack("lgbad");
    stack.configure(|c| c.worker.max_payload_ref_bytes = 2_000_000);
    let (_c, js) = stack.connect().await;
    let bucket = stack.stream("BLOBS");
    // an operator provisioned the bucket with a TTL of their own: serve leaves it so
    let ttl = Duration::from_secs(3600);
    js.create_object_store(async_nats::jetstream::object_store::Config {
        bucket: bucket.clone(),
        max_age: ttl,
        ..Default::default()
    })
    .await
    .unwrap();
    stack.spawn_worker();
    stack.wait_provisioned(&js).await;
    let statement = sbom_statement(200_000, "bad");
    upload(&stack, &js, "in/statement", &statement).await;
    let good = ObjectRef::of(&bucket, "in/statement", &statement);
    let cases = [
        (
            "bad-digest",
            ObjectRef {
                sha256: "0".repeat(64),
                ..good.clone()
            },
            "invalid_request",
        ),
        (
            "bad-size",
            ObjectRef {
                size: good.size - 1,
                ..good.clone()
            },
            "invalid_request",
        ),
        (
            "missing",
            ObjectRef {
                name: "in/never-uploaded".into(),
                ..good.clone()
            },
            "invalid_request",
        ),
        (
            "too-large",
            ObjectRef {
                size: 3_000_000,
                ..good.clone()
            },
            "payload_too_large",
        ),
    ];
    for (id, r, _) in &cases {
        stack
            .publish(
                &js,
                "sign.requests.acme",
                &[("Nats-Msg-Id", id)],
                with_ref(id, r),
            )
            .await;
    }
    // by reference, signed: a small result stays inline
    stack
        .publish(
            &js,
            "sign.requests.acme",
            &[("Nats-Msg-Id", "good-ref")],
            with_ref("good-ref", &good),
        )
        .await;
    // a small inline statement: inline result, nothing stored for it
    let small = serde_json::to_vec(&request("small", "acme", None)).unwrap();
    stack
        .publish(
            &js,
            "sign.requests.acme",
            &[("Nats-Msg-Id", "small")],
            small,
        )
        .await;

    let results = stack
        .results(&js, 6, Duration::from_secs(60), Duration::from_secs(1))
        .await;
    let of = |id: &str| -> Vec<&ResultMsg> {
        results
            .iter()
            .filter(|r| r.header("Signer-Request-Id") == Some(id))
            .collect()
    };
    let events = stack.audit_events(&js).await;
    for (id, _, code) in &cases {
        let r = of(id);
        assert_eq!(r.len(), 1, "{id}: {results:?}");
        assert!(!r[0].completed(), "{id}: {:?}", r[0].body);
        assert_eq!(r[0].code(), *code, "{id}: {:?}", r[0].body);
        assert_eq!(r[0].body["error"]["retryable"], false);
        let audited: Vec<&Value> = events.iter().filter(|e| e["requestId"] == *id).collect();
        assert_eq!(audited.len(), 1, "{id}");
        assert_eq!(audited[0]["errorCode"], *code);
    }
    for id in ["good-ref", "small"] {
        let r = of(id);
        assert_eq!(r.len(), 1, "{id}");
        assert!(r[0].completed(), "{id}: {:?}", r[0].body);
        assert!(r[0].body.get("envelope").is_some(), "{id} inline");
        common::stack::verify_completed(&stack, r[0]);
    }
    let env: signer_actors::dsse::Envelope =
        serde_json::from_value(of("good-ref")[0].body["envelope"].clone()).unwrap();
    assert!(env.payload == statement);
    // nothing was stored for the inline results
    let store = js.get_object_store(&bucket).await.unwrap();
    for id in ["good-ref", "small"] {
        assert!(
            store
                .info(format!("results/acme/{id}/envelope.json"))
                .await
                .is_err(),
            "{id}"
        );
    }
    let mut stream = js.get_stream(format!("OBJ_{bucket}")).await.unwrap();
    assert_eq!(
        stream.info().await.unwrap().config.max_age,
        ttl,
        "left as provisioned"
    );
    // `submit` of a small statement file sends it inline: the CLI knows the server's
    // max_payload before it decides (it connects in the background, so it waits for it)
    let out = tempfile::tempdir().unwrap();
    let output = signer()
        .args(["submit", "--config"])
        .arg(&stack.config)
        .args(["--tenant", "acme", "--request-id", "cli-small"])
        .arg("--statement")
        .arg(common::example_statement())
        .arg("--identity")
        .arg(identity_file(stack.dir.path()))
        .args(["--wait", "--timeout", "60s", "--json", "--out"])
        .arg(out.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(
        !stderr.contains("uploaded the statement"),
        "sent inline: {stderr}"
    );
    assert!(out.path().join("envelope.json").exists());
    stack.cleanup(&js).await;
}
