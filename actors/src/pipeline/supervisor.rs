//! SignerSupervisor: starts every child linked to itself and restarts the one that fails.
//! Restarts are rate-limited: more than `MAX_RESTARTS` in `RESTART_WINDOW` stops the tree
//! (the process then exits and the orchestrator restarts it) instead of spinning.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ractor::{Actor, ActorCell, ActorProcessingErr, ActorRef, SupervisionEvent};

use super::Shared;
use super::audit_writer::{AuditWriter, WriterArgs};
use super::gates::{Entitlement, Provenance, Quota};
use super::intake::Intake;
use super::keyring::Keyring;

const MAX_RESTARTS: usize = 50;
const RESTART_WINDOW: Duration = Duration::from_secs(60);

/// The children, by role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Child {
    Intake,
    Entitlement,
    Quota,
    Provenance,
    Keyring,
    AuditWriter,
}

impl Child {
    const ALL: [Child; 6] = [
        Child::AuditWriter,
        Child::Entitlement,
        Child::Quota,
        Child::Provenance,
        Child::Keyring,
        Child::Intake,
    ];

    fn name(self) -> &'static str {
        match self {
            Child::Intake => "intake",
            Child::Entitlement => "entitlement",
            Child::Quota => "quota",
            Child::Provenance => "provenance",
            Child::Keyring => "keyring",
            Child::AuditWriter => "audit_writer",
        }
    }
}

pub enum SupervisorMsg {
    /// Start (or restart) a child.
    Start(Child),
}

pub struct SignerSupervisor;

pub struct SupervisorState {
    shared: Arc<Shared>,
    children: Vec<(ractor::ActorId, Child)>,
    restarts: Vec<Instant>,
}

impl SignerSupervisor {
    async fn start_child(
        myself: &ActorRef<SupervisorMsg>,
        state: &mut SupervisorState,
        child: Child,
    ) -> Result<(), ActorProcessingErr> {
        let sup = myself.get_cell();
        let shared = state.shared.clone();
        let ports = &shared.ports;
        let id = match child {
            Child::Intake => Actor::spawn_linked(None, Intake, shared.clone(), sup)
                .await
                .map(|(a, _)| a.get_id()),
            Child::Entitlement => {
                Actor::spawn_linked(None, Entitlement, ports.entitlement.clone(), sup)
                    .await
                    .map(|(a, _)| {
                        shared.write_refs().entitlement = Some(a.clone());
                        a.get_id()
                    })
            }
            Child::Quota => Actor::spawn_linked(None, Quota, ports.quota.clone(), sup)
                .await
                .map(|(a, _)| {
                    shared.write_refs().quota = Some(a.clone());
                    a.get_id()
                }),
            Child::Provenance => {
                let limits = shared.cfg.provenance_limits;
                Actor::spawn_linked(None, Provenance, (ports.provenance.clone(), limits), sup)
                    .await
                    .map(|(a, _)| {
                        shared.write_refs().provenance = Some(a.clone());
                        a.get_id()
                    })
            }
            Child::Keyring => Actor::spawn_linked(None, Keyring, shared.clone(), sup)
                .await
                .map(|(a, _)| a.get_id()),
            Child::AuditWriter => {
                Actor::spawn_linked(None, AuditWriter, WriterArgs::of(&shared), sup)
                    .await
                    .map(|(a, _)| {
                        shared.write_refs().audit = Some(a.clone());
                        a.get_id()
                    })
            }
        };
        match id {
            Ok(id) => {
                state.children.push((id, child));
                Ok(())
            }
            Err(e) => {
                // pre_start failed (e.g. the job source could not be opened): try again shortly.
                tracing::warn!(actor = child.name(), error = %e, "actor did not start; retrying");
                Self::note_restart(state, child)?;
                myself.send_after(Duration::from_millis(500), move || {
                    SupervisorMsg::Start(child)
                });
                Ok(())
            }
        }
    }

    fn note_restart(state: &mut SupervisorState, child: Child) -> Result<(), ActorProcessingErr> {
        let now = Instant::now();
        state
            .restarts
            .retain(|t| now.duration_since(*t) < RESTART_WINDOW);
        state.restarts.push(now);
        metrics::counter!("signer_actor_restarts_total", "actor" => child.name()).increment(1);
        if state.restarts.len() > MAX_RESTARTS {
            return Err(format!(
                "more than {MAX_RESTARTS} actor restarts in {RESTART_WINDOW:?}; giving up"
            )
            .into());
        }
        Ok(())
    }

    fn clear_ref(shared: &Shared, child: Child) {
        let mut refs = shared.write_refs();
        match child {
            Child::Entitlement => refs.entitlement = None,
            Child::Quota => refs.quota = None,
            Child::Provenance => refs.provenance = None,
            Child::AuditWriter => refs.audit = None,
            Child::Keyring => refs.keys.clear(),
            Child::Intake => shared.set_intake(super::IntakeState::Stopped),
        }
    }
}

impl Actor for SignerSupervisor {
    type Msg = SupervisorMsg;
    type State = SupervisorState;
    type Arguments = Arc<Shared>;

    async fn pre_start(
        &self,
        myself: ActorRef<SupervisorMsg>,
        shared: Arc<Shared>,
    ) -> Result<SupervisorState, ActorProcessingErr> {
        for child in Child::ALL {
            myself.send_message(SupervisorMsg::Start(child))?;
        }
        Ok(SupervisorState {
            shared,
            children: Vec::new(),
            restarts: Vec::new(),
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<SupervisorMsg>,
        msg: SupervisorMsg,
        state: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        let SupervisorMsg::Start(child) = msg;
        if state
            .shared
            .draining
            .load(std::sync::atomic::Ordering::Acquire)
            && child == Child::Intake
        {
            return Ok(());
        }
        Self::start_child(&myself, state, child).await
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<SupervisorMsg>,
        evt: SupervisionEvent,
        state: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        let (cell, reason): (ActorCell, String) = match evt {
            SupervisionEvent::ActorFailed(cell, err) => (cell, err.to_string()),
            SupervisionEvent::ActorTerminated(cell, _, reason) => {
                (cell, reason.unwrap_or_else(|| "stopped".into()))
            }
            _ => return Ok(()),
        };
        let Some(pos) = state
            .children
            .iter()
            .position(|(id, _)| *id == cell.get_id())
        else {
            return Ok(());
        };
        let (_, child) = state.children.remove(pos);
        Self::clear_ref(&state.shared, child);
        if state
            .shared
            .draining
            .load(std::sync::atomic::Ordering::Acquire)
        {
            return Ok(());
        }
        tracing::error!(actor = child.name(), %reason, "actor stopped; restarting it");
        Self::note_restart(state, child)?;
        myself.send_after(Duration::from_millis(20), move || {
            SupervisorMsg::Start(child)
        });
        Ok(())
    }
}
