//! Keyless signing, as cosign does it but inside a service: an ephemeral ECDSA P-256 key,
//! certified by Fulcio for the workload identity of an OIDC token, and (when a TSA is
//! configured) an RFC 3161 timestamp over every signature, so a verifier can tell the
//! signature was made while the short-lived certificate was valid.
//!
//! One key and certificate serve every signature until `renew_before` ahead of the
//! certificate's expiry: one Fulcio call per certificate window, not per job. The identity
//! token file is read again for every new certificate, so a projected workload token that
//! the platform rotates in place is picked up without a restart.
//!
//! Before a certificate is used it must chain to the configured Fulcio roots
//! (`fulcio_roots`, [`FulcioTrust`]) and certify our ephemeral key; one that does not leaves
//! the key unavailable and nothing is signed. Every certificate obtained is recorded in the
//! key bucket ([`KeylessLedger`]) so `keys list` shows it, and before every signature the key
//! asks the ledger whether its certificate (by keyid) or its identity (OIDC issuer + SAN) was
//! revoked: a revoked certificate is replaced at once, a revoked identity refuses to sign.
//!
//! The Fulcio v2 call is plain JSON over the HTTP client the service already uses; the
//! `sigstore` crate's client would bring its own crypto stack (about 118 crates, DESIGN.md)
//! for one POST.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use der::{Decode as _, Encode as _, Reader as _};
use ring::rand::{SecureRandom as _, SystemRandom};
use ring::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, KeyPair as _};
use sha2::{Digest as _, Sha256};
use signer_actors::keys::{
    KeyAlgorithm, KeyError, KeyMode, KeySignature, KeySigner, KeySource, PublicKey, SignerIdentity,
};

use crate::keys::fulcio_trust::{FulcioTrust, VerifiedLeaf};

/// Fulcio's v2 certificate endpoint, under the configured base URL.
const SIGNING_CERT_PATH: &str = "/api/v2/signingCert";

/// What a `fulcio` key needs.
#[derive(Debug, Clone)]
pub struct KeylessSettings {
    /// Fulcio's base URL (`https://fulcio.sigstore.dev`).
    pub fulcio_url: String,
    /// The OIDC identity token (a JWT), re-read for every certificate.
    pub identity_token_file: PathBuf,
    /// The RFC 3161 endpoint (`https://timestamp.sigstore.dev/api/v1/timestamp`), if any.
    pub tsa_url: Option<String>,
    /// A new certificate is requested this long before the current one expires.
    pub renew_before: Duration,
    /// Timeout of each Fulcio and TSA request.
    pub timeout: Duration,
    /// The Fulcio roots (a Sigstore `trusted_root.json` or a PEM bundle) every certificate
    /// must chain to; read when the key is loaded.
    pub fulcio_roots: PathBuf,
}

impl From<&crate::config::FulcioKeyConfig> for KeylessSettings {
    fn from(k: &crate::config::FulcioKeyConfig) -> Self {
        KeylessSettings {
            fulcio_url: k.fulcio_url.clone(),
            identity_token_file: k.identity_token_file.clone(),
            tsa_url: k.tsa_url.clone(),
            renew_before: k.renew_before,
            timeout: k.http_timeout,
            fulcio_roots: k.fulcio_roots.clone(),
        }
    }
}

/// Where a keyless key records the certificates it obtains and learns which are revoked:
/// the shared key bucket (`SIGNER_KEYS`) in `serve`.
#[async_trait]
pub trait KeylessLedger: Send + Sync {
    /// Records a certificate `name` obtained (its ephemeral key, chain, identity, validity).
    async fn record_certificate(&self, name: &str, identity: &SignerIdentity, leaf: &VerifiedLeaf);
    /// Why the certificate of the ephemeral key `keyid` was revoked, if it was.
    fn certificate_revoked(&self, keyid: &str) -> Option<String>;
    /// Why the identity `san` from the OIDC issuer `issuer` was revoked, if it was.
    fn identity_revoked(&self, issuer: &str, san: &str) -> Option<String>;
}

/// A certificate and the ephemeral key it certifies.
struct Certified {
    pair: EcdsaKeyPair,
    identity: Arc<SignerIdentity>,
    /// What the verified leaf certifies (identity, validity, fingerprint).
    leaf: VerifiedLeaf,
}

/// The certificate in use and when to try for the next one.
struct Current {
    cert: Arc<Certified>,
    renew_at: SystemTime,
}

/// How long before its expiry a certificate is no longer used even when no new one can be
/// had: room for the signature and its timestamp to fall inside the validity.
const LAST_USE_MARGIN: Duration = Duration::from_secs(10);
/// After a failed renewal, the next attempt waits this long (the current certificate is
/// still used meanwhile).
const RENEW_RETRY: Duration = Duration::from_secs(5);

/// A `fulcio` key.
pub struct KeylessKey {
    name: String,
    settings: KeylessSettings,
    trust: FulcioTrust,
    ledger: Option<Arc<dyn KeylessLedger>>,
    http: reqwest::Client,
    rng: SystemRandom,
    current: tokio::sync::Mutex<Current>,
    identity: RwLock<Arc<SignerIdentity>>,
}

fn unavailable(m: impl Into<String>) -> KeyError {
    KeyError::Unavailable(m.into())
}

impl KeylessKey {
    /// Builds the key and gets its first certificate, so a key that loads can sign (and
    /// `/readyz` says so only when Fulcio answered with a certificate we trust). Reads the
    /// Fulcio roots each time, so a reload picks up a changed `fulcio_roots` file.
    /// Certificates are recorded in, and revocations read from, `ledger` when given.
    pub async fn open(
        name: &str,
        settings: KeylessSettings,
        ledger: Option<Arc<dyn KeylessLedger>>,
    ) -> Result<Self, KeyError> {
        let trust = FulcioTrust::load(&settings.fulcio_roots)
            .map_err(|e| unavailable(format!("key {name}: {e}")))?;
        let http = reqwest::Client::builder()
            .timeout(settings.timeout)
            .build()
            .map_err(|e| unavailable(format!("HTTP client: {e}")))?;
        let rng = SystemRandom::new();
        let first = Arc::new(certify(name, &settings, &trust, &http, &rng).await?);
        if let Some(ledger) = &ledger {
            ledger
                .record_certificate(name, &first.identity, &first.leaf)
                .await;
        }
        let renew_at = renew_time(first.leaf.not_after, settings.renew_before);
        Ok(KeylessKey {
            name: name.to_string(),
            settings,
            trust,
            ledger,
            http,
            rng,
            identity: RwLock::new(first.identity.clone()),
            current: tokio::sync::Mutex::new(Current {
                renew_at,
                cert: first,
            }),
        })
    }

    /// The certificate to sign with now: the cached one, or a new one once the cached one
    /// is within `renew_before` of its expiry or has been revoked.
    /// A failed renewal keeps the current certificate while it has more than
    /// [`LAST_USE_MARGIN`] to live (a short Fulcio outage does not stop signing) and tries
    /// again after [`RENEW_RETRY`]; a revoked certificate is never kept.
    /// Whatever certificate results is refused (`key_revoked`) while its identity is revoked.
    async fn certificate(&self) -> Result<Arc<Certified>, KeyError> {
        let mut current = self.current.lock().await;
        let now = SystemTime::now();
        let revoked = self
            .ledger
            .as_ref()
            .and_then(|l| l.certificate_revoked(&current.cert.identity.keyid));
        if let Some(reason) = &revoked {
            tracing::warn!(
                key = %self.name,
                keyid = %current.cert.identity.keyid,
                %reason,
                "the keyless certificate was revoked: dropping it and asking Fulcio for a new one"
            );
        }
        if revoked.is_none() && now < current.renew_at {
            return self.usable(current.cert.clone());
        }
        match certify(
            &self.name,
            &self.settings,
            &self.trust,
            &self.http,
            &self.rng,
        )
        .await
        {
            Ok(fresh) => {
                let fresh = Arc::new(fresh);
                if let Some(ledger) = &self.ledger {
                    ledger
                        .record_certificate(&self.name, &fresh.identity, &fresh.leaf)
                        .await;
                }
                *self.identity.write().unwrap_or_else(|p| p.into_inner()) = fresh.identity.clone();
                *current = Current {
                    renew_at: renew_time(fresh.leaf.not_after, self.settings.renew_before),
                    cert: fresh.clone(),
                };
                self.usable(fresh)
            }
            Err(e) if revoked.is_some() => Err(unavailable(format!(
                "key {}: its certificate ({}) is revoked and no new one could be had: {e}",
                self.name, current.cert.identity.keyid
            ))),
            Err(e) if now + LAST_USE_MARGIN < current.cert.leaf.not_after => {
                tracing::warn!(
                    key = %self.name,
                    error = %e,
                    retry_in_s = RENEW_RETRY.as_secs(),
                    "renewing the keyless certificate failed; signing with the current one while it lasts"
                );
                current.renew_at = now + RENEW_RETRY;
                self.usable(current.cert.clone())
            }
            Err(e) => Err(e),
        }
    }

    /// `cert`, unless the identity it certifies is revoked (`key_revoked`).
    fn usable(&self, cert: Arc<Certified>) -> Result<Arc<Certified>, KeyError> {
        let leaf = &cert.leaf;
        if let Some(reason) = self
            .ledger
            .as_ref()
            .and_then(|l| l.identity_revoked(&leaf.issuer, &leaf.san))
        {
            return Err(KeyError::Revoked(format!(
                "key {}: the keyless identity {} (issuer {}) is revoked: {reason}",
                self.name, leaf.san, leaf.issuer
            )));
        }
        Ok(cert)
    }
}

/// A new ephemeral key and its Fulcio certificate.
/// The certificate is used only when it chains to `trust` and certifies the new key.
async fn certify(
    name: &str,
    settings: &KeylessSettings,
    trust: &FulcioTrust,
    http: &reqwest::Client,
    rng: &SystemRandom,
) -> Result<Certified, KeyError> {
    let token_file = &settings.identity_token_file;
    let token = read_token(token_file)?;
    let claims = token_claims(&token, token_file)?;
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, rng)
        .map_err(|_| unavailable("generating the ephemeral key failed"))?;
    let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8.as_ref(), rng)
        .map_err(|_| unavailable("reading the ephemeral key failed"))?;
    let public_key = PublicKey::from_raw(KeyAlgorithm::EcdsaP256Sha256, pair.public_key().as_ref())
        .map_err(|e| unavailable(format!("ephemeral key: {e}")))?;
    // Fulcio's proof of possession: a signature over the token's subject.
    let proof = pair
        .sign(rng, claims.subject.as_bytes())
        .map_err(|_| unavailable("signing the proof of possession failed"))?;
    let body = serde_json::json!({
        "credentials": { "oidcIdentityToken": token },
        "publicKeyRequest": {
            "publicKey": { "algorithm": "ECDSA", "content": public_key.to_pem() },
            "proofOfPossession": STANDARD.encode(proof.as_ref()),
        },
    });
    let url = format!(
        "{}{SIGNING_CERT_PATH}",
        settings.fulcio_url.trim_end_matches('/')
    );
    let answer = exchange(
        "Fulcio",
        &url,
        http.post(&url)
            .header(reqwest::header::ACCEPT, "application/json")
            .json(&body),
    )
    .await?;
    let chain = certificate_chain(&answer)
        .map_err(|e| unavailable(format!("Fulcio {url}: unusable answer: {e}")))?;
    let ders = chain
        .iter()
        .map(|c| pem::parse(c).map(pem::Pem::into_contents))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| unavailable(format!("Fulcio {url}: certificate: {e}")))?;
    let now = SystemTime::now();
    let leaf = trust.verify(&ders, &public_key, now).map_err(|e| {
        metrics::counter!("signer_keyless_certificates_refused_total", "key" => name.to_string())
            .increment(1);
        unavailable(format!(
            "Fulcio {url}: certificate not used, it fails the fulcio_roots check: {e}"
        ))
    })?;
    let not_after = leaf.not_after;
    if renew_time(not_after, settings.renew_before) <= now {
        tracing::warn!(
            key = %name,
            lifetime_s = not_after.duration_since(now).unwrap_or_default().as_secs(),
            renew_before_s = settings.renew_before.as_secs(),
            "the certificate lives shorter than renew_before: one Fulcio call per signature"
        );
    }
    let identity = SignerIdentity {
        keyid: public_key.keyid(),
        algorithm: KeyAlgorithm::EcdsaP256Sha256,
        source: KeySource::Fulcio,
        mode: KeyMode::Keyless,
        public_key,
        certificate_chain: chain,
    };
    tracing::info!(
        key = %name,
        keyid = %identity.keyid,
        san = %leaf.san,
        issuer = %leaf.issuer,
        token_subject = %claims.subject,
        token_issuer = %claims.issuer,
        certificate_sha256 = %leaf.sha256,
        not_after = %humantime::format_rfc3339(not_after),
        "keyless certificate issued"
    );
    metrics::counter!("signer_keyless_certificates_total", "key" => name.to_string()).increment(1);
    crate::telemetry::keys::loaded(name, &identity);
    Ok(Certified {
        pair,
        identity: Arc::new(identity),
        leaf,
    })
}

/// When to ask for the next certificate: `renew_before` ahead of the current one's expiry.
fn renew_time(not_after: SystemTime, renew_before: Duration) -> SystemTime {
    not_after
        .checked_sub(renew_before)
        .unwrap_or(SystemTime::UNIX_EPOCH)
}

/// Sends `request` to `service` (Fulcio, the TSA) and returns the body of a success answer;
/// anything else is `key_unavailable` naming the service, the URL and what went wrong.
async fn exchange(
    service: &str,
    url: &str,
    request: reqwest::RequestBuilder,
) -> Result<bytes::Bytes, KeyError> {
    let response = request.send().await.map_err(|e| {
        unavailable(format!(
            "{service} {url}: {}",
            crate::error_text::with_causes(&e)
        ))
    })?;
    let status = response.status();
    let body = response
        .bytes()
        .await
        .map_err(|e| unavailable(format!("{service} {url}: reading the answer: {e}")))?;
    if !status.is_success() {
        return Err(unavailable(format!(
            "{service} {url} answered {status}: {}",
            String::from_utf8_lossy(&body[..body.len().min(300)]).trim()
        )));
    }
    Ok(body)
}

impl KeylessKey {
    /// An RFC 3161 timestamp (the DER `TimeStampResp`) over `signature`, from the configured TSA.
    async fn timestamp(&self, tsa_url: &str, signature: &[u8]) -> Result<Vec<u8>, KeyError> {
        let imprint: [u8; 32] = Sha256::digest(signature).into();
        let mut nonce = [0u8; 8];
        self.rng
            .fill(&mut nonce)
            .map_err(|_| unavailable("no randomness for the TSA nonce"))?;
        // 52 bits: some TSAs (and the offline test peer) keep nonces as doubles.
        let nonce = (u64::from_be_bytes(nonce) & ((1 << 52) - 1)) | 1;
        let request = timestamp_request(&imprint, nonce)
            .map_err(|e| unavailable(format!("encoding the TimeStampReq: {e}")))?;
        let body = exchange(
            "TSA",
            tsa_url,
            self.http
                .post(tsa_url)
                .header(reqwest::header::CONTENT_TYPE, "application/timestamp-query")
                .body(request),
        )
        .await?;
        checked_timestamp_response(&body, &imprint, nonce)
            .map_err(|e| unavailable(format!("TSA {tsa_url}: {e}")))
    }
}

fn read_token(path: &Path) -> Result<String, KeyError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        unavailable(format!(
            "reading the identity token {}: {e}",
            path.display()
        ))
    })?;
    let token = text.trim();
    if token.is_empty() {
        return Err(unavailable(format!(
            "the identity token file {} is empty",
            path.display()
        )));
    }
    Ok(token.to_string())
}

/// What we read (without verifying: Fulcio does) from the identity token.
struct TokenClaims {
    /// `email` when present, else `sub`: what Fulcio's proof of possession signs.
    subject: String,
    issuer: String,
}

fn token_claims(token: &str, path: &Path) -> Result<TokenClaims, KeyError> {
    let not_jwt = || {
        unavailable(format!(
            "the identity token in {} is not a JWT",
            path.display()
        ))
    };
    let payload = token.split('.').nth(1).ok_or_else(not_jwt)?;
    let bytes = URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .map_err(|_| not_jwt())?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).map_err(|_| not_jwt())?;
    if let Some(exp) = claims.get("exp").and_then(|v| v.as_u64()) {
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        if exp <= now {
            return Err(unavailable(format!(
                "the identity token in {} expired {} s ago; it is read again for the next \
                 certificate",
                path.display(),
                now - exp
            )));
        }
    }
    let text = |name: &str| claims.get(name).and_then(|v| v.as_str()).map(String::from);
    let subject = text("email").or_else(|| text("sub")).ok_or_else(|| {
        unavailable(format!(
            "the identity token in {} has neither email nor sub",
            path.display()
        ))
    })?;
    Ok(TokenClaims {
        subject,
        issuer: text("iss").unwrap_or_default(),
    })
}

/// The PEM chain (leaf first) of a Fulcio v2 answer, with or without embedded SCT.
fn certificate_chain(answer: &[u8]) -> Result<Vec<String>, String> {
    let json: serde_json::Value = serde_json::from_slice(answer).map_err(|e| e.to_string())?;
    let certs = [
        "signedCertificateEmbeddedSct",
        "signedCertificateDetachedSct",
    ]
    .iter()
    .find_map(|k| json[k]["chain"]["certificates"].as_array())
    .ok_or("no signedCertificate*.chain.certificates")?;
    let config = pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF);
    let mut chain = Vec::with_capacity(certs.len());
    for c in certs {
        let text = c.as_str().ok_or("a certificate is not a string")?;
        let block = pem::parse(text).map_err(|e| e.to_string())?;
        if block.tag() != "CERTIFICATE" {
            return Err(format!("PEM block {:?} in the chain", block.tag()));
        }
        chain.push(pem::encode_config(&block, config));
    }
    if chain.is_empty() {
        return Err("empty certificate chain".into());
    }
    Ok(chain)
}

/// RFC 3161 `MessageImprint`.
#[derive(der::Sequence)]
struct MessageImprint {
    hash_algorithm: x509_cert::spki::AlgorithmIdentifierOwned,
    hashed_message: der::asn1::OctetString,
}

/// RFC 3161 `TimeStampReq` (version 1, no policy, a nonce, and the TSA's certificate asked
/// for so the token carries it).
#[derive(der::Sequence)]
struct TimeStampReq {
    version: u8,
    message_imprint: MessageImprint,
    nonce: der::asn1::Uint,
    cert_req: bool,
}

/// id-sha256 (RFC 5754; parameters absent).
const ID_SHA256: der::asn1::ObjectIdentifier =
    der::asn1::ObjectIdentifier::new_unwrap("2.16.840.1.101.3.4.2.1");

fn nonce_integer(nonce: u64) -> der::Result<der::asn1::Uint> {
    der::asn1::Uint::new(&nonce.to_be_bytes())
}

/// DER `TimeStampReq` for a SHA-256 imprint.
fn timestamp_request(imprint: &[u8; 32], nonce: u64) -> der::Result<Vec<u8>> {
    TimeStampReq {
        version: 1,
        message_imprint: MessageImprint {
            hash_algorithm: x509_cert::spki::AlgorithmIdentifierOwned {
                oid: ID_SHA256,
                parameters: None,
            },
            hashed_message: der::asn1::OctetString::new(imprint.to_vec())?,
        },
        nonce: nonce_integer(nonce)?,
        cert_req: true,
    }
    .to_der()
}

/// Checks a DER `TimeStampResp` before it goes into a bundle (whose `signedTimestamp` is
/// the whole response, as Sigstore's protobuf-specs define it): the status must be granted
/// (0) or granted with modifications (1), and its token must carry our imprint and nonce.
/// The token's CMS signature is the verifier's to check against its trusted TSA.
fn checked_timestamp_response(
    response: &[u8],
    imprint: &[u8; 32],
    nonce: u64,
) -> Result<Vec<u8>, String> {
    let malformed = |e: der::Error| format!("not a TimeStampResp: {e}");
    let mut reader = der::SliceReader::new(response).map_err(malformed)?;
    let (status, token) = reader
        .sequence(|r| {
            let status = r.sequence(|info| {
                let status = u8::decode(info)?;
                // statusString and failInfo: the status code says enough for the log
                let rest = info.remaining_len();
                info.read_slice(rest)?;
                Ok(status)
            })?;
            let token = if r.is_finished() {
                None
            } else {
                Some(r.tlv_bytes()?.to_vec())
            };
            Ok((status, token))
        })
        .map_err(malformed)?;
    if status > 1 {
        return Err(format!("the TSA refused the request (PKIStatus {status})"));
    }
    let token = token.ok_or("granted, but no timeStampToken in the answer")?;
    let mut want_imprint = vec![0x04, 0x20];
    want_imprint.extend_from_slice(imprint);
    if !contains(&token, &want_imprint) {
        return Err("the token does not stamp our signature (messageImprint differs)".into());
    }
    let want_nonce = nonce_integer(nonce)
        .and_then(|n| n.to_der())
        .map_err(|e| e.to_string())?;
    if !contains(&token, &want_nonce) {
        return Err("the token does not carry our nonce".into());
    }
    Ok(response.to_vec())
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[async_trait]
impl KeySigner for KeylessKey {
    fn name(&self) -> &str {
        &self.name
    }

    fn identity(&self) -> Arc<SignerIdentity> {
        self.identity
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    async fn sign(&self, message: &[u8]) -> Result<KeySignature, KeyError> {
        let certified = self.certificate().await?;
        let sig = certified
            .pair
            .sign(&self.rng, message)
            .map_err(|_| KeyError::Rejected("ECDSA signing failed".into()))?
            .as_ref()
            .to_vec();
        let rfc3161_timestamp = match &self.settings.tsa_url {
            Some(url) => Some(self.timestamp(url, &sig).await?),
            None => None,
        };
        Ok(KeySignature {
            sig,
            identity: certified.identity.clone(),
            rfc3161_timestamp,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamp_requests_are_der_with_imprint_nonce_and_cert_req() {
        let imprint = [0xab; 32];
        let der = timestamp_request(&imprint, 0x0102_0304).unwrap();
        let mut expected = vec![
            0x30, 0x3d, 0x02, 0x01, 0x01, 0x30, 0x2f, 0x30, 0x0b, 0x06, 0x09,
        ];
        expected.extend([0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x01]);
        expected.extend([0x04, 0x20]);
        expected.extend(imprint);
        expected.extend([0x02, 0x04, 0x01, 0x02, 0x03, 0x04]);
        expected.extend([0x01, 0x01, 0xff]);
        assert_eq!(der, expected);
        // a nonce whose top bit is set gets its leading zero (a positive INTEGER)
        let der = timestamp_request(&imprint, 0x80).unwrap();
        assert!(contains(&der, &[0x02, 0x02, 0x00, 0x80]));
    }

    fn response(status: u8, token: Option<&[u8]>) -> Vec<u8> {
        let mut body = vec![0x30, 0x03, 0x02, 0x01, status];
        if let Some(t) = token {
            body.extend_from_slice(t);
        }
        let mut out = vec![0x30, body.len() as u8];
        out.extend(body);
        out
    }

    #[test]
    fn timestamp_answers_are_checked_before_use() {
        let imprint = [7u8; 32];
        let nonce = 0x55;
        // a stand-in token: any DER element holding the imprint and the nonce
        let mut inner = vec![0x04, 0x20];
        inner.extend(imprint);
        inner.extend([0x02, 0x01, 0x55]);
        let mut token = vec![0x30, inner.len() as u8];
        token.extend(&inner);

        let granted = response(0, Some(&token));
        let ok = checked_timestamp_response(&granted, &imprint, nonce).unwrap();
        assert_eq!(ok, granted);
        assert!(checked_timestamp_response(&response(1, Some(&token)), &imprint, nonce).is_ok());
        let err =
            |r: Vec<u8>, i: &[u8; 32], n: u64| checked_timestamp_response(&r, i, n).unwrap_err();
        assert!(err(response(2, None), &imprint, nonce).contains("refused"));
        assert!(err(response(0, None), &imprint, nonce).contains("no timeStampToken"));
        assert!(err(response(0, Some(&token)), &[8u8; 32], nonce).contains("messageImprint"));
        assert!(err(response(0, Some(&token)), &imprint, 0x56).contains("nonce"));
        assert!(err(b"garbage".to_vec(), &imprint, nonce).contains("not a TimeStampResp"));
    }

    #[test]
    fn fulcio_chains_are_read_with_or_without_embedded_scts() {
        let cert = pem::encode(&pem::Pem::new("CERTIFICATE", vec![0x30, 0x00]));
        for k in [
            "signedCertificateEmbeddedSct",
            "signedCertificateDetachedSct",
        ] {
            let answer = serde_json::json!({ k: { "chain": { "certificates": [cert, cert] } } });
            assert_eq!(
                certificate_chain(answer.to_string().as_bytes())
                    .unwrap()
                    .len(),
                2
            );
        }
        assert!(certificate_chain(b"{}").is_err());
        let key = pem::encode(&pem::Pem::new("PUBLIC KEY", vec![0x30, 0x00]));
        let answer = serde_json::json!({ "signedCertificateEmbeddedSct": { "chain": { "certificates": [key] } } });
        assert!(certificate_chain(answer.to_string().as_bytes()).is_err());
    }

    #[test]
    fn identity_tokens_must_be_unexpired_jwts_with_a_subject() {
        let path = Path::new("/run/token");
        let jwt = |claims: serde_json::Value| {
            format!(
                "e30.{}.sig",
                URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims).unwrap())
            )
        };
        let c = token_claims(
            &jwt(serde_json::json!({"iss": "https://issuer", "sub": "spiffe://a/b", "exp": 4_000_000_000u64})),
            path,
        )
        .unwrap();
        assert_eq!(
            (c.subject.as_str(), c.issuer.as_str()),
            ("spiffe://a/b", "https://issuer")
        );
        let c = token_claims(
            &jwt(serde_json::json!({"sub": "x", "email": "ci@example.com"})),
            path,
        )
        .unwrap();
        assert_eq!(
            c.subject, "ci@example.com",
            "email is Fulcio's subject when present"
        );
        let msg = |t: &str| token_claims(t, path).err().map(|e| e.to_string()).unwrap();
        assert!(msg(&jwt(serde_json::json!({"sub": "x", "exp": 1}))).contains("expired"));
        assert!(msg(&jwt(serde_json::json!({"iss": "i"}))).contains("neither email nor sub"));
        assert!(msg("not-a-token").contains("not a JWT"));
    }
}
