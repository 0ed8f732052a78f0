//! What replicas record in the bucket as they start and load keys (`key.`, `left.`,
//! `config.profiles`), and `keys list`: every key ever loaded with its state and validity,
//! worked out from what the bucket holds.

use std::collections::HashMap;

use async_nats::jetstream::kv;
use signer_actors::keys::SignerIdentity;
use signer_actors::profiles::ProfileTable;

use super::schema::{
    Assignment, CONFIG_PROFILES, CertificateRecord, IdentityRevocation, KEY, KeyRecord, LEFT, Left,
    Revocation, encode, identity_key, key_key, left_key, now, triples,
};
use super::{KeyLedger, KeyStateError};

/// The record of a key `name` loaded with `identity` (first seen now).
fn key_record(
    name: &str,
    identity: &SignerIdentity,
    certificate: Option<CertificateRecord>,
) -> KeyRecord {
    KeyRecord {
        keyid: identity.keyid.clone(),
        name: name.to_string(),
        algorithm: identity.algorithm.as_str().into(),
        source: identity.source.as_str().into(),
        public_key: identity.public_key.to_pem(),
        certificate_chain: identity.certificate_chain.clone(),
        first_seen: now(),
        certificate,
    }
}

/// Key names a new configuration (`after`) stopped signing with, given the runtime
/// `assignments`: those `before` signed with and `after` does not.
fn left_by(before: &ProfileTable, after: &ProfileTable, assignments: &[Assignment]) -> Vec<String> {
    let assignments = triples(assignments);
    let now_used = after.effective_key_names(&assignments);
    let mut left: Vec<String> = before
        .effective_key_names(&assignments)
        .into_iter()
        .filter(|name| !now_used.contains(name))
        .map(str::to_string)
        .collect();
    left.sort();
    left
}

impl KeyLedger {
    /// Records a loaded key once (the first replica to load it sets `firstSeen`).
    pub async fn record_key(&self, name: &str, identity: &SignerIdentity) {
        self.create_record(name, key_record(name, identity, None))
            .await;
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
        let certificate = CertificateRecord {
            sha256: leaf.sha256.clone(),
            issuer: leaf.issuer.clone(),
            san: leaf.san.clone(),
            not_before: time(leaf.not_before),
            not_after: time(leaf.not_after),
        };
        self.create_record(name, key_record(name, identity, Some(certificate)))
            .await;
    }

    /// Writes `key.<keyid>` unless it exists (best effort: a failure is logged).
    async fn create_record(&self, name: &str, record: KeyRecord) {
        let Ok(value) = encode("key", &record) else {
            return;
        };
        match self
            .store
            .create(key_key(&record.keyid), value.into())
            .await
        {
            Ok(_) => {}
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {}
            Err(e) => {
                tracing::warn!(error = %e, key = name, "recording the key in the key bucket failed")
            }
        }
    }

    /// Records the configuration's profiles (at startup).
    /// Keys the previous configuration signed with and this one does not are recorded as
    /// left (`left.<hash>`), so `keys list` can date their retirement; keys back in use are
    /// no longer left. Best effort: failures are logged or skipped.
    pub async fn record_profiles(&self, profiles: &ProfileTable) {
        let Ok(value) = encode("profiles", profiles) else {
            return;
        };
        if let (Ok(Some(before)), Ok(assignments)) =
            (self.configured_profiles().await, self.assignments().await)
        {
            for name in left_by(&before, profiles, &assignments) {
                let left = Left {
                    name: name.clone(),
                    left_at: now(),
                };
                if let Ok(v) = encode("left", &left) {
                    // the first replica with the new configuration dates it
                    let _ = self.store.create(left_key(&name), v.into()).await;
                }
            }
            // back in use: no longer left
            let assignments = triples(&assignments);
            for name in profiles.effective_key_names(&assignments) {
                if let Ok(Some(_)) = self.store.get(left_key(name)).await {
                    let _ = self.store.delete(left_key(name)).await;
                }
            }
        }
        if let Err(e) = self.store.put(CONFIG_PROFILES, value.into()).await {
            tracing::warn!(error = %e, "recording the profiles in the key bucket failed");
        }
    }

    /// Every key ever loaded, with its state and validity, for `keys list`: `revoked`,
    /// `retired`, `staged`, `active` (keyless certificates also `expired`).
    pub async fn list(&self) -> Result<Vec<serde_json::Value>, KeyStateError> {
        let listing = Listing {
            revoked: self
                .revocations()
                .await?
                .into_iter()
                .map(|r| (r.keyid.clone(), r))
                .collect(),
            assignments: self.assignments().await?,
            configured: self.configured_profiles().await?,
            left: self
                .entries::<Left>(LEFT)
                .await?
                .into_iter()
                .map(|l| (l.name, l.left_at))
                .collect(),
            identities: self
                .identity_revocations()
                .await?
                .into_iter()
                .map(|r| (identity_key(&r.issuer, &r.san), r))
                .collect(),
            keys: self.entries(KEY).await?,
        };
        Ok(listing.entries())
    }
}

/// What `keys list` is worked out from: the bucket's entries.
struct Listing {
    /// Revocations by keyid.
    revoked: HashMap<String, Revocation>,
    assignments: Vec<Assignment>,
    configured: Option<ProfileTable>,
    /// Key name to when it left.
    left: HashMap<String, String>,
    /// Identity revocations by bucket key.
    identities: HashMap<String, IdentityRevocation>,
    keys: Vec<KeyRecord>,
}

impl Listing {
    /// Every key, oldest first, as its record with `status`: `revoked`, `retired` (no
    /// profile signs with it any more: rotated or configured out, or its name now loads
    /// another key), `staged` (loaded, in no profile yet) or `active`, with `validFrom` and,
    /// when it stopped signing, `validUntil`. Keyless certificates are listed too, with
    /// their identity and validity ([`keyless_entry`]).
    fn entries(mut self) -> Vec<serde_json::Value> {
        let triples = triples(&self.assignments);
        let in_use = self
            .configured
            .as_ref()
            .map(|t| t.effective_key_names(&triples));
        self.keys
            .sort_by(|a, b| a.first_seen.cmp(&b.first_seen).then(a.name.cmp(&b.name)));
        let keys = &self.keys;
        keys.iter()
            .map(|k| {
                let mut v = serde_json::to_value(k).unwrap_or_default();
                v["validFrom"] = k.first_seen.clone().into();
                let rotated_out = in_use
                    .as_ref()
                    .is_some_and(|names| !names.contains(k.name.as_str()));
                if let Some(c) = &k.certificate {
                    let identity = self.identities.get(&identity_key(&c.issuer, &c.san));
                    keyless_entry(&mut v, c, self.revoked.get(&k.keyid), identity, rotated_out);
                    return v;
                }
                // a later key loaded under the same name replaced this one
                let replaced_at = keys
                    .iter()
                    .find(|o| {
                        o.certificate.is_none() && o.name == k.name && o.first_seen > k.first_seen
                    })
                    .map(|o| o.first_seen.clone());
                if let Some(r) = self.revoked.get(&k.keyid) {
                    v["status"] = "revoked".into();
                    v["validUntil"] = r.revoked_at.clone().into();
                    v["revocationReason"] = r.reason.clone().into();
                } else if let Some(until) = replaced_at {
                    v["status"] = "retired".into();
                    v["validUntil"] = until.into();
                } else if rotated_out {
                    // out of use: since a rotation or a configuration took it out, or never
                    // used yet (staged, waiting to be rotated in)
                    let until = self
                        .assignments
                        .iter()
                        .filter(|a| a.previous.contains(&k.name))
                        .map(|a| a.rotated_at.clone())
                        .chain(self.left.get(&k.name).cloned())
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
            .collect()
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

#[cfg(test)]
mod tests {
    use signer_actors::profiles::{ProfileKeys, Scope};

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

    fn profiles(keys: &[&str]) -> ProfileTable {
        let mut p = HashMap::new();
        p.insert(
            "release".to_string(),
            ProfileKeys {
                keys: keys.iter().map(|k| k.to_string()).collect(),
                ..Default::default()
            },
        );
        ProfileTable::new(p)
    }

    fn listing(keys: Vec<KeyRecord>, configured: Option<ProfileTable>) -> Listing {
        Listing {
            revoked: HashMap::new(),
            assignments: vec![],
            configured,
            left: HashMap::new(),
            identities: HashMap::new(),
            keys,
        }
    }

    /// (keyid, status, validUntil) of each listed key.
    fn states(l: Listing) -> Vec<(String, String, Option<String>)> {
        l.entries()
            .into_iter()
            .map(|v| {
                (
                    v["keyid"].as_str().unwrap_or("").to_string(),
                    v["status"].as_str().unwrap_or("").to_string(),
                    v["validUntil"].as_str().map(str::to_string),
                )
            })
            .collect()
    }

    fn state(keyid: &str, status: &str, until: Option<&str>) -> (String, String, Option<String>) {
        (keyid.into(), status.into(), until.map(str::to_string))
    }

    #[test]
    fn keys_are_listed_oldest_first_with_their_state() {
        let keys = vec![
            record("staged", "k3", "2026-03-01T00:00:00.000Z"),
            record("release", "k2", "2026-02-01T00:00:00.000Z"),
            record("release", "k1", "2026-01-01T00:00:00.000Z"),
            record("gone", "k4", "2026-01-15T00:00:00.000Z"),
        ];
        let mut l = listing(keys, Some(profiles(&["release"])));
        l.left
            .insert("gone".into(), "2026-02-15T00:00:00.000Z".into());
        l.revoked.insert(
            "k2".into(),
            Revocation {
                keyid: "k2".into(),
                reason: "leaked".into(),
                revoked_at: "2026-02-20T00:00:00.000Z".into(),
                certificate_sha256: None,
            },
        );
        assert_eq!(
            states(l),
            [
                // replaced by a later key of the same name
                state("k1", "retired", Some("2026-02-01T00:00:00.000Z")),
                // configured out: dated by its `left` entry
                state("k4", "retired", Some("2026-02-15T00:00:00.000Z")),
                state("k2", "revoked", Some("2026-02-20T00:00:00.000Z")),
                // loaded, in no profile, never used
                state("k3", "staged", None),
            ]
        );
    }

    #[test]
    fn a_rotation_retires_what_it_replaced_and_activates_what_it_put_in() {
        let keys = vec![
            record("k-old", "a", "2026-01-01T00:00:00.000Z"),
            record("k-new", "b", "2026-01-02T00:00:00.000Z"),
        ];
        let mut l = listing(keys, Some(profiles(&["k-old"])));
        l.assignments.push(Assignment {
            profile: "release".into(),
            scope: Scope::Profile,
            keys: vec!["k-new".into()],
            previous: vec!["k-old".into()],
            rotated_at: "2026-01-03T00:00:00.000Z".into(),
            reason: String::new(),
        });
        assert_eq!(
            states(l),
            [
                state("a", "retired", Some("2026-01-03T00:00:00.000Z")),
                state("b", "active", None),
            ]
        );
        // without recorded profiles nothing is known to be out of use
        let l = listing(vec![record("x", "c", "t")], None);
        assert_eq!(states(l), [state("c", "active", None)]);
    }

    #[test]
    fn keys_a_configuration_stops_using_have_left() {
        let assignments = [Assignment {
            profile: "release".into(),
            scope: Scope::Tenant("acme".into()),
            keys: vec!["k-rotated".into()],
            previous: vec![],
            rotated_at: "t".into(),
            reason: String::new(),
        }];
        assert_eq!(
            left_by(&profiles(&["k1", "k2"]), &profiles(&["k2", "k3"]), &[]),
            ["k1"]
        );
        // a key still rotated in has not left, whatever the configuration says
        assert_eq!(
            left_by(&profiles(&["k1"]), &profiles(&["k3"]), &assignments),
            ["k1"]
        );
        assert!(left_by(&profiles(&["k1"]), &profiles(&["k1"]), &assignments).is_empty());
    }
}
