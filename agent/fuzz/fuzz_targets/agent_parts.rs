//! The agent modules the wire and catalog fuzz targets need, compiled here
//! on their own (without the agent crate and its eBPF build) under the
//! crate-root names the agent gives them, so their `crate::` paths resolve.

#![allow(dead_code, unused_imports)]

#[path = "../../src/page.rs"]
pub mod page;

#[path = "../../src/content.rs"]
pub mod content;

#[path = "../../src/procfs.rs"]
pub mod procfs;

#[path = "../../src/api/report.rs"]
pub mod report;

/// `crate::api::report`, as in the agent.
pub mod api {
    pub use super::report;
}

#[path = "../../src/transport/mod.rs"]
pub mod transport;

#[path = "../../src/catalog/file.rs"]
pub mod catalog;
