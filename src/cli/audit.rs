//! `stella-signer audit verify`: walks SIGNER_AUDIT and reports the first broken link.

use async_nats::jetstream::consumer::{self, DeliverPolicy};
use clap::Subcommand;
use futures::StreamExt as _;
use signer_actors::audit::ChainVerifier;

use super::CliError;
use super::nats_client::{NatsArgs, runtime};

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Check every writer's hash chain in the audit stream (exit 1 on the first break).
    Verify {
        #[command(flatten)]
        nats: NatsArgs,
    },
}

impl AuditCommand {
    pub fn run(self) -> Result<(), CliError> {
        let AuditCommand::Verify { nats } = self;
        runtime()?.block_on(verify(nats))
    }
}

async fn verify(nats: NatsArgs) -> Result<(), CliError> {
    let (cfg, _client, js) = nats.connect().await?;
    let unusable = |e: String| CliError::Unusable(e);
    let mut stream = js
        .get_stream(&cfg.audit_stream)
        .await
        .map_err(|e| unusable(e.to_string()))?;
    let last = stream
        .info()
        .await
        .map_err(|e| unusable(e.to_string()))?
        .state
        .last_sequence;
    let mut verifier = ChainVerifier::default();
    if last == 0 {
        println!("OK: {} is empty", cfg.audit_stream);
        return Ok(());
    }
    let consumer = stream
        .create_consumer(consumer::pull::OrderedConfig {
            deliver_policy: DeliverPolicy::All,
            ..Default::default()
        })
        .await
        .map_err(|e| unusable(e.to_string()))?;
    let mut messages = consumer
        .messages()
        .await
        .map_err(|e| unusable(e.to_string()))?;
    while let Some(msg) = messages.next().await {
        let msg = msg.map_err(|e| unusable(e.to_string()))?;
        let seq = msg.info().map(|i| i.stream_sequence).unwrap_or(0);
        let event: serde_json::Value = serde_json::from_slice(&msg.payload).map_err(|e| {
            CliError::Invalid(format!("audit message at seq {seq} is not JSON: {e}"))
        })?;
        if let Err(e) = verifier.push(&event) {
            println!("FAIL: stream seq {seq}: {e}");
            return Err(CliError::Invalid("audit chain broken".into()));
        }
        if seq >= last {
            break;
        }
    }
    println!(
        "OK: {} events from {} writer(s), every chain intact",
        verifier.checked(),
        verifier.writers()
    );
    Ok(())
}
