//! The gates of a run: their configuration (appended to the worker's) and the caller
//! identity each job carries (a fresh DPoP proof per job when the variant asks for one).

use std::path::Path;
use std::sync::Arc;

use serde_json::json;

use super::bench_err;
use crate::ToolError;

/// The `auth`/`poe` part of job `i`.
pub type Identity = Arc<dyn Fn(usize) -> serde_json::Value + Send + Sync>;

/// Gate configuration and per-job credentials.
#[derive(Clone)]
pub struct Gates {
    /// TOML appended to the worker's configuration.
    pub config: String,
    pub identity: Identity,
    pub label: String,
}

/// Which gates a run has on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Variant {
    /// Every gate on; one bearer OpTok and one licence reused by every job (as a scanner does).
    Bearer,
    /// Every gate on; a sender-constrained OpTok and a fresh DPoP proof (EdDSA) on every job.
    Dpop,
    /// Every gate disabled: the bare pipeline.
    Disabled,
}

/// Gate configuration and per-job credentials for `variant`, with keys made in `dir`.
pub fn gate_setup(variant: Variant, dir: &Path) -> Result<Gates, ToolError> {
    use crate::mint::{self, MintAlg};
    let issuer = "https://authority.bench.stella-ops.local";
    // DPoP jtis and quota buckets of this run only (Redis outlives runs)
    let mut rnd = [0u8; 4];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut rnd);
    let run = format!("bench-{}", hex::encode(rnd));
    let htu = "nats:sign.requests";
    let mk = |name: &str, alg| -> Result<(String, String, std::path::PathBuf), ToolError> {
        let (pem, jwk) = mint::generate_signing_key(alg).map_err(bench_err)?;
        let kid = jwk.kid.clone().unwrap_or_else(|| mint::jkt_of(&jwk));
        let path = dir.join(format!("{name}.jwks.json"));
        std::fs::write(
            &path,
            serde_json::to_vec(&mint::jwks(&[jwk])).map_err(bench_err)?,
        )
        .map_err(bench_err)?;
        Ok((pem, kid, path))
    };
    let (auth_pem, auth_kid, auth_jwks) = mk("authority", MintAlg::EdDsa)?;
    let (lic_pem, lic_kid, lic_jwks) = mk("licensing", MintAlg::Es256)?;
    let (proof_pem, proof_jwk) = mint::generate_signing_key(MintAlg::EdDsa).map_err(bench_err)?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let mut claims = json!({"iss": issuer, "sub": "svc:bench", "aud": ["signer"], "scope": "signer.sign",
        "tid": "acme", "iat": now, "nbf": now, "exp": now + 7200});
    if variant == Variant::Dpop {
        claims["cnf"] = json!({"jkt": mint::jkt_of(&proof_jwk)});
    }
    let op_tok = mint::mint_optok(&auth_pem, &auth_kid, &claims).map_err(bench_err)?;
    let poe = mint::mint_poe(
        &lic_pem,
        &lic_kid,
        &json!({"tid": "acme", "plan": "bench", "features": ["signer.sign"], "iat": now, "exp": now + 7200}),
    )
    .map_err(bench_err)?;
    let base = json!({"auth": {"opTok": op_tok}, "poe": {"format": "jwt", "value": poe}});
    let gates = format!(
        r#"[gates.entitlement]
issuer = "{issuer}"
jwks_file = "{auth_jwks}"
dpop_htu = "{htu}"
allow_bearer = {bearer}
dpop_max_age = "10m"
dpop_replay_prefix = "{run}:dpop:"
[gates.entitlement.poe]
licensing_jwks_file = "{lic_jwks}"
[gates.quota]
redis_prefix = "{run}:quota:"
[gates.quota.plans.bench]
requests_per_second = 1000000.0
burst = 1000000
max_concurrent = 100000
max_payload_bytes = 67108864
[gates.provenance]
allowlist = ["sha256:{zeros}"]
"#,
        auth_jwks = auth_jwks.display(),
        lic_jwks = lic_jwks.display(),
        bearer = variant == Variant::Bearer,
        zeros = "0".repeat(64),
    );
    let (config, identity, label): (String, Identity, &str) =
        match variant {
            Variant::Disabled => (
                "[gates.entitlement]\nmode = \"disabled\"\n[gates.quota]\nmode = \"disabled\"\n[gates.provenance]\nmode = \"disabled\"\n".into(),
                Arc::new(|_| json!({"auth": {"opTok": "bench"}, "poe": {"format": "jwt", "value": "bench"}})),
                "gates disabled",
            ),
            Variant::Bearer => (gates, Arc::new(move |_| base.clone()), "all gates, bearer OpTok reused"),
            Variant::Dpop => {
                let op_tok = op_tok.clone();
                let run = run.clone();
                (
                    gates,
                    Arc::new(move |i| {
                        let mut id = base.clone();
                        let t = std::time::SystemTime::now()
                            .duration_since(std::time::UNIX_EPOCH)
                            .map(|d| d.as_secs())
                            .unwrap_or(0);
                        id["auth"]["dpop"] =
                            mint::mint_dpop(&proof_pem, &op_tok, htu, t, &format!("{run}-{i}")).unwrap_or_default().into();
                        id
                    }),
                    "all gates, fresh DPoP proof per job",
                )
            }
        };
    Ok(Gates {
        config,
        identity,
        label: label.into(),
    })
}
