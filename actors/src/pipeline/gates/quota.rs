//! The Quota actor: the plan's quota through its port (Redis, shared by all replicas).

use std::sync::Arc;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

use super::failer;
use crate::error::SignerError;
use crate::pipeline::spawn_reply;
use crate::ports::{QuotaGrant, QuotaStore};

/// Messages of the Quota actor.
pub enum QuotaMsg {
    Acquire {
        tenant: String,
        plan: String,
        payload_bytes: usize,
        /// Signatures the job makes (the units charged).
        signatures: u32,
        reply: RpcReplyPort<Result<QuotaGrant, SignerError>>,
    },
    Release {
        tenant: String,
        plan: String,
    },
    Failed(String),
}

pub struct Quota;

impl Actor for Quota {
    type Msg = QuotaMsg;
    type State = Arc<dyn QuotaStore>;
    type Arguments = Arc<dyn QuotaStore>;

    async fn pre_start(
        &self,
        _: ActorRef<Self::Msg>,
        port: Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(port)
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        port: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            QuotaMsg::Acquire {
                tenant,
                plan,
                payload_bytes,
                signatures,
                reply,
            } => {
                let port = port.clone();
                spawn_reply(
                    reply,
                    async move {
                        port.acquire(&tenant, &plan, payload_bytes, signatures)
                            .await
                    },
                    failer(&myself, QuotaMsg::Failed),
                );
                Ok(())
            }
            QuotaMsg::Release { tenant, plan } => {
                let port = port.clone();
                tokio::spawn(async move { port.release(&tenant, &plan).await });
                Ok(())
            }
            QuotaMsg::Failed(e) => Err(format!("quota check panicked: {e}").into()),
        }
    }
}
