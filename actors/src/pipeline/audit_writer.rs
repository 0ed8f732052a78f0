//! The AuditWriter: one hash chain per writer incarnation, batched. A batch is sealed and
//! sent in order, and the next batch is sealed only once the stream has stored the previous
//! one, so a chain never links to an event that was not stored. When a batch is not stored,
//! the writer answers its jobs with an error (they are retried) and starts a fresh chain
//! under a new writer name: the old chain simply ends, it never breaks.

use std::sync::Arc;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

use super::Shared;
use crate::audit::{AuditChain, AuditEvent};
use crate::ports::{OutMessage, PortError};

/// Where the stream sequence of a stored event goes.
pub type AuditReply = RpcReplyPort<Result<u64, PortError>>;

pub enum AuditMsg {
    /// Seal, store and answer with the stream sequence.
    Append(Box<AuditEvent>, AuditReply),
    /// Time to send what is pending.
    Flush,
    /// The batch in flight was stored (`true`) or not.
    Stored(bool),
}

pub struct AuditWriter;

pub struct AuditState {
    shared: Arc<Shared>,
    chain: AuditChain,
    incarnation: u64,
    pending: Vec<(Box<AuditEvent>, AuditReply)>,
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

impl AuditWriter {
    async fn flush(myself: &ActorRef<AuditMsg>, state: &mut AuditState) {
        if state.in_flight || state.pending.is_empty() {
            return;
        }
        state.in_flight = true;
        let batch = std::mem::take(&mut state.pending);
        let mut acks = Vec::with_capacity(batch.len());
        let mut replies = Vec::with_capacity(batch.len());
        let mut send_error = None;
        for (event, reply) in batch {
            if send_error.is_some() {
                let _ = reply.send(Err(PortError::transient("audit batch not stored")));
                continue;
            }
            let sealed = match state.chain.seal(*event) {
                Ok(e) => e,
                Err(e) => {
                    let _ = reply
                        .send(Err(PortError::permanent(e.to_string())
                            .context("audit event not encodable")));
                    continue;
                }
            };
            let message = match serde_json::to_vec(&sealed) {
                Ok(body) => OutMessage {
                    subject: format!(
                        "{}.{}",
                        state.shared.cfg.audit_subject_prefix, sealed.tenant
                    ),
                    headers: vec![
                        ("Nats-Msg-Id".into(), sealed.hash.clone()),
                        ("Content-Type".into(), "application/json".into()),
                    ],
                    body,
                },
                Err(e) => {
                    let error = PortError::permanent(e.to_string()).context("audit encode");
                    send_error = Some(error.clone());
                    let _ = reply.send(Err(error));
                    continue;
                }
            };
            match state.shared.ports.publisher.send(message).await {
                Ok(ack) => {
                    acks.push(ack);
                    replies.push(reply);
                }
                Err(e) => {
                    let _ = reply.send(Err(e.clone()));
                    send_error = Some(e);
                }
            }
        }
        let me = myself.clone();
        let sent_all = send_error.is_none();
        tokio::spawn(async move {
            let mut ok = sent_all;
            for (ack, reply) in acks.into_iter().zip(replies) {
                let stored = ack.await.map(|s| s.stream_sequence);
                ok &= stored.is_ok();
                let _ = reply.send(stored);
            }
            let _ = me.cast(AuditMsg::Stored(ok));
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
            shared,
            incarnation,
            pending: Vec::new(),
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
                if state.pending.len() >= state.shared.cfg.audit_batch_max {
                    Self::flush(&myself, state).await;
                } else if !state.flush_scheduled && !state.in_flight {
                    state.flush_scheduled = true;
                    myself.send_after(state.shared.cfg.audit_flush_interval, || AuditMsg::Flush);
                }
            }
            AuditMsg::Flush => {
                state.flush_scheduled = false;
                Self::flush(&myself, state).await;
            }
            AuditMsg::Stored(ok) => {
                state.in_flight = false;
                if !ok {
                    metrics::counter!("signer_audit_batches_failed_total").increment(1);
                    state.incarnation = next_incarnation();
                    state.chain = AuditChain::new(writer_name(&state.shared, state.incarnation));
                    tracing::warn!(
                        writer = state.chain.worker(),
                        "audit batch not stored; starting a new chain"
                    );
                }
                Self::flush(&myself, state).await;
            }
        }
        Ok(())
    }
}
