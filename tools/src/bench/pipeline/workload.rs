//! The jobs the pipeline bench publishes: in-toto statements of a chosen size, inline or as
//! a `payloadRef` to an object of the run's blob bucket.

use serde_json::json;
use signer_actors::objects::ObjectRef;

/// How a job carries its statement.
#[derive(Clone)]
pub enum Payload {
    /// `statement` inline, about this many bytes of JSON.
    Inline(usize),
    /// `payloadRef` to an uploaded statement (every job of a run names the same object).
    Ref(ObjectRef),
}

impl Payload {
    /// Bytes signed per job (the statement's size).
    pub fn bytes(&self) -> usize {
        match self {
            Payload::Inline(n) => *n,
            Payload::Ref(r) => r.size as usize,
        }
    }
}

/// An in-toto statement of about `size` bytes, unique per job `i`.
pub fn statement(i: usize, size: usize) -> serde_json::Value {
    let mut s = json!({
        "_type": signer_actors::statement::STATEMENT_V1,
        "subject": [{"name": format!("registry.example:5000/acme/app-{i}"), "digest": {"sha256": format!("{:064x}", i)}}],
        "predicateType": "https://stella-ops.org/attestations/scan-report/v1",
        "predicate": {"scanner": {"name": "stella-scanner", "version": "2026.11.0"}, "notes": ""}
    });
    let base = s.to_string().len();
    s["predicate"]["notes"] = "x".repeat(size.saturating_sub(base)).into();
    s
}

/// Request `i` with `identity` (its `auth`/`poe`) merged in.
pub fn request(i: usize, identity: &serde_json::Value, payload: &Payload) -> Vec<u8> {
    let mut r = json!({
        "apiVersion": signer_actors::API_VERSION,
        "requestId": format!("b-{i}"),
        "tenant": "acme",
        "kind": "dsse",
        "scanner": {"repository": "localhost/stella-ops/scanner", "imageDigest": format!("sha256:{}", "0".repeat(64))},
    });
    match payload {
        Payload::Inline(size) => r["statement"] = statement(i, *size),
        Payload::Ref(object) => {
            r["payloadRef"] = serde_json::to_value(object).unwrap_or_default();
            r["payloadType"] = signer_actors::statement::INTOTO_PAYLOAD_TYPE.into();
        }
    }
    if let (Some(obj), Some(id)) = (r.as_object_mut(), identity.as_object()) {
        for (k, v) in id {
            obj.insert(k.clone(), v.clone());
        }
    }
    serde_json::to_vec(&r).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statements_have_the_size_asked_for() {
        for size in [1024, 64 << 10, 1 << 20] {
            let len = statement(7, size).to_string().len();
            assert_eq!(len, size, "{size}");
        }
        // too small to pad: the bare statement
        assert!(statement(7, 10).to_string().len() > 10);
    }

    #[test]
    fn a_reference_replaces_the_statement() {
        let object = ObjectRef::of("B", "requests/acme/x/payload", b"{}");
        let r: serde_json::Value = serde_json::from_slice(&request(
            3,
            &json!({"auth": {"opTok": "t"}}),
            &Payload::Ref(object),
        ))
        .unwrap();
        assert!(r.get("statement").is_none());
        assert_eq!(r["payloadRef"]["bucket"], "B");
        assert_eq!(r["auth"]["opTok"], "t");
        assert_eq!(r["requestId"], "b-3");
    }
}
