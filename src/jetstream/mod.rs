//! The broker itself: the connection ([`connect`]), provisioning of the contract's streams
//! and consumer, the job source (durable pull consumer) and the publisher, plus the helpers
//! the features that keep their state in JetStream share ([`open_bucket`], [`NatsError`]).
//! Those stores live in their feature's folder (`idempotency/kv.rs`, `replay/kv.rs`,
//! `keystate/`, `blobs/object_store.rs`).

pub mod provision;
pub mod publisher;
pub(crate) mod source;

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

/// Connects with the configured server list and credentials.
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
    // Every configured server: the client connects to one that answers and fails over to
    // the others (and to the servers the cluster announces) when it goes away.
    let connect = options.connect(cfg.servers());
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

/// Opens a key-value bucket, creating it when missing (`max_age` zero: entries never expire).
/// The backing stream is created directly with the key-value layout (`KV_<bucket>`,
/// `$KV.<bucket>.>`), because the client's bucket creation first queries account info in a
/// form NATS 2.9 does not answer.
pub async fn open_bucket(
    js: &async_nats::jetstream::Context,
    bucket: &str,
    max_age: std::time::Duration,
) -> Result<async_nats::jetstream::kv::Store, NatsError> {
    use async_nats::jetstream::stream;
    if let Ok(store) = js.get_key_value(bucket).await {
        return Ok(store);
    }
    let window = if max_age.is_zero() {
        std::time::Duration::from_secs(120)
    } else {
        max_age.min(std::time::Duration::from_secs(120))
    };
    let config = stream::Config {
        name: format!("KV_{bucket}"),
        subjects: vec![format!("$KV.{bucket}.>")],
        max_messages_per_subject: 1,
        max_age,
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        discard: stream::DiscardPolicy::New,
        duplicate_window: window,
        storage: stream::StorageType::File,
        ..Default::default()
    };
    if let Err(e) = js.create_stream(config).await {
        tracing::debug!(error = %e, bucket, "creating the bucket failed; maybe another replica did");
    }
    js.get_key_value(bucket)
        .await
        .map_err(|e| NatsError::Bucket {
            bucket: bucket.to_string(),
            reason: e.to_string(),
        })
}

/// Converts our header list to NATS headers.
pub fn to_headers(headers: &[(String, String)]) -> async_nats::HeaderMap {
    let mut map = async_nats::HeaderMap::new();
    for (k, v) in headers {
        map.insert(k.as_str(), v.as_str());
    }
    map
}
