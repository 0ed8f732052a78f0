//! The offline kit: what a verifier needs without a network, as files in one directory
//! (`stella-signer kit export`), and the checks `stella-signer verify --kit` makes with it.
//!
//! A kit holds:
//! - `keys.json` ([`KeyList`]): every key of the `SIGNER_KEYS` ledger with its state,
//!   validity window and revocation (time and reason), and the configured certificate chains;
//! - `keys/<keyid>.pem`: each key's public key (SPKI PEM);
//! - `chains/<key name>.pem`: the configured X.509 chain of each keyful key that has one;
//! - `trusted_root.json`: the Fulcio roots (`certificateAuthorities`) and the TSA roots
//!   (`timestampAuthorities`) as a Sigstore trusted root, no transparency logs;
//! - `kit-key.pub`: the public key of the key that signed the kit;
//! - `manifest.json` ([`Manifest`]): every file above with its SHA-256, and
//!   `manifest.dsse.json`: a DSSE envelope over exactly those bytes, signed by the kit key.
//!
//! By file: [`export`] builds a kit, [`load`] reads one back (its signature under a pinned
//! key, every digest), [`timestamp`] checks RFC 3161 timestamps, [`verify`] checks envelopes
//! and bundles against a loaded kit.

use serde::{Deserialize, Serialize};

pub mod export;
pub mod load;
pub mod timestamp;
pub mod verify;

/// The manifest (the DSSE payload, byte for byte).
pub const MANIFEST: &str = "manifest.json";
/// The DSSE envelope over the manifest.
pub const MANIFEST_ENVELOPE: &str = "manifest.dsse.json";
/// The envelope's `payloadType`.
pub const MANIFEST_PAYLOAD_TYPE: &str = "application/vnd.stella-signer.kit-manifest.v1+json";
/// The manifest's `mediaType`.
pub const KIT_MEDIA_TYPE: &str = "application/vnd.stella-signer.kit.v1+json";
pub const KEYS: &str = "keys.json";
pub const TRUSTED_ROOT: &str = "trusted_root.json";
pub const KIT_KEY: &str = "kit-key.pub";
/// `mediaType` of the trusted root written (the version sigstore-js and cosign read).
pub const TRUSTED_ROOT_MEDIA_TYPE: &str =
    "application/vnd.dev.sigstore.trustedroot+json;version=0.1";

/// `manifest.json`: what the kit key vouches for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Manifest {
    pub media_type: String,
    /// The keyid of the key that signed the manifest (also `kit-key.pub`).
    pub kit_keyid: String,
    /// Every file of the kit but the manifest and its envelope, sorted by path.
    pub files: Vec<FileDigest>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FileDigest {
    /// Relative to the kit directory, `/`-separated.
    pub path: String,
    /// Lowercase hex SHA-256 of the file.
    pub sha256: String,
}

/// `keys.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KeyList {
    pub keys: Vec<KitKey>,
    pub chains: Vec<KitChain>,
}

/// A key of the ledger, as `keys list` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KitKey {
    pub keyid: String,
    pub name: String,
    pub algorithm: String,
    /// `file`, `pkcs11`, `yubikey` or `fulcio` (a keyless certificate's ephemeral key).
    pub source: String,
    /// `active`, `staged`, `retired`, `expired` or `revoked`.
    pub status: String,
    /// The public key file in the kit.
    pub public_key: String,
    pub valid_from: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub valid_until: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revocation: Option<KitRevocation>,
    /// Keyless keys: the certificate's SHA-256, OIDC issuer and SAN.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate: Option<KitCertificate>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KitRevocation {
    /// RFC 3339: signatures made at or after it are refused.
    pub revoked_at: String,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KitCertificate {
    pub sha256: String,
    pub issuer: String,
    pub san: String,
}

/// A configured certificate chain (PEM, leaf first).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KitChain {
    /// The configured key name.
    pub key: String,
    /// The chain file in the kit.
    pub path: String,
}

/// Why a kit could not be written or used.
#[derive(Debug, thiserror::Error)]
pub enum KitError {
    /// The kit is not what its signature vouches for, or is signed by another key than the
    /// pinned one: a verdict (tampered, or not ours).
    #[error("kit refused: {0}")]
    Refused(String),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// The input cannot be used as it is (configuration, ledger, a file that is not what it
    /// should be): nothing is decided.
    #[error("{0}")]
    Unusable(String),
    /// The ledger could not be read (transient: NATS may answer next time).
    #[error(transparent)]
    Ledger(#[from] crate::keystate::KeyStateError),
    /// The kit key did not sign.
    #[error("kit key {name:?}: {source}")]
    Sign {
        name: String,
        #[source]
        source: signer_actors::keys::KeyError,
    },
}

impl KitError {
    pub(crate) fn io(path: &std::path::Path, source: std::io::Error) -> Self {
        KitError::Io {
            path: path.display().to_string(),
            source,
        }
    }
}

/// Lowercase hex SHA-256.
pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(bytes))
}

#[cfg(test)]
mod tests;
