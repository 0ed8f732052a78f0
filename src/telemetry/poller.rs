//! Gauges read from outside the process every few seconds: the backlog of the durable
//! consumer and the state of the loaded keys.
//!
//! The backlog is the **consumer's** view, asked of the broker by each replica: every replica
//! reports the same numbers (aggregate with `max`, never `sum`), and as long as one replica
//! runs, the backlog is seen. When no replica runs, nothing reports it; the
//! `SignerNoReadyReplica` alert covers that case.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_nats::jetstream;
use signer_actors::ports::RevocationList;

/// How often the gauges are refreshed.
pub const INTERVAL: Duration = Duration::from_secs(5);

/// What one poll of the broker found.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backlog {
    /// Messages not yet delivered to any replica (`num_pending`).
    pub pending: u64,
    /// Messages delivered and not yet acknowledged (`num_ack_pending`).
    pub ack_pending: u64,
    /// Messages delivered more than once and not yet acknowledged (`num_redelivered`).
    pub redelivered: u64,
    /// Age of the oldest message still in the work-queue stream: acknowledged messages
    /// leave it, so this is the oldest job without a settled result (waiting, running or
    /// held by a replica that died). 0 when the stream is empty.
    pub oldest_age_seconds: f64,
}

/// Why a poll failed.
#[derive(Debug, thiserror::Error)]
pub enum PollError {
    #[error("stream {stream}: {source}")]
    Stream {
        stream: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("consumer {consumer}: {source}")]
    Consumer {
        consumer: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// Asks the broker for the stream's and the consumer's state.
pub async fn poll_backlog(
    js: &jetstream::Context,
    stream: &str,
    consumer: &str,
) -> Result<Backlog, PollError> {
    let stream_err = |e: Box<dyn std::error::Error + Send + Sync>| PollError::Stream {
        stream: stream.to_string(),
        source: e,
    };
    let mut handle = js
        .get_stream(stream)
        .await
        .map_err(|e| stream_err(e.into()))?;
    let state = handle
        .info()
        .await
        .map_err(|e| stream_err(e.into()))?
        .state
        .clone();
    let info = handle
        .consumer_info(consumer)
        .await
        .map_err(|e| PollError::Consumer {
            consumer: consumer.to_string(),
            source: e.into(),
        })?;
    let oldest_age_seconds = if state.messages == 0 {
        0.0
    } else {
        SystemTime::now()
            .duration_since(SystemTime::from(state.first_timestamp))
            .unwrap_or_default()
            .as_secs_f64()
    };
    Ok(Backlog {
        pending: info.num_pending,
        ack_pending: info.num_ack_pending as u64,
        redelivered: info.num_redelivered as u64,
        oldest_age_seconds,
    })
}

/// Sets the backlog gauges.
fn export_backlog(b: &Backlog) {
    metrics::gauge!("signer_backlog_pending_messages").set(b.pending as f64);
    metrics::gauge!("signer_backlog_ack_pending_messages").set(b.ack_pending as f64);
    metrics::gauge!("signer_backlog_redelivered_messages").set(b.redelivered as f64);
    metrics::gauge!("signer_backlog_oldest_age_seconds").set(b.oldest_age_seconds);
}

/// Sets the key gauges from the loaded keys and the shared revocation list.
pub fn export_keys(revocations: &dyn RevocationList, now: SystemTime) {
    for (name, key) in super::keys::snapshot() {
        if let Some(keyid) = &key.keyful_keyid {
            let revoked = revocations.revoked(keyid).is_some();
            metrics::gauge!("signer_key_revoked", "key" => name.clone()).set(if revoked {
                1.0
            } else {
                0.0
            });
        }
        if let Some((at, source)) = key.expires {
            metrics::gauge!("signer_key_certificate_expiry_seconds", "key" => name, "mode" => source.as_str())
                .set(super::keys::seconds_left(at, now));
        }
    }
}

/// Refreshes the gauges every [`INTERVAL`] until the task is aborted. A failed poll is
/// counted (`signer_backlog_poll_errors_total`) and logged at most once a minute; the
/// backlog gauges keep their last value (the alert on poll errors says they are stale).
pub fn spawn(
    js: jetstream::Context,
    stream: String,
    consumer: String,
    revocations: Arc<dyn RevocationList>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_logged: Option<tokio::time::Instant> = None;
        loop {
            tick.tick().await;
            export_keys(revocations.as_ref(), SystemTime::now());
            match poll_backlog(&js, &stream, &consumer).await {
                Ok(b) => export_backlog(&b),
                Err(e) => {
                    metrics::counter!("signer_backlog_poll_errors_total").increment(1);
                    if last_logged.is_none_or(|t| t.elapsed() >= Duration::from_secs(60)) {
                        last_logged = Some(tokio::time::Instant::now());
                        tracing::warn!(error = %e, "backlog poll failed; the backlog gauges are stale");
                    }
                }
            }
        }
    })
}
