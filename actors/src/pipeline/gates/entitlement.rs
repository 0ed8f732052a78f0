//! The Entitlement actor: OpTok, DPoP and PoE checks, with the key sets, the verified tokens
//! and licences and the licensing answers it owns.
//!
//! What it owns, and why that needs an actor:
//! - **The Authority's key set** (JWKS), loaded through [`TokenAuthority::fetch_keys`],
//!   reloaded every [`TokenAuthority::refresh_every`] and when a token names an unknown
//!   `kid` (at most once per [`TokenAuthority::unknown_kid_interval`]). One load is in
//!   flight at a time: checks that need the set while it is loading wait for that load
//!   instead of each starting one. A failed reload keeps the last good set.
//! - **The verified tokens**: the SHA-256 of a token's text to what
//!   [`TokenAuthority::verify_token`] established, until the token's `exp` (plus skew),
//!   bounded in number. Publishers reuse one token for thousands of jobs, so a token costs
//!   one signature check, not one per job; concurrent jobs with a token not yet verified
//!   share one check. A cached token counts only while the key that verified it is still in
//!   the set; its dates and tenant binding are judged again for every job (by the port).
//! - **The licensing key set** (`poe.format: jwt`), with the same discipline as the
//!   Authority's: loaded through [`LicenceAuthority::fetch_keys`], reloaded every
//!   [`LicenceAuthority::refresh_every`] and on an unknown `kid` (at most once per
//!   [`LicenceAuthority::unknown_kid_interval`]), one load in flight, the last good set kept.
//! - **The verified licences**: the SHA-256 of a licence JWT's text to what
//!   [`LicenceAuthority::verify_licence`] established, until the licence's `exp` (plus skew),
//!   bounded in number: one signature check per licence, shared by concurrent jobs. A cached
//!   licence counts only while the key that verified it is still in the licensing set; its
//!   dates, tenant and features are judged for every job, at its publish time
//!   ([`LicenceAuthority::judge`]).
//! - **The licensing service's answers** (`poe.format: introspect`), per value and tenant:
//!   used for [`LicensingService::cache_ttl`]; past it the service is asked again, and while
//!   it is unavailable an answer up to `cache_ttl + grace` old is used (without one the job
//!   gets the retryable `entitlement_unavailable`). Ages are measured on the port's
//!   [`LicensingService::clock`], not on the jobs' publish times. One request per value and
//!   tenant is in flight at a time: concurrent jobs with the same licence share it. Each
//!   answer is judged for every job ([`LicensingService::judge`]).
//!
//! A job goes: token (cache, or one check), then the rest up to its licence in a task
//! ([`EntitlementVerifier::authenticate`]: the token's dates and tenant for this job, DPoP),
//! then the licence step that call names. The licence is only looked at for a caller whose
//! token and proof passed, so an unauthenticated publisher cannot make the signer ask the
//! licensing service.
//!
//! The actor's mailbox never waits on the network or the CPU: key loads, signature checks
//! (on the blocking pool), the caller step (DPoP replay store) and licensing requests run in
//! tasks that report back by message; only the ports' cheap judgements run in the mailbox. A
//! check that panics makes the actor fail; its supervisor restarts it with empty caches (the
//! key sets are loaded again).

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use sha2::{Digest, Sha256};
use tokio::task::JoinHandle;

use super::cache::TtlCache;
use crate::audit::{AuthState, Caller, PoeState};
use crate::error::SignerError;
use crate::ports::{
    Authenticated, Clock, EntitlementVerdict, EntitlementVerifier, GateDenial, GateInput,
    LicenceAuthority, LicenceRefusal, LicenceStep, LicensingAnswer, LicensingService, PoeGrant,
    PoeRefusal, PortError, TokenAuthority, TokenKeys, TokenRefusal, VerifiedLicence, VerifiedToken,
};

type Reply = RpcReplyPort<Result<EntitlementVerdict, GateDenial>>;
type TokenId = [u8; 32];
type LicenceId = [u8; 32];
type AnswerId = [u8; 32];

/// Messages of the Entitlement actor.
pub enum EntitlementMsg {
    Verify(GateInput, Reply),
    /// Counters, for tests and diagnostics.
    Stats(RpcReplyPort<EntitlementStats>),
    /// Reload the Authority's key set now (its periodic refresh sends this).
    Refresh,
    /// Reload the licensing key set now (its periodic refresh sends this).
    RefreshLicenceKeys,
    /// An Authority key set load finished.
    KeysLoaded(Result<Arc<dyn TokenKeys>, PortError>),
    /// A licensing key set load finished.
    LicenceKeysLoaded(Result<Arc<dyn TokenKeys>, PortError>),
    /// A token check finished (for the jobs waiting on token `id`, judged at `now`).
    TokenChecked {
        id: TokenId,
        now: u64,
        result: Result<VerifiedToken, TokenRefusal>,
    },
    /// A job's check up to its licence finished.
    Authenticated(Box<JobAuthenticated>),
    /// A licence check finished (for the jobs waiting on licence `id`).
    LicenceChecked {
        id: LicenceId,
        result: Result<VerifiedLicence, LicenceRefusal>,
    },
    /// A licensing request finished (for the jobs waiting on value and tenant `id`).
    Answered {
        id: AnswerId,
        result: Result<LicensingAnswer, PortError>,
    },
    /// A check panicked.
    Failed(String),
}

/// A job whose check up to its licence finished, with the outcome
/// ([`EntitlementMsg::Authenticated`]).
pub struct JobAuthenticated {
    job: Pending,
    result: Result<Authenticated, GateDenial>,
}

/// What the Entitlement actor counted since it started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EntitlementStats {
    /// Jobs whose token was answered from the cache.
    pub token_cache_hits: u64,
    /// Calls of [`TokenAuthority::verify_token`].
    pub token_checks: u64,
    /// Authority key set loads started (the set handed over at startup not counted).
    pub key_loads: u64,
    /// Authority key set loads finished (loaded or failed).
    pub key_loads_finished: u64,
    /// Tokens cached now.
    pub cached_tokens: usize,
    /// Jobs whose licence JWT was answered from the cache.
    pub licence_cache_hits: u64,
    /// Calls of [`LicenceAuthority::verify_licence`].
    pub licence_checks: u64,
    /// Licensing key set loads started (the set handed over at startup not counted).
    pub licence_key_loads: u64,
    /// Licensing key set loads finished (loaded or failed).
    pub licence_key_loads_finished: u64,
    /// Licences cached now.
    pub cached_licences: usize,
    /// Jobs whose licensing answer came from the cache within `cache_ttl`.
    pub answer_cache_hits: u64,
    /// Calls of [`LicensingService::introspect`].
    pub licensing_requests: u64,
    /// Jobs given an answer older than `cache_ttl` (within the grace) because the licensing
    /// service was unavailable.
    pub answers_in_grace: u64,
    /// Licensing answers cached now (expired ones included until they are dropped).
    pub cached_answers: usize,
}

pub struct Entitlement;

/// A job waiting for its token.
struct Pending {
    input: GateInput,
    reply: Reply,
    now: u64,
}

/// A job whose caller is established, waiting for its licence.
struct PoeJob {
    input: GateInput,
    reply: Reply,
    now: u64,
    caller: Option<Caller>,
    auth: AuthState,
}

impl PoeJob {
    fn value(&self) -> &str {
        &self.input.request.poe.value
    }

    fn tenant(&self) -> &str {
        &self.input.request.tenant
    }

    /// Answers the job with what its licence allows (or why not), with its caller and auth.
    fn answer(self, licence: Result<PoeGrant, PoeRefusal>) {
        let PoeJob {
            reply,
            caller,
            auth,
            ..
        } = self;
        let result = match licence {
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
        };
        count_denial(&result);
        let _ = reply.send(result);
    }
}

/// A key set the actor keeps (the Authority's or the licensing one): the current set, the
/// load in flight with the jobs (`W`) waiting for it, and the last load's time and failure.
struct KeyRing<W> {
    /// The current set; `None` until the first load.
    keys: Option<Arc<dyn TokenKeys>>,
    /// `Some` while a load is in flight: the jobs waiting for it.
    loading: Option<Vec<W>>,
    last_attempt: Option<Instant>,
    last_error: Option<String>,
    unknown_kid_interval: Duration,
    ticker: Option<JoinHandle<()>>,
    loads: u64,
    loads_finished: u64,
}

impl<W> KeyRing<W> {
    fn new(
        startup: Option<Arc<dyn TokenKeys>>,
        unknown_kid_interval: Duration,
        ticker: JoinHandle<()>,
    ) -> Self {
        KeyRing {
            last_attempt: startup.as_ref().map(|_| Instant::now()),
            keys: startup,
            loading: None,
            last_error: None,
            unknown_kid_interval,
            ticker: Some(ticker),
            loads: 0,
            loads_finished: 0,
        }
    }

    /// Starts a load (`fetch`, reported as `wrap(result)`) unless one is in flight.
    fn load<F>(
        &mut self,
        myself: &ActorRef<EntitlementMsg>,
        fetch: impl FnOnce() -> F,
        wrap: fn(Result<Arc<dyn TokenKeys>, PortError>) -> EntitlementMsg,
    ) where
        F: Future<Output = Result<Arc<dyn TokenKeys>, PortError>> + Send + 'static,
    {
        if self.loading.is_some() {
            return;
        }
        self.loading = Some(Vec::new());
        self.last_attempt = Some(Instant::now());
        self.loads += 1;
        report(myself, "key set load", fetch(), wrap);
    }

    /// Whether an unknown kid may cause a reload now.
    fn reload_due(&self) -> bool {
        self.last_attempt
            .is_none_or(|t| t.elapsed() >= self.unknown_kid_interval)
    }

    /// Whether a job that needs the set may wait for a load: one is in flight, or the last
    /// one was long enough ago.
    fn may_wait(&self) -> bool {
        self.loading.is_some() || self.reload_due()
    }

    fn wait(&mut self, job: W) {
        if let Some(waiting) = self.loading.as_mut() {
            waiting.push(job);
        }
    }

    /// Takes the outcome of a load (keeping the last good set when it failed) and returns the
    /// jobs that waited for it.
    fn loaded(&mut self, name: &str, result: Result<Arc<dyn TokenKeys>, PortError>) -> Vec<W> {
        self.loads_finished += 1;
        match result {
            Ok(keys) => {
                tracing::debug!(jwks = name, keys = keys.len(), "key set loaded");
                self.keys = Some(keys);
                self.last_error = None;
            }
            Err(e) => {
                tracing::warn!(jwks = name, error = %e, "key set reload failed; keeping the last good set");
                self.last_error = Some(e.to_string());
            }
        }
        self.loading.take().unwrap_or_default()
    }

    /// Why the set is unavailable (the last load's error).
    fn reason(&self) -> String {
        self.last_error.clone().unwrap_or_default()
    }

    fn stop(&mut self) {
        if let Some(ticker) = self.ticker.take() {
            ticker.abort();
        }
    }
}

/// Runs `work` in a task of its own and reports its outcome to the actor as `wrap(outcome)`;
/// a panic reports [`EntitlementMsg::Failed`]. One task per check: the panic is caught in
/// it, not by a second task awaiting the first.
fn report<T: Send + 'static>(
    myself: &ActorRef<EntitlementMsg>,
    what: &'static str,
    work: impl Future<Output = T> + Send + 'static,
    wrap: impl FnOnce(T) -> EntitlementMsg + Send + 'static,
) {
    use futures::FutureExt as _;
    let me = myself.clone();
    tokio::spawn(async move {
        let msg = match std::panic::AssertUnwindSafe(work).catch_unwind().await {
            Ok(outcome) => wrap(outcome),
            Err(panic) => EntitlementMsg::Failed(format!("{what}: {}", panic_message(&*panic))),
        };
        let _ = me.cast(msg);
    });
}

/// What a caught panic said.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("panicked")
}

/// The outcome of work on a blocking thread, as a future: its panic panics the future (and
/// is caught by [`report`]).
async fn blocking<T>(handle: JoinHandle<T>) -> T {
    match handle.await {
        Ok(outcome) => outcome,
        Err(e) => match e.try_into_panic() {
            Ok(panic) => std::panic::resume_unwind(panic),
            Err(e) => std::panic::resume_unwind(Box::new(e.to_string())),
        },
    }
}

/// The token side of the actor's state (absent when the port checks no tokens).
struct Tokens {
    authority: Arc<dyn TokenAuthority>,
    ring: KeyRing<Pending>,
    verified: TtlCache<TokenId, Arc<VerifiedToken>, u64>,
    /// Token checks running, with the jobs waiting for each.
    checking: HashMap<TokenId, (bool, Vec<Pending>)>,
    cache_hits: u64,
    checks: u64,
}

/// The licence JWT side (absent when the port takes no licence JWTs).
struct Licences {
    authority: Arc<dyn LicenceAuthority>,
    ring: KeyRing<PoeJob>,
    verified: TtlCache<LicenceId, Arc<VerifiedLicence>, u64>,
    /// Licence checks running, with the jobs waiting for each.
    checking: HashMap<LicenceId, (bool, Vec<PoeJob>)>,
    cache_hits: u64,
    checks: u64,
}

/// A licensing answer and when it arrived (on the port's clock).
#[derive(Clone)]
struct CachedAnswer {
    at: Instant,
    answer: Arc<LicensingAnswer>,
}

/// The licensing service side (absent when the port asks no licensing service).
struct Answers {
    service: Arc<dyn LicensingService>,
    clock: Arc<dyn Clock>,
    ttl: Duration,
    grace: Duration,
    /// Kept until `ttl + grace` after they arrived.
    cache: TtlCache<AnswerId, CachedAnswer, Instant>,
    /// Requests in flight, with the jobs waiting for each.
    asking: HashMap<AnswerId, Vec<PoeJob>>,
    cache_hits: u64,
    requests: u64,
    in_grace: u64,
}

/// What the Entitlement actor owns.
pub struct EntitlementState {
    port: Arc<dyn EntitlementVerifier>,
    tokens: Option<Tokens>,
    licences: Option<Licences>,
    answers: Option<Answers>,
}

/// `t` in whole unix seconds (0 before the epoch), the unit of JWT dates.
fn unix_seconds(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn count_denial<T>(result: &Result<T, GateDenial>) {
    if let Err(denial) = result {
        metrics::counter!("signer_auth_failures_total", "code" => denial.error.code().as_str())
            .increment(1);
    }
}

/// A refusal at the token step: no caller, the token not (validly) checked.
fn token_denial(error: SignerError) -> GateDenial {
    let auth = match error {
        SignerError::EntitlementUnavailable(_) => AuthState::NotChecked,
        _ => AuthState::Invalid,
    };
    GateDenial {
        error,
        caller: None,
        auth: Some(auth),
        poe: Some(PoeState::NotChecked),
        plan: None,
    }
}

fn deny(reply: Reply, error: SignerError) {
    let result = Err(token_denial(error));
    count_denial(&result);
    let _ = reply.send(result);
}

fn authority_unavailable(reason: &str) -> SignerError {
    SignerError::EntitlementUnavailable(format!("Authority keys unavailable: {reason}"))
}

/// The refusal of a licence JWT while the licensing key set cannot be loaded.
fn licence_keys_unavailable(reason: &str) -> PoeRefusal {
    PoeRefusal {
        error: SignerError::EntitlementUnavailable(format!("licensing keys unavailable: {reason}")),
        state: PoeState::Unavailable,
        plan: None,
    }
}

/// The rest of the job's check up to its licence (dates and tenant for this job, DPoP), in
/// its own task; reported back as [`EntitlementMsg::Authenticated`].
fn authenticate(
    myself: &ActorRef<EntitlementMsg>,
    port: &Arc<dyn EntitlementVerifier>,
    job: Pending,
    token: Option<Arc<VerifiedToken>>,
) {
    let port = port.clone();
    let input = job.input.clone();
    let work = async move { port.authenticate(&input, token.as_deref()).await };
    report(myself, "entitlement check", work, move |result| {
        EntitlementMsg::Authenticated(Box::new(JobAuthenticated { job, result }))
    });
}

impl Tokens {
    fn start(myself: &ActorRef<EntitlementMsg>, authority: Arc<dyn TokenAuthority>) -> Self {
        let every = authority.refresh_every().max(Duration::from_millis(10));
        let ticker = myself.send_interval(every, || EntitlementMsg::Refresh);
        let startup = authority.startup_keys();
        let restarted = startup.is_none();
        let mut tokens = Tokens {
            ring: KeyRing::new(startup, authority.unknown_kid_interval(), ticker),
            verified: TtlCache::new(authority.token_cache_capacity()),
            authority,
            checking: HashMap::new(),
            cache_hits: 0,
            checks: 0,
        };
        if restarted {
            // A restarted actor loads the set afresh (it may have changed).
            tokens.load(myself);
        }
        tokens
    }

    /// Starts a key set load unless one is in flight.
    fn load(&mut self, myself: &ActorRef<EntitlementMsg>) {
        let authority = self.authority.clone();
        self.ring.load(
            myself,
            || async move { authority.fetch_keys().await },
            EntitlementMsg::KeysLoaded,
        );
    }

    /// The refusal for a kid still unknown after what reloading was allowed: retryable when
    /// the set could not be reloaded (the kid may be a rotation we cannot see).
    fn unknown_key_error(&self, error: SignerError) -> SignerError {
        match &self.ring.last_error {
            Some(e) => authority_unavailable(e),
            None => error,
        }
    }

    /// Checks the job's token: from the cache, by joining a check of the same token already
    /// running, or by starting one.
    fn check(
        &mut self,
        myself: &ActorRef<EntitlementMsg>,
        port: &Arc<dyn EntitlementVerifier>,
        job: Pending,
        reloaded: bool,
    ) {
        let id: TokenId = Sha256::digest(job.input.request.auth.op_tok.as_bytes()).into();
        if let Some(hit) = self.verified.get(&id, job.now) {
            if self
                .ring
                .keys
                .as_ref()
                .is_some_and(|k| k.has_key(&hit.key_id))
            {
                self.cache_hits += 1;
                metrics::counter!("signer_auth_cache_hits_total").increment(1);
                authenticate(myself, port, job, Some(hit));
                return;
            }
            // Its key was withdrawn from the set: verify again (and most likely refuse).
            self.verified.remove(&id);
        }
        if let Some((_, waiting)) = self.checking.get_mut(&id) {
            waiting.push(job);
            return;
        }
        let Some(keys) = self.ring.keys.clone() else {
            // No set yet (the actor just started, or every load so far failed): wait for a
            // load, unless the last one failed too recently.
            if !self.ring.may_wait() {
                deny(job.reply, authority_unavailable(&self.ring.reason()));
                return;
            }
            self.load(myself);
            self.ring.wait(job);
            return;
        };
        self.checks += 1;
        let (raw, now) = (job.input.request.auth.op_tok.clone(), job.now);
        self.checking.insert(id, (reloaded, vec![job]));
        let authority = self.authority.clone();
        let work = blocking(tokio::task::spawn_blocking(move || {
            authority.verify_token(&raw, keys.as_ref(), now)
        }));
        report(myself, "token check", work, move |result| {
            EntitlementMsg::TokenChecked { id, now, result }
        });
    }

    fn checked(
        &mut self,
        myself: &ActorRef<EntitlementMsg>,
        port: &Arc<dyn EntitlementVerifier>,
        id: TokenId,
        now: u64,
        result: Result<VerifiedToken, TokenRefusal>,
    ) {
        let Some((reloaded, waiting)) = self.checking.remove(&id) else {
            return;
        };
        match result {
            Ok(token) => {
                let token = Arc::new(token);
                if token.reuse_until > now {
                    self.verified
                        .insert(id, token.clone(), token.reuse_until, now);
                }
                for job in waiting {
                    authenticate(myself, port, job, Some(token.clone()));
                }
            }
            Err(TokenRefusal::Refused(error)) => {
                // A refusal may depend on the time it was judged at (expired, not yet
                // valid); jobs published at another second are checked on their own.
                let (same, other): (Vec<_>, Vec<_>) =
                    waiting.into_iter().partition(|j| j.now == now);
                for job in same {
                    deny(job.reply, error.clone());
                }
                for job in other {
                    self.check(myself, port, job, reloaded);
                }
            }
            Err(TokenRefusal::UnknownKey { kid, error }) => {
                if !reloaded && self.ring.may_wait() {
                    tracing::info!(jwks = "authority", kid = %crate::echo::echo(&kid), "unknown kid: reloading the key set");
                    self.load(myself);
                    for job in waiting {
                        self.ring.wait(job);
                    }
                } else {
                    let error = self.unknown_key_error(error);
                    for job in waiting {
                        deny(job.reply, error.clone());
                    }
                }
            }
        }
    }

    fn loaded(
        &mut self,
        myself: &ActorRef<EntitlementMsg>,
        port: &Arc<dyn EntitlementVerifier>,
        result: Result<Arc<dyn TokenKeys>, PortError>,
    ) {
        let waiting = self.ring.loaded("authority", result);
        for job in waiting {
            if self.ring.keys.is_some() {
                self.check(myself, port, job, true);
            } else {
                deny(job.reply, authority_unavailable(&self.ring.reason()));
            }
        }
    }
}

impl Licences {
    fn start(myself: &ActorRef<EntitlementMsg>, authority: Arc<dyn LicenceAuthority>) -> Self {
        let every = authority.refresh_every().max(Duration::from_millis(10));
        let ticker = myself.send_interval(every, || EntitlementMsg::RefreshLicenceKeys);
        let startup = authority.startup_keys();
        let restarted = startup.is_none();
        let mut licences = Licences {
            ring: KeyRing::new(startup, authority.unknown_kid_interval(), ticker),
            verified: TtlCache::new(authority.licence_cache_capacity()),
            authority,
            checking: HashMap::new(),
            cache_hits: 0,
            checks: 0,
        };
        if restarted {
            licences.load(myself);
        }
        licences
    }

    /// Starts a licensing key set load unless one is in flight.
    fn load(&mut self, myself: &ActorRef<EntitlementMsg>) {
        let authority = self.authority.clone();
        self.ring.load(
            myself,
            || async move { authority.fetch_keys().await },
            EntitlementMsg::LicenceKeysLoaded,
        );
    }

    /// Judges `licence` for the job, at its publish time.
    fn judge(&self, job: PoeJob, licence: &VerifiedLicence) {
        let result = self.authority.judge(licence, job.tenant(), job.now);
        job.answer(result);
    }

    /// Checks the job's licence JWT: from the cache, by joining a check of the same licence
    /// already running, or by starting one.
    fn check(&mut self, myself: &ActorRef<EntitlementMsg>, job: PoeJob, reloaded: bool) {
        let id: LicenceId = Sha256::digest(job.value().as_bytes()).into();
        if let Some(hit) = self.verified.get(&id, job.now) {
            if self
                .ring
                .keys
                .as_ref()
                .is_some_and(|k| k.has_key(&hit.key_id))
            {
                self.cache_hits += 1;
                self.judge(job, &hit);
                return;
            }
            // Its key was withdrawn from the licensing set: verify again.
            self.verified.remove(&id);
        }
        if let Some((_, waiting)) = self.checking.get_mut(&id) {
            waiting.push(job);
            return;
        }
        let Some(keys) = self.ring.keys.clone() else {
            if !self.ring.may_wait() {
                job.answer(Err(licence_keys_unavailable(&self.ring.reason())));
                return;
            }
            self.load(myself);
            self.ring.wait(job);
            return;
        };
        self.checks += 1;
        let raw = job.value().to_owned();
        self.checking.insert(id, (reloaded, vec![job]));
        let authority = self.authority.clone();
        let work = blocking(tokio::task::spawn_blocking(move || {
            authority.verify_licence(&raw, keys.as_ref())
        }));
        report(myself, "licence check", work, move |result| {
            EntitlementMsg::LicenceChecked { id, result }
        });
    }

    fn checked(
        &mut self,
        myself: &ActorRef<EntitlementMsg>,
        id: LicenceId,
        result: Result<VerifiedLicence, LicenceRefusal>,
    ) {
        let Some((reloaded, waiting)) = self.checking.remove(&id) else {
            return;
        };
        match result {
            Ok(licence) => {
                // Kept as long as the latest job that waited for it could still use it.
                let now = waiting.iter().map(|j| j.now).max().unwrap_or(0);
                if licence.reuse_until > now {
                    self.verified
                        .insert(id, Arc::new(licence.clone()), licence.reuse_until, now);
                }
                for job in waiting {
                    self.judge(job, &licence);
                }
            }
            // Verification judges no date: the refusal holds for every job that waited.
            Err(LicenceRefusal::Refused(refusal)) => {
                for job in waiting {
                    job.answer(Err(refusal.clone()));
                }
            }
            Err(LicenceRefusal::UnknownKey { kid, refusal }) => {
                if !reloaded && self.ring.may_wait() {
                    tracing::info!(jwks = "licensing", kid = %crate::echo::echo(&kid), "unknown kid: reloading the key set");
                    self.load(myself);
                    for job in waiting {
                        self.ring.wait(job);
                    }
                } else {
                    // Retryable when the set could not be reloaded: the kid may be a rotation
                    // we cannot see.
                    let refusal = match &self.ring.last_error {
                        Some(e) => licence_keys_unavailable(e),
                        None => refusal,
                    };
                    for job in waiting {
                        job.answer(Err(refusal.clone()));
                    }
                }
            }
        }
    }

    fn loaded(
        &mut self,
        myself: &ActorRef<EntitlementMsg>,
        result: Result<Arc<dyn TokenKeys>, PortError>,
    ) {
        let waiting = self.ring.loaded("licensing", result);
        for job in waiting {
            if self.ring.keys.is_some() {
                self.check(myself, job, true);
            } else {
                job.answer(Err(licence_keys_unavailable(&self.ring.reason())));
            }
        }
    }
}

/// Answers are kept per value and tenant: the same value may be asked about for two tenants.
fn answer_id(value: &str, tenant: &str) -> AnswerId {
    let mut id = Sha256::new();
    id.update(Sha256::digest(value.as_bytes()));
    id.update(tenant.as_bytes());
    id.finalize().into()
}

impl Answers {
    fn new(service: Arc<dyn LicensingService>) -> Self {
        Answers {
            clock: service.clock(),
            ttl: service.cache_ttl(),
            grace: service.grace(),
            cache: TtlCache::new(service.answer_cache_capacity()),
            service,
            asking: HashMap::new(),
            cache_hits: 0,
            requests: 0,
            in_grace: 0,
        }
    }

    fn judge(&self, job: PoeJob, answer: &LicensingAnswer) {
        let result = self.service.judge(answer, job.tenant(), job.now);
        job.answer(result);
    }

    /// Checks the job's value with the licensing service: from an answer younger than the
    /// TTL, by joining a request for the same value and tenant already in flight, or by
    /// asking.
    fn check(&mut self, myself: &ActorRef<EntitlementMsg>, job: PoeJob) {
        let id = answer_id(job.value(), job.tenant());
        let now = self.clock.now();
        if let Some(c) = self.cache.get(&id, now)
            && now.saturating_duration_since(c.at) < self.ttl
        {
            self.cache_hits += 1;
            self.judge(job, &c.answer);
            return;
        }
        if let Some(waiting) = self.asking.get_mut(&id) {
            waiting.push(job);
            return;
        }
        self.requests += 1;
        let (value, tenant) = (job.value().to_owned(), job.tenant().to_owned());
        self.asking.insert(id, vec![job]);
        let service = self.service.clone();
        let work = async move { service.introspect(&value, &tenant).await };
        report(myself, "licensing request", work, move |result| {
            EntitlementMsg::Answered { id, result }
        });
    }

    fn answered(&mut self, id: AnswerId, result: Result<LicensingAnswer, PortError>) {
        let Some(waiting) = self.asking.remove(&id) else {
            return;
        };
        match result {
            Ok(answer) => {
                let at = self.clock.now();
                let answer = Arc::new(answer);
                if let Some(until) = at.checked_add(self.ttl.saturating_add(self.grace)) {
                    let cached = CachedAnswer {
                        at,
                        answer: answer.clone(),
                    };
                    self.cache.insert(id, cached, until, at);
                }
                for job in waiting {
                    self.judge(job, &answer);
                }
            }
            // The cache only returns answers younger than ttl + grace.
            Err(e) => match self.cache.get(&id, self.clock.now()) {
                Some(c) => {
                    let age = self.clock.now().saturating_duration_since(c.at);
                    tracing::warn!(error = %e, age_ms = u64::try_from(age.as_millis()).unwrap_or(u64::MAX),
                        jobs = waiting.len(), "licensing unavailable: using a cached verdict within grace");
                    self.in_grace += waiting.len() as u64;
                    for job in waiting {
                        self.judge(job, &c.answer);
                    }
                }
                None => {
                    let refusal = PoeRefusal {
                        error: SignerError::EntitlementUnavailable(format!(
                            "licensing unavailable and no cached verdict within grace: {e}"
                        )),
                        state: PoeState::Unavailable,
                        plan: None,
                    };
                    for job in waiting {
                        job.answer(Err(refusal.clone()));
                    }
                }
            },
        }
    }
}

/// The refusal when the port names a licence step it gave the actor no port for.
fn no_port(format: &str) -> PoeRefusal {
    PoeRefusal {
        error: SignerError::Internal(format!(
            "the entitlement gate asked for a {format} licence check but gave no port for it"
        )),
        state: PoeState::NotChecked,
        plan: None,
    }
}

impl EntitlementState {
    /// A job's check up to its licence finished: answer it, or go on with its licence.
    fn authenticated(&mut self, myself: &ActorRef<EntitlementMsg>, done: JobAuthenticated) {
        let JobAuthenticated { job, result } = done;
        let a = match result {
            Ok(a) => a,
            Err(denial) => {
                let result = Err(denial);
                count_denial(&result);
                let _ = job.reply.send(result);
                return;
            }
        };
        let job = PoeJob {
            input: job.input,
            reply: job.reply,
            now: job.now,
            caller: a.caller,
            auth: a.auth,
        };
        match a.licence {
            LicenceStep::Decided(grant) => job.answer(Ok(grant)),
            LicenceStep::Jwt => match self.licences.as_mut() {
                Some(licences) => licences.check(myself, job, false),
                None => job.answer(Err(no_port("jwt"))),
            },
            LicenceStep::Introspect => match self.answers.as_mut() {
                Some(answers) => answers.check(myself, job),
                None => job.answer(Err(no_port("introspect"))),
            },
        }
    }

    fn stats(&self) -> EntitlementStats {
        let mut s = EntitlementStats::default();
        if let Some(t) = &self.tokens {
            s.token_cache_hits = t.cache_hits;
            s.token_checks = t.checks;
            s.key_loads = t.ring.loads;
            s.key_loads_finished = t.ring.loads_finished;
            s.cached_tokens = t.verified.len();
        }
        if let Some(l) = &self.licences {
            s.licence_cache_hits = l.cache_hits;
            s.licence_checks = l.checks;
            s.licence_key_loads = l.ring.loads;
            s.licence_key_loads_finished = l.ring.loads_finished;
            s.cached_licences = l.verified.len();
        }
        if let Some(a) = &self.answers {
            s.answer_cache_hits = a.cache_hits;
            s.licensing_requests = a.requests;
            s.answers_in_grace = a.in_grace;
            s.cached_answers = a.cache.len();
        }
        s
    }
}

impl Actor for Entitlement {
    type Msg = EntitlementMsg;
    type State = EntitlementState;
    type Arguments = Arc<dyn EntitlementVerifier>;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        port: Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(EntitlementState {
            tokens: port.tokens().map(|a| Tokens::start(&myself, a)),
            licences: port.licences().map(|a| Licences::start(&myself, a)),
            answers: port.licensing().map(Answers::new),
            port,
        })
    }

    async fn post_stop(
        &self,
        _: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        if let Some(t) = state.tokens.as_mut() {
            t.ring.stop();
        }
        if let Some(l) = state.licences.as_mut() {
            l.ring.stop();
        }
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let port = &state.port;
        match msg {
            EntitlementMsg::Verify(input, reply) => {
                let now = unix_seconds(input.published);
                let job = Pending { input, reply, now };
                match state.tokens.as_mut() {
                    Some(tokens) => tokens.check(&myself, port, job, false),
                    None => authenticate(&myself, port, job, None),
                }
            }
            EntitlementMsg::Stats(reply) => {
                let _ = reply.send(state.stats());
            }
            EntitlementMsg::Refresh => {
                if let Some(tokens) = state.tokens.as_mut() {
                    tokens.load(&myself);
                }
            }
            EntitlementMsg::RefreshLicenceKeys => {
                if let Some(licences) = state.licences.as_mut() {
                    licences.load(&myself);
                }
            }
            EntitlementMsg::KeysLoaded(result) => {
                if let Some(tokens) = state.tokens.as_mut() {
                    tokens.loaded(&myself, port, result);
                }
            }
            EntitlementMsg::LicenceKeysLoaded(result) => {
                if let Some(licences) = state.licences.as_mut() {
                    licences.loaded(&myself, result);
                }
            }
            EntitlementMsg::TokenChecked { id, now, result } => {
                if let Some(tokens) = state.tokens.as_mut() {
                    tokens.checked(&myself, port, id, now, result);
                }
            }
            EntitlementMsg::Authenticated(done) => state.authenticated(&myself, *done),
            EntitlementMsg::LicenceChecked { id, result } => {
                if let Some(licences) = state.licences.as_mut() {
                    licences.checked(&myself, id, result);
                }
            }
            EntitlementMsg::Answered { id, result } => {
                if let Some(answers) = state.answers.as_mut() {
                    answers.answered(id, result);
                }
            }
            EntitlementMsg::Failed(e) => {
                return Err(format!("entitlement check panicked: {e}").into());
            }
        }
        Ok(())
    }
}

#[cfg(test)]
#[path = "entitlement_tests.rs"]
mod tests;
