//! The JSON Schemas of `schemas/` and the serde types describe the same messages:
//! every good example is valid for both and survives a serde round trip unchanged,
//! every bad example is refused by both.

use std::path::{Path, PathBuf};

use serde::Serialize;
use serde::de::DeserializeOwned;
use signer_actors::audit::AuditEvent;
use signer_actors::codec::{ContentType, decode_request};
use signer_actors::messages::{Completed, Failed};
use signer_actors::pipeline::preflight::{VerifyReferrersReply, VerifyReferrersRequest};
use stella_signer::schemas::SchemaKind;

fn examples(kind: &str, prefix: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("schemas/examples")
        .join(kind);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with(prefix))
        .collect();
    files.sort();
    assert!(
        !files.is_empty(),
        "no {prefix}* examples in {}",
        dir.display()
    );
    files
}

fn load(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

/// Drops `null` members and empty arrays: an absent optional field and an explicit null
/// (or `[]`) mean the same to every consumer.
fn normalise(value: &serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    match value {
        Value::Object(map) => Value::Object(
            map.iter()
                .filter(|(_, v)| !v.is_null() && v.as_array().is_none_or(|a| !a.is_empty()))
                .map(|(k, v)| (k.clone(), normalise(v)))
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.iter().map(normalise).collect()),
        other => other.clone(),
    }
}

fn round_trips<T: Serialize + DeserializeOwned>(value: &serde_json::Value) -> Result<(), String> {
    let typed: T = serde_json::from_value(value.clone()).map_err(|e| e.to_string())?;
    let back = serde_json::to_value(&typed).map_err(|e| e.to_string())?;
    if normalise(&back) != normalise(value) {
        return Err(format!(
            "round trip changed the message:\n{back:#}\n!=\n{value:#}"
        ));
    }
    Ok(())
}

/// What the service's own code says about a message of this kind.
fn serde_verdict(kind: SchemaKind, value: &serde_json::Value) -> Result<(), String> {
    match kind {
        SchemaKind::Request => {
            let bytes = serde_json::to_vec(value).unwrap();
            let req = decode_request(&bytes, ContentType::Json).map_err(|e| e.to_string())?;
            req.payload_source().map_err(|e| e.to_string())?;
            round_trips::<signer_actors::request::SignRequest>(value)
        }
        SchemaKind::Completed => {
            round_trips::<Completed>(value)?;
            let c: Completed = serde_json::from_value(value.clone()).unwrap();
            c.validate()
        }
        SchemaKind::Failed => {
            round_trips::<Failed>(value)?;
            let f: Failed = serde_json::from_value(value.clone()).unwrap();
            f.validate()
        }
        SchemaKind::Audit => {
            round_trips::<AuditEvent>(value)?;
            let a: AuditEvent = serde_json::from_value(value.clone()).unwrap();
            a.validate()
        }
        SchemaKind::VerifyReferrersRequest => {
            round_trips::<VerifyReferrersRequest>(value)?;
            let q: VerifyReferrersRequest = serde_json::from_value(value.clone()).unwrap();
            q.validate().map_err(|e| e.to_string())
        }
        SchemaKind::VerifyReferrersReply => {
            round_trips::<VerifyReferrersReply>(value)?;
            let r: VerifyReferrersReply = serde_json::from_value(value.clone()).unwrap();
            r.validate()
        }
    }
}

const KINDS: [(&str, SchemaKind); 6] = [
    ("request", SchemaKind::Request),
    ("completed", SchemaKind::Completed),
    ("failed", SchemaKind::Failed),
    ("audit", SchemaKind::Audit),
    (
        "verify-referrers-request",
        SchemaKind::VerifyReferrersRequest,
    ),
    ("verify-referrers-reply", SchemaKind::VerifyReferrersReply),
];

#[test]
fn good_examples_are_valid_for_schema_and_types() {
    for (dir, kind) in KINDS {
        for path in examples(dir, "good-") {
            let value = load(&path);
            let violations = kind.violations(&value).unwrap();
            assert!(violations.is_empty(), "{}: {violations:?}", path.display());
            serde_verdict(kind, &value).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        }
    }
}

#[test]
fn bad_examples_are_refused_by_schema_and_types() {
    for (dir, kind) in KINDS {
        for path in examples(dir, "bad-") {
            let value = load(&path);
            assert!(
                !kind.violations(&value).unwrap().is_empty(),
                "schema accepts {}",
                path.display()
            );
            assert!(
                serde_verdict(kind, &value).is_err(),
                "types accept {}",
                path.display()
            );
        }
    }
}

#[test]
fn good_audit_examples_form_one_intact_chain() {
    let mut verifier = signer_actors::audit::ChainVerifier::default();
    for path in examples("audit", "good-") {
        verifier
            .push(&load(&path))
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    }
    assert_eq!(verifier.writers(), 1);
}
