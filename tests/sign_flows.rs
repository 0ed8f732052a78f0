//! `stella-signer sign sbom|report` against the real stack (NATS, `stella-signer serve`),
//! and what a profile signs (`docs/contract.md#signing-policy`): CycloneDX and SPDX SBOMs and
//! a scan report with its policy are signed end to end (a large SBOM through the blob
//! bucket), and what the command wrote verifies with the independent peers
//! (securesystemslib, sigstore-js) and with `stella-signer verify`; a predicate type the
//! profile does not sign, a report without the policy its profile requires and one under a
//! policy digest the profile does not accept are refused with `invalid_request`, audited,
//! and nothing is signed.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use common::stack::{Stack, identity_file};
use common::{signer, verify_bundle_peer, verify_dsse_peer};
use serde_json::{Value, json};
use stella_signer::config::ProfileConfig;
use stella_signer::schemas::SchemaKind;

const CYCLONEDX: &str = "https://cyclonedx.org/bom";
const SPDX: &str = "https://spdx.dev/Document";
const REPORT: &str = "https://stella-ops.org/attestations/scan-report/v1";

fn digest(c: char) -> String {
    format!("sha256:{}", c.to_string().repeat(64))
}

/// A stack with profile `sbom` (key `ec`: CycloneDX and SPDX only) and profile `report`
/// (key `ed`: scan reports only, the policy required, one policy digest accepted).
fn policy_stack(tag: &str) -> Stack {
    let stack = Stack::new(tag);
    stack.configure(|c| {
        // a large SBOM's job takes a while on a busy machine: no redelivery meanwhile
        c.nats.ack_wait = Duration::from_secs(120);
        let mut sbom = ProfileConfig::new(["ec"]);
        sbom.predicate_types = Some([CYCLONEDX, SPDX].map(String::from).into());
        let mut report = ProfileConfig::new(["ed"]);
        report.predicate_types = Some([REPORT.to_string()].into());
        report.require_policy = true;
        report.allowed_policy_digests = Some([digest('a')].into());
        c.profiles.insert("sbom".into(), sbom);
        c.profiles.insert("report".into(), report);
    });
    stack
}

/// The stack's public key `i` (0 `ec`, 1 `ed`) as a PEM file, with its keyid.
fn key_file(stack: &Stack, i: usize) -> (PathBuf, String) {
    let path = stack.dir.path().join(format!("key-{i}.pub"));
    std::fs::write(&path, stack.public_keys[i].to_pem()).unwrap();
    (path, stack.public_keys[i].keyid())
}

/// `stella-signer sign <flow> FILE --subject ... --out OUT --profile P <extra>`:
/// (exit code, stdout, stderr).
fn sign(
    stack: &Stack,
    flow: &str,
    file: &Path,
    profile: &str,
    id: &str,
    out: &Path,
    extra: &[&str],
) -> (i32, String, String) {
    let output = signer()
        .args(["sign", flow])
        .arg(file)
        .args([
            "--subject",
            &format!("registry.example/acme/app@{}", digest('5')),
        ])
        .arg("--out")
        .arg(out)
        .arg("--config")
        .arg(&stack.config)
        .args(["--tenant", "acme", "--profile", profile, "--request-id", id])
        .arg("--identity")
        .arg(identity_file(stack.dir.path()))
        .args(["--timeout", "300s"])
        .args(extra)
        .output()
        .unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Checks what `sign` wrote to `out` with one key: the envelope with securesystemslib and
/// `stella-signer verify`, the bundle with sigstore-js, securesystemslib and `stella-signer
/// verify`; returns the signed Statement.
fn verify_out(out: &Path, key: &(PathBuf, String)) -> Value {
    let envelope = out.join("envelope.json");
    let (code, text) = verify_dsse_peer(
        &envelope,
        &[&key.0],
        &["--intoto", "--expect-keyid", &key.1],
    );
    assert_eq!(
        code,
        0,
        "securesystemslib on {}: {text}",
        envelope.display()
    );
    let bundle = out.join("bundles/bundle-0.json");
    let (code, text) = verify_bundle_peer(
        &bundle,
        &[key.0.to_str().unwrap(), "--hint", &key.1, "--intoto"],
    );
    assert_eq!(code, 0, "sigstore-js on {}: {text}", bundle.display());
    let (code, text) = verify_dsse_peer(&bundle, &[&key.0], &["--intoto"]);
    assert_eq!(code, 0, "securesystemslib on {}: {text}", bundle.display());
    for file in [&envelope, &bundle] {
        let (code, text) = common::run({
            let mut cmd = signer();
            cmd.arg("verify").arg(file).arg("--key").arg(&key.0);
            cmd
        });
        assert_eq!(
            code,
            0,
            "stella-signer verify on {}: {text}",
            file.display()
        );
        assert!(text.starts_with("OK: "), "{text}");
    }
    assert!(
        !out.join("bundles/bundle-1.json").exists(),
        "one key, one bundle"
    );
    let env: Value = serde_json::from_slice(&std::fs::read(&envelope).unwrap()).unwrap();
    let payload = base64::engine::general_purpose::STANDARD
        .decode(env["payload"].as_str().unwrap())
        .unwrap();
    serde_json::from_slice(&payload).unwrap()
}

fn cyclonedx(components: usize) -> Value {
    let components: Vec<Value> = (0..components)
        .map(|i| {
            json!({
                "type": "library", "name": format!("pkg-{i}"), "version": format!("1.{}.0", i % 97),
                "purl": format!("pkg:npm/pkg-{i}@1.{}.0", i % 97),
                "hashes": [{"alg": "SHA-256", "content": format!("{i:064x}")}]
            })
        })
        .collect();
    json!({"bomFormat": "CycloneDX", "specVersion": "1.6", "version": 1, "components": components})
}

fn spdx() -> Value {
    json!({
        "spdxVersion": "SPDX-2.3", "dataLicense": "CC0-1.0", "SPDXID": "SPDXRef-DOCUMENT",
        "name": "acme-app", "documentNamespace": "https://example.org/spdx/acme-app-1",
        "creationInfo": {"created": "2026-11-29T04:29:31Z", "creators": ["Tool: stella-ops-scanner-2.14.0"]},
        "packages": [{"SPDXID": "SPDXRef-Package-openssl", "name": "openssl", "versionInfo": "3.0.15", "downloadLocation": "NOASSERTION"}]
    })
}

fn scan_report() -> Value {
    let statement: Value =
        serde_json::from_slice(&std::fs::read(common::example_statement()).unwrap()).unwrap();
    statement["predicate"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sboms_and_a_report_are_signed_end_to_end_and_verify_with_the_peers() {
    let mut stack = policy_stack("sgn");
    stack.spawn_worker();
    let (_c, js) = stack.connect().await;
    stack.wait_provisioned(&js).await;
    let dir = tempfile::tempdir().unwrap();
    let (ec, ed) = (key_file(&stack, 0), key_file(&stack, 1));

    // CycloneDX and SPDX: the predicate type is the document's, the predicate the document
    for (id, doc, predicate_type) in [
        ("sbom-cdx", cyclonedx(3), CYCLONEDX),
        ("sbom-spdx", spdx(), SPDX),
    ] {
        let file = common::write_json(dir.path(), &format!("{id}.json"), &doc);
        let out = dir.path().join(id);
        let (code, stdout, stderr) = sign(&stack, "sbom", &file, "sbom", id, &out, &[]);
        assert_eq!(
            code,
            0,
            "{id}: {stdout}{stderr}\nworker log:\n{}",
            stack.log(0)
        );
        assert!(
            stderr.contains(&format!("-> predicateType {predicate_type}")),
            "{stderr}"
        );
        assert!(
            stdout.starts_with(&format!("completed acme/{id}")),
            "{stdout}"
        );
        let statement = verify_out(&out, &ec);
        assert_eq!(statement["predicateType"], predicate_type);
        assert_eq!(statement["predicate"], doc);
        assert_eq!(statement["subject"][0]["name"], "registry.example/acme/app");
        assert_eq!(statement["subject"][0]["digest"]["sha256"], "5".repeat(64));
        let result: Value =
            serde_json::from_slice(&std::fs::read(out.join("result.json")).unwrap()).unwrap();
        assert!(
            SchemaKind::Completed
                .violations(&result)
                .unwrap()
                .is_empty()
        );
        assert!(result.get("policy").is_none(), "an SBOM states no policy");
        let events = stack.audit_for(&js, id, Duration::from_secs(60)).await;
        assert_eq!(events[0]["decision"], "signed");
        assert_eq!(events[0]["predicateType"], predicate_type);
    }

    // a report under the accepted policy: the policy is recorded in the result and the audit
    let file = common::write_json(dir.path(), "report.json", &scan_report());
    let out = dir.path().join("report");
    let policy = digest('a');
    let policy_flags = ["--policy-digest", policy.as_str(), "--view-set", "prod"];
    let (code, stdout, stderr) = sign(
        &stack,
        "report",
        &file,
        "report",
        "report-ok",
        &out,
        &policy_flags,
    );
    assert_eq!(code, 0, "{stdout}{stderr}\nworker log:\n{}", stack.log(0));
    let statement = verify_out(&out, &ed);
    assert_eq!(statement["predicateType"], REPORT);
    assert_eq!(statement["predicate"], scan_report());
    let recorded = json!({"digest": policy, "viewSet": "prod"});
    let result: Value =
        serde_json::from_slice(&std::fs::read(out.join("result.json")).unwrap()).unwrap();
    assert_eq!(result["policy"], recorded);
    assert!(
        SchemaKind::Completed
            .violations(&result)
            .unwrap()
            .is_empty()
    );
    let events = stack
        .audit_for(&js, "report-ok", Duration::from_secs(60))
        .await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["decision"], "signed");
    assert_eq!(events[0]["policy"], recorded);
    assert!(SchemaKind::Audit.violations(&events[0]).unwrap().is_empty());

    // an SBOM over the broker's limit goes through the blob bucket, and so does its result
    let large = cyclonedx(12_000);
    let file = common::write_json(dir.path(), "large.json", &large);
    assert!(
        std::fs::metadata(&file).unwrap().len() > 1 << 20,
        "over max_payload"
    );
    let out = dir.path().join("large");
    let (code, stdout, stderr) = sign(&stack, "sbom", &file, "sbom", "sbom-large", &out, &[]);
    assert_eq!(code, 0, "{stdout}{stderr}\nworker log:\n{}", stack.log(0));
    assert!(stderr.contains("uploaded the statement"), "{stderr}");
    assert!(stderr.contains("fetched by reference"), "{stderr}");
    assert!(stdout.contains("envelopeRef="), "{stdout}");
    let statement = verify_out(&out, &ec);
    assert_eq!(statement["predicate"], large);
    assert_eq!(stack.audit_verify().0, Some(0), "the audit chain is intact");
    stack.cleanup(&js).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_a_profile_does_not_sign_is_refused_audited_and_left_unsigned() {
    let mut stack = policy_stack("sgnno");
    stack.spawn_worker();
    let (_c, js) = stack.connect().await;
    stack.wait_provisioned(&js).await;
    let dir = tempfile::tempdir().unwrap();
    let report = common::write_json(dir.path(), "report.json", &scan_report());
    let (good, other) = (digest('a'), digest('b'));
    let cases: [(&str, &str, Vec<&str>, &str); 3] = [
        (
            "refused-type",
            "sbom",
            vec!["--policy-digest", &good, "--view-set", "prod"],
            "does not sign predicateType \"https://stella-ops.org/attestations/scan-report/v1\"",
        ),
        (
            "refused-nopolicy",
            "report",
            vec![],
            "requires options.policyDigest and options.viewSet",
        ),
        (
            "refused-digest",
            "report",
            vec!["--policy-digest", &other, "--view-set", "prod"],
            "does not accept policy digest",
        ),
    ];
    for (id, profile, extra, says) in cases {
        let out = dir.path().join(id);
        let (code, stdout, stderr) = sign(&stack, "report", &report, profile, id, &out, &extra);
        assert_eq!(code, 1, "{id}: refused is exit 1: {stdout}{stderr}");
        assert!(
            stdout.starts_with(&format!("failed acme/{id} invalid_request: ")),
            "{stdout}"
        );
        assert!(stdout.contains(says), "{id}: {stdout}");
        assert!(!out.join("envelope.json").exists(), "{id}: nothing written");
        let events = stack.audit_for(&js, id, Duration::from_secs(60)).await;
        assert_eq!(events.len(), 1, "{id}: {events:?}");
        assert_eq!(events[0]["decision"], "failed");
        assert_eq!(events[0]["errorCode"], "invalid_request");
        assert_eq!(events[0]["predicateType"], REPORT);
        assert!(events[0].get("keys").is_none(), "{id}: nothing signed");
        assert_eq!(
            events[0]["quota"]["outcome"], "not_checked",
            "{id}: nothing charged"
        );
        assert!(SchemaKind::Audit.violations(&events[0]).unwrap().is_empty());
    }
    // the refused digest is recorded as the request stated it
    let events = stack
        .audit_for(&js, "refused-digest", Duration::from_secs(60))
        .await;
    assert_eq!(
        events[0]["policy"],
        json!({"digest": other, "viewSet": "prod"})
    );
    // one result each, all refusals
    for id in ["refused-type", "refused-nopolicy", "refused-digest"] {
        let results = stack.results_for(&js, id, Duration::from_secs(60)).await;
        assert_eq!(results.len(), 1, "{id}");
        assert!(!results[0].completed(), "{id}");
        assert_eq!(results[0].code(), "invalid_request");
    }
    stack.cleanup(&js).await;
}
