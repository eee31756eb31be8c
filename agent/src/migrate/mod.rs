//! Template-based live migration: `pagefp migrate send` and `receive`.
//! The wire format is documented in `docs/migration-protocol.md`.

pub mod cli;
pub mod digest;
pub mod encode;
pub mod interrupt;
pub mod pacing;
pub mod progress;
pub mod read_ahead;
pub mod read_back;
pub mod receiver;
pub mod sender;
pub mod vm_memory;
pub mod vmm;
