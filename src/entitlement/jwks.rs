//! Public keys (JWK, RFC 7517) and the key sets of the Authority and the licensing service.
//!
//! Only two kinds of key are accepted: EC P-256 (ES256) and OKP Ed25519 (EdDSA, RFC 8037).
//! The signature algorithm is a property of the KEY, derived from `kty`/`crv`; a token header
//! only names it, and must name the same one. A JWK `alg` member, when present, must agree.
//!
//! Key sets come from a file or a URL. The Authority's and the licensing service's sets are
//! kept by the Entitlement actor (`signer_actors::pipeline::Entitlement`: refresh every
//! `jwks_refresh`, early reload on an unknown `kid` at most once per interval, one load in
//! flight); this module only loads and parses them ([`KeySet::load`]). [`JwksStore`] keeps
//! the operators' set of the control plane (`crate::control::auth`): it reloads it every
//! `jwks_refresh`, and early when a command names an unknown `kid`, at most once per
//! `min_interval`. A failed reload keeps the last good set.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use jsonwebtoken::{Algorithm, DecodingKey};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use super::jws::{b64url, b64url_decode};

/// Largest JWKS document accepted from a file or a URL.
pub const MAX_JWKS_BYTES: usize = 1024 * 1024;

/// JWK members that only a private (or symmetric) key has. A JWK carrying one is refused:
/// a published private key is a leak, and a DPoP proof must never carry one.
const PRIVATE_MEMBERS: [&str; 8] = ["d", "p", "q", "dp", "dq", "qi", "oth", "k"];

/// The signature algorithm of a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeyAlg {
    /// ECDSA P-256 with SHA-256 (`kty: EC`, `crv: P-256`).
    Es256,
    /// Ed25519 (`kty: OKP`, `crv: Ed25519`).
    EdDsa,
}

impl KeyAlg {
    /// The JWS `alg` name.
    pub fn name(self) -> &'static str {
        match self {
            KeyAlg::Es256 => "ES256",
            KeyAlg::EdDsa => "EdDSA",
        }
    }

    pub(crate) fn algorithm(self) -> Algorithm {
        match self {
            KeyAlg::Es256 => Algorithm::ES256,
            KeyAlg::EdDsa => Algorithm::EdDSA,
        }
    }
}

/// Why a JWK was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwkError {
    #[error("JWK is not a JSON object")]
    NotAnObject,
    #[error("JWK has the private member {0:?}")]
    PrivateMember(&'static str),
    #[error("unsupported key type kty={kty:?} crv={crv:?} (only EC P-256 and OKP Ed25519)")]
    Unsupported {
        kty: Option<String>,
        crv: Option<String>,
    },
    #[error("JWK member {name:?}: {reason}")]
    BadMember { name: &'static str, reason: String },
    #[error("JWK alg {declared:?} contradicts its key type ({derived})")]
    AlgConflict {
        declared: String,
        derived: &'static str,
    },
    #[error("JWK use {0:?} is not \"sig\"")]
    NotForSignatures(String),
    #[error("JWK is not a valid public key: {0}")]
    InvalidKey(String),
}

/// A verification key with the algorithm it implies.
#[derive(Clone)]
pub struct PublicKey {
    kid: Option<String>,
    alg: KeyAlg,
    decoding: DecodingKey,
    thumbprint: String,
}

impl std::fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PublicKey")
            .field("kid", &self.kid)
            .field("alg", &self.alg)
            .field("thumbprint", &self.thumbprint)
            .finish()
    }
}

/// RFC 7638 thumbprint of an EC P-256 key: base64url(SHA-256) of the required members in
/// lexicographic order, no whitespace. `x`/`y` must already be checked as base64url.
pub(crate) fn thumbprint_ec(x: &str, y: &str) -> String {
    let canonical = format!(r#"{{"crv":"P-256","kty":"EC","x":"{x}","y":"{y}"}}"#);
    b64url(&Sha256::digest(canonical.as_bytes()))
}

/// RFC 7638 thumbprint of an OKP Ed25519 key (RFC 8037 section 2).
pub(crate) fn thumbprint_okp(x: &str) -> String {
    let canonical = format!(r#"{{"crv":"Ed25519","kty":"OKP","x":"{x}"}}"#);
    b64url(&Sha256::digest(canonical.as_bytes()))
}

fn member<'a>(
    obj: &'a Map<String, Value>,
    name: &'static str,
) -> Result<Option<&'a str>, JwkError> {
    match obj.get(name) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(JwkError::BadMember {
            name,
            reason: "not a string".into(),
        }),
    }
}

/// A base64url coordinate of exactly `len` bytes; returns the text and the bytes.
fn coordinate<'a>(
    obj: &'a Map<String, Value>,
    name: &'static str,
    len: usize,
) -> Result<(&'a str, Vec<u8>), JwkError> {
    let text = member(obj, name)?.ok_or(JwkError::BadMember {
        name,
        reason: "missing".into(),
    })?;
    let bytes = b64url_decode(text).ok_or_else(|| JwkError::BadMember {
        name,
        reason: "not base64url without padding".into(),
    })?;
    if bytes.len() != len {
        return Err(JwkError::BadMember {
            name,
            reason: format!("{} bytes instead of {len}", bytes.len()),
        });
    }
    Ok((text, bytes))
}

impl PublicKey {
    /// Reads a public JWK. Refuses private members, other key types, and an `alg` or `use`
    /// that contradicts signing with the key's own algorithm.
    pub fn from_jwk(jwk: &Value) -> Result<Self, JwkError> {
        let obj = jwk.as_object().ok_or(JwkError::NotAnObject)?;
        if let Some(m) = PRIVATE_MEMBERS.iter().find(|m| obj.contains_key(**m)) {
            return Err(JwkError::PrivateMember(m));
        }
        let kty = member(obj, "kty")?;
        let crv = member(obj, "crv")?;
        let (alg, decoding, thumbprint) = match (kty, crv) {
            (Some("EC"), Some("P-256")) => {
                let (x, xb) = coordinate(obj, "x", 32)?;
                let (y, yb) = coordinate(obj, "y", 32)?;
                let mut sec1 = Vec::with_capacity(65);
                sec1.push(0x04);
                sec1.extend_from_slice(&xb);
                sec1.extend_from_slice(&yb);
                (
                    KeyAlg::Es256,
                    DecodingKey::from_ec_der(&sec1),
                    thumbprint_ec(x, y),
                )
            }
            (Some("OKP"), Some("Ed25519")) => {
                let (x, xb) = coordinate(obj, "x", 32)?;
                (
                    KeyAlg::EdDsa,
                    DecodingKey::from_ed_der(&xb),
                    thumbprint_okp(x),
                )
            }
            _ => {
                return Err(JwkError::Unsupported {
                    kty: kty.map(str::to_owned),
                    crv: crv.map(str::to_owned),
                });
            }
        };
        if let Some(declared) = member(obj, "alg")?
            && declared != alg.name()
        {
            return Err(JwkError::AlgConflict {
                declared: declared.into(),
                derived: alg.name(),
            });
        }
        if let Some(use_) = member(obj, "use")?
            && use_ != "sig"
        {
            return Err(JwkError::NotForSignatures(use_.into()));
        }
        // Building the verifier parses the point (on the curve, not the identity): an empty
        // signature then fails to verify (Ok(false)), while a bad key fails to load (Err).
        jsonwebtoken::crypto::verify("", b"", &decoding, alg.algorithm())
            .map_err(|e| JwkError::InvalidKey(e.to_string()))?;
        Ok(PublicKey {
            kid: member(obj, "kid")?.map(str::to_owned),
            alg,
            decoding,
            thumbprint,
        })
    }

    /// The `kid` it was published under.
    pub fn kid(&self) -> Option<&str> {
        self.kid.as_deref()
    }

    /// The only algorithm signatures by this key may use.
    pub fn alg(&self) -> KeyAlg {
        self.alg
    }

    /// Names this key in the Entitlement actor's cache: its kid and its thumbprint, so that
    /// a cached token stops counting when either changes.
    pub fn key_id(&self) -> String {
        format!("{}#{}", self.kid.as_deref().unwrap_or(""), self.thumbprint)
    }

    /// Its RFC 7638 SHA-256 thumbprint (base64url).
    pub fn thumbprint(&self) -> &str {
        &self.thumbprint
    }

    pub(crate) fn decoding(&self) -> &DecodingKey {
        &self.decoding
    }
}

/// Why a JWKS could not be (re)loaded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwksError {
    #[error("{path}: {reason}")]
    Read { path: String, reason: String },
    #[error("{url}: {reason}")]
    Fetch { url: String, reason: String },
    #[error("not a JWKS (a JSON object with a \"keys\" array): {0}")]
    Parse(String),
    #[error("key #{index} (kid {kid:?}) carries private key material; publish public keys only")]
    PrivateKey { index: usize, kid: Option<String> },
    #[error("kid {0:?} appears more than once")]
    DuplicateKid(String),
    #[error("no usable key (EC P-256 or OKP Ed25519){}", skipped_note(.0))]
    NoUsableKeys(Vec<String>),
}

fn skipped_note(skipped: &[String]) -> String {
    if skipped.is_empty() {
        String::new()
    } else {
        format!("; skipped: {}", skipped.join("; "))
    }
}

/// A loaded key set.
#[derive(Debug, Default)]
pub struct KeySet {
    keys: Vec<Arc<PublicKey>>,
}

impl KeySet {
    /// Parses a JWKS document. Keys of other types are skipped (an Authority may publish
    /// keys for other relying parties); the notes say which and why.
    pub fn parse(bytes: &[u8]) -> Result<(KeySet, Vec<String>), JwksError> {
        let doc: Value =
            serde_json::from_slice(bytes).map_err(|e| JwksError::Parse(e.to_string()))?;
        let entries = doc
            .get("keys")
            .and_then(Value::as_array)
            .ok_or_else(|| JwksError::Parse("no \"keys\" array".into()))?;
        let mut keys = Vec::new();
        let mut skipped = Vec::new();
        let mut kids = HashSet::new();
        for (index, entry) in entries.iter().enumerate() {
            let kid = entry.get("kid").and_then(Value::as_str).map(str::to_owned);
            match PublicKey::from_jwk(entry) {
                Ok(key) => {
                    if let Some(kid) = key.kid()
                        && !kids.insert(kid.to_owned())
                    {
                        return Err(JwksError::DuplicateKid(kid.into()));
                    }
                    keys.push(Arc::new(key));
                }
                Err(JwkError::PrivateMember(_)) => {
                    return Err(JwksError::PrivateKey { index, kid });
                }
                Err(e) => skipped.push(format!("key #{index} (kid {kid:?}): {e}")),
            }
        }
        if keys.is_empty() {
            return Err(JwksError::NoUsableKeys(skipped));
        }
        Ok((KeySet { keys }, skipped))
    }

    /// The key a token names. A token without `kid` is accepted only when the set holds a
    /// single key, so that there is never a guess between keys.
    pub fn find(&self, kid: Option<&str>) -> Option<Arc<PublicKey>> {
        match kid {
            Some(kid) => self.keys.iter().find(|k| k.kid() == Some(kid)).cloned(),
            None if self.keys.len() == 1 => self.keys.first().cloned(),
            None => None,
        }
    }

    /// Whether `key` (same kid, same key material) is still published.
    pub fn contains(&self, key: &PublicKey) -> bool {
        self.keys
            .iter()
            .any(|k| k.kid() == key.kid() && k.thumbprint() == key.thumbprint())
    }

    /// Loads and parses a set from `source`, logging the keys it skipped.
    pub(crate) async fn load(name: &str, source: &JwksSource) -> Result<KeySet, JwksError> {
        let bytes = source.load().await?;
        let (set, skipped) = KeySet::parse(&bytes)?;
        for note in &skipped {
            tracing::warn!(jwks = name, source = %source.describe(), "skipping JWK: {note}");
        }
        Ok(set)
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// The Entitlement actor keeps the Authority's set; a key is known by [`PublicKey::key_id`].
impl signer_actors::ports::TokenKeys for KeySet {
    fn has_key(&self, key_id: &str) -> bool {
        self.keys.iter().any(|k| k.key_id() == key_id)
    }

    fn len(&self) -> usize {
        self.keys.len()
    }
}

/// Where a key set comes from.
#[derive(Debug, Clone)]
pub enum JwksSource {
    File(PathBuf),
    Url {
        url: String,
        client: reqwest::Client,
    },
}

impl JwksSource {
    pub(crate) fn describe(&self) -> String {
        match self {
            JwksSource::File(p) => p.display().to_string(),
            JwksSource::Url { url, .. } => url.clone(),
        }
    }

    async fn load(&self) -> Result<Vec<u8>, JwksError> {
        match self {
            JwksSource::File(path) => {
                let read = |reason: String| JwksError::Read {
                    path: path.display().to_string(),
                    reason,
                };
                let bytes = tokio::fs::read(path)
                    .await
                    .map_err(|e| read(e.to_string()))?;
                if bytes.len() > MAX_JWKS_BYTES {
                    return Err(read(format!("larger than {MAX_JWKS_BYTES} bytes")));
                }
                Ok(bytes)
            }
            JwksSource::Url { url, client } => {
                let fetch = |reason: String| JwksError::Fetch {
                    url: url.clone(),
                    reason,
                };
                let response = client
                    .get(url)
                    .header(reqwest::header::ACCEPT, "application/json")
                    .send()
                    .await
                    .map_err(|e| fetch(e.to_string()))?;
                let status = response.status();
                if !status.is_success() {
                    return Err(fetch(format!("HTTP {status}")));
                }
                // Streamed and abandoned at the cap: an endless answer costs 1 MiB at most.
                crate::capped::read_capped(response, MAX_JWKS_BYTES)
                    .await
                    .map_err(|e| fetch(e.to_string()))
            }
        }
    }
}

/// Why no key was found for a token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyLookupError {
    #[error("no key with kid {}", signer_actors::echo::echo(.0))]
    Unknown(String),
    #[error("token has no kid and the key set has {0} keys")]
    NoKid(usize),
    /// The set could not be reloaded; the kid may belong to a key we have not seen yet.
    #[error("key set unavailable: {0}")]
    Unavailable(String),
}

struct RefreshState {
    last_attempt: Option<Instant>,
    last_error: Option<String>,
}

/// The current key set of one issuer, reloaded in the background and on unknown kids.
pub struct JwksStore {
    name: &'static str,
    source: JwksSource,
    keys: RwLock<Arc<KeySet>>,
    refresh: tokio::sync::Mutex<RefreshState>,
    min_interval: Duration,
}

impl std::fmt::Debug for JwksStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwksStore")
            .field("name", &self.name)
            .field("source", &self.source.describe())
            .finish()
    }
}

/// Least time between two reloads caused by unknown kids.
pub const UNKNOWN_KID_REFRESH_INTERVAL: Duration = Duration::from_secs(30);

impl JwksStore {
    /// Loads the set once; fails when it cannot be loaded or holds no usable key.
    /// `name` ("authority", "licensing") labels logs.
    pub async fn open(
        name: &'static str,
        source: JwksSource,
        min_interval: Duration,
    ) -> Result<Arc<Self>, JwksError> {
        let bytes = source.load().await?;
        let (set, skipped) = KeySet::parse(&bytes)?;
        for note in &skipped {
            tracing::warn!(jwks = name, source = %source.describe(), "skipping JWK: {note}");
        }
        tracing::info!(jwks = name, source = %source.describe(), keys = set.len(), "key set loaded");
        Ok(Arc::new(JwksStore {
            name,
            source,
            keys: RwLock::new(Arc::new(set)),
            refresh: tokio::sync::Mutex::new(RefreshState {
                last_attempt: Some(Instant::now()),
                last_error: None,
            }),
            min_interval,
        }))
    }

    /// The current set.
    pub fn keys(&self) -> Arc<KeySet> {
        self.keys.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    async fn reload(&self, state: &mut RefreshState) -> Result<(), JwksError> {
        state.last_attempt = Some(Instant::now());
        let result = async {
            let bytes = self.source.load().await?;
            KeySet::parse(&bytes)
        }
        .await;
        match result {
            Ok((set, skipped)) => {
                for note in &skipped {
                    tracing::warn!(jwks = self.name, "skipping JWK: {note}");
                }
                *self.keys.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(set);
                state.last_error = None;
                Ok(())
            }
            Err(e) => {
                tracing::warn!(jwks = self.name, source = %self.source.describe(), error = %e,
                    "key set reload failed; keeping the last good set");
                state.last_error = Some(e.to_string());
                Err(e)
            }
        }
    }

    /// Reloads now (the periodic refresh).
    pub async fn refresh(&self) -> Result<(), JwksError> {
        let mut state = self.refresh.lock().await;
        self.reload(&mut state).await
    }

    /// The key a token names. An unknown kid causes one reload, unless one happened less
    /// than `min_interval` ago.
    pub async fn find(&self, kid: Option<&str>) -> Result<Arc<PublicKey>, KeyLookupError> {
        let current = self.keys();
        if let Some(key) = current.find(kid) {
            return Ok(key);
        }
        let Some(kid) = kid else {
            return Err(KeyLookupError::NoKid(current.len()));
        };
        let mut state = self.refresh.lock().await;
        // Someone else may have reloaded while we waited for the lock.
        if let Some(key) = self.keys().find(Some(kid)) {
            return Ok(key);
        }
        let due = state
            .last_attempt
            .is_none_or(|t| t.elapsed() >= self.min_interval);
        if due {
            tracing::info!(jwks = self.name, kid, "unknown kid: reloading the key set");
            let _ = self.reload(&mut state).await;
            if let Some(key) = self.keys().find(Some(kid)) {
                return Ok(key);
            }
        }
        match &state.last_error {
            Some(e) => Err(KeyLookupError::Unavailable(e.clone())),
            None => Err(KeyLookupError::Unknown(kid.into())),
        }
    }

    /// Reloads every `every` in the background, for as long as the store is in use.
    pub fn spawn_periodic_refresh(self: &Arc<Self>, every: Duration) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::warn!(
                jwks = self.name,
                "no tokio runtime: the key set will not be refreshed periodically"
            );
            return;
        };
        let weak = Arc::downgrade(self);
        runtime.spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(store) = weak.upgrade() else { break };
                let _ = store.refresh().await;
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use stella_signer_tools::mint::{self, MintAlg};

    #[test]
    fn jwk_rules() {
        let (_, ec) = mint::generate_signing_key(MintAlg::Es256).unwrap();
        let (_, ed) = mint::generate_signing_key(MintAlg::EdDsa).unwrap();
        let ec_v = serde_json::to_value(&ec).unwrap();
        let ed_v = serde_json::to_value(&ed).unwrap();
        assert_eq!(PublicKey::from_jwk(&ec_v).unwrap().alg(), KeyAlg::Es256);
        assert_eq!(PublicKey::from_jwk(&ed_v).unwrap().alg(), KeyAlg::EdDsa);
        assert_eq!(
            PublicKey::from_jwk(&ec_v).unwrap().thumbprint(),
            mint::jkt_of(&ec)
        );

        let with = |base: &Value, k: &str, v: Value| {
            let mut v2 = base.clone();
            v2[k] = v;
            v2
        };
        assert_eq!(
            PublicKey::from_jwk(&with(&ec_v, "d", "AAAA".into())).unwrap_err(),
            JwkError::PrivateMember("d")
        );
        assert!(matches!(
            PublicKey::from_jwk(&with(&ec_v, "alg", "EdDSA".into())).unwrap_err(),
            JwkError::AlgConflict { .. }
        ));
        assert!(matches!(
            PublicKey::from_jwk(&with(&ed_v, "use", "enc".into())).unwrap_err(),
            JwkError::NotForSignatures(_)
        ));
        assert!(matches!(
            PublicKey::from_jwk(&with(&ec_v, "crv", "P-384".into())).unwrap_err(),
            JwkError::Unsupported { .. }
        ));
        assert!(matches!(
            PublicKey::from_jwk(&serde_json::json!({"kty": "oct", "k": "c2VjcmV0"})).unwrap_err(),
            JwkError::PrivateMember("k")
        ));
        assert!(matches!(
            PublicKey::from_jwk(&with(&ed_v, "x", "AAAA".into())).unwrap_err(),
            JwkError::BadMember { name: "x", .. }
        ));
        // 32 bytes, but not a point on P-256.
        assert!(matches!(
            PublicKey::from_jwk(&with(&ec_v, "y", b64url(&[7u8; 32]).into())).unwrap_err(),
            JwkError::InvalidKey(_)
        ));
    }

    #[test]
    fn key_sets_skip_foreign_keys_and_refuse_private_ones() {
        let (_, ec) = mint::generate_signing_key(MintAlg::Es256).unwrap();
        let rsa = serde_json::json!({"kty": "RSA", "kid": "r", "n": "AQAB", "e": "AQAB"});
        let doc = serde_json::json!({"keys": [rsa, ec]});
        let (set, skipped) = KeySet::parse(doc.to_string().as_bytes()).unwrap();
        assert_eq!((set.len(), skipped.len()), (1, 1));
        assert!(set.find(ec.kid.as_deref()).is_some());
        assert!(set.find(None).is_some(), "single key: no kid needed");
        assert!(set.find(Some("other")).is_none());

        let mut private = serde_json::to_value(&ec).unwrap();
        private["d"] = "AAAA".into();
        let doc = serde_json::json!({"keys": [private]});
        assert!(matches!(
            KeySet::parse(doc.to_string().as_bytes()),
            Err(JwksError::PrivateKey { .. })
        ));
        let doc = serde_json::json!({"keys": [ec, ec]});
        assert!(matches!(
            KeySet::parse(doc.to_string().as_bytes()),
            Err(JwksError::DuplicateKid(_))
        ));
        let doc = serde_json::json!({"keys": []});
        assert!(matches!(
            KeySet::parse(doc.to_string().as_bytes()),
            Err(JwksError::NoUsableKeys(_))
        ));
    }
}

#[cfg(test)]
mod url_tests {
    use std::sync::Mutex;

    use signer_actors::error::ErrorCode;

    use super::super::EntitlementGateImpl;
    use super::super::testkit::{Fixture, KeyPair, TestGate, TestServer, code};
    use super::*;
    use stella_signer_tools::mint::{self, Jwk, MintAlg};

    #[tokio::test]
    async fn url_keys_follow_rotation_with_rate_limited_reloads() {
        let fx = Fixture::new();
        let published: Arc<Mutex<Vec<Jwk>>> = Arc::new(Mutex::new(vec![fx.authority.jwk.clone()]));
        let doc = published.clone();
        let server = TestServer::start(Arc::new(move |method: &str, path: &str, _: &Value| {
            assert_eq!((method, path), ("GET", "/jwks.json"));
            (200, mint::jwks(&doc.lock().unwrap()).to_string())
        }))
        .await;
        let mut cfg = fx.cfg.clone();
        cfg.jwks_file = None;
        cfg.jwks_url = Some(format!("{}/jwks.json", server.url()));
        let interval = Duration::from_millis(300);
        let gate = TestGate::new(
            EntitlementGateImpl::build(&cfg, None, interval, fx.clock.clone())
                .await
                .unwrap(),
        )
        .await;
        let job = |optok: &str| {
            let licence = fx.licence(&fx.licence_claims());
            fx.input(optok, Some(&fx.dpop(optok)), ("jwt", &licence))
        };
        let token_by =
            |key: &KeyPair| mint::mint_optok(&key.pem, key.kid(), &fx.optok_claims()).unwrap();
        gate.verify(&job(&token_by(&fx.authority))).await.unwrap();
        assert_eq!(gate.stats().await.authority_jwks_loads, 1);

        // The Authority rotates in a new key; a token by it triggers one reload...
        tokio::time::sleep(interval).await;
        let rotated = KeyPair::new(MintAlg::EdDsa);
        published.lock().unwrap().push(rotated.jwk.clone());
        gate.verify(&job(&token_by(&rotated))).await.unwrap();
        assert_eq!(gate.stats().await.authority_jwks_loads, 2);

        // ...but made-up kids do not reload more than once per interval.
        let stranger = KeyPair::new(MintAlg::Es256);
        for _ in 0..3 {
            assert_eq!(
                code(&gate, &job(&token_by(&stranger))).await,
                ErrorCode::AuthInvalid
            );
        }
        assert_eq!(gate.stats().await.authority_jwks_loads, 2);
        tokio::time::sleep(interval).await;
        assert_eq!(
            code(&gate, &job(&token_by(&stranger))).await,
            ErrorCode::AuthInvalid
        );
        assert_eq!(gate.stats().await.authority_jwks_loads, 3);

        // Withdrawn key: its cached tokens stop working once the set is reloaded.
        let cached = token_by(&rotated);
        gate.verify(&job(&cached)).await.unwrap();
        published
            .lock()
            .unwrap()
            .retain(|k| k.kid != rotated.jwk.kid);
        tokio::time::sleep(interval).await;
        gate.refresh().await;
        assert_eq!(code(&gate, &job(&cached)).await, ErrorCode::AuthInvalid);

        // Authority unreachable: known keys keep working from the last good set; an unknown
        // kid may be a rotation we cannot see, so it is retryable.
        server.stop().await;
        tokio::time::sleep(interval).await;
        assert_eq!(
            code(&gate, &job(&token_by(&stranger))).await,
            ErrorCode::EntitlementUnavailable
        );
        gate.verify(&job(&token_by(&fx.authority))).await.unwrap();
    }

    #[tokio::test]
    async fn startup_needs_a_reachable_jwks_url() {
        let fx = Fixture::new();
        let mut cfg = fx.cfg.clone();
        cfg.jwks_file = None;
        cfg.jwks_url = Some("http://127.0.0.1:1/jwks.json".into());
        assert!(matches!(
            EntitlementGateImpl::from_config(&cfg, None).await.err(),
            Some(super::super::EntitlementSetupError::AuthorityJwks(
                JwksError::Fetch { .. }
            ))
        ));
    }
}
