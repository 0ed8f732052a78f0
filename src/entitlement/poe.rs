//! Proof-of-Entitlement: the tenant's licence must cover signing.
//!
//! Two presentations (`poe.format` of the request):
//!
//! - `jwt`: a licence JWS verified offline with the licensing JWKS file
//!   (`gates.entitlement.poe.licensing_jwks_file`; same key rules as the Authority's).
//!   Claims: `tid` (must be the request's tenant), `plan` (string, selects the quota plan),
//!   `features` (array; must contain `signer.sign`), `exp` (unix seconds), optional
//!   `revoked: true`. Verified licences are cached until they expire.
//!
//! - `introspect`: an opaque value checked with the licensing service:
//!
//!   ```text
//!   POST {introspect_url}/license/introspect
//!   Content-Type: application/json
//!   {"token": "<poe.value>", "tenant": "<request tenant>"}
//!
//!   200 OK
//!   {"active": true, "tid": "acme", "plan": "team", "features": ["signer.sign"], "exp": 1767225600}
//!   ```
//!
//!   `active: false` means the licence does not (or no longer) apply: `entitlement_denied`.
//!   `tid`, `plan` and `exp` may be left out of an inactive answer. A 400, 404 or 422 answer
//!   means the service rejects the value itself (`poe_invalid`). Anything else that is not a
//!   2xx answer with that JSON (connect error, timeout, 5xx, 401/403/429, an unreadable body)
//!   is an outage.
//!
//!   Answers are cached per value and tenant for `cache_ttl`. During an outage a cached answer
//!   up to `cache_ttl + grace` old is used; without one the job fails with the retryable
//!   `entitlement_unavailable`, so that a licensing outage delays jobs instead of failing them.
//!   The cache and the grace are measured by the current time (they are about the licensing
//!   service's availability, and its answer is its view now); the answer's `exp` is judged at
//!   the job's publish time, like every other date.
//!
//! Licence dates (`exp`, `nbf`, with the clock skew) are judged at the job's publish time
//! (`docs/contract.md#freshness`), on every use: cached licences are re-judged per job.
//!
//! `bypass = true` skips all of this (an emergency switch): every decision is recorded as
//! `bypassed` with `bypass_plan`, and logged.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::Value;
use sha2::{Digest, Sha256};
use signer_actors::audit::PoeState;
use signer_actors::error::SignerError;
use signer_actors::request::{Poe, PoeFormat};

use super::Verified;
use super::cache::TtlCache;
use super::clock::{Clock, SystemClock};
use super::jwks::{JwksStore, KeyLookupError, PublicKey};
use super::jws::{self, JwsError, numeric_date};

/// The feature a licence must grant for signing.
pub const SIGN_FEATURE: &str = "signer.sign";

/// How many licences and introspection answers are kept.
pub const LICENCE_CACHE_CAPACITY: usize = 100_000;
/// Largest introspection answer read: an answer is a few hundred bytes of claims.
pub const MAX_INTROSPECTION_BYTES: usize = 64 * 1024;

/// How often (at most) a bypassed decision is logged.
const BYPASS_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// The claims of a verified licence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Licence {
    pub tid: String,
    pub plan: String,
    pub features: Vec<String>,
    pub exp: u64,
    /// Not valid before (unix seconds), when the licence says.
    pub nbf: Option<u64>,
    pub revoked: bool,
}

/// Why the Proof-of-Entitlement was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PoeError {
    #[error(
        "poe.format {format:?} is not accepted: gates.entitlement.poe.{setting} is not configured"
    )]
    NotConfigured {
        format: &'static str,
        setting: &'static str,
    },
    #[error("licence: {0}")]
    Jws(#[from] JwsError),
    #[error("no licensing key with kid {}", signer_actors::echo::echo(.0))]
    UnknownKey(String),
    #[error("licence: {0}")]
    NoKid(String),
    #[error("licence claim {0} is missing or malformed")]
    BadClaim(&'static str),
    #[error("licence is for tenant {}, the request names {}", signer_actors::echo::echo_opt(found.as_deref()), signer_actors::echo::echo(expected))]
    WrongTenant {
        expected: String,
        found: Option<String>,
    },
    #[error("licence expired at {exp}")]
    Expired { exp: u64, plan: Option<String> },
    #[error("licence not valid before {nbf}")]
    NotYetValid { nbf: u64 },
    #[error("licence is revoked")]
    Revoked { plan: String },
    #[error(
        "plan {} does not include {SIGN_FEATURE}",
        signer_actors::echo::echo(plan)
    )]
    FeatureMissing { plan: String },
    #[error("licence is not active")]
    Inactive,
    #[error("licensing service rejected the value (HTTP {0})")]
    Rejected(u16),
    #[error("licensing unavailable and no cached verdict within grace: {0}")]
    Unavailable(String),
}

impl PoeError {
    /// The audit state of this refusal.
    pub fn state(&self) -> PoeState {
        match self {
            PoeError::Expired { .. } | PoeError::NotYetValid { .. } => PoeState::Expired,
            PoeError::Revoked { .. } | PoeError::FeatureMissing { .. } | PoeError::Inactive => {
                PoeState::Denied
            }
            PoeError::Unavailable(_) => PoeState::Unavailable,
            _ => PoeState::Invalid,
        }
    }

    /// The plan, when the licence was read far enough to know it.
    pub fn plan(&self) -> Option<&str> {
        match self {
            PoeError::Revoked { plan } | PoeError::FeatureMissing { plan } => Some(plan),
            PoeError::Expired { plan, .. } => plan.as_deref(),
            _ => None,
        }
    }
}

impl From<PoeError> for SignerError {
    fn from(e: PoeError) -> Self {
        let msg = e.to_string();
        match e {
            PoeError::Expired { .. } | PoeError::NotYetValid { .. } => SignerError::PoeExpired(msg),
            PoeError::Revoked { .. } | PoeError::FeatureMissing { .. } | PoeError::Inactive => {
                SignerError::EntitlementDenied(msg)
            }
            PoeError::Unavailable(_) => SignerError::EntitlementUnavailable(msg),
            _ => SignerError::PoeInvalid(msg),
        }
    }
}

/// What the PoE check established.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoeGrant {
    /// `Valid` or `Bypassed`.
    pub state: PoeState,
    pub plan: String,
}

/// The terms of a licence, however it was presented.
struct Terms<'a> {
    tid: Option<&'a str>,
    plan: Option<&'a str>,
    features: &'a [String],
    exp: Option<u64>,
    nbf: Option<u64>,
    revoked: bool,
}

/// Whether `terms` let `tenant` sign at `now` (the job's publish time), with the contract
/// code when they do not. Cached and fresh licences both come through here, so a cache hit
/// is judged at its own job's time.
fn evaluate(terms: Terms<'_>, tenant: &str, now: u64, skew: u64) -> Result<PoeGrant, PoeError> {
    let Terms {
        tid,
        plan,
        features,
        exp,
        nbf,
        revoked,
    } = terms;
    if tid != Some(tenant) {
        return Err(PoeError::WrongTenant {
            expected: tenant.into(),
            found: tid.map(str::to_owned),
        });
    }
    if let Some(exp) = exp
        && exp.saturating_add(skew) < now
    {
        return Err(PoeError::Expired {
            exp,
            plan: plan.map(str::to_owned),
        });
    }
    if let Some(nbf) = nbf
        && nbf > now.saturating_add(skew)
    {
        return Err(PoeError::NotYetValid { nbf });
    }
    let plan = plan
        .filter(|p| !p.is_empty())
        .ok_or(PoeError::BadClaim("plan"))?;
    if revoked {
        return Err(PoeError::Revoked { plan: plan.into() });
    }
    if !features.iter().any(|f| f == SIGN_FEATURE) {
        return Err(PoeError::FeatureMissing { plan: plan.into() });
    }
    Ok(PoeGrant {
        state: PoeState::Valid,
        plan: plan.into(),
    })
}

#[derive(Deserialize)]
struct RawLicence {
    tid: Option<String>,
    plan: Option<String>,
    features: Option<Vec<String>>,
    exp: Option<Value>,
    nbf: Option<Value>,
    revoked: Option<bool>,
}

struct CachedLicence {
    licence: Verified<Licence>,
    key: Arc<PublicKey>,
}

/// Offline licences (`format: jwt`).
pub struct JwtLicences {
    keys: Arc<JwksStore>,
    skew: u64,
    cache: TtlCache<[u8; 32], Arc<CachedLicence>, u64>,
    signature_checks: AtomicU64,
}

impl JwtLicences {
    pub fn new(keys: Arc<JwksStore>, skew: u64) -> Self {
        JwtLicences {
            keys,
            skew,
            cache: TtlCache::new(LICENCE_CACHE_CAPACITY),
            signature_checks: AtomicU64::new(0),
        }
    }

    /// Verifies the licence's signature and claim types (cached until it expires). Its
    /// dates are judged by the caller, for each job (`evaluate`).
    pub async fn licence(&self, raw: &str, now: u64) -> Result<Verified<Licence>, PoeError> {
        let id: [u8; 32] = Sha256::digest(raw.as_bytes()).into();
        if let Some(hit) = self.cache.get(&id, now) {
            if self.keys.keys().contains(&hit.key) {
                return Ok(hit.licence.clone());
            }
            self.cache.remove(&id);
        }
        let header = jws::read_header(raw)?;
        let key = self
            .keys
            .find(header.kid.as_deref())
            .await
            .map_err(|e| match e {
                KeyLookupError::Unknown(kid) => PoeError::UnknownKey(kid),
                KeyLookupError::NoKid(_) => PoeError::NoKid(e.to_string()),
                // The licensing JWKS is a local file: an unreadable file is a fault of ours,
                // and the job is worth retrying once it is fixed.
                KeyLookupError::Unavailable(reason) => PoeError::Unavailable(reason),
            })?;
        self.signature_checks.fetch_add(1, Ordering::Relaxed);
        let c: RawLicence = jws::verify(raw, &header, &key)?;
        let date = |v: Option<Value>, name: &'static str| -> Result<Option<u64>, PoeError> {
            v.map(|v| numeric_date(&v).ok_or(PoeError::BadClaim(name)))
                .transpose()
        };
        let exp = date(c.exp, "exp")?.ok_or(PoeError::BadClaim("exp"))?;
        let nbf = date(c.nbf, "nbf")?;
        let licence = Licence {
            tid: c.tid.ok_or(PoeError::BadClaim("tid"))?,
            plan: c.plan.ok_or(PoeError::BadClaim("plan"))?,
            features: c.features.unwrap_or_default(),
            exp,
            nbf,
            revoked: c.revoked.unwrap_or(false),
        };
        let licence = Verified(licence);
        let expires = exp.saturating_add(self.skew).saturating_add(1);
        if expires > now {
            self.cache.insert(
                id,
                Arc::new(CachedLicence {
                    licence: licence.clone(),
                    key,
                }),
                expires,
                now,
            );
        }
        Ok(licence)
    }

    async fn check(&self, raw: &str, tenant: &str, now: u64) -> Result<PoeGrant, PoeError> {
        let l = self.licence(raw, now).await?;
        let terms = Terms {
            tid: Some(&l.tid),
            plan: Some(&l.plan),
            features: &l.features,
            exp: Some(l.exp),
            nbf: l.nbf,
            revoked: l.revoked,
        };
        evaluate(terms, tenant, now, self.skew)
    }
}

/// The licensing service's answer (see the module documentation).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct IntrospectAnswer {
    pub active: bool,
    #[serde(default)]
    pub tid: Option<String>,
    #[serde(default)]
    pub plan: Option<String>,
    #[serde(default)]
    pub features: Vec<String>,
    #[serde(default)]
    pub exp: Option<u64>,
}

#[derive(Debug, Clone)]
enum Verdict {
    Answer(IntrospectAnswer),
    Rejected(u16),
}

struct CachedVerdict {
    at: Instant,
    verdict: Verdict,
}

/// Opaque licences checked with the licensing service (`format: introspect`).
pub struct Introspector {
    endpoint: String,
    client: reqwest::Client,
    ttl: Duration,
    grace: Duration,
    skew: u64,
    cache: TtlCache<[u8; 32], Arc<CachedVerdict>, Instant>,
    calls: AtomicU64,
    clock: Arc<dyn Clock>,
}

impl Introspector {
    /// `base_url` is `introspect_url`; the endpoint is `{base_url}/license/introspect`.
    pub fn new(
        base_url: &str,
        client: reqwest::Client,
        ttl: Duration,
        grace: Duration,
        skew: u64,
    ) -> Self {
        Introspector {
            endpoint: format!("{}/license/introspect", base_url.trim_end_matches('/')),
            client,
            ttl,
            grace,
            skew,
            cache: TtlCache::new(LICENCE_CACHE_CAPACITY),
            calls: AtomicU64::new(0),
            clock: Arc::new(SystemClock),
        }
    }

    /// Measures the cache's ages with `clock` instead of the machine's clock.
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// Requests sent to the licensing service so far.
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }

    async fn ask(&self, value: &str, tenant: &str) -> Result<Verdict, String> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        let response = self
            .client
            .post(&self.endpoint)
            .json(&serde_json::json!({"token": value, "tenant": tenant}))
            .send()
            .await
            .map_err(|e| format!("{}: {e}", self.endpoint))?;
        let status = response.status();
        if status.is_success() {
            // Streamed and abandoned at the cap: an endless answer is "unavailable".
            let body = crate::capped::read_capped(response, MAX_INTROSPECTION_BYTES)
                .await
                .map_err(|e| format!("{}: {e}", self.endpoint))?;
            return serde_json::from_slice::<IntrospectAnswer>(&body)
                .map(Verdict::Answer)
                .map_err(|e| format!("{}: unreadable answer: {e}", self.endpoint));
        }
        match status.as_u16() {
            400 | 404 | 422 => Ok(Verdict::Rejected(status.as_u16())),
            _ => Err(format!("{}: HTTP {status}", self.endpoint)),
        }
    }

    async fn check(&self, value: &str, tenant: &str, now: u64) -> Result<PoeGrant, PoeError> {
        let mut id = Sha256::new();
        id.update(Sha256::digest(value.as_bytes()));
        id.update(tenant.as_bytes());
        let id: [u8; 32] = id.finalize().into();
        let now_mono = self.clock.now();
        let cached = self.cache.get(&id, now_mono);
        let verdict = match cached {
            Some(c) if now_mono.saturating_duration_since(c.at) < self.ttl => c.verdict.clone(),
            _ => match self.ask(value, tenant).await {
                Ok(verdict) => {
                    metrics::counter!("signer_licensing_requests_total", "outcome" => "answered")
                        .increment(1);
                    let at = self.clock.now();
                    self.cache.insert(
                        id,
                        Arc::new(CachedVerdict {
                            at,
                            verdict: verdict.clone(),
                        }),
                        at + self.ttl + self.grace,
                        at,
                    );
                    verdict
                }
                // The cache only returns answers younger than ttl + grace.
                Err(reason) => {
                    metrics::counter!("signer_licensing_requests_total", "outcome" => "unavailable").increment(1);
                    match cached {
                        Some(c) => {
                            let age = self.clock.now().saturating_duration_since(c.at);
                            tracing::warn!(error = %reason, age_ms = age.as_millis() as u64,
                                "licensing unavailable: using a cached verdict within grace");
                            c.verdict.clone()
                        }
                        None => return Err(PoeError::Unavailable(reason)),
                    }
                }
            },
        };
        match verdict {
            Verdict::Rejected(status) => Err(PoeError::Rejected(status)),
            Verdict::Answer(a) if !a.active => Err(PoeError::Inactive),
            Verdict::Answer(a) => {
                let terms = Terms {
                    tid: a.tid.as_deref(),
                    plan: a.plan.as_deref(),
                    features: &a.features,
                    exp: a.exp,
                    nbf: None,
                    revoked: false,
                };
                evaluate(terms, tenant, now, self.skew)
            }
        }
    }
}

/// The PoE check: bypass, or one of the two formats.
pub struct PoeVerifier {
    bypass_plan: Option<String>,
    jwt: Option<JwtLicences>,
    introspect: Option<Introspector>,
    last_bypass_log: Mutex<Option<Instant>>,
    bypassed_unlogged: AtomicU64,
}

impl PoeVerifier {
    pub fn new(
        bypass_plan: Option<String>,
        jwt: Option<JwtLicences>,
        introspect: Option<Introspector>,
    ) -> Self {
        PoeVerifier {
            bypass_plan,
            jwt,
            introspect,
            last_bypass_log: Mutex::new(None),
            bypassed_unlogged: AtomicU64::new(0),
        }
    }

    /// Licensing calls so far (format `introspect`).
    pub fn introspect_calls(&self) -> u64 {
        self.introspect.as_ref().map_or(0, Introspector::calls)
    }

    /// Licence signature checks so far (format `jwt`).
    pub fn licence_signature_checks(&self) -> u64 {
        self.jwt
            .as_ref()
            .map_or(0, |j| j.signature_checks.load(Ordering::Relaxed))
    }

    fn log_bypass(&self, tenant: &str) {
        let count = self.bypassed_unlogged.fetch_add(1, Ordering::Relaxed) + 1;
        let mut last = self
            .last_bypass_log
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if last.is_none_or(|t| t.elapsed() >= BYPASS_LOG_INTERVAL) {
            *last = Some(Instant::now());
            self.bypassed_unlogged.store(0, Ordering::Relaxed);
            tracing::warn!(
                tenant,
                decisions = count,
                "PoE BYPASSED: licence not checked (gates.entitlement.poe.bypass = true); audited as \"bypassed\""
            );
        }
    }

    /// Checks the request's PoE for `tenant` at `now` (unix seconds).
    pub async fn verify(&self, poe: &Poe, tenant: &str, now: u64) -> Result<PoeGrant, PoeError> {
        if let Some(plan) = &self.bypass_plan {
            self.log_bypass(tenant);
            return Ok(PoeGrant {
                state: PoeState::Bypassed,
                plan: plan.clone(),
            });
        }
        match poe.format {
            PoeFormat::Jwt => match &self.jwt {
                Some(jwt) => jwt.check(&poe.value, tenant, now).await,
                None => Err(PoeError::NotConfigured {
                    format: "jwt",
                    setting: "licensing_jwks_file",
                }),
            },
            PoeFormat::Introspect => match &self.introspect {
                Some(i) => i.check(&poe.value, tenant, now).await,
                None => Err(PoeError::NotConfigured {
                    format: "introspect",
                    setting: "introspect_url",
                }),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;

    use serde_json::json;
    use signer_actors::audit::{AuthState, PoeState};
    use signer_actors::error::ErrorCode;
    use signer_actors::ports::{GateDenial, GateInput};

    use super::super::mint;
    use super::super::testkit::{self, Fixture, TestServer, deny, now};
    use super::*;

    /// A job with a good OpTok and proof and this PoE.
    fn job(fx: &Fixture, format: &str, value: &str) -> GateInput {
        let optok = fx.optok(&fx.optok_claims());
        fx.input(&optok, Some(&fx.dpop(&optok)), (format, value))
    }

    fn licence_with(fx: &Fixture, change: impl FnOnce(&mut Value)) -> String {
        let mut c = fx.licence_claims();
        change(&mut c);
        fx.licence(&c)
    }

    fn assert_denial(
        d: &GateDenial,
        code: ErrorCode,
        poe: PoeState,
        plan: Option<&str>,
        name: &str,
    ) {
        assert_eq!(d.error.code(), code, "{name}: {}", d.error);
        assert_eq!(d.poe, Some(poe), "{name}");
        assert_eq!(d.plan.as_deref(), plan, "{name}");
        assert_eq!(
            d.auth,
            Some(AuthState::Valid),
            "{name}: auth passed before PoE"
        );
        assert!(d.caller.is_some(), "{name}");
    }

    #[tokio::test]
    async fn licence_jwts() {
        let fx = Fixture::new();
        let gate = fx.gate().await;

        let good = fx.licence(&fx.licence_claims());
        let v = gate.verify(&job(&fx, "jwt", &good)).await.unwrap();
        assert_eq!((v.poe, v.plan.as_str()), (PoeState::Valid, "team"));

        let cases: Vec<(&str, String, ErrorCode, PoeState, Option<&str>)> = vec![
            (
                "tampered",
                testkit::tamper(&good, |c| c["plan"] = "enterprise".into()),
                ErrorCode::PoeInvalid,
                PoeState::Invalid,
                None,
            ),
            (
                "signed by the Authority",
                mint::mint_poe(&fx.authority.pem, fx.licensing.kid(), &fx.licence_claims())
                    .unwrap(),
                ErrorCode::PoeInvalid,
                PoeState::Invalid,
                None,
            ),
            (
                "unknown kid",
                mint::mint_poe(&fx.licensing.pem, "nope", &fx.licence_claims()).unwrap(),
                ErrorCode::PoeInvalid,
                PoeState::Invalid,
                None,
            ),
            (
                "malformed",
                "x.y.z".into(),
                ErrorCode::PoeInvalid,
                PoeState::Invalid,
                None,
            ),
            (
                "another tenant's",
                licence_with(&fx, |c| c["tid"] = "globex".into()),
                ErrorCode::PoeInvalid,
                PoeState::Invalid,
                None,
            ),
            (
                "no plan",
                licence_with(&fx, |c| {
                    c.as_object_mut().unwrap().remove("plan");
                }),
                ErrorCode::PoeInvalid,
                PoeState::Invalid,
                None,
            ),
            (
                "no exp",
                licence_with(&fx, |c| {
                    c.as_object_mut().unwrap().remove("exp");
                }),
                ErrorCode::PoeInvalid,
                PoeState::Invalid,
                None,
            ),
            (
                "expired",
                licence_with(&fx, |c| c["exp"] = (now() - 3600).into()),
                ErrorCode::PoeExpired,
                PoeState::Expired,
                Some("team"),
            ),
            (
                "not yet valid",
                licence_with(&fx, |c| c["nbf"] = (now() + 3600).into()),
                ErrorCode::PoeExpired,
                PoeState::Expired,
                None,
            ),
            (
                "feature missing",
                licence_with(&fx, |c| c["features"] = json!(["export"])),
                ErrorCode::EntitlementDenied,
                PoeState::Denied,
                Some("team"),
            ),
            (
                "no features",
                licence_with(&fx, |c| {
                    c.as_object_mut().unwrap().remove("features");
                }),
                ErrorCode::EntitlementDenied,
                PoeState::Denied,
                Some("team"),
            ),
            (
                "revoked",
                licence_with(&fx, |c| c["revoked"] = true.into()),
                ErrorCode::EntitlementDenied,
                PoeState::Denied,
                Some("team"),
            ),
        ];
        for (name, value, code, state, plan) in cases {
            let d = deny(&gate, &job(&fx, "jwt", &value)).await;
            assert_denial(&d, code, state, plan, name);
        }

        // Verified once, then served from the cache (still checked per job).
        let checks = gate.stats().await.licence_signature_checks;
        gate.verify(&job(&fx, "jwt", &good)).await.unwrap();
        gate.verify(&job(&fx, "jwt", &good)).await.unwrap();
        assert_eq!(gate.stats().await.licence_signature_checks, checks);
    }

    #[tokio::test]
    async fn a_format_without_configuration_is_poe_invalid() {
        let fx = Fixture::new();
        let gate = fx.gate().await;
        let d = deny(&gate, &job(&fx, "introspect", "opaque")).await;
        assert_denial(
            &d,
            ErrorCode::PoeInvalid,
            PoeState::Invalid,
            None,
            "introspect",
        );
        assert!(d.error.message().contains("introspect_url"), "{}", d.error);

        let mut fx2 = Fixture::new();
        fx2.cfg.poe.licensing_jwks_file = None;
        fx2.cfg.poe.introspect_url = Some("http://127.0.0.1:1".into());
        let gate = fx2.gate().await;
        let d = deny(
            &gate,
            &job(&fx2, "jwt", &fx2.licence(&fx2.licence_claims())),
        )
        .await;
        assert_denial(&d, ErrorCode::PoeInvalid, PoeState::Invalid, None, "jwt");
        assert!(
            d.error.message().contains("licensing_jwks_file"),
            "{}",
            d.error
        );
    }

    #[tokio::test]
    async fn bypass_skips_the_licence_and_says_so() {
        let mut fx = Fixture::new();
        fx.cfg.poe.bypass = true;
        fx.cfg.poe.bypass_plan = "emergency".into();
        let gate = fx.gate().await;
        let v = gate
            .verify(&job(&fx, "jwt", "not-even-a-licence"))
            .await
            .unwrap();
        assert_eq!((v.poe, v.plan.as_str()), (PoeState::Bypassed, "emergency"));
        assert_eq!(v.auth, AuthState::Valid);
    }

    /// A licensing service: `good`, `inactive`, `other-tenant`, `no-feature`, `expired`,
    /// anything else is unknown (404). Answers 503 while `failing` is set.
    async fn licensing(failing: Arc<AtomicBool>) -> TestServer {
        TestServer::start(Arc::new(move |method: &str, path: &str, body: &Value| {
            if failing.load(Ordering::SeqCst) {
                return (503, "{}".into());
            }
            assert_eq!((method, path), ("POST", "/license/introspect"));
            let tenant = body["tenant"].as_str().unwrap_or_default().to_owned();
            let answer = |tid: &str, features: Value, exp: u64| {
                json!({"active": true, "tid": tid, "plan": "enterprise", "features": features, "exp": exp}).to_string()
            };
            let later = now() + 3600;
            match body["token"].as_str().unwrap_or_default() {
                "good" => (200, answer(&tenant, json!(["signer.sign"]), later)),
                "inactive" => (200, json!({"active": false}).to_string()),
                "other-tenant" => (200, answer("globex", json!(["signer.sign"]), later)),
                "no-feature" => (200, answer(&tenant, json!(["export"]), later)),
                "expired" => (200, answer(&tenant, json!(["signer.sign"]), now() - 3600)),
                "garbled" => (200, "{\"active\": \"yes\"}".into()),
                _ => (404, "{}".into()),
            }
        }))
        .await
    }

    fn introspect_fixture(server: &TestServer, ttl_ms: u64, grace_ms: u64) -> Fixture {
        let mut fx = Fixture::new();
        fx.cfg.poe.licensing_jwks_file = None;
        fx.cfg.poe.introspect_url = Some(format!("{}/", server.url()));
        fx.cfg.poe.cache_ttl = Duration::from_millis(ttl_ms);
        fx.cfg.poe.grace = Duration::from_millis(grace_ms);
        fx
    }

    #[tokio::test]
    async fn introspection_answers_are_cached_and_judged() {
        let failing = Arc::new(AtomicBool::new(false));
        let server = licensing(failing.clone()).await;
        let fx = introspect_fixture(&server, 60_000, 60_000);
        let gate = fx.gate().await;

        for _ in 0..3 {
            let v = gate.verify(&job(&fx, "introspect", "good")).await.unwrap();
            assert_eq!((v.poe, v.plan.as_str()), (PoeState::Valid, "enterprise"));
        }
        assert_eq!(server.calls(), 1, "one call, then the cache");
        assert_eq!(gate.stats().await.introspect_calls, 1);

        for (value, code, state, plan) in [
            (
                "inactive",
                ErrorCode::EntitlementDenied,
                PoeState::Denied,
                None,
            ),
            (
                "other-tenant",
                ErrorCode::PoeInvalid,
                PoeState::Invalid,
                None,
            ),
            (
                "no-feature",
                ErrorCode::EntitlementDenied,
                PoeState::Denied,
                Some("enterprise"),
            ),
            (
                "expired",
                ErrorCode::PoeExpired,
                PoeState::Expired,
                Some("enterprise"),
            ),
            ("unknown", ErrorCode::PoeInvalid, PoeState::Invalid, None),
        ] {
            for _ in 0..2 {
                let d = deny(&gate, &job(&fx, "introspect", value)).await;
                assert_denial(&d, code, state, plan, value);
            }
        }
        assert_eq!(server.calls(), 6, "refusals are cached too");

        // An unreadable answer is an outage, not the caller's fault.
        let d = deny(&gate, &job(&fx, "introspect", "garbled")).await;
        assert_denial(
            &d,
            ErrorCode::EntitlementUnavailable,
            PoeState::Unavailable,
            None,
            "garbled",
        );
        server.stop().await;
    }

    #[tokio::test]
    async fn during_an_outage_cached_verdicts_serve_until_grace_ends() {
        let failing = Arc::new(AtomicBool::new(false));
        let server = licensing(failing.clone()).await;
        let fx = introspect_fixture(&server, 200, 600);
        let gate = fx.gate().await;

        gate.verify(&job(&fx, "introspect", "good")).await.unwrap();
        assert_eq!(server.calls(), 1);
        fx.clock.advance(Duration::from_millis(250));

        // Past the TTL: licensing is asked again; it answers 503, the cached verdict serves.
        failing.store(true, Ordering::SeqCst);
        let v = gate.verify(&job(&fx, "introspect", "good")).await.unwrap();
        assert_eq!(v.poe, PoeState::Valid);
        assert_eq!(server.calls(), 2);
        // A value never seen has nothing to fall back on.
        let d = deny(&gate, &job(&fx, "introspect", "inactive")).await;
        assert_denial(
            &d,
            ErrorCode::EntitlementUnavailable,
            PoeState::Unavailable,
            None,
            "uncached",
        );
        assert!(d.error.code().retryable());

        // Licensing gone entirely (connection refused): still within TTL + grace.
        server.stop().await;
        gate.verify(&job(&fx, "introspect", "good")).await.unwrap();

        // Still within TTL + grace on its last millisecond...
        fx.clock.advance(Duration::from_millis(549));
        gate.verify(&job(&fx, "introspect", "good")).await.unwrap();
        // ...and past it (800 ms after the answer): unavailable, retryable.
        fx.clock.advance(Duration::from_millis(1));
        let d = deny(&gate, &job(&fx, "introspect", "good")).await;
        assert_denial(
            &d,
            ErrorCode::EntitlementUnavailable,
            PoeState::Unavailable,
            None,
            "after grace",
        );
        assert!(d.error.code().retryable());
    }

    /// `signer_licensing_requests_total{outcome}` counts answers and failed calls, the series
    /// the licensing outage alert watches.
    #[test]
    fn licensing_calls_are_counted_by_outcome() {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        // a current-thread runtime: every task runs on this thread, under the local recorder
        metrics::with_local_recorder(&recorder, || {
            runtime.block_on(async {
                let failing = Arc::new(AtomicBool::new(true));
                let server = licensing(failing.clone()).await;
                let fx = introspect_fixture(&server, 0, 0);
                let gate = fx.gate().await;
                let d = deny(&gate, &job(&fx, "introspect", "good")).await;
                assert_eq!(d.error.code(), ErrorCode::EntitlementUnavailable);
                failing.store(false, Ordering::SeqCst);
                gate.verify(&job(&fx, "introspect", "good")).await.unwrap();
                server.stop().await;
            });
        });
        let text = handle.render();
        for line in [
            "signer_licensing_requests_total{outcome=\"unavailable\"} 1",
            "signer_licensing_requests_total{outcome=\"answered\"} 1",
        ] {
            assert!(text.contains(line), "{line} not in\n{text}");
        }
    }

    #[tokio::test]
    async fn licensing_back_after_an_outage_refreshes_the_cache() {
        let failing = Arc::new(AtomicBool::new(true));
        let server = licensing(failing.clone()).await;
        let fx = introspect_fixture(&server, 200, 200);
        let gate = fx.gate().await;
        let d = deny(&gate, &job(&fx, "introspect", "good")).await;
        assert_eq!(d.error.code(), ErrorCode::EntitlementUnavailable);
        failing.store(false, Ordering::SeqCst);
        gate.verify(&job(&fx, "introspect", "good")).await.unwrap();
        server.stop().await;
    }

    #[test]
    fn refusals_map_to_contract_codes_and_audit_states() {
        let cases = [
            (
                PoeError::Inactive,
                ErrorCode::EntitlementDenied,
                PoeState::Denied,
            ),
            (
                PoeError::Revoked { plan: "p".into() },
                ErrorCode::EntitlementDenied,
                PoeState::Denied,
            ),
            (
                PoeError::Expired { exp: 1, plan: None },
                ErrorCode::PoeExpired,
                PoeState::Expired,
            ),
            (
                PoeError::Rejected(404),
                ErrorCode::PoeInvalid,
                PoeState::Invalid,
            ),
            (
                PoeError::Unavailable("x".into()),
                ErrorCode::EntitlementUnavailable,
                PoeState::Unavailable,
            ),
        ];
        for (e, code, state) in cases {
            assert_eq!(e.state(), state);
            assert_eq!(SignerError::from(e).code(), code);
        }
    }
}
