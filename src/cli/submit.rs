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
    /// in-toto Statement v1 (JSON). Sent inline when the request fits the server's
    /// `max_payload` (less 64 KiB) and `[worker] max_body_bytes`, else uploaded to the blob
    /// bucket and sent as `payloadRef` (its bytes are then signed as they are, not
    /// JCS-canonicalised).
    #[arg(long)]
    statement: PathBuf,
    /// Upload the statement and send `payloadRef` whatever its size.
    #[arg(long)]
    by_reference: bool,
    #[arg(long)]
    tenant: String,
    /// Signing profile (default: the service's `default`).
    #[arg(long)]
    profile: Option<String>,
    /// Caller identity JSON: {"auth": {...}, "poe": {...}, "scanner": {...}}, copied into
    /// the request (`stella-signer-tools dev identity` makes one for its dev setup).
    #[arg(long)]
    identity: PathBuf,
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
    /// With --wait: write DIR/envelope.json and DIR/bundles/bundle-<i>.json, fetched from
    /// the blob bucket when the result carries references (digests checked either way).
    #[arg(long, requires = "wait")]
    out: Option<PathBuf>,
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
        let identity: serde_json::Value = super::read_json(&self.identity)?;
        let bytes = super::read_file(&self.statement)?;
        let request_id = self.request_id.clone().unwrap_or_else(new_request_id);
        let mut request = serde_json::json!({
            "apiVersion": signer_actors::API_VERSION,
            "requestId": request_id,
            "tenant": self.tenant,
            "kind": "dsse",
            "auth": identity["auth"],
            "poe": identity["poe"],
            "scanner": identity["scanner"],
        });
        if let Some(p) = &self.profile {
            request["options"] = serde_json::json!({"profile": p});
        }
        runtime()?.block_on(self.publish(&request_id, request, bytes))
    }

    /// The request body: the statement inline when it fits the broker's limit (and
    /// `--by-reference` is not given), else uploaded as
    /// `requests/<tenant>/<requestId>/payload` and sent as `payloadRef`. A file larger
    /// than the limit is never parsed into a JSON tree nor encoded inline: it is checked
    /// as a Statement the way the signer checks it, and uploaded as it is.
    async fn body(
        &self,
        js: &async_nats::jetstream::Context,
        cfg: &crate::config::NatsConfig,
        max_payload: usize,
        mut request: serde_json::Value,
        bytes: Vec<u8>,
    ) -> Result<Vec<u8>, CliError> {
        let ct = self.content_type();
        let unusable = |e: String| CliError::Unusable(e);
        let file = self.statement.display();
        // what the broker takes (with room for headers) and what the signer accepts
        let max_body = self.nats.config()?.worker.max_body_bytes;
        let limit = max_payload
            .saturating_sub(signer_actors::pipeline::INLINE_RESULT_HEADROOM)
            .min(max_body);
        if !self.by_reference && bytes.len() <= limit {
            let statement: serde_json::Value =
                serde_json::from_slice(&bytes).map_err(|e| unusable(format!("{file}: {e}")))?;
            request["statement"] = statement;
            let body = ct.encode(&request).map_err(|e| unusable(e.to_string()))?;
            if body.len() <= limit {
                return Ok(body);
            }
            if let Some(m) = request.as_object_mut() {
                m.remove("statement");
            }
        }
        signer_actors::statement::Statement::subjects_of_payload(&bytes)
            .map_err(|e| unusable(format!("{file}: {e}")))?;
        let request_id = request["requestId"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let name = signer_actors::objects::request_object_name(&self.tenant, &request_id);
        let store = crate::blobs::open(js, &cfg.blobs_bucket, cfg.blobs_max_age)
            .await
            .map_err(|e| unusable(e.to_string()))?;
        crate::blobs::put(&store, &name, &bytes)
            .await
            .map_err(|e| unusable(format!("uploading the statement: {e}")))?;
        let object = signer_actors::objects::ObjectRef::of(&cfg.blobs_bucket, &name, &bytes);
        eprintln!(
            "uploaded the statement ({} bytes) as {}/{}",
            object.size, object.bucket, object.name
        );
        request["payloadRef"] =
            serde_json::to_value(&object).map_err(|e| unusable(e.to_string()))?;
        request["payloadType"] = signer_actors::statement::INTOTO_PAYLOAD_TYPE.into();
        ct.encode(&request).map_err(|e| unusable(e.to_string()))
    }

    fn content_type(&self) -> signer_actors::codec::ContentType {
        if self.cbor {
            signer_actors::codec::ContentType::Cbor
        } else {
            signer_actors::codec::ContentType::Json
        }
    }

    async fn publish(
        &self,
        request_id: &str,
        request: serde_json::Value,
        bytes: Vec<u8>,
    ) -> Result<(), CliError> {
        let (cfg, client, js) = self.nats.connect().await?;
        let ct = self.content_type();
        let body = self
            .body(&js, &cfg, client.server_info().max_payload, request, bytes)
            .await?;
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
        if let Some(dir) = &self.out {
            let carried = super::artefacts::write_result(&js, &value, dir).await?;
            eprintln!(
                "wrote {}/envelope.json and {}/bundles/ ({})",
                dir.display(),
                dir.display(),
                match carried {
                    super::artefacts::Carried::Inline => "inline",
                    super::artefacts::Carried::ByReference =>
                        "fetched by reference, digests checked",
                }
            );
        }
        Ok(())
    }
}
