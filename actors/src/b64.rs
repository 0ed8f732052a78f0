//! Base64 as DSSE uses it: we always write standard base64 with padding, and we read
//! standard or URL-safe, padded or not (the DSSE spec allows either on input).

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use serde::{Deserialize, Deserializer, Serializer};

/// Standard base64 with padding.
pub fn encode(bytes: &[u8]) -> String {
    STANDARD.encode(bytes)
}

/// Decodes standard or URL-safe base64, with or without padding.
pub fn decode(text: &str) -> Result<Vec<u8>, base64::DecodeError> {
    let trimmed = text.trim_end_matches('=');
    if trimmed.contains(['-', '_']) {
        URL_SAFE_NO_PAD.decode(trimmed)
    } else {
        base64::engine::general_purpose::STANDARD_NO_PAD.decode(trimmed)
    }
}

/// Decodes standard base64 only (RFC 4648 section 4, padding optional): what request
/// bodies must use, so that a schema check and the signer agree on every payload.
pub fn decode_standard(text: &str) -> Result<Vec<u8>, base64::DecodeError> {
    base64::engine::general_purpose::STANDARD_NO_PAD.decode(text.trim_end_matches('='))
}

/// `#[serde(with = "b64")]` for byte fields carried as base64 strings.
pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&encode(bytes))
}

/// See [`serialize`].
pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
    let text = std::borrow::Cow::<str>::deserialize(d)?;
    decode(&text).map_err(serde::de::Error::custom)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_both_alphabets_with_and_without_padding() {
        let bytes: Vec<u8> = (0u8..=255).collect();
        let std = STANDARD.encode(&bytes);
        let url = base64::engine::general_purpose::URL_SAFE.encode(&bytes);
        assert!(std.contains('+') && url.contains('-'));
        for text in [
            std.clone(),
            url.clone(),
            std.trim_end_matches('=').into(),
            url.trim_end_matches('=').into(),
        ] {
            assert_eq!(decode(&text).unwrap(), bytes);
        }
        assert!(decode("not base64!").is_err());
    }
}
