//! The pipeline benchmark still runs end to end (tiny N): gates on, a real worker, both
//! ceilings. A smoke check, not a performance assertion.

#[test]
fn pipeline_bench_runs_with_every_gate_on() {
    let reports = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_stella-signer"))
        .env("SIGNER_BENCH_OUT", reports.path())
        .args([
            "bench",
            "pipeline",
            "--jobs",
            "300",
            "--rate",
            "200",
            "--duration",
            "1s",
            "--variants",
            "bearer,dpop",
        ])
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    for needle in [
        "(ceiling a)",
        "(ceiling b)",
        "pipeline jobs/s (backlog drain)",
        "pipeline / ceiling b",
        "peak RSS",
        "open loop 200 jobs/s",
    ] {
        assert!(
            text.matches(needle).count() == 2,
            "{needle:?} once per variant in:\n{text}"
        );
    }
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(reports.path().join("pipeline.json")).unwrap())
            .unwrap();
    assert_eq!(report["runs"].as_array().unwrap().len(), 2);
}

/// The key-backend benchmark measures every backend (SoftHSM and the Sigstore peer are set
/// up by the run), each through an actor beside the raw call. No figure is asserted.
#[test]
fn keys_bench_measures_every_backend() {
    let reports = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_stella-signer"))
        .env("SIGNER_BENCH_OUT", reports.path())
        .env(
            "SIGNER_CONFORMANCE_DIR",
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/conformance"),
        )
        .args(["bench", "keys", "--signatures", "200"])
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
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
