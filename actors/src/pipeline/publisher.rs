//! The Publisher: results to `sign.completed` / `sign.failed`. Messages are handed to the
//! stream in arrival order; acknowledgements are awaited concurrently.

use std::sync::Arc;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

use crate::ports::{MessagePublisher, OutMessage, PortError, Stored};

pub enum PublisherMsg {
    /// Publish and answer once the stream has stored it.
    Publish(OutMessage, RpcReplyPort<Result<Stored, PortError>>),
    /// Fetch a stored result and publish it again (same `Nats-Msg-Id`).
    Republish(u64, RpcReplyPort<Result<Option<Stored>, PortError>>),
}

pub struct Publisher;

impl Actor for Publisher {
    type Msg = PublisherMsg;
    type State = Arc<dyn MessagePublisher>;
    type Arguments = Arc<dyn MessagePublisher>;

    async fn pre_start(
        &self,
        _: ActorRef<PublisherMsg>,
        port: Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(port)
    }

    async fn handle(
        &self,
        _: ActorRef<PublisherMsg>,
        msg: PublisherMsg,
        port: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            PublisherMsg::Publish(message, reply) => match port.send(message).await {
                Ok(ack) => {
                    tokio::spawn(async move {
                        let _ = reply.send(ack.await);
                    });
                }
                Err(e) => {
                    let _ = reply.send(Err(e));
                }
            },
            PublisherMsg::Republish(seq, reply) => {
                let port = port.clone();
                tokio::spawn(async move {
                    let outcome = async {
                        let Some(message) = port.fetch_result(seq).await? else {
                            return Ok(None);
                        };
                        port.send(message).await?.await.map(Some)
                    };
                    let _ = reply.send(outcome.await);
                });
            }
        }
        Ok(())
    }
}
