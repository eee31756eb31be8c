//! The clocks: CLOCK_MONOTONIC, the clock of every kernel event (the one
//! `bpf_ktime_get_ns` reads), and the calling thread's and process's CPU
//! time, what the agent's and the migration tools' own costs are counted in.

use nix::time::{ClockId, clock_gettime};

fn read_ns(clock: ClockId) -> u64 {
    let now = clock_gettime(clock).expect("a clock Linux always has");
    now.tv_sec() as u64 * 1_000_000_000 + now.tv_nsec() as u64
}

/// CLOCK_MONOTONIC in ns.
pub fn monotonic_ns() -> u64 {
    read_ns(ClockId::CLOCK_MONOTONIC)
}

/// CPU time of the calling thread in ns (CLOCK_THREAD_CPUTIME_ID): time it
/// ran, not time it waited to run.
pub fn thread_cpu_ns() -> u64 {
    read_ns(ClockId::CLOCK_THREAD_CPUTIME_ID)
}

/// CPU time of the whole process (all its threads) in ns
/// (CLOCK_PROCESS_CPUTIME_ID).
pub fn process_cpu_ns() -> u64 {
    read_ns(ClockId::CLOCK_PROCESS_CPUTIME_ID)
}
