//! Idempotency records in Redis: `lease:<owner>` with a PX expiry while a replica works on
//! the request, `done:<result sequence>` with the record TTL afterwards. One Lua script per
//! operation keeps check-and-set atomic across replicas.

use std::time::Duration;

use ::redis::Script;
use async_trait::async_trait;
use signer_actors::ports::{Claim, IdempotencyStore, PortError};

pub struct RedisIdempotency {
    pool: crate::redis::Redis,
    prefix: String,
    ttl: Duration,
    claim: Script,
    release: Script,
}

const CLAIM: &str = r"
local v = redis.call('GET', KEYS[1])
if (not v) or v == ('lease:' .. ARGV[1]) then
  redis.call('SET', KEYS[1], 'lease:' .. ARGV[1], 'PX', ARGV[2])
  return {'acquired', 0}
end
if string.sub(v, 1, 5) == 'done:' then
  return {'done', tonumber(string.sub(v, 6))}
end
return {'busy', redis.call('PTTL', KEYS[1])}
";

const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ('lease:' .. ARGV[1]) then
  return redis.call('DEL', KEYS[1])
end
return 0
";

fn port(e: impl std::fmt::Display) -> PortError {
    PortError::transient(e.to_string()).context("redis")
}

impl RedisIdempotency {
    pub fn new(pool: crate::redis::Redis, prefix: impl Into<String>, ttl: Duration) -> Self {
        RedisIdempotency {
            pool,
            prefix: prefix.into(),
            ttl,
            claim: Script::new(CLAIM),
            release: Script::new(RELEASE),
        }
    }

    fn key(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }
}

#[async_trait]
impl IdempotencyStore for RedisIdempotency {
    async fn claim(&self, key: &str, owner: &str, lease: Duration) -> Result<Claim, PortError> {
        let mut conn = self.pool.clone();
        let (state, n): (String, i64) = self
            .claim
            .key(self.key(key))
            .arg(owner)
            .arg(lease.as_millis() as u64)
            .invoke_async(&mut conn)
            .await
            .map_err(port)?;
        Ok(match state.as_str() {
            "acquired" => Claim::Acquired,
            "done" => Claim::Done {
                result_sequence: n.max(0) as u64,
            },
            _ => Claim::Busy {
                retry_after: Duration::from_millis(n.max(50) as u64),
            },
        })
    }

    async fn complete(&self, key: &str, result_sequence: u64) -> Result<(), PortError> {
        let mut conn = self.pool.clone();
        ::redis::cmd("SET")
            .arg(self.key(key))
            .arg(format!("done:{result_sequence}"))
            .arg("PX")
            .arg(self.ttl.as_millis() as u64)
            .query_async::<()>(&mut conn)
            .await
            .map_err(port)
    }

    async fn release(&self, key: &str, owner: &str) -> Result<(), PortError> {
        let mut conn = self.pool.clone();
        self.release
            .key(self.key(key))
            .arg(owner)
            .invoke_async::<i64>(&mut conn)
            .await
            .map(|_| ())
            .map_err(port)
    }
}
