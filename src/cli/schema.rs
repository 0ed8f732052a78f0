//! `stella-signer schema check`.

use std::path::PathBuf;

use clap::Subcommand;

use super::{CliError, read_json};
use crate::schemas::SchemaKind;

#[derive(Debug, Subcommand)]
pub enum SchemaCommand {
    /// Validate a JSON message against the schema of its kind.
    Check {
        #[arg(long)]
        kind: SchemaKind,
        file: PathBuf,
    },
}

impl SchemaCommand {
    pub fn run(self) -> Result<(), CliError> {
        let SchemaCommand::Check { kind, file } = self;
        let instance: serde_json::Value = read_json(&file)?;
        let violations = kind.violations(&instance).map_err(CliError::Unusable)?;
        if violations.is_empty() {
            println!("OK: {} is a valid {kind:?} message", file.display());
            return Ok(());
        }
        for v in &violations {
            println!("FAIL: {v}");
        }
        Err(CliError::Invalid(format!(
            "{} violation(s) of the {kind:?} schema",
            violations.len()
        )))
    }
}
