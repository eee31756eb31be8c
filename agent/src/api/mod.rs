//! The agent's API over a Unix socket (root only by default).
//!
//! | method and path | answer |
//! |---|---|
//! | `GET /v1/status` | agent: event sources, counters (JSON) |
//! | `GET /v1/vms` | every VM with its tracking state (JSON) |
//! | `GET /v1/vms/{pid}` | one VM with its slots (JSON) |
//! | `GET /v1/vms/{pid}/hashes` | the VM's hash list: binary ([`wire`]), or `?format=json` |
//! | `GET /v1/templates` | the template catalog (JSON; `?format=bin` for 36-byte records, `?limit=N`) |
//! | `POST /v1/migrations` | a [`MigrationReport`](crate::migrate::report::MigrationReport) of `pagefp migrate` (JSON body, at most 256 KiB) |
//! | `GET /v1/migrations` | the latest report of each migration: running ones first, then the last 100 finished (JSON) |
//!
//! Errors are JSON `{"error": "..."}` with a 4xx status.

pub mod routes;
pub mod server;
pub mod views;
pub mod wire;

/// Serializes a hash as lowercase hex.
pub fn hex_hash<S: serde::Serializer>(hash: &[u8; 32], serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&hex(hash))
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
