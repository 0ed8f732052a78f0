//! The `stella-signer-tools` command line. Exit codes as the service's: 0 ok, 1 invalid or
//! refused, 2 unusable input or environment.

mod dev;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::ToolError;
use crate::bench;

#[derive(Debug, Parser)]
#[command(
    name = "stella-signer-tools",
    version,
    about = "Benchmarks and the development setup of stella-signer (not part of the service)"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Benchmarks (figures beside raw ceilings measured in the same run).
    #[command(subcommand)]
    Bench(BenchCommand),
    /// The development setup: keys, a dev Authority, licensing and release key, and
    /// credentials for them.
    #[command(subcommand)]
    Dev(dev::DevCommand),
}

#[derive(Debug, Subcommand)]
enum BenchCommand {
    /// Jobs/s and latency through a real worker process beside the raw signature and the
    /// no-op JetStream round trip, measured in the same run.
    Pipeline {
        /// Jobs in the backlog phase.
        #[arg(long, default_value_t = 100_000)]
        jobs: usize,
        /// Offered rate of the open-loop phase (jobs/s).
        #[arg(long, default_value_t = 5_000)]
        rate: u64,
        /// Length of the open-loop phase.
        #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
        duration: std::time::Duration,
        #[arg(long, default_value_t = 512)]
        max_inflight: usize,
        #[arg(long, default_value = "nats://127.0.0.1:4222")]
        nats: String,
        #[arg(long, default_value = "redis://127.0.0.1:6379")]
        redis: String,
        /// Runs to make, in order (default: bearer and dpop).
        #[arg(long, value_delimiter = ',', default_value = "bearer,dpop")]
        variants: Vec<bench::pipeline::Variant>,
        /// The `stella-signer` executable to run as the worker (default: the one beside
        /// this executable, as cargo builds them).
        #[arg(long, env = "SIGNER_BIN")]
        signer: Option<PathBuf>,
    },
    /// Signatures/s per key backend through KeySigner actors beside the raw backend call
    /// (file ECDSA and Ed25519, PKCS#11 on a SoftHSM token made for the run, keyless through
    /// the offline Sigstore peer of the conformance tools).
    Keys {
        /// Signatures per round (the TSA row makes 1/40 of them: one HTTP call each).
        #[arg(long, default_value_t = 20_000)]
        signatures: usize,
    },
    /// sign-local throughput per algorithm beside the raw signature operation.
    SignLocal {
        /// Signatures per round.
        #[arg(long, default_value_t = 20_000)]
        iterations: usize,
        /// Size of the statement in its canonical form.
        #[arg(long, default_value_t = 1024)]
        statement_bytes: usize,
    },
}

/// The `stella-signer` executable beside this one (`target/<profile>/`).
fn sibling_signer() -> Result<PathBuf, ToolError> {
    let exe = std::env::current_exe()
        .map_err(|e| ToolError::Unusable(format!("this executable's path: {e}")))?;
    let path = exe.with_file_name("stella-signer");
    if path.is_file() {
        Ok(path)
    } else {
        Err(ToolError::Unusable(format!(
            "{} missing: build it (`cargo build --release`) or name the worker with --signer",
            path.display()
        )))
    }
}

fn report(name: &str, report: serde_json::Value) -> Result<(), ToolError> {
    let path = bench::write_report(name, report)
        .map_err(|e| ToolError::Unusable(format!("writing the report: {e}")))?;
    println!("report: {}", path.display());
    Ok(())
}

impl Cli {
    pub fn run(self) -> Result<(), ToolError> {
        match self.command {
            Command::Dev(cmd) => cmd.run(),
            Command::Bench(BenchCommand::Pipeline {
                jobs,
                rate,
                duration,
                max_inflight,
                nats,
                redis,
                variants,
                signer,
            }) => {
                let worker = match signer {
                    Some(path) => path,
                    None => sibling_signer()?,
                };
                let rt = crate::runtime()?;
                let mut reports = Vec::new();
                for variant in variants {
                    let dir =
                        tempfile::tempdir().map_err(|e| ToolError::Unusable(e.to_string()))?;
                    let bench = bench::pipeline::PipelineBench {
                        worker: worker.clone(),
                        nats: nats.clone(),
                        redis: redis.clone(),
                        jobs,
                        rate,
                        duration,
                        max_inflight,
                        ..bench::pipeline::gate_setup(variant, dir.path())?
                    };
                    reports.push(rt.block_on(bench::pipeline::run(&bench))?);
                }
                report("pipeline", serde_json::json!({"runs": reports}))
            }
            Command::Bench(BenchCommand::Keys { signatures }) => {
                report("keys", bench::keys::run(signatures)?)
            }
            Command::Bench(BenchCommand::SignLocal {
                iterations,
                statement_bytes,
            }) => report(
                "sign-local",
                bench::sign_local::run(iterations, statement_bytes)?,
            ),
        }
    }
}
