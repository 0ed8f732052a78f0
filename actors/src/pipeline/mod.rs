//! The signing pipeline as a ractor supervision tree:
//!
//! ```text
//! SignerSupervisor
//! ├── Intake        pulls jobs, bounded in-flight, runs each job (job.rs)
//! ├── Entitlement   OpTok + DPoP + PoE          (EntitlementVerifier port)
//! ├── Quota         plan limits                  (QuotaStore port)
//! ├── Provenance    scanner release signature    (ReleaseVerifier port)
//! ├── Keyring       a pool of KeySigner actors per key (KeyFactory port)
//! ├── Publisher     sign.completed / sign.failed (MessagePublisher port)
//! └── AuditWriter   hash-chained, batched        (MessagePublisher port)
//! ```
//!
//! A job runs in its own task and talks to the actors by RPC. When an actor dies, its
//! in-flight calls fail, the job is NAKed without a result, and JetStream redelivers it
//! to the restarted actor (or another replica).

mod artefacts;
mod audit_writer;
pub mod disabled;
mod gates;
mod intake;
mod job;
mod keyring;
mod publisher;
mod supervisor;

pub use keyring::{KeyMsg, KeySignerActor, KeyState as KeyActorState};

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
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
    /// Audit events go to `<audit_subject_prefix>.<tenant>`.
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
    /// Idempotency lease: how long a job may run before another replica may take it over.
    pub lease: Duration,
    /// Signing profiles: the keys of each profile (one signature per key, in order), per
    /// tenant and plan.
    pub profiles: crate::profiles::ProfileTable,
    /// Audit events per batch at most, and how long an event may wait for its batch.
    pub audit_batch_max: usize,
    pub audit_flush_interval: Duration,
    /// Time limit of one call to an actor.
    pub call_timeout: Duration,
    /// A job published longer ago than this when a worker takes it is refused with
    /// `request_expired` (unclaimed, uncharged): credentials are judged at publish time,
    /// and this bounds how old that time may be.
    pub max_queue_age: Duration,
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
            profiles: profiles.into(),
            audit_batch_max: 256,
            audit_flush_interval: Duration::from_millis(1),
            call_timeout: Duration::from_secs(30),
            max_queue_age: Duration::from_secs(24 * 3600),
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
    pub(crate) intake_ready: AtomicBool,
    pub(crate) refs: RwLock<Refs>,
    /// Jobs running now (the gauge `signer_inflight`).
    pub(crate) running: std::sync::atomic::AtomicUsize,
}

/// The current incarnation of each actor (replaced when one is restarted).
#[derive(Default)]
pub(crate) struct Refs {
    pub entitlement: Option<ActorRef<gates::EntitlementMsg>>,
    pub quota: Option<ActorRef<gates::QuotaMsg>>,
    pub provenance: Option<ActorRef<gates::ProvenanceMsg>>,
    pub publisher: Option<ActorRef<publisher::PublisherMsg>>,
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
    pub async fn start(cfg: PipelineConfig, ports: Ports) -> Result<Self, StartError> {
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
        let shared = Arc::new(Shared {
            inflight: Arc::new(Semaphore::new(cfg.max_inflight)),
            cfg,
            ports,
            stop_intake: Notify::new(),
            draining: AtomicBool::new(false),
            intake_ready: AtomicBool::new(false),
            refs: RwLock::new(Refs::default()),
            running: std::sync::atomic::AtomicUsize::new(0),
        });
        // Series that must exist before their first event, so dashboards and alerts see 0.
        metrics::counter!("signer_redeliveries_total").absolute(0);
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

    /// A handle to ask about readiness from elsewhere (the health endpoint).
    pub fn status(&self) -> PipelineStatus {
        PipelineStatus(self.shared.clone())
    }

    /// Stops taking jobs, waits up to `timeout` for the jobs in flight to finish, then
    /// stops the actors. Returns how many jobs were still running (0 on a clean drain);
    /// those were not acknowledged and will be redelivered.
    pub async fn shutdown(self, timeout: Duration) -> usize {
        self.shared.draining.store(true, Ordering::Release);
        self.shared.stop_intake.notify_waiters();
        self.shared.stop_intake.notify_one();
        let all = u32::try_from(self.shared.cfg.max_inflight).unwrap_or(u32::MAX);
        let drained = tokio::time::timeout(timeout, self.shared.inflight.acquire_many(all)).await;
        let left = match drained {
            Ok(Ok(_permits)) => 0,
            _ => self.status().inflight(),
        };
        self.supervisor.stop(Some("shutdown".into()));
        self.stopped().await;
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
        call_actor(audit, "audit_writer", self.0.cfg.call_timeout, |r| {
            audit_writer::AuditMsg::Append(Box::new(event), r)
        })
        .await
        .map_err(|e| AuditAppendError::Unreachable(e.to_string()))?
        .map_err(|e| AuditAppendError::NotStored(e.to_string()))
    }
}

/// Readiness and load of a running pipeline.
#[derive(Clone)]
pub struct PipelineStatus(Arc<Shared>);

impl PipelineStatus {
    /// `Ok` when the job source is open and every configured key is loaded; else why not.
    pub fn ready(&self) -> Result<(), String> {
        let shared = &self.0;
        if shared.draining.load(Ordering::Acquire) {
            return Err("draining".into());
        }
        if !shared.intake_ready.load(Ordering::Acquire) {
            return Err("job source not open".into());
        }
        // A key counts as loaded only when every member of its pool is.
        let refs = shared.read_refs();
        let mut missing: Vec<String> = shared
            .ports
            .keys
            .names()
            .into_iter()
            .filter(|n| !refs.keys.get(n).is_some_and(keyring::KeyPool::is_full))
            .collect();
        if !missing.is_empty() {
            missing.sort();
            return Err(format!("keys not loaded: {}", missing.join(", ")));
        }
        Ok(())
    }

    /// Jobs in flight right now.
    pub fn inflight(&self) -> usize {
        self.0.running.load(Ordering::Acquire)
    }
}

/// Runs `work` in its own task and sends its answer to `reply`, so an actor can keep
/// taking messages while network calls of earlier ones are in flight. If the work panics,
/// `on_panic` is told (the actor then fails and is restarted by its supervisor).
pub(crate) fn spawn_reply<T, F>(
    reply: RpcReplyPort<T>,
    work: F,
    on_panic: impl FnOnce(String) + Send + 'static,
) where
    T: Send + 'static,
    F: std::future::Future<Output = T> + Send + 'static,
{
    let task = tokio::spawn(work);
    tokio::spawn(async move {
        match task.await {
            Ok(v) => {
                let _ = reply.send(v);
            }
            Err(e) => on_panic(e.to_string()),
        }
    });
}

#[cfg(test)]
mod tests;
