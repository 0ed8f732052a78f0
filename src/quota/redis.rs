//! Quotas in Redis, shared by every replica: one atomic Lua script per acquire, a batch of
//! acquires in one round trip (a pipeline of `EVALSHA`s).

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use ::redis::{self as redis_rs, Script, ServerErrorKind, Value};
use async_trait::async_trait;
use signer_actors::error::SignerError;
use signer_actors::ports::{QuotaGrant, QuotaRelease, QuotaRequest, QuotaStore};

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

/// Why Redis gave no decision for a request.
#[derive(Debug, thiserror::Error)]
enum StoreFailure {
    /// The connection or the command failed (also: the server answered the command with an
    /// error, e.g. a script error).
    #[error("{0}")]
    Redis(#[from] redis_rs::RedisError),
    /// The pipeline's reply did not have one entry per command.
    #[error("the quota pipeline answered {got} of {sent} commands")]
    ShortReply { sent: usize, got: usize },
    /// The script's reply is not `{granted, reason, wait}`.
    #[error("unexpected reply from the quota script: {0}")]
    Reply(String),
}

/// One request of a batch that passed the local checks and goes to Redis.
struct Sent<'a> {
    /// Its place in the batch.
    index: usize,
    tenant: &'a str,
    plan: &'a str,
    limits: &'a Plan,
    member: String,
    units: u32,
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
    batch_max: usize,
}

impl RedisQuota {
    /// A quota gate over `pool` with the plans, prefix and failure policy of `gate`
    /// (its `mode` is not looked at: see [`super::from_config`]).
    pub fn new(pool: crate::redis::Redis, gate: QuotaGate) -> Result<Self, QuotaSetupError> {
        validate(&gate.plans)?;
        if gate.batch_max == 0 {
            return Err(QuotaSetupError::BatchMax);
        }
        Ok(RedisQuota {
            pool,
            acquire: Script::new(ACQUIRE),
            slot_lease: SLOT_LEASE,
            timeout: REDIS_TIMEOUT,
            replica: replica_id(),
            next_slot: AtomicU64::new(0),
            held: Mutex::new(HashMap::new()),
            warn: WarnLimiter::new(Duration::from_secs(10)),
            batch_max: gate.batch_max.max(1),
            gate,
        })
    }

    /// Changes how long a concurrency slot stays taken when it is never released
    /// (default [`SLOT_LEASE`]). Clamped to at least 1 ms.
    #[cfg(all(test, feature = "integration"))]
    pub(crate) fn with_slot_lease(mut self, lease: Duration) -> Self {
        self.slot_lease = lease.max(Duration::from_millis(1));
        self
    }

    /// Changes how long an operation may wait for Redis (default [`REDIS_TIMEOUT`]).
    #[cfg(test)]
    pub(crate) fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The same script under another hash, one Redis has never loaded: its first call is
    /// answered `NOSCRIPT`, as after a `SCRIPT FLUSH` or a Redis restart.
    #[cfg(all(test, feature = "integration"))]
    pub(crate) fn with_unloaded_script(mut self, salt: &str) -> Self {
        self.acquire = Script::new(&format!("{ACQUIRE}\n-- {salt}"));
        self
    }

    fn key(&self, tenant: &str, what: &str) -> String {
        format!("{}{{{tenant}}}:{what}", self.gate.redis_prefix)
    }

    /// Runs the script for each of `sent`, in order, in one pipeline (one round trip). A
    /// command refused with `NOSCRIPT` (the script cache was flushed; nothing ran) is sent
    /// again after loading the script, so every request runs exactly once.
    async fn run_many(
        &self,
        sent: &[Sent<'_>],
    ) -> Result<Vec<Result<Outcome, StoreFailure>>, StoreFailure> {
        let mut conn = self.pool.clone();
        let replies = self.pipeline(&mut conn, sent.iter()).await?;
        let mut outcomes = Vec::with_capacity(sent.len());
        let mut again = Vec::new();
        for (i, reply) in replies.into_iter().enumerate() {
            match reply {
                Value::ServerError(e) if e.kind() == Some(ServerErrorKind::NoScript) => {
                    again.push(i);
                    outcomes.push(Err(StoreFailure::Redis(e.into())));
                }
                reply => outcomes.push(outcome(reply)),
            }
        }
        if !again.is_empty() {
            self.acquire.load_async(&mut conn).await?;
            let replies = self
                .pipeline(&mut conn, again.iter().map(|&i| &sent[i]))
                .await?;
            for (&i, reply) in again.iter().zip(replies) {
                outcomes[i] = outcome(reply);
            }
        }
        Ok(outcomes)
    }

    /// Sends one `EVALSHA` per request of `sent` in one pipeline; one reply per command
    /// (errors included, as `Value::ServerError`).
    async fn pipeline<'s, 'a: 's>(
        &self,
        conn: &mut crate::redis::Redis,
        sent: impl ExactSizeIterator<Item = &'s Sent<'a>>,
    ) -> Result<Vec<Value>, StoreFailure> {
        let count = sent.len();
        let mut pipe = redis_rs::pipe();
        pipe.ignore_errors();
        for s in sent {
            pipe.invoke_script(
                self.acquire
                    .key(self.key(s.tenant, "bucket"))
                    .key(self.key(s.tenant, "daily"))
                    .key(self.key(s.tenant, "slots"))
                    .arg(s.limits.requests_per_second.to_string())
                    .arg(s.limits.burst)
                    .arg(s.limits.max_concurrent)
                    .arg(s.limits.daily_cap)
                    .arg(millis(self.slot_lease))
                    .arg(&s.member)
                    .arg(CONCURRENCY_RETRY_MS)
                    .arg(millis(DAILY_MARGIN))
                    .arg(s.units),
            );
        }
        let replies: Vec<Value> = pipe.query_async(conn).await?;
        if replies.len() != count {
            return Err(StoreFailure::ShortReply {
                sent: count,
                got: replies.len(),
            });
        }
        Ok(replies)
    }

    /// A fresh slot member: `<replica>:<n>`.
    fn member(&self) -> String {
        format!(
            "{}:{}",
            self.replica,
            self.next_slot.fetch_add(1, Ordering::Relaxed)
        )
    }

    /// Redis could not answer: fail open or closed as configured.
    fn unavailable(
        &self,
        tenant: &str,
        plan: &str,
        detail: &dyn std::fmt::Display,
    ) -> Result<QuotaGrant, SignerError> {
        if self.gate.fail_open {
            metrics::counter!("signer_quota_fail_open_total").increment(1);
            if let Some(occurrences) = self.warn.due() {
                tracing::warn!(
                    tenant,
                    plan,
                    error = %detail,
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
                    error = %detail,
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
        let request = QuotaRequest {
            tenant: tenant.to_owned(),
            plan: plan.to_owned(),
            payload_bytes,
            signatures,
        };
        self.acquire_many(std::slice::from_ref(&request))
            .await
            .pop()
            .unwrap_or_else(|| Err(SignerError::Internal("quota store gave no answer".into())))
    }

    /// The local checks for each request, then one pipeline for those that pass, in batch
    /// order: Redis runs each script atomically and in the order sent, so the answers are
    /// those of the same requests made one after another. A failure of the round trip fails
    /// every request it carried (open or closed, as configured); a failure of one command
    /// fails that request only.
    async fn acquire_many(
        &self,
        requests: &[QuotaRequest],
    ) -> Vec<Result<QuotaGrant, SignerError>> {
        let mut answers: Vec<Option<Result<QuotaGrant, SignerError>>> =
            Vec::with_capacity(requests.len());
        let mut sent = Vec::new();
        for (index, r) in requests.iter().enumerate() {
            let units = r.signatures.max(1);
            match admit(&self.gate.plans, &r.plan, r.payload_bytes, units) {
                Ok(limits) => {
                    answers.push(None);
                    sent.push(Sent {
                        index,
                        tenant: &r.tenant,
                        plan: &r.plan,
                        limits,
                        member: self.member(),
                        units,
                    });
                }
                Err(e) => answers.push(Some(Err(e))),
            }
        }
        if !sent.is_empty() {
            match tokio::time::timeout(self.timeout, self.run_many(&sent)).await {
                Ok(Ok(outcomes)) => {
                    for (s, outcome) in sent.into_iter().zip(outcomes) {
                        let index = s.index;
                        answers[index] = Some(self.decided(s, outcome));
                    }
                }
                Ok(Err(e)) => {
                    for s in &sent {
                        answers[s.index] = Some(self.unavailable(s.tenant, s.plan, &e));
                    }
                }
                Err(_) => {
                    let e = format!(
                        "no answer within {}",
                        humantime::format_duration(self.timeout)
                    );
                    for s in &sent {
                        answers[s.index] = Some(self.unavailable(s.tenant, s.plan, &e));
                    }
                }
            }
        }
        answers
            .into_iter()
            .map(|a| {
                a.unwrap_or_else(|| Err(SignerError::Internal("quota request not decided".into())))
            })
            .collect()
    }

    async fn release_many(&self, releases: &[QuotaRelease]) {
        let mut members = Vec::with_capacity(releases.len());
        {
            let mut held = lock(&self.held);
            for r in releases {
                let member = held.get_mut(&r.tenant).and_then(Vec::pop);
                if held.get(&r.tenant).is_some_and(Vec::is_empty) {
                    held.remove(&r.tenant);
                }
                // Nothing taken here (fail-open grant, or released already): nothing to give
                // back.
                if let Some(member) = member {
                    members.push((self.key(&r.tenant, "slots"), member));
                }
            }
        }
        if members.is_empty() {
            return;
        }
        let removed = tokio::time::timeout(self.timeout, async {
            let mut conn = self.pool.clone();
            let mut pipe = redis_rs::pipe();
            for (key, member) in &members {
                pipe.cmd("ZREM").arg(key).arg(member).ignore();
            }
            pipe.query_async::<()>(&mut conn).await
        })
        .await;
        let error = match removed {
            Ok(Ok(())) => return,
            Ok(Err(e)) => e.to_string(),
            Err(_) => "no answer in time".to_owned(),
        };
        if let Some(occurrences) = self.warn.due() {
            tracing::warn!(
                slots = members.len(),
                error,
                occurrences,
                lease = %humantime::format_duration(self.slot_lease),
                "releasing quota concurrency slots failed; they free themselves when their lease ends"
            );
        }
    }

    fn batch_max(&self) -> usize {
        self.batch_max
    }

    fn max_payload_bytes(&self, plan: &str) -> Option<u64> {
        self.gate.plans.get(plan).map(|p| p.max_payload_bytes)
    }

    async fn release(&self, tenant: &str, plan: &str) {
        self.release_many(&[QuotaRelease {
            tenant: tenant.to_owned(),
            plan: plan.to_owned(),
        }])
        .await;
    }
}

impl RedisQuota {
    /// The answer of one request Redis decided (or failed to).
    fn decided(
        &self,
        s: Sent<'_>,
        outcome: Result<Outcome, StoreFailure>,
    ) -> Result<QuotaGrant, SignerError> {
        match outcome {
            Ok(Outcome::Allowed) => {
                lock(&self.held)
                    .entry(s.tenant.to_owned())
                    .or_default()
                    .push(s.member);
                Ok(QuotaGrant::Allowed)
            }
            Ok(Outcome::Refused(reason, wait)) => {
                Err(exceeded(s.tenant, s.plan, s.limits, reason, wait))
            }
            Err(e) => self.unavailable(s.tenant, s.plan, &e),
        }
    }
}

/// The script's reply `{granted, reason, wait}` (or the error Redis answered instead).
fn outcome(reply: Value) -> Result<Outcome, StoreFailure> {
    if let Value::ServerError(e) = reply {
        return Err(StoreFailure::Redis(e.into()));
    }
    let (granted, reason, wait): (i64, String, u64) =
        redis_rs::from_redis_value(reply).map_err(|e| StoreFailure::Reply(e.to_string()))?;
    if granted == 1 {
        return Ok(Outcome::Allowed);
    }
    Reason::parse(&reason)
        .map(|r| Outcome::Refused(r, wait))
        .ok_or_else(|| StoreFailure::Reply(format!("{reason:?}")))
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
