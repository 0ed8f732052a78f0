//! Assembling what a signing job produces: the multi-signature envelope, one bundle per
//! signature and the `signers[]` list. Pure functions: the signatures come from the keys.

use std::sync::Arc;

use crate::bundle::Bundle;
use crate::dsse::{Envelope, Signature};
use crate::keys::{KeySignature, SignerIdentity};

/// The signed output of one job.
#[derive(Debug, Clone)]
pub struct SignedEnvelope {
    pub envelope: Envelope,
    pub bundles: Vec<Bundle>,
    pub signers: Vec<Arc<SignerIdentity>>,
    /// Lowercase hex SHA-256 of JCS(envelope).
    pub bundle_sha256: String,
}

/// Builds the envelope and the bundles from signatures over `pae(payload_type, payload)`,
/// in the order of the profile's keys.
pub fn assemble(
    payload_type: String,
    payload: Vec<u8>,
    signatures: Vec<KeySignature>,
) -> Result<SignedEnvelope, serde_json::Error> {
    let bundles = signatures
        .iter()
        .map(|s| Bundle::for_signature(&payload_type, &payload, s))
        .collect();
    let signers = signatures.iter().map(|s| s.identity.clone()).collect();
    let envelope = Envelope {
        payload,
        payload_type,
        signatures: signatures
            .into_iter()
            .map(|s| Signature {
                keyid: s.identity.keyid.clone(),
                sig: s.sig,
            })
            .collect(),
    };
    let bundle_sha256 = envelope.jcs_sha256()?;
    Ok(SignedEnvelope {
        envelope,
        bundles,
        signers,
        bundle_sha256,
    })
}
