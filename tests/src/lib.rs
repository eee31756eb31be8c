//! pagefp's integration-test support. The small VMM the tests, the demo and
//! the benchmarks run is its own crate (`tests/testvmm`, `pagefp-testvmm`),
//! re-exported here as [`vmm`]; [`vmm_client`] drives its processes.

pub mod agent_process;
pub mod bench;
pub mod fleet;
pub mod guest_images;
pub mod images;
pub mod migration;
pub mod netns;
pub mod privileged;
pub mod prometheus;
pub mod qemu;
pub mod qemu_proxy_run;
pub mod qemu_streams;
pub use pagefp_testvmm as vmm;
pub mod vmm_client;
