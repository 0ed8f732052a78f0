//! Step 3, claim: the idempotency lease of this job attempt on `tenant/requestId`, what
//! keeps it (renewal while the job works, given back when a job is cut off before it
//! signed), and the answers to a request seen before.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use super::{Job, Settle, Stop, stage};
use crate::error::SignerError;
use crate::pipeline::{PipelineConfig, Shared};
use crate::ports::{Claim, Delivery, OutMessage};

/// Claims the request for this attempt. `Ok` with the [`Hold`] that renews the lease while
/// the job works; else how the job stops: a request answered before is republished, a
/// request signed before has its recorded outcome published, a request another attempt
/// holds is NAKed for later (waited for, on the last delivery), and an idempotency store that fails refuses the job
/// (`internal`, retried), with the lease noted so a NAK releases whatever it took.
pub(in crate::pipeline) async fn claim<'a>(job: &mut Job<'a>) -> Result<Hold<'a>, Stop> {
    let (shared, d) = (job.shared, job.delivery);
    let key = format!("{}/{}", job.ids.tenant, job.ids.request_id);
    let owner = attempt_owner(&shared.cfg.worker_id);
    let t_claim = Instant::now();
    let claimed = take_lease(shared, d, &key, &owner).await;
    let acquired = match claimed {
        Ok(Claim::Acquired) => Ok(()),
        Ok(Claim::Done { result_sequence }) => return Err(Stop::Duplicate { result_sequence }),
        Ok(Claim::Signed { outcome }) => return Err(Stop::SignedBefore(outcome)),
        Ok(Claim::Busy { retry_after }) => {
            let delay = busy_delay(&shared.cfg, d.delivered(), retry_after);
            return Err(Stop::Settle(Settle::Nak(delay)));
        }
        Err(e) => Err(SignerError::Internal(format!(
            "idempotency store unavailable: {e}"
        ))),
    };
    stage("claim", t_claim);
    // Held until this attempt settles: if the job is cut off (`job_timeout`, the drain
    // deadline) before it signed, the lease is given back so the redelivery need not wait
    // for it to expire.
    job.lease = Some(LeaseGuard {
        shared: shared.clone(),
        key,
        owner,
        armed: acquired.is_ok(),
    });
    acquired.map_err(Stop::Refused)?;
    Ok(job.hold())
}

/// Asks the idempotency store for the lease. On the last delivery a lease held by another
/// attempt is waited for here (telling JetStream the job is in progress), not NAKed:
/// nothing would deliver the message again. `job_timeout` bounds the wait.
async fn take_lease(
    shared: &Shared,
    d: &dyn Delivery,
    key: &str,
    owner: &str,
) -> Result<Claim, crate::ports::PortError> {
    loop {
        let claim = shared
            .ports
            .idempotency
            .claim(key, owner, shared.cfg.lease)
            .await;
        match claim {
            Ok(Claim::Busy { retry_after }) if d.delivered() >= shared.cfg.max_deliver => {
                tracing::info!(
                    wait_ms = retry_after.as_millis() as u64,
                    "last delivery: another attempt holds the request; waiting for its lease"
                );
                let extended = tokio::time::timeout(shared.cfg.call_timeout, d.in_progress()).await;
                if !matches!(extended, Ok(Ok(()))) {
                    tracing::warn!("could not extend the delivery");
                }
                let wait = retry_after
                    .min(shared.cfg.lease / 3)
                    .max(Duration::from_millis(10));
                tokio::time::sleep(wait).await;
            }
            other => return other,
        }
    }
}

/// Gives an attempt's lease back when its job is dropped before it settled (cut off at
/// `job_timeout` or at the drain deadline) and had not signed. A job that signed keeps its
/// lease: its redelivery must find the recorded outcome, not sign again.
pub(in crate::pipeline) struct LeaseGuard {
    shared: Arc<Shared>,
    pub key: String,
    pub owner: String,
    pub armed: bool,
}

impl Drop for LeaseGuard {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (shared, key, owner) = (
            self.shared.clone(),
            std::mem::take(&mut self.key),
            std::mem::take(&mut self.owner),
        );
        runtime.spawn(async move {
            if let Err(e) = shared.ports.idempotency.release(&key, &owner).await {
                tracing::warn!(error = %e, "releasing the lease of a cut-off job failed; it expires by itself");
            }
        });
    }
}

impl std::fmt::Debug for LeaseGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaseGuard")
            .field("key", &self.key)
            .field("owner", &self.owner)
            .field("armed", &self.armed)
            .finish()
    }
}

/// The lease owner of one job attempt: the worker id and a random nonce. Two copies of a
/// request on one replica are two attempts, so the second cannot re-take the first's lease.
fn attempt_owner(worker_id: &str) -> String {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let mut nonce = [0u8; 8];
    if ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut nonce).is_err() {
        // No system randomness: a process-wide counter and the clock still tell attempts apart.
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let t = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or_default();
        nonce = (t ^ n.rotate_left(48)).to_be_bytes();
    }
    let hex: String = nonce.iter().map(|b| format!("{b:02x}")).collect();
    format!("{worker_id}.{hex}")
}

/// Keeps an attempt's lease and its delivery alive while work runs (see [`Hold::run`]).
pub(in crate::pipeline) struct Hold<'a> {
    pub shared: &'a Shared,
    pub delivery: &'a dyn Delivery,
    /// Key and owner of the lease; `None` before the claim (only the delivery is kept).
    pub lease: Option<(String, String)>,
}

impl Hold<'_> {
    /// Runs `work` while, every third of the lease (or of the consumer's AckWait, if
    /// shorter), the lease is renewed (a claim by the same owner) and JetStream told the job
    /// is in progress. A job slowed down by a
    /// failover (an audit or result stream electing a leader) therefore keeps its request:
    /// neither a redelivery nor another replica can take the request over and sign it again
    /// while this attempt still works on it. Renewal stops once the record is no longer this
    /// attempt's lease (the outcome is recorded, or the lease was lost).
    pub async fn run<T>(&self, work: impl std::future::Future<Output = T>) -> T {
        let shared = self.shared;
        let period =
            (shared.cfg.lease.min(shared.cfg.ack_wait) / 3).max(Duration::from_millis(100));
        let keep_alive = async {
            let mut renewing = self.lease.is_some();
            loop {
                tokio::time::sleep(period).await;
                if let Err(e) = self.delivery.in_progress().await {
                    tracing::warn!(error = %e, "could not extend the delivery");
                }
                let Some((key, owner)) = self.lease.as_ref().filter(|_| renewing) else {
                    continue;
                };
                match shared
                    .ports
                    .idempotency
                    .claim(key, owner, shared.cfg.lease)
                    .await
                {
                    Ok(Claim::Acquired) => {}
                    Ok(_) => renewing = false,
                    Err(e) => tracing::warn!(error = %e, "renewing the idempotency lease failed"),
                }
            }
        };
        tokio::select! {
            out = work => out,
            never = keep_alive => never,
        }
    }
}

/// How long a copy of a request waits while another attempt holds its lease: the backoff of
/// its delivery, and no longer than the lease has left (a twin usually finishes in
/// milliseconds; a lease of a dead replica is taken over when it expires).
pub(in crate::pipeline) fn busy_delay(
    cfg: &PipelineConfig,
    delivered: u64,
    retry_after: Duration,
) -> Duration {
    super::refusal::exponential_backoff(cfg, delivered)
        .min(retry_after)
        .max(Duration::from_millis(1))
}

/// A request that was already answered: publish its original result again (a no-op within
/// the results stream's duplicate window) and acknowledge, without signing anything.
pub(in crate::pipeline) async fn answer_duplicate(job: &Job<'_>, result_sequence: u64) -> Settle {
    let shared = job.shared;
    metrics::counter!("signer_jobs_total", "outcome" => "duplicate", "code" => "").increment(1);
    let republished = async {
        let fetched = tokio::time::timeout(
            shared.cfg.call_timeout,
            shared.ports.publisher.fetch_result(result_sequence),
        )
        .await
        .map_err(|_| {
            super::store::StoreError::Unavailable(
                "fetching the original result did not finish in time".into(),
            )
        })?
        .map_err(super::store::StoreError::of_port)?;
        match fetched {
            Some(message) => super::store::send_result(shared, message).await.map(Some),
            None => Ok(None),
        }
    };
    match republished.await {
        Ok(Some(_)) => Settle::Ack,
        Ok(None) => {
            tracing::warn!(request_id = %job.ids.request_id, result_sequence, "duplicate request; its original result has left the results stream");
            Settle::Ack
        }
        Err(e) => {
            tracing::warn!(error = %e, "republishing the original result failed; retrying");
            Settle::Nak(shared.cfg.backoff_base)
        }
    }
}

/// A request that was signed before but whose result may not be stored (the publish failed,
/// or the replica died in between): publish the recorded result message. Nothing is signed
/// or charged; the result carries the audit reference of the original `signed` event.
pub(in crate::pipeline) async fn republish_outcome(job: &Job<'_>, outcome: OutMessage) -> Settle {
    metrics::counter!("signer_outcome_republished_total").increment(1);
    tracing::info!("signed before; publishing the recorded result");
    let key = format!("{}/{}", job.ids.tenant, job.ids.request_id);
    let published = super::store::publish_message(
        job,
        Some(&key),
        outcome,
        "completed",
        None,
        super::store::OnTransient::Redeliver,
    );
    match published.await {
        Ok(settle) => settle,
        Err(e) => {
            // It was stored once (it is the recorded result of this request), so the store
            // now refusing it for good is a change on the broker's side: anything we could
            // answer with instead would be a second result. End the message.
            tracing::error!(error = %e, "the recorded result cannot be stored any more; the message is terminated");
            metrics::counter!("signer_jobs_abandoned_total", "reason" => "refused_by_store")
                .increment(1);
            Settle::Term
        }
    }
}
