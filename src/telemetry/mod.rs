//! JSON logs (tracing), the Prometheus recorder, and the gauges read from outside the
//! process (backlog of the consumer, key state: [`poller`], [`keys`]).

pub(crate) mod keys;
pub(crate) mod poller;

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Buckets of `signer_job_latency_seconds` (publish to result): it includes time spent
/// queued, retried and redelivered, so it runs from milliseconds to an hour, past the
/// default buckets' 2.5 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
];
use tracing_subscriber::EnvFilter;

/// JSON logs on stderr; `SIGNER_LOG` (or `RUST_LOG`) sets the filter, default `info`.
pub fn init_logs() {
    let filter = std::env::var("SIGNER_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .unwrap_or_else(|_| "info".into());
    let _ = tracing_subscriber::fmt()
        .json()
        .with_current_span(true)
        .with_span_list(false)
        .with_env_filter(EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .try_init();
}

/// Installs the Prometheus recorder once per process and returns its handle.
pub fn metrics() -> Result<PrometheusHandle, String> {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    if let Some(h) = HANDLE.get() {
        return Ok(h.clone());
    }
    let handle = PrometheusBuilder::new()
        .set_buckets(&[
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
        ])
        .map_err(|e| e.to_string())?
        .set_buckets_for_metric(
            Matcher::Full("signer_job_latency_seconds".into()),
            LATENCY_BUCKETS,
        )
        .map_err(|e| e.to_string())?
        .install_recorder()
        .map_err(|e| format!("metrics recorder: {e}"))?;
    Ok(HANDLE.get_or_init(|| handle).clone())
}

/// Exports at 0 the counters that alerts take a `rate()` of, before their first event.
/// A series that appears with its first burst already counted has no earlier sample, so
/// `rate()` sees no increase: the burst that created it would never raise an alert.
/// Every label value here is from a fixed set (outcomes, contract error codes).
pub fn initialize_series() {
    use signer_actors::error::ErrorCode;
    metrics::counter!("signer_jobs_total", "outcome" => "completed", "code" => "").absolute(0);
    metrics::counter!("signer_jobs_total", "outcome" => "duplicate", "code" => "").absolute(0);
    for code in ErrorCode::ALL {
        metrics::counter!("signer_jobs_total", "outcome" => "failed", "code" => code.as_str())
            .absolute(0);
        if code.retryable() {
            metrics::counter!("signer_retries_total", "code" => code.as_str()).absolute(0);
        }
    }
    for outcome in ["answered", "unavailable"] {
        metrics::counter!("signer_licensing_requests_total", "outcome" => outcome).absolute(0);
    }
    metrics::counter!("signer_audit_batches_failed_total").absolute(0);
    metrics::counter!("signer_backlog_poll_errors_total").absolute(0);
}
