//! Domain, ports and (from the pipeline issue on) the supervision tree of stella-signer.
//!
//! Nothing in this crate talks to the network: adapters in the `stella-signer` package
//! implement the ports declared here ([`keys::KeySigner`] and friends), so every piece of
//! domain logic can be tested with in-memory implementations.

pub mod audit;
pub mod b64;
pub mod bundle;
pub mod codec;
pub mod digest;
pub mod dsse;
pub mod echo;
pub mod error;
pub mod jcs;
pub mod keys;
pub mod messages;
pub mod objects;
pub mod pipeline;
pub mod policy;
pub mod ports;
pub mod profiles;
pub mod request;
pub mod signing;
pub mod statement;

/// The only `apiVersion` this signer speaks.
pub const API_VERSION: &str = "signer.stella-ops.org/v1";
