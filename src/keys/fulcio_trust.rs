//! Checks a certificate chain Fulcio returned before the signer signs with it: it must chain
//! to a configured Fulcio root (`fulcio_roots`: a Sigstore `trusted_root.json` or a PEM
//! bundle), every certificate on the path must be valid now, every issuer must be a CA and
//! every signature must verify under its issuer's key (ECDSA P-256/P-384 with SHA-256/384,
//! what Fulcio uses), and the leaf must certify the ephemeral key the signer asked for.
//!
//! Without this check a Fulcio answer (or anything posing as Fulcio on the network path)
//! would decide which certificate our signatures carry; verifiers would reject such bundles,
//! but only after the signer had reported them as `sign.completed`.

use std::path::Path;
use std::time::SystemTime;

use der::asn1::ObjectIdentifier;
use der::{Decode as _, Encode as _};
use ring::signature::{self, UnparsedPublicKey, VerificationAlgorithm};
use sha2::{Digest as _, Sha256};
use signer_actors::keys::PublicKey;
use sigstore_protobuf_specs::dev::sigstore::trustroot::v1::{CertificateAuthority, TrustedRoot};
use x509_cert::Certificate;
use x509_cert::ext::pkix::name::GeneralName;
use x509_cert::ext::pkix::{
    BasicConstraints, ExtendedKeyUsage, KeyUsage, KeyUsages, SubjectAltName,
};

/// The longest path (leaf, intermediates, root) followed; Fulcio's is two or three.
const MAX_PATH: usize = 8;

const ID_EC_PUBLIC_KEY: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.2.1");
const SECP256R1: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.3.1.7");
const SECP384R1: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.132.0.34");
const ECDSA_SHA256: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.4.3.2");
const ECDSA_SHA384: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.4.3.3");
const BASIC_CONSTRAINTS: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.29.19");
const KEY_USAGE: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.29.15");
const EXT_KEY_USAGE: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.29.37");
const SUBJECT_ALT_NAME: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.29.17");
const ID_KP_CODE_SIGNING: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.6.1.5.5.7.3.3");
const ID_KP_TIME_STAMPING: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.6.1.5.5.7.3.8");
/// Fulcio's OIDC issuer extension (v2, a DER UTF8String).
const FULCIO_ISSUER_V2: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.6.1.4.1.57264.1.8");
/// Fulcio's OIDC issuer extension (v1, deprecated: the raw string).
const FULCIO_ISSUER_V1: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.6.1.4.1.57264.1.1");

/// Why the `fulcio_roots` file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TrustRootError {
    #[error("fulcio_roots {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("fulcio_roots {path}: {reason}")]
    Malformed { path: String, reason: String },
    #[error("fulcio_roots {0}: no Fulcio certificate in it")]
    Empty(String),
}

/// Why a Fulcio chain is not used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChainError {
    #[error("the chain is empty")]
    Empty,
    #[error("certificate {index} of the chain is not X.509 DER: {reason}")]
    Malformed { index: usize, reason: String },
    #[error("the leaf certifies another key than our ephemeral key")]
    NotOurKey,
    #[error("the leaf is not a code-signing certificate: {0}")]
    NotForSigning(String),
    #[error("the timestamp's signer is not a timestamping certificate: {0}")]
    NotForTimestamping(String),
    #[error("{subject} is not valid now (valid {not_before} to {not_after})")]
    OutsideValidity {
        subject: String,
        not_before: String,
        not_after: String,
    },
    #[error("{subject} issued a certificate but is not a CA: {reason}")]
    NotCa { subject: String, reason: String },
    #[error(
        "no certificate of the chain or of fulcio_roots issued {subject} (issuer {issuer}) \
         with a signature that verifies: the chain does not lead to a configured Fulcio root"
    )]
    Untrusted { subject: String, issuer: String },
    #[error("the chain ends at the root {subject}, which is not a configured Fulcio root")]
    UntrustedRoot { subject: String },
    #[error("the configured root {subject} is outside its trusted_root.json validFor window")]
    RootOutsideWindow { subject: String },
    #[error("the chain is longer than {MAX_PATH} certificates")]
    TooLong,
}

/// A trusted certificate, with the window `trusted_root.json` gives its authority.
struct Anchor {
    cert: Certificate,
    /// `validFor.start` / `validFor.end` of its certificate authority, if given.
    window: (Option<SystemTime>, Option<SystemTime>),
}

/// The Fulcio roots (and intermediates) a key's certificates must chain to.
pub struct FulcioTrust {
    anchors: Vec<Anchor>,
}

/// What the signer learnt from a verified leaf: what `keys list` and identity revocation
/// need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedLeaf {
    /// Lowercase hex SHA-256 of the leaf's DER (what `keys revoke` takes besides the keyid).
    pub sha256: String,
    /// The identity Fulcio certified: the first URI, e-mail or other name of the SAN.
    pub san: String,
    /// The OIDC issuer Fulcio recorded (empty when the leaf has no issuer extension).
    pub issuer: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl FulcioTrust {
    /// Reads `path`: a Sigstore `trusted_root.json` (its `certificateAuthorities`, the
    /// Fulcio CAs; the timestamp authorities and logs are not used here) when it is JSON,
    /// else a PEM bundle of root and intermediate certificates.
    pub fn load(path: &Path) -> Result<Self, TrustRootError> {
        let name = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| TrustRootError::Read {
            path: name.clone(),
            source,
        })?;
        let malformed = |reason: String| TrustRootError::Malformed {
            path: name.clone(),
            reason,
        };
        let anchors = if text.trim_start().starts_with('{') {
            Self::from_trusted_root(&text).map_err(malformed)?
        } else {
            Self::from_pem(&text).map_err(malformed)?
        };
        if anchors.is_empty() {
            return Err(TrustRootError::Empty(name));
        }
        Ok(FulcioTrust { anchors })
    }

    /// Trusts these DER certificates (tests).
    #[cfg(test)]
    pub(crate) fn from_der(certs: &[Vec<u8>]) -> Result<Self, ChainError> {
        let anchors = certs
            .iter()
            .enumerate()
            .map(|(index, der)| {
                anchor(der.clone(), (None, None))
                    .map_err(|reason| ChainError::Malformed { index, reason })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(FulcioTrust { anchors })
    }

    /// The Fulcio CAs of a `trusted_root.json` (Sigstore's own message type reads it).
    fn from_trusted_root(text: &str) -> Result<Vec<Anchor>, String> {
        let root: TrustedRoot =
            serde_json::from_str(text).map_err(|e| format!("not a trusted_root.json: {e}"))?;
        Ok(Self::from_authorities(&root.certificate_authorities)?.anchors)
    }

    fn from_pem(text: &str) -> Result<Vec<Anchor>, String> {
        let blocks = pem::parse_many(text).map_err(|e| e.to_string())?;
        blocks
            .into_iter()
            .filter(|b| b.tag() == "CERTIFICATE")
            .enumerate()
            .map(|(i, b)| {
                anchor(b.into_contents(), (None, None)).map_err(|e| format!("certificate {i}: {e}"))
            })
            .collect()
    }

    /// Checks `chain` (DER, leaf first, as Fulcio returned it) at `now` for our ephemeral
    /// `key`, and returns what the leaf certifies. The path is built from the leaf up through
    /// the chain's own certificates and the configured ones, and ends at the first configured
    /// certificate reached: Fulcio's extra certificates are candidates, never trust.
    pub fn verify(
        &self,
        chain: &[Vec<u8>],
        key: &PublicKey,
        now: SystemTime,
    ) -> Result<VerifiedLeaf, ChainError> {
        let parsed = parse_chain(chain)?;
        let spki = parsed[0]
            .tbs_certificate
            .subject_public_key_info
            .to_der()
            .map_err(|e| ChainError::Malformed {
                index: 0,
                reason: e.to_string(),
            })?;
        if spki != key.spki_der() {
            return Err(ChainError::NotOurKey);
        }
        check_signing_leaf(&parsed[0])?;
        self.verify_path(&parsed, now)?;
        Ok(leaf_facts(&chain[0], &parsed[0]))
    }

    /// Checks the chain of an RFC 3161 timestamp's signer (DER, its certificate first, then
    /// any the token carried) at the timestamp's time `at`: the leaf must be a timeStamping
    /// certificate, and the path must reach a configured timestamp authority as
    /// [`FulcioTrust::verify`] reaches a Fulcio root.
    pub fn verify_timestamping(&self, chain: &[Vec<u8>], at: SystemTime) -> Result<(), ChainError> {
        let parsed = parse_chain(chain)?;
        check_timestamping_leaf(&parsed[0])?;
        self.verify_path(&parsed, at)
    }

    /// The certificates of `authorities` (a `trusted_root.json`'s `certificateAuthorities`
    /// or `timestampAuthorities`), each trusted within its authority's `validFor`.
    pub fn from_authorities(authorities: &[CertificateAuthority]) -> Result<Self, String> {
        let time = |t: Option<&prost_types::Timestamp>| {
            t.map(|t| SystemTime::try_from(*t).map_err(|e| format!("validFor: {e}")))
                .transpose()
        };
        let mut anchors = Vec::new();
        for (i, ca) in authorities.iter().enumerate() {
            let range = ca.valid_for.as_ref();
            let window = (
                time(range.and_then(|r| r.start.as_ref()))?,
                time(range.and_then(|r| r.end.as_ref()))?,
            );
            for (j, c) in ca
                .cert_chain
                .iter()
                .flat_map(|c| &c.certificates)
                .enumerate()
            {
                anchors
                    .push(anchor(c.raw_bytes.clone(), window).map_err(|e| {
                        format!("certificateAuthorities[{i}] certificate {j}: {e}")
                    })?);
            }
        }
        Ok(FulcioTrust { anchors })
    }

    /// The path from `parsed[0]` (already checked for its purpose) up to a configured
    /// certificate, every certificate on it valid at `now` and every issuer a CA.
    fn verify_path(&self, parsed: &[Certificate], now: SystemTime) -> Result<(), ChainError> {
        let leaf = &parsed[0];
        within_validity(leaf, now)?;
        let mut current = leaf;
        for _ in 0..MAX_PATH {
            if let Some(a) = self.anchors.iter().find(|a| a.cert == *current) {
                return anchor_in_window(a, now);
            }
            let issuer = self.issuer_of(current, &parsed[1..])?;
            if issuer == current {
                // self-signed and not configured: a root, but not ours
                return Err(ChainError::UntrustedRoot {
                    subject: describe(current),
                });
            }
            within_validity(issuer, now)?;
            check_ca(issuer)?;
            current = issuer;
        }
        Err(ChainError::TooLong)
    }

    /// The certificate (configured ones first, then the chain's) that issued `cert`: its
    /// subject is `cert`'s issuer and its key verifies `cert`'s signature.
    fn issuer_of<'a>(
        &'a self,
        cert: &Certificate,
        chain: &'a [Certificate],
    ) -> Result<&'a Certificate, ChainError> {
        let wanted = &cert.tbs_certificate.issuer;
        self.anchors
            .iter()
            .map(|a| &a.cert)
            .chain(chain.iter())
            .filter(|c| c.tbs_certificate.subject == *wanted)
            .find(|c| signed_by(cert, c))
            .ok_or_else(|| ChainError::Untrusted {
                subject: describe(cert),
                issuer: wanted.to_string(),
            })
    }
}

/// Parses a chain (DER, leaf first); an empty one is refused.
fn parse_chain(chain: &[Vec<u8>]) -> Result<Vec<Certificate>, ChainError> {
    if chain.is_empty() {
        return Err(ChainError::Empty);
    }
    chain
        .iter()
        .enumerate()
        .map(|(index, der)| {
            Certificate::from_der(der).map_err(|e| ChainError::Malformed {
                index,
                reason: e.to_string(),
            })
        })
        .collect()
}

/// Parses a trusted certificate.
fn anchor(
    der: Vec<u8>,
    window: (Option<SystemTime>, Option<SystemTime>),
) -> Result<Anchor, String> {
    let cert = Certificate::from_der(&der).map_err(|e| e.to_string())?;
    Ok(Anchor { cert, window })
}

fn anchor_in_window(a: &Anchor, now: SystemTime) -> Result<(), ChainError> {
    within_validity(&a.cert, now)?;
    let (start, end) = a.window;
    if start.is_some_and(|s| now < s) || end.is_some_and(|e| now > e) {
        return Err(ChainError::RootOutsideWindow {
            subject: describe(&a.cert),
        });
    }
    Ok(())
}

/// A certificate's subject for messages, or its serial when the subject is empty (Fulcio
/// leaves have none).
fn describe(cert: &Certificate) -> String {
    let subject = cert.tbs_certificate.subject.to_string();
    if subject.is_empty() {
        format!(
            "the certificate with serial {}",
            cert.tbs_certificate.serial_number
        )
    } else {
        format!("\"{subject}\"")
    }
}

fn within_validity(cert: &Certificate, now: SystemTime) -> Result<(), ChainError> {
    let v = &cert.tbs_certificate.validity;
    let (not_before, not_after) = (v.not_before.to_system_time(), v.not_after.to_system_time());
    if now < not_before || now > not_after {
        return Err(ChainError::OutsideValidity {
            subject: describe(cert),
            not_before: humantime::format_rfc3339(not_before).to_string(),
            not_after: humantime::format_rfc3339(not_after).to_string(),
        });
    }
    Ok(())
}

/// The extension `oid` of `cert`, decoded, if present.
fn extension<T: for<'a> der::Decode<'a>>(
    cert: &Certificate,
    oid: ObjectIdentifier,
) -> Result<Option<T>, String> {
    let Some(ext) = cert
        .tbs_certificate
        .extensions
        .iter()
        .flatten()
        .find(|e| e.extn_id == oid)
    else {
        return Ok(None);
    };
    T::from_der(ext.extn_value.as_bytes())
        .map(Some)
        .map_err(|e| format!("extension {oid}: {e}"))
}

/// An issuer must say it is a CA (basicConstraints cA) and, when it has a keyUsage, that it
/// signs certificates.
fn check_ca(cert: &Certificate) -> Result<(), ChainError> {
    let not_ca = |reason: String| ChainError::NotCa {
        subject: describe(cert),
        reason,
    };
    match extension::<BasicConstraints>(cert, BASIC_CONSTRAINTS).map_err(not_ca)? {
        Some(bc) if bc.ca => {}
        Some(_) => return Err(not_ca("basicConstraints has cA false".into())),
        None => return Err(not_ca("no basicConstraints".into())),
    }
    if let Some(ku) = extension::<KeyUsage>(cert, KEY_USAGE).map_err(not_ca)?
        && !ku.0.contains(KeyUsages::KeyCertSign)
    {
        return Err(not_ca("its keyUsage lacks keyCertSign".into()));
    }
    Ok(())
}

/// The leaf must be usable for our signatures: digitalSignature when it has a keyUsage,
/// codeSigning when it has an extendedKeyUsage (Fulcio's leaves have both), and not a CA.
fn check_signing_leaf(leaf: &Certificate) -> Result<(), ChainError> {
    let bad = ChainError::NotForSigning;
    if let Some(ku) = extension::<KeyUsage>(leaf, KEY_USAGE).map_err(bad)?
        && !ku.0.contains(KeyUsages::DigitalSignature)
    {
        return Err(bad("its keyUsage lacks digitalSignature".into()));
    }
    if let Some(eku) = extension::<ExtendedKeyUsage>(leaf, EXT_KEY_USAGE).map_err(bad)?
        && !eku.0.contains(&ID_KP_CODE_SIGNING)
    {
        return Err(bad("its extendedKeyUsage lacks codeSigning".into()));
    }
    if let Some(bc) = extension::<BasicConstraints>(leaf, BASIC_CONSTRAINTS).map_err(bad)?
        && bc.ca
    {
        return Err(bad("it is a CA certificate".into()));
    }
    Ok(())
}

/// A timestamp's signer must be a TSA certificate: an extendedKeyUsage with timeStamping
/// (RFC 3161 2.3 makes it the only purpose), digitalSignature when it has a keyUsage, not a CA.
fn check_timestamping_leaf(leaf: &Certificate) -> Result<(), ChainError> {
    let bad = ChainError::NotForTimestamping;
    match extension::<ExtendedKeyUsage>(leaf, EXT_KEY_USAGE).map_err(bad)? {
        Some(eku) if eku.0.contains(&ID_KP_TIME_STAMPING) => {}
        Some(_) => return Err(bad("its extendedKeyUsage lacks timeStamping".into())),
        None => return Err(bad("it has no extendedKeyUsage".into())),
    }
    if let Some(ku) = extension::<KeyUsage>(leaf, KEY_USAGE).map_err(bad)?
        && !ku.0.contains(KeyUsages::DigitalSignature)
    {
        return Err(bad("its keyUsage lacks digitalSignature".into()));
    }
    if let Some(bc) = extension::<BasicConstraints>(leaf, BASIC_CONSTRAINTS).map_err(bad)?
        && bc.ca
    {
        return Err(bad("it is a CA certificate".into()));
    }
    Ok(())
}

/// Whether `issuer`'s key verifies `cert`'s signature (ECDSA P-256/P-384, SHA-256/384).
fn signed_by(cert: &Certificate, issuer: &Certificate) -> bool {
    // The inner and outer signature algorithms must agree (RFC 5280 4.1.1.2).
    if cert.tbs_certificate.signature != cert.signature_algorithm {
        return false;
    }
    // DER is canonical and x509-cert decodes DER only: re-encoding gives the signed bytes.
    let Ok(tbs) = cert.tbs_certificate.to_der() else {
        return false;
    };
    let Some(sig) = cert.signature.as_bytes() else {
        return false;
    };
    key_verifies(issuer, cert.signature_algorithm.oid, &tbs, sig)
}

/// Whether the key `cert` certifies verifies `sig` (ASN.1 DER ECDSA, P-256 or P-384) over
/// `message` with the signature algorithm `algorithm` (ecdsa-with-SHA256 or -SHA384).
pub(crate) fn key_verifies(
    cert: &Certificate,
    algorithm: ObjectIdentifier,
    message: &[u8],
    sig: &[u8],
) -> bool {
    let spki = &cert.tbs_certificate.subject_public_key_info;
    if spki.algorithm.oid != ID_EC_PUBLIC_KEY {
        return false;
    }
    let Some(curve) = spki
        .algorithm
        .parameters
        .as_ref()
        .and_then(|p| p.decode_as::<ObjectIdentifier>().ok())
    else {
        return false;
    };
    let algorithm: &'static dyn VerificationAlgorithm = match (curve, algorithm) {
        (SECP256R1, ECDSA_SHA256) => &signature::ECDSA_P256_SHA256_ASN1,
        (SECP256R1, ECDSA_SHA384) => &signature::ECDSA_P256_SHA384_ASN1,
        (SECP384R1, ECDSA_SHA256) => &signature::ECDSA_P384_SHA256_ASN1,
        (SECP384R1, ECDSA_SHA384) => &signature::ECDSA_P384_SHA384_ASN1,
        _ => return false,
    };
    let Some(point) = spki.subject_public_key.as_bytes() else {
        return false;
    };
    UnparsedPublicKey::new(algorithm, point)
        .verify(message, sig)
        .is_ok()
}

/// The facts of a verified leaf.
fn leaf_facts(der: &[u8], leaf: &Certificate) -> VerifiedLeaf {
    let v = &leaf.tbs_certificate.validity;
    VerifiedLeaf {
        sha256: hex::encode(Sha256::digest(der)),
        san: leaf_san(leaf).unwrap_or_default(),
        issuer: leaf_issuer(leaf).unwrap_or_default(),
        not_before: v.not_before.to_system_time(),
        not_after: v.not_after.to_system_time(),
    }
}

/// The identity of a Fulcio leaf: the first URI, e-mail or DNS name of its SAN (Fulcio puts
/// exactly one), or the UTF8String of an otherName (Fulcio's username SAN).
pub fn leaf_san(leaf: &Certificate) -> Option<String> {
    let san = extension::<SubjectAltName>(leaf, SUBJECT_ALT_NAME).ok()??;
    san.0.iter().find_map(|name| match name {
        GeneralName::UniformResourceIdentifier(s)
        | GeneralName::Rfc822Name(s)
        | GeneralName::DnsName(s) => Some(s.to_string()),
        GeneralName::OtherName(o) => o.value.decode_as::<String>().ok(),
        _ => None,
    })
}

/// The OIDC issuer Fulcio recorded in the leaf (extension 1.3.6.1.4.1.57264.1.8, or the
/// deprecated .1.1).
pub fn leaf_issuer(leaf: &Certificate) -> Option<String> {
    if let Ok(Some(s)) = extension::<String>(leaf, FULCIO_ISSUER_V2) {
        return Some(s);
    }
    let ext = leaf
        .tbs_certificate
        .extensions
        .iter()
        .flatten()
        .find(|e| e.extn_id == FULCIO_ISSUER_V1)?;
    String::from_utf8(ext.extn_value.as_bytes().to_vec()).ok()
}

/// A PEM self-signed P-256 CA certificate, for tests of configurations that need a
/// `fulcio_roots` file.
#[cfg(test)]
pub(crate) fn test_root_pem() -> String {
    tests::root_pem()
}

#[cfg(test)]
mod tests {
    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD;

    use std::str::FromStr as _;
    use std::time::Duration;

    use der::asn1::{BitString, OctetString};
    use ring::rand::SystemRandom;
    use ring::signature::{
        ECDSA_P256_SHA256_ASN1_SIGNING, ECDSA_P384_SHA384_ASN1_SIGNING, EcdsaKeyPair,
        EcdsaSigningAlgorithm, KeyPair as _,
    };
    use signer_actors::keys::KeyAlgorithm;
    use x509_cert::certificate::{TbsCertificate, Version};
    use x509_cert::ext::Extension;
    use x509_cert::name::Name;
    use x509_cert::serial_number::SerialNumber;
    use x509_cert::spki::{AlgorithmIdentifierOwned, SubjectPublicKeyInfoOwned};
    use x509_cert::time::{Time, Validity};

    use super::*;

    /// A test CA or leaf key: P-256 or P-384.
    struct TestKey {
        pair: EcdsaKeyPair,
        curve: ObjectIdentifier,
        sig_oid: ObjectIdentifier,
    }

    impl TestKey {
        fn new(p384: bool) -> Self {
            let rng = SystemRandom::new();
            let alg: &'static EcdsaSigningAlgorithm = if p384 {
                &ECDSA_P384_SHA384_ASN1_SIGNING
            } else {
                &ECDSA_P256_SHA256_ASN1_SIGNING
            };
            let pkcs8 = EcdsaKeyPair::generate_pkcs8(alg, &rng).unwrap();
            TestKey {
                pair: EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref(), &rng).unwrap(),
                curve: if p384 { SECP384R1 } else { SECP256R1 },
                sig_oid: if p384 { ECDSA_SHA384 } else { ECDSA_SHA256 },
            }
        }

        fn spki(&self) -> SubjectPublicKeyInfoOwned {
            SubjectPublicKeyInfoOwned {
                algorithm: AlgorithmIdentifierOwned {
                    oid: ID_EC_PUBLIC_KEY,
                    parameters: Some(der::Any::encode_from(&self.curve).unwrap()),
                },
                subject_public_key: BitString::from_bytes(self.pair.public_key().as_ref()).unwrap(),
            }
        }

        fn public_key(&self) -> PublicKey {
            PublicKey::from_raw(
                KeyAlgorithm::EcdsaP256Sha256,
                self.pair.public_key().as_ref(),
            )
            .unwrap()
        }
    }

    fn ext<T: der::Encode>(oid: ObjectIdentifier, value: &T) -> Extension {
        Extension {
            extn_id: oid,
            critical: true,
            extn_value: OctetString::new(value.to_der().unwrap()).unwrap(),
        }
    }

    fn ca_extensions(ca: bool) -> Vec<Extension> {
        vec![
            ext(
                BASIC_CONSTRAINTS,
                &BasicConstraints {
                    ca,
                    path_len_constraint: None,
                },
            ),
            ext(
                KEY_USAGE,
                &KeyUsage(KeyUsages::KeyCertSign | KeyUsages::CRLSign),
            ),
        ]
    }

    fn leaf_extensions(san: &str, issuer: &str) -> Vec<Extension> {
        let uri = der::asn1::Ia5String::new(san).unwrap();
        vec![
            ext(KEY_USAGE, &KeyUsage(KeyUsages::DigitalSignature.into())),
            ext(EXT_KEY_USAGE, &ExtendedKeyUsage(vec![ID_KP_CODE_SIGNING])),
            ext(
                SUBJECT_ALT_NAME,
                &SubjectAltName(vec![GeneralName::UniformResourceIdentifier(uri)]),
            ),
            ext(FULCIO_ISSUER_V2, &issuer.to_string()),
        ]
    }

    /// `subject`'s certificate for `key`, signed by `issuer` (name and key), valid from
    /// `from` to `until` seconds around now.
    fn certificate(
        subject: &str,
        key: &SubjectPublicKeyInfoOwned,
        issuer: (&str, &TestKey),
        (from, until): (i64, i64),
        extensions: Vec<Extension>,
    ) -> Vec<u8> {
        let at = |s: i64| {
            let now = SystemTime::now();
            let t = if s >= 0 {
                now + Duration::from_secs(s as u64)
            } else {
                now - Duration::from_secs((-s) as u64)
            };
            Time::try_from(t).unwrap()
        };
        let algorithm = AlgorithmIdentifierOwned {
            oid: issuer.1.sig_oid,
            parameters: None,
        };
        let tbs = TbsCertificate {
            version: Version::V3,
            serial_number: SerialNumber::new(&[0x11, 0x18]).unwrap(),
            signature: algorithm.clone(),
            issuer: Name::from_str(issuer.0).unwrap(),
            validity: Validity {
                not_before: at(from),
                not_after: at(until),
            },
            subject: if subject.is_empty() {
                Name::default()
            } else {
                Name::from_str(subject).unwrap()
            },
            subject_public_key_info: key.clone(),
            issuer_unique_id: None,
            subject_unique_id: None,
            extensions: Some(extensions),
        };
        let signed = tbs.to_der().unwrap();
        let sig = issuer.1.pair.sign(&SystemRandom::new(), &signed).unwrap();
        Certificate {
            tbs_certificate: tbs,
            signature_algorithm: algorithm,
            signature: BitString::from_bytes(sig.as_ref()).unwrap(),
        }
        .to_der()
        .unwrap()
    }

    const ROOT: &str = "CN=sigstore,O=sigstore.dev";
    const INTERMEDIATE: &str = "CN=sigstore-intermediate,O=sigstore.dev";
    const SAN: &str = "https://ci.example.com/release.yml@refs/heads/main";
    const ISSUER: &str = "https://token.actions.example.com";
    const YEAR: i64 = 365 * 86400;

    /// A P-384 root, a P-256 intermediate and a leaf for a fresh ephemeral key, as Fulcio's
    /// public instance has them.
    struct Pki {
        root_key: TestKey,
        root: Vec<u8>,
        intermediate_key: TestKey,
        intermediate: Vec<u8>,
        ephemeral: TestKey,
        leaf: Vec<u8>,
    }

    fn pki() -> Pki {
        let root_key = TestKey::new(true);
        let root = certificate(
            ROOT,
            &root_key.spki(),
            (ROOT, &root_key),
            (-YEAR, YEAR),
            ca_extensions(true),
        );
        let intermediate_key = TestKey::new(false);
        let intermediate = certificate(
            INTERMEDIATE,
            &intermediate_key.spki(),
            (ROOT, &root_key),
            (-YEAR, YEAR),
            ca_extensions(true),
        );
        let ephemeral = TestKey::new(false);
        let leaf = certificate(
            "",
            &ephemeral.spki(),
            (INTERMEDIATE, &intermediate_key),
            (-5, 600),
            leaf_extensions(SAN, ISSUER),
        );
        Pki {
            root_key,
            root,
            intermediate_key,
            intermediate,
            ephemeral,
            leaf,
        }
    }

    pub(super) fn root_pem() -> String {
        let key = TestKey::new(false);
        let der = certificate(
            ROOT,
            &key.spki(),
            (ROOT, &key),
            (-YEAR, YEAR),
            ca_extensions(true),
        );
        pem::encode(&pem::Pem::new("CERTIFICATE", der))
    }

    fn verify(
        trust: &[&Vec<u8>],
        chain: &[&Vec<u8>],
        key: &PublicKey,
    ) -> Result<VerifiedLeaf, ChainError> {
        let trust =
            FulcioTrust::from_der(&trust.iter().map(|c| (*c).clone()).collect::<Vec<_>>()).unwrap();
        let chain: Vec<Vec<u8>> = chain.iter().map(|c| (*c).clone()).collect();
        trust.verify(&chain, key, SystemTime::now())
    }

    #[test]
    fn a_chain_to_the_configured_root_for_our_key_is_used() {
        let p = pki();
        let key = p.ephemeral.public_key();
        let leaf = verify(&[&p.root], &[&p.leaf, &p.intermediate, &p.root], &key).unwrap();
        assert_eq!(leaf.san, SAN);
        assert_eq!(leaf.issuer, ISSUER);
        assert_eq!(leaf.sha256, hex::encode(Sha256::digest(&p.leaf)));
        assert!(leaf.not_after > SystemTime::now());
        // the intermediate may come from the configuration instead of the answer
        assert!(verify(&[&p.root, &p.intermediate], &[&p.leaf], &key).is_ok());
        // a configured intermediate is a trust anchor of its own
        assert!(verify(&[&p.intermediate], &[&p.leaf], &key).is_ok());
    }

    #[test]
    fn a_chain_to_another_root_is_refused_even_with_the_same_names() {
        let p = pki();
        let other = pki();
        let key = p.ephemeral.public_key();
        // the answer carries its own root: that is no reason to trust it
        let err = verify(&[&other.root], &[&p.leaf, &p.intermediate, &p.root], &key).unwrap_err();
        assert!(matches!(err, ChainError::UntrustedRoot { .. }), "{err}");
        assert!(err.to_string().contains("CN=sigstore"), "{err}");
        // without its root the path stops at the intermediate, which nothing trusted issued
        let err = verify(&[&other.root], &[&p.leaf, &p.intermediate], &key).unwrap_err();
        assert!(matches!(err, ChainError::Untrusted { .. }), "{err}");
        assert!(err.to_string().contains("sigstore-intermediate"), "{err}");
        // an intermediate missing from the answer and the configuration
        let err = verify(&[&p.root], &[&p.leaf], &key).unwrap_err();
        assert!(matches!(err, ChainError::Untrusted { .. }), "{err}");
    }

    #[test]
    fn expired_or_not_yet_valid_certificates_anywhere_on_the_path_are_refused() {
        let p = pki();
        let key = p.ephemeral.public_key();
        let leaf = |window| {
            certificate(
                "",
                &p.ephemeral.spki(),
                (INTERMEDIATE, &p.intermediate_key),
                window,
                leaf_extensions(SAN, ISSUER),
            )
        };
        for window in [(-1200, -600), (60, 660)] {
            let err = verify(&[&p.root], &[&leaf(window), &p.intermediate], &key).unwrap_err();
            assert!(matches!(err, ChainError::OutsideValidity { .. }), "{err}");
        }
        let expired_intermediate = certificate(
            INTERMEDIATE,
            &p.intermediate_key.spki(),
            (ROOT, &p.root_key),
            (-2 * YEAR, -YEAR),
            ca_extensions(true),
        );
        let err = verify(&[&p.root], &[&p.leaf, &expired_intermediate], &key).unwrap_err();
        assert!(
            matches!(&err, ChainError::OutsideValidity { subject, .. } if subject.contains("intermediate")),
            "{err}"
        );
        let expired_root = certificate(
            ROOT,
            &p.root_key.spki(),
            (ROOT, &p.root_key),
            (-2 * YEAR, -YEAR),
            ca_extensions(true),
        );
        let err = verify(&[&expired_root], &[&p.leaf, &p.intermediate], &key).unwrap_err();
        assert!(matches!(err, ChainError::OutsideValidity { .. }), "{err}");
    }

    #[test]
    fn a_leaf_for_another_key_is_refused() {
        let p = pki();
        let someone_else = TestKey::new(false).public_key();
        let err = verify(&[&p.root], &[&p.leaf, &p.intermediate], &someone_else).unwrap_err();
        assert_eq!(err, ChainError::NotOurKey);
    }

    #[test]
    fn tampered_signatures_are_refused() {
        let p = pki();
        let key = p.ephemeral.public_key();
        // flip the last byte of the leaf's signature (the BIT STRING ends the certificate)
        let mut forged = p.leaf.clone();
        *forged.last_mut().unwrap() ^= 0x01;
        let err = verify(&[&p.root], &[&forged, &p.intermediate], &key).unwrap_err();
        assert!(matches!(err, ChainError::Untrusted { .. }), "{err}");
        // a leaf whose signed part was changed after signing: another SAN, same signature
        let mut cert = Certificate::from_der(&p.leaf).unwrap();
        let original = Certificate::from_der(&p.leaf).unwrap();
        cert.tbs_certificate.extensions = Some(leaf_extensions("https://evil.example", ISSUER));
        cert.signature = original.signature;
        let forged = cert.to_der().unwrap();
        let err = verify(&[&p.root], &[&forged, &p.intermediate], &key).unwrap_err();
        assert!(matches!(err, ChainError::Untrusted { .. }), "{err}");
        // an intermediate signed by a key other than the root's
        let impostor = TestKey::new(true);
        let intermediate = certificate(
            INTERMEDIATE,
            &p.intermediate_key.spki(),
            (ROOT, &impostor),
            (-YEAR, YEAR),
            ca_extensions(true),
        );
        let err = verify(&[&p.root], &[&p.leaf, &intermediate], &key).unwrap_err();
        assert!(matches!(err, ChainError::Untrusted { .. }), "{err}");
    }

    #[test]
    fn issuers_must_be_cas_and_leaves_code_signing_certificates() {
        let p = pki();
        let key = p.ephemeral.public_key();
        let not_ca = certificate(
            INTERMEDIATE,
            &p.intermediate_key.spki(),
            (ROOT, &p.root_key),
            (-YEAR, YEAR),
            ca_extensions(false),
        );
        let err = verify(&[&p.root], &[&p.leaf, &not_ca], &key).unwrap_err();
        assert!(matches!(err, ChainError::NotCa { .. }), "{err}");
        let no_constraints = certificate(
            INTERMEDIATE,
            &p.intermediate_key.spki(),
            (ROOT, &p.root_key),
            (-YEAR, YEAR),
            vec![],
        );
        let err = verify(&[&p.root], &[&p.leaf, &no_constraints], &key).unwrap_err();
        assert!(matches!(err, ChainError::NotCa { .. }), "{err}");
        let ca_leaf = certificate(
            "",
            &p.ephemeral.spki(),
            (INTERMEDIATE, &p.intermediate_key),
            (-5, 600),
            vec![ext(KEY_USAGE, &KeyUsage(KeyUsages::KeyCertSign.into()))],
        );
        let err = verify(&[&p.root], &[&ca_leaf, &p.intermediate], &key).unwrap_err();
        assert!(matches!(err, ChainError::NotForSigning(_)), "{err}");
    }

    #[test]
    fn roots_load_from_a_trusted_root_json_or_a_pem_bundle() {
        let p = pki();
        let key = p.ephemeral.public_key();
        let dir = tempfile::tempdir().unwrap();
        let chain = vec![p.leaf.clone(), p.intermediate.clone()];
        let pem_path = dir.path().join("fulcio.pem");
        let pem = |der: &Vec<u8>| pem::encode(&pem::Pem::new("CERTIFICATE", der.clone()));
        std::fs::write(&pem_path, pem(&p.intermediate) + &pem(&p.root)).unwrap();
        let trust = FulcioTrust::load(&pem_path).unwrap();
        assert_eq!(trust.anchors.len(), 2);
        assert!(trust.verify(&chain, &key, SystemTime::now()).is_ok());

        let trusted_root = |start: &str| {
            serde_json::json!({
                "mediaType": "application/vnd.dev.sigstore.trustedroot+json;version=0.1",
                "tlogs": [],
                "certificateAuthorities": [{
                    "subject": {"organization": "sigstore.dev", "commonName": "sigstore"},
                    "uri": "https://fulcio.sigstore.dev",
                    "certChain": {"certificates": [
                        {"rawBytes": STANDARD.encode(&p.intermediate)},
                        {"rawBytes": STANDARD.encode(&p.root)},
                    ]},
                    "validFor": {"start": start},
                }],
                "timestampAuthorities": [],
            })
            .to_string()
        };
        let json_path = dir.path().join("trusted_root.json");
        std::fs::write(&json_path, trusted_root("2021-03-07T03:20:29.000Z")).unwrap();
        let trust = FulcioTrust::load(&json_path).unwrap();
        assert!(trust.verify(&chain, &key, SystemTime::now()).is_ok());
        // a certificate authority that is not valid yet
        std::fs::write(&json_path, trusted_root("2999-01-01T00:00:00Z")).unwrap();
        let err = FulcioTrust::load(&json_path)
            .unwrap()
            .verify(&chain, &key, SystemTime::now())
            .unwrap_err();
        assert!(matches!(err, ChainError::RootOutsideWindow { .. }), "{err}");

        std::fs::write(&json_path, r#"{"certificateAuthorities": []}"#).unwrap();
        assert!(matches!(
            FulcioTrust::load(&json_path),
            Err(TrustRootError::Empty(_))
        ));
        std::fs::write(&json_path, "{ not json").unwrap();
        assert!(matches!(
            FulcioTrust::load(&json_path),
            Err(TrustRootError::Malformed { .. })
        ));
        assert!(matches!(
            FulcioTrust::load(&dir.path().join("missing.pem")),
            Err(TrustRootError::Read { .. })
        ));
    }
}
