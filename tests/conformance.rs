//! What we emit is accepted by independent verifiers (securesystemslib, sigstore-js), and
//! what they reject, `stella-signer verify` rejects too.

mod common;

use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use common::*;
use serde_json::Value;

struct Signed {
    envelope: PathBuf,
    bundles: Vec<PathBuf>,
}

fn sign_local(dir: &Path, tag: &str, statement: &Path, keys: &[&Path]) -> Signed {
    let envelope = dir.join(format!("{tag}.envelope.json"));
    let bundle_dir = dir.join(format!("{tag}-bundles"));
    let mut cmd = signer();
    cmd.arg("sign-local");
    for k in keys {
        cmd.arg("--key").arg(k);
    }
    cmd.arg("--statement")
        .arg(statement)
        .arg("--out")
        .arg(&envelope)
        .arg("--bundles-out")
        .arg(&bundle_dir);
    let (code, out) = run(cmd);
    assert_eq!(code, 0, "sign-local: {out}");
    let mut bundles: Vec<PathBuf> = std::fs::read_dir(&bundle_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    bundles.sort();
    assert_eq!(bundles.len(), keys.len(), "one bundle per signature");
    Signed { envelope, bundles }
}

fn our_verify(file: &Path, pubs: &[&Path], threshold: Option<usize>) -> (i32, String) {
    let mut cmd = signer();
    cmd.arg("verify").arg(file);
    for p in pubs {
        cmd.arg("--key").arg(p);
    }
    if let Some(t) = threshold {
        cmd.arg("--threshold").arg(t.to_string());
    }
    run(cmd)
}

fn read(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

fn write(dir: &Path, name: &str, value: &Value) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, serde_json::to_vec_pretty(value).unwrap()).unwrap();
    path
}

fn second_statement(dir: &Path) -> PathBuf {
    let mut st = read(&example_statement());
    st["predicate"]["policy"]["verdict"] = "fail".into();
    write(dir, "statement-b.json", &st)
}

#[test]
fn every_key_type_alone_and_together_verifies_with_the_peers() {
    let dir = tempfile::tempdir().unwrap();
    let (ec_key, ec_pub, ec_id) = generate_key(dir.path(), "ecdsa-p256", "ec");
    let (ed_key, ed_pub, ed_id) = generate_key(dir.path(), "ed25519", "ed");
    type Key<'a> = (&'a Path, &'a Path, &'a str);
    let cases: [(&str, Vec<Key>); 3] = [
        ("ec", vec![(&ec_key, &ec_pub, &ec_id)]),
        ("ed", vec![(&ed_key, &ed_pub, &ed_id)]),
        (
            "both",
            vec![(&ec_key, &ec_pub, &ec_id), (&ed_key, &ed_pub, &ed_id)],
        ),
    ];
    for (tag, keys) in cases {
        let privs: Vec<&Path> = keys.iter().map(|k| k.0).collect();
        let pubs: Vec<&Path> = keys.iter().map(|k| k.1).collect();
        let signed = sign_local(dir.path(), tag, &example_statement(), &privs);

        let mut extra = vec!["--intoto"];
        for k in &keys {
            extra.extend(["--expect-keyid", k.2]);
        }
        let (code, out) = verify_dsse_peer(&signed.envelope, &pubs, &extra);
        assert_eq!(code, 0, "securesystemslib on {tag}: {out}");
        let (code, out) = our_verify(&signed.envelope, &pubs, None);
        assert_eq!(code, 0, "stella-signer verify on {tag}: {out}");

        let env = read(&signed.envelope);
        assert_eq!(env["payloadType"], "application/vnd.in-toto+json");
        for (i, sig) in env["signatures"].as_array().unwrap().iter().enumerate() {
            assert_eq!(
                sig["keyid"], keys[i].2,
                "keyid is sha256(SPKI DER) of key {i}"
            );
        }

        for (bundle, key) in signed.bundles.iter().zip(&keys) {
            let b = read(bundle);
            assert_eq!(
                b["mediaType"],
                "application/vnd.dev.sigstore.bundle.v0.3+json"
            );
            assert_eq!(b["verificationMaterial"]["publicKey"]["hint"], key.2);
            assert_eq!(
                b["verificationMaterial"]["tlogEntries"],
                serde_json::json!([])
            );
            let (code, out) = verify_bundle_peer(
                bundle,
                &[key.1.to_str().unwrap(), "--hint", key.2, "--intoto"],
            );
            assert_eq!(code, 0, "sigstore-js on {}: {out}", bundle.display());
            let (code, out) = verify_dsse_peer(bundle, &[key.1], &["--intoto"]);
            assert_eq!(code, 0, "securesystemslib on {}: {out}", bundle.display());
            let (code, out) = our_verify(bundle, &[key.1], None);
            assert_eq!(
                code,
                0,
                "stella-signer verify on {}: {out}",
                bundle.display()
            );
        }
    }
}

/// Each tampered document, how it was made, and which public keys to check it with.
fn tampered_cases(dir: &Path) -> Vec<(String, PathBuf, Vec<PathBuf>, bool)> {
    let (ec_key, ec_pub, _) = generate_key(dir, "ecdsa-p256", "ec");
    let (ed_key, ed_pub, _) = generate_key(dir, "ed25519", "ed");
    let (_, other_pub, _) = generate_key(dir, "ecdsa-p256", "other");
    let a = sign_local(dir, "a", &example_statement(), &[&ec_key, &ed_key]);
    let b = sign_local(dir, "b", &second_statement(dir), &[&ec_key, &ed_key]);
    let env_a = read(&a.envelope);
    let env_b = read(&b.envelope);
    let both = vec![ec_pub.clone(), ed_pub.clone()];
    let mut cases = Vec::new();

    let flip_payload = |doc: &Value| {
        let mut doc = doc.clone();
        let mut payload = STANDARD.decode(doc["payload"].as_str().unwrap()).unwrap();
        let mid = payload.len() / 2;
        payload[mid] ^= 0x01;
        doc["payload"] = STANDARD.encode(payload).into();
        doc
    };
    let mut retyped = env_a.clone();
    retyped["payloadType"] = "application/vnd.in-toto+jsonx".into();
    let mut swapped = env_a.clone();
    swapped["signatures"] = env_b["signatures"].clone();
    let mut raw_rs = env_a.clone();
    let der = STANDARD
        .decode(raw_rs["signatures"][0]["sig"].as_str().unwrap())
        .unwrap();
    raw_rs["signatures"][0]["sig"] = STANDARD.encode(der_to_raw(&der)).into();

    for (name, doc, keys) in [
        ("envelope-payload-byte", flip_payload(&env_a), both.clone()),
        ("envelope-payload-type", retyped, both.clone()),
        ("envelope-signatures-swapped", swapped, both.clone()),
        ("envelope-raw-r-s", raw_rs, vec![ec_pub.clone()]),
        ("envelope-wrong-key", env_a.clone(), vec![other_pub.clone()]),
    ] {
        cases.push((
            name.to_string(),
            write(dir, &format!("{name}.json"), &doc),
            keys,
            false,
        ));
    }

    let bundle_a = read(&a.bundles[0]);
    let bundle_b = read(&b.bundles[0]);
    let mut payload_flipped = bundle_a.clone();
    payload_flipped["dsseEnvelope"] = flip_payload(&bundle_a["dsseEnvelope"]);
    let mut retyped = bundle_a.clone();
    retyped["dsseEnvelope"]["payloadType"] = "text/plain".into();
    let mut swapped = bundle_a.clone();
    swapped["dsseEnvelope"]["signatures"] = bundle_b["dsseEnvelope"]["signatures"].clone();
    let mut raw_rs = bundle_a.clone();
    let der = STANDARD
        .decode(
            raw_rs["dsseEnvelope"]["signatures"][0]["sig"]
                .as_str()
                .unwrap(),
        )
        .unwrap();
    raw_rs["dsseEnvelope"]["signatures"][0]["sig"] = STANDARD.encode(der_to_raw(&der)).into();
    for (name, doc, key) in [
        ("bundle-payload-byte", payload_flipped, ec_pub.clone()),
        ("bundle-payload-type", retyped, ec_pub.clone()),
        ("bundle-signatures-swapped", swapped, ec_pub.clone()),
        ("bundle-raw-r-s", raw_rs, ec_pub.clone()),
        ("bundle-wrong-key", bundle_a.clone(), other_pub.clone()),
    ] {
        cases.push((
            name.to_string(),
            write(dir, &format!("{name}.json"), &doc),
            vec![key],
            true,
        ));
    }
    cases
}

#[test]
fn tampered_envelopes_and_bundles_are_rejected_by_us_and_by_the_peers() {
    let dir = tempfile::tempdir().unwrap();
    for (name, path, keys, is_bundle) in tampered_cases(dir.path()) {
        let keys: Vec<&Path> = keys.iter().map(PathBuf::as_path).collect();
        let (code, out) = our_verify(&path, &keys, None);
        assert_eq!(code, 1, "stella-signer verify accepted {name}: {out}");
        assert!(out.starts_with("FAIL: "), "{name}: {out}");
        let (code, out) = verify_dsse_peer(&path, &keys, &[]);
        assert_eq!(code, 1, "securesystemslib accepted {name}: {out}");
        if is_bundle {
            let (code, out) = verify_bundle_peer(&path, &[keys[0].to_str().unwrap()]);
            assert_eq!(code, 1, "sigstore-js accepted {name}: {out}");
        }
    }
}

#[test]
fn threshold_counts_distinct_trusted_keys_like_securesystemslib() {
    let dir = tempfile::tempdir().unwrap();
    let (ec_key, ec_pub, _) = generate_key(dir.path(), "ecdsa-p256", "ec");
    let (ed_key, ed_pub, _) = generate_key(dir.path(), "ed25519", "ed");
    let (_, other_pub, _) = generate_key(dir.path(), "ed25519", "other");
    let signed = sign_local(dir.path(), "t", &example_statement(), &[&ec_key, &ed_key]);
    for (keys, threshold, expect) in [
        (vec![&ec_pub, &other_pub], 1, 0),
        (vec![&ec_pub, &other_pub], 2, 1),
        (vec![&ec_pub, &ed_pub, &other_pub], 2, 0),
        (vec![&ec_pub, &ed_pub, &other_pub], 3, 1),
    ] {
        let keys: Vec<&Path> = keys.iter().map(|p| p.as_path()).collect();
        let (ours, out) = our_verify(&signed.envelope, &keys, Some(threshold));
        assert_eq!(ours, expect, "ours, threshold {threshold}: {out}");
        let t = threshold.to_string();
        let (peer, out) = verify_dsse_peer(&signed.envelope, &keys, &["--threshold", &t]);
        assert_eq!(
            peer, expect,
            "securesystemslib, threshold {threshold}: {out}"
        );
    }
}

#[test]
fn url_safe_base64_envelopes_are_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let (ed_key, ed_pub, _) = generate_key(dir.path(), "ed25519", "ed");
    let signed = sign_local(dir.path(), "u", &example_statement(), &[&ed_key]);
    let text = std::fs::read_to_string(&signed.envelope).unwrap();
    let mut env: Value = serde_json::from_str(&text).unwrap();
    let to_url = |s: &str| {
        s.replace('+', "-")
            .replace('/', "_")
            .trim_end_matches('=')
            .to_string()
    };
    env["payload"] = to_url(env["payload"].as_str().unwrap()).into();
    env["signatures"][0]["sig"] = to_url(env["signatures"][0]["sig"].as_str().unwrap()).into();
    let path = write(dir.path(), "url.json", &env);
    let (code, out) = our_verify(&path, &[&ed_pub], None);
    assert_eq!(code, 0, "{out}");
}
