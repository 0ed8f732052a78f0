//! Publishing scanner releases and their signatures to an OCI registry, in the layouts the
//! provenance gate reads (`stella_signer::provenance`). Used by the integration tests, and a
//! library for release tooling (sign a scanner image with the release key held by any
//! [`KeySigner`] backend); no command of `stella-signer-tools` calls it yet.
//!
//! - [`Pusher::push_test_image`]: a minimal OCI image (config, one tar layer, manifest).
//! - [`Pusher::sign_image_cosign`]: a cosign simple-signing signature under the tag
//!   `sha256-<hex>.sig`, added to the signatures already there (as `cosign sign` does).
//! - [`Pusher::attach_dsse_referrer`]: a DSSE in-toto attestation as an OCI 1.1 referrer
//!   (a manifest whose `subject` is the image). When the registry does not index referrers
//!   itself (distribution 2.x), the referrers tag schema index `sha256-<hex>` is updated.
//! - [`Pusher::sign_image_cosign3`]: what `cosign sign` 3 attaches by default: a Sigstore
//!   bundle v0.3 referrer holding a DSSE envelope with an in-toto Statement
//!   (`https://sigstore.dev/cosign/sign/v1`) about the image, signed with a key; and
//!   [`Pusher::attach_bundle`] for any bundle (message signatures, keyless ones in tests).
//!
//! Registries are reached with the [`Credentials`] given (anonymously without).

use std::collections::BTreeMap;

use base64::Engine as _;
use oci_client::Reference;
use oci_client::client::{Client, ClientConfig, ClientProtocol};
use oci_client::errors::OciDistributionError;
use oci_client::manifest::{
    IMAGE_CONFIG_MEDIA_TYPE, IMAGE_LAYER_MEDIA_TYPE, IMAGE_MANIFEST_LIST_MEDIA_TYPE,
    IMAGE_MANIFEST_MEDIA_TYPE, ImageIndexEntry, OCI_IMAGE_INDEX_MEDIA_TYPE, OCI_IMAGE_MEDIA_TYPE,
    OciDescriptor, OciImageIndex, OciImageManifest,
};
use oci_client::secrets::RegistryAuth;
use reqwest::header::HeaderValue;
use sha2::{Digest as _, Sha256};
use signer_actors::digest::parse_oci_sha256;
use signer_actors::dsse::{Envelope, Signature, pae};
use signer_actors::keys::{KeyError, KeySigner};
use signer_actors::statement::{INTOTO_PAYLOAD_TYPE, STATEMENT_V1, Statement, Subject};

use stella_signer::provenance::credentials::Credentials;
use stella_signer::provenance::formats::{
    BUNDLE_V03_MEDIA_TYPE, COSIGN_SIGNATURE_ANNOTATION, DSSE_MEDIA_TYPE, SIMPLE_SIGNING_MEDIA_TYPE,
    SimpleSigning,
};
use stella_signer::provenance::is_not_found;
use stella_signer::provenance::repository::{self, RepositoryError};

/// predicateType of the attestation [`Pusher::attach_dsse_referrer`] writes: "this image is
/// a scanner release", with the repository and digest as the predicate.
pub const SCANNER_RELEASE_PREDICATE_TYPE: &str =
    "https://stella-ops.org/attestations/scanner-release/v1";

/// The OCI "empty" config of artifacts (`{}`), per image-spec 1.1.
const EMPTY_CONFIG_MEDIA_TYPE: &str = "application/vnd.oci.empty.v1+json";
const EMPTY_CONFIG: &[u8] = b"{}";

/// predicateType of the Statement `cosign sign` 3 puts in its bundle.
pub const COSIGN_SIGN_PREDICATE_TYPE: &str = "https://sigstore.dev/cosign/sign/v1";
/// Referrer annotation naming a bundle's content (`dsse-envelope` / `message-signature`).
pub const BUNDLE_CONTENT_ANNOTATION: &str = "dev.sigstore.bundle.content";
/// Referrer annotation with the predicateType of a bundle's Statement.
pub const BUNDLE_PREDICATE_ANNOTATION: &str = "dev.sigstore.bundle.predicateType";
/// What a bundle holds, as its referrer's [`BUNDLE_CONTENT_ANNOTATION`] says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BundleContentKind {
    DsseEnvelope,
    MessageSignature,
}

impl BundleContentKind {
    fn annotation(self) -> &'static str {
        match self {
            BundleContentKind::DsseEnvelope => "dsse-envelope",
            BundleContentKind::MessageSignature => "message-signature",
        }
    }
}

/// Why a push failed.
#[derive(Debug, thiserror::Error)]
pub enum PushError {
    #[error(transparent)]
    Repository(#[from] RepositoryError),
    #[error("image digest: {0}")]
    Digest(String),
    #[error("registry: {0}")]
    Registry(#[from] OciDistributionError),
    #[error("signing: {0}")]
    Sign(#[from] KeyError),
    #[error("registry client: {0}")]
    Client(String),
    #[error("{0}")]
    Content(String),
}

/// Pushes images, signatures and attestations.
#[derive(Clone)]
pub struct Pusher {
    client: Client,
    credentials: Credentials,
}

impl std::fmt::Debug for Pusher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pusher").finish_non_exhaustive()
    }
}

fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

fn json<T: serde::Serialize>(value: &T) -> Result<Vec<u8>, PushError> {
    serde_json::to_vec(value).map_err(|e| PushError::Content(e.to_string()))
}

fn descriptor(media_type: &str, bytes: &[u8]) -> OciDescriptor {
    OciDescriptor {
        media_type: media_type.to_string(),
        digest: sha256_digest(bytes),
        size: i64::try_from(bytes.len()).unwrap_or(i64::MAX),
        urls: None,
        annotations: None,
        artifact_type: None,
    }
}

/// A one-file ustar archive: a layer any image tool can unpack.
fn tar_with_file(name: &str, content: &[u8]) -> Vec<u8> {
    let mut header = [0u8; 512];
    let put = |h: &mut [u8; 512], at: usize, bytes: &[u8]| {
        h[at..at + bytes.len()].copy_from_slice(bytes);
    };
    put(&mut header, 0, &name.as_bytes()[..name.len().min(99)]);
    put(&mut header, 100, b"0000644\0");
    put(&mut header, 108, b"0000000\0");
    put(&mut header, 116, b"0000000\0");
    put(
        &mut header,
        124,
        format!("{:011o}\0", content.len()).as_bytes(),
    );
    put(&mut header, 136, b"00000000000\0");
    put(&mut header, 148, b"        ");
    header[156] = b'0';
    put(&mut header, 257, b"ustar\0");
    put(&mut header, 263, b"00");
    let sum: u32 = header.iter().map(|&b| u32::from(b)).sum();
    put(&mut header, 148, format!("{sum:06o}\0 ").as_bytes());
    let mut out = header.to_vec();
    out.extend_from_slice(content);
    out.resize(out.len().div_ceil(512) * 512, 0);
    out.extend_from_slice(&[0u8; 1024]);
    out
}

impl Pusher {
    /// `insecure_registries` (host:port) are reached over plain HTTP, as in `[gates.provenance]`.
    pub fn new(insecure_registries: &[String]) -> Result<Self, PushError> {
        Self::with_credentials(insecure_registries, Credentials::default())
    }

    /// Like [`Pusher::new`], authenticating with `credentials` where they have an entry.
    pub fn with_credentials(
        insecure_registries: &[String],
        credentials: Credentials,
    ) -> Result<Self, PushError> {
        let client = Client::try_from(ClientConfig {
            protocol: ClientProtocol::HttpsExcept(insecure_registries.to_vec()),
            ..ClientConfig::default()
        })
        .map_err(|e| PushError::Client(e.to_string()))?;
        Ok(Pusher {
            client,
            credentials,
        })
    }

    fn auth(&self, reference: &Reference) -> RegistryAuth {
        self.credentials.auth_for(reference.resolve_registry())
    }

    /// A reference to `tag_or_digest` (`sha256:...` is a digest) in `repository`
    /// (`host[:port]/path`).
    async fn at(&self, repository: &str, tag_or_digest: &str) -> Result<Reference, PushError> {
        let repo = repository::parse(repository)?;
        let (registry, path) = (repo.registry.to_string(), repo.path.to_string());
        let reference = if tag_or_digest.contains(':') {
            Reference::with_digest(registry, path, tag_or_digest.to_string())
        } else {
            Reference::with_tag(registry, path, tag_or_digest.to_string())
        };
        self.client
            .store_auth_if_needed(reference.resolve_registry(), &self.auth(&reference))
            .await;
        Ok(reference)
    }

    async fn push_blob(&self, reference: &Reference, bytes: &[u8]) -> Result<(), PushError> {
        self.client
            .push_blob(reference, bytes.to_vec(), &sha256_digest(bytes))
            .await?;
        Ok(())
    }

    async fn push_manifest(
        &self,
        reference: &Reference,
        bytes: Vec<u8>,
        media_type: &'static str,
    ) -> Result<String, PushError> {
        let digest = sha256_digest(&bytes);
        self.client
            .push_manifest_raw(reference, bytes, HeaderValue::from_static(media_type))
            .await?;
        Ok(digest)
    }

    /// Pushes a minimal OCI image whose only layer holds a random nonce (so every call gives
    /// a new digest) and returns its manifest digest.
    pub async fn push_test_image(&self, repository: &str) -> Result<String, PushError> {
        let mut nonce = [0u8; 16];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut nonce)
            .map_err(|_| PushError::Content("no randomness for the test image nonce".into()))?;
        let layer = tar_with_file("stella-test-image", hex::encode(nonce).as_bytes());
        let layer_desc = descriptor(IMAGE_LAYER_MEDIA_TYPE, &layer);
        let config = json(&serde_json::json!({
            "architecture": "amd64",
            "os": "linux",
            "config": {},
            "rootfs": {"type": "layers", "diff_ids": [layer_desc.digest]}
        }))?;
        let manifest = OciImageManifest {
            schema_version: 2,
            media_type: Some(OCI_IMAGE_MEDIA_TYPE.to_string()),
            config: descriptor(IMAGE_CONFIG_MEDIA_TYPE, &config),
            layers: vec![layer_desc],
            subject: None,
            artifact_type: None,
            annotations: None,
        };
        let bytes = json(&manifest)?;
        let digest = sha256_digest(&bytes);
        let reference = self.at(repository, &digest).await?;
        self.push_blob(&reference, &layer).await?;
        self.push_blob(&reference, &config).await?;
        self.push_manifest(&reference, bytes, OCI_IMAGE_MEDIA_TYPE)
            .await
    }

    /// Signs `repository@image_digest` the way `cosign sign --key` does and pushes the
    /// signature to the tag `sha256-<hex>.sig`, keeping signatures already there.
    /// Returns the digest of the new signature manifest.
    pub async fn sign_image_cosign(
        &self,
        repository: &str,
        image_digest: &str,
        key: &dyn KeySigner,
    ) -> Result<String, PushError> {
        let hex = parse_oci_sha256(image_digest).map_err(PushError::Digest)?;
        let payload = json(&SimpleSigning::for_image(repository, image_digest))?;
        let sig = key.sign(&payload).await?.sig;
        let reference = self.at(repository, &format!("sha256-{hex}.sig")).await?;
        self.push_blob(&reference, &payload).await?;

        let mut layers = match self
            .client
            .pull_manifest_raw(
                &reference,
                &self.auth(&reference),
                &[OCI_IMAGE_MEDIA_TYPE, IMAGE_MANIFEST_MEDIA_TYPE],
            )
            .await
        {
            Ok((bytes, _)) => {
                serde_json::from_slice::<OciImageManifest>(&bytes)
                    .map_err(|e| PushError::Content(format!("existing signature manifest: {e}")))?
                    .layers
            }
            Err(e) if is_not_found(&e) => Vec::new(),
            Err(e) => return Err(e.into()),
        };
        let mut layer = descriptor(SIMPLE_SIGNING_MEDIA_TYPE, &payload);
        layer.annotations = Some(BTreeMap::from([(
            COSIGN_SIGNATURE_ANNOTATION.to_string(),
            base64::engine::general_purpose::STANDARD.encode(sig),
        )]));
        layers.push(layer);

        // cosign's signature image config: an empty image whose diff_ids are the payloads.
        let config = json(&serde_json::json!({
            "architecture": "",
            "created": "0001-01-01T00:00:00Z",
            "history": [{"created": "0001-01-01T00:00:00Z"}],
            "os": "",
            "rootfs": {"type": "layers", "diff_ids": layers.iter().map(|l| &l.digest).collect::<Vec<_>>()},
            "config": {}
        }))?;
        self.push_blob(&reference, &config).await?;
        let manifest = OciImageManifest {
            schema_version: 2,
            media_type: Some(OCI_IMAGE_MEDIA_TYPE.to_string()),
            config: descriptor(IMAGE_CONFIG_MEDIA_TYPE, &config),
            layers,
            subject: None,
            artifact_type: None,
            annotations: None,
        };
        self.push_manifest(&reference, json(&manifest)?, OCI_IMAGE_MEDIA_TYPE)
            .await
    }

    /// Attests `repository@image_digest` as a scanner release: an in-toto Statement v1
    /// ([`SCANNER_RELEASE_PREDICATE_TYPE`]) in a DSSE envelope signed by `key`, pushed as
    /// an OCI 1.1 referrer. Returns the referrer manifest's digest.
    pub async fn attach_dsse_referrer(
        &self,
        repository: &str,
        image_digest: &str,
        key: &dyn KeySigner,
    ) -> Result<String, PushError> {
        let hex = parse_oci_sha256(image_digest).map_err(PushError::Digest)?;
        let mut predicate = serde_json::Map::new();
        predicate.insert("imageDigest".into(), image_digest.into());
        predicate.insert("repository".into(), repository.into());
        let statement = Statement {
            type_: STATEMENT_V1.to_string(),
            predicate: Some(predicate),
            predicate_type: SCANNER_RELEASE_PREDICATE_TYPE.to_string(),
            subject: vec![Subject {
                annotations: None,
                digest: BTreeMap::from([("sha256".to_string(), hex.to_string())]),
                name: repository.to_string(),
                uri: None,
            }],
        };
        let payload = statement
            .canonical_bytes()
            .map_err(|e| PushError::Content(e.to_string()))?;
        let signature = key.sign(&pae(INTOTO_PAYLOAD_TYPE, &payload)).await?;
        let envelope = Envelope {
            payload,
            payload_type: INTOTO_PAYLOAD_TYPE.to_string(),
            signatures: vec![Signature {
                keyid: signature.identity.keyid.clone(),
                sig: signature.sig,
            }],
        };
        self.attach_envelope(repository, image_digest, &envelope)
            .await
    }

    /// Pushes any DSSE envelope as an OCI 1.1 referrer of `repository@image_digest`
    /// (artifactType [`DSSE_MEDIA_TYPE`]), and lists it in the referrers tag schema index
    /// when the registry did not index it. Returns the referrer manifest's digest.
    pub async fn attach_envelope(
        &self,
        repository: &str,
        image_digest: &str,
        envelope: &Envelope,
    ) -> Result<String, PushError> {
        let envelope_bytes = json(envelope)?;
        self.attach_referrer(
            repository,
            image_digest,
            DSSE_MEDIA_TYPE,
            descriptor(DSSE_MEDIA_TYPE, &envelope_bytes),
            &envelope_bytes,
            None,
        )
        .await
    }

    /// Signs `repository@image_digest` as `cosign sign --key` 3 does by default: an in-toto
    /// Statement v1 ([`COSIGN_SIGN_PREDICATE_TYPE`], the image digest as subject) in a DSSE
    /// envelope, in a Sigstore bundle v0.3 with the key as verification material (no
    /// transparency log entry, as with `--tlog-upload=false`), attached as a referrer.
    /// Returns the referrer manifest's digest.
    pub async fn sign_image_cosign3(
        &self,
        repository: &str,
        image_digest: &str,
        key: &dyn KeySigner,
    ) -> Result<String, PushError> {
        let hex = parse_oci_sha256(image_digest).map_err(PushError::Digest)?;
        let statement = serde_json::json!({
            "_type": STATEMENT_V1,
            "subject": [{"name": repository, "digest": {"sha256": hex}}],
            "predicateType": COSIGN_SIGN_PREDICATE_TYPE,
            "predicate": {}
        });
        let payload = json(&statement)?;
        let signature = key.sign(&pae(INTOTO_PAYLOAD_TYPE, &payload)).await?;
        let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
        let bundle = serde_json::json!({
            "mediaType": BUNDLE_V03_MEDIA_TYPE,
            "verificationMaterial": {
                "publicKey": {"hint": signature.identity.keyid},
                "tlogEntries": []
            },
            "dsseEnvelope": {
                "payload": b64(&payload),
                "payloadType": INTOTO_PAYLOAD_TYPE,
                "signatures": [{"sig": b64(&signature.sig), "keyid": ""}]
            }
        });
        self.attach_bundle(
            repository,
            image_digest,
            &json(&bundle)?,
            BundleContentKind::DsseEnvelope,
            Some(COSIGN_SIGN_PREDICATE_TYPE),
        )
        .await
    }

    /// A bundle v0.3 with a message signature by `key` over the image manifest of
    /// `repository@image_digest` (whose SHA-256 is the digest): the other content a bundle
    /// may have. Push it with [`Pusher::attach_bundle`].
    pub async fn message_signature_bundle(
        &self,
        repository: &str,
        image_digest: &str,
        key: &dyn KeySigner,
    ) -> Result<Vec<u8>, PushError> {
        let image = self.at(repository, image_digest).await?;
        let (manifest, _) = self
            .client
            .pull_manifest_raw(&image, &self.auth(&image), SUBJECT_TYPES)
            .await?;
        let signature = key.sign(&manifest).await?;
        let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
        json(&serde_json::json!({
            "mediaType": BUNDLE_V03_MEDIA_TYPE,
            "verificationMaterial": {
                "publicKey": {"hint": signature.identity.keyid},
                "tlogEntries": []
            },
            "messageSignature": {
                "messageDigest": {"algorithm": "SHA2_256", "digest": b64(&Sha256::digest(&manifest))},
                "signature": b64(&signature.sig)
            }
        }))
    }

    /// Attaches `bundle` (any bytes: tests push broken ones too) the way cosign 3 does
    /// (cosign `specs/BUNDLE_SPEC.md`): a manifest with artifactType
    /// [`BUNDLE_V03_MEDIA_TYPE`], the empty config, the bundle as its single layer, the
    /// image as `subject`. Returns the referrer manifest's digest.
    pub async fn attach_bundle(
        &self,
        repository: &str,
        image_digest: &str,
        bundle: &[u8],
        content: BundleContentKind,
        predicate_type: Option<&str>,
    ) -> Result<String, PushError> {
        let mut layer = descriptor(BUNDLE_V03_MEDIA_TYPE, bundle);
        layer.annotations = Some(BTreeMap::from([(
            "org.opencontainers.image.title".to_string(),
            format!("{}.sigstore.json", layer.digest.replace(':', "-")),
        )]));
        let mut annotations = BTreeMap::from([(
            BUNDLE_CONTENT_ANNOTATION.to_string(),
            content.annotation().to_string(),
        )]);
        if let Some(p) = predicate_type {
            annotations.insert(BUNDLE_PREDICATE_ANNOTATION.to_string(), p.to_string());
        }
        self.attach_referrer(
            repository,
            image_digest,
            BUNDLE_V03_MEDIA_TYPE,
            layer,
            bundle,
            Some(annotations),
        )
        .await
    }

    /// Pushes `blob` and a referrer manifest (artifactType `artifact_type`, empty config,
    /// the blob as its only layer, `repository@image_digest` as subject), and lists it in
    /// the referrers tag schema index when the registry did not index it (with the
    /// manifest's annotations, as the spec asks). Returns the referrer manifest's digest.
    async fn attach_referrer(
        &self,
        repository: &str,
        image_digest: &str,
        artifact_type: &str,
        layer: OciDescriptor,
        blob: &[u8],
        annotations: Option<BTreeMap<String, String>>,
    ) -> Result<String, PushError> {
        let hex = parse_oci_sha256(image_digest).map_err(PushError::Digest)?;
        let image = self.at(repository, image_digest).await?;
        let (subject_bytes, _) = self
            .client
            .pull_manifest_raw(&image, &self.auth(&image), SUBJECT_TYPES)
            .await?;
        let subject_type = serde_json::from_slice::<serde_json::Value>(&subject_bytes)
            .ok()
            .and_then(|v| v.get("mediaType")?.as_str().map(str::to_string))
            .unwrap_or_else(|| OCI_IMAGE_MEDIA_TYPE.to_string());

        self.push_blob(&image, EMPTY_CONFIG).await?;
        self.push_blob(&image, blob).await?;
        let manifest = OciImageManifest {
            schema_version: 2,
            media_type: Some(OCI_IMAGE_MEDIA_TYPE.to_string()),
            config: descriptor(EMPTY_CONFIG_MEDIA_TYPE, EMPTY_CONFIG),
            layers: vec![layer],
            subject: Some(descriptor(&subject_type, &subject_bytes)),
            artifact_type: Some(artifact_type.to_string()),
            annotations: annotations.clone(),
        };
        let manifest_bytes = json(&manifest)?;
        let referrer = image.clone_with_digest(sha256_digest(&manifest_bytes));
        let size = i64::try_from(manifest_bytes.len()).unwrap_or(i64::MAX);
        let digest = self
            .push_manifest(&referrer, manifest_bytes, OCI_IMAGE_MEDIA_TYPE)
            .await?;

        // A registry with the referrers API lists the new manifest now. Otherwise (the
        // answer came from the tag schema) the index under `sha256-<hex>` must be updated.
        let listed = self.client.pull_referrers(&image, None).await?;
        if listed.manifests.iter().any(|m| m.digest == digest) {
            return Ok(digest);
        }
        let tag = self.at(repository, &format!("sha256-{hex}")).await?;
        let mut index = match self
            .client
            .pull_manifest_raw(&tag, &self.auth(&tag), &[OCI_IMAGE_INDEX_MEDIA_TYPE])
            .await
        {
            Ok((bytes, _)) => serde_json::from_slice::<OciImageIndex>(&bytes)
                .map_err(|e| PushError::Content(format!("referrers tag schema index: {e}")))?,
            Err(e) if is_not_found(&e) => OciImageIndex {
                schema_version: 2,
                media_type: Some(OCI_IMAGE_INDEX_MEDIA_TYPE.to_string()),
                manifests: Vec::new(),
                artifact_type: None,
                annotations: None,
            },
            Err(e) => return Err(e.into()),
        };
        index.manifests.push(ImageIndexEntry {
            media_type: OCI_IMAGE_MEDIA_TYPE.to_string(),
            digest: digest.clone(),
            size,
            platform: None,
            annotations,
            artifact_type: Some(artifact_type.to_string()),
        });
        self.push_manifest(&tag, json(&index)?, OCI_IMAGE_INDEX_MEDIA_TYPE)
            .await?;
        Ok(digest)
    }
}

/// Media types the image a signature is about may have.
const SUBJECT_TYPES: &[&str] = &[
    OCI_IMAGE_MEDIA_TYPE,
    IMAGE_MANIFEST_MEDIA_TYPE,
    OCI_IMAGE_INDEX_MEDIA_TYPE,
    IMAGE_MANIFEST_LIST_MEDIA_TYPE,
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_layer_is_a_well_formed_tar() {
        let tar = tar_with_file("f", b"hello");
        assert_eq!(tar.len(), 512 + 512 + 1024);
        assert_eq!(&tar[257..263], b"ustar\0");
        // The checksum counts its own field as spaces.
        let mut copy = tar[..512].to_vec();
        copy[148..156].copy_from_slice(b"        ");
        let sum: u32 = copy.iter().map(|&b| u32::from(b)).sum();
        assert_eq!(
            std::str::from_utf8(&tar[148..154]).unwrap(),
            format!("{sum:06o}")
        );
        assert_eq!(&tar[512..517], b"hello");
    }
}
