//! The signing pipeline as a ractor supervision tree:
//!
//! ```text
//! SignerSupervisor
//! ├── Intake        pulls jobs, bounded in-flight, runs each job (job.rs)
//! ├── Entitlement   OpTok + DPoP + PoE; key sets, verified tokens and licences (EntitlementVerifier port)
//! ├── Quota         plan limits                  (QuotaStore port)
//! ├── Provenance    scanner release; verdict cache, per-tenant bound (ReleaseVerifier port)
//! ├── Keyring       a pool of KeySigner actors per key (KeyFactory port)
//! └── AuditWriter   hash-chained, batched        (MessagePublisher port)
//! ```
//!
//! A job runs in its own task and talks to the actors by RPC; it publishes its result on
//! `sign.completed` / `sign.failed` itself, through the MessagePublisher port. When an actor dies, its
//! in-flight calls fail, the job is NAKed without a result, and JetStream redelivers it
//! to the restarted actor (or another replica).

mod artefacts;
mod audit_writer;
pub mod disabled;
mod gates;
mod health;
mod intake;
mod job;
mod keyring;
mod latency;
pub mod preflight;
mod supervisor;

pub use gates::{
    ACQUIRE_LANES, Entitlement, EntitlementMsg, EntitlementStats, LookupKey, Provenance,
    ProvenanceLimits, ProvenanceMsg, ProvenanceStats, Quota, QuotaMsg,
};
pub use health::{IntakeState, NotReady, Reason, Store};
pub use keyring::StandaloneKeyActor;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use ractor::{ActorRef, RpcReplyPort};
use tokio::sync::{Notify, Semaphore};

use supervisor::SignerSupervisor;

use crate::ports::{
    EntitlementVerifier, IdempotencyStore, JobSourceFactory, KeyFactory, MessagePublisher,
    QuotaStore, ReleaseVerifier,
};

/// Default of [`PipelineConfig::max_payload_ref_bytes`]: 64 MiB.
pub const DEFAULT_MAX_PAYLOAD_REF_BYTES: u64 = 64 << 20;

/// What the inline result limit leaves below the broker's `max_payload` for headers and the
/// protocol: 64 KiB.
pub const INLINE_RESULT_HEADROOM: usize = 64 << 10;

/// Everything the pipeline needs to know that is not a port.
#[derive(Debug, Clone)]
pub struct PipelineConfig {
    /// This replica's name in logs, audit events and idempotency leases.
    pub worker_id: String,
    /// The requests subject with its prefix (`sign.requests`): a job published under it,
    /// on `<requests_subject>.<tenant>[.…]`, must name that tenant in its body.
    pub requests_subject: String,
    /// Subject for completed results (`sign.completed`).
    pub completed_subject: String,
    /// Subject for failed results (`sign.failed`).
    pub failed_subject: String,
    /// Audit messages go to `<audit_subject_prefix>.<tenant>.<decision>`.
    pub audit_subject_prefix: String,
    /// Name of the audit stream, as results report it.
    pub audit_stream: String,
    /// Jobs processed at once by this replica.
    pub max_inflight: usize,
    /// Largest request body accepted.
    pub max_body_bytes: usize,
    /// The consumer's max deliveries: the last attempt publishes a retryable failure.
    pub max_deliver: u64,
    /// First retry delay; doubles per delivery up to `backoff_max`.
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// Idempotency lease: how long a job attempt's claim lasts unless renewed (renewed every
    /// third of it while the job works).
    pub lease: Duration,
    /// The consumer's AckWait: while a job works, it tells JetStream so every third of it
    /// (or of the lease, if shorter), so the message is not redelivered meanwhile.
    pub ack_wait: Duration,
    /// Signing profiles: the keys of each profile (one signature per key, in order), per
    /// tenant and plan.
    pub profiles: crate::profiles::ProfileTable,
    /// Audit events per message at most, and how long an event may wait for its batch.
    pub audit_batch_max: usize,
    pub audit_flush_interval: Duration,
    /// Largest body of an audit message (a batch that would be larger is split): below the
    /// broker's `max_payload`, with headroom for headers.
    pub audit_max_message_bytes: usize,
    /// Time limit of one call to an actor.
    pub call_timeout: Duration,
    /// A job published longer ago than this when a worker takes it is refused with
    /// `request_expired` (unclaimed, uncharged): credentials are judged at publish time,
    /// and this bounds how old that time may be.
    pub max_queue_age: Duration,
    /// How long a transient failure of the results stream, the audit stream or the
    /// idempotency store keeps the replica not ready when no later call to the same store
    /// succeeds (an idle replica has nothing to retry with).
    pub store_failure_window: Duration,
    /// On the last delivery, how long a job keeps retrying to store its outcome (audit
    /// event, result) when the store is unavailable, before the message is terminated.
    pub retry_budget: Duration,
    /// The longest one job may hold its in-flight slot; then its work is dropped and the
    /// message NAKed (terminated on the last delivery). Longer than `retry_budget`.
    pub job_timeout: Duration,
    /// How the Provenance actor bounds registry lookups per tenant.
    pub provenance_limits: ProvenanceLimits,
    /// Largest object a `payloadRef` may name (whatever the plan allows): checked against
    /// the declared size before reading.
    pub max_payload_ref_bytes: u64,
    /// Largest encoded result published inline; a larger one carries `envelopeRef` /
    /// `bundleRefs` to objects of the blob bucket. Below the broker's `max_payload`, with
    /// headroom for headers.
    pub max_inline_result_bytes: usize,
}

impl PipelineConfig {
    /// Defaults for everything but the worker id and profiles.
    pub fn new(
        worker_id: impl Into<String>,
        profiles: impl Into<crate::profiles::ProfileTable>,
    ) -> Self {
        PipelineConfig {
            worker_id: worker_id.into(),
            requests_subject: "sign.requests".into(),
            completed_subject: "sign.completed".into(),
            failed_subject: "sign.failed".into(),
            audit_subject_prefix: "signer.audit".into(),
            audit_stream: "SIGNER_AUDIT".into(),
            max_inflight: 256,
            max_body_bytes: 1 << 20,
            max_deliver: 5,
            backoff_base: Duration::from_millis(500),
            backoff_max: Duration::from_secs(30),
            lease: Duration::from_secs(25),
            ack_wait: Duration::from_secs(30),
            profiles: profiles.into(),
            audit_batch_max: 256,
            audit_flush_interval: Duration::ZERO,
            audit_max_message_bytes: (1 << 20) - INLINE_RESULT_HEADROOM,
            call_timeout: Duration::from_secs(30),
            max_queue_age: Duration::from_secs(24 * 3600),
            store_failure_window: Duration::from_secs(30),
            retry_budget: Duration::from_secs(60),
            job_timeout: Duration::from_secs(300),
            provenance_limits: ProvenanceLimits::default(),
            max_payload_ref_bytes: DEFAULT_MAX_PAYLOAD_REF_BYTES,
            max_inline_result_bytes: (1 << 20) - INLINE_RESULT_HEADROOM,
        }
    }
}

/// The adapters the pipeline drives.
#[derive(Clone)]
pub struct Ports {
    pub source: Arc<dyn JobSourceFactory>,
    pub publisher: Arc<dyn MessagePublisher>,
    pub idempotency: Arc<dyn IdempotencyStore>,
    pub keys: Arc<dyn KeyFactory>,
    pub revocations: Arc<dyn crate::ports::RevocationList>,
    /// Keys assigned to profiles at runtime (`keys rotate`).
    pub assignments: Arc<dyn crate::profiles::KeyAssignments>,
    pub entitlement: Arc<dyn EntitlementVerifier>,
    pub quota: Arc<dyn QuotaStore>,
    pub provenance: Arc<dyn ReleaseVerifier>,
    /// The blob bucket of large payloads and results; `None`: `payloadRef` requests are
    /// refused and a result too large to publish inline fails with `payload_too_large`.
    pub blobs: Option<Arc<dyn crate::ports::BlobStore>>,
}

/// State shared by the supervisor, the actors and the job tasks (opaque outside the crate).
pub struct Shared {
    pub(crate) cfg: PipelineConfig,
    pub(crate) ports: Ports,
    pub(crate) inflight: Arc<Semaphore>,
    pub(crate) stop_intake: Notify,
    pub(crate) draining: AtomicBool,
    /// The Intake's pull subscription, for readiness.
    pub(crate) intake: Mutex<IntakeState>,
    /// The latest outcome of the writes to each store, for readiness.
    pub(crate) stores: Arc<health::StoreHealth>,
    pub(crate) refs: RwLock<Refs>,
    /// Jobs running now (the gauge `signer_inflight`).
    pub(crate) running: std::sync::atomic::AtomicUsize,
    /// Set at the drain deadline: every job still running drops its work and NAKs.
    pub(crate) cancel_jobs: tokio::sync::watch::Sender<bool>,
}

/// The current incarnation of each actor (replaced when one is restarted).
#[derive(Default)]
pub(crate) struct Refs {
    pub entitlement: Option<ActorRef<gates::EntitlementMsg>>,
    pub quota: Option<ActorRef<gates::QuotaMsg>>,
    pub provenance: Option<ActorRef<gates::ProvenanceMsg>>,
    pub audit: Option<ActorRef<audit_writer::AuditMsg>>,
    /// Key name -> the actors of its pool (created by the Keyring with every member empty).
    pub keys: HashMap<String, keyring::KeyPool>,
}

impl Shared {
    fn read_refs(&self) -> std::sync::RwLockReadGuard<'_, Refs> {
        self.refs
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn write_refs(&self) -> std::sync::RwLockWriteGuard<'_, Refs> {
        self.refs
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Records what the Intake's pull subscription is doing.
    pub(crate) fn set_intake(&self, state: IntakeState) {
        *self
            .intake
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = state;
    }

    fn intake_state(&self) -> IntakeState {
        self.intake
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }
}

/// Why a call to an actor did not produce an answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum CallError {
    #[error("actor {0} is not running")]
    NotRunning(&'static str),
    #[error("actor {0} did not answer in time")]
    Timeout(&'static str),
    #[error("actor {0} stopped while handling the call")]
    Died(&'static str),
}

/// Calls an actor and maps every way the call can fail.
pub(crate) async fn call_actor<M, T>(
    actor: Option<ActorRef<M>>,
    name: &'static str,
    timeout: Duration,
    build: impl FnOnce(RpcReplyPort<T>) -> M,
) -> Result<T, CallError>
where
    M: ractor::Message,
    T: Send + 'static,
{
    let actor = actor.ok_or(CallError::NotRunning(name))?;
    match actor.call(build, Some(timeout)).await {
        Ok(ractor::rpc::CallResult::Success(v)) => Ok(v),
        Ok(ractor::rpc::CallResult::Timeout) => Err(CallError::Timeout(name)),
        Ok(ractor::rpc::CallResult::SenderError) => Err(CallError::Died(name)),
        Err(_) => Err(CallError::NotRunning(name)),
    }
}

/// A running pipeline.
pub struct Pipeline {
    shared: Arc<Shared>,
    supervisor: ActorRef<supervisor::SupervisorMsg>,
    /// Becomes `true` when the supervision tree has stopped (shutdown or giving up).
    stopped: tokio::sync::watch::Receiver<bool>,
}

/// Why the pipeline did not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("profile {profile:?} names unknown key {key:?}")]
    UnknownKey { profile: String, key: String },
    #[error("no signing profile named \"default\"")]
    NoDefaultProfile,
    #[error("actor system: {0}")]
    Spawn(String),
}

impl Pipeline {
    /// Validates the profiles against the keys and starts the supervision tree.
    pub async fn start(cfg: PipelineConfig, mut ports: Ports) -> Result<Self, StartError> {
        let names = ports.keys.names();
        if !cfg.profiles.contains("default") {
            return Err(StartError::NoDefaultProfile);
        }
        for (profile, keys) in cfg.profiles.iter() {
            if let Some(key) = keys.key_names().find(|k| !names.contains(k)) {
                return Err(StartError::UnknownKey {
                    profile: profile.clone(),
                    key: key.clone(),
                });
            }
        }
        // Every write to a store is observed, so readiness knows when one fails.
        let stores = Arc::new(health::StoreHealth::new(cfg.store_failure_window));
        ports.publisher = Arc::new(health::ObservedPublisher {
            inner: ports.publisher,
            health: stores.clone(),
            audit_prefix: format!("{}.", cfg.audit_subject_prefix),
        });
        ports.idempotency = Arc::new(health::ObservedIdempotency {
            inner: ports.idempotency,
            health: stores.clone(),
        });
        let shared = Arc::new(Shared {
            inflight: Arc::new(Semaphore::new(cfg.max_inflight)),
            cfg,
            ports,
            stop_intake: Notify::new(),
            draining: AtomicBool::new(false),
            intake: Mutex::new(IntakeState::initial()),
            stores,
            refs: RwLock::new(Refs::default()),
            running: std::sync::atomic::AtomicUsize::new(0),
            cancel_jobs: tokio::sync::watch::Sender::new(false),
        });
        // Series that must exist before their first event, so dashboards and alerts see 0.
        metrics::counter!("signer_redeliveries_total").absolute(0);
        metrics::counter!("signer_intake_reopened_total").absolute(0);
        metrics::gauge!("signer_inflight").set(0.0);
        let (supervisor, handle) = ractor::Actor::spawn(None, SignerSupervisor, shared.clone())
            .await
            .map_err(|e| StartError::Spawn(e.to_string()))?;
        let (tx, stopped) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            let _ = handle.await;
            let _ = tx.send(true);
        });
        Ok(Pipeline {
            shared,
            supervisor,
            stopped,
        })
    }

    /// A handle to append events that are not jobs (key control decisions) to this
    /// replica's audit chain, through the same AuditWriter actor as the jobs.
    pub fn audit_sink(&self) -> AuditSink {
        AuditSink(self.shared.clone())
    }

    /// A handle to answer provenance pre-flight questions (`signer.verify.referrers`) with
    /// this pipeline's gate actors and audit chain.
    pub fn preflight(&self) -> preflight::Preflight {
        preflight::Preflight(self.shared.clone())
    }

    /// A handle to ask about readiness from elsewhere (the health endpoint).
    pub fn status(&self) -> PipelineStatus {
        PipelineStatus(self.shared.clone())
    }

    /// Stops taking jobs, lets the jobs in flight finish, and stops the actors, all within
    /// `timeout`. Jobs still running when their share of it is over (`timeout` less a grace
    /// of a tenth, at most 2 s) are cut off: their work is dropped and their messages NAKed,
    /// so another replica takes them at once. Returns how many jobs were cut off (0 on a
    /// clean drain).
    pub async fn shutdown(self, timeout: Duration) -> usize {
        let deadline = tokio::time::Instant::now() + timeout;
        let grace = (timeout / 10).min(Duration::from_secs(2));
        self.shared.draining.store(true, Ordering::Release);
        self.shared.stop_intake.notify_waiters();
        self.shared.stop_intake.notify_one();
        let all = u32::try_from(self.shared.cfg.max_inflight).unwrap_or(u32::MAX);
        let drained =
            tokio::time::timeout_at(deadline - grace, self.shared.inflight.acquire_many(all)).await;
        let left = match drained {
            Ok(Ok(_permits)) => 0,
            _ => {
                let left = self.status().inflight();
                self.shared.cancel_jobs.send_replace(true);
                // the cut-off jobs NAK (bounded) and free their slots
                let _ = tokio::time::timeout_at(
                    deadline - grace / 2,
                    self.shared.inflight.acquire_many(all),
                )
                .await;
                left
            }
        };
        self.supervisor.stop(Some("shutdown".into()));
        if tokio::time::timeout_at(deadline, self.stopped())
            .await
            .is_err()
        {
            tracing::warn!("the actors did not stop within the drain timeout");
        }
        left
    }

    /// Resolves when the supervision tree has stopped. Outside a shutdown that means the
    /// supervisor gave up (too many restarts): the process should exit and be restarted.
    pub async fn stopped(&self) {
        let mut rx = self.stopped.clone();
        let _ = rx.wait_for(|stopped| *stopped).await;
    }
}

/// Why an event given to [`AuditSink::append`] was not stored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuditAppendError {
    /// The AuditWriter is not running, did not answer in time, or stopped.
    #[error("audit writer unreachable: {0}")]
    Unreachable(String),
    /// The writer took it but the audit stream did not store it.
    #[error("audit event not stored: {0}")]
    NotStored(String),
}

/// Appends events to the pipeline's audit chain (one chain per writer, shared with jobs).
#[derive(Clone)]
pub struct AuditSink(Arc<Shared>);

impl AuditSink {
    /// Seals `event` into the chain and waits until the audit stream stored it; returns its
    /// stream sequence.
    pub async fn append(&self, event: crate::audit::AuditEvent) -> Result<u64, AuditAppendError> {
        let audit = self.0.read_refs().audit.clone();
        append_to(audit, self.0.cfg.call_timeout, event).await
    }
}

/// Has the AuditWriter `audit` store `event`, waiting at most `timeout`.
async fn append_to(
    audit: Option<ActorRef<audit_writer::AuditMsg>>,
    timeout: Duration,
    event: crate::audit::AuditEvent,
) -> Result<u64, AuditAppendError> {
    call_actor(audit, "audit_writer", timeout, |r| {
        audit_writer::AuditMsg::Append(audit_writer::AppendId::fresh(), Box::new(event), r)
    })
    .await
    .map_err(|e| AuditAppendError::Unreachable(e.to_string()))?
    .map_err(|e| AuditAppendError::NotStored(e.to_string()))
}

/// An AuditWriter on its own, outside a pipeline, with the pipeline's batching, chain and
/// failure handling: for measuring the writer, and for loading an audit stream in tests.
/// (Not supervised: if it stops, appends fail with [`AuditAppendError::Unreachable`].)
pub struct StandaloneAuditWriter {
    actor: ActorRef<audit_writer::AuditMsg>,
    call_timeout: Duration,
}

impl StandaloneAuditWriter {
    /// Starts a writer named after `cfg.worker_id`, with `cfg`'s audit settings, that
    /// publishes through `publisher`.
    pub async fn spawn(
        cfg: &PipelineConfig,
        publisher: Arc<dyn MessagePublisher>,
    ) -> Result<Self, StartError> {
        let (actor, _) = ractor::Actor::spawn(
            None,
            audit_writer::AuditWriter,
            audit_writer::WriterArgs::new(cfg, publisher),
        )
        .await
        .map_err(|e| StartError::Spawn(e.to_string()))?;
        Ok(StandaloneAuditWriter {
            actor,
            call_timeout: cfg.call_timeout,
        })
    }

    /// Seals `event` into the chain and waits until the stream stored it; returns the
    /// stream sequence of the message holding it.
    pub async fn append(&self, event: crate::audit::AuditEvent) -> Result<u64, AuditAppendError> {
        append_to(Some(self.actor.clone()), self.call_timeout, event).await
    }

    /// Stops the writer (appends not yet answered get an error).
    pub async fn stop(self) {
        let _ = self.actor.stop_and_wait(None, None).await;
    }
}

/// Readiness and load of a running pipeline.
#[derive(Clone)]
pub struct PipelineStatus(Arc<Shared>);

impl PipelineStatus {
    /// `Ok` when this replica can take and finish jobs: not draining, the job source open,
    /// every configured key loaded, and no store (results, audit, idempotency) failing its
    /// latest writes; else every reason that holds.
    pub fn ready(&self) -> Result<(), NotReady> {
        let shared = &self.0;
        let mut reasons = Vec::new();
        if shared.draining.load(Ordering::Acquire) {
            reasons.push(Reason::Draining);
        } else {
            match shared.intake_state() {
                IntakeState::Open => {}
                IntakeState::Opening {
                    attempts,
                    last_error,
                } => reasons.push(Reason::IntakeOpening {
                    attempts,
                    last_error,
                }),
                IntakeState::Reopening {
                    broken,
                    attempts,
                    last_error,
                } => reasons.push(Reason::IntakeReopening {
                    broken,
                    attempts,
                    last_error,
                }),
                IntakeState::Stopped => reasons.push(Reason::IntakeStopped),
            }
        }
        // A key counts as loaded only when every member of its pool is.
        let mut missing: Vec<String> = {
            let refs = shared.read_refs();
            shared
                .ports
                .keys
                .names()
                .into_iter()
                .filter(|n| !refs.keys.get(n).is_some_and(keyring::KeyPool::is_full))
                .collect()
        };
        if !missing.is_empty() {
            missing.sort();
            reasons.push(Reason::KeysNotLoaded(missing));
        }
        reasons.extend(shared.stores.reasons());
        if reasons.is_empty() {
            Ok(())
        } else {
            Err(NotReady { reasons })
        }
    }

    /// Jobs in flight right now.
    pub fn inflight(&self) -> usize {
        self.0.running.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests;
