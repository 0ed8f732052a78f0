//! The command line. Exit codes: 0 ok, 1 invalid or denied, 2 unusable input.

pub(crate) mod artefacts;
mod audit;
mod keys;
mod kit;
pub(crate) mod nats_client;
mod provenance;
mod schema;
mod serve;
mod sign;
pub mod sign_local;
pub(crate) mod submit;
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
    /// Sign an SBOM or a scan report through the service (sign sbom, sign report).
    ///
    /// Builds the Statement, submits it, waits, and writes the envelope and bundles.
    #[command(subcommand)]
    Sign(sign::SignCommand),
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
    /// The audit stream.
    #[command(subcommand)]
    Audit(audit::AuditCommand),
    /// The offline kit for verifiers (`verify --kit`).
    #[command(subcommand)]
    Kit(kit::KitCommand),
    /// Scanner release provenance, asked of a running signer.
    #[command(subcommand)]
    Provenance(provenance::ProvenanceCommand),
}

impl Cli {
    pub fn run(self) -> Result<(), CliError> {
        match self.command {
            Command::Keys(cmd) => cmd.run(),
            Command::Sign(cmd) => cmd.run(),
            Command::SignLocal(args) => args.run(),
            Command::Verify(args) => args.run(),
            Command::Schema(cmd) => cmd.run(),
            Command::Serve(args) => args.run(),
            Command::Submit(args) => args.run(),
            Command::Watch(args) => args.run(),
            Command::Audit(cmd) => cmd.run(),
            Command::Kit(cmd) => cmd.run(),
            Command::Provenance(cmd) => cmd.run(),
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
