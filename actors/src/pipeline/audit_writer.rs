//! The AuditWriter: one hash chain per writer incarnation, batched. A batch is sealed and
//! sent in order, and the next batch is sealed only once the stream has stored the previous
//! one, so a chain never links to an event that was not stored.
//!
//! When events of a batch are not stored (the stream lost its leader, the broker is away),
//! the writer keeps them, sealed, and sends the very same messages again after a short
//! backoff, ahead of anything newer, until the stream stores them: the chain goes on where
//! it was, with the same prevHash and writerSeq. An event that was stored although its
//! acknowledgement was lost comes back as a duplicate of its `Nats-Msg-Id` (its hash) and
//! the stream keeps the first copy. The jobs waiting for these events are answered once
//! they are stored (or give up at their call timeout; the event is still stored, and the
//! job's retry of the append joins it: see below).
//!
//! A new chain, under a new writer name, is started only by a restarted writer (it cannot
//! see the end of the old one) and when the stream refuses an event for good (a permanent
//! failure, e.g. over the broker's size limit): that job is answered with the error, and the
//! events sealed after it are sealed again onto the new chain, so no stored event links to
//! one that will never be stored.
//!
//! **An append is sealed once.** Every [`AuditMsg::Append`] carries an [`AppendId`]; a job
//! creates one per decision and sends it with each retry of that append (its call may time
//! out while the writer holds the event through a broker failover). The writer remembers
//! the ids it took: a second Append with an id whose event is pending, in flight or unstored
//! seals nothing and its caller is answered with the first one's outcome (the stream
//! sequence once stored, or the error if the stream refuses it for good); an Append with an
//! id already stored is answered at once with that sequence. The ids move with their
//! events onto a new chain. Stored ids are kept for `retry_budget + 2 × call_timeout` after
//! storage and then forgotten: every retry of an append is sent before its job's retry
//! budget ends, which is at most `call_timeout + retry_budget` after the first Append (so
//! after the event could first be stored); the second `call_timeout` covers an Append that
//! waited in the mailbox. A bound by time rather than by count holds for any throughput
//! (memory is that window's events, about 50 bytes each). An id whose event the stream
//! refused for good is forgotten, so a later Append with it is sealed again (nothing was
//! stored). The memory belongs to one incarnation: a restarted writer knows no ids, and an
//! Append retried across a writer restart is sealed again onto the new chain.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

use super::Shared;
use crate::audit::{AuditChain, AuditEvent};
use crate::ports::{OutMessage, PortError};

/// Where the stream sequence of a stored event goes.
pub type AuditReply = RpcReplyPort<Result<u64, PortError>>;

/// The longest wait between two attempts to store unstored events.
const RETRY_MAX: Duration = Duration::from_secs(2);

/// The identity of one append: the same across the retries of that append (see the module
/// header), a fresh one for every new event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AppendId(u64);

impl AppendId {
    /// A process-unique id.
    pub fn fresh() -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        AppendId(NEXT.fetch_add(1, Ordering::Relaxed))
    }
}

pub enum AuditMsg {
    /// Seal, store and answer with the stream sequence; an id already taken seals nothing
    /// and is answered with that append's outcome.
    Append(AppendId, Box<AuditEvent>, AuditReply),
    /// Time to send what is pending.
    Flush,
    /// The batch in flight is settled: these sealed events of it were not stored, in
    /// chain order (empty when all were).
    Stored(Vec<Retry>),
}

/// A sealed event the stream has not stored yet (its callers wait in [`Appends`]).
pub struct Unstored {
    id: AppendId,
    /// The event as sealed (to seal it again onto a new chain after a permanent failure).
    event: Box<AuditEvent>,
    message: OutMessage,
}

/// The appends the writer took, by id: who waits for the unsettled ones, and the stream
/// sequences of the stored ones for a late retry. Shared with the task awaiting a batch's
/// acknowledgements, which answers as each event is stored.
struct Appends {
    /// Taken and not settled (pending, in flight or unstored): the callers to answer.
    waiting: HashMap<AppendId, Vec<AuditReply>>,
    /// Stored: their stream sequences.
    stored: HashMap<AppendId, u64>,
    /// When each stored id was stored, oldest first.
    stored_at: VecDeque<(Instant, AppendId)>,
    /// How long a stored id is remembered.
    keep: Duration,
}

impl Appends {
    fn new(keep: Duration) -> Self {
        Appends {
            waiting: HashMap::new(),
            stored: HashMap::new(),
            stored_at: VecDeque::new(),
            keep,
        }
    }

    /// Takes an Append of `id`: `true` when it is new and its event is to be sealed;
    /// otherwise `reply` is answered now (stored) or joins the first caller (unsettled).
    fn take(&mut self, id: AppendId, reply: AuditReply) -> bool {
        self.forget_old(Instant::now());
        if let Some(&seq) = self.stored.get(&id) {
            metrics::counter!("signer_audit_appends_deduplicated_total").increment(1);
            let _ = reply.send(Ok(seq));
            return false;
        }
        if let Some(waiting) = self.waiting.get_mut(&id) {
            metrics::counter!("signer_audit_appends_deduplicated_total").increment(1);
            waiting.push(reply);
            return false;
        }
        self.waiting.insert(id, vec![reply]);
        true
    }

    /// The event of `id` is stored at `seq`: answers its callers and remembers it.
    fn stored(&mut self, id: AppendId, seq: u64) {
        for reply in self.waiting.remove(&id).unwrap_or_default() {
            let _ = reply.send(Ok(seq));
        }
        let now = Instant::now();
        self.stored.insert(id, seq);
        self.stored_at.push_back((now, id));
        self.forget_old(now);
    }

    /// The event of `id` will not be stored: answers its callers with `error`.
    fn failed(&mut self, id: AppendId, error: PortError) {
        for reply in self.waiting.remove(&id).unwrap_or_default() {
            let _ = reply.send(Err(error.clone()));
        }
    }

    fn forget_old(&mut self, now: Instant) {
        while let Some(&(at, id)) = self.stored_at.front() {
            if now.duration_since(at) < self.keep {
                break;
            }
            self.stored_at.pop_front();
            self.stored.remove(&id);
        }
    }
}

/// Locks the appends, also after a panic elsewhere (their maps stay consistent: each
/// change is a single insert or remove).
fn lock(appends: &Mutex<Appends>) -> std::sync::MutexGuard<'_, Appends> {
    appends
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// What to do with an event of a batch that was not stored.
pub enum Retry {
    /// Send it again as it is (a transient failure).
    Resend(Unstored),
    /// The stream refused an event for good (its job has been answered): the chain cannot
    /// go on through it, so the events after it move to a new chain.
    ChainEnds,
}

pub struct AuditWriter;

pub struct AuditState {
    shared: Arc<Shared>,
    chain: AuditChain,
    pending: Vec<(AppendId, Box<AuditEvent>)>,
    appends: Arc<Mutex<Appends>>,
    /// Sealed events to send again, before anything newer.
    unstored: Vec<Unstored>,
    /// The wait before the next attempt while events are unstored.
    retry_delay: Duration,
    flush_scheduled: bool,
    in_flight: bool,
}

/// Process-unique incarnation numbers, so two chains never share a writer name.
fn next_incarnation() -> u64 {
    static INCARNATIONS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    INCARNATIONS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

fn writer_name(shared: &Shared, incarnation: u64) -> String {
    format!("{}-w{incarnation}", shared.cfg.worker_id)
}

/// Seals `event` onto `chain` and encodes it as the message to store. The chain advances
/// only when both succeed, so an event that cannot be encoded leaves no gap.
fn seal(
    shared: &Shared,
    chain: &mut AuditChain,
    event: AuditEvent,
) -> Result<(AuditEvent, OutMessage), PortError> {
    let mut next = chain.clone();
    let sealed = next
        .seal(event)
        .map_err(|e| PortError::permanent(e.to_string()).context("audit event not encodable"))?;
    let body = serde_json::to_vec(&sealed)
        .map_err(|e| PortError::permanent(e.to_string()).context("audit encode"))?;
    *chain = next;
    let message = OutMessage {
        subject: format!("{}.{}", shared.cfg.audit_subject_prefix, sealed.tenant),
        headers: vec![
            ("Nats-Msg-Id".into(), sealed.hash.clone()),
            ("Content-Type".into(), "application/json".into()),
        ],
        body,
    };
    Ok((sealed, message))
}

/// An event the stream did not store: sent again after a transient failure; after a
/// permanent one its callers get the error and the chain ends before it.
fn settle_failed(appends: &Mutex<Appends>, item: Unstored, error: PortError) -> Retry {
    if error.is_permanent() {
        tracing::warn!(error = %error, "the stream refused an audit event for good");
        lock(appends).failed(item.id, error);
        Retry::ChainEnds
    } else {
        Retry::Resend(item)
    }
}

impl AuditWriter {
    /// Takes the events of a batch that was not stored back, in chain order, for the next
    /// attempt. Events after a permanent refusal are sealed again onto a new chain.
    fn keep_unstored(state: &mut AuditState, failed: Vec<Retry>) {
        let mut moved = false;
        for retry in failed {
            match retry {
                Retry::ChainEnds => {
                    if !moved {
                        moved = true;
                        state.chain =
                            AuditChain::new(writer_name(&state.shared, next_incarnation()));
                        tracing::warn!(writer = state.chain.worker(), "starting a new audit chain");
                    }
                }
                Retry::Resend(item) if !moved => state.unstored.push(item),
                Retry::Resend(Unstored { id, event, .. }) => {
                    match seal(&state.shared, &mut state.chain, *event) {
                        Ok((event, message)) => state.unstored.push(Unstored {
                            id,
                            event: Box::new(event),
                            message,
                        }),
                        Err(e) => lock(&state.appends).failed(id, e),
                    }
                }
            }
        }
    }

    /// Sends the unstored events again, then the pending ones sealed onto the chain, in
    /// order; one batch at a time.
    async fn flush(myself: &ActorRef<AuditMsg>, state: &mut AuditState) {
        if state.in_flight || (state.pending.is_empty() && state.unstored.is_empty()) {
            return;
        }
        state.in_flight = true;
        let mut batch = std::mem::take(&mut state.unstored);
        for (id, event) in std::mem::take(&mut state.pending) {
            match seal(&state.shared, &mut state.chain, *event) {
                Ok((event, message)) => batch.push(Unstored {
                    id,
                    event: Box::new(event),
                    message,
                }),
                Err(e) => lock(&state.appends).failed(id, e),
            }
        }
        let mut sent = Vec::with_capacity(batch.len());
        let mut unsent = Vec::new();
        let mut events = batch.into_iter();
        for item in events.by_ref() {
            match state
                .shared
                .ports
                .publisher
                .send(item.message.clone())
                .await
            {
                Ok(ack) => sent.push((ack, item)),
                Err(e) => {
                    tracing::warn!(error = %e, "sending an audit event failed");
                    unsent.push(settle_failed(&state.appends, item, e));
                    break;
                }
            }
        }
        // After a send failure nothing more of the batch is sent: the rest stays in order.
        unsent.extend(events.map(Retry::Resend));
        let me = myself.clone();
        let appends = state.appends.clone();
        tokio::spawn(async move {
            let mut failed = Vec::new();
            for (ack, item) in sent {
                match ack.await {
                    Ok(stored) => lock(&appends).stored(item.id, stored.stream_sequence),
                    Err(e) => {
                        tracing::debug!(error = %e, "an audit event was not stored");
                        failed.push(settle_failed(&appends, item, e));
                    }
                }
            }
            failed.extend(unsent);
            let _ = me.cast(AuditMsg::Stored(failed));
        });
    }
}

impl Actor for AuditWriter {
    type Msg = AuditMsg;
    type State = AuditState;
    type Arguments = Arc<Shared>;

    async fn pre_start(
        &self,
        _: ActorRef<AuditMsg>,
        shared: Arc<Shared>,
    ) -> Result<AuditState, ActorProcessingErr> {
        // A restarted writer must not continue a chain it cannot see the end of: each
        // incarnation gets its own name.
        let incarnation = next_incarnation();
        let keep = shared.cfg.retry_budget + shared.cfg.call_timeout.saturating_mul(2);
        Ok(AuditState {
            appends: Arc::new(Mutex::new(Appends::new(keep))),
            chain: AuditChain::new(writer_name(&shared, incarnation)),
            retry_delay: shared.cfg.audit_flush_interval,
            shared,
            pending: Vec::new(),
            unstored: Vec::new(),
            flush_scheduled: false,
            in_flight: false,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<AuditMsg>,
        msg: AuditMsg,
        state: &mut AuditState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            AuditMsg::Append(id, event, reply) => {
                if !lock(&state.appends).take(id, reply) {
                    return Ok(());
                }
                state.pending.push((id, event));
                if state.pending.len() >= state.shared.cfg.audit_batch_max
                    && state.unstored.is_empty()
                {
                    Self::flush(&myself, state).await;
                } else if !state.flush_scheduled && !state.in_flight && state.unstored.is_empty() {
                    // (while events are unstored, the retry's own flush is scheduled)
                    state.flush_scheduled = true;
                    myself.send_after(state.shared.cfg.audit_flush_interval, || AuditMsg::Flush);
                }
            }
            AuditMsg::Flush => {
                state.flush_scheduled = false;
                Self::flush(&myself, state).await;
            }
            AuditMsg::Stored(failed) => {
                state.in_flight = false;
                if failed.is_empty() {
                    state.retry_delay = state.shared.cfg.audit_flush_interval;
                    Self::flush(&myself, state).await;
                } else {
                    Self::keep_unstored(state, failed);
                    metrics::counter!("signer_audit_batches_failed_total").increment(1);
                    tracing::warn!(
                        writer = state.chain.worker(),
                        unstored = state.unstored.len(),
                        retry_in_ms = state.retry_delay.as_millis() as u64,
                        "audit events not stored; sending them again on the same chain"
                    );
                    if !state.flush_scheduled {
                        state.flush_scheduled = true;
                        myself.send_after(state.retry_delay, || AuditMsg::Flush);
                    }
                    state.retry_delay = state
                        .retry_delay
                        .saturating_mul(2)
                        .max(Duration::from_millis(50))
                        .min(RETRY_MAX);
                }
            }
        }
        Ok(())
    }
}
