//! Gates configured `mode = "disabled"`: they let every job through and say so. The
//! pipeline records `disabled` in the audit event and the result; the service logs a
//! warning at startup. There is no silent pass.

use async_trait::async_trait;

use crate::audit::{AuthState, PoeState};
use crate::error::SignerError;
use crate::ports::{
    EntitlementVerdict, EntitlementVerifier, GateDenial, GateInput, ProvenanceGrant, QuotaGrant,
    QuotaStore, ReleaseVerifier, VerifiedToken,
};

/// Plan name recorded when entitlement is disabled.
pub const DISABLED_PLAN: &str = "unverified";

/// Entitlement (OpTok, DPoP, PoE) switched off.
#[derive(Debug, Default, Clone, Copy)]
pub struct DisabledEntitlement;

#[async_trait]
impl EntitlementVerifier for DisabledEntitlement {
    async fn verify(
        &self,
        _: &GateInput,
        _: Option<&VerifiedToken>,
    ) -> Result<EntitlementVerdict, GateDenial> {
        Ok(EntitlementVerdict {
            caller: None,
            auth: AuthState::Disabled,
            poe: PoeState::Disabled,
            plan: DISABLED_PLAN.into(),
        })
    }
}

/// Quota switched off.
#[derive(Debug, Default, Clone, Copy)]
pub struct DisabledQuota;

#[async_trait]
impl QuotaStore for DisabledQuota {
    async fn acquire(&self, _: &str, _: &str, _: usize, _: u32) -> Result<QuotaGrant, SignerError> {
        Ok(QuotaGrant::Disabled)
    }
    async fn release(&self, _: &str, _: &str) {}
}

/// Provenance switched off.
#[derive(Debug, Default, Clone, Copy)]
pub struct DisabledProvenance;

#[async_trait]
impl ReleaseVerifier for DisabledProvenance {
    fn decide_offline(&self, _: &str, _: &str) -> Option<Result<ProvenanceGrant, SignerError>> {
        Some(Ok(ProvenanceGrant::Disabled))
    }

    async fn look_up(&self, _: &str, _: &str) -> Result<ProvenanceGrant, SignerError> {
        Ok(ProvenanceGrant::Disabled)
    }
}
