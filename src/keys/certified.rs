//! A key with a configured X.509 chain (rustls' `CertifiedKey` shape): any backend, whose
//! signatures carry the chain in `signers[].certificateChain`. Bundles of keyful keys still
//! name the key by its keyid (`publicKey.hint`), as the contract says.

use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use signer_actors::keys::{KeyError, KeySignature, KeySigner, SignerIdentity};

/// Why a chain file cannot be used with a key.
#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    #[error("{path}: {reason}")]
    Read { path: String, reason: String },
    #[error("{0}: no CERTIFICATE in the file")]
    Empty(String),
    #[error(
        "{0}: the first certificate does not certify this key (its public key is not in the leaf)"
    )]
    NotThisKey(String),
}

/// Reads a PEM chain (leaf first) and checks that its leaf carries `identity`'s public key:
/// the SubjectPublicKeyInfo appears verbatim in the leaf's DER.
pub fn load_chain(path: &Path, identity: &SignerIdentity) -> Result<Vec<String>, ChainError> {
    let name = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| ChainError::Read {
        path: name.clone(),
        reason: e.to_string(),
    })?;
    let blocks = pem::parse_many(&text).map_err(|e| ChainError::Read {
        path: name.clone(),
        reason: e.to_string(),
    })?;
    let certs: Vec<pem::Pem> = blocks
        .into_iter()
        .filter(|b| b.tag() == "CERTIFICATE")
        .collect();
    let leaf = certs
        .first()
        .ok_or_else(|| ChainError::Empty(name.clone()))?;
    if !leaf_certifies(leaf.contents(), &identity.public_key) {
        return Err(ChainError::NotThisKey(name));
    }
    let config = pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF);
    Ok(certs
        .iter()
        .map(|c| pem::encode_config(c, config))
        .collect())
}

/// Whether the DER certificate `leaf` carries `key`: its SubjectPublicKeyInfo appears
/// verbatim in the leaf (DER is canonical, so it does exactly when the leaf certifies it).
pub fn leaf_certifies(leaf: &[u8], key: &signer_actors::keys::PublicKey) -> bool {
    let spki = key.spki_der();
    leaf.windows(spki.len()).any(|w| w == spki)
}

/// `key`, reporting `chain` with every signature.
pub struct CertifiedKey {
    key: Arc<dyn KeySigner>,
    identity: Arc<SignerIdentity>,
}

impl CertifiedKey {
    pub fn new(key: Arc<dyn KeySigner>, chain: Vec<String>) -> Self {
        let mut identity = (*key.identity()).clone();
        identity.certificate_chain = chain;
        CertifiedKey {
            key,
            identity: Arc::new(identity),
        }
    }
}

#[async_trait]
impl KeySigner for CertifiedKey {
    fn name(&self) -> &str {
        self.key.name()
    }

    fn identity(&self) -> Arc<SignerIdentity> {
        self.identity.clone()
    }

    async fn sign(&self, message: &[u8]) -> Result<KeySignature, KeyError> {
        let mut signature = self.key.sign(message).await?;
        signature.identity = self.identity.clone();
        Ok(signature)
    }
}
