//! File keys: PKCS#8 PEM private keys on disk (ECDSA P-256 or Ed25519).
//!
//! A private key file must not be readable by group or others (mode 0600, as ssh
//! insists): a signing key that any local user can read is not a key worth trusting.

use std::fs::OpenOptions;
use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, Ed25519KeyPair, KeyPair as _};
use signer_actors::keys::{
    KeyAlgorithm, KeyError, KeySignature, KeySigner, KeySource, PublicKey, PublicKeyError,
    SignerIdentity,
};

/// Why a key file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum FileKeyError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: private key is readable by group or others (mode {mode:o}); chmod 600 it")]
    Permissions { path: PathBuf, mode: u32 },
    #[error("{path}: not a PEM PRIVATE KEY: {reason}")]
    Pem { path: PathBuf, reason: String },
    #[error("{path}: unsupported private key (PKCS#8 ECDSA P-256 or Ed25519 expected)")]
    Unsupported { path: PathBuf },
    #[error("{0} already exists; refusing to overwrite a key")]
    Exists(PathBuf),
    #[error("key generation failed")]
    Generate,
    #[error("public key: {0}")]
    PublicKey(#[from] PublicKeyError),
}

enum KeyPair {
    Ecdsa(EcdsaKeyPair),
    Ed25519(Ed25519KeyPair),
}

/// A file key, ready to sign.
pub struct FileKey {
    name: String,
    identity: Arc<SignerIdentity>,
    pair: KeyPair,
    rng: SystemRandom,
}

impl std::fmt::Debug for FileKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileKey")
            .field("name", &self.name)
            .field("keyid", &self.identity.keyid)
            .finish()
    }
}

/// Paths and keyid of a freshly generated key.
#[derive(Debug, Clone)]
pub struct GeneratedKey {
    pub private_key: PathBuf,
    pub public_key: PathBuf,
    pub keyid: String,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> FileKeyError + '_ {
    move |source| FileKeyError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl FileKey {
    /// Loads a PKCS#8 PEM private key, refusing files that group or others can access.
    pub fn load(path: &Path, name: impl Into<String>) -> Result<Self, FileKeyError> {
        let mode = std::fs::metadata(path)
            .map_err(io_err(path))?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            return Err(FileKeyError::Permissions {
                path: path.to_path_buf(),
                mode: mode & 0o777,
            });
        }
        let text = std::fs::read_to_string(path).map_err(io_err(path))?;
        Self::from_pkcs8_pem(&text, name, path)
    }

    /// Parses a PKCS#8 PEM private key (`path` is only used in error messages).
    pub fn from_pkcs8_pem(
        text: &str,
        name: impl Into<String>,
        path: &Path,
    ) -> Result<Self, FileKeyError> {
        let block = pem::parse(text).map_err(|e| FileKeyError::Pem {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        if block.tag() != "PRIVATE KEY" {
            return Err(FileKeyError::Pem {
                path: path.to_path_buf(),
                reason: format!("PEM tag is {}", block.tag()),
            });
        }
        Self::from_pkcs8_der(block.contents(), name).map_err(|e| match e {
            FileKeyError::Unsupported { .. } => FileKeyError::Unsupported {
                path: path.to_path_buf(),
            },
            other => other,
        })
    }

    /// Parses PKCS#8 DER.
    pub fn from_pkcs8_der(der: &[u8], name: impl Into<String>) -> Result<Self, FileKeyError> {
        let rng = SystemRandom::new();
        let (pair, public_key) = if let Ok(k) =
            EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, der, &rng)
        {
            let pk = PublicKey::from_raw(KeyAlgorithm::EcdsaP256Sha256, k.public_key().as_ref())?;
            (KeyPair::Ecdsa(k), pk)
        } else if let Ok(k) = Ed25519KeyPair::from_pkcs8_maybe_unchecked(der) {
            let pk = PublicKey::from_raw(KeyAlgorithm::Ed25519, k.public_key().as_ref())?;
            (KeyPair::Ed25519(k), pk)
        } else {
            return Err(FileKeyError::Unsupported {
                path: PathBuf::new(),
            });
        };
        Ok(Self {
            name: name.into(),
            identity: Arc::new(SignerIdentity::keyful(public_key, KeySource::File)),
            pair,
            rng,
        })
    }

    /// Generates a key pair and writes `DIR/NAME.key` (PKCS#8 PEM, mode 0600, never
    /// overwritten) and `DIR/NAME.pub` (SPKI PEM).
    pub fn generate(
        algorithm: KeyAlgorithm,
        dir: &Path,
        name: &str,
    ) -> Result<GeneratedKey, FileKeyError> {
        let rng = SystemRandom::new();
        let pkcs8 = match algorithm {
            KeyAlgorithm::EcdsaP256Sha256 => {
                EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng)
            }
            KeyAlgorithm::Ed25519 => Ed25519KeyPair::generate_pkcs8(&rng),
        }
        .map_err(|_| FileKeyError::Generate)?;
        let key = Self::from_pkcs8_der(pkcs8.as_ref(), name)?;
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        let private_key = dir.join(format!("{name}.key"));
        let public_key = dir.join(format!("{name}.pub"));
        let pem_text = pem::encode_config(
            &pem::Pem::new("PRIVATE KEY", pkcs8.as_ref().to_vec()),
            pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
        );
        write_new(&private_key, pem_text.as_bytes(), 0o600)?;
        write_new(
            &public_key,
            key.identity.public_key.to_pem().as_bytes(),
            0o644,
        )?;
        Ok(GeneratedKey {
            private_key,
            public_key,
            keyid: key.identity.keyid.clone(),
        })
    }

    /// Signs synchronously (file keys never block on I/O).
    pub fn sign_now(&self, message: &[u8]) -> Result<Vec<u8>, KeyError> {
        match &self.pair {
            KeyPair::Ecdsa(k) => k
                .sign(&self.rng, message)
                .map(|s| s.as_ref().to_vec())
                .map_err(|_| KeyError::Rejected("ECDSA signing failed".into())),
            KeyPair::Ed25519(k) => Ok(k.sign(message).as_ref().to_vec()),
        }
    }
}

fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<(), FileKeyError> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                FileKeyError::Exists(path.to_path_buf())
            } else {
                FileKeyError::Io {
                    path: path.to_path_buf(),
                    source: e,
                }
            }
        })?;
    file.write_all(bytes).map_err(io_err(path))
}

#[async_trait]
impl KeySigner for FileKey {
    fn name(&self) -> &str {
        &self.name
    }

    fn identity(&self) -> Arc<SignerIdentity> {
        self.identity.clone()
    }

    async fn sign(&self, message: &[u8]) -> Result<KeySignature, KeyError> {
        Ok(KeySignature {
            sig: self.sign_now(message)?,
            identity: self.identity.clone(),
            rfc3161_timestamp: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_sign_and_verify_and_are_private() {
        let dir = tempfile::tempdir().unwrap();
        for (alg, name) in [
            (KeyAlgorithm::EcdsaP256Sha256, "ec"),
            (KeyAlgorithm::Ed25519, "ed"),
        ] {
            let g = FileKey::generate(alg, dir.path(), name).unwrap();
            let mode = std::fs::metadata(&g.private_key)
                .unwrap()
                .permissions()
                .mode()
                & 0o777;
            assert_eq!(mode, 0o600);
            let key = FileKey::load(&g.private_key, name).unwrap();
            assert_eq!(key.identity().keyid, g.keyid);
            let public =
                PublicKey::from_pem(&std::fs::read_to_string(&g.public_key).unwrap()).unwrap();
            assert_eq!(public.keyid(), g.keyid);
            let sig = key.sign_now(b"message").unwrap();
            assert!(public.verify(b"message", &sig));
            assert!(!public.verify(b"messagE", &sig));
            assert!(matches!(
                FileKey::generate(alg, dir.path(), name),
                Err(FileKeyError::Exists(_))
            ));
        }
    }

    #[test]
    fn group_or_world_readable_keys_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let g = FileKey::generate(KeyAlgorithm::Ed25519, dir.path(), "k").unwrap();
        for mode in [0o640, 0o604, 0o660] {
            std::fs::set_permissions(&g.private_key, std::fs::Permissions::from_mode(mode))
                .unwrap();
            assert!(
                matches!(
                    FileKey::load(&g.private_key, "k"),
                    Err(FileKeyError::Permissions { .. })
                ),
                "{mode:o}"
            );
        }
    }
}
