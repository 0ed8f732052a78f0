//! The v1 signing request and its validation.

use serde::{Deserialize, Serialize};

use crate::digest::{self, DigestSet};
use crate::error::SignerError;
use crate::objects::ObjectRef;
use crate::policy::PolicyRecord;
use crate::statement::{
    EXPORT_PREDICATE_TYPE, INTOTO_PAYLOAD_TYPE, STATEMENT_V1, Statement, Subject,
};

/// What a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// Sign an in-toto Statement (or raw payload bytes).
    Dsse,
    /// Sign an Export Center manifest; the signer builds the Statement.
    Export,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Dsse => "dsse",
            Kind::Export => "export",
        }
    }
}

/// A signing job as published on `sign.requests`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SignRequest {
    pub api_version: String,
    pub request_id: String,
    pub tenant: String,
    pub kind: Kind,
    pub auth: Auth,
    pub poe: Poe,
    pub scanner: Scanner,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub statement: Option<Statement>,
    #[serde(default, with = "opt_b64", skip_serializing_if = "Option::is_none")]
    pub payload: Option<Vec<u8>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload_type: Option<String>,
    /// The payload as an object of the blob bucket (`docs/contract.md#large-artefacts`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload_ref: Option<ObjectRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub export: Option<ExportManifest>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub options: Option<Options>,
}

/// The caller's Authority token and, when the token is sender-constrained, its DPoP proof.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Auth {
    pub op_tok: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dpop: Option<String>,
}

/// How a Proof-of-Entitlement is presented.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PoeFormat {
    Jwt,
    Introspect,
}

/// The tenant's Proof-of-Entitlement (licence).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Poe {
    pub format: PoeFormat,
    pub value: String,
}

/// The scanner release that produced the artefact.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Scanner {
    pub repository: String,
    pub image_digest: String,
}

/// The Export Center manifest of a `kind: export` request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ExportManifest {
    pub bundle_id: String,
    pub files: Vec<ExportFile>,
}

/// One file of an export bundle.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportFile {
    pub name: String,
    pub digest: DigestSet,
}

/// Request options.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Options {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<String>,
    /// `sha256:<64 hex>` of the policy a report predicate was evaluated under (with `viewSet`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_digest: Option<String>,
    /// The view set the policy was evaluated with (with `policyDigest`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub view_set: Option<String>,
}

/// The bytes a request asks us to sign, with their payloadType and the subjects they name.
#[derive(Debug, Clone, PartialEq)]
pub struct PreparedPayload {
    pub payload_type: String,
    pub bytes: Vec<u8>,
    pub subjects: Vec<Subject>,
    /// The Statement's predicateType, when the payload is an in-toto Statement.
    pub predicate_type: Option<String>,
}

/// Where the bytes to sign are: in the request, or in the blob bucket (read by the job
/// once the request is authenticated, its plan known and its requestId claimed).
#[derive(Debug, Clone, PartialEq)]
pub enum PayloadSource {
    Inline(PreparedPayload),
    Referenced {
        object: ObjectRef,
        payload_type: String,
    },
}

impl PayloadSource {
    /// The payload's size: the bytes', or the size the reference declares.
    pub fn size(&self) -> u64 {
        match self {
            PayloadSource::Inline(p) => p.bytes.len() as u64,
            PayloadSource::Referenced { object, .. } => object.size,
        }
    }
}

impl PreparedPayload {
    /// Bytes signed as they are under `payload_type`; an in-toto payloadType must still
    /// carry a valid Statement v1 (whose subjects are then the job's).
    pub fn raw(payload_type: String, bytes: Vec<u8>) -> Result<Self, SignerError> {
        if payload_type.is_empty() {
            return Err(invalid("payloadType is empty"));
        }
        let (subjects, predicate_type) = if payload_type == INTOTO_PAYLOAD_TYPE {
            let head = Statement::head_of_payload(&bytes).map_err(invalid)?;
            (head.subjects, Some(head.predicate_type))
        } else {
            (Vec::new(), None)
        };
        Ok(PreparedPayload {
            payload_type,
            bytes,
            subjects,
            predicate_type,
        })
    }
}

/// Checks a `requestId` (also used for `bundleId`): 1 to 128 characters of `[A-Za-z0-9._:-]`.
pub fn is_valid_request_id(id: &str) -> bool {
    (1..=128).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._:-".contains(&b))
}

/// Checks a tenant: 1 to 64 characters of `[A-Za-z0-9_-]`, so it is one NATS subject token.
pub fn is_valid_tenant(tenant: &str) -> bool {
    (1..=64).contains(&tenant.len())
        && tenant
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-".contains(&b))
}

/// Checks a profile name: 1 to 64 characters of `[A-Za-z0-9._-]`.
pub fn is_valid_profile(profile: &str) -> bool {
    (1..=64).contains(&profile.len())
        && profile
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

fn invalid(msg: impl Into<String>) -> SignerError {
    SignerError::InvalidRequest(msg.into())
}

impl SignRequest {
    /// The signing profile the request names (`default` when absent).
    pub fn profile(&self) -> &str {
        self.options
            .as_ref()
            .and_then(|o| o.profile.as_deref())
            .unwrap_or("default")
    }

    /// The policy the request says its report was evaluated under (checked by
    /// [`SignRequest::validate`]: `policyDigest` and `viewSet` go together).
    pub fn policy(&self) -> Option<PolicyRecord> {
        let o = self.options.as_ref()?;
        Some(PolicyRecord {
            digest: o.policy_digest.clone()?,
            view_set: o.view_set.clone()?,
        })
    }

    /// Checks every rule the schema cannot express on its own and that the pipeline
    /// relies on, in the order a caller would want to hear about them.
    pub fn validate(&self) -> Result<(), SignerError> {
        if self.api_version != crate::API_VERSION {
            return Err(SignerError::UnsupportedApiVersion(format!(
                "apiVersion {} is not {}",
                crate::echo::echo(&self.api_version),
                crate::API_VERSION
            )));
        }
        if !is_valid_request_id(&self.request_id) {
            return Err(invalid(
                "requestId must be 1 to 128 characters of [A-Za-z0-9._:-]",
            ));
        }
        if !is_valid_tenant(&self.tenant) {
            return Err(invalid(
                "tenant must be 1 to 64 characters of [A-Za-z0-9_-]",
            ));
        }
        if self.auth.op_tok.is_empty() {
            return Err(invalid("auth.opTok is empty"));
        }
        if self.poe.value.is_empty() {
            return Err(invalid("poe.value is empty"));
        }
        if self.scanner.repository.is_empty() {
            return Err(invalid("scanner.repository is empty"));
        }
        digest::parse_oci_sha256(&self.scanner.image_digest)
            .map_err(|e| invalid(format!("scanner.imageDigest: {e}")))?;
        if !is_valid_profile(self.profile()) {
            return Err(invalid(
                "options.profile must be 1 to 64 characters of [A-Za-z0-9._-]",
            ));
        }
        self.validate_policy()
    }

    /// `options.policyDigest` is `sha256:<64 hex>`, `options.viewSet` 1 to 256 characters
    /// of `[A-Za-z0-9._:/@+=,-]`, and one goes with the other.
    fn validate_policy(&self) -> Result<(), SignerError> {
        let Some(o) = &self.options else {
            return Ok(());
        };
        match (&o.policy_digest, &o.view_set) {
            (None, None) => Ok(()),
            (Some(d), Some(v)) => {
                digest::parse_oci_sha256(d)
                    .map_err(|_| invalid("options.policyDigest must be sha256:<64 hex>"))?;
                if !crate::policy::is_valid_view_set(v) {
                    return Err(invalid(
                        "options.viewSet must be 1 to 256 characters of [A-Za-z0-9._:/@+=,-]",
                    ));
                }
                Ok(())
            }
            _ => Err(invalid(
                "options.policyDigest and options.viewSet go together",
            )),
        }
    }

    /// Validates the content part of the request and returns the exact bytes to sign; a
    /// `payloadRef` request is refused here (see [`SignRequest::payload_source`]).
    pub fn prepare_payload(&self) -> Result<PreparedPayload, SignerError> {
        match self.payload_source()? {
            PayloadSource::Inline(p) => Ok(p),
            PayloadSource::Referenced { .. } => {
                Err(invalid("payloadRef must be fetched from the blob bucket"))
            }
        }
    }

    /// Validates the content part of the request: the exact bytes to sign, or the object
    /// that holds them.
    pub fn payload_source(&self) -> Result<PayloadSource, SignerError> {
        match self.kind {
            Kind::Dsse => {
                if self.export.is_some() {
                    return Err(invalid("kind dsse must not carry export"));
                }
                match (&self.statement, &self.payload, &self.payload_ref) {
                    (Some(st), None, None) => {
                        if self.payload_type.is_some() {
                            return Err(invalid("a statement carries no payloadType"));
                        }
                        st.validate().map_err(invalid)?;
                        let bytes = st
                            .canonical_bytes()
                            .map_err(|e| invalid(format!("statement: {e}")))?;
                        Ok(PayloadSource::Inline(PreparedPayload {
                            payload_type: INTOTO_PAYLOAD_TYPE.into(),
                            bytes,
                            subjects: st.subject.clone(),
                            predicate_type: Some(st.predicate_type.clone()),
                        }))
                    }
                    (None, Some(bytes), None) => {
                        let payload_type = self
                            .payload_type
                            .clone()
                            .ok_or_else(|| invalid("payload and payloadType go together"))?;
                        PreparedPayload::raw(payload_type, bytes.clone()).map(PayloadSource::Inline)
                    }
                    (None, None, Some(object)) => {
                        object
                            .validate()
                            .map_err(|e| invalid(format!("payloadRef: {e}")))?;
                        let payload_type = self
                            .payload_type
                            .clone()
                            .unwrap_or_else(|| INTOTO_PAYLOAD_TYPE.into());
                        if payload_type.is_empty() {
                            return Err(invalid("payloadType is empty"));
                        }
                        Ok(PayloadSource::Referenced {
                            object: object.clone(),
                            payload_type,
                        })
                    }
                    (None, None, None) if self.payload_type.is_some() => {
                        Err(invalid("payload and payloadType go together"))
                    }
                    (None, None, None) => Err(invalid(
                        "kind dsse needs a statement, payload and payloadType, or payloadRef",
                    )),
                    _ => Err(invalid(
                        "statement, payload and payloadRef are mutually exclusive",
                    )),
                }
            }
            Kind::Export => {
                if self.statement.is_some()
                    || self.payload.is_some()
                    || self.payload_type.is_some()
                    || self.payload_ref.is_some()
                {
                    return Err(invalid(
                        "kind export carries export only, not statement, payload or payloadRef",
                    ));
                }
                let manifest = self
                    .export
                    .as_ref()
                    .ok_or_else(|| invalid("kind export needs export"))?;
                let st = manifest.to_statement()?;
                let bytes = st
                    .canonical_bytes()
                    .map_err(|e| invalid(format!("export statement: {e}")))?;
                Ok(PayloadSource::Inline(PreparedPayload {
                    payload_type: INTOTO_PAYLOAD_TYPE.into(),
                    bytes,
                    subjects: st.subject,
                    predicate_type: Some(st.predicate_type),
                }))
            }
        }
    }
}

impl ExportManifest {
    /// The Statement the signer builds for an export: one subject per file.
    pub fn to_statement(&self) -> Result<Statement, SignerError> {
        if !is_valid_request_id(&self.bundle_id) {
            return Err(invalid(
                "export.bundleId must be 1 to 128 characters of [A-Za-z0-9._:-]",
            ));
        }
        if self.files.is_empty() {
            return Err(invalid("export.files must not be empty"));
        }
        let mut subject = Vec::with_capacity(self.files.len());
        for (i, f) in self.files.iter().enumerate() {
            if f.name.is_empty() {
                return Err(invalid(format!("export.files[{i}] has an empty name")));
            }
            if f.digest.len() != 1 || !f.digest.contains_key("sha256") {
                return Err(invalid(format!(
                    "export.files[{i}].digest must be exactly {{\"sha256\": ...}}"
                )));
            }
            digest::validate_set(&f.digest)
                .map_err(|e| invalid(format!("export.files[{i}]: {e}")))?;
            subject.push(Subject {
                name: f.name.clone(),
                digest: f.digest.clone(),
                uri: None,
                annotations: None,
            });
        }
        let mut predicate = serde_json::Map::new();
        predicate.insert("bundleId".into(), self.bundle_id.clone().into());
        predicate.insert("fileCount".into(), self.files.len().into());
        Ok(Statement {
            type_: STATEMENT_V1.into(),
            subject,
            predicate_type: EXPORT_PREDICATE_TYPE.into(),
            predicate: Some(predicate),
        })
    }
}

/// `Option<Vec<u8>>` as an optional base64 string.
mod opt_b64 {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(bytes) => crate::b64::serialize(bytes, s),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<u8>>, D::Error> {
        Option::<std::borrow::Cow<str>>::deserialize(d)?
            .map(|t| crate::b64::decode_standard(&t).map_err(serde::de::Error::custom))
            .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorCode;

    pub(crate) fn sample() -> serde_json::Value {
        serde_json::json!({
            "apiVersion": crate::API_VERSION,
            "requestId": "01JDQ6Y8ABC",
            "tenant": "acme",
            "kind": "dsse",
            "auth": {"opTok": "a.b.c"},
            "poe": {"format": "jwt", "value": "x.y.z"},
            "scanner": {"repository": "registry.example:5000/stella-ops/scanner", "imageDigest": format!("sha256:{}", "c".repeat(64))},
            "statement": {
                "_type": STATEMENT_V1,
                "subject": [{"name": "app", "digest": {"sha256": "a".repeat(64)}}],
                "predicateType": "https://slsa.dev/provenance/v1",
                "predicate": {}
            }
        })
    }

    fn code_of(v: serde_json::Value) -> ErrorCode {
        let req: SignRequest = serde_json::from_value(v).unwrap();
        req.validate()
            .and_then(|_| req.prepare_payload().map(|_| ()))
            .unwrap_err()
            .code()
    }

    #[test]
    fn sample_is_valid_and_signs_jcs_bytes() {
        let req: SignRequest = serde_json::from_value(sample()).unwrap();
        req.validate().unwrap();
        let p = req.prepare_payload().unwrap();
        assert_eq!(p.payload_type, INTOTO_PAYLOAD_TYPE);
        assert_eq!(
            p.bytes,
            req.statement.as_ref().unwrap().canonical_bytes().unwrap()
        );
        assert_eq!(p.subjects.len(), 1);
        assert_eq!(req.profile(), "default");
    }

    #[test]
    fn field_rules_give_contract_codes() {
        let mut v = sample();
        v["apiVersion"] = "signer.stella-ops.org/v2".into();
        assert_eq!(code_of(v), ErrorCode::UnsupportedApiVersion);
        for bad in ["", "has space", &"x".repeat(129), "a/b"] {
            let mut v = sample();
            v["requestId"] = bad.into();
            assert_eq!(code_of(v), ErrorCode::InvalidRequest, "{bad:?}");
        }
        let mut v = sample();
        v["scanner"]["imageDigest"] = "sha256:abc".into();
        assert_eq!(code_of(v), ErrorCode::InvalidRequest);
        let mut v = sample();
        v["statement"]["subject"][0]["digest"]["sha256"] = "ab".into();
        assert_eq!(code_of(v), ErrorCode::InvalidRequest);
        let mut v = sample();
        v["payload"] = "aGVsbG8=".into();
        assert_eq!(
            code_of(v),
            ErrorCode::InvalidRequest,
            "payload without payloadType"
        );
    }

    #[test]
    fn raw_payload_is_signed_byte_for_byte_and_intoto_payloads_are_checked() {
        let mut v = sample();
        v.as_object_mut().unwrap().remove("statement");
        v["payload"] = "aGVsbG8gd29ybGQ=".into();
        v["payloadType"] = "text/plain".into();
        let req: SignRequest = serde_json::from_value(v.clone()).unwrap();
        assert_eq!(req.prepare_payload().unwrap().bytes, b"hello world");
        v["payloadType"] = INTOTO_PAYLOAD_TYPE.into();
        assert_eq!(code_of(v), ErrorCode::InvalidRequest);
    }

    #[test]
    fn payload_ref_names_an_object_and_defaults_to_in_toto() {
        let mut v = sample();
        v.as_object_mut().unwrap().remove("statement");
        let object = serde_json::json!({"bucket": "SIGNER_BLOBS", "name": "requests/acme/r1/payload",
            "sha256": "a".repeat(64), "size": 5_000_000});
        v["payloadRef"] = object.clone();
        let req: SignRequest = serde_json::from_value(v.clone()).unwrap();
        req.validate().unwrap();
        let source = req.payload_source().unwrap();
        assert_eq!(source.size(), 5_000_000);
        let PayloadSource::Referenced {
            object: r,
            payload_type,
        } = source
        else {
            panic!("not a reference")
        };
        assert_eq!(payload_type, INTOTO_PAYLOAD_TYPE);
        assert_eq!(r.name, "requests/acme/r1/payload");
        assert_eq!(
            req.prepare_payload().unwrap_err().code(),
            ErrorCode::InvalidRequest,
            "a reference is not inline bytes"
        );
        v["payloadType"] = "text/plain".into();
        let req: SignRequest = serde_json::from_value(v.clone()).unwrap();
        assert!(matches!(
            req.payload_source().unwrap(),
            PayloadSource::Referenced { payload_type, .. } if payload_type == "text/plain"
        ));

        let code = |v: serde_json::Value| {
            let req: SignRequest = serde_json::from_value(v).unwrap();
            req.payload_source().unwrap_err().code()
        };
        let mut both = v.clone();
        both["statement"] = sample()["statement"].clone();
        assert_eq!(
            code(both),
            ErrorCode::InvalidRequest,
            "statement and payloadRef"
        );
        let mut both = v.clone();
        both["payload"] = "aGVsbG8=".into();
        assert_eq!(
            code(both),
            ErrorCode::InvalidRequest,
            "payload and payloadRef"
        );
        for (field, bad) in [
            ("sha256", serde_json::json!("AB")),
            ("name", serde_json::json!("")),
            ("bucket", serde_json::json!("no.dots")),
        ] {
            let mut w = v.clone();
            w["payloadRef"][field] = bad;
            assert_eq!(code(w), ErrorCode::InvalidRequest, "{field}");
        }
        let mut w = v.clone();
        w["payloadRef"]["extra"] = 1.into();
        assert!(
            serde_json::from_value::<SignRequest>(w).is_err(),
            "unknown field"
        );
    }

    #[test]
    fn export_builds_one_subject_per_file() {
        let mut v = sample();
        v.as_object_mut().unwrap().remove("statement");
        v["kind"] = "export".into();
        v["export"] = serde_json::json!({"bundleId": "b-1", "files": [
            {"name": "a.tar", "digest": {"sha256": "1".repeat(64)}},
            {"name": "b.json", "digest": {"sha256": "2".repeat(64)}}]});
        let req: SignRequest = serde_json::from_value(v).unwrap();
        let p = req.prepare_payload().unwrap();
        let st = Statement::from_payload(&p.bytes).unwrap();
        assert_eq!(st.predicate_type, EXPORT_PREDICATE_TYPE);
        assert_eq!(
            st.subject
                .iter()
                .map(|s| s.name.as_str())
                .collect::<Vec<_>>(),
            ["a.tar", "b.json"]
        );
    }
}
