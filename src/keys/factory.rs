//! The configured keys, loaded on demand by the Keyring (and again when a key actor restarts).

use std::sync::Arc;

use async_trait::async_trait;
use signer_actors::keys::{KeyError, KeyMode, KeySigner};
use signer_actors::ports::KeyFactory;

use crate::config::{KeyConfig, KeySourceConfig};
use crate::keys::certified::{CertifiedKey, load_chain};
use crate::keys::file::FileKey;
use crate::keys::keyless::KeylessKey;
use crate::keys::pkcs11::Pkcs11Key;

/// What a `yubikey` key answers in a build without the `yubikey` feature.
#[cfg(not(feature = "yubikey"))]
pub const NO_YUBIKEY_SUPPORT: &str =
    "this build has no yubikey support; build with --features yubikey";

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
}

#[async_trait]
impl KeyFactory for ConfiguredKeys {
    fn names(&self) -> Vec<String> {
        self.keys.iter().map(|k| k.name.clone()).collect()
    }

    /// The key's `sessions` (validated to 1..=64 at startup).
    fn pool_size(&self, name: &str) -> usize {
        self.keys
            .iter()
            .find(|k| k.name == name)
            .map_or(1, |k| k.sessions as usize)
    }

    async fn load(&self, name: &str) -> Result<Arc<dyn KeySigner>, KeyError> {
        let cfg = self
            .keys
            .iter()
            .find(|k| k.name == name)
            .ok_or_else(|| KeyError::Unavailable(format!("no key named {name}")))?;
        let key: Arc<dyn KeySigner> = match cfg.source {
            KeySourceConfig::File => {
                let path = cfg
                    .path
                    .as_ref()
                    .ok_or_else(|| KeyError::Unavailable(format!("key {name} has no path")))?;
                let key =
                    FileKey::load(path, name).map_err(|e| KeyError::Unavailable(e.to_string()))?;
                Arc::new(key)
            }
            KeySourceConfig::Pkcs11 => {
                // Module calls block (and may wait on a device): keep them off the runtime.
                let cfg = cfg.clone();
                let name = name.to_string();
                let key = tokio::task::spawn_blocking(move || Pkcs11Key::open(&name, &cfg))
                    .await
                    .map_err(|e| KeyError::Unavailable(format!("opening a PKCS#11 key: {e}")))??;
                Arc::new(key)
            }
            #[cfg(feature = "yubikey")]
            KeySourceConfig::Yubikey => {
                // PC/SC calls block (and the device may be slow): keep them off the runtime.
                let cfg = cfg.clone();
                let name = name.to_string();
                let key = tokio::task::spawn_blocking(move || {
                    crate::keys::yubikey::YubiKeySigner::open(&name, &cfg)
                })
                .await
                .map_err(|e| KeyError::Unavailable(format!("opening a YubiKey: {e}")))??;
                Arc::new(key)
            }
            #[cfg(not(feature = "yubikey"))]
            KeySourceConfig::Yubikey => {
                return Err(KeyError::Unavailable(NO_YUBIKEY_SUPPORT.into()));
            }
            KeySourceConfig::Fulcio => {
                let settings = cfg.keyless().ok_or_else(|| {
                    KeyError::Unavailable(format!("key {name} lacks its Fulcio settings"))
                })?;
                let ledger = self
                    .registry
                    .clone()
                    .map(|r| r as Arc<dyn crate::keys::keyless::KeylessLedger>);
                Arc::new(KeylessKey::open(name, settings, ledger).await?)
            }
        };
        let key: Arc<dyn KeySigner> = match &cfg.certificate_chain {
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
    use crate::config::Config;

    fn config(key: &str) -> Result<Config, String> {
        let text = format!(
            "[[keys]]\nname = \"yk\"\nsource = \"yubikey\"\n{key}\n[profiles.default]\nkeys = [\"yk\"]\n"
        );
        Config::from_toml(&text, []).map_err(|e| e.to_string())
    }

    #[test]
    fn yubikey_keys_parse_and_only_their_settings_are_validated() {
        // No device here: validation must not touch one, with or without the feature.
        let cfg = config("slot = \"9a\"\nserial = 12345678\npin_env = \"YK_PIN\"\n").unwrap();
        let key = &cfg.keys[0];
        assert_eq!(key.source, KeySourceConfig::Yubikey);
        assert_eq!(key.slot.as_deref(), Some("9a"));
        assert_eq!(key.serial, Some(12345678));
        assert_eq!(key.pin_env.as_deref(), Some("YK_PIN"));
        let cfg = config("pin_file = \"/run/secrets/yk-pin\"\n").unwrap();
        assert_eq!(cfg.keys[0].slot, None, "the backend defaults to 9c");

        let err = |k: &str| config(k).unwrap_err();
        assert!(err("slot = \"f9\"\npin_env = \"P\"\n").contains("not a PIV key slot"));
        assert!(err("").contains("exactly one of pin_file or pin_env"));
        assert!(err("pin_env = \"P\"\npin_file = \"/p\"\n").contains("exactly one of pin_file"));
        assert!(err("pin_env = \"P\"\nmodule = \"/m.so\"\n").contains("use source \"pkcs11\""));
        assert!(err("pin_env = \"P\"\nserial = \"abc\"\n").contains("serial"));
        assert!(err("pin_env = \"P\"\nmanagement_key_file = \"/k\"\n").contains("unknown field"));
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
