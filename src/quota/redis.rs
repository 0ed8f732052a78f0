//! Quotas in Redis, shared by every replica: one atomic Lua script per acquire.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use ::redis::{self as redis_rs, Script};
use async_trait::async_trait;
use signer_actors::error::SignerError;
use signer_actors::ports::{QuotaGrant, QuotaStore};

use super::{
    CONCURRENCY_RETRY_MS, DAILY_MARGIN, QuotaSetupError, REDIS_TIMEOUT, Reason, SLOT_LEASE,
    WarnLimiter, admit, exceeded, lock, validate,
};
use crate::config::{Plan, QuotaGate};

/// KEYS: 1 bucket hash {tokens, ts}, 2 daily hash {day, n}, 3 slots sorted set (member -> lease
/// end). ARGV: 1 requests/s, 2 burst, 3 max concurrent, 4 daily cap (0 none), 5 slot lease ms,
/// 6 slot member, 7 concurrency retry ms, 8 daily margin ms, 9 units (signatures, at least 1).
/// Returns {1, 'ok', 0} or {0, reason, retry after ms}; a refusal writes nothing but the
/// removal of expired slots. The units come off the bucket and onto the daily count together,
/// all or nothing.
const ACQUIRE: &str = r"
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local max_conc = tonumber(ARGV[3])
local cap = tonumber(ARGV[4])
local lease = tonumber(ARGV[5])
local units = tonumber(ARGV[9])
local DAY = 86400000
-- Waits and TTLs are capped (about 31 years), so a tiny rate still gives valid numbers.
local MAX_MS = 1e12

local reason = nil
local wait = 0
local function refuse(r, ms)
  if reason == nil or ms > wait then
    reason = r
    wait = ms
  end
end

redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
if redis.call('ZCARD', KEYS[3]) >= max_conc then
  refuse('concurrency', tonumber(ARGV[7]))
end

local day = math.floor(now / DAY)
local used = 0
if cap > 0 then
  local d = redis.call('HMGET', KEYS[2], 'day', 'n')
  if tonumber(d[1]) == day then
    used = tonumber(d[2]) or 0
  end
  if used + units > cap then
    refuse('daily', (day + 1) * DAY - now)
  end
end

local b = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(b[1])
local ts = tonumber(b[2])
if tokens == nil or ts == nil then
  tokens = burst
  ts = now
end
local elapsed = now - ts
if elapsed < 0 then elapsed = 0 end
tokens = math.min(burst, tokens + elapsed * rate / 1000)
if tokens < units then
  refuse('rate', math.ceil((units - tokens) * 1000 / rate))
end

if reason ~= nil then
  return {0, reason, string.format('%.0f', math.min(MAX_MS, math.max(1, math.ceil(wait))))}
end

tokens = tokens - units
redis.call('HSET', KEYS[1], 'tokens', string.format('%.17g', tokens), 'ts', string.format('%.0f', now))
redis.call('PEXPIRE', KEYS[1], string.format('%.0f', math.min(MAX_MS, math.ceil((burst - tokens) * 1000 / rate) + 1000)))
if cap > 0 then
  redis.call('HSET', KEYS[2], 'day', string.format('%.0f', day), 'n', string.format('%.0f', used + units))
  redis.call('PEXPIREAT', KEYS[2], string.format('%.0f', (day + 1) * DAY + tonumber(ARGV[8])))
end
redis.call('ZADD', KEYS[3], string.format('%.0f', now + lease), ARGV[6])
redis.call('PEXPIRE', KEYS[3], string.format('%.0f', lease))
return {1, 'ok', '0'}
";

/// What the script decided.
enum Outcome {
    Allowed,
    Refused(Reason, u64),
}

/// Plan quotas in Redis, shared by all replicas (see the [module docs](super)).
pub struct RedisQuota {
    pool: crate::redis::Redis,
    gate: QuotaGate,
    acquire: Script,
    slot_lease: Duration,
    timeout: Duration,
    /// Random id of this instance; slot members are `<replica>:<n>`.
    replica: String,
    next_slot: AtomicU64,
    /// The slots this instance holds, by tenant, for `release`.
    held: Mutex<HashMap<String, Vec<String>>>,
    warn: WarnLimiter,
}

impl RedisQuota {
    /// A quota gate over `pool` with the plans, prefix and failure policy of `gate`
    /// (its `mode` is not looked at: see [`super::from_config`]).
    pub fn new(pool: crate::redis::Redis, gate: QuotaGate) -> Result<Self, QuotaSetupError> {
        validate(&gate.plans)?;
        Ok(RedisQuota {
            pool,
            gate,
            acquire: Script::new(ACQUIRE),
            slot_lease: SLOT_LEASE,
            timeout: REDIS_TIMEOUT,
            replica: replica_id(),
            next_slot: AtomicU64::new(0),
            held: Mutex::new(HashMap::new()),
            warn: WarnLimiter::new(Duration::from_secs(10)),
        })
    }

    /// Changes how long a concurrency slot stays taken when it is never released
    /// (default [`SLOT_LEASE`]). Clamped to at least 1 ms.
    pub fn with_slot_lease(mut self, lease: Duration) -> Self {
        self.slot_lease = lease.max(Duration::from_millis(1));
        self
    }

    /// Changes how long an operation may wait for Redis (default [`REDIS_TIMEOUT`]).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    fn key(&self, tenant: &str, what: &str) -> String {
        format!("{}{{{tenant}}}:{what}", self.gate.redis_prefix)
    }

    async fn run(
        &self,
        tenant: &str,
        plan: &Plan,
        member: &str,
        units: u32,
    ) -> Result<Outcome, String> {
        let mut conn = self.pool.clone();
        let (granted, reason, wait): (i64, String, u64) = self
            .acquire
            .key(self.key(tenant, "bucket"))
            .key(self.key(tenant, "daily"))
            .key(self.key(tenant, "slots"))
            .arg(plan.requests_per_second.to_string())
            .arg(plan.burst)
            .arg(plan.max_concurrent)
            .arg(plan.daily_cap)
            .arg(millis(self.slot_lease))
            .arg(member)
            .arg(CONCURRENCY_RETRY_MS)
            .arg(millis(DAILY_MARGIN))
            .arg(units)
            .invoke_async(&mut conn)
            .await
            .map_err(|e| e.to_string())?;
        if granted == 1 {
            return Ok(Outcome::Allowed);
        }
        Reason::parse(&reason)
            .map(|r| Outcome::Refused(r, wait))
            .ok_or_else(|| format!("unexpected reply from the quota script: {reason:?}"))
    }

    /// Redis could not answer: fail open or closed as configured.
    fn unavailable(
        &self,
        tenant: &str,
        plan: &str,
        detail: &str,
    ) -> Result<QuotaGrant, SignerError> {
        if self.gate.fail_open {
            metrics::counter!("signer_quota_fail_open_total").increment(1);
            if let Some(occurrences) = self.warn.due() {
                tracing::warn!(
                    tenant,
                    plan,
                    error = detail,
                    occurrences,
                    "quota store unavailable: letting jobs through unchecked (gates.quota.fail_open = true)"
                );
            }
            Ok(QuotaGrant::FailOpen)
        } else {
            if let Some(occurrences) = self.warn.due() {
                tracing::warn!(
                    tenant,
                    plan,
                    error = detail,
                    occurrences,
                    "quota store unavailable: refusing jobs with a retryable error"
                );
            }
            Err(SignerError::Internal(format!(
                "quota store unavailable: {detail}"
            )))
        }
    }
}

#[async_trait]
impl QuotaStore for RedisQuota {
    async fn acquire(
        &self,
        tenant: &str,
        plan: &str,
        payload_bytes: usize,
        signatures: u32,
    ) -> Result<QuotaGrant, SignerError> {
        let signatures = signatures.max(1);
        let limits = admit(&self.gate.plans, plan, payload_bytes, signatures)?;
        let member = format!(
            "{}:{}",
            self.replica,
            self.next_slot.fetch_add(1, Ordering::Relaxed)
        );
        match tokio::time::timeout(self.timeout, self.run(tenant, limits, &member, signatures))
            .await
        {
            Ok(Ok(Outcome::Allowed)) => {
                lock(&self.held)
                    .entry(tenant.to_owned())
                    .or_default()
                    .push(member);
                Ok(QuotaGrant::Allowed)
            }
            Ok(Ok(Outcome::Refused(reason, wait))) => {
                Err(exceeded(tenant, plan, limits, reason, wait))
            }
            Ok(Err(e)) => self.unavailable(tenant, plan, &e),
            Err(_) => self.unavailable(
                tenant,
                plan,
                &format!(
                    "no answer within {}",
                    humantime::format_duration(self.timeout)
                ),
            ),
        }
    }

    fn max_payload_bytes(&self, plan: &str) -> Option<u64> {
        self.gate.plans.get(plan).map(|p| p.max_payload_bytes)
    }

    async fn release(&self, tenant: &str, _plan: &str) {
        let member = {
            let mut held = lock(&self.held);
            let member = held.get_mut(tenant).and_then(Vec::pop);
            if held.get(tenant).is_some_and(Vec::is_empty) {
                held.remove(tenant);
            }
            member
        };
        // Nothing taken here (fail-open grant, or released already): nothing to give back.
        let Some(member) = member else { return };
        let key = self.key(tenant, "slots");
        let removed = tokio::time::timeout(self.timeout, async {
            let mut conn = self.pool.clone();
            redis_rs::cmd("ZREM")
                .arg(&key)
                .arg(&member)
                .query_async::<i64>(&mut conn)
                .await
                .map_err(|e| e.to_string())
        })
        .await;
        let error = match removed {
            Ok(Ok(_)) => return,
            Ok(Err(e)) => e,
            Err(_) => "no answer in time".to_owned(),
        };
        if let Some(occurrences) = self.warn.due() {
            tracing::warn!(
                tenant,
                error,
                occurrences,
                lease = %humantime::format_duration(self.slot_lease),
                "releasing a quota concurrency slot failed; it frees itself when its lease ends"
            );
        }
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// 64 random bits as hex, so that two replicas never name a slot alike.
fn replica_id() -> String {
    use ring::rand::{SecureRandom, SystemRandom};
    let mut bytes = [0u8; 8];
    if SystemRandom::new().fill(&mut bytes).is_err() {
        // No system randomness: the process id and the clock are unique enough for slot names.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        bytes[..4].copy_from_slice(&std::process::id().to_be_bytes());
        bytes[4..].copy_from_slice(&nanos.to_be_bytes());
    }
    hex::encode(bytes)
}
