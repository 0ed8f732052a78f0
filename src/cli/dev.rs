//! `stella-signer dev ...`: credentials for the `serve --dev` setup.

use std::path::PathBuf;

use clap::Subcommand;

use super::CliError;

#[derive(Debug, Subcommand)]
pub enum DevCommand {
    /// Print {opTok, dpop?, poe} for the dev setup in --state: an OpTok from the dev
    /// Authority, a DPoP proof bound to it (with --dpop), and a licence from the dev licensing key.
    Token {
        #[arg(long)]
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
}

impl DevCommand {
    pub fn run(self) -> Result<(), CliError> {
        let DevCommand::Token {
            state,
            tenant,
            plan,
            scope,
            dpop,
            subject,
        } = self;
        if !signer_actors::request::is_valid_tenant(&tenant) {
            return Err(CliError::Unusable(format!(
                "tenant {tenant:?} must be 1 to 64 characters of [A-Za-z0-9_-]"
            )));
        }
        let token = crate::dev::token(
            &state,
            &crate::dev::TokenRequest {
                tenant,
                plan,
                scope,
                dpop,
                subject,
            },
        )
        .map_err(CliError::Unusable)?;
        println!(
            "{}",
            serde_json::to_string_pretty(&token).unwrap_or_default()
        );
        Ok(())
    }
}
