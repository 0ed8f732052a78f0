//! The worker against the real NATS (and Redis): the contract's delivery guarantees.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::stack::{ResultMsg, Stack, request, verify_completed};
use serde_json::Value;
use stella_signer::config::{IdempotencyBackend, KeyConfig, RedisConfig};
use stella_signer::schemas::SchemaKind;

fn by_id(results: &[ResultMsg]) -> HashMap<String, Vec<&ResultMsg>> {
    let mut map: HashMap<String, Vec<&ResultMsg>> = HashMap::new();
    for r in results {
        map.entry(r.header("Signer-Request-Id").unwrap_or("").to_string())
            .or_default()
            .push(r);
    }
    map
}

fn assert_schema(kind: SchemaKind, value: &Value) {
    let violations = kind.violations(value).unwrap();
    assert!(
        violations.is_empty(),
        "{kind:?} schema: {violations:?}\n{value:#}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_gets_one_verifiable_result_in_its_encoding() {
    let mut stack = Stack::new("p");
    stack.spawn_worker();
    let (_c, js) = stack.connect().await;
    stack.wait_provisioned(&js).await;

    let mut expected = Vec::new();
    for (i, (profile, cbor)) in [
        (None, false),
        (Some("ed"), false),
        (Some("multi"), true),
        (Some("multi"), false),
    ]
    .into_iter()
    .enumerate()
    {
        let id = format!("req-{i}");
        let body = request(&id, "acme", profile);
        let (ct, bytes) = if cbor {
            (
                "application/cbor",
                signer_actors::codec::ContentType::Cbor
                    .encode(&body)
                    .unwrap(),
            )
        } else {
            ("application/json", serde_json::to_vec(&body).unwrap())
        };
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        stack
            .publish(
                &js,
                "sign.requests.acme",
                &[
                    ("Nats-Msg-Id", &id),
                    ("Content-Type", ct),
                    ("traceparent", tp),
                ],
                bytes,
            )
            .await;
        expected.push((id, ct, profile));
    }
    // kind: export
    let mut export = request("exp-1", "acme", Some("multi"));
    export.as_object_mut().unwrap().remove("statement");
    export["kind"] = "export".into();
    export["export"] = serde_json::json!({"bundleId": "bundle-7", "files": [
        {"name": "sbom.json", "digest": {"sha256": "a".repeat(64)}},
        {"name": "vex.json", "digest": {"sha256": "b".repeat(64)}}]});
    stack
        .publish(
            &js,
            "sign.requests",
            &[("Nats-Msg-Id", "exp-1")],
            serde_json::to_vec(&export).unwrap(),
        )
        .await;

    let results = stack
        .results(&js, 5, Duration::from_secs(30), Duration::from_millis(500))
        .await;
    let map = by_id(&results);
    assert_eq!(map.len(), 5, "{results:#?}\n{}", stack.log(0));
    for (id, ct, profile) in &expected {
        let rs = &map[id];
        assert_eq!(rs.len(), 1, "exactly one result for {id}");
        let r = rs[0];
        assert!(r.completed(), "{id}: {:#}", r.body);
        assert_eq!(
            r.header("Content-Type"),
            Some(*ct),
            "result uses the request's encoding"
        );
        assert_eq!(r.header("Nats-Msg-Id"), Some(format!("acme/{id}").as_str()));
        assert_eq!(r.header("Signer-Tenant"), Some("acme"));
        assert_eq!(r.header("Signer-Kind"), Some("dsse"));
        assert_eq!(
            r.header("traceparent"),
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
        );
        let signatures = r.body["envelope"]["signatures"].as_array().unwrap().len();
        assert_eq!(signatures, if *profile == Some("multi") { 2 } else { 1 });
        assert_eq!(
            r.body["bundles"].as_array().unwrap().len(),
            signatures,
            "one bundle per signature"
        );
        verify_completed(&stack, r);
        assert_eq!(
            r.body["entitlement"]["poe"], "disabled",
            "a disabled gate is never a silent pass"
        );
        assert_eq!(r.body["gates"]["provenance"], "disabled");
        assert_schema(SchemaKind::Completed, &r.body);
    }
    let exp = map["exp-1"][0];
    assert_eq!(exp.header("Signer-Kind"), Some("export"));
    let subjects: Vec<&str> = exp.body["subjects"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(subjects, ["sbom.json", "vex.json"]);
    verify_completed(&stack, exp);

    // the audit chain of the run verifies, and events name what was decided
    let (code, text) = stack.audit_verify();
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("OK: 5 events"), "{text}");
    stack.cleanup(&js).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_answered_acked_and_never_redelivered() {
    let mut stack = Stack::new("b");
    stack.configure(|c| c.worker.max_body_bytes = 20000);
    stack.spawn_worker();
    let (_c, js) = stack.connect().await;
    stack.wait_provisioned(&js).await;

    let good = |id: &str| serde_json::to_vec(&request(id, "acme", None)).unwrap();
    let mut v2 = request("v2-1", "acme", None);
    v2["apiVersion"] = "signer.stella-ops.org/v2".into();
    let mut bad_digest = request("digest-1", "acme", None);
    bad_digest["statement"]["subject"][0]["digest"]["sha256"] = "xyz".into();
    let mut big = request("big-1", "acme", None);
    big["statement"]["predicate"]["blob"] = "x".repeat(30_000).into();
    type Case<'a> = (&'a str, Vec<(&'a str, &'a str)>, Vec<u8>);
    let cases: Vec<Case> = vec![
        (
            "sign.requests",
            vec![("Nats-Msg-Id", "garbage-1")],
            b"\x00not json".to_vec(),
        ),
        ("sign.requests.acme", vec![], b"{".to_vec()),
        (
            "sign.requests",
            vec![("Nats-Msg-Id", "xml-1"), ("Content-Type", "text/xml")],
            good("xml-1"),
        ),
        (
            "sign.requests",
            vec![("Nats-Msg-Id", "v2-1")],
            serde_json::to_vec(&v2).unwrap(),
        ),
        (
            "sign.requests",
            vec![],
            serde_json::to_vec(&bad_digest).unwrap(),
        ),
        ("sign.requests.globex", vec![], good("tenant-1")),
        // an oversized body is not decoded: its requestId comes from Nats-Msg-Id
        (
            "sign.requests",
            vec![("Nats-Msg-Id", "big-1")],
            serde_json::to_vec(&big).unwrap(),
        ),
    ];
    for (subject, headers, body) in &cases {
        stack.publish(&js, subject, headers, body.clone()).await;
    }
    let results = stack
        .results(
            &js,
            cases.len(),
            Duration::from_secs(30),
            Duration::from_millis(500),
        )
        .await;
    assert_eq!(results.len(), cases.len(), "{results:#?}\n{}", stack.log(0));
    let codes: HashMap<&str, &str> = results
        .iter()
        .map(|r| (r.header("Signer-Request-Id").unwrap(), r.code()))
        .collect();
    assert_eq!(codes["garbage-1"], "invalid_request");
    assert!(
        codes.keys().any(|k| k.starts_with("seq-")),
        "a message without id is answered as seq-<n>: {codes:?}"
    );
    assert_eq!(codes["xml-1"], "unsupported_media_type");
    assert_eq!(codes["v2-1"], "unsupported_api_version");
    assert_eq!(codes["digest-1"], "invalid_request");
    assert_eq!(codes["tenant-1"], "tenant_mismatch");
    assert_eq!(codes["big-1"], "payload_too_large");
    for r in &results {
        assert!(!r.completed());
        assert_eq!(r.body["error"]["retryable"], false);
        assert_schema(SchemaKind::Failed, &r.body);
        assert!(r.body["audit"]["seq"].as_u64().unwrap() >= 1);
    }
    // everything was acked: nothing pending, nothing waiting for redelivery
    let info = stack.wait_settled(&js).await;
    assert_eq!(info.num_redelivered, 0, "{info:?}");
    assert!(
        stack.log(0).contains("\"code\":\"tenant_mismatch\""),
        "refusals are logged with their code"
    );
    stack.cleanup(&js).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_republished_request_is_not_signed_twice() {
    let mut stack = Stack::new("d");
    stack.spawn_worker();
    let (_c, js) = stack.connect().await;
    stack.wait_provisioned(&js).await;
    let body = serde_json::to_vec(&request("dup-1", "acme", None)).unwrap();
    stack
        .publish(
            &js,
            "sign.requests.acme",
            &[("Nats-Msg-Id", "dup-1")],
            body.clone(),
        )
        .await;
    let first = stack
        .results(&js, 1, Duration::from_secs(20), Duration::ZERO)
        .await;
    assert_eq!(first.len(), 1);
    // Same requestId under another Nats-Msg-Id: the request stream's dedup does not catch
    // it (as after its duplicate window). The idempotency record must.
    stack
        .publish(
            &js,
            "sign.requests.acme",
            &[("Nats-Msg-Id", "dup-1-again")],
            body.clone(),
        )
        .await;
    stack.publish(&js, "sign.requests.acme", &[], body).await;
    // both copies were taken and settled: a second result would be stored by now
    stack.wait_settled(&js).await;
    let all = stack
        .results(&js, 1, Duration::from_secs(5), Duration::from_millis(500))
        .await;
    assert_eq!(all.len(), 1, "no second result: {all:#?}");
    assert_eq!(
        all[0].raw, first[0].raw,
        "the original result, byte for byte"
    );
    let (_, text) = stack.audit_verify();
    assert!(
        text.contains("OK: 1 events"),
        "one signing decision only: {text}"
    );
    stack.cleanup(&js).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retryable_failures_back_off_and_end_as_failed_at_max_deliveries() {
    // Idempotency in a Redis that does not answer: every attempt fails with a retryable
    // `internal`; the third (max_deliver = 3) publishes it.
    let mut stack = Stack::new("r");
    stack.configure(|c| {
        c.redis = Some(RedisConfig {
            url: "redis://127.0.0.1:1".into(),
        });
        c.idempotency.backend = Some(IdempotencyBackend::Redis);
    });
    stack.spawn_worker();
    let (_c, js) = stack.connect().await;
    stack.wait_provisioned(&js).await;
    let started = std::time::Instant::now();
    stack
        .publish(
            &js,
            "sign.requests",
            &[("Nats-Msg-Id", "retry-1")],
            serde_json::to_vec(&request("retry-1", "acme", None)).unwrap(),
        )
        .await;
    let results = stack
        .results(&js, 1, Duration::from_secs(30), Duration::from_millis(500))
        .await;
    assert_eq!(results.len(), 1, "{}", stack.log(0));
    let r = &results[0];
    assert_eq!(r.code(), "internal");
    assert_eq!(r.body["error"]["retryable"], true);
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "backoff 100ms then 200ms between the three deliveries"
    );
    assert_eq!(
        stack
            .log(0)
            .matches("retryable failure; NAK with backoff")
            .count(),
        2,
        "{}",
        stack.log(0)
    );
    stack.cleanup(&js).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_jobs_and_loses_none() {
    let mut stack = Stack::new("s");
    let w = stack.spawn_worker();
    let (_c, js) = stack.connect().await;
    stack.wait_provisioned(&js).await;
    let n = 400;
    for i in 0..n {
        let id = format!("drain-{i}");
        stack
            .publish(
                &js,
                "sign.requests",
                &[("Nats-Msg-Id", &id)],
                serde_json::to_vec(&request(&id, "acme", Some("multi"))).unwrap(),
            )
            .await;
    }
    // TERM once the worker holds jobs (in flight, unacknowledged)
    stack
        .wait_consumer(&js, "jobs in flight", |i| i.num_ack_pending > 0)
        .await;
    stack.signal(w, "TERM");
    assert_eq!(
        stack.wait(w, Duration::from_secs(30)),
        Some(0),
        "clean exit after draining:\n{}",
        stack.log(w)
    );
    assert!(stack.log(w).contains("drained"), "{}", stack.log(w));
    // what the first worker did not take is taken by the next one
    stack.spawn_worker();
    let results = stack
        .results(&js, n, Duration::from_secs(60), Duration::from_secs(1))
        .await;
    let map = by_id(&results);
    assert_eq!(map.len(), n, "every job answered");
    assert!(map.values().all(|v| v.len() == 1), "none twice");
    assert!(results.iter().all(ResultMsg::completed));
    stack.cleanup(&js).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_flight_is_bounded_whatever_the_backlog() {
    let mut stack = Stack::new("f");
    let (_c, js) = stack.connect().await;
    stack.configure(|c| c.worker.max_inflight = 4);
    stack.spawn_worker();
    stack.wait_provisioned(&js).await;
    let n = 1500;
    for i in 0..n {
        let id = format!("b-{i}");
        stack
            .publish(
                &js,
                "sign.requests",
                &[("Nats-Msg-Id", &id)],
                serde_json::to_vec(&request(&id, "acme", None)).unwrap(),
            )
            .await;
    }
    let mut consumer: async_nats::jetstream::consumer::PullConsumer = js
        .get_stream(stack.stream("REQ"))
        .await
        .unwrap()
        .get_consumer(&stack.id)
        .await
        .unwrap();
    let mut max_ack_pending = 0;
    for _ in 0..20 {
        let info = consumer.info().await.unwrap();
        max_ack_pending = max_ack_pending.max(info.num_ack_pending);
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    // max_inflight running, plus the pull stream's buffer (batches of max_inflight, the
    // next requested when half is used) and acks still on their way: a small multiple of
    // max_inflight, whatever the backlog (seen: 9 to 13 for max_inflight 4).
    assert!(
        max_ack_pending <= 5 * 4,
        "a replica holds at most 5 x max_inflight, saw {max_ack_pending} of {n}"
    );
    assert!(max_ack_pending >= 1, "the worker was busy while we looked");
    let results = stack
        .results(&js, n, Duration::from_secs(60), Duration::from_millis(200))
        .await;
    assert_eq!(by_id(&results).len(), n);
    stack.cleanup(&js).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_follows_results_and_audit_verify_finds_a_forged_event() {
    let mut stack = Stack::new("w");
    stack.spawn_worker();
    let (_c, js) = stack.connect().await;
    stack.wait_provisioned(&js).await;
    for i in 0..3 {
        let id = format!("w-{i}");
        stack
            .publish(
                &js,
                "sign.requests",
                &[("Nats-Msg-Id", &id)],
                serde_json::to_vec(&request(&id, "acme", None)).unwrap(),
            )
            .await;
    }
    let mut bad = request("w-bad", "acme", None);
    bad["kind"] = "nope".into();
    stack
        .publish(
            &js,
            "sign.requests",
            &[("Nats-Msg-Id", "w-bad")],
            serde_json::to_vec(&bad).unwrap(),
        )
        .await;
    assert_eq!(
        stack
            .results(&js, 4, Duration::from_secs(20), Duration::ZERO)
            .await
            .len(),
        4
    );

    // watch, as Attestor would: one line per result, completed and failed
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_stella-signer"))
        .args(["watch", "--all", "--count", "4", "--idle", "5s", "--config"])
        .arg(&stack.config)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert_eq!(
        text.lines()
            .filter(|l| l.starts_with("completed acme/w-"))
            .count(),
        3,
        "{text}"
    );
    // not a valid request, but its requestId and tenant can be read: the refusal is addressed to them
    assert_eq!(
        text.lines()
            .filter(|l| l.starts_with("failed acme/w-bad invalid_request"))
            .count(),
        1,
        "{text}"
    );

    let verify = || stack.audit_verify();
    let (code, text) = verify();
    assert_eq!(code, Some(0), "{text}");

    // someone with publish rights appends an altered copy of the last event
    let mut events = stack.audit_events(&js).await;
    let mut forged = events.pop().unwrap();
    forged["writerSeq"] = (forged["writerSeq"].as_u64().unwrap() + 1).into();
    forged["prevHash"] = forged["hash"].clone();
    forged["decision"] = "signed".into();
    let stored = js
        .get_stream(stack.stream("AUD"))
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .state
        .last_sequence;
    stack
        .publish(
            &js,
            "signer.audit.acme.signed",
            &[],
            serde_json::to_vec(&forged).unwrap(),
        )
        .await;
    let (code, text) = verify();
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.starts_with(&format!("FAIL: stream seq {}:", stored + 1)) && text.contains("altered"),
        "{text}"
    );
    stack.cleanup(&js).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configured_certificate_chain_goes_with_the_keys_signatures() {
    let mut stack = Stack::new("c");
    let dir = stack.dir.path().to_path_buf();
    let cert = dir.join("ec-chain.pem");
    let made = std::process::Command::new("openssl")
        .args([
            "req",
            "-new",
            "-x509",
            "-days",
            "2",
            "-subj",
            "/CN=stella release 2026",
            "-key",
        ])
        .arg(dir.join("ec.key"))
        .arg("-out")
        .arg(&cert)
        .output()
        .unwrap();
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    // the chain goes with `name` (a file key), no other key has one
    let with_chain = |stack: &Stack, name: &str| {
        stack.configure(|c| {
            for key in &mut c.keys {
                if let KeyConfig::File(k) = key {
                    k.certificate_chain = (k.name == name).then(|| cert.clone());
                }
            }
        })
    };

    // a chain whose leaf is not this key's stops the service before it takes a job
    with_chain(&stack, "ed");
    let refused = stack.spawn_worker();
    assert_eq!(
        stack.wait(refused, Duration::from_secs(20)),
        Some(2),
        "unusable input"
    );
    let log = stack.log(refused);
    assert!(
        log.contains("key \"ed\"") && log.contains("does not certify this key"),
        "{log}"
    );

    with_chain(&stack, "ec");
    stack.spawn_worker();
    let (_c, js) = stack.connect().await;
    stack.wait_provisioned(&js).await;
    stack
        .publish(
            &js,
            "sign.requests",
            &[("Nats-Msg-Id", "chain-1")],
            serde_json::to_vec(&request("chain-1", "acme", Some("multi"))).unwrap(),
        )
        .await;
    let results = stack
        .results(&js, 1, Duration::from_secs(20), Duration::ZERO)
        .await;
    let r = &results[0];
    assert!(r.completed(), "{:#}", r.body);
    let pem = std::fs::read_to_string(&cert).unwrap();
    assert_eq!(
        r.body["signers"][0]["certificateChain"],
        serde_json::json!([pem.replace("\r\n", "\n")])
    );
    assert!(
        r.body["signers"][1].get("certificateChain").is_none(),
        "only the key with a chain reports one"
    );
    assert!(
        r.body["bundles"][0]["verificationMaterial"]["publicKey"]["hint"].is_string(),
        "keyful bundles keep the keyid hint"
    );
    verify_completed(&stack, r);
    assert_schema(SchemaKind::Completed, &r.body);
    stack.cleanup(&js).await;
}
