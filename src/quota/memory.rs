//! Quotas inside one process.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::Instant;

use async_trait::async_trait;
use signer_actors::error::SignerError;
use signer_actors::ports::{QuotaGrant, QuotaStore};

use super::{
    CONCURRENCY_RETRY_MS, DAY_MS, QuotaSetupError, Reason, admit, exceeded, lock, unix_ms, validate,
};
use crate::config::Plan;

/// One tenant's state.
#[derive(Debug)]
struct Tenant {
    tokens: f64,
    refilled: Instant,
    /// UTC day (days since the epoch) that `used` counts.
    day: u64,
    used: u64,
    held: u32,
}

/// Plan quotas kept in this process: the same rules as [`super::RedisQuota`], but **per
/// replica**. Each replica has its own buckets, daily counters and slots, so N replicas
/// together grant up to N times a plan's limits, and a restart forgets them. Used when no
/// Redis is configured.
#[derive(Debug)]
pub struct MemoryQuota {
    plans: BTreeMap<String, Plan>,
    tenants: Mutex<HashMap<String, Tenant>>,
    batch_max: usize,
}

impl MemoryQuota {
    pub fn new(plans: BTreeMap<String, Plan>) -> Result<Self, QuotaSetupError> {
        validate(&plans)?;
        Ok(MemoryQuota {
            plans,
            tenants: Mutex::new(HashMap::new()),
            batch_max: signer_actors::ports::QUOTA_BATCH_MAX,
        })
    }

    /// Changes how many requests the Quota actor batches (default
    /// [`QUOTA_BATCH_MAX`](signer_actors::ports::QUOTA_BATCH_MAX)); at least 1. In memory a
    /// batch only saves the actor's task spawns: each request is decided as before.
    pub fn with_batch_max(mut self, batch_max: usize) -> Self {
        self.batch_max = batch_max.max(1);
        self
    }
}

#[async_trait]
impl QuotaStore for MemoryQuota {
    async fn acquire(
        &self,
        tenant: &str,
        plan: &str,
        payload_bytes: usize,
        signatures: u32,
    ) -> Result<QuotaGrant, SignerError> {
        let signatures = signatures.max(1);
        let limits = admit(&self.plans, plan, payload_bytes, signatures)?;
        let units = f64::from(signatures);
        let now = Instant::now();
        let now_ms = unix_ms();
        let today = now_ms / DAY_MS;
        let burst = f64::from(limits.burst);

        let mut tenants = lock(&self.tenants);
        let state = tenants.entry(tenant.to_owned()).or_insert_with(|| Tenant {
            tokens: burst,
            refilled: now,
            day: today,
            used: 0,
            held: 0,
        });
        let elapsed = now.saturating_duration_since(state.refilled).as_secs_f64();
        let tokens = (state.tokens + elapsed * limits.requests_per_second).min(burst);
        let used = if state.day == today { state.used } else { 0 };

        // Every limit is checked before anything is taken; the longest wait is reported.
        let mut refusal: Option<(Reason, u64)> = None;
        let mut refuse = |reason, ms: u64| {
            if refusal.is_none_or(|(_, w)| ms > w) {
                refusal = Some((reason, ms));
            }
        };
        if state.held >= limits.max_concurrent {
            refuse(Reason::Concurrency, CONCURRENCY_RETRY_MS);
        }
        if limits.daily_cap > 0 && used + u64::from(signatures) > limits.daily_cap {
            refuse(Reason::Daily, (today + 1) * DAY_MS - now_ms);
        }
        if tokens < units {
            // The plan's rate is finite and positive; the cap (about 31 years) matches Redis.
            let ms = ((units - tokens) * 1000.0 / limits.requests_per_second)
                .ceil()
                .min(1e12) as u64;
            refuse(Reason::Rate, ms);
        }
        if let Some((reason, wait)) = refusal {
            drop(tenants);
            return Err(exceeded(tenant, plan, limits, reason, wait));
        }

        // All units at once, under the lock: a job is never half charged.
        state.tokens = tokens - units;
        state.refilled = now;
        state.day = today;
        state.used = used + u64::from(signatures);
        state.held += 1;
        Ok(QuotaGrant::Allowed)
    }

    async fn release(&self, tenant: &str, _plan: &str) {
        if let Some(state) = lock(&self.tenants).get_mut(tenant) {
            state.held = state.held.saturating_sub(1);
        }
    }

    fn max_payload_bytes(&self, plan: &str) -> Option<u64> {
        self.plans.get(plan).map(|p| p.max_payload_bytes)
    }

    fn batch_max(&self) -> usize {
        self.batch_max
    }
}
