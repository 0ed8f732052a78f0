//! The QUOTA gate: per-tenant limits of the plan that the Proof-of-Entitlement selects.
//!
//! # Limits, in the order a job meets them
//!
//! 1. **Unknown plan**: a plan name that is not in `[gates.quota.plans]` is refused with
//!    `entitlement_denied` (not retryable): the licence names a plan this deployment does not sell.
//! 2. **Payload size**: `payload_bytes > max_payload_bytes` is refused with `payload_too_large`
//!    (not retryable). Checked locally, before the store is asked: nothing is charged.
//! 3. **Signatures per request**: a job makes one signature per key of its profile, and is
//!    charged one unit per signature. More than `max_signatures_per_request`, or more than the
//!    plan could ever grant at once (`burst`, a non-zero `daily_cap`), is refused with
//!    `entitlement_denied` (not retryable). Checked locally too: nothing is charged.
//! 4. **Concurrency**: at most `max_concurrent` jobs of one tenant hold a slot at the same time.
//!    A slot is taken by a granted `acquire` and given back by `release`; a job takes one slot
//!    whatever its number of signatures (its keys sign concurrently, within the one job).
//! 5. **Daily cap**: at most `daily_cap` signatures per tenant per UTC day (0: no cap).
//! 6. **Rate**: a token bucket per tenant, refilled continuously at `requests_per_second`
//!    tokens a second, holding at most `burst` tokens; a job takes one token per signature. A
//!    tenant seen for the first time (or idle long enough for its bucket to be full again)
//!    starts with a full bucket.
//!
//! Checks 4 to 6 are made together and are all-or-nothing: a refused request takes nothing (no
//! token, no daily count, no slot), and a two-signature job is never half charged. When several
//! of them refuse, the one with the longest wait is reported, so `retryAfterMs` never invites a
//! retry that is bound to fail again: `quota_exceeded` with `retryAfterMs` = time until enough
//! tokens for the job are back (rate), until UTC midnight (daily cap), or a fixed 100 ms
//! (concurrency). Every refusal increments `signer_quota_exceeded_total{tenant,plan,reason}`
//! with reason `rate`, `concurrency` or `daily`.
//!
//! # Stores
//!
//! - [`RedisQuota`] (when `[redis]` is configured) shares each tenant's budget between all
//!   replicas. One Lua script per `acquire` reads and updates the tenant's three keys
//!   (`<prefix>{<tenant>}:bucket`, `:daily`, `:slots`; the hash tag keeps them in one cluster
//!   slot). Redis runs a script atomically, so concurrent acquires from any number of replicas
//!   can never over-grant. The Quota actor sends acquires in batches
//!   ([`QuotaStore::acquire_many`], at most `batch_max`): a batch is one pipeline of that same
//!   script, one `EVALSHA` per request in batch order, so it costs one round trip and gives each
//!   request the answer it would have had alone (a `NOSCRIPT` refusal, after a `SCRIPT FLUSH`
//!   or a Redis restart, runs nothing; those commands are sent again once the script is
//!   loaded). Releases go in batches too (one pipeline of `ZREM`s). Time comes from Redis `TIME` inside the script, so replicas with
//!   skewed clocks agree on refills and on the UTC day. Every key has an expiry: the bucket
//!   when it would be full again anyway, the daily counter an hour after its UTC day ends, the
//!   slots when the last slot's lease ends.
//! - [`MemoryQuota`] (no Redis) applies the same rules inside one process: **per replica**, so N
//!   replicas grant up to N times a plan's limits.
//!
//! # Concurrency slots and crashed replicas
//!
//! In Redis a slot is a member of a sorted set scored with its lease end (`now + 2 min`); an
//! acquire first drops expired members. A replica that crashes while holding slots therefore
//! loses them after at most the lease, even while the tenant keeps sending work (a plain counter
//! with a refreshed TTL would leak them for as long as traffic never pauses). `release` removes
//! one slot this replica took for the tenant; a release with nothing to give back (after a
//! fail-open grant, or a second release) is a no-op, so the count never goes below zero and a
//! release can never free another replica's slot. A job that runs longer than the lease loses
//! its slot early: the limit is then briefly soft, never stuck.
//!
//! # When Redis fails
//!
//! Any Redis error (no connection from the pool, connection refused, script error, unexpected
//! reply, or no answer within 2 s) makes the gate, for each request it concerns (every request
//! of a batch when the round trip fails, one request when its command fails),
//! - **fail closed** (default, `fail_open = false`): `internal` ("quota store unavailable: ..."),
//!   which the contract marks retryable: the job is NAKed and retried with backoff;
//! - **fail open** (`fail_open = true`): the job passes as [`QuotaGrant::FailOpen`], recorded in
//!   the audit event, counted by `signer_quota_fail_open_total`.
//!
//! Both log a warning at most every 10 s (with the number of occurrences since the last one).
//!
//! [`QuotaGrant::FailOpen`]: signer_actors::ports::QuotaGrant::FailOpen

mod memory;
mod redis;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use signer_actors::error::SignerError;
use signer_actors::pipeline::disabled::DisabledQuota;
use signer_actors::ports::QuotaStore;

use crate::config::{GateMode, Plan, QuotaGate};

pub use self::memory::MemoryQuota;
pub use self::redis::RedisQuota;

/// `retryAfterMs` of a concurrency refusal.
pub const CONCURRENCY_RETRY_MS: u64 = 100;
/// Lease of a concurrency slot in Redis: how long a crashed replica's slots stay taken.
pub const SLOT_LEASE: Duration = Duration::from_secs(120);
/// How long a daily counter outlives its UTC day (Redis).
pub const DAILY_MARGIN: Duration = Duration::from_secs(3600);
/// Longest wait for Redis in `acquire`/`release` before it counts as unavailable.
pub const REDIS_TIMEOUT: Duration = Duration::from_secs(2);

const DAY_MS: u64 = 86_400_000;

/// The quota configuration cannot be used.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum QuotaSetupError {
    #[error(
        "gates.quota: no plans configured (add [gates.quota.plans.<name>], or set mode = \"disabled\")"
    )]
    NoPlans,
    #[error("gates.quota.plans.{plan}: {reason}")]
    InvalidPlan { plan: String, reason: String },
    #[error("gates.quota.batch_max must be at least 1")]
    BatchMax,
}

/// Builds the quota gate: [`DisabledQuota`] when `mode = "disabled"`, else [`RedisQuota`] when a
/// Redis pool is given, else [`MemoryQuota`] (per replica).
pub fn from_config(
    cfg: &QuotaGate,
    redis: Option<crate::redis::Redis>,
) -> Result<Arc<dyn QuotaStore>, QuotaSetupError> {
    if cfg.mode == GateMode::Disabled {
        return Ok(Arc::new(DisabledQuota));
    }
    Ok(match redis {
        Some(pool) => Arc::new(RedisQuota::new(pool, cfg.clone())?),
        None => {
            if cfg.batch_max == 0 {
                return Err(QuotaSetupError::BatchMax);
            }
            Arc::new(MemoryQuota::new(cfg.plans.clone())?.with_batch_max(cfg.batch_max))
        }
    })
}

/// Checks that there is at least one plan and that every plan can grant something.
pub fn validate(plans: &BTreeMap<String, Plan>) -> Result<(), QuotaSetupError> {
    if plans.is_empty() {
        return Err(QuotaSetupError::NoPlans);
    }
    for (name, plan) in plans {
        let invalid = |reason: &str| {
            Err(QuotaSetupError::InvalidPlan {
                plan: name.clone(),
                reason: reason.into(),
            })
        };
        if !(plan.requests_per_second.is_finite() && plan.requests_per_second > 0.0) {
            return invalid("requests_per_second must be a number greater than 0");
        }
        if plan.burst == 0 {
            return invalid("burst must be at least 1");
        }
        if plan.max_concurrent == 0 {
            return invalid("max_concurrent must be at least 1");
        }
        if plan.max_payload_bytes == 0 {
            return invalid("max_payload_bytes must be at least 1");
        }
        if let Some(cap) = plan.max_signatures_per_request {
            if cap == 0 {
                return invalid("max_signatures_per_request must be at least 1");
            }
            if cap > plan.burst {
                return invalid(
                    "max_signatures_per_request must not exceed burst (a request that large could never be granted)",
                );
            }
            if plan.daily_cap > 0 && u64::from(cap) > plan.daily_cap {
                return invalid(
                    "max_signatures_per_request must not exceed daily_cap (a request that large could never be granted)",
                );
            }
        }
    }
    Ok(())
}

/// Which limit refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reason {
    Rate,
    Concurrency,
    Daily,
}

impl Reason {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Reason::Rate => "rate",
            Reason::Concurrency => "concurrency",
            Reason::Daily => "daily",
        }
    }

    pub(crate) fn parse(s: &str) -> Option<Self> {
        match s {
            "rate" => Some(Reason::Rate),
            "concurrency" => Some(Reason::Concurrency),
            "daily" => Some(Reason::Daily),
            _ => None,
        }
    }
}

/// The plan of a request, once its name, payload size and number of signatures are
/// acceptable. Checked locally, before any store is asked: a refusal here charges nothing.
///
/// A request for more signatures than the plan's `burst` (or a non-zero `daily_cap`) could
/// never be granted however long it waited, so it is refused as not covered by the plan
/// (`entitlement_denied`, not retryable) rather than with a `retryAfterMs` that would lie.
pub(crate) fn admit<'a>(
    plans: &'a BTreeMap<String, Plan>,
    plan: &str,
    payload_bytes: usize,
    signatures: u32,
) -> Result<&'a Plan, SignerError> {
    let Some(limits) = plans.get(plan) else {
        return Err(SignerError::EntitlementDenied(format!(
            "plan '{plan}' is not configured"
        )));
    };
    if u64::try_from(payload_bytes).unwrap_or(u64::MAX) > limits.max_payload_bytes {
        return Err(SignerError::PayloadTooLarge(format!(
            "payload of {payload_bytes} bytes exceeds the {} bytes allowed by plan '{plan}'",
            limits.max_payload_bytes
        )));
    }
    let too_many = |limit: String| {
        Err(SignerError::EntitlementDenied(format!(
            "the profile makes {signatures} signatures; plan '{plan}' allows {limit}"
        )))
    };
    if let Some(cap) = limits.max_signatures_per_request
        && signatures > cap
    {
        return too_many(format!("{cap} per request"));
    }
    if signatures > limits.burst {
        return too_many(format!("a burst of {}", limits.burst));
    }
    if limits.daily_cap > 0 && u64::from(signatures) > limits.daily_cap {
        return too_many(format!("{} per UTC day", limits.daily_cap));
    }
    Ok(limits)
}

/// The `quota_exceeded` error of a refusal, counted in `signer_quota_exceeded_total`.
pub(crate) fn exceeded(
    tenant: &str,
    plan: &str,
    limits: &Plan,
    reason: Reason,
    retry_after_ms: u64,
) -> SignerError {
    metrics::counter!(
        "signer_quota_exceeded_total",
        "tenant" => tenant.to_owned(),
        "plan" => plan.to_owned(),
        "reason" => reason.as_str()
    )
    .increment(1);
    let message = match reason {
        Reason::Rate => format!(
            "plan '{plan}' allows {} signatures/s",
            limits.requests_per_second
        ),
        Reason::Concurrency => format!(
            "plan '{plan}' allows {} concurrent jobs per tenant",
            limits.max_concurrent
        ),
        Reason::Daily => format!(
            "plan '{plan}' allows {} signatures per UTC day",
            limits.daily_cap
        ),
    };
    SignerError::QuotaExceeded {
        message,
        retry_after_ms: retry_after_ms.max(1),
    }
}

/// Milliseconds since the Unix epoch by this host's clock.
pub(crate) fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Locks a mutex, carrying on with the data if a holder panicked (the state stays consistent:
/// every update under these locks is a plain field assignment).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Lets a repeated warning through at most once per interval.
#[derive(Debug)]
pub(crate) struct WarnLimiter {
    interval: Duration,
    state: Mutex<(Option<Instant>, u64)>,
}

impl WarnLimiter {
    pub(crate) fn new(interval: Duration) -> Self {
        WarnLimiter {
            interval,
            state: Mutex::new((None, 0)),
        }
    }

    /// `Some(occurrences since the last warning, this one included)` when a warning is due.
    pub(crate) fn due(&self) -> Option<u64> {
        let mut state = lock(&self.state);
        state.1 += 1;
        let now = Instant::now();
        match state.0 {
            Some(last) if now.duration_since(last) < self.interval => None,
            _ => {
                let n = state.1;
                *state = (Some(now), 0);
                Some(n)
            }
        }
    }
}
