// The agent modules the wire and catalog fuzz targets need, compiled here
// on their own (without the agent crate and its eBPF build) at the paths
// and crate-root names the agent gives them. `include!`d by each target.

#[allow(dead_code, unused_imports)]
#[path = "../../src/page.rs"]
mod page;

#[allow(dead_code, unused_imports)]
#[path = "../../src/content.rs"]
mod content;

#[allow(dead_code, unused_imports)]
#[path = "../../src/procfs.rs"]
mod procfs;

#[allow(dead_code, unused_imports)]
mod api {
    #[path = "../../../src/api/report.rs"]
    pub mod report;
}

#[allow(dead_code, unused_imports, unused_macros)]
#[path = "../../src/transport/mod.rs"]
mod transport;

#[allow(dead_code, unused_imports)]
#[path = "../../src/catalog/file.rs"]
mod catalog;
