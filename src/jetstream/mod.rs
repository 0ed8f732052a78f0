//! NATS JetStream adapters: provisioning of the contract's streams and consumer, the job
//! source (durable pull consumer), the publisher and the key-value idempotency store.

pub mod idempotency;
pub mod provision;
pub mod publisher;
pub mod source;

use crate::config::NatsConfig;

/// Why NATS could not be used.
#[derive(Debug, thiserror::Error)]
pub enum NatsError {
    #[error("connecting to NATS at {url}: {reason}")]
    Connect { url: String, reason: String },
    #[error("stream {stream}: {reason}")]
    Stream { stream: String, reason: String },
    #[error("consumer {consumer}: {reason}")]
    Consumer { consumer: String, reason: String },
    #[error("key-value bucket {bucket}: {reason}")]
    Bucket { bucket: String, reason: String },
}

/// Connects with the configured URL and credentials.
pub async fn connect(cfg: &NatsConfig, name: &str) -> Result<async_nats::Client, NatsError> {
    let mut options = async_nats::ConnectOptions::new()
        .name(name)
        .retry_on_initial_connect();
    if let Some(creds) = &cfg.credentials {
        options = options
            .credentials_file(creds)
            .await
            .map_err(|e| NatsError::Connect {
                url: cfg.url.clone(),
                reason: e.to_string(),
            })?;
    }
    let connect = options.connect(cfg.url.as_str());
    match tokio::time::timeout(std::time::Duration::from_secs(10), connect).await {
        Ok(Ok(client)) => Ok(client),
        Ok(Err(e)) => Err(NatsError::Connect {
            url: cfg.url.clone(),
            reason: e.to_string(),
        }),
        Err(_) => Err(NatsError::Connect {
            url: cfg.url.clone(),
            reason: "no answer within 10s".into(),
        }),
    }
}

/// Converts our header list to NATS headers.
pub fn to_headers(headers: &[(String, String)]) -> async_nats::HeaderMap {
    let mut map = async_nats::HeaderMap::new();
    for (k, v) in headers {
        map.insert(k.as_str(), v.as_str());
    }
    map
}
