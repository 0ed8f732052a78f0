//! RFC 8785 (JSON Canonicalization Scheme), through the `serde_jcs` crate.

use serde::Serialize;
use sha2::{Digest, Sha256};

/// Canonical JSON bytes of `value` (RFC 8785): sorted keys, no whitespace, ES6 numbers.
pub fn to_vec<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, serde_json::Error> {
    serde_jcs::to_vec(value)
}

/// Lowercase hex SHA-256 of the canonical JSON of `value`.
pub fn sha256_hex<T: Serialize + ?Sized>(value: &T) -> Result<String, serde_json::Error> {
    Ok(hex::encode(Sha256::digest(to_vec(value)?)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sorts_keys_and_normalises_numbers() {
        // RFC 8785 section 3.2.3 / appendix examples, reduced.
        let value: serde_json::Value = serde_json::from_str(
            r#"{"b": [1e1, 0.5, -0], "a": "\u00e9\n", "c": {"z": true, "y": null}}"#,
        )
        .unwrap();
        let out = String::from_utf8(to_vec(&value).unwrap()).unwrap();
        assert_eq!(
            out,
            "{\"a\":\"é\\n\",\"b\":[10,0.5,0],\"c\":{\"y\":null,\"z\":true}}"
        );
    }

    #[test]
    fn equal_values_give_equal_bytes() {
        let a: serde_json::Value = serde_json::from_str(r#"{"x":1,"y":[2,3]}"#).unwrap();
        let b: serde_json::Value =
            serde_json::from_str("{ \"y\" : [2, 3],\n \"x\": 1.0 }").unwrap();
        assert_eq!(to_vec(&a).unwrap(), to_vec(&b).unwrap());
    }
}
