//! The agent's API: what the daemon answers over its Unix socket (root only
//! by default), the types both sides use, and the one client.
//!
//! | method and path | answer |
//! |---|---|
//! | `GET /v1/status` | agent: event sources, counters (JSON) |
//! | `GET /v1/vms` | every VM with its tracking state (JSON [`views::VmView`]) |
//! | `GET /v1/vms/{pid}` | one VM with its slots (JSON) |
//! | `GET /v1/vms/{pid}/hashes` | the VM's hash list: binary ([`wire`]), or `?format=json`; `?since=TOKEN`: only the changes since the list whose token that was |
//! | `GET /v1/templates` | the template catalog (JSON; `?format=bin` for 36-byte records, `?limit=N`) |
//! | `POST /v1/migrations` | a [`report::MigrationReport`] of `pagefp migrate` (JSON body, at most 256 KiB) |
//! | `GET /v1/migrations` | the latest report of each migration: running ones first, then the last 100 finished (JSON) |
//!
//! Errors are JSON `{"error": "..."}` with a 4xx status. The daemon's side
//! (routing, the state it reads) is in [`crate::daemon`]; the migration
//! tools talk to the agent only through this module.

pub mod client;
pub mod report;
pub mod views;
pub mod wire;
