//! The job source: the durable pull consumer shared by every replica.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use async_nats::jetstream::{self, AckKind, consumer::PullConsumer};
use async_trait::async_trait;
use futures::StreamExt as _;
use signer_actors::ports::{Delivery, JobSource, JobSourceFactory, PortError};

/// Opens pull streams on the durable consumer. `batch` bounds how many messages one
/// replica holds before it has capacity for them, `max_bytes` how many bytes of them: a
/// batch of `max_inflight` large bodies (256 of 600 KB) would otherwise be 150 MB on its
/// way at once, more than the client reads before the server drops it as a slow consumer.
pub struct PullSourceFactory {
    pub consumer: PullConsumer,
    pub batch: usize,
    pub max_bytes: usize,
}

impl PullSourceFactory {
    /// Bytes one pull batch may carry: room for a few of the largest bodies, at least 8 MiB.
    pub fn batch_bytes(max_body_bytes: usize) -> usize {
        max_body_bytes.saturating_mul(4).max(8 << 20)
    }
}

#[async_trait]
impl JobSourceFactory for PullSourceFactory {
    async fn open(&self) -> Result<Box<dyn JobSource>, PortError> {
        let messages = self
            .consumer
            .stream()
            .max_messages_per_batch(self.batch)
            .max_bytes_per_batch(self.max_bytes)
            .heartbeat(Duration::from_secs(5))
            .expires(Duration::from_secs(30))
            .messages()
            .await
            .map_err(|e| PortError::transient(e).context("opening the pull stream"))?;
        Ok(Box::new(PullSource { messages }))
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
            Err(e) => Err(PortError::transient(e).context("pulling")),
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
    fn unreadable_metadata_falls_back_to_the_delivery_time_and_says_so_once() {
        let before = SystemTime::now();
        let first = delivery_time_fallback(&"no reply subject");
        let second = delivery_time_fallback(&"no reply subject");
        let after = SystemTime::now();
        assert!(before <= first && first <= second && second <= after);
        assert!(FALLBACK_LOGGED.load(Ordering::Relaxed), "logged (once)");
    }
}
