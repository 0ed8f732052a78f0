//! The configured keys: their files checked at startup ([`ConfiguredKeys::check`]), and
//! loaded on demand by the Keyring (and again when a key actor restarts).

use std::sync::Arc;

use async_trait::async_trait;
use signer_actors::keys::{KeyError, KeyMode, KeySigner};
use signer_actors::ports::KeyFactory;

use crate::config::KeyConfig;
use crate::keys::certified::{CertifiedKey, load_chain};
use crate::keys::file::FileKey;
use crate::keys::fulcio_trust::FulcioTrust;
use crate::keys::keyless::KeylessKey;
use crate::keys::pkcs11::Pkcs11Key;

/// What a `yubikey` key answers in a build without the `yubikey` feature.
#[cfg(not(feature = "yubikey"))]
pub const NO_YUBIKEY_SUPPORT: &str =
    "this build has no yubikey support; build with --features yubikey";

/// A configured key whose files are unusable: the service does not start.
#[derive(Debug, thiserror::Error)]
#[error("key {name:?}: {reason}")]
pub struct KeyCheckError {
    pub name: String,
    pub reason: String,
}

pub struct ConfiguredKeys {
    keys: Vec<KeyConfig>,
    /// Where loaded keys are recorded for `keys list` (every replica shares it).
    registry: Option<Arc<crate::keystate::KeyLedger>>,
}

impl ConfiguredKeys {
    pub fn new(keys: Vec<KeyConfig>) -> Self {
        ConfiguredKeys {
            keys,
            registry: None,
        }
    }

    /// Records every key it loads in `registry`.
    pub fn with_registry(mut self, registry: Arc<crate::keystate::KeyLedger>) -> Self {
        self.registry = Some(registry);
        self
    }

    /// Reads what can be read before the service takes a job, so that a wrong path or file
    /// stops startup: a `file` key's private key and its chain (whose leaf must carry that
    /// key), a `fulcio` key's roots. A token, a YubiKey or Fulcio may be unreachable at
    /// startup: those keys are left to the Keyring, which retries and says in `/readyz`
    /// which key is not loaded.
    pub fn check(&self) -> Result<(), KeyCheckError> {
        for key in &self.keys {
            let failed = |reason: String| KeyCheckError {
                name: key.name().to_string(),
                reason,
            };
            match key {
                KeyConfig::File(k) => {
                    let loaded =
                        FileKey::load(&k.path, &k.name).map_err(|e| failed(e.to_string()))?;
                    if let Some(chain) = &k.certificate_chain {
                        load_chain(chain, &loaded.identity()).map_err(|e| failed(e.to_string()))?;
                    }
                }
                // Mandatory, and read again whenever the key loads: without its roots the
                // signer would sign with whatever certificate the network answered with.
                KeyConfig::Fulcio(k) => {
                    FulcioTrust::load(&k.fulcio_roots).map_err(|e| failed(e.to_string()))?;
                }
                KeyConfig::Pkcs11(_) | KeyConfig::Yubikey(_) => {}
            }
        }
        Ok(())
    }
}

#[async_trait]
impl KeyFactory for ConfiguredKeys {
    fn names(&self) -> Vec<String> {
        self.keys.iter().map(|k| k.name().to_string()).collect()
    }

    /// The key's `sessions` (validated to 1..=64 at startup).
    fn pool_size(&self, name: &str) -> usize {
        self.keys
            .iter()
            .find(|k| k.name() == name)
            .map_or(1, |k| k.sessions() as usize)
    }

    async fn load(&self, name: &str) -> Result<Arc<dyn KeySigner>, KeyError> {
        let cfg = self
            .keys
            .iter()
            .find(|k| k.name() == name)
            .ok_or_else(|| KeyError::Unavailable(format!("no key named {name}")))?;
        let key: Arc<dyn KeySigner> = match cfg {
            KeyConfig::File(k) => Arc::new(
                FileKey::load(&k.path, name).map_err(|e| KeyError::Unavailable(e.to_string()))?,
            ),
            KeyConfig::Pkcs11(k) => {
                // Module calls block (and may wait on a device): keep them off the runtime.
                let k = k.clone();
                let key = tokio::task::spawn_blocking(move || Pkcs11Key::open(&k.name, &k))
                    .await
                    .map_err(|e| KeyError::Unavailable(format!("opening a PKCS#11 key: {e}")))??;
                Arc::new(key)
            }
            #[cfg(feature = "yubikey")]
            KeyConfig::Yubikey(k) => {
                // PC/SC calls block (and the device may be slow): keep them off the runtime.
                let k = k.clone();
                let key = tokio::task::spawn_blocking(move || {
                    crate::keys::yubikey::YubiKeySigner::open(&k.name, &k)
                })
                .await
                .map_err(|e| KeyError::Unavailable(format!("opening a YubiKey: {e}")))??;
                Arc::new(key)
            }
            #[cfg(not(feature = "yubikey"))]
            KeyConfig::Yubikey(_) => {
                return Err(KeyError::Unavailable(NO_YUBIKEY_SUPPORT.into()));
            }
            KeyConfig::Fulcio(k) => {
                let ledger = self
                    .registry
                    .clone()
                    .map(|r| r as Arc<dyn crate::keys::keyless::KeylessLedger>);
                Arc::new(KeylessKey::open(name, k.into(), ledger).await?)
            }
        };
        let key: Arc<dyn KeySigner> = match cfg.certificate_chain() {
            Some(path) => {
                let chain = load_chain(path, &key.identity())
                    .map_err(|e| KeyError::Unavailable(format!("key {name}: {e}")))?;
                Arc::new(CertifiedKey::new(key, chain))
            }
            None => key,
        };
        crate::telemetry::keys::loaded(name, &key.identity());
        // Keyless keys record each certificate they obtain themselves (KeylessLedger).
        if let Some(registry) = &self.registry
            && key.identity().mode == KeyMode::Keyful
        {
            registry.record_key(name, &key.identity()).await;
        }
        Ok(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, FileKeyConfig, FulcioKeyConfig, PinSource, PivSlot};
    use signer_actors::keys::KeyAlgorithm;

    fn config(key: &str) -> Result<Config, String> {
        let text = format!(
            "[[keys]]\nname = \"yk\"\nsource = \"yubikey\"\n{key}\n[profiles.default]\nkeys = [\"yk\"]\n"
        );
        Config::from_toml(&text, []).map_err(|e| e.to_string())
    }

    #[test]
    fn yubikey_keys_parse_and_validate_without_a_device() {
        // No device here: validation must not touch one, with or without the feature.
        let cfg = config("slot = \"9a\"\nserial = 12345678\npin_env = \"YK_PIN\"\n").unwrap();
        let KeyConfig::Yubikey(key) = &cfg.keys[0] else {
            panic!("{:?}", cfg.keys[0])
        };
        assert_eq!(key.slot, PivSlot::Authentication);
        assert_eq!(key.serial, Some(12345678));
        assert_eq!(key.pin, PinSource::Env("YK_PIN".into()));
        let cfg = config("pin_file = \"/run/secrets/yk-pin\"\n").unwrap();
        let KeyConfig::Yubikey(key) = &cfg.keys[0] else {
            panic!("{:?}", cfg.keys[0])
        };
        assert_eq!(key.slot, PivSlot::Signature, "9c by default");
        ConfiguredKeys::new(cfg.keys)
            .check()
            .expect("a device key is not opened at startup");

        let err = |k: &str| config(k).unwrap_err();
        assert!(err("pin_env = \"P\"\nmanagement_key_file = \"/k\"\n").contains("unknown field"));
    }

    /// A configuration with a file key `k` (generated in `dir`, with `chain` as its
    /// certificate chain when given) and a keyless key whose roots are `roots`.
    fn checked(
        key: &std::path::Path,
        chain: Option<&std::path::Path>,
        roots: &std::path::Path,
    ) -> Result<(), KeyCheckError> {
        let file = FileKeyConfig {
            certificate_chain: chain.map(Into::into),
            ..FileKeyConfig::new("k", key)
        };
        let keyless = FulcioKeyConfig::new("kl", "https://fulcio.example", "/t", roots);
        ConfiguredKeys::new(vec![file.into(), keyless.into()]).check()
    }

    #[test]
    fn startup_checks_read_key_files_chains_and_fulcio_roots() {
        let dir = tempfile::tempdir().unwrap();
        let key = FileKey::generate(KeyAlgorithm::Ed25519, dir.path(), "k").unwrap();
        let roots = dir.path().join("fulcio.pem");
        std::fs::write(&roots, crate::keys::fulcio_trust::test_root_pem()).unwrap();
        checked(&key.private_key, None, &roots).unwrap();

        let missing = dir.path().join("missing.key");
        let e = checked(&missing, None, &roots).unwrap_err();
        assert_eq!(e.name, "k");
        assert!(e.to_string().starts_with("key \"k\": "), "{e}");
        assert!(e.reason.contains("missing.key"), "{e}");

        let e = checked(&key.private_key, None, &dir.path().join("nope.json")).unwrap_err();
        assert_eq!(e.name, "kl");
        assert!(e.reason.contains("nope.json"), "{e}");
    }

    /// Needs the `openssl` binary (it writes the certificate), so runs with the integration
    /// tests.
    #[cfg(feature = "integration")]
    #[test]
    fn startup_checks_refuse_a_chain_whose_leaf_is_another_key() {
        let dir = tempfile::tempdir().unwrap();
        let key = FileKey::generate(KeyAlgorithm::Ed25519, dir.path(), "k").unwrap();
        let other = FileKey::generate(KeyAlgorithm::EcdsaP256Sha256, dir.path(), "other").unwrap();
        let roots = dir.path().join("fulcio.pem");
        std::fs::write(&roots, crate::keys::fulcio_trust::test_root_pem()).unwrap();
        let cert = dir.path().join("other.pem");
        let made = std::process::Command::new("openssl")
            .args(["req", "-x509", "-subj", "/CN=other", "-days", "1", "-key"])
            .arg(&other.private_key)
            .arg("-out")
            .arg(&cert)
            .output()
            .unwrap();
        assert!(
            made.status.success(),
            "{}",
            String::from_utf8_lossy(&made.stderr)
        );
        let e = checked(&key.private_key, Some(&cert), &roots).unwrap_err();
        assert!(e.reason.contains("does not certify this key"), "{e}");
        checked(&other.private_key, Some(&cert), &roots).unwrap();
    }

    #[test]
    fn sessions_set_the_pool_size_and_are_bounded() {
        let keys = |extra: &str| {
            let text = format!(
                "[[keys]]\nname = \"hsm\"\nsource = \"pkcs11\"\ntoken_label = \"t\"\nkey_label = \"k\"\npin_env = \"P\"\n{extra}\n\
                 [[keys]]\nname = \"yk\"\nsource = \"yubikey\"\npin_env = \"P\"\n\
                 [profiles.default]\nkeys = [\"hsm\"]\n"
            );
            Config::from_toml(&text, []).map(|c| ConfiguredKeys::new(c.keys))
        };
        let pooled = keys("sessions = 4").unwrap();
        assert_eq!(pooled.pool_size("hsm"), 4);
        assert_eq!(pooled.pool_size("yk"), 1, "default: one actor per key");
        assert_eq!(pooled.pool_size("unknown"), 1);
        assert_eq!(keys("sessions = 64").unwrap().pool_size("hsm"), 64);
        for bad in ["sessions = 0", "sessions = 65"] {
            let err = keys(bad).err().unwrap().to_string();
            assert!(
                err.contains("key \"hsm\": sessions") && err.contains("1 to 64"),
                "{err}"
            );
        }
        assert!(keys("sessions = -1").is_err());
    }

    /// Without the feature a `yubikey` key says how to get one; with it, opening fails as
    /// retryable for want of a device (none on this machine) and names PC/SC.
    #[tokio::test]
    async fn loading_a_yubikey_key_without_a_device_is_unavailable() {
        let dir = tempfile::tempdir().unwrap();
        let pin = dir.path().join("pin");
        std::fs::write(&pin, "123456\n").unwrap();
        let text = format!("serial = 1\npin_file = \"{}\"\n", pin.display());
        let keys = ConfiguredKeys::new(config(&text).unwrap().keys);
        let err = match keys.load("yk").await {
            Ok(_) => panic!("a YubiKey with serial 1 cannot be attached"),
            Err(e) => e,
        };
        let KeyError::Unavailable(m) = &err else {
            panic!("expected Unavailable, got {err:?}")
        };
        #[cfg(not(feature = "yubikey"))]
        assert_eq!(
            m,
            "this build has no yubikey support; build with --features yubikey"
        );
        #[cfg(feature = "yubikey")]
        assert!(m.contains("PC/SC") && m.contains("pcscd"), "{m}");
    }
}
