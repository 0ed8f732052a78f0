//! `kit export`: the kit's files from the ledger's listing and the configuration, the
//! manifest over them, and its signature by the kit key. Everything but the signature is
//! pure and deterministic: the same ledger and configuration give the same bytes.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::SystemTime;

use der::Decode as _;
use serde::Deserialize;
use signer_actors::keys::{KeySigner, PublicKey};
use sigstore_protobuf_specs::dev::sigstore::common::v1::{
    TimeRange, X509Certificate, X509CertificateChain,
};
use sigstore_protobuf_specs::dev::sigstore::trustroot::v1::{
    CertificateAuthority, TransparencyLogInstance, TrustedRoot,
};

use super::{
    FileDigest, KEYS, KIT_KEY, KIT_MEDIA_TYPE, KeyList, KitCertificate, KitChain, KitError, KitKey,
    KitRevocation, MANIFEST_PAYLOAD_TYPE, Manifest, TRUSTED_ROOT, TRUSTED_ROOT_MEDIA_TYPE,
    sha256_hex,
};
use crate::keystate::schema::CertificateRecord;

/// What a kit is made of.
#[derive(Debug, Default)]
pub struct KitInputs {
    /// The ledger's keys, as `keys list --json` prints them.
    pub listed: Vec<serde_json::Value>,
    /// (key name, PEM chain) of each keyful key configured with a `certificate_chain`.
    pub chains: Vec<(String, String)>,
    /// The Fulcio certificate authorities.
    pub fulcio: Vec<CertificateAuthority>,
    /// The timestamp authorities.
    pub tsa: Vec<CertificateAuthority>,
    /// Transparency logs and certificate transparency logs of configured trusted roots
    /// (verifiers check a Fulcio certificate's SCTs against the `ctlogs`).
    pub tlogs: Vec<TransparencyLogInstance>,
    pub ctlogs: Vec<TransparencyLogInstance>,
}

/// An entry of the ledger's listing, the fields the kit keeps.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Listed {
    keyid: String,
    name: String,
    algorithm: String,
    source: String,
    public_key: String,
    status: String,
    valid_from: String,
    #[serde(default)]
    valid_until: Option<String>,
    #[serde(default)]
    revocation_reason: Option<String>,
    #[serde(default)]
    certificate: Option<CertificateRecord>,
}

/// A file name made of `name`: characters other than `[A-Za-z0-9._-]` become `_`.
fn file_stem(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn pretty(value: &impl serde::Serialize) -> Result<Vec<u8>, KitError> {
    let mut out = serde_json::to_vec_pretty(value)
        .map_err(|e| KitError::Unusable(format!("encoding JSON: {e}")))?;
    out.push(b'\n');
    Ok(out)
}

/// The kit's files (path to bytes) but the manifest and its envelope.
pub fn kit_files(
    inputs: &KitInputs,
    kit_key: &PublicKey,
) -> Result<BTreeMap<String, Vec<u8>>, KitError> {
    let mut files = BTreeMap::new();
    let mut keys = Vec::new();
    for (i, value) in inputs.listed.iter().enumerate() {
        let l: Listed = serde_json::from_value(value.clone())
            .map_err(|e| KitError::Unusable(format!("ledger entry {i}: {e}")))?;
        let public = PublicKey::from_pem(&l.public_key)
            .map_err(|e| KitError::Unusable(format!("ledger key {}: {e}", l.keyid)))?;
        if public.keyid() != l.keyid {
            return Err(KitError::Unusable(format!(
                "ledger key {}: its public key has keyid {}",
                l.keyid,
                public.keyid()
            )));
        }
        let path = format!("keys/{}.pem", l.keyid);
        files.insert(path.clone(), public.to_pem().into_bytes());
        let revocation = match (&*l.status, &l.valid_until) {
            ("revoked", Some(at)) => Some(KitRevocation {
                revoked_at: at.clone(),
                reason: l.revocation_reason.clone().unwrap_or_default(),
            }),
            _ => None,
        };
        keys.push(KitKey {
            keyid: l.keyid,
            name: l.name,
            algorithm: l.algorithm,
            source: l.source,
            status: l.status,
            public_key: path,
            valid_from: l.valid_from,
            valid_until: l.valid_until,
            revocation,
            certificate: l.certificate.map(|c| KitCertificate {
                sha256: c.sha256,
                issuer: c.issuer,
                san: c.san,
            }),
        });
    }
    let mut chains = Vec::new();
    for (name, pem_text) in &inputs.chains {
        let path = format!("chains/{}.pem", file_stem(name));
        if files.contains_key(&path) {
            return Err(KitError::Unusable(format!(
                "two keys' chains would both be written to {path}"
            )));
        }
        files.insert(path.clone(), pem_text.clone().into_bytes());
        chains.push(KitChain {
            key: name.clone(),
            path,
        });
    }
    files.insert(KEYS.into(), pretty(&KeyList { keys, chains })?);
    let root = TrustedRoot {
        media_type: TRUSTED_ROOT_MEDIA_TYPE.into(),
        tlogs: dedup(&inputs.tlogs),
        certificate_authorities: dedup(&inputs.fulcio),
        ctlogs: dedup(&inputs.ctlogs),
        timestamp_authorities: dedup(&inputs.tsa),
    };
    files.insert(TRUSTED_ROOT.into(), pretty(&root)?);
    files.insert(KIT_KEY.into(), kit_key.to_pem().into_bytes());
    Ok(files)
}

/// `authorities` without repeats, in their first order (two keys may name one roots file).
fn dedup<T: Clone + PartialEq>(authorities: &[T]) -> Vec<T> {
    let mut out: Vec<T> = Vec::new();
    for a in authorities {
        if !out.contains(a) {
            out.push(a.clone());
        }
    }
    out
}

/// `manifest.json` over `files`, for the kit key `kit_keyid`.
pub fn manifest(files: &BTreeMap<String, Vec<u8>>, kit_keyid: &str) -> Result<Vec<u8>, KitError> {
    pretty(&Manifest {
        media_type: KIT_MEDIA_TYPE.into(),
        kit_keyid: kit_keyid.into(),
        files: files
            .iter()
            .map(|(path, bytes)| FileDigest {
                path: path.clone(),
                sha256: sha256_hex(bytes),
            })
            .collect(),
    })
}

/// `manifest.dsse.json`: a DSSE envelope over `manifest`, signed by `signer`.
pub async fn sign_manifest(manifest: &[u8], signer: &dyn KeySigner) -> Result<Vec<u8>, KitError> {
    let message = signer_actors::dsse::pae(MANIFEST_PAYLOAD_TYPE, manifest);
    let signature = signer
        .sign(&message)
        .await
        .map_err(|source| KitError::Sign {
            name: signer.name().to_string(),
            source,
        })?;
    let signed = signer_actors::signing::assemble(
        MANIFEST_PAYLOAD_TYPE.into(),
        manifest.to_vec(),
        vec![signature],
    )
    .map_err(|e| KitError::Unusable(format!("encoding the envelope: {e}")))?;
    pretty(&signed.envelope)
}

/// Writes `files` under `dir`, which must be missing or empty (a kit is all that is in it:
/// `verify --kit` refuses files the manifest does not list).
pub fn write_kit(dir: &Path, files: &BTreeMap<String, Vec<u8>>) -> Result<(), KitError> {
    match std::fs::read_dir(dir) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                return Err(KitError::Unusable(format!(
                    "{}: not empty; export a kit into a new directory",
                    dir.display()
                )));
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(KitError::io(dir, e)),
    }
    for (path, bytes) in files {
        let full = dir.join(path);
        if let Some(parent) = full.parent() {
            std::fs::create_dir_all(parent).map_err(|e| KitError::io(parent, e))?;
        }
        std::fs::write(&full, bytes).map_err(|e| KitError::io(&full, e))?;
    }
    Ok(())
}

/// Adds what a `fulcio_roots` file trusts to `inputs`: a `trusted_root.json` gives all of
/// it (Fulcio and timestamp authorities, logs); a PEM bundle is one Fulcio authority (at
/// `uri`) whose chain is the bundle's certificates in their order.
pub fn add_roots_file(inputs: &mut KitInputs, path: &Path, uri: &str) -> Result<(), KitError> {
    let text = std::fs::read_to_string(path).map_err(|e| KitError::io(path, e))?;
    if text.trim_start().starts_with('{') {
        let root: TrustedRoot = serde_json::from_str(&text).map_err(|e| {
            KitError::Unusable(format!("{}: not a trusted_root.json: {e}", path.display()))
        })?;
        inputs.fulcio.extend(root.certificate_authorities);
        inputs.tsa.extend(root.timestamp_authorities);
        inputs.tlogs.extend(root.tlogs);
        inputs.ctlogs.extend(root.ctlogs);
    } else {
        inputs.fulcio.push(authority_of_pem(path, &text, uri)?);
    }
    Ok(())
}

/// One authority from a PEM chain (leaf or intermediate first, root last), trusted from the
/// root's notBefore.
pub fn authority_of_pem(
    path: &Path,
    text: &str,
    uri: &str,
) -> Result<CertificateAuthority, KitError> {
    let unusable = |reason: String| KitError::Unusable(format!("{}: {reason}", path.display()));
    let certificates: Vec<X509Certificate> = pem::parse_many(text)
        .map_err(|e| unusable(e.to_string()))?
        .into_iter()
        .filter(|b| b.tag() == "CERTIFICATE")
        .map(|b| X509Certificate {
            raw_bytes: b.into_contents(),
        })
        .collect();
    let last = certificates
        .last()
        .ok_or_else(|| unusable("no CERTIFICATE in it".into()))?;
    let root = x509_cert::Certificate::from_der(&last.raw_bytes)
        .map_err(|e| unusable(format!("not X.509: {e}")))?;
    let start: SystemTime = root.tbs_certificate.validity.not_before.to_system_time();
    Ok(CertificateAuthority {
        uri: uri.into(),
        cert_chain: Some(X509CertificateChain { certificates }),
        valid_for: Some(TimeRange {
            start: Some(start.into()),
            end: None,
        }),
        ..Default::default()
    })
}
