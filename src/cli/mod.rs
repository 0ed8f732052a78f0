//! The command line. Exit codes: 0 ok, 1 invalid or denied, 2 unusable input.

pub mod artefacts;
mod audit;
mod dev;
mod keys;
pub mod nats_client;
mod schema;
mod serve;
pub mod sign_local;
pub mod submit;
mod verify;
mod watch;

use clap::{Parser, Subcommand};

/// Why a command failed, and so which exit code it ends with.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The input was read but is invalid or was denied (exit 1).
    #[error("{0}")]
    Invalid(String),
    /// The input could not be used at all: missing file, not JSON, bad key (exit 2).
    #[error("{0}")]
    Unusable(String),
}

impl CliError {
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Invalid(_) => 1,
            CliError::Unusable(_) => 2,
        }
    }
}

#[derive(Debug, Parser)]
#[command(
    name = "stella-signer",
    version,
    about = "Signs in-toto statements as DSSE envelopes and Sigstore bundles"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Manage signing keys.
    #[command(subcommand)]
    Keys(keys::KeysCommand),
    /// Sign a statement offline with local key files.
    SignLocal(sign_local::SignLocalArgs),
    /// Verify a DSSE envelope or a Sigstore bundle against public keys.
    Verify(verify::VerifyArgs),
    /// Validate messages against the contract's JSON Schemas.
    #[command(subcommand)]
    Schema(schema::SchemaCommand),
    /// Run the signing worker.
    Serve(serve::ServeArgs),
    /// Publish a signing job (as a scanner or pipeline does).
    Submit(submit::SubmitArgs),
    /// Follow results as Attestor or Export Center would.
    Watch(watch::WatchArgs),
    /// Credentials for the `serve --dev` setup.
    #[command(subcommand)]
    Dev(dev::DevCommand),
    /// The audit stream.
    #[command(subcommand)]
    Audit(audit::AuditCommand),
    /// Benchmarks (figures beside raw ceilings measured in the same run).
    #[command(subcommand)]
    Bench(BenchCommand),
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
        variants: Vec<crate::bench::pipeline::Variant>,
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

impl Cli {
    pub fn run(self) -> Result<(), CliError> {
        match self.command {
            Command::Keys(cmd) => cmd.run(),
            Command::SignLocal(args) => args.run(),
            Command::Verify(args) => args.run(),
            Command::Schema(cmd) => cmd.run(),
            Command::Serve(args) => args.run(),
            Command::Submit(args) => args.run(),
            Command::Watch(args) => args.run(),
            Command::Audit(cmd) => cmd.run(),
            Command::Dev(cmd) => cmd.run(),
            Command::Bench(BenchCommand::Pipeline {
                jobs,
                rate,
                duration,
                max_inflight,
                nats,
                redis,
                variants,
            }) => {
                let rt = nats_client::runtime()?;
                let mut reports = Vec::new();
                for variant in variants {
                    let dir = tempfile::tempdir().map_err(|e| CliError::Unusable(e.to_string()))?;
                    let bench = crate::bench::pipeline::PipelineBench {
                        nats: nats.clone(),
                        redis: redis.clone(),
                        jobs,
                        rate,
                        duration,
                        max_inflight,
                        ..crate::bench::pipeline::gate_setup(variant, dir.path())?
                    };
                    reports.push(rt.block_on(crate::bench::pipeline::run(&bench))?);
                }
                let path =
                    crate::bench::write_report("pipeline", serde_json::json!({"runs": reports}))
                        .map_err(|e| CliError::Unusable(format!("writing the report: {e}")))?;
                println!("report: {}", path.display());
                Ok(())
            }
            Command::Bench(BenchCommand::Keys { signatures }) => {
                // before the runtime's threads: it sets SOFTHSM2_CONF for this process
                let softhsm = crate::bench::keys::prepare_softhsm();
                let rt = nats_client::runtime()?;
                let report = rt.block_on(crate::bench::keys::run(signatures, softhsm))?;
                let path = crate::bench::write_report("keys", report)
                    .map_err(|e| CliError::Unusable(format!("writing the report: {e}")))?;
                println!("report: {}", path.display());
                Ok(())
            }
            Command::Bench(BenchCommand::SignLocal {
                iterations,
                statement_bytes,
            }) => {
                let report = crate::bench::sign_local::run(iterations, statement_bytes)?;
                let path = crate::bench::write_report("sign-local", report)
                    .map_err(|e| CliError::Unusable(format!("writing the report: {e}")))?;
                println!("report: {}", path.display());
                Ok(())
            }
        }
    }
}

/// Reads a file, mapping failure to exit code 2.
pub(crate) fn read_file(path: &std::path::Path) -> Result<Vec<u8>, CliError> {
    std::fs::read(path).map_err(|e| CliError::Unusable(format!("{}: {e}", path.display())))
}

/// Reads a JSON file, mapping failure to exit code 2.
pub(crate) fn read_json<T: serde::de::DeserializeOwned>(
    path: &std::path::Path,
) -> Result<T, CliError> {
    serde_json::from_slice(&read_file(path)?)
        .map_err(|e| CliError::Unusable(format!("{}: {e}", path.display())))
}

/// Writes a file, mapping failure to exit code 2.
pub(crate) fn write_file(path: &std::path::Path, bytes: &[u8]) -> Result<(), CliError> {
    std::fs::write(path, bytes).map_err(|e| CliError::Unusable(format!("{}: {e}", path.display())))
}
