//! Template-based live migration: `pagefp migrate send` and `receive`.
//! The wire format is documented in `docs/migration-protocol.md`.

pub mod report;
