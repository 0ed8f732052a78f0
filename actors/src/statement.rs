//! in-toto Statement v1: the payload the signer vouches for.

use serde::{Deserialize, Serialize};

use crate::digest::{self, DigestSet};

/// `_type` of an in-toto Statement v1.
pub const STATEMENT_V1: &str = "https://in-toto.io/Statement/v1";
/// DSSE payloadType of an in-toto Statement.
pub const INTOTO_PAYLOAD_TYPE: &str = "application/vnd.in-toto+json";
/// predicateType of the statement built for `kind: export`.
pub const EXPORT_PREDICATE_TYPE: &str = "https://stella-ops.org/attestations/export-manifest/v1";

/// An in-toto Statement v1. Unknown top-level fields are refused rather than
/// silently dropped, so what is signed is exactly what was sent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Statement {
    #[serde(rename = "_type")]
    pub type_: String,
    pub subject: Vec<Subject>,
    #[serde(rename = "predicateType")]
    pub predicate_type: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub predicate: Option<serde_json::Map<String, serde_json::Value>>,
}

/// A ResourceDescriptor as a Statement subject.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Subject {
    pub name: String,
    pub digest: DigestSet,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uri: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<serde_json::Map<String, serde_json::Value>>,
}

impl Statement {
    /// The Statement v1 rules: `_type`, a non-empty `subject` list whose every entry has a
    /// name and a valid digest, and a `predicateType`.
    pub fn validate(&self) -> Result<(), String> {
        if self.type_ != STATEMENT_V1 {
            return Err(format!("statement _type must be {STATEMENT_V1}"));
        }
        if self.subject.is_empty() {
            return Err("statement subject must not be empty".into());
        }
        for (i, s) in self.subject.iter().enumerate() {
            if s.name.is_empty() {
                return Err(format!("subject[{i}] has an empty name"));
            }
            digest::validate_set(&s.digest).map_err(|e| format!("subject[{i}]: {e}"))?;
        }
        if self.predicate_type.is_empty() {
            return Err("statement predicateType must not be empty".into());
        }
        Ok(())
    }

    /// Parses and validates a Statement from JSON payload bytes.
    pub fn from_payload(bytes: &[u8]) -> Result<Self, String> {
        let st: Statement = serde_json::from_slice(bytes)
            .map_err(|e| format!("payload is not an in-toto Statement v1: {e}"))?;
        st.validate()?;
        Ok(st)
    }

    /// The RFC 8785 bytes that get signed: equal statements give equal payloads.
    pub fn canonical_bytes(&self) -> Result<Vec<u8>, serde_json::Error> {
        crate::jcs::to_vec(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn statement() -> Statement {
        serde_json::from_value(serde_json::json!({
            "_type": STATEMENT_V1,
            "subject": [{"name": "app", "digest": {"sha256": "a".repeat(64)}}],
            "predicateType": "https://slsa.dev/provenance/v1",
            "predicate": {"b": 1, "a": [true]}
        }))
        .unwrap()
    }

    #[test]
    fn valid_statement_passes_and_canonicalises() {
        let st = statement();
        st.validate().unwrap();
        let bytes = String::from_utf8(st.canonical_bytes().unwrap()).unwrap();
        assert!(bytes.starts_with("{\"_type\":"), "{bytes}");
        assert!(
            bytes.contains("\"predicate\":{\"a\":[true],\"b\":1}"),
            "{bytes}"
        );
    }

    #[test]
    fn rule_violations_are_reported() {
        let mut st = statement();
        st.type_ = "https://in-toto.io/Statement/v0.1".into();
        assert!(st.validate().is_err());
        let mut st = statement();
        st.subject.clear();
        assert!(st.validate().is_err());
        let mut st = statement();
        st.subject[0].digest.clear();
        assert!(st.validate().is_err());
        let mut st = statement();
        st.predicate_type.clear();
        assert!(st.validate().is_err());
        assert!(
            Statement::from_payload(br#"{"_type":"x","subject":[],"predicateType":"p","extra":1}"#)
                .is_err()
        );
    }
}
