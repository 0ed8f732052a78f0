//! The scanner release provenance gate: a job is signed only when the scanner image that
//! produced it (`scanner.repository` + `scanner.imageDigest`) carries a signature by one of
//! the configured release keys, or its digest is allowlisted.
//!
//! Order of a decision:
//! 1. the allowlist (offline kits: no network at all), see
//!    [`ReleaseVerifierImpl::decide_offline`];
//! 2. the verdict cache (`cache_ttl`; definite verdicts only): the Provenance actor's
//!    (`signer_actors::pipeline::Provenance`), not this module's;
//! 3. the registry ([`ReleaseVerifierImpl::look_up`]; anonymously, or with the
//!    [`credentials`] configured for it), stopping at
//!    the first signature that verifies: the OCI 1.1 referrers of `repository@digest`
//!    (referrers API, or the referrers tag schema `sha256-<hex>` when the registry lacks the
//!    API) holding cosign simple-signing, DSSE or Sigstore bundle v0.3 layers (what cosign 3
//!    attaches), then cosign's signature tag `sha256-<hex>.sig`. What counts is described
//!    in [`formats`]; keyless bundles never do.
//!
//! What one decision may cost is bounded (docs/security.md, "Limits of provenance work"):
//! signature counts per envelope and manifest, referrers list length, body sizes (streamed
//! and abandoned at the cap); signatures are checked on the blocking pool and stop when the
//! decision's future is dropped. The per-tenant bound on lookups is the Provenance actor's.
//!
//! Verdicts map onto the contract's codes: a verifying signature gives
//! [`ProvenanceGrant::Trusted`]; a registry that answered without one gives
//! `provenance_untrusted` (with the reason); a registry that could not be asked, and no
//! cached verdict, gives `provenance_unavailable` (retryable).
//!
//! [`preflight`] serves `signer.verify.referrers`: the verdict this gate would give a job,
//! asked before one is published.

pub mod formats;

pub mod credentials;
pub(crate) mod preflight;
mod registry;
pub mod repository;

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use oci_client::Reference;
use oci_client::manifest::{
    IMAGE_MANIFEST_MEDIA_TYPE, ImageIndexEntry, OCI_IMAGE_MEDIA_TYPE, OciImageIndex,
    OciImageManifest,
};
use signer_actors::digest::parse_oci_sha256;
use signer_actors::error::SignerError;
use signer_actors::keys::{PublicKey, PublicKeyError};
use signer_actors::ports::{
    ProvenanceGrant, ReleaseSignature, ReleaseVerifier, SignatureFormat, SignatureLocation,
};
use signer_actors::statement::INTOTO_PAYLOAD_TYPE;

use crate::config::gates::{GateMode, ProvenanceGate};
use formats::{
    BUNDLE_V03_MEDIA_TYPE, BUNDLE_V03_MEDIA_TYPE_ALT, BundleCheck, COSIGN_SIGNATURE_ANNOTATION,
    Cancel, Check, DSSE_MEDIA_TYPE, Limits, SIMPLE_SIGNING_MEDIA_TYPE,
};
/// Whether a registry error only says "there is nothing there" (what the tools' pusher
/// needs to start a signature list or a referrers index).
pub use registry::is_not_found;
use registry::{Failure, Fetched, Reader};
pub use repository::RepositoryError;

/// Referrer manifests read per decision: bounds the work a crowded (or hostile) referrers
/// list can cause.
const MAX_REFERRERS: usize = 16;
/// Signature and attestation blobs checked per decision, over all places.
const MAX_SIGNATURES: usize = 32;
/// A simple-signing payload is a few hundred bytes; this leaves room for `optional` claims.
const MAX_PAYLOAD_BYTES: usize = 64 * 1024;
/// DSSE envelopes carry whole provenance predicates.
const MAX_ENVELOPE_BYTES: usize = 4 * 1024 * 1024;
/// A Sigstore bundle is a DSSE envelope (or a message signature) plus verification material
/// (a certificate, transparency log entries): a little more room than an envelope.
const MAX_BUNDLE_BYTES: usize = MAX_ENVELOPE_BYTES + 256 * 1024;
/// Manifests (signature, referrer and, for a message signature, the image's own): the 4 MiB
/// the distribution spec asks registries to accept. Larger ones are refused unread when
/// their size is declared (referrers), and unhashed otherwise.
pub(crate) const MAX_MANIFEST_BYTES: usize = 4 * 1024 * 1024;

/// Why the gate's configuration cannot be used. Checked at startup, so a typo in a key
/// path stops the service instead of refusing every job later.
#[derive(Debug, thiserror::Error)]
pub enum ProvenanceSetupError {
    #[error(
        "[gates.provenance] enforces but has neither trusted_keys nor an allowlist: no scanner release could ever be trusted"
    )]
    NothingTrusted,
    #[error("[gates.provenance] trusted key {path}: {source}")]
    UnreadableKey {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("[gates.provenance] trusted key {path}: {source}")]
    BadKey {
        path: PathBuf,
        source: PublicKeyError,
    },
    #[error("[gates.provenance] allowlist entry {entry:?}: {reason}")]
    BadAllowlistDigest { entry: String, reason: String },
    #[error("[gates.provenance] insecure_registries entry {entry:?} must be host[:port]: {reason}")]
    BadInsecureRegistry { entry: String, reason: String },
    #[error("[gates.provenance] registry_timeout must be more than zero")]
    ZeroTimeout,
    #[error("[gates.provenance] {0} must be at least 1")]
    ZeroLimit(&'static str),
    #[error("[gates.provenance] registry client: {0}")]
    Client(String),
    #[error(transparent)]
    Credentials(#[from] credentials::CredentialsError),
}

/// [`ReleaseVerifier`] against OCI registries.
pub struct ReleaseVerifierImpl {
    mode: GateMode,
    /// Shared with the blocking tasks that check signatures.
    keys: Arc<[PublicKey]>,
    /// Signatures an envelope (or signature layers a manifest) may carry.
    max_envelope_signatures: usize,
    /// Entries a referrers list may have.
    max_referrers: usize,
    allowlist: HashSet<String>,
    reader: Reader,
}

impl std::fmt::Debug for ReleaseVerifierImpl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReleaseVerifierImpl")
            .field("mode", &self.mode)
            .field(
                "keys",
                &self.keys.iter().map(PublicKey::keyid).collect::<Vec<_>>(),
            )
            .field("allowlist", &self.allowlist.len())
            .finish_non_exhaustive()
    }
}

impl ReleaseVerifierImpl {
    /// Reads the trusted keys and checks the allowlist. With `mode = "disabled"` nothing is
    /// read and every job gets [`ProvenanceGrant::Disabled`].
    pub fn from_config(cfg: &ProvenanceGate) -> Result<Self, ProvenanceSetupError> {
        let enforce = cfg.mode == GateMode::Enforce;
        if enforce && cfg.trusted_keys.is_empty() && cfg.allowlist.is_empty() {
            return Err(ProvenanceSetupError::NothingTrusted);
        }
        if cfg.registry_timeout.is_zero() {
            return Err(ProvenanceSetupError::ZeroTimeout);
        }
        for (name, value) in [
            ("max_envelope_signatures", cfg.max_envelope_signatures),
            ("max_referrers", cfg.max_referrers),
            ("tenant_lookups", cfg.tenant_lookups),
        ] {
            if value == 0 {
                return Err(ProvenanceSetupError::ZeroLimit(name));
            }
        }
        let mut keys = Vec::new();
        let mut allowlist = HashSet::new();
        if enforce {
            for path in &cfg.trusted_keys {
                let text = std::fs::read_to_string(path).map_err(|source| {
                    ProvenanceSetupError::UnreadableKey {
                        path: path.clone(),
                        source,
                    }
                })?;
                let key =
                    PublicKey::from_pem(&text).map_err(|source| ProvenanceSetupError::BadKey {
                        path: path.clone(),
                        source,
                    })?;
                keys.push(key);
            }
            for entry in &cfg.allowlist {
                parse_oci_sha256(entry).map_err(|reason| {
                    ProvenanceSetupError::BadAllowlistDigest {
                        entry: entry.clone(),
                        reason,
                    }
                })?;
                allowlist.insert(entry.clone());
            }
        }
        for entry in &cfg.insecure_registries {
            repository::check_registry(entry).map_err(|reason| {
                ProvenanceSetupError::BadInsecureRegistry {
                    entry: entry.clone(),
                    reason,
                }
            })?;
        }
        let client = registry::client(&cfg.insecure_registries, Some(cfg.registry_timeout))
            .map_err(ProvenanceSetupError::Client)?;
        let credentials = if enforce {
            credentials::Credentials::load(
                cfg.docker_config.as_deref(),
                std::env::var_os("DOCKER_CONFIG").map(PathBuf::from),
                &cfg.registry_credentials,
                |var| std::env::var(var).ok(),
            )?
        } else {
            credentials::Credentials::default()
        };
        Ok(ReleaseVerifierImpl {
            mode: cfg.mode,
            keys: keys.into(),
            max_envelope_signatures: cfg.max_envelope_signatures,
            max_referrers: cfg.max_referrers,
            allowlist,
            reader: Reader::new(
                client,
                registry::http_client(cfg.registry_timeout)
                    .map_err(ProvenanceSetupError::Client)?,
                cfg.insecure_registries.clone(),
                cfg.registry_timeout,
                credentials,
            ),
        })
    }

    /// Asks the registry, without the allowlist.
    async fn search_registry(
        &self,
        repo: &repository::Repository<'_>,
        digest: &str,
        hex: &str,
        cancel: &Cancel,
    ) -> Outcome {
        let image = Reference::with_digest(
            repo.registry.to_string(),
            repo.path.to_string(),
            digest.to_string(),
        );
        let mut findings = Findings::default();
        let limits = Limits {
            max_signatures: self.max_envelope_signatures,
            cancel: cancel.clone(),
        };
        match self
            .search(&image, digest, hex, &limits, &mut findings)
            .await
        {
            Ok(Some(found)) => Outcome::Trusted(found),
            Ok(None) if findings.unavailable.is_empty() => {
                Outcome::Untrusted(findings.untrusted_message(repo, digest, hex))
            }
            Ok(None) => Outcome::Unavailable(format!(
                "could not read every signature of {}/{}@{digest}: {}",
                repo.registry,
                repo.path,
                findings.unavailable.first().map_or("", String::as_str)
            )),
            Err(unreachable) => Outcome::Unavailable(format!(
                "registry {} unreachable: {unreachable}",
                repo.registry
            )),
        }
    }

    /// Looks in each place in turn. `Err` is "the registry is unreachable": nothing more
    /// is asked.
    async fn search(
        &self,
        image: &Reference,
        digest: &str,
        hex: &str,
        limits: &Limits,
        f: &mut Findings,
    ) -> Result<Option<ReleaseSignature>, String> {
        let access = match self.reader.prepare(image).await {
            Ok(a) => a,
            Err(Failure::Unreachable(m)) => return Err(m),
            Err(Failure::Unavailable(m) | Failure::Malformed(m)) => {
                f.unavailable.push(m);
                return Ok(None);
            }
        };
        let access = &access;

        // 1 and 2: OCI 1.1 referrers (API, or the tag schema when the API answers 404).
        let tag_schema = format!("sha256-{hex}");
        let index = match self.reader.referrers(image, access).await {
            // The endpoint refused with another client error than 404: some registries
            // without the API do that, so read the tag schema here.
            Ok(None) => f.take(
                self.reader
                    .tag_schema_index(image, access, &tag_schema)
                    .await,
            )?,
            other => f.take(other)?,
        };
        if let Some(index) = index {
            if let Some(refusal) = index_refusal(&index, self.max_referrers) {
                f.malformed.push(refusal);
                return Ok(None);
            }
            for entry in prioritise(index.manifests) {
                if f.checked >= MAX_SIGNATURES {
                    f.truncated = true;
                    break;
                }
                if let Some(refusal) = entry_refusal(&entry) {
                    f.malformed.push(refusal);
                    continue;
                }
                let reference = image.clone_with_digest(entry.digest.clone());
                let Some(manifest) = f.take(self.reader.manifest(&reference, access).await)? else {
                    continue;
                };
                let place = Place {
                    location: SignatureLocation::Referrer,
                    reference: entry.digest.clone(),
                };
                if let Some(found) = self
                    .check_layers(image, access, &manifest, digest, hex, &place, limits, f)
                    .await?
                {
                    return Ok(Some(found));
                }
            }
        }

        // 3: cosign's signature tag.
        let sig_tag = format!("sha256-{hex}.sig");
        let sig_ref = Reference::with_tag(
            image.registry().to_string(),
            image.repository().to_string(),
            sig_tag.clone(),
        );
        if let Some(manifest) = f.take(self.reader.manifest(&sig_ref, access).await)? {
            let place = Place {
                location: SignatureLocation::Tag,
                reference: sig_tag,
            };
            return self
                .check_layers(image, access, &manifest, digest, hex, &place, limits, f)
                .await;
        }
        Ok(None)
    }

    /// Checks the signature layers of one manifest (other layers are skipped unread).
    ///
    /// A manifest with more signature layers than an envelope may have signatures is
    /// refused before any is fetched. Each signature is checked on the blocking pool
    /// ([`Self::off_runtime`]), and the search ends (`Err`, "unavailable", never cached)
    /// once `limits.cancel` is set.
    #[allow(clippy::too_many_arguments)]
    async fn check_layers(
        &self,
        image: &Reference,
        access: &registry::Access,
        manifest: &OciImageManifest,
        digest: &str,
        hex: &str,
        place: &Place,
        limits: &Limits,
        f: &mut Findings,
    ) -> Result<Option<ReleaseSignature>, String> {
        if let Some(refusal) = manifest_refusal(manifest, limits.max_signatures) {
            f.checked += 1;
            f.malformed.push(format!("{place}: {refusal}"));
            return Ok(None);
        }
        for layer in &manifest.layers {
            let Some(kind) = layer_kind(&layer.media_type) else {
                continue;
            };
            if f.checked >= MAX_SIGNATURES {
                f.truncated = true;
                break;
            }
            if limits.cancel.is_cancelled() {
                return Err(CANCELLED.to_string());
            }
            f.checked += 1;
            if parse_oci_sha256(&layer.digest).is_err() {
                f.malformed.push(format!(
                    "{place}: layer with a bad digest {:?}",
                    layer.digest
                ));
                continue;
            }
            let fetched = self.reader.blob(image, layer, kind.limit()).await;
            let missing = matches!(fetched, Ok(None));
            let Some(bytes) = f.take(fetched)? else {
                if missing {
                    f.malformed
                        .push(format!("{place}: blob {} is missing", layer.digest));
                }
                continue;
            };
            let check = match kind {
                LayerKind::SimpleSigning => {
                    let sig = layer
                        .annotations
                        .as_ref()
                        .and_then(|a| a.get(COSIGN_SIGNATURE_ANNOTATION))
                        .cloned();
                    let digest = digest.to_string();
                    self.off_runtime(
                        move |keys, _| {
                            formats::check_simple_signing(&bytes, sig.as_deref(), keys, &digest)
                        },
                        limits,
                    )
                    .await?
                }
                LayerKind::Dsse => {
                    let hex = hex.to_string();
                    self.off_runtime(
                        move |keys, limits| formats::check_dsse(&bytes, keys, &hex, limits),
                        limits,
                    )
                    .await?
                }
                LayerKind::Bundle => {
                    self.check_bundle(image, access, bytes, hex, limits, f)
                        .await?
                }
            };
            match check {
                Check::Verified { keyid } => {
                    return Ok(Some(ReleaseSignature {
                        keyid,
                        location: place.location,
                        reference: place.reference.clone(),
                        format: kind.format(),
                    }));
                }
                Check::UntrustedKey => f.untrusted_key += 1,
                Check::OtherDigest(d) => f.other_digest.push(d),
                Check::Malformed(m) => f.malformed.push(format!("{place}: {m}")),
                Check::Keyless => f.keyless += 1,
                Check::Cancelled => return Err(CANCELLED.to_string()),
            }
        }
        Ok(None)
    }

    /// Checks one Sigstore bundle blob. A message signature is over the image manifest, so
    /// that is fetched (by digest, capped) only once the bundle names the requested digest.
    async fn check_bundle(
        &self,
        image: &Reference,
        access: &registry::Access,
        bytes: Vec<u8>,
        hex: &str,
        limits: &Limits,
        f: &mut Findings,
    ) -> Result<Check, String> {
        let hex_owned = hex.to_string();
        let checked = self
            .off_runtime(
                move |keys, limits| {
                    let bundle = formats::parse_bundle(&bytes).map_err(Check::Malformed)?;
                    Ok(formats::check_bundle(&bundle, keys, &hex_owned, limits))
                },
                limits,
            )
            .await?;
        let signature = match checked {
            Err(check) | Ok(BundleCheck::Done(check)) => return Ok(check),
            Ok(BundleCheck::NeedsManifest { signature }) => signature,
        };
        let Some(manifest) = f.take(self.reader.manifest_raw(image, access).await)? else {
            return Ok(Check::Malformed(format!(
                "message signature over {}, which the registry does not have",
                image.whole()
            )));
        };
        let hex = hex.to_string();
        self.off_runtime(
            move |keys, _| formats::check_message_signature(&manifest, &signature, keys, &hex),
            limits,
        )
        .await
    }

    /// Runs a signature check on the blocking pool, so that parsing and verifying what a
    /// registry served never holds a runtime thread (other tenants' jobs run there). The
    /// check gets the trusted keys and `limits` (whose cancel flag it asks between
    /// signatures). `Err` only if the blocking task died (a panic).
    async fn off_runtime<T: Send + 'static>(
        &self,
        check: impl FnOnce(&[PublicKey], &Limits) -> T + Send + 'static,
        limits: &Limits,
    ) -> Result<T, String> {
        let keys = self.keys.clone();
        let limits = limits.clone();
        tokio::task::spawn_blocking(move || check(&keys, &limits))
            .await
            .map_err(|e| format!("a signature check failed: {e}"))
    }
}

/// Why a search ended without a verdict when its caller gave up.
const CANCELLED: &str = "the check was cancelled: its call timed out";

/// The signature layers the gate reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LayerKind {
    SimpleSigning,
    Dsse,
    Bundle,
}

impl LayerKind {
    /// Largest blob of this kind that is fetched.
    fn limit(self) -> usize {
        match self {
            LayerKind::SimpleSigning => MAX_PAYLOAD_BYTES,
            LayerKind::Dsse => MAX_ENVELOPE_BYTES,
            LayerKind::Bundle => MAX_BUNDLE_BYTES,
        }
    }

    /// What a trusted signature of this kind is reported as.
    fn format(self) -> SignatureFormat {
        match self {
            LayerKind::SimpleSigning => SignatureFormat::CosignSignature,
            LayerKind::Dsse => SignatureFormat::DsseAttestation,
            LayerKind::Bundle => SignatureFormat::SigstoreBundle,
        }
    }
}

fn layer_kind(media_type: &str) -> Option<LayerKind> {
    match media_type {
        SIMPLE_SIGNING_MEDIA_TYPE => Some(LayerKind::SimpleSigning),
        DSSE_MEDIA_TYPE => Some(LayerKind::Dsse),
        BUNDLE_V03_MEDIA_TYPE | BUNDLE_V03_MEDIA_TYPE_ALT => Some(LayerKind::Bundle),
        _ => None,
    }
}

/// Why a referrers list is refused unread, if it is: a list this long is an attack or a
/// misuse, and reading it would let the registry decide how much work a job causes.
fn index_refusal(index: &OciImageIndex, max_referrers: usize) -> Option<String> {
    (index.manifests.len() > max_referrers).then(|| {
        format!(
            "the referrers list has {} entries, over the limit of {max_referrers} ([gates.provenance] max_referrers)",
            index.manifests.len(),
        )
    })
}

/// Why one referrer is skipped unread, if it is. Digests from the registry end up in
/// request paths: only well-formed ones; and a declared size over the manifest limit.
fn entry_refusal(entry: &ImageIndexEntry) -> Option<String> {
    if parse_oci_sha256(&entry.digest).is_err() {
        return Some(format!("referrer with a bad digest {:?}", entry.digest));
    }
    if usize::try_from(entry.size).map_or(true, |s| s > MAX_MANIFEST_BYTES) {
        return Some(format!(
            "referrer {}: declared size {} is over the {MAX_MANIFEST_BYTES}-byte manifest limit",
            entry.digest, entry.size
        ));
    }
    None
}

/// Why a signature manifest is refused before any of its layers is fetched, if it is: more
/// signature layers than an envelope may have signatures, or more than one bundle layer (a
/// bundle manifest has exactly one layer, the bundle: cosign BUNDLE_SPEC.md).
fn manifest_refusal(manifest: &OciImageManifest, max_signatures: usize) -> Option<String> {
    let signature_layers = manifest
        .layers
        .iter()
        .filter(|l| layer_kind(&l.media_type).is_some())
        .count();
    if signature_layers > max_signatures {
        return Some(format!(
            "{signature_layers} signature layers, more than {max_signatures} ([gates.provenance] max_envelope_signatures); refused unread"
        ));
    }
    let bundles = manifest
        .layers
        .iter()
        .filter(|l| layer_kind(&l.media_type) == Some(LayerKind::Bundle))
        .count();
    if bundles > 1 {
        return Some(format!(
            "{bundles} Sigstore bundle layers; a bundle manifest carries exactly one"
        ));
    }
    None
}

/// Entry points for the fuzz targets in `fuzz/` (not an API): the gate's own functions that
/// read what a registry serves, without a registry.
#[doc(hidden)]
pub mod fuzzing {
    use super::*;

    /// What the gate makes of a referrers list: `Err` when it does not decode or is refused
    /// unread; else, in the order they would be read, each referrer's digest and why it is
    /// skipped (`None`: its manifest would be fetched).
    pub fn referrers(
        bytes: &[u8],
        max_referrers: usize,
    ) -> Result<Vec<(String, Option<String>)>, String> {
        let index = registry::decode_index(bytes, "referrers API").map_err(|f| format!("{f:?}"))?;
        if let Some(refusal) = index_refusal(&index, max_referrers) {
            return Err(refusal);
        }
        Ok(prioritise(index.manifests)
            .into_iter()
            .map(|e| {
                let refusal = entry_refusal(&e);
                (e.digest, refusal)
            })
            .collect())
    }

    /// What the gate makes of a signature manifest: `Err` when it does not decode or is
    /// refused before any layer is fetched; else, per layer, the kind of signature the gate
    /// would read from it (`None`: skipped unread) and whether its digest is well-formed.
    pub fn manifest(
        bytes: &[u8],
        max_signatures: usize,
    ) -> Result<Vec<(Option<&'static str>, bool)>, String> {
        let manifest =
            registry::decode_manifest(bytes, "manifest").map_err(|f| format!("{f:?}"))?;
        if let Some(refusal) = manifest_refusal(&manifest, max_signatures) {
            return Err(refusal);
        }
        Ok(manifest
            .layers
            .iter()
            .map(|l| {
                (
                    layer_kind(&l.media_type).map(|k| k.format().as_str()),
                    parse_oci_sha256(&l.digest).is_ok(),
                )
            })
            .collect())
    }
}

/// Referrers that can hold a release signature come first; the list is capped.
fn prioritise(mut entries: Vec<ImageIndexEntry>) -> Vec<ImageIndexEntry> {
    entries.retain(|e| {
        e.media_type == OCI_IMAGE_MEDIA_TYPE || e.media_type == IMAGE_MANIFEST_MEDIA_TYPE
    });
    let relevant = |e: &ImageIndexEntry| {
        matches!(
            e.artifact_type.as_deref(),
            Some(
                DSSE_MEDIA_TYPE
                    | INTOTO_PAYLOAD_TYPE
                    | SIMPLE_SIGNING_MEDIA_TYPE
                    | BUNDLE_V03_MEDIA_TYPE
                    | BUNDLE_V03_MEDIA_TYPE_ALT
            )
        )
    };
    entries.sort_by_key(|e| !relevant(e));
    entries.truncate(MAX_REFERRERS);
    entries
}

/// Where signatures are being read: a referrer (by its manifest digest) or the signature tag.
struct Place {
    location: SignatureLocation,
    reference: String,
}

impl std::fmt::Display for Place {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.location.as_str(), self.reference)
    }
}

enum Outcome {
    Trusted(ReleaseSignature),
    Untrusted(String),
    Unavailable(String),
}

/// Everything seen while searching that did not verify, to say why a release is untrusted.
#[derive(Debug, Default)]
struct Findings {
    checked: usize,
    untrusted_key: usize,
    keyless: usize,
    other_digest: Vec<Vec<String>>,
    malformed: Vec<String>,
    unavailable: Vec<String>,
    truncated: bool,
}

impl Findings {
    /// Unwraps a fetch: "unreachable" ends the search, other failures are noted.
    fn take<T>(&mut self, fetched: Fetched<T>) -> Result<Option<T>, String> {
        match fetched {
            Ok(v) => Ok(v),
            Err(Failure::Unreachable(m)) => Err(m),
            Err(Failure::Unavailable(m)) => {
                self.unavailable.push(m);
                Ok(None)
            }
            Err(Failure::Malformed(m)) => {
                self.malformed.push(m);
                Ok(None)
            }
        }
    }

    fn untrusted_message(
        &self,
        repo: &repository::Repository<'_>,
        digest: &str,
        hex: &str,
    ) -> String {
        let image = format!("{}/{}@{digest}", repo.registry, repo.path);
        if self.checked == 0 && self.malformed.is_empty() {
            return format!(
                "{image} has no cosign signature, DSSE attestation or Sigstore bundle (looked at its OCI referrers and the tags sha256-{hex} and sha256-{hex}.sig)"
            );
        }
        let mut parts = Vec::new();
        if self.untrusted_key > 0 {
            parts.push(format!(
                "{} not made by any trusted key",
                self.untrusted_key
            ));
        }
        if self.keyless > 0 {
            parts.push(format!(
                "{} keyless Sigstore bundle(s) (Fulcio certificate), which this signer does not trust: only [gates.provenance] trusted_keys count",
                self.keyless
            ));
        }
        if !self.other_digest.is_empty() {
            let mut others: Vec<&str> = self
                .other_digest
                .iter()
                .flatten()
                .map(String::as_str)
                .collect();
            others.sort_unstable();
            others.dedup();
            let shown = others
                .iter()
                .take(3)
                .copied()
                .collect::<Vec<_>>()
                .join(", ");
            parts.push(format!(
                "{} made by a trusted key for another image ({}{})",
                self.other_digest.len(),
                if shown.is_empty() {
                    "no sha256 subject"
                } else {
                    &shown
                },
                if others.len() > 3 { ", ..." } else { "" }
            ));
        }
        if let Some(first) = self.malformed.first() {
            parts.push(format!(
                "{} unreadable (first: {first})",
                self.malformed.len()
            ));
        }
        if self.truncated {
            parts.push(format!("stopped after {MAX_SIGNATURES} signatures"));
        }
        format!(
            "no signature of {image} verifies with a trusted key: {}",
            parts.join("; ")
        )
    }
}

#[async_trait]
impl ReleaseVerifier for ReleaseVerifierImpl {
    /// Decides what needs no registry.
    ///
    /// Both inputs come from the request and are checked first: a malformed digest is
    /// `invalid_request`; a repository without a registry host, or not a valid name, is
    /// `provenance_untrusted` (the signer never guesses which registry was meant). Then the
    /// allowlist; then, with no trusted key to check a signature with, `provenance_untrusted`.
    fn decide_offline(
        &self,
        repository: &str,
        image_digest: &str,
    ) -> Option<Result<ProvenanceGrant, SignerError>> {
        if self.mode == GateMode::Disabled {
            return Some(Ok(ProvenanceGrant::Disabled));
        }
        if let Err(e) = parse_oci_sha256(image_digest) {
            return Some(Err(SignerError::InvalidRequest(format!(
                "scanner.imageDigest: {e}"
            ))));
        }
        if let Err(e) = repository::parse(repository) {
            return Some(Err(SignerError::ProvenanceUntrusted(e.to_string())));
        }
        if self.allowlist.contains(image_digest) {
            tracing::debug!(repository, image_digest, "scanner release allowlisted");
            return Some(Ok(ProvenanceGrant::Allowlisted));
        }
        if self.keys.is_empty() {
            return Some(Err(SignerError::ProvenanceUntrusted(format!(
                "{image_digest} is not in the allowlist and no trusted_keys are configured"
            ))));
        }
        None
    }

    /// Decides whether `repository@image_digest` is a trusted scanner release by asking its
    /// registry (uncached: the Provenance actor keeps verdicts). Inputs are checked again
    /// (this may be called without [`Self::decide_offline`]).
    async fn look_up(
        &self,
        repository: &str,
        image_digest: &str,
    ) -> Result<ProvenanceGrant, SignerError> {
        if let Some(answer) = self.decide_offline(repository, image_digest) {
            return answer;
        }
        let hex = parse_oci_sha256(image_digest)
            .map_err(|e| SignerError::InvalidRequest(format!("scanner.imageDigest: {e}")))?;
        let repo = repository::parse(repository)
            .map_err(|e| SignerError::ProvenanceUntrusted(e.to_string()))?;
        // Dropping this future (the Provenance actor's deadline) drops the guard, which
        // stops the signature checks still running on the blocking pool.
        let cancel = Cancel::default();
        let _stop_when_dropped = cancel.on_drop();
        match self
            .search_registry(&repo, image_digest, hex, &cancel)
            .await
        {
            Outcome::Trusted(found) => {
                tracing::info!(
                    repository,
                    image_digest,
                    keyid = %found.keyid,
                    location = found.location.as_str(),
                    reference = %found.reference,
                    format = found.format.as_str(),
                    "scanner release signed by a trusted key"
                );
                Ok(ProvenanceGrant::Trusted(found))
            }
            Outcome::Untrusted(message) => {
                tracing::warn!(repository, image_digest, %message, "scanner release untrusted");
                Err(SignerError::ProvenanceUntrusted(message))
            }
            Outcome::Unavailable(message) => {
                tracing::warn!(repository, image_digest, %message, "scanner provenance unavailable");
                Err(SignerError::ProvenanceUnavailable(message))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use signer_actors::error::ErrorCode;
    use signer_actors::keys::KeyAlgorithm;

    use super::*;
    use crate::keys::file::FileKey;

    fn gate() -> ProvenanceGate {
        ProvenanceGate {
            registry_timeout: Duration::from_millis(500),
            ..ProvenanceGate::default()
        }
    }

    fn digest(c: char) -> String {
        format!("sha256:{}", c.to_string().repeat(64))
    }

    #[test]
    fn setup_errors_name_the_problem() {
        assert!(matches!(
            ReleaseVerifierImpl::from_config(&gate()),
            Err(ProvenanceSetupError::NothingTrusted)
        ));
        let dir = tempfile::tempdir().unwrap();
        let missing = ProvenanceGate {
            trusted_keys: vec![dir.path().join("nope.pub")],
            ..gate()
        };
        let err = ReleaseVerifierImpl::from_config(&missing).unwrap_err();
        assert!(
            matches!(err, ProvenanceSetupError::UnreadableKey { .. }),
            "{err}"
        );
        assert!(err.to_string().contains("nope.pub"), "{err}");

        let not_pem = dir.path().join("bad.pub");
        std::fs::write(&not_pem, "hello").unwrap();
        let bad = ProvenanceGate {
            trusted_keys: vec![not_pem],
            ..gate()
        };
        assert!(matches!(
            ReleaseVerifierImpl::from_config(&bad),
            Err(ProvenanceSetupError::BadKey { .. })
        ));

        for entry in ["sha256:abc", "md5:00", &digest('A')] {
            let bad = ProvenanceGate {
                allowlist: vec![entry.to_string()],
                ..gate()
            };
            assert!(
                matches!(
                    ReleaseVerifierImpl::from_config(&bad),
                    Err(ProvenanceSetupError::BadAllowlistDigest { .. })
                ),
                "{entry}"
            );
        }
        let bad = ProvenanceGate {
            allowlist: vec![digest('a')],
            insecure_registries: vec!["http://127.0.0.1:5000".into()],
            ..gate()
        };
        assert!(matches!(
            ReleaseVerifierImpl::from_config(&bad),
            Err(ProvenanceSetupError::BadInsecureRegistry { .. })
        ));
        let bad = ProvenanceGate {
            allowlist: vec![digest('a')],
            registry_timeout: Duration::ZERO,
            ..gate()
        };
        assert!(matches!(
            ReleaseVerifierImpl::from_config(&bad),
            Err(ProvenanceSetupError::ZeroTimeout)
        ));
        for (bad, name) in [
            (
                ProvenanceGate {
                    allowlist: vec![digest('a')],
                    max_envelope_signatures: 0,
                    ..gate()
                },
                "max_envelope_signatures",
            ),
            (
                ProvenanceGate {
                    allowlist: vec![digest('a')],
                    max_referrers: 0,
                    ..gate()
                },
                "max_referrers",
            ),
            (
                ProvenanceGate {
                    allowlist: vec![digest('a')],
                    tenant_lookups: 0,
                    ..gate()
                },
                "tenant_lookups",
            ),
        ] {
            let err = ReleaseVerifierImpl::from_config(&bad).unwrap_err();
            assert!(
                matches!(err, ProvenanceSetupError::ZeroLimit(n) if n == name),
                "{err}"
            );
        }
        // Disabled needs nothing.
        let disabled = ProvenanceGate {
            mode: GateMode::Disabled,
            ..gate()
        };
        assert!(ReleaseVerifierImpl::from_config(&disabled).is_ok());
    }

    #[tokio::test]
    async fn inputs_are_checked_before_anything_else() {
        let v = ReleaseVerifierImpl::from_config(&ProvenanceGate {
            allowlist: vec![digest('a')],
            ..gate()
        })
        .unwrap();
        let err = v
            .verify("stella-ops/scanner", &digest('a'))
            .await
            .unwrap_err();
        assert_eq!(err.code(), ErrorCode::ProvenanceUntrusted);
        assert_eq!(err.message(), "repository must name a registry host");
        let err = v
            .verify("127.0.0.1:1/stella-ops/scanner", "sha256:abc")
            .await
            .unwrap_err();
        assert_eq!(err.code(), ErrorCode::InvalidRequest);
        let err = v
            .verify("127.0.0.1:1/Stella/scanner:latest", &digest('a'))
            .await
            .unwrap_err();
        assert_eq!(err.code(), ErrorCode::ProvenanceUntrusted);
    }

    #[tokio::test]
    async fn allowlist_answers_without_a_registry_and_disabled_passes_all() {
        let v = ReleaseVerifierImpl::from_config(&ProvenanceGate {
            allowlist: vec![digest('a')],
            ..gate()
        })
        .unwrap();
        // Port 1 on loopback: nothing listens, so any network use would fail.
        assert_eq!(
            v.verify("127.0.0.1:1/stella-ops/scanner", &digest('a'))
                .await,
            Ok(ProvenanceGrant::Allowlisted)
        );
        let err = v
            .verify("127.0.0.1:1/stella-ops/scanner", &digest('b'))
            .await
            .unwrap_err();
        assert_eq!(err.code(), ErrorCode::ProvenanceUntrusted);
        assert!(
            err.message().contains("no trusted_keys"),
            "{}",
            err.message()
        );

        let v = ReleaseVerifierImpl::from_config(&ProvenanceGate {
            mode: GateMode::Disabled,
            ..gate()
        })
        .unwrap();
        assert_eq!(
            v.verify("anything", "anything").await,
            Ok(ProvenanceGrant::Disabled)
        );
    }

    #[tokio::test]
    async fn nothing_listening_is_unavailable_and_not_cached() {
        let dir = tempfile::tempdir().unwrap();
        let key = FileKey::generate(KeyAlgorithm::Ed25519, dir.path(), "release").unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let host = format!("127.0.0.1:{port}");
        let v = ReleaseVerifierImpl::from_config(&ProvenanceGate {
            trusted_keys: vec![key.public_key],
            insecure_registries: vec![host.clone()],
            ..gate()
        })
        .unwrap();
        let repo = format!("{host}/stella-ops/scanner");
        for _ in 0..2 {
            let err = v.verify(&repo, &digest('a')).await.unwrap_err();
            assert_eq!(err.code(), ErrorCode::ProvenanceUnavailable, "{err}");
            assert!(err.code().retryable());
        }
    }

    /// A registry stand-in that answers every request with `status` and `body`, or, with
    /// `status` 0, accepts connections and never answers.
    async fn fake_registry(status: u16, body: &'static str) -> String {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let host = listener.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            let mut silent = Vec::new();
            while let Ok((mut sock, _)) = listener.accept().await {
                if status == 0 {
                    silent.push(sock);
                    continue;
                }
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 16 * 1024];
                    let _ = sock.read(&mut buf).await;
                    let response = format!(
                        "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = sock.write_all(response.as_bytes()).await;
                });
            }
        });
        host
    }

    async fn verify_against(host: &str, timeout: Duration) -> Result<ProvenanceGrant, SignerError> {
        let dir = tempfile::tempdir().unwrap();
        let key = FileKey::generate(KeyAlgorithm::Ed25519, dir.path(), "release").unwrap();
        let v = ReleaseVerifierImpl::from_config(&ProvenanceGate {
            trusted_keys: vec![key.public_key],
            insecure_registries: vec![host.to_string()],
            registry_timeout: timeout,
            ..ProvenanceGate::default()
        })
        .unwrap();
        v.verify(&format!("{host}/stella-ops/scanner"), &digest('a'))
            .await
    }

    #[tokio::test]
    async fn registry_answers_map_onto_the_contract() {
        let second = Duration::from_secs(1);
        // 404 everywhere (no referrers API, no tag-schema index, no .sig tag): untrusted.
        let host = fake_registry(
            404,
            r#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown"}]}"#,
        )
        .await;
        let err = verify_against(&host, second).await.unwrap_err();
        assert_eq!(err.code(), ErrorCode::ProvenanceUntrusted, "{err}");
        // Server errors and rate limits answer no question: unavailable, retryable.
        for (status, body) in [
            (503, "down for maintenance"),
            (500, ""),
            (
                429,
                r#"{"errors":[{"code":"TOOMANYREQUESTS","message":"slow down"}]}"#,
            ),
        ] {
            let host = fake_registry(status, body).await;
            let err = verify_against(&host, second).await.unwrap_err();
            assert_eq!(
                err.code(),
                ErrorCode::ProvenanceUnavailable,
                "{status}: {err}"
            );
        }
    }

    #[tokio::test]
    async fn silent_registry_is_unavailable_within_the_timeout() {
        let host = fake_registry(0, "").await;
        let started = std::time::Instant::now();
        let err = verify_against(&host, Duration::from_millis(300))
            .await
            .unwrap_err();
        assert_eq!(err.code(), ErrorCode::ProvenanceUnavailable, "{err}");
        assert!(err.message().contains("unreachable"), "{err}");
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{:?}",
            started.elapsed()
        );
    }

    #[test]
    fn untrusted_messages_say_which() {
        let repo = repository::parse("r.example/s").unwrap();
        let hex = "a".repeat(64);
        let d = format!("sha256:{hex}");
        let none = Findings::default().untrusted_message(&repo, &d, &hex);
        assert!(none.contains("has no cosign signature"), "{none}");
        let f = Findings {
            checked: 3,
            untrusted_key: 1,
            other_digest: vec![vec![digest('b')]],
            malformed: vec!["tag x: bad".into()],
            ..Findings::default()
        };
        let m = f.untrusted_message(&repo, &d, &hex);
        assert!(m.contains("1 not made by any trusted key"), "{m}");
        assert!(
            m.contains(&format!("for another image ({})", digest('b'))),
            "{m}"
        );
        assert!(m.contains("1 unreadable (first: tag x: bad)"), "{m}");
    }
}
