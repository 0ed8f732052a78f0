//! Replicas on one durable consumer: a replica killed mid-run loses nothing and nothing is
//! answered or signed twice.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::stack::{Stack, request, verify_completed};
use stella_signer::config::RedisConfig;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_a_replica_midway_loses_and_duplicates_nothing() {
    // idempotency records in JetStream KV (the default, even with [redis]), shared by the replicas
    let mut stack = Stack::new("k");
    stack.configure(|c| {
        c.redis = Some(RedisConfig {
            url: "redis://127.0.0.1:6379".into(),
        });
        c.worker.max_inflight = 64;
    });
    for _ in 0..3 {
        stack.spawn_worker();
    }
    let (_c, js) = stack.connect().await;
    stack.wait_provisioned(&js).await;

    let n = 5000;
    let mut acks = Vec::with_capacity(n);
    for i in 0..n {
        let id = format!("job-{i}");
        let profile = if i % 5 == 0 { Some("multi") } else { None };
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", id.as_str());
        let body = serde_json::to_vec(&request(&id, "acme", profile)).unwrap();
        acks.push(
            js.publish_with_headers(stack.subject("sign.requests.acme"), headers, body.into())
                .await
                .unwrap(),
        );
    }
    for ack in acks {
        ack.await.unwrap();
    }

    // kill one replica with SIGKILL once about a third of the jobs are answered
    let mut results_stream = js.get_stream(stack.stream("RES")).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let done = results_stream.info().await.unwrap().state.messages;
        if done >= (n / 3) as u64 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "workers too slow: {done} results\n{}",
            stack.log(1)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stack.signal(1, "KILL");
    assert_eq!(
        stack.wait(1, Duration::from_secs(10)),
        Some(-1),
        "killed by signal"
    );

    let results = stack
        .results(&js, n, Duration::from_secs(180), Duration::from_secs(2))
        .await;
    let mut per_id: HashMap<String, usize> = HashMap::new();
    for r in &results {
        *per_id
            .entry(r.header("Signer-Request-Id").unwrap().to_string())
            .or_default() += 1;
        assert!(r.completed(), "{:#}", r.body);
        verify_completed(&stack, r);
    }
    let missing: Vec<usize> = (0..n)
        .filter(|i| !per_id.contains_key(&format!("job-{i}")))
        .collect();
    assert!(
        missing.is_empty(),
        "lost {} jobs, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    let twice: Vec<_> = per_id.iter().filter(|(_, c)| **c > 1).collect();
    assert!(twice.is_empty(), "answered twice: {twice:?}");
    assert_eq!(results.len(), n);

    // the surviving replicas did the rest, and the audit chains (one per writer) are intact
    assert!(
        stack.log(0).contains("stella-signer serving")
            && stack.log(2).contains("stella-signer serving")
    );
    let (code, text) = stack.audit_verify();
    assert_eq!(code, Some(0), "{text}");
    stack.cleanup(&js).await;
}
