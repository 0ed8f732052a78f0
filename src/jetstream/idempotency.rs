//! Idempotency records in a JetStream key-value bucket (the default, also when Redis is
//! configured: the records live beside the jobs, replicated and on disk like them, so a Redis
//! restart cannot make a republished request be signed again).
//!
//! Value: `lease <owner> <expiry unix ms>` while a replica works on the request, then
//! `done <result sequence>`. Compare-and-set on the entry revision makes a take-over of an
//! expired lease safe between replicas. The bucket's max age is the record TTL.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::jetstream::{self, kv};
use async_trait::async_trait;
use sha2::{Digest as _, Sha256};
use signer_actors::ports::{Claim, IdempotencyStore, PortError};

use super::NatsError;

pub struct KvIdempotency {
    store: kv::Store,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

/// KV keys allow few characters; requestIds allow `:`. Hash to a fixed, safe key.
fn kv_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

fn port(e: impl std::fmt::Display) -> PortError {
    PortError::transient(e.to_string()).context("idempotency bucket")
}

enum Record {
    Lease { owner: String, until_ms: u64 },
    Done { seq: u64 },
}

fn parse(value: &[u8]) -> Option<Record> {
    let text = std::str::from_utf8(value).ok()?;
    let mut parts = text.split(' ');
    match parts.next()? {
        "lease" => Some(Record::Lease {
            owner: parts.next()?.to_string(),
            until_ms: parts.next()?.parse().ok()?,
        }),
        "done" => Some(Record::Done {
            seq: parts.next()?.parse().ok()?,
        }),
        _ => None,
    }
}

impl KvIdempotency {
    /// Opens (or creates) the bucket. The backing stream is created directly with the
    /// key-value layout (`KV_<bucket>`, `$KV.<bucket>.>`), because the client's bucket
    /// creation first queries account info in a form NATS 2.9 does not answer.
    pub async fn open(
        js: &jetstream::Context,
        bucket: &str,
        ttl: Duration,
    ) -> Result<Self, NatsError> {
        let store = super::open_bucket(js, bucket, ttl).await?;
        Ok(KvIdempotency { store })
    }
}

#[async_trait]
impl IdempotencyStore for KvIdempotency {
    async fn claim(&self, key: &str, owner: &str, lease: Duration) -> Result<Claim, PortError> {
        let key = kv_key(key);
        let lease_value = || format!("lease {owner} {}", now_ms() + lease.as_millis() as u64);
        match self.store.create(&key, lease_value().into()).await {
            Ok(_) => return Ok(Claim::Acquired),
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {}
            Err(e) => return Err(port(e)),
        }
        let Some(entry) = self.store.entry(&key).await.map_err(port)? else {
            return Ok(Claim::Busy {
                retry_after: Duration::from_millis(50),
            });
        };
        let take_over = match (entry.operation, parse(&entry.value)) {
            (kv::Operation::Put, Some(Record::Done { seq })) => {
                return Ok(Claim::Done {
                    result_sequence: seq,
                });
            }
            (kv::Operation::Put, Some(Record::Lease { owner: o, until_ms }))
                if o != owner && until_ms > now_ms() =>
            {
                return Ok(Claim::Busy {
                    retry_after: Duration::from_millis(until_ms - now_ms()),
                });
            }
            _ => true,
        };
        debug_assert!(take_over);
        match self
            .store
            .update(&key, lease_value().into(), entry.revision)
            .await
        {
            Ok(_) => Ok(Claim::Acquired),
            Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => Ok(Claim::Busy {
                retry_after: Duration::from_millis(100),
            }),
            Err(e) => Err(port(e)),
        }
    }

    async fn complete(&self, key: &str, result_sequence: u64) -> Result<(), PortError> {
        self.store
            .put(kv_key(key), format!("done {result_sequence}").into())
            .await
            .map(|_| ())
            .map_err(port)
    }

    async fn release(&self, key: &str, owner: &str) -> Result<(), PortError> {
        let key = kv_key(key);
        if let Some(entry) = self.store.entry(&key).await.map_err(port)?
            && matches!(parse(&entry.value), Some(Record::Lease { owner: o, .. }) if o == owner)
        {
            self.store.delete(&key).await.map_err(port)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn bucket(tag: &str) -> (jetstream::Context, String) {
        let client = async_nats::connect("nats://127.0.0.1:4222")
            .await
            .expect("NATS on 127.0.0.1:4222");
        let mut rnd = [0u8; 4];
        let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut rnd);
        let name = format!(
            "TEST_IDEM_{tag}_{}_{}",
            std::process::id(),
            hex::encode(rnd)
        );
        (jetstream::new(client), name)
    }

    #[tokio::test]
    async fn kv_leases_complete_release_and_busy() {
        let (js, name) = bucket("LEASE").await;
        let ttl = Duration::from_secs(600);
        let a = KvIdempotency::open(&js, &name, ttl).await.unwrap();
        let b = KvIdempotency::open(&js, &name, ttl).await.unwrap();
        let lease = Duration::from_secs(30);
        let key = "acme/req:1";
        assert_eq!(a.claim(key, "w1", lease).await.unwrap(), Claim::Acquired);
        assert_eq!(
            a.claim(key, "w1", lease).await.unwrap(),
            Claim::Acquired,
            "the holder may renew its lease"
        );
        assert!(
            matches!(b.claim(key, "w2", lease).await.unwrap(), Claim::Busy { retry_after } if retry_after <= lease),
            "another worker waits for a live lease"
        );
        // Release by someone else changes nothing; by the holder frees the request.
        b.release(key, "w2").await.unwrap();
        assert!(matches!(
            b.claim(key, "w2", lease).await.unwrap(),
            Claim::Busy { .. }
        ));
        a.release(key, "w1").await.unwrap();
        assert_eq!(b.claim(key, "w2", lease).await.unwrap(), Claim::Acquired);
        b.complete(key, 42).await.unwrap();
        for (store, owner) in [(&a, "w1"), (&b, "w2")] {
            assert_eq!(
                store.claim(key, owner, lease).await.unwrap(),
                Claim::Done {
                    result_sequence: 42
                }
            );
        }
        // A store opened later (a restarted replica) still knows it.
        let c = KvIdempotency::open(&js, &name, ttl).await.unwrap();
        assert_eq!(
            c.claim(key, "w3", lease).await.unwrap(),
            Claim::Done {
                result_sequence: 42
            }
        );
        let _ = js.delete_stream(format!("KV_{name}")).await;
    }

    #[tokio::test]
    async fn kv_expired_lease_is_taken_over_once() {
        let (js, name) = bucket("TAKEOVER").await;
        let a = KvIdempotency::open(&js, &name, Duration::from_secs(600))
            .await
            .unwrap();
        let key = "acme/req:2";
        assert_eq!(
            a.claim(key, "dead", Duration::from_millis(200))
                .await
                .unwrap(),
            Claim::Acquired
        );
        tokio::time::sleep(Duration::from_millis(400)).await;
        let lease = Duration::from_secs(30);
        let (x, y) = tokio::join!(a.claim(key, "w1", lease), a.claim(key, "w2", lease));
        let won = [x.unwrap(), y.unwrap()]
            .iter()
            .filter(|c| **c == Claim::Acquired)
            .count();
        assert_eq!(
            won, 1,
            "compare-and-set: one worker takes an expired lease over"
        );
        let _ = js.delete_stream(format!("KV_{name}")).await;
    }
}
