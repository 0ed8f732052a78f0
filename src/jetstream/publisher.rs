//! Publishing results and audit events with JetStream acknowledgements.

use async_nats::jetstream::{self, stream};
use async_trait::async_trait;
use signer_actors::ports::{AckFuture, MessagePublisher, OutMessage, PortError, Stored};

use super::to_headers;

pub struct JsPublisher {
    pub js: jetstream::Context,
    /// The results stream, to fetch an earlier result by sequence.
    pub results: stream::Stream,
}

#[async_trait]
impl MessagePublisher for JsPublisher {
    async fn send(&self, message: OutMessage) -> Result<AckFuture, PortError> {
        let ack = self
            .js
            .publish_with_headers(
                message.subject,
                to_headers(&message.headers),
                message.body.into(),
            )
            .await
            .map_err(|e| PortError(format!("publish: {e}")))?;
        Ok(Box::pin(async move {
            let ack = ack
                .await
                .map_err(|e| PortError(format!("publish ack: {e}")))?;
            Ok(Stored {
                stream_sequence: ack.sequence,
                duplicate: ack.duplicate,
            })
        }))
    }

    async fn fetch_result(&self, stream_sequence: u64) -> Result<Option<OutMessage>, PortError> {
        match self.results.get_raw_message(stream_sequence).await {
            Ok(m) => Ok(Some(OutMessage {
                subject: m.subject.to_string(),
                headers: m
                    .headers
                    .iter()
                    .flat_map(|(k, vs)| {
                        vs.iter()
                            .map(move |v| (k.to_string(), v.as_str().to_string()))
                    })
                    .collect(),
                body: m.payload.to_vec(),
            })),
            Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => Ok(None),
            Err(e) => Err(PortError(format!("fetching result {stream_sequence}: {e}"))),
        }
    }
}
