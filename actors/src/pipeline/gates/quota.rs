//! The Quota actor: the plan's quota through its port (Redis, shared by all replicas), asked
//! in batches.
//!
//! # What the actor owns
//!
//! The batching of quota calls. Every job of the replica asks this one actor, so only it sees
//! the requests that arrive together and can send them to the store as one batch
//! ([`QuotaStore::acquire_many`]: one Redis round trip for the whole batch):
//!
//! - a request that finds a free lane (fewer than [`ACQUIRE_LANES`] batches in flight) is sent
//!   at once, alone if it is alone: no added latency when the gate is idle;
//! - requests that arrive while every lane is busy wait, in arrival order, and go out together
//!   when a lane frees, at most the store's [`QuotaStore::batch_max`] in one batch
//!   (`gates.quota.batch_max` with the Redis and in-memory stores, default 64);
//! - releases are batched the same way on a lane of their own ([`QuotaStore::release_many`]),
//!   one release batch at a time, of up to [`RELEASE_BATCH_MAX`] (a release is one cheap
//!   command, and the release lane must keep up with every acquire lane); the releases still
//!   waiting when the actor stops are given back in `post_stop` (within 500 ms);
//! - every caller gets its own answer. A waiting request whose caller has gone (its call
//!   timed out, its job was cut off) is dropped before it is sent, so it charges nothing; a
//!   grant whose caller has gone is released at once; a batch whose callers have all gone, or
//!   that outlives the longest of their deadlines, is abandoned (its lane is free again), so a
//!   store that hangs never wedges the actor for longer than its callers wait.
//!
//! A batch that panics makes the actor fail (its callers see the actor die and their jobs are
//! retried); the supervisor restarts it.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::FutureExt;
use ractor::{Actor, ActorProcessingErr, ActorRef, MessagingErr, RpcReplyPort};

use crate::error::SignerError;
use crate::ports::{QuotaGrant, QuotaRelease, QuotaRequest, QuotaStore};

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
    /// A batch this actor sent has finished (made only by the actor itself).
    Done(BatchDone),
}

/// That a batch of the actor has finished; only the actor makes one.
pub struct BatchDone(Lane);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lane {
    Acquire,
    Release,
}

/// Acquire batches in flight at once. Two: a batch can be on its way while the answers of
/// the previous one are read, yet requests that arrive meanwhile still wait and go together.
pub const ACQUIRE_LANES: usize = 2;

/// Most releases in one release batch. Far more than `batch_max`: a release is one cheap
/// command (`ZREM`), and the one release lane must keep up with every acquire lane, or
/// slots would stay taken after their jobs ended.
pub const RELEASE_BATCH_MAX: usize = 4096;

/// How long a stopping actor waits to give back the releases it still holds.
const FLUSH_ON_STOP: Duration = Duration::from_millis(500);

/// How often a batch in flight checks whether all its callers have gone.
const GONE_CHECK: Duration = Duration::from_millis(50);

/// How long a batch may run when none of its callers has a deadline (in-process callers),
/// and how long a release batch may run.
const UNBOUNDED_LIMIT: Duration = Duration::from_secs(30);

type Reply = RpcReplyPort<Result<QuotaGrant, SignerError>>;

/// A request waiting for a lane.
struct Waiting {
    request: QuotaRequest,
    reply: Reply,
    /// When its caller stops waiting (`None`: the call has no timeout).
    deadline: Option<Instant>,
}

pub struct Quota;

/// What the Quota actor owns: its port, the requests and releases waiting for a batch, and
/// the lanes in flight.
pub struct QuotaState {
    port: Arc<dyn QuotaStore>,
    batch_max: usize,
    waiting: VecDeque<Waiting>,
    /// Acquire batches in flight.
    acquiring: usize,
    releases: Vec<QuotaRelease>,
    /// Whether a release batch is in flight.
    releasing: bool,
}

impl QuotaState {
    /// Sends waiting requests while a lane is free: each batch takes the oldest, at most
    /// `batch_max`, skipping those whose caller has gone.
    fn send_acquires(&mut self, myself: &ActorRef<QuotaMsg>) {
        while self.acquiring < ACQUIRE_LANES && !self.waiting.is_empty() {
            let mut batch = Vec::with_capacity(self.waiting.len().min(self.batch_max));
            while batch.len() < self.batch_max {
                let Some(w) = self.waiting.pop_front() else {
                    break;
                };
                if w.reply.is_closed() {
                    // The caller gave up before its request was sent: charge nothing.
                    continue;
                }
                batch.push(w);
            }
            if batch.is_empty() {
                break;
            }
            self.acquiring += 1;
            metrics::counter!("signer_quota_batches_total").increment(1);
            metrics::counter!("signer_quota_batched_requests_total").increment(batch.len() as u64);
            let port = self.port.clone();
            let me = myself.clone();
            spawn_guarded(myself, Lane::Acquire, acquire_batch(port, batch, me));
        }
    }

    /// Sends the waiting releases when no release batch is in flight.
    fn send_releases(&mut self, myself: &ActorRef<QuotaMsg>) {
        if self.releasing || self.releases.is_empty() {
            return;
        }
        let take = self.releases.len().min(RELEASE_BATCH_MAX);
        let batch: Vec<QuotaRelease> = self.releases.drain(..take).collect();
        self.releasing = true;
        let port = self.port.clone();
        spawn_guarded(myself, Lane::Release, async move {
            // A store that hangs loses these releases (Redis slots then end with their
            // lease), never the lane.
            let _ = tokio::time::timeout(UNBOUNDED_LIMIT, port.release_many(&batch)).await;
        });
    }
}

/// Runs `work` in a task; then tells the actor the batch of `lane` is done, or, if `work`
/// panicked, that the actor has failed.
fn spawn_guarded(
    myself: &ActorRef<QuotaMsg>,
    lane: Lane,
    work: impl std::future::Future<Output = ()> + Send + 'static,
) {
    let me = myself.clone();
    tokio::spawn(async move {
        let msg = match std::panic::AssertUnwindSafe(work).catch_unwind().await {
            Ok(()) => QuotaMsg::Done(BatchDone(lane)),
            Err(panic) => QuotaMsg::Failed(panic_text(panic.as_ref())),
        };
        let _ = me.cast(msg);
    });
}

fn panic_text(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "a quota batch panicked".to_owned()
    }
}

/// Sends one batch and answers each caller with its own result.
async fn acquire_batch(port: Arc<dyn QuotaStore>, batch: Vec<Waiting>, myself: ActorRef<QuotaMsg>) {
    let now = Instant::now();
    // The batch is worth waiting for as long as its most patient caller waits.
    let limit = batch
        .iter()
        .map(|w| {
            w.deadline
                .map_or(UNBOUNDED_LIMIT, |d| d.saturating_duration_since(now))
        })
        .max()
        .unwrap_or(UNBOUNDED_LIMIT);
    let (requests, replies): (Vec<QuotaRequest>, Vec<Reply>) =
        batch.into_iter().map(|w| (w.request, w.reply)).unzip();
    let answers = tokio::select! {
        answers = port.acquire_many(&requests) => Some(answers),
        () = tokio::time::sleep(limit) => None,
        () = callers_gone(&replies) => None,
    };
    let Some(answers) = answers else {
        // Abandoned. Whatever the store did with these requests is unknown; a Redis slot
        // taken meanwhile ends with its lease.
        let text = format!(
            "quota store gave no answer within {}",
            humantime::format_duration(limit)
        );
        for reply in replies {
            let _ = reply.send(Err(SignerError::Internal(text.clone())));
        }
        return;
    };
    let mut answers = answers.into_iter();
    for (request, reply) in requests.into_iter().zip(replies) {
        let answer = answers.next().unwrap_or_else(|| {
            Err(SignerError::Internal(
                "quota store gave fewer answers than requests".into(),
            ))
        });
        if let Err(MessagingErr::SendErr(Ok(QuotaGrant::Allowed))) = reply.send(answer) {
            // The caller gave up while its slot was being taken: give the slot back.
            let _ = myself.cast(QuotaMsg::Release {
                tenant: request.tenant,
                plan: request.plan,
            });
        }
    }
}

/// Resolves once every caller of a batch has stopped waiting for its answer.
async fn callers_gone(replies: &[Reply]) {
    loop {
        tokio::time::sleep(GONE_CHECK).await;
        if replies.iter().all(RpcReplyPort::is_closed) {
            return;
        }
    }
}

impl Actor for Quota {
    type Msg = QuotaMsg;
    type State = QuotaState;
    type Arguments = Arc<dyn QuotaStore>;

    async fn pre_start(
        &self,
        _: ActorRef<Self::Msg>,
        port: Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(QuotaState {
            batch_max: port.batch_max().max(1),
            port,
            waiting: VecDeque::new(),
            acquiring: 0,
            releases: Vec::new(),
            releasing: false,
        })
    }

    /// Gives back the releases still waiting (the actor stops with the pipeline, or fails):
    /// otherwise their slots would stay taken until their lease ends.
    async fn post_stop(
        &self,
        _: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        if !state.releases.is_empty() {
            let releases = std::mem::take(&mut state.releases);
            let _ = tokio::time::timeout(FLUSH_ON_STOP, state.port.release_many(&releases)).await;
        }
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            QuotaMsg::Acquire {
                tenant,
                plan,
                payload_bytes,
                signatures,
                reply,
            } => {
                let deadline = reply
                    .get_timeout()
                    .and_then(|t| Instant::now().checked_add(t));
                state.waiting.push_back(Waiting {
                    request: QuotaRequest {
                        tenant,
                        plan,
                        payload_bytes,
                        signatures,
                    },
                    reply,
                    deadline,
                });
                state.send_acquires(&myself);
            }
            QuotaMsg::Release { tenant, plan } => {
                state.releases.push(QuotaRelease { tenant, plan });
                state.send_releases(&myself);
            }
            QuotaMsg::Done(BatchDone(Lane::Acquire)) => {
                state.acquiring = state.acquiring.saturating_sub(1);
                state.send_acquires(&myself);
            }
            QuotaMsg::Done(BatchDone(Lane::Release)) => {
                state.releasing = false;
                state.send_releases(&myself);
            }
            QuotaMsg::Failed(e) => return Err(format!("quota check panicked: {e}").into()),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
