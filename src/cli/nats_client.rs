//! What the NATS-facing commands (submit, watch, audit) share: where NATS is and which
//! streams and subjects to use, from `--config` or the defaults.

use std::path::PathBuf;

use clap::Args;

use super::CliError;
use crate::config::{Config, NatsConfig};

#[derive(Debug, Clone, Args)]
pub struct NatsArgs {
    /// The service's configuration file (its [nats] section is used; SIGNER_NATS__*
    /// environment overrides apply as for serve).
    #[arg(long, env = "SIGNER_CONFIG")]
    pub config: Option<PathBuf>,
    /// NATS URL (overrides the configuration).
    #[arg(long)]
    pub nats: Option<String>,
}

impl NatsArgs {
    /// The [nats] section in effect.
    pub fn nats_config(&self) -> Result<NatsConfig, CliError> {
        Ok(self.config()?.nats)
    }

    /// The whole configuration in effect (defaults where no file is given), with the
    /// `--nats` URL applied.
    pub fn config(&self) -> Result<Config, CliError> {
        let path = self.config.clone();
        let text = match &path {
            Some(p) => std::fs::read_to_string(p)
                .map_err(|e| CliError::Unusable(format!("{}: {e}", p.display())))?,
            None => String::new(),
        };
        let mut cfg = Config::parse(&text, std::env::vars()).map_err(|e| {
            CliError::Unusable(format!("{}: {e}", path.unwrap_or_default().display()))
        })?;
        if let Some(url) = &self.nats {
            cfg.nats.url.clone_from(url);
        }
        Ok(cfg)
    }

    /// Connected client and JetStream context.
    pub async fn connect(
        &self,
    ) -> Result<
        (
            NatsConfig,
            async_nats::Client,
            async_nats::jetstream::Context,
        ),
        CliError,
    > {
        let cfg = self.nats_config()?;
        let client = crate::jetstream::connect(&cfg, "stella-signer cli")
            .await
            .map_err(|e| CliError::Unusable(e.to_string()))?;
        // The client connects in the background (`retry_on_initial_connect`): wait for the
        // server once, so what it announced (`server_info().max_payload`, which decides
        // whether a statement goes inline) is known before a command uses it.
        match tokio::time::timeout(std::time::Duration::from_secs(10), client.flush()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(CliError::Unusable(format!("NATS at {}: {e}", cfg.url))),
            Err(_) => {
                return Err(CliError::Unusable(format!(
                    "NATS at {} did not answer within 10s",
                    cfg.url
                )));
            }
        }
        let js = async_nats::jetstream::new(client.clone());
        Ok((cfg, client, js))
    }
}

/// A tokio runtime for one command.
pub fn runtime() -> Result<tokio::runtime::Runtime, CliError> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| CliError::Unusable(format!("tokio runtime: {e}")))
}

/// A result message as JSON, whatever its encoding.
pub fn result_json(content_type: Option<&str>, body: &[u8]) -> Result<serde_json::Value, CliError> {
    let ct = signer_actors::codec::ContentType::from_header(content_type)
        .map_err(|e| CliError::Unusable(e.to_string()))?;
    ct.decode(body)
        .map_err(|e| CliError::Unusable(e.to_string()))
}

/// One line describing a result.
pub fn summary(subject: &str, value: &serde_json::Value) -> String {
    let s = |p: &str| {
        value
            .pointer(p)
            .and_then(|v| v.as_str())
            .unwrap_or("?")
            .to_string()
    };
    if subject.ends_with("sign.completed") {
        let keyids: Vec<String> = value["signers"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|s| {
                        s["keyid"].as_str().unwrap_or("?")
                            [..12.min(s["keyid"].as_str().unwrap_or("?").len())]
                            .to_string()
                    })
                    .collect()
            })
            .unwrap_or_default();
        let by_reference = match value.get("envelopeRef") {
            Some(r) => format!(
                " envelopeRef={}/{} bundleRefs={}",
                r["bucket"].as_str().unwrap_or("?"),
                r["name"].as_str().unwrap_or("?"),
                value["bundleRefs"].as_array().map_or(0, Vec::len)
            ),
            None => String::new(),
        };
        format!(
            "completed {}/{} keys={} bundleSha256={}{by_reference}",
            s("/tenant"),
            s("/requestId"),
            keyids.join(","),
            s("/bundleSha256")
        )
    } else {
        format!(
            "failed {}/{} {}: {}",
            s("/tenant"),
            s("/requestId"),
            s("/error/code"),
            s("/error/message")
        )
    }
}
