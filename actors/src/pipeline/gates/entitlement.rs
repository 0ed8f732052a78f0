//! The Entitlement actor: OpTok, DPoP and PoE checks, with the Authority's key set and the
//! verified tokens it owns.
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
//!
//! The actor's mailbox never waits on the network or the CPU: key loads, signature checks
//! (on the blocking pool) and the rest of a job's check (DPoP replay store, licensing) run
//! in tasks that report back by message. A check that panics makes the actor fail; its
//! supervisor restarts it with empty caches (the key set is loaded again).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use sha2::{Digest, Sha256};

use super::cache::TtlCache;
use super::failer;
use crate::audit::{AuthState, PoeState};
use crate::error::SignerError;
use crate::pipeline::spawn_reply;
use crate::ports::{
    EntitlementVerdict, EntitlementVerifier, GateDenial, GateInput, PortError, TokenAuthority,
    TokenKeys, TokenRefusal, VerifiedToken,
};

type Reply = RpcReplyPort<Result<EntitlementVerdict, GateDenial>>;
type TokenId = [u8; 32];

/// Messages of the Entitlement actor.
pub enum EntitlementMsg {
    Verify(GateInput, Reply),
    /// Counters, for tests and diagnostics.
    Stats(RpcReplyPort<EntitlementStats>),
    /// Reload the key set now (the periodic refresh sends this).
    Refresh,
    /// A key set load finished.
    KeysLoaded(Result<Arc<dyn TokenKeys>, PortError>),
    /// A token check finished (for the jobs waiting on token `id`, judged at `now`).
    TokenChecked {
        id: TokenId,
        now: u64,
        result: Result<VerifiedToken, TokenRefusal>,
    },
    /// A check panicked.
    Failed(String),
}

/// What the Entitlement actor counted since it started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EntitlementStats {
    /// Jobs whose token was answered from the cache.
    pub token_cache_hits: u64,
    /// Calls of [`TokenAuthority::verify_token`].
    pub token_checks: u64,
    /// Key set loads started (the set handed over at startup not counted).
    pub key_loads: u64,
    /// Key set loads finished (loaded or failed).
    pub key_loads_finished: u64,
    /// Tokens cached now.
    pub cached_tokens: usize,
}

pub struct Entitlement;

/// A job waiting for its token.
struct Pending {
    input: GateInput,
    reply: Reply,
    now: u64,
}

/// The token side of the actor's state (absent when the port checks no tokens).
struct Tokens {
    authority: Arc<dyn TokenAuthority>,
    /// The current key set; `None` until the first load.
    keys: Option<Arc<dyn TokenKeys>>,
    verified: TtlCache<TokenId, Arc<VerifiedToken>, u64>,
    /// Token checks running, with the jobs waiting for each.
    checking: HashMap<TokenId, (bool, Vec<Pending>)>,
    /// `Some` while a key set load is in flight: the jobs waiting for it.
    loading: Option<Vec<(TokenId, Pending)>>,
    last_attempt: Option<Instant>,
    last_error: Option<String>,
    ticker: Option<tokio::task::JoinHandle<()>>,
    stats: EntitlementStats,
}

/// What the Entitlement actor owns.
pub struct EntitlementState {
    port: Arc<dyn EntitlementVerifier>,
    tokens: Option<Tokens>,
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

impl Tokens {
    /// Starts a key set load unless one is in flight.
    fn load(&mut self, myself: &ActorRef<EntitlementMsg>) {
        if self.loading.is_some() {
            return;
        }
        self.loading = Some(Vec::new());
        self.last_attempt = Some(Instant::now());
        self.stats.key_loads += 1;
        let authority = self.authority.clone();
        let me = myself.clone();
        let task = tokio::spawn(async move { authority.fetch_keys().await });
        tokio::spawn(async move {
            let msg = match task.await {
                Ok(result) => EntitlementMsg::KeysLoaded(result),
                Err(e) => EntitlementMsg::Failed(format!("key set load: {e}")),
            };
            let _ = me.cast(msg);
        });
    }

    /// Whether an unknown kid may cause a reload now.
    fn reload_due(&self) -> bool {
        self.last_attempt
            .is_none_or(|t| t.elapsed() >= self.authority.unknown_kid_interval())
    }

    /// The refusal for a kid still unknown after what reloading was allowed: retryable when
    /// the set could not be reloaded (the kid may be a rotation we cannot see).
    fn unknown_key_error(&self, error: SignerError) -> SignerError {
        match &self.last_error {
            Some(e) => {
                SignerError::EntitlementUnavailable(format!("Authority keys unavailable: {e}"))
            }
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
            if self.keys.as_ref().is_some_and(|k| k.has_key(&hit.key_id)) {
                self.stats.token_cache_hits += 1;
                metrics::counter!("signer_auth_cache_hits_total").increment(1);
                finish(myself, port, job, hit);
                return;
            }
            // Its key was withdrawn from the set: verify again (and most likely refuse).
            self.verified.remove(&id);
        }
        if let Some((_, waiting)) = self.checking.get_mut(&id) {
            waiting.push(job);
            return;
        }
        let Some(keys) = self.keys.clone() else {
            // No set yet (the actor just started, or every load so far failed): wait for a
            // load, unless the last one failed too recently.
            if self.loading.is_none() && !self.reload_due() {
                let reason = self.last_error.clone().unwrap_or_default();
                deny(
                    job.reply,
                    SignerError::EntitlementUnavailable(format!(
                        "Authority keys unavailable: {reason}"
                    )),
                );
                return;
            }
            self.load(myself);
            if let Some(waiting) = self.loading.as_mut() {
                waiting.push((id, job));
            }
            return;
        };
        self.stats.token_checks += 1;
        let (raw, now) = (job.input.request.auth.op_tok.clone(), job.now);
        self.checking.insert(id, (reloaded, vec![job]));
        let authority = self.authority.clone();
        let me = myself.clone();
        let task =
            tokio::task::spawn_blocking(move || authority.verify_token(&raw, keys.as_ref(), now));
        tokio::spawn(async move {
            let msg = match task.await {
                Ok(result) => EntitlementMsg::TokenChecked { id, now, result },
                Err(e) => EntitlementMsg::Failed(format!("token check: {e}")),
            };
            let _ = me.cast(msg);
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
                self.stats.cached_tokens = self.verified.len();
                for job in waiting {
                    finish(myself, port, job, token.clone());
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
                if !reloaded && (self.loading.is_some() || self.reload_due()) {
                    tracing::info!(kid = %crate::echo::echo(&kid), "unknown kid: reloading the Authority's key set");
                    self.load(myself);
                    if let Some(loading) = self.loading.as_mut() {
                        loading.extend(waiting.into_iter().map(|j| (id, j)));
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
        let waiting = self.loading.take().unwrap_or_default();
        self.stats.key_loads_finished += 1;
        match result {
            Ok(keys) => {
                tracing::debug!(keys = keys.len(), "Authority key set loaded");
                self.keys = Some(keys);
                self.last_error = None;
            }
            Err(e) => {
                tracing::warn!(error = %e, "Authority key set reload failed; keeping the last good set");
                self.last_error = Some(e.to_string());
            }
        }
        for (_, job) in waiting {
            if self.keys.is_some() {
                self.check(myself, port, job, true);
            } else {
                let reason = self.last_error.clone().unwrap_or_default();
                deny(
                    job.reply,
                    SignerError::EntitlementUnavailable(format!(
                        "Authority keys unavailable: {reason}"
                    )),
                );
            }
        }
    }
}

/// The rest of the job's check (dates and tenant for this job, DPoP, PoE), in its own task.
fn finish(
    myself: &ActorRef<EntitlementMsg>,
    port: &Arc<dyn EntitlementVerifier>,
    job: Pending,
    token: Arc<VerifiedToken>,
) {
    let port = port.clone();
    let input = job.input;
    spawn_reply(
        job.reply,
        async move {
            let result = port.verify(&input, Some(&token)).await;
            count_denial(&result);
            result
        },
        failer(myself, EntitlementMsg::Failed),
    );
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
        let tokens = port.tokens().map(|authority| {
            let every = authority.refresh_every().max(Duration::from_millis(10));
            let ticker = myself.send_interval(every, || EntitlementMsg::Refresh);
            let mut tokens = Tokens {
                keys: authority.startup_keys(),
                verified: TtlCache::new(authority.token_cache_capacity()),
                authority,
                checking: HashMap::new(),
                loading: None,
                last_attempt: None,
                last_error: None,
                ticker: Some(ticker),
                stats: EntitlementStats::default(),
            };
            if tokens.keys.is_some() {
                tokens.last_attempt = Some(Instant::now());
            } else {
                // A restarted actor loads the set afresh (it may have changed).
                tokens.load(&myself);
            }
            tokens
        });
        Ok(EntitlementState { port, tokens })
    }

    async fn post_stop(
        &self,
        _: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        if let Some(ticker) = state.tokens.as_mut().and_then(|t| t.ticker.take()) {
            ticker.abort();
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
            EntitlementMsg::Verify(input, reply) => match state.tokens.as_mut() {
                Some(tokens) => {
                    let now = unix_seconds(input.published);
                    tokens.check(&myself, port, Pending { input, reply, now }, false);
                }
                None => {
                    let port = port.clone();
                    spawn_reply(
                        reply,
                        async move {
                            let result = port.verify(&input, None).await;
                            count_denial(&result);
                            result
                        },
                        failer(&myself, EntitlementMsg::Failed),
                    );
                }
            },
            EntitlementMsg::Stats(reply) => {
                let stats =
                    state
                        .tokens
                        .as_ref()
                        .map_or_else(Default::default, |t| EntitlementStats {
                            cached_tokens: t.verified.len(),
                            ..t.stats
                        });
                let _ = reply.send(stats);
            }
            EntitlementMsg::Refresh => {
                if let Some(tokens) = state.tokens.as_mut() {
                    tokens.load(&myself);
                }
            }
            EntitlementMsg::KeysLoaded(result) => {
                if let Some(tokens) = state.tokens.as_mut() {
                    tokens.loaded(&myself, port, result);
                }
            }
            EntitlementMsg::TokenChecked { id, now, result } => {
                if let Some(tokens) = state.tokens.as_mut() {
                    tokens.checked(&myself, port, id, now, result);
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
