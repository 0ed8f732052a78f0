//! `stella-signer-tools dev ...`: the development setup and credentials for it.

use std::path::PathBuf;

use clap::Subcommand;

use crate::ToolError;

#[derive(Debug, Subcommand)]
pub enum DevCommand {
    /// Create what is missing of the development setup in --state (signing keys, a dev
    /// Authority, licensing, release and operator key) and write DIR/signer.toml, every gate
    /// enforcing against them; prints that file's path. Run the worker with
    /// `stella-signer serve --config DIR/signer.toml`.
    Init {
        #[arg(long, env = "SIGNER_STATE")]
        state: PathBuf,
    },
    /// Print {opTok, dpop?, poe} for the dev setup in --state: an OpTok from the dev
    /// Authority, a DPoP proof bound to it (with --dpop), and a licence from the dev licensing key.
    Token {
        #[arg(long, env = "SIGNER_STATE")]
        state: PathBuf,
        #[arg(long)]
        tenant: String,
        /// Plan named in the licence (dev config: `dev` or `team`).
        #[arg(long, default_value = "dev")]
        plan: String,
        /// OpTok scope.
        #[arg(long, default_value = "signer.sign")]
        scope: String,
        /// Bind the OpTok to a fresh proof key (cnf.jkt) and include a DPoP proof. Without
        /// it the OpTok is a bearer token, which the dev config refuses.
        #[arg(long)]
        dpop: bool,
        /// OpTok subject.
        #[arg(long, default_value = "dev-user")]
        subject: String,
    },
    /// Print the identity of one request for the dev setup in --state, the file
    /// `stella-signer submit --identity` reads: {"auth", "poe", "scanner"} with a fresh
    /// DPoP-bound OpTok, a licence with plan `dev`, and the allowlisted dev scanner.
    Identity {
        #[arg(long, env = "SIGNER_STATE")]
        state: PathBuf,
        #[arg(long)]
        tenant: String,
        /// A bearer OpTok without DPoP (the dev config refuses it with `dpop_invalid`).
        #[arg(long)]
        bearer: bool,
    },
}

fn check_tenant(tenant: &str) -> Result<(), ToolError> {
    if signer_actors::request::is_valid_tenant(tenant) {
        Ok(())
    } else {
        Err(ToolError::Unusable(format!(
            "tenant {tenant:?} must be 1 to 64 characters of [A-Za-z0-9_-]"
        )))
    }
}

fn print_json(value: &serde_json::Value) -> Result<(), ToolError> {
    let text = serde_json::to_string_pretty(value)
        .map_err(|e| ToolError::Unusable(format!("JSON: {e}")))?;
    println!("{text}");
    Ok(())
}

impl DevCommand {
    pub fn run(self) -> Result<(), ToolError> {
        match self {
            DevCommand::Init { state } => {
                let prepared = crate::dev::prepare(&state)?;
                println!("{}", prepared.config.display());
                Ok(())
            }
            DevCommand::Token {
                state,
                tenant,
                plan,
                scope,
                dpop,
                subject,
            } => {
                check_tenant(&tenant)?;
                let token = crate::dev::token(
                    &state,
                    &crate::dev::TokenRequest {
                        tenant,
                        plan,
                        scope,
                        dpop,
                        subject,
                    },
                )?;
                print_json(&token)
            }
            DevCommand::Identity {
                state,
                tenant,
                bearer,
            } => {
                check_tenant(&tenant)?;
                print_json(&crate::dev::request_identity(&state, &tenant, !bearer)?)
            }
        }
    }
}
