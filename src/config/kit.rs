//! `[kit]`: the offline kit `stella-signer kit export` writes (see `crate::kit`).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// ```toml
/// [kit]
/// key = "kit"                      # a [[keys]] name: signs the kit's manifest
/// tsa_roots = ["tsa-chain.pem"]    # PEM chains (signer first) of the TSAs keyless keys use
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KitConfig {
    /// The configured key (file, pkcs11 or yubikey; not fulcio: a verifier pins it) that
    /// signs the kit's manifest.
    pub key: String,
    /// Timestamp authorities for the kit's `trusted_root.json`, each a PEM chain, besides
    /// the `timestampAuthorities` of any `fulcio_roots` that is a `trusted_root.json`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tsa_roots: Vec<PathBuf>,
}
