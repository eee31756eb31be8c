//! pagefp's integration-test support: the helpers the integration tests in
//! `tests/tests` (and the benchmarks and demo in `tests/bench`) share.
//!
//! The other crates under `tests/` each have their own binary:
//! `tests/testvmm` (`pagefp-testvmm`, the small VMM the tests run;
//! re-exported here as [`vmm`], driven by [`vmm_client`]), `tests/images`
//! (`pagefp-images`, the Linux guest-image builder and the QEMU driver;
//! re-exported as [`guest_images`] and [`qemu`]) and `tests/bench`
//! (`pagefp-bench` and `pagefp-demo`).

pub use pagefp_images::{self as guest_images, qemu};
pub use pagefp_testvmm as vmm;

pub mod agent_process;
pub mod fleet;
pub mod libvirt;
pub mod link_security;
pub mod migration;
pub mod netns;
pub mod packet_delay;
pub mod privileged;
pub mod prometheus;
pub mod qemu_kvm_tracking;
pub mod qemu_proxy_run;
pub mod qemu_streams;
pub mod redis_cluster;
pub mod site_hosts;
pub mod synthetic_images;
pub mod vmm_client;

#[cfg(test)]
mod tests {
    #[test]
    fn the_image_builder_counts_the_agents_pages() {
        assert_eq!(crate::guest_images::stats::PAGE, agent::page::PAGE_SIZE);
    }
}
