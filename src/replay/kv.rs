//! DPoP replay records in a JetStream key-value bucket (the default store).
//!
//! The records live where the jobs do: a proof's copies wait in the requests stream, and its
//! record waits beside them in a file-backed stream replicated like the others, so losing
//! Redis (or restarting it without persistence) cannot let a replay through.
//!
//! Key `<jkt>.<sha256(jti)>` ([`ReplayKey::kv_key`]), value the request binding. The first
//! use is `kv.create`, which the server applies only when the key has no value (expected last
//! subject sequence 0): of two replicas racing with copies of one proof, exactly one creates.
//! NATS 2.9 has no per-message TTL, so every record lives the bucket's `max_age`, which is
//! set to the configured lifetime (and raised when an existing bucket's is shorter).

use std::time::Duration;

use async_nats::jetstream::{self, kv};
use async_trait::async_trait;

use super::{ReplayCache, ReplayError, ReplayKey, ReplayOutcome};
use crate::jetstream::NatsError;

/// Tries of create-then-read when a record expires between the two.
const RECORD_ATTEMPTS: usize = 3;

pub struct KvReplayCache {
    store: kv::Store,
}

fn unavailable(e: impl std::fmt::Display) -> ReplayError {
    ReplayError::unavailable("jetstream", e)
}

impl KvReplayCache {
    /// Opens (or creates) the bucket with `max_age` = `lifetime`. An existing bucket whose
    /// `max_age` is shorter is raised to `lifetime` (records forgotten too early would let
    /// replays through); a longer one is kept, so replicas with different settings never
    /// shorten each other's records.
    pub async fn open(
        js: &jetstream::Context,
        bucket: &str,
        lifetime: Duration,
    ) -> Result<Self, NatsError> {
        let store = crate::jetstream::open_bucket(js, bucket, lifetime).await?;
        ensure_max_age(js, bucket, lifetime).await?;
        Ok(KvReplayCache { store })
    }
}

/// Raises the bucket stream's `max_age` to at least `lifetime` (0, never expiring, is kept).
async fn ensure_max_age(
    js: &jetstream::Context,
    bucket: &str,
    lifetime: Duration,
) -> Result<(), NatsError> {
    let err = |e: &dyn std::fmt::Display| NatsError::Bucket {
        bucket: bucket.to_string(),
        reason: e.to_string(),
    };
    let mut stream = js
        .get_stream(format!("KV_{bucket}"))
        .await
        .map_err(|e| err(&e))?;
    let mut config = stream.info().await.map_err(|e| err(&e))?.config.clone();
    if config.max_age.is_zero() || config.max_age >= lifetime {
        return Ok(());
    }
    tracing::warn!(
        bucket,
        from_s = config.max_age.as_secs(),
        to_s = lifetime.as_secs(),
        "DPoP replay bucket keeps records shorter than the configured lifetime; raising its max_age"
    );
    config.max_age = lifetime;
    js.update_stream(config).await.map_err(|e| err(&e))?;
    Ok(())
}

#[async_trait]
impl ReplayCache for KvReplayCache {
    async fn record(&self, key: &ReplayKey, binding: &str) -> Result<ReplayOutcome, ReplayError> {
        let key = key.kv_key();
        for _ in 0..RECORD_ATTEMPTS {
            match self
                .store
                .create(&key, binding.as_bytes().to_vec().into())
                .await
            {
                Ok(_) => return Ok(ReplayOutcome::First),
                Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {}
                Err(e) => return Err(unavailable(e)),
            }
            // Someone recorded it first: was it this request (a redelivery)?
            match self.store.get(&key).await.map_err(unavailable)? {
                Some(seen) if seen.as_ref() == binding.as_bytes() => {
                    return Ok(ReplayOutcome::SameRequest);
                }
                Some(_) => return Ok(ReplayOutcome::Replayed),
                // Expired between the two calls: record it again.
                None => continue,
            }
        }
        Err(unavailable(format!(
            "record {key} neither created nor readable after {RECORD_ATTEMPTS} tries"
        )))
    }
}

// Against the machine's NATS: `--features integration`.
#[cfg(all(test, feature = "integration"))]
mod tests {
    use super::*;
    use crate::replay::exercise_store;

    fn bucket(tag: &str) -> String {
        let mut rnd = [0u8; 4];
        let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut rnd);
        format!(
            "TEST_DPOP_{tag}_{}_{}",
            std::process::id(),
            hex::encode(rnd)
        )
    }

    async fn js() -> jetstream::Context {
        let client = async_nats::connect("nats://127.0.0.1:4222")
            .await
            .expect("NATS on 127.0.0.1:4222");
        jetstream::new(client)
    }

    #[tokio::test]
    async fn kv_records_once_per_request_per_key_and_expire() {
        let js = js().await;
        let name = bucket("EXPIRE");
        let lifetime = Duration::from_secs(2);
        let cache = KvReplayCache::open(&js, &name, lifetime).await.unwrap();
        exercise_store(&cache, lifetime, "kv").await;
        let _ = js.delete_stream(format!("KV_{name}")).await;
    }

    #[tokio::test]
    async fn kv_records_are_shared_and_only_one_racer_wins() {
        let js = js().await;
        let name = bucket("RACE");
        let lifetime = Duration::from_secs(60);
        let a = KvReplayCache::open(&js, &name, lifetime).await.unwrap();
        let b = KvReplayCache::open(&js, &name, lifetime).await.unwrap();
        let key = ReplayKey::new("jkt-race", "jti-race");
        let (ra, rb) = tokio::join!(a.record(&key, "req-a"), b.record(&key, "req-b"));
        let mut outcomes = [ra.unwrap(), rb.unwrap()];
        outcomes.sort_by_key(|o| *o as u8);
        assert_eq!(
            outcomes,
            [ReplayOutcome::First, ReplayOutcome::Replayed],
            "two requests with one proof: one is first, the other a replay"
        );
        let _ = js.delete_stream(format!("KV_{name}")).await;
    }

    #[tokio::test]
    async fn an_existing_shorter_bucket_is_raised_never_shortened() {
        let js = js().await;
        let name = bucket("AGE");
        let age = |js: jetstream::Context, name: String| async move {
            js.get_stream(format!("KV_{name}"))
                .await
                .unwrap()
                .info()
                .await
                .unwrap()
                .config
                .max_age
        };
        KvReplayCache::open(&js, &name, Duration::from_secs(60))
            .await
            .unwrap();
        KvReplayCache::open(&js, &name, Duration::from_secs(3600))
            .await
            .unwrap();
        assert_eq!(
            age(js.clone(), name.clone()).await,
            Duration::from_secs(3600)
        );
        KvReplayCache::open(&js, &name, Duration::from_secs(120))
            .await
            .unwrap();
        assert_eq!(
            age(js.clone(), name.clone()).await,
            Duration::from_secs(3600)
        );
        let _ = js.delete_stream(format!("KV_{name}")).await;
    }
}
