//! Monotonic time for what the gate measures by the current time rather than by a job's
//! publish time: the age of a licensing answer in the Entitlement actor's cache and its grace
//! during an outage. Dates in tokens, proofs and licences never use it: they are judged at
//! the publish time the job carries. The clock is the actors crate's port
//! ([`signer_actors::ports::Clock`]), handed to the actor through
//! [`super::poe::Introspector`]: the service reads the machine's clock ([`SystemClock`]);
//! unit tests pass one they move by hand, so a cache expires when the test says so and not
//! when a loaded machine happens to be slow.

pub use signer_actors::ports::{Clock, SystemClock};
