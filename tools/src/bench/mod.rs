//! `stella-signer-tools bench`: throughput figures beside the raw ceilings measured in the
//! same run. Benchmarks, not tests: the ratios are what to read on a noisy machine.

pub mod keys;
pub mod pipeline;
pub mod sign_local;

use std::path::{Path, PathBuf};
use std::time::Instant;

/// Operations per second of `op`, best of `rounds` runs of `iterations` each
/// (best-of filters out the other core's noise, which only ever slows a run down).
pub fn ops_per_sec(rounds: usize, iterations: usize, mut op: impl FnMut()) -> f64 {
    (0..rounds)
        .map(|_| {
            let start = Instant::now();
            for _ in 0..iterations {
                op();
            }
            iterations as f64 / start.elapsed().as_secs_f64()
        })
        .fold(0.0, f64::max)
}

/// Writes a report under `target/bench/` (or `$SIGNER_BENCH_OUT`), with the core count.
pub fn write_report(name: &str, mut report: serde_json::Value) -> std::io::Result<PathBuf> {
    let dir = std::env::var_os("SIGNER_BENCH_OUT")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new("target/bench").to_path_buf());
    let dir = dir.as_path();
    std::fs::create_dir_all(dir)?;
    report["cores"] = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .into();
    report["unixTime"] = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
        .into();
    let path = dir.join(format!("{name}.json"));
    std::fs::write(
        &path,
        serde_json::to_vec_pretty(&report).map_err(std::io::Error::other)?,
    )?;
    Ok(path)
}
