//! pagefp: page fingerprints of KVM guests, kept current by eBPF, for
//! template-based live migration.
//!
//! The modules are layers, grouped below from the bottom up; data flows up,
//! and a module imports only from its own group and the groups below it
//! (see `docs/architecture.md`):
//!
//! - foundation: [`page`], [`procfs`], [`guest_memory`], [`config`];
//! - the core, where hashes are kept: [`tracking`] (eBPF, the tracker,
//!   discovery of VMs) feeds [`registry`] (the pure state machine), whose
//!   hash jobs [`hasher`] runs; [`content`] counts contents and
//!   [`templates`] selects them;
//! - the contract: [`api`] (what the daemon answers and the one client) and
//!   [`transport`] (the one WAN framing);
//! - the outer ring: [`daemon`] (state, HTTP server, routes, metrics), the
//!   migration tools [`migrate`] and [`qemu_proxy`] (with its stream parser
//!   [`qemu_stream`]), and the command line [`cli`].

pub mod clock;
pub mod compression;
pub mod config;
pub mod guest_memory;
pub mod page;
pub mod procfs;
pub mod random;

pub mod content;
pub mod hasher;
pub mod registry;
pub mod templates;
pub mod tracking;

pub mod api;
pub mod net;
pub mod transport;

pub mod catalog;
pub mod cli;
pub mod daemon;
pub mod migrate;
pub mod qemu_proxy;
pub mod qemu_stream;

// QEMU's stream parser keeps its own page size (it is also built alone, by
// the fuzz target): it must agree with the one the rest of pagefp uses.
const _: () = assert!(qemu_stream::format::PAGE_SIZE == page::PAGE_SIZE);
