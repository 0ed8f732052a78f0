//! The job source: the durable pull consumer shared by every replica.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use async_nats::jetstream::consumer::pull::{MessagesError, MessagesErrorKind};
use async_nats::jetstream::{self, AckKind, stream};
use async_trait::async_trait;
use futures::StreamExt as _;
use signer_actors::ports::{Delivery, JobSource, JobSourceFactory, PortError};

use super::provision;
use crate::config::NatsConfig;

/// Opens pull streams on the durable consumer. `batch` bounds how many messages one
/// replica holds before it has capacity for them, `max_bytes` how many bytes of them: a
/// batch of `max_inflight` large bodies (256 of 600 KB) would otherwise be 150 MB on its
/// way at once, more than the client reads before the server drops it as a slow consumer.
///
/// replica holds before it has capacity for them.
///
/// Each [`open`](JobSourceFactory::open) looks the consumer up again (creating it when it is
/// missing, as provisioning does): the Intake reopens after a broken stream, and the
/// consumer may have been deleted or recreated meanwhile.
pub struct PullSourceFactory {
    /// The requests stream the consumer belongs to.
    pub requests: stream::Stream,
    /// The consumer's name and the settings it is created with.
    pub nats: NatsConfig,
    pub batch: usize,
    /// Max deliveries and ack wait of the consumer the pipeline was started with: a
    /// recreated consumer with other settings is used, and the difference logged.
    pub started_with: (u64, Duration),
    pub max_bytes: usize,
}

impl PullSourceFactory {
    /// Bytes one pull batch may carry: room for a few of the largest bodies, at least 8 MiB.
    pub fn batch_bytes(max_body_bytes: usize) -> usize {
        max_body_bytes.saturating_mul(4).max(8 << 20)
    }
}

/// The idle heartbeat asked of the server: two missed in a row (10 s without a message or
/// a heartbeat) mean the pull request is gone.
const HEARTBEAT: Duration = Duration::from_secs(5);

#[async_trait]
impl JobSourceFactory for PullSourceFactory {
    async fn open(&self) -> Result<Box<dyn JobSource>, PortError> {
        let consumer = provision::ensure_consumer(&self.requests, &self.nats)
            .await
            .map_err(PortError::transient)?;
        let settings = provision::consumer_settings(&consumer.cached_info().config);
        if settings != self.started_with {
            tracing::warn!(
                consumer = %self.nats.consumer,
                max_deliver = settings.0, ack_wait_ms = settings.1.as_millis() as u64,
                started_max_deliver = self.started_with.0, started_ack_wait_ms = self.started_with.1.as_millis() as u64,
                "the consumer's settings differ from those this replica started with; restart it to use them for leases and the last delivery"
            );
        }
        let messages = consumer
            .stream()
            .max_messages_per_batch(self.batch)
            .max_bytes_per_batch(self.max_bytes)
            .heartbeat(HEARTBEAT)
            .expires(Duration::from_secs(30))
            .messages()
            .await
            .map_err(|e| PortError::transient(e).context("opening the pull stream"))?;
        Ok(Box::new(PullSource { messages }))
    }
}

/// Whether a pull stream that reported `e` can still deliver. Missed heartbeats (the
/// server lost our pull request: its node died, the consumer's leader moved), a deleted
/// consumer, no responders (no JetStream, or no consumer, behind the subject), a push
/// consumer under our name and a refused pull request do not get better by asking the same
/// stream again: they are permanent for it, and the Intake opens a new one. A failed pull
/// request or an unexpected status may pass on the next call: transient.
fn pull_error(e: MessagesError) -> PortError {
    match e.kind() {
        MessagesErrorKind::MissingHeartbeat
        | MessagesErrorKind::ConsumerDeleted
        | MessagesErrorKind::NoResponders
        | MessagesErrorKind::PushBasedConsumer
        | MessagesErrorKind::RequestLimitExceeded => {
            PortError::permanent(e).context("pull stream broken")
        }
        MessagesErrorKind::Pull | MessagesErrorKind::Other => {
            PortError::transient(e).context("pulling")
        }
    }
}

struct PullSource {
    messages: jetstream::consumer::pull::Stream,
}

#[async_trait]
impl JobSource for PullSource {
    async fn next(&mut self) -> Option<Result<Box<dyn Delivery>, PortError>> {
        let next = self.messages.next().await?;
        Some(match next {
            Ok(message) => {
                let (seq, delivered, published) = match message.info() {
                    Ok(i) => (
                        i.stream_sequence,
                        u64::try_from(i.delivered).unwrap_or(1),
                        SystemTime::from(i.published),
                    ),
                    Err(e) => (0, 1, delivery_time_fallback(&e)),
                };
                Ok(Box::new(JsDelivery {
                    message,
                    seq,
                    delivered,
                    published,
                }) as Box<dyn Delivery>)
            }
            Err(e) => Err(pull_error(e)),
        })
    }
}

/// Set once the fallback below has been logged: one line says the broker's metadata is
/// missing, not one per job.
static FALLBACK_LOGGED: AtomicBool = AtomicBool::new(false);

/// The publish time of a message whose JetStream metadata (the `$JS.ACK` reply subject)
/// cannot be read: the time of delivery, which judges the job as strictly as before the
/// broker's timestamp was used. Logged once per process.
fn delivery_time_fallback(error: &dyn std::fmt::Display) -> SystemTime {
    if !FALLBACK_LOGGED.swap(true, Ordering::Relaxed) {
        tracing::warn!(%error, "JetStream message metadata unreadable: judging jobs at delivery time instead of publish time (logged once)");
    }
    SystemTime::now()
}

struct JsDelivery {
    message: jetstream::Message,
    seq: u64,
    delivered: u64,
    published: SystemTime,
}

#[async_trait]
impl Delivery for JsDelivery {
    fn subject(&self) -> &str {
        self.message.subject.as_str()
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.message.headers.as_ref()?.get(name).map(|v| v.as_str())
    }

    fn body(&self) -> &[u8] {
        &self.message.payload
    }

    fn stream_sequence(&self) -> u64 {
        self.seq
    }

    fn delivered(&self) -> u64 {
        self.delivered
    }

    fn published(&self) -> SystemTime {
        self.published
    }

    async fn ack(&self) -> Result<(), PortError> {
        self.message.ack().await.map_err(PortError::transient)
    }

    async fn in_progress(&self) -> Result<(), PortError> {
        self.message
            .ack_with(AckKind::Progress)
            .await
            .map_err(PortError::transient)
    }

    async fn nak(&self, delay: Duration) -> Result<(), PortError> {
        self.message
            .ack_with(AckKind::Nak(Some(delay)))
            .await
            .map_err(PortError::transient)
    }

    async fn term(&self) -> Result<(), PortError> {
        self.message
            .ack_with(AckKind::Term)
            .await
            .map_err(PortError::transient)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stream_that_lost_its_pull_request_or_consumer_is_broken_a_failed_pull_is_not() {
        for kind in [
            MessagesErrorKind::MissingHeartbeat,
            MessagesErrorKind::ConsumerDeleted,
            MessagesErrorKind::NoResponders,
            MessagesErrorKind::PushBasedConsumer,
            MessagesErrorKind::RequestLimitExceeded,
        ] {
            let e = pull_error(MessagesError::new(kind));
            assert!(e.is_permanent(), "{kind:?}: {e}");
            assert!(e.to_string().starts_with("pull stream broken: "), "{e}");
        }
        for kind in [MessagesErrorKind::Pull, MessagesErrorKind::Other] {
            assert!(
                !pull_error(MessagesError::new(kind)).is_permanent(),
                "{kind:?}"
            );
        }
        assert_eq!(
            pull_error(MessagesError::new(MessagesErrorKind::MissingHeartbeat)).to_string(),
            "pull stream broken: missed idle heartbeat"
        );
    }

    #[test]
    fn unreadable_metadata_falls_back_to_the_delivery_time_and_says_so_once() {
        let before = SystemTime::now();
        let first = delivery_time_fallback(&"no reply subject");
        let second = delivery_time_fallback(&"no reply subject");
        let after = SystemTime::now();
        assert!(before <= first && first <= second && second <= after);
        assert!(FALLBACK_LOGGED.load(Ordering::Relaxed), "logged (once)");
    }
}
