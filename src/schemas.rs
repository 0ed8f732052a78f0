//! The JSON Schemas of `schemas/`, embedded so the binary can check messages offline.

use jsonschema::Validator;

/// Which message a schema describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SchemaKind {
    Request,
    Completed,
    Failed,
    Audit,
    /// A provenance pre-flight question on `signer.verify.referrers`.
    VerifyReferrersRequest,
    /// Its answer.
    VerifyReferrersReply,
}

impl SchemaKind {
    /// The schema document.
    pub fn source(self) -> &'static str {
        match self {
            Self::Request => include_str!("../schemas/request.schema.json"),
            Self::Completed => include_str!("../schemas/completed.schema.json"),
            Self::Failed => include_str!("../schemas/failed.schema.json"),
            Self::Audit => include_str!("../schemas/audit.schema.json"),
            Self::VerifyReferrersRequest => {
                include_str!("../schemas/verify-referrers-request.schema.json")
            }
            Self::VerifyReferrersReply => {
                include_str!("../schemas/verify-referrers-reply.schema.json")
            }
        }
    }

    /// A compiled validator (draft 2020-12).
    pub fn validator(self) -> Result<Validator, String> {
        let schema: serde_json::Value = serde_json::from_str(self.source())
            .map_err(|e| format!("embedded schema is not JSON: {e}"))?;
        jsonschema::draft202012::new(&schema)
            .map_err(|e| format!("embedded schema does not compile: {e}"))
    }

    /// Every violation of `instance`, as `"<json pointer>: <message>"` lines.
    pub fn violations(self, instance: &serde_json::Value) -> Result<Vec<String>, String> {
        let validator = self.validator()?;
        Ok(validator
            .iter_errors(instance)
            .map(|e| format!("{}: {}", e.instance_path(), e))
            .collect())
    }
}
