//! pagefp: page fingerprints of KVM guests, kept current by eBPF, for
//! template-based live migration.

pub mod content;
pub mod registry;

/// Guest page size.
pub const PAGE_SIZE: usize = 4096;
/// log2 of [`PAGE_SIZE`].
pub const PAGE_SHIFT: u32 = 12;
