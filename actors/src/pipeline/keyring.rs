//! The Keyring supervises one KeySigner actor per configured key. A key actor serialises
//! access to its backend (one HSM session, one YubiKey), so a slow or broken key never
//! blocks the others. A backend that becomes unavailable fails its actor; the Keyring
//! reloads the key through the [`KeyFactory`] and starts a new actor.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ractor::{Actor, ActorCell, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};

use super::Shared;
use crate::keys::{KeyError, KeySignature, KeySigner};

/// Messages of a KeySigner actor.
pub enum KeyMsg {
    /// Sign these PAE bytes.
    Sign(Arc<[u8]>, RpcReplyPort<Result<KeySignature, KeyError>>),
}

/// One key.
pub struct KeySignerActor;

/// A key actor's backend and the revocation list it consults before every signature.
pub struct KeyState {
    key: Arc<dyn KeySigner>,
    revocations: Arc<dyn crate::ports::RevocationList>,
}

impl Actor for KeySignerActor {
    type Msg = KeyMsg;
    type State = KeyState;
    type Arguments = KeyState;

    async fn pre_start(
        &self,
        _: ActorRef<KeyMsg>,
        state: Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(state)
    }

    async fn handle(
        &self,
        _: ActorRef<KeyMsg>,
        msg: KeyMsg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let KeyMsg::Sign(message, reply) = msg;
        let key = &state.key;
        // Checked before every signature: a revocation reaches every replica's keys
        // through the shared list, without a restart.
        let keyid = key.identity().keyid.clone();
        if let Some(reason) = state.revocations.revoked(&keyid) {
            let _ = reply.send(Err(KeyError::Revoked(format!(
                "key {} ({keyid}) is revoked: {reason}",
                key.name()
            ))));
            return Ok(());
        }
        let started = Instant::now();
        let outcome = key.sign(&message).await;
        let source = key.identity().source.as_str();
        metrics::histogram!("signer_sign_duration_seconds", "key" => key.name().to_string(), "source" => source)
            .record(started.elapsed().as_secs_f64());
        let unavailable = matches!(outcome, Err(KeyError::Unavailable(_)));
        if let Ok(sig) = &outcome {
            metrics::counter!("signer_key_usage_total", "keyid" => sig.identity.keyid.clone())
                .increment(1);
        }
        let error = outcome.as_ref().err().map(ToString::to_string);
        let _ = reply.send(outcome);
        if unavailable {
            // Fail so the Keyring reloads the backend (new session, re-opened device).
            return Err(format!(
                "key {} unavailable: {}",
                key.name(),
                error.unwrap_or_default()
            )
            .into());
        }
        Ok(())
    }
}

/// Messages of the Keyring.
pub enum KeyringMsg {
    /// (Re)load a key and start its actor.
    Load(String),
}

pub struct Keyring;

pub struct KeyringState {
    shared: Arc<Shared>,
    /// Actor id -> key name, to know which key a failed child was.
    children: HashMap<ractor::ActorId, String>,
    /// Consecutive failed loads per key, for the retry delay.
    failures: HashMap<String, u32>,
}

impl Keyring {
    fn retry_delay(failures: u32) -> Duration {
        Duration::from_millis(200u64.saturating_mul(1 << failures.min(6)))
    }
}

impl Actor for Keyring {
    type Msg = KeyringMsg;
    type State = KeyringState;
    type Arguments = Arc<Shared>;

    async fn pre_start(
        &self,
        myself: ActorRef<KeyringMsg>,
        shared: Arc<Shared>,
    ) -> Result<KeyringState, ActorProcessingErr> {
        let names = shared.ports.keys.names();
        shared.write_refs().keys_expected = names.len();
        for name in names {
            myself.send_message(KeyringMsg::Load(name))?;
        }
        Ok(KeyringState {
            shared,
            children: HashMap::new(),
            failures: HashMap::new(),
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<KeyringMsg>,
        msg: KeyringMsg,
        state: &mut KeyringState,
    ) -> Result<(), ActorProcessingErr> {
        let KeyringMsg::Load(name) = msg;
        match state.shared.ports.keys.load(&name).await {
            Ok(key) => {
                let (actor, _) = Actor::spawn_linked(
                    None,
                    KeySignerActor,
                    KeyState {
                        key,
                        revocations: state.shared.ports.revocations.clone(),
                    },
                    myself.get_cell(),
                )
                .await?;
                state.children.insert(actor.get_id(), name.clone());
                state.failures.remove(&name);
                state.shared.write_refs().keys.insert(name.clone(), actor);
                tracing::info!(key = %name, "key loaded");
            }
            Err(e) => {
                let n = state.failures.entry(name.clone()).or_default();
                *n += 1;
                let delay = Self::retry_delay(*n);
                tracing::warn!(key = %name, error = %e, retry_in_ms = delay.as_millis() as u64, "key not loaded");
                myself.send_after(delay, move || KeyringMsg::Load(name));
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<KeyringMsg>,
        evt: SupervisionEvent,
        state: &mut KeyringState,
    ) -> Result<(), ActorProcessingErr> {
        let (cell, reason): (ActorCell, String) = match evt {
            SupervisionEvent::ActorFailed(cell, err) => (cell, err.to_string()),
            SupervisionEvent::ActorTerminated(cell, _, reason) => {
                (cell, reason.unwrap_or_default())
            }
            _ => return Ok(()),
        };
        if let Some(name) = state.children.remove(&cell.get_id()) {
            state.shared.write_refs().keys.remove(&name);
            if !state
                .shared
                .draining
                .load(std::sync::atomic::Ordering::Acquire)
            {
                tracing::warn!(key = %name, %reason, "key actor stopped; reloading the key");
                metrics::counter!("signer_actor_restarts_total", "actor" => "key").increment(1);
                myself.send_after(Duration::from_millis(50), move || KeyringMsg::Load(name));
            }
        }
        Ok(())
    }
}
