//! Helpers shared by the integration tests: the binary under test and the independent
//! conformance peers of `../shared/conformance` (installed by `scripts/bootstrap.sh`).
#![allow(dead_code)]

pub mod operators;
pub mod registry;
pub mod servers;
pub mod sigstore;
pub mod softhsm;
pub mod stack;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Mutex;

/// The `stella-signer` binary cargo built for these tests.
pub fn signer() -> Command {
    Command::new(env!("CARGO_BIN_EXE_stella-signer"))
}

/// Runs a command and returns (exit code, stdout+stderr).
pub fn run(mut cmd: Command) -> (i32, String) {
    let Output {
        status,
        stdout,
        stderr,
    } = cmd.output().expect("command starts");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&stdout),
        String::from_utf8_lossy(&stderr)
    );
    (status.code().unwrap_or(-1), text)
}

/// Where the conformance tools are installed (`SIGNER_CONFORMANCE_DIR`, default
/// `target/conformance`). Missing tools fail the test: a skipped peer proves nothing.
pub fn conformance_dir() -> PathBuf {
    let dir = std::env::var_os("SIGNER_CONFORMANCE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/conformance"));
    assert!(
        dir.join("venv/bin/python").exists()
            && dir.join("node/node_modules/@sigstore/verify").exists(),
        "conformance tools missing in {}: run scripts/bootstrap.sh (or ../shared/conformance/setup.sh target/conformance)",
        dir.display()
    );
    dir
}

/// securesystemslib's verdict on an envelope (or the envelope inside a bundle).
pub fn verify_dsse_peer(envelope: &Path, pubkeys: &[&Path], extra: &[&str]) -> (i32, String) {
    let dir = conformance_dir();
    let mut cmd = Command::new(dir.join("venv/bin/python"));
    cmd.arg(dir.join("verify_dsse.py"))
        .arg(envelope)
        .args(pubkeys)
        .args(extra);
    run(cmd)
}

/// sigstore-js's verdict on a bundle.
pub fn verify_bundle_peer(bundle: &Path, args: &[&str]) -> (i32, String) {
    let dir = conformance_dir();
    let mut cmd = Command::new("node");
    cmd.arg(dir.join("node/verify_bundle.mjs"))
        .arg(bundle)
        .args(args);
    run(cmd)
}

/// Generates a key pair with the CLI; returns (private key, public key, keyid).
pub fn generate_key(dir: &Path, algorithm: &str, name: &str) -> (PathBuf, PathBuf, String) {
    let mut cmd = signer();
    cmd.args([
        "keys",
        "generate",
        "--algorithm",
        algorithm,
        "--name",
        name,
        "--out",
    ])
    .arg(dir);
    let out = cmd.output().expect("keys generate runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let keyid = String::from_utf8(out.stdout).unwrap().trim().to_string();
    (
        dir.join(format!("{name}.key")),
        dir.join(format!("{name}.pub")),
        keyid,
    )
}

/// Path of the example statement.
pub fn example_statement() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/examples/statement.json")
}

/// Converts an ASN.1 DER ECDSA signature to raw r||s (32 bytes each).
pub fn der_to_raw(der: &[u8]) -> Vec<u8> {
    assert_eq!(der[0], 0x30);
    let mut i = 2;
    let mut out = Vec::new();
    for _ in 0..2 {
        assert_eq!(der[i], 0x02);
        let len = der[i + 1] as usize;
        let int = &der[i + 2..i + 2 + len];
        let int = &int[int.len().saturating_sub(32)..];
        out.extend(std::iter::repeat_n(0u8, 32 - int.len()));
        out.extend_from_slice(int);
        i += 2 + len;
    }
    out
}

/// Writes `value` as pretty JSON to `dir/name` (for the peers, which read files).
pub fn write_json(dir: &Path, name: &str, value: &serde_json::Value) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, serde_json::to_vec_pretty(value).unwrap()).unwrap();
    path
}

/// Pinned versions of the outside Python clients' packages (`tests/security/freshness_publisher.py`,
/// `tests/preflight_client.py`).
const PY_PACKAGES: [&str; 3] = ["nats-py==2.16.0", "PyJWT==2.15.1", "cryptography==50.0.2"];

/// The python of the outside clients' venv (`target/tmp/freshness-venv`, nats-py, PyJWT,
/// cryptography), made on first use, once per test process (tests may ask at once).
pub fn outside_python() -> PathBuf {
    static VENV: Mutex<Option<PathBuf>> = Mutex::new(None);
    let mut venv = VENV.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(p) = venv.as_ref() {
        return p.clone();
    }
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("freshness-venv");
    let python = dir.join("bin/python");
    let ready = |p: &Path| {
        Command::new(p)
            .args(["-c", "import nats, jwt, cryptography"])
            .status()
            .is_ok_and(|s| s.success())
    };
    if !ready(&python) {
        let made = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&dir)
            .status()
            .expect("python3 (for the outside clients)");
        assert!(made.success(), "python3 -m venv {}", dir.display());
        let installed = Command::new(&python)
            .args(["-m", "pip", "install", "-q", "--disable-pip-version-check"])
            .args(PY_PACKAGES)
            .status()
            .unwrap();
        assert!(installed.success(), "pip install {PY_PACKAGES:?}");
        assert!(ready(&python), "the venv cannot import its packages");
    }
    *venv = Some(python.clone());
    python
}
