//! Redis: one auto-reconnecting, multiplexed connection per process, shared by the
//! idempotency records, the quota buckets and the DPoP replay cache.
//!
//! A multiplexed connection pipelines every concurrent request on one socket, which is what
//! hundreds of in-flight jobs need. (A checkout pool with a health PING per checkout doubled
//! the round trips per operation and made the pool the pipeline's bottleneck; see
//! docs/performance.md.)

pub(crate) mod idempotency;

use std::time::Duration;

/// The shared connection; clone it per use (clones share the socket).
pub type Redis = ::redis::aio::ConnectionManager;

/// Connects lazily to `url` (the first command connects; a lost connection is re-made).
/// Every command fails after 2 s without an answer, so a hung Redis becomes an error the
/// caller handles (fail closed, or fail open where configured) instead of a stuck job.
pub fn connect_url(url: &str) -> Result<Redis, String> {
    let client = ::redis::Client::open(url).map_err(|e| format!("redis {url}: {e}"))?;
    let config = ::redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(2)))
        .set_response_timeout(Some(Duration::from_secs(2)))
        .set_number_of_retries(2)
        .set_max_delay(Duration::from_millis(500));
    ::redis::aio::ConnectionManager::new_lazy_with_config(client, config)
        .map_err(|e| format!("redis {url}: {e}"))
}

/// Connects to the configured Redis.
pub fn connect(cfg: &crate::config::RedisConfig) -> Result<Redis, String> {
    connect_url(&cfg.url)
}
