//! DPoP replay records in memory, for a single process (or tests): nothing is shared between
//! replicas, and a restart forgets every record.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use sha2::{Digest, Sha256};

use super::{ReplayCache, ReplayError, ReplayErrorKind, ReplayKey, ReplayOutcome};

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replay::exercise_store;

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
}
