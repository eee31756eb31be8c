//! guest_dirty_rate_ratio: guest pages written per second with the agent
//! attached over without it, on the same VM, alternating; and the cost of
//! each eBPF program the agent can put on dirty-ring pushes (its hot path).

use std::time::Duration;

use pagefp_tests::{
    agent_process::{AgentOptions, AgentProcess, TempDir},
    fleet::{Vm, VmOptions},
    synthetic_images::{FleetLayout, write_fleet},
};
use serde_json::{Value, json};

use super::{Figure, median, spread};

/// CPU time (ns) all threads of process `pid` have run, from the
/// scheduler's own accounting (`/proc/PID/task/*/schedstat`).
fn process_cpu_ns(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .filter_map(Result::ok)
        .filter_map(|task| std::fs::read_to_string(task.path().join("schedstat")).ok())
        .filter_map(|line| line.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// The guest's rate running `ops` in a loop for `seconds`: pages per
/// second, and pages per second of the VMM's CPU time (the eBPF programs
/// run in its vCPU thread, and count there; time the machine gave to
/// others does not).
#[derive(Clone, Copy)]
struct Rate {
    wall: f64,
    cpu: f64,
}

fn guest_rate(vm: &Vm, ops: &Value, seconds: f64) -> Rate {
    let cpu_before = process_cpu_ns(vm.pid());
    vm.start_loop(ops.clone());
    std::thread::sleep(Duration::from_secs_f64(seconds));
    let report = vm.stop_loop();
    let cpu_seconds = process_cpu_ns(vm.pid()).saturating_sub(cpu_before) as f64 / 1e9;
    let pages = report["pages_written"].as_f64().unwrap();
    Rate {
        wall: pages / report["seconds"].as_f64().unwrap(),
        cpu: pages / cpu_seconds.max(1e-9),
    }
}

/// Guest rates of `rounds` rounds, each: without an agent, then with each
/// agent of `agents` (name, extra flags) in turn, each followed by a run
/// without an agent again: each run with an agent is compared with the
/// mean of the runs just before and after it.
struct Rates {
    /// Per round: the runs without an agent (one more than the agents).
    without: Vec<Vec<Rate>>,
    with: Vec<Vec<Rate>>,
    /// Per agent, per round: the kernel's run time per run of the agent's
    /// dirty-ring push program (NaN without run-time statistics).
    push_ns: Vec<Vec<f64>>,
}

/// The kernel's nanoseconds per run of the agent's dirty-ring push program,
/// from `GET /v1/status` (NaN if it was not counted).
fn push_program_ns(agent: &AgentProcess) -> f64 {
    let status = agent.status();
    status["ebpf_programs"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| {
            p["program"]
                .as_str()
                .is_some_and(|name| name.starts_with("pagefp_dirty_ring_push"))
                && p["runs"].as_u64().is_some_and(|runs| runs > 0)
        })
        .and_then(|p| p["ns_per_run"].as_f64())
        .unwrap_or(f64::NAN)
}

fn rates(
    vm: &Vm,
    ops: &Value,
    rounds: usize,
    seconds: f64,
    agents: &[(&str, &[&str])],
) -> anyhow::Result<Rates> {
    let mut rates = Rates {
        without: Vec::new(),
        with: vec![Vec::new(); agents.len()],
        push_ns: vec![Vec::new(); agents.len()],
    };
    for _ in 0..rounds {
        let mut without = vec![guest_rate(vm, ops, seconds)];
        for (i, (_, flags)) in agents.iter().enumerate() {
            let agent = AgentProcess::start(&AgentOptions {
                extra: flags.iter().map(|f| f.to_string()).collect(),
                ..AgentOptions::default()
            })?;
            // The VM started before this agent: it is adopted at its next
            // slot registration and synced at its next ring reset.
            vm.reregister();
            vm.touch(0, 1, 1);
            agent.wait_all_clean(vm.pid(), Duration::from_secs(120));
            rates.with[i].push(guest_rate(vm, ops, seconds));
            rates.push_ns[i].push(push_program_ns(&agent));
            drop(agent);
            without.push(guest_rate(vm, ops, seconds));
        }
        rates.without.push(without);
    }
    Ok(rates)
}

impl Rates {
    /// Per round: with agent `i` ÷ without, pages per wall-clock second.
    fn ratios(&self, i: usize) -> Vec<f64> {
        self.per_round(i, |with, without| with.wall / without.wall)
    }

    /// Per round: with agent `i` ÷ without, pages per VMM CPU second.
    fn cpu_ratios(&self, i: usize) -> Vec<f64> {
        self.per_round(i, |with, without| with.cpu / without.cpu)
    }

    fn per_round(&self, i: usize, f: impl Fn(&Rate, &Rate) -> f64) -> Vec<f64> {
        self.with[i]
            .iter()
            .zip(&self.without)
            .map(|(with, without)| {
                let around = Rate {
                    wall: (without[i].wall + without[i + 1].wall) / 2.0,
                    cpu: (without[i].cpu + without[i + 1].cpu) / 2.0,
                };
                f(with, &around)
            })
            .collect()
    }

    fn runs(&self, agents: &[(&str, &[&str])]) -> Value {
        let wall = |rates: &[Rate]| rates.iter().map(|r| r.wall).collect::<Vec<_>>();
        let cpu = |rates: &[Rate]| rates.iter().map(|r| r.cpu).collect::<Vec<_>>();
        let mut by_agent = serde_json::Map::new();
        for (i, (name, _)) in agents.iter().enumerate() {
            by_agent.insert(
                (*name).into(),
                json!({"pages_per_sec": wall(&self.with[i]), "pages_per_cpu_sec": cpu(&self.with[i]),
                       "ratio_to_without": spread(&self.ratios(i)),
                       "cpu_ratio_to_without": spread(&self.cpu_ratios(i))}),
            );
        }
        let without: Vec<Rate> = self.without.iter().flatten().copied().collect();
        json!({"order": "per round: without, then each agent followed by a run without; each run with an agent ÷ the mean of the runs without just before and after it",
               "without_pages_per_sec": wall(&without),
               "without_pages_per_cpu_sec": cpu(&without), "with_agent": by_agent})
    }
}

/// The agent as it runs by default, then forced onto each push program
/// with the kernel's run-time statistics on (they cost the guest two clock
/// reads per push, so not in the default run the figure comes from).
const AGENTS: [(&str, &[&str]); 4] = [
    ("default", &[]),
    (
        "tp_btf",
        &["--ring-push-program", "btf", "--ebpf-run-stats"],
    ),
    (
        "raw_tracepoint",
        &["--ring-push-program", "raw", "--ebpf-run-stats"],
    ),
    (
        "tracepoint",
        &["--ring-push-program", "tracepoint", "--ebpf-run-stats"],
    ),
];

pub fn measure(rounds: usize, seconds: f64) -> anyhow::Result<Vec<Figure>> {
    let dir = TempDir::new("pagefp-bench-dirty");
    let images = write_fleet(&dir.0, 1, 16384, FleetLayout::default())?;
    let vm = Vm::start(&dir, &images[0], VmOptions::default());
    // One write per page: one dirty event per page, as on hardware.
    let touch = json!([{"op": "touch", "first": 0, "count": 16384, "value": 1}]);
    let rates = rates(&vm, &touch, rounds, seconds, &AGENTS)?;
    let ratio = median(&mut rates.ratios(0));
    let cpu_ratio = median(&mut rates.cpu_ratios(0));
    println!(
        "  guest dirty rate with/without agent (touch): {ratio:.3} per second, {cpu_ratio:.3} per VMM CPU second"
    );
    let per_program: Vec<Value> = AGENTS[1..]
        .iter()
        .enumerate()
        .map(|(i, (name, _))| {
            json!({"program": name, "kernel_ns_per_push": spread(&rates.push_ns[i + 1]),
                   "guest_rate_ratio_to_without": spread(&rates.ratios(i + 1))})
        })
        .collect();
    // Per round, the BTF-typed program's run time ÷ the classic one's.
    let hot_path: Vec<f64> = rates.push_ns[1]
        .iter()
        .zip(&rates.push_ns[3])
        .map(|(btf, classic)| btf / classic)
        .collect();
    let hot_path_ratio = median(&mut hot_path.clone());
    println!(
        "  ring push program run time, tp_btf ÷ classic tracepoint: {hot_path_ratio:.3} ({})",
        per_program
            .iter()
            .map(|p| format!(
                "{} {:.0} ns",
                p["program"].as_str().unwrap(),
                p["kernel_ns_per_push"]["median"]
                    .as_f64()
                    .unwrap_or(f64::NAN)
            ))
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(vec![
        Figure::at_least(
            "guest_dirty_rate_ratio",
            ratio,
            0.97,
            "ratio",
            json!({"workload": "touch: one write per page, 16384 pages per iteration, harvest per iteration",
                   "seconds_per_run": seconds, "ratio": spread(&rates.ratios(0)),
                   "runs": rates.runs(&AGENTS)}),
        ),
        Figure::at_least(
            "guest_dirty_cpu_ratio",
            cpu_ratio,
            0.0,
            "ratio",
            json!({"what": "the same runs, pages per second of the VMM's own CPU time (its threads' schedstat): what the eBPF programs cost the guest, without the machine's other load",
                   "ratio": spread(&rates.cpu_ratios(0)), "note": "informational"}),
        ),
        Figure::at_most(
            "ring_push_cost_ratio",
            hot_path_ratio,
            1.0,
            "ratio",
            json!({"what": "run time per dirty-ring push of the tp_btf program ÷ the classic tracepoint program, from the kernel's eBPF run-time statistics (run_time_ns / run_cnt), per round",
                   "ratio": spread(&hot_path), "per_program": per_program,
                   "note": "the kernel's figure is the program's body only: the classic tracepoint also formats a trace record before its program runs, which it does not count, so the ratio understates what tp_btf saves"}),
        ),
    ])
}
