//! Template catalogs with their page contents: what a destination holds,
//! for both migration tools (`pagefp migrate` and `pagefp qemu-proxy`).
//!
//! A catalog is built from the agent's template selection (the most common
//! page contents across a chosen set of VMs, as in Li, Zheng and Hu), its
//! pages read from those VMs and checked against their hashes
//! ([`sources::build_from_agent`]). It is saved to a file (`pagefp templates
//! export`), installed at a destination ahead of time (`pagefp templates
//! import`), and loaded by the receivers ([`sources::TemplateSources`]) into
//! the one [`store::TemplateStore`] they offer from.
//!
//! File format ([`file`]), version 1 (little-endian):
//!
//! ```text
//! b"PFTC", u32 version, u32 page size, u32 count, [u8; 32] digest
//! count × [u8; 32] blake3 hashes (the digest is the blake3 of these bytes)
//! u64 length, then one zstd frame holding count × page bytes, in hash order
//! ```

pub mod agreement;
pub mod file;
pub mod site;
pub mod site_shards;
pub mod sources;
pub mod store;

pub use file::*;
