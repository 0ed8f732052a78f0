//! `stella-signer serve`.

use std::path::PathBuf;

use clap::Args;

use super::CliError;
use crate::config::Config;

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Configuration file (TOML); SIGNER_* environment variables override it.
    #[arg(long, env = "SIGNER_CONFIG")]
    config: PathBuf,
}

impl ServeArgs {
    pub fn run(self) -> Result<(), CliError> {
        crate::telemetry::init_logs();
        let cfg = Config::load(&self.config, std::env::vars())
            .map_err(|e| CliError::Unusable(e.to_string()))?;
        let rt = super::nats_client::runtime()?;
        let served = rt.block_on(crate::serve::run(cfg));
        // A blocking task still running (a PKCS#11 call of a cut-off job) must not hold the
        // exit past the drain timeout.
        rt.shutdown_timeout(std::time::Duration::from_millis(200));
        served.map_err(|e| CliError::Unusable(e.to_string()))
    }
}
