//! What each of the agent's eBPF programs costs: the kernel's run-time
//! statistics (`run_time_ns`, `run_cnt` of `bpf_prog_info`), counted while
//! statistics are on (`BPF_ENABLE_STATS`, held by the agent with
//! `ebpf_run_stats = true`, or the `kernel.bpf_stats_enabled` sysctl).

use std::os::fd::OwnedFd;

use aya::Ebpf;
use serde::Serialize;

/// One attached program, known by its kernel id (names are cut to 15
/// characters in the kernel).
#[derive(Clone, Debug, Serialize)]
pub struct AttachedProgram {
    /// The program's function in `agent-ebpf`.
    pub program: String,
    pub id: u32,
}

/// A program's runs and time, since statistics were first on.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct ProgramCost {
    pub program: String,
    pub runs: u64,
    pub run_ns: u64,
    /// `run_ns / runs`, 0 before the first counted run.
    pub ns_per_run: f64,
}

/// The loaded programs of `ebpf`, by id.
pub fn attached_programs(ebpf: &Ebpf) -> Vec<AttachedProgram> {
    ebpf.programs()
        .filter_map(|(name, program)| {
            let info = program.info().ok()?;
            Some(AttachedProgram {
                program: name.to_owned(),
                id: info.id(),
            })
        })
        .collect()
}

/// Turns the kernel's statistics on for as long as the returned fd is open.
pub fn enable_run_stats() -> Result<OwnedFd, String> {
    aya::sys::enable_stats(aya::sys::Stats::RunTime).map_err(|e| {
        format!(
            "eBPF run-time statistics unavailable ({e}): a 5.8+ kernel and CAP_SYS_ADMIN are needed"
        )
    })
}

/// Whether the kernel counts run time now (by anyone's request).
pub fn run_stats_on(held: bool) -> bool {
    held || std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled")
        .is_ok_and(|value| value.trim() == "1")
}

/// The current cost of each of `programs` still loaded.
pub fn program_costs(programs: &[AttachedProgram]) -> Vec<ProgramCost> {
    let mut costs: Vec<ProgramCost> = aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter_map(|info| {
            let ours = programs.iter().find(|p| p.id == info.id())?;
            let (runs, run_ns) = (info.run_count(), info.run_time().as_nanos() as u64);
            Some(ProgramCost {
                program: ours.program.clone(),
                runs,
                run_ns,
                ns_per_run: if runs == 0 {
                    0.0
                } else {
                    run_ns as f64 / runs as f64
                },
            })
        })
        .collect();
    costs.sort_by(|a, b| a.program.cmp(&b.program));
    costs
}
