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
//! they are stored (or give up at their call timeout; the event is still stored).
//!
//! A new chain, under a new writer name, is started only by a restarted writer (it cannot
//! see the end of the old one) and when the stream refuses an event for good (a permanent
//! failure, e.g. over the broker's size limit): that job is answered with the error, and the
//! events sealed after it are sealed again onto the new chain, so no stored event links to
//! one that will never be stored.

use std::sync::Arc;
use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

use super::Shared;
use crate::audit::{AuditChain, AuditEvent};
use crate::ports::{OutMessage, PortError};

/// Where the stream sequence of a stored event goes.
pub type AuditReply = RpcReplyPort<Result<u64, PortError>>;

/// The longest wait between two attempts to store unstored events.
const RETRY_MAX: Duration = Duration::from_secs(2);

pub enum AuditMsg {
    /// Seal, store and answer with the stream sequence.
    Append(Box<AuditEvent>, AuditReply),
    /// Time to send what is pending.
    Flush,
    /// The batch in flight is settled: these sealed events of it were not stored, in
    /// chain order (empty when all were).
    Stored(Vec<Retry>),
}

/// A sealed event the stream has not stored yet, and the job waiting for it.
pub struct Unstored {
    /// The event as sealed (to seal it again onto a new chain after a permanent failure).
    event: Box<AuditEvent>,
    message: OutMessage,
    reply: AuditReply,
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
    pending: Vec<(Box<AuditEvent>, AuditReply)>,
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
/// permanent one its job gets the error and the chain ends before it.
fn settle_failed(item: Unstored, error: PortError) -> Retry {
    if error.is_permanent() {
        tracing::warn!(error = %error, "the stream refused an audit event for good");
        let _ = item.reply.send(Err(error));
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
                Retry::Resend(Unstored { event, reply, .. }) => {
                    match seal(&state.shared, &mut state.chain, *event) {
                        Ok((event, message)) => state.unstored.push(Unstored {
                            event: Box::new(event),
                            message,
                            reply,
                        }),
                        Err(e) => {
                            let _ = reply.send(Err(e));
                        }
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
        for (event, reply) in std::mem::take(&mut state.pending) {
            match seal(&state.shared, &mut state.chain, *event) {
                Ok((event, message)) => batch.push(Unstored {
                    event: Box::new(event),
                    message,
                    reply,
                }),
                Err(e) => {
                    let _ = reply.send(Err(e));
                }
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
                    unsent.push(settle_failed(item, e));
                    break;
                }
            }
        }
        // After a send failure nothing more of the batch is sent: the rest stays in order.
        unsent.extend(events.map(Retry::Resend));
        let me = myself.clone();
        tokio::spawn(async move {
            let mut failed = Vec::new();
            for (ack, item) in sent {
                match ack.await {
                    Ok(stored) => {
                        let _ = item.reply.send(Ok(stored.stream_sequence));
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "an audit event was not stored");
                        failed.push(settle_failed(item, e));
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
        Ok(AuditState {
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
            AuditMsg::Append(event, reply) => {
                state.pending.push((event, reply));
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
