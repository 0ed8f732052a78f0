//! The key control plane: commands on `signer.control.keys` that change key state on every
//! replica (`revoke`, `rotate`, `restore`), accepted only with operator signatures.
//!
//! A command travels in an envelope, `{"command": {...}, "signatures": ["<jws>", ...]}`.
//! Each signature is a compact JWS (`typ: signer-control+jwt`) by a key of the configured
//! operator key set (`[gates.control]`) whose claims carry `sub` (the operator), `scope`
//! (containing `signer.admin`), `iat`, `exp` (and optionally `nbf`), a single-use `jti` and
//! `cmd`: the SHA-256 (hex) of the RFC 8785 form of `command` exactly as sent, so a signature
//! for one command cannot authorise another. Under dual control (`required_signatures = N`)
//! N distinct operators (distinct key and distinct `sub`) must sign the same command.
//!
//! - [`command`]: the commands and the envelope;
//! - [`auth`]: checking the signatures ([`auth::OperatorAuthority`]);
//! - [`server`]: the subject's server: decide, audit, apply, reply;
//! - [`sign`]: making signatures (the CLI, tests).

pub(crate) mod auth;
pub mod command;
pub(crate) mod server;
pub mod sign;

pub use command::{ControlCommand, ControlEnvelope, ControlReply};

/// `typ` header of an operator signature (keeps OpToks and licences by the same key from
/// being taken for control tokens).
pub const CONTROL_TOKEN_TYPE: &str = "signer-control+jwt";
