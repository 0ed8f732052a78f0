//! Compact JWS handling shared by OpToks, DPoP proofs and licences.
//!
//! The header is read before the signature is checked, but only to choose a key: the
//! algorithm is always the key's (see [`super::jwks::KeyAlg`]), and a header that names
//! another one is refused before any cryptography runs. That closes the classic confusions
//! (`alg: none`, an HMAC "signed" with the public key, an ECDSA token checked as EdDSA).
//! Signatures themselves are checked by `jsonwebtoken`, with exactly one allowed algorithm.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use super::jwks::PublicKey;

/// Largest token accepted. Real OpToks, proofs and licences are a few hundred bytes; the
/// bound keeps a hostile request from making us decode megabytes of base64.
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// Why a compact JWS was refused. Each caller maps it to its own contract code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwsError {
    #[error("not a compact JWS: {0}")]
    Malformed(String),
    #[error(
        "header alg {} is not {key}, the algorithm of the key",
        signer_actors::echo::echo(header)
    )]
    AlgorithmMismatch { header: String, key: &'static str },
    #[error("signature does not verify")]
    BadSignature,
    #[error("claims are not a JSON object of the expected shape: {0}")]
    Claims(String),
}

/// The protected header, read before the signature is checked: only to pick the key.
#[derive(Debug, Clone)]
pub struct UnverifiedHeader {
    pub alg: String,
    pub kid: Option<String>,
    pub typ: Option<String>,
    pub fields: Map<String, Value>,
}

fn malformed(msg: impl Into<String>) -> JwsError {
    JwsError::Malformed(msg.into())
}

fn is_b64url(segment: &str) -> bool {
    segment
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Decodes a base64url (no padding) string.
pub(crate) fn b64url_decode(text: &str) -> Option<Vec<u8>> {
    if !is_b64url(text) {
        return None;
    }
    URL_SAFE_NO_PAD.decode(text).ok()
}

/// Encodes bytes as base64url without padding.
pub(crate) fn b64url(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// Checks the compact form and reads the protected header.
pub fn read_header(token: &str) -> Result<UnverifiedHeader, JwsError> {
    if token.len() > MAX_TOKEN_BYTES {
        return Err(malformed(format!("longer than {MAX_TOKEN_BYTES} bytes")));
    }
    let parts: Vec<&str> = token.split('.').collect();
    if parts.len() != 3 {
        return Err(malformed(format!(
            "{} dot-separated parts instead of 3",
            parts.len()
        )));
    }
    if parts.iter().any(|p| p.is_empty() || !is_b64url(p)) {
        return Err(malformed("a part is empty or not base64url"));
    }
    let header_bytes =
        b64url_decode(parts[0]).ok_or_else(|| malformed("header is not base64url"))?;
    let fields: Map<String, Value> = serde_json::from_slice(&header_bytes)
        .map_err(|e| malformed(format!("header is not a JSON object: {e}")))?;
    let text = |name: &str| -> Result<Option<String>, JwsError> {
        match fields.get(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(malformed(format!("header {name} is not a string"))),
        }
    };
    let alg = text("alg")?.ok_or_else(|| malformed("header has no alg"))?;
    let kid = text("kid")?;
    let typ = text("typ")?;
    if fields.contains_key("crit") {
        // RFC 7515 4.1.11: a recipient must refuse critical extensions it does not know,
        // and we know none.
        return Err(malformed("header crit is not supported"));
    }
    Ok(UnverifiedHeader {
        alg,
        kid,
        typ,
        fields,
    })
}

/// Verifies the signature of `token` with `key` (whose algorithm must be the header's) and
/// returns its claims. Time claims are not checked here: each caller checks them itself, so
/// that it can map them to its own contract codes and re-check them on cache hits.
pub fn verify<T: DeserializeOwned>(
    token: &str,
    header: &UnverifiedHeader,
    key: &PublicKey,
) -> Result<T, JwsError> {
    let alg = key.alg();
    if header.alg != alg.name() {
        return Err(JwsError::AlgorithmMismatch {
            header: header.alg.clone(),
            key: alg.name(),
        });
    }
    let mut validation = jsonwebtoken::Validation::new(alg.algorithm());
    validation.algorithms = vec![alg.algorithm()];
    validation.required_spec_claims.clear();
    validation.validate_exp = false;
    validation.validate_nbf = false;
    validation.validate_aud = false;
    jsonwebtoken::decode::<T>(token, key.decoding(), &validation)
        .map(|data| data.claims)
        .map_err(|e| {
            use jsonwebtoken::errors::ErrorKind;
            match e.kind() {
                ErrorKind::InvalidSignature
                | ErrorKind::InvalidEcdsaKey
                | ErrorKind::InvalidEddsaKey => JwsError::BadSignature,
                ErrorKind::InvalidAlgorithm => JwsError::AlgorithmMismatch {
                    header: header.alg.clone(),
                    key: alg.name(),
                },
                ErrorKind::Json(err) => JwsError::Claims(err.to_string()),
                other => malformed(format!("{other:?}")),
            }
        })
}

/// A JWT NumericDate (RFC 7519 section 2): seconds since the epoch, integer or not.
pub(crate) fn numeric_date(value: &Value) -> Option<u64> {
    if let Some(n) = value.as_u64() {
        return Some(n);
    }
    let f = value.as_f64()?;
    (f.is_finite() && f >= 0.0 && f < u64::MAX as f64).then(|| f.floor() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_rules() {
        let enc = |v: Value| b64url(v.to_string().as_bytes());
        let ok = format!(
            "{}.e30.c2ln",
            enc(serde_json::json!({"alg": "ES256", "kid": "k"}))
        );
        let h = read_header(&ok).unwrap();
        assert_eq!((h.alg.as_str(), h.kid.as_deref()), ("ES256", Some("k")));
        for bad in [
            "a.b".to_string(),
            "a.b.c.d".to_string(),
            format!("{}.e30.", enc(serde_json::json!({"alg": "ES256"}))),
            format!("{}.e30.c2ln", enc(serde_json::json!({"kid": "k"}))),
            format!("{}.e30.c2ln", enc(serde_json::json!({"alg": 5}))),
            format!(
                "{}.e30.c2ln",
                enc(serde_json::json!({"alg": "ES256", "crit": ["b64"]}))
            ),
            format!("{}.e30.c2l+", enc(serde_json::json!({"alg": "ES256"}))),
            "W10.e30.c2ln".to_string(),
            "x".repeat(MAX_TOKEN_BYTES + 1),
        ] {
            assert!(read_header(&bad).is_err(), "{bad:.60}");
        }
    }

    #[test]
    fn numeric_dates() {
        assert_eq!(numeric_date(&serde_json::json!(10)), Some(10));
        assert_eq!(numeric_date(&serde_json::json!(10.7)), Some(10));
        assert_eq!(numeric_date(&serde_json::json!(-1)), None);
        assert_eq!(numeric_date(&serde_json::json!("10")), None);
    }
}
