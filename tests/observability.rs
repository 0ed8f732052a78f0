//! What operators see: health, readiness, metrics and JSON logs.

mod common;

use std::time::{Duration, Instant};

use common::stack::{Stack, request};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Generous: a loaded machine may take long to start a worker; a passing test waits only
/// as long as the worker takes, and a worker that exits fails the wait at once, with its log.
const WAIT: Duration = Duration::from_secs(120);

/// Waits until the worker answers `path` with `want`; returns the body.
fn wait_status(stack: &mut Stack, port: u16, path: &str, want: u16) -> String {
    stack.wait_http(0, port, path, want, WAIT)
}

/// The worker's HTTP port once it listens (the one configured: this checks it was bound).
fn listening(stack: &mut Stack, port: u16) -> u16 {
    assert_eq!(stack.http_port(0, WAIT), port);
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_before_ready_and_not_ready_without_nats() {
    let mut stack = Stack::new("h");
    let port = free_port();
    stack.configure(|c| {
        c.http.listen = format!("127.0.0.1:{port}");
        c.nats.url = "nats://127.0.0.1:1".into();
    });
    stack.spawn_worker();
    let port = listening(&mut stack, port);
    assert_eq!(wait_status(&mut stack, port, "/healthz", 200), "ok\n");
    let body = wait_status(&mut stack, port, "/readyz", 503);
    assert!(body.contains("not ready"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_readiness_and_logs_describe_the_work() {
    let mut stack = Stack::new("m");
    let port = free_port();
    stack.configure(|c| c.http.listen = format!("127.0.0.1:{port}"));
    stack.spawn_worker();
    let port = listening(&mut stack, port);
    assert_eq!(wait_status(&mut stack, port, "/readyz", 200), "ready\n");
    let (_c, js) = stack.connect().await;
    let tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    stack
        .publish(
            &js,
            "sign.requests",
            &[("Nats-Msg-Id", "m-1"), ("traceparent", tp)],
            serde_json::to_vec(&request("m-1", "acme", Some("multi"))).unwrap(),
        )
        .await;
    let mut refused = request("m-2", "acme", None);
    refused["scanner"]["imageDigest"] = "sha256:nothex".into();
    stack
        .publish(
            &js,
            "sign.requests",
            &[("Nats-Msg-Id", "m-2"), ("traceparent", tp)],
            serde_json::to_vec(&refused).unwrap(),
        )
        .await;
    assert_eq!(
        stack
            .results(&js, 2, Duration::from_secs(60), Duration::ZERO)
            .await
            .len(),
        2
    );

    // the counters move just after the result is stored: poll until they show it
    let needles = [
        "signer_jobs_total{outcome=\"completed\",code=\"\"} 1".to_string(),
        "signer_jobs_total{outcome=\"failed\",code=\"invalid_request\"} 1".to_string(),
        "signer_sign_duration_seconds_count{key=\"ec\",source=\"file\"} 1".to_string(),
        "signer_sign_duration_seconds_count{key=\"ed\",source=\"file\"} 1".to_string(),
        "signer_inflight 0".to_string(),
        "signer_redeliveries_total 0".to_string(),
        // publish-to-result latency, one per result
        "signer_job_latency_seconds_count{outcome=\"completed\"} 1".to_string(),
        "signer_job_latency_seconds_count{outcome=\"failed\"} 1".to_string(),
        // readiness, and the poller's gauges of the consumer and the keys
        "signer_ready 1".to_string(),
        "signer_backlog_pending_messages 0".to_string(),
        "signer_backlog_ack_pending_messages 0".to_string(),
        "signer_backlog_oldest_age_seconds 0".to_string(),
        "signer_key_revoked{key=\"ec\"} 0".to_string(),
        // counters alerts rate() exist at 0 before their first event
        "signer_jobs_total{outcome=\"failed\",code=\"key_unavailable\"} 0".to_string(),
        "signer_licensing_requests_total{outcome=\"unavailable\"} 0".to_string(),
        format!(
            "signer_key_usage_total{{keyid=\"{}\"}} 1",
            stack.public_keys[0].keyid()
        ),
    ];
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let metrics = wait_status(&mut stack, port, "/metrics", 200);
        let missing: Vec<&String> = needles
            .iter()
            .filter(|n| !metrics.contains(n.as_str()))
            .collect();
        if missing.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "missing {missing:?} in\n{metrics}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // JSON logs carry the request id, tenant and traceparent of the job they are about
    let log = stack.log(0);
    let line = log
        .lines()
        .find(|l| l.contains("job refused"))
        .unwrap_or_else(|| panic!("{log}"));
    let v: serde_json::Value = serde_json::from_str(line).unwrap();
    assert_eq!(v["span"]["request_id"], "m-2");
    assert_eq!(v["span"]["tenant"], "acme");
    assert_eq!(v["span"]["traceparent"], tp);
    assert_eq!(v["fields"]["code"], "invalid_request");
    stack.cleanup(&js).await;
}

/// A revocation in the shared key bucket shows in `signer_key_revoked{key}` of a running
/// replica, for the revoked key only (the poller refreshes it every 5 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_key_shows_in_its_gauge() {
    let mut stack = Stack::new("rv");
    let port = free_port();
    stack.configure(|c| c.http.listen = format!("127.0.0.1:{port}"));
    stack.spawn_worker();
    let port = listening(&mut stack, port);
    assert_eq!(wait_status(&mut stack, port, "/readyz", 200), "ready\n");
    let (_c, js) = stack.connect().await;
    let state = stella_signer::keystate::KeyLedger::open(&js, &stack.stream("KEYS"))
        .await
        .unwrap();
    state
        .revoke(&stack.public_keys[0].keyid(), "test")
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let metrics = wait_status(&mut stack, port, "/metrics", 200);
        if metrics.contains("signer_key_revoked{key=\"ec\"} 1") {
            assert!(
                metrics.contains("signer_key_revoked{key=\"ed\"} 0"),
                "{metrics}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the revocation never showed:\n{metrics}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    stack.cleanup(&js).await;
}
