//! Keys other tools read, and keys users already have.
//!
//! Every key here is made or checked by something that is not ours: OpenSSL (`openssl
//! pkey`, `openssl ecparam`), Python `cryptography`, and a cosign-format key pair written by
//! tests/tools/make_cosign_key.py (PyNaCl + hashlib.scrypt); signatures are checked by the
//! conformance peers (securesystemslib, sigstore-js).

mod common;

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::stack::{Stack, request};
use common::*;
use signer_actors::keys::PublicKey;
use stella_signer::config::{FileKeyConfig, ProfileConfig};

/// The conformance venv's Python (it has `cryptography`; bootstrap adds PyNaCl).
fn python() -> PathBuf {
    conformance_dir().join("venv/bin/python")
}

/// Runs `cmd`, asserts it succeeded, returns its standard output.
fn ok(mut cmd: Command) -> String {
    let out = cmd.output().expect("command starts");
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn keyid_of_pem(text: &str) -> String {
    PublicKey::from_pem(text).unwrap().keyid()
}

fn keyid_of(path: &Path) -> String {
    keyid_of_pem(&std::fs::read_to_string(path).unwrap())
}

/// Makes a cosign-format key pair with the independent Python helper; returns its keyid.
fn make_cosign_key(dir: &Path, name: &str, password: &str, algorithm: &str, label: &str) -> String {
    let helper = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/tools/make_cosign_key.py");
    let mut probe = Command::new(python());
    probe.args(["-c", "import nacl"]);
    assert!(
        probe.status().unwrap().success(),
        "PyNaCl missing in the conformance venv: run scripts/bootstrap.sh"
    );
    let mut cmd = Command::new(python());
    cmd.arg(helper)
        .arg(dir)
        .args([name, password, "--algorithm", algorithm, "--label", label]);
    ok(cmd).trim().to_string()
}

/// `stella-signer keys import --cosign KEY --out DIR --name NAME [--public PUB]` with
/// `password` in COSIGN_PASSWORD (None: unset) and no terminal: (exit code, output).
fn import(
    key: &Path,
    dir: &Path,
    name: &str,
    password: Option<&str>,
    public: Option<&Path>,
) -> (i32, String) {
    let mut cmd = signer();
    cmd.args(["keys", "import", "--cosign"])
        .arg(key)
        .arg("--out")
        .arg(dir)
        .args(["--name", name])
        .stdin(Stdio::null())
        .env_remove("COSIGN_PASSWORD");
    if let Some(p) = password {
        cmd.env("COSIGN_PASSWORD", p);
    }
    if let Some(p) = public {
        cmd.arg("--public").arg(p);
    }
    run(cmd)
}

/// OpenSSL's SEC1 P-256 key (`openssl ecparam -genkey`), mode 0600, and its public key.
fn openssl_sec1_key(dir: &Path, name: &str, noout: bool) -> (PathBuf, PathBuf) {
    let key = dir.join(format!("{name}.key"));
    let public = dir.join(format!("{name}.pub"));
    let mut cmd = Command::new("openssl");
    cmd.args(["ecparam", "-genkey", "-name", "prime256v1"]);
    if noout {
        cmd.arg("-noout");
    }
    cmd.arg("-out").arg(&key);
    ok(cmd);
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let text = std::fs::read_to_string(&key).unwrap();
    assert!(text.contains("-----BEGIN EC PRIVATE KEY-----"), "{text}");
    assert_eq!(
        text.contains("-----BEGIN EC PARAMETERS-----"),
        !noout,
        "{text}"
    );
    let mut cmd = Command::new("openssl");
    cmd.args(["ec", "-pubout", "-in"])
        .arg(&key)
        .arg("-out")
        .arg(&public);
    ok(cmd);
    (key, public)
}

#[test]
fn keys_we_write_load_in_openssl_and_python_cryptography() {
    let dir = tempfile::tempdir().unwrap();
    for algorithm in ["ecdsa-p256", "ed25519"] {
        let (key, public, keyid) = generate_key(dir.path(), algorithm, algorithm);
        assert_eq!(keyid_of(&public), keyid);

        // OpenSSL 3 reads the private key and derives the same public key
        let mut cmd = Command::new("openssl");
        cmd.args(["pkey", "-pubout", "-in"]).arg(&key);
        assert_eq!(keyid_of_pem(&ok(cmd)), keyid, "{algorithm}: openssl pkey");

        // Python cryptography reads it, derives the same public key and signs with it
        let script = r#"
import sys
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
key = serialization.load_pem_private_key(open(sys.argv[1], "rb").read(), None)
pub = key.public_key()
if isinstance(key, ec.EllipticCurvePrivateKey):
    sig = key.sign(b"interop", ec.ECDSA(hashes.SHA256()))
    pub.verify(sig, b"interop", ec.ECDSA(hashes.SHA256()))
else:
    pub.verify(key.sign(b"interop"), b"interop")
sys.stdout.write(pub.public_bytes(serialization.Encoding.PEM,
                 serialization.PublicFormat.SubjectPublicKeyInfo).decode())
"#;
        let mut cmd = Command::new(python());
        cmd.args(["-c", script]).arg(&key);
        assert_eq!(keyid_of_pem(&ok(cmd)), keyid, "{algorithm}: cryptography");

        // export-public gives the same PEM as the .pub file
        let mut cmd = signer();
        cmd.args(["keys", "export-public"]).arg(&key);
        assert_eq!(ok(cmd), std::fs::read_to_string(&public).unwrap());
    }
}

#[test]
fn openssl_sec1_keys_sign_locally_and_verify_with_securesystemslib() {
    let dir = tempfile::tempdir().unwrap();
    for (name, noout) in [("bare", true), ("with-params", false)] {
        let (key, public) = openssl_sec1_key(dir.path(), name, noout);
        let mut cmd = signer();
        cmd.args(["keys", "export-public"]).arg(&key);
        assert_eq!(keyid_of_pem(&ok(cmd)), keyid_of(&public), "{name}");

        let env = dir.path().join(format!("{name}.envelope.json"));
        let mut cmd = signer();
        cmd.args(["sign-local", "--key"])
            .arg(&key)
            .arg("--statement")
            .arg(example_statement())
            .arg("--out")
            .arg(&env);
        ok(cmd);
        let (code, text) = verify_dsse_peer(&env, &[&public], &["--intoto"]);
        assert_eq!(code, 0, "{name}: {text}");
        // and not with some other key: the peer's verdict is not a formality
        let (_, other, _) = generate_key(dir.path(), "ecdsa-p256", &format!("other-{name}"));
        let (code, text) = verify_dsse_peer(&env, &[&other], &["--intoto"]);
        assert_ne!(code, 0, "{name}: {text}");
    }
}

#[test]
fn cosign_import_checks_the_password_and_the_public_key() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("cosign");
    let out = dir.path().join("imported");
    for (name, algorithm, label) in [
        ("ec", "ecdsa-p256", "sigstore"),
        ("ed", "ed25519", "cosign"),
    ] {
        let keyid = make_cosign_key(&src, name, "s3cret pass", algorithm, label);
        let key = src.join(format!("{name}.key"));
        let public = src.join(format!("{name}.pub"));
        assert_eq!(keyid_of(&public), keyid);

        // a wrong password is a clear error (exit 1), and nothing is written
        let (code, text) = import(&key, &out, name, Some("s3cret pas"), None);
        assert_eq!(code, 1, "{text}");
        assert!(text.contains("wrong password"), "{text}");
        assert!(!out.join(format!("{name}.key")).exists());

        // no password and no terminal to ask on: it says how to give one, and does not hang
        let (code, text) = import(&key, &out, name, None, None);
        assert_eq!(code, 2, "{text}");
        assert!(text.contains("COSIGN_PASSWORD"), "{text}");

        // a public key that is not the pair's is refused
        let (_, stranger, _) = generate_key(dir.path(), algorithm, &format!("stranger-{name}"));
        let (code, text) = import(&key, &out, name, Some("s3cret pass"), Some(&stranger));
        assert_eq!(code, 1, "{text}");
        assert!(text.contains("is not the public key"), "{text}");

        // the right password: the keyid is the cosign.pub's, the key is 0600 and OpenSSL
        // reads it
        let (code, text) = import(&key, &out, name, Some("s3cret pass"), Some(&public));
        assert_eq!(code, 0, "{text}");
        assert!(text.lines().any(|l| l == keyid), "{text}");
        let imported = out.join(format!("{name}.key"));
        assert_eq!(
            std::fs::metadata(&imported).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(keyid_of(&out.join(format!("{name}.pub"))), keyid);
        let mut cmd = Command::new("openssl");
        cmd.args(["pkey", "-pubout", "-in"]).arg(&imported);
        assert_eq!(keyid_of_pem(&ok(cmd)), keyid);

        // export-public of the cosign key itself: the PEM `cosign verify --key` takes
        let mut cmd = signer();
        cmd.args(["keys", "export-public"])
            .arg(&key)
            .env("COSIGN_PASSWORD", "s3cret pass")
            .stdin(Stdio::null());
        assert_eq!(keyid_of_pem(&ok(cmd)), keyid);

        // a second import never overwrites the first
        let (code, text) = import(&key, &out, name, Some("s3cret pass"), None);
        assert_eq!(code, 2, "{text}");
        assert!(text.contains("already exists"), "{text}");

        // a cosign key configured directly says how to import it
        let mut cmd = signer();
        cmd.args(["sign-local", "--key"])
            .arg(&key)
            .arg("--statement")
            .arg(example_statement())
            .arg("--out")
            .arg(dir.path().join("never.json"));
        let (code, text) = run(cmd);
        assert_eq!(code, 2, "{text}");
        assert!(text.contains("keys import --cosign"), "{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openssl_and_cosign_keys_sign_through_the_pipeline_and_verify_with_the_peers() {
    let keys = tempfile::tempdir().unwrap();
    let (sec1_key, sec1_pub) = openssl_sec1_key(keys.path(), "sec1", true);
    let cosign_dir = keys.path().join("cosign");
    let cosign_keyid = make_cosign_key(
        &cosign_dir,
        "cosign",
        "pipeline pw",
        "ecdsa-p256",
        "sigstore",
    );
    let cosign_pub = cosign_dir.join("cosign.pub");
    let (code, text) = import(
        &cosign_dir.join("cosign.key"),
        keys.path(),
        "imported",
        Some("pipeline pw"),
        Some(&cosign_pub),
    );
    assert_eq!(code, 0, "{text}");

    let mut stack = Stack::new("ki");
    stack.configure(|c| {
        c.keys.push(FileKeyConfig::new("sec1", &sec1_key).into());
        c.keys
            .push(FileKeyConfig::new("cosign", keys.path().join("imported.key")).into());
        c.profiles
            .insert("interop".into(), ProfileConfig::new(["sec1", "cosign"]));
    });
    stack.spawn_worker();
    let (_c, js) = stack.connect().await;
    stack.wait_provisioned(&js).await;
    stack
        .publish(
            &js,
            "sign.requests",
            &[("Nats-Msg-Id", "interop-1")],
            serde_json::to_vec(&request("interop-1", "acme", Some("interop"))).unwrap(),
        )
        .await;
    let results = stack
        .results(&js, 1, Duration::from_secs(60), Duration::ZERO)
        .await;
    assert_eq!(results.len(), 1, "log:\n{}", stack.log(0));
    let r = &results[0];
    assert!(r.completed(), "{:#}", r.body);

    let pubs = [
        (keyid_of(&sec1_pub), &sec1_pub),
        (cosign_keyid, &cosign_pub),
    ];
    let signers: Vec<String> = r.body["signers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["keyid"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(signers, vec![pubs[0].0.clone(), pubs[1].0.clone()]);

    let work = stack.dir.path().to_path_buf();
    let env = write_json(&work, "interop.envelope.json", &r.body["envelope"]);
    let (code, text) = verify_dsse_peer(&env, &[&sec1_pub, &cosign_pub], &["--intoto"]);
    assert_eq!(code, 0, "securesystemslib: {text}");
    // the stack's own ECDSA key signed nothing here: the peer must say so
    let (code, text) = verify_dsse_peer(&env, &[&sec1_pub, &work.join("ec.pub")], &["--intoto"]);
    assert_ne!(
        code, 0,
        "securesystemslib accepted a key that did not sign: {text}"
    );

    for (i, (keyid, public)) in pubs.iter().enumerate() {
        let bundle = write_json(
            &work,
            &format!("interop.bundle{i}.json"),
            &r.body["bundles"][i],
        );
        let public = public.to_str().unwrap();
        let (code, text) = verify_bundle_peer(&bundle, &[public, "--hint", keyid, "--intoto"]);
        assert_eq!(code, 0, "sigstore-js, bundle {i}: {text}");
    }
    stack.cleanup(&js).await;
}
