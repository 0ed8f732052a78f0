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
//! **Where.** By default in a JetStream key-value bucket (`crate::jetstream::replay`), beside
//! the jobs and replicated like them, so a Redis restart forgets nothing. Redis (`SET NX PX`
//! in a Lua script) is selectable for operators who run it with persistence; memory is for
//! tests and a single process.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ::redis::Script;
use async_trait::async_trait;
use sha2::{Digest, Sha256};

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

/// Most records kept in memory. Past it new proofs are refused with a retryable error rather
/// than forgetting live records (which would let their proofs be replayed).
pub const MEMORY_REPLAY_CAPACITY: usize = 500_000;

type Digest32 = [u8; 32];

/// In-memory records, for a single process (or tests).
pub struct MemoryReplayCache {
    inner: Mutex<MemoryInner>,
    capacity: usize,
    lifetime: Duration,
}

#[derive(Default)]
struct MemoryInner {
    records: HashMap<Digest32, (Digest32, Instant)>,
    /// Insertion order, which is expiry order since every record has the same lifetime.
    queue: VecDeque<(Instant, Digest32)>,
}

impl MemoryReplayCache {
    pub fn new(capacity: usize, lifetime: Duration) -> Self {
        MemoryReplayCache {
            inner: Mutex::new(MemoryInner::default()),
            capacity: capacity.max(1),
            lifetime,
        }
    }
}

#[async_trait]
impl ReplayCache for MemoryReplayCache {
    async fn record(&self, key: &ReplayKey, binding: &str) -> Result<ReplayOutcome, ReplayError> {
        let key: Digest32 = Sha256::digest(key.kv_key().as_bytes()).into();
        let binding: Digest32 = Sha256::digest(binding.as_bytes()).into();
        let now = Instant::now();
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        while let Some(&(expires, k)) = inner.queue.front() {
            if expires > now {
                break;
            }
            inner.queue.pop_front();
            if inner.records.get(&k).is_some_and(|(_, e)| *e == expires) {
                inner.records.remove(&k);
            }
        }
        if let Some((seen, expires)) = inner.records.get(&key)
            && *expires > now
        {
            return Ok(if *seen == binding {
                ReplayOutcome::SameRequest
            } else {
                ReplayOutcome::Replayed
            });
        }
        if inner.records.len() >= self.capacity {
            return Err(ReplayError {
                kind: ReplayErrorKind::Full,
                store: "memory",
                detail: format!(
                    "full ({} live proofs); use the jetstream store for this load",
                    self.capacity
                ),
            });
        }
        let expires = now + self.lifetime;
        inner.records.insert(key, (binding, expires));
        inner.queue.push_back((expires, key));
        Ok(ReplayOutcome::First)
    }
}

/// A store that is opened later: the service builds (and so checks) its gates before it waits
/// for NATS, and opens the JetStream bucket once NATS is there. Until [`Self::set`], every
/// record is refused as unavailable (retryable), never let through.
#[derive(Default)]
pub struct DeferredReplayCache {
    store: std::sync::OnceLock<std::sync::Arc<dyn ReplayCache>>,
}

impl DeferredReplayCache {
    /// Installs the store; a second call is ignored (returns `false`).
    pub fn set(&self, store: std::sync::Arc<dyn ReplayCache>) -> bool {
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

/// 1: recorded now; 2: recorded before with the same binding; 0: replay.
const RECORD: &str = r"
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return 1
end
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return 2
end
return 0
";

/// Records in Redis, shared by every replica. Only as durable as the Redis deployment: a
/// restart without persistence forgets every record (docs/security.md).
pub struct RedisReplayCache {
    pool: crate::redis::Redis,
    prefix: String,
    lifetime_ms: u64,
    script: Script,
}

impl RedisReplayCache {
    pub fn new(pool: crate::redis::Redis, prefix: impl Into<String>, lifetime: Duration) -> Self {
        RedisReplayCache {
            pool,
            prefix: prefix.into(),
            lifetime_ms: u64::try_from(lifetime.as_millis())
                .unwrap_or(u64::MAX)
                .max(1),
            script: Script::new(RECORD),
        }
    }
}

#[async_trait]
impl ReplayCache for RedisReplayCache {
    async fn record(&self, key: &ReplayKey, binding: &str) -> Result<ReplayOutcome, ReplayError> {
        let mut conn = self.pool.clone();
        let answer: i64 = self
            .script
            .key(key.redis_key(&self.prefix))
            .arg(binding)
            .arg(self.lifetime_ms)
            .invoke_async(&mut conn)
            .await
            .map_err(|e| ReplayError::unavailable("redis", e))?;
        Ok(match answer {
            1 => ReplayOutcome::First,
            2 => ReplayOutcome::SameRequest,
            _ => ReplayOutcome::Replayed,
        })
    }
}

/// The behaviour every store must have; shared with the JetStream store's tests.
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
    async fn memory_records_once_per_request_and_expire() {
        let lifetime = Duration::from_millis(300);
        exercise_store(&MemoryReplayCache::new(100, lifetime), lifetime, "m").await;
        let small = MemoryReplayCache::new(1, Duration::from_secs(60));
        small.record(&ReplayKey::new("k", "a"), "x").await.unwrap();
        let full = small.record(&ReplayKey::new("k", "b"), "x").await;
        assert_eq!(
            full.map_err(|e| e.kind),
            Err(ReplayErrorKind::Full),
            "full: refuse, never forget"
        );
    }

    #[tokio::test]
    async fn a_deferred_store_refuses_until_it_is_set() {
        let deferred = DeferredReplayCache::default();
        let key = ReplayKey::new("k", "j");
        assert_eq!(
            deferred.record(&key, "a").await.map_err(|e| e.kind),
            Err(ReplayErrorKind::Unavailable)
        );
        let memory = std::sync::Arc::new(MemoryReplayCache::new(10, Duration::from_secs(60)));
        assert!(deferred.set(memory.clone()));
        assert!(!deferred.set(memory), "set once");
        assert_eq!(deferred.record(&key, "a").await, Ok(ReplayOutcome::First));
        assert_eq!(
            deferred.record(&key, "b").await,
            Ok(ReplayOutcome::Replayed)
        );
    }

    #[cfg(feature = "integration")]
    #[tokio::test]
    async fn redis_records_once_per_request_and_expire() {
        let pool = super::super::testkit::redis_pool();
        let lifetime = Duration::from_millis(300);
        let cache = RedisReplayCache::new(pool, super::super::testkit::unique_prefix(), lifetime);
        exercise_store(&cache, lifetime, "r").await;
    }
}
