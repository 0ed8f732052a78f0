//! Creates the contract's streams and the durable consumer when they are missing, and
//! leaves existing ones exactly as they are (operators may provision them with other
//! settings, such as replicas = 3 in a cluster).

use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};

use super::NatsError;
use crate::config::NatsConfig;

/// The provisioned streams, and the consumer's settings as the server has them.
pub struct Provisioned {
    /// The requests stream (the consumer is looked up on it again when it is replaced).
    pub requests: stream::Stream,
    pub results: stream::Stream,
    /// The consumer's max deliveries and ack wait as the server has them (they may differ
    /// from config when the consumer existed before).
    pub max_deliver: u64,
    pub ack_wait: Duration,
}

fn stream_error(name: &str) -> impl Fn(String) -> NatsError + '_ {
    move |reason| NatsError::Stream {
        stream: name.to_string(),
        reason,
    }
}

async fn ensure_stream(
    js: &jetstream::Context,
    config: stream::Config,
) -> Result<stream::Stream, NatsError> {
    let name = config.name.clone();
    if let Ok(s) = js.get_stream(&name).await {
        return Ok(s);
    }
    match js.create_stream(config).await {
        Ok(s) => {
            tracing::info!(stream = %name, "created stream");
            Ok(s)
        }
        // Another replica may have created it at the same moment.
        Err(e) => js
            .get_stream(&name)
            .await
            .map_err(|_| stream_error(&name)(e.to_string())),
    }
}

/// Request, result and audit streams, and the durable pull consumer.
pub async fn provision(
    js: &jetstream::Context,
    cfg: &NatsConfig,
) -> Result<Provisioned, NatsError> {
    let requests = ensure_stream(
        js,
        stream::Config {
            name: cfg.requests_stream.clone(),
            subjects: vec![cfg.subject("sign.requests"), cfg.subject("sign.requests.>")],
            retention: stream::RetentionPolicy::WorkQueue,
            duplicate_window: cfg.duplicate_window,
            storage: stream::StorageType::File,
            ..Default::default()
        },
    )
    .await?;
    let results = ensure_stream(
        js,
        stream::Config {
            name: cfg.results_stream.clone(),
            subjects: vec![cfg.subject("sign.completed"), cfg.subject("sign.failed")],
            retention: stream::RetentionPolicy::Limits,
            max_age: cfg.results_max_age,
            duplicate_window: cfg.duplicate_window,
            storage: stream::StorageType::File,
            allow_direct: true,
            ..Default::default()
        },
    )
    .await?;
    ensure_stream(
        js,
        stream::Config {
            name: cfg.audit_stream.clone(),
            subjects: vec![cfg.subject("signer.audit.>")],
            retention: stream::RetentionPolicy::Limits,
            max_age: cfg.audit_max_age,
            duplicate_window: Duration::from_secs(120),
            storage: stream::StorageType::File,
            ..Default::default()
        },
    )
    .await?;
    let consumer = ensure_consumer(&requests, cfg).await?;
    let (max_deliver, ack_wait) = consumer_settings(&consumer.cached_info().config);
    Ok(Provisioned {
        requests,
        results,
        max_deliver,
        ack_wait,
    })
}

/// The durable pull consumer on `requests` named `cfg.consumer`: the existing one, as it is,
/// or a new one with the configured settings. Called at startup and again whenever the
/// Intake replaces a broken pull subscription, so a consumer that was deleted is recreated
/// and one that was recreated by someone else is picked up.
pub async fn ensure_consumer(
    requests: &stream::Stream,
    cfg: &NatsConfig,
) -> Result<consumer::PullConsumer, NatsError> {
    let consumer_error = |reason: String| NatsError::Consumer {
        consumer: cfg.consumer.clone(),
        reason,
    };
    if let Ok(c) = requests.get_consumer(&cfg.consumer).await {
        return Ok(c);
    }
    let config = consumer::pull::Config {
        durable_name: Some(cfg.consumer.clone()),
        ack_policy: consumer::AckPolicy::Explicit,
        ack_wait: cfg.ack_wait,
        max_deliver: i64::try_from(cfg.max_deliver).unwrap_or(i64::MAX),
        max_ack_pending: -1,
        ..Default::default()
    };
    match requests.create_consumer(config).await {
        Ok(c) => {
            tracing::info!(consumer = %cfg.consumer, "created consumer");
            Ok(c)
        }
        // Another replica may have created it at the same moment.
        Err(e) => requests
            .get_consumer(&cfg.consumer)
            .await
            .map_err(|_| consumer_error(e.to_string())),
    }
}

/// A consumer's max deliveries (`u64::MAX` when unlimited) and ack wait.
pub fn consumer_settings(config: &consumer::Config) -> (u64, Duration) {
    let max_deliver = match config.max_deliver {
        n if n > 0 => n as u64,
        _ => u64::MAX,
    };
    (max_deliver, config.ack_wait)
}
