//! No silent zombie: a replica whose pull subscription breaks replaces it by itself, and
//! `/readyz` is not ready, and says why, while the replica cannot pull or store, then ready
//! again by itself. Through the real `serve` process.
//!
//! The NATS and Redis outages run against servers of the test's own (on free loopback
//! ports), restarted by the test; the consumer and stream cases use the machine's NATS with
//! the test's own stream names.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer, stream};
use common::registry::free_port;
use common::servers::OwnRedis;
use common::stack::{Stack, disabled_gates, request};
use stella_signer::config::{Plan, QuotaGate, RedisConfig};

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

/// How long `/readyz` is awaited: generous (a loaded machine is slow); a passing test waits
/// only as long as the worker takes.
const WAIT: Duration = Duration::from_secs(120);

/// Waits (up to [`WAIT`]) until `/readyz` answers `status` with a body containing every one
/// of `needles`; returns the body. A worker that exits fails the wait at once, with its log.
fn wait_readyz(stack: &mut Stack, port: u16, status: u16, needles: &[&str]) -> String {
    let deadline = Instant::now() + WAIT;
    let mut last = None;
    loop {
        if let Some((s, body)) = get(port, "/readyz") {
            if s == status && needles.iter().all(|n| body.contains(n)) {
                return body;
            }
            last = Some((s, body));
        }
        stack.assert_running(0, "while /readyz was awaited");
        assert!(
            Instant::now() < deadline,
            "/readyz never answered {status} with {needles:?}; last: {last:?}; log:\n{}",
            stack.log(0)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The value of an unlabelled counter in `/metrics`.
fn counter(port: u16, name: &str) -> u64 {
    let (_, text) = get(port, "/metrics").unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

/// Waits until the counter `name` reaches `want`.
fn wait_counter(port: u16, name: &str, want: u64) {
    let deadline = Instant::now() + WAIT;
    while counter(port, name) < want {
        assert!(
            Instant::now() < deadline,
            "{name} stayed at {} (want {want})",
            counter(port, name)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Points the stack's worker at `nats_url` (when given) and serves `/readyz` on `port`,
/// probing every second.
fn serve_http(stack: &Stack, port: u16, nats_url: Option<&str>) {
    stack.configure(|c| {
        c.http.listen = format!("127.0.0.1:{port}");
        c.http.probe_interval = Duration::from_secs(1);
        if let Some(url) = nats_url {
            c.nats.url = url.into();
        }
    });
}

/// Publishes job `id` and waits until its result is on the results stream; returns whether
/// it was signed.
async fn signed(stack: &Stack, js: &jetstream::Context, id: &str, expected: usize) -> bool {
    stack
        .publish(
            js,
            "sign.requests",
            &[("Nats-Msg-Id", id)],
            serde_json::to_vec(&request(id, "acme", None)).unwrap(),
        )
        .await;
    // read again until it is there: an ordered consumer may end early on a young stream
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let results = stack
            .results(js, expected, Duration::from_secs(5), Duration::ZERO)
            .await;
        if let Some(r) = results.iter().find(|r| r.body["requestId"] == id) {
            return r.completed();
        }
        if Instant::now() > deadline {
            let mut req = js.get_stream(stack.stream("REQ")).await.unwrap();
            let state = req.info().await.map(|i| i.state.clone());
            let mut c: async_nats::jetstream::consumer::PullConsumer =
                req.get_consumer(&stack.id).await.unwrap();
            let info = c.info().await.cloned();
            eprintln!(
                "{id}: no result; requests {state:?}; consumer {info:?}; worker log:\n{}",
                stack.log(0)
            );
            return false;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A `nats-server` with JetStream of this test only, on a free port, storing in its own
/// directory (kept across restarts, as a node's disk is); killed when dropped.
struct OwnNats {
    port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl OwnNats {
    fn start() -> OwnNats {
        let mut n = OwnNats {
            port: free_port(),
            dir: tempfile::tempdir().unwrap(),
            child: None,
        };
        n.spawn();
        n
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    fn spawn(&mut self) {
        let child = Command::new("nats-server")
            .args([
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-js",
                "-sd",
            ])
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server (scripts/bootstrap.sh installs it)");
        self.child = Some(child);
        let deadline = Instant::now() + common::stack::MIN_WAIT;
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "nats-server did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    async fn connect(&self) -> jetstream::Context {
        jetstream::new(async_nats::connect(self.url()).await.unwrap())
    }
}

impl Drop for OwnNats {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Deletes the durable consumer `name`. The server may report a failure to remove its files
/// (`unlinkat ...: directory not empty`, a race with its own writes) after it dropped the
/// consumer: then asks again until the consumer is gone.
async fn delete_consumer(requests: &stream::Stream, name: &str) {
    for _ in 0..20 {
        match requests.delete_consumer(name).await {
            Ok(_) => return,
            Err(e) => {
                eprintln!("deleting consumer {name}: {e}");
                if requests
                    .get_consumer::<consumer::pull::Config>(name)
                    .await
                    .is_err()
                {
                    return;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("consumer {name} could not be deleted");
}

/// The consumer `name` once it exists (the worker recreates it; the server may take a moment
/// to finish deleting the old one first).
async fn wait_consumer(requests: &stream::Stream, name: &str) -> consumer::Info {
    let deadline = Instant::now() + common::stack::MIN_WAIT;
    loop {
        if let Ok(mut c) = requests.get_consumer::<consumer::pull::Config>(name).await
            && let Ok(info) = c.info().await
        {
            return info.clone();
        }
        assert!(
            Instant::now() < deadline,
            "consumer {name} was not recreated"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn log_has(stack: &Stack, needles: &[&str]) -> bool {
    stack
        .log(0)
        .lines()
        .any(|l| needles.iter().all(|n| l.contains(n)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_whose_nats_server_restarts_is_not_ready_until_it_pulls_again_then_signs() {
    let mut nats = OwnNats::start();
    let mut stack = Stack::new("zn");
    let port = free_port();
    serve_http(&stack, port, Some(&nats.url()));
    stack.spawn_worker();
    wait_readyz(&mut stack, port, 200, &["ready"]);
    let js = nats.connect().await;
    assert!(
        signed(&stack, &js, "zn-1", 1).await,
        "signed before the outage"
    );
    drop(js);

    // the node dies: the pull subscription misses its heartbeats and is being replaced
    nats.kill();
    let body = wait_readyz(
        &mut stack,
        port,
        503,
        &[
            "NATS not connected",
            "job source broken (pull stream broken: missed idle heartbeat); reopening",
        ],
    );
    eprintln!("/readyz during the outage: {body}");
    assert!(
        body.contains(&format!("stream {} unreachable", stack.stream("RES"))),
        "the results stream's probe fails too: {body}"
    );
    assert!(log_has(
        &stack,
        &[
            "job source broken; replacing the pull subscription",
            "missed idle heartbeat"
        ]
    ));

    // the node is back with its disk: ready again by itself, and the next job is signed
    nats.spawn();
    wait_readyz(&mut stack, port, 200, &["ready"]);
    wait_counter(port, "signer_intake_reopened_total", 1);
    assert!(
        log_has(&stack, &["job source reopened"]),
        "{}",
        stack.log(0)
    );
    let js = nats.connect().await;
    assert!(
        signed(&stack, &js, "zn-2", 2).await,
        "signed after the outage"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_consumer_is_recreated_and_one_recreated_by_someone_else_is_picked_up() {
    let mut stack = Stack::new("zc");
    let port = free_port();
    serve_http(&stack, port, None);
    stack.spawn_worker();
    wait_readyz(&mut stack, port, 200, &["ready"]);
    let (_c, js) = stack.connect().await;
    let requests = js.get_stream(stack.stream("REQ")).await.unwrap();
    assert!(signed(&stack, &js, "zc-1", 1).await);

    // deleted while the worker pulls: the worker recreates it with its settings and goes on
    let mut original: consumer::PullConsumer = requests.get_consumer(&stack.id).await.unwrap();
    let original = original.info().await.unwrap().created;
    delete_consumer(&requests, &stack.id).await;
    wait_counter(port, "signer_intake_reopened_total", 1);
    let info = wait_consumer(&requests, &stack.id).await;
    assert!(info.created > original, "a new consumer: {info:?}");
    assert_eq!(info.config.ack_wait, Duration::from_secs(5));
    wait_readyz(&mut stack, port, 200, &["ready"]);
    assert!(
        signed(&stack, &js, "zc-2", 2).await,
        "signed through the new consumer"
    );

    // recreated by someone else (with another ack wait) while the worker was paused: the
    // worker takes that one as it is, and says its settings differ
    stack.signal(0, "STOP");
    let before = counter(port, "signer_intake_reopened_total");
    delete_consumer(&requests, &stack.id).await;
    // the server may still be removing the old consumer's files (see delete_consumer):
    // ask until it takes the new one
    let deadline = Instant::now() + common::stack::MIN_WAIT;
    while let Err(e) = requests
        .create_consumer(consumer::pull::Config {
            durable_name: Some(stack.id.clone()),
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: Duration::from_secs(7),
            max_deliver: 3,
            max_ack_pending: -1,
            ..Default::default()
        })
        .await
    {
        assert!(Instant::now() < deadline, "consumer not recreated: {e}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stack.signal(0, "CONT");
    wait_counter(port, "signer_intake_reopened_total", before + 1);
    wait_readyz(&mut stack, port, 200, &["ready"]);
    assert!(
        log_has(
            &stack,
            &["the consumer's settings differ", "ack_wait_ms\":7000"]
        ),
        "{}",
        stack.log(0)
    );
    assert_eq!(
        wait_consumer(&requests, &stack.id).await.config.ack_wait,
        Duration::from_secs(7),
        "the worker did not replace it"
    );
    assert!(
        signed(&stack, &js, "zc-3", 3).await,
        "signed through their consumer"
    );
    stack.cleanup(&js).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_results_stream_makes_the_replica_not_ready_until_it_stores_again() {
    let mut stack = Stack::new("zs");
    let port = free_port();
    serve_http(&stack, port, None);
    // retried (every second at most) until the stream is back, not answered as final
    stack.configure(|c| c.nats.max_deliver = 1000);
    stack.spawn_worker();
    wait_readyz(&mut stack, port, 200, &["ready"]);
    let (_c, js) = stack.connect().await;
    let results = stack.stream("RES");
    let config: stream::Config = js
        .get_stream(&results)
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .config
        .clone();

    js.delete_stream(&results).await.unwrap();
    wait_readyz(
        &mut stack,
        port,
        503,
        &[&format!("stream {results} unreachable")],
    );
    // a job taken now cannot store its result: not ready for that reason too, not acked
    stack
        .publish(
            &js,
            "sign.requests",
            &[("Nats-Msg-Id", "zs-1")],
            serde_json::to_vec(&request("zs-1", "acme", None)).unwrap(),
        )
        .await;
    wait_readyz(
        &mut stack,
        port,
        503,
        &["results not stored: publish ack: "],
    );

    js.create_stream(config).await.unwrap();
    wait_readyz(&mut stack, port, 200, &["ready"]);
    let stored = stack
        .results(&js, 1, Duration::from_secs(60), Duration::ZERO)
        .await;
    assert!(
        stored.iter().any(|r| r.completed()),
        "the job was retried and stored: {stored:?}"
    );
    stack.cleanup(&js).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_outage_shows_in_readiness_while_the_quota_gate_needs_it() {
    let mut redis = OwnRedis::start();
    let mut gates = disabled_gates();
    gates.quota = QuotaGate {
        fail_open: false,
        ..QuotaGate::default()
    };
    gates.quota.plans.insert(
        "unverified".into(),
        Plan {
            requests_per_second: 1000.0,
            burst: 1000,
            max_concurrent: 100,
            max_payload_bytes: 1048576,
            daily_cap: 0,
            max_signatures_per_request: None,
        },
    );
    let mut stack = Stack::with_gates("zr", gates);
    stack.configure(|c| {
        c.redis = Some(RedisConfig {
            url: format!("redis://127.0.0.1:{}", redis.port),
        })
    });
    let port = free_port();
    serve_http(&stack, port, None);
    stack.spawn_worker();
    wait_readyz(&mut stack, port, 200, &["ready"]);
    let (_c, js) = stack.connect().await;

    redis.kill();
    let body = wait_readyz(
        &mut stack,
        port,
        503,
        &["Redis (needed by quota) unreachable: "],
    );
    assert!(!body.contains("job source"), "pulling is fine: {body}");

    redis.spawn();
    wait_readyz(&mut stack, port, 200, &["ready"]);
    assert!(log_has(&stack, &["readiness probe answers again", "Redis"]));
    assert!(
        signed(&stack, &js, "zr-1", 1).await,
        "signed once Redis is back"
    );
    stack.cleanup(&js).await;
}
