//! `stella-signer serve`.

use std::path::PathBuf;

use clap::Args;

use super::CliError;
use crate::config::Config;

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Configuration file (TOML); SIGNER_* environment variables override it.
    #[arg(long, env = "SIGNER_CONFIG", required_unless_present = "dev")]
    config: Option<PathBuf>,
    /// Run with a generated development setup kept in --state: signing keys and a dev
    /// Authority, licensing and release key, every gate enforcing against them.
    #[arg(long, requires = "state")]
    dev: bool,
    /// State directory of --dev.
    #[arg(long, env = "SIGNER_STATE")]
    state: Option<PathBuf>,
}

impl ServeArgs {
    pub fn run(self) -> Result<(), CliError> {
        crate::telemetry::init_logs();
        let path = match (&self.config, self.dev, &self.state) {
            (_, true, Some(state)) => {
                crate::dev::prepare(state)
                    .map_err(CliError::Unusable)?
                    .config
            }
            (Some(config), _, _) => config.clone(),
            _ => {
                return Err(CliError::Unusable(
                    "--config FILE or --dev --state DIR".into(),
                ));
            }
        };
        let cfg =
            Config::load(&path, std::env::vars()).map_err(|e| CliError::Unusable(e.to_string()))?;
        let rt = super::nats_client::runtime()?;
        let served = rt.block_on(crate::serve::run(cfg));
        // A blocking task still running (a PKCS#11 call of a cut-off job) must not hold the
        // exit past the drain timeout.
        rt.shutdown_timeout(std::time::Duration::from_millis(200));
        served.map_err(|e| CliError::Unusable(e.to_string()))
    }
}
