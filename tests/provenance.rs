//! The scanner release provenance gate against a real OCI registry: Debian's
//! `docker-registry` (distribution 2.8.2), one per test, on a free loopback port.
//!
//! distribution 2.8 has no OCI 1.1 referrers API (`GET /v2/<name>/referrers/<digest>` is a
//! plain 404), so DSSE referrers are found through the referrers tag schema; a test pins
//! that down, so a registry upgrade that adds the API shows up here.

mod common;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use common::registry::{TestRegistry, free_port};
use oci_client::Reference;
use oci_client::manifest::OCI_IMAGE_MEDIA_TYPE;
use oci_client::secrets::RegistryAuth;
use signer_actors::dsse::{Envelope, Signature, pae};
use signer_actors::error::{ErrorCode, SignerError};
use signer_actors::keys::{KeyAlgorithm, KeySigner as _};
use signer_actors::pipeline::{Provenance, ProvenanceLimits, ProvenanceMsg};
use signer_actors::ports::{
    ProvenanceGrant, ReleaseSignature, ReleaseVerifier, SignatureFormat, SignatureLocation,
};
use signer_actors::statement::INTOTO_PAYLOAD_TYPE;
use stella_signer::config::gates::ProvenanceGate;
use stella_signer::keys::file::FileKey;
use stella_signer::provenance::ReleaseVerifierImpl;
use stella_signer::provenance::credentials::Credentials;
use stella_signer::provenance::formats::{BUNDLE_V03_MEDIA_TYPE, DSSE_MEDIA_TYPE};
use stella_signer_tools::push::{BundleContentKind, COSIGN_SIGN_PREDICATE_TYPE, Pusher};

const PATH: &str = "stella-ops/scanner";

/// Two trusted release keys (one per algorithm) and one that is not trusted.
struct Keys {
    _dir: tempfile::TempDir,
    trusted_ec: FileKey,
    trusted_ed: FileKey,
    untrusted: FileKey,
    trusted_public: Vec<PathBuf>,
}

fn keys() -> Keys {
    let dir = tempfile::tempdir().unwrap();
    let generate = |alg, name: &str| {
        let g = FileKey::generate(alg, dir.path(), name).unwrap();
        (FileKey::load(&g.private_key, name).unwrap(), g.public_key)
    };
    let (trusted_ec, ec_pub) = generate(KeyAlgorithm::EcdsaP256Sha256, "release-ec");
    let (trusted_ed, ed_pub) = generate(KeyAlgorithm::Ed25519, "release-ed");
    let (untrusted, _) = generate(KeyAlgorithm::EcdsaP256Sha256, "someone-else");
    Keys {
        _dir: dir,
        trusted_ec,
        trusted_ed,
        untrusted,
        trusted_public: vec![ec_pub, ed_pub],
    }
}

fn gate(host: &str, keys: &Keys, cache_ttl: Duration) -> ProvenanceGate {
    ProvenanceGate {
        trusted_keys: keys.trusted_public.clone(),
        cache_ttl,
        insecure_registries: vec![host.to_string()],
        registry_timeout: Duration::from_secs(3),
        ..ProvenanceGate::default()
    }
}

fn verifier(host: &str, keys: &Keys, cache_ttl: Duration) -> ReleaseVerifierImpl {
    ReleaseVerifierImpl::from_config(&gate(host, keys, cache_ttl)).unwrap()
}

fn pusher(reg: &TestRegistry) -> Pusher {
    Pusher::new(&[reg.host()]).unwrap()
}

/// The signature a trusted verdict names.
fn trusted(result: Result<ProvenanceGrant, SignerError>) -> ReleaseSignature {
    match result {
        Ok(ProvenanceGrant::Trusted(found)) => found,
        other => panic!("expected trusted, got {other:?}"),
    }
}

fn untrusted(result: Result<ProvenanceGrant, SignerError>) -> String {
    match result {
        Err(e) if e.code() == ErrorCode::ProvenanceUntrusted => e.message().to_string(),
        other => panic!("expected provenance_untrusted, got {other:?}"),
    }
}

fn unavailable(result: Result<ProvenanceGrant, SignerError>) -> String {
    match result {
        Err(e) if e.code() == ErrorCode::ProvenanceUnavailable => {
            assert!(e.code().retryable());
            e.message().to_string()
        }
        other => panic!("expected provenance_unavailable, got {other:?}"),
    }
}

fn hex(digest: &str) -> &str {
    digest.strip_prefix("sha256:").unwrap()
}

#[tokio::test]
async fn cosign_signature_by_a_trusted_key_is_trusted() {
    let reg = TestRegistry::start();
    let keys = keys();
    let repo = reg.repository(PATH);
    let push = pusher(&reg);
    let v = verifier(&reg.host(), &keys, Duration::ZERO);

    for key in [&keys.trusted_ec, &keys.trusted_ed] {
        let digest = push.push_test_image(&repo).await.unwrap();
        push.sign_image_cosign(&repo, &digest, key).await.unwrap();
        let found = trusted(v.verify(&repo, &digest).await);
        assert_eq!(
            found,
            ReleaseSignature {
                keyid: key.identity().keyid.clone(),
                location: SignatureLocation::Tag,
                reference: format!("sha256-{}.sig", hex(&digest)),
                format: SignatureFormat::CosignSignature,
            },
            "{}",
            key.identity().algorithm.as_str()
        );
        // It was the cosign tag: no referrer exists for this image.
        let (status, _) = reg.get(&format!("/v2/{PATH}/manifests/sha256-{}", hex(&digest)));
        assert_eq!(status, 404);
    }
}

#[tokio::test]
async fn dsse_referrer_is_found_through_the_referrers_tag_schema() {
    let reg = TestRegistry::start();
    let keys = keys();
    let repo = reg.repository(PATH);
    let push = pusher(&reg);
    let v = verifier(&reg.host(), &keys, Duration::ZERO);
    let digest = push.push_test_image(&repo).await.unwrap();

    // distribution 2.8.2 has no referrers API: the route does not exist.
    let (status, body) = reg.get(&format!("/v2/{PATH}/referrers/{digest}"));
    assert_eq!((status, body.trim()), (404, "404 page not found"));

    let referrer = push
        .attach_dsse_referrer(&repo, &digest, &keys.trusted_ed)
        .await
        .unwrap();
    // The attestation is listed in the tag-schema index `sha256-<hex>`, and only there:
    // there is no cosign `.sig` tag to fall back on.
    let (status, body) = reg.get(&format!("/v2/{PATH}/manifests/sha256-{}", hex(&digest)));
    assert_eq!(status, 200, "{body}");
    let index: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(index["manifests"][0]["digest"], referrer.as_str());
    assert_eq!(index["manifests"][0]["artifactType"], DSSE_MEDIA_TYPE);
    let (status, _) = reg.get(&format!("/v2/{PATH}/manifests/sha256-{}.sig", hex(&digest)));
    assert_eq!(status, 404);
    let (status, body) = reg.get(&format!("/v2/{PATH}/manifests/{referrer}"));
    assert_eq!(status, 200);
    let manifest: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(manifest["subject"]["digest"], digest.as_str());
    assert_eq!(manifest["layers"][0]["mediaType"], DSSE_MEDIA_TYPE);

    assert_eq!(
        trusted(v.verify(&repo, &digest).await),
        ReleaseSignature {
            keyid: keys.trusted_ed.identity().keyid.clone(),
            location: SignatureLocation::Referrer,
            reference: referrer.clone(),
            format: SignatureFormat::DsseAttestation,
        }
    );

    // A second referrer is appended to the same index; an ECDSA one verifies as well.
    let other = push.push_test_image(&repo).await.unwrap();
    push.attach_dsse_referrer(&repo, &other, &keys.untrusted)
        .await
        .unwrap();
    push.attach_dsse_referrer(&repo, &other, &keys.trusted_ec)
        .await
        .unwrap();
    let (_, body) = reg.get(&format!("/v2/{PATH}/manifests/sha256-{}", hex(&other)));
    let index: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(index["manifests"].as_array().unwrap().len(), 2);
    trusted(v.verify(&repo, &other).await);
}

#[tokio::test]
async fn unsigned_image_is_untrusted() {
    let reg = TestRegistry::start();
    let keys = keys();
    let repo = reg.repository(PATH);
    let digest = pusher(&reg).push_test_image(&repo).await.unwrap();
    let v = verifier(&reg.host(), &keys, Duration::ZERO);
    let message = untrusted(v.verify(&repo, &digest).await);
    assert!(
        message.contains("has no cosign signature, DSSE attestation or Sigstore bundle"),
        "{message}"
    );
    assert!(message.contains(&digest), "{message}");
    // An image the registry does not have at all is no different.
    let absent = format!("sha256:{}", "0".repeat(64));
    untrusted(v.verify(&repo, &absent).await);
    let message = untrusted(v.verify(&reg.repository("no/such/repo"), &absent).await);
    assert!(message.contains("has no cosign signature"), "{message}");
}

#[tokio::test]
async fn signatures_by_untrusted_keys_are_untrusted() {
    let reg = TestRegistry::start();
    let keys = keys();
    let repo = reg.repository(PATH);
    let push = pusher(&reg);
    let v = verifier(&reg.host(), &keys, Duration::ZERO);
    let digest = push.push_test_image(&repo).await.unwrap();
    push.sign_image_cosign(&repo, &digest, &keys.untrusted)
        .await
        .unwrap();
    push.attach_dsse_referrer(&repo, &digest, &keys.untrusted)
        .await
        .unwrap();
    let message = untrusted(v.verify(&repo, &digest).await);
    assert!(
        message.contains("2 not made by any trusted key"),
        "{message}"
    );

    // A trusted signature next to them is found (the .sig tag now holds both).
    push.sign_image_cosign(&repo, &digest, &keys.trusted_ec)
        .await
        .unwrap();
    trusted(v.verify(&repo, &digest).await);
}

#[tokio::test]
async fn signature_made_for_another_digest_is_untrusted() {
    let reg = TestRegistry::start();
    let keys = keys();
    let repo = reg.repository(PATH);
    let push = pusher(&reg);
    let v = verifier(&reg.host(), &keys, Duration::ZERO);
    let a = push.push_test_image(&repo).await.unwrap();
    let b = push.push_test_image(&repo).await.unwrap();
    push.sign_image_cosign(&repo, &a, &keys.trusted_ec)
        .await
        .unwrap();
    trusted(v.verify(&repo, &a).await);

    // Copy A's valid signature manifest onto B's signature tag.
    let client = oci_client::Client::new(oci_client::client::ClientConfig {
        protocol: oci_client::client::ClientProtocol::HttpsExcept(vec![reg.host()]),
        ..Default::default()
    });
    let tag =
        |d: &str| Reference::with_tag(reg.host(), PATH.into(), format!("sha256-{}.sig", hex(d)));
    let (sig_manifest, _) = client
        .pull_manifest_raw(&tag(&a), &RegistryAuth::Anonymous, &[OCI_IMAGE_MEDIA_TYPE])
        .await
        .unwrap();
    client
        .push_manifest_raw(
            &tag(&b),
            sig_manifest,
            OCI_IMAGE_MEDIA_TYPE.parse().unwrap(),
        )
        .await
        .unwrap();
    let message = untrusted(v.verify(&repo, &b).await);
    assert!(
        message.contains(&format!("1 made by a trusted key for another image ({a})")),
        "{message}"
    );

    // The same with a DSSE attestation whose Statement names A, attached to C.
    let c = push.push_test_image(&repo).await.unwrap();
    let statement = serde_json::json!({
        "_type": "https://in-toto.io/Statement/v1",
        "subject": [{"name": repo, "digest": {"sha256": hex(&a)}}],
        "predicateType": "https://stella-ops.org/attestations/scanner-release/v1",
        "predicate": {}
    });
    let payload = serde_json::to_vec(&statement).unwrap();
    let envelope = envelope_for(&keys.trusted_ed, payload);
    push.attach_envelope(&repo, &c, &envelope).await.unwrap();
    let message = untrusted(v.verify(&repo, &c).await);
    assert!(message.contains("for another image"), "{message}");
    assert!(message.contains(&a), "{message}");
}

/// A DSSE envelope over `payload` signed by `key`.
fn envelope_for(key: &FileKey, payload: Vec<u8>) -> Envelope {
    let sig = key.sign_now(&pae(INTOTO_PAYLOAD_TYPE, &payload)).unwrap();
    Envelope {
        payload,
        payload_type: INTOTO_PAYLOAD_TYPE.into(),
        signatures: vec![Signature {
            keyid: key.identity().keyid.clone(),
            sig,
        }],
    }
}

#[tokio::test]
async fn unreachable_registry_is_unavailable_and_never_cached() {
    let keys = keys();
    // Nothing listens on this port.
    let host = format!("127.0.0.1:{}", free_port());
    let v = verifier(&host, &keys, Duration::from_secs(60));
    let message = unavailable(
        v.verify(
            &format!("{host}/{PATH}"),
            &format!("sha256:{}", "a".repeat(64)),
        )
        .await,
    );
    assert!(message.contains("unreachable"), "{message}");

    // A registry that goes down before the first check: unavailable, then trusted once
    // it is back (the unavailable answer was not remembered).
    let mut reg = TestRegistry::start();
    let repo = reg.repository(PATH);
    let push = pusher(&reg);
    let digest = push.push_test_image(&repo).await.unwrap();
    push.sign_image_cosign(&repo, &digest, &keys.trusted_ec)
        .await
        .unwrap();
    let v = verifier(&reg.host(), &keys, Duration::from_secs(60));
    reg.stop();
    unavailable(v.verify(&repo, &digest).await);
    unavailable(v.verify(&repo, &digest).await);
    reg.restart();
    trusted(v.verify(&repo, &digest).await);
}

/// The gate as the pipeline runs it: the adapter behind the Provenance actor, which owns
/// the verdict cache.
struct ActorGate(ractor::ActorRef<ProvenanceMsg>);

impl ActorGate {
    async fn new(host: &str, keys: &Keys, cache_ttl: Duration) -> Self {
        let port: Arc<dyn ReleaseVerifier> = Arc::new(verifier(host, keys, cache_ttl));
        let limits = ProvenanceLimits {
            cache_ttl,
            ..ProvenanceLimits::default()
        };
        let (actor, _) = ractor::Actor::spawn(None, Provenance, (port, limits))
            .await
            .unwrap();
        ActorGate(actor)
    }

    async fn verify(
        &self,
        repository: &str,
        image_digest: &str,
    ) -> Result<ProvenanceGrant, SignerError> {
        let (repository, image_digest) = (repository.to_string(), image_digest.to_string());
        match self
            .0
            .call(
                |reply| ProvenanceMsg::Verify {
                    tenant: "acme".into(),
                    repository,
                    image_digest,
                    reply,
                },
                Some(Duration::from_secs(30)),
            )
            .await
            .unwrap()
        {
            ractor::rpc::CallResult::Success(r) => r,
            other => panic!("the Provenance actor did not answer: {other:?}"),
        }
    }
}

impl Drop for ActorGate {
    fn drop(&mut self) {
        self.0.stop(None);
    }
}

#[tokio::test]
async fn cached_verdicts_answer_while_the_registry_is_down() {
    let keys = keys();
    let mut reg = TestRegistry::start();
    let repo = reg.repository(PATH);
    let push = pusher(&reg);
    let signed = push.push_test_image(&repo).await.unwrap();
    push.sign_image_cosign(&repo, &signed, &keys.trusted_ec)
        .await
        .unwrap();
    let unsigned = push.push_test_image(&repo).await.unwrap();

    let long = ActorGate::new(&reg.host(), &keys, Duration::from_secs(60)).await;
    let short = ActorGate::new(&reg.host(), &keys, Duration::from_millis(300)).await;
    for v in [&long, &short] {
        trusted(v.verify(&repo, &signed).await);
        untrusted(v.verify(&repo, &unsigned).await);
    }
    reg.stop();
    // Within cache_ttl: the registry is not needed, for either verdict.
    trusted(long.verify(&repo, &signed).await);
    let message = untrusted(long.verify(&repo, &unsigned).await);
    assert!(message.contains("has no cosign signature"), "{message}");
    // Past it: the registry is asked again, and is down.
    tokio::time::sleep(Duration::from_millis(400)).await;
    unavailable(short.verify(&repo, &signed).await);
    // The cache is per repository: the same digest elsewhere was never checked.
    unavailable(
        long.verify(&reg.repository("stella-ops/other"), &signed)
            .await,
    );
    // The adapter alone keeps nothing: without the actor, the registry is needed.
    unavailable(
        verifier(&reg.host(), &keys, Duration::from_secs(60))
            .verify(&repo, &signed)
            .await,
    );
}

#[tokio::test]
async fn allowlisted_digest_needs_no_registry() {
    let keys = keys();
    let host = format!("127.0.0.1:{}", free_port());
    let digest = format!("sha256:{}", "ab".repeat(32));
    let repo = format!("{host}/{PATH}");
    // With trusted keys as well, and with the allowlist alone.
    for trusted_keys in [keys.trusted_public.clone(), Vec::new()] {
        let v = ReleaseVerifierImpl::from_config(&ProvenanceGate {
            trusted_keys,
            allowlist: vec![digest.clone()],
            ..gate(&host, &keys, Duration::ZERO)
        })
        .unwrap();
        assert_eq!(
            v.verify(&repo, &digest).await,
            Ok(ProvenanceGrant::Allowlisted)
        );
    }
}

#[tokio::test]
async fn repository_without_a_registry_host_is_untrusted() {
    let keys = keys();
    let v = verifier("127.0.0.1:1", &keys, Duration::ZERO);
    let message = untrusted(v.verify(PATH, &format!("sha256:{}", "a".repeat(64))).await);
    assert_eq!(message, "repository must name a registry host");
}

#[tokio::test]
async fn cosign3_bundle_referrer_by_a_trusted_key_is_trusted() {
    let reg = TestRegistry::start();
    let keys = keys();
    let repo = reg.repository(PATH);
    let push = pusher(&reg);
    let v = verifier(&reg.host(), &keys, Duration::ZERO);

    for key in [&keys.trusted_ec, &keys.trusted_ed] {
        let digest = push.push_test_image(&repo).await.unwrap();
        let referrer = push.sign_image_cosign3(&repo, &digest, key).await.unwrap();
        // The layout of cosign's BUNDLE_SPEC.md: listed under the tag schema with the
        // bundle artifactType and content annotations; the bundle is the single layer.
        let (status, body) = reg.get(&format!("/v2/{PATH}/manifests/sha256-{}", hex(&digest)));
        assert_eq!(status, 200, "{body}");
        let index: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(index["manifests"][0]["digest"], referrer.as_str());
        assert_eq!(index["manifests"][0]["artifactType"], BUNDLE_V03_MEDIA_TYPE);
        assert_eq!(
            index["manifests"][0]["annotations"]["dev.sigstore.bundle.content"],
            "dsse-envelope"
        );
        let (_, body) = reg.get(&format!("/v2/{PATH}/manifests/{referrer}"));
        let manifest: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(manifest["artifactType"], BUNDLE_V03_MEDIA_TYPE);
        assert_eq!(
            manifest["config"]["mediaType"],
            "application/vnd.oci.empty.v1+json"
        );
        assert_eq!(manifest["layers"].as_array().unwrap().len(), 1);
        assert_eq!(manifest["layers"][0]["mediaType"], BUNDLE_V03_MEDIA_TYPE);
        assert_eq!(manifest["subject"]["digest"], digest.as_str());
        assert_eq!(
            manifest["annotations"]["dev.sigstore.bundle.predicateType"],
            COSIGN_SIGN_PREDICATE_TYPE
        );
        let (status, _) = reg.get(&format!("/v2/{PATH}/manifests/sha256-{}.sig", hex(&digest)));
        assert_eq!(status, 404, "no classic signature to fall back on");

        let found = trusted(v.verify(&repo, &digest).await);
        assert_eq!(
            (
                found.keyid.as_str(),
                found.location,
                found.reference.as_str(),
                found.format
            ),
            (
                key.identity().keyid.as_str(),
                SignatureLocation::Referrer,
                referrer.as_str(),
                SignatureFormat::SigstoreBundle
            ),
            "{}",
            key.identity().algorithm.as_str()
        );
    }
}

#[tokio::test]
async fn cosign3_bundle_by_another_key_is_untrusted() {
    let reg = TestRegistry::start();
    let keys = keys();
    let repo = reg.repository(PATH);
    let push = pusher(&reg);
    let v = verifier(&reg.host(), &keys, Duration::ZERO);
    let digest = push.push_test_image(&repo).await.unwrap();
    push.sign_image_cosign3(&repo, &digest, &keys.untrusted)
        .await
        .unwrap();
    let message = untrusted(v.verify(&repo, &digest).await);
    assert!(
        message.contains("1 not made by any trusted key"),
        "{message}"
    );
    // A bundle made for another image and attached here: named as such.
    let other = push.push_test_image(&repo).await.unwrap();
    let (_, body) = reg.get(&format!("/v2/{PATH}/manifests/sha256-{}", hex(&digest)));
    let index: serde_json::Value = serde_json::from_str(&body).unwrap();
    let (_, body) = reg.get(&format!(
        "/v2/{PATH}/manifests/{}",
        index["manifests"][0]["digest"].as_str().unwrap()
    ));
    let manifest: serde_json::Value = serde_json::from_str(&body).unwrap();
    let layer = manifest["layers"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let a = push.push_test_image(&repo).await.unwrap();
    push.sign_image_cosign3(&repo, &a, &keys.trusted_ed)
        .await
        .unwrap();
    let (_, body) = reg.get(&format!("/v2/{PATH}/manifests/sha256-{}", hex(&a)));
    let index_a: serde_json::Value = serde_json::from_str(&body).unwrap();
    let (_, body) = reg.get(&format!(
        "/v2/{PATH}/manifests/{}",
        index_a["manifests"][0]["digest"].as_str().unwrap()
    ));
    let manifest_a: serde_json::Value = serde_json::from_str(&body).unwrap();
    let bundle_a = blob(&reg, manifest_a["layers"][0]["digest"].as_str().unwrap()).await;
    assert_ne!(layer, manifest_a["layers"][0]["digest"].as_str().unwrap());
    push.attach_bundle(
        &repo,
        &other,
        &bundle_a,
        BundleContentKind::DsseEnvelope,
        None,
    )
    .await
    .unwrap();
    let message = untrusted(v.verify(&repo, &other).await);
    assert!(
        message.contains(&format!("1 made by a trusted key for another image ({a})")),
        "{message}"
    );
}

/// A blob's bytes, read with a plain client.
async fn blob(reg: &TestRegistry, digest: &str) -> Vec<u8> {
    let client = oci_client::Client::new(oci_client::client::ClientConfig {
        protocol: oci_client::client::ClientProtocol::HttpsExcept(vec![reg.host()]),
        ..Default::default()
    });
    let image = Reference::with_digest(reg.host(), PATH.into(), digest.to_string());
    let mut out = Vec::new();
    client
        .pull_blob(
            &image,
            &oci_client::manifest::OciDescriptor {
                digest: digest.to_string(),
                ..Default::default()
            },
            &mut out,
        )
        .await
        .unwrap();
    out
}

#[tokio::test]
async fn message_signature_bundle_is_checked_over_the_image_manifest() {
    let reg = TestRegistry::start();
    let keys = keys();
    let repo = reg.repository(PATH);
    let push = pusher(&reg);
    let v = verifier(&reg.host(), &keys, Duration::ZERO);
    for key in [&keys.trusted_ec, &keys.trusted_ed] {
        let digest = push.push_test_image(&repo).await.unwrap();
        let bundle = push
            .message_signature_bundle(&repo, &digest, key)
            .await
            .unwrap();
        push.attach_bundle(
            &repo,
            &digest,
            &bundle,
            BundleContentKind::MessageSignature,
            None,
        )
        .await
        .unwrap();
        trusted(v.verify(&repo, &digest).await);
    }
    let digest = push.push_test_image(&repo).await.unwrap();
    let bundle = push
        .message_signature_bundle(&repo, &digest, &keys.untrusted)
        .await
        .unwrap();
    push.attach_bundle(
        &repo,
        &digest,
        &bundle,
        BundleContentKind::MessageSignature,
        None,
    )
    .await
    .unwrap();
    let message = untrusted(v.verify(&repo, &digest).await);
    assert!(
        message.contains("1 not made by any trusted key"),
        "{message}"
    );
}

#[tokio::test]
async fn keyless_and_oversized_bundles_are_refused() {
    let reg = TestRegistry::start();
    let keys = keys();
    let repo = reg.repository(PATH);
    let push = pusher(&reg);
    let v = verifier(&reg.host(), &keys, Duration::ZERO);

    // A keyless bundle (Fulcio certificate): refused, even though a trusted key's
    // signature is inside, with a reason that says why.
    let digest = push.push_test_image(&repo).await.unwrap();
    let statement = serde_json::json!({
        "_type": "https://in-toto.io/Statement/v1",
        "subject": [{"name": repo, "digest": {"sha256": hex(&digest)}}],
        "predicateType": COSIGN_SIGN_PREDICATE_TYPE,
        "predicate": {}
    });
    let envelope = envelope_for(&keys.trusted_ec, serde_json::to_vec(&statement).unwrap());
    let keyless = serde_json::json!({
        "mediaType": BUNDLE_V03_MEDIA_TYPE,
        "verificationMaterial": {"certificate": {"rawBytes": "MIIBkzCCATmgAwIBAgIUAA=="}, "tlogEntries": []},
        "dsseEnvelope": envelope,
    });
    push.attach_bundle(
        &repo,
        &digest,
        &serde_json::to_vec(&keyless).unwrap(),
        BundleContentKind::DsseEnvelope,
        None,
    )
    .await
    .unwrap();
    let message = untrusted(v.verify(&repo, &digest).await);
    assert!(
        message.contains("1 keyless Sigstore bundle(s) (Fulcio certificate)"),
        "{message}"
    );

    // Two signatures in one bundle: refused before checking either.
    let digest = push.push_test_image(&repo).await.unwrap();
    let mut doubled = serde_json::to_value(envelope_for(
        &keys.trusted_ec,
        serde_json::to_vec(&serde_json::json!({
            "_type": "https://in-toto.io/Statement/v1",
            "subject": [{"name": repo, "digest": {"sha256": hex(&digest)}}],
            "predicateType": COSIGN_SIGN_PREDICATE_TYPE,
            "predicate": {}
        }))
        .unwrap(),
    ))
    .unwrap();
    let sig = doubled["signatures"][0].clone();
    doubled["signatures"] = serde_json::json!([sig.clone(), sig]);
    let bundle = serde_json::json!({
        "mediaType": BUNDLE_V03_MEDIA_TYPE,
        "verificationMaterial": {"publicKey": {"hint": ""}},
        "dsseEnvelope": doubled,
    });
    push.attach_bundle(
        &repo,
        &digest,
        &serde_json::to_vec(&bundle).unwrap(),
        BundleContentKind::DsseEnvelope,
        None,
    )
    .await
    .unwrap();
    let message = untrusted(v.verify(&repo, &digest).await);
    assert!(message.contains("has 2 signatures"), "{message}");

    // A bundle over the size cap is not fetched (its declared size is enough).
    let digest = push.push_test_image(&repo).await.unwrap();
    let big = vec![b' '; 4 * 1024 * 1024 + 300 * 1024];
    push.attach_bundle(&repo, &digest, &big, BundleContentKind::DsseEnvelope, None)
        .await
        .unwrap();
    let message = untrusted(v.verify(&repo, &digest).await);
    assert!(message.contains("over the"), "{message}");
    assert!(message.contains("-byte limit"), "{message}");
}

const USER: &str = "scanner-ci";
const PASSWORD: &str = "correct horse battery staple";

/// A Docker `config.json` with `auth` (base64 user:password) for `registry`.
fn docker_config(dir: &std::path::Path, registry: &str, user: &str, password: &str) -> PathBuf {
    use base64::Engine as _;
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    let path = dir.join("config.json");
    std::fs::write(
        &path,
        serde_json::to_vec(&serde_json::json!({"auths": {registry: {"auth": auth}}})).unwrap(),
    )
    .unwrap();
    path
}

#[tokio::test]
async fn private_registry_is_read_with_credentials_and_refused_without() {
    let reg = TestRegistry::start_with_htpasswd(USER, PASSWORD);
    let keys = keys();
    let repo = reg.repository(PATH);
    // Anonymous access really is refused by this registry.
    let (status, _) = reg.get(&format!("/v2/{PATH}/tags/list"));
    assert_eq!(status, 401);
    let push = Pusher::with_credentials(
        &[reg.host()],
        Credentials::default().with_basic(&reg.host(), USER, PASSWORD),
    )
    .unwrap();
    let classic = push.push_test_image(&repo).await.unwrap();
    push.sign_image_cosign(&repo, &classic, &keys.trusted_ec)
        .await
        .unwrap();
    let bundled = push.push_test_image(&repo).await.unwrap();
    push.sign_image_cosign3(&repo, &bundled, &keys.trusted_ed)
        .await
        .unwrap();

    // Credentials from a Docker config.json: both signature places are read.
    let dir = tempfile::tempdir().unwrap();
    let v = ReleaseVerifierImpl::from_config(&ProvenanceGate {
        docker_config: Some(docker_config(dir.path(), &reg.host(), USER, PASSWORD)),
        ..gate(&reg.host(), &keys, Duration::ZERO)
    })
    .unwrap();
    for digest in [&classic, &bundled] {
        trusted(v.verify(&repo, digest).await);
    }

    // Without credentials: unavailable (retryable), saying what is missing.
    let v = verifier(&reg.host(), &keys, Duration::from_secs(60));
    let message = unavailable(v.verify(&repo, &bundled).await);
    assert!(
        message.contains(&format!(
            "registry {} requires credentials and none are configured for it",
            reg.host()
        )),
        "{message}"
    );
    // With a wrong password: unavailable, saying they were refused.
    let v = ReleaseVerifierImpl::from_config(&ProvenanceGate {
        docker_config: Some(docker_config(dir.path(), &reg.host(), USER, "wrong")),
        ..gate(&reg.host(), &keys, Duration::ZERO)
    })
    .unwrap();
    let message = unavailable(v.verify(&repo, &classic).await);
    assert!(
        message.contains("refused the configured credentials"),
        "{message}"
    );
}

/// The worker, with `[gates.provenance]` pointed at a private registry: a job whose scanner
/// image carries a cosign 3 bundle is signed when the worker has the registry's
/// credentials (from a Docker config.json), and fails `provenance_unavailable`, audited,
/// when it has none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_reads_a_private_registry_with_credentials_and_fails_jobs_without() {
    use common::stack::{Stack, disabled_gates, request, verify_completed};

    let reg = TestRegistry::start_with_htpasswd(USER, PASSWORD);
    let keys = keys();
    let repo = reg.repository(PATH);
    let push = Pusher::with_credentials(
        &[reg.host()],
        Credentials::default().with_basic(&reg.host(), USER, PASSWORD),
    )
    .unwrap();
    let digest = push.push_test_image(&repo).await.unwrap();
    push.sign_image_cosign3(&repo, &digest, &keys.trusted_ec)
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = docker_config(dir.path(), &reg.host(), USER, PASSWORD);

    for (tag, with_credentials) in [("provcred", true), ("provanon", false)] {
        let mut gates = disabled_gates();
        gates.provenance = ProvenanceGate {
            trusted_keys: vec![keys.trusted_public[0].clone()],
            insecure_registries: vec![reg.host()],
            docker_config: with_credentials.then(|| config.clone()),
            ..ProvenanceGate::default()
        };
        let mut stack = Stack::with_gates(tag, gates);
        stack.spawn_worker();
        let (_c, js) = stack.connect().await;
        stack.wait_provisioned(&js).await;
        let mut body = request("job-1", "acme", None);
        body["scanner"] = serde_json::json!({"repository": repo, "imageDigest": digest});
        stack
            .publish(
                &js,
                "sign.requests.acme",
                &[("Nats-Msg-Id", "job-1")],
                serde_json::to_vec(&body).unwrap(),
            )
            .await;
        let results = stack
            .results(&js, 1, Duration::from_secs(60), Duration::from_millis(500))
            .await;
        assert_eq!(results.len(), 1, "{results:#?}\n{}", stack.log(0));
        let r = &results[0];
        let audit = stack.audit_events(&js).await;
        let event = audit
            .iter()
            .find(|e| e["requestId"] == "job-1")
            .unwrap_or_else(|| panic!("no audit event for job-1: {audit:#?}"));
        if with_credentials {
            assert!(r.completed(), "{:#}\n{}", r.body, stack.log(0));
            verify_completed(&stack, r);
            assert_eq!(event["provenance"]["verdict"], "trusted", "{event:#}");
        } else {
            assert_eq!(r.code(), "provenance_unavailable", "{:#}", r.body);
            let message = r.body["error"]["message"].as_str().unwrap_or("");
            assert!(
                message.contains("requires credentials and none are configured"),
                "{message}"
            );
            assert_eq!(event["provenance"]["verdict"], "unavailable", "{event:#}");
        }
        assert_eq!(event["provenance"]["scannerDigest"], digest.as_str());
        stack.cleanup(&js).await;
    }
}

/// The token flow: the registry answers `Bearer realm=...,service=...`; the gate gets a
/// token from the realm with the configured basic credentials and the image's pull scope,
/// then reads with it. Without credentials the token server refuses, and so does the
/// registry.
#[tokio::test]
async fn token_auth_registry_is_read_through_the_bearer_token_flow() {
    let (reg, tokens) = TestRegistry::start_with_token_server(USER, PASSWORD);
    let keys = keys();
    let repo = reg.repository(PATH);
    let (status, _) = reg.get(&format!("/v2/{PATH}/tags/list"));
    assert_eq!(status, 401);
    let push = Pusher::with_credentials(
        &[reg.host()],
        Credentials::default().with_basic(&reg.host(), USER, PASSWORD),
    )
    .unwrap();
    let digest = push.push_test_image(&repo).await.unwrap();
    push.sign_image_cosign3(&repo, &digest, &keys.trusted_ec)
        .await
        .unwrap();
    tokens.requests.lock().unwrap().clear();

    let dir = tempfile::tempdir().unwrap();
    let v = ReleaseVerifierImpl::from_config(&ProvenanceGate {
        docker_config: Some(docker_config(dir.path(), &reg.host(), USER, PASSWORD)),
        ..gate(&reg.host(), &keys, Duration::ZERO)
    })
    .unwrap();
    trusted(v.verify(&repo, &digest).await);
    {
        let seen = tokens.requests.lock().unwrap();
        assert!(!seen.is_empty(), "the token server was never asked");
        for (authorization, query) in seen.iter() {
            assert!(
                authorization
                    .as_deref()
                    .is_some_and(|a| a.starts_with("Basic ")),
                "{authorization:?}"
            );
            assert!(
                query.contains("scope=repository%3Astella-ops%2Fscanner%3Apull")
                    || query.contains("scope=repository:stella-ops/scanner:pull"),
                "{query}"
            );
            assert!(
                query.contains(&format!("service={}", common::registry::TOKEN_SERVICE)),
                "{query}"
            );
        }
    }

    let v = verifier(&reg.host(), &keys, Duration::ZERO);
    let message = unavailable(v.verify(&repo, &digest).await);
    assert!(
        message.contains("requires credentials and none are configured"),
        "{message}"
    );
}

/// The work caps: a referrers list longer than `max_referrers`, and a `.sig` manifest with
/// more signature layers than `max_envelope_signatures`, are refused unread, even when a
/// trusted signature is among them.
#[tokio::test]
async fn crowded_referrers_and_signature_manifests_are_refused_unread() {
    let reg = TestRegistry::start();
    let keys = keys();
    let repo = reg.repository(PATH);
    let push = pusher(&reg);
    let capped = |max_referrers, max_envelope_signatures| {
        ReleaseVerifierImpl::from_config(&ProvenanceGate {
            max_referrers,
            max_envelope_signatures,
            ..gate(&reg.host(), &keys, Duration::ZERO)
        })
        .unwrap()
    };

    // Three referrers, the last one trusted.
    let digest = push.push_test_image(&repo).await.unwrap();
    for key in [&keys.untrusted, &keys.untrusted, &keys.trusted_ec] {
        push.attach_dsse_referrer(&repo, &digest, key)
            .await
            .unwrap();
    }
    trusted(capped(3, 8).verify(&repo, &digest).await);
    let message = untrusted(capped(2, 8).verify(&repo, &digest).await);
    assert!(message.contains("max_referrers"), "{message}");

    // A .sig manifest with three simple-signing layers, the last one trusted.
    let other = reg.repository("stella-ops/other");
    let digest = push.push_test_image(&other).await.unwrap();
    for key in [&keys.untrusted, &keys.untrusted, &keys.trusted_ec] {
        push.sign_image_cosign(&other, &digest, key).await.unwrap();
    }
    trusted(capped(64, 3).verify(&other, &digest).await);
    let message = untrusted(capped(64, 2).verify(&other, &digest).await);
    assert!(
        message.contains("3 signature layers, more than 2"),
        "{message}"
    );
}
