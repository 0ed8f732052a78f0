//! Monotonic time for what the gate measures by the current time rather than by a job's
//! publish time: the age of a licensing answer in the cache and its grace during an outage
//! ([`super::poe::Introspector`]). Dates in tokens, proofs and licences never use it: they are
//! judged at the publish time the job carries. The service reads the machine's clock
//! ([`SystemClock`]); unit tests pass one they move by hand, so a cache expires when the test
//! says so and not when a loaded machine happens to be slow.

use std::time::Instant;

/// A source of monotonic time.
pub trait Clock: Send + Sync {
    fn now(&self) -> Instant;
}

/// The machine's monotonic clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
}
