//! The key-backend benchmark measures every backend (SoftHSM and the Sigstore peer are set
//! up by the run), each through an actor beside the raw call, and `bench sign-local` runs.
//! No figure is asserted.

use std::path::Path;
use std::process::Command;

fn tools() -> Command {
    Command::new(env!("CARGO_BIN_EXE_stella-signer-tools"))
}

fn output(mut cmd: Command) -> String {
    let out = cmd.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    text
}

#[test]
fn keys_bench_measures_every_backend() {
    let reports = tempfile::tempdir().unwrap();
    let mut cmd = tools();
    cmd.env("SIGNER_BENCH_OUT", reports.path())
        .env(
            "SIGNER_CONFORMANCE_DIR",
            // the workspace's target/conformance (scripts/bootstrap.sh)
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/conformance"),
        )
        .args(["bench", "keys", "--signatures", "200"]);
    let text = output(cmd);
    assert!(
        !text.contains("skipped"),
        "every backend must run here:\n{text}"
    );
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(reports.path().join("keys.json")).unwrap()).unwrap();
    let backends = report["backends"].as_array().unwrap();
    assert_eq!(backends.len(), 6, "{report:#}");
    for b in backends {
        assert!(b["rawPerSec"].as_f64().unwrap() > 0.0, "{b}");
        assert!(b["actorPerSec"].as_f64().unwrap() > 0.0, "{b}");
    }
}

#[test]
fn sign_local_bench_reports_both_algorithms() {
    let reports = tempfile::tempdir().unwrap();
    let mut cmd = tools();
    cmd.env("SIGNER_BENCH_OUT", reports.path()).args([
        "bench",
        "sign-local",
        "--iterations",
        "200",
    ]);
    output(cmd);
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(reports.path().join("sign-local.json")).unwrap())
            .unwrap();
    let algorithms: Vec<&str> = report["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["algorithm"].as_str().unwrap())
        .collect();
    assert_eq!(algorithms, ["ecdsa-p256-sha256", "ed25519"], "{report:#}");
    for r in report["results"].as_array().unwrap() {
        assert!(r["rawSignPerSec"].as_f64().unwrap() > 0.0, "{r}");
        assert!(r["constructedPerSec"].as_f64().unwrap() > 0.0, "{r}");
    }
}
