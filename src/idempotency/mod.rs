//! Idempotency records: which requests a job attempt is working on (a lease), which were
//! signed (the result message, recorded before it is published) and which are done (the
//! result's sequence), so a republished request is answered with its original result and never
//! signed twice (the `IdempotencyStore` port).
//!
//! - [`KvIdempotency`] (`kv.rs`): a JetStream key-value bucket, the default, also when Redis is
//!   configured: the records live beside the jobs, replicated and on disk like them;
//! - [`RedisIdempotency`] (`redis.rs`): Redis, when chosen explicitly
//!   (`idempotency.backend = "redis"`); only as durable as the Redis deployment.
//!
//! [`open`] picks the configured one.

mod kv;
mod redis;

use std::sync::Arc;

use signer_actors::ports::IdempotencyStore;

use crate::config::{IdempotencyBackend, IdempotencyConfig};
use crate::jetstream::NatsError;

pub use self::kv::KvIdempotency;
pub use self::redis::RedisIdempotency;

/// Why the configured store could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The JetStream bucket could not be opened or created.
    #[error(transparent)]
    Nats(#[from] NatsError),
    /// `backend = "redis"` without a Redis connection (`[redis]`).
    #[error("[redis] missing")]
    NoRedis,
}

/// Opens the store `backend` names: the bucket `cfg.bucket` for JetStream, `redis` (with
/// `cfg.redis_prefix`) for Redis. Records are kept `cfg.ttl`.
pub async fn open(
    backend: IdempotencyBackend,
    cfg: &IdempotencyConfig,
    js: &async_nats::jetstream::Context,
    redis: Option<crate::redis::Redis>,
) -> Result<Arc<dyn IdempotencyStore>, OpenError> {
    Ok(match backend {
        IdempotencyBackend::Redis => {
            tracing::warn!(
                "idempotency records in Redis: a Redis restart without persistence forgets which requests were signed, and republished ones are signed again"
            );
            let conn = redis.ok_or(OpenError::NoRedis)?;
            Arc::new(RedisIdempotency::new(
                conn,
                cfg.redis_prefix.clone(),
                cfg.ttl,
            ))
        }
        IdempotencyBackend::Jetstream => {
            Arc::new(KvIdempotency::open(js, &cfg.bucket, cfg.ttl).await?)
        }
    })
}
