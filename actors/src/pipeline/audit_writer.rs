//! The AuditWriter: one hash chain per writer incarnation, batched. A batch is sealed and
//! sent in order, and the next batch is sealed only once the stream has stored the previous
//! one, so a chain never links to an event that was not stored.
//!
//! **Several events per message.** A batch's events are sealed grouped by subject
//! (`<prefix>.<tenant>.<decision>`) and each run of one subject is packed into messages of
//! at most `audit_batch_max` events and `audit_max_message_bytes` of body: a lone event is
//! its JSON object, several a JSON array. Every event keeps its own link, so each verifies
//! as if alone. A message's `Nats-Msg-Id` is its last event's hash, and the appends of its
//! events are answered with its stream sequence once it is stored.
//!
//! When messages of a batch are not stored (the stream lost its leader, the broker is
//! away), the writer keeps them, sealed, and sends the very same messages again after a
//! short backoff, ahead of anything newer, until the stream stores them: the chain goes on
//! where it was, with the same prevHash and writerSeq. A message that was stored although
//! its acknowledgement was lost comes back as a duplicate of its `Nats-Msg-Id` and the
//! stream keeps the first copy. A message of several events the stream refuses for good is
//! sent again as one message per event, on the same chain. The jobs waiting for these events are answered once
//! they are stored (or give up at their call timeout; the event is still stored, and the
//! job's retry of the append joins it: see below).
//!
//! A new chain, under a new writer name, is started only by a restarted writer (it cannot
//! see the end of the old one) and when the stream refuses a lone event for good (a permanent
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
//! refused for good is remembered the same way, with its error: a later Append with it is
//! answered with that error at once instead of being sealed again (it would be refused
//! again, and each lone refusal ends a chain). The memory belongs to one incarnation: a restarted writer knows no ids, and an
//! Append retried across a writer restart is sealed again onto the new chain.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

use super::{PipelineConfig, Shared};
use crate::audit::{AuditChain, AuditEvent};
use crate::ports::MessagePublisher;
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
    /// The batch in flight is settled: these messages of it were not stored, in chain
    /// order (empty when all were).
    Stored(Vec<Retry>),
}

/// A message of sealed events the stream has not stored yet (their callers wait in
/// [`Appends`]): one event, or a batch of events of one subject, in chain order.
pub struct Unstored {
    /// The events as sealed, with their append ids (to answer their callers, to split the
    /// message, or to seal them again onto a new chain after a permanent failure).
    events: Vec<(AppendId, Box<AuditEvent>)>,
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
    /// Refused for good: the error.
    refused: HashMap<AppendId, PortError>,
    /// When each stored or refused id was settled, oldest first.
    stored_at: VecDeque<(Instant, AppendId)>,
    /// How long a stored id is remembered.
    keep: Duration,
}

impl Appends {
    fn new(keep: Duration) -> Self {
        Appends {
            waiting: HashMap::new(),
            stored: HashMap::new(),
            refused: HashMap::new(),
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
        if let Some(error) = self.refused.get(&id) {
            metrics::counter!("signer_audit_appends_deduplicated_total").increment(1);
            let _ = reply.send(Err(error.clone()));
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

    /// The event of `id` will not be stored: answers its callers with `error`, and a
    /// later Append of `id` too.
    fn failed(&mut self, id: AppendId, error: PortError) {
        for reply in self.waiting.remove(&id).unwrap_or_default() {
            let _ = reply.send(Err(error.clone()));
        }
        let now = Instant::now();
        self.refused.insert(id, error);
        self.stored_at.push_back((now, id));
        self.forget_old(now);
    }

    fn forget_old(&mut self, now: Instant) {
        while let Some(&(at, id)) = self.stored_at.front() {
            if now.duration_since(at) < self.keep {
                break;
            }
            self.stored_at.pop_front();
            self.stored.remove(&id);
            self.refused.remove(&id);
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

/// What to do with a message of a batch that was not stored.
pub enum Retry {
    /// Send it again as it is (a transient failure).
    Resend(Unstored),
    /// The stream refused a message of several events for good: send each event again in
    /// a message of its own, on the same chain (each keeps its link), so that only an event
    /// refused on its own is lost.
    Split(Unstored),
    /// The stream refused a lone event for good (its job has been answered): the chain
    /// cannot go on through it, so the events after it move to a new chain.
    ChainEnds,
}

pub struct AuditWriter;

/// What the writer needs: its part of the configuration and the publisher.
#[derive(Clone)]
pub struct WriterArgs {
    pub worker_id: String,
    pub subject_prefix: String,
    pub batch_max: usize,
    pub flush_interval: Duration,
    pub max_message_bytes: usize,
    /// How long stored append ids are remembered (see the module header).
    pub keep_ids: Duration,
    pub publisher: Arc<dyn MessagePublisher>,
}

impl WriterArgs {
    pub fn new(cfg: &PipelineConfig, publisher: Arc<dyn MessagePublisher>) -> Self {
        WriterArgs {
            worker_id: cfg.worker_id.clone(),
            subject_prefix: cfg.audit_subject_prefix.clone(),
            batch_max: cfg.audit_batch_max.max(1),
            flush_interval: cfg.audit_flush_interval,
            max_message_bytes: cfg.audit_max_message_bytes,
            keep_ids: cfg.retry_budget + cfg.call_timeout.saturating_mul(2),
            publisher,
        }
    }

    /// The pipeline's writer: its configuration, and its (observed) publisher.
    pub(crate) fn of(shared: &Shared) -> Self {
        Self::new(&shared.cfg, shared.ports.publisher.clone())
    }
}

pub struct AuditState {
    shared: WriterArgs,
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

fn writer_name(shared: &WriterArgs, incarnation: u64) -> String {
    format!("{}-w{incarnation}", shared.worker_id)
}

/// An event sealed onto the chain, with its JSON.
struct Sealed {
    id: AppendId,
    event: Box<AuditEvent>,
    json: Vec<u8>,
}

/// Seals `event` onto `chain` and encodes it. The chain advances only when both succeed,
/// so an event that cannot be encoded leaves no gap.
fn seal(chain: &mut AuditChain, id: AppendId, event: AuditEvent) -> Result<Sealed, PortError> {
    let mut next = chain.clone();
    let sealed = next
        .seal(event)
        .map_err(|e| PortError::permanent(e.to_string()).context("audit event not encodable"))?;
    let json = serde_json::to_vec(&sealed)
        .map_err(|e| PortError::permanent(e.to_string()).context("audit encode"))?;
    *chain = next;
    Ok(Sealed {
        id,
        event: Box::new(sealed),
        json,
    })
}

/// Seals `events` onto `chain`, grouped by subject (a stable sort: the events of one flush
/// are concurrent decisions, so their chain order is free, and grouping makes the batches
/// per subject large), answering the callers of an event that cannot be sealed.
fn seal_all(
    appends: &Mutex<Appends>,
    chain: &mut AuditChain,
    mut events: Vec<(AppendId, Box<AuditEvent>)>,
) -> Vec<Sealed> {
    events.sort_by_cached_key(|(_, e)| e.subject_suffix());
    let mut sealed = Vec::with_capacity(events.len());
    for (id, event) in events {
        match seal(chain, id, *event) {
            Ok(s) => sealed.push(s),
            Err(e) => lock(appends).failed(id, e),
        }
    }
    sealed
}

/// The messages holding `sealed`, in order: runs of events of one subject, each message
/// at most `audit_batch_max` events and `audit_max_message_bytes` bytes of body. A lone
/// event is its JSON object, a batch a JSON array of them.
fn package(shared: &WriterArgs, sealed: Vec<Sealed>) -> Vec<Unstored> {
    let (max_events, max_bytes) = (shared.batch_max, shared.max_message_bytes);
    let mut out = Vec::new();
    let mut run: Vec<Sealed> = Vec::new();
    let mut run_subject = String::new();
    let mut run_bytes = 0;
    for s in sealed {
        let subject = s.event.subject_suffix();
        // a batch's body is its events' JSON, a comma between two, and the brackets
        let grown = run_bytes + s.json.len() + 1 + if run.is_empty() { 2 } else { 0 };
        if !run.is_empty()
            && (subject != run_subject || run.len() >= max_events || grown > max_bytes)
        {
            out.push(message(shared, &run_subject, std::mem::take(&mut run)));
            run_bytes = 0;
        }
        if run.is_empty() {
            run_subject = subject;
            run_bytes = 1;
        }
        run_bytes += s.json.len() + 1;
        run.push(s);
    }
    if !run.is_empty() {
        out.push(message(shared, &run_subject, run));
    }
    out
}

/// One message of `events` (at least one) on `<audit prefix>.<subject>`. Its `Nats-Msg-Id`
/// is the hash of its last event: unique per chain, and the same when the very same
/// message is sent again, so a copy stored twice is dropped.
fn message(shared: &WriterArgs, subject: &str, events: Vec<Sealed>) -> Unstored {
    let id = events
        .last()
        .map(|s| s.event.hash.clone())
        .unwrap_or_default();
    let body = match events.as_slice() {
        [one] => one.json.clone(),
        many => {
            let mut body =
                Vec::with_capacity(many.iter().map(|s| s.json.len() + 1).sum::<usize>() + 1);
            body.push(b'[');
            for (i, s) in many.iter().enumerate() {
                if i > 0 {
                    body.push(b',');
                }
                body.extend_from_slice(&s.json);
            }
            body.push(b']');
            body
        }
    };
    metrics::histogram!("signer_audit_batch_events").record(events.len() as f64);
    Unstored {
        message: OutMessage {
            subject: format!("{}.{subject}", shared.subject_prefix),
            headers: vec![
                ("Nats-Msg-Id".into(), id),
                ("Content-Type".into(), "application/json".into()),
            ],
            body,
        },
        events: events.into_iter().map(|s| (s.id, s.event)).collect(),
    }
}

/// Its events, encoded again (their JSON is what it was when sealed).
fn unseal(item: Unstored) -> Vec<Sealed> {
    item.events
        .into_iter()
        .filter_map(|(id, event)| {
            let json = serde_json::to_vec(&event).ok()?;
            Some(Sealed { id, event, json })
        })
        .collect()
}

/// A message the stream did not store: sent again after a transient failure; after a
/// permanent one, split into one message per event, or, for a lone event, its callers get
/// the error and the chain ends before it.
fn settle_failed(appends: &Mutex<Appends>, item: Unstored, error: PortError) -> Retry {
    if !error.is_permanent() {
        return Retry::Resend(item);
    }
    if item.events.len() > 1 {
        tracing::warn!(error = %error, events = item.events.len(), "the stream refused an audit batch for good; sending its events one by one");
        return Retry::Split(item);
    }
    tracing::warn!(error = %error, "the stream refused an audit event for good");
    for (id, _) in item.events {
        lock(appends).failed(id, error.clone());
    }
    Retry::ChainEnds
}

impl AuditWriter {
    /// Takes the messages of a batch that were not stored back, in chain order, for the
    /// next attempt. Events after a permanent refusal are sealed again onto a new chain.
    fn keep_unstored(state: &mut AuditState, failed: Vec<Retry>) {
        let mut moved: Option<Vec<(AppendId, Box<AuditEvent>)>> = None;
        for retry in failed {
            match (retry, moved.as_mut()) {
                (Retry::ChainEnds, None) => moved = Some(Vec::new()),
                (Retry::ChainEnds, Some(_)) => {}
                (Retry::Resend(item), None) => state.unstored.push(item),
                (Retry::Split(item), None) => {
                    for s in unseal(item) {
                        let single = package(&state.shared, vec![s]);
                        state.unstored.extend(single);
                    }
                }
                (Retry::Resend(item) | Retry::Split(item), Some(moved)) => {
                    moved.extend(item.events)
                }
            }
        }
        if let Some(events) = moved {
            state.chain = AuditChain::new(writer_name(&state.shared, next_incarnation()));
            tracing::warn!(writer = state.chain.worker(), "starting a new audit chain");
            let sealed = seal_all(&state.appends, &mut state.chain, events);
            state.unstored.extend(package(&state.shared, sealed));
        }
    }

    /// Sends the unstored messages again, then the pending events sealed onto the chain
    /// and packed into messages, in order; one batch at a time.
    async fn flush(myself: &ActorRef<AuditMsg>, state: &mut AuditState) {
        if state.in_flight || (state.pending.is_empty() && state.unstored.is_empty()) {
            return;
        }
        state.in_flight = true;
        let mut batch = std::mem::take(&mut state.unstored);
        let sealed = seal_all(
            &state.appends,
            &mut state.chain,
            std::mem::take(&mut state.pending),
        );
        batch.extend(package(&state.shared, sealed));
        let mut sent = Vec::with_capacity(batch.len());
        let mut unsent = Vec::new();
        let mut messages = batch.into_iter();
        for item in messages.by_ref() {
            match state.shared.publisher.send(item.message.clone()).await {
                Ok(ack) => sent.push((ack, item)),
                Err(e) => {
                    tracing::warn!(error = %e, "sending an audit message failed");
                    unsent.push(settle_failed(&state.appends, item, e));
                    break;
                }
            }
        }
        // After a send failure nothing more of the batch is sent: the rest stays in order.
        unsent.extend(messages.map(Retry::Resend));
        let me = myself.clone();
        let appends = state.appends.clone();
        tokio::spawn(async move {
            let mut failed = Vec::new();
            for (ack, item) in sent {
                match ack.await {
                    Ok(stored) => {
                        let mut appends = lock(&appends);
                        for (id, _) in &item.events {
                            appends.stored(*id, stored.stream_sequence);
                        }
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "an audit message was not stored");
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
    type Arguments = WriterArgs;

    async fn pre_start(
        &self,
        _: ActorRef<AuditMsg>,
        shared: WriterArgs,
    ) -> Result<AuditState, ActorProcessingErr> {
        // A restarted writer must not continue a chain it cannot see the end of: each
        // incarnation gets its own name.
        let incarnation = next_incarnation();
        Ok(AuditState {
            appends: Arc::new(Mutex::new(Appends::new(shared.keep_ids))),
            chain: AuditChain::new(writer_name(&shared, incarnation)),
            retry_delay: shared.flush_interval,
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
                // No linger (an interval of zero): send at once when no batch is in flight;
                // what arrives while one is forms the next batch.
                let now = state.pending.len() >= state.shared.batch_max
                    || (state.shared.flush_interval.is_zero() && !state.flush_scheduled);
                if now && state.unstored.is_empty() {
                    Self::flush(&myself, state).await;
                } else if !state.flush_scheduled && !state.in_flight && state.unstored.is_empty() {
                    // (while events are unstored, the retry's own flush is scheduled)
                    state.flush_scheduled = true;
                    myself.send_after(state.shared.flush_interval, || AuditMsg::Flush);
                }
            }
            AuditMsg::Flush => {
                state.flush_scheduled = false;
                Self::flush(&myself, state).await;
            }
            AuditMsg::Stored(failed) => {
                state.in_flight = false;
                if failed.is_empty() {
                    state.retry_delay = state.shared.flush_interval;
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
