//! Key commands, the signed envelope they travel in, and the reply.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use signer_actors::audit::ControlRefusal;
use signer_actors::profiles::Scope;

/// A command. Tagged by `action`, so new actions (or new members of an action, such as a
/// keyless `identity` for `revoke`) extend it without changing the others.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "lowercase", deny_unknown_fields)]
pub enum ControlCommand {
    /// Revoke a key everywhere: it signs nothing more (`key_revoked`).
    Revoke {
        keyid: String,
        #[serde(default, skip_serializing_if = "String::is_empty")]
        reason: String,
    },
    /// Revoke a keyless identity (OIDC issuer + certificate SAN) everywhere: keyless keys
    /// certified for it refuse to sign (`key_revoked`) while the revocation stands.
    #[serde(rename = "revoke-identity")]
    RevokeIdentity {
        issuer: String,
        san: String,
        #[serde(default, skip_serializing_if = "String::is_empty")]
        reason: String,
    },
    /// Make a scope of a profile sign with other (loaded, unrevoked) keys.
    Rotate {
        profile: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tenant: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        plan: Option<String>,
        keys: Vec<String>,
        #[serde(default, skip_serializing_if = "String::is_empty")]
        reason: String,
    },
    /// Undo the rotation of a scope: it signs with its configured keys again.
    Restore {
        profile: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tenant: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        plan: Option<String>,
        #[serde(default, skip_serializing_if = "String::is_empty")]
        reason: String,
    },
}

/// Why a scope cannot be built from a command's `tenant` and `plan`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("name a tenant or a plan, not both")]
pub struct BothTenantAndPlan;

impl ControlCommand {
    /// The command as JSON (what operators sign the digest of).
    pub fn to_value(&self) -> Value {
        serde_json::to_value(self).unwrap_or(Value::Null)
    }

    /// The scope of a `rotate` or `restore` (the whole profile for `revoke`).
    pub fn scope(&self) -> Result<Scope, BothTenantAndPlan> {
        let (tenant, plan) = match self {
            ControlCommand::Revoke { .. } | ControlCommand::RevokeIdentity { .. } => (None, None),
            ControlCommand::Rotate { tenant, plan, .. }
            | ControlCommand::Restore { tenant, plan, .. } => (tenant.clone(), plan.clone()),
        };
        match (tenant, plan) {
            (Some(_), Some(_)) => Err(BothTenantAndPlan),
            (Some(t), None) => Ok(Scope::Tenant(t)),
            (None, Some(p)) => Ok(Scope::Plan(p)),
            (None, None) => Ok(Scope::Profile),
        }
    }
}

/// SHA-256 (hex) of the RFC 8785 form of `command`: the `cmd` claim of its signatures.
pub fn command_digest(command: &Value) -> Result<String, serde_json::Error> {
    signer_actors::jcs::sha256_hex(command)
}

/// What travels on `signer.control.keys`. `command` is kept as sent: its digest is taken
/// over exactly that JSON.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlEnvelope {
    pub command: Value,
    #[serde(default)]
    pub signatures: Vec<String>,
}

impl ControlEnvelope {
    /// The arguments of the command (everything but `action`), for the audit event.
    pub fn arguments(&self) -> Option<Map<String, Value>> {
        let mut map = self.command.as_object()?.clone();
        map.remove("action");
        Some(map)
    }

    /// The `action` as sent (`unknown` when there is none).
    pub fn action(&self) -> String {
        self.command
            .get("action")
            .and_then(Value::as_str)
            .unwrap_or("unknown")
            .to_string()
    }
}

/// The reply to a command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "lowercase")]
pub enum ControlReply {
    /// Authorised and applied.
    Accepted {
        action: String,
        /// What changed, in words.
        detail: String,
        /// The `sub` of each operator whose signature counted.
        operators: Vec<String>,
        /// Stream sequence of the audit event.
        #[serde(rename = "auditSeq")]
        audit_seq: u64,
    },
    /// Not authorised (or not readable): nothing changed.
    Refused {
        code: ControlRefusal,
        detail: String,
    },
    /// Authorised, but it could not be applied: nothing changed.
    Failed {
        code: ControlRefusal,
        detail: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_read_by_action_and_refuse_unknown_members() {
        let revoke: ControlCommand =
            serde_json::from_value(serde_json::json!({"action": "revoke", "keyid": "ab"})).unwrap();
        assert!(
            matches!(revoke, ControlCommand::Revoke { .. }),
            "{revoke:?}"
        );
        let identity: ControlCommand = serde_json::from_value(serde_json::json!({
            "action": "revoke-identity",
            "issuer": "https://issuer.example",
            "san": "ci@example.org",
            "reason": "tokens leaked"
        }))
        .unwrap();
        assert_eq!(
            identity,
            ControlCommand::RevokeIdentity {
                issuer: "https://issuer.example".into(),
                san: "ci@example.org".into(),
                reason: "tokens leaked".into(),
            }
        );
        assert_eq!(identity.scope(), Ok(Scope::Profile));
        // the digest operators sign covers the command as it will be read back
        assert_eq!(identity.to_value()["action"], "revoke-identity");
        // a revoke naming an identity is not a revoke-identity: unknown members are refused
        assert!(
            serde_json::from_value::<ControlCommand>(serde_json::json!({
                "action": "revoke", "keyid": "ab", "san": "x"
            }))
            .is_err()
        );
    }
}
