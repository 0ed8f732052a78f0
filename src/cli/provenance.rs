//! `stella-signer provenance check REPOSITORY@DIGEST`: asks a running signer, over
//! `signer.verify.referrers`, the verdict its provenance gate would give a job for that
//! scanner image, authenticated as a job is (`--identity`, as `submit` reads it).

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Subcommand};
use signer_actors::audit::ProvenanceVerdict;
use signer_actors::codec::ContentType;
use signer_actors::pipeline::preflight::{VerifyReferrersReply, VerifyReferrersRequest};

use super::CliError;
use super::nats_client::{NatsArgs, runtime};

#[derive(Debug, Subcommand)]
pub enum ProvenanceCommand {
    /// The provenance verdict for a scanner image: trusted (with the release key and where
    /// its signature is), allowlisted, untrusted or unavailable. Exit 0 only when trusted
    /// or allowlisted.
    Check(CheckArgs),
}

impl ProvenanceCommand {
    pub fn run(self) -> Result<(), CliError> {
        match self {
            ProvenanceCommand::Check(args) => args.run(),
        }
    }
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    #[command(flatten)]
    nats: NatsArgs,
    /// The scanner image, `registry/path@sha256:<hex>`.
    image: String,
    #[arg(long)]
    tenant: String,
    /// Caller identity JSON: {"auth": {...}, "poe": {...}} as for `submit` (a `scanner`
    /// member is ignored). A DPoP proof in it is single-use, as for a job.
    #[arg(long)]
    identity: PathBuf,
    /// requestId of the question (default: generated); its audit event carries it.
    #[arg(long)]
    request_id: Option<String>,
    /// Send the question as CBOR instead of JSON.
    #[arg(long)]
    cbor: bool,
    /// How long to wait for the answer.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// Print the whole answer as JSON instead of one line.
    #[arg(long)]
    json: bool,
}

/// `repository@digest`, split at the last `@`.
fn split_image(image: &str) -> Result<(&str, &str), CliError> {
    match image.rsplit_once('@') {
        Some((repository, digest)) if !repository.is_empty() && !digest.is_empty() => {
            Ok((repository, digest))
        }
        _ => Err(CliError::Unusable(format!(
            "{image:?} is not REPOSITORY@DIGEST (e.g. registry.example:5000/stella-ops/scanner@sha256:<64 hex>)"
        ))),
    }
}

/// Member `name` of the identity file.
fn member<T: serde::de::DeserializeOwned>(
    identity: &serde_json::Value,
    name: &str,
    file: &Path,
) -> Result<T, CliError> {
    serde_json::from_value(identity[name].clone())
        .map_err(|e| CliError::Unusable(format!("{}: {name}: {e}", file.display())))
}

/// One line describing an answer.
pub fn summary(reply: &VerifyReferrersReply) -> String {
    let image = format!(
        "{}@{}",
        reply.repository.as_deref().unwrap_or("?"),
        reply.image_digest.as_deref().unwrap_or("?")
    );
    let mut line = format!("{} {image}", reply.verdict.as_str());
    if let Some(s) = &reply.signature {
        line.push_str(&format!(
            " keyid={} {} {} ({})",
            s.keyid,
            s.location.as_str(),
            s.reference,
            s.format.as_str()
        ));
    }
    if let Some(e) = &reply.error {
        line.push_str(&format!(": {} {}", e.code.as_str(), e.message));
        if e.retryable {
            line.push_str(" (retryable)");
        }
    }
    if let Some(a) = &reply.audit {
        line.push_str(&format!(" [audit {} seq {}]", a.stream, a.seq));
    }
    line
}

impl CheckArgs {
    pub fn run(self) -> Result<(), CliError> {
        let (repository, digest) = split_image(&self.image)?;
        let identity: serde_json::Value = super::read_json(&self.identity)?;
        let question = VerifyReferrersRequest {
            api_version: signer_actors::API_VERSION.into(),
            request_id: self
                .request_id
                .clone()
                .unwrap_or_else(super::submit::new_request_id),
            tenant: self.tenant.clone(),
            auth: member(&identity, "auth", &self.identity)?,
            poe: member(&identity, "poe", &self.identity)?,
            repository: repository.into(),
            image_digest: digest.into(),
        };
        let reply = runtime()?.block_on(self.ask(&question))?;
        if self.json {
            println!(
                "{}",
                serde_json::to_string_pretty(&reply).unwrap_or_default()
            );
        } else {
            println!("{}", summary(&reply));
        }
        match reply.verdict {
            ProvenanceVerdict::Trusted | ProvenanceVerdict::Allowlisted
                if reply.error.is_none() =>
            {
                Ok(())
            }
            v => Err(CliError::Invalid(format!(
                "{}@{} is not trusted ({})",
                question.repository,
                question.image_digest,
                v.as_str()
            ))),
        }
    }

    async fn ask(
        &self,
        question: &VerifyReferrersRequest,
    ) -> Result<VerifyReferrersReply, CliError> {
        let (cfg, client, _js) = self.nats.connect().await?;
        let ct = if self.cbor {
            ContentType::Cbor
        } else {
            ContentType::Json
        };
        let body = ct
            .encode(question)
            .map_err(|e| CliError::Unusable(e.to_string()))?;
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Content-Type", ct.as_str());
        let subject = cfg.subject(crate::provenance::preflight::SUBJECT);
        let request = async_nats::Request::new()
            .headers(headers)
            .payload(body.into())
            .timeout(Some(self.timeout));
        let answer = client
            .send_request(subject.clone(), request)
            .await
            .map_err(|e| CliError::Unusable(format!("{subject}: {e} (is a signer running?)")))?;
        let ct = ContentType::from_header(
            answer
                .headers
                .as_ref()
                .and_then(|h| h.get("Content-Type"))
                .map(|v| v.as_str()),
        )
        .map_err(|e| CliError::Unusable(e.to_string()))?;
        ct.decode(&answer.payload).map_err(|e| {
            CliError::Unusable(format!(
                "unreadable answer on {subject}: {e}: {:?}",
                String::from_utf8_lossy(&answer.payload)
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_image_is_split_at_its_last_at() {
        assert_eq!(
            split_image("127.0.0.1:5000/a/b@sha256:00").unwrap(),
            ("127.0.0.1:5000/a/b", "sha256:00")
        );
        for bad in ["registry/a", "@sha256:00", "registry/a@"] {
            assert!(
                matches!(split_image(bad), Err(CliError::Unusable(_))),
                "{bad}"
            );
        }
    }
}
