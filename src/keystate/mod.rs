//! Key state shared by every replica, in a JetStream key-value bucket (`SIGNER_KEYS`):
//!
//! - `key.<keyid>`: each public key a replica has loaded (name, algorithm, source, PEM, first
//!   seen), kept after the key leaves the configuration so verifiers can still find it;
//! - `revoked.<keyid>`: revoked keys, with reason and time. Every replica watches these and
//!   its key actors refuse a revoked keyid (`key_revoked`) from the moment the entry arrives.
//!   For a keyless key the keyid is that of one certificate's ephemeral key (also found by
//!   the certificate's SHA-256): the key drops that certificate and obtains a new one;
//! - `identity-revoked.<hash>`: revoked keyless identities (OIDC issuer + SAN). A keyless key
//!   whose certificate names one refuses to sign (`key_revoked`) while the entry exists;
//! - `assign.<hash>`: runtime key assignments (`keys rotate`): which keys sign a profile, for
//!   one tenant, one plan or the whole profile. Every replica watches these too and the next
//!   job it selects keys for uses them;
//! - `config.profiles`: the profiles of the configuration, as the last replica to start saw
//!   them, so `keys rotate` can record what a rotation replaced and `keys list` can tell an
//!   active key from a retired one.
//!
//! Only the signers write the bucket: `revoke`, `rotate` and `restore` arrive as operator-signed
//! commands on `signer.control.keys` (see [`crate::control`]), which one replica applies here.
//! `stella-signer keys list` reads it.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use futures::StreamExt as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use signer_actors::keys::SignerIdentity;
use signer_actors::ports::RevocationList;
use signer_actors::profiles::{KeyAssignments, ProfileTable, Scope};

use crate::jetstream::NatsError;

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
    /// Keyless keys: the Fulcio certificate that certified this ephemeral key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate: Option<CertificateRecord>,
}

/// What a keyless key's certificate says (its PEM is in [`KeyRecord::certificate_chain`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CertificateRecord {
    /// Lowercase hex SHA-256 of the leaf's DER; `keys revoke` takes it as well as the keyid.
    pub sha256: String,
    /// The OIDC issuer Fulcio recorded.
    pub issuer: String,
    /// The identity (SAN) Fulcio certified.
    pub san: String,
    /// The certificate's validity (RFC 3339).
    pub not_before: String,
    pub not_after: String,
}

/// A revocation.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Revocation {
    pub keyid: String,
    pub reason: String,
    pub revoked_at: String,
    /// When revoked by certificate: the certificate's SHA-256.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate_sha256: Option<String>,
}

/// A revoked keyless identity: certificates for it are not used to sign.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IdentityRevocation {
    pub issuer: String,
    pub san: String,
    pub reason: String,
    pub revoked_at: String,
}

/// Why a revocation was not written.
#[derive(Debug, thiserror::Error)]
pub enum RevokeError {
    /// The command names nothing revocable (fix the command).
    #[error("{0}")]
    Invalid(String),
    /// The key bucket could not be read or written (retry).
    #[error("key bucket: {0}")]
    Bucket(String),
}

/// The bucket key of a revoked identity: issuers and SANs are URLs, not key tokens.
fn identity_key(issuer: &str, san: &str) -> String {
    let id = serde_json::to_vec(&(issuer, san)).unwrap_or_default();
    format!(
        "{IDENTITY_REVOKED}{}",
        &hex::encode(Sha256::digest(id))[..32]
    )
}

const IDENTITY_REVOKED: &str = "identity-revoked.";

/// A runtime key assignment (`keys rotate`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Assignment {
    pub profile: String,
    pub scope: Scope,
    /// The keys (by configured name) that sign from now on, in signature order.
    pub keys: Vec<String>,
    /// The keys the scope used before: the configuration's or an earlier rotation's.
    #[serde(default)]
    pub previous: Vec<String>,
    pub rotated_at: String,
    #[serde(default)]
    pub reason: String,
}

/// The bucket key of an assignment: profile, tenant and plan names need not be valid key
/// tokens, so they are hashed (the value carries them).
fn assignment_key(profile: &str, scope: &Scope) -> String {
    let id = serde_json::to_vec(&(profile, scope)).unwrap_or_default();
    format!("assign.{}", &hex::encode(Sha256::digest(id))[..32])
}

/// (profile, scope, keys) of each assignment, as [`ProfileTable::effective_key_names`]
/// takes them.
fn triples(assignments: &[Assignment]) -> Vec<(String, Scope, Vec<String>)> {
    assignments
        .iter()
        .map(|a| (a.profile.clone(), a.scope.clone(), a.keys.clone()))
        .collect()
}

const CONFIG_PROFILES: &str = "config.profiles";

/// A key the configuration stopped using (`left.<hash>`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Left {
    name: String,
    left_at: String,
}

fn left_key(name: &str) -> String {
    format!(
        "left.{}",
        &hex::encode(Sha256::digest(name.as_bytes()))[..32]
    )
}

fn now() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}

fn is_keyid(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Why a `restore` changed nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RestoreError {
    /// The scope signs with its configured keys already.
    #[error(
        "profile {profile:?} ({scope}) has no rotation to undo: it signs with its configured keys"
    )]
    NoRotation { profile: String, scope: String },
    /// The key bucket could not be read or written.
    #[error("key bucket: {0}")]
    Bucket(String),
}

/// The bucket, and this replica's view of the revocations in it.
pub struct KeyLedger {
    store: kv::Store,
    revoked: RwLock<HashMap<String, String>>,
    /// Revoked keyless identities, by bucket key.
    revoked_identities: RwLock<HashMap<String, IdentityRevocation>>,
    assigned: RwLock<HashMap<(String, Scope), Vec<String>>>,
}

impl KeyLedger {
    /// Opens the bucket and loads the current revocations (without watching).
    pub async fn open(js: &jetstream::Context, bucket: &str) -> Result<Arc<Self>, NatsError> {
        let store = crate::jetstream::open_bucket(js, bucket, Duration::ZERO).await?;
        let state = Arc::new(KeyLedger {
            store,
            revoked: RwLock::new(HashMap::new()),
            revoked_identities: RwLock::new(HashMap::new()),
            assigned: RwLock::new(HashMap::new()),
        });
        let failed = |reason| NatsError::Bucket {
            bucket: bucket.into(),
            reason,
        };
        for r in state.revocations().await.map_err(failed)? {
            state.set_revoked(r.keyid, r.reason);
        }
        for a in state.assignments().await.map_err(failed)? {
            state.set_assigned(a);
        }
        for r in state.identity_revocations().await.map_err(failed)? {
            state.set_identity_revoked(r);
        }
        Ok(state)
    }

    fn set_identity_revoked(&self, r: IdentityRevocation) {
        self.revoked_identities
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(identity_key(&r.issuer, &r.san), r);
    }

    /// Applies a put or delete of an `identity-revoked.` entry.
    fn apply_identity_revocation(&self, entry: &kv::Entry) {
        match entry.operation {
            kv::Operation::Put => {
                match serde_json::from_slice::<IdentityRevocation>(&entry.value) {
                    Ok(r) => {
                        tracing::warn!(
                            issuer = %r.issuer,
                            san = %r.san,
                            reason = %r.reason,
                            "keyless identity revoked: its certificates sign nothing more"
                        );
                        self.set_identity_revoked(r);
                    }
                    Err(e) => {
                        tracing::warn!(key = %entry.key, error = %e, "unreadable identity revocation")
                    }
                }
            }
            kv::Operation::Delete | kv::Operation::Purge => {
                self.revoked_identities
                    .write()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&entry.key);
            }
        }
    }

    fn set_assigned(&self, a: Assignment) {
        self.assigned
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert((a.profile, a.scope), a.keys);
    }

    fn set_revoked(&self, keyid: String, reason: String) {
        self.revoked
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(keyid, reason);
    }

    /// Follows revocations and assignments as they are written, for as long as the
    /// process runs.
    pub fn watch(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let state = self.clone();
        tokio::spawn(async move {
            loop {
                match state.store.watch_with_history(">").await {
                    Ok(mut entries) => {
                        while let Some(entry) = entries.next().await {
                            let Ok(entry) = entry else { break };
                            if entry.key.starts_with("assign.") {
                                state.apply_assignment(&entry);
                                continue;
                            }
                            if entry.key.starts_with(IDENTITY_REVOKED) {
                                state.apply_identity_revocation(&entry);
                                continue;
                            }
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

    fn apply_assignment(&self, entry: &kv::Entry) {
        match entry.operation {
            kv::Operation::Put => match serde_json::from_slice::<Assignment>(&entry.value) {
                Ok(a) => {
                    tracing::warn!(
                        profile = %a.profile,
                        scope = %a.scope,
                        keys = ?a.keys,
                        previous = ?a.previous,
                        "keys rotated: the profile signs with these keys from now on"
                    );
                    self.set_assigned(a);
                }
                Err(e) => tracing::warn!(key = %entry.key, error = %e, "unreadable key assignment"),
            },
            // A deleted assignment gives the scope back to the configuration.
            kv::Operation::Delete | kv::Operation::Purge => {
                self.assigned
                    .write()
                    .unwrap_or_else(|p| p.into_inner())
                    .retain(|(p, s), _| assignment_key(p, s) != entry.key);
            }
        }
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
            certificate: None,
        };
        self.create_record(name, record).await;
    }

    /// Records a certificate a keyless key obtained: its ephemeral keyid, the chain, the
    /// identity and the validity, so `keys list` shows it and `keys revoke` finds it.
    pub async fn record_certificate(
        &self,
        name: &str,
        identity: &SignerIdentity,
        leaf: &crate::keys::fulcio_trust::VerifiedLeaf,
    ) {
        let time = |t| humantime::format_rfc3339(t).to_string();
        let record = KeyRecord {
            keyid: identity.keyid.clone(),
            name: name.to_string(),
            algorithm: identity.algorithm.as_str().into(),
            source: identity.source.as_str().into(),
            public_key: identity.public_key.to_pem(),
            certificate_chain: identity.certificate_chain.clone(),
            first_seen: now(),
            certificate: Some(CertificateRecord {
                sha256: leaf.sha256.clone(),
                issuer: leaf.issuer.clone(),
                san: leaf.san.clone(),
                not_before: time(leaf.not_before),
                not_after: time(leaf.not_after),
            }),
        };
        self.create_record(name, record).await;
    }

    /// Writes `key.<keyid>` unless it exists.
    async fn create_record(&self, name: &str, record: KeyRecord) {
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

    /// Revokes `keyid` for every replica. `keyid` may also be the SHA-256 of a keyless
    /// certificate the replicas recorded: its ephemeral key is revoked then.
    pub async fn revoke(&self, keyid: &str, reason: &str) -> Result<(), String> {
        if !is_keyid(keyid) {
            return Err(format!(
                "{keyid:?} is not a keyid or certificate SHA-256 (64 lowercase hex)"
            ));
        }
        let records: Vec<KeyRecord> = self.entries("key.").await?;
        let by_certificate = records
            .iter()
            .filter(|r| r.keyid != keyid)
            .find(|r| r.certificate.as_ref().is_some_and(|c| c.sha256 == keyid));
        let (keyid, certificate_sha256) = match by_certificate {
            Some(r) => (r.keyid.as_str(), Some(keyid.to_string())),
            None => (keyid, None),
        };
        let r = Revocation {
            keyid: keyid.into(),
            reason: if reason.is_empty() {
                "unspecified".into()
            } else {
                reason.into()
            },
            revoked_at: now(),
            certificate_sha256,
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

    /// Records the configuration's profiles (at startup).
    /// Keys the previous configuration signed with and this one does not are recorded as
    /// left (`left.<hash>`), so `keys list` can date their retirement.
    pub async fn record_profiles(&self, profiles: &ProfileTable) {
        let Ok(value) = serde_json::to_vec(profiles) else {
            return;
        };
        if let (Ok(Some(before)), Ok(assignments)) =
            (self.configured_profiles().await, self.assignments().await)
        {
            let assignments = triples(&assignments);
            let now_used = profiles.effective_key_names(&assignments);
            for name in before.effective_key_names(&assignments) {
                if now_used.contains(name) {
                    continue;
                }
                let left = Left {
                    name: name.to_string(),
                    left_at: now(),
                };
                if let Ok(v) = serde_json::to_vec(&left) {
                    // the first replica with the new configuration dates it
                    let _ = self.store.create(left_key(name), v.into()).await;
                }
            }
            // back in use: no longer left
            for name in now_used {
                if let Ok(Some(_)) = self.store.get(left_key(name)).await {
                    let _ = self.store.delete(left_key(name)).await;
                }
            }
        }
        if let Err(e) = self.store.put(CONFIG_PROFILES, value.into()).await {
            tracing::warn!(error = %e, "recording the profiles in the key bucket failed");
        }
    }

    async fn configured_profiles(&self) -> Result<Option<ProfileTable>, String> {
        let value = self
            .store
            .get(CONFIG_PROFILES)
            .await
            .map_err(|e| e.to_string())?;
        Ok(value.and_then(|v| serde_json::from_slice(&v).ok()))
    }

    /// Every runtime assignment.
    pub async fn assignments(&self) -> Result<Vec<Assignment>, String> {
        self.entries("assign.").await
    }

    /// Makes `keys` sign `profile`'s jobs at `scope`, on every replica. Each key must be one
    /// a replica has loaded and not revoked. Returns what was written.
    pub async fn rotate(
        &self,
        profile: &str,
        scope: Scope,
        keys: Vec<String>,
        reason: &str,
    ) -> Result<Assignment, String> {
        if keys.is_empty() {
            return Err("name at least one key to sign with".into());
        }
        let configured = self.configured_profiles().await?;
        if let Some(table) = &configured
            && !table.contains(profile)
        {
            return Err(format!("the replicas have no profile {profile:?}"));
        }
        let records: Vec<KeyRecord> = self.entries("key.").await?;
        let revoked = self.revocations().await?;
        for name in &keys {
            let Some(latest) = records
                .iter()
                .filter(|r| &r.name == name)
                .max_by(|a, b| a.first_seen.cmp(&b.first_seen))
            else {
                return Err(format!(
                    "no replica has loaded a key named {name:?}: configure it on every replica \
                     first (a key in no profile is loaded and waits)"
                ));
            };
            if revoked.iter().any(|r| r.keyid == latest.keyid) {
                return Err(format!("key {name:?} ({}) is revoked", latest.keyid));
            }
        }
        let existing = self
            .assignments()
            .await?
            .into_iter()
            .find(|a| a.profile == profile && a.scope == scope);
        if let Some(a) = &existing
            && a.keys == keys
        {
            // the same rotation again: keep the record of what it replaced, and when
            return Ok(a.clone());
        }
        let previous = existing
            .map(|a| a.keys)
            .or_else(|| {
                configured
                    .as_ref()
                    .and_then(|t| t.configured_at(profile, &scope))
            })
            .unwrap_or_default();
        let assignment = Assignment {
            profile: profile.to_string(),
            scope,
            keys,
            previous,
            rotated_at: now(),
            reason: reason.to_string(),
        };
        let value = serde_json::to_vec(&assignment).map_err(|e| e.to_string())?;
        self.store
            .put(
                assignment_key(&assignment.profile, &assignment.scope),
                value.into(),
            )
            .await
            .map_err(|e| e.to_string())?;
        self.set_assigned(assignment.clone());
        Ok(assignment)
    }

    /// Gives `profile`'s `scope` back to its configured keys (deletes the rotation; every
    /// replica's watch drops it). The keys the rotation had put in are recorded as left, so
    /// `keys list` dates their retirement. Returns the rotation undone.
    pub async fn restore(&self, profile: &str, scope: &Scope) -> Result<Assignment, RestoreError> {
        let Some(existing) = self
            .assignments()
            .await
            .map_err(RestoreError::Bucket)?
            .into_iter()
            .find(|a| a.profile == profile && &a.scope == scope)
        else {
            return Err(RestoreError::NoRotation {
                profile: profile.to_string(),
                scope: scope.to_string(),
            });
        };
        self.store
            .delete(assignment_key(profile, scope))
            .await
            .map_err(|e| RestoreError::Bucket(e.to_string()))?;
        self.assigned
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&(profile.to_string(), scope.clone()));
        // best effort from here: the rotation is undone; only `keys list` dating depends on it
        let assignments = triples(&self.assignments().await.unwrap_or_default());
        if let Ok(Some(table)) = self.configured_profiles().await {
            let used = table.effective_key_names(&assignments);
            for name in existing.keys.iter().filter(|n| !used.contains(n.as_str())) {
                let left = Left {
                    name: name.clone(),
                    left_at: now(),
                };
                if let Ok(v) = serde_json::to_vec(&left) {
                    let _ = self.store.put(left_key(name), v.into()).await;
                }
            }
        }
        Ok(existing)
    }

    /// Every revocation in the bucket.
    pub async fn revocations(&self) -> Result<Vec<Revocation>, String> {
        self.entries("revoked.").await
    }

    /// Revokes the keyless identity `san` of the OIDC issuer `issuer` for every replica:
    /// keyless keys whose certificate names it refuse to sign (`key_revoked`) until the
    /// entry is deleted. Returns what was written.
    pub async fn revoke_identity(
        &self,
        issuer: &str,
        san: &str,
        reason: &str,
    ) -> Result<IdentityRevocation, RevokeError> {
        if issuer.is_empty() || san.is_empty() {
            return Err(RevokeError::Invalid(
                "an identity is an OIDC issuer and a SAN, both non-empty".into(),
            ));
        }
        let r = IdentityRevocation {
            issuer: issuer.into(),
            san: san.into(),
            reason: if reason.is_empty() {
                "unspecified".into()
            } else {
                reason.into()
            },
            revoked_at: now(),
        };
        let value = serde_json::to_vec(&r).map_err(|e| RevokeError::Bucket(e.to_string()))?;
        self.store
            .put(identity_key(issuer, san), value.into())
            .await
            .map_err(|e| RevokeError::Bucket(e.to_string()))?;
        self.set_identity_revoked(r.clone());
        Ok(r)
    }

    /// Every revoked keyless identity in the bucket.
    pub async fn identity_revocations(&self) -> Result<Vec<IdentityRevocation>, String> {
        self.entries(IDENTITY_REVOKED).await
    }

    /// Every key ever loaded, with its state, for `keys list`: `revoked`, `retired` (no
    /// profile signs with it any more: rotated or configured out, or its name now loads
    /// another key), `staged` (loaded, in no profile yet) or `active`, with `validFrom` and,
    /// when it stopped signing, `validUntil`. Keyless certificates are listed too, with
    /// their identity and validity ([`keyless_entry`]).
    pub async fn list(&self) -> Result<Vec<serde_json::Value>, String> {
        let revoked: HashMap<String, Revocation> = self
            .revocations()
            .await?
            .into_iter()
            .map(|r| (r.keyid.clone(), r))
            .collect();
        let assignments = self.assignments().await?;
        let configured = self.configured_profiles().await?;
        let triples = triples(&assignments);
        let left: HashMap<String, String> = self
            .entries::<Left>("left.")
            .await?
            .into_iter()
            .map(|l| (l.name, l.left_at))
            .collect();
        let in_use = configured.as_ref().map(|t| t.effective_key_names(&triples));
        let identities: HashMap<String, IdentityRevocation> = self
            .identity_revocations()
            .await?
            .into_iter()
            .map(|r| (identity_key(&r.issuer, &r.san), r))
            .collect();
        let mut keys: Vec<KeyRecord> = self.entries("key.").await?;
        keys.sort_by(|a, b| a.first_seen.cmp(&b.first_seen).then(a.name.cmp(&b.name)));
        Ok(keys
            .iter()
            .map(|k| {
                let mut v = serde_json::to_value(k).unwrap_or_default();
                v["validFrom"] = k.first_seen.clone().into();
                let rotated_out = in_use
                    .as_ref()
                    .is_some_and(|names| !names.contains(k.name.as_str()));
                if let Some(c) = &k.certificate {
                    let identity = identities.get(&identity_key(&c.issuer, &c.san));
                    keyless_entry(&mut v, c, revoked.get(&k.keyid), identity, rotated_out);
                    return v;
                }
                // a later key loaded under the same name replaced this one
                let replaced_at = keys
                    .iter()
                    .find(|o| {
                        o.certificate.is_none() && o.name == k.name && o.first_seen > k.first_seen
                    })
                    .map(|o| o.first_seen.clone());
                if let Some(r) = revoked.get(&k.keyid) {
                    v["status"] = "revoked".into();
                    v["validUntil"] = r.revoked_at.clone().into();
                    v["revocationReason"] = r.reason.clone().into();
                } else if let Some(until) = replaced_at {
                    v["status"] = "retired".into();
                    v["validUntil"] = until.into();
                } else if rotated_out {
                    // out of use: since a rotation or a configuration took it out, or never
                    // used yet (staged, waiting to be rotated in)
                    let until = assignments
                        .iter()
                        .filter(|a| a.previous.contains(&k.name))
                        .map(|a| a.rotated_at.clone())
                        .chain(left.get(&k.name).cloned())
                        .max();
                    match until {
                        Some(until) => {
                            v["status"] = "retired".into();
                            v["validUntil"] = until.into();
                        }
                        None => v["status"] = "staged".into(),
                    }
                } else {
                    v["status"] = "active".into();
                }
                v
            })
            .collect())
    }
}

/// The `keys list` state of a keyless certificate: `revoked` (the certificate, or its
/// identity while that is revoked), `expired` (past its notAfter), `retired` (its key name
/// is in no profile any more) or `active`; valid from its notBefore until its notAfter or
/// its revocation.
fn keyless_entry(
    v: &mut serde_json::Value,
    c: &CertificateRecord,
    revoked: Option<&Revocation>,
    identity: Option<&IdentityRevocation>,
    rotated_out: bool,
) {
    v["validFrom"] = c.not_before.clone().into();
    v["validUntil"] = c.not_after.clone().into();
    let expired =
        humantime::parse_rfc3339(&c.not_after).is_ok_and(|t| t < std::time::SystemTime::now());
    if let Some(r) = revoked {
        v["status"] = "revoked".into();
        v["validUntil"] = r.revoked_at.clone().min(c.not_after.clone()).into();
        v["revocationReason"] = r.reason.clone().into();
    } else if let Some(r) = identity {
        v["status"] = "revoked".into();
        v["validUntil"] = r.revoked_at.clone().min(c.not_after.clone()).into();
        v["revocationReason"] = format!("identity revoked: {}", r.reason).into();
    } else if expired {
        v["status"] = "expired".into();
    } else if rotated_out {
        v["status"] = "retired".into();
    } else {
        v["status"] = "active".into();
    }
}

#[async_trait::async_trait]
impl crate::keys::keyless::KeylessLedger for KeyLedger {
    async fn record_certificate(
        &self,
        name: &str,
        identity: &SignerIdentity,
        leaf: &crate::keys::fulcio_trust::VerifiedLeaf,
    ) {
        KeyLedger::record_certificate(self, name, identity, leaf).await;
    }

    fn certificate_revoked(&self, keyid: &str) -> Option<String> {
        self.revoked(keyid)
    }

    fn identity_revoked(&self, issuer: &str, san: &str) -> Option<String> {
        self.revoked_identities
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&identity_key(issuer, san))
            .map(|r| r.reason.clone())
    }
}

impl KeyAssignments for KeyLedger {
    fn assigned(&self, profile: &str, scope: &Scope) -> Option<Vec<String>> {
        let assigned = self.assigned.read().unwrap_or_else(|p| p.into_inner());
        // asked for every job: without rotations, no lookup key is built
        if assigned.is_empty() {
            return None;
        }
        assigned.get(&(profile.to_string(), scope.clone())).cloned()
    }
}

impl RevocationList for KeyLedger {
    fn revoked(&self, keyid: &str) -> Option<String> {
        self.revoked
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(keyid)
            .cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn certificate(not_after: &str) -> CertificateRecord {
        CertificateRecord {
            sha256: "ab".repeat(32),
            issuer: "https://issuer".into(),
            san: "https://ci/release".into(),
            not_before: "2026-01-01T00:00:00Z".into(),
            not_after: not_after.into(),
        }
    }

    fn entry(
        c: &CertificateRecord,
        revoked: Option<&Revocation>,
        identity: Option<&IdentityRevocation>,
        rotated_out: bool,
    ) -> serde_json::Value {
        let mut v = serde_json::json!({});
        keyless_entry(&mut v, c, revoked, identity, rotated_out);
        v
    }

    #[test]
    fn keyless_certificates_are_listed_with_their_validity_and_revocations() {
        let live = certificate("2999-01-01T00:00:00Z");
        let v = entry(&live, None, None, false);
        assert_eq!(v["status"], "active");
        assert_eq!(v["validFrom"], "2026-01-01T00:00:00Z");
        assert_eq!(v["validUntil"], "2999-01-01T00:00:00Z");
        assert_eq!(entry(&live, None, None, true)["status"], "retired");
        let gone = certificate("2026-01-01T00:10:00Z");
        assert_eq!(entry(&gone, None, None, false)["status"], "expired");

        let revocation = Revocation {
            keyid: "k".into(),
            reason: "leaked".into(),
            revoked_at: "2026-06-01T00:00:00.000Z".into(),
            certificate_sha256: Some(live.sha256.clone()),
        };
        let v = entry(&live, Some(&revocation), None, false);
        assert_eq!(v["status"], "revoked");
        assert_eq!(v["validUntil"], "2026-06-01T00:00:00.000Z");
        assert_eq!(v["revocationReason"], "leaked");
        // revoked after it expired: valid until its notAfter
        assert_eq!(
            entry(&gone, Some(&revocation), None, false)["validUntil"],
            "2026-01-01T00:10:00Z"
        );
        let identity = IdentityRevocation {
            issuer: live.issuer.clone(),
            san: live.san.clone(),
            reason: "workflow compromised".into(),
            revoked_at: "2026-06-01T00:00:00.000Z".into(),
        };
        let v = entry(&live, None, Some(&identity), false);
        assert_eq!(v["status"], "revoked");
        assert_eq!(
            v["revocationReason"],
            "identity revoked: workflow compromised"
        );
    }

    #[test]
    fn identity_entries_are_valid_bucket_keys_distinct_per_identity() {
        let a = identity_key("https://issuer", "https://ci/a");
        assert!(a.starts_with(IDENTITY_REVOKED) && a.len() == IDENTITY_REVOKED.len() + 32);
        assert!(
            a.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
        );
        assert_ne!(a, identity_key("https://issuer", "https://ci/b"));
        // the pair is hashed as a pair: no ambiguity from concatenation
        assert_ne!(identity_key("ab", "c"), identity_key("a", "bc"));
        assert!(!a.starts_with("revoked."), "not read as a key revocation");
    }
}
