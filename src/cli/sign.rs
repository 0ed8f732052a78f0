//! `stella-signer sign sbom|report`: the flows users reach for. The command builds the
//! in-toto Statement v1 from a document (an SBOM, whose format picks the predicate type, or
//! a scan report with the policy it was evaluated under), submits it as `submit` does
//! (inline, or through the blob bucket when large), waits for the result, and writes the
//! envelope, the bundles and the result to `--out DIR`, with progress on stderr.

use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};
use serde_json::{Map, Value};
use signer_actors::digest::{self, DigestSet};
use signer_actors::policy::{
    CYCLONEDX_PREDICATE_TYPE, SCAN_REPORT_PREDICATE_TYPE, SPDX_PREDICATE_TYPE,
};
use signer_actors::statement::{STATEMENT_V1, Statement, Subject};

use super::CliError;
use super::submit::{Job, JobArgs, Wait};

#[derive(Debug, Subcommand)]
pub enum SignCommand {
    /// Sign an SBOM (CycloneDX or SPDX JSON) for an artefact.
    ///
    /// The predicate type is chosen from the document (`bomFormat` or `spdxVersion`).
    Sbom(SbomArgs),
    /// Sign a scan report with the policy it was evaluated under.
    ///
    /// predicateType `https://stella-ops.org/attestations/scan-report/v1`.
    Report(ReportArgs),
}

/// What both flows take besides their document.
#[derive(Debug, Args)]
pub struct Common {
    /// The artefact the document is about, as `NAME@ALG:HEX` (e.g.
    /// `registry.example/acme/app@sha256:<64 hex>`); repeat for several subjects.
    #[arg(long = "subject", value_name = "NAME@ALG:HEX", required = true, value_parser = parse_subject)]
    subjects: Vec<Subject>,
    /// Where to write `envelope.json`, `bundles/bundle-<i>.json` and `result.json`.
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    job: JobArgs,
}

#[derive(Debug, Args)]
pub struct SbomArgs {
    /// The SBOM: CycloneDX JSON or SPDX JSON.
    file: PathBuf,
    #[command(flatten)]
    common: Common,
}

#[derive(Debug, Args)]
pub struct ReportArgs {
    /// The scan report (a JSON object): the Statement's predicate.
    file: PathBuf,
    /// Digest (`sha256:<64 hex>`) of the policy the report was evaluated under; sent as
    /// `options.policyDigest` (a profile may require it and restrict the digests).
    #[arg(long, requires = "view_set")]
    policy_digest: Option<String>,
    /// The view set the policy was evaluated with; sent as `options.viewSet`.
    #[arg(long, requires = "policy_digest")]
    view_set: Option<String>,
    #[command(flatten)]
    common: Common,
}

/// The SBOM formats `sign sbom` knows, and the predicate type each is signed as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SbomFormat {
    CycloneDx,
    Spdx,
}

impl SbomFormat {
    /// The format of an SBOM document: CycloneDX JSON says `"bomFormat": "CycloneDX"`, SPDX
    /// JSON says `"spdxVersion": "SPDX-<version>"`.
    pub fn of(doc: &Map<String, Value>) -> Result<Self, String> {
        let cyclonedx = doc.get("bomFormat").and_then(Value::as_str) == Some("CycloneDX");
        let spdx = doc
            .get("spdxVersion")
            .and_then(Value::as_str)
            .is_some_and(|v| v.starts_with("SPDX-"));
        match (cyclonedx, spdx) {
            (true, false) => Ok(SbomFormat::CycloneDx),
            (false, true) => Ok(SbomFormat::Spdx),
            (true, true) => Err("the document says it is both CycloneDX (bomFormat) and SPDX (spdxVersion)".into()),
            (false, false) => Err(
                "not an SBOM this command knows: CycloneDX JSON has \"bomFormat\": \"CycloneDX\", SPDX JSON has \"spdxVersion\": \"SPDX-...\"".into(),
            ),
        }
    }

    pub fn predicate_type(self) -> &'static str {
        match self {
            SbomFormat::CycloneDx => CYCLONEDX_PREDICATE_TYPE,
            SbomFormat::Spdx => SPDX_PREDICATE_TYPE,
        }
    }

    /// One line for the progress output: format, version, how many components/packages.
    fn describe(self, doc: &Map<String, Value>) -> String {
        let count = |key: &str| doc.get(key).and_then(Value::as_array).map_or(0, Vec::len);
        let text = |key: &str| {
            doc.get(key)
                .and_then(Value::as_str)
                .unwrap_or("?")
                .to_owned()
        };
        match self {
            SbomFormat::CycloneDx => format!(
                "CycloneDX {} SBOM, {} components",
                text("specVersion"),
                count("components")
            ),
            SbomFormat::Spdx => format!(
                "{} SBOM, {} packages",
                text("spdxVersion"),
                count("packages")
            ),
        }
    }
}

/// Parses `--subject NAME@ALG:HEX` (the name may itself contain `@`: the last one splits).
pub fn parse_subject(arg: &str) -> Result<Subject, String> {
    let (name, digest) = arg
        .rsplit_once('@')
        .ok_or_else(|| format!("{arg:?} is not NAME@ALG:HEX"))?;
    let (alg, hex) = digest
        .split_once(':')
        .ok_or_else(|| format!("{digest:?} is not ALG:HEX (e.g. sha256:<64 hex>)"))?;
    if name.is_empty() {
        return Err(format!("{arg:?} has an empty name"));
    }
    let set = DigestSet::from([(alg.to_owned(), hex.to_owned())]);
    digest::validate_set(&set).map_err(|e| format!("{arg:?}: {e}"))?;
    Ok(Subject {
        name: name.to_owned(),
        digest: set,
        uri: None,
        annotations: None,
    })
}

/// The Statement of `predicate_type` over `subjects`, in its RFC 8785 form: the bytes the
/// signer signs, inline or by reference alike.
pub fn statement_bytes(
    subjects: Vec<Subject>,
    predicate_type: &str,
    predicate: Map<String, Value>,
) -> Result<Vec<u8>, CliError> {
    let st = Statement {
        type_: STATEMENT_V1.into(),
        subject: subjects,
        predicate_type: predicate_type.into(),
        predicate: Some(predicate),
    };
    st.validate().map_err(CliError::Invalid)?;
    st.canonical_bytes()
        .map_err(|e| CliError::Unusable(format!("encoding the statement: {e}")))
}

/// A JSON object from `path` (exit 2 when it is not one).
fn read_object(path: &Path) -> Result<Map<String, Value>, CliError> {
    match super::read_json::<Value>(path)? {
        Value::Object(m) => Ok(m),
        _ => Err(CliError::Unusable(format!(
            "{}: not a JSON object",
            path.display()
        ))),
    }
}

impl SignCommand {
    pub fn run(self) -> Result<(), CliError> {
        let (file, common, predicate_type, predicate, options) = match self {
            SignCommand::Sbom(a) => {
                let doc = read_object(&a.file)?;
                let format = SbomFormat::of(&doc)
                    .map_err(|e| CliError::Unusable(format!("{}: {e}", a.file.display())))?;
                eprintln!(
                    "{}: {} -> predicateType {}",
                    a.file.display(),
                    format.describe(&doc),
                    format.predicate_type()
                );
                (a.file, a.common, format.predicate_type(), doc, Map::new())
            }
            SignCommand::Report(a) => {
                let doc = read_object(&a.file)?;
                let mut options = Map::new();
                if let (Some(d), Some(v)) = (a.policy_digest, a.view_set) {
                    digest::parse_oci_sha256(&d).map_err(|_| {
                        CliError::Unusable(format!("--policy-digest {d:?} is not sha256:<64 hex>"))
                    })?;
                    if !signer_actors::policy::is_valid_view_set(&v) {
                        return Err(CliError::Unusable(format!(
                            "--view-set {v:?} must be 1 to 256 characters of [A-Za-z0-9._:/@+=,-]"
                        )));
                    }
                    eprintln!(
                        "{}: scan report under policy {d} (view set {v})",
                        a.file.display()
                    );
                    options.insert("policyDigest".into(), d.into());
                    options.insert("viewSet".into(), v.into());
                } else {
                    eprintln!("{}: scan report, no policy stated", a.file.display());
                }
                (a.file, a.common, SCAN_REPORT_PREDICATE_TYPE, doc, options)
            }
        };
        let Common { subjects, out, job } = common;
        let names: Vec<String> = subjects.iter().map(|s| s.name.clone()).collect();
        let statement = statement_bytes(subjects, predicate_type, predicate)?;
        eprintln!(
            "built the in-toto Statement v1 ({} bytes) for {}",
            statement.len(),
            names.join(", ")
        );
        let result = job.submit(Job {
            statement,
            label: file.display().to_string(),
            options,
            wait: Wait::ForResult {
                out: Some(out.clone()),
            },
        })?;
        if let Some(result) = result {
            let text = serde_json::to_vec_pretty(&result)
                .map_err(|e| CliError::Unusable(e.to_string()))?;
            super::write_file(&out.join("result.json"), &text)?;
            eprintln!("wrote {}/result.json", out.display());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn the_sbom_format_picks_the_predicate_type() {
        let cdx = obj(
            serde_json::json!({"bomFormat": "CycloneDX", "specVersion": "1.6", "components": [{}]}),
        );
        assert_eq!(SbomFormat::of(&cdx), Ok(SbomFormat::CycloneDx));
        assert_eq!(
            SbomFormat::CycloneDx.predicate_type(),
            "https://cyclonedx.org/bom"
        );
        assert_eq!(
            SbomFormat::CycloneDx.describe(&cdx),
            "CycloneDX 1.6 SBOM, 1 components"
        );
        let spdx = obj(
            serde_json::json!({"spdxVersion": "SPDX-2.3", "SPDXID": "SPDXRef-DOCUMENT", "packages": []}),
        );
        assert_eq!(SbomFormat::of(&spdx), Ok(SbomFormat::Spdx));
        assert_eq!(
            SbomFormat::Spdx.predicate_type(),
            "https://spdx.dev/Document"
        );
        for other in [
            serde_json::json!({"bomFormat": "cyclonedx"}),
            serde_json::json!({"spdxVersion": "2.3"}),
            serde_json::json!({"name": "x"}),
            serde_json::json!({"bomFormat": "CycloneDX", "spdxVersion": "SPDX-2.3"}),
        ] {
            assert!(SbomFormat::of(&obj(other.clone())).is_err(), "{other}");
        }
    }

    #[test]
    fn subjects_are_name_at_digest() {
        let hex = "a".repeat(64);
        let s = parse_subject(&format!("registry.example:5000/acme/app@sha256:{hex}")).unwrap();
        assert_eq!(s.name, "registry.example:5000/acme/app");
        assert_eq!(s.digest, DigestSet::from([("sha256".into(), hex.clone())]));
        // the last @ splits: a name may carry one
        let s = parse_subject(&format!("pkg:npm/@scope/x@sha256:{hex}")).unwrap();
        assert_eq!(s.name, "pkg:npm/@scope/x");
        for bad in [
            "app".to_string(),
            format!("@sha256:{hex}"),
            "app@sha256:abc".to_string(),
            format!("app@md5:{hex}"),
            format!("app@{hex}"),
        ] {
            assert!(parse_subject(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_statement_is_canonical_and_valid() {
        let subject = parse_subject(&format!("app@sha256:{}", "b".repeat(64))).unwrap();
        let predicate = obj(serde_json::json!({"z": 1, "a": {"y": true, "b": "x"}}));
        let bytes = statement_bytes(vec![subject], CYCLONEDX_PREDICATE_TYPE, predicate).unwrap();
        let text = String::from_utf8(bytes.clone()).unwrap();
        assert_eq!(
            text,
            format!(
                r#"{{"_type":"https://in-toto.io/Statement/v1","predicate":{{"a":{{"b":"x","y":true}},"z":1}},"predicateType":"https://cyclonedx.org/bom","subject":[{{"digest":{{"sha256":"{}"}},"name":"app"}}]}}"#,
                "b".repeat(64)
            )
        );
        let head = Statement::head_of_payload(&bytes).unwrap();
        assert_eq!(head.predicate_type, CYCLONEDX_PREDICATE_TYPE);
        // no subject: not a Statement
        assert!(statement_bytes(Vec::new(), CYCLONEDX_PREDICATE_TYPE, Map::new()).is_err());
    }
}
