//! The server of `signer.verify.referrers` (`docs/contract.md#provenance-pre-flight`):
//! every replica subscribes in one queue group, so one answers each question, with the
//! pipeline's own gate actors and audit chain
//! ([`signer_actors::pipeline::preflight::Preflight`]).
//!
//! Bounded like the job path: a question is read up to
//! [`MAX_PREFLIGHT_BYTES`](signer_actors::pipeline::preflight::MAX_PREFLIGHT_BYTES), each
//! gate call ends at the pipeline's call timeout, registry lookups are the Provenance actor's
//! (per-tenant bound, verdict cache), and at most [`MAX_CONCURRENT`] questions are being
//! answered at once: a question beyond that is answered at once, unaudited, with the
//! retryable `provenance_unavailable`, so a flood or a slow registry cannot queue work
//! without bound.

use std::sync::Arc;

use futures::StreamExt as _;
use signer_actors::error::SignerError;
use signer_actors::pipeline::preflight::{Preflight, PreflightAnswer};
use tokio::sync::Semaphore;

/// The subject (under `nats.subject_prefix`).
pub const SUBJECT: &str = "signer.verify.referrers";

/// The replicas' queue group.
pub const QUEUE_GROUP: &str = "stella-signer-preflight";

/// Questions one replica answers at once.
pub const MAX_CONCURRENT: usize = 64;

/// Subscribes to `subject` in the replicas' queue group and answers each question in a task
/// of its own, for as long as the process runs. A message without a reply subject is not
/// read (there is no one to answer).
pub async fn spawn(
    preflight: Preflight,
    client: async_nats::Client,
    subject: String,
) -> Result<tokio::task::JoinHandle<()>, async_nats::SubscribeError> {
    let mut sub = client
        .queue_subscribe(subject, QUEUE_GROUP.to_string())
        .await?;
    let permits = Arc::new(Semaphore::new(MAX_CONCURRENT));
    Ok(tokio::spawn(async move {
        while let Some(msg) = sub.next().await {
            let Some(reply_to) = msg.reply.clone() else {
                tracing::debug!("pre-flight question without a reply subject ignored");
                continue;
            };
            let header = |name: &str| {
                msg.headers
                    .as_ref()
                    .and_then(|h| h.get(name))
                    .map(|v| v.as_str().to_string())
            };
            let (content_type, traceparent) = (header("Content-Type"), header("traceparent"));
            let Ok(permit) = permits.clone().try_acquire_owned() else {
                metrics::counter!("signer_preflight_shed_total").increment(1);
                let answer = PreflightAnswer::unaudited(
                    content_type.as_deref(),
                    &msg.payload,
                    SignerError::ProvenanceUnavailable(format!(
                        "this replica is answering {MAX_CONCURRENT} pre-flight questions already; ask again"
                    )),
                );
                send(&client, reply_to, answer).await;
                continue;
            };
            let (preflight, client) = (preflight.clone(), client.clone());
            tokio::spawn(async move {
                let answer = preflight
                    .answer(
                        content_type.as_deref(),
                        traceparent.as_deref(),
                        &msg.payload,
                    )
                    .await;
                send(&client, reply_to, answer).await;
                drop(permit);
            });
        }
    }))
}

async fn send(client: &async_nats::Client, to: async_nats::Subject, answer: PreflightAnswer) {
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Content-Type", answer.content_type.as_str());
    if let Err(e) = client
        .publish_with_headers(to, headers, answer.body.into())
        .await
    {
        tracing::warn!(error = %e, request_id = %answer.reply.request_id, "pre-flight answer not sent");
    }
}
