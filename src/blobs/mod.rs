//! Large artefacts (`docs/contract.md#large-artefacts`): request payloads too large for a message
//! come in by reference (`payloadRef`), and envelopes and bundles too large to go inline go out
//! as objects (`envelopeRef`, `bundleRefs`), through the `BlobStore` port.
//!
//! One store today, a file per store as everywhere in `src/`: [`JsBlobStore`]
//! (`object_store.rs`), a JetStream Object Store bucket; `serve` opens it with [`open`], and
//! the CLI reads and writes objects with [`get_bounded`] and [`put`]. (The in-memory store of
//! the tests is `signer_actors::objects::MemoryBlobStore`.)

mod object_store;

pub use self::object_store::{JsBlobStore, get_bounded, open, put};
