//! The kit's logic with file keys in a temporary directory: export and load round trip,
//! the pin, tampering, deterministic output, and the revocation rule for envelopes and
//! keyful bundles. Keyless bundles and TSA timestamps need the Sigstore peer: tests/kit.rs.

use std::path::Path;
use std::time::{Duration, SystemTime};

use signer_actors::dsse::{Envelope, Signature};
use signer_actors::keys::{KeyAlgorithm, KeySigner as _, PublicKey};

use super::export::{self, KitInputs};
use super::load::{Kit, KitPin};
use super::verify::{Identity, Refusal, revoked_at};
use super::*;
use crate::keys::file::FileKey;

struct Keys {
    _dir: tempfile::TempDir,
    kit: FileKey,
    good: FileKey,
    revoked: FileKey,
}

fn keys() -> Keys {
    let dir = tempfile::tempdir().unwrap();
    let load = |name: &str, alg| {
        let g = FileKey::generate(alg, dir.path(), name).unwrap();
        FileKey::load(&g.private_key, name).unwrap()
    };
    Keys {
        kit: load("kit", KeyAlgorithm::Ed25519),
        good: load("good", KeyAlgorithm::EcdsaP256Sha256),
        revoked: load("old", KeyAlgorithm::EcdsaP256Sha256),
        _dir: dir,
    }
}

fn public(k: &FileKey) -> PublicKey {
    k.identity().public_key.clone()
}

fn listed(k: &FileKey, status: &str, until: Option<&str>) -> serde_json::Value {
    let p = public(k);
    let mut v = serde_json::json!({
        "keyid": p.keyid(), "name": k.name(), "algorithm": "ecdsa-p256", "source": "file",
        "publicKey": p.to_pem(), "firstSeen": "2026-01-01T00:00:00.000Z",
        "validFrom": "2026-01-01T00:00:00.000Z", "status": status,
    });
    if let Some(until) = until {
        v["validUntil"] = until.into();
        v["revocationReason"] = "leaked".into();
    }
    v
}

fn inputs(k: &Keys) -> KitInputs {
    KitInputs {
        listed: vec![
            listed(&k.revoked, "revoked", Some("2026-02-01T00:00:00.000Z")),
            listed(&k.good, "active", None),
            listed(&k.kit, "staged", None),
        ],
        chains: vec![(
            "good".into(),
            "-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n".into(),
        )],
        ..Default::default()
    }
}

async fn export_to(k: &Keys, dir: &Path) {
    let mut files = export::kit_files(&inputs(k), &public(&k.kit)).unwrap();
    let manifest = export::manifest(&files, &public(&k.kit).keyid()).unwrap();
    let envelope = export::sign_manifest(&manifest, &k.kit).await.unwrap();
    files.insert(MANIFEST.into(), manifest);
    files.insert(MANIFEST_ENVELOPE.into(), envelope);
    export::write_kit(dir, &files).unwrap();
}

fn refusal(r: Result<Kit, KitError>) -> String {
    match r {
        Err(KitError::Refused(m)) => m,
        Err(e) => panic!("not a refusal: {e}"),
        Ok(_) => panic!("accepted"),
    }
}

fn envelope(keys: &[&FileKey]) -> Envelope {
    let payload = br#"{"_type":"https://in-toto.io/Statement/v1"}"#.to_vec();
    let payload_type = "application/vnd.in-toto+json".to_string();
    let message = signer_actors::dsse::pae(&payload_type, &payload);
    Envelope {
        signatures: keys
            .iter()
            .map(|k| Signature {
                keyid: public(k).keyid(),
                sig: k.sign_now(&message).unwrap(),
            })
            .collect(),
        payload,
        payload_type,
    }
}

#[tokio::test]
async fn a_kit_loads_under_its_pinned_key_and_lists_keys_with_their_revocations() {
    let k = keys();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("kit");
    export_to(&k, &out).await;
    let kit = Kit::load(&out, &KitPin::Key(public(&k.kit))).unwrap();
    assert_eq!(kit.kit_keyid, public(&k.kit).keyid());
    assert_eq!(kit.keys.len(), 3);
    let (old, old_public) = &kit.keys[0];
    assert_eq!(*old_public, public(&k.revoked));
    let r = old.revocation.as_ref().unwrap();
    assert_eq!(
        (&*r.revoked_at, &*r.reason),
        ("2026-02-01T00:00:00.000Z", "leaked")
    );
    assert!(kit.keys[1].0.revocation.is_none());
    assert_eq!(kit.trusted_root.media_type, TRUSTED_ROOT_MEDIA_TYPE);
    // by keyid too
    assert!(Kit::load(&out, &KitPin::Keyid(public(&k.kit).keyid())).is_ok());
    // a kit is written into a new or empty directory only
    let again = export::kit_files(&inputs(&k), &public(&k.kit)).unwrap();
    assert!(matches!(
        export::write_kit(&out, &again),
        Err(KitError::Unusable(_))
    ));
}

#[tokio::test]
async fn the_same_ledger_and_configuration_give_the_same_files() {
    let k = keys();
    let a = export::kit_files(&inputs(&k), &public(&k.kit)).unwrap();
    let b = export::kit_files(&inputs(&k), &public(&k.kit)).unwrap();
    assert_eq!(a, b);
    let keyid = public(&k.kit).keyid();
    assert_eq!(
        export::manifest(&a, &keyid).unwrap(),
        export::manifest(&b, &keyid).unwrap()
    );
    let paths: Vec<&str> = a.keys().map(String::as_str).collect();
    assert!(
        paths.contains(&"chains/good.pem") && paths.contains(&TRUSTED_ROOT),
        "{paths:?}"
    );
}

#[tokio::test]
async fn a_kit_signed_by_another_key_or_tampered_with_is_refused() {
    let k = keys();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("kit");
    export_to(&k, &out).await;
    // another pinned key, or a kit-key.pub that is not the pinned keyid
    let m = refusal(Kit::load(&out, &KitPin::Key(public(&k.good))));
    assert!(m.contains("not signed by the pinned kit key"), "{m}");
    let m = refusal(Kit::load(&out, &KitPin::Keyid(public(&k.good).keyid())));
    assert!(m.contains("not the pinned"), "{m}");

    let pin = KitPin::Key(public(&k.kit));
    let keys_json = out.join(KEYS);
    let original = std::fs::read(&keys_json).unwrap();
    // un-revoking a key in keys.json breaks its digest
    let edited = String::from_utf8(original.clone())
        .unwrap()
        .replace("\"revoked\"", "\"active\"");
    std::fs::write(&keys_json, edited).unwrap();
    let m = refusal(Kit::load(&out, &pin));
    assert!(m.contains("keys.json: SHA-256"), "{m}");
    std::fs::write(&keys_json, &original).unwrap();

    // a manifest.json other than the signed payload
    let manifest = out.join(MANIFEST);
    let signed = std::fs::read(&manifest).unwrap();
    std::fs::write(&manifest, b"{}").unwrap();
    assert!(refusal(Kit::load(&out, &pin)).contains("not the manifest the signature covers"));
    std::fs::write(&manifest, &signed).unwrap();

    // a file the manifest does not list
    std::fs::write(out.join("keys/extra.pem"), public(&k.good).to_pem()).unwrap();
    assert!(refusal(Kit::load(&out, &pin)).contains("keys/extra.pem is not in the manifest"));
    std::fs::remove_file(out.join("keys/extra.pem")).unwrap();

    // a removed file
    std::fs::remove_file(out.join("chains/good.pem")).unwrap();
    assert!(matches!(Kit::load(&out, &pin), Err(KitError::Io { .. })));
}

#[tokio::test]
async fn envelopes_count_only_signatures_by_unrevoked_kit_keys() {
    let k = keys();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("kit");
    export_to(&k, &out).await;
    let kit = Kit::load(&out, &KitPin::Key(public(&k.kit))).unwrap();

    let ok = kit.verify_envelope(&envelope(&[&k.good]), None).unwrap();
    assert_eq!(ok.accepted.len(), 1);
    assert!(ok.accepted[0].contains(&public(&k.good).keyid()));

    // no trusted time in an envelope: a revoked key's signature never counts
    let Err(Refusal::Refused(m)) = kit.verify_envelope(&envelope(&[&k.revoked]), None) else {
        panic!("a revoked key's envelope verified");
    };
    assert!(m.contains("no trusted time") && m.contains("leaked"), "{m}");
    let both = envelope(&[&k.revoked, &k.good]);
    assert!(kit.verify_envelope(&both, Some(1)).is_ok());
    assert!(kit.verify_envelope(&both, Some(2)).is_err());
    // the kit key is listed (the signer loaded it) but signs kits, not artefacts
    assert!(kit.verify_envelope(&envelope(&[&k.kit]), None).is_err());
}

#[tokio::test]
async fn keyful_bundles_verify_and_a_revoked_keys_bundle_without_a_timestamp_is_refused() {
    let k = keys();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("kit");
    export_to(&k, &out).await;
    let kit = Kit::load(&out, &KitPin::Key(public(&k.kit))).unwrap();
    let bundle = |key: &FileKey| {
        let env = envelope(&[key]);
        let sig = signer_actors::keys::KeySignature {
            sig: env.signatures[0].sig.clone(),
            identity: key.identity(),
            rfc3161_timestamp: None,
        };
        let b = signer_actors::bundle::Bundle::for_signature(&env.payload_type, &env.payload, &sig);
        serde_json::to_vec(&b).unwrap()
    };
    let none = Identity::default();
    assert!(kit.verify_bundle(&bundle(&k.good), &none).is_ok());
    let Err(Refusal::Refused(m)) = kit.verify_bundle(&bundle(&k.revoked), &none) else {
        panic!("a revoked key's bundle verified");
    };
    assert!(m.contains("no trusted time"), "{m}");
    assert!(matches!(
        kit.verify_bundle(&bundle(&k.kit), &none),
        Err(Refusal::Refused(_))
    ));
    assert!(matches!(
        kit.verify_bundle(b"{\"mediaType\": 1}", &none),
        Err(Refusal::Unusable(_))
    ));
}

#[test]
fn a_revoked_key_counts_only_for_signatures_trusted_to_predate_the_revocation() {
    let key = KitKey {
        keyid: "k".into(),
        name: "old".into(),
        algorithm: "ecdsa-p256".into(),
        source: "file".into(),
        status: "revoked".into(),
        public_key: "keys/k.pem".into(),
        valid_from: "2026-01-01T00:00:00.000Z".into(),
        valid_until: Some("2026-02-01T00:00:00.000Z".into()),
        revocation: Some(KitRevocation {
            revoked_at: "2026-02-01T00:00:00.000Z".into(),
            reason: "leaked".into(),
        }),
        certificate: None,
    };
    let at = |s: &str| Some(humantime::parse_rfc3339(s).unwrap());
    assert!(revoked_at(&key, at("2026-01-31T23:59:59Z")).is_none());
    assert!(
        revoked_at(&key, at("2026-02-01T00:00:00Z")).is_some(),
        "at the revocation"
    );
    assert!(revoked_at(&key, at("2026-03-01T00:00:00Z")).is_some());
    assert!(revoked_at(&key, None).is_some(), "no trusted time");
    let active = KitKey {
        revocation: None,
        ..key
    };
    assert!(revoked_at(&active, None).is_none());
    assert!(revoked_at(&active, Some(SystemTime::now() + Duration::from_secs(9))).is_none());
}
