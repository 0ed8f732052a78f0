//! The three gate actors, a file each. Each answers checks concurrently: a check that waits
//! on the network (Redis, a licensing service, a registry) never holds up the next. A check
//! that panics makes the actor fail; its supervisor restarts it (with empty caches).
//!
//! Each owns what only one owner per replica can keep (docs/architecture.md, "What the gate
//! actors own"): the Entitlement actor the Authority's and the licensing key sets (one load
//! in flight each), the verified tokens and licences (one check each) and the licensing
//! service's answers (one request per value and tenant, `cache_ttl` + `grace`); the Provenance
//! actor the verdict cache, one lookup per image at a time and the per-tenant bound on
//! registry lookups (see [`ProvenanceLimits`]). Their ports do uncached work only.

mod cache;
mod entitlement;
mod provenance;
mod quota;

pub use entitlement::{Entitlement, EntitlementMsg, EntitlementStats};
pub use provenance::{
    LookupKey, Provenance, ProvenanceLimits, ProvenanceMsg, ProvenanceStats, provenance_verdict,
};
pub use quota::{ACQUIRE_LANES, Quota, QuotaMsg};
