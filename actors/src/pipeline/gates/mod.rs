//! The three gate actors, a file each. Each owns its port and answers checks concurrently: a
//! check that waits on the network (Redis, a licensing service, a registry) never holds up
//! the next. A check that panics makes the actor fail; its supervisor restarts it.
//!
//! The Provenance actor also owns the per-tenant bound on registry lookups (see
//! [`ProvenanceLimits`]): only an actor sees every lookup of the replica, so only it can
//! share them fairly between tenants.

mod entitlement;
mod provenance;
mod quota;

pub use entitlement::{Entitlement, EntitlementMsg};
pub use provenance::{Provenance, ProvenanceLimits, ProvenanceMsg};
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
