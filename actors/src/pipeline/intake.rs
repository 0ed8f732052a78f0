//! The Intake: pulls from the durable consumer and starts one job task per message, never
//! more than `max_inflight` at once (the next message is pulled only when a slot is free,
//! so memory does not grow with the backlog).

use std::sync::Arc;
use std::sync::atomic::Ordering;

use ractor::{Actor, ActorProcessingErr, ActorRef};

use super::{Shared, job};

pub enum IntakeMsg {
    /// The pull loop ended (source closed or failed): fail so the supervisor restarts us.
    SourceClosed(String),
}

pub struct Intake;

pub struct IntakeState {
    pull_loop: tokio::task::JoinHandle<()>,
}

impl Actor for Intake {
    type Msg = IntakeMsg;
    type State = IntakeState;
    type Arguments = Arc<Shared>;

    async fn pre_start(
        &self,
        myself: ActorRef<IntakeMsg>,
        shared: Arc<Shared>,
    ) -> Result<IntakeState, ActorProcessingErr> {
        let source = shared
            .ports
            .source
            .open()
            .await
            .map_err(|e| format!("opening the job source: {e}"))?;
        shared.intake_ready.store(true, Ordering::Release);
        let pull_loop = tokio::spawn(pull(shared, source, myself));
        Ok(IntakeState { pull_loop })
    }

    async fn post_stop(
        &self,
        _: ActorRef<IntakeMsg>,
        state: &mut IntakeState,
    ) -> Result<(), ActorProcessingErr> {
        state.pull_loop.abort();
        Ok(())
    }

    async fn handle(
        &self,
        _: ActorRef<IntakeMsg>,
        msg: IntakeMsg,
        _: &mut IntakeState,
    ) -> Result<(), ActorProcessingErr> {
        let IntakeMsg::SourceClosed(reason) = msg;
        Err(format!("job source closed: {reason}").into())
    }
}

async fn pull(
    shared: Arc<Shared>,
    mut source: Box<dyn crate::ports::JobSource>,
    intake: ActorRef<IntakeMsg>,
) {
    let reason = loop {
        let permit = tokio::select! {
            _ = shared.stop_intake.notified() => return,
            permit = shared.inflight.clone().acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => return,
            },
        };
        if shared.draining.load(Ordering::Acquire) {
            return;
        }
        let next = tokio::select! {
            _ = shared.stop_intake.notified() => return,
            next = source.next() => next,
        };
        match next {
            Some(Ok(delivery)) => {
                let job_shared = shared.clone();
                tokio::spawn(async move {
                    let running = job_shared.running.fetch_add(1, Ordering::AcqRel) + 1;
                    metrics::gauge!("signer_inflight").set(running as f64);
                    job::run(&job_shared, delivery).await;
                    let running = job_shared.running.fetch_sub(1, Ordering::AcqRel) - 1;
                    metrics::gauge!("signer_inflight").set(running as f64);
                    drop(permit);
                });
            }
            Some(Err(e)) => {
                tracing::warn!(error = %e, "pulling a job failed");
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
            None => break "the consumer's message stream ended".to_string(),
        }
    };
    shared.intake_ready.store(false, Ordering::Release);
    let _ = intake.cast(IntakeMsg::SourceClosed(reason));
}
