//! The configured keys, loaded on demand by the Keyring (and again when a key actor restarts).

use std::sync::Arc;

use async_trait::async_trait;
use signer_actors::keys::{KeyError, KeySigner};
use signer_actors::ports::KeyFactory;

use crate::config::{KeyConfig, KeySourceConfig};
use crate::keys::certified::{CertifiedKey, load_chain};
use crate::keys::file::FileKey;
use crate::keys::pkcs11::Pkcs11Key;

pub struct ConfiguredKeys {
    keys: Vec<KeyConfig>,
}

impl ConfiguredKeys {
    pub fn new(keys: Vec<KeyConfig>) -> Self {
        ConfiguredKeys { keys }
    }
}

#[async_trait]
impl KeyFactory for ConfiguredKeys {
    fn names(&self) -> Vec<String> {
        self.keys.iter().map(|k| k.name.clone()).collect()
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
        };
        match &cfg.certificate_chain {
            Some(path) => {
                let chain = load_chain(path, &key.identity())
                    .map_err(|e| KeyError::Unavailable(format!("key {name}: {e}")))?;
                Ok(Arc::new(CertifiedKey::new(key, chain)))
            }
            None => Ok(key),
        }
    }
}
