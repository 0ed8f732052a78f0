//! The Intake: pulls from the durable consumer and starts one job task per message, never
//! more than `max_inflight` at once (the next message is pulled only when a slot is free,
//! so memory does not grow with the backlog).
//!
//! A pull subscription can break without ending: after its NATS node died, a subscription
//! that kept its old pull request reported `missed idle heartbeat` every 10 s and delivered
//! nothing while the replica looked healthy. So the Intake replaces a broken subscription by
//! itself: when the source reports an error that means "this stream is broken" (a
//! [permanent](crate::ports::PortError::is_permanent) error, see [`JobSource::next`]), when
//! [`MAX_TRANSIENT_ERRORS`] transient errors follow each other without a delivery, or when
//! the stream ends, it drops the stream and opens a new one through
//! [`JobSourceFactory::open`](crate::ports::JobSourceFactory::open) with bounded backoff.
//! While it does, readiness says so ([`IntakeState`]). Each replacement is counted in
//! `signer_intake_reopened_total` and logged once.
//!
//! Jobs already running are not affected (they settle through their own message). Messages
//! the old subscription had fetched but not handed out come back after AckWait.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef};

use super::health::IntakeState;
use super::{Shared, job};
use crate::ports::JobSource;

/// Transient errors in a row, without a delivery between them, after which the stream is
/// treated as broken: a stream that only ever fails is broken whatever it says.
pub(crate) const MAX_TRANSIENT_ERRORS: u32 = 3;
/// Pause after a transient error before asking the stream again.
const ERROR_PAUSE: Duration = Duration::from_millis(200);
/// Wait before reopening a broken stream, and first delay between attempts to open the
/// source; doubles up to [`REOPEN_BACKOFF_MAX`].
const REOPEN_BACKOFF_FIRST: Duration = Duration::from_millis(100);
/// Longest delay between attempts to open the source.
const REOPEN_BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Time limit of one attempt to open the source (a server that does not answer).
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);

pub enum IntakeMsg {
    /// The pull loop panicked: fail so the supervisor restarts us.
    PullLoopDied(String),
}

pub struct Intake;

pub struct IntakeActorState {
    pull_loop: tokio::task::AbortHandle,
}

impl Actor for Intake {
    type Msg = IntakeMsg;
    type State = IntakeActorState;
    type Arguments = Arc<Shared>;

    async fn pre_start(
        &self,
        myself: ActorRef<IntakeMsg>,
        shared: Arc<Shared>,
    ) -> Result<IntakeActorState, ActorProcessingErr> {
        shared.set_intake(IntakeState::initial());
        let task = tokio::spawn(run(shared));
        let pull_loop = task.abort_handle();
        tokio::spawn(async move {
            if let Err(e) = task.await
                && e.is_panic()
            {
                let _ = myself.cast(IntakeMsg::PullLoopDied(e.to_string()));
            }
        });
        Ok(IntakeActorState { pull_loop })
    }

    async fn post_stop(
        &self,
        _: ActorRef<IntakeMsg>,
        state: &mut IntakeActorState,
    ) -> Result<(), ActorProcessingErr> {
        state.pull_loop.abort();
        Ok(())
    }

    async fn handle(
        &self,
        _: ActorRef<IntakeMsg>,
        msg: IntakeMsg,
        _: &mut IntakeActorState,
    ) -> Result<(), ActorProcessingErr> {
        let IntakeMsg::PullLoopDied(reason) = msg;
        Err(format!("pull loop died: {reason}").into())
    }
}

/// How a pull stream stopped being used.
#[derive(Debug, PartialEq, Eq)]
enum PullEnd {
    /// Draining or shutting down.
    Stopping,
    /// The stream is broken and must be replaced; says why.
    Broken(String),
}

/// Opens the source, pulls until the stream breaks, replaces it, and so on until stopped.
async fn run(shared: Arc<Shared>) {
    let mut broken: Option<String> = None;
    loop {
        let Some(mut source) = open(&shared, broken.as_deref()).await else {
            break;
        };
        if let Some(reason) = broken.take() {
            metrics::counter!("signer_intake_reopened_total").increment(1);
            tracing::info!(broken = %reason, "job source reopened");
        }
        shared.set_intake(IntakeState::Open);
        match pull(&shared, source.as_mut()).await {
            PullEnd::Stopping => break,
            PullEnd::Broken(reason) => {
                tracing::warn!(error = %reason, "job source broken; replacing the pull subscription");
                shared.set_intake(IntakeState::Reopening {
                    broken: reason.clone(),
                    attempts: 0,
                    last_error: None,
                });
                broken = Some(reason);
            }
        }
    }
    shared.set_intake(IntakeState::Stopped);
}

/// True once a shutdown has begun.
fn stopping(shared: &Shared) -> bool {
    shared.draining.load(Ordering::Acquire)
}

/// Opens the source, retrying with bounded backoff; `None` when stopping first. `broken`
/// is why the previous stream was dropped (`None` at startup). The first failure is logged;
/// later ones only show in readiness, so an outage does not flood the log.
async fn open(shared: &Shared, broken: Option<&str>) -> Option<Box<dyn JobSource>> {
    let mut delay = REOPEN_BACKOFF_FIRST;
    let mut attempts: u32 = 0;
    // After a break, not at once: a server that just deleted the consumer may still be
    // removing its files, and one that just lost a node may still be electing a leader.
    if broken.is_some() {
        tokio::select! {
            _ = shared.stop_intake.notified() => return None,
            _ = tokio::time::sleep(REOPEN_BACKOFF_FIRST) => {}
        }
    }
    loop {
        if stopping(shared) {
            return None;
        }
        let attempt = tokio::select! {
            _ = shared.stop_intake.notified() => return None,
            r = tokio::time::timeout(OPEN_TIMEOUT, shared.ports.source.open()) => r,
        };
        let error = match attempt {
            Ok(Ok(source)) => return Some(source),
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("no answer within {OPEN_TIMEOUT:?}"),
        };
        attempts = attempts.saturating_add(1);
        if attempts == 1 {
            tracing::warn!(%error, "opening the job source failed; retrying with backoff");
        } else {
            tracing::debug!(%error, attempts, "opening the job source failed again");
        }
        shared.set_intake(match broken {
            None => IntakeState::Opening {
                attempts,
                last_error: Some(error),
            },
            Some(b) => IntakeState::Reopening {
                broken: b.to_string(),
                attempts,
                last_error: Some(error),
            },
        });
        tokio::select! {
            _ = shared.stop_intake.notified() => return None,
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(REOPEN_BACKOFF_MAX);
    }
}

/// Takes messages from `source` and starts a job for each, while a slot is free, until
/// stopping or the stream is broken.
async fn pull(shared: &Arc<Shared>, source: &mut dyn JobSource) -> PullEnd {
    let mut transient_errors: u32 = 0;
    loop {
        let permit = tokio::select! {
            _ = shared.stop_intake.notified() => return PullEnd::Stopping,
            permit = shared.inflight.clone().acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => return PullEnd::Stopping,
            },
        };
        if stopping(shared) {
            return PullEnd::Stopping;
        }
        let next = tokio::select! {
            _ = shared.stop_intake.notified() => return PullEnd::Stopping,
            next = source.next() => next,
        };
        match next {
            Some(Ok(delivery)) => {
                transient_errors = 0;
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
            Some(Err(e)) if e.is_permanent() => return PullEnd::Broken(e.to_string()),
            Some(Err(e)) => {
                transient_errors += 1;
                if transient_errors >= MAX_TRANSIENT_ERRORS {
                    return PullEnd::Broken(format!(
                        "{transient_errors} errors in a row without a message, the last: {e}"
                    ));
                }
                tracing::warn!(error = %e, "pulling a job failed");
                drop(permit);
                tokio::select! {
                    _ = shared.stop_intake.notified() => return PullEnd::Stopping,
                    _ = tokio::time::sleep(ERROR_PAUSE) => {}
                }
            }
            None => return PullEnd::Broken("the consumer's message stream ended".into()),
        }
    }
}

#[cfg(test)]
#[path = "intake_tests.rs"]
mod tests;
