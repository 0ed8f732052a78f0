//! Publishing results and audit events with JetStream acknowledgements.

use async_nats::jetstream::{self, stream};
use async_trait::async_trait;
use signer_actors::ports::{
    AckFuture, MessagePublisher, MessageTooLarge, OutMessage, PortError, Stored,
};

use super::to_headers;

pub struct JsPublisher {
    pub js: jetstream::Context,
    /// The results stream, to fetch an earlier result by sequence.
    pub results: stream::Stream,
}

#[async_trait]
impl MessagePublisher for JsPublisher {
    async fn send(&self, message: OutMessage) -> Result<AckFuture, PortError> {
        let bytes = message.body.len()
            + message
                .headers
                .iter()
                .map(|(k, v)| k.len() + v.len() + 4)
                .sum::<usize>();
        let ack = self
            .js
            .publish_with_headers(
                message.subject,
                to_headers(&message.headers),
                message.body.into(),
            )
            .await
            .map_err(|e| publish_error(e, bytes).context("publish"))?;
        Ok(Box::pin(async move {
            let ack = ack
                .await
                .map_err(|e| publish_error(e, bytes).context("publish ack"))?;
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
            Err(e) => {
                Err(PortError::transient(e).context(format!("fetching result {stream_sequence}")))
            }
        }
    }
}

/// Whether a failed publish can succeed when tried again. A message over the server's
/// `max_payload`, or one its stream refuses for its size, fails the same way every time;
/// everything else (no stream leader yet, a timed-out ack, a broken connection, too many
/// acks pending) can pass on a retry. A refusal for size has a [`MessageTooLarge`] source
/// of `bytes` (the message's size), so the pipeline can answer `payload_too_large`.
fn publish_error(e: jetstream::context::PublishError, bytes: usize) -> PortError {
    use async_nats::jetstream::ErrorCode;
    use jetstream::context::PublishErrorKind;
    let too_large = match e.kind() {
        PublishErrorKind::MaxPayloadExceeded => true,
        PublishErrorKind::Other => std::error::Error::source(&e)
            .and_then(|s| s.downcast_ref::<async_nats::jetstream::Error>())
            .is_some_and(|api| {
                matches!(
                    api.error_code(),
                    ErrorCode::STREAM_MESSAGE_EXCEEDS_MAXIMUM
                        | ErrorCode::STREAM_HEADER_EXCEEDS_MAXIMUM
                )
            }),
        _ => false,
    };
    if too_large {
        PortError::permanent(MessageTooLarge {
            bytes,
            source: Box::new(e),
        })
    } else {
        PortError::transient(e)
    }
}

// Against the machine's NATS: `--features integration`.
#[cfg(all(test, feature = "integration"))]
mod tests {
    use super::*;
    use signer_actors::ports::PortErrorKind;

    /// Against the local NATS: what the broker refuses for its size is permanent, a subject no
    /// stream listens on is transient (a stream may get a leader, or be created, meanwhile).
    #[tokio::test]
    async fn oversized_publishes_are_permanent_and_missing_streams_transient() {
        let client = async_nats::connect("nats://127.0.0.1:4222")
            .await
            .expect("NATS on 127.0.0.1:4222");
        let js = jetstream::new(client.clone());
        let mut rnd = [0u8; 4];
        let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut rnd);
        let id = format!("TEST_PUB_{}_{}", std::process::id(), hex::encode(rnd));
        let subject = format!("{}.results", id.to_ascii_lowercase());
        let results = js
            .create_stream(stream::Config {
                name: id.clone(),
                subjects: vec![subject.clone()],
                max_message_size: 1024,
                ..Default::default()
            })
            .await
            .unwrap();
        let publisher = JsPublisher {
            js: js.clone(),
            results,
        };
        let message = |subject: &str, len: usize| OutMessage {
            subject: subject.into(),
            headers: vec![],
            body: vec![b'x'; len],
        };

        let stored = publisher.send(message(&subject, 10)).await.unwrap().await;
        assert!(stored.is_ok(), "{stored:?}");

        // over the server's max_payload: refused before it is sent
        let over = client.server_info().max_payload + 1;
        let e = publisher.send(message(&subject, over)).await.err().unwrap();
        assert_eq!(e.kind(), PortErrorKind::Permanent, "{e}");
        assert!(e.is_too_large(), "{e}");
        assert!(e.to_string().starts_with("publish: "), "{e}");

        // over the stream's max_msg_size: refused in the PubAck
        let e = publisher
            .send(message(&subject, 4096))
            .await
            .unwrap()
            .await
            .unwrap_err();
        assert_eq!(e.kind(), PortErrorKind::Permanent, "{e}");
        assert!(e.is_too_large(), "{e}");

        // no stream for the subject: no responders, worth retrying
        let e = publisher
            .send(message(&format!("{subject}.nowhere"), 10))
            .await
            .unwrap()
            .await
            .unwrap_err();
        assert_eq!(e.kind(), PortErrorKind::Transient, "{e}");
        assert!(!e.is_too_large(), "{e}");

        js.delete_stream(&id).await.unwrap();
    }
}
