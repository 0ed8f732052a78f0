//! The alert rules and the dashboard in compose/: `promtool` checks the rules and runs their
//! unit tests, and a live test makes two alerts fire on Debian's `prometheus` scraping real
//! workers, then runs every dashboard panel's query against that Prometheus.
//!
//! Needs `promtool` and `prometheus` (Debian's `prometheus` package; scripts/bootstrap.sh
//! installs it). Without them these tests fail, saying so.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::stack::{Stack, disabled_gates, request};
use serde_json::Value;
use stella_signer::config::{GateMode, GatesConfig, KeyConfig, Plan};
use stella_signer::keys::factory::ConfiguredKeys;

fn compose() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("compose")
}

/// The files of `dir` ending in `.yml`, sorted.
fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no .yml in {}", dir.display());
    files
}

/// `tool` from Debian's `prometheus` package, or a failure that says how to get it.
fn prometheus_tool(tool: &str) -> Command {
    if Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_err()
    {
        panic!(
            "`{tool}` is not installed: install Debian's `prometheus` package (scripts/bootstrap.sh does)"
        );
    }
    Command::new(tool)
}

/// Runs `cmd`, failing the test with its output unless it succeeds.
fn run_ok(mut cmd: Command) -> String {
    let out = cmd.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?} failed:\n{text}");
    text
}

/// The names of the alerts in the rule files.
fn alert_names(rules: &[PathBuf]) -> Vec<String> {
    rules
        .iter()
        .flat_map(|f| {
            std::fs::read_to_string(f)
                .unwrap()
                .lines()
                .filter_map(|l| {
                    l.trim()
                        .strip_prefix("- alert:")
                        .map(|n| n.trim().to_string())
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

#[test]
fn rules_pass_promtool_and_every_alert_has_a_firing_unit_test() {
    let rules = yaml_files(&compose().join("prometheus/rules"));
    let tests = yaml_files(&compose().join("prometheus/tests"));
    let mut check = prometheus_tool("promtool");
    check.args(["check", "rules"]).args(&rules);
    run_ok(check);
    let mut test = prometheus_tool("promtool");
    test.args(["test", "rules"]).args(&tests);
    let out = run_ok(test);
    assert!(out.contains("SUCCESS"), "{out}");

    // every alert has an evaluation that expects it to fire (exp_labels) and one that
    // expects it quiet (exp_alerts: [])
    let text: String = tests
        .iter()
        .map(|f| std::fs::read_to_string(f).unwrap())
        .collect();
    let evals: Vec<&str> = text.split("- eval_time:").skip(1).collect();
    let names = alert_names(&rules);
    assert!(names.len() >= 9, "{names:?}");
    for name in &names {
        let mine: Vec<&&str> = evals
            .iter()
            .filter(|e| e.contains(&format!("alertname: {name}\n")))
            .collect();
        assert!(
            mine.iter().any(|e| e.contains("exp_labels")),
            "no unit test makes {name} fire"
        );
        assert!(
            mine.iter().any(|e| e.contains("exp_alerts: []")),
            "no unit test keeps {name} quiet"
        );
    }
}

#[test]
fn the_compose_files_are_valid_for_prometheus_and_the_signer() {
    // prometheus.yml and the rule files it names
    let mut check = prometheus_tool("promtool");
    check
        .args(["check", "config"])
        .arg(compose().join("prometheus/prometheus.yml"));
    let out = run_ok(check);
    assert!(out.contains("1 rule files found"), "{out}");
    // the replicas' signer.toml, with a real key where the `keys` service writes one
    let dir = tempfile::tempdir().unwrap();
    let key = stella_signer::keys::file::FileKey::generate(
        signer_actors::keys::KeyAlgorithm::EcdsaP256Sha256,
        dir.path(),
        "release",
    )
    .unwrap();
    let text = std::fs::read_to_string(compose().join("signer/signer.toml")).unwrap();
    let mut cfg = stella_signer::config::Config::from_toml(&text, std::iter::empty()).unwrap();
    let release = cfg.keys.iter_mut().find_map(|k| match k {
        KeyConfig::File(k) if k.path == Path::new("/keys/release.key") => Some(k),
        _ => None,
    });
    release.expect("the keys service's release key").path = key.private_key.clone();
    ConfiguredKeys::new(cfg.keys).check().unwrap();
    // the dashboard is Grafana JSON naming the provisioned datasource
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(compose().join("grafana/dashboards/signer.json")).unwrap(),
    )
    .unwrap();
    let datasources =
        std::fs::read_to_string(compose().join("grafana/provisioning/datasources/prometheus.yml"))
            .unwrap();
    for panel in dashboard["panels"].as_array().unwrap() {
        let uid = panel["datasource"]["uid"].as_str().unwrap();
        assert!(datasources.contains(&format!("uid: {uid}\n")), "{panel}");
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// GET over plain TCP; returns (status code, body).
fn get(port: u16, path: &str) -> Option<(u16, String)> {
    use std::io::{Read as _, Write as _};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    Some((
        status,
        text.split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default(),
    ))
}

fn wait_ready(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if get(port, "/readyz").is_some_and(|(s, _)| s == 200) {
            return;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!("the worker on port {port} never became ready");
}

/// Percent-encodes a query parameter.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A `prometheus` process of this test, killed when dropped.
struct Prometheus {
    child: Child,
    port: u16,
    log: PathBuf,
    http: reqwest::Client,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    /// Starts Prometheus on a free port with its own storage under `dir`, scraping
    /// `targets` every second as job `signer` and evaluating `rules` every second.
    fn start(dir: &Path, rules: &Path, targets: &[u16]) -> Prometheus {
        let port = free_port();
        let targets: Vec<String> = targets.iter().map(|p| format!("'127.0.0.1:{p}'")).collect();
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - '{}'\nscrape_configs:\n  - job_name: signer\n    scrape_timeout: 900ms\n    static_configs:\n      - targets: [{}]\n",
                rules.display(),
                targets.join(", ")
            ),
        )
        .unwrap();
        let log = dir.join("prometheus.log");
        let child = prometheus_tool("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("tsdb").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Prometheus {
            child,
            port,
            log,
            http: reqwest::Client::new(),
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    async fn api(&self, path: &str) -> Option<Value> {
        let url = format!("http://127.0.0.1:{}{path}", self.port);
        let v: Value = self.http.get(url).send().await.ok()?.json().await.ok()?;
        (v["status"] == "success").then(|| v["data"].clone())
    }

    /// The result of an instant query.
    async fn query(&self, expr: &str) -> Vec<Value> {
        self.api(&format!("/api/v1/query?query={}", encode(expr)))
            .await
            .and_then(|d| d["result"].as_array().cloned())
            .unwrap_or_default()
    }

    /// Whether `/api/v1/alerts` shows `name` firing.
    async fn firing(&self, name: &str) -> bool {
        self.api("/api/v1/alerts").await.is_some_and(|d| {
            d["alerts"].as_array().is_some_and(|a| {
                a.iter()
                    .any(|x| x["labels"]["alertname"] == name && x["state"] == "firing")
            })
        })
    }

    async fn alerting_rules(&self) -> usize {
        self.api("/api/v1/rules?type=alert").await.map_or(0, |d| {
            d["groups"].as_array().map_or(0, |g| {
                g.iter()
                    .map(|g| g["rules"].as_array().map_or(0, Vec::len))
                    .sum()
            })
        })
    }
}

/// The shipped rules with the waiting shortened for a test: every `for:` becomes 5 s and
/// SignerBacklogOld's 300 s threshold 15 s. Each replacement must hit, so a change to the
/// rules that this test no longer covers fails here.
fn test_rules(dir: &Path) -> (PathBuf, usize) {
    let source = compose().join("prometheus/rules/signer.yml");
    let text = std::fs::read_to_string(&source).unwrap();
    let backlog = "max(signer_backlog_oldest_age_seconds{job=\"signer\"}) > 300";
    assert_eq!(text.matches(backlog).count(), 1, "SignerBacklogOld changed");
    let mut fors = 0;
    let out: Vec<String> = text
        .replace(
            backlog,
            "max(signer_backlog_oldest_age_seconds{job=\"signer\"}) > 15",
        )
        .lines()
        .map(|l| match l.trim_start().strip_prefix("for: ") {
            Some(_) => {
                fors += 1;
                format!("{}for: 5s", &l[..l.len() - l.trim_start().len()])
            }
            None => l.to_string(),
        })
        .collect();
    let names = alert_names(&[source]);
    assert_eq!(fors, names.len(), "every alert has a `for:`");
    let path = dir.join("signer-test-rules.yml");
    std::fs::write(&path, out.join("\n")).unwrap();
    (path, names.len())
}

/// Gates for this test: entitlement off (its plan is `unverified`), quota enforced with a
/// small bucket so that a burst is refused in part, provenance off.
fn gates() -> GatesConfig {
    let mut gates = disabled_gates();
    gates.quota.mode = GateMode::Enforce;
    gates.quota.plans.insert(
        "unverified".into(),
        Plan {
            requests_per_second: 5.0,
            burst: 4,
            max_concurrent: 64,
            max_payload_bytes: 1048576,
            daily_cap: 0,
            max_signatures_per_request: None,
        },
    );
    gates
}

/// Gives the stack's `ec` key a self-signed certificate valid 30 days, so the certificate
/// expiry gauge has a series.
fn certify_ec_key(stack: &Stack) {
    let chain = stack.dir.path().join("ec-chain.pem");
    stack.configure(|c| {
        let ec = c.keys.iter_mut().find_map(|k| match k {
            KeyConfig::File(k) if k.name == "ec" => Some(k),
            _ => None,
        });
        let ec = ec.expect("the stack's ec key");
        let mut openssl = Command::new("openssl");
        openssl
            .args(["req", "-x509", "-subj", "/CN=ec", "-days", "30", "-key"])
            .arg(&ec.path)
            .arg("-out")
            .arg(&chain);
        run_ok(openssl);
        ec.certificate_chain = Some(chain.clone());
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failure_spike_and_backlog_age_fire_and_every_dashboard_panel_has_a_series() {
    let mut stack = Stack::with_gates("al", gates());
    // A stopped replica holds its jobs until AckWait: long enough for the backlog to age.
    stack.configure(|c| c.nats.ack_wait = Duration::from_secs(180));
    certify_ec_key(&stack);
    let (ports, prom_dir) = ([free_port(), free_port()], tempfile::tempdir().unwrap());
    let (rules, alert_count) = test_rules(prom_dir.path());
    let prometheus = Prometheus::start(prom_dir.path(), &rules, &ports);
    let listen = |p: u16| format!("127.0.0.1:{p}");
    stack.spawn_worker_env(&[("SIGNER_HTTP__LISTEN", &listen(ports[0]))]);
    wait_ready(ports[0]);
    let (_c, js) = stack.connect().await;
    stack.wait_provisioned(&js).await;

    // Prometheus runs with every shipped alert
    let deadline = Instant::now() + Duration::from_secs(60);
    while prometheus.alerting_rules().await != alert_count {
        assert!(
            Instant::now() < deadline,
            "Prometheus did not load {alert_count} alerts; log:\n{}",
            prometheus.log()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // Prometheus has scraped the replica's counters at 0 (exported from the start, so that
    // the burst below is an increase)
    let deadline = Instant::now() + Duration::from_secs(60);
    while prometheus
        .query("signer_jobs_total{job=\"signer\",outcome=\"failed\",code=\"invalid_request\"} == 0")
        .await
        .is_empty()
    {
        assert!(
            Instant::now() < deadline,
            "no scrape of the replica; log:\n{}",
            prometheus.log()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // 1. A burst of refused jobs, among some that sign (partly over quota).
    let mut sent = 0;
    for i in 0..30 {
        let id = format!("al-bad-{i}");
        let mut bad = request(&id, "acme", None);
        bad["scanner"]["imageDigest"] = "sha256:nothex".into();
        stack
            .publish(
                &js,
                "sign.requests",
                &[("Nats-Msg-Id", &id)],
                serde_json::to_vec(&bad).unwrap(),
            )
            .await;
        sent += 1;
    }
    for i in 0..12 {
        let id = format!("al-ok-{i}");
        let body = serde_json::to_vec(&request(&id, "acme", Some("multi"))).unwrap();
        stack
            .publish(&js, "sign.requests", &[("Nats-Msg-Id", &id)], body)
            .await;
        sent += 1;
    }
    let results = stack
        .results(&js, sent, Duration::from_secs(90), Duration::ZERO)
        .await;
    assert_eq!(results.len(), sent, "{}", stack.log(0));
    assert!(results.iter().any(|r| r.completed()));
    assert_eq!(
        results
            .iter()
            .filter(|r| r.code() == "invalid_request")
            .count(),
        30
    );
    wait_firing(&prometheus, "SignerFailureSpike", Duration::from_secs(120)).await;

    // 2. The replica stops (SIGSTOP) while jobs arrive: the broker hands them to its open
    // pull request, and nobody settles them until their AckWait ends.
    stack.signal(0, "STOP");
    tokio::time::sleep(Duration::from_millis(300)).await;
    for i in 0..10 {
        let id = format!("al-held-{i}");
        let body = serde_json::to_vec(&request(&id, "acme", None)).unwrap();
        stack
            .publish(&js, "sign.requests", &[("Nats-Msg-Id", &id)], body)
            .await;
    }
    let stream = js.get_stream(stack.stream("REQ")).await.unwrap();
    let deadline = Instant::now() + common::stack::MIN_WAIT;
    loop {
        let info = stream.consumer_info(&stack.id).await.unwrap();
        if info.num_pending == 0 && info.num_ack_pending >= 10 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the stopped replica did not take the jobs: {info:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // A second replica reports the backlog and signs what keeps arriving.
    stack.spawn_worker_env(&[("SIGNER_HTTP__LISTEN", &listen(ports[1]))]);
    wait_ready(ports[1]);
    let deadline = Instant::now() + Duration::from_secs(150);
    let mut n = 0;
    while !prometheus.firing("SignerBacklogOld").await {
        assert!(
            Instant::now() < deadline,
            "SignerBacklogOld never fired; alerts: {:?}; log:\n{}",
            prometheus.api("/api/v1/alerts").await,
            stack.log(1)
        );
        let id = format!("al-more-{n}");
        n += 1;
        let body = serde_json::to_vec(&request(&id, "acme", None)).unwrap();
        stack
            .publish(&js, "sign.requests", &[("Nats-Msg-Id", &id)], body)
            .await;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let age = prometheus
        .query("max(signer_backlog_oldest_age_seconds{job=\"signer\"})")
        .await;
    assert!(value(&age[0]) > 15.0, "{age:?}");
    let held = prometheus
        .query("max(signer_backlog_ack_pending_messages{job=\"signer\"})")
        .await;
    assert!(value(&held[0]) >= 10.0, "{held:?}");

    // 3. Both replicas back: every dashboard panel's query has a series.
    stack.signal(0, "CONT");
    wait_ready(ports[0]);
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(compose().join("grafana/dashboards/signer.json")).unwrap(),
    )
    .unwrap();
    let exprs: Vec<(String, String)> = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| {
            p["targets"].as_array().unwrap().iter().map(move |t| {
                (
                    p["title"].as_str().unwrap().to_string(),
                    t["expr"].as_str().unwrap().to_string(),
                )
            })
        })
        .collect();
    assert!(exprs.len() >= 12, "{exprs:?}");
    for (title, expr) in &exprs {
        let deadline = Instant::now() + common::stack::MIN_WAIT;
        while prometheus.query(expr).await.is_empty() {
            assert!(
                Instant::now() < deadline,
                "panel {title:?}: no series for {expr}"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    // the certificate gauge says how long the chain has left: 30 days, less the test
    let left = prometheus
        .query(
            "min(signer_key_certificate_expiry_seconds{job=\"signer\",key=\"ec\",mode=\"chain\"})",
        )
        .await;
    let days = value(&left[0]) / 86400.0;
    assert!((29.9..=30.0).contains(&days), "{left:?}");
    let revoked = prometheus
        .query("max(signer_key_revoked{job=\"signer\"})")
        .await;
    assert_eq!(value(&revoked[0]), 0.0);
    drop(prometheus);
    stack.cleanup(&js).await;
}

/// The sample value of an instant-query result.
fn value(result: &Value) -> f64 {
    result["value"][1]
        .as_str()
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN)
}

async fn wait_firing(prometheus: &Prometheus, name: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while !prometheus.firing(name).await {
        assert!(
            Instant::now() < deadline,
            "{name} never fired; alerts: {:?}; targets: {:?}; jobs: {:?}",
            prometheus.api("/api/v1/alerts").await,
            prometheus.query("up").await,
            prometheus.query("signer_jobs_total").await,
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
