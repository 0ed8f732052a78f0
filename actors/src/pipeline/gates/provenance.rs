//! The Provenance actor: scanner release provenance through its port, with what it owns.
//!
//! What it owns, and why that needs an actor (it sees every lookup of the replica):
//! - **The verdict cache**: `repository@digest` to its definite verdict (trusted, or
//!   untrusted with the reason) for [`ProvenanceLimits::cache_ttl`], bounded in number. A
//!   busy signer asks the registry once per scanner release rather than once per job, and
//!   keeps signing through a registry outage for releases it checked within the TTL. "The
//!   registry could not be asked" is never kept.
//! - **One lookup per image at a time**: jobs of a tenant that need the same
//!   `repository@digest` while it is being looked up wait for that lookup instead of each
//!   making one. Lookups are shared within a tenant, not across tenants, so that one
//!   tenant's slow or hostile lookup never holds another's job.
//! - **The per-tenant bound on lookups** ([`ProvenanceLimits::per_tenant`]), so one tenant
//!   cannot delay another.
//!
//! Decisions that need no registry (disabled, malformed input, allowlist) are answered in
//! the mailbox; lookups run in tasks that report back by message (signature checks on the
//! blocking pool), ended at their first caller's deadline.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use tokio::sync::Semaphore;

use super::cache::TtlCache;
use crate::audit::ProvenanceVerdict;
use crate::error::{ErrorCode, SignerError};
use crate::ports::{ProvenanceGrant, ReleaseSignature, ReleaseVerifier};

type Reply = RpcReplyPort<Result<ProvenanceGrant, SignerError>>;

/// A lookup in flight: whose it is and which image.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LookupKey {
    tenant: String,
    repository: String,
    image_digest: String,
}

/// Messages of the Provenance actor.
pub enum ProvenanceMsg {
    Verify {
        /// Whose job it is: lookups are bounded and shared per tenant.
        tenant: String,
        repository: String,
        image_digest: String,
        reply: Reply,
    },
    /// A lookup finished.
    LookedUp {
        key: LookupKey,
        result: Result<ProvenanceGrant, SignerError>,
    },
    /// Counters, for tests and diagnostics.
    Stats(RpcReplyPort<ProvenanceStats>),
    Failed(String),
}

/// What the Provenance actor counted since it started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProvenanceStats {
    /// Lookups started (calls of [`ReleaseVerifier::look_up`], or waits for a permit).
    pub lookups: u64,
    /// Jobs answered from the verdict cache.
    pub cache_hits: u64,
    /// Jobs that waited for a lookup another job of their tenant had started.
    pub joined: u64,
    /// Verdicts cached now.
    pub cached: usize,
}

/// How the Provenance actor shares registry lookups between tenants, and how long it keeps
/// their verdicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProvenanceLimits {
    /// Lookups one tenant may have running at once (values below 1 count as 1). A tenant
    /// whose registry is slow or hostile then holds at most this many, and every other
    /// tenant's lookups start at once.
    pub per_tenant: usize,
    /// How long a job waits for one of its tenant's lookups before it fails
    /// `provenance_unavailable` (retryable: the job is redelivered later).
    pub wait: Duration,
    /// How long a definite verdict is reused (`[gates.provenance] cache_ttl`; zero keeps
    /// nothing).
    pub cache_ttl: Duration,
    /// Most verdicts kept (repositories come from requests: the key space is the callers').
    pub cache_entries: usize,
}

impl Default for ProvenanceLimits {
    fn default() -> Self {
        ProvenanceLimits {
            per_tenant: 4,
            wait: Duration::from_secs(5),
            cache_ttl: Duration::from_secs(600),
            cache_entries: 4096,
        }
    }
}

/// Tenants tracked before idle ones are forgotten (tenant names come from requests).
const TRACKED_TENANTS: usize = 1024;

pub struct Provenance;

/// A definite verdict about one `repository@digest`.
#[derive(Debug, Clone)]
enum Verdict {
    Trusted(ReleaseSignature),
    Untrusted(SignerError),
}

/// What the Provenance actor owns: its port, the verdicts, the lookups in flight with the
/// jobs waiting for each, and one semaphore per tenant with lookups.
pub struct ProvenanceState {
    port: Arc<dyn ReleaseVerifier>,
    limits: ProvenanceLimits,
    verdicts: TtlCache<(String, String), Verdict, Instant>,
    lookups: HashMap<LookupKey, Vec<Reply>>,
    tenants: HashMap<String, Arc<Semaphore>>,
    stats: ProvenanceStats,
}

impl ProvenanceState {
    /// The tenant's semaphore, made on first use. When many tenants are tracked, those with
    /// no lookup running or waiting are forgotten first, so the map stays small whatever
    /// tenant names requests carry.
    fn permits(&mut self, tenant: &str) -> Arc<Semaphore> {
        if let Some(s) = self.tenants.get(tenant) {
            return s.clone();
        }
        if self.tenants.len() >= TRACKED_TENANTS {
            self.tenants.retain(|_, s| Arc::strong_count(s) > 1);
        }
        let s = Arc::new(Semaphore::new(self.limits.per_tenant.max(1)));
        self.tenants.insert(tenant.to_string(), s.clone());
        s
    }

    fn cached(&mut self, repository: &str, image_digest: &str) -> Option<Verdict> {
        let key = (repository.to_string(), image_digest.to_string());
        self.verdicts.get(&key, Instant::now())
    }

    fn remember(&mut self, key: &LookupKey, result: &Result<ProvenanceGrant, SignerError>) {
        let verdict = match result {
            Ok(ProvenanceGrant::Trusted(signature)) => Verdict::Trusted(signature.clone()),
            Err(e) if e.code() == ErrorCode::ProvenanceUntrusted => Verdict::Untrusted(e.clone()),
            _ => return,
        };
        let now = Instant::now();
        let Some(expires) = now.checked_add(self.limits.cache_ttl) else {
            return;
        };
        if self.limits.cache_ttl.is_zero() {
            return;
        }
        self.verdicts.insert(
            (key.repository.clone(), key.image_digest.clone()),
            verdict,
            expires,
            now,
        );
    }
}

/// How an answer of the Provenance actor is recorded (the audit event's
/// `provenance.verdict`, the pre-flight's `verdict`).
pub fn provenance_verdict(answer: &Result<ProvenanceGrant, SignerError>) -> ProvenanceVerdict {
    match answer {
        Ok(ProvenanceGrant::Trusted(_)) => ProvenanceVerdict::Trusted,
        Ok(ProvenanceGrant::Allowlisted) => ProvenanceVerdict::Allowlisted,
        Ok(ProvenanceGrant::Disabled) => ProvenanceVerdict::Disabled,
        Err(e) if e.code() == ErrorCode::ProvenanceUntrusted => ProvenanceVerdict::Untrusted,
        Err(_) => ProvenanceVerdict::Unavailable,
    }
}

/// One lookup under its tenant's bound: waits (at most `wait`) for a permit, then asks
/// the port, holding the permit until the answer.
async fn bounded_lookup(
    port: Arc<dyn ReleaseVerifier>,
    permits: Arc<Semaphore>,
    wait: Duration,
    repository: String,
    image_digest: String,
) -> Result<ProvenanceGrant, SignerError> {
    let permit = match tokio::time::timeout(wait, permits.acquire_owned()).await {
        Ok(Ok(p)) => p,
        // The semaphore is never closed; this is the same answer as a full one.
        Ok(Err(_)) | Err(_) => {
            return Err(SignerError::ProvenanceUnavailable(format!(
                "this tenant already has its limit of registry lookups running and none finished within {} ([gates.provenance] tenant_lookups)",
                humantime::format_duration(wait)
            )));
        }
    };
    let result = port.look_up(&repository, &image_digest).await;
    drop(permit);
    result
}

impl Actor for Provenance {
    type Msg = ProvenanceMsg;
    type State = ProvenanceState;
    type Arguments = (Arc<dyn ReleaseVerifier>, ProvenanceLimits);

    async fn pre_start(
        &self,
        _: ActorRef<Self::Msg>,
        (port, limits): Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(ProvenanceState {
            port,
            limits,
            verdicts: TtlCache::new(limits.cache_entries),
            lookups: HashMap::new(),
            tenants: HashMap::new(),
            stats: ProvenanceStats::default(),
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            ProvenanceMsg::Verify {
                tenant,
                repository,
                image_digest,
                reply,
            } => {
                if let Some(answer) = state.port.decide_offline(&repository, &image_digest) {
                    let _ = reply.send(answer);
                    return Ok(());
                }
                if let Some(verdict) = state.cached(&repository, &image_digest) {
                    state.stats.cache_hits += 1;
                    let _ = reply.send(match verdict {
                        Verdict::Trusted(signature) => Ok(ProvenanceGrant::Trusted(signature)),
                        Verdict::Untrusted(e) => Err(e),
                    });
                    return Ok(());
                }
                let key = LookupKey {
                    tenant,
                    repository,
                    image_digest,
                };
                if let Some(waiting) = state.lookups.get_mut(&key) {
                    state.stats.joined += 1;
                    waiting.push(reply);
                    return Ok(());
                }
                state.stats.lookups += 1;
                let lookup = bounded_lookup(
                    state.port.clone(),
                    state.permits(&key.tenant),
                    state.limits.wait,
                    key.repository.clone(),
                    key.image_digest.clone(),
                );
                // The first caller's deadline ends the lookup (the others came later, with
                // the same call timeout): dropping it frees the tenant's permit and cancels
                // signature checks still running.
                let deadline = reply.get_timeout();
                state.lookups.insert(key.clone(), vec![reply]);
                let task = tokio::spawn(async move {
                    match deadline {
                        Some(d) => tokio::time::timeout(d, lookup).await.unwrap_or_else(|_| {
                            Err(SignerError::ProvenanceUnavailable(
                                "no provenance verdict within the call timeout".into(),
                            ))
                        }),
                        None => lookup.await,
                    }
                });
                let me = myself.clone();
                tokio::spawn(async move {
                    let msg = match task.await {
                        Ok(result) => ProvenanceMsg::LookedUp { key, result },
                        Err(e) => ProvenanceMsg::Failed(e.to_string()),
                    };
                    let _ = me.cast(msg);
                });
            }
            ProvenanceMsg::LookedUp { key, result } => {
                state.remember(&key, &result);
                state.stats.cached = state.verdicts.len();
                for reply in state.lookups.remove(&key).unwrap_or_default() {
                    let _ = reply.send(result.clone());
                }
            }
            ProvenanceMsg::Stats(reply) => {
                let _ = reply.send(ProvenanceStats {
                    cached: state.verdicts.len(),
                    ..state.stats
                });
            }
            ProvenanceMsg::Failed(e) => {
                return Err(format!("provenance check panicked: {e}").into());
            }
        }
        Ok(())
    }
}

#[cfg(test)]
#[path = "provenance_tests.rs"]
mod tests;
