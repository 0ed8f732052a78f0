//! The blob bucket on a JetStream Object Store (`SIGNER_BLOBS` by default).

use std::time::Duration;

use async_nats::jetstream::{self, object_store};
use async_trait::async_trait;
use signer_actors::objects::ObjectRef;
use signer_actors::ports::{BlobError, BlobStore, PortError};
use tokio::io::AsyncReadExt as _;

use crate::jetstream::NatsError;

/// Chunk size of objects the signer stores: well under the default `max_payload` (1 MiB),
/// large enough that a 50 MB envelope is a few hundred messages.
const CHUNK_BYTES: usize = 256 << 10;

/// Opens the bucket `bucket`, creating it when missing with objects expiring after
/// `max_age`; an existing bucket is left as it is (operators may provision it with
/// replicas or another TTL).
pub async fn open(
    js: &jetstream::Context,
    bucket: &str,
    max_age: Duration,
) -> Result<object_store::ObjectStore, NatsError> {
    if let Ok(store) = js.get_object_store(bucket).await {
        return Ok(store);
    }
    let created = js
        .create_object_store(object_store::Config {
            bucket: bucket.to_string(),
            description: Some("stella-signer large payloads, envelopes and bundles".into()),
            max_age,
            storage: jetstream::stream::StorageType::File,
            ..Default::default()
        })
        .await;
    match created {
        Ok(store) => {
            tracing::info!(bucket, ttl = %humantime::format_duration(max_age), "created object store bucket");
            Ok(store)
        }
        // Another replica may have created it at the same moment.
        Err(e) => js
            .get_object_store(bucket)
            .await
            .map_err(|_| NatsError::Bucket {
                bucket: bucket.to_string(),
                reason: e.to_string(),
            }),
    }
}

/// [`BlobStore`] on a JetStream Object Store bucket.
pub struct JsBlobStore {
    store: object_store::ObjectStore,
    bucket: String,
}

impl JsBlobStore {
    pub fn new(store: object_store::ObjectStore, bucket: impl Into<String>) -> Self {
        JsBlobStore {
            store,
            bucket: bucket.into(),
        }
    }
}

#[async_trait]
impl BlobStore for JsBlobStore {
    fn bucket(&self) -> &str {
        &self.bucket
    }

    async fn get(&self, name: &str, limit: u64) -> Result<Vec<u8>, BlobError> {
        get_bounded(&self.store, name, limit).await
    }

    async fn put(&self, name: &str, bytes: &[u8]) -> Result<ObjectRef, BlobError> {
        put(&self.store, name, bytes).await?;
        Ok(ObjectRef::of(&self.bucket, name, bytes))
    }
}

/// Reads object `name`, refusing it by its recorded size before reading when that is over
/// `limit`, and never buffering more than `limit` bytes whatever the chunks hold.
pub async fn get_bounded(
    store: &object_store::ObjectStore,
    name: &str,
    limit: u64,
) -> Result<Vec<u8>, BlobError> {
    let not_found = || BlobError::NotFound {
        name: name.to_string(),
    };
    let info = match store.info(name).await {
        Ok(info) if info.deleted => return Err(not_found()),
        Ok(info) => info,
        Err(e) if e.kind() == object_store::InfoErrorKind::NotFound => return Err(not_found()),
        Err(e) => return Err(store_error(e, "object info")),
    };
    let size = info.size as u64;
    if size > limit {
        return Err(BlobError::TooLarge { size, limit });
    }
    let object = match store.get(name).await {
        Ok(o) => o,
        Err(e) if e.kind() == object_store::GetErrorKind::NotFound => return Err(not_found()),
        Err(e) => return Err(store_error(e, "object get")),
    };
    let capacity = usize::try_from(size).unwrap_or(usize::MAX);
    let mut bytes = Vec::with_capacity(capacity);
    object
        .take(limit.saturating_add(1))
        .read_to_end(&mut bytes)
        .await
        .map_err(|e| store_error(e, "object read"))?;
    if bytes.len() as u64 > limit {
        return Err(BlobError::TooLarge {
            size: bytes.len() as u64,
            limit,
        });
    }
    Ok(bytes)
}

/// Stores `bytes` as `name` (replacing an object of that name).
pub async fn put(
    store: &object_store::ObjectStore,
    name: &str,
    bytes: &[u8],
) -> Result<(), BlobError> {
    let meta = object_store::ObjectMetadata {
        name: name.to_string(),
        chunk_size: Some(CHUNK_BYTES),
        ..Default::default()
    };
    let mut reader = bytes;
    store
        .put(meta, &mut reader)
        .await
        .map_err(|e| store_error(e, "object put"))?;
    Ok(())
}

/// A store failure, transient: the bucket or the broker may be back on the next attempt.
fn store_error(
    e: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    what: &'static str,
) -> BlobError {
    BlobError::Store(PortError::transient(e).context(what))
}
