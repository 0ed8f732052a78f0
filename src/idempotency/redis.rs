//! Idempotency records in Redis: `lease:<owner>` with a PX expiry while a job attempt works
//! on the request (the owner names the attempt, not only the replica), `signed:<outcome
//! record>` once it is signed and audited and its result is about to be published, then
//! `done:<result sequence>`; both with the record TTL. One Lua script per operation keeps
//! check-and-set atomic across replicas.

use std::time::Duration;

use ::redis::Script;
use async_trait::async_trait;
use signer_actors::ports::{Claim, IdempotencyStore, OutMessage, PortError, Recorded};

pub struct RedisIdempotency {
    pool: crate::redis::Redis,
    prefix: String,
    ttl: Duration,
    claim: Script,
    record: Script,
    release: Script,
}

const CLAIM: &str = r"
local v = redis.call('GET', KEYS[1])
if (not v) or v == ('lease:' .. ARGV[1]) then
  redis.call('SET', KEYS[1], 'lease:' .. ARGV[1], 'PX', ARGV[2])
  return {'acquired', '0'}
end
if string.sub(v, 1, 5) == 'done:' then
  return {'done', string.sub(v, 6)}
end
if string.sub(v, 1, 7) == 'signed:' then
  return {'signed', string.sub(v, 8)}
end
return {'busy', tostring(redis.call('PTTL', KEYS[1]))}
";

const RECORD: &str = r"
if redis.call('GET', KEYS[1]) == ('lease:' .. ARGV[1]) then
  redis.call('SET', KEYS[1], 'signed:' .. ARGV[2], 'PX', ARGV[3])
  return 1
end
return 0
";

const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ('lease:' .. ARGV[1]) then
  return redis.call('DEL', KEYS[1])
end
return 0
";

/// A reply of the claim script that is not what it writes (another program's key).
fn unreadable(what: &str) -> PortError {
    PortError::permanent(format!("unreadable idempotency record: {what}")).context("redis")
}

/// The number in a claim reply.
fn number(value: &[u8]) -> Result<i64, PortError> {
    std::str::from_utf8(value)
        .ok()
        .and_then(|t| t.parse().ok())
        .ok_or_else(|| unreadable("not a number"))
}

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
            record: Script::new(RECORD),
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
        let (state, value): (String, Vec<u8>) = self
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
                result_sequence: number(&value)?.max(0) as u64,
            },
            "signed" => Claim::Signed {
                outcome: OutMessage::from_record(&value)
                    .map_err(|e| PortError::permanent(e).context("redis: signed record"))?,
            },
            _ => Claim::Busy {
                retry_after: Duration::from_millis(number(&value)?.max(50) as u64),
            },
        })
    }

    async fn record(
        &self,
        key: &str,
        owner: &str,
        outcome: &OutMessage,
    ) -> Result<Recorded, PortError> {
        let mut conn = self.pool.clone();
        let kept: i64 = self
            .record
            .key(self.key(key))
            .arg(owner)
            .arg(outcome.to_record())
            .arg(self.ttl.as_millis() as u64)
            .invoke_async(&mut conn)
            .await
            .map_err(port)?;
        Ok(if kept == 1 {
            Recorded::Kept
        } else {
            Recorded::LeaseLost
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

// Against the machine's Redis: `--features integration`.
#[cfg(all(test, feature = "integration"))]
mod tests {
    use super::*;

    #[tokio::test]
    async fn redis_attempts_lease_record_and_complete() {
        let pool = crate::redis::connect_url("redis://127.0.0.1:6379").expect("redis url");
        let mut rnd = [0u8; 4];
        let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut rnd);
        let prefix = format!("test-idem-{}-{}:", std::process::id(), hex::encode(rnd));
        let store = RedisIdempotency::new(pool.clone(), prefix.clone(), Duration::from_secs(60));
        let lease = Duration::from_secs(30);
        let key = "acme/req:1";
        assert_eq!(
            store.claim(key, "w1.aa", lease).await.unwrap(),
            Claim::Acquired
        );
        assert_eq!(
            store.claim(key, "w1.aa", lease).await.unwrap(),
            Claim::Acquired,
            "the holder may renew its lease"
        );
        assert!(
            matches!(store.claim(key, "w1.bb", lease).await.unwrap(), Claim::Busy { retry_after } if retry_after <= lease),
            "another attempt of the same worker waits"
        );
        let outcome = OutMessage {
            subject: "sign.completed".into(),
            headers: vec![("Nats-Msg-Id".into(), key.into())],
            body: vec![0xa1, 0x00, b'\n', 0xff, b':'],
        };
        assert_eq!(
            store.record(key, "w1.bb", &outcome).await.unwrap(),
            Recorded::LeaseLost
        );
        assert_eq!(
            store.record(key, "w1.aa", &outcome).await.unwrap(),
            Recorded::Kept
        );
        for owner in ["w1.aa", "w2.cc"] {
            assert_eq!(
                store.claim(key, owner, lease).await.unwrap(),
                Claim::Signed {
                    outcome: outcome.clone()
                }
            );
        }
        store.release(key, "w1.aa").await.unwrap();
        assert!(matches!(
            store.claim(key, "w2.cc", lease).await.unwrap(),
            Claim::Signed { .. }
        ));
        store.complete(key, 9).await.unwrap();
        assert_eq!(
            store.claim(key, "w2.cc", lease).await.unwrap(),
            Claim::Done { result_sequence: 9 }
        );
        let mut conn = pool;
        let _: Result<(), _> = ::redis::cmd("DEL")
            .arg(format!("{prefix}{key}"))
            .query_async(&mut conn)
            .await;
    }
}
