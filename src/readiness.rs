//! Readiness of `serve`: the pipeline's own view (job source, keys, the stores its jobs
//! wrote to) plus what only the service can see: the NATS connection, and probes of the
//! stores the jobs need, asked every `http.probe_interval` so that an idle replica notices an
//! outage, and its end, without a job to fail.
//!
//! The probes: Redis (`PING`) when something needs it to decide (idempotency records in
//! Redis, the quota gate without `fail_open`, DPoP replay records in Redis), and the
//! JetStream streams every job writes to (results, audit, the idempotency bucket and the
//! DPoP replay bucket when they are in JetStream): `STREAM.INFO`, which needs the stream's
//! leader, as a write does.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use signer_actors::pipeline::PipelineStatus;

use crate::config::{Config, GateMode, IdempotencyBackend, ReplayBackend};

/// Time limit of one probe.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Something a probe asks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dependency {
    /// Redis, and what needs it (`idempotency`, `quota`, `DPoP replay`).
    Redis { needed_by: Vec<&'static str> },
    /// A JetStream stream (a key-value bucket is the stream `KV_<bucket>`).
    Stream { name: String },
}

impl std::fmt::Display for Dependency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Dependency::Redis { needed_by } => {
                write!(f, "Redis (needed by {})", needed_by.join(", "))
            }
            Dependency::Stream { name } => write!(f, "stream {name}"),
        }
    }
}

/// One reason `serve` is not ready.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Reason {
    #[error("starting: connecting to NATS and provisioning streams")]
    Starting,
    #[error("NATS not connected")]
    NatsDisconnected,
    #[error(transparent)]
    Pipeline(signer_actors::pipeline::Reason),
    #[error("{dependency} unreachable: {error}")]
    Unreachable {
        dependency: Dependency,
        error: String,
    },
}

/// Every reason that holds; `/readyz` answers 503 with them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotReady(pub Vec<Reason>);

impl std::fmt::Display for NotReady {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, r) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{r}")?;
        }
        Ok(())
    }
}

impl std::error::Error for NotReady {}

/// How a probe asks its dependency.
enum Check {
    /// `PING`.
    Redis(crate::redis::Redis),
    /// `STREAM.INFO` of the named stream.
    Stream(Box<async_nats::jetstream::Context>, String),
}

struct Probe {
    dependency: Dependency,
    check: Check,
}

impl Probe {
    /// Asks once, within [`PROBE_TIMEOUT`]; the error says what failed.
    async fn ask(&self) -> Result<(), String> {
        let asked = async {
            match &self.check {
                Check::Redis(conn) => {
                    let mut conn = conn.clone();
                    ::redis::cmd("PING")
                        .query_async::<String>(&mut conn)
                        .await
                        .map(|_| ())
                        .map_err(|e| e.to_string())
                }
                Check::Stream(js, name) => js
                    .get_stream(name)
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string()),
            }
        };
        match tokio::time::timeout(PROBE_TIMEOUT, asked).await {
            Ok(r) => r,
            Err(_) => Err(format!("no answer within {PROBE_TIMEOUT:?}")),
        }
    }
}

/// The probes of a deployment and their latest answers.
pub struct Probes {
    probes: Vec<Probe>,
    /// The latest failure of each probe (same index), `None` when it answered.
    failures: Mutex<Vec<Option<String>>>,
}

impl Probes {
    /// The probes `cfg` needs: Redis when a store or gate depends on it, and the JetStream
    /// streams jobs write to.
    pub fn for_config(
        cfg: &Config,
        redis: Option<&crate::redis::Redis>,
        js: &async_nats::jetstream::Context,
    ) -> Probes {
        let mut probes = Vec::new();
        let replay_in_use = cfg.gates.entitlement.mode == GateMode::Enforce;
        if let Some(conn) = redis {
            let needed_by = redis_needed_by(cfg);
            if !needed_by.is_empty() {
                probes.push(Probe {
                    dependency: Dependency::Redis { needed_by },
                    check: Check::Redis(conn.clone()),
                });
            }
        }
        let mut streams = vec![
            cfg.nats.results_stream.clone(),
            cfg.nats.audit_stream.clone(),
        ];
        if cfg.idempotency_backend() == IdempotencyBackend::Jetstream {
            streams.push(format!("KV_{}", cfg.idempotency.bucket));
        }
        if replay_in_use && cfg.gates.entitlement.dpop_replay_backend == ReplayBackend::Jetstream {
            streams.push(format!("KV_{}", cfg.gates.entitlement.dpop_replay_bucket));
        }
        probes.extend(streams.into_iter().map(|name| Probe {
            dependency: Dependency::Stream { name: name.clone() },
            check: Check::Stream(Box::new(js.clone()), name),
        }));
        let failures = Mutex::new(vec![None; probes.len()]);
        Probes { probes, failures }
    }

    /// What the probes ask, in order.
    pub fn dependencies(&self) -> Vec<Dependency> {
        self.probes.iter().map(|p| p.dependency.clone()).collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Option<String>>> {
        self.failures
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Asks every probe once (concurrently) and keeps the answers. A change is logged.
    pub async fn run_once(&self) {
        let answers = futures::future::join_all(self.probes.iter().map(Probe::ask)).await;
        let mut failures = self.lock();
        for ((probe, answer), failure) in self.probes.iter().zip(answers).zip(failures.iter_mut()) {
            let now = answer.err();
            match (&failure, &now) {
                (None, Some(error)) => {
                    tracing::warn!(dependency = %probe.dependency, %error, "readiness probe failed: not ready");
                }
                (Some(_), None) => {
                    tracing::info!(dependency = %probe.dependency, "readiness probe answers again");
                }
                _ => {}
            }
            *failure = now;
        }
    }

    /// Runs the probes every `interval` until the task is aborted.
    pub async fn run(self: Arc<Self>, interval: Duration) {
        loop {
            self.run_once().await;
            tokio::time::sleep(interval).await;
        }
    }

    /// The dependencies whose latest probe failed.
    pub fn reasons(&self) -> Vec<Reason> {
        self.probes
            .iter()
            .zip(self.lock().iter())
            .filter_map(|(p, f)| {
                f.as_ref().map(|error| Reason::Unreachable {
                    dependency: p.dependency.clone(),
                    error: error.clone(),
                })
            })
            .collect()
    }
}

/// What cannot decide without Redis: idempotency records kept there, the quota gate unless
/// it fails open, and DPoP replay records kept there (replays must fail closed).
pub fn redis_needed_by(cfg: &Config) -> Vec<&'static str> {
    let mut needed_by = Vec::new();
    if cfg.redis.is_none() {
        return needed_by;
    }
    if cfg.idempotency_backend() == IdempotencyBackend::Redis {
        needed_by.push("idempotency");
    }
    if cfg.gates.quota.mode == GateMode::Enforce && !cfg.gates.quota.fail_open {
        needed_by.push("quota");
    }
    if cfg.gates.entitlement.mode == GateMode::Enforce
        && cfg.gates.entitlement.dpop_replay_backend == ReplayBackend::Redis
    {
        needed_by.push("DPoP replay");
    }
    needed_by
}

/// What `/readyz` reports for a running `serve`.
pub struct Readiness {
    pub pipeline: PipelineStatus,
    pub client: async_nats::Client,
    pub probes: Arc<Probes>,
}

impl Readiness {
    /// `Ok` when NATS is connected, the pipeline is ready and every probe answered.
    pub fn ready(&self) -> Result<(), NotReady> {
        let mut reasons = Vec::new();
        if self.client.connection_state() != async_nats::connection::State::Connected {
            reasons.push(Reason::NatsDisconnected);
        }
        if let Err(not_ready) = self.pipeline.ready() {
            reasons.extend(not_ready.reasons.into_iter().map(Reason::Pipeline));
        }
        reasons.extend(self.probes.reasons());
        if reasons.is_empty() {
            Ok(())
        } else {
            Err(NotReady(reasons))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: &str) -> Config {
        let text = format!(
            "[nats]\nurl = \"nats://127.0.0.1:4222\"\n[[keys]]\nname = \"k\"\nsource = \"file\"\npath = \"/k\"\n[profiles.default]\nkeys = [\"k\"]\n{extra}"
        );
        Config::parse(&text, []).unwrap()
    }

    #[test]
    fn redis_is_needed_only_where_a_decision_depends_on_it() {
        assert!(redis_needed_by(&config("")).is_empty());
        let quota =
            "[redis]\nurl = \"redis://127.0.0.1:6379\"\n[gates.quota]\nmode = \"enforce\"\n";
        assert_eq!(redis_needed_by(&config(quota)), vec!["quota"]);
        let fail_open = format!("{quota}fail_open = true\n");
        assert!(redis_needed_by(&config(&fail_open)).is_empty());
        let idem = "[redis]\nurl = \"redis://127.0.0.1:6379\"\n[idempotency]\nbackend = \"redis\"\n[gates.quota]\nmode = \"disabled\"\n";
        assert_eq!(redis_needed_by(&config(idem)), vec!["idempotency"]);
    }

    #[test]
    fn the_probe_interval_defaults_to_5s_and_is_bounded() {
        assert_eq!(config("").http.probe_interval, Duration::from_secs(5));
        for bad in ["0s", "500ms", "2m"] {
            let err = config(&format!("[http]\nprobe_interval = \"{bad}\"\n"))
                .validate()
                .unwrap_err()
                .to_string();
            assert!(err.contains("http.probe_interval"), "{bad}: {err}");
        }
        let ok = config("[http]\nprobe_interval = \"1s\"\n");
        assert_eq!(ok.http.probe_interval, Duration::from_secs(1));
    }

    #[test]
    fn reasons_read_as_one_line() {
        let r = NotReady(vec![
            Reason::NatsDisconnected,
            Reason::Unreachable {
                dependency: Dependency::Redis {
                    needed_by: vec!["quota"],
                },
                error: "connection refused".into(),
            },
        ]);
        assert_eq!(
            r.to_string(),
            "NATS not connected; Redis (needed by quota) unreachable: connection refused"
        );
    }
}
