//! This replica's view of the bucket, and the watch that keeps it current: what the pipeline
//! asks on every job (is this keyid revoked, is this keyless identity, which keys does this
//! scope sign with now) is answered from memory, and the watch applies every put and delete of
//! a `revoked.`, `identity-revoked.` or `assign.` entry to it as the entry arrives.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_nats::jetstream::kv;
use futures::StreamExt as _;
use signer_actors::profiles::Scope;

use super::KeyLedger;
use super::schema::{
    Assignment, EntryKind, IdentityRevocation, Revocation, assignment_key, decode, identity_key,
};

/// What happened to an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Change<'a> {
    /// Written with this value.
    Put(&'a [u8]),
    /// Deleted or purged.
    Removed,
}

impl<'a> Change<'a> {
    fn of(entry: &'a kv::Entry) -> Self {
        match entry.operation {
            kv::Operation::Put => Change::Put(&entry.value),
            kv::Operation::Delete | kv::Operation::Purge => Change::Removed,
        }
    }
}

/// The revocations and assignments this replica knows of.
#[derive(Debug, Default)]
pub(super) struct View {
    /// Revoked keyids, with the reason.
    revoked: RwLock<HashMap<String, String>>,
    /// Revoked keyless identities, by bucket key.
    revoked_identities: RwLock<HashMap<String, IdentityRevocation>>,
    /// (profile, scope) to the keys assigned to it.
    assigned: RwLock<HashMap<(String, Scope), Vec<String>>>,
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|p| p.into_inner())
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(|p| p.into_inner())
}

impl View {
    pub(super) fn set_revoked(&self, keyid: String, reason: String) {
        write(&self.revoked).insert(keyid, reason);
    }

    pub(super) fn set_identity_revoked(&self, r: IdentityRevocation) {
        write(&self.revoked_identities).insert(identity_key(&r.issuer, &r.san), r);
    }

    pub(super) fn set_assigned(&self, a: Assignment) {
        write(&self.assigned).insert((a.profile, a.scope), a.keys);
    }

    pub(super) fn remove_assigned(&self, profile: &str, scope: &Scope) {
        write(&self.assigned).remove(&(profile.to_string(), scope.clone()));
    }

    /// Why `keyid` is revoked, if it is.
    pub(super) fn revoked(&self, keyid: &str) -> Option<String> {
        read(&self.revoked).get(keyid).cloned()
    }

    /// Why the keyless identity is revoked, if it is.
    pub(super) fn identity_revoked(&self, issuer: &str, san: &str) -> Option<String> {
        read(&self.revoked_identities)
            .get(&identity_key(issuer, san))
            .map(|r| r.reason.clone())
    }

    /// The keys assigned to `profile` at `scope`, if any.
    pub(super) fn assigned(&self, profile: &str, scope: &Scope) -> Option<Vec<String>> {
        let assigned = read(&self.assigned);
        // asked for every job: without rotations, no lookup key is built
        if assigned.is_empty() {
            return None;
        }
        assigned.get(&(profile.to_string(), scope.clone())).cloned()
    }

    /// Applies a change of the entry `key`. A revocation whose value cannot be read still
    /// revokes (reason `revoked`); an unreadable identity revocation or assignment changes
    /// nothing (and is logged). Entries of other kinds are not part of the view.
    pub(super) fn apply(&self, key: &str, change: Change<'_>) {
        match EntryKind::of(key) {
            EntryKind::Revoked(keyid) => self.apply_revocation(keyid, change),
            EntryKind::IdentityRevoked => self.apply_identity_revocation(key, change),
            EntryKind::Assignment => self.apply_assignment(key, change),
            _ => {}
        }
    }

    fn apply_revocation(&self, keyid: &str, change: Change<'_>) {
        match change {
            Change::Put(value) => {
                let reason = decode::<Revocation>(value)
                    .map(|r| r.reason)
                    .unwrap_or_else(|_| "revoked".into());
                tracing::warn!(keyid, %reason, "key revoked: it signs nothing more");
                self.set_revoked(keyid.to_string(), reason);
            }
            Change::Removed => {
                write(&self.revoked).remove(keyid);
            }
        }
    }

    fn apply_identity_revocation(&self, key: &str, change: Change<'_>) {
        match change {
            Change::Put(value) => match decode::<IdentityRevocation>(value) {
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
                    tracing::warn!(key, error = %e, "unreadable identity revocation")
                }
            },
            Change::Removed => {
                write(&self.revoked_identities).remove(key);
            }
        }
    }

    fn apply_assignment(&self, key: &str, change: Change<'_>) {
        match change {
            Change::Put(value) => match decode::<Assignment>(value) {
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
                Err(e) => tracing::warn!(key, error = %e, "unreadable key assignment"),
            },
            // A deleted assignment gives the scope back to the configuration.
            Change::Removed => {
                write(&self.assigned).retain(|(p, s), _| assignment_key(p, s) != key);
            }
        }
    }
}

impl KeyLedger {
    /// Follows revocations and assignments as they are written, for as long as the
    /// process runs (from the bucket's history first, so nothing written before is missed).
    /// A broken watch is opened again after 1 s.
    pub fn watch(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let ledger = self.clone();
        tokio::spawn(async move {
            loop {
                match ledger.store.watch_with_history(">").await {
                    Ok(mut entries) => {
                        while let Some(entry) = entries.next().await {
                            let Ok(entry) = entry else { break };
                            ledger.view.apply(&entry.key, Change::of(&entry));
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
}

#[cfg(test)]
mod tests {
    use super::super::schema::{encode, key_key, revoked_key};
    use super::*;

    fn revocation(keyid: &str, reason: &str) -> Vec<u8> {
        encode(
            "revocation",
            &Revocation {
                keyid: keyid.into(),
                reason: reason.into(),
                revoked_at: "t".into(),
                certificate_sha256: None,
            },
        )
        .unwrap()
    }

    fn assignment(profile: &str, scope: Scope, keys: &[&str]) -> Assignment {
        Assignment {
            profile: profile.into(),
            scope,
            keys: keys.iter().map(|k| k.to_string()).collect(),
            previous: vec![],
            rotated_at: "t".into(),
            reason: String::new(),
        }
    }

    #[test]
    fn revocations_arrive_and_leave() {
        let view = View::default();
        let k = "ab".repeat(32);
        assert_eq!(view.revoked(&k), None);
        view.apply(&revoked_key(&k), Change::Put(&revocation(&k, "leaked")));
        assert_eq!(view.revoked(&k).as_deref(), Some("leaked"));
        assert_eq!(view.revoked(&"cd".repeat(32)), None, "only that key");
        view.apply(&revoked_key(&k), Change::Removed);
        assert_eq!(view.revoked(&k), None, "a deleted revocation is lifted");
        // an unreadable value still revokes: failing open here would let a revoked key sign
        view.apply(&revoked_key(&k), Change::Put(b"{garbled"));
        assert_eq!(view.revoked(&k).as_deref(), Some("revoked"));
    }

    #[test]
    fn identity_revocations_arrive_and_leave() {
        let view = View::default();
        let r = IdentityRevocation {
            issuer: "https://issuer".into(),
            san: "https://ci/release".into(),
            reason: "workflow compromised".into(),
            revoked_at: "t".into(),
        };
        let key = identity_key(&r.issuer, &r.san);
        view.apply(&key, Change::Put(&encode("identity", &r).unwrap()));
        assert_eq!(
            view.identity_revoked(&r.issuer, &r.san).as_deref(),
            Some("workflow compromised")
        );
        assert_eq!(view.identity_revoked(&r.issuer, "https://ci/other"), None);
        view.apply(&key, Change::Put(b"[]"));
        assert!(
            view.identity_revoked(&r.issuer, &r.san).is_some(),
            "an unreadable put changes nothing"
        );
        view.apply(&key, Change::Removed);
        assert_eq!(view.identity_revoked(&r.issuer, &r.san), None);
    }

    #[test]
    fn assignments_replace_and_restore_by_scope() {
        let view = View::default();
        let tenant = Scope::Tenant("acme".into());
        assert_eq!(view.assigned("p", &Scope::Profile), None);
        let a = assignment("p", tenant.clone(), &["k2", "k3"]);
        let key = assignment_key("p", &tenant);
        view.apply(&key, Change::Put(&encode("assignment", &a).unwrap()));
        assert_eq!(
            view.assigned("p", &tenant),
            Some(vec!["k2".to_string(), "k3".to_string()])
        );
        assert_eq!(
            view.assigned("p", &Scope::Profile),
            None,
            "other scopes keep theirs"
        );
        assert_eq!(view.assigned("q", &tenant), None, "other profiles too");
        let b = assignment("p", tenant.clone(), &["k4"]);
        view.apply(&key, Change::Put(&encode("assignment", &b).unwrap()));
        assert_eq!(view.assigned("p", &tenant), Some(vec!["k4".to_string()]));
        view.apply(&key, Change::Put(b"\"nope\""));
        assert_eq!(
            view.assigned("p", &tenant),
            Some(vec!["k4".to_string()]),
            "an unreadable put changes nothing"
        );
        view.apply(&key, Change::Removed);
        assert_eq!(
            view.assigned("p", &tenant),
            None,
            "back to the configuration"
        );
    }

    #[test]
    fn other_entries_are_not_part_of_the_view() {
        let view = View::default();
        let k = "ab".repeat(32);
        view.apply(&key_key(&k), Change::Put(&revocation(&k, "x")));
        view.apply("config.profiles", Change::Put(b"{}"));
        assert_eq!(view.revoked(&k), None);
        assert_eq!(view.assigned("p", &Scope::Profile), None);
    }
}
