//! Results published on `sign.completed` and `sign.failed`.

use serde::{Deserialize, Serialize};

use crate::bundle::Bundle;
use crate::digest::DigestSet;
use crate::dsse::Envelope;
use crate::error::{ErrorCode, SignerError};
use crate::keys::{KeyAlgorithm, KeyMode, KeySource, SignerIdentity};
use crate::statement::Subject;

/// A successful job on `sign.completed`.
///
/// (No `deny_unknown_fields` here: serde cannot combine it with `flatten`. The variants of
/// [`Artefacts`] deny unknown fields instead, which covers every field this struct does not
/// name, so an unknown field is still refused.)
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Completed {
    pub api_version: String,
    pub request_id: String,
    pub tenant: String,
    pub kind: ResultKind,
    /// The envelope and bundles, inline or as objects of the blob bucket.
    #[serde(flatten)]
    pub artefacts: Artefacts,
    pub bundle_sha256: String,
    pub signers: Vec<SignerEntry>,
    pub subjects: Vec<SubjectEntry>,
    pub entitlement: Entitlement,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gates: Option<Gates>,
    /// The policy the request says its report was evaluated under, when it says one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<crate::policy::PolicyRecord>,
    pub audit: AuditRef,
}

/// Where a result's envelope and bundles are (`docs/contract.md#large-artefacts`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Artefacts {
    /// In the result itself: `envelope` and `bundles`.
    Inline(InlineArtefacts),
    /// Too large for a message: `envelopeRef` and `bundleRefs`, objects of the blob bucket
    /// holding the JSON of the envelope and of each bundle (in `signers` order).
    Referenced(ReferencedArtefacts),
}

/// `envelope` + `bundles`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct InlineArtefacts {
    pub envelope: Envelope,
    pub bundles: Vec<Bundle>,
}

/// `envelopeRef` + `bundleRefs`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ReferencedArtefacts {
    pub envelope_ref: crate::objects::ObjectRef,
    pub bundle_refs: Vec<crate::objects::ObjectRef>,
}

/// One `signers[]` entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SignerEntry {
    pub keyid: String,
    pub mode: KeyMode,
    pub source: KeySource,
    pub algorithm: KeyAlgorithm,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_key: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub certificate_chain: Vec<String>,
}

impl From<&SignerIdentity> for SignerEntry {
    fn from(id: &SignerIdentity) -> Self {
        SignerEntry {
            keyid: id.keyid.clone(),
            mode: id.mode,
            source: id.source,
            algorithm: id.algorithm,
            public_key: (id.mode == KeyMode::Keyful).then(|| id.public_key.to_pem()),
            certificate_chain: id.certificate_chain.clone(),
        }
    }
}

/// A subject as reported in results (name and digest only).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubjectEntry {
    pub name: String,
    pub digest: DigestSet,
}

impl From<&Subject> for SubjectEntry {
    fn from(s: &Subject) -> Self {
        SubjectEntry {
            name: s.name.clone(),
            digest: s.digest.clone(),
        }
    }
}

/// The entitlement the job was signed under.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entitlement {
    pub plan: String,
    pub poe: EntitlementPoe,
}

crate::audit::wire_enum!(
    /// The PoE state a signed job carries: only these three can lead to a signature.
    EntitlementPoe { Valid = "valid", Disabled = "disabled", Bypassed = "bypassed" }
);

crate::audit::wire_enum!(
    /// How one gate let a job through.
    GateState { Passed = "passed", Disabled = "disabled", Bypassed = "bypassed", Allowlisted = "allowlisted", Cached = "cached" }
);

crate::audit::wire_enum!(
    /// `kind` of a result or audit event; `unknown` when the request could not be decoded.
    ResultKind { Dsse = "dsse", Export = "export", Unknown = "unknown" }
);

impl From<crate::request::Kind> for ResultKind {
    fn from(k: crate::request::Kind) -> Self {
        match k {
            crate::request::Kind::Dsse => Self::Dsse,
            crate::request::Kind::Export => Self::Export,
        }
    }
}

/// How each gate decided (`passed`, `disabled`, `bypassed`, `allowlisted`, `cached`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Gates {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<GateState>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub poe: Option<GateState>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota: Option<GateState>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provenance: Option<GateState>,
}

/// Where the decision's audit event is stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditRef {
    pub stream: String,
    pub seq: u64,
}

/// A refused or failed job on `sign.failed`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Failed {
    pub api_version: String,
    pub request_id: String,
    pub tenant: String,
    pub kind: ResultKind,
    pub error: ErrorBody,
    pub audit: AuditRef,
}

/// The `error` object of a failed result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ErrorBody {
    pub code: ErrorCode,
    pub message: String,
    pub retryable: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_ms: Option<u64>,
}

impl From<&SignerError> for ErrorBody {
    fn from(e: &SignerError) -> Self {
        ErrorBody {
            code: e.code(),
            // bounded whatever the message was built from
            message: crate::echo::bound_message(e.message()),
            retryable: e.code().retryable(),
            retry_after_ms: e.retry_after_ms(),
        }
    }
}

/// `Err(msg)` unless `ok`.
pub(crate) fn check(ok: bool, msg: &str) -> Result<(), String> {
    if ok { Ok(()) } else { Err(msg.to_string()) }
}

/// Lowercase hex of exactly `len` characters.
pub(crate) fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn validate_ids(request_id: &str, tenant: &str, audit: &AuditRef) -> Result<(), String> {
    check(
        crate::request::is_valid_request_id(request_id),
        "requestId pattern",
    )?;
    check(crate::request::is_valid_tenant(tenant), "tenant pattern")?;
    check(audit.seq >= 1, "audit.seq starts at 1")
}

impl Completed {
    /// Field rules beyond the types (what a consumer may rely on).
    pub fn validate(&self) -> Result<(), String> {
        validate_ids(&self.request_id, &self.tenant, &self.audit)?;
        check(self.api_version == crate::API_VERSION, "apiVersion")?;
        check(
            is_hex(&self.bundle_sha256, 64),
            "bundleSha256 must be 64 lowercase hex",
        )?;
        match &self.artefacts {
            Artefacts::Inline(a) => {
                check(
                    !a.envelope.signatures.is_empty(),
                    "envelope has no signatures",
                )?;
                check(!a.bundles.is_empty(), "bundles is empty")?;
                for b in &a.bundles {
                    b.check_structure().map_err(|e| e.to_string())?;
                }
            }
            Artefacts::Referenced(a) => {
                a.envelope_ref
                    .validate()
                    .map_err(|e| format!("envelopeRef: {e}"))?;
                check(!a.bundle_refs.is_empty(), "bundleRefs is empty")?;
                for r in &a.bundle_refs {
                    r.validate().map_err(|e| format!("bundleRefs[]: {e}"))?;
                }
            }
        }
        check(!self.signers.is_empty(), "signers is empty")?;
        for s in &self.signers {
            check(
                is_hex(&s.keyid, 64),
                "signers[].keyid must be 64 lowercase hex",
            )?;
        }
        self.subjects
            .iter()
            .try_for_each(|s| crate::digest::validate_set(&s.digest))
    }
}

impl Failed {
    /// Field rules beyond the types.
    pub fn validate(&self) -> Result<(), String> {
        validate_ids(&self.request_id, &self.tenant, &self.audit)?;
        check(self.api_version == crate::API_VERSION, "apiVersion")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A refusal carries at most [`crate::echo::MESSAGE_MAX_BYTES`] of message whatever the
    /// request put into it: the worst case, encoded in JSON and CBOR, has a fixed bound.
    #[test]
    fn a_refusal_has_a_fixed_size_bound_whatever_the_request() {
        let worst = SignerError::InvalidRequest(format!(
            "apiVersion {} {}",
            "\"".repeat(600_000),
            "\u{1}".repeat(200_000)
        ));
        let failed = Failed {
            api_version: crate::API_VERSION.into(),
            request_id: "r".repeat(128),
            tenant: "t".repeat(64),
            kind: ResultKind::Unknown,
            error: ErrorBody::from(&worst),
            audit: AuditRef {
                stream: "SIGNER_AUDIT".into(),
                seq: u64::MAX,
            },
        };
        for ct in [
            crate::codec::ContentType::Json,
            crate::codec::ContentType::Cbor,
        ] {
            let bytes = ct.encode(&failed).unwrap();
            // JSON escapes the bounded message once more (a quote or backslash doubles), plus
            // the fixed members
            let bound = 2 * (crate::echo::MESSAGE_MAX_BYTES + crate::echo::MARKER_MAX_BYTES) + 600;
            assert!(bytes.len() <= bound, "{ct:?}: {} bytes", bytes.len());
        }
        assert_eq!(worst.bounded().message(), failed.error.message);
    }

    use crate::objects::ObjectRef;

    fn completed(artefacts: Artefacts) -> Completed {
        Completed {
            api_version: crate::API_VERSION.into(),
            request_id: "r-1".into(),
            tenant: "acme".into(),
            kind: ResultKind::Dsse,
            artefacts,
            bundle_sha256: "a".repeat(64),
            signers: Vec::new(),
            subjects: Vec::new(),
            entitlement: Entitlement {
                plan: "team".into(),
                poe: EntitlementPoe::Valid,
            },
            gates: None,
            policy: None,
            audit: AuditRef {
                stream: "SIGNER_AUDIT".into(),
                seq: 1,
            },
        }
    }

    fn referenced() -> Artefacts {
        Artefacts::Referenced(ReferencedArtefacts {
            envelope_ref: ObjectRef::of("SIGNER_BLOBS", "results/acme/r-1/envelope.json", b"e"),
            bundle_refs: vec![ObjectRef::of(
                "SIGNER_BLOBS",
                "results/acme/r-1/bundle-0.json",
                b"b",
            )],
        })
    }

    #[test]
    fn artefacts_by_reference_round_trip_in_json_and_cbor() {
        let inline = Artefacts::Inline(InlineArtefacts {
            envelope: Envelope {
                payload: b"{}".to_vec(),
                payload_type: "application/json".into(),
                signatures: Vec::new(),
            },
            bundles: Vec::new(),
        });
        for c in [completed(referenced()), completed(inline)] {
            let json = serde_json::to_value(&c).unwrap();
            assert_eq!(
                serde_json::from_value::<Completed>(json.clone()).unwrap(),
                c
            );
            let is_ref = matches!(c.artefacts, Artefacts::Referenced(_));
            assert_eq!(json.get("envelopeRef").is_some(), is_ref, "{json}");
            assert_eq!(json.get("envelope").is_some(), !is_ref, "{json}");
            let mut cbor = Vec::new();
            ciborium::into_writer(&c, &mut cbor).unwrap();
            assert_eq!(ciborium::from_reader::<Completed, _>(&cbor[..]).unwrap(), c);
        }
    }

    #[test]
    fn a_result_with_both_forms_or_an_unknown_field_is_refused() {
        let mut json = serde_json::to_value(completed(referenced())).unwrap();
        json["envelope"] =
            serde_json::json!({"payload": "e30=", "payloadType": "x", "signatures": []});
        json["bundles"] = serde_json::json!([]);
        assert!(serde_json::from_value::<Completed>(json).is_err());
        let mut json = serde_json::to_value(completed(referenced())).unwrap();
        json["surprise"] = 1.into();
        assert!(serde_json::from_value::<Completed>(json).is_err());
    }
}
