//! The two signature formats that make a scanner release trusted, and how one is checked.
//!
//! - cosign "simple signing" (`specs/SIGNATURE_SPEC.md` of sigstore/cosign): a layer of
//!   media type [`SIMPLE_SIGNING_MEDIA_TYPE`] whose blob is the signed JSON payload and whose
//!   [`COSIGN_SIGNATURE_ANNOTATION`] holds the base64 signature over those exact bytes.
//! - a DSSE envelope (`specs/ATTESTATION_SPEC.md`): a layer of media type
//!   [`DSSE_MEDIA_TYPE`] holding an envelope whose payload is an in-toto Statement.
//!
//! Both are detached signatures: what binds them to an image is the digest *inside* the
//! signed payload, never where the registry happens to store them. So a signature is only
//! counted when a trusted key verifies it **and** its payload names the requested digest.

use std::cell::Cell;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use base64::Engine as _;
use serde::de::{DeserializeSeed, Error as _, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};
use signer_actors::dsse::{Envelope, VerifyError};
use signer_actors::keys::PublicKey;
use signer_actors::statement::{INTOTO_PAYLOAD_TYPE, STATEMENT_V1};

/// Layer media type of a cosign simple-signing payload.
pub const SIMPLE_SIGNING_MEDIA_TYPE: &str = "application/vnd.dev.cosign.simplesigning.v1+json";
/// Layer annotation carrying the base64 signature of a simple-signing payload.
pub const COSIGN_SIGNATURE_ANNOTATION: &str = "dev.cosignproject.cosign/signature";
/// `critical.type` of a cosign image signature.
pub const COSIGN_SIGNATURE_TYPE: &str = "cosign container image signature";
/// Layer media type (and referrer artifactType) of a DSSE envelope.
pub const DSSE_MEDIA_TYPE: &str = "application/vnd.dsse.envelope.v1+json";
/// The in-toto Statement version cosign still writes; accepted alongside v1.
pub const STATEMENT_V01: &str = "https://in-toto.io/Statement/v0.1";
/// Referrer artifactType and layer media type of a Sigstore bundle v0.3, as cosign 3
/// attaches it (cosign `specs/BUNDLE_SPEC.md`): the manifest's single layer is the bundle.
pub const BUNDLE_V03_MEDIA_TYPE: &str = "application/vnd.dev.sigstore.bundle.v0.3+json";
/// The older spelling of the same media type, still accepted by Sigstore clients.
pub const BUNDLE_V03_MEDIA_TYPE_ALT: &str = "application/vnd.dev.sigstore.bundle+json;version=0.3";
/// `messageDigest.algorithm` of a message signature over SHA-256.
const SHA2_256: &str = "SHA2_256";

/// A cosign simple-signing payload
/// (containers/image `containers-signature.5`, with cosign's `critical.type`).
///
/// Fields are declared in the order cosign writes them. Unknown or duplicate fields in
/// `critical` are refused: what is checked must be exactly what was signed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SimpleSigning {
    pub critical: Critical,
    /// Free-form claims; cosign writes `null` when there are none.
    pub optional: Option<serde_json::Value>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Critical {
    pub identity: Identity,
    pub image: Image,
    #[serde(rename = "type")]
    pub type_: String,
}

/// Ignored when verifying, as cosign's spec says: a name is mutable, the digest is not.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Identity {
    #[serde(rename = "docker-reference")]
    pub docker_reference: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Image {
    #[serde(rename = "docker-manifest-digest")]
    pub docker_manifest_digest: String,
}

impl SimpleSigning {
    /// The payload cosign signs for `repository@digest`.
    pub fn for_image(repository: &str, digest: &str) -> Self {
        SimpleSigning {
            critical: Critical {
                identity: Identity {
                    docker_reference: repository.to_string(),
                },
                image: Image {
                    docker_manifest_digest: digest.to_string(),
                },
                type_: COSIGN_SIGNATURE_TYPE.to_string(),
            },
            optional: None,
        }
    }
}

/// Set once the caller of a provenance check has given up (its call timed out): checks
/// ask it between signatures and stop, so abandoned work does not keep a CPU busy.
#[derive(Debug, Clone, Default)]
pub struct Cancel(Arc<AtomicBool>);

impl Cancel {
    /// Tells every check holding a clone to stop.
    pub fn cancel(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }

    /// A guard that cancels when dropped: held by the async side of a check, so dropping
    /// that future (a timeout) stops the blocking side too.
    pub fn on_drop(&self) -> CancelOnDrop {
        CancelOnDrop(self.clone())
    }
}

/// See [`Cancel::on_drop`].
#[derive(Debug)]
pub struct CancelOnDrop(Cancel);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

/// What checking one signature blob may cost.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Signatures a DSSE envelope may carry. More is refused before any is checked: each
    /// check hashes the whole PAE again, so 25,000 signatures over a large payload would
    /// cost seconds of CPU.
    pub max_signatures: usize,
    /// Stops a check that nobody waits for any more.
    pub cancel: Cancel,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_signatures: DEFAULT_MAX_ENVELOPE_SIGNATURES,
            cancel: Cancel::default(),
        }
    }
}

/// Signatures per envelope by default: a release is signed by one or two keys; a few more
/// leaves room for key rotation.
pub const DEFAULT_MAX_ENVELOPE_SIGNATURES: usize = 8;

/// The verdict on one signature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    /// A trusted key (this keyid) signed the requested digest.
    Verified { keyid: String },
    /// No trusted key verifies the signature.
    UntrustedKey,
    /// A trusted key signed it, but for other image digests (listed).
    OtherDigest(Vec<String>),
    /// Not a signature of a format we read.
    Malformed(String),
    /// A keyless Sigstore bundle (a Fulcio certificate as verification material): not
    /// trusted, the gate trusts release keys only.
    Keyless,
    /// Stopped unfinished because [`Limits::cancel`] was set: no verdict.
    Cancelled,
}

/// Checks a cosign simple-signing layer: `payload` is the blob, `signature_b64` its
/// annotation, `digest` the requested `sha256:<hex>`.
///
/// The signature is checked first, over the raw blob bytes, so that nothing an untrusted
/// party wrote is parsed before it is known to come from a trusted key.
pub fn check_simple_signing(
    payload: &[u8],
    signature_b64: Option<&str>,
    keys: &[PublicKey],
    digest: &str,
) -> Check {
    let Some(signature_b64) = signature_b64 else {
        return Check::Malformed(format!(
            "simple-signing layer without a {COSIGN_SIGNATURE_ANNOTATION} annotation"
        ));
    };
    let Ok(sig) = base64::engine::general_purpose::STANDARD.decode(signature_b64.trim()) else {
        return Check::Malformed("cosign signature annotation is not base64".into());
    };
    let Some(key) = keys.iter().find(|k| k.verify(payload, &sig)) else {
        return Check::UntrustedKey;
    };
    let parsed: SimpleSigning = match serde_json::from_slice(payload) {
        Ok(p) => p,
        Err(e) => {
            return Check::Malformed(format!("simple-signing payload is not valid: {e}"));
        }
    };
    if parsed.critical.type_ != COSIGN_SIGNATURE_TYPE {
        return Check::Malformed(format!(
            "simple-signing payload type is {:?}, not {COSIGN_SIGNATURE_TYPE:?}",
            parsed.critical.type_
        ));
    }
    if parsed.critical.image.docker_manifest_digest != digest {
        return Check::OtherDigest(vec![parsed.critical.image.docker_manifest_digest]);
    }
    Check::Verified { keyid: key.keyid() }
}

/// The parts of an in-toto Statement (v0.1 or v1) the gate reads. Looser than
/// [`signer_actors::statement::Statement`], which only admits what the signer itself signs:
/// release attestations may come from other tools (cosign writes v0.1).
#[derive(Debug, Deserialize)]
struct LooseStatement {
    #[serde(rename = "_type")]
    type_: String,
    subject: Vec<LooseSubject>,
    #[serde(rename = "predicateType")]
    predicate_type: String,
}

#[derive(Debug, Deserialize)]
struct LooseSubject {
    #[serde(default)]
    digest: std::collections::BTreeMap<String, String>,
}

/// Checks a DSSE layer: the envelope must verify (PAE) under a trusted key, carry an
/// in-toto Statement, and one of the Statement's subjects must have `sha256` = `digest_hex`.
///
/// The signatures are counted first, without keeping them, stopping at the first one past
/// [`Limits::max_signatures`]: an envelope with more is refused before it is even parsed
/// whole, let alone hashed or verified.
pub fn check_dsse(
    envelope_json: &[u8],
    keys: &[PublicKey],
    digest_hex: &str,
    limits: &Limits,
) -> Check {
    match count_signatures(envelope_json, limits.max_signatures) {
        Ok(_) => {}
        Err(SignatureCountError::TooMany) => return too_many_signatures(limits),
        Err(SignatureCountError::Json(e)) => {
            return Check::Malformed(format!("not a DSSE envelope: {e}"));
        }
    }
    let envelope: Envelope = match serde_json::from_slice(envelope_json) {
        Ok(e) => e,
        Err(e) => return Check::Malformed(format!("not a DSSE envelope: {e}")),
    };
    check_envelope(&envelope, keys, digest_hex, limits)
}

fn too_many_signatures(limits: &Limits) -> Check {
    Check::Malformed(format!(
        "DSSE envelope has more than {} signatures ([gates.provenance] max_envelope_signatures); refused unchecked",
        limits.max_signatures
    ))
}

/// Why [`count_signatures`] gave no count.
#[derive(Debug)]
pub enum SignatureCountError {
    /// More than the limit: counting stopped there.
    TooMany,
    /// Not a JSON object with a `signatures` array.
    Json(serde_json::Error),
}

/// Counts the entries of the envelope's `signatures` array without building them, and
/// stops reading at the first one past `max` (the rest of the document is not looked at).
pub fn count_signatures(envelope_json: &[u8], max: usize) -> Result<usize, SignatureCountError> {
    let over = Cell::new(false);
    let mut de = serde_json::Deserializer::from_slice(envelope_json);
    match (EnvelopeHead { max, over: &over }).deserialize(&mut de) {
        Ok(n) => Ok(n),
        Err(_) if over.get() => Err(SignatureCountError::TooMany),
        Err(e) => Err(SignatureCountError::Json(e)),
    }
}

/// The top level of an envelope, read only for its `signatures` (see [`count_signatures`]).
struct EnvelopeHead<'a> {
    max: usize,
    over: &'a Cell<bool>,
}

impl<'de> DeserializeSeed<'de> for EnvelopeHead<'_> {
    type Value = usize;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<usize, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for EnvelopeHead<'_> {
    type Value = usize;
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a DSSE envelope object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<usize, A::Error> {
        let mut count = 0;
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            if key == "signatures" {
                count = map.next_value_seed(SignatureList {
                    max: self.max,
                    over: self.over,
                })?;
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(count)
    }
}

/// The `signatures` array, counted (see [`count_signatures`]).
struct SignatureList<'a> {
    max: usize,
    over: &'a Cell<bool>,
}

impl<'de> DeserializeSeed<'de> for SignatureList<'_> {
    type Value = usize;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<usize, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for SignatureList<'_> {
    type Value = usize;
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("an array of signatures")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<usize, A::Error> {
        let mut count = 0usize;
        while seq.next_element::<IgnoredAny>()?.is_some() {
            count += 1;
            if count > self.max {
                self.over.set(true);
                return Err(A::Error::custom("too many signatures"));
            }
        }
        Ok(count)
    }
}

/// [`check_dsse`] on a parsed envelope (a DSSE layer, or the `dsseEnvelope` of a bundle).
fn check_envelope(
    envelope: &Envelope,
    keys: &[PublicKey],
    digest_hex: &str,
    limits: &Limits,
) -> Check {
    if keys.is_empty() {
        return Check::UntrustedKey;
    }
    if envelope.signatures.len() > limits.max_signatures {
        return too_many_signatures(limits);
    }
    let verified = match envelope.verify_until(keys, 1, || limits.cancel.is_cancelled()) {
        Ok(v) => v,
        Err(VerifyError::ThresholdNotMet { .. }) => return Check::UntrustedKey,
        Err(VerifyError::Cancelled) => return Check::Cancelled,
        Err(e) => return Check::Malformed(format!("DSSE envelope: {e}")),
    };
    let keyid = verified
        .first()
        .and_then(|v| keys.get(v.key_index))
        .map(PublicKey::keyid)
        .unwrap_or_default();
    if envelope.payload_type != INTOTO_PAYLOAD_TYPE {
        return Check::Malformed(format!(
            "DSSE payloadType is {:?}, not {INTOTO_PAYLOAD_TYPE}",
            envelope.payload_type
        ));
    }
    let statement: LooseStatement = match serde_json::from_slice(&envelope.payload) {
        Ok(s) => s,
        Err(e) => {
            return Check::Malformed(format!("DSSE payload is not an in-toto Statement: {e}"));
        }
    };
    if statement.type_ != STATEMENT_V1 && statement.type_ != STATEMENT_V01 {
        return Check::Malformed(format!(
            "unknown in-toto Statement _type {:?}",
            statement.type_
        ));
    }
    if statement.predicate_type.is_empty() {
        return Check::Malformed("in-toto Statement without predicateType".into());
    }
    let subjects: Vec<&str> = statement
        .subject
        .iter()
        .filter_map(|s| s.digest.get("sha256").map(String::as_str))
        .collect();
    if subjects.iter().any(|d| d.eq_ignore_ascii_case(digest_hex)) {
        return Check::Verified { keyid };
    }
    Check::OtherDigest(subjects.iter().map(|d| format!("sha256:{d}")).collect())
}

/// A Sigstore bundle v0.3 as the gate reads it: what signed it, and what is signed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SigstoreBundle {
    pub material: BundleMaterial,
    pub content: BundleContent,
}

/// `verificationMaterial` of a bundle, as far as the gate cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BundleMaterial {
    /// `publicKey` (a hint only): signed with a key, checked against the trusted keys.
    PublicKey,
    /// `certificate` or `x509CertificateChain`: keyless (Fulcio), not trusted by the gate.
    Certificate,
}

/// The signed content of a bundle: exactly one of the two.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BundleContent {
    /// A DSSE envelope (cosign 3 `sign` and `attest` write an in-toto Statement in one).
    Dsse(Envelope),
    /// A signature over an artifact, with the artifact's SHA-256 (`messageDigest`).
    MessageSignature { sha256: Vec<u8>, signature: Vec<u8> },
}

/// The bundle JSON (protobuf JSON mapping: camelCase, bytes as standard base64). Fields
/// the gate does not use (tlogEntries, timestampVerificationData) are not read.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawBundle {
    media_type: String,
    verification_material: RawMaterial,
    dsse_envelope: Option<Envelope>,
    message_signature: Option<RawMessageSignature>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawMaterial {
    public_key: Option<serde_json::Value>,
    certificate: Option<serde_json::Value>,
    x509_certificate_chain: Option<serde_json::Value>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawMessageSignature {
    message_digest: RawMessageDigest,
    #[serde(with = "signer_actors::b64")]
    signature: Vec<u8>,
}

#[derive(Debug, Deserialize)]
struct RawMessageDigest {
    algorithm: String,
    #[serde(with = "signer_actors::b64")]
    digest: Vec<u8>,
}

/// Reads a Sigstore bundle v0.3 blob. Refuses, before any signature is checked, a bundle
/// with both or neither of `dsseEnvelope` / `messageSignature`, no verification material,
/// or a DSSE envelope with other than one signature (a bundle carries exactly one).
pub fn parse_bundle(bytes: &[u8]) -> Result<SigstoreBundle, String> {
    let raw: RawBundle =
        serde_json::from_slice(bytes).map_err(|e| format!("not a Sigstore bundle: {e}"))?;
    if raw.media_type != BUNDLE_V03_MEDIA_TYPE && raw.media_type != BUNDLE_V03_MEDIA_TYPE_ALT {
        return Err(format!(
            "bundle mediaType is {:?}, not {BUNDLE_V03_MEDIA_TYPE}",
            raw.media_type
        ));
    }
    let m = raw.verification_material;
    let material = match (m.public_key, m.certificate.or(m.x509_certificate_chain)) {
        (Some(_), None) => BundleMaterial::PublicKey,
        (None, Some(_)) => BundleMaterial::Certificate,
        (Some(_), Some(_)) => {
            return Err("bundle has both a public key and a certificate".into());
        }
        (None, None) => return Err("bundle has no verification material".into()),
    };
    let content = match (raw.dsse_envelope, raw.message_signature) {
        (Some(envelope), None) => {
            if envelope.signatures.len() != 1 {
                return Err(format!(
                    "bundle DSSE envelope has {} signatures; a bundle carries exactly one",
                    envelope.signatures.len()
                ));
            }
            BundleContent::Dsse(envelope)
        }
        (None, Some(ms)) => {
            if ms.message_digest.algorithm != SHA2_256 {
                return Err(format!(
                    "bundle messageDigest algorithm {:?} is not {SHA2_256}",
                    ms.message_digest.algorithm
                ));
            }
            BundleContent::MessageSignature {
                sha256: ms.message_digest.digest,
                signature: ms.signature,
            }
        }
        (Some(_), Some(_)) => {
            return Err("bundle has both a dsseEnvelope and a messageSignature".into());
        }
        (None, None) => {
            return Err("bundle has neither a dsseEnvelope nor a messageSignature".into());
        }
    };
    Ok(SigstoreBundle { material, content })
}

/// What the gate still needs to finish checking a bundle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BundleCheck {
    /// The verdict.
    Done(Check),
    /// A message signature over the requested digest: the verdict needs the signed message,
    /// the image manifest (see [`check_message_signature`]).
    NeedsManifest { signature: Vec<u8> },
}

/// Checks a bundle against the trusted `keys` and the requested `digest_hex`. A DSSE
/// envelope is checked as a DSSE layer is; a message signature's `messageDigest` must be
/// the image digest (else [`Check::OtherDigest`] without fetching anything more).
pub fn check_bundle(
    bundle: &SigstoreBundle,
    keys: &[PublicKey],
    digest_hex: &str,
    limits: &Limits,
) -> BundleCheck {
    if bundle.material == BundleMaterial::Certificate {
        return BundleCheck::Done(Check::Keyless);
    }
    match &bundle.content {
        BundleContent::Dsse(envelope) => {
            BundleCheck::Done(check_envelope(envelope, keys, digest_hex, limits))
        }
        BundleContent::MessageSignature { sha256, signature } => {
            if hex::encode(sha256) != digest_hex.to_ascii_lowercase() {
                return BundleCheck::Done(Check::OtherDigest(vec![format!(
                    "sha256:{}",
                    hex::encode(sha256)
                )]));
            }
            BundleCheck::NeedsManifest {
                signature: signature.clone(),
            }
        }
    }
}

/// Finishes a message-signature bundle: `manifest` must be the image manifest (its SHA-256
/// is the requested digest, checked here again) and the signature must verify over it with
/// a trusted key (ECDSA P-256 hashes it with SHA-256, which is the digest signed).
pub fn check_message_signature(
    manifest: &[u8],
    signature: &[u8],
    keys: &[PublicKey],
    digest_hex: &str,
) -> Check {
    use sha2::Digest as _;
    let actual = hex::encode(sha2::Sha256::digest(manifest));
    if actual != digest_hex.to_ascii_lowercase() {
        return Check::Malformed(format!(
            "the registry served an image manifest with digest sha256:{actual}"
        ));
    }
    match keys.iter().find(|k| k.verify(manifest, signature)) {
        Some(key) => Check::Verified { keyid: key.keyid() },
        None => Check::UntrustedKey,
    }
}

#[cfg(test)]
mod tests {
    use ring::rand::SystemRandom;
    use ring::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, Ed25519KeyPair, KeyPair};
    use signer_actors::dsse::{Signature, pae};
    use signer_actors::keys::KeyAlgorithm;

    use sha2::Digest as _;

    use super::*;

    type SignFn = Box<dyn Fn(&[u8]) -> Vec<u8>>;

    struct TestKey {
        sign: SignFn,
        public: PublicKey,
    }

    fn ecdsa() -> TestKey {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng).unwrap();
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8.as_ref(), &rng)
            .unwrap();
        let public =
            PublicKey::from_raw(KeyAlgorithm::EcdsaP256Sha256, pair.public_key().as_ref()).unwrap();
        TestKey {
            sign: Box::new(move |m| pair.sign(&rng, m).unwrap().as_ref().to_vec()),
            public,
        }
    }

    fn ed25519() -> TestKey {
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).unwrap();
        let pair = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
        let public =
            PublicKey::from_raw(KeyAlgorithm::Ed25519, pair.public_key().as_ref()).unwrap();
        TestKey {
            sign: Box::new(move |m| pair.sign(m).as_ref().to_vec()),
            public,
        }
    }

    fn digest(c: char) -> String {
        format!("sha256:{}", c.to_string().repeat(64))
    }

    fn b64(bytes: &[u8]) -> String {
        base64::engine::general_purpose::STANDARD.encode(bytes)
    }

    #[test]
    fn simple_signing_payload_matches_cosign_layout() {
        let json =
            serde_json::to_string(&SimpleSigning::for_image("r.example/s", &digest('a'))).unwrap();
        assert_eq!(
            json,
            format!(
                r#"{{"critical":{{"identity":{{"docker-reference":"r.example/s"}},"image":{{"docker-manifest-digest":"{}"}},"type":"cosign container image signature"}},"optional":null}}"#,
                digest('a')
            )
        );
    }

    #[test]
    fn simple_signing_verdicts() {
        let (trusted, other) = (ecdsa(), ed25519());
        let keys = [trusted.public.clone()];
        let payload =
            serde_json::to_vec(&SimpleSigning::for_image("r.example/s", &digest('a'))).unwrap();
        let sig = b64(&(trusted.sign)(&payload));
        assert_eq!(
            check_simple_signing(&payload, Some(&sig), &keys, &digest('a')),
            Check::Verified {
                keyid: trusted.public.keyid()
            }
        );
        assert_eq!(
            check_simple_signing(&payload, Some(&sig), &keys, &digest('b')),
            Check::OtherDigest(vec![digest('a')])
        );
        let foreign = b64(&(other.sign)(&payload));
        assert_eq!(
            check_simple_signing(&payload, Some(&foreign), &keys, &digest('a')),
            Check::UntrustedKey
        );
        // One changed byte of the payload and the signature no longer holds.
        let mut tampered = payload.clone();
        tampered[10] ^= 1;
        assert_eq!(
            check_simple_signing(&tampered, Some(&sig), &keys, &digest('a')),
            Check::UntrustedKey
        );
        assert!(matches!(
            check_simple_signing(&payload, None, &keys, &digest('a')),
            Check::Malformed(_)
        ));
        assert!(matches!(
            check_simple_signing(&payload, Some("not base64!"), &keys, &digest('a')),
            Check::Malformed(_)
        ));
        // Signed by a trusted key but not a cosign image signature.
        let mut wrong_type = SimpleSigning::for_image("r.example/s", &digest('a'));
        wrong_type.critical.type_ = "atomic container signature".into();
        let wrong_type = serde_json::to_vec(&wrong_type).unwrap();
        let sig = b64(&(trusted.sign)(&wrong_type));
        assert!(matches!(
            check_simple_signing(&wrong_type, Some(&sig), &keys, &digest('a')),
            Check::Malformed(_)
        ));
        // A second, case-shifted digest key must not smuggle in another digest.
        let sneaky = format!(
            r#"{{"critical":{{"identity":{{"docker-reference":"r"}},"image":{{"docker-manifest-digest":"{}","Docker-manifest-digest":"{}"}},"type":"{COSIGN_SIGNATURE_TYPE}"}},"optional":null}}"#,
            digest('b'),
            digest('a')
        );
        let sig = b64(&(trusted.sign)(sneaky.as_bytes()));
        assert!(matches!(
            check_simple_signing(sneaky.as_bytes(), Some(&sig), &keys, &digest('a')),
            Check::Malformed(_)
        ));
    }

    fn envelope(key: &TestKey, payload_type: &str, statement: &serde_json::Value) -> Vec<u8> {
        let payload = serde_json::to_vec(statement).unwrap();
        let sig = (key.sign)(&pae(payload_type, &payload));
        serde_json::to_vec(&Envelope {
            payload,
            payload_type: payload_type.into(),
            signatures: vec![Signature {
                keyid: key.public.keyid(),
                sig,
            }],
        })
        .unwrap()
    }

    fn statement(type_: &str, hexes: &[char]) -> serde_json::Value {
        serde_json::json!({
            "_type": type_,
            "subject": hexes.iter().map(|c| serde_json::json!({
                "name": "r.example/s", "digest": {"sha256": c.to_string().repeat(64)}
            })).collect::<Vec<_>>(),
            "predicateType": "https://slsa.dev/provenance/v1",
            "predicate": {}
        })
    }

    #[test]
    fn dsse_verdicts() {
        let (trusted, other) = (ed25519(), ecdsa());
        let keys = [other.public.clone(), trusted.public.clone()];
        let hex_a = "a".repeat(64);
        for type_ in [STATEMENT_V1, STATEMENT_V01] {
            let env = envelope(
                &trusted,
                INTOTO_PAYLOAD_TYPE,
                &statement(type_, &['b', 'a']),
            );
            assert_eq!(
                check_dsse(&env, &keys, &hex_a, &Limits::default()),
                Check::Verified {
                    keyid: trusted.public.keyid()
                }
            );
        }
        let env = envelope(
            &trusted,
            INTOTO_PAYLOAD_TYPE,
            &statement(STATEMENT_V1, &['b']),
        );
        assert_eq!(
            check_dsse(&env, &keys, &hex_a, &Limits::default()),
            Check::OtherDigest(vec![digest('b')])
        );
        let env = envelope(
            &trusted,
            INTOTO_PAYLOAD_TYPE,
            &statement(STATEMENT_V1, &['a']),
        );
        assert_eq!(
            check_dsse(
                &env,
                std::slice::from_ref(&other.public),
                &hex_a,
                &Limits::default()
            ),
            Check::UntrustedKey
        );
        assert_eq!(
            check_dsse(&env, &[], &hex_a, &Limits::default()),
            Check::UntrustedKey
        );
        let env = envelope(&trusted, "text/plain", &statement(STATEMENT_V1, &['a']));
        assert!(matches!(
            check_dsse(&env, &keys, &hex_a, &Limits::default()),
            Check::Malformed(_)
        ));
        let env = envelope(
            &trusted,
            INTOTO_PAYLOAD_TYPE,
            &statement("https://x", &['a']),
        );
        assert!(matches!(
            check_dsse(&env, &keys, &hex_a, &Limits::default()),
            Check::Malformed(_)
        ));
        assert!(matches!(
            check_dsse(b"{}", &keys, &hex_a, &Limits::default()),
            Check::Malformed(_)
        ));
        let unsigned = serde_json::to_vec(&Envelope {
            payload: b"{}".to_vec(),
            payload_type: INTOTO_PAYLOAD_TYPE.into(),
            signatures: vec![],
        })
        .unwrap();
        assert!(matches!(
            check_dsse(&unsigned, &keys, &hex_a, &Limits::default()),
            Check::Malformed(_)
        ));
    }

    /// `n` empty signatures after one good one, as a hostile registry serves them.
    fn crowded_envelope(key: &TestKey, n: usize) -> Vec<u8> {
        let payload = serde_json::to_vec(&statement(STATEMENT_V1, &['a'])).unwrap();
        let sig = (key.sign)(&pae(INTOTO_PAYLOAD_TYPE, &payload));
        let mut signatures = vec![Signature {
            keyid: key.public.keyid(),
            sig,
        }];
        signatures.extend((0..n).map(|_| Signature {
            keyid: String::new(),
            sig: Vec::new(),
        }));
        serde_json::to_vec(&Envelope {
            payload,
            payload_type: INTOTO_PAYLOAD_TYPE.into(),
            signatures,
        })
        .unwrap()
    }

    #[test]
    fn envelopes_with_too_many_signatures_are_refused_unchecked() {
        let trusted = ecdsa();
        let keys = [trusted.public.clone()];
        let hex_a = "a".repeat(64);
        let limits = Limits::default();
        // At the limit: checked, and the good signature counts.
        let ok = crowded_envelope(&trusted, DEFAULT_MAX_ENVELOPE_SIGNATURES - 1);
        assert_eq!(
            check_dsse(&ok, &keys, &hex_a, &limits),
            Check::Verified {
                keyid: trusted.public.keyid()
            }
        );
        // One more, or 25,000 more: refused, quickly, although the first would verify.
        for extra in [DEFAULT_MAX_ENVELOPE_SIGNATURES, 25_000] {
            let env = crowded_envelope(&trusted, extra);
            let started = std::time::Instant::now();
            let Check::Malformed(m) = check_dsse(&env, &keys, &hex_a, &limits) else {
                panic!("{extra} extra signatures were not refused");
            };
            assert!(m.contains("more than 8 signatures"), "{m}");
            assert!(
                started.elapsed() < std::time::Duration::from_millis(500),
                "{:?}",
                started.elapsed()
            );
        }
        // The limit is configurable.
        let one = Limits {
            max_signatures: 1,
            ..Limits::default()
        };
        assert!(matches!(
            check_dsse(&crowded_envelope(&trusted, 1), &keys, &hex_a, &one),
            Check::Malformed(_)
        ));
    }

    #[test]
    fn signature_count_stops_reading_at_the_limit() {
        // Nine signatures, then bytes that are not JSON at all: counting never reaches them.
        let mut doc = br#"{"payloadType":"x","signatures":["#.to_vec();
        doc.extend(std::iter::repeat_n(&b"{\"sig\":\"\"},"[..], 9).flatten());
        doc.extend(b"\xff\xff not json");
        assert!(matches!(
            count_signatures(&doc, 8),
            Err(SignatureCountError::TooMany)
        ));
        assert!(matches!(
            count_signatures(&doc, 9),
            Err(SignatureCountError::Json(_))
        ));
        assert_eq!(
            count_signatures(br#"{"payload":"","signatures":[{},{}],"x":[1,2]}"#, 8).unwrap(),
            2
        );
        assert!(matches!(
            count_signatures(b"[1]", 8),
            Err(SignatureCountError::Json(_))
        ));
    }

    #[test]
    fn verification_asks_before_each_signature_and_stops_when_told() {
        let (trusted, other) = (ecdsa(), ecdsa());
        let env: Envelope = serde_json::from_slice(&crowded_envelope(&other, 5)).unwrap();
        let keys = [trusted.public.clone()];
        // Not cancelled: every signature is asked about once (none verifies).
        let asked = Cell::new(0);
        let r = env.verify_until(&keys, 1, || {
            asked.set(asked.get() + 1);
            false
        });
        assert!(
            matches!(r, Err(VerifyError::ThresholdNotMet { .. })),
            "{r:?}"
        );
        assert_eq!(asked.get(), 6);
        // Cancelled after the second signature: the third is never checked.
        let asked = Cell::new(0);
        let r = env.verify_until(&keys, 1, || {
            asked.set(asked.get() + 1);
            asked.get() > 2
        });
        assert!(matches!(r, Err(VerifyError::Cancelled)), "{r:?}");
        assert_eq!(asked.get(), 3);
    }

    #[test]
    fn a_cancelled_check_stops_between_signatures() {
        let trusted = ecdsa();
        let keys = [trusted.public.clone()];
        let hex_a = "a".repeat(64);
        let limits = Limits::default();
        limits.cancel.cancel();
        let env = crowded_envelope(&trusted, 3);
        assert_eq!(check_dsse(&env, &keys, &hex_a, &limits), Check::Cancelled);
        // A guard cancels when it is dropped (the async side of a check went away).
        let limits = Limits::default();
        drop(limits.cancel.on_drop());
        assert!(limits.cancel.is_cancelled());
        assert_eq!(check_dsse(&env, &keys, &hex_a, &limits), Check::Cancelled);
    }

    fn bundle_json(material: serde_json::Value, content: (&str, serde_json::Value)) -> Vec<u8> {
        let mut b = serde_json::json!({
            "mediaType": BUNDLE_V03_MEDIA_TYPE,
            "verificationMaterial": material,
        });
        b[content.0] = content.1;
        serde_json::to_vec(&b).unwrap()
    }

    fn key_material() -> serde_json::Value {
        serde_json::json!({"publicKey": {"hint": "x"}, "tlogEntries": []})
    }

    fn dsse_content(env: &[u8]) -> (&'static str, serde_json::Value) {
        ("dsseEnvelope", serde_json::from_slice(env).unwrap())
    }

    #[test]
    fn bundles_with_a_dsse_envelope() {
        let (trusted, other) = (ecdsa(), ed25519());
        let keys = [trusted.public.clone()];
        let hex_a = "a".repeat(64);
        let env = envelope(
            &trusted,
            INTOTO_PAYLOAD_TYPE,
            &statement(STATEMENT_V1, &['a']),
        );
        let bundle = parse_bundle(&bundle_json(key_material(), dsse_content(&env))).unwrap();
        assert_eq!(bundle.material, BundleMaterial::PublicKey);
        assert_eq!(
            check_bundle(&bundle, &keys, &hex_a, &Limits::default()),
            BundleCheck::Done(Check::Verified {
                keyid: trusted.public.keyid()
            })
        );
        assert_eq!(
            check_bundle(&bundle, &keys, &"b".repeat(64), &Limits::default()),
            BundleCheck::Done(Check::OtherDigest(vec![digest('a')]))
        );
        let foreign = envelope(
            &other,
            INTOTO_PAYLOAD_TYPE,
            &statement(STATEMENT_V1, &['a']),
        );
        let bundle = parse_bundle(&bundle_json(key_material(), dsse_content(&foreign))).unwrap();
        assert_eq!(
            check_bundle(&bundle, &keys, &hex_a, &Limits::default()),
            BundleCheck::Done(Check::UntrustedKey)
        );
        // Keyless: refused whatever it holds, even a signature a trusted key made.
        for material in [
            serde_json::json!({"certificate": {"rawBytes": "MIIB"}, "tlogEntries": []}),
            serde_json::json!({"x509CertificateChain": {"certificates": [{"rawBytes": "MIIB"}]}}),
        ] {
            let bundle = parse_bundle(&bundle_json(material, dsse_content(&env))).unwrap();
            assert_eq!(bundle.material, BundleMaterial::Certificate);
            assert_eq!(
                check_bundle(&bundle, &keys, &hex_a, &Limits::default()),
                BundleCheck::Done(Check::Keyless)
            );
        }
    }

    #[test]
    fn bundles_that_are_not_one_signature_are_refused() {
        let trusted = ecdsa();
        let env = envelope(
            &trusted,
            INTOTO_PAYLOAD_TYPE,
            &statement(STATEMENT_V1, &['a']),
        );
        let mut two: serde_json::Value = serde_json::from_slice(&env).unwrap();
        let first = two["signatures"][0].clone();
        two["signatures"] = serde_json::json!([first.clone(), first]);
        let err = parse_bundle(&bundle_json(key_material(), ("dsseEnvelope", two))).unwrap_err();
        assert!(err.contains("2 signatures"), "{err}");

        let ms = serde_json::json!({"messageDigest": {"algorithm": "SHA2_256", "digest": b64(&[0xaa; 32])}, "signature": b64(b"sig")});
        let mut both: serde_json::Value =
            serde_json::from_slice(&bundle_json(key_material(), dsse_content(&env))).unwrap();
        both["messageSignature"] = ms.clone();
        let err = parse_bundle(&serde_json::to_vec(&both).unwrap()).unwrap_err();
        assert!(err.contains("both"), "{err}");
        let neither = serde_json::to_vec(&serde_json::json!({
            "mediaType": BUNDLE_V03_MEDIA_TYPE, "verificationMaterial": key_material()
        }))
        .unwrap();
        assert!(parse_bundle(&neither).unwrap_err().contains("neither"));
        let err =
            parse_bundle(&bundle_json(serde_json::json!({}), dsse_content(&env))).unwrap_err();
        assert!(err.contains("no verification material"), "{err}");
        let mut v01: serde_json::Value =
            serde_json::from_slice(&bundle_json(key_material(), dsse_content(&env))).unwrap();
        v01["mediaType"] = "application/vnd.dev.sigstore.bundle+json;version=0.1".into();
        assert!(parse_bundle(&serde_json::to_vec(&v01).unwrap()).is_err());
        let mut sha512 = ms;
        sha512["messageDigest"]["algorithm"] = "SHA2_512".into();
        let err =
            parse_bundle(&bundle_json(key_material(), ("messageSignature", sha512))).unwrap_err();
        assert!(err.contains("SHA2_512"), "{err}");
        assert!(parse_bundle(b"[]").is_err());
    }

    #[test]
    fn bundles_with_a_message_signature() {
        let (trusted, other) = (ed25519(), ecdsa());
        let keys = [other.public.clone(), trusted.public.clone()];
        let manifest = br#"{"schemaVersion":2}"#;
        let hex_m = hex::encode(sha2::Sha256::digest(manifest));
        let sig = (trusted.sign)(manifest);
        let content = |digest: &[u8]| {
            (
                "messageSignature",
                serde_json::json!({"messageDigest": {"algorithm": "SHA2_256", "digest": b64(digest)}, "signature": b64(&sig)}),
            )
        };
        let bundle = parse_bundle(&bundle_json(
            key_material(),
            content(&sha2::Sha256::digest(manifest)),
        ))
        .unwrap();
        let BundleCheck::NeedsManifest { signature } =
            check_bundle(&bundle, &keys, &hex_m, &Limits::default())
        else {
            panic!("a message signature over the digest needs the manifest");
        };
        assert_eq!(
            check_message_signature(manifest, &signature, &keys, &hex_m),
            Check::Verified {
                keyid: trusted.public.keyid()
            }
        );
        assert_eq!(
            check_message_signature(manifest, &signature, &keys[..1], &hex_m),
            Check::UntrustedKey
        );
        // A manifest that is not the digest's is refused before any signature check.
        assert!(matches!(
            check_message_signature(b"{}", &signature, &keys, &hex_m),
            Check::Malformed(_)
        ));
        // A message digest of another image: no manifest is needed to refuse it.
        let bundle = parse_bundle(&bundle_json(key_material(), content(&[0xbb; 32]))).unwrap();
        assert_eq!(
            check_bundle(&bundle, &keys, &hex_m, &Limits::default()),
            BundleCheck::Done(Check::OtherDigest(vec![digest('b')]))
        );
    }
}
