//! What `submit --out` and `watch --fetch` share: writing a completed result's envelope and
//! bundles to a directory, whether the result carried them inline or as `envelopeRef` /
//! `bundleRefs` to objects of the blob bucket (`docs/contract.md#large-artefacts`).

use std::path::Path;

use signer_actors::dsse::Envelope;
use signer_actors::messages::{Artefacts, Completed};
use signer_actors::objects::ObjectRef;

use super::CliError;

/// How a written result travelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Carried {
    Inline,
    ByReference,
}

/// Writes `DIR/envelope.json` and `DIR/bundles/bundle-<i>.json` of `result` (a completed
/// result as JSON). Referenced objects are fetched from their bucket and checked against
/// their size and SHA-256; either way the envelope must match `bundleSha256`. Nothing is
/// written for an object that fails its check.
pub async fn write_result(
    js: &async_nats::jetstream::Context,
    result: &serde_json::Value,
    dir: &Path,
) -> Result<Carried, CliError> {
    let invalid = CliError::Invalid;
    let completed: Completed = serde_json::from_value(result.clone())
        .map_err(|e| invalid(format!("not a completed result: {e}")))?;
    let (envelope, bundles, carried) = match &completed.artefacts {
        Artefacts::Inline(a) => {
            let envelope = serde_json::to_vec_pretty(&a.envelope)
                .map_err(|e| CliError::Unusable(e.to_string()))?;
            let bundles = a
                .bundles
                .iter()
                .map(|b| {
                    serde_json::to_vec_pretty(b).map_err(|e| CliError::Unusable(e.to_string()))
                })
                .collect::<Result<Vec<_>, _>>()?;
            (envelope, bundles, Carried::Inline)
        }
        Artefacts::Referenced(a) => {
            let envelope = fetch(js, &a.envelope_ref).await?;
            let mut bundles = Vec::with_capacity(a.bundle_refs.len());
            for r in &a.bundle_refs {
                bundles.push(fetch(js, r).await?);
            }
            (envelope, bundles, Carried::ByReference)
        }
    };
    let parsed: Envelope = serde_json::from_slice(&envelope)
        .map_err(|e| invalid(format!("envelope.json is not a DSSE envelope: {e}")))?;
    let digest = parsed
        .jcs_sha256()
        .map_err(|e| CliError::Unusable(e.to_string()))?;
    if digest != completed.bundle_sha256 {
        return Err(invalid(format!(
            "the envelope's JCS SHA-256 is {digest}, the result's bundleSha256 is {}",
            completed.bundle_sha256
        )));
    }
    let bundles_dir = dir.join("bundles");
    std::fs::create_dir_all(&bundles_dir)
        .map_err(|e| CliError::Unusable(format!("{}: {e}", bundles_dir.display())))?;
    super::write_file(&dir.join("envelope.json"), &envelope)?;
    for (i, b) in bundles.iter().enumerate() {
        super::write_file(&bundles_dir.join(format!("bundle-{i}.json")), b)?;
    }
    Ok(carried)
}

/// Fetches a referenced object (never more than its declared size) and checks it.
pub async fn fetch(
    js: &async_nats::jetstream::Context,
    r: &ObjectRef,
) -> Result<Vec<u8>, CliError> {
    let store = js
        .get_object_store(&r.bucket)
        .await
        .map_err(|e| CliError::Unusable(format!("object store {}: {e}", r.bucket)))?;
    let bytes = crate::blobs::get_bounded(&store, &r.name, r.size)
        .await
        .map_err(|e| CliError::Invalid(format!("{}/{}: {e}", r.bucket, r.name)))?;
    r.check(&bytes)
        .map_err(|e| CliError::Invalid(format!("{}/{}: {e}", r.bucket, r.name)))?;
    Ok(bytes)
}
