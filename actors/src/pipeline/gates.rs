//! The three gate actors. Each owns its port and answers checks concurrently: a check that
//! waits on the network (Redis, a licensing service, a registry) never holds up the next.
//! A check that panics makes the actor fail; its supervisor restarts it.

use std::sync::Arc;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

use super::spawn_reply;
use crate::error::SignerError;
use crate::ports::{
    EntitlementVerdict, EntitlementVerifier, GateDenial, GateInput, ProvenanceGrant, QuotaGrant,
    QuotaStore, ReleaseVerifier,
};

/// Messages of the Entitlement actor.
pub enum EntitlementMsg {
    Verify(
        GateInput,
        RpcReplyPort<Result<EntitlementVerdict, GateDenial>>,
    ),
    /// A check panicked.
    Failed(String),
}

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

/// Messages of the Provenance actor.
pub enum ProvenanceMsg {
    Verify {
        repository: String,
        image_digest: String,
        reply: RpcReplyPort<Result<ProvenanceGrant, SignerError>>,
    },
    Failed(String),
}

fn failer<M: ractor::Message>(
    myself: &ActorRef<M>,
    wrap: fn(String) -> M,
) -> impl FnOnce(String) + Send + 'static {
    let me = myself.clone();
    move |e| {
        let _ = me.cast(wrap(e));
    }
}

pub struct Entitlement;

impl Actor for Entitlement {
    type Msg = EntitlementMsg;
    type State = Arc<dyn EntitlementVerifier>;
    type Arguments = Arc<dyn EntitlementVerifier>;

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
            EntitlementMsg::Verify(input, reply) => {
                let port = port.clone();
                spawn_reply(
                    reply,
                    async move { port.verify(&input).await },
                    failer(&myself, EntitlementMsg::Failed),
                );
                Ok(())
            }
            EntitlementMsg::Failed(e) => Err(format!("entitlement check panicked: {e}").into()),
        }
    }
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

pub struct Provenance;

impl Actor for Provenance {
    type Msg = ProvenanceMsg;
    type State = Arc<dyn ReleaseVerifier>;
    type Arguments = Arc<dyn ReleaseVerifier>;

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
            ProvenanceMsg::Verify {
                repository,
                image_digest,
                reply,
            } => {
                let port = port.clone();
                spawn_reply(
                    reply,
                    async move { port.verify(&repository, &image_digest).await },
                    failer(&myself, ProvenanceMsg::Failed),
                );
                Ok(())
            }
            ProvenanceMsg::Failed(e) => Err(format!("provenance check panicked: {e}").into()),
        }
    }
}
