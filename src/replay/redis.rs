//! DPoP replay records in Redis (`SET NX PX` in a Lua script), shared by every replica;
//! selectable for operators who run Redis with persistence.

use std::time::Duration;

use ::redis::Script;
use async_trait::async_trait;

use super::{ReplayCache, ReplayError, ReplayKey, ReplayOutcome};

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

/// Needs the machine's Redis: only with `--features integration`.
#[cfg(all(test, feature = "integration"))]
mod tests {
    use super::*;
    use crate::replay::exercise_store;

    #[tokio::test]
    async fn redis_records_once_per_request_and_expire() {
        let pool = crate::redis::connect_url("redis://127.0.0.1:6379").expect("redis url");
        let mut rnd = [0u8; 4];
        let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut rnd);
        let prefix = format!("test:replay:{}:{}:", std::process::id(), hex::encode(rnd));
        let lifetime = Duration::from_millis(300);
        let cache = RedisReplayCache::new(pool, prefix, lifetime);
        exercise_store(&cache, lifetime, "r").await;
    }
}
