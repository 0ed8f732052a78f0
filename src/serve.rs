//! `stella-signer serve`: connects, provisions, starts the supervision tree and the
//! operations endpoint, and drains on SIGTERM/SIGINT.

use std::sync::Arc;
use std::time::Duration;

use signer_actors::pipeline::{Pipeline, PipelineConfig, Ports};
use signer_actors::ports::{EntitlementVerifier, QuotaStore, ReleaseVerifier};

use crate::config::{Config, GateMode};
use crate::jetstream::{self, provision, publisher::JsPublisher, source::PullSourceFactory};
use crate::keys::factory::ConfiguredKeys;
use crate::readiness::{self, NotReady, Probes, Readiness};

/// Why the service stopped or did not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Nats(#[from] jetstream::NatsError),
    #[error(transparent)]
    Idempotency(#[from] crate::idempotency::OpenError),
    #[error(transparent)]
    Replay(#[from] crate::replay::OpenError),
    #[error(transparent)]
    Redis(#[from] crate::redis::ConnectError),
    #[error("{0}")]
    Setup(String),
}

/// `<hostname>-<pid>-<random>`: unique per process, readable in logs.
pub fn default_worker_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "signer".into());
    let mut rnd = [0u8; 3];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut rnd);
    format!("{host}-{}-{}", std::process::id(), hex::encode(rnd))
}

/// Health of the process: live from the start, ready once NATS is connected, the streams
/// are provisioned, and the pipeline and the probes report it can pull and store.
struct Health {
    running: std::sync::OnceLock<Readiness>,
    metrics: metrics_exporter_prometheus::PrometheusHandle,
}

impl crate::http::Health for Health {
    fn ready(&self) -> Result<(), NotReady> {
        match self.running.get() {
            Some(readiness) => readiness.ready(),
            None => Err(NotReady(vec![readiness::Reason::Starting])),
        }
    }

    fn metrics(&self) -> String {
        // `signer_ready`: what /readyz says, for the "no ready replica" alert.
        metrics::gauge!("signer_ready").set(f64::from(u8::from(self.ready().is_ok())));
        self.metrics.render()
    }
}

/// The three gate ports.
struct GatePorts {
    entitlement: Arc<dyn EntitlementVerifier>,
    quota: Arc<dyn QuotaStore>,
    provenance: Arc<dyn ReleaseVerifier>,
}

/// Builds the three gates. A disabled gate is loud at startup; an enforcing gate whose
/// configuration is incomplete stops the service here, before it waits for NATS or takes a
/// job. `replay` is filled with the replay store once NATS is provisioned.
async fn gates(
    cfg: &Config,
    redis: Option<crate::redis::Redis>,
    replay: Arc<crate::replay::DeferredReplayCache>,
) -> Result<GatePorts, ServeError> {
    use signer_actors::pipeline::disabled::{
        DisabledEntitlement, DisabledProvenance, DisabledQuota,
    };
    let warn = |gate: &str| {
        tracing::warn!(
            gate,
            "GATE DISABLED: every job passes this gate unchecked; results and audit events record \"disabled\""
        );
    };
    let entitlement: Arc<dyn EntitlementVerifier> = match cfg.gates.entitlement.mode {
        GateMode::Disabled => {
            warn("entitlement");
            Arc::new(DisabledEntitlement)
        }
        GateMode::Enforce => Arc::new(
            crate::entitlement::EntitlementGateImpl::from_config(
                &cfg.gates.entitlement,
                Some(replay),
            )
            .await
            .map_err(|e| ServeError::Setup(format!("gate entitlement: {e}")))?,
        ),
    };
    // A plan the quota gate does not know would refuse every job: catch it at startup.
    if cfg.gates.quota.mode == GateMode::Enforce {
        let plans = &cfg.gates.quota.plans;
        let needed = [
            (cfg.gates.entitlement.mode == GateMode::Disabled)
                .then_some(signer_actors::pipeline::disabled::DISABLED_PLAN),
            cfg.gates
                .entitlement
                .poe
                .bypass
                .then_some(cfg.gates.entitlement.poe.bypass_plan.as_str()),
        ];
        if let Some(plan) = needed
            .into_iter()
            .flatten()
            .find(|p| !plans.contains_key(*p))
        {
            return Err(ServeError::Setup(format!(
                "gate quota: jobs will carry plan {plan:?} (entitlement disabled or PoE bypass) but [gates.quota.plans.{plan}] is not configured"
            )));
        }
    }
    let quota: Arc<dyn QuotaStore> = match cfg.gates.quota.mode {
        GateMode::Disabled => {
            warn("quota");
            Arc::new(DisabledQuota)
        }
        GateMode::Enforce => {
            if redis.is_none() {
                tracing::warn!("quota: no [redis]; buckets are kept per replica in memory");
            }
            crate::quota::from_config(&cfg.gates.quota, redis.clone())
                .map_err(|e| ServeError::Setup(format!("gate quota: {e}")))?
        }
    };
    let provenance: Arc<dyn ReleaseVerifier> = match cfg.gates.provenance.mode {
        GateMode::Disabled => {
            warn("provenance");
            Arc::new(DisabledProvenance)
        }
        GateMode::Enforce => Arc::new(
            crate::provenance::ReleaseVerifierImpl::from_config(&cfg.gates.provenance)
                .map_err(|e| ServeError::Setup(format!("gate provenance: {e}")))?,
        ),
    };
    Ok(GatePorts {
        entitlement,
        quota,
        provenance,
    })
}

/// The pipeline's configuration from the service's.
/// `max_deliver` and `ack_wait` are the consumer's, as the server has them.
pub fn pipeline_config(
    cfg: &Config,
    worker_id: String,
    max_deliver: u64,
    ack_wait: Duration,
) -> PipelineConfig {
    let mut p = PipelineConfig::new(worker_id, cfg.profile_table());
    p.requests_subject = cfg.nats.subject("sign.requests");
    p.completed_subject = cfg.nats.subject("sign.completed");
    p.failed_subject = cfg.nats.subject("sign.failed");
    p.audit_subject_prefix = cfg.nats.subject("signer.audit");
    p.audit_stream.clone_from(&cfg.nats.audit_stream);
    p.max_inflight = cfg.worker.max_inflight;
    p.max_body_bytes = cfg.worker.max_body_bytes;
    p.max_deliver = max_deliver;
    p.backoff_base = cfg.worker.backoff_base;
    p.backoff_max = cfg.worker.backoff_max;
    p.lease = cfg.idempotency.lease;
    p.ack_wait = ack_wait;
    p.audit_batch_max = cfg.worker.audit_batch_max;
    p.audit_flush_interval = cfg.worker.audit_flush_interval;
    p.max_queue_age = cfg.worker.max_queue_age;
    p.retry_budget = cfg.worker.retry_budget;
    p.job_timeout = cfg.worker.job_timeout;
    p.provenance_limits = signer_actors::pipeline::ProvenanceLimits {
        per_tenant: cfg.gates.provenance.tenant_lookups,
        wait: cfg.gates.provenance.tenant_wait,
        cache_ttl: cfg.gates.provenance.cache_ttl,
        ..signer_actors::pipeline::ProvenanceLimits::default()
    };
    p.max_payload_ref_bytes = cfg.worker.max_payload_ref_bytes;
    p
}

/// The inline result limit: `worker.max_inline_result_bytes`, or the server's
/// `max_payload` less [`INLINE_RESULT_HEADROOM`] for headers. A configured limit the
/// server could not take is a startup error, not a result that never gets out.
///
/// [`INLINE_RESULT_HEADROOM`]: signer_actors::pipeline::INLINE_RESULT_HEADROOM
pub fn inline_result_limit(
    configured: Option<usize>,
    server_max_payload: usize,
) -> Result<usize, ServeError> {
    use signer_actors::pipeline::INLINE_RESULT_HEADROOM;
    let room = server_max_payload.saturating_sub(INLINE_RESULT_HEADROOM);
    match configured {
        Some(n) if n > room => Err(ServeError::Setup(format!(
            "worker.max_inline_result_bytes = {n} does not fit the server's max_payload of {server_max_payload} bytes with {INLINE_RESULT_HEADROOM} bytes for headers (at most {room})"
        ))),
        Some(n) => Ok(n),
        None if room < crate::config::MIN_INLINE_RESULT_BYTES => Err(ServeError::Setup(format!(
            "the server's max_payload of {server_max_payload} bytes is too small for results"
        ))),
        None => Ok(room),
    }
}

/// Runs until SIGTERM or SIGINT, then drains.
pub async fn run(cfg: Config) -> Result<(), ServeError> {
    // Listen for SIGTERM before anything else, so a stop request is never lost.
    let mut stop =
        StopSignal::new().map_err(|e| ServeError::Setup(format!("signal handler: {e}")))?;
    // Key files, chains and Fulcio roots: a wrong one stops startup before any connection.
    let keys = ConfiguredKeys::new(cfg.keys.clone());
    keys.check().map_err(|e| ServeError::Setup(e.to_string()))?;
    let metrics = crate::telemetry::metrics().map_err(ServeError::Setup)?;
    crate::telemetry::initialize_series();
    let worker_id = cfg.worker.id.clone().unwrap_or_else(default_worker_id);
    let redis = cfg.redis.as_ref().map(crate::redis::connect).transpose()?;
    let replay = Arc::new(crate::replay::DeferredReplayCache::default());
    let GatePorts {
        entitlement,
        quota,
        provenance,
    } = gates(&cfg, redis.clone(), replay.clone()).await?;
    let health = Arc::new(Health {
        running: std::sync::OnceLock::new(),
        metrics,
    });
    let http = if cfg.http.listen.is_empty() {
        None
    } else {
        let listener = tokio::net::TcpListener::bind(&cfg.http.listen)
            .await
            .map_err(|e| ServeError::Setup(format!("http.listen {}: {e}", cfg.http.listen)))?;
        // The address bound (with port 0 in http.listen, the port the system picked).
        if let Ok(addr) = listener.local_addr() {
            tracing::info!(listen = %addr, "http server listening");
        }
        Some(tokio::spawn(crate::http::serve(listener, health.clone())))
    };
    let client = jetstream::connect(&cfg.nats, &format!("stella-signer {worker_id}")).await?;
    let js = async_nats::jetstream::new(client.clone());
    // Wait for NATS rather than exit: a replica may start before its broker.
    let provisioned = loop {
        match provision::provision(&js, &cfg.nats).await {
            Ok(p) => break p,
            Err(e) => {
                tracing::warn!(error = %e, "NATS not usable yet; retrying in 2s");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                    _ = stop.recv() => return Ok(()),
                }
            }
        }
    };
    let blobs = crate::blobs::open(&js, &cfg.nats.blobs_bucket, cfg.nats.blobs_max_age).await?;
    let inline_limit = inline_result_limit(
        cfg.worker.max_inline_result_bytes,
        client.server_info().max_payload,
    )?;
    tracing::info!(
        bucket = %cfg.nats.blobs_bucket,
        max_inline_result_bytes = inline_limit,
        "large artefacts go through the object store"
    );
    if cfg.gates.entitlement.mode == GateMode::Enforce {
        let store = crate::replay::open(
            &cfg.gates.entitlement,
            cfg.dpop_replay_lifetime(),
            &js,
            redis.clone(),
        )
        .await?;
        replay.set(store);
    }
    let idempotency = crate::idempotency::open(
        cfg.idempotency_backend(),
        &cfg.idempotency,
        &js,
        redis.clone(),
    )
    .await?;
    let key_ledger = crate::keystate::KeyLedger::open(&js, &cfg.nats.keys_bucket).await?;
    key_ledger.record_profiles(&cfg.profile_table()).await;
    let watcher = key_ledger.watch();
    let operators = match &cfg.gates.control {
        Some(c) => Some(
            crate::control::auth::OperatorAuthority::open(c, &js)
                .await
                .map_err(|e| ServeError::Setup(e.to_string()))?,
        ),
        None => {
            tracing::warn!(
                "KEY CONTROL DISABLED: no [gates.control]; every command on signer.control.keys is refused (control_disabled)"
            );
            None
        }
    };
    let poller = crate::telemetry::poller::spawn(
        js.clone(),
        cfg.nats.requests_stream.clone(),
        cfg.nats.consumer.clone(),
        key_ledger.clone(),
    );
    let ports = Ports {
        source: Arc::new(PullSourceFactory {
            requests: provisioned.requests,
            nats: cfg.nats.clone(),
            batch: cfg.worker.max_inflight.min(512),
            started_with: (provisioned.max_deliver, provisioned.ack_wait),
            max_bytes: PullSourceFactory::batch_bytes(cfg.worker.max_body_bytes),
        }),
        publisher: Arc::new(JsPublisher {
            js: js.clone(),
            results: provisioned.results,
        }),
        idempotency,
        keys: Arc::new(keys.with_registry(key_ledger.clone())),
        revocations: key_ledger.clone(),
        assignments: key_ledger.clone(),
        entitlement,
        quota,
        provenance,
        blobs: Some(Arc::new(crate::blobs::JsBlobStore::new(
            blobs,
            cfg.nats.blobs_bucket.clone(),
        ))),
    };
    let mut pcfg = pipeline_config(
        &cfg,
        worker_id.clone(),
        provisioned.max_deliver,
        provisioned.ack_wait,
    );
    pcfg.max_inline_result_bytes = inline_limit;
    // a batch of audit events is split to fit the server's max_payload, headers aside
    pcfg.audit_max_message_bytes = client
        .server_info()
        .max_payload
        .saturating_sub(signer_actors::pipeline::INLINE_RESULT_HEADROOM);
    let pipeline = Pipeline::start(pcfg, ports)
        .await
        .map_err(|e| ServeError::Setup(e.to_string()))?;
    // after the pipeline: control decisions go into its audit chain
    let control = crate::control::server::ControlServer {
        state: key_ledger.clone(),
        authority: operators,
        audit: pipeline.audit_sink(),
    }
    .spawn(client.clone(), cfg.nats.subject("signer.control.keys"))
    .await
    .map_err(|e| ServeError::Setup(format!("subscribing to the key control subject: {e}")))?;
    let preflight_subject = cfg.nats.subject(crate::provenance::preflight::SUBJECT);
    let preflight = crate::provenance::preflight::spawn(
        pipeline.preflight(),
        client.clone(),
        preflight_subject.clone(),
    )
    .await
    .map_err(|e| ServeError::Setup(format!("subscribing to the pre-flight subject: {e}")))?;
    tracing::info!(subject = %preflight_subject, "provenance pre-flight answering");
    if let Some(c) = &cfg.gates.control {
        tracing::info!(
            required_signatures = c.required_signatures,
            "key control: commands need operator signatures"
        );
    }
    let probes = Arc::new(Probes::for_config(&cfg, redis.as_ref(), &js));
    probes.run_once().await;
    tracing::info!(
        probes = %probes.dependencies().iter().map(ToString::to_string).collect::<Vec<_>>().join(", "),
        interval_s = cfg.http.probe_interval.as_secs(),
        "readiness probes"
    );
    let prober = tokio::spawn(probes.clone().run(cfg.http.probe_interval));
    let _ = health.running.set(Readiness {
        pipeline: pipeline.status(),
        client: client.clone(),
        probes,
    });
    tracing::info!(worker = %worker_id, requests = %cfg.nats.requests_stream, consumer = %cfg.nats.consumer,
        http = %cfg.http.listen, max_inflight = cfg.worker.max_inflight, "stella-signer serving");

    let gave_up = tokio::select! {
        _ = stop.recv() => false,
        _ = pipeline.stopped() => true,
    };
    if gave_up {
        if let Some(h) = http {
            h.abort();
        }
        prober.abort();
        return Err(ServeError::Setup(
            "the supervision tree stopped (too many actor restarts); exiting so the process is restarted".into(),
        ));
    }
    tracing::info!(
        timeout_s = cfg.worker.drain_timeout.as_secs(),
        "draining in-flight jobs"
    );
    // Everything, the last flush included, within drain_timeout.
    let deadline = tokio::time::Instant::now() + cfg.worker.drain_timeout;
    let flush_grace = (cfg.worker.drain_timeout / 10).min(Duration::from_secs(1));
    let left = pipeline
        .shutdown(cfg.worker.drain_timeout.saturating_sub(flush_grace))
        .await;
    if let Some(h) = http {
        h.abort();
    }
    prober.abort();
    watcher.abort();
    poller.abort();
    control.abort();
    preflight.abort();
    let _ = tokio::time::timeout_at(deadline, client.flush()).await;
    if left > 0 {
        tracing::warn!(
            left,
            "drain timed out; the jobs still running were cut off and NAKed for another replica"
        );
    } else {
        tracing::info!("drained; bye");
    }
    Ok(())
}

/// SIGTERM or SIGINT, registered once at startup.
struct StopSignal {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl StopSignal {
    fn new() -> std::io::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(StopSignal {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    async fn recv(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::inline_result_limit;

    #[test]
    fn the_inline_result_limit_leaves_room_for_headers_below_max_payload() {
        let mib = 1 << 20;
        assert_eq!(inline_result_limit(None, mib).unwrap(), mib - (64 << 10));
        assert_eq!(inline_result_limit(Some(100_000), mib).unwrap(), 100_000);
        let err = inline_result_limit(Some(mib), mib).unwrap_err().to_string();
        assert!(err.contains("max_inline_result_bytes"), "{err}");
        assert!(
            inline_result_limit(None, 70 << 10).is_err(),
            "no room for results"
        );
        assert_eq!(
            inline_result_limit(None, 8 * mib).unwrap(),
            8 * mib - (64 << 10),
            "a server with a larger max_payload gets larger inline results"
        );
    }
}
