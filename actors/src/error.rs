//! The contract's error codes and the one error type that maps onto them.

use serde::{Deserialize, Serialize};

/// A stable error code of the wire contract (`docs/contract.md#error-codes`).
///
/// The set is closed: a result never carries a free-form code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    InvalidRequest,
    UnsupportedMediaType,
    UnsupportedApiVersion,
    PayloadTooLarge,
    AuthInvalid,
    AuthExpired,
    AudienceMismatch,
    ScopeMissing,
    TenantMismatch,
    DpopInvalid,
    DpopReplayed,
    PoeInvalid,
    PoeExpired,
    EntitlementDenied,
    EntitlementUnavailable,
    QuotaExceeded,
    ProvenanceUntrusted,
    ProvenanceUnavailable,
    KeyRevoked,
    KeyUnavailable,
    SigningFailed,
    RequestExpired,
    Internal,
}

impl ErrorCode {
    /// Every code, in the contract's order.
    pub const ALL: [ErrorCode; 23] = [
        Self::InvalidRequest,
        Self::UnsupportedMediaType,
        Self::UnsupportedApiVersion,
        Self::PayloadTooLarge,
        Self::AuthInvalid,
        Self::AuthExpired,
        Self::AudienceMismatch,
        Self::ScopeMissing,
        Self::TenantMismatch,
        Self::DpopInvalid,
        Self::DpopReplayed,
        Self::PoeInvalid,
        Self::PoeExpired,
        Self::EntitlementDenied,
        Self::EntitlementUnavailable,
        Self::QuotaExceeded,
        Self::ProvenanceUntrusted,
        Self::ProvenanceUnavailable,
        Self::KeyRevoked,
        Self::KeyUnavailable,
        Self::SigningFailed,
        Self::RequestExpired,
        Self::Internal,
    ];

    /// The code as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InvalidRequest => "invalid_request",
            Self::UnsupportedMediaType => "unsupported_media_type",
            Self::UnsupportedApiVersion => "unsupported_api_version",
            Self::PayloadTooLarge => "payload_too_large",
            Self::AuthInvalid => "auth_invalid",
            Self::AuthExpired => "auth_expired",
            Self::AudienceMismatch => "audience_mismatch",
            Self::ScopeMissing => "scope_missing",
            Self::TenantMismatch => "tenant_mismatch",
            Self::DpopInvalid => "dpop_invalid",
            Self::DpopReplayed => "dpop_replayed",
            Self::PoeInvalid => "poe_invalid",
            Self::PoeExpired => "poe_expired",
            Self::EntitlementDenied => "entitlement_denied",
            Self::EntitlementUnavailable => "entitlement_unavailable",
            Self::QuotaExceeded => "quota_exceeded",
            Self::ProvenanceUntrusted => "provenance_untrusted",
            Self::ProvenanceUnavailable => "provenance_unavailable",
            Self::KeyRevoked => "key_revoked",
            Self::KeyUnavailable => "key_unavailable",
            Self::SigningFailed => "signing_failed",
            Self::RequestExpired => "request_expired",
            Self::Internal => "internal",
        }
    }

    /// Whether the contract marks the code retryable (the pipeline NAKs with backoff).
    pub fn retryable(self) -> bool {
        matches!(
            self,
            Self::EntitlementUnavailable
                | Self::QuotaExceeded
                | Self::ProvenanceUnavailable
                | Self::KeyUnavailable
                | Self::Internal
        )
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a job was refused or failed. One variant per contract code, so that a
/// refusal can never be reported with the wrong code or a made-up one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignerError {
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    #[error("unsupported media type: {0}")]
    UnsupportedMediaType(String),
    #[error("unsupported apiVersion: {0}")]
    UnsupportedApiVersion(String),
    #[error("payload too large: {0}")]
    PayloadTooLarge(String),
    #[error("authentication failed: {0}")]
    AuthInvalid(String),
    #[error("token expired or not yet valid: {0}")]
    AuthExpired(String),
    #[error("audience mismatch: {0}")]
    AudienceMismatch(String),
    #[error("scope missing: {0}")]
    ScopeMissing(String),
    #[error("tenant mismatch: {0}")]
    TenantMismatch(String),
    #[error("DPoP proof invalid: {0}")]
    DpopInvalid(String),
    #[error("DPoP proof replayed: {0}")]
    DpopReplayed(String),
    #[error("proof of entitlement invalid: {0}")]
    PoeInvalid(String),
    #[error("proof of entitlement expired: {0}")]
    PoeExpired(String),
    #[error("entitlement denied: {0}")]
    EntitlementDenied(String),
    #[error("entitlement unavailable: {0}")]
    EntitlementUnavailable(String),
    #[error("quota exceeded: {message}")]
    QuotaExceeded {
        message: String,
        retry_after_ms: u64,
    },
    #[error("scanner provenance untrusted: {0}")]
    ProvenanceUntrusted(String),
    #[error("scanner provenance unavailable: {0}")]
    ProvenanceUnavailable(String),
    #[error("key revoked: {0}")]
    KeyRevoked(String),
    #[error("key unavailable: {0}")]
    KeyUnavailable(String),
    #[error("signing failed: {0}")]
    SigningFailed(String),
    /// The job waited in the queue longer than `worker.max_queue_age`. Not retryable:
    /// publishing it again makes a new job, with fresh credentials.
    #[error("request expired: {0}")]
    RequestExpired(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl SignerError {
    /// The contract code of this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::InvalidRequest(_) => ErrorCode::InvalidRequest,
            Self::UnsupportedMediaType(_) => ErrorCode::UnsupportedMediaType,
            Self::UnsupportedApiVersion(_) => ErrorCode::UnsupportedApiVersion,
            Self::PayloadTooLarge(_) => ErrorCode::PayloadTooLarge,
            Self::AuthInvalid(_) => ErrorCode::AuthInvalid,
            Self::AuthExpired(_) => ErrorCode::AuthExpired,
            Self::AudienceMismatch(_) => ErrorCode::AudienceMismatch,
            Self::ScopeMissing(_) => ErrorCode::ScopeMissing,
            Self::TenantMismatch(_) => ErrorCode::TenantMismatch,
            Self::DpopInvalid(_) => ErrorCode::DpopInvalid,
            Self::DpopReplayed(_) => ErrorCode::DpopReplayed,
            Self::PoeInvalid(_) => ErrorCode::PoeInvalid,
            Self::PoeExpired(_) => ErrorCode::PoeExpired,
            Self::EntitlementDenied(_) => ErrorCode::EntitlementDenied,
            Self::EntitlementUnavailable(_) => ErrorCode::EntitlementUnavailable,
            Self::QuotaExceeded { .. } => ErrorCode::QuotaExceeded,
            Self::ProvenanceUntrusted(_) => ErrorCode::ProvenanceUntrusted,
            Self::ProvenanceUnavailable(_) => ErrorCode::ProvenanceUnavailable,
            Self::KeyRevoked(_) => ErrorCode::KeyRevoked,
            Self::KeyUnavailable(_) => ErrorCode::KeyUnavailable,
            Self::SigningFailed(_) => ErrorCode::SigningFailed,
            Self::RequestExpired(_) => ErrorCode::RequestExpired,
            Self::Internal(_) => ErrorCode::Internal,
        }
    }

    /// The human-readable part, without the code's prefix.
    pub fn message(&self) -> &str {
        match self {
            Self::QuotaExceeded { message, .. } => message,
            Self::InvalidRequest(m)
            | Self::UnsupportedMediaType(m)
            | Self::UnsupportedApiVersion(m)
            | Self::PayloadTooLarge(m)
            | Self::AuthInvalid(m)
            | Self::AuthExpired(m)
            | Self::AudienceMismatch(m)
            | Self::ScopeMissing(m)
            | Self::TenantMismatch(m)
            | Self::DpopInvalid(m)
            | Self::DpopReplayed(m)
            | Self::PoeInvalid(m)
            | Self::PoeExpired(m)
            | Self::EntitlementDenied(m)
            | Self::EntitlementUnavailable(m)
            | Self::ProvenanceUntrusted(m)
            | Self::ProvenanceUnavailable(m)
            | Self::KeyRevoked(m)
            | Self::KeyUnavailable(m)
            | Self::SigningFailed(m)
            | Self::RequestExpired(m)
            | Self::Internal(m) => m,
        }
    }

    /// The same error with its message bounded ([`crate::echo::bound_message`]): what a
    /// refusal, its log line and its audit trail may carry, whatever the request put into
    /// the message on its way. The final bound behind the echoes at the sources.
    pub fn bounded(self) -> Self {
        let b = |m: String| {
            if m.len() <= crate::echo::MESSAGE_MAX_BYTES && !m.chars().any(char::is_control) {
                m
            } else {
                crate::echo::bound_message(&m)
            }
        };
        match self {
            Self::QuotaExceeded {
                message,
                retry_after_ms,
            } => Self::QuotaExceeded {
                message: b(message),
                retry_after_ms,
            },
            Self::InvalidRequest(m) => Self::InvalidRequest(b(m)),
            Self::UnsupportedMediaType(m) => Self::UnsupportedMediaType(b(m)),
            Self::UnsupportedApiVersion(m) => Self::UnsupportedApiVersion(b(m)),
            Self::PayloadTooLarge(m) => Self::PayloadTooLarge(b(m)),
            Self::AuthInvalid(m) => Self::AuthInvalid(b(m)),
            Self::AuthExpired(m) => Self::AuthExpired(b(m)),
            Self::AudienceMismatch(m) => Self::AudienceMismatch(b(m)),
            Self::ScopeMissing(m) => Self::ScopeMissing(b(m)),
            Self::TenantMismatch(m) => Self::TenantMismatch(b(m)),
            Self::DpopInvalid(m) => Self::DpopInvalid(b(m)),
            Self::DpopReplayed(m) => Self::DpopReplayed(b(m)),
            Self::PoeInvalid(m) => Self::PoeInvalid(b(m)),
            Self::PoeExpired(m) => Self::PoeExpired(b(m)),
            Self::EntitlementDenied(m) => Self::EntitlementDenied(b(m)),
            Self::EntitlementUnavailable(m) => Self::EntitlementUnavailable(b(m)),
            Self::ProvenanceUntrusted(m) => Self::ProvenanceUntrusted(b(m)),
            Self::ProvenanceUnavailable(m) => Self::ProvenanceUnavailable(b(m)),
            Self::KeyRevoked(m) => Self::KeyRevoked(b(m)),
            Self::KeyUnavailable(m) => Self::KeyUnavailable(b(m)),
            Self::SigningFailed(m) => Self::SigningFailed(b(m)),
            Self::RequestExpired(m) => Self::RequestExpired(b(m)),
            Self::Internal(m) => Self::Internal(b(m)),
        }
    }

    /// How long the caller should wait before retrying, when the contract says so.
    pub fn retry_after_ms(&self) -> Option<u64> {
        match self {
            Self::QuotaExceeded { retry_after_ms, .. } => Some(*retry_after_ms),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_serialise_as_the_contract_spells_them() {
        for code in ErrorCode::ALL {
            let json = serde_json::to_string(&code).unwrap();
            assert_eq!(json, format!("\"{}\"", code.as_str()));
            let back: ErrorCode = serde_json::from_str(&json).unwrap();
            assert_eq!(back, code);
        }
    }

    #[test]
    fn retryable_codes_match_the_contract_table() {
        let retryable: Vec<_> = ErrorCode::ALL
            .iter()
            .filter(|c| c.retryable())
            .map(|c| c.as_str())
            .collect();
        assert_eq!(
            retryable,
            [
                "entitlement_unavailable",
                "quota_exceeded",
                "provenance_unavailable",
                "key_unavailable",
                "internal"
            ]
        );
    }
}
