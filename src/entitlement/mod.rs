//! The entitlement gate: who is asking (OpTok), that it is really them (DPoP), and that
//! their tenant's licence covers signing (Proof-of-Entitlement).
//!
//! Checks run in that order and stop at the first refusal, so the audit event says how far a
//! job got: a bad token records `auth: invalid` and no caller; a bad proof records the caller
//! (the token was genuine) with `auth: invalid`; a licence problem records the caller, the
//! auth state and the PoE state, with the plan when the licence was read far enough.
//!
//! Everything a verifier trusts comes from configuration ([`EntitlementGate`]): the issuer,
//! audience and scope, the Authority's and the licensing service's keys, the DPoP target.
//! Refusals map one-to-one onto the contract's error codes; only outages of what the gate
//! depends on (the Authority's JWKS URL, the licensing service, the replay cache) give the
//! retryable `entitlement_unavailable`, so that an outage delays jobs instead of failing them.

pub mod clock;
pub mod dpop;
#[cfg(test)]
mod freshness_tests;
pub mod jwks;
pub mod jws;
pub mod jws_sign;
pub mod optok;
pub mod poe;
#[cfg(test)]
mod testkit;

use std::ops::Deref;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use sha2::{Digest, Sha256};
use signer_actors::audit::{AuthState, Caller, PoeState};
use signer_actors::error::SignerError;
use signer_actors::ports::{
    Authenticated, EntitlementVerdict, EntitlementVerifier, GateDenial, GateInput,
    LicenceAuthority, LicenceStep, LicensingService, PoeGrant, PoeRefusal, PortError,
    TokenAuthority, TokenKeys, TokenRefusal, VerifiedToken,
};
use signer_actors::request::SignRequest;

use crate::config::gates::EntitlementGate;
use crate::replay::{MEMORY_REPLAY_CAPACITY, MemoryReplayCache, ReplayCache};
use clock::{Clock, SystemClock};
use dpop::{DpopError, DpopVerifier, ProofContext};
use jwks::{JwksError, JwksSource, KeySet, UNKNOWN_KID_REFRESH_INTERVAL};
use optok::{OpTok, OpTokError, OpTokPolicy, OpTokVerifier, TokenDates};
use poe::{Introspector, JwtLicences, PoeError, PoePolicy};

/// A value that passed verification. Only the verifiers of this module can make one (the
/// field is private), so code that takes a `Verified<OpTok>` cannot be handed claims that
/// were merely decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified<T>(T);

impl<T> Deref for Verified<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

/// Time limit of one request to the Authority's JWKS URL or the licensing service. Well under
/// the pipeline's gate call timeout, so a hanging service gives `entitlement_unavailable`
/// rather than a timed-out gate.
pub const HTTP_TIMEOUT: Duration = Duration::from_secs(10);
const HTTP_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the gate could not be built from its configuration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EntitlementSetupError {
    #[error("gates.entitlement.{0} must not be empty")]
    Empty(&'static str),
    #[error("gates.entitlement.{setting} must be at least {min:?}")]
    TooShort {
        setting: &'static str,
        min: Duration,
    },
    #[error("gates.entitlement: set jwks_file or jwks_url (the Authority's signing keys)")]
    NoJwks,
    #[error("gates.entitlement: set only one of jwks_file and jwks_url")]
    BothJwks,
    #[error("gates.entitlement.{setting}: {url:?} is not an http or https URL")]
    BadUrl { setting: &'static str, url: String },
    #[error("gates.entitlement: Authority JWKS: {0}")]
    AuthorityJwks(JwksError),
    #[error("gates.entitlement.poe.licensing_jwks_file: {0}")]
    LicensingJwks(JwksError),
    #[error(
        "gates.entitlement.poe: no way to check licences; set licensing_jwks_file and/or introspect_url (or bypass = true in an emergency)"
    )]
    NoLicensing,
    #[error("HTTP client: {0}")]
    HttpClient(String),
}

/// Counters for tests (what the Entitlement actor counts is in
/// `signer_actors::pipeline::EntitlementStats`).
#[cfg(test)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct GateStats {
    /// OpTok signatures checked (tokens the actor did not have verified yet).
    pub token_signature_checks: u64,
    /// Licence (`format: jwt`) signatures checked.
    pub licence_signature_checks: u64,
    /// Requests to the licensing service (`format: introspect`).
    pub introspect_calls: u64,
    /// Loads of the Authority's JWKS, startup included.
    pub authority_jwks_loads: u64,
}

/// The Authority's tokens as the Entitlement actor drives them ([`TokenAuthority`]): loads
/// its JWKS and checks tokens against a set it is given, keeping neither.
pub struct AuthorityTokens {
    optok: OpTokVerifier,
    source: JwksSource,
    /// The set loaded at startup, until the first actor takes it.
    startup: Mutex<Option<Arc<KeySet>>>,
    loads: AtomicU64,
    refresh: Duration,
    unknown_kid_interval: Duration,
}

impl AuthorityTokens {
    /// The verified token as the actor keeps it.
    fn to_port(&self, token: &OpTok, key: &jwks::PublicKey) -> VerifiedToken {
        VerifiedToken {
            issuer: token.iss.clone(),
            subject: token.sub.clone(),
            tenant: token.tid.clone(),
            scope: token.scope.clone(),
            expires: token.dates.exp,
            not_before: token.dates.nbf,
            issued_at: token.dates.iat,
            jkt: token.jkt.clone(),
            key_id: key.key_id(),
            reuse_until: self.optok.reuse_until(token),
        }
    }
}

#[async_trait]
impl TokenAuthority for AuthorityTokens {
    async fn fetch_keys(&self) -> Result<Arc<dyn TokenKeys>, PortError> {
        self.loads.fetch_add(1, Ordering::Relaxed);
        let set = KeySet::load("authority", &self.source)
            .await
            .map_err(|e| PortError::transient(e).context("Authority JWKS"))?;
        Ok(Arc::new(set))
    }

    fn startup_keys(&self) -> Option<Arc<dyn TokenKeys>> {
        let set = self
            .startup
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()?;
        Some(set)
    }

    fn verify_token(
        &self,
        raw: &str,
        keys: &dyn TokenKeys,
        now: u64,
    ) -> Result<VerifiedToken, TokenRefusal> {
        let any: &dyn std::any::Any = keys;
        let Some(keys) = any.downcast_ref::<KeySet>() else {
            return Err(TokenRefusal::Refused(SignerError::Internal(
                "the Entitlement actor passed a key set of another adapter".into(),
            )));
        };
        match self.optok.verify(raw, keys, now) {
            Ok((token, key)) => Ok(self.to_port(&token, &key)),
            Err(OpTokError::UnknownKey(kid)) => {
                let error = OpTokError::UnknownKey(kid.clone()).into();
                Err(TokenRefusal::UnknownKey { kid, error })
            }
            Err(e) => Err(TokenRefusal::Refused(e.into())),
        }
    }

    fn refresh_every(&self) -> Duration {
        self.refresh
    }

    fn unknown_kid_interval(&self) -> Duration {
        self.unknown_kid_interval
    }
}

/// The enforcing [`EntitlementVerifier`]. Keeps no token, licence, key or licensing answer:
/// those are the Entitlement actor's ([`EntitlementVerifier::tokens`],
/// [`EntitlementVerifier::licences`] and [`EntitlementVerifier::licensing`] give it what it
/// needs).
pub struct EntitlementGateImpl {
    tokens: Arc<AuthorityTokens>,
    dpop: DpopVerifier,
    poe: PoePolicy,
    licences: Option<Arc<JwtLicences>>,
    licensing: Option<Arc<Introspector>>,
    allow_bearer: bool,
    skew: u64,
}

/// `t` in whole unix seconds (0 before the epoch), the unit of JWT dates.
fn unix_seconds(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn check_url(setting: &'static str, url: &str) -> Result<(), EntitlementSetupError> {
    match reqwest::Url::parse(url) {
        Ok(u) if matches!(u.scheme(), "http" | "https") => Ok(()),
        _ => Err(EntitlementSetupError::BadUrl {
            setting,
            url: url.into(),
        }),
    }
}

/// Identifies a request for the DPoP replay cache: a redelivery hashes the same.
fn request_binding(request: &SignRequest) -> String {
    let bytes = serde_json::to_vec(request)
        .unwrap_or_else(|_| format!("{}/{}", request.tenant, request.request_id).into_bytes());
    hex::encode(Sha256::digest(&bytes))
}

fn denial(
    error: impl Into<SignerError>,
    caller: Option<&Caller>,
    auth: AuthState,
    poe: PoeState,
    plan: Option<String>,
) -> GateDenial {
    GateDenial {
        error: error.into(),
        caller: caller.cloned(),
        auth: Some(auth),
        poe: Some(poe),
        plan,
    }
}

impl EntitlementGateImpl {
    /// Builds the gate: checks the configuration and loads the Authority's (and licensing)
    /// keys, which the Entitlement actor takes over and keeps fresh. `replay` holds the DPoP
    /// replay records (the service passes the configured store, see `crate::serve`); without
    /// one they are kept in memory for `2 × dpop_max_age + clock_skew` (tests, a single
    /// process).
    ///
    /// `cfg.mode` is the caller's business: for `disabled` it uses
    /// `signer_actors::pipeline::disabled::DisabledEntitlement` instead of calling this.
    pub async fn from_config(
        cfg: &EntitlementGate,
        replay: Option<Arc<dyn ReplayCache>>,
    ) -> Result<Self, EntitlementSetupError> {
        Self::build(
            cfg,
            replay,
            UNKNOWN_KID_REFRESH_INTERVAL,
            Arc::new(SystemClock),
        )
        .await
    }

    /// [`Self::from_config`] with the reload interval for unknown kids and the clock the
    /// licensing answers' ages are measured on given (tests pass short intervals and a clock
    /// they move).
    async fn build(
        cfg: &EntitlementGate,
        replay: Option<Arc<dyn ReplayCache>>,
        unknown_kid_interval: Duration,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, EntitlementSetupError> {
        use EntitlementSetupError as E;
        for (setting, value) in [
            ("issuer", &cfg.issuer),
            ("audience", &cfg.audience),
            ("scope", &cfg.scope),
            ("dpop_htu", &cfg.dpop_htu),
        ] {
            if value.trim().is_empty() {
                return Err(E::Empty(setting));
            }
        }
        let second = Duration::from_secs(1);
        for (setting, value) in [
            ("jwks_refresh", cfg.jwks_refresh),
            ("dpop_max_age", cfg.dpop_max_age),
        ] {
            if value < second {
                return Err(E::TooShort {
                    setting,
                    min: second,
                });
            }
        }
        let poe_cfg = &cfg.poe;
        if poe_cfg.bypass && poe_cfg.bypass_plan.trim().is_empty() {
            return Err(E::Empty("poe.bypass_plan"));
        }
        if !poe_cfg.bypass
            && poe_cfg.licensing_jwks_file.is_none()
            && poe_cfg.introspect_url.is_none()
        {
            return Err(E::NoLicensing);
        }
        let client = reqwest::Client::builder()
            .connect_timeout(HTTP_CONNECT_TIMEOUT)
            .timeout(HTTP_TIMEOUT)
            .user_agent(concat!("stella-signer/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| E::HttpClient(e.to_string()))?;

        let source = match (&cfg.jwks_file, &cfg.jwks_url) {
            (Some(_), Some(_)) => return Err(E::BothJwks),
            (None, None) => return Err(E::NoJwks),
            (Some(path), None) => JwksSource::File(path.clone()),
            (None, Some(url)) => {
                check_url("jwks_url", url)?;
                JwksSource::Url {
                    url: url.clone(),
                    client: client.clone(),
                }
            }
        };
        if let Some(url) = &poe_cfg.introspect_url {
            check_url("poe.introspect_url", url)?;
        }
        // Loaded once here so that a configuration that cannot work stops the service; the
        // Entitlement actor takes this set over and keeps it fresh.
        let startup = KeySet::load("authority", &source)
            .await
            .map_err(E::AuthorityJwks)?;
        tracing::info!(jwks = "authority", source = %source.describe(), keys = startup.len(), "key set loaded");

        let skew = cfg.clock_skew.as_secs();
        let licences = match &poe_cfg.licensing_jwks_file {
            Some(path) if !poe_cfg.bypass => {
                // Loaded here for the same reason; the actor takes it over too.
                let source = JwksSource::File(path.clone());
                let set = KeySet::load("licensing", &source)
                    .await
                    .map_err(E::LicensingJwks)?;
                tracing::info!(jwks = "licensing", source = %source.describe(), keys = set.len(), "key set loaded");
                Some(Arc::new(JwtLicences::new(
                    source,
                    Arc::new(set),
                    skew,
                    cfg.jwks_refresh,
                    unknown_kid_interval,
                )))
            }
            _ => None,
        };
        let licensing = poe_cfg
            .introspect_url
            .as_deref()
            .filter(|_| !poe_cfg.bypass)
            .map(|url| {
                Arc::new(
                    Introspector::new(url, client, poe_cfg.cache_ttl, poe_cfg.grace, skew)
                        .with_clock(clock),
                )
            });
        let bypass_plan = poe_cfg.bypass.then(|| poe_cfg.bypass_plan.clone());
        let poe = PoePolicy::new(bypass_plan, licences.is_some(), licensing.is_some());

        let replay = replay.unwrap_or_else(|| {
            tracing::info!("DPoP replay records in memory: proofs are checked per process");
            let lifetime =
                crate::replay::record_lifetime(cfg.dpop_max_age, Duration::ZERO, cfg.clock_skew);
            Arc::new(MemoryReplayCache::new(MEMORY_REPLAY_CAPACITY, lifetime))
        });

        if cfg.allow_bearer {
            tracing::warn!(
                "gates.entitlement.allow_bearer = true: OpToks without cnf.jkt are accepted without DPoP; a stolen token can be replayed. Audited as auth \"bearer\""
            );
        }
        if poe_cfg.bypass {
            tracing::warn!(
                plan = %poe_cfg.bypass_plan,
                "gates.entitlement.poe.bypass = true: licences are NOT checked; every decision is audited as poe \"bypassed\""
            );
        }

        Ok(EntitlementGateImpl {
            tokens: Arc::new(AuthorityTokens {
                optok: OpTokVerifier::new(OpTokPolicy {
                    issuer: cfg.issuer.clone(),
                    audience: cfg.audience.clone(),
                    scope: cfg.scope.clone(),
                    skew,
                }),
                source,
                startup: Mutex::new(Some(Arc::new(startup))),
                loads: AtomicU64::new(1),
                refresh: cfg.jwks_refresh,
                unknown_kid_interval,
            }),
            dpop: DpopVerifier::new(cfg.dpop_htu.clone(), cfg.dpop_max_age, replay),
            poe,
            licences,
            licensing,
            allow_bearer: cfg.allow_bearer,
            skew,
        })
    }

    /// Counters for tests.
    #[cfg(test)]
    pub(crate) fn stats(&self) -> GateStats {
        GateStats {
            token_signature_checks: self.tokens.optok.signature_checks(),
            licence_signature_checks: self.licences.as_ref().map_or(0, |l| l.signature_checks()),
            introspect_calls: self.licensing.as_ref().map_or(0, |i| i.calls()),
            authority_jwks_loads: self.tokens.loads.load(Ordering::Relaxed),
        }
    }

    /// Everything after the token up to the licence, for the job published at `now`: the
    /// token's dates and tenant binding, DPoP, and what the PoE needs ([`PoePolicy::step`]).
    async fn authenticate_job(
        &self,
        input: &GateInput,
        token: &VerifiedToken,
        now: u64,
    ) -> Result<Authenticated, GateDenial> {
        let request = &input.request;
        let token = OpTok {
            iss: token.issuer.clone(),
            sub: token.subject.clone(),
            tid: token.tenant.clone(),
            scope: token.scope.clone(),
            dates: TokenDates {
                exp: token.expires,
                nbf: token.not_before,
                iat: token.issued_at,
            },
            jkt: token.jkt.clone(),
        };
        // Every job has its own time: the dates are judged again for this one, whether the
        // token was verified for it or for an earlier job.
        optok::check_dates(token.dates, now, self.skew)
            .map_err(|e| denial(e, None, AuthState::Invalid, PoeState::NotChecked, None))?;
        let caller = Caller {
            iss: token.iss.clone(),
            sub: token.sub.clone(),
        };
        optok::check_tenant(&token, &request.tenant, input.subject_tenant.as_deref()).map_err(
            |e| {
                denial(
                    e,
                    Some(&caller),
                    AuthState::Invalid,
                    PoeState::NotChecked,
                    None,
                )
            },
        )?;

        let auth = match token.jkt.as_deref() {
            Some(jkt) => {
                let deny = |e: DpopError| {
                    let auth = match e {
                        DpopError::CacheUnavailable(_) => AuthState::NotChecked,
                        _ => AuthState::Invalid,
                    };
                    denial(e, Some(&caller), auth, PoeState::NotChecked, None)
                };
                let proof = request
                    .auth
                    .dpop
                    .as_deref()
                    .ok_or_else(|| deny(DpopError::Missing))?;
                let binding = request_binding(request);
                let ctx = ProofContext {
                    op_tok: &request.auth.op_tok,
                    jkt,
                    binding: &binding,
                    now,
                };
                self.dpop.verify(proof, ctx).await.map_err(deny)?;
                AuthState::Valid
            }
            None if self.allow_bearer => AuthState::Bearer,
            None => {
                return Err(denial(
                    DpopError::BearerNotAllowed,
                    Some(&caller),
                    AuthState::Invalid,
                    PoeState::NotChecked,
                    None,
                ));
            }
        };

        let licence = self.poe.step(&request.poe, &request.tenant).map_err(|e| {
            let (state, plan) = (e.state(), e.plan().map(str::to_owned));
            denial(e, Some(&caller), auth, state, plan)
        })?;
        Ok(Authenticated {
            caller: Some(caller),
            auth,
            licence,
        })
    }

    /// The licence step without the actor's caches: the licensing key set loaded for this
    /// call, the licensing service asked (no grace).
    async fn licence_uncached(
        &self,
        step: LicenceStep,
        input: &GateInput,
        now: u64,
    ) -> Result<PoeGrant, PoeRefusal> {
        let (value, tenant) = (&input.request.poe.value, &input.request.tenant);
        let missing = |format: &str| PoeRefusal {
            error: SignerError::Internal(format!("no {format} licence check configured")),
            state: PoeState::NotChecked,
            plan: None,
        };
        match step {
            LicenceStep::Decided(grant) => Ok(grant),
            LicenceStep::Jwt => {
                let licences = self.licences.as_ref().ok_or_else(|| missing("jwt"))?;
                let keys = licences
                    .load_keys()
                    .await
                    .map_err(|e| PoeError::KeysUnavailable(e.to_string()))?;
                let licence = licences.verify(value, &keys)?;
                Ok(licences.judge_licence(&licence, tenant, now)?)
            }
            LicenceStep::Introspect => {
                let licensing = self
                    .licensing
                    .as_ref()
                    .ok_or_else(|| missing("introspect"))?;
                let answer = licensing
                    .ask(value, tenant)
                    .await
                    .map_err(|e| PoeError::Unavailable(e.to_string()))?;
                Ok(licensing.judge_answer(&answer, tenant, now)?)
            }
        }
    }
}

#[async_trait]
impl EntitlementVerifier for EntitlementGateImpl {
    fn tokens(&self) -> Option<Arc<dyn TokenAuthority>> {
        Some(self.tokens.clone())
    }

    fn licences(&self) -> Option<Arc<dyn LicenceAuthority>> {
        self.licences
            .clone()
            .map(|l| l as Arc<dyn LicenceAuthority>)
    }

    fn licensing(&self) -> Option<Arc<dyn LicensingService>> {
        self.licensing
            .clone()
            .map(|i| i as Arc<dyn LicensingService>)
    }

    /// The whole check without the actor's caches (tools, and tests of the adapter alone):
    /// [`authenticate`](Self::authenticate), then the licence checked uncached.
    async fn verify(
        &self,
        input: &GateInput,
        token: Option<&VerifiedToken>,
    ) -> Result<EntitlementVerdict, GateDenial> {
        let Authenticated {
            caller,
            auth,
            licence,
        } = self.authenticate(input, token).await?;
        let now = unix_seconds(input.published);
        match self.licence_uncached(licence, input, now).await {
            Ok(grant) => Ok(EntitlementVerdict {
                caller,
                auth,
                poe: grant.state,
                plan: grant.plan,
            }),
            Err(refusal) => Err(GateDenial {
                error: refusal.error,
                caller,
                auth: Some(auth),
                poe: Some(refusal.state),
                plan: refusal.plan,
            }),
        }
    }

    /// Judges the job as of its publish time (`docs/contract.md#freshness`): a token, proof or
    /// licence that was valid when the request was made is honoured however long the job
    /// waited in the queue (the pipeline bounds that wait with `worker.max_queue_age`).
    /// `token` is the job's OpTok as the Entitlement actor had it verified; the licence is the
    /// actor's to check next (denials are counted in `signer_auth_failures_total` by the
    /// actor).
    async fn authenticate(
        &self,
        input: &GateInput,
        token: Option<&VerifiedToken>,
    ) -> Result<Authenticated, GateDenial> {
        let Some(token) = token else {
            return Err(SignerError::Internal(
                "entitlement gate called without a verified OpTok".into(),
            )
            .into());
        };
        self.authenticate_job(input, token, unix_seconds(input.published))
            .await
    }
}

#[cfg(test)]
mod tests {
    use signer_actors::error::ErrorCode;

    use super::testkit::{self, Fixture, deny};
    use super::*;

    #[tokio::test]
    async fn a_good_job_passes_with_caller_auth_poe_and_plan() {
        let fx = Fixture::new();
        let gate = fx.gate().await;
        let v = gate.verify(&fx.good_input()).await.unwrap();
        assert_eq!(
            v,
            EntitlementVerdict {
                caller: Some(Caller {
                    iss: testkit::ISSUER.into(),
                    sub: "svc:scanner".into()
                }),
                auth: AuthState::Valid,
                poe: PoeState::Valid,
                plan: "team".into(),
            }
        );
    }

    #[tokio::test]
    async fn denials_say_how_far_the_job_got() {
        let fx = Fixture::new();
        let gate = fx.gate().await;
        let optok = fx.optok(&fx.optok_claims());
        let licence = fx.licence(&fx.licence_claims());
        let caller = Some(Caller {
            iss: testkit::ISSUER.into(),
            sub: "svc:scanner".into(),
        });

        let d = deny(&gate, &fx.input("a.b.c", None, ("jwt", &licence))).await;
        assert_eq!(
            (d.error.code(), d.caller, d.auth, d.poe, d.plan),
            (
                ErrorCode::AuthInvalid,
                None,
                Some(AuthState::Invalid),
                Some(PoeState::NotChecked),
                None
            )
        );
        let d = deny(&gate, &fx.input(&optok, None, ("jwt", &licence))).await;
        assert_eq!(
            (d.error.code(), d.caller.clone(), d.auth, d.poe, d.plan),
            (
                ErrorCode::DpopInvalid,
                caller.clone(),
                Some(AuthState::Invalid),
                Some(PoeState::NotChecked),
                None
            )
        );
        let mut claims = fx.licence_claims();
        claims["features"] = serde_json::json!([]);
        let d = deny(
            &gate,
            &fx.input(
                &optok,
                Some(&fx.dpop(&optok)),
                ("jwt", &fx.licence(&claims)),
            ),
        )
        .await;
        assert_eq!(
            (d.error.code(), d.caller, d.auth, d.poe, d.plan.as_deref()),
            (
                ErrorCode::EntitlementDenied,
                caller,
                Some(AuthState::Valid),
                Some(PoeState::Denied),
                Some("team")
            )
        );
    }

    /// Without the actor (`EntitlementVerifier::verify`), the adapter checks everything itself
    /// and keeps nothing: the licensing set is loaded and the licence verified for each call.
    #[tokio::test]
    async fn the_adapter_alone_checks_licences_uncached() {
        let fx = Fixture::new();
        let gate = EntitlementGateImpl::from_config(&fx.cfg, None)
            .await
            .unwrap();
        let authority = gate.tokens().unwrap();
        let keys = authority.fetch_keys().await.unwrap();
        let optok = fx.optok(&fx.optok_claims());
        let token = authority
            .verify_token(&optok, keys.as_ref(), testkit::now())
            .unwrap();
        let job = |licence: &str| fx.input(&optok, Some(&fx.dpop(&optok)), ("jwt", licence));
        let licence = fx.licence(&fx.licence_claims());
        for _ in 0..2 {
            let v = gate.verify(&job(&licence), Some(&token)).await.unwrap();
            assert_eq!((v.poe, v.plan.as_str()), (PoeState::Valid, "team"));
        }
        assert_eq!(gate.stats().licence_signature_checks, 2, "no cache");
        let loads = gate.licences.as_ref().map(|l| l.loads());
        assert_eq!(loads, Some(3), "loaded at startup and for each call");

        let mut claims = fx.licence_claims();
        claims["tid"] = "globex".into();
        let d = gate
            .verify(&job(&fx.licence(&claims)), Some(&token))
            .await
            .unwrap_err();
        assert_eq!(
            (d.error.code(), d.poe, d.auth),
            (
                ErrorCode::PoeInvalid,
                Some(PoeState::Invalid),
                Some(AuthState::Valid)
            )
        );
        assert!(d.caller.is_some());
    }

    #[tokio::test]
    async fn configuration_is_checked_at_startup() {
        use EntitlementSetupError as E;
        let fx = Fixture::new();
        let build = |change: &dyn Fn(&mut EntitlementGate)| {
            let mut cfg = fx.cfg.clone();
            change(&mut cfg);
            async move { EntitlementGateImpl::from_config(&cfg, None).await.err() }
        };
        assert_eq!(
            build(&|c| c.issuer = " ".into()).await,
            Some(E::Empty("issuer"))
        );
        assert_eq!(
            build(&|c| c.audience.clear()).await,
            Some(E::Empty("audience"))
        );
        assert_eq!(
            build(&|c| c.dpop_htu.clear()).await,
            Some(E::Empty("dpop_htu"))
        );
        assert_eq!(build(&|c| c.jwks_file = None).await, Some(E::NoJwks));
        assert_eq!(
            build(&|c| c.jwks_url = Some("https://authority.test/jwks".into())).await,
            Some(E::BothJwks)
        );
        assert!(matches!(
            build(&|c| {
                c.jwks_file = None;
                c.jwks_url = Some("file:///etc/passwd".into());
            })
            .await,
            Some(E::BadUrl {
                setting: "jwks_url",
                ..
            })
        ));
        assert!(matches!(
            build(&|c| c.poe.introspect_url = Some("licensing".into())).await,
            Some(E::BadUrl { .. })
        ));
        assert!(matches!(
            build(&|c| c.dpop_max_age = Duration::ZERO).await,
            Some(E::TooShort {
                setting: "dpop_max_age",
                ..
            })
        ));
        assert!(matches!(
            build(&|c| c.jwks_refresh = Duration::from_millis(10)).await,
            Some(E::TooShort {
                setting: "jwks_refresh",
                ..
            })
        ));
        assert_eq!(
            build(&|c| c.poe.licensing_jwks_file = None).await,
            Some(E::NoLicensing)
        );
        assert!(matches!(
            build(&|c| c.jwks_file = Some(fx.dir.path().join("missing.json"))).await,
            Some(E::AuthorityJwks(JwksError::Read { .. }))
        ));
        let private = fx.dir.path().join("private.json");
        let mut jwk = serde_json::to_value(&fx.authority.jwk).unwrap();
        jwk["d"] = "AAAA".into();
        std::fs::write(&private, serde_json::json!({"keys": [jwk]}).to_string()).unwrap();
        let private_clone = private.clone();
        assert!(matches!(
            build(&move |c| c.poe.licensing_jwks_file = Some(private_clone.clone())).await,
            Some(E::LicensingJwks(JwksError::PrivateKey { .. }))
        ));
        // Bypass needs no licensing configuration.
        assert_eq!(
            build(&|c| {
                c.poe.licensing_jwks_file = None;
                c.poe.bypass = true;
            })
            .await,
            None
        );
    }
}
