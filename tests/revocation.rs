//! Revoking a key: every replica stops signing with it within seconds, without a restart,
//! and the key stays listed (with its validity) for verifiers.

mod common;

use std::time::Duration;

use common::stack::{Stack, request};

fn signer(stack: &Stack, args: &[&str]) -> (i32, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_stella-signer"))
        .args(args)
        .arg("--config")
        .arg(&stack.config)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_key_stops_signing_on_every_replica_without_a_restart() {
    let mut stack = Stack::new("rv", "");
    stack.spawn_worker();
    stack.spawn_worker();
    let (client, js) = stack.connect().await;
    stack.wait_provisioned(&js).await;
    let ec = stack.public_keys[0].keyid();
    let ed = stack.public_keys[1].keyid();
    let publish = |id: String, profile: &'static str| {
        let body = serde_json::to_vec(&request(&id, "acme", Some(profile))).unwrap();
        (id, body)
    };
    let mut n = 0;
    let mut send = async |id: String, profile: &'static str| {
        let (id, body) = publish(id, profile);
        stack
            .publish(&js, "sign.requests", &[("Nats-Msg-Id", &id)], body)
            .await;
        n += 1;
        let results = stack
            .results(&js, n, Duration::from_secs(20), Duration::ZERO)
            .await;
        results
            .into_iter()
            .find(|r| r.header("Signer-Request-Id") == Some(id.as_str()))
            .unwrap()
    };

    assert!(send("before".into(), "default").await.completed());
    let (code, list) = signer(&stack, &["keys", "list", "--json"]);
    assert_eq!(code, 0, "{list}");
    let keys: serde_json::Value = serde_json::from_str(&list).unwrap();
    assert_eq!(
        keys.as_array().unwrap().len(),
        2,
        "both loaded keys are listed: {list}"
    );
    assert!(
        keys.as_array()
            .unwrap()
            .iter()
            .all(|k| k["status"] == "active")
    );

    let (code, out) = signer(
        &stack,
        &["keys", "revoke", &ec, "--reason", "key file leaked"],
    );
    assert_eq!(code, 0, "{out}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    for i in 0..12 {
        let r = send(format!("after-{i}"), "default").await;
        assert!(!r.completed(), "a revoked key signed: {:#}", r.body);
        assert_eq!(r.code(), "key_revoked");
        assert_eq!(r.body["error"]["retryable"], false);
    }
    assert!(
        send("other-key".into(), "ed").await.completed(),
        "other keys keep signing"
    );

    // the control subject reaches the same state through any replica
    let answer = client
        .request(
            stack.subject("signer.control.keys"),
            serde_json::to_vec(
                &serde_json::json!({"action": "revoke", "keyid": ed, "reason": "rotated out"}),
            )
            .unwrap()
            .into(),
        )
        .await
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&answer.payload), "ok");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(send("ed-after".into(), "ed").await.code(), "key_revoked");

    // both replicas refused (the audit events name their writers), and both keys stay listed
    let audit = stack.audit_events(&js).await;
    let writers: std::collections::HashSet<String> = audit
        .iter()
        .filter(|e| e["errorCode"] == "key_revoked")
        .map(|e| {
            e["worker"]
                .as_str()
                .unwrap()
                .rsplit_once("-w")
                .unwrap()
                .0
                .to_string()
        })
        .collect();
    assert_eq!(
        writers.len(),
        2,
        "every replica refuses the revoked key: {writers:?}"
    );
    let (_, list) = signer(&stack, &["keys", "list", "--json"]);
    let keys: serde_json::Value = serde_json::from_str(&list).unwrap();
    let ec_entry = keys
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["keyid"] == ec)
        .unwrap();
    assert_eq!(ec_entry["status"], "revoked");
    assert_eq!(ec_entry["revocationReason"], "key file leaked");
    assert!(ec_entry["validUntil"].is_string() && ec_entry["validFrom"].is_string());
    assert!(
        ec_entry["publicKey"]
            .as_str()
            .unwrap()
            .starts_with("-----BEGIN PUBLIC KEY-----")
    );
    stack.cleanup(&js).await;
}
