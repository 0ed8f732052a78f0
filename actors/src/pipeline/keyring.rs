//! The Keyring supervises a pool of KeySigner actors per configured key (one by default,
//! [`KeyFactory::pool_size`]). A key actor serialises access to its backend (one HSM
//! session, one YubiKey), so a slow or broken key never blocks the others, and a pool of
//! them signs that many jobs at once. A backend that becomes unavailable fails its actor;
//! the Keyring reloads that pool member alone through the [`KeyFactory`] and starts a new
//! actor in its place, while its siblings keep signing.
//!
//! [`KeyFactory`]: crate::ports::KeyFactory
//! [`KeyFactory::pool_size`]: crate::ports::KeyFactory::pool_size

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use ractor::{
    Actor, ActorCell, ActorId, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent,
};

use super::Shared;
use crate::keys::{KeyError, KeySignature, KeySigner};

/// Messages of a KeySigner actor.
pub(crate) enum KeyMsg {
    /// Sign these PAE bytes.
    Sign(Arc<[u8]>, RpcReplyPort<Result<KeySignature, KeyError>>),
}

/// One key.
struct KeySignerActor;

/// A key actor's backend and the revocation list it consults before every signature.
struct KeyState {
    key: Arc<dyn KeySigner>,
    revocations: Arc<dyn crate::ports::RevocationList>,
}

/// One key actor on its own, outside a pipeline: the actor and message a Keyring pool member
/// is, for measuring what the actor path costs beside the backend's own call
/// (`stella-signer-tools bench keys`). Stopped when dropped.
pub struct StandaloneKeyActor(pub(super) ActorRef<KeyMsg>);

impl StandaloneKeyActor {
    /// Starts a key actor for `key`, checking `revocations` before every signature.
    pub async fn spawn(
        key: Arc<dyn KeySigner>,
        revocations: Arc<dyn crate::ports::RevocationList>,
    ) -> Result<Self, ractor::SpawnErr> {
        let (actor, _) = Actor::spawn(None, KeySignerActor, KeyState { key, revocations }).await?;
        Ok(StandaloneKeyActor(actor))
    }

    /// Signs `pae` through the actor, as a job does. An actor that stopped or failed answers
    /// [`KeyError::Unavailable`].
    pub async fn sign(&self, pae: Arc<[u8]>) -> Result<KeySignature, KeyError> {
        match self.0.call(|r| KeyMsg::Sign(pae, r), None).await {
            Ok(ractor::rpc::CallResult::Success(outcome)) => outcome,
            Ok(other) => Err(KeyError::Unavailable(format!(
                "key actor: {}",
                if other.is_timeout() {
                    "timed out"
                } else {
                    "stopped"
                }
            ))),
            Err(e) => Err(KeyError::Unavailable(format!("key actor: {e}"))),
        }
    }
}

impl Drop for StandaloneKeyActor {
    fn drop(&mut self) {
        self.0.stop(None);
    }
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
        // through the shared list, without a restart. A keyless key checks its own
        // certificate (by the same list): it replaces a revoked one instead of refusing.
        let identity = key.identity();
        let keyid = identity.keyid.clone();
        if identity.mode == crate::keys::KeyMode::Keyful
            && let Some(reason) = state.revocations.revoked(&keyid)
        {
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

/// The actors of one key: one place per pool member, empty while that member is
/// (re)loaded. Jobs take the live members in turn.
pub(crate) struct KeyPool {
    members: Vec<Option<ActorRef<KeyMsg>>>,
    /// Round-robin cursor, advanced by every pick (under the shared read lock).
    next: AtomicUsize,
}

impl KeyPool {
    /// A pool of `size` members (at least one), none loaded yet.
    pub(crate) fn new(size: usize) -> Self {
        KeyPool {
            members: vec![None; size.max(1)],
            next: AtomicUsize::new(0),
        }
    }

    /// Whether every member is loaded (the key counts as ready only then).
    pub(crate) fn is_full(&self) -> bool {
        self.members.iter().all(Option::is_some)
    }

    /// The next live member in turn; `None` when no member is loaded.
    pub(crate) fn pick(&self) -> Option<ActorRef<KeyMsg>> {
        let n = self.members.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        (0..n).find_map(|i| self.members[start.wrapping_add(i) % n].clone())
    }

    fn set(&mut self, slot: usize, actor: ActorRef<KeyMsg>) {
        if let Some(member) = self.members.get_mut(slot) {
            *member = Some(actor);
        }
    }

    /// Empties `slot` if it still holds the actor `id`.
    fn clear(&mut self, slot: usize, id: ActorId) {
        if let Some(member) = self.members.get_mut(slot)
            && member.as_ref().is_some_and(|a| a.get_id() == id)
        {
            *member = None;
        }
    }
}

/// Messages of the Keyring.
pub enum KeyringMsg {
    /// (Re)load one pool member of a key (key name, pool slot) and start its actor.
    Load(String, usize),
}

pub struct Keyring;

pub struct KeyringState {
    shared: Arc<Shared>,
    /// Actor id -> (key name, pool slot), to know which member a failed child was.
    children: HashMap<ActorId, (String, usize)>,
    /// Consecutive failed loads per pool member, for the retry delay.
    failures: HashMap<(String, usize), u32>,
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
        // every pool with all its slots empty, then one load per slot
        let mut loads = Vec::new();
        {
            let mut refs = shared.write_refs();
            for name in shared.ports.keys.names() {
                let pool = KeyPool::new(shared.ports.keys.pool_size(&name));
                loads.extend((0..pool.members.len()).map(|slot| (name.clone(), slot)));
                refs.keys.insert(name, pool);
            }
        }
        for (name, slot) in loads {
            myself.send_message(KeyringMsg::Load(name, slot))?;
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
        let KeyringMsg::Load(name, slot) = msg;
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
                state.children.insert(actor.get_id(), (name.clone(), slot));
                state.failures.remove(&(name.clone(), slot));
                // the pools were made with every slot in pre_start
                if let Some(pool) = state.shared.write_refs().keys.get_mut(&name) {
                    pool.set(slot, actor);
                }
                tracing::info!(key = %name, pool_slot = slot, "key loaded");
            }
            Err(e) => {
                let n = state.failures.entry((name.clone(), slot)).or_default();
                *n += 1;
                let delay = Self::retry_delay(*n);
                tracing::warn!(key = %name, pool_slot = slot, error = %e, retry_in_ms = delay.as_millis() as u64, "key not loaded");
                myself.send_after(delay, move || KeyringMsg::Load(name, slot));
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
        if let Some((name, slot)) = state.children.remove(&cell.get_id()) {
            // Only this member goes: its siblings keep signing while it is reloaded.
            if let Some(pool) = state.shared.write_refs().keys.get_mut(&name) {
                pool.clear(slot, cell.get_id());
            }
            if !state.shared.draining.load(Ordering::Acquire) {
                tracing::warn!(key = %name, pool_slot = slot, %reason, "key actor stopped; reloading the key");
                metrics::counter!("signer_actor_restarts_total", "actor" => "key").increment(1);
                myself.send_after(Duration::from_millis(50), move || {
                    KeyringMsg::Load(name, slot)
                });
            }
        }
        Ok(())
    }
}
