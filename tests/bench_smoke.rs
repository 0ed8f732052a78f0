//! The pipeline benchmark still runs end to end (tiny N): gates on, a real worker (this
//! package's `stella-signer` binary), both ceilings. A smoke check, not a performance
//! assertion. It drives the benchmark through the tools crate's library, which is what
//! `stella-signer-tools bench pipeline` runs; the key-backend benchmark's smoke test runs the
//! tools binary itself (tools/tests/bench_keys.rs).

use stella_signer_tools::bench::pipeline::{self, PipelineBench, Variant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipeline_bench_runs_with_every_gate_on() {
    for variant in [Variant::Bearer, Variant::Dpop] {
        let dir = tempfile::tempdir().unwrap();
        let bench = PipelineBench {
            worker: env!("CARGO_BIN_EXE_stella-signer").into(),
            nats: "nats://127.0.0.1:4222".into(),
            redis: "redis://127.0.0.1:6379".into(),
            jobs: 300,
            rate: 200,
            duration: std::time::Duration::from_secs(1),
            max_inflight: 512,
            ..pipeline::gate_setup(variant, dir.path()).unwrap()
        };
        let report = pipeline::run(&bench)
            .await
            .unwrap_or_else(|e| panic!("{variant:?}: {e}"));
        for figure in [
            "rawSignPerSec",
            "noopRoundTripPerSec",
            "pipelineJobsPerSec",
            "ratioToNoop",
            "cpuSecondsPer1000Jobs",
        ] {
            let value = report[figure].as_f64();
            assert!(
                value.is_some_and(|v| v > 0.0),
                "{variant:?}: {figure} in {report:#}"
            );
        }
        assert!(report["peakRssBytes"].as_u64() > Some(0), "{report:#}");
        // every job of the open-loop phase got its result (200 jobs/s for 1 s)
        assert_eq!(report["openLoop"]["results"], 200, "{report:#}");
        assert_eq!(report["jobs"], 300, "{report:#}");
    }
}
