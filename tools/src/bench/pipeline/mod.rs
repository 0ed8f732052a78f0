//! `bench pipeline`: jobs/s, latency and cost through the whole worker (real `stella-signer
//! serve` processes against NATS and Redis), beside the ceilings measured in the same run:
//! (a) the raw signature of the same key, (b) the JetStream round trip with a no-op worker
//! (request stream -> worker -> result stream, same sizes, result stored before the ack).
//!
//! A [`Stage`] is one measurement's own streams, buckets, Redis prefixes, configuration and
//! worker processes; [`suite`] runs the sections of the report on stages and prints every
//! figure beside its target, its ceiling and the ratio ([`report`]).

pub mod gates;
pub mod procs;
pub mod report;
pub mod servers;
pub mod suite;
pub mod workload;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer, stream};
use futures::StreamExt as _;
use signer_actors::objects::ObjectRef;
use tokio::sync::Semaphore;

use stella_signer::keys::file::FileKey;

pub use gates::{Gates, Identity, Variant, gate_setup};
use workload::{Payload, request};

use crate::ToolError;

pub(crate) fn bench_err(e: impl std::fmt::Display) -> ToolError {
    ToolError::Unusable(e.to_string())
}

/// Where the stages run: the worker executable and the servers.
#[derive(Clone)]
pub struct Target {
    /// The `stella-signer` executable run as the worker (`serve --config`).
    pub worker: PathBuf,
    pub nats: String,
    pub redis: String,
    pub max_inflight: usize,
    /// The broker's and Redis's processes, when they run here (their CPU per job).
    pub broker_pid: Option<u32>,
    pub redis_pid: Option<u32>,
}

impl Target {
    /// A target whose servers' pids are found by the loopback ports of their URLs.
    pub fn new(worker: PathBuf, nats: &str, redis: &str, max_inflight: usize) -> Target {
        let pid = |url: &str| procs::loopback_port(url).and_then(procs::listening_pid);
        Target {
            worker,
            broker_pid: pid(nats),
            redis_pid: pid(redis),
            nats: nats.to_string(),
            redis: redis.to_string(),
            max_inflight,
        }
    }
}

/// The signing keys of a stage's `default` profile.
#[derive(Clone)]
pub enum Keys {
    /// This many Ed25519 file keys, made for the stage.
    Files(usize),
    /// One keyless key: certificates from this Fulcio (one per certificate window).
    Keyless {
        fulcio_url: String,
        token_file: PathBuf,
        roots: PathBuf,
    },
}

pub(crate) struct Names {
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
    blobs: String,
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
            blobs: format!("{up}_BLOBS"),
        }
    }

    async fn cleanup(&self, js: &jetstream::Context) {
        for s in [&self.req, &self.res, &self.aud] {
            let _ = js.delete_stream(s).await;
        }
        for bucket in [&self.keys, &self.idem_bucket, &self.dpop_bucket] {
            let _ = js.delete_stream(format!("KV_{bucket}")).await;
        }
        let _ = js.delete_stream(format!("OBJ_{}", self.blobs)).await;
    }
}

/// Publishes jobs `from..to` with pipelined acknowledgements (4,096 outstanding).
async fn publish_jobs(
    js: &jetstream::Context,
    subject: &str,
    from: usize,
    to: usize,
    identity: &Identity,
    payload: &Payload,
) -> Result<(), ToolError> {
    let mut pending = std::collections::VecDeque::new();
    for i in from..to {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", format!("b-{i}").as_str());
        let ack = js
            .publish_with_headers(
                subject.to_string(),
                headers,
                request(i, &identity(i), payload).into(),
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

/// Waits until `stream` holds `n` messages; the instant it was seen.
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
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits for the first message in `stream`; the instant it was seen and how many there were.
async fn first_results(
    js: &jetstream::Context,
    stream: &str,
    timeout: Duration,
) -> Result<(Instant, u64), ToolError> {
    let mut s = js.get_stream(stream).await.map_err(bench_err)?;
    let deadline = Instant::now() + timeout;
    loop {
        let have = s.info().await.map_err(bench_err)?.state.messages;
        if have > 0 {
            return Ok((Instant::now(), have));
        }
        if Instant::now() > deadline {
            return Err(ToolError::Unusable(format!("no result within {timeout:?}")));
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// CPU seconds of the worker processes, the broker, Redis and the machine, read together.
#[derive(Clone, Copy, Default)]
struct CpuSnapshot {
    worker: f64,
    broker: Option<f64>,
    redis: Option<f64>,
    machine_busy: f64,
    machine_total: f64,
}

impl CpuSnapshot {
    fn take(workers: &[u32], broker: Option<u32>, redis: Option<u32>) -> CpuSnapshot {
        let (machine_busy, machine_total) = procs::machine_cpu().unwrap_or_default();
        CpuSnapshot {
            worker: workers.iter().filter_map(|p| procs::cpu_seconds(*p)).sum(),
            broker: broker.and_then(procs::cpu_seconds),
            redis: redis.and_then(procs::cpu_seconds),
            machine_busy,
            machine_total,
        }
    }
}

/// CPU spent per job between two snapshots, in µs.
#[derive(Debug, Clone, Copy, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CpuPerJob {
    pub worker_us: f64,
    pub broker_us: Option<f64>,
    pub redis_us: Option<f64>,
    /// Everything else the machine ran meanwhile (the bench itself, other processes).
    pub other_us: f64,
    /// Busy share of the machine's cores during the measurement (1.0 = every core busy).
    pub machine_busy: f64,
}

impl CpuPerJob {
    fn between(a: &CpuSnapshot, b: &CpuSnapshot, jobs: usize) -> CpuPerJob {
        let per = |x: f64| x / jobs.max(1) as f64 * 1e6;
        let worker = b.worker - a.worker;
        let broker = a.broker.zip(b.broker).map(|(x, y)| y - x);
        let redis = a.redis.zip(b.redis).map(|(x, y)| y - x);
        let busy = b.machine_busy - a.machine_busy;
        let other = (busy - worker - broker.unwrap_or(0.0) - redis.unwrap_or(0.0)).max(0.0);
        let total = b.machine_total - a.machine_total;
        CpuPerJob {
            worker_us: per(worker),
            broker_us: broker.map(per),
            redis_us: redis.map(per),
            other_us: per(other),
            machine_busy: if total > 0.0 { busy / total } else { 0.0 },
        }
    }
}

/// What a backlog drain measured.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Drain {
    pub jobs: usize,
    pub replicas: usize,
    pub statement_bytes: usize,
    pub jobs_per_sec: f64,
    pub mb_per_sec: f64,
    pub publish_per_sec: f64,
    pub cpu: CpuPerJob,
    /// Worker CPU seconds per 1,000 jobs (all replicas).
    pub worker_cpu_per_1000: f64,
    /// Largest `VmHWM` of a worker process.
    pub peak_rss_bytes: u64,
    /// Bytes of one result message (the no-op ceiling stores results of this size).
    pub result_bytes: usize,
}

/// What an open-loop run measured. Latency from publish to the result; jobs whose result
/// did not arrive within the grace period count as slower than every other.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OpenLoop {
    pub rate: u64,
    pub seconds: f64,
    pub offered: usize,
    pub results: usize,
    pub p50_ms: Option<f64>,
    pub p90_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub max_ms: Option<f64>,
}

/// Percentile `p` of `total` latencies of which the `sorted` ones finished (the others count
/// as unbounded: `None` when the percentile falls among them).
fn percentile(sorted: &[f64], total: usize, p: f64) -> Option<f64> {
    if total == 0 {
        return None;
    }
    let idx = ((total as f64 - 1.0) * p).round() as usize;
    sorted.get(idx).copied()
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

/// One measurement's own streams, buckets, prefixes, keys, configuration and workers.
pub struct Stage {
    target: Target,
    names: Names,
    dir: tempfile::TempDir,
    config: PathBuf,
    client: async_nats::Client,
    js: jetstream::Context,
    gates: Gates,
    workers: Vec<Worker>,
}

impl Stage {
    /// Writes the configuration, and runs a first worker until it has provisioned the
    /// streams and the consumer (so that jobs can wait before the measured workers start).
    pub async fn prepare(
        target: &Target,
        gates: &Gates,
        keys: &Keys,
        tag: &str,
    ) -> Result<Stage, ToolError> {
        let client = async_nats::connect(target.nats.as_str())
            .await
            .map_err(bench_err)?;
        let js = jetstream::new(client.clone());
        let dir = tempfile::tempdir().map_err(bench_err)?;
        let names = Names::new(tag);
        let keys_toml = keys_config(keys, dir.path())?;
        let toml = format!(
            r#"[nats]
url = "{nats}"
subject_prefix = "{prefix}"
requests_stream = "{req}"
results_stream = "{res}"
audit_stream = "{aud}"
keys_bucket = "{keys}"
blobs_bucket = "{blobs}"
consumer = "{consumer}"
ack_wait = "120s"
[worker]
max_inflight = {inflight}
[redis]
url = "{redis}"
[idempotency]
redis_prefix = "{idem}"
bucket = "{idem_bucket}"
[http]
listen = ""
{keys_toml}
{gates}
"#,
            nats = target.nats,
            prefix = names.prefix,
            req = names.req,
            res = names.res,
            aud = names.aud,
            keys = names.keys,
            blobs = names.blobs,
            consumer = names.consumer,
            inflight = target.max_inflight,
            redis = target.redis,
            idem = names.idem,
            idem_bucket = names.idem_bucket,
            gates = gates.config,
        );
        let config = dir.path().join("signer.toml");
        std::fs::write(&config, toml).map_err(bench_err)?;
        let mut stage = Stage {
            target: target.clone(),
            names,
            dir,
            config,
            client,
            js,
            gates: gates.clone(),
            workers: Vec::new(),
        };
        stage.start_workers(1)?;
        let deadline = Instant::now() + Duration::from_secs(60);
        while stage.js.get_stream(&stage.names.req).await.is_err()
            || stage.js.get_stream(&stage.names.res).await.is_err()
            || stage
                .js
                .get_stream(&stage.names.req)
                .await
                .map_err(bench_err)?
                .consumer_info(&stage.names.consumer)
                .await
                .is_err()
        {
            if Instant::now() > deadline || stage.workers_exited() {
                return Err(ToolError::Unusable(format!(
                    "the worker did not start:\n{}",
                    stage.log()
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        stage.workers.clear();
        // The server keeps the stopped worker's pull requests until they expire and would
        // deliver jobs to them, to be redelivered only after `ack_wait`: the consumer goes
        // with them, and the next worker creates it again (jobs wait in the stream).
        stage
            .js
            .get_stream(&stage.names.req)
            .await
            .map_err(bench_err)?
            .delete_consumer(&stage.names.consumer)
            .await
            .map_err(bench_err)?;
        Ok(stage)
    }

    fn log(&self) -> String {
        (0..4)
            .filter_map(|i| {
                std::fs::read_to_string(self.dir.path().join(format!("worker-{i}.log"))).ok()
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Messages in the stage's streams and the consumer's counts, for error messages.
    async fn state(&self) -> String {
        let mut out = String::new();
        for name in [&self.names.req, &self.names.res, &self.names.aud] {
            if let Ok(mut s) = self.js.get_stream(name).await
                && let Ok(info) = s.info().await
            {
                out.push_str(&format!("{name}: {} messages; ", info.state.messages));
            }
        }
        if let Ok(s) = self.js.get_stream(&self.names.res).await
            && let Ok(m) = s.get_raw_message(s.cached_info().state.last_sequence).await
        {
            let text = String::from_utf8_lossy(&m.payload);
            out.push_str(&format!("last result on {}: {:.300}; ", m.subject, text));
        }
        if let Ok(s) = self.js.get_stream(&self.names.req).await
            && let Ok(mut c) = s
                .get_consumer::<consumer::pull::Config>(&self.names.consumer)
                .await
            && let Ok(info) = c.info().await
        {
            out.push_str(&format!(
                "consumer: {} pending, {} ack pending, {} redelivered, {} waiting pulls",
                info.num_pending, info.num_ack_pending, info.num_redelivered, info.num_waiting
            ));
        }
        out
    }

    fn workers_exited(&mut self) -> bool {
        self.workers
            .iter_mut()
            .any(|w| w.child.try_wait().ok().flatten().is_some())
    }

    /// Starts `n` worker processes on the stage's consumer; the run's DPoP bucket comes
    /// from the environment because the gates' `[gates.entitlement]` table belongs to the
    /// variant's configuration.
    fn start_workers(&mut self, n: usize) -> Result<(), ToolError> {
        for i in 0..n {
            let log = std::fs::File::create(self.dir.path().join(format!("worker-{i}.log")))
                .map_err(bench_err)?;
            let child = Command::new(&self.target.worker)
                .args(["serve", "--config"])
                .arg(&self.config)
                .env("SIGNER_LOG", "warn")
                .env(
                    "SIGNER_GATES__ENTITLEMENT__DPOP_REPLAY_BUCKET",
                    &self.names.dpop_bucket,
                )
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .map_err(|e| {
                    ToolError::Unusable(format!("{}: {e}", self.target.worker.display()))
                })?;
            self.workers.push(Worker { child });
        }
        Ok(())
    }

    fn requests_subject(&self) -> String {
        format!("{}sign.requests.acme", self.names.prefix)
    }

    /// Uploads `bytes` to the stage's blob bucket; the reference jobs carry.
    pub async fn upload(&self, bytes: &[u8]) -> Result<ObjectRef, ToolError> {
        let store =
            stella_signer::blobs::open(&self.js, &self.names.blobs, Duration::from_secs(3600))
                .await
                .map_err(bench_err)?;
        let name = "requests/acme/bench/payload";
        stella_signer::blobs::put(&store, name, bytes)
            .await
            .map_err(bench_err)?;
        Ok(ObjectRef::of(&self.names.blobs, name, bytes))
    }

    /// Publishes `jobs` jobs (pipelined), then starts `replicas` workers and samples their
    /// peak RSS: (publish rate, worker pids, peak RSS so far, the sampler to abort).
    async fn backlog_then_workers(
        &mut self,
        jobs: usize,
        replicas: usize,
        payload: &Payload,
    ) -> Result<(f64, Vec<u32>, Arc<AtomicU64>, tokio::task::JoinHandle<()>), ToolError> {
        let t = Instant::now();
        publish_jobs(
            &self.js,
            &self.requests_subject(),
            0,
            jobs,
            &self.gates.identity,
            payload,
        )
        .await?;
        let publish_per_sec = jobs as f64 / t.elapsed().as_secs_f64();
        self.start_workers(replicas)?;
        let pids: Vec<u32> = self.workers.iter().map(|w| w.child.id()).collect();
        let (peak, sampler) = sample_peak_rss(pids.clone());
        Ok((publish_per_sec, pids, peak, sampler))
    }

    /// Backlog drain: `jobs` jobs wait in the stream, then `replicas` workers start; jobs/s
    /// until the last result, CPU per job of the workers, broker and Redis, peak RSS.
    pub async fn drain(
        &mut self,
        jobs: usize,
        replicas: usize,
        payload: &Payload,
    ) -> Result<Drain, ToolError> {
        let (publish_per_sec, pids, peak, sampler) =
            self.backlog_then_workers(jobs, replicas, payload).await?;
        let launched = Instant::now();
        let at_launch = CpuSnapshot::take(&pids, self.target.broker_pid, self.target.redis_pid);
        // measured from the first result on: the workers' start (process, keys, connections)
        // is not throughput; unless the first results are already a tenth of a small run
        // (its jobs all in flight at once), which is then timed from the workers' start
        let (mut started, mut first) =
            first_results(&self.js, &self.names.res, Duration::from_secs(120))
                .await
                .map_err(|e| ToolError::Unusable(format!("{e}\n{}", self.log())))?;
        let mut before = CpuSnapshot::take(&pids, self.target.broker_pid, self.target.redis_pid);
        if first as usize * 10 > jobs || jobs <= 2 * self.target.max_inflight {
            (started, first, before) = (launched, 0, at_launch);
        }
        let done = wait_results(
            &self.js,
            &self.names.res,
            jobs as u64,
            Duration::from_secs(1800),
        )
        .await;
        let after = CpuSnapshot::take(&pids, self.target.broker_pid, self.target.redis_pid);
        let hwm = pids.iter().filter_map(|p| procs::peak_rss(*p)).max();
        sampler.abort();
        let done = done.map_err(|e| ToolError::Unusable(format!("{e}\n{}", self.log())))?;
        self.workers.clear();
        let measured = jobs.saturating_sub(first as usize).max(1);
        let secs = done.duration_since(started).as_secs_f64();
        let jobs_per_sec = measured as f64 / secs;
        let result_bytes = self.check_results().await?;
        let cpu = CpuPerJob::between(&before, &after, measured);
        Ok(Drain {
            jobs,
            replicas,
            statement_bytes: payload.bytes(),
            jobs_per_sec,
            mb_per_sec: jobs_per_sec * payload.bytes() as f64 / 1e6,
            publish_per_sec,
            worker_cpu_per_1000: cpu.worker_us / 1000.0,
            cpu,
            peak_rss_bytes: peak.load(Ordering::Relaxed).max(hwm.unwrap_or(0)),
            result_bytes,
        })
    }

    /// Fails when the worker refused a job; else the size of a result message.
    async fn check_results(&self) -> Result<usize, ToolError> {
        let results = self
            .js
            .get_stream(&self.names.res)
            .await
            .map_err(bench_err)?;
        if let Ok(f) = results
            .get_last_raw_message_by_subject(&format!("{}sign.failed", self.names.prefix))
            .await
        {
            return Err(ToolError::Invalid(format!(
                "the worker refused jobs: {}",
                String::from_utf8_lossy(&f.payload)
            )));
        }
        Ok(results
            .get_last_raw_message_by_subject(&format!("{}sign.completed", self.names.prefix))
            .await
            .map(|m| m.payload.len())
            .unwrap_or(3000))
    }

    /// Peak RSS with a backlog waiting: `jobs` small jobs are published (pipelined), then
    /// one worker starts and its `VmHWM` is sampled while it drains for at most `limit`.
    /// Returns (peak RSS bytes, jobs done meanwhile).
    pub async fn backlog_rss(
        &mut self,
        jobs: usize,
        limit: Duration,
        payload: &Payload,
    ) -> Result<(u64, u64), ToolError> {
        let (_, pids, peak, sampler) = self.backlog_then_workers(jobs, 1, payload).await?;
        let done = wait_results(&self.js, &self.names.res, jobs as u64, limit).await;
        let hwm = pids.iter().filter_map(|p| procs::peak_rss(*p)).max();
        sampler.abort();
        self.workers.clear();
        self.check_results().await?;
        let finished = match done {
            Ok(_) => jobs as u64,
            Err(_) => {
                let mut s = self
                    .js
                    .get_stream(&self.names.res)
                    .await
                    .map_err(bench_err)?;
                s.info().await.map_err(bench_err)?.state.messages
            }
        };
        Ok((peak.load(Ordering::Relaxed).max(hwm.unwrap_or(0)), finished))
    }

    /// Open loop: `rate` jobs/s offered for `duration` to one running worker; latency from
    /// publish to the result on `sign.completed`, waiting `grace` after the last publish.
    pub async fn open_loop(
        &mut self,
        rate: u64,
        duration: Duration,
        grace: Duration,
        payload: &Payload,
    ) -> Result<OpenLoop, ToolError> {
        self.start_workers(1)?;
        let mut subs = self
            .client
            .subscribe(format!("{}sign.completed", self.names.prefix))
            .await
            .map_err(bench_err)?;
        // the worker is up once its consumer is being pulled from: a warm-up job
        let warm = Payload::Inline(payload.bytes());
        publish_jobs(
            &self.js,
            &self.requests_subject(),
            0,
            1,
            &self.gates.identity,
            &warm,
        )
        .await?;
        if let Err(e) = wait_results(&self.js, &self.names.res, 1, Duration::from_secs(60)).await {
            return Err(ToolError::Unusable(format!(
                "warm-up job: {e} ({})\n{}",
                self.state().await,
                self.log()
            )));
        }
        self.check_results().await?;
        let _ = tokio::time::timeout(Duration::from_secs(5), subs.next()).await;
        let total = (rate as f64 * duration.as_secs_f64()) as usize;
        let base = 1;
        let sent_at: Arc<Vec<std::sync::OnceLock<Instant>>> =
            Arc::new((0..total).map(|_| std::sync::OnceLock::new()).collect());
        let end = Instant::now() + duration + grace;
        let collector = {
            let sent_at = sent_at.clone();
            tokio::spawn(async move {
                let mut lat = Vec::with_capacity(total);
                while lat.len() < total {
                    let left = end.saturating_duration_since(Instant::now());
                    let Ok(Some(msg)) = tokio::time::timeout(left, subs.next()).await else {
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
        let interval = Duration::from_secs_f64(1.0 / rate.max(1) as f64);
        let start = Instant::now();
        let mut acks = std::collections::VecDeque::new();
        let subject = self.requests_subject();
        for k in 0..total {
            let due = start + interval.mul_f64(k as f64);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                tokio::time::sleep(wait).await;
            }
            let i = base + k;
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Nats-Msg-Id", format!("b-{i}").as_str());
            let body = request(i, &(self.gates.identity)(i), payload);
            let _ = sent_at[k].set(Instant::now());
            acks.push_back(
                self.js
                    .publish_with_headers(subject.clone(), headers, body.into())
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
        self.workers.clear();
        lat.sort_by(|a, b| a.total_cmp(b));
        Ok(OpenLoop {
            rate,
            seconds: duration.as_secs_f64(),
            offered: total,
            results: lat.len(),
            p50_ms: percentile(&lat, total, 0.5),
            p90_ms: percentile(&lat, total, 0.9),
            p99_ms: percentile(&lat, total, 0.99),
            max_ms: (lat.len() == total).then(|| lat.last().copied()).flatten(),
        })
    }

    /// Stops the workers and deletes the stage's streams and buckets.
    pub async fn cleanup(mut self) {
        self.workers.clear();
        self.names.cleanup(&self.js).await;
    }
}

/// Samples the largest `VmHWM` of `pids` every 100 ms until the task is aborted.
fn sample_peak_rss(pids: Vec<u32>) -> (Arc<AtomicU64>, tokio::task::JoinHandle<()>) {
    let peak = Arc::new(AtomicU64::new(0));
    let task = {
        let peak = peak.clone();
        tokio::spawn(async move {
            loop {
                for p in &pids {
                    if let Some(hwm) = procs::peak_rss(*p) {
                        peak.fetch_max(hwm, Ordering::Relaxed);
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    (peak, task)
}

/// The `[[keys]]` tables and the `default` profile of `keys` (file keys made in `dir`).
fn keys_config(keys: &Keys, dir: &Path) -> Result<String, ToolError> {
    match keys {
        Keys::Files(n) => {
            let mut toml = String::new();
            let mut names = Vec::new();
            for k in 0..*n {
                let name = format!("bench{k}");
                let key = FileKey::generate(signer_actors::keys::KeyAlgorithm::Ed25519, dir, &name)
                    .map_err(bench_err)?;
                toml.push_str(&format!(
                    "[[keys]]\nname = \"{name}\"\nsource = \"file\"\npath = \"{}\"\n",
                    key.private_key.display()
                ));
                names.push(format!("\"{name}\""));
            }
            toml.push_str(&format!(
                "[profiles.default]\nkeys = [{}]\n",
                names.join(", ")
            ));
            Ok(toml)
        }
        Keys::Keyless {
            fulcio_url,
            token_file,
            roots,
        } => Ok(format!(
            "[[keys]]\nname = \"keyless\"\nsource = \"fulcio\"\nfulcio_url = \"{fulcio_url}\"\n\
             identity_token_file = \"{}\"\nfulcio_roots = \"{}\"\n\
             [profiles.default]\nkeys = [\"keyless\"]\n",
            token_file.display(),
            roots.display()
        )),
    }
}

/// Ceiling (a): raw Ed25519 signatures/s of a fresh file key over the PAE of a statement of
/// `bytes` bytes, best of 3 rounds of `iterations`.
pub fn raw_sign_rate(bytes: usize, iterations: usize) -> Result<f64, ToolError> {
    let dir = tempfile::tempdir().map_err(bench_err)?;
    let key = FileKey::generate(
        signer_actors::keys::KeyAlgorithm::Ed25519,
        dir.path(),
        "raw",
    )
    .map_err(bench_err)?;
    let signer = FileKey::load(&key.private_key, "raw").map_err(bench_err)?;
    let pae = signer_actors::dsse::pae(
        signer_actors::statement::INTOTO_PAYLOAD_TYPE,
        &serde_json::to_vec(&workload::statement(0, bytes)).map_err(bench_err)?,
    );
    Ok(super::ops_per_sec(3, iterations, || {
        let _ = signer.sign_now(&pae);
    }))
}

/// What the no-op round trip measured.
#[derive(Debug, Clone, Copy, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Noop {
    pub jobs_per_sec: f64,
    /// Broker CPU per job (one request stored, delivered, acked; one result stored).
    pub broker_us: Option<f64>,
}

/// Ceiling (b): the same JetStream round trip with a worker that does nothing but store a
/// result of `result_bytes` and ack, `max_inflight` at a time.
pub async fn noop_ceiling(
    target: &Target,
    n: usize,
    result_bytes: usize,
    identity: &Identity,
) -> Result<Noop, ToolError> {
    let client = async_nats::connect(target.nats.as_str())
        .await
        .map_err(bench_err)?;
    let js = jetstream::new(client);
    let max_inflight = target.max_inflight;
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
        &js,
        &format!("{}sign.requests", names.prefix),
        0,
        n,
        identity,
        &Payload::Inline(1024),
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
    let broker0 = target.broker_pid.and_then(procs::cpu_seconds);
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
    let done = wait_results(&js, &names.res, n as u64, Duration::from_secs(600)).await;
    let broker1 = target.broker_pid.and_then(procs::cpu_seconds);
    worker.abort();
    names.cleanup(&js).await;
    let done = done?;
    Ok(Noop {
        jobs_per_sec: n as f64 / done.duration_since(started).as_secs_f64(),
        broker_us: broker0
            .zip(broker1)
            .map(|(a, b)| (b - a) / n.max(1) as f64 * 1e6),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unfinished_jobs_count_as_slower_than_every_other() {
        let done = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(percentile(&done, 4, 0.5), Some(3.0));
        assert_eq!(percentile(&done, 4, 0.99), Some(4.0));
        // 100 offered, 4 finished: the median is among the unfinished
        assert_eq!(percentile(&done, 100, 0.5), None);
        assert_eq!(percentile(&done, 100, 0.01), Some(2.0));
        assert_eq!(percentile(&[], 0, 0.5), None);
    }

    #[test]
    fn cpu_per_job_splits_the_machine_time() {
        let a = CpuSnapshot {
            worker: 1.0,
            broker: Some(2.0),
            redis: Some(3.0),
            machine_busy: 10.0,
            machine_total: 20.0,
        };
        let b = CpuSnapshot {
            worker: 2.0,
            broker: Some(2.5),
            redis: Some(3.25),
            machine_busy: 12.0,
            machine_total: 24.0,
        };
        let c = CpuPerJob::between(&a, &b, 10_000);
        assert!((c.worker_us - 100.0).abs() < 1e-9);
        assert_eq!(c.broker_us.map(|x| x.round()), Some(50.0));
        assert_eq!(c.redis_us.map(|x| x.round()), Some(25.0));
        assert!((c.other_us - 25.0).abs() < 1e-9);
        assert!((c.machine_busy - 0.5).abs() < 1e-9);
    }
}
