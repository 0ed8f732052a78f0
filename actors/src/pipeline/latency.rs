//! Latency as the scanner sees it: from the moment the broker stored the request (the
//! JetStream message timestamp, [`crate::ports::Delivery::published`]) to the moment its
//! result is stored. Unlike `signer_job_duration_seconds` (one delivery) it includes the
//! time queued, NAK delays and redeliveries, and a replica that died holding the job.

use std::time::SystemTime;

/// Records `signer_job_latency_seconds{outcome}` for a result just stored. `outcome` is
/// `completed` or `failed` (a bounded label). A publish time in the future (clock skew
/// between broker and replica) counts as 0.
pub(crate) fn result_stored(published: SystemTime, outcome: &'static str) {
    let seconds = SystemTime::now()
        .duration_since(published)
        .unwrap_or_default()
        .as_secs_f64();
    metrics::histogram!("signer_job_latency_seconds", "outcome" => outcome).record(seconds);
}
