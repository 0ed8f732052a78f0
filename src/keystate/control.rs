//! What the key control commands change (`revoke`, `revoke-identity`, `rotate`, `restore`,
//! which `crate::control::server` applies once a command is authorised and audited): each
//! command is checked against what the bucket holds ([`InvalidCommand`] when it names
//! nothing it can apply), then written, and this replica's view updated at once (the others
//! follow through their watch).

use signer_actors::profiles::{ProfileTable, Scope};

use super::schema::{
    Assignment, IdentityRevocation, KeyRecord, Left, Revocation, assignment_key, encode,
    identity_key, is_keyid, left_key, now, reason_or_unspecified, revoked_key, triples,
};
use super::{InvalidCommand, KeyLedger, KeyStateError};

/// The revocation `revoke` writes for `keyid`, which may be a keyid or the SHA-256 of a
/// keyless certificate one of `records` carries (its ephemeral key is revoked then).
fn revocation(
    keyid: &str,
    reason: &str,
    records: &[KeyRecord],
) -> Result<Revocation, InvalidCommand> {
    if !is_keyid(keyid) {
        return Err(InvalidCommand::NotAKeyid {
            given: keyid.to_string(),
        });
    }
    let by_certificate = records
        .iter()
        .filter(|r| r.keyid != keyid)
        .find(|r| r.certificate.as_ref().is_some_and(|c| c.sha256 == keyid));
    let (keyid, certificate_sha256) = match by_certificate {
        Some(r) => (r.keyid.as_str(), Some(keyid.to_string())),
        None => (keyid, None),
    };
    Ok(Revocation {
        keyid: keyid.into(),
        reason: reason_or_unspecified(reason),
        revoked_at: now(),
        certificate_sha256,
    })
}

/// The revocation `revoke_identity` writes.
fn identity_revocation(
    issuer: &str,
    san: &str,
    reason: &str,
) -> Result<IdentityRevocation, InvalidCommand> {
    if issuer.is_empty() || san.is_empty() {
        return Err(InvalidCommand::EmptyIdentity);
    }
    Ok(IdentityRevocation {
        issuer: issuer.into(),
        san: san.into(),
        reason: reason_or_unspecified(reason),
        revoked_at: now(),
    })
}

/// What the bucket holds that a rotation is checked against.
struct RotationContext<'a> {
    /// The configuration's profiles, if a replica recorded them.
    configured: Option<&'a ProfileTable>,
    records: &'a [KeyRecord],
    revoked: &'a [Revocation],
    /// The scope's current rotation, if any.
    existing: Option<Assignment>,
}

/// What `rotate` does.
#[derive(Debug, PartialEq, Eq)]
enum Rotation {
    /// The same rotation again: the existing one is kept (with the record of what it
    /// replaced, and when).
    Unchanged(Assignment),
    /// A new assignment to write.
    New(Assignment),
}

/// Checks a rotation of `profile`'s `scope` to `keys`: at least one key; a profile the
/// replicas know (when they recorded their profiles); each key loaded by some replica, and
/// the latest key loaded under that name not revoked.
fn rotation(
    profile: &str,
    scope: Scope,
    keys: Vec<String>,
    reason: &str,
    bucket: RotationContext<'_>,
) -> Result<Rotation, InvalidCommand> {
    if keys.is_empty() {
        return Err(InvalidCommand::NoKeys);
    }
    if let Some(table) = bucket.configured
        && !table.contains(profile)
    {
        return Err(InvalidCommand::UnknownProfile {
            profile: profile.to_string(),
        });
    }
    for name in &keys {
        let Some(latest) = bucket
            .records
            .iter()
            .filter(|r| &r.name == name)
            .max_by(|a, b| a.first_seen.cmp(&b.first_seen))
        else {
            return Err(InvalidCommand::KeyNotLoaded { name: name.clone() });
        };
        if bucket.revoked.iter().any(|r| r.keyid == latest.keyid) {
            return Err(InvalidCommand::KeyRevoked {
                name: name.clone(),
                keyid: latest.keyid.clone(),
            });
        }
    }
    if let Some(a) = &bucket.existing
        && a.keys == keys
    {
        return Ok(Rotation::Unchanged(a.clone()));
    }
    let previous = bucket
        .existing
        .map(|a| a.keys)
        .or_else(|| {
            bucket
                .configured
                .and_then(|t| t.configured_at(profile, &scope))
        })
        .unwrap_or_default();
    Ok(Rotation::New(Assignment {
        profile: profile.to_string(),
        scope,
        keys,
        previous,
        rotated_at: now(),
        reason: reason.to_string(),
    }))
}

/// The keys of an undone rotation that no profile signs with any more, given the
/// configuration and the rotations that remain: they are recorded as left.
fn left_after_restore(
    undone: &Assignment,
    table: &ProfileTable,
    remaining: &[Assignment],
) -> Vec<String> {
    let remaining = triples(remaining);
    let used = table.effective_key_names(&remaining);
    undone
        .keys
        .iter()
        .filter(|n| !used.contains(n.as_str()))
        .cloned()
        .collect()
}

impl KeyLedger {
    /// Revokes `keyid` for every replica. `keyid` may also be the SHA-256 of a keyless
    /// certificate the replicas recorded: its ephemeral key is revoked then.
    pub async fn revoke(&self, keyid: &str, reason: &str) -> Result<(), KeyStateError> {
        if !is_keyid(keyid) {
            return Err(InvalidCommand::NotAKeyid {
                given: keyid.to_string(),
            }
            .into());
        }
        let records: Vec<KeyRecord> = self.entries(super::schema::KEY).await?;
        let r = revocation(keyid, reason, &records)?;
        let value = encode("revocation", &r)?;
        self.store
            .put(revoked_key(&r.keyid), value.into())
            .await
            .map_err(|e| KeyStateError::bucket("writing the revocation", e))?;
        self.view.set_revoked(r.keyid, r.reason);
        Ok(())
    }

    /// Revokes the keyless identity `san` of the OIDC issuer `issuer` for every replica:
    /// keyless keys whose certificate names it refuse to sign (`key_revoked`) until the
    /// entry is deleted. Returns what was written.
    pub async fn revoke_identity(
        &self,
        issuer: &str,
        san: &str,
        reason: &str,
    ) -> Result<IdentityRevocation, KeyStateError> {
        let r = identity_revocation(issuer, san, reason)?;
        let value = encode("identity revocation", &r)?;
        self.store
            .put(identity_key(issuer, san), value.into())
            .await
            .map_err(|e| KeyStateError::bucket("writing the identity revocation", e))?;
        self.view.set_identity_revoked(r.clone());
        Ok(r)
    }

    /// Makes `keys` sign `profile`'s jobs at `scope`, on every replica. Each key must be one
    /// a replica has loaded and not revoked. Returns what was written (or, for the same
    /// rotation again, what was written the first time).
    pub async fn rotate(
        &self,
        profile: &str,
        scope: Scope,
        keys: Vec<String>,
        reason: &str,
    ) -> Result<Assignment, KeyStateError> {
        if keys.is_empty() {
            return Err(InvalidCommand::NoKeys.into());
        }
        let configured = self.configured_profiles().await?;
        let records: Vec<KeyRecord> = self.entries(super::schema::KEY).await?;
        let revoked = self.revocations().await?;
        let existing = self
            .assignments()
            .await?
            .into_iter()
            .find(|a| a.profile == profile && a.scope == scope);
        let context = RotationContext {
            configured: configured.as_ref(),
            records: &records,
            revoked: &revoked,
            existing,
        };
        let assignment = match rotation(profile, scope, keys, reason, context)? {
            Rotation::Unchanged(a) => return Ok(a),
            Rotation::New(a) => a,
        };
        let value = encode("assignment", &assignment)?;
        self.store
            .put(
                assignment_key(&assignment.profile, &assignment.scope),
                value.into(),
            )
            .await
            .map_err(|e| KeyStateError::bucket("writing the assignment", e))?;
        self.view.set_assigned(assignment.clone());
        Ok(assignment)
    }

    /// Gives `profile`'s `scope` back to its configured keys (deletes the rotation; every
    /// replica's watch drops it). The keys the rotation had put in are recorded as left, so
    /// `keys list` dates their retirement. Returns the rotation undone.
    pub async fn restore(&self, profile: &str, scope: &Scope) -> Result<Assignment, KeyStateError> {
        let Some(existing) = self
            .assignments()
            .await?
            .into_iter()
            .find(|a| a.profile == profile && &a.scope == scope)
        else {
            return Err(InvalidCommand::NoRotation {
                profile: profile.to_string(),
                scope: scope.to_string(),
            }
            .into());
        };
        self.store
            .delete(assignment_key(profile, scope))
            .await
            .map_err(|e| KeyStateError::bucket("deleting the assignment", e))?;
        self.view.remove_assigned(profile, scope);
        // best effort from here: the rotation is undone; only `keys list` dating depends on it
        let remaining = self.assignments().await.unwrap_or_default();
        if let Ok(Some(table)) = self.configured_profiles().await {
            for name in left_after_restore(&existing, &table, &remaining) {
                let left = Left {
                    name: name.clone(),
                    left_at: now(),
                };
                if let Ok(v) = encode("left", &left) {
                    let _ = self.store.put(left_key(&name), v.into()).await;
                }
            }
        }
        Ok(existing)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use signer_actors::profiles::ProfileKeys;

    use super::super::schema::CertificateRecord;
    use super::*;

    fn record(name: &str, keyid: &str, first_seen: &str) -> KeyRecord {
        KeyRecord {
            keyid: keyid.into(),
            name: name.into(),
            algorithm: "ed25519".into(),
            source: "file".into(),
            public_key: "PEM".into(),
            certificate_chain: vec![],
            first_seen: first_seen.into(),
            certificate: None,
        }
    }

    fn revoked(keyid: &str) -> Revocation {
        Revocation {
            keyid: keyid.into(),
            reason: "r".into(),
            revoked_at: "t".into(),
            certificate_sha256: None,
        }
    }

    fn table() -> ProfileTable {
        let mut tenants = HashMap::new();
        tenants.insert("acme".to_string(), vec!["k-acme".to_string()]);
        let mut profiles = HashMap::new();
        profiles.insert(
            "release".to_string(),
            ProfileKeys {
                keys: vec!["k1".into()],
                tenants,
                ..Default::default()
            },
        );
        ProfileTable::new(profiles)
    }

    fn keys(names: &[&str]) -> Vec<String> {
        names.iter().map(|n| n.to_string()).collect()
    }

    fn context<'a>(
        configured: Option<&'a ProfileTable>,
        records: &'a [KeyRecord],
        revoked: &'a [Revocation],
        existing: Option<Assignment>,
    ) -> RotationContext<'a> {
        RotationContext {
            configured,
            records,
            revoked,
            existing,
        }
    }

    #[test]
    fn a_revocation_names_a_keyid_or_a_certificate() {
        let k = "aa".repeat(32);
        let cert = "cc".repeat(32);
        assert_eq!(
            revocation("not-hex", "r", &[]),
            Err(InvalidCommand::NotAKeyid {
                given: "not-hex".into()
            })
        );
        assert!(revocation(&k.to_uppercase(), "r", &[]).is_err());
        let r = revocation(&k, "", &[]).unwrap();
        assert_eq!(
            (r.keyid.as_str(), r.reason.as_str()),
            (k.as_str(), "unspecified")
        );
        assert_eq!(r.certificate_sha256, None);
        // a keyless key's certificate: its ephemeral key is revoked, the certificate noted
        let ephemeral = KeyRecord {
            certificate: Some(CertificateRecord {
                sha256: cert.clone(),
                issuer: "i".into(),
                san: "s".into(),
                not_before: "a".into(),
                not_after: "b".into(),
            }),
            ..record("keyless", &k, "t")
        };
        let r = revocation(&cert, "leaked", std::slice::from_ref(&ephemeral)).unwrap();
        assert_eq!(r.keyid, k);
        assert_eq!(r.certificate_sha256.as_deref(), Some(cert.as_str()));
        assert_eq!(r.reason, "leaked");
        // an unknown keyid is revoked as given (a key that may be loaded later)
        let unknown = "dd".repeat(32);
        assert_eq!(
            revocation(&unknown, "r", &[ephemeral]).unwrap().keyid,
            unknown
        );
    }

    #[test]
    fn an_identity_revocation_needs_issuer_and_san() {
        assert_eq!(
            identity_revocation("", "s", "r"),
            Err(InvalidCommand::EmptyIdentity)
        );
        assert_eq!(
            identity_revocation("i", "", "r"),
            Err(InvalidCommand::EmptyIdentity)
        );
        let r = identity_revocation("https://issuer", "https://ci", "").unwrap();
        assert_eq!(r.reason, "unspecified");
        assert_eq!(r.san, "https://ci");
    }

    #[test]
    fn a_rotation_is_checked_against_the_bucket() {
        let t = table();
        let k2 = "22".repeat(32);
        let records = [
            record("k2", &"02".repeat(32), "2026-01-01T00:00:00.000Z"),
            record("k2", &k2, "2026-02-01T00:00:00.000Z"),
        ];
        let tenant = Scope::Tenant("acme".into());
        let rotate = |profile: &str, names: &[&str], revoked: &[Revocation]| {
            rotation(
                profile,
                tenant.clone(),
                keys(names),
                "why",
                context(Some(&t), &records, revoked, None),
            )
        };
        assert_eq!(rotate("release", &[], &[]), Err(InvalidCommand::NoKeys));
        assert_eq!(
            rotate("nope", &["k2"], &[]),
            Err(InvalidCommand::UnknownProfile {
                profile: "nope".into()
            })
        );
        assert_eq!(
            rotate("release", &["k2", "k9"], &[]),
            Err(InvalidCommand::KeyNotLoaded { name: "k9".into() })
        );
        // the latest key loaded under the name counts
        assert_eq!(
            rotate("release", &["k2"], &[revoked(&k2)]),
            Err(InvalidCommand::KeyRevoked {
                name: "k2".into(),
                keyid: k2.clone()
            })
        );
        let Ok(Rotation::New(a)) = rotate("release", &["k2"], &[revoked(&"02".repeat(32))]) else {
            panic!("an older key of the name being revoked does not matter");
        };
        assert_eq!(a.keys, keys(&["k2"]));
        assert_eq!(a.previous, keys(&["k-acme"]), "what the configuration had");
        assert_eq!((a.scope, a.reason.as_str()), (tenant.clone(), "why"));
        // no profiles recorded yet: any profile, nothing known to have been replaced
        let Ok(Rotation::New(a)) = rotation(
            "other",
            Scope::Profile,
            keys(&["k2"]),
            "",
            context(None, &records, &[], None),
        ) else {
            panic!("accepted without recorded profiles");
        };
        assert!(a.previous.is_empty());
    }

    #[test]
    fn a_rotation_over_a_rotation_replaces_it_and_the_same_one_is_kept() {
        let t = table();
        let records = [
            record("k2", &"22".repeat(32), "t"),
            record("k3", &"33".repeat(32), "t"),
        ];
        let existing = Assignment {
            profile: "release".into(),
            scope: Scope::Profile,
            keys: keys(&["k2"]),
            previous: keys(&["k1"]),
            rotated_at: "earlier".into(),
            reason: "first".into(),
        };
        let again = rotation(
            "release",
            Scope::Profile,
            keys(&["k2"]),
            "second",
            context(Some(&t), &records, &[], Some(existing.clone())),
        );
        assert_eq!(again, Ok(Rotation::Unchanged(existing.clone())));
        let Ok(Rotation::New(a)) = rotation(
            "release",
            Scope::Profile,
            keys(&["k3", "k2"]),
            "third",
            context(Some(&t), &records, &[], Some(existing)),
        ) else {
            panic!("a different rotation is written");
        };
        assert_eq!(a.previous, keys(&["k2"]), "what the earlier rotation had");
        assert_eq!(a.keys, keys(&["k3", "k2"]), "signature order kept");
    }

    #[test]
    fn a_restore_retires_only_keys_nothing_else_uses() {
        let t = table();
        let undone = Assignment {
            profile: "release".into(),
            scope: Scope::Profile,
            keys: keys(&["k2", "k-acme", "k3"]),
            previous: keys(&["k1"]),
            rotated_at: "t".into(),
            reason: String::new(),
        };
        let other = Assignment {
            scope: Scope::Plan("gold".into()),
            keys: keys(&["k3"]),
            ..undone.clone()
        };
        // k-acme is still configured for a tenant, k3 still assigned to a plan
        assert_eq!(left_after_restore(&undone, &t, &[other]), keys(&["k2"]));
        assert_eq!(left_after_restore(&undone, &t, &[]), keys(&["k2", "k3"]));
    }

    #[test]
    fn invalid_commands_are_permanent_and_bucket_failures_transient() {
        use signer_actors::ports::PortErrorKind;
        let invalid = KeyStateError::from(InvalidCommand::NoKeys);
        assert_eq!(invalid.kind(), PortErrorKind::Permanent);
        assert_eq!(invalid.to_string(), "name at least one key to sign with");
        let down = KeyStateError::bucket("reading", std::io::Error::other("no responders"));
        assert_eq!(down.kind(), PortErrorKind::Transient);
        assert_eq!(down.to_string(), "key bucket: reading: no responders");
        assert!(std::error::Error::source(&down).is_some(), "source kept");
    }
}
