//! stella-signer: the service package. CLI, configuration and the adapters that talk to
//! the outside world; the domain lives in the `signer-actors` crate.

pub mod capped;
pub mod cli;
pub mod config;
pub mod control;
pub mod entitlement;
pub mod error_text;
pub mod http;
pub mod jetstream;
pub mod keys;
pub mod provenance;
pub mod quota;
pub mod readiness;
pub mod redis;
pub mod schemas;
pub mod serve;
pub mod telemetry;
