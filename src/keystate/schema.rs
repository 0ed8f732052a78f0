//! What the `SIGNER_KEYS` bucket holds: the value of each kind of entry, the bucket key it is
//! written under, and how values are encoded (JSON, camelCase) and read back. Pure: no I/O.

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use signer_actors::profiles::Scope;

use super::KeyStateError;

/// `key.<keyid>`: a public key a replica has loaded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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

/// `revoked.<keyid>`: a revocation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Revocation {
    pub keyid: String,
    pub reason: String,
    pub revoked_at: String,
    /// When revoked by certificate: the certificate's SHA-256.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate_sha256: Option<String>,
}

/// `identity-revoked.<hash>`: a revoked keyless identity; certificates for it are not used to
/// sign.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IdentityRevocation {
    pub issuer: String,
    pub san: String,
    pub reason: String,
    pub revoked_at: String,
}

/// `assign.<hash>`: a runtime key assignment (`keys rotate`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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

/// `left.<hash>`: a key the configuration (or a restore) stopped using.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct Left {
    pub name: String,
    pub left_at: String,
}

pub(super) const KEY: &str = "key.";
pub(super) const REVOKED: &str = "revoked.";
pub(super) const IDENTITY_REVOKED: &str = "identity-revoked.";
pub(super) const ASSIGN: &str = "assign.";
pub(super) const LEFT: &str = "left.";
/// The profiles of the configuration, as the last replica to start saw them.
pub(super) const CONFIG_PROFILES: &str = "config.profiles";

/// The first 32 hex digits of the SHA-256 of `bytes`: a valid bucket key token for names
/// that need not be one (URLs, tenant and plan names).
fn short_hash(bytes: &[u8]) -> String {
    let mut hex = hex::encode(Sha256::digest(bytes));
    hex.truncate(32);
    hex
}

/// The bucket key of a loaded key.
pub fn key_key(keyid: &str) -> String {
    format!("{KEY}{keyid}")
}

/// The bucket key of a key revocation.
pub fn revoked_key(keyid: &str) -> String {
    format!("{REVOKED}{keyid}")
}

/// The bucket key of a revoked identity: issuers and SANs are URLs, not key tokens, so the
/// pair is hashed (as a JSON pair: no ambiguity from concatenation).
pub fn identity_key(issuer: &str, san: &str) -> String {
    let id = serde_json::to_vec(&(issuer, san)).unwrap_or_default();
    format!("{IDENTITY_REVOKED}{}", short_hash(&id))
}

/// The bucket key of an assignment: profile, tenant and plan names need not be valid key
/// tokens, so they are hashed (the value carries them).
pub fn assignment_key(profile: &str, scope: &Scope) -> String {
    let id = serde_json::to_vec(&(profile, scope)).unwrap_or_default();
    format!("{ASSIGN}{}", short_hash(&id))
}

/// The bucket key of a key name that left.
pub(super) fn left_key(name: &str) -> String {
    format!("{LEFT}{}", short_hash(name.as_bytes()))
}

/// What an entry is, by its bucket key (what the watch dispatches on).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind<'a> {
    /// `key.<keyid>`.
    Key,
    /// `revoked.<keyid>`, with the keyid.
    Revoked(&'a str),
    /// `identity-revoked.<hash>`.
    IdentityRevoked,
    /// `assign.<hash>`.
    Assignment,
    /// `left.<hash>`.
    Left,
    /// `config.profiles`.
    ConfigProfiles,
    /// Anything else (a newer replica's entry): ignored.
    Other,
}

impl<'a> EntryKind<'a> {
    pub fn of(key: &'a str) -> Self {
        if let Some(keyid) = key.strip_prefix(REVOKED) {
            EntryKind::Revoked(keyid)
        } else if key.starts_with(IDENTITY_REVOKED) {
            EntryKind::IdentityRevoked
        } else if key.starts_with(ASSIGN) {
            EntryKind::Assignment
        } else if key.starts_with(KEY) {
            EntryKind::Key
        } else if key.starts_with(LEFT) {
            EntryKind::Left
        } else if key == CONFIG_PROFILES {
            EntryKind::ConfigProfiles
        } else {
            EntryKind::Other
        }
    }
}

/// A keyid (or a certificate SHA-256): 64 lowercase hex digits.
pub fn is_keyid(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// The value of an entry.
pub(super) fn encode<T: Serialize>(
    what: &'static str,
    value: &T,
) -> Result<Vec<u8>, KeyStateError> {
    serde_json::to_vec(value).map_err(|source| KeyStateError::Encode { what, source })
}

/// An entry's value read back (`None`: not JSON of that shape; callers skip or warn).
pub(super) fn decode<T: serde::de::DeserializeOwned>(value: &[u8]) -> Result<T, serde_json::Error> {
    serde_json::from_slice(value)
}

/// Now, as the bucket's entries write times (RFC 3339, milliseconds).
pub(super) fn now() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}

/// `reason`, or `unspecified` when empty.
pub(super) fn reason_or_unspecified(reason: &str) -> String {
    if reason.is_empty() {
        "unspecified".into()
    } else {
        reason.into()
    }
}

/// (profile, scope, keys) of each assignment, as [`ProfileTable::effective_key_names`]
/// takes them.
///
/// [`ProfileTable::effective_key_names`]: signer_actors::profiles::ProfileTable::effective_key_names
pub(super) fn triples(assignments: &[Assignment]) -> Vec<(String, Scope, Vec<String>)> {
    assignments
        .iter()
        .map(|a| (a.profile.clone(), a.scope.clone(), a.keys.clone()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn is_key_token(k: &str) -> bool {
        !k.is_empty()
            && k.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-' || b == b'_')
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
        assert_eq!(EntryKind::of(&a), EntryKind::IdentityRevoked);
    }

    #[test]
    fn assignment_keys_are_tokens_per_profile_and_scope() {
        let names = ["p", "p b", "p.*>", "ünï"];
        let scopes = [
            Scope::Profile,
            Scope::Tenant("acme corp".into()),
            Scope::Plan("gold/eu".into()),
        ];
        let mut seen = std::collections::HashSet::new();
        for p in names {
            for s in &scopes {
                let k = assignment_key(p, s);
                assert!(is_key_token(&k), "{k}");
                assert_eq!(EntryKind::of(&k), EntryKind::Assignment);
                assert!(seen.insert(k), "one key per (profile, scope)");
            }
        }
        // a tenant and a plan of the same name are different scopes
        assert_ne!(
            assignment_key("p", &Scope::Tenant("x".into())),
            assignment_key("p", &Scope::Plan("x".into()))
        );
        assert!(is_key_token(&left_key("a key / with spaces")));
        assert_eq!(EntryKind::of(&left_key("k")), EntryKind::Left);
    }

    #[test]
    fn entries_are_told_apart_by_their_key() {
        let keyid = "ab".repeat(32);
        assert_eq!(EntryKind::of(&key_key(&keyid)), EntryKind::Key);
        assert_eq!(
            EntryKind::of(&revoked_key(&keyid)),
            EntryKind::Revoked(&keyid)
        );
        assert_eq!(EntryKind::of(CONFIG_PROFILES), EntryKind::ConfigProfiles);
        assert_eq!(EntryKind::of("config.other"), EntryKind::Other);
        assert_eq!(EntryKind::of("keys.x"), EntryKind::Other);
    }

    #[test]
    fn keyids_are_64_lowercase_hex() {
        assert!(is_keyid(&"0a".repeat(32)));
        assert!(!is_keyid(&"0A".repeat(32)), "uppercase");
        assert!(!is_keyid(&"0a".repeat(31)), "short");
        assert!(!is_keyid(&format!("{}g", "0".repeat(63))), "not hex");
        assert!(!is_keyid(""));
    }

    /// The field names are what `keys list` prints and older replicas wrote: camelCase, with
    /// optional fields left out when empty and defaulted when missing.
    #[test]
    fn values_keep_their_wire_form() {
        let record = KeyRecord {
            keyid: "k".into(),
            name: "release".into(),
            algorithm: "ecdsa-p256".into(),
            source: "file".into(),
            public_key: "PEM".into(),
            certificate_chain: vec![],
            first_seen: "2026-01-01T00:00:00.000Z".into(),
            certificate: None,
        };
        let v: serde_json::Value = decode(&encode("key", &record).unwrap()).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"keyid": "k", "name": "release", "algorithm": "ecdsa-p256",
                "source": "file", "publicKey": "PEM", "firstSeen": "2026-01-01T00:00:00.000Z"})
        );
        let keyless = KeyRecord {
            certificate_chain: vec!["LEAF".into()],
            certificate: Some(CertificateRecord {
                sha256: "c".into(),
                issuer: "https://issuer".into(),
                san: "https://ci".into(),
                not_before: "a".into(),
                not_after: "b".into(),
            }),
            ..record
        };
        let bytes = encode("key", &keyless).unwrap();
        let v: serde_json::Value = decode(&bytes).unwrap();
        assert_eq!(v["certificate"]["notAfter"], "b");
        assert_eq!(v["certificateChain"][0], "LEAF");
        assert_eq!(decode::<KeyRecord>(&bytes).unwrap(), keyless);

        let r: Revocation = decode(br#"{"keyid":"k","reason":"r","revokedAt":"t"}"#).unwrap();
        assert_eq!(r.certificate_sha256, None);
        // an assignment written before `previous` and `reason` existed
        let a: Assignment =
            decode(br#"{"profile":"p","scope":{"tenant":"acme"},"keys":["k2"],"rotatedAt":"t"}"#)
                .unwrap();
        assert_eq!(a.scope, Scope::Tenant("acme".into()));
        assert!(a.previous.is_empty() && a.reason.is_empty());
        assert_eq!(decode::<Assignment>(&encode("a", &a).unwrap()).unwrap(), a);
        assert!(decode::<Revocation>(b"not json").is_err());
        let left = Left {
            name: "k".into(),
            left_at: "t".into(),
        };
        let v: serde_json::Value = decode(&encode("left", &left).unwrap()).unwrap();
        assert_eq!(v, serde_json::json!({"name": "k", "leftAt": "t"}));
    }

    #[test]
    fn an_empty_reason_is_unspecified() {
        assert_eq!(reason_or_unspecified(""), "unspecified");
        assert_eq!(reason_or_unspecified("leaked"), "leaked");
    }
}
