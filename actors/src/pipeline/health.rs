//! What the pipeline knows about its own readiness: whether the Intake can pull, and whether
//! the stores every job writes to (results stream, audit stream, idempotency store) took
//! their last write.
//!
//! A replica on a pull consumer is not routed to by a load balancer, so readiness is what
//! operators and orchestrators look at to find a replica that takes messages but cannot
//! finish them, or holds a pull subscription that no longer delivers (a "silent zombie").
//! Each reason says what is wrong in words an operator can act on.
//!
//! The stores are observed passively: the ports are wrapped ([`ObservedPublisher`],
//! [`ObservedIdempotency`]) and every call's outcome is recorded. A transient failure makes
//! the replica not ready until the same store next succeeds, or until
//! [`PipelineConfig::store_failure_window`] has passed without another failure (an idle
//! replica cannot learn that a store is back other than by trying; the service adds active
//! probes for that). A permanent failure is the message's fault (too large for the broker),
//! not the store's, and does not count.
//!
//! [`PipelineConfig::store_failure_window`]: super::PipelineConfig::store_failure_window

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;

use crate::ports::{
    AckFuture, Claim, IdempotencyStore, MessagePublisher, OutMessage, PortError, Recorded,
};

/// A store the pipeline writes to on every job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Store {
    /// `sign.completed` / `sign.failed`.
    Results,
    /// The hash-chained audit events.
    Audit,
    /// The per-request idempotency records.
    Idempotency,
}

impl std::fmt::Display for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Store::Results => "results not stored",
            Store::Audit => "audit events not stored",
            Store::Idempotency => "idempotency store failing",
        })
    }
}

/// The Intake's pull subscription, as readiness sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IntakeState {
    /// Not opened yet (startup, or the Intake actor was restarted). `attempts` failed so far.
    Opening {
        attempts: u32,
        last_error: Option<String>,
    },
    /// Pulling.
    Open,
    /// The subscription broke (`broken` says how) and is being replaced.
    Reopening {
        broken: String,
        attempts: u32,
        last_error: Option<String>,
    },
    /// Stopped pulling (draining, or the Intake actor is down).
    Stopped,
}

impl IntakeState {
    /// Opening, with nothing tried yet.
    pub(crate) const fn initial() -> Self {
        IntakeState::Opening {
            attempts: 0,
            last_error: None,
        }
    }
}

/// One reason a replica is not ready.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Reason {
    /// SIGTERM: finishing the jobs in flight, taking no new ones.
    #[error("draining")]
    Draining,
    /// The pull subscription is not open (yet).
    #[error("job source not open{}", attempt_note(*.attempts, .last_error.as_deref()))]
    IntakeOpening {
        attempts: u32,
        last_error: Option<String>,
    },
    /// The pull subscription broke and is being replaced.
    #[error("job source broken ({broken}); reopening{}", attempt_note(*.attempts, .last_error.as_deref()))]
    IntakeReopening {
        broken: String,
        attempts: u32,
        last_error: Option<String>,
    },
    /// The Intake does not pull (its actor is being restarted).
    #[error("job source not open: intake stopped")]
    IntakeStopped,
    /// Configured keys whose pool is not complete.
    #[error("keys not loaded: {}", .0.join(", "))]
    KeysNotLoaded(Vec<String>),
    /// A store's last write failed.
    #[error("{store}: {error} ({}s ago)", .age.as_secs())]
    StoreFailing {
        store: Store,
        error: String,
        age: Duration,
    },
}

/// `": attempt N failed: E"`, or nothing before the first attempt failed.
fn attempt_note(attempts: u32, last_error: Option<&str>) -> String {
    match (attempts, last_error) {
        (0, _) | (_, None) => String::new(),
        (n, Some(e)) => format!(": attempt {n} failed: {e}"),
    }
}

/// Why a replica is not ready: every reason that holds, most fundamental first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotReady {
    pub reasons: Vec<Reason>,
}

impl std::fmt::Display for NotReady {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, r) in self.reasons.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{r}")?;
        }
        Ok(())
    }
}

impl std::error::Error for NotReady {}

/// The last failure of a store that has not succeeded since.
#[derive(Debug, Clone)]
struct Failure {
    error: String,
    at: Instant,
}

/// The outcome of the latest writes to each store.
#[derive(Debug)]
pub(crate) struct StoreHealth {
    window: Duration,
    failures: Mutex<HashMap<Store, Failure>>,
}

impl StoreHealth {
    /// A failure counts for `window` unless the store succeeds earlier.
    pub(crate) fn new(window: Duration) -> Self {
        StoreHealth {
            window,
            failures: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Store, Failure>> {
        self.failures
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Records the outcome of one call to `store`.
    pub(crate) fn record<T>(&self, store: Store, outcome: &Result<T, PortError>) {
        match outcome {
            Ok(_) => {
                let mut failures = self.lock();
                if !failures.is_empty() {
                    failures.remove(&store);
                }
            }
            // Too large for the broker, refused as malformed: the message is at fault.
            Err(e) if e.is_permanent() => {}
            Err(e) => {
                self.lock().insert(
                    store,
                    Failure {
                        error: e.to_string(),
                        at: Instant::now(),
                    },
                );
            }
        }
    }

    /// The stores whose latest call failed within the window, in a fixed order.
    pub(crate) fn reasons(&self) -> Vec<Reason> {
        let now = Instant::now();
        let failures = self.lock();
        [Store::Results, Store::Audit, Store::Idempotency]
            .into_iter()
            .filter_map(|store| {
                let f = failures.get(&store)?;
                let age = now.saturating_duration_since(f.at);
                (age < self.window).then(|| Reason::StoreFailing {
                    store,
                    error: f.error.clone(),
                    age,
                })
            })
            .collect()
    }
}

/// A [`MessagePublisher`] that records each send's outcome: audit events (subjects under
/// `audit_prefix`) as [`Store::Audit`], everything else as [`Store::Results`].
pub(crate) struct ObservedPublisher {
    pub inner: Arc<dyn MessagePublisher>,
    pub health: Arc<StoreHealth>,
    /// `<audit_subject_prefix>.`
    pub audit_prefix: String,
}

#[async_trait]
impl MessagePublisher for ObservedPublisher {
    async fn send(&self, message: OutMessage) -> Result<AckFuture, PortError> {
        let store = if message.subject.starts_with(&self.audit_prefix) {
            Store::Audit
        } else {
            Store::Results
        };
        // Only the stream's acknowledgement shows the store took it: a send that is merely
        // on its way does not clear an earlier failure.
        let ack = self.inner.send(message).await.inspect_err(|e| {
            self.health.record::<()>(store, &Err(e.clone()));
        })?;
        let health = self.health.clone();
        Ok(Box::pin(async move {
            let stored = ack.await;
            health.record(store, &stored);
            stored
        }))
    }

    async fn fetch_result(&self, stream_sequence: u64) -> Result<Option<OutMessage>, PortError> {
        let fetched = self.inner.fetch_result(stream_sequence).await;
        self.health.record(Store::Results, &fetched);
        fetched
    }
}

/// An [`IdempotencyStore`] that records each call's outcome as [`Store::Idempotency`].
pub(crate) struct ObservedIdempotency {
    pub inner: Arc<dyn IdempotencyStore>,
    pub health: Arc<StoreHealth>,
}

#[async_trait]
impl IdempotencyStore for ObservedIdempotency {
    async fn claim(&self, key: &str, owner: &str, lease: Duration) -> Result<Claim, PortError> {
        let claimed = self.inner.claim(key, owner, lease).await;
        self.health.record(Store::Idempotency, &claimed);
        claimed
    }

    async fn record(
        &self,
        key: &str,
        owner: &str,
        outcome: &OutMessage,
    ) -> Result<Recorded, PortError> {
        let recorded = self.inner.record(key, owner, outcome).await;
        self.health.record(Store::Idempotency, &recorded);
        recorded
    }

    async fn complete(&self, key: &str, result_sequence: u64) -> Result<(), PortError> {
        let completed = self.inner.complete(key, result_sequence).await;
        self.health.record(Store::Idempotency, &completed);
        completed
    }

    async fn release(&self, key: &str, owner: &str) -> Result<(), PortError> {
        let released = self.inner.release(key, owner).await;
        self.health.record(Store::Idempotency, &released);
        released
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_transient_failure_counts_until_the_next_success() {
        let h = StoreHealth::new(Duration::from_secs(60));
        h.record::<()>(Store::Results, &Err(PortError::transient("no responders")));
        h.record::<()>(Store::Audit, &Ok(()));
        let reasons = h.reasons();
        assert_eq!(reasons.len(), 1, "{reasons:?}");
        assert!(
            reasons[0]
                .to_string()
                .starts_with("results not stored: no responders ("),
            "{}",
            reasons[0]
        );
        h.record(Store::Results, &Ok(7u64));
        assert!(h.reasons().is_empty());
    }

    #[test]
    fn a_permanent_failure_is_the_message_fault_and_does_not_count() {
        let h = StoreHealth::new(Duration::from_secs(60));
        h.record::<()>(
            Store::Results,
            &Err(PortError::permanent("maximum payload exceeded")),
        );
        assert!(h.reasons().is_empty());
    }

    #[test]
    fn a_failure_is_forgotten_after_the_window() {
        let h = StoreHealth::new(Duration::ZERO);
        h.record::<()>(Store::Idempotency, &Err(PortError::transient("timeout")));
        assert!(h.reasons().is_empty());
    }

    /// Fails every send whose subject starts with `refuse`, in its acknowledgement.
    struct Refusing {
        refuse: &'static str,
    }

    #[async_trait]
    impl MessagePublisher for Refusing {
        async fn send(&self, message: OutMessage) -> Result<AckFuture, PortError> {
            let refused = message.subject.starts_with(self.refuse);
            Ok(Box::pin(async move {
                if refused {
                    Err(PortError::transient("no stream leader").context("publish ack"))
                } else {
                    Ok(crate::ports::Stored {
                        stream_sequence: 1,
                        duplicate: false,
                    })
                }
            }))
        }
        async fn fetch_result(&self, _: u64) -> Result<Option<OutMessage>, PortError> {
            Ok(None)
        }
    }

    fn message(subject: &str) -> OutMessage {
        OutMessage {
            subject: subject.into(),
            headers: vec![],
            body: vec![],
        }
    }

    #[tokio::test]
    async fn audit_subjects_count_as_the_audit_stream_and_the_rest_as_results() {
        let health = Arc::new(StoreHealth::new(Duration::from_secs(60)));
        let observed = ObservedPublisher {
            inner: Arc::new(Refusing {
                refuse: "p.signer.audit.",
            }),
            health: health.clone(),
            audit_prefix: "p.signer.audit.".into(),
        };
        let stored = observed
            .send(message("p.sign.completed"))
            .await
            .unwrap()
            .await;
        assert!(stored.is_ok());
        assert!(health.reasons().is_empty());
        let refused = observed
            .send(message("p.signer.audit.acme"))
            .await
            .unwrap()
            .await;
        assert!(refused.is_err());
        let reasons = health.reasons();
        assert_eq!(reasons.len(), 1, "{reasons:?}");
        assert!(
            matches!(&reasons[0], Reason::StoreFailing { store: Store::Audit, error, .. } if error == "publish ack: no stream leader"),
            "{reasons:?}"
        );
    }

    #[test]
    fn reasons_read_as_one_line() {
        let not_ready = NotReady {
            reasons: vec![
                Reason::IntakeReopening {
                    broken: "missed idle heartbeat".into(),
                    attempts: 2,
                    last_error: Some("no responders".into()),
                },
                Reason::KeysNotLoaded(vec!["a".into(), "b".into()]),
            ],
        };
        assert_eq!(
            not_ready.to_string(),
            "job source broken (missed idle heartbeat); reopening: attempt 2 failed: no responders; keys not loaded: a, b"
        );
        assert_eq!(
            Reason::IntakeOpening {
                attempts: 0,
                last_error: None
            }
            .to_string(),
            "job source not open"
        );
    }
}
