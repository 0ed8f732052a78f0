//! Reading a kit back: the manifest's signature under the key the user pinned (a kit that
//! vouches for itself proves nothing), every file's digest, and nothing unlisted.

use std::collections::BTreeMap;
use std::path::Path;

use signer_actors::dsse::Envelope;
use signer_actors::keys::PublicKey;
use sigstore_protobuf_specs::dev::sigstore::trustroot::v1::TrustedRoot;

use super::{
    KEYS, KIT_KEY, KIT_MEDIA_TYPE, KeyList, KitError, KitKey, MANIFEST, MANIFEST_ENVELOPE,
    MANIFEST_PAYLOAD_TYPE, Manifest, TRUSTED_ROOT, sha256_hex,
};
use crate::keys::fulcio_trust::FulcioTrust;

/// The key the kit must be signed by.
#[derive(Debug, Clone)]
pub enum KitPin {
    /// Its public key, obtained out of band.
    Key(PublicKey),
    /// Its keyid (SHA-256 of the SPKI, 64 hex digits): `kit-key.pub` must have it.
    Keyid(String),
}

/// A kit whose signature and digests checked out.
pub struct Kit {
    pub kit_keyid: String,
    /// Every ledger key, with its public key.
    pub keys: Vec<(KitKey, PublicKey)>,
    pub trusted_root: TrustedRoot,
    /// The Fulcio roots of `trusted_root.json`.
    pub fulcio: FulcioTrust,
    /// The timestamp authorities of `trusted_root.json`.
    pub tsa: FulcioTrust,
}

fn refused(reason: impl Into<String>) -> KitError {
    KitError::Refused(reason.into())
}

fn read(dir: &Path, name: &str) -> Result<Vec<u8>, KitError> {
    let path = dir.join(name);
    std::fs::read(&path).map_err(|e| KitError::io(&path, e))
}

/// Every file under `dir`, as `/`-separated relative paths.
fn listing(dir: &Path, prefix: &str, out: &mut Vec<String>) -> Result<(), KitError> {
    for entry in std::fs::read_dir(dir).map_err(|e| KitError::io(dir, e))? {
        let entry = entry.map_err(|e| KitError::io(dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let rel = format!("{prefix}{name}");
        let kind = entry
            .file_type()
            .map_err(|e| KitError::io(&entry.path(), e))?;
        if kind.is_dir() {
            listing(&entry.path(), &format!("{rel}/"), out)?;
        } else {
            out.push(rel);
        }
    }
    Ok(())
}

/// A manifest path: relative, `/`-separated, no `.` or `..` component.
fn safe_path(path: &str) -> bool {
    !path.is_empty()
        && !path.starts_with('/')
        && path
            .split('/')
            .all(|c| !c.is_empty() && c != "." && c != ".." && !c.contains('\\'))
}

impl Kit {
    /// Reads the kit in `dir` and checks it: the envelope verifies under the pinned key,
    /// `manifest.json` is its payload, every listed file has its digest and no other file
    /// is there. Only then are `keys.json` and `trusted_root.json` read.
    pub fn load(dir: &Path, pin: &KitPin) -> Result<Kit, KitError> {
        let envelope: Envelope = serde_json::from_slice(&read(dir, MANIFEST_ENVELOPE)?)
            .map_err(|e| refused(format!("{MANIFEST_ENVELOPE}: not a DSSE envelope: {e}")))?;
        let kit_key = match pin {
            KitPin::Key(key) => key.clone(),
            KitPin::Keyid(keyid) => {
                let text = String::from_utf8(read(dir, KIT_KEY)?)
                    .map_err(|_| refused(format!("{KIT_KEY}: not UTF-8 PEM")))?;
                let key =
                    PublicKey::from_pem(&text).map_err(|e| refused(format!("{KIT_KEY}: {e}")))?;
                if key.keyid() != *keyid {
                    return Err(refused(format!(
                        "{KIT_KEY} has keyid {}, not the pinned {keyid}",
                        key.keyid()
                    )));
                }
                key
            }
        };
        if envelope.payload_type != MANIFEST_PAYLOAD_TYPE {
            return Err(refused(format!(
                "{MANIFEST_ENVELOPE}: payloadType {:?}, expected {MANIFEST_PAYLOAD_TYPE}",
                envelope.payload_type
            )));
        }
        envelope
            .verify(std::slice::from_ref(&kit_key), 1)
            .map_err(|_| {
                refused(format!(
                    "{MANIFEST_ENVELOPE} is not signed by the pinned kit key {}",
                    kit_key.keyid()
                ))
            })?;
        if read(dir, MANIFEST)? != envelope.payload {
            return Err(refused(format!(
                "{MANIFEST} is not the manifest the signature covers"
            )));
        }
        let manifest: Manifest = serde_json::from_slice(&envelope.payload)
            .map_err(|e| refused(format!("{MANIFEST}: {e}")))?;
        if manifest.media_type != KIT_MEDIA_TYPE || manifest.kit_keyid != kit_key.keyid() {
            return Err(refused(format!(
                "{MANIFEST}: mediaType {:?} and kitKeyid {} do not describe this kit",
                manifest.media_type, manifest.kit_keyid
            )));
        }
        let mut files = BTreeMap::new();
        for f in &manifest.files {
            if !safe_path(&f.path) || f.path == MANIFEST || f.path == MANIFEST_ENVELOPE {
                return Err(refused(format!("{MANIFEST} lists the path {:?}", f.path)));
            }
            let bytes = read(dir, &f.path)?;
            if sha256_hex(&bytes) != f.sha256 {
                return Err(refused(format!(
                    "{}: SHA-256 {} differs from the manifest's {}",
                    f.path,
                    sha256_hex(&bytes),
                    f.sha256
                )));
            }
            files.insert(f.path.clone(), bytes);
        }
        let mut present = Vec::new();
        listing(dir, "", &mut present)?;
        if let Some(extra) = present
            .iter()
            .find(|p| *p != MANIFEST && *p != MANIFEST_ENVELOPE && !files.contains_key(*p))
        {
            return Err(refused(format!("{extra} is not in the manifest")));
        }
        let file = |name: &str| {
            files
                .get(name)
                .ok_or_else(|| refused(format!("{MANIFEST} does not list {name}")))
        };
        let list: KeyList = serde_json::from_slice(file(KEYS)?)
            .map_err(|e| KitError::Unusable(format!("{KEYS}: {e}")))?;
        let mut keys = Vec::new();
        for k in list.keys {
            let pem = String::from_utf8(file(&k.public_key)?.clone())
                .map_err(|_| KitError::Unusable(format!("{}: not UTF-8", k.public_key)))?;
            let public = PublicKey::from_pem(&pem)
                .map_err(|e| KitError::Unusable(format!("{}: {e}", k.public_key)))?;
            if public.keyid() != k.keyid {
                return Err(KitError::Unusable(format!(
                    "{}: keyid {}, {KEYS} says {}",
                    k.public_key,
                    public.keyid(),
                    k.keyid
                )));
            }
            keys.push((k, public));
        }
        let trusted_root: TrustedRoot = serde_json::from_slice(file(TRUSTED_ROOT)?)
            .map_err(|e| KitError::Unusable(format!("{TRUSTED_ROOT}: {e}")))?;
        let fulcio = FulcioTrust::from_authorities(&trusted_root.certificate_authorities)
            .map_err(|e| KitError::Unusable(format!("{TRUSTED_ROOT}: {e}")))?;
        let tsa = FulcioTrust::from_authorities(&trusted_root.timestamp_authorities)
            .map_err(|e| KitError::Unusable(format!("{TRUSTED_ROOT}: {e}")))?;
        Ok(Kit {
            kit_keyid: kit_key.keyid(),
            keys,
            trusted_root,
            fulcio,
            tsa,
        })
    }
}
