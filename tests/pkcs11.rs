//! The PKCS#11 key backend against a real SoftHSM2 token: signatures verify with our
//! verifier and the independent peers, through `serve` and alone, a token that cannot be
//! logged in to fails jobs as retryable `key_unavailable` until it can, and a pool of
//! sessions whose sessions are closed under it loses no job.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::softhsm::{EC_ID, EC_LABEL, ED_LABEL, PIN, SoftHsm, softhsm};
use common::stack::{Stack, request};
use common::{verify_bundle_peer, verify_dsse_peer, write_json};
use serde_json::Value;
use sha2::{Digest as _, Sha256};
use signer_actors::keys::{KeyAlgorithm, KeyError, KeySigner as _, KeySource};
use stella_signer::config::{PinSource, Pkcs11KeyConfig, Pkcs11Object, ProfileConfig};
use stella_signer::keys::pkcs11::Pkcs11Key;

fn pin_file(dir: &Path, pin: &str) -> PathBuf {
    let path = dir.join("pin");
    std::fs::write(&path, format!("{pin}\n")).unwrap();
    path
}

fn write_pem(dir: &Path, name: &str, pem: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, pem).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_keys_sign_der_that_verifies_and_keyid_is_sha256_of_spki() {
    let hsm = softhsm();
    let dir = tempfile::tempdir().unwrap();
    let pin = pin_file(dir.path(), PIN);

    let by_label = Pkcs11Key::open("hsm", &hsm.key_config("hsm", &hsm.token, EC_LABEL, &pin))
        .expect("P-256 key opens");
    let identity = by_label.identity();
    assert_eq!(identity.algorithm, KeyAlgorithm::EcdsaP256Sha256);
    assert_eq!(identity.source, KeySource::Pkcs11);
    assert_eq!(
        identity.keyid,
        hex::encode(Sha256::digest(identity.public_key.spki_der()))
    );
    for msg in [&b""[..], b"message", &[0xffu8; 4096]] {
        let sig = by_label.sign(msg).await.expect("token signs");
        assert_eq!(sig.sig[0], 0x30, "ECDSA signatures are DER SEQUENCEs");
        assert_eq!(sig.sig[1] as usize, sig.sig.len() - 2, "DER length");
        assert!(identity.public_key.verify(msg, &sig.sig));
        assert!(!identity.public_key.verify(b"other", &sig.sig));
        assert_eq!(sig.identity.keyid, identity.keyid);
    }

    // the same pair selected by CKA_ID, with the PIN from the environment
    let mut by_id = hsm.key_config("hsm-id", &hsm.token, EC_LABEL, &pin);
    by_id.object = Pkcs11Object::Id(hex::decode(EC_ID).unwrap());
    by_id.pin = PinSource::Env("SIGNER_TEST_HSM_PIN_UNUSED_BY_OTHERS".into());
    assert!(
        matches!(Pkcs11Key::open("hsm-id", &by_id), Err(KeyError::Unavailable(m)) if m.contains("SIGNER_TEST_HSM_PIN")),
        "an unset PIN variable is retryable"
    );
    by_id.pin = PinSource::File(pin.clone());
    let key = Pkcs11Key::open("hsm-id", &by_id).expect("selected by CKA_ID");
    assert_eq!(key.identity().keyid, identity.keyid);

    // Ed25519 on the same token
    match &hsm.ed25519_error {
        None => {
            let ed = Pkcs11Key::open(
                "hsm-ed",
                &hsm.key_config("hsm-ed", &hsm.token, ED_LABEL, &pin),
            )
            .expect("Ed25519 key opens");
            let id = ed.identity();
            assert_eq!(id.algorithm, KeyAlgorithm::Ed25519);
            let sig = ed.sign(b"message").await.expect("token signs");
            assert_eq!(sig.sig.len(), 64);
            assert!(id.public_key.verify(b"message", &sig.sig));
        }
        Some(e) => panic!("SoftHSM could not generate an Ed25519 key: {e}"),
    }
}

#[test]
fn unreachable_tokens_are_retryable_failures() {
    let hsm = softhsm();
    let dir = tempfile::tempdir().unwrap();
    let good = pin_file(dir.path(), PIN);
    let bad_dir = tempfile::tempdir().unwrap();
    let bad = pin_file(bad_dir.path(), "9999");

    let cases = [
        (
            "wrong PIN",
            hsm.key_config("k", &hsm.fault_token, EC_LABEL, &bad),
        ),
        (
            "no such token",
            hsm.key_config("k", "no-such-token", EC_LABEL, &good),
        ),
        (
            "no such key",
            hsm.key_config("k", &hsm.token, "no-such-key", &good),
        ),
        (
            "no PIN file",
            hsm.key_config("k", &hsm.token, EC_LABEL, &dir.path().join("nope")),
        ),
        ("no module", {
            let mut c = hsm.key_config("k", &hsm.token, EC_LABEL, &good);
            c.module = Some(dir.path().join("libnothing.so"));
            c
        }),
    ];
    for (what, cfg) in cases {
        match Pkcs11Key::open("k", &cfg) {
            Err(KeyError::Unavailable(m)) => eprintln!("{what}: {m}"),
            other => panic!("{what}: {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_signs_with_the_token_and_the_peers_verify() {
    let hsm = softhsm();
    let pins = tempfile::tempdir().unwrap();
    let pin = pin_file(pins.path(), PIN);
    let mut stack = Stack::new("hsm");
    stack.configure(|c| {
        c.keys
            .push(hsm.key_config("hsm", &hsm.token, EC_LABEL, &pin).into());
        c.keys
            .push(hsm.key_config("hsm-ed", &hsm.token, ED_LABEL, &pin).into());
        for (name, keys) in [
            ("hsm", &["hsm"][..]),
            ("hsm-multi", &["hsm", "ed"]),
            ("hsm-ed", &["hsm-ed"]),
        ] {
            c.profiles
                .insert(name.into(), ProfileConfig::new(keys.iter().copied()));
        }
    });
    stack.spawn_worker();
    let (_c, js) = stack.connect().await;
    stack.wait_provisioned(&js).await;
    stack.wait_log(0, &["key loaded", "\"hsm\""], Duration::from_secs(20));
    stack.wait_log(0, &["key loaded", "\"hsm-ed\""], Duration::from_secs(20));

    // the public keys, read from the token independently of serve
    let out = tempfile::tempdir().unwrap();
    let hsm_id = Pkcs11Key::open("hsm", &hsm.key_config("hsm", &hsm.token, EC_LABEL, &pin))
        .unwrap()
        .identity();
    let hsm_ed_id = Pkcs11Key::open(
        "hsm-ed",
        &hsm.key_config("hsm-ed", &hsm.token, ED_LABEL, &pin),
    )
    .unwrap()
    .identity();
    let hsm_pub = write_pem(out.path(), "hsm.pub", &hsm_id.public_key.to_pem());
    let hsm_ed_pub = write_pem(out.path(), "hsm-ed.pub", &hsm_ed_id.public_key.to_pem());
    let ed_pub = write_pem(out.path(), "ed.pub", &stack.public_keys[1].to_pem());
    let ed_keyid = stack.public_keys[1].keyid();

    // (requestId, profile, [(public key file, keyid, source)] in signature order)
    type Signer<'a> = (&'a Path, &'a str, &'a str);
    let jobs: [(&str, &str, Vec<Signer>); 4] = [
        ("h-1", "hsm", vec![(&hsm_pub, &hsm_id.keyid, "pkcs11")]),
        ("h-2", "hsm", vec![(&hsm_pub, &hsm_id.keyid, "pkcs11")]),
        (
            "m-1",
            "hsm-multi",
            vec![
                (&hsm_pub, &hsm_id.keyid, "pkcs11"),
                (&ed_pub, &ed_keyid, "file"),
            ],
        ),
        (
            "e-1",
            "hsm-ed",
            vec![(&hsm_ed_pub, &hsm_ed_id.keyid, "pkcs11")],
        ),
    ];
    for (id, profile, _) in &jobs {
        let body = serde_json::to_vec(&request(id, "acme", Some(profile))).unwrap();
        stack
            .publish(&js, "sign.requests.acme", &[("Nats-Msg-Id", id)], body)
            .await;
    }
    let results = stack
        .results(
            &js,
            jobs.len(),
            Duration::from_secs(30),
            Duration::from_millis(300),
        )
        .await;
    assert_eq!(results.len(), jobs.len(), "{results:#?}\n{}", stack.log(0));
    for (id, _, keys) in &jobs {
        let r = results
            .iter()
            .find(|r| r.header("Signer-Request-Id") == Some(id))
            .unwrap_or_else(|| panic!("no result for {id}"));
        assert!(r.completed(), "{id}: {:#}\n{}", r.body, stack.log(0));
        for (i, (_, keyid, source)) in keys.iter().enumerate() {
            assert_eq!(r.body["signers"][i]["keyid"], *keyid, "{id}");
            assert_eq!(r.body["signers"][i]["source"], *source, "{id}");
            assert_eq!(r.body["envelope"]["signatures"][i]["keyid"], *keyid, "{id}");
        }
        let envelope = write_json(
            out.path(),
            &format!("{id}.envelope.json"),
            &r.body["envelope"],
        );
        let pubs: Vec<&Path> = keys.iter().map(|k| k.0).collect();
        let mut extra = vec!["--intoto"];
        for k in keys {
            extra.extend(["--expect-keyid", k.1]);
        }
        let (code, text) = verify_dsse_peer(&envelope, &pubs, &extra);
        assert_eq!(code, 0, "securesystemslib on {id}: {text}");

        let bundles = r.body["bundles"].as_array().unwrap();
        assert_eq!(bundles.len(), keys.len(), "{id}: one bundle per signature");
        for (i, (bundle, (public, keyid, _))) in bundles.iter().zip(keys).enumerate() {
            let path = write_json(out.path(), &format!("{id}.bundle-{i}.json"), bundle);
            let (code, text) = verify_bundle_peer(
                &path,
                &[public.to_str().unwrap(), "--hint", keyid, "--intoto"],
            );
            assert_eq!(code, 0, "sigstore-js on {id} bundle {i}: {text}");
        }
    }
    stack.cleanup(&js).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_that_refuses_the_pin_fails_jobs_retryably_until_the_pin_is_fixed() {
    let hsm = softhsm();
    let pins = tempfile::tempdir().unwrap();
    let pin = pin_file(pins.path(), "9999");
    let mut stack = Stack::new("hsmpin");
    stack.configure(|c| {
        c.keys.push(
            hsm.key_config("hsm", &hsm.fault_token, EC_LABEL, &pin)
                .into(),
        );
        c.profiles.insert("hsm".into(), ProfileConfig::new(["hsm"]));
    });
    stack.spawn_worker();
    let (_c, js) = stack.connect().await;
    stack.wait_provisioned(&js).await;
    stack.wait_log(0, &["key not loaded", "\"hsm\""], Duration::from_secs(20));

    for (id, profile) in [("bad-1", "hsm"), ("bad-2", "hsm"), ("ok-1", "default")] {
        let body = serde_json::to_vec(&request(id, "acme", Some(profile))).unwrap();
        stack
            .publish(&js, "sign.requests.acme", &[("Nats-Msg-Id", id)], body)
            .await;
    }
    let results = stack
        .results(&js, 3, Duration::from_secs(30), Duration::from_millis(500))
        .await;
    assert_eq!(
        results.len(),
        3,
        "one result per job: {results:#?}\n{}",
        stack.log(0)
    );
    for r in &results {
        let id = r.header("Signer-Request-Id").unwrap_or("");
        if id == "ok-1" {
            assert!(r.completed(), "other keys keep signing: {:#}", r.body);
            continue;
        }
        assert!(!r.completed(), "{id}: {:#}", r.body);
        assert_eq!(r.code(), "key_unavailable", "{id}: {:#}", r.body);
        assert_eq!(r.body["error"]["retryable"], true, "{id}");
    }

    // fix the PIN: the Keyring's retry loads the key and new jobs sign with it
    std::fs::write(&pin, format!("{PIN}\n")).unwrap();
    stack.wait_log(0, &["key loaded", "\"hsm\""], Duration::from_secs(30));
    let body = serde_json::to_vec(&request("fixed-1", "acme", Some("hsm"))).unwrap();
    stack
        .publish(
            &js,
            "sign.requests.acme",
            &[("Nats-Msg-Id", "fixed-1")],
            body,
        )
        .await;
    let results = stack
        .results(&js, 4, Duration::from_secs(30), Duration::from_millis(300))
        .await;
    let fixed = results
        .iter()
        .find(|r| r.header("Signer-Request-Id") == Some("fixed-1"))
        .unwrap_or_else(|| panic!("no result for fixed-1: {}", stack.log(0)));
    assert!(fixed.completed(), "{:#}", fixed.body);
    assert_eq!(fixed.body["signers"][0]["source"], "pkcs11");
    let hsm_key = Pkcs11Key::open(
        "hsm",
        &hsm.key_config("hsm", &hsm.fault_token, EC_LABEL, &pin),
    )
    .unwrap()
    .identity();
    assert_eq!(fixed.body["signers"][0]["keyid"], hsm_key.keyid.as_str());
    let env: signer_actors::dsse::Envelope =
        serde_json::from_value(fixed.body["envelope"].clone()).unwrap();
    env.verify(std::slice::from_ref(&hsm_key.public_key), 1)
        .unwrap();
    stack.cleanup(&js).await;
}

/// `C_CloseAllSessions` on the slot of `token`, in this process: it closes every session of
/// the process on that token (and so logs it out), including the ones the key actors hold.
/// cryptoki 0.12 has no wrapper for it, so the function is looked up in the module as this
/// process already loaded it. Returns the CK_RV.
fn close_all_sessions(hsm: &SoftHsm, token: &str) -> u64 {
    use std::ffi::{CString, c_char, c_int, c_ulong, c_void};
    use std::os::unix::ffi::OsStrExt as _;
    unsafe extern "C" {
        fn dlopen(filename: *const c_char, flag: c_int) -> *mut c_void;
        fn dlsym(handle: *mut c_void, symbol: *const c_char) -> *mut c_void;
        fn dlclose(handle: *mut c_void) -> c_int;
    }
    const RTLD_NOW: c_int = 2;
    const RTLD_NOLOAD: c_int = 4;
    let ctx = stella_signer::keys::pkcs11::context(&hsm.module).unwrap();
    let slot = ctx
        .get_slots_with_token()
        .unwrap()
        .into_iter()
        .find(|s| {
            ctx.get_token_info(*s)
                .is_ok_and(|i| i.label().trim_end() == token)
        })
        .unwrap_or_else(|| panic!("no token {token}"));
    let path = CString::new(hsm.module.as_os_str().as_bytes()).unwrap();
    // SAFETY: RTLD_NOLOAD hands out the module `context` initialised above (no second copy
    // is loaded); C_CloseAllSessions has the PKCS#11 signature CK_RV (CK_SLOT_ID), both
    // unsigned long, and the handle is released after the call.
    unsafe {
        let module = dlopen(path.as_ptr(), RTLD_NOW | RTLD_NOLOAD);
        assert!(!module.is_null(), "{} is not loaded", hsm.module.display());
        let f = dlsym(module, c"C_CloseAllSessions".as_ptr());
        assert!(!f.is_null(), "no C_CloseAllSessions");
        let close: extern "C" fn(c_ulong) -> c_ulong = std::mem::transmute(f);
        let rv = close(slot.id() as c_ulong);
        dlclose(module);
        rv as u64
    }
}

/// A counter or gauge of this process's Prometheus recorder (`name{labels}`), 0 if absent.
fn metric(series: &str) -> f64 {
    stella_signer::telemetry::metrics()
        .unwrap()
        .render()
        .lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Runs `serve` in this process, the key pool and the faulty token with it, so that the
/// test can close the sessions the key actors hold. Logs go, as JSON like `serve` writes
/// them, to the stack's `worker-0.log` (only this test installs a log subscriber).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn closing_the_sessions_of_a_pool_mid_stream_loses_no_job_and_signs_none_twice() {
    let hsm = softhsm();
    let pins = tempfile::tempdir().unwrap();
    let pin = pin_file(pins.path(), PIN);
    // The token's public key, read independently of the signer (its session closes again).
    let token_key = Pkcs11Key::open(
        "hsm",
        &hsm.key_config("hsm", &hsm.session_token, EC_LABEL, &pin),
    )
    .unwrap()
    .identity();
    let stack = Stack::new("hsmpool");
    stack.configure(|c| {
        let key = Pkcs11KeyConfig {
            sessions: 2,
            ..hsm.key_config("hsm", &hsm.session_token, EC_LABEL, &pin)
        };
        c.keys.push(key.into());
        c.profiles.insert("hsm".into(), ProfileConfig::new(["hsm"]));
    });
    let log = std::fs::File::create(stack.dir.path().join("worker-0.log")).unwrap();
    tracing_subscriber::fmt()
        .json()
        .with_env_filter(tracing_subscriber::EnvFilter::new("info"))
        .with_writer(std::sync::Mutex::new(log))
        .try_init()
        .expect("no other test of this binary installs a log subscriber");
    let mut cfg = stack.cfg();
    // Room for the retries of the jobs that meet the closed sessions.
    cfg.nats.max_deliver = 10;
    cfg.worker.id = Some(format!("{}-w0", stack.id));
    cfg.validate().unwrap();
    assert_eq!(
        cfg.keys
            .iter()
            .find(|k| k.name() == "hsm")
            .unwrap()
            .sessions(),
        2
    );
    let serve = tokio::spawn(stella_signer::serve::run(cfg));
    let (_c, js) = stack.connect().await;
    stack.wait_provisioned(&js).await;
    let wait = |needles: &[&str]| {
        tokio::task::block_in_place(|| stack.wait_log(0, needles, Duration::from_secs(30)))
    };
    // two pool members, two sessions
    wait(&["key loaded", "\"hsm\"", "\"pool_slot\":0"]);
    wait(&["key loaded", "\"hsm\"", "\"pool_slot\":1"]);

    let publish = |phase: &'static str| {
        let stack = &stack;
        let js = &js;
        async move {
            let ids: Vec<String> = (0..10).map(|i| format!("{phase}-{i}")).collect();
            for id in &ids {
                let body = serde_json::to_vec(&request(id, "acme", Some("hsm"))).unwrap();
                stack
                    .publish(js, "sign.requests.acme", &[("Nats-Msg-Id", id)], body)
                    .await;
            }
            ids
        }
    };
    let mut ids = publish("before").await;
    let done = stack
        .results(&js, 10, Duration::from_secs(30), Duration::ZERO)
        .await;
    assert_eq!(done.len(), 10, "{done:#?}\n{}", stack.log(0));
    assert_eq!(metric("signer_actor_restarts_total{actor=\"key\"}"), 0.0);

    // The fault. Injected between two signatures: SoftHSM 2.6 frees a session that
    // C_CloseAllSessions closes under a C_Sign running on another thread, and the process
    // crashes (a property of the in-process injection, not of a token going away). Every
    // job published from here on meets sessions that are gone.
    assert_eq!(close_all_sessions(hsm, &hsm.session_token), 0, "CKR_OK");
    ids.extend(publish("during").await);
    // Each member fails on its next signature and is reloaded alone.
    for slot in ["\"pool_slot\":0", "\"pool_slot\":1"] {
        wait(&[
            "key actor stopped; reloading the key",
            "\"hsm\"",
            slot,
            "CKR_SESSION_HANDLE_INVALID",
        ]);
    }
    // ...and is back: two initial loads, two reloads.
    let hsm_loads = |log: &str| {
        log.lines()
            .filter(|l| l.contains("key loaded") && l.contains("\"hsm\""))
            .count()
    };
    let deadline = Instant::now() + common::stack::MIN_WAIT;
    while hsm_loads(&stack.log(0)) < 4 {
        assert!(Instant::now() < deadline, "not reloaded:\n{}", stack.log(0));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    ids.extend(publish("after").await);

    let results = stack
        .results(
            &js,
            ids.len(),
            Duration::from_secs(60),
            Duration::from_secs(1),
        )
        .await;
    let log = stack.log(0);
    assert_eq!(
        results.len(),
        ids.len(),
        "one result per job, none twice: {results:#?}\n{log}"
    );
    for id in &ids {
        let mine: Vec<_> = results
            .iter()
            .filter(|r| r.header("Signer-Request-Id") == Some(id))
            .collect();
        assert_eq!(mine.len(), 1, "{id}: {mine:#?}\n{log}");
        let r = mine[0];
        assert!(r.completed(), "{id}: {:#}\n{log}", r.body);
        assert_eq!(
            r.body["signers"][0]["keyid"],
            token_key.keyid.as_str(),
            "{id}"
        );
        assert_eq!(r.body["signers"][0]["source"], "pkcs11", "{id}");
        let env: signer_actors::dsse::Envelope =
            serde_json::from_value(r.body["envelope"].clone()).unwrap();
        env.verify(std::slice::from_ref(&token_key.public_key), 1)
            .unwrap_or_else(|e| panic!("{id}: {e}"));
    }
    // Signed once each: one audit decision per job, every one of them `signed`.
    let audit = stack.audit_events(&js).await;
    for id in &ids {
        let decisions: Vec<&Value> = audit
            .iter()
            .filter(|e| e["requestId"] == id.as_str())
            .map(|e| &e["decision"])
            .collect();
        assert_eq!(decisions, [&Value::from("signed")], "{id}");
    }

    // What operators see: retryable key_unavailable, one restart per pool member, and
    // one reload of each (no more: the jobs after the fault found the new sessions).
    assert!(
        log.lines()
            .any(|l| l.contains("retryable failure; NAK with backoff")
                && l.contains("key_unavailable")),
        "{log}"
    );
    assert!(metric("signer_retries_total{code=\"key_unavailable\"}") >= 1.0);
    assert_eq!(metric("signer_actor_restarts_total{actor=\"key\"}"), 2.0);
    assert_eq!(hsm_loads(&log), 4, "{log}");

    serve.abort();
    stack.cleanup(&js).await;
}
