//! pagefp's integration-test support, and the small VMM the tests, the demo
//! and the benchmarks run (`pagefp-testvmm`).

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
pub mod vmm;
pub mod vmm_client;
