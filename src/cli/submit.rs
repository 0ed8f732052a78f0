//! `stella-signer submit`: publish a job as a scanner or pipeline would, optionally wait for
//! its result.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use futures::StreamExt as _;

use super::CliError;
use super::nats_client::{NatsArgs, result_json, runtime, summary};

#[derive(Debug, Args)]
pub struct SubmitArgs {
    #[command(flatten)]
    nats: NatsArgs,
    /// in-toto Statement v1 (JSON).
    #[arg(long)]
    statement: PathBuf,
    #[arg(long)]
    tenant: String,
    /// Signing profile (default: the service's `default`).
    #[arg(long)]
    profile: Option<String>,
    /// Caller identity JSON: {"auth": {...}, "poe": {...}, "scanner": {...}}
    /// (default with --dev-state: fresh dev credentials, DPoP-bound, and the dev scanner).
    #[arg(long)]
    identity: Option<PathBuf>,
    /// With --dev-state: send a bearer OpTok without DPoP (the dev config refuses it).
    #[arg(long)]
    bearer: bool,
    /// requestId (default: generated).
    #[arg(long)]
    request_id: Option<String>,
    /// Send the body as CBOR instead of JSON.
    #[arg(long)]
    cbor: bool,
    /// Wait for the result and print it.
    #[arg(long)]
    wait: bool,
    /// How long --wait waits.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// Print the whole result as JSON instead of one line.
    #[arg(long)]
    json: bool,
}

/// A requestId unique enough for a CLI: time in ms and random bits.
pub fn new_request_id() -> String {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    let mut rnd = [0u8; 6];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut rnd);
    format!("{ms:x}-{}", hex::encode(rnd))
}

impl SubmitArgs {
    pub fn run(self) -> Result<(), CliError> {
        let identity: serde_json::Value = match (&self.identity, &self.nats.dev_state) {
            (Some(path), _) => super::read_json(path)?,
            (None, Some(dir)) => crate::dev::request_identity(dir, &self.tenant, !self.bearer)
                .map_err(CliError::Unusable)?,
            (None, None) => {
                return Err(CliError::Unusable(
                    "--identity FILE (or --dev-state DIR)".into(),
                ));
            }
        };
        let statement: serde_json::Value = super::read_json(&self.statement)?;
        let request_id = self.request_id.clone().unwrap_or_else(new_request_id);
        let mut request = serde_json::json!({
            "apiVersion": signer_actors::API_VERSION,
            "requestId": request_id,
            "tenant": self.tenant,
            "kind": "dsse",
            "auth": identity["auth"],
            "poe": identity["poe"],
            "scanner": identity["scanner"],
            "statement": statement,
        });
        if let Some(p) = &self.profile {
            request["options"] = serde_json::json!({"profile": p});
        }
        let ct = if self.cbor {
            signer_actors::codec::ContentType::Cbor
        } else {
            signer_actors::codec::ContentType::Json
        };
        let body = ct
            .encode(&request)
            .map_err(|e| CliError::Unusable(e.to_string()))?;
        runtime()?.block_on(self.publish(&request_id, ct, body))
    }

    async fn publish(
        &self,
        request_id: &str,
        ct: signer_actors::codec::ContentType,
        body: Vec<u8>,
    ) -> Result<(), CliError> {
        let (cfg, client, js) = self.nats.connect().await?;
        let unusable = |e: String| CliError::Unusable(e);
        let mut subs = if self.wait {
            let completed = client
                .subscribe(cfg.subject("sign.completed"))
                .await
                .map_err(|e| unusable(e.to_string()))?;
            let failed = client
                .subscribe(cfg.subject("sign.failed"))
                .await
                .map_err(|e| unusable(e.to_string()))?;
            Some(futures::stream::select(completed, failed))
        } else {
            None
        };
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", request_id);
        headers.insert("Content-Type", ct.as_str());
        let subject = cfg.subject(&format!("sign.requests.{}", self.tenant));
        let ack = js
            .publish_with_headers(subject, headers, body.into())
            .await
            .map_err(|e| unusable(e.to_string()))?
            .await
            .map_err(|e| unusable(e.to_string()))?;
        if ack.duplicate {
            eprintln!(
                "warning: JetStream already had a request with Nats-Msg-Id {request_id} (duplicate window); this publish was dropped"
            );
        }
        eprintln!(
            "submitted {}/{request_id} (stream seq {})",
            self.tenant, ack.sequence
        );
        let Some(subs) = subs.as_mut() else {
            println!("{request_id}");
            return Ok(());
        };
        let wait = async {
            while let Some(msg) = subs.next().await {
                let Some(headers) = &msg.headers else {
                    continue;
                };
                let ours = headers.get("Signer-Request-Id").map(|v| v.as_str()) == Some(request_id)
                    && headers.get("Signer-Tenant").map(|v| v.as_str())
                        == Some(self.tenant.as_str());
                if ours {
                    return Some(msg);
                }
            }
            None
        };
        let msg = tokio::time::timeout(self.timeout, wait)
            .await
            .map_err(|_| CliError::Unusable(format!("no result within {:?}", self.timeout)))?
            .ok_or_else(|| CliError::Unusable("subscription closed".into()))?;
        let value = result_json(
            msg.headers
                .as_ref()
                .and_then(|h| h.get("Content-Type"))
                .map(|v| v.as_str()),
            &msg.payload,
        )?;
        if self.json {
            println!(
                "{}",
                serde_json::to_string_pretty(&value).unwrap_or_default()
            );
        } else {
            println!("{}", summary(msg.subject.as_str(), &value));
        }
        if msg.subject.as_str().ends_with("sign.failed") {
            return Err(CliError::Invalid("the job was refused".into()));
        }
        Ok(())
    }
}
