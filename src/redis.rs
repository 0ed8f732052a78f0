//! The Redis connection: one auto-reconnecting, multiplexed connection per process, shared by
//! the features that can keep their state in Redis (`idempotency::redis`, `quota::redis`,
//! `replay::redis`). Like `jetstream/` for the broker, this is only the connection: each
//! feature's Redis store lives in that feature's folder.
//!
//! A multiplexed connection pipelines every concurrent request on one socket, which is what
//! hundreds of in-flight jobs need. (A checkout pool with a health PING per checkout doubled
//! the round trips per operation and made the pool the pipeline's bottleneck; see
//! docs/performance.md.)

use std::time::Duration;

/// The shared connection; clone it per use (clones share the socket).
pub type Redis = ::redis::aio::ConnectionManager;

/// The Redis URL cannot be used (malformed, or an unsupported scheme). Connecting itself is
/// lazy, so an unreachable Redis is not this error but a failure of the first command.
#[derive(Debug, thiserror::Error)]
#[error("redis {url}: {source}")]
pub struct ConnectError {
    pub url: String,
    #[source]
    pub source: ::redis::RedisError,
}

/// Connects lazily to `url` (the first command connects; a lost connection is re-made).
/// Every command fails after 2 s without an answer, so a hung Redis becomes an error the
/// caller handles (fail closed, or fail open where configured) instead of a stuck job.
pub fn connect_url(url: &str) -> Result<Redis, ConnectError> {
    let failed = |source| ConnectError {
        url: url.to_string(),
        source,
    };
    let client = ::redis::Client::open(url).map_err(failed)?;
    let config = ::redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(2)))
        .set_response_timeout(Some(Duration::from_secs(2)))
        .set_number_of_retries(2)
        .set_max_delay(Duration::from_millis(500));
    ::redis::aio::ConnectionManager::new_lazy_with_config(client, config).map_err(failed)
}

/// Connects to the configured Redis.
pub fn connect(cfg: &crate::config::RedisConfig) -> Result<Redis, ConnectError> {
    connect_url(&cfg.url)
}
