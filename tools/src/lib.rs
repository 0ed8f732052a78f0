//! stella-signer-tools: what is built around the service but is not part of it. The service
//! package (`stella-signer`) never depends on this crate; this crate uses the service's
//! library the way an outside program would.
//!
//! - [`bench`]: throughput figures beside raw ceilings measured in the same run
//!   (`stella-signer-tools bench sign-local|keys|pipeline`);
//! - [`dev`]: a development setup whose every gate enforces against locally made keys
//!   (`dev init`), and credentials for it (`dev token`, `dev identity`);
//! - [`mint`]: keys and tokens (OpToks, DPoP proofs, licences) for the dev setup, the bench
//!   and tests;
//! - [`push`]: images, cosign signatures and attestations pushed to an OCI registry in the
//!   layouts the provenance gate reads (integration tests).

pub mod bench;
pub mod cli;
pub mod dev;
pub mod mint;
pub mod push;

/// Why a tool failed, and so which exit code it ends with (as the service's CLI).
#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    /// The run was refused or found something invalid (exit 1).
    #[error("{0}")]
    Invalid(String),
    /// The run could not be made: a service unreachable, a file unusable (exit 2).
    #[error("{0}")]
    Unusable(String),
}

impl ToolError {
    pub fn exit_code(&self) -> u8 {
        match self {
            ToolError::Invalid(_) => 1,
            ToolError::Unusable(_) => 2,
        }
    }
}

impl From<stella_signer::cli::CliError> for ToolError {
    fn from(e: stella_signer::cli::CliError) -> Self {
        match e {
            stella_signer::cli::CliError::Invalid(m) => ToolError::Invalid(m),
            stella_signer::cli::CliError::Unusable(m) => ToolError::Unusable(m),
        }
    }
}

impl From<dev::DevError> for ToolError {
    fn from(e: dev::DevError) -> Self {
        ToolError::Unusable(e.to_string())
    }
}

/// A multi-threaded runtime for the commands that talk to NATS or run actors.
pub(crate) fn runtime() -> Result<tokio::runtime::Runtime, ToolError> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| ToolError::Unusable(format!("tokio runtime: {e}")))
}
