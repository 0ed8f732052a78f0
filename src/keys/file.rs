//! File keys: PEM private keys on disk (ECDSA P-256 or Ed25519).
//!
//! Read: PKCS#8 v1 or v2 `PRIVATE KEY` and SEC1 `EC PRIVATE KEY` (see [`super::material`]).
//! Written: PKCS#8 v1, which OpenSSL, Python `cryptography`, Go and cosign all read.
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
use ring::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, Ed25519KeyPair};
use signer_actors::keys::{
    KeyAlgorithm, KeyError, KeySignature, KeySigner, KeySource, PublicKey, PublicKeyError,
    SignerIdentity,
};

use super::material::{KeyFormatError, KeyMaterial};

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
    #[error("{path}: {source}")]
    Format {
        path: PathBuf,
        source: KeyFormatError,
    },
    #[error("{path}: ring refused the key: {reason}")]
    Rejected { path: PathBuf, reason: String },
    #[error("{0} already exists; refusing to overwrite a key")]
    Exists(PathBuf),
    #[error("key generation failed: {0}")]
    Generate(KeyFormatError),
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

/// Paths and keyid of a freshly written key.
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

/// Reads a private key file's material, refusing files that group or others can access.
pub fn read_material(path: &Path) -> Result<KeyMaterial, FileKeyError> {
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
    KeyMaterial::from_pem(&text).map_err(|source| FileKeyError::Format {
        path: path.to_path_buf(),
        source,
    })
}

impl FileKey {
    /// Loads a PEM private key (PKCS#8 or SEC1), refusing files that group or others can
    /// access.
    pub fn load(path: &Path, name: impl Into<String>) -> Result<Self, FileKeyError> {
        let material = read_material(path)?;
        Self::from_material(&material, name, path)
    }

    /// Parses PKCS#8 DER (v1 or v2).
    pub fn from_pkcs8_der(der: &[u8], name: impl Into<String>) -> Result<Self, FileKeyError> {
        let path = Path::new("(PKCS#8 DER)");
        let material = KeyMaterial::from_pkcs8_der(der).map_err(|source| FileKeyError::Format {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_material(&material, name, path)
    }

    /// Builds the ring key pair. ring checks once more that the public half is the private
    /// half's (`path` is only used in error messages).
    pub fn from_material(
        material: &KeyMaterial,
        name: impl Into<String>,
        path: &Path,
    ) -> Result<Self, FileKeyError> {
        let rng = SystemRandom::new();
        let rejected = |e: ring::error::KeyRejected| FileKeyError::Rejected {
            path: path.to_path_buf(),
            reason: e.to_string(),
        };
        let pair = match material {
            KeyMaterial::EcdsaP256 { scalar, public } => KeyPair::Ecdsa(
                EcdsaKeyPair::from_private_key_and_public_key(
                    &ECDSA_P256_SHA256_ASN1_SIGNING,
                    scalar.as_ref(),
                    public,
                    &rng,
                )
                .map_err(rejected)?,
            ),
            KeyMaterial::Ed25519 { seed, public } => KeyPair::Ed25519(
                Ed25519KeyPair::from_seed_and_public_key(seed.as_ref(), public)
                    .map_err(rejected)?,
            ),
        };
        let public_key = PublicKey::from_raw(material.algorithm(), material.public_raw())?;
        Ok(Self {
            name: name.into(),
            identity: Arc::new(SignerIdentity::keyful(public_key, KeySource::File)),
            pair,
            rng,
        })
    }

    /// Generates a key pair and writes it with [`FileKey::write_pair`].
    pub fn generate(
        algorithm: KeyAlgorithm,
        dir: &Path,
        name: &str,
    ) -> Result<GeneratedKey, FileKeyError> {
        let material = KeyMaterial::generate(algorithm).map_err(FileKeyError::Generate)?;
        Self::write_pair(&material, dir, name)
    }

    /// Writes `DIR/NAME.key` (PKCS#8 v1 PEM, mode 0600) and `DIR/NAME.pub` (SPKI PEM, the
    /// form `cosign verify --key` and `openssl pkey -pubin` take). Neither file may exist:
    /// a key is never overwritten.
    pub fn write_pair(
        material: &KeyMaterial,
        dir: &Path,
        name: &str,
    ) -> Result<GeneratedKey, FileKeyError> {
        let private_key = dir.join(format!("{name}.key"));
        let public_key = dir.join(format!("{name}.pub"));
        let key = Self::from_material(material, name, &private_key)?;
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        // Checked before writing either, so a refusal leaves no half-written pair behind.
        for path in [&private_key, &public_key] {
            if std::fs::symlink_metadata(path).is_ok() {
                return Err(FileKeyError::Exists(path.clone()));
            }
        }
        write_new(&private_key, material.to_pkcs8_v1_pem().as_bytes(), 0o600)?;
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

    /// The key's public half and keyid.
    pub fn public_key(&self) -> &PublicKey {
        &self.identity.public_key
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

/// Creates `path` with `mode` and writes `bytes`; an existing file is [`FileKeyError::Exists`].
pub fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<(), FileKeyError> {
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
    fn an_existing_public_key_stops_the_pair_before_anything_is_written() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("k.pub"), "someone else's").unwrap();
        let material = KeyMaterial::generate(KeyAlgorithm::Ed25519).unwrap();
        assert!(matches!(
            FileKey::write_pair(&material, dir.path(), "k"),
            Err(FileKeyError::Exists(p)) if p.ends_with("k.pub")
        ));
        assert!(!dir.path().join("k.key").exists());
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
