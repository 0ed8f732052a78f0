//! The Entitlement actor: OpTok, DPoP and PoE checks through its port.

use std::sync::Arc;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

use super::failer;
use crate::pipeline::spawn_reply;
use crate::ports::{EntitlementVerdict, EntitlementVerifier, GateDenial, GateInput};

/// Messages of the Entitlement actor.
pub enum EntitlementMsg {
    Verify(
        GateInput,
        RpcReplyPort<Result<EntitlementVerdict, GateDenial>>,
    ),
    /// A check panicked.
    Failed(String),
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
