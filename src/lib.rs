//! stella-signer: the service package. CLI, configuration and the adapters that talk to
//! the outside world; the domain lives in the `signer-actors` crate.
//!
//! A module is public only where a crate outside this library uses it: the binary
//! (`cli::Cli`), the tools crate (`tools/`: bench, dev setup, minting, pushing), the
//! integration tests (`tests/`) and the fuzz targets (`fuzz/`). Everything else is
//! `pub(crate)`, so that the compiler reports what nothing uses.

pub mod blobs;
pub(crate) mod capped;
pub mod cli;
pub mod config;
pub mod control;
pub mod entitlement;
pub(crate) mod error_text;
pub(crate) mod http;
pub(crate) mod idempotency;
pub mod jetstream;
pub mod keys;
pub mod keystate;
pub(crate) mod kit;
pub mod provenance;
pub(crate) mod quota;
pub(crate) mod readiness;
pub mod redis;
pub mod replay;
pub mod schemas;
pub mod serve;
pub mod telemetry;
