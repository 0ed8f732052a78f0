//! The DPoP replay records: a proof's `jti` may be used once per proof key.
//!
//! **Scope.** A record is keyed by the proof key's thumbprint (`jkt`) and a hash of the
//! `jti` ([`ReplayKey`]). RFC 9449 makes a `jti` unique per key, not globally: keyed by `jti`
//! alone, one tenant could burn another client's predictable `jti`s. Hashing the `jti` makes
//! any characters safe in a Redis or key-value key.
//!
//! **"Once" means for one request.** JetStream redelivers a job whose processing failed or
//! whose worker died, byte for byte, with the same proof; that is not a replay, and refusing
//! it would turn every retryable failure into a permanent `dpop_replayed`. So each record
//! holds a binding (a hash of the request it was first used with): the same request may
//! present the proof again, any other request is refused.
//!
//! **Lifetime.** The gates judge `iat` against the broker's publish time, and a job may wait
//! `max_queue_age` in the stream. A copy of a proof can therefore be published up to
//! `iat + dpop_max_age` and processed `max_queue_age` after that, while the first copy may
//! have been processed as early as `iat - dpop_max_age`: a record must outlive its first use
//! by `2 × dpop_max_age + max_queue_age` (plus the clock skew), see [`record_lifetime`].
//!
//! **Where.** A file per store, behind the [`ReplayCache`] trait:
//! - [`KvReplayCache`] (`kv.rs`): a JetStream key-value bucket, the default: beside the jobs
//!   and replicated like them, so a Redis restart forgets nothing;
//! - [`RedisReplayCache`] (`redis.rs`): `SET NX PX` in a Lua script, selectable for operators
//!   who run Redis with persistence;
//! - [`MemoryReplayCache`] (`memory.rs`): for tests and a single process (the entitlement
//!   gate's own default when it is given no store).
//!
//! [`open`] opens the configured shared store; [`DeferredReplayCache`] stands in for it until
//! NATS is there.

mod kv;
mod memory;
mod redis;

use std::sync::Arc;
use std::time::Duration;
#[cfg(test)]
use std::time::Instant;

use async_trait::async_trait;
use sha2::{Digest, Sha256};

use crate::config::ReplayBackend;
use crate::config::gates::EntitlementGate;
use crate::jetstream::NatsError;

pub use self::kv::KvReplayCache;
pub use self::memory::{MEMORY_REPLAY_CAPACITY, MemoryReplayCache};
pub use self::redis::RedisReplayCache;

/// What the records said about a proof.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplayOutcome {
    /// Not seen before: now recorded.
    First,
    /// Seen before with the same request (a redelivery).
    SameRequest,
    /// Seen before with another request.
    Replayed,
}

/// Why the records could not answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplayErrorKind {
    /// The store (Redis, the JetStream bucket) did not answer or refused the operation.
    Unavailable,
    /// The in-memory store is full; it refuses rather than forget live records.
    Full,
}

/// The records could not answer; the job should be retried (fail closed).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("DPoP replay records ({store}): {detail}")]
pub struct ReplayError {
    pub kind: ReplayErrorKind,
    /// Which store: `memory`, `redis`, `jetstream`.
    pub store: &'static str,
    /// The underlying error, as text (the sources' types differ per store).
    pub detail: String,
}

impl ReplayError {
    pub fn unavailable(store: &'static str, source: impl std::fmt::Display) -> Self {
        ReplayError {
            kind: ReplayErrorKind::Unavailable,
            store,
            detail: source.to_string(),
        }
    }
}

/// How long a record must live: `2 × dpop_max_age + max_queue_age + clock_skew` (see the
/// module documentation for why).
pub fn record_lifetime(
    dpop_max_age: Duration,
    max_queue_age: Duration,
    clock_skew: Duration,
) -> Duration {
    dpop_max_age
        .saturating_mul(2)
        .saturating_add(max_queue_age)
        .saturating_add(clock_skew)
}

/// Identifies one proof: its key's thumbprint and the SHA-256 of its `jti`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ReplayKey {
    /// The thumbprint when it is plain base64url (as RFC 7638 thumbprints are), else `h` and
    /// its SHA-256 in hex, so the key holds only `[A-Za-z0-9_-]`.
    scope: String,
    /// Hex SHA-256 of the `jti`.
    jti: String,
}

impl ReplayKey {
    pub fn new(jkt: &str, jti: &str) -> Self {
        let plain = !jkt.is_empty()
            && jkt.len() <= 64
            && jkt
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        let scope = if plain {
            jkt.to_owned()
        } else {
            format!("h{}", hex::encode(Sha256::digest(jkt.as_bytes())))
        };
        ReplayKey {
            scope,
            jti: hex::encode(Sha256::digest(jti.as_bytes())),
        }
    }

    /// `<jkt>.<sha256(jti)>`: a valid key-value key, and all records of one proof key share
    /// the subject prefix `$KV.<bucket>.<jkt>.`.
    pub fn kv_key(&self) -> String {
        format!("{}.{}", self.scope, self.jti)
    }

    /// `<prefix><jkt>:<sha256(jti)>`.
    pub fn redis_key(&self, prefix: &str) -> String {
        format!("{prefix}{}:{}", self.scope, self.jti)
    }
}

/// Records proofs with the request they were first used with, for the store's lifetime.
#[async_trait]
pub trait ReplayCache: Send + Sync {
    async fn record(&self, key: &ReplayKey, binding: &str) -> Result<ReplayOutcome, ReplayError>;
}

/// Why the configured store could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The JetStream bucket could not be opened, created or have its age raised.
    #[error(transparent)]
    Nats(#[from] NatsError),
    /// `dpop_replay_backend = "redis"` without a Redis connection (`[redis]`).
    #[error("gates.entitlement.dpop_replay_backend = \"redis\" needs [redis]")]
    NoRedis,
}

/// Opens the store `gate.dpop_replay_backend` names, keeping records `lifetime`: by default
/// the JetStream bucket `gate.dpop_replay_bucket`, beside the jobs, so that losing Redis
/// cannot let a replay through; Redis (`gate.dpop_replay_prefix`) when chosen explicitly.
pub async fn open(
    gate: &EntitlementGate,
    lifetime: Duration,
    js: &async_nats::jetstream::Context,
    redis: Option<crate::redis::Redis>,
) -> Result<Arc<dyn ReplayCache>, OpenError> {
    Ok(match gate.dpop_replay_backend {
        ReplayBackend::Jetstream => {
            let store = KvReplayCache::open(js, &gate.dpop_replay_bucket, lifetime).await?;
            tracing::info!(bucket = %gate.dpop_replay_bucket, lifetime_s = lifetime.as_secs(), "DPoP replay records in JetStream");
            Arc::new(store)
        }
        ReplayBackend::Redis => {
            let pool = redis.ok_or(OpenError::NoRedis)?;
            tracing::warn!(
                lifetime_s = lifetime.as_secs(),
                "DPoP replay records in Redis: a Redis restart without persistence forgets them and lets proofs be replayed"
            );
            Arc::new(RedisReplayCache::new(
                pool,
                gate.dpop_replay_prefix.clone(),
                lifetime,
            ))
        }
    })
}

/// A store that is opened later: the service builds (and so checks) its gates before it waits
/// for NATS, and opens the JetStream bucket once NATS is there. Until [`Self::set`], every
/// record is refused as unavailable (retryable), never let through.
#[derive(Default)]
pub struct DeferredReplayCache {
    store: std::sync::OnceLock<Arc<dyn ReplayCache>>,
}

impl DeferredReplayCache {
    /// Installs the store; a second call is ignored (returns `false`).
    pub fn set(&self, store: Arc<dyn ReplayCache>) -> bool {
        self.store.set(store).is_ok()
    }
}

#[async_trait]
impl ReplayCache for DeferredReplayCache {
    async fn record(&self, key: &ReplayKey, binding: &str) -> Result<ReplayOutcome, ReplayError> {
        match self.store.get() {
            Some(store) => store.record(key, binding).await,
            None => Err(ReplayError::unavailable(
                "deferred",
                "the replay store is not open yet",
            )),
        }
    }
}

/// The behaviour every store must have; each store's tests run it.
#[cfg(test)]
pub(crate) async fn exercise_store(cache: &dyn ReplayCache, lifetime: Duration, tag: &str) {
    // Taken before the first record: that record expires no earlier than `start + lifetime`,
    // however long this thread waits between the calls below.
    let start = Instant::now();
    let key = ReplayKey::new(&format!("jkt-{tag}"), "jti-1");
    assert_eq!(
        cache.record(&key, "req-a").await.unwrap(),
        ReplayOutcome::First
    );
    assert_eq!(
        cache.record(&key, "req-a").await.unwrap(),
        ReplayOutcome::SameRequest,
        "a redelivery of the same request"
    );
    assert_eq!(
        cache.record(&key, "req-b").await.unwrap(),
        ReplayOutcome::Replayed
    );
    // The same jti under another proof key is another proof.
    let other_key = ReplayKey::new(&format!("other-{tag}"), "jti-1");
    assert_eq!(
        cache.record(&other_key, "req-c").await.unwrap(),
        ReplayOutcome::First,
        "records are per proof key"
    );
    // Any characters in a jti are fine.
    let odd = ReplayKey::new(&format!("jkt-{tag}"), "a b.c*>:/\u{e9}\n");
    assert_eq!(
        cache.record(&odd, "req-a").await.unwrap(),
        ReplayOutcome::First
    );
    // Not before its lifetime (checked whenever it is found forgotten: never before `start +
    // lifetime`); then (the broker expires entries on its own timer) soon after.
    let deadline = start + lifetime + Duration::from_secs(10);
    loop {
        tokio::time::sleep(lifetime / 4).await;
        match cache.record(&key, "req-b").await.unwrap() {
            ReplayOutcome::First => break,
            _ if Instant::now() < deadline => {}
            other => panic!("not forgotten 10s after the lifetime: {other:?}"),
        }
    }
    assert!(start.elapsed() >= lifetime, "forgotten too early");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lifetime_covers_both_windows_and_the_queue() {
        let s = Duration::from_secs;
        assert_eq!(record_lifetime(s(60), s(86_400), s(60)), s(86_580));
        assert_eq!(record_lifetime(s(2), s(0), s(0)), s(4));
    }

    #[test]
    fn keys_are_scoped_by_thumbprint_and_safe() {
        let a = ReplayKey::new("NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs", "x");
        let b = ReplayKey::new("other-thumbprint", "x");
        assert_ne!(a.kv_key(), b.kv_key());
        assert!(
            a.kv_key()
                .starts_with("NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs.")
        );
        assert_eq!(ReplayKey::new("k", "x"), ReplayKey::new("k", "x"));
        let odd = ReplayKey::new("a.b>*", "j");
        assert!(
            odd.kv_key()
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || b"-_.".contains(&c)),
            "{}",
            odd.kv_key()
        );
        assert_eq!(odd.kv_key().matches('.').count(), 1);
        assert!(a.redis_key("p:").starts_with("p:NzbLsX"));
    }

    #[tokio::test]
    async fn a_deferred_store_refuses_until_it_is_set() {
        let deferred = DeferredReplayCache::default();
        let key = ReplayKey::new("k", "j");
        assert_eq!(
            deferred.record(&key, "a").await.map_err(|e| e.kind),
            Err(ReplayErrorKind::Unavailable)
        );
        let memory = Arc::new(MemoryReplayCache::new(10, Duration::from_secs(60)));
        assert!(deferred.set(memory.clone()));
        assert!(!deferred.set(memory), "set once");
        assert_eq!(deferred.record(&key, "a").await, Ok(ReplayOutcome::First));
        assert_eq!(
            deferred.record(&key, "b").await,
            Ok(ReplayOutcome::Replayed)
        );
    }
}
