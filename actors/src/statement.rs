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

/// A Statement as [`Statement::subjects_of_payload`] reads it: the same fields and rules,
/// with the predicate only checked to be an object.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StatementHead {
    #[serde(rename = "_type")]
    type_: String,
    #[serde(default)]
    #[allow(dead_code)] // checked while parsing, not kept
    predicate: Option<AnyObject>,
    #[serde(rename = "predicateType")]
    predicate_type: String,
    subject: Vec<Subject>,
}

/// Any JSON object, skipped without being kept.
struct AnyObject;

impl<'de> Deserialize<'de> for AnyObject {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = AnyObject;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<AnyObject, A::Error> {
                while map
                    .next_entry::<serde::de::IgnoredAny, serde::de::IgnoredAny>()?
                    .is_some()
                {}
                Ok(AnyObject)
            }
        }
        d.deserialize_map(Visitor)
    }
}

/// What [`Statement::head_of_payload`] keeps of a Statement: its subjects and predicateType.
#[derive(Debug, Clone, PartialEq)]
pub struct PayloadHead {
    pub subjects: Vec<Subject>,
    pub predicate_type: String,
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

    /// Validates a Statement in JSON payload bytes and returns its subjects, without
    /// building the predicate: a 50 MB SBOM predicate is checked to be a JSON object and
    /// skipped, not turned into a tree of values many times its size.
    pub fn subjects_of_payload(bytes: &[u8]) -> Result<Vec<Subject>, String> {
        Self::head_of_payload(bytes).map(|h| h.subjects)
    }

    /// Like [`Statement::subjects_of_payload`], with the predicateType too.
    pub fn head_of_payload(bytes: &[u8]) -> Result<PayloadHead, String> {
        let head: StatementHead = serde_json::from_slice(bytes)
            .map_err(|e| format!("payload is not an in-toto Statement v1: {e}"))?;
        let st = Statement {
            type_: head.type_,
            predicate: None,
            predicate_type: head.predicate_type,
            subject: head.subject,
        };
        st.validate()?;
        Ok(PayloadHead {
            subjects: st.subject,
            predicate_type: st.predicate_type,
        })
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
    fn subjects_of_payload_applies_the_statement_rules_without_keeping_the_predicate() {
        let bytes = serde_json::to_vec(&statement()).unwrap();
        assert_eq!(
            Statement::subjects_of_payload(&bytes).unwrap(),
            statement().subject
        );
        let with = |f: fn(&mut serde_json::Value)| {
            let mut v = serde_json::to_value(statement()).unwrap();
            f(&mut v);
            Statement::subjects_of_payload(&serde_json::to_vec(&v).unwrap())
        };
        assert!(
            with(|v| v["predicate"] = "text".into()).is_err(),
            "predicate must be an object"
        );
        assert!(with(|v| v["predicate"] = serde_json::json!([1])).is_err());
        assert!(with(|v| v["extra"] = 1.into()).is_err(), "unknown field");
        assert!(with(|v| v["_type"] = "https://in-toto.io/Statement/v0.1".into()).is_err());
        assert!(with(|v| v["subject"] = serde_json::json!([])).is_err());
        assert!(with(|v| v["predicateType"] = "".into()).is_err());
        assert!(
            with(|v| {
                v.as_object_mut().unwrap().remove("predicate");
            })
            .is_ok(),
            "predicate is optional"
        );
        assert!(Statement::subjects_of_payload(b"{not json").is_err());
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
