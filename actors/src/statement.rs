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
///
/// Fields are declared in RFC 8785 order (sorted keys), so that plain serde_json output
/// is canonical whenever [`crate::jcs::value_is_jcs_safe`] holds for the free-form parts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Statement {
    #[serde(rename = "_type")]
    pub type_: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub predicate: Option<serde_json::Map<String, serde_json::Value>>,
    #[serde(rename = "predicateType")]
    pub predicate_type: String,
    pub subject: Vec<Subject>,
}

/// A ResourceDescriptor as a Statement subject (fields in RFC 8785 order).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Subject {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<serde_json::Map<String, serde_json::Value>>,
    pub digest: DigestSet,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uri: Option<String>,
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
    ///
    /// Statements made only of strings, booleans, safe integers and BMP keys (nearly all)
    /// take serde_json's output directly, which is then canonical (fields are declared in
    /// sorted order); anything else goes through `serde_jcs`. A test holds both to the same bytes.
    pub fn canonical_bytes(&self) -> Result<Vec<u8>, serde_json::Error> {
        if self.serde_json_is_canonical() {
            serde_json::to_vec(self)
        } else {
            crate::jcs::to_vec(self)
        }
    }

    fn serde_json_is_canonical(&self) -> bool {
        use crate::jcs::{key_is_jcs_safe, maps_are_sorted, value_is_jcs_safe};
        let map_safe = |m: &serde_json::Map<String, serde_json::Value>| {
            m.iter()
                .all(|(k, v)| key_is_jcs_safe(k) && value_is_jcs_safe(v))
        };
        maps_are_sorted()
            && self.predicate.as_ref().is_none_or(map_safe)
            && self.subject.iter().all(|s| {
                s.digest.keys().all(|k| key_is_jcs_safe(k))
                    && s.annotations.as_ref().is_none_or(map_safe)
            })
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

    /// A small deterministic generator of awkward JSON: floats, big integers, control
    /// characters, keys beyond the BMP and next to U+E000.
    fn awkward_value(seed: &mut u64, depth: u32) -> serde_json::Value {
        use serde_json::Value;
        let mut next = || {
            *seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (*seed >> 33) as usize
        };
        let keys = [
            "a",
            "b",
            "Z",
            "_x",
            "\u{e000}",
            "\u{1f600}",
            "\u{ff}",
            "aa",
            "\t",
            "\u{2028}",
        ];
        let strings = [
            "",
            "x",
            "\u{0}\u{1f}\u{7f}",
            "\"\\/",
            "\u{1f600}\u{e000}",
            "\u{2028}\u{2029}",
        ];
        match (next() % if depth == 0 { 5 } else { 7 }, next()) {
            (0, _) => Value::Null,
            (1, n) => Value::Bool(n % 2 == 0),
            (2, n) => strings[n % strings.len()].into(),
            (3, n) => [0i64, -1, 42, 1 << 53, -(1 << 53), (1 << 53) + 1, i64::MIN][n % 7].into(),
            (4, n) => serde_json::json!([0.5, 1e21, 1e-7, -0.0, 123.456, 5e-324, 1.0][n % 7]),
            (5, n) => Value::Array((0..n % 4).map(|_| awkward_value(seed, depth - 1)).collect()),
            (_, n) => Value::Object(
                (0..n % 5)
                    .map(|i| {
                        (
                            keys[(n / 7 + i * 3) % keys.len()].to_string(),
                            awkward_value(seed, depth - 1),
                        )
                    })
                    .collect(),
            ),
        }
    }

    #[test]
    fn canonical_bytes_always_equal_serde_jcs() {
        let mut seed = 7u64;
        let mut fast = 0;
        for _ in 0..3000 {
            let mut st = statement();
            let serde_json::Value::Object(p) = awkward_value(&mut seed, 3) else {
                continue;
            };
            st.predicate = Some(p);
            if st.serde_json_is_canonical() {
                fast += 1;
            }
            let ours = st.canonical_bytes().unwrap();
            assert_eq!(
                ours,
                serde_jcs::to_vec(&st).unwrap(),
                "{}",
                String::from_utf8_lossy(&ours)
            );
        }
        assert!(fast > 100, "the fast path was taken only {fast} times");
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
