//! pagefp: page fingerprints of KVM guests, kept current by eBPF, for
//! template-based live migration.

pub mod api;
pub mod cli;
pub mod client;
pub mod config;
pub mod content;
pub mod daemon;
pub mod ebpf;
pub mod hasher;
pub mod memory;
pub mod metrics;
pub mod migrate;
pub mod migration_book;
pub mod net;
pub mod processes;
pub mod qemu_guests;
pub mod qemu_proxy;
pub mod qemu_stream;
pub mod registry;
pub mod templates;
pub mod tracker;
pub mod transport;

/// Guest page size.
pub const PAGE_SIZE: usize = 4096;
/// log2 of [`PAGE_SIZE`].
pub const PAGE_SHIFT: u32 = 12;
