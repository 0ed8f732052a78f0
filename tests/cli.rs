//! The offline CLI as a user meets it: exit codes, key files, golden bytes.

mod common;

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;

use common::*;

fn golden(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name)
}

#[test]
fn ed25519_envelopes_are_byte_for_byte_deterministic() {
    let dir = tempfile::tempdir().unwrap();
    // git does not keep mode 0600, so use a private copy of the test key.
    let key = dir.path().join("golden.key");
    std::fs::copy(golden("golden-test-ed25519.key"), &key).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = dir.path().join("env.json");
    let bundles = dir.path().join("bundles");
    let mut cmd = signer();
    cmd.args(["sign-local", "--key"])
        .arg(&key)
        .arg("--statement")
        .arg(golden("statement.json"));
    cmd.arg("--out")
        .arg(&out)
        .arg("--bundles-out")
        .arg(&bundles);
    let (code, text) = run(cmd);
    assert_eq!(code, 0, "{text}");
    assert_eq!(
        std::fs::read(&out).unwrap(),
        std::fs::read(golden("ed25519.envelope.json")).unwrap()
    );
    let bundle = std::fs::read_dir(&bundles)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    assert_eq!(
        std::fs::read(bundle).unwrap(),
        std::fs::read(golden("ed25519.bundle.json")).unwrap()
    );
}

#[test]
fn keys_generate_writes_private_key_0600_and_prints_keyid() {
    let dir = tempfile::tempdir().unwrap();
    let (key, public, keyid) = generate_key(dir.path(), "ecdsa-p256", "release");
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert!(
        std::fs::read_to_string(&key)
            .unwrap()
            .starts_with("-----BEGIN PRIVATE KEY-----")
    );
    assert!(
        std::fs::read_to_string(&public)
            .unwrap()
            .starts_with("-----BEGIN PUBLIC KEY-----")
    );
    assert_eq!(keyid.len(), 64);
    // a second generate must not overwrite the key
    let mut cmd = signer();
    cmd.args([
        "keys",
        "generate",
        "--algorithm",
        "ed25519",
        "--name",
        "release",
        "--out",
    ])
    .arg(dir.path());
    assert_eq!(run(cmd).0, 2);
}

#[test]
fn exit_codes_separate_invalid_from_unusable() {
    let dir = tempfile::tempdir().unwrap();
    let (key, public, _) = generate_key(dir.path(), "ed25519", "k");
    let env = dir.path().join("env.json");

    // world-readable private key: refused, unusable input
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut cmd = signer();
    cmd.args(["sign-local", "--key"])
        .arg(&key)
        .arg("--statement")
        .arg(example_statement())
        .arg("--out")
        .arg(&env);
    let (code, text) = run(cmd);
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("chmod 600"), "{text}");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();

    // a statement that breaks the in-toto rules: invalid
    let bad = dir.path().join("bad.json");
    std::fs::write(
        &bad,
        r#"{"_type":"https://in-toto.io/Statement/v1","subject":[],"predicateType":"p"}"#,
    )
    .unwrap();
    let mut cmd = signer();
    cmd.args(["sign-local", "--key"])
        .arg(&key)
        .arg("--statement")
        .arg(&bad)
        .arg("--out")
        .arg(&env);
    assert_eq!(run(cmd).0, 1);

    // a threshold no key set can meet is a usage error, not a verdict
    let mut cmd = signer();
    cmd.args(["sign-local", "--key"])
        .arg(&key)
        .arg("--statement")
        .arg(example_statement())
        .arg("--out")
        .arg(&env);
    assert_eq!(run(cmd).0, 0);
    for t in ["0", "2"] {
        let mut cmd = signer();
        cmd.arg("verify")
            .arg(&env)
            .arg("--key")
            .arg(&public)
            .args(["--threshold", t]);
        assert_eq!(run(cmd).0, 2, "--threshold {t} with one key");
    }

    // missing file: unusable
    let mut cmd = signer();
    cmd.arg("verify")
        .arg(dir.path().join("nope.json"))
        .arg("--key")
        .arg(&public);
    assert_eq!(run(cmd).0, 2);
}

#[test]
fn sign_refuses_what_it_cannot_build_before_it_connects() {
    // nothing listens on port 9: the command must fail on its input before connecting
    let dir = tempfile::tempdir().unwrap();
    let subject = format!("registry.example/acme/app@sha256:{}", "5".repeat(64));
    let sign = |args: &[&str], file: &std::path::Path| {
        let mut cmd = signer();
        cmd.arg("sign")
            .args(args)
            .arg(file)
            .args(["--nats", "nats://127.0.0.1:9", "--tenant", "acme"])
            .args(["--identity", "/nonexistent/identity.json"])
            .args(["--out"])
            .arg(dir.path().join("out"));
        run(cmd)
    };
    // not an SBOM (a Statement, not CycloneDX or SPDX): unusable input
    let (code, text) = sign(&["sbom", "--subject", &subject], &example_statement());
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("not an SBOM this command knows"), "{text}");
    // a subject that is not NAME@ALG:HEX, half a policy: usage errors
    let report = dir.path().join("report.json");
    std::fs::write(&report, "{}").unwrap();
    let (code, text) = sign(&["report", "--subject", "app@sha256:abc"], &report);
    assert_eq!(code, 2, "{text}");
    let half = format!("sha256:{}", "a".repeat(64));
    let (code, text) = sign(
        &["report", "--subject", &subject, "--policy-digest", &half],
        &report,
    );
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("--view-set"), "{text}");
    let (code, text) = sign(
        &[
            "report",
            "--subject",
            &subject,
            "--policy-digest",
            "sha512:ab",
            "--view-set",
            "prod",
        ],
        &report,
    );
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("is not sha256:<64 hex>"), "{text}");
    assert!(!dir.path().join("out").exists(), "nothing written");
}

#[test]
fn schema_check_accepts_good_and_rejects_bad_examples() {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas/examples");
    for (kind, good, bad) in [
        (
            "request",
            "good-export.json",
            "bad-request-id-with-slash.json",
        ),
        (
            "completed",
            "good-keyful-two-keys.json",
            "bad-bundle-two-signatures.json",
        ),
        (
            "failed",
            "good-quota-exceeded.json",
            "bad-unknown-error-code.json",
        ),
        ("audit", "good-1-signed.json", "bad-hash-uppercase.json"),
    ] {
        let mut cmd = signer();
        cmd.args(["schema", "check", "--kind", kind])
            .arg(examples.join(kind).join(good));
        let (code, text) = run(cmd);
        assert_eq!(code, 0, "{kind}/{good}: {text}");
        let mut cmd = signer();
        cmd.args(["schema", "check", "--kind", kind])
            .arg(examples.join(kind).join(bad));
        let (code, text) = run(cmd);
        assert_eq!(code, 1, "{kind}/{bad}: {text}");
        assert!(text.contains("FAIL: "), "{text}");
    }
}
