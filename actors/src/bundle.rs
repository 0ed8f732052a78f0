//! Sigstore bundle v0.3 (JSON), one per DSSE signature.
//!
//! A v0.3 bundle holds exactly one signature, so a multi-signature envelope is published
//! as one bundle per signature, each holding the single-signature envelope.

use serde::{Deserialize, Serialize};

use crate::dsse::{Envelope, Signature};
use crate::keys::{KeyMode, KeySignature, PublicKey};

/// The bundle media type we emit.
pub const BUNDLE_MEDIA_TYPE: &str = "application/vnd.dev.sigstore.bundle.v0.3+json";

/// A Sigstore bundle with DSSE content.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Bundle {
    pub media_type: String,
    pub verification_material: VerificationMaterial,
    pub dsse_envelope: Envelope,
}

/// How a verifier finds the key: a keyid hint (keyful) or the leaf certificate (keyless).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VerificationMaterial {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_key: Option<PublicKeyHint>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate: Option<Certificate>,
    /// Always present; empty because the signer does not write to Rekor (Attestor does).
    pub tlog_entries: Vec<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestamp_verification_data: Option<TimestampVerificationData>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PublicKeyHint {
    pub hint: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Certificate {
    #[serde(with = "crate::b64")]
    pub raw_bytes: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TimestampVerificationData {
    pub rfc3161_timestamps: Vec<Rfc3161Timestamp>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Rfc3161Timestamp {
    #[serde(with = "crate::b64")]
    pub signed_timestamp: Vec<u8>,
}

/// Why a bundle did not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BundleError {
    #[error("mediaType {0:?} is not {BUNDLE_MEDIA_TYPE}")]
    MediaType(String),
    #[error("a v0.3 bundle holds exactly one signature, this one has {0}")]
    SignatureCount(usize),
    #[error("verificationMaterial must name exactly one of publicKey or certificate")]
    Material,
    #[error("publicKey.hint {hint:?} does not match the verifying key {keyid}")]
    HintMismatch { hint: String, keyid: String },
    #[error("no given key verifies the signature")]
    BadSignature,
}

impl Bundle {
    /// The bundle for one signature over (`payload_type`, `payload`).
    pub fn for_signature(payload_type: &str, payload: &[u8], signature: &KeySignature) -> Self {
        let id = &signature.identity;
        let (public_key, certificate) = match id.mode {
            KeyMode::Keyful => (
                Some(PublicKeyHint {
                    hint: id.keyid.clone(),
                }),
                None,
            ),
            KeyMode::Keyless => {
                let leaf = id
                    .certificate_chain
                    .first()
                    .and_then(|p| pem::parse(p).ok())
                    .map(|p| p.into_contents());
                (None, leaf.map(|raw_bytes| Certificate { raw_bytes }))
            }
        };
        let timestamp_verification_data =
            signature
                .rfc3161_timestamp
                .as_ref()
                .map(|t| TimestampVerificationData {
                    rfc3161_timestamps: vec![Rfc3161Timestamp {
                        signed_timestamp: t.clone(),
                    }],
                });
        Bundle {
            media_type: BUNDLE_MEDIA_TYPE.into(),
            verification_material: VerificationMaterial {
                public_key,
                certificate,
                tlog_entries: Vec::new(),
                timestamp_verification_data,
            },
            dsse_envelope: Envelope {
                payload: payload.to_vec(),
                payload_type: payload_type.into(),
                signatures: vec![Signature {
                    keyid: id.keyid.clone(),
                    sig: signature.sig.clone(),
                }],
            },
        }
    }

    /// The v0.3 rules: media type, one signature, exactly one kind of verification material.
    pub fn check_structure(&self) -> Result<(), BundleError> {
        if self.media_type != BUNDLE_MEDIA_TYPE {
            return Err(BundleError::MediaType(self.media_type.clone()));
        }
        if self.dsse_envelope.signatures.len() != 1 {
            return Err(BundleError::SignatureCount(
                self.dsse_envelope.signatures.len(),
            ));
        }
        let vm = &self.verification_material;
        if vm.public_key.is_some() == vm.certificate.is_some() {
            return Err(BundleError::Material);
        }
        Ok(())
    }

    /// Checks the v0.3 structure and the signature against keyful public keys.
    /// Returns the index of the key that verified. (Keyless bundles need a trust root
    /// and certificate checks: use a Sigstore verifier for those.)
    pub fn verify_keyful(&self, keys: &[PublicKey]) -> Result<usize, BundleError> {
        self.check_structure()?;
        let Some(PublicKeyHint { hint }) = &self.verification_material.public_key else {
            return Err(BundleError::Material);
        };
        let message = self.dsse_envelope.pae();
        let sig = &self.dsse_envelope.signatures[0].sig;
        let index = keys
            .iter()
            .position(|k| k.verify(&message, sig))
            .ok_or(BundleError::BadSignature)?;
        let keyid = keys[index].keyid();
        if *hint != keyid {
            return Err(BundleError::HintMismatch {
                hint: hint.clone(),
                keyid,
            });
        }
        Ok(index)
    }
}
