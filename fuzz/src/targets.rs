//! One function per fuzz target (see the crate documentation).

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use serde_json::Value;
use signer_actors::bundle::Bundle;
use signer_actors::codec::{ContentType, decode_request, probe_ids};
use signer_actors::digest::parse_oci_sha256;
use signer_actors::dsse::{self, Envelope};
use signer_actors::keys::{KeySignature, KeySource, SignerIdentity};
use signer_actors::request::{
    PayloadSource, Poe, PoeFormat, SignRequest, is_valid_request_id, is_valid_tenant,
};
use signer_actors::statement::INTOTO_PAYLOAD_TYPE;
use stella_signer::control::command::{ControlCommand, ControlEnvelope, command_digest};
use stella_signer::entitlement::dpop::{DpopVerifier, ProofContext};
use stella_signer::entitlement::jwks::{JwksSource, JwksStore, KeySet, PublicKey as Jwk};
use stella_signer::entitlement::jws;
use stella_signer::entitlement::optok::{OpTokPolicy, OpTokVerifier};
use stella_signer::entitlement::poe::{JwtLicences, PoePolicy};
use stella_signer::replay::MemoryReplayCache;
use stella_signer::provenance::formats::{
    self, BundleCheck, DEFAULT_MAX_ENVELOPE_SIGNATURES, Limits,
};
use stella_signer::provenance::fuzzing as oci_fuzzing;
use stella_signer_tools::mint::{self, MintAlg};

use crate::{DIGEST_HEX, assert_bounded, keys};

/// A request body, as the job reads it (`actors/src/pipeline/job.rs`, steps decode and
/// validate): decode; on failure the refusal (`decode_request`, for
/// `unsupported_api_version`) and the lenient id probe; on success the id checks, the
/// scanner digest, `validate` and `payload_source` (which builds the canonical statement).
pub fn request(body: &[u8], ct: ContentType) {
    match ct.decode::<SignRequest>(body) {
        Err(_) => {
            match decode_request(body, ct) {
                Err(e) => assert_bounded(e),
                Ok(_) => panic!("decode_request accepted a body that does not decode"),
            }
            let probe = probe_ids(body, ct);
            let _ = probe.request_id.as_deref().map(is_valid_request_id);
            let _ = probe.tenant.as_deref().map(is_valid_tenant);
        }
        Ok(request) => {
            let _ = is_valid_request_id(&request.request_id);
            let _ = is_valid_tenant(&request.tenant);
            let _ = parse_oci_sha256(&request.scanner.image_digest);
            match request.validate().and_then(|_| request.payload_source()) {
                Ok(PayloadSource::Inline(p)) => {
                    assert!(!p.payload_type.is_empty(), "inline payload without a type");
                }
                Ok(PayloadSource::Referenced { payload_type, .. }) => {
                    assert!(
                        !payload_type.is_empty(),
                        "referenced payload without a type"
                    );
                }
                Err(e) => assert_bounded(e),
            }
            // A request that decodes is written back (results echo parts of it) and must
            // read back as itself.
            let again = ct.encode(&request).expect("a decoded request encodes");
            let back: SignRequest = ct.decode(&again).expect("an encoded request decodes");
            assert_eq!(back, request, "{ct:?} round trip changed the request");
        }
    }
    let _ = ContentType::from_header(std::str::from_utf8(body).ok());
}

/// The job's time in the JWS target: every date in the corpus is around it.
pub const JWS_NOW: u64 = 1_800_000_000;
const ISSUER: &str = "https://authority.fuzz";
const AUDIENCE: &str = "stella-signer";
const SCOPE: &str = "signer:sign";
const HTU: &str = "nats://signer.fuzz/sign.requests";
/// The OpTok the DPoP proofs of the target are bound to (`ath`).
const PROOF_OPTOK: &str = "eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiJmdXp6In0.c2ln";

struct JwsFixture {
    rt: tokio::runtime::Runtime,
    /// Authority, licensing and proof key: private PEM and kid.
    authority: (String, String),
    licensing: (String, String),
    proof: String,
    proof_jwk: Value,
    proof_jkt: String,
    optoks: OpTokVerifier,
    /// The Authority's key set the OpToks are verified against (the Entitlement actor's in
    /// the service).
    authority_keys: Arc<KeySet>,
    /// The licensing key set and the licence checks (the Entitlement actor keeps the set and
    /// the verified licences in the service).
    licensing_keys: Arc<KeySet>,
    licences: JwtLicences,
    poe: PoePolicy,
    dpop: DpopVerifier,
}

fn jws_fixture() -> &'static JwsFixture {
    static FIXTURE: OnceLock<JwsFixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime");
        // EdDSA signs and verifies fastest; an ES256 key in each set makes the fuzzer's
        // ES256 tokens reach ECDSA verification too.
        let (authority_pem, authority_jwk) = mint::generate_signing_key(MintAlg::EdDsa).unwrap();
        let (_, authority_es) = mint::generate_signing_key(MintAlg::Es256).unwrap();
        let (licensing_pem, licensing_jwk) = mint::generate_signing_key(MintAlg::EdDsa).unwrap();
        let (_, licensing_es) = mint::generate_signing_key(MintAlg::Es256).unwrap();
        let (proof_pem, proof_jwk) = mint::generate_signing_key(MintAlg::EdDsa).unwrap();
        let dir = std::env::temp_dir().join(format!("stella-signer-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let write = |name: &str, set: Value| {
            let path = dir.join(name);
            std::fs::write(&path, set.to_string()).unwrap();
            path
        };
        let authority_file = write(
            "authority.json",
            mint::jwks(&[authority_jwk.clone(), authority_es]),
        );
        let licensing_file = write(
            "licensing.json",
            mint::jwks(&[licensing_jwk.clone(), licensing_es]),
        );
        let open = |name, path| {
            rt.block_on(JwksStore::open(
                name,
                JwksSource::File(path),
                Duration::from_secs(3600),
            ))
            .unwrap()
        };
        let authority_keys = open("authority", authority_file);
        let licensing_keys = open("licensing", licensing_file);
        let _ = std::fs::remove_dir_all(&dir);
        let policy = OpTokPolicy {
            issuer: ISSUER.into(),
            audience: AUDIENCE.into(),
            scope: SCOPE.into(),
            skew: 60,
        };
        let replay = Arc::new(MemoryReplayCache::new(10_000, Duration::from_secs(600)));
        JwsFixture {
            optoks: OpTokVerifier::new(policy),
            authority_keys: authority_keys.keys(),
            licensing_keys: licensing_keys.keys(),
            licences: JwtLicences::new(
                JwksSource::File(dir.join("licensing.json")),
                licensing_keys.keys(),
                60,
                Duration::from_secs(3600),
                Duration::from_secs(3600),
            ),
            poe: PoePolicy::new(None, true, false),
            dpop: DpopVerifier::new(HTU, Duration::from_secs(300), replay),
            authority: (authority_pem, authority_jwk.kid.clone().unwrap()),
            licensing: (licensing_pem, licensing_jwk.kid.clone().unwrap()),
            proof_jkt: mint::jkt_of(&proof_jwk),
            proof_jwk: serde_json::to_value(proof_jwk.bare()).unwrap(),
            proof: proof_pem,
            rt,
        }
    })
}

/// The three compact JWS the entitlement gate reads from a request (OpTok, DPoP proof,
/// PoE licence) and the JWKS it reads from the Authority and the licensing service.
///
/// Mode (first byte % 5): 0, a raw token, given to every verifier; 1 to 3, `header` 0xFF
/// `claims` (two JSON values) signed by the Authority (1), the licensing (2) or the proof
/// key (3; its `jwk` is added to an object header that has none) and verified by the
/// verifier for it; 4, a JWKS document.
pub fn jws(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let fx = jws_fixture();
    let ctx = ProofContext {
        op_tok: PROOF_OPTOK,
        jkt: &fx.proof_jkt,
        binding: "fuzz-request",
        now: JWS_NOW,
    };
    match mode % 5 {
        0 => {
            let Ok(token) = std::str::from_utf8(rest) else {
                return;
            };
            let _ = jws::read_header(token);
            fx.rt.block_on(async {
                let _ = fx.optoks.verify(token, &fx.authority_keys, JWS_NOW);
                licence(fx, token);
                let _ = fx.dpop.verify(token, ctx).await;
            });
        }
        m @ 1..=3 => {
            let mut parts = rest.splitn(2, |&b| b == 0xFF);
            let (Some(h), Some(c)) = (parts.next(), parts.next()) else {
                return;
            };
            let (Ok(mut header), Ok(claims)) = (
                serde_json::from_slice::<Value>(h),
                serde_json::from_slice::<Value>(c),
            ) else {
                return;
            };
            let pem = match m {
                1 => &fx.authority.0,
                2 => &fx.licensing.0,
                _ => &fx.proof,
            };
            if let Some(obj) = header.as_object_mut() {
                match m {
                    1 => {
                        obj.entry("kid").or_insert(fx.authority.1.clone().into());
                    }
                    2 => {
                        obj.entry("kid").or_insert(fx.licensing.1.clone().into());
                    }
                    _ => {
                        obj.entry("jwk").or_insert(fx.proof_jwk.clone());
                    }
                }
            }
            let Ok(token) = mint::sign_compact(pem, &header, &claims) else {
                return;
            };
            fx.rt.block_on(async {
                match m {
                    1 => {
                        if let Ok((t, _key)) = fx.optoks.verify(&token, &fx.authority_keys, JWS_NOW)
                        {
                            let _ =
                                stella_signer::entitlement::optok::check_tenant(&t, "acme", None);
                        }
                    }
                    2 => licence(fx, &token),
                    _ => {
                        let _ = fx.dpop.verify(&token, ctx).await;
                    }
                }
            });
        }
        _ => {
            if let Ok((set, _skipped)) = KeySet::parse(rest) {
                let _ = set.find(None);
                let _ = set.find(Some("k"));
            }
            if let Ok(v) = serde_json::from_slice::<Value>(rest) {
                let _ = Jwk::from_jwk(&v);
            }
        }
    }
}

/// A licence JWT as the entitlement gate checks it: the PoE step for its format, the
/// signature and claim types against the licensing set, and the judgement for a tenant at the
/// job's time.
fn licence(fx: &JwsFixture, token: &str) {
    let poe = Poe {
        format: PoeFormat::Jwt,
        value: token.to_owned(),
    };
    let _ = fx.poe.step(&poe, "acme");
    if let Ok(licence) = fx.licences.verify(token, &fx.licensing_keys) {
        let _ = fx.licences.judge_licence(&licence, "acme", JWS_NOW);
    }
}

/// A command on `signer.control.keys` up to the operator signatures: the envelope as the
/// control server decodes it, the digest operators sign, the command and its scope, and the
/// header of each signature (the operator key lookup and the `jti` store need NATS).
pub fn control(data: &[u8]) {
    let Ok(envelope) = serde_json::from_slice::<ControlEnvelope>(data) else {
        return;
    };
    let _ = command_digest(&envelope.command);
    let _ = envelope.arguments();
    let _ = envelope.action();
    if let Ok(command) = serde_json::from_value::<ControlCommand>(envelope.command.clone()) {
        let _ = command.scope();
        let value = command.to_value();
        let back: ControlCommand =
            serde_json::from_value(value).expect("a command reads back from its own JSON");
        assert_eq!(back, command);
    }
    for token in &envelope.signatures {
        let _ = jws::read_header(token);
    }
}

fn sign(payload_type: &str, payload: &[u8]) -> Vec<u8> {
    keys()
        .signer
        .sign(&dsse::pae(payload_type, payload))
        .as_ref()
        .to_vec()
}

/// A DSSE layer as the provenance gate checks it (`formats::check_dsse`), and the same
/// envelope through `Envelope::verify` and `jcs_sha256` (the signer's own hash of it).
///
/// Mode (first byte): even, the rest is the envelope JSON; odd, the rest is the payload of
/// an envelope signed by a trusted key (payload type in-toto when the mode byte is 1 mod 4,
/// else the rest's first line), so the statement checks after the signature run.
pub fn dsse(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let keys = keys();
    let limits = Limits::default();
    let owned;
    let envelope_json: &[u8] = if mode % 2 == 0 {
        rest
    } else {
        let (payload_type, payload) = if mode % 4 == 1 {
            (INTOTO_PAYLOAD_TYPE.to_owned(), rest)
        } else {
            let mut split = rest.splitn(2, |&b| b == b'\n');
            let first = split.next().unwrap_or_default();
            (
                String::from_utf8_lossy(first).into_owned(),
                split.next().unwrap_or_default(),
            )
        };
        let sig = sign(&payload_type, payload);
        owned = serde_json::to_vec(&Envelope {
            payload: payload.to_vec(),
            payload_type,
            signatures: vec![dsse::Signature {
                keyid: String::new(),
                sig,
            }],
        })
        .expect("envelope encodes");
        &owned
    };
    let _ = formats::count_signatures(envelope_json, DEFAULT_MAX_ENVELOPE_SIGNATURES);
    let check = formats::check_dsse(envelope_json, &keys.trusted, DIGEST_HEX, &limits);
    if mode % 2 == 1 {
        assert!(
            !matches!(check, formats::Check::UntrustedKey),
            "an envelope signed by a trusted key was not verified: {check:?}"
        );
    }
    if let Ok(envelope) = serde_json::from_slice::<Envelope>(envelope_json)
        && envelope.signatures.len() <= DEFAULT_MAX_ENVELOPE_SIGNATURES
    {
        let _ = envelope.verify(&keys.trusted, 1);
        let _ = envelope.jcs_sha256();
    }
}

/// A Sigstore bundle: as the provenance gate reads one from a registry (`parse_bundle`,
/// `check_bundle`, and for a message signature `check_message_signature` with the input as
/// the manifest), and as `signer_actors::bundle::Bundle` (`check_structure`,
/// `verify_keyful`), which consumers' verification uses.
///
/// Mode (first byte): even, the rest is the bundle JSON; odd, the rest is the payload of a
/// bundle the signer itself would write for a trusted key (`Bundle::for_signature`).
pub fn bundle(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let keys = keys();
    let limits = Limits::default();
    let owned;
    let bundle_json: &[u8] = if mode % 2 == 0 {
        rest
    } else {
        let signed = KeySignature {
            sig: sign(INTOTO_PAYLOAD_TYPE, rest),
            identity: Arc::new(SignerIdentity::keyful(
                keys.trusted[0].clone(),
                KeySource::File,
            )),
            rfc3161_timestamp: None,
        };
        let bundle = Bundle::for_signature(INTOTO_PAYLOAD_TYPE, rest, &signed);
        assert_eq!(bundle.verify_keyful(&keys.trusted), Ok(0));
        owned = serde_json::to_vec(&bundle).expect("bundle encodes");
        &owned
    };
    match formats::parse_bundle(bundle_json) {
        Ok(parsed) => match formats::check_bundle(&parsed, &keys.trusted, DIGEST_HEX, &limits) {
            BundleCheck::NeedsManifest { signature } => {
                let _ =
                    formats::check_message_signature(rest, &signature, &keys.trusted, DIGEST_HEX);
            }
            BundleCheck::Done(check) => {
                if mode % 2 == 1 {
                    assert!(
                        !matches!(check, formats::Check::UntrustedKey),
                        "a bundle signed by a trusted key was not verified: {check:?}"
                    );
                }
            }
        },
        Err(_) => assert!(mode % 2 == 0, "the gate refused a bundle the signer wrote"),
    }
    if let Ok(b) = serde_json::from_slice::<Bundle>(bundle_json) {
        let _ = b.check_structure();
        if b.dsse_envelope.signatures.len() <= DEFAULT_MAX_ENVELOPE_SIGNATURES {
            let _ = b.verify_keyful(&keys.trusted);
        }
    }
}

/// What a registry serves as a referrers list or a signature manifest, read as the
/// provenance gate reads it (`provenance::fuzzing`: the gate's decoding, limits, ordering
/// and digest checks). Mode (first byte): even, a referrers index; odd, a manifest.
pub fn oci(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode % 2 == 0 {
        if let Ok(entries) = oci_fuzzing::referrers(rest, 64) {
            assert!(entries.len() <= 16, "more referrers read than the cap");
            for (digest, refusal) in entries {
                if refusal.is_none() {
                    assert!(parse_oci_sha256(&digest).is_ok());
                }
            }
        }
    } else if let Ok(layers) = oci_fuzzing::manifest(rest, DEFAULT_MAX_ENVELOPE_SIGNATURES) {
        let read = layers.iter().filter(|(kind, _)| kind.is_some()).count();
        assert!(read <= DEFAULT_MAX_ENVELOPE_SIGNATURES);
    }
}
