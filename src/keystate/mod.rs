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
//!   active key from a retired one;
//! - `left.<hash>`: when a key name stopped being used (configured out, or a rotation of it
//!   undone), so `keys list` can date its retirement.
//!
//! Only the signers write the bucket: `revoke`, `rotate` and `restore` arrive as operator-signed
//! commands on `signer.control.keys` (see [`crate::control`]), which one replica applies here.
//! `stella-signer keys list` reads it.
//!
//! [`KeyLedger`] is the bucket and this replica's view of it. By file:
//! - [`schema`]: the entries, their bucket keys, their JSON;
//! - `watch.rs`: the view the pipeline asks on every job, and the watch that keeps it current;
//! - `control.rs`: what the control commands change, and the checks they pass first;
//! - `ops.rs`: what replicas record as they start and load keys, and `keys list`.
//!
//! Errors are [`KeyStateError`]: a command that cannot be applied as it is
//! ([`InvalidCommand`], permanent) or a bucket that did not answer (transient).

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use futures::StreamExt as _;
use signer_actors::keys::SignerIdentity;
use signer_actors::ports::{PortErrorKind, RevocationList};
use signer_actors::profiles::{KeyAssignments, ProfileTable, Scope};

use crate::jetstream::NatsError;

mod control;
mod ops;
pub mod schema;
mod watch;

pub use schema::{Assignment, IdentityRevocation, Revocation};

/// Why a command cannot be applied as it is: the operator must change it, and sending it again
/// gives the same answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidCommand {
    #[error("{given:?} is not a keyid or certificate SHA-256 (64 lowercase hex)")]
    NotAKeyid { given: String },
    #[error("an identity is an OIDC issuer and a SAN, both non-empty")]
    EmptyIdentity,
    #[error("name at least one key to sign with")]
    NoKeys,
    #[error("the replicas have no profile {profile:?}")]
    UnknownProfile { profile: String },
    #[error(
        "no replica has loaded a key named {name:?}: configure it on every replica first (a key in no profile is loaded and waits)"
    )]
    KeyNotLoaded { name: String },
    #[error("key {name:?} ({keyid}) is revoked")]
    KeyRevoked { name: String, keyid: String },
    /// `restore` of a scope that signs with its configured keys already.
    #[error(
        "profile {profile:?} ({scope}) has no rotation to undo: it signs with its configured keys"
    )]
    NoRotation { profile: String, scope: String },
}

/// Why the key ledger did not do what was asked. [`KeyStateError::kind`] says whether trying
/// again can help: the control server answers `invalid_command` for a permanent error and
/// `unavailable` for a transient one.
#[derive(Debug, thiserror::Error)]
pub enum KeyStateError {
    /// The command cannot be applied as it is (permanent).
    #[error(transparent)]
    Invalid(#[from] InvalidCommand),
    /// The bucket could not be read or written (transient: NATS may answer next time).
    #[error("key bucket: {doing}: {source}")]
    Bucket {
        doing: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A value could not be written as JSON (permanent).
    #[error("key bucket: encoding the {what}: {source}")]
    Encode {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
}

impl KeyStateError {
    /// A bucket failure while `doing` something.
    pub fn bucket(
        doing: &'static str,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        KeyStateError::Bucket {
            doing,
            source: source.into(),
        }
    }

    pub fn kind(&self) -> PortErrorKind {
        match self {
            KeyStateError::Bucket { .. } => PortErrorKind::Transient,
            KeyStateError::Invalid(_) | KeyStateError::Encode { .. } => PortErrorKind::Permanent,
        }
    }

    pub fn is_transient(&self) -> bool {
        self.kind() == PortErrorKind::Transient
    }
}

/// The key ledger: the `SIGNER_KEYS` bucket, and this replica's view of the revocations and
/// assignments in it (`watch.rs`).
pub struct KeyLedger {
    store: kv::Store,
    view: watch::View,
}

impl KeyLedger {
    /// Opens the bucket and loads the current revocations and assignments (without
    /// watching: [`KeyLedger::watch`]).
    pub async fn open(js: &jetstream::Context, bucket: &str) -> Result<Arc<Self>, NatsError> {
        let store = crate::jetstream::open_bucket(js, bucket, Duration::ZERO).await?;
        let ledger = Arc::new(KeyLedger {
            store,
            view: watch::View::default(),
        });
        let failed = |e: KeyStateError| NatsError::Bucket {
            bucket: bucket.into(),
            reason: e.to_string(),
        };
        for r in ledger.revocations().await.map_err(failed)? {
            ledger.view.set_revoked(r.keyid, r.reason);
        }
        for a in ledger.assignments().await.map_err(failed)? {
            ledger.view.set_assigned(a);
        }
        for r in ledger.identity_revocations().await.map_err(failed)? {
            ledger.view.set_identity_revoked(r);
        }
        Ok(ledger)
    }

    /// The values of every entry whose key starts with `prefix` (values that do not read as
    /// `T` are skipped).
    async fn entries<T: serde::de::DeserializeOwned>(
        &self,
        prefix: &str,
    ) -> Result<Vec<T>, KeyStateError> {
        let mut keys = self
            .store
            .keys()
            .await
            .map_err(|e| KeyStateError::bucket("listing the keys", e))?;
        let mut out = Vec::new();
        while let Some(key) = keys.next().await {
            let key = key.map_err(|e| KeyStateError::bucket("listing the keys", e))?;
            if !key.starts_with(prefix) {
                continue;
            }
            if let Some(value) = self
                .store
                .get(&key)
                .await
                .map_err(|e| KeyStateError::bucket("reading an entry", e))?
                && let Ok(v) = schema::decode(&value)
            {
                out.push(v);
            }
        }
        Ok(out)
    }

    /// Every revocation in the bucket.
    pub async fn revocations(&self) -> Result<Vec<Revocation>, KeyStateError> {
        self.entries(schema::REVOKED).await
    }

    /// Every revoked keyless identity in the bucket.
    pub async fn identity_revocations(&self) -> Result<Vec<IdentityRevocation>, KeyStateError> {
        self.entries(schema::IDENTITY_REVOKED).await
    }

    /// Every runtime assignment.
    pub async fn assignments(&self) -> Result<Vec<Assignment>, KeyStateError> {
        self.entries(schema::ASSIGN).await
    }

    /// The profiles the last replica to start recorded (`None`: none yet, or unreadable).
    async fn configured_profiles(&self) -> Result<Option<ProfileTable>, KeyStateError> {
        let value = self
            .store
            .get(schema::CONFIG_PROFILES)
            .await
            .map_err(|e| KeyStateError::bucket("reading the profiles", e))?;
        Ok(value.and_then(|v| schema::decode(&v).ok()))
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
        self.view.revoked(keyid)
    }

    fn identity_revoked(&self, issuer: &str, san: &str) -> Option<String> {
        self.view.identity_revoked(issuer, san)
    }
}

impl KeyAssignments for KeyLedger {
    fn assigned(&self, profile: &str, scope: &Scope) -> Option<Vec<String>> {
        self.view.assigned(profile, scope)
    }
}

impl RevocationList for KeyLedger {
    fn revoked(&self, keyid: &str) -> Option<String> {
        self.view.revoked(keyid)
    }
}
