//! Large artefacts through the blob bucket (`docs/contract.md#large-artefacts`): reading a
//! request's `payloadRef`, and deciding whether a result travels inline or as
//! `envelopeRef` / `bundleRefs`.

use std::sync::Arc;

use super::Shared;
use crate::codec::ContentType;
use crate::error::SignerError;
use crate::messages::{Artefacts, Completed, InlineArtefacts, ReferencedArtefacts};
use crate::objects::{ObjectRef, bundle_object_name, envelope_object_name};
use crate::ports::{BlobError, BlobStore};
use crate::request::PreparedPayload;

/// A result is too large to publish inline and there is no blob store to carry it by
/// reference. The job answers it with `payload_too_large` (not retryable): the hook where
/// the answer to a result that cannot be stored is decided.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "the result is at least {size} bytes encoded, over the inline limit of {limit} bytes, and no object store is configured to carry it by reference"
)]
pub(crate) struct ResultTooLarge {
    pub size: usize,
    pub limit: usize,
}

impl From<ResultTooLarge> for SignerError {
    fn from(e: ResultTooLarge) -> Self {
        SignerError::PayloadTooLarge(e.to_string())
    }
}

/// Reads the object a `payloadRef` names and returns the bytes to sign, after checking, in
/// this order: that a blob store is configured and the reference names its bucket; the
/// declared size against the global limit and the plan's `max_payload_bytes` (before
/// reading: nothing is read or charged for an object that may not be signed); then, once
/// read (never more than the declared size), its actual size and SHA-256. An in-toto
/// payloadType must carry a valid Statement v1.
///
/// A missing object, a bucket other than ours, or an object that is not what its reference
/// says is `invalid_request`; a size over a limit `payload_too_large`; a store outage or
/// timeout `internal` (retryable: the job is retried with backoff).
pub(crate) async fn fetch_payload(
    shared: &Arc<Shared>,
    object: &ObjectRef,
    payload_type: String,
    plan: &str,
) -> Result<PreparedPayload, SignerError> {
    let invalid = |m: String| SignerError::InvalidRequest(m);
    let Some(blobs) = shared.ports.blobs.clone() else {
        return Err(invalid(
            "payloadRef is not accepted: this signer has no object store".into(),
        ));
    };
    if object.bucket != blobs.bucket() {
        return Err(invalid(format!(
            "payloadRef.bucket must be {:?}",
            blobs.bucket()
        )));
    }
    check_size(object.size, shared.cfg.max_payload_ref_bytes, plan, || {
        shared.ports.quota.max_payload_bytes(plan)
    })?;
    let read = tokio::time::timeout(
        shared.cfg.call_timeout,
        blobs.get(&object.name, object.size),
    );
    let bytes = match read.await {
        Ok(Ok(bytes)) => bytes,
        Ok(Err(BlobError::NotFound { .. })) => {
            return Err(invalid(format!(
                "payloadRef: object {:?} is not in bucket {:?} (never stored, or expired)",
                object.name, object.bucket
            )));
        }
        Ok(Err(BlobError::TooLarge { size, .. })) => {
            return Err(invalid(format!(
                "payloadRef: the object has {size} bytes, its reference says {}",
                object.size
            )));
        }
        Ok(Err(e @ BlobError::Store(_))) => {
            return Err(SignerError::Internal(format!("reading payloadRef: {e}")));
        }
        Err(_) => {
            return Err(SignerError::Internal(format!(
                "reading payloadRef: no answer within {:?}",
                shared.cfg.call_timeout
            )));
        }
    };
    object
        .check(&bytes)
        .map_err(|e| invalid(format!("payloadRef: {e}")))?;
    PreparedPayload::raw(payload_type, bytes)
}

/// Refuses a declared payload `size` over the global limit or the plan's.
fn check_size(
    size: u64,
    global: u64,
    plan: &str,
    plan_limit: impl FnOnce() -> Option<u64>,
) -> Result<(), SignerError> {
    if size > global {
        return Err(SignerError::PayloadTooLarge(format!(
            "payloadRef names {size} bytes, the limit is {global}"
        )));
    }
    if let Some(limit) = plan_limit()
        && size > limit
    {
        return Err(SignerError::PayloadTooLarge(format!(
            "payload of {size} bytes exceeds the {limit} bytes allowed by plan '{plan}'"
        )));
    }
    Ok(())
}

/// How a result will travel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Placement {
    Inline,
    /// Encoded, it would be at least `size` bytes: over the inline limit.
    Reference {
        size: usize,
    },
}

/// Standard base64 length of `n` bytes.
fn b64_len(n: usize) -> usize {
    n.div_ceil(3).saturating_mul(4)
}

/// Decides whether `completed` fits in `limit` bytes encoded as `content_type`. Every
/// envelope (the result's and one per bundle) carries the payload in base64, so their sum
/// is a lower bound: over the limit, the result is not encoded at all (a 40 MB payload is
/// then base64-encoded once per object it goes to, not once more to be measured). Under
/// it, the result is small (at most the limit) and is measured exactly.
pub(crate) fn placement(
    limit: usize,
    content_type: ContentType,
    completed: &Completed,
) -> Result<Placement, SignerError> {
    let Artefacts::Inline(a) = &completed.artefacts else {
        return Ok(Placement::Inline);
    };
    let floor = a
        .bundles
        .iter()
        .map(|b| b64_len(b.dsse_envelope.payload.len()))
        .fold(b64_len(a.envelope.payload.len()), usize::saturating_add);
    if floor > limit {
        return Ok(Placement::Reference { size: floor });
    }
    let size = content_type.encode(completed)?.len();
    Ok(if size > limit {
        Placement::Reference { size }
    } else {
        Placement::Inline
    })
}

/// Stores the envelope and each bundle as JSON objects under names stable per tenant and
/// requestId (a redelivery overwrites them) and returns their references. Every failure
/// is a store failure (`internal`, retryable).
pub(crate) async fn store(
    blobs: &dyn BlobStore,
    tenant: &str,
    request_id: &str,
    artefacts: &InlineArtefacts,
) -> Result<ReferencedArtefacts, SignerError> {
    let failed = |what: &str, e: &dyn std::fmt::Display| {
        SignerError::Internal(format!("storing the result's {what}: {e}"))
    };
    // Sized for the payload's base64 plus room for the rest, so the JSON is written
    // without reallocating a buffer of tens of MB.
    let to_json = |value: &dyn erased::Json, payload: usize| {
        let mut out = Vec::with_capacity(b64_len(payload).saturating_add(64 << 10));
        value.write(&mut out).map(|()| out)
    };
    let envelope_ref = {
        let json = to_json(&artefacts.envelope, artefacts.envelope.payload.len())
            .map_err(|e| failed("envelope", &e))?;
        blobs
            .put(&envelope_object_name(tenant, request_id), &json)
            .await
            .map_err(|e| failed("envelope", &e))?
    };
    let mut bundle_refs = Vec::with_capacity(artefacts.bundles.len());
    for (i, bundle) in artefacts.bundles.iter().enumerate() {
        let json = to_json(bundle, bundle.dsse_envelope.payload.len())
            .map_err(|e| failed("bundle", &e))?;
        let r = blobs
            .put(&bundle_object_name(tenant, request_id, i), &json)
            .await
            .map_err(|e| failed("bundle", &e))?;
        bundle_refs.push(r);
    }
    Ok(ReferencedArtefacts {
        envelope_ref,
        bundle_refs,
    })
}

/// JSON writing for the two artefact types behind one closure.
mod erased {
    pub(super) trait Json {
        fn write(&self, out: &mut Vec<u8>) -> Result<(), serde_json::Error>;
    }
    impl<T: serde::Serialize> Json for T {
        fn write(&self, out: &mut Vec<u8>) -> Result<(), serde_json::Error> {
            serde_json::to_writer(out, self)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorCode;

    #[test]
    fn declared_size_is_held_to_the_global_and_the_plan_limit() {
        assert_eq!(check_size(10, 10, "p", || Some(10)), Ok(()));
        assert_eq!(check_size(10, 10, "p", || None), Ok(()));
        let e = check_size(11, 10, "p", || None).unwrap_err();
        assert_eq!(e.code(), ErrorCode::PayloadTooLarge);
        let e = check_size(11, 100, "team", || Some(10)).unwrap_err();
        assert_eq!(e.code(), ErrorCode::PayloadTooLarge);
        assert!(e.to_string().contains("plan 'team'"), "{e}");
    }

    #[test]
    fn base64_lengths() {
        assert_eq!(b64_len(0), 0);
        assert_eq!(b64_len(1), 4);
        assert_eq!(b64_len(3), 4);
        assert_eq!(b64_len(4), 8);
        assert_eq!(crate::b64::encode(&[0; 1000]).len(), b64_len(1000));
    }
}
