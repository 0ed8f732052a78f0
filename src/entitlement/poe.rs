//! Proof-of-Entitlement: the tenant's licence must cover signing.
//!
//! Two presentations (`poe.format` of the request):
//!
//! - `jwt`: a licence JWS verified offline with the licensing JWKS file
//!   (`gates.entitlement.poe.licensing_jwks_file`; same key rules as the Authority's).
//!   Claims: `tid` (must be the request's tenant), `plan` (string, selects the quota plan),
//!   `features` (array; must contain `signer.sign`), `exp` (unix seconds), optional `nbf`,
//!   optional `revoked: true`.
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
//! This module keeps nothing: it loads the licensing key set, verifies a licence against a
//! set it is given ([`JwtLicences`], the `LicenceAuthority` port), asks the licensing service
//! once ([`Introspector`], the `LicensingService` port), and judges a licence or an answer
//! for a tenant at a time. The Entitlement actor (`signer_actors::pipeline::Entitlement`)
//! owns the state: the licensing key set (reloaded every `jwks_refresh` and on an unknown
//! `kid`), the verified licences (until their `exp`, while their key is in the set), and the
//! licensing answers per value and tenant for `cache_ttl`, with an answer up to
//! `cache_ttl + grace` old used while the service is unavailable (without one the job fails
//! with the retryable `entitlement_unavailable`, so that a licensing outage delays jobs
//! instead of failing them). The answers' ages are measured on the clock [`Introspector`] is
//! given (the machine's monotonic clock in the service), not on the jobs' publish times.
//!
//! Licence dates (`exp`, `nbf`, with the clock skew) and an answer's `exp` are judged at the
//! job's publish time (`docs/contract.md#freshness`), on every use: cached licences and
//! answers are judged again per job.
//!
//! `bypass = true` skips all of this (an emergency switch): every decision is recorded as
//! `bypassed` with `bypass_plan`, and logged ([`PoePolicy`]).

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde::Deserialize;
use serde_json::Value;
use signer_actors::audit::PoeState;
use signer_actors::error::SignerError;
use signer_actors::ports::{
    Clock, LicenceAuthority, LicenceRefusal, LicenceStep, LicenceTerms, LicensingAnswer,
    LicensingService, PoeGrant, PoeRefusal, PortError, SystemClock, TokenKeys, VerifiedLicence,
};
use signer_actors::request::{Poe, PoeFormat};

use super::jwks::{JwksSource, KeyLookupError, KeySet};
use super::jws::{self, JwsError, numeric_date};

/// The feature a licence must grant for signing.
pub const SIGN_FEATURE: &str = "signer.sign";

/// How many licences and introspection answers the Entitlement actor keeps (each).
pub const LICENCE_CACHE_CAPACITY: usize = 100_000;
/// Largest introspection answer read: an answer is a few hundred bytes of claims.
pub const MAX_INTROSPECTION_BYTES: usize = 64 * 1024;

/// How often (at most) a bypassed decision is logged.
const BYPASS_LOG_INTERVAL: Duration = Duration::from_secs(10);

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
    #[error("licensing keys unavailable: {0}")]
    KeysUnavailable(String),
}

impl PoeError {
    /// The audit state of this refusal.
    pub fn state(&self) -> PoeState {
        match self {
            PoeError::Expired { .. } | PoeError::NotYetValid { .. } => PoeState::Expired,
            PoeError::Revoked { .. } | PoeError::FeatureMissing { .. } | PoeError::Inactive => {
                PoeState::Denied
            }
            PoeError::Unavailable(_) | PoeError::KeysUnavailable(_) => PoeState::Unavailable,
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
            PoeError::Unavailable(_) | PoeError::KeysUnavailable(_) => {
                SignerError::EntitlementUnavailable(msg)
            }
            _ => SignerError::PoeInvalid(msg),
        }
    }
}

/// The refusal as the Entitlement actor records it: the contract code, the audit state, the
/// plan when known.
impl From<PoeError> for PoeRefusal {
    fn from(e: PoeError) -> Self {
        PoeRefusal {
            state: e.state(),
            plan: e.plan().map(str::to_owned),
            error: e.into(),
        }
    }
}

/// Whether `terms` let `tenant` sign at `now` (the job's publish time), with the contract
/// code when they do not. Fresh and cached licences and answers all come through here, so a
/// cache hit is judged at its own job's time.
pub fn evaluate(
    terms: &LicenceTerms,
    tenant: &str,
    now: u64,
    skew: u64,
) -> Result<PoeGrant, PoeError> {
    if terms.tenant.as_deref() != Some(tenant) {
        return Err(PoeError::WrongTenant {
            expected: tenant.into(),
            found: terms.tenant.clone(),
        });
    }
    if let Some(exp) = terms.expires
        && exp.saturating_add(skew) < now
    {
        return Err(PoeError::Expired {
            exp,
            plan: terms.plan.clone(),
        });
    }
    if let Some(nbf) = terms.not_before
        && nbf > now.saturating_add(skew)
    {
        return Err(PoeError::NotYetValid { nbf });
    }
    let plan = terms
        .plan
        .as_deref()
        .filter(|p| !p.is_empty())
        .ok_or(PoeError::BadClaim("plan"))?;
    if terms.revoked {
        return Err(PoeError::Revoked { plan: plan.into() });
    }
    if !terms.features.iter().any(|f| f == SIGN_FEATURE) {
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

/// Offline licences (`format: jwt`): the licensing key set's source and the checks, no
/// state (the Entitlement actor keeps the set and the verified licences).
pub struct JwtLicences {
    source: JwksSource,
    /// The set loaded at startup, until the first actor takes it.
    startup: Mutex<Option<Arc<KeySet>>>,
    skew: u64,
    refresh: Duration,
    unknown_kid_interval: Duration,
    loads: AtomicU64,
    signature_checks: AtomicU64,
}

impl JwtLicences {
    /// Licences verified with the set at `source`; `startup` is that set as loaded at startup
    /// (to check the configuration), handed to the first actor.
    pub fn new(
        source: JwksSource,
        startup: Arc<KeySet>,
        skew: u64,
        refresh: Duration,
        unknown_kid_interval: Duration,
    ) -> Self {
        JwtLicences {
            source,
            startup: Mutex::new(Some(startup)),
            skew,
            refresh,
            unknown_kid_interval,
            loads: AtomicU64::new(1),
            signature_checks: AtomicU64::new(0),
        }
    }

    /// Licence signatures checked so far.
    pub fn signature_checks(&self) -> u64 {
        self.signature_checks.load(Ordering::Relaxed)
    }

    /// Loads of the licensing key set so far, startup included.
    pub fn loads(&self) -> u64 {
        self.loads.load(Ordering::Relaxed)
    }

    /// Loads the current licensing key set from its source.
    pub async fn load_keys(&self) -> Result<KeySet, PortError> {
        self.loads.fetch_add(1, Ordering::Relaxed);
        KeySet::load("licensing", &self.source)
            .await
            .map_err(|e| PortError::transient(e).context("licensing JWKS"))
    }

    /// Verifies the licence's signature and claim types against `keys`. Its dates, tenant
    /// and features are judged for each job by [`JwtLicences::judge_licence`].
    pub fn verify(&self, raw: &str, keys: &KeySet) -> Result<VerifiedLicence, PoeError> {
        let header = jws::read_header(raw)?;
        let key = match keys.find(header.kid.as_deref()) {
            Some(key) => key,
            None => {
                return Err(match header.kid {
                    Some(kid) => PoeError::UnknownKey(kid),
                    None => PoeError::NoKid(KeyLookupError::NoKid(keys.len()).to_string()),
                });
            }
        };
        self.signature_checks.fetch_add(1, Ordering::Relaxed);
        let c: RawLicence = jws::verify(raw, &header, &key)?;
        let date = |v: Option<Value>, name: &'static str| -> Result<Option<u64>, PoeError> {
            v.map(|v| numeric_date(&v).ok_or(PoeError::BadClaim(name)))
                .transpose()
        };
        let exp = date(c.exp, "exp")?.ok_or(PoeError::BadClaim("exp"))?;
        let nbf = date(c.nbf, "nbf")?;
        let terms = LicenceTerms {
            tenant: Some(c.tid.ok_or(PoeError::BadClaim("tid"))?),
            plan: Some(c.plan.ok_or(PoeError::BadClaim("plan"))?),
            features: c.features.unwrap_or_default(),
            expires: Some(exp),
            not_before: nbf,
            revoked: c.revoked.unwrap_or(false),
        };
        Ok(VerifiedLicence {
            terms,
            key_id: key.key_id(),
            reuse_until: exp.saturating_add(self.skew).saturating_add(1),
        })
    }

    /// Whether a verified licence lets `tenant` sign at `now` (the job's publish time).
    pub fn judge_licence(
        &self,
        licence: &VerifiedLicence,
        tenant: &str,
        now: u64,
    ) -> Result<PoeGrant, PoeError> {
        evaluate(&licence.terms, tenant, now, self.skew)
    }
}

#[async_trait]
impl LicenceAuthority for JwtLicences {
    async fn fetch_keys(&self) -> Result<Arc<dyn TokenKeys>, PortError> {
        Ok(Arc::new(self.load_keys().await?))
    }

    fn startup_keys(&self) -> Option<Arc<dyn TokenKeys>> {
        let set = self
            .startup
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()?;
        Some(set)
    }

    fn verify_licence(
        &self,
        raw: &str,
        keys: &dyn TokenKeys,
    ) -> Result<VerifiedLicence, LicenceRefusal> {
        let any: &dyn std::any::Any = keys;
        let Some(keys) = any.downcast_ref::<KeySet>() else {
            return Err(LicenceRefusal::Refused(PoeRefusal {
                error: SignerError::Internal(
                    "the Entitlement actor passed a key set of another adapter".into(),
                ),
                state: PoeState::NotChecked,
                plan: None,
            }));
        };
        self.verify(raw, keys).map_err(|e| match e {
            PoeError::UnknownKey(kid) => LicenceRefusal::UnknownKey {
                refusal: PoeError::UnknownKey(kid.clone()).into(),
                kid,
            },
            e => LicenceRefusal::Refused(e.into()),
        })
    }

    fn judge(
        &self,
        licence: &VerifiedLicence,
        tenant: &str,
        now: u64,
    ) -> Result<PoeGrant, PoeRefusal> {
        self.judge_licence(licence, tenant, now)
            .map_err(PoeRefusal::from)
    }

    fn refresh_every(&self) -> Duration {
        self.refresh
    }

    fn unknown_kid_interval(&self) -> Duration {
        self.unknown_kid_interval
    }

    fn licence_cache_capacity(&self) -> usize {
        LICENCE_CACHE_CAPACITY
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

impl From<IntrospectAnswer> for LicensingAnswer {
    fn from(a: IntrospectAnswer) -> Self {
        LicensingAnswer::Answered {
            active: a.active,
            terms: LicenceTerms {
                tenant: a.tid,
                plan: a.plan,
                features: a.features,
                expires: a.exp,
                not_before: None,
                revoked: false,
            },
        }
    }
}

/// Why the licensing service gave no answer (an outage: the job is worth retrying).
#[derive(Debug, thiserror::Error)]
pub enum IntrospectError {
    #[error("{endpoint}: {error}")]
    Request {
        endpoint: String,
        error: reqwest::Error,
    },
    #[error("{endpoint}: {error}")]
    Body {
        endpoint: String,
        error: crate::capped::BodyError,
    },
    #[error("{endpoint}: unreadable answer: {error}")]
    Unreadable {
        endpoint: String,
        error: serde_json::Error,
    },
    #[error("{endpoint}: HTTP {status}")]
    Status {
        endpoint: String,
        status: reqwest::StatusCode,
    },
}

/// Opaque licences checked with the licensing service (`format: introspect`): one request
/// per call, and the TTL, grace and clock the Entitlement actor keeps the answers by.
pub struct Introspector {
    endpoint: String,
    client: reqwest::Client,
    ttl: Duration,
    grace: Duration,
    skew: u64,
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
            calls: AtomicU64::new(0),
            clock: Arc::new(SystemClock),
        }
    }

    /// Has the answers' ages measured on `clock` instead of the machine's clock.
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// Requests sent to the licensing service so far.
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }

    /// Asks the licensing service about `value` for `tenant`, once. Counted in
    /// `signer_licensing_requests_total{outcome}` (`answered` or `unavailable`).
    pub async fn ask(&self, value: &str, tenant: &str) -> Result<LicensingAnswer, IntrospectError> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        let result = self.request(value, tenant).await;
        let outcome = if result.is_ok() {
            "answered"
        } else {
            "unavailable"
        };
        metrics::counter!("signer_licensing_requests_total", "outcome" => outcome).increment(1);
        result
    }

    async fn request(&self, value: &str, tenant: &str) -> Result<LicensingAnswer, IntrospectError> {
        let endpoint = || self.endpoint.clone();
        let response = self
            .client
            .post(&self.endpoint)
            .json(&serde_json::json!({"token": value, "tenant": tenant}))
            .send()
            .await
            .map_err(|error| IntrospectError::Request {
                endpoint: endpoint(),
                error,
            })?;
        let status = response.status();
        if status.is_success() {
            // Streamed and abandoned at the cap: an endless answer is "unavailable".
            let body = crate::capped::read_capped(response, MAX_INTROSPECTION_BYTES)
                .await
                .map_err(|error| IntrospectError::Body {
                    endpoint: endpoint(),
                    error,
                })?;
            return serde_json::from_slice::<IntrospectAnswer>(&body)
                .map(LicensingAnswer::from)
                .map_err(|error| IntrospectError::Unreadable {
                    endpoint: endpoint(),
                    error,
                });
        }
        match status.as_u16() {
            400 | 404 | 422 => Ok(LicensingAnswer::Rejected(status.as_u16())),
            _ => Err(IntrospectError::Status {
                endpoint: endpoint(),
                status,
            }),
        }
    }

    /// Whether an answer lets `tenant` sign at `now` (the job's publish time).
    pub fn judge_answer(
        &self,
        answer: &LicensingAnswer,
        tenant: &str,
        now: u64,
    ) -> Result<PoeGrant, PoeError> {
        match answer {
            LicensingAnswer::Rejected(status) => Err(PoeError::Rejected(*status)),
            LicensingAnswer::Answered { active: false, .. } => Err(PoeError::Inactive),
            LicensingAnswer::Answered { terms, .. } => evaluate(terms, tenant, now, self.skew),
        }
    }
}

#[async_trait]
impl LicensingService for Introspector {
    async fn introspect(&self, value: &str, tenant: &str) -> Result<LicensingAnswer, PortError> {
        // The error names the endpoint already (the refusal quotes it: docs/runbooks).
        self.ask(value, tenant).await.map_err(PortError::transient)
    }

    fn judge(
        &self,
        answer: &LicensingAnswer,
        tenant: &str,
        now: u64,
    ) -> Result<PoeGrant, PoeRefusal> {
        self.judge_answer(answer, tenant, now)
            .map_err(PoeRefusal::from)
    }

    fn cache_ttl(&self) -> Duration {
        self.ttl
    }

    fn grace(&self) -> Duration {
        self.grace
    }

    fn clock(&self) -> Arc<dyn Clock> {
        self.clock.clone()
    }

    fn answer_cache_capacity(&self) -> usize {
        LICENCE_CACHE_CAPACITY
    }
}

/// What a job's PoE needs before any licence is looked at: bypass (logged), or the format's
/// check, when that format is configured.
pub struct PoePolicy {
    bypass_plan: Option<String>,
    jwt: bool,
    introspect: bool,
    last_bypass_log: Mutex<Option<Instant>>,
    bypassed_unlogged: AtomicU64,
}

impl PoePolicy {
    /// `bypass_plan` set: every PoE is bypassed with that plan. `jwt`, `introspect`: whether
    /// that format can be checked (`licensing_jwks_file`, `introspect_url` configured).
    pub fn new(bypass_plan: Option<String>, jwt: bool, introspect: bool) -> Self {
        PoePolicy {
            bypass_plan,
            jwt,
            introspect,
            last_bypass_log: Mutex::new(None),
            bypassed_unlogged: AtomicU64::new(0),
        }
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

    /// The licence step of the request's PoE for `tenant`: bypassed (decided), or the
    /// format's check; a format that is not configured is refused (`poe_invalid`).
    pub fn step(&self, poe: &Poe, tenant: &str) -> Result<LicenceStep, PoeError> {
        if let Some(plan) = &self.bypass_plan {
            self.log_bypass(tenant);
            return Ok(LicenceStep::Decided(PoeGrant {
                state: PoeState::Bypassed,
                plan: plan.clone(),
            }));
        }
        match poe.format {
            PoeFormat::Jwt if self.jwt => Ok(LicenceStep::Jwt),
            PoeFormat::Jwt => Err(PoeError::NotConfigured {
                format: "jwt",
                setting: "licensing_jwks_file",
            }),
            PoeFormat::Introspect if self.introspect => Ok(LicenceStep::Introspect),
            PoeFormat::Introspect => Err(PoeError::NotConfigured {
                format: "introspect",
                setting: "introspect_url",
            }),
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

    use super::super::testkit::{self, Fixture, TestServer, deny, now};
    use super::*;
    use stella_signer_tools::mint;

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

    /// The Entitlement actor has one request per value and tenant in flight: jobs that arrive
    /// while it is out wait for its answer.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_jobs_with_one_licence_make_one_licensing_request() {
        let failing = Arc::new(AtomicBool::new(false));
        let server = licensing(failing.clone()).await;
        let fx = introspect_fixture(&server, 60_000, 0);
        let gate = Arc::new(fx.gate().await);
        let jobs: Vec<_> = (0..10).map(|_| job(&fx, "introspect", "good")).collect();
        let tasks: Vec<_> = jobs
            .into_iter()
            .map(|input| {
                let gate = gate.clone();
                tokio::spawn(async move { gate.verify(&input).await })
            })
            .collect();
        for t in tasks {
            assert_eq!(t.await.unwrap().unwrap().poe, PoeState::Valid);
        }
        assert_eq!(server.calls(), 1);
        assert_eq!(gate.stats().await.introspect_calls, 1);
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
