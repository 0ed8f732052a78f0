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

/// Whether `serde_json::Map` iterates in sorted key order (it does unless some crate turns
/// on serde_json's `preserve_order`). The fast paths below rely on it and check it once.
pub fn maps_are_sorted() -> bool {
    static SORTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *SORTED.get_or_init(|| {
        let mut m = serde_json::Map::new();
        m.insert("b".into(), serde_json::Value::Null);
        m.insert("a".into(), serde_json::Value::Null);
        m.keys().next().map(String::as_str) == Some("a")
    })
}

/// True when plain `serde_json` output of `value` is already its RFC 8785 form: numbers
/// are integers that ES6 prints the same way (|n| <= 2^53), and object keys sort the same
/// by UTF-8 bytes as by UTF-16 code units (no characters beyond U+FFFF). serde_json
/// escapes strings exactly as RFC 8785 section 3.2.2.2 asks.
pub fn value_is_jcs_safe(value: &serde_json::Value) -> bool {
    use serde_json::Value;
    const MAX_SAFE: u64 = 1 << 53;
    match value {
        Value::Number(n) => {
            n.as_u64().is_some_and(|u| u <= MAX_SAFE)
                || n.as_i64().is_some_and(|i| i.unsigned_abs() <= MAX_SAFE)
        }
        Value::Array(items) => items.iter().all(value_is_jcs_safe),
        Value::Object(map) => map
            .iter()
            .all(|(k, v)| key_is_jcs_safe(k) && value_is_jcs_safe(v)),
        Value::Null | Value::Bool(_) | Value::String(_) => true,
    }
}

/// See [`value_is_jcs_safe`].
pub fn key_is_jcs_safe(key: &str) -> bool {
    key.is_ascii() || key.chars().all(|c| (c as u32) < 0x1_0000)
}

/// An `io::Write` that hashes what is written, so canonical bytes need not be buffered.
#[derive(Default)]
pub struct Sha256Writer(pub Sha256);

impl std::io::Write for Sha256Writer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
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
