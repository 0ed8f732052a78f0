//! Redis adapters (deadpool-redis): idempotency records shared by all replicas.

pub mod idempotency;

/// Builds a connection pool.
pub fn pool(cfg: &crate::config::RedisConfig) -> Result<deadpool_redis::Pool, String> {
    let mut config = deadpool_redis::Config::from_url(cfg.url.clone());
    config.pool = Some(deadpool_redis::PoolConfig::new(cfg.pool_size));
    config
        .create_pool(Some(deadpool_redis::Runtime::Tokio1))
        .map_err(|e| format!("redis pool: {e}"))
}
