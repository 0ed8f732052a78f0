//! The DPoP replay cache: a proof's `jti` may be used once.
//!
//! "Once" means for one request. JetStream redelivers a job whose processing failed or whose
//! worker died, byte for byte, with the same proof; that is not a replay, and refusing it would
//! turn every retryable failure into a permanent `dpop_replayed`. So each record holds a
//! binding (a hash of the request it was first used with): the same request may present the
//! proof again, any other request is refused. Records live twice the proof's accepted age,
//! after which the proof's `iat` check refuses it anyway.
//!
//! With Redis the records are shared by all replicas (`SET NX PX` in a Lua script, so the
//! check and the write are one step); without it they are kept in memory, per replica.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ::redis::Script;
use async_trait::async_trait;
use sha2::{Digest, Sha256};

/// What the cache said about a `jti`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplayOutcome {
    /// Not seen before: now recorded.
    First,
    /// Seen before with the same request (a redelivery).
    SameRequest,
    /// Seen before with another request.
    Replayed,
}

/// The cache could not answer; the job should be retried.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("DPoP replay cache: {0}")]
pub struct ReplayError(pub String);

/// Records `jti`s (by key) with the request they were first used with.
#[async_trait]
pub trait ReplayCache: Send + Sync {
    async fn record(
        &self,
        key: &str,
        binding: &str,
        ttl: Duration,
    ) -> Result<ReplayOutcome, ReplayError>;
}

/// Most records kept in memory. Past it new proofs are refused with a retryable error rather
/// than forgetting live records (which would let their proofs be replayed).
pub const MEMORY_REPLAY_CAPACITY: usize = 500_000;

type Digest32 = [u8; 32];

/// In-memory records, for a single replica (or tests).
pub struct MemoryReplayCache {
    inner: Mutex<MemoryInner>,
    capacity: usize,
}

#[derive(Default)]
struct MemoryInner {
    records: HashMap<Digest32, (Digest32, Instant)>,
    /// Insertion order, which is expiry order when every record has the same TTL.
    queue: VecDeque<(Instant, Digest32)>,
}

impl MemoryReplayCache {
    pub fn new(capacity: usize) -> Self {
        MemoryReplayCache {
            inner: Mutex::new(MemoryInner::default()),
            capacity: capacity.max(1),
        }
    }
}

impl Default for MemoryReplayCache {
    fn default() -> Self {
        Self::new(MEMORY_REPLAY_CAPACITY)
    }
}

#[async_trait]
impl ReplayCache for MemoryReplayCache {
    async fn record(
        &self,
        key: &str,
        binding: &str,
        ttl: Duration,
    ) -> Result<ReplayOutcome, ReplayError> {
        let key: Digest32 = Sha256::digest(key.as_bytes()).into();
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
            return Err(ReplayError(format!(
                "in-memory cache full ({} live proofs); configure [redis] for this load",
                self.capacity
            )));
        }
        let expires = now + ttl;
        inner.records.insert(key, (binding, expires));
        inner.queue.push_back((expires, key));
        Ok(ReplayOutcome::First)
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

/// Records in Redis, shared by every replica.
pub struct RedisReplayCache {
    pool: crate::redis::Redis,
    script: Script,
}

impl RedisReplayCache {
    pub fn new(pool: crate::redis::Redis) -> Self {
        RedisReplayCache {
            pool,
            script: Script::new(RECORD),
        }
    }
}

#[async_trait]
impl ReplayCache for RedisReplayCache {
    async fn record(
        &self,
        key: &str,
        binding: &str,
        ttl: Duration,
    ) -> Result<ReplayOutcome, ReplayError> {
        let mut conn = self.pool.clone();
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        let answer: i64 = self
            .script
            .key(key)
            .arg(binding)
            .arg(ttl_ms)
            .invoke_async(&mut conn)
            .await
            .map_err(|e| ReplayError(format!("redis: {e}")))?;
        Ok(match answer {
            1 => ReplayOutcome::First,
            2 => ReplayOutcome::SameRequest,
            _ => ReplayOutcome::Replayed,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn exercise(cache: &dyn ReplayCache, prefix: &str) {
        let ttl = Duration::from_millis(300);
        let key = format!("{prefix}jti-1");
        assert_eq!(
            cache.record(&key, "req-a", ttl).await.unwrap(),
            ReplayOutcome::First
        );
        assert_eq!(
            cache.record(&key, "req-a", ttl).await.unwrap(),
            ReplayOutcome::SameRequest
        );
        assert_eq!(
            cache.record(&key, "req-b", ttl).await.unwrap(),
            ReplayOutcome::Replayed
        );
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(
            cache.record(&key, "req-b", ttl).await.unwrap(),
            ReplayOutcome::First,
            "forgotten after its TTL"
        );
    }

    #[tokio::test]
    async fn memory_records_once_per_request_and_expire() {
        exercise(&MemoryReplayCache::default(), "").await;
        let small = MemoryReplayCache::new(1);
        let ttl = Duration::from_secs(60);
        small.record("a", "x", ttl).await.unwrap();
        assert!(
            small.record("b", "x", ttl).await.is_err(),
            "full: refuse, never forget"
        );
    }

    #[tokio::test]
    async fn redis_records_once_per_request_and_expire() {
        let pool = super::super::testkit::redis_pool();
        exercise(
            &RedisReplayCache::new(pool),
            &super::super::testkit::unique_prefix(),
        )
        .await;
    }
}
