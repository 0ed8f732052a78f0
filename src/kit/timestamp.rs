//! Checks an RFC 3161 timestamp of a Sigstore bundle (`rfc3161Timestamps[].signedTimestamp`,
//! a DER `TimeStampResp` as the signer stores it, or a bare `TimeStampToken`) over a
//! signature, against the kit's timestamp authorities, and gives the time it vouches for.
//!
//! The checks: the token is CMS SignedData over a TSTInfo; the TSTInfo's messageImprint is
//! the SHA-256 (or SHA-384) of the signature; the signer's signed attributes carry the
//! TSTInfo's digest and its content type; their signature verifies under a certificate of
//! the token or of the trusted root; that certificate is a timeStamping certificate whose
//! path reaches a configured timestamp authority at the stamped time.

use std::time::SystemTime;

use cms::cert::CertificateChoices;
use cms::content_info::ContentInfo;
use cms::signed_data::SignedData;
use der::asn1::{ObjectIdentifier, OctetString};
use der::{Decode as _, Encode as _, Reader as _, Tagged as _};
use sha2::Digest as _;
use x509_cert::Certificate;
use x509_tsp::{MessageImprint, TimeStampResp};

use crate::keys::fulcio_trust::{FulcioTrust, key_verifies};

const ID_SIGNED_DATA: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.7.2");
const ID_CT_TSTINFO: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.9.16.1.4");
const ID_CONTENT_TYPE: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.9.3");
const ID_MESSAGE_DIGEST: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.9.4");
const ID_SHA256: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.16.840.1.101.3.4.2.1");
const ID_SHA384: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.16.840.1.101.3.4.2.2");
const ID_EC_PUBLIC_KEY: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.2.1");
const ECDSA_SHA256: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.4.3.2");
const ECDSA_SHA384: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.4.3.3");

/// Why a timestamp does not vouch for a time.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TimestampError {
    #[error("not an RFC 3161 timestamp: {0}")]
    Malformed(String),
    #[error("the TSA did not grant the timestamp (PKIStatus {0})")]
    NotGranted(u8),
    #[error("the timestamp stamps other bytes than the signature (messageImprint differs)")]
    OtherImprint,
    #[error("the timestamp's signed attributes do not match its TSTInfo: {0}")]
    Attributes(String),
    #[error(
        "no certificate of the token or of the trusted root verifies the timestamp's signature"
    )]
    NoSigner,
    #[error("the timestamp's signer does not lead to a trusted timestamp authority: {0}")]
    Untrusted(String),
}

fn malformed(e: impl std::fmt::Display) -> TimestampError {
    TimestampError::Malformed(e.to_string())
}

fn digest(algorithm: ObjectIdentifier, bytes: &[u8]) -> Option<Vec<u8>> {
    match algorithm {
        ID_SHA256 => Some(sha2::Sha256::digest(bytes).to_vec()),
        ID_SHA384 => Some(sha2::Sha384::digest(bytes).to_vec()),
        _ => None,
    }
}

/// The messageImprint and genTime of a DER TSTInfo. Read field by field rather than as
/// `x509_tsp::TstInfo`: RFC 3161 lets genTime carry fractional seconds
/// (`20260101120005.27Z`), which DER's GeneralizedTime type of the `der` crate refuses.
fn tst_info(der: &[u8]) -> Result<(MessageImprint, SystemTime), TimestampError> {
    let mut reader = der::SliceReader::new(der).map_err(malformed)?;
    let (imprint, time) = reader
        .sequence(|r| {
            let _version = der::asn1::Int::decode(r)?;
            let _policy = ObjectIdentifier::decode(r)?;
            let imprint = MessageImprint::decode(r)?;
            let _serial = der::asn1::Int::decode(r)?;
            let time = der::Any::decode(r)?;
            // accuracy, ordering, nonce, tsa, extensions: not needed here
            let rest = r.remaining_len();
            r.read_slice(rest)?;
            Ok((imprint, time))
        })
        .map_err(malformed)?;
    if time.tag() != der::Tag::GeneralizedTime {
        return Err(malformed(format!("genTime is a {}", time.tag())));
    }
    let at = generalized_time(time.value()).ok_or_else(|| {
        malformed(format!(
            "genTime {:?}",
            String::from_utf8_lossy(time.value())
        ))
    })?;
    Ok((imprint, at))
}

/// `YYYYMMDDHHMMSS[.f+]Z` as a time.
fn generalized_time(text: &[u8]) -> Option<SystemTime> {
    let text = std::str::from_utf8(text).ok()?.strip_suffix('Z')?;
    let (whole, fraction) = match text.split_once('.') {
        Some((w, f)) if !f.is_empty() && f.bytes().all(|b| b.is_ascii_digit()) => (w, f),
        Some(_) => return None,
        None => (text, "0"),
    };
    if whole.len() != 14 || !whole.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let rfc3339 = format!(
        "{}-{}-{}T{}:{}:{}.{fraction}Z",
        &whole[0..4],
        &whole[4..6],
        &whole[6..8],
        &whole[8..10],
        &whole[10..12],
        &whole[12..14]
    );
    humantime::parse_rfc3339(&rfc3339).ok()
}

/// The token of `der`: a `TimeStampResp` (granted) or a bare `ContentInfo`.
fn token(der: &[u8]) -> Result<ContentInfo, TimestampError> {
    if let Ok(info) = ContentInfo::from_der(der) {
        return Ok(info);
    }
    let resp = TimeStampResp::from_der(der).map_err(malformed)?;
    let status = resp.status.status as u8;
    if status > 1 {
        return Err(TimestampError::NotGranted(status));
    }
    resp.time_stamp_token
        .ok_or_else(|| malformed("granted, but no timeStampToken"))
}

/// Checks `timestamp` over `signature` and returns the time it stamps (its genTime).
/// `trusted` are the timestamp authorities; `roots` their certificates (candidates for a
/// token that carries no certificate).
pub fn verify(
    timestamp: &[u8],
    signature: &[u8],
    trusted: &FulcioTrust,
    roots: &[Vec<u8>],
) -> Result<SystemTime, TimestampError> {
    let info = token(timestamp)?;
    if info.content_type != ID_SIGNED_DATA {
        return Err(malformed(format!("content type {}", info.content_type)));
    }
    let signed: SignedData = info.content.decode_as().map_err(malformed)?;
    if signed.encap_content_info.econtent_type != ID_CT_TSTINFO {
        return Err(malformed("the signed content is not a TSTInfo"));
    }
    let tst_der = signed
        .encap_content_info
        .econtent
        .as_ref()
        .ok_or_else(|| malformed("no TSTInfo in the token"))?
        .decode_as::<OctetString>()
        .map_err(malformed)?
        .into_bytes();
    let (message_imprint, at) = tst_info(&tst_der)?;
    let imprint = digest(message_imprint.hash_algorithm.oid, signature)
        .ok_or_else(|| malformed("messageImprint hash is not SHA-256 or SHA-384"))?;
    if imprint != message_imprint.hashed_message.as_bytes() {
        return Err(TimestampError::OtherImprint);
    }
    let [signer] = signed.signer_infos.0.as_slice() else {
        return Err(malformed("the token must have exactly one signer"));
    };
    let attrs = signer
        .signed_attrs
        .as_ref()
        .ok_or_else(|| TimestampError::Attributes("none".into()))?;
    let attr = |oid: ObjectIdentifier| {
        attrs
            .iter()
            .find(|a| a.oid == oid)
            .and_then(|a| a.values.get(0))
            .ok_or_else(|| TimestampError::Attributes(format!("no {oid}")))
    };
    let content_type: ObjectIdentifier = attr(ID_CONTENT_TYPE)?
        .decode_as()
        .map_err(|e| TimestampError::Attributes(e.to_string()))?;
    if content_type != ID_CT_TSTINFO {
        return Err(TimestampError::Attributes(
            "contentType is not TSTInfo".into(),
        ));
    }
    let message_digest: OctetString = attr(ID_MESSAGE_DIGEST)?
        .decode_as()
        .map_err(|e| TimestampError::Attributes(e.to_string()))?;
    let wanted = digest(signer.digest_alg.oid, &tst_der)
        .ok_or_else(|| malformed("the signer's digest is not SHA-256 or SHA-384"))?;
    if message_digest.as_bytes() != wanted {
        return Err(TimestampError::Attributes(
            "messageDigest is not the TSTInfo's digest".into(),
        ));
    }
    // ECDSA; some TSAs name the key type instead of the signature algorithm.
    let algorithm = match (signer.signature_algorithm.oid, signer.digest_alg.oid) {
        (ECDSA_SHA256 | ECDSA_SHA384, _) => signer.signature_algorithm.oid,
        (ID_EC_PUBLIC_KEY, ID_SHA256) => ECDSA_SHA256,
        (ID_EC_PUBLIC_KEY, ID_SHA384) => ECDSA_SHA384,
        (other, _) => return Err(malformed(format!("signature algorithm {other}"))),
    };
    let signed_bytes = attrs.to_der().map_err(malformed)?;
    let carried: Vec<Vec<u8>> = signed
        .certificates
        .iter()
        .flat_map(|set| set.0.iter())
        .filter_map(|c| match c {
            CertificateChoices::Certificate(c) => c.to_der().ok(),
            CertificateChoices::Other(_) => None,
        })
        .collect();
    let signer_der = carried
        .iter()
        .chain(roots)
        .find(|der| {
            Certificate::from_der(der).is_ok_and(|c| {
                key_verifies(&c, algorithm, &signed_bytes, signer.signature.as_bytes())
            })
        })
        .ok_or(TimestampError::NoSigner)?;
    let mut chain = vec![signer_der.clone()];
    chain.extend(carried.iter().filter(|c| *c != signer_der).cloned());
    trusted
        .verify_timestamping(&chain, at)
        .map_err(|e| TimestampError::Untrusted(e.to_string()))?;
    Ok(at)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generalized_times_with_and_without_fractions() {
        let t = |s: &str| {
            generalized_time(s.as_bytes()).map(|t| humantime::format_rfc3339_nanos(t).to_string())
        };
        assert_eq!(
            t("20260101120005Z").as_deref(),
            Some("2026-01-01T12:00:05.000000000Z")
        );
        assert_eq!(
            t("20260101120005.27Z").as_deref(),
            Some("2026-01-01T12:00:05.270000000Z")
        );
        for bad in [
            "20260101120005",
            "2026010112000Z",
            "20260101120005.Z",
            "20260101120005.2aZ",
            "20261301120005Z",
        ] {
            assert_eq!(t(bad), None, "{bad}");
        }
    }
}
