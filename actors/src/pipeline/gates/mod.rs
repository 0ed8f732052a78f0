//! The three gate actors, a file each. Each answers checks concurrently: a check that waits
//! on the network (Redis, a licensing service, a registry) never holds up the next. A check
//! that panics makes the actor fail; its supervisor restarts it (with empty caches).
//!
//! Each owns what only one owner per replica can keep (docs/architecture.md, "What the gate
//! actors own"): the Entitlement actor the Authority's key set (one load in flight) and the
//! verified tokens (one check per token); the Provenance actor the verdict cache, one
//! lookup per image at a time and the per-tenant bound on registry lookups (see
//! [`ProvenanceLimits`]). Their ports do uncached work only.

mod cache;
mod entitlement;
mod provenance;
mod quota;

pub use entitlement::{Entitlement, EntitlementMsg, EntitlementStats};
pub use provenance::{LookupKey, Provenance, ProvenanceLimits, ProvenanceMsg, ProvenanceStats};
pub use quota::{ACQUIRE_LANES, Quota, QuotaMsg};

use ractor::ActorRef;

/// A closure that tells the actor `myself` that a spawned check panicked (`wrap` makes the
/// message), so that the actor fails and its supervisor restarts it.
pub(super) fn failer<M: ractor::Message>(
    myself: &ActorRef<M>,
    wrap: fn(String) -> M,
) -> impl FnOnce(String) + Send + 'static {
    let me = myself.clone();
    move |e| {
        let _ = me.cast(wrap(e));
    }
}
