//! Large artefacts by reference (`docs/contract.md#large-artefacts`): a request's `payloadRef`
//! and a result's `envelopeRef` / `bundleRefs` name objects of the JetStream Object Store
//! bucket (`SIGNER_BLOBS`) instead of carrying the bytes, because NATS messages are small
//! (`max_payload`, 1 MiB by default) and SBOM attestations are not.

use std::collections::HashMap;
use std::sync::Mutex;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::ports::{BlobError, BlobStore, PortError};

/// The default bucket of large payloads, envelopes and bundles.
pub const DEFAULT_BUCKET: &str = "SIGNER_BLOBS";

/// Longest object name accepted in a reference (characters). Names are echoed in refusals, logs
/// and audit events, so they are bounded like every other field that comes from a request.
pub const MAX_NAME_CHARS: usize = 512;

/// An object of the blob bucket, with what it must be: the same shape for `payloadRef`,
/// `envelopeRef` and each `bundleRefs[]` entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ObjectRef {
    pub bucket: String,
    pub name: String,
    /// Lowercase hex SHA-256 of the object's bytes.
    pub sha256: String,
    /// The object's size in bytes.
    pub size: u64,
}

/// Why a reference is malformed (before anything is read).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RefError {
    #[error("bucket must be 1 to 64 characters of [A-Za-z0-9_-]")]
    Bucket,
    #[error("name must be 1 to {MAX_NAME_CHARS} characters without control characters")]
    Name,
    #[error("sha256 must be 64 lowercase hex characters")]
    Sha256,
}

/// Checks a bucket name as JetStream accepts it: `[A-Za-z0-9_-]`, here at most 64 long.
pub fn is_valid_bucket(bucket: &str) -> bool {
    (1..=64).contains(&bucket.len())
        && bucket
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-".contains(&b))
}

impl ObjectRef {
    /// The reference of `bytes` stored as `name` in `bucket`.
    pub fn of(bucket: &str, name: &str, bytes: &[u8]) -> Self {
        ObjectRef {
            bucket: bucket.to_string(),
            name: name.to_string(),
            sha256: sha256_hex(bytes),
            size: bytes.len() as u64,
        }
    }

    /// Checks the fields' shapes (the schema's rules).
    pub fn validate(&self) -> Result<(), RefError> {
        if !is_valid_bucket(&self.bucket) {
            return Err(RefError::Bucket);
        }
        if self.name.is_empty()
            || self.name.chars().count() > MAX_NAME_CHARS
            || self.name.chars().any(char::is_control)
        {
            return Err(RefError::Name);
        }
        if !crate::messages::is_hex(&self.sha256, 64) {
            return Err(RefError::Sha256);
        }
        Ok(())
    }

    /// Checks fetched `bytes` against the reference's size and digest.
    pub fn check(&self, bytes: &[u8]) -> Result<(), Mismatch> {
        if bytes.len() as u64 != self.size {
            return Err(Mismatch::Size {
                expected: self.size,
                actual: bytes.len() as u64,
            });
        }
        let actual = sha256_hex(bytes);
        if actual != self.sha256 {
            return Err(Mismatch::Digest {
                expected: self.sha256.clone(),
                actual,
            });
        }
        Ok(())
    }
}

/// A fetched object is not what its reference says.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Mismatch {
    #[error("the object has {actual} bytes, its reference says {expected}")]
    Size { expected: u64, actual: u64 },
    #[error("the object's sha256 is {actual}, its reference says {expected}")]
    Digest { expected: String, actual: String },
}

/// Lowercase hex SHA-256.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Where the signer stores a result's envelope: stable per tenant and requestId, so a
/// redelivered job overwrites the same objects instead of leaving copies.
pub fn envelope_object_name(tenant: &str, request_id: &str) -> String {
    format!("results/{tenant}/{request_id}/envelope.json")
}

/// Where the signer stores the `index`th bundle of a result (0-based, in `signers` order).
pub fn bundle_object_name(tenant: &str, request_id: &str, index: usize) -> String {
    format!("results/{tenant}/{request_id}/bundle-{index}.json")
}

/// Where `stella-signer submit` uploads a large statement.
pub fn request_object_name(tenant: &str, request_id: &str) -> String {
    format!("requests/{tenant}/{request_id}/payload")
}

/// A blob store in memory (pipeline tests, and anything that runs without NATS). One
/// bucket, named at creation; `set_down(true)` makes every call fail as a store outage.
#[derive(Debug, Default)]
pub struct MemoryBlobStore {
    bucket: String,
    state: Mutex<MemoryState>,
}

#[derive(Debug, Default)]
struct MemoryState {
    objects: HashMap<String, std::sync::Arc<[u8]>>,
    down: bool,
    puts: usize,
    gets: usize,
}

impl MemoryBlobStore {
    pub fn new(bucket: impl Into<String>) -> Self {
        MemoryBlobStore {
            bucket: bucket.into(),
            state: Mutex::default(),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, MemoryState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stores an object directly (a publisher uploading a payload).
    pub fn insert(&self, name: &str, bytes: impl Into<std::sync::Arc<[u8]>>) {
        self.state().objects.insert(name.to_string(), bytes.into());
    }

    /// An object's bytes, if stored.
    pub fn object(&self, name: &str) -> Option<std::sync::Arc<[u8]>> {
        self.state().objects.get(name).cloned()
    }

    /// How many objects the signer has put.
    pub fn puts(&self) -> usize {
        self.state().puts
    }

    /// How many reads were asked for (answered or not).
    pub fn gets(&self) -> usize {
        self.state().gets
    }

    /// Simulates an outage (`true`) or its end.
    pub fn set_down(&self, down: bool) {
        self.state().down = down;
    }
}

#[async_trait]
impl BlobStore for MemoryBlobStore {
    fn bucket(&self) -> &str {
        &self.bucket
    }

    async fn get(&self, name: &str, limit: u64) -> Result<Vec<u8>, BlobError> {
        let mut state = self.state();
        state.gets += 1;
        if state.down {
            return Err(BlobError::Store(PortError::transient("blob store is down")));
        }
        let object = state.objects.get(name).ok_or_else(|| BlobError::NotFound {
            name: name.to_string(),
        })?;
        if object.len() as u64 > limit {
            return Err(BlobError::TooLarge {
                size: object.len() as u64,
                limit,
            });
        }
        Ok(object.to_vec())
    }

    async fn put(&self, name: &str, bytes: &[u8]) -> Result<ObjectRef, BlobError> {
        let mut state = self.state();
        if state.down {
            return Err(BlobError::Store(PortError::transient("blob store is down")));
        }
        state.puts += 1;
        state.objects.insert(name.to_string(), bytes.into());
        Ok(ObjectRef::of(&self.bucket, name, bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_are_checked_for_shape_size_and_digest() {
        let r = ObjectRef::of(DEFAULT_BUCKET, "a/b", b"hello");
        assert_eq!(r.validate(), Ok(()));
        assert_eq!(r.check(b"hello"), Ok(()));
        assert!(matches!(r.check(b"hell"), Err(Mismatch::Size { .. })));
        assert!(matches!(r.check(b"jello"), Err(Mismatch::Digest { .. })));
        let bad = |f: fn(&mut ObjectRef)| {
            let mut r = r.clone();
            f(&mut r);
            r.validate()
        };
        assert_eq!(bad(|r| r.bucket = "a.b".into()), Err(RefError::Bucket));
        assert_eq!(bad(|r| r.bucket = String::new()), Err(RefError::Bucket));
        assert_eq!(bad(|r| r.name = String::new()), Err(RefError::Name));
        assert_eq!(bad(|r| r.name = "a\nb".into()), Err(RefError::Name));
        assert_eq!(
            bad(|r| r.name = "x".repeat(MAX_NAME_CHARS + 1)),
            Err(RefError::Name)
        );
        assert_eq!(bad(|r| r.sha256 = "AB".repeat(32)), Err(RefError::Sha256));
    }

    #[tokio::test]
    async fn memory_store_bounds_reads_and_fails_when_down() {
        let store = MemoryBlobStore::new(DEFAULT_BUCKET);
        store.insert("x", b"12345".to_vec());
        assert_eq!(store.get("x", 5).await.unwrap(), b"12345");
        assert!(matches!(
            store.get("x", 4).await,
            Err(BlobError::TooLarge { size: 5, limit: 4 })
        ));
        assert!(matches!(
            store.get("y", 5).await,
            Err(BlobError::NotFound { .. })
        ));
        let r = store.put("z", b"abc").await.unwrap();
        assert_eq!(r, ObjectRef::of(DEFAULT_BUCKET, "z", b"abc"));
        store.set_down(true);
        assert!(matches!(store.get("x", 5).await, Err(BlobError::Store(_))));
    }
}
