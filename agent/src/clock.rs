//! The clock of every kernel event: CLOCK_MONOTONIC, which
//! `bpf_ktime_get_ns` reads.

/// CLOCK_MONOTONIC in ns.
pub fn monotonic_ns() -> u64 {
    let now =
        nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).expect("CLOCK_MONOTONIC");
    now.tv_sec() as u64 * 1_000_000_000 + now.tv_nsec() as u64
}
