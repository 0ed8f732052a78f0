//! `stella-signer watch`: follow sign.completed / sign.failed as Attestor would.

use std::time::Duration;

use async_nats::jetstream::consumer::{self, DeliverPolicy};
use clap::Args;
use futures::StreamExt as _;

use super::CliError;
use super::nats_client::{NatsArgs, result_json, runtime, summary};

#[derive(Debug, Args)]
pub struct WatchArgs {
    #[command(flatten)]
    nats: NatsArgs,
    /// Resume with a durable consumer of this name (acknowledging each result), as a
    /// consumer service would; default: an ephemeral ordered consumer.
    #[arg(long)]
    durable: Option<String>,
    /// Start from the first stored result instead of new ones.
    #[arg(long)]
    all: bool,
    /// Print each result as JSON (one per line).
    #[arg(long)]
    json: bool,
    /// Stop after this many results.
    #[arg(long)]
    count: Option<usize>,
    /// Stop when nothing arrives for this long.
    #[arg(long, value_parser = humantime::parse_duration)]
    idle: Option<Duration>,
    /// Write each completed result's envelope and bundles to
    /// DIR/<tenant>/<requestId>/{envelope.json,bundles/}, fetching them from the blob
    /// bucket when the result carries references (digests checked).
    #[arg(long, value_name = "DIR")]
    fetch: Option<std::path::PathBuf>,
}

impl WatchArgs {
    pub fn run(self) -> Result<(), CliError> {
        runtime()?.block_on(self.watch())
    }

    /// Writes one result's artefacts; a result that cannot be fetched or fails its digest
    /// check is reported and the watch goes on.
    async fn fetch_one(
        &self,
        js: &async_nats::jetstream::Context,
        dir: &std::path::Path,
        value: &serde_json::Value,
    ) {
        let (Some(tenant), Some(id)) = (value["tenant"].as_str(), value["requestId"].as_str())
        else {
            return;
        };
        // both are restricted to [A-Za-z0-9._:-] by the contract; refuse anything else
        let safe = |s: &str| {
            !s.is_empty()
                && s != "."
                && s != ".."
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._:-".contains(&b))
        };
        if !safe(tenant) || !safe(id) {
            eprintln!("not fetched: unexpected tenant or requestId");
            return;
        }
        let out = dir.join(tenant).join(id);
        match super::artefacts::write_result(js, value, &out).await {
            Ok(_) => eprintln!("fetched {}", out.display()),
            Err(e) => eprintln!("not fetched {tenant}/{id}: {e}"),
        }
    }

    async fn watch(&self) -> Result<(), CliError> {
        let (cfg, _client, js) = self.nats.connect().await?;
        let js = &js;
        let unusable = |e: String| CliError::Unusable(e);
        let stream = js
            .get_stream(&cfg.results_stream)
            .await
            .map_err(|e| unusable(e.to_string()))?;
        let deliver_policy = if self.all {
            DeliverPolicy::All
        } else {
            DeliverPolicy::New
        };
        let filter_subjects = vec![cfg.subject("sign.completed"), cfg.subject("sign.failed")];
        let mut messages: futures::stream::BoxStream<
            'static,
            Result<async_nats::jetstream::Message, String>,
        > = match &self.durable {
            Some(name) => {
                let c: consumer::PullConsumer = stream
                    .get_or_create_consumer(
                        name,
                        consumer::pull::Config {
                            durable_name: Some(name.clone()),
                            deliver_policy,
                            filter_subjects,
                            ack_policy: consumer::AckPolicy::Explicit,
                            ..Default::default()
                        },
                    )
                    .await
                    .map_err(|e| unusable(e.to_string()))?;
                c.messages()
                    .await
                    .map_err(|e| unusable(e.to_string()))?
                    .map(|r| r.map_err(|e| e.to_string()))
                    .boxed()
            }
            None => {
                let c = stream
                    .create_consumer(consumer::pull::OrderedConfig {
                        deliver_policy,
                        filter_subjects,
                        ..Default::default()
                    })
                    .await
                    .map_err(|e| unusable(e.to_string()))?;
                c.messages()
                    .await
                    .map_err(|e| unusable(e.to_string()))?
                    .map(|r| r.map_err(|e| e.to_string()))
                    .boxed()
            }
        };
        let mut seen = 0usize;
        loop {
            if self.count.is_some_and(|n| seen >= n) {
                return Ok(());
            }
            let next = match self.idle {
                Some(idle) => match tokio::time::timeout(idle, messages.next()).await {
                    Ok(n) => n,
                    Err(_) => return Ok(()),
                },
                None => messages.next().await,
            };
            let Some(msg) = next else { return Ok(()) };
            let msg = msg.map_err(unusable)?;
            let ct = msg
                .headers
                .as_ref()
                .and_then(|h| h.get("Content-Type"))
                .map(|v| v.as_str().to_string());
            let value = result_json(ct.as_deref(), &msg.payload)?;
            if self.json {
                println!("{}", serde_json::to_string(&value).unwrap_or_default());
            } else {
                println!("{}", summary(msg.subject.as_str(), &value));
            }
            if let Some(dir) = &self.fetch
                && msg.subject.as_str().ends_with("sign.completed")
            {
                self.fetch_one(js, dir, &value).await;
            }
            if self.durable.is_some() {
                msg.ack().await.map_err(|e| unusable(e.to_string()))?;
            }
            seen += 1;
        }
    }
}
