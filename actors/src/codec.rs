//! JSON and CBOR bodies: same data model, picked by `Content-Type`.

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::SignerError;
use crate::request::SignRequest;

/// The two encodings of the contract. A result uses the encoding of its request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ContentType {
    Json,
    Cbor,
}

impl ContentType {
    /// Reads a `Content-Type` header; absent means JSON. Parameters (`; charset=utf-8`) are ignored.
    pub fn from_header(value: Option<&str>) -> Result<Self, SignerError> {
        let Some(value) = value else {
            return Ok(Self::Json);
        };
        let essence = value
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        match essence.as_str() {
            "application/json" | "" => Ok(Self::Json),
            "application/cbor" => Ok(Self::Cbor),
            _ => Err(SignerError::UnsupportedMediaType(format!(
                "Content-Type {} is neither application/json nor application/cbor",
                crate::echo::echo(value)
            ))),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Json => "application/json",
            Self::Cbor => "application/cbor",
        }
    }

    /// Encodes a message.
    pub fn encode<T: Serialize>(self, value: &T) -> Result<Vec<u8>, SignerError> {
        match self {
            Self::Json => serde_json::to_vec(value)
                .map_err(|e| SignerError::Internal(format!("JSON encode: {e}"))),
            Self::Cbor => {
                let mut out = Vec::new();
                ciborium::into_writer(value, &mut out)
                    .map_err(|e| SignerError::Internal(format!("CBOR encode: {e}")))?;
                Ok(out)
            }
        }
    }

    /// Decodes a message; any decoding failure is `invalid_request`.
    pub fn decode<T: DeserializeOwned>(self, bytes: &[u8]) -> Result<T, SignerError> {
        match self {
            Self::Json => serde_json::from_slice(bytes)
                .map_err(|e| SignerError::InvalidRequest(format!("body: {}", bounded(&e)))),
            Self::Cbor => ciborium::from_reader(bytes)
                .map_err(|e| SignerError::InvalidRequest(format!("CBOR body: {}", bounded(&e)))),
        }
    }
}

/// A decoder's error text, bounded: serde and ciborium quote the offending value or field
/// name (`unknown field `<600 KB>``), which comes from the body.
fn bounded(e: &dyn std::fmt::Display) -> String {
    crate::echo::bound_message(&e.to_string())
}

/// `requestId` and `tenant`, read leniently from a body that is not a valid request, so
/// its refusal still reaches the right tenant under the right requestId.
#[derive(Debug, Default, serde::Deserialize)]
pub struct IdProbe {
    #[serde(rename = "requestId")]
    pub request_id: Option<String>,
    pub tenant: Option<String>,
}

/// See [`IdProbe`]; empty when even that cannot be read.
pub fn probe_ids(bytes: &[u8], content_type: ContentType) -> IdProbe {
    content_type.decode::<IdProbe>(bytes).unwrap_or_default()
}

/// Just the `apiVersion`, read leniently when a body does not decode as v1.
#[derive(serde::Deserialize)]
struct VersionProbe {
    #[serde(rename = "apiVersion")]
    api_version: Option<String>,
}

/// Decodes and validates a request body. A body that is not v1 reports
/// `unsupported_api_version` rather than the schema errors of a format we do not speak.
pub fn decode_request(bytes: &[u8], content_type: ContentType) -> Result<SignRequest, SignerError> {
    match content_type.decode::<SignRequest>(bytes) {
        Ok(req) => {
            req.validate()?;
            Ok(req)
        }
        Err(err) => {
            if let Ok(VersionProbe {
                api_version: Some(v),
            }) = content_type.decode::<VersionProbe>(bytes)
                && v != crate::API_VERSION
            {
                return Err(SignerError::UnsupportedApiVersion(format!(
                    "apiVersion {} is not {}",
                    crate::echo::echo(&v),
                    crate::API_VERSION
                )));
            }
            Err(err)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorCode;

    fn sample() -> serde_json::Value {
        serde_json::json!({
            "apiVersion": crate::API_VERSION, "requestId": "r-1", "tenant": "acme", "kind": "dsse",
            "auth": {"opTok": "a.b.c", "dpop": "d.e.f"}, "poe": {"format": "introspect", "value": "lic"},
            "scanner": {"repository": "r/s", "imageDigest": format!("sha256:{}", "0".repeat(64))},
            "statement": {"_type": crate::statement::STATEMENT_V1,
                "subject": [{"name": "a", "digest": {"sha256": "1".repeat(64)}}],
                "predicateType": "p", "predicate": {"n": [1, 2.5, "x"], "m": {"k": null}}},
            "options": {"profile": "default"}
        })
    }

    #[test]
    fn json_and_cbor_round_trip_to_equal_values() {
        let req: SignRequest = serde_json::from_value(sample()).unwrap();
        for ct in [ContentType::Json, ContentType::Cbor] {
            let bytes = ct.encode(&req).unwrap();
            assert_eq!(decode_request(&bytes, ct).unwrap(), req, "{ct:?}");
        }
        let cbor = ContentType::Cbor.encode(&req).unwrap();
        assert_eq!(
            decode_request(&cbor, ContentType::Cbor)
                .unwrap()
                .prepare_payload()
                .unwrap(),
            req.prepare_payload().unwrap()
        );
    }

    #[test]
    fn content_type_and_version_errors() {
        assert_eq!(ContentType::from_header(None).unwrap(), ContentType::Json);
        assert_eq!(
            ContentType::from_header(Some("application/json; charset=utf-8")).unwrap(),
            ContentType::Json
        );
        assert_eq!(
            ContentType::from_header(Some("application/CBOR")).unwrap(),
            ContentType::Cbor
        );
        assert_eq!(
            ContentType::from_header(Some("text/xml"))
                .unwrap_err()
                .code(),
            ErrorCode::UnsupportedMediaType
        );
        let v2 = serde_json::json!({"apiVersion": "signer.stella-ops.org/v2", "whatever": true});
        let err = decode_request(&serde_json::to_vec(&v2).unwrap(), ContentType::Json).unwrap_err();
        assert_eq!(err.code(), ErrorCode::UnsupportedApiVersion);
        assert_eq!(
            decode_request(b"{not json", ContentType::Json)
                .unwrap_err()
                .code(),
            ErrorCode::InvalidRequest
        );
        assert_eq!(
            decode_request(b"\xff\x00", ContentType::Cbor)
                .unwrap_err()
                .code(),
            ErrorCode::InvalidRequest
        );
        let mut extra = sample();
        extra["surprise"] = 1.into();
        let err =
            decode_request(&serde_json::to_vec(&extra).unwrap(), ContentType::Json).unwrap_err();
        assert_eq!(err.code(), ErrorCode::InvalidRequest);
    }
}
