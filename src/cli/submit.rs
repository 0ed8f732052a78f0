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
    job: JobArgs,
    /// in-toto Statement v1 (JSON). Sent inline when the request fits the server's
    /// `max_payload` (less 64 KiB) and `[worker] max_body_bytes`, else uploaded to the blob
    /// bucket and sent as `payloadRef` (its bytes are then signed as they are, not
    /// JCS-canonicalised).
    #[arg(long)]
    statement: PathBuf,
    /// Wait for the result and print it.
    #[arg(long)]
    wait: bool,
    /// With --wait: write DIR/envelope.json and DIR/bundles/bundle-<i>.json, fetched from
    /// the blob bucket when the result carries references (digests checked either way).
    #[arg(long, requires = "wait")]
    out: Option<PathBuf>,
}

/// Who submits a job and how: what `submit` and `sign` share.
#[derive(Debug, Args)]
pub struct JobArgs {
    #[command(flatten)]
    nats: NatsArgs,
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
    /// How long waiting for the result waits.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// Print the whole result as JSON instead of one line.
    #[arg(long)]
    json: bool,
}

/// A job to submit: the statement's bytes, the request options beyond `profile`, and
/// whether to wait for the result (and where to write its envelope and bundles).
pub struct Job {
    pub statement: Vec<u8>,
    /// What the file is called in progress messages.
    pub label: String,
    pub options: serde_json::Map<String, serde_json::Value>,
    pub wait: Wait,
}

/// Whether a submitted job's result is waited for.
pub enum Wait {
    /// Print the requestId and return.
    No,
    /// Wait for the result and print it; write its envelope and bundles to `out`, if given.
    ForResult { out: Option<PathBuf> },
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
        let job = Job {
            statement: super::read_file(&self.statement)?,
            label: self.statement.display().to_string(),
            options: serde_json::Map::new(),
            wait: match self.wait {
                true => Wait::ForResult { out: self.out },
                false => Wait::No,
            },
        };
        self.job.submit(job).map(|_| ())
    }
}

impl JobArgs {
    /// Publishes `job` and, when it waits, returns its completed result (a refusal is
    /// printed and returned as [`CliError::Invalid`]).
    pub fn submit(&self, job: Job) -> Result<Option<serde_json::Value>, CliError> {
        let identity: serde_json::Value = super::read_json(&self.identity)?;
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
        let mut options = job.options.clone();
        if let Some(p) = &self.profile {
            options.insert("profile".into(), p.clone().into());
        }
        if !options.is_empty() {
            request["options"] = options.into();
        }
        runtime()?.block_on(self.publish(&request_id, request, job))
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
        bytes: &[u8],
        file: &str,
    ) -> Result<Vec<u8>, CliError> {
        let ct = self.content_type();
        let unusable = |e: String| CliError::Unusable(e);
        // what the broker takes (with room for headers) and what the signer accepts
        let max_body = self.nats.config()?.worker.max_body_bytes;
        let limit = max_payload
            .saturating_sub(signer_actors::pipeline::INLINE_RESULT_HEADROOM)
            .min(max_body);
        if !self.by_reference && bytes.len() <= limit {
            let statement: serde_json::Value =
                serde_json::from_slice(bytes).map_err(|e| unusable(format!("{file}: {e}")))?;
            request["statement"] = statement;
            let body = ct.encode(&request).map_err(|e| unusable(e.to_string()))?;
            if body.len() <= limit {
                return Ok(body);
            }
            if let Some(m) = request.as_object_mut() {
                m.remove("statement");
            }
        }
        signer_actors::statement::Statement::subjects_of_payload(bytes)
            .map_err(|e| unusable(format!("{file}: {e}")))?;
        let request_id = request["requestId"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let name = signer_actors::objects::request_object_name(&self.tenant, &request_id);
        let store = crate::blobs::open(js, &cfg.blobs_bucket, cfg.blobs_max_age)
            .await
            .map_err(|e| unusable(e.to_string()))?;
        crate::blobs::put(&store, &name, bytes)
            .await
            .map_err(|e| unusable(format!("uploading the statement: {e}")))?;
        let object = signer_actors::objects::ObjectRef::of(&cfg.blobs_bucket, &name, bytes);
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
        job: Job,
    ) -> Result<Option<serde_json::Value>, CliError> {
        let (cfg, client, js) = self.nats.connect().await?;
        let ct = self.content_type();
        let max_payload = client.server_info().max_payload;
        let body = self
            .body(&js, &cfg, max_payload, request, &job.statement, &job.label)
            .await?;
        drop(job.statement);
        let unusable = |e: String| CliError::Unusable(e);
        let mut subs = if let Wait::ForResult { .. } = job.wait {
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
            return Ok(None);
        };
        eprintln!(
            "waiting for the result (up to {})",
            humantime::format_duration(self.timeout)
        );
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
        if let Wait::ForResult { out: Some(dir) } = &job.wait {
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
        Ok(Some(value))
    }
}
