//! `bench pipeline`: jobs/s and latency through the whole worker (a real `stella-signer
//! serve` process against the local NATS and Redis), beside the ceilings measured in the same
//! run:
//! (a) the raw signature of the same key, (b) the JetStream round trip with a no-op worker
//! (request stream -> worker -> result stream, same sizes, result stored before the ack).
//!
//! Phases:
//! 1. backlog: N jobs wait in the stream, then the worker starts; sustained jobs/s, CPU
//!    seconds per 1,000 jobs and peak RSS (VmHWM) of the worker process while it drains;
//! 2. open loop: a fixed offered rate for a fixed time; latency publish -> result.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer, stream};
use futures::StreamExt as _;
use serde_json::json;
use signer_actors::keys::KeyAlgorithm;
use tokio::sync::Semaphore;

use stella_signer::keys::file::FileKey;

use crate::ToolError;

/// What to run.
#[derive(Clone)]
pub struct PipelineBench {
    /// The `stella-signer` executable run as the worker (`serve --config`).
    pub worker: PathBuf,
    pub nats: String,
    pub redis: String,
    pub jobs: usize,
    pub rate: u64,
    pub duration: Duration,
    pub max_inflight: usize,
    /// Extra TOML appended to the worker's configuration (gates).
    pub extra_config: String,
    /// Builds the `auth`/`poe` part of job `i` (fresh DPoP proofs need a new one per job).
    pub identity: Arc<dyn Fn(usize) -> serde_json::Value + Send + Sync>,
    pub label: String,
}

fn bench_err(e: impl std::fmt::Display) -> ToolError {
    ToolError::Unusable(e.to_string())
}

/// A ~1 KiB in-toto statement, unique per job.
fn statement(i: usize) -> serde_json::Value {
    json!({
        "_type": signer_actors::statement::STATEMENT_V1,
        "subject": [{"name": format!("registry.example:5000/acme/app-{i}"), "digest": {"sha256": format!("{:064x}", i)}}],
        "predicateType": "https://stella-ops.org/attestations/scan-report/v1",
        "predicate": {"scanner": {"name": "stella-scanner", "version": "2026.11.0"}, "notes": "x".repeat(700)}
    })
}

fn request(i: usize, identity: &serde_json::Value) -> Vec<u8> {
    let mut r = json!({
        "apiVersion": signer_actors::API_VERSION,
        "requestId": format!("b-{i}"),
        "tenant": "acme",
        "kind": "dsse",
        "statement": statement(i),
        "scanner": {"repository": "localhost/stella-ops/scanner", "imageDigest": format!("sha256:{}", "0".repeat(64))},
    });
    if let (Some(obj), Some(id)) = (r.as_object_mut(), identity.as_object()) {
        for (k, v) in id {
            obj.insert(k.clone(), v.clone());
        }
    }
    serde_json::to_vec(&r).unwrap_or_default()
}

/// CPU seconds (user + system) and peak RSS in bytes of a process.
fn proc_usage(pid: u32) -> Option<(f64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let hwm_kb: u64 = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some((ticks / 100.0, hwm_kb * 1024))
}

struct Names {
    prefix: String,
    req: String,
    res: String,
    aud: String,
    keys: String,
    consumer: String,
    idem: String,
    /// Key-value buckets of this run's idempotency and DPoP replay records.
    idem_bucket: String,
    dpop_bucket: String,
}

impl Names {
    fn new(tag: &str) -> Names {
        let mut rnd = [0u8; 3];
        let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut rnd);
        let id = format!("{tag}{}{}", std::process::id(), hex::encode(rnd));
        let up = id.to_ascii_uppercase();
        Names {
            prefix: format!("{id}."),
            req: format!("{up}_REQ"),
            res: format!("{up}_RES"),
            aud: format!("{up}_AUD"),
            keys: format!("{up}_KEYS"),
            consumer: id.clone(),
            idem: format!("{id}:idem:"),
            idem_bucket: format!("{up}_IDEM"),
            dpop_bucket: format!("{up}_DPOP"),
        }
    }

    async fn cleanup(&self, js: &jetstream::Context) {
        for s in [&self.req, &self.res, &self.aud] {
            let _ = js.delete_stream(s).await;
        }
        for bucket in [&self.keys, &self.idem_bucket, &self.dpop_bucket] {
            let _ = js.delete_stream(format!("KV_{bucket}")).await;
        }
    }
}

/// Publishes jobs `from..to` with pipelined acknowledgements; returns publish instants.
async fn publish_jobs(
    js: &jetstream::Context,
    subject: &str,
    from: usize,
    to: usize,
    identity: &(dyn Fn(usize) -> serde_json::Value + Send + Sync),
) -> Result<(), ToolError> {
    let mut pending = std::collections::VecDeque::new();
    for i in from..to {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", format!("b-{i}").as_str());
        let ack = js
            .publish_with_headers(
                subject.to_string(),
                headers,
                request(i, &identity(i)).into(),
            )
            .await
            .map_err(bench_err)?;
        pending.push_back(ack);
        if pending.len() >= 4096
            && let Some(a) = pending.pop_front()
        {
            a.await.map_err(bench_err)?;
        }
    }
    for a in pending {
        a.await.map_err(bench_err)?;
    }
    Ok(())
}

async fn wait_results(
    js: &jetstream::Context,
    stream: &str,
    n: u64,
    timeout: Duration,
) -> Result<Instant, ToolError> {
    let mut s = js.get_stream(stream).await.map_err(bench_err)?;
    let deadline = Instant::now() + timeout;
    loop {
        let have = s.info().await.map_err(bench_err)?.state.messages;
        if have >= n {
            return Ok(Instant::now());
        }
        if Instant::now() > deadline {
            return Err(ToolError::Unusable(format!(
                "only {have} of {n} results within {timeout:?}"
            )));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Ceiling (b): the same JetStream round trip with a worker that does nothing but store a
/// result of the same size and ack.
async fn noop_ceiling(
    js: &jetstream::Context,
    n: usize,
    result_bytes: usize,
    max_inflight: usize,
    identity: &(dyn Fn(usize) -> serde_json::Value + Send + Sync),
) -> Result<f64, ToolError> {
    let names = Names::new("noop");
    let req = js
        .create_stream(stream::Config {
            name: names.req.clone(),
            subjects: vec![format!("{}sign.requests", names.prefix)],
            retention: stream::RetentionPolicy::WorkQueue,
            ..Default::default()
        })
        .await
        .map_err(bench_err)?;
    js.create_stream(stream::Config {
        name: names.res.clone(),
        subjects: vec![format!("{}sign.completed", names.prefix)],
        duplicate_window: Duration::from_secs(120),
        ..Default::default()
    })
    .await
    .map_err(bench_err)?;
    publish_jobs(
        js,
        &format!("{}sign.requests", names.prefix),
        0,
        n,
        identity,
    )
    .await?;
    let consumer: consumer::PullConsumer = req
        .create_consumer(consumer::pull::Config {
            durable_name: Some(names.consumer.clone()),
            ack_policy: consumer::AckPolicy::Explicit,
            max_ack_pending: -1,
            ..Default::default()
        })
        .await
        .map_err(bench_err)?;
    let body = bytes::Bytes::from(vec![b'x'; result_bytes]);
    let subject = format!("{}sign.completed", names.prefix);
    let started = Instant::now();
    let worker = {
        let js = js.clone();
        tokio::spawn(async move {
            let Ok(mut messages) = consumer
                .stream()
                .max_messages_per_batch(max_inflight.min(512))
                .messages()
                .await
            else {
                return;
            };
            let slots = Arc::new(Semaphore::new(max_inflight));
            while let Some(Ok(msg)) = messages.next().await {
                let Ok(permit) = slots.clone().acquire_owned().await else {
                    return;
                };
                let (js, body, subject) = (js.clone(), body.clone(), subject.clone());
                tokio::spawn(async move {
                    let id = msg
                        .headers
                        .as_ref()
                        .and_then(|h| h.get("Nats-Msg-Id"))
                        .map(|v| v.to_string())
                        .unwrap_or_default();
                    let mut headers = async_nats::HeaderMap::new();
                    headers.insert("Nats-Msg-Id", format!("acme/{id}").as_str());
                    if let Ok(ack) = js.publish_with_headers(subject, headers, body).await
                        && ack.await.is_ok()
                    {
                        let _ = msg.ack().await;
                    }
                    drop(permit);
                });
            }
        })
    };
    let done = wait_results(js, &names.res, n as u64, Duration::from_secs(600)).await;
    worker.abort();
    names.cleanup(js).await;
    let done = done?;
    Ok(n as f64 / done.duration_since(started).as_secs_f64())
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

struct Worker {
    child: Child,
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `worker serve`; the run's DPoP bucket comes from the environment because the
/// gates' `[gates.entitlement]` table belongs to the variant's configuration.
fn start_worker(
    worker: &Path,
    config: &Path,
    dir: &Path,
    names: &Names,
) -> Result<Worker, ToolError> {
    let log = std::fs::File::create(dir.join("worker.log")).map_err(bench_err)?;
    let child = Command::new(worker)
        .args(["serve", "--config"])
        .arg(config)
        .env("SIGNER_LOG", "warn")
        .env(
            "SIGNER_GATES__ENTITLEMENT__DPOP_REPLAY_BUCKET",
            &names.dpop_bucket,
        )
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .map_err(|e| ToolError::Unusable(format!("{}: {e}", worker.display())))?;
    Ok(Worker { child })
}

/// Runs the benchmark and prints the table; returns the JSON report.
pub async fn run(b: &PipelineBench) -> Result<serde_json::Value, ToolError> {
    let client = async_nats::connect(b.nats.as_str())
        .await
        .map_err(bench_err)?;
    let js = jetstream::new(client.clone());
    let dir = tempfile::tempdir().map_err(bench_err)?;
    let key = FileKey::generate(KeyAlgorithm::Ed25519, dir.path(), "bench").map_err(bench_err)?;
    let names = Names::new("bench");
    let config = dir.path().join("signer.toml");
    let toml = format!(
        r#"[nats]
url = "{nats}"
subject_prefix = "{prefix}"
requests_stream = "{req}"
results_stream = "{res}"
audit_stream = "{aud}"
keys_bucket = "{keys}"
consumer = "{consumer}"
[worker]
max_inflight = {inflight}
[redis]
url = "{redis}"
[idempotency]
redis_prefix = "{idem}"
bucket = "{idem_bucket}"
[http]
listen = ""
[[keys]]
name = "bench"
source = "file"
path = "{key}"
[profiles.default]
keys = ["bench"]
{extra}
"#,
        nats = b.nats,
        prefix = names.prefix,
        req = names.req,
        res = names.res,
        aud = names.aud,
        keys = names.keys,
        consumer = names.consumer,
        inflight = b.max_inflight,
        redis = b.redis,
        idem = names.idem,
        idem_bucket = names.idem_bucket,
        key = key.private_key.display(),
        extra = b.extra_config,
    );
    std::fs::write(&config, toml).map_err(bench_err)?;

    // ceiling (a): the raw signature of the same key over a job-sized PAE
    let signer = FileKey::load(&key.private_key, "bench").map_err(bench_err)?;
    let pae = signer_actors::dsse::pae(
        signer_actors::statement::INTOTO_PAYLOAD_TYPE,
        &serde_json::to_vec(&statement(0)).map_err(bench_err)?,
    );
    let raw = super::ops_per_sec(3, 20_000, || {
        let _ = signer.sign_now(&pae);
    });

    // phase 1: backlog, then the worker
    let stream_subject = format!("{}sign.requests.acme", names.prefix);
    // a first worker provisions streams and the consumer, then stops
    {
        let w = start_worker(&b.worker, &config, dir.path(), &names)?;
        let deadline = Instant::now() + Duration::from_secs(20);
        while js.get_stream(&names.req).await.is_err() || js.get_stream(&names.res).await.is_err() {
            if Instant::now() > deadline {
                return Err(ToolError::Unusable(format!(
                    "worker did not start:\n{}",
                    std::fs::read_to_string(dir.path().join("worker.log")).unwrap_or_default()
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        drop(w);
    }
    let t = Instant::now();
    publish_jobs(&js, &stream_subject, 0, b.jobs, b.identity.as_ref()).await?;
    let publish_rate = b.jobs as f64 / t.elapsed().as_secs_f64();
    let worker = start_worker(&b.worker, &config, dir.path(), &names)?;
    let pid = worker.child.id();
    let started = Instant::now();
    let (cpu0, _) = proc_usage(pid).unwrap_or((0.0, 0));
    let peak = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let sampler = {
        let peak = peak.clone();
        tokio::spawn(async move {
            loop {
                if let Some((_, hwm)) = proc_usage(pid) {
                    peak.fetch_max(hwm, std::sync::atomic::Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let done = wait_results(&js, &names.res, b.jobs as u64, Duration::from_secs(900)).await;
    let (cpu1, hwm) = proc_usage(pid).unwrap_or((0.0, 0));
    sampler.abort();
    let done = done?;
    let jobs_per_sec = b.jobs as f64 / done.duration_since(started).as_secs_f64();
    let cpu_per_1000 = (cpu1 - cpu0) / b.jobs as f64 * 1000.0;
    let peak_rss = peak.load(std::sync::atomic::Ordering::Relaxed).max(hwm);
    let mut results = js.get_stream(&names.res).await.map_err(bench_err)?;
    let sample = results
        .get_last_raw_message_by_subject(&format!("{}sign.completed", names.prefix))
        .await;
    let failed = results
        .get_last_raw_message_by_subject(&format!("{}sign.failed", names.prefix))
        .await;
    if let Ok(f) = failed {
        return Err(ToolError::Invalid(format!(
            "the worker refused jobs: {}",
            String::from_utf8_lossy(&f.payload)
        )));
    }
    let result_bytes = sample.map(|m| m.payload.len()).unwrap_or(3000);
    let _ = results.info().await;

    // phase 2: open loop at a fixed offered rate
    let mut subs = client
        .subscribe(format!("{}sign.completed", names.prefix))
        .await
        .map_err(bench_err)?;
    let total = (b.rate as f64 * b.duration.as_secs_f64()) as usize;
    let base = b.jobs;
    let sent_at: Arc<Vec<std::sync::OnceLock<Instant>>> =
        Arc::new((0..total).map(|_| std::sync::OnceLock::new()).collect());
    let collector = {
        let sent_at = sent_at.clone();
        tokio::spawn(async move {
            let mut lat = Vec::with_capacity(total);
            while lat.len() < total {
                let Ok(Some(msg)) =
                    tokio::time::timeout(Duration::from_secs(30), subs.next()).await
                else {
                    break;
                };
                let now = Instant::now();
                let id = msg
                    .headers
                    .as_ref()
                    .and_then(|h| h.get("Signer-Request-Id"))
                    .map(|v| v.to_string());
                if let Some(i) =
                    id.and_then(|s| s.strip_prefix("b-").and_then(|n| n.parse::<usize>().ok()))
                    && i >= base
                    && let Some(t) = sent_at.get(i - base).and_then(|c| c.get())
                {
                    lat.push(now.duration_since(*t).as_secs_f64() * 1000.0);
                }
            }
            lat
        })
    };
    let interval = Duration::from_secs_f64(1.0 / b.rate as f64);
    let open_start = Instant::now();
    let mut acks = std::collections::VecDeque::new();
    for k in 0..total {
        let due = open_start + interval.mul_f64(k as f64);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            tokio::time::sleep(wait).await;
        }
        let i = base + k;
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", format!("b-{i}").as_str());
        let _ = sent_at[k].set(Instant::now());
        acks.push_back(
            js.publish_with_headers(
                stream_subject.clone(),
                headers,
                request(i, &(b.identity)(i)).into(),
            )
            .await
            .map_err(bench_err)?,
        );
        while acks.len() > 1024 {
            if let Some(a) = acks.pop_front() {
                a.await.map_err(bench_err)?;
            }
        }
    }
    for a in acks {
        a.await.map_err(bench_err)?;
    }
    let mut lat = collector.await.map_err(bench_err)?;
    lat.sort_by(|a, b| a.total_cmp(b));
    drop(worker);

    // ceiling (b)
    let ceiling = noop_ceiling(
        &js,
        b.jobs,
        result_bytes,
        b.max_inflight,
        b.identity.as_ref(),
    )
    .await?;
    names.cleanup(&js).await;
    let (p50, p90, p99, max) = (
        percentile(&lat, 0.5),
        percentile(&lat, 0.9),
        percentile(&lat, 0.99),
        lat.last().copied().unwrap_or(f64::NAN),
    );
    let mib = peak_rss as f64 / (1024.0 * 1024.0);
    println!(
        "pipeline bench ({}): {} jobs, ~1 KiB statements, one Ed25519 key, max_inflight {}",
        b.label, b.jobs, b.max_inflight
    );
    println!(
        "  {:<44} {:>12.0}",
        "raw Ed25519 signatures/s (ceiling a)", raw
    );
    println!(
        "  {:<44} {:>12.0}",
        "no-op JetStream round trip jobs/s (ceiling b)", ceiling
    );
    println!(
        "  {:<44} {:>12.0}",
        "pipeline jobs/s (backlog drain)", jobs_per_sec
    );
    println!(
        "  {:<44} {:>12.2}",
        "pipeline / ceiling b",
        jobs_per_sec / ceiling
    );
    println!(
        "  {:<44} {:>12.2}",
        "pipeline / ceiling a",
        jobs_per_sec / raw
    );
    println!(
        "  {:<44} {:>12.3}",
        "worker CPU seconds per 1,000 jobs", cpu_per_1000
    );
    println!(
        "  {:<44} {:>12.1}",
        "worker peak RSS MiB (backlog waiting)", mib
    );
    println!(
        "  {:<44} {:>12.0}",
        "publisher jobs/s (into the stream)", publish_rate
    );
    println!(
        "  open loop {} jobs/s for {:?}: {} results, latency ms p50 {:.2} p90 {:.2} p99 {:.2} max {:.2}",
        b.rate,
        b.duration,
        lat.len(),
        p50,
        p90,
        p99,
        max
    );
    Ok(json!({
        "bench": "pipeline", "label": b.label, "jobs": b.jobs, "maxInflight": b.max_inflight,
        "rawSignPerSec": raw, "noopRoundTripPerSec": ceiling, "pipelineJobsPerSec": jobs_per_sec,
        "ratioToNoop": jobs_per_sec / ceiling, "ratioToRawSign": jobs_per_sec / raw,
        "cpuSecondsPer1000Jobs": cpu_per_1000, "peakRssBytes": peak_rss, "publishPerSec": publish_rate,
        "openLoop": {"rate": b.rate, "seconds": b.duration.as_secs_f64(), "results": lat.len(),
            "latencyMs": {"p50": p50, "p90": p90, "p99": p99, "max": max}},
    }))
}

/// Which gates a run has on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Variant {
    /// Every gate on; one bearer OpTok and one licence reused by every job (as a scanner does).
    Bearer,
    /// Every gate on; a sender-constrained OpTok and a fresh DPoP proof (EdDSA) on every job.
    Dpop,
    /// Every gate disabled: the bare pipeline.
    Disabled,
}

/// Gate configuration and per-job credentials for `variant`, with keys made in `dir`.
pub fn gate_setup(variant: Variant, dir: &Path) -> Result<PipelineBench, ToolError> {
    use crate::mint::{self, MintAlg};
    let issuer = "https://authority.bench.stella-ops.local";
    // DPoP jtis and quota buckets of this run only (Redis outlives runs)
    let mut rnd = [0u8; 4];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut rnd);
    let run = format!("bench-{}", hex::encode(rnd));
    let htu = "nats:sign.requests";
    let mk = |name: &str, alg| -> Result<(String, String, std::path::PathBuf), ToolError> {
        let (pem, jwk) = mint::generate_signing_key(alg).map_err(bench_err)?;
        let kid = jwk.kid.clone().unwrap_or_else(|| mint::jkt_of(&jwk));
        let path = dir.join(format!("{name}.jwks.json"));
        std::fs::write(
            &path,
            serde_json::to_vec(&mint::jwks(&[jwk])).map_err(bench_err)?,
        )
        .map_err(bench_err)?;
        Ok((pem, kid, path))
    };
    let (auth_pem, auth_kid, auth_jwks) = mk("authority", MintAlg::EdDsa)?;
    let (lic_pem, lic_kid, lic_jwks) = mk("licensing", MintAlg::Es256)?;
    let (proof_pem, proof_jwk) = mint::generate_signing_key(MintAlg::EdDsa).map_err(bench_err)?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let mut claims = json!({"iss": issuer, "sub": "svc:bench", "aud": ["signer"], "scope": "signer.sign",
        "tid": "acme", "iat": now, "nbf": now, "exp": now + 7200});
    if variant == Variant::Dpop {
        claims["cnf"] = json!({"jkt": mint::jkt_of(&proof_jwk)});
    }
    let op_tok = mint::mint_optok(&auth_pem, &auth_kid, &claims).map_err(bench_err)?;
    let poe = mint::mint_poe(
        &lic_pem,
        &lic_kid,
        &json!({"tid": "acme", "plan": "bench", "features": ["signer.sign"], "iat": now, "exp": now + 7200}),
    )
    .map_err(bench_err)?;
    let base = json!({"auth": {"opTok": op_tok}, "poe": {"format": "jwt", "value": poe}});
    let gates = format!(
        r#"[gates.entitlement]
issuer = "{issuer}"
jwks_file = "{auth_jwks}"
dpop_htu = "{htu}"
allow_bearer = {bearer}
dpop_max_age = "10m"
dpop_replay_prefix = "{run}:dpop:"
[gates.entitlement.poe]
licensing_jwks_file = "{lic_jwks}"
[gates.quota]
redis_prefix = "{run}:quota:"
[gates.quota.plans.bench]
requests_per_second = 1000000.0
burst = 1000000
max_concurrent = 100000
max_payload_bytes = 1048576
[gates.provenance]
allowlist = ["sha256:{zeros}"]
"#,
        auth_jwks = auth_jwks.display(),
        lic_jwks = lic_jwks.display(),
        bearer = variant == Variant::Bearer,
        zeros = "0".repeat(64),
    );
    let (extra_config, identity, label): (String, Arc<dyn Fn(usize) -> serde_json::Value + Send + Sync>, &str) =
        match variant {
            Variant::Disabled => (
                "[gates.entitlement]\nmode = \"disabled\"\n[gates.quota]\nmode = \"disabled\"\n[gates.provenance]\nmode = \"disabled\"\n".into(),
                Arc::new(|_| json!({"auth": {"opTok": "bench"}, "poe": {"format": "jwt", "value": "bench"}})),
                "gates disabled",
            ),
            Variant::Bearer => (gates, Arc::new(move |_| base.clone()), "all gates, bearer OpTok reused"),
            Variant::Dpop => {
                let op_tok = op_tok.clone();
                let run = run.clone();
                (
                    gates,
                    Arc::new(move |i| {
                        let mut id = base.clone();
                        let t = std::time::SystemTime::now()
                            .duration_since(std::time::UNIX_EPOCH)
                            .map(|d| d.as_secs())
                            .unwrap_or(0);
                        id["auth"]["dpop"] =
                            mint::mint_dpop(&proof_pem, &op_tok, htu, t, &format!("{run}-{i}")).unwrap_or_default().into();
                        id
                    }),
                    "all gates, fresh DPoP proof per job",
                )
            }
        };
    Ok(PipelineBench {
        worker: PathBuf::new(),
        nats: String::new(),
        redis: String::new(),
        jobs: 0,
        rate: 0,
        duration: Duration::ZERO,
        max_inflight: 0,
        extra_config,
        identity,
        label: label.into(),
    })
}
