//! Results published on `sign.completed` and `sign.failed`.

use serde::{Deserialize, Serialize};

use crate::bundle::Bundle;
use crate::digest::DigestSet;
use crate::dsse::Envelope;
use crate::error::{ErrorCode, SignerError};
use crate::keys::{KeyAlgorithm, KeyMode, KeySource, SignerIdentity};
use crate::statement::Subject;

/// A successful job on `sign.completed`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Completed {
    pub api_version: String,
    pub request_id: String,
    pub tenant: String,
    pub kind: ResultKind,
    pub envelope: Envelope,
    pub bundles: Vec<Bundle>,
    pub bundle_sha256: String,
    pub signers: Vec<SignerEntry>,
    pub subjects: Vec<SubjectEntry>,
    pub entitlement: Entitlement,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gates: Option<Gates>,
    pub audit: AuditRef,
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
        check(
            !self.envelope.signatures.is_empty(),
            "envelope has no signatures",
        )?;
        check(!self.bundles.is_empty(), "bundles is empty")?;
        check(!self.signers.is_empty(), "signers is empty")?;
        for s in &self.signers {
            check(
                is_hex(&s.keyid, 64),
                "signers[].keyid must be 64 lowercase hex",
            )?;
        }
        for b in &self.bundles {
            b.check_structure().map_err(|e| e.to_string())?;
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
}
