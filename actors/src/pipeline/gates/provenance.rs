//! The Provenance actor: scanner release provenance through its port, with the per-tenant
//! bound on registry lookups it owns.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use tokio::sync::Semaphore;

use super::failer;
use crate::error::SignerError;
use crate::pipeline::spawn_reply;
use crate::ports::{ProvenanceGrant, ReleaseVerifier};

/// Messages of the Provenance actor.
pub enum ProvenanceMsg {
    Verify {
        /// Whose job it is: lookups are bounded per tenant.
        tenant: String,
        repository: String,
        image_digest: String,
        reply: RpcReplyPort<Result<ProvenanceGrant, SignerError>>,
    },
    Failed(String),
}

/// How the Provenance actor shares registry lookups between tenants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProvenanceLimits {
    /// Lookups one tenant may have running at once (values below 1 count as 1). A tenant
    /// whose registry is slow or hostile then holds at most this many, and every other
    /// tenant's lookups start at once.
    pub per_tenant: usize,
    /// How long a job waits for one of its tenant's lookups before it fails
    /// `provenance_unavailable` (retryable: the job is redelivered later).
    pub wait: Duration,
}

impl Default for ProvenanceLimits {
    fn default() -> Self {
        ProvenanceLimits {
            per_tenant: 4,
            wait: Duration::from_secs(5),
        }
    }
}

/// Tenants tracked before idle ones are forgotten (tenant names come from requests).
const TRACKED_TENANTS: usize = 1024;

pub struct Provenance;

/// What the Provenance actor owns: its port, and one semaphore per tenant with lookups.
pub struct ProvenanceState {
    port: Arc<dyn ReleaseVerifier>,
    limits: ProvenanceLimits,
    tenants: HashMap<String, Arc<Semaphore>>,
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
    let result = port.verify(&repository, &image_digest).await;
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
            tenants: HashMap::new(),
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
                let lookup = bounded_lookup(
                    state.port.clone(),
                    state.permits(&tenant),
                    state.limits.wait,
                    repository,
                    image_digest,
                );
                // The caller's deadline ends the lookup too: dropping it frees the
                // tenant's permit and cancels signature checks still running.
                let deadline = reply.get_timeout();
                spawn_reply(
                    reply,
                    async move {
                        match deadline {
                            Some(d) => tokio::time::timeout(d, lookup).await.unwrap_or_else(|_| {
                                Err(SignerError::ProvenanceUnavailable(
                                    "no provenance verdict within the call timeout".into(),
                                ))
                            }),
                            None => lookup.await,
                        }
                    },
                    failer(&myself, ProvenanceMsg::Failed),
                );
                Ok(())
            }
            ProvenanceMsg::Failed(e) => Err(format!("provenance check panicked: {e}").into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use async_trait::async_trait;
    use ractor::rpc::CallResult;

    use super::*;
    use crate::error::ErrorCode;

    /// A registry stand-in: the repository `hang` never answers (and counts the lookups
    /// dropped unfinished), anything else is trusted at once.
    struct Port {
        dropped: Arc<AtomicUsize>,
    }

    struct CountDrop(Arc<AtomicUsize>);

    impl Drop for CountDrop {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[async_trait]
    impl ReleaseVerifier for Port {
        async fn verify(&self, repository: &str, _: &str) -> Result<ProvenanceGrant, SignerError> {
            if repository == "hang" {
                let _guard = CountDrop(self.dropped.clone());
                std::future::pending::<()>().await;
            }
            Ok(ProvenanceGrant::Trusted)
        }
    }

    async fn ask(
        actor: &ActorRef<ProvenanceMsg>,
        tenant: &str,
        repository: &str,
        timeout: Duration,
    ) -> CallResult<Result<ProvenanceGrant, SignerError>> {
        let (tenant, repository) = (tenant.to_string(), repository.to_string());
        actor
            .call(
                |reply| ProvenanceMsg::Verify {
                    tenant,
                    repository,
                    image_digest: "sha256:x".into(),
                    reply,
                },
                Some(timeout),
            )
            .await
            .unwrap()
    }

    /// The caller's timeout and the actor's deadline are the same instant: either may
    /// answer first (the caller sees a timeout, or the actor's "unavailable").
    fn ended_at_the_deadline(r: CallResult<Result<ProvenanceGrant, SignerError>>) {
        match r {
            CallResult::Timeout => {}
            CallResult::Success(Err(e)) if e.code() == ErrorCode::ProvenanceUnavailable => {}
            CallResult::Success(other) => panic!("a hanging lookup answered {other:?}"),
            CallResult::SenderError => panic!("the actor dropped the reply"),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_tenant_over_its_bound_waits_or_fails_while_others_are_answered() {
        let dropped = Arc::new(AtomicUsize::new(0));
        let port: Arc<dyn ReleaseVerifier> = Arc::new(Port {
            dropped: dropped.clone(),
        });
        let limits = ProvenanceLimits {
            per_tenant: 2,
            wait: Duration::from_millis(300),
        };
        let (actor, handle) = Actor::spawn(None, Provenance, (port, limits))
            .await
            .unwrap();
        let long = Duration::from_secs(30);

        // Tenant A fills its bound with two lookups that never end.
        let hung: Vec<_> = (0..2)
            .map(|_| {
                let actor = actor.clone();
                tokio::spawn(async move { ask(&actor, "a", "hang", long).await })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(200)).await;

        // Tenant B is answered at once, whatever A does.
        let started = std::time::Instant::now();
        let CallResult::Success(b) = ask(&actor, "b", "ok", long).await else {
            panic!("no answer for tenant b");
        };
        assert_eq!(b, Ok(ProvenanceGrant::Trusted));
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );

        // A third lookup of A waits `wait`, then is unavailable (retryable).
        let started = std::time::Instant::now();
        let CallResult::Success(a) = ask(&actor, "a", "ok", long).await else {
            panic!("no answer for tenant a");
        };
        let err = a.unwrap_err();
        assert_eq!(err.code(), ErrorCode::ProvenanceUnavailable, "{err}");
        assert!(err.code().retryable());
        assert!(started.elapsed() >= Duration::from_millis(300));
        assert_eq!(dropped.load(Ordering::SeqCst), 0);

        // A lookup is ended at its caller's deadline: it is dropped (so its checks are
        // cancelled) and gives its permit back.
        for h in hung {
            h.abort();
        }
        ended_at_the_deadline(ask(&actor, "c", "hang", Duration::from_millis(200)).await);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while dropped.load(Ordering::SeqCst) < 1 {
            assert!(
                std::time::Instant::now() < deadline,
                "the lookup was not dropped"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        actor.stop(None);
        let _ = handle.await;
    }

    #[tokio::test]
    async fn permits_come_back_at_the_deadline() {
        let dropped = Arc::new(AtomicUsize::new(0));
        let port: Arc<dyn ReleaseVerifier> = Arc::new(Port {
            dropped: dropped.clone(),
        });
        let limits = ProvenanceLimits {
            per_tenant: 1,
            wait: Duration::from_secs(5),
        };
        let (actor, handle) = Actor::spawn(None, Provenance, (port, limits))
            .await
            .unwrap();
        // The only permit of A is held by a lookup that hangs until its 200 ms deadline.
        ended_at_the_deadline(ask(&actor, "a", "hang", Duration::from_millis(200)).await);
        // The next lookup of A gets the permit back (within its 5 s wait).
        let CallResult::Success(r) = ask(&actor, "a", "ok", Duration::from_secs(30)).await else {
            panic!("no answer");
        };
        assert_eq!(r, Ok(ProvenanceGrant::Trusted));
        assert_eq!(dropped.load(Ordering::SeqCst), 1);
        actor.stop(None);
        let _ = handle.await;
    }
}
