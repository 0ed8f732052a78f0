//! Key state shared by every replica, in a JetStream key-value bucket (`SIGNER_KEYS`):
//!
//! - `key.<keyid>`: each public key a replica has loaded (name, algorithm, source, PEM, first
//!   seen), kept after the key leaves the configuration so verifiers can still find it;
//! - `revoked.<keyid>`: revoked keys, with reason and time. Every replica watches these and
//!   its key actors refuse a revoked keyid (`key_revoked`) from the moment the entry arrives.
//!
//! `stella-signer keys revoke` writes the bucket; a JSON message
//! `{"action":"revoke","keyid":...,"reason":...}` on `signer.control.keys` does the same
//! through any replica (who may publish there is a NATS permission).

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use futures::StreamExt as _;
use serde::{Deserialize, Serialize};
use signer_actors::keys::SignerIdentity;
use signer_actors::ports::RevocationList;

use super::NatsError;

/// A public key a replica has loaded.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KeyRecord {
    pub keyid: String,
    pub name: String,
    pub algorithm: String,
    pub source: String,
    pub public_key: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub certificate_chain: Vec<String>,
    /// When a replica first loaded it (RFC 3339): the start of its validity for verifiers.
    pub first_seen: String,
}

/// A revocation.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Revocation {
    pub keyid: String,
    pub reason: String,
    pub revoked_at: String,
}

/// A command on `signer.control.keys`.
#[derive(Debug, Deserialize)]
struct ControlMessage {
    action: String,
    keyid: String,
    #[serde(default)]
    reason: String,
}

fn now() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}

fn is_keyid(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// The bucket, and this replica's view of the revocations in it.
pub struct KeyState {
    store: kv::Store,
    revoked: RwLock<HashMap<String, String>>,
}

impl KeyState {
    /// Opens the bucket and loads the current revocations (without watching).
    pub async fn open(js: &jetstream::Context, bucket: &str) -> Result<Arc<Self>, NatsError> {
        let store = super::open_bucket(js, bucket, Duration::ZERO).await?;
        let state = Arc::new(KeyState {
            store,
            revoked: RwLock::new(HashMap::new()),
        });
        for r in state.revocations().await.map_err(|e| NatsError::Bucket {
            bucket: bucket.into(),
            reason: e,
        })? {
            state.set_revoked(r.keyid, r.reason);
        }
        Ok(state)
    }

    fn set_revoked(&self, keyid: String, reason: String) {
        self.revoked
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(keyid, reason);
    }

    /// Follows revocations as they are written, for as long as the process runs.
    pub fn watch(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let state = self.clone();
        tokio::spawn(async move {
            loop {
                match state.store.watch_with_history("revoked.*").await {
                    Ok(mut entries) => {
                        while let Some(entry) = entries.next().await {
                            let Ok(entry) = entry else { break };
                            let Some(keyid) = entry.key.strip_prefix("revoked.") else {
                                continue;
                            };
                            match entry.operation {
                                kv::Operation::Put => {
                                    let reason = serde_json::from_slice::<Revocation>(&entry.value)
                                        .map(|r| r.reason)
                                        .unwrap_or_else(|_| "revoked".into());
                                    tracing::warn!(keyid, %reason, "key revoked: it signs nothing more");
                                    state.set_revoked(keyid.to_string(), reason);
                                }
                                kv::Operation::Delete | kv::Operation::Purge => {
                                    state
                                        .revoked
                                        .write()
                                        .unwrap_or_else(|p| p.into_inner())
                                        .remove(keyid);
                                }
                            }
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "watching key revocations failed; retrying")
                    }
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        })
    }

    /// Applies `revoke` commands published on `subject`, for as long as the process runs.
    pub fn serve_control(
        self: &Arc<Self>,
        client: async_nats::Client,
        subject: String,
    ) -> tokio::task::JoinHandle<()> {
        let state = self.clone();
        tokio::spawn(async move {
            let Ok(mut sub) = client.subscribe(subject.clone()).await else {
                tracing::error!(%subject, "cannot subscribe to the key control subject");
                return;
            };
            while let Some(msg) = sub.next().await {
                let outcome = match serde_json::from_slice::<ControlMessage>(&msg.payload) {
                    Ok(c) if c.action == "revoke" => state.revoke(&c.keyid, &c.reason).await,
                    Ok(c) => Err(format!("unknown action {:?}", c.action)),
                    Err(e) => Err(format!("not a control message: {e}")),
                };
                if let Err(e) = &outcome {
                    tracing::warn!(error = %e, "key control message refused");
                }
                if let Some(reply) = msg.reply {
                    let answer = match outcome {
                        Ok(()) => "ok".to_string(),
                        Err(e) => format!("error: {e}"),
                    };
                    let _ = client.publish(reply, answer.into()).await;
                }
            }
        })
    }

    /// Records a loaded key once (the first replica to load it sets `firstSeen`).
    pub async fn record_key(&self, name: &str, identity: &SignerIdentity) {
        let record = KeyRecord {
            keyid: identity.keyid.clone(),
            name: name.to_string(),
            algorithm: identity.algorithm.as_str().into(),
            source: identity.source.as_str().into(),
            public_key: identity.public_key.to_pem(),
            certificate_chain: identity.certificate_chain.clone(),
            first_seen: now(),
        };
        let Ok(value) = serde_json::to_vec(&record) else {
            return;
        };
        match self
            .store
            .create(format!("key.{}", record.keyid), value.into())
            .await
        {
            Ok(_) => {}
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {}
            Err(e) => {
                tracing::warn!(error = %e, key = name, "recording the key in the key bucket failed")
            }
        }
    }

    /// Revokes `keyid` for every replica.
    pub async fn revoke(&self, keyid: &str, reason: &str) -> Result<(), String> {
        if !is_keyid(keyid) {
            return Err(format!("{keyid:?} is not a keyid (64 lowercase hex)"));
        }
        let r = Revocation {
            keyid: keyid.into(),
            reason: if reason.is_empty() {
                "unspecified".into()
            } else {
                reason.into()
            },
            revoked_at: now(),
        };
        let value = serde_json::to_vec(&r).map_err(|e| e.to_string())?;
        self.store
            .put(format!("revoked.{keyid}"), value.into())
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())?;
        self.set_revoked(r.keyid, r.reason);
        Ok(())
    }

    async fn entries<T: serde::de::DeserializeOwned>(
        &self,
        prefix: &str,
    ) -> Result<Vec<T>, String> {
        let mut keys = self.store.keys().await.map_err(|e| e.to_string())?;
        let mut out = Vec::new();
        while let Some(key) = keys.next().await {
            let key = key.map_err(|e| e.to_string())?;
            if !key.starts_with(prefix) {
                continue;
            }
            if let Some(value) = self.store.get(&key).await.map_err(|e| e.to_string())?
                && let Ok(v) = serde_json::from_slice(&value)
            {
                out.push(v);
            }
        }
        Ok(out)
    }

    /// Every revocation in the bucket.
    pub async fn revocations(&self) -> Result<Vec<Revocation>, String> {
        self.entries("revoked.").await
    }

    /// Every key ever loaded, with its state, for `keys list`.
    pub async fn list(&self) -> Result<Vec<serde_json::Value>, String> {
        let revoked: HashMap<String, Revocation> = self
            .revocations()
            .await?
            .into_iter()
            .map(|r| (r.keyid.clone(), r))
            .collect();
        let mut keys: Vec<KeyRecord> = self.entries("key.").await?;
        keys.sort_by(|a, b| a.first_seen.cmp(&b.first_seen).then(a.name.cmp(&b.name)));
        Ok(keys
            .into_iter()
            .map(|k| {
                let mut v = serde_json::to_value(&k).unwrap_or_default();
                match revoked.get(&k.keyid) {
                    Some(r) => {
                        v["status"] = "revoked".into();
                        v["validUntil"] = r.revoked_at.clone().into();
                        v["revocationReason"] = r.reason.clone().into();
                    }
                    None => v["status"] = "active".into(),
                }
                v["validFrom"] = k.first_seen.clone().into();
                v
            })
            .collect())
    }
}

impl RevocationList for KeyState {
    fn revoked(&self, keyid: &str) -> Option<String> {
        self.revoked
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(keyid)
            .cloned()
    }
}
